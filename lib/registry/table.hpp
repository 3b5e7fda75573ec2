// The server's versioned client table and the registration decision: plain code, no sockets.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "protocol/messages.hpp"

namespace chat::registry {

/// One client as the server knows it. `ver` is the table version of its last change.
struct Client {
  std::string name;
  std::string ip;
  std::uint16_t port = 0;
  bool online = false;
  protocol::Key key{};  // the identity the name is bound to; all zero: not bound yet
  std::uint64_t ver = 0;
  bool bound() const { return key != protocol::Key{}; }
};

/// The entries changed in (from, to] that fit one datagram; `more` if later changes exist.
struct Chunk {
  std::uint64_t from = 0;
  std::uint64_t to = 0;
  bool more = false;
  std::vector<protocol::Entry> entries;
};

/// What to do with a registration.
enum class Admit {
  accept,    // new name, same address, or an offline name coming back
  conflict,  // held by an online client at another address: accept only if it is really gone
};

/// The client table. Every change bumps the version and stamps the changed row with it, so
/// "what changed since version v" is one ordered walk, and a snapshot is "changed since 0".
class Table {
 public:
  explicit Table(std::uint64_t epoch) : epoch_(epoch) {}

  std::uint64_t epoch() const { return epoch_; }
  std::uint64_t version() const { return version_; }
  std::size_t size() const { return by_name_.size(); }
  std::size_t online_count() const { return online_; }

  const Client* find(const std::string& name) const;
  /// Sets a row's address, online flag and key; bumps the version only if something changed.
  bool upsert(const std::string& name, const std::string& ip, std::uint16_t port, bool online,
              const protocol::Key& key);
  /// Sets a known row's online flag; false if unknown or unchanged.
  bool set_online(const std::string& name, bool online);

  /// Entries changed after version `after`, oldest change first, as many as fit in
  /// `budget` bytes of encoded entries (protocol::entry_size each).
  Chunk changes_since(std::uint64_t after, std::size_t budget) const;

  /// Visits every client (any order).
  template <class F>
  void for_each(F&& f) const {
    for (const auto& [name, c] : by_name_) f(c);
  }

  /// How admit a registration of `name` from ip:port.
  Admit admit(const std::string& name, const std::string& ip, std::uint16_t port) const;

 private:
  std::uint64_t epoch_;
  std::uint64_t version_ = 0;
  std::size_t online_ = 0;
  std::unordered_map<std::string, Client> by_name_;
  std::map<std::uint64_t, const Client*> by_ver_;  // rows ordered by their last change
};

}  // namespace chat::registry
