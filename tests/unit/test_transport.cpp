// Loopback tests of the reliable socket (a Core driven by its Endpoint, real sockets on 127.0.0.1)
// and of the duplicate filter alone.
#include <doctest/doctest.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include "protocol/codec.hpp"
#include "transport/dedup.hpp"
#include "transport/endpoint.hpp"
#include "transport/net.hpp"

namespace {

namespace proto = chat::protocol;
namespace net = chat::net;
using chat::Clock;
using chat::error_code;
using chat::udp;
using chat::transport::DuplicateFilter;
// The reliable socket under test: a transport Core driven by its Asio Endpoint.
using Endpoint = chat::transport::Socket;
using chat::transport::RequestKey;
using chat::transport::RetryPolicy;
using namespace std::chrono_literals;

const net::ip::address_v4 kLoopback = net::ip::make_address_v4("127.0.0.1");
const udp::endpoint kAnyLoopbackPort{kLoopback, 0};
// Upper bound for anything a test waits for; generous so a loaded machine does not fail a test.
constexpr auto kDeadline = 10s;
// Short retry policy: tests finish quickly and still tell "answered" from "retried".
const RetryPolicy kFast{30ms, 3};

// Runs handlers until `pred` holds or `limit` passes; false on timeout. Never sleeps.
template <class Pred>
bool run_until(net::io_context& io, Pred pred, Clock::duration limit = kDeadline) {
  const auto deadline = Clock::now() + limit;
  while (!pred()) {
    const auto now = Clock::now();
    if (now >= deadline) return false;
    if (io.stopped()) io.restart();
    if (io.run_one_for(deadline - now) == 0 && io.stopped()) return pred();  // no work left
  }
  return true;
}

// Runs handlers for `d`, to see that nothing more happens (no late retransmission...).
void settle(net::io_context& io, Clock::duration d) {
  if (io.stopped()) io.restart();
  io.run_for(d);
}

proto::Message decode_ok(const std::string& bytes) {
  auto d = proto::decode(bytes);
  INFO("bytes: ", bytes, " reason: ", std::string(proto::to_string(d.error)));
  REQUIRE(d);
  return *d.message;
}

// A plain socket the test controls: records every datagram, and answers only when told to.
class RawPeer {
 public:
  using OnDatagram = std::function<void(RawPeer&, const std::string& bytes, const udp::endpoint& sender)>;

  explicit RawPeer(net::io_context& io, const udp::endpoint& bind = kAnyLoopbackPort) : socket_(io, bind) {
    receive();
  }

  udp::endpoint endpoint() const { return socket_.local_endpoint(); }
  void on_datagram(OnDatagram f) { on_datagram_ = std::move(f); }
  void send(const proto::Message& m, const udp::endpoint& to) { send_bytes(proto::encode(m), to); }
  void send_bytes(const std::string& bytes, const udp::endpoint& to) { socket_.send_to(net::buffer(bytes), to); }

  std::size_t count() const { return received_.size(); }
  const std::string& bytes(std::size_t i) const { return received_.at(i); }
  const udp::endpoint& sender(std::size_t i) const { return senders_.at(i); }

 private:
  void receive() {
    socket_.async_receive_from(net::buffer(buffer_), from_, [this](error_code ec, std::size_t n) {
      if (ec) return;  // closed
      received_.emplace_back(buffer_.data(), n);
      senders_.push_back(from_);
      if (on_datagram_) on_datagram_(*this, received_.back(), from_);
      receive();
    });
  }

  udp::socket socket_;
  udp::endpoint from_;
  std::array<char, 65536> buffer_{};
  std::vector<std::string> received_;
  std::vector<udp::endpoint> senders_;
  OnDatagram on_datagram_;
};

// What a Done callback saw.
struct Outcome {
  int calls = 0;
  bool got_nullptr = false;
  std::optional<proto::Message> reply;
  Endpoint::Done done() {
    return [this](const proto::Message* r) {
      ++calls;
      if (r) reply = *r;
      else got_nullptr = true;
    };
  }
};

std::size_t refused(const Endpoint& e, proto::DecodeError why) {
  return e.counters().refused[static_cast<std::size_t>(why)];
}

// `size` bytes (at least 6) that a core hands to its frame handler undecoded (a file chunk's
// two leading bytes), numbered `n`, the rest a pattern of both: any mix-up shows.
std::string frame(std::size_t size, std::uint32_t n) {
  std::string d(size, '\0');
  d[0] = static_cast<char>(proto::kVersion);
  d[1] = static_cast<char>(proto::kFrameChunk);
  for (int i = 0; i < 4; ++i) d[2 + i] = static_cast<char>(n >> (8 * i));
  for (std::size_t i = 6; i < size; ++i) d[i] = static_cast<char>(n * 31 + i * 7);
  return d;
}

// An endpoint that records every frame its core hands up, with the sender.
struct FrameSink {
  explicit FrameSink(net::io_context& io) : socket(io, kAnyLoopbackPort, kFast) {
    socket.set_frame_handler([this](std::string_view bytes, const udp::endpoint& from) {
      frames.emplace_back(bytes);
      senders.push_back(from);
    });
    socket.start(nullptr);
  }
  Endpoint socket;
  std::vector<std::string> frames;
  std::vector<udp::endpoint> senders;
};

}  // namespace

