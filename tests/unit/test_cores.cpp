// The registry and peer cores driven on the fake network and clock (sim.hpp), one scenario
// per test case, each checking what a user sees (the exact status lines) and what the server
// holds (table, sessions, counters, the store). SPEC §2–§6 and §10. Simulated time only.
#include <doctest/doctest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <iostream>
#include <map>
#include <set>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <spdlog/spdlog.h>

#include "offline/memory_store.hpp"
#include "sim.hpp"

// Lines compared as vectors are printed in full when a check fails.
namespace doctest {
template <>
struct StringMaker<std::vector<std::string>> {
  static String convert(const std::vector<std::string>& v) {
    std::string out = "{";
    for (const auto& l : v) out.append("\n    \"").append(l).append("\"");
    out.append(" }");
    return String(out.c_str());
  }
};
}  // namespace doctest

namespace {

using namespace chat;
using namespace chat::sim;
namespace proto = chat::protocol;

const udp::endpoint kServerAt = addr(1, 5000);

// Every status line a scenario looks for, spelled once.
namespace say {
const std::string welcome = ">>> [Welcome, You are registered.]";
const std::string updated = ">>> [Client table updated.]";
const std::string saved = ">>> [Messages received by the server and saved]";
const std::string by_server = ">>> [Message received by Server.]";
const std::string have_messages = ">>> [You have messages]";
const std::string lost_track = ">>> [The server lost track of you; registering again.]";
const std::string not_responding = ">>> [Server not responding]";
const std::string not_responding_dot = ">>> [Server not responding.]";
const std::string back = ">>> [Server is back.]";
const std::string already = ">>> [You are already registered.]";
const std::string bye = ">>> [You are Offline. Bye.]";
const std::string exiting = ">>> [Exiting]";
std::string other_identity(const std::string& name) {
  return std::string(">>> [Registration refused: the name ") + name + " belongs to another identity]";
}
std::string changed(const std::string& name) {
  return std::string(">>> [Warning: the identity of ") + name + " changed. Compare fingerprints, then type trust " +
         name + "]";
}
std::string received_by(const std::string& name) { return std::string(">>> [Message received by ") + name + ".]"; }
std::string no_ack(const std::string& name) {
  return std::string(">>> [No ACK from ") + name + ", message sent to server.]";
}
std::string is_offline(const std::string& name) {
  return std::string(">>> [") + name + " is offline, message sent to server.]";
}
std::string exists(const std::string& name) { return std::string(">>> [Client ") + name + " exists!!]"; }
std::string direct(const std::string& from, const std::string& text) { return std::string(">>> ") + from + ": " + text; }
std::string channel(const std::string& from, const std::string& text) {
  return std::string(">>> [Channel_Message ") + from + ": " + text + "]";
}
}  // namespace say

// The ManualClock's wall time in UTC, formatted independently of the client's code.
std::string utc(std::int64_t ts_us) {
  std::time_t secs = static_cast<std::time_t>(ts_us / 1'000'000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}
std::string saved_line(const std::string& from, std::int64_t ts_us, const std::string& text) {
  return std::string(">>> ") + from + ": " + utc(ts_us) + " " + text;
}
std::string saved_channel_line(const std::string& from, std::int64_t ts_us, const std::string& text) {
  return std::string(">>> Channel_Message ") + from + ": " + utc(ts_us) + " " + text;
}

bool starts_with(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }
bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

// How often `p` showed the direct message `text` from `from`, live or saved.
std::size_t shown_direct(const Peer& p, const std::string& from, const std::string& text) {
  std::size_t n = 0;
  const std::string live = say::direct(from, text);
  const std::string head = std::string(">>> ") + from + ": ";
  for (const auto& l : p.lines)
    if (l == live || (starts_with(l, head) && ends_with(l, std::string(" ") + text) && l.size() == head.size() + 20 + text.size()))
      ++n;
  return n;
}
// How often `p` showed the channel message `text` from `from`, live or saved.
std::size_t shown_channel(const Peer& p, const std::string& from, const std::string& text) {
  std::size_t n = 0;
  const std::string live = say::channel(from, text);
  const std::string head = std::string(">>> Channel_Message ") + from + ": ";
  for (const auto& l : p.lines)
    if (l == live || (starts_with(l, head) && ends_with(l, std::string(" ") + text))) ++n;
  return n;
}

// The lines `p` printed from index `mark` on.
std::vector<std::string> since(const Peer& p, std::size_t mark) {
  return {p.lines.begin() + static_cast<std::ptrdiff_t>(std::min(mark, p.lines.size())), p.lines.end()};
}
// Only the lines of `lines` that are in `wanted`, in their order.
std::vector<std::string> only(const std::vector<std::string>& lines, const std::vector<std::string>& wanted) {
  std::vector<std::string> out;
  for (const auto& l : lines)
    if (std::find(wanted.begin(), wanted.end(), l) != wanted.end()) out.push_back(l);
  return out;
}
std::string transcript(const Peer& p) {
  std::ostringstream o;
  o << "--- " << p.client.table().rows().size() << " rows, exit " << p.exit_code << "\n";
  for (const auto& l : p.lines) o << "  " << l << "\n";
  return o.str();
}

template <class T>
const T* as(const proto::Message& m) {
  return std::get_if<T>(&m);
}
bool has_entry(const proto::Message& m, const std::string& name) {
  const auto* t = as<proto::Table>(m);
  if (t == nullptr) return false;
  for (const auto& e : t->entries)
    if (e.name == name) return true;
  return false;
}

/// The network's seed (delays, so the order of datagrams sent together): CHATAPP_CORES_SEED
/// replays the scenarios under another one; every scenario must hold under any.
std::uint64_t seed_from_env() {
  const char* v = std::getenv("CHATAPP_CORES_SEED");
  return v != nullptr && std::atoll(v) > 0 ? static_cast<std::uint64_t>(std::atoll(v)) : 1;
}

void quiet() {
  // CHATAPP_CORES_LOG=1 shows the cores' own log (debug level).
  spdlog::set_level(std::getenv("CHATAPP_CORES_LOG") != nullptr ? spdlog::level::debug : spdlog::level::off);
  // The saved-message timestamps are the reader's local time: make that UTC.
  setenv("TZ", "UTC", 1);
  tzset();
}

// A server over a MemoryStore the test keeps, and named clients, on one fake network.
struct World {
  explicit World(registry::ServerOptions o = {}) : net(seed_from_env()), options(o) {
    quiet();
    if (options.seed == 0) options.seed = seed_from_env() * 7 + 3;
    seeds = seed_from_env() * 100;
    server = std::make_unique<ServerNode>(net, kServerAt, std::make_unique<SharedStore>(*store), options);
  }

  /// CHATAPP_CORES_VERBOSE=1 prints every client's lines at the end of each scenario.
  ~World() {
    if (std::getenv("CHATAPP_CORES_VERBOSE") == nullptr) return;
    for (const auto& [key, p] : peers) std::cerr << key << " " << transcript(*p);
  }

  Net net;
  std::unique_ptr<offline::MemoryStore> store = std::make_unique<offline::MemoryStore>();
  registry::ServerOptions options;
  std::unique_ptr<ServerNode> server;
  std::map<std::string, std::unique_ptr<Peer>> peers;  // by key (the name, unless two share one)
  std::uint64_t seeds = 100;
  int hosts = 2;
  peer::Backlog backlog;  // the window and bound of the clients started from now on

  registry::Server& srv() { return server->server; }
  Peer& operator[](const std::string& key) { return *peers.at(key); }

  udp::endpoint next_addr() { return addr(hosts++, 6000); }
  /// Starts a client (its process) at `at`; does not wait.
  Peer& start(const std::string& key, const std::string& name, const udp::endpoint& at) {
    peers[key] = std::make_unique<Peer>(net, name, at, kServerAt, transport::RetryPolicy{}, 15s, ++seeds, 0,
                                        ":memory:", backlog);
    return *peers[key];
  }
  Peer& start(const std::string& name) { return start(name, name, next_addr()); }
  /// Starts a client with another key for its name (`variant`), or client state kept in a file.
  Peer& start_with(const std::string& key, const std::string& name, const udp::endpoint& at, std::uint8_t variant,
                   const std::string& state = ":memory:") {
    peers[key] = std::make_unique<Peer>(net, name, at, kServerAt, transport::RetryPolicy{}, 15s, ++seeds, variant,
                                        state);
    return *peers[key];
  }
  /// Starts a client and waits until every running client sees every online one online.
  Peer& join(const std::string& name) {
    Peer& p = start(name);
    REQUIRE(net.run_until([&] { return p.reading && converged(); }, 10s));
    return p;
  }
  /// Every running, online client sees every running, online client online.
  bool converged() {
    for (auto& [k, p] : peers) {
      if (p->exit_code != -1 || !p->client.online()) continue;
      for (auto& [k2, q] : peers)
        if (q->exit_code == -1 && q->client.online() && k2.find('@') == std::string::npos && !p->sees_online(k2))
          return false;
    }
    return true;
  }
  /// The process of `key` dies (no word to anyone).
  void kill(const std::string& key) { peers.erase(key); }
  /// The server process ends; `with_data` false also loses its data directory.
  void stop_server(bool with_data = true) {
    server.reset();
    if (!with_data) store = std::make_unique<offline::MemoryStore>();
  }
  void start_server() {
    options.seed += 1000;  // a new process: new ids, a new table epoch
    server = std::make_unique<ServerNode>(net, kServerAt, std::make_unique<SharedStore>(*store), options);
  }
  void restart_server(bool with_data) {
    stop_server(with_data);
    start_server();
  }
  /// True if the server's row for `name` is online at `at`.
  bool server_has_online(const std::string& name, const udp::endpoint& at) {
    const registry::Client* c = srv().table().find(name);
    return c != nullptr && c->online && c->ip == at.address().to_string() && c->port == at.port();
  }
  /// Types `line` at `key` and runs until `key` printed `expect` (counted from now).
  bool type_and_wait(const std::string& key, const std::string& line, const std::string& expect,
                     Duration limit = 10s) {
    Peer& p = (*this)[key];
    std::size_t before = p.count(expect);
    p.type(line);
    return net.run_until([&] { return p.count(expect) > before; }, limit);
  }
  /// Runs until the wall clock reads 2026-01-01 00:00:<sec> exactly (the clock starts at 00:00:00 UTC).
  void run_to_second(int sec) {
    const std::int64_t start_us = 1'767'225'600'000'000;
    const auto target = std::chrono::microseconds(start_us + sec * 1'000'000LL - net.clock.wall_us());
    REQUIRE(target.count() >= 0);
    net.run_for(target);
  }
  /// All saved messages for `to`, oldest arrival first.
  std::vector<offline::StoredMessage> mailbox(const std::string& to) { return store->pending_for(to, {}, 1000); }
};

/// Sends a hand-made datagram from an address with no core behind it.
void inject(World& w, const udp::endpoint& from, const udp::endpoint& to, const proto::Message& m) {
  w.net.send(from, to, proto::encode(m));
}
/// A registration of `name` (with identity_of(name)) from `from` that needs no challenge round
/// trip: its token is minted by a minter with the server's seed, as the server's own would be.
proto::Register proven_register(World& w, const udp::endpoint& from, const std::string& name, std::uint64_t id,
                                std::uint64_t every_ms = 0) {
  identity::Identity me = identity_of(name);
  identity::TokenMinter minter(w.options.seed);
  const auto now_us = std::chrono::duration_cast<std::chrono::microseconds>(w.net.clock.now().time_since_epoch()).count();
  std::string token = minter.mint(now_us, name, me.public_key(), from.address().to_v4().to_uint(), from.port());
  return proto::Register{id, name, me.public_key(), every_ms, token, identity::register_proof(me, name, token)};
}
/// A "client" with no core: registers `name` from `from` by hand.
void fake_register(World& w, const udp::endpoint& from, const std::string& name, std::uint64_t id) {
  inject(w, from, kServerAt, proven_register(w, from, name, id));
}
/// A direct message's body as the client of `from` seals it for `to`.
std::string sealed(World& w, const std::string& from, const std::string& to, std::uint64_t mid,
                   const std::string& text) {
  identity::Pair pair(identity_of(from), identity_of(to).public_key());
  return identity::seal_direct(pair, mid, static_cast<std::uint64_t>(w.net.clock.wall_us() / 1000), to, text);
}
/// The text of a saved message for `to` as `to` would open it ("" if it does not open).
std::string text_of(const std::string& from, bool channel, std::uint64_t mid, const std::string& body,
                    const std::string& to) {
  std::optional<identity::Opened> m;
  if (channel) m = identity::open_channel(identity_of(from).public_key(), from, mid, body);
  else m = identity::open_direct(identity::Pair(identity_of(to), identity_of(from).public_key()), body, to);
  return m ? m->text : std::string();
}
std::string text_of(const offline::StoredMessage& m, const std::string& to) {
  return text_of(m.from, m.kind == offline::Kind::channel, m.mid, m.body, to);
}
std::string text_of(const proto::StoredItem& i, const std::string& to) {
  return text_of(i.from, i.channel, i.mid, i.body, to);
}

}  // namespace

TEST_SUITE("cores") {

// ================================================================ §2 registration and the table

TEST_CASE("§2 registration: the welcome, the table reaches every client, list shows the rows") {
  World w;
  Peer& alice = w.start("alice");
  REQUIRE(w.net.run_until([&] { return alice.reading; }, 5s));
  CHECK(alice.lines == std::vector<std::string>{say::welcome, say::updated});
  Peer& bob = w.join("bob");
  CHECK(bob.lines == std::vector<std::string>{say::welcome, say::updated});
  // alice's table got bob's row: one update applied, one line.
  CHECK(alice.count(say::updated) == 2);
  CHECK(alice.sees_online("bob"));
  CHECK(bob.sees_online("alice"));
  // The server: both online, at the address their registration came from.
  CHECK(w.server_has_online("alice", alice.at()));
  CHECK(w.server_has_online("bob", bob.at()));
  CHECK(w.srv().has_session("alice"));
  CHECK(w.srv().has_session("bob"));

  std::size_t mark = alice.lines.size();
  alice.type("list");
  CHECK(since(alice, mark) == std::vector<std::string>{
                                  "NAME   ADDRESS                STATUS",
                                  "alice  10.0.0.2:6000          online (you)",
                                  "bob    10.0.0.3:6000          online",
                                  "(2 clients, 2 online)",
                              });
}

TEST_CASE("§2 a name held by an online client that answers the probe is refused, the newcomer exits 1") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  std::size_t alice_lines = alice.lines.size();
  Peer& impostor = w.start("bob@B", "bob", w.next_addr());
  REQUIRE(w.net.run_until([&] { return impostor.exit_code != -1; }, 5s));
  CHECK(impostor.exit_code == 1);
  CHECK(impostor.lines ==
        std::vector<std::string>{">>> [Registration refused: the name bob is in use by an online client]"});
  // The holder keeps its name, its address and its session; nobody's table changed.
  CHECK(w.server_has_online("bob", bob.at()));
  CHECK(w.srv().has_session("bob"));
  w.net.run_for(2s);
  CHECK(alice.lines.size() == alice_lines);
  CHECK(bob.exit_code == -1);
  CHECK(w.type_and_wait("alice", "send bob still you?", say::received_by("bob")));
}

TEST_CASE("§2 a name held by an online client that no longer answers goes to the newcomer") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob_a = w.join("bob");
  udp::endpoint a = bob_a.at();
  w.kill("bob");  // bob's process at A dies; the server still has bob online at A
  REQUIRE(w.server_has_online("bob", a));
  udp::endpoint b = w.next_addr();
  Peer& bob_b = w.start("bob", "bob", b);
  REQUIRE(w.net.run_until([&] { return bob_b.reading; }, 5s));
  CHECK(bob_b.exit_code == -1);
  CHECK(bob_b.lines == std::vector<std::string>{say::welcome, say::updated});
  CHECK(w.server_has_online("bob", b));
  REQUIRE(w.net.run_until(
      [&] {
        const proto::Entry* e = alice.client.table().find("bob");
        return e != nullptr && e->online && e->port == b.port() && e->ip == b.address().to_string();
      },
      5s));
  CHECK(w.type_and_wait("alice", "send bob at B?", say::received_by("bob")));
  CHECK(bob_b.count(say::direct("alice", "at B?")) == 1);
}

