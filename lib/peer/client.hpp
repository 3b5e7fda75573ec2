// The peer's decisions: registration and keep-alives, the prompt's commands, direct chat, the
// offline fallback, the channel, saved messages, every status line. No socket, no terminal and
// no clock of its own: it runs on a transport::Core and talks to the user through ClientIo.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "identity/envelope.hpp"
#include "identity/identity.hpp"
#include "identity/peer_state.hpp"
#include "peer/commands.hpp"
#include "peer/files.hpp"
#include "peer/local_table.hpp"
#include "transport/core.hpp"

namespace chat::peer {

/// How many of the user's messages may be outstanding: typed faster than they are answered
/// (a paste of 10,000 lines), the rest wait in order instead of failing in the transport.
struct Backlog {
  /// Messages in flight to one destination at most (one peer; or the server, for saves,
  /// channel messages and lookups). Far below the transport's bound per address
  /// (Guard::max_in_flight), so a burst never reaches it.
  std::size_t window = 256;
  /// Messages waiting for a slot, over all destinations, at most; past it a typed message is
  /// refused at the prompt with a line saying so.
  std::size_t max_waiting = 100'000;
};

struct ClientOptions {
  std::string name;
  udp::endpoint server;
  /// More servers sharing the first one's store (SPEC §13), tried in order (then the first
  /// again) when the one in use stops answering. Relays and probes are taken from any of them.
  std::vector<udp::endpoint> fallbacks{};
  transport::RetryPolicy policy;
  /// How often a registered client tells the server it is there (SPEC §10), with ±10 % jitter.
  std::chrono::milliseconds keepalive{15'000};
  /// Seeds the core's ids and the jitter; 0 = random (simulations pass their own).
  std::uint64_t seed = 0;
  Backlog backlog{};
  /// File transfers: where received files go, their timings.
  FileOptions files{};
};

/// Keep-alive intervals without any answer before the client says the server is not responding
/// (or, with fallbacks, moves to the next server).
inline constexpr int kServerSilentIntervals = 3;

/// What the core asks of its surroundings.
struct ClientIo {
  /// Shows one line to the user.
  std::function<void(const std::string& line)> print;
  /// Commands may be read from now on (called once).
  std::function<void()> start_input;
  /// The client is done; the process ends with `code`.
  std::function<void(int code)> exit;
  /// Redraws the progress line of file transfers in place (empty text: removes it). Not set
  /// off a terminal: a line every 10 % is printed instead.
  std::function<void(const std::string& text)> progress{};
};

/// What the client counted: datagrams it dropped, and messages it did not show.
struct ClientCounters {
  std::uint64_t unexpected = 0;  // datagram types a peer is never sent
  std::uint64_t unverified = 0;  // direct messages whose source is not the sender's table address
  std::uint64_t not_from_server = 0;  // server-only datagrams (table, relay, ...) from elsewhere
  std::uint64_t not_for_me = 0;  // server requests (table, relay, probe, stored) naming another client
  std::uint64_t unauthenticated = 0;  // messages and receipts that did not open or verify as their sender's
  std::uint64_t replayed = 0;  // messages already shown (or too old to tell), not shown again
  std::uint64_t blocked = 0;   // messages from a sender the user blocked
  std::uint64_t backlog_full = 0;  // messages refused at the prompt: Backlog::max_waiting already waiting
};

/// Single-threaded, like its core.
class Client {
 public:
  /// `me` is the identity the name is registered with; `state` keeps pins, blocks and the
  /// messages already shown (a file, or ":memory:" in simulations).
  Client(ClientOptions options, const transport::TimeSource& clock, ClientIo io, identity::Identity me,
         std::unique_ptr<identity::PeerState> state);
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  /// Registers with the server; commands are read once the first table arrived.
  void start();
  /// One typed line.
  void on_line(const std::string& line);
  /// End of input: the requests in flight finish, each with its status line, then the client exits.
  void on_end_of_input();
  /// Leaves at once without telling the server (SIGINT, SIGHUP, SIGTERM).
  void leave();

  transport::Core& core() { return core_; }
  const LocalTable& table() const { return table_; }
  const ClientCounters& client_counters() const { return stats_; }
  /// The file transfers (their counters).
  const Transfers& transfers() const { return *transfers_; }
  /// Names for Tab completion (the local table).
  std::vector<std::string> names() const;
  bool online() const { return state_ == State::online; }
  /// User requests whose status line is still to come (in flight or waiting for a slot).
  std::size_t busy() const { return busy_ + waiting_; }
  /// Messages waiting for a slot in their destination's window.
  std::size_t waiting() const { return waiting_; }

