// The peer: registration, the prompt, direct chat, offline fallback, the channel, saved messages.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <unordered_set>

#include "peer/commands.hpp"
#include "peer/local_table.hpp"
#include "peer/terminal.hpp"
#include "transport/endpoint.hpp"

namespace chat::peer {

struct ClientOptions {
  std::string name;
  udp::endpoint server;
  udp::endpoint bind;
  transport::RetryPolicy policy;
};

/// Single-threaded: stdin, the socket and the timers all run on one io_context.
class Client {
 public:
  Client(net::io_context& io, ClientOptions options);
  /// Registers and starts reading commands; the process exit code comes from exit_code().
  void start();
  /// Leaves at once without telling the server (SIGINT, SIGHUP, SIGTERM, end of input).
  void leave();
  int exit_code() const { return exit_code_; }
  /// The client's endpoint (tests and fuzzing inject datagrams and hook sends through it).
  transport::Endpoint& endpoint() { return endpoint_; }

 private:
  enum class State { registering, online, offline };

  /// Starts reading commands (once): after the first table arrived, or when it is overdue.
  void begin_input();
  void on_line(const std::string& line);
  void run(const Command& c);
  void send_direct(const std::string& to, const std::string& text, std::uint64_t mid, int round);
  void send_save(const std::string& to, const std::string& text, std::uint64_t mid, int round);
  void send_register(bool rejoin = false);
  void on_message(const protocol::Message& m, const udp::endpoint& from);
  void on_table(const protocol::Table& t, const udp::endpoint& from);
  void on_stored(const protocol::Stored& s, const udp::endpoint& from);
  /// True (and remembered) the first time (sender, message id) is shown.
  bool first_showing(const std::string& from, std::uint64_t mid);
  void say(const std::string& line);
  /// Prints a block of lines (help, list) above the prompt.
  void show(const std::string& text);
  void fail_and_exit(const char* line);
  void quit(int code);

  net::io_context& io_;
  ClientOptions options_;
  transport::Endpoint endpoint_;
  Terminal terminal_;
  net::steady_timer ready_timer_;
  bool reading_ = false;
  bool was_online_ = false;     // our own row was seen online since we registered
  std::uint64_t unverified_ = 0;  // direct messages dropped: source not the sender's address
  LocalTable table_;
  State state_ = State::registering;
  int exit_code_ = 0;
  // Messages already shown, by (sender, id): a saved copy of one is not shown again.
  std::unordered_set<std::string> shown_;
  std::deque<std::string> shown_order_;
};

}  // namespace chat::peer
