// runnel::thread_pool: one worker per allowed CPU (pinned when the pool spans
// every allowed CPU); a work-stealing deque per worker; a shared lock-free injection ring (with an unbounded
// overflow list) for work from outside; idle workers spin briefly, then sleep
// on an event count.
//
//   runnel::thread_pool pool{{.threads = 4, .name_prefix = "io"}};
//   pool.post([] { ... });                      // fire and forget
//   auto f = pool.submit([] { return 42; });    // std::future<int>
//   pool.wait_idle();
//
// Scheduling. A task posted on a worker of this pool goes to the bottom of
// that worker's deque (LIFO for the owner, FIFO for thieves). A task posted
// from any other thread, and every post_fair() task, goes to the shared FIFO.
// A worker takes, in order: every 61st time (detail::fair_poll_interval) the
// shared FIFO (so post_fair work is never starved by a deque that keeps
// refilling), its own deque, the shared FIFO, then steals from the other
// workers, starting at a random victim.
//
// Waking. An idle worker searches the other queues for a bounded, adaptive
// number of rounds, then parks; a post wakes one parked worker only when
// nobody searches. The protocol, and why no post is lost, is in
// pool/idle_workers.hpp.
//
// Errors. An exception escaping a post()ed task goes to pool_options::
// on_error (default: a line on stderr) and is counted by error_count(); the
// worker keeps running. submit() delivers exceptions through its future and
// task_group::wait() rethrows them.
//
// Pinning. By default a pool pins worker i to the i-th allowed CPU only when
// it has at least as many workers as the process has allowed CPUs (the
// default size). A smaller pool is left to the OS scheduler: pinning it would
// put it on the first few CPUs, where a second pool (or another library's)
// would be pinned as well, while the other CPUs stay idle. .pin = true / false
// forces either way.
//
// Blocking on a worker. wait_idle() and task_group-free waits would need the
// very worker that blocks: wait_idle() throws std::logic_error on a worker of
// its pool, as does pipeline_handle::wait(). submit() returns a std::future
// (for interoperation with std code), whose get() cannot be checked: on a
// worker, wait for pool work with a task_group instead (its wait() runs the
// pool's work meanwhile). detail::blocking_would_stall_pool() tells blocking
// calls elsewhere (channels) that the caller is the only worker of its pool.
//
// Destruction runs every task already posted (including tasks those tasks
// post), then joins the workers. On one of the pool's own workers it cannot
// join itself: it prints a diagnostic and aborts.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/assert.hpp"
#include "detail/blocking_guard.hpp"
#include "detail/backoff.hpp"
#include "detail/cache_line.hpp"
#include "pool/cpu_set.hpp"
#include "detail/deadline.hpp"
#include "detail/event_count.hpp"
#include "detail/mpmc_ring.hpp"
#include "pool/task.hpp"
#include "pool/work_stealing_deque.hpp"
#include "pool/idle_workers.hpp"
#include "pool/overflow_queue.hpp"

