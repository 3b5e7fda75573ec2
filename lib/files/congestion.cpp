// RFC 6298 RTT estimation and a NewReno-style window in chunks.
#include "files/congestion.hpp"

#include <algorithm>

namespace chat::files {

void RttEstimator::sample(Duration rtt) {
  rtt = std::max(rtt, Duration{0});
  if (!has_sample_) {  // RFC 6298 §2.2
    srtt_ = rtt;
    rttvar_ = rtt / 2;
    has_sample_ = true;
  } else {  // §2.3: beta = 1/4, alpha = 1/8
    const Duration err = srtt_ > rtt ? srtt_ - rtt : rtt - srtt_;
    rttvar_ = (3 * rttvar_ + err) / 4;
    srtt_ = (7 * srtt_ + rtt) / 8;
  }
  const Duration rfc = srtt_ + std::max(o_.granularity, 4 * rttvar_);
  rto_ = std::clamp(std::max(rfc, o_.min_srtts * srtt_), o_.min_rto, std::max(o_.min_rto, o_.max_rto));
}

void RttEstimator::backoff() { rto_ = std::min(rto_ * 2, o_.max_rto); }

CongestionWindow::CongestionWindow(CongestionOptions o)
    : o_(o), cwnd_(std::clamp(o.initial_window, std::uint32_t{1}, std::max(o.max_window, std::uint32_t{1}))) {}

void CongestionWindow::on_delivered(std::uint32_t chunks, std::uint32_t highest_tx) {
  if (recovering_) {
    if (highest_tx <= recovery_end_) return;
    recovering_ = false;
  }
  while (chunks > 0 && cwnd_ < o_.max_window) {
    if (cwnd_ < ssthresh_) {
      const std::uint32_t step = std::min(chunks, ssthresh_ - cwnd_);
      cwnd_ += step;
      chunks -= step;
    } else {
      acc_ += chunks;
      chunks = 0;
      while (acc_ >= cwnd_ && cwnd_ < o_.max_window) {
        acc_ -= cwnd_;
        ++cwnd_;
      }
    }
  }
  cwnd_ = std::min(cwnd_, o_.max_window);
}

bool CongestionWindow::on_loss(std::uint32_t lost_tx, std::uint32_t highest_sent_tx) {
  if (lost_tx <= recovery_end_) return false;  // sent before the last cut: the same event
  ssthresh_ = std::max(cwnd_ / 2, o_.min_window);
  cwnd_ = ssthresh_;
  acc_ = 0;
  recovery_end_ = highest_sent_tx;
  recovering_ = true;
  ++cuts_;
  return true;
}

void CongestionWindow::on_timeout(std::uint32_t highest_sent_tx) {
  ssthresh_ = std::max(cwnd_ / 2, o_.min_window);
  cwnd_ = std::max(o_.timeout_window, std::uint32_t{1});
  acc_ = 0;
  recovery_end_ = highest_sent_tx;  // what was in flight is lost with it: no second cut for it
  recovering_ = false;              // slow start again on what the retransmissions bring back
}

}  // namespace chat::files
