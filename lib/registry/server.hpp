// The registry server's decisions: client table, sessions and keep-alives, table distribution,
// store-and-forward and the channel. No socket and no clock of its own: it runs on a
// transport::Core, which an Endpoint (or a simulation) drives.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "identity/envelope.hpp"
#include "offline/async_store.hpp"
#include "offline/store.hpp"
#include "protocol/codec.hpp"
#include "registry/depot.hpp"
#include "registry/table.hpp"
#include "transport/core.hpp"

namespace chat::registry {

struct ServerOptions {
  transport::RetryPolicy policy;  // for table updates and deliveries (SPEC: 500 ms x 6)
  /// For probes and channel relays: the whole wait is `policy.timeout` (SPEC §6), resent inside it.
  int relay_retries = 2;
  /// Flood and spoofing protections (rate per source, amplification limit, in-flight bound).
  transport::Guard guard{2000, 3, 4096};
  /// Saved messages kept per recipient at most; further saves are refused with a reason.
  std::size_t max_stored = 100'000;
  /// Registered names at most; a new name past it is refused.
  std::size_t max_clients = 100'000;
  /// The keep-alive interval of clients that do not say theirs in their registration
  /// (SPEC §10): a session not heard from for kMissedKeepalives intervals ends, and its
  /// client is marked offline. Sessions are checked this often.
  std::chrono::milliseconds keepalive{15'000};
  /// How often dropped-datagram counters are logged (when they changed).
  std::chrono::seconds stats_interval{10};
  /// Files kept for offline recipients (SPEC §12): limits, quota, how long.
  DepotOptions files{};
  /// Seeds the core's ids and the table epoch; 0 = random (simulations pass their own).
  std::uint64_t seed = 0;
  /// Called when the server has gone quiet after work (nothing in flight, something received
  /// since the last call), checked every second: ChatApp returns the heap a burst (a
  /// registration storm's table chunks) left free to the system there, after the server has
  /// dropped its cache of encoded table chunks. Empty: neither.
  std::function<void()> on_quiet;
};

/// Keep-alive intervals without a word from a client before its session ends (SPEC §10).
inline constexpr int kMissedKeepalives = 3;

/// What the server counted beyond the transport's counters.
struct ServerCounters {
  std::uint64_t unexpected = 0;  // datagram types a server is never sent (dropped)
  std::uint64_t expired = 0;     // sessions ended for want of keep-alives
  std::uint64_t stalled = 0;     // table updates or deliveries that went unanswered
  std::uint64_t channel_missed = 0;  // channel copies not kept: the member's mailbox was full
  std::uint64_t bad_proofs = 0;  // registrations whose token or signature did not check (forged, stale)
  std::uint64_t replayed = 0;    // registrations whose token was already used
  std::uint64_t other_key = 0;   // registrations of a name bound to another identity
  std::uint64_t registered = 0;  // registrations admitted
  std::uint64_t saved = 0;       // messages committed to the store (copies for each channel member included)
  std::uint64_t delivered = 0;   // saved messages a client ACKed
  std::uint64_t relays = 0;      // channel relays sent (first transmissions)
  std::uint64_t table_updates = 0;  // table datagrams sent (first transmissions)
  std::uint64_t store_errors = 0;   // store calls that failed
  std::uint64_t remote_changes = 0; // changes other servers made, applied here (a shared store)
  /// Commit latencies (from the commit's start to the store's last answer), as a histogram:
  /// commits[i] counts those of at most kCommitBoundsUs[i] µs, the last those above every bound.
  static constexpr std::array<std::uint64_t, 12> kCommitBoundsUs{250,   500,    1'000,  2'500,   5'000,   10'000,
                                                                 25'000, 50'000, 100'000, 250'000, 500'000, 1'000'000};
  std::array<std::uint64_t, kCommitBoundsUs.size() + 1> commits{};
  std::uint64_t commit_us_sum = 0;
};

/// Single-threaded: every input runs on one thread, so no locks.
class Server {
 public:
  /// Reads the store's snapshot (blocking) before anything else: the table and the mailboxes.
  Server(ServerOptions options, std::unique_ptr<offline::AsyncStore> store, const transport::TimeSource& clock);
  /// An embedded store, adapted (offline::adapt): every store call answers at once.
  Server(ServerOptions options, std::unique_ptr<offline::Store> store, const transport::TimeSource& clock);
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;
  /// Starts the periodic work (keep-alive expiry, counter logs); the driver starts receiving.
  void start();
  /// Commits what is queued (a shared store answers later, or not: nothing is ACKed after
  /// this) and closes the core and the store's own work.
  void stop();
  /// The store, for what it reports beyond the server (its lease).
  const offline::AsyncStore& store() const { return *store_; }

