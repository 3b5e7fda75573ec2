// Unit tests of the offline stores: one contract for SQLite and memory, SQLite durability and schema, memory faults.
#include <doctest/doctest.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <span>
#include <string>
#include <vector>

#include "temp_dir.hpp"
#include "offline/memory_store.hpp"
#include "offline/store.hpp"

namespace fs = std::filesystem;
using namespace chat::offline;

using TempDir = chat::test::TempDir;

namespace {

constexpr auto everything = std::numeric_limits<std::size_t>::max();


/// A raw connection for what the Store interface deliberately hides (pragmas, integrity checks).
class RawDb {
 public:
  explicit RawDb(const fs::path& file) { REQUIRE(sqlite3_open(file.c_str(), &db_) == SQLITE_OK); }
  RawDb(const RawDb&) = delete;
  RawDb& operator=(const RawDb&) = delete;
  ~RawDb() { sqlite3_close(db_); }

  void exec(const std::string& sql) {
    char* err = nullptr;
    const int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err);
    INFO(sql << ": " << (err ? err : ""));
    sqlite3_free(err);
    REQUIRE(rc == SQLITE_OK);
  }
  std::string query_text(const std::string& sql) {
    sqlite3_stmt* stmt = nullptr;
    REQUIRE(sqlite3_prepare_v2(db_, sql.c_str(), -1, &stmt, nullptr) == SQLITE_OK);
    std::string out;
    if (sqlite3_step(stmt) == SQLITE_ROW) {
      const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0));
      out = p ? p : "";
    }
    sqlite3_finalize(stmt);
    return out;
  }

 private:
  sqlite3* db_ = nullptr;
};

// Each message gets its own sender message id unless one is given (the store keeps one copy
// per (recipient, sender, mid)).
std::uint64_t g_next_mid = 1;

NewMessage msg(std::string to, std::string from, std::string text, Kind kind = Kind::direct,
               std::int64_t ts_us = 1'700'000'000'000'000, std::uint64_t mid = g_next_mid++) {
  return NewMessage{.to = std::move(to),
                    .from = std::move(from),
                    .kind = kind,
                    .ts_us = ts_us,
                    .mid = mid,
                    .body = std::move(text)};
}

/// Saves a batch every message of which is new, so each must be reported inserted.
void save_new(Store& store, std::span<const NewMessage> batch) {
  CHECK(store.save(batch) == std::vector<bool>(batch.size(), true));
}

std::vector<std::string> texts_of(const std::vector<StoredMessage>& ms) {
  std::vector<std::string> out;
  out.reserve(ms.size());
  for (const auto& m : ms) out.push_back(m.body);
  return out;
}

std::set<std::string> entries_of(const fs::path& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.insert(e.path().filename().string());
  return out;
}

bool read_exact(int fd, void* buf, std::size_t n) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    const ssize_t got = read(fd, p, n);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    p += got;
    n -= static_cast<std::size_t>(got);
  }
  return true;
}

/// The committed database written by the schema-1 code (see the golden test); never opened in place.
fs::path golden_v1() { return fs::path(__FILE__).parent_path().parent_path() / "data" / "golden-v1" / "chat.db"; }

// The backends the contract tests run against; open() gives a fresh, empty store.

/// An SQLite store in a directory that open() creates inside a temp dir, so a test can see every file it made.
struct SqliteBackend {
  static constexpr bool on_disk = true;
  TempDir tmp;
  fs::path dir() const { return tmp.path() / "store"; }
  std::unique_ptr<Store> open() const { return open_sqlite_store(dir().string()); }
};

struct MemoryBackend {
  static constexpr bool on_disk = false;
  std::unique_ptr<Store> open() const { return open_memory_store(); }
};

/// Every field of each message, one line each, so two backends' answers compare (and print) as strings.
std::string show(const std::vector<StoredMessage>& ms) {
  std::ostringstream out;
  for (const auto& m : ms) {
    out << m.seq << ' ' << m.ts_us << ' ' << static_cast<int>(m.kind) << ' ' << m.mid << ' ' << m.from.size() << ':'
        << m.from << ' ' << m.from_key.size() << ':' << m.from_key << ' ' << m.body.size() << ':' << m.body << '\n';
  }
  return out.str();
}

std::string show(const std::vector<ClientRow>& rows) {
  std::ostringstream out;
  for (const auto& r : rows) {
    out << r.name.size() << ':' << r.name << ' ' << r.ip << ':' << r.port << ' ' << r.online << ' ' << r.key.size()
        << ':' << r.key << '\n';
  }
  return out.str();
}

}  // namespace

TYPE_TO_STRING(SqliteBackend);
TYPE_TO_STRING(MemoryBackend);

// ---------------------------------------------------------------- the contract, for both backends

