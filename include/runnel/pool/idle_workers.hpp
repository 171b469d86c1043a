// The thread pool's idle-worker protocol: how a worker that runs out of work
// searches for more, parks, and is woken, so that a posted task never waits
// while a worker sleeps, and a post wakes at most one worker.
//
// Searching. A worker that runs out of work becomes a "searcher" for a
// bounded number of rounds, then parks on its own futex word. The bound adapts
// per worker: a search that finds work doubles the worker's budget, one that
// runs out halves it, between min_spin_rounds and pool_options::spin_rounds
// (see idle_workers::search()). Rounds past half of spin_rounds yield the core
// instead of pausing, so a shrunken budget is pauses only.
//
// Waking. Posting a task wakes one parked worker, and none when some worker
// is already searching (it will find the task) or all are awake. The waker
// takes the sleeper off the sleeper list and counts it as searching at once,
// so posts arriving while it wakes up do not wake more workers. A worker that
// parks re-checks every queue after announcing itself parked, so a post that
// skipped the wake-up cannot be lost (see idle_workers::park()), whatever the
// search budget was. The scheme follows the "searching workers" idea of Go's
// and Tokio's schedulers.
//
// The pool owns the queues; this protocol sees them only through the
// callables it is given (find work, is anything queued).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "../detail/assert.hpp"
#include "../detail/asymmetric_fence.hpp"
#include "../detail/backoff.hpp"
#include "../detail/cache_line.hpp"
#include "../detail/event_count.hpp"
#include "../detail/futex.hpp"

namespace runnel::detail {

// The floor of a worker's adaptive search budget (capped by
// pool_options::spin_rounds): 4 rounds of 32 pauses, a few microseconds (a
// pause took ~19 ns on the 2-core machine the benches ran on). Not zero, so
// that work landing just after a worker ran dry is still taken without a
// futex wake; short enough that a worker whose searches keep running out
// costs little before it parks. The wake-up handshake does not
// depend on it (park() re-checks every queue whatever the budget was).
inline constexpr std::uint32_t min_spin_rounds = 4;

// Adds to a counter that only its owner thread writes: a plain load and
// store, no read-modify-write. Relaxed: a statistic; other threads only read.
inline void bump_owned(std::atomic<std::uint64_t>& c, std::uint64_t by = 1) noexcept {
  c.store(c.load(std::memory_order_relaxed) + by, std::memory_order_relaxed);
}

// The pool's idle state packs two counts so that one load tells a poster
// whether to wake anybody: searching workers (low half) and unparked workers
// (high half).
struct idle_counts {
  static constexpr std::uint64_t one_searching = 1;
  static constexpr std::uint64_t one_unparked = std::uint64_t{1} << 32;
  static std::uint32_t searching_of(std::uint64_t s) noexcept { return static_cast<std::uint32_t>(s); }
  static std::uint32_t unparked_of(std::uint64_t s) noexcept { return static_cast<std::uint32_t>(s >> 32); }
};

// The two sides of the handshake between a worker that publishes a task and
// the last searcher leaving the search. idle_workers::notify_one_if_needed()
// and idle_workers::stop_searching() call these; tests/idle_protocol_test.cpp
// runs them against each other as a store-buffering litmus test.
//
// Publishing side, after the task is in a queue: true when a sleeper must be
// woken (nobody searches and some worker is parked).
inline bool publisher_must_wake(const std::atomic<std::uint64_t>& state, std::size_t workers) noexcept {
  // Orders the publish before the load below (the light side of the
  // handshake whose heavy side is in park() and last_searcher_sees_work()).
  light_fence();
  // Relaxed: ordered by light_fence(), see above.
  const std::uint64_t s = state.load(std::memory_order_relaxed);
  return idle_counts::searching_of(s) == 0 && idle_counts::unparked_of(s) < workers;
}

// Leaving side: stops counting one searcher. True when it was the last
// searcher, some worker is parked, and queued() then reports work: the caller
// must hand the search over to a sleeper, so parallelism ramps up.
//
// It is the heavy side of the same handshake as park(): a publisher that read
// the state before our decrement skipped its wake-up because of us, and its
// push may still sit in its store buffer (the light fence is only a compiler
// barrier with membarrier), so a plain re-check could miss it: the task would
// be stranded in a busy worker's deque while others sleep. After the heavy
// fence the re-check sees every such push. With no worker parked nobody
// needs waking (a worker parking later re-checks itself), so the fence is
// paid only when someone sleeps.
template <class Queued>
bool last_searcher_sees_work(std::atomic<std::uint64_t>& state, std::size_t workers, Queued&& queued) noexcept {
  const std::uint64_t before = state.fetch_sub(idle_counts::one_searching, std::memory_order_seq_cst);
  // An underflow would borrow from the unparked count in the high half.
  RUNNEL_ASSERT(idle_counts::searching_of(before) != 0, "a worker stops searching only after it started");
  if (idle_counts::searching_of(before) != 1 || idle_counts::unparked_of(before) >= workers) return false;
  heavy_fence();
  return static_cast<bool>(queued());
}

// One worker's side of the protocol, part of the worker's own state.
struct idle_worker {
  bool searching = false;  // counted in the pool's searching workers; owner-thread state
  // Waiting rounds this worker's next search may spend, adapted by
  // idle_workers::search(). Written by the owner only; atomic (relaxed) so
  // that thread_pool::stats() can read it.
  std::atomic<std::uint32_t> spin_budget{0};
  // Counters for thread_pool::stats(), written by the owner only
  // (bump_owned()); read relaxed, as statistics.
  std::atomic<std::uint64_t> searches{0};
  std::atomic<std::uint64_t> searches_found{0};
  std::atomic<std::uint64_t> search_rounds{0};
  std::atomic<std::uint64_t> parks{0};
  // Futex word a parked worker sleeps on: 0 parked, 1 woken. Set to 1 only
  // under the sleep mutex, by the thread that takes the worker off the
  // sleeper list.
  std::atomic<std::uint32_t> wake_word{0};
};

// The pool-wide side: the idle state every post reads, the sleeper list, the
// shutdown flag, and the event count wait_idle() sleeps on.
class idle_workers {
 public:
  idle_workers() noexcept { check_layout(); }
  idle_workers(const idle_workers&) = delete;
  idle_workers& operator=(const idle_workers&) = delete;

