// chatbench: drives a real `ChatApp -s` process with many simulated peers (one Endpoint each, one
// io_context) and prints every figure beside a same-run baseline, one JSON line per figure.
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <spdlog/spdlog.h>

#include "identity/envelope.hpp"
#include "identity/identity.hpp"
#include "peer/local_table.hpp"
#include "protocol/codec.hpp"
#include "transport/endpoint.hpp"

namespace {

namespace fs = std::filesystem;
namespace proto = chat::protocol;
namespace ident = chat::identity;
namespace net = chat::net;
using chat::udp;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

/// Set by SIGINT/SIGTERM: the running scenario stops, its server is stopped and its data removed.
volatile std::sig_atomic_t g_interrupted = 0;

/// A scenario that could not produce its figures (timeout, refused request, server failure).
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------- options and output

struct Options {
  std::string scenario;
  bool quick = false;
  std::string bin;                 // the ChatApp binary
  std::string tmp = "/tmp";        // where the server's data directory is made
  std::vector<std::size_t> sizes;  // --n overrides the scenario's sizes
  std::vector<std::string> wrap;   // --wrap: a command the server runs under (valgrind ...)
  std::vector<std::string> server_args;  // --server-arg: passed on to the server (--ack-timeout 2000)
  std::chrono::seconds start_timeout{10};
  std::size_t rounds = 0;  // --rounds: channel messages per fanout size (0: the default)
  std::string pg_script = CHATBENCH_PG_SCRIPT;  // --pg-script: scripts/pg, for the servers scenario
};

/// The retry policy of the simulated peers: the product's defaults (SPEC: 500 ms x 5 retries).
const chat::transport::RetryPolicy kPeerPolicy{500ms, 5};
/// Chat text used by every scenario: about one typed line.
const std::string kText = "hello from a simulated peer, a line of about the usual size for chat text!";
/// The server's ACK timeout in the register and memory scenarios, where one bench process
/// answers for up to 10,000 clients: at the default 500 ms its own lag makes the server resend
/// and then give up on live clients (see docs/PERFORMANCE.md), which measures the bench.
const std::vector<std::string> kMassArgs{"--ack-timeout", "3000"};
/// Peers that also keep a real peer::LocalTable, to check the compact view agrees with it.
constexpr std::size_t kChecked = 16;
/// Requests each sender keeps in flight in the store and drain fills (a busy client).
constexpr std::size_t kSaveWindow = 8;

void emit(std::string_view bench, std::size_t n, std::string_view metric, double value, std::string_view unit,
          int precision = 1) {
  std::printf("{\"bench\": \"%.*s\", \"n\": %zu, \"metric\": \"%.*s\", \"value\": %.*f, \"unit\": \"%.*s\"}\n",
              static_cast<int>(bench.size()), bench.data(), n, static_cast<int>(metric.size()), metric.data(),
              precision, value, static_cast<int>(unit.size()), unit.data());
  std::fflush(stdout);
}

void emit_error(std::string_view bench, std::size_t n, const std::string& what) {
  std::string clean = what;
  for (char& c : clean)
    if (c == '"' || c == '\\' || static_cast<unsigned char>(c) < 0x20) c = ' ';
  std::printf("{\"bench\": \"%.*s\", \"n\": %zu, \"error\": \"%s\"}\n", static_cast<int>(bench.size()),
              bench.data(), n, clean.c_str());
  std::fflush(stdout);
  std::fprintf(stderr, "chatbench %.*s n=%zu: %s\n", static_cast<int>(bench.size()), bench.data(), n, what.c_str());
}

void note(const std::string& what) {
  std::fprintf(stderr, "chatbench: %s\n", what.c_str());
}

/// The identity of simulated peer `i`: derived from its index, so every run uses the same keys.
ident::Identity peer_identity(std::size_t i) {
  ident::Seed seed{};
  constexpr std::string_view tag = "chatbench peer";
  std::memcpy(seed.data(), tag.data(), tag.size());
  for (std::size_t b = 0; b < 8; ++b) seed[24 + b] = static_cast<std::uint8_t>(i >> (8 * b));
  return ident::Identity::from_seed(seed);
}

/// The sender's clock in ms since the Unix epoch, as sealed and signed bodies carry it.
std::uint64_t now_ms() {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count());
}

double us(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }
double ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

/// Nearest-rank percentile of `v` (sorted in place).
double percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  auto rank = static_cast<std::size_t>(std::ceil(p / 100.0 * static_cast<double>(v.size())));
  return v[std::clamp<std::size_t>(rank, 1, v.size()) - 1];
}

double median(std::vector<double> v) { return percentile(v, 50); }
double maximum(const std::vector<double>& v) { return v.empty() ? 0 : *std::max_element(v.begin(), v.end()); }

double self_cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

void raise_fd_limit(rlim_t want) {
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
  if (rl.rlim_cur >= want) return;
  rl.rlim_cur = std::min(want, rl.rlim_max);
  setrlimit(RLIMIT_NOFILE, &rl);
  if (rl.rlim_cur < want)
    note("RLIMIT_NOFILE is " + std::to_string(rl.rlim_cur) + ", below the " + std::to_string(want) + " wanted");
}

// ---------------------------------------------------------------- plain sockets (baselines)

/// A blocking UDP socket on 127.0.0.1 with a receive timeout, for the baselines.
class PlainSocket {
 public:
  PlainSocket() {
    fd_ = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd_ < 0) throw Failure(std::string("socket: ") + std::strerror(errno));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0)
      throw Failure(std::string("bind: ") + std::strerror(errno));
    socklen_t len = sizeof addr_;
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr_), &len);
    timeval tv{1, 0};  // bounded: a lost datagram fails the baseline instead of hanging
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int size = 4 << 20;  // the same buffers the Endpoint asks for
    if (::setsockopt(fd_, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) != 0)
      ::setsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
  }
  PlainSocket(const PlainSocket&) = delete;
  PlainSocket& operator=(const PlainSocket&) = delete;
  ~PlainSocket() { ::close(fd_); }

  void send_to(const std::string& bytes, const PlainSocket& to) const {
    if (::sendto(fd_, bytes.data(), bytes.size(), 0, reinterpret_cast<const sockaddr*>(&to.addr_), sizeof to.addr_) !=
        static_cast<ssize_t>(bytes.size()))
      throw Failure(std::string("sendto: ") + std::strerror(errno));
  }
  std::size_t receive() {
    ssize_t n = ::recv(fd_, buf_.data(), buf_.size(), 0);
    if (n < 0) throw Failure(std::string("baseline recv: ") + std::strerror(errno));
    return static_cast<std::size_t>(n);
  }

 private:
  int fd_ = -1;
  sockaddr_in addr_{};
  std::array<char, 2048> buf_{};
};

/// CPU time of this thread, in seconds (the cost of the calls it made, not of waiting).
double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

/// What the machine charges for one datagram, measured now: `datagrams` of `size` bytes sent
/// from one plain socket round-robin to `sockets` plain sockets, in bursts of one per socket,
/// each burst received before the next (so no buffer overflows).
struct RawCost {
  double sendto_cpu_us = 0;    // this thread's CPU per sendto() call
  double datagram_wall_us = 0;  // wall time per datagram, send and receive included
};
RawCost raw_send_cost(std::size_t sockets, std::size_t datagrams, std::size_t size) {
  PlainSocket from;
  std::vector<std::unique_ptr<PlainSocket>> to;
  for (std::size_t i = 0; i < std::max<std::size_t>(sockets, 1); ++i) to.push_back(std::make_unique<PlainSocket>());
  const std::string bytes(size, 'x');
  double send_cpu = 0;
  std::size_t sent = 0;
  auto start = Clock::now();
  while (sent < datagrams) {
    std::size_t burst = std::min(to.size(), datagrams - sent);
    double c0 = thread_cpu_seconds();
    for (std::size_t i = 0; i < burst; ++i) from.send_to(bytes, *to[i]);
    send_cpu += thread_cpu_seconds() - c0;
    for (std::size_t i = 0; i < burst; ++i) to[i]->receive();
    sent += burst;
  }
  double wall = us(Clock::now() - start);
  double n = static_cast<double>(std::max<std::size_t>(datagrams, 1));
  return {send_cpu * 1e6 / n, wall / n};
}

/// The kernel's UDP counters (system-wide, /proc/net/snmp): datagrams dropped on a full receive buffer.
std::uint64_t udp_rcvbuf_errors() {
  std::ifstream in("/proc/net/snmp");
  std::string header, values;
  for (std::string line; std::getline(in, line);) {
    if (!line.starts_with("Udp:")) continue;
    if (header.empty()) header = line;
    else values = line;
  }
  std::istringstream h(header), v(values);
  for (std::string name, value; h >> name && v >> value;)
    if (name == "RcvbufErrors") return std::stoull(value);
  return 0;
}

/// A UDP port the kernel just gave out on 127.0.0.1 (free now; the server binds it next).
std::uint16_t free_udp_port() {
  sockaddr_in a{};
  socklen_t len = sizeof a;
  int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

/// Appends `n` records of `record` bytes to a file with one fdatasync per `every`: the floor
/// under any durable store, on the filesystem of `dir` (as bench_store measures it).
double fdatasync_rate(const fs::path& dir, std::size_t n, std::size_t every, std::size_t record) {
  fs::path file = dir / ("fdatasync-" + std::to_string(every));
  int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) throw Failure("open " + file.string() + ": " + std::strerror(errno));
  std::string line(record - 1, 'r');
  line += '\n';
  auto start = Clock::now();
  for (std::size_t i = 0; i < n; ++i) {
    bool ok = ::write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size());
    if (ok && ((i + 1) % every == 0 || i + 1 == n)) ok = ::fdatasync(fd) == 0;
    if (!ok) {
      std::string why = std::strerror(errno);
      ::close(fd);
      throw Failure("baseline write/fdatasync: " + why);
    }
  }
  double secs = std::chrono::duration<double>(Clock::now() - start).count();
  ::close(fd);
  fs::remove(file);
  return static_cast<double>(n) / secs;
}

/// What /proc/<pid>/stat says of a process's CPU, in seconds, and its parent (all 0 if gone).
struct ProcCpu {
  double self = 0;      // user + system of the process itself
  double children = 0;  // user + system of the children it has waited for
  pid_t parent = 0;
};
ProcCpu proc_cpu(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto close_paren = all.rfind(')');
  if (close_paren == std::string::npos || close_paren + 2 > all.size()) return {};
  std::istringstream fields(all.substr(close_paren + 2));
  std::vector<std::string> tok;
  for (std::string t; fields >> t;) tok.push_back(t);
  if (tok.size() < 15) return {};
  // Fields 4 (ppid) and 14-17 (utime, stime, cutime, cstime) of stat(5); tok[0] is field 3.
  auto secs = [&](std::size_t a, std::size_t b) {
    return (std::strtod(tok[a].c_str(), nullptr) + std::strtod(tok[b].c_str(), nullptr)) /
           static_cast<double>(::sysconf(_SC_CLK_TCK));
  };
  return {secs(11, 12), secs(13, 14), static_cast<pid_t>(std::strtol(tok[1].c_str(), nullptr, 10))};
}

/// In a child after fork(): a process group of its own (a wrapper such as strace or valgrind
/// and what it runs stop together), stdin from /dev/null, stdout and stderr to `out` and `err`
/// (-1: /dev/null), nothing else open, then exec (searching PATH); exit 127 if that fails.
[[noreturn]] void exec_child(std::vector<char*>& argv, int out, int err) {
  ::setpgid(0, 0);
  int null = ::open("/dev/null", O_RDWR);
  ::dup2(null, 0);
  ::dup2(out >= 0 ? out : null, 1);
  ::dup2(err >= 0 ? err : null, 2);
  ::close_range(3, ~0U, 0);
  ::execvp(argv[0], argv.data());
  ::dprintf(2, "exec %s: %s\n", argv[0], std::strerror(errno));
  ::_exit(127);
}

