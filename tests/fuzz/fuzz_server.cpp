// Fuzz target: the registry server fed datagrams from fake clients that answer what it sends.
//
// Per input: a fresh Server core on a fake clock whose core sends only to the fake network
// (harness.hpp); the SQLite store is opened once per process in a temp
// directory and emptied before each input, so an input behaves the same whenever it runs.
// The `extra` op makes the next 1-4 store calls throw StoreError (a full disk, an I/O error);
// FUZZ_STORE_FAULTS=0 turns that op into a no-op (to fuzz the other paths alone).
// Limits are small (6 clients, 4 saved messages per mailbox) so that "full" is reachable.
#include <sqlite3.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "harness.hpp"
#include "offline/store.hpp"
#include "registry/server.hpp"

namespace {

using namespace chat;

/// The store every input's server uses, opened once per process.
struct Process {
  std::string dir;
  std::unique_ptr<offline::Store> store;
  sqlite3* admin = nullptr;  // a second connection, to empty the store between inputs
};
Process* g = nullptr;
bool g_faults = true;

void cleanup() {
  if (g == nullptr) return;
  sqlite3_close(g->admin);
  g->store.reset();
  std::error_code ec;
  std::filesystem::remove_all(g->dir, ec);
}

/// Forwards to the process's store; fails the next `n` calls on demand.
class FaultyStore final : public offline::Store {
 public:
  explicit FaultyStore(offline::Store& s) : s_(s) {}
  void fail_next(int n) { fail_ = n; }

  std::vector<bool> save(std::span<const offline::NewMessage> batch) override {
    check();
    return s_.save(batch);
  }
  std::vector<offline::StoredMessage> pending_for(const std::string& to, offline::Cursor after,
                                                  std::size_t limit) override {
    check();
    return s_.pending_for(to, after, limit);
  }
  std::size_t count_for(const std::string& to) override {
    check();
    return s_.count_for(to);
  }
  void remove_delivered(const std::string& to, std::span<const std::int64_t> seqs) override {
    check();
    s_.remove_delivered(to, seqs);
  }
  void store_clients(std::span<const offline::ClientRow> rows) override {
    check();
    s_.store_clients(rows);
  }
  std::vector<offline::ClientRow> load_clients() override {
    check();
    return s_.load_clients();
  }

 private:
  void check() {
    if (fail_ > 0) {
      --fail_;
      throw offline::StoreError("offline store: injected failure (fuzz)");
    }
  }
  offline::Store& s_;
  int fail_ = 0;
};

std::string temp_root() {
  // tmpfs when there is one: SQLite's fsyncs cost nothing there.
  if (const char* t = std::getenv("TMPDIR"); t != nullptr && *t != '\0') return t;
  std::error_code ec;
  if (std::filesystem::is_directory("/dev/shm", ec) && ::access("/dev/shm", W_OK) == 0) return "/dev/shm";
  return "/tmp";
}

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_server: %s\n", what.c_str());
  std::abort();
}

/// What must hold of the table after every op.
void check_table(const registry::Table& t, const registry::ServerOptions& o, std::uint64_t epoch,
                 std::uint64_t& version) {
  if (t.epoch() != epoch) fail("the table's epoch changed while the server ran");
  if (t.version() < version) fail("the table's version went back");
  version = t.version();
  if (t.size() > o.max_clients) fail("more clients than max_clients: " + std::to_string(t.size()));
  std::size_t online = 0;
  t.for_each([&](const registry::Client& c) {
    if (!protocol::valid_name(c.name)) fail("a table row with an invalid name: " + c.name);
    if (!protocol::valid_ipv4(c.ip) || c.port == 0) fail("a table row with a bad address: " + c.ip);
    if (c.ver == 0 || c.ver > t.version()) fail("a row's version is outside the table's");
    online += c.online ? 1 : 0;
  });
  if (online != t.online_count()) fail("online_count() disagrees with the rows");
}

