// The receiver's memory of recent requests: a repeat is answered again, never handed up twice.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <string>
#include <unordered_map>

namespace chat::transport {

/// Identifies one request: its sender's IPv4 address and port, and its id.
struct RequestKey {
  std::uint32_t addr = 0;
  std::uint16_t port = 0;
  std::uint64_t id = 0;
  bool operator==(const RequestKey&) const = default;
};

struct RequestKeyHash {
  std::size_t operator()(const RequestKey& k) const noexcept {
    std::uint64_t h = k.id * 0x9E3779B97F4A7C15ull;
    h ^= (static_cast<std::uint64_t>(k.addr) << 16 | k.port) + 0x7F4A7C15 + (h << 6) + (h >> 2);
    return static_cast<std::size_t>(h);
  }
};

/// Remembers (sender, id) pairs for `window`, at most `capacity` of them (oldest forgotten first).
class DuplicateFilter {
 public:
  enum class Seen { fresh, pending, answered };

  DuplicateFilter(std::size_t capacity, std::chrono::steady_clock::duration window)
      : capacity_(capacity), window_(window) {}

  /// Looks `key` up; a fresh key is recorded as pending. For `answered`, `*reply` is the answer.
  Seen check(const RequestKey& key, std::chrono::steady_clock::time_point now,
             const std::string** reply);
  /// Records the answer sent for `key` (so a repeat gets it again).
  void answer(const RequestKey& key, std::string reply);
  /// Forgets `key`, so a repeat is handed up again (for requests deliberately left unanswered).
  void forget(const RequestKey& key);
  std::size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    std::chrono::steady_clock::time_point seen;
    bool answered = false;
    std::string reply;
  };
  void expire(std::chrono::steady_clock::time_point now);
  void expire_oldest();

  std::size_t capacity_;
  std::chrono::steady_clock::duration window_;
  std::unordered_map<RequestKey, Entry, RequestKeyHash> entries_;
  std::deque<std::pair<std::chrono::steady_clock::time_point, RequestKey>> order_;  // oldest first
};

}  // namespace chat::transport
