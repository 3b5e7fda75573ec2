// The in-memory implementation of the offline store, mirroring the SQLite store's behaviour call for call.
#include "offline/memory_store.hpp"

#include <algorithm>
#include <string_view>

namespace chat::offline {
namespace {

constexpr std::string_view call_name(MemoryStore::Call call) {
  switch (call) {
    case MemoryStore::Call::save:
      return "save";
    case MemoryStore::Call::pending_for:
      return "pending_for";
    case MemoryStore::Call::count_for:
      return "count_for";
    case MemoryStore::Call::remove_delivered:
      return "remove_delivered";
    case MemoryStore::Call::store_clients:
      return "store_clients";
    case MemoryStore::Call::load_clients:
      return "load_clients";
  }
  return "?";
}

/// The calls an untargeted fail_next counts: the ones the server must survive failing while it runs.
constexpr bool fails_by_default(MemoryStore::Call call) {
  return call == MemoryStore::Call::save || call == MemoryStore::Call::pending_for ||
         call == MemoryStore::Call::remove_delivered || call == MemoryStore::Call::store_clients;
}

}  // namespace

void MemoryStore::maybe_fail(Call call) {
  auto& targeted = fail_call_.at(static_cast<std::size_t>(call));
  if (targeted > 0) {
    --targeted;
  } else if (fail_any_ > 0 && fails_by_default(call)) {
    --fail_any_;
  } else {
    return;
  }
  throw StoreError("memory store: " + std::string(call_name(call)) + ": injected failure");
}

void MemoryStore::fail_next(std::size_t n) { fail_any_ = n; }

void MemoryStore::fail_next(Call call, std::size_t n) { fail_call_.at(static_cast<std::size_t>(call)) = n; }

std::vector<bool> MemoryStore::save(std::span<const NewMessage> batch) {
  maybe_fail(Call::save);
  // The SQLite table's CHECK fails the whole transaction; checking first keeps the batch all or nothing.
  for (const auto& m : batch) {
    if (m.kind != Kind::direct && m.kind != Kind::channel) {
      throw StoreError("memory store: save message: unknown kind " + std::to_string(static_cast<int>(m.kind)));
    }
  }
  std::vector<bool> inserted;
  inserted.reserve(batch.size());
  for (const auto& m : batch) {
    // AUTOINCREMENT hands out a rowid before the conflict check, and a committed transaction keeps
    // it used up even when DO NOTHING dropped the row: a repeat costs a seq here too.
    const std::int64_t seq = ++last_seq_;
    auto& box = mailboxes_[m.to];
    if (!box.stored.emplace(m.from, m.mid).second) {  // a stored key means the mailbox is not empty
      inserted.push_back(false);
      continue;
    }
    box.by_position.emplace(Cursor{m.ts_us, seq}, Body{m.from, m.from_key, m.kind, m.mid, m.body});
    box.ts_of.emplace(seq, m.ts_us);
    inserted.push_back(true);
  }
  return inserted;
}

std::vector<StoredMessage> MemoryStore::pending_for(const std::string& to, Cursor after, std::size_t limit) {
  maybe_fail(Call::pending_for);
  std::vector<StoredMessage> out;
  const auto box = mailboxes_.find(to);
  if (box == mailboxes_.end()) return out;
  const auto& rows = box->second.by_position;
  for (auto it = rows.upper_bound(after); it != rows.end() && out.size() < limit; ++it) {
    const auto& [at, body] = *it;
    out.push_back(StoredMessage{
        .seq = at.seq,
        .from = body.from,
        .from_key = body.from_key,
        .kind = body.kind,
        .ts_us = at.ts_us,
        .mid = body.mid,
        .body = body.body});
  }
  return out;
}

std::size_t MemoryStore::count_for(const std::string& to) {
  maybe_fail(Call::count_for);
  const auto box = mailboxes_.find(to);
  return box == mailboxes_.end() ? 0 : box->second.by_position.size();
}

void MemoryStore::remove_delivered(const std::string& to, std::span<const std::int64_t> seqs) {
  maybe_fail(Call::remove_delivered);
  const auto found = mailboxes_.find(to);
  if (found == mailboxes_.end()) return;
  auto& box = found->second;
  for (const auto seq : seqs) {
    // Only this recipient's seqs are looked up: an ACK from one client never deletes another's messages.
    const auto ts = box.ts_of.find(seq);
    if (ts == box.ts_of.end()) continue;
    const auto row = box.by_position.find(Cursor{ts->second, seq});
    box.stored.erase({row->second.from, row->second.mid});
    box.by_position.erase(row);
    box.ts_of.erase(ts);
  }
  if (box.by_position.empty()) mailboxes_.erase(found);
}

void MemoryStore::store_clients(std::span<const ClientRow> rows) {
  maybe_fail(Call::store_clients);
  for (const auto& r : rows) clients_.insert_or_assign(r.name, r);
}

std::vector<ClientRow> MemoryStore::load_clients() {
  maybe_fail(Call::load_clients);
  std::vector<ClientRow> out;
  out.reserve(clients_.size());
  for (const auto& [name, row] : clients_) out.push_back(row);
  return out;
}

Released MemoryStore::release(const std::string& name) {
  Released out;
  if (auto it = clients_.find(name); it != clients_.end()) {
    out.found = true;
    out.key = it->second.key;
    clients_.erase(it);
  }
  if (auto box = mailboxes_.find(name); box != mailboxes_.end()) {
    out.messages = box->second.by_position.size();
    mailboxes_.erase(box);
  }
  out.files = std::erase_if(files_, [&](const auto& kv) { return kv.first.first == name; });
  return out;
}

bool MemoryStore::put_file(const NewFile& f) { return files_.emplace(std::pair{f.to, f.transfer}, f).second; }

std::vector<HeldFile> MemoryStore::files_for(const std::string& to) {
  std::vector<HeldFile> out;
  for (auto it = files_.lower_bound({to, 0}); it != files_.end() && it->first.first == to; ++it) {
    const NewFile& f = it->second;
    out.push_back(HeldFile{f.from, f.from_key, f.transfer, f.ts_us, f.size, f.offer});
  }
  // Oldest first, as the SQLite store reads them (ties by transfer id).
  std::stable_sort(out.begin(), out.end(), [](const HeldFile& a, const HeldFile& b) { return a.ts_us < b.ts_us; });
  return out;
}

std::optional<std::string> MemoryStore::file_data(const std::string& to, std::uint64_t transfer) {
  auto it = files_.find({to, transfer});
  if (it == files_.end()) return std::nullopt;
  return it->second.data;
}

bool MemoryStore::delete_file(const std::string& to, std::uint64_t transfer) { return files_.erase({to, transfer}) == 1; }

std::uint64_t MemoryStore::file_bytes_for(const std::string& to) {
  std::uint64_t n = 0;
  for (auto it = files_.lower_bound({to, 0}); it != files_.end() && it->first.first == to; ++it) n += it->second.size;
  return n;
}

std::size_t MemoryStore::expire_files(std::int64_t before_us) {
  return std::erase_if(files_, [&](const auto& kv) { return kv.second.ts_us < before_us; });
}

std::unique_ptr<Store> open_memory_store() { return std::make_unique<MemoryStore>(); }

}  // namespace chat::offline
