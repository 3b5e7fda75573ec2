// Fuzz target: the peer client fed datagrams from its server and from peers, and typed lines.
//
// Per input: a fresh io_context and Client "me" bound to 127.0.0.1:0 whose server is fake
// source 0 (127.0.0.1:4000); its endpoint sends only to the fake network (harness.hpp).
// The input's first byte is flags: bit 0 set = leave the Register unanswered (the client
// stays registering); else the harness answers it with RegOk{epoch 7, pending = bit 1}.
// Then ops as in harness.hpp; the `extra` op types a line ([b][len][len bytes], a newline
// added) into the client's stdin, or with source 7 closes stdin (end of input = silent leave).
// Stdin is a fresh pipe per input that only this harness writes to, so reading it never
// blocks and never ends unless the input says so; the client reads it once a table arrived.
// Stdout goes to /dev/null (unless FUZZ_TRACE is set, see harness.hpp).
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <tuple>

#include "harness.hpp"
#include "peer/client.hpp"

namespace {

using namespace chat;

/// The client's stdin for one input: a pipe whose write end the harness holds.
class Stdin {
 public:
  Stdin() {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0 || ::dup2(fds[0], STDIN_FILENO) < 0) {
      std::perror("fuzz_client: stdin pipe");
      std::abort();
    }
    ::close(fds[0]);
    write_ = fds[1];
  }
  Stdin(const Stdin&) = delete;
  Stdin& operator=(const Stdin&) = delete;
  ~Stdin() { close(); }

  /// Types `line` and Enter; dropped if the pipe is full (64 KiB: far more than an input holds).
  void type(std::string_view line) {
    if (write_ < 0) return;
    std::string s(line);
    s += '\n';
    if (fuzz::tracing()) std::fprintf(stderr, "type: %s", s.c_str());
    std::ignore = ::write(write_, s.data(), s.size());
  }
  /// End of input (Ctrl+D, a closed pipe).
  void close() {
    if (write_ >= 0) ::close(write_);
    write_ = -1;
  }

 private:
  int write_ = -1;
};

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet_logs();
  if (!fuzz::tracing() && std::freopen("/dev/null", "w", stdout) == nullptr) {
    std::perror("fuzz_client: stdout");
    std::abort();
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Stdin input;
  net::io_context io;
  peer::ClientOptions options{"me", fuzz::source(0), udp::endpoint(net::ip::address_v4::loopback(), 0), {}};
  peer::Client client(io, options);
  fuzz::FakeNetwork network(client.endpoint());
  client.start();
  io.poll();

  fuzz::Reader in(data, size);
  std::uint8_t flags = in.byte();
  if ((flags & 1) == 0) network.answer_with(0, (flags & 2) != 0 ? 6 : 0);  // RegOk, pending 0 or 1
  io.poll();

  while (!in.done()) {
    std::uint8_t b = in.byte();
    int src = b % fuzz::kSources;
    switch (static_cast<fuzz::Op>(b / fuzz::kSources % static_cast<int>(fuzz::Op::count_))) {
      case fuzz::Op::datagram: network.inject(in.bytes(in.u16()), src); break;
      case fuzz::Op::answer: network.answer(src); break;
      case fuzz::Op::answer_all: network.answer_all(); break;
      case fuzz::Op::answer_with: network.answer_with(src, in.byte()); break;
      case fuzz::Op::repeat: network.repeat(src); break;
      case fuzz::Op::extra:
        if (src == fuzz::kSources - 1) input.close();
        else input.type(in.bytes(in.byte()));
        break;
      case fuzz::Op::count_: break;
    }
    io.poll();
  }

  client.leave();  // as on SIGINT
  io.poll();
  return 0;
}
