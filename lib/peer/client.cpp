// The peer's decisions: prompt commands, datagrams from peers and the server, keep-alives,
// status lines.
#include "peer/client.hpp"

#include <spdlog/spdlog.h>

namespace chat::peer {
namespace {

namespace proto = chat::protocol;

// How many shown (sender, id) pairs are remembered to suppress saved duplicates.
constexpr std::size_t kShownMemory = 100'000;
// Size a registration is padded to, so that the server may answer it with a full table
// datagram before the address has proven it receives (as QUIC pads its Initial packets).
constexpr std::size_t kRegisterPadTo = proto::kRegisterPadTo;

udp::endpoint endpoint_of(const proto::Entry& e) {
  error_code ec;
  return udp::endpoint(net::ip::make_address_v4(e.ip, ec), e.port);
}

// A peer's text as shown: control characters (but tab) in caret notation, so that no peer
// can move the cursor, recolour or clear the reader's terminal.
std::string printable(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (char ch : text) {
    auto c = static_cast<unsigned char>(ch);
    if ((c < 0x20 && c != '\t') || c == 0x7F) {
      out += '^';
      out += static_cast<char>(c ^ 0x40);
    } else {
      out += ch;
    }
  }
  return out;
}

}  // namespace

Client::Client(ClientOptions options, const transport::TimeSource& clock, ClientIo io)
    : options_(std::move(options)),
      core_(transport::CoreOptions{options_.policy, {}, options_.seed}, clock),
      io_(std::move(io)) {
  core_.set_handler([this](const proto::Message& m, const udp::endpoint& from) { on_message(m, from); });
}

void Client::start() {
  last_answer_ = core_.now();
  send_register(Reason::first);
}

void Client::leave() { quit(0); }

void Client::quit(int code) {
  if (done_) return;
  done_ = true;
  core_.close();
  if (io_.exit) io_.exit(code);
}

void Client::say(const std::string& line) {
  if (io_.print) io_.print(">>> " + line);
}

void Client::show(const std::string& text) {
  std::size_t start = 0;
  for (;;) {
    std::size_t nl = text.find('\n', start);
    if (io_.print) io_.print(text.substr(start, nl - start));
    if (nl == std::string::npos) break;
    start = nl + 1;
  }
}

void Client::fail_and_exit(const char* line) {
  say(line);
  say("[Exiting]");
  quit(1);
}

std::vector<std::string> Client::names() const {
  std::vector<std::string> out;
  for (const auto& [name, e] : table_.rows()) out.push_back(name);
  return out;
}

// ---------------------------------------------------------------- the prompt

void Client::begin_input() {
  if (reading_) return;
  reading_ = true;
  core_.cancel(ready_timer_);
  if (io_.start_input) io_.start_input();
}

void Client::on_line(const std::string& line) {
  if (!done_) run(parse_command(line));
}

void Client::on_end_of_input() {
  closing_ = true;
  if (busy_ == 0) return quit(0);
  // Each request ends within its retry budget; the longest chain (lookup, direct, save, exists,
  // direct again, forced save) is six of them. The bound only guards against a bug keeping
  // the process alive.
  core_.after(6 * options_.policy.span() + std::chrono::seconds(1), [this] { quit(0); });
}

void Client::finished_one() {
  if (busy_ > 0) --busy_;
  if (closing_ && busy_ == 0) quit(0);
}

void Client::user_request(const proto::Message& m, const udp::endpoint& to, transport::Core::Done done) {
  ++busy_;
  core_.request(m, to, [this, done = std::move(done)](const proto::Message* reply) {
    done(reply);
    finished_one();
  });
}

void Client::server_request(const proto::Message& m, transport::Core::Done done,
                            std::optional<transport::RetryPolicy> policy, bool user) {
  if (user) ++busy_;
  auto on_reply = [this, user, done = std::move(done)](const proto::Message* reply) {
    if (reply != nullptr) heard_from_server();
    if (!done_) done(reply);
    if (user) finished_one();
  };
  core_.request(m, options_.server, std::move(on_reply), policy.value_or(options_.policy));
}

void Client::run(const Command& c) {
  const std::string& me = options_.name;
  if (auto* err = std::get_if<cmd::Error>(&c)) {
    say("[" + err->message + "]");
  } else if (std::get_if<cmd::Empty>(&c)) {
    // nothing to do; the prompt is already there
  } else if (std::get_if<cmd::Help>(&c)) {
    show(help_text());
  } else if (std::get_if<cmd::List>(&c)) {
    show(format_table(table_, me));
  } else if (std::get_if<cmd::Quit>(&c)) {
    on_end_of_input();
  } else if (auto* r = std::get_if<cmd::Reg>(&c)) {
    if (r->name != me) say("[Error: reg takes your own name, " + me + "]");
    else if (state_ == State::registering || rejoining_) say("[Registration in progress.]");
    else if (state_ == State::offline) send_register(Reason::back);
    else confirm_registration();
  } else if (state_ != State::online) {
    say("[Error: you are offline; type reg " + me + " to come back online]");
  } else if (auto* d = std::get_if<cmd::Dereg>(&c)) {
    if (d->name != me) {
      say("[Error: dereg takes your own name, " + me + "]");
      return;
    }
    // Our own re-registration would undo it when its answer comes.
    if (rejoining_) return say("[Registration in progress.]");
    server_request(proto::Dereg{core_.next_id(), me}, [this](const proto::Message* reply) {
      if (reply == nullptr) return fail_and_exit("[Server not responding]");
      if (auto* no = std::get_if<proto::Refused>(reply)) return say("[Server refused: " + no->reason + "]");
      state_ = State::offline;
      was_online_ = false;
      core_.cancel(keepalive_timer_);
      say("[You are Offline. Bye.]");
    });
  } else if (auto* s = std::get_if<cmd::Send>(&c)) {
    if (std::string why = proto::check_text(s->text); !why.empty()) return say("[Error: " + why + "]");
    send(s->to, s->text);
  } else if (auto* a = std::get_if<cmd::SendAll>(&c)) {
    if (std::string why = proto::check_text(a->text); !why.empty()) return say("[Error: " + why + "]");
    server_request(proto::Channel{core_.next_id(), me, a->text}, [this](const proto::Message* reply) {
      if (reply == nullptr) return say("[Server not responding.]");
      if (auto* no = std::get_if<proto::Refused>(reply)) {
        say("[Server refused the message: " + no->reason + "]");
        return check_session();
      }
      const auto* ack = std::get_if<proto::Ack>(reply);
      if (ack != nullptr && ack->missed > 0)
        return say("[Message received by Server; " + std::to_string(ack->missed) +
                   (ack->missed == 1 ? " member" : " members") + " could not get it: mailbox full.]");
      say("[Message received by Server.]");
    });
  }
}

void Client::send(const std::string& to, const std::string& text) {
  if (table_.find(to) != nullptr) return send_known(to, text);
  // No valid name is ever in a table: nothing to ask (the server would drop the lookup).
  if (!proto::valid_name(to)) return say("[Error: unknown client " + to + "; type list to see the table]");
  // Not in our table (yet): the server may know it; ask for that one row (SPEC §10).
  server_request(proto::Lookup{core_.next_id(), to}, [this, to, text](const proto::Message* reply) {
    if (reply == nullptr) return say("[Server not responding.]");
    const auto* found = std::get_if<proto::Found>(reply);
    if (found == nullptr || !found->known || found->entry.name != to)
      return say("[Error: unknown client " + to + "; type list to see the table]");
    table_.learn(found->entry);
    send_known(to, text);
  });
}

void Client::send_known(const std::string& to, const std::string& text) {
  const proto::Entry* e = table_.find(to);
  if (!e->online) {
    say("[" + to + " is offline, message sent to server.]");
    return send_save(to, text, core_.next_id(), 0);
  }
  send_direct(to, text, core_.next_id(), 0);
}

// `round` 0 is the first try; 1 follows the server's "exists" and never loops back to it.
void Client::send_direct(const std::string& to, const std::string& text, std::uint64_t mid, int round) {
  const proto::Entry* e = table_.find(to);
  if (e == nullptr) return say("[Error: unknown client " + to + "]");
  user_request(proto::Direct{mid, options_.name, text}, endpoint_of(*e),
               [this, to, text, mid, round](const proto::Message* reply) {
                 if (reply != nullptr) return say("[Message received by " + to + ".]");
                 say("[No ACK from " + to + ", message sent to server.]");
                 send_save(to, text, mid, round);
               });
}

void Client::send_save(const std::string& to, const std::string& text, std::uint64_t mid, int round) {
  proto::Save save{core_.next_id(), options_.name, to, mid, round > 0, text};
  server_request(save, [this, to, text, mid, round](const proto::Message* reply) {
    if (reply == nullptr) return say("[Server not responding.]");
    if (std::get_if<proto::Exists>(reply)) {
      say("[Client " + to + " exists!!]");
      return send_direct(to, text, mid, round + 1);
    }
    if (auto* no = std::get_if<proto::Refused>(reply)) {
      say("[Server refused the message: " + no->reason + "]");
      return check_session();
    }
    say("[Messages received by the server and saved]");
  });
}

// ---------------------------------------------------------------- registration and keep-alives

void Client::send_register(Reason why) {
  if (why == Reason::first || why == Reason::back) state_ = State::registering;
  if (why == Reason::rejoin) rejoining_ = true;
  proto::Register reg{core_.next_id(), options_.name, 0, static_cast<std::uint64_t>(options_.keepalive.count())};
  proto::pad_to(reg, kRegisterPadTo);
  // The user waits for the answer to a `reg` typed (end of input waits for it too).
  server_request(reg, [this, why](const proto::Message* reply) { on_registered(reply, why); }, std::nullopt,
                 why == Reason::typed || why == Reason::back);
}

void Client::on_registered(const proto::Message* reply, Reason why) {
  if (why == Reason::rejoin) rejoining_ = false;
  if (reply == nullptr) {
    // Our own re-registration: the keep-alives go on, and the next answer tries again.
    if (why == Reason::rejoin) return;
    if (why == Reason::typed) return say("[Server not responding]");
    return fail_and_exit("[Server not responding]");
  }
  if (auto* no = std::get_if<proto::RegErr>(reply)) {
    say("[Registration refused: " + no->reason + "]");
    return quit(1);
  }
  const auto* ok = std::get_if<proto::RegOk>(reply);
  if (ok == nullptr) return;
  state_ = State::online;
  was_online_ = false;
  // The table is kept: the server's snapshot from version 0 overwrites it, or (same epoch)
  // our ACK tells it we already hold it.
  say("[Welcome, You are registered.]");
  if (ok->pending > 0) say("[You have messages]");
  schedule_keepalive();
  if (reading_) return;
  // Commands wait for the table (so `send` knows the names), but not forever.
  ready_timer_ = core_.after(options_.policy.span(), [this] { begin_input(); });
}

void Client::schedule_keepalive() {
  core_.cancel(keepalive_timer_);
  // ±10 % jitter, so clients started together do not keep arriving together.
  auto base = std::chrono::duration_cast<transport::Duration>(options_.keepalive);
  auto jitter = base / 5 * static_cast<std::int64_t>(core_.random() % 1001) / 1000;
  keepalive_timer_ = core_.after(base - base / 10 + jitter, [this] { send_keepalive(); });
}

void Client::send_keepalive() {
  keepalive_timer_ = 0;
  if (state_ != State::online) return;
  schedule_keepalive();
  // All of its tries fit in one interval, so keep-alives never pile up.
  transport::RetryPolicy p = options_.policy;
  if (p.span() > options_.keepalive) p = p.within(options_.keepalive);
  server_request(proto::KeepAlive{core_.next_id(), options_.name}, [this](const proto::Message* reply) {
    if (reply == nullptr) {
      if (!server_silent_ && core_.now() - last_answer_ >= kServerSilentIntervals * options_.keepalive) {
        server_silent_ = true;
        say("[Server not responding]");
      }
      return;
    }
    const auto* alive = std::get_if<proto::Alive>(reply);
    if (alive != nullptr && !alive->live) rejoin();
  }, p, false);
}

void Client::confirm_registration() {
  // A registration would start a new session (a new process may hold the same address), so
  // first ask whether the server holds ours: only its word says "already registered".
  server_request(proto::KeepAlive{core_.next_id(), options_.name}, [this](const proto::Message* reply) {
    if (reply == nullptr) return say("[Server not responding]");
    const auto* alive = std::get_if<proto::Alive>(reply);
    if (alive != nullptr && alive->live) return say("[You are already registered.]");
    send_register(Reason::typed);
  });
}

void Client::check_session() {
  // A refusal may mean the server no longer holds our session (it expired, the server
  // restarted): ask now instead of at the next keep-alive.
  if (state_ == State::online && !rejoining_) send_keepalive();
}

void Client::heard_from_server() {
  last_answer_ = core_.now();
  if (!server_silent_) return;
  server_silent_ = false;
  say("[Server is back.]");
}

void Client::rejoin() {
  if (state_ != State::online || rejoining_) return;
  say("[The server lost track of you; registering again.]");
  send_register(Reason::rejoin);
}

// ---------------------------------------------------------------- datagrams

// One overload per datagram type, none generic: an unhandled new type does not compile.
struct Client::Dispatch {
  Client& c;
  const udp::endpoint& from;
  void operator()(const proto::Direct& m) { c.on_direct(m, from); }
  void operator()(const proto::Relay& m) { c.on_relay(m, from); }
  void operator()(const proto::Probe& m) { c.on_probe(m, from); }
  void operator()(const proto::Table& m) { c.on_table(m, from); }
  void operator()(const proto::Stored& m) { c.on_stored(m, from); }
  // Requests only the server is sent.
  void operator()(const proto::Register& m) { c.unexpected(m, from); }
  void operator()(const proto::Dereg& m) { c.unexpected(m, from); }
  void operator()(const proto::Save& m) { c.unexpected(m, from); }
  void operator()(const proto::Channel& m) { c.unexpected(m, from); }
  void operator()(const proto::KeepAlive& m) { c.unexpected(m, from); }
  void operator()(const proto::Lookup& m) { c.unexpected(m, from); }
  // Replies: the core hands them to the request they answer, never here.
  void operator()(const proto::Ack& m) { c.unexpected(m, from); }
  void operator()(const proto::RegOk& m) { c.unexpected(m, from); }
  void operator()(const proto::RegErr& m) { c.unexpected(m, from); }
  void operator()(const proto::Exists& m) { c.unexpected(m, from); }
  void operator()(const proto::Refused& m) { c.unexpected(m, from); }
  void operator()(const proto::Alive& m) { c.unexpected(m, from); }
  void operator()(const proto::Found& m) { c.unexpected(m, from); }
};

void Client::on_message(const proto::Message& m, const udp::endpoint& from) {
  if (from == options_.server) heard_from_server();
  std::visit(Dispatch{*this, from}, m);
}

void Client::unexpected(const proto::Message& m, const udp::endpoint& from) {
  ++stats_.unexpected;
  spdlog::debug("ignored {} from {}:{}", proto::type_name(m), from.address().to_string(), from.port());
  core_.forget(from, proto::request_id(m));
}

void Client::on_direct(const proto::Direct& d, const udp::endpoint& from) {
  if (state_ != State::online) return core_.forget(from, d.id);  // the sender falls back to the server
  const proto::Entry* sender = table_.find(d.from);
  if (sender == nullptr || endpoint_of(*sender) != from) {
    // Not from the address the table gives that name: maybe forged, maybe our table is
    // behind. Unanswered, the sender retries (our table catches up) or goes via the server.
    ++stats_.unverified;
    spdlog::debug("unverified direct message claiming to be from {}", d.from);
    return core_.forget(from, d.id);
  }
  if (first_showing(d.from, d.id)) say(d.from + ": " + printable(d.text));
  core_.reply(from, proto::Ack{d.id});
}

void Client::on_relay(const proto::Relay& r, const udp::endpoint& from) {
  if (from != options_.server) ++stats_.not_from_server;
  if (state_ != State::online || from != options_.server) return core_.forget(from, r.id);
  if (first_showing(r.from, r.mid)) say("[Channel_Message " + r.from + ": " + printable(r.text) + "]");
  core_.reply(from, proto::Ack{r.id});
}

void Client::on_probe(const proto::Probe& p, const udp::endpoint& from) {
  if (from != options_.server) ++stats_.not_from_server;
  if (state_ != State::online || from != options_.server) return core_.forget(from, p.id);
  core_.reply(from, proto::Ack{p.id});
}

void Client::on_table(const proto::Table& t, const udp::endpoint& from) {
  if (from != options_.server) ++stats_.not_from_server;
  // Only the server's own address may change the table; before the welcome, wait for it.
  if (from != options_.server || state_ != State::online) return core_.forget(from, t.id);
  // Our own registration is on its way: the update is taken after its welcome (the server
  // sends it again), so "[Client table updated.]" never comes before "[Welcome, ...]".
  if (rejoining_) return core_.forget(from, t.id);
  Applied a = table_.apply(t);
  core_.reply(from, proto::Ack{t.id, a.epoch, a.have});
  if (a.changed && a.announce) {
    say("[Client table updated.]");
    begin_input();
  }
  // Marked offline while running (a lost relay or probe): come back by ourselves, which also
  // brings what was saved for us meanwhile.
  if (const proto::Entry* self = table_.find(options_.name)) {
    if (self->online) was_online_ = true;
    else if (was_online_ && a.changed) rejoin();
  }
}

void Client::on_stored(const proto::Stored& s, const udp::endpoint& from) {
  if (from != options_.server) ++stats_.not_from_server;
  if (from != options_.server || state_ != State::online) return core_.forget(from, s.id);
  for (const auto& i : s.items) {
    if (!first_showing(i.from, i.mid)) continue;
    std::string ts = format_timestamp(i.ts_us);
    if (i.channel) say("Channel_Message " + i.from + ": " + ts + " " + printable(i.text));
    else say(i.from + ": " + ts + " " + printable(i.text));
  }
  core_.reply(from, proto::Ack{s.id});
}

bool Client::first_showing(const std::string& from, std::uint64_t mid) {
  std::string key = from + '\n' + std::to_string(mid);
  if (!shown_.insert(key).second) return false;
  shown_order_.push_back(std::move(key));
  if (shown_order_.size() > kShownMemory) {
    shown_.erase(shown_order_.front());
    shown_order_.pop_front();
  }
  return true;
}

}  // namespace chat::peer
