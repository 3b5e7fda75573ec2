// The peer's decisions: prompt commands, datagrams from peers and the server, keep-alives,
// status lines.
#include "peer/client.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>

namespace chat::peer {
namespace {

namespace proto = chat::protocol;

// The kinds of message the replay memory tells apart (a direct and a channel message may share an id).
constexpr std::uint8_t kSeenDirect = 1;
constexpr std::uint8_t kSeenChannel = 3;
constexpr std::uint8_t kSeenFile = 4;
// Saved messages held for `trust` at most (the rest are dropped, as a full mailbox would).
constexpr std::size_t kMaxHeld = 1000;

/// `reply` if it is one of the answers its request can have, else nullptr: an answer of another
/// type (a broken or lying peer) counts as none, never as success.
template <class... T>
const proto::Message* answer(const proto::Message* reply) {
  return reply != nullptr && (std::holds_alternative<T>(*reply) || ...) ? reply : nullptr;
}

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

Client::Client(ClientOptions options, const transport::TimeSource& clock, ClientIo io, identity::Identity me,
               std::unique_ptr<identity::PeerState> state)
    : options_(std::move(options)),
      servers_{options_.server},
      core_(transport::CoreOptions{options_.policy, {}, options_.seed}, clock),
      io_(std::move(io)),
      me_(std::move(me)),
      state_db_(std::move(state)) {
  core_.set_handler([this](const proto::Message& m, const udp::endpoint& from) { on_message(m, from); });
  servers_.insert(servers_.end(), options_.fallbacks.begin(), options_.fallbacks.end());
  FileHost host{
      .say = [this](const std::string& line) { say(line); },
      .progress = io_.progress,
      .send_control = [this](const std::string& to, const files::Control& c,
                             std::function<void(bool)> done) { send_file_control(to, c, std::move(done)); },
      .reachable = [this](const std::string& name) -> std::optional<udp::endpoint> {
        const proto::Entry* e = table_.find(name);
        if (e == nullptr || !e->online || !usable_key(name)) return std::nullopt;
        return endpoint_of(*e);
      },
      .ended = [this] {
        if (closing_) check_closing();
      },
      .sealable = [this](const std::string& name) { return usable_key(name).has_value(); },
      .seal_for = [this](const std::string& to, const files::Control& c) {
        return identity::seal_file(pair(*usable_key(to)), files::transfer_of(c), now_ms(), to, files::encode(c));
      },
      .to_server = [this](const proto::Message& m, std::function<void(const proto::Message*)> done) {
        server_request(m, std::move(done));
      },
      .server = [this] { return server(); },
      .me = options_.name,
  };
  transfers_ = std::make_unique<Transfers>(core_, std::move(host), options_.files);
  core_.set_frame_handler([this](std::string_view bytes, const udp::endpoint& from) {
    if (state_ == State::online) transfers_->on_frame(bytes, from);
  });
}

void Client::start() {
  last_answer_ = core_.now();
  send_register(Reason::first);
}

void Client::leave() { quit(0); }

void Client::quit(int code) {
  if (done_) return;
  transfers_->stop_all();  // the peers are told (one copy each, not waited for)
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
  check_closing();
}

void Client::finished_one() {
  if (busy_ > 0) --busy_;
  if (closing_) check_closing();
}

void Client::check_closing() {
  // A running file transfer ends by itself (done, or stalled: FileOptions::stall).
  if (transfers_->running() > 0) return core_.cancel(closing_timer_);
  if (busy_ == 0 && waiting_ == 0) return quit(0);
  // Each request ends within its retry budget; the longest chain (lookup, direct, save, exists,
  // direct again, forced save) is six of them, and a backlog moves on each time one ends. The
  // bound (that long without any request ending) only guards against a bug keeping the
  // process alive.
  core_.cancel(closing_timer_);
  closing_timer_ = core_.after(6 * options_.policy.span() + std::chrono::seconds(1), [this] { quit(0); });
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
  core_.request(m, server(), std::move(on_reply), policy.value_or(options_.policy));
}

// ---------------------------------------------------------------- the backlog

bool Client::room_for_one() {
  if (waiting_ < options_.backlog.max_waiting) return true;
  ++stats_.backlog_full;
  say(std::string("[Error: ")
          .append(std::to_string(options_.backlog.max_waiting))
          .append(" messages already waiting to be sent; this one was not sent]"));
  return false;
}

void Client::enqueue(const std::string& key, Entry e, bool again) {
  Lane& lane = lanes_[key];
  (again ? lane.again : lane.waiting).push_back(std::move(e));
  ++waiting_;
  pump(key);
}

void Client::pump(const std::string& key) {
  auto it = lanes_.find(key);
  if (it == lanes_.end()) return;
  Lane& lane = it->second;
  const std::size_t window = std::max<std::size_t>(options_.backlog.window, 1);
  ++pumping_;
  while (!done_ && (!lane.again.empty() || !lane.waiting.empty())) {
    // Silent: wait for the verdict of those in flight; none answered: every waiting one falls back.
    if (lane.silent ? lane.in_flight > 0 : lane.in_flight >= window) break;
    auto& q = lane.again.empty() ? lane.waiting : lane.again;
    Entry e = std::move(q.front());
    q.pop_front();
    --waiting_;
    e(!lane.silent);
  }
  --pumping_;
  // Erased only outside every pump (an entry may queue on another lane), so nobody holds it;
  // its verdict goes with it: the next message to that destination is tried afresh.
  if (pumping_ == 0 && lane.in_flight == 0 && lane.again.empty() && lane.waiting.empty()) lanes_.erase(it);
}

void Client::lane_request(const std::string& key, const proto::Message& m, const udp::endpoint& to,
                          std::function<bool(const proto::Message* reply)> done) {
  ++lanes_[key].in_flight;
  auto finish = [this, key, done = std::move(done)](const proto::Message* reply) { lane_done(key, done(reply)); };
  if (key.empty()) server_request(m, std::move(finish));
  else user_request(m, to, std::move(finish));
}

void Client::lane_done(const std::string& key, bool answered) {
  auto it = lanes_.find(key);
  if (it == lanes_.end()) return;
  if (it->second.in_flight > 0) --it->second.in_flight;
  it->second.silent = !answered;
  pump(key);
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
    show(format_table(table_, me, [this](const std::string& name) -> std::string {
      if (state_db_->changed(name)) return "  identity changed";
      return state_db_->verified(name) ? "  verified" : "";
    }));
  } else if (std::get_if<cmd::Quit>(&c)) {
    on_end_of_input();
  } else if (std::holds_alternative<cmd::Fingerprint>(c) || std::holds_alternative<cmd::Verify>(c) ||
             std::holds_alternative<cmd::Trust>(c) || std::holds_alternative<cmd::Block>(c) ||
             std::holds_alternative<cmd::Unblock>(c) || std::holds_alternative<cmd::Blocked>(c)) {
    run_identity(c);
  } else if (auto* r = std::get_if<cmd::Reg>(&c)) {
    if (r->name != me) say("[Error: reg takes your own name, " + me + "]");
    else if (state_ == State::registering || rejoining_) say("[Registration in progress.]");
    else if (state_ == State::offline) send_register(Reason::back);
    else confirm_registration();
  } else if (std::holds_alternative<cmd::Transfers>(c) || std::holds_alternative<cmd::Cancel>(c)) {
    run_files(c);  // also while offline: what is running can be seen and stopped
  } else if (state_ != State::online) {
    say("[Error: you are offline; type reg " + me + " to come back online]");
  } else if (auto* d = std::get_if<cmd::Dereg>(&c)) {
    if (d->name != me) {
      say("[Error: dereg takes your own name, " + me + "]");
      return;
    }
    // Our own re-registration would undo it when its answer comes.
    if (rejoining_) return say("[Registration in progress.]");
    server_request(proto::Dereg{core_.next_id(), me}, [this](const proto::Message* any) {
      const proto::Message* reply = answer<proto::Ack, proto::Refused>(any);
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
    send_channel(a->text);
  } else {
    run_files(c);
  }
}

void Client::run_files(const Command& c) {
  if (auto* f = std::get_if<cmd::SendFile>(&c)) {
    if (f->to == options_.name) return say("[Error: you cannot send a file to yourself]");
    // Online or not (the server keeps a file for one offline), its key must be usable.
    if (table_.find(f->to) == nullptr) return say("[Error: unknown client " + f->to + "; type list to see the table]");
    if (!may_send(f->to)) return;
    transfers_->sendfile(f->to, f->path);
  } else if (auto* a = std::get_if<cmd::Accept>(&c)) {
    transfers_->accept(a->from, a->id);
  } else if (auto* d = std::get_if<cmd::Decline>(&c)) {
    transfers_->decline(d->from, d->id);
  } else if (std::get_if<cmd::Transfers>(&c)) {
    show(transfers_->list());
  } else if (auto* x = std::get_if<cmd::Cancel>(&c)) {
    transfers_->cancel(x->id);
  }
}

void Client::send_file_control(const std::string& to, const files::Control& c, std::function<void(bool)> done) {
  const proto::Entry* e = table_.find(to);
  auto key = usable_key(to);
  if (e == nullptr || !key || done_) {
    core_.after(transport::Duration::zero(), [done = std::move(done)] { done(false); });
    return;
  }
  const std::uint64_t mid = core_.next_id();
  std::string body = identity::seal_file(pair(*key), mid, now_ms(), to, files::encode(c));
  user_request(proto::Direct{mid, options_.name, std::move(body)}, endpoint_of(*e),
               [this, to, mid, done = std::move(done)](const proto::Message* reply) {
                 const auto* receipt = reply != nullptr ? std::get_if<proto::Receipt>(reply) : nullptr;
                 auto now_key = usable_key(to);
                 done(receipt != nullptr && now_key &&
                      identity::check_receipt(pair(*now_key), receipt->body, mid, options_.name));
               });
}

bool Client::on_file_control(const proto::Direct& d, const udp::endpoint& from, const proto::Key& key,
                             const identity::Opened& m) {
  auto c = files::decode(m.text);
  if (!c) return false;
  if (state_db_->blocked(key)) ++stats_.blocked;
  else if (first_seen(key, kSeenFile, d.id, m.sent_ms)) transfers_->on_control(d.from, from, *c);
  core_.reply(from, proto::Receipt{d.id, identity::seal_receipt(pair(key), d.id, d.from)});
  return true;
}

void Client::send_channel(const std::string& text) {
  if (!room_for_one()) return;
  enqueue("", [this, text](bool answering) {
    if (!answering) return say("[Server not responding.]");
    std::uint64_t id = core_.next_id();
    std::string body = identity::sign_channel(me_, options_.name, id, now_ms(), text);
    proto::Channel m{id, options_.name, std::move(body)};
    lane_request("", m, server(), [this](const proto::Message* any) {
      const proto::Message* reply = answer<proto::Ack, proto::Refused>(any);
      if (reply == nullptr) {
        say("[Server not responding.]");
        return any != nullptr;
      }
      if (auto* no = std::get_if<proto::Refused>(reply)) {
        say("[Server refused the message: " + no->reason + "]");
        check_session();
        return true;
      }
      const auto* ack = std::get_if<proto::Ack>(reply);
      if (ack != nullptr && ack->missed > 0)
        say("[Message received by Server; " + std::to_string(ack->missed) +
            (ack->missed == 1 ? " member" : " members") + " could not get it: mailbox full.]");
      else
        say("[Message received by Server.]");
      return true;
    });
  });
}

void Client::run_identity(const Command& c) {
  auto no_key = [this](const std::string& name) { say("[Error: no key known for " + name + "]"); };
  if (auto* f = std::get_if<cmd::Fingerprint>(&c)) {
    if (f->name.empty()) return say("[Your fingerprint: " + identity::fingerprint(me_.public_key()) + "]");
    // After a key change the user compares the new key's digits before typing trust.
    if (auto pending = state_db_->pending(f->name))
      return say("[Fingerprint of " + f->name + "'s new identity: " + identity::fingerprint(*pending) +
                 " (not trusted yet: type trust " + f->name + " once it matches)]");
    auto pin = state_db_->pinned(f->name);
    if (!pin) return no_key(f->name);
    return say("[Fingerprint of " + f->name + ": " + identity::fingerprint(*pin) +
               (state_db_->verified(f->name) ? " (verified)]" : "]"));
  }
  if (auto* v = std::get_if<cmd::Verify>(&c)) {
    // The mark belongs to a key: the new one must be trusted before it can be verified.
    if (state_db_->changed(v->name))
      return say("[Error: the identity of " + v->name + " changed; type trust " + v->name + " first]");
    if (!state_db_->verify(v->name)) return no_key(v->name);
    return say("[You marked " + v->name + "'s fingerprint verified.]");
  }
  if (auto* t = std::get_if<cmd::Trust>(&c)) {
    if (!state_db_->trust(t->name)) return say("[The identity of " + t->name + " has not changed.]");
    say("[You now trust the new identity of " + t->name + ".]");
    return show_held(t->name);
  }
  if (auto* b = std::get_if<cmd::Block>(&c)) {
    auto pin = state_db_->pinned(b->name);
    if (!pin) return no_key(b->name);
    state_db_->block(b->name, *pin);
    return say("[" + b->name + " is blocked.]");
  }
  if (auto* u = std::get_if<cmd::Unblock>(&c)) {
    if (!state_db_->unblock(u->name)) return say("[" + u->name + " is not blocked.]");
    return say("[" + u->name + " is unblocked.]");
  }
  auto names = state_db_->blocked_names();
  if (names.empty()) return say("[Nobody is blocked.]");
  std::string line = "[Blocked: ";
  for (std::size_t i = 0; i < names.size(); ++i) line.append(i == 0 ? "" : ", ").append(names[i]);
  say(line + "]");
}

void Client::send(const std::string& to, const std::string& text) {
  if (table_.find(to) != nullptr) return send_known(to, text, false);
  // No valid name is ever in a table: nothing to ask (the server would drop the lookup).
  if (!proto::valid_name(to)) return say("[Error: unknown client " + to + "; type list to see the table]");
  if (!room_for_one()) return;
  // Not in our table (yet): the server may know it; ask for that one row (SPEC §10).
  enqueue("", [this, to, text](bool answering) {
    if (!answering) return say("[Server not responding.]");
    lane_request("", proto::Lookup{core_.next_id(), to}, server(), [this, to, text](const proto::Message* reply) {
      if (reply == nullptr) {
        say("[Server not responding.]");
        return false;
      }
      const auto* found = std::get_if<proto::Found>(reply);
      if (found == nullptr || !found->known || found->entry.name != to) {
        say("[Error: unknown client " + to + "; type list to see the table]");
        return true;
      }
      table_.learn(found->entry);
      observe(found->entry);
      send_known(to, text, true);
      return true;
    });
  });
}

bool Client::may_send(const std::string& to) {
  if (auto pin = state_db_->pinned(to); pin && state_db_->blocked(*pin)) {
    say("[Error: you blocked " + to + "; type unblock " + to + " to send to them]");
    return false;
  }
  if (state_db_->changed(to)) {
    warn_changed(to);
    return false;
  }
  if (!usable_key(to)) {
    say("[Error: no key known for " + to + "]");
    return false;
  }
  return true;
}

void Client::send_known(const std::string& to, const std::string& text, bool admitted) {
  if (!may_send(to)) return;
  if (!admitted && !room_for_one()) return;
  enqueue(to, [this, to, text](bool answering) { start_message(to, text, answering); });
}

void Client::start_message(const std::string& to, const std::string& text, bool answering) {
  const proto::Entry* e = table_.find(to);
  if (e == nullptr) return say("[Error: unknown client " + to + "]");
  // Checked again: a block or a key change may have come while it waited.
  if (!may_send(to)) return;
  auto key = usable_key(to);
  // Sealed once, when it leaves: the same bytes go to the peer and, if it does not answer, to
  // the server.
  std::uint64_t mid = core_.next_id();
  std::string body = identity::seal_direct(pair(*key), mid, now_ms(), to, text);
  // The messages before it got no answer from `to` either: treated as offline (SPEC §3), the
  // rest of a burst goes to the server in order instead of waiting 3 s a window.
  if (!e->online || !answering) {
    say("[" + to + " is offline, message sent to server.]");
    return send_save(to, body, mid, 0);
  }
  send_direct(to, body, mid, 0);
}

// `round` 0 is the first try; 1 follows the server's "exists" and never loops back to it.
void Client::send_direct(const std::string& to, const std::string& body, std::uint64_t mid, int round) {
  const proto::Entry* e = table_.find(to);
  if (e == nullptr) return say("[Error: unknown client " + to + "]");
  lane_request(to, proto::Direct{mid, options_.name, body}, endpoint_of(*e),
               [this, to, body, mid, round](const proto::Message* reply) {
                 // Only a receipt sealed by the recipient's key says it has the message; anything
                 // else counts as no answer, and the message goes to the server.
                 const auto* receipt = reply != nullptr ? std::get_if<proto::Receipt>(reply) : nullptr;
                 auto key = usable_key(to);
                 if (receipt != nullptr && key &&
                     identity::check_receipt(pair(*key), receipt->body, mid, options_.name)) {
                   say("[Message received by " + to + ".]");
                   return true;
                 }
                 if (reply != nullptr) ++stats_.unauthenticated;
                 // After this message's own retries, never because of the window.
                 say("[No ACK from " + to + ", message sent to server.]");
                 send_save(to, body, mid, round);
                 return false;
               });
}

void Client::send_save(const std::string& to, const std::string& body, std::uint64_t mid, int round) {
  // A message already accepted: queued behind the other server requests, never refused here.
  enqueue("", [this, to, body, mid, round](bool answering) {
    if (!answering) return say("[Server not responding.]");
    proto::Save save{core_.next_id(), options_.name, to, mid, round > 0, body};
    lane_request("", save, server(), [this, to, body, mid, round](const proto::Message* any) {
      const proto::Message* reply = answer<proto::Ack, proto::Exists, proto::Refused>(any);
      if (reply == nullptr) {
        say("[Server not responding.]");
        return any != nullptr;
      }
      if (std::get_if<proto::Exists>(reply)) {
        say("[Client " + to + " exists!!]");
        // Back to the peer, ahead of the messages typed after it.
        enqueue(to, [this, to, body, mid, round](bool reachable) {
          if (reachable) return send_direct(to, body, mid, round + 1);
          say("[" + to + " is offline, message sent to server.]");
          send_save(to, body, mid, round + 1);
        }, true);
        return true;
      }
      if (auto* no = std::get_if<proto::Refused>(reply)) {
        say("[Server refused the message: " + no->reason + "]");
        check_session();
        return true;
      }
      say("[Messages received by the server and saved]");
      return true;
    });
  });
}

// ---------------------------------------------------------------- registration and keep-alives

void Client::send_register(Reason why) {
  if (why == Reason::first || why == Reason::back) state_ = State::registering;
  if (why == Reason::rejoin) rejoining_ = true;
  proto::Register reg{core_.next_id(), options_.name, me_.public_key(),
                      static_cast<std::uint64_t>(options_.keepalive.count()), {}, {}};
  // The user waits for the answer to a `reg` typed (end of input waits for it too).
  server_request(reg, [this, why](const proto::Message* reply) {
    // The server's challenge: sign it to prove the key (and that we receive at this address).
    if (const auto* ch = reply != nullptr ? std::get_if<proto::Challenge>(reply) : nullptr)
      return send_proof(why, ch->token);
    on_registered(reply, why);
  }, std::nullopt, why == Reason::typed || why == Reason::back);
}

void Client::send_proof(Reason why, const std::string& token) {
  proto::Register reg{core_.next_id(), options_.name, me_.public_key(),
                      static_cast<std::uint64_t>(options_.keepalive.count()), token,
                      identity::register_proof(me_, options_.name, token)};
  server_request(reg, [this, why](const proto::Message* reply) { on_registered(reply, why); }, std::nullopt,
                 why == Reason::typed || why == Reason::back);
}

void Client::on_registered(const proto::Message* reply, Reason why) {
  if (why == Reason::rejoin) rejoining_ = false;
  if (reply == nullptr) {
    // Our own re-registration: the keep-alives go on, and the next answer tries again.
    if (why == Reason::rejoin) return;
    if (why == Reason::typed) return say("[Server not responding]");
    // At start, each server once before giving up.
    if (why == Reason::first && ++tried_ < servers_.size()) {
      next_server();
      return send_register(Reason::first);
    }
    return fail_and_exit("[Server not responding]");
  }
  tried_ = 0;
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
        // Another server shares the store: it holds what was saved for us meanwhile.
        if (servers_.size() > 1) {
          next_server();
          return send_register(Reason::rejoin);
        }
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

void Client::next_server() {
  auto text = [](const udp::endpoint& e) { return e.address().to_string() + ":" + std::to_string(e.port()); };
  const udp::endpoint old = server();
  current_ = (current_ + 1) % servers_.size();
  say(std::string("[Server ").append(text(old)).append(" not responding, now using ").append(text(server())).append(".]"));
  // The next one gets its own intervals of silence before it is given up on.
  last_answer_ = core_.now();
}

bool Client::known_server(const udp::endpoint& from) const {
  return std::find(servers_.begin(), servers_.end(), from) != servers_.end();
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
  void operator()(const proto::FileOffer& m) { c.on_file_offer(m, from); }
  // Requests only the server is sent.
  void operator()(const proto::Register& m) { c.unexpected(m, from); }
  void operator()(const proto::Dereg& m) { c.unexpected(m, from); }
  void operator()(const proto::Save& m) { c.unexpected(m, from); }
  void operator()(const proto::Channel& m) { c.unexpected(m, from); }
  void operator()(const proto::KeepAlive& m) { c.unexpected(m, from); }
  void operator()(const proto::Lookup& m) { c.unexpected(m, from); }
  void operator()(const proto::FilePut& m) { c.unexpected(m, from); }
  void operator()(const proto::FileCommit& m) { c.unexpected(m, from); }
  void operator()(const proto::FileGet& m) { c.unexpected(m, from); }
  void operator()(const proto::FileDone& m) { c.unexpected(m, from); }
  // Replies: the core hands them to the request they answer, never here.
  void operator()(const proto::Ack& m) { c.unexpected(m, from); }
  void operator()(const proto::Challenge& m) { c.unexpected(m, from); }
  void operator()(const proto::Receipt& m) { c.unexpected(m, from); }
  void operator()(const proto::RegOk& m) { c.unexpected(m, from); }
  void operator()(const proto::RegErr& m) { c.unexpected(m, from); }
  void operator()(const proto::Exists& m) { c.unexpected(m, from); }
  void operator()(const proto::Refused& m) { c.unexpected(m, from); }
  void operator()(const proto::Alive& m) { c.unexpected(m, from); }
  void operator()(const proto::Found& m) { c.unexpected(m, from); }
};

void Client::on_message(const proto::Message& m, const udp::endpoint& from) {
  if (from == server()) heard_from_server();
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
  auto key = usable_key(d.from);
  // Opened once: a text message or a file control message, told apart by the sealed kind.
  std::optional<identity::OpenedBody> body;
  if (key) body = identity::open_addressed_body(pair(*key), d.body, options_.name);
  const bool authentic = body && body->message.mid == d.id;
  using Kind = identity::OpenedBody::Kind;
  if (authentic && body->kind == Kind::file && on_file_control(d, from, *key, body->message)) return;
  if (!authentic || body->kind != Kind::direct) {
    // Not sealed by the key the table gives that name (forged, or its key changed and is not
    // trusted), or a file control message that does not decode: not shown and not answered.
    ++stats_.unauthenticated;
    spdlog::debug("direct message claiming to be from {} did not authenticate", d.from);
    if (state_db_->changed(d.from)) warn_once(d.from);
    return core_.forget(from, d.id);
  }
  const identity::Opened& m = body->message;
  if (state_db_->blocked(*key)) ++stats_.blocked;
  else if (first_seen(*key, kSeenDirect, d.id, m.sent_ms)) say(d.from + ": " + printable(m.text));
  // Answered either way (a copy seen before is a retry whose receipt was lost).
  core_.reply(from, proto::Receipt{d.id, identity::seal_receipt(pair(*key), d.id, d.from)});
}

bool Client::for_me(const char* type, const std::string& recipient, const udp::endpoint& from, bool any_server) {
  if (any_server ? !known_server(from) : from != server()) {
    ++stats_.not_from_server;
    return false;
  }
  if (recipient != options_.name) {
    // Meant for another client, e.g. one that had our address before us: an answer would tell
    // the server that client is still here (and, for a delivery, let it delete its messages).
    ++stats_.not_for_me;
    spdlog::debug("ignored {} for {}: we are {}", type, recipient, options_.name);
    return false;
  }
  return state_ == State::online;
}

void Client::on_relay(const proto::Relay& r, const udp::endpoint& from) {
  if (!for_me("relay", r.recipient, from, true)) return core_.forget(from, r.id);
  auto key = usable_key(r.from);
  std::optional<identity::Opened> m;
  if (key) m = identity::open_channel(*key, r.from, r.mid, r.body);
  // Acknowledged even when not shown: the server could not make it authentic by resending it.
  if (!m) ++stats_.unauthenticated;
  else if (state_db_->blocked(*key)) ++stats_.blocked;
  else if (first_seen(*key, kSeenChannel, r.mid, m->sent_ms))
    say("[Channel_Message " + r.from + ": " + printable(m->text) + "]");
  core_.reply(from, proto::Ack{r.id});
}

void Client::on_probe(const proto::Probe& p, const udp::endpoint& from) {
  if (!for_me("probe", p.recipient, from, true)) return core_.forget(from, p.id);
  core_.reply(from, proto::Ack{p.id});
}

void Client::on_table(const proto::Table& t, const udp::endpoint& from) {
  // Only the server's own address may change the table; before the welcome, wait for it.
  if (!for_me("table", t.recipient, from)) return core_.forget(from, t.id);
  // Our own registration is on its way: the update is taken after its welcome (the server
  // sends it again), so "[Client table updated.]" never comes before "[Welcome, ...]".
  if (rejoining_) return core_.forget(from, t.id);
  Applied a = table_.apply(t);
  core_.reply(from, proto::Ack{t.id, a.epoch, a.have});
  for (const auto& e : t.entries) observe(e);
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
  // Acknowledged, they are deleted: only ever by the client they were saved for.
  if (!for_me("stored", s.recipient, from)) return core_.forget(from, s.id);
  for (const auto& i : s.items) {
    // The server says which key the sender had; a sender we never saw is pinned to it now,
    // like a table row. Anything else is checked against the pin.
    observe(proto::Entry{i.from, "", 0, false, i.key});
    // Sealed by the new key of a name whose change waits for `trust`: held until then.
    if (auto pending = state_db_->pending(i.from); pending && *pending == i.key) {
      if (held_.size() < kMaxHeld) held_.push_back(i);
      continue;
    }
    show_stored(i);
  }
  // Acknowledged as a whole, shown or not: what did not authenticate or is blocked is
  // discarded, so it does not come back.
  core_.reply(from, proto::Ack{s.id});
}

void Client::on_file_offer(const proto::FileOffer& f, const udp::endpoint& from) {
  if (!for_me("file_offer", f.recipient, from)) return core_.forget(from, f.id);
  // Not checked as seen before: the server offers a kept file at every registration until it
  // is downloaded or declined, and can only ever send it while it keeps it.
  observe(proto::Entry{f.from, "", 0, false, f.key});
  auto key = usable_key(f.from);
  std::optional<identity::OpenedBody> m;
  if (key && *key == f.key) m = identity::open_addressed_body(pair(*key), f.body, options_.name);
  std::optional<files::Control> c;
  if (m && m->kind == identity::OpenedBody::Kind::file && m->message.mid == f.transfer) c = files::decode(m->message.text);
  const auto* offer = c ? std::get_if<files::ctl::Offer>(&*c) : nullptr;
  if (offer == nullptr || offer->transfer != f.transfer || offer->size != f.size) {
    ++stats_.unauthenticated;
  } else if (state_db_->blocked(*key)) {
    // Never shown: declined at once, so the server deletes it instead of offering it again.
    ++stats_.blocked;
    server_request(proto::FileDone{core_.next_id(), options_.name, f.transfer, false}, [](const proto::Message*) {},
                   std::nullopt, false);
  } else {
    transfers_->on_kept_offer(f.from, *offer);
  }
  core_.reply(from, proto::Ack{f.id});
}

void Client::show_held(const std::string& name) {
  std::vector<proto::StoredItem> mine;
  std::erase_if(held_, [&](const proto::StoredItem& i) {
    if (i.from != name) return false;
    mine.push_back(i);
    return true;
  });
  for (const auto& i : mine) show_stored(i);
}

void Client::show_stored(const proto::StoredItem& i) {
  auto key = usable_key(i.from);
  std::optional<identity::Opened> m;
  if (key && i.channel) m = identity::open_channel(*key, i.from, i.mid, i.body);
  else if (key) m = identity::open_direct(pair(*key), i.body, options_.name);
  if (!m || (!i.channel && m->mid != i.mid)) {
    ++stats_.unauthenticated;
    return;
  }
  if (state_db_->blocked(*key)) {
    ++stats_.blocked;
    return;
  }
  if (!first_seen(*key, i.channel ? kSeenChannel : kSeenDirect, i.mid, m->sent_ms)) return;
  std::string ts = format_timestamp(i.ts_us);
  if (i.channel) say("Channel_Message " + i.from + ": " + ts + " " + printable(m->text));
  else say(i.from + ": " + ts + " " + printable(m->text));
}

// ---------------------------------------------------------------- identities

void Client::observe(const proto::Entry& e) {
  // A key nothing can be sealed to (a server's lie) is never pinned: the name stays keyless.
  if (e.key == proto::Key{} || e.name == options_.name || !identity::usable(e.key)) return;
  if (state_db_->observe(e.name, e.key) == identity::PeerState::Seen::changed) warn_once(e.name);
}

void Client::warn_once(const std::string& name) {
  auto pending = state_db_->pending(name);
  if (pending && warned_.emplace(name, *pending).second) warn_changed(name);
}

void Client::warn_changed(const std::string& name) {
  say("[Warning: the identity of " + name + " changed. Compare fingerprints, then type trust " + name + "]");
}

std::optional<proto::Key> Client::usable_key(const std::string& name) const {
  if (name == options_.name) return me_.public_key();
  auto pin = state_db_->pinned(name);
  if (!pin || state_db_->changed(name)) return std::nullopt;
  const proto::Entry* e = table_.find(name);
  if (e != nullptr && e->key != *pin) return std::nullopt;
  return pin;
}

const identity::Pair& Client::pair(const proto::Key& peer) {
  auto it = pairs_.find(peer);
  if (it == pairs_.end()) it = pairs_.emplace(peer, identity::Pair(me_, peer)).first;
  return it->second;
}

bool Client::first_seen(const proto::Key& sender, std::uint8_t kind, std::uint64_t mid, std::uint64_t sent_ms) {
  if (state_db_->first_seen(sender, kind, mid, sent_ms, now_ms())) return true;
  ++stats_.replayed;
  return false;
}

std::uint64_t Client::now_ms() const { return static_cast<std::uint64_t>(std::max<std::int64_t>(core_.wall_us(), 0)) / 1000; }

}  // namespace chat::peer
