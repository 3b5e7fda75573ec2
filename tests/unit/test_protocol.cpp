// Unit tests of the wire codec: round trips, a table of malformed datagrams, validators, sizes, id rewriting.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <variant>
#include <vector>

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

// Texts that stress the escaper: UTF-8, runs of spaces, quotes, backslashes, control characters,
// and brackets that must not count as JSON nesting.
const std::vector<std::string> kTrickyTexts = {
    "",
    "hello",
    "h\xC3\xA9llo w\xC3\xB6rld \xE4\xBD\xA0\xE5\xA5\xBD \xF0\x9F\x98\x80 \xF4\x8F\xBF\xBF",
    "   leading, trailing and    inner   runs of spaces   ",
    "\"quoted\" and 'single' and \"\"\"",
    "back\\slash\\\\ and a trailing backslash\\",
    "\\\"",
    "tab\there\ttab\t\t",
    "\r\n\b\f",
    std::string("nul\0inside", 10),
    "\x01\x02\x1f\x7f",
    "[[[[[[[[[[{{{{{{{{{{ not nesting }}}}}]]]]]",
    "\\u0000 is not an escape here, \\n neither",
    "/slashes/ and <html> & {json}",
    std::string(proto::kMaxText, 'x'),
};

// Encodes and decodes `m`; the result must be `m` again, and the wire tag must be its type name.
void check_round_trip(const Message& m) {
  std::string bytes;
  REQUIRE_NOTHROW(bytes = proto::encode(m));
  INFO("encoded: ", bytes);
  CHECK(bytes.size() <= proto::kMaxDatagram);
  CHECK(bytes.find(std::string("\"t\":\"") + proto::type_name(m) + "\"") != std::string::npos);
  proto::Decoded d;
  REQUIRE_NOTHROW(d = proto::decode(bytes));
  CHECK(d.error == DecodeError::none);
  REQUIRE(d);
  CHECK(d.message->index() == m.index());
  CHECK(*d.message == m);
}

// Wraps a message body in the version field.
std::string v1(const std::string& body) { return "{\"v\":1," + body + "}"; }

struct Bad {
  std::string label;
  std::string bytes;
  DecodeError want;
};

