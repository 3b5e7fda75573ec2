// ChatApp's entry point: parse the command line, build the server or the peer, run the loop.
#include <malloc.h>
#include <unistd.h>
#include <signal.h>

#include <cmath>
#include <algorithm>
#include <array>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include <boost/program_options.hpp>
#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include "identity/identity.hpp"
#include "identity/peer_state.hpp"
#include "offline/async_store.hpp"
#include "offline/pg_store.hpp"
#include "metrics/metrics.hpp"
#include "offline/store.hpp"
#include "peer/app.hpp"
#include "protocol/codec.hpp"
#include "registry/server.hpp"

namespace po = boost::program_options;

namespace {

constexpr const char* kUsage =
    "usage: ChatApp -s <port> [options]\n"
    "       ChatApp -c <name> <server-ip> <server-port> <client-port> [options]\n"
    "       ChatApp --data-dir <dir> --release-name <name>\n"
    "       ChatApp --help | --version";

// A bad command line: one line naming what is wrong, then the usage, exit 2.
struct UsageError {
  std::string what;
};

struct Config {
  bool server = false;
  std::uint16_t port = 0;  // server: its port; client: its own port
  std::string name;
  std::string server_ip;
  std::uint16_t server_port = 0;
  std::string bind = "0.0.0.0";
  std::string data_dir = "data";
  std::string store;  // server: --store as given (empty: SQLite in data_dir)
  std::string pg_uri;  // server: the PostgreSQL store's URI, if --store names one
  std::vector<chat::udp::endpoint> fallbacks;  // client: more servers, in order
  chat::transport::RetryPolicy policy;
  bool verbose = false;
  std::string log_file;
  double rate_limit = 2000;
  long long max_stored = 100'000;
  long long max_clients = 100'000;
  std::string max_file_size = "16M";  // server: the largest file kept for an offline recipient
  std::string file_quota = "64M";     // server: bytes of files kept per recipient at most
  double file_days = 7;               // server: how long a file nobody downloads is kept
  double keepalive_s = 15;
  std::string identity;      // client: the key file (empty: the default path for the name)
  std::string download_dir;  // client: where received files go (empty: default_download_dir())
  std::string release_name;  // operator: the name to release, then exit
  std::uint16_t metrics_port = 0;  // server: serve Prometheus metrics over HTTP on it (0: not)
};

/// A size in bytes: digits, optionally followed by K, M or G (KiB, MiB, GiB).
std::uint64_t parse_size(const std::string& s, const char* what) {
  std::size_t digits = s.find_first_not_of("0123456789");
  std::uint64_t unit = 1;
  if (digits != std::string::npos && digits + 1 == s.size()) {
    switch (s.back()) {
      case 'K': unit = 1ull << 10; break;
      case 'M': unit = 1ull << 20; break;
      case 'G': unit = 1ull << 30; break;
      default: unit = 0;
    }
  } else if (digits != std::string::npos) {
    unit = 0;
  }
  const std::string number = s.substr(0, digits);
  if (unit == 0 || number.empty() || number.size() > 6 || std::stoull(number) == 0)
    throw UsageError{std::string("invalid ") + what + " '" + s + "': must be 1-999999, optionally followed by K, M or G"};
  return std::stoull(number) * unit;
}

std::uint16_t parse_port(const std::string& s, const char* what, long min = 1024) {
  bool digits = !s.empty() && s.size() <= 5 && s.find_first_not_of("0123456789") == std::string::npos;
  long v = digits ? std::stol(s) : -1;
  if (v < min || v > 65535)
    throw UsageError{std::string("invalid ") + what + " '" + s + "': must be an integer in " +
                     std::to_string(min) + "-65535"};
  return static_cast<std::uint16_t>(v);
}

/// --store: SQLite in a directory, or a PostgreSQL URI.
void parse_store(Config& c) {
  if (c.store.empty()) return;
  if (c.store.starts_with("sqlite:") && c.store.size() > 7) {
    c.data_dir = c.store.substr(7);
    return;
  }
  if (c.store.starts_with("postgresql://") || c.store.starts_with("postgres://")) {
    c.pg_uri = c.store;
    return;
  }
  throw UsageError{std::string("invalid --store '").append(c.store).append(
      "': must be sqlite:<dir> or postgresql://user@host:port/db")};
}

/// --fallback <ip:port>.
chat::udp::endpoint parse_fallback(const std::string& s) {
  auto colon = s.rfind(':');
  std::string ip = colon == std::string::npos ? s : s.substr(0, colon);
  if (colon == std::string::npos || !chat::protocol::valid_ipv4(ip))
    throw UsageError{std::string("invalid --fallback '").append(s).append(
        "': must be <ip:port>, a dotted-decimal IPv4 address and a port, e.g. 198.123.75.45:5000")};
  return {chat::net::ip::make_address_v4(ip), parse_port(s.substr(colon + 1), "--fallback port")};
}

po::options_description visible_options(Config& c, long& timeout_ms) {
  po::options_description o("options");
  o.add_options()
      ("help,h", "show this help and exit")
      ("version", "show the version and exit")
      ("server,s", po::value<std::string>()->value_name("port"), "run the registry server on <port>")
      ("client,c", po::bool_switch(), "run a peer: -c <name> <server-ip> <server-port> <client-port>")
      ("ack-timeout", po::value<long>(&timeout_ms)->default_value(500)->value_name("ms"),
       "wait this long for an ACK before resending")
      ("retries", po::value<int>(&c.policy.retries)->default_value(5)->value_name("n"),
       "resend this many times before giving up")
      ("data-dir", po::value<std::string>(&c.data_dir)->default_value("data")->value_name("dir"),
       "server: where saved messages and the client table live")
      ("store", po::value<std::string>(&c.store)->value_name("uri"),
       "server: sqlite:<dir> (the default: SQLite in --data-dir) or postgresql://user@host:port/db, "
       "one database several servers share")
      ("fallback", po::value<std::vector<std::string>>()->composing()->value_name("ip:port"),
       "client: another server sharing the store, used when the server stops answering (repeatable)")
      ("bind", po::value<std::string>(&c.bind)->default_value("0.0.0.0")->value_name("ipv4"),
       "local address to bind")
      ("rate-limit", po::value<double>(&c.rate_limit)->default_value(2000)->value_name("n"),
       "server: datagrams per second accepted from one address (0: no limit)")
      ("max-stored", po::value<long long>(&c.max_stored)->default_value(100'000)->value_name("n"),
       "server: saved messages kept per recipient at most")
      ("max-clients", po::value<long long>(&c.max_clients)->default_value(100'000)->value_name("n"),
       "server: registered names at most")
      ("max-file-size", po::value<std::string>(&c.max_file_size)->default_value("16M")->value_name("size"),
       "server: the largest file kept for an offline recipient (bytes, or with K, M, G)")
      ("file-quota", po::value<std::string>(&c.file_quota)->default_value("64M")->value_name("size"),
       "server: bytes of files kept for one recipient at most")
      ("file-days", po::value<double>(&c.file_days)->default_value(7)->value_name("days"),
       "server: how long a file nobody downloads is kept (fractions too; checked hourly, or every <days> if shorter)")
      ("metrics", po::value<std::string>()->value_name("port"),
       "server: serve Prometheus text metrics at http://<bind>:<port>/metrics (TCP)")
      ("download-dir", po::value<std::string>(&c.download_dir)->value_name("dir"),
       "client: where received files are saved (default $XDG_DOWNLOAD_DIR, else ~/Downloads)")
      ("identity", po::value<std::string>(&c.identity)->value_name("file"),
       "client: the identity key file (default $XDG_DATA_HOME/chatapp/identities/<name>.key)")
      ("release-name", po::value<std::string>(&c.release_name)->value_name("name"),
       "operator: unbind <name> from its identity and delete its saved messages (--data-dir: with the server stopped; a shared --store: servers may run)")
      ("keepalive", po::value<double>(&c.keepalive_s)->default_value(15)->value_name("seconds"),
       "client: tell the server we are here this often; server: the interval of clients that do not say theirs")
      ("verbose,v", po::bool_switch(&c.verbose), "log debug detail (dropped datagrams, retries) on stderr")
      ("log-file", po::value<std::string>(&c.log_file)->value_name("path"),
       "also append the log to this file");
  return o;
}

std::optional<Config> parse(int argc, char** argv, int& exit_code) {
  Config c;
  long timeout_ms = 500;
  po::options_description visible = visible_options(c, timeout_ms);
  po::options_description all;
  all.add(visible).add_options()("args", po::value<std::vector<std::string>>());
  po::positional_options_description pos;
  pos.add("args", -1);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(argc, argv).options(all).positional(pos).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    throw UsageError{e.what()};
  }
  if (vm.count("help")) {
    std::cout << kUsage << "\n\n" << visible << std::flush;
    exit_code = 0;
    return std::nullopt;
  }
  if (vm.count("version")) {
    std::cout << "ChatApp " << CHATAPP_VERSION << '\n';
    exit_code = 0;
    return std::nullopt;
  }
  std::vector<std::string> args;
  if (vm.count("args")) args = vm["args"].as<std::vector<std::string>>();
  bool server = vm.count("server") > 0;
  bool client = vm["client"].as<bool>();
  if (!c.release_name.empty()) {
    if (server || client || !args.empty()) throw UsageError{"--release-name takes no mode and no argument"};
    if (!chat::protocol::valid_name(c.release_name))
      throw UsageError{"invalid --release-name '" + c.release_name + "': not a client name"};
    parse_store(c);
    return c;
  }
  if (server == client) throw UsageError{"choose exactly one mode: -s or -c"};
  if (timeout_ms < 1 || timeout_ms > 60'000)
    throw UsageError{"invalid --ack-timeout '" + std::to_string(timeout_ms) + "': must be 1-60000 ms"};
  c.policy.timeout = std::chrono::milliseconds(timeout_ms);
  if (c.policy.retries < 0 || c.policy.retries > 100)
    throw UsageError{"invalid --retries '" + std::to_string(c.policy.retries) + "': must be 0-100"};
  if (!std::isfinite(c.rate_limit) || c.rate_limit < 0 || c.rate_limit > 1e9)
    throw UsageError{"invalid --rate-limit '" + std::to_string(c.rate_limit) + "': must be 0-1000000000 (0: no limit)"};
  if (c.max_stored < 1 || c.max_stored > 1'000'000'000)
    throw UsageError{"invalid --max-stored '" + std::to_string(c.max_stored) + "': must be 1-1000000000"};
  if (c.max_clients < 1 || c.max_clients > 1'000'000'000)
    throw UsageError{"invalid --max-clients '" + std::to_string(c.max_clients) + "': must be 1-1000000000"};
  parse_size(c.max_file_size, "--max-file-size");
  parse_size(c.file_quota, "--file-quota");
  if (!std::isfinite(c.file_days) || c.file_days <= 0 || c.file_days > 3650)
    throw UsageError{"invalid --file-days '" + std::to_string(c.file_days) + "': must be more than 0, at most 3650"};
  if (!std::isfinite(c.keepalive_s) || c.keepalive_s < 0.1 || c.keepalive_s > 3600)
    throw UsageError{"invalid --keepalive '" + std::to_string(c.keepalive_s) + "': must be 0.1-3600 seconds"};
  if (!chat::protocol::valid_ipv4(c.bind))
    throw UsageError{"invalid --bind '" + c.bind + "': must be a dotted-decimal IPv4 address"};
  if (server) {
    if (!args.empty()) throw UsageError{"unexpected argument '" + args.front() + "' after -s <port>"};
    if (!c.identity.empty()) throw UsageError{"--identity is a client option (-c)"};
    if (vm.count("fallback")) throw UsageError{"--fallback is a client option (-c)"};
    if (!c.download_dir.empty()) throw UsageError{"--download-dir is a client option (-c)"};
    parse_store(c);
    c.server = true;
    c.port = parse_port(vm["server"].as<std::string>(), "port");
    if (vm.count("metrics")) c.metrics_port = parse_port(vm["metrics"].as<std::string>(), "--metrics", 1);
    return c;
  }
  if (vm.count("metrics")) throw UsageError{"--metrics is a server option (-s)"};
  if (args.size() != 4)
    throw UsageError{"-c takes 4 arguments (<name> <server-ip> <server-port> <client-port>), got " +
                     std::to_string(args.size())};
  c.name = args[0];
  if (!chat::protocol::valid_name(c.name))
    throw UsageError{"invalid name '" + c.name +
                     "': 1-32 letters, digits, '_', '-' or '.', not starting with '.'"};
  c.server_ip = args[1];
  if (!chat::protocol::valid_ipv4(c.server_ip))
    throw UsageError{"invalid server-ip '" + c.server_ip + "': must be dotted-decimal IPv4, e.g. 198.123.75.45"};
  c.server_port = parse_port(args[2], "server-port");
  c.port = parse_port(args[3], "client-port");
  if (!c.store.empty()) throw UsageError{"--store is a server option (-s)"};
  if (vm.count("fallback"))
    for (const auto& f : vm["fallback"].as<std::vector<std::string>>()) c.fallbacks.push_back(parse_fallback(f));
  return c;
}

/// $XDG_DOWNLOAD_DIR if set and absolute, else $HOME/Downloads, else ./Downloads.
std::filesystem::path default_download_dir() {
  if (const char* xdg = std::getenv("XDG_DOWNLOAD_DIR"); xdg != nullptr && xdg[0] == '/') return xdg;
  if (const char* home = std::getenv("HOME"); home != nullptr && home[0] != '\0') return std::filesystem::path(home) / "Downloads";
  return "Downloads";
}

chat::udp::endpoint make_endpoint(const std::string& ip, std::uint16_t port) {
  return {chat::net::ip::make_address_v4(ip), port};
}

std::chrono::milliseconds keepalive_of(const Config& c) {
  return std::chrono::milliseconds(static_cast<long long>(std::llround(c.keepalive_s * 1000)));
}

/// The store in --data-dir, or nullptr after saying on stderr why it cannot be opened.
std::unique_ptr<chat::offline::Store> open_store(const Config& c) {
  try {
    return chat::offline::open_sqlite_store(c.data_dir);
  } catch (const std::exception& e) {
    std::cerr << "ChatApp: cannot open the store in " << c.data_dir << ": " << e.what() << '\n';
    return nullptr;
  }
}

/// The URI as it may be shown: a password in it (user:password@, or a password= parameter)
/// replaced by ***.
std::string shown_uri(std::string uri) {
  auto scheme = uri.find("://");
  auto query = uri.find('?');
  auto at = uri.find('@', scheme == std::string::npos ? 0 : scheme + 3);
  if (scheme != std::string::npos && at != std::string::npos && at < query) {
    auto colon = uri.find(':', scheme + 3);
    if (colon != std::string::npos && colon < at) {
      uri = std::string(uri, 0, colon + 1).append("***").append(uri, at, std::string::npos);
      query = uri.find('?');
    }
  }
  for (auto p = uri.find("password=", query); query != std::string::npos && p != std::string::npos;
       p = uri.find("password=", p + 1)) {
    if (uri[p - 1] != '?' && uri[p - 1] != '&') continue;
    auto end = uri.find('&', p);
    uri = std::string(uri, 0, p + 9).append("***").append(end == std::string::npos ? std::string() : uri.substr(end));
  }
  return uri;
}

/// Where the store is, for messages: the data directory or the database.
std::string store_place(const Config& c) { return c.pg_uri.empty() ? c.data_dir : shown_uri(c.pg_uri); }

/// This server's name among the servers of a shared store: the host, the bound address and
/// the UDP port, the same across restarts (so a restarted server takes back the sessions it
/// held), different for two servers of one host on one port and two addresses.
std::string server_id(const Config& c) {
  std::array<char, 256> host{};
  if (::gethostname(host.data(), host.size() - 1) != 0) host = {'?'};
  return std::string(host.data()).append("/").append(c.bind).append(":").append(std::to_string(c.port));
}

int run_server(const Config& c) {
  chat::net::io_context io(1);
  std::unique_ptr<chat::offline::AsyncStore> store;
  if (c.pg_uri.empty()) {
    std::unique_ptr<chat::offline::Store> embedded = open_store(c);
    if (!embedded) return 1;
    store = chat::offline::adapt(std::move(embedded));
  } else {
    try {
      store = chat::offline::open_pg_store(io, chat::offline::PgOptions{c.pg_uri, server_id(c)});
    } catch (const std::exception& e) {
      std::cerr << "ChatApp: cannot open the store " << shown_uri(c.pg_uri) << ": " << e.what() << '\n';
      return 1;
    }
  }
  chat::registry::ServerOptions opts;
  opts.policy = c.policy;
  opts.guard.rate_limit = c.rate_limit;
  opts.max_stored = static_cast<std::size_t>(c.max_stored);
  opts.max_clients = static_cast<std::size_t>(c.max_clients);
  opts.keepalive = keepalive_of(c);
  opts.files.max_file_size = parse_size(c.max_file_size, "--max-file-size");
  opts.files.quota = parse_size(c.file_quota, "--file-quota");
  opts.files.keep = std::chrono::seconds(static_cast<long long>(std::llround(c.file_days * 86400)));
  // glibc keeps freed heap for reuse; after a burst that is most of the RSS (issue 13).
  opts.on_quiet = [] { ::malloc_trim(0); };
  // The server reads the store's snapshot (the table, the mailboxes) as it is built.
  std::optional<chat::registry::Server> built;
  try {
    built.emplace(opts, std::move(store), chat::transport::system_clock());
  } catch (const std::exception& e) {
    std::cerr << "ChatApp: cannot read the store " << store_place(c) << ": " << e.what() << '\n';
    return 1;
  }
  chat::registry::Server& server = *built;
  std::optional<chat::transport::Endpoint> endpoint;
  try {
    endpoint.emplace(io, server.core(), make_endpoint(c.bind, c.port));
  } catch (const boost::system::system_error& e) {
    std::cerr << "ChatApp: cannot use UDP port " << c.port << ": " << e.code().message() << '\n';
    return 1;
  }
  std::optional<chat::metrics::Exporter> metrics;
  if (c.metrics_port) {
    try {
      metrics.emplace(io, c.bind, c.metrics_port, [&server] { return chat::metrics::snapshot_of(server, server.store().lease_held()); });
    } catch (const chat::metrics::BindError& e) {
      std::cerr << "ChatApp: cannot serve metrics on port " << c.metrics_port << ": " << e.what() << '\n';
      return 1;
    }
  }
  chat::net::signal_set signals(io, SIGINT, SIGTERM, SIGHUP);
  signals.async_wait([&](chat::error_code ec, int) {
    if (ec) return;
    server.stop();
    endpoint->close();
    io.stop();
  });
  endpoint->turn([&] { server.start(); });
  endpoint->start();
  auto at = endpoint->local_endpoint();
  spdlog::info("server listening on {}:{}", at.address().to_string(), at.port());
  for (;;) {
    try {
      io.run();
      return 0;
    } catch (const std::exception& e) {
      // A failure in one handler (the store, say) must not take the server down for everyone.
      spdlog::error("handler failed: {}; serving on", e.what());
    }
  }
}

int report_release(const Config& c, const chat::offline::Released& r);

int run_release(const Config& c) {
  if (!c.pg_uri.empty()) {
    chat::offline::Released r;
    try {
      r = chat::offline::pg_release(c.pg_uri, c.release_name);
    } catch (const std::exception& e) {
      std::cerr << "ChatApp: cannot open the store " << shown_uri(c.pg_uri) << ": " << e.what() << '\n';
      return 1;
    }
    return report_release(c, r);
  }
  if (!std::filesystem::exists(std::filesystem::path(c.data_dir) / "chat.db")) {
    std::cout << "released nothing: there is no store (chat.db) in " << c.data_dir << '\n';
    return 1;
  }
  std::unique_ptr<chat::offline::Store> store = open_store(c);
  if (!store) return 1;
  return report_release(c, store->release(c.release_name));
}

int report_release(const Config& c, const chat::offline::Released& r) {
  if (!r.found) {
    std::cout << "released nothing: " << c.release_name << " is not registered in " << store_place(c) << '\n';
    return 1;
  }
  std::string fp = "no identity";
  if (r.key.size() == chat::protocol::Key{}.size()) {
    chat::protocol::Key k{};
    std::copy(r.key.begin(), r.key.end(), k.begin());
    fp = "identity " + chat::identity::fingerprint(k);
  }
  std::cout << "released " << c.release_name << ": removed its binding (" << fp << ") and " << r.messages
            << (r.messages == 1 ? " saved message" : " saved messages") << " sealed for it";
  if (r.files > 0) std::cout << ", and " << r.files << (r.files == 1 ? " kept file" : " kept files");
  std::cout << '\n';
  return 0;
}

int run_client(const Config& c) {
  chat::net::io_context io(1);
  chat::peer::ClientOptions opts{c.name, make_endpoint(c.server_ip, c.server_port), c.fallbacks, c.policy,
                                 keepalive_of(c), 0};
  opts.files.download_dir = c.download_dir.empty() ? default_download_dir() : std::filesystem::path(c.download_dir);
  std::optional<chat::identity::Identity> me;
  std::unique_ptr<chat::identity::PeerState> state;
  try {
    auto file = c.identity.empty() ? chat::identity::default_identity_path(c.name) : std::filesystem::path(c.identity);
    me.emplace(chat::identity::load_or_create(file));
    state = std::make_unique<chat::identity::PeerState>(chat::identity::default_state_path(c.name).string());
  } catch (const std::exception& e) {
    std::cerr << "ChatApp: " << e.what() << '\n';
    return 1;
  }
  std::optional<chat::peer::ClientApp> client;
  try {
    client.emplace(io, opts, make_endpoint(c.bind, c.port), std::move(*me), std::move(state));
  } catch (const boost::system::system_error& e) {
    std::cerr << "ChatApp: cannot use UDP port " << c.port << ": " << e.code().message() << '\n';
    return 1;
  }
  chat::net::signal_set signals(io, SIGINT, SIGTERM, SIGHUP);
  signals.async_wait([&](chat::error_code ec, int) {
    if (!ec) client->leave();  // silent leave: the server is not told
  });
  client->start();
  io.run();
  return client->exit_code();
}

}  // namespace

int main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);
  int exit_code = 0;
  std::optional<Config> config;
  try {
    config = parse(argc, argv, exit_code);
  } catch (const UsageError& e) {
    std::cerr << "ChatApp: " << e.what << '\n' << kUsage << '\n';
    return 2;
  }
  if (!config) return exit_code;
  // Logs go to stderr so that stdout carries only what the user is meant to read.
  std::vector<spdlog::sink_ptr> sinks{std::make_shared<spdlog::sinks::stderr_sink_st>()};
  if (!config->log_file.empty()) {
    try {
      sinks.push_back(std::make_shared<spdlog::sinks::basic_file_sink_st>(config->log_file));
    } catch (const spdlog::spdlog_ex& e) {
      std::cerr << "ChatApp: cannot open the log file " << config->log_file << ": " << e.what() << '\n';
      return 1;
    }
  }
  auto logger = std::make_shared<spdlog::logger>("chatapp", sinks.begin(), sinks.end());
  spdlog::set_default_logger(logger);
  spdlog::set_pattern("%Y-%m-%d %H:%M:%S.%e %^%l%$ %v");
  spdlog::set_level(config->verbose ? spdlog::level::debug
                                    : (config->server ? spdlog::level::info : spdlog::level::warn));
  try {
    if (!config->release_name.empty()) return run_release(*config);
    return config->server ? run_server(*config) : run_client(*config);
  } catch (const std::exception& e) {
    std::cerr << "ChatApp: " << e.what() << '\n';
    return 1;
  }
}