TEST_SUITE("transport") {

TEST_CASE("a request ACKed on the first try is sent once and completes with the ACK") {
  net::io_context io;
  Endpoint client(io, kAnyLoopbackPort, kFast);
  client.start(nullptr);
  RawPeer peer(io);
  peer.on_datagram([&](RawPeer& self, const std::string& bytes, const udp::endpoint& sender) {
    self.send(proto::Ack{proto::request_id(decode_ok(bytes)), 0, 0}, sender);
  });

  const std::uint64_t id = client.next_id();
  Outcome out;
  client.request(proto::Probe{id, "peer"}, peer.endpoint(), out.done());
  CHECK(client.in_flight() == 1);
  REQUIRE(run_until(io, [&] { return out.calls > 0; }));
  settle(io, kFast.timeout * 4);  // long enough for a retransmission to show, were one due

  CHECK(out.calls == 1);
  REQUIRE(out.reply);
  CHECK(*out.reply == proto::Message{proto::Ack{id, 0, 0}});
  CHECK(peer.count() == 1);
  CHECK(decode_ok(peer.bytes(0)) == proto::Message{proto::Probe{id, "peer"}});
  CHECK(peer.sender(0) == client.local_endpoint());
  CHECK(client.in_flight() == 0);
  CHECK(client.counters().retransmits == 0);
  CHECK(client.counters().sent == 1);
  CHECK(client.counters().unmatched_replies == 0);
}

TEST_CASE("a request whose first two copies are lost completes on the third") {
  net::io_context io;
  Endpoint client(io, kAnyLoopbackPort, kFast);
  client.start(nullptr);
  RawPeer peer(io);
  peer.on_datagram([&](RawPeer& self, const std::string& bytes, const udp::endpoint& sender) {
    if (self.count() < 3) return;  // "lost"
    self.send(proto::RegOk{proto::request_id(decode_ok(bytes)), 7, 2}, sender);
  });

  const std::uint64_t id = client.next_id();
  Outcome out;
  client.request(proto::Register{id, "alice", {}, 0, "", {}}, peer.endpoint(), out.done());
  REQUIRE(run_until(io, [&] { return out.calls > 0; }));
  settle(io, kFast.timeout * 4);

  CHECK(out.calls == 1);
  REQUIRE(out.reply);
  CHECK(*out.reply == proto::Message{proto::RegOk{id, 7, 2}});
  REQUIRE(peer.count() == 3);
  CHECK(peer.bytes(0) == peer.bytes(1));  // retransmissions are the same datagram
  CHECK(peer.bytes(1) == peer.bytes(2));
  CHECK(client.counters().retransmits == 2);
  CHECK(client.counters().bytes_resent == 2 * peer.bytes(0).size());
  CHECK(client.counters().bytes_sent == 3 * peer.bytes(0).size());
  CHECK(client.counters().gave_up == 0);
  CHECK(client.in_flight() == 0);
}

TEST_CASE("a request never ACKed gives up with nullptr after retries+1 sends") {
  net::io_context io;
  Endpoint client(io, kAnyLoopbackPort, kFast);
  client.start(nullptr);
  RawPeer peer(io);  // receives, never answers

  Outcome out;
  const auto started = Clock::now();
  client.request(proto::Direct{client.next_id(), "bob", "anyone there?"}, peer.endpoint(), out.done());
  REQUIRE(run_until(io, [&] { return out.calls > 0; }));
  const auto elapsed = Clock::now() - started;
  settle(io, kFast.timeout * 4);

  CHECK(out.calls == 1);
  CHECK(out.got_nullptr);
  CHECK_FALSE(out.reply);
  CHECK(peer.count() == static_cast<std::size_t>(kFast.retries + 1));  // 4
  CHECK(elapsed >= kFast.timeout * (kFast.retries + 1));  // waited the full last timeout
  CHECK(client.counters().retransmits == static_cast<std::uint64_t>(kFast.retries));
  CHECK(client.counters().gave_up == 1);
  CHECK(client.in_flight() == 0);
}

TEST_CASE("a per-request retry policy overrides the endpoint's") {
  net::io_context io;
  Endpoint client(io, kAnyLoopbackPort, RetryPolicy{10s, 9});
  client.start(nullptr);
  RawPeer peer(io);

  Outcome out;
  client.request(proto::Probe{client.next_id(), "peer"}, peer.endpoint(), out.done(), RetryPolicy{20ms, 1});
  REQUIRE(run_until(io, [&] { return out.calls > 0; }, 5s));
  CHECK(out.got_nullptr);
  CHECK(peer.count() == 2);
  CHECK(client.policy().retries == 9);
}

TEST_CASE("an ACK from the wrong address is ignored, the right one still completes the request") {
  net::io_context io;
  Endpoint client(io, kAnyLoopbackPort, RetryPolicy{200ms, 20});
  client.start(nullptr);
  RawPeer target(io);
  RawPeer other_port(io);                                                  // same IP, other port
  RawPeer other_ip(io, udp::endpoint(net::ip::make_address_v4("127.0.0.2"),  // same port, other IP
                                     target.endpoint().port()));

  const std::uint64_t id = client.next_id();
  Outcome out;
  client.request(proto::Save{id, "alice", "bob", 9, false, "hi"}, target.endpoint(), out.done());
  REQUIRE(run_until(io, [&] { return target.count() >= 1; }));

  other_port.send(proto::Ack{id, 0, 0}, client.local_endpoint());
  REQUIRE(run_until(io, [&] { return client.counters().unmatched_replies == 1; }));
  other_ip.send(proto::Ack{id, 0, 0}, client.local_endpoint());
  REQUIRE(run_until(io, [&] { return client.counters().unmatched_replies == 2; }));
  target.send(proto::Ack{id + 1, 0, 0}, client.local_endpoint());  // right address, wrong id
  REQUIRE(run_until(io, [&] { return client.counters().unmatched_replies == 3; }));
  CHECK(out.calls == 0);
  CHECK(client.in_flight() == 1);

  target.send(proto::Refused{id, "store full"}, client.local_endpoint());
  REQUIRE(run_until(io, [&] { return out.calls > 0; }));
  REQUIRE(out.reply);
  CHECK(*out.reply == proto::Message{proto::Refused{id, "store full"}});

  // A late repeat of the reply is counted and does not call Done again.
  target.send(proto::Refused{id, "store full"}, client.local_endpoint());
  REQUIRE(run_until(io, [&] { return client.counters().unmatched_replies == 4; }));
  CHECK(out.calls == 1);
  CHECK(client.in_flight() == 0);
}

TEST_CASE("a repeated request is handed up once and the cached reply is sent for each copy") {
  net::io_context io;
  Endpoint server(io, kAnyLoopbackPort, kFast);
  int handled = 0;
  server.start([&](const proto::Message& m, const udp::endpoint& sender) {
    ++handled;
    server.reply(sender, proto::Ack{proto::request_id(m), 3, 4});
  });
  RawPeer client(io);
  const std::string request = proto::encode(proto::Direct{777, "carol", "only once, please"});

  client.send_bytes(request, server.local_endpoint());
  client.send_bytes(request, server.local_endpoint());
  REQUIRE(run_until(io, [&] { return client.count() == 2; }));
  CHECK(handled == 1);
  CHECK(client.bytes(0) == client.bytes(1));
  CHECK(decode_ok(client.bytes(0)) == proto::Message{proto::Ack{777, 3, 4}});
  CHECK(server.counters().duplicates == 1);

  // Much later (still inside the window), once more.
  client.send_bytes(request, server.local_endpoint());
  REQUIRE(run_until(io, [&] { return client.count() == 3; }));
  CHECK(handled == 1);
  CHECK(client.bytes(2) == client.bytes(0));
  CHECK(server.counters().duplicates == 2);
  CHECK(server.counters().bytes_resent == 2 * client.bytes(0).size());

  // The same id from another sender is another request.
  RawPeer someone_else(io);
  someone_else.send_bytes(request, server.local_endpoint());
  REQUIRE(run_until(io, [&] { return someone_else.count() == 1; }));
  CHECK(handled == 2);
}

TEST_CASE("a repeat of a request still being worked on is dropped, the reply later answers repeats") {
  net::io_context io;
  Endpoint server(io, kAnyLoopbackPort, kFast);
  int handled = 0;
  std::optional<udp::endpoint> asker;
  server.start([&](const proto::Message&, const udp::endpoint& sender) {
    ++handled;
    asker = sender;  // answered later, not here
  });
  RawPeer client(io);
  const std::string request = proto::encode(proto::Save{55, "a", "b", 1, true, "x"});

  client.send_bytes(request, server.local_endpoint());
  client.send_bytes(request, server.local_endpoint());
  REQUIRE(run_until(io, [&] { return server.counters().duplicates == 1; }));
  CHECK(handled == 1);
  CHECK(client.count() == 0);

  REQUIRE(asker);
  server.reply(*asker, proto::Exists{55, "b"});
  REQUIRE(run_until(io, [&] { return client.count() == 1; }));
  client.send_bytes(request, server.local_endpoint());
  REQUIRE(run_until(io, [&] { return client.count() == 2; }));
  CHECK(client.bytes(0) == client.bytes(1));
  CHECK(decode_ok(client.bytes(1)) == proto::Message{proto::Exists{55, "b"}});
  CHECK(handled == 1);
}

TEST_CASE("forget(): a request left unanswered and forgotten is handed up again on repeat") {
  net::io_context io;
  Endpoint server(io, kAnyLoopbackPort, kFast);
  int handled = 0;
  server.start([&](const proto::Message& m, const udp::endpoint& sender) {
    ++handled;
    server.forget(sender, proto::request_id(m));
  });
  RawPeer client(io);
  const std::string request = proto::encode(proto::Register{99, "dave", {}, 0, "", {}});

  client.send_bytes(request, server.local_endpoint());
  REQUIRE(run_until(io, [&] { return handled == 1; }));
  client.send_bytes(request, server.local_endpoint());
  REQUIRE(run_until(io, [&] { return handled == 2; }));
  client.send_bytes(request, server.local_endpoint());
  REQUIRE(run_until(io, [&] { return handled == 3; }));
  CHECK(server.counters().duplicates == 0);
  CHECK(client.count() == 0);  // nothing was answered
}

TEST_CASE("1000 requests in flight at once all complete with their own reply") {
  constexpr int kRequests = 1000;
  net::io_context io;
  Endpoint server(io, kAnyLoopbackPort, kFast);
  Endpoint client(io, kAnyLoopbackPort, RetryPolicy{200ms, 10});
  int handled = 0;
  server.start([&](const proto::Message& m, const udp::endpoint& sender) {
    ++handled;
    const auto& d = std::get<proto::Direct>(m);
    server.reply(sender, proto::Refused{d.id, "re:" + d.body});
  });
  client.start(nullptr);

  std::vector<int> calls(kRequests, 0);
  std::vector<bool> right(kRequests, false);
  int completed = 0;
  for (int i = 0; i < kRequests; ++i) {
    const std::uint64_t id = client.next_id();
    client.request(proto::Direct{id, "load", std::to_string(i)}, server.local_endpoint(),
                   [&, i, id](const proto::Message* r) {
                     ++calls[i];
                     ++completed;
                     right[i] = r && *r == proto::Message{proto::Refused{id, "re:" + std::to_string(i)}};
                   });
  }
  CHECK(client.in_flight() == kRequests);
  REQUIRE(run_until(io, [&] { return completed == kRequests; }, 30s));

  int wrong = 0;
  int not_once = 0;
  for (int i = 0; i < kRequests; ++i) {
    if (!right[i]) ++wrong;
    if (calls[i] != 1) ++not_once;
  }
  CHECK(wrong == 0);
  CHECK(not_once == 0);
  CHECK(client.in_flight() == 0);
  CHECK(client.counters().gave_up == 0);
  CHECK(handled == kRequests);  // retransmissions, if any, were not handed up twice
}

TEST_CASE("garbage datagrams are counted by reason and the endpoint keeps serving") {
  net::io_context io;
  Endpoint server(io, kAnyLoopbackPort, kFast);
  std::vector<proto::Message> handed_up;
  server.start([&](const proto::Message& m, const udp::endpoint& sender) {
    handed_up.push_back(m);
    server.reply(sender, proto::Ack{proto::request_id(m), 0, 0});
  });
  RawPeer client(io);
  const udp::endpoint to = server.local_endpoint();

  const std::string probe = proto::encode(proto::Probe{77, "peer"});
  std::string bad_bool = proto::encode(proto::Save{55, "a", "b", 1, true, "x"});
  bad_bool[10 + 2 + 2 + 8] = 2;  // force: neither 0 nor 1
  client.send_bytes("this is not ChatApp", to);       // bad_version
  client.send_bytes(std::string(2000, 'x'), to);      // too_large
  {
    std::mt19937 rng(7);
    std::uniform_int_distribution<int> byte(0, 255);
    std::string big(60000, '\0');
    for (char& c : big) c = static_cast<char>(byte(rng));
    client.send_bytes(big, to);  // far too large
  }
  client.send_bytes("", to);                                              // empty
  client.send_bytes(probe.substr(0, 9), to);                              // truncated
  client.send_bytes(probe + "x", to);                                     // trailing
  client.send_bytes(proto::encode(proto::Probe{0, "peer"}), to);                  // bad_value: id 0
  client.send_bytes(bad_bool, to);                                        // bad_value: a bool of 2
  client.send_bytes(std::string("\x02\x30", 2) + probe.substr(2), to);  // unknown_type
  // Version 1 (JSON) datagrams that are no request get no answer either.
  client.send_bytes("{\"v\":1,\"t\":\"direct\",\"id\":1,\"from\":\"a\",\"text\":\"\xFF\"}", to);
  client.send_bytes(R"({"v":1,"t":"probe","id":0})", to);
  client.send_bytes(R"({"v":1,"t":"ack","re":12})", to);
  client.send_bytes(proto::encode(proto::Ack{12345, 0, 0, 0}), to);  // a reply nobody asked for
  client.send_bytes(proto::encode(proto::Probe{4242, "peer"}), to);          // and finally a valid request

  REQUIRE(run_until(io, [&] { return client.count() == 1; }));
  CHECK(decode_ok(client.bytes(0)) == proto::Message{proto::Ack{4242, 0, 0, 0}});
  REQUIRE(handed_up.size() == 1);
  CHECK(handed_up[0] == proto::Message{proto::Probe{4242, "peer"}});

  using proto::DecodeError;
  CHECK(refused(server, DecodeError::bad_version) == 1);
  CHECK(refused(server, DecodeError::too_large) == 2);
  CHECK(refused(server, DecodeError::empty) == 1);
  CHECK(refused(server, DecodeError::truncated) == 1);
  CHECK(refused(server, DecodeError::trailing) == 1);
  CHECK(refused(server, DecodeError::bad_value) == 2);
  CHECK(refused(server, DecodeError::unknown_type) == 1);
  CHECK(refused(server, DecodeError::old_version) == 3);
  CHECK(server.counters().refused_total() == 12);
  CHECK(server.counters().unmatched_replies == 1);
  CHECK(server.counters().received == 14);

  // Still serving after all that.
  client.send_bytes(proto::encode(proto::Probe{4243, "peer"}), to);
  REQUIRE(run_until(io, [&] { return client.count() == 2; }));
  CHECK(decode_ok(client.bytes(1)) == proto::Message{proto::Ack{4243, 0, 0}});
}

TEST_CASE("a version-1 register gets the v1 reg_err an old client shows, with its id") {
  net::io_context io;
  Endpoint server(io, kAnyLoopbackPort, kFast);
  int handled = 0;
  server.start([&](const proto::Message&, const udp::endpoint&) { ++handled; });
  RawPeer old_client(io);
  // As a version-1 client sent it: padded to 1200 bytes.
  const std::string reg = R"({"v":1,"t":"register","id":7301,"name":"alice","pad":")" + std::string(1130, ' ') + "\"}";
  old_client.send_bytes(reg, server.local_endpoint());
  REQUIRE(run_until(io, [&] { return old_client.count() == 1; }));
  CHECK(old_client.bytes(0) == std::string(R"({"v":1,"t":"reg_err","re":7301,"reason":")")
                                   .append(proto::kV1RefusalReason)
                                   .append("\"}"));
  CHECK(old_client.bytes(0).size() < reg.size());
  CHECK(handled == 0);
  CHECK(refused(server, proto::DecodeError::old_version) == 1);
  // Any other v1 request is refused the same way.
  const std::string save = R"({"v":1,"t":"save","id":12,"from":"alice","to":"bob","mid":1,"force":false,"text":")" +
                           std::string(100, 'x') + "\"}";
  old_client.send_bytes(save, server.local_endpoint());
  REQUIRE(run_until(io, [&] { return old_client.count() == 2; }));
  CHECK(old_client.bytes(1) == std::string(R"({"v":1,"t":"refused","re":12,"reason":")")
                                   .append(proto::kV1RefusalReason)
                                   .append("\"}"));
  CHECK(refused(server, proto::DecodeError::old_version) == 2);
}