  transport::Core& core() { return core_; }
  const transport::Counters& counters() const { return core_.counters(); }
  const ServerCounters& server_counters() const { return stats_; }
  const Depot& depot() const { return *depot_; }
  const Table& table() const { return table_; }
  /// True if `name` has a session (registered, not yet expired or left).
  bool has_session(const std::string& name) const { return sessions_.contains(name); }

 private:
  /// What the server tracks for a registered client beyond its table row. A new registration
  /// makes a new Session; callbacks hold a weak_ptr, so a stale one finds it gone.
  struct Session {
    /// Saved messages on their way: none, a Stored datagram in flight, or waiting for the
    /// client's next keep-alive after one went unanswered.
    enum class Delivery { none, sending, stalled } delivery = Delivery::none;
    /// The client's table: up to date or idle, a Table datagram in flight, or waiting for the
    /// next keep-alive after one went unanswered.
    enum class Sync { idle, sending, stalled } sync = Sync::idle;
    std::uint64_t have = 0;        // table version the client confirmed (in our epoch)
    offline::Cursor delivered;     // last saved message the client ACKed in this session
    offline::Cursor sent;          // last saved message sent to it (in flight or ACKed)
    std::size_t delivered_count = 0;
    bool rewound = false;          // this drain restarted from the oldest message, and nothing
                                   // committed behind `sent` since
    transport::Time heard{};       // last time anything came from the client
    transport::Duration keepalive{};  // the client's interval (its registration says), else ours
    transport::Time resumed{};     // last time a keep-alive restarted what had stalled
    std::uint64_t stored_request = 0;  // the Stored datagram in flight, if any
    /// Saved messages read from the store after `delivered` and not yet ACKed, oldest first:
    /// one read serves several Stored datagrams. The one in flight is its front part. (A
    /// vector: empty, it costs no allocation, unlike a deque, in every idle session.)
    std::vector<offline::StoredMessage> ahead;
    std::uint64_t table_request = 0;   // the Table datagram in flight, if any
    bool files_offered = false;        // the files kept for it were offered in this session
  };
  using SessionRef = std::weak_ptr<Session>;
  using AfterCommit = std::function<void(bool ok)>;
  /// What became of a registration's row: durable, refused by the store (another server bound
  /// the name to another identity first), or not saved (the store failed).
  enum class RowResult { written, refused, failed };
  using AfterRow = std::function<void(RowResult)>;
  struct Dispatch;

  void on_message(const protocol::Message& m, const udp::endpoint& from);
  void on_register(const protocol::Register& r, const udp::endpoint& from);
  /// A registration whose token and proof checked: the name's holder, if online elsewhere, is asked first.
  void on_proven(const protocol::Register& r, const udp::endpoint& from);
  void admit(const protocol::Register& r, const udp::endpoint& from);
  void on_dereg(const protocol::Dereg& r, const udp::endpoint& from);
  void on_save(const protocol::Save& r, const udp::endpoint& from);
  void on_channel(const protocol::Channel& r, const udp::endpoint& from);
  void on_keepalive(const protocol::KeepAlive& k, const udp::endpoint& from);
  void on_lookup(const protocol::Lookup& l, const udp::endpoint& from);
  void unexpected(const protocol::Message& m, const udp::endpoint& from);

