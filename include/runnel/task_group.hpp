// runnel::task_group: fork-join on a thread_pool.
//
//   int fib(runnel::thread_pool& pool, int n) {
//     if (n < 2) return n;
//     int a, b;
//     runnel::task_group g{pool};
//     g.run([&] { a = fib(pool, n - 1); });
//     g.run([&] { b = fib(pool, n - 2); });
//     g.wait();
//     return a + b;
//   }
//
// wait() on a worker of the pool runs pool work while the group is pending
// (its own deque first, where the group's tasks usually are, then the shared
// FIFO and other workers' deques), so recursion needs no extra threads and a
// one-worker pool cannot deadlock. Helping nests: a helped task may wait on
// its own group. Beyond detail::max_help_depth nested waits a worker only
// pops its own deque, so stealing cannot grow the stack without bound.
// wait() on a thread outside the pool blocks (spin, then futex).
//
// When wait() returns, every task run() before it has finished, and its
// callable (with everything it captured) has been destroyed: all of that
// happens-before the return. run() and wait() may be called concurrently from
// any threads; a task counted while wait() is returning is simply left for
// the next wait().
//
// The first exception thrown by one of the group's tasks is rethrown by
// wait(); later ones are dropped. After wait() the group may be reused. The
// destructor waits but never throws.
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <optional>
#include <thread>
#include <type_traits>
#include <utility>

#include "detail/backoff.hpp"
#include "detail/futex.hpp"
#include "pool/task.hpp"
#include "thread_pool.hpp"

namespace runnel {

class task_group {
 public:
  explicit task_group(thread_pool& pool) noexcept : pool_(pool) {}

  task_group(const task_group&) = delete;
  task_group& operator=(const task_group&) = delete;

  ~task_group() {
    try {
      wait();
    } catch (...) {
      // A destructor must not throw; call wait() to see the exception.
    }
  }

  // Schedules f as part of this group. May be called from the group's own
  // tasks. Throws only what allocating or moving f throws (then f is not
  // part of the group).
  template <class F>
  void run(F&& f) {
    // Relaxed: wait() learns of this task through the same variable, and a
    // task that calls run() decrements it only later in its own program
    // order, so no waiter can see the decrement without this increment.
    const std::uint32_t before = state_.fetch_add(1, std::memory_order_relaxed);
    detail::task_node* t;
    try {
      // The user's callable lives in an optional so that it (and everything
      // it captured) is destroyed before finish_one(): once the count drops,
      // wait() may return and the captures' referents may be gone. A task
      // that is discarded unrun (below) never counts down; the optional's
      // destructor then destroys the callable.
      t = detail::make_task([this, fn = std::optional<std::decay_t<F>>(std::in_place, std::forward<F>(f))]() mutable noexcept {
        try {
          (*fn)();
        } catch (...) {
          record(std::current_exception());
        }
        try {
          fn.reset();
        } catch (...) {
          // A throwing destructor: reported like a throwing task.
          record(std::current_exception());
        }
        finish_one();
      });
    } catch (...) {
      finish_one();
      throw;
    }
    try {
      pool_.schedule(t);  // on failure, t is discarded without running
    } catch (...) {
      finish_one();
      throw;
    }
    // A waiter asleep on this group would otherwise only wake when the count
    // drops to 0; it may be the only thread able to run t (a one-worker pool
    // waiting on a group that an outside thread keeps adding to).
    if (before & sleeper_bit) detail::futex_wake(state_, INT32_MAX);
  }

  // Waits for every task run() so far; rethrows the first exception.
  void wait() {
    if (detail::pool_worker* w = pool_.local_worker()) {
      help_until_done(*w);
    } else {
      block_until_done(64);
    }
    // Clear the sleeper bit so that later tasks need not wake anybody, but
    // only while the count is still 0: a run() from another thread may have
    // counted a new task since our last look, and that count must survive
    // (storing 0 here lost it, and the task's finish then underflowed the
    // count). Acquire (also on failure, which re-reads): the tasks' writes,
    // error_ and their callables' destruction happen-before our return; the
    // release sequence of the decrements leads here.
    std::uint32_t s = state_.load(std::memory_order_acquire);
    while (s == sleeper_bit &&
           !state_.compare_exchange_weak(s, 0, std::memory_order_acquire, std::memory_order_acquire)) {
    }
    // Acquire: pairs with record()'s release store of error_ready, so error_
    // is complete. A record() still at error_writing belongs to a task that
    // was counted after our last look (a concurrent run()); it is left for
    // the next wait().
    if (error_state_.load(std::memory_order_acquire) == error_ready) {
      std::exception_ptr e = std::exchange(error_, nullptr);
      // Release: the next record() that claims the slot (acquire) sees our
      // read of error_ done before it writes.
      error_state_.store(error_none, std::memory_order_release);
      std::rethrow_exception(std::move(e));
    }
  }

