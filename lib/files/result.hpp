// The outcome of a file operation: a value, or a FileError whose message is a full sentence.
#pragma once

#include <string>
#include <utility>
#include <variant>

namespace chat::files {

/// Why a file operation failed: it decides what the caller does next.
enum class ErrorKind {
  io,             // any other system error (errno in FileError::code)
  disk_full,      // ENOSPC or EDQUOT: the caller gives up and discards the partial file
  exists,         // publish(): the target name is taken; take the next unique_path()
  bad_input,      // an argument the file cannot take (an index past the end, a wrong chunk size)
  incomplete,     // Partial::finish() before every chunk is held
  hash_mismatch,  // Partial::finish(): the bytes are not the offered file; the partial file is gone
};

/// What went wrong; `message` is a full sentence to show the user as it is.
struct FileError {
  ErrorKind kind = ErrorKind::io;
  int code = 0;  // errno, 0 if none applies
  std::string message;
};

/// A value, or the error that stopped it. Never throws on its own; value() of an error does.
template <class T>
class Result {
 public:
  Result(T value) : v_(std::move(value)) {}
  Result(FileError error) : v_(std::move(error)) {}
  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }
  T& value() { return std::get<0>(v_); }
  const T& value() const { return std::get<0>(v_); }
  const FileError& error() const { return std::get<1>(v_); }

 private:
  std::variant<T, FileError> v_;
};

/// The result of an operation that gives back nothing but success.
using Status = Result<std::monostate>;
inline Status success() { return std::monostate{}; }

}  // namespace chat::files
