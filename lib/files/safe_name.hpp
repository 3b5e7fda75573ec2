// What an offered file is saved as: a hostile name reduced to a safe basename, a free name in
// the download directory, and a move into place that never replaces an existing file.
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>

#include "files/result.hpp"

namespace chat::files {

/// Longest saved name, in bytes (NAME_MAX on Linux filesystems).
inline constexpr std::size_t kMaxNameBytes = 255;
/// Longest extension (with its dot) kept when a long name is shortened or numbered.
inline constexpr std::size_t kMaxExtensionBytes = 32;

/// The name `offered` reduces to, safe to create in a download directory: only the last path
/// component (after any '/' or '\\'); without control characters (C0, DEL, C1), NUL, bidi
/// overrides and line separators (which let "exe.txt" be shown for "txt.exe"); invalid UTF-8
/// replaced by U+FFFD; without leading dots or spaces (never hidden, never "." or "..") and
/// trailing ones; at most kMaxNameBytes, cut on a UTF-8 boundary, keeping the extension. An
/// empty result is "file". Never throws but for std::bad_alloc.
std::string safe_basename(std::string_view offered);

/// The longest prefix of the UTF-8 text `s` of at most `max` bytes that does not cut a sequence.
std::string_view utf8_prefix(std::string_view s, std::size_t max);

/// The first of dir/name, dir/"stem (1).ext", dir/"stem (2).ext", ... that does not exist (a
/// dangling symlink exists), the stem shortened so the name stays within kMaxNameBytes; empty
/// if the first 100000 are all taken. `safe_name` must come from safe_basename(). Another
/// process may take the name before it is used: publish() never replaces, so retry on `exists`.
std::filesystem::path unique_path(const std::filesystem::path& dir, std::string_view safe_name);

/// Moves the finished file `from` to `to` in one step without ever replacing a file at `to`:
/// renameat2(RENAME_NOREPLACE), or link() and unlink() where the filesystem lacks it. An error
/// of kind `exists` means `to` was taken (nothing moved): take the next unique_path().
Status publish(const std::filesystem::path& from, const std::filesystem::path& to);

/// publish() by link() and unlink() only: its fallback, public so that it is tested too.
Status publish_by_link(const std::filesystem::path& from, const std::filesystem::path& to);

}  // namespace chat::files
