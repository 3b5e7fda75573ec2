// bench_product: the product end to end. A real `ChatApp -s` and two real `ChatApp -c` processes
// (alice and bob) on pipes; lines typed into alice's stdin, shown on bob's stdout. Latency and
// throughput are printed beside a same-run two-process raw UDP baseline, one JSON line per figure.
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "identity/envelope.hpp"
#include "identity/identity.hpp"
#include "protocol/codec.hpp"

extern char** environ;

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

volatile std::sig_atomic_t g_interrupted = 0;

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// The bench name of the figures: "product", or "files" with --files.
std::string_view kBench = "product";
/// Messages sent and not counted before the latency run.
constexpr std::size_t kWarm = 200;
/// Characters of every message text (a sequence number, then filler).
constexpr std::size_t kTextSize = 100;
/// Datagrams the throughput baseline keeps outstanding (each answered, as the product's are).
constexpr std::size_t kBaselineWindow = 64;
/// Throughput: messages typed into alice ahead of her receipts at most (see measure_throughput).
/// The client itself keeps at most 256 in flight to bob and queues the rest (peer::Backlog), so
/// `--window 0` (all 10,000 at once) must deliver them all too; 2,000 keeps the figures
/// comparable with earlier runs.
constexpr std::size_t kWindow = 2000;

struct Options {
  bool quick = false;
  std::string bin;
  std::string tmp = "/tmp";
  std::size_t n = 0;  // 0: 10,000, or 1,000 with --quick
  std::optional<std::size_t> window;  // throughput: lines typed ahead of the receipts (0: all)
  std::vector<std::string> wrap_bob;  // --wrap-bob: a command bob's client runs under (valgrind ...)
  std::chrono::seconds start_timeout{10};
  // --files: a file from alice to bob beside raw UDP, and chat round trips during it.
  bool files = false;
  std::uint64_t file_mib = 0;  // 0: 100, or 20 with --quick
  bool no_chat = false;        // --no-chat: the transfer alone (the lossy runs of bench/files)
  std::string label;           // --label: appended to each figure's name (e.g. "_loss20")
};

void emit(std::size_t n, std::string_view metric, double value, std::string_view unit, int precision = 1) {
  std::printf("{\"bench\": \"%.*s\", \"n\": %zu, \"metric\": \"%.*s\", \"value\": %.*f, \"unit\": \"%.*s\"}\n",
              static_cast<int>(kBench.size()), kBench.data(), n, static_cast<int>(metric.size()), metric.data(),
              precision, value, static_cast<int>(unit.size()), unit.data());
  std::fflush(stdout);
}

void emit_error(std::size_t n, const std::string& what) {
  std::string clean = what;
  for (char& c : clean)
    if (c == '"' || c == '\\' || static_cast<unsigned char>(c) < 0x20) c = ' ';
  std::printf("{\"bench\": \"%.*s\", \"n\": %zu, \"error\": \"%s\"}\n", static_cast<int>(kBench.size()),
              kBench.data(), n, clean.c_str());
  std::fflush(stdout);
  std::fprintf(stderr, "bench_product n=%zu: %s\n", n, what.c_str());
}

void note(const std::string& what) { std::fprintf(stderr, "bench_product: %s\n", what.c_str()); }

double us(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }

/// Nearest-rank percentile of `v` (sorted in place).
double percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  auto rank = static_cast<std::size_t>(std::ceil(p / 100.0 * static_cast<double>(v.size())));
  return v[std::clamp<std::size_t>(rank, 1, v.size()) - 1];
}

std::string errno_text(const char* what) { return std::string(what).append(": ").append(std::strerror(errno)); }

