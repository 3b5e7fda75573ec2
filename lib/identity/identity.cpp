// Identities: key pairs from libsodium, the key file (created once, checked on every load), fingerprints.
#include "identity/identity.hpp"

#include <fcntl.h>
#include <sodium.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <system_error>
#include <thread>
#include <utility>

namespace chat::identity {
namespace {

namespace fs = std::filesystem;

/// The first line of a key file; a later format gets a new one.
constexpr std::string_view kFileHeader = "chatapp-identity-v1\n";
/// A key file's exact size: the header, 64 hex digits of the seed and a newline.
constexpr std::size_t kFileSize = kFileHeader.size() + 2 * sizeof(Seed) + 1;
/// Domain of the fingerprint hash, so it never equals another hash of the key.
constexpr std::string_view kFingerprintDomain = "chatapp-fingerprint-v1";
/// Digest bytes behind a fingerprint: 6 groups of 5 bytes, each shown as 5 decimal digits.
constexpr std::size_t kFingerprintBytes = 30;
/// How long a load waits for a key file that another process created a moment ago to be complete.
constexpr auto kRaceWait = std::chrono::seconds(1);
/// The pause between two looks at such a file.
constexpr auto kRacePoll = std::chrono::milliseconds(10);

std::string errno_text(int err) { return std::error_code(err, std::generic_category()).message(); }

std::string mode_text(mode_t mode) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "%04o", static_cast<unsigned>(mode & 07777));
  return buf;
}

/// Closes a descriptor when it goes out of scope.
class Fd {
 public:
  explicit Fd(int fd) noexcept : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const noexcept { return fd_; }
  /// Closes now and reports close's own error (which may be a delayed write error); 0 or an errno.
  int close() noexcept {
    const int rc = ::close(fd_);
    fd_ = -1;
    return rc == 0 ? 0 : errno;
  }

 private:
  int fd_;
};

/// A buffer of secret bytes, wiped when it goes.
template <std::size_t N>
struct SecretBuffer {
  std::array<char, N> bytes{};
  SecretBuffer() = default;
  SecretBuffer(const SecretBuffer&) = delete;
  SecretBuffer& operator=(const SecretBuffer&) = delete;
  ~SecretBuffer() { sodium_memzero(bytes.data(), bytes.size()); }
};

/// The local names ChatApp accepts (SPEC §1): 1-32 of [A-Za-z0-9_.-], not starting with '.'.
bool valid_file_name(std::string_view name) {
  if (name.empty() || name.size() > protocol::kMaxName || name.front() == '.') return false;
  for (const char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
                    c == '.' || c == '-';
    if (!ok) return false;
  }
  return true;
}

std::filesystem::path named_file(std::string_view name, std::string_view dir, std::string_view ext) {
  if (!valid_file_name(name)) {
    throw IdentityError("the name \"" + std::string(name) +
                        "\" cannot name a ChatApp file: use 1 to 32 letters, digits, '_', '.' or '-', "
                        "not starting with '.'");
  }
  return data_home() / "chatapp" / dir / (std::string(name) + std::string(ext));
}

/// Refuses a key file that someone else could read, change or swap: it must be a regular file
/// (not a link) of ours, closed to group and others.
void check_key_file(const fs::path& file, const struct stat& st) {
  const std::string f = file.string();
  if (S_ISLNK(st.st_mode)) {
    throw IdentityError("identity file " + f +
                        " is a symbolic link: ChatApp only reads a regular file; put the key file itself there");
  }
  if (!S_ISREG(st.st_mode)) {
    const std::string what = S_ISDIR(st.st_mode) ? "a directory" : "not a regular file";
    throw IdentityError("identity file " + f + " is " + what +
                        ": move it away, or pass the right key file with --identity");
  }
  if (st.st_uid != ::geteuid()) {
    throw IdentityError("identity file " + f + " belongs to another user (uid " + std::to_string(st.st_uid) +
                        "): use a key file of your own");
  }
  if ((st.st_mode & 077) != 0) {
    const std::string how = (st.st_mode & 044) != 0 ? "readable by others" : "open to others";
    throw IdentityError("identity file " + f + " is " + how + " (mode " + mode_text(st.st_mode) + "): run chmod 600 " +
                        f);
  }
}

