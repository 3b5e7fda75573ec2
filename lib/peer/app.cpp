// Wiring the client core to Asio: the terminal's lines and the socket's datagrams in, output out.
#include "peer/app.hpp"

namespace chat::peer {

ClientApp::ClientApp(net::io_context& io, ClientOptions options, const udp::endpoint& bind, identity::Identity me,
                     std::unique_ptr<identity::PeerState> state)
    : io_(io),
      terminal_(io),
      client_(std::move(options), transport::system_clock(),
              ClientIo{
                  [this](const std::string& line) { terminal_.print(line); },
                  [this] {
                    terminal_.start([this](const std::string& line) { endpoint_.turn([&] { client_.on_line(line); }); },
                                    [this] { endpoint_.turn([&] { client_.on_end_of_input(); }); },
                                    [this] { return client_.names(); });
                  },
                  [this](int code) { exit(code); },
                  terminal_.interactive() ? std::function<void(const std::string&)>(
                                                [this](const std::string& text) { terminal_.status(text); })
                                          : nullptr,
              },
              std::move(me), std::move(state)),
      endpoint_(io, client_.core(), bind) {}

void ClientApp::start() {
  endpoint_.start();
  endpoint_.turn([&] { client_.start(); });
}

void ClientApp::leave() { client_.leave(); }

void ClientApp::exit(int code) {
  exit_code_ = code;
  endpoint_.close();
  terminal_.stop();
  io_.stop();
}

}  // namespace chat::peer
