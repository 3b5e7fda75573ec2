// bench_mqtt: a same-run mosquitto baseline for chatbench's fanout and drain scenarios (issue 13).
// Starts its own `mosquitto` (a fresh one per scenario size, as chatbench starts a fresh server),
// drives every MQTT client (libmosquitto, one connection each) from one thread with epoll, and
// prints one JSON line per figure in chatbench's format. See docs/PERFORMANCE.md, "How it measures".
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <mosquitto.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

/// Set by SIGINT/SIGTERM: the running scenario stops and its broker is stopped.
volatile std::sig_atomic_t g_interrupted = 0;

/// A scenario that could not produce its figures (timeout, refused connection, broker failure).
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string scenario = "all";
  bool quick = false;
  std::string broker = "/usr/sbin/mosquitto";
  std::string tmp = "/tmp";
  std::vector<std::size_t> sizes;  // --n overrides the scenario's sizes
  std::size_t rounds = 0;          // --rounds: measured fanout rounds per size (0: the default)
};

/// Payload of a fanout PUBLISH: the size of ChatApp's Relay datagram for a typical channel message
/// (chatbench's `relay_bytes`), so both carry the same bytes of content per copy.
constexpr std::size_t kChannelPayload = 118;
/// Payload of a drain message: about the sealed Save body ChatApp stores for one message (~116 B).
constexpr std::size_t kSavePayload = 120;
constexpr const char* kChannelTopic = "chatbench/channel";
constexpr const char* kInboxTopic = "chatbench/inbox/r";
constexpr const char* kDrainClientId = "chatbench-drain-r";  // fixed: the persistent session's id
constexpr int kKeepalive = 60;                                // s; loop_misc runs every second
/// Clients connected before the bench waits for their CONNACKs: below mosquitto's listen backlog.
constexpr std::size_t kConnectBatch = 50;

void append(std::string& out, std::string_view s) { out += s; }
template <class T>
  requires std::is_arithmetic_v<T>
void append(std::string& out, T v) {
  out += std::to_string(v);
}
/// Concatenates text and numbers (instead of "literal" + std::string, which GCC 12 at -O3
/// answers with a false -Wrestrict).
template <class... T>
std::string cat(const T&... parts) {
  std::string out;
  (append(out, parts), ...);
  return out;
}

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
  std::fprintf(stderr, "bench_mqtt %.*s n=%zu: %s\n", static_cast<int>(bench.size()), bench.data(), n,
               what.c_str());
}

void note(const std::string& what) { std::fprintf(stderr, "bench_mqtt: %s\n", what.c_str()); }

double ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

/// Nearest-rank percentile of `v` (sorted in place), as chatbench computes it.
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
    note(cat("RLIMIT_NOFILE is ", rl.rlim_cur, ", below the ", want, " wanted"));
}

std::string errno_text(std::string_view what) {
  std::string out(what);
  out += ": ";
  out += std::strerror(errno);
  return out;
}

/// A libmosquitto result as text (MOSQ_ERR_ERRNO: the errno it left).
std::string mosq_text(int rc) {
  if (rc == MOSQ_ERR_ERRNO) return std::strerror(errno);
  return mosquitto_strerror(rc);
}

// ---------------------------------------------------------------- the broker process

/// A free TCP port on 127.0.0.1 (another process may take it before mosquitto does: retried).
std::uint16_t free_tcp_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw Failure(errno_text("socket"));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    std::string why = errno_text("bind");
    ::close(fd);
    throw Failure(why);
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

/// True if 127.0.0.1:port accepts a TCP connection now.
bool accepts(std::uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  ::close(fd);
  return ok;
}