std::vector<Bad> malformed_inputs() {
  std::vector<Bad> t;
  const std::string direct_head = R"("t":"direct","id":1,"from":"a","text":")";

  // ---- framing: size, encoding, nesting, syntax
  t.push_back({"empty", "", DecodeError::empty});
  {
    std::mt19937 rng(20240607);
    std::uniform_int_distribution<int> byte(0, 255);
    std::string garbage(64 * 1024, '\0');
    for (char& c : garbage) c = static_cast<char>(byte(rng));
    t.push_back({"64 KiB random garbage", garbage, DecodeError::too_large});
  }
  {
    std::string valid = proto::encode(proto::Probe{1});
    std::string over = valid + std::string(proto::kMaxDatagram + 1 - valid.size(), ' ');
    REQUIRE(over.size() == proto::kMaxDatagram + 1);
    t.push_back({"valid message padded to kMaxDatagram+1", over, DecodeError::too_large});
  }
  t.push_back({"lone continuation byte", v1(direct_head + "a\x80z\""), DecodeError::invalid_utf8});
  t.push_back({"overlong 2-byte '/'", v1(direct_head + "\xC0\xAF\""), DecodeError::invalid_utf8});
  t.push_back({"overlong 2-byte NUL", v1(direct_head + "\xC0\x80\""), DecodeError::invalid_utf8});
  t.push_back({"overlong 3-byte", v1(direct_head + "\xE0\x80\xAF\""), DecodeError::invalid_utf8});
  t.push_back({"overlong 4-byte", v1(direct_head + "\xF0\x8F\xBF\xBF\""), DecodeError::invalid_utf8});
  t.push_back({"high surrogate half", v1(direct_head + "\xED\xA0\x80\""), DecodeError::invalid_utf8});
  t.push_back({"low surrogate half", v1(direct_head + "\xED\xBF\xBF\""), DecodeError::invalid_utf8});
  t.push_back({"truncated 3-byte sequence mid-string", v1(direct_head + "\xE2\x82\""),
               DecodeError::invalid_utf8});
  t.push_back({"truncated 4-byte sequence at the very end",
               v1(direct_head + "x\"") + "\xF0\x9F\x98", DecodeError::invalid_utf8});
  t.push_back({"code point past U+10FFFF", v1(direct_head + "\xF4\x90\x80\x80\""),
               DecodeError::invalid_utf8});
  t.push_back({"0xFF byte", v1(direct_head + "\xFF\""), DecodeError::invalid_utf8});
  t.push_back({"5-byte lead", v1(direct_head + "\xF8\x88\x80\x80\x80\""), DecodeError::invalid_utf8});
  t.push_back({"bad continuation", v1(direct_head + "\xC3\x28\""), DecodeError::invalid_utf8});
  // 1000 deep does not fit a datagram: the size check refuses it before anything is parsed.
  t.push_back({"[[[...]]] 1000 deep", std::string(1000, '[') + std::string(1000, ']'),
               DecodeError::too_large});
  {
    std::string s;
    for (int i = 0; i < 1000; ++i) s += "{\"a\":";
    s.append("1").append(1000, '}');  // not "1" + string: GCC 12's false -Wrestrict at -O3
    t.push_back({"{\"a\":{\"a\":...}} 1000 deep", s, DecodeError::too_large});
  }
  t.push_back({"[[[...]]] 700 deep (fits a datagram)", std::string(700, '[') + std::string(700, ']'),
               DecodeError::too_deep});
  {
    std::string s;
    for (int i = 0; i < 200; ++i) s += "{\"a\":";
    s.append("1").append(200, '}');
    t.push_back({"{\"a\":{\"a\":...}} 200 deep (fits a datagram)", s, DecodeError::too_deep});
  }
  t.push_back({"unclosed brackets only", "[[[[[[[[", DecodeError::too_deep});
  t.push_back({"depth 5 inside a valid message", v1(R"("t":"probe","id":1,"x":[[[[1]]]])"),
               DecodeError::too_deep});
  t.push_back({"table entry nested one level too deep",
               v1(R"("t":"table","id":1,"epoch":1,"from":0,"to":1,"more":false,"e":[[[["a","1.2.3.4",5,1]]]])"),
               DecodeError::too_deep});
  t.push_back({"not JSON", "hello, server", DecodeError::not_json});
  t.push_back({"truncated JSON", R"({"v":1,"t":"probe","id":1)", DecodeError::not_json});
  t.push_back({"trailing garbage", R"({"v":1,"t":"probe","id":1} x)", DecodeError::not_json});
  t.push_back({"two objects", R"({"v":1,"t":"probe","id":1}{"v":1,"t":"probe","id":2})",
               DecodeError::not_json});
  t.push_back({"raw control character in a string", v1(direct_head + "a\x01z\""),
               DecodeError::not_json});
  t.push_back({"single NUL byte", std::string(1, '\0'), DecodeError::not_json});
  t.push_back({"escaped lone surrogate", v1(direct_head + R"(\ud800")"), DecodeError::not_json});
  t.push_back({"huge number 1e400", v1(R"("t":"probe","id":1e400)"), DecodeError::not_json});
  t.push_back({"single quotes", R"({'v':1,'t':'probe','id':1})", DecodeError::not_json});
  t.push_back({"top-level array", R"([1,2,3])", DecodeError::not_object});
  t.push_back({"top-level string", R"("probe")", DecodeError::not_object});
  t.push_back({"top-level number", "42", DecodeError::not_object});
  t.push_back({"top-level null", "null", DecodeError::not_object});
  t.push_back({"top-level true", "true", DecodeError::not_object});

  // ---- envelope: version and type
  t.push_back({"missing v", R"({"t":"probe","id":1})", DecodeError::bad_version});
  t.push_back({"v=2", R"({"v":2,"t":"probe","id":1})", DecodeError::bad_version});
  t.push_back({"v=\"1\"", R"({"v":"1","t":"probe","id":1})", DecodeError::bad_version});
  t.push_back({"v=-1", R"({"v":-1,"t":"probe","id":1})", DecodeError::bad_version});
  t.push_back({"v=1.0", R"({"v":1.0,"t":"probe","id":1})", DecodeError::bad_version});
  t.push_back({"v=true", R"({"v":true,"t":"probe","id":1})", DecodeError::bad_version});
  t.push_back({"v=0", R"({"v":0,"t":"probe","id":1})", DecodeError::bad_version});
  t.push_back({"empty object", "{}", DecodeError::bad_version});
  t.push_back({"missing t", v1(R"("id":1)"), DecodeError::unknown_type});
  t.push_back({"t=5", v1(R"("t":5,"id":1)"), DecodeError::unknown_type});
  t.push_back({"unknown t", v1(R"("t":"bogus","id":1)"), DecodeError::unknown_type});
  t.push_back({"empty t", v1(R"("t":"","id":1)"), DecodeError::unknown_type});
  t.push_back({"t in upper case", v1(R"("t":"PROBE","id":1)"), DecodeError::unknown_type});

  // ---- ids
  t.push_back({"missing id", v1(R"("t":"probe")"), DecodeError::missing_field});
  t.push_back({"id=0", v1(R"("t":"probe","id":0)"), DecodeError::bad_value});
  t.push_back({"id negative", v1(R"("t":"probe","id":-1)"), DecodeError::wrong_type});
  t.push_back({"id as string", v1(R"("t":"probe","id":"1")"), DecodeError::wrong_type});
  t.push_back({"id float", v1(R"("t":"probe","id":1.5)"), DecodeError::wrong_type});
  t.push_back({"id null", v1(R"("t":"probe","id":null)"), DecodeError::wrong_type});
  t.push_back({"id bool", v1(R"("t":"probe","id":true)"), DecodeError::wrong_type});
  t.push_back({"id past uint64", v1(R"("t":"probe","id":99999999999999999999999)"),
               DecodeError::wrong_type});
  t.push_back({"id UINT64_MAX+1", v1(R"("t":"probe","id":18446744073709551616)"),
               DecodeError::wrong_type});
  t.push_back({"request with re instead of id", v1(R"("t":"register","re":1,"name":"a")"),
               DecodeError::missing_field});
  t.push_back({"reply with id instead of re", v1(R"("t":"ack","id":1)"), DecodeError::missing_field});
  t.push_back({"ack re=0", v1(R"("t":"ack","re":0)"), DecodeError::bad_value});

  // ---- names
  t.push_back({"name empty", v1(R"("t":"register","id":1,"name":"")"), DecodeError::bad_name});
  t.push_back({"name 33 chars", v1(R"("t":"register","id":1,"name":")" + kName33 + "\""),
               DecodeError::bad_name});
  t.push_back({"name starting with '.'", v1(R"("t":"register","id":1,"name":".hidden")"),
               DecodeError::bad_name});
  t.push_back({"name with '/'", v1(R"("t":"register","id":1,"name":"a/b")"), DecodeError::bad_name});
  t.push_back({"name ../x", v1(R"("t":"register","id":1,"name":"../x")"), DecodeError::bad_name});
  t.push_back({"name ..", v1(R"("t":"dereg","id":1,"name":"..")"), DecodeError::bad_name});
  t.push_back({"name with NUL", v1(R"("t":"register","id":1,"name":"a\u0000b")"),
               DecodeError::bad_name});
  t.push_back({"name with space", v1(R"("t":"register","id":1,"name":"a b")"), DecodeError::bad_name});
  t.push_back({"name with backslash", v1(R"("t":"register","id":1,"name":"a\\b")"),
               DecodeError::bad_name});
  t.push_back({"name non-ASCII", v1("\"t\":\"register\",\"id\":1,\"name\":\"\xC3\xA9\""),
               DecodeError::bad_name});
  t.push_back({"name as number", v1(R"("t":"register","id":1,"name":7)"), DecodeError::wrong_type});
  t.push_back({"missing name", v1(R"("t":"register","id":1)"), DecodeError::missing_field});
  t.push_back({"register pad as number", v1(R"("t":"register","id":1,"name":"a","pad":12)"),
               DecodeError::wrong_type});
  t.push_back({"direct from ../x", v1(R"("t":"direct","id":1,"from":"../x","text":"hi")"),
               DecodeError::bad_name});
  t.push_back({"save to /etc", v1(R"("t":"save","id":1,"from":"a","to":"/etc","mid":1,"force":false,"text":"x")"),
               DecodeError::bad_name});
  t.push_back({"exists with bad name", v1(R"("t":"exists","re":1,"name":".x")"), DecodeError::bad_name});

  // ---- texts
  t.push_back({"direct text kMaxText+1", v1(direct_head + std::string(proto::kMaxText + 1, 'x') + "\""),
               DecodeError::text_too_long});
  t.push_back({"channel text kMaxText+1",
               v1(R"("t":"channel","id":1,"from":"a","text":")" + std::string(proto::kMaxText + 1, 'x') + "\""),
               DecodeError::text_too_long});
  t.push_back({"reg_err reason kMaxReason+1",
               v1(R"("t":"reg_err","re":1,"reason":")" + std::string(proto::kMaxReason + 1, 'r') + "\""),
               DecodeError::text_too_long});
  t.push_back({"text as number", v1(R"("t":"direct","id":1,"from":"a","text":5)"), DecodeError::wrong_type});
  t.push_back({"missing text", v1(R"("t":"channel","id":1,"from":"a")"), DecodeError::missing_field});

  // ---- save / relay / reg_ok fields
  t.push_back({"save without force", v1(R"("t":"save","id":1,"from":"a","to":"b","mid":1,"text":"x")"),
               DecodeError::missing_field});
  t.push_back({"save force as string", v1(R"("t":"save","id":1,"from":"a","to":"b","mid":1,"force":"true","text":"x")"),
               DecodeError::wrong_type});
  t.push_back({"save force as 1", v1(R"("t":"save","id":1,"from":"a","to":"b","mid":1,"force":1,"text":"x")"),
               DecodeError::wrong_type});
  t.push_back({"relay mid negative", v1(R"("t":"relay","id":1,"from":"a","mid":-3,"text":"x")"),
               DecodeError::wrong_type});
  t.push_back({"reg_ok without pending", v1(R"("t":"reg_ok","re":1,"epoch":1)"), DecodeError::missing_field});

  // ---- table
  const std::string table_head = R"("t":"table","id":1,"epoch":1,"from":0,"to":3,"more":false,)";
  t.push_back({"table entry with bad ip", v1(table_head + R"("e":[["a","1.2.3",5,1]])"), DecodeError::bad_value});
  t.push_back({"table entry with ip 256.1.1.1", v1(table_head + R"("e":[["a","256.1.1.1",5,1]])"),
               DecodeError::bad_value});
  t.push_back({"table entry with ip as number", v1(table_head + R"("e":[["a",16909060,5,1]])"),
               DecodeError::wrong_type});
  t.push_back({"table entry with port 0", v1(table_head + R"("e":[["a","1.2.3.4",0,1]])"), DecodeError::bad_value});
  t.push_back({"table entry with port 70000", v1(table_head + R"("e":[["a","1.2.3.4",70000,1]])"),
               DecodeError::bad_value});
  t.push_back({"table entry with port -1", v1(table_head + R"("e":[["a","1.2.3.4",-1,1]])"),
               DecodeError::wrong_type});
  t.push_back({"table entry with online 2", v1(table_head + R"("e":[["a","1.2.3.4",5,2]])"),
               DecodeError::bad_value});
  t.push_back({"table entry with online true", v1(table_head + R"("e":[["a","1.2.3.4",5,true]])"),
               DecodeError::wrong_type});
  t.push_back({"table entry with 3 fields", v1(table_head + R"("e":[["a","1.2.3.4",5]])"), DecodeError::wrong_type});
  t.push_back({"table entry with 5 fields", v1(table_head + R"("e":[["a","1.2.3.4",5,1,1]])"),
               DecodeError::wrong_type});
  t.push_back({"table entry as object", v1(table_head + R"("e":[{"name":"a"}])"), DecodeError::wrong_type});
  t.push_back({"table entry with bad name", v1(table_head + R"("e":[["a/b","1.2.3.4",5,1]])"),
               DecodeError::bad_name});
  t.push_back({"table bad entry after a good one",
               v1(table_head + R"("e":[["a","1.2.3.4",5,1],["b","1.2.3.4",0,1]])"), DecodeError::bad_value});
  t.push_back({"table e not an array", v1(table_head + R"("e":{})"), DecodeError::wrong_type});
  t.push_back({"table without e", v1(R"("t":"table","id":1,"epoch":1,"from":0,"to":3,"more":false)"),
               DecodeError::missing_field});
  t.push_back({"table with to < from", v1(R"("t":"table","id":1,"epoch":1,"from":5,"to":4,"more":false,"e":[])"),
               DecodeError::bad_value});
  t.push_back({"table more as 0", v1(R"("t":"table","id":1,"epoch":1,"from":0,"to":4,"more":0,"e":[])"),
               DecodeError::wrong_type});

  // ---- stored
  t.push_back({"stored item with kind 2", v1(R"("t":"stored","id":1,"items":[["a",2,5,1,"x"]])"),
               DecodeError::bad_value});
  t.push_back({"stored item with 4 fields", v1(R"("t":"stored","id":1,"items":[["a",0,5,1]])"),
               DecodeError::wrong_type});
  t.push_back({"stored item ts negative", v1(R"("t":"stored","id":1,"items":[["a",0,-5,1,"x"]])"),
               DecodeError::wrong_type});
  t.push_back({"stored item ts past INT64_MAX",
               v1(R"("t":"stored","id":1,"items":[["a",0,9223372036854775808,1,"x"]])"), DecodeError::bad_value});
  t.push_back({"stored item text too long",
               v1(R"("t":"stored","id":1,"items":[["a",0,5,1,")" + std::string(proto::kMaxText + 1, 'x') + "\"]]"),
               DecodeError::text_too_long});
  t.push_back({"stored items not an array", v1(R"("t":"stored","id":1,"items":"x")"), DecodeError::wrong_type});

  // ---- ack
  t.push_back({"ack with epoch but no have", v1(R"("t":"ack","re":1,"epoch":3)"), DecodeError::missing_field});
  t.push_back({"ack with have but no epoch", v1(R"("t":"ack","re":1,"have":3)"), DecodeError::missing_field});
  t.push_back({"ack with epoch as string", v1(R"("t":"ack","re":1,"epoch":"3","have":3)"),
               DecodeError::wrong_type});
  t.push_back({"ack missed negative", v1(R"("t":"ack","re":1,"missed":-1)"), DecodeError::wrong_type});
  t.push_back({"ack missed as string", v1(R"("t":"ack","re":1,"missed":"2")"), DecodeError::wrong_type});
  t.push_back({"ack missed fractional", v1(R"("t":"ack","re":1,"epoch":3,"have":3,"missed":1.5)"),
               DecodeError::wrong_type});
  t.push_back({"ack missed null", v1(R"("t":"ack","re":1,"missed":null)"), DecodeError::wrong_type});


  // ---- keepalive and lookup (requests carrying a name)
  for (const std::string tag : {"keepalive", "lookup"}) {
    const std::string head = "\"t\":\"" + tag + "\",";
    t.push_back({tag + " missing id", v1(head + R"("name":"a")"), DecodeError::missing_field});
    t.push_back({tag + " id=0", v1(head + R"("id":0,"name":"a")"), DecodeError::bad_value});
    t.push_back({tag + " id as string", v1(head + R"("id":"1","name":"a")"), DecodeError::wrong_type});
    t.push_back({tag + " with re instead of id", v1(head + R"("re":1,"name":"a")"), DecodeError::missing_field});
    t.push_back({tag + " missing name", v1(head + R"("id":1)"), DecodeError::missing_field});
    t.push_back({tag + " name as number", v1(head + R"("id":1,"name":7)"), DecodeError::wrong_type});
    t.push_back({tag + " name empty", v1(head + R"("id":1,"name":"")"), DecodeError::bad_name});
    t.push_back({tag + " name ../x", v1(head + R"("id":1,"name":"../x")"), DecodeError::bad_name});
    t.push_back({tag + " name 33 chars", v1(head + R"("id":1,"name":")" + kName33 + "\""), DecodeError::bad_name});
  }

  // ---- alive
  t.push_back({"alive missing re", v1(R"("t":"alive","live":true)"), DecodeError::missing_field});
  t.push_back({"alive with id instead of re", v1(R"("t":"alive","id":1,"live":true)"), DecodeError::missing_field});
  t.push_back({"alive re=0", v1(R"("t":"alive","re":0,"live":true)"), DecodeError::bad_value});
  t.push_back({"alive missing live", v1(R"("t":"alive","re":1)"), DecodeError::missing_field});
  t.push_back({"alive live as 1", v1(R"("t":"alive","re":1,"live":1)"), DecodeError::wrong_type});
  t.push_back({"alive live as string", v1(R"("t":"alive","re":1,"live":"false")"), DecodeError::wrong_type});

  // ---- found
  t.push_back({"found missing re", v1(R"("t":"found","known":false)"), DecodeError::missing_field});
  t.push_back({"found re=0", v1(R"("t":"found","re":0,"known":false)"), DecodeError::bad_value});
  t.push_back({"found missing known", v1(R"("t":"found","re":1,"e":["a","1.2.3.4",5,1])"),
               DecodeError::missing_field});
  t.push_back({"found known as 1", v1(R"("t":"found","re":1,"known":1,"e":["a","1.2.3.4",5,1])"),
               DecodeError::wrong_type});
  t.push_back({"found known without e", v1(R"("t":"found","re":1,"known":true)"), DecodeError::missing_field});
  t.push_back({"found known with e not an array", v1(R"("t":"found","re":1,"known":true,"e":"a")"),
               DecodeError::wrong_type});
  t.push_back({"found known with a 3-element e", v1(R"("t":"found","re":1,"known":true,"e":["a","1.2.3.4",5])"),
               DecodeError::wrong_type});
  t.push_back({"found known with e nested in a list", v1(R"("t":"found","re":1,"known":true,"e":[["a","1.2.3.4",5,1]])"),
               DecodeError::wrong_type});
  t.push_back({"found entry with bad name", v1(R"("t":"found","re":1,"known":true,"e":["a/b","1.2.3.4",5,1])"),
               DecodeError::bad_name});
  t.push_back({"found entry with bad ip", v1(R"("t":"found","re":1,"known":true,"e":["a","1.2.3",5,1])"),
               DecodeError::bad_value});
  t.push_back({"found entry with port 0", v1(R"("t":"found","re":1,"known":true,"e":["a","1.2.3.4",0,1])"),
               DecodeError::bad_value});
  t.push_back({"found entry with online 2", v1(R"("t":"found","re":1,"known":true,"e":["a","1.2.3.4",5,2])"),
               DecodeError::bad_value});
  t.push_back({"found known with a name beside e",
               v1(R"("t":"found","re":1,"known":true,"name":"a","e":["a","1.2.3.4",5,1])"), DecodeError::bad_value});
  t.push_back({"found unknown with an e", v1(R"("t":"found","re":1,"known":false,"e":["a","1.2.3.4",5,1])"),
               DecodeError::bad_value});
  t.push_back({"found unknown with bad name", v1(R"("t":"found","re":1,"known":false,"name":".x")"),
               DecodeError::bad_name});
  t.push_back({"found unknown with empty name", v1(R"("t":"found","re":1,"known":false,"name":"")"),
               DecodeError::bad_name});
  t.push_back({"found unknown with name as number", v1(R"("t":"found","re":1,"known":false,"name":3)"),
               DecodeError::wrong_type});
  return t;
}

