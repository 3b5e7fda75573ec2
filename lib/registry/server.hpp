// The registry server: client table, table distribution, store-and-forward and the channel.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "offline/store.hpp"
#include "registry/table.hpp"
#include "transport/endpoint.hpp"

namespace chat::registry {

struct ServerOptions {
  udp::endpoint bind;
  transport::RetryPolicy policy;  // for table updates and deliveries (SPEC: 500 ms x 6)
  /// For probes and channel relays: the whole wait is `policy.timeout` (SPEC §6), resent inside it.
  int relay_retries = 2;
  /// Flood and spoofing protections (rate per source, amplification limit, in-flight bound).
  transport::Guard guard{2000, 3, 4096};
  /// Saved messages kept per recipient at most; further saves are refused with a reason.
  std::size_t max_stored = 100'000;
  /// Registered names at most; a new name past it is refused.
  std::size_t max_clients = 100'000;
  /// How often dropped-datagram counters are logged (when they changed).
  std::chrono::seconds stats_interval{10};
};

/// Single-threaded: every handler runs on the one io_context thread, so no locks.
class Server {
 public:
  Server(net::io_context& io, ServerOptions options, std::unique_ptr<offline::Store> store);
  void start();
  void stop();
  const transport::Counters& counters() const { return endpoint_.counters(); }
  const Table& table() const { return table_; }
  udp::endpoint local_endpoint() const { return endpoint_.local_endpoint(); }
  /// The server's endpoint (tests and fuzzing inject datagrams and hook sends through it).
  transport::Endpoint& endpoint() { return endpoint_; }

 private:
  // What the server tracks for a client beyond its table row.
  struct Session {
    bool active = false;       // registered and reachable: gets table updates
    bool syncing = false;      // a Table datagram is in flight
    bool delivering = false;   // saved messages are being delivered
    std::uint64_t have = 0;    // table version the client confirmed (in our epoch)
    std::uint64_t gen = 0;     // bumped on every (re)registration or leave: stale callbacks see it
    std::int64_t delivered_seq = 0;     // highest stored seq the client ACKed in this session
    std::size_t delivered_count = 0;    // saved messages delivered in this session's drain
  };
  using AfterCommit = std::function<void(bool ok)>;

  void on_message(const protocol::Message& m, const udp::endpoint& from);
  void on_register(const protocol::Register& r, const udp::endpoint& from);
  void admit(const protocol::Register& r, const udp::endpoint& from);
  void on_dereg(const protocol::Dereg& r, const udp::endpoint& from);
  void on_save(const protocol::Save& r, const udp::endpoint& from);
  void on_channel(const protocol::Channel& r, const udp::endpoint& from);

  /// True if `name` is registered online at exactly `from` (a sender must be who it claims).
  bool is_at(const std::string& name, const udp::endpoint& from) const;
  static udp::endpoint endpoint_of(const Client& c);
  /// Asks `to` whether it is alive, within one ACK timeout.
  void probe(const udp::endpoint& to, std::function<void(bool alive)> then);
  /// One channel message on its way to every member: shared by all the relays.
  struct Fanout {
    protocol::Channel channel;
    std::int64_t ts_us;
    std::string relay;  // the Relay datagram, encoded with a placeholder id
  };
  void relay(const std::string& to, std::shared_ptr<const Fanout> fan);

  void set_online(const std::string& name, bool online);
  /// Ends `name`'s session and marks it offline (a table update or delivery went unanswered).
  void mark_gone(const std::string& name);
  /// Marks `name` offline after an unanswered probe or relay, still sending it table updates.
  void mark_silent(const std::string& name);
  void table_changed(const std::string& name);
  void sync(const std::string& name);
  void send_table(const std::string& name);
  void sync_all();

  void save(offline::NewMessage m, AfterCommit after);
  void schedule_flush();
  void flush();

  void deliver(const std::string& name);
  void deliver_batch(const std::string& name);
  /// Deletes the saved messages clients ACKed since the last flush.
  void remove_delivered();
  /// Calls `then(true)` once `to` may be sent a full datagram: at once if it has proven it
  /// receives (or has budget), else after it answered a probe; `then(false)` if it did not.
  void reach(const udp::endpoint& to, std::function<void(bool)> then);
  /// reach() for a registered client: `then(name)` if it is reachable, else its session ends;
  /// nothing if its session changed meanwhile.
  void reach_client(const std::string& name, void (Server::*then)(const std::string&));
  /// The session of `name` if it is still generation `gen`, else nullptr.
  Session* current(const std::string& name, std::uint64_t gen);
  /// Saved messages for `name`, counted once from the store and then kept up to date.
  std::size_t& mailbox(const std::string& name);
  void log_stats();

  net::io_context& io_;
  ServerOptions options_;
  std::unique_ptr<offline::Store> store_;
  transport::Endpoint endpoint_;
  Table table_;
  std::unordered_map<std::string, Session> sessions_;
  std::vector<offline::NewMessage> unsaved_;
  std::vector<AfterCommit> after_commit_;
  std::vector<std::string> dirty_rows_;
  std::unordered_map<std::string, std::vector<std::int64_t>> undeleted_;  // ACKed, not yet deleted
  std::unordered_map<std::string, std::size_t> mailbox_;
  net::steady_timer stats_timer_;
  transport::Counters last_logged_;
  bool flush_scheduled_ = false;
  bool sync_scheduled_ = false;
};

/// Microseconds since the Unix epoch, as gettimeofday() gives.
std::int64_t now_us();

}  // namespace chat::registry
