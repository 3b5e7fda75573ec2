// The data-plane cores of one file transfer: the Sender decides which chunk goes out next and
// when, the Receiver records what arrived and when to acknowledge it. No socket and no clock of
// their own: the caller passes the time in, carries out the decisions, and wakes them at
// next_timer(). Both are single-threaded.
//
// The caller's loop on the sending side, on every wake-up (an ack, a timer):
//   sender.on_ack(ack, now) or sender.on_timer(now);
//   while (auto t = sender.next(now)) send encode(Chunk{id, t->index, t->tx_seq, seal_chunk(...)});
//   arm a timer for sender.next_timer();
// Chat keeps priority over files: the caller sends any chat datagram waiting before it asks
// next(), and may stop asking for a while; the cores only decide the order and the amount.
//
// On the receiving side, for each chunk datagram that decodes and opens:
//   if (receiver.wanted(c.index)) write it to the Partial (on an error: stop the transfer);
//   if (receiver.on_chunk(c.index, c.tx_seq, now)) send encode(receiver.make_ack(), keys);
// and at receiver.next_timer(): if (receiver.on_timer(now)) send the ack the same way.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <vector>

#include "files/congestion.hpp"
#include "files/ranges.hpp"
#include "files/wire.hpp"
#include "transport/clock.hpp"

namespace chat::files {

struct SenderOptions {
  RttOptions rtt;
  CongestionOptions congestion;
  Duration stall_limit = 15s;  // no chunk newly acknowledged for this long: failed() (the path is lost)
  bool pacing = true;          // spread a window over the RTT instead of sending it in one burst
};

/// One chunk to send now.
struct Transmission {
  std::uint32_t index = 0;
  std::uint32_t tx_seq = 0;     // new for every transmission, so an ack names the one it saw
  bool retransmission = false;  // this chunk was sent before
};

struct SenderStats {
  std::uint64_t transmissions = 0;
  std::uint64_t retransmissions = 0;
  std::uint64_t losses = 0;           // transmissions declared lost (by the reorder rule or an RTO)
  std::uint32_t timeouts = 0;         // RTOs that fired
  std::uint32_t window_cuts = 0;      // loss events that halved the window
  std::uint32_t max_window = 0;       // the largest congestion window seen
};

/// Decides what to send of a file of `chunk_count` chunks.
///
/// Loss detection is RACK's (RFC 8985): a transmission is lost once the receiver has seen one
/// sent after it (its `highest_tx`) and SRTT + SRTT/4 has passed since it was sent; the quarter
/// RTT is the reordering it tolerates, so jitter is not taken for loss (a classic "3 later
/// acks" rule resends on any reordering 3 deep). The retransmission timeout (RFC 6298) catches
/// the rest: all in flight is then lost, the window collapses and the RTO backs off. RTT samples
/// come from `highest_tx`, which names one transmission, so a retransmission's ack is never
/// mistaken for the original's (Karn's problem). Lost chunks are resent lowest first, before
/// new ones; the first lost chunk of a loss event goes at once even though the halved window is
/// still full (fast retransmit), the others as acks make room.
class Sender {
 public:
  /// `have`: the chunks the receiver already holds (a resumed download); never sent.
  Sender(std::uint64_t transfer_id, std::uint32_t chunk_count, const RangeSet& have, SenderOptions o = {});

  /// The next chunk to send now, or nullopt if the window or the pacing says wait (or all is
  /// sent, done(), failed()). Runs the timers first, as on_timer(now) does.
  std::optional<Transmission> next(Time now);
  /// Takes the receiver's ack. Returns false (and ignores it) if it is for another transfer or
  /// names chunks or transmissions this sender never had.
  bool on_ack(const ChunkAck& ack, Time now);
  /// Runs what is due at `now`: the retransmission timeout, the reorder timer, the stall limit.
  void on_timer(Time now);
  /// When the sender wants on_timer() (or next()) called; nullopt when it waits for nothing.
  std::optional<Time> next_timer() const;

