// The SQLite implementation of the client's peer state: schema, version check, prepared statements,
// the lock that keeps the file to one process, and the in-memory copy of pins and blocks.
#include "identity/peer_state.hpp"

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <limits>
#include <map>
#include <set>
#include <stdexcept>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <utility>

#include "identity/identity.hpp"
#include "sqlite/sqlite.hpp"

namespace chat::identity {
namespace {

namespace fs = std::filesystem;

/// The schema this code writes; kept in `PRAGMA user_version`.
constexpr int schema_version = 1;

/// How long opening the file waits for another connection's lock: not a second ChatApp (the lock
/// file refuses that at once) but a tool such as the sqlite3 shell reading the file.
constexpr int busy_timeout_ms = 5000;

/// The path that keeps the state in memory only (simulations, tests).
constexpr std::string_view memory_path = ":memory:";

constexpr std::string_view schema_sql = R"sql(
-- The key first seen for each name, and a different one seen since, waiting for `trust`.
CREATE TABLE pins (
  name     TEXT    PRIMARY KEY NOT NULL,
  pinned   BLOB    NOT NULL CHECK (length(pinned) = 32),
  pending  BLOB    CHECK (pending IS NULL OR length(pending) = 32),
  verified INTEGER NOT NULL DEFAULT 0 CHECK (verified IN (0, 1))
);
-- Blocks are by key: the same identity under a new name stays blocked.
CREATE TABLE blocks (
  blocked BLOB PRIMARY KEY NOT NULL CHECK (length(blocked) = 32),
  name    TEXT NOT NULL
);
CREATE INDEX blocks_by_name ON blocks (name);
-- Every message shown, so a replayed datagram is never shown twice; pruned by sent_ms.
CREATE TABLE seen (
  sender  BLOB    NOT NULL,
  kind    INTEGER NOT NULL,
  mid     INTEGER NOT NULL,
  sent_ms INTEGER NOT NULL,
  PRIMARY KEY (sender, kind, mid)
) WITHOUT ROWID;
CREATE INDEX seen_by_time ON seen (sent_ms);
)sql";

using sqlite::Statement;
using sqlite::Use;

/// A 32-byte key read from column `col` of the current row.
protocol::Key column_key(const Use& u, int col) {
  const auto bytes = u.column_blob_view(col);
  protocol::Key k{};
  if (bytes.size() != k.size()) {
    throw std::runtime_error("peer state: a key in the database is not 32 bytes long; the file is damaged");
  }
  std::memcpy(k.data(), bytes.data(), k.size());
  return k;
}

/// Accepts our version and an empty file; a version-0 file that holds tables is someone else's,
/// and a newer version is a newer build's.
void check_version(const sqlite::Database& db, std::int64_t found, const std::string& path) {
  if (found == schema_version) return;
  if (found == 0 && db.query_int("SELECT count(*) FROM sqlite_master") != 0) {
    throw std::runtime_error("peer state: " + path +
                             " holds tables but no schema version: it is not a ChatApp peer state; move it away");
  }
  if (found != 0) {
    throw std::runtime_error("peer state: " + path + " has schema version " + std::to_string(found) +
                             ", this build expects " + std::to_string(schema_version) +
                             "; refusing to open it (it may be a newer ChatApp's)");
  }
}

/// Creates a new state file with mode 0600 before SQLite opens it (SQLite would use 0644); its
/// -wal and -shm files take the same mode. An existing file is left as it is.
void create_private_file(const fs::path& file) {
  const int fd = ::open(file.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOCTTY, 0600);
  if (fd >= 0) {
    ::close(fd);
    return;
  }
  if (errno != EEXIST) {
    throw std::runtime_error("peer state: cannot create " + file.string() + ": " +
                             std::error_code(errno, std::generic_category()).message());
  }
}

/// An flock(2) on `<state file>.lock`, held for the life of a PeerState: one process at a time uses
/// a state file, so the copy of pins and blocks a PeerState keeps in memory cannot go stale, and a
/// second ChatApp on the same name (and the same XDG_DATA_HOME) stops at once with a clear error.
/// A file of its own, not the database: closing a descriptor of the database would drop SQLite's
/// POSIX locks on it. The lock goes with the process, also when it crashes; the file stays (empty).
class LockFile {
 public:
  explicit LockFile(const fs::path& state) {
    const fs::path file = state.string() + ".lock";
    fd_ = ::open(file.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW, 0600);
    if (fd_ < 0) {
      throw std::runtime_error("peer state: cannot open the lock file " + file.string() + ": " +
                               std::error_code(errno, std::generic_category()).message());
    }
    int rc = 0;
    do rc = ::flock(fd_, LOCK_EX | LOCK_NB);
    while (rc != 0 && errno == EINTR);
    if (rc != 0) {
      const int err = errno;
      ::close(fd_);
      if (err == EWOULDBLOCK) {
        throw std::runtime_error("peer state: " + state.string() +
                                 " is in use by another ChatApp process (this name is running already); quit it first");
      }
      throw std::runtime_error("peer state: cannot lock " + file.string() + ": " +
                               std::error_code(err, std::generic_category()).message());
    }
  }
  LockFile(const LockFile&) = delete;
  LockFile& operator=(const LockFile&) = delete;
  ~LockFile() { ::close(fd_); }

