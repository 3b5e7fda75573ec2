// The control messages' byte layouts (docs/PROTOCOL.md §11): little-endian integers, one op
// byte first, nothing after the last field.
#include "files/control.hpp"

#include <stdexcept>

namespace chat::files {
namespace {

constexpr std::uint8_t kOpOffer = 1;
constexpr std::uint8_t kOpAccept = 2;
constexpr std::uint8_t kOpDecline = 3;
constexpr std::uint8_t kOpCancel = 4;
constexpr std::uint8_t kOpDone = 5;

void put(std::string& out, std::uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

class Reader {
 public:
  explicit Reader(std::string_view s) : s_(s) {}
  bool take(std::uint64_t& v, int bytes) {
    if (s_.size() < static_cast<std::size_t>(bytes)) return false;
    v = 0;
    for (int i = 0; i < bytes; ++i) v |= std::uint64_t{static_cast<unsigned char>(s_[static_cast<std::size_t>(i)])} << (8 * i);
    s_.remove_prefix(static_cast<std::size_t>(bytes));
    return true;
  }
  template <std::size_t N>
  bool take(std::array<std::uint8_t, N>& a) {
    if (s_.size() < N) return false;
    for (std::size_t i = 0; i < N; ++i) a[i] = static_cast<std::uint8_t>(s_[i]);
    s_.remove_prefix(N);
    return true;
  }
  bool take(std::string& out, std::size_t n) {
    if (s_.size() < n) return false;
    out.assign(s_.substr(0, n));
    s_.remove_prefix(n);
    return true;
  }
  bool done() const { return s_.empty(); }

 private:
  std::string_view s_;
};

}  // namespace

std::string encode(const Control& c) {
  std::string out;
  if (const auto* o = std::get_if<ctl::Offer>(&c)) {
    if (o->name.size() > kMaxOfferedName) throw std::length_error("the file name is longer than 255 bytes");
    out.push_back(static_cast<char>(kOpOffer));
    put(out, o->transfer, 8);
    put(out, o->size, 8);
    out.append(reinterpret_cast<const char*>(o->hash.data()), o->hash.size());
    out.append(reinterpret_cast<const char*>(o->key.data()), o->key.size());
    put(out, o->name.size(), 2);
    out.append(o->name);
    put(out, o->ciphers, 1);
  } else if (const auto* a = std::get_if<ctl::Accept>(&c)) {
    if (a->have.size() > kMaxAcceptRanges) throw std::length_error("too many ranges in an accept");
    out.push_back(static_cast<char>(kOpAccept));
    put(out, a->transfer, 8);
    put(out, a->have.size(), 1);
    for (const auto& r : a->have) {
      put(out, r.start, 4);
      put(out, r.end, 4);
    }
    put(out, static_cast<std::uint8_t>(a->cipher), 1);
  } else if (const auto* d = std::get_if<ctl::Decline>(&c)) {
    out.push_back(static_cast<char>(kOpDecline));
    put(out, d->transfer, 8);
  } else if (const auto* x = std::get_if<ctl::Cancel>(&c)) {
    out.push_back(static_cast<char>(kOpCancel));
    put(out, x->transfer, 8);
  } else {
    const auto& f = std::get<ctl::Done>(c);
    out.push_back(static_cast<char>(kOpDone));
    put(out, f.transfer, 8);
    put(out, static_cast<std::uint8_t>(f.result), 1);
  }
  return out;
}

std::optional<Control> decode(std::string_view payload) {
  Reader r(payload);
  std::uint64_t op = 0;
  std::uint64_t transfer = 0;
  if (!r.take(op, 1) || !r.take(transfer, 8) || transfer == 0) return std::nullopt;
  std::optional<Control> out;
  switch (op) {
    case kOpOffer: {
      ctl::Offer o;
      o.transfer = transfer;
      std::uint64_t n = 0;
      if (!r.take(o.size, 8) || !r.take(o.hash) || !r.take(o.key) || !r.take(n, 2) || n == 0 ||
          n > kMaxOfferedName || !r.take(o.name, static_cast<std::size_t>(n)))
        return std::nullopt;
      // An offer of a build before the field (a kept file's, perhaps, saved days ago) ends at
      // the name: XChaCha20-Poly1305, the one cipher there was.
      std::uint64_t ciphers = static_cast<std::uint8_t>(Cipher::xchacha20poly1305);
      if (!r.done() && !r.take(ciphers, 1)) return std::nullopt;
      if ((ciphers & static_cast<std::uint8_t>(Cipher::xchacha20poly1305)) == 0) return std::nullopt;
      o.ciphers = static_cast<std::uint8_t>(ciphers);
      out = std::move(o);
      break;
    }
    case kOpAccept: {
      ctl::Accept a;
      a.transfer = transfer;
      std::uint64_t n = 0;
      if (!r.take(n, 1) || n > kMaxAcceptRanges) return std::nullopt;
      std::uint32_t end = 0;
      for (std::uint64_t i = 0; i < n; ++i) {
        std::uint64_t first = 0;
        std::uint64_t last = 0;
        if (!r.take(first, 4) || !r.take(last, 4)) return std::nullopt;
        // Each range non-empty, after the one before it, not touching it.
        if (last <= first || (i > 0 && first <= end)) return std::nullopt;
        a.have.push_back({static_cast<std::uint32_t>(first), static_cast<std::uint32_t>(last)});
        end = static_cast<std::uint32_t>(last);
      }
      std::uint64_t cipher = static_cast<std::uint8_t>(Cipher::xchacha20poly1305);  // or an older build's accept
      if (!r.done() && !r.take(cipher, 1)) return std::nullopt;
      if (cipher != static_cast<std::uint8_t>(Cipher::xchacha20poly1305) &&
          cipher != static_cast<std::uint8_t>(Cipher::aes256gcm))
        return std::nullopt;
      a.cipher = static_cast<Cipher>(cipher);
      out = std::move(a);
      break;
    }
    case kOpDecline: out = ctl::Decline{transfer}; break;
    case kOpCancel: out = ctl::Cancel{transfer}; break;
    case kOpDone: {
      std::uint64_t result = 0;
      if (!r.take(result, 1) || result > 2) return std::nullopt;
      out = ctl::Done{transfer, static_cast<ctl::Done::Result>(result)};
      break;
    }
    default: return std::nullopt;
  }
  if (!r.done()) return std::nullopt;
  return out;
}

std::uint64_t transfer_of(const Control& c) {
  return std::visit([](const auto& m) { return m.transfer; }, c);
}

}  // namespace chat::files