TEST_CASE("a burst queued at an endpoint is read in batches and handed up whole and in order; send_many() delivers in order") {
  net::io_context io;
  Endpoint server(io, kAnyLoopbackPort, kFast);
  std::vector<std::uint64_t> ids;
  server.start([&](const proto::Message& m, const udp::endpoint&) { ids.push_back(proto::request_id(m)); });
  RawPeer client(io);
  // 300 datagrams queued before the loop runs: one asynchronous receive, the rest drained by recvmmsg.
  for (std::uint64_t id = 1; id <= 300; ++id) client.send(proto::Probe{id, "peer"}, server.local_endpoint());
  REQUIRE(run_until(io, [&] { return ids.size() == 300; }));
  for (std::uint64_t id = 1; id <= 300; ++id) CHECK(ids[id - 1] == id);

  std::vector<std::string> burst;
  for (std::uint64_t id = 1; id <= 70; ++id) burst.push_back(proto::encode(proto::Probe{id, "x"}));  // more than one sendmmsg
  CHECK(server.send_many(burst, client.endpoint()) == 70);
  REQUIRE(run_until(io, [&] { return client.count() == 70; }));
  for (std::size_t i = 0; i < 70; ++i) CHECK(client.bytes(i) == burst[i]);
  CHECK(server.counters().sent == 70);
}

