// Writes the fuzz targets' seed corpora: encode()d v2 datagrams of every type, malformed ones
// (one per refusal reason, version-1 JSON among them), and op scripts (harness.hpp) that walk
// the server and the client through the protocol with the cast's identities: proper
// registrations (token and proof), direct messages sealed for their recipient, channel
// messages signed by their sender, stored deliveries, receipts, and the same altered or
// signed by the wrong key. libsodium's randomness is the harness's fixed sequence, so the
// seeds come out the same on every run.
//   build-fuzz/gen_corpus tests/fuzz/corpus
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "harness.hpp"
#include "identity/envelope.hpp"
#include "protocol/codec.hpp"

namespace {

namespace fs = std::filesystem;
namespace p = chat::protocol;
namespace id = chat::identity;
namespace it = chat::fuzz::item;
namespace rg = chat::fuzz::reg;
using chat::fuzz::Cast;
using chat::fuzz::Op;
using chat::fuzz::op_byte;

using Seeds = std::vector<std::pair<std::string, std::string>>;

// The cast (harness.hpp): peer index = its source in the scripts (alice at 1, bob at 2, ...).
constexpr int ME = 0, ALICE = 1, BOB = 2, CAROL = 3, DAVE = 4, ERIN = 5, FRANK = 6, GRACE = 7;

/// The cast's key for a cast name, else 32 bytes made from the name (the codec carries any).
p::Key key(const std::string& name) {
  if (int i = Cast::get().index_of(name); i >= 0) return Cast::get().key(i);
  p::Key k{};
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = static_cast<std::uint8_t>(name[i % name.size()] + i);
  return k;
}

/// `n` bytes standing for a sealed or signed body (opaque to the codec).
std::string body(std::size_t n, char c = 'b') { return std::string(n, c); }

/// The p byte of a sealed item from peer i to peer j.
constexpr std::uint8_t from_to(int i, int j, std::uint8_t more = 0) {
  return static_cast<std::uint8_t>((i & 7) | (j & 7) << 3 | more);
}

/// An item of the sealed, channel and stored ops (harness.hpp).
struct Item {
  std::uint8_t p = 0;
  std::uint8_t f = 0;
  std::uint16_t mid = 0;  // the message's mid is 1 + this
  std::string text;
  std::uint8_t k = 0;
};

// ---------------------------------------------------------------- op scripts

/// Builds one input in the op format of harness.hpp.
struct Script {
  std::string s;

  Script& flags(std::uint8_t f) {  // the client target's first byte
    s += static_cast<char>(f);
    return *this;
  }
  Script& send(int src, const p::Message& m) { return raw(src, p::encode(m)); }
  Script& raw(int src, const std::string& bytes) {
    op(Op::datagram, src);
    s += static_cast<char>(bytes.size() >> 8);
    s += static_cast<char>(bytes.size() & 0xFF);
    s += bytes;
    return *this;
  }
  Script& answer(int src) { return op(Op::answer, src); }
  Script& answer_all() { return op(Op::answer_all, 0); }
  Script& answer_with(int src, std::uint8_t sel) { return op(Op::answer_with, src).byte(sel); }
  Script& repeat(int src) { return op(Op::repeat, src); }
  Script& fail_store(int n) { return op(Op::extra, 0).byte(static_cast<std::uint8_t>(n - 1)); }  // server: n (1-4) store calls throw
  Script& line(const std::string& text) {  // client: types a line
    op(Op::extra, 0).byte(static_cast<std::uint8_t>(text.size()));
    s += text.substr(0, 255);
    return *this;
  }
  Script& eof() { return op(Op::extra, 7); }  // client: end of input
  Script& advance(std::uint8_t t) { return op(Op::advance, 0).byte(t); }  // the clock moves on by advance_by(t)
  // The cast's ops.
  Script& reg(int src, int peer, std::uint8_t f = 0) { return op(Op::reg, src).byte(static_cast<std::uint8_t>(peer)).byte(f); }
  Script& sealed(int src, const Item& i) { return op(Op::sealed, src).item(i); }
  Script& channel(int src, const Item& i) { return op(Op::channel, src).item(i); }
  Script& stored(int src, const std::vector<Item>& items, int to = ME) {  // for peer `to`
    op(Op::stored, src).byte(static_cast<std::uint8_t>(items.size() | static_cast<std::size_t>(to) << 4));
    for (const auto& i : items) item(i);
    return *this;
  }
  Script& receipt(int src, std::uint8_t pb, std::uint8_t f = 0, std::uint8_t k = 0) {
    return op(Op::receipt, src).byte(pb).byte(f).byte(k);
  }
  Script& table(int src, std::uint8_t mask, std::uint8_t imp = 0, std::uint8_t off = 0, std::uint8_t mode = 0) {
    return op(Op::table, src).byte(mask).byte(imp).byte(off).byte(mode);
  }
  Script& replay(int src, std::uint8_t n) { return op(Op::replay, src).byte(n); }

