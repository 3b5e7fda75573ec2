// A fake network and a fake clock for the cores: datagrams between cores are queued with a
// delay, lost or reordered by a seeded random generator, and time moves only from one event
// to the next. No socket, no thread, no sleep: a run is the same every time for one seed.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <queue>
#include <random>
#include <string>
#include <vector>

#include "identity/identity.hpp"
#include "identity/peer_state.hpp"
#include "peer/client.hpp"
#include "protocol/codec.hpp"
#include "registry/server.hpp"
#include "transport/clock.hpp"
#include "transport/core.hpp"

namespace chat::sim {

using transport::Duration;
using transport::Time;
using namespace std::chrono_literals;

/// An address in the simulation (no packet ever leaves the process).
inline udp::endpoint addr(int host, std::uint16_t port) {
  return udp::endpoint(net::ip::address_v4(0x0A000000u + static_cast<std::uint32_t>(host)), port);
}

/// The network: every attached core, the datagrams in flight, the clock.
class Net {
 public:
  /// Decides the fate of one datagram: true drops it. Consulted before the random loss.
  using Filter = std::function<bool(const udp::endpoint& from, const udp::endpoint& to, const protocol::Message& m)>;

  explicit Net(std::uint64_t seed) : rng_(seed) {}

  transport::ManualClock clock;
  /// Probability that any one datagram is lost.
  double loss = 0;
  /// One-way delay, uniform in [min_delay, max_delay]: datagrams sent together may be reordered.
  Duration min_delay = 100us;
  Duration max_delay = 2ms;
  /// Drops chosen datagrams (a link down, a firewall rule); empty: none.
  Filter filter;
  /// Runs before each event (a shared database handing servers each other's changes); empty: nothing.
  std::function<void()> before_step;

  std::uint64_t delivered = 0;
  std::uint64_t dropped = 0;

  /// Puts `core` on the network at `at`: what it sends is carried, what is sent to `at` reaches it.
  void attach(transport::Core& core, const udp::endpoint& at) {
    nodes_[at] = &core;
    core.set_output([this, at](const std::string& bytes, const udp::endpoint& to) {
      send(at, to, bytes);
      return true;
    });
  }
  /// Takes the core at `at` off the network (the process died): datagrams to it vanish.
  void detach(const udp::endpoint& at) {
    auto it = nodes_.find(at);
    if (it == nodes_.end()) return;
    it->second->set_output({});
    nodes_.erase(it);
  }
  /// A datagram from `from` (anyone, even an address with no core) to `to`.
  void send(const udp::endpoint& from, const udp::endpoint& to, const std::string& bytes) {
    if (filter) {
      protocol::Decoded d = protocol::decode(bytes);
      if (d && filter(from, to, *d.message)) {
        ++dropped;
        return;
      }
    }
    if (loss > 0 && std::uniform_real_distribution<double>(0, 1)(rng_) < loss) {
      ++dropped;
      return;
    }
    auto span = (max_delay - min_delay).count();
    Duration delay = min_delay + Duration(span > 0 ? static_cast<Duration::rep>(rng_() % static_cast<std::uint64_t>(span)) : 0);
    queue_.push(InFlight{clock.now() + delay, ++seq_, from, to, bytes});
  }
  /// Runs `f` (a user's action on a core) as one turn of that core.
  template <class F>
  void act(transport::Core& core, F&& f) {
    f();
    core.settle();
  }
  /// Handles the next event (a datagram arriving or a timer); false if nothing is left to happen.
  bool step() {
    if (before_step) before_step();
    std::optional<Time> next;
    if (!queue_.empty()) next = queue_.top().at;
    for (auto& [at, core] : nodes_) {
      auto d = core->next_deadline();
      if (d && (!next || *d < *next)) next = d;
    }
    if (!next) return false;
    clock.set(*next);
    if (!queue_.empty() && queue_.top().at <= clock.now()) {
      InFlight f = queue_.top();
      queue_.pop();
      auto it = nodes_.find(f.to);
      if (it == nodes_.end()) return true;  // nobody there
      ++delivered;
      it->second->on_datagram(f.bytes, f.from);
      it->second->settle();
      return true;
    }
    // Copy: a timer may attach or detach cores.
    std::vector<transport::Core*> due;
    for (auto& [at, core] : nodes_) {
      auto d = core->next_deadline();
      if (d && *d <= clock.now()) due.push_back(core);
    }
    for (auto* core : due) {
      core->on_timer();
      core->settle();
    }
    return true;
  }
  /// Runs until `pred()` holds or `limit` of simulated time passed; returns pred().
  bool run_until(const std::function<bool()>& pred, Duration limit) {
    Time end = clock.now() + limit;
    while (!pred()) {
      if (!peek_before(end)) {
        clock.set(end);
        return pred();
      }
      step();
    }
    return true;
  }
  /// Runs every event in the next `d` of simulated time.
  void run_for(Duration d) {
    Time end = clock.now() + d;
    while (peek_before(end)) step();
    clock.set(end);
  }

 private:
  struct InFlight {
    Time at;
    std::uint64_t seq;
    udp::endpoint from, to;
    std::string bytes;
    bool operator>(const InFlight& o) const { return at != o.at ? at > o.at : seq > o.seq; }
  };
  bool peek_before(Time end) const {
    if (!queue_.empty() && queue_.top().at <= end) return true;
    for (const auto& [at, core] : nodes_) {
      auto d = core->next_deadline();
      if (d && *d <= end) return true;
    }
    return false;
  }

