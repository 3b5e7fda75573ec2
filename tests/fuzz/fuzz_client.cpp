// Fuzz target: the peer client fed datagrams from its server and from peers, and typed lines.
//
// Per input: a fresh Client core "me" with the cast's identity of "me" (harness.hpp) and a
// PeerState(":memory:"), on a fake clock; its server is fake source 0 (127.0.0.1:4000), and its
// core sends only to the fake network. The cast's table op gives it rows with the cast's keys,
// so the sealed, channel, stored and receipt ops reach its checks with bodies that open.
// The input's first byte is flags: bit 0 set = leave the Register unanswered (the client
// stays registering); else the harness answers it as a v2 server does, with a Challenge and,
// once the client signed it, RegOk{epoch 7, pending = bit 1} (bit 2: RegOk at once, no
// challenge). Then ops as in harness.hpp; the `extra` op types a line ([b][len][len bytes])
// once the client reads commands, or with source 7 ends the input (the client finishes what is
// in flight, then exits). What it prints goes nowhere (stderr when FUZZ_TRACE is set).
//
// Checked beyond "no crash" (and what harness.hpp checks of every datagram sent): for every
// message the harness sealed or signed, a line showing it is printed only if the design lets
// it through: not altered, sealed for "me" with the mid of its datagram, sealed (or signed) by
// the key pinned for the name it claims (the key a box between "me" and that key needs), sent
// within the replay window; and no (sender key, kind, mid) is shown twice. A "[Message received
// by X.]" after a receipt the harness sealed needs the same of the receipt, with X's key. A
// relay, probe, table or stored naming another recipient than "me" is never acknowledged (the
// first time its (source, id) is seen: a repeat of an id answered before is answered again).
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "harness.hpp"
#include "identity/peer_state.hpp"
#include "peer/client.hpp"
#include "peer/local_table.hpp"

namespace {

using namespace chat;
using fuzz::Expect;

[[noreturn]] void fail(const std::string& what) { fuzz::fail("fuzz_client", what); }

/// A peer's text as the client shows it (control characters but tab in caret notation).
std::string shown_text(const std::string& text) {
  std::string out;
  for (char ch : text) {
    auto c = static_cast<unsigned char>(ch);
    if ((c < 0x20 && c != '\t') || c == 0x7F) {
      out += '^';
      out += static_cast<char>(c ^ 0x40);
    } else {
      out += ch;
    }
  }
  return out;
}

/// The line the client prints when it shows `e`.
std::string line_of(const Expect& e) {
  const std::string text = shown_text(e.text);
  if (e.kind == Expect::Kind::direct) {
    if (e.stored) return ">>> " + e.from + ": " + peer::format_timestamp(e.ts_us) + " " + text;
    return ">>> " + e.from + ": " + text;
  }
  if (e.stored) return ">>> Channel_Message " + e.from + ": " + peer::format_timestamp(e.ts_us) + " " + text;
  return ">>> [Channel_Message " + e.from + ": " + text + "]";
}

/// The checks of what the client prints for what the harness sealed.
class Oracle {
 public:
  Oracle(const identity::PeerState& pins, const transport::ManualClock& clock)
      : pins_(pins), clock_(clock), me_(fuzz::Cast::get().key(0)) {}

  /// `lines` were printed while the core handled `expect`'s datagram.
  void check(const std::vector<Expect>& expect, const std::vector<std::string>& lines, std::size_t from) {
    std::vector<bool> used(expect.size(), false);
    for (std::size_t l = from; l < lines.size(); ++l) {
      const std::string& line = lines[l];
      int good = -1;
      int again = -1;
      int bad = -1;
      for (std::size_t k = 0; k < expect.size() && good < 0; ++k) {
        if (used[k]) continue;
        const Expect& e = expect[k];
        if (e.kind == Expect::Kind::receipt) {
          static const std::string head = ">>> [Message received by ";
          if (line.rfind(head, 0) != 0 || line.size() < head.size() + 2) continue;
          std::string to = line.substr(head.size(), line.size() - head.size() - 2);
          if (receipt_ok(e, to)) good = static_cast<int>(k);
          else if (bad < 0) bad = static_cast<int>(k);
          continue;
        }
        if (line != line_of(e)) continue;
        if (!may_show(e)) {
          if (bad < 0) bad = static_cast<int>(k);
        } else if (shown_.contains(seen_key(e))) {
          if (again < 0) again = static_cast<int>(k);
        } else {
          good = static_cast<int>(k);
        }
      }
      if (good >= 0) {
        used[static_cast<std::size_t>(good)] = true;
        const Expect& e = expect[static_cast<std::size_t>(good)];
        if (e.kind != Expect::Kind::receipt) shown_.insert(seen_key(e));
        continue;
      }
      if (again >= 0) fail("showed a message twice (replay): " + describe(expect[static_cast<std::size_t>(again)]) +
                           " as \"" + line + "\"");
      if (bad >= 0) fail("showed what does not authenticate: " + describe(expect[static_cast<std::size_t>(bad)]) +
                         " as \"" + line + "\"");
    }
  }

 private:
  using SeenKey = std::tuple<protocol::Key, bool, std::uint64_t>;  // sender key, channel, mid

  static SeenKey seen_key(const Expect& e) { return {e.sealer, e.kind == Expect::Kind::channel, e.mid}; }

  /// The key the client opens `name`'s messages with, at most: its own, or the one pinned.
  protocol::Key key_for(const std::string& name) const {
    if (name == fuzz::Cast::get().name(0)) return me_;
    return pins_.pinned(name).value_or(protocol::Key{});
  }