 private:
  enum class State { registering, online, offline };
  /// Why a registration is sent: the first at start, `reg` typed while offline (after dereg),
  /// `reg` typed while online (after a keep-alive said the session is gone), or one of our own
  /// after the server lost track of us.
  enum class Reason { first, back, typed, rejoin };
  struct Dispatch;
  /// One message waiting for a slot: called with true to send it, or with false when its
  /// destination stopped answering meanwhile, to take its fallback (the server, or the line
  /// that says the server does not answer).
  using Entry = std::function<void(bool answering)>;
  /// The messages to one destination: a peer's name, or "" for the server.
  struct Lane {
    std::deque<Entry> again;    // sent back to this peer (the server said it exists): go first
    std::deque<Entry> waiting;  // in the order typed
    std::size_t in_flight = 0;
    // The last of its requests to end got no answer: the waiting ones are held until those
    // in flight end; if none of them is answered either, the waiting ones take their fallback.
    bool silent = false;
  };

  void begin_input();
  void run(const Command& c);
  /// A request whose status line the user waits for: end of input waits for it too.
  void user_request(const protocol::Message& m, const udp::endpoint& to, transport::Core::Done done);
  /// A request to the server in use: any answer is news that the server is there.
  void server_request(const protocol::Message& m, transport::Core::Done done,
                      std::optional<transport::RetryPolicy> policy = std::nullopt, bool user = true);
  /// False (and the refusal said) if Backlog::max_waiting messages already wait.
  bool room_for_one();
  /// Queues `e` on lane `key` (`again`: ahead of the typed ones) and sends what the window allows.
  void enqueue(const std::string& key, Entry e, bool again = false);
  /// Starts the waiting entries of lane `key` that fit its window (or, silent with nothing in
  /// flight, hands them all their fallback, in order).
  void pump(const std::string& key);
  /// Sends `m` as one of lane `key`'s requests (to the peer `to`, or the server for ""), a
  /// user request; `done` says whether the destination answered.
  void lane_request(const std::string& key, const protocol::Message& m, const udp::endpoint& to,
                    std::function<bool(const protocol::Message* reply)> done);
  void lane_done(const std::string& key, bool answered);
  void send(const std::string& to, const std::string& text);
  /// A typed message taken from the lane: sealed now, sent directly or (offline) saved.
  void start_message(const std::string& to, const std::string& text, bool answering);
  /// `admitted`: already counted against Backlog::max_waiting (it waited for a lookup).
  void send_known(const std::string& to, const std::string& text, bool admitted);
  /// False (and why said) if the user may not send to `to` now: blocked, key changed, no key.
  bool may_send(const std::string& to);
  /// `body` is the message sealed for `to`: the same bytes go directly and to the server.
  void send_direct(const std::string& to, const std::string& body, std::uint64_t mid, int round);
  void send_save(const std::string& to, const std::string& body, std::uint64_t mid, int round);
  void send_channel(const std::string& text);
  void send_register(Reason why);
  /// The second step of a registration: the challenge's token, signed.
  void send_proof(Reason why, const std::string& token);
  /// `reg <own name>` while online: asks the server whether it holds our session.
  void confirm_registration();
  void on_registered(const protocol::Message* reply, Reason why);
  void schedule_keepalive();
  void send_keepalive();
  void heard_from_server();
  /// After a refusal: a keep-alive now, which registers again if the session is gone.
  void check_session();
  void rejoin();
  void on_message(const protocol::Message& m, const udp::endpoint& from);
  void on_direct(const protocol::Direct& d, const udp::endpoint& from);
  /// A Direct whose body opened as the sender's file control message `m` (mid checked): false if
  /// its payload does not decode.
  bool on_file_control(const protocol::Direct& d, const udp::endpoint& from, const protocol::Key& key,
                       const identity::Opened& m);
  /// FileHost::send_control: `c` sealed for `to`, in a Direct, a user request.
  void send_file_control(const std::string& to, const files::Control& c, std::function<void(bool)> done);
  void run_files(const Command& c);
  void on_relay(const protocol::Relay& r, const udp::endpoint& from);
  void on_probe(const protocol::Probe& p, const udp::endpoint& from);
  /// True if a server request (of `type`, for logs) is to be answered: it came from the
  /// server's address, names us as its `recipient`, and we are online. Counts the first two failures.
  /// `any_server`: from any of the servers the client knows (relays and probes: a server
  /// sharing the store reaches its clients too), else only from the one in use.
  bool for_me(const char* type, const std::string& recipient, const udp::endpoint& from, bool any_server = false);
  /// The server in use.
  const udp::endpoint& server() const { return servers_[current_]; }
  /// True if `from` is the server in use or one of the fallbacks.
  bool known_server(const udp::endpoint& from) const;
  /// The server in use stopped answering: the next one is used, with a line saying so.
  void next_server();
  void on_table(const protocol::Table& t, const udp::endpoint& from);
  void on_stored(const protocol::Stored& s, const udp::endpoint& from);
  /// A file the server keeps for us: offered if it opens as its sender's and is not blocked.
  void on_file_offer(const protocol::FileOffer& f, const udp::endpoint& from);
  void unexpected(const protocol::Message& m, const udp::endpoint& from);
  /// Pins the keys of rows new to us, and warns once about a key that differs from its pin.
  void observe(const protocol::Entry& e);
  /// The key messages from and to `name` are checked with: its pin, if the table agrees with
  /// it; none if the name is unknown, has no key yet, or its key changed and is not trusted.
  std::optional<protocol::Key> usable_key(const std::string& name) const;
  /// The pairwise key with `peer` (computed once).
  const identity::Pair& pair(const protocol::Key& peer);
  void warn_changed(const std::string& name);
  /// warn_changed() once per new key of `name`.
  void warn_once(const std::string& name);
  /// Shows one saved message if it opens (or verifies) as its sender's, is not blocked and is new.
  void show_stored(const protocol::StoredItem& item);
  /// After `trust name`: the saved messages its new key sealed, held until then.
  void show_held(const std::string& name);
  /// True (and remembered, durably) the first time this message of `sender` is seen.
  bool first_seen(const protocol::Key& sender, std::uint8_t kind, std::uint64_t mid, std::uint64_t sent_ms);
  std::uint64_t now_ms() const;
  /// The identity commands: fingerprint, verify, trust, block, unblock, blocked.
  void run_identity(const Command& c);
  void say(const std::string& line);
  /// Prints a block of lines (help, list).
  void show(const std::string& text);
  void fail_and_exit(const char* line);
  void quit(int code);
  void finished_one();
  /// While closing: exits if nothing is in flight or waiting; else (re)arms the guard timer.
  void check_closing();