/// Runs `args` (no shell) in a process group of its own, so a Ctrl-C meant for the bench does not
/// cut it short, for at most `limit`. Returns its stdout; a Failure with its stderr if it failed.
std::string run_command(const std::vector<std::string>& args, Clock::duration limit) {
  int out[2], err[2];
  if (::pipe2(out, O_CLOEXEC) != 0) throw Failure(std::string("pipe2: ") + std::strerror(errno));
  if (::pipe2(err, O_CLOEXEC) != 0) {
    ::close(out[0]);
    ::close(out[1]);
    throw Failure(std::string("pipe2: ") + std::strerror(errno));
  }
  std::vector<std::string> copy = args;
  std::vector<char*> argv;
  for (auto& a : copy) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid == 0) exec_child(argv, out[1], err[1]);
  ::close(out[1]);
  ::close(err[1]);
  if (pid < 0) {
    ::close(out[0]);
    ::close(err[0]);
    throw Failure(std::string("fork: ") + std::strerror(errno));
  }
  ::setpgid(pid, pid);
  std::string text[2];
  std::array<pollfd, 2> fds{pollfd{out[0], POLLIN, 0}, pollfd{err[0], POLLIN, 0}};
  auto deadline = Clock::now() + limit;
  bool timed_out = false;
  while (fds[0].fd >= 0 || fds[1].fd >= 0) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) {
      timed_out = true;
      break;
    }
    int ready = ::poll(fds.data(), fds.size(), static_cast<int>(std::min<long>(left, 100)));
    if (ready < 0 && errno != EINTR) break;
    for (std::size_t k = 0; k < fds.size(); ++k) {
      if (fds[k].fd < 0 || (fds[k].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
      std::array<char, 4096> buf{};
      ssize_t n = ::read(fds[k].fd, buf.data(), buf.size());
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        ::close(fds[k].fd);
        fds[k].fd = -1;
      } else {
        text[k].append(buf.data(), static_cast<std::size_t>(n));
      }
    }
  }
  for (auto& f : fds)
    if (f.fd >= 0) ::close(f.fd);
  if (timed_out) ::kill(-pid, SIGKILL);
  int status = -1;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  std::string cmd;
  for (const auto& a : args) cmd += (cmd.empty() ? "" : " ") + a;
  while (!text[1].empty() && text[1].back() == '\n') text[1].pop_back();
  if (timed_out) throw Failure(std::string(cmd).append(" did not finish in time: ").append(text[1]));
  if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0))
    throw Failure(std::string(cmd).append(" failed (status ").append(std::to_string(status)).append("): ").append(text[1]));
  return text[0];
}

/// A throwaway PostgreSQL cluster (scripts/pg) in a directory of its own under --tmp: started on
/// construction, stopped and removed by stop() or the destructor, also after a failure.
class PgCluster {
 public:
  explicit PgCluster(const Options& o) : script_(o.pg_script) {
    if (::access(script_.c_str(), X_OK) != 0) throw Failure("no scripts/pg at " + script_ + " (use --pg-script)");
    std::string tmpl = (fs::path(o.tmp) / "chatbench-pg-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) throw Failure("mkdtemp under " + o.tmp + ": " + std::strerror(errno));
    base_ = tmpl;
    // As root the cluster runs as the postgres user, which must be able to reach its directory.
    ::chmod(base_.c_str(), 0711);
    dir_ = base_ / "pg";
    try {
      uri_ = last_line(run_command({script_, "start", dir_.string()}, 120s));
    } catch (...) {
      stop();
      throw;
    }
    note("PostgreSQL cluster in " + dir_.string() + " at " + uri_);
  }
  PgCluster(const PgCluster&) = delete;
  PgCluster& operator=(const PgCluster&) = delete;
  ~PgCluster() { stop(); }

  /// A fresh, empty database of the cluster: its URI.
  std::string newdb() const { return last_line(run_command({script_, "newdb", dir_.string()}, 30s)); }

  /// CPU seconds the cluster used so far: the postmaster, its live backends and the ones it reaped.
  double cpu_seconds() const {
    std::ifstream in(dir_ / "data" / "postmaster.pid");
    pid_t pm = 0;
    if (!(in >> pm) || pm <= 0) return 0;
    ProcCpu top = proc_cpu(pm);
    double total = top.self + top.children;
    for (const auto& entry : fs::directory_iterator("/proc")) {
      pid_t pid = static_cast<pid_t>(std::atoi(entry.path().filename().c_str()));
      if (pid <= 0 || pid == pm) continue;
      ProcCpu c = proc_cpu(pid);
      if (c.parent == pm) total += c.self;
    }
    return total;
  }

  /// Stops the cluster and removes its directory; never throws (it runs on the way out of a failure).
  void stop() noexcept {
    if (base_.empty()) return;
    try {
      run_command({script_, "stop", dir_.string()}, 60s);
    } catch (const std::exception& e) {
      note(std::string("stopping the PostgreSQL cluster: ").append(e.what()));
    }
    std::error_code ec;
    fs::remove_all(base_, ec);
    base_.clear();
  }

 private:
  static std::string last_line(std::string out) {
    while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
    auto nl = out.rfind('\n');
    std::string line = nl == std::string::npos ? out : out.substr(nl + 1);
    if (!line.starts_with("postgresql://")) throw Failure("scripts/pg printed no URI: " + out);
    return line;
  }

  std::string script_;
  fs::path base_, dir_;
  std::string uri_;
};

// ---------------------------------------------------------------- the server process

/// A `ChatApp -s` child process with a fresh data directory; SIGTERM and reaped on stop().
class ServerProcess {
 public:
  explicit ServerProcess(const Options& o, std::vector<std::string> extra = {}) : extra_(std::move(extra)) {
    std::string tmpl = (fs::path(o.tmp) / "chatbench-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) throw Failure("mkdtemp under " + o.tmp + ": " + std::strerror(errno));
    dir_ = tmpl;
    for (int attempt = 0; attempt < 3; ++attempt) {
      port_ = free_udp_port();  // a race with another process is possible: retry on failure
      if (spawn(o)) {
        note("server pid " + std::to_string(pid_) + " on 127.0.0.1:" + std::to_string(port_) + ", data " +
             dir_.string());
        return;
      }
      reap(0s);
    }
    std::string why = tail();
    fs::remove_all(dir_);
    throw Failure("the server did not start: " + why);
  }
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;
  ~ServerProcess() {
    if (pid_ > 0) stop();
  }

  udp::endpoint endpoint() const { return {net::ip::make_address_v4("127.0.0.1"), port_}; }
  pid_t pid() const { return pid_; }
  const fs::path& data_dir() const { return dir_; }

  /// A field of /proc/<pid>/status in KiB ("VmRSS", "VmHWM"), or -1.
  long status_kib(std::string_view field) const {
    std::ifstream in("/proc/" + std::to_string(pid_) + "/status");
    std::string line;
    while (std::getline(in, line))
      if (line.starts_with(field) && line.size() > field.size() && line[field.size()] == ':')
        return std::strtol(line.c_str() + field.size() + 1, nullptr, 10);
    return -1;
  }

  /// User + system CPU seconds the server used so far.
  double cpu_seconds() const { return proc_cpu(pid_).self; }

  /// The last lines the server wrote on stderr.
  std::string tail() const {
    std::lock_guard lock(mu_);
    std::string out;
    for (const auto& l : last_) out += (out.empty() ? "" : " | ") + l;
    return out;
  }

  std::uint64_t log_lines() const {
    std::lock_guard lock(mu_);
    return lines_;
  }
  /// How many times the server logged a client as found offline ("is offline (did not
  /// answer)" after a probe or relay, "is offline (no keep-alive for 3 intervals)") so far.
  std::uint64_t marked_gone() const {
    std::lock_guard lock(mu_);
    return gone_;
  }

  /// SIGTERM, wait (10 s, then SIGKILL); removes the data directory. Throws if it did not exit cleanly.
  void stop() {
    if (pid_ <= 0) return;
    ::kill(-pid_, SIGTERM);  // the group we made: the server and any wrapper, nothing else
    int status = reap(10s);
    fs::remove_all(dir_);
    if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0))
      throw Failure("the server did not exit cleanly on SIGTERM (status " + std::to_string(status) + "): " + tail());
  }

 private:
  bool spawn(const Options& o) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw Failure(std::string("pipe2: ") + std::strerror(errno));
    std::vector<std::string> args = o.wrap;
    for (std::string a : {o.bin, std::string("-s"), std::to_string(port_), std::string("--data-dir"), dir_.string(),
                          std::string("--bind"), std::string("127.0.0.1")})
      args.push_back(std::move(a));
    // Options as name-value pairs; one given with --server-arg replaces the scenario's own.
    for (std::size_t i = 0; i + 1 < extra_.size(); i += 2)
      if (std::find(o.server_args.begin(), o.server_args.end(), extra_[i]) == o.server_args.end()) {
        args.push_back(extra_[i]);
        args.push_back(extra_[i + 1]);
      }
    for (const auto& a : o.server_args) args.push_back(a);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t parent = ::getpid();
    {
      std::lock_guard lock(mu_);
      listening_ = eof_ = stop_reading_ = false;
    }
    pid_ = ::fork();
    if (pid_ < 0) throw Failure(std::string("fork: ") + std::strerror(errno));
    if (pid_ > 0) ::setpgid(pid_, pid_);  // also here, so the group exists before any kill
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);  // never outlive the bench
      if (::getppid() != parent) ::_exit(127);
      exec_child(argv, -1, fds[1]);
    }
    ::close(fds[1]);
    fd_ = fds[0];
    reader_ = std::thread([this] { read_log(); });
    std::unique_lock lock(mu_);
    cv_.wait_until(lock, Clock::now() + o.start_timeout, [this] { return listening_ || eof_; });
    return listening_;
  }

  // Keeps the pipe drained (a full pipe would block the server) and the last lines for errors.
  void read_log() {
    std::array<char, 8192> buf{};
    std::string partial;
    for (;;) {
      pollfd p{fd_, POLLIN, 0};
      int ready = ::poll(&p, 1, 100);
      if (ready == 0) {
        std::lock_guard lock(mu_);
        if (stop_reading_) break;  // bounded: never wait for an EOF that does not come
        continue;
      }
      ssize_t n = ::read(fd_, buf.data(), buf.size());
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      partial.append(buf.data(), static_cast<std::size_t>(n));
      std::size_t start = 0;
      for (std::size_t nl; (nl = partial.find('\n', start)) != std::string::npos; start = nl + 1) {
        std::string_view line(partial.data() + start, nl - start);
        std::lock_guard lock(mu_);
        ++lines_;
        if (!listening_ && line.find("server listening") != std::string_view::npos) {
          listening_ = true;
          cv_.notify_all();
        }
        if (line.find(" is offline (") != std::string_view::npos) ++gone_;
        if (log_) *log_ << line << '\n';
        last_.emplace_back(line);
        if (last_.size() > 8) last_.pop_front();
      }
      partial.erase(0, start);
    }
    std::lock_guard lock(mu_);
    eof_ = true;
    cv_.notify_all();
  }

  int reap(std::chrono::seconds grace) {
    int status = -1;
    auto deadline = Clock::now() + grace;
    for (;;) {
      pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_ || (r < 0 && errno != EINTR)) break;
      if (Clock::now() >= deadline) {
        ::kill(-pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
        break;
      }
      std::this_thread::sleep_for(5ms);
    }
    // Anything left in the group (a wrapper's child) holds the pipe open: end it too.
    if (::kill(-pid_, 0) == 0) {
      std::this_thread::sleep_for(100ms);
      ::kill(-pid_, SIGKILL);
    }
    pid_ = -1;
    {
      std::lock_guard lock(mu_);
      stop_reading_ = true;
    }
    if (reader_.joinable()) reader_.join();
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    return status;
  }

  std::vector<std::string> extra_;
  fs::path dir_;
  std::uint16_t port_ = 0;
  pid_t pid_ = -1;
  int fd_ = -1;
  std::thread reader_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::string> last_;
  std::uint64_t lines_ = 0;
  std::uint64_t gone_ = 0;
  // CHATBENCH_SERVER_LOG=<file>: every line the server logs is appended there too.
  std::unique_ptr<std::ofstream> log_ = std::getenv("CHATBENCH_SERVER_LOG") == nullptr
                                           ? nullptr
                                           : std::make_unique<std::ofstream>(std::getenv("CHATBENCH_SERVER_LOG"),
                                                                             std::ios::app);
  bool listening_ = false;
  bool eof_ = false;
  bool stop_reading_ = false;
};

// ---------------------------------------------------------------- simulated peers

class Sim;

