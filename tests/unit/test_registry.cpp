// The registry: table versions and "changed since" walks, admission, and convergence at scale.
#include <doctest/doctest.h>
#include <sys/resource.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <memory>
#include <set>

#include "identity/envelope.hpp"
#include "identity/identity.hpp"
#include "offline/store.hpp"
#include "peer/local_table.hpp"
#include "registry/server.hpp"
#include "registry/table.hpp"
#include "transport/endpoint.hpp"
#include <spdlog/spdlog.h>

using chat::registry::Admit;
using chat::registry::Table;
namespace proto = chat::protocol;

namespace {

std::set<std::string> names_of(const chat::registry::Chunk& c) {
  std::set<std::string> s;
  for (const auto& e : c.entries) s.insert(e.name);
  return s;
}

}  // namespace

TEST_CASE("every change bumps the version once, no-op updates do not") {
  Table t(7);
  CHECK(t.version() == 0);
  CHECK(t.upsert("a", "127.0.0.1", 5000, true, proto::Key{}));
  CHECK(t.version() == 1);
  CHECK_FALSE(t.upsert("a", "127.0.0.1", 5000, true, proto::Key{}));
  CHECK(t.version() == 1);
  CHECK(t.set_online("a", false));
  CHECK(t.version() == 2);
  CHECK_FALSE(t.set_online("a", false));
  CHECK_FALSE(t.set_online("nobody", true));
  CHECK(t.version() == 2);
  CHECK(t.online_count() == 0);
  CHECK(t.find("a")->ver == 2);
}

TEST_CASE("registration admission") {
  Table t(1);
  CHECK(t.admit("new", "127.0.0.1", 4000) == Admit::accept);
  t.upsert("a", "127.0.0.1", 4000, true, proto::Key{});
  SUBCASE("same name, same address: accepted (a restart on the same port)") {
    CHECK(t.admit("a", "127.0.0.1", 4000) == Admit::accept);
  }
  SUBCASE("same name, other address, while online: a conflict") {
    CHECK(t.admit("a", "127.0.0.1", 4001) == Admit::conflict);
    CHECK(t.admit("a", "127.0.0.2", 4000) == Admit::conflict);
  }
  SUBCASE("an offline name may come back from a new address") {
    t.set_online("a", false);
    CHECK(t.admit("a", "10.0.0.9", 6000) == Admit::accept);
  }
}

TEST_CASE("changes_since gives exactly what a client lacks") {
  Table t(1);
  for (int i = 0; i < 5; ++i) t.upsert(std::string("c").append(std::to_string(i)), "127.0.0.1", 5000 + i, true, proto::Key{});  // v1..v5
  SUBCASE("a snapshot is changes since 0") {
    auto c = t.changes_since(0, 100000);
    CHECK(c.from == 0);
    CHECK(c.to == 5);
    CHECK_FALSE(c.more);
    CHECK(c.entries.size() == 5);
  }
  SUBCASE("a client at version 3 gets c3 and c4 only") {
    auto c = t.changes_since(3, 100000);
    CHECK(names_of(c) == std::set<std::string>{"c3", "c4"});
    CHECK(c.to == 5);
  }
  SUBCASE("a row changed twice is sent once, in its latest state") {
    t.set_online("c1", false);  // v6
    t.set_online("c1", true);   // v7
    auto c = t.changes_since(3, 100000);
    CHECK(names_of(c) == std::set<std::string>{"c1", "c3", "c4"});
    CHECK(c.to == 7);
    CHECK(c.entries.back().name == "c1");
    CHECK(c.entries.back().online);
  }
  SUBCASE("an up-to-date client gets nothing") {
    auto c = t.changes_since(5, 100000);
    CHECK(c.entries.empty());
    CHECK(c.to == 5);
  }
  SUBCASE("a small budget splits into chunks that chain to the end") {
    std::uint64_t have = 0;
    std::set<std::string> got;
    int chunks = 0;
    while (have < t.version()) {
      auto c = t.changes_since(have, 60);
      CHECK(c.from == have);
      CHECK(c.to > have);
      for (auto& e : c.entries) got.insert(e.name);
      have = c.to;
      ++chunks;
      CHECK(c.more == (have < t.version()));
    }
    CHECK(chunks > 1);
    CHECK(got.size() == 5);
  }
}

