// Several registry servers sharing one store (SPEC §13), on the fake network and clock: the
// decisions of the servers and the clients without PostgreSQL. The shared database is a
// MemoryStore with what the PostgreSQL store adds (who holds each session, bindings decided by
// the store, a change log each server reads the others' changes from).
#include <doctest/doctest.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "offline/async_store.hpp"
#include "offline/memory_store.hpp"
#include "sim.hpp"

namespace {

using namespace chat;
using namespace chat::sim;

/// The database the servers share.
struct SharedDb {
  offline::MemoryStore store;
  std::map<std::string, std::string> holder;  // name -> the server holding its session
  struct Logged {
    std::string server;
    offline::Change::What what = offline::Change::What::client;
    std::string name;
    std::int64_t delta = 0;
  };
  std::vector<Logged> log;  // the change log, in commit order
  std::size_t trimmed = 0;  // log[0, trimmed) is gone: a server that had not read it resyncs

  /// The operator's --release-name while the servers run.
  void release(const std::string& name) {
    const offline::Released r = store.release(name);
    holder.erase(name);
    log.push_back({"release", offline::Change::What::client, name, 0});
    if (r.messages > 0) log.push_back({"release", offline::Change::What::mail, name, -static_cast<std::int64_t>(r.messages)});
  }
  /// Every change so far trimmed from the log.
  void trim() { trimmed = log.size(); }

  offline::Snapshot snapshot(const std::string& id) {
    offline::Snapshot s;
    s.clients = store.load_clients();
    for (const auto& r : s.clients) {
      s.here.push_back(holder[r.name] == id);
      if (std::size_t n = store.count_for(r.name); n > 0) s.mailboxes.emplace(r.name, n);
    }
    return s;
  }

  std::optional<offline::ClientRow> row(const std::string& name) {
    for (auto& r : store.load_clients())
      if (r.name == name) return r;
    return std::nullopt;
  }
};

/// One server's connection to the shared database: answers at once, and hands the server the
/// other servers' changes when pump() is called (before every simulated event).
class DbView final : public offline::AsyncStore {
 public:
  DbView(SharedDb& db, std::string id) : db_(db), id_(std::move(id)) {}

  offline::Snapshot load() override {
    read_ = db_.log.size();
    return db_.snapshot(id_);
  }
  void save(std::vector<offline::NewMessage> batch, std::function<void(offline::Reply<std::vector<bool>>)> done) override {
    std::vector<bool> flags = db_.store.save(batch);
    std::map<std::string, std::int64_t> added;
    for (std::size_t i = 0; i < batch.size(); ++i)
      if (flags[i]) ++added[batch[i].to];
    for (const auto& [to, n] : added) db_.log.push_back({id_, offline::Change::What::mail, to, n});
    done({std::move(flags), {}});
  }
  void pending_for(const std::string& to, offline::Cursor after, std::size_t limit,
                   std::function<void(offline::Reply<std::vector<offline::StoredMessage>>)> done) override {
    done({db_.store.pending_for(to, after, limit), {}});
  }
  void count_for(const std::string& to, std::function<void(offline::Reply<std::size_t>)> done) override {
    done({db_.store.count_for(to), {}});
  }
  void remove_delivered(const std::string& to, std::vector<std::int64_t> seqs,
                        std::function<void(offline::Reply<bool>)> done) override {
    std::size_t before = db_.store.count_for(to);
    db_.store.remove_delivered(to, seqs);
    if (std::size_t gone = before - db_.store.count_for(to); gone > 0)
      db_.log.push_back({id_, offline::Change::What::mail, to, -static_cast<std::int64_t>(gone)});
    if (done) done({true, {}});
  }
  void store_clients(std::vector<offline::RowWrite> rows,
                     std::function<void(offline::Reply<std::vector<bool>>)> done) override {
    std::vector<bool> flags;
    for (const auto& w : rows) {
      std::optional<offline::ClientRow> cur = db_.row(w.row.name);
      bool ok = false;
      if (w.here) {
        // The store decides a binding: the first key written for a name is its key.
        ok = !(cur && !cur->key.empty() && !w.row.key.empty() && cur->key != w.row.key);
        if (ok) {
          db_.store.store_clients(std::span(&w.row, 1));
          db_.holder[w.row.name] = id_;
        }
      } else if (cur && cur->ip == w.row.ip && cur->port == w.row.port && db_.holder[w.row.name] == id_) {
        ok = true;
        offline::ClientRow r = *cur;
        r.online = w.row.online;
        db_.store.store_clients(std::span(&r, 1));
      }
      if (ok) db_.log.push_back({id_, offline::Change::What::client, w.row.name, 0});
      flags.push_back(ok);
    }
    done({std::move(flags), {}});
  }
  void watch(std::function<void(const offline::Change&)> on_change) override { on_change_ = std::move(on_change); }

