// The pool against oneTBB (task_group in a task_arena of the same size) and a
// plain mutex + condition-variable pool, over thread counts 1 .. N and 2N
// (N = hardware threads):
//   fib/<threads>    fib(30), one task per call (no cutoff): spawn, local
//                    pop, steal and join overhead.
//   burst/<threads>  1e6 empty tasks posted from an outside thread, then
//                    waited for: the injection path.
//   idle/<threads>   CPU time an idle pool's workers burn over 0.2 s
//                    (counter idle_cpu_pct, percent of one core).
// Compare ratios between rows of the same run, not bare times.
#include <benchmark/benchmark.h>
#include <pthread.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <string>
#include <string_view>
#include <mutex>
#include <thread>
#include <vector>

#include "runnel/task_group.hpp"
#include "runnel/thread_pool.hpp"
#include "bench_support.hpp"

#ifdef RUNNEL_HAVE_TBB
#include <tbb/global_control.h>
#include <tbb/task_arena.h>
#include <tbb/task_group.h>
#endif

namespace {

// --smoke (CI) shrinks the work so the whole binary runs in seconds.
int fib_n() { return runnel_bench::smoke ? 18 : 30; }
std::size_t burst_tasks() { return runnel_bench::smoke ? 10'000 : 1'000'000; }

// ---------------------------------------------------------------------------
// Baseline: one mutex-protected std::deque of std::function, workers sleep on
// a condition variable. Fork-join waits help by running the newest queued
// task (LIFO, like a work-stealing owner) until their group is done; past a
// nesting depth they help only their own group's tasks, so helping cannot
// overflow the stack (a fib(30) run otherwise nests thousands of unrelated
// waits on one thread).
class mutex_pool {
 public:
  explicit mutex_pool(std::size_t threads) {
    for (std::size_t i = 0; i < threads; ++i) threads_.emplace_back([this] { worker(); });
  }
  ~mutex_pool() {
    {
      std::lock_guard lock(m_);
      stop_ = true;
    }
    work_cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

  // `group` tags the task for help_one(); nullptr for plain posts.
  void post(std::function<void()> f, const void* group = nullptr) {
    {
      std::lock_guard lock(m_);
      q_.push_back({group, std::move(f)});
      ++pending_;
    }
    work_cv_.notify_one();
  }

  void wait_idle() {
    std::unique_lock lock(m_);
    idle_cv_.wait(lock, [&] { return pending_ == 0; });
  }

  // Runs the newest queued task (of `only`'s group, when given) if any.
  bool help_one(const void* only = nullptr) {
    std::function<void()> f;
    {
      std::lock_guard lock(m_);
      const auto rit = std::find_if(q_.rbegin(), q_.rend(),
                                    [only](const auto& e) { return only == nullptr || e.first == only; });
      if (rit == q_.rend()) return false;
      f = std::move(rit->second);
      q_.erase(std::next(rit).base());
    }
    run(f);
    return true;
  }

 private:
  void run(std::function<void()>& f) {
    f();
    std::lock_guard lock(m_);
    if (--pending_ == 0) idle_cv_.notify_all();
  }

  void worker() {
    for (;;) {
      std::function<void()> f;
      {
        std::unique_lock lock(m_);
        work_cv_.wait(lock, [&] { return stop_ || !q_.empty(); });
        if (q_.empty()) return;
        f = std::move(q_.front().second);
        q_.pop_front();
      }
      run(f);
    }
  }

  std::mutex m_;
  std::condition_variable work_cv_, idle_cv_;
  std::deque<std::pair<const void*, std::function<void()>>> q_;
  std::size_t pending_ = 0;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

class mutex_group {
 public:
  explicit mutex_group(mutex_pool& p) : pool_(p) {}
  template <class F>
  void run(F f) {
    pending_.fetch_add(1);
    pool_.post(
        [this, f = std::move(f)] {
          f();
          pending_.fetch_sub(1);
        },
        this);
  }
  void wait() {
    thread_local int depth = 0;
    ++depth;
    while (pending_.load() != 0)
      if (!pool_.help_one(depth > 64 ? this : nullptr)) std::this_thread::yield();
    --depth;
  }

 private:
  mutex_pool& pool_;
  std::atomic<int> pending_{0};
};

// ---------------------------------------------------------------------------
// fib with one task per call, identical shape for every pool.

std::uint64_t fib_runnel(runnel::thread_pool& pool, int n) {
  if (n < 2) return static_cast<std::uint64_t>(n);
  std::uint64_t a = 0, b = 0;
  runnel::task_group g{pool};
  g.run([&] { a = fib_runnel(pool, n - 1); });
  g.run([&] { b = fib_runnel(pool, n - 2); });
  g.wait();
  return a + b;
}

std::uint64_t fib_mutex(mutex_pool& pool, int n) {
  if (n < 2) return static_cast<std::uint64_t>(n);
  std::uint64_t a = 0, b = 0;
  mutex_group g{pool};
  g.run([&] { a = fib_mutex(pool, n - 1); });
  g.run([&] { b = fib_mutex(pool, n - 2); });
  g.wait();
  return a + b;
}

#ifdef RUNNEL_HAVE_TBB
// TBB caps its workers at hardware threads - 1 by default; lift the cap so
// the oversubscribed arena really gets 2N threads, like the other pools.
const tbb::global_control tbb_threads(tbb::global_control::max_allowed_parallelism,
                                      2 * std::max(1u, std::thread::hardware_concurrency()) + 1);

std::uint64_t fib_tbb(int n) {
  if (n < 2) return static_cast<std::uint64_t>(n);
  std::uint64_t a = 0, b = 0;
  tbb::task_group g;
  g.run([&] { a = fib_tbb(n - 1); });
  g.run([&] { b = fib_tbb(n - 2); });
  g.wait();
  return a + b;
}
#endif

std::uint64_t fib_expected() {
  std::uint64_t a = 0, b = 1;
  for (int i = 0; i < fib_n(); ++i) {
    const std::uint64_t t = a + b;
    a = b;
    b = t;
  }
  return a;
}

void check(benchmark::State& state, bool ok) {
  if (!ok) state.SkipWithError("wrong result");
}

// ---------------------------------------------------------------------------

void fib_runnel_bm(benchmark::State& state) {
  runnel::thread_pool pool{{.threads = static_cast<std::size_t>(state.range(0))}};
  for (auto _ : state) {
    const std::uint64_t r = pool.submit([&] { return fib_runnel(pool, fib_n()); }).get();
    check(state, r == fib_expected());
  }
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(2 * fib_expected() - 1));
}

void fib_mutex_bm(benchmark::State& state) {
  mutex_pool pool(static_cast<std::size_t>(state.range(0)));
  for (auto _ : state) {
    std::uint64_t r = 0;
    mutex_group g{pool};
    g.run([&] { r = fib_mutex(pool, fib_n()); });
    g.wait();
    check(state, r == fib_expected());
  }
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(2 * fib_expected() - 1));
}

#ifdef RUNNEL_HAVE_TBB
void fib_tbb_bm(benchmark::State& state) {
  tbb::task_arena arena(static_cast<int>(state.range(0)));
  for (auto _ : state) {
    std::uint64_t r = 0;
    arena.execute([&] { r = fib_tbb(fib_n()); });
    check(state, r == fib_expected());
  }
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(2 * fib_expected() - 1));
}
#endif

void burst_runnel_bm(benchmark::State& state) {
  // range(1): pin the workers (the default). Unpinned rows show the effect of
  // pinning on a machine shared with other processes (the peers do not pin).
  runnel::thread_pool pool{{.threads = static_cast<std::size_t>(state.range(0)), .pin = state.range(1) != 0}};
  for (auto _ : state) {
    for (std::size_t i = 0; i < burst_tasks(); ++i) pool.post([] {});
    pool.wait_idle();
  }
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(burst_tasks()));
}