TEST_CASE_TEMPLATE("save keeps arrival order per recipient, pending_for honours the cursor and limit", Backend,
                   SqliteBackend, MemoryBackend) {
  const Backend backend;
  auto store = backend.open();

  const std::vector<NewMessage> first{msg("bob", "alice", "b1"), msg("carol", "alice", "c1"),
                                      msg("bob", "dave", "b2")};
  save_new(*store, first);
  const std::vector<NewMessage> second{msg("bob", "alice", "b3"), msg("carol", "dave", "c2")};
  save_new(*store, second);

  CHECK(store->count_for("bob") == 3);
  CHECK(store->count_for("carol") == 2);
  CHECK(store->count_for("nobody") == 0);

  const auto bob = store->pending_for("bob", {}, everything);
  CHECK(texts_of(bob) == std::vector<std::string>{"b1", "b2", "b3"});
  CHECK(texts_of(store->pending_for("carol", {}, everything)) == std::vector<std::string>{"c1", "c2"});
  CHECK(store->pending_for("nobody", {}, everything).empty());
  REQUIRE(bob.size() == 3);
  CHECK(bob[0].seq < bob[1].seq);
  CHECK(bob[1].seq < bob[2].seq);

  // The reader pages through with the last message it saw; equal stamps fall back to seq.
  CHECK(texts_of(store->pending_for("bob", {}, 2)) == std::vector<std::string>{"b1", "b2"});
  CHECK(texts_of(store->pending_for("bob", bob[1].cursor(), 2)) == std::vector<std::string>{"b3"});
  CHECK(store->pending_for("bob", bob[2].cursor(), 10).empty());
  CHECK(store->pending_for("bob", {}, 0).empty());

  SUBCASE("remove_delivered deletes only the given messages of that recipient") {
    const std::vector<std::int64_t> seqs{bob[0].seq, bob[2].seq};
    store->remove_delivered("bob", seqs);
    CHECK(texts_of(store->pending_for("bob", {}, everything)) == std::vector<std::string>{"b2"});
    CHECK(store->count_for("bob") == 1);

    // Bob's seqs under Carol's name remove nothing of Carol's.
    const auto carol = store->pending_for("carol", {}, everything);
    const std::vector<std::int64_t> bobs_seq{bob[1].seq};
    store->remove_delivered("carol", bobs_seq);
    CHECK(store->count_for("bob") == 1);
    CHECK(store->count_for("carol") == 2);

    // Unknown seqs and an empty list are harmless.
    const std::vector<std::int64_t> unknown{999'999, -1};
    store->remove_delivered("bob", unknown);
    store->remove_delivered("bob", {});
    CHECK(store->count_for("bob") == 1);
  }

  SUBCASE("a seq is never reused after its message is deleted") {
    const auto last = store->pending_for("carol", {}, everything).back().seq;
    const std::vector<std::int64_t> all_carol{store->pending_for("carol", {}, everything)[0].seq, last};
    const std::vector<std::int64_t> all_bob{bob[0].seq, bob[1].seq, bob[2].seq};
    store->remove_delivered("carol", all_carol);
    store->remove_delivered("bob", all_bob);
    CHECK(store->count_for("bob") == 0);
    const std::vector<NewMessage> again{msg("bob", "alice", "b4")};
    save_new(*store, again);
    const auto after = store->pending_for("bob", {}, everything);
    REQUIRE(after.size() == 1);
    CHECK(after[0].seq > last);
  }

  SUBCASE("an empty batch is a no-op") {
    CHECK(store->save({}).empty());
    CHECK(store->count_for("bob") == 3);
  }
}

TEST_CASE_TEMPLATE("a save that fails part-way keeps none of its batch", Backend, SqliteBackend, MemoryBackend) {
  const Backend backend;
  auto store = backend.open();
  const std::vector<NewMessage> before{msg("bob", "alice", "kept")};
  save_new(*store, before);

  // A kind outside the enum breaks the table's CHECK on the second row, after the first was inserted.
  const std::vector<NewMessage> bad{msg("bob", "alice", "lost 1"), msg("bob", "alice", "lost 2", static_cast<Kind>(7)),
                                    msg("bob", "alice", "lost 3")};
  CHECK_THROWS_AS(store->save(bad), StoreError);
  CHECK(texts_of(store->pending_for("bob", {}, everything)) == std::vector<std::string>{"kept"});

  // The store is usable again: the failed transaction was rolled back, not left open.
  const std::vector<NewMessage> after{msg("bob", "alice", "next")};
  save_new(*store, after);
  CHECK(texts_of(store->pending_for("bob", {}, everything)) == std::vector<std::string>{"kept", "next"});
}

TEST_CASE_TEMPLATE("every field round-trips exactly", Backend, SqliteBackend, MemoryBackend) {
  const Backend backend;
  auto store = backend.open();

  const std::string with_nul("before\0after", 12);
  const std::string utf8 = "h\xC3\xA9llo \xE4\xB8\x96\xE7\x95\x8C \xF0\x9F\x92\xAC";  // héllo 世界 💬
  const std::string not_utf8 = "\xFF\xFE\x80 raw bytes";
  const std::vector<NewMessage> batch{
      msg("r", "s1", with_nul, Kind::direct, 0, 0),
      msg("r", "s2", utf8, Kind::channel, -1, std::numeric_limits<std::uint64_t>::max()),
      msg("r", "s3", "", Kind::direct, std::numeric_limits<std::int64_t>::max(), std::uint64_t{1} << 63),
      msg("r", utf8, not_utf8, Kind::channel, std::numeric_limits<std::int64_t>::min(), 42),
      msg("r", "s5", std::string(std::size_t{64} * 1024, 'x'), Kind::direct, 1'700'000'000'123'456, 0x0123456789abcdefULL),
  };
  save_new(*store, batch);

  const auto got = store->pending_for("r", {}, everything);
  // They come back in ts_us order, the extremes included.
  auto want = batch;
  std::stable_sort(want.begin(), want.end(), [](const auto& a, const auto& b) { return a.ts_us < b.ts_us; });
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < want.size(); ++i) {
    CAPTURE(i);
    CHECK(got[i].from == want[i].from);
    CHECK(got[i].kind == want[i].kind);
    CHECK(got[i].ts_us == want[i].ts_us);
    CHECK(got[i].mid == want[i].mid);
    CHECK(got[i].body == want[i].body);
  }
  CHECK(got[2].body.size() == 12);
}

TEST_CASE_TEMPLATE("hostile names are stored and read back as data", Backend, SqliteBackend, MemoryBackend) {
  const Backend backend;
  const std::vector<std::string> names{
      "../x", "/", std::string("a\0b", 3), "a", std::string(std::size_t{10} * 1024, 'n'), "'; DROP TABLE messages; --",
      "\"; DROP TABLE clients; --", "%s%n", ""};
  {
    auto store = backend.open();
    for (std::size_t i = 0; i < names.size(); ++i) {
      const std::vector<NewMessage> one{msg(names[i], names[i], "for " + std::to_string(i))};
      save_new(*store, one);
    }
    std::vector<ClientRow> rows;
    for (std::size_t i = 0; i < names.size(); ++i) {
      rows.push_back({names[i], "10.0.0." + std::to_string(i), static_cast<std::uint16_t>(6000 + i), true});
    }
    store->store_clients(rows);

    for (std::size_t i = 0; i < names.size(); ++i) {
      CAPTURE(i);
      CHECK(store->count_for(names[i]) == 1);
      const auto got = store->pending_for(names[i], {}, everything);
      REQUIRE(got.size() == 1);
      CHECK(got[0].from == names[i]);
      CHECK(got[0].body == "for " + std::to_string(i));
    }
    auto sorted = names;
    std::sort(sorted.begin(), sorted.end());
    std::vector<std::string> loaded;
    for (const auto& r : store->load_clients()) loaded.push_back(r.name);
    CHECK(loaded == sorted);

    if constexpr (Backend::on_disk) {
      const std::set<std::string> allowed{"chat.db", "chat.db-wal", "chat.db-shm"};
      for (const auto& e : entries_of(backend.dir())) {
        CAPTURE(e);
        CHECK(allowed.count(e) == 1);
      }
    }

    const auto victim = store->pending_for(std::string("a\0b", 3), {}, everything);
    const std::vector<std::int64_t> seqs{victim.at(0).seq};
    store->remove_delivered(std::string("a\0b", 3), seqs);
    CHECK(store->count_for(std::string("a\0b", 3)) == 0);
    CHECK(store->count_for("a") == 1);
  }
  if constexpr (Backend::on_disk) {
    const std::set<std::string> allowed{"chat.db", "chat.db-wal", "chat.db-shm"};
    for (const auto& e : entries_of(backend.dir())) {
      CAPTURE(e);
      CHECK(allowed.count(e) == 1);
    }
    CHECK(entries_of(backend.tmp.path()) == std::set<std::string>{"store"});
    RawDb raw(backend.dir() / "chat.db");
    CHECK(raw.query_text("PRAGMA integrity_check") == "ok");
    CHECK(raw.query_text("SELECT count(*) FROM messages") == std::to_string(names.size() - 1));
  }
}

TEST_CASE_TEMPLATE("store_clients and load_clients round-trip and replace", Backend, SqliteBackend, MemoryBackend) {
  const Backend backend;
  auto store = backend.open();
  CHECK(store->load_clients().empty());

  const std::vector<ClientRow> rows{{"carol", "192.168.1.3", 65535, false},
                                    {"alice", "127.0.0.1", 1024, true},
                                    {"bob", "10.1.2.3", 0, true}};
  store->store_clients(rows);
  auto got = store->load_clients();
  REQUIRE(got.size() == 3);
  CHECK(got[0].name == "alice");
  CHECK(got[0].ip == "127.0.0.1");
  CHECK(got[0].port == 1024);
  CHECK(got[0].online);
  CHECK(got[1].name == "bob");
  CHECK(got[1].port == 0);
  CHECK(got[2].name == "carol");
  CHECK(got[2].ip == "192.168.1.3");
  CHECK(got[2].port == 65535);
  CHECK_FALSE(got[2].online);

  const std::vector<ClientRow> update{{"alice", "127.0.0.2", 2048, false}, {"dave", "10.0.0.4", 7000, true}};
  store->store_clients(update);
  store->store_clients({});
  got = store->load_clients();
  REQUIRE(got.size() == 4);
  CHECK(got[0].name == "alice");
  CHECK(got[0].ip == "127.0.0.2");
  CHECK(got[0].port == 2048);
  CHECK_FALSE(got[0].online);
  CHECK(got[1].name == "bob");
  CHECK(got[1].ip == "10.1.2.3");
  CHECK(got[3].name == "dave");
  CHECK(got[3].online);
}

TEST_CASE_TEMPLATE("a name's binding round-trips as bytes, and release removes it with the messages sealed for it",
                   Backend, SqliteBackend, MemoryBackend) {
  const Backend backend;
  auto store = backend.open();
  const std::string key("\x00\x01\xff key bytes with a NUL \x00 inside....", 32);
  REQUIRE(key.size() == 32);
  const std::vector<ClientRow> rows{{"alice", "10.0.0.1", 5000, false, key}, {"bob", "10.0.0.2", 5001, true, ""}};
  store->store_clients(rows);
  auto got = store->load_clients();
  REQUIRE(got.size() == 2);
  CHECK(got[0].key == key);
  CHECK(got[1].key.empty());
  NewMessage sealed = msg("alice", "bob", std::string("\x00sealed\x00", 8));
  sealed.from_key = std::string(32, '\x07');
  save_new(*store, std::vector<NewMessage>{sealed, msg("alice", "carol", "two"), msg("bob", "alice", "kept")});
  const auto box = store->pending_for("alice", {}, everything);
  REQUIRE(box.size() == 2);
  CHECK(box[0].from_key == sealed.from_key);
  CHECK(box[0].body == sealed.body);

  const Released r = store->release("alice");
  CHECK(r.found);
  CHECK(r.key == key);
  CHECK(r.messages == 2);
  CHECK(store->count_for("alice") == 0);
  CHECK(store->count_for("bob") == 1);  // what alice sent others stays theirs
  got = store->load_clients();
  REQUIRE(got.size() == 1);
  CHECK(got[0].name == "bob");
  const Released again = store->release("alice");
  CHECK_FALSE(again.found);
  CHECK(again.messages == 0);
}

namespace {
NewFile kept_file(const std::string& to, std::uint64_t transfer, std::int64_t ts_us, std::string data) {
  NewFile f{to, "alice", std::string(32, '\x05'), transfer, ts_us, data.size() / 2, std::string("sealed offer \x00\xff", 15), std::move(data)};
  return f;
}
}  // namespace

TEST_CASE_TEMPLATE("kept files: put, list without the data, read back byte for byte, count, delete, expire", Backend,
                   SqliteBackend, MemoryBackend) {
  const Backend backend;
  auto store = backend.open();
  std::mt19937_64 rng(7);
  std::string big(3 << 20, '\0');
  for (auto& c : big) c = static_cast<char>(rng());
  CHECK(store->put_file(kept_file("bob", 0xFFFF'FFFF'FFFF'FFFFull, 2'000, big)));  // the largest transfer id
  CHECK(store->put_file(kept_file("bob", 7, 1'000, std::string("\x00two\x00", 5))));
  CHECK(store->put_file(kept_file("carol", 7, 500, "c")));
  // The same (to, transfer) again: kept once, unchanged.
  CHECK_FALSE(store->put_file(kept_file("bob", 7, 9'000, "other")));

  const auto held = store->files_for("bob");
  REQUIRE(held.size() == 2);
  CHECK(held[0].transfer == 7);  // oldest first
  CHECK(held[0].ts_us == 1'000);
  CHECK(held[0].size == 2);
  CHECK(held[0].from == "alice");
  CHECK(held[0].from_key == std::string(32, '\x05'));
  CHECK(held[0].offer == std::string("sealed offer \x00\xff", 15));
  CHECK(held[1].transfer == 0xFFFF'FFFF'FFFF'FFFFull);
  CHECK(store->files_for("nobody").empty());

  CHECK(store->file_data("bob", 0xFFFF'FFFF'FFFF'FFFFull) == big);
  CHECK(store->file_data("bob", 7) == std::string("\x00two\x00", 5));
  CHECK(store->file_data("carol", 8) == std::nullopt);
  CHECK(store->file_data("alice", 7) == std::nullopt);  // another recipient's transfer id is not ours
  CHECK(store->file_bytes_for("bob") == big.size() / 2 + 2);
  CHECK(store->file_bytes_for("nobody") == 0);

  CHECK(store->delete_file("bob", 7));
  CHECK_FALSE(store->delete_file("bob", 7));
  CHECK_FALSE(store->delete_file("alice", 0xFFFF'FFFF'FFFF'FFFFull));
  CHECK(store->files_for("bob").size() == 1);

  // Only what arrived before the bound goes.
  CHECK(store->expire_files(500) == 0);
  CHECK(store->expire_files(1'000) == 1);  // carol's, at 500
  CHECK(store->files_for("carol").empty());
  CHECK(store->files_for("bob").size() == 1);
  CHECK(store->expire_files(2'001) == 1);
  CHECK(store->file_bytes_for("bob") == 0);
}

TEST_CASE_TEMPLATE("release deletes the files kept for the name, and only those", Backend, SqliteBackend, MemoryBackend) {
  const Backend backend;
  auto store = backend.open();
  store->store_clients(std::vector<ClientRow>{{"bob", "10.0.0.2", 5001, false, std::string(32, '\x01')}});
  CHECK(store->put_file(kept_file("bob", 1, 10, "aa")));
  CHECK(store->put_file(kept_file("bob", 2, 11, "bb")));
  CHECK(store->put_file(kept_file("carol", 1, 12, "cc")));
  const Released r = store->release("bob");
  CHECK(r.found);
  CHECK(r.files == 2);
  CHECK(store->files_for("bob").empty());
  CHECK(store->files_for("carol").size() == 1);
}

TEST_CASE("kept files survive a reopen of the SQLite store") {
  TempDir tmp;
  { CHECK(open_sqlite_store(tmp.path().string())->put_file(kept_file("bob", 3, 42, "data!"))); }
  auto store = open_sqlite_store(tmp.path().string());
  CHECK(store->file_data("bob", 3) == std::string("data!"));
  CHECK(store->files_for("bob").size() == 1);
}

TEST_CASE_TEMPLATE("save reports per message whether it inserted it, a repeat (recipient, sender, mid) is kept once",
                   Backend, SqliteBackend, MemoryBackend) {
  const Backend backend;
  auto store = backend.open();
  const std::vector<NewMessage> once{msg("bob", "alice", "hi", Kind::direct, 1, 42)};
  CHECK(store->save(once) == std::vector<bool>{true});
  // The sender retried: its ACK was lost in a crash after the commit. Nothing is inserted, and
  // save says so, so the caller does not count it in the mailbox again.
  CHECK(store->save(once) == std::vector<bool>{false});
  const std::vector<NewMessage> other{msg("carol", "alice", "hi", Kind::direct, 1, 42),
                                      msg("bob", "dave", "hi", Kind::direct, 1, 42),
                                      msg("bob", "alice", "again", Kind::direct, 1, 43)};
  CHECK(store->save(other) == std::vector<bool>{true, true, true});
  CHECK(store->count_for("bob") == 3);
  CHECK(store->count_for("carol") == 1);

  SUBCASE("the first copy is kept, whatever the repeat carries") {
    const std::vector<NewMessage> changed{msg("bob", "alice", "edited", Kind::channel, 99, 42)};
    CHECK(store->save(changed) == std::vector<bool>{false});
    const auto got = store->pending_for("bob", {}, everything);
    REQUIRE(got.size() == 3);
    CHECK(got[0].body == "hi");
    CHECK(got[0].kind == Kind::direct);
    CHECK(got[0].ts_us == 1);
  }

  SUBCASE("a repeat within one batch is reported at its own position") {
    const std::vector<NewMessage> batch{msg("dave", "alice", "first", Kind::direct, 5, 7),
                                        msg("bob", "alice", "hi", Kind::direct, 1, 42),  // stored before
                                        msg("dave", "alice", "first again", Kind::direct, 6, 7),
                                        msg("dave", "bob", "other sender", Kind::direct, 7, 7),
                                        msg("dave", "alice", "third copy", Kind::direct, 8, 7)};
    CHECK(store->save(batch) == std::vector<bool>{true, false, false, true, false});
    CHECK(texts_of(store->pending_for("dave", {}, everything)) == std::vector<std::string>{"first", "other sender"});
    CHECK(store->count_for("bob") == 3);
  }

  SUBCASE("a batch of nothing but repeats commits nothing and reports all false") {
    const std::vector<NewMessage> repeats{once[0], other[0], other[2]};
    CHECK(store->save(repeats) == std::vector<bool>{false, false, false});
    CHECK(store->count_for("bob") == 3);
    CHECK(store->count_for("carol") == 1);
  }

  SUBCASE("once delivered and removed, the same (recipient, sender, mid) is a new message") {
    // The key guards against a retried save, not against reuse of a mid after delivery.
    const auto bob = store->pending_for("bob", {}, everything);
    const std::vector<std::int64_t> first{bob.at(0).seq};
    store->remove_delivered("bob", first);
    const auto again = store->save(once);
    CHECK(again == std::vector<bool>{true});
    CHECK(store->count_for("bob") == 3);
  }

  SUBCASE("a failed batch reports nothing and keeps nothing, so its messages are new on retry") {
    const std::vector<NewMessage> bad{msg("erin", "alice", "x", Kind::direct, 1, 1),
                                      msg("erin", "alice", "y", static_cast<Kind>(7), 1, 2)};
    CHECK_THROWS_AS((void)store->save(bad), StoreError);
    CHECK(store->count_for("erin") == 0);
    const std::vector<NewMessage> good{bad[0]};
    CHECK(store->save(good) == std::vector<bool>{true});
  }
}

TEST_CASE_TEMPLATE("pending_for reads in (ts_us, seq) order, not commit order, and pages by cursor", Backend,
                   SqliteBackend, MemoryBackend) {
  const Backend backend;
  auto store = backend.open();
  // Seqs 1..4 in commit order; the stamps say t100 (seq 2) and t100b (seq 4) arrived first.
  const std::vector<NewMessage> first{msg("bob", "alice", "t300", Kind::direct, 300),
                                      msg("bob", "alice", "t100", Kind::direct, 100)};
  save_new(*store, first);
  const std::vector<NewMessage> second{msg("bob", "carol", "t200", Kind::channel, 200),
                                       msg("bob", "dave", "t100b", Kind::direct, 100)};
  save_new(*store, second);
  const std::vector<std::string> in_order{"t100", "t100b", "t200", "t300"};

  const auto all = store->pending_for("bob", {}, everything);
  REQUIRE(texts_of(all) == in_order);
  CHECK(all[0].seq < all[1].seq);  // equal stamps: seq decides
  CHECK(all[3].seq < all[2].seq);  // t300 was committed before t200

  // One at a time from the default cursor visits each message once, in order.
  std::vector<std::string> paged;
  Cursor at;
  for (;;) {
    const auto page = store->pending_for("bob", at, 1);
    if (page.empty()) break;
    REQUIRE(page.size() == 1);
    CHECK(at < page[0].cursor());
    paged.push_back(page[0].body);
    at = page[0].cursor();
  }
  CHECK(paged == in_order);

  // A cursor is a position, not a row: it may fall between messages or name none.
  CHECK(texts_of(store->pending_for("bob", all[0].cursor(), everything)) ==
        std::vector<std::string>{"t100b", "t200", "t300"});
  CHECK(texts_of(store->pending_for("bob", Cursor{100, 0}, everything)) == in_order);
  CHECK(texts_of(store->pending_for("bob", Cursor{100, std::numeric_limits<std::int64_t>::max()}, everything)) ==
        std::vector<std::string>{"t200", "t300"});
  CHECK(texts_of(store->pending_for("bob", Cursor{150, -5}, 1)) == std::vector<std::string>{"t200"});
  CHECK(store->pending_for("bob", Cursor{300, all[3].seq}, everything).empty());
  CHECK(store->pending_for("bob", Cursor{std::numeric_limits<std::int64_t>::max(), 0}, everything).empty());

  SUBCASE("the cursor of a removed message still continues after it") {
    const std::vector<std::int64_t> gone{all[1].seq};
    store->remove_delivered("bob", gone);
    CHECK(texts_of(store->pending_for("bob", all[1].cursor(), everything)) ==
          std::vector<std::string>{"t200", "t300"});
  }

  SUBCASE("a message stamped before the cursor is not after it, only from the start") {
    // Committed last, stamped before what the reader has already passed: a reader that goes on
    // from its cursor does not see it; one that starts again does, in its stamp's place.
    const std::vector<NewMessage> late{msg("bob", "erin", "t150", Kind::direct, 150)};
    save_new(*store, late);
    CHECK(texts_of(store->pending_for("bob", all[2].cursor(), everything)) == std::vector<std::string>{"t300"});
    CHECK(texts_of(store->pending_for("bob", {}, everything)) ==
          std::vector<std::string>{"t100", "t100b", "t150", "t200", "t300"});
  }

  SUBCASE("the lowest stamp is still after the default cursor") {
    constexpr auto lowest = std::numeric_limits<std::int64_t>::min();
    const std::vector<NewMessage> oldest{msg("bob", "erin", "min", Kind::direct, lowest)};
    save_new(*store, oldest);
    const auto got = store->pending_for("bob", {}, 1);
    REQUIRE(got.size() == 1);
    CHECK(got[0].body == "min");
    CHECK(Cursor{} < got[0].cursor());
  }
}

// ---------------------------------------------------------------- SQLite only: files, durability, schema

TEST_CASE("reopening after close keeps messages and client rows") {
  TempDir tmp;
  const std::string dir = (tmp.path() / "nested" / "data").string();  // created on open
  std::vector<std::int64_t> seqs;
  {
    auto store = open_sqlite_store(dir);
    const std::vector<NewMessage> batch{msg("bob", "alice", "one", Kind::direct, 10, 7),
                                        msg("bob", "carol", "two", Kind::channel, 20, 8)};
    save_new(*store, batch);
    const std::vector<ClientRow> rows{{"alice", "10.0.0.1", 5000, true}, {"bob", "10.0.0.2", 5001, false}};
    store->store_clients(rows);
    for (const auto& m : store->pending_for("bob", {}, everything)) seqs.push_back(m.seq);
  }
  auto store = open_sqlite_store(dir);
  const auto got = store->pending_for("bob", {}, everything);
  REQUIRE(got.size() == 2);
  CHECK(got[0].seq == seqs[0]);
  CHECK(got[0].from == "alice");
  CHECK(got[0].body == "one");
  CHECK(got[0].mid == 7);
  CHECK(got[1].kind == Kind::channel);
  CHECK(got[1].ts_us == 20);
  const auto clients = store->load_clients();
  REQUIRE(clients.size() == 2);
  CHECK(clients[0].name == "alice");
  CHECK(clients[0].ip == "10.0.0.1");
  CHECK(clients[0].port == 5000);
  CHECK(clients[0].online);
  CHECK(clients[1].name == "bob");
  CHECK_FALSE(clients[1].online);

  // New saves continue after the old seqs.
  const std::vector<NewMessage> more{msg("bob", "alice", "three")};
  save_new(*store, more);
  const auto next = store->pending_for("bob", got[1].cursor(), everything);
  REQUIRE(next.size() == 1);
  CHECK(next[0].seq > seqs[1]);
}

TEST_CASE("a writer killed mid-stream loses no save it reported") {
  TempDir tmp;
  int fds[2];
  REQUIRE(pipe(fds) == 0);
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // The child: report index i only after save() returned, i.e. after its commit.
    close(fds[0]);
    try {
      auto store = open_sqlite_store(tmp.str());
      for (std::uint32_t i = 0;; ++i) {
        const std::vector<NewMessage> one{
            msg("bob", "alice", std::to_string(i) + std::string(100, '.'), Kind::direct, i, i)};
        if (store->save(one) != std::vector<bool>{true}) _exit(4);
        if (write(fds[1], &i, sizeof i) != static_cast<ssize_t>(sizeof i)) _exit(3);
      }
    } catch (...) {
      _exit(2);
    }
  }
  close(fds[1]);

  constexpr std::size_t read_before_kill = 200;
  std::vector<std::uint32_t> reported;
  std::uint32_t idx = 0;
  while (reported.size() < read_before_kill && read_exact(fds[0], &idx, sizeof idx)) reported.push_back(idx);
  REQUIRE(kill(pid, SIGKILL) == 0);
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  INFO("child exit status " << (WIFEXITED(status) ? WEXITSTATUS(status) : -1));
  CHECK(WIFSIGNALED(status));
  REQUIRE(reported.size() == read_before_kill);
  // What the child reported between our last read and the kill counts too.
  while (read_exact(fds[0], &idx, sizeof idx)) reported.push_back(idx);
  close(fds[0]);

  {
    auto store = open_sqlite_store(tmp.str());
    std::map<std::uint32_t, int> times_present;
    for (const auto& m : store->pending_for("bob", {}, everything)) {
      const auto i = static_cast<std::uint32_t>(std::stoul(m.body));
      CHECK(m.mid == i);
      ++times_present[i];
    }
    for (const auto i : reported) {
      CAPTURE(i);
      CHECK(times_present[i] == 1);
    }
    // Commits are sequential: what survived is a prefix 0..k with no gap or duplicate.
    std::uint32_t expect = 0;
    for (const auto& [i, n] : times_present) {
      CHECK(i == expect++);
      CHECK(n == 1);
    }
    CHECK(times_present.size() >= reported.size());
    CHECK(times_present.size() <= reported.size() + 1);  // at most one commit the child did not report
  }
  RawDb raw(tmp.path() / "chat.db");
  CHECK(raw.query_text("PRAGMA integrity_check") == "ok");
}

TEST_CASE("an unknown schema version is refused and left as found") {
  TempDir tmp;
  { auto store = open_sqlite_store(tmp.str()); }
  {
    RawDb raw(tmp.path() / "chat.db");
    CHECK(raw.query_text("PRAGMA user_version") == "4");
    raw.exec("PRAGMA user_version=99");
  }
  std::string what;
  try {
    auto store = open_sqlite_store(tmp.str());
    FAIL("opened a store with schema version 99");
  } catch (const StoreError& e) {
    what = e.what();
  }
  INFO(what);
  CHECK(what.find("99") != std::string::npos);
  CHECK(what.find("expects 4") != std::string::npos);
  RawDb raw(tmp.path() / "chat.db");
  CHECK(raw.query_text("PRAGMA user_version") == "99");
}

TEST_CASE("a database that is not a ChatApp store is refused") {
  TempDir tmp;
  SUBCASE("foreign tables and no version") {
    RawDb raw(tmp.path() / "chat.db");
    raw.exec("CREATE TABLE other (x INTEGER)");
  }
  SUBCASE("not an SQLite file at all") {
    std::ofstream(tmp.path() / "chat.db") << std::string(4096, 'g');
  }
  CHECK_THROWS_AS(open_sqlite_store(tmp.str()), StoreError);
}

TEST_CASE("a directory that cannot be created is a StoreError") {
  TempDir tmp;
  std::ofstream(tmp.path() / "file") << "x";
  CHECK_THROWS_AS(open_sqlite_store((tmp.path() / "file" / "sub").string()), StoreError);
}

TEST_CASE("the golden schema-1 database opens: every client row intact, its plain-text messages kept aside") {
  // tests/data/golden-v1/chat.db was written by the code of schema version 1 (commit ebd2e90);
  // every later schema must open it, migrating on open, and lose nothing. Its messages are plain
  // text from senders nobody authenticated: since schema 3 they are kept in legacy_messages and
  // never delivered.
  const fs::path golden = golden_v1();
  INFO("golden file " << golden);
  REQUIRE(fs::exists(golden));
  TempDir tmp;
  fs::copy_file(golden, tmp.path() / "chat.db");
  auto store = open_sqlite_store(tmp.str());

  CHECK(store->legacy_count() == 6);
  for (const char* to : {"alice", "bob", "carol", "dave"}) {
    CAPTURE(to);
    CHECK(store->count_for(to) == 0);
    CHECK(store->pending_for(to, {}, everything).empty());
  }

  const auto clients = store->load_clients();
  REQUIRE(clients.size() == 4);
  const std::vector<ClientRow> want{{"alice", "10.0.0.1", 5000, true, ""},
                                    {"bob", "10.0.0.2", 5001, false, ""},
                                    {"carol", "192.168.1.3", 65535, true, ""},
                                    {"dave", "172.16.0.4", 6000, false, ""}};
  for (std::size_t i = 0; i < want.size(); ++i) {
    CAPTURE(i);
    CHECK(clients[i].name == want[i].name);
    CHECK(clients[i].ip == want[i].ip);
    CHECK(clients[i].port == want[i].port);
    CHECK(clients[i].online == want[i].online);
    CHECK(clients[i].key.empty());  // not bound yet: the name's next registration binds it
  }

  // The migrated file takes new sealed messages.
  const std::vector<NewMessage> more{msg("dave", "alice", "new", Kind::direct, 1'700'000'000'000'600, 4),
                                     msg("dave", "alice", "repeat", Kind::direct, 1, 4)};
  CHECK(store->save(more) == std::vector<bool>{true, false});
  const auto dave = store->pending_for("dave", {}, everything);
  REQUIRE(dave.size() == 1);
  CHECK(dave[0].body == "new");
  store.reset();
  RawDb raw(tmp.path() / "chat.db");
  CHECK(raw.query_text("PRAGMA integrity_check") == "ok");
  // Every old row is there, as it was (seq 5 was delivered before the file was committed).
  CHECK(raw.query_text("SELECT group_concat(seq || ' ' || recipient || ' ' || sender, ',') FROM "
                       "(SELECT * FROM legacy_messages ORDER BY seq)") ==
        "1 bob alice,2 carol alice,3 bob carol,4 carol bob,6 bob dave,7 dave carol");
  CHECK(raw.query_text("SELECT text FROM legacy_messages WHERE seq = 6") == "late commit, early stamp");
}

TEST_CASE("a schema-1 store is migrated to 4 on open and ends up with a fresh store's schema") {
  TempDir tmp;
  const fs::path old_dir = tmp.path() / "old";
  const fs::path fresh_dir = tmp.path() / "fresh";
  fs::create_directories(old_dir);
  fs::copy_file(golden_v1(), old_dir / "chat.db");
  {
    RawDb raw(old_dir / "chat.db");
    REQUIRE(raw.query_text("PRAGMA user_version") == "1");
  }
  { auto store = open_sqlite_store(old_dir.string()); }
  { auto store = open_sqlite_store(fresh_dir.string()); }

  const std::string schema_query =
      "SELECT group_concat(type || ' ' || name || ' ' || tbl_name || ': ' || sql, char(10)) "
      "FROM (SELECT * FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name)";
  RawDb migrated(old_dir / "chat.db");
  RawDb fresh(fresh_dir / "chat.db");
  CHECK(migrated.query_text("PRAGMA user_version") == "4");
  CHECK(fresh.query_text("PRAGMA user_version") == "4");
  const auto schema = fresh.query_text(schema_query);
  INFO(schema);
  CHECK(migrated.query_text(schema_query) == schema);
  CHECK(schema.find("index messages_by_arrival messages: CREATE INDEX") != std::string::npos);
  CHECK(schema.find("index messages_once messages: CREATE UNIQUE INDEX") != std::string::npos);
  CHECK(schema.find("messages_by_recipient") == std::string::npos);
  CHECK(migrated.query_text("SELECT group_concat(name, ',') FROM pragma_index_info('messages_by_arrival')") ==
        "recipient,ts_us,seq");
  CHECK(migrated.query_text("SELECT count(*) FROM messages") == "0");
  CHECK(migrated.query_text("SELECT count(*) FROM legacy_messages") == "6");
  CHECK(migrated.query_text("SELECT count(*) FROM clients") == "4");
  CHECK(migrated.query_text("PRAGMA integrity_check") == "ok");

  CHECK(schema.find("table files files: CREATE TABLE files") != std::string::npos);
  // A second open finds version 4 and changes nothing.
  { auto store = open_sqlite_store(old_dir.string()); }
  CHECK(migrated.query_text(schema_query) == schema);
  CHECK(migrated.query_text("SELECT count(*) FROM legacy_messages") == "6");
}

TEST_CASE("a migration that fails part-way leaves the schema-1 store as it was") {
  TempDir tmp;
  fs::copy_file(golden_v1(), tmp.path() / "chat.db");
  {
    // A hand-made index in the way makes the step's CREATE INDEX fail after its DROP INDEX ran.
    RawDb raw(tmp.path() / "chat.db");
    raw.exec("CREATE INDEX messages_by_arrival ON clients (name)");
  }
  CHECK_THROWS_AS(open_sqlite_store(tmp.str()), StoreError);
  RawDb raw(tmp.path() / "chat.db");
  CHECK(raw.query_text("PRAGMA user_version") == "1");
  CHECK(raw.query_text("SELECT count(*) FROM sqlite_master WHERE name = 'messages_by_recipient'") == "1");
  CHECK(raw.query_text("SELECT count(*) FROM messages") == "6");
  CHECK(raw.query_text("SELECT count(*) FROM clients") == "4");
  CHECK(raw.query_text("PRAGMA integrity_check") == "ok");
}

// ---------------------------------------------------------------- memory only: injected failures

TEST_CASE("MemoryStore::fail_next(n) fails the next n writes and reads of messages, changing nothing") {
  MemoryStore store;
  const std::vector<NewMessage> first{msg("bob", "alice", "kept", Kind::direct, 10)};
  save_new(store, first);
  const std::vector<ClientRow> rows{{"alice", "10.0.0.1", 5000, true}};
  store.store_clients(rows);
  const auto seq_of_kept = store.pending_for("bob", {}, everything).at(0).seq;

  store.fail_next(4);
  const std::vector<NewMessage> lost{msg("bob", "alice", "lost", Kind::direct, 20)};
  CHECK_THROWS_AS((void)store.save(lost), StoreError);
  // count_for and load_clients are not among the four: they keep answering, and show nothing changed.
  CHECK(store.count_for("bob") == 1);
  CHECK(show(store.load_clients()) == show(rows));
  CHECK_THROWS_AS(store.pending_for("bob", {}, everything), StoreError);
  const std::vector<std::int64_t> kept_seq{seq_of_kept};
  CHECK_THROWS_AS(store.remove_delivered("bob", kept_seq), StoreError);
  CHECK(store.count_for("bob") == 1);
  const std::vector<ClientRow> moved{{"alice", "10.0.0.9", 5009, false}};
  CHECK_THROWS_AS(store.store_clients(moved), StoreError);
  CHECK(show(store.load_clients()) == show(rows));

  // The fifth call works, and the failed save used no seq (as a rolled-back transaction uses none).
  const auto again = store.save(lost);
  CHECK(again == std::vector<bool>{true});
  const auto got = store.pending_for("bob", {}, everything);
  CHECK(texts_of(got) == std::vector<std::string>{"kept", "lost"});
  CHECK(got.at(1).seq == seq_of_kept + 1);
  store.remove_delivered("bob", kept_seq);
  CHECK(store.count_for("bob") == 1);
  store.store_clients(moved);
  CHECK(show(store.load_clients()) == show(moved));

  SUBCASE("fail_next(0) cancels what is left") {
    store.fail_next(3);
    CHECK_THROWS_AS(store.pending_for("bob", {}, 1), StoreError);
    store.fail_next(0);
    CHECK(store.pending_for("bob", {}, 1).size() == 1);
  }
  SUBCASE("an empty batch or row list is a call too") {
    store.fail_next(2);
    CHECK_THROWS_AS((void)store.save({}), StoreError);
    CHECK_THROWS_AS(store.store_clients({}), StoreError);
    CHECK(store.save({}).empty());
  }
}

TEST_CASE("MemoryStore::fail_next(call, n) fails only that call, before any untargeted failure") {
  MemoryStore store;
  const std::vector<NewMessage> one{msg("bob", "alice", "one")};
  save_new(store, one);

  store.fail_next(MemoryStore::Call::pending_for, 2);
  const std::vector<NewMessage> two{msg("bob", "alice", "two")};
  save_new(store, two);
  CHECK(store.count_for("bob") == 2);
  CHECK_THROWS_AS(store.pending_for("bob", {}, everything), StoreError);
  CHECK_THROWS_AS(store.pending_for("bob", {}, everything), StoreError);
  CHECK(store.pending_for("bob", {}, everything).size() == 2);

  // The two calls an untargeted fail_next leaves alone can still be failed by name.
  store.fail_next(MemoryStore::Call::count_for, 1);
  CHECK_THROWS_AS(store.count_for("bob"), StoreError);
  CHECK(store.count_for("bob") == 2);
  store.fail_next(MemoryStore::Call::load_clients, 1);
  CHECK_THROWS_AS(store.load_clients(), StoreError);
  CHECK(store.load_clients().empty());

  store.fail_next(1);
  store.fail_next(MemoryStore::Call::remove_delivered, 1);
  const std::vector<std::int64_t> none{};
  CHECK_THROWS_AS(store.remove_delivered("bob", none), StoreError);  // the targeted one
  CHECK(store.count_for("bob") == 2);                                 // not counted by either
  CHECK_THROWS_AS(store.remove_delivered("bob", none), StoreError);  // the untargeted one
  store.remove_delivered("bob", none);

  std::string what;
  store.fail_next(MemoryStore::Call::save, 1);
  try {
    (void)store.save(one);
  } catch (const StoreError& e) {
    what = e.what();
  }
  CHECK(what.find("save") != std::string::npos);
}

TEST_CASE("memory stores share nothing, and open_memory_store gives a MemoryStore") {
  auto a = open_memory_store();
  auto b = open_memory_store();
  const std::vector<NewMessage> one{msg("bob", "alice", "one")};
  save_new(*a, one);
  const std::vector<ClientRow> rows{{"alice", "10.0.0.1", 5000, true}};
  a->store_clients(rows);
  CHECK(b->count_for("bob") == 0);
  CHECK(b->load_clients().empty());
  // The same message is new to the other store, and gets the first seq there too.
  CHECK(b->save(one) == std::vector<bool>{true});
  CHECK(show(a->pending_for("bob", {}, everything)) == show(b->pending_for("bob", {}, everything)));
  auto* mem = dynamic_cast<MemoryStore*>(a.get());
  REQUIRE(mem != nullptr);
  mem->fail_next(1);
  CHECK_THROWS_AS(a->pending_for("bob", {}, everything), StoreError);
  CHECK(b->pending_for("bob", {}, everything).size() == 1);
}

// ---------------------------------------------------------------- both backends, side by side

TEST_CASE("the memory store answers a random workload exactly as the SQLite store does, seqs included") {
  const SqliteBackend disk_backend;
  auto disk = disk_backend.open();
  auto mem = open_memory_store();
  std::mt19937_64 rng(20'240'601);  // fixed: the run is the same every time
  const auto pick = [&rng](std::size_t n) { return static_cast<std::size_t>(rng() % n); };
  const std::vector<std::string> names{"alice", "bob", "carol", std::string("a\0b", 3), ""};
  const std::vector<std::int64_t> stamps{std::numeric_limits<std::int64_t>::min(), -1, 0, 5, 5, 7,
                                         1'700'000'000'000'000, std::numeric_limits<std::int64_t>::max()};
  std::vector<StoredMessage> seen;  // for cursors and seqs taken from real rows
  std::size_t saves = 0;
  std::size_t repeats = 0;
  std::size_t failures = 0;
  std::size_t removed = 0;

  for (int step = 0; step < 400; ++step) {
    CAPTURE(step);
    const auto op = pick(10);
    if (op < 4) {
      std::vector<NewMessage> batch;
      const auto n = pick(5);
      for (std::size_t i = 0; i < n; ++i) {
        // Few mids, so repeats (across and within batches) happen; now and then a kind the table refuses.
        const auto kind = pick(40) == 0 ? static_cast<Kind>(7) : static_cast<Kind>(pick(2));
        batch.push_back(msg(names[pick(names.size())], names[pick(names.size())],
                            "m" + std::to_string(step) + "." + std::to_string(i), kind, stamps[pick(stamps.size())],
                            pick(6)));
      }
      std::vector<bool> from_disk;
      std::vector<bool> from_mem;
      bool disk_failed = false;
      bool mem_failed = false;
      try {
        from_disk = disk->save(batch);
      } catch (const StoreError&) {
        disk_failed = true;
      }
      try {
        from_mem = mem->save(batch);
      } catch (const StoreError&) {
        mem_failed = true;
      }
      REQUIRE(disk_failed == mem_failed);
      CHECK(from_disk == from_mem);
      failures += disk_failed ? 1 : 0;
      saves += from_disk.size();
      repeats += static_cast<std::size_t>(std::count(from_disk.begin(), from_disk.end(), false));
    } else if (op < 7) {
      const auto& to = names[pick(names.size())];
      Cursor after;
      if (!seen.empty() && pick(3) != 0) {
        after = seen[pick(seen.size())].cursor();
      } else if (pick(2) == 0) {
        after = Cursor{stamps[pick(stamps.size())], static_cast<std::int64_t>(pick(40)) - 2};
      }
      const std::size_t limit = pick(4) == 0 ? everything : pick(6);
      const auto got = disk->pending_for(to, after, limit);
      CHECK(show(got) == show(mem->pending_for(to, after, limit)));
      seen.insert(seen.end(), got.begin(), got.end());
      CHECK(disk->count_for(to) == mem->count_for(to));
    } else if (op < 9) {
      // Seqs of rows seen (possibly another recipient's, or already gone) and some made up.
      std::vector<std::int64_t> seqs;
      const auto n = pick(4);
      for (std::size_t i = 0; i < n; ++i) {
        seqs.push_back(!seen.empty() && pick(4) != 0 ? seen[pick(seen.size())].seq
                                                      : static_cast<std::int64_t>(pick(200)) - 5);
      }
      const auto& to = names[pick(names.size())];
      const auto before = disk->count_for(to);
      disk->remove_delivered(to, seqs);
      mem->remove_delivered(to, seqs);
      removed += before - disk->count_for(to);
      CHECK(disk->count_for(to) == mem->count_for(to));
    } else {
      std::vector<ClientRow> rows;
      const auto n = pick(3);
      for (std::size_t i = 0; i < n; ++i) {
        rows.push_back({names[pick(names.size())], "10.0.0." + std::to_string(pick(4)),
                        static_cast<std::uint16_t>(pick(65536)), pick(2) == 0});
      }
      disk->store_clients(rows);
      mem->store_clients(rows);
      CHECK(show(disk->load_clients()) == show(mem->load_clients()));
    }
  }
  for (const auto& to : names) {
    CAPTURE(to);
    CHECK(show(disk->pending_for(to, {}, everything)) == show(mem->pending_for(to, {}, everything)));
  }
  // The workload must have reached the cases it is meant to compare.
  CHECK(repeats > 10);
  CHECK(saves - repeats > 50);
  CHECK(failures > 0);
  CHECK(removed > 10);
}
