// The metrics library: the text a scrape gets for a snapshot (exact lines, through
// prometheus-cpp's own TextSerializer), and the exporter over loopback HTTP.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>

#include <prometheus/text_serializer.h>

#include "metrics/metrics.hpp"
#include "protocol/codec.hpp"
#include "transport/net.hpp"

namespace {

namespace net = chat::net;
using chat::metrics::Board;
using chat::metrics::Exporter;
using chat::metrics::Snapshot;
using chat::protocol::DecodeError;
using tcp = net::ip::tcp;
using namespace std::chrono_literals;

// Upper bound for anything a test waits for; generous so a loaded machine does not fail a test.
constexpr auto kDeadline = 10s;

std::string text_of(const Snapshot& s) {
  return prometheus::TextSerializer().Serialize(chat::metrics::families(s));
}

bool has_line(const std::string& text, const std::string& line) {
  return (std::string("\n").append(text)).find(std::string("\n").append(line).append("\n")) != std::string::npos;
}

/// A snapshot with a different value in every field the metrics show.
Snapshot sample() {
  Snapshot s;
  s.transport.received = 7;
  s.transport.sent = 11;
  s.transport.bytes_received = 700;
  s.transport.bytes_sent = 1100;
  s.transport.duplicates = 3;
  s.transport.retransmits = 4;
  s.transport.rate_limited = 5;
  s.transport.amplification = 6;
  s.transport.in_flight_refused = 8;
  s.transport.refused[static_cast<std::size_t>(DecodeError::truncated)] = 9;
  s.transport.refused[static_cast<std::size_t>(DecodeError::old_version)] = 2;
  s.server.registered = 12;
  s.server.saved = 13;
  s.server.delivered = 14;
  s.server.relays = 15;
  s.server.table_updates = 16;
  s.server.store_errors = 17;
  s.server.remote_changes = 18;
  s.server.commits[0] = 1;   // <= 250 µs
  s.server.commits[2] = 2;   // <= 1 ms
  s.server.commits[12] = 1;  // above 1 s
  s.server.commit_us_sum = 2'001'500;
  s.clients_registered = 20;
  s.clients_online = 19;
  return s;
}

/// The body of GET /metrics from 127.0.0.1:`port` (HTTP/1.0: the server closes after it).
std::string scrape(std::uint16_t port) {
  net::io_context io;
  tcp::socket sock(io);
  sock.connect({net::ip::make_address_v4("127.0.0.1"), port});
  std::string request = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  net::write(sock, net::buffer(request));
  std::string response;
  chat::error_code ec;
  net::read(sock, net::dynamic_buffer(response), ec);  // to the end: eof
  REQUIRE(ec == net::error::eof);
  auto body = response.find("\r\n\r\n");
  REQUIRE(body != std::string::npos);
  REQUIRE(response.rfind("HTTP/1.1 200", 0) == 0);
  return response.substr(body + 4);
}

/// A TCP port on 127.0.0.1 free just now.
std::uint16_t free_tcp_port() {
  net::io_context io;
  tcp::acceptor a(io, {net::ip::make_address_v4("127.0.0.1"), 0});
  return a.local_endpoint().port();
}

}  // namespace

TEST_CASE("metrics: every counter and gauge of a snapshot, with its HELP and TYPE") {
  std::string t = text_of(sample());
  for (const char* line : {
           "# TYPE chatapp_datagrams_received_total counter", "chatapp_datagrams_received_total 7",
           "chatapp_datagrams_sent_total 11", "chatapp_bytes_received_total 700", "chatapp_bytes_sent_total 1100",
           "chatapp_duplicates_total 3", "chatapp_retransmits_total 4",
           "# TYPE chatapp_clients_registered gauge", "chatapp_clients_registered 20",
           "# TYPE chatapp_clients_online gauge", "chatapp_clients_online 19",
           "chatapp_registrations_total 12", "chatapp_saves_total 13", "chatapp_deliveries_total 14",
           "chatapp_relays_total 15", "chatapp_table_updates_total 16", "chatapp_store_errors_total 17",
           "chatapp_remote_changes_total 18",
           "# HELP chatapp_saves_total Messages committed to the store (each channel member's copy included).",
       }) {
    CAPTURE(line);
    CHECK(has_line(t, line));
  }
}