 private:
  Script& op(Op o, int src) { return byte(op_byte(o, src)); }
  Script& byte(std::uint8_t b) {
    s += static_cast<char>(b);
    return *this;
  }
  Script& item(const Item& i) {
    byte(i.p).byte(i.f).byte(static_cast<std::uint8_t>(i.mid & 0xFF)).byte(static_cast<std::uint8_t>(i.mid >> 8)).byte(i.k);
    byte(static_cast<std::uint8_t>(i.text.size() >> 8)).byte(static_cast<std::uint8_t>(i.text.size() & 0xFF));
    s += i.text;
    return *this;
  }
};

/// A first registration, as a client sends it: no token yet (the server answers with a
/// Challenge, whose token the reg op's rg::kServerToken signs).
p::Register reg(std::uint64_t rid, const std::string& name) { return p::Register{rid, name, key(name), 15'000, "", {}}; }

// ---------------------------------------------------------------- fuzz_decode

Seeds decode_seeds() {
  Seeds out;
  auto msg = [&](const std::string& name, const p::Message& m) { out.emplace_back(name, p::encode(m)); };
  auto raw = [&](const std::string& name, std::string bytes) { out.emplace_back(name, std::move(bytes)); };
  // A direct message of 600 bytes sealed for the longest name: 600 + 17 + 1 + 32 + 40 bytes.
  const std::string sealed600 = body(690, 's');
  const std::string token(40, 't');
  p::Signature proof;
  proof.fill(0x5A);

  msg("register", reg(1, "alice"));
  msg("register_token", p::Register{2, "alice", key("alice"), 15'000, token, proof});
  msg("register_token_max", p::Register{3, std::string(32, 'r'), key("r"), UINT64_MAX, std::string(p::kMaxToken, '\xFF'), proof});
  msg("dereg", p::Dereg{3, "bob.b-1_x"});
  msg("direct", p::Direct{4, "alice", body(60)});
  msg("direct_sealed_600", p::Direct{5, "alice", sealed600});
  msg("direct_max_body", p::Direct{6, std::string(32, 'd'), body(p::kMaxBody)});
  msg("direct_empty", p::Direct{7, "a", ""});
  msg("save", p::Save{8, "alice", "bob", 77, false, body(60)});
  msg("save_force", p::Save{9, "alice", "bob", 78, true, sealed600});
  msg("channel", p::Channel{10, "alice", body(64 + 8 + 11)});
  msg("relay", p::Relay{11, "bob", "alice", 12, body(64 + 8 + 7)});
  msg("probe", p::Probe{13, "bob"});
  msg("probe_max_name", p::Probe{UINT64_MAX, std::string(32, 'p')});
  msg("table_empty", p::Table{14, "bob", 5, 0, 0, false, {}});
  msg("table", p::Table{15, "bob", 5, 0, 3, false,
                        {{"alice", "127.0.0.2", 4001, true, key("alice")}, {"bob", "127.0.0.3", 4002, false, key("bob")},
                         {"c", "255.255.255.255", 65535, true, key("c")}}});
  msg("table_more", p::Table{16, "bob", 5, 3, 9, true, {{"dave", "10.1.2.3", 1024, true, key("dave")}}});
  msg("stored", p::Stored{17, "bob", {{"alice", false, 1700000000000000, 5, key("alice"), body(80)},
                               {"bob", true, 1700000001000000, 6, key("bob"), body(90)}}});
  msg("stored_sealed_600", p::Stored{18, std::string(32, 't'), {{std::string(32, 's'), false, INT64_MAX, UINT64_MAX, key("s"), sealed600}}});
  msg("stored_empty", p::Stored{19, "bob", {}});
  msg("keepalive", p::KeepAlive{20, "alice"});
  msg("lookup", p::Lookup{21, "carol"});
  msg("file_put", p::FilePut{35, "alice", "bob", 9, 700000, key("ack")});
  msg("file_commit", p::FileCommit{36, "alice", 9, body(200)});
  msg("file_get", p::FileGet{37, "bob", 9, key("ack2")});
  msg("file_done", p::FileDone{38, "bob", 9, true});
  msg("file_offer", p::FileOffer{39, "bob", "alice", 1700000000000000, 9, 700000, key("alice"), body(200)});
  msg("ack", p::Ack{22, 0, 0, 0});
  msg("ack_table", p::Ack{23, 5, 9, 0});
  msg("ack_missed", p::Ack{24, 0, 0, 2});
  msg("challenge", p::Challenge{25, token});
  msg("receipt", p::Receipt{26, body(24 + 16 + 1 + 8 + 4)});
  msg("reg_ok", p::RegOk{27, 5, 2});
  msg("reg_err", p::RegErr{28, "the name alice belongs to another identity"});
  msg("exists", p::Exists{29, "bob"});
  msg("refused", p::Refused{30, "unknown client zed"});
  msg("alive", p::Alive{31, true});
  msg("found", p::Found{32, true, {"carol", "10.0.0.7", 6003, true, key("carol")}});
  msg("found_unknown", p::Found{33, false, {"carol", "", 0, false, {}}});
  msg("found_unknown_no_name", p::Found{34, false, {}});
  msg("ids_max", p::Ack{UINT64_MAX, UINT64_MAX, UINT64_MAX, UINT64_MAX});
  // With the cast's keys, sealed and signed as the design says (the decoder sees bytes only).
  Cast& cast = Cast::get();
  const std::uint64_t sent_ms = 1'767'225'600'000;
  const std::string minted = id::TokenMinter(1).mint(3'600'000'000, "alice", cast.key(ALICE), 0x7F000002, 4001);
  msg("real_register_proven", p::Register{40, "alice", cast.key(ALICE), 15'000, minted,
                                          id::register_proof(cast.id(ALICE), "alice", minted)});
  msg("real_challenge", p::Challenge{41, minted});
  const std::string direct = id::seal_direct(cast.pair(ALICE, false, cast.key(ME)), 42, sent_ms, "me", "hello");
  msg("real_direct", p::Direct{42, "alice", direct});
  msg("real_save", p::Save{43, "alice", "me", 42, false, direct});
  msg("real_receipt", p::Receipt{42, id::seal_receipt(cast.pair(ME, false, cast.key(ALICE)), 42, "alice")});
  const std::string channel = id::sign_channel(cast.id(CAROL), "carol", 44, sent_ms, "hello all");
  msg("real_channel", p::Channel{44, "carol", channel});
  msg("real_relay", p::Relay{45, "me", "carol", 44, channel});
  msg("real_stored", p::Stored{46, "me", {{"alice", false, 1'767'225'600'000'000, 42, cast.key(ALICE), direct},
                                    {"carol", true, 1'767'225'601'000'000, 44, cast.key(CAROL), channel}}});
  msg("real_table", p::Table{47, "me", 7, 0, 3, false,
                             {chat::fuzz::entry_of(ME, false, true), chat::fuzz::entry_of(ALICE, false, true),
                              chat::fuzz::entry_of(CAROL, true, false)}});

  // Refused ones, one per reason at least.
  const std::string probe = p::encode(p::Probe{1, "me"});
  const std::string save = p::encode(p::Save{1, "a", "b", 1, false, "x"});
  auto patched = [](std::string b, std::size_t at, char c) {
    b[at] = c;
    return b;
  };
  raw("bad_empty", "");
  raw("bad_too_large", probe + std::string(p::kMaxDatagram, '\0'));
  raw("bad_v1_register", R"({"v":1,"t":"register","id":7,"name":"alice","pad":"    "})");
  raw("bad_v1_save", R"({"v":1,"t":"save","id":8,"from":"a","to":"b","mid":1,"force":false,"text":"x"})");
  raw("bad_v1_reply", R"({"v":1,"t":"ack","re":7})");
  raw("bad_version_1", patched(probe, 0, 1));
  raw("bad_version_3", patched(probe, 0, 3));
  raw("bad_unknown_type", patched(probe, 1, 12));
  raw("bad_unknown_type_63", patched(probe, 1, 63));
  raw("bad_truncated_header", probe.substr(0, 6));
  raw("bad_truncated", save.substr(0, save.size() - 1));
  raw("bad_trailing", probe + "x");
  raw("bad_id_zero", p::encode(p::Probe{0, "me"}));
  raw("bad_probe_no_recipient", probe.substr(0, 10));
  raw("bad_probe_empty_recipient", probe.substr(0, 10) + '\0');
  raw("bad_relay_recipient", p::encode(p::Relay{1, "../me", "alice", 1, "x"}));
  raw("bad_bool", patched(save, 10 + 2 + 2 + 8, 2));
  raw("bad_name_dotdot", p::encode(p::Dereg{1, "../x"}));
  raw("bad_name_empty", p::encode(p::Dereg{1, ""}));
  raw("bad_name_long", p::encode(p::Dereg{1, std::string(33, 'n')}));
  raw("bad_name_nul", p::encode(p::Dereg{1, std::string("a\0b", 3)}));
  raw("bad_body_too_long", p::encode(p::Direct{1, "a", body(p::kMaxBody + 1)}));
  raw("bad_token_too_long", p::encode(p::Challenge{1, std::string(p::kMaxToken + 1, 't')}));
  raw("bad_reason_utf8", std::string(p::encode(p::RegErr{1, "ab"})).replace(12, 1, "\xFF"));
  raw("bad_entry_port_0", p::encode(p::Table{1, "me", 1, 0, 1, false, {{"a", "1.2.3.4", 0, true, {}}}}));
  raw("bad_table_to_before_from", p::encode(p::Table{1, "me", 1, 5, 1, false, {}}));
  raw("bad_stored_ts", p::encode(p::Stored{1, "me", {{"a", false, -1, 1, {}, "x"}}}));
  raw("bad_found_unknown_with_row", patched(p::encode(p::Found{1, false, {"a", "", 0, false, {}}}), 13, 1));
  return out;
}

// ---------------------------------------------------------------- fuzz_server

/// A Save from peer i to peer j of `text`, sealed for j (mid 1 + m).
Item save(int i, int j, std::uint16_t m, const std::string& text, bool force = false, std::uint8_t f = 0) {
  return Item{from_to(i, j, static_cast<std::uint8_t>(it::kSave | (force ? it::kForce : 0))), f, m, text};
}
/// A Channel from peer i (mid 1 + m), signed.
Item chan(int i, std::uint16_t m, const std::string& text, std::uint8_t f = 0) {
  return Item{static_cast<std::uint8_t>(i), f, m, text};
}

// Fake clients: peer i at source i (alice at 1, bob at 2, carol at 3, dave at 4; harness.hpp).
Seeds server_seeds() {
  Seeds out;
  auto add = [&](const std::string& name, const Script& s) { out.emplace_back(name, s.s); };
  auto three = [] {
    Script s;
    s.reg(1, ALICE).reg(2, BOB).reg(3, CAROL);
    s.answer_all().answer_all().answer_all();
    return s;
  };
  auto two = [] {
    Script s;
    s.reg(1, ALICE).reg(2, BOB).answer_all().answer_all();
    return s;
  };
  const std::string text600(600, 'y');  // the longest text, sealed for bob

  add("register_one", Script{}.reg(1, ALICE).answer(1));
  add("register_three", three());
  add("register_challenge", Script{}.send(1, reg(101, "alice")).reg(1, ALICE, rg::kServerToken).answer_all());
  add("register_challenge_other_key",
      Script{}.send(1, reg(101, "alice")).reg(1, ALICE | 8, rg::kServerToken).reg(1, ALICE, rg::kServerToken));
  add("register_bad_proofs", Script{}
                                 .reg(1, ALICE, rg::kStale).reg(1, ALICE, rg::kOtherAddress)
                                 .reg(1, ALICE, rg::kBadProof).reg(1, ALICE, rg::kOtherName)
                                 .reg(1, ALICE, rg::kNoToken | rg::kNoInterval).reg(1, ALICE).answer_all());
  add("register_other_key", Script{}.reg(1, ALICE).answer_all().reg(3, ALICE | 8).reg(1, ALICE | 8).answer_all());
  // Past the dedup window (30 s), within the token's lifetime (60 s): a replay; past it: stale.
  add("register_replayed", Script{}
                               .reg(1, ALICE).answer_all().advance(195).replay(1, 0).replay(2, 0)
                               .advance(250).replay(1, 0).answer_all());
  add("register_again_same_address", Script{}.reg(1, ALICE).answer(1).reg(1, ALICE).answer_all());
  add("register_ipv6", Script{}.reg(7, ALICE).sealed(7, save(ALICE, BOB, 1, "x")));
  add("register_full", Script{}
                           .reg(0, ME).reg(1, ALICE).reg(2, BOB).reg(3, CAROL)
                           .reg(4, DAVE).reg(5, ERIN).reg(6, FRANK).reg(6, GRACE).answer_all().answer_all());
  add("name_conflict_alive", Script{}.reg(1, ALICE).answer(1).reg(3, ALICE).answer(1));
  add("name_conflict_refused_reply", Script{}.reg(1, ALICE).answer(1).reg(3, ALICE).answer_with(1, 4).answer_all());
  add("name_conflict_silent", Script{}.reg(1, ALICE).answer_all().reg(3, ALICE).advance(127).answer_all());
  add("dereg", two().send(2, p::Dereg{201, "bob"}).answer_all().reg(2, BOB).answer_all());
  add("dereg_wrong_address", two().send(3, p::Dereg{201, "bob"}).send(2, p::Dereg{202, "zed"}));
  add("duplicates", Script{}.reg(1, ALICE).repeat(1).repeat(1).answer(1).repeat(1).repeat(1));
  add("save_offline_then_deliver", two()
                                       .send(2, p::Dereg{201, "bob"}).answer_all()
                                       .sealed(1, save(ALICE, BOB, 9, "while you were out"))
                                       .sealed(1, save(ALICE, BOB, 10, "second"))
                                       .answer_all()
                                       .reg(2, BOB).answer_all().answer_all().answer_all());
  add("save_replayed", two()
                           .send(2, p::Dereg{201, "bob"}).answer_all()
                           .sealed(1, save(ALICE, BOB, 9, "once")).answer_all()
                           .replay(1, 4).advance(250).replay(1, 4).sealed(1, save(ALICE, BOB, 9, "once again"))
                           .answer_all().reg(2, BOB).answer_all().answer_all());
  add("save_probe_exists", two().sealed(1, save(ALICE, BOB, 9, "hi")).answer(2).answer_all());
  add("save_force", two().sealed(1, save(ALICE, BOB, 9, "forced", true)).answer_all());
  add("save_forged_bodies", two()
                                .send(2, p::Dereg{201, "bob"}).answer_all()
                                .sealed(1, save(ALICE, BOB, 1, "flipped", true, it::kFlip))
                                .sealed(1, save(ALICE, BOB, 2, "impostor", true, it::kImpostor))
                                .sealed(1, save(ALICE, BOB, 3, "old", true, 2 << it::kClockShift))
                                .answer_all().reg(2, BOB).answer_all().answer_all());
  add("save_spoofed", two().sealed(3, save(ALICE, BOB, 9, "spoof"))
                          .send(1, p::Save{302, "alice", "zed", 9, false, "unknown"}));
  add("save_mailbox_full", [&] {
    Script s = two();
    s.send(2, p::Dereg{201, "bob"}).answer_all();
    for (int i = 0; i < 5; ++i) s.sealed(1, save(ALICE, BOB, static_cast<std::uint16_t>(301 + i), "m"));
    return s.answer_all();
  }());
  add("delivery_in_two_datagrams", [&] {
    Script s = two();
    s.send(2, p::Dereg{201, "bob"}).answer_all();
    for (int i = 0; i < 4; ++i) s.sealed(1, save(ALICE, BOB, static_cast<std::uint16_t>(301 + i), text600));
    s.reg(2, BOB);
    for (int i = 0; i < 5; ++i) s.answer_all();
    return s;
  }());
  add("channel", three()
                     .send(3, p::Dereg{201, "carol"}).answer_all()
                     .channel(1, chan(ALICE, 301, "hello channel")).answer(2).answer_all()
                     .reg(3, CAROL).answer_all().answer_all().answer_all());
  add("channel_forged", three()
                            .channel(1, chan(ALICE, 301, "impostor", it::kImpostor))
                            .channel(1, chan(ALICE, 302, "flipped", it::kFlip))
                            .channel(2, chan(ALICE, 303, "not from here"))
                            .advance(127).advance(200).answer_all());
  add("channel_unregistered", Script{}.channel(1, chan(ALICE, 301, "who am i")));
  add("table_ack_wrong_epoch", Script{}.reg(1, ALICE).answer_with(1, 2).answer(1).reg(2, BOB).answer_all().answer_all());
  add("table_ack_too_high", Script{}.reg(1, ALICE).answer_with(1, 3).reg(2, BOB).answer_all().answer_all());
  add("reply_from_wrong_address", Script{}.reg(1, ALICE).answer_with(1, chat::fuzz::kFromWrongAddress).answer_all());
  add("store_fault_save", two().send(2, p::Dereg{201, "bob"}).answer_all().fail_store(1)
                              .sealed(1, save(ALICE, BOB, 9, "x")).answer_all());
  add("store_fault_register", Script{}.fail_store(2).reg(1, ALICE).reg(1, ALICE).answer_all());
  add("store_fault_delivery", two()
                                  .send(2, p::Dereg{201, "bob"}).answer_all()
                                  .sealed(1, save(ALICE, BOB, 9, "x")).answer_all()
                                  .fail_store(1).reg(2, BOB).answer_all().reg(2, BOB).answer_all().answer_all());
  add("garbage", Script{}
                     .raw(1, "hello")
                     .raw(2, R"({"t":"register","id":0,"name":"x","v":1})")
                     .raw(2, std::string(R"({"v":1,"t":"register","id":5,"name":"old","pad":")").append(1150, ' ').append("\"}"))
                     .raw(3, std::string(1500, '{'))
                     .raw(4, "\xFF\xFE")
                     .raw(5, p::encode(p::Ack{12345}))
                     .raw(6, p::encode(p::Probe{5, "alice"}))
                     .raw(0, p::encode(p::Table{1, "alice", 1, 0, 1, false, {{"x", "1.2.3.4", 5, true}}})));
  // Time: sessions expire without keep-alives; stalled updates resume on the next one.
  add("keepalive_expiry", three().send(1, p::KeepAlive{150, "alice"}).advance(250).advance(250).advance(250));
  add("table_update_lost", three().advance(200).advance(200).send(2, p::KeepAlive{151, "bob"}).answer_all());
  add("keepalive_unknown", Script{}.send(1, p::KeepAlive{152, "nobody"}).send(1, p::Lookup{153, "nobody"}));
  add("token_expires", Script{}.send(1, reg(101, "alice")).advance(250).reg(1, ALICE, rg::kServerToken).reg(1, ALICE));
  add("probe_timeout", two().sealed(1, save(ALICE, BOB, 1, "x")).advance(127).answer_all());
  add("relay_miss", three().channel(1, chan(ALICE, 170, "hi")).advance(127).advance(200).answer_all());
  add("lookup", three().send(1, p::Lookup{180, "bob"}).send(4, p::Lookup{181, "alice"}));
  // Kept files: an upload accepted, its commit (incomplete: refused), a download of nothing, a done.
  add("file_requests", three()
                           .send(1, p::FilePut{190, "alice", "bob", 9, 3000, key("ack")})
                           .send(1, p::FileCommit{191, "alice", 9, body(200)})
                           .send(2, p::FileGet{192, "bob", 9, key("ack2")})
                           .send(2, p::FileDone{193, "bob", 9, false})
                           .send(3, p::FilePut{194, "carol", "nobody", 10, 1, key("ack")}));
  return out;
}

// ---------------------------------------------------------------- fuzz_client

// The client "me"; its server is source 0; the table op gives it the cast's rows (alice at
// source 1, bob at 2, carol at 3, ... with their keys), bob offline.
constexpr std::uint8_t kAll = 0x7F;        // me and peers 1-6 (grace, 7, has no row)
constexpr std::uint8_t kBobOff = 1 << BOB;

/// A Direct from peer i to me (mid 1 + m), sealed for me.
Item dm(int i, std::uint16_t m, const std::string& text, std::uint8_t f = 0, std::uint8_t k = 0) {
  return Item{from_to(i, ME), f, m, text, k};
}
/// A Relay of peer i's channel message (mid 1 + m), signed, for me.
Item relay(int i, std::uint16_t m, const std::string& text, std::uint8_t f = 0, std::uint8_t k = 0) {
  return Item{static_cast<std::uint8_t>(i | it::kRelay), f, m, text, k};
}
/// The same relayed for peer `to` instead (the relay's recipient is the item's j).
Item relay_for(int to, int i, std::uint16_t m, const std::string& text) {
  return Item{from_to(i, to, it::kRelay), 0, m, text};
}
/// A saved item: a direct from peer i to me, or a channel message of peer i.
Item saved(int i, std::uint16_t m, const std::string& text, bool channel = false, std::uint8_t f = 0) {
  return Item{from_to(i, ME, channel ? it::kChannelItem : 0), f, m, text};
}

p::Table table1() {
  return p::Table{100, "me", 7, 0, 4, false,
                  {chat::fuzz::entry_of(ME, false, true), chat::fuzz::entry_of(ALICE, false, true),
                   chat::fuzz::entry_of(BOB, false, false), chat::fuzz::entry_of(CAROL, false, true)}};
}

Seeds client_seeds() {
  Seeds out;
  auto add = [&](const std::string& name, const Script& s) { out.emplace_back(name, s.s); };
  auto online = [] { return std::move(Script{}.flags(0).table(0, kAll, 0, kBobOff)); };

  add("welcome", Script{}.flags(0));
  add("welcome_pending", Script{}.flags(2).table(0, kAll));
  add("welcome_without_challenge", Script{}.flags(4).table(0, kAll));
  add("registering_then_refused", Script{}.flags(1).send(0, table1()).answer_with(0, 5));
  add("challenge_then_refused", Script{}.flags(1).answer(0).answer_with(0, 5));
  add("registering_then_other_reply", Script{}.flags(1).answer_with(0, 4).answer_with(0, 0));
  add("table", online());
  add("table_raw", Script{}.flags(0).send(0, table1()));
  add("table_in_parts", Script{}.flags(0)
                            .table(0, 0x03, 0, 0, 2).table(0, 0x0C, 0, kBobOff, 1)
                            .send(0, p::Table{103, "me", 7, 9, 10, false, {}})
                            .table(0, 0x7F).table(0, 0x01, 0, 0, 1));
  add("table_not_from_server", Script{}.flags(0).table(1, kAll));
  add("direct_sealed", online()
                           .sealed(1, dm(ALICE, 199, "hello")).repeat(1)
                           .sealed(3, dm(CAROL, 200, "hi \x1b[2J there\n"))
                           .sealed(2, dm(ALICE, 201, "from bob's address"))
                           .send(1, p::Direct{202, "zed", "unknown"})
                           .sealed(7, dm(ALICE, 203, "v6")));
  add("direct_forged", online()
                           .sealed(1, dm(ALICE, 300, "flipped", it::kFlip, 7))
                           .sealed(1, dm(ALICE, 301, "flipped nonce", it::kFlip, 0))
                           .sealed(1, dm(ALICE, 302, "impostor", it::kImpostor))
                           .sealed(1, dm(ALICE, 303, "other mid", it::kOtherMid))
                           .sealed(1, dm(ALICE, 304, "reflected", it::kWrongName))
                           .sealed(1, Item{from_to(ALICE, BOB), 0, 305, "sealed for bob"})
                           .sealed(1, Item{from_to(ME, ALICE), it::kOtherFrom, 306, "my own, reflected"})
                           .sealed(1, dm(BOB, 307, "bob's seal from alice", it::kOtherFrom))
                           .sealed(1, dm(ALICE, 308, "too old", 2 << it::kClockShift))
                           .sealed(1, dm(ALICE, 309, "from the future", 3 << it::kClockShift))
                           .sealed(1, dm(ALICE, 310, "an hour ago", 1 << it::kClockShift)));
  add("direct_replayed", online()
                             .sealed(1, dm(ALICE, 400, "once"))
                             .advance(250).advance(250)
                             .replay(1, 3).sealed(1, dm(ALICE, 400, "same mid, new seal")).replay(2, 3));
  add("relay_signed", online()
                          .channel(0, relay(ALICE, 9, "hi all")).repeat(0)
                          .channel(0, relay(CAROL, 10, "\x07 bell"))
                          .channel(0, relay(ALICE, 11, "impostor", it::kImpostor))
                          .channel(0, relay(ALICE, 12, "flipped", it::kFlip, 3))
                          .channel(0, relay(ALICE, 13, "other mid", it::kOtherMid))
                          .channel(0, relay(ALICE, 14, "other name", it::kWrongName))
                          .channel(0, relay(ALICE, 15, "too old", 2 << it::kClockShift))
                          .advance(250).advance(250).replay(0, 3)
                          .channel(1, relay(ALICE, 16, "not from server"))
                          .send(0, p::Probe{301, "me"}).send(1, p::Probe{302, "me"}));
  // The server's requests for another client (one that had this address before): unanswered.
  add("not_for_me", online()
                        .send(0, p::Probe{303, "alice"})
                        .channel(0, relay_for(ALICE, CAROL, 17, "for alice"))
                        .stored(0, {saved(ALICE, 18, "alice's saved message")}, BOB)
                        .table(0, kAll, 0, 0, 0x10)
                        .send(0, p::Probe{304, "me"})
                        .channel(0, relay(CAROL, 19, "for me")));
  add("stored", Script{}.flags(2)
                    .stored(0, {saved(ALICE, 5, "while you were out"), saved(CAROL, 6, "channel \x1b[2J", true)})
                    .table(0, kAll)
                    .stored(0, {saved(ALICE, 5, "again"), saved(ALICE, 7, "flipped", false, it::kFlip),
                                saved(CAROL, 8, "forged", true, it::kImpostor),
                                Item{GRACE, it::kImpostor | it::kImpostorKey, 9, "a name first seen here"}})
                    .stored(1, {}));
  add("stored_then_live", online()
                              .stored(0, {saved(ALICE, 77, "saved first"), saved(ALICE, 78, "and a channel", true)})
                              .sealed(1, dm(ALICE, 77, "then live"))
                              .channel(0, relay(ALICE, 78, "relayed too")));
  add("live_then_stored", online()
                              .sealed(1, dm(ALICE, 77, "live first"))
                              .stored(0, {saved(ALICE, 77, "saved copy"), saved(ALICE, 77, "saved copy"),
                                          saved(ME, 79, "from myself"), Item{from_to(ALICE, ME, it::kZeroKey), 0, 80, "no key"}}));
  add("send_direct", online().line("send alice hello there").answer(1));
  add("send_receipts_forged", online()
                                  .line("send alice one").receipt(1, ALICE, it::kFlip, 5)
                                  .line("send alice two").receipt(1, ALICE, it::kImpostor)
                                  .line("send alice three").receipt(1, ALICE, it::kOtherMid)
                                  .line("send alice four").receipt(1, ALICE, it::kWrongName)
                                  .line("send alice five").receipt(1, CAROL)
                                  .line("send alice six").receipt(1, from_to(ALICE, CAROL))
                                  .line("send alice seven").receipt(1, ALICE)
                                  .answer_all());
  add("send_offline", online().line("send bob hi").answer(0));
  add("send_exists", online().line("send bob hi").answer_with(0, 7).answer(2));
  add("send_refused", online().line("send bob hi").answer_with(0, 4));
  add("send_all", online().line("send_all hello").answer(0).line("send_all x").answer_with(0, 4));
  add("key_change", online()
                        .table(0, 1 << ALICE, 1 << ALICE, 0, 1)
                        .sealed(1, dm(ALICE, 500, "impostor before trust", it::kImpostor))
                        .sealed(1, dm(ALICE, 501, "alice before trust"))
                        .line("send alice hi")
                        .line("fingerprint alice").line("trust alice").line("trust alice")
                        .sealed(1, dm(ALICE, 502, "impostor after trust", it::kImpostor))
                        .sealed(1, dm(ALICE, 503, "alice after trust"))
                        .line("send alice hi").answer(1));
  add("block", online()
                   .line("block alice").sealed(1, dm(ALICE, 600, "blocked"))
                   .channel(0, relay(ALICE, 601, "blocked too")).line("blocked").line("send alice x")
                   .line("unblock alice").sealed(1, dm(ALICE, 602, "unblocked")).line("blocked"));
  add("identity_commands", online()
                               .line("fingerprint").line("fingerprint carol").line("verify carol")
                               .line("fingerprint carol").line("verify zed").line("trust zed").line("block zed"));
  add("lookup_then_send", Script{}.flags(0).table(0, 0x03).line("send erin hi").answer(0).answer(5));
  add("dereg_reg", online()
                       .line("dereg me").answer(0)
                       .line("send alice x")
                       .line("reg me").answer(0).answer(0)
                       .table(0, 0x01));
  add("dereg_refused", online().line("dereg me").answer_with(0, 4));
  add("commands", online()
                      .line("list").line("help").line("send").line("send nobody x").line("dereg bob")
                      .line("reg me").line("frobnicate").line("").line("   ").line("sned alice x")
                      .line("send_all " + std::string(240, '\x01')));
  add("quit", online().line("quit").sealed(1, dm(ALICE, 700, "after")));
  add("eof", online().eof().sealed(1, dm(ALICE, 700, "after")));
  add("self_offline", online()
                          .table(0, 0x01, 0, 0x01, 1)
                          .answer(0).answer(0)
                          .table(0, 0x01, 0, 0, 1));
  add("reply_from_wrong_address", online().line("send alice hi").answer_with(1, chat::fuzz::kFromWrongAddress));
  add("garbage", online()
                     .raw(0, "hello")
                     .raw(1, std::string(1473, ' '))
                     .raw(7, "{}")
                     .raw(2, p::encode(p::Ack{1}))
                     .raw(0, p::encode(p::RegOk{1, 1, 1})));
  // Time: retries run out, keep-alives go unanswered or say the server lost track.
  add("no_ack_fallback", online().line("send alice x").advance(160).answer(0));
  add("keepalive_unanswered", online().advance(160).advance(160).advance(160).advance(160).answer_all());
  add("keepalive_lost_track", online().advance(160).answer_with(0, 7).answer(0).answer(0).table(0, kAll));
  add("lookup_unknown_name", online().line("send zed hi").answer(0).answer(3).line("send nobody x").answer_with(0, 4));
  add("eof_in_flight", online().line("send alice x").line("send_all y").eof().advance(160).answer_all().advance(160));
  add("reg_while_online", online().line("reg me").answer(0).line("reg me").answer_with(0, 6));
  return out;
}

void write(const fs::path& root, const std::string& target, const Seeds& seeds) {
  fs::path dir = root / target;
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const auto& [name, bytes] : seeds) {
    std::ofstream f(dir / name, std::ios::binary);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  std::printf("%s: %zu seeds\n", dir.c_str(), seeds.size());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: gen_corpus <corpus-dir>   (writes <dir>/fuzz_decode, fuzz_server, fuzz_client)\n");
    return 2;
  }
  fs::path root = argv[1];
  chat::fuzz::use_fixed_randomness();
  chat::fuzz::reset_randomness();
  write(root, "fuzz_decode", decode_seeds());
  write(root, "fuzz_server", server_seeds());
  write(root, "fuzz_client", client_seeds());
  return 0;
}
