// The datagram types of ChatApp's wire protocol, one plain struct each, and their limits.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <variant>
#include <vector>

namespace chat::protocol {

/// Protocol version: the first byte of every datagram; anything else is refused (a version-1
/// JSON datagram, which starts with '{', with an answer an old client can show).
inline constexpr std::uint8_t kVersion = 2;
/// Largest datagram sent or accepted: one Ethernet frame of UDP over IPv4 (1500 - 20 - 8),
/// so no datagram needs IP fragmentation on a common path, where one lost fragment loses all.
inline constexpr std::size_t kMaxDatagram = 1472;
/// Longest message text, in UTF-8 bytes as typed. Sealed and with the largest envelope (a
/// stored-message delivery) it still fits kMaxDatagram.
inline constexpr std::size_t kMaxText = 600;
/// Longest opaque body (a sealed direct message, a signed channel message, a receipt).
inline constexpr std::size_t kMaxBody = 1024;
/// Longest registration token (the server's challenge, echoed back).
inline constexpr std::size_t kMaxToken = 64;
/// Longest client name (SPEC §1).
inline constexpr std::size_t kMaxName = 32;
/// Longest free-text reason in a refusal.
inline constexpr std::size_t kMaxReason = 200;

/// The type codes of file frames: the file data plane (lib/files), carried in the same header
/// but never a Message. Unacknowledged, unretried and not deduplicated by the transport; a
/// Core hands them, undecoded, to its frame handler.
inline constexpr std::uint8_t kFrameChunk = 12;
inline constexpr std::uint8_t kFrameChunkAck = 73;
/// True if a datagram starting with these two bytes is a file frame.
inline constexpr bool is_frame(std::uint8_t version, std::uint8_t type) {
  return version == kVersion && (type == kFrameChunk || type == kFrameChunkAck);
}

/// An Ed25519 public key: the identity a name is bound to.
using Key = std::array<std::uint8_t, 32>;
/// An Ed25519 signature.
using Signature = std::array<std::uint8_t, 64>;

/// One row of the client table as carried on the wire.
struct Entry {
  std::string name;
  std::string ip;  // dotted-decimal IPv4 (4 bytes on the wire)
  std::uint16_t port = 0;
  bool online = false;
  Key key{};  // the identity the server bound the name to
  bool operator==(const Entry&) const = default;
};

// ---- Requests: carry an `id`, are sent reliably and answered by one reply carrying `re`. ----
// The server's requests to a client (Relay, Probe, Table, Stored) name their `recipient`, right
// after the header: a client answers only those meant for its own name, so a process that took
// over another client's old address never answers (and never ACKs away) what was meant for it.

/// Client -> server: register (or come back online) under `name` with identity `key`. Without
/// a token it is answered by Challenge (or RegErr); with the challenge's token and `proof`, the
/// key's signature over it (identity::register_proof), by RegOk or RegErr.
struct Register {
  std::uint64_t id = 0;
  std::string name;
  Key key{};
  /// The client's keep-alive interval in ms (0 = not said): the server ends the session after
  /// 3 of them without a word.
  std::uint64_t every_ms = 0;
  std::string token{};  // empty, or the token of a Challenge
  Signature proof{};  // on the wire only with a token
  bool operator==(const Register&) const = default;
};
/// Client -> server: notified leave of `name`; answered by Ack, or Refused if not from its address.
struct Dereg {
  std::uint64_t id = 0;
  std::string name;
  bool operator==(const Dereg&) const = default;
};
/// Peer -> peer: a direct chat message, sealed for the recipient (identity::seal_direct);
/// answered by Receipt. `id` doubles as the message id.
struct Direct {
  std::uint64_t id = 0;
  std::string from;
  std::string body;
  bool operator==(const Direct&) const = default;
};
/// Client -> server: store `body` (the sealed direct message) for offline `to`; answered by Ack
/// (saved), Exists or Refused. `mid` is the id of the direct message it stands for; `force`
/// skips the liveness probe.
struct Save {
  std::uint64_t id = 0;
  std::string from;
  std::string to;
  std::uint64_t mid = 0;
  bool force = false;
  std::string body;
  bool operator==(const Save&) const = default;
};
/// Client -> server: a channel message signed by its sender (identity::sign_channel, over
/// the sender, this id and the text); answered by Ack once the server holds it.
struct Channel {
  std::uint64_t id = 0;
  std::string from;
  std::string body;
  bool operator==(const Channel&) const = default;
};
/// Server -> client: a channel message relayed as signed; answered by Ack. `mid` is the sender's id.
struct Relay {
  std::uint64_t id = 0;
  std::string recipient{};  // the member it is relayed to
  std::string from;
  std::uint64_t mid = 0;
  std::string body;
  bool operator==(const Relay&) const = default;
};
/// Server -> client: are you there, `recipient`? Answered by Ack.
struct Probe {
  std::uint64_t id = 0;
  std::string recipient{};  // the client the server believes is at the address probed
  bool operator==(const Probe&) const = default;
};
/// Server -> client: every table entry whose last change has a version in (`from`, `to`] of
/// table generation `epoch`. `more` says the sender knew of versions past `to`. Answered by
/// Ack carrying the client's (epoch, have) after applying it.
struct Table {
  std::uint64_t id = 0;
  std::string recipient{};  // the client whose table this updates
  std::uint64_t epoch = 0;
  std::uint64_t from = 0;
  std::uint64_t to = 0;
  bool more = false;
  std::vector<Entry> entries;
  bool operator==(const Table&) const = default;
};
/// One saved message in a delivery: sealed (direct) or signed (channel) by its sender.
struct StoredItem {
  std::string from;
  bool channel = false;
  std::int64_t ts_us = 0;  // server arrival time, microseconds since the Unix epoch
  std::uint64_t mid = 0;
  Key key{};  // the key `from` was bound to when the message was saved
  std::string body;
  bool operator==(const StoredItem&) const = default;
};
/// Server -> client: saved messages, oldest first; answered by Ack, after which they are deleted.
struct Stored {
  std::uint64_t id = 0;
  std::string recipient{};  // the client the messages were saved for
  std::vector<StoredItem> items;
  bool operator==(const Stored&) const = default;
};
/// Client -> server: I am still here, sent every keep-alive interval while registered as `name`;
/// answered by Alive.
struct KeepAlive {
  std::uint64_t id = 0;
  std::string name;
  bool operator==(const KeepAlive&) const = default;
};
/// Client -> server: send me the table row of `name`, which my local table lacks; answered by Found.
struct Lookup {
  std::uint64_t id = 0;
  std::string name;
  bool operator==(const Lookup&) const = default;
};

// Files kept by the server for an offline recipient (SPEC §12). The file's chunks travel as file
// frames (kFrameChunk, kFrameChunkAck) between the client and the server, under the transfer id
// and an ack key the client chose: the server keeps the chunks sealed as the sender sealed them,
// and never holds the key that opens them.

/// Client -> server: I will upload a file of `size` bytes for `to`, as transfer `transfer`
/// (never 0), its chunk_acks tagged with `ack_key`; answered by Ack (send the chunks) or
/// Refused (too large, quota full, `to` unknown, ...).
struct FilePut {
  std::uint64_t id = 0;
  std::string from;
  std::string to;
  std::uint64_t transfer = 0;
  std::uint64_t size = 0;
  Key ack_key{};
  bool operator==(const FilePut&) const = default;
};
/// Client -> server: every chunk of `transfer` is acknowledged; keep the file with its offer
/// `body` (sealed for the recipient); answered by Ack once durable, or Refused.
struct FileCommit {
  std::uint64_t id = 0;
  std::string from;
  std::uint64_t transfer = 0;
  std::string body;
  bool operator==(const FileCommit&) const = default;
};
/// Client -> server: send me (`name`) the kept file `transfer`, my chunk_acks tagged with
/// `ack_key`; answered by Ack (its chunks follow) or Refused (no such file).
struct FileGet {
  std::uint64_t id = 0;
  std::string name;
  std::uint64_t transfer = 0;
  Key ack_key{};
  bool operator==(const FileGet&) const = default;
};
/// Client -> server: delete my (`name`'s) kept file `transfer`: `saved` (downloaded and
/// checked) or declined; answered by Ack.
struct FileDone {
  std::uint64_t id = 0;
  std::string name;
  std::uint64_t transfer = 0;
  bool saved = false;
  bool operator==(const FileDone&) const = default;
};
/// Server -> client: a file kept for `recipient`, offered (one datagram per file, after the saved
/// messages of a registration); answered by Ack. `body` is the sender's sealed offer.
struct FileOffer {
  std::uint64_t id = 0;
  std::string recipient{};
  std::string from;
  std::int64_t ts_us = 0;  // server arrival time, microseconds since the Unix epoch
  std::uint64_t transfer = 0;
  std::uint64_t size = 0;
  Key key{};  // the key `from` was bound to when the file was uploaded
  std::string body;
  bool operator==(const FileOffer&) const = default;
};

// ---- Replies: carry `re`, the id of the request they answer. ----

/// Generic acknowledgement. For a Table, `epoch`/`have` say where the client's table now is.
/// For a Channel, `missed` counts the members that get no copy because their mailbox is full.
struct Ack {
  std::uint64_t re = 0;
  std::uint64_t epoch = 0;
  std::uint64_t have = 0;
  std::uint64_t missed = 0;
  bool operator==(const Ack&) const = default;
};
/// Answer to a Register without a token: sign this token to prove the key and the address.
struct Challenge {
  std::uint64_t re = 0;
  std::string token;
  bool operator==(const Challenge&) const = default;
};
/// Answer to Direct, sealed by the recipient (identity::seal_receipt), so it cannot be forged.
struct Receipt {
  std::uint64_t re = 0;
  std::string body;
  bool operator==(const Receipt&) const = default;
};
/// Registration accepted; `pending` messages wait and will follow as Stored datagrams.
struct RegOk {
  std::uint64_t re = 0;
  std::uint64_t epoch = 0;
  std::uint64_t pending = 0;
  bool operator==(const RegOk&) const = default;
};
/// Registration refused, with a reason to show the user.
struct RegErr {
  std::uint64_t re = 0;
  std::string reason;
  bool operator==(const RegErr&) const = default;
};
/// Answer to Save: `name` answered the server's probe, so deliver directly after all.
struct Exists {
  std::uint64_t re = 0;
  std::string name;
  bool operator==(const Exists&) const = default;
};
/// A request the server will not carry out, with a reason to show the user.
struct Refused {
  std::uint64_t re = 0;
  std::string reason;
  bool operator==(const Refused&) const = default;
};

/// Answer to KeepAlive: whether the server holds a live session for that name at the address
/// the keep-alive came from (false: the client should register again).
struct Alive {
  std::uint64_t re = 0;
  bool live = false;
  bool operator==(const Alive&) const = default;
};
/// Answer to Lookup: `known` says the server has a row for the name, then in `entry`. When not
/// known only `entry.name` is carried (it may be the asked name, or empty).
struct Found {
  std::uint64_t re = 0;
  bool known = false;
  Entry entry;
  bool operator==(const Found&) const = default;
};

using Message = std::variant<Register, Dereg, Direct, Save, Channel, Relay, Probe, Table, Stored,
                             KeepAlive, Lookup, FilePut, FileCommit, FileGet, FileDone, FileOffer,
                             Ack, Challenge, Receipt, RegOk, RegErr, Exists, Refused, Alive, Found>;

/// The request id of a request, or 0 for a reply.
std::uint64_t request_id(const Message& m);
/// The id a reply answers, or 0 for a request.
std::uint64_t reply_to(const Message& m);
/// The name of a message's type ("register", "ack", ...), for logs.
const char* type_name(const Message& m);

}  // namespace chat::protocol
