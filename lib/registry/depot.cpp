// The server's kept files: uploads, offers at registration, downloads, expiry.
#include "registry/depot.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>

#include "files/transfer.hpp"
#include "files/wire.hpp"

namespace chat::registry {

namespace proto = chat::protocol;

namespace {

using namespace std::chrono_literals;

/// Chunks sent in one go at most, as between peers: then the server yields to what arrived.
constexpr int kBurst = 32;
/// How long a finished download waits for the client's FileDone before it is dropped.
constexpr auto kDoneWait = 60s;
/// How often kept files are checked for expiry: hourly, or every `keep` if that is shorter (a
/// keep of seconds expires in seconds), at least every second.
constexpr auto kExpiryEvery = 1h;

std::string where(const udp::endpoint& e) { return e.address().to_string() + ":" + std::to_string(e.port()); }

/// "16 MiB" for a whole number of MiB, else the bytes.
std::string limit_text(std::uint64_t bytes) {
  if (bytes % (1u << 20) == 0) return std::to_string(bytes >> 20) + " MiB";
  return std::to_string(bytes) + " bytes";
}

files::TransferKeys ack_keys(const proto::Key& ack_key) {
  files::TransferKeys k;
  std::copy(ack_key.begin(), ack_key.end(), k.ack.begin());
  return k;
}

}  // namespace

struct Depot::Upload {
  std::string from;
  std::string to;
  udp::endpoint at;
  std::uint64_t transfer = 0;
  std::uint64_t size = 0;
  std::uint32_t count = 0;
  files::TransferKeys keys;  // the ack key the uploader chose (the chunk key is not the server's)
  files::Receiver receiver;
  std::string data;  // the sealed chunks, back to back (files::sealed_offset)
  transport::Core::TimerId timer = 0;  // the stall limit or the delayed ack, whichever is first
  transport::Time armed{};              // when `timer` fires (0 timer: none armed)
  transport::Time heard{};

