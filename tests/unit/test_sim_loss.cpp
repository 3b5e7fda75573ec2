// The loss simulation: three clients and a server on the fake network at 20 %, 40 % and 60 %
// loss, many seeds each. Nothing the senders were told arrived may be lost, nothing is shown
// twice, no status line lies, and every client is online in every table at the end.
#include <doctest/doctest.h>

#include <cstdlib>
#include <iostream>
#include <sstream>

#include <spdlog/spdlog.h>

#include "offline/memory_store.hpp"
#include "sim.hpp"

namespace {

using namespace chat;
using namespace chat::sim;

constexpr int kDirect = 100;
constexpr int kChannel = 25;
const std::vector<std::string> kNames{"alice", "bob", "carol"};

struct Sent {
  std::string from;
  std::string to;  // empty: the channel
  std::string text;
  std::vector<std::string> status;  // the status lines it got, in order
};

struct Result {
  int lost = 0;        // told received or saved, never shown
  int duplicated = 0;  // shown more than once
  int lying = 0;       // a status line that does not match what happened (or none, or two)
  int offline = 0;     // (viewer, name) pairs not online at the end
  std::string why;
};

bool starts_with(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }
bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

// How often `p` showed `m` (live or saved).
int shown(const Peer& p, const Sent& m) {
  int n = 0;
  for (const auto& l : p.lines) {
    if (m.to.empty()) {
      if (l == ">>> [Channel_Message " + m.from + ": " + m.text + "]") ++n;
      else if (starts_with(l, ">>> Channel_Message " + m.from + ": ") && ends_with(l, " " + m.text)) ++n;
    } else {
      if (l == ">>> " + m.from + ": " + m.text) ++n;
      else if (starts_with(l, ">>> " + m.from + ": ") && ends_with(l, " " + m.text) && l.size() == 4 + m.from.size() + 2 + 19 + 1 + m.text.size()) ++n;
    }
  }
  return n;
}

// A status line that answers a request (direct, save or channel), as opposed to news.
bool is_status(const std::string& l) {
  static const std::vector<std::string> prefixes{
      ">>> [Message received by ", ">>> [Messages received by the server and saved]", ">>> [No ACK from ",
      ">>> [Client ", ">>> [Server not responding.]", ">>> [Server refused", ">>> [Error: "};
  for (const auto& p : prefixes)
    if (starts_with(l, p)) return true;
  return ends_with(l, " is offline, message sent to server.]");
}

Result run(double loss, std::uint64_t seed, bool verbose) {
  Result r;
  Net net(seed);
  registry::ServerOptions so;
  so.seed = seed * 7 + 3;
  ServerNode server(net, addr(1, 5000), offline::open_memory_store(), so);
  std::vector<std::unique_ptr<Peer>> peers;
  for (std::size_t i = 0; i < kNames.size(); ++i)
    peers.push_back(std::make_unique<Peer>(net, kNames[i], addr(static_cast<int>(i) + 2, 6000), addr(1, 5000),
                                           transport::RetryPolicy{}, 15s, seed * 11 + i + 1));
  auto all_online = [&] {
    for (const auto& p : peers)
      for (const auto& n : kNames)
        if (!p->sees_online(n)) return false;
    return true;
  };
  if (!net.run_until(all_online, 60s)) {
    r.why = "never all registered before the loss started";
    ++r.offline;
    return r;
  }
  net.loss = loss;

  // The plan: each message from a random sender, sent when that sender's previous one is done.
  std::mt19937_64 rng(seed ^ 0x5EED);
  std::vector<Sent> plan;
  for (int i = 0; i < kDirect + kChannel; ++i) {
    std::size_t from = rng() % kNames.size();
    std::size_t to = (from + 1 + rng() % (kNames.size() - 1)) % kNames.size();
    bool channel = i % 5 == 4;  // 25 of 125
    plan.push_back({kNames[from], channel ? "" : kNames[to], "<m" + std::to_string(i) + ">", {}});
  }
  std::map<std::string, std::deque<std::size_t>> queue;
  for (std::size_t i = 0; i < plan.size(); ++i) queue[plan[i].from].push_back(i);
  std::map<std::string, std::optional<std::pair<std::size_t, std::size_t>>> current;  // message, first line
  auto peer_of = [&](const std::string& n) -> Peer& {
    for (std::size_t i = 0; i < kNames.size(); ++i)
      if (kNames[i] == n) return *peers[i];
    throw std::logic_error("no peer " + n);
  };
  auto collect = [&](const std::string& n) {
    Peer& p = peer_of(n);
    auto& cur = current[n];
    if (!cur || p.client.busy() != 0) return;
    for (std::size_t l = cur->second; l < p.lines.size(); ++l)
      if (is_status(p.lines[l])) plan[cur->first].status.push_back(p.lines[l]);
    cur.reset();
  };
  auto pump = [&] {
    for (const auto& n : kNames) {
      collect(n);
      Peer& p = peer_of(n);
      if (current[n] || queue[n].empty() || p.exit_code != -1) continue;
      std::size_t i = queue[n].front();
      queue[n].pop_front();
      current[n] = std::pair{i, p.lines.size()};
      const Sent& m = plan[i];
      p.type(m.to.empty() ? "send_all " + m.text : "send " + m.to + " " + m.text);
      collect(n);
    }
  };
  auto all_sent = [&] {
    for (const auto& n : kNames)
      if (current[n] || !queue[n].empty()) return false;
    return true;
  };
  const Time give_up = net.clock.now() + 4h;
  while (!all_sent() && net.clock.now() < give_up) {
    pump();
    if (!net.step()) break;
  }
  pump();
  // The loss ends; keep-alives bring every table back within a few intervals.
  net.loss = 0;
  net.run_for(4 * 15s);

  std::ostringstream why;
  for (const auto& m : plan) {
    std::vector<std::size_t> viewers;
    for (std::size_t v = 0; v < kNames.size(); ++v)
      if (m.to.empty() ? kNames[v] != m.from : kNames[v] == m.to) viewers.push_back(v);
    std::string final = m.status.empty() ? "" : m.status.back();
    bool delivered_claim = m.to.empty() ? starts_with(final, ">>> [Message received by Server")
                                        : final == ">>> [Message received by " + m.to + ".]" ||
                                              final == ">>> [Messages received by the server and saved]";
    bool uncertain = final == ">>> [Server not responding.]";
    if (!delivered_claim && !uncertain) {
      ++r.lying;
      why << m.from << " -> " << (m.to.empty() ? "channel" : m.to) << " " << m.text << ": final status '" << final
          << "'\n";
    }
    for (auto v : viewers) {
      int n = shown(*peers[v], m);
      if (n > 1) {
        ++r.duplicated;
        why << kNames[v] << " showed " << m.text << " " << n << " times\n";
      }
      if (n == 0 && delivered_claim) {
        ++r.lost;
        why << kNames[v] << " never showed " << m.text << " from " << m.from << " (status: " << final << ")\n";
      }
    }
  }
  for (std::size_t v = 0; v < kNames.size(); ++v) {
    if (peers[v]->exit_code != -1) why << kNames[v] << " exited with " << peers[v]->exit_code << "\n";
    for (const auto& n : kNames)
      if (!peers[v]->sees_online(n)) {
        ++r.offline;
        why << kNames[v] << " does not see " << n << " online at the end\n";
      }
  }
  r.why = why.str();
  if (verbose || !r.why.empty())
    for (std::size_t v = 0; v < kNames.size(); ++v) {
      std::cerr << "--- " << kNames[v] << "\n";
      for (const auto& l : peers[v]->lines) std::cerr << "  " << l << "\n";
    }
  return r;
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::atoi(v) : fallback;
}

}  // namespace