TEST_CASE("metrics: refused datagrams by reason, each decode error named as the codec names it") {
  std::string t = text_of(sample());
  CHECK(has_line(t, "# TYPE chatapp_datagrams_refused_total counter"));
  CHECK(has_line(t, "chatapp_datagrams_refused_total{reason=\"truncated\"} 9"));
  CHECK(has_line(t, "chatapp_datagrams_refused_total{reason=\"old_version\"} 2"));
  CHECK(has_line(t, "chatapp_datagrams_refused_total{reason=\"empty\"} 0"));
  CHECK(has_line(t, "chatapp_datagrams_refused_total{reason=\"rate_limited\"} 5"));
  CHECK(has_line(t, "chatapp_datagrams_refused_total{reason=\"not_sent_unproven\"} 6"));
  CHECK(has_line(t, "chatapp_datagrams_refused_total{reason=\"in_flight_refused\"} 8"));
  CHECK(t.find("reason=\"none\"") == std::string::npos);
  for (std::size_t i = 1; i < static_cast<std::size_t>(DecodeError::count_); ++i) {
    std::string label = std::string("{reason=\"").append(chat::protocol::to_string(static_cast<DecodeError>(i)));
    CAPTURE(label);
    CHECK(t.find(label) != std::string::npos);
  }
}

TEST_CASE("metrics: the commit histogram has cumulative buckets in seconds, +Inf the count, the sum in seconds") {
  std::string t = text_of(sample());
  for (const char* line : {
           "# TYPE chatapp_commit_seconds histogram", "chatapp_commit_seconds_count 4",
           "chatapp_commit_seconds_sum 2.0015", "chatapp_commit_seconds_bucket{le=\"0.00025\"} 1",
           "chatapp_commit_seconds_bucket{le=\"0.0005\"} 1", "chatapp_commit_seconds_bucket{le=\"0.001\"} 3",
           "chatapp_commit_seconds_bucket{le=\"0.5\"} 3", "chatapp_commit_seconds_bucket{le=\"1\"} 3",
           "chatapp_commit_seconds_bucket{le=\"+Inf\"} 4",
       }) {
    CAPTURE(line);
    CHECK(has_line(t, line));
  }
}

TEST_CASE("metrics: the lease gauge only for a shared store") {
  Snapshot s = sample();
  CHECK(text_of(s).find("chatapp_lease_held") == std::string::npos);
  s.lease_held = true;
  CHECK(has_line(text_of(s), "chatapp_lease_held 1"));
  s.lease_held = false;
  CHECK(has_line(text_of(s), "chatapp_lease_held 0"));
}

TEST_CASE("metrics: a board shows the last snapshot published, while another thread publishes") {
  auto board = std::make_shared<Board>();
  CHECK(has_line(prometheus::TextSerializer().Serialize(board->Collect()), "chatapp_datagrams_received_total 0"));
  std::atomic<bool> done{false};
  std::thread writer([&] {
    Snapshot s;
    for (std::uint64_t i = 1; i <= 2000; ++i) {
      s.transport.received = i;
      s.transport.sent = i;
      board->publish(s);
    }
    done = true;
  });
  while (!done) {
    // A scrape sees one snapshot whole: the two counters published together agree.
    auto fams = board->Collect();
    CHECK(fams.at(0).metric.at(0).counter.value == fams.at(1).metric.at(0).counter.value);
  }
  writer.join();
  CHECK(has_line(prometheus::TextSerializer().Serialize(board->Collect()), "chatapp_datagrams_received_total 2000"));
}

TEST_CASE("metrics: the exporter serves /metrics and publishes on its timer") {
  net::io_context io;
  std::uint64_t received = 1;
  std::uint16_t port = free_tcp_port();
  Exporter exporter(io, "127.0.0.1", port, [&] {
    Snapshot s;
    s.transport.received = received;
    return s;
  }, 20ms);
  CHECK(has_line(scrape(port), "chatapp_datagrams_received_total 1"));  // published at construction
  received = 42;
  auto end = std::chrono::steady_clock::now() + kDeadline;
  std::string body;
  do {
    io.run_for(20ms);
    body = scrape(port);
  } while (!has_line(body, "chatapp_datagrams_received_total 42") && std::chrono::steady_clock::now() < end);
  CHECK(has_line(body, "chatapp_datagrams_received_total 42"));
}

TEST_CASE("metrics: a port already listened on is refused with the system's reason") {
  net::io_context io;
  tcp::acceptor held(io, {net::ip::make_address_v4("127.0.0.1"), 0});
  std::uint16_t port = held.local_endpoint().port();
  std::string why;
  try {
    Exporter exporter(io, "127.0.0.1", port, [] { return Snapshot{}; });
  } catch (const chat::metrics::BindError& e) {
    why = e.what();
  }
  CHECK(why == "Address already in use");
}
