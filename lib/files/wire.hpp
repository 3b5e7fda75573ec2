// The two data-plane datagrams of a file transfer, `chunk` and `chunk_ack`, in the v2 binary
// header (docs/PROTOCOL.md §1), and the encryption of chunk payloads. Neither is sent reliably:
// the Sender and Receiver cores (transfer.hpp) decide what is sent again.
//
// chunk (type 12, peer -> peer), 35..1472 bytes:
//   0  u8    version 2
//   1  u8    type 12
//   2  u64   transfer id (never 0)
//   10 u32   chunk index
//   14 u32   tx seq: this transmission's number, new on every (re)send, never 0
//   18 bytes the sealed payload: n plaintext bytes (1..kChunkPayload) + 16-byte tag (Poly1305 or GCM)
// chunk_ack (type 73, receiver -> sender), 35 + 8 r bytes (at most 291):
//   0  u8    version 2
//   1  u8    type 73
//   2  u64   transfer id (never 0)
//   10 u32   highest tx seq the receiver has seen (0: none yet)
//   14 u32   cumulative: the receiver holds chunks 0 .. cumulative-1
//   18 u8    r, the number of ranges, at most kMaxAckRanges
//   19 r x   (u32 start, u32 end): chunks [start, end) held beyond `cumulative`, ascending,
//            start < end, the first start > cumulative, each start > the previous end
//   19+8r 16 tag: keyed BLAKE2b-128 (crypto_generichash) of bytes 0 .. 18+8r under the ack key
// All integers little-endian. A datagram must end exactly after its last field.
//
// Keys: the offer carries a random 32-byte FileKey (new_file_key()) inside the sealed control
// message; derive_keys() splits it (crypto_kdf) into the chunk key and the ack key (so that only
// the receiver can acknowledge, and a forged ack cannot make the sender believe a chunk arrived).
// The chunk cipher is XChaCha20-Poly1305-IETF, or AES-256-GCM when the offer says the sender can
// use it and the receiver can too (libsodium's AES-GCM needs AES-NI and PCLMUL); the accept names
// the choice. A chunk's nonce is its index and the transmission's tx seq (and, for XChaCha20,
// the transfer id; AES-GCM's 12 bytes take its low 32 bits), and the additional data binds the
// transfer id and the index: a chunk moved to another index, transfer or tx seq does not open.
// The Sender never reuses a tx seq in a transfer, and every offer has a new key, so no (key,
// nonce) pair ever seals two plaintexts, even when the file changes while it is sent (the
// whole-file check then refuses the result).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "files/ranges.hpp"
#include "protocol/messages.hpp"