/// A UDP port the kernel just gave out on 127.0.0.1 (free now; a child binds it next).
std::uint16_t free_udp_port() {
  sockaddr_in a{};
  socklen_t len = sizeof a;
  int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw Failure(errno_text("socket"));
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

/// Text of message `seq` of a run (`phase` 'W' warm-up, 'L' latency, 'T' throughput).
std::string message_text(char phase, std::size_t seq) {
  static constexpr std::string_view filler =
      "typed into alice's stdin, shown on bob's stdout: a line of chat text about as long as people write. ";
  char head[16];
  int len = std::snprintf(head, sizeof head, "%c%06zu ", phase, seq);
  std::string text(head, static_cast<std::size_t>(len));
  while (text.size() < kTextSize) text.append(filler.substr(0, kTextSize - text.size()));
  return text;
}

/// The sequence number of `text` if it is exactly message_text(phase, seq).
std::optional<std::size_t> parse_text(std::string_view text, char phase) {
  if (text.size() != kTextSize || text[0] != phase) return std::nullopt;
  std::size_t seq = 0;
  for (std::size_t i = 1; i < 7; ++i) {
    if (text[i] < '0' || text[i] > '9') return std::nullopt;
    seq = seq * 10 + static_cast<std::size_t>(text[i] - '0');
  }
  if (text != message_text(phase, seq)) return std::nullopt;
  return seq;
}

// ---------------------------------------------------------------- temporary directory

class TempDir {
 public:
  TempDir(const std::string& under, const char* tag) {
    std::string tmpl = (fs::path(under) / tag).string();
    tmpl.append("-XXXXXX");
    if (::mkdtemp(tmpl.data()) == nullptr) throw Failure(errno_text(("mkdtemp " + tmpl).c_str()));
    path_ = tmpl;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// ---------------------------------------------------------------- child processes on pipes

/// A child process in its own process group, its stdin, stdout and stderr on non-blocking pipes.
/// Stopped (SIGTERM to the group, SIGKILL after a grace) and reaped by stop() or the destructor.
class Child {
 public:
  Child(std::string label, std::vector<std::string> args, const std::vector<std::string>& env)
      : label_(std::move(label)) {
    int in[2], out[2], err[2];
    if (::pipe2(in, O_CLOEXEC) != 0) throw Failure(errno_text("pipe2"));
    if (::pipe2(out, O_CLOEXEC) != 0) {
      close_pair(in);
      throw Failure(errno_text("pipe2"));
    }
    if (::pipe2(err, O_CLOEXEC) != 0) {
      close_pair(in);
      close_pair(out);
      throw Failure(errno_text("pipe2"));
    }
    // Built before fork: the child only calls async-signal-safe functions.
    std::vector<std::string> envs;
    for (char** e = environ; *e != nullptr; ++e) {
      std::string_view kv(*e);
      bool replaced = std::any_of(env.begin(), env.end(), [&](const std::string& mine) {
        return kv.substr(0, kv.find('=') + 1) == std::string_view(mine).substr(0, mine.find('=') + 1);
      });
      if (!replaced) envs.emplace_back(kv);
    }
    envs.insert(envs.end(), env.begin(), env.end());
    std::vector<char*> argv, envp;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    for (auto& e : envs) envp.push_back(e.data());
    envp.push_back(nullptr);
    pid_t parent = ::getpid();
    pid_ = ::fork();
    if (pid_ < 0) {
      close_pair(in);
      close_pair(out);
      close_pair(err);
      throw Failure(errno_text("fork"));
    }
    if (pid_ == 0) {
      ::setpgid(0, 0);
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the bench
      if (::getppid() != parent) ::_exit(127);
      ::dup2(in[0], 0);
      ::dup2(out[1], 1);
      ::dup2(err[1], 2);
      ::close_range(3, ~0U, 0);
      ::execvpe(argv[0], argv.data(), envp.data());
      ::dprintf(2, "exec %s: %s\n", argv[0], std::strerror(errno));
      ::_exit(127);
    }
    ::setpgid(pid_, pid_);  // also here, so the group exists before any kill
    ::close(in[0]);
    ::close(out[1]);
    ::close(err[1]);
    in_ = in[1];
    out_ = out[0];
    err_ = err[0];
    for (int fd : {in_, out_, err_}) ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  ~Child() {
    if (pid_ > 0) stop(0ms);
    for (int fd : {in_, out_, err_})
      if (fd >= 0) ::close(fd);
  }

  const std::string& label() const { return label_; }
  pid_t pid() const { return pid_; }
  int in_fd() const { return in_; }
  int out_fd() const { return out_; }
  int err_fd() const { return err_; }
  bool out_open() const { return out_ >= 0; }

  /// Queues `bytes` for stdin; pump() writes them as the pipe takes them.
  void type(std::string_view bytes) { to_write_.append(bytes); }
  bool writing() const { return written_ < to_write_.size(); }
  /// Writes what the pipe takes now; the time the last byte of a line went in is the caller's.
  void write_some() {
    while (in_ >= 0 && written_ < to_write_.size()) {
      ssize_t n = ::write(in_, to_write_.data() + written_, to_write_.size() - written_);
      if (n > 0) {
        written_ += static_cast<std::size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) return;
      throw Failure(label_ + ": writing its stdin: " + std::strerror(errno));
    }
    if (written_ == to_write_.size()) {
      to_write_.clear();
      written_ = 0;
    }
  }
  /// End of input: the client finishes what is in flight and exits (SPEC §4).
  void close_stdin() {
    if (in_ >= 0) ::close(in_);
    in_ = -1;
  }

  /// Reads what `fd` (stdout or stderr) holds; complete stdout lines go to `on_line`.
  /// Returns false at end of file.
  bool read_from(int fd, const std::function<void(std::string_view)>& on_line) {
    std::array<char, 65536> buf{};
    for (;;) {
      ssize_t n = ::read(fd, buf.data(), buf.size());
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) return true;
      if (n <= 0) {
        if (fd == out_) out_ = -1;
        if (fd == err_) err_ = -1;
        ::close(fd);
        return false;
      }
      std::string& partial = fd == out_ ? out_partial_ : err_partial_;
      partial.append(buf.data(), static_cast<std::size_t>(n));
      std::size_t start = 0;
      for (std::size_t nl; (nl = partial.find('\n', start)) != std::string::npos; start = nl + 1) {
        std::string_view line(partial.data() + start, nl - start);
        if (fd == out_) {
          on_line(line);
        } else {
          err_tail_.emplace_back(line);
          if (err_tail_.size() > 8) err_tail_.pop_front();
        }
      }
      partial.erase(0, start);
    }
  }

  /// The last lines the child wrote on stderr.
  std::string tail() const {
    std::string out;
    for (const auto& l : err_tail_) out.append(out.empty() ? "" : " | ").append(l);
    return out.empty() ? "(nothing on stderr)" : out;
  }

  /// Waits up to `grace` for the child to exit by itself, then SIGTERM, then SIGKILL; returns
  /// its wait status (or -1). Stops the whole group.
  int wait_or_stop(std::chrono::milliseconds grace) {
    if (pid_ <= 0) return status_;
    auto deadline = Clock::now() + grace;
    while (Clock::now() < deadline && !reaped()) std::this_thread::sleep_for(2ms);
    return stop(2000ms);
  }

  /// SIGTERM to the group, SIGKILL after `grace`; returns the wait status.
  int stop(std::chrono::milliseconds grace) {
    if (pid_ <= 0) return status_;
    if (!reaped()) {
      ::kill(-pid_, SIGTERM);
      auto deadline = Clock::now() + grace;
      while (Clock::now() < deadline && !reaped()) std::this_thread::sleep_for(2ms);
      if (!reaped()) {
        ::kill(-pid_, SIGKILL);
        int status = 0;
        while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
        }
        status_ = status;
      }
    }
    ::kill(-pid_, SIGKILL);  // anything else left in its group
    pid_ = -1;
    return status_;
  }

 private:
  static void close_pair(int p[2]) {
    ::close(p[0]);
    ::close(p[1]);
  }
  bool reaped() {
    if (status_ != -1) return true;
    int status = 0;
    pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) status_ = status;
    return r == pid_;
  }

  std::string label_;
  pid_t pid_ = -1;
  int status_ = -1;
  int in_ = -1;
  int out_ = -1;
  int err_ = -1;
  std::string to_write_;
  std::size_t written_ = 0;
  std::string out_partial_;
  std::string err_partial_;
  std::deque<std::string> err_tail_;
};

std::string describe_status(int status) {
  if (status == -1) return "still running";
  if (WIFEXITED(status)) return "exit " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("killed by signal ").append(std::to_string(WTERMSIG(status)));
  return "status " + std::to_string(status);
}

// ---------------------------------------------------------------- what the clients show

constexpr std::string_view kWelcome = ">>> [Welcome, You are registered.]";
constexpr std::string_view kTableUpdated = ">>> [Client table updated.]";
constexpr std::string_view kReceipt = ">>> [Message received by bob.]";
constexpr std::string_view kFromAlice = ">>> alice: ";

/// One client's stdout, sorted into what the bench waits for.
struct Screen {
  std::string other;        // the name whose `list` row shows it online
  bool welcome = false;
  std::size_t tables = 0;
  bool other_online = false;
  std::size_t receipts = 0;              // alice: "[Message received by bob.]"
  std::vector<std::string> unexpected;   // any other line, kept for the notes (first 20)
  std::size_t unexpected_count = 0;
  std::map<std::string, std::size_t> kinds;  // every other line, digits masked: how many of each
  std::function<void(std::string_view text)> on_message;  // bob: the text of "alice: <text>"
  std::function<bool(std::string_view line)> on_line;     // first look at every line; true: taken

  void take(std::string_view line) {
    if (on_line && on_line(line)) return;
    if (line == kReceipt) ++receipts;
    else if (line.starts_with(kFromAlice) && on_message) on_message(line.substr(kFromAlice.size()));
    else if (line == kWelcome) welcome = true;
    else if (line == kTableUpdated) ++tables;
    else if (list_row(line)) return;
    else keep(line);
  }

  // `list` prints a header, a row per name ("bob  127.0.0.1:40001  online") and a count.
  bool list_row(std::string_view line) {
    if (line.starts_with("NAME ") || (line.starts_with("(") && line.ends_with(" online)"))) return true;
    std::string_view name = line.substr(0, line.find(' '));
    if (name.size() == line.size()) return false;
    if (name == other && line.ends_with(" online")) other_online = true;
    return name == other || line.ends_with(" online (you)") || line.ends_with(" offline");
  }

  void keep(std::string_view line) {
    if (unexpected_count++ < 20) unexpected.emplace_back(line);
    std::string kind;
    for (char c : line.substr(0, 90)) {
      bool digit = c >= '0' && c <= '9';
      if (!digit) kind.push_back(c);
      else if (kind.empty() || kind.back() != '#') kind.push_back('#');
    }
    ++kinds[kind];
  }
};

/// The server and the two clients, and the one poll loop that reads all their output.
class Session {
 public:
  Session(const Options& o, const fs::path& root) : opts_(o), root_(root) {}

  /// Polls every pipe until `done()` holds; throws at `deadline`, on SIGINT, or if a client exits.
  void pump_until(const std::function<bool()>& done, Clock::time_point deadline, const std::string& what) {
    if (!pump_while_not(done, deadline)) throw Failure("timed out waiting for " + what + status());
  }

  /// Polls every pipe until `done()` holds (true) or `until` passes (false).
  bool pump_while_not(const std::function<bool()>& done, Clock::time_point until) {
    while (!done()) {
      if (g_interrupted) throw Failure("interrupted");
      auto now = Clock::now();
      if (now >= until) return false;
      pump(std::min<Clock::duration>(until - now, 100ms));
    }
    return true;
  }

  /// One poll over every pipe (at most `wait`), then reads and writes what is ready.
  void pump(Clock::duration wait) {
    std::vector<pollfd> fds;
    std::vector<Child*> owner;
    for (Child* c : children()) {
      for (int fd : {c->out_fd(), c->err_fd()})
        if (fd >= 0) {
          fds.push_back({fd, POLLIN, 0});
          owner.push_back(c);
        }
      if (c->writing() && c->in_fd() >= 0) {
        fds.push_back({c->in_fd(), POLLOUT, 0});
        owner.push_back(c);
      }
    }
    int ms = static_cast<int>(std::chrono::ceil<std::chrono::milliseconds>(wait).count());
    int ready = ::poll(fds.data(), fds.size(), std::max(ms, 0));
    if (ready < 0 && errno != EINTR) throw Failure(errno_text("poll"));
    if (ready <= 0) return;
    for (std::size_t i = 0; i < fds.size(); ++i) {
      if (fds[i].revents == 0) continue;
      Child* c = owner[i];
      if (fds[i].events == POLLOUT) {
        c->write_some();
        continue;
      }
      Screen* s = c == alice_.get() ? &alice_screen : c == bob_.get() ? &bob_screen : nullptr;
      bool open = c->read_from(fds[i].fd, [&](std::string_view line) {
        if (s != nullptr) s->take(line);
      });
      if (!open && fds[i].fd != c->err_fd() && s != nullptr && !closing_)
        throw Failure(c->label() + " closed its stdout (exited?): " + c->tail());
    }
  }

  void start_server() {
    fs::path data = root_ / "server";
    fs::create_directory(data);
    for (int attempt = 0; attempt < 3; ++attempt) {
      server_port_ = free_udp_port();
      server_ = std::make_unique<Child>(
          "the server",
          std::vector<std::string>{opts_.bin, "-s", std::to_string(server_port_), "--data-dir", data.string(),
                                   "--bind", "127.0.0.1"},
          std::vector<std::string>{});
      server_->close_stdin();
      if (wait_listening()) {
        note("server pid " + std::to_string(server_->pid()) + " on 127.0.0.1:" + std::to_string(server_port_));
        return;
      }
      std::string why = server_->tail();
      server_.reset();
      if (attempt == 2) throw Failure("the server did not start: " + why);
    }
  }

  /// Starts client `name` with its own fresh XDG_DATA_HOME (identity key and peer state) and
  /// waits for its welcome and its first table.
  void start_client(const std::string& name, const std::string& other) {
    fs::path home = root_ / name;
    fs::create_directory(home);
    std::vector<std::string> env{"XDG_DATA_HOME=" + (home / "data").string(),
                                 "XDG_STATE_HOME=" + (home / "state").string(),
                                 "XDG_DOWNLOAD_DIR=" + (home / "downloads").string(), "NO_COLOR=1"};
    Screen& screen = name == "alice" ? alice_screen : bob_screen;
    screen.other = other;
    std::unique_ptr<Child>& slot = name == "alice" ? alice_ : bob_;
    for (int attempt = 0; attempt < 3 && !slot; ++attempt) {
      std::uint16_t port = free_udp_port();
      std::vector<std::string> args = name == "bob" ? opts_.wrap_bob : std::vector<std::string>{};
      for (std::string a : {opts_.bin, std::string("-c"), name, std::string("127.0.0.1"),
                            std::to_string(server_port_), std::to_string(port)})
        args.push_back(std::move(a));
      slot = std::make_unique<Child>(name, std::move(args), env);
      try {
        pump_until([&] { return screen.welcome && screen.tables > 0; }, Clock::now() + opts_.start_timeout,
                   name + "'s welcome and table");
        note(name + " pid " + std::to_string(slot->pid()) + " on 127.0.0.1:" + std::to_string(port) +
             ", XDG_DATA_HOME " + (home / "data").string());
      } catch (const Failure& e) {
        if (attempt == 2) throw;
        note(name + " did not start (" + e.what() + "), trying another port");
        slot.reset();
        screen = Screen{};
        screen.other = other;
      }
    }
  }

  /// Until each client's `list` shows the other online (the table update may come after the welcome).
  void wait_for_each_other() {
    auto deadline = Clock::now() + opts_.start_timeout;
    while (!(alice_screen.other_online && bob_screen.other_online)) {
      if (!alice_screen.other_online) alice_->type("list\n");
      if (!bob_screen.other_online) bob_->type("list\n");
      auto next = std::min(deadline, Clock::now() + 200ms);
      if (!pump_while_not([&] { return alice_screen.other_online && bob_screen.other_online; }, next) &&
          Clock::now() >= deadline)
        throw Failure("timed out waiting for alice and bob to list each other" + status());
    }
  }

  /// End of input to both clients: each must finish what is in flight and exit 0 (SPEC §4).
  void finish() {
    closing_ = true;
    alice_->close_stdin();
    bob_->close_stdin();
    auto deadline = Clock::now() + 10s;
    pump_until([&] { return !alice_->out_open() && !bob_->out_open(); }, deadline, "both clients to end on EOF");
    for (Child* c : {alice_.get(), bob_.get()}) {
      int status = c->wait_or_stop(5000ms);
      if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0))
        throw Failure(c->label() + " did not exit cleanly at end of input (" + describe_status(status) +
                      "): " + c->tail());
    }
    int status = server_->stop(10000ms);
    if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0))
      throw Failure("the server did not exit cleanly on SIGTERM (" + describe_status(status) + "): " + server_->tail());
  }

  Child& alice() { return *alice_; }
  Child& bob() { return *bob_; }
  Screen alice_screen;
  Screen bob_screen;

 private:
  std::vector<Child*> children() {
    std::vector<Child*> out;
    for (auto* c : {server_.get(), alice_.get(), bob_.get()})
      if (c != nullptr) out.push_back(c);
    return out;
  }

  bool wait_listening() {
    auto deadline = Clock::now() + opts_.start_timeout;
    bool listening = false;
    while (!listening && Clock::now() < deadline && server_->err_fd() >= 0) {
      pollfd p{server_->err_fd(), POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      server_->read_from(server_->err_fd(), [](std::string_view) {});
      listening = server_->tail().find("server listening") != std::string::npos;
    }
    return listening;
  }

  std::string status() const {
    std::string s = " (alice: welcome " + std::to_string(alice_screen.welcome) + ", " +
                    std::to_string(alice_screen.receipts) + " receipts, " +
                    std::to_string(alice_screen.unexpected_count) + " other lines";
    if (!alice_screen.unexpected.empty()) s.append(", last: ").append(alice_screen.unexpected.back());
    s.append("; bob: welcome ").append(std::to_string(bob_screen.welcome));
    s.append(", ").append(std::to_string(bob_screen.unexpected_count)).append(" other lines)");
    if (alice_) s.append("; alice stderr: ").append(alice_->tail());
    if (bob_) s.append("; bob stderr: ").append(bob_->tail());
    return s;
  }

  const Options& opts_;
  fs::path root_;
  std::uint16_t server_port_ = 0;
  std::unique_ptr<Child> server_;
  std::unique_ptr<Child> alice_;
  std::unique_ptr<Child> bob_;
  bool closing_ = false;
};

