#include "sqlite/sqlite.hpp"

#include <utility>

namespace chat::sqlite {
namespace {

[[noreturn]] void raise(std::string_view context, std::string_view message) {
  throw Error(std::string(context) + ": " + std::string(message));
}

[[noreturn]] void fail(sqlite3* db, std::string_view context, std::string_view what) {
  raise(context, std::string(what) + ": " + sqlite3_errmsg(db));
}

}  // namespace

Database::Database(std::string context, const std::string& path, int busy_timeout_ms)
    : context_(std::move(context)) {
  sqlite3* raw = nullptr;
  const int rc = sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nullptr);
  db_.reset(raw);  // open_v2 hands back a handle even on failure; it must still be closed
  if (rc != SQLITE_OK) {
    error("cannot open " + path + ": " + (db_ ? sqlite3_errmsg(db_.get()) : sqlite3_errstr(rc)));
  }
  sqlite3_extended_result_codes(db_.get(), 1);
  sqlite3_busy_timeout(db_.get(), busy_timeout_ms);
}

void Database::error(std::string_view message) const { raise(context_, message); }

void Database::fail(std::string_view what) const { sqlite::fail(get(), context_, what); }

void Database::exec(std::string_view sql, std::string_view what) const {
  char* err = nullptr;
  if (sqlite3_exec(get(), std::string(sql).c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : sqlite3_errmsg(get());
    sqlite3_free(err);
    raise(context_, std::string(what) + ": " + msg);
  }
}

std::int64_t Database::query_int(std::string_view sql) const {
  Statement s(*this, sql);
  Use u(s);
  if (!u.step(sql)) error("no result from \"" + std::string(sql) + "\"");
  return u.column_int(0);
}

std::string Database::query_text(std::string_view sql) const {
  Statement s(*this, sql);
  Use u(s);
  if (!u.step(sql)) error("no result from \"" + std::string(sql) + "\"");
  return u.column_text(0);
}

void Database::schema_transaction(const std::function<void()>& body) const {
  exec("BEGIN IMMEDIATE", "begin schema transaction");
  try {
    body();
    exec("COMMIT", "commit schema");
  } catch (...) {
    if (!sqlite3_get_autocommit(get())) sqlite3_exec(get(), "ROLLBACK", nullptr, nullptr, nullptr);
    throw;
  }
}

Statement::Statement(const Database& db, std::string_view sql) : db_(db.get()), context_(db.context()) {
  sqlite3_stmt* raw = nullptr;
  if (sqlite3_prepare_v3(db_, sql.data(), static_cast<int>(sql.size()), SQLITE_PREPARE_PERSISTENT, &raw,
                         nullptr) != SQLITE_OK) {
    db.fail("prepare \"" + std::string(sql) + "\"");
  }
  stmt_.reset(raw);
}

Use::~Use() {
  sqlite3_reset(s_.get());
  sqlite3_clear_bindings(s_.get());
}

Use& Use::text(int idx, const std::string& v) {
  check(sqlite3_bind_text64(s_.get(), idx, v.data(), v.size(), SQLITE_STATIC, SQLITE_UTF8), "bind text");
  return *this;
}

Use& Use::blob(int idx, const std::string& v) {
  check(sqlite3_bind_blob64(s_.get(), idx, v.data(), v.size(), SQLITE_STATIC), "bind blob");
  return *this;
}

Use& Use::blob(int idx, std::span<const std::uint8_t> v, std::string_view what) {
  check(sqlite3_bind_blob64(s_.get(), idx, v.data(), v.size(), SQLITE_STATIC), what);
  return *this;
}

Use& Use::blob_or_null(int idx, const std::string& v) {
  if (v.empty()) check(sqlite3_bind_null(s_.get(), idx), "bind null");
  else blob(idx, v);
  return *this;
}

Use& Use::integer(int idx, std::int64_t v) {
  check(sqlite3_bind_int64(s_.get(), idx, v), "bind integer");
  return *this;
}

bool Use::step(std::string_view what) {
  switch (sqlite3_step(s_.get())) {
    case SQLITE_ROW:
      return true;
    case SQLITE_DONE:
      return false;
    default:
      fail(s_.db(), s_.context(), what);
  }
}

std::int64_t Use::run(std::string_view what) {
  if (step(what)) raise(s_.context(), std::string(what) + ": unexpected row");
  return sqlite3_changes64(s_.db());
}

std::int64_t Use::column_int(int col) const { return sqlite3_column_int64(s_.get(), col); }

bool Use::column_null(int col) const { return sqlite3_column_type(s_.get(), col) == SQLITE_NULL; }

std::string Use::column_text(int col) const {
  // column_text before column_bytes: the byte count is of the converted value.
  const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(s_.get(), col));
  const auto n = static_cast<std::size_t>(sqlite3_column_bytes(s_.get(), col));
  return p ? std::string(p, n) : std::string();
}

std::string Use::column_blob(int col) const {
  const auto bytes = column_blob_view(col);
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

std::span<const std::uint8_t> Use::column_blob_view(int col) const {
  // column_blob before column_bytes, as for text: the byte count is of the value it returned.
  const auto* p = static_cast<const std::uint8_t*>(sqlite3_column_blob(s_.get(), col));
  if (p == nullptr) return {};  // NULL or a zero-length BLOB
  return {p, static_cast<std::size_t>(sqlite3_column_bytes(s_.get(), col))};
}

void Use::check(int rc, std::string_view what) {
  if (rc != SQLITE_OK) fail(s_.db(), s_.context(), what);
}

Transaction::Transaction(Statement& begin, Statement& commit, Statement& rollback)
    : commit_(commit), rollback_(rollback) {
  Use(begin).run("begin transaction");
}

Transaction::~Transaction() {
  // Some errors (full disk, I/O) already rolled back; a second ROLLBACK would only fail.
  if (!done_ && !sqlite3_get_autocommit(rollback_.db())) {
    Use u(rollback_);
    sqlite3_step(rollback_.get());
  }
}

void Transaction::commit() {
  Use(commit_).run("commit");
  done_ = true;
}

}  // namespace chat::sqlite