TEST_CASE("loss simulation: nothing lost, nothing shown twice, no lying status, every client online at the end") {
  spdlog::set_level(spdlog::level::off);
  // CHATAPP_SIM_SEED replays one seed (printed when one fails) with every client's output.
  const int only = env_int("CHATAPP_SIM_SEED", -1);
  const int seeds = env_int("CHATAPP_SIM_SEEDS", 500);
  for (double loss : {0.2, 0.4, 0.6}) {
    Result total;
    int runs = 0;
    for (int s = only >= 0 ? only : 1; s <= (only >= 0 ? only : seeds); ++s) {
      Result r = run(loss, static_cast<std::uint64_t>(s), only >= 0);
      ++runs;
      total.lost += r.lost;
      total.duplicated += r.duplicated;
      total.lying += r.lying;
      total.offline += r.offline;
      if (!r.why.empty()) {
        FAIL_CHECK("loss " << loss << " seed " << s << " (replay: CHATAPP_SIM_SEED=" << s << "):\n" << r.why);
        break;
      }
    }
    std::cout << "loss simulation: " << static_cast<int>(loss * 100) << " % loss, " << runs << " seeds: lost "
              << total.lost << ", duplicated " << total.duplicated << ", lying " << total.lying
              << ", not online at the end " << total.offline << "\n";
  }
}
