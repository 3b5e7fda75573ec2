// Encoding and strict, never-throwing decoding of datagrams: the binary wire format v2
// (docs/PROTOCOL.md §1-§3), and the answer given to a version-1 (JSON) request.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "protocol/messages.hpp"

namespace chat::protocol {

/// Why a datagram was refused; each reason is counted separately.
enum class DecodeError : std::uint8_t {
  none,
  empty,          // zero bytes
  too_large,      // more than kMaxDatagram bytes
  old_version,    // a version-1 (JSON) datagram: the first byte is '{'
  bad_version,    // the first byte is neither kVersion nor '{'
  unknown_type,   // a type code no message has
  truncated,      // the datagram ends inside a field
  trailing,       // bytes left after the last field
  bad_name,       // a name that is not valid_name() (or empty where a name is required)
  text_too_long,  // a length past its limit: body > kMaxBody, token > kMaxToken, reason > kMaxReason
  invalid_utf8,   // a reason that is not well-formed UTF-8
  bad_value,      // id/re 0, a bool not 0/1, Table to < from, port 0, ts_us < 0, a not-known Found with a row
  count_  // number of reasons; keep last
};

/// A short name for a reason, for logs and counters.
const char* to_string(DecodeError e);

/// The result of decode(): a message, or the reason there is none.
struct Decoded {
  std::optional<Message> message;
  DecodeError error = DecodeError::none;
  explicit operator bool() const { return message.has_value(); }
};

/// Encodes `m` as one datagram. Never throws, and never changes what a caller must get right:
/// nothing is clamped except a reason (ours, not the user's: cut to kMaxReason bytes at a
/// character boundary, invalid UTF-8 in it replaced by U+FFFD). For every valid message
/// (names valid_name(), bodies <= kMaxBody, tokens <= kMaxToken, Entry ports != 0, ts_us >= 0,
/// ids != 0, Table from <= to) decode(encode(m)) == m. Callers check those limits first: an
/// out-of-limit field is written as it is (a length past its prefix's range saturates it), so
/// the datagram is refused by decode() with the field's reason, never read as another message.
/// Normalised, not refused: an Entry ip that is not dotted IPv4 is sent as 0.0.0.0; a
/// Register without a token carries no proof; a Found that is not known carries only the name.
std::string encode(const Message& m);
/// Decodes one datagram. Never throws, never reads outside `bytes`; refuses anything that is
/// not exactly the encoding of one valid message (so encode(*decode(b).message) == b).
Decoded decode(std::string_view bytes);

/// Exactly encode(m).size(), counted by encode's own code without building the bytes (no allocation).
std::size_t encoded_size(const Message& m);

/// A server request (Relay, Probe, Table or Stored) encoded once for many recipients: its
/// type and the bytes after its recipient field, which are the same for all of them.
struct Shared {
  std::uint8_t code = 0;
  std::string tail;
};
/// `m`, a Relay, Probe, Table or Stored (its id and recipient are not used), ready to be
/// addressed to each recipient; throws std::invalid_argument for any other type.
Shared share(const Message& m);
/// Exactly encode() of the message `s` was shared from, with id `id` and recipient `recipient`:
/// a copy of the header, the name and the tail, with no encoding work.
std::string address(const Shared& s, std::uint64_t id, std::string_view recipient);

// Packing sizes: for any id and items, encode(Stored{id, recipient, items}).size() ==
// stored_overhead(recipient) + sum of stored_item_size(item), and likewise for a Table with
// table_overhead(recipient) and entry_size() (exact: every field has a fixed or length-prefixed
// size). So a datagram is filled while that sum stays <= kMaxDatagram, with no byte counted by hand.

/// Bytes `item` adds to a Stored datagram.
std::size_t stored_item_size(const StoredItem& item);
/// Bytes of a Stored datagram for `recipient` besides its items (header, recipient and count).
std::size_t stored_overhead(std::string_view recipient);
/// Bytes `e` adds to a Table datagram.
std::size_t entry_size(const Entry& e);
/// Bytes of a Table datagram for `recipient` besides its entries (header, recipient, epoch,
/// from, to, more and count).
std::size_t table_overhead(std::string_view recipient);

/// True if `name` is 1-32 of [A-Za-z0-9_.-], not starting with '.'.
bool valid_name(std::string_view name);
/// True if `s` is well-formed UTF-8.
bool valid_utf8(std::string_view s);
/// Length of the well-formed UTF-8 sequence at the start of `s` (non-empty) and its code point
/// in `cp`; 0 if it is not one (overlong, surrogate, past U+10FFFF, cut short).
std::size_t utf8_sequence(std::string_view s, char32_t& cp);
/// True if `s` is a dotted-decimal IPv4 address.
bool valid_ipv4(std::string_view s);
/// Why `text` cannot be sent, or an empty string if it can (checked at the prompt): not valid
/// UTF-8, or longer than kMaxText bytes. (Sealed with its envelope it then fits a Direct, a
/// Save and a Stored item: docs/PROTOCOL.md §2.)
std::string check_text(std::string_view text);

/// The reason a version-1 peer is given.
inline constexpr std::string_view kV1RefusalReason =
    "this server speaks ChatApp protocol version 2: upgrade ChatApp";
/// If `bytes` is a version-1 (JSON) request — an object with "v":1, a string "t" naming a v1
/// request type and an unsigned "id" != 0 — the v1 JSON answer an old client shows: "reg_err"
/// for a "register", "refused" for any other request, with "re" = its id and the reason
/// kV1RefusalReason. nullopt for anything else (v1 replies, garbage, v2). The answer may be
/// longer than a short request: a sender that must not amplify compares the sizes.
std::optional<std::string> v1_refusal(std::string_view bytes);

}  // namespace chat::protocol