// ---------------------------------------------------------------- the baseline: raw UDP, two processes

/// A forked child that answers every datagram on its socket with `reply` (blocking socket, no
/// event loop, no codec, no crypto); SIGKILLed and reaped by the destructor.
class EchoProcess {
 public:
  EchoProcess(std::size_t request_size, std::size_t reply_size)
      : request_(request_size, 'q'), reply_(reply_size, 'r') {
    mine_ = open_socket();
    int theirs = open_socket();
    peer_ = address_of(theirs);
    pid_t parent = ::getpid();
    pid_ = ::fork();
    if (pid_ < 0) {
      ::close(theirs);
      ::close(mine_);
      throw Failure(errno_text("fork"));
    }
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(127);
      timeval tv{10, 0};  // bounded: idle for 10 s, it ends by itself
      ::setsockopt(theirs, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      std::array<char, 2048> buf{};
      for (;;) {
        sockaddr_in from{};
        socklen_t len = sizeof from;
        ssize_t n = ::recvfrom(theirs, buf.data(), buf.size(), 0, reinterpret_cast<sockaddr*>(&from), &len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) ::_exit(n == 0 ? 0 : 1);
        ::sendto(theirs, reply_.data(), reply_.size(), 0, reinterpret_cast<sockaddr*>(&from), len);
      }
    }
    ::close(theirs);
  }
  EchoProcess(const EchoProcess&) = delete;
  EchoProcess& operator=(const EchoProcess&) = delete;
  ~EchoProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      while (::waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
      }
    }
    ::close(mine_);
  }

  void send() {
    if (::sendto(mine_, request_.data(), request_.size(), 0, reinterpret_cast<const sockaddr*>(&peer_),
                 sizeof peer_) != static_cast<ssize_t>(request_.size()))
      throw Failure(errno_text("baseline sendto"));
  }
  void receive() {
    std::array<char, 2048> buf{};
    for (;;) {
      ssize_t n = ::recv(mine_, buf.data(), buf.size(), 0);
      if (n == static_cast<ssize_t>(reply_.size())) return;
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) throw Failure(errno_text("baseline recv (a datagram lost?)"));
      throw Failure("baseline: an answer of " + std::to_string(n) + " bytes");
    }
  }

 private:
  static int open_socket() {
    int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) throw Failure(errno_text("socket"));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
      ::close(fd);
      throw Failure(errno_text("bind"));
    }
    timeval tv{1, 0};  // bounded: a lost datagram fails the baseline instead of hanging
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int size = 4 << 20;  // the buffers the product's Endpoint asks for
    if (::setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) != 0)
      ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    return fd;
  }
  static sockaddr_in address_of(int fd) {
    sockaddr_in a{};
    socklen_t len = sizeof a;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    return a;
  }

  std::string request_;
  std::string reply_;
  int mine_ = -1;
  sockaddr_in peer_{};
  pid_t pid_ = -1;
};

