// Benchmark of the offline store's save rate (commit each vs group commit) beside a same-run fdatasync baseline.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "offline/store.hpp"

namespace {

namespace fs = std::filesystem;
using chat::offline::NewMessage;

/// Messages (or records) per figure; --quick trades precision for a short run.
constexpr std::size_t full_n = 2000;
constexpr std::size_t quick_n = 300;
/// A saved message's body: about a short chat line sealed for its recipient (design v2: the
/// text plus 58 bytes of box, kind, mid, sent_ms and name).
constexpr std::size_t body_bytes = 80;
/// About the size of a saved row (the body, the sender's 32-byte key, the names and numbers),
/// so the baseline writes what a save writes.
constexpr std::size_t record_bytes = body_bytes + 32 + 20;

using Clock = std::chrono::steady_clock;

void print(std::size_t n, std::string_view metric, double value) {
  std::printf("{\"bench\": \"store\", \"n\": %zu, \"metric\": \"%.*s\", \"value\": %.1f, \"unit\": \"1/s\"}\n", n,
              static_cast<int>(metric.size()), metric.data(), value);
  std::fflush(stdout);
}

double per_second(std::size_t n, Clock::duration d) {
  return static_cast<double>(n) / std::chrono::duration<double>(d).count();
}

std::vector<NewMessage> make_messages(std::size_t n) {
  std::vector<NewMessage> out;
  out.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    out.push_back(NewMessage{.to = "recipient" + std::to_string(i % 8),
                             .from = "sender",
                             .from_key = std::string(32, 'k'),
                             .kind = chat::offline::Kind::direct,
                             .ts_us = static_cast<std::int64_t>(i),
                             .mid = i,
                             .body = std::string(body_bytes, 'm')});
  }
  return out;
}

/// Saves in batches of `batch` messages, one commit per batch, each into a fresh store.
double store_rate(const fs::path& dir, const std::vector<NewMessage>& msgs, std::size_t batch) {
  auto store = chat::offline::open_sqlite_store(dir.string());
  const std::span<const NewMessage> all(msgs);
  const auto start = Clock::now();
  for (std::size_t i = 0; i < all.size(); i += batch) {
    const auto inserted = store->save(all.subspan(i, std::min(batch, all.size() - i)));
    // A message the store took for a repeat writes nothing and would flatter the rate.
    if (std::find(inserted.begin(), inserted.end(), false) != inserted.end()) {
      throw std::runtime_error("a benchmark message was taken for a repeat and not inserted");
    }
  }
  return per_second(all.size(), Clock::now() - start);
}

/// Appends n records to a plain file with one fdatasync per `every` records: the floor under any durable store.
double fdatasync_rate(const fs::path& file, std::size_t n, std::size_t every) {
  const int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) throw std::runtime_error("open " + file.string() + ": " + std::strerror(errno));
  const std::string record(record_bytes - 1, 'r');
  const std::string line = record + "\n";
  const auto start = Clock::now();
  for (std::size_t i = 0; i < n; ++i) {
    if (::write(fd, line.data(), line.size()) != static_cast<ssize_t>(line.size())) {
      ::close(fd);
      throw std::runtime_error("write " + file.string() + ": " + std::strerror(errno));
    }
    if ((i + 1) % every == 0 || i + 1 == n) {
      if (::fdatasync(fd) != 0) {
        ::close(fd);
        throw std::runtime_error("fdatasync " + file.string() + ": " + std::strerror(errno));
      }
    }
  }
  const auto elapsed = Clock::now() - start;
  ::close(fd);
  return per_second(n, elapsed);
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t n = full_n;
  std::string base = "/tmp";
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--quick") {
      n = quick_n;
    } else if (arg == "-h" || arg == "--help") {
      std::printf("usage: %s [--quick] [DIR]   (DIR defaults to /tmp)\n", argv[0]);
      return 0;
    } else {
      base = std::string(arg);
    }
  }

  std::string tmpl = (fs::path(base) / "bench-store-XXXXXX").string();
  if (mkdtemp(tmpl.data()) == nullptr) {
    std::fprintf(stderr, "bench_store: cannot create a temp dir under %s: %s\n", base.c_str(), std::strerror(errno));
    return 1;
  }
  const fs::path work = tmpl;

  int rc = 0;
  try {
    const auto msgs = make_messages(n);
    print(n, "saves_per_s_commit_each", store_rate(work / "each", msgs, 1));
    print(n, "saves_per_s_batch16", store_rate(work / "batch16", msgs, 16));
    print(n, "saves_per_s_batch64", store_rate(work / "batch64", msgs, 64));
    print(n, "baseline_fdatasync_each_per_s", fdatasync_rate(work / "baseline-each", n, 1));
    print(n, "baseline_fdatasync_per16_per_s", fdatasync_rate(work / "baseline-16", n, 16));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_store: %s\n", e.what());
    rc = 1;
  }
  std::error_code ec;
  fs::remove_all(work, ec);
  return rc;
}
