// The SQLite implementation of the offline store: schema, version check, prepared statements.
#include "offline/store.hpp"

#include <algorithm>
#include <array>
#include <bit>
#include <filesystem>
#include <limits>
#include <string_view>
#include <system_error>
#include <utility>

#include "sqlite/sqlite.hpp"

namespace chat::offline {
namespace {

/// The schema this code writes; kept in `PRAGMA user_version`. Older ones are migrated on open.
constexpr int schema_version = 4;

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

/// Version 4 keeps files for offline recipients (SPEC §12): the offer and the chunks, both sealed
/// by the sender for the recipient, with the plaintext size the recipient's quota counts.
constexpr std::string_view migrate_3_to_4 = R"sql(
CREATE TABLE files (
  recipient  TEXT    NOT NULL,
  transfer   INTEGER NOT NULL,
  sender     TEXT    NOT NULL,
  sender_key BLOB    NOT NULL,
  ts_us      INTEGER NOT NULL,
  size       INTEGER NOT NULL,
  offer      BLOB    NOT NULL,
  data       BLOB    NOT NULL,
  PRIMARY KEY (recipient, transfer)
);
CREATE INDEX files_by_arrival ON files (ts_us);
)sql";

/// migrations[v - 1] takes a store from version v to v + 1.
constexpr std::array<std::string_view, schema_version - 1> migrations{migrate_1_to_2, migrate_2_to_3, migrate_3_to_4};

using sqlite::Statement;
using sqlite::Transaction;
using sqlite::Use;

/// The shared SQLite layer throws sqlite::Error, its text already starting "offline store: "; the
/// store's callers catch StoreError, so every entry point passes such an error on as one.
[[noreturn]] void rethrow_as_store_error(const sqlite::Error& e) { throw StoreError(e.what()); }

Kind to_kind(std::int64_t v) {
  if (v != static_cast<std::int64_t>(Kind::direct) && v != static_cast<std::int64_t>(Kind::channel)) {
    throw StoreError("offline store: unknown message kind " + std::to_string(v) + " in the database");
  }
  return static_cast<Kind>(v);
}

/// Accepts our version, an older one (migrated next) and an empty file; a version-0 file that
/// already holds tables is someone else's, and a newer version is a newer build's.
void check_version(const sqlite::Database& db, std::int64_t found, const std::string& path) {
  if (found >= 1 && found <= schema_version) return;
  if (found == 0 && db.query_int("SELECT count(*) FROM sqlite_master") != 0) {
    throw StoreError("offline store: " + path + " holds tables but no schema version (found 0, expected " +
                     std::to_string(schema_version) + "); not a ChatApp store");
  }
  if (found != 0) {
    throw StoreError("offline store: " + path + " has schema version " + std::to_string(found) +
                     ", this build expects " + std::to_string(schema_version) + " or older; refusing to open it");
  }
}

sqlite::Database open_db(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw StoreError("offline store: cannot create directory " + dir + ": " + ec.message());
  const std::string path = (std::filesystem::path(dir) / "chat.db").string();

  sqlite::Database db("offline store", path, busy_timeout_ms);

  // Read the version before anything that could write the file: a store this build cannot read
  // (a newer build's, or not ours at all) is left exactly as found.
  check_version(db, db.query_int("PRAGMA user_version"), path);

  if (db.query_text("PRAGMA journal_mode=WAL") != "wal") {
    throw StoreError("offline store: " + path + ": cannot switch to WAL mode");
  }
  // FULL syncs the WAL on every commit: "saved" must survive power loss, not only a crash.
  db.exec("PRAGMA synchronous=FULL", "set synchronous");

  // Another process may be creating or migrating the schema at the same moment: decide under the
  // write lock. Creation and every migration step commit together with the new version, so a
  // crash part-way leaves the file at its old version with all its rows.
  db.schema_transaction([&] {
    const auto found = db.query_int("PRAGMA user_version");
    check_version(db, found, path);
    std::int64_t from = found;
    if (found == 0) {
      db.exec(schema_2_sql, "create schema");
      from = 2;
    }
    for (auto v = from; v < schema_version; ++v) {
      db.exec(migrations.at(static_cast<std::size_t>(v - 1)),
              "migrate schema from version " + std::to_string(v) + " to " + std::to_string(v + 1));
    }
    if (found != schema_version) {
      db.exec("PRAGMA user_version=" + std::to_string(schema_version), "set schema version");
    }
  });
  return db;
}

/// Single-threaded: one connection, used from the server's one thread.
class SqliteStore final : public Store {
 public:
  explicit SqliteStore(const std::string& dir) try
      : db_(open_db(dir)),
        begin_(db_, "BEGIN IMMEDIATE"),
        commit_(db_, "COMMIT"),
        rollback_(db_, "ROLLBACK"),
        insert_message_(db_,
                        "INSERT INTO messages (recipient, sender, sender_key, kind, ts_us, mid, body) "
                        "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) "
                        "ON CONFLICT (recipient, sender, mid) DO NOTHING"),
        select_pending_(db_,
                        "SELECT seq, sender, sender_key, kind, ts_us, mid, body FROM messages "
                        "WHERE recipient = ?1 AND (ts_us, seq) > (?2, ?3) ORDER BY ts_us, seq LIMIT ?4"),
        count_for_(db_, "SELECT count(*) FROM messages WHERE recipient = ?1"),
        delete_message_(db_, "DELETE FROM messages WHERE recipient = ?1 AND seq = ?2"),
        upsert_client_(db_,
                       "INSERT OR REPLACE INTO clients (name, ip, port, online, key) VALUES (?1, ?2, ?3, ?4, ?5)"),
        select_clients_(db_, "SELECT name, ip, port, online, key FROM clients ORDER BY name"),
        select_key_(db_, "SELECT key FROM clients WHERE name = ?1"),
        delete_client_(db_, "DELETE FROM clients WHERE name = ?1"),
        delete_messages_(db_, "DELETE FROM messages WHERE recipient = ?1"),
        count_legacy_(db_, "SELECT count(*) FROM legacy_messages"),
        insert_file_(db_,
                     "INSERT INTO files (recipient, transfer, sender, sender_key, ts_us, size, offer, data) "
                     "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (recipient, transfer) DO NOTHING"),
        select_files_(db_,
                      "SELECT sender, sender_key, transfer, ts_us, size, offer FROM files "
                      "WHERE recipient = ?1 ORDER BY ts_us, transfer"),
        select_file_data_(db_, "SELECT data FROM files WHERE recipient = ?1 AND transfer = ?2"),
        delete_file_(db_, "DELETE FROM files WHERE recipient = ?1 AND transfer = ?2"),
        file_bytes_(db_, "SELECT coalesce(sum(size), 0) FROM files WHERE recipient = ?1"),
        expire_files_(db_, "DELETE FROM files WHERE ts_us < ?1"),
        delete_files_(db_, "DELETE FROM files WHERE recipient = ?1") {
  } catch (const sqlite::Error& e) {
    rethrow_as_store_error(e);
  }

