// runnel::thread_pool: one worker per allowed CPU, pinned; a work-stealing
// deque per worker; a shared lock-free injection ring (with an unbounded
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
// A worker takes, in order: every 61st time the shared FIFO (so post_fair work
// is never starved by a deque that keeps refilling), its own deque, the shared
// FIFO, then steals from the other workers, starting at a random victim.
//
// Waking. A worker that runs out of work becomes a "searcher" for a bounded
// number of rounds (pool_options::spin_rounds), then parks on an event count.
// Posting a task wakes one parked worker, and none when some worker is
// already searching (it will find the task). The last searcher to give up
// re-checks every queue after announcing itself as a sleeper, so a post that
// skipped the wake-up because it saw that searcher cannot be lost (see
// park()).
//
// Errors. An exception escaping a post()ed task goes to pool_options::
// on_error (default: a line on stderr) and is counted by error_count(); the
// worker keeps running. submit() delivers exceptions through its future and
// task_group::wait() rethrows them.
//
// Destruction runs every task already posted (including tasks those tasks
// post), then joins the workers. It must not run on one of the pool's own
// workers.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/asymmetric_fence.hpp"
#include "detail/backoff.hpp"
#include "detail/cache_line.hpp"
#include "detail/cpu_set.hpp"
#include "detail/event_count.hpp"
#include "detail/mpmc_ring.hpp"
#include "detail/task.hpp"
#include "detail/work_stealing_deque.hpp"

namespace runnel {

struct pool_options {
  // Number of workers; 0: the CPUs in the affinity mask, capped by the cgroup
  // CPU quota.
  std::size_t threads = 0;
  // Pin worker i to the i-th allowed CPU (round-robin when there are more
  // workers than CPUs).
  bool pin = true;
  // Rounds of searching (steal attempts over all workers and the shared FIFO)
  // before an idle worker sleeps; bounds idle CPU burn.
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

class thread_pool;
class task_group;

namespace detail {

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
  std::thread thread;

  std::uint32_t next_random() noexcept {  // xorshift32
    rng ^= rng << 13;
    rng ^= rng >> 17;
    rng ^= rng << 5;
    return rng;
  }
};

// The worker the calling thread is, in whichever pool; nullptr elsewhere.
inline pool_worker*& current_worker() noexcept {
  thread_local pool_worker* w = nullptr;
  return w;
}

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
    if (opts_.pin) {
      cpus_.reserve(n);
      for (std::size_t i = 0; i < n; ++i) cpus_.push_back(allowed[i % allowed.size()]);
    }
    workers_.reserve(n);
    for (std::size_t i = 0; i < n; ++i) workers_.push_back(std::make_unique<detail::pool_worker>(this, i));
    // Relaxed: published to the workers by std::thread's start.
    active_.store(static_cast<std::uint32_t>(n), std::memory_order_relaxed);
    try {
      for (auto& w : workers_) w->thread = std::thread([this, wp = w.get()] { worker_main(*wp); });
    } catch (...) {
      shutdown();
      throw;
    }
  }

  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;

