// What is sealed and signed on the wire (design v2): direct bodies, receipts, channel bodies,
// registration proofs and the server's tokens. Every check returns false/nullopt, never throws.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "identity/identity.hpp"
#include "protocol/messages.hpp"

namespace chat::identity {

/// What box() adds to its plaintext: a 24-byte random nonce and a 16-byte MAC.
inline constexpr std::size_t kBoxOverhead = 24 + 16;
/// What a sealed direct body adds to its text: the box, kind, mid, sent_ms and the longest `to` name.
inline constexpr std::size_t kDirectOverhead = kBoxOverhead + 1 + 8 + 8 + 1 + protocol::kMaxName;
/// The largest sealed receipt: the box around kind, mid and the longest `to` name.
inline constexpr std::size_t kReceiptMaxSize = kBoxOverhead + 1 + 8 + 1 + protocol::kMaxName;
/// What a signed channel body adds to its text: the signature and sent_ms.
inline constexpr std::size_t kChannelOverhead = 64 + 8;
/// How long a server token stays valid after it was minted.
inline constexpr std::int64_t kTokenLifetimeUs = 60'000'000;
/// A server token's size: its time (i64) and its 32-byte MAC.
inline constexpr std::size_t kTokenSize = 8 + 32;

static_assert(protocol::kMaxText + kDirectOverhead <= protocol::kMaxBody, "a full direct message must fit a body");
static_assert(protocol::kMaxText + kChannelOverhead <= protocol::kMaxBody, "a full channel message must fit a body");
static_assert(kReceiptMaxSize <= protocol::kMaxBody, "a receipt must fit a body");
static_assert(kTokenSize <= protocol::kMaxToken, "a token must fit the token field");

/// The pairwise key between me and one peer (crypto_box_beforenm), computed once; wiped when it goes.
/// Movable, not copyable.
class Pair {
 public:
  /// Precomputes the key; a peer key that is not a valid Ed25519 point gives a Pair that is not valid().
  Pair(const Identity& me, const protocol::Key& peer);
  Pair(Pair&& other) noexcept;
  Pair& operator=(Pair&& other) noexcept;
  Pair(const Pair&) = delete;
  Pair& operator=(const Pair&) = delete;
  ~Pair();

  /// Whether the peer's key converted and the shared key could be computed.
  bool valid() const noexcept { return valid_; }
  /// The peer's Ed25519 key this pair was made for.
  const protocol::Key& peer() const noexcept { return peer_; }
  /// box(plaintext) = random nonce || crypto_box_easy_afternm(plaintext); throws std::logic_error if !valid().
  std::string seal(std::string_view plaintext) const;
  /// The plaintext of a box sealed by either side of this pair, or nullopt if it does not open.
  std::optional<std::string> open(std::string_view box) const;

 private:
  void wipe() noexcept;

