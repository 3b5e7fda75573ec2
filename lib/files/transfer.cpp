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

bool Sender::window_open() const { return rto_pending_ ? rto_sends_left_ > 0 : in_flight_ < cc_.window(); }

bool Sender::can_send() const {
  if (done() || failed_) return false;
  if (probe_due_) return true;
  if (lost_.empty() && next_new_ >= count_) return false;
  if (window_open()) return true;
  return !rto_pending_ && fast_retransmit_ && !lost_.empty();
}

std::optional<Transmission> Sender::next(Time now) {
  if (done() || failed_) return std::nullopt;
  on_timer(now);
  if (failed_) return std::nullopt;
  if (!last_progress_) last_progress_ = now;  // the stall limit counts from the first send
  const bool probe = probe_due_;              // goes whatever the window and the pacing say
  if (!probe && (!can_send() || (o_.pacing && now < pace_at_))) return std::nullopt;
  if (next_tx_ == UINT32_MAX) {  // 4 billion transmissions: no tx seq left to tell them apart
    failed_ = true;
    return std::nullopt;
  }

  Transmission t;
  std::uint32_t repeated = 0;  // a probe sending a chunk in flight again: the tx seq it repeats
  if (!lost_.empty()) {
    t.index = *lost_.begin();
    lost_.erase(lost_.begin());
    t.retransmission = true;
    fast_retransmit_ = false;
  } else if (next_new_ < count_ && (!probe || window_open())) {
    t.index = next_new_++;
    while (next_new_ < count_ && state_[next_new_] != State::unsent) ++next_new_;
  } else {  // a probe with the window full or nothing new left: the highest-sent chunk in flight
    auto it = std::find_if(sent_.rbegin(), sent_.rend(), [&](const auto& e) { return live(e.first, e.second); });
    if (it == sent_.rend()) {  // nothing in flight after all
      probe_due_ = false;
      pto_at_.reset();
      return std::nullopt;
    }
    t.index = it->second.index;
    t.retransmission = true;
    repeated = it->first;
  }
  t.tx_seq = next_tx_++;
  if (repeated == 0) {
    state_[t.index] = State::in_flight;
    ++in_flight_;
  }
  tx_of_[t.index] = t.tx_seq;
  sent_.emplace(t.tx_seq, Sent{t.index, now});
  ++stats_.transmissions;
  if (t.retransmission) ++stats_.retransmissions;
  if (rto_pending_ && rto_sends_left_ > 0) --rto_sends_left_;
  if (probe) {
    probe_due_ = false;
    if (repeated != 0 && repeat_of_ == 0) {
      repeat_of_ = repeated;
      repeat_tx_ = t.tx_seq;
      repeat_index_ = t.index;
    }
    ++probes_in_row_;
    ++stats_.probes;
    rto_at_ = now + rtt_.rto();  // RFC 8985 §7.3: after a probe the RTO is armed afresh
    arm_pto(now);                // the next probe of the row, if any is left, at twice the PTO
  } else {
    if (!rto_at_) rto_at_ = now + rtt_.rto();
    arm_pto(now);
  }

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

  const bool news = ack.highest_tx > highest_seen_;  // the receiver saw a transmission we had not heard of
  if (news) {
    if (rto_pending_) rto_verdict(ack.highest_tx);
    probes_in_row_ = 0;
    if (auto it = sent_.find(ack.highest_tx); it != sent_.end()) rtt_.sample(now - it->second.at);  // an RTT sample
    highest_seen_ = ack.highest_tx;
    probe_due_ = false;  // an ack came after all: no probe needed
  }

  // The chunk a probe sent again, acked by an ack from before the probe arrived: its earlier
  // transmission made it, so the probe repaired nothing.
  const bool before_repeat = repeat_of_ != 0 && ack.highest_tx < repeat_tx_;
  std::uint32_t newly = 0;
  auto mark = [&](std::uint32_t start, std::uint32_t end) {
    for (const Range& gap : acked_.missing(start, end)) {
      for (std::uint32_t i = gap.start; i < gap.end; ++i) {
        if (state_[i] == State::in_flight) --in_flight_;
        if (state_[i] == State::lost) lost_.erase(i);
        if (before_repeat && i == repeat_index_) repeat_of_ = 0;
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
  if (repeat_of_ != 0 && highest_seen_ >= repeat_tx_) {  // that probe, or something after it, arrived
    // A probe that sent a chunk in flight again may have repaired a loss RACK never saw; without
    // D-SACK there is no telling, so it counts as one (RFC 8985 §7.4.2). Once per window, as any.
    if (cc_.on_loss(repeat_of_, next_tx_ - 1)) ++stats_.window_cuts;
    repeat_of_ = 0;
  }
  if (in_flight_ > 0 && !rto_at_) rto_at_ = now + rtt_.rto();  // chunks back in flight after a spurious RTO
  if (news || newly > 0) arm_pto(now);
  stats_.max_window = std::max(stats_.max_window, cc_.window());
  return true;
}

void Sender::on_timer(Time now) {
  if (done() || failed_) return;
  if (pto_at_ && !probe_due_ && now >= *pto_at_) on_pto(now);
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
  consider(pto_at_);  // once fired, stays (in the past) until the probe goes
  consider(reorder_at_);
  if (last_progress_) consider(*last_progress_ + o_.stall_limit);
  if (o_.pacing && can_send()) consider(pace_at_);  // waiting only for the pacing
  return t;
}

void Sender::arm_pto(Time now) {
  pto_at_.reset();
  if (probes_in_row_ >= o_.max_probes || in_flight_ == 0 || probe_due_ || rto_pending_ || !rtt_.has_sample()) return;
  Duration pto = 2 * rtt_.srtt();
  // One chunk in flight: the receiver holds a lone in-order chunk's ack for its ack delay,
  // unless that chunk is the last one missing.
  if (in_flight_ == 1 && acked_.count() + 1 < count_) pto += o_.peer_ack_delay;
  pto = std::max(pto, o_.min_pto) * (std::uint64_t{1} << std::min(probes_in_row_, 16u));  // backs off in a row
  pto_at_ = now + pto;
  if (rto_at_ && *rto_at_ < *pto_at_) pto_at_ = rto_at_;  // a probe instead of the RTO (RFC 8985 §7.2)
}

void Sender::on_pto(Time now) {
  if (in_flight_ == 0) {
    pto_at_.reset();
    return;
  }
  probe_due_ = true;           // the next next() sends it
  rto_at_ = now + rtt_.rto();  // whether or not the caller sends it soon
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
      if (!live(it->first, it->second)) {  // acked, lost, or sent again: nothing left to learn from it
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
  if (in_flight_ == 0) {
    rto_at_.reset();
    pto_at_.reset();
    probe_due_ = false;
  }
}

void Sender::on_rto(Time) {
  ++stats_.timeouts;
  rtt_.backoff();
  if (rto_pending_) cc_.on_timeout(rto_boundary_ - 1);  // no ack for two RTOs: the first was real
  rto_pending_ = true;
  rto_boundary_ = next_tx_;
  rto_sends_left_ = std::max(o_.congestion.timeout_window, std::uint32_t{1});
  rto_lost_.clear();
  for (const auto& [tx, s] : sent_) {
    if (!live(tx, s)) continue;
    lose(s.index);
    rto_lost_.push_back(s.index);
  }
  rto_at_.reset();  // the next send arms it again, with the backed-off RTO
  pto_at_.reset();
  reorder_at_.reset();
  probe_due_ = false;
  repeat_of_ = 0;
  probes_in_row_ = 0;
  fast_retransmit_ = false;
}

void Sender::rto_verdict(std::uint32_t highest_tx) {
  rto_pending_ = false;
  if (highest_tx < rto_boundary_) {
    // The receiver saw a transmission sent before the RTO, and none after: they were late, not
    // lost. What is not resent yet is in flight again, and the window stays.
    ++stats_.spurious_timeouts;
    for (const std::uint32_t i : rto_lost_) {
      if (state_[i] != State::lost || !sent_.count(tx_of_[i])) continue;
      state_[i] = State::in_flight;
      lost_.erase(i);
      ++in_flight_;
      --stats_.losses;
    }
  } else {
    cc_.on_timeout(rto_boundary_ - 1);
  }
  rto_lost_.clear();
}

// ---------------------------------------------------------------- Receiver

Receiver::Receiver(std::uint64_t transfer_id, std::uint32_t chunk_count, const RangeSet& have, ReceiverOptions o)
    : id_(transfer_id), count_(chunk_count), o_(o) {
  for (const auto& [start, end] : have.spans()) have_.insert(start, std::min(end, count_));
  expected_ = have_.prefix_end();  // the sender starts with the first chunk missing
}

bool Receiver::on_chunk(std::uint32_t index, std::uint32_t tx_seq, Time now) {
  if (index >= count_) return false;
  // The next transmission, else it was overtaken (the sender already heard of later ones) or
  // one before it is lost or late.
  const bool next_tx = tx_seq == highest_tx_ + 1;
  highest_tx_ = std::max(highest_tx_, tx_seq);
  latest_ = index;
  if (have_.contains(index)) return true;  // a duplicate: the ack that covered it was lost
  have_.insert(index);
  // In order: the next chunk, the next transmission (so the newest, and none skipped), and not
  // joining chunks held beyond it (a hole filled). Anything else is news the sender's loss
  // detection is waiting for: a skipped tx seq is a transmission the sender's RACK can declare
  // lost on this ack, a lost retransmission among them.
  const bool in_order = index == expected_ && next_tx && have_.end_of(index) == index + 1;
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