[[noreturn]] void bad_content(const fs::path& file, std::string_view why) {
  throw IdentityError("identity file " + file.string() + " is not a ChatApp identity (" + std::string(why) +
                      "): restore it from a backup, or move it away to create a new identity");
}

bool is_hex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }

/// Reads and checks an existing key file; the checks are made again on the opened descriptor,
/// so the file cannot be swapped between the look and the read.
Identity read_key_file(const fs::path& file) {
  const std::string f = file.string();
  struct stat before {};
  if (::lstat(f.c_str(), &before) != 0) {
    throw IdentityError("cannot read identity file " + f + ": " + errno_text(errno));
  }
  check_key_file(file, before);

  Fd fd(::open(f.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY));
  if (fd.get() < 0) throw IdentityError("cannot read identity file " + f + ": " + errno_text(errno));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) throw IdentityError("cannot read identity file " + f + ": " + errno_text(errno));
  check_key_file(file, st);
  if (st.st_dev != before.st_dev || st.st_ino != before.st_ino) {
    throw IdentityError("identity file " + f + " was replaced while ChatApp read it: start ChatApp again");
  }

  // One byte more than a key file holds, to see extra bytes.
  SecretBuffer<kFileSize + 1> buf;
  std::size_t have = 0;
  while (have < buf.bytes.size()) {
    const ssize_t n = ::read(fd.get(), buf.bytes.data() + have, buf.bytes.size() - have);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw IdentityError("cannot read identity file " + f + ": " + errno_text(errno));
    if (n == 0) break;
    have += static_cast<std::size_t>(n);
  }
  const std::string_view text(buf.bytes.data(), have);

  if (!text.starts_with(kFileHeader)) bad_content(file, "the first line is not chatapp-identity-v1");
  const std::string_view hex = text.substr(kFileHeader.size());
  constexpr std::size_t digits = 2 * sizeof(Seed);
  if (hex.size() < digits + 1 || hex[digits] != '\n') bad_content(file, "the second line is not 64 hex digits");
  for (std::size_t i = 0; i < digits; ++i) {
    if (!is_hex(hex[i])) bad_content(file, "the second line is not 64 hex digits");
  }
  if (text.size() != kFileSize) bad_content(file, "extra bytes after the key");

  Seed seed{};
  std::size_t len = 0;
  if (sodium_hex2bin(seed.data(), seed.size(), hex.data(), digits, nullptr, &len, nullptr) != 0 ||
      len != seed.size()) {
    sodium_memzero(seed.data(), seed.size());
    bad_content(file, "the second line is not 64 hex digits");
  }
  Identity id = Identity::from_seed(seed);
  sodium_memzero(seed.data(), seed.size());
  return id;
}

/// Another process created the file a moment before us: wait (briefly) until it has written it.
Identity read_fresh_key_file(const fs::path& file) {
  const auto deadline = std::chrono::steady_clock::now() + kRaceWait;
  struct stat st {};
  while (::lstat(file.c_str(), &st) == 0 && S_ISREG(st.st_mode) &&
         static_cast<std::size_t>(st.st_size) < kFileSize && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(kRacePoll);
  }
  return read_key_file(file);
}

/// A new key file could not be written: it is ours (O_EXCL) and incomplete, so it goes, and the
/// next start does not find a broken key.
[[noreturn]] void write_failed(const std::string& f, int err) {
  ::unlink(f.c_str());
  throw IdentityError("cannot write identity file " + f + ": " + errno_text(err) +
                      ": free some space or fix the directory, then start ChatApp again");
}

/// Makes a new file's directory entry durable; best effort, as some file systems cannot sync a directory.
void sync_dir(const fs::path& dir) {
  Fd fd(::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.get() >= 0) ::fsync(fd.get());
}

}  // namespace

void init() {
  // sodium_init is thread-safe and idempotent itself; the static only saves its lock on every call.
  static const bool ok = ::sodium_init() >= 0;
  if (!ok) throw IdentityError("the cryptography library (libsodium) could not be initialized: ChatApp cannot run");
}