  // Before the workers start (then published to them by std::thread's start):
  // `workers` workers, all unparked, searching at most `spin_rounds` rounds.
  void start(std::size_t workers, std::uint32_t spin_rounds) {
    workers_ = workers;
    spin_rounds_ = spin_rounds;
    // Relaxed: published to the workers by std::thread's start.
    state_.store(workers * idle_counts::one_unparked, std::memory_order_relaxed);
    sleeping_.reserve(workers);  // park() then never allocates
  }

  // Before the worker starts: its first search may spend the full budget.
  void enroll(idle_worker& w) const noexcept {
    // Relaxed: published to the worker by std::thread's start.
    w.spin_budget.store(spin_rounds_, std::memory_order_relaxed);
  }

  // After publishing work: wake one sleeper unless a searcher will find it.
  void notify_one_if_needed() noexcept {
    if (publisher_must_wake(state_, workers_)) wake_one();
  }

  // Bounded search for work with find() (work outside the worker's own
  // deque), counted as a searcher. Returns what find() found (the caller then
  // stops searching), or a null result when the budget is spent (the caller
  // then parks, still counted as a searcher so that posts keep relying on it
  // until its final re-check).
  //
  // The budget adapts per worker, as a spinning mutex adapts its spin to how
  // long the lock is usually held: spinning pays when work shows up while we
  // spin, and is pure cost (CPU, and with yields a context switch that hands
  // our core to whoever waits) when the next task comes long after. So a
  // search that finds work doubles the budget (back to the cap within a few
  // searches of a busy stream), and one that runs out halves it, down to
  // min_spin_rounds. A worker fed a task every few hundred microseconds then
  // parks after a few microseconds of pauses instead of ~20 us of pauses and
  // 32 yields; a worker in a fine-grained pipeline, whose searches mostly find
  // the next batch, keeps spinning instead of paying a futex wake a batch.
  // The yield phase is tied to the cap (rounds from spin_rounds / 2 on), so
  // a budget at or below half the cap never yields.
  template <class Find>
  auto search(idle_worker& self, Find&& find) noexcept -> decltype(find()) {
    if (!self.searching) {
      state_.fetch_add(idle_counts::one_searching, std::memory_order_seq_cst);
      self.searching = true;
    }
    // Relaxed (spin_budget): only this thread writes it.
    const std::uint32_t budget = self.spin_budget.load(std::memory_order_relaxed);
    const std::uint32_t yield_from = spin_rounds_ / 2;
    bump_owned(self.searches);
    for (std::uint32_t r = 0;; ++r) {
      if (auto t = find()) {
        bump_owned(self.searches_found);
        bump_owned(self.search_rounds, r);
        self.spin_budget.store(grown_budget(budget), std::memory_order_relaxed);
        return t;
      }
      if (r == budget) break;
      // Pause first; past half the cap yield, so that on an oversubscribed
      // machine the threads that hold work get the core.
      if (r < yield_from) {
        pause_round();
      } else {
        std::this_thread::yield();
      }
    }
    bump_owned(self.search_rounds, budget);
    self.spin_budget.store(shrunk_budget(budget), std::memory_order_relaxed);
    return {};
  }

