// What the core-driving fuzz targets share: the input's op stream, the fake network and clock,
// and a cast of simulated peers with deterministic identities whose ops seal, sign and prove.
//
// An input is a sequence of ops. Each op starts with one byte b: its source is b % 8 (one of
// the fake addresses below) and its kind is (b / 8) % 14:
//   0 datagram     [b][len hi][len lo][len bytes]  inject the bytes as if they came from the source
//   1 answer       [b]        answer the latest unanswered request sent to the source, as a
//                             well-behaved peer would (right_answer: Register -> Challenge, then
//                             RegOk once it carries a token; Direct -> a Receipt sealed by the cast
//                             member the body opens for; Table -> Ack{re, epoch, have=to};
//                             KeepAlive -> Alive{live}; Lookup -> Found; anything else -> Ack)
//   2 answer_all   [b]        answer every unanswered request, oldest first
//   3 answer_with  [b][sel]   answer the latest request sent to the source with the reply `sel`
//                             picks (see reply_for), from the right or a wrong address, or drop it
//   4 repeat       [b]        inject again the last datagram that came from the source
//   5 extra        [b]...     target-specific (server: store faults; client: a typed line, EOF)
//   6 advance      [b][t]     move the fake clock on by advance_by(t) (1 ms to 2 min) and run the
//                             timers that are due: retransmissions, give-ups, probes, keep-alives
//                             and their expiry, the client's ready timer
// The ops of the cast (peer i is kNames[i] with identity_of(kNames[i]); its impostor has
// identity_of(kNames[i], 1): same name, another key):
//   7 reg          [b][p][f]  a Register of peer p & 7 (p & 8: the impostor's key and proof) with a
//                             token from the harness's minter (seeded like the server's) for the
//                             source's address, minted 1 ms later (the clock moves on: its round
//                             trip), and a valid proof. f: 1 stale token, 2 token for the next
//                             source's address, 4 proof altered, 8 the token of the last
//                             Challenge the core sent to the source instead, 0x10 token minted for
//                             another name, 0x20 no token at all (the first step), 0x40 every_ms 0
//   8 sealed       [b] item   a Direct (client target) or Save (server target) whose body is
//                             sealed (identity::seal_direct) from peer i to peer j, text and mid
//                             from the input. p: i = p & 7, j = (p >> 3) & 7, 0x40 a Save instead
//                             of a Direct, 0x80 Save.force
//   9 channel      [b] item   a Channel (to the server) or a Relay (from it) signed by peer i.
//                             p: i = p & 7, 0x40 a Relay instead of a Channel, whose recipient
//                             is peer (p >> 3) & 7 (0: "me", the client target)
//  10 stored       [b][n] (n & 15) % 5 items   a Stored delivery for peer (n >> 4) & 7 (0: "me")
//                             of sealed (direct) or signed (channel)
//                             items; per item p: i = p & 7, j = (p >> 3) & 7, 0x40 a channel item,
//                             0x80 the item's key is zero; f (below) 0x40: the item's key is the
//                             impostor's (else i's), 0x80: the item says it is from peer i ^ 1
//  11 receipt      [b][p][f][k]  answer the latest request sent to the source with a Receipt
//                             sealed by peer i = p & 7 for peer j = (p >> 3) & 7, for its id
//  12 table        [b][mask][imp][off][mode]  a Table with a row for every peer in `mask` at its
//                             address (peer 0 at 127.0.0.1:5000, 1-6 at sources 1-6, 7 at
//                             127.0.0.8:4007) with its key (the impostor's for peers in `imp`),
//                             online unless in `off`; mode 1: continue the last one (same epoch,
//                             from its `to`) instead of a snapshot in a new epoch; mode 2: more;
//                             (mode >> 4) & 7: its recipient, peer 0 ("me") or another one (a
//                             table for another client changes nothing the harness tracks)
//  13 replay      [b][n]     inject again, from the source, the (n & 127)-th (modulo) of the last
//                             128 datagrams injected so far, or (n & 0x80) that the core sent
// item = [p][f][mid lo][mid hi][k][len hi][len lo][len bytes of text]: mid = 1 + (hi << 8 | lo);
// f: 1 sealed/signed by the impostor, 2 byte k (modulo) of the body flipped, (f >> 2) & 3 the
// sender's clock (0 now, 1 an hour ago, 2 older than a year, 3 two days ahead), 0x10 sealed or
// signed for mid + 1, 0x20 sealed for the wrong name (a direct's `to` is the sender's own name, a
// channel is signed as another name), 0x40 (sealed, channel) the datagram's `from` is peer i ^ 1.
// Reads past the end give zeros, so every byte string is a valid input. The cores run on the
// fake clock and send only to the fake network: no socket, no real time, and libsodium's
// randomness is a fixed sequence reset per input, so an input behaves the same every time.
#pragma once

#include <sodium.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <spdlog/sinks/null_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include "identity/envelope.hpp"
#include "identity/identity.hpp"
#include "identity/peer_state.hpp"
#include "protocol/codec.hpp"
#include "transport/clock.hpp"
#include "transport/core.hpp"

