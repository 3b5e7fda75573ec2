// Encoding, strict decoding and encryption of the file data-plane datagrams.
#include "files/wire.hpp"

#include <algorithm>
#include <stdexcept>

#include <sodium.h>

namespace chat::files {

struct AesGcmKey {
  crypto_aead_aes256gcm_state state;  // 16-byte aligned by its type
  AesGcmKey() = default;
  AesGcmKey(const AesGcmKey&) = delete;
  AesGcmKey& operator=(const AesGcmKey&) = delete;
  ~AesGcmKey() { sodium_memzero(&state, sizeof state); }
};

namespace {

static_assert(kTagBytes == crypto_aead_xchacha20poly1305_ietf_ABYTES);
static_assert(kTagBytes == crypto_aead_aes256gcm_ABYTES);
static_assert(kHeaderBytes + kChunkFieldBytes + kChunkPayload + kTagBytes == protocol::kMaxDatagram);
static_assert(kMaxAckRanges <= 255);  // the count is a u8

constexpr std::size_t kAckFixedBytes = kHeaderBytes + 4 + 4 + 1;
constexpr char kKdfContext[crypto_kdf_CONTEXTBYTES + 1] = "chatfile";

void put_u32(std::string& out, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) out += static_cast<char>((v >> (8 * i)) & 0xFF);
}
void put_u64(std::string& out, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) out += static_cast<char>((v >> (8 * i)) & 0xFF);
}
void put_header(std::string& out, std::uint8_t type, std::uint64_t id) {
  out += static_cast<char>(protocol::kVersion);
  out += static_cast<char>(type);
  put_u64(out, id);
}

// Reads fields front to back, each checked against what is left; a failed read leaves it failed.
class Reader {
 public:
  explicit Reader(std::string_view s) : s_(s) {}
  bool u8(std::uint8_t& v) {
    if (s_.size() - pos_ < 1) return false;
    v = static_cast<std::uint8_t>(s_[pos_++]);
    return true;
  }
  bool u32(std::uint32_t& v) {
    if (s_.size() - pos_ < 4) return false;
    v = 0;
    for (int i = 0; i < 4; ++i) v |= std::uint32_t{static_cast<unsigned char>(s_[pos_ + i])} << (8 * i);
    pos_ += 4;
    return true;
  }
  bool u64(std::uint64_t& v) {
    if (s_.size() - pos_ < 8) return false;
    v = 0;
    for (int i = 0; i < 8; ++i) v |= std::uint64_t{static_cast<unsigned char>(s_[pos_ + i])} << (8 * i);
    pos_ += 8;
    return true;
  }
  std::size_t left() const { return s_.size() - pos_; }
  std::string_view rest() const { return s_.substr(pos_); }

 private:
  std::string_view s_;
  std::size_t pos_ = 0;
};

// The nonce of one transmission of chunk `index`, in the first bytes of XChaCha20's 24: index
// (4), transfer id (8), tx seq (4), zeros. AES-GCM takes the first 12 of a nonce laid out
// index (4), tx seq (4), transfer id's low 4 (its key is the transfer's own). The Sender never
// reuses a tx seq within a transfer, so no two transmissions share a nonce, even if the file
// changed between a chunk and its resend.
using Nonce = std::array<unsigned char, crypto_aead_xchacha20poly1305_ietf_NPUBBYTES>;
static_assert(crypto_aead_aes256gcm_NPUBBYTES == 12);

Nonce chunk_nonce(Cipher cipher, std::uint64_t id, std::uint32_t index, std::uint32_t tx_seq) {
  Nonce n{};
  const bool aes = cipher == Cipher::aes256gcm;
  for (int i = 0; i < 4; ++i) n[i] = static_cast<unsigned char>((index >> (8 * i)) & 0xFF);
  for (int i = 0; i < (aes ? 4 : 8); ++i) n[(aes ? 8 : 4) + i] = static_cast<unsigned char>((id >> (8 * i)) & 0xFF);
  for (int i = 0; i < 4; ++i) n[(aes ? 4 : 12) + i] = static_cast<unsigned char>((tx_seq >> (8 * i)) & 0xFF);
  return n;
}

// The additional data of chunk `index`: "chunk", transfer id, index.
std::array<unsigned char, 5 + 8 + 4> chunk_ad(std::uint64_t id, std::uint32_t index) {
  std::array<unsigned char, 5 + 8 + 4> ad{'c', 'h', 'u', 'n', 'k'};
  for (int i = 0; i < 8; ++i) ad[5 + i] = static_cast<unsigned char>((id >> (8 * i)) & 0xFF);
  for (int i = 0; i < 4; ++i) ad[13 + i] = static_cast<unsigned char>((index >> (8 * i)) & 0xFF);
  return ad;
}

