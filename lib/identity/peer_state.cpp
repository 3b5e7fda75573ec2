// The SQLite implementation of the client's peer state: schema, version check, prepared statements.
#include "identity/peer_state.hpp"

#include <fcntl.h>
#include <sqlite3.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string_view>
#include <system_error>
#include <utility>

#include "identity/identity.hpp"
#include "sqlite/sqlite.hpp"

namespace chat::identity {
namespace {

namespace fs = std::filesystem;

/// The schema this code writes; kept in `PRAGMA user_version`.
constexpr int schema_version = 1;

/// How long a statement waits for another connection's lock (a second client on the same name).
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

sqlite::Database open_db(const fs::path& file) {
  const std::string path = file.string();
  const bool in_memory = path == memory_path;
  if (!in_memory) {
    if (!file.parent_path().empty()) make_private_dirs(file.parent_path());
    create_private_file(file);
  }

  sqlite::Database db("peer state", path, busy_timeout_ms);

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

  // Another client on the same name may be creating the schema at the same moment: decide under the write lock.
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

}  // namespace

struct PeerState::Impl {
  explicit Impl(const fs::path& file)
      : db(open_db(file)),
        select_pin(db, "SELECT pinned, pending, verified FROM pins WHERE name = ?1"),
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
        select_block(db, "SELECT 1 FROM blocks WHERE blocked = ?1"),
        select_block_names(db, "SELECT DISTINCT name FROM blocks ORDER BY name"),
        insert_seen(db,
                    "INSERT INTO seen (sender, kind, mid, sent_ms) VALUES (?1, ?2, ?3, ?4) "
                    "ON CONFLICT DO NOTHING"),
        prune_seen(db, "DELETE FROM seen WHERE sent_ms < ?1") {}

  /// Drops replay records older than the window at now_ms: such a message is refused by its time anyway.
  void prune(std::uint64_t now_ms) {
    if (now_ms <= kMaxMessageAgeMs) return;
    const std::uint64_t cutoff = now_ms - kMaxMessageAgeMs;
    if (cutoff > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) return;
    Use(prune_seen).integer(1, static_cast<std::int64_t>(cutoff)).run("prune seen messages");
  }

  // Declared first so it is destroyed last, after every statement has been finalized.
  sqlite::Database db;
  Statement select_pin;
  Statement insert_pin;
  Statement set_pending;
  Statement trust_pending;
  Statement mark_verified;
  Statement insert_block;
  Statement delete_blocks;
  Statement select_block;
  Statement select_block_names;
  Statement insert_seen;
  Statement prune_seen;
};

PeerState::PeerState(const std::filesystem::path& file, std::uint64_t now_ms) : impl_(std::make_unique<Impl>(file)) {
  impl_->prune(now_ms);
}

PeerState::PeerState(const std::filesystem::path& file) : PeerState(file, wall_clock_ms()) {}

PeerState::PeerState(PeerState&&) noexcept = default;
PeerState& PeerState::operator=(PeerState&&) noexcept = default;
PeerState::~PeerState() = default;

PeerState::Seen PeerState::observe(const std::string& name, const protocol::Key& key) {
  std::optional<protocol::Key> pin;
  {
    Use u(impl_->select_pin);
    u.text(1, name);
    if (u.step("read pin")) pin = column_key(u, 0);
  }
  if (!pin) {
    Use(impl_->insert_pin).text(1, name).blob(2, key, "bind key").run("pin key");
    return Seen::first;
  }
  if (*pin == key) return Seen::same;
  Use(impl_->set_pending).text(1, name).blob(2, key, "bind key").run("record changed key");
  return Seen::changed;
}

std::optional<protocol::Key> PeerState::pinned(const std::string& name) const {
  Use u(impl_->select_pin);
  u.text(1, name);
  if (!u.step("read pin")) return std::nullopt;
  return column_key(u, 0);
}

std::optional<protocol::Key> PeerState::pending(const std::string& name) const {
  Use u(impl_->select_pin);
  u.text(1, name);
  if (!u.step("read pin") || u.column_null(1)) return std::nullopt;
  return column_key(u, 1);
}

bool PeerState::changed(const std::string& name) const { return pending(name).has_value(); }

bool PeerState::trust(const std::string& name) {
  return Use(impl_->trust_pending).text(1, name).run("trust new key") == 1;
}

bool PeerState::verify(const std::string& name) {
  return Use(impl_->mark_verified).text(1, name).run("mark verified") == 1;
}

bool PeerState::verified(const std::string& name) const {
  Use u(impl_->select_pin);
  u.text(1, name);
  return u.step("read pin") && u.column_int(2) != 0;
}

void PeerState::block(const std::string& name, const protocol::Key& key) {
  Use(impl_->insert_block).blob(1, key, "bind key").text(2, name).run("block");
}

bool PeerState::unblock(const std::string& name) {
  return Use(impl_->delete_blocks).text(1, name).run("unblock") > 0;
}

bool PeerState::blocked(const protocol::Key& key) const {
  Use u(impl_->select_block);
  u.blob(1, key, "bind key");
  return u.step("read block");
}

std::vector<std::string> PeerState::blocked_names() const {
  std::vector<std::string> out;
  Use u(impl_->select_block_names);
  while (u.step("list blocks")) out.push_back(u.column_text(0));
  return out;
}

bool PeerState::first_seen(const protocol::Key& sender, std::uint8_t kind, std::uint64_t mid, std::uint64_t sent_ms,
                           std::uint64_t now_ms) {
  // Written as differences so neither bound overflows near 0 or the top of the range.
  if (sent_ms > now_ms && sent_ms - now_ms > kMaxClockAheadMs) return false;
  if (now_ms > sent_ms && now_ms - sent_ms > kMaxMessageAgeMs) return false;
  // In autocommit mode the insert is committed when run() returns.
  return Use(impl_->insert_seen)
             .blob(1, sender, "bind key")
             .integer(2, kind)
             .integer(3, as_sql(mid))
             .integer(4, as_sql(sent_ms))
             .run("record seen message") == 1;
}

}  // namespace chat::identity