/// A `mosquitto -c <generated config>` child in its own process group, with a fresh temporary
/// directory for its config and log; SIGTERM by pid and reaped on stop() or destruction.
class Broker {
 public:
  Broker(const Options& o, std::size_t max_clients) : bin_(o.broker) {
    std::string tmpl = (fs::path(o.tmp) / "bench_mqtt-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) throw Failure(errno_text(cat("mkdtemp under ", o.tmp)));
    dir_ = tmpl;
    raise_fd_limit(2 * max_clients + 512);  // before the fork: mosquitto inherits it
    for (int attempt = 0; attempt < 3; ++attempt) {
      port_ = free_tcp_port();
      write_config();
      spawn();
      if (wait_listening(10s)) {
        note(cat("mosquitto ", version(), " pid ", pid_, " on 127.0.0.1:", port_, ", config ",
                 (dir_ / "mosquitto.conf").string()));
        return;
      }
      if (pid_ > 0) ::kill(pid_, SIGTERM);  // alive but not listening in time
      reap(2s);
    }
    std::string why = tail();
    fs::remove_all(dir_);
    throw Failure(cat("mosquitto did not start: ", why));
  }
  Broker(const Broker&) = delete;
  Broker& operator=(const Broker&) = delete;
  ~Broker() {
    if (pid_ > 0) reap_after_term();
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  std::uint16_t port() const { return port_; }

  /// SIGTERM by pid, reaped (10 s, then SIGKILL). Throws if it did not exit cleanly.
  void stop() {
    if (pid_ <= 0) return;
    int status = reap_after_term();
    if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0))
      throw Failure(cat("mosquitto did not exit cleanly on SIGTERM (status ", status, "): ", tail()));
  }

  /// Throws if mosquitto has exited (it must stay up for the whole scenario).
  void check_alive() {
    if (pid_ <= 0) throw Failure("mosquitto is not running");
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      throw Failure(cat("mosquitto exited (status ", status, "): ", tail()));
    }
  }

  /// User + system CPU seconds the broker used so far (/proc/<pid>/stat fields 14 and 15).
  double cpu_seconds() const {
    std::ifstream in(cat("/proc/", pid_, "/stat"));
    std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    auto close_paren = all.rfind(')');
    if (close_paren == std::string::npos) return 0;
    std::istringstream fields(all.substr(close_paren + 2));
    std::vector<std::string> tok;
    for (std::string t; fields >> t;) tok.push_back(t);
    if (tok.size() < 13) return 0;
    double ticks = std::strtod(tok[11].c_str(), nullptr) + std::strtod(tok[12].c_str(), nullptr);
    return ticks / static_cast<double>(::sysconf(_SC_CLK_TCK));
  }

  /// The broker's version as its log gives it ("mosquitto version 2.0.11 starting").
  std::string version() const {
    std::ifstream in(dir_ / "mosquitto.log");
    constexpr std::string_view tag = "mosquitto version ";
    for (std::string line; std::getline(in, line);)
      if (auto at = line.find(tag); at != std::string::npos) {
        std::string v = line.substr(at + tag.size());
        return v.substr(0, v.find(' '));
      }
    return "(version unknown)";
  }

  /// The last lines of the broker's log, for errors.
  std::string tail() const {
    std::ifstream in(dir_ / "mosquitto.log");
    std::deque<std::string> last;
    for (std::string line; std::getline(in, line);) {
      last.push_back(line);
      if (last.size() > 4) last.pop_front();
    }
    std::string out;
    for (const auto& l : last) {
      if (!out.empty()) out += " | ";
      out += l;
    }
    return out.empty() ? std::string("(no log)") : out;
  }

 private:
  void write_config() {
    std::ofstream c(dir_ / "mosquitto.conf", std::ios::trunc);
    c << "# written by bench_mqtt for one scenario size\n"
      << "listener " << port_ << " 127.0.0.1\n"
      << "allow_anonymous true\n"
      << "max_inflight_messages 20\n"
      << "max_queued_messages 200000\n"
      << "set_tcp_nodelay true\n"
      << "persistence false\n"  // queued messages are in memory only
      << "log_dest stderr\n";   // stderr is the log file below
    // As root mosquitto would switch to the user "mosquitto", which clears PR_SET_PDEATHSIG.
    if (::geteuid() == 0) c << "user root\n";
    if (!c.flush()) throw Failure(cat("cannot write ", (dir_ / "mosquitto.conf").string()));
  }

  void spawn() {
    std::string conf = (dir_ / "mosquitto.conf").string();
    std::string log = (dir_ / "mosquitto.log").string();
    int log_fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (log_fd < 0) throw Failure(errno_text(cat("open ", log)));
    pid_t parent = ::getpid();
    pid_ = ::fork();
    if (pid_ < 0) {
      ::close(log_fd);
      throw Failure(errno_text("fork"));
    }
    if (pid_ > 0) ::setpgid(pid_, pid_);  // also here, so the group exists before any signal
    if (pid_ == 0) {
      ::setpgid(0, 0);                     // its own group: a terminal's ^C reaches the bench only
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);  // never outlive the bench
      if (::getppid() != parent) ::_exit(127);
      int null = ::open("/dev/null", O_RDWR);
      ::dup2(null, 0);
      ::dup2(log_fd, 1);
      ::dup2(log_fd, 2);
      ::close_range(3, ~0U, 0);
      ::execl(bin_.c_str(), "mosquitto", "-c", conf.c_str(), static_cast<char*>(nullptr));
      ::dprintf(2, "exec %s: %s\n", bin_.c_str(), std::strerror(errno));
      ::_exit(127);
    }
    ::close(log_fd);
  }

  bool wait_listening(Clock::duration limit) {
    auto deadline = Clock::now() + limit;
    while (Clock::now() < deadline && !g_interrupted) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {  // e.g. the port was taken meanwhile
        pid_ = -1;
        return false;
      }
      if (accepts(port_)) return true;
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }

  int reap_after_term() {
    ::kill(pid_, SIGTERM);
    return reap(10s);
  }

  int reap(Clock::duration grace) {
    int status = -1;
    if (pid_ <= 0) return status;
    auto deadline = Clock::now() + grace;
    for (;;) {
      pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_ || (r < 0 && errno != EINTR)) break;
      if (Clock::now() >= deadline) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
        break;
      }
      std::this_thread::sleep_for(5ms);
    }
    pid_ = -1;
    return status;
  }

  std::string bin_;
  fs::path dir_;
  std::uint16_t port_ = 0;
  pid_t pid_ = -1;
};