 private:
  int fd_ = -1;
};

bool is_memory(const fs::path& file) { return file.native() == memory_path; }

/// Makes the file's directories and takes its lock; none for the in-memory state.
std::unique_ptr<LockFile> lock_state(const fs::path& file) {
  if (is_memory(file)) return nullptr;
  if (!file.parent_path().empty()) make_private_dirs(file.parent_path());
  return std::make_unique<LockFile>(file);
}

/// Opens the state under its lock (taken by lock_state).
sqlite::Database open_db(const fs::path& file) {
  const std::string path = file.string();
  const bool in_memory = is_memory(file);
  if (!in_memory) create_private_file(file);

  sqlite::Database db("peer state", path, busy_timeout_ms);
  // The lock file already keeps other ChatApps away; holding SQLite's lock from the first read to
  // the close as well spares a lock and an unlock (fcntl) around every statement, and keeps WAL's
  // index in this process's memory instead of a -shm file. Set before anything reads the file.
  if (!in_memory) db.exec("PRAGMA locking_mode=EXCLUSIVE", "take the file for this process");

  // Read the version before anything that could write the file: a file this build cannot read
  // (a newer build's, or not ours at all) is left exactly as found.
  std::int64_t found = 0;
  {
    sqlite3_stmt* probe = nullptr;
    const int prc = sqlite3_prepare_v2(db.get(), "PRAGMA user_version", -1, &probe, nullptr);
    std::unique_ptr<sqlite3_stmt, sqlite::StmtFinalizer> guard(probe);
    const int src = prc == SQLITE_OK ? sqlite3_step(probe) : prc;
    if (src != SQLITE_ROW) {
      if ((src & 0xff) == SQLITE_NOTADB) {
        throw std::runtime_error("peer state: " + path +
                                 " is not a ChatApp peer state (not an SQLite database): move it away");
      }
      db.fail("read the schema version of " + path);
    }
    found = sqlite3_column_int64(probe, 0);
  }
  check_version(db, found, path);

  if (!in_memory && db.query_text("PRAGMA journal_mode=WAL") != "wal") {
    throw std::runtime_error("peer state: " + path + ": cannot switch to WAL mode");
  }
  // NORMAL in WAL: a commit survives a crash of ChatApp; only a power loss may undo the last ones,
  // which at worst shows a message again or asks for trust again.
  db.exec("PRAGMA synchronous=NORMAL", "set synchronous");

  // The schema is made, with its version, in one transaction: a crash leaves none or all of it.
  db.schema_transaction([&] {
    const auto now_found = db.query_int("PRAGMA user_version");
    check_version(db, now_found, path);
    if (now_found == 0) {
      db.exec(schema_sql, "create schema");
      db.exec("PRAGMA user_version=" + std::to_string(schema_version), "set schema version");
    }
  });
  return db;
}

std::uint64_t wall_clock_ms() {
  const auto now = std::chrono::system_clock::now().time_since_epoch();
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(now).count());
}

/// A u64 (mid, time) as SQLite's signed integer, bit for bit.
std::int64_t as_sql(std::uint64_t v) { return std::bit_cast<std::int64_t>(v); }


/// What the state file says about one name, kept in memory.
struct Pin {
  protocol::Key pinned{};
  std::optional<protocol::Key> pending;
  bool verified = false;
};

}  // namespace