TEST_CASE("§2/§10 a table update lost six times keeps the session, the next keep-alive repairs it") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  int dropped = 0;
  w.net.filter = [&](const udp::endpoint& from, const udp::endpoint& to, const proto::Message& m) {
    if (from == kServerAt && to == bob.at() && as<proto::Table>(m) != nullptr && dropped < 6) {
      ++dropped;
      return true;
    }
    return false;
  };
  std::size_t bob_updates = bob.count(say::updated);
  std::uint64_t stalled = w.srv().server_counters().stalled;
  Peer& carol = w.start("carol");
  // The server's six tries to bob all go, and are all lost.
  REQUIRE(w.net.run_until([&] { return dropped == 6 && w.srv().server_counters().stalled > stalled; }, 5s));
  CHECK(carol.reading);
  CHECK(alice.sees_online("carol"));
  CHECK(bob.client.table().find("carol") == nullptr);
  CHECK(bob.count(say::updated) == bob_updates);
  // A failed table update does not end bob's session, nor mark him offline.
  CHECK(w.srv().has_session("bob"));
  CHECK(w.server_has_online("bob", bob.at()));
  CHECK(w.srv().server_counters().stalled == stalled + 1);
  // Bob's next keep-alive (at most 16.5 s after his registration) brings the update.
  REQUIRE(w.net.run_until([&] { return bob.sees_online("carol"); }, 20s));
  CHECK(bob.count(say::updated) == bob_updates + 1);
  CHECK(bob.lines.back() == say::updated);
  CHECK(w.srv().has_session("bob"));
}

// ================================================================ §3 direct chat

TEST_CASE("§3 direct chat: shown once, ACKed, the text kept as typed, sending to yourself works") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  const std::string text = "  héllo, wörld!  ünïcode ✓ \"quoted\"  ";
  CHECK(w.type_and_wait("alice", std::string("send bob ") + text, say::received_by("bob")));
  CHECK(bob.lines.back() == say::direct("alice", text));
  CHECK(w.type_and_wait("alice", "send alice note to self", say::received_by("alice")));
  CHECK(alice.count(say::direct("alice", "note to self")) == 1);
  // Nothing went through the server.
  CHECK(w.store->count_for("bob") == 0);
}

TEST_CASE("§3 a lost receipt makes the sender send again, the receiver shows the message once") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  int acks_dropped = 0;
  w.net.filter = [&](const udp::endpoint& from, const udp::endpoint& to, const proto::Message& m) {
    if (from == bob.at() && to == alice.at() && as<proto::Receipt>(m) != nullptr && acks_dropped < 3) {
      ++acks_dropped;
      return true;
    }
    return false;
  };
  std::size_t mark = alice.lines.size();
  CHECK(w.type_and_wait("alice", "send bob once only", say::received_by("bob")));
  CHECK(acks_dropped == 3);
  CHECK(bob.count(say::direct("alice", "once only")) == 1);
  CHECK(since(alice, mark) == std::vector<std::string>{say::received_by("bob")});
}

TEST_CASE("§3 a recipient the local table shows offline: the message goes straight to the server") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  REQUIRE(w.type_and_wait("bob", "dereg bob", say::bye));
  REQUIRE(w.net.run_until([&] { return !alice.sees_online("bob"); }, 5s));
  bool direct_tried = false;
  w.net.filter = [&](const udp::endpoint&, const udp::endpoint& to, const proto::Message& m) {
    if (to == bob.at() && as<proto::Direct>(m) != nullptr) direct_tried = true;
    return false;
  };
  std::size_t mark = alice.lines.size();
  CHECK(w.type_and_wait("alice", "send bob for later", say::saved));
  CHECK(since(alice, mark) == std::vector<std::string>{say::is_offline("bob"), say::saved});
  CHECK_FALSE(direct_tried);
  auto box = w.mailbox("bob");
  REQUIRE(box.size() == 1);
  CHECK(box[0].from == "alice");
  CHECK(text_of(box[0], "bob") == "for later");
}

TEST_CASE("§3 unverified: a direct message from an address not the table's for that name is dropped unanswered") {
  World w;
  w.join("alice");
  Peer& bob = w.join("bob");
  const udp::endpoint forger = addr(66, 6666);
  bool answered = false;
  w.net.filter = [&](const udp::endpoint&, const udp::endpoint& to, const proto::Message&) {
    if (to == forger) answered = true;
    return false;
  };
  std::size_t mark = bob.lines.size();
  inject(w, forger, bob.at(), proto::Direct{424242, "alice", sealed(w, "alice", "bob", 424242, "forged")});
  w.net.run_for(1s);
  CHECK(since(bob, mark).empty());
  CHECK_FALSE(answered);
  CHECK(bob.client.client_counters().unverified == 1);
}

// ---------------------------------------------------------------- §3 a burst typed at once (the backlog)

// What goes on the wire from a client to one peer: the directs not answered yet, at most.
struct InFlightWatch {
  udp::endpoint from, to;
  std::set<std::uint64_t> open;
  std::size_t peak = 0;
  std::size_t directs = 0;
  std::size_t saves = 0;  // Save requests from `from` to the server
  /// Counts `m` on its way; never drops it.
  bool operator()(const udp::endpoint& f, const udp::endpoint& t, const proto::Message& m) {
    if (f == from && t == to && as<proto::Direct>(m) != nullptr) {
      ++directs;
      open.insert(as<proto::Direct>(m)->id);
      peak = std::max(peak, open.size());
    }
    if (f == to && t == from && as<proto::Receipt>(m) != nullptr) open.erase(proto::reply_to(m));
    if (f == from && t == kServerAt && as<proto::Save>(m) != nullptr) ++saves;
    return false;
  }
};

std::string burst_text(std::size_t i) { return "burst " + std::to_string(i); }

TEST_CASE("§3 a burst of 5,000 sends typed at once to an online peer: all shown once, in order, directly, within the window") {
  for (bool fifo : {true, false}) {
    CAPTURE(fifo);
    World w;
    // One path, one delay: datagrams arrive in the order sent (loopback). With jitter, those
    // in flight together may overtake each other; then only "all, once" holds.
    if (fifo) w.net.min_delay = w.net.max_delay = 1ms;
    Peer& alice = w.join("alice");
    Peer& bob = w.join("bob");
    InFlightWatch watch{alice.at(), bob.at(), {}, 0, 0, 0};
    w.net.filter = std::ref(watch);
    const std::size_t n = 5000;
    const std::size_t alice_mark = alice.lines.size(), bob_mark = bob.lines.size();
    for (std::size_t i = 0; i < n; ++i) alice.type("send bob " + burst_text(i));
    // Typed in one go: one window in flight, the rest waiting.
    CHECK(watch.open.size() == peer::Backlog{}.window);
    CHECK(alice.client.waiting() == n - peer::Backlog{}.window);
    REQUIRE(w.net.run_until([&] { return alice.client.busy() == 0; }, 60s));
    std::vector<std::string> want_bob, want_alice(n, say::received_by("bob"));
    for (std::size_t i = 0; i < n; ++i) want_bob.push_back(say::direct("alice", burst_text(i)));
    std::vector<std::string> got_bob = since(bob, bob_mark);
    if (!fifo) std::sort(got_bob.begin(), got_bob.end()), std::sort(want_bob.begin(), want_bob.end());
    CHECK(got_bob == want_bob);
    CHECK(since(alice, alice_mark) == want_alice);
    CHECK(watch.directs == n);  // no loss: each sent once
    CHECK(watch.peak == peer::Backlog{}.window);
    CHECK(watch.saves == 0);
    CHECK(w.store->count_for("bob") == 0);
    CHECK(alice.client.core().counters().in_flight_refused == 0);
  }
}

TEST_CASE("§3 a peer that stops answering mid-burst: the rest go to the server in order, one final line each") {
  World w;
  w.net.min_delay = w.net.max_delay = 1ms;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  const udp::endpoint bob_at = bob.at();
  const std::size_t n = 2000, shown_before_kill = 300;
  const std::size_t mark = alice.lines.size(), bob_mark = bob.lines.size();
  for (std::size_t i = 0; i < n; ++i) alice.type("send bob " + burst_text(i));
  alice.end_input();
  REQUIRE(w.net.run_until([&] { return bob.lines.size() - bob_mark >= shown_before_kill; }, 10s));
  std::vector<std::string> shown = since(bob, bob_mark);
  w.kill("bob");  // silently: the server still has bob online
  const auto killed_at = w.net.clock.now();
  REQUIRE(w.net.run_until([&] { return alice.exit_code != -1; }, 60s));
  // The window in flight waits out its retries (3 s); the rest do not wait 3 s a window each.
  CHECK(w.net.clock.now() - killed_at < 6s);
  CHECK(alice.exit_code == 0);
  std::vector<std::string> lines = since(alice, mark);
  const std::size_t received = only(lines, {say::received_by("bob")}).size();
  const std::size_t saved = only(lines, {say::saved}).size();
  const std::size_t no_ack = only(lines, {say::no_ack("bob")}).size();
  const std::size_t offline = only(lines, {say::is_offline("bob")}).size();
  // Exactly one final line per message, and nothing else but the lines of the fallback.
  CHECK(received + saved == n);
  CHECK(no_ack + offline == saved);
  // ... and the table update that marked bob offline.
  const std::size_t updated = only(lines, {say::updated}).size();
  CHECK(lines.size() == received + saved + no_ack + offline + updated);
  CHECK(received == shown.size());
  // Only the messages that were in flight report their own missing ACK.
  CHECK(no_ack > 0);
  CHECK(no_ack <= peer::Backlog{}.window);
  CHECK(offline > 0);
  // Bob showed a prefix, in order; the server holds the rest, in order.
  for (std::size_t i = 0; i < shown.size(); ++i) CHECK(shown[i] == say::direct("alice", burst_text(i)));
  REQUIRE(w.store->count_for("bob") == n - shown.size());
  auto box = w.mailbox("bob");  // the first 1,000; bob, restarted, shows them all
  for (std::size_t i = 0; i < box.size(); ++i) CHECK(text_of(box[i], "bob") == burst_text(shown.size() + i));
  Peer& bob2 = w.start("bob", "bob", bob_at);
  REQUIRE(w.net.run_until([&] { return w.store->count_for("bob") == 0 && w.converged(); }, 30s));
  std::vector<std::string> texts;
  const std::string head = ">>> alice: ";
  for (const auto& l : bob2.lines)  // ">>> alice: YYYY-MM-DD HH:MM:SS <text>"
    if (starts_with(l, head) && l.size() > head.size() + 20) texts.push_back(l.substr(head.size() + 20));
  std::vector<std::string> want;
  for (std::size_t i = shown.size(); i < n; ++i) want.push_back(burst_text(i));
  CHECK(texts == want);
}

