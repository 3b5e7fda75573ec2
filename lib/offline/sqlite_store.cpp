// The SQLite implementation of the offline store: schema, version check, prepared statements.
#include "offline/store.hpp"

#include <sqlite3.h>

#include <algorithm>
#include <array>
#include <bit>
#include <filesystem>
#include <limits>
#include <string_view>
#include <system_error>
#include <utility>

namespace chat::offline {
namespace {

/// The schema this code writes; kept in `PRAGMA user_version`. Older ones are migrated on open.
constexpr int schema_version = 3;

/// How long a statement waits for another connection's lock before failing with SQLITE_BUSY.
constexpr int busy_timeout_ms = 5000;

/// Schema version 2, which a new store starts from; the migrations then take it to schema_version,
/// so a new store and a migrated one have exactly the same schema.
constexpr std::string_view schema_2_sql = R"sql(
CREATE TABLE messages (
  seq       INTEGER PRIMARY KEY AUTOINCREMENT,
  recipient TEXT    NOT NULL,
  sender    TEXT    NOT NULL,
  kind      INTEGER NOT NULL CHECK (kind IN (0, 1)),
  ts_us     INTEGER NOT NULL,
  mid       INTEGER NOT NULL,
  text      TEXT    NOT NULL
);
-- Delivery reads one recipient's messages in arrival-time order; seq breaks ties and keeps the
-- order total, since two messages may carry the same ts_us.
CREATE INDEX messages_by_arrival ON messages (recipient, ts_us, seq);
-- A sender that retries a save whose ACK was lost (a crash between commit and ACK) must not
-- store the message twice: (recipient, sender, mid) names one message.
CREATE UNIQUE INDEX messages_once ON messages (recipient, sender, mid);
CREATE TABLE clients (
  name   TEXT    PRIMARY KEY NOT NULL,
  ip     TEXT    NOT NULL,
  port   INTEGER NOT NULL,
  online INTEGER NOT NULL
);
)sql";

/// Version 1 read in seq order through (recipient, seq). Nothing else needs that index: count_for
/// uses the new one's prefix, and a delete by (recipient, seq) finds the row by its rowid.
constexpr std::string_view migrate_1_to_2 = R"sql(
DROP INDEX IF EXISTS messages_by_recipient;
CREATE INDEX messages_by_arrival ON messages (recipient, ts_us, seq);
)sql";

/// Version 3 binds names to identities and stores sealed bodies. The messages of version 2 are
/// plain text from senders nobody authenticated: they move to legacy_messages, kept for the
/// operator and never delivered (what cannot be authenticated is not shown).
constexpr std::string_view migrate_2_to_3 = R"sql(
DROP INDEX messages_by_arrival;
DROP INDEX messages_once;
ALTER TABLE messages RENAME TO legacy_messages;
CREATE TABLE messages (
  seq        INTEGER PRIMARY KEY AUTOINCREMENT,
  recipient  TEXT    NOT NULL,
  sender     TEXT    NOT NULL,
  sender_key BLOB    NOT NULL,
  kind       INTEGER NOT NULL CHECK (kind IN (0, 1)),
  ts_us      INTEGER NOT NULL,
  mid        INTEGER NOT NULL,
  body       BLOB    NOT NULL
);
CREATE INDEX messages_by_arrival ON messages (recipient, ts_us, seq);
CREATE UNIQUE INDEX messages_once ON messages (recipient, sender, mid);
ALTER TABLE clients ADD COLUMN key BLOB;
)sql";

/// migrations[v - 1] takes a store from version v to v + 1.
constexpr std::array<std::string_view, schema_version - 1> migrations{migrate_1_to_2, migrate_2_to_3};

struct DbCloser {
  void operator()(sqlite3* db) const noexcept {
    // Every statement is finalized before the handle goes, so close cannot be BUSY.
    sqlite3_close(db);
  }
};
using DbHandle = std::unique_ptr<sqlite3, DbCloser>;

