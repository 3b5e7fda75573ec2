// Files the server keeps for an offline recipient (SPEC §12), on the fake network and clock:
// a server core with its Depot, alice uploading, bob downloading after he registers; what each
// user sees (the exact status lines), what the store keeps, and the limits.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "file_bytes.hpp"
#include "temp_dir.hpp"
#include "files/wire.hpp"
#include "offline/memory_store.hpp"
#include "protocol/codec.hpp"
#include "sim.hpp"

using TempDir = chat::test::TempDir;
using chat::test::random_bytes;
using chat::test::read_file;
using chat::test::write_file;

namespace {

using namespace chat;
using namespace chat::sim;
namespace fs = std::filesystem;

const udp::endpoint kServerAt = addr(1, 5000);

registry::ServerOptions small_limits() {
  registry::ServerOptions o;
  o.files.max_file_size = 1 << 20;
  o.files.quota = 1 << 20;
  o.files.keep = std::chrono::hours(48);
  return o;
}

/// A server keeping its files in `kept` (which the test reads), alice online, bob gone offline.
struct Away {
  explicit Away(std::uint64_t seed = 5, registry::ServerOptions so = small_limits()) : net(seed) {
    server = std::make_unique<ServerNode>(net, kServerAt, std::make_unique<SharedStore>(kept), so);
    peer::FileOptions fa;
    fa.download_dir = dir.path() / "alice-downloads";
    peer::FileOptions fb;
    fb.download_dir = dir.path() / "bob-downloads";
    alice = std::make_unique<Peer>(net, "alice", addr(10, 6000), kServerAt, transport::RetryPolicy{}, 15s, 1, 0,
                                   ":memory:", peer::Backlog{}, std::vector<udp::endpoint>{}, fa);
    bob = std::make_unique<Peer>(net, "bob", addr(11, 6000), kServerAt, transport::RetryPolicy{}, 15s, 2, 0, ":memory:",
                                 peer::Backlog{}, std::vector<udp::endpoint>{}, fb);
    REQUIRE(net.run_until([&] { return alice->sees_online("bob") && bob->sees_online("alice"); }, 10s));
    bob->type("dereg bob");
    REQUIRE(net.run_until([&] { return bob->saw(">>> [You are Offline. Bye.]") && !alice->sees_online("bob"); }, 10s));
  }
  fs::path downloads() const { return dir.path() / "bob-downloads"; }
  /// alice sends a file of `bytes` named `name` to offline bob.
  void send(const std::string& name, const std::string& bytes, const std::string& size) {
    fs::path p = dir.path() / name;
    write_file(p, bytes);
    alice->type("sendfile bob " + p.string());
    CHECK(alice->saw(">>> [bob is offline; sending " + name + " (" + size + ") to the server for bob.]"));
  }
  bool kept_line(const std::string& name, Duration limit) {
    return net.run_until([&] { return alice->saw(">>> [" + name + " saved by the server for bob.]"); }, limit);
  }
  bool offered(const std::string& name, const std::string& size, std::size_t times, Duration limit) {
    const std::string line = ">>> [alice offers " + name + " (" + size + "); type accept alice or decline alice]";
    return net.run_until([&] { return bob->count(line) == times; }, limit);
  }

  TempDir dir;
  Net net;
  offline::MemoryStore kept;
  std::unique_ptr<ServerNode> server;
  std::unique_ptr<Peer> alice;
  std::unique_ptr<Peer> bob;
};

}  // namespace