// Seals `plaintext` into `out` (plaintext.size() + kTagBytes bytes of room).
void seal_into(unsigned char* out, const TransferKeys& keys, std::uint64_t transfer_id, std::uint32_t index,
               std::uint32_t tx_seq, std::string_view plaintext) {
  init_sodium();
  const auto nonce = chunk_nonce(keys.cipher, transfer_id, index, tx_seq);
  const auto ad = chunk_ad(transfer_id, index);
  const auto* in = reinterpret_cast<const unsigned char*>(plaintext.data());
  if (keys.cipher == Cipher::aes256gcm) {
    crypto_aead_aes256gcm_encrypt_afternm(out, nullptr, in, plaintext.size(), ad.data(), ad.size(), nullptr,
                                          nonce.data(), &keys.aes->state);
    return;
  }
  crypto_aead_xchacha20poly1305_ietf_encrypt(out, nullptr, in, plaintext.size(), ad.data(), ad.size(), nullptr,
                                             nonce.data(), keys.chunk.data());
}

std::array<unsigned char, kTagBytes> ack_tag(const TransferKeys& keys, std::string_view body) {
  init_sodium();
  std::array<unsigned char, kTagBytes> tag{};
  crypto_generichash(tag.data(), tag.size(), reinterpret_cast<const unsigned char*>(body.data()), body.size(),
                     keys.ack.data(), keys.ack.size());
  return tag;
}

}  // namespace

void init_sodium() {
  static const bool ready = sodium_init() >= 0;
  if (!ready) throw std::runtime_error("The cryptography library (libsodium) could not be initialised.");
}

std::optional<std::uint32_t> chunk_count(std::uint64_t size) {
  const std::uint64_t n = size / kChunkPayload + (size % kChunkPayload != 0 ? 1 : 0);
  if (n > UINT32_MAX) return std::nullopt;
  return static_cast<std::uint32_t>(n);
}

std::size_t chunk_size(std::uint64_t size, std::uint32_t index) {
  const std::uint64_t start = std::uint64_t{index} * kChunkPayload;
  if (start >= size) return 0;
  return static_cast<std::size_t>(std::min<std::uint64_t>(kChunkPayload, size - start));
}

std::size_t sealed_length(std::uint64_t size, std::uint32_t index) { return chunk_size(size, index) + kTagBytes; }

std::uint64_t sealed_size(std::uint64_t size) {
  return size + std::uint64_t{chunk_count(size).value_or(0)} * kTagBytes;
}

FileKey new_file_key() {
  init_sodium();
  FileKey k;
  randombytes_buf(k.data(), k.size());
  return k;
}

std::uint8_t local_ciphers() {
  init_sodium();
  static const std::uint8_t ciphers = static_cast<std::uint8_t>(
      static_cast<unsigned>(Cipher::xchacha20poly1305) |
      (crypto_aead_aes256gcm_is_available() != 0 ? static_cast<unsigned>(Cipher::aes256gcm) : 0u));
  return ciphers;
}

Cipher choose_cipher(std::uint8_t offered, std::uint8_t mine) {
  const auto aes = static_cast<std::uint8_t>(Cipher::aes256gcm);
  return (offered & mine & aes) != 0 ? Cipher::aes256gcm : Cipher::xchacha20poly1305;
}

TransferKeys derive_keys(const FileKey& key, Cipher cipher) {
  init_sodium();
  TransferKeys t;
  t.cipher = cipher;
  // A subkey of its own per cipher: one key never serves two algorithms.
  crypto_kdf_derive_from_key(t.chunk.data(), t.chunk.size(), cipher == Cipher::aes256gcm ? 3 : 1, kKdfContext,
                             key.data());
  crypto_kdf_derive_from_key(t.ack.data(), t.ack.size(), 2, kKdfContext, key.data());
  if (cipher == Cipher::aes256gcm) {
    if ((local_ciphers() & static_cast<std::uint8_t>(Cipher::aes256gcm)) == 0)
      throw std::invalid_argument("AES-256-GCM is not available on this CPU");
    auto aes = std::make_shared<AesGcmKey>();
    crypto_aead_aes256gcm_beforenm(&aes->state, t.chunk.data());
    t.aes = std::move(aes);
  }
  return t;
}

std::string seal_chunk(const TransferKeys& keys, std::uint64_t transfer_id, std::uint32_t index, std::uint32_t tx_seq,
                       std::string_view plaintext) {
  std::string out(plaintext.size() + kTagBytes, '\0');
  seal_into(reinterpret_cast<unsigned char*>(out.data()), keys, transfer_id, index, tx_seq, plaintext);
  return out;
}

std::string seal_chunk_datagram(const TransferKeys& keys, std::uint64_t transfer_id, std::uint32_t index,
                                std::uint32_t tx_seq, std::string_view plaintext) {
  std::string out;
  out.reserve(kHeaderBytes + kChunkFieldBytes + plaintext.size() + kTagBytes);
  put_header(out, kChunkCode, transfer_id);
  put_u32(out, index);
  put_u32(out, tx_seq);
  const std::size_t at = out.size();
  out.resize(at + plaintext.size() + kTagBytes);
  seal_into(reinterpret_cast<unsigned char*>(out.data() + at), keys, transfer_id, index, tx_seq, plaintext);
  return out;
}

