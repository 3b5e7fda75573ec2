// Congestion control for file chunks: an RTT estimator (RFC 6298) and a window counted in
// chunks (RFC 5681's slow start, congestion avoidance and multiplicative decrease). Pure
// arithmetic: no clock of its own, no I/O.
#pragma once

#include <chrono>
#include <cstdint>

#include "transport/clock.hpp"

namespace chat::files {

using transport::Duration;
using transport::Time;
using namespace std::chrono_literals;

/// The retransmission timeout is RFC 6298's SRTT + max(G, 4 * RTTVAR), but at least
/// min_srtts * SRTT and within [min_rto, max_rto].
///
/// Why the floor is 20 ms and not RFC 6298's 1 s (or Linux's 200 ms): those floors guard against
/// a receiver's delayed ack (up to 500 ms in TCP) and coarse timers taking a slow ack for a loss.
/// Here the receiver is ours and delays an ack by ReceiverOptions::ack_delay (15 ms) at most, so
/// 20 ms stays above it even on loopback, where SRTT is a fraction of a millisecond and a 200 ms
/// floor made each timeout cost a thousand round trips. The RTO is also no longer the usual way
/// a loss is found: RACK finds a loss (a retransmission's too, as it has a newer tx seq) from the
/// ack of any later transmission, and the Sender's tail loss probe asks for such an ack after
/// 2 * SRTT of silence; the RTO fires only when its probes got no answer either. A low floor is
/// still safe on a slower or congested path: the RTO never goes below 2 * SRTT (so it never
/// fires before the probe), backs off exponentially (x2 per timeout, up to max_rto) until a new
/// RTT sample, and a spurious one (the Sender sees an ack for a transmission sent before it)
/// costs the few chunks resent but not the window.
struct RttOptions {
  Duration initial_rto = 1s;       // before the first sample (RFC 6298 §2.1)
  Duration min_rto = 20ms;         // the floor; see above
  std::uint32_t min_srtts = 2;     // the RTO is at least this many SRTTs (the tail loss probe's 2 * SRTT)
  Duration max_rto = 10s;          // a backed-off RTO never grows past this
  Duration granularity = 1ms;      // G: the clock's tick in RTO = SRTT + max(G, 4 * RTTVAR)
};

/// SRTT, RTTVAR and the retransmission timeout of RFC 6298, with exponential backoff.
class RttEstimator {
 public:
  explicit RttEstimator(RttOptions o = {}) : o_(o), rto_(o.initial_rto) {}

  /// Takes one round-trip measurement; recomputes the RTO and so ends any backoff.
  void sample(Duration rtt);
  /// A retransmission timeout fired: the RTO doubles, up to max_rto.
  void backoff();

  /// The current retransmission timeout, backoff included, within [min_rto, max_rto].
  Duration rto() const { return rto_; }
  bool has_sample() const { return has_sample_; }
  /// The smoothed RTT; zero before the first sample.
  Duration srtt() const { return srtt_; }
  Duration rttvar() const { return rttvar_; }

 private:
  RttOptions o_;
  Duration srtt_{0};
  Duration rttvar_{0};
  Duration rto_;
  bool has_sample_ = false;
};

struct CongestionOptions {
  std::uint32_t initial_window = 4;  // chunks in flight before the first ack (RFC 3390: 3 of this size, RFC 6928: 10)
  std::uint32_t min_window = 2;      // the window never shrinks below this on a loss event
  std::uint32_t timeout_window = 2;  // the window after an RTO: 2 so one more lost datagram is not
                                     // another RTO (RFC 5681 says 1)
  std::uint32_t max_window = 4096;   // chunks (~5.9 MB) in flight at most, whatever the acks say
};

/// The congestion window in chunks. Slow start (+1 per chunk delivered) up to ssthresh, then
/// congestion avoidance (+1 per window delivered); a loss event halves it, once per window of
/// data (about one RTT): losses of chunks sent before the cut are part of the same event. An RTO
/// the Sender found real (not spurious) collapses it to timeout_window and restarts slow start.
class CongestionWindow {
 public:
  explicit CongestionWindow(CongestionOptions o = {});

  /// `chunks` were newly delivered and the receiver has seen up to transmission `highest_tx`.
  /// Does not grow the window while recovering from a loss (until a transmission sent after the
  /// cut is delivered).
  void on_delivered(std::uint32_t chunks, std::uint32_t highest_tx);
  /// Transmission `lost_tx` was lost, `highest_sent_tx` is the last one sent so far. Returns
  /// true if that was a new loss event (the window was cut), false if it belongs to the last one.
  bool on_loss(std::uint32_t lost_tx, std::uint32_t highest_sent_tx);
  /// A retransmission timeout that was not spurious; `highest_sent_tx`, the last transmission
  /// before it, as in on_loss.
  void on_timeout(std::uint32_t highest_sent_tx);

  std::uint32_t window() const { return cwnd_; }
  std::uint32_t ssthresh() const { return ssthresh_; }
  bool slow_start() const { return cwnd_ < ssthresh_; }
  /// How many times a loss event cut the window (timeouts not counted).
  std::uint32_t cuts() const { return cuts_; }

 private:
  CongestionOptions o_;
  std::uint32_t cwnd_;
  std::uint32_t ssthresh_ = UINT32_MAX;
  std::uint32_t acc_ = 0;           // chunks delivered toward the next +1 in congestion avoidance
  std::uint32_t recovery_end_ = 0;  // losses of transmissions up to this one were already counted
  bool recovering_ = false;         // no growth until a transmission after recovery_end_ arrives
  std::uint32_t cuts_ = 0;
};

}  // namespace chat::files