void burst_mutex_bm(benchmark::State& state) {
  mutex_pool pool(static_cast<std::size_t>(state.range(0)));
  for (auto _ : state) {
    for (std::size_t i = 0; i < burst_tasks(); ++i) pool.post([] {});
    pool.wait_idle();
  }
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(burst_tasks()));
}

#ifdef RUNNEL_HAVE_TBB
void burst_tbb_bm(benchmark::State& state) {
  tbb::task_arena arena(static_cast<int>(state.range(0)));
  for (auto _ : state) {
    tbb::task_group g;
    arena.execute([&] {
      for (std::size_t i = 0; i < burst_tasks(); ++i) g.run([] {});
    });
    arena.execute([&] { g.wait(); });
  }
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(burst_tasks()));
}
#endif

// CPU clocks of the calling pool's worker threads: one blocking task per
// worker (each waits until all have arrived, so no worker takes two).
template <class Pool>
std::vector<clockid_t> worker_clocks(Pool& pool, std::size_t workers) {
  std::mutex m;
  std::condition_variable cv;
  std::vector<clockid_t> clocks;
  for (std::size_t i = 0; i < workers; ++i) {
    pool.post([&] {
      clockid_t c{};
      ::pthread_getcpuclockid(::pthread_self(), &c);
      std::unique_lock lock(m);
      clocks.push_back(c);
      cv.notify_all();
      cv.wait(lock, [&] { return clocks.size() == workers; });
    });
  }
  pool.wait_idle();
  return clocks;
}