/// `n` datagrams through `echo` with up to kBaselineWindow outstanding, each answered: per second.
double windowed_rate(EchoProcess& echo, std::size_t n) {
  auto start = Clock::now();
  std::size_t sent = 0, answered = 0;
  while (answered < n) {
    while (sent < n && sent - answered < kBaselineWindow) {
      echo.send();
      ++sent;
    }
    echo.receive();
    ++answered;
  }
  return static_cast<double>(n) / std::chrono::duration<double>(Clock::now() - start).count();
}

struct Baseline {
  double p50 = 0;
  double p99 = 0;
  double per_s = 0;
};

/// Ping-pong of N (after kWarm) datagrams of the sealed direct's size answered with the sealed
/// receipt's size; then N more sent with up to kBaselineWindow outstanding, each answered.
Baseline run_baseline(std::size_t n, std::size_t request_size, std::size_t reply_size) {
  EchoProcess echo(request_size, reply_size);
  std::vector<double> rtt;
  rtt.reserve(n);
  for (std::size_t i = 0; i < kWarm + n; ++i) {
    auto t = Clock::now();
    echo.send();
    echo.receive();
    if (i >= kWarm) rtt.push_back(us(Clock::now() - t));
  }
  Baseline b;
  b.p50 = percentile(rtt, 50);
  b.p99 = percentile(rtt, 99);
  b.per_s = windowed_rate(echo, n);
  return b;
}

