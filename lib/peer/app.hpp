// The peer as a process: the client core, its UDP endpoint and the terminal on one io_context.
#pragma once

#include "peer/client.hpp"
#include "peer/terminal.hpp"
#include "transport/endpoint.hpp"

namespace chat::peer {

/// Carries out what the Client core decides: lines to the terminal, datagrams to the socket,
/// typed lines and end of input back to the core. Single-threaded.
class ClientApp {
 public:
  /// Binds `bind`; throws boost::system::system_error if it cannot (port in use...).
  ClientApp(net::io_context& io, ClientOptions options, const udp::endpoint& bind, identity::Identity me,
            std::unique_ptr<identity::PeerState> state);
  /// Registers and starts receiving.
  void start();
  /// Leaves at once without telling the server (SIGINT, SIGHUP, SIGTERM).
  void leave();
  int exit_code() const { return exit_code_; }

 private:
  void exit(int code);

  net::io_context& io_;
  Terminal terminal_;
  Client client_;
  transport::Endpoint endpoint_;
  int exit_code_ = 0;
};

}  // namespace chat::peer
