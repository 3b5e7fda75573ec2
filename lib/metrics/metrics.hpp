// The server's counters as Prometheus text metrics over HTTP (SPEC §13, `--metrics <port>`).
//
// Two threads meet here, and only here. The server is single-threaded on its io_context and
// its counters are plain integers: the io thread copies them into a Snapshot once a second
// and publishes it under a mutex. prometheus-cpp's Exposer answers HTTP on civetweb threads of
// its own; a scrape reads the last published Snapshot under the same mutex and nothing else,
// so the values it shows are at most about a second old. Nothing here logs from those threads
// (the spdlog sinks are single-threaded).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>

#include "registry/server.hpp"
#include "transport/core.hpp"
#include "transport/net.hpp"

namespace prometheus {
class Exposer;
}

namespace chat::metrics {

/// What the metrics show, as of one moment on the io thread.
struct Snapshot {
  transport::Counters transport;
  registry::ServerCounters server;
  std::size_t clients_registered = 0;  // rows in the client table
  std::size_t clients_online = 0;
  /// A shared store's lease (true: held); empty for an embedded store, and then not exported.
  std::optional<bool> lease_held;
};

/// The server's counters and table sizes now; `lease_held` as the store reports it.
Snapshot snapshot_of(const registry::Server& server, std::optional<bool> lease_held = std::nullopt);

/// Every metric family for `s`, each with its HELP text, in a fixed order.
std::vector<prometheus::MetricFamily> families(const Snapshot& s);

/// The last published Snapshot, for the exposer's threads: publish() on the io thread,
/// Collect() on a scrape's, each under the mutex.
class Board : public prometheus::Collectable {
 public:
  void publish(const Snapshot& s);
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  mutable std::mutex mutex_;
  Snapshot snapshot_;
};

/// The metrics port could not be served (in use, not permitted...): what() says why.
struct BindError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Serves http://<address>:<port>/metrics: the exposer on its own threads, and a steady_timer
/// on `io` that publishes `take()` every `period` (and once at construction).
class Exporter {
 public:
  using Take = std::function<Snapshot()>;
  /// Throws BindError if the port cannot be bound.
  Exporter(net::io_context& io, const std::string& address, std::uint16_t port, Take take,
           std::chrono::milliseconds period = std::chrono::seconds(1));
  Exporter(const Exporter&) = delete;
  Exporter& operator=(const Exporter&) = delete;
  ~Exporter();

 private:
  void tick();

  Take take_;
  std::chrono::milliseconds period_;
  std::string address_;
  std::uint16_t port_;
  net::steady_timer timer_;
  std::shared_ptr<Board> board_;
  std::unique_ptr<prometheus::Exposer> exposer_;  // after board_: stopped before it goes
};

}  // namespace chat::metrics
