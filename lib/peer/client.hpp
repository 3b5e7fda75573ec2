// The peer's decisions: registration and keep-alives, the prompt's commands, direct chat, the
// offline fallback, the channel, saved messages, every status line. No socket, no terminal and
// no clock of its own: it runs on a transport::Core and talks to the user through ClientIo.
#pragma once

#include <chrono>
#include <cstdint>
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
#include "peer/local_table.hpp"
#include "transport/core.hpp"

namespace chat::peer {

struct ClientOptions {
  std::string name;
  udp::endpoint server;
  transport::RetryPolicy policy;
  /// How often a registered client tells the server it is there (SPEC §10), with ±10 % jitter.
  std::chrono::milliseconds keepalive{15'000};
  /// Seeds the core's ids and the jitter; 0 = random (simulations pass their own).
  std::uint64_t seed = 0;
};

/// Keep-alive intervals without any answer before the client says the server is not responding.
inline constexpr int kServerSilentIntervals = 3;

/// What the core asks of its surroundings.
struct ClientIo {
  /// Shows one line to the user.
  std::function<void(const std::string& line)> print;
  /// Commands may be read from now on (called once).
  std::function<void()> start_input;
  /// The client is done; the process ends with `code`.
  std::function<void(int code)> exit;
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
  /// Names for Tab completion (the local table).
  std::vector<std::string> names() const;
  bool online() const { return state_ == State::online; }
  /// User requests whose status line is still to come.
  std::size_t busy() const { return busy_; }

 private:
  enum class State { registering, online, offline };
  /// Why a registration is sent: the first at start, `reg` typed while offline (after dereg),
  /// `reg` typed while online (after a keep-alive said the session is gone), or one of our own
  /// after the server lost track of us.
  enum class Reason { first, back, typed, rejoin };
  struct Dispatch;

  void begin_input();
  void run(const Command& c);
  /// A request whose status line the user waits for: end of input waits for it too.
  void user_request(const protocol::Message& m, const udp::endpoint& to, transport::Core::Done done);
  /// A request to the server: any answer is news that the server is there.
  void server_request(const protocol::Message& m, transport::Core::Done done,
                      std::optional<transport::RetryPolicy> policy = std::nullopt, bool user = true);
  void send(const std::string& to, const std::string& text);
  void send_known(const std::string& to, const std::string& text);
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
  void on_relay(const protocol::Relay& r, const udp::endpoint& from);
  void on_probe(const protocol::Probe& p, const udp::endpoint& from);
  /// True if a server request (of `type`, for logs) is to be answered: it came from the
  /// server's address, names us as its `recipient`, and we are online. Counts the first two failures.
  bool for_me(const char* type, const std::string& recipient, const udp::endpoint& from);
  void on_table(const protocol::Table& t, const udp::endpoint& from);
  void on_stored(const protocol::Stored& s, const udp::endpoint& from);
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

  ClientOptions options_;
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
  std::size_t busy_ = 0;        // user requests whose status line is still to come
  transport::Time last_answer_{};
  transport::Core::TimerId ready_timer_ = 0;
  transport::Core::TimerId keepalive_timer_ = 0;
};

}  // namespace chat::peer