TEST_CASE("send_many(): a run of equal-sized datagrams and a shorter last one arrive as the same datagrams, in order") {
  // On Linux the run goes as one UDP GSO send and may arrive as one coalesced buffer (UDP GRO):
  // the core still sees each datagram alone.
  net::io_context io;
  FrameSink rx(io);
  Endpoint tx(io, kAnyLoopbackPort, kFast);
  std::vector<std::string> burst;
  for (std::uint32_t n = 0; n < 31; ++n) burst.push_back(frame(proto::kMaxDatagram, n));
  burst.push_back(frame(300, 31));
  CHECK(tx.send_many(burst, rx.socket.local_endpoint()) == burst.size());
  REQUIRE(run_until(io, [&] { return rx.frames.size() >= burst.size(); }));
  settle(io, 20ms);
  REQUIRE(rx.frames.size() == burst.size());
  for (std::size_t i = 0; i < burst.size(); ++i) {
    CHECK(rx.frames[i] == burst[i]);
    CHECK(rx.senders[i] == tx.local_endpoint());
  }
  CHECK(rx.socket.counters().received == burst.size());
  CHECK(tx.counters().sent == burst.size());
}

TEST_CASE("send_many(): datagrams of mixed sizes, longer runs than one GSO send, arrive whole and in order") {
  net::io_context io;
  FrameSink rx(io);
  Endpoint tx(io, kAnyLoopbackPort, kFast);
  std::vector<std::string> burst;
  std::uint32_t n = 0;
  auto add = [&](std::size_t size, int times) {
    for (int i = 0; i < times; ++i) burst.push_back(frame(size, n++));
  };
  add(proto::kMaxDatagram, 100);  // more than fit one GSO send (44)
  add(100, 2);
  add(1000, 1);
  add(proto::kMaxDatagram, 2);
  add(1471, 1);                   // shorter: ends the run
  add(proto::kMaxDatagram, 1);
  add(20, 70);                    // more than UDP_MAX_SEGMENTS (64)
  add(21, 1);                     // longer than the run before it: a run of its own
  for (std::uint32_t i = 0; i < 40; ++i) add(6 + i % 2, 1);  // alternating: more lone datagrams than one sendmmsg
  add(proto::kMaxDatagram, 3);
  CHECK(tx.send_many(burst, rx.socket.local_endpoint()) == burst.size());
  REQUIRE(run_until(io, [&] { return rx.frames.size() >= burst.size(); }));
  settle(io, 20ms);
  REQUIRE(rx.frames.size() == burst.size());
  for (std::size_t i = 0; i < burst.size(); ++i) {
    INFO("datagram ", i, " of ", burst[i].size(), " bytes");
    CHECK(rx.frames[i] == burst[i]);
    CHECK(rx.senders[i] == tx.local_endpoint());
  }
  CHECK(rx.socket.counters().received == burst.size());
}

