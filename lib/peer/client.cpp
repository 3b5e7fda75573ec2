// The peer's handlers: prompt commands, datagrams from peers and the server, status lines.
#include "peer/client.hpp"

#include <unistd.h>

#include <iostream>

#include <spdlog/spdlog.h>

namespace chat::peer {
namespace {

namespace proto = chat::protocol;

// How many shown (sender, id) pairs are remembered to suppress saved duplicates.
constexpr std::size_t kShownMemory = 100'000;

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

Client::Client(net::io_context& io, ClientOptions options)
    : io_(io),
      options_(std::move(options)),
      endpoint_(io, options_.bind, options_.policy),
      terminal_(io),
      ready_timer_(io) {}

void Client::start() {
  endpoint_.start([this](const proto::Message& m, const udp::endpoint& from) { on_message(m, from); });
  send_register();
}

void Client::leave() { quit(0); }

void Client::quit(int code) {
  exit_code_ = code;
  endpoint_.close();
  terminal_.stop();
  ready_timer_.cancel();
  io_.stop();
}

void Client::say(const std::string& line) { terminal_.print(">>> " + line); }

void Client::show(const std::string& text) {
  std::size_t start = 0;
  for (;;) {
    std::size_t nl = text.find('\n', start);
    terminal_.print(text.substr(start, nl - start));
    if (nl == std::string::npos) break;
    start = nl + 1;
  }
}

void Client::fail_and_exit(const char* line) {
  say(line);
  say("[Exiting]");
  quit(1);
}

// ---------------------------------------------------------------- the prompt

void Client::begin_input() {
  if (reading_) return;
  reading_ = true;
  ready_timer_.cancel();
  terminal_.start([this](const std::string& line) { on_line(line); },
                  [this] { leave(); },  // end of input is a silent leave (SPEC §4)
                  [this] {
                    std::vector<std::string> names;
                    for (const auto& [name, e] : table_.rows()) names.push_back(name);
                    return names;
                  });
}

void Client::on_line(const std::string& line) { run(parse_command(line)); }

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
    leave();
  } else if (auto* r = std::get_if<cmd::Reg>(&c)) {
    if (r->name != me) say("[Error: reg takes your own name, " + me + "]");
    else if (state_ == State::online) say("[You are already registered.]");
    else if (state_ == State::offline) send_register();
    else say("[Registration in progress.]");
  } else if (state_ != State::online) {
    say("[Error: you are offline; type reg " + me + " to come back online]");
  } else if (auto* d = std::get_if<cmd::Dereg>(&c)) {
    if (d->name != me) {
      say("[Error: dereg takes your own name, " + me + "]");
      return;
    }
    endpoint_.request(proto::Dereg{endpoint_.next_id(), me}, options_.server, [this](const proto::Message* reply) {
      if (reply == nullptr) return fail_and_exit("[Server not responding]");
      if (auto* no = std::get_if<proto::Refused>(reply)) return say("[Server refused: " + no->reason + "]");
      state_ = State::offline;
      was_online_ = false;
      say("[You are Offline. Bye.]");
    });
  } else if (auto* s = std::get_if<cmd::Send>(&c)) {
    if (std::string why = proto::check_text(s->text); !why.empty()) return say("[Error: " + why + "]");
    const proto::Entry* e = table_.find(s->to);
    if (e == nullptr) return say("[Error: unknown client " + s->to + "; type list to see the table]");
    if (!e->online) {
      say("[" + s->to + " is offline, message sent to server.]");
      send_save(s->to, s->text, endpoint_.next_id(), 0);
      return;
    }
    send_direct(s->to, s->text, endpoint_.next_id(), 0);
  } else if (auto* a = std::get_if<cmd::SendAll>(&c)) {
    if (std::string why = proto::check_text(a->text); !why.empty()) return say("[Error: " + why + "]");
    endpoint_.request(proto::Channel{endpoint_.next_id(), me, a->text}, options_.server,
                      [this](const proto::Message* reply) {
                        if (reply == nullptr) return say("[Server not responding.]");
                        if (auto* no = std::get_if<proto::Refused>(reply))
                          return say("[Server refused the message: " + no->reason + "]");
                        say("[Message received by Server.]");
                      });
  }
}

// `round` 0 is the first try; 1 follows the server's "exists" and never loops back to it.
void Client::send_direct(const std::string& to, const std::string& text, std::uint64_t mid, int round) {
  const proto::Entry* e = table_.find(to);
  if (e == nullptr) return say("[Error: unknown client " + to + "]");
  endpoint_.request(proto::Direct{mid, options_.name, text}, endpoint_of(*e),
                    [this, to, text, mid, round](const proto::Message* reply) {
                      if (reply != nullptr) return say("[Message received by " + to + ".]");
                      say("[No ACK from " + to + ", message sent to server.]");
                      send_save(to, text, mid, round);
                    });
}

