// The client's file transfers (SPEC §12): the offers, the transfers running both ways, their
// status lines and progress. Runs on the client's transport::Core (its timers, its socket and
// its time) and drives lib/files' cores: files::Sender and files::Receiver decide, this carries
// out (reads chunks, seals them, writes what arrives, acknowledges). No socket and no clock of
// its own; disk I/O is the files' own (pread, pwrite, fdatasync), synchronous.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "files/control.hpp"
#include "transport/core.hpp"

namespace chat::peer {

struct FileOptions {
  /// Where received files are saved (and their partial downloads kept).
  std::filesystem::path download_dir;
  /// An offer not answered in this time lapses, on both sides.
  std::chrono::milliseconds offer_lapse{120'000};
  /// A receiver that hears nothing of a running transfer for this long stops it (a sender
  /// stops after files::SenderOptions::stall_limit without an ack).
  std::chrono::milliseconds stall{20'000};
  /// How often the progress line is redrawn on a terminal.
  std::chrono::milliseconds redraw{250};
  /// How often a receiver makes what it wrote durable (a restart resumes from there).
  std::chrono::milliseconds flush{1'000};
  /// Chunks in flight at most (128: 184 KB). The receiver's socket queues what it has not read
  /// yet, chat behind the chunks; this bounds that queue and so what a chat message waits
  /// behind (on loopback, bench/files: with 256 a chat round trip took 1-3 ms at p50 during a
  /// transfer, with 128 about 0.7 ms, with 64 0.6 ms, at the same throughput). It also bounds a transfer to 184 KB per round
  /// trip: 3.7 MB/s over a 50 ms path.
  std::uint32_t max_window = 128;
  /// The chunk ciphers this client offers and accepts (files::Cipher bits): what the machine can use.
  std::uint8_t ciphers = files::local_ciphers();
};

/// What the transfers ask of the client.
struct FileHost {
  /// Shows one status line ("[...]", the client adds ">>> ").
  std::function<void(const std::string& line)> say;
  /// Redraws the progress line in place; empty on a pipe, where a line every 10 % is said instead.
  std::function<void(const std::string& text)> progress;
  /// Seals `c` for `to` and sends it in a Direct datagram, reliably; `done(true)` once `to`'s
  /// receipt came, `done(false)` if it did not (or `to` has no address or usable key). Never
  /// calls `done` before it returns.
  std::function<void(const std::string& to, const files::Control& c, std::function<void(bool answered)> done)>
      send_control;
  /// The address of `name` if it is online in the table with a key messages can be sealed to.
  std::function<std::optional<udp::endpoint>(const std::string& name)> reachable;
  /// A transfer or offer ended (the client may be waiting for the last one to leave).
  std::function<void()> ended{};

  // Files the server keeps for an offline recipient (SPEC §12).
  /// True if a file can be sealed for `name`, online or not (its key is known and usable).
  std::function<bool(const std::string& name)> sealable{};
  /// `c` sealed for `to` (identity::seal_file, its transfer id as the mid), for the server to keep.
  std::function<std::string(const std::string& to, const files::Control& c)> seal_for{};
  /// Sends `m` (its id set) to the server in use, reliably; `done` gets the reply (nullptr: none).
  std::function<void(const protocol::Message& m, std::function<void(const protocol::Message* reply)> done)>
      to_server{};
  /// The server in use.
  std::function<udp::endpoint()> server{};
  /// Our own name, as the server knows it.
  std::string me{};
};

/// "2.4 MiB": one decimal from KiB up.
std::string format_size(std::uint64_t bytes);

class Transfers {
 public:
  Transfers(transport::Core& core, FileHost host, FileOptions options);
  ~Transfers();
  Transfers(const Transfers&) = delete;
  Transfers& operator=(const Transfers&) = delete;

  // The commands.
  void sendfile(const std::string& to, const std::string& path);
  void accept(const std::string& from, unsigned id);
  void decline(const std::string& from, unsigned id);
  /// The lines of `transfers`.
  std::string list() const;
  void cancel(unsigned id);

  /// A control message from `from` (authenticated by the caller), which came from `at`.
  void on_control(const std::string& from, const udp::endpoint& at, const files::Control& c);
  /// A file the server keeps for us, offered by `from` (authenticated by the caller: sealed by
  /// `from` for us); accepting it downloads it from the server.
  void on_kept_offer(const std::string& from, const files::ctl::Offer& o);
  /// A file frame (chunk or chunk_ack) from `from`.
  void on_frame(std::string_view bytes, const udp::endpoint& from);

  /// What end of input waits for: every outgoing transfer (an offer too, until it is answered
  /// or lapses) and every incoming one that was accepted. Each ends by itself.
  std::size_t running() const;
  /// Withdraws every offer and stops every transfer, telling the peers (leaving).
  void stop_all();
  /// File frames dropped: malformed, forged, or of no transfer of theirs (logged at debug).
  std::uint64_t dropped() const { return dropped_; }

 private:
  struct Outgoing;
  struct Incoming;

  Outgoing* outgoing(std::uint64_t transfer);
  Incoming* incoming(std::uint64_t transfer);
  /// The offer of `from` the user means by `id` (0: the only one), or nullptr after saying why.
  Incoming* offered_by(const std::string& from, unsigned id, const char* verb);

  /// `kept`: the server keeps the file (at `at`); the offer does not lapse.
  void on_offer(const std::string& from, const udp::endpoint& at, const files::ctl::Offer& o, bool kept = false);
  /// Sends an outgoing file to the server, for its recipient (offline, or not answering).
  void upload(std::uint64_t transfer);
  /// Every chunk of an upload is acknowledged: the server keeps it with its sealed offer.
  void commit(std::uint64_t transfer);
  /// The server's answer to one of our requests about a file: "" for an Ack, else why not.
  static std::optional<std::string> refusal(const protocol::Message* reply);
  void on_accept(Outgoing& o, const udp::endpoint& at, const files::ctl::Accept& a);
  void on_done(Outgoing& o, const files::ctl::Done& d);

  /// Sends what the sender's window allows, then sets its timer.
  void pump(Outgoing& o);
  void on_chunk(Incoming& in, std::string_view bytes, const udp::endpoint& from);
  void dropped(const char* why, const udp::endpoint& from);
  /// The Receiver asked for an ack of chunks held in order: it goes at the end of this turn,
  /// with whatever else arrived in it (or at once after kAckRun chunks).
  void ack_soon(Incoming& in);
  void send_ack(Incoming& in);
  /// The whole file arrived: the check, the rename, the line, the Done.
  void finish(Incoming& in);
  /// (Re)arms a receiver's timer: its delayed ack, the stall limit, the next flush.
  void arm(Incoming& in);
  void on_incoming_timer(std::uint64_t transfer);

  /// Progress of a running transfer: a redraw on a terminal, a line per 10 % on a pipe.
  void progressed(std::uint64_t transfer);
  void redraw();
  std::string progress_line(std::uint64_t transfer) const;

  void end_outgoing(std::uint64_t transfer);
  void end_incoming(std::uint64_t transfer);
  void tell(const std::string& to, const files::Control& c);
  /// Tells the other end of a transfer `c` (sent once, reliably). When that end is the server
  /// (a kept file), what it has a datagram for: a decline or a Done as `file_done`; a cancel
  /// nothing, as the server drops a transfer that goes silent.
  void tell_peer(const Outgoing& o, const files::Control& c);
  void tell_peer(const Incoming& in, const files::Control& c);

  transport::Core& core_;
  FileHost host_;
  FileOptions o_;
  unsigned next_id_ = 1;
  std::map<std::uint64_t, std::unique_ptr<Outgoing>> out_;  // by transfer id
  std::map<std::uint64_t, std::unique_ptr<Incoming>> in_;
  transport::Core::TimerId redraw_timer_ = 0;
  bool redraw_due_ = false;
  std::string shown_;  // the progress line on screen
  std::uint64_t dropped_ = 0;
  std::string plain_;  // the plaintext of the chunk being received (a buffer kept, not one per chunk)
  std::vector<std::string> burst_;  // the chunk datagrams of one pump(), sent together
};

}  // namespace chat::peer
