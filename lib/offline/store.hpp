// The durable store behind the server: offline messages per recipient and the client table.
#pragma once

#include <compare>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace chat::offline {

/// Whether a saved message was sent to one peer or to the channel.
enum class Kind : std::uint8_t { direct = 0, channel = 1 };

/// A message handed to the store; `mid` is the sender's message id (for de-duplication at the reader).
/// `body` is what the sender made of it: sealed for the recipient (direct) or signed (channel);
/// the store never sees a direct message's text.
struct NewMessage {
  std::string to;
  std::string from;
  std::string from_key{};  // the 32-byte identity `from` was bound to when it arrived
  Kind kind = Kind::direct;
  std::int64_t ts_us = 0;  // server arrival time, microseconds since the Unix epoch
  std::uint64_t mid = 0;
  std::string body;
};

/// A position in one recipient's messages, which are read in (ts_us, seq) order; the default is before the first.
struct Cursor {
  std::int64_t ts_us = std::numeric_limits<std::int64_t>::min();
  std::int64_t seq = 0;  // seqs start at 1, so the default precedes a message stamped with the lowest ts_us too

  /// Orders by ts_us, then seq: the order pending_for reads in.
  friend constexpr auto operator<=>(const Cursor&, const Cursor&) = default;
};

/// A message read back; `seq` is the store's own, strictly increasing in commit order.
struct StoredMessage {
  std::int64_t seq = 0;
  std::string from;
  std::string from_key{};
  Kind kind = Kind::direct;
  std::int64_t ts_us = 0;
  std::uint64_t mid = 0;
  std::string body;

  /// This message's position: pending_for(to, m.cursor(), n) continues after it.
  Cursor cursor() const noexcept { return Cursor{ts_us, seq}; }
};

/// One row of the persisted client table: also the binding of the name to its identity.
struct ClientRow {
  std::string name;
  std::string ip;  // dotted-decimal IPv4
  std::uint16_t port = 0;
  bool online = false;
  std::string key{};  // the 32-byte identity the name is bound to (empty: not bound yet)
};

/// What release() removed.
struct Released {
  bool found = false;    // the name had a row
  std::string key;       // the identity it was bound to (empty if none)
  std::size_t messages = 0;  // saved messages for it, sealed for that identity, now deleted
  std::size_t files = 0;     // files kept for it, likewise deleted
};

/// A file the server keeps for an offline recipient (SPEC §12). Both parts are sealed by the
/// sender for the recipient: the offer (identity::seal_file of a files::ctl::Offer, which holds
/// the file's key) and the data (the file's chunks, each sealed with that key); the store never
/// sees its name or its contents.
struct NewFile {
  std::string to;
  std::string from;
  std::string from_key{};    // the 32-byte identity `from` was bound to when it was uploaded
  std::uint64_t transfer = 0;  // the sender's id for it (the offer's), unique per recipient
  std::int64_t ts_us = 0;    // server arrival time, microseconds since the Unix epoch
  std::uint64_t size = 0;    // the file's plaintext bytes
  std::string offer;
  std::string data;          // the sealed chunks, in index order, back to back
};

/// A kept file as listed for its recipient: everything but the data.
struct HeldFile {
  std::string from;
  std::string from_key{};
  std::uint64_t transfer = 0;
  std::int64_t ts_us = 0;
  std::uint64_t size = 0;
  std::string offer;
  bool operator==(const HeldFile&) const = default;
};

/// Raised when the store cannot be opened or written (bad schema version, I/O error, full disk).
class StoreError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The store's interface: the registry and server never see SQL.
class Store {
 public:
  virtual ~Store() = default;

  /// Saves the batch in one transaction, durable on return. One flag per message, in order: false if a message
  /// with its (to, from, mid) was already stored (also earlier in the same batch), true if it was inserted.
  [[nodiscard]] virtual std::vector<bool> save(std::span<const NewMessage> batch) = 0;
  /// Up to `limit` messages for `to` positioned after `after`, in (ts_us, seq) order: oldest arrival first.
  virtual std::vector<StoredMessage> pending_for(const std::string& to, Cursor after, std::size_t limit) = 0;
  /// Number of messages waiting for `to`.
  virtual std::size_t count_for(const std::string& to) = 0;
  /// Deletes the given messages of `to` (delivered and acknowledged), in one transaction.
  virtual void remove_delivered(const std::string& to, std::span<const std::int64_t> seqs) = 0;

  /// Inserts or replaces the rows, in one transaction.
  virtual void store_clients(std::span<const ClientRow> rows) = 0;
  /// Every persisted client row, in name order.
  virtual std::vector<ClientRow> load_clients() = 0;

  /// Removes `name`'s row (its binding to an identity) and the messages saved for it, in one
  /// transaction (the operator's --release-name).
  virtual Released release(const std::string& name) = 0;
  /// Messages saved by protocol version 1 (plain text, from unauthenticated senders): kept, never delivered.
  virtual std::size_t legacy_count() = 0;

  /// Keeps `f`, durable on return. False (nothing changed) if a file with its (to, transfer) is kept already.
  [[nodiscard]] virtual bool put_file(const NewFile& f) = 0;
  /// The files kept for `to`, oldest first.
  virtual std::vector<HeldFile> files_for(const std::string& to) = 0;
  /// The data of `to`'s file `transfer`, or nullopt if none is kept.
  virtual std::optional<std::string> file_data(const std::string& to, std::uint64_t transfer) = 0;
  /// Deletes `to`'s file `transfer`; false if none was kept.
  virtual bool delete_file(const std::string& to, std::uint64_t transfer) = 0;
  /// The plaintext bytes of the files kept for `to` (what its quota counts).
  virtual std::uint64_t file_bytes_for(const std::string& to) = 0;
  /// Deletes every file that arrived before `before_us`; returns how many.
  virtual std::size_t expire_files(std::int64_t before_us) = 0;
};

/// Opens (creating if needed) the SQLite store `chat.db` in `dir` (created if missing), migrating an older schema.
/// Throws StoreError on a newer or unknown schema version or any failure to open.
std::unique_ptr<Store> open_sqlite_store(const std::string& dir);

/// A new, empty store held in memory (see memory_store.hpp), with the SQLite store's semantics and nothing durable.
std::unique_ptr<Store> open_memory_store();

}  // namespace chat::offline
