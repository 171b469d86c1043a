// Turning a timeout into a steady_clock deadline without overflow.
//
// now() + ceil<nanoseconds>(hours::max()) overflows (signed, undefined); a
// user who writes "wait for ever" as a huge timeout must get just that. So a
// timeout too large to add is clamped to time_point::max(), which every wait
// below treats as "never".
#pragma once

#include <chrono>

namespace runnel::detail {

template <class Rep, class Period>
std::chrono::steady_clock::time_point deadline_after(std::chrono::duration<Rep, Period> timeout) noexcept {
  using clock = std::chrono::steady_clock;
  const clock::time_point now = clock::now();
  if (!(timeout > timeout.zero())) return now;  // zero, negative (or NaN): one attempt only
  // Compare in floating seconds, where neither side can overflow. Half of the
  // room keeps the rounding of the comparison (about 2^-52 relative) and of
  // the ceil below well inside the representable range; anything beyond is
  // centuries away and means "never" anyway.
  const std::chrono::duration<double> room = clock::time_point::max() - now;
  if (std::chrono::duration<double>(timeout) >= room / 2) return clock::time_point::max();
  return now + std::chrono::ceil<clock::duration>(timeout);
}

}  // namespace runnel::detail
