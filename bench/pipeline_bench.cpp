// Pipelines and channels against oneTBB and a hand-written mutex baseline.
//
//   pipeline/W<w>/<t>T:<impl>
//       source (counter) -> parallel ordered stage doing W rounds of cheap
//       arithmetic -> sink (sum), `items` messages per iteration, t threads:
//         runnel  runnel::pipeline on a t-worker pool, stage workers = t,
//                 capacities = tokens;
//         tbb     tbb::parallel_pipeline (serial_in_order source, parallel
//                 middle, serial_in_order sink) in a task_arena of t threads,
//                 ntokens = the same capacity;
//         mutex   a bounded mutex + condition-variable queue into t worker
//                 std::threads, a second queue into a sink thread that
//                 reorders by sequence number (the source runs on the
//                 benchmark thread).
//   merge/<k>in/<t>T:<impl>
//       k outside threads each send items / k messages (blocking send) to a
//       sink (sum) on a t-worker pool:
//         runnel_merged  a channel each, pipeline{pool}.from_merged(rx...);
//                        the merge node is a hop of its own before the sink;
//         from           one channel shared by the k threads,
//                        pipeline{pool}.from(rx): the sink reads it directly.
//       The ratio is what fair turns over k channels (and the extra hop) cost
//       against plain fan-in through one channel.
//   cacheline/pingpong:atomic  the physical floor of a hop between two
//       cores: one cache line bounced between two threads (ns/transfer).
//   pingpong:<impl>   one message to another outside thread and back:
//       runnel channels (blocking send/recv) vs a mutex + condition-variable
//       slot pair.
//
// Report ratios between rows of the same run, never bare times: the machine
// is shared and noisy.
#include <benchmark/benchmark.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "runnel/channel.hpp"
#include "runnel/pipeline.hpp"
#include "runnel/scaling/locked_queue.hpp"
#include "runnel/thread_pool.hpp"
#include "bench_support.hpp"

#ifdef RUNNEL_HAVE_TBB
#include <tbb/parallel_pipeline.h>
#include <tbb/task_arena.h>
#endif

namespace {


constexpr std::size_t tokens = 1024;  // channel capacities / TBB ntokens

// W rounds of a 64-bit LCG step; DoNotOptimize keeps every round.
inline std::uint64_t work(std::uint64_t x, std::int64_t w) {
  for (std::int64_t i = 0; i < w; ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    benchmark::DoNotOptimize(x);
  }
  return x;
}

std::uint64_t items_for(std::int64_t w) {
  if (runnel_bench::smoke) return 1u << 10;  // CI: run every path once, quickly
  return w >= 1000 ? 1u << 14 : 1u << 17;
}

void finish(benchmark::State& state, std::uint64_t items, std::uint64_t checksum) {
  benchmark::DoNotOptimize(checksum);
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * items));
}

void BM_pipeline_runnel(benchmark::State& state) {
  const std::int64_t w = state.range(0);
  const auto threads = static_cast<std::size_t>(state.range(1));
  const std::uint64_t items = items_for(w);
  runnel::thread_pool pool({.threads = threads, .pin = false});
  std::uint64_t checksum = 0;
  for (auto _ : state) {
    std::uint64_t next = 0, sum = 0;
    auto run = runnel::pipeline{pool}
                   .source([&]() -> std::optional<std::uint64_t> {
                     if (next == items) return std::nullopt;
                     return next++;
                   }, {.capacity = tokens})
                   .stage([w](std::uint64_t x) { return work(x, w); },
                          {.workers = threads, .ordered = true, .capacity = tokens})
                   .sink([&](std::uint64_t y) { sum += y; })
                   .run();
    run.wait();
    checksum += sum;
  }
  finish(state, items, checksum);
}

#ifdef RUNNEL_HAVE_TBB
void BM_pipeline_tbb(benchmark::State& state) {
  const std::int64_t w = state.range(0);
  const auto threads = static_cast<int>(state.range(1));
  const std::uint64_t items = items_for(w);
  tbb::task_arena arena(threads);
  std::uint64_t checksum = 0;
  for (auto _ : state) {
    std::uint64_t next = 0, sum = 0;
    arena.execute([&] {
      tbb::parallel_pipeline(
          tokens,
          tbb::make_filter<void, std::uint64_t>(tbb::filter_mode::serial_in_order,
                                                [&](tbb::flow_control& fc) -> std::uint64_t {
                                                  if (next == items) {
                                                    fc.stop();
                                                    return 0;
                                                  }
                                                  return next++;
                                                }) &
              tbb::make_filter<std::uint64_t, std::uint64_t>(
                  tbb::filter_mode::parallel, [w](std::uint64_t x) { return work(x, w); }) &
              tbb::make_filter<std::uint64_t, void>(tbb::filter_mode::serial_in_order,
                                                    [&](std::uint64_t y) { sum += y; }));
    });
    checksum += sum;
  }
  finish(state, items, checksum);
}
#endif

