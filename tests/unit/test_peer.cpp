// The peer's plain code: command parsing, the table listing and timestamps.
#include <doctest/doctest.h>

#include <cstdlib>
#include <ctime>

#include "peer/commands.hpp"
#include "peer/local_table.hpp"

using namespace chat::peer;

TEST_CASE("send keeps the message byte for byte") {
  auto c = parse_command("send bob   two  spaces, ünïcode ✓ \"quotes\" ");
  auto* s = std::get_if<cmd::Send>(&c);
  REQUIRE(s != nullptr);
  CHECK(s->to == "bob");
  CHECK(s->text == "  two  spaces, ünïcode ✓ \"quotes\" ");
}

TEST_CASE("leading spaces before the command and a trailing CR are tolerated") {
  auto c = parse_command("   send_all hello\r");
  auto* s = std::get_if<cmd::SendAll>(&c);
  REQUIRE(s != nullptr);
  CHECK(s->text == "hello");
}

TEST_CASE("missing arguments give a one-line usage") {
  for (const char* line : {"send", "send bob", "send_all", "dereg", "reg", "dereg a b"}) {
    CAPTURE(line);
    auto c = parse_command(line);
    auto* e = std::get_if<cmd::Error>(&c);
    REQUIRE(e != nullptr);
    CHECK(e->message.rfind("usage: ", 0) == 0);
    CHECK(e->message.find('\n') == std::string::npos);
  }
}

TEST_CASE("other commands") {
  CHECK(std::holds_alternative<cmd::List>(parse_command("list")));
  CHECK(std::holds_alternative<cmd::Help>(parse_command("help")));
  CHECK(std::holds_alternative<cmd::Quit>(parse_command("quit")));
  CHECK(std::holds_alternative<cmd::Quit>(parse_command("exit")));
  CHECK(std::holds_alternative<cmd::Empty>(parse_command("")));
  CHECK(std::holds_alternative<cmd::Empty>(parse_command("   ")));
  auto d = parse_command("dereg alice");
  REQUIRE(std::holds_alternative<cmd::Dereg>(d));
  CHECK(std::get<cmd::Dereg>(d).name == "alice");
  auto r = parse_command("reg alice");
  REQUIRE(std::holds_alternative<cmd::Reg>(r));
  CHECK(std::get<cmd::Reg>(r).name == "alice");
}

TEST_CASE("the file commands: a path with spaces, an optional id, usage lines") {
  auto f = parse_command("sendfile bob /tmp/my report (final).pdf");
  REQUIRE(std::holds_alternative<cmd::SendFile>(f));
  CHECK(std::get<cmd::SendFile>(f).to == "bob");
  CHECK(std::get<cmd::SendFile>(f).path == "/tmp/my report (final).pdf");
  CHECK(std::get<cmd::Error>(parse_command("sendfile bob")).message == "usage: sendfile <name> <path>");
  auto a = parse_command("accept alice");
  REQUIRE(std::holds_alternative<cmd::Accept>(a));
  CHECK(std::get<cmd::Accept>(a).from == "alice");
  CHECK(std::get<cmd::Accept>(a).id == 0);
  auto a2 = parse_command("accept alice 12");
  REQUIRE(std::holds_alternative<cmd::Accept>(a2));
  CHECK(std::get<cmd::Accept>(a2).id == 12);
  CHECK(std::get<cmd::Error>(parse_command("accept alice x1")).message == "usage: accept <name> [<id>]");
  CHECK(std::get<cmd::Error>(parse_command("accept alice 0")).message == "usage: accept <name> [<id>]");
  CHECK(std::get<cmd::Error>(parse_command("accept alice 1 2")).message == "usage: accept <name> [<id>]");
  auto d = parse_command("decline alice 3");
  REQUIRE(std::holds_alternative<cmd::Decline>(d));
  CHECK(std::get<cmd::Decline>(d).id == 3);
  CHECK(std::holds_alternative<cmd::Transfers>(parse_command("transfers")));
  auto x = parse_command("cancel 7");
  REQUIRE(std::holds_alternative<cmd::Cancel>(x));
  CHECK(std::get<cmd::Cancel>(x).id == 7);
  CHECK(std::get<cmd::Error>(parse_command("cancel")).message == "usage: cancel <id>");
  CHECK(std::get<cmd::Error>(parse_command("cancel 1234567")).message == "usage: cancel <id>");
  CHECK(std::get<cmd::Error>(parse_command("sendfil bob x")).message == "unknown command 'sendfil', did you mean 'sendfile'?");
}

TEST_CASE("a mistyped command suggests the nearest one") {
  auto c = parse_command("sned bob hi");
  auto* e = std::get_if<cmd::Error>(&c);
  REQUIRE(e != nullptr);
  CHECK(e->message == "unknown command 'sned', did you mean 'send'?");
  auto far = parse_command("xyzzy");
  CHECK(std::get<cmd::Error>(far).message == "unknown command 'xyzzy' (type help)");
}

TEST_CASE("list shows every row aligned, marks you, and ends with a count") {
  LocalTable t;
  t.apply({1, "alice", 9, 0, 2, false, {{"alice", "127.0.0.1", 5001, true}, {"bob_the_builder", "10.0.0.2", 65535, false}}});
  std::string out = format_table(t, "alice");
  CHECK(out ==
        "NAME             ADDRESS                STATUS\n"
        "alice            127.0.0.1:5001         online (you)\n"
        "bob_the_builder  10.0.0.2:65535         offline\n"
        "(2 clients, 1 online)");
}

TEST_CASE("timestamps are shown in local time") {
  ::setenv("TZ", "UTC", 1);
  ::tzset();
  CHECK(format_timestamp(0) == "1970-01-01 00:00:00");
  CHECK(format_timestamp(1'700'000'000'123'456) == "2023-11-14 22:13:20");
  ::setenv("TZ", "Asia/Shanghai", 1);
  ::tzset();
  // Without tzdata the zone falls back to UTC; with it, +8 h.
  std::string s = format_timestamp(0);
  CHECK((s == "1970-01-01 08:00:00" || s == "1970-01-01 00:00:00"));
  ::unsetenv("TZ");
  ::tzset();
}