struct StmtFinalizer {
  void operator()(sqlite3_stmt* stmt) const noexcept { sqlite3_finalize(stmt); }
};

[[noreturn]] void fail(sqlite3* db, std::string_view what) {
  throw StoreError("offline store: " + std::string(what) + ": " + sqlite3_errmsg(db));
}

/// A statement prepared once and reused for the life of the store.
class Statement {
 public:
  Statement(sqlite3* db, std::string_view sql) : db_(db) {
    sqlite3_stmt* raw = nullptr;
    if (sqlite3_prepare_v3(db, sql.data(), static_cast<int>(sql.size()), SQLITE_PREPARE_PERSISTENT,
                           &raw, nullptr) != SQLITE_OK) {
      fail(db, "prepare \"" + std::string(sql) + "\"");
    }
    stmt_.reset(raw);
  }

  sqlite3_stmt* get() const noexcept { return stmt_.get(); }
  sqlite3* db() const noexcept { return db_; }

 private:
  sqlite3* db_;
  std::unique_ptr<sqlite3_stmt, StmtFinalizer> stmt_;
};

/// One use of a prepared statement: binds, steps, and on leaving (also by an exception) resets it,
/// so a half-stepped statement never holds a read transaction open or a dangling bound pointer.
class Use {
 public:
  explicit Use(Statement& s) : s_(s) {}
  Use(const Use&) = delete;
  Use& operator=(const Use&) = delete;
  ~Use() {
    sqlite3_reset(s_.get());
    sqlite3_clear_bindings(s_.get());
  }

  // SQLITE_STATIC is safe: the caller's string outlives this Use, and the bindings are cleared
  // before it returns. The explicit byte length keeps embedded NUL bytes.
  Use& text(int idx, const std::string& v) {
    check(sqlite3_bind_text64(s_.get(), idx, v.data(), v.size(), SQLITE_STATIC, SQLITE_UTF8), "bind text");
    return *this;
  }
  /// Bytes as a BLOB (an empty string: a zero-length BLOB, never NULL).
  Use& blob(int idx, const std::string& v) {
    check(sqlite3_bind_blob64(s_.get(), idx, v.data(), v.size(), SQLITE_STATIC), "bind blob");
    return *this;
  }
  /// Bytes as a BLOB, or NULL for an empty string.
  Use& blob_or_null(int idx, const std::string& v) {
    if (v.empty()) check(sqlite3_bind_null(s_.get(), idx), "bind null");
    else blob(idx, v);
    return *this;
  }
  Use& integer(int idx, std::int64_t v) {
    check(sqlite3_bind_int64(s_.get(), idx, v), "bind integer");
    return *this;
  }

  /// Steps once; true while a row is available.
  bool step(std::string_view what) {
    switch (sqlite3_step(s_.get())) {
      case SQLITE_ROW:
        return true;
      case SQLITE_DONE:
        return false;
      default:
        fail(s_.db(), what);
    }
  }
  /// Steps a statement that returns no rows.
  void run(std::string_view what) {
    if (step(what)) throw StoreError("offline store: " + std::string(what) + ": unexpected row");
  }

  std::int64_t column_int(int col) const { return sqlite3_column_int64(s_.get(), col); }
  std::string column_text(int col) const {
    // column_text before column_bytes: the byte count is of the converted value.
    const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(s_.get(), col));
    const auto n = static_cast<std::size_t>(sqlite3_column_bytes(s_.get(), col));
    return p ? std::string(p, n) : std::string();
  }
  std::string column_blob(int col) const {
    const auto* p = static_cast<const char*>(sqlite3_column_blob(s_.get(), col));
    const auto n = static_cast<std::size_t>(sqlite3_column_bytes(s_.get(), col));
    return p ? std::string(p, n) : std::string();
  }

 private:
  void check(int rc, std::string_view what) {
    if (rc != SQLITE_OK) fail(s_.db(), what);
  }

  Statement& s_;
};

