// The PostgreSQL store: libpq in non-blocking pipeline mode on the server's io_context, the
// shared schema, the change log that carries other servers' changes, and this server's lease.
#include "offline/pg_store.hpp"

#include <libpq-fe.h>
#include <poll.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <deque>
#include <exception>
#include <limits>
#include <set>
#include <string_view>
#include <utility>
#include <vector>

#include <boost/asio/post.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <spdlog/spdlog.h>

namespace chat::offline {
namespace {

namespace net = boost::asio;
using error_code = boost::system::error_code;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

/// The schema this code writes, kept in the schema_version table. An older one is migrated on
/// open (migrations below), a newer one refused.
constexpr int schema_version = 3;

/// Advisory lock keys (any constants, as long as nothing else in the database uses them).
constexpr std::int64_t schema_lock = 0x4368'6174'0001;  // held while the schema is checked or created
constexpr std::int64_t change_lock = 0x4368'6174'0002;  // held by every transaction that writes change rows

/// The LISTEN/NOTIFY channel: a notification only wakes a server up, the rows carry the data.
constexpr const char* wake_channel = "chatapp_changes";

/// Change rows read per query; a full page is followed by the next at once.
constexpr std::int64_t change_page = 1000;
/// Change rows older than this are deleted (every server has read them long before).
constexpr std::string_view change_keep = "10 minutes";
/// Trimming runs with every this many lease renewals.
constexpr int trim_every_renewals = 30;

/// changes.kind
constexpr std::int16_t change_client = 0;
constexpr std::int16_t change_mail = 1;

/// Reconnection: the first retry after this, doubling up to the maximum.
constexpr auto backoff_min = 100ms;
constexpr auto backoff_max = 2000ms;
/// A connection attempt not finished in this time is abandoned (PQconnectPoll has no timeout).
constexpr auto connect_timeout = 5s;

// Type OIDs of the binary parameters (pg_type.dat; stable across versions).
constexpr Oid bool_oid = 16;
constexpr Oid bytea_oid = 17;
constexpr Oid int8_oid = 20;
constexpr Oid int2_oid = 21;
constexpr Oid int4_oid = 23;
constexpr Oid text_oid = 25;
constexpr Oid bytea_array_oid = 1001;
constexpr Oid bool_array_oid = 1000;
constexpr Oid int2_array_oid = 1005;
constexpr Oid int4_array_oid = 1007;
constexpr Oid text_array_oid = 1009;
constexpr Oid int8_array_oid = 1016;

constexpr std::string_view schema_sql = R"sql(
CREATE TABLE schema_version (version integer NOT NULL);
CREATE TABLE messages (
  seq        bigserial PRIMARY KEY,
  recipient  text     NOT NULL,
  sender     text     NOT NULL,
  sender_key bytea    NOT NULL,
  kind       smallint NOT NULL CHECK (kind IN (0, 1)),
  ts_us      bigint   NOT NULL,
  mid        bigint   NOT NULL,  -- the sender's u64 id, stored as its signed bit pattern
  body       bytea    NOT NULL,
  -- a sender retrying a save whose ACK was lost must not store the message twice
  UNIQUE (recipient, sender, mid)
);
-- delivery reads one recipient's messages in arrival order; seq breaks ties
CREATE INDEX messages_by_arrival ON messages (recipient, ts_us, seq);
CREATE TABLE clients (
  name   text    PRIMARY KEY,
  ip     text    NOT NULL,
  port   integer NOT NULL,
  online boolean NOT NULL,
  key    bytea,                     -- the identity the name is bound to (NULL: not bound yet)
  server text    NOT NULL DEFAULT ''  -- the server holding the client's session
);
CREATE INDEX clients_online_by_server ON clients (server) WHERE online;
-- What every server reads to bring its own table up to date; seq order is commit order
-- because every writer holds the change lock from before its first change row to its commit.
CREATE TABLE changes (
  seq    bigserial   PRIMARY KEY,
  at     timestamptz NOT NULL DEFAULT now(),
  server text        NOT NULL,  -- the writer (its own changes it does not read back)
  kind   smallint    NOT NULL CHECK (kind IN (0, 1)),  -- 0 a client row, 1 a mailbox
  name   text        NOT NULL,  -- the client, or the mailbox's recipient
  delta  bigint      NOT NULL DEFAULT 0  -- a mailbox: messages saved (+) or deleted (-)
);
CREATE TABLE servers (
  id         text        PRIMARY KEY,
  expires_at timestamptz NOT NULL
);
)sql";

/// Version 2: the highest seq trimmed from the change log, so that a server that had not read
/// that far knows it missed changes (one row).
constexpr std::string_view trimmed_sql = R"sql(
CREATE TABLE trimmed (upto bigint NOT NULL);
INSERT INTO trimmed (upto) VALUES (0);
)sql";

/// Version 3 keeps files for offline recipients (SPEC §12), as the SQLite store's version 4:
/// the offer and the chunks, both sealed by the sender for the recipient, with the plaintext
/// size the recipient's quota counts. No change rows: files are in no count a server keeps,
/// and any server reads them here when the recipient registers with it. The data is sealed,
/// so it is stored out of line without trying to compress it.
constexpr std::string_view files_sql = R"sql(
CREATE TABLE files (
  recipient  text   NOT NULL,
  transfer   bigint NOT NULL,  -- the sender's u64 id, stored as its signed bit pattern
  sender     text   NOT NULL,
  sender_key bytea  NOT NULL,
  ts_us      bigint NOT NULL,
  size       bigint NOT NULL,
  offer      bytea  NOT NULL,
  data       bytea  NOT NULL,
  PRIMARY KEY (recipient, transfer)
);
ALTER TABLE files ALTER COLUMN data SET STORAGE EXTERNAL;
CREATE INDEX files_by_arrival ON files (ts_us);
)sql";

/// schema_sql is version 1; migrations[v - 1] takes a database from version v to v + 1 (a new
/// database runs them all after it).
constexpr std::array<std::string_view, schema_version - 1> migrations{trimmed_sql, files_sql};

// ---------------------------------------------------------------------------------------------
// Values in libpq's binary format.