namespace runnel {

struct pool_options {
  // Number of workers; 0: the CPUs in the affinity mask, capped by the cgroup
  // CPU quota.
  std::size_t threads = 0;
  // Pin worker i to the i-th allowed CPU (round-robin when there are more
  // workers than CPUs). Unset (default): pin only when the pool has at least
  // as many workers as there are allowed CPUs, see "Pinning" above.
  std::optional<bool> pin{};
  // The most rounds of searching (a look at the shared FIFO and every other
  // deque, then 32 pauses, or a yield in the rounds past spin_rounds / 2)
  // an idle worker spends before it sleeps; bounds idle CPU burn. Each
  // worker adapts its own budget below this cap: it doubles after a search
  // that found work and halves after one that ran out, down to
  // min(spin_rounds, 4). A worker fed a task every few hundred microseconds
  // thus parks almost at once instead of spinning and yielding for nothing,
  // while one in a busy stream keeps the full budget. 0: one look, then park.
  std::uint32_t spin_rounds = 64;
  // Thread names are "<prefix>-<i>", cut to 15 characters.
  std::string name_prefix = "runnel";
  // Receives exceptions escaping post()ed tasks, one call at a time (calls are
  // serialised). Empty: print to stderr. The worker survives either way.
  std::function<void(std::exception_ptr)> on_error{};
  // Cells in the lock-free shared FIFO; beyond it, submissions go to a
  // mutex-protected overflow list (never dropped).
  std::size_t injection_capacity = 8192;
};

// thread_pool::stats(): counts since the pool started, summed over its
// workers, plus each worker's current search budget. Each count is exact once
// the workers are parked (after wait_idle()); while they run it is a
// snapshot.
struct pool_stats {
  std::uint64_t searches = 0;        // a worker ran out of local and shared work and searched
  std::uint64_t searches_found = 0;  // ... and the search found a task
  std::uint64_t search_rounds = 0;   // waiting rounds spent searching (32 pauses or one yield each)
  std::uint64_t parks = 0;           // a worker announced itself parked (its last look may still find work)
  std::vector<std::uint32_t> spin_budgets;  // rounds each worker's next search may wait, index = worker
};

class thread_pool;
class task_group;

namespace detail {

// A worker looks at the shared FIFO before its own deque every this many
// tasks, so post_fair() work is not starved by a deque that keeps refilling.
// Prime, so that it does not fall into step with a program's own periodic
// pattern (a batch of 64 follow-ups, say) and always land on the same task.
inline constexpr std::uint32_t fair_poll_interval = 61;

// The most overflow nodes moved back into the shared ring under the overflow
// lock per take: bounds how long the lock is held while still emptying the
// overflow queue in a few takes.
inline constexpr int overflow_refill_batch = 256;

// Nested helping (task_group::wait running other tasks) beyond this depth
// only pops the worker's own deque, so stealing cannot pile up frames until
// the stack overflows.
inline constexpr std::uint32_t max_help_depth = 64;

struct alignas(false_sharing_range) pool_worker {
  pool_worker(thread_pool* p, std::size_t i) : pool(p), index(i), rng(static_cast<std::uint32_t>(i) * 2654435761u + 1) {}

  thread_pool* const pool;
  const std::size_t index;
  work_stealing_deque<task_node*> deque;
  // Owner-thread state.
  std::uint32_t rng;
  std::uint32_t tick = 0;
  std::uint32_t help_depth = 0;
  // Searching, parking and waking (pool/idle_workers.hpp).
  idle_worker idle;
  std::thread thread;

  std::uint32_t next_random() noexcept {  // xorshift32
    rng ^= rng << 13;
    rng ^= rng >> 17;
    rng ^= rng << 5;
    return rng;
  }
};
// Each worker's owner-thread state and futex word sit on lines of their own
// (the workers are allocated one by one, with this alignment).
static_assert(alignof(pool_worker) == false_sharing_range, "a pool worker starts a false-sharing range of its own");

// The worker the calling thread is, in whichever pool; nullptr elsewhere.
inline pool_worker*& current_worker() noexcept {
  thread_local pool_worker* w = nullptr;
  return w;
}

// True when the calling thread is the only worker of its pool: blocking it
// stops every task of that pool, so a partner that is itself a pool task can
// never run. Blocking calls (channel send/recv) check this to throw instead
// of hanging. One thread-local read on threads outside any pool.
bool blocking_would_stall_pool() noexcept;

inline void print_task_error(std::exception_ptr e) noexcept {
  try {
    std::rethrow_exception(std::move(e));
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "runnel::thread_pool: a posted task threw: %s\n", ex.what());
  } catch (...) {
    std::fprintf(stderr, "runnel::thread_pool: a posted task threw a non-std exception\n");
  }
}

}  // namespace detail

class thread_pool {
 public:
  explicit thread_pool(pool_options opts = {})
      : opts_(std::move(opts)), injection_(opts_.injection_capacity == 0 ? 1 : opts_.injection_capacity) {
    const std::vector<int> allowed = detail::affinity_cpus();
    std::size_t n = opts_.threads;
    if (n == 0) n = detail::default_worker_count(allowed.size(), detail::cgroup::process_cpu_limit());
    if (opts_.pin.value_or(n >= allowed.size())) {
      cpus_.reserve(n);
      for (std::size_t i = 0; i < n; ++i) cpus_.push_back(allowed[i % allowed.size()]);
    }
    check_layout();
    workers_.reserve(n);
    idle_.start(n, opts_.spin_rounds);
    for (std::size_t i = 0; i < n; ++i) {
      workers_.push_back(std::make_unique<detail::pool_worker>(this, i));
      idle_.enroll(workers_.back()->idle);
    }
    try {
      for (auto& w : workers_) w->thread = std::thread([this, wp = w.get()] { worker_main(*wp); });
    } catch (...) {
      shutdown();
      throw;
    }
  }

  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;

