// Writes the fuzz targets' seed corpora: encode()d v2 datagrams of every type, malformed ones
// (one per refusal reason, version-1 JSON among them), and op scripts (harness.hpp) that walk
// the server and the client through the protocol.
// TODO(v2): the scripts' bodies are plain bytes, not sealed or signed (identity/envelope), and
// their registrations stop at the first Register (no Challenge, token and proof); both follow
// once the server and the client implement them.
//   build-fuzz/gen_corpus tests/fuzz/corpus
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "harness.hpp"
#include "protocol/codec.hpp"

namespace {

namespace fs = std::filesystem;
namespace p = chat::protocol;
using chat::fuzz::Op;
using chat::fuzz::op_byte;

using Seeds = std::vector<std::pair<std::string, std::string>>;

/// A key per name (not a real Ed25519 key: the codec carries any 32 bytes).
p::Key key(const std::string& name) {
  p::Key k{};
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = static_cast<std::uint8_t>(name[i % name.size()] + i);
  return k;
}

/// `n` bytes standing for a sealed or signed body (opaque to the codec).
std::string body(std::size_t n, char c = 'b') { return std::string(n, c); }

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
    s += static_cast<char>(op_byte(Op::datagram, src));
    s += static_cast<char>(bytes.size() >> 8);
    s += static_cast<char>(bytes.size() & 0xFF);
    s += bytes;
    return *this;
  }
  Script& answer(int src) { return op(Op::answer, src); }
  Script& answer_all() { return op(Op::answer_all, 0); }
  Script& answer_with(int src, std::uint8_t sel) {
    op(Op::answer_with, src);
    s += static_cast<char>(sel);
    return *this;
  }
  Script& repeat(int src) { return op(Op::repeat, src); }
  Script& fail_store(int n) {  // server: the next n (1-4) store calls throw
    op(Op::extra, 0);
    s += static_cast<char>(n - 1);
    return *this;
  }
  Script& line(const std::string& text) {  // client: types a line
    op(Op::extra, 0);
    s += static_cast<char>(text.size());
    s += text.substr(0, 255);
    return *this;
  }
  Script& eof() { return op(Op::extra, 7); }  // client: end of input
  Script& advance(std::uint8_t t) {  // the fake clock moves on by advance_by(t)
    op(Op::advance, 0);
    s += static_cast<char>(t);
    return *this;
  }

 private:
  Script& op(Op o, int src) {
    s += static_cast<char>(op_byte(o, src));
    return *this;
  }
};