// ---------------------------------------------------------------- MQTT clients on one thread

/// What the clients of one scenario share: the fanout round in progress.
struct Round {
  std::uint64_t seq = 0;          // the message every subscriber should receive now
  std::size_t got = 0;            // subscribers that received it
  std::size_t stray = 0;          // messages of another round, or a second copy
  Clock::time_point first_at{};   // the first and the last subscriber's on_message
  Clock::time_point last_at{};
};

/// One libmosquitto client (one TCP connection), with what its callbacks saw.
class Client {
 public:
  Client(const std::string& id, bool clean_session, Round* round = nullptr) : id_(id), round_(round) {
    m_ = mosquitto_new(id.c_str(), clean_session, this);
    if (m_ == nullptr) throw Failure(cat("mosquitto_new ", id, ": ", std::strerror(errno)));
    mosquitto_int_option(m_, MOSQ_OPT_TCP_NODELAY, 1);  // as the broker's set_tcp_nodelay
    mosquitto_connect_with_flags_callback_set(m_, on_connect);
    mosquitto_disconnect_callback_set(m_, on_disconnect);
    mosquitto_subscribe_callback_set(m_, on_subscribe);
    mosquitto_publish_callback_set(m_, on_publish);
    mosquitto_message_callback_set(m_, on_message);
  }
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;
  ~Client() { mosquitto_destroy(m_); }

  mosquitto* handle() const { return m_; }
  const std::string& id() const { return id_; }

  /// Expects `count` distinct messages numbered 0..count-1 (the drain).
  void expect(std::size_t count) { seen_.assign(count, false); }

  int fd = -1;               // the socket registered with the Loop
  bool watching_out = false;  // EPOLLOUT registered
  bool leaving = false;       // a disconnect was asked for: a closed connection is no error
  bool connected = false;
  int connack = -1;
  bool session_present = false;
  bool disconnected = false;
  bool subscribed = false;
  int granted_qos = -1;
  std::size_t acked = 0;       // QoS 1 publishes the broker has PUBACKed
  Clock::time_point ack_at{};  // the last of them
  Clock::time_point connack_at{};
  std::size_t received = 0, distinct = 0, duplicates = 0, unexpected = 0;
  Clock::time_point last_at{};  // the last new message
  std::uint64_t last_round = 0;

