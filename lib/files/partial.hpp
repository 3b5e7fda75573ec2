// The file side of a transfer: the receiver's partial file (written chunk by chunk, resumable
// after a restart, published only when its BLAKE2b-256 matches the offer) and the sender's
// reading and hashing of the file it offers.
//
// A partial download of "report.pdf" whose hash starts 0123456789abcdef... lives in the
// download directory as two hidden files:
//   .report.pdf.0123456789abcdef.part   the chunks, each at index * kChunkPayload
//   .report.pdf.0123456789abcdef.have   the sidecar: which chunks are written and on disk
// The sidecar is 48 bytes of header ("CHATHAV1", u64 size LE, the 32-byte hash) and then a
// bitmap, bit i (byte i / 8, bit i % 8) for chunk i. It is written only by flush(), after an
// fdatasync() of the part file, so a set bit always means the chunk's bytes are on disk; bits
// only ever go from 0 to 1, so even a torn write of the bitmap claims nothing unwritten. A
// chunk whose bit was lost in a crash is fetched again; anything else wrong is caught by the
// hash at the end.
//
// The hash is kept as the download goes, over the chunks in file order: a chunk that extends
// the in-order prefix is hashed from the bytes handed to write() (the same bytes that go to
// disk), and chunks held beyond a gap (written out of order, or resumed from the sidecar) are
// read back from the part file once the gap before them fills. So finish() compares the whole
// file's BLAKE2b-256 with the offer's without reading the file again, and the check covers
// every byte of the file as written (a change made to the part file by someone else after a
// chunk was hashed is no longer seen; one made between two runs is, as resumed chunks are read).
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <memory>

#include "files/ranges.hpp"
#include "files/result.hpp"

struct crypto_generichash_blake2b_state;  // libsodium's, kept behind a pointer (64-byte aligned)

namespace chat::files {

/// A BLAKE2b-256 hash (crypto_generichash, 32 bytes, no key).
using Hash = std::array<std::uint8_t, 32>;

/// The BLAKE2b-256 of the file at `file`, read in blocks.
Result<Hash> hash_file(const std::filesystem::path& file);
/// Lowercase hex of `bytes`.
std::string to_hex(const std::uint8_t* bytes, std::size_t n);

/// The names of a partial download's two files (see the top of this header); the safe name is
/// shortened so that both stay within kMaxNameBytes.
std::string part_name(std::string_view safe_name, const Hash& hash);
std::string have_name(std::string_view safe_name, const Hash& hash);

/// A file descriptor, closed when it goes; movable.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept;
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { close(); }
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void close();

 private:
  int fd_ = -1;
};

/// The file being sent: its size and its chunks, read with pread, kReadAhead chunks at a time.
class SourceFile {
 public:
  /// Opens `file` for reading; refuses anything but a regular file, and files of more chunks than a u32 counts.
  static Result<SourceFile> open(const std::filesystem::path& file);

  std::uint64_t size() const { return size_; }
  std::uint32_t chunk_count() const { return chunks_; }
  /// The BLAKE2b-256 of the file as it is now, read through the descriptor opened (so it is the
  /// same file the chunks are read from, even if the path was replaced since).
  Result<Hash> hash() const;
  /// The plaintext of chunk `index` (chunk_size() bytes), valid until the next call; an error if
  /// it is past the end or the file got shorter since it was opened. A chunk not among those
  /// read last is read with the ones after it (kReadAhead in one pread), as chunks mostly go
  /// out in order; a resend of one before them is read alone. So a chunk may come from a read
  /// made before the file changed (the receiver's whole-file check refuses the result anyway).
  Result<std::string_view> read_chunk(std::uint32_t index) const;

 private:
  SourceFile(Fd fd, std::filesystem::path path, std::uint64_t size, std::uint32_t chunks)
      : fd_(std::move(fd)), path_(std::move(path)), size_(size), chunks_(chunks) {}
  Fd fd_;
  std::filesystem::path path_;
  std::uint64_t size_;
  std::uint32_t chunks_;
  mutable std::string ahead_;            // chunks ahead_first_ .. ahead_first_ + ahead_count_ - 1
  mutable std::uint32_t ahead_first_ = 0;
  mutable std::uint32_t ahead_count_ = 0;
  mutable std::string once_;             // a chunk before them, read alone
};

/// Chunks a SourceFile reads in one pread (92 KB).
inline constexpr std::uint32_t kReadAhead = 64;

