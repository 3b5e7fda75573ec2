// The Asio driver: the receive loop, one timer for all of a core's deadlines, sends to the socket.
#include "transport/endpoint.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <sys/socket.h>

namespace chat::transport {
namespace {

// Datagrams read synchronously after the socket turns readable, before the turn ends (checked
// between recvmmsg calls: the last may bring 32 coalesced buffers, up to 64 datagrams each). The
// turn's saves share one commit: at 64 a commit took ~53 saves and durable saves ran at ~18,000/s,
// at 1,024 at ~40,000/s (bench store, 800 in flight; issue 13).
constexpr int kReadBurst = 1024;
// Messages one recvmmsg or sendmmsg carries at most: a system call per 32 instead of one each.
constexpr unsigned kBatch = 32;
// A receive buffer: the largest UDP payload, so neither a buffer the kernel coalesced (UDP GRO)
// nor an oversized datagram is ever truncated (the core refuses one > kMaxDatagram by its size).
constexpr std::size_t kReceiveBuffer = 65536;
// One GSO send: at most 64 datagrams (UDP_MAX_SEGMENTS; later kernels allow more) and an IPv4
// datagram's payload (65535 - 20 - 8): 44 file chunks of 1472 bytes.
constexpr std::size_t kGsoSegments = 64;
constexpr std::size_t kGsoBytes = 65507;
// Datagrams one GSO sendmmsg carries at most (an iovec each).
constexpr std::size_t kSendIov = 256;
// Socket buffer asked for, so bursts (fan-out, table snapshots) are not dropped by the kernel.
constexpr int kSocketBuffer = 4 << 20;

void grow_buffers(udp::socket& s) {
  int fd = s.native_handle();
  int size = kSocketBuffer;
  // FORCE works as root and ignores rmem_max; otherwise take what the kernel allows.
  if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) != 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) != 0)
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
}

// Whether the kernel knows UDP_SEGMENT (reading it sets nothing); asks for UDP_GRO, which may
// be refused: then every datagram arrives alone, as without it.
bool offload(udp::socket& s) {
  int fd = s.native_handle();
  int on = 1;
  setsockopt(fd, SOL_UDP, UDP_GRO, &on, sizeof on);
  int size = 0;
  socklen_t len = sizeof size;
  return getsockopt(fd, SOL_UDP, UDP_SEGMENT, &size, &len) == 0;
}

// The errors with which a kernel or a route refuses a GSO send (no checksum offload, an MTU
// below the segment, no support).
bool refuses_gso(int err) { return err == EINVAL || err == EIO || err == ENOPROTOOPT || err == EOPNOTSUPP; }

// Room for one int-sized control message (UDP_SEGMENT's uint16_t, UDP_GRO's int).
struct Control {
  alignas(cmsghdr) char bytes[CMSG_SPACE(sizeof(int))];
};

}  // namespace

struct Endpoint::Batch {
  std::array<std::array<char, kReceiveBuffer>, kBatch> buffers;  // 2 MiB, not zeroed (make_unique_for_overwrite)
  std::array<sockaddr_storage, kBatch> from;
  std::array<iovec, kBatch> iov;
  std::array<Control, kBatch> control;
  std::array<mmsghdr, kBatch> msgs;
};

const TimeSource& system_clock() {
  static const SystemClock clock;
  return clock;
}

Endpoint::Endpoint(net::io_context& io, Core& core, const udp::endpoint& bind)
    : io_(io), core_(core), socket_(io), timer_(io), batch_(std::make_unique_for_overwrite<Batch>()) {
  socket_.open(bind.protocol());
  socket_.bind(bind);
  socket_.non_blocking(true);
  grow_buffers(socket_);
  gso_ = offload(socket_);
  core_.set_output([this](const std::string& bytes, const udp::endpoint& to) { return send(bytes, to); });
  core_.set_batch_output(
      [this](std::span<const std::string> datagrams, const udp::endpoint& to) { return send_many(datagrams, to); });
  // Work that appears outside a turn (a test's request, a reply callback elsewhere) still
  // gets its timer armed: once, after the current handler.
  core_.set_wakeup([this] {
    if (in_turn_ || turn_posted_ || closed_) return;
    turn_posted_ = true;
    net::post(io_, [this] {
      turn_posted_ = false;
      finish_turn();
    });
  });
}

Endpoint::~Endpoint() {
  close();
  core_.set_output({});
  core_.set_batch_output({});
  core_.set_wakeup({});
}

void Endpoint::start() { receive(); }

void Endpoint::close() {
  if (closed_) return;
  closed_ = true;
  core_.close();
  error_code ec;
  socket_.close(ec);
  timer_.cancel();
}

bool Endpoint::send(const std::string& bytes, const udp::endpoint& to) {
  error_code ec;
  socket_.send_to(net::buffer(bytes), to, 0, ec);
  if (ec) {
    spdlog::debug("send to {}:{} failed: {}", to.address().to_string(), to.port(), ec.message());
    return false;
  }
  return true;
}

