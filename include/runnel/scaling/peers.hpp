// What a runnel::scaling run measures, implementation by implementation:
// the shared plumbing (timed envelope, message budget, timer) and the peers
// runnel is compared against in the same run:
//   loop            one thread: generate, process, consume, in a loop (the
//                   floor for one core: no queue, no hand-off);
//   mutex+threads   a bounded mutex + condition-variable queue
//                   (locked_queue.hpp) into N worker std::threads, a second
//                   queue into one sink thread; the generator has its own
//                   thread (the obvious hand-written design). Its N + 2
//                   threads are confined to the N CPUs runnel's pool would
//                   pin its N workers to, so "N cores" means N CPUs for both;
//   tbb             oneTBB parallel_pipeline in a task_arena of N threads
//                   (when built with RUNNEL_SCALING_HAVE_TBB).
// Part of the runnel::scaling target.
#pragma once

#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

// Under ThreadSanitizer the oneTBB peer is left out: Debian's libtbb is not
// instrumented, so its hand-offs between filters look like data races.
#if defined(__SANITIZE_THREAD__)
#undef RUNNEL_SCALING_HAVE_TBB
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#undef RUNNEL_SCALING_HAVE_TBB
#endif
#endif

#ifdef RUNNEL_SCALING_HAVE_TBB
#include <tbb/global_control.h>
#include <tbb/parallel_pipeline.h>
#include <tbb/task_arena.h>
#endif

#include "../pool/cpu_set.hpp"
#include "locked_queue.hpp"
#include "options.hpp"
#include "report.hpp"

