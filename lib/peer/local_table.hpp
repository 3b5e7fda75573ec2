// The client's copy of the server's table, and how it applies Table datagrams: plain code.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>

#include "protocol/messages.hpp"

namespace chat::peer {

/// The outcome of applying one Table datagram.
struct Applied {
  bool changed = false;   // new rows or new state taken in
  bool announce = false;  // caught up with the server: show "[Client table updated.]"
  std::uint64_t epoch = 0;
  std::uint64_t have = 0;  // the version to acknowledge
};

class LocalTable {
 public:
  /// Applies `t` if it continues what we hold (or starts a new epoch from 0); else keeps ours.
  Applied apply(const protocol::Table& t);

  /// Takes in a row the server gave on request (a lookup) if we hold none for that name; the
  /// next table update overwrites it like any other row.
  void learn(const protocol::Entry& e);

  const protocol::Entry* find(const std::string& name) const;
  const std::map<std::string, protocol::Entry>& rows() const { return rows_; }
  std::uint64_t epoch() const { return epoch_; }
  std::uint64_t version() const { return version_; }

 private:
  std::map<std::string, protocol::Entry> rows_;  // name order, for `list`
  std::uint64_t epoch_ = 0;
  std::uint64_t version_ = 0;
};

/// `list` output: one line per row, aligned in columns; `mark(name)` is appended to a row
/// (" verified", " identity changed", or nothing).
std::string format_table(const LocalTable& t, const std::string& self,
                         const std::function<std::string(const std::string&)>& mark = {});
/// A server timestamp (microseconds since the epoch) in local time, "YYYY-MM-DD HH:MM:SS".
std::string format_timestamp(std::int64_t ts_us);

}  // namespace chat::peer