void put_be(std::string& out, std::uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

std::uint64_t get_be(const char* p, int bytes) {
  std::uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

std::string be(std::uint64_t v, int bytes) {
  std::string s;
  put_be(s, v, bytes);
  return s;
}

/// A one-dimensional array without NULLs, each element already in binary form.
std::string binary_array(Oid element, const std::vector<std::string>& items) {
  std::string out;
  if (items.empty()) {
    put_be(out, 0, 4);  // no dimensions
    put_be(out, 0, 4);  // no NULLs
    put_be(out, element, 4);
    return out;
  }
  put_be(out, 1, 4);
  put_be(out, 0, 4);
  put_be(out, element, 4);
  put_be(out, items.size(), 4);
  put_be(out, 1, 4);  // lower bound
  for (const auto& item : items) {
    put_be(out, item.size(), 4);
    out.append(item);
  }
  return out;
}

/// A statement's parameters, every one bound in binary format with its type given.
class Params {
 public:
  Params& text(std::string_view v) { return add(text_oid, std::string(v)); }
  Params& bytes(std::string_view v) { return add(bytea_oid, std::string(v)); }
  /// A large value (a kept file's data) moved in rather than copied.
  Params& owned_bytes(std::string v) { return add(bytea_oid, std::move(v)); }
  /// NULL for an empty value (an unbound key).
  Params& bytes_or_null(std::string_view v) {
    if (v.empty()) return add(bytea_oid, std::string(), true);
    return bytes(v);
  }
  Params& int8(std::int64_t v) { return add(int8_oid, be(std::bit_cast<std::uint64_t>(v), 8)); }
  Params& int4(std::int32_t v) { return add(int4_oid, be(std::bit_cast<std::uint32_t>(v), 4)); }
  Params& boolean(bool v) { return add(bool_oid, std::string(1, v ? '\1' : '\0')); }
  Params& array(Oid array_type, Oid element, const std::vector<std::string>& items) {
    return add(array_type, binary_array(element, items));
  }

  int size() const { return static_cast<int>(types_.size()); }
  const Oid* types() const { return types_.data(); }
  /// Pointers into the values: valid while this object is unchanged.
  void bind(std::vector<const char*>& values, std::vector<int>& lengths, std::vector<int>& formats) const {
    values.clear();
    lengths.clear();
    formats.assign(types_.size(), 1);
    for (std::size_t i = 0; i < values_.size(); ++i) {
      values.push_back(null_[i] ? nullptr : values_[i].data());
      lengths.push_back(static_cast<int>(values_[i].size()));
    }
  }

 private:
  Params& add(Oid type, std::string v, bool null = false) {
    types_.push_back(type);
    values_.push_back(std::move(v));
    null_.push_back(null);
    return *this;
  }
  std::vector<Oid> types_;
  std::vector<std::string> values_;
  std::vector<bool> null_;
};

struct Statement {
  std::string sql;
  Params params{};
};

struct ResultDeleter {
  void operator()(PGresult* r) const { PQclear(r); }
};
using Result = std::unique_ptr<PGresult, ResultDeleter>;

std::string trimmed(const char* s) {
  std::string out = s ? s : "";
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

/// A failed result's primary message (without libpq's "ERROR:  " prefix and trailing newline).
std::string result_error(const PGresult* r) {
  const char* primary = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
  if (primary) return primary;
  return trimmed(PQresultErrorMessage(r));
}

/// Reads a result's values in binary format, checking each one's size before it is read.
class Rows {
 public:
  explicit Rows(const PGresult* r) : r_(r) {}
  int size() const { return PQntuples(r_); }
  bool null(int row, int col) const { return PQgetisnull(r_, row, col) != 0; }
  std::int64_t int8(int row, int col) const { return std::bit_cast<std::int64_t>(fixed(row, col, 8)); }
  std::int32_t int4(int row, int col) const {
    return std::bit_cast<std::int32_t>(static_cast<std::uint32_t>(fixed(row, col, 4)));
  }
  std::int16_t int2(int row, int col) const {
    return std::bit_cast<std::int16_t>(static_cast<std::uint16_t>(fixed(row, col, 2)));
  }
  bool boolean(int row, int col) const { return fixed(row, col, 1) != 0; }
  std::string bytes(int row, int col) const {
    if (null(row, col)) return {};
    return std::string(PQgetvalue(r_, row, col), static_cast<std::size_t>(PQgetlength(r_, row, col)));
  }

 private:
  std::uint64_t fixed(int row, int col, int bytes) const {
    if (row >= size() || col >= PQnfields(r_) || null(row, col) || PQgetlength(r_, row, col) != bytes) {
      throw StoreError(std::string("offline store: unexpected value in the database's reply (row ")
                           .append(std::to_string(row))
                           .append(", column ")
                           .append(std::to_string(col))
                           .append(")"));
    }
    return get_be(PQgetvalue(r_, row, col), bytes);
  }
  const PGresult* r_;
};

Kind to_kind(std::int16_t v) {
  if (v != static_cast<std::int16_t>(Kind::direct) && v != static_cast<std::int16_t>(Kind::channel)) {
    throw StoreError(std::string("offline store: unknown message kind ").append(std::to_string(v)).append(" in the database"));
  }
  return static_cast<Kind>(v);
}

/// A size or a byte count (never negative as written).
std::uint64_t to_size(std::int64_t v) {
  if (v < 0) throw StoreError(std::string("offline store: negative size ").append(std::to_string(v)).append(" in the database"));
  return static_cast<std::uint64_t>(v);
}

std::uint16_t to_port(std::int32_t v) {
  if (v < 0 || v > std::numeric_limits<std::uint16_t>::max()) {
    throw StoreError(std::string("offline store: client port ").append(std::to_string(v)).append(" out of range in the database"));
  }
  return static_cast<std::uint16_t>(v);
}

// ---------------------------------------------------------------------------------------------
// Blocking use: start-up (schema, load) and the operator's release.

struct ConnDeleter {
  void operator()(PGconn* c) const { PQfinish(c); }
};
using Conn = std::unique_ptr<PGconn, ConnDeleter>;

/// TCP keep-alives, so a database host that vanishes without closing the connection is noticed
/// in about 10 s; listed before the URI, whose own settings win.
constexpr std::array<const char*, 5> conn_keywords{"keepalives_idle", "keepalives_interval", "keepalives_count",
                                                   "dbname", nullptr};

std::array<const char*, 5> conn_values(const std::string& uri) { return {"4", "2", "3", uri.c_str(), nullptr}; }

Conn connect_blocking(const std::string& uri) {
  const auto values = conn_values(uri);
  Conn c(PQconnectdbParams(conn_keywords.data(), values.data(), 1));
  if (!c) throw StoreError("offline store: cannot connect to the database: out of memory");
  if (PQstatus(c.get()) != CONNECTION_OK) {
    throw StoreError(std::string("offline store: cannot connect to the database: ").append(trimmed(PQerrorMessage(c.get()))));
  }
  return c;
}

Result exec(PGconn* c, const std::string& sql, const Params& p, std::string_view what) {
  std::vector<const char*> values;
  std::vector<int> lengths;
  std::vector<int> formats;
  p.bind(values, lengths, formats);
  Result r(PQexecParams(c, sql.c_str(), p.size(), p.types(), values.data(), lengths.data(), formats.data(), 1));
  const auto status = r ? PQresultStatus(r.get()) : PGRES_FATAL_ERROR;
  if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
    throw StoreError(std::string("offline store: ")
                         .append(what)
                         .append(": ")
                         .append(r ? result_error(r.get()) : trimmed(PQerrorMessage(c))));
  }
  return r;
}

Result exec(PGconn* c, const std::string& sql, std::string_view what) { return exec(c, sql, Params{}, what); }

/// Several statements without parameters (the schema): the simple query protocol.
void exec_script(PGconn* c, std::string_view sql, std::string_view what) {
  Result r(PQexec(c, std::string(sql).c_str()));
  if (!r || PQresultStatus(r.get()) != PGRES_COMMAND_OK) {
    throw StoreError(std::string("offline store: ")
                         .append(what)
                         .append(": ")
                         .append(r ? result_error(r.get()) : trimmed(PQerrorMessage(c))));
  }
}

/// Runs `f` in a transaction on `c`; rolls back if it throws.
template <class F>
void transaction(PGconn* c, const std::string& begin, F&& f) {
  exec(c, begin, "begin");
  try {
    f();
    exec(c, "COMMIT", "commit");
  } catch (...) {
    PQclear(PQexec(c, "ROLLBACK"));
    throw;
  }
}

/// Creates the schema if the database has none; refuses a newer version and a database that
/// holds our table names without a version. Several servers may start at once: the advisory
/// lock makes the second wait for the first's commit and find the schema made.
void ensure_schema(PGconn* c) {
  transaction(c, "BEGIN", [&] {
    exec(c, "SELECT pg_advisory_xact_lock($1)", Params().int8(schema_lock), "lock the schema");
    Result found = exec(c,
                        "SELECT to_regclass('schema_version') IS NOT NULL, to_regclass('messages') IS NOT NULL, "
                        "to_regclass('clients') IS NOT NULL",
                        "read the schema");
    Rows rows(found.get());
    if (rows.boolean(0, 0)) {
      Result v = exec(c, "SELECT coalesce(max(version), 0) FROM schema_version", "read the schema version");
      const auto version = Rows(v.get()).int4(0, 0);
      if (version >= 1 && version < schema_version) {
        for (auto from = version; from < schema_version; ++from) {
          exec_script(c, migrations[static_cast<std::size_t>(from - 1)],
                      std::string("migrate the schema from version ").append(std::to_string(from)));
        }
        exec(c, "UPDATE schema_version SET version = $1", Params().int4(schema_version), "set the schema version");
        spdlog::info("offline store: the database's schema migrated from version {} to {}", version, schema_version);
        return;
      }
      if (version != schema_version) {
        throw StoreError(std::string("offline store: the database has schema version ")
                             .append(std::to_string(version))
                             .append(", this build expects ")
                             .append(std::to_string(schema_version))
                             .append("; refusing to use it"));
      }
      return;
    }
    if (rows.boolean(0, 1) || rows.boolean(0, 2)) {
      throw StoreError("offline store: the database holds tables named messages or clients but no schema_version; "
                       "not a ChatApp database");
    }
    exec_script(c, schema_sql, "create the schema");
    for (const auto sql : migrations) exec_script(c, sql, "create the schema");
    exec(c, "INSERT INTO schema_version (version) VALUES ($1)", Params().int4(schema_version), "set the schema version");
  });
}

// ---------------------------------------------------------------------------------------------
// The SQL of each operation. Every transaction that writes change rows takes the change lock as
// its first statement, before any row lock, so two of them never wait for each other in a
// cycle, and the change rows' seqs come in commit order (the lock is released after the commit
// is visible).

const std::string lock_sql = "SELECT pg_advisory_xact_lock($1)";

/// A NOTIFY only if the transaction wrote a change row: `nt` must be read by the final SELECT.
const std::string notify_cte = std::string("nt AS (SELECT pg_notify('").append(wake_channel).append("', '') FROM (SELECT 1 FROM ch LIMIT 1) AS any_change)");

const std::string save_sql = std::string(R"sql(
WITH input AS (
  SELECT * FROM unnest($2, $3, $4, $5, $6, $7, $8) WITH ORDINALITY
    AS t (recipient, sender, sender_key, kind, ts_us, mid, body, ord)
), ins AS (
  INSERT INTO messages (recipient, sender, sender_key, kind, ts_us, mid, body)
  SELECT recipient, sender, sender_key, kind, ts_us, mid, body FROM input ORDER BY ord
  ON CONFLICT (recipient, sender, mid) DO NOTHING
  RETURNING seq, recipient, sender, mid
), ch AS (
  INSERT INTO changes (server, kind, name, delta)
  SELECT $1, 1, recipient, count(*) FROM ins GROUP BY recipient ORDER BY recipient
  RETURNING 1
), )sql").append(notify_cte).append(R"sql(
SELECT ins.seq FROM input LEFT JOIN ins USING (recipient, sender, mid)
  CROSS JOIN (SELECT count(*) FROM nt) AS notified
ORDER BY input.ord
)sql");

const std::string pending_sql =
    "SELECT seq, sender, sender_key, kind, ts_us, mid, body FROM messages "
    "WHERE recipient = $1 AND (ts_us, seq) > ($2, $3) ORDER BY ts_us, seq LIMIT $4";

const std::string count_sql = "SELECT count(*) FROM messages WHERE recipient = $1";

const std::string remove_sql = std::string(R"sql(
WITH del AS (
  DELETE FROM messages WHERE recipient = $2 AND seq = ANY($3) RETURNING 1
), ch AS (
  INSERT INTO changes (server, kind, name, delta)
  SELECT $1, 1, $2, -count(*) FROM del HAVING count(*) > 0
  RETURNING 1
), )sql").append(notify_cte).append(R"sql(
SELECT (SELECT count(*) FROM del), (SELECT count(*) FROM nt)
)sql");

/// Registrations, one row per name ($2..$6 arrays in the caller's order; an empty key is an
/// unbound name): each written unless the name is bound to another key (how two servers racing
/// to bind one new name end with exactly one winner: the second waits for the first's row).
/// Answers one boolean per input row, in order: whether it was written.
const std::string register_sql = std::string(R"sql(
WITH input AS (
  SELECT * FROM unnest($2, $3, $4, $5, $6) WITH ORDINALITY AS t (name, ip, port, online, key, ord)
), up AS (
  INSERT INTO clients AS c (name, ip, port, online, key, server)
  SELECT name, ip, port, online, NULLIF(key, '\x'::bytea), $1 FROM input ORDER BY name
  ON CONFLICT (name) DO UPDATE
    SET ip = EXCLUDED.ip, port = EXCLUDED.port, online = EXCLUDED.online, key = EXCLUDED.key, server = EXCLUDED.server
    WHERE c.key IS NULL OR c.key = EXCLUDED.key
  RETURNING name
), ch AS (
  INSERT INTO changes (server, kind, name) SELECT $1, 0, name FROM up ORDER BY name RETURNING 1
), )sql").append(notify_cte).append(R"sql(
SELECT up.name IS NOT NULL FROM input LEFT JOIN up USING (name)
  CROSS JOIN (SELECT count(*) FROM nt) AS notified
ORDER BY input.ord
)sql");

/// Online flags ($2..$5 arrays), each only while this server holds the row's session ($1) and
/// the row still has this address: a server the client left (for another, from the same
/// address) changes nothing. Answers one boolean per input row, in order: whether it was written.
const std::string online_sql = std::string(R"sql(
WITH input AS (
  SELECT * FROM unnest($2, $3, $4, $5) WITH ORDINALITY AS t (name, online, ip, port, ord)
), up AS (
  UPDATE clients AS c SET online = input.online FROM input
  WHERE c.name = input.name AND c.ip = input.ip AND c.port = input.port AND c.server = $1
  RETURNING c.name
), ch AS (
  INSERT INTO changes (server, kind, name) SELECT $1, 0, name FROM up ORDER BY name RETURNING 1
), )sql").append(notify_cte).append(R"sql(
SELECT up.name IS NOT NULL FROM input LEFT JOIN up USING (name)
  CROSS JOIN (SELECT count(*) FROM nt) AS notified
ORDER BY input.ord
)sql");

const std::string renew_sql =
    "INSERT INTO servers (id, expires_at) VALUES ($1, now() + $2 * interval '1 millisecond') "
    "ON CONFLICT (id) DO UPDATE SET expires_at = EXCLUDED.expires_at";

/// Expired servers' online clients go offline; the change rows are written in the expired
/// server's name (prefixed), so every server reads them, this one and the expired one included.
const std::string expire_sql = std::string(R"sql(
WITH dead AS (
  DELETE FROM servers WHERE expires_at < now() RETURNING id
), off AS (
  UPDATE clients SET online = false WHERE online AND server IN (SELECT id FROM dead) RETURNING name, server
), ch AS (
  INSERT INTO changes (server, kind, name) SELECT 'lease:' || server, 0, name FROM off ORDER BY name RETURNING 1
), )sql").append(notify_cte).append(R"sql(
SELECT (SELECT count(*) FROM dead), (SELECT count(*) FROM off), (SELECT count(*) FROM nt)
)sql");

/// Deletes a prefix of the change log (every row up to the last one older than change_keep)
/// and records where it ends in `trimmed`.
const std::string trim_sql = std::string(R"sql(
WITH cut AS (
  SELECT max(seq) AS upto FROM changes WHERE at < now() - interval ')sql").append(change_keep).append(R"sql('
), del AS (
  DELETE FROM changes WHERE seq <= (SELECT upto FROM cut) RETURNING 1
)
UPDATE trimmed SET upto = cut.upto FROM cut WHERE cut.upto > trimmed.upto
)sql");

/// One statement, so one snapshot: where the log was trimmed to, its last seq, and a page of
/// other servers' changes after $1 (or one row of NULLs after those two if there are none).
const std::string changes_sql = R"sql(
SELECT t.upto, m.top, c.seq, c.kind, c.name, c.delta, c.found, c.ip, c.port, c.online, c.key, c.server
FROM (SELECT upto FROM trimmed LIMIT 1) AS t
CROSS JOIN (SELECT coalesce(max(seq), 0) AS top FROM changes) AS m
LEFT JOIN (
  SELECT c.seq, c.kind, c.name, c.delta, k.name IS NOT NULL AS found, k.ip, k.port, k.online, k.key, k.server
  FROM changes c LEFT JOIN clients k ON c.kind = 0 AND k.name = c.name
  WHERE c.seq > $1 AND c.server <> $2
  ORDER BY c.seq LIMIT $3
) AS c ON true
ORDER BY c.seq
)sql";

/// The whole state (in one REPEATABLE READ transaction with the change log's end, as load()).
const std::string clients_sql = "SELECT name, ip, port, online, key, server FROM clients ORDER BY name";
const std::string counts_sql = "SELECT recipient, count(*) FROM messages GROUP BY recipient";
const std::string log_end_sql = "SELECT greatest(coalesce(max(seq), 0), (SELECT upto FROM trimmed)) FROM changes";

/// Kept files (no change rows: see files_sql). Each answers rows, so that a statement's effect
/// is read from its result in binary like any other value.
const std::string put_file_sql =
    "INSERT INTO files (recipient, transfer, sender, sender_key, ts_us, size, offer, data) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (recipient, transfer) DO NOTHING RETURNING 1";
const std::string files_for_sql =
    "SELECT sender, sender_key, transfer, ts_us, size, offer FROM files "
    "WHERE recipient = $1 ORDER BY ts_us, transfer";
const std::string file_data_sql = "SELECT data FROM files WHERE recipient = $1 AND transfer = $2";
const std::string delete_file_sql = "DELETE FROM files WHERE recipient = $1 AND transfer = $2 RETURNING 1";
// sum(bigint) is numeric: cast back, read as int8.
const std::string file_bytes_sql = "SELECT coalesce(sum(size), 0)::bigint FROM files WHERE recipient = $1";
const std::string expire_files_sql =
    "WITH d AS (DELETE FROM files WHERE ts_us < $1 RETURNING 1) SELECT count(*) FROM d";
const std::string release_files_sql =
    "WITH d AS (DELETE FROM files WHERE recipient = $1 RETURNING 1) SELECT count(*) FROM d";

/// What an operation's completion receives: one result per statement, or an error.
using Completion = std::function<void(std::vector<Result>&&, std::string error)>;

class PgStore final : public AsyncStore {
 public:
  PgStore(net::io_context& io, PgOptions o, Conn first)
      : io_(io), o_(std::move(o)), sock_(io), lease_timer_(io), poll_timer_(io), retry_timer_(io), connect_timer_(io) {
    conn_ = first.release();
    connected();
  }

  PgStore(const PgStore&) = delete;
  PgStore& operator=(const PgStore&) = delete;

  ~PgStore() override {
    close();
    alive_.reset();  // handlers still queued in the io_context find it gone and do nothing
    retry_timer_.cancel();
    connect_timer_.cancel();
    drop_connection();
  }

  Snapshot load() override {
    Snapshot s;
    Conn c = connect_blocking(o_.uri);
    const auto renewed_at = Clock::now();
    exec(c.get(), renew_sql, Params().text(o_.server_id).int8(o_.lease_for.count()), "take the lease");
    std::int64_t last = 0;
    transaction(c.get(), "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", [&] {
      Result clients = exec(c.get(), clients_sql, "load clients");
      Result counts = exec(c.get(), counts_sql, "count messages");
      s = snapshot_of(clients.get(), counts.get());
      Result seq = exec(c.get(), log_end_sql, "read the change log");
      last = Rows(seq.get()).int8(0, 0);
    });
    s.legacy = 0;  // version 1 never wrote to PostgreSQL
    last_seq_ = last;
    renewed_at_ = renewed_at;
    renewed_ = true;
    if (!loaded_ && !closed_) {
      loaded_ = true;
      arm_lease();
      arm_poll();
    }
    read_changes();
    return s;
  }

  /// The snapshot of clients_sql's and counts_sql's results.
  Snapshot snapshot_of(const PGresult* clients, const PGresult* counts) const {
    Snapshot s;
    Rows rows(clients);
    for (int i = 0; i < rows.size(); ++i) {
      s.clients.push_back(ClientRow{
          .name = rows.bytes(i, 0),
          .ip = rows.bytes(i, 1),
          .port = to_port(rows.int4(i, 2)),
          .online = rows.boolean(i, 3),
          .key = rows.bytes(i, 4),
      });
      s.here.push_back(rows.bytes(i, 5) == o_.server_id);
    }
    Rows n(counts);
    for (int i = 0; i < n.size(); ++i) s.mailboxes.emplace(n.bytes(i, 0), static_cast<std::size_t>(n.int8(i, 1)));
    return s;
  }

  void save(std::vector<NewMessage> batch, std::function<void(Reply<std::vector<bool>>)> done) override {
    std::vector<Statement> st;
    const auto n = batch.size();
    if (n > 0) {
      std::vector<std::string> to, from, key, kind, ts, mid, body;
      for (const auto& m : batch) {
        if (m.kind != Kind::direct && m.kind != Kind::channel) {
          fail_soon(done, std::string("offline store: save: unknown message kind ").append(std::to_string(static_cast<int>(m.kind))));
          return;
        }
        to.push_back(m.to);
        from.push_back(m.from);
        key.push_back(m.from_key);
        kind.push_back(be(static_cast<std::uint16_t>(m.kind), 2));
        ts.push_back(be(std::bit_cast<std::uint64_t>(m.ts_us), 8));
        mid.push_back(be(m.mid, 8));
        body.push_back(m.body);
      }
      st.push_back({lock_sql, Params().int8(change_lock)});
      st.push_back({save_sql, Params()
                                  .text(o_.server_id)
                                  .array(text_array_oid, text_oid, to)
                                  .array(text_array_oid, text_oid, from)
                                  .array(bytea_array_oid, bytea_oid, key)
                                  .array(int2_array_oid, int2_oid, kind)
                                  .array(int8_array_oid, int8_oid, ts)
                                  .array(int8_array_oid, int8_oid, mid)
                                  .array(bytea_array_oid, bytea_oid, body)});
    }
    run<std::vector<bool>>(std::move(st), "save", std::move(done), [n](std::vector<Result>& rs) {
      std::vector<bool> flags;
      if (n == 0) return flags;
      Rows rows(rs.at(1).get());
      if (static_cast<std::size_t>(rows.size()) != n) throw StoreError("offline store: save: one flag per message expected");
      // A message twice in one batch joins the one row inserted: the first is the insert.
      std::set<std::int64_t> seen;
      for (int i = 0; i < rows.size(); ++i) flags.push_back(!rows.null(i, 0) && seen.insert(rows.int8(i, 0)).second);
      return flags;
    });
  }

  void pending_for(const std::string& to, Cursor after, std::size_t limit,
                   std::function<void(Reply<std::vector<StoredMessage>>)> done) override {
    constexpr auto max_limit = static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max());
    std::vector<Statement> st;
    st.push_back({pending_sql, Params()
                                   .text(to)
                                   .int8(after.ts_us)
                                   .int8(after.seq)
                                   .int8(static_cast<std::int64_t>(std::min(limit, max_limit)))});
    run<std::vector<StoredMessage>>(std::move(st), "read pending messages", std::move(done), [](std::vector<Result>& rs) {
      std::vector<StoredMessage> out;
      Rows rows(rs.at(0).get());
      for (int i = 0; i < rows.size(); ++i) {
        out.push_back(StoredMessage{
            .seq = rows.int8(i, 0),
            .from = rows.bytes(i, 1),
            .from_key = rows.bytes(i, 2),
            .kind = to_kind(rows.int2(i, 3)),
            .ts_us = rows.int8(i, 4),
            .mid = std::bit_cast<std::uint64_t>(rows.int8(i, 5)),
            .body = rows.bytes(i, 6),
        });
      }
      return out;
    });
  }

  void count_for(const std::string& to, std::function<void(Reply<std::size_t>)> done) override {
    std::vector<Statement> st;
    st.push_back({count_sql, Params().text(to)});
    run<std::size_t>(std::move(st), "count messages", std::move(done), [](std::vector<Result>& rs) {
      return static_cast<std::size_t>(Rows(rs.at(0).get()).int8(0, 0));
    });
  }

  void remove_delivered(const std::string& to, std::vector<std::int64_t> seqs,
                        std::function<void(Reply<bool>)> done) override {
    std::vector<Statement> st;
    if (!seqs.empty()) {
      std::vector<std::string> items;
      for (auto s : seqs) items.push_back(be(std::bit_cast<std::uint64_t>(s), 8));
      st.push_back({lock_sql, Params().int8(change_lock)});
      st.push_back({remove_sql, Params().text(o_.server_id).text(to).array(int8_array_oid, int8_oid, items)});
    }
    run<bool>(std::move(st), "remove delivered messages", std::move(done), [](std::vector<Result>&) { return true; });
  }

  void store_clients(std::vector<RowWrite> rows, std::function<void(Reply<std::vector<bool>>)> done) override {
    // Two statements whatever the number of rows (the rows are one per name): the
    // registrations, then the online flags, each over arrays.
    std::vector<std::size_t> here, flag_only;  // positions in `rows`
    std::vector<std::string> r_name, r_ip, r_port, r_online, r_key;
    std::vector<std::string> o_name, o_online, o_ip, o_port;
    std::set<std::string_view> names;
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const auto& r = rows[i].row;
      if (!names.insert(r.name).second) {
        fail_soon(done, std::string("offline store: store clients: the name ").append(r.name).append(" twice in one write"));
        return;
      }
      const auto port = be(static_cast<std::uint32_t>(r.port), 4);
      const auto online = std::string(1, r.online ? '\1' : '\0');
      if (rows[i].here) {
        here.push_back(i);
        r_name.push_back(r.name);
        r_ip.push_back(r.ip);
        r_port.push_back(port);
        r_online.push_back(online);
        r_key.push_back(r.key);
      } else {
        flag_only.push_back(i);
        o_name.push_back(r.name);
        o_online.push_back(online);
        o_ip.push_back(r.ip);
        o_port.push_back(port);
      }
    }
    std::vector<Statement> st;
    if (!rows.empty()) st.push_back({lock_sql, Params().int8(change_lock)});
    if (!here.empty()) {
      st.push_back({register_sql, Params()
                                      .text(o_.server_id)
                                      .array(text_array_oid, text_oid, r_name)
                                      .array(text_array_oid, text_oid, r_ip)
                                      .array(int4_array_oid, int4_oid, r_port)
                                      .array(bool_array_oid, bool_oid, r_online)
                                      .array(bytea_array_oid, bytea_oid, r_key)});
    }
    if (!flag_only.empty()) {
      st.push_back({online_sql, Params()
                                    .text(o_.server_id)
                                    .array(text_array_oid, text_oid, o_name)
                                    .array(bool_array_oid, bool_oid, o_online)
                                    .array(text_array_oid, text_oid, o_ip)
                                    .array(int4_array_oid, int4_oid, o_port)});
    }
    run<std::vector<bool>>(std::move(st), "store clients", std::move(done),
                           [n = rows.size(), here = std::move(here), flag_only = std::move(flag_only)](std::vector<Result>& rs) {
      std::vector<bool> flags(n, false);
      std::size_t next = 1;  // after the lock
      for (const auto* positions : {&here, &flag_only}) {
        if (positions->empty()) continue;
        Rows written(rs.at(next++).get());
        if (static_cast<std::size_t>(written.size()) != positions->size())
          throw StoreError("offline store: store clients: one flag per row expected");
        for (int i = 0; i < written.size(); ++i) flags[(*positions)[static_cast<std::size_t>(i)]] = written.boolean(i, 0);
      }
      return flags;
    });
  }

  bool keeps_files() const override { return true; }

  void put_file(NewFile f, std::function<void(Reply<bool>)> done) override {
    if (f.size > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      fail_soon(done, "offline store: keep file: the size is out of range");
      return;
    }
    std::vector<Statement> st;
    st.push_back({put_file_sql, Params()
                                    .text(f.to)
                                    .int8(std::bit_cast<std::int64_t>(f.transfer))
                                    .text(f.from)
                                    .bytes(f.from_key)
                                    .int8(f.ts_us)
                                    .int8(static_cast<std::int64_t>(f.size))
                                    .bytes(f.offer)
                                    .owned_bytes(std::move(f.data))});  // up to --max-file-size: moved, not copied
    run<bool>(std::move(st), "keep file", std::move(done),
              [](std::vector<Result>& rs) { return Rows(rs.at(0).get()).size() == 1; });
  }

  void files_for(const std::string& to, std::function<void(Reply<std::vector<HeldFile>>)> done) override {
    std::vector<Statement> st;
    st.push_back({files_for_sql, Params().text(to)});
    run<std::vector<HeldFile>>(std::move(st), "list files", std::move(done), [](std::vector<Result>& rs) {
      std::vector<HeldFile> out;
      Rows rows(rs.at(0).get());
      for (int i = 0; i < rows.size(); ++i) {
        out.push_back(HeldFile{
            .from = rows.bytes(i, 0),
            .from_key = rows.bytes(i, 1),
            .transfer = std::bit_cast<std::uint64_t>(rows.int8(i, 2)),
            .ts_us = rows.int8(i, 3),
            .size = to_size(rows.int8(i, 4)),
            .offer = rows.bytes(i, 5),
        });
      }
      return out;
    });
  }

  void file_data(const std::string& to, std::uint64_t transfer,
                 std::function<void(Reply<std::optional<std::string>>)> done) override {
    std::vector<Statement> st;
    st.push_back({file_data_sql, Params().text(to).int8(std::bit_cast<std::int64_t>(transfer))});
    run<std::optional<std::string>>(std::move(st), "read file", std::move(done), [](std::vector<Result>& rs) {
      Rows rows(rs.at(0).get());
      if (rows.size() == 0) return std::optional<std::string>();
      return std::optional<std::string>(rows.bytes(0, 0));
    });
  }

  void delete_file(const std::string& to, std::uint64_t transfer, std::function<void(Reply<bool>)> done) override {
    std::vector<Statement> st;
    st.push_back({delete_file_sql, Params().text(to).int8(std::bit_cast<std::int64_t>(transfer))});
    run<bool>(std::move(st), "delete file", std::move(done),
              [](std::vector<Result>& rs) { return Rows(rs.at(0).get()).size() == 1; });
  }

  void file_bytes_for(const std::string& to, std::function<void(Reply<std::uint64_t>)> done) override {
    std::vector<Statement> st;
    st.push_back({file_bytes_sql, Params().text(to)});
    run<std::uint64_t>(std::move(st), "count file bytes", std::move(done),
                       [](std::vector<Result>& rs) { return to_size(Rows(rs.at(0).get()).int8(0, 0)); });
  }

  void expire_files(std::int64_t before_us, std::function<void(Reply<std::size_t>)> done) override {
    std::vector<Statement> st;
    st.push_back({expire_files_sql, Params().int8(before_us)});
    run<std::size_t>(std::move(st), "expire files", std::move(done), [](std::vector<Result>& rs) {
      return static_cast<std::size_t>(Rows(rs.at(0).get()).int8(0, 0));
    });
  }

  void watch(std::function<void(const Change&)> on_change) override {
    on_change_ = std::move(on_change);
    read_changes();
  }

  std::optional<bool> lease_held() const override {
    return loaded_ && renewed_ && Clock::now() - renewed_at_ < o_.lease_for;
  }

  void close() override {
    closed_ = true;
    lease_timer_.cancel();
    poll_timer_.cancel();
    retry_timer_.cancel();
  }

 private:
  /// One operation in the pipeline: its statements' results until its sync point.
  struct Pending {
    std::string what;
    Completion done;
    std::vector<Result> results{};
    std::string error{};
  };

  enum class State { down, connecting, ready };

  /// Wraps a handler so that it does nothing once the store is gone.
  template <class F>
  auto guarded(F f) {
    return [w = std::weak_ptr<int>(alive_), f = std::move(f)](auto&&... args) mutable {
      if (w.expired()) return;
      f(std::forward<decltype(args)>(args)...);
    };
  }

  /// Answers `done` with `error` from the io_context, never inside the call that asked.
  template <class T>
  void fail_soon(std::function<void(Reply<T>)>& done, std::string error) {
    if (!done) return;
    net::post(io_, [done = std::move(done), error = std::move(error)] {
      Reply<T> r;
      r.error = error;
      done(std::move(r));
    });
  }

  /// Submits statements as one transaction and decodes the results into the reply.
  template <class T, class Decode>
  void run(std::vector<Statement> st, std::string what, std::function<void(Reply<T>)> done, Decode decode) {
    submit(std::move(st), std::move(what),
           [done = std::move(done), decode = std::move(decode)](std::vector<Result>&& rs, std::string error) mutable {
             Reply<T> r;
             if (error.empty()) {
               try {
                 r.value = decode(rs);
               } catch (const std::exception& e) {
                 r.error = e.what();
               }
             } else {
               r.error = std::move(error);
             }
             if (done) done(std::move(r));
           });
  }

  /// Sends the statements and a sync point (one implicit transaction: an error rolls back all
  /// of it). While the database is unreachable the completion gets the reason, posted.
  void submit(std::vector<Statement> st, std::string what, Completion done) {
    if (state_ != State::ready) {
      net::post(io_, [done = std::move(done), error = unreachable_] { done({}, error); });
      return;
    }
    inflight_.push_back(Pending{std::move(what), std::move(done)});
    std::vector<const char*> values;
    std::vector<int> lengths;
    std::vector<int> formats;
    for (const auto& s : st) {
      s.params.bind(values, lengths, formats);
      if (!PQsendQueryParams(conn_, s.sql.c_str(), s.params.size(), s.params.types(), values.data(), lengths.data(),
                             formats.data(), 1)) {
        lost(trimmed(PQerrorMessage(conn_)));
        return;
      }
    }
    if (!PQpipelineSync(conn_)) {
      lost(trimmed(PQerrorMessage(conn_)));
      return;
    }
    flush();
  }

  void flush() {
    if (state_ != State::ready) return;
    const int r = PQflush(conn_);
    if (r < 0) {
      lost(trimmed(PQerrorMessage(conn_)));
      return;
    }
    // Blocked on writing, libpq reads what the server sent meanwhile (so neither side stalls):
    // results may now wait in its buffer with no readiness left to report them.
    if (r > 0) post_read();
    if (r > 0 && !writing_) {
      writing_ = true;
      sock_.async_wait(net::posix::stream_descriptor::wait_write, guarded([this, g = gen_](const error_code& ec) {
                         if (g != gen_) return;
                         writing_ = false;
                         if (!ec) flush();
                       }));
    }
  }

  void post_read() {
    if (read_posted_) return;
    read_posted_ = true;
    net::post(io_, guarded([this, g = gen_] {
      read_posted_ = false;
      if (g == gen_ && state_ == State::ready) on_readable();
    }));
  }

  void arm_read() {
    if (reading_ || state_ != State::ready) return;
    reading_ = true;
    sock_.async_wait(net::posix::stream_descriptor::wait_read, guarded([this, g = gen_](const error_code& ec) {
                       if (g != gen_) return;
                       reading_ = false;
                       if (!ec) on_readable();
                     }));
  }

  /// Edge-triggered readiness: read until the socket has nothing more, or a later wait could
  /// miss data that arrived in one burst with the last.
  bool more_to_read() const {
    pollfd p{PQsocket(conn_), POLLIN, 0};
    return ::poll(&p, 1, 0) > 0;
  }

  void on_readable() {
    const auto g = gen_;
    do {
      if (!PQconsumeInput(conn_)) {
        lost(trimmed(PQerrorMessage(conn_)));
        return;
      }
      drain();
      if (g != gen_ || state_ != State::ready) return;
      bool woken = false;
      while (PGnotify* n = PQnotifies(conn_)) {
        PQfreemem(n);
        woken = true;
      }
      if (woken) read_changes();
      if (g != gen_ || state_ != State::ready) return;
    } while (more_to_read());
    flush();
    arm_read();
  }

  /// Hands each finished operation its results, in the order the operations were submitted.
  void drain() {
    const auto g = gen_;
    int nulls = 0;
    while (g == gen_ && !inflight_.empty() && !PQisBusy(conn_)) {
      PGresult* raw = PQgetResult(conn_);
      if (!raw) {
        // The end of one statement's results; two in a row would mean nothing is coming.
        if (++nulls > 1) break;
        continue;
      }
      nulls = 0;
      Result r(raw);
      auto& op = inflight_.front();
      switch (PQresultStatus(raw)) {
        case PGRES_PIPELINE_SYNC: {
          Pending done = std::move(op);
          inflight_.pop_front();
          finish(done);
          break;
        }
        case PGRES_COMMAND_OK:
        case PGRES_TUPLES_OK:
          op.results.push_back(std::move(r));
          break;
        case PGRES_PIPELINE_ABORTED:  // skipped after an earlier statement failed
          break;
        default:
          if (op.error.empty()) op.error = result_error(raw);
          break;
      }
    }
    if (g == gen_ && PQstatus(conn_) == CONNECTION_BAD) lost(trimmed(PQerrorMessage(conn_)));
  }

  void finish(Pending& p) {
    // A callback that throws must not stop the reading of the results behind it (they would
    // never be answered): it is logged here and the loop goes on.
    try {
      if (p.error.empty()) {
        p.done(std::move(p.results), {});
      } else {
        spdlog::warn("offline store: {} failed: {}", p.what, p.error);
        p.done({}, std::string("offline store: ").append(p.what).append(" failed: ").append(p.error));
      }
    } catch (const std::exception& e) {
      spdlog::error("offline store: the answer to {} failed: {}", p.what, e.what());
    }
  }

  /// The connection is gone: every operation in flight fails (a save among them may have
  /// committed; its sender retries and the retry is recognised as a duplicate).
  void lost(const std::string& why) {
    unreachable_ = std::string("the database is unreachable: ").append(why.empty() ? "connection lost" : why);
    spdlog::warn("offline store: {}; {} operations failed, reconnecting", unreachable_, inflight_.size());
    drop_connection();
    auto ops = std::move(inflight_);
    inflight_.clear();
    for (auto& op : ops) {
      net::post(io_, [done = std::move(op.done), error = unreachable_] { done({}, error); });
    }
    schedule_reconnect();
  }

  void drop_connection() {
    ++gen_;
    state_ = State::down;
    reading_ = writing_ = false;
    reading_changes_ = false;
    lease_in_flight_ = false;
    if (sock_.is_open()) {
      error_code ec;
      sock_.cancel(ec);
      std::ignore = sock_.release();  // libpq owns the socket and closes it in PQfinish
    }
    if (conn_) PQfinish(conn_);
    conn_ = nullptr;
  }

  void schedule_reconnect() {
    if (closed_) return;
    retry_timer_.expires_after(backoff_);
    backoff_ = std::min<std::chrono::milliseconds>(backoff_ * 2, backoff_max);
    retry_timer_.async_wait(guarded([this](const error_code& ec) {
      if (!ec && !closed_) start_connect();
    }));
  }

  void start_connect() {
    const auto values = conn_values(o_.uri);
    conn_ = PQconnectStartParams(conn_keywords.data(), values.data(), 1);
    if (!conn_ || PQstatus(conn_) == CONNECTION_BAD) {
      connect_failed(conn_ ? trimmed(PQerrorMessage(conn_)) : std::string("out of memory"));
      return;
    }
    state_ = State::connecting;
    connect_timer_.expires_after(connect_timeout);
    connect_timer_.async_wait(guarded([this, g = gen_](const error_code& ec) {
      if (!ec && g == gen_ && state_ == State::connecting) connect_failed("connection attempt timed out");
    }));
    connect_wait(PGRES_POLLING_WRITING);  // as the libpq manual says, before the first poll
  }

  /// The socket may change between polls (libpq tries each address in turn): wrap it again.
  void connect_wait(PostgresPollingStatusType want) {
    error_code ec;
    if (sock_.is_open()) std::ignore = sock_.release();
    sock_.assign(PQsocket(conn_), ec);
    if (ec) {
      connect_failed(std::string("cannot watch the socket: ").append(ec.message()));
      return;
    }
    const auto wait = want == PGRES_POLLING_READING ? net::posix::stream_descriptor::wait_read
                                                    : net::posix::stream_descriptor::wait_write;
    sock_.async_wait(wait, guarded([this, g = gen_](const error_code& e) {
                       if (g != gen_ || e || state_ != State::connecting) return;
                       connect_step();
                     }));
  }

  void connect_step() {
    switch (PQconnectPoll(conn_)) {
      case PGRES_POLLING_OK:
        connect_timer_.cancel();
        spdlog::info("offline store: connected to the database again");
        connected();
        return;
      case PGRES_POLLING_FAILED:
        connect_failed(trimmed(PQerrorMessage(conn_)));
        return;
      case PGRES_POLLING_READING:
        connect_wait(PGRES_POLLING_READING);
        return;
      default:
        connect_wait(PGRES_POLLING_WRITING);
        return;
    }
  }

  void connect_failed(const std::string& why) {
    unreachable_ = std::string("the database is unreachable: ").append(why);
    spdlog::debug("offline store: {}", unreachable_);
    drop_connection();
    schedule_reconnect();
  }

  /// A connection is up: pipeline mode, LISTEN, and (once loaded) the lease and the change log
  /// from the last seq read, since notifications sent while away are not replayed.
  void connected() {
    ++gen_;
    error_code ec;
    if (sock_.is_open()) std::ignore = sock_.release();
    if (PQsetnonblocking(conn_, 1) != 0 || !PQenterPipelineMode(conn_)) {
      connect_failed(trimmed(PQerrorMessage(conn_)));
      return;
    }
    sock_.assign(PQsocket(conn_), ec);
    if (ec) {
      connect_failed(std::string("cannot watch the socket: ").append(ec.message()));
      return;
    }
    // libpq prints notices (and a server's goodbye) to stderr unless told otherwise.
    PQsetNoticeProcessor(
        conn_, [](void*, const char* message) { spdlog::debug("offline store: the database says: {}", trimmed(message)); },
        nullptr);
    state_ = State::ready;
    backoff_ = backoff_min;
    unreachable_ = "the database is unreachable: not connected";
    std::vector<Statement> listen;
    listen.push_back({std::string("LISTEN ").append(wake_channel)});
    // Every statement here is a small one; compiling one (JIT) when a young table's estimates
    // are off costs more than running it.
    listen.push_back({"SET jit = off"});
    submit(std::move(listen), "listen", guarded([](std::vector<Result>&&, const std::string&) {}));
    arm_read();
    if (loaded_ && !closed_) {
      renew_lease();
      read_changes();
    }
  }

  void arm_lease() {
    lease_timer_.expires_after(o_.lease_every);
    lease_timer_.async_wait(guarded([this](const error_code& ec) {
      if (ec || closed_) return;
      renew_lease();
      arm_lease();
    }));
  }

  void arm_poll() {
    poll_timer_.expires_after(o_.poll_every);
    poll_timer_.async_wait(guarded([this](const error_code& ec) {
      if (ec || closed_) return;
      read_changes();
      arm_poll();
    }));
  }

  /// Renews this server's lease, then ends the expired leases of others.
  void renew_lease() {
    if (state_ != State::ready || lease_in_flight_ || closed_) return;
    lease_in_flight_ = true;
    const auto sent_at = Clock::now();
    std::vector<Statement> st;
    // The change lock first, before the row lock on our lease, as every writer takes it: a
    // sweep by another server (which holds it and deletes expired leases, ours among them
    // after a long absence) and this renewal never wait for each other in a cycle.
    st.push_back({lock_sql, Params().int8(change_lock)});
    st.push_back({renew_sql, Params().text(o_.server_id).int8(o_.lease_for.count())});
    if (++renewals_ % trim_every_renewals == 0) st.push_back({trim_sql});
    st.push_back({expire_sql});
    submit(std::move(st), "renew the lease", guarded([this, sent_at](std::vector<Result>&& rs, const std::string& error) {
             lease_in_flight_ = false;
             if (!error.empty()) return;
             if (!lease_held().value_or(false)) spdlog::info("offline store: lease of {} held again", o_.server_id);
             renewed_at_ = sent_at;
             renewed_ = true;
             try {
               Rows r(rs.back().get());
               if (r.int8(0, 0) > 0) {
                 spdlog::warn("offline store: {} servers' leases expired; {} of their clients marked offline", r.int8(0, 0),
                              r.int8(0, 1));
               }
             } catch (const std::exception& e) {
               spdlog::warn("{}", e.what());
             }
           }));
  }

  /// Reads the change log after the last seq seen and hands each change to the watcher; one
  /// read at a time, and another at once if a page was full or a wake-up came meanwhile. If the
  /// log was trimmed past what this server had read, it reads the whole state instead.
  void read_changes() {
    if (!loaded_ || !on_change_ || closed_ || state_ != State::ready) return;
    if (reading_changes_) {
      read_again_ = true;
      return;
    }
    reading_changes_ = true;
    read_again_ = false;
    std::vector<Statement> st;
    st.push_back({changes_sql, Params().int8(last_seq_).text(o_.server_id).int8(change_page)});
    submit(std::move(st), "read the change log", guarded([this](std::vector<Result>&& rs, const std::string& error) {
             reading_changes_ = false;
             if (!error.empty()) return;  // read again on the next wake-up or poll
             int count = 0;
             try {
               Rows rows(rs.at(0).get());
               if (rows.int8(0, 0) > last_seq_) return resync();
               const std::int64_t top = rows.int8(0, 1);
               for (int i = 0; i < rows.size() && !rows.null(i, 2); ++i) {
                 ++count;
                 last_seq_ = rows.int8(i, 2);
                 Change c;
                 if (rows.int2(i, 3) == change_mail) {
                   c.what = Change::What::mail;
                   c.to = rows.bytes(i, 4);
                   c.delta = rows.int8(i, 5);
                 } else if (!rows.boolean(i, 6)) {
                   c.what = Change::What::released;  // (or released since: telling it twice does no harm)
                   c.to = rows.bytes(i, 4);
                 } else {
                   c.what = Change::What::client;
                   c.row = ClientRow{
                       .name = rows.bytes(i, 4),
                       .ip = rows.bytes(i, 7),
                       .port = to_port(rows.int4(i, 8)),
                       .online = rows.boolean(i, 9),
                       .key = rows.bytes(i, 10),
                   };
                   c.here = rows.bytes(i, 11) == o_.server_id;
                 }
                 if (on_change_) on_change_(c);
                 if (closed_) return;
               }
               // A page not full held every other server's change up to the log's end: what
               // lies between is this server's own, not read back.
               if (count < change_page) last_seq_ = std::max(last_seq_, top);
             } catch (const std::exception& e) {
               spdlog::error("offline store: reading the change log: {}", e.what());
               return;
             }
             if (count == change_page || read_again_) read_changes();
           }));
  }

  /// Reads the whole state and hands it to the watcher as one resync change, then goes on
  /// reading the log from where that state ends.
  void resync() {
    spdlog::warn("offline store: changes after {} were trimmed from the log before {} read them; reading the whole state",
                 last_seq_, o_.server_id);
    reading_changes_ = true;
    std::vector<Statement> st;
    st.push_back({"BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"});
    st.push_back({clients_sql});
    st.push_back({counts_sql});
    st.push_back({log_end_sql});
    st.push_back({"COMMIT"});
    submit(std::move(st), "read the whole state", guarded([this](std::vector<Result>&& rs, const std::string& error) {
             reading_changes_ = false;
             if (!error.empty()) return;  // the next wake-up or poll finds the gap again
             Change c;
             c.what = Change::What::resync;
             try {
               c.snapshot = std::make_shared<const Snapshot>(snapshot_of(rs.at(1).get(), rs.at(2).get()));
               last_seq_ = Rows(rs.at(3).get()).int8(0, 0);
             } catch (const std::exception& e) {
               spdlog::error("offline store: reading the whole state: {}", e.what());
               return;
             }
             if (on_change_) on_change_(c);
             if (!closed_) read_changes();
           }));
  }

  net::io_context& io_;
  PgOptions o_;
  std::shared_ptr<int> alive_ = std::make_shared<int>(0);
  PGconn* conn_ = nullptr;
  net::posix::stream_descriptor sock_;
  net::steady_timer lease_timer_;
  net::steady_timer poll_timer_;
  net::steady_timer retry_timer_;
  net::steady_timer connect_timer_;
  State state_ = State::down;
  std::uint64_t gen_ = 0;  // bumped with every connection change: older handlers do nothing
  bool reading_ = false;
  bool writing_ = false;
  bool read_posted_ = false;
  bool closed_ = false;
  bool loaded_ = false;
  std::deque<Pending> inflight_;
  std::string unreachable_ = "the database is unreachable: not connected";
  std::chrono::milliseconds backoff_ = backoff_min;

  std::function<void(const Change&)> on_change_;
  std::int64_t last_seq_ = 0;
  bool reading_changes_ = false;
  bool read_again_ = false;

  bool lease_in_flight_ = false;
  bool renewed_ = false;
  Clock::time_point renewed_at_{};
  int renewals_ = 0;
};

}  // namespace

