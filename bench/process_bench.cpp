// A stage in worker processes (runnel::process_pool) against the same stage
// on threads and against Python's multiprocessing.Pool.imap, same work.
//
//   process/W<w>us:<impl>   `items` messages, each `w` microseconds of work
//       (a spin on the steady clock, so that C++ and Python do the same
//       amount of work a message; W = 0 does none), 2 workers, rings of
//       `depth` (64) slots:
//         runnel_process_submit  process_pool (2 processes) fed by submit()
//                                from the benchmark thread, callbacks count
//         runnel_process_stage   pipeline source -> process_stage(pool) ->
//                                sink on a 2-thread pool (the node submits
//                                and passes replies on; no lane waits)
//         thread_stage           pipeline source -> stage(work) -> sink on a
//                                2-thread pool, 2 stage lanes
//         python_mp_imap         /usr/bin/python3: multiprocessing.Pool(2).imap(f,
//                                range(items)) (chunksize 1, the default),
//                                timed inside Python after the pool started
//   process/restart:<impl>   one worker process:
//         runnel_crash_then_call a message that crashes the worker (reported),
//                                then a call served by the restarted worker
//         call                   a plain call's round trip (the reference)
//       the ratio is round trips a crash-and-restart costs, inverted.
//
// The process pools are constructed in register_all, before Google
// Benchmark or any pool starts a thread (process_pool's rule).
#include <benchmark/benchmark.h>

#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include <unistd.h>

#include "runnel/pipeline.hpp"
#include "runnel/process_pool.hpp"
#include "runnel/thread_pool.hpp"
#include "bench_support.hpp"

namespace {

using u64 = std::uint64_t;

struct job {
  u64 x;
  u64 work_ns;  // spin this long; ~0 (poison): raise SIGSEGV
};
constexpr u64 poison = ~u64{0};
constexpr unsigned workers = 2;
// Slots of each worker's ring: 64 messages cross in a batch.
constexpr std::size_t depth = 64;

u64 work(const job& j) {
  if (j.work_ns == poison) ::raise(SIGSEGV);
  if (j.work_ns != 0) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::nanoseconds(j.work_ns);
    while (std::chrono::steady_clock::now() < end) {
    }
  }
  return j.x * j.x + 1;
}

using pool_t = runnel::process_pool<job, u64>;
std::unique_ptr<pool_t> g_procs;    // 2 workers
std::unique_ptr<pool_t> g_restart;  // 1 worker, max_attempts 1

runnel::thread_pool& thread_stage_pool() {
  static runnel::thread_pool p({.threads = workers, .pin = false});
  return p;
}

u64 items_for(u64 w_us, bool python) {
  if (runnel_bench::smoke) return 256;
  if (w_us == 0) return python ? 1u << 13 : 1u << 16;
  return python ? 1u << 12 : 1u << 13;
}

void process_submit(benchmark::State& state) {
  const u64 w = static_cast<u64>(state.range(0)), n = items_for(w, false);
  for (auto _ : state) {
    u64 sum = 0;
    for (u64 i = 0; i < n; ++i)
      g_procs->submit(job{i, w * 1000}, [&sum](runnel::process_result<u64>&& r) { sum += *r.value; });
    g_procs->drain();
    benchmark::DoNotOptimize(sum);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * n));
}

template <class Stage>
void run_pipeline(benchmark::State& state, runnel::thread_pool& tp, Stage stage, std::size_t lanes) {
  const u64 w = static_cast<u64>(state.range(0)), n = items_for(w, false);
  for (auto _ : state) {
    u64 next = 0, sum = 0;
    runnel::pipeline{tp}
        .source([&]() -> std::optional<job> {
          if (next == n) return std::nullopt;
          return job{next++, w * 1000};
        })
        .stage(stage, {.workers = lanes})
        .sink([&](u64 y) { sum += y; })
        .run()
        .wait();
    benchmark::DoNotOptimize(sum);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * n));
}