// ---------------------------------------------------------------- the scenario

/// Wire sizes of one sealed direct message of kTextSize characters from alice to bob, and of its receipt.
std::pair<std::size_t, std::size_t> sealed_sizes() {
  namespace ident = chat::identity;
  namespace proto = chat::protocol;
  ident::Seed sa{}, sb{};
  sa[0] = 'a';
  sb[0] = 'b';
  ident::Identity a = ident::Identity::from_seed(sa), b = ident::Identity::from_seed(sb);
  ident::Pair ab(a, b.public_key()), ba(b, a.public_key());
  const std::uint64_t mid = 0x1234567890abcdefull;
  const std::uint64_t sent_ms = 1'700'000'000'000ull;
  std::string req = proto::encode(proto::Direct{mid, "alice", ident::seal_direct(ab, mid, sent_ms, "bob",
                                                                                message_text('L', 1))});
  std::string rep = proto::encode(proto::Receipt{mid, ident::seal_receipt(ba, mid, "alice")});
  return {req.size(), rep.size()};
}

std::string send_line(char phase, std::size_t seq) {
  std::string line = "send bob ";
  line.append(message_text(phase, seq)).push_back('\n');
  return line;
}

/// `text` without the "YYYY-MM-DD HH:MM:SS " a saved message is shown with (SPEC §5), if it has one.
std::optional<std::string_view> strip_timestamp(std::string_view text) {
  constexpr std::string_view shape = "####-##-## ##:##:## ";
  if (text.size() < shape.size()) return std::nullopt;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    bool digit = text[i] >= '0' && text[i] <= '9';
    if (shape[i] == '#' ? !digit : text[i] != shape[i]) return std::nullopt;
  }
  return text.substr(shape.size());
}

/// Every line of both screens that was neither awaited nor counted, by kind.
void note_screens(const Session& s) {
  for (const Screen* sc : {&s.alice_screen, &s.bob_screen})
    for (const auto& [kind, count] : sc->kinds)
      note(std::string(sc == &s.alice_screen ? "alice" : "bob") + " showed " + std::to_string(count) + " x " + kind);
}