TEST_CASE("§3 past the backlog bound a typed message is refused with one line, the others all arrive") {
  World w;
  w.backlog = peer::Backlog{4, 10};
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  const std::size_t mark = alice.lines.size();
  for (std::size_t i = 0; i < 20; ++i) alice.type("send bob " + burst_text(i));
  // 4 in flight, 10 waiting, 6 refused at once.
  const std::string full = ">>> [Error: 10 messages already waiting to be sent; this one was not sent]";
  CHECK(since(alice, mark) == std::vector<std::string>(6, full));
  CHECK(alice.client.client_counters().backlog_full == 6);
  REQUIRE(w.net.run_until([&] { return alice.client.busy() == 0; }, 10s));
  CHECK(alice.count(say::received_by("bob")) == 14);
  for (std::size_t i = 0; i < 14; ++i) CHECK(bob.count(say::direct("alice", burst_text(i))) == 1);
  // The bound is on what waits: with the backlog gone, typing works again.
  CHECK(w.type_and_wait("alice", "send bob after", say::received_by("bob")));
}

TEST_CASE("§3/§4 dereg typed behind a backlog: bye at once, every message typed before it still arrives") {
  World w;
  w.backlog = peer::Backlog{8, 1000};
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  for (std::size_t i = 0; i < 100; ++i) alice.type("send bob " + burst_text(i));
  alice.type("dereg alice");
  REQUIRE(w.net.run_until([&] { return alice.client.busy() == 0; }, 30s));
  CHECK(alice.count(say::bye) == 1);
  CHECK_FALSE(alice.client.online());
  CHECK(alice.count(say::received_by("bob")) == 100);
  for (std::size_t i = 0; i < 100; ++i) CHECK(bob.count(say::direct("alice", burst_text(i))) == 1);
}

TEST_CASE("§6 a burst of channel messages typed at once: each reaches every member once, all within the window") {
  World w;
  w.backlog = peer::Backlog{16, 100'000};
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  const std::size_t n = 500, mark = bob.lines.size();
  for (std::size_t i = 0; i < n; ++i) alice.type("send_all " + burst_text(i));
  CHECK(alice.client.core().in_flight() <= 16 + 1);  // the window, and perhaps a keep-alive
  // The server ACKs alice before its relay reaches bob: wait for both.
  REQUIRE(w.net.run_until([&] { return alice.client.busy() == 0 && bob.lines.size() >= mark + n; }, 60s));
  w.net.run_for(1s);
  CHECK(alice.count(say::by_server) == n);
  for (std::size_t i = 0; i < n; ++i) CHECK(shown_channel(bob, "alice", burst_text(i)) == 1);
  CHECK(alice.client.core().counters().in_flight_refused == 0);
}

// ================================================================ §4 leaving

TEST_CASE("§4 dereg: offline and still running, others see it, reg brings it back") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  CHECK(w.type_and_wait("bob", "dereg alice", ">>> [Error: dereg takes your own name, bob]", 1s));
  CHECK(w.type_and_wait("bob", "dereg bob", say::bye));
  CHECK(bob.exit_code == -1);
  CHECK_FALSE(w.srv().has_session("bob"));
  CHECK_FALSE(w.srv().table().find("bob")->online);
  REQUIRE(w.net.run_until([&] { return !alice.sees_online("bob"); }, 5s));
  CHECK(alice.lines.back() == say::updated);
  // Offline, commands that need the network are refused at the prompt.
  CHECK(w.type_and_wait("bob", "send alice hi",
                        ">>> [Error: you are offline; type reg bob to come back online]", 1s));
  std::size_t welcomes = bob.count(say::welcome);
  CHECK(w.type_and_wait("bob", "reg bob", say::welcome));
  CHECK(bob.count(say::welcome) == welcomes + 1);
  CHECK_FALSE(bob.saw(say::have_messages));
  REQUIRE(w.net.run_until([&] { return alice.sees_online("bob"); }, 5s));
  CHECK(w.type_and_wait("bob", "send alice back", say::received_by("alice")));
}

TEST_CASE("§4 dereg with the server gone: not responding, exiting, exit code 1") {
  World w;
  w.join("alice");
  Peer& bob = w.join("bob");
  w.stop_server();
  std::size_t mark = bob.lines.size();
  bob.type("dereg bob");
  REQUIRE(w.net.run_until([&] { return bob.exit_code != -1; }, 5s));
  CHECK(bob.exit_code == 1);
  CHECK(since(bob, mark) == std::vector<std::string>{say::not_responding, say::exiting});
}

TEST_CASE("§4 silent leave: the process ends at once and the server is not told") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  bool told = false;
  w.net.filter = [&](const udp::endpoint& from, const udp::endpoint&, const proto::Message&) {
    if (from == bob.at()) told = true;
    return false;
  };
  w.net.act(bob.client.core(), [&] { bob.client.leave(); });
  CHECK(bob.exit_code == 0);
  w.net.run_for(2s);
  CHECK_FALSE(told);
  CHECK(w.server_has_online("bob", bob.at()));
  CHECK(alice.sees_online("bob"));
}

// ================================================================ §5 offline messages

TEST_CASE("§5 save -> probe -> exists -> direct: the recipient answers the server, the message goes direct") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  int directs_dropped = 0;
  w.net.filter = [&](const udp::endpoint& from, const udp::endpoint& to, const proto::Message& m) {
    if (from == alice.at() && to == bob.at() && as<proto::Direct>(m) != nullptr && directs_dropped < 6) {
      ++directs_dropped;
      return true;
    }
    return false;
  };
  std::size_t mark = alice.lines.size();
  CHECK(w.type_and_wait("alice", "send bob are you there", say::received_by("bob"), 10s));
  CHECK(directs_dropped == 6);
  CHECK(since(alice, mark) ==
        std::vector<std::string>{say::no_ack("bob"), say::exists("bob"), say::received_by("bob")});
  CHECK(bob.count(say::direct("alice", "are you there")) == 1);
  // Nothing saved, bob not marked offline.
  CHECK(w.store->count_for("bob") == 0);
  CHECK(w.server_has_online("bob", bob.at()));
  w.net.run_for(2s);
  CHECK(alice.sees_online("bob"));
  CHECK(shown_direct(bob, "alice", "are you there") == 1);
}

TEST_CASE("§5 no ACK and no answer to the probe: marked offline, saved with its timestamp, delivered on reg") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  const udp::endpoint bob_at = bob.at();
  w.kill("bob");  // silently: the server still has bob online
  w.run_to_second(10);
  std::size_t mark = alice.lines.size();
  CHECK(w.type_and_wait("alice", "send bob hello", say::saved, 10s));
  CHECK(only(since(alice, mark), {say::no_ack("bob"), say::saved, say::is_offline("bob")}) ==
        std::vector<std::string>{say::no_ack("bob"), say::saved});
  // The probe went unanswered: bob is offline in the server's table and in alice's.
  CHECK_FALSE(w.srv().table().find("bob")->online);
  REQUIRE(w.net.run_until([&] { return !alice.sees_online("bob"); }, 5s));
  auto box = w.mailbox("bob");
  REQUIRE(box.size() == 1);
  const std::int64_t ts = box[0].ts_us;
  // bob starts again at his address.
  Peer& bob2 = w.start("bob", "bob", bob_at);
  REQUIRE(w.net.run_until([&] { return shown_direct(bob2, "alice", "hello") == 1 && w.converged(); }, 10s));
  CHECK(only(bob2.lines, {say::welcome, say::have_messages, saved_line("alice", ts, "hello")}) ==
        std::vector<std::string>{say::welcome, say::have_messages, saved_line("alice", ts, "hello")});
  // Stamped on the save's arrival, 3 s after alice typed at 00:00:10 (six direct tries of
  // 500 ms), shown in the reader's local time (UTC here).
  CHECK(bob2.saw(">>> alice: 2026-01-01 00:00:13 hello"));
  CHECK(w.store->count_for("bob") == 0);
  CHECK(w.server_has_online("bob", bob_at));
}

TEST_CASE("§5/§10 probe race: bob registers again elsewhere while the server's probe of his old address runs") {
  // Two orders of the same race: the new registration admitted before the save's probe of
  // the old address times out (the probe's verdict is about a session that no longer is),
  // and after it.
  for (Duration lead : {Duration(2900ms), Duration(3100ms)}) {
    CAPTURE(lead.count());
    World w;
    Peer& alice = w.join("alice");
    w.join("bob");
    const udp::endpoint a = w["bob"].at();
    const udp::endpoint b = w.next_addr();
    std::vector<proto::Entry> to_alice;  // every row alice was sent
    w.net.filter = [&](const udp::endpoint&, const udp::endpoint& to, const proto::Message& m) {
      if (to == alice.at())
        if (const auto* t = as<proto::Table>(m)) to_alice.insert(to_alice.end(), t->entries.begin(), t->entries.end());
      return to == a;  // bob at A hears nothing any more
    };
    std::size_t mark = alice.lines.size();
    alice.type("send bob catch me");
    w.net.run_for(lead);
    // bob's process at A is gone; bob starts again at B.
    w.kill("bob");
    Peer& bob_b = w.start("bob", "bob", b);
    REQUIRE(w.net.run_until(
        [&] { return alice.client.busy() == 0 && shown_direct(bob_b, "alice", "catch me") >= 1 && w.converged(); },
        10s));
    w.net.run_for(20s);  // keep-alives, any late table update
    INFO(transcript(alice));
    INFO(transcript(bob_b));
    CHECK(w.server_has_online("bob", b));
    CHECK(w.srv().has_session("bob"));
    const proto::Entry* e = alice.client.table().find("bob");
    REQUIRE(e != nullptr);
    CHECK(e->online);
    CHECK(e->ip == b.address().to_string());
    CHECK(e->port == b.port());
    CHECK(shown_direct(bob_b, "alice", "catch me") == 1);
    CHECK(only(since(alice, mark), {say::no_ack("bob"), say::saved}) ==
          std::vector<std::string>{say::no_ack("bob"), say::saved});
    // bob at B was never marked offline, so it never had to register again.
    CHECK_FALSE(bob_b.saw(say::lost_track));
    // Admitted before the save committed (2.9 s), bob at B has nothing waiting and is online at
    // once; admitted after it (3.1 s), his row is offline only until the saved message is
    // delivered (SPEC §5). Either way, once online at B, never offline again.
    CHECK(bob_b.saw(say::have_messages) == (lead > 3s));
    bool online_at_b = false;
    for (const auto& row : to_alice) {
      if (row.name != "bob" || row.port != b.port() || row.ip != b.address().to_string()) continue;
      if (online_at_b) CHECK(row.online);
      online_at_b = online_at_b || row.online;
    }
    CHECK(online_at_b);
    CHECK(w.store->count_for("bob") == 0);
  }
}

TEST_CASE("§5/§10 probe race at the same address: a probe sent before bob's new registration is no verdict on it") {
  World w;
  Peer& alice = w.join("alice");
  w.join("bob");
  const udp::endpoint a = w["bob"].at();
  // alice's direct tries are lost, and so is every probe the server sends before bob starts again.
  bool restarted = false;
  std::vector<std::uint64_t> old_probes;
  std::vector<proto::Entry> bob_rows;  // bob's row as sent to alice after bob started again
  w.net.filter = [&](const udp::endpoint& from, const udp::endpoint& to, const proto::Message& m) {
    if (const auto* t = as<proto::Table>(m); t != nullptr && to == alice.at() && restarted)
      for (const auto& e : t->entries)
        if (e.name == "bob") bob_rows.push_back(e);
    if (from == alice.at() && to == a && as<proto::Direct>(m) != nullptr) return !restarted;
    if (const auto* p = as<proto::Probe>(m); p != nullptr && to == a) {
      if (!restarted) old_probes.push_back(p->id);
      return std::find(old_probes.begin(), old_probes.end(), p->id) != old_probes.end();
    }
    return false;
  };
  alice.type("send bob catch me");
  REQUIRE(w.net.run_until([&] { return alice.saw(say::no_ack("bob")) && !old_probes.empty(); }, 5s));
  // bob's process at A dies and starts again at A while the server's probe is unanswered.
  w.kill("bob");
  restarted = true;
  Peer& bob = w.start("bob", "bob", a);
  REQUIRE(w.net.run_until([&] { return alice.client.busy() == 0 && shown_direct(bob, "alice", "catch me") == 1; },
                          5s));
  w.net.run_for(20s);
  INFO(transcript(alice));
  INFO(transcript(bob));
  CHECK(alice.saw(say::saved));
  CHECK(shown_direct(bob, "alice", "catch me") == 1);
  // The probe's silence was about bob's old process: the new one is never marked offline.
  CHECK_FALSE(bob.saw(say::lost_track));
  for (const auto& e : bob_rows) CHECK(e.online);
  CHECK(w.server_has_online("bob", a));
  CHECK(alice.sees_online("bob"));
  CHECK(w.store->count_for("bob") == 0);
}

