// How a thread in runnel::select sleeps on several channels at once: one
// futex word for the thread, and one waker per arm, registered in that arm's
// task_waiters list exactly like a parked pipeline task. A notifier that
// takes a waker out of its list calls wake(), which raises the word and
// wakes the thread; the thread then takes its other wakers back.
//
// The waker lives in the select call's stack frame, and a notifier calls
// wake() after it has unlinked the waker and released the list's lock. So a
// thread whose remove() fails (a notifier has the waker) must not return
// before that wake() has finished: wake() sets `done` as its very last
// access, and finish() waits for it. The wait is bounded by a notifier's few
// instructions between its unlock and its wake() (it yields if the notifier
// was descheduled there).
#pragma once

#include <atomic>
#include "../detail/chrono.hpp"  // not <chrono>: see there
#include <cstdint>
#include <thread>

#include "../detail/assert.hpp"
#include "../detail/backoff.hpp"
#include "../detail/futex.hpp"
#include "task_waiters.hpp"

namespace runnel::detail {

class select_parker {
 public:
  // One per arm. The base's wake pointer is the only field a notifier uses.
  struct arm_waker : waker {
    select_parker* parker = nullptr;
    // Set by wake() after its last access to this object or to the parker.
    std::atomic<bool> done{false};
  };

  // Readies w for registration on behalf of this parker.
  void prepare(arm_waker& w) noexcept {
    // Relaxed: w is not registered, so only this thread touches it.
    RUNNEL_ASSERT(w.owner_.load(std::memory_order_relaxed) == nullptr, "a waker is readied while it is in no list");
    w.wake = &on_wake;
    w.parker = this;
    // Relaxed: w is not registered anywhere yet; the list's mutex publishes it.
    w.done.store(false, std::memory_order_relaxed);
  }

  // Sleeps until some registered waker was woken (true), or until the
  // deadline (false).
  bool sleep_until(std::chrono::steady_clock::time_point deadline) noexcept {
    const bool forever = deadline == std::chrono::steady_clock::time_point::max();
    // Acquire: pairs with wake()'s release, so what the notifier published
    // before notifying is visible to the re-scan that follows.
    while (word_.load(std::memory_order_acquire) == 0) {
      if (forever) futex_wait(word_, 0);
      else if (!futex_wait_until(word_, 0, deadline)) return word_.load(std::memory_order_acquire) != 0;
    }
    return true;
  }

  // After remove() failed for w: waits until its notifier has left wake().
  static void finish(arm_waker& w) noexcept {
    // Acquire: after this, no other thread touches w or the parker. A few
    // pauses first (the notifier is a few instructions away), then yields.
    for (unsigned i = 0; !w.done.load(std::memory_order_acquire); ++i) {
      if (i < finish_spins) cpu_relax();
      else std::this_thread::yield();
    }
  }

 private:
  static void on_wake(waker* base) noexcept {
    auto* w = static_cast<arm_waker*>(base);
    select_parker* p = w->parker;
    // Relaxed: done is written by this function and by prepare(), which the
    // list's mutex orders before us.
    RUNNEL_ASSERT(p != nullptr && !w->done.load(std::memory_order_relaxed),
                  "a readied waker is woken once per registration");
    // Release: the notifier's publish (before its notify) happens-before the
    // sleeper's acquire load of the word.
    p->word_.store(1, std::memory_order_release);
    futex_wake(p->word_, 1);
    // Release: the last touch; finish() may let the frame go right after.
    w->done.store(true, std::memory_order_release);
  }

  static constexpr unsigned finish_spins = 64;

  // 0 while no waker of this parker has been woken; 1 after. Only the
  // sleeping thread resets it (by making a new parker per sleep).
  std::atomic<std::uint32_t> word_{0};
};

}  // namespace runnel::detail
