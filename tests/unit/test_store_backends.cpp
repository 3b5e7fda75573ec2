// The AsyncStore contract run against every backend (memory, SQLite, PostgreSQL), and what only
// the shared PostgreSQL store does: changes between servers, the lease, a database restart.
#include <doctest/doctest.h>
#include <libpq-fe.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <boost/asio/io_context.hpp>

#include "file_bytes.hpp"
#include "temp_dir.hpp"
#include "offline/async_store.hpp"
#include "offline/pg_store.hpp"
#include "offline/store.hpp"

namespace fs = std::filesystem;
namespace net = boost::asio;
using namespace chat::offline;
using namespace std::chrono_literals;

using TempDir = chat::test::TempDir;
using chat::test::random_bytes;

namespace {

constexpr auto everything = std::numeric_limits<std::size_t>::max();
/// How long any one expected event may take before the test fails.
constexpr auto deadline = 20s;

/// Runs a shell command; its standard output without the trailing newline. Fails the test if it fails.
std::string run_command(const std::string& cmd) {
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  std::string out;
  char buf[256];
  while (std::size_t n = std::fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  const int status = pclose(p);
  INFO("command: " << cmd << "\noutput: " << out);
  REQUIRE(status == 0);
  while (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

std::string pg_script() { return CHATAPP_PG_SCRIPT; }

/// The cluster of ctest's pg fixture; a missing one fails the test (it must not pass unseen).
std::string pg_dir() {
  const char* d = std::getenv("CHATAPP_PG_DIR");
  REQUIRE_MESSAGE(d != nullptr, "CHATAPP_PG_DIR is not set: run through ctest, whose pg fixture starts the cluster");
  return d;
}

/// A new database on the fixture's cluster.
std::string fresh_db() { return run_command(std::string(pg_script()).append(" newdb ").append(pg_dir())); }

/// Runs `io` until `done()` holds or the deadline passes; true if it holds.
template <class Pred>
bool run_until(net::io_context& io, Pred done, std::chrono::steady_clock::duration limit = deadline) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (!done()) {
    if (std::chrono::steady_clock::now() > end) return false;
    if (io.stopped()) io.restart();
    io.run_for(5ms);
  }
  return true;
}

/// Calls `submit` with a callback and runs `io` until it answered (an embedded store answers inline).
template <class T, class Submit>
Reply<T> answer(net::io_context& io, Submit submit) {
  std::optional<Reply<T>> got;
  submit([&got](Reply<T> r) { got = std::move(r); });
  REQUIRE_MESSAGE(run_until(io, [&] { return got.has_value(); }), "the store did not answer in time");
  return std::move(*got);
}

template <class T>
T value(Reply<T> r) {
  INFO("store error: " << r.error);
  REQUIRE(r.ok());
  return std::move(*r.value);
}

NewMessage msg(std::string to, std::string from, std::uint64_t mid, std::int64_t ts_us, std::string body) {
  return NewMessage{.to = std::move(to),
                    .from = std::move(from),
                    .from_key = std::string(32, 'k'),
                    .kind = Kind::direct,
                    .ts_us = ts_us,
                    .mid = mid,
                    .body = std::move(body)};
}

/// A kept file from alice; `size` stands for the plaintext bytes (the data is what the sender sealed).
NewFile kept_file(std::string to, std::uint64_t transfer, std::int64_t ts_us, std::string data, std::uint64_t size) {
  return NewFile{.to = std::move(to),
                 .from = "alice",
                 .from_key = std::string(32, '\x05'),
                 .transfer = transfer,
                 .ts_us = ts_us,
                 .size = size,
                 .offer = std::string("sealed offer \x00\xff", 15),
                 .data = std::move(data)};
}

/// What files_for lists of `f`: everything but the data.
HeldFile held(const NewFile& f) { return HeldFile{f.from, f.from_key, f.transfer, f.ts_us, f.size, f.offer}; }

ClientRow client(std::string name, std::uint16_t port, bool online, std::string key) {
  return ClientRow{.name = std::move(name), .ip = "127.0.0.1", .port = port, .online = online, .key = std::move(key)};
}

/// One store and the calls of the tests, each run to its answer.
class Harness {
 public:
  explicit Harness(net::io_context& io, std::unique_ptr<AsyncStore> s) : io_(io), store_(std::move(s)) {}

  AsyncStore& store() { return *store_; }

  Reply<std::vector<bool>> try_save(std::vector<NewMessage> batch) {
    return answer<std::vector<bool>>(io_, [&](auto cb) { store_->save(std::move(batch), cb); });
  }
  std::vector<bool> save(std::vector<NewMessage> batch) { return value(try_save(std::move(batch))); }
  std::vector<StoredMessage> pending(const std::string& to, Cursor after = {}, std::size_t limit = everything) {
    return value(answer<std::vector<StoredMessage>>(io_, [&](auto cb) { store_->pending_for(to, after, limit, cb); }));
  }
  std::size_t count(const std::string& to) {
    return value(answer<std::size_t>(io_, [&](auto cb) { store_->count_for(to, cb); }));
  }
  void remove(const std::string& to, std::vector<std::int64_t> seqs) {
    CHECK(value(answer<bool>(io_, [&](auto cb) { store_->remove_delivered(to, std::move(seqs), cb); })));
  }
  std::vector<bool> write(std::vector<RowWrite> rows) {
    return value(answer<std::vector<bool>>(io_, [&](auto cb) { store_->store_clients(std::move(rows), cb); }));
  }
  bool put_file(NewFile f) { return value(answer<bool>(io_, [&](auto cb) { store_->put_file(std::move(f), cb); })); }
  std::vector<HeldFile> files(const std::string& to) {
    return value(answer<std::vector<HeldFile>>(io_, [&](auto cb) { store_->files_for(to, cb); }));
  }
  std::optional<std::string> file_data(const std::string& to, std::uint64_t transfer) {
    return value(answer<std::optional<std::string>>(io_, [&](auto cb) { store_->file_data(to, transfer, cb); }));
  }
  bool delete_file(const std::string& to, std::uint64_t transfer) {
    return value(answer<bool>(io_, [&](auto cb) { store_->delete_file(to, transfer, cb); }));
  }
  std::uint64_t file_bytes(const std::string& to) {
    return value(answer<std::uint64_t>(io_, [&](auto cb) { store_->file_bytes_for(to, cb); }));
  }
  std::size_t expire_files(std::int64_t before_us) {
    return value(answer<std::size_t>(io_, [&](auto cb) { store_->expire_files(before_us, cb); }));
  }

 private:
  net::io_context& io_;
  std::unique_ptr<AsyncStore> store_;
};

}  // namespace

// Named, not anonymous: doctest shows the type in the test's name.
namespace backend {

struct Memory {
  std::unique_ptr<AsyncStore> open(net::io_context&) { return adapt(open_memory_store()); }
  static constexpr bool shared = false;
};

struct Sqlite {
  TempDir dir;
  std::unique_ptr<AsyncStore> open(net::io_context&) { return adapt(open_sqlite_store(dir.str())); }
  static constexpr bool shared = false;
};

}  // namespace backend

namespace {

PgOptions pg_options(const std::string& uri, const std::string& id) {
  PgOptions o;
  o.uri = uri;
  o.server_id = id;
  return o;
}

}  // namespace

namespace backend {

struct Pg {
  std::string uri = fresh_db();
  std::unique_ptr<AsyncStore> open(net::io_context& io) { return open_pg_store(io, pg_options(uri, "test:1")); }
  static constexpr bool shared = true;
};

}  // namespace backend

namespace {

template <class Backend>
struct Fixture {
  net::io_context io;
  Backend backend;
  Harness h{io, backend.open(io)};
};

}  // namespace

#define ALL_BACKENDS backend::Memory, backend::Sqlite, backend::Pg

TEST_CASE_TEMPLATE("save answers one flag per message, false for a duplicate also inside one batch", B, ALL_BACKENDS) {
  Fixture<B> f;
  CHECK(f.h.save({msg("bob", "alice", 1, 100, "a"), msg("bob", "alice", 2, 100, "b")}) == std::vector<bool>{true, true});
  // The same (recipient, sender, mid) again: not stored twice; another recipient is another message.
  CHECK(f.h.save({msg("bob", "alice", 1, 200, "again"), msg("carol", "alice", 1, 100, "c")}) ==
        std::vector<bool>{false, true});
  CHECK(f.h.save({msg("dave", "alice", 7, 100, "d"), msg("dave", "alice", 7, 100, "d")}) ==
        std::vector<bool>{true, false});
  CHECK(f.h.save({}).empty());
  CHECK(f.h.count("bob") == 2);
  CHECK(f.h.count("carol") == 1);
  CHECK(f.h.count("dave") == 1);
  CHECK(f.h.count("nobody") == 0);
  const auto bob = f.h.pending("bob");
  REQUIRE(bob.size() == 2);
  CHECK(bob[0].body == "a");  // the duplicate did not replace the first
}

TEST_CASE_TEMPLATE("pending_for reads in (ts_us, seq) order and continues after a cursor", B, ALL_BACKENDS) {
  Fixture<B> f;
  const std::string binary("\0\xff\x01 body", 8);
  f.h.save({msg("bob", "alice", 1, 300, "third"), msg("bob", "carol", 2, 100, "first"),
            msg("bob", "dave", 3, 200, "second-a"), msg("zoe", "alice", 4, 50, "other")});
  f.h.save({msg("bob", "erin", std::numeric_limits<std::uint64_t>::max(), 200, binary)});
  const auto all = f.h.pending("bob");
  REQUIRE(all.size() == 4);
  CHECK(all[0].body == "first");
  CHECK(all[1].body == "second-a");
  CHECK(all[2].body == binary);  // same ts_us as second-a, saved later: after it
  CHECK(all[2].mid == std::numeric_limits<std::uint64_t>::max());
  CHECK(all[2].from == "erin");
  CHECK(all[2].from_key == std::string(32, 'k'));
  CHECK(all[2].kind == Kind::direct);
  CHECK(all[2].ts_us == 200);
  CHECK(all[3].body == "third");
  for (std::size_t i = 1; i < all.size(); ++i) CHECK(all[i - 1].cursor() < all[i].cursor());

  const auto page1 = f.h.pending("bob", {}, 2);
  REQUIRE(page1.size() == 2);
  const auto page2 = f.h.pending("bob", page1.back().cursor(), 2);
  REQUIRE(page2.size() == 2);
  CHECK(page2[0].seq == all[2].seq);
  CHECK(page2[1].seq == all[3].seq);
  CHECK(f.h.pending("bob", page2.back().cursor(), 2).empty());
}

TEST_CASE_TEMPLATE("remove_delivered deletes only the given messages of that recipient", B, ALL_BACKENDS) {
  Fixture<B> f;
  f.h.save({msg("bob", "alice", 1, 1, "b1"), msg("bob", "alice", 2, 2, "b2"), msg("bob", "alice", 3, 3, "b3"),
            msg("carol", "alice", 1, 1, "c1")});
  const auto bob = f.h.pending("bob");
  const auto carol = f.h.pending("carol");
  REQUIRE(bob.size() == 3);
  REQUIRE(carol.size() == 1);
  f.h.remove("bob", {bob[0].seq, bob[2].seq, carol[0].seq});  // carol's seq under bob's name: not hers to delete
  CHECK(f.h.count("bob") == 1);
  CHECK(f.h.pending("bob").at(0).body == "b2");
  CHECK(f.h.count("carol") == 1);
  f.h.remove("bob", {});
  f.h.remove("bob", {bob[0].seq});  // already gone
  CHECK(f.h.count("bob") == 1);
}

TEST_CASE_TEMPLATE("store_clients and load: the rows, the mailboxes, this server's sessions", B, ALL_BACKENDS) {
  Fixture<B> f;
  const std::string ka(32, 'a');
  const std::string kb(32, 'b');
  CHECK(f.h.write({{client("bob", 5001, true, kb), true}, {client("alice", 5000, true, ka), true}}) ==
        std::vector<bool>{true, true});
  CHECK(f.h.write({{client("bob", 5001, false, kb), false}}) == std::vector<bool>{true});  // went offline
  f.h.save({msg("bob", "alice", 1, 1, "x"), msg("bob", "alice", 2, 2, "y"), msg("alice", "bob", 1, 1, "z")});
  const Snapshot s = f.h.store().load();
  REQUIRE(s.clients.size() == 2);
  CHECK(s.clients[0].name == "alice");
  CHECK(s.clients[0].online);
  CHECK(s.clients[0].key == ka);
  CHECK(s.clients[0].port == 5000);
  CHECK(s.clients[1].name == "bob");
  CHECK(!s.clients[1].online);
  CHECK(s.clients[1].ip == "127.0.0.1");
  CHECK(s.here == std::vector<bool>{true, true});
  CHECK(s.mailboxes.at("bob") == 2);
  CHECK(s.mailboxes.at("alice") == 1);
  CHECK(s.mailboxes.size() == 2);
  CHECK(s.legacy == 0);
  CHECK(f.h.store().lease_held().has_value() == B::shared);
}

TEST_CASE_TEMPLATE("kept files: put, list oldest first without the data, read back byte for byte, count, delete, expire",
                   B, ALL_BACKENDS) {
  Fixture<B> f;
  REQUIRE(f.h.store().keeps_files());
  constexpr std::uint64_t last_id = 0xFFFF'FFFF'FFFF'FFFFull;  // the largest transfer id: its bit pattern is negative
  const std::string big = random_bytes(16u << 20, 7);          // the server's --max-file-size default
  const NewFile big_file = kept_file("bob", last_id, 2'000, big, 16'000'000);
  const NewFile small_file = kept_file("bob", 7, 1'000, std::string("\x00two\x00", 5), 2);
  const NewFile carol_file = kept_file("carol", 7, 500, "c", 1);
  CHECK(f.h.put_file(big_file));
  CHECK(f.h.put_file(small_file));
  CHECK(f.h.put_file(carol_file));  // the same transfer id for another recipient is another file

  // Oldest first (not in the order put), everything but the data.
  CHECK(f.h.files("bob") == std::vector<HeldFile>{held(small_file), held(big_file)});
  CHECK(f.h.files("carol") == std::vector<HeldFile>{held(carol_file)});
  CHECK(f.h.files("nobody").empty());

  const auto data = f.h.file_data("bob", last_id);
  REQUIRE(data.has_value());
  CHECK(data->size() == big.size());
  CHECK((*data == big));  // (not decomposed: 16 MiB would be printed)
  CHECK(f.h.file_data("bob", 7) == std::string("\x00two\x00", 5));
  CHECK(f.h.file_data("carol", 8) == std::nullopt);
  CHECK(f.h.file_data("alice", 7) == std::nullopt);  // another recipient's transfer id is not ours
  CHECK(f.h.file_bytes("bob") == 16'000'002);
  CHECK(f.h.file_bytes("carol") == 1);
  CHECK(f.h.file_bytes("nobody") == 0);

  // The same (to, transfer) again, with other contents: false, and what is kept is unchanged.
  CHECK_FALSE(f.h.put_file(kept_file("bob", 7, 9'000, "other", 5)));
  CHECK(f.h.file_data("bob", 7) == std::string("\x00two\x00", 5));
  CHECK(f.h.files("bob") == std::vector<HeldFile>{held(small_file), held(big_file)});
  CHECK(f.h.file_bytes("bob") == 16'000'002);

  CHECK(f.h.delete_file("bob", 7));
  CHECK_FALSE(f.h.delete_file("bob", 7));
  CHECK_FALSE(f.h.delete_file("alice", last_id));
  CHECK(f.h.files("bob") == std::vector<HeldFile>{held(big_file)});
  CHECK(f.h.file_data("bob", 7) == std::nullopt);
  CHECK(f.h.file_bytes("bob") == 16'000'000);

  // Only what arrived before the bound goes.
  CHECK(f.h.expire_files(500) == 0);
  CHECK(f.h.expire_files(1'000) == 1);  // carol's, at 500
  CHECK(f.h.files("carol").empty());
  CHECK(f.h.files("bob") == std::vector<HeldFile>{held(big_file)});
  CHECK(f.h.expire_files(2'000) == 0);
  CHECK(f.h.expire_files(2'001) == 1);
  CHECK(f.h.files("bob").empty());
  CHECK(f.h.file_bytes("bob") == 0);
  CHECK(f.h.expire_files(std::numeric_limits<std::int64_t>::max()) == 0);
}

TEST_CASE_TEMPLATE("delete_file with no callback still deletes, and calls behind it see it gone", B, ALL_BACKENDS) {
  Fixture<B> f;
  CHECK(f.h.put_file(kept_file("bob", 1, 10, "aa", 2)));
  CHECK(f.h.put_file(kept_file("bob", 2, 11, "bb", 2)));
  f.h.store().delete_file("bob", 1, {});
  CHECK(f.h.files("bob") == std::vector<HeldFile>{held(kept_file("bob", 2, 11, "bb", 2))});
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL only: the checks the embedded adapter leaves to the server (it is the only writer),
// and what several servers sharing one database see of each other.

namespace {

/// Two or three servers on one database and one io_context.
struct Servers {
  net::io_context io;
  std::string uri = fresh_db();

  std::unique_ptr<AsyncStore> open(const std::string& id, std::chrono::milliseconds lease_every = 2'000ms,
                                   std::chrono::milliseconds lease_for = 10'000ms,
                                   std::chrono::milliseconds poll_every = 1'000ms) {
    PgOptions o = pg_options(uri, id);
    o.lease_every = lease_every;
    o.lease_for = lease_for;
    o.poll_every = poll_every;
    return open_pg_store(io, o);
  }
};

std::string describe(const Change& c) {
  if (c.what == Change::What::mail) return std::string("mail ").append(c.to).append(" ").append(std::to_string(c.delta));
  if (c.what == Change::What::released) return std::string("released ").append(c.to);
  if (c.what == Change::What::resync) {
    std::string out = "resync";
    for (std::size_t i = 0; i < c.snapshot->clients.size(); ++i) {
      out.append(i == 0 ? " " : ", ").append(c.snapshot->clients[i].name).append(c.snapshot->clients[i].online ? " online" : " offline");
      if (c.snapshot->here[i]) out.append(" here");
    }
    std::map<std::string, std::size_t> boxes(c.snapshot->mailboxes.begin(), c.snapshot->mailboxes.end());
    for (const auto& [to, n] : boxes) out.append(", mail ").append(to).append(" ").append(std::to_string(n));
    return out;
  }
  return std::string("client ")
      .append(c.row.name)
      .append(c.row.online ? " online" : " offline")
      .append(c.here ? " here" : "");
}

/// A raw connection for what the store's interface hides.
class RawPg {
 public:
  explicit RawPg(const std::string& uri) : c_(PQconnectdb(uri.c_str())) { REQUIRE(PQstatus(c_) == CONNECTION_OK); }
  RawPg(const RawPg&) = delete;
  RawPg& operator=(const RawPg&) = delete;
  ~RawPg() { PQfinish(c_); }
  std::string query(const std::string& sql) {
    PGresult* r = PQexec(c_, sql.c_str());
    const auto status = PQresultStatus(r);
    std::string out = status == PGRES_TUPLES_OK && PQntuples(r) > 0 ? PQgetvalue(r, 0, 0) : "";
    INFO(sql << ": " << PQresultErrorMessage(r));
    PQclear(r);
    REQUIRE((status == PGRES_TUPLES_OK || status == PGRES_COMMAND_OK));
    return out;
  }

 private:
  PGconn* c_;
};

}  // namespace

TEST_CASE("pg: a binding to another key is refused, and so is an online flag for another address") {
  Fixture<backend::Pg> f;
  const std::string ka(32, 'a');
  const std::string kb(32, 'b');
  CHECK(f.h.write({{client("bob", 5001, true, kb), true}}) == std::vector<bool>{true});
  // Another identity claims the name: refused, the row unchanged; the same identity moves freely.
  CHECK(f.h.write({{client("bob", 6000, true, ka), true}, {client("alice", 5000, true, ka), true}}) ==
        std::vector<bool>{false, true});
  CHECK(f.h.write({{client("bob", 5002, true, kb), true}}) == std::vector<bool>{true});
  // bob is at port 5002 now: an offline flag for his old address (a stale session) is refused.
  CHECK(f.h.write({{client("bob", 5001, false, kb), false}, {client("alice", 5000, false, ka), false}}) ==
        std::vector<bool>{false, true});
  const Snapshot s = f.h.store().load();
  REQUIRE(s.clients.size() == 2);
  CHECK(s.clients[1].name == "bob");
  CHECK(s.clients[1].port == 5002);
  CHECK(s.clients[1].key == kb);
  CHECK(s.clients[1].online);
  CHECK(!s.clients[0].online);
}

TEST_CASE("pg: a write of many rows, bindings and online flags interleaved, answers each row's flag in order") {
  Fixture<backend::Pg> f;
  const std::string ka(32, 'a');
  const std::string kb(32, 'b');
  // 1,000 names bound to key a; then one write that mixes their online flags (even: this
  // address, written; odd: an old address, refused), a rebinding to key b (refused), the same
  // key on a new port (written) and new names, one of them still unbound (written).
  std::vector<RowWrite> first;
  for (int i = 0; i < 1000; ++i) first.push_back({client(std::string("u").append(std::to_string(i)), static_cast<std::uint16_t>(10000 + i), true, ka), true});
  CHECK(f.h.write(std::move(first)) == std::vector<bool>(1000, true));
  std::vector<RowWrite> mixed;
  std::vector<bool> expected;
  for (int i = 0; i < 1000; ++i) {
    const auto port = static_cast<std::uint16_t>(10000 + i + (i % 2));
    mixed.push_back({client(std::string("u").append(std::to_string(i)), port, false, ka), false});
    expected.push_back(i % 2 == 0);
  }
  mixed.insert(mixed.begin() + 10, {client("u1", 30000, true, kb), true});  // the odd flag for u1 is refused anyway
  expected.insert(expected.begin() + 10, false);
  mixed.erase(mixed.begin() + 1);  // u1 once only
  expected.erase(expected.begin() + 1);
  mixed.insert(mixed.begin() + 500, {client("u2", 30002, true, ka), true});
  expected.insert(expected.begin() + 500, true);
  mixed.erase(mixed.begin() + 1);  // u2 once only (its flag is second now)
  expected.erase(expected.begin() + 1);
  mixed.push_back({client("new1", 31000, true, kb), true});
  expected.push_back(true);
  mixed.push_back({client("unbound", 31001, true, ""), true});
  expected.push_back(true);
  CHECK(f.h.write(std::move(mixed)) == expected);
  const Snapshot s = f.h.store().load();
  REQUIRE(s.clients.size() == 1002);
  std::map<std::string, ClientRow> rows;
  for (const auto& c : s.clients) rows[c.name] = c;
  CHECK(!rows.at("u0").online);
  CHECK(rows.at("u1").key == ka);
  CHECK(rows.at("u1").port == 10001);
  CHECK(rows.at("u2").port == 30002);
  CHECK(rows.at("u2").online);
  CHECK(rows.at("u3").online);
  CHECK(rows.at("new1").key == kb);
  CHECK(rows.at("unbound").key.empty());
}

TEST_CASE("pg: a write naming one client twice answers an error and writes nothing") {
  Fixture<backend::Pg> f;
  auto r = answer<std::vector<bool>>(f.io, [&](auto cb) {
    f.h.store().store_clients({{client("bob", 5001, true, std::string(32, 'b')), true},
                               {client("bob", 5001, false, std::string(32, 'b')), false}},
                              cb);
  });
  CHECK(r.error == "offline store: store clients: the name bob twice in one write");
  CHECK(f.h.store().load().clients.empty());
}

TEST_CASE("pg: two servers racing to bind one new name: exactly one wins") {
  Servers db;
  auto a = db.open("a:1");
  auto b = db.open("b:1");
  std::optional<Reply<std::vector<bool>>> ra;
  std::optional<Reply<std::vector<bool>>> rb;
  a->store_clients({{client("zed", 7000, true, std::string(32, 'a')), true}}, [&](auto r) { ra = std::move(r); });
  b->store_clients({{client("zed", 7001, true, std::string(32, 'b')), true}}, [&](auto r) { rb = std::move(r); });
  REQUIRE(run_until(db.io, [&] { return ra && rb; }));
  const bool a_won = value(*ra).at(0);
  const bool b_won = value(*rb).at(0);
  CHECK(a_won != b_won);
  const Snapshot s = a->load();
  REQUIRE(s.clients.size() == 1);
  CHECK(s.clients[0].key == std::string(32, a_won ? 'a' : 'b'));
  CHECK(s.here.at(0) == a_won);
}

TEST_CASE("pg: changes of one server reach the others in commit order, each once, never the writer") {
  Servers db;
  auto a = db.open("a:1");
  auto b = db.open("b:1");
  auto c = db.open("c:1");
  Harness ha(db.io, std::move(a));
  Harness hb(db.io, std::move(b));
  Harness hc(db.io, std::move(c));
  for (auto* h : {&ha, &hb, &hc}) h->store().load();
  std::vector<std::string> seen_a, seen_b, seen_c;
  ha.store().watch([&](const Change& ch) { seen_a.push_back(describe(ch)); });
  hb.store().watch([&](const Change& ch) { seen_b.push_back(describe(ch)); });
  hc.store().watch([&](const Change& ch) { seen_c.push_back(describe(ch)); });

  // a and c write at the same time, each in a pipeline of its own; b only reads.
  std::vector<std::string> expect_a, expect_c;
  int answered = 0;
  for (int i = 0; i < 20; ++i) {
    const auto name = std::string("a").append(std::to_string(i));
    ha.store().store_clients({{client(name, static_cast<std::uint16_t>(6000 + i), true, std::string(32, 'a')), true}},
                             [&](auto r) { CHECK(r.ok()); ++answered; });
    expect_a.push_back(std::string("client ").append(name).append(" online"));
    hc.store().save({msg("bob", "carol", static_cast<std::uint64_t>(i), i, "x"), msg("dave", "carol", static_cast<std::uint64_t>(i), i, "y")},
                    [&](auto r) { CHECK(r.ok()); ++answered; });
    expect_c.push_back("mail bob 1");
    expect_c.push_back("mail dave 1");
  }
  REQUIRE(run_until(db.io, [&] { return answered == 40; }));
  const auto bob = hc.pending("bob");
  REQUIRE(bob.size() == 20);
  hc.remove("bob", {bob[0].seq, bob[1].seq});
  expect_c.push_back("mail bob -2");
  // A save that inserts nothing writes no change.
  hc.save({msg("bob", "carol", 5, 5, "x")});

  REQUIRE(run_until(db.io, [&] { return seen_b.size() >= expect_a.size() + expect_c.size(); }));
  // b sees each writer's changes in that writer's commit order (the two writers interleave).
  std::vector<std::string> b_clients, b_mail;
  for (const auto& s : seen_b) (s.rfind("mail", 0) == 0 ? b_mail : b_clients).push_back(s);
  CHECK(b_clients == expect_a);
  CHECK(b_mail == expect_c);

  // The writers: c hears a's, a hears c's; none its own. A last write by b, once read by both,
  // shows nothing else is still on its way.
  CHECK(hb.write({{client("last", 9000, true, std::string(32, 'l')), true}}) == std::vector<bool>{true});
  REQUIRE(run_until(db.io, [&] {
    return !seen_a.empty() && seen_a.back() == "client last online" && !seen_c.empty() && seen_c.back() == "client last online";
  }));
  CHECK(seen_a.size() == expect_c.size() + 1);
  CHECK(seen_c.size() == expect_a.size() + 1);
  for (const auto& s : seen_a) CHECK(s.rfind("client a", 0) != 0);
  for (const auto& s : seen_c) CHECK(s.rfind("mail", 0) != 0);
  CHECK(seen_b.size() == expect_a.size() + expect_c.size());  // b's own write not reported to b
}

TEST_CASE("pg: a change committed without a notification is read by the poll (a missed NOTIFY loses nothing)") {
  Servers db;
  auto b = db.open("b:1", 2'000ms, 10'000ms, 200ms);
  b->load();
  std::vector<std::string> seen;
  b->watch([&](const Change& ch) { seen.push_back(describe(ch)); });
  RawPg raw(db.uri);
  raw.query(
      "BEGIN; INSERT INTO clients (name, ip, port, online, key, server) VALUES ('quiet', '10.0.0.1', 5000, true, NULL, 'x:1');"
      "INSERT INTO changes (server, kind, name) VALUES ('x:1', 0, 'quiet');"
      "INSERT INTO changes (server, kind, name, delta) VALUES ('x:1', 1, 'quiet', 3); COMMIT");
  REQUIRE(run_until(db.io, [&] { return seen.size() >= 2; }));
  CHECK(seen == std::vector<std::string>{"client quiet online", "mail quiet 3"});
}

TEST_CASE("pg: a server whose lease expired has its online clients marked offline, and the others hear it") {
  Servers db;
  auto a = db.open("a:1", 100ms, 600ms, 200ms);
  auto b = db.open("b:1", 100ms, 600ms, 200ms);
  Harness ha(db.io, std::move(a));
  ha.store().load();
  b->load();
  CHECK(ha.write({{client("alice", 5000, true, std::string(32, 'a')), true},
                  {client("olga", 5001, true, std::string(32, 'o')), true}}) == std::vector<bool>{true, true});
  CHECK(ha.write({{client("olga", 5001, false, std::string(32, 'o')), false}}) == std::vector<bool>{true});
  std::vector<std::string> seen;
  b->watch([&](const Change& ch) { seen.push_back(describe(ch)); });
  REQUIRE(run_until(db.io, [&] { return seen.size() >= 3; }));  // a's three writes
  CHECK(ha.store().lease_held() == std::optional<bool>(true));
  ha.store().close();  // a stops renewing: to the others it has died
  REQUIRE(run_until(db.io, [&] { return seen.size() >= 4; }));
  CHECK(seen.back() == "client alice offline");  // olga was offline already: no change for her
  CHECK(b->lease_held() == std::optional<bool>(true));
  REQUIRE(run_until(db.io, [&] { return ha.store().lease_held() == std::optional<bool>(false); }));
  const Snapshot s = b->load();
  REQUIRE(s.clients.size() == 2);
  CHECK(!s.clients[0].online);
}

TEST_CASE("pg: an unreachable database at start is a clear error") {
  net::io_context io;
  try {
    open_pg_store(io, pg_options("postgresql://postgres@127.0.0.1:1/postgres?connect_timeout=2", "a:1"));
    FAIL("opened a store on a closed port");
  } catch (const StoreError& e) {
    CHECK(std::string(e.what()).rfind("offline store: cannot connect to the database: ", 0) == 0);
  }
}

TEST_CASE("pg: release removes the binding, the saved messages and the kept files, only the name's") {
  Fixture<backend::Pg> f;
  f.h.write({{client("bob", 5001, true, std::string(32, 'b')), true}});
  f.h.save({msg("bob", "alice", 1, 1, "x"), msg("bob", "alice", 2, 2, "y"), msg("carol", "alice", 1, 1, "z")});
  CHECK(f.h.put_file(kept_file("bob", 1, 10, "aa", 2)));
  CHECK(f.h.put_file(kept_file("bob", 2, 11, "bb", 2)));
  CHECK(f.h.put_file(kept_file("bob", 3, 12, "cc", 2)));
  CHECK(f.h.put_file(kept_file("carol", 1, 12, "dd", 2)));
  const Released r = pg_release(f.backend.uri, "bob");
  CHECK(r.found);
  CHECK(r.key == std::string(32, 'b'));
  CHECK(r.messages == 2);
  CHECK(r.files == 3);
  CHECK(f.h.count("bob") == 0);
  CHECK(f.h.files("bob").empty());
  CHECK(f.h.file_bytes("bob") == 0);
  CHECK(f.h.count("carol") == 1);
  CHECK(f.h.files("carol") == std::vector<HeldFile>{held(kept_file("carol", 1, 12, "dd", 2))});
  const Released again = pg_release(f.backend.uri, "bob");
  CHECK(!again.found);
  CHECK(again.files == 0);
}

TEST_CASE("pg: a file kept through one server is listed, read and deleted through another") {
  Servers db;
  Harness ha(db.io, db.open("a:1"));
  Harness hb(db.io, db.open("b:1"));
  const std::string data = random_bytes(3u << 20, 11);
  CHECK(ha.put_file(kept_file("bob", 42, 100, data, 3'000'000)));
  CHECK_FALSE(hb.put_file(kept_file("bob", 42, 200, "retry", 5)));  // kept already, whichever server asks
  CHECK(hb.files("bob") == std::vector<HeldFile>{held(kept_file("bob", 42, 100, data, 3'000'000))});
  CHECK(hb.file_bytes("bob") == 3'000'000);
  CHECK((hb.file_data("bob", 42) == std::optional<std::string>(data)));
  CHECK(hb.delete_file("bob", 42));
  CHECK(ha.files("bob").empty());
  CHECK_FALSE(ha.delete_file("bob", 42));
}

TEST_CASE("pg: the log trimmed past what a server read: it gets the whole state once, then reads on") {
  Servers db;
  auto a = db.open("a:1", 10ms, 10'000ms, 50ms);  // renews its lease, and so trims, often
  auto b = db.open("b:1");
  Harness ha(db.io, std::move(a));
  ha.store().load();
  b->load();
  CHECK(ha.write({{client("alice", 5000, true, std::string(32, 'a')), true},
                  {client("bob", 5001, false, std::string(32, 'b')), true}}) == std::vector<bool>{true, true});
  ha.save({msg("bob", "alice", 1, 1, "x"), msg("bob", "alice", 2, 2, "y")});
  RawPg raw(db.uri);
  raw.query("UPDATE changes SET at = now() - interval '1 hour'");
  REQUIRE(run_until(db.io, [&] { return raw.query("SELECT count(*) FROM changes") == "0"; }));
  CHECK(raw.query("SELECT upto FROM trimmed") != "0");
  // b has read nothing yet: what it missed is gone, so it reads the whole state.
  std::vector<std::string> seen;
  b->watch([&](const Change& ch) { seen.push_back(describe(ch)); });
  REQUIRE(run_until(db.io, [&] { return !seen.empty(); }));
  CHECK(seen[0] == "resync alice online, bob offline, mail bob 2");
  CHECK(ha.write({{client("carol", 5002, true, std::string(32, 'c')), true}}) == std::vector<bool>{true});
  REQUIRE(run_until(db.io, [&] { return seen.size() >= 2; }));
  CHECK(seen == std::vector<std::string>{"resync alice online, bob offline, mail bob 2", "client carol online"});
}

TEST_CASE("pg: a name released while the servers run reaches them as released, with its mail gone") {
  Servers db;
  auto a = db.open("a:1");
  auto b = db.open("b:1");
  Harness ha(db.io, std::move(a));
  ha.store().load();
  b->load();
  std::vector<std::string> seen;
  b->watch([&](const Change& ch) { seen.push_back(describe(ch)); });
  CHECK(ha.write({{client("alice", 5000, false, std::string(32, 'a')), true}}) == std::vector<bool>{true});
  ha.save({msg("alice", "bob", 1, 1, "x")});
  CHECK(ha.put_file(kept_file("alice", 1, 1, "f", 1)));  // a kept file writes no change
  REQUIRE(run_until(db.io, [&] { return seen.size() >= 2; }));
  const Released r = pg_release(db.uri, "alice");
  CHECK(r.found);
  CHECK(r.files == 1);
  REQUIRE(run_until(db.io, [&] { return seen.size() >= 4; }));
  CHECK(seen == std::vector<std::string>{"client alice offline", "mail alice 1", "released alice", "mail alice -1"});
  CHECK(value(answer<std::vector<HeldFile>>(db.io, [&](auto cb) { b->files_for("alice", cb); })).empty());
}

namespace {

/// The files table as the catalog describes it: columns, storage, indexes.
std::string files_schema(RawPg& raw) {
  return raw.query(
             "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod) || (CASE WHEN attnotnull THEN "
             "' not null' ELSE '' END) || ' ' || attstorage::text, ', ' ORDER BY attnum) FROM pg_attribute "
             "WHERE attrelid = 'files'::regclass AND attnum > 0 AND NOT attisdropped") +
         "; " + raw.query("SELECT string_agg(indexdef, '; ' ORDER BY indexname) FROM pg_indexes WHERE tablename = 'files'");
}

}  // namespace

TEST_CASE("pg: a database of schema version 1 is upgraded to version 3 when a server opens it") {
  Servers db;
  db.open("a:1")->close();
  RawPg raw(db.uri);
  raw.query("DROP TABLE files");
  raw.query("DROP TABLE trimmed");
  raw.query("UPDATE schema_version SET version = 1");
  Harness b(db.io, db.open("b:1"));
  CHECK(raw.query("SELECT max(version) FROM schema_version") == "3");
  CHECK(raw.query("SELECT count(*) FROM schema_version") == "1");
  CHECK(raw.query("SELECT upto FROM trimmed") == "0");
  CHECK(b.put_file(kept_file("bob", 1, 1, "x", 1)));
  b.store().load();
}

TEST_CASE("pg: a database of schema version 2 is upgraded to version 3, its rows kept, its files table a new one's") {
  Servers db;
  RawPg raw(db.uri);
  std::string fresh;
  {
    Harness a(db.io, db.open("a:1"));
    fresh = files_schema(raw);
    CHECK(a.write({{client("bob", 5001, false, std::string(32, 'b')), true},
                   {client("alice", 5000, true, std::string(32, 'a')), true}}) == std::vector<bool>{true, true});
    a.save({msg("bob", "alice", 1, 1, "x"), msg("bob", "alice", 2, 2, "y")});
    a.store().close();
  }
  // Back to what version 2 had: no files table.
  raw.query("DROP TABLE files");
  raw.query("UPDATE schema_version SET version = 2");
  const std::string changes_before = raw.query("SELECT count(*) FROM changes");
  Harness b(db.io, db.open("b:1"));
  CHECK(raw.query("SELECT max(version) FROM schema_version") == "3");
  CHECK(files_schema(raw) == fresh);
  CHECK(fresh.find("data bytea not null e") != std::string::npos);  // out of line, never compressed
  CHECK(fresh.find("files_pkey ON public.files USING btree (recipient, transfer)") != std::string::npos);
  CHECK(fresh.find("files_by_arrival ON public.files USING btree (ts_us)") != std::string::npos);
  CHECK(raw.query("SELECT count(*) FROM changes") == changes_before);
  const Snapshot s = b.store().load();
  REQUIRE(s.clients.size() == 2);
  CHECK(s.clients[0].name == "alice");
  CHECK(s.clients[1].key == std::string(32, 'b'));
  CHECK(s.mailboxes.at("bob") == 2);
  CHECK(b.pending("bob").at(1).body == "y");
  CHECK(b.put_file(kept_file("bob", 1, 1, "x", 1)));
  CHECK(b.file_data("bob", 1) == std::string("x"));
}

TEST_CASE("pg: a database of a newer schema version is refused, and left as it is") {
  Servers db;
  db.open("a:1")->close();
  RawPg raw(db.uri);
  raw.query("UPDATE schema_version SET version = 4");
  try {
    db.open("b:1");
    FAIL("opened a database of a newer schema");
  } catch (const StoreError& e) {
    CHECK(std::string(e.what()) == "offline store: the database has schema version 4, this build expects 3; refusing to use it");
  }
  CHECK_THROWS_AS(pg_release(db.uri, "bob"), StoreError);
  CHECK(raw.query("SELECT max(version) FROM schema_version") == "4");
}

namespace {

/// A cluster of this test's own (a restart must not disturb tests sharing the fixture's).
class OwnCluster {
 public:
  OwnCluster() : uri_((open_up(), run_command(std::string(pg_script()).append(" start ").append(dir_.str()).append("/pg")))) {}
  OwnCluster(const OwnCluster&) = delete;
  OwnCluster& operator=(const OwnCluster&) = delete;
  ~OwnCluster() { std::ignore = std::system(std::string(pg_script()).append(" stop ").append(dir_.str()).append("/pg").c_str()); }
  void run(const std::string& cmd) { run_command(std::string(pg_script()).append(" ").append(cmd).append(" ").append(dir_.str()).append("/pg")); }
  const std::string& uri() const { return uri_; }

 private:
  /// mkdtemp makes the directory private; the server runs as the postgres user when we are root.
  void open_up() { fs::permissions(dir_.str(), fs::perms::owner_all | fs::perms::group_exec | fs::perms::others_exec); }
  TempDir dir_;
  std::string uri_;
};

}  // namespace

TEST_CASE("pg: the database restarted: calls meanwhile answer errors, then the store recovers") {
  OwnCluster cluster;
  net::io_context io;
  PgOptions o = pg_options(cluster.uri(), "a:1");
  o.lease_every = 100ms;
  o.lease_for = 1'000ms;
  Harness h(io, open_pg_store(io, o));
  h.store().load();
  std::vector<std::string> seen;
  h.store().watch([&](const Change& ch) { seen.push_back(describe(ch)); });
  CHECK(h.save({msg("bob", "alice", 1, 1, "before")}) == std::vector<bool>{true});

  cluster.run("down");
  const auto refused = h.try_save({msg("bob", "alice", 2, 2, "while down")});
  CHECK(!refused.ok());
  CHECK(refused.error.rfind("the database is unreachable: ", 0) == 0);
  // While down every call answers the reason at once, and the lease runs out.
  const auto count = answer<std::size_t>(io, [&](auto cb) { h.store().count_for("bob", cb); });
  CHECK(!count.ok());
  CHECK(count.error.rfind("the database is unreachable: ", 0) == 0);
  REQUIRE(run_until(io, [&] { return h.store().lease_held() == std::optional<bool>(false); }));

  cluster.run("up");
  // The store reconnects in the background (backoff up to 2 s): retry until a save is taken.
  std::optional<std::vector<bool>> saved;
  REQUIRE(run_until(io, [&] {
    auto r = h.try_save({msg("bob", "alice", 3, 3, "after")});
    if (r.ok()) saved = *r.value;
    if (!r.ok()) run_until(io, [] { return false; }, 50ms);
    return saved.has_value();
  }));
  CHECK(*saved == std::vector<bool>{true});
  REQUIRE(run_until(io, [&] { return h.store().lease_held() == std::optional<bool>(true); }));

  // Durable and readable: through a new store (a new connection), and after another restart.
  cluster.run("restart");
  net::io_context io2;
  Harness fresh(io2, open_pg_store(io2, pg_options(cluster.uri(), "b:1")));
  const auto bob = fresh.pending("bob");
  REQUIRE(bob.size() == 2);
  CHECK(bob[0].body == "before");
  CHECK(bob[1].body == "after");
  // The first store's watcher, reconnected, still hears the other server's changes.
  fresh.store().load();
  fresh.write({{client("newcomer", 5000, true, std::string(32, 'n')), true}});
  REQUIRE(run_until(io, [&] { return !seen.empty() && seen.back() == "client newcomer online"; }));
}