  SqliteStore(const SqliteStore&) = delete;
  SqliteStore& operator=(const SqliteStore&) = delete;

  std::vector<bool> save(std::span<const NewMessage> batch) override try {
    std::vector<bool> inserted;
    if (batch.empty()) return inserted;
    inserted.reserve(batch.size());
    Transaction tx(begin_, commit_, rollback_);
    for (const auto& m : batch) {
      Use u(insert_message_);
      const auto changed = u.text(1, m.to)
          .text(2, m.from)
          .blob(3, m.from_key)
          .integer(4, static_cast<std::int64_t>(m.kind))
          .integer(5, m.ts_us)
          .integer(6, std::bit_cast<std::int64_t>(m.mid))
          .blob(7, m.body)
          .run("save message");
      // ON CONFLICT DO NOTHING completes with no change; the caller must not count a retry twice.
      inserted.push_back(changed == 1);
    }
    tx.commit();
    return inserted;
  } catch (const sqlite::Error& e) {
    rethrow_as_store_error(e);
  }

  std::vector<StoredMessage> pending_for(const std::string& to, Cursor after, std::size_t limit) override try {
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
  } catch (const sqlite::Error& e) {
    rethrow_as_store_error(e);
  }

  std::size_t count_for(const std::string& to) override try {
    Use u(count_for_);
    u.text(1, to);
    if (!u.step("count messages")) throw StoreError("offline store: count returned no row");
    return static_cast<std::size_t>(u.column_int(0));
  } catch (const sqlite::Error& e) {
    rethrow_as_store_error(e);
  }

  void remove_delivered(const std::string& to, std::span<const std::int64_t> seqs) override try {
    if (seqs.empty()) return;
    Transaction tx(begin_, commit_, rollback_);
    for (const auto seq : seqs) {
      // The recipient is part of the key: an ACK from one client never deletes another's messages.
      Use u(delete_message_);
      u.text(1, to).integer(2, seq).run("remove delivered message");
    }
    tx.commit();
  } catch (const sqlite::Error& e) {
    rethrow_as_store_error(e);
  }