Identity Identity::generate() {
  init();
  Seed seed{};
  randombytes_buf(seed.data(), seed.size());
  Identity id = from_seed(seed);
  sodium_memzero(seed.data(), seed.size());
  return id;
}

Identity Identity::from_seed(const Seed& seed) {
  init();
  Identity id;
  id.seed_ = seed;
  if (crypto_sign_seed_keypair(id.public_key_.data(), id.secret_key_.data(), seed.data()) != 0 ||
      crypto_sign_ed25519_pk_to_curve25519(id.box_public_.data(), id.public_key_.data()) != 0 ||
      crypto_sign_ed25519_sk_to_curve25519(id.box_secret_.data(), id.secret_key_.data()) != 0) {
    throw IdentityError("could not derive the keys of an identity: ChatApp cannot run");
  }
  return id;
}

Identity::Identity(Identity&& other) noexcept
    : seed_(other.seed_),
      public_key_(other.public_key_),
      secret_key_(other.secret_key_),
      box_public_(other.box_public_),
      box_secret_(other.box_secret_) {
  other.wipe();
}

Identity& Identity::operator=(Identity&& other) noexcept {
  if (this != &other) {
    seed_ = other.seed_;
    public_key_ = other.public_key_;
    secret_key_ = other.secret_key_;
    box_public_ = other.box_public_;
    box_secret_ = other.box_secret_;
    other.wipe();
  }
  return *this;
}

Identity::~Identity() { wipe(); }

void Identity::wipe() noexcept {
  sodium_memzero(seed_.data(), seed_.size());
  sodium_memzero(public_key_.data(), public_key_.size());
  sodium_memzero(secret_key_.data(), secret_key_.size());
  sodium_memzero(box_public_.data(), box_public_.size());
  sodium_memzero(box_secret_.data(), box_secret_.size());
}

protocol::Signature Identity::sign(std::string_view msg) const {
  protocol::Signature sig{};
  crypto_sign_detached(sig.data(), nullptr, reinterpret_cast<const unsigned char*>(msg.data()), msg.size(),
                       secret_key_.data());
  return sig;
}

bool usable(const protocol::Key& key) noexcept {
  try {
    init();
  } catch (...) {
    return false;
  }
  BoxKey box{};
  bool ok = crypto_sign_ed25519_pk_to_curve25519(box.data(), key.data()) == 0;
  sodium_memzero(box.data(), box.size());
  return ok;
}

bool verify(const protocol::Key& key, std::string_view msg, const protocol::Signature& sig) noexcept {
  try {
    init();
  } catch (...) {
    return false;
  }
  // libsodium refuses a key that is not a valid point, and a non-canonical signature, with -1.
  return crypto_sign_verify_detached(sig.data(), reinterpret_cast<const unsigned char*>(msg.data()), msg.size(),
                                     key.data()) == 0;
}

std::string fingerprint(const protocol::Key& key) {
  init();
  std::array<unsigned char, kFingerprintBytes> digest{};
  crypto_generichash_state state;
  crypto_generichash_init(&state, nullptr, 0, digest.size());
  crypto_generichash_update(&state, reinterpret_cast<const unsigned char*>(kFingerprintDomain.data()),
                            kFingerprintDomain.size());
  crypto_generichash_update(&state, key.data(), key.size());
  crypto_generichash_final(&state, digest.data(), digest.size());

  std::string out;
  for (std::size_t group = 0; group < 6; ++group) {
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < 5; ++i) v = (v << 8) | digest[group * 5 + i];
    char buf[8];
    std::snprintf(buf, sizeof buf, "%05u", static_cast<unsigned>(v % 100000));
    if (group != 0) out += ' ';
    out += buf;
  }
  return out;
}

std::filesystem::path data_home() {
  const char* xdg = std::getenv("XDG_DATA_HOME");
  // The XDG base directory spec: a relative value is invalid and ignored.
  if (xdg != nullptr && *xdg != '\0' && fs::path(xdg).is_absolute()) return fs::path(xdg);
  const char* home = std::getenv("HOME");
  if (home != nullptr && *home != '\0' && fs::path(home).is_absolute()) return fs::path(home) / ".local" / "share";
  throw IdentityError(
      "cannot tell where to keep ChatApp's files: neither XDG_DATA_HOME nor HOME is set to an absolute path; "
      "set one, or pass the key file with --identity");
}