// ---- mutex baseline -----------------------------------------------------------

// The queue is runnel::scaling::locked_queue, shared with the scaling
// benchmark's mutex+threads peer.
template <class T>
using mutex_queue = runnel::scaling::locked_queue<T>;

void BM_pipeline_mutex(benchmark::State& state) {
  const std::int64_t w = state.range(0);
  const auto threads = static_cast<std::size_t>(state.range(1));
  const std::uint64_t items = items_for(w);
  using msg = std::pair<std::uint64_t, std::uint64_t>;  // (sequence, value)
  std::uint64_t checksum = 0;
  for (auto _ : state) {
    mutex_queue<std::uint64_t> q1(tokens);
    mutex_queue<msg> q2(tokens);
    std::vector<std::thread> workers;
    for (std::size_t i = 0; i < threads; ++i) {
      workers.emplace_back([&] {
        while (auto x = q1.pop()) q2.push({*x, work(*x, w)});
      });
    }
    std::uint64_t sum = 0;
    std::thread sink([&] {  // reorders by sequence number, as the others do
      std::map<std::uint64_t, std::uint64_t> pending;
      std::uint64_t expect = 0;
      while (auto m = q2.pop()) {
        pending.emplace(m->first, m->second);
        for (auto it = pending.begin(); it != pending.end() && it->first == expect;
             it = pending.erase(it), ++expect)
          sum += it->second;
      }
    });
    for (std::uint64_t i = 0; i < items; ++i) q1.push(i);
    q1.close();
    for (auto& t : workers) t.join();
    q2.close();
    sink.join();
    checksum += sum;
  }
  finish(state, items, checksum);
}

// ---- merge ---------------------------------------------------------------------

void BM_merge(benchmark::State& state, bool merged) {
  const auto k = static_cast<std::size_t>(state.range(0));
  const auto threads = static_cast<std::size_t>(state.range(1));
  const std::uint64_t per = items_for(0) / k;
  runnel::thread_pool pool({.threads = threads, .pin = false});
  std::uint64_t checksum = 0;
  for (auto _ : state) {
    std::vector<runnel::sender<std::uint64_t>> tx;
    std::vector<runnel::receiver<std::uint64_t>> rx;
    for (std::size_t i = 0; i < (merged ? k : 1); ++i) {
      auto [t, r] = runnel::make_channel<std::uint64_t>(tokens);
      tx.push_back(std::move(t));
      rx.push_back(std::move(r));
    }
    std::uint64_t sum = 0;
    auto sink = [&sum](std::uint64_t v) { sum += v; };
    auto run = merged ? runnel::pipeline{pool}.from_merged(std::move(rx)).sink(sink).run()
                      : runnel::pipeline{pool}.from(std::move(rx[0])).sink(sink).run();
    std::vector<std::thread> producers;
    for (std::size_t p = 0; p < k; ++p) {
      producers.emplace_back([t = tx[merged ? p : 0], per]() mutable {
        for (std::uint64_t i = 0; i < per; ++i) (void)t.send(i);  // never closed before the last send
      });
    }
    tx.clear();
    for (auto& t : producers) t.join();
    run.wait();
    checksum += sum;
  }
  finish(state, per * k, checksum);
}

// ---- ping-pong ----------------------------------------------------------------

void BM_pingpong_runnel(benchmark::State& state) {
  auto [to_tx, to_rx] = runnel::make_channel<std::uint64_t>(1);
  auto [back_tx, back_rx] = runnel::make_channel<std::uint64_t>(1);
  std::thread echo([rx = std::move(to_rx), tx = std::move(back_tx)]() mutable {
    while (auto v = rx.recv())
      if (!tx.send(*v + 1)) break;
  });
  std::uint64_t v = 0;
  for (auto _ : state) {
    (void)to_tx.send(v);  // never closed while the loop runs
    v = *back_rx.recv();
  }
  to_tx.close();
  echo.join();
  benchmark::DoNotOptimize(v);
  state.SetItemsProcessed(state.iterations());
}