TEST_CASE("§5 saved messages are shown in arrival order even when a probed save commits after a later one") {
  World w;
  Peer& alice = w.join("alice");
  w.join("bob");
  w.kill("bob");  // online in the table, silent
  // dave: a registered client with no core (hand-made datagrams), whose save skips the probe.
  const udp::endpoint dave = addr(40, 6000);
  std::vector<proto::Message> to_dave;
  w.net.filter = [&](const udp::endpoint&, const udp::endpoint& to, const proto::Message& m) {
    if (to == dave) to_dave.push_back(m);
    return false;
  };
  fake_register(w, dave, "dave", 9001);
  REQUIRE(w.net.run_until([&] { return w.srv().has_session("dave"); }, 1s));
  // alice's save arrives first and waits for the probe of bob (500 ms); dave's, with `force`
  // (as after an "exists" round), is committed at once, before alice's.
  alice.type("send bob first");
  REQUIRE(w.net.run_until([&] { return alice.saw(say::no_ack("bob")); }, 5s));
  w.net.run_for(100ms);
  inject(w, dave, kServerAt, proto::Save{9002, "dave", "bob", 77, true, sealed(w, "dave", "bob", 77, "second")});
  REQUIRE(w.net.run_until([&] { return alice.saw(say::saved); }, 5s));
  REQUIRE(w.net.run_until([&] { return w.store->count_for("bob") == 2; }, 1s));
  auto box = w.mailbox("bob");
  REQUIRE(box.size() == 2);
  CHECK(text_of(box[0], "bob") == "first");
  CHECK(text_of(box[1], "bob") == "second");
  CHECK(box[0].seq > box[1].seq);  // committed in the other order
  CHECK(box[0].ts_us < box[1].ts_us);
  bool dave_acked = false;
  for (const auto& m : to_dave)
    if (const auto* ack = as<proto::Ack>(m)) dave_acked = dave_acked || ack->re == 9002;
  CHECK(dave_acked);
  // bob comes back at another address (a delivery to his old one must not matter here).
  const udp::endpoint bob_b = w.next_addr();
  Peer& bob = w.start("bob", "bob", bob_b);
  REQUIRE(w.net.run_until([&] { return w.store->count_for("bob") == 0 && w.server_has_online("bob", bob_b); }, 10s));
  INFO(transcript(bob));
  const std::vector<std::string> expect{say::have_messages, saved_line("alice", box[0].ts_us, "first"),
                                        saved_line("dave", box[1].ts_us, "second")};
  CHECK(only(bob.lines, expect) == expect);
}

// A delivery (Stored request) started for one session of a client must not go on being
// retransmitted after a new registration replaced that session (Server::end_session drops it):
// otherwise a new process at that address would show what it carries again (after its previous
// process had it and the server deleted it), or before messages that arrived earlier. The
// delay is fixed so that datagrams sent together arrive in order, whatever the seed.
TEST_CASE("§5/§7 a client restarted at its address is not shown a delivery meant for its previous process") {
  SUBCASE("nothing twice: the previous process had the message, the next one must not see it again") {
    World w;
    w.net.min_delay = w.net.max_delay = 1ms;
    w.join("alice");
    w.join("bob");
    const udp::endpoint bob_at = w["bob"].at();
    w.kill("bob");  // Ctrl+C: still online in every table
    bool delivery_to_dead = false;
    w.net.filter = [&](const udp::endpoint&, const udp::endpoint& to, const proto::Message& m) {
      if (to == bob_at && as<proto::Stored>(m) != nullptr && w.peers.count("bob") == 0) delivery_to_dead = true;
      return false;
    };
    REQUIRE(w.type_and_wait("alice", "send_all hi", say::by_server));
    // The relay finds bob silent: marked offline, the copy saved, and (his session going on)
    // a delivery sent to his dead process.
    REQUIRE(w.net.run_until([&] { return delivery_to_dead; }, 2s));
    // bob starts again at once, gets the copy (once), and is killed again.
    Peer& bob2 = w.start("bob", "bob", bob_at);
    REQUIRE(w.net.run_until([&] { return w.store->count_for("bob") == 0 && w.server_has_online("bob", bob_at); },
                            2s));
    CHECK(shown_channel(bob2, "alice", "hi") == 1);
    w.kill("bob");
    // Started again: the server holds nothing for bob, and bob must be shown nothing.
    Peer& bob3 = w.start("bob", "bob", bob_at);
    w.net.run_for(5s);
    INFO(transcript(bob3));
    CHECK(bob3.saw(say::welcome));
    CHECK_FALSE(bob3.saw(say::have_messages));
    CHECK(shown_channel(bob3, "alice", "hi") == 0);
  }
  SUBCASE("arrival order: a delivery meant for the previous process must not overtake the new one") {
    World w;
    w.net.min_delay = w.net.max_delay = 1ms;
    Peer& alice = w.join("alice");
    w.join("bob");
    const udp::endpoint bob_at = w["bob"].at();
    w.kill("bob");
    const udp::endpoint dave = addr(40, 6000);
    fake_register(w, dave, "dave", 9001);
    REQUIRE(w.net.run_until([&] { return w.srv().has_session("dave"); }, 1s));
    bool restarted = false, lost_one = false;
    w.net.filter = [&](const udp::endpoint&, const udp::endpoint& to, const proto::Message& m) {
      // The new session's first delivery datagram is lost (it is sent again 500 ms later).
      if (const auto* st = as<proto::Stored>(m); st != nullptr && to == bob_at && restarted && !lost_one &&
                                                 st->items.size() == 2) {
        lost_one = true;
        return true;
      }
      return false;
    };
    alice.type("send bob first");
    REQUIRE(w.net.run_until([&] { return alice.saw(say::no_ack("bob")); }, 5s));
    w.net.run_for(100ms);
    inject(w, dave, kServerAt, proto::Save{9002, "dave", "bob", 77, true, sealed(w, "dave", "bob", 77, "second")});
    REQUIRE(w.net.run_until([&] { return alice.saw(say::saved); }, 5s));
    REQUIRE(w.store->count_for("bob") == 2);
    auto box = w.mailbox("bob");
    REQUIRE(box.size() == 2);
    restarted = true;
    Peer& bob = w.start("bob", "bob", bob_at);
    REQUIRE(w.net.run_until([&] { return w.store->count_for("bob") == 0 && w.server_has_online("bob", bob_at); },
                            5s));
    INFO(transcript(bob));
    CHECK(lost_one);
    const std::vector<std::string> expect{say::have_messages, saved_line("alice", box[0].ts_us, "first"),
                                          saved_line("dave", box[1].ts_us, "second")};
    CHECK(only(bob.lines, expect) == expect);
  }
}

TEST_CASE("§5 the mailbox counts inserted rows only: a save repeated after the server lost its ACK counts once") {
  registry::ServerOptions o;
  o.max_stored = 2;
  World w(o);
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  REQUIRE(w.type_and_wait("bob", "dereg bob", say::bye));
  REQUIRE(w.net.run_until([&] { return !alice.sees_online("bob"); }, 5s));
  // The server commits alice's save; its ACK is lost, and the server restarts (with its data)
  // before alice's retry arrives: the new process has no memory of the request and saves again.
  std::uint64_t save_id = 0;
  bool ack_lost = false;
  w.net.filter = [&](const udp::endpoint& from, const udp::endpoint& to, const proto::Message& m) {
    if (const auto* s = as<proto::Save>(m); s != nullptr && from == alice.at() && save_id == 0) save_id = s->id;
    if (const auto* a = as<proto::Ack>(m); a != nullptr && to == alice.at() && a->re == save_id && !ack_lost) {
      ack_lost = true;
      return true;
    }
    return false;
  };
  std::size_t mark = alice.lines.size();
  alice.type("send bob one");
  REQUIRE(w.net.run_until([&] { return ack_lost; }, 2s));
  CHECK(w.store->count_for("bob") == 1);
  w.restart_server(true);
  REQUIRE(w.net.run_until([&] { return alice.saw(say::saved); }, 5s));
  CHECK(since(alice, mark) == std::vector<std::string>{say::is_offline("bob"), say::saved});
  CHECK(w.store->count_for("bob") == 1);
  // One message stored of two allowed: the next is saved, the one after refused.
  CHECK(w.type_and_wait("alice", "send bob two", say::saved));
  CHECK(w.store->count_for("bob") == 2);
  CHECK(w.type_and_wait("alice", "send bob three",
                        ">>> [Server refused the message: bob's mailbox is full (2 saved messages)]"));
  CHECK(w.store->count_for("bob") == 2);
  // bob gets the two, once each, in order.
  mark = bob.lines.size();
  REQUIRE(w.type_and_wait("bob", "reg bob", say::welcome));
  REQUIRE(w.net.run_until([&] { return shown_direct(bob, "alice", "two") == 1; }, 10s));
  auto got = since(bob, mark);
  CHECK(got.size() >= 4);
  CHECK(shown_direct(bob, "alice", "one") == 1);
  CHECK(shown_direct(bob, "alice", "three") == 0);
  auto first = std::find_if(got.begin(), got.end(), [](const std::string& l) { return ends_with(l, " one"); });
  auto second = std::find_if(got.begin(), got.end(), [](const std::string& l) { return ends_with(l, " two"); });
  CHECK(first < second);
}

TEST_CASE("§5 a dereg racing a delivery loses nothing: the next reg shows everything once, in arrival order") {
  for (bool lose_the_ack : {true, false}) {
    CAPTURE(lose_the_ack);
    World w;
    Peer& alice = w.join("alice");
    Peer& bob = w.join("bob");
    w.join("carol");
    REQUIRE(w.type_and_wait("bob", "dereg bob", say::bye));
    REQUIRE(w.net.run_until([&] { return !alice.sees_online("bob") && !w["carol"].sees_online("bob"); }, 5s));
    REQUIRE(w.type_and_wait("alice", "send bob m1", say::saved));
    w.net.run_for(1s);
    REQUIRE(w.type_and_wait("carol", "send bob m2", say::saved));
    w.net.run_for(1s);
    REQUIRE(w.type_and_wait("alice", "send bob m3", say::saved));
    auto box = w.mailbox("bob");
    REQUIRE(box.size() == 3);
    const std::vector<std::string> expect{saved_line("alice", box[0].ts_us, "m1"),
                                          saved_line("carol", box[1].ts_us, "m2"),
                                          saved_line("alice", box[2].ts_us, "m3")};
    // The delivery goes out; bob deregs while it is in flight (its ACK lost, or itself lost).
    std::vector<std::uint64_t> stored_ids;
    bool block = true;
    w.net.filter = [&](const udp::endpoint& from, const udp::endpoint& to, const proto::Message& m) {
      if (!block) return false;
      if (const auto* s = as<proto::Stored>(m); s != nullptr && to == bob.at()) {
        stored_ids.push_back(s->id);
        return !lose_the_ack;
      }
      if (const auto* a = as<proto::Ack>(m); a != nullptr && from == bob.at())
        return std::find(stored_ids.begin(), stored_ids.end(), a->re) != stored_ids.end();
      return false;
    };
    bob.type("reg bob");
    REQUIRE(w.net.run_until([&] { return bob.saw(say::have_messages) && !stored_ids.empty(); }, 5s));
    if (lose_the_ack) REQUIRE(w.net.run_until([&] { return shown_direct(bob, "alice", "m3") == 1; }, 2s));
    REQUIRE(w.type_and_wait("bob", "dereg bob", say::bye));
    w.net.run_for(5s);  // the delivery's retries run out
    CHECK(w.store->count_for("bob") == 3);
    block = false;
    REQUIRE(w.type_and_wait("bob", "reg bob", say::welcome));
    REQUIRE(w.net.run_until([&] { return w.store->count_for("bob") == 0 && alice.sees_online("bob"); }, 10s));
    INFO(transcript(bob));
    CHECK(only(bob.lines, expect) == expect);
    CHECK(w.server_has_online("bob", bob.at()));
  }
}

TEST_CASE("§5 a delivery lost six times waits for the next keep-alive, nothing is lost") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  REQUIRE(w.type_and_wait("bob", "dereg bob", say::bye));
  REQUIRE(w.net.run_until([&] { return !alice.sees_online("bob"); }, 5s));
  REQUIRE(w.type_and_wait("alice", "send bob while you were out", say::saved));
  auto box = w.mailbox("bob");
  REQUIRE(box.size() == 1);
  int dropped = 0;
  w.net.filter = [&](const udp::endpoint&, const udp::endpoint& to, const proto::Message& m) {
    if (to == bob.at() && as<proto::Stored>(m) != nullptr && dropped < 6) {
      ++dropped;
      return true;
    }
    return false;
  };
  const std::uint64_t stalled = w.srv().server_counters().stalled;
  bob.type("reg bob");
  REQUIRE(w.net.run_until([&] { return w.srv().server_counters().stalled > stalled; }, 5s));
  CHECK(dropped == 6);
  CHECK(bob.saw(say::have_messages));
  CHECK(shown_direct(bob, "alice", "while you were out") == 0);
  // Kept, and the session with it; bob is online only once he has his messages.
  CHECK(w.store->count_for("bob") == 1);
  CHECK(w.srv().has_session("bob"));
  CHECK_FALSE(w.srv().table().find("bob")->online);
  // bob's next keep-alive finds his session live and brings the delivery.
  REQUIRE(w.net.run_until([&] { return shown_direct(bob, "alice", "while you were out") == 1; }, 20s));
  CHECK(bob.lines.back() == saved_line("alice", box[0].ts_us, "while you were out"));
  CHECK_FALSE(bob.saw(say::lost_track));
  REQUIRE(w.net.run_until([&] { return alice.sees_online("bob"); }, 5s));
  CHECK(w.store->count_for("bob") == 0);
  CHECK(w.server_has_online("bob", bob.at()));
}

