// Unit tests of chat_identity: key files, fingerprints, signatures, envelopes, tokens and the peer state.
#include <doctest/doctest.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "temp_dir.hpp"
#include "identity/envelope.hpp"
#include "identity/identity.hpp"
#include "identity/peer_state.hpp"

namespace fs = std::filesystem;
using namespace chat::identity;
using chat::protocol::Key;
using chat::protocol::Signature;

using TempDir = chat::test::TempDir;

namespace {


/// Sets (or unsets, with nullptr) an environment variable for one test, restoring it afterwards.
class EnvVar {
 public:
  EnvVar(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value != nullptr) {
      ::setenv(name, value, 1);
    } else {
      ::unsetenv(name);
    }
  }
  EnvVar(const EnvVar&) = delete;
  EnvVar& operator=(const EnvVar&) = delete;
  ~EnvVar() {
    if (old_) {
      ::setenv(name_.c_str(), old_->c_str(), 1);
    } else {
      ::unsetenv(name_.c_str());
    }
  }

 private:
  std::string name_;
  std::optional<std::string> old_;
};

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_file(const fs::path& p, const std::string& content, mode_t mode) {
  {
    std::ofstream out(p, std::ios::binary | std::ios::trunc);
    out << content;
  }
  REQUIRE(::chmod(p.c_str(), mode) == 0);
}

mode_t mode_of(const fs::path& p) {
  struct stat st {};
  REQUIRE(::lstat(p.c_str(), &st) == 0);
  return st.st_mode & 07777;
}

std::string hex(const std::uint8_t* p, std::size_t n) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  for (std::size_t i = 0; i < n; ++i) {
    out += digits[p[i] >> 4];
    out += digits[p[i] & 15];
  }
  return out;
}

template <std::size_t N>
std::array<std::uint8_t, N> from_hex(const std::string& h) {
  std::array<std::uint8_t, N> out{};
  REQUIRE(h.size() == 2 * N);
  for (std::size_t i = 0; i < N; ++i) out[i] = static_cast<std::uint8_t>(std::stoi(h.substr(2 * i, 2), nullptr, 16));
  return out;
}

Seed seed_of(std::uint8_t b) {
  Seed s{};
  s.fill(b);
  return s;
}

/// The IdentityError message of load_or_create(file), or "" if it loaded.
std::string load_error(const fs::path& file) {
  try {
    load_or_create(file);
  } catch (const IdentityError& e) {
    return e.what();
  }
  return "";
}

const std::string kValidContent = "chatapp-identity-v1\n" + std::string(64, 'a') + "\n";

}  // namespace

// ---- Key files ----

TEST_CASE("a new key file is created 0600 in 0700 directories, and loads back to the same identity") {
  TempDir tmp;
  EnvVar xdg("XDG_DATA_HOME", tmp.path().c_str());
  const fs::path file = default_identity_path("alice");
  CHECK(file == tmp.path() / "chatapp" / "identities" / "alice.key");

  bool created = false;
  const Identity first = load_or_create(file, &created);
  CHECK(created);
  CHECK(mode_of(file) == 0600);
  CHECK(mode_of(tmp.path() / "chatapp") == 0700);
  CHECK(mode_of(tmp.path() / "chatapp" / "identities") == 0700);
  const std::string content = read_all(file);
  CHECK(content == "chatapp-identity-v1\n" + hex(first.seed().data(), first.seed().size()) + "\n");

  const Identity again = load_or_create(file, &created);
  CHECK_FALSE(created);
  CHECK(again.public_key() == first.public_key());
  CHECK(again.seed() == first.seed());
  CHECK(read_all(file) == content);
}

TEST_CASE("a key file written by hand (upper-case hex) loads as the identity of its seed") {
  TempDir tmp;
  const fs::path file = tmp.path() / "k.key";
  const Seed seed = seed_of(0xaa);
  write_file(file, "chatapp-identity-v1\n" + std::string(64, 'A') + "\n", 0600);
  CHECK(load_or_create(file).public_key() == Identity::from_seed(seed).public_key());
  write_file(file, "chatapp-identity-v1\n" + std::string(64, 'b') + "\n", 0400);  // read-only is fine
  CHECK(load_or_create(file).public_key() == Identity::from_seed(seed_of(0xbb)).public_key());
}

TEST_CASE("unsafe or foreign key files are refused with a sentence naming the file, and left as they are") {
  TempDir tmp;
  const fs::path file = tmp.path() / "alice.key";
  const std::string f = file.string();

  SUBCASE("mode 0644") {
    write_file(file, kValidContent, 0644);
    CHECK(load_error(file) == "identity file " + f + " is readable by others (mode 0644): run chmod 600 " + f);
  }
  SUBCASE("mode 0640") {
    write_file(file, kValidContent, 0640);
    CHECK(load_error(file) == "identity file " + f + " is readable by others (mode 0640): run chmod 600 " + f);
  }
  SUBCASE("mode 0620") {
    write_file(file, kValidContent, 0620);
    CHECK(load_error(file) == "identity file " + f + " is open to others (mode 0620): run chmod 600 " + f);
  }
  SUBCASE("a directory") {
    fs::create_directory(file);
    ::chmod(file.c_str(), 0700);
    CHECK(load_error(file) ==
          "identity file " + f + " is a directory: move it away, or pass the right key file with --identity");
    CHECK(fs::is_directory(file));
    return;
  }
  SUBCASE("a symbolic link, even to a good key file") {
    const fs::path target = tmp.path() / "real.key";
    write_file(target, kValidContent, 0600);
    fs::create_symlink(target, file);
    CHECK(load_error(file) == "identity file " + f +
                                  " is a symbolic link: ChatApp only reads a regular file; put the key file itself there");
    CHECK(fs::is_symlink(file));
    return;
  }
  SUBCASE("a wrong header") {
    write_file(file, "chatapp-identity-v2\n" + std::string(64, 'a') + "\n", 0600);
    CHECK(load_error(file) == "identity file " + f +
                                  " is not a ChatApp identity (the first line is not chatapp-identity-v1): restore it "
                                  "from a backup, or move it away to create a new identity");
  }
  SUBCASE("no header") {
    write_file(file, std::string(64, 'a') + "\n", 0600);
    CHECK(load_error(file).find("(the first line is not chatapp-identity-v1)") != std::string::npos);
  }
  SUBCASE("an empty file") {
    write_file(file, "", 0600);
    CHECK(load_error(file).find("(the first line is not chatapp-identity-v1)") != std::string::npos);
  }
  SUBCASE("a non-hex digit") {
    write_file(file, "chatapp-identity-v1\n" + std::string(63, 'a') + "g\n", 0600);
    CHECK(load_error(file) == "identity file " + f +
                                  " is not a ChatApp identity (the second line is not 64 hex digits): restore it "
                                  "from a backup, or move it away to create a new identity");
  }
  SUBCASE("63 hex digits") {
    write_file(file, "chatapp-identity-v1\n" + std::string(63, 'a') + "\n", 0600);
    CHECK(load_error(file).find("(the second line is not 64 hex digits)") != std::string::npos);
  }
  SUBCASE("65 hex digits") {
    write_file(file, "chatapp-identity-v1\n" + std::string(65, 'a') + "\n", 0600);
    CHECK(load_error(file).find("(the second line is not 64 hex digits)") != std::string::npos);
  }
  SUBCASE("no final newline") {
    write_file(file, "chatapp-identity-v1\n" + std::string(64, 'a'), 0600);
    CHECK(load_error(file).find("(the second line is not 64 hex digits)") != std::string::npos);
  }
  SUBCASE("extra bytes") {
    write_file(file, kValidContent + "\n", 0600);
    CHECK(load_error(file) == "identity file " + f +
                                  " is not a ChatApp identity (extra bytes after the key): restore it from a backup, "
                                  "or move it away to create a new identity");
  }
  SUBCASE("another user's file") {
    if (::geteuid() != 0) return;  // only root can give a file away
    write_file(file, kValidContent, 0600);
    REQUIRE(::chown(file.c_str(), 65534, 65534) == 0);
    CHECK(load_error(file) == "identity file " + f + " belongs to another user (uid 65534): use a key file of your own");
  }
  // Never overwritten: whatever was refused is still there, byte for byte.
  if (fs::is_regular_file(file)) {
    const std::string before = read_all(file);
    CHECK_THROWS_AS(load_or_create(file), IdentityError);
    CHECK(read_all(file) == before);
  }
}