Kind to_kind(std::int64_t v) {
  if (v != static_cast<std::int64_t>(Kind::direct) && v != static_cast<std::int64_t>(Kind::channel)) {
    throw StoreError("offline store: unknown message kind " + std::to_string(v) + " in the database");
  }
  return static_cast<Kind>(v);
}

/// Runs SQL with no parameters and no rows wanted (schema, pragmas, one-off checks).
void exec(sqlite3* db, std::string_view sql, std::string_view what) {
  char* err = nullptr;
  if (sqlite3_exec(db, std::string(sql).c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : sqlite3_errmsg(db);
    sqlite3_free(err);
    throw StoreError("offline store: " + std::string(what) + ": " + msg);
  }
}

/// The first column of the first row of a parameterless query.
std::int64_t query_int(sqlite3* db, std::string_view sql) {
  Statement s(db, sql);
  Use u(s);
  if (!u.step(sql)) throw StoreError("offline store: no result from \"" + std::string(sql) + "\"");
  return u.column_int(0);
}

std::string query_text(sqlite3* db, std::string_view sql) {
  Statement s(db, sql);
  Use u(s);
  if (!u.step(sql)) throw StoreError("offline store: no result from \"" + std::string(sql) + "\"");
  return u.column_text(0);
}

/// Accepts our version, an older one (migrated next) and an empty file; a version-0 file that
/// already holds tables is someone else's, and a newer version is a newer build's.
void check_version(sqlite3* db, std::int64_t found, const std::string& path) {
  if (found >= 1 && found <= schema_version) return;
  if (found == 0 && query_int(db, "SELECT count(*) FROM sqlite_master") != 0) {
    throw StoreError("offline store: " + path + " holds tables but no schema version (found 0, expected " +
                     std::to_string(schema_version) + "); not a ChatApp store");
  }
  if (found != 0) {
    throw StoreError("offline store: " + path + " has schema version " + std::to_string(found) +
                     ", this build expects " + std::to_string(schema_version) + " or older; refusing to open it");
  }
}

/// Holds a write transaction; rolls back unless commit() was reached.
class Transaction {
 public:
  Transaction(Statement& begin, Statement& commit, Statement& rollback)
      : commit_(commit), rollback_(rollback) {
    Use(begin).run("begin transaction");
  }
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;
  ~Transaction() {
    // Some errors (full disk, I/O) already rolled back; a second ROLLBACK would only fail.
    if (!done_ && !sqlite3_get_autocommit(rollback_.db())) {
      Use u(rollback_);
      sqlite3_step(rollback_.get());
    }
  }

  void commit() {
    Use(commit_).run("commit");
    done_ = true;
  }

 private:
  Statement& commit_;
  Statement& rollback_;
  bool done_ = false;
};

DbHandle open_db(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw StoreError("offline store: cannot create directory " + dir + ": " + ec.message());
  const std::string path = (std::filesystem::path(dir) / "chat.db").string();

  sqlite3* raw = nullptr;
  const int rc = sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nullptr);
  DbHandle db(raw);  // open_v2 hands back a handle even on failure; it must still be closed
  if (rc != SQLITE_OK) {
    throw StoreError("offline store: cannot open " + path + ": " +
                     (db ? sqlite3_errmsg(db.get()) : sqlite3_errstr(rc)));
  }
  sqlite3_extended_result_codes(db.get(), 1);
  sqlite3_busy_timeout(db.get(), busy_timeout_ms);

  // Read the version before anything that could write the file: a store this build cannot read
  // (a newer build's, or not ours at all) is left exactly as found.
  check_version(db.get(), query_int(db.get(), "PRAGMA user_version"), path);

  if (query_text(db.get(), "PRAGMA journal_mode=WAL") != "wal") {
    throw StoreError("offline store: " + path + ": cannot switch to WAL mode");
  }
  // FULL syncs the WAL on every commit: "saved" must survive power loss, not only a crash.
  exec(db.get(), "PRAGMA synchronous=FULL", "set synchronous");

  // Another process may be creating or migrating the schema at the same moment: decide under the
  // write lock. Creation and every migration step commit together with the new version, so a
  // crash part-way leaves the file at its old version with all its rows.
  exec(db.get(), "BEGIN IMMEDIATE", "begin schema transaction");
  try {
    const auto found = query_int(db.get(), "PRAGMA user_version");
    check_version(db.get(), found, path);
    std::int64_t from = found;
    if (found == 0) {
      exec(db.get(), schema_2_sql, "create schema");
      from = 2;
    }
    for (auto v = from; v < schema_version; ++v) {
      exec(db.get(), migrations.at(static_cast<std::size_t>(v - 1)),
           "migrate schema from version " + std::to_string(v) + " to " + std::to_string(v + 1));
    }
    if (found != schema_version) {
      exec(db.get(), "PRAGMA user_version=" + std::to_string(schema_version), "set schema version");
    }
    exec(db.get(), "COMMIT", "commit schema");
  } catch (...) {
    if (!sqlite3_get_autocommit(db.get())) sqlite3_exec(db.get(), "ROLLBACK", nullptr, nullptr, nullptr);
    throw;
  }
  return db;
}