/// The file is read once, at open, into `pins` and `blocks`; every later question about them is
/// answered from memory, and every change is written to the file first and then to memory (so a
/// write that fails leaves both as they were). This is sound because this process is the only
/// writer: `lock` keeps other processes off the file, and nothing but this class touches it.
/// The replay memory (`seen`) is not copied: first_seen asks the file.
struct PeerState::Impl {
  explicit Impl(const fs::path& file)
      : lock(lock_state(file)),
        db(open_db(file)),
        insert_pin(db, "INSERT INTO pins (name, pinned) VALUES (?1, ?2)"),
        set_pending(db, "UPDATE pins SET pending = ?2 WHERE name = ?1"),
        trust_pending(db,
                      "UPDATE pins SET pinned = pending, pending = NULL, verified = 0 "
                      "WHERE name = ?1 AND pending IS NOT NULL"),
        mark_verified(db, "UPDATE pins SET verified = 1 WHERE name = ?1"),
        insert_block(db,
                     "INSERT INTO blocks (blocked, name) VALUES (?1, ?2) "
                     "ON CONFLICT (blocked) DO UPDATE SET name = excluded.name"),
        delete_blocks(db, "DELETE FROM blocks WHERE name = ?1"),
        insert_seen(db,
                    "INSERT INTO seen (sender, kind, mid, sent_ms) VALUES (?1, ?2, ?3, ?4) "
                    "ON CONFLICT DO NOTHING"),
        prune_seen(db, "DELETE FROM seen WHERE sent_ms < ?1") {
    load();
  }

  /// Reads every pin and block into memory.
  void load() {
    Statement all_pins(db, "SELECT name, pinned, pending, verified FROM pins");
    Use p(all_pins);
    while (p.step("read pins")) {
      Pin pin{column_key(p, 1), std::nullopt, p.column_int(3) != 0};
      if (!p.column_null(2)) pin.pending = column_key(p, 2);
      pins.emplace(p.column_text(0), pin);
    }
    Statement all_blocks(db, "SELECT blocked, name FROM blocks");
    Use b(all_blocks);
    while (b.step("read blocks")) blocks.emplace(column_key(b, 0), b.column_text(1));
  }

  /// The row in the file of a name's pin that memory says is there; a statement that changes it
  /// must change one row.
  void changed_one(std::int64_t rows, std::string_view what) const {
    if (rows != 1) db.error(std::string(what) + ": the file does not hold the pin read from it; is another program writing it?");
  }

  /// Drops replay records older than the window at now_ms: such a message is refused by its time anyway.
  void prune(std::uint64_t now_ms) {
    if (now_ms <= kMaxMessageAgeMs) return;
    const std::uint64_t cutoff = now_ms - kMaxMessageAgeMs;
    if (cutoff > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) return;
    Use(prune_seen).integer(1, static_cast<std::int64_t>(cutoff)).run("prune seen messages");
  }

  // Declared first so it is released last, after the database is closed.
  std::unique_ptr<LockFile> lock;
  // Declared before the statements so it is destroyed after every one has been finalized.
  sqlite::Database db;
  Statement insert_pin;
  Statement set_pending;
  Statement trust_pending;
  Statement mark_verified;
  Statement insert_block;
  Statement delete_blocks;
  Statement insert_seen;
  Statement prune_seen;

  /// Every row of `pins`, by name.
  std::unordered_map<std::string, Pin> pins;
  /// Every row of `blocks`: the blocked key and the name it was blocked under.
  std::map<protocol::Key, std::string> blocks;
};

PeerState::PeerState(const std::filesystem::path& file, std::uint64_t now_ms) : impl_(std::make_unique<Impl>(file)) {
  impl_->prune(now_ms);
}

PeerState::PeerState(const std::filesystem::path& file) : PeerState(file, wall_clock_ms()) {}

PeerState::PeerState(PeerState&&) noexcept = default;
PeerState& PeerState::operator=(PeerState&&) noexcept = default;
PeerState::~PeerState() = default;

