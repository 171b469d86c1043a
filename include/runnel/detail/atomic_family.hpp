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
#pragma once

#include <atomic>

#include "claimed_cell.hpp"

namespace runnel::detail {

struct std_atomics {
  template <class U>
  using atomic = std::atomic<U>;

  static void pause_for_claim(unsigned& round) noexcept { detail::pause_for_claim(round); }
};

}  // namespace runnel::detail