  bool paused = false;

  /// Hands the server the changes the others committed since the last call (the whole state if
  /// some were trimmed before it read them). Not while paused (the server is away).
  void pump() {
    if (paused || !on_change_) return;
    if (read_ < db_.trimmed) {
      offline::Change c;
      c.what = offline::Change::What::resync;
      c.snapshot = std::make_shared<const offline::Snapshot>(db_.snapshot(id_));
      read_ = db_.log.size();
      on_change_(c);
    }
    while (read_ < db_.log.size()) {
      SharedDb::Logged e = db_.log[read_++];
      if (e.server == id_ || !on_change_) continue;
      offline::Change c;
      c.what = e.what;
      if (e.what == offline::Change::What::mail) {
        c.to = e.name;
        c.delta = e.delta;
      } else {
        std::optional<offline::ClientRow> r = db_.row(e.name);
        if (!r) {
          c.what = offline::Change::What::released;
          c.to = e.name;
          on_change_(c);
          continue;
        }
        c.row = *r;
        c.here = db_.holder[e.name] == id_;
      }
      on_change_(c);
    }
  }

 private:
  SharedDb& db_;
  std::string id_;
  std::size_t read_ = 0;
  std::function<void(const offline::Change&)> on_change_;
};

udp::endpoint server_at(int i) { return addr(1, static_cast<std::uint16_t>(5000 + i)); }

/// `n` servers on one database; servers[i] is at server_at(i).
struct Cluster {
  explicit Cluster(int n, std::uint64_t seed = 7) : net(seed) {
    for (int i = 0; i < n; ++i) start(i);
    net.before_step = [this] {
      for (std::size_t i = 0; i < servers.size(); ++i)
        if (servers[i]) net.act(servers[i]->server.core(), [&] { views[i]->pump(); });
    };
  }
  void start(int i) {
    if (servers.size() <= static_cast<std::size_t>(i)) {
      servers.resize(static_cast<std::size_t>(i) + 1);
      views.resize(static_cast<std::size_t>(i) + 1);
    }
    auto view = std::make_unique<DbView>(db, "s" + std::to_string(i));
    views[static_cast<std::size_t>(i)] = view.get();
    servers[static_cast<std::size_t>(i)] = std::make_unique<ServerNode>(net, server_at(i), std::move(view));
  }
  /// The process is killed: no goodbye, its sessions stay in the database.
  void kill(int i) {
    servers[static_cast<std::size_t>(i)].reset();
    views[static_cast<std::size_t>(i)] = nullptr;
  }
  registry::Server& server(int i) { return servers[static_cast<std::size_t>(i)]->server; }
  /// A client of server `home` that knows every other server as a fallback.
  std::unique_ptr<Peer> peer(const std::string& name, int host, int home, std::uint8_t key_variant = 0) {
    std::vector<udp::endpoint> others;
    for (std::size_t i = 0; i < servers.size(); ++i)
      if (static_cast<int>(i) != home) others.push_back(server_at(static_cast<int>(i)));
    return std::make_unique<Peer>(net, name, addr(host, 6000), server_at(home), transport::RetryPolicy{}, 15s, 1,
                                  key_variant, ":memory:", peer::Backlog{}, others);
  }