  ClientOptions options_;
  std::vector<udp::endpoint> servers_;  // options_.server, then the fallbacks
  std::size_t current_ = 0;             // the one in use
  std::size_t tried_ = 0;               // servers tried in a row without an answer (the first registration)
  transport::Core core_;
  ClientIo io_;
  identity::Identity me_;
  std::unique_ptr<identity::PeerState> state_db_;
  std::map<protocol::Key, identity::Pair> pairs_;
  std::set<std::pair<std::string, protocol::Key>> warned_;  // key changes already announced
  std::vector<protocol::StoredItem> held_;  // saved messages from a changed key, waiting for `trust`
  LocalTable table_;
  State state_ = State::registering;
  ClientCounters stats_;
  bool reading_ = false;
  bool was_online_ = false;     // our own row was seen online since we registered
  bool rejoining_ = false;      // our own re-registration is in flight
  bool server_silent_ = false;  // "[Server not responding]" shown; waiting for an answer
  bool closing_ = false;        // end of input: exit once busy_ reaches 0
  bool done_ = false;
  std::size_t busy_ = 0;        // user requests in flight whose status line is still to come
  std::size_t waiting_ = 0;     // entries in all lanes, not yet started
  std::map<std::string, Lane> lanes_;  // by destination; a lane with nothing in it is erased
  int pumping_ = 0;             // pump() calls under way (nested: an entry may queue on another lane)
  transport::Time last_answer_{};
  transport::Core::TimerId ready_timer_ = 0;
  transport::Core::TimerId keepalive_timer_ = 0;
  transport::Core::TimerId closing_timer_ = 0;
  std::unique_ptr<Transfers> transfers_;  // after the core: its timers are the core's
};

}  // namespace chat::peer