void BM_pingpong_mutex(benchmark::State& state) {
  mutex_queue<std::uint64_t> to(1), back(1);
  std::thread echo([&] {
    while (auto v = to.pop()) back.push(*v + 1);
  });
  std::uint64_t v = 0;
  for (auto _ : state) {
    to.push(v);
    v = *back.pop();
  }
  to.close();
  echo.join();
  benchmark::DoNotOptimize(v);
  state.SetItemsProcessed(state.iterations());
}

// The physical floor of a hop between two cores: one cache line bounced
// between two threads through a single atomic word. Each iteration is a
// round trip (two transfers); the `ns/transfer` counter is half of it.
void BM_cacheline_pingpong(benchmark::State& state) {
  struct alignas(runnel::detail::cache_line_size) line {
    std::atomic<std::uint64_t> v{0};
  };
  line l;
  std::atomic<bool> stop{false};
  std::thread echo([&] {
    std::uint64_t seen = 0;
    while (!stop.load(std::memory_order_relaxed)) {  // Relaxed: a flag polled in a spin.
      // Acquire/release: the word itself is the message; no other data.
      const std::uint64_t x = l.v.load(std::memory_order_acquire);
      if (x != seen && (x & 1) != 0) {
        seen = x + 1;
        l.v.store(seen, std::memory_order_release);
      }
    }
  });
  std::uint64_t v = 0;
  for (auto _ : state) {
    l.v.store(++v, std::memory_order_release);  // odd: the echo's turn
    while (l.v.load(std::memory_order_acquire) != v + 1) {
    }
    ++v;
  }
  stop.store(true, std::memory_order_relaxed);  // Relaxed: see above.
  echo.join();
  state.counters["ns/transfer"] = benchmark::Counter(
      static_cast<double>(state.iterations()) * 2, benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

// Names follow bench_support.hpp ("<group>:<impl>"): the closing table
// compares runnel with each peer for the same W and thread count.
void register_all() {
  const auto n = static_cast<std::int64_t>(std::max(1u, std::thread::hardware_concurrency()));
  auto timed = [](benchmark::internal::Benchmark* b) {
    b->UseRealTime()->Unit(benchmark::kMillisecond);
    if (runnel_bench::smoke) b->Iterations(1);
  };
  for (std::int64_t w : {0, 100, 1000}) {
    for (std::int64_t t = 1; t <= n; ++t) {
      std::string group = "pipeline/W";
      group += std::to_string(w);
      group += "/";
      group += std::to_string(t);
      group += "T:";
      timed(benchmark::RegisterBenchmark((group + "runnel").c_str(), BM_pipeline_runnel)->Args({w, t}));
#ifdef RUNNEL_HAVE_TBB
      timed(benchmark::RegisterBenchmark((group + "tbb").c_str(), BM_pipeline_tbb)->Args({w, t}));
#endif
      timed(benchmark::RegisterBenchmark((group + "mutex").c_str(), BM_pipeline_mutex)->Args({w, t}));
    }
  }
  for (std::int64_t k : {2, 4}) {
    for (std::int64_t t = 1; t <= n; ++t) {
      std::string group = "merge/" + std::to_string(k) + "in/" + std::to_string(t) + "T:";
      timed(benchmark::RegisterBenchmark((group + "runnel_merged").c_str(), BM_merge, true)->Args({k, t}));
      timed(benchmark::RegisterBenchmark((group + "from").c_str(), BM_merge, false)->Args({k, t}));
    }
  }
  auto pingpong = [](benchmark::internal::Benchmark* b) {
    b->UseRealTime();
    if (runnel_bench::smoke) b->Iterations(100);
  };
  pingpong(benchmark::RegisterBenchmark("pingpong:runnel", BM_pingpong_runnel));
  pingpong(benchmark::RegisterBenchmark("pingpong:mutex", BM_pingpong_mutex));
  pingpong(benchmark::RegisterBenchmark("cacheline/pingpong:atomic", BM_cacheline_pingpong));
}

}  // namespace

int main(int argc, char** argv) { return runnel_bench::run_main(argc, argv, register_all); }
