// Unit tests of the binary wire codec (v2): round trips, exact byte layouts, every refusal,
// sizes and packing, id rewriting, the validators, and the answer to a version-1 request.
#include <arpa/inet.h>
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "protocol/codec.hpp"
#include "protocol/messages.hpp"

namespace {

namespace proto = chat::protocol;
using proto::DecodeError;
using proto::Message;

constexpr std::uint64_t kMaxU64 = std::numeric_limits<std::uint64_t>::max();
constexpr std::int64_t kMaxI64 = std::numeric_limits<std::int64_t>::max();

const std::string kName1 = "a";
const std::string kName32 = "abcdefghijklmnopqrstuvwxyz_-.012";  // exactly kMaxName
const std::string kName33 = kName32 + "3";

// Sizes of the envelopes (design-v2: identity/envelope): what sealing adds to a typed text.
constexpr std::size_t kBoxOverhead = 24 + 16;  // nonce + MAC
// Sealed direct (and Save, and stored direct item): box(kind 1, mid 8, sent_ms 8, name to, text).
constexpr std::size_t sealed_direct_size(std::size_t text, std::size_t to_name) {
  return text + 17 + 1 + to_name + kBoxOverhead;
}
// Signed channel body: sig(64) || u64 sent_ms || text.
constexpr std::size_t signed_channel_size(std::size_t text) { return 64 + 8 + text; }

proto::Key key_of(std::uint8_t b) {
  proto::Key k;
  k.fill(b);
  return k;
}
proto::Signature sig_of(std::uint8_t b) {
  proto::Signature s;
  s.fill(b);
  return s;
}
// A key whose bytes all differ (so a byte out of place shows).
proto::Key counting_key() {
  proto::Key k;
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = static_cast<std::uint8_t>(0xA0 + i);
  return k;
}

// Bytes: every value 0-255 once, repeated to `n` (opaque bodies are any bytes at all).
std::string all_bytes(std::size_t n) {
  std::string s(n, '\0');
  for (std::size_t i = 0; i < n; ++i) s[i] = static_cast<char>(i * 7 % 256);
  return s;
}

// Little-endian integers and raw bytes, for spelling out datagrams.
std::string le(std::uint64_t v, int n) {
  std::string s;
  for (int k = 0; k < n; ++k) s += static_cast<char>((v >> (8 * k)) & 0xFF);
  return s;
}
std::string u8(unsigned v) { return le(v, 1); }
std::string u16(unsigned v) { return le(v, 2); }
std::string u64(std::uint64_t v) { return le(v, 8); }
std::string header(unsigned code, std::uint64_t id) { return u8(2) + u8(code) + u64(id); }
std::string str8(const std::string& s) { return u8(static_cast<unsigned>(s.size())) + s; }
std::string str16(const std::string& s) { return u16(static_cast<unsigned>(s.size())) + s; }
std::string raw(const proto::Key& k) { return std::string(k.begin(), k.end()); }
std::string raw(const proto::Signature& k) { return std::string(k.begin(), k.end()); }

// Decodes `bytes` from a heap block of exactly their size, so that a read past the end is an
// AddressSanitizer report, not a quiet read of a std::string's spare capacity.
proto::Decoded decode_exact(const std::string& bytes) {
  std::unique_ptr<char[]> block(new char[std::max<std::size_t>(bytes.size(), 1)]);
  std::memcpy(block.get(), bytes.data(), bytes.size());
  proto::Decoded d;
  REQUIRE_NOTHROW(d = proto::decode(std::string_view(block.get(), bytes.size())));
  return d;
}

DecodeError refusal(const std::string& bytes) {
  proto::Decoded d = decode_exact(bytes);
  CHECK_FALSE(d);
  return d.error;
}

// Encodes and decodes `m`; the result must be `m` again, the bytes its only encoding, and
// every shorter prefix (truncated) and one byte more (trailing) refused.
void check_round_trip(const Message& m) {
  std::string bytes;
  REQUIRE_NOTHROW(bytes = proto::encode(m));
  const std::string type = proto::type_name(m);
  CAPTURE(type);
  CHECK(bytes.size() <= proto::kMaxDatagram);
  CHECK(proto::encoded_size(m) == bytes.size());
  REQUIRE(bytes.size() >= 10);
  CHECK(static_cast<std::uint8_t>(bytes[0]) == proto::kVersion);
  CHECK(bytes.substr(2, 8) == u64(proto::request_id(m) | proto::reply_to(m)));
  CHECK((static_cast<std::uint8_t>(bytes[1]) < 64) == (proto::request_id(m) != 0));
  proto::Decoded d = decode_exact(bytes);
  CHECK(d.error == DecodeError::none);
  REQUIRE(d);
  CHECK(d.message->index() == m.index());
  CHECK(*d.message == m);
  CHECK(proto::encode(*d.message) == bytes);
  CHECK(refusal(std::string()) == DecodeError::empty);
  for (std::size_t n = 1; n < bytes.size(); ++n) {
    CAPTURE(n);
    CHECK(refusal(bytes.substr(0, n)) == DecodeError::truncated);
  }
  // One byte more is trailing, or too large if the datagram already had kMaxDatagram bytes.
  const DecodeError longer = bytes.size() < proto::kMaxDatagram ? DecodeError::trailing : DecodeError::too_large;
  CHECK(refusal(bytes + '\0') == longer);
  CHECK(refusal(bytes + "x") == longer);
}

// A body of the size a sealed 600-byte direct message has, for the longest recipient name.
const std::string kSealed600 = all_bytes(sealed_direct_size(proto::kMaxText, proto::kMaxName));
const std::string kSigned600 = all_bytes(signed_channel_size(proto::kMaxText));

std::vector<proto::Entry> max_entries(std::size_t n) {
  std::vector<proto::Entry> es;
  for (std::size_t i = 0; i < n; ++i) {
    std::string name = kName32;
    name[0] = static_cast<char>('a' + i % 26);
    name[1] = static_cast<char>('a' + i / 26 % 26);
    es.push_back({name, "255.255.255.255", 65535, i % 2 == 0, key_of(static_cast<std::uint8_t>(i))});
  }
  return es;
}

// At least one message of every type, with edge values (tested to cover the whole variant).
std::vector<Message> one_of_each() {
  const std::string token64(proto::kMaxToken, '\xFF');
  return {
      proto::Register{1, kName1, {}, 0, "", {}},
      proto::Register{kMaxU64, kName32, key_of(0xFF), kMaxU64, token64, sig_of(0xEE)},
      proto::Register{2, "bob", counting_key(), 15'000, std::string(40, '\0'), sig_of(1)},
      proto::Register{3, "bob", counting_key(), 15'000, "t", {}},  // a token, a zero proof
      proto::Dereg{2, kName32},
      proto::Dereg{kMaxU64, kName1},
      proto::Direct{3, kName1, ""},
      proto::Direct{kMaxU64, kName32, all_bytes(proto::kMaxBody)},
      proto::Direct{4, kName32, kSealed600},
      proto::Save{4, kName1, kName32, kMaxU64, true, all_bytes(proto::kMaxBody)},
      proto::Save{5, kName32, kName1, 0, false, ""},
      proto::Channel{6, kName32, kSigned600},
      proto::Channel{7, kName1, ""},
      proto::Relay{7, kName32, kName32, kMaxU64, all_bytes(proto::kMaxBody)},
      proto::Relay{8, kName1, kName1, 0, std::string(1, '\0')},
      proto::Relay{9, "bob", "alice", 1, "x"},
      proto::Probe{1, "a"},
      proto::Probe{kMaxU64, kName32},
      proto::Table{8, "a", kMaxU64, 1, 2, true,
                   {{kName32, "255.255.255.255", 65535, true, key_of(0xFF)},
                    {kName1, "1.2.3.4", 1, false, {}},
                    {"c-3.x_y", "0.0.0.0", 80, true, counting_key()}}},
      proto::Table{9, "a", 0, 0, 0, false, {}},
      proto::Table{kMaxU64, kName32, kMaxU64, kMaxU64, kMaxU64, false, max_entries(19)},
      proto::Stored{10, "a", {{kName32, true, kMaxI64, kMaxU64, key_of(0xFF), all_bytes(300)},
                         {kName1, false, 0, 0, {}, ""}}},
      proto::Stored{11, "a", {}},
      proto::Stored{kMaxU64, kName32, {{kName32, false, kMaxI64, kMaxU64, counting_key(), all_bytes(proto::kMaxBody)}}},
      proto::KeepAlive{12, kName32},
      proto::KeepAlive{kMaxU64, kName1},
      proto::Lookup{13, kName1},
      proto::Lookup{kMaxU64, kName32},
      proto::FilePut{30, kName1, kName32, 1, 0, {}},
      proto::FilePut{kMaxU64, kName32, kName1, kMaxU64, kMaxU64, counting_key()},
      proto::FileCommit{31, kName1, 7, ""},
      proto::FileCommit{kMaxU64, kName32, kMaxU64, all_bytes(proto::kMaxBody)},
      proto::FileGet{32, kName1, 1, key_of(0xFF)},
      proto::FileDone{33, kName32, kMaxU64, true},
      proto::FileDone{34, kName1, 1, false},
      proto::FileOffer{35, "a", kName32, 0, 1, 0, {}, ""},
      proto::FileOffer{kMaxU64, kName32, kName1, kMaxI64, kMaxU64, kMaxU64, counting_key(), all_bytes(proto::kMaxBody)},
      proto::Ack{14, 0, 0, 0},
      proto::Ack{15, 4, 5, 0},
      proto::Ack{16, 0, 0, 3},
      proto::Ack{kMaxU64, kMaxU64, kMaxU64, kMaxU64},
      proto::Challenge{17, ""},
      proto::Challenge{kMaxU64, token64},
      proto::Challenge{18, std::string(40, '\x01')},
      proto::Receipt{19, ""},
      proto::Receipt{kMaxU64, all_bytes(proto::kMaxBody)},
      proto::RegOk{17, 1, 2},
      proto::RegOk{kMaxU64, kMaxU64, 0},
      proto::RegErr{19, "no"},
      proto::RegErr{20, ""},
      proto::RegErr{21, "name \"bob\" is taken\tby\\someone \xE2\x9C\x93 \xF0\x9F\x98\x80"},
      proto::Exists{20, kName1},
      proto::Exists{kMaxU64, kName32},
      proto::Refused{21, std::string(proto::kMaxReason, '\x01')},
      proto::Refused{22, std::string(proto::kMaxReason, 'r')},
      proto::Alive{22, true},
      proto::Alive{kMaxU64, false},
      proto::Found{23, true, {kName32, "10.0.0.1", 6001, true, counting_key()}},
      proto::Found{24, true, {kName1, "0.0.0.0", 1, false, {}}},
      proto::Found{25, false, {kName32, "", 0, false, {}}},
      proto::Found{26, false, {}},
      proto::Found{kMaxU64, true, {kName32, "255.255.255.255", 65535, true, key_of(0xFF)}},
  };
}

}  // namespace

TEST_SUITE("protocol") {

TEST_CASE("every message type survives a round trip, every prefix is truncated, one byte more trailing") {
  for (const Message& m : one_of_each()) check_round_trip(m);
}

TEST_CASE("the samples cover every type, requests come before replies in the variant") {
  std::set<std::size_t> seen;
  for (const Message& m : one_of_each()) seen.insert(m.index());
  CHECK(seen.size() == std::variant_size_v<Message>);
  bool in_replies = false;
  for (const Message& m : one_of_each()) {
    const bool reply = proto::reply_to(m) != 0;
    CHECK((proto::request_id(m) != 0) != reply);
    if (reply) in_replies = true;
  }
  CHECK(in_replies);
  // The type codes: 1-11 and 13-17 for requests in variant order (12 is the chunk frame), 64-72 for replies.
  std::vector<Message> each = {proto::Register{},  proto::Dereg{},   proto::Direct{}, proto::Save{},
                               proto::Channel{},   proto::Relay{},   proto::Probe{},  proto::Table{},
                               proto::Stored{},    proto::KeepAlive{}, proto::Lookup{}, proto::FilePut{},
                               proto::FileCommit{}, proto::FileGet{}, proto::FileDone{}, proto::FileOffer{},
                               proto::Ack{},
                               proto::Challenge{}, proto::Receipt{}, proto::RegOk{},  proto::RegErr{},
                               proto::Exists{},    proto::Refused{}, proto::Alive{},  proto::Found{}};
  for (Message& m : each) {
    std::visit(
        [](auto& x) {
          if constexpr (requires { x.id; }) x.id = 1;
          else x.re = 1;
        },
        m);
  }
  REQUIRE(each.size() == std::variant_size_v<Message>);
  const unsigned codes[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 64, 65, 66, 67, 68, 69, 70, 71, 72};
  for (std::size_t i = 0; i < each.size(); ++i) {
    CHECK(each[i].index() == i);
    CHECK(static_cast<std::uint8_t>(proto::encode(each[i])[1]) == codes[i]);
  }
}

TEST_CASE("request_id, reply_to and type_name") {
  CHECK(proto::request_id(proto::Direct{42, "a", "x"}) == 42);
  CHECK(proto::reply_to(proto::Direct{42, "a", "x"}) == 0);
  CHECK(proto::request_id(proto::Ack{43, 0, 0, 0}) == 0);
  CHECK(proto::reply_to(proto::Ack{43, 0, 0, 0}) == 43);
  CHECK(proto::reply_to(proto::Refused{44, "no"}) == 44);
  CHECK(proto::reply_to(proto::Receipt{45, ""}) == 45);
  CHECK(proto::reply_to(proto::Challenge{46, "t"}) == 46);
  const std::vector<std::pair<Message, std::string>> names = {
      {proto::Register{}, "register"}, {proto::Dereg{}, "dereg"},       {proto::Direct{}, "direct"},
      {proto::Save{}, "save"},         {proto::Channel{}, "channel"},   {proto::Relay{}, "relay"},
      {proto::Probe{}, "probe"},       {proto::Table{}, "table"},       {proto::Stored{}, "stored"},
      {proto::KeepAlive{}, "keepalive"}, {proto::Lookup{}, "lookup"},   {proto::Ack{}, "ack"},
      {proto::FilePut{}, "file_put"},  {proto::FileCommit{}, "file_commit"}, {proto::FileGet{}, "file_get"},
      {proto::FileDone{}, "file_done"}, {proto::FileOffer{}, "file_offer"},
      {proto::Challenge{}, "challenge"}, {proto::Receipt{}, "receipt"}, {proto::RegOk{}, "reg_ok"},
      {proto::RegErr{}, "reg_err"},    {proto::Exists{}, "exists"},     {proto::Refused{}, "refused"},
      {proto::Alive{}, "alive"},       {proto::Found{}, "found"}};
  for (const auto& [m, name] : names) CHECK(std::string(proto::type_name(m)) == name);
}

TEST_CASE("exact byte layouts") {
  SUBCASE("the header: version, type code, id little-endian") {
    CHECK(proto::encode(proto::Probe{0x0102030405060708, "a"}) ==
          std::string("\x02\x07\x08\x07\x06\x05\x04\x03\x02\x01", 10) + str8("a"));
    CHECK(proto::encode(proto::Ack{0x1122, 3, 4, 5}) == header(64, 0x1122) + u64(3) + u64(4) + u64(5));
  }
  SUBCASE("a Register without a token has no proof") {
    const proto::Key k = counting_key();
    const std::string want = header(1, 0xABCDEF) + "\x05" "alice" + raw(k) + u64(15000) + u8(0);
    CHECK(proto::encode(proto::Register{0xABCDEF, "alice", k, 15000, "", {}}) == want);
    CHECK(want.size() == 10 + 6 + 32 + 8 + 1);
    // A proof without a token is not carried.
    CHECK(proto::encode(proto::Register{0xABCDEF, "alice", k, 15000, "", sig_of(9)}) == want);
  }
  SUBCASE("a Register with a token carries the proof after it") {
    const proto::Key k = key_of(0x11);
    const proto::Signature s = sig_of(0x22);
    const std::string want = header(1, 7) + str8("bob") + raw(k) + u64(0) + str8("tok") + raw(s);
    CHECK(proto::encode(proto::Register{7, "bob", k, 0, "tok", s}) == want);
    CHECK(want.size() == 10 + 4 + 32 + 8 + 4 + 64);
  }
  SUBCASE("a Table entry: name, ip a.b.c.d (a first), port LE, online, key") {
    const proto::Key k = counting_key();
    const std::string want = header(8, 1) + str8("bob") + u64(2) + u64(3) + u64(4) + u8(1) + u16(1) + str8("bob") +
                             std::string("\x0A\x00\x01\xFF", 4) + "\x34\x12" + u8(1) + raw(k);
    CHECK(proto::encode(proto::Table{1, "bob", 2, 3, 4, true, {{"bob", "10.0.1.255", 0x1234, true, k}}}) == want);
    CHECK(proto::table_overhead("bob") == 10 + 4 + 8 + 8 + 8 + 1 + 2);
    CHECK(proto::entry_size({"bob", "10.0.1.255", 0x1234, true, k}) == 4 + 4 + 2 + 1 + 32);
  }
  SUBCASE("the other types") {
    const proto::Key k = counting_key();
    CHECK(proto::encode(proto::Dereg{1, "ab"}) == header(2, 1) + str8("ab"));
    CHECK(proto::encode(proto::Direct{1, "ab", "xyz"}) == header(3, 1) + str8("ab") + str16("xyz"));
    CHECK(proto::encode(proto::Save{1, "a", "b", 9, true, "x"}) ==
          header(4, 1) + str8("a") + str8("b") + u64(9) + u8(1) + str16("x"));
    CHECK(proto::encode(proto::Channel{1, "a", "x"}) == header(5, 1) + str8("a") + str16("x"));
    CHECK(proto::encode(proto::Relay{1, "bc", "a", 9, "x"}) ==
          header(6, 1) + str8("bc") + str8("a") + u64(9) + str16("x"));
    CHECK(proto::encode(proto::Probe{1, "bc"}) == header(7, 1) + str8("bc"));
    CHECK(proto::encode(proto::Stored{1, "bc", {{"a", true, 5, 6, k, "x"}}}) ==
          header(9, 1) + str8("bc") + u16(1) + str8("a") + u8(1) + u64(5) + u64(6) + raw(k) + str16("x"));
    CHECK(proto::encode(proto::KeepAlive{1, "a"}) == header(10, 1) + str8("a"));
    CHECK(proto::encode(proto::Lookup{1, "a"}) == header(11, 1) + str8("a"));
    CHECK(proto::encode(proto::Challenge{1, "tk"}) == header(65, 1) + str8("tk"));
    CHECK(proto::encode(proto::Receipt{1, "rc"}) == header(66, 1) + str16("rc"));
    CHECK(proto::encode(proto::RegOk{1, 2, 3}) == header(67, 1) + u64(2) + u64(3));
    CHECK(proto::encode(proto::RegErr{1, "no"}) == header(68, 1) + str16("no"));
    CHECK(proto::encode(proto::Exists{1, "a"}) == header(69, 1) + str8("a"));
    CHECK(proto::encode(proto::Refused{1, "no"}) == header(70, 1) + str16("no"));
    CHECK(proto::encode(proto::Alive{1, true}) == header(71, 1) + u8(1));
    CHECK(proto::encode(proto::Found{1, true, {"a", "1.2.3.4", 5, false, k}}) ==
          header(72, 1) + u8(1) + str8("a") + "\x01\x02\x03\x04" + u16(5) + u8(0) + raw(k));
    // Not known: the name (or none) and zeros.
    CHECK(proto::encode(proto::Found{1, false, {"bob", "", 0, false, {}}}) ==
          header(72, 1) + u8(0) + str8("bob") + std::string(39, '\0'));
    CHECK(proto::encode(proto::Found{1, false, {}}) == header(72, 1) + u8(0) + u8(0) + std::string(39, '\0'));
  }
}

TEST_CASE("encode normalises what has one form only on the wire") {
  SUBCASE("an entry ip that is not dotted IPv4 goes as 0.0.0.0") {
    for (const std::string ip : {"", "1.2.3", "256.1.1.1", "::1", "localhost", "01.2.3.4"}) {
      CAPTURE(ip);
      auto d = proto::decode(proto::encode(proto::Table{1, "a", 0, 1, 1, false, {{"a", ip, 5, true, {}}}}));
      REQUIRE(d);
      CHECK(std::get<proto::Table>(*d.message).entries.at(0).ip == "0.0.0.0");
    }
  }
  SUBCASE("a not-known Found carries only its name") {
    auto d = proto::decode(proto::encode(proto::Found{5, false, {"bob", "1.2.3.4", 9, true, key_of(3)}}));
    REQUIRE(d);
    CHECK(*d.message == Message{proto::Found{5, false, {"bob", "", 0, false, {}}}});
  }
  SUBCASE("a reason is cut to kMaxReason bytes at a character boundary, bad UTF-8 replaced") {
    auto reason_of = [](const std::string& r) {
      auto d = proto::decode(proto::encode(proto::RegErr{1, r}));
      REQUIRE(d);
      return std::get<proto::RegErr>(*d.message).reason;
    };
    CHECK(reason_of(std::string(500, 'r')) == std::string(proto::kMaxReason, 'r'));
    // "é" (2 bytes) would end at byte 201: the reason ends before it.
    CHECK(reason_of(std::string(199, 'a') + "\xC3\xA9") == std::string(199, 'a'));
    CHECK(reason_of(std::string(198, 'a') + "\xC3\xA9") == std::string(198, 'a') + "\xC3\xA9");
    CHECK(reason_of(std::string(197, 'a') + "\xF0\x9F\x98\x80") == std::string(197, 'a'));
    CHECK(reason_of("bad \xFF byte") == "bad \xEF\xBF\xBD byte");
    CHECK(reason_of("cut \xE2\x82") == "cut \xEF\xBF\xBD\xEF\xBF\xBD");
    CHECK(proto::encoded_size(proto::Refused{1, std::string(5000, '\xFF')}) ==
          proto::encode(proto::Refused{1, std::string(5000, '\xFF')}).size());
    CHECK(reason_of(std::string(300, '\xFF')).size() == 198);  // 66 replacement characters
  }
}

TEST_CASE("fields past their limits are refused by decode, never read as another message") {
  // encode() clamps nothing the caller owns: the receiver refuses with the field's reason.
  CHECK(refusal(proto::encode(proto::Dereg{1, kName33})) == DecodeError::bad_name);
  CHECK(refusal(proto::encode(proto::Dereg{1, ""})) == DecodeError::bad_name);
  CHECK(refusal(proto::encode(proto::Dereg{1, std::string(300, 'a')})) == DecodeError::bad_name);
  CHECK(refusal(proto::encode(proto::Direct{1, "a", std::string(proto::kMaxBody + 1, 'x')})) ==
        DecodeError::text_too_long);
  CHECK(refusal(proto::encode(proto::Direct{1, "a", std::string(70000, 'x')})) == DecodeError::too_large);
  CHECK(refusal(proto::encode(proto::Challenge{1, std::string(proto::kMaxToken + 1, 't')})) ==
        DecodeError::text_too_long);
  CHECK(refusal(proto::encode(proto::Register{1, "a", {}, 0, std::string(300, 't'), {}})) ==
        DecodeError::text_too_long);
  CHECK(refusal(proto::encode(proto::Table{1, "a", 0, 1, 1, false, {{"a", "1.2.3.4", 0, true, {}}}})) ==
        DecodeError::bad_value);
  CHECK(refusal(proto::encode(proto::Table{1, "a", 0, 2, 1, false, {}})) == DecodeError::bad_value);
  CHECK(refusal(proto::encode(proto::Stored{1, "a", {{"a", false, -1, 0, {}, ""}}})) == DecodeError::bad_value);
  CHECK(refusal(proto::encode(proto::Probe{0, "a"})) == DecodeError::bad_value);
  CHECK(refusal(proto::encode(proto::Ack{0, 0, 0, 0})) == DecodeError::bad_value);
  CHECK(refusal(proto::encode(proto::Found{1, true, {"", "1.2.3.4", 1, true, {}}})) == DecodeError::bad_name);
  CHECK(refusal(proto::encode(proto::Found{1, false, {".x", "", 0, false, {}}})) == DecodeError::bad_name);
  // And the sizes still agree with what is written.
  for (const Message& m : {Message{proto::Dereg{1, std::string(300, 'a')}},
                           Message{proto::Direct{1, "a", std::string(70000, 'x')}},
                           Message{proto::Register{1, "a", {}, 0, std::string(300, 't'), {}}}}) {
    CHECK(proto::encoded_size(m) == proto::encode(m).size());
  }
}

TEST_CASE("every refusal reason, with the exact reason") {
  struct Bad {
    std::string label;
    std::string bytes;
    DecodeError want;
  };
  std::vector<Bad> t;
  const std::string probe = proto::encode(proto::Probe{1, "a"});

  // ---- framing
  t.push_back({"empty", "", DecodeError::empty});
  t.push_back({"kMaxDatagram + 1", probe + std::string(proto::kMaxDatagram + 1 - probe.size(), '\0'),
               DecodeError::too_large});
  {
    std::mt19937 rng(20240607);
    std::string garbage(64 * 1024, '\0');
    for (char& c : garbage) c = static_cast<char>(rng());
    t.push_back({"64 KiB of garbage", garbage, DecodeError::too_large});
  }
  t.push_back({"a v1 register", R"({"v":1,"t":"register","id":7,"name":"alice"})", DecodeError::old_version});
  t.push_back({"a lone '{'", "{", DecodeError::old_version});
  t.push_back({"'{' then binary", std::string("{").append(probe.substr(1)), DecodeError::old_version});
  for (unsigned v : {0u, 1u, 3u, 0x7Au, 0x7Cu, 0xFFu}) {
    std::string b = probe;
    b[0] = static_cast<char>(v);
    t.push_back({std::string("version ").append(std::to_string(v)), b, DecodeError::bad_version});
  }
  t.push_back({"plain text", "hello, server", DecodeError::bad_version});
  t.push_back({"a JSON array", "[1,2,3]", DecodeError::bad_version});
  t.push_back({"the version byte alone", "\x02", DecodeError::truncated});
  t.push_back({"header without its id", probe.substr(0, 9), DecodeError::truncated});
  for (unsigned code = 0; code < 256; ++code) {
    if ((code >= 1 && code <= 11) || (code >= 13 && code <= 17) || (code >= 64 && code <= 72)) continue;
    t.push_back({std::string("type code ").append(std::to_string(code)), header(code, 1), DecodeError::unknown_type});
  }
  t.push_back({"unknown type, header only two bytes", "\x02\x0C", DecodeError::unknown_type});
  t.push_back({"probe with one byte more", probe + "x", DecodeError::trailing});
  t.push_back({"ack with one byte more", proto::encode(proto::Ack{1, 0, 0, 0}) + '\0', DecodeError::trailing});
  t.push_back({"found not known with one byte more", proto::encode(proto::Found{1, false, {}}) + '\0',
               DecodeError::trailing});
  t.push_back({"two datagrams in one", probe + probe, DecodeError::trailing});
  t.push_back({"register without a token, with a proof", proto::encode(proto::Register{1, "a", {}, 0, "", {}}) + raw(sig_of(1)),
               DecodeError::trailing});
  t.push_back({"table claiming one entry fewer", [] {
                 std::string b = proto::encode(proto::Table{1, "a", 0, 0, 2, false, max_entries(2)});
                 b[37] = 1;  // the count
                 return b;
               }(),
               DecodeError::trailing});
  t.push_back({"table claiming one entry more", [] {
                 std::string b = proto::encode(proto::Table{1, "a", 0, 0, 2, false, max_entries(2)});
                 b[37] = 3;
                 return b;
               }(),
               DecodeError::truncated});
  t.push_back({"stored claiming 65535 items", header(9, 1) + str8("a") + u16(65535), DecodeError::truncated});

  // ---- ids
  t.push_back({"probe id 0", header(7, 0) + str8("a"), DecodeError::bad_value});
  t.push_back({"dereg id 0", header(2, 0) + str8("a"), DecodeError::bad_value});
  t.push_back({"ack re 0", header(64, 0) + u64(0) + u64(0) + u64(0), DecodeError::bad_value});
  t.push_back({"alive re 0", header(71, 0) + u8(1), DecodeError::bad_value});

  // ---- bools: 0 or 1 only
  for (unsigned v : {2u, 0x80u, 0xFFu}) {
    const std::string s = std::to_string(v);
    t.push_back({"save force " + s, header(4, 1) + str8("a") + str8("b") + u64(1) + u8(v) + str16("x"),
                 DecodeError::bad_value});
    t.push_back({"table more " + s, header(8, 1) + str8("a") + u64(1) + u64(0) + u64(0) + u8(v) + u16(0), DecodeError::bad_value});
    t.push_back({"entry online " + s,
                 header(8, 1) + str8("a") + u64(1) + u64(0) + u64(1) + u8(0) + u16(1) + str8("a") + "\x01\x02\x03\x04" + u16(5) +
                     u8(v) + raw(proto::Key{}),
                 DecodeError::bad_value});
    t.push_back({"item channel " + s,
                 header(9, 1) + str8("a") + u16(1) + str8("a") + u8(v) + u64(1) + u64(1) + raw(proto::Key{}) + str16("x"),
                 DecodeError::bad_value});
    t.push_back({"alive live " + s, header(71, 1) + u8(v), DecodeError::bad_value});
    t.push_back({"found known " + s, header(72, 1) + u8(v) + u8(0) + std::string(39, '\0'), DecodeError::bad_value});
  }

  // ---- other values
  t.push_back({"table to < from", header(8, 1) + str8("a") + u64(1) + u64(5) + u64(4) + u8(0) + u16(0), DecodeError::bad_value});
  t.push_back({"entry port 0",
               header(8, 1) + str8("a") + u64(1) + u64(0) + u64(1) + u8(0) + u16(1) + str8("a") + "\x01\x02\x03\x04" + u16(0) +
                   u8(1) + raw(proto::Key{}),
               DecodeError::bad_value});
  t.push_back({"found known with port 0",
               header(72, 1) + u8(1) + str8("a") + "\x01\x02\x03\x04" + u16(0) + u8(1) + raw(proto::Key{}),
               DecodeError::bad_value});
  t.push_back({"item ts_us negative",
               header(9, 1) + str8("a") + u16(1) + str8("a") + u8(0) + u64(kMaxU64) + u64(1) + raw(proto::Key{}) + str16("x"),
               DecodeError::bad_value});
  for (std::size_t at = 0; at < 39; ++at) {  // a not-known Found with anything but zeros after the name
    std::string rest(39, '\0');
    rest[at] = 1;
    t.push_back({std::string("found not known, byte ").append(std::to_string(at)).append(" of the row set"),
                 header(72, 1) + u8(0) + str8("bob") + rest, DecodeError::bad_value});
  }

  // ---- names
  const std::vector<std::pair<std::string, std::string>> bad_names = {
      {"empty", ""},
      {"33 characters", kName33},
      {"leading dot", ".hidden"},
      {"..", ".."},
      {"../x", "../x"},
      {"slash", "a/b"},
      {"NUL", std::string("a\0b", 3)},
      {"space", "a b"},
      {"backslash", "a\\b"},
      {"non-ASCII", "\xC3\xA9"},
      {"255 bytes", std::string(255, 'a')},
  };
  for (const auto& [what, n] : bad_names) {
    t.push_back({"register name " + what, header(1, 1) + str8(n) + raw(proto::Key{}) + u64(0) + u8(0),
                 DecodeError::bad_name});
    t.push_back({"dereg name " + what, header(2, 1) + str8(n), DecodeError::bad_name});
    t.push_back({"direct from " + what, header(3, 1) + str8(n) + str16("x"), DecodeError::bad_name});
    t.push_back({"save to " + what, header(4, 1) + str8("a") + str8(n) + u64(1) + u8(0) + str16("x"),
                 DecodeError::bad_name});
    t.push_back({"relay recipient " + what, header(6, 1) + str8(n) + str8("a") + u64(1) + str16("x"),
                 DecodeError::bad_name});
    t.push_back({"probe recipient " + what, header(7, 1) + str8(n), DecodeError::bad_name});
    t.push_back({"table recipient " + what, header(8, 1) + str8(n) + u64(1) + u64(0) + u64(0) + u8(0) + u16(0),
                 DecodeError::bad_name});
    t.push_back({"stored recipient " + what, header(9, 1) + str8(n) + u16(0), DecodeError::bad_name});
    t.push_back({"keepalive name " + what, header(10, 1) + str8(n), DecodeError::bad_name});
    t.push_back({"lookup name " + what, header(11, 1) + str8(n), DecodeError::bad_name});
    t.push_back({"exists name " + what, header(69, 1) + str8(n), DecodeError::bad_name});
    t.push_back({"item from " + what,
                 header(9, 1) + str8("a") + u16(1) + str8(n) + u8(0) + u64(1) + u64(1) + raw(proto::Key{}) + str16("x"),
                 DecodeError::bad_name});
    t.push_back({"entry name " + what,
                 header(8, 1) + str8("a") + u64(1) + u64(0) + u64(1) + u8(0) + u16(1) + str8(n) + "\x01\x02\x03\x04" + u16(5) +
                     u8(1) + raw(proto::Key{}),
                 DecodeError::bad_name});
    if (!n.empty())  // a not-known Found may carry no name
      t.push_back({"found not known, name " + what, header(72, 1) + u8(0) + str8(n) + std::string(39, '\0'),
                   DecodeError::bad_name});
  }

  // ---- lengths
  t.push_back({"direct body kMaxBody + 1", header(3, 1) + str8("a") + str16(std::string(proto::kMaxBody + 1, 'x')),
               DecodeError::text_too_long});
  t.push_back({"direct body length 65535, no bytes", header(3, 1) + str8("a") + u16(65535), DecodeError::text_too_long});
  t.push_back({"receipt body kMaxBody + 1", header(66, 1) + str16(std::string(proto::kMaxBody + 1, 'x')),
               DecodeError::text_too_long});
  t.push_back({"challenge token kMaxToken + 1", header(65, 1) + str8(std::string(proto::kMaxToken + 1, 't')),
               DecodeError::text_too_long});
  t.push_back({"register token kMaxToken + 1",
               header(1, 1) + str8("a") + raw(proto::Key{}) + u64(0) + str8(std::string(proto::kMaxToken + 1, 't')) +
                   raw(proto::Signature{}),
               DecodeError::text_too_long});
  t.push_back({"reg_err reason kMaxReason + 1", header(68, 1) + str16(std::string(proto::kMaxReason + 1, 'r')),
               DecodeError::text_too_long});
  t.push_back({"refused reason kMaxReason + 1", header(70, 1) + str16(std::string(proto::kMaxReason + 1, 'r')),
               DecodeError::text_too_long});
  t.push_back({"item body kMaxBody + 1",
               header(9, 1) + str8("a") + u16(1) + str8("a") + u8(0) + u64(1) + u64(1) + raw(proto::Key{}) +
                   str16(std::string(proto::kMaxBody + 1, 'x')),
               DecodeError::text_too_long});
  t.push_back({"file_commit body kMaxBody + 1",
               header(14, 1) + str8("a") + u64(1) + str16(std::string(proto::kMaxBody + 1, 'x')),
               DecodeError::text_too_long});
  // ---- file requests: a transfer id is never 0, an arrival time never negative
  t.push_back({"file_put transfer 0", header(13, 1) + str8("a") + str8("b") + u64(0) + u64(1) + raw(proto::Key{}),
               DecodeError::bad_value});
  t.push_back({"file_commit transfer 0", header(14, 1) + str8("a") + u64(0) + str16("x"), DecodeError::bad_value});
  t.push_back({"file_get transfer 0", header(15, 1) + str8("a") + u64(0) + raw(proto::Key{}), DecodeError::bad_value});
  t.push_back({"file_done transfer 0", header(16, 1) + str8("a") + u64(0) + u8(1), DecodeError::bad_value});
  t.push_back({"file_done saved 2", header(16, 1) + str8("a") + u64(1) + u8(2), DecodeError::bad_value});
  t.push_back({"file_offer ts_us < 0",
               header(17, 1) + str8("a") + str8("b") + u64(~0ull) + u64(1) + u64(1) + raw(proto::Key{}) + str16("x"),
               DecodeError::bad_value});
  t.push_back({"file_offer recipient empty",
               header(17, 1) + str8("") + str8("b") + u64(1) + u64(1) + u64(1) + raw(proto::Key{}) + str16("x"),
               DecodeError::bad_name});
  t.push_back({"file_put without its key", header(13, 1) + str8("a") + str8("b") + u64(1) + u64(1), DecodeError::truncated});
  t.push_back({"a body's length past the datagram", header(3, 1) + str8("a") + u16(10) + "abc", DecodeError::truncated});
  t.push_back({"a name's length past the datagram", header(2, 1) + u8(5) + "ab", DecodeError::truncated});

  // ---- UTF-8 in reasons (bodies and tokens are opaque bytes)
  for (const std::string bad : {"\xFF", "a\x80z", "\xC0\xAF", "\xC0\x80", "\xE0\x80\xAF", "\xED\xA0\x80",
                                "\xF4\x90\x80\x80", "\xF8\x88\x80\x80\x80", "x\xF0\x9F\x98"}) {
    t.push_back({"reg_err reason with bad UTF-8", header(68, 1) + str16(bad), DecodeError::invalid_utf8});
    t.push_back({"refused reason with bad UTF-8", header(70, 1) + str16(bad), DecodeError::invalid_utf8});
  }

  std::set<DecodeError> reached;
  for (const Bad& b : t) {
    CAPTURE(b.label);
    proto::Decoded d = decode_exact(b.bytes);
    CHECK_FALSE(d);
    CHECK(std::string(proto::to_string(d.error)) == proto::to_string(b.want));
    reached.insert(d.error);
  }
  // Every reason there is, is reached (and has its own name).
  std::set<std::string> names;
  for (std::size_t e = 1; e < static_cast<std::size_t>(DecodeError::count_); ++e) {
    CAPTURE(e);
    CHECK(reached.count(static_cast<DecodeError>(e)) == 1);
    names.insert(proto::to_string(static_cast<DecodeError>(e)));
  }
  CHECK(names.size() == static_cast<std::size_t>(DecodeError::count_) - 1);
  CHECK(names.count("unknown") == 0);
}

TEST_CASE("accepted edges of decode") {
  SUBCASE("opaque bodies and tokens may hold any bytes, NUL and invalid UTF-8 included") {
    check_round_trip(proto::Direct{1, "a", std::string("\0\xFF\xC0\x80{", 5)});
    check_round_trip(proto::Challenge{1, std::string("\0\xFF", 2)});
    check_round_trip(proto::Register{1, "a", {}, 0, std::string("{\0", 2), sig_of(0)});
  }
  SUBCASE("a datagram of exactly kMaxDatagram bytes") {
    proto::Stored s{kMaxU64, kName32, {}};
    const std::size_t item_base = proto::stored_item_size({kName32, true, 0, 0, {}, ""});
    std::size_t left = proto::kMaxDatagram - proto::stored_overhead(kName32);
    while (left >= item_base) {
      const std::size_t body = std::min(proto::kMaxBody, left - item_base);
      s.items.push_back({kName32, true, kMaxI64, kMaxU64, key_of(7), all_bytes(body)});
      left -= item_base + body;
    }
    const std::string bytes = proto::encode(s);
    CAPTURE(left);
    if (left == 0) CHECK(bytes.size() == proto::kMaxDatagram);
    CHECK(bytes.size() <= proto::kMaxDatagram);
    check_round_trip(s);
    const std::string padded = bytes + std::string(proto::kMaxDatagram - bytes.size(), '\0');
    CHECK(refusal(padded + '\0') == DecodeError::too_large);
  }
  SUBCASE("a found not known with an empty name; every ip byte value") {
    check_round_trip(proto::Found{1, false, {}});
    for (int b = 0; b < 256; ++b) {
      const std::string ip = std::to_string(b) + "." + std::to_string(255 - b) + ".0." + std::to_string(b);
      check_round_trip(proto::Found{1, true, {"a", ip, 1, true, {}}});
    }
  }
}

TEST_CASE("encoded_size is exactly the size of encode") {
  std::vector<Message> all = one_of_each();
  all.push_back(proto::Register{1, std::string(400, 'n'), {}, 0, std::string(400, 't'), {}});
  all.push_back(proto::Direct{1, "a", std::string(70000, 'b')});
  all.push_back(proto::RegErr{1, std::string(50, '\xFE') + "ok\xC3"});
  all.push_back(proto::Refused{1, std::string(1000, 'r')});
  all.push_back(proto::Found{1, true, {"a\"", "\x02", 0, true, {}}});
  all.push_back(proto::Stored{1, "a", {{kName1, false, -1, 0, {}, ""}}});
  all.push_back(proto::Table{1, "a", 0, 0, 0, false, max_entries(100)});
  for (const Message& m : all) {
    const std::string type = proto::type_name(m);
    CAPTURE(type);
    CHECK(proto::encoded_size(m) == proto::encode(m).size());
  }
}

TEST_CASE("a 600-byte message, sealed, fits a Direct, a Save and a Stored item under kMaxDatagram") {
  // The body of the longest direct message: 600 + kind, mid, sent_ms (17) + to (1 + 32) + box (40).
  REQUIRE(kSealed600.size() == 600 + 17 + 1 + 32 + 40);
  REQUIRE(kSealed600.size() <= proto::kMaxBody);
  REQUIRE(kSigned600.size() <= proto::kMaxBody);
  const std::vector<std::pair<Message, std::size_t>> largest = {
      {proto::Direct{kMaxU64, kName32, kSealed600}, 10 + 33 + 2 + 690},
      {proto::Save{kMaxU64, kName32, kName32, kMaxU64, true, kSealed600}, 10 + 33 + 33 + 8 + 1 + 2 + 690},
      {proto::Stored{kMaxU64, kName32, {{kName32, false, kMaxI64, kMaxU64, key_of(1), kSealed600}}},
       10 + 33 + 2 + 33 + 1 + 8 + 8 + 32 + 2 + 690},
      {proto::Channel{kMaxU64, kName32, kSigned600}, 10 + 33 + 2 + 672},
      {proto::Relay{kMaxU64, kName32, kName32, kMaxU64, kSigned600}, 10 + 33 + 33 + 8 + 2 + 672},
      {proto::Stored{kMaxU64, kName32, {{kName32, true, kMaxI64, kMaxU64, key_of(1), kSigned600}}},
       10 + 33 + 2 + 33 + 1 + 8 + 8 + 32 + 2 + 672},
  };
  for (const auto& [m, size] : largest) {
    const std::string type = proto::type_name(m);
    CAPTURE(type);
    const std::string bytes = proto::encode(m);
    CHECK(bytes.size() == size);
    CHECK(bytes.size() <= proto::kMaxDatagram);
    check_round_trip(m);
  }
  // Any body decode accepts can be carried on: relayed, saved and delivered as one item.
  CHECK(proto::encoded_size(proto::Save{kMaxU64, kName32, kName32, kMaxU64, true, std::string(proto::kMaxBody, 'x')}) <=
        proto::kMaxDatagram);
  CHECK(proto::encoded_size(proto::Relay{kMaxU64, kName32, kName32, kMaxU64, std::string(proto::kMaxBody, 'x')}) <=
        proto::kMaxDatagram);
  CHECK(proto::stored_overhead(kName32) +
            proto::stored_item_size({kName32, true, kMaxI64, kMaxU64, {}, std::string(proto::kMaxBody, 'x')}) <=
        proto::kMaxDatagram);
  // The Register with the longest token and the Challenge are small; the Challenge is
  // smaller than the shortest Register that asks for it.
  CHECK(proto::encoded_size(proto::Register{kMaxU64, kName32, {}, kMaxU64, std::string(proto::kMaxToken, 't'), {}}) ==
        10 + 33 + 32 + 8 + 1 + 64 + 64);
  CHECK(proto::encoded_size(proto::Challenge{kMaxU64, std::string(proto::kMaxToken, 't')}) == 10 + 1 + 64);
  CHECK(proto::encoded_size(proto::Challenge{kMaxU64, std::string(40, 't')}) <
        proto::encoded_size(proto::Register{kMaxU64, kName1, {}, 0, "", {}}));
}

TEST_CASE("share and address give each recipient exactly the encoding of its own message") {
  std::set<std::string> shared;
  for (Message m : one_of_each()) {
    const std::string type = proto::type_name(m);
    CAPTURE(type);
    bool addressed = false;
    std::visit([&](auto& x) { addressed = requires { x.recipient; }; }, m);
    if (!addressed) {
      CHECK_THROWS_AS(std::ignore = proto::share(m), std::invalid_argument);
      continue;
    }
    shared.insert(type);
    const proto::Shared once = proto::share(m);
    for (const std::string& to : {std::string("a"), std::string("bob"), kName32}) {
      for (std::uint64_t id : {std::uint64_t{1}, std::uint64_t{42}, kMaxU64}) {
        Message want = m;
        std::visit(
            [&](auto& x) {
              if constexpr (requires { x.recipient; }) {
                x.id = id;
                x.recipient = to;
              }
            },
            want);
        const std::string bytes = proto::address(once, id, to);
        CHECK(bytes == proto::encode(want));
        auto d = proto::decode(bytes);
        REQUIRE(d);
        CHECK(*d.message == want);
      }
    }
  }
  CHECK(shared.size() == 5);  // relay, probe, table, stored, file_offer
}

namespace {

class Randomizer {
 public:
  explicit Randomizer(std::uint32_t seed) : rng_(seed) {}
  std::uint64_t u64() {
    switch (below(4)) {
      case 0: return 0;
      case 1: return kMaxU64;
      case 2: return below(1000);
      default: return rng_();
    }
  }
  std::size_t below(std::size_t n) { return std::uniform_int_distribution<std::size_t>(0, n - 1)(rng_); }
  std::string name() {
    static const std::string chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.";
    std::size_t n = below(3) == 0 ? proto::kMaxName : 1 + below(proto::kMaxName);
    std::string s;
    for (std::size_t i = 0; i < n; ++i) s += chars[below(chars.size())];
    if (s[0] == '.') s[0] = 'x';
    return s;
  }
  std::string body(std::size_t max) {
    std::size_t n = below(3) == 0 ? max : below(max + 1);
    std::string s(n, '\0');
    for (char& c : s) c = static_cast<char>(rng_());
    return s;
  }
  proto::Key key() {
    proto::Key k;
    for (auto& b : k) b = static_cast<std::uint8_t>(rng_());
    return k;
  }
  std::string ip() {
    return std::to_string(below(256)) + "." + std::to_string(below(256)) + "." + std::to_string(below(256)) + "." +
           std::to_string(below(256));
  }

 private:
  std::mt19937_64 rng_;
};

}  // namespace

TEST_CASE("stored_overhead and stored_item_size give every Stored datagram's size exactly") {
  Randomizer rnd(20240611);
  CHECK(proto::stored_overhead("a") == 14);
  CHECK(proto::stored_overhead(kName32) == 10 + 33 + 2);
  for (int round = 0; round < 400; ++round) {
    std::vector<proto::StoredItem> items(rnd.below(5));
    std::size_t sum = 0;
    for (auto& item : items) {
      const auto ts = static_cast<std::int64_t>(rnd.u64() >> 1);  // 0 to INT64_MAX, as decode allows
      item = {rnd.name(), rnd.below(2) == 1, ts, rnd.u64(), rnd.key(), rnd.body(proto::kMaxBody)};
      sum += proto::stored_item_size(item);
    }
    const std::uint64_t id = rnd.u64() | 1;
    const std::string to = rnd.name();
    CAPTURE(round);
    CHECK(proto::encode(proto::Stored{id, to, items}).size() == proto::stored_overhead(to) + sum);
  }
  // Packing as the server does: take items while the sum stays within one datagram.
  for (int round = 0; round < 50; ++round) {
    proto::Stored batch{kMaxU64, kName32, {}};
    std::size_t sum = proto::stored_overhead(kName32);
    for (;;) {
      proto::StoredItem item{rnd.name(), true, kMaxI64, kMaxU64, rnd.key(), rnd.body(kSealed600.size())};
      if (sum + proto::stored_item_size(item) > proto::kMaxDatagram) break;
      sum += proto::stored_item_size(item);
      batch.items.push_back(std::move(item));
    }
    REQUIRE_FALSE(batch.items.empty());
    const std::string bytes = proto::encode(batch);
    CHECK(bytes.size() == sum);
    CHECK(bytes.size() <= proto::kMaxDatagram);
    auto d = proto::decode(bytes);
    REQUIRE(d);
    CHECK(*d.message == Message{batch});
  }
}

TEST_CASE("table_overhead and entry_size give every Table datagram's size exactly") {
  Randomizer rnd(20240612);
  CHECK(proto::table_overhead("a") == 39);
  CHECK(proto::table_overhead(kName32) == 10 + 33 + 8 + 8 + 8 + 1 + 2);
  CHECK(proto::entry_size(max_entries(1)[0]) == 33 + 4 + 2 + 1 + 32);
  for (int round = 0; round < 400; ++round) {
    std::vector<proto::Entry> entries(rnd.below(60));
    std::size_t sum = 0;
    for (auto& e : entries) {
      e = {rnd.name(), rnd.below(4) == 0 ? "255.255.255.255" : rnd.ip(),
           static_cast<std::uint16_t>(rnd.below(2) == 0 ? 65535 : 1 + rnd.below(65535)), rnd.below(2) == 1,
           rnd.key()};
      sum += proto::entry_size(e);
    }
    proto::Table t{rnd.u64() | 1, rnd.name(), rnd.u64(), rnd.u64(), rnd.u64(), rnd.below(2) == 1, entries};
    CAPTURE(round);
    CHECK(proto::encode(t).size() == proto::table_overhead(t.recipient) + sum);
  }
  // Packing rows of the longest kind for the longest recipient name: 19 fit one datagram.
  proto::Table t{kMaxU64, kName32, kMaxU64, kMaxU64, kMaxU64, false, {}};
  std::size_t sum = proto::table_overhead(kName32);
  for (const proto::Entry& e : max_entries(100)) {
    if (sum + proto::entry_size(e) > proto::kMaxDatagram) break;
    sum += proto::entry_size(e);
    t.entries.push_back(e);
  }
  CHECK(t.entries.size() == 19);
  const std::string bytes = proto::encode(t);
  CHECK(bytes.size() == sum);
  CHECK(bytes.size() <= proto::kMaxDatagram);
  check_round_trip(t);
}

TEST_CASE("check_text") {
  const std::string limit = std::to_string(proto::kMaxText);
  CHECK(proto::check_text("").empty());
  CHECK(proto::check_text("hello").empty());
  CHECK(proto::check_text(std::string(proto::kMaxText, 'x')).empty());
  // Binary carries control characters, quotes and backslashes as they are: no extra limit.
  CHECK(proto::check_text(std::string(proto::kMaxText, '\x01')).empty());
  CHECK(proto::check_text(std::string(proto::kMaxText, '"')).empty());
  CHECK(proto::check_text(std::string(proto::kMaxText, '\0')).empty());
  std::string emoji;
  while (emoji.size() + 4 <= proto::kMaxText) emoji += "\xF0\x9F\x98\x80";
  CHECK(proto::check_text(emoji).empty());

  std::string why = proto::check_text(std::string(proto::kMaxText + 1, 'x'));
  CHECK(why == "message too long: 601 bytes, the limit is 600 bytes");
  why = proto::check_text(std::string(5000, 'x'));
  CHECK(why.find(limit) != std::string::npos);
  CHECK(why.find("5000") != std::string::npos);
  CHECK(proto::check_text("caf\xC3") == "message is not valid UTF-8 (is the terminal set to UTF-8?)");
  CHECK(proto::check_text(std::string(700, '\xFF')) == "message is not valid UTF-8 (is the terminal set to UTF-8?)");
}

TEST_CASE("valid_name") {
  CHECK(proto::valid_name("a"));
  CHECK(proto::valid_name(kName32));
  CHECK(proto::valid_name("A-Z_0.9"));
  CHECK(proto::valid_name("a."));
  CHECK(proto::valid_name("-"));
  CHECK(proto::valid_name("_"));
  CHECK(proto::valid_name("a..b"));
  CHECK_FALSE(proto::valid_name(""));
  CHECK_FALSE(proto::valid_name(kName33));
  CHECK_FALSE(proto::valid_name("."));
  CHECK_FALSE(proto::valid_name(".."));
  CHECK_FALSE(proto::valid_name(".a"));
  CHECK_FALSE(proto::valid_name("../x"));
  CHECK_FALSE(proto::valid_name("a/b"));
  CHECK_FALSE(proto::valid_name("/"));
  CHECK_FALSE(proto::valid_name("a\\b"));
  CHECK_FALSE(proto::valid_name("a b"));
  CHECK_FALSE(proto::valid_name(std::string("a\0b", 3)));
  CHECK_FALSE(proto::valid_name(std::string(1, '\0')));
  CHECK_FALSE(proto::valid_name("\xC3\xA9"));
  CHECK_FALSE(proto::valid_name("a:b"));
  CHECK_FALSE(proto::valid_name("a\n"));
}

TEST_CASE("valid_ipv4") {
  CHECK(proto::valid_ipv4("127.0.0.1"));
  CHECK(proto::valid_ipv4("0.0.0.0"));
  CHECK(proto::valid_ipv4("255.255.255.255"));
  CHECK(proto::valid_ipv4("198.123.75.45"));
  CHECK_FALSE(proto::valid_ipv4(""));
  CHECK_FALSE(proto::valid_ipv4("1.2.3"));
  CHECK_FALSE(proto::valid_ipv4("1.2.3.4.5"));
  CHECK_FALSE(proto::valid_ipv4("256.0.0.1"));
  CHECK_FALSE(proto::valid_ipv4("1.2.3.-4"));
  CHECK_FALSE(proto::valid_ipv4(" 1.2.3.4"));
  CHECK_FALSE(proto::valid_ipv4("1.2.3.4 "));
  CHECK_FALSE(proto::valid_ipv4("01.2.3.4"));
  CHECK_FALSE(proto::valid_ipv4("0x1.2.3.4"));
  CHECK_FALSE(proto::valid_ipv4("::1"));
  CHECK_FALSE(proto::valid_ipv4("localhost"));
  CHECK_FALSE(proto::valid_ipv4("1.2.3.4:80"));
  CHECK_FALSE(proto::valid_ipv4("1111.2.3.4"));
  CHECK_FALSE(proto::valid_ipv4("100.100.100.1000"));  // 16 characters
  CHECK_FALSE(proto::valid_ipv4(std::string(100, '1')));
  CHECK_FALSE(proto::valid_ipv4(std::string("1.2.3.4\0junk", 12)));
  // The same verdict as inet_pton(AF_INET), on strings made of what an address is made of.
  std::mt19937 rng(12345);
  const std::string alphabet = "0123456789.....x ";
  for (int i = 0; i < 200000; ++i) {
    std::string t(std::uniform_int_distribution<int>(0, 17)(rng), ' ');
    for (auto& c : t) c = alphabet[std::uniform_int_distribution<std::size_t>(0, alphabet.size() - 1)(rng)];
    in_addr a{};
    const bool libc = t.size() <= 15 && inet_pton(AF_INET, t.c_str(), &a) == 1;
    REQUIRE_MESSAGE(proto::valid_ipv4(t) == libc, "\"" << t << "\"");
  }
  // And on near-addresses: four numbers up to 300, some with leading zeros.
  for (int i = 0; i < 100000; ++i) {
    std::string t;
    for (int k = 0; k < 4; ++k) {
      if (k > 0) t += '.';
      if (std::uniform_int_distribution<int>(0, 9)(rng) == 0) t += '0';
      t += std::to_string(std::uniform_int_distribution<int>(0, 300)(rng));
    }
    in_addr a{};
    const bool libc = inet_pton(AF_INET, t.c_str(), &a) == 1;
    REQUIRE_MESSAGE(proto::valid_ipv4(t) == libc, "\"" << t << "\"");
  }
}

TEST_CASE("valid_utf8") {
  CHECK(proto::valid_utf8(""));
  CHECK(proto::valid_utf8("plain ascii"));
  CHECK(proto::valid_utf8(std::string(1, '\0')));
  CHECK(proto::valid_utf8("\x7F"));
  CHECK(proto::valid_utf8("\xC2\x80"));          // U+0080, smallest 2-byte
  CHECK(proto::valid_utf8("\xC3\xA9"));          // é
  CHECK(proto::valid_utf8("\xE0\xA0\x80"));      // U+0800, smallest 3-byte
  CHECK(proto::valid_utf8("\xE2\x82\xAC"));      // €
  CHECK(proto::valid_utf8("\xED\x9F\xBF"));      // U+D7FF, just below the surrogates
  CHECK(proto::valid_utf8("\xEE\x80\x80"));      // U+E000, just above them
  CHECK(proto::valid_utf8("\xEF\xBF\xBD"));      // U+FFFD
  CHECK(proto::valid_utf8("\xF0\x90\x80\x80"));  // U+10000, smallest 4-byte
  CHECK(proto::valid_utf8("\xF0\x9F\x98\x80"));  // 😀
  CHECK(proto::valid_utf8("\xF4\x8F\xBF\xBF"));  // U+10FFFF, the last code point
  CHECK_FALSE(proto::valid_utf8("\x80"));               // lone continuation
  CHECK_FALSE(proto::valid_utf8("a\xBF"));              // lone continuation after ASCII
  CHECK_FALSE(proto::valid_utf8("\xC0\x80"));           // overlong NUL
  CHECK_FALSE(proto::valid_utf8("\xC1\xBF"));           // overlong
  CHECK_FALSE(proto::valid_utf8("\xE0\x9F\xBF"));       // overlong 3-byte
  CHECK_FALSE(proto::valid_utf8("\xF0\x8F\xBF\xBF"));   // overlong 4-byte
  CHECK_FALSE(proto::valid_utf8("\xED\xA0\x80"));       // U+D800
  CHECK_FALSE(proto::valid_utf8("\xED\xBF\xBF"));       // U+DFFF
  CHECK_FALSE(proto::valid_utf8("\xF4\x90\x80\x80"));   // U+110000
  CHECK_FALSE(proto::valid_utf8("\xF7\xBF\xBF\xBF"));   // past U+10FFFF
  CHECK_FALSE(proto::valid_utf8("\xC3"));               // truncated at the end
  CHECK_FALSE(proto::valid_utf8("\xE2\x82"));           // truncated at the end
  CHECK_FALSE(proto::valid_utf8("\xF0\x9F\x98"));       // truncated at the end
  CHECK_FALSE(proto::valid_utf8("\xE2\x82z"));          // truncated in the middle
  CHECK_FALSE(proto::valid_utf8("\xC3\x28"));           // bad continuation
  CHECK_FALSE(proto::valid_utf8("\xF8\x88\x80\x80\x80"));  // 5-byte form
  CHECK_FALSE(proto::valid_utf8("\xFE"));
  CHECK_FALSE(proto::valid_utf8("\xFF"));
}

TEST_CASE("v1_refusal answers a version-1 request as an old client understands it") {
  using nlohmann::json;
  const std::string reason(proto::kV1RefusalReason);
  SUBCASE("register gets reg_err, any other request refused, with its id") {
    CHECK(proto::v1_refusal(R"({"v":1,"t":"register","id":7301,"name":"alice"})") ==
          R"({"v":1,"t":"reg_err","re":7301,"reason":")" + reason + "\"}");
    CHECK(proto::v1_refusal(R"({"v":1,"t":"save","id":18446744073709551615,"from":"a","to":"b","mid":1,"force":false,"text":"x"})") ==
          R"({"v":1,"t":"refused","re":18446744073709551615,"reason":")" + reason + "\"}");
    for (const std::string t : {"dereg", "direct", "channel", "relay", "probe", "table", "stored", "keepalive", "lookup"}) {
      CAPTURE(t);
      auto r = proto::v1_refusal(R"({"v":1,"t":")" + t + R"(","id":42})");
      REQUIRE(r);
      json j = json::parse(*r);
      CHECK(j == json{{"v", 1}, {"t", "refused"}, {"re", 42}, {"reason", reason}});
    }
    // As the old client sent it: keys in any order, padded to 1200 bytes.
    auto r = proto::v1_refusal(std::string(R"({"id":9,"name":"alice","pad":")").append(1150, ' ').append(R"(","t":"register","v":1})"));
    REQUIRE(r);
    json j = json::parse(*r);
    CHECK(j["t"] == "reg_err");
    CHECK(j["re"] == 9);
    CHECK(reason.size() <= proto::kMaxReason);
    CHECK(r->size() < 150);
  }
  SUBCASE("anything else gets nothing") {
    for (const std::string& bytes : std::vector<std::string>{
             std::string(R"({"v":1,"t":"ack","re":5})"),                      // a v1 reply
             std::string(R"({"v":1,"t":"reg_err","re":5,"reason":"x"})"),
             std::string(R"({"v":1,"t":"ack","id":5})"),                      // a reply tag with an id
             std::string(R"({"v":1,"t":"register","id":0,"name":"a"})"),     // id 0
             std::string(R"({"v":1,"t":"register","id":-1})"),
             std::string(R"({"v":1,"t":"register","id":"5"})"),
             std::string(R"({"v":1,"t":"register","id":1.5})"),
             std::string(R"({"v":1,"t":"register"})"),
             std::string(R"({"v":2,"t":"register","id":5})"),
             std::string(R"({"t":"register","id":5})"),
             std::string(R"({"v":"1","t":"register","id":5})"),
             std::string(R"({"v":1,"t":"bogus","id":5})"),
             std::string(R"({"v":1,"t":7,"id":5})"),
             std::string(R"({"v":1,"t":"register","id":5)"),                  // not JSON
             std::string(R"( {"v":1,"t":"register","id":5})"),               // not as v1 wrote it
             std::string(R"([{"v":1,"t":"register","id":5}])"),
             std::string("{\"v\":1,\"t\":\"register\",\"id\":5,\"name\":\"\xFF\"}"),  // bad UTF-8
             std::string(R"({"v":1,"t":"register","id":5,"x":[[[[[1]]]]]})"),        // too deep
             std::string(200, '{'),
             std::string("{") + std::string(2000, ' ') + "}",
             std::string("{"),
             std::string(""),
             proto::encode(proto::Register{5, "alice", {}, 0, "", {}}),
             proto::encode(proto::Probe{5, "a"}),
         }) {
      CAPTURE(bytes);
      std::optional<std::string> r;
      REQUIRE_NOTHROW(r = proto::v1_refusal(bytes));
      CHECK_FALSE(r);
    }
  }
}

}  // TEST_SUITE
