// A list of parked tasks waiting for a condition on a channel ("data
// available", "space available"), with the same lost-wake-up-free handshake
// as event_count but waking by callback instead of by futex: a pool task that
// cannot proceed registers a waker and returns; the next notify hands the
// waker back to its owner, who re-schedules the task.
//
// Parker:                                   Notifier:
//   list.add(w);          // heavy fence      publish the change;
//   if (condition holds)                      list.notify_n(k);  // light fence,
//     if (list.remove(w)) retry;  // ours        then reads count_
//     else return;  // a notifier took w and will call w.wake
//   return;                // parked
//
// Exactly one party removes a registered waker: remove() or a notify. The one
// that removes it owns the resumption, so a task is never scheduled twice.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>

#include "../detail/assert.hpp"
#include "../detail/asymmetric_fence.hpp"

namespace runnel::detail {

class task_waiters;

// Intrusive list node. The owner keeps it alive while it is registered.
struct waker {
  // Called by the notifier after removing the node; it must only schedule
  // work (e.g. post a task), never run the task inline or block.
  void (*wake)(waker*) noexcept = nullptr;

  waker* prev_ = nullptr;
  waker* next_ = nullptr;
  // Which list holds the node, or nullptr. Written only under that list's
  // mutex; read by remove() of possibly another list, hence atomic.
  std::atomic<task_waiters*> owner_{nullptr};
};

class task_waiters {
 public:
  // Fence flavour of the handshake, fixed for the list's life:
  // asymmetric  notify pays a compiler barrier, add() a membarrier (cheap for
  //             channels where tasks rarely park);
  // symmetric   both sides pay a seq_cst fence (for channels between pool
  //             tasks, which park and wake all the time: membarrier would
  //             interrupt every running worker on every park).
  explicit task_waiters(bool symmetric = false) noexcept : symmetric_(symmetric) {}
  // A waker still registered would be left pointing at a dead list (and its
  // task never resumed): every owner takes its wakers back or is woken first.
  ~task_waiters() {
    RUNNEL_ASSERT(head_ == nullptr && count_.load(std::memory_order_relaxed) == 0,
                  "a waiter list is destroyed with no waker registered");
  }
  task_waiters(const task_waiters&) = delete;
  task_waiters& operator=(const task_waiters&) = delete;

  // Registers w (which must not be registered anywhere) and issues the heavy
  // side of the fence; the caller then re-checks its condition.
  void add(waker& w) noexcept {
    {
      std::lock_guard lock(m_);
      // Relaxed: only list mutex holders write owner_, and a waker that is
      // not registered is written by nobody but its owner (the caller).
      RUNNEL_ASSERT(w.owner_.load(std::memory_order_relaxed) == nullptr && w.wake != nullptr,
                    "a waker is registered in one list at a time, once, with its wake set");
      w.prev_ = tail_;
      w.next_ = nullptr;
      if (tail_ != nullptr) tail_->next_ = &w; else head_ = &w;
      tail_ = &w;
      // Relaxed: only this list's mutex holders write owner_; remove() of
      // this list reads it under the same mutex.
      w.owner_.store(this, std::memory_order_relaxed);
      // Relaxed: the heavy fence below orders it before the caller's re-check.
      count_.fetch_add(1, std::memory_order_relaxed);
    }
    if (symmetric_) full_fence();
    else heavy_fence();
  }

  // Takes w back if it is still registered here. False means a notifier
  // already removed it and will call (or has called) w.wake.
  bool remove(waker& w) noexcept {
    std::lock_guard lock(m_);
    // Relaxed: owner_ == this is only ever written under m_, which we hold.
    if (w.owner_.load(std::memory_order_relaxed) != this) return false;
    unlink(w);
    return true;
  }

  // Wakes up to n registered wakers, oldest first. With nobody registered it
  // costs a compiler barrier and one read of a mostly-shared line; that test
  // is kept inline (it is on every channel send and receive) and the taking
  // out of line, so the compiler's inlining budget does not decide it.
  void notify_n(std::size_t n) noexcept {
    if (symmetric_) full_fence();
    else light_fence();
    // Relaxed: ordered after the caller's publish by the fence above.
    if (n == 0 || count_.load(std::memory_order_relaxed) == 0) return;
    take_and_wake(n);
  }

  void notify_all() noexcept { notify_n(SIZE_MAX); }

  bool empty_approx() const noexcept {
    // Relaxed: a monitoring hint.
    return count_.load(std::memory_order_relaxed) == 0;
  }

 private:
  [[gnu::noinline]] void take_and_wake(std::size_t n) noexcept {
    waker* taken = nullptr;
    {
      std::lock_guard lock(m_);
      while (n-- != 0 && head_ != nullptr) {
        waker* w = head_;
        unlink(*w);
        w->next_ = taken;  // reuse the link for our private list
        taken = w;
      }
    }
    // Wake outside the lock: wake() posts to a pool, which takes its own
    // locks. Reverse order does not matter: every woken task re-checks.
    while (taken != nullptr) {
      waker* next = taken->next_;
      taken->wake(taken);
      taken = next;
    }
  }

  void unlink(waker& w) noexcept {
    // Relaxed: under m_, see add().
    RUNNEL_ASSERT(w.owner_.load(std::memory_order_relaxed) == this, "a waker is removed from its own list, once");
    if (w.prev_ != nullptr) w.prev_->next_ = w.next_; else head_ = w.next_;
    if (w.next_ != nullptr) w.next_->prev_ = w.prev_; else tail_ = w.prev_;
    w.prev_ = w.next_ = nullptr;
    // Relaxed: under m_, see add().
    w.owner_.store(nullptr, std::memory_order_relaxed);
    // Relaxed: a notifier reading a stale non-zero count only takes the lock.
    [[maybe_unused]] const std::uint32_t before = count_.fetch_sub(1, std::memory_order_relaxed);
    RUNNEL_ASSERT(before != 0, "the count of registered wakers never goes below zero");
  }

  const bool symmetric_;
  std::mutex m_;
  waker* head_ = nullptr;  // guarded by m_
  waker* tail_ = nullptr;  // guarded by m_
  // Number of registered wakers; read without the lock by notifiers.
  std::atomic<std::uint32_t> count_{0};
};

}  // namespace runnel::detail