/// The receiver's partial download of one offered file (see the top of this header).
class Partial {
 public:
  /// Opens, or creates, the partial download in `dir` of the file offered as `offered_name`
  /// (reduced with safe_basename() here) of `size` bytes and BLAKE2b-256 `hash`. A sidecar
  /// that matches size and hash is resumed (have() says what is held); any other state (no
  /// sidecar, a damaged one, one for other content) starts the download afresh. Refuses a
  /// symlink or anything but a regular file at either name, and a download another Partial
  /// (here or in another process) has open: the part file is flock()ed while open.
  static Result<Partial> open(const std::filesystem::path& dir, std::string_view offered_name, const Hash& hash,
                              std::uint64_t size);

  Partial(Partial&&) noexcept = default;
  Partial& operator=(Partial&&) = delete;  // would drop the unflushed state of the one replaced
  Partial(const Partial&) = delete;
  Partial& operator=(const Partial&) = delete;
  /// Flushes (best effort) what is written, so a later open() resumes it.
  ~Partial();

  /// Writes chunk `index` (exactly chunk_size() bytes) at index * kChunkPayload; a chunk already
  /// held is left as it is. A chunk that continues the one before it is kept in memory (up to
  /// kWriteBatch chunks) and written with it in one pwrite, so an error may be reported by a
  /// later write(), flush() or finish(). An error of kind disk_full (ENOSPC, EDQUOT) or io says
  /// why; on any error the caller gives up the transfer and discard()s.
  Status write(std::uint32_t index, std::string_view bytes);
  /// Writes the chunks kept in memory, makes everything written durable (fdatasync) and then
  /// records it in the sidecar. Call it now and then (every second or few MiB); the destructor
  /// calls it too.
  Status flush();
  /// Checks the whole file's BLAKE2b-256 (kept as the chunks came, see the top of this header,
  /// and completed from the part file for chunks not hashed yet) against the offered hash. If it matches, publishes the
  /// file under unique_path(dir, name), never over an existing file, removes the sidecar and
  /// returns where it now is. If it does not, deletes the part file and the sidecar and returns
  /// an error of kind hash_mismatch. Before every chunk is held: kind incomplete, nothing changed.
  Result<std::filesystem::path> finish();
  /// Deletes the part file and the sidecar (cancel, disk full, give up); the Partial is then closed.
  void discard();

  /// The chunks written (and those resumed).
  const RangeSet& have() const { return have_; }
  std::uint32_t chunk_count() const { return chunks_; }
  std::uint64_t size() const { return size_; }
  /// The name it will be saved as (safe_basename of the offered name).
  const std::string& name() const { return name_; }
  const std::filesystem::path& part_path() const { return part_path_; }
  const std::filesystem::path& have_path() const { return have_path_; }

 private:
  struct HashStateDelete {
    void operator()(crypto_generichash_blake2b_state* s) const;
  };

  Partial() = default;
  Status start_afresh();
  void close();
  /// Writes the batch kept in memory, if any.
  Status write_batch();
  /// Hashes the in-order prefix as far as the chunks held allow; `index`/`bytes`: the chunk
  /// just written (hashed from memory if it is next), the rest read back from the part file.
  Status advance_hash(std::uint32_t index, std::string_view bytes);
  /// Hashes chunks [hashed_, end), read from the part file.
  Status hash_from_disk(std::uint32_t end);

  std::filesystem::path dir_;
  std::string name_;
  Hash hash_{};
  std::uint64_t size_ = 0;
  std::uint32_t chunks_ = 0;
  std::filesystem::path part_path_;
  std::filesystem::path have_path_;
  Fd part_fd_;
  Fd have_fd_;
  std::vector<std::uint8_t> bitmap_;
  RangeSet have_;
  bool dirty_ = false;  // chunks written since the last flush
  std::string batch_;   // chunks batch_first_ .. batch_first_ + batch_count_ - 1, not written yet
  std::uint32_t batch_first_ = 0;
  std::uint32_t batch_count_ = 0;
  std::unique_ptr<crypto_generichash_blake2b_state, HashStateDelete> hash_state_;  // over chunks [0, hashed_)
  std::uint32_t hashed_ = 0;
};

/// Chunks a Partial keeps in memory at most before it writes them in one pwrite (92 KB).
inline constexpr std::uint32_t kWriteBatch = 64;

}  // namespace chat::files