  std::mt19937_64 rng_;
  std::map<udp::endpoint, transport::Core*> nodes_;
  std::priority_queue<InFlight, std::vector<InFlight>, std::greater<>> queue_;
  std::uint64_t seq_ = 0;
};

/// The identity a simulated client of `name` has (the same every run; `variant` gives another
/// key for the same name, an impostor's).
inline identity::Identity identity_of(const std::string& name, std::uint8_t variant = 0) {
  std::array<std::uint8_t, 32> seed{};
  for (std::size_t i = 0; i < name.size() && i < seed.size() - 1; ++i) seed[i] = static_cast<std::uint8_t>(name[i]);
  seed.back() = variant;
  return identity::Identity::from_seed(seed);
}

/// A client core on the network, with what it printed and whether it ended. Its pins, blocks
/// and replay memory live in `state` (":memory:": gone with the Peer).
struct Peer {
  Peer(Net& net, const std::string& name, const udp::endpoint& at, const udp::endpoint& server,
       transport::RetryPolicy policy = {}, std::chrono::milliseconds keepalive = 15s, std::uint64_t seed = 1,
       std::uint8_t key_variant = 0, const std::string& state = ":memory:", peer::Backlog backlog = {},
       std::vector<udp::endpoint> fallbacks = {}, peer::FileOptions files = {})
      : net_(net),
        at_(at),
        client(peer::ClientOptions{name, server, std::move(fallbacks), policy, keepalive, seed, backlog, std::move(files)},
               net.clock,
               peer::ClientIo{[this](const std::string& l) { lines.push_back(l); }, [this] { reading = true; },
                              [this](int code) { exit_code = code; }, nullptr},
               identity_of(name, key_variant), std::make_unique<identity::PeerState>(state)) {
    net.attach(client.core(), at);
    net.act(client.core(), [&] { client.start(); });
  }
  ~Peer() { net_.detach(at_); }
  Peer(const Peer&) = delete;
  Peer& operator=(const Peer&) = delete;

  /// Types one line.
  void type(const std::string& line) {
    net_.act(client.core(), [&] { client.on_line(line); });
  }
  /// Closes the input.
  void end_input() {
    net_.act(client.core(), [&] { client.on_end_of_input(); });
  }
  /// How many printed lines are exactly `line`.
  std::size_t count(const std::string& line) const {
    std::size_t n = 0;
    for (const auto& l : lines) n += l == line ? 1 : 0;
    return n;
  }
  bool saw(const std::string& line) const { return count(line) > 0; }
  /// True if this client's table has `name` online.
  bool sees_online(const std::string& name) const {
    const protocol::Entry* e = client.table().find(name);
    return e != nullptr && e->online;
  }
  const udp::endpoint& at() const { return at_; }

 private:
  Net& net_;
  udp::endpoint at_;

 public:
  peer::Client client;
  std::vector<std::string> lines;
  bool reading = false;
  int exit_code = -1;  // -1: still running
};

}  // namespace chat::sim

namespace chat::sim {

/// A store that forwards to one that outlives it: a server "restarted with its data" gets a
/// new Server over the same store.
class SharedStore final : public offline::Store {
 public:
  explicit SharedStore(offline::Store& inner) : inner_(inner) {}
  std::vector<bool> save(std::span<const offline::NewMessage> batch) override { return inner_.save(batch); }
  std::vector<offline::StoredMessage> pending_for(const std::string& to, offline::Cursor after,
                                                  std::size_t limit) override {
    return inner_.pending_for(to, after, limit);
  }
  std::size_t count_for(const std::string& to) override { return inner_.count_for(to); }
  void remove_delivered(const std::string& to, std::span<const std::int64_t> seqs) override {
    inner_.remove_delivered(to, seqs);
  }
  void store_clients(std::span<const offline::ClientRow> rows) override { inner_.store_clients(rows); }
  std::vector<offline::ClientRow> load_clients() override { return inner_.load_clients(); }
  offline::Released release(const std::string& name) override { return inner_.release(name); }
  std::size_t legacy_count() override { return inner_.legacy_count(); }
  bool put_file(const offline::NewFile& f) override { return inner_.put_file(f); }
  std::vector<offline::HeldFile> files_for(const std::string& to) override { return inner_.files_for(to); }
  std::optional<std::string> file_data(const std::string& to, std::uint64_t transfer) override {
    return inner_.file_data(to, transfer);
  }
  bool delete_file(const std::string& to, std::uint64_t transfer) override { return inner_.delete_file(to, transfer); }
  std::uint64_t file_bytes_for(const std::string& to) override { return inner_.file_bytes_for(to); }
  std::size_t expire_files(std::int64_t before_us) override { return inner_.expire_files(before_us); }

 private:
  offline::Store& inner_;
};

/// A server core on the network.
struct ServerNode {
  ServerNode(Net& net, const udp::endpoint& at, std::unique_ptr<offline::Store> store,
             registry::ServerOptions options = {})
      : ServerNode(net, at, offline::adapt(std::move(store)), options) {}
  ServerNode(Net& net, const udp::endpoint& at, std::unique_ptr<offline::AsyncStore> store,
             registry::ServerOptions options = {})
      : net_(net), at_(at), server(options, std::move(store), net.clock) {
    net.attach(server.core(), at);
    net.act(server.core(), [&] { server.start(); });
  }
  ~ServerNode() { net_.detach(at_); }
  ServerNode(const ServerNode&) = delete;
  ServerNode& operator=(const ServerNode&) = delete;

 private:
  Net& net_;
  udp::endpoint at_;

 public:
  registry::Server server;
};

}  // namespace chat::sim
