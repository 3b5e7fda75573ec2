// The store as the server uses it: every call that touches the database answers through a
// callback, so a slow database never blocks the receive loop. An embedded Store (SQLite, memory)
// is adapted by answering inline; the PostgreSQL store answers from the io_context when its
// reply arrives. Several servers sharing one database hear each other's changes through watch().
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "offline/store.hpp"

namespace chat::offline {

/// What a call answers: a value, or why the store failed (the value empty).
template <class T>
struct Reply {
  std::optional<T> value;
  std::string error;
  bool ok() const { return value.has_value(); }
};

/// A client row written by the server: `here` says this server holds the client's session (a
/// registration). A row written with `here` false changes only its online flag, and only if
/// this server still holds the row's session and the row still has this address (the client
/// may have moved to another server since, from the same address or another).
/// A row whose key is set binds the name: refused if the store has it bound to another key.
struct RowWrite {
  ClientRow row;
  bool here = false;
};

/// What the server knows at start (and again after a resync).
struct Snapshot {
  /// Every client row; `here[i]` true if this server holds row i's session (an embedded store:
  /// every row).
  std::vector<ClientRow> clients;
  std::vector<bool> here;
  /// Saved messages per recipient (recipients with none are absent).
  std::unordered_map<std::string, std::size_t> mailboxes;
  /// Messages saved by protocol version 1, kept and never delivered.
  std::size_t legacy = 0;
};

/// A change another server made to the shared state, read from the database's change log.
struct Change {
  enum class What {
    client,    ///< `row` as it is now; `here` true if this server holds its session
    mail,      ///< `to`'s saved messages changed by `delta` (+ saved, - deleted)
    released,  ///< the operator released the name `to`: its row and binding are gone
    /// Changes this server had not read yet were trimmed from the log (it was away longer than
    /// the log keeps them): `snapshot` is the whole state as it is now, replacing what it knew.
    resync,
  } what = What::client;
  ClientRow row{};
  bool here = false;
  std::string to{};
  std::int64_t delta = 0;
  std::shared_ptr<const Snapshot> snapshot{};
};

class AsyncStore {
 public:
  virtual ~AsyncStore() = default;

  /// Read once before the server starts; may block. Throws StoreError.
  virtual Snapshot load() = 0;

  /// Store::save: one flag per message, true if inserted; durable when `done` runs with a value.
  virtual void save(std::vector<NewMessage> batch, std::function<void(Reply<std::vector<bool>>)> done) = 0;
  /// Store::pending_for.
  virtual void pending_for(const std::string& to, Cursor after, std::size_t limit,
                           std::function<void(Reply<std::vector<StoredMessage>>)> done) = 0;
  /// Store::count_for.
  virtual void count_for(const std::string& to, std::function<void(Reply<std::size_t>)> done) = 0;
  /// Store::remove_delivered; `done` may be empty.
  virtual void remove_delivered(const std::string& to, std::vector<std::int64_t> seqs,
                                std::function<void(Reply<bool>)> done) = 0;
  /// Writes the rows, at most one per name (the PostgreSQL store answers an error for a name
  /// twice), in one transaction: one flag per row, false if it was not written (a binding
  /// refused: another server bound the name to another key first; or an online flag for an
  /// address the row no longer has).
  virtual void store_clients(std::vector<RowWrite> rows, std::function<void(Reply<std::vector<bool>>)> done) = 0;

  /// Whether the store keeps files for offline recipients (SPEC §12). Every store built here
  /// does (SQLite, memory, PostgreSQL); one that does not answers every file call with an error.
  virtual bool keeps_files() const { return false; }
  /// Store::put_file: true if kept, false if a file with its (to, transfer) is kept already;
  /// durable when `done` runs with a value.
  virtual void put_file(NewFile f, std::function<void(Reply<bool>)> done);
  /// Store::files_for.
  virtual void files_for(const std::string& to, std::function<void(Reply<std::vector<HeldFile>>)> done);
  /// Store::file_data: the value holds nullopt if no such file is kept.
  virtual void file_data(const std::string& to, std::uint64_t transfer,
                         std::function<void(Reply<std::optional<std::string>>)> done);
  /// Store::delete_file; `done` may be empty.
  virtual void delete_file(const std::string& to, std::uint64_t transfer, std::function<void(Reply<bool>)> done);
  /// Store::file_bytes_for.
  virtual void file_bytes_for(const std::string& to, std::function<void(Reply<std::uint64_t>)> done);
  /// Store::expire_files.
  virtual void expire_files(std::int64_t before_us, std::function<void(Reply<std::size_t>)> done);

  /// Changes other servers make are handed to `on_change`, in the order they were committed,
  /// each once, from the io_context (an embedded store has no other writer: never called).
  virtual void watch(std::function<void(const Change&)> on_change) { (void)on_change; }
  /// A shared store's lease on this server's place among the servers: true while held, false
  /// when lost (the database unreachable); empty for an embedded store.
  virtual std::optional<bool> lease_held() const { return std::nullopt; }
  /// Stops the store's own work (lease, change log reads); pending calls may still answer.
  virtual void close() {}
};

/// Adapts an embedded store: each call runs at once and answers before it returns; a
/// StoreError (or any exception) becomes the reply's error.
std::unique_ptr<AsyncStore> adapt(std::unique_ptr<Store> store);

}  // namespace chat::offline