TEST_CASE("a burst larger than one turn's reading, queued at once, is all handed up with nothing arriving after it") {
  // More than kReadBurst (1,024) datagrams, queued before the loop runs: the turn that stops at
  // the limit must not wait for a next arrival to read the rest.
  net::io_context io;
  Endpoint tx(io, kAnyLoopbackPort, kFast);
  std::vector<std::string> burst;
  for (std::uint32_t n = 0; n < 2560; ++n) burst.push_back(frame(20, n));
  FrameSink rx(io);
  CHECK(tx.send_many(burst, rx.socket.local_endpoint()) == burst.size());
  REQUIRE(run_until(io, [&] { return rx.frames.size() >= burst.size(); }));
  REQUIRE(rx.frames.size() == burst.size());
  for (std::size_t i = 0; i < burst.size(); ++i) CHECK(rx.frames[i] == burst[i]);
}

TEST_CASE("a datagram larger than kMaxDatagram reaches the core with its real length, alone or in a run") {
  net::io_context io;
  FrameSink rx(io);
  Endpoint tx(io, kAnyLoopbackPort, kFast);
  RawPeer raw(io);
  const udp::endpoint to = rx.socket.local_endpoint();
  // A run of 2000-byte datagrams (one GSO send of that size on loopback), then a fitting one.
  const std::vector<std::string> run{frame(2000, 1), frame(2000, 2), frame(proto::kMaxDatagram, 3)};
  CHECK(tx.send_many(run, to) == 3);
  raw.send_bytes(frame(2000, 4), to);
  raw.send_bytes(frame(60000, 5), to);
  raw.send_bytes(frame(proto::kMaxDatagram + 1, 6), to);
  raw.send_bytes(frame(100, 7), to);
  REQUIRE(run_until(io, [&] { return rx.socket.counters().received >= 7; }));
  settle(io, 20ms);
  CHECK(rx.socket.counters().received == 7);
  CHECK(rx.socket.counters().bytes_received == 2000 + 2000 + proto::kMaxDatagram + 2000 + 60000 +
                                                   (proto::kMaxDatagram + 1) + 100);
  CHECK(refused(rx.socket, proto::DecodeError::too_large) == 5);
  REQUIRE(rx.frames.size() == 2);
  CHECK(rx.frames[0] == run[2]);
  CHECK(rx.frames[1] == frame(100, 7));
}

