// Parsing of prompt lines into commands, with one-line usage errors.
#include "peer/commands.hpp"

#include <algorithm>
#include <array>
#include <optional>
#include <vector>

#include "protocol/codec.hpp"

namespace chat::peer {
namespace {

// Splits off the first word (separated by one or more spaces/tabs before it, exactly one after).
std::string_view take_word(std::string_view& rest) {
  std::size_t start = rest.find_first_not_of(" \t");
  if (start == std::string_view::npos) {
    rest = {};
    return {};
  }
  rest.remove_prefix(start);
  std::size_t end = rest.find_first_of(" \t");
  std::string_view word = rest.substr(0, end);
  rest = end == std::string_view::npos ? std::string_view{} : rest.substr(end + 1);
  return word;
}

constexpr std::array<const char*, 19> kCommands = {
    "send",  "send_all", "dereg", "reg",         "list",    "help",     "quit",    "exit",    "trust",  "verify",
    "block", "unblock",  "fingerprint", "blocked", "sendfile", "accept", "decline", "transfers", "cancel"};

// Levenshtein distance, for "did you mean".
std::size_t distance(std::string_view a, std::string_view b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diag = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      std::size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

cmd::Error usage(const char* u) { return {std::string("usage: ") + u}; }

/// One name and nothing after it, or the usage line `u`.
template <class C>
Command one_name(std::string_view rest, const char* u) {
  std::string_view name = take_word(rest);
  if (name.empty() || rest.find_first_not_of(" \t") != std::string_view::npos) return usage(u);
  return C{std::string(name)};
}

bool nothing_after(std::string_view rest) { return rest.find_first_not_of(" \t") == std::string_view::npos; }

/// A transfer id as typed: 1 to 999999, digits only.
std::optional<unsigned> transfer_id(std::string_view word) {
  if (word.empty() || word.size() > 6 || word.find_first_not_of("0123456789") != std::string_view::npos) return std::nullopt;
  unsigned v = 0;
  for (char ch : word) v = v * 10 + static_cast<unsigned>(ch - '0');
  if (v == 0) return std::nullopt;
  return v;
}

/// `<name> [<id>]`, or the usage line `u`.
template <class C>
Command name_and_id(std::string_view rest, const char* u) {
  std::string_view name = take_word(rest);
  std::string_view id = take_word(rest);
  if (name.empty() || !nothing_after(rest)) return usage(u);
  if (id.empty()) return C{std::string(name), 0};
  auto v = transfer_id(id);
  if (!v) return usage(u);
  return C{std::string(name), *v};
}

}  // namespace

Command parse_command(std::string_view line) {
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  std::string_view rest = line;
  std::string_view word = take_word(rest);
  if (word.empty()) return cmd::Empty{};
  if (word == "send") {
    std::string_view to = take_word(rest);
    if (to.empty() || rest.empty()) return usage("send <name> <message>");
    return cmd::Send{std::string(to), std::string(rest)};
  }
  if (word == "send_all") {
    if (rest.empty()) return usage("send_all <message>");
    return cmd::SendAll{std::string(rest)};
  }
  if (word == "dereg") return one_name<cmd::Dereg>(rest, "dereg <your name>");
  if (word == "reg") return one_name<cmd::Reg>(rest, "reg <your name>");
  if (word == "fingerprint") {
    if (nothing_after(rest)) return cmd::Fingerprint{};
    return one_name<cmd::Fingerprint>(rest, "fingerprint [<name>]");
  }
  if (word == "verify") return one_name<cmd::Verify>(rest, "verify <name>");
  if (word == "trust") return one_name<cmd::Trust>(rest, "trust <name>");
  if (word == "block") return one_name<cmd::Block>(rest, "block <name>");
  if (word == "unblock") return one_name<cmd::Unblock>(rest, "unblock <name>");
  if (word == "blocked") return nothing_after(rest) ? Command(cmd::Blocked{}) : Command(usage("blocked"));
  if (word == "sendfile") {
    std::string_view to = take_word(rest);
    if (to.empty() || rest.empty()) return usage("sendfile <name> <path>");
    return cmd::SendFile{std::string(to), std::string(rest)};
  }
  if (word == "accept") return name_and_id<cmd::Accept>(rest, "accept <name> [<id>]");
  if (word == "decline") return name_and_id<cmd::Decline>(rest, "decline <name> [<id>]");
  if (word == "transfers") return nothing_after(rest) ? Command(cmd::Transfers{}) : Command(usage("transfers"));
  if (word == "cancel") {
    std::string_view id = take_word(rest);
    auto v = transfer_id(id);
    if (!v || !nothing_after(rest)) return usage("cancel <id>");
    return cmd::Cancel{*v};
  }
  if (word == "list") return cmd::List{};
  if (word == "help") return cmd::Help{};
  if (word == "quit" || word == "exit") return cmd::Quit{};
  std::string msg = "unknown command '" + std::string(word) + "'";
  const char* best = nullptr;
  std::size_t best_d = 3;  // suggest only close matches
  for (const char* c : kCommands) {
    std::size_t d = distance(word, c);
    if (d < best_d) best_d = d, best = c;
  }
  if (best != nullptr) msg += ", did you mean '" + std::string(best) + "'?";
  else msg += " (type help)";
  return cmd::Error{msg};
}

const char* help_text() {
  return "send <name> <message>   send a message directly to a client\n"
         "send_all <message>      send a message to everyone on the channel\n"
         "list                    show the client table\n"
         "dereg <your name>       go offline (messages to you are saved)\n"
         "reg <your name>         come back online and get saved messages\n"
         "fingerprint [<name>]    show your fingerprint, or the one pinned for name\n"
         "verify <name>           mark name's fingerprint as compared and verified\n"
         "trust <name>            accept name's new identity after it changed\n"
         "block <name>            never show messages from name\n"
         "unblock <name>          show name's messages again\n"
         "blocked                 list who you blocked\n"
         "sendfile <name> <path>  offer a file to a client\n"
         "accept <name> [<id>]    accept a file name offered (id: one of several)\n"
         "decline <name> [<id>]   decline a file name offered\n"
         "transfers               list the file transfers and offers, with their ids\n"
         "cancel <id>             stop a file transfer (offering the file again resumes it)\n"
         "help                    show this help\n"
         "quit                    leave once what is in flight is done";
}

}  // namespace chat::peer
