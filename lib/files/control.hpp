// The control messages of a file transfer: what the two peers say to each other about a file
// (offer, accept, decline, cancel, done). Each is the payload of a sealed file body
// (identity::seal_file), so it travels in a Direct datagram, reliably, answered by a receipt.
// Plain code: layouts and their bounds-checked decoding, no I/O.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "files/partial.hpp"
#include "files/ranges.hpp"
#include "files/wire.hpp"

namespace chat::files {

/// Longest offered name, in bytes (the receiver reduces it to a safe basename anyway).
inline constexpr std::size_t kMaxOfferedName = 255;
/// Most have-ranges an accept carries: a receiver holding more gaps asks again for a little
/// more than it lacks (only ranges it holds whole are claimed).
inline constexpr std::size_t kMaxAcceptRanges = 64;

namespace ctl {
/// Sender -> receiver: "I offer this file". `transfer` names it in every later message and
/// chunk; `key` encrypts its chunks.
struct Offer {
  std::uint64_t transfer = 0;
  std::uint64_t size = 0;
  Hash hash{};
  FileKey key{};
  std::string name;
  /// The chunk ciphers the sender can use (files::Cipher bits; XChaCha20-Poly1305's always set).
  std::uint8_t ciphers = static_cast<std::uint8_t>(Cipher::xchacha20poly1305);
  bool operator==(const Offer&) const = default;
};
/// Receiver -> sender: "send it, sealed with `cipher`; I already hold these chunks" (resume).
struct Accept {
  std::uint64_t transfer = 0;
  std::vector<Range> have;
  Cipher cipher = Cipher::xchacha20poly1305;  // one of the offer's
  bool operator==(const Accept&) const = default;
};
struct Decline {
  std::uint64_t transfer = 0;
  bool operator==(const Decline&) const = default;
};
/// Either side: the transfer stops (the receiver keeps what it verified, to resume).
struct Cancel {
  std::uint64_t transfer = 0;
  bool operator==(const Cancel&) const = default;
};
/// Receiver -> sender: the whole file arrived, and what became of it.
struct Done {
  enum class Result : std::uint8_t { saved = 0, mismatch = 1, failed = 2 };
  std::uint64_t transfer = 0;
  Result result = Result::saved;
  bool operator==(const Done&) const = default;
};
}  // namespace ctl

using Control = std::variant<ctl::Offer, ctl::Accept, ctl::Decline, ctl::Cancel, ctl::Done>;

/// The payload of `c`; throws std::length_error for a name longer than kMaxOfferedName or more
/// than kMaxAcceptRanges ranges.
std::string encode(const Control& c);
/// The control message in `payload`, or nullopt if it is not exactly one well-formed message
/// (unknown op, truncated, trailing bytes, a transfer id 0, a range empty or out of order, an
/// empty name, an offer without XChaCha20-Poly1305, an accept of an unknown cipher). Bits of
/// ciphers this build does not know are kept in Offer::ciphers, never chosen. An offer or an
/// accept of an earlier build, which ends before its cipher byte, is taken as XChaCha20-Poly1305.
/// Never throws.
std::optional<Control> decode(std::string_view payload);

/// The transfer id a control message names.
std::uint64_t transfer_of(const Control& c);

}  // namespace chat::files