namespace chat::files {

inline constexpr std::uint8_t kChunkCode = protocol::kFrameChunk;        // `chunk`: never acknowledged by a reply
inline constexpr std::uint8_t kChunkAckCode = protocol::kFrameChunkAck;  // `chunk_ack`: the answer to many chunks
inline constexpr std::size_t kHeaderBytes = 10;    // version, type, u64 transfer id
inline constexpr std::size_t kChunkFieldBytes = 8;  // u32 index, u32 tx seq
inline constexpr std::size_t kTagBytes = 16;        // AEAD tag of a chunk (either cipher); BLAKE2b-128 tag of an ack
/// Plaintext bytes in every chunk but the last: the largest that keeps a chunk datagram within
/// kMaxDatagram (1472 - 10 - 8 - 16 = 1438), so none needs IP fragmentation.
inline constexpr std::size_t kChunkPayload = protocol::kMaxDatagram - kHeaderBytes - kChunkFieldBytes - kTagBytes;
/// The tx seq in the nonce of a chunk of a file the server keeps for an offline recipient: such
/// a chunk is sealed once, by the uploader, and sent as it is however often (and by whoever) it
/// is transmitted; no live transmission has tx seq 0, so its nonce is never a live chunk's.
inline constexpr std::uint32_t kKeptTxSeq = 0;
/// Most SACK ranges in one ack (an ack is then at most 291 bytes).
inline constexpr std::size_t kMaxAckRanges = 32;

/// Chunks in a file of `size` bytes (0 for an empty file); nullopt if a u32 cannot count them.
std::optional<std::uint32_t> chunk_count(std::uint64_t size);
/// Plaintext bytes of chunk `index` of a file of `size` bytes: kChunkPayload, less for the last.
std::size_t chunk_size(std::uint64_t size, std::uint32_t index);

// A file's chunks sealed back to back (a file the server keeps: sealed once, by the uploader):
// chunk `index` at sealed_offset(index), sealed_length(size, index) bytes long.
/// Every sealed chunk but the last is this long.
inline constexpr std::size_t kSealedChunk = kChunkPayload + kTagBytes;
inline std::size_t sealed_offset(std::uint32_t index) { return std::size_t{index} * kSealedChunk; }
std::size_t sealed_length(std::uint64_t size, std::uint32_t index);
/// All of a file of `size` bytes, its chunks sealed back to back.
std::uint64_t sealed_size(std::uint64_t size);

/// One chunk on the wire; `sealed` is seal_chunk()'s output.
struct Chunk {
  std::uint64_t transfer_id = 0;
  std::uint32_t index = 0;
  std::uint32_t tx_seq = 0;
  std::string sealed;
  bool operator==(const Chunk&) const = default;
};

/// The receiver's acknowledgement: what it holds, and the newest transmission it has seen.
struct ChunkAck {
  std::uint64_t transfer_id = 0;
  std::uint32_t highest_tx = 0;
  std::uint32_t cumulative = 0;
  std::vector<Range> ranges;  // beyond `cumulative`, at most kMaxAckRanges
  bool operator==(const ChunkAck&) const = default;
};

/// Initialises libsodium once (every function here that needs it calls it); throws
/// std::runtime_error if it cannot.
void init_sodium();

/// The secret of one offered file: 32 random bytes, sent only inside sealed messages.
using FileKey = std::array<std::uint8_t, 32>;

/// The AEAD that seals chunk payloads; each value is also its bit in an offer's `ciphers`.
enum class Cipher : std::uint8_t { xchacha20poly1305 = 1, aes256gcm = 2 };
/// The ciphers this machine can use, as offer bits: XChaCha20-Poly1305 always, AES-256-GCM where
/// libsodium finds the CPU instructions it needs (crypto_aead_aes256gcm_is_available()).
std::uint8_t local_ciphers();
/// The receiver's choice from the sender's `offered` bits and its own `mine`: AES-256-GCM when
/// both have it (several times faster on such CPUs), else XChaCha20-Poly1305.
Cipher choose_cipher(std::uint8_t offered, std::uint8_t mine);

struct AesGcmKey;  // libsodium's precomputed AES-256-GCM key schedule (wire.cpp)

/// The keys derived from a FileKey, once per transfer.
struct TransferKeys {
  Cipher cipher = Cipher::xchacha20poly1305;
  std::array<std::uint8_t, 32> chunk{};  // the AEAD key of chunk payloads
  std::array<std::uint8_t, 32> ack{};    // BLAKE2b key of the tag on chunk_acks
  std::shared_ptr<const AesGcmKey> aes;  // with aes256gcm: `chunk` expanded once
};

/// A new random FileKey (libsodium's randombytes). Throws std::runtime_error if libsodium fails to start.
FileKey new_file_key();
/// The chunk and ack keys of `key` (crypto_kdf_derive_from_key, context "chatfile": the chunk
/// key subkey 1 for XChaCha20-Poly1305, 3 for AES-256-GCM; the ack key subkey 2) for chunks
/// sealed with `cipher`. Throws std::invalid_argument for AES-256-GCM on a machine
/// that cannot use it (local_ciphers() says which can).
TransferKeys derive_keys(const FileKey& key, Cipher cipher = Cipher::xchacha20poly1305);

/// `plaintext` encrypted and authenticated for transmission `tx_seq` of chunk `index` of
/// transfer `transfer_id`: plaintext.size() + kTagBytes bytes.
std::string seal_chunk(const TransferKeys& keys, std::uint64_t transfer_id, std::uint32_t index, std::uint32_t tx_seq,
                       std::string_view plaintext);
/// The plaintext of `sealed`, or nullopt if it was altered or sealed for another key, transfer,
/// index or tx seq.
std::optional<std::string> open_chunk(const TransferKeys& keys, std::uint64_t transfer_id, std::uint32_t index,
                                      std::uint32_t tx_seq, std::string_view sealed);
/// As open_chunk(), into `out` (its old contents replaced; a buffer reused for every chunk);
/// false, and `out` unspecified, if `sealed` does not open.
bool open_chunk_into(const TransferKeys& keys, std::uint64_t transfer_id, std::uint32_t index, std::uint32_t tx_seq,
                     std::string_view sealed, std::string& out);
/// The datagram of encode(Chunk{transfer_id, index, tx_seq, seal_chunk(keys, transfer_id, index,
/// tx_seq, plaintext)}), byte for byte, sealed straight into it (one buffer, no copies).
std::string seal_chunk_datagram(const TransferKeys& keys, std::uint64_t transfer_id, std::uint32_t index,
                                std::uint32_t tx_seq, std::string_view plaintext);

/// The type code (kChunkCode or kChunkAckCode) and transfer id of a file datagram, read from
/// its header only, so a dispatcher can route it (and find its keys) before protocol::decode(),
/// which does not know these types; nullopt for anything else.
struct FileHeader {
  std::uint8_t type = 0;
  std::uint64_t transfer_id = 0;
};
std::optional<FileHeader> peek_header(std::string_view bytes);

/// The datagram of `c`. A transfer id or tx seq of 0, or a `sealed` too short or too long, gives
/// a datagram decode_chunk() refuses.
std::string encode(const Chunk& c);
/// The datagram of `a`, tagged with `keys.ack`; only the first kMaxAckRanges ranges are carried.
std::string encode(const ChunkAck& a, const TransferKeys& keys);

/// The chunk in `bytes`, or nullopt if it is not exactly one well-formed chunk datagram. Never throws.
std::optional<Chunk> decode_chunk(std::string_view bytes);
/// A decoded chunk whose sealed payload is a view into the datagram's bytes.
struct ChunkView {
  std::uint64_t transfer_id = 0;
  std::uint32_t index = 0;
  std::uint32_t tx_seq = 0;
  std::string_view sealed;
};
/// As decode_chunk(), without copying the payload: `sealed` points into `bytes`.
std::optional<ChunkView> decode_chunk_view(std::string_view bytes);
/// The ack in `bytes`, or nullopt if it is not exactly one well-formed chunk_ack whose tag
/// verifies under `keys.ack`. Never throws.
std::optional<ChunkAck> decode_chunk_ack(std::string_view bytes, const TransferKeys& keys);

}  // namespace chat::files