TEST_CASE("§5 a store failure during a save: the sender is told, nothing is shown as saved, the server goes on") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  REQUIRE(w.type_and_wait("bob", "dereg bob", say::bye));
  REQUIRE(w.net.run_until([&] { return !alice.sees_online("bob"); }, 5s));
  w.store->fail_next(offline::MemoryStore::Call::save, 1);
  std::size_t mark = alice.lines.size();
  const std::string refused = ">>> [Server refused the message: the server could not save the message]";
  CHECK(w.type_and_wait("alice", "send bob lost", refused));
  CHECK(since(alice, mark) == std::vector<std::string>{say::is_offline("bob"), refused});
  CHECK(w.store->count_for("bob") == 0);
  // The server keeps serving.
  mark = alice.lines.size();
  CHECK(w.type_and_wait("alice", "send bob kept", say::saved));
  CHECK(since(alice, mark) == std::vector<std::string>{say::is_offline("bob"), say::saved});
  CHECK(w.store->count_for("bob") == 1);
  REQUIRE(w.type_and_wait("bob", "reg bob", say::welcome));
  REQUIRE(w.net.run_until([&] { return shown_direct(bob, "alice", "kept") == 1; }, 5s));
  CHECK(shown_direct(bob, "alice", "lost") == 0);
}

// ================================================================ §6 the channel

TEST_CASE("§6 the channel: relayed to the online members, saved for the offline ones") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  Peer& carol = w.join("carol");
  REQUIRE(w.type_and_wait("carol", "dereg carol", say::bye));
  REQUIRE(w.net.run_until([&] { return !alice.sees_online("carol"); }, 5s));
  std::size_t mark = alice.lines.size();
  CHECK(w.type_and_wait("alice", "send_all hi all", say::by_server));
  CHECK(since(alice, mark) == std::vector<std::string>{say::by_server});
  REQUIRE(w.net.run_until([&] { return bob.saw(say::channel("alice", "hi all")); }, 2s));
  CHECK(alice.count(say::channel("alice", "hi all")) == 0);  // not to the sender
  auto box = w.mailbox("carol");
  REQUIRE(box.size() == 1);
  CHECK(box[0].kind == offline::Kind::channel);
  REQUIRE(w.type_and_wait("carol", "reg carol", saved_channel_line("alice", box[0].ts_us, "hi all")));
  CHECK(carol.count(say::have_messages) == 1);
}

TEST_CASE("§6 a relay miss: the member is marked offline, gets a saved copy exactly once, ends online") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  Peer& carol = w.join("carol");
  bool alice_saw_carol_offline = false, bob_saw_carol_offline = false, copy_delivered = false;
  w.net.filter = [&](const udp::endpoint& from, const udp::endpoint& to, const proto::Message& m) {
    if (const auto* t = as<proto::Table>(m))
      for (const auto& e : t->entries)
        if (e.name == "carol" && !e.online) {
          alice_saw_carol_offline = alice_saw_carol_offline || to == alice.at();
          bob_saw_carol_offline = bob_saw_carol_offline || to == bob.at();
        }
    if (const auto* s = as<proto::Stored>(m); s != nullptr && to == carol.at())
      for (const auto& i : s->items) copy_delivered = copy_delivered || (i.channel && text_of(i, "carol") == "hi");
    return from == kServerAt && to == carol.at() && as<proto::Relay>(m) != nullptr;
  };
  std::size_t mark = alice.lines.size();
  CHECK(w.type_and_wait("alice", "send_all hi", say::by_server));
  CHECK(since(alice, mark).front() == say::by_server);
  REQUIRE(w.net.run_until([&] { return alice_saw_carol_offline && bob_saw_carol_offline; }, 3s));
  CHECK(bob.count(say::channel("alice", "hi")) == 1);
  REQUIRE(w.net.run_until([&] { return shown_channel(carol, "alice", "hi") >= 1; }, 10s));
  w.net.run_for(50s);
  INFO(transcript(carol));
  CHECK(copy_delivered);
  CHECK(shown_channel(carol, "alice", "hi") == 1);
  CHECK(w.server_has_online("carol", carol.at()));
  CHECK(alice.sees_online("carol"));
  CHECK(bob.sees_online("carol"));
  CHECK(carol.client.online());
  CHECK(w.store->count_for("carol") == 0);
}

TEST_CASE("§6 a channel message to a member whose mailbox is full: the sender is told how many missed it") {
  registry::ServerOptions o;
  o.max_stored = 1;
  World w(o);
  Peer& alice = w.join("alice");
  w.join("bob");
  Peer& carol = w.join("carol");
  REQUIRE(w.type_and_wait("bob", "dereg bob", say::bye));
  REQUIRE(w.net.run_until([&] { return !alice.sees_online("bob"); }, 5s));
  REQUIRE(w.type_and_wait("alice", "send bob fills it", say::saved));
  CHECK(w.store->count_for("bob") == 1);
  const std::string partial = ">>> [Message received by Server; 1 member could not get it: mailbox full.]";
  CHECK(w.type_and_wait("alice", "send_all hello members", partial));
  CHECK_FALSE(alice.saw(say::by_server));
  REQUIRE(w.net.run_until([&] { return carol.saw(say::channel("alice", "hello members")); }, 2s));
  CHECK(w.store->count_for("bob") == 1);
  CHECK(w.srv().server_counters().channel_missed == 1);
}

TEST_CASE("§6 send_all with the server gone: not responding (with a full stop)") {
  World w;
  w.join("alice");
  Peer& bob = w.join("bob");
  w.stop_server();
  std::size_t mark = bob.lines.size();
  CHECK(w.type_and_wait("bob", "send_all anyone?", say::not_responding_dot));
  CHECK(since(bob, mark) == std::vector<std::string>{say::not_responding_dot});
  CHECK(bob.exit_code == -1);
}

// ================================================================ §7 the worked example

TEST_CASE("§7 the worked example, end to end") {
  World w;
  w.join("c1");
  Peer& c2 = w.join("c2");
  Peer& c3 = w.join("c3");
  const udp::endpoint c1_at = w["c1"].at();
  w.kill("c1");  // Ctrl+C
  std::size_t m2 = c2.lines.size(), m3 = c3.lines.size();
  REQUIRE(w.type_and_wait("c2", "send_all Welcome to Channel", say::by_server));
  // The relay finds c1 silent; the table change reaches everyone.
  REQUIRE(w.net.run_until([&] { return !c2.sees_online("c1") && !c3.sees_online("c1"); }, 5s));
  REQUIRE(w.type_and_wait("c2", "send c1 Hello", say::saved));
  REQUIRE(w.net.run_until([&] { return c3.saw(say::channel("c2", "Welcome to Channel")); }, 1s));
  REQUIRE(w.type_and_wait("c3", "send c1 Hello!!", say::saved));
  CHECK(since(c2, m2) == std::vector<std::string>{say::by_server, say::updated, say::is_offline("c1"), say::saved});
  CHECK(only(since(c3, m3), {say::channel("c2", "Welcome to Channel"), say::is_offline("c1"), say::saved}) ==
        std::vector<std::string>{say::channel("c2", "Welcome to Channel"), say::is_offline("c1"), say::saved});
  auto box = w.mailbox("c1");
  REQUIRE(box.size() == 3);
  const std::vector<std::string> expect{
      say::welcome, say::have_messages, saved_channel_line("c2", box[0].ts_us, "Welcome to Channel"),
      saved_line("c2", box[1].ts_us, "Hello"), saved_line("c3", box[2].ts_us, "Hello!!")};
  Peer& c1 = w.start("c1", "c1", c1_at);
  REQUIRE(w.net.run_until([&] { return w.store->count_for("c1") == 0 && w.converged() && c1.reading; }, 10s));
  CHECK(only(c1.lines, expect) == expect);
  // Started again later, c1 gets nothing twice (restarted within seconds: see the test
  // "a client restarted at its address is not shown a delivery meant for its previous process").
  w.kill("c1");
  w.net.run_for(5s);
  Peer& again = w.start("c1", "c1", c1_at);
  REQUIRE(w.net.run_until([&] { return again.reading; }, 5s));
  w.net.run_for(2s);
  CHECK(again.lines == std::vector<std::string>{say::welcome, say::updated});
}

// ================================================================ §10 sessions and keep-alives

TEST_CASE("§10 keep-alive expiry: a killed client is marked offline after 3 intervals, not before") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  w.join("carol");
  const udp::endpoint carol_at = w["carol"].at();
  Time last_heard = w.net.clock.now();
  w.net.filter = [&](const udp::endpoint& from, const udp::endpoint& to, const proto::Message&) {
    if (from == carol_at && to == kServerAt) last_heard = w.net.clock.now();
    return false;
  };
  w.net.run_for(20s);  // at least one keep-alive from carol
  w.kill("carol");
  const Time killed = w.net.clock.now();
  // Two intervals after the last word from carol: still online everywhere.
  w.net.run_for(last_heard + 30s - w.net.clock.now());
  CHECK(alice.sees_online("carol"));
  CHECK(w.srv().has_session("carol"));
  CHECK(w.srv().server_counters().expired == 0);
  REQUIRE(w.net.run_until([&] { return !alice.sees_online("carol") && !bob.sees_online("carol"); }, 60s));
  const Duration silent = w.net.clock.now() - last_heard;
  CHECK(silent > 45s);
  CHECK(silent <= 45s + 15s + 1s);  // the expiry check runs once an interval
  CHECK(w.net.clock.now() > killed);
  CHECK_FALSE(w.srv().has_session("carol"));
  CHECK_FALSE(w.srv().table().find("carol")->online);
  CHECK(w.srv().server_counters().expired == 1);
  // The living keep their sessions.
  CHECK(w.srv().has_session("alice"));
  CHECK(w.srv().has_session("bob"));
  CHECK(alice.sees_online("bob"));
}

TEST_CASE("§10 server not responding: said once after 3 silent intervals, no exit, then the server is back") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  Time last_answer = w.net.clock.now();
  w.net.filter = [&](const udp::endpoint& from, const udp::endpoint& to, const proto::Message&) {
    if (from == kServerAt && to == alice.at()) last_answer = w.net.clock.now();
    return false;
  };
  w.net.run_for(20s);
  w.stop_server();
  Time said{};
  REQUIRE(w.net.run_until(
      [&] {
        if (alice.saw(say::not_responding) && said == Time{}) said = w.net.clock.now();
        return alice.saw(say::not_responding) && bob.saw(say::not_responding);
      },
      80s));
  CHECK(said - last_answer >= 45s);
  w.net.run_for(100s);  // it keeps trying, silently
  CHECK(alice.count(say::not_responding) == 1);
  CHECK(bob.count(say::not_responding) == 1);
  CHECK(alice.exit_code == -1);
  CHECK(bob.exit_code == -1);
  CHECK_FALSE(alice.saw(say::back));
  // The server starts again over its data: its next answer is news.
  w.start_server();
  REQUIRE(w.net.run_until([&] { return alice.saw(say::back) && bob.saw(say::back); }, 20s));
  CHECK(alice.count(say::back) == 1);
  CHECK(alice.lines.back() != say::not_responding);
  // Its data kept the sessions: no registration needed; messages flow.
  CHECK_FALSE(alice.saw(say::lost_track));
  CHECK(alice.count(say::welcome) == 1);
  CHECK(w.type_and_wait("alice", "send_all all good", say::by_server));
  CHECK(w.net.run_until([&] { return bob.saw(say::channel("alice", "all good")); }, 2s));
}

TEST_CASE("§10 the server back without its data: 'Server is back', then the client registers again by itself") {
  World w;
  Peer& alice = w.join("alice");
  std::size_t mark = alice.lines.size();
  w.stop_server(false);
  REQUIRE(w.net.run_until([&] { return alice.saw(say::not_responding); }, 80s));
  w.start_server();
  const std::size_t updates = alice.count(say::updated);
  REQUIRE(w.net.run_until([&] { return alice.count(say::welcome) == 2 && alice.count(say::updated) > updates; }, 20s));
  const std::vector<std::string> expect{say::not_responding, say::back, say::lost_track, say::welcome};
  CHECK(only(since(alice, mark), expect) == expect);
  CHECK(w.server_has_online("alice", alice.at()));
  CHECK(alice.exit_code == -1);
}

TEST_CASE("§10 server restart with its data: clients keep working without typing reg") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  Peer& carol = w.join("carol");
  w.net.run_for(5s);
  w.restart_server(true);
  CHECK(w.srv().has_session("alice"));  // loaded from the store
  CHECK(w.server_has_online("bob", bob.at()));
  // Within 3 keep-alive intervals every client takes the new server's table, by itself.
  std::size_t a = alice.count(say::updated), b = bob.count(say::updated), c = carol.count(say::updated);
  REQUIRE(w.net.run_until(
      [&] { return alice.count(say::updated) > a && bob.count(say::updated) > b && carol.count(say::updated) > c; },
      45s));
  for (Peer* p : {&alice, &bob, &carol}) {
    CHECK_FALSE(p->saw(say::lost_track));
    CHECK(p->count(say::welcome) == 1);
  }
  CHECK(w.converged());
  CHECK(w.type_and_wait("alice", "send_all after restart", say::by_server));
  CHECK(w.net.run_until(
      [&] { return bob.saw(say::channel("alice", "after restart")) && carol.saw(say::channel("alice", "after restart")); },
      2s));
  CHECK(w.type_and_wait("bob", "send carol direct still", say::received_by("carol")));
  // Saves still go through the restarted server.
  REQUIRE(w.type_and_wait("carol", "dereg carol", say::bye));
  REQUIRE(w.net.run_until([&] { return !alice.sees_online("carol"); }, 5s));
  CHECK(w.type_and_wait("alice", "send carol kept", say::saved));
}

