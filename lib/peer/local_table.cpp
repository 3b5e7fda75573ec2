// Applying table updates in order, and formatting the table and timestamps for the user.
#include "peer/local_table.hpp"

#include <algorithm>
#include <ctime>
#include <string_view>

namespace chat::peer {

Applied LocalTable::apply(const protocol::Table& t) {
  if (t.epoch != epoch_) {
    // A new server generation (first registration, or the server restarted): only a
    // snapshot from version 0 can be taken in.
    if (t.from != 0) return {false, false, epoch_, 0};
    rows_.clear();
    epoch_ = t.epoch;
    version_ = 0;
  }
  if (t.from > version_) return {false, false, epoch_, version_};  // a gap: ask from ours
  if (t.to <= version_) return {false, false, epoch_, version_};   // already have it
  for (const auto& e : t.entries) rows_[e.name] = e;
  version_ = t.to;
  return {true, !t.more, epoch_, version_};
}

void LocalTable::learn(const protocol::Entry& e) { rows_.try_emplace(e.name, e); }

const protocol::Entry* LocalTable::find(const std::string& name) const {
  auto it = rows_.find(name);
  return it == rows_.end() ? nullptr : &it->second;
}

std::string format_table(const LocalTable& t, const std::string& self,
                         const std::function<std::string(const std::string&)>& mark) {
  // Built in place with append, not chained operator+: GCC 12 at -O3 reports a false
  // -Wrestrict inside `"literal" + std::string&&` (its insert at position 0).
  std::size_t w = 4;
  for (const auto& [name, e] : t.rows()) w = std::max(w, name.size());
  auto field = [](std::string& out, std::string_view s, std::size_t n) {
    out.append(s);
    if (s.size() < n) out.append(n - s.size(), ' ');
  };
  std::string out;
  out.reserve((w + 40) * (t.rows().size() + 2));
  field(out, "NAME", w);
  out.append("  ");
  field(out, "ADDRESS", 21);
  out.append("  STATUS");
  std::size_t online = 0;
  for (const auto& [name, e] : t.rows()) {
    online += e.online ? 1 : 0;
    out.append("\n");
    field(out, name, w);
    out.append("  ");
    std::string address = e.ip;
    address.append(":").append(std::to_string(e.port));
    field(out, address, 21);
    out.append("  ").append(e.online ? "online" : "offline");
    if (name == self) out.append(" (you)");
    else if (mark) out.append(mark(name));
  }
  out.append("\n(").append(std::to_string(t.rows().size())).append(" clients, ");
  out.append(std::to_string(online)).append(" online)");
  return out;
}

std::string format_timestamp(std::int64_t ts_us) {
  std::time_t secs = static_cast<std::time_t>(ts_us / 1'000'000);
  std::tm tm{};
  localtime_r(&secs, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

}  // namespace chat::peer
