// The server's counters as Prometheus metric families, and the exposer that serves them.
#include "metrics/metrics.hpp"

#include <atomic>
#include <exception>
#include <thread>
#include <utility>

#include <prometheus/exposer.h>

#include "protocol/codec.hpp"

namespace chat::metrics {

namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

MetricFamily& add(std::vector<MetricFamily>& out, const char* name, const char* help, MetricType type) {
  out.push_back(MetricFamily{name, help, type, {}});
  return out.back();
}

void counter(std::vector<MetricFamily>& out, const char* name, const char* help, std::uint64_t v) {
  ClientMetric m;
  m.counter.value = static_cast<double>(v);
  add(out, name, help, MetricType::Counter).metric.push_back(std::move(m));
}

void gauge(std::vector<MetricFamily>& out, const char* name, const char* help, double v) {
  ClientMetric m;
  m.gauge.value = v;
  add(out, name, help, MetricType::Gauge).metric.push_back(std::move(m));
}

ClientMetric refused(const std::string& reason, std::uint64_t v) {
  ClientMetric m;
  m.label.push_back({"reason", reason});
  m.counter.value = static_cast<double>(v);
  return m;
}

/// The commit histogram: cumulative buckets with their bounds in seconds; +Inf is the count.
ClientMetric commits(const registry::ServerCounters& s) {
  ClientMetric m;
  std::uint64_t cumulative = 0;
  for (std::size_t i = 0; i < s.kCommitBoundsUs.size(); ++i) {
    cumulative += s.commits[i];
    m.histogram.bucket.push_back({cumulative, static_cast<double>(s.kCommitBoundsUs[i]) / 1e6});
  }
  m.histogram.sample_count = cumulative + s.commits.back();
  m.histogram.sample_sum = static_cast<double>(s.commit_us_sum) / 1e6;
  return m;
}

}  // namespace

Snapshot snapshot_of(const registry::Server& server, std::optional<bool> lease_held) {
  Snapshot s;
  s.transport = server.counters();
  s.server = server.server_counters();
  s.clients_registered = server.table().size();
  s.clients_online = server.table().online_count();
  s.lease_held = lease_held;
  return s;
}

std::vector<MetricFamily> families(const Snapshot& s) {
  const transport::Counters& t = s.transport;
  const registry::ServerCounters& v = s.server;
  std::vector<MetricFamily> out;
  counter(out, "chatapp_datagrams_received_total", "Datagrams received on the server's UDP port.", t.received);
  counter(out, "chatapp_datagrams_sent_total", "Datagrams sent, retransmissions included.", t.sent);
  counter(out, "chatapp_bytes_received_total", "Bytes of the datagrams received.", t.bytes_received);
  counter(out, "chatapp_bytes_sent_total", "Bytes of the datagrams sent, retransmissions included.", t.bytes_sent);

  MetricFamily& r = add(out, "chatapp_datagrams_refused_total",
                        "Datagrams refused, by reason: a decode error, the source over its rate limit "
                        "(rate_limited), not sent to an address that has not proven it receives "
                        "(not_sent_unproven), requests failed for too many in flight to one address "
                        "(in_flight_refused).",
                        MetricType::Counter);
  for (std::size_t i = 1; i < t.refused.size(); ++i)  // 0 is DecodeError::none
    r.metric.push_back(refused(protocol::to_string(static_cast<protocol::DecodeError>(i)), t.refused[i]));
  r.metric.push_back(refused("rate_limited", t.rate_limited));
  r.metric.push_back(refused("not_sent_unproven", t.amplification));
  r.metric.push_back(refused("in_flight_refused", t.in_flight_refused));

  counter(out, "chatapp_duplicates_total", "Repeated requests (answered again, not handled again).", t.duplicates);
  counter(out, "chatapp_retransmits_total", "Reliable requests sent again for want of an answer.", t.retransmits);
  gauge(out, "chatapp_clients_registered", "Names in the client table.", static_cast<double>(s.clients_registered));
  gauge(out, "chatapp_clients_online", "Clients in the table marked online.", static_cast<double>(s.clients_online));
  counter(out, "chatapp_registrations_total", "Registrations admitted.", v.registered);
  counter(out, "chatapp_saves_total",
          "Messages committed to the store (each channel member's copy included).", v.saved);
  MetricFamily& c = add(out, "chatapp_commit_seconds",
                        "Store commit latency, from the first save queued to the store's answer.",
                        MetricType::Histogram);
  c.metric.push_back(commits(v));
  counter(out, "chatapp_deliveries_total", "Saved messages a client acknowledged.", v.delivered);
  counter(out, "chatapp_relays_total", "Channel relays sent (first transmissions).", v.relays);
  counter(out, "chatapp_table_updates_total", "Client table datagrams sent (first transmissions).",
          v.table_updates);
  counter(out, "chatapp_store_errors_total", "Store calls that failed.", v.store_errors);
  counter(out, "chatapp_remote_changes_total", "Changes made by other servers sharing the store, applied here.",
          v.remote_changes);
  if (s.lease_held)
    gauge(out, "chatapp_lease_held", "1 while this server holds its lease in the shared store, 0 when lost.",
          *s.lease_held ? 1 : 0);
  return out;
}

void Board::publish(const Snapshot& s) {
  std::lock_guard lock(mutex_);
  snapshot_ = s;
}

std::vector<MetricFamily> Board::Collect() const {
  Snapshot s;
  {
    std::lock_guard lock(mutex_);
    s = snapshot_;
  }
  return families(s);
}

namespace {

/// Why `address`:`port` cannot be listened on, asked again of the system after the exposer
/// failed (civetweb's own exception only says "possible problem binding to port").
std::string bind_failure(const std::string& address, std::uint16_t port, const std::exception& e) {
  try {
    net::io_context io;
    net::ip::tcp::acceptor probe(io, {net::ip::make_address_v4(address), port});
  } catch (const boost::system::system_error& b) {
    return b.code().message();
  }
  return e.what();  // free again by now: say what the exposer said
}

}  // namespace

Exporter::Exporter(net::io_context& io, const std::string& address, std::uint16_t port, Take take,
                   std::chrono::milliseconds period)
    : take_(std::move(take)),
      period_(period),
      address_(address),
      port_(port),
      timer_(io),
      board_(std::make_shared<Board>()) {
  board_->publish(take_());
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(std::string(address).append(":").append(std::to_string(port)));
  } catch (const std::exception& e) {
    throw BindError(bind_failure(address, port, e));
  }
  exposer_->RegisterCollectable(board_);
  tick();
}

Exporter::~Exporter() {
  // civetweb's listener waits in poll() for up to 2 s between looks at its stop flag, so
  // stopping the exposer would hold the process (and the port) that long: a connection to
  // the port wakes it. Made again until the exposer is gone, as the first may come too early.
  std::atomic<bool> stopped{false};
  std::thread waker([&] {
    auto at = address_ == "0.0.0.0" ? net::ip::make_address_v4("127.0.0.1") : net::ip::make_address_v4(address_);
    net::io_context io;
    while (!stopped) {
      net::ip::tcp::socket s(io);
      error_code ec;
      s.connect({at, port_}, ec);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  exposer_.reset();
  stopped = true;
  waker.join();
}

void Exporter::tick() {
  timer_.expires_after(period_);
  timer_.async_wait([this](error_code ec) {
    if (ec) return;  // cancelled: the exporter is going
    board_->publish(take_());
    tick();
  });
}

}  // namespace chat::metrics