/// A first registration, as a client sends it: no token yet (the server answers with a
/// Challenge). TODO(v2): the second Register, with the Challenge's token and the proof, once
/// the server and the client implement it (the harness echoes no token yet).
p::Register reg(std::uint64_t id, const std::string& name) { return p::Register{id, name, key(name), 15'000, "", {}}; }

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
  msg("relay", p::Relay{11, "alice", 12, body(64 + 8 + 7)});
  msg("probe", p::Probe{13});
  msg("table_empty", p::Table{14, 5, 0, 0, false, {}});
  msg("table", p::Table{15, 5, 0, 3, false,
                        {{"alice", "127.0.0.2", 4001, true, key("alice")}, {"bob", "127.0.0.3", 4002, false, key("bob")},
                         {"c", "255.255.255.255", 65535, true, key("c")}}});
  msg("table_more", p::Table{16, 5, 3, 9, true, {{"dave", "10.1.2.3", 1024, true, key("dave")}}});
  msg("stored", p::Stored{17, {{"alice", false, 1700000000000000, 5, key("alice"), body(80)},
                               {"bob", true, 1700000001000000, 6, key("bob"), body(90)}}});
  msg("stored_sealed_600", p::Stored{18, {{std::string(32, 's'), false, INT64_MAX, UINT64_MAX, key("s"), sealed600}}});
  msg("stored_empty", p::Stored{19, {}});
  msg("keepalive", p::KeepAlive{20, "alice"});
  msg("lookup", p::Lookup{21, "carol"});
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

  // Refused ones, one per reason at least.
  const std::string probe = p::encode(p::Probe{1});
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
  raw("bad_id_zero", p::encode(p::Probe{0}));
  raw("bad_bool", patched(save, 10 + 2 + 2 + 8, 2));
  raw("bad_name_dotdot", p::encode(p::Dereg{1, "../x"}));
  raw("bad_name_empty", p::encode(p::Dereg{1, ""}));
  raw("bad_name_long", p::encode(p::Dereg{1, std::string(33, 'n')}));
  raw("bad_name_nul", p::encode(p::Dereg{1, std::string("a\0b", 3)}));
  raw("bad_body_too_long", p::encode(p::Direct{1, "a", body(p::kMaxBody + 1)}));
  raw("bad_token_too_long", p::encode(p::Challenge{1, std::string(p::kMaxToken + 1, 't')}));
  raw("bad_reason_utf8", std::string(p::encode(p::RegErr{1, "ab"})).replace(12, 1, "\xFF"));
  raw("bad_entry_port_0", p::encode(p::Table{1, 1, 0, 1, false, {{"a", "1.2.3.4", 0, true, {}}}}));
  raw("bad_table_to_before_from", p::encode(p::Table{1, 1, 5, 1, false, {}}));
  raw("bad_stored_ts", p::encode(p::Stored{1, {{"a", false, -1, 1, {}, "x"}}}));
  raw("bad_found_unknown_with_row", patched(p::encode(p::Found{1, false, {"a", "", 0, false, {}}}), 13, 1));
  return out;
}

// ---------------------------------------------------------------- fuzz_server

// Fake clients: alice at source 1, bob at 2, carol at 3, dave at 4 (harness.hpp).
Seeds server_seeds() {
  Seeds out;
  auto add = [&](const std::string& name, const Script& s) { out.emplace_back(name, s.s); };
  auto three = [] {
    Script s;
    s.send(1, reg(101, "alice")).send(2, reg(102, "bob")).send(3, reg(103, "carol"));
    s.answer_all().answer_all().answer_all();
    return s;
  };
  auto two = [] {
    Script s;
    s.send(1, reg(101, "alice")).send(2, reg(102, "bob")).answer_all().answer_all();
    return s;
  };
  const std::string text600 = body(690, 'y');  // 600 bytes of text, sealed for bob

  add("register_one", Script{}.send(1, reg(101, "alice")).answer(1));
  add("register_three", three());
  add("register_again_same_address", Script{}.send(1, reg(101, "alice")).answer(1).send(1, reg(111, "alice")).answer_all());
  add("register_ipv6", Script{}.send(7, reg(101, "alice")).send(7, p::Save{102, "alice", "bob", 1, false, "x"}));
  add("register_full", Script{}
                           .send(1, reg(101, "a1")).send(1, reg(102, "a2")).send(2, reg(103, "a3"))
                           .send(2, reg(104, "a4")).send(3, reg(105, "a5")).send(3, reg(106, "a6"))
                           .send(4, reg(107, "a7")).answer_all().answer_all());
  add("name_conflict_alive", Script{}.send(1, reg(101, "alice")).answer(1).send(3, reg(102, "alice")).answer(1));
  add("name_conflict_refused_reply",
      Script{}.send(1, reg(101, "alice")).answer(1).send(3, reg(102, "alice")).answer_with(1, 4).answer_all());
  add("dereg", two().send(2, p::Dereg{201, "bob"}).answer_all().send(2, reg(202, "bob")).answer_all());
  add("dereg_wrong_address", two().send(3, p::Dereg{201, "bob"}).send(2, p::Dereg{202, "zed"}));
  add("duplicates", Script{}.send(1, reg(101, "alice")).repeat(1).repeat(1).answer(1).repeat(1).repeat(1));
  add("save_offline_then_deliver", two()
                                       .send(2, p::Dereg{201, "bob"}).answer_all()
                                       .send(1, p::Save{301, "alice", "bob", 9, false, "while you were out"})
                                       .send(1, p::Save{302, "alice", "bob", 10, false, "second"})
                                       .answer_all()
                                       .send(2, reg(401, "bob")).answer_all().answer_all().answer_all());
  add("save_probe_exists", two().send(1, p::Save{301, "alice", "bob", 9, false, "hi"}).answer(2).answer_all());
  add("save_force", two().send(1, p::Save{301, "alice", "bob", 9, true, "forced"}).answer_all());
  add("save_spoofed", two().send(3, p::Save{301, "alice", "bob", 9, false, "spoof"})
                          .send(1, p::Save{302, "alice", "zed", 9, false, "unknown"}));
  add("save_mailbox_full", [&] {
    Script s = two();
    s.send(2, p::Dereg{201, "bob"}).answer_all();
    for (int i = 0; i < 5; ++i) s.send(1, p::Save{static_cast<std::uint64_t>(301 + i), "alice", "bob", 9, false, "m"});
    return s.answer_all();
  }());
  add("delivery_in_two_datagrams", [&] {
    Script s = two();
    s.send(2, p::Dereg{201, "bob"}).answer_all();
    for (int i = 0; i < 4; ++i) s.send(1, p::Save{static_cast<std::uint64_t>(301 + i), "alice", "bob", 9, false, text600});
    s.send(2, reg(401, "bob"));
    for (int i = 0; i < 5; ++i) s.answer_all();
    return s;
  }());
  add("channel", three()
                     .send(3, p::Dereg{201, "carol"}).answer_all()
                     .send(1, p::Channel{301, "alice", "hello channel"}).answer(2).answer_all()
                     .send(3, reg(401, "carol")).answer_all().answer_all().answer_all());
  add("channel_unregistered", Script{}.send(1, p::Channel{301, "alice", "who am i"}));
  add("table_ack_wrong_epoch", Script{}.send(1, reg(101, "alice")).answer_with(1, 2).answer(1).send(2, reg(102, "bob")).answer_all().answer_all());
  add("table_ack_too_high", Script{}.send(1, reg(101, "alice")).answer_with(1, 3).send(2, reg(102, "bob")).answer_all().answer_all());
  add("reply_from_wrong_address", Script{}.send(1, reg(101, "alice")).answer_with(1, chat::fuzz::kFromWrongAddress).answer_all());
  add("store_fault_save", two().send(2, p::Dereg{201, "bob"}).answer_all().fail_store(1)
                              .send(1, p::Save{301, "alice", "bob", 9, false, "x"}).answer_all());
  add("store_fault_register", Script{}.fail_store(2).send(1, reg(101, "alice")).send(1, reg(101, "alice")).answer_all());
  add("garbage", Script{}
                     .raw(1, "hello")
                     .raw(2, R"({"t":"register","id":0,"name":"x","v":1})")
                     .raw(2, std::string(R"({"v":1,"t":"register","id":5,"name":"old","pad":")").append(1150, ' ').append("\"}"))
                     .raw(3, std::string(1500, '{'))
                     .raw(4, "\xFF\xFE")
                     .raw(5, p::encode(p::Ack{12345}))
                     .raw(6, p::encode(p::Probe{5}))
                     .raw(0, p::encode(p::Table{1, 1, 0, 1, false, {{"x", "1.2.3.4", 5, true}}})));
  // Time: sessions expire without keep-alives; stalled updates resume on the next one.
  add("keepalive_expiry", three().send(1, p::KeepAlive{150, "alice"}).advance(250).advance(250).advance(250));
  add("table_update_lost", three().advance(200).advance(200).send(2, p::KeepAlive{151, "bob"}).answer_all());
  add("keepalive_unknown", Script{}.send(1, p::KeepAlive{152, "nobody"}).send(1, p::Lookup{153, "nobody"}));
  add("probe_timeout", two().send(1, p::Save{160, "alice", "bob", 1, false, "x"}).advance(127).answer_all());
  add("relay_miss", three().send(1, p::Channel{170, "alice", "hi"}).advance(127).advance(200).answer_all());
  add("lookup", three().send(1, p::Lookup{180, "bob"}).send(4, p::Lookup{181, "alice"}));
  return out;
}