/// The index of simulated peer `name` (simulated peers are named p<index>), if it is one.
std::optional<std::size_t> peer_index(std::string_view name) {
  std::size_t i = 0;
  bool ok = name.size() > 1 && name.size() < 9 && name[0] == 'p';
  for (std::size_t k = 1; ok && k < name.size(); ++k) {
    ok = name[k] >= '0' && name[k] <= '9';
    i = i * 10 + static_cast<std::size_t>(name[k] - '0');
  }
  if (!ok) return std::nullopt;
  return i;
}

/// A peer's table, applied with exactly the rules of peer::LocalTable::apply but held as one
/// byte per peer: N peers each holding N rows as std::map nodes would need ~14 GB at N=10,000.
struct TableView {
  std::uint64_t epoch = 0;
  std::uint64_t version = 0;
  std::vector<std::uint8_t> rows;  // by peer index: 0 absent, 1 offline, 2 online
  std::size_t count = 0;
  std::size_t online = 0;
  std::size_t unknown = 0;  // rows whose name is no simulated peer's

  chat::peer::Applied apply(const proto::Table& t) {
    if (t.epoch != epoch) {
      if (t.from != 0) return {false, false, epoch, 0};
      std::fill(rows.begin(), rows.end(), 0);
      count = online = unknown = 0;
      epoch = t.epoch;
      version = 0;
    }
    if (t.from > version) return {false, false, epoch, version};
    if (t.to <= version) return {false, false, epoch, version};
    for (const auto& e : t.entries) set(e);
    version = t.to;
    return {true, !t.more, epoch, version};
  }

  void set(const proto::Entry& e) {
    std::optional<std::size_t> index = peer_index(e.name);
    if (!index) {
      ++unknown;
      return;
    }
    std::size_t i = *index;
    if (i >= rows.size()) rows.resize(i + 1, 0);
    std::uint8_t now = e.online ? 2 : 1;
    std::uint8_t& was = rows[i];
    if (was == 0) ++count;
    if (was == 2) --online;
    if (now == 2) ++online;
    was = now;
  }
};

struct Peer {
  Peer(net::io_context& io, std::size_t i, udp::endpoint srv)
      : index(i),
        name(std::string("p").append(std::to_string(i))),
        id(peer_identity(i)),
        server(srv),
        ep(io, udp::endpoint(net::ip::make_address_v4("127.0.0.1"), 0), kPeerPolicy) {}
  std::size_t index;
  std::string name;
  ident::Identity id;  // its own key pair, as every real client has
  udp::endpoint server;  // the server it registers with, and the only one it takes tables from
  chat::transport::Socket ep;
  TableView view;
  std::unique_ptr<chat::peer::LocalTable> check;  // the real LocalTable, on the first kChecked peers
  bool registered = false;
  bool converged = false;
  std::uint64_t pending = 0;        // from the last RegOk
  std::uint64_t relay_round = 0;    // the channel id of the last Relay taken
  Clock::time_point registered_at;  // when the RegOk arrived
  int fd = -1;                      // the Endpoint's socket, once Sim::find_sockets() ran
};

/// Kernel receive time (CLOCK_REALTIME, ns) of the last datagram read from `fd`, or -1. The
/// first call turns timestamping on for the socket (SIOCGSTAMPNS), so call it once beforehand.
std::int64_t last_arrival_ns(int fd) {
  timespec ts{};
  if (fd < 0 || ::ioctl(fd, SIOCGSTAMPNS, &ts) != 0) return -1;
  return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

std::int64_t wall_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

/// The simulated peers of one scenario, on one io_context (single thread); each peer uses the
/// Sim's server unless add() names another (several servers on one shared store).
class Sim {
 public:
  Sim(net::io_context& io, udp::endpoint server) : io_(io), server_(server), keepalive_timer_(io) { tick(); }

  Peer& add() { return add(server_); }
  Peer& add(const udp::endpoint& server) {
    auto p = std::make_unique<Peer>(io_, peers_.size(), server);
    if (p->index < kChecked) p->check = std::make_unique<chat::peer::LocalTable>();
    Peer& ref = *p;
    ref.ep.start([this, &ref](const proto::Message& m, const udp::endpoint& from) { on_request(ref, m, from); });
    peers_.push_back(std::move(p));
    return ref;
  }
  Peer& peer(std::size_t i) { return *peers_[i]; }

  /// Finds each peer's socket among the open descriptors (the Endpoint does not expose it) and
  /// turns on kernel receive timestamps for it, so a handler can ask when its datagram arrived.
  void find_sockets() {
    std::unordered_map<std::uint16_t, Peer*> by_port;
    for (auto& p : peers_) by_port[p->ep.local_endpoint().port()] = p.get();
    for (const auto& entry : fs::directory_iterator("/proc/self/fd")) {
      int fd = std::atoi(entry.path().filename().c_str());
      sockaddr_in a{};
      socklen_t len = sizeof a;
      int type = 0;
      socklen_t tlen = sizeof type;
      if (::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0 || a.sin_family != AF_INET) continue;
      if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tlen) != 0 || type != SOCK_DGRAM) continue;
      auto it = by_port.find(ntohs(a.sin_port));
      if (it == by_port.end() || a.sin_addr.s_addr != htonl(INADDR_LOOPBACK)) continue;
      it->second->fd = fd;
      last_arrival_ns(fd);  // enables timestamping; nothing was read yet, so it fails
    }
  }
  const udp::endpoint& server() const { return server_; }
  std::size_t size() const { return peers_.size(); }

  /// The key of simulated peer `name` (what the server's table binds it to), or nullptr.
  const proto::Key* key_of(std::string_view name) const {
    std::optional<std::size_t> i = peer_index(name);
    if (!i || *i >= peers_.size()) return nullptr;
    return &peers_[*i]->id.public_key();
  }
  /// The box key between `me` and `peer`, computed once and kept (as peer::Client::pair does).
  const ident::Pair& pair(const Peer& me, const proto::Key& peer) {
    auto k = std::make_pair(me.index, peer);
    auto it = pairs_.find(k);
    if (it == pairs_.end()) it = pairs_.emplace(k, ident::Pair(me.id, peer)).first;
    return it->second;
  }

  /// Registers as the real client does (peer::Client::send_register, send_proof): a Register
  /// without token, answered by a Challenge, then a second Register (a new id) carrying the
  /// token and the identity's proof over it. `then` gets the RegOk, or nullptr on any failure.
  void register_peer(Peer& p, std::function<void(const proto::RegOk*)> then = nullptr) {
    p.registered = false;
    auto fail = [this, &p](const std::string& why) {
      ++failed_;
      last_failure_ = p.name + ": " + why;
    };
    proto::Register hello{p.ep.next_id(), p.name, p.id.public_key(), 0, {}, {}};
    p.ep.request(hello, p.server, [this, &p, fail, then = std::move(then)](const proto::Message* r) mutable {
      const auto* ch = r != nullptr ? std::get_if<proto::Challenge>(r) : nullptr;
      if (ch == nullptr) {
        const auto* no = r != nullptr ? std::get_if<proto::RegErr>(r) : nullptr;
        fail(r == nullptr ? "register unanswered"
             : no != nullptr ? "register refused: " + no->reason
                             : std::string("register answered by ") + proto::type_name(*r));
        if (then) then(nullptr);
        return;
      }
      proto::Register proof{p.ep.next_id(), p.name, p.id.public_key(), 0, ch->token,
                            ident::register_proof(p.id, p.name, ch->token)};
      p.ep.request(proof, p.server, [this, &p, fail, then = std::move(then)](const proto::Message* r2) {
        const auto* ok = r2 != nullptr ? std::get_if<proto::RegOk>(r2) : nullptr;
        if (ok == nullptr) {
          const auto* no = r2 != nullptr ? std::get_if<proto::RegErr>(r2) : nullptr;
          fail(r2 == nullptr ? "proof unanswered"
               : no != nullptr ? "proof refused: " + no->reason
                               : std::string("proof answered by ") + proto::type_name(*r2));
        } else {
          p.registered = true;
          p.pending = ok->pending;
          p.registered_at = Clock::now();
          ++registered_;
          update(p);
        }
        if (then) then(ok);
      });
    });
  }

  /// Sends a Dereg for the peer's own name; `then(ok)` on the Ack.
  void dereg_peer(Peer& p, std::function<void(bool)> then) {
    p.ep.request(proto::Dereg{p.ep.next_id(), p.name}, p.server, [this, &p, then = std::move(then)](const proto::Message* r) {
      bool ok = r != nullptr && std::holds_alternative<proto::Ack>(*r);
      if (!ok) {
        ++failed_;
        last_failure_ = p.name + ": dereg not acked";
      } else {
        if (p.registered) --registered_;
        p.registered = false;
        update(p);
      }
      then(ok);
    });
  }

  /// Runs the loop until `done()` or the deadline; false on the deadline.
  bool run_until(const std::function<bool()>& done, Clock::time_point deadline) {
    while (!done()) {
      if (Clock::now() >= deadline) return false;
      if (g_interrupted != 0) throw Failure("interrupted");
      run_for(5ms);
    }
    return true;
  }
  /// Runs the loop for `d` (peers keep answering the server meanwhile).
  void run_for(Clock::duration d) {
    if (io_.stopped()) io_.restart();  // run_for() stops the loop when it had nothing to do
    if (peers_.empty()) std::this_thread::sleep_for(d);
    else io_.run_for(d);
  }

  /// From now on a peer counts as converged when it is registered and its table holds exactly
  /// `rows` rows, `online` of them online.
  void expect(std::size_t rows, std::size_t online) {
    want_rows_ = rows;
    want_online_ = online;
    converged_ = 0;
    for (auto& p : peers_) {
      p->converged = false;
      update(*p);
    }
  }
  std::size_t converged() const { return converged_; }
  Clock::time_point last_converged_at() const { return last_converged_at_; }
  std::size_t registered() const { return registered_; }
  std::size_t failed() const { return failed_; }
  const std::string& last_failure() const { return last_failure_; }
  std::size_t mismatches() const { return mismatches_; }
  /// Server requests a peer received naming another peer (never answered, as by peer::Client).
  std::size_t not_for_me() const { return not_for_me_; }
  /// Tables and deliveries a peer received from a server it is not registered with (dropped
  /// unanswered, as peer::Client takes them only from its own server).
  std::size_t foreign() const { return foreign_; }

  /// Called after a peer applied a Table (the changes-between-servers scenario times rows by it).
  std::function<void(Peer&)> on_table;

  /// Sum over the peers of an Endpoint counter.
  std::uint64_t sum(std::uint64_t chat::transport::Counters::*field) const {
    std::uint64_t n = 0;
    for (const auto& p : peers_) n += p->ep.counters().*field;
    return n;
  }

  // Channel rounds: the id the sender used; relays counted for it only.
  std::uint64_t round = 0;
  std::size_t relays = 0;
  Clock::time_point last_relay_at, last_relay_acked_at;
  std::int64_t last_relay_arrival_ns = -1;  // latest kernel arrival of a Relay this round
  std::size_t relays_unstamped = 0;

  // Relays: whether receivers check each signature (open_channel) before the Ack, as real
  // clients do; how many were checked, how long that took, how many did not check.
  bool verify_relays = true;
  std::size_t verified = 0;
  Clock::duration verify_time{};
  std::size_t relays_unverified = 0;

  // Deliveries of saved messages.
  std::unordered_set<std::string> stored_seen;
  std::size_t stored_unopened = 0;  // items that did not open as the message that was saved
  Clock::duration stored_open_time{};
  std::size_t stored_dups = 0;
  std::size_t stored_datagrams = 0;
  std::uint64_t stored_sample_bytes = 0;  // of the first kSizeSample Stored datagrams
  static constexpr std::size_t kSizeSample = 32;
  Clock::time_point last_stored_acked_at;

 private:
  void update(Peer& p) {
    bool now = p.registered && p.view.count == want_rows_ && p.view.online == want_online_;
    if (now == p.converged) return;
    p.converged = now;
    if (now) {
      ++converged_;
      last_converged_at_ = Clock::now();
    } else {
      --converged_;
    }
  }

  void on_request(Peer& p, const proto::Message& m, const udp::endpoint& from) {
    // As peer::Client::for_me: a server request for another client's name is not answered.
    const std::string* recipient = std::visit(
        [](const auto& x) -> const std::string* {
          if constexpr (requires { x.recipient; }) return &x.recipient;
          else return nullptr;
        },
        m);
    if (recipient != nullptr && *recipient != p.name) {
      ++not_for_me_;
      return p.ep.forget(from, proto::request_id(m));
    }
    if ((std::holds_alternative<proto::Table>(m) || std::holds_alternative<proto::Stored>(m)) && from != p.server) {
      ++foreign_;
      return p.ep.forget(from, proto::request_id(m));
    }
    if (const auto* t = std::get_if<proto::Table>(&m)) {
      chat::peer::Applied a = p.view.apply(*t);
      if (p.check) {
        chat::peer::Applied b = p.check->apply(*t);
        if (b.changed != a.changed || b.announce != a.announce || b.epoch != a.epoch || b.have != a.have ||
            b.have != p.view.version || p.check->rows().size() != p.view.count + p.view.unknown)
          ++mismatches_;
      }
      p.ep.reply(from, proto::Ack{t->id, a.epoch, a.have});
      update(p);
      if (on_table) on_table(p);
    } else if (const auto* r = std::get_if<proto::Relay>(&m)) {
      Clock::time_point got = Clock::now();
      std::int64_t arrived = last_arrival_ns(p.fd);  // before the Ack: a later read would replace it
      if (verify_relays) {
        // As peer::Client::on_relay: the signature checked with the sender's key, then the Ack.
        auto t0 = Clock::now();
        const proto::Key* key = key_of(r->from);
        std::optional<ident::Opened> opened;
        if (key != nullptr) opened = ident::open_channel(*key, r->from, r->mid, r->body);
        verify_time += Clock::now() - t0;
        ++verified;
        if (!opened || opened->text != kText) ++relays_unverified;
      }
      p.ep.reply(from, proto::Ack{r->id});
      if (r->mid == round && p.relay_round != round) {
        p.relay_round = round;
        ++relays;
        if (arrived < 0) ++relays_unstamped;
        last_relay_arrival_ns = std::max(last_relay_arrival_ns, arrived);
        last_relay_at = got;
        last_relay_acked_at = Clock::now();
      }
    } else if (const auto* s = std::get_if<proto::Stored>(&m)) {
      for (const auto& item : s->items) {
        if (!stored_seen.insert(std::string(item.from).append(1, '\n').append(std::to_string(item.mid))).second)
          ++stored_dups;
        // As peer::Client does with a delivery: opened with the pair of the key it was saved under.
        auto t0 = Clock::now();
        const proto::Key* key = key_of(item.from);
        std::optional<ident::Opened> opened;
        if (key != nullptr && *key == item.key)
          opened = item.channel ? ident::open_channel(item.key, item.from, item.mid, item.body)
                                : ident::open_direct(pair(p, item.key), item.body, p.name);
        stored_open_time += Clock::now() - t0;
        if (!opened || opened->mid != item.mid || opened->text != kText) ++stored_unopened;
      }
      // Sizes from a sample only: encoding every datagram again would slow the measured drain.
      if (stored_datagrams++ < kSizeSample) stored_sample_bytes += proto::encode(m).size();
      p.ep.reply(from, proto::Ack{s->id});
      last_stored_acked_at = Clock::now();
    } else {
      // Probe, or anything else the server asks: a plain Ack, as SimPeer does.
      p.ep.reply(from, proto::Ack{proto::request_id(m)});
    }
  }

  // Keep-alives, as real clients send them (every 15 s, the server's default interval, which a
  // registration without one gets): they resume a table update or a delivery that stalled
  // (SPEC §10). One timer for all peers: each second, the peers of one fifteenth of the indexes.
  static constexpr int kKeepaliveSlots = 15;
  void tick() {
    for (std::size_t i = static_cast<std::size_t>(slot_); i < peers_.size(); i += kKeepaliveSlots) {
      Peer& p = *peers_[i];
      if (p.registered) p.ep.request(proto::KeepAlive{p.ep.next_id(), p.name}, p.server, [](const proto::Message*) {});
    }
    slot_ = (slot_ + 1) % kKeepaliveSlots;
    keepalive_timer_.expires_after(1s);
    keepalive_timer_.async_wait([this](const chat::error_code& ec) {
      if (!ec) tick();
    });
  }

  net::io_context& io_;
  udp::endpoint server_;
  net::steady_timer keepalive_timer_;
  int slot_ = 0;
  std::vector<std::unique_ptr<Peer>> peers_;
  std::map<std::pair<std::size_t, proto::Key>, ident::Pair> pairs_;
  std::size_t want_rows_ = SIZE_MAX;
  std::size_t want_online_ = SIZE_MAX;
  std::size_t converged_ = 0;
  std::size_t registered_ = 0;
  std::size_t failed_ = 0;
  std::size_t mismatches_ = 0;
  std::size_t not_for_me_ = 0;
  std::size_t foreign_ = 0;
  std::string last_failure_;
  Clock::time_point last_converged_at_;
};

