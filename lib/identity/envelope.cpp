// The byte layouts of design v2's sealed and signed data, built and checked with libsodium.
#include "identity/envelope.hpp"

#include <sodium.h>

#include <algorithm>
#include <stdexcept>
#include <utility>

namespace chat::identity {
namespace {

/// Domain of a channel signature, so no other signed data can pass for a channel message.
constexpr std::string_view kChannelDomain = "chatapp-channel-v2";
/// Domain of a registration proof.
constexpr std::string_view kRegisterDomain = "chatapp-register-v2";
/// Domain of the token secret derived from a simulation's seed.
constexpr std::string_view kTokenSeedDomain = "chatapp-token-seed-v1";
/// The first plaintext byte of a sealed direct message.
constexpr std::uint8_t kKindDirect = 1;
/// The first plaintext byte of a sealed receipt.
constexpr std::uint8_t kKindReceipt = 2;
/// The first plaintext byte of a sealed file control message.
constexpr std::uint8_t kKindFile = 3;

constexpr std::size_t kNonceBytes = crypto_box_NONCEBYTES;
static_assert(kBoxOverhead == crypto_box_NONCEBYTES + crypto_box_MACBYTES);
static_assert(kChannelOverhead == crypto_sign_BYTES + 8);
static_assert(sizeof(protocol::Signature) == crypto_sign_BYTES);
static_assert(sizeof(protocol::Key) == crypto_sign_PUBLICKEYBYTES);
static_assert(kTokenSize == 8 + crypto_auth_BYTES);

const unsigned char* bytes(std::string_view s) { return reinterpret_cast<const unsigned char*>(s.data()); }

/// Appends design v2's little-endian integers and length-prefixed fields.
class Writer {
 public:
  Writer& raw(std::string_view s) {
    out_.append(s);
    return *this;
  }
  Writer& raw(const std::uint8_t* p, std::size_t n) {
    out_.append(reinterpret_cast<const char*>(p), n);
    return *this;
  }
  Writer& u8(std::uint8_t v) {
    out_.push_back(static_cast<char>(v));
    return *this;
  }
  Writer& u64(std::uint64_t v) {
    for (int i = 0; i < 8; ++i) out_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
    return *this;
  }
  /// A name or a bytes8 field: u8 length + bytes (the caller checked the length).
  Writer& short_bytes(std::string_view s) {
    u8(static_cast<std::uint8_t>(s.size()));
    return raw(s);
  }
  std::string& str() { return out_; }

 private:
  std::string out_;
};

/// Reads the same fields, each checked against what is left.
class Reader {
 public:
  explicit Reader(std::string_view in) : in_(in) {}
  bool u8(std::uint8_t& v) {
    if (in_.empty()) return false;
    v = static_cast<std::uint8_t>(in_.front());
    in_.remove_prefix(1);
    return true;
  }
  bool u64(std::uint64_t& v) {
    if (in_.size() < 8) return false;
    v = 0;
    for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<std::uint8_t>(in_[static_cast<std::size_t>(i)]);
    in_.remove_prefix(8);
    return true;
  }
  bool short_bytes(std::string_view& v) {
    std::uint8_t n = 0;
    if (!u8(n) || in_.size() < n) return false;
    v = in_.substr(0, n);
    in_.remove_prefix(n);
    return true;
  }
  std::string_view rest() {
    const auto r = in_;
    in_ = {};
    return r;
  }
  bool done() const { return in_.empty(); }

