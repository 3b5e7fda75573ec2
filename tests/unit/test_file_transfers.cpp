// File transfers between two client cores on the fake network and clock (sim.hpp), SPEC §12:
// what each user sees (the exact status lines) and what lands in the download directory; and
// the control messages' layouts.
#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "file_bytes.hpp"
#include "temp_dir.hpp"
#include "files/control.hpp"
#include "files/wire.hpp"
#include "offline/memory_store.hpp"
#include "sim.hpp"

using TempDir = chat::test::TempDir;
using chat::test::names_in;
using chat::test::random_bytes;
using chat::test::read_file;
using chat::test::write_file;

namespace {

using namespace chat;
using namespace chat::sim;
namespace fs = std::filesystem;

const udp::endpoint kServerAt = addr(1, 5000);

/// How many of `p`'s lines start with `prefix`.
std::size_t starting(const Peer& p, const std::string& prefix) {
  std::size_t n = 0;
  for (const auto& l : p.lines) n += l.rfind(prefix, 0) == 0 ? 1 : 0;
  return n;
}

/// A server, alice and bob online, each with a download directory of its own.
struct Two {
  explicit Two(std::uint64_t seed = 3, std::uint8_t alice_ciphers = files::local_ciphers(),
               std::uint8_t bob_ciphers = files::local_ciphers())
      : net(seed) {
    peer::FileOptions fa;
    fa.download_dir = dir.path() / "alice-downloads";
    fa.ciphers = alice_ciphers;
    peer::FileOptions fb;
    fb.download_dir = dir.path() / "bob-downloads";
    fb.ciphers = bob_ciphers;
    alice = std::make_unique<Peer>(net, "alice", addr(10, 6000), kServerAt, transport::RetryPolicy{}, 15s, 1, 0,
                                   ":memory:", peer::Backlog{}, std::vector<udp::endpoint>{}, fa);
    bob = std::make_unique<Peer>(net, "bob", addr(11, 6000), kServerAt, transport::RetryPolicy{}, 15s, 2, 0, ":memory:",
                                 peer::Backlog{}, std::vector<udp::endpoint>{}, fb);
    REQUIRE(net.run_until([&] { return alice->sees_online("bob") && bob->sees_online("alice"); }, 10s));
  }
  fs::path downloads() const { return dir.path() / "bob-downloads"; }
  /// alice offers a file of `bytes` named `name`; both see the offer.
  fs::path offer(const std::string& name, const std::string& bytes, const std::string& size) {
    fs::path p = dir.path() / name;
    write_file(p, bytes);
    alice->type("sendfile bob " + p.string());
    CHECK(alice->saw(">>> [Offering " + name + " (" + size + ") to bob.]"));
    REQUIRE(net.run_until([&] { return bob->saw(">>> [alice offers " + name + " (" + size + "); type accept alice or decline alice]"); }, 5s));
    return p;
  }
  bool saved(const std::string& name, Duration limit) {
    const std::string at = (downloads() / name).string();
    return net.run_until([&] {
      return bob->saw(">>> [File " + name + " from alice saved to " + at + ".]") && alice->saw(">>> [File " + name + " sent to bob.]");
    }, limit);
  }