namespace chat::fuzz {

/// FUZZ_TRACE=1 (when running one input by hand): every datagram and log line to stderr.
inline bool tracing() {
  static const bool on = [] {
    const char* t = std::getenv("FUZZ_TRACE");
    return t != nullptr && *t != '\0' && *t != '0';
  }();
  return on;
}

/// A datagram for a trace or a report: printable ASCII as it is, other bytes as \xHH (the
/// wire format is binary).
inline std::string printable(std::string_view bytes) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out;
  for (char ch : bytes) {
    auto c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c < 0x7F && c != '\\') {
      out += ch;
    } else {
      out += "\\x";
      out += digits[c >> 4];
      out += digits[c & 0xF];
    }
  }
  return out;
}

/// Every log line is formatted (that code runs too) and then dropped, or shown when tracing.
inline void quiet_logs() {
  spdlog::sink_ptr sink;
  if (tracing()) sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  else sink = std::make_shared<spdlog::sinks::null_sink_mt>();
  auto logger = std::make_shared<spdlog::logger>("fuzz", sink);
  logger->set_level(spdlog::level::trace);
  spdlog::set_default_logger(logger);
}

[[noreturn]] inline void fail(const char* target, const std::string& what) {
  std::fprintf(stderr, "%s: %s\n", target, what.c_str());
  std::abort();
}

// ---------------------------------------------------------------- deterministic randomness