void process_stage(benchmark::State& state) {
  run_pipeline(state, thread_stage_pool(), runnel::process_stage(*g_procs), 1);
}
void thread_stage(benchmark::State& state) {
  run_pipeline(state, thread_stage_pool(), [](const job& j) { return work(j); }, workers);
}

constexpr const char* python_script = R"(
import sys, time
from multiprocessing import Pool
N = int(sys.argv[1]); W = int(sys.argv[2]); P = int(sys.argv[3])
def f(x):
    if W:
        end = time.perf_counter_ns() + W
        while time.perf_counter_ns() < end:
            pass
    return x * x + 1
if __name__ == '__main__':
    with Pool(P) as p:
        sum(p.imap(f, range(64)))
        t = time.perf_counter()
        s = sum(p.imap(f, range(N)))
        print(time.perf_counter() - t)
)";

// Debian's interpreter when present (a python3 earlier on PATH may be another build).
std::string python() { return ::access("/usr/bin/python3", X_OK) == 0 ? "/usr/bin/python3" : "python3"; }

void python_imap(benchmark::State& state) {
  const u64 w = static_cast<u64>(state.range(0)), n = items_for(w, true);
  const std::string cmd = python() + " -c \"$RUNNEL_PY\" " + std::to_string(n) + " " + std::to_string(w * 1000) + " " +
                          std::to_string(workers);
  for (auto _ : state) {
    FILE* p = ::popen(cmd.c_str(), "r");
    double secs = -1;
    if (p == nullptr || std::fscanf(p, "%lf", &secs) != 1) secs = -1;
    if (p != nullptr) ::pclose(p);
    if (secs <= 0) {
      state.SkipWithError("python3 multiprocessing run failed");
      return;
    }
    state.SetIterationTime(secs);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * n));
}

void crash_then_call(benchmark::State& state) {
  for (auto _ : state) {
    try {
      (void)g_restart->call(job{0, poison}).get();
      state.SkipWithError("the poison message did not crash");
      return;
    } catch (const runnel::process_crash&) {
    }
    benchmark::DoNotOptimize(g_restart->call(job{1, 0}).get());
  }
}

void plain_call(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(g_restart->call(job{1, 0}).get());
}

void register_all() {
  ::setenv("RUNNEL_PY", python_script, 1);  // here: no thread runs yet
  g_procs = std::make_unique<pool_t>(work, runnel::process_pool_options{.workers = workers, .depth = depth});
  g_restart = std::make_unique<pool_t>(work, runnel::process_pool_options{.workers = 1, .max_attempts = 1});
  const int reps = runnel_bench::smoke ? 1 : 5;
  for (long w : {0L, 20L}) {
    const std::string g = "process/W" + std::to_string(w) + "us:";
    benchmark::RegisterBenchmark((g + "runnel_process_submit").c_str(), process_submit)
        ->Arg(w)->Iterations(reps)->UseRealTime()->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark((g + "runnel_process_stage").c_str(), process_stage)
        ->Arg(w)->Iterations(reps)->UseRealTime()->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark((g + "thread_stage").c_str(), thread_stage)
        ->Arg(w)->Iterations(reps)->UseRealTime()->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark((g + "python_mp_imap").c_str(), python_imap)
        ->Arg(w)->Iterations(runnel_bench::smoke ? 1 : 3)->UseManualTime()->Unit(benchmark::kMillisecond);
  }
  benchmark::RegisterBenchmark("process/restart:runnel_crash_then_call", crash_then_call)
      ->Iterations(runnel_bench::smoke ? 2 : 200)->UseRealTime()->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("process/restart:call", plain_call)
      ->Iterations(runnel_bench::smoke ? 2 : 2000)->UseRealTime()->Unit(benchmark::kMicrosecond);
}

}  // namespace

int main(int argc, char** argv) {
  const int rc = runnel_bench::run_main(argc, argv, register_all);
  g_procs.reset();  // before the static thread pools go
  g_restart.reset();
  return rc;
}
