// The versioned client table: upserts, online flags, and "changed since" walks.
#include "registry/table.hpp"

#include "protocol/codec.hpp"

namespace chat::registry {

const Client* Table::find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &it->second;
}

bool Table::upsert(const std::string& name, const std::string& ip, std::uint16_t port, bool online,
                   const protocol::Key& key) {
  auto [it, inserted] = by_name_.try_emplace(name);
  Client& c = it->second;
  if (!inserted && c.ip == ip && c.port == port && c.online == online && c.key == key) return false;
  if (inserted) c.name = name;
  else by_ver_.erase(c.ver);
  if (c.online != online) online_ += online ? 1 : -1;
  c.ip = ip;
  c.port = port;
  c.online = online;
  c.key = key;
  c.ver = ++version_;
  by_ver_.emplace(c.ver, &c);
  return true;
}

bool Table::set_online(const std::string& name, bool online) {
  const Client* c = find(name);
  if (c == nullptr || c->online == online) return false;
  return upsert(name, c->ip, c->port, online, c->key);
}

Chunk Table::changes_since(std::uint64_t after, std::size_t budget) const {
  Chunk chunk;
  chunk.from = after;
  chunk.to = after < version_ ? after : version_;
  std::size_t used = 0;
  for (auto it = by_ver_.upper_bound(after); it != by_ver_.end(); ++it) {
    const Client& c = *it->second;
    protocol::Entry e{c.name, c.ip, c.port, c.online, c.key};
    std::size_t n = protocol::entry_size(e);
    if (used + n > budget && !chunk.entries.empty()) {
      chunk.more = true;
      return chunk;
    }
    used += n;
    chunk.entries.push_back(std::move(e));
    chunk.to = it->first;
  }
  // Versions past the last row's stamp belong to rows changed again later: nothing to send.
  chunk.to = version_ > after ? version_ : after;
  return chunk;
}

Admit Table::admit(const std::string& name, const std::string& ip, std::uint16_t port) const {
  const Client* c = find(name);
  if (c == nullptr || !c->online || (c->ip == ip && c->port == port)) return Admit::accept;
  return Admit::conflict;
}

}  // namespace chat::registry