  // Runs everything already posted, then joins the workers.
  ~thread_pool() { shutdown(); }

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
    notify_one_if_needed();
  }

  template <class F>
  auto submit(F&& f) -> std::future<std::invoke_result_t<std::decay_t<F>&>> {
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
      const auto key = idle_ec_.prepare_wait();
      if (quiescent()) {
        idle_ec_.cancel_wait();
        return;
      }
      idle_ec_.wait(key);
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
    notify_one_if_needed();
  }

  // Shared FIFO: the lock-free ring, or the overflow queue once the ring is
  // full. While the overflow queue holds anything, new work goes there too,
  // so it queues behind what overflowed. Never fails, never allocates.
  //
  // The overflow queue is Dmitry Vyukov's intrusive MPSC queue: producers
  // append with one exchange on overflow_tail_ and then link the previous
  // node (wait-free); the single consumer is whoever holds overflow_mutex_.
  // Producers never take the lock. The queue is empty when the tail is the
  // stub node; between a producer's exchange and its link the consumer sees
  // "not yet" (and any_queued() still sees work, so nobody parks on it).
  void inject(detail::task_node* t) noexcept {
    if (!overflow_nonempty() && injection_.try_push(std::move(t))) return;
    overflow_push(t);
  }

  void overflow_push(detail::task_node* t) noexcept {
    // Relaxed: published by the release store that links t below.
    t->next.store(nullptr, std::memory_order_relaxed);
    // acq_rel: acquire so that our link store into prev comes after prev's
    // own initialisation; release is carried by the link store.
    detail::task_node* prev = overflow_tail_.exchange(t, std::memory_order_acq_rel);
    // Release: t (and its callable) is visible to the consumer that follows
    // this link with an acquire load.
    prev->next.store(t, std::memory_order_release);
  }

  bool overflow_nonempty() const noexcept {
    // Relaxed: a hint for FIFO order and for "is there work"; in park() it
    // runs after the heavy fence, which orders it (see park()). The head
    // matters too: a node put back by overflow_unpop() may sit in front of a
    // stub that is also the tail.
    return overflow_tail_.load(std::memory_order_relaxed) != &overflow_stub_ ||
           overflow_head_.load(std::memory_order_relaxed) != &overflow_stub_;
  }

  // Consumer side; caller holds overflow_mutex_. Oldest node, or nullptr
  // when empty or when the oldest is still being linked.
  detail::task_node* overflow_pop() noexcept {
    // Relaxed (every access to overflow_head_ here): written only under the
    // lock we hold; other threads read it as a hint only.
    detail::task_node* head = overflow_head_.load(std::memory_order_relaxed);
    // Acquire (all loads of `next` here): pairs with the producers' release
    // link stores, so the node's callable is visible.
    detail::task_node* next = head->next.load(std::memory_order_acquire);
    if (head == &overflow_stub_) {
      if (next == nullptr) return nullptr;
      overflow_head_.store(next, std::memory_order_relaxed);
      head = next;
      next = next->next.load(std::memory_order_acquire);
    }
    if (next != nullptr) {
      overflow_head_.store(next, std::memory_order_relaxed);
      return head;
    }
    // head is the last linked node: take it only if no producer is between
    // its exchange and its link, by queueing the stub behind it.
    if (head != overflow_tail_.load(std::memory_order_acquire)) return nullptr;
    overflow_push(&overflow_stub_);
    next = head->next.load(std::memory_order_acquire);
    if (next == nullptr) return nullptr;
    overflow_head_.store(next, std::memory_order_relaxed);
    return head;
  }

  detail::task_node* pop_injected() noexcept {
    detail::task_node* t = nullptr;
    if (injection_.try_pop(t)) return t;
    if (!overflow_nonempty()) return nullptr;
    std::lock_guard lock(overflow_mutex_);
    t = overflow_pop();
    if (t == nullptr) return nullptr;
    // Refill the ring (oldest first) so the next takers need no lock; bounded
    // to keep the lock hold short. Stops when the ring is full, leaving the
    // popped node in hand for the next round.
    for (int i = 0; i < 256; ++i) {
      detail::task_node* moved = overflow_pop();
      if (moved == nullptr) break;
      if (!injection_.try_push(std::move(moved))) {
        overflow_unpop(moved);
        break;
      }
    }
    return t;
  }

  // Puts back the node overflow_pop() just returned (still under the lock).
  void overflow_unpop(detail::task_node* t) noexcept {
    // t was the head before the pop: make it the head again. Its link is
    // unchanged (the pop only read it). Relaxed: as in overflow_pop().
    overflow_head_.store(t, std::memory_order_relaxed);
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
    if (++self.tick % 61 == 0) {
      if (detail::task_node* t = pop_injected()) return t;
    }
    if (detail::task_node* t = self.deque.pop()) return t;
    // One look at the shared FIFO before becoming a searcher: a stream of
    // outside posts is then consumed without touching searching_.
    return pop_injected();
  }

  // Whether any queue visibly holds work (a push in progress counts).
  bool any_queued() const noexcept {
    if (injection_.size_approx() != 0) return true;
    if (overflow_nonempty()) return true;
    for (const auto& w : workers_)
      if (!w->deque.empty()) return true;
    return false;
  }

  bool quiescent() const noexcept {
    // Queues first, then workers: a task taken from a queue before our look
    // keeps its worker active until it has finished.
    if (any_queued()) return false;
    return active_.load(std::memory_order_seq_cst) == 0;
  }

  // After publishing work: wake one sleeper unless a searcher will find it.
  void notify_one_if_needed() noexcept {
    // Orders the publish before the loads below (the light side of the
    // handshake whose heavy side is in park()).
    detail::light_fence();
    // Relaxed: ordered by light_fence(), see above.
    if (searching_.load(std::memory_order_relaxed) != 0) return;
    if (!sleepers_.has_waiters()) return;
    // A worker is already being woken: it will search (it clears the flag on
    // its way out of park()). Without this, every post during the wake-up
    // latency would make another futex call. Relaxed load: ordered by
    // light_fence() like the loads above; the exchange decides who wakes.
    if (wake_pending_.load(std::memory_order_relaxed) || wake_pending_.exchange(true, std::memory_order_seq_cst))
      return;
    sleepers_.notify_one();
  }

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
    if (opts_.pin) detail::pin_current_thread(cpus_[self.index]);
    detail::name_current_thread(opts_.name_prefix + "-" + std::to_string(self.index));
    for (;;) {
      if (detail::task_node* t = next_task(self)) {
        execute(t);
        continue;
      }
      if (detail::task_node* t = search(self)) {
        execute(t);
        continue;
      }
      if (!park()) break;
    }
    detail::current_worker() = nullptr;
  }

  // Bounded search for work outside our deque. Returns a task, or nullptr
  // when the budget is spent (the caller then parks).
  detail::task_node* search(detail::pool_worker& self) noexcept {
    searching_.fetch_add(1, std::memory_order_seq_cst);
    const std::uint32_t rounds = opts_.spin_rounds;
    for (std::uint32_t r = 0; r <= rounds; ++r) {
      if (detail::task_node* t = find_remote(self)) {
        stop_searching(true);
        return t;
      }
      if (r == rounds) break;
      // Pause first; in the second half yield, so that on an oversubscribed
      // machine the threads that hold work get the core.
      if (r < rounds / 2) {
        for (int i = 0; i < 32; ++i) detail::cpu_relax();
      } else {
        std::this_thread::yield();
      }
    }
    stop_searching(false);
    return nullptr;
  }

  void stop_searching(bool found_work) noexcept {
    const std::uint32_t before = searching_.fetch_sub(1, std::memory_order_seq_cst);
    // The last searcher found work and leaves: if more is visible, hand the
    // search over to a sleeper so parallelism ramps up.
    if (found_work && before == 1 && any_queued()) notify_one_if_needed();
  }

  // Sleeps until woken. Returns false when the pool is shutting down and no
  // work is left anywhere.
  //
  // Handshake with notify_one_if_needed(): we are no longer searching and are
  // counted as a waiter before the heavy fence, and the queues are re-checked
  // after it; a poster publishes before its light fence and reads searching_
  // and the waiter count after it. So either the poster sees a sleeper with
  // no searcher (and wakes it), or our re-check sees the task.
  //
  // wake_pending_ is the other reason a poster skips the wake-up: it is set
  // by the poster that wakes somebody and cleared by every worker entering or
  // leaving park(). A poster that saw it set did so before the clear that
  // precedes some worker's heavy fence and re-check (in this park() or the
  // next), so that re-check sees the post. Clearing on entry also undoes a
  // flag whose notify found nobody (the waiter had just cancelled).
  bool park() noexcept {
    wake_pending_.store(false, std::memory_order_seq_cst);
    const auto key = sleepers_.prepare_wait();
    if (any_queued()) {
      sleepers_.cancel_wait();
      return true;
    }
    if (stopping_.load(std::memory_order_seq_cst)) {
      sleepers_.cancel_wait();
      return false;
    }
    if (active_.fetch_sub(1, std::memory_order_seq_cst) == 1) idle_ec_.notify_all();
    sleepers_.wait(key);
    active_.fetch_add(1, std::memory_order_seq_cst);
    wake_pending_.store(false, std::memory_order_seq_cst);
    return true;
  }

  void shutdown() noexcept {
    stopping_.store(true, std::memory_order_seq_cst);
    sleepers_.notify_all();
    for (auto& w : workers_)
      if (w->thread.joinable()) w->thread.join();
    // Work injected concurrently with destruction (a contract violation by
    // the poster) still runs rather than leaking.
    while (detail::task_node* t = pop_injected()) execute(t);
  }

  pool_options opts_;
  std::vector<int> cpus_;
  std::vector<std::unique_ptr<detail::pool_worker>> workers_;

  detail::mpmc_ring<detail::task_node*> injection_;
  // Overflow queue (see inject()): the stub node is never run.
  detail::task_node overflow_stub_{};
  // Last node appended; producers exchange it.
  alignas(detail::false_sharing_range) std::atomic<detail::task_node*> overflow_tail_{&overflow_stub_};
  // Consumer side: the lock makes whoever holds it the single consumer.
  alignas(detail::false_sharing_range) std::mutex overflow_mutex_;
  // Oldest node (or the stub); written only under overflow_mutex_.
  std::atomic<detail::task_node*> overflow_head_{&overflow_stub_};

  // Workers currently searching (between search() start and end). Read by
  // every post; written only when a worker runs dry, so it stays shared.
  alignas(detail::false_sharing_range) std::atomic<std::uint32_t> searching_{0};
  // A poster has woken a worker that has not yet left park().
  std::atomic<bool> wake_pending_{false};
  detail::event_count sleepers_;
  // Workers not parked in sleepers_ (running, searching, or about to park).
  alignas(detail::false_sharing_range) std::atomic<std::uint32_t> active_{0};
  detail::event_count idle_ec_;
  std::atomic<bool> stopping_{false};

  alignas(detail::false_sharing_range) std::atomic<std::uint64_t> errors_{0};
  std::mutex error_mutex_;
};

}  // namespace runnel
