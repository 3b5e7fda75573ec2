// The files the server keeps for offline recipients (SPEC §12): uploads coming in, kept files
// offered at registration, downloads going out. The chunks arrive and leave as file frames
// (lib/files' wire format), driven by the same Sender and Receiver cores as a transfer between
// peers; what the server keeps is the chunks as the sender sealed them for the recipient, and
// the sender's sealed offer, so it never sees a file's name or contents. No socket and no clock
// of its own: it runs on the server's transport::Core.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>

#include "offline/async_store.hpp"
#include "protocol/messages.hpp"
#include "transport/core.hpp"

namespace chat::registry {

struct DepotOptions {
  /// The largest file kept (SPEC §12: --max-file-size).
  std::uint64_t max_file_size = 16ull << 20;
  /// The bytes kept for one recipient at most, uploads under way included (--file-quota).
  std::uint64_t quota = 64ull << 20;
  /// How long a file is kept when nobody downloads it (--file-days).
  std::chrono::seconds keep{7 * 24 * 3600};
  /// Uploads and downloads running at once at most (each holds its file in memory).
  std::size_t max_running = 16;
  /// An upload or download that hears nothing for this long is dropped.
  std::chrono::milliseconds stall{20'000};
  /// Chunks in flight at most in a download (as between peers: peer::FileOptions::max_window).
  std::uint32_t max_window = 128;
};

/// What the depot asks of the server.
struct DepotHost {
  /// True if `name` has a session at exactly `from` (the sender of a request is who it claims).
  std::function<bool(const std::string& name, const udp::endpoint& from)> is_at;
  /// The identity `name` is bound to, as bytes (empty: unknown or not bound).
  std::function<std::string(const std::string& name)> key_of;
  /// A store call failed (logged and counted by the server).
  std::function<void(const std::string& what, const std::string& why)> store_failed;
  /// A file for `to` is kept now (the recipient may be online here after all: a peer that did
  /// not answer its sender's offer).
  std::function<void(const std::string& to)> kept{};
};

class Depot {
 public:
  Depot(transport::Core& core, offline::AsyncStore& store, DepotHost host, DepotOptions options);
  ~Depot();
  Depot(const Depot&) = delete;
  Depot& operator=(const Depot&) = delete;

  /// Starts the expiry of old files (now, then every hour, or every `keep` if that is shorter).
  void start();

  void on_put(const protocol::FilePut& r, const udp::endpoint& from);
  void on_commit(const protocol::FileCommit& r, const udp::endpoint& from);
  void on_get(const protocol::FileGet& r, const udp::endpoint& from);
  void on_done(const protocol::FileDone& r, const udp::endpoint& from);
  /// A chunk of an upload or a chunk_ack of a download.
  void on_frame(std::string_view bytes, const udp::endpoint& from);
  /// Offers `name`, registered at `to`, every file kept for it (one FileOffer each; a client
  /// that holds an offer already ignores it again).
  void offer(const std::string& name, const udp::endpoint& to);

  /// File frames dropped: malformed, forged, or of no upload or download of theirs.
  std::uint64_t dropped() const { return dropped_; }
  /// Files kept since the start.
  std::uint64_t kept() const { return kept_; }

 private:
  struct Upload;
  struct Download;

  void refuse(const udp::endpoint& to, std::uint64_t re, const std::string& reason);
  void on_chunk(Upload& u, std::string_view bytes);
  void arm_upload(std::uint64_t transfer);
  void pump(Download& d);
  void expire();
  void drop(const char* why, const udp::endpoint& from);
  /// Bytes of uploads under way for `to`.
  std::uint64_t uploading_for(const std::string& to) const;

  transport::Core& core_;
  offline::AsyncStore& store_;
  DepotHost host_;
  DepotOptions o_;
  std::map<std::uint64_t, std::unique_ptr<Upload>> uploads_;      // by transfer id
  std::map<std::uint64_t, std::unique_ptr<Download>> downloads_;  // by transfer id
  std::uint64_t dropped_ = 0;
  std::uint64_t kept_ = 0;
};

}  // namespace chat::registry