/// Single-threaded: one connection, used from the server's one thread.
class SqliteStore final : public Store {
 public:
  explicit SqliteStore(const std::string& dir)
      : db_(open_db(dir)),
        begin_(db_.get(), "BEGIN IMMEDIATE"),
        commit_(db_.get(), "COMMIT"),
        rollback_(db_.get(), "ROLLBACK"),
        insert_message_(db_.get(),
                        "INSERT INTO messages (recipient, sender, sender_key, kind, ts_us, mid, body) "
                        "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) "
                        "ON CONFLICT (recipient, sender, mid) DO NOTHING"),
        select_pending_(db_.get(),
                        "SELECT seq, sender, sender_key, kind, ts_us, mid, body FROM messages "
                        "WHERE recipient = ?1 AND (ts_us, seq) > (?2, ?3) ORDER BY ts_us, seq LIMIT ?4"),
        count_for_(db_.get(), "SELECT count(*) FROM messages WHERE recipient = ?1"),
        delete_message_(db_.get(), "DELETE FROM messages WHERE recipient = ?1 AND seq = ?2"),
        upsert_client_(db_.get(),
                       "INSERT OR REPLACE INTO clients (name, ip, port, online, key) VALUES (?1, ?2, ?3, ?4, ?5)"),
        select_clients_(db_.get(), "SELECT name, ip, port, online, key FROM clients ORDER BY name"),
        select_key_(db_.get(), "SELECT key FROM clients WHERE name = ?1"),
        delete_client_(db_.get(), "DELETE FROM clients WHERE name = ?1"),
        delete_messages_(db_.get(), "DELETE FROM messages WHERE recipient = ?1"),
        count_legacy_(db_.get(), "SELECT count(*) FROM legacy_messages") {}

  SqliteStore(const SqliteStore&) = delete;
  SqliteStore& operator=(const SqliteStore&) = delete;

  std::vector<bool> save(std::span<const NewMessage> batch) override {
    std::vector<bool> inserted;
    if (batch.empty()) return inserted;
    inserted.reserve(batch.size());
    Transaction tx(begin_, commit_, rollback_);
    for (const auto& m : batch) {
      Use u(insert_message_);
      u.text(1, m.to)
          .text(2, m.from)
          .blob(3, m.from_key)
          .integer(4, static_cast<std::int64_t>(m.kind))
          .integer(5, m.ts_us)
          .integer(6, std::bit_cast<std::int64_t>(m.mid))
          .blob(7, m.body)
          .run("save message");
      // ON CONFLICT DO NOTHING completes with no change; the caller must not count a retry twice.
      inserted.push_back(sqlite3_changes64(db_.get()) == 1);
    }
    tx.commit();
    return inserted;
  }