  Net net;
  SharedDb db;
  std::vector<DbView*> views;
  std::vector<std::unique_ptr<ServerNode>> servers;
};

const std::string kWelcome = ">>> [Welcome, You are registered.]";

std::string direct(const std::string& from, const std::string& text) { return ">>> " + from + ": " + text; }
/// Saved messages are shown with their time: ">>> alice: 2026-12-02 16:29:21 text".
std::size_t saved_shown(const Peer& p, const std::string& from, const std::string& text) {
  std::size_t n = 0;
  const std::string head = ">>> " + from + ": ";
  const std::string tail = " " + text;
  for (const auto& l : p.lines)
    n += l.starts_with(head) && l.ends_with(tail) && l.size() == head.size() + 19 + tail.size() ? 1 : 0;
  return n;
}
std::string channel(const std::string& from, const std::string& text) {
  return ">>> [Channel_Message " + from + ": " + text + "]";
}

TEST_CASE("§13 alice on server 0 and bob on server 1 see each other online and chat directly") {
  Cluster c(2);
  auto alice = c.peer("alice", 10, 0);
  auto bob = c.peer("bob", 11, 1);
  REQUIRE(c.net.run_until([&] { return alice->sees_online("bob") && bob->sees_online("alice"); }, 10s));
  alice->type("send bob hello across servers");
  REQUIRE(c.net.run_until([&] { return alice->saw(">>> [Message received by bob.]"); }, 5s));
  CHECK(bob->count(direct("alice", "hello across servers")) == 1);
  CHECK(c.server(0).has_session("alice"));
  CHECK_FALSE(c.server(0).has_session("bob"));
  CHECK(c.server(1).has_session("bob"));
}

TEST_CASE("§13 send_all on one server reaches the clients of every server once") {
  Cluster c(3);
  auto alice = c.peer("alice", 10, 0);
  auto bob = c.peer("bob", 11, 1);
  auto carol = c.peer("carol", 12, 2);
  REQUIRE(c.net.run_until([&] { return alice->sees_online("bob") && alice->sees_online("carol"); }, 10s));
  alice->type("send_all hello everyone");
  REQUIRE(c.net.run_until([&] { return bob->saw(channel("alice", "hello everyone")) &&
                                       carol->saw(channel("alice", "hello everyone")); }, 10s));
  c.net.run_for(10s);
  CHECK(bob->count(channel("alice", "hello everyone")) == 1);
  CHECK(carol->count(channel("alice", "hello everyone")) == 1);
  CHECK(alice->count(channel("alice", "hello everyone")) == 0);
}

TEST_CASE("§13 a message saved by one server is delivered once when its recipient registers on another") {
  Cluster c(2);
  auto alice = c.peer("alice", 10, 0);
  auto bob = c.peer("bob", 11, 1);
  REQUIRE(c.net.run_until([&] { return alice->sees_online("bob"); }, 10s));
  bob->type("dereg bob");
  REQUIRE(c.net.run_until([&] { return !alice->sees_online("bob"); }, 10s));
  alice->type("send bob while you were away");
  REQUIRE(c.net.run_until([&] { return alice->saw(">>> [bob is offline, message sent to server.]") &&
                                       alice->saw(">>> [Messages received by the server and saved]"); }, 10s));
  bob.reset();
  auto bob_on_0 = c.peer("bob", 11, 0);
  REQUIRE(c.net.run_until([&] { return saved_shown(*bob_on_0, "alice", "while you were away") > 0; }, 10s));
  c.net.run_for(10s);
  CHECK(saved_shown(*bob_on_0, "alice", "while you were away") == 1);
  CHECK(bob_on_0->saw(">>> [You have messages]"));
  CHECK(c.db.store.count_for("bob") == 0);
  CHECK(c.server(0).has_session("bob"));
  CHECK_FALSE(c.server(1).has_session("bob"));  // the row says server 0 holds it now
}

TEST_CASE("§13 a server killed: its client moves to the next with the line, and gets what was saved meanwhile") {
  Cluster c(2);
  auto alice = c.peer("alice", 10, 0);
  auto bob = c.peer("bob", 11, 1);
  REQUIRE(c.net.run_until([&] { return alice->sees_online("bob") && bob->sees_online("alice"); }, 10s));
  c.kill(1);
  // bob is unreachable for a while too: alice's message goes to her server, which saves it
  // (the probe unanswered, bob is marked offline in the shared table).
  c.net.filter = [&](const udp::endpoint&, const udp::endpoint& to, const protocol::Message&) { return to == bob->at(); };
  alice->type("send bob saved while your server was dead");
  REQUIRE(c.net.run_until([&] { return alice->saw(">>> [Messages received by the server and saved]"); }, 20s));
  CHECK(alice->saw(">>> [No ACK from bob, message sent to server.]"));
  c.net.filter = {};
  const std::string moved = ">>> [Server 10.0.0.1:5001 not responding, now using 10.0.0.1:5000.]";
  REQUIRE(c.net.run_until([&] { return bob->saw(moved); }, 120s));
  REQUIRE(c.net.run_until([&] { return saved_shown(*bob, "alice", "saved while your server was dead") > 0; }, 20s));
  c.net.run_for(20s);
  CHECK(bob->count(moved) == 1);
  CHECK(bob->count(kWelcome) == 2);
  CHECK(bob->saw(">>> [You have messages]"));
  CHECK(saved_shown(*bob, "alice", "saved while your server was dead") == 1);
  CHECK(c.server(0).has_session("bob"));
  CHECK(c.db.store.count_for("bob") == 0);
  alice->type("send bob after the move");
  REQUIRE(c.net.run_until([&] { return bob->saw(direct("alice", "after the move")); }, 10s));
}

TEST_CASE("§13 a message saved on server 0 while bob's session is on server 1 is delivered by server 1") {
  Cluster c(2);
  auto alice = c.peer("alice", 10, 0);
  auto bob = c.peer("bob", 11, 1);
  REQUIRE(c.net.run_until([&] { return alice->sees_online("bob") && bob->sees_online("alice"); }, 10s));
  // alice cannot reach bob, nor can her server: it saves the message and marks him offline;
  // server 1, which holds his session, hears both through the database.
  c.net.filter = [&](const udp::endpoint& from, const udp::endpoint& to, const protocol::Message&) {
    return to == bob->at() && (from == alice->at() || from == server_at(0));
  };
  alice->type("send bob through the other server");
  REQUIRE(c.net.run_until([&] { return alice->saw(">>> [Messages received by the server and saved]"); }, 20s));
  REQUIRE(c.net.run_until([&] { return saved_shown(*bob, "alice", "through the other server") > 0; }, 60s));
  c.net.run_for(20s);
  CHECK(saved_shown(*bob, "alice", "through the other server") == 1);
  CHECK(c.server(1).has_session("bob"));
  CHECK_FALSE(c.server(0).has_session("bob"));
  CHECK(c.db.store.count_for("bob") == 0);
}

TEST_CASE("§13 two clients racing to bind the same new name on two servers: exactly one wins") {
  Cluster c(2);
  auto first = c.peer("dave", 10, 0, 0);
  auto second = c.peer("dave", 11, 1, 1);  // another identity
  const std::string refused = ">>> [Registration refused: the name dave belongs to another identity]";
  REQUIRE(c.net.run_until([&] { return first->exit_code >= 0 || second->exit_code >= 0; }, 10s));
  c.net.run_for(5s);
  CHECK(first->count(kWelcome) + second->count(kWelcome) == 1);
  CHECK(first->count(refused) + second->count(refused) == 1);
  auto row = c.db.row("dave");
  REQUIRE(row.has_value());
  const auto& winner = first->count(kWelcome) == 1 ? first : second;
  const protocol::Key key = identity_of("dave", first->count(kWelcome) == 1 ? 0 : 1).public_key();
  CHECK(row->key == std::string(key.begin(), key.end()));
  CHECK(winner->exit_code == -1);
}

TEST_CASE("§13 a name released while the servers run: another identity takes it on another server, without the old mail") {
  Cluster c(2);
  auto alice = c.peer("alice", 10, 0, 0);
  auto bob = c.peer("bob", 11, 1);
  REQUIRE(c.net.run_until([&] { return bob->sees_online("alice"); }, 10s));
  alice->type("dereg alice");
  REQUIRE(c.net.run_until([&] { return !bob->sees_online("alice"); }, 10s));
  alice.reset();
  bob->type("send alice for the old alice");
  REQUIRE(c.net.run_until([&] { return bob->saw(">>> [Messages received by the server and saved]"); }, 10s));
  c.db.release("alice");
  auto again = c.peer("alice", 12, 1, 1);  // another identity, on the server that knew the old binding
  REQUIRE(c.net.run_until([&] { return again->saw(kWelcome) || again->exit_code >= 0; }, 10s));
  CHECK(again->count(kWelcome) == 1);
  CHECK(again->exit_code == -1);
  auto row = c.db.row("alice");
  REQUIRE(row.has_value());
  const protocol::Key key = identity_of("alice", 1).public_key();
  CHECK(row->key == std::string(key.begin(), key.end()));
  REQUIRE(c.net.run_until([&] { return bob->sees_online("alice"); }, 10s));
  c.net.run_for(10s);
  CHECK(saved_shown(*again, "bob", "for the old alice") == 0);
  CHECK_FALSE(again->saw(">>> [You have messages]"));
}

TEST_CASE("§13 a server that missed changes trimmed from the log reads the whole state again") {
  Cluster c(2);
  auto alice = c.peer("alice", 10, 0);
  auto carol = c.peer("carol", 12, 1);
  REQUIRE(c.net.run_until([&] { return alice->sees_online("carol") && carol->sees_online("alice"); }, 10s));
  c.views[1]->paused = true;  // server 1 reads nothing of the log for a while
  auto bob = c.peer("bob", 11, 0);
  REQUIRE(c.net.run_until([&] { return alice->sees_online("bob"); }, 10s));
  // Neither alice nor her server reaches carol: the message is saved, its count never read by
  // server 1, which holds carol's session.
  c.net.filter = [&](const udp::endpoint& from, const udp::endpoint& to, const protocol::Message&) {
    return to == carol->at() && (from == alice->at() || from == server_at(0));
  };
  alice->type("send carol while your server was away");
  REQUIRE(c.net.run_until([&] { return alice->saw(">>> [Messages received by the server and saved]"); }, 20s));
  c.net.filter = {};
  c.net.run_for(5s);
  CHECK_FALSE(carol->sees_online("bob"));
  CHECK(saved_shown(*carol, "alice", "while your server was away") == 0);
  c.db.trim();
  c.views[1]->paused = false;
  REQUIRE(c.net.run_until([&] { return carol->sees_online("bob"); }, 10s));
  REQUIRE(c.net.run_until([&] { return saved_shown(*carol, "alice", "while your server was away") > 0; }, 30s));
  c.net.run_for(10s);
  CHECK(saved_shown(*carol, "alice", "while your server was away") == 1);
  CHECK(c.server(1).has_session("carol"));
  CHECK(c.db.store.count_for("carol") == 0);
}

}  // namespace