  /// Every chunk acknowledged.
  bool done() const { return acked_.count() == count_; }
  /// Nothing acknowledged for stall_limit (or the tx seq space ran out): give up.
  bool failed() const { return failed_; }

  std::uint32_t window() const { return cc_.window(); }
  std::uint32_t in_flight() const { return in_flight_; }
  const RttEstimator& rtt() const { return rtt_; }
  const SenderStats& stats() const { return stats_; }
  /// The chunks the receiver is known to hold.
  const RangeSet& acked() const { return acked_; }

 private:
  enum class State : std::uint8_t { unsent, in_flight, lost, acked };
  struct Sent {
    std::uint32_t index;
    Time at;
  };

  bool live(std::uint32_t tx, const Sent& s) const;
  void detect_losses(Time now);
  void on_rto(Time now);
  void lose(std::uint32_t index);
  bool can_send() const;

  std::uint64_t id_;
  std::uint32_t count_;
  SenderOptions o_;
  RttEstimator rtt_;
  CongestionWindow cc_;
  std::vector<State> state_;          // per chunk
  std::vector<std::uint32_t> tx_of_;  // per chunk: its latest transmission
  RangeSet acked_;
  std::set<std::uint32_t> lost_;      // chunks to send again, lowest first
  std::uint32_t next_new_ = 0;        // no unsent chunk below this
  std::map<std::uint32_t, Sent> sent_;  // tx seq -> transmission: in flight, or newer than highest_seen_
  std::uint32_t next_tx_ = 1;
  std::uint32_t highest_seen_ = 0;    // the highest tx seq the receiver reported
  std::uint32_t in_flight_ = 0;
  bool fast_retransmit_ = false;      // a loss event may send one lost chunk past the window
  std::optional<Time> rto_at_;
  std::optional<Time> reorder_at_;    // when the oldest suspect transmission is declared lost
  Time pace_at_{};                    // no send before this
  std::optional<Time> last_progress_;
  bool failed_ = false;
  SenderStats stats_;
};

struct ReceiverOptions {
  Duration ack_delay = 15ms;     // the longest an in-order chunk waits for a second one to share its ack
  std::uint32_t ack_every = 2;   // in-order chunks per ack
};

/// Records what arrived of a file of `chunk_count` chunks and decides when to acknowledge.
/// An ack goes out for every ack_every in-order chunks, ack_delay after a lone one, and at once
/// for a chunk out of order (past a gap, filling a hole, overtaken by a later transmission, a
/// duplicate) or the last one missing.
class Receiver {
 public:
  /// `have`: the chunks already held (Partial::have() of a resumed download).
  Receiver(std::uint64_t transfer_id, std::uint32_t chunk_count, const RangeSet& have, ReceiverOptions o = {});

  /// Whether chunk `index` is worth writing: in the file and not held yet.
  bool wanted(std::uint32_t index) const { return index < count_ && !have_.contains(index); }
  /// Records chunk `index` (opened and written, or a duplicate) that came as transmission
  /// `tx_seq`. Returns true if an ack (make_ack()) should go out now. An index past the end is ignored.
  bool on_chunk(std::uint32_t index, std::uint32_t tx_seq, Time now);
  /// True if the delayed ack is due at `now`: send make_ack().
  bool on_timer(Time now) const { return ack_at_ && now >= *ack_at_; }
  /// When the delayed ack is due, if one is waiting.
  std::optional<Time> next_timer() const { return ack_at_; }
  /// The ack to send now; clears what was waiting for one. Its ranges are the one holding the
  /// latest chunk and then the highest ones, at most kMaxAckRanges, ascending.
  ChunkAck make_ack();

  bool complete() const { return have_.count() == count_; }
  const RangeSet& have() const { return have_; }

 private:
  std::uint64_t id_;
  std::uint32_t count_;
  RangeSet have_;
  ReceiverOptions o_;
  std::uint32_t highest_tx_ = 0;
  std::uint32_t expected_;          // the index that would be in order next
  std::optional<std::uint32_t> latest_;
  std::uint32_t unacked_ = 0;       // in-order chunks not acknowledged yet
  std::optional<Time> ack_at_;
};

}  // namespace chat::files