/// What must hold once the server stopped: the store has what the table says, and no mailbox
/// holds more than max_stored. `exact`: no store call failed, so nothing may be missing.
void check_store(const registry::Table& t, const registry::ServerOptions& o, bool exact) {
  std::vector<offline::ClientRow> rows = g->store->load_clients();
  t.for_each([&](const registry::Client& c) {
    std::size_t n = g->store->count_for(c.name);
    if (n > o.max_stored) fail(c.name + "'s mailbox holds " + std::to_string(n) + " messages, max_stored is " +
                               std::to_string(o.max_stored));
    if (!exact) return;
    auto it = std::find_if(rows.begin(), rows.end(), [&](const auto& r) { return r.name == c.name; });
    if (it == rows.end()) fail("client " + c.name + " is in the table but not in the store");
    if (it->ip != c.ip || it->port != c.port || it->online != c.online)
      fail("client " + c.name + " is stored as " + it->ip + ":" + std::to_string(it->port) +
           (it->online ? " online" : " offline") + " but is " + c.ip + ":" + std::to_string(c.port) +
           (c.online ? " online" : " offline") + " in the table");
  });
  if (exact && rows.size() != t.size()) fail("the store holds clients the table does not");
}

void empty_store() {
  char* err = nullptr;
  if (sqlite3_exec(g->admin, "DELETE FROM messages; DELETE FROM clients;", nullptr, nullptr, &err) != SQLITE_OK) {
    std::fprintf(stderr, "fuzz_server: cannot empty the store: %s\n", err ? err : "?");
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet_logs();
  if (const char* f = std::getenv("FUZZ_STORE_FAULTS"); f != nullptr && std::string(f) == "0") g_faults = false;

  g = new Process;
  std::string tmpl = temp_root() + "/chatapp-fuzz-server-XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr) {
    std::perror("fuzz_server: mkdtemp");
    std::abort();
  }
  g->dir = tmpl;
  std::atexit(cleanup);
  g->store = offline::open_sqlite_store(g->dir);
  std::string db = g->dir + "/chat.db";
  if (sqlite3_open_v2(db.c_str(), &g->admin, SQLITE_OPEN_READWRITE, nullptr) != SQLITE_OK) {
    std::fprintf(stderr, "fuzz_server: cannot open %s\n", db.c_str());
    std::abort();
  }
  sqlite3_busy_timeout(g->admin, 5000);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  empty_store();
  transport::ManualClock clock;
  registry::ServerOptions options;
  options.max_clients = 6;
  options.max_stored = 4;
  options.keepalive = std::chrono::seconds(15);
  options.seed = 1;
  auto owned = std::make_unique<FaultyStore>(*g->store);
  FaultyStore& store = *owned;
  registry::Server server(options, std::move(owned), clock);
  fuzz::FakeNetwork network(server.core(), clock);
  server.start();
  server.core().settle();
  const std::uint64_t epoch = server.table().epoch();
  std::uint64_t version = server.table().version();
  bool faults = false;

  fuzz::Reader in(data, size);
  while (!in.done()) {
    std::uint8_t b = in.byte();
    int src = b % fuzz::kSources;
    switch (static_cast<fuzz::Op>(b / fuzz::kSources % static_cast<int>(fuzz::Op::count_))) {
      case fuzz::Op::datagram: network.inject(in.bytes(in.u16()), src); break;
      case fuzz::Op::answer: network.answer(src); break;
      case fuzz::Op::answer_all: network.answer_all(); break;
      case fuzz::Op::answer_with: network.answer_with(src, in.byte()); break;
      case fuzz::Op::repeat: network.repeat(src); break;
      case fuzz::Op::extra:
        if (std::uint8_t n = in.byte(); g_faults) {
          store.fail_next(n % 4 + 1);
          faults = true;
        }
        break;
      case fuzz::Op::advance: network.advance(in.byte()); break;
      case fuzz::Op::count_: break;
    }
    check_table(server.table(), options, epoch, version);
  }

  // Shut down as the process does on a signal: the last commit, then what it scheduled.
  store.fail_next(0);
  server.stop();
  check_table(server.table(), options, epoch, version);
  check_store(server.table(), options, !faults);
  return 0;
}