/// Registers peers [first, sim.size()) at once and runs until all sim.size() peers hold the
/// full table (every row online). Returns the time from the first Register to the last convergence.
Clock::duration register_all(Sim& sim, std::size_t first, Clock::time_point deadline, const std::string& what) {
  std::size_t n = sim.size();
  sim.expect(n, n);
  auto start = Clock::now();
  for (std::size_t i = first; i < n; ++i) sim.register_peer(sim.peer(i));
  const bool trace = std::getenv("CHATBENCH_TRACE") != nullptr;
  auto next_trace = start;
  bool ok = sim.run_until(
      [&] {
        if (trace && Clock::now() >= next_trace) {
          next_trace += 100ms;
          note(what + ": +" + std::to_string(static_cast<long>(ms(Clock::now() - start))) + " ms: " +
               std::to_string(sim.registered()) + " registered, " + std::to_string(sim.converged()) + " converged, " +
               std::to_string(sim.sum(&chat::transport::Counters::received)) + " datagrams in");
        }
        return sim.converged() == n || sim.failed() > 0;
      },
      deadline);
  if (sim.failed() > 0) throw Failure(what + ": " + sim.last_failure());
  if (!ok)
    throw Failure(what + ": timed out; " + std::to_string(sim.registered()) + "/" + std::to_string(n) +
                  " registered, " + std::to_string(sim.converged()) + "/" + std::to_string(n) + " hold the full table");
  if (sim.mismatches() > 0)
    throw Failure(what + ": the compact table view disagreed with peer::LocalTable " +
                  std::to_string(sim.mismatches()) + " times");
  if (sim.not_for_me() > 0)
    throw Failure(what + ": the server sent " + std::to_string(sim.not_for_me()) +
                  " requests to a peer that named another peer");
  if (sim.foreign() > 0)
    throw Failure(what + ": " + std::to_string(sim.foreign()) +
                  " tables or deliveries came from a server the peer is not registered with");
  // The rows carry the keys the peers registered with (checked where a real LocalTable is kept).
  for (std::size_t i = 0; i < std::min(n, kChecked); ++i)
    if (const auto& check = sim.peer(i).check)
      for (const auto& [name, e] : check->rows())
        if (const proto::Key* key = sim.key_of(name); key == nullptr || *key != e.key)
          throw Failure(what + ": " + sim.peer(i).name + "'s table gives " + name + " a key it did not register");
  return sim.last_converged_at() - start;
}

/// Saves `total` messages for the recipients `to` from the senders (each keeping kSaveWindow in
/// flight); returns the latency of each save (send to Ack) and sets `elapsed` to first-send..last-Ack.
std::vector<double> save_all(Sim& sim, const std::vector<Peer*>& senders, const std::vector<Peer*>& to,
                             std::size_t total, Clock::time_point deadline, Clock::duration& elapsed) {
  std::size_t issued = 0, acked = 0, failed = 0;
  std::string why;
  std::vector<double> latency;
  latency.reserve(total);
  Clock::time_point last_ack;
  std::function<void(Peer&)> next = [&](Peer& s) {
    if (issued >= total) return;
    std::uint64_t mid = ++issued;
    const Peer& dest = *to[mid % to.size()];
    auto sent = Clock::now();
    // Sealed for the recipient as peer::Client::send_known does (the pair computed once per peer).
    std::string body = ident::seal_direct(sim.pair(s, dest.id.public_key()), mid, now_ms(), dest.name, kText);
    s.ep.request(proto::Save{s.ep.next_id(), s.name, dest.name, mid, false, std::move(body)}, s.server,
                 [&, sent](const proto::Message* r) {
                   if (r != nullptr && std::holds_alternative<proto::Ack>(*r)) {
                     ++acked;
                     last_ack = Clock::now();
                     latency.push_back(ms(last_ack - sent));
                   } else {
                     ++failed;
                     why = r == nullptr                                 ? "a save was never acked"
                           : std::holds_alternative<proto::Refused>(*r) ? "a save was refused: " +
                                                                              std::get<proto::Refused>(*r).reason
                                                                        : std::string("a save got ") +
                                                                              proto::type_name(*r);
                   }
                   next(s);
                 });
  };
  auto start = Clock::now();
  for (std::size_t w = 0; w < kSaveWindow; ++w)
    for (Peer* s : senders) next(*s);
  bool ok = sim.run_until([&] { return acked + failed == total; }, deadline);
  elapsed = last_ack - start;
  if (failed > 0) throw Failure(std::to_string(failed) + " of " + std::to_string(total) + " saves failed; " + why);
  if (!ok)
    throw Failure("timed out: " + std::to_string(acked) + "/" + std::to_string(total) + " saves acked");
  return latency;
}


// ---------------------------------------------------------------- scenarios

using Counters = chat::transport::Counters;

std::vector<std::size_t> sizes_for(const Options& o, std::vector<std::size_t> full, std::vector<std::size_t> quick) {
  if (!o.sizes.empty()) return o.sizes;
  return o.quick ? quick : full;
}

udp::endpoint loopback0() { return {net::ip::make_address_v4("127.0.0.1"), 0}; }

/// Wire bytes of one table row as the server encodes it (protocol::entry_size: name, ip4, port,
/// online flag and the 32-byte key).
std::size_t row_bytes(const Peer& p) {
  return proto::entry_size(proto::Entry{p.name, "127.0.0.1", p.ep.local_endpoint().port(), true, p.id.public_key()});
}

/// What went wrong under load, if anything: kernel drops on full receive buffers (system-wide,
/// since `udp0`) and live clients the server took for offline.
void emit_health(std::string_view bench, std::size_t n, const ServerProcess* srv, std::uint64_t udp0) {
  emit(bench, n, "udp_rcvbuf_drops", static_cast<double>(udp_rcvbuf_errors() - udp0), "count", 0);
  if (srv != nullptr) emit(bench, n, "server_marked_gone", static_cast<double>(srv->marked_gone()), "count", 0);
}

/// Runs the peers until the server is idle (under 5 ms of CPU in 100 ms), at most `limit`.
void settle(Sim& sim, const ServerProcess& srv, Clock::duration limit) {
  auto deadline = Clock::now() + limit;
  double before = srv.cpu_seconds();
  while (Clock::now() < deadline) {
    sim.run_for(100ms);
    double now = srv.cpu_seconds();
    if (now - before < 0.005) return;
    before = now;
  }
}

/// The --ack-timeout the server gets: from --server-arg if given there, else from `scenario`.
long ack_timeout_ms(const Options& o, const std::vector<std::string>& scenario) {
  for (const auto* args : {&o.server_args, &scenario})
    for (std::size_t i = 0; i + 1 < args->size(); ++i)
      if ((*args)[i] == "--ack-timeout") return std::stol((*args)[i + 1]);
  return 500;  // the product's default
}

/// Raw ping-pong of `req` answered by `rep` between two blocking plain sockets: the round trip
/// of one exchange with no event loop, codec or crypto (the baselines of bench_direct).
class PingPong {
 public:
  PingPong(std::string req, std::string rep) : req_(std::move(req)), rep_(std::move(rep)) {}
  double once() {
    auto t = Clock::now();
    s1_.send_to(req_, s2_);
    s2_.receive();
    s2_.send_to(rep_, s1_);
    s1_.receive();
    return us(Clock::now() - t);
  }

 private:
  std::string req_, rep_;
  PlainSocket s1_, s2_;
};