namespace detail {
inline std::uint64_t g_random_state = 0;
inline std::uint64_t next_random() {  // splitmix64
  std::uint64_t z = (g_random_state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
inline const char* random_name() { return "chatapp-fuzz-fixed-sequence"; }
inline std::uint32_t random_u32() { return static_cast<std::uint32_t>(next_random()); }
inline void random_buf(void* const buf, const std::size_t size) {
  auto* p = static_cast<unsigned char*>(buf);
  for (std::size_t i = 0; i < size; i += 8) {
    std::uint64_t r = next_random();
    for (std::size_t k = 0; k < 8 && i + k < size; ++k) p[i + k] = static_cast<unsigned char>(r >> (8 * k));
  }
}
inline randombytes_implementation g_random{&random_name, &random_u32, nullptr, nullptr, &random_buf, nullptr};
}  // namespace detail

/// libsodium's randomness (the nonces of sealed bodies) becomes a fixed sequence; call once,
/// before anything initializes libsodium. Not random at all: for fuzzing only.
inline void use_fixed_randomness() {
  randombytes_set_implementation(&detail::g_random);
  identity::init();
}
/// Restarts the sequence: each input sees the same "random" bytes.
inline void reset_randomness() { detail::g_random_state = 0; }

// ---------------------------------------------------------------- the fake addresses

/// Number of fake addresses an op can name (the low 3 bits of its first byte).
inline constexpr int kSources = 8;

/// The fake addresses. Loopback, so that even a send that bypassed the hook stays on the
/// machine; 0 is the server in the client target; 7 is IPv6 (the server ignores it).
inline udp::endpoint source(int i) {
  i &= kSources - 1;
  if (i == kSources - 1) return {net::ip::make_address_v6("::1"), 4007};
  auto a = net::ip::make_address_v4(static_cast<net::ip::address_v4::uint_type>(0x7F000001 + i));
  return {a, static_cast<unsigned short>(4000 + i)};
}

/// Which fake address `e` is, or -1.
inline int source_index(const udp::endpoint& e) {
  for (int i = 0; i < kSources; ++i)
    if (source(i) == e) return i;
  return -1;
}

/// An address as a token binds it (host byte order; 0 for IPv6, which no server admits).
inline std::uint32_t ip4_of(const udp::endpoint& e) {
  return e.address().is_v4() ? e.address().to_v4().to_uint() : 0;
}

// ---------------------------------------------------------------- the cast

/// Number of simulated peers; peer 0 is "me", the client the client target drives.
inline constexpr int kPeers = 8;
inline constexpr std::array<std::string_view, kPeers> kNames{"me",   "alice", "bob",   "carol",
                                                             "dave", "erin",  "frank", "grace"};
/// Where the client target's own row says it is (not a fake source: nothing comes from it).
inline constexpr std::string_view kSelfIp = "127.0.0.1";
inline constexpr std::uint16_t kSelfPort = 5000;

/// The identity of `name` (the same every run, as tests/unit/sim.hpp's identity_of; `variant`
/// gives another key for the same name, an impostor's).
inline identity::Identity identity_of(std::string_view name, std::uint8_t variant = 0) {
  identity::Seed seed{};
  for (std::size_t i = 0; i < name.size() && i < seed.size() - 1; ++i) seed[i] = static_cast<std::uint8_t>(name[i]);
  seed.back() = variant;
  return identity::Identity::from_seed(seed);
}

/// The peers' identities and impostors, made once per process, and their pairwise keys.
class Cast {
 public:
  static Cast& get() {
    static Cast cast;
    return cast;
  }
  const std::string& name(int i) const { return names_[static_cast<std::size_t>(i & 7)]; }
  const identity::Identity& id(int i, bool impostor = false) const {
    return ids_[static_cast<std::size_t>((i & 7) * 2 + (impostor ? 1 : 0))];
  }
  const protocol::Key& key(int i, bool impostor = false) const { return id(i, impostor).public_key(); }
  /// The peer named `name`, or -1.
  int index_of(std::string_view name) const {
    for (int i = 0; i < kPeers; ++i)
      if (names_[static_cast<std::size_t>(i)] == name) return i;
    return -1;
  }
  /// The pairwise key of peer i (or its impostor) with `peer`, computed once.
  const identity::Pair& pair(int i, bool impostor, const protocol::Key& peer) {
    const int who = (i & 7) * 2 + (impostor ? 1 : 0);
    auto it = pairs_.find({who, peer});
    if (it == pairs_.end()) {
      if (pairs_.size() >= 4096) pairs_.clear();  // only cast keys come here; a bound all the same
      it = pairs_.emplace(std::make_pair(who, peer), identity::Pair(id(i, impostor), peer)).first;
    }
    return it->second;
  }

 private:
  Cast() {
    for (int i = 0; i < kPeers; ++i) {
      names_.emplace_back(kNames[static_cast<std::size_t>(i)]);
      ids_.push_back(identity_of(kNames[static_cast<std::size_t>(i)]));
      ids_.push_back(identity_of(kNames[static_cast<std::size_t>(i)], 1));
    }
  }
  std::vector<std::string> names_;
  std::vector<identity::Identity> ids_;
  std::map<std::pair<int, protocol::Key>, identity::Pair> pairs_;
};

/// The row of peer i as the table op and a well-behaved server's Found give it.
inline protocol::Entry entry_of(int i, bool impostor_key, bool online) {
  Cast& cast = Cast::get();
  i &= 7;
  std::string ip = i == 0 ? std::string(kSelfIp) : i == 7 ? "127.0.0.8" : source(i).address().to_string();
  std::uint16_t port = i == 0 ? kSelfPort : static_cast<std::uint16_t>(4000 + i);
  return protocol::Entry{cast.name(i), ip, port, online, cast.key(i, impostor_key)};
}

// ---------------------------------------------------------------- ops

enum class Op : std::uint8_t {
  datagram, answer, answer_all, answer_with, repeat, extra, advance,
  reg, sealed, channel, stored, receipt, table, replay, count_
};

/// How far an advance op moves the clock: fine steps below a retry timeout, then whole
/// retry budgets and keep-alive intervals.
inline transport::Duration advance_by(std::uint8_t t) {
  using namespace std::chrono;
  if (t < 128) return milliseconds(1 + t * 4);          // 1 ms .. ~0.5 s
  if (t < 224) return milliseconds(500) * (t - 127);    // 0.5 s .. 48 s
  return seconds(5) * (t - 223);                        // 5 s .. 160 s
}

/// The first byte of an op.
constexpr std::uint8_t op_byte(Op op, int src) {
  return static_cast<std::uint8_t>(static_cast<int>(op) * kSources + (src & (kSources - 1)));
}

/// The kind of op a first byte starts.
constexpr Op op_of(std::uint8_t b) { return static_cast<Op>(b / kSources % static_cast<int>(Op::count_)); }

/// Bits of answer_with's selector beyond the reply kind (its low 3 bits).
inline constexpr std::uint8_t kFromWrongAddress = 0x08;  // reply from the next source instead
inline constexpr std::uint8_t kDrop = 0x10;              // lose the request: never answer it
inline constexpr std::uint8_t kNothingPending = 0x20;    // with kind 6 (RegOk): pending 0

/// Bits of an item's f byte (see the top of this file).
namespace item {
inline constexpr std::uint8_t kImpostor = 0x01;
inline constexpr std::uint8_t kFlip = 0x02;
inline constexpr int kClockShift = 2;  // two bits
inline constexpr std::uint8_t kOtherMid = 0x10;
inline constexpr std::uint8_t kWrongName = 0x20;
inline constexpr std::uint8_t kOtherFrom = 0x40;
// In a stored item only.
inline constexpr std::uint8_t kImpostorKey = 0x40;
inline constexpr std::uint8_t kStoredOtherFrom = 0x80;
// In the p byte.
inline constexpr std::uint8_t kSave = 0x40;
inline constexpr std::uint8_t kForce = 0x80;
inline constexpr std::uint8_t kRelay = 0x40;
inline constexpr std::uint8_t kChannelItem = 0x40;
inline constexpr std::uint8_t kZeroKey = 0x80;
}  // namespace item

/// Bits of the reg op's f byte.
namespace reg {
inline constexpr std::uint8_t kStale = 0x01;
inline constexpr std::uint8_t kOtherAddress = 0x02;
inline constexpr std::uint8_t kBadProof = 0x04;
inline constexpr std::uint8_t kServerToken = 0x08;
inline constexpr std::uint8_t kOtherName = 0x10;
inline constexpr std::uint8_t kNoToken = 0x20;
inline constexpr std::uint8_t kNoInterval = 0x40;
}  // namespace reg

/// Reads an input front to back; past the end every read gives zeros or nothing.
class Reader {
 public:
  Reader(const std::uint8_t* data, std::size_t size) : p_(data), end_(data + size) {}
  bool done() const { return p_ >= end_; }
  std::uint8_t byte() { return done() ? 0 : *p_++; }
  std::size_t u16() {
    std::size_t hi = byte();
    return hi << 8 | byte();
  }
  std::string_view bytes(std::size_t n) {
    n = std::min(n, static_cast<std::size_t>(end_ - p_));
    std::string_view s(reinterpret_cast<const char*>(p_), n);
    p_ += n;
    return s;
  }

 private:
  const std::uint8_t* p_;
  const std::uint8_t* end_;
};

/// What the harness knows about one message it sealed or signed, for the targets' checks:
/// whether a receiver that holds `key_for(from)` may show it.
struct Expect {
  enum class Kind : std::uint8_t { direct, channel, receipt };
  Kind kind = Kind::direct;
  bool stored = false;           // an item of a Stored delivery (shown with its ts_us)
  std::string from;              // the sender the datagram or item names
  protocol::Key sealer{};        // whose key sealed or signed it
  protocol::Key peer{};          // direct, receipt: the other key of the box
  std::string to;                // direct, receipt: the recipient sealed inside; channel: the name signed
  std::uint64_t mid = 0;         // what the datagram or item says (receipt: the request's id)
  std::uint64_t sealed_mid = 0;  // what was sealed or signed
  std::uint64_t sent_ms = 0;
  std::int64_t ts_us = 0;
  bool flipped = false;          // a byte of the body was altered after sealing
  bool answers_direct = false;   // receipt: the request it answers is a Direct
  std::string text;
};

/// The fake network and clock around one core: its output captures every datagram and
/// remembers the requests among them, answered or repeated on the input's demand; the cast's
/// ops build sealed, signed and proven datagrams.
class FakeNetwork {
 public:
  /// `token_seed`: the seed of the server's TokenMinter (ServerOptions.seed), so the harness
  /// mints tokens the server accepts.
  FakeNetwork(transport::Core& core, transport::ManualClock& clock, std::uint64_t token_seed)
      : core_(core), clock_(clock), minter_(token_seed) {
    core_.set_output([this](const std::string& bytes, const udp::endpoint& to) {
      on_send(bytes, to);
      return true;
    });
  }
  FakeNetwork(const FakeNetwork&) = delete;
  FakeNetwork& operator=(const FakeNetwork&) = delete;
  ~FakeNetwork() { core_.set_output({}); }

  /// Called before each datagram is handed to the core, and after it was handled (settled).
  std::function<void(const std::string& bytes, const udp::endpoint& from)> before_inject;
  std::function<void(const std::string& bytes)> after_inject;
  /// Called with each datagram the core sends (decoded; the v1 refusal is not).
  std::function<void(const protocol::Message& m, const udp::endpoint& to)> on_sent;

  const identity::TokenMinter& minter() const { return minter_; }

  /// What the harness sealed into `bytes`, if it made them.
  const std::vector<Expect>* crafted(const std::string& bytes) const {
    auto it = crafted_.find(bytes);
    return it == crafted_.end() ? nullptr : &it->second;
  }

  /// Runs one op of any kind but extra (false: the target's to run).
  bool run(Op op, int src, Reader& in) {
    switch (op) {
      case Op::datagram: inject(in.bytes(in.u16()), src); return true;
      case Op::answer: answer(src); return true;
      case Op::answer_all: answer_all(); return true;
      case Op::answer_with: answer_with(src, in.byte()); return true;
      case Op::repeat: repeat(src); return true;
      case Op::advance: advance(in.byte()); return true;
      case Op::reg: reg_op(src, in); return true;
      case Op::sealed: sealed_op(src, in); return true;
      case Op::channel: channel_op(src, in); return true;
      case Op::stored: stored_op(src, in); return true;
      case Op::receipt: receipt_op(src, in); return true;
      case Op::table: table_op(src, in); return true;
      case Op::replay: replay_op(src, in.byte()); return true;
      case Op::extra:
      case Op::count_: break;
    }
    return false;
  }

  /// Lets advance_by(t) pass as a real clock would: every deadline on the way (retries,
  /// give-ups, keep-alives) fires at its own time.
  void advance(std::uint8_t t) {
    const auto end = clock_.now() + advance_by(t);
    for (auto next = core_.next_deadline(); next && *next <= end; next = core_.next_deadline()) {
      clock_.set(*next);
      core_.on_timer();
      core_.settle();
    }
    clock_.set(end);
  }

  /// Handles `bytes` as a datagram from source `src`.
  void inject(std::string_view bytes, int src) { inject_from(std::string(bytes), source(src), src); }

  void answer(int src) {
    if (auto r = take_latest(source(src))) inject_from(protocol::encode(right_answer(r->msg)), r->to, src);
  }

  void answer_all() {
    // Answering may send new requests: only those pending now are answered, in order.
    std::vector<Sent> now;
    now.swap(pending_);
    for (const auto& r : now) inject_from(protocol::encode(right_answer(r.msg)), r.to, -1);
  }

  void answer_with(int src, std::uint8_t sel) {
    auto r = take_latest(source(src));
    if (!r || (sel & kDrop) != 0) return;
    int from = (sel & kFromWrongAddress) != 0 ? (src + 1) % kSources : src;
    inject_from(protocol::encode(reply_for(r->msg, sel)), source(from), from);
  }

  void repeat(int src) {
    std::string again = last_from_[src & (kSources - 1)];
    if (!again.empty()) inject_from(again, source(src), src);
  }

  /// The reply a well-behaved receiver gives to `req`.
  protocol::Message right_answer(const protocol::Message& req) {
    namespace p = protocol;
    std::uint64_t id = p::request_id(req);
    if (const auto* t = std::get_if<p::Table>(&req)) return p::Ack{id, t->epoch, t->to};
    if (const auto* r = std::get_if<p::Register>(&req)) {
      // A client registers in two steps: the challenge's token, then the token signed.
      if (r->token.empty())
        return p::Challenge{id, minter_.mint(steady_us(), r->name, r->key,
                                             net::ip::make_address_v4(std::string(kSelfIp)).to_uint(), kSelfPort)};
      return p::RegOk{id, 7, 0};
    }
    if (std::get_if<p::KeepAlive>(&req)) return p::Alive{id, true};
    if (const auto* l = std::get_if<p::Lookup>(&req)) {
      if (int i = Cast::get().index_of(l->name); i >= 0) return p::Found{id, true, entry_of(i, false, true)};
      return p::Found{id, true, p::Entry{l->name, "127.0.0.3", 4003, true}};
    }
    if (const auto* d = std::get_if<p::Direct>(&req)) {
      // The recipient whose key the body opens with seals the receipt; nobody's: no receipt.
      if (auto opened = open_sent(d->from, d->body))
        return p::Receipt{id, identity::seal_receipt(Cast::get().pair(opened->first, opened->second,
                                                                       Cast::get().key(Cast::get().index_of(d->from))),
                                                     id, d->from)};
    }
    return p::Ack{id};
  }

  /// The reply answer_with's selector picks (low 3 bits) for `req`: right or wrong kinds.
  protocol::Message reply_for(const protocol::Message& req, std::uint8_t sel) {
    namespace p = protocol;
    std::uint64_t id = p::request_id(req);
    std::uint64_t epoch = 0;
    std::uint64_t to = 0;
    if (const auto* t = std::get_if<p::Table>(&req)) {
      epoch = t->epoch;
      to = t->to;
    }
    std::string name = "bob";
    if (const auto* s = std::get_if<p::Save>(&req)) name = s->to;
    switch (sel & 7) {
      case 0: return right_answer(req);
      case 1: return p::Ack{id};
      case 2: return p::Ack{id, epoch + 1, to};      // another epoch: the client needs a snapshot
      case 3: return p::Ack{id, epoch, to + 1000};   // claims more than was sent
      case 4: return p::Refused{id, "refused by the fuzzer"};
      case 5: return p::RegErr{id, "the name is in use"};
      case 6: return p::RegOk{id, 7, (sel & kNothingPending) != 0 ? 0u : 1u};  // without a challenge
      default:
        if (std::get_if<p::KeepAlive>(&req)) return p::Alive{id, false};  // the server lost track
        return p::Exists{id, name};
    }
  }

 private:
  struct Sent {
    udp::endpoint to;
    protocol::Message msg;
  };
  struct Item {
    int p = 0;
    std::uint8_t f = 0;
    std::uint64_t mid = 0;
    std::uint8_t k = 0;
    std::string text;
  };
  static constexpr std::size_t kHistory = 128;

  static std::string where(const udp::endpoint& e) {
    return e.address().to_string() + ":" + std::to_string(e.port());
  }

  // The answer Core gives a version-1 request (protocol::v1_refusal): JSON, for old peers.
  static bool is_v1_refusal(const std::string& bytes) {
    const std::string tail = std::string(protocol::kV1RefusalReason).append("\"}");
    return bytes.rfind("{\"v\":1,\"t\":\"", 0) == 0 && bytes.size() > tail.size() &&
           bytes.compare(bytes.size() - tail.size(), tail.size(), tail) == 0;
  }

  std::int64_t steady_us() const {
    return std::chrono::duration_cast<std::chrono::microseconds>(clock_.now().time_since_epoch()).count();
  }
  std::uint64_t next_id() { return ++next_id_; }

  /// A sender's clock as an item's f byte picks it.
  std::uint64_t sent_ms(std::uint8_t f) const {
    const auto now = static_cast<std::uint64_t>(clock_.wall_us() / 1000);
    switch ((f >> item::kClockShift) & 3) {
      case 0: return now;
      case 1: return now - 3'600'000;
      case 2: return now - identity::kMaxMessageAgeMs - 86'400'000;
      default: return now + identity::kMaxClockAheadMs + 86'400'000;
    }
  }

  static Item read_item(Reader& in) {
    Item it;
    it.p = in.byte();
    it.f = in.byte();
    std::uint64_t lo = in.byte();
    std::uint64_t hi = in.byte();
    it.mid = 1 + (hi << 8 | lo);
    it.k = in.byte();
    it.text = std::string(in.bytes(std::min<std::size_t>(in.u16(), protocol::kMaxText)));
    return it;
  }

  static void flip(std::string& body, std::uint8_t k) {
    if (!body.empty()) body[k % body.size()] = static_cast<char>(body[k % body.size()] ^ 1);
  }

  /// A direct body the core under test sealed, opened as the cast member it is for:
  /// (peer, impostor) of the recipient, or none. `from` must be a cast name.
  std::optional<std::pair<int, bool>> open_sent(const std::string& from, const std::string& body,
                                                std::optional<identity::Opened>* out = nullptr) {
    Cast& cast = Cast::get();
    int s = cast.index_of(from);
    if (s < 0) return std::nullopt;
    for (int i = 0; i < kPeers; ++i) {
      for (bool imp : {false, true}) {
        auto m = identity::open_direct(cast.pair(i, imp, cast.key(s)), body, cast.name(i));
        if (m) {
          if (out != nullptr) *out = std::move(m);
          return std::make_pair(i, imp);
        }
      }
    }
    return std::nullopt;
  }

  void on_send(const std::string& bytes, const udp::endpoint& to) {
    if (tracing()) std::fprintf(stderr, "  sent to %s: %s\n", where(to).c_str(), printable(bytes).c_str());
    if (bytes.size() > protocol::kMaxDatagram) {
      fail("harness", "sent a datagram of " + std::to_string(bytes.size()) + " bytes (limit " +
                          std::to_string(protocol::kMaxDatagram) + "): " + printable(bytes));
    }
    protocol::Decoded d = protocol::decode(bytes);
    if (!d && d.error == protocol::DecodeError::old_version && is_v1_refusal(bytes)) return;
    if (!d) {
      // What one side sends, the other must accept: anything else is a bug in the sender.
      fail("harness", std::string("sent a datagram its peer refuses (") + protocol::to_string(d.error) +
                          "): " + printable(bytes));
    }
    check_sent(*d.message);
    if (sent_.size() >= kHistory) sent_.pop_front();
    sent_.push_back(bytes);
    if (const auto* c = std::get_if<protocol::Challenge>(&*d.message)) {
      if (int i = source_index(to); i >= 0) last_challenge_[i] = c->token;
    }
    if (on_sent) on_sent(*d.message, to);
    if (protocol::request_id(*d.message) != 0) pending_.push_back({to, std::move(*d.message)});
  }

  /// What the design says of what a core sends, checked with the cast's keys.
  void check_sent(const protocol::Message& m) {
    namespace p = protocol;
    if (const auto* r = std::get_if<p::Register>(&m)) {
      if (!r->token.empty() && !identity::check_register_proof(r->key, r->name, r->token, r->proof))
        fail("harness", "sent a registration whose proof does not check: " + printable(p::encode(m)));
    } else if (const auto* dm = std::get_if<p::Direct>(&m)) {
      std::optional<identity::Opened> opened;
      if (open_sent(dm->from, dm->body, &opened) && opened->mid != dm->id)
        fail("harness", "sent a direct message whose sealed mid " + std::to_string(opened->mid) +
                            " is not its id " + std::to_string(dm->id));
    } else if (const auto* s = std::get_if<p::Save>(&m)) {
      std::optional<identity::Opened> opened;
      if (open_sent(s->from, s->body, &opened) && opened->mid != s->mid)
        fail("harness", "sent a Save whose sealed mid " + std::to_string(opened->mid) + " is not its mid " +
                            std::to_string(s->mid));
    } else if (const auto* c = std::get_if<p::Channel>(&m)) {
      int i = Cast::get().index_of(c->from);
      if (i >= 0 && !identity::open_channel(Cast::get().key(i), c->from, c->id, c->body))
        fail("harness", "sent a channel message its sender's key does not verify: " + printable(p::encode(m)));
    }
  }

  std::optional<Sent> take_latest(const udp::endpoint& to) {
    for (auto it = pending_.rbegin(); it != pending_.rend(); ++it) {
      if (it->to == to) {
        Sent s = std::move(*it);
        pending_.erase(std::next(it).base());
        return s;
      }
    }
    return std::nullopt;
  }

  void inject_from(const std::string& bytes, const udp::endpoint& from, int src) {
    if (src >= 0) last_from_[src & (kSources - 1)] = bytes;
    if (injected_.size() >= kHistory) injected_.pop_front();
    injected_.push_back(bytes);
    if (tracing()) std::fprintf(stderr, "inject from %s: %s\n", where(from).c_str(), printable(bytes).c_str());
    if (before_inject) before_inject(bytes, from);
    core_.on_datagram(bytes, from);
    core_.settle();
    if (after_inject) after_inject(bytes);
  }

  void inject_crafted(const protocol::Message& m, std::vector<Expect> expect, int src) {
    std::string bytes = protocol::encode(m);
    if (!expect.empty()) crafted_[bytes] = std::move(expect);
    inject_from(bytes, source(src), src);
  }

  // ---- the cast's ops

  void reg_op(int src, Reader& in) {
    Cast& cast = Cast::get();
    const int p = in.byte();
    const std::uint8_t f = in.byte();
    const int i = p & 7;
    const bool imp = (p & 8) != 0;
    const identity::Identity& me = cast.id(i, imp);
    protocol::Register r{next_id(), cast.name(i), me.public_key(), (f & reg::kNoInterval) != 0 ? 0u : 15'000u, {}, {}};
    if ((f & reg::kNoToken) == 0) {
      const udp::endpoint at = source((f & reg::kOtherAddress) != 0 ? src + 1 : src);
      const std::string& challenge = last_challenge_[src & (kSources - 1)];
      if ((f & reg::kServerToken) != 0 && !challenge.empty()) {
        r.token = challenge;
      } else {
        // The challenge's round trip takes a moment: a name's next token is always newer
        // (the server refuses an older or equal one as a replay).
        advance(0);
        const std::int64_t minted =
            steady_us() - ((f & reg::kStale) != 0 ? identity::kTokenLifetimeUs + 1'000'000 : 0);
        r.token = minter_.mint(minted, cast.name((f & reg::kOtherName) != 0 ? i ^ 1 : i), r.key, ip4_of(at),
                               at.port());
      }
      r.proof = identity::register_proof(me, r.name, r.token);
      if ((f & reg::kBadProof) != 0) r.proof[0] ^= 1;
    }
    inject_crafted(r, {}, src);
  }

  void sealed_op(int src, Reader& in) {
    Cast& cast = Cast::get();
    Item it = read_item(in);
    const int i = it.p & 7;
    const int j = (it.p >> 3) & 7;
    const bool imp = (it.f & item::kImpostor) != 0;
    Expect e;
    e.kind = Expect::Kind::direct;
    e.from = cast.name((it.f & item::kOtherFrom) != 0 ? i ^ 1 : i);
    e.sealer = cast.key(i, imp);
    e.peer = cast.key(j);
    e.to = cast.name((it.f & item::kWrongName) != 0 ? i : j);
    e.mid = it.mid;
    e.sealed_mid = (it.f & item::kOtherMid) != 0 ? it.mid + 1 : it.mid;
    e.sent_ms = sent_ms(it.f);
    e.flipped = (it.f & item::kFlip) != 0;
    e.text = it.text;
    std::string body = identity::seal_direct(cast.pair(i, imp, e.peer), e.sealed_mid, e.sent_ms, e.to, e.text);
    if (e.flipped) flip(body, it.k);
    if ((it.p & item::kSave) != 0) {
      inject_crafted(protocol::Save{next_id(), e.from, cast.name(j), it.mid, (it.p & item::kForce) != 0, body}, {},
                     src);
    } else {
      inject_crafted(protocol::Direct{it.mid, e.from, body}, {e}, src);
    }
  }

  /// The signed body of channel item `it` from peer i; fills `e`.
  std::string sign_item(const Item& it, int i, const std::string& from, Expect& e) {
    Cast& cast = Cast::get();
    const bool imp = (it.f & item::kImpostor) != 0;
    e.kind = Expect::Kind::channel;
    e.from = from;
    e.sealer = cast.key(i, imp);
    e.to = (it.f & item::kWrongName) != 0 ? from + "x" : from;  // the name signed
    e.mid = it.mid;
    e.sealed_mid = (it.f & item::kOtherMid) != 0 ? it.mid + 1 : it.mid;
    e.sent_ms = sent_ms(it.f);
    e.flipped = (it.f & item::kFlip) != 0;
    e.text = it.text;
    std::string body = identity::sign_channel(cast.id(i, imp), e.to, e.sealed_mid, e.sent_ms, e.text);
    if (e.flipped) flip(body, it.k);
    return body;
  }

  void channel_op(int src, Reader& in) {
    Cast& cast = Cast::get();
    Item it = read_item(in);
    const int i = it.p & 7;
    Expect e;
    std::string body = sign_item(it, i, cast.name((it.f & item::kOtherFrom) != 0 ? i ^ 1 : i), e);
    if ((it.p & item::kRelay) != 0)
      inject_crafted(protocol::Relay{next_id(), cast.name((it.p >> 3) & 7), e.from, it.mid, body}, {e}, src);
    else inject_crafted(protocol::Channel{it.mid, e.from, body}, {}, src);
  }

  void stored_op(int src, Reader& in) {
    Cast& cast = Cast::get();
    const std::uint8_t c = in.byte();
    const int n = (c & 15) % 5;
    protocol::Stored s{next_id(), cast.name(c >> 4), {}};
    std::vector<Expect> expect;
    for (int k = 0; k < n; ++k) {
      Item it = read_item(in);
      const int i = it.p & 7;
      const int j = (it.p >> 3) & 7;
      const bool channel = (it.p & item::kChannelItem) != 0;
      const bool imp = (it.f & item::kImpostor) != 0;
      const std::string from = cast.name((it.f & item::kStoredOtherFrom) != 0 ? i ^ 1 : i);
      Expect e;
      std::string body;
      if (channel) {
        body = sign_item(it, i, from, e);
      } else {
        e.kind = Expect::Kind::direct;
        e.from = from;
        e.sealer = cast.key(i, imp);
        e.peer = cast.key(j);
        e.to = cast.name((it.f & item::kWrongName) != 0 ? i : j);
        e.mid = it.mid;
        e.sealed_mid = (it.f & item::kOtherMid) != 0 ? it.mid + 1 : it.mid;
        e.sent_ms = sent_ms(it.f);
        e.flipped = (it.f & item::kFlip) != 0;
        e.text = it.text;
        body = identity::seal_direct(cast.pair(i, imp, e.peer), e.sealed_mid, e.sent_ms, e.to, e.text);
        if (e.flipped) flip(body, it.k);
      }
      e.stored = true;
      e.ts_us = clock_.wall_us() - 1'000'000 * (n - k);
      protocol::Key key{};
      if ((it.p & item::kZeroKey) == 0) key = cast.key(i, (it.f & item::kImpostorKey) != 0);
      s.items.push_back(protocol::StoredItem{from, channel, e.ts_us, it.mid, key, std::move(body)});
      expect.push_back(std::move(e));
    }
    inject_crafted(s, std::move(expect), src);
  }

  void receipt_op(int src, Reader& in) {
    Cast& cast = Cast::get();
    const int p = in.byte();
    const std::uint8_t f = in.byte();
    const std::uint8_t k = in.byte();
    auto r = take_latest(source(src));
    if (!r) return;
    const int i = p & 7;
    const bool imp = (f & item::kImpostor) != 0;
    const std::uint64_t id = protocol::request_id(r->msg);
    const auto* d = std::get_if<protocol::Direct>(&r->msg);
    Expect e;
    e.kind = Expect::Kind::receipt;
    e.sealer = cast.key(i, imp);
    e.peer = cast.key((p >> 3) & 7);
    e.mid = id;
    e.sealed_mid = (f & item::kOtherMid) != 0 ? id + 1 : id;
    e.to = (f & item::kWrongName) != 0 ? cast.name(i) : d != nullptr ? d->from : cast.name((p >> 3) & 7);
    e.flipped = (f & item::kFlip) != 0;
    e.answers_direct = d != nullptr;
    std::string body = identity::seal_receipt(cast.pair(i, imp, e.peer), e.sealed_mid, e.to);
    if (e.flipped) flip(body, k);
    std::string bytes = protocol::encode(protocol::Receipt{id, body});
    crafted_[bytes] = {e};
    inject_from(bytes, r->to, src);
  }

  void table_op(int src, Reader& in) {
    const std::uint8_t mask = in.byte();
    const std::uint8_t imp = in.byte();
    const std::uint8_t off = in.byte();
    const std::uint8_t mode = in.byte();
    // One for another client (which "me" does not apply) leaves the table the harness tracks.
    const int recipient = (mode >> 4) & 7;
    const std::uint64_t epoch = (mode & 1) == 0 && table_sent_ ? epoch_ + 1 : epoch_;
    const std::uint64_t from = (mode & 1) == 0 || !table_sent_ ? 0 : version_;
    protocol::Table t{next_id(), Cast::get().name(recipient), epoch, from, 0, (mode & 2) != 0, {}};
    for (int i = 0; i < kPeers; ++i)
      if ((mask >> i & 1) != 0) t.entries.push_back(entry_of(i, (imp >> i & 1) != 0, (off >> i & 1) == 0));
    t.to = from + std::max<std::uint64_t>(1, t.entries.size());
    if (recipient == 0) {
      epoch_ = epoch;
      version_ = t.to;
      table_sent_ = true;
    }
    inject_crafted(t, {}, src);
  }

  void replay_op(int src, std::uint8_t n) {
    const auto& history = (n & 0x80) != 0 ? sent_ : injected_;
    if (history.empty()) return;
    std::string again = history[(n & 0x7F) % history.size()];
    inject_from(again, source(src), src);
  }

  transport::Core& core_;
  transport::ManualClock& clock_;
  identity::TokenMinter minter_;
  std::vector<Sent> pending_;  // requests sent and not yet answered by the input
  std::string last_from_[kSources];
  std::string last_challenge_[kSources];  // the token of the last Challenge sent to each source
  std::deque<std::string> injected_;      // the last kHistory datagrams injected
  std::deque<std::string> sent_;          // the last kHistory datagrams the core sent
  std::map<std::string, std::vector<Expect>> crafted_;
  std::uint64_t next_id_ = 1'000'000;
  std::uint64_t epoch_ = 7;
  std::uint64_t version_ = 0;
  bool table_sent_ = false;
};

}  // namespace chat::fuzz
