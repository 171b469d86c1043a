// An event count: lets a thread sleep until "something may have changed"
// without a lost wake-up, and lets notifiers skip the syscall when nobody
// sleeps.
//
// Sleeper:                              Notifier:
//   auto k = ec.prepare_wait();           publish the change;
//   if (condition holds) {                ec.notify_one();   // or _all
//     ec.cancel_wait(); return; }
//   ec.wait(k);
//
// prepare_wait() counts the sleeper in and issues the heavy side of the
// asymmetric fence; notify_*() issues the light side and then reads the
// count. Together they form a Dekker handshake: either the notifier sees the
// sleeper, or the sleeper's re-check sees the change.
//
// Invariant: waiters_ counts the threads between prepare_wait() and the end
// of their wait; each prepare_wait() is ended exactly once, by cancel_wait()
// or by wait()/wait_until() (asserted: the count never goes below zero).
//
// Atomics: the atomic family (detail/atomic_family.hpp), which also supplies
// the fences and the futex; std_atomics except under the model checker
// (tests/relacy/relacy_event_count_test.cpp). `event_count` is the std one.
#pragma once

#include <atomic>
#include "chrono.hpp"  // not <chrono>: see there
#include <cstdint>

#include "assert.hpp"
#include "atomic_family.hpp"
#include "backoff.hpp"
#include "claimed_cell.hpp"

namespace runnel::detail {

template <class Atomics = std_atomics>
class basic_event_count {
  template <class U>
  using atomic = typename Atomics::template atomic<U>;

 public:
  basic_event_count() noexcept : asymmetric_(Atomics::membarrier_ready()) {}

  struct key {
    std::uint32_t epoch;
  };

  key prepare_wait() noexcept {
    // Relaxed: the heavy fence right after orders this store before the
    // condition re-check, and that is the only order the handshake needs.
    [[maybe_unused]] const std::uint32_t before = waiters_.fetch_add(1, std::memory_order_relaxed);
    RUNNEL_ASSERT(before != UINT32_MAX, "more waiters than a 32-bit count holds");
    if (asymmetric_) Atomics::heavy_fence();
    else Atomics::full_fence();
    // Acquire: a notifier that bumped the epoch published its change before
    // the bump, so reading the new epoch means the re-check sees the change.
    return key{epoch_.load(std::memory_order_acquire)};
  }

  void cancel_wait() noexcept {
    // Relaxed: a stale higher count only costs a notifier one spare syscall.
    [[maybe_unused]] const std::uint32_t before = waiters_.fetch_sub(1, std::memory_order_relaxed);
    RUNNEL_ASSERT(before != 0, "a wait ended twice, or without prepare_wait()");
  }

  // Sleep until a notify after prepare_wait(); always ends the wait.
  void wait(key k) noexcept {
    // Acquire: pairs with the release bump in notify, see prepare_wait().
    while (epoch_.load(std::memory_order_acquire) == k.epoch) Atomics::futex_wait(epoch_, k.epoch);
    cancel_wait();
  }

  // As wait(), giving up at `deadline`; returns false on time-out. Always
  // ends the wait.
  bool wait_until(key k, std::chrono::steady_clock::time_point deadline) noexcept {
    bool woken = true;
    // Acquire: as in wait().
    while (epoch_.load(std::memory_order_acquire) == k.epoch) {
      if (!Atomics::futex_wait_until(epoch_, k.epoch, deadline)) {
        woken = false;
        break;
      }
    }
    cancel_wait();
    return woken;
  }

  // Wake one sleeper if there is any. Cost with no sleeper: a compiler
  // barrier (or one fence without membarrier) and a read of a line that
  // stays shared in every core's cache.
  void notify_one() noexcept { notify(1); }
  void notify_all() noexcept { notify(INT32_MAX); }

  // Whether anybody is between prepare_wait() and the end of its wait.
  bool has_waiters() const noexcept {
    // Relaxed: a hint for callers that will notify anyway on a true answer.
    return waiters_.load(std::memory_order_relaxed) != 0;
  }

 private:
  void notify(int count) noexcept {
    // The light side of the handshake. Read from a member rather than from
    // light_fence() so that the no-sleeper path is one line's loads and no
    // check of a function-local static's guard.
    if (asymmetric_) std::atomic_signal_fence(std::memory_order_seq_cst);
    else Atomics::full_fence();
    // Relaxed: ordered after the caller's publish by the fence above.
    if (waiters_.load(std::memory_order_relaxed) == 0) return;
    // Release: a sleeper that reads the new epoch also sees the publish.
    epoch_.fetch_add(1, std::memory_order_release);
    Atomics::futex_wake(epoch_, count);
  }

  // Moves on at each notify that saw a waiter; a sleeper sleeps while it
  // still holds the value its prepare_wait() read.
  atomic<std::uint32_t> epoch_{0};
  // The threads between prepare_wait() and the end of their wait.
  atomic<std::uint32_t> waiters_{0};
  // membarrier_ready() at construction; it never changes once true, so both
  // sides of every handshake on this object agree on the fence pair.
  const bool asymmetric_;
};

using event_count = basic_event_count<>;

// The waiting part of spin_then_park(), kept apart so that the caller's
// fast path (one successful attempt) stays small. `attempt` is what the
// spinning retries; `last_attempt` is the check made after prepare_wait(),
// the one that decides whether to sleep.
template <class Atomics, class Attempt, class LastAttempt>
void spin_then_park_slow(basic_event_count<Atomics>& ec, Attempt& attempt, LastAttempt& last_attempt) noexcept {
  typename Atomics::backoff bo;
  for (;;) {
    if (attempt()) return;
    if (bo.spin()) continue;
    const auto key = ec.prepare_wait();
    if (last_attempt()) {
      ec.cancel_wait();
      return;
    }
    ec.wait(key);
    bo.reset();
  }
}

// As above with one exact attempt (a noexcept callable returning bool, false
// only when sleeping is right) for both the spinning and the last check.
template <class Atomics, class Attempt>
void spin_then_park_slow(basic_event_count<Atomics>& ec, Attempt& attempt) noexcept {
  spin_then_park_slow(ec, attempt, attempt);
}

// Retries an attempt with backoff, then parks on `ec` until an attempt
// succeeds. Whoever makes an attempt succeed must notify `ec` after
// publishing the change.
//
// `attempt(policy)` is a noexcept callable returning bool, written once and
// called with claimed_cell_tag<give_up> while spinning (a lock-free try that
// may fail spuriously on a cell another thread holds) and with
// claimed_cell_tag<wait> for the check made after prepare_wait() (fails only
// when sleeping is right). Sleeping is then as correct as with the exact
// attempt alone, and the hot loop never waits on another thread.
template <class Atomics, class Attempt>
inline void spin_then_park(basic_event_count<Atomics>& ec, Attempt&& attempt) noexcept {
  auto spin = [&attempt]() noexcept { return attempt(claimed_cell_tag<claimed_cell::give_up>{}); };
  if (spin()) return;
  auto last = [&attempt]() noexcept { return attempt(claimed_cell_tag<claimed_cell::wait>{}); };
  spin_then_park_slow(ec, spin, last);
}

}  // namespace runnel::detail
