// The Sender and Receiver cores of a file transfer.
#include "files/transfer.hpp"

#include <algorithm>

namespace chat::files {
namespace {

constexpr std::uint32_t kPacingBurst = 4;  // chunks that may go back to back after a pause

}  // namespace

// ---------------------------------------------------------------- Sender

Sender::Sender(std::uint64_t transfer_id, std::uint32_t chunk_count, const RangeSet& have, SenderOptions o)
    : id_(transfer_id),
      count_(chunk_count),
      o_(o),
      rtt_(o.rtt),
      cc_(o.congestion),
      state_(chunk_count, State::unsent),
      tx_of_(chunk_count, 0) {
  for (const auto& [start, end] : have.spans()) {
    const std::uint32_t e = std::min(end, count_);
    if (start >= e) continue;
    acked_.insert(start, e);
    std::fill(state_.begin() + start, state_.begin() + e, State::acked);
  }
  while (next_new_ < count_ && state_[next_new_] != State::unsent) ++next_new_;
  stats_.max_window = cc_.window();
}

bool Sender::live(std::uint32_t tx, const Sent& s) const {
  return state_[s.index] == State::in_flight && tx_of_[s.index] == tx;
}

bool Sender::can_send() const {
  if (done() || failed_) return false;
  if (in_flight_ >= cc_.window()) return fast_retransmit_ && !lost_.empty();
  return !lost_.empty() || next_new_ < count_;
}

std::optional<Transmission> Sender::next(Time now) {
  if (done() || failed_) return std::nullopt;
  on_timer(now);
  if (failed_) return std::nullopt;
  if (!last_progress_) last_progress_ = now;  // the stall limit counts from the first send
  if (!can_send() || (o_.pacing && now < pace_at_)) return std::nullopt;
  if (next_tx_ == UINT32_MAX) {  // 4 billion transmissions: no tx seq left to tell them apart
    failed_ = true;
    return std::nullopt;
  }

  Transmission t;
  if (!lost_.empty()) {
    t.index = *lost_.begin();
    lost_.erase(lost_.begin());
    t.retransmission = true;
    fast_retransmit_ = false;
  } else {
    t.index = next_new_++;
    while (next_new_ < count_ && state_[next_new_] != State::unsent) ++next_new_;
  }
  t.tx_seq = next_tx_++;
  state_[t.index] = State::in_flight;
  tx_of_[t.index] = t.tx_seq;
  ++in_flight_;
  sent_.emplace(t.tx_seq, Sent{t.index, now});
  ++stats_.transmissions;
  if (t.retransmission) ++stats_.retransmissions;
  if (!rto_at_) rto_at_ = now + rtt_.rto();

  if (o_.pacing && rtt_.has_sample()) {
    // A window per SRTT with headroom (x2 in slow start, x1.25 after), so pacing never limits
    // more than the window does; up to kPacingBurst chunks may follow a pause at once.
    const std::uint64_t w = cc_.window();
    const Duration interval = cc_.slow_start() ? rtt_.srtt() / (2 * w) : rtt_.srtt() * 4 / (5 * w);
    pace_at_ = std::max(pace_at_, now - kPacingBurst * interval) + interval;
  }
  return t;
}

bool Sender::on_ack(const ChunkAck& ack, Time now) {
  if (ack.transfer_id != id_ || ack.cumulative > count_ || ack.highest_tx >= next_tx_) return false;
  for (const Range& r : ack.ranges)
    if (r.end > count_) return false;
  if (!last_progress_) last_progress_ = now;

  if (ack.highest_tx > highest_seen_) {  // a transmission seen for the first time: an RTT sample
    if (auto it = sent_.find(ack.highest_tx); it != sent_.end()) rtt_.sample(now - it->second.at);
    highest_seen_ = ack.highest_tx;
  }

  std::uint32_t newly = 0;
  auto mark = [&](std::uint32_t start, std::uint32_t end) {
    for (const Range& gap : acked_.missing(start, end)) {
      for (std::uint32_t i = gap.start; i < gap.end; ++i) {
        if (state_[i] == State::in_flight) --in_flight_;
        if (state_[i] == State::lost) lost_.erase(i);
        state_[i] = State::acked;
        ++newly;
      }
    }
    acked_.insert(start, end);
  };
  mark(0, ack.cumulative);
  for (const Range& r : ack.ranges) mark(r.start, r.end);

  if (newly > 0) {
    last_progress_ = now;
    cc_.on_delivered(newly, highest_seen_);
    while (next_new_ < count_ && state_[next_new_] != State::unsent) ++next_new_;
    if (in_flight_ > 0) rto_at_ = now + rtt_.rto();  // RFC 6298 §5.3: restart on new data acked
  }
  detect_losses(now);
  stats_.max_window = std::max(stats_.max_window, cc_.window());
  return true;
}

void Sender::on_timer(Time now) {
  if (done() || failed_) return;
  if (rto_at_ && now >= *rto_at_) on_rto(now);
  if (reorder_at_ && now >= *reorder_at_) detect_losses(now);
  if (last_progress_ && now - *last_progress_ >= o_.stall_limit) failed_ = true;
}

std::optional<Time> Sender::next_timer() const {
  if (done() || failed_) return std::nullopt;
  std::optional<Time> t;
  auto consider = [&](std::optional<Time> x) {
    if (x && (!t || *x < *t)) t = x;
  };
  consider(rto_at_);
  consider(reorder_at_);
  if (last_progress_) consider(*last_progress_ + o_.stall_limit);
  if (o_.pacing && can_send()) consider(pace_at_);  // waiting only for the pacing
  return t;
}

void Sender::lose(std::uint32_t index) {
  state_[index] = State::lost;
  lost_.insert(index);
  --in_flight_;
  ++stats_.losses;
}

void Sender::detect_losses(Time now) {
  reorder_at_.reset();
  if (rtt_.has_sample()) {
    const Duration srtt = rtt_.srtt();
    const Duration wait = srtt + std::max<Duration>(srtt / 4, 1ms);
    // Transmissions older than the newest one seen, oldest first (sent_ is in send order).
    for (auto it = sent_.begin(); it != sent_.end() && it->first < highest_seen_;) {
      if (!live(it->first, it->second)) {  // acked, or already lost: nothing left to learn from it
        it = sent_.erase(it);
        continue;
      }
      if (now - it->second.at < wait) {  // may still be reordering; all after it were sent later
        reorder_at_ = it->second.at + wait;
        break;
      }
      lose(it->second.index);
      if (cc_.on_loss(it->first, next_tx_ - 1)) {
        ++stats_.window_cuts;
        fast_retransmit_ = true;
      }
      it = sent_.erase(it);
    }
  }
  if (in_flight_ == 0) rto_at_.reset();
}

void Sender::on_rto(Time) {
  ++stats_.timeouts;
  rtt_.backoff();
  cc_.on_timeout(next_tx_ - 1);
  for (const auto& [tx, s] : sent_)
    if (live(tx, s)) lose(s.index);
  rto_at_.reset();  // the next send arms it again, with the backed-off RTO
  reorder_at_.reset();
  fast_retransmit_ = false;
}

// ---------------------------------------------------------------- Receiver

Receiver::Receiver(std::uint64_t transfer_id, std::uint32_t chunk_count, const RangeSet& have, ReceiverOptions o)
    : id_(transfer_id), count_(chunk_count), o_(o) {
  for (const auto& [start, end] : have.spans()) have_.insert(start, std::min(end, count_));
  expected_ = have_.prefix_end();  // the sender starts with the first chunk missing
}

bool Receiver::on_chunk(std::uint32_t index, std::uint32_t tx_seq, Time now) {
  if (index >= count_) return false;
  const bool newest = tx_seq > highest_tx_;  // else it was overtaken: the sender already heard of later ones
  highest_tx_ = std::max(highest_tx_, tx_seq);
  latest_ = index;
  if (have_.contains(index)) return true;  // a duplicate: the ack that covered it was lost
  have_.insert(index);
  // In order: the next chunk, the newest transmission, and not joining chunks held beyond it
  // (a hole filled). Anything else is news the sender's loss detection is waiting for.
  const bool in_order = index == expected_ && newest && have_.end_of(index) == index + 1;
  expected_ = have_.end_of(index);  // the sender skips what is held
  if (!in_order || complete()) return true;
  if (++unacked_ >= o_.ack_every) return true;
  if (!ack_at_) ack_at_ = now + o_.ack_delay;
  return false;
}

ChunkAck Receiver::make_ack() {
  unacked_ = 0;
  ack_at_.reset();
  ChunkAck a;
  a.transfer_id = id_;
  a.highest_tx = highest_tx_;
  a.cumulative = have_.prefix_end();
  const auto& spans = have_.spans();
  // The range holding the latest chunk first (the news of this ack), then the highest ones.
  if (latest_ && *latest_ >= a.cumulative) {
    auto it = std::prev(spans.upper_bound(*latest_));
    if (it->first > a.cumulative) a.ranges.push_back({it->first, it->second});
  }
  for (auto it = spans.rbegin(); it != spans.rend() && it->first > a.cumulative && a.ranges.size() < kMaxAckRanges; ++it) {
    if (!a.ranges.empty() && a.ranges.front().start == it->first) continue;
    a.ranges.push_back({it->first, it->second});
  }
  std::sort(a.ranges.begin(), a.ranges.end(), [](const Range& x, const Range& y) { return x.start < y.start; });
  return a;
}

}  // namespace chat::files