  Upload(std::uint64_t t, std::uint32_t n) : transfer(t), count(n), receiver(t, n, files::RangeSet{}) {}
};

struct Depot::Download {
  std::string name;
  udp::endpoint at;
  std::uint64_t transfer = 0;
  files::TransferKeys keys;
  std::string data;
  std::uint64_t size = 0;
  std::uint32_t count = 0;
  std::optional<files::Sender> sender;
  transport::Core::TimerId timer = 0;
};

Depot::Depot(transport::Core& core, offline::AsyncStore& store, DepotHost host, DepotOptions options)
    : core_(core), store_(store), host_(std::move(host)), o_(options) {}

Depot::~Depot() = default;

void Depot::start() {
  if (store_.keeps_files()) expire();
}

void Depot::refuse(const udp::endpoint& to, std::uint64_t re, const std::string& reason) {
  core_.reply(to, proto::Refused{re, reason});
}

void Depot::drop(const char* why, const udp::endpoint& from) {
  ++dropped_;
  spdlog::debug("dropped a file frame from {}: {}", where(from), why);
}

std::uint64_t Depot::uploading_for(const std::string& to) const {
  std::uint64_t n = 0;
  for (const auto& [t, u] : uploads_) n += u->to == to ? u->size : 0;
  return n;
}

// ---------------------------------------------------------------- uploads

void Depot::on_put(const proto::FilePut& r, const udp::endpoint& from) {
  if (!host_.is_at(r.from, from)) return refuse(from, r.id, "register first");
  if (!store_.keeps_files()) return refuse(from, r.id, "this server keeps no files");
  if (r.to == r.from) return refuse(from, r.id, "a file for yourself is not kept");
  if (host_.key_of(r.to).empty()) return refuse(from, r.id, r.to + " is not known to the server");
  if (r.size > o_.max_file_size)
    return refuse(from, r.id, "the file is larger than the server's limit of " + limit_text(o_.max_file_size));
  if (auto it = uploads_.find(r.transfer); it != uploads_.end()) {
    // The same upload asked again (its answer was lost): go on; anyone else's is refused.
    if (it->second->from == r.from && it->second->at == from) return core_.reply(from, proto::Ack{r.id});
    return refuse(from, r.id, "another upload has this transfer id");
  }
  if (uploads_.size() + downloads_.size() >= o_.max_running)
    return refuse(from, r.id, "the server is busy with other files; try again later");
  store_.file_bytes_for(r.to, [this, r, from](offline::Reply<std::uint64_t> kept) {
    if (!kept.ok()) {
      host_.store_failed("counting the files kept for " + r.to, kept.error);
      return refuse(from, r.id, "the server could not check its space");
    }
    if (*kept.value + uploading_for(r.to) + r.size > o_.quota)
      return refuse(from, r.id, "the space the server keeps for " + r.to + " is full (" + limit_text(o_.quota) + ")");
    if (uploads_.contains(r.transfer)) return refuse(from, r.id, "another upload has this transfer id");
    auto count = files::chunk_count(r.size);  // the limit keeps it in range
    auto u = std::make_unique<Upload>(r.transfer, count.value_or(0));
    u->from = r.from;
    u->to = r.to;
    u->at = from;
    u->size = r.size;
    u->keys = ack_keys(r.ack_key);
    u->data.assign(files::sealed_size(u->size), '\0');
    u->heard = core_.now();
    uploads_.emplace(r.transfer, std::move(u));
    spdlog::info("upload of a file ({} bytes) from {} for {} started", r.size, r.from, r.to);
    core_.reply(from, proto::Ack{r.id});
    arm_upload(r.transfer);
  });
}

void Depot::on_chunk(Upload& u, std::string_view bytes) {
  auto c = files::decode_chunk(bytes);
  if (!c) return drop("a chunk that does not decode", u.at);
  if (c->index >= u.count) return drop("a chunk past the file's end", u.at);
  const std::size_t n = files::sealed_length(u.size, c->index);
  if (c->sealed.size() != n) return drop("a chunk of the wrong size", u.at);
  const auto now = core_.now();
  u.heard = now;
  // What the chunk holds is the recipient's to check (the server cannot open it).
  if (u.receiver.wanted(c->index)) std::memcpy(u.data.data() + files::sealed_offset(c->index), c->sealed.data(), n);
  if (u.receiver.on_chunk(c->index, c->tx_seq, now) || u.receiver.complete())
    core_.send_bytes(files::encode(u.receiver.make_ack(), u.keys), u.at);
  arm_upload(u.transfer);
}

void Depot::arm_upload(std::uint64_t transfer) {
  auto it = uploads_.find(transfer);
  if (it == uploads_.end()) return;
  Upload& u = *it->second;
  transport::Time when = u.heard + o_.stall;
  if (auto ack = u.receiver.next_timer()) when = std::min(when, *ack);
  // A timer already armed for no later than that stays: its handler checks what is due and
  // arms again. So a chunk (which moves the stall limit later, and often the delayed ack) costs
  // no cancel and re-add; only a deadline earlier than the armed one does.
  if (u.timer != 0 && u.armed <= when) return;
  core_.cancel(u.timer);
  u.armed = when;
  u.timer = core_.at(when, [this, transfer] {
    auto found = uploads_.find(transfer);
    if (found == uploads_.end()) return;
    Upload& cur = *found->second;
    cur.timer = 0;
    const auto now = core_.now();
    if (now >= cur.heard + o_.stall) {
      spdlog::info("upload of a file from {} for {} dropped: nothing arrived for a while", cur.from, cur.to);
      uploads_.erase(found);
      return;
    }
    if (cur.receiver.on_timer(now)) core_.send_bytes(files::encode(cur.receiver.make_ack(), cur.keys), cur.at);
    arm_upload(transfer);
  });
}

void Depot::on_commit(const proto::FileCommit& r, const udp::endpoint& from) {
  auto it = uploads_.find(r.transfer);
  if (it == uploads_.end() || it->second->from != r.from || it->second->at != from || !host_.is_at(r.from, from))
    return refuse(from, r.id, "no such upload");
  Upload& u = *it->second;
  if (!u.receiver.complete()) return refuse(from, r.id, "the upload is not complete");
  core_.cancel(u.timer);
  offline::NewFile f{u.to, u.from, host_.key_of(u.from), u.transfer, core_.wall_us(), u.size, r.body, std::move(u.data)};
  uploads_.erase(it);
  const std::string to = f.to;
  const std::uint64_t size = f.size;
  store_.put_file(std::move(f), [this, r, from, to, size](offline::Reply<bool> kept) {
    if (!kept.ok()) {
      host_.store_failed("keeping a file for " + to, kept.error);
      return refuse(from, r.id, "the server could not keep the file");
    }
    // false: kept already (a commit whose answer was lost, sent again): kept all the same.
    if (*kept.value) {
      ++kept_;
      spdlog::info("kept a file ({} bytes) from {} for {}", size, r.from, to);
    }
    core_.reply(from, proto::Ack{r.id});
    if (*kept.value && host_.kept) host_.kept(to);
  });
}

// ---------------------------------------------------------------- offers and downloads

void Depot::offer(const std::string& name, const udp::endpoint& to) {
  if (!store_.keeps_files()) return;
  store_.files_for(name, [this, name, to](offline::Reply<std::vector<offline::HeldFile>> held) {
    if (!held.ok()) return host_.store_failed("listing the files kept for " + name, held.error);
    for (const auto& f : *held.value) {
      proto::FileOffer m{core_.next_id(), name, f.from, f.ts_us, f.transfer, f.size, {}, f.offer};
      if (f.from_key.size() == m.key.size()) std::memcpy(m.key.data(), f.from_key.data(), m.key.size());
      // Unanswered, it is offered again at the next registration.
      core_.request(m, to, [](const proto::Message*) {});
    }
  });
}

void Depot::on_get(const proto::FileGet& r, const udp::endpoint& from) {
  if (!host_.is_at(r.name, from)) return refuse(from, r.id, "register first");
  if (!store_.keeps_files()) return refuse(from, r.id, "this server keeps no files");
  if (!downloads_.contains(r.transfer) && uploads_.size() + downloads_.size() >= o_.max_running)
    return refuse(from, r.id, "the server is busy with other files; try again later");
  store_.file_data(r.name, r.transfer, [this, r, from](offline::Reply<std::optional<std::string>> data) {
    if (!data.ok()) {
      host_.store_failed("reading a file kept for " + r.name, data.error);
      return refuse(from, r.id, "the server could not read the file");
    }
    if (!*data.value) return refuse(from, r.id, "the server keeps no such file");
    if (auto old = downloads_.find(r.transfer); old != downloads_.end()) {  // asked again: start over
      core_.cancel(old->second->timer);
      downloads_.erase(old);
    }
    auto d = std::make_unique<Download>();
    d->name = r.name;
    d->at = from;
    d->transfer = r.transfer;
    d->keys = ack_keys(r.ack_key);
    d->data = std::move(**data.value);
    d->count = static_cast<std::uint32_t>((d->data.size() + files::kSealedChunk - 1) / files::kSealedChunk);
    d->size = d->data.size() - std::uint64_t{d->count} * files::kTagBytes;
    files::SenderOptions so;
    so.congestion.max_window = o_.max_window;
    so.stall_limit = o_.stall;
    d->sender.emplace(r.transfer, d->count, files::RangeSet{}, so);
    Download& ref = *d;
    downloads_.emplace(r.transfer, std::move(d));
    core_.reply(from, proto::Ack{r.id});
    pump(ref);
  });
}

void Depot::pump(Download& d) {
  const auto now = core_.now();
  core_.cancel(d.timer);
  d.timer = 0;
  const std::uint64_t t = d.transfer;
  int sent = 0;
  while (sent < kBurst) {
    auto tx = d.sender->next(now);
    if (!tx) break;
    core_.send_bytes(files::encode(files::Chunk{t, tx->index, tx->tx_seq,
                                                d.data.substr(files::sealed_offset(tx->index),
                                                              files::sealed_length(d.size, tx->index))}),
                     d.at);
    ++sent;
  }
  if (d.sender->failed()) {
    spdlog::info("download of a file by {} dropped: no answer", d.name);
    downloads_.erase(t);
    return;
  }
  if (d.sender->done()) {
    d.timer = core_.after(kDoneWait, [this, t] { downloads_.erase(t); });
    return;
  }
  std::optional<transport::Time> when = sent == kBurst ? std::optional(now) : d.sender->next_timer();
  if (when) d.timer = core_.at(*when, [this, t] {
    if (auto it = downloads_.find(t); it != downloads_.end()) pump(*it->second);
  });
}

void Depot::on_done(const proto::FileDone& r, const udp::endpoint& from) {
  if (!host_.is_at(r.name, from)) return refuse(from, r.id, "register first");
  if (auto it = downloads_.find(r.transfer); it != downloads_.end() && it->second->name == r.name) {
    core_.cancel(it->second->timer);
    downloads_.erase(it);
  }
  store_.delete_file(r.name, r.transfer, [this, r, from](offline::Reply<bool> deleted) {
    if (!deleted.ok()) {
      host_.store_failed("deleting a file kept for " + r.name, deleted.error);
      return refuse(from, r.id, "the server could not delete the file");
    }
    if (*deleted.value) spdlog::info("file kept for {} {}; deleted", r.name, r.saved ? "downloaded" : "declined");
    core_.reply(from, proto::Ack{r.id});
  });
}

// ---------------------------------------------------------------- frames and expiry

void Depot::on_frame(std::string_view bytes, const udp::endpoint& from) {
  auto h = files::peek_header(bytes);
  if (!h) return drop("malformed header", from);
  if (h->type == files::kChunkCode) {
    auto it = uploads_.find(h->transfer_id);
    if (it == uploads_.end() || it->second->at != from) return drop("a chunk of no upload from there", from);
    return on_chunk(*it->second, bytes);
  }
  auto it = downloads_.find(h->transfer_id);
  if (it == downloads_.end() || it->second->at != from) return drop("an ack of no download to there", from);
  Download& d = *it->second;
  auto ack = files::decode_chunk_ack(bytes, d.keys);
  if (!ack) return drop("an ack that does not decode or authenticate", from);
  if (!d.sender->on_ack(*ack, core_.now())) return drop("an ack naming chunks never sent", from);
  if (!d.sender->done() || d.timer == 0) pump(d);
}

void Depot::expire() {
  const std::int64_t before = core_.wall_us() - std::chrono::duration_cast<std::chrono::microseconds>(o_.keep).count();
  store_.expire_files(before, [this](offline::Reply<std::size_t> n) {
    if (!n.ok()) return host_.store_failed("deleting files kept too long", n.error);
    if (*n.value > 0) spdlog::info("deleted {} files nobody downloaded in time", *n.value);
  });
  core_.after(std::clamp<std::chrono::seconds>(o_.keep, 1s, kExpiryEvery), [this] { expire(); });
}

}  // namespace chat::registry
