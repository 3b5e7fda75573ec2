// The receiver's partial file, and the sender's reading and hashing of its file.
#include "files/partial.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <tuple>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sodium.h>

#include "files/safe_name.hpp"
#include "files/wire.hpp"

namespace chat::files {
namespace {

namespace fs = std::filesystem;

constexpr char kMagic[8] = {'C', 'H', 'A', 'T', 'H', 'A', 'V', '1'};  // sidecar format 1
constexpr std::size_t kSidecarHeader = 8 + 8 + 32;                     // magic, size, hash
constexpr std::size_t kBlock = 64 * 1024;                              // bytes hashed per read
constexpr int kPublishTries = 100;  // names taken by others between unique_path() and publish()
// Room that part_name() and have_name() add around the safe name: '.', '.', 16 hex, ".part".
constexpr std::size_t kPartDecoration = 1 + 1 + 16 + 5;

FileError error(ErrorKind kind, std::string message) {
  FileError e;
  e.kind = kind;
  e.message = std::move(message);
  return e;
}

// "<what>: <strerror>." with the kind the errno calls for.
FileError sys_error(int err, std::string what) {
  FileError e;
  e.code = err;
  e.kind = (err == ENOSPC || err == EDQUOT) ? ErrorKind::disk_full : ErrorKind::io;
  e.message = std::move(what.append(": ").append(std::strerror(err)).append("."));
  return e;
}

// Reads up to `n` bytes at `offset`, retrying short reads; the count read (less only at the
// end of the file), or -1 with errno set.
ssize_t pread_all(int fd, void* buf, std::size_t n, std::uint64_t offset) {
  std::size_t done = 0;
  while (done < n) {
    const ssize_t r = ::pread(fd, static_cast<char*>(buf) + done, n - done, static_cast<off_t>(offset + done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -1;
    if (r == 0) break;
    done += static_cast<std::size_t>(r);
  }
  return static_cast<ssize_t>(done);
}

// Writes all `n` bytes at `offset`; false with errno set if it cannot.
bool pwrite_all(int fd, const void* buf, std::size_t n, std::uint64_t offset) {
  std::size_t done = 0;
  while (done < n) {
    const ssize_t w = ::pwrite(fd, static_cast<const char*>(buf) + done, n - done, static_cast<off_t>(offset + done));
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return false;
    if (w == 0) {  // a full disk that says nothing: call it that
      errno = ENOSPC;
      return false;
    }
    done += static_cast<std::size_t>(w);
  }
  return true;
}

// Opens (creating if asked) a regular file, never through a symlink. O_NONBLOCK only for the
// open itself: a FIFO would otherwise block it until a writer came, and is then refused.
Result<Fd> open_regular(const fs::path& p, int flags) {
  Fd fd(::open(p.c_str(), flags | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK, 0666));
  if (!fd.valid()) {
    const int err = errno;
    if (err == ELOOP) return error(ErrorKind::io, std::string("Refusing to open ").append(p.string()).append(": it is a symbolic link."));
    return sys_error(err, std::string("Cannot open ").append(p.string()));
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return sys_error(errno, std::string("Cannot read the status of ").append(p.string()));
  if (!S_ISREG(st.st_mode)) return error(ErrorKind::io, std::string("Refusing to use ").append(p.string()).append(": it is not a regular file."));
  if (const int fl = ::fcntl(fd.get(), F_GETFL); fl < 0 || ::fcntl(fd.get(), F_SETFL, fl & ~O_NONBLOCK) != 0)
    return sys_error(errno, std::string("Cannot use ").append(p.string()));
  return fd;
}

// BLAKE2b-256 of everything `fd` holds from offset 0.
Result<Hash> hash_fd(int fd, const fs::path& p) {
  init_sodium();
  crypto_generichash_state st;
  crypto_generichash_init(&st, nullptr, 0, crypto_generichash_BYTES);
  std::vector<unsigned char> buf(kBlock);
  std::uint64_t offset = 0;
  for (;;) {
    const ssize_t r = pread_all(fd, buf.data(), buf.size(), offset);
    if (r < 0) return sys_error(errno, std::string("Cannot read ").append(p.string()));
    if (r == 0) break;
    crypto_generichash_update(&st, buf.data(), static_cast<unsigned long long>(r));
    offset += static_cast<std::uint64_t>(r);
  }
  Hash h;
  static_assert(std::tuple_size_v<Hash> == crypto_generichash_BYTES);
  crypto_generichash_final(&st, h.data(), h.size());
  return h;
}

std::string partial_base(std::string_view safe_name, const Hash& hash) {
  return std::string(".")
      .append(utf8_prefix(safe_name, kMaxNameBytes - kPartDecoration))
      .append(".")
      .append(to_hex(hash.data(), 8));
}

void put_u64(unsigned char* out, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<unsigned char>((v >> (8 * i)) & 0xFF);
}

}  // namespace

std::string to_hex(const std::uint8_t* bytes, std::size_t n) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(2 * n);
  for (std::size_t i = 0; i < n; ++i) {
    out += kDigits[bytes[i] >> 4];
    out += kDigits[bytes[i] & 0x0F];
  }
  return out;
}

std::string part_name(std::string_view safe_name, const Hash& hash) { return partial_base(safe_name, hash).append(".part"); }
std::string have_name(std::string_view safe_name, const Hash& hash) { return partial_base(safe_name, hash).append(".have"); }

Result<Hash> hash_file(const fs::path& file) {
  auto fd = open_regular(file, O_RDONLY);
  if (!fd) return fd.error();
  return hash_fd(fd.value().get(), file);
}

// ---------------------------------------------------------------- Fd

Fd& Fd::operator=(Fd&& o) noexcept {
  if (this != &o) {
    close();
    fd_ = std::exchange(o.fd_, -1);
  }
  return *this;
}

void Fd::close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

// ---------------------------------------------------------------- SourceFile

Result<SourceFile> SourceFile::open(const fs::path& file) {
  auto fd = open_regular(file, O_RDONLY);
  if (!fd) return fd.error();
  struct stat st {};
  if (::fstat(fd.value().get(), &st) != 0) return sys_error(errno, std::string("Cannot read the status of ").append(file.string()));
  const auto size = static_cast<std::uint64_t>(st.st_size);
  const auto chunks = files::chunk_count(size);
  if (!chunks) return error(ErrorKind::bad_input, std::string("The file ").append(file.string()).append(" is too large to send."));
  return SourceFile(std::move(fd.value()), file, size, *chunks);
}

Result<Hash> SourceFile::hash() const { return hash_fd(fd_.get(), path_); }

Result<std::string_view> SourceFile::read_chunk(std::uint32_t index) const {
  if (index >= chunks_)
    return error(ErrorKind::bad_input, std::string("Chunk ").append(std::to_string(index)).append(" is past the end of ").append(path_.string()).append("."));
  const std::size_t n = chunk_size(size_, index);
  if (index < ahead_first_ && ahead_count_ > 0) {
    // A resend of a chunk before the block: read alone, so the block stays for the new ones.
    once_.resize(n);
    const ssize_t r = pread_all(fd_.get(), once_.data(), n, std::uint64_t{index} * kChunkPayload);
    if (r < 0) return sys_error(errno, std::string("Cannot read ").append(path_.string()));
    if (static_cast<std::size_t>(r) != n)
      return error(ErrorKind::io, std::string("The file ").append(path_.string()).append(" got shorter while it was being sent."));
    return std::string_view(once_);
  }
  if (index - ahead_first_ >= ahead_count_) {
    const std::uint32_t count = std::min(kReadAhead, chunks_ - index);
    const std::uint64_t offset = std::uint64_t{index} * kChunkPayload;
    ahead_.resize(static_cast<std::size_t>(std::min<std::uint64_t>(std::uint64_t{count} * kChunkPayload, size_ - offset)));
    ahead_count_ = 0;
    const ssize_t r = pread_all(fd_.get(), ahead_.data(), ahead_.size(), offset);
    if (r < 0) return sys_error(errno, std::string("Cannot read ").append(path_.string()));
    if (static_cast<std::size_t>(r) < n)
      return error(ErrorKind::io, std::string("The file ").append(path_.string()).append(" got shorter while it was being sent."));
    // Only whole chunks count (the last one of the file may be short); a chunk past a short read is read again.
    ahead_first_ = index;
    ahead_count_ = static_cast<std::uint32_t>(static_cast<std::size_t>(r) / kChunkPayload);
    if (static_cast<std::size_t>(r) == ahead_.size()) ahead_count_ = count;
  }
  return std::string_view(ahead_).substr(std::size_t{index - ahead_first_} * kChunkPayload, n);
}

// ---------------------------------------------------------------- Partial

Result<Partial> Partial::open(const fs::path& dir, std::string_view offered_name, const Hash& hash, std::uint64_t size) {
  const auto chunks = files::chunk_count(size);
  if (!chunks) return error(ErrorKind::bad_input, "The offered file is too large to receive.");
  Partial p;
  p.dir_ = dir;
  p.name_ = safe_basename(offered_name);
  p.hash_ = hash;
  p.size_ = size;
  p.chunks_ = *chunks;
  p.part_path_ = dir / part_name(p.name_, hash);
  p.have_path_ = dir / have_name(p.name_, hash);
  auto part = open_regular(p.part_path_, O_RDWR | O_CREAT);
  if (!part) return part.error();
  auto have = open_regular(p.have_path_, O_RDWR | O_CREAT);
  if (!have) return have.error();
  p.part_fd_ = std::move(part.value());
  p.have_fd_ = std::move(have.value());
  // One Partial per download, in this process or another: a second would truncate the first's file.
  if (::flock(p.part_fd_.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) return error(ErrorKind::io, std::string("The file ").append(p.name_).append(" is already being downloaded."));
    return sys_error(errno, std::string("Cannot lock ").append(p.part_path_.string()));
  }
  p.bitmap_.assign((std::size_t{p.chunks_} + 7) / 8, 0);
  init_sodium();
  p.hash_state_.reset(new crypto_generichash_state);
  crypto_generichash_init(p.hash_state_.get(), nullptr, 0, crypto_generichash_BYTES);

  // Resume if the sidecar is exactly one of ours for this content, with the part file behind it.
  const std::size_t want = kSidecarHeader + p.bitmap_.size();
  struct stat hs {}, ps {};
  bool resume = ::fstat(p.have_fd_.get(), &hs) == 0 && ::fstat(p.part_fd_.get(), &ps) == 0 &&
                static_cast<std::uint64_t>(hs.st_size) == want;
  if (resume) {
    std::vector<unsigned char> buf(want);
    unsigned char header[kSidecarHeader];
    std::memcpy(header, kMagic, 8);
    put_u64(header + 8, size);
    std::memcpy(header + 16, hash.data(), hash.size());
    resume = pread_all(p.have_fd_.get(), buf.data(), want, 0) == static_cast<ssize_t>(want) &&
             std::memcmp(buf.data(), header, kSidecarHeader) == 0;
    if (resume) std::copy(buf.begin() + kSidecarHeader, buf.end(), p.bitmap_.begin());
    if (resume && p.chunks_ % 8 != 0) resume = (p.bitmap_.back() >> (p.chunks_ % 8)) == 0;  // no bit past the end
  }
  if (resume) {
    std::uint32_t i = 0;
    while (i < p.chunks_) {
      if (!(p.bitmap_[i / 8] & (1u << (i % 8)))) {
        ++i;
        continue;
      }
      std::uint32_t j = i;
      while (j < p.chunks_ && (p.bitmap_[j / 8] & (1u << (j % 8)))) ++j;
      p.have_.insert(i, j);
      i = j;
    }
    // A part file shorter than its last recorded chunk was changed behind our back.
    if (!p.have_.empty()) {
      const std::uint32_t last = std::prev(p.have_.spans().end())->second - 1;
      const std::uint64_t end = std::uint64_t{last} * kChunkPayload + chunk_size(size, last);
      resume = static_cast<std::uint64_t>(ps.st_size) >= end;
    }
  }
  if (!resume) {
    if (auto st = p.start_afresh(); !st) return st.error();
  }
  return p;
}

Status Partial::start_afresh() {
  have_ = RangeSet();
  std::fill(bitmap_.begin(), bitmap_.end(), 0);
  dirty_ = false;
  batch_.clear();
  batch_count_ = 0;
  crypto_generichash_init(hash_state_.get(), nullptr, 0, crypto_generichash_BYTES);
  hashed_ = 0;
  if (::ftruncate(part_fd_.get(), 0) != 0) return sys_error(errno, std::string("Cannot truncate ").append(part_path_.string()));
  std::vector<unsigned char> buf(kSidecarHeader + bitmap_.size(), 0);
  std::memcpy(buf.data(), kMagic, 8);
  put_u64(buf.data() + 8, size_);
  std::memcpy(buf.data() + 16, hash_.data(), hash_.size());
  if (::ftruncate(have_fd_.get(), 0) != 0 || !pwrite_all(have_fd_.get(), buf.data(), buf.size(), 0))
    return sys_error(errno, std::string("Cannot write ").append(have_path_.string()));
  return success();
}

void Partial::HashStateDelete::operator()(crypto_generichash_blake2b_state* s) const { delete s; }

Partial::~Partial() {
  if (part_fd_.valid()) std::ignore = flush();
}

Status Partial::write(std::uint32_t index, std::string_view bytes) {
  if (!part_fd_.valid()) return error(ErrorKind::bad_input, std::string("The download of ").append(name_).append(" is closed."));
  if (index >= chunks_)
    return error(ErrorKind::bad_input, std::string("Chunk ").append(std::to_string(index)).append(" is past the end of ").append(name_).append("."));
  if (bytes.size() != chunk_size(size_, index))
    return error(ErrorKind::bad_input, std::string("Chunk ").append(std::to_string(index)).append(" of ").append(name_).append(" has the wrong size."));
  if (have_.contains(index)) return success();
  // Contiguous chunks go out together; anything else first writes what is kept.
  if (batch_count_ > 0 && (index != batch_first_ + batch_count_ || batch_count_ >= kWriteBatch)) {
    if (auto st = write_batch(); !st) return st;
  }
  if (batch_count_ == 0) {
    batch_first_ = index;
    batch_.reserve(std::size_t{kWriteBatch} * kChunkPayload);
  }
  batch_.append(bytes);
  ++batch_count_;
  // The bit reaches the sidecar only in flush(), which writes the batch and fdatasyncs first.
  bitmap_[index / 8] |= static_cast<std::uint8_t>(1u << (index % 8));
  have_.insert(index);
  dirty_ = true;
  return advance_hash(index, bytes);
}

Status Partial::write_batch() {
  if (batch_count_ == 0) return success();
  const std::uint64_t offset = std::uint64_t{batch_first_} * kChunkPayload;
  const bool ok = pwrite_all(part_fd_.get(), batch_.data(), batch_.size(), offset);
  batch_.clear();
  batch_count_ = 0;
  if (!ok) return sys_error(errno, std::string("Cannot write ").append(part_path_.string()));
  return success();
}

Status Partial::advance_hash(std::uint32_t index, std::string_view bytes) {
  while (hashed_ < chunks_ && have_.contains(hashed_)) {
    if (hashed_ == index) {
      crypto_generichash_update(hash_state_.get(), reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size());
      ++hashed_;
      continue;
    }
    // Held, but not the chunk in hand: read back from the part file up to the chunk in hand or the end of the run.
    std::uint32_t end = have_.end_of(hashed_);
    if (index > hashed_ && index < end) end = index;
    if (auto st = hash_from_disk(end); !st) return st;
  }
  return success();
}

Status Partial::hash_from_disk(std::uint32_t end) {
  if (end <= hashed_) return success();
  if (auto st = write_batch(); !st) return st;  // what is read back must be on the file
  const std::uint64_t last = std::uint64_t{end} * kChunkPayload;
  std::uint64_t offset = std::uint64_t{hashed_} * kChunkPayload;
  const std::uint64_t stop = std::min(last, size_);
  std::vector<unsigned char> buf(kBlock);
  while (offset < stop) {
    const std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(kBlock, stop - offset));
    const ssize_t r = pread_all(part_fd_.get(), buf.data(), want, offset);
    if (r < 0) return sys_error(errno, std::string("Cannot read ").append(part_path_.string()));
    if (static_cast<std::size_t>(r) != want)
      return error(ErrorKind::io, std::string("The file ").append(part_path_.string()).append(" got shorter while it was being received."));
    crypto_generichash_update(hash_state_.get(), buf.data(), want);
    offset += want;
  }
  hashed_ = end;
  return success();
}

Status Partial::flush() {
  if (!part_fd_.valid() || !dirty_) return success();
  if (auto st = write_batch(); !st) return st;
  if (::fdatasync(part_fd_.get()) != 0) return sys_error(errno, std::string("Cannot flush ").append(part_path_.string()));
  if (!pwrite_all(have_fd_.get(), bitmap_.data(), bitmap_.size(), kSidecarHeader))
    return sys_error(errno, std::string("Cannot write ").append(have_path_.string()));
  dirty_ = false;
  return success();
}

Result<fs::path> Partial::finish() {
  if (!part_fd_.valid()) return error(ErrorKind::bad_input, std::string("The download of ").append(name_).append(" is closed."));
  if (have_.count() != chunks_)
    return error(ErrorKind::incomplete, std::string("The download of ").append(name_).append(" is not complete: ")
                                            .append(std::to_string(have_.count())).append(" of ")
                                            .append(std::to_string(chunks_)).append(" chunks received."));
  if (auto st = flush(); !st) return st.error();
  struct stat st {};
  if (::fstat(part_fd_.get(), &st) != 0) return sys_error(errno, std::string("Cannot read the status of ").append(part_path_.string()));
  if (static_cast<std::uint64_t>(st.st_size) > size_ && ::ftruncate(part_fd_.get(), static_cast<off_t>(size_)) != 0)
    return sys_error(errno, std::string("Cannot truncate ").append(part_path_.string()));

  // Chunks not hashed yet (a download resumed whole, say) are read back; then the hash is complete.
  if (auto hashed = hash_from_disk(chunks_); !hashed) return hashed.error();
  Hash h;
  static_assert(std::tuple_size_v<Hash> == crypto_generichash_BYTES);
  crypto_generichash_state final_state = *hash_state_;  // finish() may be called again after an error
  crypto_generichash_final(&final_state, h.data(), h.size());
  if (h != hash_) {
    discard();
    return error(ErrorKind::hash_mismatch, std::string("The file ").append(name_).append(
        " arrived damaged (its BLAKE2b-256 hash does not match the offer), so the partial download was deleted."));
  }

  for (int tries = 0; tries < kPublishTries; ++tries) {
    const fs::path target = unique_path(dir_, name_);
    if (target.empty()) break;
    auto published = publish(part_path_, target);
    if (published) {
      ::unlink(have_path_.c_str());
      close();
      if (Fd d(::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)); d.valid()) ::fsync(d.get());  // the new name, durable
      return target;
    }
    if (published.error().kind != ErrorKind::exists) return published.error();
  }
  return error(ErrorKind::exists, std::string("No free name for ").append(name_).append(" in ").append(dir_.string()).append("."));
}

void Partial::discard() {
  close();
  ::unlink(part_path_.c_str());
  ::unlink(have_path_.c_str());
}

void Partial::close() {
  part_fd_.close();
  have_fd_.close();
  dirty_ = false;
  batch_.clear();
  batch_count_ = 0;
}

}  // namespace chat::files