  std::vector<StoredMessage> pending_for(const std::string& to, Cursor after, std::size_t limit) override {
    std::vector<StoredMessage> out;
    Use u(select_pending_);
    constexpr auto max_limit = static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max());
    u.text(1, to)
        .integer(2, after.ts_us)
        .integer(3, after.seq)
        .integer(4, static_cast<std::int64_t>(std::min(limit, max_limit)));
    while (u.step("read pending messages")) {
      out.push_back(StoredMessage{
          .seq = u.column_int(0),
          .from = u.column_text(1),
          .from_key = u.column_blob(2),
          .kind = to_kind(u.column_int(3)),
          .ts_us = u.column_int(4),
          .mid = std::bit_cast<std::uint64_t>(u.column_int(5)),
          .body = u.column_blob(6),
      });
    }
    return out;
  }

  std::size_t count_for(const std::string& to) override {
    Use u(count_for_);
    u.text(1, to);
    if (!u.step("count messages")) throw StoreError("offline store: count returned no row");
    return static_cast<std::size_t>(u.column_int(0));
  }

  void remove_delivered(const std::string& to, std::span<const std::int64_t> seqs) override {
    if (seqs.empty()) return;
    Transaction tx(begin_, commit_, rollback_);
    for (const auto seq : seqs) {
      // The recipient is part of the key: an ACK from one client never deletes another's messages.
      Use u(delete_message_);
      u.text(1, to).integer(2, seq).run("remove delivered message");
    }
    tx.commit();
  }

  void store_clients(std::span<const ClientRow> rows) override {
    if (rows.empty()) return;
    Transaction tx(begin_, commit_, rollback_);
    for (const auto& r : rows) {
      Use u(upsert_client_);
      u.text(1, r.name).text(2, r.ip).integer(3, r.port).integer(4, r.online ? 1 : 0).blob_or_null(5, r.key).run(
          "store client");
    }
    tx.commit();
  }

  std::vector<ClientRow> load_clients() override {
    std::vector<ClientRow> out;
    Use u(select_clients_);
    while (u.step("load clients")) {
      const auto port = u.column_int(2);
      if (port < 0 || port > std::numeric_limits<std::uint16_t>::max()) {
        throw StoreError("offline store: client port " + std::to_string(port) + " out of range in the database");
      }
      out.push_back(ClientRow{
          .name = u.column_text(0),
          .ip = u.column_text(1),
          .port = static_cast<std::uint16_t>(port),
          .online = u.column_int(3) != 0,
          .key = u.column_blob(4),
      });
    }
    return out;
  }

  Released release(const std::string& name) override {
    Released out;
    Transaction tx(begin_, commit_, rollback_);
    {
      Use u(select_key_);
      u.text(1, name);
      if (u.step("read binding")) {
        out.found = true;
        out.key = u.column_blob(0);
      }
    }
    {
      Use u(delete_client_);
      u.text(1, name).run("release name");
    }
    {
      Use u(delete_messages_);
      u.text(1, name).run("delete released messages");
      out.messages = static_cast<std::size_t>(sqlite3_changes64(db_.get()));
    }
    tx.commit();
    return out;
  }

  std::size_t legacy_count() override {
    Use u(count_legacy_);
    if (!u.step("count legacy messages")) throw StoreError("offline store: count returned no row");
    return static_cast<std::size_t>(u.column_int(0));
  }

 private:
  // Declared first so it is destroyed last, after every statement has been finalized.
  DbHandle db_;
  Statement begin_;
  Statement commit_;
  Statement rollback_;
  Statement insert_message_;
  Statement select_pending_;
  Statement count_for_;
  Statement delete_message_;
  Statement upsert_client_;
  Statement select_clients_;
  Statement select_key_;
  Statement delete_client_;
  Statement delete_messages_;
  Statement count_legacy_;
};

}  // namespace

std::unique_ptr<Store> open_sqlite_store(const std::string& dir) { return std::make_unique<SqliteStore>(dir); }

}  // namespace chat::offline