TEST_CASE("the client applies chunks in order, skips gaps, and takes a new epoch from 0") {
  Table t(42);
  for (int i = 0; i < 4; ++i) t.upsert(std::string("c").append(std::to_string(i)), "127.0.0.1", 5000 + i, true, proto::Key{});
  chat::peer::LocalTable local;
  auto as_msg = [&](const chat::registry::Chunk& c, std::uint64_t epoch) {
    return proto::Table{1, "me", epoch, c.from, c.to, c.more, c.entries};
  };
  auto first = t.changes_since(0, 60);
  auto a = local.apply(as_msg(first, 42));
  CHECK(a.changed);
  CHECK(a.have == first.to);
  CHECK_FALSE(a.announce);  // more to come
  // A chunk from beyond what we hold (a gap) is not applied; we ask from where we are.
  auto later = t.changes_since(first.to + 1, 100000);
  auto gap = local.apply(as_msg(later, 42));
  CHECK_FALSE(gap.changed);
  CHECK(gap.have == first.to);
  auto rest = t.changes_since(first.to, 100000);
  auto b = local.apply(as_msg(rest, 42));
  CHECK(b.changed);
  CHECK(b.announce);
  CHECK(local.rows().size() == 4);
  // A repeat changes nothing.
  CHECK_FALSE(local.apply(as_msg(rest, 42)).changed);
  // A restarted server (new epoch) must start from 0.
  Table t2(43);
  t2.upsert("z", "127.0.0.1", 6000, true, proto::Key{});
  t2.upsert("y", "127.0.0.1", 6001, true, proto::Key{});
  auto mid = local.apply(proto::Table{2, "me", 43, 1, 2, false, {}});
  CHECK_FALSE(mid.changed);
  CHECK(mid.have == 0);
  auto snap = local.apply(as_msg(t2.changes_since(0, 100000), 43));
  CHECK(snap.changed);
  CHECK(local.rows().size() == 2);
  CHECK(local.epoch() == 43);
}

// ---------------------------------------------------------------- scale, with real sockets

