// The prompt's commands, parsed from one typed line: plain code, no I/O.
#pragma once

#include <string>
#include <string_view>
#include <variant>

namespace chat::peer {

namespace cmd {
struct Send { std::string to; std::string text; };
struct SendAll { std::string text; };
struct Dereg { std::string name; };
struct Reg { std::string name; };
struct List {};
struct Help {};
struct Quit {};
/// `fingerprint` (name empty: your own) or `fingerprint <name>`.
struct Fingerprint { std::string name; };
struct Verify { std::string name; };
struct Trust { std::string name; };
struct Block { std::string name; };
struct Unblock { std::string name; };
struct Blocked {};
/// `sendfile <name> <path>`: the path is the rest of the line, spaces included.
struct SendFile { std::string to; std::string path; };
/// `accept <name> [<id>]` and `decline <name> [<id>]`: id 0 when not given (the only offer).
struct Accept { std::string from; unsigned id = 0; };
struct Decline { std::string from; unsigned id = 0; };
struct Transfers {};
struct Cancel { unsigned id = 0; };
struct Empty {};
/// A line that is not a valid command; `message` is the one line to show.
struct Error { std::string message; };
}  // namespace cmd

using Command = std::variant<cmd::Send, cmd::SendAll, cmd::Dereg, cmd::Reg, cmd::List, cmd::Help,
                             cmd::Quit, cmd::Fingerprint, cmd::Verify, cmd::Trust, cmd::Block, cmd::Unblock,
                             cmd::Blocked, cmd::SendFile, cmd::Accept, cmd::Decline, cmd::Transfers, cmd::Cancel,
                             cmd::Empty, cmd::Error>;

/// Parses one line. A message is the rest of the line after exactly one separating space,
/// kept byte for byte (runs of spaces, punctuation, UTF-8).
Command parse_command(std::string_view line);

/// The help text: one line per command.
const char* help_text();

}  // namespace chat::peer
