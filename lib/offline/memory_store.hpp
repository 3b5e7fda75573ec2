// The in-memory offline store: the SQLite store's semantics without a file, plus injected failures for tests.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "offline/store.hpp"

namespace chat::offline {

/// Deterministic and single-threaded; for the same calls it returns what the SQLite store returns, seqs included.
class MemoryStore final : public Store {
 public:
  /// The calls whose failure can be injected one by one.
  enum class Call : std::uint8_t { save, pending_for, count_for, remove_delivered, store_clients, load_clients };

  std::vector<bool> save(std::span<const NewMessage> batch) override;
  std::vector<StoredMessage> pending_for(const std::string& to, Cursor after, std::size_t limit) override;
  std::size_t count_for(const std::string& to) override;
  void remove_delivered(const std::string& to, std::span<const std::int64_t> seqs) override;
  void store_clients(std::span<const ClientRow> rows) override;
  std::vector<ClientRow> load_clients() override;
  Released release(const std::string& name) override;
  std::size_t legacy_count() override { return 0; }
  bool put_file(const NewFile& f) override;
  std::vector<HeldFile> files_for(const std::string& to) override;
  std::optional<std::string> file_data(const std::string& to, std::uint64_t transfer) override;
  bool delete_file(const std::string& to, std::uint64_t transfer) override;
  std::uint64_t file_bytes_for(const std::string& to) override;
  std::size_t expire_files(std::int64_t before_us) override;

  /// Makes the next `n` calls of save, pending_for, remove_delivered or store_clients throw StoreError, changing nothing.
  void fail_next(std::size_t n);
  /// Makes the next `n` calls of `call` alone throw StoreError and change nothing (counted before the untargeted ones).
  void fail_next(Call call, std::size_t n);

 private:
  struct Body {
    std::string from;
    std::string from_key;
    Kind kind = Kind::direct;
    std::uint64_t mid = 0;
    std::string body;
  };
  /// One recipient's messages, indexed as the SQLite tables are.
  struct Mailbox {
    std::map<Cursor, Body> by_position;                     // the (ts_us, seq) order pending_for reads in
    std::unordered_map<std::int64_t, std::int64_t> ts_of;   // seq -> ts_us, so a seq finds its position
    std::set<std::pair<std::string, std::uint64_t>> stored;  // (from, mid): the unique key with the recipient
  };

  void maybe_fail(Call call);

  std::unordered_map<std::string, Mailbox> mailboxes_;  // only recipients with messages
  std::map<std::pair<std::string, std::uint64_t>, NewFile> files_;  // by (to, transfer)
  std::map<std::string, ClientRow> clients_;            // by name, the order load_clients returns
  std::int64_t last_seq_ = 0;                           // like AUTOINCREMENT: never reused
  std::size_t fail_any_ = 0;
  std::array<std::size_t, static_cast<std::size_t>(Call::load_clients) + 1> fail_call_{};  // by Call
};

}  // namespace chat::offline