std::size_t Endpoint::send_many(std::span<const std::string> datagrams, const udp::endpoint& to) {
  // Consecutive datagrams of one size (the last of a run may be shorter and ends it) go as one
  // GSO message: an iovec each and UDP_SEGMENT = that size; the kernel cuts it into the same
  // datagrams. A lone datagram goes as a plain message. Up to kBatch messages per sendmmsg. As
  // in send_each(): a message that fails is skipped (its datagrams not sent) and the rest go on;
  // a full buffer ends the batch. A refused GSO message turns GSO off for good and is sent again
  // one datagram at a time.
  struct Group {
    std::size_t first;
    std::size_t count;
  };
  std::array<iovec, kSendIov> iov;
  std::array<mmsghdr, kBatch> msgs;
  std::array<Control, kBatch> control;
  std::array<Group, kBatch> groups;
  std::size_t sent = 0;
  std::size_t next = 0;
  while (next < datagrams.size() && !closed_) {
    if (!gso_) return sent + send_each(datagrams.subspan(next), to);
    unsigned m = 0;
    std::size_t at = next;
    std::size_t used = 0;
    while (m < kBatch && at < datagrams.size() && used < kSendIov) {
      const std::size_t size = datagrams[at].size();
      std::size_t count = 1;
      std::size_t bytes = size;
      while (size > 0 && at + count < datagrams.size() && count < kGsoSegments && used + count < kSendIov) {
        const std::size_t s = datagrams[at + count].size();
        if (s == 0 || s > size || bytes + s > kGsoBytes) break;
        bytes += s;
        ++count;
        if (s < size) break;
      }
      msgs[m] = mmsghdr{};
      msghdr& h = msgs[m].msg_hdr;
      h.msg_name = const_cast<void*>(static_cast<const void*>(to.data()));
      h.msg_namelen = static_cast<socklen_t>(to.size());
      h.msg_iov = &iov[used];
      h.msg_iovlen = count;
      for (std::size_t i = 0; i < count; ++i) {
        const std::string& d = datagrams[at + i];
        iov[used + i] = iovec{const_cast<char*>(d.data()), d.size()};
      }
      if (count > 1) {
        h.msg_control = control[m].bytes;
        h.msg_controllen = CMSG_SPACE(sizeof(std::uint16_t));
        cmsghdr* c = CMSG_FIRSTHDR(&h);
        c->cmsg_level = SOL_UDP;
        c->cmsg_type = UDP_SEGMENT;
        c->cmsg_len = CMSG_LEN(sizeof(std::uint16_t));
        const auto segment = static_cast<std::uint16_t>(size);
        std::memcpy(CMSG_DATA(c), &segment, sizeof segment);
      }
      groups[m++] = Group{at, count};
      at += count;
      used += count;
    }
    const int r = ::sendmmsg(socket_.native_handle(), msgs.data(), m, MSG_DONTWAIT);
    if (r < 0 && errno == EINTR) continue;
    if (r > 0) {
      for (int i = 0; i < r; ++i) sent += groups[i].count;
      next = groups[r - 1].first + groups[r - 1].count;
      // Message r failed (its error is lost): dropped, not sent again, as in send_each(). A
      // GSO refusal shows when a GSO message is the first of a call.
      if (static_cast<unsigned>(r) < m) next += groups[r].count;
      continue;
    }
    const int err = r < 0 ? errno : EIO;
    if (groups[0].count > 1 && refuses_gso(err)) {
      spdlog::debug("UDP GSO refused ({}): sending one datagram at a time", std::strerror(err));
      gso_ = false;
      continue;
    }
    spdlog::debug("send to {}:{} failed: {}", to.address().to_string(), to.port(), std::strerror(err));
    if (err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS) break;
    next += groups[0].count;  // that message fails alone
  }
  return sent;
}

std::size_t Endpoint::send_each(std::span<const std::string> datagrams, const udp::endpoint& to) {
  // kBatch datagrams per sendmmsg, all to `to`. sendmmsg stops at the first datagram that fails
  // (a short count; its error is lost): that one is skipped, not sent again, and the rest go
  // on, as each would with a send of its own (a firewall's DROP fails just the one, with
  // EPERM); a full buffer (EAGAIN) ends the batch.
  std::array<iovec, kBatch> iov;
  std::array<mmsghdr, kBatch> msgs;
  std::size_t sent = 0;
  std::size_t next = 0;
  while (next < datagrams.size() && !closed_) {
    const unsigned n = static_cast<unsigned>(std::min<std::size_t>(kBatch, datagrams.size() - next));
    for (unsigned i = 0; i < n; ++i) {
      const std::string& d = datagrams[next + i];
      iov[i] = iovec{const_cast<char*>(d.data()), d.size()};
      msgs[i] = mmsghdr{};
      msgs[i].msg_hdr.msg_name = const_cast<void*>(static_cast<const void*>(to.data()));
      msgs[i].msg_hdr.msg_namelen = static_cast<socklen_t>(to.size());
      msgs[i].msg_hdr.msg_iov = &iov[i];
      msgs[i].msg_hdr.msg_iovlen = 1;
    }
    const int r = ::sendmmsg(socket_.native_handle(), msgs.data(), n, MSG_DONTWAIT);
    if (r < 0 && errno == EINTR) continue;
    if (r > 0) {
      sent += static_cast<std::size_t>(r);
      next += static_cast<std::size_t>(r);
      if (static_cast<unsigned>(r) < n) ++next;  // datagram r failed: dropped, as a send of its own would be
      continue;
    }
    const int err = r < 0 ? errno : EIO;
    spdlog::debug("send to {}:{} failed: {}", to.address().to_string(), to.port(), std::strerror(err));
    if (err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS) break;
    ++next;  // that one fails alone
  }
  return sent;
}