TEST_CASE("close() abandons pending requests without calling Done") {
  net::io_context io;
  Endpoint client(io, kAnyLoopbackPort, kFast);
  client.start(nullptr);
  RawPeer peer(io);

  Outcome out;
  client.request(proto::Probe{client.next_id(), "peer"}, peer.endpoint(), out.done());
  REQUIRE(run_until(io, [&] { return peer.count() == 1; }));
  client.close();
  CHECK(client.in_flight() == 0);
  settle(io, kFast.timeout * (kFast.retries + 2));
  CHECK(out.calls == 0);
  CHECK(peer.count() == 1);
  client.close();  // twice is harmless
}

TEST_CASE("next_id is never 0 and does not repeat") {
  net::io_context io;
  Endpoint e(io, kAnyLoopbackPort, kFast);
  std::unordered_set<std::uint64_t> seen;
  int zeros = 0;
  for (int i = 0; i < 100000; ++i) {
    std::uint64_t id = e.next_id();
    if (id == 0) ++zeros;
    seen.insert(id);
  }
  CHECK(zeros == 0);
  CHECK(seen.size() == 100000);
}

TEST_CASE("a request reusing an id still in flight fails at once, the first is unaffected") {
  net::io_context io;
  Endpoint client(io, kAnyLoopbackPort, RetryPolicy{10s, 0});
  client.start(nullptr);
  RawPeer peer(io);
  Outcome first;
  Outcome second;
  client.request(proto::Probe{42, "peer"}, peer.endpoint(), first.done());
  client.request(proto::Probe{42, "peer"}, peer.endpoint(), second.done());
  REQUIRE(run_until(io, [&] { return second.calls > 0; }, 2s));
  CHECK(second.got_nullptr);
  CHECK(first.calls == 0);
  CHECK(client.in_flight() == 1);

  peer.send(proto::Ack{42, 0, 0}, client.local_endpoint());
  REQUIRE(run_until(io, [&] { return first.calls > 0; }));
  REQUIRE(first.reply);
  CHECK(*first.reply == proto::Message{proto::Ack{42, 0, 0}});
  CHECK(second.calls == 1);
  CHECK(peer.count() == 1);  // the refused one was never sent
}

TEST_CASE("requests past Guard::max_in_flight to one address fail at once") {
  net::io_context io;
  chat::transport::Guard guard;
  guard.max_in_flight = 2;
  Endpoint client(io, kAnyLoopbackPort, RetryPolicy{10s, 0}, guard);
  client.start(nullptr);
  RawPeer peer(io);
  RawPeer other(io);

  std::vector<Outcome> out(4);
  for (std::size_t i = 0; i < 3; ++i) client.request(proto::Probe{100 + i, "peer"}, peer.endpoint(), out[i].done());
  client.request(proto::Probe{200, "peer"}, other.endpoint(), out[3].done());  // another address: its own bound
  REQUIRE(run_until(io, [&] { return out[2].calls > 0 && other.count() == 1; }));
  CHECK(out[2].got_nullptr);
  CHECK(out[0].calls == 0);
  CHECK(out[1].calls == 0);
  CHECK(out[3].calls == 0);
  CHECK(client.in_flight() == 3);

  // Once one completes, there is room again.
  peer.send(proto::Ack{100, 0, 0}, client.local_endpoint());
  REQUIRE(run_until(io, [&] { return out[0].calls > 0; }));
  Outcome again;
  client.request(proto::Probe{103, "peer"}, peer.endpoint(), again.done());
  REQUIRE(run_until(io, [&] { return peer.count() == 3; }));
  CHECK(again.calls == 0);
}

// ---------------------------------------------------------------- DuplicateFilter alone

TEST_CASE("DuplicateFilter: fresh, pending, answered") {
  DuplicateFilter f(100, 30s);
  const auto t0 = Clock::now();
  const RequestKey k{0x7F000001, 4000, 1};
  const std::string* reply = nullptr;

  CHECK(f.check(k, t0, &reply) == DuplicateFilter::Seen::fresh);
  CHECK(f.check(k, t0, &reply) == DuplicateFilter::Seen::pending);
  CHECK(reply == nullptr);
  f.answer(k, "the reply");
  CHECK(f.check(k, t0 + 1s, &reply) == DuplicateFilter::Seen::answered);
  REQUIRE(reply != nullptr);
  CHECK(*reply == "the reply");

  // Sender address, port and id each make a different key.
  CHECK(f.check(RequestKey{0x7F000002, 4000, 1}, t0, &reply) == DuplicateFilter::Seen::fresh);
  CHECK(f.check(RequestKey{0x7F000001, 4001, 1}, t0, &reply) == DuplicateFilter::Seen::fresh);
  CHECK(f.check(RequestKey{0x7F000001, 4000, 2}, t0, &reply) == DuplicateFilter::Seen::fresh);
  CHECK(f.size() == 4);

  // Answering a key never seen (or already expired) records nothing.
  f.answer(RequestKey{1, 1, 1}, "nobody asked");
  CHECK(f.size() == 4);
  CHECK(f.check(RequestKey{1, 1, 1}, t0, &reply) == DuplicateFilter::Seen::fresh);
}