  // Runs everything already posted, then joins the workers. On one of its own
  // workers: a diagnostic on stderr, then std::abort() (a thread cannot join
  // itself; std::thread would throw from the join and terminate anyway).
  ~thread_pool() {
    if (is_worker()) {
      std::fputs("runnel::thread_pool: destroyed by one of its own workers (a pool task destroyed "
                 "the pool); destroy it from a thread outside the pool\n",
                 stderr);
      std::abort();
    }
    shutdown();
  }

  // Fire and forget. On a worker of this pool: the worker's deque; elsewhere:
  // the shared FIFO. Throws only what allocating or moving f throws.
  template <class F>
  void post(F&& f) {
    schedule(detail::make_task(std::forward<F>(f)));
  }

  // Always the shared FIFO, behind the work already waiting there: for
  // long-lived tasks that re-post themselves to yield to others.
  template <class F>
  void post_fair(F&& f) {
    inject(detail::make_task(std::forward<F>(f)));
    idle_.notify_one_if_needed();
  }

  template <class F>
  [[nodiscard("the future carries the result and any exception; use post() to fire and forget")]] auto submit(F&& f) -> std::future<std::invoke_result_t<std::decay_t<F>&>> {
    using R = std::invoke_result_t<std::decay_t<F>&>;
    std::promise<R> promise;
    std::future<R> future = promise.get_future();
    post([fn = std::decay_t<F>(std::forward<F>(f)), p = std::move(promise)]() mutable {
      try {
        if constexpr (std::is_void_v<R>) {
          std::invoke(fn);
          p.set_value();
        } else {
          p.set_value(std::invoke(fn));
        }
      } catch (...) {
        p.set_exception(std::current_exception());
      }
    });
    return future;
  }

  // Blocks until no task is queued or running. For threads outside the pool
  // (a worker would wait for itself): throws std::logic_error on a worker.
  // Tasks posted concurrently from other outside threads may or may not be
  // waited for.
  void wait_idle() {
    if (is_worker()) throw std::logic_error("runnel::thread_pool::wait_idle called on one of its workers");
    for (;;) {
      detail::event_count& ec = idle_.all_parked_event();
      const auto key = ec.prepare_wait();
      if (quiescent()) {
        ec.cancel_wait();
        return;
      }
      ec.wait(key);
    }
  }

  // As wait_idle(), giving up after `timeout` (any length: a huge one, such
  // as hours::max(), waits for ever rather than overflowing). Returns whether
  // the pool became idle.
  template <class Rep, class Period>
  bool wait_idle_for(std::chrono::duration<Rep, Period> timeout) {
    return wait_idle_until(detail::deadline_after(timeout));
  }

  // As wait_idle(), giving up at `deadline` (steady_clock, or any clock: other
  // clocks are converted once, saturating). Returns whether the pool became idle.
  template <class Clock, class Duration>
  bool wait_idle_until(std::chrono::time_point<Clock, Duration> deadline) {
    if (is_worker()) throw std::logic_error("runnel::thread_pool::wait_idle_until called on one of its workers");
    const std::chrono::steady_clock::time_point until = detail::to_steady_deadline(deadline);
    for (;;) {
      detail::event_count& ec = idle_.all_parked_event();
      const auto key = ec.prepare_wait();
      if (quiescent()) {
        ec.cancel_wait();
        return true;
      }
      if (!ec.wait_until(key, until)) return quiescent();
    }
  }

  std::size_t size() const noexcept { return workers_.size(); }

  // CPU id of each worker (index = worker), empty when pinning is off.
  const std::vector<int>& cpus() const noexcept { return cpus_; }

  bool is_worker() const noexcept {
    const detail::pool_worker* w = detail::current_worker();
    return w != nullptr && w->pool == this;
  }

  static thread_pool* current() noexcept {
    const detail::pool_worker* w = detail::current_worker();
    return w == nullptr ? nullptr : w->pool;
  }

  // Idle-search statistics, see pool_stats.
  pool_stats stats() const {
    pool_stats st;
    st.spin_budgets.reserve(workers_.size());
    for (const auto& w : workers_) {
      // Relaxed: statistics, each written by its worker alone; wait_idle()
      // (the last park's notification) orders them for a caller that wants
      // exact counts.
      st.searches += w->idle.searches.load(std::memory_order_relaxed);
      st.searches_found += w->idle.searches_found.load(std::memory_order_relaxed);
      st.search_rounds += w->idle.search_rounds.load(std::memory_order_relaxed);
      st.parks += w->idle.parks.load(std::memory_order_relaxed);
      st.spin_budgets.push_back(w->idle.spin_budget.load(std::memory_order_relaxed));
    }
    return st;
  }