TEST_CASE("§10 server restart without its data: every client registers again by itself and gets what is saved") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  Peer& carol = w.join("carol");
  w.net.run_for(5s);
  w.restart_server(false);
  CHECK(w.srv().table().size() == 0);
  const Time restarted = w.net.clock.now();
  REQUIRE(w.net.run_until(
      [&] {
        for (Peer* p : {&alice, &bob, &carol})
          if (p->count(say::welcome) < 2) return false;
        return w.converged();
      },
      45s));
  CHECK(w.net.clock.now() - restarted <= 45s);
  for (Peer* p : {&alice, &bob, &carol}) {
    INFO(transcript(*p));
    CHECK(p->count(say::lost_track) == 1);
    CHECK(p->count(say::welcome) == 2);
    // The "lost track" line comes before the second welcome.
    auto lost = std::find(p->lines.begin(), p->lines.end(), say::lost_track);
    auto second = std::find(lost, p->lines.end(), say::welcome);
    CHECK(second != p->lines.end());
    CHECK(p->exit_code == -1);
  }
  for (const char* n : {"alice", "bob", "carol"}) CHECK(w.srv().has_session(n));
  // Anything saved later reaches its recipient.
  REQUIRE(w.type_and_wait("bob", "dereg bob", say::bye));
  REQUIRE(w.net.run_until([&] { return !alice.sees_online("bob"); }, 5s));
  REQUIRE(w.type_and_wait("alice", "send bob saved after the wipe", say::saved));
  REQUIRE(w.type_and_wait("bob", "reg bob", say::have_messages));
  CHECK(w.net.run_until([&] { return shown_direct(bob, "alice", "saved after the wipe") == 1; }, 5s));
}

TEST_CASE("§10 reg <own name> asks the server: 'already registered' only for the same live session") {
  World w;
  w.join("alice");
  Peer& bob = w.join("bob");
  std::size_t mark = bob.lines.size();
  CHECK(w.type_and_wait("bob", "reg bob", say::already, 2s));
  CHECK(since(bob, mark) == std::vector<std::string>{say::already});
  CHECK(w.type_and_wait("bob", "reg alice", ">>> [Error: reg takes your own name, bob]", 1s));
  // The server loses its data; before bob's next keep-alive could tell him, bob types reg.
  w.restart_server(false);
  mark = bob.lines.size();
  CHECK(w.type_and_wait("bob", "reg bob", say::welcome, 2s));
  CHECK(bob.count(say::already) == 1);
  CHECK(only(since(bob, mark), {say::welcome, say::already}) == std::vector<std::string>{say::welcome});
  CHECK(w.srv().has_session("bob"));
  CHECK(w.server_has_online("bob", bob.at()));
}

TEST_CASE("§10 lookup: send to a name the local table lacks asks the server for its row") {
  World w;
  Peer& alice = w.join("alice");
  w.join("bob");
  bool asked = false;
  w.net.filter = [&](const udp::endpoint& from, const udp::endpoint& to, const proto::Message& m) {
    if (from == alice.at() && as<proto::Lookup>(m) != nullptr) asked = true;
    return from == kServerAt && to == alice.at() && has_entry(m, "carol");
  };
  Peer& carol = w.start("carol");
  REQUIRE(w.net.run_until([&] { return carol.reading && w["bob"].sees_online("carol"); }, 5s));
  w.net.run_for(1s);
  REQUIRE(alice.client.table().find("carol") == nullptr);
  std::size_t mark = alice.lines.size();
  CHECK(w.type_and_wait("alice", "send carol x", say::received_by("carol")));
  CHECK(asked);
  CHECK(since(alice, mark) == std::vector<std::string>{say::received_by("carol")});
  CHECK(carol.count(say::direct("alice", "x")) == 1);
  asked = false;
  mark = alice.lines.size();
  CHECK(w.type_and_wait("alice", "send nobody x", ">>> [Error: unknown client nobody; type list to see the table]"));
  CHECK(asked);
  CHECK(since(alice, mark).size() == 1);
}

TEST_CASE("§10 end of input completes the requests in flight, each with its status line, then exits 0") {
  for (const char* how : {"end of input", "quit"}) {
    CAPTURE(how);
    World w;
    Peer& alice = w.join("alice");
    w.join("bob");
    w.kill("bob");  // still online in every table
    REQUIRE(alice.sees_online("bob"));
    std::size_t mark = alice.lines.size();
    alice.type("send bob are you there");
    if (std::string(how) == "quit") alice.type("quit");
    else alice.end_input();
    CHECK(alice.exit_code == -1);  // not yet: a request is in flight
    REQUIRE(w.net.run_until([&] { return alice.exit_code != -1; }, 10s));
    CHECK(alice.exit_code == 0);
    CHECK(only(since(alice, mark), {say::no_ack("bob"), say::saved}) ==
          std::vector<std::string>{say::no_ack("bob"), say::saved});
    CHECK(w.store->count_for("bob") == 1);
  }
  // Nothing in flight: end of input exits at once.
  World w;
  Peer& alice = w.join("alice");
  alice.end_input();
  CHECK(alice.exit_code == 0);
}

// ================================================================ §8 what bad input gets (on the cores)

TEST_CASE("unexpected datagram types are dropped and counted, unanswered, by the server and by a client") {
  World w;
  Peer& alice = w.join("alice");
  const udp::endpoint stranger = addr(77, 7777);
  int answers = 0;
  w.net.filter = [&](const udp::endpoint&, const udp::endpoint& to, const proto::Message&) {
    if (to == stranger) ++answers;
    return false;
  };
  inject(w, stranger, kServerAt, proto::Direct{5151, "mallory", "to the server?"});
  inject(w, stranger, kServerAt, proto::Relay{5152, "server", "mallory", 1, "relay to the server?"});
  w.net.run_for(1s);
  CHECK(w.srv().server_counters().unexpected == 2);
  std::size_t mark = alice.lines.size();
  inject(w, stranger, alice.at(), proto::Save{6161, "mallory", "alice", 1, false, "save at a client?"});
  inject(w, stranger, alice.at(), proto::Register{6162, "mallory", {}, 0, {}, {}});
  w.net.run_for(1s);
  CHECK(alice.client.client_counters().unexpected == 2);
  CHECK(since(alice, mark).empty());
  CHECK(answers == 0);
  // Both keep serving.
  w.join("bob");
  CHECK(w.type_and_wait("alice", "send bob fine", say::received_by("bob")));
}

TEST_CASE("§8 a client answers only the server requests that name it: another name's probe, relay, table and stored go unanswered") {
  World w;
  w.join("alice");
  Peer& bob = w.join("bob");
  // What bob answers, by request id.
  std::set<std::uint64_t> acked;
  w.net.filter = [&](const udp::endpoint& from, const udp::endpoint& to, const proto::Message& m) {
    if (from == bob.at() && to == kServerAt)
      if (const auto* a = as<proto::Ack>(m)) acked.insert(a->re);
    return false;
  };
  const std::uint64_t epoch = bob.client.table().epoch(), version = bob.client.table().version();
  const auto sent_ms = static_cast<std::uint64_t>(w.net.clock.wall_us() / 1000);
  const std::uint64_t mid = 5150;
  const std::string signed_by_alice = identity::sign_channel(identity_of("alice"), "alice", mid, sent_ms, "for m04");
  const proto::StoredItem saved_for_m04{"alice", false, w.net.clock.wall_us(), mid + 1, identity_of("alice").public_key(),
                                        sealed(w, "alice", "m04", mid + 1, "saved for m04")};
  const proto::Entry moved{"alice", "10.9.9.9", 9999, true, identity_of("alice").public_key()};
  std::size_t mark = bob.lines.size();
  // From the server's own address, for the client that had bob's address before him.
  inject(w, kServerAt, bob.at(), proto::Probe{7001, "m04"});
  inject(w, kServerAt, bob.at(), proto::Relay{7002, "m04", "alice", mid, signed_by_alice});
  inject(w, kServerAt, bob.at(), proto::Table{7003, "m04", epoch, version, version + 1, false, {moved}});
  inject(w, kServerAt, bob.at(), proto::Stored{7004, "m04", {saved_for_m04}});
  w.net.run_for(2s);
  CHECK(acked.empty());
  CHECK(bob.client.client_counters().not_for_me == 4);
  CHECK(bob.client.client_counters().not_from_server == 0);
  CHECK(since(bob, mark).empty());
  // Nothing of them was taken: the table is where it was, alice where she is.
  CHECK(bob.client.table().version() == version);
  REQUIRE(bob.client.table().find("alice") != nullptr);
  CHECK(bob.client.table().find("alice")->ip == w["alice"].at().address().to_string());
  // The same requests naming bob are answered.
  const std::string for_bob = identity::sign_channel(identity_of("alice"), "alice", mid + 2, sent_ms, "for bob");
  inject(w, kServerAt, bob.at(), proto::Probe{7101, "bob"});
  inject(w, kServerAt, bob.at(), proto::Relay{7102, "bob", "alice", mid + 2, for_bob});
  inject(w, kServerAt, bob.at(), proto::Table{7103, "bob", epoch, version, version, false, {}});
  inject(w, kServerAt, bob.at(), proto::Stored{7104, "bob", {}});
  w.net.run_for(2s);
  CHECK(acked == std::set<std::uint64_t>{7101, 7102, 7103, 7104});
  CHECK(bob.client.client_counters().not_for_me == 4);
  CHECK(bob.saw(say::channel("alice", "for bob")));
  CHECK_FALSE(bob.saw(say::channel("alice", "for m04")));
}

TEST_CASE("§2 a restarted client on the port another name used does not answer the probe for that name, which re-registers") {
  // The load test's failure: m04 is killed, m07 starts on the port m04 had, and m04 comes back
  // on another port. The server, which still has m04 online at the old port, probes it there.
  World w;
  Peer& alice = w.join("alice");
  const udp::endpoint old_port = w.join("m04").at();
  w.kill("m04");
  REQUIRE(w.server_has_online("m04", old_port));
  Peer& m07 = w.start("m07", "m07", old_port);
  REQUIRE(w.net.run_until([&] { return m07.reading; }, 5s));
  REQUIRE(w.server_has_online("m04", old_port));  // nothing told the server m04 is gone
  Peer& m04 = w.start("m04", "m04", w.next_addr());
  REQUIRE(w.net.run_until([&] { return m04.exit_code != -1 || m04.reading; }, 5s));
  INFO(transcript(m04));
  CHECK(m04.exit_code == -1);
  CHECK(m04.lines == std::vector<std::string>{say::welcome, say::updated});
  CHECK(w.server_has_online("m04", m04.at()));
  CHECK(w.server_has_online("m07", old_port));
  // m07 was asked for m04 (the probe, and the table updates m04's session was still sent) and
  // answered none of it; it is itself still fine.
  CHECK(m07.client.client_counters().not_for_me >= 1);
  CHECK(m07.exit_code == -1);
  CHECK(w.type_and_wait("alice", "send m04 you are back", say::received_by("m04")));
  CHECK(w.type_and_wait("alice", "send m07 and you", say::received_by("m07")));
  CHECK(m04.count(say::direct("alice", "you are back")) == 1);
  CHECK(alice.exit_code == -1);
}

TEST_CASE("§5 saved messages delivered to a client's old address are not acknowledged by the client now there") {
  // A Stored batch for m04 that reaches m07 (on the port m04 had) must not be ACKed: the server
  // deletes what is ACKed, and m07 cannot open it. The messages wait for the real m04.
  World w;
  w.net.min_delay = w.net.max_delay = 1ms;
  w.join("alice");
  const udp::endpoint old_port = w.join("m04").at();
  w.kill("m04");
  Peer& m07 = w.start("m07", "m07", old_port);
  REQUIRE(w.net.run_until([&] { return m07.reading; }, 5s));
  // alice's message is saved for m04 (it does not answer at the old port), then the server
  // delivers what it holds for m04's session there: m07 gets the Stored datagrams.
  bool delivered_to_old_port = false;
  w.net.filter = [&](const udp::endpoint&, const udp::endpoint& to, const proto::Message& m) {
    if (const auto* st = as<proto::Stored>(m); st != nullptr && to == old_port && st->recipient == "m04")
      delivered_to_old_port = true;
    return false;
  };
  REQUIRE(w.type_and_wait("alice", "send m04 keep this for me", say::saved));
  REQUIRE(w.net.run_until([&] { return delivered_to_old_port; }, 5s));
  w.net.run_for(5s);
  CHECK(w.store->count_for("m04") == 1);
  CHECK(m07.client.client_counters().not_for_me >= 1);
  // The real m04 comes back elsewhere and gets it.
  Peer& m04 = w.start("m04", "m04", w.next_addr());
  REQUIRE(w.net.run_until([&] { return w.store->count_for("m04") == 0; }, 10s));
  INFO(transcript(m04));
  CHECK(shown_direct(m04, "alice", "keep this for me") == 1);
}

