// The client's terminal: line editing, history and completion on a tty (libedit), plain lines otherwise.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "transport/net.hpp"

namespace chat::peer {

void on_edited_line(char* line);

/// Reads command lines and prints output lines without ever scrambling a half-typed line.
/// On a terminal it uses libedit's callback interface driven by the io_context (no thread);
/// on a pipe, a file or /dev/null it reads plain lines and writes no escape codes.
class Terminal {
 public:
  using LineHandler = std::function<void(const std::string& line)>;
  using EndHandler = std::function<void()>;
  /// Candidates for Tab completion of names (the local table).
  using NameSource = std::function<std::vector<std::string>()>;

  explicit Terminal(net::io_context& io);
  Terminal(const Terminal&) = delete;
  Terminal& operator=(const Terminal&) = delete;
  ~Terminal();

  /// Starts reading; `on_line` gets each line, `on_end` end of input.
  void start(LineHandler on_line, EndHandler on_end, NameSource names);
  /// Stops reading and restores the terminal.
  void stop();
  /// Prints one line (without its newline) above the prompt; the typed text is redrawn intact.
  void print(const std::string& line);
  /// On a terminal: shows `text` as the status line, just above the prompt, redrawn in place
  /// (empty: removed). Lines printed meanwhile go above it. Does nothing off a terminal.
  void status(const std::string& text);
  /// True when stdin is a terminal (line editing on).
  bool interactive() const { return interactive_; }

 private:
  void read_plain();
  void wait_tty();
  std::string colour(const std::string& line) const;

  net::io_context& io_;
  net::posix::stream_descriptor input_;
  net::streambuf buffer_;
  LineHandler on_line_;
  EndHandler on_end_;
  bool interactive_ = false;
  bool colour_ = false;
  bool editing_ = false;  // libedit's handler is installed
  bool between_lines_ = false;  // a line was accepted; its command runs before the next prompt
  std::string status_;          // the status line, shown above the prompt when not empty
  bool status_shown_ = false;   // it is on the screen, on the row above the prompt
  friend void on_edited_line(char* line);
  std::string history_path_;
};

/// Where history is kept: $XDG_STATE_HOME/chatapp/history, else ~/.local/state/chatapp/history.
std::string history_file();

}  // namespace chat::peer
