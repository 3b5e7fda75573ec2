// Where the cores read the time: injected, so tests and fuzzers can make a timeout happen.
#pragma once

#include <chrono>
#include <cstdint>

namespace chat::transport {

using Time = std::chrono::steady_clock::time_point;
using Duration = std::chrono::steady_clock::duration;

/// The two clocks a core needs: monotonic time for timeouts, wall time for timestamps.
class TimeSource {
 public:
  virtual ~TimeSource() = default;
  virtual Time now() const = 0;
  /// Microseconds since the Unix epoch.
  virtual std::int64_t wall_us() const = 0;
};

/// The machine's clocks.
class SystemClock final : public TimeSource {
 public:
  Time now() const override { return std::chrono::steady_clock::now(); }
  std::int64_t wall_us() const override {
    using namespace std::chrono;
    return duration_cast<microseconds>(system_clock::now().time_since_epoch()).count();
  }
};

/// A clock that moves only when told to (unit tests, simulations, fuzzers).
class ManualClock final : public TimeSource {
 public:
  /// Starts at an arbitrary steady time and at `wall_start_us` on the wall clock.
  explicit ManualClock(std::int64_t wall_start_us = 1'767'225'600'000'000)  // 2026-01-01 UTC
      : wall0_(wall_start_us) {}
  Time now() const override { return now_; }
  std::int64_t wall_us() const override {
    return wall0_ + std::chrono::duration_cast<std::chrono::microseconds>(now_ - start_).count();
  }
  void advance(Duration d) { now_ += d; }
  /// Moves to `t` (never backwards).
  void set(Time t) {
    if (t > now_) now_ = t;
  }

 private:
  Time start_ = Time{} + std::chrono::hours(1);
  Time now_ = start_;
  std::int64_t wall0_;
};

}  // namespace chat::transport