// At least one message of every type, with edge values (tested to cover the whole variant).
std::vector<Message> one_of_each() {
  return {
      proto::Register{1, kName1},
      proto::Register{kMaxU64, kName32, 300},
      proto::Register{2, kName1, 0, 500},
      proto::Dereg{2, kName32},
      proto::Direct{3, kName1, "\"quoted\" \\ and \x01"},
      proto::Save{4, kName1, kName32, kMaxU64, true, "h\xC3\xA9llo"},
      proto::Save{5, kName32, kName1, 0, false, ""},
      proto::Channel{6, kName32, std::string(proto::kMaxText, 'c')},
      proto::Relay{7, kName32, kMaxU64, "\t\n"},
      proto::Probe{kMaxU64},
      proto::Table{8, kMaxU64, 1, 2, true, {{kName32, "255.255.255.255", 65535, true}, {kName1, "1.2.3.4", 1, false}}},
      proto::Table{9, 0, 0, 0, false, {}},
      proto::Stored{10, {{kName32, true, kMaxI64, kMaxU64, "s\\"}, {kName1, false, 0, 0, ""}}},
      proto::Stored{11, {}},
      proto::KeepAlive{12, kName32},
      proto::KeepAlive{kMaxU64, kName1},
      proto::Lookup{13, kName1},
      proto::Lookup{kMaxU64, kName32},
      proto::Ack{14},
      proto::Ack{15, 4, 5, 0},
      proto::Ack{16, 0, 0, 3},
      proto::Ack{kMaxU64, kMaxU64, kMaxU64, kMaxU64},
      proto::RegOk{17, 1, 2},
      proto::RegOk{18, kMaxU64, 0},
      proto::RegErr{19, "no"},
      proto::Exists{20, kName1},
      proto::Refused{21, std::string(proto::kMaxReason, '\x01')},
      proto::Alive{22, true},
      proto::Alive{kMaxU64, false},
      proto::Found{23, true, {kName32, "10.0.0.1", 6001, true}},
      proto::Found{24, true, {kName1, "0.0.0.0", 1, false}},
      proto::Found{25, false, {kName32, "", 0, false}},
      proto::Found{26, false, {}},
  };
}