  protocol::Key peer_{};
  std::array<std::uint8_t, 32> shared_{};
  bool valid_ = false;
};

/// A direct or channel message once opened and checked.
struct Opened {
  std::uint64_t mid = 0;
  std::uint64_t sent_ms = 0;  // the sender's clock, ms since the Unix epoch
  std::string text;
  bool operator==(const Opened&) const = default;
};

/// The sealed body of direct message `mid` to `to`; throws std::length_error if `to` is longer than
/// kMaxName or `text` than kMaxText, std::logic_error for an invalid pair.
std::string seal_direct(const Pair& pair, std::uint64_t mid, std::uint64_t sent_ms, std::string_view to,
                        std::string_view text);
/// The message in a direct body sealed for `me`: kind, `to == me`, text length and UTF-8 checked;
/// the caller checks the mid against the datagram's. open_addressed_body() less its file kind.
std::optional<Opened> open_direct(const Pair& pair, std::string_view body, std::string_view me);

/// The longest payload of a file control message: what a body holds after the box, kind, mid,
/// sent_ms and the longest `to` name.
inline constexpr std::size_t kMaxFilePayload = protocol::kMaxBody - kDirectOverhead;

/// The sealed body of file control message `mid` to `to` (lib/files lays out `payload`); sent in
/// a Direct datagram, answered by a receipt like a message. Throws like seal_direct (and
/// std::length_error for a payload longer than kMaxFilePayload).
std::string seal_file(const Pair& pair, std::uint64_t mid, std::uint64_t sent_ms, std::string_view to,
                      std::string_view payload);

/// What a sealed Direct body held, once opened: a direct message or a file control message.
struct OpenedBody {
  enum class Kind { direct, file };
  Kind kind = Kind::direct;
  Opened message;  // a file control message's payload is in message.text, as bytes
  bool operator==(const OpenedBody&) const = default;
};

/// The direct message (kind 1: text length and UTF-8 checked) or file control message (kind 3)
/// in a body sealed for `me` (`to == me` checked), opened once; nullopt for anything else. The
/// caller checks the mid against the datagram's.
std::optional<OpenedBody> open_addressed_body(const Pair& pair, std::string_view body, std::string_view me);

/// The sealed receipt of direct message `mid` from `to` (the message's sender); throws like seal_direct.
std::string seal_receipt(const Pair& pair, std::uint64_t mid, std::string_view to);
/// Whether `body` is the receipt of my (`me`) message `mid` sealed by the pair's peer.
bool check_receipt(const Pair& pair, std::string_view body, std::uint64_t mid, std::string_view me);

/// The signed body of channel message `mid` from `from`; throws std::length_error like seal_direct.
std::string sign_channel(const Identity& me, std::string_view from, std::uint64_t mid, std::uint64_t sent_ms,
                         std::string_view text);
/// The message in a channel body, if `key` signed it as `from`'s message `mid` (text length and UTF-8 checked).
std::optional<Opened> open_channel(const protocol::Key& key, std::string_view from, std::uint64_t mid,
                                   std::string_view body);

/// The proof that `me` registers `name` with the server's `token`; throws std::length_error if
/// `name` is longer than kMaxName or `token` than kMaxToken.
protocol::Signature register_proof(const Identity& me, std::string_view name, std::string_view token);
/// Whether `proof` is `key`'s registration proof for `name` and `token`.
bool check_register_proof(const protocol::Key& key, std::string_view name, std::string_view token,
                          const protocol::Signature& proof);

/// The server's registration tokens: a time and a MAC over it, the name, the key and the address,
/// so a token proves the client answered at that address within kTokenLifetimeUs. Movable, not
/// copyable; the secret is wiped when it goes.
class TokenMinter {
 public:
  /// seed 0: a random secret (a real server); otherwise a secret derived from the seed (simulations).
  explicit TokenMinter(std::uint64_t seed = 0);
  TokenMinter(TokenMinter&& other) noexcept;
  TokenMinter& operator=(TokenMinter&& other) noexcept;
  TokenMinter(const TokenMinter&) = delete;
  TokenMinter& operator=(const TokenMinter&) = delete;
  ~TokenMinter();

  /// A token (kTokenSize bytes) for `name` with `key` at ipv4:port (host byte order), minted at now_us.
  std::string mint(std::int64_t now_us, std::string_view name, const protocol::Key& key,
                   std::uint32_t ipv4_host_order, std::uint16_t port) const;
  /// The time a token was minted, if this minter made it for exactly these and 0 <= now - time <= kTokenLifetimeUs.
  std::optional<std::int64_t> check(std::string_view token, std::int64_t now_us, std::string_view name,
                                    const protocol::Key& key, std::uint32_t ipv4_host_order,
                                    std::uint16_t port) const;

 private:
  std::array<std::uint8_t, 32> secret_{};
};

/// Whether `text` is well-formed UTF-8 (no overlong forms, surrogates or code points past U+10FFFF).
bool valid_utf8(std::string_view text) noexcept;

}  // namespace chat::identity
