// The Asio driver: the receive loop, one timer for all of a core's deadlines, sends to the socket.
#include "transport/endpoint.hpp"

#include <spdlog/spdlog.h>

namespace chat::transport {
namespace {

// Datagrams read synchronously after one asynchronous completion, before the turn ends. The
// turn's saves share one commit: at 64 a commit took ~53 saves and durable saves ran at ~18,000/s,
// at 1,024 at ~40,000/s (bench store, 800 in flight; issue 13).
constexpr int kReadBurst = 1024;
// Socket buffer asked for, so bursts (fan-out, table snapshots) are not dropped by the kernel.
constexpr int kSocketBuffer = 4 << 20;

void grow_buffers(udp::socket& s) {
  int fd = s.native_handle();
  int size = kSocketBuffer;
  // FORCE works as root and ignores rmem_max; otherwise take what the kernel allows.
  if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) != 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) != 0)
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
}

}  // namespace

const TimeSource& system_clock() {
  static const SystemClock clock;
  return clock;
}

Endpoint::Endpoint(net::io_context& io, Core& core, const udp::endpoint& bind)
    : io_(io), core_(core), socket_(io), timer_(io) {
  socket_.open(bind.protocol());
  socket_.bind(bind);
  socket_.non_blocking(true);
  grow_buffers(socket_);
  core_.set_output([this](const std::string& bytes, const udp::endpoint& to) { return send(bytes, to); });
  // Work that appears outside a turn (a test's request, a reply callback elsewhere) still
  // gets its timer armed: once, after the current handler.
  core_.set_wakeup([this] {
    if (in_turn_ || turn_posted_ || closed_) return;
    turn_posted_ = true;
    net::post(io_, [this] {
      turn_posted_ = false;
      finish_turn();
    });
  });
}

Endpoint::~Endpoint() {
  close();
  core_.set_output({});
  core_.set_wakeup({});
}

void Endpoint::start() { receive(); }

void Endpoint::close() {
  if (closed_) return;
  closed_ = true;
  core_.close();
  error_code ec;
  socket_.close(ec);
  timer_.cancel();
}

bool Endpoint::send(const std::string& bytes, const udp::endpoint& to) {
  error_code ec;
  socket_.send_to(net::buffer(bytes), to, 0, ec);
  if (ec) {
    spdlog::debug("send to {}:{} failed: {}", to.address().to_string(), to.port(), ec.message());
    return false;
  }
  return true;
}

void Endpoint::receive() {
  socket_.async_receive_from(net::buffer(buffer_), sender_, [this](error_code ec, std::size_t n) {
    if (ec == net::error::operation_aborted || closed_) return;
    in_turn_ = true;
    try {
      if (ec) {
        // An ICMP error or a transient failure must not end the loop.
        spdlog::debug("receive error: {}", ec.message());
      } else {
        core_.on_datagram(std::string_view(buffer_.data(), n), sender_);
        // Drain what is already queued without another trip through the reactor.
        for (int i = 0; i < kReadBurst && !closed_; ++i) {
          error_code rec;
          std::size_t m = socket_.receive_from(net::buffer(buffer_), sender_, 0, rec);
          if (rec) break;
          core_.on_datagram(std::string_view(buffer_.data(), m), sender_);
        }
      }
    } catch (const std::exception& e) {
      // The core guards its handlers; this is what escaped anyway (out of memory): the loop
      // must go on receiving.
      spdlog::error("receiving failed: {}", e.what());
    }
    finish_turn();
    if (!closed_) receive();
  });
}

void Endpoint::finish_turn() {
  in_turn_ = true;
  core_.settle();
  in_turn_ = false;
  arm();
}

void Endpoint::arm() {
  if (closed_) return;
  std::optional<Time> next = core_.next_deadline();
  if (next == armed_) return;
  armed_ = next;
  if (!next) {
    timer_.cancel();
    return;
  }
  timer_.expires_at(*next);
  timer_.async_wait([this](error_code ec) {
    if (ec || closed_) return;
    armed_.reset();
    in_turn_ = true;
    core_.on_timer();
    finish_turn();
  });
}

Socket::Socket(net::io_context& io, const udp::endpoint& bind, RetryPolicy policy, Guard guard)
    : Core(CoreOptions{policy, guard, 0}, system_clock()), endpoint_(io, *this, bind) {}

void Socket::start(Handler handler) {
  set_handler(std::move(handler));
  endpoint_.start();
}

}  // namespace chat::transport
