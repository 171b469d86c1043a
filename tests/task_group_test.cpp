#include "runnel/task_group.hpp"

#include <atomic>
#include <catch2/catch.hpp>
#include <ctime>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "runnel/thread_pool.hpp"
#include "test_support.hpp"

using runnel::task_group;
using runnel::thread_pool;

namespace {

// One task per call: both recursive calls are group tasks.
std::uint64_t fib(thread_pool& pool, int n) {
  if (n < 2) return static_cast<std::uint64_t>(n);
  std::uint64_t a = 0, b = 0;
  task_group g{pool};
  g.run([&] { a = fib(pool, n - 1); });
  g.run([&] { b = fib(pool, n - 2); });
  g.wait();
  return a + b;
}

std::uint64_t fib_serial(int n) {
  std::uint64_t a = 0, b = 1;
  for (int i = 0; i < n; ++i) {
    const std::uint64_t t = a + b;
    a = b;
    b = t;
  }
  return a;
}

}  // namespace

namespace {

// Fails the whole program (instead of hanging the test run for ever) when
// `done` is not set within a generous bound. Not a timing assertion: the
// guarded work takes milliseconds; only a deadlock reaches the bound.
class watchdog {
 public:
  explicit watchdog(const char* what, std::chrono::seconds limit = std::chrono::seconds(30))
      : thread_([this, what, limit] {
          std::unique_lock lock(m_);
          if (!cv_.wait_for(lock, limit, [this] { return done_; })) {
            std::fprintf(stderr, "watchdog: '%s' did not finish (deadlock)\n", what);
            std::abort();
          }
        }) {}
  ~watchdog() {
    {
      std::lock_guard lock(m_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

// Writes 1 into its slot when destroyed, a little late (after some yields),
// so that a destructor running after wait() returned is caught by the check
// that follows the wait (and by the sanitizers).
struct late_dtor_probe {
  int* slot;
  explicit late_dtor_probe(int* s) noexcept : slot(s) {}
  late_dtor_probe(late_dtor_probe&& o) noexcept : slot(std::exchange(o.slot, nullptr)) {}
  late_dtor_probe(const late_dtor_probe&) = delete;
  late_dtor_probe& operator=(const late_dtor_probe&) = delete;
  late_dtor_probe& operator=(late_dtor_probe&&) = delete;
  ~late_dtor_probe() {
    if (slot == nullptr) return;
    for (int i = 0; i < 20; ++i) std::this_thread::yield();
    *slot = 1;  // plain write: wait() must order it before its return
  }
};

}  // namespace

TEST_CASE("fork-join fib is correct on 1, 2 and 8 workers", "[group]") {
  const int n = runnel_test::under_sanitizer ? 17 : 25;
  for (std::size_t threads : {1, 2, 8}) {
    INFO("threads " << threads);
    thread_pool pool{{.threads = threads, .pin = false}};
    std::uint64_t r = 0;
    // From inside the pool (the usual way) ...
    r = pool.submit([&] { return fib(pool, n); }).get();
    CHECK(r == fib_serial(n));
    // ... and with the root wait() on an outside thread.
    CHECK(fib(pool, n - 3) == fib_serial(n - 3));
    pool.wait_idle();
  }
}

TEST_CASE("deep fork-join fib(32) on one worker neither overflows nor deadlocks", "[group][deep]") {
  const int n = runnel_test::under_sanitizer ? 20 : 32;
  for (std::size_t threads : {1, 2}) {
    INFO("threads " << threads);
    thread_pool pool{{.threads = threads, .pin = false}};
    CHECK(pool.submit([&] { return fib(pool, n); }).get() == fib_serial(n));
  }
}

TEST_CASE("a deep chain of nested waits completes on 1, 2 and 4 workers", "[group][deep]") {
  // Each level waits on a group whose only task is the next level, so every
  // level is a nested wait; with stealing allowed everywhere this would be
  // the worst case for stack growth.
  const int depth = runnel_test::under_sanitizer ? 500 : 3000;
  for (std::size_t threads : {1, 2, 4}) {
    thread_pool pool{{.threads = threads, .pin = false}};
    std::atomic<int> reached{0};
    std::function<void(int)> level = [&](int d) {
      reached.fetch_add(1, std::memory_order_relaxed);
      if (d == 0) return;
      task_group g{pool};
      g.run([&level, d] { level(d - 1); });
      g.wait();
    };
    pool.submit([&] { level(depth); }).get();
    CHECK(reached.load() == depth + 1);
  }
}

TEST_CASE("wait rethrows the first exception and the group is reusable", "[group][errors]") {
  thread_pool pool{{.threads = 2, .pin = false}};
  task_group g{pool};
  std::atomic<int> ran{0};
  for (int i = 0; i < 100; ++i) {
    g.run([&ran, i] {
      ++ran;
      if (i % 10 == 3) throw std::runtime_error("task " + std::to_string(i));
    });
  }
  std::string what;
  try {
    g.wait();
  } catch (const std::runtime_error& e) {
    what = e.what();
  }
  CHECK(ran.load() == 100);  // every task ran despite the failures
  CHECK(what.rfind("task ", 0) == 0);
  // Reuse after a failure: clean.
  g.run([&ran] { ++ran; });
  CHECK_NOTHROW(g.wait());
  CHECK(ran.load() == 101);
  CHECK(pool.error_count() == 0);  // group exceptions do not reach the pool handler
}

TEST_CASE("exceptions propagate through nested groups", "[group][errors]") {
  thread_pool pool{{.threads = 2, .pin = false}};
  auto f = pool.submit([&] {
    task_group outer{pool};
    outer.run([&] {
      task_group inner{pool};
      inner.run([] { throw std::out_of_range("inner"); });
      inner.wait();  // rethrows inside the outer task
    });
    outer.wait();
  });
  pool.wait_idle();  // see the submit test in thread_pool_test.cpp
  CHECK_THROWS_AS(f.get(), std::out_of_range);
}

TEST_CASE("nested groups and tasks that run more tasks in the same group", "[group]") {
  const int width = runnel_test::under_sanitizer ? 20 : 100;
  for (std::size_t threads : {1, 3}) {
    thread_pool pool{{.threads = threads, .pin = false}};
    std::atomic<int> leaves{0};
    auto total = pool.submit([&] {
      task_group outer{pool};
      for (int i = 0; i < width; ++i) {
        outer.run([&] {
          task_group inner{pool};
          for (int j = 0; j < width; ++j) inner.run([&] { ++leaves; });
          inner.wait();
          // Spawn into the outer group from one of its own tasks.
          outer.run([&] { ++leaves; });
        });
      }
      outer.wait();
      return leaves.load();
    });
    CHECK(total.get() == width * width + width);
  }
}

TEST_CASE("wait from threads outside the pool", "[group]") {
  thread_pool pool{{.threads = 2, .pin = false}};
  const int per_thread = static_cast<int>(runnel_test::scaled(20'000));
  std::atomic<int> ran{0};
  runnel_test::run_threads(3, [&](std::size_t) {
    task_group g{pool};
    for (int i = 0; i < per_thread; ++i) g.run([&ran] { ran.fetch_add(1, std::memory_order_relaxed); });
    g.wait();
  });
  CHECK(ran.load() == 3 * per_thread);
  // A group whose tasks take a while: the outside waiter must sleep, not miss the end.
  task_group g{pool};
  std::atomic<bool> done{false};
  g.run([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    done = true;
  });
  g.wait();
  CHECK(done.load());
}

TEST_CASE("the destructor waits for the group and swallows its exception", "[group]") {
  thread_pool pool{{.threads = 2, .pin = false}};
  std::atomic<int> ran{0};
  {
    task_group g{pool};
    for (int i = 0; i < 1000; ++i) g.run([&ran] { ++ran; });
    g.run([] { throw std::runtime_error("ignored"); });
  }
  CHECK(ran.load() == 1000);
  CHECK(pool.error_count() == 0);
}

TEST_CASE("a waiting worker sleeps while the group's task runs elsewhere", "[group]") {
  // Worker A waits on a group whose only task runs on worker B until we
  // release it. A must go to sleep (its CPU time stays near zero while we
  // hold B: a polling waiter burns its core) and must be woken by the
  // group's last task (a missing wake-up hangs: the watchdog fails it).
  watchdog dog{"waiting worker sleeps"};
  thread_pool pool{{.threads = 2, .pin = false, .spin_rounds = 2}};
  for (int round = 0; round < 5; ++round) {
    std::atomic<bool> b_started{false}, a_waiting{false}, release{false};
    std::atomic<long> a_cpu_ns{-1};
    auto f = pool.submit([&] {
      task_group g{pool};
      g.run([&] {
        b_started = true;
        while (!release.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      });
      // Let B steal it, so that A's wait has nothing to run.
      while (!b_started.load()) std::this_thread::yield();
      timespec t0{}, t1{};
      ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
      a_waiting = true;
      g.wait();
      ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
      a_cpu_ns = (t1.tv_sec - t0.tv_sec) * 1'000'000'000L + (t1.tv_nsec - t0.tv_nsec);
    });
    while (!a_waiting.load()) std::this_thread::yield();
    // Hold B for 0.3 s of wall time; a polling A would use most of it.
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    release = true;
    f.get();
    INFO("CPU time of the waiting worker: " << a_cpu_ns.load() << " ns");
    CHECK(a_cpu_ns.load() >= 0);
    CHECK(a_cpu_ns.load() < 30'000'000L);  // a CPU-time budget, not a wall-clock check
  }
}

TEST_CASE("stealing inside nested waits stops at the help-depth bound", "[group][deep]") {
  // Worker B runs a group task that blocks until released. Worker A runs
  // tasks W (posted from outside, so they sit in the shared FIFO), each of
  // which waits on that group: with nothing of its own to run, A's wait
  // steals the next W and waits again inside it, one level deeper each
  // time. Up to max_help_depth nested waits may steal; the next one only
  // pops its own deque (empty), so A sleeps there and the nesting stops at
  // exactly max_help_depth + 1 W frames instead of growing with the number
  // of queued W's (a stack overflow with enough of them).
  constexpr int max_depth = static_cast<int>(runnel::detail::max_help_depth);
  const int ws = max_depth * 3;
  thread_pool pool{{.threads = 2, .pin = false}};
  task_group blocker{pool};
  std::atomic<bool> release{false}, blocking{false};
  blocker.run([&] {
    blocking = true;
    while (!release.load()) std::this_thread::yield();
  });
  while (!blocking.load()) std::this_thread::yield();
  std::atomic<int> started{0}, max_nesting{0};
  static thread_local int nesting = 0;
  for (int i = 0; i < ws; ++i) {
    pool.post([&] {
      ++nesting;
      started.fetch_add(1);
      int m = max_nesting.load();
      while (nesting > m && !max_nesting.compare_exchange_weak(m, nesting)) {
      }
      blocker.wait();
      --nesting;
    });
  }
  // Wait until the bound is reached, then give a stealing mutant plenty of
  // chances to go deeper before releasing.
  while (started.load() < max_depth + 1) std::this_thread::yield();
  for (int i = 0; i < 200; ++i) std::this_thread::sleep_for(std::chrono::microseconds(100));
  const int depth_seen = max_nesting.load();
  release = true;
  blocker.wait();
  pool.wait_idle();
  CHECK(started.load() == ws);
  CHECK(depth_seen == max_depth + 1);
}

TEST_CASE("post_fair work is not starved by a long fork-join wait on one worker", "[group]") {
  thread_pool pool{{.threads = 1, .pin = false}};
  std::atomic<bool> fair_ran{false};
  std::atomic<long> spins{0};
  const long cap = 1'000'000;
  std::atomic<bool> started{false};
  auto f = pool.submit([&] {
    task_group g{pool};
    std::function<void()> step = [&] {
      const long s = spins.fetch_add(1) + 1;
      if (s == 1) started = true;
      if (fair_ran.load() || s >= cap) return;
      g.run(step);  // the group never runs dry while we spin
    };
    g.run(step);
    g.wait();
  });
  while (!started.load()) std::this_thread::yield();
  pool.post_fair([&] { fair_ran = true; });
  f.get();
  CHECK(fair_ran.load());
  CHECK(spins.load() < cap);
}

TEST_CASE("a worker asleep in wait() wakes for tasks an outside thread adds to its group", "[group]") {
  // X (in the group) runs on one worker and needs Y to run first; the other
  // worker sleeps in the group's wait(); Y is added from outside. Only the
  // sleeping waiter can run Y, so it must be woken by run().
  thread_pool pool{{.threads = 2, .pin = false, .spin_rounds = 1}};
  task_group g{pool};
  std::atomic<bool> y_ran{false};
  std::atomic<bool> waiting{false};
  std::atomic<bool> x_gave_up{false};
  g.run([&] {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!y_ran.load()) {
      if (std::chrono::steady_clock::now() > deadline) {
        x_gave_up = true;
        return;
      }
      std::this_thread::yield();
    }
  });
  auto f = pool.submit([&] {
    waiting = true;
    g.wait();
  });
  while (!waiting.load()) std::this_thread::yield();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // let the waiter fall asleep
  g.run([&] { y_ran = true; });
  f.get();
  g.wait();
  CHECK(y_ran.load());
  CHECK_FALSE(x_gave_up.load());
}

TEST_CASE("run() from one thread while another loops wait() loses no count", "[group]") {
  // wait() used to store 0 into the state after reading a count of 0; a
  // run() in between lost its increment, the task's finish underflowed the
  // count and every later wait() hung.
  watchdog dog{"concurrent run/wait"};
  thread_pool pool{{.threads = 1, .pin = false}};
  task_group g{pool};
  const int runs = static_cast<int>(runnel_test::scaled(200'000));
  std::atomic<bool> adding{true};
  std::atomic<int> ran{0};
  std::thread waiter([&] {
    while (adding.load()) g.wait();
  });
  std::thread adder([&] {
    for (int i = 0; i < runs; ++i) g.run([&ran] { ran.fetch_add(1, std::memory_order_relaxed); });
    adding = false;
  });
  adder.join();
  waiter.join();
  g.wait();
  CHECK(ran.load() == runs);
}

TEST_CASE("wait() returns only after every task's callable and captures are destroyed", "[group]") {
  thread_pool pool{{.threads = 2, .pin = false}};
  const int rounds = runnel_test::under_sanitizer ? 30 : 300;
  constexpr int per_round = 8;
  auto one_round = [&pool] {
    // Heap slots (ASan sees a late write after the vector is gone) written
    // only by the probes' destructors.
    std::vector<int> destroyed(per_round, 0);
    {
      task_group g{pool};
      for (int i = 0; i < per_round; ++i) g.run([p = late_dtor_probe(&destroyed[static_cast<std::size_t>(i)])] {});
      g.wait();
    }
    int n = 0;
    for (int d : destroyed) n += d;
    return n;
  };
  int bad_outside = 0, bad_inside = 0;
  for (int r = 0; r < rounds; ++r) {
    if (one_round() != per_round) ++bad_outside;  // wait() outside the pool
    if (pool.submit(one_round).get() != per_round) ++bad_inside;  // helping wait() on a worker
  }
  CHECK(bad_outside == 0);
  CHECK(bad_inside == 0);
}