namespace {

using namespace std::chrono_literals;

// The recipient a server request names, or nullptr for a message that names none.
const std::string* recipient_of(const proto::Message& m) {
  return std::visit(
      [](const auto& x) -> const std::string* {
        if constexpr (requires { x.recipient; }) return &x.recipient;
        else return nullptr;
      },
      m);
}

// One simulated peer: a real UDP endpoint that registers, applies and ACKs table updates.
// Like a real client it answers only the server requests that name it.
struct SimPeer {
  SimPeer(chat::net::io_context& io, std::string n, chat::udp::endpoint server)
      : name(std::move(n)), ep(io, chat::udp::endpoint(chat::net::ip::make_address_v4("127.0.0.1"), 0), {1000ms, 8}) {
    ep.start([this](const proto::Message& m, const chat::udp::endpoint& from) {
      if (const std::string* to = recipient_of(m); to != nullptr && *to != name) {
        ++not_for_me;
        return ep.forget(from, proto::request_id(m));
      }
      if (auto* t = std::get_if<proto::Table>(&m)) {
        auto a = table.apply(*t);
        ep.reply(from, proto::Ack{t->id, a.epoch, a.have});
      } else {
        ep.reply(from, proto::Ack{proto::request_id(m)});
      }
    });
    // Register, then answer the challenge with the key's proof, as a real client does.
    ep.request(proto::Register{ep.next_id(), name, me.public_key(), 0, {}, {}}, server,
               [this, server](const proto::Message* r) {
                 const auto* ch = r != nullptr ? std::get_if<proto::Challenge>(r) : nullptr;
                 if (ch == nullptr) return;
                 proto::Register proof{ep.next_id(), name, me.public_key(), 0, ch->token,
                                       chat::identity::register_proof(me, name, ch->token)};
                 ep.request(proof, server, [this](const proto::Message* ok) {
                   registered = ok != nullptr && std::holds_alternative<proto::RegOk>(*ok);
                 });
               });
  }
  std::string name;
  chat::identity::Identity me = chat::identity::Identity::generate();
  chat::transport::Socket ep;
  chat::peer::LocalTable table;
  bool registered = false;
  std::size_t not_for_me = 0;  // server requests that named another peer
};

struct Scale {
  std::uint64_t bytes_for_one = 0;
  double converge_s = 0;
};

bool converged(const std::vector<std::unique_ptr<SimPeer>>& peers, const Table& t) {
  for (const auto& p : peers)
    if (!p->registered || p->table.version() != t.version() || p->table.epoch() != t.epoch()) return false;
  return true;
}

Scale run_scale(int n) {
  spdlog::set_level(spdlog::level::warn);
  auto dir = std::filesystem::temp_directory_path() / ("chatapp-scale-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  Scale out;
  {
    chat::net::io_context io(1);
    chat::registry::ServerOptions o;
    o.policy = {1000ms, 8};  // generous: a loaded machine must not cause retransmissions that blur the byte count
    chat::registry::Server server(o, chat::offline::open_sqlite_store(dir.string()), chat::transport::system_clock());
    chat::transport::Endpoint endpoint(io, server.core(), chat::udp::endpoint(chat::net::ip::make_address_v4("127.0.0.1"), 0));
    endpoint.turn([&] { server.start(); });
    endpoint.start();
    auto to = endpoint.local_endpoint();
    std::vector<std::unique_ptr<SimPeer>> peers;
    auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < n; ++i) peers.push_back(std::make_unique<SimPeer>(io, std::string("p").append(std::to_string(i)), to));
    auto deadline = start + 120s;
    while (!converged(peers, server.table()) && std::chrono::steady_clock::now() < deadline) io.run_for(20ms);
    REQUIRE_MESSAGE(converged(peers, server.table()), n << " peers did not converge");
    out.converge_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    for (const auto& p : peers) {
      REQUIRE(p->table.rows().size() == static_cast<std::size_t>(n));
      for (const auto& [name, e] : p->table.rows()) REQUIRE(e.online);
    }
    // One later registration: what does it cost the server?
    // First transmissions only: what a loaded machine adds in retransmissions is not the design's cost.
    auto first_bytes = [&] { return server.counters().bytes_sent - server.counters().bytes_resent; };
    std::uint64_t before = first_bytes();
    std::uint64_t sent_before = server.counters().sent, rl_before = server.counters().rate_limited, amp_before = server.counters().amplification;
    peers.push_back(std::make_unique<SimPeer>(io, "late", to));
    deadline = std::chrono::steady_clock::now() + 60s;
    while (!converged(peers, server.table()) && std::chrono::steady_clock::now() < deadline) io.run_for(20ms);
    REQUIRE(converged(peers, server.table()));
    for (const auto& p : peers) CHECK(p->not_for_me == 0);
    out.bytes_for_one = first_bytes() - before;
    std::cout << "scale: " << n << " peers, one more registration: " << server.counters().sent - sent_before
              << " datagrams (rate-limited " << server.counters().rate_limited - rl_before << ", not sent unproven "
              << server.counters().amplification - amp_before << ")\n";
    server.stop();
  }
  std::filesystem::remove_all(dir);
  return out;
}

void raise_fd_limit(rlim_t want) {
  rlimit rl{};
  getrlimit(RLIMIT_NOFILE, &rl);
  if (rl.rlim_cur < want) {
    rl.rlim_cur = std::min(want, rl.rlim_max);
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

}  // namespace

TEST_CASE("2,000 peers converge to the full table, one more registration costs O(N) bytes") {
  raise_fd_limit(4096);
  Scale small = run_scale(100);
  Scale big = run_scale(2000);
  std::cout << "scale: 100 peers converged in " << small.converge_s << " s; one more registration: "
            << small.bytes_for_one << " bytes\n"
            << "scale: 2000 peers converged in " << big.converge_s << " s; one more registration: "
            << big.bytes_for_one << " bytes\n";
  // Linear growth is x20 from 100 to 2000 peers; the square would be x400.
  CHECK(big.bytes_for_one > small.bytes_for_one);
  CHECK(big.bytes_for_one < small.bytes_for_one * 40);
}