namespace {

TEST_CASE("§13 at start the first server does not answer: the client registers with its fallback, with the line") {
  Cluster c(2);
  c.kill(0);
  auto bob = c.peer("bob", 11, 0);
  const std::string moved = ">>> [Server 10.0.0.1:5000 not responding, now using 10.0.0.1:5001.]";
  REQUIRE(c.net.run_until([&] { return bob->saw(kWelcome); }, 60s));
  CHECK(bob->lines.front() == moved);
  CHECK(bob->count(moved) == 1);
  CHECK(bob->exit_code == -1);
  CHECK(c.server(1).has_session("bob"));
}

TEST_CASE("§13 at start no server answers: each is tried once, then not responding, exiting, exit code 1") {
  Cluster c(2);
  c.kill(0);
  c.kill(1);
  auto bob = c.peer("bob", 11, 0);
  REQUIRE(c.net.run_until([&] { return bob->exit_code >= 0; }, 60s));
  CHECK(bob->lines == std::vector<std::string>{">>> [Server 10.0.0.1:5000 not responding, now using 10.0.0.1:5001.]",
                                               ">>> [Server not responding]", ">>> [Exiting]"});
  CHECK(bob->exit_code == 1);
}

/// A store whose answers wait until the test releases them: a database slower than the network.
class Deferred final : public offline::AsyncStore {
 public:
  explicit Deferred(std::unique_ptr<offline::AsyncStore> inner) : inner_(std::move(inner)) {}
  offline::Snapshot load() override { return inner_->load(); }
  void save(std::vector<offline::NewMessage> batch, std::function<void(offline::Reply<std::vector<bool>>)> done) override {
    ++saves;
    held_.push_back([this, batch = std::move(batch), done = std::move(done)]() mutable {
      inner_->save(std::move(batch), std::move(done));
    });
  }
  void pending_for(const std::string& to, offline::Cursor after, std::size_t limit,
                   std::function<void(offline::Reply<std::vector<offline::StoredMessage>>)> done) override {
    held_.push_back([=, this] { inner_->pending_for(to, after, limit, done); });
  }
  void count_for(const std::string& to, std::function<void(offline::Reply<std::size_t>)> done) override {
    held_.push_back([=, this] { inner_->count_for(to, done); });
  }
  void remove_delivered(const std::string& to, std::vector<std::int64_t> seqs,
                        std::function<void(offline::Reply<bool>)> done) override {
    held_.push_back([=, this] { inner_->remove_delivered(to, seqs, done); });
  }
  void store_clients(std::vector<offline::RowWrite> rows,
                     std::function<void(offline::Reply<std::vector<bool>>)> done) override {
    held_.push_back([=, this] { inner_->store_clients(rows, done); });
  }
  /// Answers what is held, in order (and what those answers ask, too).
  void release() {
    while (!held_.empty()) {
      auto f = std::move(held_.front());
      held_.erase(held_.begin());
      f();
    }
  }
  bool holding() const { return !held_.empty(); }
  std::size_t saves = 0;

