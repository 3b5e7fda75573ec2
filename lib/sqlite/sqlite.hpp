// A thin RAII layer over SQLite shared by the stores (the server's offline store, the client's
// peer state): a connection, prepared statements, their uses, and transactions.
#pragma once

#include <sqlite3.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>

namespace chat::sqlite {

/// Every failure here throws this. Its message starts with the connection's context and a colon
/// ("peer state: ..."), so the store's own messages and these read alike.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// One connection. `context` names its owner in every error message ("offline store").
/// Single-threaded, like the stores that use it.
class Database {
 public:
  /// Opens (creating it if missing) the database at `path` read-write, with extended result codes,
  /// and makes a statement wait up to busy_timeout_ms for another connection's lock before
  /// failing with SQLITE_BUSY.
  Database(std::string context, const std::string& path, int busy_timeout_ms);

  sqlite3* get() const noexcept { return db_.get(); }
  const std::string& context() const noexcept { return context_; }

  /// Throws Error "<context>: <message>".
  [[noreturn]] void error(std::string_view message) const;
  /// Throws Error "<context>: <what>: <SQLite's message for the last failure>".
  [[noreturn]] void fail(std::string_view what) const;

  /// Runs SQL with no parameters and no rows wanted (schema, pragmas, one-off checks).
  void exec(std::string_view sql, std::string_view what) const;
  /// The first column of the first row of a parameterless query.
  std::int64_t query_int(std::string_view sql) const;
  std::string query_text(std::string_view sql) const;

  /// Runs `body` holding the write lock from its start (BEGIN IMMEDIATE), then commits; if `body`
  /// or the commit throws, rolls back and rethrows. For creating or migrating the schema on open.
  void schema_transaction(const std::function<void()>& body) const;

 private:
  struct Closer {
    void operator()(sqlite3* db) const noexcept {
      // Every statement is finalized before the handle goes, so close cannot be BUSY.
      sqlite3_close(db);
    }
  };

  std::string context_;
  std::unique_ptr<sqlite3, Closer> db_;
};

struct StmtFinalizer {
  void operator()(sqlite3_stmt* stmt) const noexcept { sqlite3_finalize(stmt); }
};

/// A statement prepared once and reused for the life of its owner (a store); the Database must
/// outlive it.
class Statement {
 public:
  Statement(const Database& db, std::string_view sql);

  sqlite3_stmt* get() const noexcept { return stmt_.get(); }
  sqlite3* db() const noexcept { return db_; }
  const std::string& context() const noexcept { return context_; }

 private:
  sqlite3* db_;
  std::string context_;
  std::unique_ptr<sqlite3_stmt, StmtFinalizer> stmt_;
};

/// One use of a prepared statement: binds, steps, and on leaving (also by an exception) resets it,
/// so a half-stepped statement never holds a read transaction open or a dangling bound pointer.
class Use {
 public:
  explicit Use(Statement& s) : s_(s) {}
  Use(const Use&) = delete;
  Use& operator=(const Use&) = delete;
  ~Use();

  // SQLITE_STATIC is safe: the caller's value outlives this Use, and the bindings are cleared
  // before it returns. The explicit byte length keeps embedded NUL bytes.
  Use& text(int idx, const std::string& v);
  /// Bytes as a BLOB (an empty string: a zero-length BLOB, never NULL).
  Use& blob(int idx, const std::string& v);
  /// Bytes as a BLOB (a key, a digest); `what` names the binding in an error message.
  Use& blob(int idx, std::span<const std::uint8_t> v, std::string_view what = "bind blob");
  /// Bytes as a BLOB, or NULL for an empty string.
  Use& blob_or_null(int idx, const std::string& v);
  Use& integer(int idx, std::int64_t v);

  /// Steps once; true while a row is available.
  bool step(std::string_view what);
  /// Steps a statement that returns no rows; the number of rows it changed.
  std::int64_t run(std::string_view what);

  std::int64_t column_int(int col) const;
  bool column_null(int col) const;
  std::string column_text(int col) const;
  std::string column_blob(int col) const;
  /// The BLOB's bytes, valid until the next step or the end of this Use (empty for NULL).
  std::span<const std::uint8_t> column_blob_view(int col) const;

 private:
  void check(int rc, std::string_view what);

  Statement& s_;
};

/// Holds a write transaction; rolls back unless commit() was reached.
class Transaction {
 public:
  Transaction(Statement& begin, Statement& commit, Statement& rollback);
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;
  ~Transaction();

  void commit();

 private:
  Statement& commit_;
  Statement& rollback_;
  bool done_ = false;
};

}  // namespace chat::sqlite
