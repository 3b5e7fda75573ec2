// The transport core: reliable requests with retries, replies remembered for repeats, timers.
#include "transport/core.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <random>

namespace chat::transport {
namespace {

// The shortest time a request id is remembered, whatever the retry policy.
constexpr auto kMinDedupWindow = std::chrono::seconds(30);
// How many request ids are remembered at most (bounded memory under floods).
constexpr std::size_t kDedupCapacity = 200'000;
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

Duration window_for(const RetryPolicy& p) {
  // A sender's last copy leaves span() after its first; twice that covers a slow path too.
  return std::max<Duration>(kMinDedupWindow, 2 * p.span());
}

}  // namespace

RetryPolicy RetryPolicy::within(Duration total) const {
  auto each = std::chrono::duration_cast<std::chrono::milliseconds>(total / (retries + 1));
  return RetryPolicy{std::max(std::chrono::milliseconds(1), each), retries};
}

std::uint64_t Counters::refused_total() const {
  std::uint64_t n = 0;
  for (auto c : refused) n += c;
  return n;
}

Core::Core(CoreOptions options, const TimeSource& clock)
    : options_(options),
      clock_(clock),
      id_secret_(options.seed != 0 ? mix(options.seed) : random_u64()),
      rng_(options.seed != 0 ? options.seed : random_u64()),
      dedup_(kDedupCapacity, window_for(options.policy)) {}

Duration Core::dedup_window() const { return window_for(options_.policy); }

std::uint64_t Core::next_id() {
  for (;;) {
    std::uint64_t id = mix(++id_counter_ ^ id_secret_);
    if (id != 0) return id;  // 0 means "no id" on the wire
  }
}

std::uint64_t Core::random() {
  rng_ += 0x9E3779B97F4A7C15ull;  // SplitMix64
  return mix(rng_);
}

bool Core::log_allowed() {
  // At most kLogPerSecond lines a second: a flood is summarised by the counters instead.
  Time t = now();
  if (t - log_window_ > std::chrono::seconds(1)) {
    log_window_ = t;
    logged_ = 0;
  }
  return logged_++ < kLogPerSecond;
}

std::uint64_t Core::addr_key(const udp::endpoint& e) {
  std::uint64_t a = e.address().is_v4() ? e.address().to_v4().to_uint() : 0;
  return a << 16 | e.port();
}

Core::Route* Core::route(const udp::endpoint& e) {
  if (options_.guard.rate_limit <= 0 && options_.guard.amplification <= 0) return nullptr;
  if (routes_.size() >= kMaxRoutes) {
    // Bounded memory under a spoofed-source flood: forget the unproven; keep the proven.
    std::erase_if(routes_, [](const auto& kv) { return !kv.second.validated; });
  }
  return &routes_[addr_key(e)];
}

bool Core::admit_rate(const udp::endpoint& from) {
  const double limit = options_.guard.rate_limit;
  if (limit <= 0) return true;
  Route* r = route(from);
  Time t = now();
  double burst = limit;  // one second's worth
  if (r->refill == Time{}) r->tokens = burst;
  else r->tokens = std::min(burst, r->tokens + std::chrono::duration<double>(t - r->refill).count() * limit);
  r->refill = t;
  if (r->tokens < 1) return false;
  r->tokens -= 1;
  return true;
}

void Core::validate(const udp::endpoint& to) {
  if (options_.guard.amplification > 0) route(to)->validated = true;
}

std::size_t Core::allowance(const udp::endpoint& to) const {
  if (options_.guard.amplification <= 0) return SIZE_MAX;
  auto it = routes_.find(addr_key(to));
  if (it == routes_.end()) return kGraceBytes;
  if (it->second.validated) return SIZE_MAX;
  auto budget = static_cast<std::uint64_t>(options_.guard.amplification * static_cast<double>(it->second.in)) + kGraceBytes;
  return budget > it->second.out ? static_cast<std::size_t>(budget - it->second.out) : 0;
}

void Core::close() {
  closed_ = true;
  pending_.clear();
  in_flight_to_.clear();
  timers_.clear();
  timer_due_.clear();
  deferred_.clear();
}

RequestKey Core::key_of(const udp::endpoint& from, std::uint64_t id) {
  std::uint32_t addr = from.address().is_v4() ? from.address().to_v4().to_uint() : 0;
  return RequestKey{addr, from.port(), id};
}

void Core::on_datagram(std::string_view bytes, const udp::endpoint& from) {
  if (closed_) return;
  std::size_t n = bytes.size();
  ++counters_.received;
  counters_.bytes_received += n;
  if (!admit_rate(from)) {
    ++counters_.rate_limited;
    return;
  }
  if (options_.guard.amplification > 0) route(from)->in += n;
  if (frame_handler_ && n >= 2 && n <= protocol::kMaxDatagram &&
      protocol::is_frame(static_cast<std::uint8_t>(bytes[0]), static_cast<std::uint8_t>(bytes[1]))) {
    guarded("frame handler", [&] { frame_handler_(bytes, from); });
    return;
  }
  protocol::Decoded d = n > protocol::kMaxDatagram
                            ? protocol::Decoded{std::nullopt, protocol::DecodeError::too_large}
                            : protocol::decode(bytes);
  if (!d) {
    ++counters_.refused[static_cast<std::size_t>(d.error)];
    if (spdlog::should_log(spdlog::level::debug) && log_allowed())
      spdlog::debug("dropped {} bytes from {}:{}: {}", n, from.address().to_string(), from.port(),
                    protocol::to_string(d.error));
    if (d.error == protocol::DecodeError::old_version) refuse_v1(bytes, from);
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
    if (options_.guard.amplification > 0) route(from)->validated = true;
    guarded("reply handler", [&] {
      if (done) done(&m);
    });
    return;
  }
  const std::string* cached = nullptr;
  switch (dedup_.check(key_of(from, protocol::request_id(m)), now(), &cached)) {
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
      if (send_bytes(*cached, from)) counters_.bytes_resent += cached->size();
      break;
  }
}

void Core::refuse_v1(std::string_view bytes, const udp::endpoint& from) {
  // A version-1 request gets the v1 answer an old client shows ("upgrade ChatApp"). Only
  // when that answer is no longer than the request (an old client pads its register to
  // 1200 bytes), so a forged source gains nothing; this datagram already passed the rate
  // limit, and send_bytes() applies the amplification limit as to anything else.
  std::optional<std::string> answer = protocol::v1_refusal(bytes);
  if (answer && answer->size() <= bytes.size()) send_bytes(*answer, from);
}

void Core::request(const protocol::Message& request, const udp::endpoint& to, Done done) {
  this->request(request, to, std::move(done), options_.policy);
}

void Core::request(const protocol::Message& request, const udp::endpoint& to, Done done, RetryPolicy policy) {
  request_encoded(protocol::request_id(request), protocol::encode(request), to, std::move(done), policy);
}

void Core::request_encoded(std::uint64_t id, std::string bytes, const udp::endpoint& to, Done done,
                           RetryPolicy policy) {
  if (closed_) return;
  std::size_t& to_count = in_flight_to_[addr_key(to)];
  if (to_count >= options_.guard.max_in_flight || pending_.contains(id)) {
    // Too many outstanding to one address (or a reused id): fail at once, bounded memory.
    ++counters_.in_flight_refused;
    if (to_count == 0) in_flight_to_.erase(addr_key(to));
    defer([this, done = std::move(done)] {
      guarded("refused request", [&] {
        if (done) done(nullptr);
      });
    });
    return;
  }
  ++to_count;
  auto it = pending_.try_emplace(id, Pending{to, std::move(bytes), std::move(done), policy}).first;
  transmit(id, it->second);
}

void Core::transmit(std::uint64_t id, Pending& p) {
  bool again = p.tries > 0;
  if (again) ++counters_.retransmits;
  ++p.tries;
  if (send_bytes(p.bytes, p.to) && again) counters_.bytes_resent += p.bytes.size();
  p.timer = after(p.policy.timeout, [this, id] { on_timeout(id); });
}

void Core::on_timeout(std::uint64_t id) {
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
void Core::guarded(const char* what, F&& f) {
  // A failing handler (the store, say) must cost its own request, never the receive loop.
  try {
    f();
  } catch (const std::exception& e) {
    spdlog::error("{} failed: {}", what, e.what());
  }
}

void Core::release(std::unordered_map<std::uint64_t, Pending>::iterator it) {
  cancel(it->second.timer);
  auto c = in_flight_to_.find(addr_key(it->second.to));
  if (c != in_flight_to_.end() && --c->second == 0) in_flight_to_.erase(c);
  pending_.erase(it);
}

void Core::reply(const udp::endpoint& to, const protocol::Message& reply) {
  std::string bytes = protocol::encode(reply);
  send_bytes(bytes, to);
  dedup_.answer(key_of(to, protocol::reply_to(reply)), std::move(bytes));
}

void Core::abandon(std::uint64_t id) {
  auto it = pending_.find(id);
  if (it != pending_.end()) release(it);
}

void Core::forget(const udp::endpoint& from, std::uint64_t id) { dedup_.forget(key_of(from, id)); }

bool Core::send_bytes(const std::string& bytes, const udp::endpoint& to) {
  if (closed_ || !output_) return false;
  if (options_.guard.amplification > 0) {
    if (allowance(to) < bytes.size()) {
      ++counters_.amplification;
      return false;
    }
    Route* r = route(to);
    if (!r->validated) r->out += bytes.size();
  }
  if (!output_(bytes, to)) {
    // A full buffer drops the datagram, as the network could; retries recover.
    ++counters_.send_failed;
    return false;
  }
  ++counters_.sent;
  counters_.bytes_sent += bytes.size();
  return true;
}

std::size_t Core::send_many(std::span<const std::string> datagrams, const udp::endpoint& to) {
  if (closed_ || !output_) return 0;
  if (!batch_output_) {
    std::size_t n = 0;
    for (const std::string& d : datagrams) n += send_bytes(d, to) ? 1 : 0;
    return n;
  }
  std::size_t allowed = datagrams.size();
  if (options_.guard.amplification > 0) {
    // The prefix the allowance covers; the rest is not sent, as send_bytes() would refuse it.
    std::size_t left = allowance(to);
    for (allowed = 0; allowed < datagrams.size() && datagrams[allowed].size() <= left; ++allowed)
      if (left != SIZE_MAX) left -= datagrams[allowed].size();
    counters_.amplification += datagrams.size() - allowed;
  }
  if (allowed == 0) return 0;
  const std::size_t sent = batch_output_(datagrams.first(allowed), to);
  std::uint64_t bytes = 0;
  for (std::size_t i = 0; i < sent; ++i) bytes += datagrams[i].size();
  if (options_.guard.amplification > 0) {
    Route* r = route(to);
    if (!r->validated) r->out += bytes;
  }
  counters_.sent += sent;
  counters_.bytes_sent += bytes;
  counters_.send_failed += allowed - sent;  // a full buffer drops them, as the network could
  return sent;
}

// ---------------------------------------------------------------- timers and turns

Core::TimerId Core::at(Time when, std::function<void()> f) {
  if (closed_) return 0;
  TimerId id = ++timer_counter_;
  bool earliest = timers_.empty() || when < timers_.begin()->first.first;
  timers_.emplace(std::pair{when, id}, std::move(f));
  timer_due_.emplace(id, when);
  if (earliest) wake();
  return id;
}

void Core::cancel(TimerId id) {
  auto it = timer_due_.find(id);
  if (it == timer_due_.end()) return;
  timers_.erase(std::pair{it->second, id});
  timer_due_.erase(it);
}

void Core::on_timer() {
  // Timers set while these run for a time already past run in this call too.
  while (!closed_ && !timers_.empty() && timers_.begin()->first.first <= now()) {
    auto node = timers_.extract(timers_.begin());
    timer_due_.erase(node.key().second);
    guarded("timer", [&] { node.mapped()(); });
  }
}

void Core::defer(std::function<void()> f) {
  if (closed_) return;
  deferred_.push_back(std::move(f));
  if (deferred_.size() == 1) wake();
}

void Core::settle() {
  while (!closed_ && !deferred_.empty()) {
    std::vector<std::function<void()>> now_due;
    now_due.swap(deferred_);
    for (auto& f : now_due) guarded("deferred work", [&] { f(); });
  }
}

std::optional<Time> Core::next_deadline() const {
  if (closed_) return std::nullopt;
  if (!deferred_.empty()) return now();
  if (timers_.empty()) return std::nullopt;
  return timers_.begin()->first.first;
}

void Core::wake() {
  if (wakeup_) wakeup_();
}

}  // namespace chat::transport
