// The UDP endpoint: receive loop, reliable requests with retries, replies remembered for repeats.
#include "transport/endpoint.hpp"

#include <spdlog/spdlog.h>

#include <random>

namespace chat::transport {
namespace {

// How long a request id is remembered: well past the sender's last retry.
constexpr auto kDedupWindow = std::chrono::seconds(30);
// How many request ids are remembered at most (bounded memory under floods).
constexpr std::size_t kDedupCapacity = 200'000;
// Datagrams read synchronously after one asynchronous completion, before yielding.
constexpr int kReadBurst = 64;
// Socket buffer asked for, so bursts (fan-out, table snapshots) are not dropped by the kernel.
constexpr int kSocketBuffer = 4 << 20;

std::uint64_t random_start() {
  std::random_device rd;
  std::uint64_t v = (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  return (v >> 2) | 1;  // far from wrap-around, never 0
}

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

std::uint64_t Counters::refused_total() const {
  std::uint64_t n = 0;
  for (auto c : refused) n += c;
  return n;
}

Endpoint::Endpoint(net::io_context& io, const udp::endpoint& bind, RetryPolicy policy)
    : io_(io),
      socket_(io),
      policy_(policy),
      next_id_(random_start()),
      dedup_(kDedupCapacity, kDedupWindow) {
  socket_.open(bind.protocol());
  socket_.bind(bind);
  socket_.non_blocking(true);
  grow_buffers(socket_);
}

Endpoint::~Endpoint() { close(); }

void Endpoint::start(Handler handler) {
  handler_ = std::move(handler);
  receive();
}

void Endpoint::close() {
  if (closed_) return;
  closed_ = true;
  error_code ec;
  socket_.close(ec);
  pending_.clear();  // destroys the timers; their handlers see operation_aborted
}

void Endpoint::receive() {
  socket_.async_receive_from(net::buffer(buffer_), sender_, [this](error_code ec, std::size_t n) {
    if (ec == net::error::operation_aborted || closed_) return;
    if (ec) {
      // An ICMP error or a transient failure must not end the loop.
      spdlog::debug("receive error: {}", ec.message());
    } else {
      on_datagram(n, sender_);
      // Drain what is already queued without another trip through the reactor.
      for (int i = 0; i < kReadBurst && !closed_; ++i) {
        error_code rec;
        std::size_t m = socket_.receive_from(net::buffer(buffer_), sender_, 0, rec);
        if (rec) break;
        on_datagram(m, sender_);
      }
    }
    if (!closed_) receive();
  });
}

RequestKey Endpoint::key_of(const udp::endpoint& from, std::uint64_t id) {
  std::uint32_t addr = from.address().is_v4() ? from.address().to_v4().to_uint() : 0;
  return RequestKey{addr, from.port(), id};
}

void Endpoint::on_datagram(std::size_t n, const udp::endpoint& from) {
  ++counters_.received;
  counters_.bytes_received += n;
  protocol::Decoded d = n > protocol::kMaxDatagram
                            ? protocol::Decoded{std::nullopt, protocol::DecodeError::too_large}
                            : protocol::decode(std::string_view(buffer_.data(), n));
  if (!d) {
    ++counters_.refused[static_cast<std::size_t>(d.error)];
    spdlog::debug("dropped {} bytes from {}:{}: {}", n, from.address().to_string(), from.port(),
                  protocol::to_string(d.error));
    return;
  }
  const protocol::Message& m = *d.message;
  if (std::uint64_t re = protocol::reply_to(m)) {
    auto it = pending_.find(re);
    if (it == pending_.end() || it->second.to != from) {
      // Late (already answered), or from an address the request did not go to.
      ++counters_.unmatched_replies;
      return;
    }
    Done done = std::move(it->second.done);
    pending_.erase(it);
    if (done) done(&m);
    return;
  }
  const std::string* cached = nullptr;
  switch (dedup_.check(key_of(from, protocol::request_id(m)), Clock::now(), &cached)) {
    case DuplicateFilter::Seen::fresh:
      if (handler_) handler_(m, from);
      break;
    case DuplicateFilter::Seen::pending:
      ++counters_.duplicates;  // still being worked on; the answer will come
      break;
    case DuplicateFilter::Seen::answered:
      ++counters_.duplicates;
      send_bytes(*cached, from);
      break;
  }
}

void Endpoint::request(const protocol::Message& request, const udp::endpoint& to, Done done) {
  this->request(request, to, std::move(done), policy_);
}

void Endpoint::request(const protocol::Message& request, const udp::endpoint& to, Done done,
                       RetryPolicy policy) {
  std::uint64_t id = protocol::request_id(request);
  auto [it, inserted] =
      pending_.try_emplace(id, io_, to, protocol::encode(request), std::move(done), policy);
  if (!inserted) {
    // The caller reused an id still in flight: keep the first, fail this one at once.
    spdlog::warn("request id {} already in flight", id);
    return;
  }
  transmit(id, it->second);
}

void Endpoint::transmit(std::uint64_t id, Pending& p) {
  if (p.tries > 0) ++counters_.retransmits;
  ++p.tries;
  send_bytes(p.bytes, p.to);
  p.timer.expires_after(p.policy.timeout);
  p.timer.async_wait([this, id](error_code ec) {
    if (!ec) on_timeout(id);
  });
}

void Endpoint::on_timeout(std::uint64_t id) {
  auto it = pending_.find(id);
  if (it == pending_.end()) return;
  Pending& p = it->second;
  if (p.tries <= p.policy.retries) {
    transmit(id, p);
    return;
  }
  ++counters_.gave_up;
  Done done = std::move(p.done);
  pending_.erase(it);
  if (done) done(nullptr);
}

void Endpoint::reply(const udp::endpoint& to, const protocol::Message& reply) {
  std::string bytes = protocol::encode(reply);
  send_bytes(bytes, to);
  dedup_.answer(key_of(to, protocol::reply_to(reply)), std::move(bytes));
}

void Endpoint::forget(const udp::endpoint& from, std::uint64_t id) { dedup_.forget(key_of(from, id)); }

void Endpoint::send(const protocol::Message& m, const udp::endpoint& to) {
  send_bytes(protocol::encode(m), to);
}

void Endpoint::send_bytes(const std::string& bytes, const udp::endpoint& to) {
  if (closed_) return;
  error_code ec;
  socket_.send_to(net::buffer(bytes), to, 0, ec);
  if (ec) {
    // Non-blocking: a full buffer drops the datagram, as the network could; retries recover.
    ++counters_.send_failed;
    spdlog::debug("send to {}:{} failed: {}", to.address().to_string(), to.port(), ec.message());
    return;
  }
  ++counters_.sent;
  counters_.bytes_sent += bytes.size();
}

}  // namespace chat::transport
