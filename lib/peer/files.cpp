// The client's file transfers: offers, the chunk loop of each side, the lines the user sees.
#include "peer/files.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "files/partial.hpp"
#include "files/safe_name.hpp"
#include "files/transfer.hpp"
#include "files/wire.hpp"

namespace chat::peer {

namespace {

using namespace std::chrono_literals;

/// Chunks sent in one go at most: then the sender yields (a timer due at once), so the
/// datagrams that arrived meanwhile, chat among them, are handled before the next burst.
constexpr int kBurst = 32;
/// How long a sender waits for the receiver's Done once every chunk is acknowledged.
constexpr auto kDoneWait = 60s;
/// The acks the Receiver asks for while one read of the socket is handled, while nothing is
/// missing below the newest chunk, go as one, at the end of the turn, or at once when this many
/// chunks have arrived since the last ack went (with a hole, every ack goes at once): so a
/// long read still moves the sender's window. An ack costs a system call here and a read, a tag
/// check and a pass of the Sender there (an 8 MiB transfer on loopback: 2,923 acks sent at an
/// ack per 2 chunks, 531 so).
constexpr std::uint32_t kAckRun = 16;

template <class... F>
struct Overloaded : F... {
  using F::operator()...;
};
template <class... F>
Overloaded(F...) -> Overloaded<F...>;

std::string one_decimal(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}

std::string duration_text(double seconds) {
  const auto s = static_cast<long long>(std::llround(std::max(0.0, seconds)));
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", s / 3600, s / 60 % 60, s % 60);
  else std::snprintf(buf, sizeof buf, "%lld:%02lld", s / 60, s % 60);
  return buf;
}

/// "[Error: ...]" of a FileError's sentence: its first letter lowered, its full stop dropped.
std::string error_line(std::string message) {
  if (!message.empty() && message.back() == '.') message.pop_back();
  if (!message.empty() && message[0] >= 'A' && message[0] <= 'Z') message[0] = static_cast<char>(message[0] - 'A' + 'a');
  return "[Error: " + message + "]";
}

/// Bytes held of a file of `size` bytes when `chunks` of its chunks are (the last may be short).
std::uint64_t bytes_of(std::uint64_t chunks, std::uint64_t size) {
  return std::min<std::uint64_t>(size, chunks * files::kChunkPayload);
}

/// The tenths of a file of `size` bytes that `chunks` of its chunks make.
int tenths(std::uint64_t chunks, std::uint64_t size) {
  return size == 0 ? 10 : static_cast<int>(bytes_of(chunks, size) * 10 / size);
}

}  // namespace

std::string format_size(std::uint64_t bytes) {
  if (bytes < 1024) return std::to_string(bytes).append(" B");
  const char* units[] = {"KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes) / 1024;
  int u = 0;
  while (v >= 1024 && u < 3) {
    v /= 1024;
    ++u;
  }
  return one_decimal(v).append(" ").append(units[u]);
}

// ---------------------------------------------------------------- the two sides

struct Transfers::Outgoing {
  /// `uploading`: waiting for the server's go (a file for it to keep).
  enum class State { offered, uploading, sending, finishing };
  unsigned id = 0;
  std::uint64_t transfer = 0;
  std::string to;
  udp::endpoint at;  // where the accept came from: the chunks go there
  std::string name;  // as offered (a safe basename of the path's)
  files::SourceFile source;
  files::Hash hash{};
  files::FileKey key{};
  files::TransferKeys keys{};
  std::optional<files::Sender> sender;
  State state = State::offered;
  transport::Core::TimerId timer = 0;  // the offer's lapse, the next send, the wait for Done
  transport::Time started{};
  std::uint64_t base = 0;  // chunks the receiver already held when it accepted
  int decile = 0;          // the last 10 % step said on a pipe
  bool saved = false;      // the receiver said it saved the file (its last acks may still be on their way)
  bool via_server = false;  // sent to the server, which keeps it for `to`
  std::string sealed;      // then: every chunk, sealed once (files::kKeptTxSeq), back to back
  bool pump_deferred = false;  // a pump() waits for the end of the turn (the acks that came together)

  explicit Outgoing(files::SourceFile s) : source(std::move(s)) {}
};

struct Transfers::Incoming {
  enum class State { offered, receiving };
  unsigned id = 0;
  std::uint64_t transfer = 0;
  std::string from;
  udp::endpoint at;  // where the offer came from: chunks from anywhere else are dropped
  files::ctl::Offer offer;
  std::string name;  // the safe basename it is saved as
  files::TransferKeys keys{};
  std::optional<files::Partial> partial;
  std::optional<files::Receiver> receiver;
  State state = State::offered;
  transport::Core::TimerId timer = 0;  // the offer's lapse; then the receiver's timers
  transport::Time armed{};             // while receiving: when `timer` fires (0 timer: none armed)
  transport::Time heard{};
  transport::Time flushed{};
  transport::Time started{};
  std::uint64_t base = 0;
  int decile = 0;
  bool via_server = false;  // the server keeps the file: it comes from there, `at`
  bool ack_owed = false;    // the Receiver asked for an ack that has not gone yet (ack_soon)
  bool ack_deferred = false;  // ... and a task at the end of this turn sends it
  std::uint32_t since_ack = 0;  // chunks that arrived since the last ack went
};

Transfers::Transfers(transport::Core& core, FileHost host, FileOptions options)
    : core_(core), host_(std::move(host)), o_(std::move(options)) {}

Transfers::~Transfers() = default;

Transfers::Outgoing* Transfers::outgoing(std::uint64_t transfer) {
  auto it = out_.find(transfer);
  return it == out_.end() ? nullptr : it->second.get();
}

Transfers::Incoming* Transfers::incoming(std::uint64_t transfer) {
  auto it = in_.find(transfer);
  return it == in_.end() ? nullptr : it->second.get();
}

std::size_t Transfers::running() const {
  std::size_t n = 0;
  n += out_.size();
  for (const auto& [t, in] : in_) n += in->state == Incoming::State::receiving ? 1 : 0;
  return n;
}

void Transfers::tell(const std::string& to, const files::Control& c) {
  host_.send_control(to, c, [](bool) {});
}

void Transfers::tell_peer(const Outgoing& o, const files::Control& c) {
  if (!o.via_server) tell(o.to, c);
}

void Transfers::tell_peer(const Incoming& in, const files::Control& c) {
  if (!in.via_server) return tell(in.from, c);
  std::optional<bool> saved;  // what a file_done says: the file was saved here (or is not wanted)
  if (std::holds_alternative<files::ctl::Decline>(c)) saved = false;
  if (const auto* d = std::get_if<files::ctl::Done>(&c); d != nullptr && d->result != files::ctl::Done::Result::failed)
    saved = d->result == files::ctl::Done::Result::saved;
  // After a failure here (a full disk) the server keeps the file, offered again later; a
  // mismatch would fail again, so the file goes.
  if (saved) host_.to_server(protocol::FileDone{core_.next_id(), host_.me, in.transfer, *saved}, [](auto) {});
}

// ---------------------------------------------------------------- offering

void Transfers::sendfile(const std::string& to, const std::string& path) {
  auto at = host_.reachable(to);
  if (!at && !(host_.sealable && host_.sealable(to)))
    return host_.say("[Error: no key known for " + to + "]");
  auto source = files::SourceFile::open(path);
  if (!source) return host_.say(error_line(source.error().message));
  auto hash = source.value().hash();
  if (!hash) return host_.say(error_line(hash.error().message));
  auto o = std::make_unique<Outgoing>(std::move(source.value()));
  o->id = next_id_++;
  do o->transfer = core_.random();
  while (o->transfer == 0 || out_.contains(o->transfer));
  o->to = to;
  if (at) o->at = *at;
  o->name = files::safe_basename(std::filesystem::path(path).filename().string());
  o->hash = hash.value();
  o->key = files::new_file_key();
  o->keys = files::derive_keys(o->key);  // an upload's; a peer's accept names the cipher it takes
  const std::uint64_t t = o->transfer;
  if (!at) {
    host_.say("[" + to + " is offline; sending " + o->name + " (" + format_size(o->source.size()) +
              ") to the server for " + to + ".]");
    out_.emplace(t, std::move(o));
    return upload(t);
  }
  host_.say("[Offering " + o->name + " (" + format_size(o->source.size()) + ") to " + to + ".]");
  files::ctl::Offer offer{t, o->source.size(), o->hash, o->key, o->name, o_.ciphers};
  o->timer = core_.after(o_.offer_lapse, [this, t] {
    Outgoing* cur = outgoing(t);
    if (cur == nullptr || cur->state != Outgoing::State::offered) return;
    host_.say("[The offer of " + cur->name + " to " + cur->to + " lapsed.]");
    end_outgoing(t);
  });
  out_.emplace(t, std::move(o));
  host_.send_control(to, offer, [this, t](bool answered) {
    Outgoing* cur = outgoing(t);
    if (answered || cur == nullptr || cur->state != Outgoing::State::offered) return;
    if (!host_.sealable || !host_.sealable(cur->to)) {
      host_.say("[" + cur->to + " did not answer; the offer of " + cur->name + " is withdrawn.]");
      return end_outgoing(t);
    }
    host_.say("[" + cur->to + " did not answer; sending " + cur->name + " to the server for " + cur->to + ".]");
    upload(t);
  });
}

std::optional<std::string> Transfers::refusal(const protocol::Message* reply) {
  if (reply == nullptr) return "the server did not answer";
  if (std::holds_alternative<protocol::Ack>(*reply)) return std::nullopt;
  if (const auto* r = std::get_if<protocol::Refused>(reply)) return r->reason;
  return "the server gave an answer of another kind";
}

void Transfers::upload(std::uint64_t t) {
  Outgoing& o = *outgoing(t);
  core_.cancel(o.timer);  // an offer's lapse
  o.timer = 0;
  o.via_server = true;
  o.state = Outgoing::State::uploading;
  const files::FileKey leg = files::new_file_key();  // the server's acks are tagged with it
  std::copy(leg.begin(), leg.end(), o.keys.ack.begin());
  protocol::Key ack_key{};
  std::copy(leg.begin(), leg.end(), ack_key.begin());
  host_.to_server(protocol::FilePut{core_.next_id(), host_.me, o.to, t, o.source.size(), ack_key},
                  [this, t](const protocol::Message* reply) {
                    Outgoing* cur = outgoing(t);
                    if (cur == nullptr || cur->state != Outgoing::State::uploading) return;
                    if (auto why = refusal(reply)) {
                      host_.say("[The server did not take " + cur->name + " for " + cur->to + ": " + *why + ".]");
                      return end_outgoing(t);
                    }
                    // Each chunk sealed once, from one reading: a resend repeats the same bytes.
                    const std::uint32_t count = cur->source.chunk_count();
                    cur->sealed.reserve(files::sealed_size(cur->source.size()));
                    for (std::uint32_t i = 0; i < count; ++i) {
                      auto plain = cur->source.read_chunk(i);
                      if (!plain) {
                        host_.say("[The transfer of " + cur->name + " to " + cur->to + " stopped: " +
                                  plain.error().message + "]");
                        return end_outgoing(t);
                      }
                      cur->sealed += files::seal_chunk(cur->keys, t, i, files::kKeptTxSeq, plain.value());
                    }
                    cur->at = host_.server();
                    files::SenderOptions so;
                    so.congestion.max_window = o_.max_window;
                    so.peer_ack_delay = 15ms;  // the server's Receiver acks as ours does
                    cur->sender.emplace(t, count, files::RangeSet{}, so);
                    cur->state = Outgoing::State::sending;
                    cur->started = core_.now();
                    pump(*cur);
                    progressed(t);
                  });
}

void Transfers::commit(std::uint64_t t) {
  Outgoing& o = *outgoing(t);
  const std::string body = host_.seal_for(o.to, files::ctl::Offer{t, o.source.size(), o.hash, o.key, o.name});
  host_.to_server(protocol::FileCommit{core_.next_id(), host_.me, t, body}, [this, t](const protocol::Message* reply) {
    Outgoing* cur = outgoing(t);
    if (cur == nullptr) return;
    if (auto why = refusal(reply)) host_.say("[The server did not keep " + cur->name + " for " + cur->to + ": " + *why + ".]");
    else host_.say("[" + cur->name + " saved by the server for " + cur->to + ".]");
    end_outgoing(t);
  });
}

void Transfers::on_kept_offer(const std::string& from, const files::ctl::Offer& offer) {
  on_offer(from, host_.server(), offer, true);
}

void Transfers::on_offer(const std::string& from, const udp::endpoint& at, const files::ctl::Offer& offer, bool kept) {
  if (Incoming* held = incoming(offer.transfer)) {
    // The server's offer of a file whose direct offer is still waiting here: the sender heard
    // no receipt for it in time (we were suspended, or its datagrams were late) and gave the
    // file to the server; an accept sent to it now would be answered by a cancel. Accepting
    // downloads it from the server instead (the same file: the same offer), and it no longer lapses.
    // (The kept offer lists XChaCha20-Poly1305 alone, the cipher its chunks were sealed with.)
    const files::ctl::Offer& o = held->offer;
    const bool same = o.size == offer.size && o.hash == offer.hash && o.key == offer.key && o.name == offer.name;
    if (kept && !held->via_server && held->from == from && held->state == Incoming::State::offered && same) {
      core_.cancel(held->timer);
      held->timer = 0;
      held->via_server = true;
      held->at = at;
      held->offer = offer;
      held->keys = files::derive_keys(offer.key, files::Cipher::xchacha20poly1305);
    }
    return;  // told again
  }
  const std::string name = files::safe_basename(offer.name);
  if (!files::chunk_count(offer.size)) {
    host_.say("[" + from + " offers " + name + " (" + format_size(offer.size) + "), too large to receive; declined.]");
    if (kept) return host_.to_server(protocol::FileDone{core_.next_id(), host_.me, offer.transfer, false}, [](auto) {});
    return tell(from, files::ctl::Decline{offer.transfer});
  }
  auto in = std::make_unique<Incoming>();
  in->id = next_id_++;
  in->transfer = offer.transfer;
  in->from = from;
  in->at = at;
  in->offer = offer;
  in->name = name;
  // A kept file's chunks were sealed by the uploader, with XChaCha20-Poly1305, before anyone chose.
  in->keys = files::derive_keys(
      offer.key, kept ? files::Cipher::xchacha20poly1305 : files::choose_cipher(offer.ciphers, o_.ciphers));
  in->via_server = kept;
  const std::uint64_t t = offer.transfer;
  // A kept file waits on the server (for days): its offer stands while we run.
  if (!kept) in->timer = core_.after(o_.offer_lapse, [this, t] {
    Incoming* cur = incoming(t);
    if (cur == nullptr || cur->state != Incoming::State::offered) return;
    host_.say("[" + cur->from + "'s offer of " + cur->name + " lapsed.]");
    end_incoming(t);
  });
  const unsigned id = in->id;
  in_.emplace(t, std::move(in));
  std::size_t from_them = 0;
  for (const auto& [k, other] : in_) from_them += other->from == from && other->state == Incoming::State::offered ? 1 : 0;
  const std::string which = from_them > 1 ? from + " " + std::to_string(id) : from;
  host_.say("[" + from + " offers " + name + " (" + format_size(offer.size) + "); type accept " + which +
            " or decline " + which + "]");
}

Transfers::Incoming* Transfers::offered_by(const std::string& from, unsigned id, const char* verb) {
  std::vector<Incoming*> offers;
  for (const auto& [t, in] : in_)
    if (in->from == from && in->state == Incoming::State::offered && (id == 0 || in->id == id)) offers.push_back(in.get());
  if (offers.size() == 1) return offers.front();
  if (offers.empty() && id != 0) host_.say("[Error: " + from + " offers no file with id " + std::to_string(id) + "]");
  else if (offers.empty()) host_.say("[Error: " + from + " offers no file]");
  else
    host_.say("[" + from + " offers " + std::to_string(offers.size()) + " files: type " + verb + " " + from +
              " <id> (transfers lists them)]");
  return nullptr;
}

void Transfers::accept(const std::string& from, unsigned id) {
  Incoming* in = offered_by(from, id, "accept");
  if (in == nullptr) return;
  std::error_code ec;
  std::filesystem::create_directories(o_.download_dir, ec);  // an error shows in the open below
  auto partial = files::Partial::open(o_.download_dir, in->offer.name, in->offer.hash, in->offer.size);
  if (!partial) return host_.say(error_line(partial.error().message));
  core_.cancel(in->timer);
  in->timer = 0;
  in->partial.emplace(std::move(partial.value()));
  in->receiver.emplace(in->transfer, in->partial->chunk_count(), in->partial->have());
  in->state = Incoming::State::receiving;
  const auto now = core_.now();
  in->heard = in->flushed = in->started = now;
  in->base = in->partial->have().count();
  in->decile = tenths(in->base, in->offer.size);  // the line below says where it resumes
  std::vector<files::Range> have = in->partial->have().ranges();
  if (have.size() > files::kMaxAcceptRanges) have.resize(files::kMaxAcceptRanges);  // the rest comes again
  const std::uint64_t held = bytes_of(in->base, in->offer.size);
  std::string line = "[Receiving " + in->name + " (" + format_size(in->offer.size) + ") from " + from;
  if (held > 0) line += ", resuming with " + format_size(held) + " already here";
  host_.say(line + ".]");
  const std::uint64_t t = in->transfer;
  if (in->via_server) {
    // The server sends from the start; the receiver's acks tell it what is here already.
    const files::FileKey leg = files::new_file_key();  // our acks to the server are tagged with it
    std::copy(leg.begin(), leg.end(), in->keys.ack.begin());
    protocol::Key ack_key{};
    std::copy(leg.begin(), leg.end(), ack_key.begin());
    in->at = host_.server();
    host_.to_server(protocol::FileGet{core_.next_id(), host_.me, t, ack_key}, [this, t](const protocol::Message* reply) {
      Incoming* cur = incoming(t);
      if (cur == nullptr) return;
      if (auto why = refusal(reply)) {
        host_.say("[The server did not send " + cur->name + " from " + cur->from + ": " + *why + ".]");
        end_incoming(t);
      }
    });
  } else {
    host_.send_control(from, files::ctl::Accept{t, std::move(have), in->keys.cipher}, [this, t](bool answered) {
      Incoming* cur = incoming(t);
      if (answered || cur == nullptr) return;
      host_.say("[" + cur->from + " did not answer; the transfer of " + cur->name + " is stopped.]");
      end_incoming(t);
    });
  }
  if (in->receiver->complete()) return finish(*in);  // every chunk was here already
  arm(*in);
  progressed(t);
}

void Transfers::decline(const std::string& from, unsigned id) {
  Incoming* in = offered_by(from, id, "decline");
  if (in == nullptr) return;
  tell_peer(*in, files::ctl::Decline{in->transfer});
  host_.say("[Declined " + in->name + " from " + from + ".]");
  end_incoming(in->transfer);
}

void Transfers::cancel(unsigned id) {
  for (const auto& [t, o] : out_) {
    if (o->id != id) continue;
    tell_peer(*o, files::ctl::Cancel{t});
    host_.say("[Cancelled " + o->name + " to " + o->to + ".]");
    return end_outgoing(t);
  }
  for (const auto& [t, in] : in_) {
    if (in->id != id) continue;
    if (in->state == Incoming::State::offered) return decline(in->from, id);
    tell_peer(*in, files::ctl::Cancel{t});
    host_.say("[Cancelled " + in->name + " from " + in->from + "; what arrived is kept, and an offer of it again resumes.]");
    return end_incoming(t);
  }
  host_.say("[Error: no transfer with id " + std::to_string(id) + "]");
}

std::string Transfers::list() const {
  if (out_.empty() && in_.empty()) return "[No file transfers.]";
  std::map<unsigned, std::string> rows;  // by the id the user types
  auto row = [&](unsigned id, const std::string& what) { rows[id] = what; };
  for (const auto& [t, o] : out_) {
    if (o->state == Outgoing::State::offered)
      row(o->id, o->name + " (" + format_size(o->source.size()) + ") to " + o->to + ", offered");
    else if (o->state == Outgoing::State::uploading)
      row(o->id, o->name + " (" + format_size(o->source.size()) + ") to " + o->to + ", waiting for the server");
    else
      row(o->id, progress_line(t) + ", to " + o->to);
  }
  for (const auto& [t, in] : in_) {
    if (in->state == Incoming::State::offered)
      row(in->id, in->name + " (" + format_size(in->offer.size) + ") from " + in->from + ", offered: accept " +
                      in->from + " " + std::to_string(in->id));
    else
      row(in->id, progress_line(t) + ", from " + in->from);
  }
  std::string text = "[File transfers:]";
  for (const auto& [id, what] : rows) text.append("\n  ").append(std::to_string(id)).append("  ").append(what);
  return text;
}

// ---------------------------------------------------------------- control messages

void Transfers::on_control(const std::string& from, const udp::endpoint& at, const files::Control& c) {
  const std::uint64_t t = files::transfer_of(c);
  std::visit(Overloaded{
                 [&](const files::ctl::Offer& o) { on_offer(from, at, o); },
                 [&](const files::ctl::Accept& a) {
                   Outgoing* o = outgoing(t);
                   // An accept of an offer that lapsed or was withdrawn: the receiver stops waiting.
                   if (o == nullptr || o->to != from || o->via_server) return tell(from, files::ctl::Cancel{t});
                   on_accept(*o, at, a);
                 },
                 [&](const files::ctl::Decline&) {
                   Outgoing* o = outgoing(t);
                   if (o == nullptr || o->to != from) return;
                   host_.say("[" + from + " declined " + o->name + ".]");
                   end_outgoing(t);
                 },
                 [&](const files::ctl::Cancel&) {
                   if (Outgoing* o = outgoing(t); o != nullptr && o->to == from) {
                     host_.say("[" + from + " cancelled " + o->name + ".]");
                     return end_outgoing(t);
                   }
                   if (Incoming* in = incoming(t); in != nullptr && in->from == from && !in->via_server) {
                     if (in->state == Incoming::State::offered)
                       host_.say("[" + from + " withdrew the offer of " + in->name + ".]");
                     else
                       host_.say("[" + from + " cancelled " + in->name + "; what arrived is kept, and an offer of it again resumes.]");
                     end_incoming(t);
                   }
                 },
                 [&](const files::ctl::Done& d) {
                   // In any state: for a file with nothing left to send the Done may overtake the Accept.
                   Outgoing* o = outgoing(t);
                   if (o != nullptr && o->to == from) on_done(*o, d);
                 },
             },
             c);
}

void Transfers::on_accept(Outgoing& o, const udp::endpoint& at, const files::ctl::Accept& a) {
  if (o.state != Outgoing::State::offered) return;  // told again
  if ((o_.ciphers & static_cast<std::uint8_t>(a.cipher)) == 0) {
    tell_peer(o, files::ctl::Cancel{o.transfer});
    host_.say("[The transfer of " + o.name + " to " + o.to + " stopped: " + o.to + " chose a cipher it was not offered.]");
    return end_outgoing(o.transfer);
  }
  o.keys = files::derive_keys(o.key, a.cipher);
  const std::uint32_t count = o.source.chunk_count();
  files::RangeSet have;
  for (const auto& r : a.have) have.insert(std::min(r.start, count), std::min(r.end, count));
  core_.cancel(o.timer);
  o.timer = 0;
  o.at = at;
  files::SenderOptions so;
  so.congestion.max_window = o_.max_window;
  o.sender.emplace(o.transfer, count, have, so);
  o.state = Outgoing::State::sending;
  o.started = core_.now();
  o.base = have.count();
  o.decile = tenths(o.base, o.source.size());
  pump(o);
  progressed(o.transfer);
}

void Transfers::on_done(Outgoing& o, const files::ctl::Done& d) {
  switch (d.result) {
    case files::ctl::Done::Result::saved:
      o.saved = true;
      progressed(o.transfer);  // 100 %, even if the last acks were overtaken by this
      host_.say("[File " + o.name + " sent to " + o.to + ".]");
      break;
    case files::ctl::Done::Result::mismatch:
      host_.say("[File " + o.name + " did not match its check at " + o.to + " and was deleted there.]");
      break;
    case files::ctl::Done::Result::failed: host_.say("[" + o.to + " could not save " + o.name + ".]"); break;
  }
  end_outgoing(o.transfer);
}

// ---------------------------------------------------------------- the chunks

void Transfers::dropped(const char* why, const udp::endpoint& from) {
  ++dropped_;
  spdlog::debug("dropped a file frame from {}:{}: {}", from.address().to_string(), from.port(), why);
}

void Transfers::on_frame(std::string_view bytes, const udp::endpoint& from) {
  auto h = files::peek_header(bytes);
  if (!h) return dropped("malformed header", from);
  if (h->type == files::kChunkCode) {
    Incoming* in = incoming(h->transfer_id);
    if (in == nullptr || in->state != Incoming::State::receiving) return dropped("a chunk of no running transfer", from);
    if (in->at != from) return dropped("a chunk from another address than the offer's", from);
    return on_chunk(*in, bytes, from);
  }
  Outgoing* o = outgoing(h->transfer_id);
  if (o == nullptr || o->state != Outgoing::State::sending) return dropped("an ack of no transfer being sent", from);
  if (o->at != from) return dropped("an ack from another address than the accept's", from);
  auto ack = files::decode_chunk_ack(bytes, o->keys);
  if (!ack) return dropped("an ack that does not decode or authenticate", from);
  if (!o->sender->on_ack(*ack, core_.now())) return dropped("an ack naming chunks never sent", from);
  const std::uint64_t t = o->transfer;
  // One burst for the acks read together, not one per ack: longer runs for one GSO send each.
  if (!o->pump_deferred) {
    o->pump_deferred = true;
    core_.defer([this, t] {
      Outgoing* cur = outgoing(t);
      if (cur == nullptr) return;
      cur->pump_deferred = false;
      pump(*cur);
    });
  }
  progressed(t);
}

void Transfers::pump(Outgoing& o) {
  if (o.state != Outgoing::State::sending) return;
  const auto now = core_.now();
  core_.cancel(o.timer);
  o.timer = 0;
  const std::uint64_t t = o.transfer;
  // The burst is sealed first and sent in one go (sendmmsg); a chat datagram waits no longer
  // for it than before, as none is sent in between.
  burst_.clear();
  int sent = 0;
  while (sent < kBurst) {
    auto tx = o.sender->next(now);
    if (!tx) break;
    if (o.via_server) {  // sealed once already: the same bytes in a frame of this transmission
      burst_.push_back(files::encode(files::Chunk{
          t, tx->index, tx->tx_seq,
          o.sealed.substr(files::sealed_offset(tx->index), files::sealed_length(o.source.size(), tx->index))}));
      ++sent;
      continue;
    }
    auto plain = o.source.read_chunk(tx->index);
    if (!plain) {
      core_.send_many(burst_, o.at);
      host_.say("[The transfer of " + o.name + " to " + o.to + " stopped: " + plain.error().message + "]");
      tell_peer(o, files::ctl::Cancel{t});
      return end_outgoing(t);
    }
    burst_.push_back(files::seal_chunk_datagram(o.keys, t, tx->index, tx->tx_seq, plain.value()));
    ++sent;
  }
  core_.send_many(burst_, o.at);
  if (o.sender->failed()) {
    if (o.via_server) {
      host_.say("[The transfer of " + o.name + " to the server stopped: no answer.]");
      return end_outgoing(t);
    }
    host_.say("[The transfer of " + o.name + " to " + o.to + " stopped: no answer; offer it again to resume.]");
    tell_peer(o, files::ctl::Cancel{t});
    return end_outgoing(t);
  }
  if (o.sender->done() && o.via_server) {
    o.state = Outgoing::State::finishing;
    return commit(t);
  }
  if (o.sender->done()) {
    o.state = Outgoing::State::finishing;
    o.timer = core_.after(kDoneWait, [this, t] {
      Outgoing* cur = outgoing(t);
      if (cur == nullptr) return;
      host_.say("[" + cur->to + " did not say whether it saved " + cur->name + ".]");
      end_outgoing(t);
    });
    return;
  }
  std::optional<transport::Time> when = sent == kBurst ? std::optional(now) : o.sender->next_timer();
  if (when) o.timer = core_.at(*when, [this, t] {
    if (Outgoing* cur = outgoing(t)) pump(*cur);
  });
}

void Transfers::on_chunk(Incoming& in, std::string_view bytes, const udp::endpoint& from) {
  auto c = files::decode_chunk_view(bytes);
  if (!c) return dropped("a chunk that does not decode", from);
  if (c->index >= in.partial->chunk_count()) return dropped("a chunk past the file's end", from);
  std::string& plain = plain_;  // one buffer for every chunk
  const std::uint32_t nonce_tx = in.via_server ? files::kKeptTxSeq : c->tx_seq;
  if (!files::open_chunk_into(in.keys, in.transfer, c->index, nonce_tx, c->sealed, plain))
    return dropped("a chunk that does not authenticate", from);
  if (plain.size() != files::chunk_size(in.offer.size, c->index)) return dropped("a chunk of the wrong size", from);
  const auto now = core_.now();
  in.heard = now;
  if (in.receiver->wanted(c->index)) {
    if (auto st = in.partial->write(c->index, plain); !st) {
      host_.say("[The transfer of " + in.name + " from " + in.from + " stopped: " + st.error().message +
                " The partial file was removed.]");
      in.partial->discard();
      tell_peer(in, files::ctl::Cancel{in.transfer});
      return end_incoming(in.transfer);
    }
  }
  const bool ack = in.receiver->on_chunk(c->index, c->tx_seq, now);
  ++in.since_ack;
  if (in.receiver->complete()) {
    send_ack(in);
    return finish(in);
  }
  // With a hole, each ack names the range the newest chunk joined (its SACK ranges are the one
  // of that chunk and the highest): merged, the sender would learn less of what arrived.
  if (ack && in.receiver->have().size() > 1) send_ack(in);
  else if (ack) ack_soon(in);
  progressed(in.transfer);
  arm(in);
}

void Transfers::ack_soon(Incoming& in) {
  in.ack_owed = true;
  if (in.since_ack >= kAckRun) return send_ack(in);
  if (in.ack_deferred) return;
  in.ack_deferred = true;
  const std::uint64_t t = in.transfer;
  core_.defer([this, t] {
    Incoming* cur = incoming(t);
    if (cur == nullptr || cur->state != Incoming::State::receiving) return;
    cur->ack_deferred = false;
    if (cur->ack_owed) send_ack(*cur);
  });
}

void Transfers::send_ack(Incoming& in) {
  in.ack_owed = false;
  in.since_ack = 0;
  core_.send_bytes(files::encode(in.receiver->make_ack(), in.keys), in.at);
}

void Transfers::arm(Incoming& in) {
  transport::Time when = std::min(in.heard + o_.stall, in.flushed + o_.flush);
  if (auto ack = in.receiver->next_timer()) when = std::min(when, *ack);
  // A timer already armed for no later than that stays: its handler checks what is due and
  // arms again. So a chunk (which moves the stall limit later, and often the delayed ack) costs
  // no cancel and re-add; only a deadline earlier than the armed one does.
  if (in.timer != 0 && in.armed <= when) return;
  core_.cancel(in.timer);
  const std::uint64_t t = in.transfer;
  in.armed = when;
  in.timer = core_.at(when, [this, t] { on_incoming_timer(t); });
}

void Transfers::on_incoming_timer(std::uint64_t t) {
  Incoming* in = incoming(t);
  if (in == nullptr || in->state != Incoming::State::receiving) return;
  in->timer = 0;
  const auto now = core_.now();
  if (in->receiver->on_timer(now)) send_ack(*in);
  if (now >= in->heard + o_.stall) {
    host_.say("[The transfer of " + in->name + " from " + in->from +
              " stopped: nothing arrived for a while; what arrived is kept, and an offer of it again resumes.]");
    tell_peer(*in, files::ctl::Cancel{t});
    return end_incoming(t);
  }
  if (now >= in->flushed + o_.flush) {
    in->flushed = now;
    if (auto st = in->partial->flush(); !st) {
      host_.say("[The transfer of " + in->name + " from " + in->from + " stopped: " + st.error().message +
                " The partial file was removed.]");
      in->partial->discard();
      tell_peer(*in, files::ctl::Cancel{t});
      return end_incoming(t);
    }
  }
  arm(*in);
}

void Transfers::finish(Incoming& in) {
  const std::uint64_t t = in.transfer;
  progressed(t);
  auto saved = in.partial->finish();
  auto done = [&](files::ctl::Done::Result result) { tell_peer(in, files::ctl::Done{t, result}); };
  if (saved) {
    host_.say("[File " + in.name + " from " + in.from + " saved to " + saved.value().string() + ".]");
    done(files::ctl::Done::Result::saved);
  } else if (saved.error().kind == files::ErrorKind::hash_mismatch) {
    host_.say("[File " + in.name + " from " + in.from + " did not match its check and was deleted.]");
    done(files::ctl::Done::Result::mismatch);
  } else {
    host_.say("[File " + in.name + " from " + in.from + " could not be saved: " + saved.error().message + "]");
    in.partial->discard();
    done(files::ctl::Done::Result::failed);
  }
  end_incoming(t);
}

// ---------------------------------------------------------------- progress

std::string Transfers::progress_line(std::uint64_t t) const {
  std::string name;
  std::uint64_t size = 0;
  std::uint64_t held = 0;
  std::uint64_t base = 0;
  transport::Time started{};
  if (auto it = out_.find(t); it != out_.end() && it->second->sender) {
    const Outgoing& o = *it->second;
    name = o.name, size = o.source.size(), base = o.base, started = o.started;
    held = o.saved ? o.source.chunk_count() : o.sender->acked().count();
  } else if (auto in = in_.find(t); in != in_.end() && in->second->receiver) {
    const Incoming& i = *in->second;
    name = i.name, size = i.offer.size, held = i.receiver->have().count(), base = i.base, started = i.started;
  } else {
    return {};
  }
  const std::uint64_t done = bytes_of(held, size);
  const int percent = size == 0 ? 100 : static_cast<int>(done * 100 / size);
  std::string line = name + "  " + std::to_string(percent) + "%  ";
  // "1.1/2.4 MiB": the figure in the total's unit.
  const std::string total = format_size(size);
  const std::string unit = total.substr(total.find(' ') + 1);
  double scale = 1;
  for (const char* u : {"KiB", "MiB", "GiB", "TiB"}) {
    scale *= 1024;
    if (unit == u) break;
  }
  line += (unit == "B" ? std::to_string(done) : one_decimal(static_cast<double>(done) / scale)) + "/" + total;
  const double elapsed = std::chrono::duration<double>(core_.now() - started).count();
  const double moved = static_cast<double>(bytes_of(held - std::min(held, base), size));
  if (elapsed > 0.05 && moved > 0) {
    const double rate = moved / elapsed;
    line += "  " + format_size(static_cast<std::uint64_t>(rate)) + "/s  " +
            duration_text(static_cast<double>(size - done) / rate) + " left";
  }
  return line;
}

void Transfers::progressed(std::uint64_t t) {
  if (!host_.progress) {
    // A pipe: a line each time another tenth is done.
    int* decile = nullptr;
    std::uint64_t size = 0;
    std::uint64_t held = 0;
    if (Outgoing* o = outgoing(t); o != nullptr && o->sender) {
      decile = &o->decile, size = o->source.size(), held = o->saved ? o->source.chunk_count() : o->sender->acked().count();
    } else if (Incoming* in = incoming(t); in != nullptr && in->receiver) {
      decile = &in->decile, size = in->offer.size, held = in->receiver->have().count();
    }
    if (decile == nullptr) return;
    const int now = tenths(held, size);
    if (now > *decile) {
      *decile = now;
      host_.say("[" + progress_line(t) + "]");
    }
    return;
  }
  if (redraw_timer_ != 0) {
    redraw_due_ = true;
    return;
  }
  redraw();
  redraw_timer_ = core_.after(o_.redraw, [this] {
    redraw_timer_ = 0;
    if (redraw_due_) {
      redraw_due_ = false;
      progressed(0);
    }
  });
}

void Transfers::redraw() {
  if (!host_.progress) return;
  std::string text;
  for (const auto& [t, o] : out_)
    if (o->sender) text += (text.empty() ? "" : "  |  ") + progress_line(t);
  for (const auto& [t, in] : in_)
    if (in->state == Incoming::State::receiving) text += (text.empty() ? "" : "  |  ") + progress_line(t);
  if (text == shown_) return;
  shown_ = text;
  host_.progress(text);
}

// ---------------------------------------------------------------- ending

void Transfers::end_outgoing(std::uint64_t t) {
  auto it = out_.find(t);
  if (it == out_.end()) return;
  core_.cancel(it->second->timer);
  out_.erase(it);
  redraw();
  if (host_.ended) host_.ended();
}

void Transfers::end_incoming(std::uint64_t t) {
  auto it = in_.find(t);
  if (it == in_.end()) return;
  core_.cancel(it->second->timer);
  in_.erase(it);  // a Partial still open flushes, to be resumed
  redraw();
  if (host_.ended) host_.ended();
}

void Transfers::stop_all() {
  for (const auto& [t, o] : out_) {
    core_.cancel(o->timer);
    tell_peer(*o, files::ctl::Cancel{t});
  }
  for (const auto& [t, in] : in_) {
    core_.cancel(in->timer);
    tell_peer(*in, files::ctl::Cancel{t});
  }
  out_.clear();
  in_.clear();
  redraw();
}

}  // namespace chat::peer