 private:
  std::unique_ptr<offline::AsyncStore> inner_;
  std::vector<std::function<void()>> held_;
};

TEST_CASE("§13 a slow store: no ACK before the commit answers, saves arriving meanwhile share the next commit") {
  Net net(3);
  auto deferred = std::make_unique<Deferred>(offline::adapt(offline::open_memory_store()));
  Deferred& store = *deferred;
  ServerNode node(net, server_at(0), std::move(deferred));
  // Registrations bind names: their rows wait for the store too.
  auto release_until = [&](const std::function<bool()>& pred) {
    return net.run_until([&] {
      if (store.holding()) net.act(node.server.core(), [&] { store.release(); });
      return pred();
    }, 10s);
  };
  Peer alice(net, "alice", addr(10, 6000), server_at(0));
  Peer bob(net, "bob", addr(11, 6000), server_at(0));
  REQUIRE(release_until([&] { return alice.sees_online("bob") && alice.reading; }));
  bob.type("dereg bob");
  REQUIRE(release_until([&] { return !alice.sees_online("bob"); }));
  const std::string saved = ">>> [Messages received by the server and saved]";
  std::size_t saves_before = store.saves;
  alice.type("send bob one");
  REQUIRE(net.run_until([&] { return store.saves == saves_before + 1; }, 5s));
  alice.type("send bob two");
  alice.type("send bob three");
  net.run_for(2s);  // the commit is held: nothing is ACKed, the others wait behind it
  CHECK(alice.count(saved) == 0);
  CHECK(store.saves == saves_before + 1);
  REQUIRE(release_until([&] { return alice.count(saved) == 3; }));
  CHECK(store.saves == saves_before + 2);  // two and three: one commit
  CHECK(node.server.server_counters().saved == 3);
}

}  // namespace

namespace {

TEST_CASE("§13 a slow store: a second registration while the first binding is unsaved waits for its own row") {
  Net net(5);
  auto deferred = std::make_unique<Deferred>(offline::adapt(offline::open_memory_store()));
  Deferred& store = *deferred;
  ServerNode node(net, server_at(0), std::move(deferred));
  Peer first(net, "alice", addr(10, 6000), server_at(0));
  REQUIRE(net.run_until([&] { return store.holding(); }, 5s));
  // The first gives up (its row is still not saved); the same identity tries from elsewhere.
  REQUIRE(net.run_until([&] { return first.exit_code >= 0; }, 20s));
  Peer second(net, "alice", addr(11, 6000), server_at(0));
  net.run_for(2s);
  CHECK(second.count(kWelcome) == 0);  // not before its binding is durable
  REQUIRE(net.run_until([&] {
    if (store.holding()) net.act(node.server.core(), [&] { store.release(); });
    return second.saw(kWelcome);
  }, 10s));
  CHECK(node.server.has_session("alice"));
}

}  // namespace
