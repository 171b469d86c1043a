// What a ring try-operation does when the cell it needs is held by another
// thread's push or pop still in progress (see detail/mpmc_ring.hpp), and the
// policy tags that let one attempt be written once and run under either
// policy (see spin_then_park() in detail/event_count.hpp).
#pragma once

#include <thread>
#include <type_traits>

#include "backoff.hpp"

namespace runnel::detail {

enum class claimed_cell {
  give_up,  // report empty / full: lock-free, not linearizable
  wait,     // wait for that operation: linearizable, may wait for another thread
};

// A policy as a value whose type carries it, so that a generic lambda
// `[&](auto policy) { ... try_push<policy.value>(...) ... }` can be
// instantiated once per policy.
template <claimed_cell Policy>
using claimed_cell_tag = std::integral_constant<claimed_cell, Policy>;

// While waiting for another thread's claimed cell: spin a few rounds, then
// yield, since that thread may need our core to finish its move.
inline void pause_for_claim(unsigned& round) noexcept {
  constexpr unsigned spin_rounds = 16;  // ~ a move of a few hundred bytes
  if (round < spin_rounds) {
    ++round;
    cpu_relax();
  } else {
    std::this_thread::yield();
  }
}

}  // namespace runnel::detail