  Session* session(const std::string& name);
  /// Ends `name`'s session: its Table and Stored datagrams still in flight are dropped, so a new
  /// process at the same address is never shown what was meant for the old one.
  void end_session(const std::string& name);
  /// True if `name` has a session and its row's address is exactly `from` (a sender must be
  /// who it claims); notes that the client was heard.
  bool is_at(const std::string& name, const udp::endpoint& from);
  /// True if the server holds a live session for `name` at `from` (what a keep-alive asks).
  bool live(const std::string& name, const udp::endpoint& from);
  static udp::endpoint endpoint_of(const Client& c);
  /// Asks client `name`, believed to be at `to`, whether it is alive, within one ACK timeout.
  /// The probe names it: another client that took over the address does not answer for it.
  void probe(const std::string& name, const udp::endpoint& to, std::function<void(bool alive)> then);
  /// One channel message on its way to every member: shared by all the relays, each of which
  /// is encoded for its own member (a Relay names its recipient).
  struct Fanout {
    protocol::Channel channel;
    std::int64_t ts_us = 0;
    std::string from_key;  // the sender's identity, kept with each saved copy
    protocol::Shared relay;  // the Relay encoded once; each member's copy only adds its name and id
  };
  void relay(const std::string& to, std::shared_ptr<const Fanout> fan);
  /// True if `name`'s session is still the one `ref` was taken from (none then, none now included).
  bool same_session(const std::string& name, const SessionRef& ref);

  void set_online(const std::string& name, bool online);
  /// Marks `name` offline after an unanswered probe or relay; its session goes on, so a live
  /// client hears it (table update, keep-alive answer) and registers again.
  void mark_silent(const std::string& name);
  /// `persist`: the row is written to the store at the next flush (false: the change came
  /// from the store, another server made it).
  void table_changed(const std::string& name, bool persist = true);
  /// A change another server made to the shared store.
  void on_change(const offline::Change& c);
  void on_mail_change(const std::string& to, std::int64_t delta);
  /// Saved messages for `to` are in the store: delivered if its session is here.
  void mail_arrived(const std::string& to);
  /// A client row as the store has it now; `here`: this server holds its session.
  void on_row(const offline::ClientRow& row, bool here);
  /// The operator released `name`: its session ends, its row stays offline and unbound.
  void on_released(const std::string& name);
  /// The whole shared state, read again after a gap in the change log: rows applied, rows gone
  /// released, mailbox counts replaced.
  void on_resync(const offline::Snapshot& s);
  void sync(const std::string& name);
  void send_table(const std::string& name);
  /// The table chunk after version `have`, encoded once per table version and shared by every
  /// client that lacks the same versions (in a storm, most of them): valid until the next call.
  const protocol::Shared& chunk_after(std::uint64_t have);
  void sync_all();
  /// A delivery or a table update went unanswered (or the store failed): it waits for the
  /// client's next keep-alive.
  void stall_delivery(const std::string& name, Session& s, const char* why);
  void stall_sync(const std::string& name, Session& s);
  /// A live client's keep-alive: whatever stalled for want of an answer goes again.
  void resume(const std::string& name, Session& s);
  /// Ends every session not heard from for kMissedKeepalives intervals.
  void expire_silent();

  /// The identity `name` is bound to, as bytes for the store (empty if unknown).
  std::string key_of(const std::string& name) const;
  void save(offline::NewMessage m, AfterCommit after);
  void schedule_flush();
  /// Commits the queued saves, then the changed rows; one commit at a time, the saves queued
  /// meanwhile go in the next (group commit).
  void flush();
  /// The second step of a commit: the changed rows, then the answers.
  void commit_rows(transport::Time started);
  void commit_done(transport::Time started);