std::filesystem::path default_identity_path(std::string_view name) { return named_file(name, "identities", ".key"); }

std::filesystem::path default_state_path(std::string_view name) { return named_file(name, "peers", ".db"); }

void make_private_dirs(const std::filesystem::path& dir) {
  fs::path p;
  bool guarded = false;  // at or below a "chatapp" component: ours alone
  for (const auto& part : dir) {
    if (part.empty()) continue;  // a trailing separator
    p /= part;
    if (part == "chatapp") guarded = true;
    const std::string d = p.string();
    struct stat st {};
    if (::lstat(d.c_str(), &st) != 0) {
      if (errno != ENOENT) throw IdentityError("cannot look at directory " + d + ": " + errno_text(errno));
      if (::mkdir(d.c_str(), 0700) == 0) continue;
      // Another process may have created it since the look: then check theirs.
      if (errno != EEXIST || ::lstat(d.c_str(), &st) != 0) {
        throw IdentityError("cannot create directory " + d + ": " + errno_text(errno) +
                            ": check the permissions of its parent");
      }
    }
    if (!guarded) {
      // Above our own directories a link to a directory is fine (a moved home, /tmp on macOS).
      struct stat target {};
      if (::stat(d.c_str(), &target) != 0 || !S_ISDIR(target.st_mode)) {
        throw IdentityError(d + " is not a directory: ChatApp needs a directory there; move the file away");
      }
      continue;
    }
    if (S_ISLNK(st.st_mode)) {
      throw IdentityError("directory " + d +
                          " is a symbolic link: ChatApp keeps its files in a real directory of yours; "
                          "replace the link by the directory");
    }
    if (!S_ISDIR(st.st_mode)) {
      throw IdentityError(d + " is not a directory: ChatApp needs a directory there; move the file away");
    }
    if (st.st_uid != ::geteuid()) {
      throw IdentityError("directory " + d + " belongs to another user (uid " + std::to_string(st.st_uid) +
                          "): ChatApp keeps its files in directories of your own");
    }
    if ((st.st_mode & 077) != 0) {
      throw IdentityError("directory " + d + " is open to others (mode " + mode_text(st.st_mode) +
                          "): run chmod 700 " + d);
    }
  }
}

Identity load_or_create(const std::filesystem::path& file, bool* created) {
  init();
  if (created != nullptr) *created = false;
  const std::string f = file.string();
  struct stat st {};
  if (::lstat(f.c_str(), &st) == 0) return read_key_file(file);
  if (errno != ENOENT) throw IdentityError("cannot read identity file " + f + ": " + errno_text(errno));

  const fs::path dir = file.parent_path();
  if (!dir.empty()) make_private_dirs(dir);

  Identity id = Identity::generate();
  SecretBuffer<kFileSize + 1> content;  // + 1: sodium_bin2hex writes a NUL after the digits
  std::memcpy(content.bytes.data(), kFileHeader.data(), kFileHeader.size());
  sodium_bin2hex(content.bytes.data() + kFileHeader.size(), 2 * sizeof(Seed) + 1, id.seed().data(), id.seed().size());
  content.bytes[kFileSize - 1] = '\n';

  // O_EXCL: never replace a file, even one that appeared since the lstat above.
  Fd fd(::open(f.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY, 0600));
  if (fd.get() < 0) {
    if (errno == EEXIST) return read_fresh_key_file(file);
    throw IdentityError("cannot create identity file " + f + ": " + errno_text(errno) +
                        ": check the permissions of " + (dir.empty() ? std::string(".") : dir.string()));
  }
  std::size_t done = 0;
  while (done < kFileSize) {
    const ssize_t n = ::write(fd.get(), content.bytes.data() + done, kFileSize - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) write_failed(f, n < 0 ? errno : EIO);
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd.get()) != 0) write_failed(f, errno);
  if (const int err = fd.close(); err != 0) write_failed(f, err);
  sync_dir(dir);
  if (created != nullptr) *created = true;
  return id;
}

}  // namespace chat::identity
