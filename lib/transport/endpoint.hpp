// The Asio side of the transport: one UDP socket and one timer that carry out what a Core decides.
#pragma once

#include <memory>
#include <optional>
#include <span>
#include <string>

#include "transport/core.hpp"
#include "transport/net.hpp"

namespace chat::transport {

/// Drives a Core on an io_context: datagrams from the socket, the core's next deadline on one
/// steady_timer, the core's sends onto the socket. Single-threaded, like the core.
class Endpoint {
 public:
  /// Binds the socket; throws boost::system::system_error if it cannot (port in use...).
  Endpoint(net::io_context& io, Core& core, const udp::endpoint& bind);
  Endpoint(const Endpoint&) = delete;
  Endpoint& operator=(const Endpoint&) = delete;
  ~Endpoint();

  /// Starts the receive loop.
  void start();
  /// Stops receiving, closes the core and the socket.
  void close();
  /// Runs `f` as one turn of the core (a prompt line, a signal): deferred work, then the timer.
  template <class F>
  void turn(F&& f) {
    f();
    finish_turn();
  }

  udp::endpoint local_endpoint() const { return socket_.local_endpoint(); }

 private:
  /// Waits for the socket to be readable, then drains it: all reading is drain()'s.
  void receive();
  /// Hands the core every datagram already queued (up to kReadBurst), recvmmsg by recvmmsg; a
  /// buffer the kernel coalesced (UDP GRO) goes to the core as the datagrams it was made of.
  void drain();
  void finish_turn();
  void arm();
  bool send(const std::string& bytes, const udp::endpoint& to);
  /// Runs of equal-sized datagrams as one UDP GSO send each while the kernel takes them, else
  /// one sendmmsg entry per datagram.
  std::size_t send_many(std::span<const std::string> datagrams, const udp::endpoint& to);
  std::size_t send_each(std::span<const std::string> datagrams, const udp::endpoint& to);

  net::io_context& io_;
  Core& core_;
  udp::socket socket_;
  net::steady_timer timer_;
  std::optional<Time> armed_;  // the deadline the timer waits for
  bool turn_posted_ = false;
  bool in_turn_ = false;
  bool closed_ = false;
  bool gso_ = false;  // the kernel takes UDP_SEGMENT on this socket (until it refuses one)
  udp::endpoint sender_;
  struct Batch;  // the buffers of one recvmmsg
  std::unique_ptr<Batch> batch_;
};

/// A Core with its own Endpoint: a bare reliable socket for tools, benches and transport tests.
class Socket : public Core {
 public:
  Socket(net::io_context& io, const udp::endpoint& bind, RetryPolicy policy, Guard guard = {});
  /// Starts the receive loop; `handler` gets each fresh request.
  void start(Handler handler);
  /// Stops receiving and abandons every pending request (their Done is not called).
  void close() { endpoint_.close(); }
  udp::endpoint local_endpoint() const { return endpoint_.local_endpoint(); }

 private:
  Endpoint endpoint_;
};

/// The machine's clocks, shared by every core of the process.
const TimeSource& system_clock();

}  // namespace chat::transport