 private:
  // state_: the count of pending tasks in the low 31 bits; the top bit says a
  // waiter sleeps (or is about to sleep) on the futex and must be woken when
  // the count reaches 0. One word, so the last task's decrement tells it
  // whether to wake without touching the group again (the group may be gone
  // as soon as the count is 0).
  static constexpr std::uint32_t sleeper_bit = 1u << 31;
  static constexpr std::uint32_t count_mask = sleeper_bit - 1;

  std::uint32_t pending() const noexcept {
    // Acquire: a 0 we read makes the finished tasks' writes visible.
    return state_.load(std::memory_order_acquire) & count_mask;
  }

  void record(std::exception_ptr e) noexcept {
    std::uint8_t expected = error_none;
    // Acquire: after the previous wait() released the slot (its read of
    // error_ is done); relaxed on failure: someone else's error wins.
    if (!error_state_.compare_exchange_strong(expected, error_writing, std::memory_order_acquire,
                                              std::memory_order_relaxed))
      return;
    error_ = std::move(e);
    // Release: wait() reads error_ only after seeing error_ready.
    error_state_.store(error_ready, std::memory_order_release);
  }

  void finish_one() noexcept {
    // Release: the task's effects are visible to the waiter that sees the
    // count drop; acquire is not needed (we read nothing the waiter wrote).
    const std::uint32_t before = state_.fetch_sub(1, std::memory_order_release);
    // The futex call only uses the address; if the group was destroyed in
    // between, the kernel finds no waiter (or wakes one that re-checks).
    if (before == (sleeper_bit | 1)) detail::futex_wake(state_, INT32_MAX);
  }

  void help_until_done(detail::pool_worker& w) {
    struct depth_guard {
      std::uint32_t& d;
      explicit depth_guard(std::uint32_t& x) noexcept : d(x) { ++d; }
      ~depth_guard() { --d; }
    } guard(w.help_depth);
    const bool may_steal = w.help_depth <= detail::max_help_depth;
    std::uint32_t idle_rounds = 0;
    while (pending() != 0) {
      detail::task_node* t = nullptr;
      // As in the worker loop: every fair_poll_interval-th task the shared
      // FIFO goes first, so a long fork-join computation does not starve
      // post_fair work.
      if (may_steal && ++w.tick % detail::fair_poll_interval == 0) t = pool_.pop_injected();
      if (t == nullptr) t = w.deque.pop();
      if (t == nullptr && may_steal) t = pool_.find_remote(w);
      if (t != nullptr) {
        pool_.execute(t);
        idle_rounds = 0;
        continue;
      }
      // The group's remaining tasks run elsewhere: spin a little, then sleep
      // until the last one finishes.
      if (++idle_rounds < pool_.opts_.spin_rounds) {
        if (idle_rounds < pool_.opts_.spin_rounds / 2) {
          detail::pause_round();
        } else {
          std::this_thread::yield();
        }
        continue;
      }
      sleep_once();
      idle_rounds = 0;
    }
  }

  void block_until_done(std::uint32_t spins) {
    detail::backoff bo;
    while (pending() != 0) {
      if (spins > 0) {
        --spins;
        if (bo.spin()) continue;
      }
      sleep_once();
    }
  }

  // One futex sleep while the count is non-zero (may return spuriously).
  void sleep_once() noexcept {
    // Relaxed: the value is only a CAS/futex expectation; the acquire load in
    // pending() re-checks before anything is read.
    std::uint32_t s = state_.load(std::memory_order_relaxed);
    for (;;) {
      if ((s & count_mask) == 0) return;
      if (s & sleeper_bit) break;
      // Relaxed: the futex compares the word itself, so the bit and the
      // count travel together; no other data is published by this CAS.
      if (state_.compare_exchange_weak(s, s | sleeper_bit, std::memory_order_relaxed)) {
        s |= sleeper_bit;
        break;
      }
    }
    detail::futex_wait(state_, s);
  }

  thread_pool& pool_;
  std::atomic<std::uint32_t> state_{0};
  // error_state_: whether error_ holds the first exception since the last
  // wait() (none -> writing by the one record() that claims it -> ready ->
  // none again when wait() takes it).
  static constexpr std::uint8_t error_none = 0, error_writing = 1, error_ready = 2;
  std::atomic<std::uint8_t> error_state_{error_none};
  std::exception_ptr error_;  // written by the claiming record(), taken by wait()
};

}  // namespace runnel