  TempDir dir;
  Net net;
  ServerNode server{net, kServerAt, offline::open_memory_store()};
  std::unique_ptr<Peer> alice;
  std::unique_ptr<Peer> bob;
};

TEST_CASE("§12 a file offered and accepted arrives intact, with a line every 10 % on both sides") {
  Two t;
  const std::string bytes = random_bytes(1'000'000, 1);
  t.offer("report.pdf", bytes, "976.6 KiB");
  t.bob->type("accept alice");
  CHECK(t.bob->saw(">>> [Receiving report.pdf (976.6 KiB) from alice.]"));
  REQUIRE(t.saved("report.pdf", 30s));
  CHECK(read_file(t.downloads() / "report.pdf") == bytes);
  CHECK(names_in(t.downloads()) == std::vector<std::string>{"report.pdf"});  // no part file, no sidecar
  for (const auto* p : {t.alice.get(), t.bob.get()}) {
    CHECK(starting(*p, ">>> [report.pdf  ") == 10);
    CHECK(starting(*p, ">>> [report.pdf  100%  976.6/976.6 KiB  ") == 1);
  }
  t.bob->type("transfers");
  CHECK(t.bob->lines.back() == "[No file transfers.]");
}

TEST_CASE("§12 at 5 % and 20 % loss, with reordering, the file still arrives intact") {
  for (double loss : {0.05, 0.2}) {
    CAPTURE(loss);
    Two t(static_cast<std::uint64_t>(loss * 100));
    const std::string bytes = random_bytes(400'000, 2);
    t.offer("lossy.bin", bytes, "390.6 KiB");
    t.net.loss = loss;
    t.bob->type("accept alice");
    REQUIRE(t.saved("lossy.bin", 300s));
    CHECK(read_file(t.downloads() / "lossy.bin") == bytes);
  }
}

TEST_CASE("§12 decline tells the sender, and nothing is written") {
  Two t;
  t.offer("photo.jpg", random_bytes(5000, 3), "4.9 KiB");
  t.bob->type("decline alice");
  CHECK(t.bob->saw(">>> [Declined photo.jpg from alice.]"));
  REQUIRE(t.net.run_until([&] { return t.alice->saw(">>> [bob declined photo.jpg.]"); }, 5s));
  CHECK_FALSE(fs::exists(t.downloads()));
  t.bob->type("accept alice");
  CHECK(t.bob->lines.back() == ">>> [Error: alice offers no file]");
}

TEST_CASE("§12 an offer not answered in 2 minutes lapses, with a line on both sides") {
  Two t;
  t.offer("notes.txt", "hello", "5 B");
  t.net.run_for(119s);
  CHECK_FALSE(t.alice->saw(">>> [The offer of notes.txt to bob lapsed.]"));
  REQUIRE(t.net.run_until([&] {
    return t.alice->saw(">>> [The offer of notes.txt to bob lapsed.]") && t.bob->saw(">>> [alice's offer of notes.txt lapsed.]");
  }, 5s));
  t.bob->type("accept alice");
  CHECK(t.bob->lines.back() == ">>> [Error: alice offers no file]");
}

TEST_CASE("§12 a file changed after its offer fails the check: deleted at the receiver, said on both sides") {
  Two t;
  std::string bytes = random_bytes(200'000, 4);
  fs::path p = t.offer("data.bin", bytes, "195.3 KiB");
  bytes[123'456] ^= 0x01;  // one bit, same size: only the hash can tell
  write_file(p, bytes);
  t.bob->type("accept alice");
  REQUIRE(t.net.run_until([&] {
    return t.bob->saw(">>> [File data.bin from alice did not match its check and was deleted.]") &&
           t.alice->saw(">>> [File data.bin did not match its check at bob and was deleted there.]");
  }, 30s));
  CHECK(names_in(t.downloads()).empty());
}

TEST_CASE("§12 cancelled midway and offered again, the transfer resumes with what arrived") {
  Two t;
  const std::string bytes = random_bytes(3'000'000, 5);
  fs::path p = t.offer("video.mp4", bytes, "2.9 MiB");
  t.bob->type("accept alice");
  REQUIRE(t.net.run_until([&] { return starting(*t.bob, ">>> [video.mp4  40%") == 1; }, 30s));
  t.alice->type("cancel 1");
  CHECK(t.alice->saw(">>> [Cancelled video.mp4 to bob.]"));
  REQUIRE(t.net.run_until([&] {
    return t.bob->saw(">>> [alice cancelled video.mp4; what arrived is kept, and an offer of it again resumes.]");
  }, 5s));
  t.net.run_for(2s);
  t.alice->type("sendfile bob " + p.string());
  REQUIRE(t.net.run_until([&] { return t.bob->count(">>> [alice offers video.mp4 (2.9 MiB); type accept alice or decline alice]") == 2; }, 5s));
  t.bob->type("accept alice");
  const std::string resumed = t.bob->lines.back();
  CAPTURE(resumed);
  CHECK(resumed.rfind(">>> [Receiving video.mp4 (2.9 MiB) from alice, resuming with ", 0) == 0);
  REQUIRE(t.saved("video.mp4", 30s));
  CHECK(read_file(t.downloads() / "video.mp4") == bytes);
  // The second run sent only what was missing: it started at 40 % or more.
  CHECK(starting(*t.bob, ">>> [video.mp4  10%") == 1);
  CHECK(starting(*t.bob, ">>> [video.mp4  100%") == 1);
}

TEST_CASE("§12 the sender leaves mid-transfer (a signal): the receiver is told and keeps what arrived") {
  Two t;
  t.offer("video.mp4", random_bytes(3'000'000, 6), "2.9 MiB");
  t.bob->type("accept alice");
  REQUIRE(t.net.run_until([&] { return starting(*t.bob, ">>> [video.mp4  30%") == 1; }, 30s));
  t.net.act(t.alice->client.core(), [&] { t.alice->client.leave(); });
  REQUIRE(t.net.run_until([&] {
    return t.bob->saw(">>> [alice cancelled video.mp4; what arrived is kept, and an offer of it again resumes.]");
  }, 5s));
  bool part = false;
  for (const auto& n : names_in(t.downloads())) part = part || n.ends_with(".part");
  CHECK(part);
}

TEST_CASE("§12 end of input waits for a running transfer, then the client exits") {
  Two t;
  const std::string bytes = random_bytes(2'000'000, 7);
  t.offer("big.bin", bytes, "1.9 MiB");
  t.bob->type("accept alice");
  t.alice->end_input();
  REQUIRE(t.saved("big.bin", 30s));
  REQUIRE(t.net.run_until([&] { return t.alice->exit_code == 0; }, 10s));
  CHECK(read_file(t.downloads() / "big.bin") == bytes);
}

TEST_CASE("§12 file frames that are not of a running transfer's peer are dropped and counted; the file is intact") {
  Two t;
  const std::string bytes = random_bytes(500'000, 8);
  t.offer("doc.txt", bytes, "488.3 KiB");
  t.bob->type("accept alice");
  REQUIRE(t.net.run_until([&] { return starting(*t.bob, ">>> [doc.txt  20%") == 1; }, 30s));
  const udp::endpoint mallory = addr(66, 6000);
  std::string garbage(40, '\x55');
  garbage[0] = 2;
  garbage[1] = static_cast<char>(files::kChunkCode);
  for (int i = 0; i < 5; ++i) t.net.send(mallory, t.bob->at(), garbage);  // a chunk of no transfer
  std::string ack(35, '\0');
  ack[0] = 2;
  ack[1] = static_cast<char>(files::kChunkAckCode);
  ack[2] = 1;
  for (int i = 0; i < 3; ++i) t.net.send(mallory, t.alice->at(), ack);  // an ack of no transfer
  REQUIRE(t.saved("doc.txt", 30s));
  CHECK(read_file(t.downloads() / "doc.txt") == bytes);
  CHECK(t.bob->client.transfers().dropped() >= 5);
  CHECK(t.alice->client.transfers().dropped() >= 3);
}

TEST_CASE("§12 sendfile of a FIFO, a directory or a missing file: one error line each, at once") {
  Two t;
  const fs::path fifo = t.dir.path() / "pipe";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  t.alice->type("sendfile bob " + fifo.string());  // opening it must not wait for a writer
  CHECK(t.alice->lines.back() == ">>> [Error: refusing to use " + fifo.string() + ": it is not a regular file]");
  t.alice->type("sendfile bob " + t.dir.path().string());
  CHECK(t.alice->lines.back() == ">>> [Error: refusing to use " + t.dir.path().string() + ": it is not a regular file]");
  t.alice->type("sendfile bob " + (t.dir.path() / "nope").string());
  CHECK(t.alice->lines.back() == ">>> [Error: cannot open " + (t.dir.path() / "nope").string() + ": No such file or directory]");
}

TEST_CASE("§12 two offers from one sender: accept without the id says which ids there are") {
  Two t;
  fs::path a = t.dir.path() / "a.txt";
  fs::path b = t.dir.path() / "b.txt";
  write_file(a, "first");
  write_file(b, "second");
  t.alice->type("sendfile bob " + a.string());
  t.alice->type("sendfile bob " + b.string());
  REQUIRE(t.net.run_until([&] { return t.bob->saw(">>> [alice offers b.txt (6 B); type accept alice 2 or decline alice 2]"); }, 5s));
  CHECK(t.bob->saw(">>> [alice offers a.txt (5 B); type accept alice or decline alice]"));
  t.bob->type("accept alice");
  CHECK(t.bob->lines.back() == ">>> [alice offers 2 files: type accept alice <id> (transfers lists them)]");
  t.bob->type("accept alice 2");
  REQUIRE(t.net.run_until([&] { return t.bob->saw(">>> [File b.txt from alice saved to " + (t.downloads() / "b.txt").string() + ".]"); }, 10s));
  CHECK(read_file(t.downloads() / "b.txt") == "second");
  t.bob->type("decline alice");  // the only one left
  CHECK(t.bob->lines.back() == ">>> [Declined a.txt from alice.]");
}

TEST_CASE("§12 a file saved beside one of the same name never overwrites it") {
  Two t;
  fs::create_directories(t.downloads());
  write_file(t.downloads() / "report.pdf", "mine");
  t.offer("report.pdf", "theirs", "6 B");
  t.bob->type("accept alice");
  const std::string at = (t.downloads() / "report (1).pdf").string();
  REQUIRE(t.net.run_until([&] { return t.bob->saw(">>> [File report.pdf from alice saved to " + at + ".]"); }, 10s));
  CHECK(read_file(t.downloads() / "report.pdf") == "mine");
  CHECK(read_file(at) == "theirs");
}

TEST_CASE("file control messages: each round-trips, anything else is refused") {
  files::ctl::Offer offer{7, 1'000'000, {}, {}, "report.pdf"};
  offer.hash[0] = 1;
  offer.key[31] = 2;
  files::ctl::Offer both = offer;
  both.ciphers = 3;
  files::ctl::Offer unknown_bit = offer;
  unknown_bit.ciphers = 0x81;  // a cipher of a later build: kept, never chosen
  const std::vector<files::Control> all = {
      offer,
      both,
      unknown_bit,
      files::ctl::Accept{8, {{0, 10}, {12, 20}}},
      files::ctl::Accept{8, {}},
      files::ctl::Accept{8, {{1, 2}}, files::Cipher::aes256gcm},
      files::ctl::Decline{9},
      files::ctl::Cancel{10},
      files::ctl::Done{11, files::ctl::Done::Result::mismatch},
  };
  // An offer or accept of a build before the cipher byte ends without it: XChaCha20-Poly1305.
  auto earlier = [](files::Control c) {
    if (auto* o = std::get_if<files::ctl::Offer>(&c)) o->ciphers = 1;
    if (auto* a = std::get_if<files::ctl::Accept>(&c)) a->cipher = files::Cipher::xchacha20poly1305;
    return c;
  };
  for (const auto& c : all) {
    const std::string bytes = files::encode(c);
    auto back = files::decode(bytes);
    REQUIRE(back.has_value());
    CHECK(*back == c);
    const bool has_cipher = std::holds_alternative<files::ctl::Offer>(c) || std::holds_alternative<files::ctl::Accept>(c);
    for (std::size_t n = 0; n < bytes.size(); ++n) {
      auto cut = files::decode(bytes.substr(0, n));
      if (has_cipher && n + 1 == bytes.size()) {
        REQUIRE(cut.has_value());
        CHECK(*cut == earlier(c));
      } else {
        CHECK_FALSE(cut.has_value());
      }
    }
    CHECK_FALSE(files::decode(bytes + "x").has_value());
  }
  // Ranges out of order, touching, empty; a transfer id 0; an unknown op; an empty name.
  CHECK_FALSE(files::decode(files::encode(files::ctl::Accept{8, {{12, 20}, {0, 10}}})).has_value());
  CHECK_FALSE(files::decode(files::encode(files::ctl::Accept{8, {{0, 10}, {10, 20}}})).has_value());
  CHECK_FALSE(files::decode(files::encode(files::ctl::Accept{8, {{5, 5}}})).has_value());
  CHECK_FALSE(files::decode(files::encode(files::ctl::Cancel{0})).has_value());
  std::string unknown = files::encode(files::ctl::Cancel{3});
  unknown[0] = 9;
  CHECK_FALSE(files::decode(unknown).has_value());
  files::ctl::Offer unnamed = offer;
  unnamed.name.clear();
  CHECK_FALSE(files::decode(files::encode(unnamed)).has_value());
  files::ctl::Offer long_name = offer;
  long_name.name.assign(256, 'x');
  CHECK_THROWS_AS(files::encode(long_name), std::length_error);
  // An offer without XChaCha20-Poly1305 (which every peer has); an accept of no cipher or an unknown one.
  files::ctl::Offer aes_only = offer;
  aes_only.ciphers = 2;
  CHECK_FALSE(files::decode(files::encode(aes_only)).has_value());
  for (const char c : {'\x00', '\x03', '\x04'}) {
    std::string accept = files::encode(files::ctl::Accept{8, {}});
    accept.back() = c;
    CHECK_FALSE(files::decode(accept).has_value());
  }
}

/// One side's Transfers on a core of its own, with a host that records what it says and sends.
struct Side {
  explicit Side(std::uint8_t ciphers, const fs::path& downloads) : core(transport::CoreOptions{}, clock) {
    peer::FileOptions o;
    o.download_dir = downloads;
    o.ciphers = ciphers;
    peer::FileHost h;
    h.say = [this](const std::string& line) { lines.push_back(line); };
    h.send_control = [this](const std::string&, const files::Control& c, std::function<void(bool)>) { sent.push_back(c); };
    h.reachable = [](const std::string&) { return std::optional<udp::endpoint>(addr(11, 6000)); };
    transfers = std::make_unique<peer::Transfers>(core, h, o);
  }
  transport::ManualClock clock;
  transport::Core core;
  std::unique_ptr<peer::Transfers> transfers;
  std::vector<std::string> lines;
  std::vector<files::Control> sent;
};

TEST_CASE("§12 the receiver chooses AES-256-GCM only if both can use it; a sender refuses a cipher it did not offer") {
  const auto x = static_cast<std::uint8_t>(files::Cipher::xchacha20poly1305);
  const std::uint8_t mine = files::local_ciphers();
  const bool aes = (mine & static_cast<std::uint8_t>(files::Cipher::aes256gcm)) != 0;
  TempDir dir;
  // The accept bob sends names the cipher chosen from alice's offer and his own.
  for (const auto& [offered, his, want] : std::vector<std::tuple<std::uint8_t, std::uint8_t, files::Cipher>>{
           {mine, mine, aes ? files::Cipher::aes256gcm : files::Cipher::xchacha20poly1305},
           {x, mine, files::Cipher::xchacha20poly1305},
           {mine, x, files::Cipher::xchacha20poly1305}}) {
    CAPTURE(int{offered});
    CAPTURE(int{his});
    Side bob(his, dir.path() / ("bob-" + std::to_string(offered) + "-" + std::to_string(his)));
    files::ctl::Offer offer{21, 5000, {}, files::new_file_key(), "n.bin", offered};
    bob.transfers->on_control("alice", addr(10, 6000), offer);
    bob.transfers->accept("alice", 0);
    REQUIRE(bob.sent.size() == 1);
    const auto* a = std::get_if<files::ctl::Accept>(&bob.sent[0]);
    REQUIRE(a != nullptr);
    CHECK(a->cipher == want);
  }
  // alice offered XChaCha20-Poly1305 alone; an accept of AES-256-GCM stops the transfer.
  Side alice(x, dir.path() / "alice");
  write_file(dir.path() / "n.bin", random_bytes(5000, 4));
  alice.transfers->sendfile("bob", (dir.path() / "n.bin").string());
  REQUIRE(alice.sent.size() == 1);
  const auto* o = std::get_if<files::ctl::Offer>(&alice.sent[0]);
  REQUIRE(o != nullptr);
  CHECK(o->ciphers == x);
  alice.transfers->on_control("bob", addr(11, 6000), files::ctl::Accept{o->transfer, {}, files::Cipher::aes256gcm});
  CHECK(alice.lines.back() == "[The transfer of n.bin to bob stopped: bob chose a cipher it was not offered.]");
  REQUIRE(alice.sent.size() == 2);
  CHECK(std::holds_alternative<files::ctl::Cancel>(alice.sent[1]));
  CHECK(alice.transfers->list() == "[No file transfers.]");
}

TEST_CASE("§12 the chunks are sealed with the cipher both can use; a file arrives intact whichever it is") {
  const auto x = static_cast<std::uint8_t>(files::Cipher::xchacha20poly1305);
  const std::uint8_t mine = files::local_ciphers();
  for (const auto& [a, b] : std::vector<std::pair<std::uint8_t, std::uint8_t>>{{mine, mine}, {x, mine}, {mine, x}}) {
    CAPTURE(int{a});
    CAPTURE(int{b});
    Two t(3, a, b);
    const std::string bytes = random_bytes(300'000, 11);
    t.offer("c.bin", bytes, "293.0 KiB");
    t.bob->type("accept alice");
    REQUIRE(t.saved("c.bin", 30s));
    CHECK(read_file(t.downloads() / "c.bin") == bytes);
  }
}

}  // namespace