double cpu_seconds(const std::vector<clockid_t>& clocks) {
  double total = 0;
  for (clockid_t c : clocks) {
    timespec ts{};
    ::clock_gettime(c, &ts);
    total += static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
  }
  return total;
}

// CPU burnt by an idle pool's workers over 0.2 s, as a percentage of one
// core (thread CPU clocks, so threads of other pools in this process do not
// count).
template <class MakePool>
void measure_idle(benchmark::State& state, MakePool make) {
  double pct = 0;
  double total = 0;
  for (auto _ : state) {
    const auto n = static_cast<std::size_t>(state.range(0));
    auto pool = make(n);
    const std::vector<clockid_t> clocks = worker_clocks(*pool, n);
    for (int i = 0; i < 1000; ++i) pool->post([] {});
    pool->wait_idle();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // spinning ends
    const double before = cpu_seconds(clocks);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    total = cpu_seconds(clocks);
    pct = (total - before) / 0.2 * 100.0;
  }
  state.counters["idle_cpu_pct"] = pct;
  // The workers' CPU time over their whole life (start-up and the 1000
  // tasks): shows the clocks do measure these threads.
  state.counters["worker_cpu_ms"] = total * 1e3;
}

void idle_runnel_bm(benchmark::State& state) {
  measure_idle(state, [](std::size_t n) { return std::make_unique<runnel::thread_pool>(runnel::pool_options{.threads = n}); });
}

void idle_mutex_bm(benchmark::State& state) {
  measure_idle(state, [](std::size_t n) { return std::make_unique<mutex_pool>(n); });
}

// Thread counts 1 .. N and the oversubscribed 2N (N = hardware threads).
std::vector<int> thread_counts() {
  const int n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::vector<int> counts;
  for (int t = 1; t <= n; ++t) counts.push_back(t);
  counts.push_back(2 * n);
  return counts;
}

// Joins name parts (appending piecewise also avoids g++ 12's false
// -Wrestrict on chained std::string operator+).
std::string join(std::initializer_list<std::string_view> parts) {
  std::string out;
  for (std::string_view p : parts) out.append(p);
  return out;
}

// Names follow bench_support.hpp: "<group>:<impl>", so the closing table
// compares runnel with each peer at the same thread count.
void register_all() {
  for (int t : thread_counts()) {
    const std::string th = join({"/", std::to_string(t), "T:"});
    auto timed = [](benchmark::internal::Benchmark* b) {
      b->UseRealTime()->Unit(benchmark::kMillisecond);
      if (runnel_bench::smoke) b->Iterations(1);
    };
    timed(benchmark::RegisterBenchmark(join({"fib", th, "runnel"}).c_str(), fib_runnel_bm)->Arg(t));
#ifdef RUNNEL_HAVE_TBB
    timed(benchmark::RegisterBenchmark(join({"fib", th, "tbb"}).c_str(), fib_tbb_bm)->Arg(t));
#endif
    timed(benchmark::RegisterBenchmark(join({"fib", th, "mutex_pool"}).c_str(), fib_mutex_bm)->Arg(t));
    // Pinned is the default; the unpinned row shows what pinning costs on a
    // machine shared with other processes (the peers do not pin).
    timed(benchmark::RegisterBenchmark(join({"burst", th, "runnel"}).c_str(), burst_runnel_bm)->Args({t, 1}));
    timed(benchmark::RegisterBenchmark(join({"burst", th, "runnel_unpinned"}).c_str(), burst_runnel_bm)->Args({t, 0}));
#ifdef RUNNEL_HAVE_TBB
    timed(benchmark::RegisterBenchmark(join({"burst", th, "tbb"}).c_str(), burst_tbb_bm)->Arg(t));
#endif
    timed(benchmark::RegisterBenchmark(join({"burst", th, "mutex_pool"}).c_str(), burst_mutex_bm)->Arg(t));
    // No colon: idle rows report the idle_cpu_pct counter, not a speed.
    benchmark::RegisterBenchmark(join({"idle/", std::to_string(t), "T/runnel"}).c_str(), idle_runnel_bm)
        ->Arg(t)->Iterations(1)->UseRealTime();
    benchmark::RegisterBenchmark(join({"idle/", std::to_string(t), "T/mutex_pool"}).c_str(), idle_mutex_bm)
        ->Arg(t)->Iterations(1)->UseRealTime();
  }
}

}  // namespace

int main(int argc, char** argv) { return runnel_bench::run_main(argc, argv, register_all); }