  std::uint64_t error_count() const noexcept {
    // Relaxed: a statistic; tests read it after wait_idle(), which orders it.
    return errors_.load(std::memory_order_relaxed);
  }

 private:
  friend class task_group;

  detail::pool_worker* local_worker() const noexcept {
    detail::pool_worker* w = detail::current_worker();
    return w != nullptr && w->pool == this ? w : nullptr;
  }

  void schedule(detail::task_node* t) {
    if (detail::pool_worker* w = local_worker()) {
      try {
        w->deque.push(t);
      } catch (...) {
        t->discard();
        throw;
      }
    } else {
      inject(t);
    }
    idle_.notify_one_if_needed();
  }

  // Shared FIFO: the lock-free ring, or the overflow queue once the ring is
  // full. While the overflow queue holds anything, new work goes there too,
  // so it queues behind what overflowed. Never fails, never allocates.
  //
  // The overflow queue is an intrusive MPSC queue (pool/overflow_queue.hpp):
  // producers append wait-free; the single consumer is whoever holds
  // overflow_mutex_. Producers never take the lock. Between a producer's
  // exchange and its link the consumer sees "not yet" (and any_queued()
  // still sees work, so nobody parks on it).
  //
  // A full ring means the workers are behind. Before overflowing, the poster
  // waits a little (detail::backoff: a few microseconds of pauses, then a few
  // yields) for a cell to free up: a worker frees one every few tens of
  // nanoseconds while it keeps up, and feeding it through the ring is
  // cheaper for everybody than the overflow queue. Only the post that finds
  // the ring full waits; once the overflow queue holds work, posts append to
  // it directly.
  void inject(detail::task_node* t) noexcept {
    if (!overflow_.nonempty()) {
      if (injection_.try_push(std::move(t))) return;
      detail::backoff bo;
      while (bo.spin()) {
        if (overflow_.nonempty()) break;
        if (injection_.try_push(std::move(t))) return;
      }
    }
    overflow_.push(t);
  }

  detail::task_node* pop_injected() noexcept {
    detail::task_node* t = nullptr;
    if (injection_.try_pop(t)) return t;
    if (!overflow_.nonempty()) return nullptr;
    std::lock_guard lock(overflow_mutex_);
    t = overflow_.pop();
    if (t == nullptr) return nullptr;
    // Refill the ring (oldest first) so the next takers need no lock; bounded
    // to keep the lock hold short. Stops when the ring is full, putting the
    // node in hand back at the head for the next round.
    for (int i = 0; i < detail::overflow_refill_batch; ++i) {
      detail::task_node* moved = overflow_.pop();
      if (moved == nullptr) break;
      if (!injection_.try_push(std::move(moved))) {
        overflow_.unpop(moved);
        break;
      }
    }
    return t;
  }

  detail::task_node* steal_from_others(detail::pool_worker& self) noexcept {
    const std::size_t n = workers_.size();
    if (n < 2) return nullptr;
    const std::size_t start = self.next_random() % n;
    for (std::size_t k = 0; k < n; ++k) {
      detail::pool_worker& victim = *workers_[(start + k) % n];
      if (&victim == &self) continue;
      if (detail::task_node* t = victim.deque.steal()) return t;
    }
    return nullptr;
  }

  // Work not in our own deque: the shared FIFO, then the other deques.
  detail::task_node* find_remote(detail::pool_worker& self) noexcept {
    if (detail::task_node* t = pop_injected()) return t;
    return steal_from_others(self);
  }

  detail::task_node* next_task(detail::pool_worker& self) noexcept {
    if (++self.tick % detail::fair_poll_interval == 0) {
      if (detail::task_node* t = pop_injected()) return t;
    }
    if (detail::task_node* t = self.deque.pop()) return t;
    // One look at the shared FIFO before becoming a searcher: a stream of
    // outside posts is then consumed without touching the idle state.
    return pop_injected();
  }

  // Whether any queue visibly holds work (a push in progress counts).
  bool any_queued() const noexcept {
    if (injection_.size_approx() != 0) return true;
    if (overflow_.nonempty()) return true;
    for (const auto& w : workers_)
      if (!w->deque.empty()) return true;
    return false;
  }

