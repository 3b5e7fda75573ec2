// What the core-driving fuzz targets share: the input's op stream, the fake network and clock.
//
// An input is a sequence of ops. Each op starts with one byte b: its source is b % 8 (one of
// the fake addresses below) and its kind is (b / 8) % 7:
//   datagram     [b][len hi][len lo][len bytes]  inject the bytes as if they came from the source
//   answer       [b]        answer the latest unanswered request sent to the source, as a
//                           well-behaved peer would (Ack; Table -> Ack{re, epoch, have=to};
//                           Register -> RegOk; KeepAlive -> Alive{live}; Lookup -> Found)
//   answer_all   [b]        answer every unanswered request, oldest first
//   answer_with  [b][sel]   answer the latest request sent to the source with the reply `sel`
//                           picks (see reply_for), from the right or a wrong address, or drop it
//   repeat       [b]        inject again the last datagram that came from the source
//   extra        [b]...     target-specific (server: store faults; client: a typed line, EOF)
//   advance      [b][t]     move the fake clock on by advance_by(t) (1 ms to 2 min) and run the
//                           timers that are due: retransmissions, give-ups, probes, keep-alives
//                           and their expiry, the client's ready timer
// Reads past the end give zeros, so every byte string is a valid input. The cores run on the
// fake clock and send only to the fake network: no socket, no real time, so an input behaves
// the same every time it runs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <spdlog/sinks/null_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

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

enum class Op : std::uint8_t { datagram, answer, answer_all, answer_with, repeat, extra, advance, count_ };

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

/// Bits of answer_with's selector beyond the reply kind (its low 3 bits).
inline constexpr std::uint8_t kFromWrongAddress = 0x08;  // reply from the next source instead
inline constexpr std::uint8_t kDrop = 0x10;              // lose the request: never answer it

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

/// The reply a well-behaved receiver gives to `req`.
// TODO(v2): a v2 server answers a Register without a token with a Challenge (and RegOk only
// to a Register with the token and a valid proof), and a peer answers a Direct with a sealed
// Receipt, not an Ack; Entry/StoredItem keys are zero here. To be extended with the crypto
// paths once the server and client implement them.
inline protocol::Message right_answer(const protocol::Message& req) {
  namespace p = protocol;
  std::uint64_t id = p::request_id(req);
  if (const auto* t = std::get_if<p::Table>(&req)) return p::Ack{id, t->epoch, t->to};
  if (std::get_if<p::Register>(&req)) return p::RegOk{id, 7, 0};
  if (std::get_if<p::KeepAlive>(&req)) return p::Alive{id, true};
  if (const auto* l = std::get_if<p::Lookup>(&req)) return p::Found{id, true, p::Entry{l->name, "127.0.0.3", 4003, true}};
  return p::Ack{id};
}

/// The reply answer_with's selector picks (low 3 bits) for `req`: right or wrong kinds.
inline protocol::Message reply_for(const protocol::Message& req, std::uint8_t sel) {
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
    case 6: return p::RegOk{id, 7, 1};
    default:
      if (std::get_if<p::KeepAlive>(&req)) return p::Alive{id, false};  // the server lost track
      return p::Exists{id, name};
  }
}

/// The fake network and clock around one core: its output captures every datagram and
/// remembers the requests among them, answered or repeated on the input's demand.
class FakeNetwork {
 public:
  FakeNetwork(transport::Core& core, transport::ManualClock& clock) : core_(core), clock_(clock) {
    core_.set_output([this](const std::string& bytes, const udp::endpoint& to) {
      on_send(bytes, to);
      return true;
    });
  }
  FakeNetwork(const FakeNetwork&) = delete;
  FakeNetwork& operator=(const FakeNetwork&) = delete;
  ~FakeNetwork() { core_.set_output({}); }

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
  void inject(std::string_view bytes, int src) { inject_from(bytes, source(src), src); }

  void answer(int src) {
    if (auto r = take_latest(source(src))) inject_from(protocol::encode(right_answer(r->msg)), r->to, src);
  }

  void answer_all() {
    // Answering may send new requests: only those pending now are answered, in order.
    std::vector<Sent> now;
    now.swap(pending_);
    for (const auto& r : now) {
      inject_from(protocol::encode(right_answer(r.msg)), r.to, -1);
    }
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

 private:
  struct Sent {
    udp::endpoint to;
    protocol::Message msg;
  };

  static std::string where(const udp::endpoint& e) {
    return e.address().to_string() + ":" + std::to_string(e.port());
  }

  // The answer Core gives a version-1 request (protocol::v1_refusal): JSON, for old peers.
  static bool is_v1_refusal(const std::string& bytes) {
    const std::string tail = std::string(protocol::kV1RefusalReason).append("\"}");
    return bytes.rfind("{\"v\":1,\"t\":\"", 0) == 0 && bytes.size() > tail.size() &&
           bytes.compare(bytes.size() - tail.size(), tail.size(), tail) == 0;
  }

  void on_send(const std::string& bytes, const udp::endpoint& to) {
    if (tracing()) std::fprintf(stderr, "  sent to %s: %s\n", where(to).c_str(), printable(bytes).c_str());
    if (bytes.size() > protocol::kMaxDatagram) {
      std::fprintf(stderr, "sent a datagram of %zu bytes (limit %zu): %s\n", bytes.size(),
                   protocol::kMaxDatagram, printable(bytes).c_str());
      std::abort();
    }
    protocol::Decoded d = protocol::decode(bytes);
    if (!d && d.error == protocol::DecodeError::old_version && is_v1_refusal(bytes)) return;
    if (!d) {
      // What one side sends, the other must accept: anything else is a bug in the sender.
      std::fprintf(stderr, "sent a datagram its peer refuses (%s): %s\n",
                   protocol::to_string(d.error), printable(bytes).c_str());
      std::abort();
    }
    if (protocol::request_id(*d.message) != 0) pending_.push_back({to, std::move(*d.message)});
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
    if (tracing()) std::fprintf(stderr, "inject from %s: %s\n", where(from).c_str(), printable(bytes).c_str());
    core_.on_datagram(bytes, from);
    core_.settle();
  }
  void inject_from(std::string_view bytes, const udp::endpoint& from, int src) {
    inject_from(std::string(bytes), from, src);
  }

  transport::Core& core_;
  transport::ManualClock& clock_;
  std::vector<Sent> pending_;  // requests sent and not yet answered by the input
  std::string last_from_[kSources];
};

}  // namespace chat::fuzz