/// Sends kWarm + n messages one at a time; the time from each line's write into alice's stdin
/// until bob's stdout shows it, in µs, for the last n.
std::vector<double> measure_latency(Session& s, std::size_t n) {
  char phase = 'W';
  std::size_t want = 0;
  bool shown = false;
  std::size_t garbled = 0;
  Clock::time_point shown_at{};
  s.bob_screen.on_message = [&](std::string_view text) {
    auto seq = parse_text(text, phase);
    if (!seq || *seq != want || shown) {
      ++garbled;
      s.bob_screen.keep(std::string(kFromAlice).append(text));
      return;
    }
    shown = true;
    shown_at = Clock::now();
  };
  const std::size_t receipts_before = s.alice_screen.receipts;
  std::vector<double> latency;
  latency.reserve(n);
  for (std::size_t i = 0; i < kWarm + n; ++i) {
    phase = i < kWarm ? 'W' : 'L';
    want = i < kWarm ? i : i - kWarm;
    shown = false;
    s.alice().type(send_line(phase, want));
    auto t0 = Clock::now();
    s.alice().write_some();
    s.pump_until([&] { return shown; }, t0 + 10s, "bob to show message " + std::string(1, phase) + std::to_string(want));
    if (i >= kWarm) latency.push_back(us(shown_at - t0));
  }
  s.pump_until([&] { return s.alice_screen.receipts - receipts_before >= kWarm + n; }, Clock::now() + 10s,
               "alice's receipts of the latency run");
  s.bob_screen.on_message = nullptr;
  if (garbled != 0) throw Failure("bob showed " + std::to_string(garbled) + " unexpected messages in the latency run");
  if (s.alice_screen.receipts - receipts_before != kWarm + n)
    throw Failure("alice showed " + std::to_string(s.alice_screen.receipts - receipts_before) + " receipts for " +
                  std::to_string(kWarm + n) + " messages in the latency run");
  return latency;
}

/// Types n messages into alice, at most `window` ahead of her receipts (0: all at once); the
/// seconds from the first write until bob has shown the last. Each must be shown exactly once.
double measure_throughput(Session& s, std::size_t n, std::size_t window) {
  std::vector<std::uint8_t> count(n, 0);
  std::size_t distinct = 0, dup = 0, garbled = 0, via_server = 0;
  Clock::time_point last_at{};
  s.bob_screen.on_message = [&](std::string_view text) {
    // One that went through the server is shown with its timestamp: still shown, but counted.
    auto bare = strip_timestamp(text);
    auto seq = parse_text(bare.value_or(text), 'T');
    if (!seq || *seq >= n) {
      ++garbled;
      s.bob_screen.keep(std::string(kFromAlice).append(text));
      return;
    }
    if (bare) ++via_server;
    if (count[*seq]++ != 0) {
      ++dup;
      return;
    }
    if (++distinct == n) last_at = Clock::now();
  };
  const std::size_t receipts_before = s.alice_screen.receipts;
  auto receipts = [&] { return s.alice_screen.receipts - receipts_before; };
  auto progress = [&] { return distinct + dup + garbled + s.alice_screen.receipts + s.alice_screen.unexpected_count; };
  std::size_t typed = 0;
  auto type_more = [&] {
    std::size_t limit = window == 0 ? n : std::min(n, receipts() + window);
    std::string lines;
    for (; typed < limit; ++typed) lines.append(send_line('T', typed));
    if (lines.empty()) return;
    s.alice().type(lines);
    s.alice().write_some();
  };
  auto t0 = Clock::now();
  // Bounded twice: by a deadline of 60 s plus 10 ms a message, and by 10 s without any line shown.
  const auto deadline = t0 + 60s + std::chrono::milliseconds(10 * static_cast<long>(n));
  auto missing = [&] {
    auto first = static_cast<std::size_t>(std::find(count.begin(), count.end(), 0) - count.begin());
    return "; bob showed " + std::to_string(distinct) + " of " + std::to_string(n) + " (first missing T" +
           std::to_string(first) + "), " + std::to_string(via_server) + " through the server, alice " +
           std::to_string(receipts()) + " receipts";
  };
  while (distinct < n) {
    type_more();
    std::size_t before = progress();
    auto until = std::min(deadline, Clock::now() + 10s);
    if (!s.pump_while_not([&] { return distinct == n || progress() != before; }, until))
      throw Failure(std::string(Clock::now() >= deadline ? "timed out" : "10 s without progress") +
                    " in the throughput run" + missing());
  }
  const double secs = std::chrono::duration<double>(last_at - t0).count();
  // Every receipt, then a quiet moment in which a late duplicate would show.
  s.pump_until([&] { return receipts() >= n; }, Clock::now() + 20s, "alice's receipts of the throughput run");
  auto quiet = Clock::now() + 300ms;
  s.pump_while_not([] { return false; }, quiet);
  if (dup != 0 || garbled != 0 || via_server != 0)
    throw Failure("bob showed " + std::to_string(dup) + " duplicates, " + std::to_string(garbled) +
                  " unexpected messages and " + std::to_string(via_server) + " that went through the server" +
                  missing());
  if (receipts() != n)
    throw Failure("alice showed " + std::to_string(receipts()) + " receipts for " + std::to_string(n) + " messages");
  s.bob_screen.on_message = nullptr;
  return secs;
}

