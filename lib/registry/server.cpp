// The registry server's handlers: each datagram type, table distribution, group commit, delivery.
#include "registry/server.hpp"

#include <spdlog/spdlog.h>

#include <random>
#include <unordered_set>

namespace chat::registry {
namespace {

namespace proto = chat::protocol;

// Saved messages read per delivery step; the datagram takes as many as fit.
constexpr std::size_t kDeliveryRead = 64;
// Stands for the id in a relay encoded once for a whole fan-out (the longest u64, so the
// spliced-in id never makes the datagram longer).
constexpr std::uint64_t kIdPlaceholder = UINT64_MAX;
// Room a Stored datagram needs beyond its items (type, id, version).
constexpr std::size_t kStoredEnvelope = 64;

std::uint64_t random_epoch() {
  std::random_device rd;
  return ((static_cast<std::uint64_t>(rd()) << 32) ^ rd()) >> 12 | 1;
}

std::string where(const udp::endpoint& e) {
  return e.address().to_string() + ":" + std::to_string(e.port());
}

}  // namespace

std::int64_t now_us() {
  using namespace std::chrono;
  return duration_cast<microseconds>(system_clock::now().time_since_epoch()).count();
}

Server::Server(net::io_context& io, ServerOptions options, std::unique_ptr<offline::Store> store)
    : io_(io),
      options_(std::move(options)),
      store_(std::move(store)),
      endpoint_(io, options_.bind, options_.policy, options_.guard),
      table_(random_epoch()),
      stats_timer_(io) {
  // A restart keeps every name, address and online flag; clients that were online stay
  // active, and the new epoch tells them to take a fresh snapshot on the next update.
  for (const auto& row : store_->load_clients()) {
    table_.upsert(row.name, row.ip, row.port, row.online);
    if (row.online) sessions_[row.name].active = true;
  }
}

void Server::start() {
  endpoint_.start([this](const proto::Message& m, const udp::endpoint& from) { on_message(m, from); });
  spdlog::info("server listening on {}, {} clients known", where(endpoint_.local_endpoint()),
               table_.size());
  log_stats();
}

void Server::log_stats() {
  const transport::Counters& c = endpoint_.counters();
  std::uint64_t dropped = c.refused_total() + c.rate_limited + c.amplification + c.in_flight_refused;
  std::uint64_t before = last_logged_.refused_total() + last_logged_.rate_limited +
                         last_logged_.amplification + last_logged_.in_flight_refused;
  if (dropped != before) {
    std::string why;
    for (std::size_t i = 0; i < c.refused.size(); ++i)
      if (c.refused[i] != 0)
        why += fmt::format(" {}={}", proto::to_string(static_cast<proto::DecodeError>(i)), c.refused[i]);
    spdlog::info("dropped so far: {} datagrams (rate_limited={} not_sent_unproven={} in_flight_refused={}{}); "
                 "{} received, {} duplicates",
                 dropped, c.rate_limited, c.amplification, c.in_flight_refused, why, c.received, c.duplicates);
    last_logged_ = c;
  }
  stats_timer_.expires_after(options_.stats_interval);
  stats_timer_.async_wait([this](error_code ec) {
    if (!ec) log_stats();
  });
}

void Server::stop() {
  flush();
  stats_timer_.cancel();
  endpoint_.close();
  const auto& c = endpoint_.counters();
  spdlog::info("server stopped: {} datagrams received, {} refused, {} duplicates", c.received,
               c.refused_total(), c.duplicates);
}

void Server::on_message(const proto::Message& m, const udp::endpoint& from) {
  if (!from.address().is_v4()) return;
  try {
    if (auto* r = std::get_if<proto::Register>(&m)) on_register(*r, from);
    else if (auto* d = std::get_if<proto::Dereg>(&m)) on_dereg(*d, from);
    else if (auto* s = std::get_if<proto::Save>(&m)) on_save(*s, from);
    else if (auto* c = std::get_if<proto::Channel>(&m)) on_channel(*c, from);
    else spdlog::debug("ignored {} from {}", proto::type_name(m), where(from));
  } catch (const std::exception& e) {
    // The store failing must not take the server down; the request stays unanswered.
    spdlog::error("{} from {} failed: {}", proto::type_name(m), where(from), e.what());
    endpoint_.forget(from, proto::request_id(m));
  }
}

// ---------------------------------------------------------------- registration

void Server::on_register(const proto::Register& r, const udp::endpoint& from) {
  std::string ip = from.address().to_string();
  if (table_.find(r.name) == nullptr && table_.size() >= options_.max_clients) {
    spdlog::info("refused {} from {}: the server is full", r.name, where(from));
    endpoint_.reply(from, proto::RegErr{r.id, "the server is full (" + std::to_string(options_.max_clients) + " clients)"});
    return;
  }
  if (table_.admit(r.name, ip, from.port()) == Admit::accept) {
    admit(r, from);
    return;
  }
  // The name is online elsewhere: refuse only if that holder still answers.
  const Client* holder = table_.find(r.name);
  udp::endpoint old = endpoint_of(*holder);
  probe(old, [this, r, from, old](bool alive) {
    const Client* c = table_.find(r.name);
    if (alive && c != nullptr && c->online && endpoint_of(*c) == old) {
      spdlog::info("refused {} from {}: name in use at {}", r.name, where(from), where(old));
      endpoint_.reply(from, proto::RegErr{r.id, "the name " + r.name + " is in use by an online client"});
      return;
    }
    admit(r, from);
  });
}

void Server::admit(const proto::Register& r, const udp::endpoint& from) {
  // A delivery restarts from the oldest stored message: what was ACKed must be gone first.
  if (undeleted_.contains(r.name)) remove_delivered();
  std::size_t pending = mailbox(r.name);
  Session& s = sessions_[r.name];
  ++s.gen;
  s = Session{true, false, false, 0, s.gen};
  // With messages waiting, the client becomes online only once they are delivered (SPEC §5).
  if (table_.upsert(r.name, from.address().to_string(), from.port(), pending == 0))
    table_changed(r.name);
  spdlog::info("registered {} at {}, {} saved messages", r.name, where(from), pending);
  endpoint_.reply(from, proto::RegOk{r.id, table_.epoch(), pending});
  sync(r.name);
  if (pending > 0) deliver(r.name);
}

void Server::on_dereg(const proto::Dereg& r, const udp::endpoint& from) {
  const Client* c = table_.find(r.name);
  if (c == nullptr || endpoint_of(*c) != from) {
    endpoint_.reply(from, proto::Refused{r.id, "not registered from this address"});
    return;
  }
  Session& s = sessions_[r.name];
  s = Session{false, false, false, 0, s.gen + 1};
  set_online(r.name, false);
  spdlog::info("{} left (dereg)", r.name);
  endpoint_.reply(from, proto::Ack{r.id});
}

bool Server::is_at(const std::string& name, const udp::endpoint& from) const {
  const Client* c = table_.find(name);
  if (c == nullptr || endpoint_of(*c) != from) return false;
  auto it = sessions_.find(name);
  return it != sessions_.end() && it->second.active;
}

udp::endpoint Server::endpoint_of(const Client& c) {
  error_code ec;
  auto addr = net::ip::make_address_v4(c.ip, ec);
  return udp::endpoint(addr, c.port);
}

void Server::probe(const udp::endpoint& to, std::function<void(bool alive)> then) {
  transport::RetryPolicy p{options_.policy.timeout / (options_.relay_retries + 1), options_.relay_retries};
  endpoint_.request(proto::Probe{endpoint_.next_id()}, to,
                    [then = std::move(then)](const proto::Message* reply) { then(reply != nullptr); }, p);
}

// ---------------------------------------------------------------- offline messages

void Server::on_save(const proto::Save& r, const udp::endpoint& from) {
  if (!is_at(r.from, from)) {
    endpoint_.reply(from, proto::Refused{r.id, "you are not registered from this address"});
    return;
  }
  const Client* target = table_.find(r.to);
  if (target == nullptr) {
    endpoint_.reply(from, proto::Refused{r.id, "unknown client " + r.to});
    return;
  }
  if (mailbox(r.to) >= options_.max_stored) {
    endpoint_.reply(from, proto::Refused{r.id, r.to + "'s mailbox is full (" + std::to_string(options_.max_stored) +
                                                   " saved messages)"});
    return;
  }
  auto store_it = [this, r, from] {
    save({r.to, r.from, offline::Kind::direct, now_us(), r.mid, r.text}, [this, r, from](bool ok) {
      if (ok) endpoint_.reply(from, proto::Ack{r.id});
      else endpoint_.reply(from, proto::Refused{r.id, "the server could not save the message"});
    });
  };
  if (!target->online || r.force) {
    store_it();
    return;
  }
  // The table says online: believe it only if the recipient answers (SPEC §5).
  probe(endpoint_of(*target), [this, r, from, store_it](bool alive) {
    if (alive) {
      endpoint_.reply(from, proto::Exists{r.id, r.to});
      sync(r.from);  // "plus the current table"
      return;
    }
    mark_silent(r.to);
    store_it();
  });
}

std::size_t& Server::mailbox(const std::string& name) {
  auto it = mailbox_.find(name);
  if (it == mailbox_.end()) it = mailbox_.emplace(name, store_->count_for(name)).first;
  return it->second;
}

void Server::save(offline::NewMessage m, AfterCommit after) {
  unsaved_.push_back(std::move(m));
  if (after) after_commit_.push_back(std::move(after));
  schedule_flush();
}

void Server::schedule_flush() {
  if (flush_scheduled_) return;
  flush_scheduled_ = true;
  // Runs after the datagrams already queued: saves arriving together share one commit.
  net::post(io_, [this] { flush(); });
}

void Server::flush() {
  flush_scheduled_ = false;
  std::vector<offline::NewMessage> batch;
  batch.swap(unsaved_);
  std::vector<AfterCommit> callbacks;
  callbacks.swap(after_commit_);
  std::vector<std::string> names;
  names.swap(dirty_rows_);

  bool ok = true;
  if (!batch.empty()) {
    try {
      store_->save(batch);
    } catch (const std::exception& e) {
      ok = false;
      spdlog::error("saving {} messages failed: {}", batch.size(), e.what());
    }
  }
  if (!names.empty()) {
    std::vector<offline::ClientRow> rows;
    std::unordered_set<std::string> seen;
    for (const auto& n : names) {
      const Client* c = table_.find(n);
      if (c != nullptr && seen.insert(n).second) rows.push_back({c->name, c->ip, c->port, c->online});
    }
    try {
      store_->store_clients(rows);
    } catch (const std::exception& e) {
      spdlog::error("saving the client table failed: {}", e.what());
    }
  }
  // The mailbox counts committed messages only, so a delivery that finds the store empty
  // before this commit cannot hide them.
  if (ok)
    for (const auto& m : batch) ++mailbox(m.to);
  for (auto& cb : callbacks) cb(ok);
  remove_delivered();
  if (!ok) return;
  for (const auto& m : batch) {
    spdlog::info("saved a {} message from {} for {}", m.kind == offline::Kind::channel ? "channel" : "direct",
                 m.from, m.to);
    // A recipient that came back while this was being committed still gets it now.
    auto it = sessions_.find(m.to);
    if (it != sessions_.end() && it->second.active && !it->second.delivering) deliver(m.to);
  }
}

void Server::reach(const udp::endpoint& to, std::function<void(bool)> then) {
  if (endpoint_.allowance(to) >= proto::kMaxDatagram) return then(true);
  // Not yet proven to receive (a spoofed registration?): a small probe first, so the server
  // never sends an address much more than it received from it.
  probe(to, std::move(then));
}

void Server::remove_delivered() {
  std::unordered_map<std::string, std::vector<std::int64_t>> batch;
  batch.swap(undeleted_);
  for (const auto& [name, seqs] : batch) {
    try {
      store_->remove_delivered(name, seqs);
    } catch (const std::exception& e) {
      // They stay stored: a later delivery sends them again, and the client, knowing their
      // (sender, id), does not show them twice.
      spdlog::error("removing delivered messages for {} failed: {}", name, e.what());
    }
  }
}

void Server::deliver(const std::string& name) {
  auto it = sessions_.find(name);
  const Client* c = table_.find(name);
  if (it == sessions_.end() || c == nullptr || !it->second.active || it->second.delivering) return;
  if (mailbox(name) == 0) {
    set_online(name, true);
    return;
  }
  it->second.delivering = true;
  reach_client(name, &Server::deliver_batch);
}

void Server::reach_client(const std::string& name, void (Server::*then)(const std::string&)) {
  std::uint64_t gen = sessions_[name].gen;
  reach(endpoint_of(*table_.find(name)), [this, name, gen, then](bool ok) {
    if (current(name, gen) == nullptr) return;  // a new session or a leave since
    if (!ok) return mark_gone(name);
    (this->*then)(name);
  });
}

Server::Session* Server::current(const std::string& name, std::uint64_t gen) {
  auto it = sessions_.find(name);
  return it == sessions_.end() || it->second.gen != gen ? nullptr : &it->second;
}

void Server::deliver_batch(const std::string& name) {
  Session& s = sessions_[name];
  const Client* c = table_.find(name);
  std::vector<offline::StoredMessage> rows;
  try {
    rows = store_->pending_for(name, s.delivered_seq, kDeliveryRead);
  } catch (const std::exception& e) {
    // The messages stay stored; the next registration (or save) tries again.
    spdlog::error("reading saved messages for {} failed: {}", name, e.what());
    s.delivering = false;
    return;
  }
  if (rows.empty() || c == nullptr) {
    s.delivering = false;
    mailbox(name) = 0;
    if (s.delivered_count > 0) spdlog::info("delivered {} saved messages to {}", s.delivered_count, name);
    s.delivered_count = 0;
    set_online(name, true);
    return;
  }
  std::uint64_t gen = s.gen;
  proto::Stored msg{endpoint_.next_id(), {}};
  std::vector<std::int64_t> seqs;
  std::size_t size = kStoredEnvelope;
  for (auto& row : rows) {
    std::size_t n = proto::escaped_size(row.text) + row.from.size() + 70;
    if (size + n > proto::kMaxDatagram && !msg.items.empty()) break;
    size += n;
    seqs.push_back(row.seq);
    msg.items.push_back({std::move(row.from), row.kind == offline::Kind::channel, row.ts_us, row.mid,
                         std::move(row.text)});
  }
  endpoint_.request(msg, endpoint_of(*c), [this, name, gen, seqs](const proto::Message* reply) {
    Session* session = current(name, gen);
    if (session == nullptr) return;
    if (reply == nullptr) return mark_gone(name);
    // Deleted only now that the client has them, so a lost datagram loses nothing; the delete
    // joins the next group commit while the next batch is already on its way.
    auto& undeleted = undeleted_[name];
    undeleted.insert(undeleted.end(), seqs.begin(), seqs.end());
    schedule_flush();
    session->delivered_seq = seqs.back();
    session->delivered_count += seqs.size();
    std::size_t& box = mailbox(name);
    box -= std::min(box, seqs.size());
    deliver_batch(name);
  });
}

// ---------------------------------------------------------------- channel

void Server::on_channel(const proto::Channel& r, const udp::endpoint& from) {
  if (!is_at(r.from, from)) {
    endpoint_.reply(from, proto::Refused{r.id, "you are not registered from this address"});
    return;
  }
  std::int64_t ts = now_us();
  // One copy of the message for the whole fan-out, encoded once; each relay only splices in
  // its own id.
  auto fan = std::make_shared<const Fanout>(Fanout{r, ts, proto::encode(proto::Relay{kIdPlaceholder, r.from, r.id, r.text})});
  std::vector<std::string> absent;
  table_.for_each([&](const Client& c) {
    if (c.name == r.from) return;
    if (c.online) relay(c.name, fan);
    else absent.push_back(c.name);
  });
  // The sender hears "received" once the copies for offline members are durable. A full
  // mailbox gets no copy (bounded storage); that member misses this channel message.
  std::erase_if(absent, [this](const std::string& n) {
    bool full = mailbox(n) >= options_.max_stored;
    if (full) spdlog::info("no channel copy for {}: mailbox full", n);
    return full;
  });
  if (absent.empty()) {
    endpoint_.reply(from, proto::Ack{r.id});
    return;
  }
  for (std::size_t i = 0; i < absent.size(); ++i) {
    AfterCommit after;
    if (i + 1 == absent.size())
      after = [this, r, from](bool ok) {
        if (ok) endpoint_.reply(from, proto::Ack{r.id});
        else endpoint_.reply(from, proto::Refused{r.id, "the server could not save the message"});
      };
    save({absent[i], r.from, offline::Kind::channel, ts, r.id, r.text}, std::move(after));
  }
}

void Server::relay(const std::string& to, std::shared_ptr<const Fanout> fan) {
  const Client* target = table_.find(to);
  udp::endpoint ep = endpoint_of(*target);
  auto missed = [this, to, fan] {
    mark_silent(to);
    const proto::Channel& c = fan->channel;
    if (mailbox(to) < options_.max_stored) save({to, c.from, offline::Kind::channel, fan->ts_us, c.id, c.text}, nullptr);
  };
  reach(ep, [this, ep, fan, missed](bool ok) {
    if (!ok) return missed();
    transport::RetryPolicy p{options_.policy.timeout / (options_.relay_retries + 1), options_.relay_retries};
    std::uint64_t id = endpoint_.next_id();
    std::string bytes = fan->relay;
    static const std::string placeholder = "\"id\":" + std::to_string(kIdPlaceholder);
    // Only the key can match: inside a JSON string every quote is escaped.
    if (auto at = bytes.find(placeholder); at != std::string::npos)
      bytes.replace(at, placeholder.size(), "\"id\":" + std::to_string(id));
    endpoint_.request_encoded(id, std::move(bytes), ep,
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

void Server::mark_gone(const std::string& name) {
  auto it = sessions_.find(name);
  if (it != sessions_.end()) it->second = Session{false, false, false, 0, it->second.gen + 1};
  if (table_.set_online(name, false)) {
    spdlog::info("{} is offline (no answer)", name);
    table_changed(name);
  }
}

void Server::mark_silent(const std::string& name) {
  // Offline for everyone, but its session goes on: if it is alive after all (the probe or
  // relay was lost), the table update tells it and it registers again; if it is gone, that
  // update fails and mark_gone() ends the session.
  if (table_.set_online(name, false)) {
    spdlog::info("{} is offline (did not answer)", name);
    table_changed(name);
  }
}

void Server::table_changed(const std::string& name) {
  dirty_rows_.push_back(name);
  schedule_flush();
  if (sync_scheduled_) return;
  sync_scheduled_ = true;
  // One pass per burst of changes: each client gets every change since its last ACK at once.
  net::post(io_, [this] {
    sync_scheduled_ = false;
    sync_all();
  });
}

void Server::sync_all() {
  for (auto& [name, s] : sessions_)
    if (s.active && !s.syncing && s.have < table_.version()) sync(name);
}

void Server::sync(const std::string& name) {
  auto it = sessions_.find(name);
  const Client* c = table_.find(name);
  if (it == sessions_.end() || c == nullptr) return;
  Session& s = it->second;
  if (!s.active || s.syncing || s.have >= table_.version()) return;
  s.syncing = true;
  reach_client(name, &Server::send_table);
}

void Server::send_table(const std::string& name) {
  Session& s = sessions_[name];
  const Client* c = table_.find(name);
  // Built now, not when the sync was asked for: it carries every change up to this moment.
  Chunk chunk = table_.changes_since(s.have, kTableBudget);
  std::uint64_t gen = s.gen;
  proto::Table msg{endpoint_.next_id(), table_.epoch(), chunk.from, chunk.to, chunk.more,
                   std::move(chunk.entries)};
  endpoint_.request(msg, endpoint_of(*c), [this, name, gen](const proto::Message* reply) {
    Session* session = current(name, gen);
    if (session == nullptr) return;
    session->syncing = false;
    if (reply == nullptr) return mark_gone(name);
    if (const auto* a = std::get_if<proto::Ack>(reply))
      session->have = a->epoch == table_.epoch() ? std::min(a->have, table_.version()) : 0;
    sync(name);
  });
}

}  // namespace chat::registry
