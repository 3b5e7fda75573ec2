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

// Addresses tracked for the rate and amplification limits before stale ones are dropped.
constexpr std::size_t kMaxRoutes = 100'000;
// Per-datagram debug lines logged per second at most.
constexpr int kLogPerSecond = 20;
// Bytes an address that never sent anything may still get (a few probes).
constexpr std::uint64_t kGraceBytes = 256;

std::uint64_t random_u64() {
  std::random_device rd;
  return (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
}

// A bijection on 64-bit integers (SplitMix64's finaliser): distinct inputs give distinct ids,
// and a peer that saw some ids cannot guess the next one to forge an ACK.
std::uint64_t mix(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
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

Endpoint::Endpoint(net::io_context& io, const udp::endpoint& bind, RetryPolicy policy, Guard guard)
    : io_(io),
      socket_(io),
      policy_(policy),
      guard_(guard),
      id_secret_(random_u64()),
      dedup_(kDedupCapacity, kDedupWindow) {
  socket_.open(bind.protocol());
  socket_.bind(bind);
  socket_.non_blocking(true);
  grow_buffers(socket_);
}

Endpoint::~Endpoint() { close(); }

std::uint64_t Endpoint::next_id() {
  for (;;) {
    std::uint64_t id = mix(++id_counter_ ^ id_secret_);
    if (id != 0) return id;  // 0 means "no id" on the wire
  }
}

bool Endpoint::log_allowed() {
  // At most kLogPerSecond lines a second: a flood is summarised by the counters instead.
  auto now = Clock::now();
  if (now - log_window_ > std::chrono::seconds(1)) {
    log_window_ = now;
    logged_ = 0;
  }
  return logged_++ < kLogPerSecond;
}

std::uint64_t Endpoint::addr_key(const udp::endpoint& e) {
  std::uint64_t a = e.address().is_v4() ? e.address().to_v4().to_uint() : 0;
  return a << 16 | e.port();
}

Endpoint::Route* Endpoint::route(const udp::endpoint& e) {
  if (guard_.rate_limit <= 0 && guard_.amplification <= 0) return nullptr;
  if (routes_.size() >= kMaxRoutes) {
    // Bounded memory under a spoofed-source flood: forget the unproven; keep the proven.
    std::erase_if(routes_, [](const auto& kv) { return !kv.second.validated; });
  }
  return &routes_[addr_key(e)];
}

bool Endpoint::admit_rate(const udp::endpoint& from, Clock::time_point now) {
  if (guard_.rate_limit <= 0) return true;
  Route* r = route(from);
  double burst = guard_.rate_limit;  // one second's worth
  if (r->refill == Clock::time_point{}) r->tokens = burst;
  else r->tokens = std::min(burst, r->tokens + std::chrono::duration<double>(now - r->refill).count() * guard_.rate_limit);
  r->refill = now;
  if (r->tokens < 1) return false;
  r->tokens -= 1;
  return true;
}

std::size_t Endpoint::allowance(const udp::endpoint& to) const {
  if (guard_.amplification <= 0) return SIZE_MAX;
  auto it = routes_.find(addr_key(to));
  if (it == routes_.end()) return kGraceBytes;
  if (it->second.validated) return SIZE_MAX;
  auto budget = static_cast<std::uint64_t>(guard_.amplification * static_cast<double>(it->second.in)) + kGraceBytes;
  return budget > it->second.out ? static_cast<std::size_t>(budget - it->second.out) : 0;
}

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
  in_flight_to_.clear();
}

void Endpoint::receive() {
  socket_.async_receive_from(net::buffer(buffer_), sender_, [this](error_code ec, std::size_t n) {
    if (ec == net::error::operation_aborted || closed_) return;
    if (ec) {
      // An ICMP error or a transient failure must not end the loop.
      spdlog::debug("receive error: {}", ec.message());
    } else {
      on_datagram(std::string_view(buffer_.data(), n), sender_);
      // Drain what is already queued without another trip through the reactor.
      for (int i = 0; i < kReadBurst && !closed_; ++i) {
        error_code rec;
        std::size_t m = socket_.receive_from(net::buffer(buffer_), sender_, 0, rec);
        if (rec) break;
        on_datagram(std::string_view(buffer_.data(), m), sender_);
      }
    }
    if (!closed_) receive();
  });
}

RequestKey Endpoint::key_of(const udp::endpoint& from, std::uint64_t id) {
  std::uint32_t addr = from.address().is_v4() ? from.address().to_v4().to_uint() : 0;
  return RequestKey{addr, from.port(), id};
}

void Endpoint::inject(std::string_view bytes, const udp::endpoint& from) { on_datagram(bytes, from); }

void Endpoint::on_datagram(std::string_view bytes, const udp::endpoint& from) {
  std::size_t n = bytes.size();
  ++counters_.received;
  counters_.bytes_received += n;
  if (!admit_rate(from, Clock::now())) {
    ++counters_.rate_limited;
    return;
  }
  if (guard_.amplification > 0) route(from)->in += n;
  protocol::Decoded d = n > protocol::kMaxDatagram
                            ? protocol::Decoded{std::nullopt, protocol::DecodeError::too_large}
                            : protocol::decode(bytes);
  if (!d) {
    ++counters_.refused[static_cast<std::size_t>(d.error)];
    if (spdlog::should_log(spdlog::level::debug) && log_allowed())
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
    release(it);
    // Only a receiver of our request could know its id: the address is proven.
    if (guard_.amplification > 0) route(from)->validated = true;
    guarded("reply handler", [&] {
      if (done) done(&m);
    });
    return;
  }
  const std::string* cached = nullptr;
  switch (dedup_.check(key_of(from, protocol::request_id(m)), Clock::now(), &cached)) {
    case DuplicateFilter::Seen::fresh:
      guarded("request handler", [&] {
        if (handler_) handler_(m, from);
      });
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
  request_encoded(protocol::request_id(request), protocol::encode(request), to, std::move(done), policy);
}

void Endpoint::request_encoded(std::uint64_t id, std::string bytes, const udp::endpoint& to, Done done,
                               RetryPolicy policy) {
  std::size_t& to_count = in_flight_to_[addr_key(to)];
  if (to_count >= guard_.max_in_flight || pending_.contains(id)) {
    // Too many outstanding to one address (or a reused id): fail at once, bounded memory.
    ++counters_.in_flight_refused;
    if (to_count == 0) in_flight_to_.erase(addr_key(to));
    net::post(io_, [this, done = std::move(done)] {
      guarded("refused request", [&] {
        if (done) done(nullptr);
      });
    });
    return;
  }
  ++to_count;
  auto it = pending_.try_emplace(id, io_, to, std::move(bytes), std::move(done), policy).first;
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
  release(it);
  guarded("timeout handler", [&] {
    if (done) done(nullptr);
  });
}

template <class F>
void Endpoint::guarded(const char* what, F&& f) {
  // A failing handler (the store, say) must cost its own request, never the receive loop.
  try {
    f();
  } catch (const std::exception& e) {
    spdlog::error("{} failed: {}", what, e.what());
  }
}

void Endpoint::release(std::unordered_map<std::uint64_t, Pending>::iterator it) {
  auto c = in_flight_to_.find(addr_key(it->second.to));
  if (c != in_flight_to_.end() && --c->second == 0) in_flight_to_.erase(c);
  pending_.erase(it);
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

bool Endpoint::send_bytes(const std::string& bytes, const udp::endpoint& to) {
  if (closed_) return false;
  if (guard_.amplification > 0) {
    if (allowance(to) < bytes.size()) {
      ++counters_.amplification;
      return false;
    }
    Route* r = route(to);
    if (!r->validated) r->out += bytes.size();
  }
  error_code ec;
  if (send_hook_) send_hook_(bytes, to);
  else socket_.send_to(net::buffer(bytes), to, 0, ec);
  if (ec) {
    // Non-blocking: a full buffer drops the datagram, as the network could; retries recover.
    ++counters_.send_failed;
    spdlog::debug("send to {}:{} failed: {}", to.address().to_string(), to.port(), ec.message());
    return false;
  }
  ++counters_.sent;
  counters_.bytes_sent += bytes.size();
  return true;
}

}  // namespace chat::transport