 private:
  std::string_view in_;
};

void check_name_length(std::string_view name, const char* what) {
  if (name.size() > protocol::kMaxName) {
    throw std::length_error(std::string(what) + " is longer than " + std::to_string(protocol::kMaxName) + " bytes");
  }
}

void check_text_length(std::string_view text) {
  if (text.size() > protocol::kMaxText) {
    throw std::length_error("message text is longer than " + std::to_string(protocol::kMaxText) + " bytes");
  }
}

bool acceptable_text(std::string_view text) { return text.size() <= protocol::kMaxText && valid_utf8(text); }

/// The bytes a channel signature covers.
std::string channel_signed(std::string_view from, std::uint64_t mid, std::uint64_t sent_ms, std::string_view text) {
  Writer w;
  w.raw(kChannelDomain).short_bytes(from).u64(mid).u64(sent_ms).raw(text);
  return std::move(w.str());
}

/// The bytes a registration proof covers.
std::string register_signed(std::string_view name, const protocol::Key& key, std::string_view token) {
  Writer w;
  w.raw(kRegisterDomain).short_bytes(name).raw(key.data(), key.size()).short_bytes(token);
  return std::move(w.str());
}

/// The bytes a token's MAC covers (the address's 4 bytes in network order, as on the wire).
std::string token_mac_input(std::int64_t ts_us, std::string_view name, const protocol::Key& key, std::uint32_t ipv4,
                            std::uint16_t port) {
  Writer w;
  w.u64(static_cast<std::uint64_t>(ts_us)).short_bytes(name).raw(key.data(), key.size());
  for (int shift = 24; shift >= 0; shift -= 8) w.u8(static_cast<std::uint8_t>((ipv4 >> shift) & 0xff));
  w.u8(static_cast<std::uint8_t>(port & 0xff)).u8(static_cast<std::uint8_t>(port >> 8));
  return std::move(w.str());
}

}  // namespace

// ---- Pair ----

Pair::Pair(const Identity& me, const protocol::Key& peer) : peer_(peer) {
  init();
  std::array<std::uint8_t, 32> peer_box{};
  // Both fail with -1 for a key that is no valid point or has a small order (an all-zero shared key).
  valid_ = crypto_sign_ed25519_pk_to_curve25519(peer_box.data(), peer.data()) == 0 &&
           crypto_box_beforenm(shared_.data(), peer_box.data(), me.box_secret_key().data()) == 0;
  if (!valid_) sodium_memzero(shared_.data(), shared_.size());
}

Pair::Pair(Pair&& other) noexcept : peer_(other.peer_), shared_(other.shared_), valid_(other.valid_) {
  other.wipe();
}

Pair& Pair::operator=(Pair&& other) noexcept {
  if (this != &other) {
    peer_ = other.peer_;
    shared_ = other.shared_;
    valid_ = other.valid_;
    other.wipe();
  }
  return *this;
}

Pair::~Pair() { wipe(); }

void Pair::wipe() noexcept {
  sodium_memzero(shared_.data(), shared_.size());
  valid_ = false;
}

std::string Pair::seal(std::string_view plaintext) const {
  if (!valid_) throw std::logic_error("identity::Pair::seal on a pair whose peer key is not valid");
  std::string out(kBoxOverhead + plaintext.size(), '\0');
  auto* nonce = reinterpret_cast<unsigned char*>(out.data());
  // Random 24-byte nonces: a repeat is negligible, and neither side needs a counter.
  randombytes_buf(nonce, kNonceBytes);
  crypto_box_easy_afternm(nonce + kNonceBytes, bytes(plaintext), plaintext.size(), nonce, shared_.data());
  return out;
}

std::optional<std::string> Pair::open(std::string_view box) const {
  if (!valid_ || box.size() < kBoxOverhead) return std::nullopt;
  std::string plain(box.size() - kBoxOverhead, '\0');
  const auto* nonce = bytes(box);
  if (crypto_box_open_easy_afternm(reinterpret_cast<unsigned char*>(plain.data()), nonce + kNonceBytes,
                                   box.size() - kNonceBytes, nonce, shared_.data()) != 0) {
    return std::nullopt;
  }
  return plain;
}

// ---- Direct messages and receipts ----

namespace {

/// The box of kind ‖ mid ‖ sent_ms ‖ to ‖ rest: a direct message's or a file control message's.
std::string seal_addressed(const Pair& pair, std::uint8_t kind, std::uint64_t mid, std::uint64_t sent_ms,
                           std::string_view to, std::string_view rest) {
  Writer w;
  w.u8(kind).u64(mid).u64(sent_ms).short_bytes(to).raw(rest);
  std::string sealed = pair.seal(w.str());
  sodium_memzero(w.str().data(), w.str().size());
  return sealed;
}

}  // namespace

std::string seal_direct(const Pair& pair, std::uint64_t mid, std::uint64_t sent_ms, std::string_view to,
                        std::string_view text) {
  check_name_length(to, "the recipient's name");
  check_text_length(text);
  return seal_addressed(pair, kKindDirect, mid, sent_ms, to, text);
}

std::optional<Opened> open_direct(const Pair& pair, std::string_view body, std::string_view me) {
  auto opened = open_addressed_body(pair, body, me);
  if (!opened || opened->kind != OpenedBody::Kind::direct) return std::nullopt;
  return std::move(opened->message);
}

std::string seal_file(const Pair& pair, std::uint64_t mid, std::uint64_t sent_ms, std::string_view to,
                      std::string_view payload) {
  check_name_length(to, "the recipient's name");
  if (payload.size() > kMaxFilePayload) throw std::length_error("a file control message is too long");
  return seal_addressed(pair, kKindFile, mid, sent_ms, to, payload);
}

std::optional<OpenedBody> open_addressed_body(const Pair& pair, std::string_view body, std::string_view me) {
  auto plain = pair.open(body);
  if (!plain) return std::nullopt;
  Reader r(*plain);
  std::uint8_t kind = 0;
  OpenedBody b;
  std::string_view to;
  // `to == me`: the pairwise key is the same both ways, so without it a message could be sent back
  // to its own sender (reflected) and pass for one from the peer.
  std::optional<OpenedBody> result;
  if (r.u8(kind) && (kind == kKindDirect || kind == kKindFile) && r.u64(b.message.mid) &&
      r.u64(b.message.sent_ms) && r.short_bytes(to) && to == me) {
    const auto rest = r.rest();
    // A file control payload is bytes that lib/files decodes; a text must be one we would show.
    if (kind == kKindFile || acceptable_text(rest)) {
      b.kind = kind == kKindFile ? OpenedBody::Kind::file : OpenedBody::Kind::direct;
      b.message.text.assign(rest);
      result = std::move(b);
    }
  }
  sodium_memzero(plain->data(), plain->size());
  return result;
}

std::string seal_receipt(const Pair& pair, std::uint64_t mid, std::string_view to) {
  check_name_length(to, "the message sender's name");
  Writer w;
  w.u8(kKindReceipt).u64(mid).short_bytes(to);
  return pair.seal(w.str());
}

bool check_receipt(const Pair& pair, std::string_view body, std::uint64_t mid, std::string_view me) {
  const auto plain = pair.open(body);
  if (!plain) return false;
  Reader r(*plain);
  std::uint8_t kind = 0;
  std::uint64_t got = 0;
  std::string_view to;
  return r.u8(kind) && kind == kKindReceipt && r.u64(got) && got == mid && r.short_bytes(to) && to == me && r.done();
}

// ---- Channel messages ----

std::string sign_channel(const Identity& me, std::string_view from, std::uint64_t mid, std::uint64_t sent_ms,
                         std::string_view text) {
  check_name_length(from, "the sender's name");
  check_text_length(text);
  const auto sig = me.sign(channel_signed(from, mid, sent_ms, text));
  Writer w;
  w.raw(sig.data(), sig.size()).u64(sent_ms).raw(text);
  return std::move(w.str());
}

std::optional<Opened> open_channel(const protocol::Key& key, std::string_view from, std::uint64_t mid,
                                   std::string_view body) {
  if (from.size() > protocol::kMaxName || body.size() < kChannelOverhead) return std::nullopt;
  protocol::Signature sig{};
  std::copy_n(bytes(body), sig.size(), sig.begin());
  Reader r(body.substr(sig.size()));
  Opened m;
  m.mid = mid;
  if (!r.u64(m.sent_ms)) return std::nullopt;
  const auto text = r.rest();
  if (!acceptable_text(text) || !verify(key, channel_signed(from, mid, m.sent_ms, text), sig)) return std::nullopt;
  m.text.assign(text);
  return m;
}

// ---- Registration ----

protocol::Signature register_proof(const Identity& me, std::string_view name, std::string_view token) {
  check_name_length(name, "the name");
  if (token.size() > protocol::kMaxToken) {
    throw std::length_error("the token is longer than " + std::to_string(protocol::kMaxToken) + " bytes");
  }
  return me.sign(register_signed(name, me.public_key(), token));
}

bool check_register_proof(const protocol::Key& key, std::string_view name, std::string_view token,
                          const protocol::Signature& proof) {
  if (name.size() > protocol::kMaxName || token.size() > protocol::kMaxToken) return false;
  return verify(key, register_signed(name, key, token), proof);
}

// ---- Server tokens ----

TokenMinter::TokenMinter(std::uint64_t seed) {
  init();
  if (seed == 0) {
    crypto_auth_keygen(secret_.data());
    return;
  }
  Writer w;
  w.raw(kTokenSeedDomain).u64(seed);
  crypto_generichash(secret_.data(), secret_.size(), bytes(w.str()), w.str().size(), nullptr, 0);
}

TokenMinter::TokenMinter(TokenMinter&& other) noexcept : secret_(other.secret_) {
  sodium_memzero(other.secret_.data(), other.secret_.size());
}

TokenMinter& TokenMinter::operator=(TokenMinter&& other) noexcept {
  if (this != &other) {
    secret_ = other.secret_;
    sodium_memzero(other.secret_.data(), other.secret_.size());
  }
  return *this;
}

TokenMinter::~TokenMinter() { sodium_memzero(secret_.data(), secret_.size()); }

std::string TokenMinter::mint(std::int64_t now_us, std::string_view name, const protocol::Key& key,
                              std::uint32_t ipv4_host_order, std::uint16_t port) const {
  check_name_length(name, "the name");
  const auto input = token_mac_input(now_us, name, key, ipv4_host_order, port);
  std::array<std::uint8_t, crypto_auth_BYTES> mac{};
  crypto_auth(mac.data(), bytes(input), input.size(), secret_.data());
  Writer w;
  w.u64(static_cast<std::uint64_t>(now_us)).raw(mac.data(), mac.size());
  return std::move(w.str());
}

std::optional<std::int64_t> TokenMinter::check(std::string_view token, std::int64_t now_us, std::string_view name,
                                               const protocol::Key& key, std::uint32_t ipv4_host_order,
                                               std::uint16_t port) const {
  if (token.size() != kTokenSize || name.size() > protocol::kMaxName) return std::nullopt;
  Reader r(token);
  std::uint64_t raw_ts = 0;
  r.u64(raw_ts);
  const auto ts = static_cast<std::int64_t>(raw_ts);
  const auto input = token_mac_input(ts, name, key, ipv4_host_order, port);
  if (crypto_auth_verify(bytes(token) + 8, bytes(input), input.size(), secret_.data()) != 0) return std::nullopt;
  // now - ts without overflow: a token from the future, or older than its lifetime, is refused.
  if (now_us < ts) return std::nullopt;
  if (static_cast<std::uint64_t>(now_us) - static_cast<std::uint64_t>(ts) > static_cast<std::uint64_t>(kTokenLifetimeUs)) {
    return std::nullopt;
  }
  return ts;
}

// ---- Text ----

bool valid_utf8(std::string_view text) noexcept {
  std::size_t i = 0;
  const std::size_t n = text.size();
  while (i < n) {
    const auto c = static_cast<std::uint8_t>(text[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len = 0;
    std::uint32_t cp = 0;
    std::uint32_t min = 0;
    if ((c & 0xe0) == 0xc0) {
      len = 2;
      cp = c & 0x1fu;
      min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
      len = 3;
      cp = c & 0x0fu;
      min = 0x800;
    } else if ((c & 0xf8) == 0xf0) {
      len = 4;
      cp = c & 0x07u;
      min = 0x10000;
    } else {
      return false;  // a continuation byte first, or 0xf8..0xff
    }
    if (n - i < len) return false;
    for (std::size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<std::uint8_t>(text[i + k]);
      if ((cc & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3fu);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += len;
  }
  return true;
}

}  // namespace chat::identity
