// The registry server's decisions: one handler per datagram type, sessions and keep-alives,
// table distribution, group commit, delivery of saved messages, the channel.
#include "registry/server.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <unordered_set>

namespace chat::registry {
namespace {

namespace proto = chat::protocol;

// Saved messages read per delivery step; the datagram takes as many as fit.
constexpr std::size_t kDeliveryRead = 64;
// ACKed messages are deleted in batches (a delete lost to a crash only means the message is
// delivered again, and the client shows it once): at most this many wait, for at most this long.
constexpr std::size_t kRemoveBatch = 1024;
constexpr auto kRemoveDelay = std::chrono::milliseconds(200);
// Table chunks kept encoded for the current table version, one per `have` clients lack it from.
constexpr std::size_t kChunkCache = 256;
// How often the server looks whether it has gone quiet (ServerOptions::on_quiet).
constexpr auto kQuietCheck = std::chrono::seconds(1);
// The keep-alive intervals a registration may ask for, in ms (the client's --keepalive range).
constexpr std::uint64_t kShortestKeepaliveMs = 100;
constexpr std::uint64_t kLongestKeepaliveMs = 3'600'000;

std::string where(const udp::endpoint& e) {
  return e.address().to_string() + ":" + std::to_string(e.port());
}

}  // namespace

Server::Server(ServerOptions options, std::unique_ptr<offline::Store> store, const transport::TimeSource& clock)
    : Server(std::move(options), offline::adapt(std::move(store)), clock) {}

Server::Server(ServerOptions options, std::unique_ptr<offline::AsyncStore> store, const transport::TimeSource& clock)
    : options_(std::move(options)),
      store_(std::move(store)),
      core_(transport::CoreOptions{options_.policy, options_.guard, options_.seed}, clock),
      table_(core_.random() >> 12 | 1),
      minter_(options_.seed) {
  core_.set_handler([this](const proto::Message& m, const udp::endpoint& from) { on_message(m, from); });
  depot_ = std::make_unique<Depot>(
      core_, *store_,
      DepotHost{
          .is_at = [this](const std::string& name, const udp::endpoint& from) { return is_at(name, from); },
          .key_of = [this](const std::string& name) { return key_of(name); },
          .store_failed = [this](const std::string& what, const std::string& why) { store_failed(what, why); },
          // Online here and past its registration's offers: offered now, not at its next registration.
          .kept =
              [this](const std::string& to) {
                const Session* s = session(to);
                const Client* c = table_.find(to);
                if (s != nullptr && s->files_offered && c != nullptr && c->online) depot_->offer(to, endpoint_of(*c));
              },
      },
      options_.files);
  core_.set_frame_handler([this](std::string_view bytes, const udp::endpoint& from) {
    if (from.address().is_v4()) depot_->on_frame(bytes, from);
  });
  // A restart keeps every name, address and online flag; clients that were online keep a
  // session (until their keep-alives prove otherwise), and the new epoch tells them to take a
  // fresh snapshot on the next update. Of a shared store's rows, only the sessions this server
  // held are its own.
  offline::Snapshot snapshot = store_->load();
  mailbox_ = std::move(snapshot.mailboxes);
  legacy_ = snapshot.legacy;
  for (std::size_t i = 0; i < snapshot.clients.size(); ++i) {
    const auto& row = snapshot.clients[i];
    proto::Key key{};
    if (row.key.size() == key.size()) std::copy(row.key.begin(), row.key.end(), key.begin());
    table_.upsert(row.name, row.ip, row.port, row.online, key);
    if (row.online && i < snapshot.here.size() && snapshot.here[i]) {
      auto s = std::make_shared<Session>();
      s->heard = core_.now();
      // Its own interval is not stored: ours until it registers again (a client with a longer
      // one that goes quiet meanwhile hears "lost track" and registers again).
      s->keepalive = options_.keepalive;
      sessions_[row.name] = std::move(s);
    }
  }
}

void Server::start() {
  spdlog::info("server ready, {} clients known", table_.size());
  if (legacy_ > 0)
    spdlog::warn("{} messages saved by protocol version 1 cannot be authenticated: kept in legacy_messages, "
                 "never delivered", legacy_);
  store_->watch([this](const offline::Change& c) { on_change(c); });
  log_stats();
  core_.after(options_.keepalive, [this] { expire_silent(); });
  depot_->start();
  if (options_.on_quiet) core_.after(kQuietCheck, [this] { check_quiet(); });
}

void Server::check_quiet() {
  std::uint64_t received = core_.counters().received;
  if (core_.in_flight() == 0 && received != quiet_at_received_) {
    quiet_at_received_ = received;
    chunks_ = {};  // up to 256 encoded table chunks, rebuilt when needed
    options_.on_quiet();
  }
  core_.after(kQuietCheck, [this] { check_quiet(); });
}

void Server::log_stats() {
  const transport::Counters& c = core_.counters();
  std::uint64_t dropped = c.refused_total() + c.rate_limited + c.amplification + c.in_flight_refused;
  std::uint64_t before = last_logged_.refused_total() + last_logged_.rate_limited +
                         last_logged_.amplification + last_logged_.in_flight_refused;
  if (dropped != before) {
    std::string why;
    for (std::size_t i = 0; i < c.refused.size(); ++i)
      if (c.refused[i] != 0)
        why += fmt::format(" {}={}", proto::to_string(static_cast<proto::DecodeError>(i)), c.refused[i]);
    spdlog::info("dropped so far: {} datagrams (rate_limited={} not_sent_unproven={} in_flight_refused={}{}); "
                 "{} received, {} duplicates, {} unexpected",
                 dropped, c.rate_limited, c.amplification, c.in_flight_refused, why, c.received, c.duplicates,
                 stats_.unexpected);
    last_logged_ = c;
  }
  core_.after(options_.stats_interval, [this] { log_stats(); });
}

void Server::stop() {
  flush();
  core_.close();
  store_->close();
  const auto& c = core_.counters();
  spdlog::info("server stopped: {} datagrams received, {} refused, {} duplicates", c.received,
               c.refused_total(), c.duplicates);
}

// One overload per datagram type, none generic: a type added to the protocol and not
// handled here does not compile.
struct Server::Dispatch {
  Server& s;
  const udp::endpoint& from;
  void operator()(const proto::Register& m) { s.on_register(m, from); }
  void operator()(const proto::Dereg& m) { s.on_dereg(m, from); }
  void operator()(const proto::Save& m) { s.on_save(m, from); }
  void operator()(const proto::Channel& m) { s.on_channel(m, from); }
  void operator()(const proto::KeepAlive& m) { s.on_keepalive(m, from); }
  void operator()(const proto::Lookup& m) { s.on_lookup(m, from); }
  void operator()(const proto::FilePut& m) { s.depot_->on_put(m, from); }
  void operator()(const proto::FileCommit& m) { s.depot_->on_commit(m, from); }
  void operator()(const proto::FileGet& m) { s.depot_->on_get(m, from); }
  void operator()(const proto::FileDone& m) { s.depot_->on_done(m, from); }
  // Requests only a peer is sent.
  void operator()(const proto::Direct& m) { s.unexpected(m, from); }
  void operator()(const proto::Relay& m) { s.unexpected(m, from); }
  void operator()(const proto::Probe& m) { s.unexpected(m, from); }
  void operator()(const proto::Table& m) { s.unexpected(m, from); }
  void operator()(const proto::Stored& m) { s.unexpected(m, from); }
  void operator()(const proto::FileOffer& m) { s.unexpected(m, from); }
  // Replies: the core hands them to the request they answer, never here.
  void operator()(const proto::Ack& m) { s.unexpected(m, from); }
  void operator()(const proto::Challenge& m) { s.unexpected(m, from); }
  void operator()(const proto::Receipt& m) { s.unexpected(m, from); }
  void operator()(const proto::RegOk& m) { s.unexpected(m, from); }
  void operator()(const proto::RegErr& m) { s.unexpected(m, from); }
  void operator()(const proto::Exists& m) { s.unexpected(m, from); }
  void operator()(const proto::Refused& m) { s.unexpected(m, from); }
  void operator()(const proto::Alive& m) { s.unexpected(m, from); }
  void operator()(const proto::Found& m) { s.unexpected(m, from); }
};

void Server::on_message(const proto::Message& m, const udp::endpoint& from) {
  if (!from.address().is_v4()) return;
  try {
    std::visit(Dispatch{*this, from}, m);
  } catch (const std::exception& e) {
    // The store failing must not take the server down; the request stays unanswered.
    spdlog::error("{} from {} failed: {}", proto::type_name(m), where(from), e.what());
    core_.forget(from, proto::request_id(m));
  }
}

void Server::unexpected(const proto::Message& m, const udp::endpoint& from) {
  ++stats_.unexpected;
  spdlog::debug("ignored {} from {}", proto::type_name(m), where(from));
  core_.forget(from, proto::request_id(m));
}

// ---------------------------------------------------------------- sessions

Server::Session* Server::session(const std::string& name) {
  auto it = sessions_.find(name);
  return it == sessions_.end() ? nullptr : it->second.get();
}

void Server::end_session(const std::string& name) {
  auto it = sessions_.find(name);
  if (it == sessions_.end()) return;
  core_.abandon(it->second->stored_request);
  core_.abandon(it->second->table_request);
  sessions_.erase(it);
  // Its registration's row, not yet committed, is no longer this server's to claim.
  next_.claimed.erase(name);
}

bool Server::same_session(const std::string& name, const SessionRef& ref) {
  return ref.lock().get() == session(name);
}

bool Server::is_at(const std::string& name, const udp::endpoint& from) {
  const Client* c = table_.find(name);
  Session* s = session(name);
  if (c == nullptr || s == nullptr || endpoint_of(*c) != from) return false;
  s->heard = core_.now();
  return true;
}

bool Server::live(const std::string& name, const udp::endpoint& from) {
  const Client* c = table_.find(name);
  Session* s = session(name);
  // A client still receiving its saved messages is offline in the table but live; one the
  // server marked offline (an unanswered probe or relay) is not, so it registers again.
  return c != nullptr && s != nullptr && endpoint_of(*c) == from &&
         (c->online || s->delivery != Session::Delivery::none);
}

void Server::on_keepalive(const proto::KeepAlive& k, const udp::endpoint& from) {
  bool is_live = live(k.name, from);
  core_.reply(from, proto::Alive{k.id, is_live});
  if (!is_live) return;
  Session& s = *session(k.name);
  s.heard = core_.now();
  resume(k.name, s);
}

void Server::resume(const std::string& name, Session& s) {
  // At most once per half interval: keep-alives (forged ones too) cannot make the server
  // resend stalled updates faster than a genuine client's would.
  if (core_.now() - s.resumed < s.keepalive / 2) return;
  s.resumed = core_.now();
  if (s.sync == Session::Sync::stalled) s.sync = Session::Sync::idle;
  sync(name);
  if (s.delivery == Session::Delivery::stalled) {
    s.delivery = Session::Delivery::none;
    deliver(name);
  }
}

void Server::expire_silent() {
  std::vector<std::string> silent;
  transport::Duration next = options_.keepalive;  // checked as often as the shortest interval asks
  for (const auto& [name, s] : sessions_) {
    if (core_.now() - s->heard > kMissedKeepalives * s->keepalive) silent.push_back(name);
    else next = std::min(next, s->keepalive);
  }
  for (const auto& name : silent) {
    end_session(name);
    ++stats_.expired;
    spdlog::info("{} is offline (no keep-alive for {} intervals)", name, kMissedKeepalives);
    set_online(name, false);
  }
  core_.after(next, [this] { expire_silent(); });
}

void Server::on_lookup(const proto::Lookup& l, const udp::endpoint& from) {
  // The same row every registered client is sent in its table anyway.
  const Client* c = table_.find(l.name);
  if (c == nullptr) return core_.reply(from, proto::Found{l.id, false, proto::Entry{l.name, "", 0, false}});
  core_.reply(from, proto::Found{l.id, true, proto::Entry{c->name, c->ip, c->port, c->online, c->key}});
}

// ---------------------------------------------------------------- registration

void Server::on_register(const proto::Register& r, const udp::endpoint& from) {
  const Client* c = table_.find(r.name);
  // A name is its first key's for good (until the operator releases it), online or not.
  if (c != nullptr && c->bound() && c->key != r.key) {
    ++stats_.other_key;
    spdlog::info("refused {} from {}: bound to another identity", r.name, where(from));
    core_.reply(from, proto::RegErr{r.id, "the name " + r.name + " belongs to another identity"});
    return;
  }
  if (c == nullptr && table_.size() >= options_.max_clients) {
    spdlog::info("refused {} from {}: the server is full", r.name, where(from));
    core_.reply(from, proto::RegErr{r.id, "the server is full (" + std::to_string(options_.max_clients) + " clients)"});
    return;
  }
  // Steady time: a token's age does not depend on the wall clock being right.
  const auto now_us = std::chrono::duration_cast<std::chrono::microseconds>(core_.now().time_since_epoch()).count();
  const std::uint32_t ip4 = from.address().to_v4().to_uint();
  if (r.token.empty()) {
    // Prove the key and that you receive at this address: sign what only this address was sent.
    core_.reply(from, proto::Challenge{r.id, minter_.mint(now_us, r.name, r.key, ip4, from.port())});
    return;
  }
  auto minted = minter_.check(r.token, now_us, r.name, r.key, ip4, from.port());
  if (!minted || !identity::check_register_proof(r.key, r.name, r.token, r.proof)) {
    ++stats_.bad_proofs;
    spdlog::info("refused {} from {}: the proof of identity did not check", r.name, where(from));
    core_.reply(from, proto::RegErr{r.id, "the proof of identity did not check (stale or forged)"});
    return;
  }
  // Each name's tokens are used in the order they were minted, once: a replay, however old, is refused.
  auto [last, first] = last_token_.try_emplace(r.name, *minted);
  if (!first && *minted <= last->second) {
    ++stats_.replayed;
    spdlog::info("refused {} from {}: a replayed registration", r.name, where(from));
    core_.reply(from, proto::RegErr{r.id, "this registration was already used"});
    return;
  }
  last->second = *minted;
  // The token came back from this address: it receives what it is sent.
  core_.validate(from);
  on_proven(r, from);
}

void Server::on_proven(const proto::Register& r, const udp::endpoint& from) {
  const Client* c = table_.find(r.name);
  std::string ip = from.address().to_string();
  if (table_.admit(r.name, ip, from.port()) == Admit::accept) {
    admit(r, from);
    return;
  }
  // The name is online elsewhere: refuse only if that holder still answers.
  udp::endpoint old = endpoint_of(*c);
  probe(r.name, old, [this, r, from, old](bool alive) {
    const Client* holder = table_.find(r.name);
    if (holder != nullptr && holder->bound() && holder->key != r.key) {
      core_.reply(from, proto::RegErr{r.id, "the name " + r.name + " belongs to another identity"});
      return;
    }
    if (alive && holder != nullptr && holder->online && endpoint_of(*holder) == old) {
      spdlog::info("refused {} from {}: name in use at {}", r.name, where(from), where(old));
      core_.reply(from, proto::RegErr{r.id, "the name " + r.name + " is in use by an online client"});
      return;
    }
    admit(r, from);
  });
}

void Server::admit(const proto::Register& r, const udp::endpoint& from) {
  // A delivery restarts from the oldest stored message: what was ACKed must be gone first.
  if (undeleted_.contains(r.name)) remove_delivered();
  std::size_t pending = mailbox(r.name);
  end_session(r.name);
  auto s = std::make_shared<Session>();
  s->heard = core_.now();
  s->keepalive = options_.keepalive;
  if (r.every_ms > 0) {
    // Clamped as a number first: any u64 may come off the wire.
    auto ms = std::clamp<std::uint64_t>(r.every_ms, kShortestKeepaliveMs, kLongestKeepaliveMs);
    s->keepalive = std::chrono::milliseconds(static_cast<std::int64_t>(ms));
  }
  sessions_[r.name] = std::move(s);
  ++stats_.registered;
  const Client* before = table_.find(r.name);
  // A binding still on its way to the store is no binding yet: this registration waits for
  // its own row too (the first may yet fail, or be refused by the store).
  const bool binds = before == nullptr || !before->bound() || binding_.contains(r.name);
  // With messages waiting, the client becomes online only once they are delivered (SPEC §5).
  // The row is written as this server's even if unchanged: with a shared store, the session
  // is here now (the client may have come from another server).
  const std::string ip = from.address().to_string();
  next_.claimed[r.name] = offline::ClientRow{r.name, ip, from.port(), pending == 0, std::string(r.key.begin(), r.key.end())};
  table_.upsert(r.name, ip, from.port(), pending == 0, r.key);
  table_changed(r.name);
  spdlog::info("registered {} at {}, {} saved messages{}", r.name, where(from), pending,
               binds ? ", name bound to its identity" : "");
  auto welcome = [this, r, from, pending] {
    core_.reply(from, proto::RegOk{r.id, table_.epoch(), pending});
    sync(r.name);
    if (pending > 0) deliver(r.name);
    else offer_files(r.name);
  };
  if (!binds) return welcome();
  // The binding is the name's for good: the client hears "registered" only once it is durable.
  SessionRef ref = sessions_[r.name];
  ++binding_[r.name];
  next_.after_rows.emplace_back(r.name, [this, r, from, ref, welcome](RowResult result) {
    if (auto b = binding_.find(r.name); b != binding_.end() && --b->second == 0) binding_.erase(b);
    if (!same_session(r.name, ref) || ref.expired()) return;
    if (result == RowResult::written) return welcome();
    if (result == RowResult::refused) {
      // Another server bound the name first: its row reaches this table through the store.
      ++stats_.other_key;
      spdlog::info("refused {} from {}: bound to another identity on another server", r.name, where(from));
      core_.reply(from, proto::RegErr{r.id, "the name " + r.name + " belongs to another identity"});
    } else {
      core_.reply(from, proto::RegErr{r.id, "the server could not save the registration"});
    }
    end_session(r.name);
    // Not durable, so not bound: the next registration of the name binds it again.
    const Client* c = table_.find(r.name);
    if (c != nullptr && c->key == r.key && table_.upsert(r.name, c->ip, c->port, false, {})) table_changed(r.name);
  });
}

void Server::on_dereg(const proto::Dereg& r, const udp::endpoint& from) {
  const Client* c = table_.find(r.name);
  if (c == nullptr || endpoint_of(*c) != from) {
    core_.reply(from, proto::Refused{r.id, "not registered from this address"});
    return;
  }
  end_session(r.name);
  set_online(r.name, false);
  spdlog::info("{} left (dereg)", r.name);
  core_.reply(from, proto::Ack{r.id});
}

udp::endpoint Server::endpoint_of(const Client& c) {
  error_code ec;
  auto addr = net::ip::make_address_v4(c.ip, ec);
  return udp::endpoint(addr, c.port);
}

void Server::probe(const std::string& name, const udp::endpoint& to, std::function<void(bool alive)> then) {
  transport::RetryPolicy p = transport::RetryPolicy{options_.policy.timeout, options_.relay_retries}.within(
      options_.policy.timeout);
  core_.request(proto::Probe{core_.next_id(), name}, to,
                [then = std::move(then)](const proto::Message* reply) { then(reply != nullptr); }, p);
}

// ---------------------------------------------------------------- offline messages

void Server::on_save(const proto::Save& r, const udp::endpoint& from) {
  if (!is_at(r.from, from)) {
    core_.reply(from, proto::Refused{r.id, "you are not registered from this address"});
    return;
  }
  const Client* target = table_.find(r.to);
  if (target == nullptr) {
    core_.reply(from, proto::Refused{r.id, "unknown client " + r.to});
    return;
  }
  auto refuse_full = [this, r, from] {
    core_.reply(from, proto::Refused{r.id, r.to + "'s mailbox is full (" + std::to_string(options_.max_stored) +
                                              " saved messages)"});
  };
  if (mailbox_full(r.to)) return refuse_full();
  // Stamped on arrival, before any probe: saved messages are shown in arrival order.
  std::int64_t ts = core_.wall_us();
  auto store_it = [this, r, from, ts, refuse_full] {
    if (mailbox_full(r.to)) return refuse_full();  // filled while the probe was out
    save({r.to, r.from, key_of(r.from), offline::Kind::direct, ts, r.mid, r.body}, [this, r, from](bool ok) {
      if (ok) core_.reply(from, proto::Ack{r.id});
      else core_.reply(from, proto::Refused{r.id, "the server could not save the message"});
    });
  };
  if (!target->online || r.force) {
    store_it();
    return;
  }
  // The table says online: believe it only if the recipient answers (SPEC §5).
  udp::endpoint holder = endpoint_of(*target);
  SessionRef ref = sessions_.contains(r.to) ? SessionRef(sessions_[r.to]) : SessionRef();
  probe(r.to, holder, [this, r, from, store_it, holder, ref](bool alive) {
    if (alive) {
      core_.reply(from, proto::Exists{r.id, r.to});
      sync(r.from);  // "plus the current table"
      return;
    }
    // The verdict is about the session that was probed: one the recipient started since
    // (it registered again meanwhile) is not marked offline by it.
    const Client* c = table_.find(r.to);
    if (same_session(r.to, ref) && c != nullptr && endpoint_of(*c) == holder) mark_silent(r.to);
    store_it();
  });
}

std::string Server::key_of(const std::string& name) const {
  const Client* c = table_.find(name);
  if (c == nullptr) return {};
  return std::string(c->key.begin(), c->key.end());
}

std::size_t& Server::mailbox(const std::string& name) { return mailbox_[name]; }

bool Server::mailbox_full(const std::string& name) {
  std::size_t n = mailbox(name);
  for (const Commit* c : {&next_, &committing_})
    if (auto q = c->per_recipient.find(name); q != c->per_recipient.end()) n += q->second;
  return n >= options_.max_stored;
}

void Server::store_failed(const std::string& what, const std::string& why) {
  ++stats_.store_errors;
  spdlog::error("{} failed: {}", what, why);
}

void Server::save(offline::NewMessage m, AfterCommit after) {
  ++next_.per_recipient[m.to];
  next_.saves.push_back(std::move(m));
  if (after) next_.after_saves.push_back(std::move(after));
  schedule_flush();
}

void Server::schedule_flush() {
  if (flush_scheduled_) return;
  flush_scheduled_ = true;
  // Runs after the datagrams already queued: saves arriving together share one commit.
  core_.defer([this] { flush(); });
}

void Server::flush() {
  flush_scheduled_ = false;
  // One commit at a time: what queues meanwhile goes in the next, when this one ends.
  if (commit_in_flight_) return;
  if (next_.empty()) return remove_delivered();
  commit_in_flight_ = true;
  std::swap(committing_, next_);
  const transport::Time started = core_.now();
  if (committing_.saves.empty()) return commit_rows(started);
  store_->save(committing_.saves, [this, started](offline::Reply<std::vector<bool>> r) {
    if (!r.ok()) store_failed(fmt::format("saving {} messages", committing_.saves.size()), r.error);
    const std::vector<bool> inserted = r.ok() ? std::move(*r.value) : std::vector<bool>{};
    // The mailbox counts committed rows only (a retried save that found its copy stored adds
    // nothing), so a delivery that finds the store empty before this commit cannot hide them.
    std::vector<offline::NewMessage> batch;
    batch.swap(committing_.saves);
    for (std::size_t i = 0; i < batch.size() && i < inserted.size(); ++i)
      if (inserted[i]) ++mailbox(batch[i].to);
    committing_.per_recipient.clear();
    std::vector<AfterCommit> callbacks;
    callbacks.swap(committing_.after_saves);
    for (auto& cb : callbacks) cb(r.ok());
    std::size_t saved = 0;
    for (std::size_t i = 0; i < batch.size() && i < inserted.size(); ++i) {
      const auto& m = batch[i];
      if (!inserted[i]) continue;
      ++saved;
      // Per message only at debug level: a write(2) each was a fifth of a save's cost (issue 13).
      spdlog::debug("saved a {} message from {} for {}", m.kind == offline::Kind::channel ? "channel" : "direct",
                    m.from, m.to);
      // A recipient that came back while this was being committed still gets it now; one whose
      // delivery already passed its arrival time goes over its mailbox once more at the end.
      Session* s = session(m.to);
      if (s == nullptr) continue;
      if (s->delivery == Session::Delivery::none) deliver(m.to);
      else if (offline::Cursor{m.ts_us, 0} < s->sent) s->rewound = false;
    }
    stats_.saved += saved;
    if (saved > 0) spdlog::info("saved {} message{} in one commit", saved, saved == 1 ? "" : "s");
    commit_rows(started);
  });
}

void Server::commit_rows(transport::Time started) {
  if (committing_.rows.empty()) return commit_done(started);
  std::vector<offline::RowWrite> rows;
  std::vector<std::string> written;  // the row names, in the order of `rows`
  std::unordered_set<std::string> seen;
  for (const auto& n : committing_.rows) {
    const Client* c = table_.find(n);
    if (c == nullptr || !seen.insert(n).second) continue;
    offline::ClientRow row{c->name, c->ip, c->port, c->online, c->bound() ? key_of(c->name) : std::string()};
    // Registered here since the last commit: the whole row as registered, as this server's
    // (the store refuses it if another server bound the name first); otherwise only its online
    // flag (a shared store writes it only where this server holds the row and it still has
    // this address).
    auto claim = committing_.claimed.find(n);
    const bool here = claim != committing_.claimed.end();
    if (here && (row.ip != claim->second.ip || row.port != claim->second.port || row.key != claim->second.key))
      row = claim->second;
    rows.push_back({std::move(row), here});
    written.push_back(n);
  }
  committing_.rows.clear();
  committing_.claimed.clear();
  store_->store_clients(std::move(rows), [this, started, written](offline::Reply<std::vector<bool>> r) {
    if (!r.ok()) store_failed("saving the client table", r.error);
    std::unordered_map<std::string, bool> result;
    for (std::size_t i = 0; i < written.size(); ++i) result[written[i]] = r.ok() && i < r.value->size() && (*r.value)[i];
    std::vector<std::pair<std::string, AfterRow>> callbacks;
    callbacks.swap(committing_.after_rows);
    for (auto& [name, cb] : callbacks) {
      auto it = result.find(name);
      cb(!r.ok() ? RowResult::failed
                 : (it != result.end() && it->second ? RowResult::written : RowResult::refused));
    }
    commit_done(started);
  });
}

void Server::commit_done(transport::Time started) {
  const auto us = static_cast<std::uint64_t>(
      std::max<std::int64_t>(std::chrono::duration_cast<std::chrono::microseconds>(core_.now() - started).count(), 0));
  const auto& bounds = ServerCounters::kCommitBoundsUs;
  ++stats_.commits[static_cast<std::size_t>(std::lower_bound(bounds.begin(), bounds.end(), us) - bounds.begin())];
  stats_.commit_us_sum += us;
  commit_in_flight_ = false;
  remove_delivered();
  // What queued during the commit goes now.
  if (!next_.empty()) schedule_flush();
}

void Server::reach(const std::string& name, const udp::endpoint& to, std::function<void(bool)> then) {
  if (core_.allowance(to) >= proto::kMaxDatagram) return then(true);
  // Not yet proven to receive (a spoofed registration?): a small probe first, so the server
  // never sends an address much more than it received from it.
  probe(name, to, std::move(then));
}

void Server::reach_client(const std::string& name, std::function<void(Session&)> then,
                          std::function<void(Session&)> failed) {
  SessionRef ref = sessions_[name];
  reach(name, endpoint_of(*table_.find(name)), [ref, then = std::move(then), failed = std::move(failed)](bool ok) {
    // sessions_ holds a session's only strong reference: replaced or ended, it is gone here.
    auto s = ref.lock();
    if (s == nullptr) return;  // a new session or a leave since
    if (!ok) return failed(*s);
    then(*s);
  });
}

void Server::schedule_removal(std::size_t more) {
  undeleted_count_ += more;
  if (undeleted_count_ >= kRemoveBatch) {
    remove_delivered();
    return;
  }
  if (removal_timer_ == 0)
    removal_timer_ = core_.after(kRemoveDelay, [this] {
      removal_timer_ = 0;
      remove_delivered();
    });
}

void Server::remove_delivered() {
  if (removal_timer_ != 0) core_.cancel(removal_timer_);
  removal_timer_ = 0;
  undeleted_count_ = 0;
  std::unordered_map<std::string, std::vector<std::int64_t>> batch;
  batch.swap(undeleted_);
  for (auto& [name, seqs] : batch) {
    // (A structured binding is copied into the capture by name: clang 14 cannot capture one.)
    store_->remove_delivered(name, std::move(seqs), [this, who = name](offline::Reply<bool> r) {
      // They stay stored: a later delivery sends them again, and the client, knowing their
      // (sender, id), does not show them twice.
      if (!r.ok()) store_failed(fmt::format("removing delivered messages for {}", who), r.error);
    });
  }
}

void Server::deliver(const std::string& name) {
  Session* s = session(name);
  if (s == nullptr || table_.find(name) == nullptr || s->delivery != Session::Delivery::none) return;
  if (mailbox(name) == 0) {
    set_online(name, true);
    offer_files(name);
    return;
  }
  s->delivery = Session::Delivery::sending;
  reach_client(
      name, [this, name](Session&) { deliver_batch(name); },
      [this, name](Session& st) { stall_delivery(name, st, "no answer"); });
}

void Server::stall_delivery(const std::string& name, Session& s, const char* why) {
  // The messages stay stored and the cursor stays: the client's next keep-alive goes on.
  s.delivery = Session::Delivery::stalled;
  ++stats_.stalled;
  spdlog::info("delivery to {} waits for its next keep-alive ({})", name, why);
}

void Server::stall_sync(const std::string& name, Session& s) {
  // Not the end of the session (SPEC §10): its next keep-alive sends the update again.
  s.sync = Session::Sync::stalled;
  ++stats_.stalled;
  spdlog::debug("table update to {} waits for its next keep-alive (no answer)", name);
}

void Server::deliver_batch(const std::string& name) {
  Session& s = *session(name);
  // Topped up before it runs short, so every datagram can be filled.
  if (s.ahead.size() >= kDeliveryRead / 4) return send_stored(name);
  SessionRef ref = sessions_[name];
  offline::Cursor after = s.ahead.empty() ? s.delivered : s.ahead.back().cursor();
  store_->pending_for(name, after, kDeliveryRead, [this, name, ref](offline::Reply<std::vector<offline::StoredMessage>> r) {
    auto session = ref.lock();
    if (session == nullptr) return;  // a new session or a leave since
    if (!r.ok()) {
      store_failed(fmt::format("reading saved messages for {}", name), r.error);
      return stall_delivery(name, *session, "store read failed");
    }
    auto& rows = session->ahead;
    rows.insert(rows.end(), std::make_move_iterator(r.value->begin()), std::make_move_iterator(r.value->end()));
    send_stored(name);
  });
}

void Server::end_drain(const std::string& name) {
  // Nothing after the cursor. What is still owed is what the store holds once the ACKed
  // messages are gone: a message committed meanwhile with an earlier arrival time than the
  // last delivered sits behind the cursor, so go over the mailbox again from its oldest.
  // flush() allows another pass whenever such a message commits, so none is left behind.
  remove_delivered();
  SessionRef ref = sessions_[name];
  store_->count_for(name, [this, name, ref](offline::Reply<std::size_t> r) {
    auto session = ref.lock();
    if (session == nullptr) return;
    Session& s = *session;
    if (!r.ok()) {
      store_failed(fmt::format("counting saved messages for {}", name), r.error);
      return stall_delivery(name, s, "store count failed");
    }
    mailbox(name) = *r.value;
    if (mailbox(name) > 0 && !s.rewound) {
      s.delivered = s.sent = offline::Cursor{};
      s.rewound = true;
      return deliver_batch(name);
    }
    s.ahead = {};  // and its capacity
    s.delivery = Session::Delivery::none;
    s.rewound = false;
    if (s.delivered_count > 0) spdlog::info("delivered {} saved messages to {}", s.delivered_count, name);
    s.delivered_count = 0;
    set_online(name, true);
    offer_files(name);
  });
}

void Server::offer_files(const std::string& name) {
  Session* s = session(name);
  const Client* c = table_.find(name);
  if (s == nullptr || c == nullptr || s->files_offered) return;
  s->files_offered = true;
  depot_->offer(name, endpoint_of(*c));
}

void Server::send_stored(const std::string& name) {
  Session& s = *session(name);
  const Client* c = table_.find(name);
  auto& rows = s.ahead;
  if (c == nullptr) {
    s.ahead = {};
    s.delivery = Session::Delivery::none;
    s.rewound = false;
    s.delivered_count = 0;
    return;
  }
  if (rows.empty()) return end_drain(name);
  proto::Stored msg{core_.next_id(), name, {}};
  std::vector<std::int64_t> seqs;
  offline::Cursor last = s.delivered;
  std::size_t size = proto::stored_overhead(name);
  // Copied, not moved: an unanswered datagram leaves them in `ahead` for the next attempt.
  for (const auto& row : rows) {
    proto::StoredItem item{row.from, row.kind == offline::Kind::channel, row.ts_us, row.mid, {}, row.body};
    if (row.from_key.size() == item.key.size()) std::copy(row.from_key.begin(), row.from_key.end(), item.key.begin());
    std::size_t n = proto::stored_item_size(item);
    if (size + n > proto::kMaxDatagram && !msg.items.empty()) break;
    size += n;
    seqs.push_back(row.seq);
    last = row.cursor();
    msg.items.push_back(std::move(item));
  }
  SessionRef ref = sessions_[name];
  s.stored_request = msg.id;
  s.sent = last;
  core_.request(msg, endpoint_of(*c), [this, name, ref, seqs, last](const proto::Message* reply) {
    auto session = ref.lock();
    if (session == nullptr) return;  // a new session or a leave since
    session->stored_request = 0;
    if (reply == nullptr) return stall_delivery(name, *session, "no answer");
    session->heard = core_.now();
    // Deleted only now that the client has them, so a lost datagram loses nothing; the delete
    // waits for others (schedule_removal) while the next batch is already on its way.
    auto& undeleted = undeleted_[name];
    undeleted.insert(undeleted.end(), seqs.begin(), seqs.end());
    schedule_removal(seqs.size());
    auto& ahead = session->ahead;
    ahead.erase(ahead.begin(), ahead.begin() + static_cast<std::ptrdiff_t>(std::min(ahead.size(), seqs.size())));
    session->delivered = last;
    session->delivered_count += seqs.size();
    stats_.delivered += seqs.size();
    std::size_t& box = mailbox(name);
    box -= std::min(box, seqs.size());
    deliver_batch(name);
  });
}

// ---------------------------------------------------------------- channel

void Server::on_channel(const proto::Channel& r, const udp::endpoint& from) {
  if (!is_at(r.from, from)) {
    core_.reply(from, proto::Refused{r.id, "you are not registered from this address"});
    return;
  }
  std::int64_t ts = core_.wall_us();
  // One copy of the message for the whole fan-out, its Relay encoded once (protocol::share);
  // each member's datagram only adds its name and id (protocol::address).
  auto fan = std::make_shared<const Fanout>(
      Fanout{r, ts, key_of(r.from), proto::share(proto::Relay{0, {}, r.from, r.id, r.body})});
  std::vector<std::string> absent;
  table_.for_each([&](const Client& c) {
    if (c.name == r.from) return;
    if (c.online) relay(c.name, fan);
    else absent.push_back(c.name);
  });
  // The sender hears "received" once the copies for offline members are durable. A full
  // mailbox gets no copy (bounded storage): the sender's ACK says how many members missed it.
  std::uint64_t missed = std::erase_if(absent, [this](const std::string& n) {
    bool full = mailbox_full(n);
    if (full) spdlog::info("no channel copy for {}: mailbox full", n);
    return full;
  });
  stats_.channel_missed += missed;
  if (absent.empty()) {
    core_.reply(from, proto::Ack{r.id, 0, 0, missed});
    return;
  }
  for (std::size_t i = 0; i < absent.size(); ++i) {
    AfterCommit after;
    if (i + 1 == absent.size())
      after = [this, r, from, missed](bool ok) {
        if (ok) core_.reply(from, proto::Ack{r.id, 0, 0, missed});
        else core_.reply(from, proto::Refused{r.id, "the server could not save the message"});
      };
    save({absent[i], r.from, fan->from_key, offline::Kind::channel, ts, r.id, r.body}, std::move(after));
  }
}

void Server::relay(const std::string& to, std::shared_ptr<const Fanout> fan) {
  const Client* target = table_.find(to);
  udp::endpoint ep = endpoint_of(*target);
  SessionRef ref = sessions_.contains(to) ? SessionRef(sessions_[to]) : SessionRef();
  auto missed = [this, to, fan, ep, ref] {
    const Client* c = table_.find(to);
    // Only the session the relay went to is marked offline by its silence.
    if (same_session(to, ref) && c != nullptr && endpoint_of(*c) == ep) mark_silent(to);
    const proto::Channel& ch = fan->channel;
    if (!mailbox_full(to))
      save({to, ch.from, fan->from_key, offline::Kind::channel, fan->ts_us, ch.id, ch.body}, nullptr);
    else ++stats_.channel_missed;
  };
  reach(to, ep, [this, to, ep, fan, missed](bool ok) {
    if (!ok) return missed();
    transport::RetryPolicy p = transport::RetryPolicy{options_.policy.timeout, options_.relay_retries}.within(
        options_.policy.timeout);
    std::uint64_t id = core_.next_id();
    ++stats_.relays;
    core_.request_encoded(id, proto::address(fan->relay, id, to), ep,
                          [missed](const proto::Message* reply) {
                            if (reply == nullptr) missed();
                          },
                          p);
  });
}

// ---------------------------------------------------------------- table distribution

void Server::set_online(const std::string& name, bool online) {
  if (table_.set_online(name, online)) table_changed(name);
}

void Server::mark_silent(const std::string& name) {
  if (table_.set_online(name, false)) {
    spdlog::info("{} is offline (did not answer)", name);
    table_changed(name);
  }
}

void Server::table_changed(const std::string& name, bool persist) {
  if (persist) {
    next_.rows.push_back(name);
    schedule_flush();
  }
  if (sync_scheduled_) return;
  sync_scheduled_ = true;
  // One pass per burst of changes: each client gets every change since its last ACK at once.
  core_.defer([this] {
    sync_scheduled_ = false;
    sync_all();
  });
}

void Server::on_change(const offline::Change& c) {
  ++stats_.remote_changes;
  switch (c.what) {
    case offline::Change::What::mail: return on_mail_change(c.to, c.delta);
    case offline::Change::What::released: return on_released(c.to);
    case offline::Change::What::resync: return on_resync(*c.snapshot);
    case offline::Change::What::client: return on_row(c.row, c.here);
  }
}

void Server::on_mail_change(const std::string& to, std::int64_t delta) {
  std::size_t& box = mailbox(to);
  if (delta < 0) box -= std::min<std::size_t>(box, static_cast<std::size_t>(-delta));
  else box += static_cast<std::size_t>(delta);
  // Saved on another server for a client whose session is here: delivered from here.
  if (delta > 0) mail_arrived(to);
}

void Server::mail_arrived(const std::string& to) {
  Session* s = session(to);
  if (s == nullptr) return;
  if (s->delivery == Session::Delivery::none) deliver(to);
  else s->rewound = false;  // the drain goes over the mailbox once more at its end
}

void Server::on_row(const offline::ClientRow& row, bool here) {
  // (A session whose binding is on its way to the store stays: the store's answer decides.)
  if (!here && sessions_.contains(row.name) && !binding_.contains(row.name)) {
    // It registered with another server: that one holds its session now.
    spdlog::info("{} moved to another server", row.name);
    end_session(row.name);
  }
  proto::Key key{};
  if (row.key.size() == key.size()) std::copy(row.key.begin(), row.key.end(), key.begin());
  if (table_.upsert(row.name, row.ip, row.port, row.online, key)) table_changed(row.name, false);
}

void Server::on_released(const std::string& name) {
  const Client* c = table_.find(name);
  if (c == nullptr || !c->bound() || binding_.contains(name)) return;
  spdlog::info("{} was released by the operator: its binding is gone", name);
  const std::string ip = c->ip;
  const std::uint16_t port = c->port;
  end_session(name);
  // The row stays, offline and bound to no key, so every client's table hears of it; the name
  // is free for the next key that registers it.
  if (table_.upsert(name, ip, port, false, proto::Key{})) table_changed(name, false);
}

void Server::on_resync(const offline::Snapshot& s) {
  spdlog::warn("changes were trimmed from the shared log before this server read them: reading the whole state again");
  std::unordered_set<std::string> present;
  for (std::size_t i = 0; i < s.clients.size(); ++i) {
    present.insert(s.clients[i].name);
    on_row(s.clients[i], s.here[i]);
  }
  std::vector<std::string> gone;
  table_.for_each([&](const Client& c) {
    if (!present.contains(c.name)) gone.push_back(c.name);
  });
  for (const auto& name : gone) on_released(name);
  for (auto& [name, n] : mailbox_) n = 0;
  for (const auto& [name, n] : s.mailboxes) {
    mailbox(name) = n;
    mail_arrived(name);
  }
}

void Server::sync_all() {
  for (auto& [name, s] : sessions_)
    if (s->sync == Session::Sync::idle && s->have < table_.version()) sync(name);
}

void Server::sync(const std::string& name) {
  Session* s = session(name);
  if (s == nullptr || table_.find(name) == nullptr) return;
  if (s->sync != Session::Sync::idle || s->have >= table_.version()) return;
  s->sync = Session::Sync::sending;
  reach_client(
      name, [this, name](Session&) { send_table(name); }, [this, name](Session& st) { stall_sync(name, st); });
}

void Server::send_table(const std::string& name) {
  Session& s = *session(name);
  const Client* c = table_.find(name);
  // Built now, not when the sync was asked for: it carries every change up to this moment.
  std::uint64_t id = core_.next_id();
  std::string bytes = proto::address(chunk_after(s.have), id, name);
  SessionRef ref = sessions_[name];
  s.table_request = id;
  ++stats_.table_updates;
  core_.request_encoded(id, std::move(bytes), endpoint_of(*c), [this, name, ref](const proto::Message* reply) {
    auto session = ref.lock();
    if (session == nullptr) return;  // a new session or a leave since
    session->table_request = 0;
    if (reply == nullptr) return stall_sync(name, *session);
    session->sync = Session::Sync::idle;
    session->heard = core_.now();
    if (const auto* a = std::get_if<proto::Ack>(reply))
      session->have = a->epoch == table_.epoch() ? std::min(a->have, table_.version()) : 0;
    sync(name);
  }, core_.policy());
}

const proto::Shared& Server::chunk_after(std::uint64_t have) {
  if (chunks_version_ != table_.version() || chunks_epoch_ != table_.epoch()) {
    chunks_.clear();
    chunks_version_ = table_.version();
    chunks_epoch_ = table_.epoch();
  }
  if (auto it = chunks_.find(have); it != chunks_.end()) return it->second;
  if (chunks_.size() >= kChunkCache) chunks_.clear();
  // Sized for the longest name, so that one encoding fits every recipient.
  static const std::string longest(proto::kMaxName, 'x');
  Chunk chunk = table_.changes_since(have, proto::kMaxDatagram - proto::table_overhead(longest));
  proto::Table t{0, {}, table_.epoch(), chunk.from, chunk.to, chunk.more, std::move(chunk.entries)};
  return chunks_.emplace(have, proto::share(t)).first->second;
}

}  // namespace chat::registry
