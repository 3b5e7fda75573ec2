// The client's own durable state about its peers: pinned keys, verified marks, blocks, messages seen.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "protocol/messages.hpp"

namespace chat::identity {

/// A message whose sender's clock says it is older than this is refused (and its replay record pruned).
inline constexpr std::uint64_t kMaxMessageAgeMs = 365ull * 24 * 3600 * 1000;
/// A message whose sender's clock is this far ahead of ours is refused.
inline constexpr std::uint64_t kMaxClockAheadMs = 24ull * 3600 * 1000;

/// One SQLite file per local name (or ":memory:" in simulations). Single-threaded: one connection,
/// used from the client's one thread. Every failure throws std::runtime_error with a clear message.
/// A moved-from PeerState may only be assigned to or destroyed.
///
/// One process at a time: opening takes an exclusive lock (flock on `<file>.lock`, and SQLite's
/// own lock on the file, held until the PeerState is gone), and a second open of the same file,
/// from this process or another, is refused ("... is in use by another ChatApp process ...").
/// Pins, pending keys, verified marks and blocks are read into memory when the file is opened and
/// answered from there; every change is committed to the file before it returns.
class PeerState {
 public:
  /// How a name's key compares with what was pinned for it.
  enum class Seen { first, same, changed };

  /// Opens (creating it, its directories 0700 and the file 0600, if new) the state in `file`, and
  /// prunes replay records that fell out of the window at now_ms (ms since the Unix epoch).
  /// Throws if another PeerState holds `file` open.
  PeerState(const std::filesystem::path& file, std::uint64_t now_ms);
  /// The same, pruning at the system clock's time.
  explicit PeerState(const std::filesystem::path& file);
  PeerState(PeerState&&) noexcept;
  PeerState& operator=(PeerState&&) noexcept;
  ~PeerState();

  // ---- Pins: the key first seen for a name, kept until the user trusts another. ----

  /// Pins a name's key on first sight; a different one is kept pending (the pin stays) and is
  /// reported as changed each time, until trust(name).
  Seen observe(const std::string& name, const protocol::Key& key);
  /// The key pinned for `name`, if any.
  std::optional<protocol::Key> pinned(const std::string& name) const;
  /// The different key last seen for `name`, waiting for trust(name), if any.
  std::optional<protocol::Key> pending(const std::string& name) const;
  /// Whether a different key waits for trust(name).
  bool changed(const std::string& name) const;
  /// Replaces the pin by the pending key and clears the verified mark; false if nothing was pending.
  bool trust(const std::string& name);
  /// Marks the pinned key of `name` verified (fingerprints compared); false if nothing is pinned.
  bool verify(const std::string& name);
  /// Whether the user marked the pinned key of `name` verified.
  bool verified(const std::string& name) const;

  // ---- Blocks, kept by key: a blocked identity stays blocked under another name. ----

  /// Blocks `key`, remembered under `name` for unblock and the list.
  void block(const std::string& name, const protocol::Key& key);
  /// Unblocks every key blocked under `name`; false if none was.
  bool unblock(const std::string& name);
  /// Whether `key` is blocked.
  bool blocked(const protocol::Key& key) const;
  /// The names blocked keys were blocked under, sorted, each once.
  std::vector<std::string> blocked_names() const;

  // ---- Replay memory ----

  /// True, once recorded durably, for a (sender, kind, mid) never seen before whose sent_ms is within
  /// [now_ms - kMaxMessageAgeMs, now_ms + kMaxClockAheadMs]; false for a repeat or a time outside it.
  bool first_seen(const protocol::Key& sender, std::uint8_t kind, std::uint64_t mid, std::uint64_t sent_ms,
                  std::uint64_t now_ms);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace chat::identity