// Two saves that waited for a probe commit behind the delivery cursor during ONE drain: the
// second one, committed after the drain's single rewind, is left in the store.
TEST_CASE("§5 two probed saves that commit behind the delivery cursor in one drain are both delivered") {
  World w;
  w.net.min_delay = w.net.max_delay = 30ms;
  w.join("bob");
  w.kill("bob");  // online at A, silent
  const udp::endpoint alice = addr(40, 6000), carol = addr(41, 6000), dave = addr(42, 6000);
  const udp::endpoint bob_b = addr(43, 6000);
  bool rewind_seen = false;
  w.net.filter = [&](const udp::endpoint&, const udp::endpoint& to, const proto::Message& m) {
    if (to == bob_b)
      if (const auto* s = as<proto::Stored>(m))
        for (const auto& i : s->items)
          if (text_of(i, "bob") == "late-a") rewind_seen = true;
    return false;
  };
  fake_register(w, alice, "alice", 101);
  fake_register(w, carol, "carol", 201);
  fake_register(w, dave, "dave", 301);
  REQUIRE(w.net.run_until([&] { return w.srv().has_session("dave") && w.srv().has_session("carol"); }, 2s));
  // bob comes back at B: his registration waits ~500 ms for the probe of his old address A.
  Peer& bob = w.start("bob", "bob", bob_b);
  w.net.run_for(100ms);
  inject(w, alice, kServerAt, proto::Save{102, "alice", "bob", 1001, false, sealed(w, "alice", "bob", 1001, "late-a")});  // probes A
  w.net.run_for(300ms);
  inject(w, carol, kServerAt, proto::Save{202, "carol", "bob", 2001, false, sealed(w, "carol", "bob", 2001, "late-c")});  // probes A
  w.net.run_for(50ms);
  for (int i = 0; i < 10; ++i)
    inject(w, dave, kServerAt,
           proto::Save{static_cast<std::uint64_t>(310 + i), "dave", "bob", static_cast<std::uint64_t>(3000 + i), true,
                       sealed(w, "dave", "bob", static_cast<std::uint64_t>(3000 + i),
                              std::string("d").append(std::to_string(i)).append(500, 'x'))});
  REQUIRE(w.net.run_until([&] { return rewind_seen; }, 5s));
  INFO("late-c committed before the rewind? ", w.store->count_for("bob"));
  bool late_c_in_store = false;
  for (auto& m : w.mailbox("bob")) late_c_in_store = late_c_in_store || text_of(m, "bob") == "late-c";
  CHECK_FALSE(late_c_in_store);  // the scenario needs it to commit after the rewind
  for (int i = 0; i < 10; ++i)
    inject(w, dave, kServerAt,
           proto::Save{static_cast<std::uint64_t>(330 + i), "dave", "bob", static_cast<std::uint64_t>(4000 + i), true,
                       sealed(w, "dave", "bob", static_cast<std::uint64_t>(4000 + i),
                              std::string("e").append(std::to_string(i)).append(500, 'y'))});
  w.net.run_for(10s);
  INFO(transcript(bob));
  std::size_t shown_c = 0;
  for (auto& l : bob.lines) shown_c += l.find("late-c") != std::string::npos;
  CHECK(shown_c == 1);
  CHECK(w.store->count_for("bob") == 0);
  CHECK(w.server_has_online("bob", bob_b));
  // bob leaves and comes back: is it delivered now?
  REQUIRE(w.type_and_wait("bob", "dereg bob", say::bye));
  std::size_t mark = bob.lines.size();
  REQUIRE(w.type_and_wait("bob", "reg bob", say::welcome));
  w.net.run_for(5s);
  INFO(transcript(bob));
  CHECK(only(since(bob, mark), {say::have_messages}).empty());  // nothing was left behind
  CHECK(w.store->count_for("bob") == 0);
}

TEST_CASE("§10 end of input waits for a reg typed while offline and its welcome") {
  World w;
  w.join("alice");
  Peer& bob = w.join("bob");
  REQUIRE(w.type_and_wait("bob", "dereg bob", say::bye));
  std::size_t mark = bob.lines.size();
  bob.type("reg bob");
  bob.end_input();
  CHECK(bob.exit_code == -1);  // a request is in flight: should wait for its status line
  w.net.run_for(5s);
  CHECK(since(bob, mark) == std::vector<std::string>{say::welcome});
}

TEST_CASE("§10 a client whose session the restarted server expired registers again when a send is refused") {
  // Reloaded sessions are judged by the server's own interval until their client registers
  // again; a client with a longer one loses its session, and the refusal of its next send
  // makes it ask (a keep-alive) and register again at once instead of at its next keep-alive.
  World w;
  Peer& alice = w.join("alice");
  w.peers["bob"] = std::make_unique<Peer>(w.net, "bob", w.next_addr(), kServerAt, transport::RetryPolicy{}, 300s, 999);
  Peer& bob = w["bob"];
  REQUIRE(w.net.run_until([&] { return bob.reading && w.converged(); }, 10s));
  w.restart_server(true);
  w.net.run_for(65s);
  CHECK_FALSE(w.srv().has_session("bob"));
  std::size_t mark = bob.lines.size();
  bob.type("send_all still here");
  w.net.run_for(5s);
  INFO(transcript(bob));
  CHECK(since(bob, mark) == std::vector<std::string>{
                                ">>> [Server refused the message: you are not registered from this address]",
                                say::lost_track, say::welcome, say::updated});
  CHECK(w.srv().has_session("bob"));
  CHECK(alice.sees_online("bob"));
  CHECK(w.type_and_wait("bob", "send_all now it works", say::by_server));
}

TEST_CASE("§10 dereg while the client registers again by itself is refused, and the client ends up online") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  // The server loses its data; bob's registration after its "live: false" is held back a while.
  bool hold = true;
  w.net.filter = [&](const udp::endpoint& from, const udp::endpoint&, const proto::Message& m) {
    return hold && from == bob.at() && as<proto::Register>(m) != nullptr;
  };
  w.restart_server(false);
  REQUIRE(w.net.run_until([&] { return bob.saw(say::lost_track); }, 60s));
  std::size_t mark = bob.lines.size();
  bob.type("dereg bob");
  CHECK(since(bob, mark) == std::vector<std::string>{">>> [Registration in progress.]"});
  hold = false;
  REQUIRE(w.net.run_until([&] { return bob.saw(say::welcome) && bob.count(say::welcome) == 2; }, 10s));
  CHECK(bob.count(say::bye) == 0);
  CHECK(w.srv().has_session("bob"));
  REQUIRE(w.net.run_until([&] { return alice.sees_online("bob"); }, 60s));
}

TEST_CASE("§5 --max-stored counts saves accepted in the same turn, not yet committed") {
  registry::ServerOptions o;
  o.max_stored = 1;
  World w(o);
  w.join("alice");
  w.join("bob");
  REQUIRE(w.type_and_wait("bob", "dereg bob", say::bye));
  REQUIRE(w.net.run_until([&] { return !w["alice"].sees_online("bob"); }, 10s));
  // Two saves for offline bob arrive in one burst (one turn of the server, one commit for
  // both): the second must be refused on arrival, before the first is on disk.
  const udp::endpoint alice_at = w["alice"].at();
  transport::Core& core = w.srv().core();
  w.net.act(core, [&] {
    core.on_datagram(proto::encode(proto::Save{9001, "alice", "bob", 1, false, sealed(w, "alice", "bob", 1, "one")}), alice_at);
    core.on_datagram(proto::encode(proto::Save{9002, "alice", "bob", 2, false, sealed(w, "alice", "bob", 2, "two")}), alice_at);
  });
  w.net.run_for(2s);
  CHECK(w.store->count_for("bob") == 1);
  CHECK(text_of(w.mailbox("bob").at(0), "bob") == "one");
}

TEST_CASE("§5 --max-stored is checked again when a save's probe comes back") {
  registry::ServerOptions o;
  o.max_stored = 1;
  World w(o);
  Peer& alice = w.join("alice");
  w.join("bob");
  w.join("dave");
  const udp::endpoint bob_at = w["bob"].at();
  w.kill("bob");  // silently: still online in every table, so a save for him is probed first
  bool probed = false;
  w.net.filter = [&](const udp::endpoint&, const udp::endpoint& to, const proto::Message& m) {
    probed = probed || (to == bob_at && as<proto::Probe>(m) != nullptr);
    return false;
  };
  alice.type("send bob one");  // no ACK, then a save that waits for its probe
  REQUIRE(w.net.run_until([&] { return probed; }, 10s));
  // While that probe is out, a forced save fills the mailbox.
  inject(w, w["dave"].at(), kServerAt, proto::Save{9003, "dave", "bob", 3, true, sealed(w, "dave", "bob", 3, "two")});
  REQUIRE(w.net.run_until([&] { return alice.client.busy() == 0; }, 10s));
  CHECK(alice.saw(">>> [Server refused the message: bob's mailbox is full (1 saved messages)]"));
  CHECK(w.store->count_for("bob") == 1);
  CHECK(text_of(w.mailbox("bob").at(0), "bob") == "two");
}

TEST_CASE("§10 a registration's keep-alive interval is clamped, whatever the wire says") {
  World w;
  const udp::endpoint at = w.next_addr();
  inject(w, at, kServerAt, proven_register(w, at, "zed", 5001, UINT64_MAX));
  w.net.run_for(1s);
  REQUIRE(w.srv().has_session("zed"));
  w.net.run_for(3h - 1min);  // the longest interval (1 h) three times over, less a little
  CHECK(w.srv().has_session("zed"));
  w.net.run_for(2h);
  CHECK_FALSE(w.srv().has_session("zed"));
}


// ================================================================ §11 identities and encryption

TEST_CASE("§11 a bound name is refused to another key, offline or online, the owner comes back with its own") {
  World w;
  w.join("bob");
  Peer& alice = w.join("alice");
  const udp::endpoint alice_at = alice.at();
  REQUIRE(w.type_and_wait("alice", "dereg alice", say::bye));
  // Offline: an impostor with another key, from another address.
  Peer& impostor = w.start_with("impostor", "alice", w.next_addr(), 1);
  REQUIRE(w.net.run_until([&] { return impostor.exit_code != -1; }, 10s));
  CHECK(impostor.exit_code == 1);
  CHECK(impostor.lines == std::vector<std::string>{say::other_identity("alice")});
  CHECK(w.srv().server_counters().other_key == 1);
  // The owner comes back (same key), then, online, an impostor at its very address.
  REQUIRE(w.type_and_wait("alice", "reg alice", say::welcome));
  w.kill("alice");
  Peer& second = w.start_with("impostor2", "alice", alice_at, 2);
  REQUIRE(w.net.run_until([&] { return second.exit_code != -1; }, 10s));
  CHECK(second.lines == std::vector<std::string>{say::other_identity("alice")});
  CHECK(w.srv().server_counters().other_key == 2);
}

TEST_CASE("§11 a registration proof is refused for another name, another address, a stale token, and when replayed") {
  World w;
  std::vector<proto::Register> proofs;
  std::vector<proto::Message> to_victim;
  const udp::endpoint victim = addr(50, 6000), thief = addr(51, 6000);
  w.net.filter = [&](const udp::endpoint& from, const udp::endpoint& to, const proto::Message& m) {
    if (const auto* r = as<proto::Register>(m); r != nullptr && from == victim && r->name == "zed") proofs.push_back(*r);
    if (to == victim || to == thief) to_victim.push_back(m);
    return false;
  };
  auto reg_errs = [&] {
    std::vector<std::string> out;
    for (const auto& m : to_victim)
      if (const auto* e = as<proto::RegErr>(m)) out.push_back(e->reason);
    return out;
  };
  // A token minted for "zed" signed for "zed", but sent as "yan": the token does not match.
  proto::Register other_name = proven_register(w, victim, "zed", 1);
  other_name.name = "yan";
  other_name.proof = identity::register_proof(identity_of("yan"), "yan", other_name.token);
  other_name.key = identity_of("yan").public_key();
  inject(w, victim, kServerAt, other_name);
  // The same proof from another address: the token names the address it was sent to.
  inject(w, thief, kServerAt, proven_register(w, victim, "zed", 2));
  w.net.run_for(1s);
  CHECK(reg_errs() == std::vector<std::string>(2, "the proof of identity did not check (stale or forged)"));
  CHECK_FALSE(w.srv().has_session("yan"));
  CHECK_FALSE(w.srv().has_session("zed"));
  // A genuine one registers.
  inject(w, victim, kServerAt, proven_register(w, victim, "zed", 3));
  REQUIRE(w.net.run_until([&] { return w.srv().has_session("zed"); }, 1s));
  REQUIRE(proofs.size() == 1);
  // The same datagram again, past the duplicate window (so not just the cached answer): refused.
  w.net.run_for(40s);
  to_victim.clear();
  w.net.send(victim, kServerAt, proto::encode(proofs[0]));
  w.net.run_for(1s);
  CHECK(reg_errs() == std::vector<std::string>{"this registration was already used"});
  CHECK(w.srv().server_counters().replayed == 1);
  // An hour later its token has expired, whatever else holds.
  w.net.run_for(1h);
  to_victim.clear();
  proto::Register late = proofs[0];
  late.id = 99;
  w.net.send(victim, kServerAt, proto::encode(late));
  w.net.run_for(1s);
  CHECK(reg_errs() == std::vector<std::string>{"the proof of identity did not check (stale or forged)"});
  CHECK(w.srv().server_counters().bad_proofs == 3);
}

TEST_CASE("§11 a direct message sealed by another key in a name's place is not shown and gets no receipt") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  bool receipt = false;
  w.net.filter = [&](const udp::endpoint& from, const udp::endpoint&, const proto::Message& m) {
    receipt = receipt || (from == bob.at() && as<proto::Receipt>(m) != nullptr);
    return false;
  };
  // From alice's own address, claiming alice, sealed by mallory's key.
  identity::Pair forged(identity_of("mallory"), identity_of("bob").public_key());
  std::size_t mark = bob.lines.size();
  inject(w, alice.at(), bob.at(),
         proto::Direct{777, "alice", identity::seal_direct(forged, 777, 1, "bob", "i am alice")});
  // And a genuine seal with its id changed: the sealed id must be the datagram's.
  inject(w, alice.at(), bob.at(), proto::Direct{778, "alice", sealed(w, "alice", "bob", 779, "moved id")});
  w.net.run_for(1s);
  CHECK(since(bob, mark).empty());
  CHECK_FALSE(receipt);
  CHECK(bob.client.client_counters().unauthenticated == 2);
}