  bool quiescent() const noexcept {
    // Queues first, then workers: a task taken from a queue before our look
    // keeps its worker active until it has finished.
    if (any_queued()) return false;
    return idle_.all_parked();
  }

  // The padding is computed by hand: the overflow queue's producer and
  // consumer sides, the idle-worker state (its idle state every post reads
  // and its parking lock, see detail::idle_workers) and the error counter
  // each start a false-sharing range of their own. thread_pool holds members
  // of library types, so it is not standard-layout; g++ and clang compute
  // offsetof for it as usual (no virtual bases), and the warning is silenced
  // for the check only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winvalid-offsetof"
  static constexpr void check_layout() noexcept {
    constexpr std::size_t range = detail::false_sharing_range;
    static_assert(alignof(thread_pool) >= range && offsetof(thread_pool, overflow_) % range == 0 &&
                      offsetof(thread_pool, idle_) % range == 0 && offsetof(thread_pool, errors_) % range == 0,
                  "the overflow queue, the idle-worker state and the error counter each start a "
                  "false-sharing range");
    static_assert(offsetof(thread_pool, idle_) - offsetof(thread_pool, overflow_mutex_) >= range &&
                      offsetof(thread_pool, errors_) - offsetof(thread_pool, idle_) >= sizeof(detail::idle_workers),
                  "the idle-worker state is a false-sharing range apart from the overflow lock and the error counter");
  }
#pragma GCC diagnostic pop

  void execute(detail::task_node* t) noexcept {
    try {
      t->run();
    } catch (...) {
      report_error(std::current_exception());
    }
  }

  void report_error(std::exception_ptr e) noexcept {
    // Relaxed: a counter; readers synchronise through wait_idle() or joins.
    errors_.fetch_add(1, std::memory_order_relaxed);
    std::lock_guard lock(error_mutex_);
    if (!opts_.on_error) {
      detail::print_task_error(std::move(e));
      return;
    }
    try {
      opts_.on_error(std::move(e));
    } catch (...) {
      std::fprintf(stderr, "runnel::thread_pool: the error handler threw\n");
    }
  }

  void worker_main(detail::pool_worker& self) {
    detail::current_worker() = &self;
    detail::on_sole_worker() = workers_.size() == 1;
    if (!cpus_.empty()) detail::pin_current_thread(cpus_[self.index]);
    detail::name_current_thread(opts_.name_prefix + "-" + std::to_string(self.index));
    const auto queued = [this]() noexcept { return any_queued(); };
    for (;;) {
      detail::task_node* t = next_task(self);
      if (t == nullptr) t = idle_.search(self.idle, [this, &self]() noexcept { return find_remote(self); });
      if (t != nullptr) {
        // A worker woken from park() starts out counted as a searcher; it
        // must not stay counted while it runs a task, or posts would rely on
        // it to find their work.
        if (self.idle.searching) idle_.stop_searching(self.idle, queued);
        execute(t);
        continue;
      }
      if (!idle_.park(self.idle, queued)) break;
    }
    detail::on_sole_worker() = false;
    detail::current_worker() = nullptr;
  }

  void shutdown() noexcept {
    idle_.stop_and_wake_all();
    for (auto& w : workers_)
      if (w->thread.joinable()) w->thread.join();
    // The joins order every worker's last park() before this read.
    RUNNEL_ASSERT(idle_.no_sleepers(), "a worker leaves the sleeper list before it exits");
    // Work injected concurrently with destruction (a contract violation by
    // the poster) still runs rather than leaking.
    while (detail::task_node* t = pop_injected()) execute(t);
  }

  pool_options opts_;
  std::vector<int> cpus_;
  std::vector<std::unique_ptr<detail::pool_worker>> workers_;

  detail::mpmc_ring<detail::task_node*> injection_;
  // Overflow queue (see inject()); its consumer is whoever holds the lock.
  detail::overflow_queue<detail::task_node> overflow_;
  std::mutex overflow_mutex_;

  // Searching, parking and waking of idle workers; starts a false-sharing
  // range of its own (see check_layout()).
  detail::idle_workers idle_;

  alignas(detail::false_sharing_range) std::atomic<std::uint64_t> errors_{0};
  std::mutex error_mutex_;
};

namespace detail {
inline bool blocking_would_stall_pool() noexcept { return on_sole_worker(); }
}  // namespace detail

}  // namespace runnel