void Client::send_save(const std::string& to, const std::string& text, std::uint64_t mid, int round) {
  proto::Save save{endpoint_.next_id(), options_.name, to, mid, round > 0, text};
  endpoint_.request(save, options_.server, [this, to, text, mid, round](const proto::Message* reply) {
    if (reply == nullptr) return say("[Server not responding.]");
    if (std::get_if<proto::Exists>(reply)) {
      say("[Client " + to + " exists!!]");
      return send_direct(to, text, mid, round + 1);
    }
    if (auto* no = std::get_if<proto::Refused>(reply))
      return say("[Server refused the message: " + no->reason + "]");
    say("[Messages received by the server and saved]");
  });
}

void Client::send_register(bool rejoin) {
  // A rejoin (the server marked us offline) keeps us usable meanwhile: commands go on.
  if (!rejoin) state_ = State::registering;
  was_online_ = false;
  proto::Register reg{endpoint_.next_id(), options_.name, 0};
  // Padded, so the server may answer with a full table datagram at once (see kRegisterPadTo);
  // 9 bytes are the field's own: ,"pad":""
  if (std::size_t n = proto::encode(reg).size() + 9; n < proto::kRegisterPadTo) reg.pad = proto::kRegisterPadTo - n;
  endpoint_.request(reg, options_.server,
                    [this](const proto::Message* reply) {
                      if (reply == nullptr) return fail_and_exit("[Server not responding]");
                      if (auto* no = std::get_if<proto::RegErr>(reply)) {
                        say("[Registration refused: " + no->reason + "]");
                        return quit(1);
                      }
                      const auto* ok = std::get_if<proto::RegOk>(reply);
                      if (ok == nullptr) return;
                      state_ = State::online;
                      // The table is kept: the server's snapshot from version 0 overwrites it,
                      // or (same epoch) our ACK tells it we already hold it.
                      say("[Welcome, You are registered.]");
                      if (ok->pending > 0) say("[You have messages]");
                      if (reading_) return;
                      // Commands wait for the table (so `send` knows the names), but not forever.
                      ready_timer_.expires_after(options_.policy.timeout * (options_.policy.retries + 1));
                      ready_timer_.async_wait([this](error_code ec) {
                        if (!ec) begin_input();
                      });
                    });
}

// ---------------------------------------------------------------- datagrams

void Client::on_message(const proto::Message& m, const udp::endpoint& from) {
  bool from_server = from == options_.server;
  bool online = state_ == State::online;
  if (auto* d = std::get_if<proto::Direct>(&m)) {
    if (!online) return endpoint_.forget(from, d->id);  // offline: the sender falls back to the server
    const proto::Entry* sender = table_.find(d->from);
    if (sender == nullptr || endpoint_of(*sender) != from) {
      // Not from the address the table gives that name: maybe forged, maybe our table is
      // behind. Unanswered, the sender retries (our table catches up) or goes via the server.
      spdlog::debug("unverified direct message claiming to be from {}", d->from);
      ++unverified_;
      return endpoint_.forget(from, d->id);
    }
    if (first_showing(d->from, d->id)) say(d->from + ": " + printable(d->text));
    endpoint_.reply(from, proto::Ack{d->id});
  } else if (auto* r = std::get_if<proto::Relay>(&m)) {
    if (!online || !from_server) return endpoint_.forget(from, r->id);
    if (first_showing(r->from, r->mid)) say("[Channel_Message " + r->from + ": " + printable(r->text) + "]");
    endpoint_.reply(from, proto::Ack{r->id});
  } else if (auto* t = std::get_if<proto::Table>(&m)) {
    on_table(*t, from);
  } else if (auto* s = std::get_if<proto::Stored>(&m)) {
    on_stored(*s, from);
  } else if (auto* p = std::get_if<proto::Probe>(&m)) {
    if (!online || !from_server) return endpoint_.forget(from, p->id);
    endpoint_.reply(from, proto::Ack{p->id});
  } else {
    spdlog::debug("ignored {} from {}:{}", proto::type_name(m), from.address().to_string(), from.port());
    endpoint_.forget(from, proto::request_id(m));
  }
}

void Client::on_table(const proto::Table& t, const udp::endpoint& from) {
  // Only the server's own address may change the table; before the welcome, wait for it.
  if (from != options_.server || state_ != State::online) return endpoint_.forget(from, t.id);
  Applied a = table_.apply(t);
  endpoint_.reply(from, proto::Ack{t.id, a.epoch, a.have});
  if (a.changed && a.announce) {
    say("[Client table updated.]");
    begin_input();
  }
  // Marked offline while running (a lost relay or probe under loss): come back by ourselves,
  // which also brings what was saved for us meanwhile.
  if (const proto::Entry* self = table_.find(options_.name)) {
    if (self->online) {
      was_online_ = true;
    } else if (was_online_ && state_ == State::online && a.changed) {
      say("[The server lost track of you; registering again.]");
      send_register(true);
    }
  }
}

void Client::on_stored(const proto::Stored& s, const udp::endpoint& from) {
  if (from != options_.server || state_ != State::online) return endpoint_.forget(from, s.id);
  for (const auto& i : s.items) {
    if (!first_showing(i.from, i.mid)) continue;
    std::string ts = format_timestamp(i.ts_us);
    if (i.channel) say("Channel_Message " + i.from + ": " + ts + " " + printable(i.text));
    else say(i.from + ": " + ts + " " + printable(i.text));
  }
  endpoint_.reply(from, proto::Ack{s.id});
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