TEST_CASE("a good existing key file is never rewritten") {
  TempDir tmp;
  const fs::path file = tmp.path() / "k.key";
  write_file(file, kValidContent, 0600);
  struct stat before {};
  REQUIRE(::stat(file.c_str(), &before) == 0);
  bool created = true;
  load_or_create(file, &created);
  CHECK_FALSE(created);
  struct stat after {};
  REQUIRE(::stat(file.c_str(), &after) == 0);
  CHECK(after.st_ino == before.st_ino);
  CHECK(after.st_mtim.tv_sec == before.st_mtim.tv_sec);
  CHECK(after.st_mtim.tv_nsec == before.st_mtim.tv_nsec);
  CHECK(read_all(file) == kValidContent);
}

TEST_CASE("an existing chatapp directory open to others is refused when a key file is created there") {
  TempDir tmp;
  EnvVar xdg("XDG_DATA_HOME", tmp.path().c_str());
  const fs::path dir = tmp.path() / "chatapp";
  fs::create_directory(dir);
  REQUIRE(::chmod(dir.c_str(), 0755) == 0);
  const fs::path file = default_identity_path("alice");
  CHECK(load_error(file) == "directory " + dir.string() + " is open to others (mode 0755): run chmod 700 " + dir.string());
  CHECK_FALSE(fs::exists(file));

  REQUIRE(::chmod(dir.c_str(), 0700) == 0);
  bool created = false;
  load_or_create(file, &created);
  CHECK(created);
}

TEST_CASE("a key file outside chatapp/ is created with its missing directories 0700") {
  TempDir tmp;
  const fs::path file = tmp.path() / "a" / "b" / "me.key";
  bool created = false;
  const Identity id = load_or_create(file, &created);
  CHECK(created);
  CHECK(mode_of(tmp.path() / "a") == 0700);
  CHECK(mode_of(tmp.path() / "a" / "b") == 0700);
  CHECK(mode_of(file) == 0600);
  CHECK(load_or_create(file).public_key() == id.public_key());
}

TEST_CASE("processes racing to create the same key file all end up with the one identity") {
  TempDir tmp;
  const fs::path file = tmp.path() / "chatapp" / "identities" / "race.key";
  constexpr int kProcs = 6;
  std::vector<std::pair<pid_t, int>> children;
  for (int i = 0; i < kProcs; ++i) {
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::close(fds[0]);
      std::string out;
      try {
        const Identity id = load_or_create(file);
        out = hex(id.public_key().data(), id.public_key().size());
      } catch (const std::exception& e) {
        out = std::string("error: ") + e.what();
      }
      [[maybe_unused]] const auto n = ::write(fds[1], out.data(), out.size());
      ::_exit(0);
    }
    ::close(fds[1]);
    children.emplace_back(pid, fds[0]);
  }
  std::vector<std::string> keys;
  for (const auto& [pid, fd] : children) {
    std::string got;
    char buf[256];
    for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;) got.append(buf, static_cast<std::size_t>(n));
    ::close(fd);
    int status = 0;
    ::waitpid(pid, &status, 0);
    keys.push_back(got);
  }
  const Identity id = load_or_create(file);
  for (const auto& k : keys) CHECK(k == hex(id.public_key().data(), id.public_key().size()));
}

TEST_CASE("data_home follows XDG_DATA_HOME, else HOME, and refuses neither") {
  SUBCASE("XDG_DATA_HOME absolute") {
    EnvVar xdg("XDG_DATA_HOME", "/srv/data");
    EnvVar home("HOME", "/home/u");
    CHECK(data_home() == fs::path("/srv/data"));
    CHECK(default_identity_path("bob") == fs::path("/srv/data/chatapp/identities/bob.key"));
    CHECK(default_state_path("bob") == fs::path("/srv/data/chatapp/peers/bob.db"));
  }
  SUBCASE("XDG_DATA_HOME relative is ignored") {
    EnvVar xdg("XDG_DATA_HOME", "relative/dir");
    EnvVar home("HOME", "/home/u");
    CHECK(data_home() == fs::path("/home/u/.local/share"));
  }
  SUBCASE("XDG_DATA_HOME empty or unset") {
    EnvVar xdg("XDG_DATA_HOME", "");
    EnvVar home("HOME", "/home/u");
    CHECK(default_state_path("bob") == fs::path("/home/u/.local/share/chatapp/peers/bob.db"));
  }
  SUBCASE("neither") {
    EnvVar xdg("XDG_DATA_HOME", nullptr);
    EnvVar home("HOME", nullptr);
    CHECK_THROWS_AS(data_home(), IdentityError);
    CHECK_THROWS_AS(default_identity_path("bob"), IdentityError);
  }
  SUBCASE("a name that cannot name a file") {
    EnvVar xdg("XDG_DATA_HOME", "/srv/data");
    CHECK_THROWS_AS(default_identity_path("../bob"), IdentityError);
    CHECK_THROWS_AS(default_identity_path(".bob"), IdentityError);
    CHECK_THROWS_AS(default_state_path(""), IdentityError);
    CHECK_THROWS_AS(default_state_path(std::string(33, 'a')), IdentityError);
    CHECK(default_state_path("a.b-c_D9") == fs::path("/srv/data/chatapp/peers/a.b-c_D9.db"));
  }
}