void Endpoint::receive() {
  // Readiness only, the reading is drain()'s: a read here, without its control messages, could
  // not tell a coalesced buffer from one datagram. (Asio re-arms the edge-triggered epoll
  // registration for a wait, so datagrams left queued still complete it.)
  socket_.async_wait(udp::socket::wait_read, [this](error_code ec) {
    if (ec == net::error::operation_aborted || closed_) return;
    in_turn_ = true;
    try {
      if (ec) spdlog::debug("receive error: {}", ec.message());
      else drain();
    } catch (const std::exception& e) {
      // The core guards its handlers; this is what escaped anyway (out of memory): the loop
      // must go on receiving.
      spdlog::error("receiving failed: {}", e.what());
    }
    finish_turn();
    if (!closed_) receive();
  });
}

void Endpoint::drain() {
  // What is already queued, read kBatch buffers at a time without another trip through the
  // reactor (the socket is non-blocking), in the order it arrived. A buffer with a UDP_GRO
  // control message holds datagrams of that size back to back (the last may be shorter).
  Batch& b = *batch_;
  for (int done = 0; done < kReadBurst && !closed_;) {
    for (unsigned i = 0; i < kBatch; ++i) {
      b.iov[i] = iovec{b.buffers[i].data(), b.buffers[i].size()};
      b.msgs[i] = mmsghdr{};
      b.msgs[i].msg_hdr.msg_name = &b.from[i];
      b.msgs[i].msg_hdr.msg_namelen = sizeof b.from[i];
      b.msgs[i].msg_hdr.msg_iov = &b.iov[i];
      b.msgs[i].msg_hdr.msg_iovlen = 1;
      b.msgs[i].msg_hdr.msg_control = b.control[i].bytes;
      b.msgs[i].msg_hdr.msg_controllen = sizeof b.control[i].bytes;
    }
    const int got = ::recvmmsg(socket_.native_handle(), b.msgs.data(), kBatch, MSG_DONTWAIT, nullptr);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK)  // an ICMP error, a transient failure
      spdlog::debug("receive error: {}", std::strerror(errno));
    if (got <= 0) break;  // nothing more queued, or the error: the next wait sees what is left
    for (int i = 0; i < got && !closed_; ++i) {
      msghdr& h = b.msgs[i].msg_hdr;
      const socklen_t len = h.msg_namelen;
      if (len > sender_.capacity()) continue;
      std::memcpy(sender_.data(), &b.from[i], len);
      sender_.resize(len);
      std::size_t segment = 0;
      for (cmsghdr* c = CMSG_FIRSTHDR(&h); c != nullptr; c = CMSG_NXTHDR(&h, c)) {
        if (c->cmsg_level != SOL_UDP || c->cmsg_type != UDP_GRO) continue;
        int size = 0;
        std::memcpy(&size, CMSG_DATA(c), sizeof size);
        if (size > 0) segment = static_cast<std::size_t>(size);
      }
      const char* data = b.buffers[i].data();
      const std::size_t n = b.msgs[i].msg_len;
      if (segment == 0 || segment >= n) {
        core_.on_datagram(std::string_view(data, n), sender_);
        ++done;
        continue;
      }
      for (std::size_t at = 0; at < n && !closed_; at += segment, ++done)
        core_.on_datagram(std::string_view(data + at, std::min(segment, n - at)), sender_);
    }
    if (static_cast<unsigned>(got) < kBatch) break;  // the queue is empty
  }
}

void Endpoint::finish_turn() {
  in_turn_ = true;
  core_.settle();
  in_turn_ = false;
  arm();
}

void Endpoint::arm() {
  if (closed_) return;
  std::optional<Time> next = core_.next_deadline();
  if (next == armed_) return;
  armed_ = next;
  if (!next) {
    timer_.cancel();
    return;
  }
  timer_.expires_at(*next);
  timer_.async_wait([this](error_code ec) {
    if (ec || closed_) return;
    armed_.reset();
    in_turn_ = true;
    core_.on_timer();
    finish_turn();
  });
}

Socket::Socket(net::io_context& io, const udp::endpoint& bind, RetryPolicy policy, Guard guard)
    : Core(CoreOptions{policy, guard, 0}, system_clock()), endpoint_(io, *this, bind) {}

void Socket::start(Handler handler) {
  set_handler(std::move(handler));
  endpoint_.start();
}

}  // namespace chat::transport
