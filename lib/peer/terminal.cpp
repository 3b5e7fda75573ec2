// The terminal: libedit's readline-compatible callback interface on a tty, async lines otherwise.
#include "peer/terminal.hpp"

#include <unistd.h>

#include <cstdio>  // before editline: it uses FILE
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>

#include <editline/readline.h>

#include "peer/commands.hpp"

namespace chat::peer {
namespace {

constexpr const char* kPrompt = ">>> ";
// History entries kept across runs.
constexpr int kHistoryLength = 1000;

// libedit's interface is C with global callbacks: the one live Terminal is reached from here.
Terminal* g_terminal = nullptr;
Terminal::LineHandler* g_on_line = nullptr;
Terminal::EndHandler* g_on_end = nullptr;
Terminal::NameSource g_names;

net::io_context* g_io = nullptr;

// The words completed: commands first on the line, names after send/dereg/reg.
std::vector<std::string> g_candidates;
std::size_t g_next = 0;

char* next_candidate(const char* text, int state) {
  if (state == 0) g_next = 0;
  std::size_t len = std::strlen(text);
  while (g_next < g_candidates.size()) {
    const std::string& c = g_candidates[g_next++];
    if (c.compare(0, len, text) == 0) return strdup(c.c_str());
  }
  return nullptr;
}

// Ctrl+D: end of input on an empty line (libedit's callback mode never reports it), else
// delete the character under the cursor as usual.
int on_ctrl_d(int, int) {
  if (rl_end == 0) {
    net::post(*g_io, [] {
      if (g_on_end) (*g_on_end)();
    });
    return 0;
  }
  if (rl_point < rl_end) rl_delete_text(rl_point, rl_point + 1);
  return 0;
}

char** complete(const char* text, int start, int /*end*/) {
  g_candidates.clear();
  std::string before(rl_line_buffer, static_cast<std::size_t>(start));
  std::size_t words = 0;
  bool in_word = false;
  for (char c : before) {
    if (c != ' ' && !in_word) ++words;
    in_word = c != ' ';
  }
  if (words == 0) {
    g_candidates = {"send", "send_all", "list", "dereg", "reg", "help", "quit", "exit"};
  } else if (words == 1 && g_names) {
    std::string first = before.substr(before.find_first_not_of(' '));
    first = first.substr(0, first.find(' '));
    if (first == "send" || first == "dereg" || first == "reg") g_candidates = g_names();
  }
  rl_attempted_completion_over = 1;  // never fall back to file names
  return rl_completion_matches(text, next_candidate);
}

}  // namespace

// Runs inside libedit: the handlers may stop the terminal, so they run after it returns.
void on_edited_line(char* line) {
  if (line == nullptr) {
    net::post(*g_io, [] {
      if (g_on_end) (*g_on_end)();
    });
    return;
  }
  std::string text(line);
  std::free(line);
  if (!text.empty()) add_history(text.c_str());
  // libedit has left editing mode for this line: output goes plainly until the next prompt
  // (the status line stays where it was, above the accepted line, and is shown afresh then).
  if (g_terminal != nullptr) {
    g_terminal->between_lines_ = true;
    g_terminal->status_shown_ = false;
  }
  net::post(*g_io, [text = std::move(text)] {
    if (g_on_line) (*g_on_line)(text);
    // A fresh prompt, back in editing mode, below whatever the line printed.
    if (g_terminal != nullptr && g_terminal->editing_) {
      g_terminal->between_lines_ = false;
      if (!g_terminal->status_.empty()) {
        std::cout << g_terminal->status_ << '\n' << std::flush;
        g_terminal->status_shown_ = true;
      }
      rl_callback_handler_install(kPrompt, on_edited_line);
    }
  });
}


std::string history_file() {
  namespace fs = std::filesystem;
  fs::path dir;
  if (const char* xdg = std::getenv("XDG_STATE_HOME"); xdg != nullptr && *xdg != '\0') dir = xdg;
  else if (const char* home = std::getenv("HOME"); home != nullptr && *home != '\0')
    dir = fs::path(home) / ".local" / "state";
  else return {};
  return (dir / "chatapp" / "history").string();
}

Terminal::Terminal(net::io_context& io) : io_(io), input_(io) {
  interactive_ = ::isatty(STDIN_FILENO) == 1;
  const char* no_colour = std::getenv("NO_COLOR");
  colour_ = ::isatty(STDOUT_FILENO) == 1 && (no_colour == nullptr || *no_colour == '\0');
}

Terminal::~Terminal() { stop(); }

void Terminal::start(LineHandler on_line, EndHandler on_end, NameSource names) {
  on_line_ = std::move(on_line);
  on_end_ = std::move(on_end);
  error_code ec;
  input_.assign(::dup(STDIN_FILENO), ec);
  if (ec) {
    std::cerr << "ChatApp: cannot read standard input: " << ec.message() << '\n';
    return;
  }
  if (!interactive_) {
    read_plain();
    return;
  }
  g_terminal = this;
  g_io = &io_;
  g_on_line = &on_line_;
  g_on_end = &on_end_;
  g_names = std::move(names);
  rl_readline_name = "ChatApp";
  rl_attempted_completion_function = complete;
  using_history();
  stifle_history(kHistoryLength);
  history_path_ = history_file();
  if (!history_path_.empty()) {
    std::error_code fs_ec;
    std::filesystem::create_directories(std::filesystem::path(history_path_).parent_path(), fs_ec);
    read_history(history_path_.c_str());
  }
  rl_callback_handler_install(kPrompt, on_edited_line);
  rl_bind_key(4, on_ctrl_d);
  editing_ = true;
  wait_tty();
}

void Terminal::stop() {
  error_code ec;
  input_.close(ec);
  if (!editing_) return;
  editing_ = false;
  rl_callback_handler_remove();
  if (!history_path_.empty()) write_history(history_path_.c_str());
  g_terminal = nullptr;
  g_on_line = nullptr;
  g_on_end = nullptr;
  std::cout << '\n' << std::flush;
}

void Terminal::wait_tty() {
  // On a tty, epoll works: wait until a key is there, then let libedit take it.
  input_.async_wait(net::posix::stream_descriptor::wait_read, [this](error_code ec) {
    if (ec || !editing_) return;
    rl_callback_read_char();
    if (editing_) wait_tty();
  });
}

void Terminal::read_plain() {
  // Pipes, files and /dev/null: read lines to the end (never wait-then-read: see STYLE.md).
  net::async_read_until(input_, buffer_, '\n', [this](error_code ec, std::size_t n) {
    if (ec == net::error::operation_aborted) return;
    if (ec) {
      // A last line without its newline is still a line (`printf 'send bob hi' | ChatApp ...`).
      if (buffer_.size() > 0) {
        std::string last(net::buffers_begin(buffer_.data()), net::buffers_end(buffer_.data()));
        buffer_.consume(buffer_.size());
        if (on_line_) on_line_(last);
      }
      if (on_end_) on_end_();
      return;
    }
    std::string line(net::buffers_begin(buffer_.data()), net::buffers_begin(buffer_.data()) + n - 1);
    buffer_.consume(n);
    if (on_line_) on_line_(line);
    if (input_.is_open()) read_plain();
  });
}

std::string Terminal::colour(const std::string& line) const {
  if (!colour_ || line.rfind(kPrompt, 0) != 0) return line;
  std::string body = line.substr(4);
  if (body.rfind('[', 0) == 0) return std::string(kPrompt) + "\033[36m" + body + "\033[0m";  // status: cyan
  std::size_t colon = body.find(": ");
  if (colon == std::string::npos) return line;
  return std::string(kPrompt) + "\033[1;33m" + body.substr(0, colon) + "\033[0m" + body.substr(colon);
}

void Terminal::print(const std::string& line) {
  if (!editing_ || between_lines_) {
    std::cout << line << '\n' << std::flush;
    return;
  }
  // Clear the prompt line (and the status line above it), print there, then the status line
  // again, then let libedit redraw prompt and typed text.
  std::cout << "\r\033[K";
  if (status_shown_) std::cout << "\033[A\r\033[K";
  std::cout << colour(line) << '\n';
  if (status_shown_) std::cout << status_ << '\n';
  std::cout << std::flush;
  rl_forced_update_display();
}

void Terminal::status(const std::string& text) {
  if (!editing_) return;
  status_ = text;
  if (between_lines_) return;  // shown with the next prompt
  std::cout << "\r\033[K";
  if (status_shown_) std::cout << "\033[A\r\033[K";
  if (!text.empty()) std::cout << text << '\n';
  status_shown_ = !text.empty();
  std::cout << std::flush;
  rl_forced_update_display();
}

}  // namespace chat::peer
