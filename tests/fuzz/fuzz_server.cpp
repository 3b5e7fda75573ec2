// Fuzz target: the registry server fed datagrams from fake clients that answer what it sends.
//
// Per input: a fresh Server core on a fake clock whose core sends only to the fake network
// (harness.hpp); the SQLite store is opened once per process in a temp
// directory and emptied before each input, so an input behaves the same whenever it runs.
// The server's ServerOptions.seed is fixed, so the harness's minter (seeded the same) mints
// tokens it accepts: the cast's reg op registers properly (token and proof), the sealed and
// channel ops save and send sealed and signed bodies.
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
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <tuple>
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
  offline::Released release(const std::string& name) override {
    check();
    return s_.release(name);
  }
  std::size_t legacy_count() override {
    check();
    return s_.legacy_count();
  }
  bool put_file(const offline::NewFile& f) override {
    check();
    return s_.put_file(f);
  }
  std::vector<offline::HeldFile> files_for(const std::string& to) override {
    check();
    return s_.files_for(to);
  }
  std::optional<std::string> file_data(const std::string& to, std::uint64_t transfer) override {
    check();
    return s_.file_data(to, transfer);
  }
  bool delete_file(const std::string& to, std::uint64_t transfer) override {
    check();
    return s_.delete_file(to, transfer);
  }
  std::uint64_t file_bytes_for(const std::string& to) override {
    check();
    return s_.file_bytes_for(to);
  }
  std::size_t expire_files(std::int64_t before_us) override {
    check();
    return s_.expire_files(before_us);
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

[[noreturn]] void fail(const std::string& what) { fuzz::fail("fuzz_server", what); }

using Binding = std::tuple<std::string, protocol::Key, std::string, std::uint16_t>;  // name, key, ip, port

/// What the clients sent the server, for the checks of what it does with it.
struct Seen {
  /// Every (name, key, address) a Register proved: its token is the server's minter's MAC for
  /// exactly these and its proof is the key's signature (fresh or not, used or not).
  std::set<Binding> proven;
  /// Every body sent in a Save (false, from, mid) or a Channel (true, from, id).
  std::map<std::tuple<bool, std::string, std::uint64_t>, std::set<std::string>> bodies;
  /// The key each name was first seen bound to in the table.
  std::map<std::string, protocol::Key> bound;
};

void note_injected(Seen& seen, const identity::TokenMinter& minter, const std::string& bytes,
                   const udp::endpoint& from) {
  protocol::Decoded d = protocol::decode(bytes);
  if (!d) return;
  if (const auto* r = std::get_if<protocol::Register>(&*d.message)) {
    if (r->token.size() != identity::kTokenSize || !from.address().is_v4()) return;
    std::uint64_t ts = 0;
    for (int i = 7; i >= 0; --i) ts = ts << 8 | static_cast<std::uint8_t>(r->token[static_cast<std::size_t>(i)]);
    // Checked as of its own time: only whether it was minted for this name, key and address.
    auto at = static_cast<std::int64_t>(ts);
    if (minter.check(r->token, at, r->name, r->key, fuzz::ip4_of(from), from.port()) &&
        identity::check_register_proof(r->key, r->name, r->token, r->proof))
      seen.proven.emplace(r->name, r->key, from.address().to_string(), from.port());
  } else if (const auto* s = std::get_if<protocol::Save>(&*d.message)) {
    if (seen.bodies.size() < 100'000) seen.bodies[{false, s->from, s->mid}].insert(s->body);
  } else if (const auto* c = std::get_if<protocol::Channel>(&*d.message)) {
    if (seen.bodies.size() < 100'000) seen.bodies[{true, c->from, c->id}].insert(c->body);
  }
}

/// The name a server request is for, or nullptr for a message that names none.
const std::string* recipient_of(const protocol::Message& m) {
  return std::visit(
      [](const auto& x) -> const std::string* {
        if constexpr (requires { x.recipient; }) return &x.recipient;
        else return nullptr;
      },
      m);
}

/// Saved and relayed messages go out as they came in: the server never alters a body, invents
/// one, or gives it another sender's key. A relay, probe, table or stored names the client it
/// is for, and goes to an address a Register proved for that name (a resend may follow the
/// row's move, so not necessarily where the row is now).
void check_sent(const Seen& seen, const registry::Table& t, const protocol::Message& m, const udp::endpoint& to) {
  if (const std::string* r = recipient_of(m)) {
    const std::string ip = to.address().to_string();
    bool proven = false;
    for (const auto& [name, key, at, port] : seen.proven)
      if (name == *r && at == ip && port == to.port()) proven = true;
    if (!proven)
      fail(std::string("sent a ") + protocol::type_name(m) + " for " + *r + " to " + ip + ":" +
           std::to_string(to.port()) + ", an address no registration of that name proved");
  }
  auto came_in = [&](bool channel, const std::string& from, std::uint64_t mid, const std::string& body) {
    auto it = seen.bodies.find({channel, from, mid});
    return it != seen.bodies.end() && it->second.contains(body);
  };
  if (const auto* s = std::get_if<protocol::Stored>(&m)) {
    for (const auto& i : s->items) {
      if (!came_in(i.channel, i.from, i.mid, i.body))
        fail("delivered a saved " + std::string(i.channel ? "channel" : "direct") + " message from " + i.from +
             " (mid " + std::to_string(i.mid) + ") whose body no client sent: " + fuzz::printable(i.body));
      const registry::Client* c = t.find(i.from);
      if (c == nullptr || c->key != i.key)
        fail("delivered a saved message from " + i.from + " with a key that is not the one its name is bound to");
    }
  } else if (const auto* r = std::get_if<protocol::Relay>(&m)) {
    if (!came_in(true, r->from, r->mid, r->body))
      fail("relayed a channel message from " + r->from + " (mid " + std::to_string(r->mid) +
           ") whose body no client sent: " + fuzz::printable(r->body));
  }
}

/// Every row is bound to a key, for good, and sits at an address a Register proved for that
/// name and key: no name is taken, or moved, without the server's token and the key's signature.
/// (A registration whose binding the store failed to save leaves its row offline and unbound:
/// the next registration of the name binds it.)
void check_bindings(const registry::Table& t, Seen& seen) {
  t.for_each([&](const registry::Client& c) {
    if (!c.bound()) {
      if (c.online) fail("an online table row without a key: " + c.name);
      return;
    }
    if (!seen.proven.contains(Binding{c.name, c.key, c.ip, c.port}))
      fail("client " + c.name + " is at " + c.ip + ":" + std::to_string(c.port) +
           " with a key no registration from there proved");
    auto [it, first] = seen.bound.try_emplace(c.name, c.key);
    if (!first && it->second != c.key) fail("the name " + c.name + " was bound to another key");
  });
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
  fuzz::use_fixed_randomness();
  fuzz::Cast::get();
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
  fuzz::reset_randomness();
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
  fuzz::FakeNetwork network(server.core(), clock, options.seed);
  Seen seen;
  network.before_inject = [&](const std::string& bytes, const udp::endpoint& from) {
    note_injected(seen, network.minter(), bytes, from);
  };
  network.on_sent = [&](const protocol::Message& m, const udp::endpoint& to) { check_sent(seen, server.table(), m, to); };
  server.start();
  server.core().settle();
  const std::uint64_t epoch = server.table().epoch();
  std::uint64_t version = server.table().version();
  bool faults = false;

  fuzz::Reader in(data, size);
  while (!in.done()) {
    std::uint8_t b = in.byte();
    int src = b % fuzz::kSources;
    fuzz::Op op = fuzz::op_of(b);
    if (op == fuzz::Op::extra) {
      if (std::uint8_t n = in.byte(); g_faults) {
        store.fail_next(n % 4 + 1);
        faults = true;
      }
    } else {
      network.run(op, src, in);
    }
    check_table(server.table(), options, epoch, version);
    check_bindings(server.table(), seen);
  }

  // Shut down as the process does on a signal: the last commit, then what it scheduled.
  store.fail_next(0);
  server.stop();
  check_table(server.table(), options, epoch, version);
  check_bindings(server.table(), seen);
  check_store(server.table(), options, !faults);
  return 0;
}
