// Encoding and strict, never-throwing decoding of datagrams.
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
  empty,
  too_large,
  invalid_utf8,
  too_deep,
  not_json,
  not_object,
  bad_version,
  unknown_type,
  missing_field,
  wrong_type,
  bad_name,
  text_too_long,
  bad_value,
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

/// Encodes `m` as one datagram. Never throws: invalid UTF-8 in text is replaced (U+FFFD).
std::string encode(const Message& m);
/// Decodes one datagram. Never throws; refuses anything that is not exactly a valid message.
Decoded decode(std::string_view bytes);

/// Exactly encode(m).size(), counted by encode's own code without building the bytes (no allocation).
std::size_t encoded_size(const Message& m);
/// Sets r.pad so encode(r).size() == min(size, kMaxDatagram), or just past it where none fits exactly.
void pad_to(Register& r, std::size_t size);

/// Id for a request encoded once and sent as copies, each given its own id by set_encoded_id().
/// (The longest u64, so writing the real id over it never makes the datagram longer.)
inline constexpr std::uint64_t kIdPlaceholder = UINT64_MAX;
/// Writes `id` (!= 0) over the kIdPlaceholder id of an encoded request; false, bytes unchanged, if not there.
bool set_encoded_id(std::string& bytes, std::uint64_t id);

// Packing sizes: for any id and items, encode(Stored{id, items}).size() <= stored_overhead() +
// sum of stored_item_size(item), and likewise for a Table with table_overhead() and entry_size().
// So a datagram is filled while that sum stays <= kMaxDatagram, with no byte counted by hand.

/// Bytes `item` adds to a Stored datagram, its separating comma included.
std::size_t stored_item_size(const StoredItem& item);
/// Bytes of a Stored datagram besides its items, for the longest id.
std::size_t stored_overhead();
/// Bytes `e` adds to a Table datagram, its separating comma included.
std::size_t entry_size(const Entry& e);
/// Bytes of a Table datagram besides its entries, for the longest id, epoch, from, to and more.
std::size_t table_overhead();

/// True if `name` is 1-32 of [A-Za-z0-9_.-], not starting with '.'.
bool valid_name(std::string_view name);
/// True if `s` is well-formed UTF-8.
bool valid_utf8(std::string_view s);
/// True if `s` is a dotted-decimal IPv4 address.
bool valid_ipv4(std::string_view s);
/// Bytes `text` takes once JSON-escaped (without quotes), as encode() writes it.
std::size_t escaped_size(std::string_view text);
/// Why `text` cannot be carried, or an empty string if it can (checked at the prompt).
std::string check_text(std::string_view text);

}  // namespace chat::protocol