// ---- Keys, signatures, fingerprints ----

TEST_CASE("from_seed matches RFC 8032's Ed25519 test vector 1") {
  const auto seed = from_hex<32>("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");
  const Identity id = Identity::from_seed(seed);
  CHECK(hex(id.public_key().data(), 32) == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
  const Signature sig = id.sign("");
  CHECK(hex(sig.data(), 64) ==
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe2"
        "4655141438e7a100b");
  CHECK(verify(id.public_key(), "", sig));
  // BLAKE2b-240 of "chatapp-fingerprint-v1" || key, computed independently (Python's hashlib).
  CHECK(fingerprint(id.public_key()) == "95272 62653 45801 46516 09574 89707");
}

TEST_CASE("fingerprints are deterministic, 6 groups of 5 digits, and differ between keys") {
  const Identity a = Identity::from_seed(seed_of(1));
  const Identity b = Identity::from_seed(seed_of(2));
  const std::string fa = fingerprint(a.public_key());
  CHECK(fa == fingerprint(Identity::from_seed(seed_of(1)).public_key()));
  REQUIRE(fa.size() == 6 * 5 + 5);
  for (std::size_t i = 0; i < fa.size(); ++i) {
    if (i % 6 == 5) {
      CHECK(fa[i] == ' ');
    } else {
      CHECK((fa[i] >= '0' && fa[i] <= '9'));
    }
  }
  CHECK(fa != fingerprint(b.public_key()));
  CHECK(fingerprint(Identity::generate().public_key()) != fingerprint(Identity::generate().public_key()));
}

TEST_CASE("signatures verify for their key and message only") {
  const Identity a = Identity::generate();
  const Identity b = Identity::generate();
  const Signature sig = a.sign("hello");
  CHECK(verify(a.public_key(), "hello", sig));
  CHECK_FALSE(verify(b.public_key(), "hello", sig));
  CHECK_FALSE(verify(a.public_key(), "hellO", sig));
  CHECK_FALSE(verify(a.public_key(), "hello!", sig));
  for (std::size_t i = 0; i < sig.size(); ++i) {
    Signature bad = sig;
    bad[i] ^= 0x01;
    CHECK_FALSE(verify(a.public_key(), "hello", bad));
  }
  // Keys that are not valid points: refused, not thrown.
  Key zero{};
  Key one{};
  one[0] = 1;  // the neutral element: small order
  Key noncanonical{};
  noncanonical.fill(0xff);
  noncanonical[31] = 0x7f;
  CHECK_FALSE(verify(zero, "hello", sig));
  CHECK_FALSE(verify(one, "hello", sig));
  CHECK_FALSE(verify(noncanonical, "hello", sig));
}

TEST_CASE("an Identity moves, and the moved-from one holds no secret") {
  Identity a = Identity::from_seed(seed_of(7));
  const Key pk = a.public_key();
  Identity b = std::move(a);
  CHECK(b.public_key() == pk);
  CHECK(b.seed() == seed_of(7));
  CHECK(a.seed() == Seed{});  // NOLINT(bugprone-use-after-move): the wipe is what is tested
  CHECK(a.box_secret_key() == BoxKey{});
  Identity c = Identity::generate();
  c = std::move(b);
  CHECK(c.public_key() == pk);
  CHECK(Identity::from_seed(seed_of(7)).box_public_key() == c.box_public_key());
}

// ---- Envelopes ----

namespace {

struct Trio {
  Identity alice = Identity::from_seed(seed_of(0xa1));
  Identity bob = Identity::from_seed(seed_of(0xb0));
  Identity carol = Identity::from_seed(seed_of(0xc0));
  Pair alice_bob{alice, bob.public_key()};
  Pair bob_alice{bob, alice.public_key()};
  Pair carol_alice{carol, alice.public_key()};
  Pair carol_bob{carol, bob.public_key()};
};

}  // namespace

TEST_CASE("a box opens with either side of its pair only") {
  Trio t;
  REQUIRE(t.alice_bob.valid());
  CHECK(t.alice_bob.peer() == t.bob.public_key());
  const std::string box = t.alice_bob.seal("secret");
  CHECK(box.size() == kBoxOverhead + 6);
  CHECK(t.bob_alice.open(box) == std::optional<std::string>("secret"));
  CHECK(t.alice_bob.open(box) == std::optional<std::string>("secret"));
  CHECK_FALSE(t.carol_alice.open(box));
  CHECK_FALSE(t.carol_bob.open(box));
  CHECK(t.alice_bob.seal("secret") != box);  // a fresh nonce each time
  CHECK(t.bob_alice.open(t.alice_bob.seal("")) == std::optional<std::string>(""));
  CHECK_FALSE(t.bob_alice.open(box.substr(0, kBoxOverhead - 1)));
  CHECK_FALSE(t.bob_alice.open(""));
}

TEST_CASE("a pair with a key that is not a valid point is not valid") {
  const Identity me = Identity::generate();
  Key zero{};
  Pair p(me, zero);
  CHECK_FALSE(p.valid());
  CHECK_THROWS_AS(p.seal("x"), std::logic_error);
  CHECK_FALSE(p.open(std::string(64, 'x')));
  CHECK_FALSE(open_direct(p, std::string(64, 'x'), "me"));
  Pair moved = Pair(me, Identity::generate().public_key());
  CHECK(moved.valid());
  Pair target = std::move(moved);
  CHECK(target.valid());
  CHECK_FALSE(moved.valid());  // NOLINT(bugprone-use-after-move): the wipe is what is tested
}

TEST_CASE("a direct message opens for its recipient, as sealed") {
  Trio t;
  const std::string body = seal_direct(t.alice_bob, 42, 1'700'000'000'000, "bob", "hi bob");
  CHECK(body.size() == kBoxOverhead + 1 + 8 + 8 + 1 + 3 + 6);
  const auto m = open_direct(t.bob_alice, body, "bob");
  REQUIRE(m);
  CHECK(*m == Opened{42, 1'700'000'000'000, "hi bob"});
  // Another recipient, and the sender itself (a reflected message), are refused.
  CHECK_FALSE(open_direct(t.carol_alice, body, "carol"));
  CHECK_FALSE(open_direct(t.alice_bob, body, "alice"));
  CHECK_FALSE(open_direct(t.bob_alice, body, "bo"));
  CHECK_FALSE(open_direct(t.bob_alice, body, "bobb"));
}

TEST_CASE("every single changed byte of a sealed direct body is refused") {
  Trio t;
  const std::string body = seal_direct(t.alice_bob, 7, 1000, "bob", "tamper with me");
  for (std::size_t i = 0; i < body.size(); ++i) {
    for (const unsigned char flip : {0x01, 0x80, 0xff}) {
      std::string bad = body;
      bad[i] = static_cast<char>(bad[i] ^ flip);
      CHECK_FALSE(open_direct(t.bob_alice, bad, "bob"));
    }
  }
  CHECK_FALSE(open_direct(t.bob_alice, body.substr(0, body.size() - 1), "bob"));
  CHECK_FALSE(open_direct(t.bob_alice, body + "x", "bob"));
}

TEST_CASE("direct message limits: 600 bytes fit a body, longer texts and names throw, bad UTF-8 is refused") {
  Trio t;
  const std::string longest_name(chat::protocol::kMaxName, 'b');
  const std::string text(chat::protocol::kMaxText, 'x');
  const std::string body = seal_direct(t.alice_bob, 1, 2, longest_name, text);
  CHECK(body.size() == text.size() + kDirectOverhead);
  CHECK(body.size() <= chat::protocol::kMaxBody);
  CHECK(open_direct(t.bob_alice, body, longest_name)->text == text);
  CHECK_THROWS_AS(seal_direct(t.alice_bob, 1, 2, "bob", text + "x"), std::length_error);
  CHECK_THROWS_AS(seal_direct(t.alice_bob, 1, 2, longest_name + "b", "x"), std::length_error);

  CHECK(open_direct(t.bob_alice, seal_direct(t.alice_bob, 1, 2, "bob", "gr\xc3\xbc\xc3\x9f"), "bob"));
  CHECK(open_direct(t.bob_alice, seal_direct(t.alice_bob, 1, 2, "bob", ""), "bob")->text.empty());
  for (const char* bad : {"\xc3", "\xc0\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\x80", "\xff"}) {
    CHECK_FALSE(open_direct(t.bob_alice, seal_direct(t.alice_bob, 1, 2, "bob", bad), "bob"));
  }
  // A 601-byte text sealed by hand (kind 1, mid, sent_ms, to) is refused too.
  std::string plain(1, '\x01');
  plain += std::string(16, '\0') + "\x03" "bob" + text + "x";
  CHECK_FALSE(open_direct(t.bob_alice, t.alice_bob.seal(plain), "bob"));
  plain.back() = '\0';
  plain.pop_back();
  CHECK(open_direct(t.bob_alice, t.alice_bob.seal(plain), "bob"));
}

TEST_CASE("open_addressed_body opens a direct or a file control body once and says which") {
  Trio t;
  using Kind = OpenedBody::Kind;
  const std::string direct = seal_direct(t.alice_bob, 42, 1000, "bob", "hi bob");
  const std::string payload("\x01\x00\xff binary", 10);
  const std::string file = seal_file(t.alice_bob, 43, 2000, "bob", payload);

  const auto d = open_addressed_body(t.bob_alice, direct, "bob");
  REQUIRE(d);
  CHECK(*d == OpenedBody{Kind::direct, Opened{42, 1000, "hi bob"}});
  const auto f = open_addressed_body(t.bob_alice, file, "bob");
  REQUIRE(f);
  CHECK(*f == OpenedBody{Kind::file, Opened{43, 2000, payload}});
  // open_direct is the direct kind alone: a file control body is not a message.
  CHECK(open_direct(t.bob_alice, direct, "bob") == Opened{42, 1000, "hi bob"});
  CHECK_FALSE(open_direct(t.bob_alice, file, "bob"));

  // Sealed for someone else: another pair, another name, or reflected back to its sender.
  for (const auto* body : {&direct, &file}) {
    CHECK_FALSE(open_addressed_body(t.carol_alice, *body, "carol"));
    CHECK_FALSE(open_addressed_body(t.carol_alice, *body, "bob"));
    CHECK_FALSE(open_addressed_body(t.alice_bob, *body, "alice"));
    CHECK_FALSE(open_addressed_body(t.bob_alice, *body, "carol"));
    // Tampered: any one flipped byte, a byte cut off or added.
    for (std::size_t i = 0; i < body->size(); ++i) {
      std::string bad = *body;
      bad[i] = static_cast<char>(bad[i] ^ 0x01);
      CHECK_FALSE(open_addressed_body(t.bob_alice, bad, "bob"));
    }
    CHECK_FALSE(open_addressed_body(t.bob_alice, body->substr(0, body->size() - 1), "bob"));
    CHECK_FALSE(open_addressed_body(t.bob_alice, *body + "x", "bob"));
  }

  // The direct kind keeps its text checks (bad UTF-8 refused); a file payload is bytes. Receipts
  // and other kinds are neither.
  CHECK_FALSE(open_addressed_body(t.bob_alice, seal_direct(t.alice_bob, 1, 2, "bob", "\xff"), "bob"));
  CHECK(open_addressed_body(t.bob_alice, seal_file(t.alice_bob, 1, 2, "bob", "\xff"), "bob")->kind == Kind::file);
  CHECK_FALSE(open_addressed_body(t.bob_alice, seal_receipt(t.alice_bob, 1, "bob"), "bob"));
  std::string other(1, '\x04');
  other += std::string(16, '\0') + "\x03" "bob" "x";
  CHECK_FALSE(open_addressed_body(t.bob_alice, t.alice_bob.seal(other), "bob"));
  other[0] = '\x03';
  CHECK(open_addressed_body(t.bob_alice, t.alice_bob.seal(other), "bob"));
  CHECK_FALSE(open_addressed_body(Pair(t.bob, Key{}), file, "bob"));
}

TEST_CASE("valid_utf8 accepts well-formed text only") {
  CHECK(valid_utf8(""));
  CHECK(valid_utf8("plain ascii"));
  CHECK(valid_utf8("\xc2\x80 \xdf\xbf \xe0\xa0\x80 \xef\xbf\xbf \xf0\x90\x80\x80 \xf4\x8f\xbf\xbf"));
  CHECK_FALSE(valid_utf8("\xc1\xbf"));          // overlong 2-byte
  CHECK_FALSE(valid_utf8("\xe0\x9f\xbf"));      // overlong 3-byte
  CHECK_FALSE(valid_utf8("\xf0\x8f\xbf\xbf"));  // overlong 4-byte
  CHECK_FALSE(valid_utf8("\xed\xbf\xbf"));      // surrogate
  CHECK_FALSE(valid_utf8("\xf8\x88\x80\x80\x80"));
  CHECK_FALSE(valid_utf8("\xe2\x82"));  // truncated
  CHECK_FALSE(valid_utf8("a\xe2\x28\xa1"));
}

TEST_CASE("a receipt checks for its pair, message id and recipient only") {
  Trio t;
  // Bob received alice's message 42 and seals the receipt to alice.
  const std::string receipt = seal_receipt(t.bob_alice, 42, "alice");
  CHECK(receipt.size() <= kReceiptMaxSize);
  CHECK(check_receipt(t.alice_bob, receipt, 42, "alice"));
  CHECK_FALSE(check_receipt(t.alice_bob, receipt, 43, "alice"));
  CHECK_FALSE(check_receipt(t.alice_bob, receipt, 42, "bob"));
  CHECK_FALSE(check_receipt(t.carol_alice, receipt, 42, "alice"));
  // A receipt is not a direct message, and a direct message is not a receipt.
  CHECK_FALSE(open_direct(t.alice_bob, receipt, "alice"));
  CHECK_FALSE(check_receipt(t.alice_bob, seal_direct(t.bob_alice, 42, 0, "alice", ""), 42, "alice"));
  for (std::size_t i = 0; i < receipt.size(); ++i) {
    std::string bad = receipt;
    bad[i] = static_cast<char>(bad[i] ^ 0x01);
    CHECK_FALSE(check_receipt(t.alice_bob, bad, 42, "alice"));
  }
  CHECK_THROWS_AS(seal_receipt(t.bob_alice, 1, std::string(33, 'a')), std::length_error);
}

TEST_CASE("a channel message opens for its signer, name and id only, and any changed byte is refused") {
  Trio t;
  const std::string text = "hello all";
  const std::string body = sign_channel(t.alice, "alice", 99, 123456, text);
  CHECK(body.size() == kChannelOverhead + text.size());
  const auto m = open_channel(t.alice.public_key(), "alice", 99, body);
  REQUIRE(m);
  CHECK(*m == Opened{99, 123456, text});
  CHECK_FALSE(open_channel(t.bob.public_key(), "alice", 99, body));
  CHECK_FALSE(open_channel(t.alice.public_key(), "bob", 99, body));
  CHECK_FALSE(open_channel(t.alice.public_key(), "alice", 98, body));
  CHECK_FALSE(open_channel(Key{}, "alice", 99, body));
  for (std::size_t i = 0; i < body.size(); ++i) {
    for (const unsigned char flip : {0x01, 0x80}) {
      std::string bad = body;
      bad[i] = static_cast<char>(bad[i] ^ flip);
      CHECK_FALSE(open_channel(t.alice.public_key(), "alice", 99, bad));
    }
  }
  CHECK_FALSE(open_channel(t.alice.public_key(), "alice", 99, body.substr(0, body.size() - 1)));
  CHECK_FALSE(open_channel(t.alice.public_key(), "alice", 99, body + "x"));
  CHECK_FALSE(open_channel(t.alice.public_key(), "alice", 99, body.substr(0, kChannelOverhead - 1)));

  const std::string full(chat::protocol::kMaxText, 'y');
  CHECK(sign_channel(t.alice, "alice", 1, 1, full).size() <= chat::protocol::kMaxBody);
  CHECK(open_channel(t.alice.public_key(), "alice", 1, sign_channel(t.alice, "alice", 1, 1, full)));
  CHECK_THROWS_AS(sign_channel(t.alice, "alice", 1, 1, full + "y"), std::length_error);
  CHECK_FALSE(open_channel(t.alice.public_key(), "alice", 1, sign_channel(t.alice, "alice", 1, 1, "\xff")));
}

TEST_CASE("a registration proof is for one key, name and token") {
  Trio t;
  const std::string token(kTokenSize, 't');
  const Signature proof = register_proof(t.alice, "alice", token);
  CHECK(check_register_proof(t.alice.public_key(), "alice", token, proof));
  CHECK_FALSE(check_register_proof(t.alice.public_key(), "alicf", token, proof));
  CHECK_FALSE(check_register_proof(t.alice.public_key(), "alice", std::string(kTokenSize, 'u'), proof));
  CHECK_FALSE(check_register_proof(t.alice.public_key(), "alice", "", proof));
  CHECK_FALSE(check_register_proof(t.bob.public_key(), "alice", token, proof));
  CHECK_FALSE(check_register_proof(Key{}, "alice", token, proof));
  // Not a channel signature either: the domains differ.
  CHECK_FALSE(check_register_proof(t.alice.public_key(), "alice", token, t.alice.sign(token)));
  CHECK_THROWS_AS(register_proof(t.alice, "alice", std::string(65, 't')), std::length_error);
  CHECK_THROWS_AS(register_proof(t.alice, std::string(33, 'a'), token), std::length_error);
}

TEST_CASE("server tokens: valid for their name, key and address for 60 s, from their own minter only") {
  const TokenMinter minter;
  const Identity a = Identity::generate();
  const Identity b = Identity::generate();
  constexpr std::int64_t t0 = 1'700'000'000'000'000;
  constexpr std::uint32_t ip = 0x7f000001;
  const std::string token = minter.mint(t0, "alice", a.public_key(), ip, 4000);
  CHECK(token.size() == kTokenSize);
  CHECK(minter.check(token, t0, "alice", a.public_key(), ip, 4000) == t0);
  CHECK(minter.check(token, t0 + kTokenLifetimeUs, "alice", a.public_key(), ip, 4000) == t0);
  CHECK_FALSE(minter.check(token, t0 + 61'000'000, "alice", a.public_key(), ip, 4000));
  CHECK_FALSE(minter.check(token, t0 + kTokenLifetimeUs + 1, "alice", a.public_key(), ip, 4000));
  CHECK_FALSE(minter.check(token, t0 - 1, "alice", a.public_key(), ip, 4000));
  CHECK_FALSE(minter.check(token, t0, "alicf", a.public_key(), ip, 4000));
  CHECK_FALSE(minter.check(token, t0, "alice", b.public_key(), ip, 4000));
  CHECK_FALSE(minter.check(token, t0, "alice", a.public_key(), ip + 1, 4000));
  CHECK_FALSE(minter.check(token, t0, "alice", a.public_key(), ip, 4001));
  CHECK_FALSE(TokenMinter().check(token, t0, "alice", a.public_key(), ip, 4000));
  CHECK_FALSE(minter.check(token.substr(1), t0, "alice", a.public_key(), ip, 4000));
  CHECK_FALSE(minter.check(token + "x", t0, "alice", a.public_key(), ip, 4000));
  CHECK_FALSE(minter.check("", t0, "alice", a.public_key(), ip, 4000));
  for (std::size_t i = 0; i < token.size(); ++i) {
    std::string bad = token;
    bad[i] = static_cast<char>(bad[i] ^ 0x01);
    CHECK_FALSE(minter.check(bad, t0, "alice", a.public_key(), ip, 4000));
  }
  // Extreme times do not overflow.
  const std::string late = minter.mint(INT64_MAX, "alice", a.public_key(), ip, 4000);
  CHECK_FALSE(minter.check(late, INT64_MIN, "alice", a.public_key(), ip, 4000));
  CHECK(minter.check(late, INT64_MAX, "alice", a.public_key(), ip, 4000) == INT64_MAX);
  const std::string early = minter.mint(INT64_MIN, "alice", a.public_key(), ip, 4000);
  CHECK_FALSE(minter.check(early, INT64_MAX, "alice", a.public_key(), ip, 4000));
}

TEST_CASE("seeded token minters are deterministic, different seeds and random minters differ") {
  const Key k = Identity::from_seed(seed_of(3)).public_key();
  const TokenMinter s1(1);
  const TokenMinter s1_again(1);
  const TokenMinter s2(2);
  const std::string t = s1.mint(5, "n", k, 1, 2);
  CHECK(s1_again.mint(5, "n", k, 1, 2) == t);
  CHECK(s1_again.check(t, 5, "n", k, 1, 2) == 5);
  CHECK(s2.mint(5, "n", k, 1, 2) != t);
  CHECK_FALSE(s2.check(t, 5, "n", k, 1, 2));
  CHECK(TokenMinter().mint(5, "n", k, 1, 2) != TokenMinter().mint(5, "n", k, 1, 2));
  TokenMinter moved(1);
  TokenMinter target = std::move(moved);
  CHECK(target.check(t, 5, "n", k, 1, 2) == 5);
}

// ---- Peer state ----

namespace {

Key key_of(std::uint8_t b) {
  Key k{};
  k.fill(b);
  return k;
}

constexpr std::uint64_t kNow = 1'700'000'000'000;  // ms since the Unix epoch, late 2023

}  // namespace

TEST_CASE("pins: first sight pins, a different key waits as pending until trusted, trust clears verified") {
  PeerState s(":memory:", kNow);
  using Seen = PeerState::Seen;
  CHECK_FALSE(s.pinned("bob"));
  CHECK_FALSE(s.changed("bob"));
  CHECK_FALSE(s.verify("bob"));
  CHECK_FALSE(s.trust("bob"));

  CHECK(s.observe("bob", key_of(1)) == Seen::first);
  CHECK(s.pinned("bob") == key_of(1));
  CHECK(s.observe("bob", key_of(1)) == Seen::same);
  CHECK_FALSE(s.changed("bob"));
  CHECK_FALSE(s.trust("bob"));
  CHECK_FALSE(s.verified("bob"));
  CHECK(s.verify("bob"));
  CHECK(s.verified("bob"));

  CHECK(s.observe("bob", key_of(2)) == Seen::changed);
  CHECK(s.observe("bob", key_of(2)) == Seen::changed);  // again, until trusted
  CHECK(s.pinned("bob") == key_of(1));
  CHECK(s.pending("bob") == key_of(2));
  CHECK(s.changed("bob"));
  CHECK(s.verified("bob"));  // the mark is the pinned key's
  CHECK(s.observe("bob", key_of(1)) == Seen::same);
  CHECK(s.changed("bob"));  // what was seen still waits for the user

  CHECK(s.observe("bob", key_of(3)) == Seen::changed);
  CHECK(s.pending("bob") == key_of(3));  // the latest different key
  CHECK(s.trust("bob"));
  CHECK(s.pinned("bob") == key_of(3));
  CHECK_FALSE(s.changed("bob"));
  CHECK_FALSE(s.pending("bob"));
  CHECK_FALSE(s.verified("bob"));
  CHECK_FALSE(s.trust("bob"));
  CHECK(s.observe("bob", key_of(3)) == Seen::same);

  // Names are independent.
  CHECK(s.observe("carol", key_of(3)) == Seen::first);
  CHECK_FALSE(s.verified("carol"));
}

TEST_CASE("blocks are by key, listed by name, sorted") {
  PeerState s(":memory:", kNow);
  CHECK(s.blocked_names().empty());
  CHECK_FALSE(s.unblock("bob"));
  s.block("zed", key_of(1));
  s.block("adam", key_of(2));
  s.block("mia", key_of(3));
  CHECK(s.blocked(key_of(1)));
  CHECK(s.blocked(key_of(2)));
  CHECK_FALSE(s.blocked(key_of(4)));
  CHECK(s.blocked_names() == std::vector<std::string>{"adam", "mia", "zed"});
  s.block("zed", key_of(4));  // zed's new key too
  CHECK(s.blocked_names() == std::vector<std::string>{"adam", "mia", "zed"});
  s.block("bob", key_of(3));  // mia's identity now calls itself bob
  CHECK(s.blocked_names() == std::vector<std::string>{"adam", "bob", "zed"});
  CHECK(s.unblock("zed"));
  CHECK_FALSE(s.blocked(key_of(1)));
  CHECK_FALSE(s.blocked(key_of(4)));
  CHECK_FALSE(s.unblock("zed"));
  CHECK(s.blocked_names() == std::vector<std::string>{"adam", "bob"});
}

TEST_CASE("first_seen: once per (sender, kind, mid), within the time window") {
  PeerState s(":memory:", kNow);
  CHECK(s.first_seen(key_of(1), 1, 10, kNow, kNow));
  CHECK_FALSE(s.first_seen(key_of(1), 1, 10, kNow, kNow));
  CHECK_FALSE(s.first_seen(key_of(1), 1, 10, kNow - 5, kNow + 5));  // another time, same message
  CHECK(s.first_seen(key_of(1), 2, 10, kNow, kNow));
  CHECK(s.first_seen(key_of(1), 1, 11, kNow, kNow));
  CHECK(s.first_seen(key_of(2), 1, 10, kNow, kNow));
  CHECK(s.first_seen(key_of(2), 1, UINT64_MAX, kNow, kNow));
  CHECK_FALSE(s.first_seen(key_of(2), 1, UINT64_MAX, kNow, kNow));

  CHECK(s.first_seen(key_of(3), 1, 1, kNow - kMaxMessageAgeMs, kNow));
  CHECK_FALSE(s.first_seen(key_of(3), 1, 2, kNow - kMaxMessageAgeMs - 1, kNow));
  CHECK(s.first_seen(key_of(3), 1, 3, kNow + kMaxClockAheadMs, kNow));
  CHECK_FALSE(s.first_seen(key_of(3), 1, 4, kNow + kMaxClockAheadMs + 1, kNow));
  CHECK_FALSE(s.first_seen(key_of(3), 1, 5, UINT64_MAX, kNow));
  CHECK_FALSE(s.first_seen(key_of(3), 1, 6, 0, kNow));
  // A refused time was not recorded: the same message at a good time is still new.
  CHECK(s.first_seen(key_of(3), 1, 2, kNow, kNow));
  // A simulation's clock near 0.
  CHECK(s.first_seen(key_of(4), 1, 1, 0, 1000));
  CHECK(s.first_seen(key_of(4), 1, 2, 5000, 1000));
}

TEST_CASE("a file-backed state is private, keeps everything across reopening, and prunes old records") {
  TempDir tmp;
  const fs::path file = tmp.path() / "chatapp" / "peers" / "alice.db";
  {
    PeerState s(file, kNow);
    CHECK(s.observe("bob", key_of(1)) == PeerState::Seen::first);
    CHECK(s.observe("bob", key_of(2)) == PeerState::Seen::changed);
    CHECK(s.verify("bob"));
    s.block("eve", key_of(9));
    CHECK(s.first_seen(key_of(1), 1, 10, kNow, kNow));
    CHECK(s.first_seen(key_of(1), 1, 11, kNow - kMaxMessageAgeMs + 1000, kNow));
  }
  CHECK(mode_of(file) == 0600);
  CHECK(mode_of(file.parent_path()) == 0700);
  CHECK(mode_of(file.parent_path().parent_path()) == 0700);
  {
    PeerState s(file, kNow + 500);
    CHECK(s.pinned("bob") == key_of(1));
    CHECK(s.pending("bob") == key_of(2));
    CHECK(s.verified("bob"));
    CHECK(s.blocked(key_of(9)));
    CHECK_FALSE(s.first_seen(key_of(1), 1, 10, kNow, kNow + 500));
    CHECK_FALSE(s.first_seen(key_of(1), 1, 11, kNow - kMaxMessageAgeMs + 1000, kNow + 500));
  }
  const auto seen_rows = [&] {
    sqlite3* db = nullptr;
    REQUIRE(sqlite3_open_v2(file.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
    sqlite3_stmt* st = nullptr;
    REQUIRE(sqlite3_prepare_v2(db, "SELECT count(*) FROM seen", -1, &st, nullptr) == SQLITE_OK);
    REQUIRE(sqlite3_step(st) == SQLITE_ROW);
    const auto n = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    sqlite3_close(db);
    return n;
  };
  CHECK(seen_rows() == 2);
  { PeerState s(file, kNow + 2000); }  // the second record is now out of the window
  CHECK(seen_rows() == 1);
}

namespace {

/// Everything a PeerState answers about these names and keys, as one comparable text.
std::string answers(const PeerState& s, const std::vector<std::string>& names, const std::vector<Key>& keys) {
  std::ostringstream out;
  const auto key_text = [](const std::optional<Key>& k) { return k ? std::to_string(int((*k)[0])) : std::string("-"); };
  for (const auto& n : names) {
    out << n << " pinned " << key_text(s.pinned(n)) << " pending " << key_text(s.pending(n)) << " changed "
        << s.changed(n) << " verified " << s.verified(n) << '\n';
  }
  for (const auto& k : keys) out << "key " << int(k[0]) << " blocked " << s.blocked(k) << '\n';
  for (const auto& n : s.blocked_names()) out << "blocked name " << n << '\n';
  return out.str();
}

/// What the file itself holds in `pins` and `blocks`, read by a connection of its own.
std::string file_rows(const fs::path& file) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open_v2(file.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
  std::ostringstream out;
  for (const char* sql : {"SELECT name, hex(pinned), ifnull(hex(pending), '-'), verified FROM pins ORDER BY name",
                          "SELECT hex(blocked), name FROM blocks ORDER BY blocked"}) {
    sqlite3_stmt* st = nullptr;
    REQUIRE(sqlite3_prepare_v2(db, sql, -1, &st, nullptr) == SQLITE_OK);
    while (sqlite3_step(st) == SQLITE_ROW) {
      for (int c = 0; c < sqlite3_column_count(st); ++c) out << reinterpret_cast<const char*>(sqlite3_column_text(st, c)) << ' ';
      out << '\n';
    }
    sqlite3_finalize(st);
  }
  sqlite3_close(db);
  return out.str();
}

/// The message a PeerState on `file` fails to open with ("" if it opens).
std::string open_error_of(const fs::path& file) {
  try {
    PeerState s(file, kNow);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("pins and blocks answered from memory agree with the file after every change and after reopening") {
  TempDir tmp;
  const fs::path file = tmp.path() / "chatapp" / "peers" / "alice.db";
  const std::vector<std::string> names{"bob", "carol", "dave", "eve", "mallory"};
  const std::vector<Key> keys{key_of(1), key_of(2), key_of(3), key_of(4), key_of(5), key_of(6)};
  std::vector<std::string> after;  // the answers after each step, from the state kept open
  std::vector<std::function<void(PeerState&)>> steps{
      [](PeerState& s) { CHECK(s.observe("bob", key_of(1)) == PeerState::Seen::first); },
      [](PeerState& s) { CHECK(s.observe("carol", key_of(2)) == PeerState::Seen::first); },
      [](PeerState& s) { CHECK(s.verify("bob")); },
      [](PeerState& s) { CHECK(s.verify("bob")); },  // already verified: still true
      [](PeerState& s) { CHECK_FALSE(s.verify("dave")); },
      [](PeerState& s) { CHECK(s.observe("bob", key_of(3)) == PeerState::Seen::changed); },
      [](PeerState& s) { CHECK(s.observe("bob", key_of(3)) == PeerState::Seen::changed); },
      [](PeerState& s) { CHECK(s.observe("bob", key_of(4)) == PeerState::Seen::changed); },
      [](PeerState& s) { CHECK(s.trust("bob")); },
      [](PeerState& s) { CHECK_FALSE(s.trust("bob")); },
      [](PeerState& s) { CHECK_FALSE(s.trust("dave")); },
      [](PeerState& s) { s.block("eve", key_of(5)); },
      [](PeerState& s) { s.block("eve", key_of(6)); },
      [](PeerState& s) { s.block("mallory", key_of(5)); },  // eve's first key now calls itself mallory
      [](PeerState& s) { CHECK(s.unblock("eve")); },
      [](PeerState& s) { CHECK_FALSE(s.unblock("eve")); },
      [](PeerState& s) { s.block("carol", key_of(2)); },
  };
  {
    PeerState s(file, kNow);
    for (const auto& step : steps) {
      step(s);
      after.push_back(answers(s, names, keys));
    }
  }
  // Replayed on another file, closed and opened again after each step: what is read back from the
  // file is what memory said, step by step, and the file's rows do not change by being reopened.
  const fs::path other = tmp.path() / "replay.db";
  for (std::size_t i = 0; i < steps.size(); ++i) {
    CAPTURE(i);
    {
      PeerState s(other, kNow);
      steps[i](s);
      CHECK(answers(s, names, keys) == after[i]);
    }
    const std::string rows = file_rows(other);
    {
      PeerState reopened(other, kNow);
      CHECK(answers(reopened, names, keys) == after[i]);
    }
    CHECK(file_rows(other) == rows);
  }
  CHECK(file_rows(other) == file_rows(file));
  PeerState reopened(file, kNow);
  CHECK(answers(reopened, names, keys) == after.back());
  CHECK(answers(reopened, names, keys) ==
        "bob pinned 4 pending - changed 0 verified 0\n"
        "carol pinned 2 pending - changed 0 verified 0\n"
        "dave pinned - pending - changed 0 verified 0\n"
        "eve pinned - pending - changed 0 verified 0\n"
        "mallory pinned - pending - changed 0 verified 0\n"
        "key 1 blocked 0\nkey 2 blocked 1\nkey 3 blocked 0\nkey 4 blocked 0\nkey 5 blocked 1\nkey 6 blocked 0\n"
        "blocked name carol\nblocked name mallory\n");
}

TEST_CASE("a state file open in one PeerState is refused to a second, in this process or another, until it closes") {
  TempDir tmp;
  const fs::path file = tmp.path() / "chatapp" / "peers" / "alice.db";
  const std::string in_use =
      "peer state: " + file.string() + " is in use by another ChatApp process (this name is running already); quit it first";
  std::optional<PeerState> first(std::in_place, file, kNow);
  CHECK(first->observe("bob", key_of(1)) == PeerState::Seen::first);
  CHECK(first->first_seen(key_of(1), 1, 10, kNow, kNow));

  CHECK(open_error_of(file) == in_use);
  // Another process: the same refusal, at once (no wait for a timeout).
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(fds[0]);
    const std::string err = open_error_of(file);
    [[maybe_unused]] const auto n = ::write(fds[1], err.data(), err.size());
    ::_exit(0);
  }
  ::close(fds[1]);
  std::string got;
  char buf[512];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;) got.append(buf, static_cast<std::size_t>(n));
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  CHECK(got == in_use);

  // The refused opens changed nothing: the first goes on reading and writing.
  CHECK(first->pinned("bob") == key_of(1));
  CHECK(first->observe("carol", key_of(2)) == PeerState::Seen::first);
  CHECK_FALSE(first->first_seen(key_of(1), 1, 10, kNow, kNow));
  CHECK(first->first_seen(key_of(1), 1, 11, kNow, kNow));
  CHECK(mode_of(file.string() + ".lock") == 0600);

  // Moved, it still holds the file; gone, the file opens again with everything in it.
  PeerState moved = std::move(*first);
  first.reset();
  CHECK(open_error_of(file) == in_use);
  CHECK(moved.pinned("carol") == key_of(2));
  { PeerState gone = std::move(moved); }
  PeerState again(file, kNow);
  CHECK(again.pinned("bob") == key_of(1));
  CHECK(again.pinned("carol") == key_of(2));
  CHECK_FALSE(again.first_seen(key_of(1), 1, 11, kNow, kNow));
  // ":memory:" states share nothing and take no lock.
  PeerState m1(":memory:", kNow);
  PeerState m2(":memory:", kNow);
  CHECK(m1.observe("bob", key_of(1)) == PeerState::Seen::first);
  CHECK_FALSE(m2.pinned("bob"));
}

TEST_CASE("a file that is not a ChatApp peer state is refused with a clear error, and left as it is") {
  TempDir tmp;
  const fs::path file = tmp.path() / "x.db";
  const auto open_error = [&] {
    try {
      PeerState s(file, kNow);
    } catch (const std::runtime_error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  SUBCASE("not a database") {
    write_file(file, std::string(4096, 'z'), 0600);
    CHECK(open_error() == "peer state: " + file.string() + " is not a ChatApp peer state (not an SQLite database): move it away");
    CHECK(read_all(file) == std::string(4096, 'z'));
  }
  SUBCASE("another program's database") {
    sqlite3* db = nullptr;
    REQUIRE(sqlite3_open(file.c_str(), &db) == SQLITE_OK);
    REQUIRE(sqlite3_exec(db, "CREATE TABLE t (x)", nullptr, nullptr, nullptr) == SQLITE_OK);
    sqlite3_close(db);
    CHECK(open_error() == "peer state: " + file.string() +
                              " holds tables but no schema version: it is not a ChatApp peer state; move it away");
  }
  SUBCASE("a newer schema") {
    sqlite3* db = nullptr;
    REQUIRE(sqlite3_open(file.c_str(), &db) == SQLITE_OK);
    REQUIRE(sqlite3_exec(db, "PRAGMA user_version=7", nullptr, nullptr, nullptr) == SQLITE_OK);
    sqlite3_close(db);
    CHECK(open_error().find("has schema version 7, this build expects 1") != std::string::npos);
  }
  SUBCASE("a directory") {
    fs::create_directory(file);
    CHECK(open_error().find("peer state: cannot open " + file.string()) == 0);
  }
}