 private:
  static Client& self(void* obj) { return *static_cast<Client*>(obj); }
  static void on_connect(mosquitto*, void* obj, int rc, int flags) {
    Client& c = self(obj);
    c.connack = rc;
    c.connected = rc == 0;
    c.session_present = (flags & 1) != 0;
    c.connack_at = Clock::now();
  }
  static void on_disconnect(mosquitto*, void* obj, int) {
    Client& c = self(obj);
    c.disconnected = true;
    c.connected = false;
  }
  static void on_subscribe(mosquitto*, void* obj, int, int count, const int* granted) {
    Client& c = self(obj);
    c.granted_qos = count > 0 ? granted[0] : -1;
    c.subscribed = true;
  }
  static void on_publish(mosquitto*, void* obj, int) {
    Client& c = self(obj);
    ++c.acked;
    c.ack_at = Clock::now();
  }
  static void on_message(mosquitto*, void* obj, const mosquitto_message* msg) {
    auto now = Clock::now();
    Client& c = self(obj);
    ++c.received;
    std::uint64_t seq = 0;
    if (msg->payloadlen < static_cast<int>(sizeof seq)) {
      ++c.unexpected;
      return;
    }
    std::memcpy(&seq, msg->payload, sizeof seq);
    if (c.round_ != nullptr) {  // fanout: one copy per subscriber per round
      Round& r = *c.round_;
      if (seq != r.seq || c.last_round == seq) {
        ++r.stray;
        return;
      }
      c.last_round = seq;
      if (r.got++ == 0) r.first_at = now;
      r.last_at = now;
      return;
    }
    if (seq >= c.seen_.size()) {
      ++c.unexpected;
      return;
    }
    if (c.seen_[seq]) {
      ++c.duplicates;
      return;
    }
    c.seen_[seq] = true;
    ++c.distinct;
    c.last_at = now;
  }

  std::string id_;
  Round* round_ = nullptr;
  mosquitto* m_ = nullptr;
  std::vector<bool> seen_;
};

/// Drives the network I/O of every client from this one thread: level-triggered epoll on each
/// mosquitto_socket() (as chatbench's one io_context drives all its peers through asio's epoll
/// reactor), mosquitto_loop_read/_write when a socket is ready, mosquitto_loop_misc every second.
class Loop {
 public:
  Loop() : ep_(::epoll_create1(EPOLL_CLOEXEC)) {
    if (ep_ < 0) throw Failure(errno_text("epoll_create1"));
  }
  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;
  ~Loop() { ::close(ep_); }

  /// Blocking TCP connect, then the CONNECT packet is sent; the CONNACK comes through run_until.
  void connect(Client& c, std::uint16_t port) {
    int rc = mosquitto_connect(c.handle(), "127.0.0.1", port, kKeepalive);
    if (rc != MOSQ_ERR_SUCCESS) throw Failure(cat("connect ", c.id(), ": ", mosq_text(rc)));
    c.fd = mosquitto_socket(c.handle());
    if (c.fd < 0) throw Failure(cat("connect ", c.id(), ": no socket"));
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.ptr = &c;
    if (::epoll_ctl(ep_, EPOLL_CTL_ADD, c.fd, &ev) != 0) throw Failure(errno_text(cat("epoll_ctl add ", c.id())));
    c.watching_out = false;
    clients_.push_back(&c);
    sync(c);
  }

  /// Forgets a client whose connection is closed (or about to be destroyed).
  void remove(Client& c) {
    if (c.fd >= 0 && mosquitto_socket(c.handle()) == c.fd) ::epoll_ctl(ep_, EPOLL_CTL_DEL, c.fd, nullptr);
    c.fd = -1;
    std::erase(clients_, &c);
  }