TEST_CASE("§11 a captured direct datagram replayed after the receiver restarted is not shown again") {
  World w;
  const auto state = std::filesystem::temp_directory_path() /
                     (std::string("chatapp-cores-bob-").append(std::to_string(::getpid())).append(".db"));
  std::filesystem::remove(state);
  Peer& alice = w.join("alice");
  const udp::endpoint bob_at = w.next_addr();
  w.start_with("bob", "bob", bob_at, 0, state.string());
  REQUIRE(w.net.run_until([&] { return w["bob"].reading && w.converged(); }, 10s));
  std::vector<proto::Direct> captured;
  w.net.filter = [&](const udp::endpoint&, const udp::endpoint& to, const proto::Message& m) {
    if (const auto* d = as<proto::Direct>(m); d != nullptr && to == bob_at) captured.push_back(*d);
    return false;
  };
  REQUIRE(w.type_and_wait("alice", "send bob pay 10 euros", say::received_by("bob")));
  REQUIRE_FALSE(captured.empty());
  // bob's process ends and starts again at the same address, with the same state file.
  w.kill("bob");
  Peer& bob = w.start_with("bob", "bob", bob_at, 0, state.string());
  REQUIRE(w.net.run_until([&] { return bob.reading && w.converged(); }, 10s));
  std::size_t mark = bob.lines.size();
  w.net.send(alice.at(), bob_at, proto::encode(captured[0]));
  w.net.run_for(1s);
  // A minute later, with another id in the header (the core's duplicate window cannot help).
  w.net.run_for(1min);
  proto::Direct again = captured[0];
  again.id += 1;
  w.net.send(alice.at(), bob_at, proto::encode(again));
  w.net.run_for(1s);
  CHECK(since(bob, mark).empty());
  CHECK(bob.client.client_counters().replayed == 1);
  CHECK(bob.client.client_counters().unauthenticated == 1);  // the id changed: its seal does not match
  w.kill("bob");
  std::filesystem::remove(state);
  std::filesystem::remove(state.string() + "-wal");
  std::filesystem::remove(state.string() + "-shm");
}

TEST_CASE("§11 a key change is announced, blocks sending until trust, and trust lets messages through") {
  World w;
  Peer& bob = w.join("bob");
  w.join("alice");
  REQUIRE(w.type_and_wait("bob", "send alice hello", say::received_by("alice")));
  REQUIRE(w.type_and_wait("alice", "dereg alice", say::bye));
  // The operator releases the name with the server stopped; a new alice (another key) takes it.
  w.stop_server();
  CHECK(w.store->release("alice").found);
  w.start_server();
  w.kill("alice");
  Peer& alice2 = w.start_with("alice2", "alice", w.next_addr(), 1);
  REQUIRE(w.net.run_until([&] { return alice2.reading; }, 60s));
  REQUIRE(w.net.run_until([&] { return bob.saw(say::changed("alice")); }, 60s));
  CHECK(bob.count(say::changed("alice")) == 1);  // once, not with every update
  std::size_t mark = bob.lines.size();
  bob.type("send alice are you still you?");
  w.net.run_for(2s);
  CHECK(since(bob, mark) == std::vector<std::string>{say::changed("alice")});
  CHECK(alice2.lines.end() == std::find_if(alice2.lines.begin(), alice2.lines.end(),
                                           [](const std::string& l) { return l.find("still you") != std::string::npos; }));
  auto alice_row = [&] {
    std::string row;
    for (const auto& l : bob.lines)
      if (starts_with(l, "alice ")) row = l;
    return row;
  };
  bob.type("list");
  CHECK(ends_with(alice_row(), "online  identity changed"));
  const std::string new_fp = identity::fingerprint(identity_of("alice", 1).public_key());
  CHECK(w.type_and_wait("bob", "fingerprint alice",
                        ">>> [Fingerprint of alice's new identity: " + new_fp +
                            " (not trusted yet: type trust alice once it matches)]"));
  // The new alice writes before bob trusts her: bob does not answer, the server keeps it for
  // him, and his client holds it until trust.
  REQUIRE(w.type_and_wait("alice2", "send bob it is me, new laptop", say::saved, 20s));
  w.net.run_for(2s);
  CHECK(shown_direct(bob, "alice", "it is me, new laptop") == 0);
  CHECK(w.type_and_wait("bob", "verify alice", ">>> [Error: the identity of alice changed; type trust alice first]"));
  CHECK(w.type_and_wait("bob", "trust alice", ">>> [You now trust the new identity of alice.]"));
  CHECK(shown_direct(bob, "alice", "it is me, new laptop") == 1);
  CHECK(bob.count(say::changed("alice")) == 2);  // the announcement and the refused send: the unanswered tries add none
  CHECK(w.type_and_wait("bob", "fingerprint alice", ">>> [Fingerprint of alice: " + new_fp + "]"));
  CHECK(w.type_and_wait("bob", "verify alice", ">>> [You marked alice's fingerprint verified.]"));
  bob.type("list");
  CHECK(ends_with(alice_row(), "online  verified"));
  CHECK(w.type_and_wait("bob", "send alice welcome back", say::received_by("alice")));
  CHECK(alice2.saw(say::direct("bob", "welcome back")));
  CHECK(w.type_and_wait("bob", "trust alice", ">>> [The identity of alice has not changed.]"));
}

TEST_CASE("§11 blocking hides direct, saved and channel messages of that key, and refuses sending to it") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  w.join("carol");
  REQUIRE(w.type_and_wait("bob", "block alice", ">>> [alice is blocked.]"));
  REQUIRE(w.type_and_wait("bob", "blocked", ">>> [Blocked: alice]"));
  REQUIRE(w.type_and_wait("alice", "send bob live one", say::received_by("bob")));
  REQUIRE(w.type_and_wait("alice", "send_all to everyone", say::by_server));
  REQUIRE(w.type_and_wait("carol", "send bob from carol", say::received_by("bob")));
  CHECK(bob.saw(say::direct("carol", "from carol")));
  REQUIRE(w.type_and_wait("bob", "send alice hi", ">>> [Error: you blocked alice; type unblock alice to send to them]"));
  // Saved for bob while he is away: acknowledged and dropped, so it does not come back.
  REQUIRE(w.type_and_wait("bob", "dereg bob", say::bye));
  REQUIRE(w.net.run_until([&] { return !alice.sees_online("bob"); }, 10s));
  REQUIRE(w.type_and_wait("alice", "send bob saved one", say::saved));
  REQUIRE(w.type_and_wait("bob", "reg bob", say::welcome));
  REQUIRE(w.net.run_until([&] { return w.store->count_for("bob") == 0; }, 10s));
  w.net.run_for(1s);
  for (const auto& l : bob.lines) CHECK(l.find("alice:") == std::string::npos);
  CHECK(bob.client.client_counters().blocked == 3);
  REQUIRE(w.type_and_wait("bob", "unblock alice", ">>> [alice is unblocked.]"));
  REQUIRE(w.type_and_wait("bob", "blocked", ">>> [Nobody is blocked.]"));
  REQUIRE(w.type_and_wait("alice", "send bob after unblock", say::received_by("bob")));
  CHECK(bob.saw(say::direct("alice", "after unblock")));
}

TEST_CASE("§11 a channel message whose signature does not verify is shown by nobody, live or saved") {
  World w;
  w.join("alice");
  Peer& bob = w.join("bob");
  const std::uint64_t mid = 4242;
  // Relayed as if from the server (it could be the server itself): signed by the wrong key.
  std::string forged = identity::sign_channel(identity_of("mallory"), "alice", mid, 1, "alice says: send money");
  std::size_t mark = bob.lines.size();
  inject(w, kServerAt, bob.at(), proto::Relay{9191, "bob", "alice", mid, forged});
  // A genuine signature over another id than the relay's.
  inject(w, kServerAt, bob.at(),
         proto::Relay{9192, "bob", "alice", mid + 1, identity::sign_channel(identity_of("alice"), "alice", mid, 1, "moved")});
  proto::StoredItem item{"alice", true, w.net.clock.wall_us(), mid, identity_of("alice").public_key(), forged};
  inject(w, kServerAt, bob.at(), proto::Stored{9193, "bob", {item}});
  w.net.run_for(1s);
  CHECK(since(bob, mark).empty());
  CHECK(bob.client.client_counters().unauthenticated == 3);
}

TEST_CASE("§11 what the server stores for an offline recipient is ciphertext, which the recipient opens once") {
  World w;
  Peer& alice = w.join("alice");
  w.join("bob");
  REQUIRE(w.type_and_wait("bob", "dereg bob", say::bye));
  REQUIRE(w.net.run_until([&] { return !alice.sees_online("bob"); }, 10s));
  REQUIRE(w.type_and_wait("alice", "send bob the password is hunter2", say::saved));
  auto box = w.mailbox("bob");
  REQUIRE(box.size() == 1);
  CHECK(box[0].body.find("hunter2") == std::string::npos);
  const proto::Key alice_key = identity_of("alice").public_key();
  CHECK(box[0].from_key == std::string(alice_key.begin(), alice_key.end()));
  CHECK(text_of(box[0], "bob") == "the password is hunter2");
  CHECK(text_of(box[0], "carol").empty());  // sealed for bob alone
  REQUIRE(w.type_and_wait("bob", "reg bob", say::have_messages));
  REQUIRE(w.net.run_until([&] { return shown_direct(w["bob"], "alice", "the password is hunter2") == 1; }, 10s));
}

TEST_CASE("§11 a key in a table row that nothing can be sealed to is never pinned, and sending to it is an error") {
  World w;
  Peer& bob = w.join("bob");
  bool forged = false;
  w.net.filter = [&](const udp::endpoint& from, const udp::endpoint& to, const proto::Message& m) {
    const auto* t = as<proto::Table>(m);
    if (forged || t == nullptr || to != bob.at() || !has_entry(m, "eve")) return false;
    // The server (or whoever speaks from its address) lies about eve's key.
    proto::Table lie = *t;
    for (auto& e : lie.entries)
      if (e.name == "eve") e.key.fill(0xFF);
    forged = true;
    w.net.send(from, to, proto::encode(lie));
    return true;
  };
  w.join("eve");
  REQUIRE(forged);
  REQUIRE(w.net.run_until([&] { return bob.sees_online("eve"); }, 10s));
  CHECK_FALSE(identity::usable(bob.client.table().find("eve")->key));
  CHECK(w.type_and_wait("bob", "send eve hello", ">>> [Error: no key known for eve]"));
  CHECK(w.type_and_wait("bob", "fingerprint eve", ">>> [Error: no key known for eve]"));
  CHECK(bob.exit_code == -1);
}

}  // TEST_SUITE

TEST_CASE("on_quiet is called once the server has gone quiet after work, and not again while nothing comes") {
  registry::ServerOptions o;
  int calls = 0;
  o.on_quiet = [&calls] { ++calls; };
  World w(o);
  w.net.run_for(3s);
  CHECK(calls == 0);  // nothing received yet: nothing to give back
  w.join("alice");
  w.join("bob");
  REQUIRE(w.net.run_until([&] { return calls == 1; }, 5s));
  CHECK(w.srv().core().in_flight() == 0);
  // Keep-alives come every 15 s: each is work again, the quiet after it one call.
  w.net.run_for(40s);
  CHECK(calls >= 2);
  CHECK(calls <= 6);
}

TEST_CASE("§5 a drain of 150 across many datagrams survives one lost six times: each shown once, the store emptied") {
  World w;
  Peer& alice = w.join("alice");
  Peer& bob = w.join("bob");
  REQUIRE(w.type_and_wait("bob", "dereg bob", say::bye));
  REQUIRE(w.net.run_until([&] { return !alice.sees_online("bob"); }, 5s));
  constexpr int kCount = 150;  // past one store read (64) and many Stored datagrams
  for (int i = 0; i < kCount; ++i) alice.type(std::string("send bob m").append(std::to_string(i)));
  REQUIRE(w.net.run_until([&] { return alice.count(say::saved) == kCount; }, 30s));
  REQUIRE(w.store->count_for("bob") == kCount);
  // The third Stored datagram is lost six times: the delivery stalls mid-drain, with the read
  // ahead of it kept, and bob's next keep-alive resumes it.
  int stored_seen = 0, dropped = 0;
  w.net.filter = [&](const udp::endpoint&, const udp::endpoint& to, const proto::Message& m) {
    if (to != bob.at() || as<proto::Stored>(m) == nullptr) return false;
    if (++stored_seen >= 3 && dropped < 6) {
      ++dropped;
      return true;
    }
    return false;
  };
  bob.type("reg bob");
  REQUIRE(w.net.run_until(
      [&] {
        for (int i = 0; i < kCount; ++i)
          if (shown_direct(bob, "alice", std::string("m").append(std::to_string(i))) == 0) return false;
        return true;
      },
      30s));
  CHECK(dropped == 6);
  for (int i = 0; i < kCount; ++i) CHECK(shown_direct(bob, "alice", std::string("m").append(std::to_string(i))) == 1);
  // The ACKed messages are deleted in batches, within the removal delay, all of them.
  REQUIRE(w.net.run_until([&] { return w.store->count_for("bob") == 0; }, 2s));
  REQUIRE(w.net.run_until([&] { return alice.sees_online("bob"); }, 5s));
}
