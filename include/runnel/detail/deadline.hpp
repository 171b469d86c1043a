// Deadlines for the timed waits: a timeout or time point of any clock and
// any representation becomes a steady_clock time point, saturating instead
// of overflowing (wait_for(hours::max()) waits for ever).
#pragma once

#include <chrono>
#include <type_traits>

namespace runnel::detail {

// now + timeout on steady_clock; time_point::max() when that would overflow,
// now when the timeout is zero or negative.
template <class Rep, class Period>
std::chrono::steady_clock::time_point deadline_after(std::chrono::duration<Rep, Period> timeout) noexcept {
  using steady = std::chrono::steady_clock;
  const steady::time_point now = steady::now();
  if (!(timeout > timeout.zero())) return now;  // zero, negative (or NaN): one attempt only
  // Compare in long double seconds: exact enough, and no representation of
  // the caller's can overflow it. One second of margin keeps the rounding up
  // below from crossing max().
  using ld_seconds = std::chrono::duration<long double>;
  const auto room = steady::time_point::max() - now;
  if (ld_seconds(timeout) >= ld_seconds(room) - ld_seconds(1)) return steady::time_point::max();
  return now + std::chrono::ceil<steady::duration>(timeout);
}

// A time point of any clock as a steady_clock deadline (other clocks are
// converted once, through the time left until then).
template <class Clock, class Duration>
std::chrono::steady_clock::time_point to_steady_deadline(std::chrono::time_point<Clock, Duration> deadline) noexcept {
  using steady = std::chrono::steady_clock;
  using ld_seconds = std::chrono::duration<long double>;
  if constexpr (std::is_same_v<Clock, steady>) {
    // Compared in long double: a coarse Duration (hours) near its limits
    // would overflow when converted to nanoseconds.
    const steady::time_point now = steady::now();
    if (ld_seconds(deadline.time_since_epoch()) <= ld_seconds(now.time_since_epoch())) return now;
    if (ld_seconds(deadline.time_since_epoch()) >= ld_seconds(steady::time_point::max().time_since_epoch()) - ld_seconds(1))
      return steady::time_point::max();
    return std::chrono::time_point_cast<steady::duration>(deadline);
  } else {
    const auto now = Clock::now();
    if (deadline <= now) return steady::now();
    // Subtract in long double: deadline - now may overflow the clock's type.
    return deadline_after(ld_seconds(deadline.time_since_epoch()) - ld_seconds(now.time_since_epoch()));
  }
}

}  // namespace runnel::detail