  /// Whether a box sealed by `a` for `b` opens with the pair of me and `name`'s key.
  bool box_of(const protocol::Key& a, const protocol::Key& b, const std::string& name) const {
    const protocol::Key k = key_for(name);
    if (k == protocol::Key{}) return false;
    return (a == me_ && b == k) || (a == k && b == me_);
  }

  bool in_window(std::uint64_t sent_ms) const {
    const auto now = static_cast<std::uint64_t>(clock_.wall_us() / 1000);
    return sent_ms + identity::kMaxMessageAgeMs >= now && sent_ms <= now + identity::kMaxClockAheadMs;
  }

  bool may_show(const Expect& e) const {
    if (e.flipped || e.sealed_mid != e.mid || !in_window(e.sent_ms)) return false;
    if (e.kind == Expect::Kind::direct) return e.to == fuzz::Cast::get().name(0) && box_of(e.sealer, e.peer, e.from);
    return e.to == e.from && e.sealer == key_for(e.from);
  }

  bool receipt_ok(const Expect& e, const std::string& to) const {
    return e.answers_direct && !e.flipped && e.sealed_mid == e.mid && e.to == fuzz::Cast::get().name(0) &&
           box_of(e.sealer, e.peer, to);
  }

  static std::string describe(const Expect& e) {
    std::string what = e.kind == Expect::Kind::direct ? "direct" : e.kind == Expect::Kind::channel ? "channel" : "receipt";
    return std::string(e.stored ? "saved " : "") + what + " from " + e.from + " mid " + std::to_string(e.mid) +
           " (sealed for mid " + std::to_string(e.sealed_mid) + ", name " + e.to +
           (e.flipped ? ", a byte flipped" : "") + ", sent_ms " + std::to_string(e.sent_ms) + ")";
  }

  const identity::PeerState& pins_;
  const transport::ManualClock& clock_;
  protocol::Key me_;
  std::set<SeenKey> shown_;
};

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  chat::fuzz::quiet_logs();
  chat::fuzz::use_fixed_randomness();
  chat::fuzz::Cast::get();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fuzz::reset_randomness();
  transport::ManualClock clock;
  bool reading = false;
  bool exited = false;
  std::vector<std::string> printed;
  peer::ClientIo io{[&](const std::string& line) {
                      if (fuzz::tracing()) std::fprintf(stderr, "  shown: %s\n", line.c_str());
                      printed.push_back(line);
                    },
                    [&] { reading = true; }, [&](int) { exited = true; }};
  peer::ClientOptions options{std::string(fuzz::kNames[0]), fuzz::source(0), {}, {}, std::chrono::seconds(15), 1};
  auto state = std::make_unique<identity::PeerState>(":memory:", static_cast<std::uint64_t>(clock.wall_us() / 1000));
  const identity::PeerState& pins = *state;
  peer::Client client(options, clock, io, fuzz::identity_of(fuzz::kNames[0]), std::move(state));
  fuzz::FakeNetwork network(client.core(), clock, 1);
  Oracle oracle(pins, clock);
  std::size_t mark = 0;
  // (source, id) of the server requests injected for another client, never seen before.
  std::set<std::pair<int, std::uint64_t>> seen_ids, not_for_me;
  network.before_inject = [&](const std::string& bytes, const udp::endpoint& from) {
    mark = printed.size();
    protocol::Decoded d = protocol::decode(bytes);
    const std::uint64_t id = d ? protocol::request_id(*d.message) : 0;
    if (id == 0) return;
    const std::pair<int, std::uint64_t> key{fuzz::source_index(from), id};
    const std::string* recipient = std::visit(
        [](const auto& x) -> const std::string* {
          if constexpr (requires { x.recipient; }) return &x.recipient;
          else return nullptr;
        },
        *d.message);
    if (recipient != nullptr && *recipient != fuzz::kNames[0] && !seen_ids.contains(key)) not_for_me.insert(key);
    else not_for_me.erase(key);
    seen_ids.insert(key);
  };
  network.on_sent = [&](const protocol::Message& m, const udp::endpoint& to) {
    const auto* ack = std::get_if<protocol::Ack>(&m);
    if (ack != nullptr && not_for_me.contains({fuzz::source_index(to), ack->re}))
      fail(std::string("acknowledged a server request that names another client (id ")
               .append(std::to_string(ack->re))
               .append(")"));
  };
  network.after_inject = [&](const std::string& bytes) {
    if (const auto* expect = network.crafted(bytes)) oracle.check(*expect, printed, mark);
  };
  client.start();
  client.core().settle();

  fuzz::Reader in(data, size);
  std::uint8_t flags = in.byte();
  if ((flags & 1) == 0) {
    if ((flags & 4) != 0) {
      network.answer_with(0, (flags & 2) != 0 ? 6 : 6 | fuzz::kNothingPending);  // RegOk at once
    } else {
      network.answer(0);                            // Challenge
      network.answer_with(0, (flags & 2) != 0 ? 6 : 0);  // RegOk (pending 1 or 0) to the proof
    }
  }

  while (!in.done() && !exited) {
    printed.clear();
    std::uint8_t b = in.byte();
    int src = b % fuzz::kSources;
    fuzz::Op op = fuzz::op_of(b);
    if (op == fuzz::Op::extra) {
      if (src == fuzz::kSources - 1) {
        client.on_end_of_input();
      } else {
        std::string line(in.bytes(in.byte()));
        if (reading) client.on_line(line);
      }
      client.core().settle();
    } else {
      network.run(op, src, in);
    }
  }

  client.leave();  // as on SIGINT
  return 0;
}
