#include "runnel/thread_pool.hpp"

#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <functional>
#include <optional>
#include <tuple>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "test_support.hpp"

using runnel::pool_options;
using runnel::thread_pool;
using runnel_test::scaled;

namespace {

double process_cpu_seconds() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// A gate a task can block on (in tests only: blocking a worker on purpose).
struct gate {
  std::mutex m;
  std::condition_variable cv;
  bool open = false;
  void wait() {
    std::unique_lock lock(m);
    cv.wait(lock, [&] { return open; });
  }
  void release() {
    {
      std::lock_guard lock(m);
      open = true;
    }
    cv.notify_all();
  }
};

std::string current_thread_name() {
  char buf[32] = {};
  ::pthread_getname_np(::pthread_self(), buf, sizeof buf);
  return buf;
}

}  // namespace

TEST_CASE("posted tasks from several outside threads run exactly once", "[pool]") {
  const std::size_t producers = 4;
  const std::size_t per_producer = scaled(250'000);
  std::vector<std::atomic<std::uint8_t>> runs(producers * per_producer);
  for (auto& r : runs) r.store(0);
  {
    thread_pool pool{{.threads = 2, .pin = false}};
    runnel_test::run_threads(producers, [&](std::size_t p) {
      for (std::size_t i = 0; i < per_producer; ++i) {
        pool.post([&runs, k = p * per_producer + i] { runs[k].fetch_add(1, std::memory_order_relaxed); });
      }
    });
    pool.wait_idle();
    std::size_t once = 0, other = 0;
    for (auto& r : runs) (r.load() == 1 ? once : other)++;
    CHECK(once == runs.size());
    CHECK(other == 0);
    CHECK(pool.error_count() == 0);
  }
  for (auto& r : runs) REQUIRE(r.load() == 1);  // nothing ran twice during destruction
}

TEST_CASE("a tiny injection ring overflows without dropping and keeps FIFO order", "[pool]") {
  const std::size_t n = scaled(20'000);
  std::vector<std::size_t> order;
  order.reserve(n);
  gate g;
  thread_pool pool{{.threads = 1, .pin = false, .injection_capacity = 4}};
  pool.post([&g] { g.wait(); });
  for (std::size_t i = 0; i < n; ++i) pool.post([&order, i] { order.push_back(i); });
  g.release();
  pool.wait_idle();
  REQUIRE(order.size() == n);
  for (std::size_t i = 0; i < n; ++i) REQUIRE(order[i] == i);
}

TEST_CASE("overflowing a tiny ring with several producers and workers loses nothing", "[pool]") {
  const std::size_t producers = 3;
  const std::size_t per_producer = scaled(100'000);
  std::vector<std::atomic<std::uint8_t>> runs(producers * per_producer);
  for (auto& r : runs) r.store(0);
  for (std::size_t threads : {2, 3}) {
    for (auto& r : runs) r.store(0);
    thread_pool pool{{.threads = threads, .pin = false, .injection_capacity = 8}};
    runnel_test::run_threads(producers, [&](std::size_t p) {
      for (std::size_t i = 0; i < per_producer; ++i) {
        const std::size_t k = p * per_producer + i;
        if (i % 3 == 0) {
          pool.post_fair([&runs, k] { runs[k].fetch_add(1, std::memory_order_relaxed); });
        } else {
          pool.post([&runs, k] { runs[k].fetch_add(1, std::memory_order_relaxed); });
        }
      }
    });
    pool.wait_idle();
    std::size_t bad = 0;
    for (auto& r : runs) bad += r.load() != 1;
    CHECK(bad == 0);
  }
}

TEST_CASE("submit delivers values and exceptions through the future", "[pool]") {
  thread_pool pool{{.threads = 2, .pin = false}};
  auto f1 = pool.submit([] { return 6 * 7; });
  auto f2 = pool.submit([] { throw std::runtime_error("boom"); });
  auto f3 = pool.submit([p = std::make_unique<int>(5)] { return *p + 1; });  // move-only
  std::atomic<int> side{0};
  auto f4 = pool.submit([&side] { side = 9; });
  // Let the workers drop their references to the shared states first: the
  // reference counts of exception objects live in the uninstrumented C++
  // runtime, so ThreadSanitizer would otherwise report the last release of
  // an exception on a worker as racing with our what() below.
  pool.wait_idle();
  CHECK(f1.get() == 42);
  CHECK_THROWS_WITH(f2.get(), "boom");
  CHECK(f3.get() == 6);
  f4.get();
  CHECK(side.load() == 9);
  pool.wait_idle();
  CHECK(pool.error_count() == 0);  // exceptions in submit() go to the future only
}

TEST_CASE("the error handler receives every posted-task exception and the count is exact", "[pool]") {
  std::mutex m;
  std::vector<std::string> messages;
  const int throwers = 1000;
  std::atomic<int> normal{0};
  thread_pool pool{{.threads = 2, .pin = false, .on_error = [&](std::exception_ptr e) {
                      try {
                        std::rethrow_exception(e);
                      } catch (const std::exception& ex) {
                        std::lock_guard lock(m);
                        messages.emplace_back(ex.what());
                      }
                    }}};
  for (int i = 0; i < throwers; ++i) {
    pool.post([i] { throw std::runtime_error("task " + std::to_string(i)); });
    pool.post([&normal] { ++normal; });
  }
  pool.wait_idle();
  CHECK(pool.error_count() == static_cast<std::uint64_t>(throwers));
  CHECK(normal.load() == throwers);  // workers survive the exceptions
  std::lock_guard lock(m);
  REQUIRE(messages.size() == static_cast<std::size_t>(throwers));
  std::set<std::string> distinct(messages.begin(), messages.end());
  CHECK(distinct.size() == static_cast<std::size_t>(throwers));
  CHECK(distinct.count("task 0") == 1);
  CHECK(distinct.count("task 999") == 1);
}

TEST_CASE("the default error handler keeps the worker alive and a throwing handler is survived", "[pool]") {
  std::atomic<int> after{0};
  {
    thread_pool pool{{.threads = 1, .pin = false}};
    pool.post([] { throw std::logic_error("expected test exception (default handler prints this)"); });
    pool.post([] { throw 7; });
    pool.post([&after] { ++after; });
    pool.wait_idle();
    CHECK(pool.error_count() == 2);
    CHECK(after.load() == 1);
  }
  {
    thread_pool pool{{.threads = 1, .pin = false, .on_error = [](std::exception_ptr) { throw 1; }}};
    pool.post([] { throw 2; });
    pool.post([&after] { ++after; });
    pool.wait_idle();
    CHECK(pool.error_count() == 1);
    CHECK(after.load() == 2);
  }
}

namespace {
// Each task posts `fanout` children down to `depth`; returns the node count.
std::size_t tree_size(std::size_t fanout, std::size_t depth) {
  std::size_t total = 0, level = 1;
  for (std::size_t d = 0; d <= depth; ++d, level *= fanout) total += level;
  return total;
}
void spawn_tree(thread_pool& pool, std::atomic<std::size_t>& count, std::size_t fanout, std::size_t depth) {
  count.fetch_add(1, std::memory_order_relaxed);
  if (depth == 0) return;
  for (std::size_t i = 0; i < fanout; ++i)
    pool.post([&pool, &count, fanout, depth] { spawn_tree(pool, count, fanout, depth - 1); });
}
}  // namespace

TEST_CASE("tasks may post more tasks and current() and is_worker() identify the pool", "[pool]") {
  const std::size_t depth = runnel_test::under_sanitizer ? 9 : 14;
  for (std::size_t threads : {1, 2, 4}) {
    thread_pool pool{{.threads = threads, .pin = false}};
    std::atomic<std::size_t> count{0};
    pool.post([&] { spawn_tree(pool, count, 2, depth); });
    pool.wait_idle();
    CHECK(count.load() == tree_size(2, depth));

    CHECK_FALSE(pool.is_worker());
    CHECK(thread_pool::current() == nullptr);
    thread_pool other{{.threads = 1, .pin = false}};
    auto f = pool.submit([&] {
      return std::make_tuple(pool.is_worker(), thread_pool::current() == &pool, other.is_worker());
    });
    CHECK(f.get() == std::make_tuple(true, true, false));
    auto g = pool.submit([&] {
      bool threw = false;
      try {
        pool.wait_idle();
      } catch (const std::logic_error&) {
        threw = true;
      }
      return threw;
    });
    CHECK(g.get());
  }
}

TEST_CASE("post_fair tasks are not starved by a worker whose deque keeps refilling", "[pool]") {
  thread_pool pool{{.threads = 1, .pin = false}};
  std::atomic<bool> fair_ran{false};
  std::atomic<long> spins_before_fair{-1};
  const long cap = 1'000'000;
  std::atomic<long> spins{0};
  gate g;
  // The spinner re-posts itself to the worker's own deque until the fair
  // task has run (or a cap is hit, which would mean starvation).
  std::function<void()> spinner = [&] {
    const long s = spins.fetch_add(1) + 1;
    if (s == 1) g.release();
    if (fair_ran.load() || s >= cap) return;
    pool.post(spinner);
  };
  pool.post(spinner);
  g.wait();  // the spinner is running on the only worker
  pool.post_fair([&] {
    spins_before_fair = spins.load();
    fair_ran = true;
  });
  pool.wait_idle();
  CHECK(fair_ran.load());
  CHECK(spins_before_fair.load() < cap);
}

TEST_CASE("post_fair from inside a task queues behind the shared FIFO", "[pool]") {
  thread_pool pool{{.threads = 1, .pin = false}};
  std::vector<int> order;
  gate g;
  pool.post([&] { g.wait(); });
  pool.post([&] {
    order.push_back(1);
    pool.post_fair([&] { order.push_back(3); });  // behind 2, already waiting
  });
  pool.post([&] { order.push_back(2); });
  g.release();
  pool.wait_idle();
  CHECK(order == std::vector<int>{1, 2, 3});
}

TEST_CASE("destruction runs everything already posted, including follow-ups", "[pool]") {
  const std::size_t n = scaled(200'000);
  for (std::size_t threads : {1, 2, 3}) {
    std::atomic<std::size_t> ran{0};
    {
      thread_pool pool{{.threads = threads, .pin = false, .injection_capacity = 1024}};
      for (std::size_t i = 0; i < n; ++i) {
        if (i % 100 == 0) {
          pool.post([&ran, &pool] {
            ran.fetch_add(1, std::memory_order_relaxed);
            pool.post([&ran] { ran.fetch_add(1, std::memory_order_relaxed); });
            pool.post_fair([&ran] { ran.fetch_add(1, std::memory_order_relaxed); });
          });
        } else {
          pool.post([&ran] { ran.fetch_add(1, std::memory_order_relaxed); });
        }
      }
    }  // destroyed with most of the work still queued
    CHECK(ran.load() == n + 2 * (n / 100));
  }
}

TEST_CASE("workers are named and pinned to the allowed CPUs in order", "[pool][affinity]") {
  const std::vector<int> allowed = runnel::detail::affinity_cpus();
  REQUIRE_FALSE(allowed.empty());
  const std::size_t n = allowed.size() + 1;  // one more than CPUs: round-robin
  thread_pool pool{{.threads = n, .pin = true, .name_prefix = "pintest"}};
  REQUIRE(pool.size() == n);
  REQUIRE(pool.cpus().size() == n);
  for (std::size_t i = 0; i < n; ++i) CHECK(pool.cpus()[i] == allowed[i % allowed.size()]);

  std::mutex m;
  std::map<std::string, std::set<int>> seen;  // thread name -> CPUs observed
  for (int i = 0; i < 2000; ++i) {
    pool.post([&] {
      const int cpu = ::sched_getcpu();
      std::lock_guard lock(m);
      seen[current_thread_name()].insert(cpu);
    });
  }
  pool.wait_idle();
  REQUIRE_FALSE(seen.empty());
  for (const auto& [name, cpus] : seen) {
    INFO("thread " << name);
    REQUIRE(name.rfind("pintest-", 0) == 0);
    const std::size_t index = std::stoul(name.substr(8));
    REQUIRE(index < n);
    REQUIRE(cpus.size() == 1);
    CHECK(*cpus.begin() == pool.cpus()[index]);
  }

  thread_pool unpinned{{.threads = 2, .pin = false}};
  CHECK(unpinned.cpus().empty());
  CHECK(unpinned.size() == 2);
}

TEST_CASE("an affinity mask of one CPU gives a one-worker pool on that CPU", "[pool][affinity]") {
  const std::vector<int> allowed = runnel::detail::affinity_cpus();
  cpu_set_t saved;
  CPU_ZERO(&saved);
  REQUIRE(::sched_getaffinity(0, sizeof saved, &saved) == 0);
  const int cpu = allowed.back();
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(cpu, &one);
  REQUIRE(::sched_setaffinity(0, sizeof one, &one) == 0);
  std::size_t size = 0;
  std::vector<int> cpus;
  int observed = -1;
  std::vector<int> discovered;
  try {
    discovered = runnel::detail::affinity_cpus();
    thread_pool pool;  // defaults: threads from the mask, pinned
    size = pool.size();
    cpus = pool.cpus();
    observed = pool.submit([] { return ::sched_getcpu(); }).get();
  } catch (...) {
    ::sched_setaffinity(0, sizeof saved, &saved);
    throw;
  }
  REQUIRE(::sched_setaffinity(0, sizeof saved, &saved) == 0);
  CHECK(discovered == std::vector<int>{cpu});
  CHECK(size == 1);
  CHECK(cpus == std::vector<int>{cpu});
  CHECK(observed == cpu);
  CHECK(runnel::detail::affinity_cpus() == allowed);  // restored
}

TEST_CASE("cgroup quota parsing", "[pool][cgroup]") {
  namespace cg = runnel::detail::cgroup;
  CHECK_FALSE(cg::parse_cpu_max("max 100000\n").has_value());
  CHECK(cg::parse_cpu_max("200000 100000\n") == Approx(2.0));
  CHECK(cg::parse_cpu_max("150000 100000") == Approx(1.5));
  CHECK(cg::parse_cpu_max("50000 100000") == Approx(0.5));
  CHECK_FALSE(cg::parse_cpu_max("").has_value());
  CHECK_FALSE(cg::parse_cpu_max("garbage").has_value());
  CHECK_FALSE(cg::parse_cpu_max("100000 0").has_value());
  CHECK_FALSE(cg::parse_cpu_max("12x 100000").has_value());

  CHECK_FALSE(cg::parse_cfs_quota("-1\n", "100000\n").has_value());
  CHECK(cg::parse_cfs_quota("300000\n", "100000\n") == Approx(3.0));
  CHECK_FALSE(cg::parse_cfs_quota("abc", "100000").has_value());
  CHECK_FALSE(cg::parse_cfs_quota("100000", "0").has_value());

  CHECK(cg::cpus_for_limit(0.5) == 1);
  CHECK(cg::cpus_for_limit(1.0) == 1);
  CHECK(cg::cpus_for_limit(1.5) == 2);
  CHECK(cg::cpus_for_limit(4.0) == 4);

  CHECK(runnel::detail::default_worker_count(8, std::nullopt) == 8);
  CHECK(runnel::detail::default_worker_count(8, 2.5) == 3);
  CHECK(runnel::detail::default_worker_count(2, 16.0) == 2);
  CHECK(runnel::detail::default_worker_count(8, 0.2) == 1);

  const std::string v2 = "0::/user.slice/app.scope\n";
  const std::string v1 = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n";
  CHECK(cg::find_cgroup_path(v2, "") == std::optional<std::string>("/user.slice/app.scope"));
  CHECK_FALSE(cg::find_cgroup_path(v2, "cpu").has_value());
  CHECK(cg::find_cgroup_path(v1, "cpu") == std::optional<std::string>("/docker/abc"));
  CHECK_FALSE(cg::find_cgroup_path(v1, "").has_value());
  CHECK_FALSE(cg::find_cgroup_path(v1, "cpuset").has_value());
}

TEST_CASE("cgroup limit discovery from a file tree", "[pool][cgroup]") {
  namespace cg = runnel::detail::cgroup;
  char tmpl[] = "/tmp/runnel_cgroup_XXXXXX";
  REQUIRE(::mkdtemp(tmpl) != nullptr);
  const std::string root = tmpl;
  auto write = [](const std::string& path, const std::string& text) {
    std::ofstream(path) << text;
  };
  auto mkdir = [](const std::string& path) { ::mkdir(path.c_str(), 0700); };

  // v2: the leaf has no limit, its parent allows 2.5 CPUs, the root none.
  mkdir(root + "/user.slice");
  mkdir(root + "/user.slice/app.scope");
  write(root + "/cpu.max", "max 100000\n");
  write(root + "/user.slice/cpu.max", "250000 100000\n");
  write(root + "/user.slice/app.scope/cpu.max", "max 100000\n");
  CHECK(cg::cpu_limit_at(root, "0::/user.slice/app.scope\n") == Approx(2.5));
  // A tighter leaf wins.
  write(root + "/user.slice/app.scope/cpu.max", "100000 100000\n");
  CHECK(cg::cpu_limit_at(root, "0::/user.slice/app.scope\n") == Approx(1.0));
  // Namespaced container: path "/" and the limit at the mount root.
  write(root + "/cpu.max", "300000 100000\n");
  CHECK(cg::cpu_limit_at(root, "0::/\n") == Approx(3.0));
  write(root + "/cpu.max", "max 100000\n");
  CHECK_FALSE(cg::cpu_limit_at(root, "0::/\n").has_value());

  // v1: cpu,cpuacct controller.
  mkdir(root + "/cpu,cpuacct");
  mkdir(root + "/cpu,cpuacct/docker");
  mkdir(root + "/cpu,cpuacct/docker/abc");
  write(root + "/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "150000\n");
  write(root + "/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n");
  CHECK(cg::cpu_limit_at(root, "4:cpu,cpuacct:/docker/abc\n") == Approx(1.5));
  write(root + "/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n");
  CHECK_FALSE(cg::cpu_limit_at(root, "4:cpu,cpuacct:/docker/abc\n").has_value());
  CHECK_FALSE(cg::cpu_limit_at(root + "/nonexistent", "0::/\n").has_value());

  std::system(("rm -rf '" + root + "'").c_str());

  // The live process: whatever the limit, the default pool respects it.
  const auto limit = cg::process_cpu_limit();
  const std::size_t expected = runnel::detail::default_worker_count(runnel::detail::affinity_cpus().size(), limit);
  thread_pool pool{{.pin = false}};
  CHECK(pool.size() == expected);
}

TEST_CASE("an idle pool uses almost no CPU", "[pool][idle]") {
  thread_pool pool{{.pin = false}};
  std::atomic<int> ran{0};
  for (int i = 0; i < 10000; ++i) pool.post([&ran] { ++ran; });
  pool.wait_idle();
  REQUIRE(ran.load() == 10000);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // let spinning end
  const double before = process_cpu_seconds();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const double used = process_cpu_seconds() - before;
  INFO("CPU seconds over 0.5 s idle: " << used);
  CHECK(used < 0.1);  // < 20% of one core; a spinning pool would use ~100% per worker
}

TEST_CASE("no lost wake-ups: tasks posted while workers fall asleep always run", "[pool]") {
  // Short spin budget so workers park between almost every post.
  thread_pool pool{{.threads = 2, .pin = false, .spin_rounds = 0}};
  const int rounds = static_cast<int>(scaled(20'000));
  for (int i = 0; i < rounds; ++i) {
    auto f = pool.submit([i] { return i; });
    REQUIRE(f.get() == i);  // would hang (ctest timeout) on a lost wake-up
    if (i % 1000 == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  pool.wait_idle();
}

namespace {

// Gives up (returns false) only after a very generous bound: a guard against
// hanging the test run when a mutant strands work, not a timing check.
template <class Pred>
bool eventually(Pred pred) {
  const auto limit = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!pred()) {
    if (std::chrono::steady_clock::now() > limit) return false;
    std::this_thread::yield();
  }
  return true;
}

}  // namespace

TEST_CASE("the last searcher hands the search over: a burst posted on a worker ramps up every worker",
          "[pool]") {
  // All workers asleep; an outside post wakes one, which runs a task that
  // posts `children` tasks to its own deque and then waits for all of them to
  // run at the same time. The post of the first child wakes one sleeper; the
  // later ones see it searching and wake nobody. Only the hand-off (the last
  // searcher leaving with work still queued wakes the next sleeper) brings up
  // the remaining workers; without it the other children stay in the busy
  // worker's deque.
  constexpr std::size_t children = 3;
  thread_pool pool{{.threads = children + 1, .pin = false, .spin_rounds = 1}};
  const int rounds = runnel_test::under_sanitizer ? 5 : 30;
  int stranded = 0;
  for (int round = 0; round < rounds; ++round) {
    pool.wait_idle();  // returns once every worker is parked
    std::atomic<std::size_t> running{0};
    std::atomic<bool> gave_up{false};
    std::atomic<bool> parent_done{false};
    pool.post([&] {
      for (std::size_t i = 0; i < children; ++i) {
        pool.post([&] {
          running.fetch_add(1);
          if (!eventually([&] { return running.load() >= children; })) gave_up = true;
        });
      }
      if (!eventually([&] { return running.load() >= children; })) gave_up = true;
      parent_done = true;
    });
    while (!parent_done.load()) std::this_thread::yield();
    pool.wait_idle();
    if (gave_up.load()) ++stranded;
  }
  CHECK(stranded == 0);
}

TEST_CASE("wait_idle_for / wait_idle_until: time-out, success, huge values saturate", "[pool]") {
  thread_pool pool{{.threads = 2, .pin = false}};
  gate g;
  std::atomic<bool> started{false};
  pool.post([&] {
    started = true;
    g.wait();
  });
  while (!started.load()) std::this_thread::yield();
  // The task cannot finish until we release it: these must time out.
  CHECK_FALSE(pool.wait_idle_for(std::chrono::milliseconds(1)));
  CHECK_FALSE(pool.wait_idle_for(std::chrono::nanoseconds(0)));
  CHECK_FALSE(pool.wait_idle_for(std::chrono::seconds(-5)));
  CHECK_FALSE(pool.wait_idle_until(std::chrono::steady_clock::now()));
  CHECK_FALSE(pool.wait_idle_until(std::chrono::system_clock::now() + std::chrono::milliseconds(1)));
  CHECK_FALSE(pool.wait_idle_until(std::chrono::time_point<std::chrono::steady_clock, std::chrono::hours>::min()));
  // Released a little later by another thread: the huge waits must wait
  // (an overflowing deadline lay in the past and returned false at once).
  std::thread releaser([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    g.release();
  });
  CHECK(pool.wait_idle_for(std::chrono::hours::max()));
  releaser.join();
  CHECK(pool.wait_idle_for(std::chrono::duration<double>(1e300)));
  CHECK(pool.wait_idle_until(std::chrono::steady_clock::time_point::max()));
  CHECK(pool.wait_idle_until(std::chrono::time_point<std::chrono::steady_clock, std::chrono::hours>::max()));
  CHECK(pool.wait_idle_until(std::chrono::system_clock::time_point::max()));
  CHECK(pool.wait_idle_for(std::chrono::seconds(0)));  // idle now: true without waiting
  // On a worker it would wait for itself.
  CHECK_THROWS_AS(pool.submit([&] { return pool.wait_idle_for(std::chrono::seconds(1)); }).get(), std::logic_error);
  CHECK_THROWS_AS(pool.submit([&] { return pool.wait_idle_until(std::chrono::steady_clock::now()); }).get(),
                  std::logic_error);
}

TEST_CASE("huge timeouts saturate in the deadline helpers", "[pool]") {
  using namespace std::chrono;
  const auto max = steady_clock::time_point::max();
  CHECK(runnel::detail::deadline_after(hours::max()) == max);
  CHECK(runnel::detail::deadline_after(duration<double>(1e300)) == max);
  CHECK(runnel::detail::to_steady_deadline(time_point<steady_clock, hours>::max()) == max);
  const auto before = steady_clock::now();
  // Far but representable: no overflow on the way (picoseconds::max() is
  // about 106 days; system_clock's max is about 236 years from now).
  const auto pico = runnel::detail::deadline_after(duration<long long, std::pico>::max());
  CHECK(pico > before + hours(24 * 100));
  CHECK(pico < max);
  const auto sys = runnel::detail::to_steady_deadline(system_clock::time_point::max());
  CHECK(sys > before + hours(24 * 365 * 200));
  const auto d = runnel::detail::deadline_after(seconds(10));
  CHECK(d >= before + seconds(10));
  CHECK(d < max);
  const auto past1 = runnel::detail::deadline_after(hours(-1));
  const auto past2 = runnel::detail::to_steady_deadline(time_point<steady_clock, hours>::min());
  const auto after = steady_clock::now();
  CHECK(past1 <= after);
  CHECK(past2 <= after);
}

TEST_CASE("pinning by default only when the pool spans every allowed CPU", "[pool][affinity]") {
  const std::vector<int> allowed = runnel::detail::affinity_cpus();
  REQUIRE_FALSE(allowed.empty());
  {
    thread_pool full{{.threads = allowed.size()}};
    CHECK(full.cpus().size() == allowed.size());
  }
  if (allowed.size() > 1) {
    thread_pool small{{.threads = allowed.size() - 1}};
    CHECK(small.cpus().empty());  // would sit on the first CPUs, as would any other small pool
  }
  thread_pool forced{{.threads = 1, .pin = true}};
  CHECK(forced.cpus() == std::vector<int>{allowed[0]});
  thread_pool off{{.threads = allowed.size(), .pin = false}};
  CHECK(off.cpus().empty());
}

TEST_CASE("blocking_would_stall_pool is true only on the sole worker of a pool", "[pool]") {
  CHECK_FALSE(runnel::detail::blocking_would_stall_pool());
  thread_pool one{{.threads = 1, .pin = false}};
  thread_pool two{{.threads = 2, .pin = false}};
  CHECK(one.submit([] { return runnel::detail::blocking_would_stall_pool(); }).get());
  CHECK_FALSE(two.submit([] { return runnel::detail::blocking_would_stall_pool(); }).get());
}

TEST_CASE("destroying a pool on its own worker aborts with a diagnostic", "[pool]") {
  // In a child process (the parent's threads are not copied by fork; the
  // child builds its own pool). The child's stderr comes back through a pipe.
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    std::signal(SIGABRT, SIG_DFL);  // not the test framework's handler
    ::dup2(fds[1], 2);
    ::close(fds[0]);
    auto* pool = new thread_pool{{.threads = 1, .pin = false}};
    pool->post([pool] { delete pool; });
    std::this_thread::sleep_for(std::chrono::seconds(30));
    std::_Exit(0);  // not reached: the delete aborts
  }
  ::close(fds[1]);
  std::string err;
  char buf[256];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;) err.append(buf, static_cast<std::size_t>(n));
  ::close(fds[0]);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  INFO("child stderr: " << err);
  CHECK(WIFSIGNALED(status));
  CHECK(err.find("destroyed by one of its own workers") != std::string::npos);
}

namespace {

// Posts one task from outside and waits until every worker has parked again.
void post_one_and_wait_idle(thread_pool& pool) {
  std::atomic<int> ran{0};
  pool.post([&ran] { ran.fetch_add(1); });
  pool.wait_idle();
  REQUIRE(ran.load() == 1);
}

// Posts two tasks from outside that wait for each other (so they run on two
// different workers at once), then waits until every worker has parked.
void post_pair_and_wait_idle(thread_pool& pool) {
  std::atomic<int> arrived{0};
  std::atomic<bool> gave_up{false};
  for (int i = 0; i < 2; ++i) {
    pool.post([&] {
      arrived.fetch_add(1);
      if (!eventually([&] { return arrived.load() >= 2; })) gave_up = true;
    });
  }
  pool.wait_idle();
  REQUIRE_FALSE(gave_up.load());
}

}  // namespace

TEST_CASE("a worker whose searches keep running out shrinks its search budget to the floor", "[pool][spin]") {
  // One worker, fed its next task only once it has parked (wait_idle()
  // returns then): it takes the task from the shared FIFO without searching,
  // runs it, and its one search afterwards finds nothing. Each such search
  // halves its budget, 64 -> 32 -> 16 -> 8 -> 4; from then on each spends
  // exactly the floor's rounds before parking. (Its very first search, as
  // the pool starts, may find the first task: hence the slack.)
  constexpr std::uint32_t floor = runnel::detail::min_spin_rounds;
  thread_pool pool{{.threads = 1, .pin = false, .spin_rounds = 64}};
  for (int i = 0; i < 8; ++i) post_one_and_wait_idle(pool);
  const runnel::pool_stats before = pool.stats();
  REQUIRE(before.spin_budgets == std::vector<std::uint32_t>{floor});
  constexpr int cycles = 10;
  for (int i = 0; i < cycles; ++i) post_one_and_wait_idle(pool);
  const runnel::pool_stats after = pool.stats();
  CHECK(after.spin_budgets == std::vector<std::uint32_t>{floor});
  CHECK(after.searches - before.searches == cycles);
  CHECK(after.searches_found == before.searches_found);
  CHECK(after.parks - before.parks == cycles);
  CHECK(after.search_rounds - before.search_rounds == cycles * floor);
}

TEST_CASE("a worker whose searches keep finding work grows its search budget back to the cap", "[pool][spin]") {
  // Two workers. First both budgets are driven to the floor: pairs of tasks
  // that wait for each other run on both workers, and each worker's search
  // afterwards runs out. Then a task on one worker posts `children` tasks to
  // its own deque and waits until all of them have run: only the other
  // worker can run them. The first child (whose post wakes that worker)
  // waits until every child is posted, so the rest are all queued when it
  // ends: the worker then takes each with a search that steals it (its own
  // deque and the shared FIFO are empty). Every such search finds work and
  // doubles that worker's budget: 4 -> 8 -> ... -> 64, the cap.
  constexpr std::uint32_t floor = runnel::detail::min_spin_rounds;
  constexpr std::uint32_t cap = 64;
  thread_pool pool{{.threads = 2, .pin = false, .spin_rounds = cap}};
  for (int i = 0; i < 10; ++i) post_pair_and_wait_idle(pool);
  const runnel::pool_stats before = pool.stats();
  REQUIRE(before.spin_budgets == std::vector<std::uint32_t>{floor, floor});

  constexpr int children = 16;
  std::atomic<int> ran{0};
  std::atomic<std::uint32_t> peak{0};  // largest budget any child saw
  std::atomic<bool> gave_up{false};
  std::atomic<bool> all_posted{false};
  pool.post([&] {
    for (int i = 0; i < children; ++i) {
      pool.post([&] {
        if (!eventually([&] { return all_posted.load(); })) gave_up = true;
        const runnel::pool_stats now = pool.stats();
        const std::uint32_t top = *std::max_element(now.spin_budgets.begin(), now.spin_budgets.end());
        std::uint32_t seen = peak.load();
        while (top > seen && !peak.compare_exchange_weak(seen, top)) {
        }
        ran.fetch_add(1);
      });
    }
    all_posted = true;
    if (!eventually([&] { return ran.load() >= children; })) gave_up = true;
  });
  pool.wait_idle();
  REQUIRE_FALSE(gave_up.load());
  REQUIRE(ran.load() == children);
  const runnel::pool_stats after = pool.stats();
  // Every child sits in the other worker's deque: even the first one, taken
  // right after the wake-up, is found by a search (a steal).
  CHECK(after.searches_found - before.searches_found == children);
  CHECK(peak.load() == cap);
}