bool run(const Options& o) {
  const std::size_t n = o.n != 0 ? o.n : (o.quick ? 1000 : 10000);
  std::unique_ptr<TempDir> root;
  std::unique_ptr<Session> s;  // destroyed first: its processes go before their directory
  try {
    auto [req_size, rep_size] = sealed_sizes();
    note("sealed direct datagram " + std::to_string(req_size) + " B, its receipt " + std::to_string(rep_size) +
         " B (text " + std::to_string(kTextSize) + " characters)");
    root = std::make_unique<TempDir>(o.tmp, "bench-product");
    s = std::make_unique<Session>(o, root->path());
    s->start_server();
    s->start_client("alice", "bob");
    s->start_client("bob", "alice");
    s->wait_for_each_other();
    if (s->alice_screen.unexpected_count + s->bob_screen.unexpected_count != 0) {
      note_screens(*s);
      throw Failure("unexpected lines at start-up (above)");
    }

    std::vector<double> latency = measure_latency(*s, n);
    const std::size_t window = o.window.value_or(std::min(n, kWindow));
    if (window != 0 && window < n)
      note("throughput: at most " + std::to_string(window) + " messages typed ahead of alice's receipts" +
           " (--window 0 types all at once)");
    const double secs = measure_throughput(*s, n, window);
    s->finish();
    if (s->alice_screen.unexpected_count + s->bob_screen.unexpected_count != 0) {
      note_screens(*s);
      throw Failure("unexpected lines (above)");
    }
    s.reset();

    Baseline base = run_baseline(n, req_size, rep_size);
    const double p50 = percentile(latency, 50), p99 = percentile(latency, 99);
    const double per_s = static_cast<double>(n) / secs;
    emit(n, "latency_p50", p50, "us");
    emit(n, "latency_p99", p99, "us");
    emit(n, "throughput_per_s", per_s, "1/s", 0);
    emit(n, "throughput_window", static_cast<double>(window == 0 ? n : window), "count", 0);
    emit(n, "baseline_latency_p50", base.p50, "us");
    emit(n, "baseline_latency_p99", base.p99, "us");
    emit(n, "baseline_throughput_per_s", base.per_s, "1/s", 0);
    emit(n, "latency_p50_vs_baseline", p50 / base.p50, "x", 2);
    emit(n, "latency_p99_vs_baseline", p99 / base.p99, "x", 2);
    emit(n, "baseline_vs_throughput", base.per_s / per_s, "x", 2);
    return true;
  } catch (const std::exception& e) {
    if (s) note_screens(*s);
    emit_error(n, e.what());
    return false;
  }
}

// ---------------------------------------------------------------- --files: a file transfer

/// Writes `bytes` pseudo-random bytes (not compressible, not all alike) to `path`.
void write_file(const fs::path& path, std::uint64_t bytes) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) throw Failure(errno_text("fopen"));
  std::vector<std::uint64_t> block(1 << 16);
  std::uint64_t x = 0x9E3779B97F4A7C15ull;
  for (std::uint64_t done = 0; done < bytes;) {
    for (auto& w : block) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;  // xorshift64
      w = x;
    }
    const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(bytes - done, block.size() * 8));
    if (std::fwrite(block.data(), 1, n, f) != n) {
      std::fclose(f);
      throw Failure(errno_text("fwrite"));
    }
    done += n;
  }
  if (std::fclose(f) != 0) throw Failure(errno_text("fclose"));
}

/// Chat round trips, one message at a time: from the line written into alice's stdin to her
/// "[Message received by bob.]", in µs. Stops after `n`, or (when `until` is set) as soon as
/// `until()` holds (a message in flight then is not counted).
std::vector<double> round_trips(Session& s, std::size_t n, const std::function<bool()>& until, char phase) {
  std::vector<double> rtt;
  for (std::size_t i = 0; i < n; ++i) {
    if (until && until()) break;
    const std::size_t before = s.alice_screen.receipts;
    s.alice().type(send_line(phase, i));
    auto t0 = Clock::now();
    s.alice().write_some();
    s.pump_until([&] { return s.alice_screen.receipts > before; }, t0 + 10s,
                 std::string("alice's receipt of message ").append(1, phase).append(std::to_string(i)));
    if (until && until()) break;
    rtt.push_back(us(Clock::now() - t0));
  }
  return rtt;
}

/// What a file transfer shows: bob's offer, bob's saved line, alice's sent line.
struct FileLines {
  bool offered = false;
  bool saved = false;
  bool sent = false;
  Clock::time_point saved_at{};
  std::string failed;  // a line that says it did not work
};

/// alice offers `path` (its name `name`), bob accepts; returns the seconds from bob's accept
/// to his saved line. With `during`, chat round trips are measured while it runs.
double transfer(Session& s, const fs::path& path, const std::string& name, std::uint64_t bytes,
                std::vector<double>* during) {
  FileLines f;
  const std::string offer = std::string(">>> [alice offers ").append(name).append(" (");
  const std::string saved = std::string(">>> [File ").append(name).append(" from alice saved to ");
  const std::string sent = std::string(">>> [File ").append(name).append(" sent to bob.]");
  const std::string progress = std::string(">>> [").append(name).append("  ");
  s.bob_screen.on_line = [&](std::string_view line) {
    if (line.starts_with(offer)) return f.offered = true;
    if (line.starts_with(saved)) {
      f.saved_at = Clock::now();
      return f.saved = true;
    }
    if (line.starts_with(progress) || line.starts_with(">>> [Receiving ")) return true;
    if (line.find(name) != std::string_view::npos) f.failed = std::string(line);
    return false;
  };
  s.alice_screen.on_line = [&](std::string_view line) {
    if (line == sent) return f.sent = true;
    if (line.starts_with(">>> [Offering ") || line.starts_with(progress)) return true;
    if (line.find(name) != std::string_view::npos) f.failed = std::string(line);
    return false;
  };
  s.alice().type(std::string("sendfile bob ").append(path.string()).append("\n"));
  s.alice().write_some();
  s.pump_until([&] { return f.offered || !f.failed.empty(); }, Clock::now() + 60s, "bob to see the offer");
  s.bob().type("accept alice\n");
  const auto t0 = Clock::now();
  s.bob().write_some();
  // Bounded: 60 s plus 10 s per MiB (a path at 20 % loss moves a few hundred KiB/s).
  const auto deadline = t0 + 60s + std::chrono::seconds(10 * (bytes >> 20));
  if (during != nullptr) *during = round_trips(s, 1'000'000, [&] { return f.saved || !f.failed.empty(); }, 'D');
  s.pump_until([&] { return (f.saved && f.sent) || !f.failed.empty(); }, deadline, name + " to be saved and confirmed");
  if (!f.failed.empty()) throw Failure(std::string("the transfer of ").append(name).append(" failed: ").append(f.failed));
  s.alice_screen.on_line = nullptr;
  s.bob_screen.on_line = nullptr;
  return std::chrono::duration<double>(f.saved_at - t0).count();
}