  // Found work: no longer a searcher. The last searcher to leave hands the
  // search over to a sleeper when queued() reports more work (see
  // last_searcher_sees_work() for the handshake).
  template <class Queued>
  void stop_searching(idle_worker& self, Queued&& queued) noexcept {
    RUNNEL_ASSERT(self.searching, "only a worker counted as searching stops searching");
    self.searching = false;
    if (last_searcher_sees_work(state_, workers_, queued)) notify_one_if_needed();
  }

  // Sleeps until woken. Returns false when the pool is shutting down and
  // queued() reports no work left anywhere.
  //
  // Handshake with notify_one_if_needed(): under the sleep mutex we stop
  // counting as unparked (and as searching) and join the sleeper list; then
  // the heavy fence; then we re-check every queue. A poster publishes, runs
  // the light fence, then loads the idle state. Either the poster's load sees
  // our decrement (and, if nobody else searches, wakes a sleeper), or the
  // poster read the state before our decrement, which puts its publish
  // before our fence, so our re-check sees the task. Posters that skipped
  // because of another searcher or unparked worker are covered by that
  // worker's park().
  template <class Queued>
  bool park(idle_worker& self, Queued&& queued) noexcept {
    bump_owned(self.parks);
    bool last = false;
    {
      std::lock_guard lock(sleep_mutex_);
      const std::uint64_t dec = idle_counts::one_unparked + (self.searching ? idle_counts::one_searching : 0);
      self.searching = false;
      last = idle_counts::unparked_of(state_.fetch_sub(dec, std::memory_order_seq_cst)) == 1;
      // Relaxed: only changed under the lock we hold.
      self.wake_word.store(0, std::memory_order_relaxed);
      sleeping_.push_back(&self);  // capacity reserved: cannot throw
    }
    if (last) all_parked_.notify_all();  // wait_idle() may be waiting for this
    heavy_fence();
    const bool stop = stopping_.load(std::memory_order_seq_cst);
    if (queued() || stop) {
      unpark_self(self);
      return !stop || queued();
    }
    // Acquire: pairs with the release store in wake_one().
    while (self.wake_word.load(std::memory_order_acquire) == 0) futex_wait(self.wake_word, 0);
    self.searching = true;  // counted so by the waker
    return true;
  }

  // Shutdown: from now on park() returns false once nothing is queued; every
  // sleeper is woken to see it.
  void stop_and_wake_all() noexcept {
    stopping_.store(true, std::memory_order_seq_cst);
    std::vector<idle_worker*> woken;
    {
      std::lock_guard lock(sleep_mutex_);
      // Relaxed: the unparked half changes only under the lock we hold.
      RUNNEL_ASSERT(sleepers_counted(state_.load(std::memory_order_relaxed)),
                    "every worker is either counted as unparked or on the sleeper list");
      for (idle_worker* w : sleeping_) {
        state_.fetch_add(idle_counts::one_unparked + idle_counts::one_searching, std::memory_order_seq_cst);
        // Release: as in wake_one().
        w->wake_word.store(1, std::memory_order_release);
      }
      woken.swap(sleeping_);
    }
    for (idle_worker* w : woken) futex_wake(w->wake_word, 1);
  }

  // After the workers are joined (the joins order their last park()).
  bool no_sleepers() const noexcept { return sleeping_.empty(); }

  // Whether every worker is parked (it may still be re-checking the queues).
  bool all_parked() const noexcept {
    return idle_counts::unparked_of(state_.load(std::memory_order_seq_cst)) == 0;
  }

