// What a runnel::scaling run measures, implementation by implementation:
// the shared plumbing (timed envelope, message budget, timer) and the peers
// runnel is compared against in the same run:
//   loop            one thread: generate, process, consume, in a loop (the
//                   floor for one core: no queue, no hand-off);
//   mutex+threads   a bounded mutex + condition-variable queue into N worker
//                   std::threads, a second queue into one sink thread (the
//                   generator has its own thread; the obvious hand-written
//                   design);
//   tbb             oneTBB parallel_pipeline in a task_arena of N threads
//                   (when built with RUNNEL_SCALING_HAVE_TBB).
// Part of the runnel::scaling target.
#pragma once

#include <time.h>

#include <chrono>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
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

// A bounded FIFO behind one mutex and two condition variables.
template <class T>
class locked_queue {
 public:
  explicit locked_queue(std::size_t capacity) : capacity_(capacity) {}

  void push(T v) {
    std::unique_lock lock(m_);
    not_full_.wait(lock, [&] { return q_.size() < capacity_; });
    q_.push_back(std::move(v));
    lock.unlock();
    not_empty_.notify_one();
  }

  // Moves up to n values into out (cleared first); false once closed and empty.
  bool pop_batch(std::vector<T>& out, std::size_t n) {
    out.clear();
    std::unique_lock lock(m_);
    not_empty_.wait(lock, [&] { return !q_.empty() || closed_; });
    if (q_.empty()) return false;
    while (!q_.empty() && out.size() < n) {
      out.push_back(std::move(q_.front()));
      q_.pop_front();
    }
    lock.unlock();
    not_full_.notify_all();
    return true;
  }

  void close() {
    {
      std::lock_guard lock(m_);
      closed_ = true;
    }
    not_empty_.notify_all();
  }

 private:
  std::mutex m_;
  std::condition_variable not_empty_, not_full_;
  std::deque<T> q_;
  std::size_t capacity_;
  bool closed_ = false;
};

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

template <class J>
run_sample run_mutex_threads(const options& o, std::size_t cores, const J& j) {
  using M = typename J::message;
  using R = typename J::result;
  auto generate = j.generate;
  auto consume = j.consume;
  detail::locked_queue<detail::item<M>> in(o.capacity);
  detail::locked_queue<detail::item<R>> out(o.capacity);
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

  const detail::stopwatch clock;
  std::thread source([&] {
    try {
      for (std::uint64_t seq = 0; !b.done(seq) && !failed.load(std::memory_order_relaxed); ++seq, ++produced) {
        M m = generate(seq);
        in.push(detail::item<M>{seq, detail::now_ns(), std::move(m)});
      }
    } catch (...) {
      fail();
    }
    in.close();
  });
  std::vector<std::thread> workers;
  for (std::size_t w = 0; w < cores; ++w)
    workers.emplace_back([&] {
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
    });
  // The sink runs here; ordered output waits for the next sequence number.
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
  source.join();
  for (auto& t : workers) t.join();
  clock.stop(s);
  if (error) std::rethrow_exception(error);
  detail::check_count("mutex+threads", produced, delivered);
  s.messages = delivered;
  return s;
}

#ifdef RUNNEL_SCALING_HAVE_TBB
inline constexpr bool have_tbb = true;

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
#else
inline constexpr bool have_tbb = false;
#endif

}  // namespace runnel::scaling
