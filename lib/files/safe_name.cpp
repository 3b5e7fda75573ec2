// Safe names for received files and a publish step that never overwrites.
#include "files/safe_name.hpp"

#include "protocol/codec.hpp"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <unistd.h>

namespace chat::files {
namespace {

namespace fs = std::filesystem;

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD, for each invalid byte
constexpr int kMaxCopies = 100000;                          // "name (100000).ext" is the last try


// Characters a saved name never keeps: they hide, break or disguise it on a terminal or in a
// file manager.
bool unwanted(char32_t c) {
  return c < 0x20 || c == 0x7F || (c >= 0x80 && c <= 0x9F)        // C0, DEL, C1 controls
         || c == 0x200E || c == 0x200F                             // LRM, RLM
         || (c >= 0x202A && c <= 0x202E)                           // bidi embeddings, overrides
         || (c >= 0x2066 && c <= 0x2069)                           // bidi isolates
         || c == 0x2028 || c == 0x2029 || c == 0xFEFF;             // line/paragraph separators, BOM
}

bool dot_or_space(char c) { return c == '.' || c == ' '; }

std::string_view trim(std::string_view s) {
  while (!s.empty() && dot_or_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && dot_or_space(s.back())) s.remove_suffix(1);
  return s;
}

// Where the extension of a safe name starts (its last dot), or npos when it has none worth
// keeping: no dot, a dot first, or longer than kMaxExtensionBytes.
std::size_t extension_at(std::string_view name) {
  const std::size_t dot = name.rfind('.');
  if (dot == std::string_view::npos || dot == 0 || name.size() - dot > kMaxExtensionBytes) return std::string_view::npos;
  return dot;
}

// `stem` + `middle` + `ext`, the stem shortened (on a UTF-8 boundary) so it fits kMaxNameBytes.
std::string fit(std::string_view stem, std::string_view middle, std::string_view ext) {
  const std::size_t room = kMaxNameBytes - middle.size() - ext.size();
  std::string out(utf8_prefix(stem, room));
  while (!out.empty() && out.back() == ' ') out.pop_back();  // no "name .pdf" after a cut
  return out.append(middle).append(ext);
}

bool taken(const fs::path& p) {
  std::error_code ec;
  const fs::file_status st = fs::symlink_status(p, ec);  // a dangling symlink is taken too
  if (ec) return ec != std::errc::no_such_file_or_directory;
  return fs::exists(st);
}

FileError error_of(int err, const fs::path& from, const fs::path& to) {
  FileError e;
  e.code = err;
  e.kind = err == EEXIST ? ErrorKind::exists : (err == ENOSPC || err == EDQUOT) ? ErrorKind::disk_full : ErrorKind::io;
  e.message = std::string("Cannot move ").append(from.string()).append(" to ").append(to.string());
  e.message.append(": ").append(std::strerror(err)).append(".");
  return e;
}

}  // namespace

std::string_view utf8_prefix(std::string_view s, std::size_t max) {
  if (s.size() <= max) return s;
  std::size_t cut = max;
  while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;  // s[cut] starts the next one
  return s.substr(0, cut);
}

std::string safe_basename(std::string_view offered) {
  // The last non-empty component: "a/b\\c.txt" -> "c.txt", "dir/" -> "dir". Both separators
  // are ASCII, so they never occur inside a multibyte sequence.
  std::string_view last;
  std::size_t start = 0;
  for (std::size_t i = 0; i <= offered.size(); ++i) {
    if (i == offered.size() || offered[i] == '/' || offered[i] == '\\') {
      if (i > start) last = offered.substr(start, i - start);
      start = i + 1;
    }
  }

  std::string clean;
  for (std::size_t i = 0; i < last.size();) {
    char32_t cp = 0;
    const std::size_t n = protocol::utf8_sequence(last.substr(i), cp);
    if (n == 0) {
      clean.append(kReplacement);
      ++i;
      continue;
    }
    if (!unwanted(cp)) clean.append(last.substr(i, n));
    i += n;
  }

  std::string_view name = trim(clean);
  if (name.empty()) return "file";
  if (name.size() <= kMaxNameBytes) return std::string(name);
  const std::size_t dot = extension_at(name);
  if (dot == std::string_view::npos) return std::string(trim(utf8_prefix(name, kMaxNameBytes)));
  return fit(name.substr(0, dot), "", name.substr(dot));
}

fs::path unique_path(const fs::path& dir, std::string_view safe_name) {
  const fs::path first = dir / std::string(safe_name);
  if (!taken(first)) return first;
  const std::size_t dot = extension_at(safe_name);
  const std::string_view stem = dot == std::string_view::npos ? safe_name : safe_name.substr(0, dot);
  const std::string_view ext = dot == std::string_view::npos ? std::string_view() : safe_name.substr(dot);
  for (int n = 1; n <= kMaxCopies; ++n) {
    const fs::path p = dir / fit(stem, std::string(" (").append(std::to_string(n)).append(")"), ext);
    if (!taken(p)) return p;
  }
  return {};
}

Status publish(const fs::path& from, const fs::path& to) {
  if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) == 0) return success();
  const int err = errno;
  // EINVAL (or ENOSYS, ENOTSUP): this filesystem or kernel has no RENAME_NOREPLACE.
  if (err != EINVAL && err != ENOSYS && err != ENOTSUP) return error_of(err, from, to);
  return publish_by_link(from, to);
}

Status publish_by_link(const fs::path& from, const fs::path& to) {
  if (::link(from.c_str(), to.c_str()) != 0) return error_of(errno, from, to);  // never replaces
  // Published; a failed unlink leaves only a second name of the same file behind.
  ::unlink(from.c_str());
  return success();
}

}  // namespace chat::files