  /// Watches for writability while libmosquitto has bytes it could not write yet. Called after
  /// every call that may queue a packet (publish, subscribe, read, write).
  void sync(Client& c) {
    if (c.fd < 0 || mosquitto_socket(c.handle()) != c.fd) return;
    bool want = mosquitto_want_write(c.handle());
    if (want == c.watching_out) return;
    epoll_event ev{};
    ev.events = EPOLLIN | (want ? EPOLLOUT : 0u);
    ev.data.ptr = &c;
    if (::epoll_ctl(ep_, EPOLL_CTL_MOD, c.fd, &ev) != 0) throw Failure(errno_text(cat("epoll_ctl mod ", c.id())));
    c.watching_out = want;
  }

  /// Runs until done(); past the deadline throws "timed out <what()>" (what() says how far it got).
  template <class Done, class What>
  void run_until(Done done, Clock::time_point deadline, What what) {
    while (!done()) {
      if (g_interrupted) throw Failure("interrupted");
      auto now = Clock::now();
      if (now >= deadline) throw Failure(cat("timed out ", what()));
      step(std::min<Clock::duration>(deadline - now, 100ms));
    }
  }
  void run_for(Clock::duration d) {
    auto end = Clock::now() + d;
    for (auto now = Clock::now(); now < end; now = Clock::now()) step(end - now);
  }

 private:
  void step(Clock::duration limit) {
    int timeout = static_cast<int>(std::chrono::ceil<std::chrono::milliseconds>(limit).count());
    int n = ::epoll_wait(ep_, events_.data(), static_cast<int>(events_.size()), std::max(timeout, 0));
    if (n < 0 && errno != EINTR) throw Failure(errno_text("epoll_wait"));
    for (int i = 0; i < n; ++i) {
      Client& c = *static_cast<Client*>(events_[static_cast<std::size_t>(i)].data.ptr);
      std::uint32_t ev = events_[static_cast<std::size_t>(i)].events;
      if (c.fd < 0) continue;
      if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) check(c, mosquitto_loop_read(c.handle(), 1), "read");
      if ((ev & EPOLLOUT) && c.fd >= 0) check(c, mosquitto_loop_write(c.handle(), 1), "write");
      sync(c);
    }
    if (auto now = Clock::now(); now >= next_misc_) {  // keep-alive pings, retries
      next_misc_ = now + 1s;
      for (Client* c : clients_) mosquitto_loop_misc(c->handle());
    }
  }

  void check(Client& c, int rc, const char* op) {
    if (rc == MOSQ_ERR_SUCCESS) return;
    if (c.leaving && (rc == MOSQ_ERR_NO_CONN || rc == MOSQ_ERR_CONN_LOST)) {
      c.disconnected = true;
      remove(c);
      return;
    }
    throw Failure(cat(c.id(), ": ", op, ": ", mosq_text(rc), c.disconnected ? " (disconnected)" : ""));
  }

  int ep_ = -1;
  std::vector<Client*> clients_;
  std::vector<epoll_event> events_ = std::vector<epoll_event>(256);
  Clock::time_point next_misc_{};
};

/// Connects `clients` in batches (below the broker's listen backlog); waits for every CONNACK.
void connect_all(Loop& loop, const std::vector<Client*>& clients, std::uint16_t port, Clock::time_point deadline) {
  for (std::size_t begin = 0; begin < clients.size(); begin += kConnectBatch) {
    std::size_t end = std::min(clients.size(), begin + kConnectBatch);
    for (std::size_t i = begin; i < end; ++i) loop.connect(*clients[i], port);
    loop.run_until(
        [&] {
          for (std::size_t i = begin; i < end; ++i)
            if (clients[i]->connack < 0) return false;
          return true;
        },
        deadline, [&] { return cat("waiting for CONNACKs (", end, " clients)"); });
    for (std::size_t i = begin; i < end; ++i)
      if (clients[i]->connack != 0)
        throw Failure(cat(clients[i]->id(), ": connection refused: ", mosquitto_connack_string(clients[i]->connack)));
  }
}

/// QoS 1 subscriptions for `clients`; waits for every SUBACK and checks QoS 1 was granted.
void subscribe_all(Loop& loop, const std::vector<Client*>& clients, const char* topic, Clock::time_point deadline) {
  for (Client* c : clients) {
    int rc = mosquitto_subscribe(c->handle(), nullptr, topic, 1);
    if (rc != MOSQ_ERR_SUCCESS) throw Failure(cat("subscribe ", c->id(), ": ", mosq_text(rc)));
    loop.sync(*c);
  }
  loop.run_until(
      [&] { return std::all_of(clients.begin(), clients.end(), [](const Client* c) { return c->subscribed; }); },
      deadline, [] { return std::string("waiting for SUBACKs"); });
  for (Client* c : clients)
    if (c->granted_qos != 1) throw Failure(cat(c->id(), ": subscription granted QoS ", c->granted_qos));
}

