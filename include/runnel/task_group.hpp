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
// The first exception thrown by one of the group's tasks is rethrown by
// wait(); later ones are dropped. After wait() the group may be reused. The
// destructor waits but never throws.
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <thread>
#include <type_traits>
#include <utility>

#include "detail/backoff.hpp"
#include "detail/futex.hpp"
#include "detail/task.hpp"
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
      t = detail::make_task([this, fn = std::decay_t<F>(std::forward<F>(f))]() mutable noexcept {
        try {
          fn();
        } catch (...) {
          record(std::current_exception());
        }
        finish_one();
      });
    } catch (...) {
      finish_one();
      throw;
    }
    pool_.schedule(t);
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
    // Acquire: the tasks' writes (and error_) happen-before our return; the
    // release sequence of the decrements leads here.
    (void)state_.load(std::memory_order_acquire);
    // Clear the sleeper bit so the group can be reused. Relaxed: nobody else
    // touches state_ once the count is 0.
    state_.store(0, std::memory_order_relaxed);
    // Relaxed: failed_ and error_ were published by the decrements read above.
    if (failed_.load(std::memory_order_relaxed)) {
      std::exception_ptr e = std::exchange(error_, nullptr);
      // Relaxed: the group is quiescent; the next run() happens-after this.
      failed_.store(false, std::memory_order_relaxed);
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
    // acq_rel: exactly one task wins the right to write error_; the write
    // is published by that task's release decrement in finish_one().
    if (!failed_.exchange(true, std::memory_order_acq_rel)) error_ = std::move(e);
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
      // As in the worker loop: every 61st task the shared FIFO goes first,
      // so a long fork-join computation does not starve post_fair work.
      if (may_steal && ++w.tick % 61 == 0) t = pool_.pop_injected();
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
          for (int i = 0; i < 32; ++i) detail::cpu_relax();
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
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;  // written by the record() winner, read by wait()
};

}  // namespace runnel