bool open_chunk_into(const TransferKeys& keys, std::uint64_t transfer_id, std::uint32_t index, std::uint32_t tx_seq,
                     std::string_view sealed, std::string& out) {
  init_sodium();
  if (sealed.size() < kTagBytes) return false;
  const auto nonce = chunk_nonce(keys.cipher, transfer_id, index, tx_seq);
  const auto ad = chunk_ad(transfer_id, index);
  out.resize(sealed.size() - kTagBytes);
  auto* to = reinterpret_cast<unsigned char*>(out.data());
  const auto* in = reinterpret_cast<const unsigned char*>(sealed.data());
  if (keys.cipher == Cipher::aes256gcm)
    return crypto_aead_aes256gcm_decrypt_afternm(to, nullptr, nullptr, in, sealed.size(), ad.data(), ad.size(),
                                                 nonce.data(), &keys.aes->state) == 0;
  return crypto_aead_xchacha20poly1305_ietf_decrypt(to, nullptr, nullptr, in, sealed.size(), ad.data(), ad.size(),
                                                    nonce.data(), keys.chunk.data()) == 0;
}

std::optional<std::string> open_chunk(const TransferKeys& keys, std::uint64_t transfer_id, std::uint32_t index,
                                      std::uint32_t tx_seq, std::string_view sealed) {
  std::string out;
  if (!open_chunk_into(keys, transfer_id, index, tx_seq, sealed, out)) return std::nullopt;
  return out;
}

std::optional<FileHeader> peek_header(std::string_view bytes) {
  Reader r(bytes);
  std::uint8_t version = 0;
  FileHeader h;
  if (!r.u8(version) || !r.u8(h.type) || !r.u64(h.transfer_id)) return std::nullopt;
  if (version != protocol::kVersion || (h.type != kChunkCode && h.type != kChunkAckCode) || h.transfer_id == 0)
    return std::nullopt;
  return h;
}

std::string encode(const Chunk& c) {
  std::string out;
  out.reserve(kHeaderBytes + kChunkFieldBytes + c.sealed.size());
  put_header(out, kChunkCode, c.transfer_id);
  put_u32(out, c.index);
  put_u32(out, c.tx_seq);
  out.append(c.sealed);
  return out;
}

std::string encode(const ChunkAck& a, const TransferKeys& keys) {
  const std::size_t n = std::min(a.ranges.size(), kMaxAckRanges);
  std::string out;
  out.reserve(kAckFixedBytes + 8 * n + kTagBytes);
  put_header(out, kChunkAckCode, a.transfer_id);
  put_u32(out, a.highest_tx);
  put_u32(out, a.cumulative);
  out += static_cast<char>(n);
  for (std::size_t i = 0; i < n; ++i) {
    put_u32(out, a.ranges[i].start);
    put_u32(out, a.ranges[i].end);
  }
  const auto tag = ack_tag(keys, out);
  out.append(reinterpret_cast<const char*>(tag.data()), tag.size());
  return out;
}

std::optional<ChunkView> decode_chunk_view(std::string_view bytes) {
  if (bytes.size() > protocol::kMaxDatagram) return std::nullopt;
  const auto h = peek_header(bytes);
  if (!h || h->type != kChunkCode) return std::nullopt;
  Reader r(bytes.substr(kHeaderBytes));
  ChunkView c;
  c.transfer_id = h->transfer_id;
  if (!r.u32(c.index) || !r.u32(c.tx_seq) || c.tx_seq == 0) return std::nullopt;
  if (r.left() < kTagBytes + 1) return std::nullopt;  // a chunk carries at least one byte
  c.sealed = r.rest();
  return c;
}

std::optional<Chunk> decode_chunk(std::string_view bytes) {
  const auto v = decode_chunk_view(bytes);
  if (!v) return std::nullopt;
  return Chunk{v->transfer_id, v->index, v->tx_seq, std::string(v->sealed)};
}

std::optional<ChunkAck> decode_chunk_ack(std::string_view bytes, const TransferKeys& keys) {
  const auto h = peek_header(bytes);
  if (!h || h->type != kChunkAckCode) return std::nullopt;
  Reader r(bytes.substr(kHeaderBytes));
  ChunkAck a;
  a.transfer_id = h->transfer_id;
  std::uint8_t n = 0;
  if (!r.u32(a.highest_tx) || !r.u32(a.cumulative) || !r.u8(n)) return std::nullopt;
  if (n > kMaxAckRanges || r.left() != std::size_t{n} * 8 + kTagBytes) return std::nullopt;
  std::uint32_t floor = a.cumulative;  // each start must be above this: past the gap at `cumulative`, then past the last end
  for (std::uint8_t i = 0; i < n; ++i) {
    Range g;
    r.u32(g.start);
    r.u32(g.end);
    if (g.start <= floor || g.end <= g.start) return std::nullopt;
    a.ranges.push_back(g);
    floor = g.end;
  }
  const std::string_view body = bytes.substr(0, bytes.size() - kTagBytes);
  const auto tag = ack_tag(keys, body);
  if (sodium_memcmp(tag.data(), r.rest().data(), kTagBytes) != 0) return std::nullopt;
  return a;
}

}  // namespace chat::files