namespace runnel::scaling {

// The default consumer: keeps the result observable (so that the compiler
// cannot drop the stage's work) and does nothing else.
struct discard {
  template <class R>
  void operator()(R& r) const noexcept {
    asm volatile("" : : "r"(&r) : "memory");
  }
};

// What a user benchmarks: generate(seq) -> M, called serially; process(M&) ->
// R, called concurrently (so it is const); consume(R&), called serially.
// generate and consume are copied afresh for every run, so every run sees the
// same stream and starts with empty aggregates.
template <class Gen, class Stage, class Sink>
struct job {
  Gen generate;
  Stage process;
  Sink consume;
  using message = std::invoke_result_t<Gen&, std::uint64_t>;
  using result = std::invoke_result_t<const Stage&, message&>;
  static_assert(!std::is_void_v<result>, "runnel::scaling: the stage must return its result");
  static_assert(std::is_invocable_v<Sink&, result&>, "runnel::scaling: the consumer must take the stage's result");
};

namespace detail {

inline std::int64_t now_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// CPU time of every thread of the process.
inline double process_cpu_seconds() noexcept {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

// A message with its sequence number and the time it was generated.
template <class T>
struct item {
  std::uint64_t seq = 0;
  std::int64_t t0 = 0;
  T value;
};

// When the generator stops: after `messages`, or, with --seconds, once the
// time is up (the clock is read every 256 messages to keep it cheap).
class budget {
 public:
  explicit budget(const options& o) noexcept
      : messages_(o.messages), deadline_(now_ns() + static_cast<std::int64_t>(o.seconds * 1e9)) {}
  bool done(std::uint64_t next) noexcept {
    if (messages_ != 0) return next >= messages_;
    if (next % 256 == 0) expired_ = now_ns() >= deadline_;
    return expired_;
  }

 private:
  std::uint64_t messages_;
  std::int64_t deadline_;
  bool expired_ = false;
};

// Wall and process CPU time from construction to stop().
class stopwatch {
 public:
  stopwatch() noexcept : wall_(now_ns()), cpu_(process_cpu_seconds()) {}
  void stop(run_sample& s) const noexcept {
    s.seconds = static_cast<double>(now_ns() - wall_) * 1e-9;
    s.cpu_seconds = process_cpu_seconds() - cpu_;
  }

 private:
  std::int64_t wall_;
  double cpu_;
};

inline void check_count(const char* impl, std::uint64_t produced, std::uint64_t delivered) {
  if (produced != delivered)
    throw std::runtime_error(std::string("runnel::scaling: ") + impl + " delivered " + std::to_string(delivered) +
                             " of " + std::to_string(produced) + " messages");
}

}  // namespace detail

template <class J>
run_sample run_loop(const options& o, const J& j) {
  using M = typename J::message;
  using R = typename J::result;
  auto generate = j.generate;
  auto consume = j.consume;
  detail::budget b(o);
  run_sample s;
  std::uint64_t next = 0;
  const detail::stopwatch clock;
  for (; !b.done(next); ++next) {
    M m = generate(next);
    const std::int64_t t0 = detail::now_ns();
    R r = j.process(m);
    consume(r);
    s.latency.record(static_cast<std::uint64_t>(detail::now_ns() - t0));
  }
  clock.stop(s);
  s.messages = next;
  return s;
}

namespace detail {

// The CPUs a run on `cores` cores may use: the first `cores` CPUs of the
// process's affinity mask (all of them when oversubscribed), which are the
// CPUs a thread_pool of `cores` pinned workers pins its workers to.
inline std::vector<int> first_cpus(std::size_t cores) {
  std::vector<int> cpus = runnel::detail::affinity_cpus();
  cpus.resize(std::min(cpus.size(), std::max<std::size_t>(cores, 1)));
  return cpus;
}

// A std::thread that confines itself to `cpus` before running f.
template <class F>
std::thread confined_thread(const std::vector<int>& cpus, F f) {
  return std::thread([cpus, f = std::move(f)]() mutable {
    runnel::detail::confine_current_thread(cpus);
    f();
  });
}

}  // namespace detail

// cores + 2 threads (generator, `cores` workers, sink), all confined to the
// first `cores` allowed CPUs; the calling thread only waits for them.
template <class J>
run_sample run_mutex_threads(const options& o, std::size_t cores, const J& j) {
  using M = typename J::message;
  using R = typename J::result;
  auto generate = j.generate;
  auto consume = j.consume;
  const std::vector<int> cpus = detail::first_cpus(cores);
  locked_queue<detail::item<M>> in(o.capacity);
  locked_queue<detail::item<R>> out(o.capacity);
  detail::budget b(o);
  run_sample s;
  std::uint64_t produced = 0, delivered = 0;
  std::size_t running = cores;
  // The first exception from any thread; after it, the source stops and the
  // rest drain without calling user code, so that every thread can be joined.
  std::mutex error_m;
  std::exception_ptr error;
  // Relaxed: only a hint to stop early; `error` itself is read after the joins.
  std::atomic<bool> failed{false};
  auto fail = [&] {
    std::lock_guard lock(error_m);
    if (!error) error = std::current_exception();
    failed.store(true, std::memory_order_relaxed);
  };
  auto source = [&] {
    try {
      for (std::uint64_t seq = 0; !b.done(seq) && !failed.load(std::memory_order_relaxed); ++seq, ++produced) {
        M m = generate(seq);
        in.push(detail::item<M>{seq, detail::now_ns(), std::move(m)});
      }
    } catch (...) {
      fail();
    }
    in.close();
  };
  auto worker = [&] {
    std::vector<detail::item<M>> batch;
    while (in.pop_batch(batch, o.batch))
      for (auto& it : batch) {
        if (failed.load(std::memory_order_relaxed)) continue;
        try {
          out.push(detail::item<R>{it.seq, it.t0, j.process(it.value)});
        } catch (...) {
          fail();
        }
      }
    std::lock_guard lock(error_m);
    if (--running == 0) out.close();
  };
  // Ordered output waits for the next sequence number.
  auto sink = [&] {
    std::vector<detail::item<R>> batch;
    std::map<std::uint64_t, detail::item<R>> pending;
    std::uint64_t next_out = 0;
    auto deliver = [&](detail::item<R>& it) {
      if (failed.load(std::memory_order_relaxed)) return;
      try {
        consume(it.value);
      } catch (...) {
        fail();
        return;
      }
      s.latency.record(static_cast<std::uint64_t>(detail::now_ns() - it.t0));
      ++delivered;
    };
    while (out.pop_batch(batch, o.batch)) {
      for (auto& it : batch) {
        if (!o.ordered) {
          deliver(it);
          continue;
        }
        pending.emplace(it.seq, std::move(it));
        for (auto p = pending.begin(); p != pending.end() && p->first == next_out; p = pending.erase(p), ++next_out)
          deliver(p->second);
      }
    }
  };

  const detail::stopwatch clock;
  std::vector<std::thread> threads;
  threads.push_back(detail::confined_thread(cpus, source));
  for (std::size_t w = 0; w < cores; ++w) threads.push_back(detail::confined_thread(cpus, worker));
  threads.push_back(detail::confined_thread(cpus, sink));
  for (auto& t : threads) t.join();
  clock.stop(s);
  if (error) std::rethrow_exception(error);
  detail::check_count("mutex+threads", produced, delivered);
  s.messages = delivered;
  return s;
}

#ifdef RUNNEL_SCALING_HAVE_TBB
inline constexpr bool have_tbb = true;

// g++ 12 at -O3 reports the item inside the std::optional that oneTBB hands
// from filter to filter as maybe uninitialized (with a std::string message);
// every token the parallel filter sees was filled by the source filter.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
template <class J>
run_sample run_tbb(const options& o, std::size_t cores, const J& j) {
  using M = typename J::message;
  using R = typename J::result;
  using in_t = std::optional<detail::item<M>>;
  using out_t = std::optional<detail::item<R>>;
  auto generate = j.generate;
  auto consume = j.consume;
  detail::budget b(o);
  run_sample s;
  std::uint64_t next = 0, delivered = 0;
  // oneTBB caps its workers at the CPUs less one by default; an
  // oversubscribed run must get the threads it asks for, like the others.
  const tbb::global_control allow(tbb::global_control::max_allowed_parallelism, cores);
  tbb::task_arena arena(static_cast<int>(cores));
  const detail::stopwatch clock;
  arena.execute([&] {
    tbb::parallel_pipeline(
        o.capacity,
        tbb::make_filter<void, in_t>(tbb::filter_mode::serial_in_order,
                                     [&](tbb::flow_control& fc) -> in_t {
                                       if (b.done(next)) {
                                         fc.stop();
                                         return std::nullopt;
                                       }
                                       const std::uint64_t seq = next++;
                                       M m = generate(seq);
                                       return detail::item<M>{seq, detail::now_ns(), std::move(m)};
                                     }) &
            tbb::make_filter<in_t, out_t>(tbb::filter_mode::parallel,
                                          [&](in_t it) -> out_t {
                                            return detail::item<R>{it->seq, it->t0, j.process(it->value)};
                                          }) &
            tbb::make_filter<out_t, void>(
                o.ordered ? tbb::filter_mode::serial_in_order : tbb::filter_mode::serial_out_of_order,
                [&](out_t it) {
                  consume(it->value);
                  s.latency.record(static_cast<std::uint64_t>(detail::now_ns() - it->t0));
                  ++delivered;
                }));
  });
  clock.stop(s);
  detail::check_count("tbb", next, delivered);
  s.messages = delivered;
  return s;
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#else
inline constexpr bool have_tbb = false;
#endif

}  // namespace runnel::scaling