/// A clean MQTT DISCONNECT; waits until libmosquitto has closed the connection.
void disconnect(Loop& loop, Client& c, Clock::time_point deadline) {
  c.leaving = true;
  int rc = mosquitto_disconnect(c.handle());
  if (rc != MOSQ_ERR_SUCCESS && rc != MOSQ_ERR_NO_CONN) throw Failure(cat("disconnect ", c.id(), ": ", mosq_text(rc)));
  loop.sync(c);
  loop.run_until([&] { return c.disconnected; }, deadline, [&] { return cat("waiting for ", c.id(), " to disconnect"); });
  loop.remove(c);
}

/// A payload of `size` bytes: `seq` in its first 8, then filler text.
std::string payload(std::uint64_t seq, std::size_t size) {
  std::string p(size, 'x');
  constexpr std::string_view text = "hello from a simulated peer, a line of about the usual size for chat text! ";
  for (std::size_t i = sizeof seq; i < size; ++i) p[i] = text[(i - sizeof seq) % text.size()];
  std::memcpy(p.data(), &seq, sizeof seq);
  return p;
}

/// Bytes of a QoS 1 PUBLISH packet on the wire (MQTT 3.1.1: fixed header, topic, packet id, payload).
std::size_t publish_packet_bytes(std::string_view topic, std::size_t payload_size) {
  std::size_t remaining = 2 + topic.size() + 2 + payload_size;
  std::size_t length_bytes = remaining < 128 ? 1 : remaining < 16384 ? 2 : remaining < 2097152 ? 3 : 4;
  return 1 + length_bytes + remaining;
}

std::vector<std::size_t> sizes_for(const Options& o, std::vector<std::size_t> full, std::vector<std::size_t> quick) {
  if (!o.sizes.empty()) return o.sizes;
  return o.quick ? quick : full;
}

// ---------------------------------------------------------------- scenarios