/// Raw UDP, two processes: `n` datagrams of 1472 bytes (a full file chunk), each answered
/// with 35 bytes (an ack with no ranges), at most kBaselineWindow outstanding; datagrams per second.
double raw_stream(std::size_t n) {
  EchoProcess echo(1472, 35);
  for (std::size_t i = 0; i < kWarm; ++i) {
    echo.send();
    echo.receive();
  }
  return windowed_rate(echo, n);
}

bool run_files(const Options& o) {
  const std::uint64_t mib = o.file_mib != 0 ? o.file_mib : (o.quick ? 20 : 100);
  const std::uint64_t bytes = mib << 20;
  const std::size_t n_chat = o.quick ? 200 : 2000;
  std::unique_ptr<TempDir> root;
  std::unique_ptr<Session> s;
  try {
    root = std::make_unique<TempDir>(o.tmp, "bench-files");
    const fs::path file = root->path() / "file.bin";
    write_file(file, bytes);
    s = std::make_unique<Session>(o, root->path());
    s->start_server();
    s->start_client("alice", "bob");
    s->start_client("bob", "alice");
    s->wait_for_each_other();
    std::vector<double> idle, during;
    double during_secs = 0;
    if (!o.no_chat) idle = round_trips(*s, n_chat, nullptr, 'I');
    const double secs = transfer(*s, file, "file.bin", bytes, nullptr);
    fs::path got = root->path() / "bob" / "downloads" / "file.bin";
    std::error_code ec;
    if (fs::file_size(got, ec) != bytes) throw Failure(std::string("bob's file.bin is not ").append(std::to_string(bytes)).append(" bytes"));
    if (!o.no_chat) {
      // The same file again (saved as "file (1).bin"), chat round trips while it moves.
      during_secs = transfer(*s, file, "file.bin", bytes, &during);
      if (during.size() < 10) throw Failure(std::string("only ").append(std::to_string(during.size())).append(" round trips during the transfer"));
    }
    s->finish();
    s.reset();
    const std::string l = o.label;
    const double mib_s = static_cast<double>(bytes) / (1 << 20) / secs;
    emit(mib, std::string("file_mib_per_s").append(l), mib_s, "MiB/s", 1);
    emit(mib, std::string("file_seconds").append(l), secs, "s", 3);
    if (!o.no_chat) {
      const double raw = raw_stream(static_cast<std::size_t>(bytes / 1438 + 1));
      const double raw_mib_s = raw * 1472 / (1 << 20);
      emit(mib, "baseline_udp_mib_per_s", raw_mib_s, "MiB/s", 1);
      emit(mib, "file_vs_baseline_udp", mib_s / raw_mib_s, "x", 2);
      emit(n_chat, "chat_rtt_p50_idle", percentile(idle, 50), "us");
      emit(n_chat, "chat_rtt_p99_idle", percentile(idle, 99), "us");
      emit(mib, "file_seconds_with_chat", during_secs, "s", 3);
      emit(during.size(), "chat_rtt_p50_during_transfer", percentile(during, 50), "us");
      emit(during.size(), "chat_rtt_p99_during_transfer", percentile(during, 99), "us");
      emit(during.size(), "chat_rtt_p99_during_vs_idle", percentile(during, 99) / percentile(idle, 99), "x", 2);
    }
    return true;
  } catch (const std::exception& e) {
    if (s) note_screens(*s);
    emit_error(mib, e.what());
    return false;
  }
}

void usage(FILE* out) {
  std::fprintf(out,
               "usage: bench_product [--quick] [--n N] [--window W] [--bin path/to/ChatApp] [--tmp dir] [--start-timeout s]\n"
               "                     [--wrap-bob 'cmd args']  (bob's client runs under cmd, e.g. valgrind)\n"
               "       bench_product --files [--quick] [--mib M] [--no-chat] [--label L] [--bin ...] [--tmp dir]\n"
               "                     (a file of M MiB, default 100, from alice to bob beside raw UDP; chat round trips\n"
               "                     with and without a transfer; --no-chat: the transfer alone)\n");
}

}  // namespace

int main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);
  ::signal(SIGINT, [](int) { g_interrupted = 1; });
  ::signal(SIGTERM, [](int) { g_interrupted = 1; });
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
      else if (a == "--n") o.n = std::stoul(value());
      else if (a == "--window") o.window = std::stoul(value());
      else if (a == "--wrap-bob") {
        std::stringstream in(value());
        for (std::string w; in >> w;) o.wrap_bob.push_back(w);
      }
      else if (a == "--start-timeout") o.start_timeout = std::chrono::seconds(std::stol(value()));
      else if (a == "--files") o.files = true;
      else if (a == "--mib") o.file_mib = std::stoull(value());
      else if (a == "--no-chat") o.no_chat = true;
      else if (a == "--label") o.label = value();
      else if (a == "-h" || a == "--help") {
        usage(stdout);
        return 0;
      } else throw std::invalid_argument("unknown argument " + std::string(a));
    }
    if (o.n > 999999) throw std::invalid_argument("--n is at most 999999");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_product: %s\n", e.what());
    usage(stderr);
    return 2;
  }
  if (o.bin.empty()) {
    std::error_code ec;
    o.bin = (fs::read_symlink("/proc/self/exe", ec).parent_path().parent_path() / "ChatApp").string();
  }
  if (::access(o.bin.c_str(), X_OK) != 0) {
    std::fprintf(stderr, "bench_product: no ChatApp binary at %s (use --bin)\n", o.bin.c_str());
    return 2;
  }
  if (o.files) {
    kBench = "files";
    return run_files(o) ? 0 : 1;
  }
  return run(o) ? 0 : 1;
}