TEST_CASE("DuplicateFilter: the capacity bound evicts the oldest first") {
  DuplicateFilter f(3, 1h);
  const auto t0 = Clock::now();
  const std::string* reply = nullptr;
  auto key = [](std::uint64_t id) { return RequestKey{0x7F000001, 5000, id}; };

  for (std::uint64_t id = 1; id <= 3; ++id) CHECK(f.check(key(id), t0 + id * 1ms, &reply) == DuplicateFilter::Seen::fresh);
  f.answer(key(1), "one");
  CHECK(f.check(key(4), t0 + 4ms, &reply) == DuplicateFilter::Seen::fresh);
  // The next lookup trims back to capacity: key 1 (the oldest, although answered) is gone.
  CHECK(f.check(key(2), t0 + 5ms, &reply) == DuplicateFilter::Seen::pending);
  CHECK(f.check(key(3), t0 + 5ms, &reply) == DuplicateFilter::Seen::pending);
  CHECK(f.check(key(4), t0 + 5ms, &reply) == DuplicateFilter::Seen::pending);
  CHECK(f.check(key(1), t0 + 6ms, &reply) == DuplicateFilter::Seen::fresh);  // re-recorded
  // That pushed out key 2, now the oldest.
  CHECK(f.check(key(3), t0 + 7ms, &reply) == DuplicateFilter::Seen::pending);
  CHECK(f.check(key(2), t0 + 8ms, &reply) == DuplicateFilter::Seen::fresh);

  // Under a flood the size stays bounded.
  for (std::uint64_t id = 100; id < 10100; ++id) f.check(key(id), t0 + 10ms, &reply);
  CHECK(f.size() <= 4);
}

// Regression test for a bug found by this suite (fixed).
TEST_CASE("DuplicateFilter: never holds more than capacity entries") {
  DuplicateFilter f(3, 1h);
  const std::string* reply = nullptr;
  for (std::uint64_t id = 1; id <= 4; ++id) f.check(RequestKey{1, 1, id}, Clock::now(), &reply);
  CHECK(f.size() <= 3);  // actual: 4
}

TEST_CASE("DuplicateFilter: entries expire after the window") {
  DuplicateFilter f(100, 10s);
  const auto t0 = Clock::now();
  const RequestKey k{0x7F000001, 6000, 7};
  const std::string* reply = nullptr;

  CHECK(f.check(k, t0, &reply) == DuplicateFilter::Seen::fresh);
  f.answer(k, "r");
  CHECK(f.check(k, t0 + 10s, &reply) == DuplicateFilter::Seen::answered);  // the window is inclusive
  CHECK(f.check(k, t0 + 10s + 1ns, &reply) == DuplicateFilter::Seen::fresh);
  CHECK(f.size() == 1);  // the expired one went, the fresh one is recorded

  // Expiry happens on lookup of any key.
  DuplicateFilter g(100, 10s);
  for (std::uint64_t id = 1; id <= 50; ++id) g.check(RequestKey{1, 1, id}, t0, &reply);
  CHECK(g.size() == 50);
  g.check(RequestKey{2, 2, 2}, t0 + 11s, &reply);
  CHECK(g.size() == 1);
}

TEST_CASE("DuplicateFilter: forget, and a forgotten key seen again keeps its own expiry") {
  DuplicateFilter f(100, 10s);
  const auto t0 = Clock::now();
  const RequestKey k{0x7F000001, 7000, 9};
  const std::string* reply = nullptr;

  CHECK(f.check(k, t0, &reply) == DuplicateFilter::Seen::fresh);
  f.forget(k);
  CHECK(f.size() == 0);
  CHECK(f.check(k, t0 + 5s, &reply) == DuplicateFilter::Seen::fresh);
  // The first sighting's slot expires now; it must not take the second sighting's entry along.
  CHECK(f.check(k, t0 + 12s, &reply) == DuplicateFilter::Seen::pending);
  CHECK(f.check(k, t0 + 15s + 1ns, &reply) == DuplicateFilter::Seen::fresh);
  f.forget(RequestKey{3, 3, 3});  // forgetting an unknown key is harmless
}

// ---------------------------------------------------------------- the core alone, on a fake clock

namespace {

using chat::transport::Core;
using chat::transport::CoreOptions;
using chat::transport::ManualClock;

// A core whose datagrams land in `sent` instead of a socket.
struct Bare {
  explicit Bare(RetryPolicy p, chat::transport::Guard g = {}) : core(CoreOptions{p, g, 42}, clock) {
    core.set_output([this](const std::string& bytes, const udp::endpoint& to) {
      sent.emplace_back(bytes, to);
      return true;
    });
  }
  // Lets `d` pass as a real clock would: every deadline on the way fires at its own time.
  void advance(chat::transport::Duration d) {
    const auto end = clock.now() + d;
    for (auto next = core.next_deadline(); next && *next <= end; next = core.next_deadline()) {
      clock.set(*next);
      core.on_timer();
      core.settle();
    }
    clock.set(end);
  }
  ManualClock clock;
  Core core;
  std::vector<std::pair<std::string, udp::endpoint>> sent;
};

const udp::endpoint kPeer{kLoopback, 4242};

}  // namespace

TEST_CASE("core: retransmissions follow the policy on the fake clock, then the request gives up") {
  Bare b(RetryPolicy{500ms, 5});
  Outcome o;
  b.core.request(proto::Probe{7, "peer"}, kPeer, o.done());
  CHECK(b.sent.size() == 1);
  CHECK(b.core.next_deadline() == b.clock.now() + 500ms);
  b.advance(499ms);
  CHECK(b.sent.size() == 1);
  b.advance(1ms);
  CHECK(b.sent.size() == 2);  // the first retry, exactly one timeout later
  b.advance(2s);
  CHECK(b.sent.size() == 6);  // all 6 attempts
  CHECK(o.calls == 0);
  b.advance(500ms);
  CHECK(o.calls == 1);
  CHECK(o.got_nullptr);
  CHECK(b.core.in_flight() == 0);
  CHECK_FALSE(b.core.next_deadline().has_value());
}