// fanout: one publisher, N subscribers of one topic (QoS 1); per round one QoS 1 PUBLISH, timed
// until the last subscriber's on_message has run (its library sent the PUBACK just before).
bool bench_fanout(const Options& o) {
  bool all_ok = true;
  for (std::size_t n : sizes_for(o, {10, 100, 1000}, {10, 100})) {
    try {
      auto deadline = Clock::now() + 60s;
      Broker broker(o, n + 1);
      Round round;
      Loop loop;
      std::vector<std::unique_ptr<Client>> subs;
      std::vector<Client*> sub_ptrs;
      for (std::size_t i = 0; i < n; ++i) {
        subs.push_back(std::make_unique<Client>(cat("fan-", i), true, &round));
        sub_ptrs.push_back(subs.back().get());
      }
      Client pub("fan-publisher", true);
      connect_all(loop, sub_ptrs, broker.port(), deadline);
      connect_all(loop, {&pub}, broker.port(), deadline);
      subscribe_all(loop, sub_ptrs, kChannelTopic, deadline);
      loop.run_for(100ms);  // settled: nothing left from the setup

      const std::size_t rounds = o.rounds > 0 ? o.rounds : o.quick ? 10 : (n >= 1000 ? 20 : 50);
      const std::size_t warmup = o.quick ? 2 : 5;
      std::vector<double> last, first, sender_ack;
      double cpu = 0, bench_cpu = 0;
      for (std::size_t r = 0; r < warmup + rounds; ++r) {
        const bool measured = r >= warmup;
        round.seq = r + 1;
        round.got = 0;
        const std::size_t acked_before = pub.acked;
        const std::string body = payload(round.seq, kChannelPayload);  // made before the clock starts
        double cpu0 = broker.cpu_seconds(), bcpu0 = self_cpu_seconds();
        auto start = Clock::now();
        int rc = mosquitto_publish(pub.handle(), nullptr, kChannelTopic, static_cast<int>(body.size()), body.data(),
                                   1, false);
        if (rc != MOSQ_ERR_SUCCESS) throw Failure(cat("publish: ", mosq_text(rc)));
        loop.sync(pub);
        loop.run_until([&] { return round.got == n && pub.acked > acked_before; }, Clock::now() + 10s,
                       [&] { return cat("in round ", r, ": ", round.got, "/", n, " received"); });
        if (measured) {
          last.push_back(ms(round.last_at - start));
          first.push_back(ms(round.first_at - start));
          sender_ack.push_back(ms(pub.ack_at - start));
        }
        loop.run_for(10ms);  // this round's PUBACKs reach the broker (and count in its CPU) first
        if (measured) {
          cpu += broker.cpu_seconds() - cpu0;
          bench_cpu += self_cpu_seconds() - bcpu0;
        }
      }
      broker.check_alive();
      if (round.stray > 0) throw Failure(cat(round.stray, " copies were duplicates or out of round"));
      emit("fanout", n, "mosquitto_last_recv_ms", median(last), "ms", 3);
      emit("fanout", n, "mosquitto_last_recv_max_ms", maximum(last), "ms", 3);
      emit("fanout", n, "mosquitto_first_recv_ms", median(first), "ms", 3);
      emit("fanout", n, "mosquitto_sender_ack_ms", median(sender_ack), "ms", 3);
      emit("fanout", n, "mosquitto_broker_cpu_per_message_ms", cpu / static_cast<double>(rounds) * 1000, "ms", 3);
      emit("fanout", n, "mosquitto_bench_cpu_per_message_ms", bench_cpu / static_cast<double>(rounds) * 1000, "ms",
           3);
      emit("fanout", n, "mosquitto_payload_bytes", static_cast<double>(kChannelPayload), "B", 0);
      emit("fanout", n, "mosquitto_publish_bytes",
           static_cast<double>(publish_packet_bytes(kChannelTopic, kChannelPayload)), "B", 0);
      emit("fanout", n, "mosquitto_rounds", static_cast<double>(rounds), "count", 0);
      for (auto& s : subs) loop.remove(*s);
      loop.remove(pub);
      broker.stop();
    } catch (const std::exception& e) {
      emit_error("fanout", n, e.what());
      all_ok = false;
    }
  }
  return all_ok;
}

// drain: a persistent session (clean_session=false, fixed id, QoS 1 subscription) disconnects;
// M QoS 1 messages are published to it and PUBACKed by the broker; timed from the start of its
// reconnect (mosquitto_connect) until the M-th distinct message's on_message has run.
bool bench_drain(const Options& o) {
  const std::size_t m = sizes_for(o, {10000}, {1000}).front();
  try {
    auto deadline = Clock::now() + 90s;
    Broker broker(o, 4);
    Loop loop;
    {
      Client r(kDrainClientId, false);
      connect_all(loop, {&r}, broker.port(), deadline);
      if (r.session_present) throw Failure(cat("the broker already had a session for ", r.id()));
      subscribe_all(loop, {&r}, kInboxTopic, deadline);
      disconnect(loop, r, deadline);
    }
    loop.run_for(100ms);  // the broker has seen the DISCONNECT: the session is offline

    Client from("drain-publisher", true);
    connect_all(loop, {&from}, broker.port(), deadline);
    auto fill_start = Clock::now();
    for (std::size_t i = 0; i < m; ++i) {  // libmosquitto keeps 20 in flight, queues the rest
      const std::string body = payload(i, kSavePayload);
      int rc = mosquitto_publish(from.handle(), nullptr, kInboxTopic, static_cast<int>(body.size()), body.data(), 1,
                                 false);
      if (rc != MOSQ_ERR_SUCCESS) throw Failure(cat("publish ", i, ": ", mosq_text(rc)));
      loop.sync(from);
    }
    loop.run_until([&] { return from.acked == m; }, deadline,
                   [&] { return cat("waiting for PUBACKs: ", from.acked, "/", m); });
    auto filled = Clock::now() - fill_start;
    disconnect(loop, from, deadline);

    Client r(kDrainClientId, false);  // the same session's client, restarted
    r.expect(m);
    auto start = Clock::now();
    loop.connect(r, broker.port());
    loop.run_until([&] { return r.distinct == m || r.connack > 0; }, deadline,
                   [&] { return cat("draining: ", r.distinct, "/", m, " delivered"); });
    if (r.connack != 0) throw Failure(std::string("reconnect refused: ") + mosquitto_connack_string(r.connack));
    Clock::duration drained = r.last_at - start;
    loop.run_for(100ms);  // anything delivered twice arrives too
    if (!r.session_present) throw Failure("the broker did not keep the session");
    if (r.unexpected > 0) throw Failure(cat(r.unexpected, " unexpected messages"));
    broker.check_alive();
    emit("drain", m, "mosquitto_drain_ms", ms(drained), "ms");
    emit("drain", m, "mosquitto_connack_ms", ms(r.connack_at - start), "ms", 3);
    emit("drain", m, "mosquitto_fill_ms", ms(filled), "ms");
    emit("drain", m, "mosquitto_duplicates", static_cast<double>(r.duplicates), "count", 0);
    emit("drain", m, "mosquitto_payload_bytes", static_cast<double>(kSavePayload), "B", 0);
    disconnect(loop, r, deadline);
    broker.stop();
    return true;
  } catch (const std::exception& e) {
    emit_error("drain", m, e.what());
    return false;
  }
}

