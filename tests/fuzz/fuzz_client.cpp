// Fuzz target: the peer client fed datagrams from its server and from peers, and typed lines.
//
// Per input: a fresh Client core "me" on a fake clock whose server is fake source 0
// (127.0.0.1:4000); its core sends only to the fake network (harness.hpp).
// The input's first byte is flags: bit 0 set = leave the Register unanswered (the client
// stays registering); else the harness answers it with RegOk{epoch 7, pending = bit 1}.
// Then ops as in harness.hpp; the `extra` op types a line ([b][len][len bytes]) once the
// client reads commands, or with source 7 ends the input (the client finishes what is in
// flight, then exits). What it prints goes nowhere (stderr when FUZZ_TRACE is set).
#include <cstdio>
#include <cstdlib>
#include <string>

#include "harness.hpp"
#include "peer/client.hpp"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  chat::fuzz::quiet_logs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace chat;
  transport::ManualClock clock;
  bool reading = false;
  bool exited = false;
  peer::ClientIo io{[](const std::string& line) {
                      if (fuzz::tracing()) std::fprintf(stderr, "  shown: %s\n", line.c_str());
                    },
                    [&] { reading = true; }, [&](int) { exited = true; }};
  peer::ClientOptions options{"me", fuzz::source(0), {}, std::chrono::seconds(15), 1};
  peer::Client client(options, clock, io);
  fuzz::FakeNetwork network(client.core(), clock);
  client.start();
  client.core().settle();

  fuzz::Reader in(data, size);
  std::uint8_t flags = in.byte();
  if ((flags & 1) == 0) network.answer_with(0, (flags & 2) != 0 ? 6 : 0);  // RegOk, pending 0 or 1

  while (!in.done() && !exited) {
    std::uint8_t b = in.byte();
    int src = b % fuzz::kSources;
    switch (static_cast<fuzz::Op>(b / fuzz::kSources % static_cast<int>(fuzz::Op::count_))) {
      case fuzz::Op::datagram: network.inject(in.bytes(in.u16()), src); break;
      case fuzz::Op::answer: network.answer(src); break;
      case fuzz::Op::answer_all: network.answer_all(); break;
      case fuzz::Op::answer_with: network.answer_with(src, in.byte()); break;
      case fuzz::Op::repeat: network.repeat(src); break;
      case fuzz::Op::extra:
        if (src == fuzz::kSources - 1) {
          client.on_end_of_input();
        } else {
          std::string line(in.bytes(in.byte()));
          if (reading) client.on_line(line);
        }
        client.core().settle();
        break;
      case fuzz::Op::advance: network.advance(in.byte()); break;
      case fuzz::Op::count_: break;
    }
  }

  client.leave();  // as on SIGINT
  return 0;
}