std::unique_ptr<AsyncStore> open_pg_store(net::io_context& io, PgOptions o) {
  if (o.server_id.empty()) throw StoreError("offline store: a server id is needed to share a database");
  Conn c = connect_blocking(o.uri);
  ensure_schema(c.get());
  return std::make_unique<PgStore>(io, std::move(o), std::move(c));
}

Released pg_release(const std::string& uri, const std::string& name) {
  Conn c = connect_blocking(uri);
  ensure_schema(c.get());
  Released out;
  transaction(c.get(), "BEGIN", [&] {
    exec(c.get(), lock_sql, Params().int8(change_lock), "lock the change log");
    Result key = exec(c.get(), "SELECT key FROM clients WHERE name = $1 FOR UPDATE", Params().text(name), "read binding");
    Rows k(key.get());
    if (k.size() > 0) {
      out.found = true;
      out.key = k.bytes(0, 0);
    }
    exec(c.get(), "DELETE FROM clients WHERE name = $1", Params().text(name), "release name");
    Result del = exec(c.get(), "WITH d AS (DELETE FROM messages WHERE recipient = $1 RETURNING 1) SELECT count(*) FROM d",
                      Params().text(name), "delete released messages");
    out.messages = static_cast<std::size_t>(Rows(del.get()).int8(0, 0));
    // Kept files count in nothing a server holds: deleted without a change row.
    Result files = exec(c.get(), release_files_sql, Params().text(name), "delete released files");
    out.files = static_cast<std::size_t>(Rows(files.get()).int8(0, 0));
    // Running servers read a client change whose row is gone as the name released (they unbind
    // it, and end its session), and drop the mailbox count by the delta.
    exec(c.get(), "INSERT INTO changes (server, kind, name) VALUES ('release', 0, $1)", Params().text(name), "log release");
    if (out.messages > 0) {
      exec(c.get(), "INSERT INTO changes (server, kind, name, delta) VALUES ('release', 1, $1, $2)",
           Params().text(name).int8(-static_cast<std::int64_t>(out.messages)), "log release");
    }
    exec(c.get(), std::string("NOTIFY ").append(wake_channel), "notify");
  });
  return out;
}

}  // namespace chat::offline
