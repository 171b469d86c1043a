// The atomics an algorithm is written against, as a type parameter, so that
// a model checker can run the same code with its own instrumented atomics
// (tests/relacy/). Production code always uses std_atomics, the default;
// nothing but the type names changes, and the compiler sees std::atomic.
//
// A family provides:
//   template <class U> using atomic = ...;   load/store/compare_exchange_weak
//                                            /fetch_add with std::memory_order
//   static void pause_for_claim(unsigned&);  one step of waiting for another
//                                            thread's claimed cell (a model
//                                            checker must see it as a yield)
//   using backoff = ...;                     the spin before a thread sleeps
//                                            (detail/backoff.hpp's interface:
//                                            spin(), reset()); a model checker
//                                            spins not at all, since every
//                                            retry multiplies its interleavings
// and, for event_count's handshake and sleep (event_count.hpp):
//   static bool membarrier_ready();          whether the asymmetric fence pair
//                                            is available
//   static void heavy_fence(), full_fence(); the fences of asymmetric_fence.hpp
//   static void futex_wait(atomic<std::uint32_t>&, std::uint32_t);
//   static bool futex_wait_until(atomic<std::uint32_t>&, std::uint32_t, time_point);
//   static void futex_wake(atomic<std::uint32_t>&, int);   as in futex.hpp
#pragma once

#include <atomic>
#include "chrono.hpp"  // not <chrono>: see there
#include <cstdint>

#include "asymmetric_fence.hpp"
#include "backoff.hpp"
#include "claimed_cell.hpp"
#include "futex.hpp"

namespace runnel::detail {

struct std_atomics {
  template <class U>
  using atomic = std::atomic<U>;

  static void pause_for_claim(unsigned& round) noexcept { detail::pause_for_claim(round); }
  using backoff = detail::backoff;

  static bool membarrier_ready() noexcept { return detail::membarrier_ready(); }
  static void heavy_fence() noexcept { detail::heavy_fence(); }
  static void full_fence() noexcept { detail::full_fence(); }

  static void futex_wait(atomic<std::uint32_t>& word, std::uint32_t expected) noexcept {
    detail::futex_wait(word, expected);
  }
  static bool futex_wait_until(atomic<std::uint32_t>& word, std::uint32_t expected,
                               std::chrono::steady_clock::time_point deadline) noexcept {
    return detail::futex_wait_until(word, expected, deadline);
  }
  static void futex_wake(atomic<std::uint32_t>& word, int count) noexcept { detail::futex_wake(word, count); }
};

}  // namespace runnel::detail