// direct: sequential Direct requests between two Endpoints, plain (answered by an Ack) and sealed
// (answered by a sealed Receipt, as two real clients), alternating; baseline: raw UDP ping-pong.
bool bench_direct(const Options& o) {
  const std::size_t n = sizes_for(o, {10000}, {1000}).front();
  constexpr std::size_t warm = 200;  // of each kind, not counted: first-touch costs (page faults, caches)
  try {
    auto deadline = Clock::now() + 60s;
    net::io_context io(1);
    // p0 sends; p1 answers the plain Directs with an Ack, as a v1 client did, and the sealed
    // ones as peer::Client::on_direct does: open_direct, check the mid, seal_receipt.
    const std::string a_name = "p0", b_name = "p1";
    const ident::Identity a_id = peer_identity(0), b_id = peer_identity(1);
    const ident::Pair a_pair(a_id, b_id.public_key());  // precomputed once per peer, as the client does
    const ident::Pair b_pair(b_id, a_id.public_key());
    chat::transport::Socket a(io, loopback0(), kPeerPolicy);
    chat::transport::Socket plain(io, loopback0(), kPeerPolicy);
    chat::transport::Socket sealed(io, loopback0(), kPeerPolicy);
    std::size_t unopened = 0;
    plain.start([&plain](const proto::Message& m, const udp::endpoint& from) {
      plain.reply(from, proto::Ack{proto::request_id(m)});
    });
    sealed.start([&](const proto::Message& m, const udp::endpoint& from) {
      const auto* d = std::get_if<proto::Direct>(&m);
      std::optional<ident::Opened> got;
      if (d != nullptr && d->from == a_name) got = ident::open_direct(b_pair, d->body, b_name);
      if (!got || got->mid != d->id || got->text != kText) {
        ++unopened;
        return sealed.forget(from, proto::request_id(m));
      }
      sealed.reply(from, proto::Receipt{d->id, ident::seal_receipt(b_pair, d->id, d->from)});
    });
    a.start([](const proto::Message&, const udp::endpoint&) {});
    const udp::endpoint to_plain = plain.local_endpoint(), to_sealed = sealed.local_endpoint();
    std::vector<double> rtt, rtt_sealed;
    rtt.reserve(n);
    rtt_sealed.reserve(n);
    std::size_t done = 0, lost = 0, bad_receipts = 0;
    const std::size_t total = 2 * (warm + n);
    std::function<void()> next = [&] {
      if (done >= total) return;
      const bool counted = done >= 2 * warm;
      const std::uint64_t id = a.next_id();
      auto sent = Clock::now();
      if (done % 2 == 0) {
        a.request(proto::Direct{id, a_name, kText}, to_plain, [&, sent, counted](const proto::Message* r) {
          auto now = Clock::now();
          if (r == nullptr || !std::holds_alternative<proto::Ack>(*r)) ++lost;
          else if (counted) rtt.push_back(us(now - sent));
          ++done;
          next();
        });
        return;
      }
      // The sealed round trip includes the sender's crypto: seal before, check the receipt after.
      std::string body = ident::seal_direct(a_pair, id, now_ms(), b_name, kText);
      a.request(proto::Direct{id, a_name, std::move(body)}, to_sealed, [&, sent, counted, id](const proto::Message* r) {
        const auto* receipt = r != nullptr ? std::get_if<proto::Receipt>(r) : nullptr;
        bool ok = receipt != nullptr && ident::check_receipt(a_pair, receipt->body, id, a_name);
        auto now = Clock::now();
        if (r == nullptr) ++lost;
        else if (!ok) ++bad_receipts;
        else if (counted) rtt_sealed.push_back(us(now - sent));
        ++done;
        next();
      });
    };
    next();
    while (done < total && Clock::now() < deadline) io.run_for(20ms);
    if (done < total) throw Failure("timed out after " + std::to_string(done) + " round trips");
    if (lost > 0) throw Failure(std::to_string(lost) + " requests were never answered");
    if (unopened > 0) throw Failure(std::to_string(unopened) + " sealed Directs did not open");
    if (bad_receipts > 0) throw Failure(std::to_string(bad_receipts) + " receipts did not check");
    std::uint64_t retransmits = a.counters().retransmits;
    const double p50 = percentile(rtt, 50), p99 = percentile(rtt, 99);
    const double s50 = percentile(rtt_sealed, 50), s99 = percentile(rtt_sealed, 99);
    emit("direct", n, "rtt_p50", p50, "us");
    emit("direct", n, "rtt_p99", p99, "us");
    emit("direct", n, "sealed_rtt_p50", s50, "us");
    emit("direct", n, "sealed_rtt_p99", s99, "us");
    emit("direct", n, "sealed_vs_plain_p50", s50 / p50, "x", 2);
    emit("direct", n, "sealed_vs_plain_p99", s99 / p99, "x", 2);
    emit("direct", n, "retransmits", static_cast<double>(retransmits), "count", 0);

    // The crypto of one sealed exchange alone (seal, open, seal the receipt, check it), no network.
    const std::size_t reps = o.quick ? 2000 : 20000;
    std::size_t crypto_ok = 0;
    auto c0 = Clock::now();
    for (std::size_t i = 1; i <= reps; ++i) {
      std::string body = ident::seal_direct(a_pair, i, now_ms(), b_name, kText);
      auto got = ident::open_direct(b_pair, body, b_name);
      std::string receipt = ident::seal_receipt(b_pair, i, a_name);
      if (got && got->mid == i && ident::check_receipt(a_pair, receipt, i, a_name)) ++crypto_ok;
    }
    double crypto_us = us(Clock::now() - c0) / static_cast<double>(reps);
    if (crypto_ok != reps) throw Failure("the crypto-only loop failed a check");
    emit("direct", n, "crypto_us_per_exchange", crypto_us, "us", 2);

    // Sizes of what went on the wire.
    const std::string plain_req = proto::encode(proto::Direct{0x1234567890abcdefull, a_name, kText});
    const std::string plain_rep = proto::encode(proto::Ack{0x1234567890abcdefull});
    const std::string sealed_req = proto::encode(proto::Direct{
        0x1234567890abcdefull, a_name, ident::seal_direct(a_pair, 0x1234567890abcdefull, now_ms(), b_name, kText)});
    const std::string sealed_rep = proto::encode(
        proto::Receipt{0x1234567890abcdefull, ident::seal_receipt(b_pair, 0x1234567890abcdefull, a_name)});
    emit("direct", n, "plain_direct_bytes", static_cast<double>(plain_req.size()), "B", 0);
    emit("direct", n, "plain_ack_bytes", static_cast<double>(plain_rep.size()), "B", 0);
    emit("direct", n, "sealed_direct_bytes", static_cast<double>(sealed_req.size()), "B", 0);
    emit("direct", n, "sealed_receipt_bytes", static_cast<double>(sealed_rep.size()), "B", 0);

    // Baselines: the same datagrams (plain, and of the sealed sizes), blocking sockets, no event
    // loop, no codec, no crypto; alternating too.
    PingPong base_plain(plain_req, plain_rep), base_sealed(sealed_req, sealed_rep);
    std::vector<double> base, base_s;
    base.reserve(n);
    base_s.reserve(n);
    for (std::size_t i = 0; i < warm + n; ++i) {
      double t1 = base_plain.once();
      double t2 = base_sealed.once();
      if (i >= warm) {
        base.push_back(t1);
        base_s.push_back(t2);
      }
    }
    emit("direct", n, "baseline_rtt_p50", percentile(base, 50), "us");
    emit("direct", n, "baseline_rtt_p99", percentile(base, 99), "us");
    emit("direct", n, "baseline_sealed_size_rtt_p50", percentile(base_s, 50), "us");
    emit("direct", n, "baseline_sealed_size_rtt_p99", percentile(base_s, 99), "us");
    return true;
  } catch (const std::exception& e) {
    emit_error("direct", n, e.what());
    return false;
  }
}

// register: N peers register at once; time until all hold the full table, and the bytes it took.
bool bench_register(const Options& o) {
  const auto sizes = sizes_for(o, {1000, 3000, 10000}, {200, 500, 1000});
  raise_fd_limit(*std::max_element(sizes.begin(), sizes.end()) + 1600);
  bool all_ok = true;
  std::vector<std::pair<std::size_t, double>> per_reg;
  for (std::size_t n : sizes) {
    std::optional<ServerProcess> srv;
    net::io_context io(1);
    std::optional<Sim> sim;
    std::uint64_t udp0 = 0;
    double cpu0 = 0, scpu0 = 0;
    try {
      auto deadline = Clock::now() + std::chrono::seconds(30 + n / 50);
      udp0 = udp_rcvbuf_errors();
      srv.emplace(o, kMassArgs);
      emit("register", n, "server_ack_timeout_ms", static_cast<double>(ack_timeout_ms(o, kMassArgs)), "ms", 0);
      sim.emplace(io, srv->endpoint());
      for (std::size_t i = 0; i < n; ++i) sim->add();
      cpu0 = self_cpu_seconds();
      scpu0 = srv->cpu_seconds();
      Clock::duration t = register_all(*sim, 0, deadline, "registering " + std::to_string(n));
      double server_cpu = srv->cpu_seconds() - scpu0;
      double bench_cpu = self_cpu_seconds() - cpu0;
      std::uint64_t total = sim->sum(&Counters::bytes_received);
      std::uint64_t datagrams = sim->sum(&Counters::received);
      std::uint64_t resends_seen = sim->sum(&Counters::duplicates);
      std::uint64_t peer_retransmits = sim->sum(&Counters::retransmits);
      std::size_t one_table = 0;
      for (std::size_t i = 0; i < n; ++i) one_table += row_bytes(sim->peer(i));
      double per = static_cast<double>(total) / static_cast<double>(n);
      per_reg.emplace_back(n, per);
      emit("register", n, "converge_ms", ms(t), "ms");
      emit("register", n, "bytes_total", static_cast<double>(total), "B", 0);
      emit("register", n, "datagrams_total", static_cast<double>(datagrams), "count", 0);
      emit("register", n, "bytes_per_registration", per, "B", 0);
      emit("register", n, "server_cpu_s", server_cpu, "s", 2);
      emit("register", n, "bench_cpu_s", bench_cpu, "s", 2);
      emit("register", n, "server_resends_seen", static_cast<double>(resends_seen), "count", 0);
      emit("register", n, "peer_retransmits", static_cast<double>(peer_retransmits), "count", 0);
      emit_health("register", n, &*srv, udp0);
      emit("register", n, "baseline_bytes_total", static_cast<double>(one_table) * static_cast<double>(n), "B", 0);
      emit("register", n, "baseline_bytes_per_registration", static_cast<double>(one_table), "B", 0);

      // One more registration once all hold the table: what does one newcomer cost?
      std::uint64_t before = sim->sum(&Counters::bytes_received);
      sim->add();
      Clock::duration t1 = register_all(*sim, n, Clock::now() + std::chrono::seconds(30 + n / 200), "one more registration");
      emit("register", n, "one_more_converge_ms", ms(t1), "ms");
      emit("register", n, "one_more_bytes", static_cast<double>(sim->sum(&Counters::bytes_received) - before), "B", 0);
      emit("register", n, "baseline_one_more_bytes", static_cast<double>(one_table + row_bytes(sim->peer(n)) * (n + 1)),
           "B", 0);
      sim.reset();
      srv->stop();
      // What the machine charges for the datagrams the server sent, measured now: each at the
      // mean size the peers received, to as many sockets (up to 1,000), at most 200,000 of them.
      std::size_t mean = datagrams > 0 ? static_cast<std::size_t>(total / datagrams) : 0;
      RawCost raw = raw_send_cost(std::min<std::size_t>(n, 1000), std::min<std::uint64_t>(datagrams, 200000), mean);
      emit("register", n, "baseline_sendto_cpu_us", raw.sendto_cpu_us, "us", 3);
      emit("register", n, "baseline_datagram_wall_us", raw.datagram_wall_us, "us", 3);
    } catch (const std::exception& e) {
      if (sim) {
        emit("register", n, "registered_peers", static_cast<double>(sim->registered()), "count", 0);
        emit("register", n, "converged_peers", static_cast<double>(sim->converged()), "count", 0);
        emit("register", n, "bytes_total", static_cast<double>(sim->sum(&Counters::bytes_received)), "B", 0);
        emit("register", n, "server_resends_seen", static_cast<double>(sim->sum(&Counters::duplicates)), "count", 0);
      }
      if (srv) {
        emit("register", n, "server_cpu_s", srv->cpu_seconds() - scpu0, "s", 2);
        emit("register", n, "bench_cpu_s", self_cpu_seconds() - cpu0, "s", 2);
        emit_health("register", n, &*srv, udp0);
      }
      emit_error("register", n, e.what());
      all_ok = false;
    }
  }
  if (per_reg.size() >= 2) {
    auto [n0, b0] = per_reg.front();
    auto [n1, b1] = per_reg.back();
    emit("register", n1, "bytes_per_registration_ratio_" + std::to_string(n1) + "_vs_" + std::to_string(n0), b1 / b0,
         "x", 2);
    emit("register", n1, "baseline_bytes_per_registration_ratio_linear", static_cast<double>(n1) / static_cast<double>(n0),
         "x", 2);
  }
  return all_ok;
}