  // Notified when the last worker parks (wait_idle() sleeps here).
  event_count& all_parked_event() noexcept { return all_parked_; }

 private:
  // The budget bounds: [min(min_spin_rounds, cap), cap].
  std::uint32_t budget_floor() const noexcept { return std::min(min_spin_rounds, spin_rounds_); }
  std::uint32_t grown_budget(std::uint32_t b) const noexcept {
    // Doubling from the floor (never 0 unless the cap is 0) reaches any cap.
    return b >= spin_rounds_ / 2 ? spin_rounds_ : std::max(2 * b, budget_floor());
  }
  std::uint32_t shrunk_budget(std::uint32_t b) const noexcept { return std::max(b / 2, budget_floor()); }

  // Under sleep_mutex_: the unparked half of state_ and the sleeper list
  // change together (park(), wake_one(), unpark_self(), stop_and_wake_all()),
  // so every worker is in exactly one of them.
  bool sleepers_counted(std::uint64_t s) const noexcept {
    return idle_counts::unparked_of(s) + sleeping_.size() == workers_;
  }

  void wake_one() noexcept {
    idle_worker* w = nullptr;
    {
      std::lock_guard lock(sleep_mutex_);
      // Relaxed: parking happens under this lock; a searcher that started
      // since our first look only makes this wake-up unnecessary.
      const std::uint64_t s = state_.load(std::memory_order_relaxed);
      RUNNEL_ASSERT(sleepers_counted(s), "every worker is either counted as unparked or on the sleeper list");
      if (idle_counts::searching_of(s) != 0 || sleeping_.empty()) return;
      w = sleeping_.back();
      sleeping_.pop_back();
      // The woken worker is unparked and searching from now on.
      state_.fetch_add(idle_counts::one_unparked + idle_counts::one_searching, std::memory_order_seq_cst);
      // Release: the worker's acquire load of the word then sees the counts.
      w->wake_word.store(1, std::memory_order_release);
    }
    // Outside the lock; the worker object outlives the pool's threads. A late
    // wake is harmless: the worker sleeps only while its word is 0.
    futex_wake(w->wake_word, 1);
  }

  // Back from the sleeper list without sleeping. If a waker took us off the
  // list first, it has already counted us as unparked and searching.
  void unpark_self(idle_worker& self) noexcept {
    std::lock_guard lock(sleep_mutex_);
    for (auto it = sleeping_.begin(); it != sleeping_.end(); ++it) {
      if (*it == &self) {
        sleeping_.erase(it);
        state_.fetch_add(idle_counts::one_unparked + idle_counts::one_searching, std::memory_order_seq_cst);
        break;
      }
    }
    self.searching = true;
  }

  // The padding is computed by hand: the idle state every post reads and the
  // parking lock each start a false-sharing range of their own. The warning
  // is silenced for the check only (idle_workers holds library types).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winvalid-offsetof"
  static constexpr void check_layout() noexcept {
    constexpr std::size_t range = false_sharing_range;
    static_assert(alignof(idle_workers) >= range && offsetof(idle_workers, state_) % range == 0 &&
                      offsetof(idle_workers, sleep_mutex_) % range == 0 &&
                      offsetof(idle_workers, sleep_mutex_) - offsetof(idle_workers, state_) >= range,
                  "the idle state and the parking lock each start a false-sharing range");
  }
#pragma GCC diagnostic pop

  // Searching and unparked worker counts (see idle_counts). Read by every
  // post; written only when a worker runs dry, parks or is woken, so the
  // line stays shared while the pool is busy.
  alignas(false_sharing_range) std::atomic<std::uint64_t> state_{0};
  // Set by start() before the workers run, read-only after: read with state_
  // by every post and search, so they share its line.
  std::size_t workers_ = 0;
  std::uint32_t spin_rounds_ = 0;
  // Guards sleeping_ and the parking transitions of state_.
  alignas(false_sharing_range) std::mutex sleep_mutex_;
  std::vector<idle_worker*> sleeping_;  // guarded by sleep_mutex_
  // wait_idle() sleeps here; notified when the last worker parks.
  event_count all_parked_;
  // Set once, by stop_and_wake_all(); never cleared. Seq_cst: park() reads it
  // after its heavy fence, with the queues.
  std::atomic<bool> stopping_{false};
};

}  // namespace runnel::detail