TEST_CASE("§12 a file for an offline recipient is kept sealed by the server and downloaded after reg, at 0 % and 20 % loss") {
  for (double loss : {0.0, 0.2}) {
    CAPTURE(loss);
    Away t(static_cast<std::uint64_t>(loss * 100) + 1);
    const std::string bytes = random_bytes(700'000, 1);
    t.net.loss = loss;
    t.send("report.pdf", bytes, "683.6 KiB");
    REQUIRE(t.kept_line("report.pdf", 120s));
    // What the server keeps is sealed: the plaintext appears nowhere in it, nor the name.
    const auto held = t.kept.files_for("bob");
    REQUIRE(held.size() == 1);
    CHECK(held[0].size == bytes.size());
    CHECK(held[0].offer.find("report.pdf") == std::string::npos);
    const auto data = t.kept.file_data("bob", held[0].transfer);
    REQUIRE(data);
    CHECK(data->size() == bytes.size() + files::kTagBytes * *files::chunk_count(bytes.size()));
    CHECK(data->find(bytes.substr(1000, 64)) == std::string::npos);

    t.bob->type("reg bob");
    REQUIRE(t.offered("report.pdf", "683.6 KiB", 1, 60s));
    t.bob->type("accept alice");
    CHECK(t.bob->saw(">>> [Receiving report.pdf (683.6 KiB) from alice.]"));
    const std::string at = (t.downloads() / "report.pdf").string();
    REQUIRE(t.net.run_until([&] { return t.bob->saw(">>> [File report.pdf from alice saved to " + at + ".]"); }, 300s));
    CHECK(read_file(t.downloads() / "report.pdf") == bytes);
    // Downloaded and checked: deleted from the server.
    REQUIRE(t.net.run_until([&] { return t.kept.files_for("bob").empty(); }, 30s));
    CHECK(t.server->server.depot().kept() == 1);
  }
}

TEST_CASE("§12 a kept file is offered at every registration until it is taken; decline deletes it") {
  Away t;
  t.send("a.bin", random_bytes(5000, 2), "4.9 KiB");
  REQUIRE(t.kept_line("a.bin", 30s));
  t.bob->type("reg bob");
  REQUIRE(t.offered("a.bin", "4.9 KiB", 1, 30s));
  // Not answered: still kept, offered again at the next registration (it does not lapse).
  t.net.run_for(150s);
  CHECK_FALSE(t.bob->saw(">>> [alice's offer of a.bin lapsed.]"));
  t.bob->type("dereg bob");
  REQUIRE(t.net.run_until([&] { return t.bob->count(">>> [You are Offline. Bye.]") == 2; }, 10s));
  t.bob->type("reg bob");
  // The client keeps the first offer: the same transfer is not offered twice while it runs.
  t.net.run_for(5s);
  CHECK(t.bob->count(">>> [alice offers a.bin (4.9 KiB); type accept alice or decline alice]") == 1);
  t.bob->type("decline alice");
  CHECK(t.bob->saw(">>> [Declined a.bin from alice.]"));
  REQUIRE(t.net.run_until([&] { return t.kept.files_for("bob").empty(); }, 10s));
  CHECK_FALSE(fs::exists(t.downloads()));
}

TEST_CASE("§12 a peer that does not answer the offer gets the file through the server, offered as soon as it is kept") {
  Away t;
  t.bob->type("reg bob");
  REQUIRE(t.net.run_until([&] { return t.alice->sees_online("bob"); }, 10s));
  // bob hears nothing from alice for a while (a firewall, a suspended laptop): the offer goes
  // unanswered, and alice's client gives the file to the server instead.
  t.net.filter = [&](const udp::endpoint& from, const udp::endpoint& to, const protocol::Message&) {
    return from == t.alice->at() && to == t.bob->at();
  };
  const std::string bytes = random_bytes(50'000, 7);
  write_file(t.dir.path() / "memo.txt", bytes);
  t.alice->type("sendfile bob " + (t.dir.path() / "memo.txt").string());
  CHECK(t.alice->saw(">>> [Offering memo.txt (48.8 KiB) to bob.]"));
  REQUIRE(t.net.run_until([&] { return t.alice->saw(">>> [bob did not answer; sending memo.txt to the server for bob.]"); }, 30s));
  REQUIRE(t.kept_line("memo.txt", 30s));
  // bob is online at the server: offered now, not at his next registration.
  REQUIRE(t.offered("memo.txt", "48.8 KiB", 1, 10s));
  t.bob->type("accept alice");
  const std::string at = (t.downloads() / "memo.txt").string();
  REQUIRE(t.net.run_until([&] { return t.bob->saw(">>> [File memo.txt from alice saved to " + at + ".]"); }, 30s));
  CHECK(read_file(t.downloads() / "memo.txt") == bytes);
}

TEST_CASE("§12 a suspended peer that reads the direct offer late, then the server's, downloads it from the server") {
  Away t;
  t.bob->type("reg bob");
  REQUIRE(t.net.run_until([&] { return t.alice->sees_online("bob"); }, 10s));
  // bob is suspended: what is sent to him waits (in his socket's queue) until he runs again.
  bool suspended = true;
  std::vector<std::pair<udp::endpoint, std::string>> queued;
  t.net.filter = [&](const udp::endpoint& from, const udp::endpoint& to, const protocol::Message& m) {
    if (!suspended || to != t.bob->at()) return false;
    queued.emplace_back(from, protocol::encode(m));
    return true;
  };
  const std::string bytes = random_bytes(50'000, 9);
  write_file(t.dir.path() / "memo.txt", bytes);
  t.alice->type("sendfile bob " + (t.dir.path() / "memo.txt").string());
  REQUIRE(t.net.run_until([&] { return t.alice->saw(">>> [bob did not answer; sending memo.txt to the server for bob.]"); }, 30s));
  REQUIRE(t.kept_line("memo.txt", 30s));
  t.net.run_for(5s);  // the server's offer to bob goes unanswered too
  // bob runs again and reads what waited: alice's offer, then the server's offer of the same file.
  suspended = false;
  t.net.min_delay = t.net.max_delay;  // in the order they were queued
  for (const auto& [from, datagram] : queued) t.net.send(from, t.bob->at(), datagram);
  REQUIRE(t.offered("memo.txt", "48.8 KiB", 1, 5s));
  t.net.run_for(1s);
  CHECK(t.bob->count(">>> [alice offers memo.txt (48.8 KiB); type accept alice or decline alice]") == 1);
  // Accepted, it comes from the server: alice's client, which gave it to the server, is not asked.
  t.bob->type("accept alice");
  const std::string at = (t.downloads() / "memo.txt").string();
  REQUIRE(t.net.run_until([&] { return t.bob->saw(">>> [File memo.txt from alice saved to " + at + ".]"); }, 30s));
  CHECK(read_file(t.downloads() / "memo.txt") == bytes);
  CHECK_FALSE(t.bob->saw(">>> [alice cancelled memo.txt; what arrived is kept, and an offer of it again resumes.]"));
  REQUIRE(t.net.run_until([&] { return t.kept.files_for("bob").empty(); }, 10s));
}

TEST_CASE("§12 a kept file from a blocked sender is never offered, and declined: the server deletes it") {
  Away t;
  t.bob->type("block alice");
  CHECK(t.bob->saw(">>> [alice is blocked.]"));
  t.send("spam.bin", random_bytes(9000, 8), "8.8 KiB");
  REQUIRE(t.kept_line("spam.bin", 30s));
  t.bob->type("reg bob");
  REQUIRE(t.net.run_until([&] { return t.kept.files_for("bob").empty(); }, 10s));
  CHECK(t.bob->count(">>> [alice offers spam.bin (8.8 KiB); type accept alice or decline alice]") == 0);
  CHECK(t.bob->client.client_counters().blocked == 1);
}

TEST_CASE("§12 a file larger than the server's limit, or past the recipient's quota, is refused with a line") {
  Away t;
  t.send("big.bin", random_bytes((1 << 20) + 1, 3), "1.0 MiB");
  REQUIRE(t.net.run_until([&] {
    return t.alice->saw(
        ">>> [The server did not take big.bin for bob: the file is larger than the server's limit of 1 MiB.]");
  }, 10s));
  t.send("one.bin", random_bytes(600'000, 4), "585.9 KiB");
  REQUIRE(t.kept_line("one.bin", 30s));
  t.send("two.bin", random_bytes(600'000, 5), "585.9 KiB");
  REQUIRE(t.net.run_until([&] {
    return t.alice->saw(">>> [The server did not take two.bin for bob: the space the server keeps for bob is full (1 MiB).]");
  }, 10s));
  CHECK(t.kept.files_for("bob").size() == 1);
  CHECK(t.alice->client.transfers().running() == 0);
}

TEST_CASE("§12 a kept file nobody downloads is deleted after its time") {
  registry::ServerOptions so = small_limits();
  so.files.keep = std::chrono::hours(2);
  Away t(6, so);
  t.send("old.bin", random_bytes(3000, 6), "2.9 KiB");
  REQUIRE(t.kept_line("old.bin", 30s));
  t.net.run_for(std::chrono::minutes(119));
  CHECK(t.kept.files_for("bob").size() == 1);
  // Expiry runs hourly: gone within an hour past its time.
  t.net.run_for(std::chrono::minutes(62));
  CHECK(t.kept.files_for("bob").empty());
}

TEST_CASE("§12 a keep shorter than an hour is checked that often: a file kept for 10 s is gone within 20 s") {
  registry::ServerOptions so = small_limits();
  so.files.keep = 10s;
  Away t(6, so);
  t.send("brief.bin", random_bytes(3000, 6), "2.9 KiB");
  REQUIRE(t.kept_line("brief.bin", 30s));
  t.net.run_for(9s);
  CHECK(t.kept.files_for("bob").size() == 1);
  // Checked every 10 s: gone within 10 s past its time.
  t.net.run_for(11s);
  CHECK(t.kept.files_for("bob").empty());
  // And offered no more: bob registers to nothing.
  t.bob->type("reg bob");
  REQUIRE(t.net.run_until([&] { return t.bob->count(">>> [Welcome, You are registered.]") == 2; }, 10s));
  t.net.run_for(5s);
  CHECK(t.bob->count(">>> [alice offers brief.bin (2.9 KiB); type accept alice or decline alice]") == 0);
}

TEST_CASE("§12 file requests from an address that is not the name's session are refused") {
  Away t;
  // A datagram forged as bob's FileGet from another address: refused, nothing sent there.
  const udp::endpoint mallory = addr(66, 6666);
  CHECK(t.kept.put_file(offline::NewFile{"bob", "alice", std::string(32, '\x01'), 9, 1, 10, "offer", std::string(26, 'x')}));
  transport::Core raw(transport::CoreOptions{}, t.net.clock);
  std::size_t frames = 0;
  raw.set_frame_handler([&](std::string_view, const udp::endpoint&) { ++frames; });
  t.net.attach(raw, mallory);
  std::optional<protocol::Message> answer;
  t.net.act(raw, [&] {
    raw.request(protocol::FileGet{77, "bob", 9, {}}, kServerAt, [&](const protocol::Message* m) {
      if (m != nullptr) answer = *m;
    });
  });
  REQUIRE(t.net.run_until([&] { return answer.has_value(); }, 5s));
  const auto* refused = std::get_if<protocol::Refused>(&*answer);
  REQUIRE(refused != nullptr);
  CHECK(refused->reason == "register first");
  t.net.run_for(2s);
  CHECK(frames == 0);
  t.net.detach(mallory);
  CHECK(t.kept.files_for("bob").size() == 1);
}

TEST_CASE("§12 an upload whose chunks kept coming past its first stall limit is dropped one limit after the last") {
  // The upload's timer stays armed for the earliest deadline it was armed for, not moved by each
  // chunk (Depot::arm_upload): when it fires early it arms again. The upload must live on while
  // chunks come (past the first chunk's limit) and be dropped one limit after the last chunk.
  registry::ServerOptions so = small_limits();
  so.files.stall = 2s;
  Away t(8, so);
  // At alice's address (her session at the server), a core the test drives chunk by chunk.
  const udp::endpoint at = t.alice->at();
  t.net.detach(at);
  transport::Core raw(transport::CoreOptions{}, t.net.clock);
  files::TransferKeys keys{};
  keys.ack.fill(7);
  protocol::Key ack_key{};
  ack_key.fill(7);
  std::size_t acks = 0;
  raw.set_frame_handler([&](std::string_view bytes, const udp::endpoint&) {
    if (files::decode_chunk_ack(bytes, keys)) ++acks;
  });
  t.net.attach(raw, at);
  struct Off {  // off the network before `raw` is gone, whatever the outcome
    Net& net;
    udp::endpoint at;
    ~Off() { net.detach(at); }
  } off{t.net, at};
  const std::uint64_t transfer = 4242;
  const std::uint64_t size = 6 * files::kChunkPayload;
  auto ask = [&](const protocol::Message& m) {
    std::optional<protocol::Message> answer;
    t.net.act(raw, [&] {
      raw.request(m, kServerAt, [&](const protocol::Message* r) {
        if (r != nullptr) answer = *r;
      });
    });
    REQUIRE(t.net.run_until([&] { return answer.has_value(); }, 5s));
    return *answer;
  };
  // Chunk `index`, sent `gap` after the one before (the server cannot open it: any bytes do).
  auto chunk_after = [&](Duration gap, std::uint32_t index) {
    t.net.run_for(gap);
    t.net.act(raw, [&] {
      raw.send_bytes(files::encode(files::Chunk{transfer, index, index + 1,
                                                std::string(files::chunk_size(size, index) + files::kTagBytes, 'x')}),
                     kServerAt);
    });
    t.net.run_for(100ms);  // there, and its ack back
  };
  REQUIRE(std::holds_alternative<protocol::Ack>(ask(protocol::FilePut{901, "alice", "bob", transfer, size, ack_key})));
  // What the server says of a commit now (it leaves the upload's timer as it is).
  std::uint64_t id = 902;
  auto commit = [&](Duration after) {
    t.net.run_for(after);
    const auto answer = ask(protocol::FileCommit{id++, "alice", transfer, "offer"});
    const auto* refused = std::get_if<protocol::Refused>(&answer);
    return refused != nullptr ? refused->reason : std::string("(not refused)");
  };
  // From the last chunk down, so each is out of order and acknowledged at once: no delayed ack
  // is waiting, and the timer stays armed for the limit of the FilePut's time. A chunk every
  // 1.5 s: each is taken (acknowledged, nothing dropped), 2.5 s past that first limit.
  chunk_after(0ms, 5);
  for (std::uint32_t i = 4; i > 1; --i) chunk_after(1400ms, i);
  CHECK(acks == 4);
  CHECK(t.server->server.depot().dropped() == 0);
  // Still there 1.9 s after the last chunk, gone 2.05 s after it.
  CHECK(commit(1800ms) == "the upload is not complete");
  CHECK(commit(150ms) == "no such upload");
  chunk_after(0ms, 1);  // a chunk of no upload now: dropped, not acknowledged
  CHECK(t.server->server.depot().dropped() == 1);
  CHECK(acks == 4);
  CHECK(t.kept.files_for("bob").empty());
}
