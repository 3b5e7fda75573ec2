// The transport's decisions without a socket or a real clock: reliable requests, replies,
// duplicates, flood limits and timers. A driver (Endpoint, or a simulation) feeds it
// datagrams and the time, and carries out the sends it asks for.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "protocol/codec.hpp"
#include "transport/clock.hpp"
#include "transport/dedup.hpp"
#include "transport/net.hpp"

namespace chat::transport {

/// How a reliable request is retried: wait `timeout` for the reply, resend, `retries` times.
struct RetryPolicy {
  std::chrono::milliseconds timeout{500};
  int retries = 5;
  /// The whole time a request may take before it is given up.
  Duration span() const { return timeout * (retries + 1); }
  /// The same number of tries within `total` (each wait at least 1 ms).
  RetryPolicy within(Duration total) const;
};

/// Protections a server turns on against floods and spoofed sources.
struct Guard {
  /// Datagrams per second accepted from one address (ip:port); 0 = unlimited.
  double rate_limit = 0;
  /// Never send an address more than this many times the bytes received from it until it
  /// has proven it receives (answered one of our requests); 0 = off.
  double amplification = 0;
  /// Reliable requests in flight to one address at most; more fail at once.
  std::size_t max_in_flight = 4096;
};

struct CoreOptions {
  RetryPolicy policy;
  Guard guard;
  /// Seeds request ids and random(); 0 takes a random seed (a simulation passes its own).
  std::uint64_t seed = 0;
};

/// What the core counted; dropped datagrams by reason.
struct Counters {
  std::uint64_t received = 0;
  std::uint64_t sent = 0;
  std::uint64_t bytes_sent = 0;
  std::uint64_t bytes_resent = 0;  // of bytes_sent: retransmissions and answers repeated to repeats
  std::uint64_t bytes_received = 0;
  std::uint64_t send_failed = 0;
  std::uint64_t retransmits = 0;
  std::uint64_t gave_up = 0;
  std::uint64_t duplicates = 0;
  std::uint64_t unmatched_replies = 0;
  std::uint64_t rate_limited = 0;      // dropped: the source sent too fast
  std::uint64_t amplification = 0;     // not sent: the address has not proven it receives
  std::uint64_t in_flight_refused = 0; // requests failed at once: too many to one address
  std::array<std::uint64_t, static_cast<std::size_t>(protocol::DecodeError::count_)> refused{};
  std::uint64_t refused_total() const;
};

/// One process's reliable-datagram state. Single-threaded; never touches a socket or a clock
/// of its own: datagrams come in through on_datagram(), time through the TimeSource and
/// on_timer(), and datagrams go out through the Output.
class Core {
 public:
  /// Called with each fresh request (never a repeat) and with nothing else.
  using Handler = std::function<void(const protocol::Message&, const udp::endpoint& from)>;
  /// Called once per request: with the matching reply, or nullptr after the last retry.
  using Done = std::function<void(const protocol::Message* reply)>;
  /// Carries one datagram out; false if it could not be sent.
  using Output = std::function<bool(const std::string& bytes, const udp::endpoint& to)>;
  /// Carries several datagrams to one address out in one go (sendmmsg), each as Output would
  /// (one that fails does not stop the others); how many were sent.
  using BatchOutput = std::function<std::size_t(std::span<const std::string> datagrams, const udp::endpoint& to)>;
  /// Told when work appeared outside a driver's turn: a timer earlier than before, or deferred work.
  using Wakeup = std::function<void()>;
  using TimerId = std::uint64_t;
  /// Gets each file frame (protocol::is_frame), undecoded: bytes and source.
  using FrameHandler = std::function<void(std::string_view bytes, const udp::endpoint& from)>;

  Core(CoreOptions options, const TimeSource& clock);
  Core(const Core&) = delete;
  Core& operator=(const Core&) = delete;

  void set_handler(Handler h) { handler_ = std::move(h); }
  void set_output(Output o) { output_ = std::move(o); }
  /// Optional: without one, send_many() sends through the Output one by one.
  void set_batch_output(BatchOutput o) { batch_output_ = std::move(o); }
  void set_wakeup(Wakeup w) { wakeup_ = std::move(w); }
  /// Without one, a file frame is refused like any datagram of an unknown type.
  void set_frame_handler(FrameHandler h) { frame_handler_ = std::move(h); }

  // ---- inputs, from the driver
  /// Handles one datagram that arrived from `from`.
  void on_datagram(std::string_view bytes, const udp::endpoint& from);
  /// Runs every timer that is due now, earliest first.
  void on_timer();
  /// Runs the work deferred to the end of this turn (group commits, table passes) until none is left.
  void settle();
  /// When on_timer() (or settle(), if work is deferred) should next be called; none if idle.
  std::optional<Time> next_deadline() const;
  /// Abandons every pending request (their Done is not called), timer and deferred task, and
  /// sends nothing more.
  void close();