  void deliver(const std::string& name);
  /// Reads ahead (asynchronously) when few saved messages are read, then send_stored().
  void deliver_batch(const std::string& name);
  /// Sends the next Stored datagram from what was read ahead, or ends the drain.
  void send_stored(const std::string& name);
  /// The end of a drain: the mailbox counted again, then another pass or online.
  void end_drain(const std::string& name);
  /// Once per session, after its saved messages: offers the files kept for `name`.
  void offer_files(const std::string& name);
  /// Deletes the saved messages clients ACKed since the last flush.
  void remove_delivered();
  /// Deletes ACKed messages soon, in one transaction with others: at the next flush, after
  /// kRemoveDelay, or at once when kRemoveBatch are waiting.
  void schedule_removal(std::size_t more);
  /// Calls `then(true)` once client `name` at `to` may be sent a full datagram: at once if the
  /// address has proven it receives (or has budget), else after `name` answered a probe there;
  /// `then(false)` if it did not.
  void reach(const std::string& name, const udp::endpoint& to, std::function<void(bool)> then);
  /// reach() for a registered client's session: `then(session)` if reachable, `failed(session)`
  /// if not; nothing if its session changed meanwhile.
  void reach_client(const std::string& name, std::function<void(Session&)> then,
                    std::function<void(Session&)> failed);
  /// Saved messages for `name`: read from the store's snapshot at start, kept up to date by
  /// commits, deliveries, other servers' changes and a count at the end of each drain.
  std::size_t& mailbox(const std::string& name);
  /// True if `name`'s mailbox holds max_stored messages, counting those accepted and not yet
  /// committed (queued for the next commit, or in the commit under way).
  bool mailbox_full(const std::string& name);
  void store_failed(const std::string& what, const std::string& why);
  void log_stats();
  void check_quiet();

  ServerOptions options_;
  std::unique_ptr<offline::AsyncStore> store_;
  transport::Core core_;
  Table table_;
  std::unique_ptr<Depot> depot_;
  std::unordered_map<std::string, std::shared_ptr<Session>> sessions_;
  /// What one commit writes and whom it answers: the saves (with their answers and their
  /// count per recipient), then the changed rows (with the registrations among them and the
  /// answers of those that bind a name).
  struct Commit {
    std::vector<offline::NewMessage> saves;
    std::vector<AfterCommit> after_saves;
    std::unordered_map<std::string, std::size_t> per_recipient;
    std::vector<std::string> rows;
    /// Of `rows`: registered here (this server holds the session), with the row as registered
    /// (the table's may have been overwritten by another server's change since).
    std::unordered_map<std::string, offline::ClientRow> claimed;
    std::vector<std::pair<std::string, AfterRow>> after_rows;
    bool empty() const { return saves.empty() && rows.empty(); }
  };
  Commit next_;       // queued for the next commit
  Commit committing_;  // the commit under way (with commit_in_flight_)
  bool commit_in_flight_ = false;
  std::unordered_map<std::string, int> binding_;  // bindings on their way to the store, per name
  identity::TokenMinter minter_;
  /// The newest token each name registered with (steady µs): an older or equal one is a replay.
  std::unordered_map<std::string, std::int64_t> last_token_;
  std::unordered_map<std::string, std::vector<std::int64_t>> undeleted_;  // ACKed, not yet deleted
  std::size_t undeleted_count_ = 0;
  transport::Core::TimerId removal_timer_ = 0;
  std::unordered_map<std::string, std::size_t> mailbox_;
  std::size_t legacy_ = 0;  // v1 messages the store keeps and never delivers
  ServerCounters stats_;
  transport::Counters last_logged_;
  std::unordered_map<std::uint64_t, protocol::Shared> chunks_;  // chunk_after()'s, by `have`
  std::uint64_t chunks_version_ = 0;
  std::uint64_t chunks_epoch_ = 0;
  std::uint64_t quiet_at_received_ = 0;  // the core's `received` count at the last on_quiet
  bool flush_scheduled_ = false;
  bool sync_scheduled_ = false;
};

}  // namespace chat::registry