// fanout: one signed Channel message to N online peers, whose copies the receivers verify (as
// real clients do) in every other round and only ACK in the others; baseline: N raw datagrams
// from one socket.
bool bench_fanout(const Options& o) {
  const auto sizes = sizes_for(o, {10, 100, 1000}, {10, 100});
  raise_fd_limit(2 * *std::max_element(sizes.begin(), sizes.end()) + 512);
  bool all_ok = true;
  // The rounds of one kind: receivers verifying each copy (kind 0), or only ACKing (kind 1).
  struct Rounds {
    std::vector<double> last_relay, last_arrival, all_acked, sender_ack;
    double server_cpu = 0, bench_cpu = 0;
  };
  for (std::size_t n : sizes) {
    std::optional<ServerProcess> srv;
    net::io_context io(1);
    std::optional<Sim> sim;
    try {
      auto deadline = Clock::now() + 60s;
      std::uint64_t udp0 = udp_rcvbuf_errors();
      srv.emplace(o);
      sim.emplace(io, srv->endpoint());
      for (std::size_t i = 0; i <= n; ++i) sim->add();  // p0 sends, p1..pN receive
      register_all(*sim, 0, deadline, "registering " + std::to_string(n + 1));
      const std::size_t rounds = o.rounds > 0 ? o.rounds : o.quick ? 10 : (n >= 1000 ? 20 : 50);
      Peer& sender = sim->peer(0);
      std::array<Rounds, 2> kind{};
      Clock::duration sign_time{};
      sim->find_sockets();
      settle(*sim, *srv, 10s);
      sim->verified = 0;
      sim->verify_time = {};
      for (std::size_t r = 0; r < 2 * rounds; ++r) {
        Rounds& k = kind[r % 2];
        sim->verify_relays = r % 2 == 0;
        double scpu0 = srv->cpu_seconds(), bcpu0 = self_cpu_seconds();
        std::uint64_t id = sender.ep.next_id();
        sim->round = id;
        sim->relays = 0;
        sim->last_relay_arrival_ns = -1;
        bool answered = false, ok = false;
        Clock::time_point ack_at;
        std::int64_t start_wall = wall_ns();
        auto start = Clock::now();
        // Signed once per message, as peer::Client::send_channel does; part of the timed round.
        std::string body = ident::sign_channel(sender.id, sender.name, id, now_ms(), kText);
        sign_time += Clock::now() - start;
        sender.ep.request(proto::Channel{id, sender.name, std::move(body)}, srv->endpoint(),
                          [&](const proto::Message* rep) {
                            ack_at = Clock::now();
                            answered = true;
                            ok = rep != nullptr && std::holds_alternative<proto::Ack>(*rep);
                          });
        if (!sim->run_until([&] { return answered && sim->relays == n; }, deadline))
          throw Failure("round " + std::to_string(r) + " timed out: " + std::to_string(sim->relays) + "/" +
                        std::to_string(n) + " relays, sender " + (answered ? "acked" : "not acked"));
        if (!ok) throw Failure("the channel message was not acked");
        k.last_relay.push_back(ms(sim->last_relay_at - start));
        k.last_arrival.push_back(static_cast<double>(sim->last_relay_arrival_ns - start_wall) / 1e6);
        k.all_acked.push_back(ms(sim->last_relay_acked_at - start));
        k.sender_ack.push_back(ms(ack_at - start));
        sim->run_for(10ms);  // this round's ACKs reach the server (and count in its CPU) first
        k.server_cpu += srv->cpu_seconds() - scpu0;
        k.bench_cpu += self_cpu_seconds() - bcpu0;
      }
      settle(*sim, *srv, 10s);  // the server has taken every relay ACK
      if (sim->converged() != n + 1)
        throw Failure("only " + std::to_string(sim->converged()) + " peers still see everyone online after the rounds");
      if (sim->relays_unstamped > 0)
        throw Failure(std::to_string(sim->relays_unstamped) + " relays had no kernel receive timestamp");
      if (sim->relays_unverified > 0)
        throw Failure(std::to_string(sim->relays_unverified) + " relays did not verify");
      if (sim->verified < n * rounds)
        throw Failure("only " + std::to_string(sim->verified) + " relays were verified, not " +
                      std::to_string(n * rounds));
      // Arrival: in the last peer's socket (kernel timestamp), what a client on its own host sees.
      // Handled: when the bench, one thread for all N peers, got to it (includes its queueing,
      // and with verification the N-1 signature checks of the copies before it).
      for (std::size_t v = 0; v < 2; ++v) {
        Rounds& k = kind[v];
        const std::string pre = v == 0 ? "" : "noverify_";
        const double per = static_cast<double>(rounds);
        emit("fanout", n, pre + "last_relay_arrival_ms", median(k.last_arrival), "ms", 3);
        emit("fanout", n, pre + "last_relay_arrival_max_ms", maximum(k.last_arrival), "ms", 3);
        emit("fanout", n, pre + "last_relay_ms", median(k.last_relay), "ms", 3);
        emit("fanout", n, pre + "last_relay_max_ms", maximum(k.last_relay), "ms", 3);
        emit("fanout", n, pre + "all_relay_acks_sent_ms", median(k.all_acked), "ms", 3);
        emit("fanout", n, pre + "sender_ack_ms", median(k.sender_ack), "ms", 3);
        emit("fanout", n, pre + "bench_cpu_per_message_ms", k.bench_cpu / per * 1000, "ms", 3);
      }
      // The server does the same for both kinds; its CPU time comes in 10 ms ticks (/proc), too
      // coarse to split between rounds a few ms long, so it is given over all of them.
      emit("fanout", n, "server_cpu_per_message_ms",
           (kind[0].server_cpu + kind[1].server_cpu) / static_cast<double>(2 * rounds) * 1000, "ms", 3);
      emit("fanout", n, "sign_us_per_message", us(sign_time) / static_cast<double>(2 * rounds), "us", 2);
      emit("fanout", n, "verify_us_per_copy", us(sim->verify_time) / static_cast<double>(sim->verified), "us", 2);
      emit("fanout", n, "server_resends_seen", static_cast<double>(sim->sum(&Counters::duplicates)), "count", 0);
      emit_health("fanout", n, &*srv, udp0);
      sim.reset();
      srv->stop();

      // Baseline: the same N datagrams, one plain socket to N plain sockets, then N receives.
      PlainSocket from;
      std::vector<std::unique_ptr<PlainSocket>> to;
      for (std::size_t i = 0; i < n; ++i) to.push_back(std::make_unique<PlainSocket>());
      const ident::Identity p0 = peer_identity(0);
      const std::string relay = proto::encode(proto::Relay{
          0x1234567890abcdefull, "p1", "p0", 0x1234567890abcdefull,
          ident::sign_channel(p0, "p0", 0x1234567890abcdefull, now_ms(), kText)});
      std::vector<double> base;
      double send_cpu = 0;
      for (std::size_t r = 0; r < rounds; ++r) {
        auto start = Clock::now();
        double c0 = thread_cpu_seconds();
        for (auto& s : to) from.send_to(relay, *s);
        send_cpu += thread_cpu_seconds() - c0;
        for (auto& s : to) s->receive();
        base.push_back(ms(Clock::now() - start));
      }
      emit("fanout", n, "baseline_sendto_cpu_us", send_cpu * 1e6 / static_cast<double>(rounds * n), "us", 3);
      emit("fanout", n, "relay_bytes", static_cast<double>(relay.size()), "B", 0);
      emit("fanout", n, "baseline_last_recv_ms", median(base), "ms", 3);
      emit("fanout", n, "baseline_last_recv_max_ms", maximum(base), "ms", 3);
    } catch (const std::exception& e) {
      emit_error("fanout", n, e.what());
      all_ok = false;
    }
  }
  return all_ok;
}

/// Registers every peer, then has `leaving` Dereg; returns once the others see them offline.
void register_then_leave(Sim& sim, const std::vector<Peer*>& leaving, Clock::time_point deadline) {
  register_all(sim, 0, deadline, "registering " + std::to_string(sim.size()));
  std::size_t left = 0;
  for (Peer* p : leaving) sim.dereg_peer(*p, [&left](bool ok) { left += ok ? 1 : 0; });
  std::size_t stay = sim.size() - leaving.size();
  sim.expect(sim.size(), stay);
  if (!sim.run_until([&] { return (left == leaving.size() && sim.converged() == stay) || sim.failed() > 0; }, deadline))
    throw Failure("timed out waiting for " + std::to_string(leaving.size()) + " peers to leave");
  if (sim.failed() > 0) throw Failure(sim.last_failure());
}

// store: Save requests from 100 registered senders to offline recipients, counted on their Ack.
bool bench_store_once(const Options& o, std::size_t total);

bool bench_store(const Options& o) {
  bool all_ok = true;
  for (std::size_t total : sizes_for(o, {5000, 20000, 50000}, {2000}))
    if (!bench_store_once(o, total)) all_ok = false;
  return all_ok;
}

bool bench_store_once(const Options& o, std::size_t total) {
  constexpr std::size_t senders = 100, recipients = 10;
  try {
    auto deadline = Clock::now() + 60s;
    std::uint64_t udp0 = udp_rcvbuf_errors();
    ServerProcess srv(o);
    net::io_context io(1);
    Sim sim(io, srv.endpoint());
    std::vector<Peer*> from, to;
    for (std::size_t i = 0; i < senders; ++i) from.push_back(&sim.add());
    for (std::size_t i = 0; i < recipients; ++i) to.push_back(&sim.add());
    register_then_leave(sim, to, deadline);
    double scpu0 = srv.cpu_seconds();
    Clock::duration elapsed{};
    std::vector<double> latency = save_all(sim, from, to, total, deadline, elapsed);
    double server_cpu = srv.cpu_seconds() - scpu0;
    emit("store", total, "durable_saves_per_s", static_cast<double>(total) / std::chrono::duration<double>(elapsed).count(),
         "1/s");
    emit("store", total, "save_latency_p50_ms", percentile(latency, 50), "ms", 3);
    emit("store", total, "save_latency_p99_ms", percentile(latency, 99), "ms", 3);
    emit("store", total, "server_cpu_s", server_cpu, "s", 2);
    emit("store", total, "in_flight", static_cast<double>(senders * kSaveWindow), "count", 0);
    emit_health("store", total, &srv, udp0);
    // Baselines on the same filesystem, in the same run (as bench_store measures them).
    const std::size_t records = o.quick ? 300 : 2000;
    fs::path dir = srv.data_dir();
    // Labelled with this scenario's n (they were measured over `records` records), so that they
    // stay apart from bench_store's own lines of the same name.
    emit("store", total, "baseline_fdatasync_each_per_s", fdatasync_rate(dir, records, 1, 100), "1/s");
    emit("store", total, "baseline_fdatasync_per16_per_s", fdatasync_rate(dir, records, 16, 100), "1/s");
    srv.stop();
    return true;
  } catch (const std::exception& e) {
    emit_error("store", total, e.what());
    return false;
  }
}

// drain: a recipient with M saved messages registers; time until all are delivered and ACKed.
bool bench_drain_once(const Options& o, std::size_t m);

bool bench_drain(const Options& o) {
  bool all_ok = true;
  for (std::size_t m : sizes_for(o, {1000, 10000, 30000}, {1000}))
    if (!bench_drain_once(o, m)) all_ok = false;
  return all_ok;
}