// ---------------------------------------------------------------- fuzz_client

// The client "me"; its server is source 0; alice is at source 1 (online), bob at 2 (offline),
// carol at 3 (online).
p::Table table1() {
  return p::Table{100, 7, 0, 4, false,
                  {{"me", "127.0.0.1", 5000, true}, {"alice", "127.0.0.2", 4001, true},
                   {"bob", "127.0.0.3", 4002, false}, {"carol", "127.0.0.4", 4003, true}}};
}

Seeds client_seeds() {
  Seeds out;
  auto add = [&](const std::string& name, const Script& s) { out.emplace_back(name, s.s); };
  auto online = [] { return std::move(Script{}.flags(0).send(0, table1())); };

  add("welcome", Script{}.flags(0));
  add("registering_then_refused", Script{}.flags(1).send(0, table1()).answer_with(0, 5));
  add("registering_then_other_reply", Script{}.flags(1).answer_with(0, 4).answer_with(0, 0));
  add("table", online());
  add("table_in_parts", Script{}.flags(0)
                            .send(0, p::Table{101, 7, 0, 2, true, {{"me", "127.0.0.1", 5000, true}, {"alice", "127.0.0.2", 4001, true}}})
                            .send(0, p::Table{102, 7, 2, 4, false, {{"bob", "127.0.0.3", 4002, false}, {"carol", "127.0.0.4", 4003, true}}})
                            .send(0, p::Table{103, 7, 9, 10, false, {}})
                            .send(0, p::Table{104, 7, 1, 2, false, {}})
                            .send(0, p::Table{105, 8, 3, 4, false, {}})
                            .send(0, p::Table{106, 8, 0, 1, false, {{"me", "127.0.0.1", 5000, true}}}));
  add("table_not_from_server", Script{}.flags(0).send(1, table1()));
  add("direct", online()
                    .send(1, p::Direct{200, "alice", "hello"}).repeat(1)
                    .send(2, p::Direct{201, "alice", "forged"})
                    .send(1, p::Direct{202, "zed", "unknown"})
                    .send(7, p::Direct{203, "alice", "v6"}));
  add("relay_probe", online()
                         .send(0, p::Relay{300, "alice", 9, "hi all"}).repeat(0)
                         .send(0, p::Probe{301})
                         .send(1, p::Probe{302})
                         .send(1, p::Relay{303, "alice", 10, "not from server"}));
  add("stored", Script{}.flags(2)
                    .send(0, p::Stored{400, {{"alice", false, 1700000000000000, 5, key("alice"), "while you were out"},
                                             {"carol", true, 1700000001000000, 6, key("carol"), "channel \x1b[2J"}}})
                    .send(0, table1())
                    .send(0, p::Stored{401, {{"alice", false, 1700000000000000, 5, key("alice"), "again"}}})
                    .send(1, p::Stored{402, {}}));
  add("send_direct", online().line("send alice hello there").answer(1));
  add("send_offline", online().line("send bob hi").answer(0));
  add("send_exists", online().line("send bob hi").answer_with(0, 7).answer(2));
  add("send_refused", online().line("send bob hi").answer_with(0, 4));
  add("send_all", online().line("send_all hello").answer(0).line("send_all x").answer_with(0, 4));
  add("dereg_reg", online()
                       .line("dereg me").answer(0)
                       .line("send alice x")
                       .line("reg me").answer(0)
                       .send(0, p::Table{110, 9, 0, 1, false, {{"me", "127.0.0.1", 5000, true}}}));
  add("dereg_refused", online().line("dereg me").answer_with(0, 4));
  add("commands", online()
                      .line("list").line("help").line("send").line("send nobody x").line("dereg bob")
                      .line("reg me").line("frobnicate").line("").line("   ").line("sned alice x")
                      .line("send_all " + std::string(240, '\x01')));
  add("quit", online().line("quit").send(1, p::Direct{200, "alice", "after"}));
  add("eof", online().eof().send(1, p::Direct{200, "alice", "after"}));
  add("self_offline", online()
                          .send(0, p::Table{105, 7, 4, 5, false, {{"me", "127.0.0.1", 5000, false}}})
                          .answer(0)
                          .send(0, p::Table{106, 7, 0, 5, false, {{"me", "127.0.0.1", 5000, true}}}));
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
  add("keepalive_lost_track", online().advance(160).answer_with(0, 7).answer(0).send(0, table1()));
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
  write(root, "fuzz_decode", decode_seeds());
  write(root, "fuzz_server", server_seeds());
  write(root, "fuzz_client", client_seeds());
  return 0;
}