  void store_clients(std::span<const ClientRow> rows) override try {
    if (rows.empty()) return;
    Transaction tx(begin_, commit_, rollback_);
    for (const auto& r : rows) {
      Use u(upsert_client_);
      u.text(1, r.name).text(2, r.ip).integer(3, r.port).integer(4, r.online ? 1 : 0).blob_or_null(5, r.key).run(
          "store client");
    }
    tx.commit();
  } catch (const sqlite::Error& e) {
    rethrow_as_store_error(e);
  }

  std::vector<ClientRow> load_clients() override try {
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
  } catch (const sqlite::Error& e) {
    rethrow_as_store_error(e);
  }

  Released release(const std::string& name) override try {
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
      out.messages = static_cast<std::size_t>(u.text(1, name).run("delete released messages"));
    }
    {
      Use u(delete_files_);
      out.files = static_cast<std::size_t>(u.text(1, name).run("delete released files"));
    }
    tx.commit();
    return out;
  } catch (const sqlite::Error& e) {
    rethrow_as_store_error(e);
  }

  std::size_t legacy_count() override try {
    Use u(count_legacy_);
    if (!u.step("count legacy messages")) throw StoreError("offline store: count returned no row");
    return static_cast<std::size_t>(u.column_int(0));
  } catch (const sqlite::Error& e) {
    rethrow_as_store_error(e);
  }

  bool put_file(const NewFile& f) override try {
    Use u(insert_file_);
    return u.text(1, f.to)
               .integer(2, std::bit_cast<std::int64_t>(f.transfer))
               .text(3, f.from)
               .blob(4, f.from_key)
               .integer(5, f.ts_us)
               .integer(6, static_cast<std::int64_t>(f.size))
               .blob(7, f.offer)
               .blob(8, f.data)
               .run("keep file") == 1;
  } catch (const sqlite::Error& e) {
    rethrow_as_store_error(e);
  }

  std::vector<HeldFile> files_for(const std::string& to) override try {
    std::vector<HeldFile> out;
    Use u(select_files_);
    u.text(1, to);
    while (u.step("list files")) {
      out.push_back(HeldFile{
          .from = u.column_text(0),
          .from_key = u.column_blob(1),
          .transfer = std::bit_cast<std::uint64_t>(u.column_int(2)),
          .ts_us = u.column_int(3),
          .size = static_cast<std::uint64_t>(u.column_int(4)),
          .offer = u.column_blob(5),
      });
    }
    return out;
  } catch (const sqlite::Error& e) {
    rethrow_as_store_error(e);
  }

  std::optional<std::string> file_data(const std::string& to, std::uint64_t transfer) override try {
    Use u(select_file_data_);
    u.text(1, to).integer(2, std::bit_cast<std::int64_t>(transfer));
    if (!u.step("read file")) return std::nullopt;
    return u.column_blob(0);
  } catch (const sqlite::Error& e) {
    rethrow_as_store_error(e);
  }

  bool delete_file(const std::string& to, std::uint64_t transfer) override try {
    Use u(delete_file_);
    return u.text(1, to).integer(2, std::bit_cast<std::int64_t>(transfer)).run("delete file") == 1;
  } catch (const sqlite::Error& e) {
    rethrow_as_store_error(e);
  }

  std::uint64_t file_bytes_for(const std::string& to) override try {
    Use u(file_bytes_);
    u.text(1, to);
    if (!u.step("count file bytes")) throw StoreError("offline store: sum returned no row");
    return static_cast<std::uint64_t>(u.column_int(0));
  } catch (const sqlite::Error& e) {
    rethrow_as_store_error(e);
  }

  std::size_t expire_files(std::int64_t before_us) override try {
    Use u(expire_files_);
    return static_cast<std::size_t>(u.integer(1, before_us).run("expire files"));
  } catch (const sqlite::Error& e) {
    rethrow_as_store_error(e);
  }

 private:
  // Declared first so it is destroyed last, after every statement has been finalized.
  sqlite::Database db_;
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
  Statement insert_file_;
  Statement select_files_;
  Statement select_file_data_;
  Statement delete_file_;
  Statement file_bytes_;
  Statement expire_files_;
  Statement delete_files_;
};

}  // namespace

std::unique_ptr<Store> open_sqlite_store(const std::string& dir) { return std::make_unique<SqliteStore>(dir); }

}  // namespace chat::offline