bool bench_drain_once(const Options& o, std::size_t m) {
  constexpr std::size_t senders = 10;
  try {
    auto deadline = Clock::now() + 90s;
    std::uint64_t udp0 = udp_rcvbuf_errors();
    ServerProcess srv(o);
    net::io_context io(1);
    Sim sim(io, srv.endpoint());
    Peer& r = sim.add();
    std::vector<Peer*> from;
    for (std::size_t i = 0; i < senders; ++i) from.push_back(&sim.add());
    register_then_leave(sim, {&r}, deadline);
    Clock::duration fill{};
    save_all(sim, from, {&r}, m, deadline, fill);

    sim.stored_seen.clear();
    sim.stored_open_time = {};
    std::optional<std::uint64_t> pending;
    Clock::time_point regok_at;
    auto start = Clock::now();
    sim.register_peer(r, [&](const proto::RegOk* ok) {
      regok_at = Clock::now();
      pending = ok != nullptr ? ok->pending : 0;
    });
    bool ok = sim.run_until([&] { return sim.stored_seen.size() >= m || sim.failed() > 0; }, deadline);
    if (sim.failed() > 0) throw Failure(sim.last_failure());
    if (!ok)
      throw Failure("timed out: " + std::to_string(sim.stored_seen.size()) + "/" + std::to_string(m) + " delivered");
    Clock::duration drained = sim.last_stored_acked_at - start;
    if (pending != m) throw Failure("RegOk said " + std::to_string(pending.value_or(0)) + " pending, not " + std::to_string(m));
    if (sim.stored_unopened > 0)
      throw Failure(std::to_string(sim.stored_unopened) + " delivered items did not open as the message saved");
    std::size_t datagrams = sim.stored_datagrams;
    std::size_t mean_size = sim.stored_sample_bytes / std::min(std::max<std::size_t>(datagrams, 1), Sim::kSizeSample);
    emit("drain", m, "drain_ms", ms(drained), "ms");
    emit("drain", m, "regok_ms", ms(regok_at - start), "ms", 3);
    emit("drain", m, "stored_datagrams", static_cast<double>(datagrams), "count", 0);
    emit("drain", m, "items_per_datagram", static_cast<double>(m) / static_cast<double>(datagrams), "count", 2);
    emit("drain", m, "duplicate_items", static_cast<double>(sim.stored_dups), "count", 0);
    // The recipient opens every item (open_direct, as peer::Client does) before its Ack: included above.
    emit("drain", m, "open_ms_total", ms(sim.stored_open_time), "ms", 3);
    emit_health("drain", m, &srv, udp0);

    // Confirm the server holds nothing more: leave and come back, RegOk must say 0 pending.
    bool left = false;
    sim.dereg_peer(r, [&](bool) { left = true; });
    if (!sim.run_until([&] { return left; }, deadline) || sim.failed() > 0) throw Failure("dereg after the drain failed");
    std::optional<std::uint64_t> again;
    sim.register_peer(r, [&](const proto::RegOk* k) { again = k != nullptr ? k->pending : ~0ull; });
    if (!sim.run_until([&] { return again.has_value(); }, deadline) || sim.failed() > 0)
      throw Failure("re-register after the drain failed");
    if (*again != 0) throw Failure("after the drain the server still says " + std::to_string(*again) + " pending");
    if (sim.stored_seen.size() != m) throw Failure("messages delivered again after the drain");
    sim.run_for(20ms);

    // Baseline: the same number of datagrams of the same size, stop-and-wait over plain sockets.
    PlainSocket s1, s2;
    const std::string dgram(mean_size, 'x');
    const std::string ack = proto::encode(proto::Ack{0x1234567890abcdefull});
    auto t0 = Clock::now();
    for (std::size_t i = 0; i < datagrams; ++i) {
      s1.send_to(dgram, s2);
      s2.receive();
      s2.send_to(ack, s1);
      s1.receive();
    }
    emit("drain", m, "baseline_stop_and_wait_ms", ms(Clock::now() - t0), "ms", 3);
    srv.stop();
    return true;
  } catch (const std::exception& e) {
    emit_error("drain", m, e.what());
    return false;
  }
}

// memory: server RSS empty, then with N registered clients whose tables have converged.
bool bench_memory(const Options& o) {
  const auto sizes = sizes_for(o, {1000, 3000, 10000}, {1000});
  raise_fd_limit(*std::max_element(sizes.begin(), sizes.end()) + 512);
  std::size_t n = 0;
  try {
    ServerProcess srv(o, kMassArgs);
    net::io_context io(1);
    Sim sim(io, srv.endpoint());
    sim.run_for(200ms);
    long rss0 = srv.status_kib("VmRSS");
    emit("memory", 0, "rss_kib", static_cast<double>(rss0), "KiB", 0);
    double row = 0;
    for (std::size_t size : sizes) {
      n = size;
      std::size_t first = sim.size();
      while (sim.size() < n) sim.add();
      register_all(sim, first, Clock::now() + std::chrono::seconds(30 + n / 50), "registering " + std::to_string(n));
      settle(sim, srv, 30s);  // steady state: the last ACKs have reached the server
      // Quiet for a second, the server hands the heap the storm left free back (ServerOptions::on_quiet).
      sim.run_for(1500ms);
      if (std::getenv("CHATBENCH_TRACE") != nullptr) {
        auto r0 = sim.sum(&Counters::received), d0 = sim.sum(&Counters::duplicates);
        sim.run_for(3s);
        note("after settling, 3 s more: " + std::to_string(sim.sum(&Counters::received) - r0) + " datagrams in, " +
             std::to_string(sim.sum(&Counters::duplicates) - d0) + " repeats; RSS " +
             std::to_string(srv.status_kib("VmRSS")) + " KiB");
      }
      long rss = srv.status_kib("VmRSS");
      emit("memory", n, "rss_kib", static_cast<double>(rss), "KiB", 0);
      emit("memory", n, "kib_per_client", static_cast<double>(rss - rss0) / static_cast<double>(n), "KiB", 3);
      row = 0;
      for (std::size_t i = 0; i < n; ++i) row += static_cast<double>(row_bytes(sim.peer(i)));
      row /= static_cast<double>(n);
    }
    emit("memory", n, "rss_peak_kib", static_cast<double>(srv.status_kib("VmHWM")), "KiB", 0);
    // What a client's row is on the wire: the information the server has to keep per client.
    emit("memory", n, "baseline_wire_kib_per_client", row / 1024.0, "KiB", 3);
    srv.stop();
    return true;
  } catch (const std::exception& e) {
    emit_error("memory", n, e.what());
    return false;
  }
}

// wire: the encoded size (protocol::encode) of every datagram type for typical content: names
// of 5 characters, texts of 20 and of 600 bytes, sealed or signed as the client does. No server.
// docs/PERFORMANCE.md sets them beside the v1 (JSON) sizes of the same messages.
bool bench_wire(const Options&) {
  try {
    constexpr std::uint64_t id = 0x1234567890abcdefull;  // ids are random u64s (transport::Core::next_id)
    constexpr std::uint64_t epoch = 0x0fedcba987654321ull;
    constexpr std::int64_t ts_us = 1'764'650'000'000'000;  // December 2025
    const std::string me = "alice", peer = "bobby";
    const ident::Identity me_id = peer_identity(0), peer_id = peer_identity(1);
    const ident::Pair pair(me_id, peer_id.public_key());
    const proto::Entry row{peer, "192.168.1.20", 50000, true, peer_id.public_key()};
    const std::string token(ident::kTokenSize, 't');  // a server token is always kTokenSize bytes
    auto size = [](const proto::Message& m) {
      std::string bytes = proto::encode(m);
      if (!proto::decode(bytes)) throw Failure(std::string("a ") + proto::type_name(m) + " did not decode");
      return static_cast<double>(bytes.size());
    };
    // Text-independent types: n = 0.
    const std::vector<std::pair<std::string, proto::Message>> fixed = {
        {"register", proto::Register{id, me, me_id.public_key(), 15000, {}, {}}},
        {"register_proof",
         proto::Register{id, me, me_id.public_key(), 15000, token, ident::register_proof(me_id, me, token)}},
        {"dereg", proto::Dereg{id, me}},
        {"probe", proto::Probe{id, peer}},
        {"table_1_row", proto::Table{id, peer, epoch, 41, 42, false, {row}}},
        {"keepalive", proto::KeepAlive{id, me}},
        {"lookup", proto::Lookup{id, peer}},
        {"ack", proto::Ack{id}},
        {"ack_table", proto::Ack{id, epoch, 42}},
        {"challenge", proto::Challenge{id, token}},
        {"receipt", proto::Receipt{id, ident::seal_receipt(pair, id, peer)}},
        {"regok", proto::RegOk{id, epoch, 0}},
        {"regerr", proto::RegErr{id, "the name alice belongs to another identity"}},
        {"exists", proto::Exists{id, peer}},
        {"refused", proto::Refused{id, "you are not registered from this address"}},
        {"alive", proto::Alive{id, true}},
        {"found", proto::Found{id, true, row}},
    };
    for (const auto& [label, m] : fixed) emit("wire", 0, label + "_bytes", size(m), "B", 0);
    emit("wire", 0, "table_row_bytes", static_cast<double>(proto::entry_size(row)), "B", 0);
    for (std::size_t len : {std::size_t{20}, std::size_t{600}}) {
      std::string text;
      while (text.size() < len) text += "lunch at noon? ";
      text.resize(len);
      const std::string sealed = ident::seal_direct(pair, id, 1'764'650'000'000, peer, text);
      const std::string signed_body = ident::sign_channel(me_id, me, id, 1'764'650'000'000, text);
      const std::vector<std::pair<std::string, proto::Message>> texts = {
          {"direct", proto::Direct{id, me, sealed}},
          {"save", proto::Save{id, me, peer, id, false, sealed}},
          {"channel", proto::Channel{id, me, signed_body}},
          {"relay", proto::Relay{id, peer, me, id, signed_body}},
          {"stored_1_item", proto::Stored{id, peer, {proto::StoredItem{me, false, ts_us, id, me_id.public_key(), sealed}}}},
      };
      for (const auto& [label, m] : texts) emit("wire", len, label + "_bytes", size(m), "B", 0);
      emit("wire", len, "sealed_body_bytes", static_cast<double>(sealed.size()), "B", 0);
      emit("wire", len, "signed_body_bytes", static_cast<double>(signed_body.size()), "B", 0);
    }
    return true;
  } catch (const std::exception& e) {
    emit_error("wire", 0, e.what());
    return false;
  }
}

// servers: several servers on one PostgreSQL (issue 14), each figure beside a same-run baseline:
// durable saves on PostgreSQL vs SQLite, a change on one server to the table update at a client
// of another vs of the same server, and a registration storm over 2 servers vs 1 (and 1 on SQLite).
// It starts its own throwaway cluster (scripts/pg) and stops it at the end, also on a failure.

/// A figure of one configuration: its CPU, the server processes' and the database's.
double servers_cpu(const std::vector<std::unique_ptr<ServerProcess>>& servers) {
  double total = 0;
  for (const auto& s : servers) total += s->cpu_seconds();
  return total;
}

/// The store scenario's load (100 senders, kSaveWindow saves in flight each, to 10 recipients
/// that left) against one server started with `args`; emits its figures suffixed `_<label>`.
bool servers_saves(const Options& o, const PgCluster& pg, std::size_t total, const std::string& label) {
  constexpr std::size_t senders = 100, recipients = 10;
  try {
    auto deadline = Clock::now() + 60s + std::chrono::milliseconds(total);
    std::vector<std::string> args;
    if (label == "postgresql") args = {"--store", pg.newdb()};
    ServerProcess srv(o, args);
    net::io_context io(1);
    Sim sim(io, srv.endpoint());
    std::vector<Peer*> from, to;
    for (std::size_t i = 0; i < senders; ++i) from.push_back(&sim.add());
    for (std::size_t i = 0; i < recipients; ++i) to.push_back(&sim.add());
    register_then_leave(sim, to, deadline);
    settle(sim, srv, 5s);
    double scpu0 = srv.cpu_seconds(), dcpu0 = pg.cpu_seconds();
    Clock::duration elapsed{};
    std::vector<double> latency = save_all(sim, from, to, total, deadline, elapsed);
    double server_cpu = srv.cpu_seconds() - scpu0, db_cpu = pg.cpu_seconds() - dcpu0;
    emit("servers", total, "saves_per_s_" + label,
         static_cast<double>(total) / std::chrono::duration<double>(elapsed).count(), "1/s");
    emit("servers", total, "save_latency_p50_ms_" + label, percentile(latency, 50), "ms", 3);
    emit("servers", total, "save_latency_p99_ms_" + label, percentile(latency, 99), "ms", 3);
    emit("servers", total, "save_server_cpu_s_" + label, server_cpu, "s", 2);
    if (label == "postgresql") emit("servers", total, "save_db_cpu_s_" + label, db_cpu, "s", 2);
    srv.stop();
    return true;
  } catch (const std::exception& e) {
    emit_error("servers", total, "saves on " + label + ": " + e.what());
    return false;
  }
}