// Sets the request id of `m` (which must be a request).
void set_id(Message& m, std::uint64_t id) {
  std::visit(
      [id](auto& x) {
        if constexpr (requires { x.id; }) x.id = id;
      },
      m);
}

}  // namespace

TEST_SUITE("protocol") {

TEST_CASE("every message type survives a round trip") {
  SUBCASE("register and dereg, names of length 1 and 32") {
    check_round_trip(proto::Register{1, kName1});
    check_round_trip(proto::Register{kMaxU64, kName32});
    check_round_trip(proto::Register{3, kName32, 1});                      // padded by one byte
    check_round_trip(proto::Register{4, kName1, proto::kRegisterPadTo});  // padded as the client does
    check_round_trip(proto::Register{5, kName1, 0, 15'000});              // with its keep-alive interval
    check_round_trip(proto::Register{6, kName32, 100, kMaxU64});
    CHECK(proto::encode(proto::Register{7, kName1}).find("every") == std::string::npos);  // absent when 0
    check_round_trip(proto::Dereg{2, kName1});
    check_round_trip(proto::Dereg{kMaxU64, kName32});
  }
  SUBCASE("direct, channel, save and relay with tricky texts") {
    std::uint64_t id = 1;
    for (const std::string& text : kTrickyTexts) {
      CAPTURE(text);
      check_round_trip(proto::Direct{id++, kName32, text});
      check_round_trip(proto::Channel{id++, kName1, text});
      check_round_trip(proto::Save{id++, kName1, kName32, id * 7, false, text});
      check_round_trip(proto::Save{id++, kName32, kName1, kMaxU64, true, text});
      check_round_trip(proto::Relay{id++, kName32, kMaxU64, text});
    }
  }
  SUBCASE("probe") {
    check_round_trip(proto::Probe{1});
    check_round_trip(proto::Probe{kMaxU64});
  }
  SUBCASE("table with no, one and several entries") {
    check_round_trip(proto::Table{1, 0, 0, 0, false, {}});
    check_round_trip(proto::Table{2, 7, 3, 3, true, {{kName1, "10.0.0.1", 1, true}}});
    check_round_trip(proto::Table{kMaxU64, kMaxU64, 5, kMaxU64, false,
                                  {{kName1, "127.0.0.1", 1024, true},
                                   {kName32, "255.255.255.255", 65535, false},
                                   {"c-3.x_y", "0.0.0.0", 1, false},
                                   {"Bob", "192.168.1.20", 50000, true}}});
  }
  SUBCASE("stored with no, one and several items") {
    check_round_trip(proto::Stored{1, {}});
    check_round_trip(proto::Stored{2, {{kName1, false, 0, 0, ""}}});
    std::vector<proto::StoredItem> items;
    std::int64_t ts = 1'700'000'000'000'000;
    for (const std::string& text : kTrickyTexts) {
      if (text.size() > 200) continue;  // several items must still fit one datagram
      items.push_back({items.size() % 2 ? kName1 : kName32, items.size() % 3 == 0, ts++, items.size() + 1, text});
    }
    items.push_back({kName32, true, kMaxI64, kMaxU64, "last"});
    REQUIRE(items.size() > 5);
    check_round_trip(proto::Stored{kMaxU64, items});
  }
  SUBCASE("ack with and without epoch/have") {
    check_round_trip(proto::Ack{1, 0, 0});
    check_round_trip(proto::Ack{kMaxU64, 0, 0});
    check_round_trip(proto::Ack{3, 9, 42});
    check_round_trip(proto::Ack{4, 9, 0});
    check_round_trip(proto::Ack{5, 0, 42});
    check_round_trip(proto::Ack{6, kMaxU64, kMaxU64});
    // Without epoch/have the fields are left out of the datagram.
    CHECK(proto::encode(proto::Ack{1, 0, 0}).find("epoch") == std::string::npos);
    CHECK(proto::encode(proto::Ack{1, 0, 0}).find("have") == std::string::npos);
    // Sent explicitly as zeros, they decode to the same Ack.
    auto d = proto::decode(v1(R"("t":"ack","re":8,"epoch":0,"have":0)"));
    REQUIRE(d);
    CHECK(*d.message == Message{proto::Ack{8, 0, 0}});
  }
  SUBCASE("keepalive and lookup") {
    check_round_trip(proto::KeepAlive{1, kName1});
    check_round_trip(proto::KeepAlive{kMaxU64, kName32});
    check_round_trip(proto::Lookup{2, kName1});
    check_round_trip(proto::Lookup{kMaxU64, kName32});
  }
  SUBCASE("alive") {
    check_round_trip(proto::Alive{1, true});
    check_round_trip(proto::Alive{kMaxU64, false});
  }
  SUBCASE("found, known and not") {
    check_round_trip(proto::Found{1, true, {kName1, "127.0.0.1", 1, true}});
    check_round_trip(proto::Found{kMaxU64, true, {kName32, "255.255.255.255", 65535, false}});
    check_round_trip(proto::Found{2, false, {kName32, "", 0, false}});
    check_round_trip(proto::Found{3, false, {}});
    // Not known: no row on the wire, only the name if there is one.
    const std::string unknown = proto::encode(proto::Found{4, false, {"bob", "", 0, false}});
    CHECK(unknown == R"({"v":1,"t":"found","re":4,"known":false,"name":"bob"})");
    CHECK(proto::encode(proto::Found{4, false, {}}) == R"({"v":1,"t":"found","re":4,"known":false})");
    // So an unknown Found carrying a stray address loses it, and keeps its name.
    auto d = proto::decode(proto::encode(proto::Found{5, false, {"bob", "1.2.3.4", 9, true}}));
    REQUIRE(d);
    CHECK(*d.message == Message{proto::Found{5, false, {"bob", "", 0, false}}});
    CHECK(proto::encode(proto::Found{6, true, {"bob", "1.2.3.4", 9, true}}) ==
          R"({"v":1,"t":"found","re":6,"known":true,"e":["bob","1.2.3.4",9,1]})");
  }
  SUBCASE("ack missed") {
    check_round_trip(proto::Ack{1, 0, 0, 1});
    check_round_trip(proto::Ack{2, 0, 0, kMaxU64});
    check_round_trip(proto::Ack{3, 9, 42, 7});
    // On the wire only when set.
    CHECK(proto::encode(proto::Ack{1, 0, 0, 0}).find("missed") == std::string::npos);
    CHECK(proto::encode(proto::Ack{1, 0, 0, 5}).find(R"("missed":5)") != std::string::npos);
    CHECK(proto::encode(proto::Ack{1, 0, 0, 5}).find("epoch") == std::string::npos);
    // Sent explicitly as 0, it decodes to the same message.
    auto d = proto::decode(v1(R"("t":"ack","re":8,"missed":0)"));
    REQUIRE(d);
    CHECK(*d.message == Message{proto::Ack{8, 0, 0, 0}});
  }
  SUBCASE("replies") {
    check_round_trip(proto::RegOk{1, 0, 0});
    check_round_trip(proto::RegOk{kMaxU64, kMaxU64, kMaxU64});
    check_round_trip(proto::RegErr{2, "name \"bob\" is taken\tby\\someone \xE2\x9C\x93"});
    check_round_trip(proto::RegErr{3, ""});
    check_round_trip(proto::RegErr{4, std::string(proto::kMaxReason, '\x01')});
    check_round_trip(proto::Exists{5, kName1});
    check_round_trip(proto::Exists{kMaxU64, kName32});
    check_round_trip(proto::Refused{6, "store full"});
    check_round_trip(proto::Refused{7, std::string(proto::kMaxReason, 'r')});
  }
}

TEST_CASE("request_id, reply_to and type_name") {
  CHECK(proto::request_id(proto::Direct{42, "a", "x"}) == 42);
  CHECK(proto::reply_to(proto::Direct{42, "a", "x"}) == 0);
  CHECK(proto::request_id(proto::Ack{43, 0, 0}) == 0);
  CHECK(proto::reply_to(proto::Ack{43, 0, 0}) == 43);
  CHECK(proto::reply_to(proto::Refused{44, "no"}) == 44);
  CHECK(std::string(proto::type_name(proto::Register{})) == "register");
  CHECK(std::string(proto::type_name(proto::Stored{})) == "stored");
  CHECK(std::string(proto::type_name(proto::RegErr{})) == "reg_err");
  CHECK(std::string(proto::type_name(proto::Refused{})) == "refused");
  CHECK(std::string(proto::to_string(DecodeError::too_deep)) == "too_deep");
  CHECK(std::string(proto::to_string(DecodeError::count_)) == "unknown");

  CHECK(proto::request_id(proto::KeepAlive{45, "a"}) == 45);
  CHECK(proto::reply_to(proto::KeepAlive{45, "a"}) == 0);
  CHECK(proto::request_id(proto::Lookup{46, "a"}) == 46);
  CHECK(proto::reply_to(proto::Lookup{46, "a"}) == 0);
  CHECK(proto::request_id(proto::Alive{47, true}) == 0);
  CHECK(proto::reply_to(proto::Alive{47, true}) == 47);
  CHECK(proto::request_id(proto::Found{48, false, {}}) == 0);
  CHECK(proto::reply_to(proto::Found{48, false, {}}) == 48);
  CHECK(std::string(proto::type_name(proto::KeepAlive{})) == "keepalive");
  CHECK(std::string(proto::type_name(proto::Lookup{})) == "lookup");
  CHECK(std::string(proto::type_name(proto::Alive{})) == "alive");
  CHECK(std::string(proto::type_name(proto::Found{})) == "found");
}

TEST_CASE("the samples cover every type; requests come before replies in the variant") {
  std::vector<bool> seen(std::variant_size_v<Message>, false);
  std::size_t last_request = 0;
  std::size_t first_reply = std::variant_size_v<Message>;
  std::vector<std::string> tags;
  for (const Message& m : one_of_each()) {
    CAPTURE(proto::type_name(m));
    seen[m.index()] = true;
    tags.emplace_back(proto::type_name(m));
    // Exactly one of id and re is set, which is what the endpoint routes on.
    CHECK((proto::request_id(m) != 0) != (proto::reply_to(m) != 0));
    if (proto::request_id(m) != 0) last_request = std::max(last_request, m.index());
    else first_reply = std::min(first_reply, m.index());
  }
  CHECK(std::count(seen.begin(), seen.end(), false) == 0);
  CHECK(last_request < first_reply);
  std::sort(tags.begin(), tags.end());
  tags.erase(std::unique(tags.begin(), tags.end()), tags.end());
  CHECK(tags.size() == std::variant_size_v<Message>);  // one distinct tag per type
  for (const Message& m : one_of_each()) check_round_trip(m);
}

TEST_CASE("old encodings without the optional fields still decode") {
  // As senders wrote them before `missed` existed.
  auto d = proto::decode(R"({"v":1,"t":"reg_ok","re":5,"epoch":7,"pending":2})");
  REQUIRE(d);
  CHECK(*d.message == Message{proto::RegOk{5, 7, 2}});
  d = proto::decode(R"({"epoch":7,"pending":0,"re":5,"t":"reg_ok","v":1})");
  REQUIRE(d);
  CHECK(*d.message == Message{proto::RegOk{5, 7, 0}});
  d = proto::decode(R"({"v":1,"t":"ack","re":5})");
  REQUIRE(d);
  CHECK(*d.message == Message{proto::Ack{5, 0, 0, 0}});
  d = proto::decode(R"({"v":1,"t":"ack","re":5,"epoch":3,"have":4})");
  REQUIRE(d);
  CHECK(*d.message == Message{proto::Ack{5, 3, 4, 0}});
  // And without them set, today's encodings are byte for byte what they were.
  CHECK(proto::encode(proto::RegOk{5, 7, 2}) == R"({"v":1,"t":"reg_ok","re":5,"epoch":7,"pending":2})");
  CHECK(proto::encode(proto::Ack{5}) == R"({"v":1,"t":"ack","re":5})");
  CHECK(proto::encode(proto::Ack{5, 3, 4}) == R"({"v":1,"t":"ack","re":5,"epoch":3,"have":4})");
}

TEST_CASE("encode replaces invalid UTF-8 instead of throwing, and the result decodes") {
  const std::vector<std::string> bad = {
      "\xFF",           "a\x80z",        "\xC0\xAF",        "\xED\xA0\x80",
      "ab\xE2\x82",     "\xF0\x9F\x98",  "\xF4\x90\x80\x80", "ok \xC3\x28 ok",
      std::string(50, '\xFE'),
  };
  for (const std::string& text : bad) {
    CAPTURE(text);
    REQUIRE_FALSE(proto::valid_utf8(text));
    std::string bytes;
    REQUIRE_NOTHROW(bytes = proto::encode(proto::Direct{1, "a", text}));
    CHECK(proto::valid_utf8(bytes));
    auto d = proto::decode(bytes);
    REQUIRE(d);
    const auto& got = std::get<proto::Direct>(*d.message);
    CHECK(proto::valid_utf8(got.text));
    CHECK(got.text.find("\xEF\xBF\xBD") != std::string::npos);  // U+FFFD
    // Reasons and (undecodable) names are replaced too, never thrown on.
    CHECK_NOTHROW(std::ignore = proto::encode(proto::Refused{1, text}));
    CHECK_NOTHROW(std::ignore = proto::encode(proto::Register{1, text}));
  }
}

TEST_CASE("malformed datagrams are refused with the exact reason and never throw") {
  const std::vector<Bad> cases = malformed_inputs();
  CHECK(cases.size() >= 35);
  for (const Bad& c : cases) {
    CAPTURE(c.label);
    proto::Decoded d;
    REQUIRE_NOTHROW(d = proto::decode(c.bytes));
    CHECK_FALSE(d);
    CHECK_MESSAGE(d.error == c.want, "got ", std::string(proto::to_string(d.error)), ", want ", std::string(proto::to_string(c.want)));
  }
}

TEST_CASE("the templates of the malformed table decode when left unbroken") {
  // So each malformed case above is refused for its one defect, not for a typo around it.
  for (const std::string& ok : {
           v1(R"("t":"direct","id":1,"from":"a","text":"ok")"),
           v1(R"("t":"probe","id":1,"x":[[[1]]])"),
           v1(R"("t":"register","id":1,"name":")" + kName32 + "\""),
           v1(R"("t":"save","id":1,"from":"a","to":"b","mid":1,"force":false,"text":"x")"),
           v1(R"("t":"relay","id":1,"from":"a","mid":3,"text":"x")"),
           v1(R"("t":"reg_ok","re":1,"epoch":1,"pending":0)"),
           v1(R"("t":"reg_err","re":1,"reason":")" + std::string(proto::kMaxReason, 'r') + "\""),
           v1(R"("t":"table","id":1,"epoch":1,"from":0,"to":3,"more":false,"e":[["a","1.2.3.4",5,1],["b","1.2.3.4",65535,0]])"),
           v1(R"("t":"table","id":1,"epoch":1,"from":4,"to":4,"more":true,"e":[])"),
           v1(R"("t":"stored","id":1,"items":[["a",0,5,1,"x"],["b",1,0,0,""]])"),
           v1(R"("t":"ack","re":1,"epoch":3,"have":4)"),
           v1(R"("t":"exists","re":1,"name":"x.")"),
           v1(R"("t":"ack","re":1,"missed":2)"),
           v1(R"("t":"ack","re":1,"epoch":3,"have":3,"missed":0)"),
           v1(R"("t":"keepalive","id":1,"name":"a")"),
           v1(R"("t":"lookup","id":1,"name":"a")"),
           v1(R"("t":"alive","re":1,"live":false)"),
           v1(R"("t":"found","re":1,"known":true,"e":["a","1.2.3.4",5,1])"),
           v1(R"("t":"found","re":1,"known":false,"name":"a")"),
           v1(R"("t":"found","re":1,"known":false)"),
       }) {
    CAPTURE(ok);
    auto d = proto::decode(ok);
    CHECK(d.error == DecodeError::none);
    CHECK(d);
  }
}

TEST_CASE("accepted edges of decode") {
  SUBCASE("exactly kMaxDatagram bytes (padded with JSON whitespace)") {
    std::string valid = proto::encode(proto::Direct{9, "a", std::string(proto::kMaxText, 'x')});
    std::string exact = valid + std::string(proto::kMaxDatagram - valid.size(), ' ');
    REQUIRE(exact.size() == proto::kMaxDatagram);
    auto d = proto::decode(exact);
    REQUIRE(d);
    CHECK(std::get<proto::Direct>(*d.message).text.size() == proto::kMaxText);
  }
  SUBCASE("nesting of exactly kMaxDepth") {
    CHECK(proto::decode(v1(R"("t":"table","id":1,"epoch":1,"from":0,"to":1,"more":false,"e":[["a","1.2.3.4",5,1]])")));
  }
  SUBCASE("brackets and escaped quotes inside strings do not count as nesting") {
    auto d = proto::decode(v1(R"("t":"direct","id":1,"from":"a","text":"\"[[[[[[[[\\\"{{{{{{")"));
    REQUIRE(d);
    CHECK(std::get<proto::Direct>(*d.message).text == R"("[[[[[[[[\"{{{{{{)");
  }
  SUBCASE("JSON escapes in text are decoded") {
    auto d = proto::decode(v1(R"("t":"direct","id":1,"from":"a","text":"\u00e9\ud83d\ude00\u0000")"));
    REQUIRE(d);
    CHECK(std::get<proto::Direct>(*d.message).text == std::string("\xC3\xA9\xF0\x9F\x98\x80\0", 7));
  }
  SUBCASE("field order does not matter") {
    auto d = proto::decode(R"({"id":5,"name":"bob","t":"register","v":1})");
    REQUIRE(d);
    CHECK(*d.message == Message{proto::Register{5, "bob"}});
  }
  SUBCASE("ts of INT64_MAX and UINT64_MAX ids") {
    auto d = proto::decode(
        v1(R"("t":"stored","id":18446744073709551615,"items":[["a",1,9223372036854775807,18446744073709551615,""]])"));
    REQUIRE(d);
    const auto& s = std::get<proto::Stored>(*d.message);
    CHECK(s.id == kMaxU64);
    REQUIRE(s.items.size() == 1);
    CHECK(s.items[0].ts_us == kMaxI64);
    CHECK(s.items[0].channel);
  }
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
}

// Regression test for a bug found by this suite (fixed).
TEST_CASE("valid_ipv4 refuses an embedded NUL") {
  CHECK_FALSE(proto::valid_ipv4(std::string("1.2.3.4\0junk", 12)));
  CHECK_FALSE(proto::decode(v1(R"("t":"table","id":1,"epoch":1,"from":0,"to":1,"more":false,"e":[["a","1.2.3.4\u0000x",5,1]])")));
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

TEST_CASE("escaped_size matches what encode writes") {
  CHECK(proto::escaped_size("") == 0);
  CHECK(proto::escaped_size("abc") == 3);
  CHECK(proto::escaped_size("\"") == 2);
  CHECK(proto::escaped_size("\\") == 2);
  CHECK(proto::escaped_size("\b\f\n\r\t") == 10);
  CHECK(proto::escaped_size("\x01") == 6);
  CHECK(proto::escaped_size("\x1F") == 6);
  CHECK(proto::escaped_size(std::string(1, '\0')) == 6);
  CHECK(proto::escaped_size("\x7F") == 1);
  CHECK(proto::escaped_size("/") == 1);
  CHECK(proto::escaped_size("\xC3\xA9") == 2);
  CHECK(proto::escaped_size("\xF0\x9F\x98\x80") == 4);

  // For valid UTF-8 the prediction is exact: every ASCII byte alone, and the tricky texts.
  const std::size_t empty_size = proto::encode(proto::Direct{1, "a", ""}).size();
  for (int c = 0; c < 0x80; ++c) {
    std::string text(3, static_cast<char>(c));
    CAPTURE(c);
    CHECK(proto::encode(proto::Direct{1, "a", text}).size() - empty_size == proto::escaped_size(text));
  }
  for (const std::string& text : kTrickyTexts) {
    CAPTURE(text);
    CHECK(proto::encode(proto::Direct{1, "a", text}).size() - empty_size == proto::escaped_size(text));
  }
}

// Texts that check_text must accept and that escape to as many bytes as it allows: quotes,
// backslashes and control characters spent up to the encoded budget, the rest plain.
std::vector<std::string> worst_legal_texts() {
  const std::size_t t = proto::kMaxText;
  const std::size_t extra = proto::kMaxTextEncoded > t ? proto::kMaxTextEncoded - t : 0;  // bytes escaping may add
  auto fill = [t](std::string s) { return s + std::string(t - s.size(), 'x'); };
  std::vector<std::string> texts;
  texts.push_back(fill(std::string(std::min(t, extra), '"')));            // each quote adds 1
  texts.push_back(fill(std::string(std::min(t, extra), '\\')));          // each backslash adds 1
  texts.push_back(fill(std::string(std::min(t, extra / 5), '\x01')));     // each control char adds 5
  {
    const std::size_t ctl = std::min(t / 2, extra / 10);  // half the budget on control chars
    const std::size_t tabs = std::min(t - ctl, extra - 5 * ctl);
    texts.push_back(fill(std::string(ctl, '\x1F') + std::string(tabs, '\t')));
  }
  {
    std::string emoji;  // four-byte code points add nothing, but are the longest characters
    while (emoji.size() + 4 <= t) emoji += "\xF0\x9F\x98\x80";
    texts.push_back(emoji);
  }
  return texts;
}

TEST_CASE("check_text") {
  const std::string limit = std::to_string(proto::kMaxText);
  CHECK(proto::check_text("").empty());
  CHECK(proto::check_text("hello").empty());
  CHECK(proto::check_text(std::string(proto::kMaxText, 'x')).empty());
  CHECK(proto::check_text(std::string(proto::kMaxText / 2, '"')).empty());

  std::string why = proto::check_text(std::string(proto::kMaxText + 1, 'x'));
  CHECK_FALSE(why.empty());
  CHECK(why.find(limit) != std::string::npos);                                // names the limit
  CHECK(why.find(std::to_string(proto::kMaxText + 1)) != std::string::npos);  // and the size typed
  why = proto::check_text(std::string(5000, 'x'));
  CHECK(why.find(limit) != std::string::npos);

  // The encoded limit: a control character takes 6 bytes, a quote or a backslash 2.
  const std::size_t extra = proto::kMaxTextEncoded - proto::kMaxText;
  const std::size_t ctl = std::min(proto::kMaxText, extra / 5);
  std::string at_limit = std::string(ctl, '\x01') + std::string(proto::kMaxText - ctl, 'x');
  CHECK(proto::check_text(at_limit).empty());
  if (ctl < proto::kMaxText) {
    // One more control character in place of a plain one is one too many.
    std::string over = std::string(ctl + 1, '\x01') + std::string(proto::kMaxText - ctl - 1, 'x');
    REQUIRE(proto::escaped_size(over) > proto::kMaxTextEncoded);
    why = proto::check_text(over);
    CHECK_FALSE(why.empty());
    CHECK(why.find(std::to_string(proto::kMaxTextEncoded)) != std::string::npos);
  }
  CHECK_FALSE(proto::check_text(std::string(proto::kMaxText, '\x01')).empty());
  CHECK(proto::check_text(std::string(proto::kMaxTextEncoded / 6, '\x01')).empty());
  CHECK_FALSE(proto::check_text(std::string(proto::kMaxTextEncoded / 6 + 1, '\x01')).empty());

  for (const std::string& text : worst_legal_texts()) {
    CAPTURE(text.size());
    CHECK(proto::check_text(text).empty());
  }
}

TEST_CASE("the largest legal message of each text-carrying type fits one datagram") {
  // Every text check_text accepts has escaped_size <= kMaxTextEncoded, and for valid UTF-8 that is
  // exactly what encode writes (tested above), so these reach the worst case.
  std::size_t worst_escaped = 0;
  for (const std::string& text : worst_legal_texts()) {
    CAPTURE(text.size());
    REQUIRE(text.size() <= proto::kMaxText);
    REQUIRE(proto::check_text(text).empty());
    worst_escaped = std::max(worst_escaped, proto::escaped_size(text));
    const std::vector<Message> largest = {
        proto::Direct{kMaxU64, kName32, text},
        proto::Save{kMaxU64, kName32, kName32, kMaxU64, false, text},
        proto::Save{kMaxU64, kName32, kName32, kMaxU64, true, text},
        proto::Channel{kMaxU64, kName32, text},
        proto::Relay{kMaxU64, kName32, kMaxU64, text},
        proto::Stored{kMaxU64, {{kName32, false, kMaxI64, kMaxU64, text}}},
        proto::Stored{kMaxU64, {{kName32, true, kMaxI64, kMaxU64, text}}},
    };
    for (const Message& m : largest) {
      std::string bytes = proto::encode(m);
      CAPTURE(proto::type_name(m));
      CAPTURE(bytes.size());
      CHECK(bytes.size() <= proto::kMaxDatagram);
      auto d = proto::decode(bytes);
      REQUIRE(d);
      CHECK(*d.message == m);
    }
  }
  // The texts above do reach the encoded limit (or all of kMaxText doubled, if that is less).
  CHECK(worst_escaped == std::min(proto::kMaxTextEncoded, 2 * proto::kMaxText));

  // Reasons: kMaxReason control characters, the worst a reason can escape to.
  for (const Message& m : {Message{proto::RegErr{kMaxU64, std::string(proto::kMaxReason, '\x01')}},
                           Message{proto::Refused{kMaxU64, std::string(proto::kMaxReason, '\x01')}}}) {
    std::string bytes = proto::encode(m);
    CAPTURE(bytes.size());
    CHECK(bytes.size() <= proto::kMaxDatagram);
    CHECK(proto::decode(bytes));
  }
  // A registration padded as the client pads it.
  {
    proto::Register reg{kMaxU64, kName32, 0};
    proto::pad_to(reg, proto::kRegisterPadTo);
    std::string bytes = proto::encode(reg);
    CHECK(bytes.size() <= proto::kMaxDatagram);
    CHECK(bytes.size() == proto::kRegisterPadTo);
    auto d = proto::decode(bytes);
    REQUIRE(d);
    CHECK(*d.message == Message{reg});
  }
}

// Regression test for a bug found by this suite (fixed).
TEST_CASE("a text accepted by check_text always fits one datagram, even invalid UTF-8") {
  const std::string text(proto::kMaxText, '\xFF');
  if (proto::check_text(text).empty()) {
    CHECK(proto::encode(proto::Direct{kMaxU64, kName32, text}).size() <= proto::kMaxDatagram);
    CHECK(proto::encode(proto::Stored{kMaxU64, {{kName32, true, kMaxI64, kMaxU64, text}}}).size() <=
          proto::kMaxDatagram);
  }
}

TEST_CASE("encoded_size is exactly the size of encode") {
  std::vector<Message> all = one_of_each();
  for (const std::string& text : kTrickyTexts) {
    all.push_back(proto::Direct{kMaxU64, kName32, text});
    all.push_back(proto::Stored{1, {{kName1, true, 5, 6, text}, {kName32, false, kMaxI64, kMaxU64, text}}});
  }
  // Invalid UTF-8 (replaced by 3-byte U+FFFD), pads past the encoder's cap, names it would escape.
  all.push_back(proto::Direct{1, "a", std::string(50, '\xFE') + "ok\xC3"});
  all.push_back(proto::Register{1, kName1, proto::kMaxDatagram * 3});
  all.push_back(proto::Register{1, "a\"b\\c\x01", 1});
  all.push_back(proto::Found{1, true, {"a\"", "\x02", 0, true}});
  all.push_back(proto::Stored{1, {{kName1, false, -1, 0, ""}}});  // a negative ts is encoded too
  for (const Message& m : all) {
    CAPTURE(proto::type_name(m));
    CHECK(proto::encoded_size(m) == proto::encode(m).size());
  }
}

TEST_CASE("pad_to pads a registration to exactly the size asked") {
  for (const proto::Register& start : {proto::Register{1, kName1}, proto::Register{kMaxU64, kName32},
                                       proto::Register{77, "bob", 999}}) {
    proto::Register bare = start;
    bare.pad = 0;
    const std::size_t unpadded = proto::encode(bare).size();
    const std::size_t field = std::string(R"(,"pad":"")").size();  // the pad field without content
    for (std::size_t size = 0; size <= proto::kMaxDatagram + 50; ++size) {
      CAPTURE(start.name);
      CAPTURE(size);
      proto::Register r = start;
      proto::pad_to(r, size);
      const std::string bytes = proto::encode(r);
      const std::size_t want = std::min(size, proto::kMaxDatagram);
      if (want <= unpadded) {
        CHECK(r.pad == 0);
        CHECK(bytes.size() == unpadded);
      } else if (want < unpadded + field + 1) {
        CHECK(r.pad == 1);  // no exact fit: the smallest padded size, just past the one asked
        CHECK(bytes.size() == unpadded + field + 1);
      } else {
        CHECK(bytes.size() == want);
      }
      CHECK(bytes.size() <= proto::kMaxDatagram);
      auto d = proto::decode(bytes);
      REQUIRE(d);
      CHECK(*d.message == Message{r});
    }
  }
  proto::Register reg{5, "alice"};
  proto::pad_to(reg, proto::kRegisterPadTo);
  CHECK(proto::encode(reg).size() == proto::kRegisterPadTo);
}

TEST_CASE("set_encoded_id gives each copy of a request its own id") {
  SUBCASE("every request type") {
    for (Message m : one_of_each()) {
      if (proto::request_id(m) == 0) continue;
      CAPTURE(proto::type_name(m));
      set_id(m, proto::kIdPlaceholder);
      const std::string once = proto::encode(m);
      for (std::uint64_t id : {std::uint64_t{1}, std::uint64_t{42}, kMaxU64 - 1, kMaxU64}) {
        std::string copy = once;
        REQUIRE(proto::set_encoded_id(copy, id));
        Message want = m;
        set_id(want, id);
        CHECK(copy == proto::encode(want));
        CHECK(copy.size() <= once.size());
        auto d = proto::decode(copy);
        REQUIRE(d);
        CHECK(*d.message == want);
      }
    }
  }
  SUBCASE("texts and names that look like the id field are never rewritten") {
    const std::string digits = std::to_string(proto::kIdPlaceholder);
    const std::vector<std::string> lures = {
        digits,
        "\"id\":" + digits,
        ",\"id\":" + digits + ",",
        "{\"v\":1,\"t\":\"relay\",\"id\":" + digits + "}",
        "\"id\":\"id\":" + digits + digits,
        "\\\",\"id\":" + digits + ",\\\"",
    };
    for (const std::string& text : lures) {
      CAPTURE(text);
      // With a real id, nothing in the datagram is the placeholder id: refused, untouched.
      for (const Message& m : {Message{proto::Relay{5, kName32, proto::kIdPlaceholder, text}},
                               Message{proto::Direct{6, "a", text}},
                               Message{proto::Save{7, "a", "b", proto::kIdPlaceholder, false, text}},
                               Message{proto::Stored{8, {{"a", true, 1, proto::kIdPlaceholder, text}}}},
                               Message{proto::Ack{proto::kIdPlaceholder, 0, 0, proto::kIdPlaceholder}},
                               Message{proto::RegErr{proto::kIdPlaceholder, text}}}) {
        CAPTURE(proto::type_name(m));
        const std::string before = proto::encode(m);
        std::string bytes = before;
        CHECK_FALSE(proto::set_encoded_id(bytes, 9));
        CHECK(bytes == before);
      }
      // With the placeholder, only the id changes, and the text (and the mid) come out intact.
      std::string bytes = proto::encode(proto::Relay{proto::kIdPlaceholder, kName32, proto::kIdPlaceholder, text});
      REQUIRE(proto::set_encoded_id(bytes, 9));
      auto d = proto::decode(bytes);
      REQUIRE(d);
      CHECK(*d.message == Message{proto::Relay{9, kName32, proto::kIdPlaceholder, text}});
    }
  }
  SUBCASE("anything but an encoded request with the placeholder is refused, untouched") {
    const std::string digits = std::to_string(proto::kIdPlaceholder);
    const std::string good = proto::encode(proto::Probe{proto::kIdPlaceholder});
    std::vector<std::string> bad = {
        "",
        "{",
        "\"id\":" + digits,
        "{\"v\":1,\"t\":\"probe\",\"id\":" + digits,               // nothing after the number
        "{\"v\":1,\"t\":\"probe\",\"id\":" + digits + "0}",        // a longer number
        "{\"v\":1,\"t\":\"probe\",\"id\":" + digits.substr(1) + "}",
        "{\"v\":2,\"t\":\"probe\",\"id\":" + digits + "}",
        "{\"t\":\"probe\",\"v\":1,\"id\":" + digits + "}",          // not as the encoder writes it
        "{\"v\":1,\"t\":\"relay\",\"from\":\"a\",\"id\":" + digits + "}",
        "{\"v\":1,\"t\":\"probe\",\"re\":" + digits + "}",
        "{\"v\":1,\"t\":\"probe",
    };
    for (std::size_t n = 0; n < good.size(); ++n) bad.push_back(good.substr(0, n));  // every truncation
    for (const std::string& before : bad) {
      CAPTURE(before);
      std::string bytes = before;
      bool ok = true;
      REQUIRE_NOTHROW(ok = proto::set_encoded_id(bytes, 9));
      CHECK_FALSE(ok);
      CHECK(bytes == before);
    }
    std::string bytes = good;
    CHECK_FALSE(proto::set_encoded_id(bytes, 0));  // 0 is "no id": refused on receipt
    CHECK(bytes == good);
    // Once rewritten the placeholder is gone: a second id cannot be written over the first.
    REQUIRE(proto::set_encoded_id(bytes, 9));
    CHECK_FALSE(proto::set_encoded_id(bytes, 10));
    CHECK(bytes == proto::encode(proto::Probe{9}));
  }
}

namespace {

// Random contents for the packing bounds: names up to kMaxName, texts up to kMaxText made of
// what escapes worst (quotes, backslashes, control characters), UTF-8, and plain letters.
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
  std::string text() {
    std::size_t n = below(2) == 0 ? proto::kMaxText : below(proto::kMaxText + 1);
    switch (below(6)) {
      case 0: return std::string(n, '"');
      case 1: return std::string(n, '\\');
      case 2: return std::string(n, '\x01');
      default: {
        static const std::vector<std::string> pieces = {"\"", "\\", "\x01", "\x1F", "\n", "\t", std::string(1, '\0'),
                                                        "\x7F", "a", " ", "\xC3\xA9", "\xF0\x9F\x98\x80", "\xFF"};
        std::string s;
        while (s.size() < n) {
          const std::string& p = pieces[below(pieces.size())];
          if (s.size() + p.size() > n) break;
          s += p;
        }
        return s;
      }
    }
  }
  std::string ip() {
    return std::to_string(below(256)) + "." + std::to_string(below(256)) + "." + std::to_string(below(256)) + "." +
           std::to_string(below(256));
  }

 private:
  std::mt19937_64 rng_;
};

// Decimal digits of `v`.
std::size_t digits(std::uint64_t v) { return std::to_string(v).size(); }

}  // namespace

TEST_CASE("stored_overhead and stored_item_size bound every Stored datagram") {
  Randomizer rnd(20240611);
  for (int round = 0; round < 400; ++round) {
    std::vector<proto::StoredItem> items(rnd.below(5));
    std::size_t sum = 0;
    for (auto& item : items) {
      const auto ts = static_cast<std::int64_t>(rnd.u64() >> 1);  // 0 to INT64_MAX, as decode allows
      item = {rnd.name(), rnd.below(2) == 1, ts, rnd.u64(), rnd.text()};
      sum += proto::stored_item_size(item);
    }
    const std::uint64_t id = rnd.u64() | 1;
    const std::size_t size = proto::encode(proto::Stored{id, items}).size();
    CAPTURE(round);
    CHECK(size <= proto::stored_overhead() + sum);
    // And tight: the bound is over only by the id's missing digits and the first item's comma.
    CHECK(proto::stored_overhead() + sum - size == (20 - digits(id)) + (items.empty() ? 0 : 1));
  }
  // Packing as the server does: take items while the bound stays within one datagram.
  for (int round = 0; round < 50; ++round) {
    proto::Stored batch{kMaxU64, {}};
    std::size_t sum = proto::stored_overhead();
    for (;;) {
      std::string text = rnd.text();
      if (!proto::check_text(text).empty()) text = std::string(proto::kMaxText, '"');
      proto::StoredItem item{rnd.name(), true, kMaxI64, kMaxU64, text};
      if (sum + proto::stored_item_size(item) > proto::kMaxDatagram) break;
      sum += proto::stored_item_size(item);
      batch.items.push_back(std::move(item));
    }
    REQUIRE_FALSE(batch.items.empty());
    const std::string bytes = proto::encode(batch);
    CHECK(bytes.size() <= proto::kMaxDatagram);
    auto d = proto::decode(bytes);
    REQUIRE(d);
    CHECK(*d.message == Message{batch});
  }
  // Any single legal item fits one datagram on its own, however it escapes.
  for (const std::string& text : worst_legal_texts()) {
    CAPTURE(text.size());
    CHECK(proto::stored_overhead() + proto::stored_item_size({kName32, true, kMaxI64, kMaxU64, text}) <=
          proto::kMaxDatagram);
  }
}

TEST_CASE("table_overhead and entry_size bound every Table datagram") {
  Randomizer rnd(20240612);
  for (int round = 0; round < 400; ++round) {
    std::vector<proto::Entry> entries(rnd.below(60));
    std::size_t sum = 0;
    for (auto& e : entries) {
      e = {rnd.name(), rnd.below(4) == 0 ? "255.255.255.255" : rnd.ip(),
           static_cast<std::uint16_t>(rnd.below(2) == 0 ? 65535 : 1 + rnd.below(65535)), rnd.below(2) == 1};
      sum += proto::entry_size(e);
    }
    proto::Table t{rnd.u64() | 1, rnd.u64(), rnd.u64(), rnd.u64(), rnd.below(2) == 1, entries};
    const std::size_t size = proto::encode(t).size();
    CAPTURE(round);
    CHECK(size <= proto::table_overhead() + sum);
    CHECK(proto::table_overhead() + sum - size == (20 - digits(t.id)) + (20 - digits(t.epoch)) +
                                                      (20 - digits(t.from)) + (20 - digits(t.to)) +
                                                      (t.more ? 1 : 0) + (entries.empty() ? 0 : 1));
  }
  // Packing rows of the longest kind: they fit, and more than a handful do.
  proto::Table t{kMaxU64, kMaxU64, kMaxU64, kMaxU64, false, {}};
  std::size_t sum = proto::table_overhead();
  for (std::size_t i = 0;; ++i) {
    std::string name = kName32;
    name[0] = static_cast<char>('a' + i % 26);
    name[1] = static_cast<char>('a' + i / 26);
    proto::Entry e{name, "255.255.255.255", 65535, false};
    if (sum + proto::entry_size(e) > proto::kMaxDatagram) break;
    sum += proto::entry_size(e);
    t.entries.push_back(e);
  }
  CHECK(t.entries.size() >= 20);
  const std::string bytes = proto::encode(t);
  CHECK(bytes.size() <= proto::kMaxDatagram);
  auto d = proto::decode(bytes);
  REQUIRE(d);
  CHECK(*d.message == Message{t});
}

}  // TEST_SUITE