  // ---- for the roles
  Time now() const { return clock_.now(); }
  std::int64_t wall_us() const { return clock_.wall_us(); }
  /// A fresh request id, unique in this process and unlikely to repeat across restarts.
  std::uint64_t next_id();
  /// A pseudo-random number from this core's seed (jitter, epochs).
  std::uint64_t random();
  /// Sends `request` (whose id must be set) reliably to `to`; `done` gets the reply.
  void request(const protocol::Message& request, const udp::endpoint& to, Done done);
  void request(const protocol::Message& request, const udp::endpoint& to, Done done, RetryPolicy policy);
  /// As request(), for a request already encoded (whose id is `id`): a fan-out encodes once.
  void request_encoded(std::uint64_t id, std::string bytes, const udp::endpoint& to, Done done,
                       RetryPolicy policy);
  /// Sends a reply, remembered so that a repeat of the request gets it again.
  void reply(const udp::endpoint& to, const protocol::Message& reply);
  /// Drops our pending request `id` (no more copies, its Done never called); unknown ids are ignored.
  void abandon(std::uint64_t id);
  /// Leaves the request (from, id) unanswered, so a repeat of it is handed up again.
  void forget(const udp::endpoint& from, std::uint64_t id);
  /// Sends already-encoded bytes once; false if not sent.
  bool send_bytes(const std::string& bytes, const udp::endpoint& to);
  /// Sends each of `datagrams` once to `to`, in order, as send_bytes() would (the same limits and
  /// counters), in one go through the BatchOutput if there is one; how many were sent.
  std::size_t send_many(std::span<const std::string> datagrams, const udp::endpoint& to);
  /// Bytes that may still be sent to `to` before it proves it receives (SIZE_MAX if it has).
  std::size_t allowance(const udp::endpoint& to) const;
  /// `to` has proven it receives by other means (it echoed a token only it was sent).
  void validate(const udp::endpoint& to);
  /// Calls `f` at `when` (or at the next on_timer() if that has passed).
  TimerId at(Time when, std::function<void()> f);
  TimerId after(Duration d, std::function<void()> f) { return at(now() + d, std::move(f)); }
  /// Cancels a timer that has not fired; unknown ids are ignored.
  void cancel(TimerId id);
  /// Runs `f` at the end of this turn, after the datagrams that arrived together.
  void defer(std::function<void()> f);

  const Counters& counters() const { return counters_; }
  const RetryPolicy& policy() const { return options_.policy; }
  /// Requests waiting for a reply.
  std::size_t in_flight() const { return pending_.size(); }
  /// How long a request id is remembered: past the last retry of any sender using our policy.
  Duration dedup_window() const;

 private:
  struct Pending {
    udp::endpoint to;
    std::string bytes;
    Done done;
    RetryPolicy policy;
    int tries = 0;
    TimerId timer = 0;
  };
  // Per-address accounting for the amplification limit and the rate limit.
  struct Route {
    std::uint64_t in = 0;
    std::uint64_t out = 0;
    bool validated = false;
    double tokens = 0;
    Time refill{};
  };

  void refuse_v1(std::string_view bytes, const udp::endpoint& from);
  void transmit(std::uint64_t id, Pending& p);
  void on_timeout(std::uint64_t id);
  void release(std::unordered_map<std::uint64_t, Pending>::iterator it);
  static RequestKey key_of(const udp::endpoint& from, std::uint64_t id);
  static std::uint64_t addr_key(const udp::endpoint& e);
  bool admit_rate(const udp::endpoint& from);
  Route* route(const udp::endpoint& e);
  bool log_allowed();
  void wake();
  template <class F>
  void guarded(const char* what, F&& f);

  CoreOptions options_;
  const TimeSource& clock_;
  Handler handler_;
  FrameHandler frame_handler_;
  Output output_;
  BatchOutput batch_output_;
  Wakeup wakeup_;
  std::uint64_t id_counter_ = 0;
  std::uint64_t id_secret_;
  std::uint64_t rng_;
  std::unordered_map<std::uint64_t, Route> routes_;
  std::unordered_map<std::uint64_t, std::size_t> in_flight_to_;
  std::unordered_map<std::uint64_t, Pending> pending_;
  DuplicateFilter dedup_;
  Counters counters_;
  // One ordered structure for every timer (retransmissions included), not a timer object each.
  std::map<std::pair<Time, TimerId>, std::function<void()>> timers_;
  std::unordered_map<TimerId, Time> timer_due_;
  TimerId timer_counter_ = 0;
  std::vector<std::function<void()>> deferred_;
  bool closed_ = false;
  Time log_window_{};
  int logged_ = 0;
};

}  // namespace chat::transport