/// Two servers A and B on one database. A subject on A leaves (Dereg) and registers again,
/// `rounds` times; an observer on B and one on A time each change from the subject's request to
/// the Table that carries it (cross-server, and the same-server baseline, in the same rounds).
bool servers_change(const Options& o, const PgCluster& pg, std::size_t rounds) {
  try {
    auto deadline = Clock::now() + 60s + rounds * 100ms;
    std::string uri = pg.newdb();
    ServerProcess a(o, {"--store", uri}), b(o, {"--store", uri});
    net::io_context io(1);
    Sim sim(io, a.endpoint());
    Peer& subject = sim.add(a.endpoint());
    Peer& cross = sim.add(b.endpoint());
    Peer& same = sim.add(a.endpoint());
    register_all(sim, 0, deadline, "registering 3 peers on two servers");
    sim.run_for(200ms);
    // The subject's row as each observer holds it: 1 offline, 2 online (TableView::rows).
    std::uint8_t want = 0;
    std::optional<Clock::time_point> at_cross, at_same;
    auto row = [&](const Peer& p) -> std::uint8_t {
      return subject.index < p.view.rows.size() ? p.view.rows[subject.index] : 0;
    };
    sim.on_table = [&](Peer& p) {
      if (&p == &cross && !at_cross && row(p) == want) at_cross = Clock::now();
      if (&p == &same && !at_same && row(p) == want) at_same = Clock::now();
    };
    std::vector<double> leave_cross, leave_same, join_cross, join_same, dereg_ack;
    for (std::size_t r = 0; r < rounds; ++r) {
      // The subject leaves: from the Dereg sent to each observer's Table showing it offline.
      want = 1;
      at_cross.reset();
      at_same.reset();
      std::optional<Clock::time_point> acked;
      auto start = Clock::now();
      sim.dereg_peer(subject, [&](bool ok) {
        if (ok) acked = Clock::now();
      });
      if (!sim.run_until([&] { return (acked && at_cross && at_same) || sim.failed() > 0; }, deadline))
        throw Failure("round " + std::to_string(r) + ": the Dereg did not reach both observers in time (" +
                      (at_cross ? "" : "not ") + "on B, " + (at_same ? "" : "not ") + "on A)");
      if (sim.failed() > 0) throw Failure(sim.last_failure());
      leave_cross.push_back(ms(*at_cross - start));
      leave_same.push_back(ms(*at_same - start));
      dereg_ack.push_back(ms(*acked - start));
      // It registers again (Register, Challenge, Register with the proof): to each Table showing it online.
      want = 2;
      at_cross.reset();
      at_same.reset();
      bool joined = false;
      start = Clock::now();
      sim.register_peer(subject, [&](const proto::RegOk* ok) { joined = ok != nullptr; });
      if (!sim.run_until([&] { return (joined && at_cross && at_same) || sim.failed() > 0; }, deadline))
        throw Failure("round " + std::to_string(r) + ": the registration did not reach both observers in time (" +
                      (at_cross ? "" : "not ") + "on B, " + (at_same ? "" : "not ") + "on A)");
      if (sim.failed() > 0) throw Failure(sim.last_failure());
      join_cross.push_back(ms(*at_cross - start));
      join_same.push_back(ms(*at_same - start));
    }
    if (sim.foreign() > 0)
      throw Failure(std::to_string(sim.foreign()) + " tables came from a server the peer is not registered with");
    emit("servers", rounds, "change_cross_p50_ms", percentile(leave_cross, 50), "ms", 3);
    emit("servers", rounds, "change_cross_p99_ms", percentile(leave_cross, 99), "ms", 3);
    emit("servers", rounds, "change_same_p50_ms", percentile(leave_same, 50), "ms", 3);
    emit("servers", rounds, "change_same_p99_ms", percentile(leave_same, 99), "ms", 3);
    emit("servers", rounds, "dereg_ack_p50_ms", percentile(dereg_ack, 50), "ms", 3);
    emit("servers", rounds, "rejoin_cross_p50_ms", percentile(join_cross, 50), "ms", 3);
    emit("servers", rounds, "rejoin_cross_p99_ms", percentile(join_cross, 99), "ms", 3);
    emit("servers", rounds, "rejoin_same_p50_ms", percentile(join_same, 50), "ms", 3);
    emit("servers", rounds, "rejoin_same_p99_ms", percentile(join_same, 99), "ms", 3);
    sim.on_table = nullptr;
    a.stop();
    b.stop();
    return true;
  } catch (const std::exception& e) {
    emit_error("servers", rounds, std::string("change latency: ") + e.what());
    return false;
  }
}

/// N peers register at once, spread evenly over `count` servers (each on SQLite of its own, or
/// all on one fresh PostgreSQL database); timed until every peer holds all N rows, all online.
bool servers_storm(const Options& o, const PgCluster& pg, std::size_t n, std::size_t count, bool postgresql) {
  const std::string label =
      std::to_string(count).append(count == 1 ? "_server_" : "_servers_").append(postgresql ? "postgresql" : "sqlite");
  std::vector<std::unique_ptr<ServerProcess>> servers;
  net::io_context io(1);
  std::optional<Sim> sim;
  double scpu0 = 0, dcpu0 = 0;
  try {
    auto deadline = Clock::now() + std::chrono::seconds(30 + n / 40);
    std::uint64_t udp0 = udp_rcvbuf_errors();
    std::vector<std::string> args = kMassArgs;
    if (postgresql) {
      args.push_back("--store");
      args.push_back(pg.newdb());
    }
    for (std::size_t k = 0; k < count; ++k) servers.push_back(std::make_unique<ServerProcess>(o, args));
    sim.emplace(io, servers[0]->endpoint());
    for (std::size_t i = 0; i < n; ++i) sim->add(servers[i % count]->endpoint());
    scpu0 = servers_cpu(servers);
    dcpu0 = pg.cpu_seconds();
    Clock::duration t = register_all(*sim, 0, deadline, "registering " + std::to_string(n) + " on " + label);
    double server_cpu = servers_cpu(servers) - scpu0, db_cpu = pg.cpu_seconds() - dcpu0;
    std::uint64_t gone = 0;
    for (const auto& s : servers) gone += s->marked_gone();
    emit("servers", n, "converge_ms_" + label, ms(t), "ms");
    emit("servers", n, "server_cpu_s_" + label, server_cpu, "s", 2);
    if (postgresql) emit("servers", n, "db_cpu_s_" + label, db_cpu, "s", 2);
    emit("servers", n, "bytes_total_" + label, static_cast<double>(sim->sum(&Counters::bytes_received)), "B", 0);
    emit("servers", n, "server_resends_seen_" + label, static_cast<double>(sim->sum(&Counters::duplicates)), "count", 0);
    emit("servers", n, "udp_rcvbuf_drops_" + label, static_cast<double>(udp_rcvbuf_errors() - udp0), "count", 0);
    emit("servers", n, "server_marked_gone_" + label, static_cast<double>(gone), "count", 0);
    sim.reset();
    for (auto& s : servers) s->stop();
    return true;
  } catch (const std::exception& e) {
    if (sim) {
      emit("servers", n, "registered_peers_" + label, static_cast<double>(sim->registered()), "count", 0);
      emit("servers", n, "converged_peers_" + label, static_cast<double>(sim->converged()), "count", 0);
    }
    if (!servers.empty()) emit("servers", n, "server_cpu_s_" + label, servers_cpu(servers) - scpu0, "s", 2);
    emit_error("servers", n, "storm on " + label + ": " + e.what());
    return false;
  }
}

bool bench_servers(const Options& o) {
  const std::size_t saves = sizes_for(o, {20000}, {2000}).front();
  const std::size_t rounds = o.rounds > 0 ? o.rounds : o.quick ? 30 : 200;
  const std::size_t storm = o.quick ? 1000 : 10000;
  raise_fd_limit(storm + 1600);
  try {
    PgCluster pg(o);
    bool ok = true;
    // Each step after an interruption would only fail again: stop at once.
    auto step = [&](auto&& run) {
      if (g_interrupted == 0) ok = run() && ok;
    };
    step([&] { return servers_saves(o, pg, saves, "sqlite"); });
    step([&] { return servers_saves(o, pg, saves, "postgresql"); });
    step([&] { return servers_change(o, pg, rounds); });
    step([&] { return servers_storm(o, pg, storm, 1, false); });
    step([&] { return servers_storm(o, pg, storm, 1, true); });
    step([&] { return servers_storm(o, pg, storm, 2, true); });
    pg.stop();
    if (g_interrupted != 0 && ok) emit_error("servers", 0, "interrupted");
    return ok && g_interrupted == 0;
  } catch (const std::exception& e) {
    emit_error("servers", 0, e.what());
    return false;
  }
}

struct Scenario {
  const char* name;
  bool (*run)(const Options&);
};
constexpr Scenario kScenarios[] = {{"direct", bench_direct}, {"register", bench_register}, {"fanout", bench_fanout},
                                   {"store", bench_store},   {"drain", bench_drain},       {"memory", bench_memory},
                                   {"wire", bench_wire},     {"servers", bench_servers}};

void usage(FILE* out) {
  std::fprintf(out,
               "usage: chatbench <scenario|all> [--quick] [--bin path/to/ChatApp] [--tmp dir] [--n N[,N...]]\n"
               "                 [--wrap 'cmd args'] [--server-arg arg]... [--start-timeout s] [--rounds n]\n"
               "                 [--pg-script path/to/scripts/pg]\n"
               "scenarios: direct register fanout store drain memory wire servers all\n");
}

std::vector<std::size_t> parse_sizes(const std::string& s) {
  std::vector<std::size_t> out;
  std::stringstream in(s);
  for (std::string part; std::getline(in, part, ',');) out.push_back(std::stoul(part));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);
  ::signal(SIGINT, [](int) { g_interrupted = 1; });
  ::signal(SIGTERM, [](int) { g_interrupted = 1; });
  spdlog::set_level(spdlog::level::warn);
  Options o;
  try {
    for (int i = 1; i < argc; ++i) {
      std::string_view a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw std::invalid_argument(std::string(a) + " needs a value");
        return argv[++i];
      };
      if (a == "--quick") o.quick = true;
      else if (a == "--bin") o.bin = value();
      else if (a == "--tmp") o.tmp = value();
      else if (a == "--n") o.sizes = parse_sizes(value());
      else if (a == "--rounds") o.rounds = std::stoul(value());
      else if (a == "--pg-script") o.pg_script = value();
      else if (a == "--server-arg") o.server_args.push_back(value());
      else if (a == "--start-timeout") o.start_timeout = std::chrono::seconds(std::stol(value()));
      else if (a == "--wrap") {
        std::stringstream in(value());
        for (std::string w; in >> w;) o.wrap.push_back(w);
      } else if (a == "-h" || a == "--help") {
        usage(stdout);
        return 0;
      } else if (o.scenario.empty() && !a.starts_with("-")) o.scenario = a;
      else throw std::invalid_argument("unknown argument " + std::string(a));
    }
    if (o.scenario.empty()) throw std::invalid_argument("no scenario given");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "chatbench: %s\n", e.what());
    usage(stderr);
    return 2;
  }
  if (o.bin.empty()) {
    std::error_code ec;
    o.bin = (fs::read_symlink("/proc/self/exe", ec).parent_path().parent_path() / "ChatApp").string();
  }
  if (o.wrap.empty() && ::access(o.bin.c_str(), X_OK) != 0) {
    std::fprintf(stderr, "chatbench: no ChatApp binary at %s (use --bin)\n", o.bin.c_str());
    return 2;
  }
  bool ok = true, found = false;
  for (const Scenario& s : kScenarios) {
    if (o.scenario != "all" && o.scenario != s.name) continue;
    found = true;
    auto start = Clock::now();
    ok = s.run(o) && ok;
    note(std::string(s.name) + " took " + std::to_string(ms(Clock::now() - start) / 1000) + " s");
  }
  if (!found) {
    std::fprintf(stderr, "chatbench: unknown scenario %s\n", o.scenario.c_str());
    usage(stderr);
    return 2;
  }
  return ok ? 0 : 1;
}