PeerState::Seen PeerState::observe(const std::string& name, const protocol::Key& key) {
  auto it = impl_->pins.find(name);
  if (it == impl_->pins.end()) {
    // The entry is made first, so that nothing can fail between the write and memory.
    it = impl_->pins.emplace(name, Pin{key, std::nullopt, false}).first;
    try {
      Use(impl_->insert_pin).text(1, name).blob(2, key, "bind key").run("pin key");
    } catch (...) {
      impl_->pins.erase(it);
      throw;
    }
    return Seen::first;
  }
  Pin& pin = it->second;
  if (pin.pinned == key) return Seen::same;
  if (pin.pending != key) {
    impl_->changed_one(Use(impl_->set_pending).text(1, name).blob(2, key, "bind key").run("record changed key"),
                       "record changed key");
    pin.pending = key;
  }
  return Seen::changed;
}

std::optional<protocol::Key> PeerState::pinned(const std::string& name) const {
  const auto it = impl_->pins.find(name);
  if (it == impl_->pins.end()) return std::nullopt;
  return it->second.pinned;
}

std::optional<protocol::Key> PeerState::pending(const std::string& name) const {
  const auto it = impl_->pins.find(name);
  if (it == impl_->pins.end()) return std::nullopt;
  return it->second.pending;
}

bool PeerState::changed(const std::string& name) const { return pending(name).has_value(); }

bool PeerState::trust(const std::string& name) {
  const auto it = impl_->pins.find(name);
  if (it == impl_->pins.end() || !it->second.pending) return false;
  impl_->changed_one(Use(impl_->trust_pending).text(1, name).run("trust new key"), "trust new key");
  it->second = Pin{*it->second.pending, std::nullopt, false};
  return true;
}

bool PeerState::verify(const std::string& name) {
  const auto it = impl_->pins.find(name);
  if (it == impl_->pins.end()) return false;
  if (it->second.verified) return true;
  impl_->changed_one(Use(impl_->mark_verified).text(1, name).run("mark verified"), "mark verified");
  it->second.verified = true;
  return true;
}

bool PeerState::verified(const std::string& name) const {
  const auto it = impl_->pins.find(name);
  return it != impl_->pins.end() && it->second.verified;
}

void PeerState::block(const std::string& name, const protocol::Key& key) {
  // The new name is copied, and the entry made, before the write: nothing can fail after it.
  std::string under = name;
  const auto [it, made] = impl_->blocks.try_emplace(key);
  try {
    Use(impl_->insert_block).blob(1, key, "bind key").text(2, name).run("block");
  } catch (...) {
    if (made) impl_->blocks.erase(it);
    throw;
  }
  it->second.swap(under);
}

bool PeerState::unblock(const std::string& name) {
  auto& blocks = impl_->blocks;
  const auto under = [&](const auto& b) { return b.second == name; };
  if (std::none_of(blocks.begin(), blocks.end(), under)) return false;
  Use(impl_->delete_blocks).text(1, name).run("unblock");
  std::erase_if(blocks, under);
  return true;
}

bool PeerState::blocked(const protocol::Key& key) const { return impl_->blocks.contains(key); }

std::vector<std::string> PeerState::blocked_names() const {
  std::set<std::string> names;
  for (const auto& [key, name] : impl_->blocks) names.insert(name);
  return {names.begin(), names.end()};
}

bool PeerState::first_seen(const protocol::Key& sender, std::uint8_t kind, std::uint64_t mid, std::uint64_t sent_ms,
                           std::uint64_t now_ms) {
  // Written as differences so neither bound overflows near 0 or the top of the range.
  if (sent_ms > now_ms && sent_ms - now_ms > kMaxClockAheadMs) return false;
  if (now_ms > sent_ms && now_ms - sent_ms > kMaxMessageAgeMs) return false;
  // In autocommit mode the insert is committed when run() returns, and the client shows the
  // message, and sends its receipt, only after that (Client::on_direct, on_relay, show_stored).
  // A crash at any point can therefore lose the showing of this one message, never show it twice.
  // That is why every message has a commit of its own: several batched into one transaction
  // committed at the end of the turn would be shown before their records are in the file, and a
  // crash in between would show them again after a restart (their receipts were not sent, so the
  // senders retry). The commit is made cheap instead: WAL with synchronous=NORMAL (no fsync), the
  // file locked once for the process (no fcntl per statement), the statement prepared once.
  return Use(impl_->insert_seen)
             .blob(1, sender, "bind key")
             .integer(2, kind)
             .integer(3, as_sql(mid))
             .integer(4, as_sql(sent_ms))
             .run("record seen message") == 1;
}

}  // namespace chat::identity