TEST_CASE("core: the duplicate window outlasts the longest retry policy (--ack-timeout 60000 --retries 100)") {
  Bare b(RetryPolicy{60'000ms, 100});
  CHECK(b.core.dedup_window() >= 2 * 60s * 101);
  int handled = 0;
  b.core.set_handler([&](const proto::Message& m, const udp::endpoint& from) {
    ++handled;
    b.core.reply(from, proto::Ack{proto::request_id(m)});
  });
  const std::string probe = proto::encode(proto::Probe{99, "peer"});
  b.core.on_datagram(probe, kPeer);
  // The sender's 100th retransmission, 100 minutes later, is a repeat: answered, not handed up.
  b.advance(100 * 60s);
  b.core.on_datagram(probe, kPeer);
  CHECK(handled == 1);
  CHECK(b.core.counters().duplicates == 1);
  CHECK(b.sent.size() == 2);  // the cached ACK went out again

  // With the default policy the window is still at least 30 s.
  Bare d(RetryPolicy{});
  CHECK(d.core.dedup_window() >= 30s);
}

TEST_CASE("core: a retry policy squeezed into a short wait never waits 0 ms") {
  RetryPolicy p = RetryPolicy{1ms, 2}.within(1ms);
  CHECK(p.timeout == 1ms);
  CHECK(p.retries == 2);
  CHECK(RetryPolicy{500ms, 2}.within(500ms).timeout == 166ms);
  CHECK(RetryPolicy{100ms, 5}.span() == 600ms);
}

TEST_CASE("core: timers fire in order, cancelled ones never, deferred work runs at the end of the turn") {
  Bare b(RetryPolicy{});
  std::vector<int> fired;
  b.core.after(30ms, [&] { fired.push_back(3); });
  auto id = b.core.after(20ms, [&] { fired.push_back(2); });
  b.core.after(10ms, [&] {
    fired.push_back(1);
    b.core.after(0ms, [&] { fired.push_back(11); });  // set while running, already due: runs now
  });
  b.core.cancel(id);
  b.core.defer([&] { fired.push_back(0); });
  CHECK(b.core.next_deadline() == b.clock.now());  // deferred work waits: due at once
  b.core.settle();
  CHECK(fired == std::vector<int>{0});
  b.advance(50ms);
  CHECK(fired == std::vector<int>{0, 1, 11, 3});
  b.core.close();
  b.core.after(1ms, [&] { fired.push_back(99); });
  b.advance(10ms);
  CHECK(fired.size() == 4);
  CHECK_FALSE(b.core.next_deadline().has_value());
}

TEST_CASE("core: send_many() goes through the batch output in one call, or the output one by one, within the amplification limit") {
  const std::vector<std::string> burst{std::string(100, 'a'), std::string(100, 'b'), std::string(100, 'c')};
  {
    Bare b(RetryPolicy{});
    CHECK(b.core.send_many(burst, kPeer) == 3);  // no batch output: one by one
    REQUIRE(b.sent.size() == 3);
    CHECK(b.sent[2].first == burst[2]);
    CHECK(b.core.counters().sent == 3);
  }
  {
    Bare b(RetryPolicy{});
    std::vector<std::size_t> calls;
    b.core.set_batch_output([&](std::span<const std::string> d, const udp::endpoint& to) {
      CHECK(to == kPeer);
      calls.push_back(d.size());
      return d.size() - 1;  // one could not go (a full buffer)
    });
    CHECK(b.core.send_many(burst, kPeer) == 2);
    CHECK(calls == std::vector<std::size_t>{3});
    CHECK(b.sent.empty());
    CHECK(b.core.counters().sent == 2);
    CHECK(b.core.counters().bytes_sent == 200);
    CHECK(b.core.counters().send_failed == 1);
  }
  {
    chat::transport::Guard guard;
    guard.amplification = 3;
    Bare b(RetryPolicy{}, guard);
    std::vector<std::size_t> calls;
    b.core.set_batch_output([&](std::span<const std::string> d, const udp::endpoint&) {
      calls.push_back(d.size());
      return d.size();
    });
    CHECK(b.core.send_many(burst, kPeer) == 2);  // an address never heard from: 256 bytes of grace
    CHECK(calls == std::vector<std::size_t>{2});
    CHECK(b.core.counters().amplification == 1);
    CHECK(b.core.allowance(kPeer) == 56);
  }
}

TEST_CASE("core: a v1 request is answered only within the rate limit, and never with more bytes than it had") {
  chat::transport::Guard guard;
  guard.rate_limit = 3;
  guard.amplification = 3;
  Bare b(RetryPolicy{}, guard);
  int handled = 0;
  b.core.set_handler([&](const proto::Message&, const udp::endpoint&) { ++handled; });
  const std::string reg =
      R"({"v":1,"t":"register","id":99,"name":"alice","pad":")" + std::string(1100, ' ') + "\"}";
  const auto reg_err = proto::v1_refusal(reg);
  REQUIRE(reg_err);
  for (int i = 0; i < 10; ++i) b.core.on_datagram(reg, kPeer);
  // One second's burst of the rate limit is answered, the rest dropped before decoding.
  REQUIRE(b.sent.size() == 3);
  for (const auto& [bytes, to] : b.sent) {
    CHECK(bytes == *reg_err);
    CHECK(to == kPeer);
  }
  CHECK(b.core.counters().rate_limited == 7);
  CHECK(b.core.counters().refused[static_cast<std::size_t>(proto::DecodeError::old_version)] == 3);
  CHECK(handled == 0);

  // A short v1 request would get a longer answer than it was: it gets none.
  b.advance(2s);
  const std::string probe = R"({"v":1,"t":"probe","id":5})";
  REQUIRE(proto::v1_refusal(probe));
  REQUIRE(proto::v1_refusal(probe)->size() > probe.size());
  b.core.on_datagram(probe, kPeer);
  CHECK(b.sent.size() == 3);
  CHECK(b.core.counters().refused[static_cast<std::size_t>(proto::DecodeError::old_version)] == 4);
  // A v1 reply, or a datagram that only starts with '{', gets none either.
  b.core.on_datagram(R"({"v":1,"t":"ack","re":5})", kPeer);
  b.core.on_datagram("{" + std::string(200, 'x'), kPeer);
  CHECK(b.sent.size() == 3);
  CHECK(b.core.counters().refused[static_cast<std::size_t>(proto::DecodeError::old_version)] == 6);
}

}  // TEST_SUITE
