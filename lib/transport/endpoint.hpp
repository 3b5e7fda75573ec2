// One UDP socket on one io_context: the receive loop, reliable requests, replies and duplicates.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>

#include "protocol/codec.hpp"
#include "transport/dedup.hpp"
#include "transport/net.hpp"

namespace chat::transport {

/// How a reliable request is retried: wait `timeout` for the reply, resend, `retries` times.
struct RetryPolicy {
  std::chrono::milliseconds timeout{500};
  int retries = 5;
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

/// What the endpoint counted; dropped datagrams by reason.
struct Counters {
  std::uint64_t received = 0;
  std::uint64_t sent = 0;
  std::uint64_t bytes_sent = 0;
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

/// The single UDP socket of a process. Single-threaded: every call runs on the io_context's thread.
class Endpoint {
 public:
  /// Called with each fresh request (never a repeat) and with nothing else.
  using Handler = std::function<void(const protocol::Message&, const udp::endpoint& from)>;
  /// Called once per request: with the matching reply, or nullptr after the last retry.
  using Done = std::function<void(const protocol::Message* reply)>;

  /// Binds the socket; throws boost::system::system_error if it cannot (port in use...).
  Endpoint(net::io_context& io, const udp::endpoint& bind, RetryPolicy policy, Guard guard = {});
  Endpoint(const Endpoint&) = delete;
  Endpoint& operator=(const Endpoint&) = delete;
  ~Endpoint();

  /// Starts the receive loop.
  void start(Handler handler);
  /// Stops receiving and abandons every pending request (their Done is not called).
  void close();

  /// A fresh request id, unique in this process and unlikely to repeat across restarts.
  std::uint64_t next_id();
  /// Sends `request` (whose id must be set) reliably to `to`; `done` gets the reply.
  void request(const protocol::Message& request, const udp::endpoint& to, Done done);
  void request(const protocol::Message& request, const udp::endpoint& to, Done done,
               RetryPolicy policy);
  /// As request(), for a request already encoded (whose id is `id`): a fan-out encodes once.
  void request_encoded(std::uint64_t id, std::string bytes, const udp::endpoint& to, Done done,
                       RetryPolicy policy);
  /// Sends a reply, remembered so that a repeat of the request gets it again.
  void reply(const udp::endpoint& to, const protocol::Message& reply);
  /// Leaves the request (from, id) unanswered, so a repeat of it is handed up again.
  void forget(const udp::endpoint& from, std::uint64_t id);
  /// Sends once, no reply expected.
  void send(const protocol::Message& m, const udp::endpoint& to);
  /// Sends already-encoded bytes once; false if not sent.
  bool send_bytes(const std::string& bytes, const udp::endpoint& to);
  /// Bytes that may still be sent to `to` before it proves it receives (SIZE_MAX if it has).
  std::size_t allowance(const udp::endpoint& to) const;

  /// Test seam: handles `bytes` as if they had arrived from `from` (fuzzing, replays).
  void inject(std::string_view bytes, const udp::endpoint& from);
  /// Test seam: when set, every datagram goes to the hook instead of the socket.
  using SendHook = std::function<void(const std::string& bytes, const udp::endpoint& to)>;
  void set_send_hook(SendHook hook) { send_hook_ = std::move(hook); }

  udp::endpoint local_endpoint() const { return socket_.local_endpoint(); }
  const Counters& counters() const { return counters_; }
  const RetryPolicy& policy() const { return policy_; }
  std::size_t in_flight() const { return pending_.size(); }
  net::io_context& io() { return io_; }

 private:
  struct Pending {
    Pending(net::io_context& io, const udp::endpoint& t, std::string b, Done d, RetryPolicy p)
        : to(t), bytes(std::move(b)), done(std::move(d)), policy(p), timer(io) {}
    udp::endpoint to;
    std::string bytes;
    Done done;
    RetryPolicy policy;
    int tries = 0;
    net::steady_timer timer;
  };

  void receive();
  void on_datagram(std::string_view bytes, const udp::endpoint& from);
  void transmit(std::uint64_t id, Pending& p);
  void on_timeout(std::uint64_t id);
  void release(std::unordered_map<std::uint64_t, Pending>::iterator it);
  static RequestKey key_of(const udp::endpoint& from, std::uint64_t id);
  static std::uint64_t addr_key(const udp::endpoint& e);
  bool admit_rate(const udp::endpoint& from, Clock::time_point now);
  bool log_allowed();
  template <class F>
  void guarded(const char* what, F&& f);

  // Per-address accounting for the amplification limit and the rate limit.
  struct Route {
    std::uint64_t in = 0;
    std::uint64_t out = 0;
    bool validated = false;
    double tokens = 0;
    Clock::time_point refill{};
  };
  Route* route(const udp::endpoint& e);

  net::io_context& io_;
  udp::socket socket_;
  RetryPolicy policy_;
  Guard guard_;
  Handler handler_;
  SendHook send_hook_;
  std::uint64_t id_counter_ = 0;
  std::uint64_t id_secret_;
  std::unordered_map<std::uint64_t, Route> routes_;
  std::unordered_map<std::uint64_t, std::size_t> in_flight_to_;
  std::unordered_map<std::uint64_t, Pending> pending_;
  DuplicateFilter dedup_;
  Counters counters_;
  udp::endpoint sender_;
  std::array<char, 2048> buffer_{};  // larger than kMaxDatagram, so an oversized datagram shows
  bool closed_ = false;
  Clock::time_point log_window_{};
  int logged_ = 0;
};

}  // namespace chat::transport