std::vector<std::size_t> parse_sizes(const std::string& s) {
  std::vector<std::size_t> out;
  std::stringstream in(s);
  for (std::string part; std::getline(in, part, ',');) out.push_back(std::stoul(part));
  return out;
}

void usage(FILE* out) {
  std::fprintf(out,
               "usage: bench_mqtt [fanout|drain|all] [--quick] [--tmp dir] [--n N[,N...]] [--rounds n]\n"
               "                  [--broker path/to/mosquitto]\n");
}

}  // namespace

int main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);
  ::signal(SIGINT, [](int) { g_interrupted = 1; });
  ::signal(SIGTERM, [](int) { g_interrupted = 1; });
  Options o;
  bool scenario_given = false;
  try {
    for (int i = 1; i < argc; ++i) {
      std::string_view a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw std::invalid_argument(cat(a, " needs a value"));
        return argv[++i];
      };
      if (a == "--quick") o.quick = true;
      else if (a == "--tmp") o.tmp = value();
      else if (a == "--n") o.sizes = parse_sizes(value());
      else if (a == "--rounds") o.rounds = std::stoul(value());
      else if (a == "--broker") o.broker = value();
      else if (a == "-h" || a == "--help") {
        usage(stdout);
        return 0;
      } else if (!scenario_given && !a.starts_with("-")) {
        o.scenario = a;
        scenario_given = true;
      } else throw std::invalid_argument(cat("unknown argument ", a));
    }
    if (o.scenario != "all" && o.scenario != "fanout" && o.scenario != "drain")
      throw std::invalid_argument(cat("unknown scenario ", o.scenario));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_mqtt: %s\n", e.what());
    usage(stderr);
    return 2;
  }
  if (::access(o.broker.c_str(), X_OK) != 0) {
    std::fprintf(stderr, "bench_mqtt: no mosquitto at %s (scripts/deps installs it; or use --broker)\n",
                 o.broker.c_str());
    return 2;
  }
  mosquitto_lib_init();
  int major = 0, minor = 0, revision = 0;
  mosquitto_lib_version(&major, &minor, &revision);
  note(cat("libmosquitto ", major, ".", minor, ".", revision, "; the broker's version is in its start note"));
  bool ok = true;
  auto run = [&](const char* name, bool (*scenario)(const Options&)) {
    if (o.scenario != "all" && o.scenario != name) return;
    auto start = Clock::now();
    ok = scenario(o) && ok;
    note(cat(name, " took ", ms(Clock::now() - start) / 1000, " s"));
  };
  run("fanout", bench_fanout);
  run("drain", bench_drain);
  mosquitto_lib_cleanup();
  return ok ? 0 : 1;
}
