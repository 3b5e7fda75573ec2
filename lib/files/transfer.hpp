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
  std::uint32_t max_probes = 3;  // tail loss probes in a row without an ack before the RTO; 0: none
  Duration min_pto = 1ms;      // the probe timeout's floor: below it a late ack is likelier than a loss
  Duration peer_ack_delay = 15ms;  // the receiver's ReceiverOptions::ack_delay (0 if it acks every chunk
                                   // at once): added to the probe timeout when one chunk is in flight
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
  std::uint64_t losses = 0;           // transmissions declared lost (by RACK or an RTO; a spurious RTO's given back)
  std::uint32_t timeouts = 0;         // RTOs that fired
  std::uint32_t spurious_timeouts = 0;  // of them, those an ack showed were not losses (window kept)
  std::uint32_t probes = 0;           // tail loss probes sent
  std::uint32_t window_cuts = 0;      // loss events that halved the window (RTOs not counted)
  std::uint32_t max_window = 0;       // the largest congestion window seen
};

/// Decides what to send of a file of `chunk_count` chunks.
///
/// Loss detection is RACK's (RFC 8985): a transmission is lost once the receiver has seen one
/// sent after it (its `highest_tx`) and SRTT + max(SRTT/4, 1 ms) has passed since it was sent;
/// the quarter RTT is the reordering it tolerates, so jitter is not taken for loss (a classic
/// "3 later acks" rule resends on any reordering 3 deep). A retransmission has a tx seq of its
/// own, newer than all before it, so a lost retransmission is found the same way, by the ack of
/// anything sent after it. RTT samples come from `highest_tx`, which names one transmission, so
/// a retransmission's ack is never mistaken for the original's (Karn's problem). Lost chunks are
/// resent lowest first, before new ones; the first lost chunk of a loss event goes at once even
/// though the halved window is still full (fast retransmit), the others as acks make room.
///
/// Tail loss probe (RFC 8985 §7): RACK needs a later transmission acked, so when the last ones
/// sent (or their acks) are lost nothing reveals the loss. When chunks are in flight and no ack
/// came for PTO = 2 * SRTT (at least min_pto; plus peer_ack_delay when a single chunk is in
/// flight and is not the file's last missing one, as the receiver holds a lone in-order chunk's
/// ack that long; at the RTO if that comes first, in place of it), the next next() sends one
/// probe, whatever the window and the pacing say: the lowest lost chunk if there is one, else a
/// new chunk if the window has room, else the highest-sent chunk in flight again. Its ack lets
/// RACK find the losses. The probe does not cut the window, but a probe that resent a chunk in
/// flight may have repaired a loss nobody saw, so once its ack comes that counts as a loss
/// (RFC 8985 §7.4.2, as there is no D-SACK to tell) unless the chunk's earlier transmission was
/// acked first. After a probe the RTO is armed afresh. If no ack comes, up to max_probes probes
/// go in a row, the PTO doubling each time (as QUIC's probes do, RFC 9002 §6.2), and then the
/// RTO fires: at 20 % loss each way a third of the probes or their acks are lost, and a second
/// or third probe after 2 or 4 PTOs costs far less than an RTO. An ack that reports a new
/// transmission ends the row. Each probe is one chunk, so a congested path sees at most 3
/// datagrams over 2 + 4 + 8 = 14 SRTT before the RTO.
///
/// The retransmission timeout (RFC 6298, see RttOptions) catches the rest: all in flight is
/// then lost, the RTO backs off, and until an ack comes at most timeout_window chunks go out.
/// That ack tells whether the timeout was real: if the receiver's highest_tx is a transmission
/// sent before the timeout, those were only late (a spurious RTO, Eifel-style with tx seqs for
/// timestamps), the chunks not resent yet are back in flight and the window is kept; otherwise
/// (or if the RTO fires again first) the window collapses to timeout_window. Loss events cut the
/// window once per window of data (CongestionWindow), not once per lost chunk.
class Sender {
 public:
  /// `have`: the chunks the receiver already holds (a resumed download); never sent.
  Sender(std::uint64_t transfer_id, std::uint32_t chunk_count, const RangeSet& have, SenderOptions o = {});

  /// The next chunk to send now, or nullopt if the window or the pacing says wait (or all is
  /// sent, done(), failed()); a due tail loss probe goes whatever they say. Runs the timers
  /// first, as on_timer(now) does.
  std::optional<Transmission> next(Time now);
  /// Takes the receiver's ack. Returns false (and ignores it) if it is for another transfer or
  /// names chunks or transmissions this sender never had.
  bool on_ack(const ChunkAck& ack, Time now);
  /// Runs what is due at `now`: the probe timeout, the retransmission timeout, the reorder
  /// timer, the stall limit.
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
  void on_pto(Time now);
  void arm_pto(Time now);
  void rto_verdict(std::uint32_t highest_tx);
  void lose(std::uint32_t index);
  bool window_open() const;
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
  std::optional<Time> pto_at_;        // when the tail loss probe is due
  bool probe_due_ = false;            // the PTO fired: next() sends one probe
  std::uint32_t probes_in_row_ = 0;   // probes sent since the last ack reporting a new transmission
  std::uint32_t repeat_of_ = 0;       // a transmission a probe sent again, its fate unknown yet; 0: none
  std::uint32_t repeat_tx_ = 0;       // that probe's tx seq
  std::uint32_t repeat_index_ = 0;    // and its chunk
  bool rto_pending_ = false;          // an RTO fired and no ack has said yet whether it was spurious
  std::uint32_t rto_boundary_ = 0;    // the first tx seq after that RTO
  std::uint32_t rto_sends_left_ = 0;  // transmissions allowed until that ack
  std::vector<std::uint32_t> rto_lost_;  // the chunks that RTO declared lost
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
/// duplicate, or after a gap in tx seqs: a transmission lost, a retransmission among them) or
/// the last one missing.
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
