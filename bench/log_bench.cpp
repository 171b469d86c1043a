// A fine-grained job as a new user writes it: 2M synthetic log lines
// ("<timestamp> <level> <user-id> <message>", about 70 bytes each) are
// generated, parsed (the message hashed), filtered to ERROR lines and
// counted per user.
//
//   log/<t>T:<impl>
//       loop    the plain single-thread loop: generate, parse, filter, count
//               (the job every other row must be compared with);
//       runnel  runnel::pipeline with default options as a user writes them,
//               on a t-worker thread_pool:
//                 source(generate) -> stage(parse, {.workers = pool.size()})
//                 -> stage(keep ERROR) -> sink(count);
//       runnel_unpinned  the same on a pool with .pin = false (only where the
//               default pins: a pool as large as the CPU set);
//       tbb     tbb::parallel_pipeline, the same shape (serial_in_order
//               source, parallel parse, serial filter, serial sink) in a
//               task_arena of t threads, 1024 tokens (what runnel's default
//               channels hold);
//       mutex   bounded mutex + condition-variable queues: the benchmark
//               thread generates, t parser threads, one filter+count thread.
//       spsc_spin_string, spsc_spin_fixed   (2T only) one hop between the
//               cores written by hand: the generator on one thread,
//               parse/filter/count on the other, joined by a single-producer
//               single-consumer ring spinning at both ends (no parking, no
//               scheduling), carrying the std::string lines or fixed 96-byte
//               copies of them. What a two-thread split of this job gets
//               without any library; not a bound (a cleverer ring may do
//               better) and not a design (both cores burn while idle, and it
//               collapses when oversubscribed: run it on a quiet machine).
//       spsc_spin_inplace   (2T only) the cheapest split: the generator
//               formats each line in place into a fixed 96-byte slot of the
//               ring, the other thread parses it where it lies (no string,
//               no copy), indices published once a batch of 64 lines. A
//               bound for this machine: if it stays below the loop, no
//               split of this job pays here.
//   log/generate:source_only   the generator alone (the serial source is the
//               ceiling of any pipeline of this shape); a reference row.
//
// Each row also reports cpu_ns/line: the CPU time of the whole process per
// line (every thread, idle spinning included), a figure that moves much less
// than wall time when other jobs share the cores.
// Every implementation checks the per-user counts against the loop's (an
// exact count; a mismatch aborts the run with an error).
// Report ratios between rows of the same run, never bare times.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <time.h>
#include <type_traits>
#include <vector>

#include "runnel/pipeline.hpp"
#include "runnel/thread_pool.hpp"
#include "bench_support.hpp"
#include "runnel/scaling/locked_queue.hpp"

#ifdef RUNNEL_HAVE_TBB
#include <tbb/global_control.h>
#include <tbb/parallel_pipeline.h>
#include <tbb/task_arena.h>
#endif

namespace {

// The mutex baseline's queue, shared with pipeline_bench and the scaling peer.
template <class T>
using mutex_queue = runnel::scaling::locked_queue<T>;

constexpr std::size_t users = 1000;
constexpr std::size_t tokens = 1024;

std::uint64_t lines_per_run() { return runnel_bench::smoke ? 1u << 12 : 2'000'000; }

// ---- the generator: a deterministic stream of log lines ------------------

class line_generator {
 public:
  explicit line_generator(std::uint64_t n) : left_(n) {}

  std::optional<std::string> operator()() {
    if (left_ == 0) return std::nullopt;
    --left_;
    char buf[160];
    return std::string(buf, write(buf, sizeof buf));
  }

  // The next line written into out[0..cap) (truncated to fit); its length,
  // or 0 at the end of the stream.
  std::size_t next_into(char* out, std::size_t cap) {
    if (left_ == 0) return 0;
    --left_;
    return write(out, cap);
  }

 private:
  static constexpr std::array<std::string_view, 4> levels{"DEBUG", "INFO", "WARN", "ERROR"};
  static constexpr std::array<std::string_view, 8> words{"request", "served", "cache", "miss",
                                                         "timeout", "retry", "user", "session"};

  std::uint64_t next() {
    x_ = x_ * 6364136223846793005ull + 1442695040888963407ull;
    return x_ >> 16;
  }

  // "<date>T<time>.<us>Z <LEVEL> u<id> <words>", formatted as a logger
  // would (snprintf), about 70 bytes and on the order of 200 ns a line.
  std::size_t write(char* buf, std::size_t cap) {
    ts_ += 1 + next() % 997;  // microseconds since the start of the day
    const std::uint64_t sec = ts_ / 1'000'000;
    const std::uint64_t r = next();
    const std::string_view lv = levels[(r & 7) == 0 ? 3 : (r >> 3) % 3];  // 1 in 8 is ERROR
    std::uint64_t w = next();
    std::string_view msg[4];
    for (auto& m : msg) {
      m = words[w & 7];
      w >>= 3;
    }
    const int len = std::snprintf(buf, cap, "2026-11-25T%02u:%02u:%02u.%06uZ %.*s u%06u %.*s %.*s %.*s %.*s",
                                  static_cast<unsigned>(sec / 3600 % 24), static_cast<unsigned>(sec / 60 % 60),
                                  static_cast<unsigned>(sec % 60), static_cast<unsigned>(ts_ % 1'000'000),
                                  static_cast<int>(lv.size()), lv.data(), static_cast<unsigned>((r >> 8) % users),
                                  static_cast<int>(msg[0].size()), msg[0].data(), static_cast<int>(msg[1].size()),
                                  msg[1].data(), static_cast<int>(msg[2].size()), msg[2].data(),
                                  static_cast<int>(msg[3].size()), msg[3].data());
    return std::min(static_cast<std::size_t>(len), cap - 1);  // snprintf wrote at most cap - 1
  }

  std::uint64_t left_;
  std::uint64_t x_ = 42;
  std::uint64_t ts_ = 0;
};

// ---- the parser --------------------------------------------------------------

struct parsed {
  std::uint32_t user = 0;
  bool error = false;
  std::uint64_t hash = 0;  // of the message text
};

parsed parse(std::string_view s) {
  parsed out;
  const std::size_t a = s.find(' ');
  const std::size_t b = s.find(' ', a + 1);
  const std::size_t c = s.find(' ', b + 1);
  out.error = s.substr(a + 1, b - a - 1) == "ERROR";
  std::uint32_t u = 0;
  for (std::size_t i = b + 2; i < c; ++i) u = u * 10 + static_cast<std::uint32_t>(s[i] - '0');
  out.user = u;
  std::uint64_t h = 14695981039346656037ull;  // FNV-1a over the message
  for (std::size_t i = c + 1; i < s.size(); ++i) h = (h ^ static_cast<unsigned char>(s[i])) * 1099511628211ull;
  out.hash = h;
  return out;
}

struct tally {
  std::vector<std::uint64_t> per_user = std::vector<std::uint64_t>(users);
  std::uint64_t hashes = 0;
  void add(const parsed& p) {
    ++per_user[p.user];
    hashes += p.hash;
  }
};

// The loop's result, the reference every other implementation must match.
const tally& expected() {
  static const tally t = [] {
    tally r;
    line_generator gen(lines_per_run());
    while (auto line = gen()) {
      const parsed p = parse(*line);
      if (p.error) r.add(p);
    }
    return r;
  }();
  return t;
}

// CPU time of the whole process (every thread), in ns.
double process_cpu_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e9 + static_cast<double>(ts.tv_nsec);
}

// Counts the process's CPU time from construction: the cpu_ns/line counter
// says what a line costs in work (on every thread, idle spinning included),
// which moves far less than wall time when other jobs share the cores.
struct cpu_meter {
  double start = process_cpu_ns();
};

void finish(benchmark::State& state, const tally& got, const cpu_meter& cpu) {
  const double lines = static_cast<double>(state.iterations() * lines_per_run());
  state.counters["cpu_ns/line"] = (process_cpu_ns() - cpu.start) / lines;
  if (got.per_user != expected().per_user || got.hashes != expected().hashes)
    state.SkipWithError("per-user counts differ from the plain loop's");
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * lines_per_run()));
}

// ---- implementations -----------------------------------------------------------

void BM_log_loop(benchmark::State& state) {
  tally t;
  const cpu_meter cpu;
  for (auto _ : state) {
    t = tally{};
    line_generator gen(lines_per_run());
    while (auto line = gen()) {
      const parsed p = parse(*line);
      if (p.error) t.add(p);
    }
  }
  finish(state, t, cpu);
}

void BM_log_source_only(benchmark::State& state) {
  std::uint64_t bytes = 0;
  for (auto _ : state) {
    line_generator gen(lines_per_run());
    while (auto line = gen()) bytes += line->size();
  }
  benchmark::DoNotOptimize(bytes);
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * lines_per_run()));
}

// range(1) != 0: the pool's workers are not pinned (runnel_unpinned; a
// 2-worker pool on 2 CPUs is pinned by default).
void BM_log_runnel(benchmark::State& state) {
  runnel::pool_options po;
  po.threads = static_cast<std::size_t>(state.range(0));
  if (state.range(1) != 0) po.pin = false;
  runnel::thread_pool pool(po);
  tally t;
  const cpu_meter cpu;
  for (auto _ : state) {
    t = tally{};
    auto run = runnel::pipeline{pool}
                   .source(line_generator(lines_per_run()))
                   .stage([](std::string line) { return parse(line); }, {.workers = pool.size()})
                   .stage([](parsed p) -> std::optional<parsed> {
                     if (!p.error) return std::nullopt;
                     return p;
                   })
                   .sink([&](parsed p) { t.add(p); })
                   .run();
    run.wait();
  }
  finish(state, t, cpu);
}

#ifdef RUNNEL_HAVE_TBB
void BM_log_tbb(benchmark::State& state) {
  const auto threads = static_cast<int>(state.range(0));
  // TBB otherwise caps its workers at CPUs - 1.
  tbb::global_control gc(tbb::global_control::max_allowed_parallelism, static_cast<std::size_t>(threads));
  tbb::task_arena arena(threads);
  tally t;
  const cpu_meter cpu;
  for (auto _ : state) {
    t = tally{};
    line_generator gen(lines_per_run());
    arena.execute([&] {
      tbb::parallel_pipeline(
          tokens,
          tbb::make_filter<void, std::string>(tbb::filter_mode::serial_in_order,
                                              [&](tbb::flow_control& fc) -> std::string {
                                                auto line = gen();
                                                if (!line) {
                                                  fc.stop();
                                                  return {};
                                                }
                                                return std::move(*line);
                                              }) &
              tbb::make_filter<std::string, parsed>(tbb::filter_mode::parallel,
                                                    [](const std::string& line) { return parse(line); }) &
              tbb::make_filter<parsed, std::optional<parsed>>(
                  tbb::filter_mode::serial_in_order,
                  [](parsed p) -> std::optional<parsed> {
                    if (!p.error) return std::nullopt;
                    return p;
                  }) &
              tbb::make_filter<std::optional<parsed>, void>(tbb::filter_mode::serial_in_order,
                                                            [&](const std::optional<parsed>& p) {
                                                              if (p) t.add(*p);
                                                            }));
    });
  }
  finish(state, t, cpu);
}
#endif

// ---- one hop written by hand: a two-thread hand-off -------------------------
//
// The job split over two threads without a library: the generator on one
// thread, parse/filter/count on another, joined by a single-producer
// single-consumer ring whose both ends spin (no parking, no scheduler, no
// stealing, the ring index published once every `publish` lines). It is not
// a usable design (it burns both cores while idle and collapses when
// oversubscribed); it shows what moving the lines between two cores costs on
// this machine when nothing else is paid. `Slot` is std::string (the message the
// runnel rows move: its 70-byte buffer is allocated on one core and freed on
// the other) or a fixed 96-byte slot (the line copied in: no allocation
// crosses cores, only the slot's cache lines do).
struct fixed_line {
  std::uint32_t size = 0;
  char text[92];
};

template <class Slot>
class spin_ring {
 public:
  static constexpr std::size_t capacity = 4096;  // a power of two
  static constexpr std::size_t publish = 64;     // lines between index stores

  // Producer side. Returns once `line` is in the ring.
  void push(std::string&& line) {
    while (tail_ - head_seen_ >= capacity) head_seen_ = head_.load(std::memory_order_acquire);  // the slot is free
    Slot& slot = slots_[tail_ & (capacity - 1)];
    if constexpr (std::is_same_v<Slot, std::string>) {
      slot = std::move(line);
    } else {
      slot.size = static_cast<std::uint32_t>(std::min(line.size(), sizeof slot.text));
      std::memcpy(slot.text, line.data(), slot.size);
    }
    if (++tail_ % publish == 0) tail_pub_.store(tail_, std::memory_order_release);  // the slots before it are written
  }
  void close() {
    tail_pub_.store(tail_, std::memory_order_release);
    closed_.store(true, std::memory_order_release);  // after the last tail: a reader seeing it sees every line
  }

  // Producer side, the cheapest split of this job over two cores (fixed
  // slots only): the generator formats each line in place into its slot
  // (no allocation, no copy) until it has no more, then closes. If this
  // stays below the loop, no split of the job can pay on this machine.
  void fill(line_generator& gen)
    requires std::is_same_v<Slot, fixed_line>
  {
    for (;;) {
      while (tail_ - head_seen_ >= capacity) head_seen_ = head_.load(std::memory_order_acquire);  // the slot is free
      fixed_line& slot = slots_[tail_ & (capacity - 1)];
      slot.size = static_cast<std::uint32_t>(gen.next_into(slot.text, sizeof slot.text));
      if (slot.size == 0) break;
      if (++tail_ % publish == 0) tail_pub_.store(tail_, std::memory_order_release);  // the slots before it are written
    }
    close();
  }

  // Consumer side: calls f(std::string_view) for every line, in order, until closed and empty.
  template <class F>
  void drain(F&& f) {
    std::size_t head = 0;
    for (;;) {
      const std::size_t tail = tail_pub_.load(std::memory_order_acquire);  // pairs with push's release
      if (tail == head) {
        if (closed_.load(std::memory_order_acquire) && tail_pub_.load(std::memory_order_acquire) == head) return;
        continue;
      }
      for (; head != tail; ++head) {
        Slot& slot = slots_[head & (capacity - 1)];
        if constexpr (std::is_same_v<Slot, std::string>) {
          f(std::string_view(slot));
          std::string().swap(slot);  // the consumer frees the line, as a pipeline's last owner would
        } else {
          f(std::string_view(slot.text, slot.size));
        }
      }
      head_.store(head, std::memory_order_release);  // the slots before it may be reused
    }
  }

 private:
  alignas(64) std::atomic<std::size_t> head_{0};      // consumer's position, read by the producer when full
  alignas(64) std::atomic<std::size_t> tail_pub_{0};  // producer's published position
  std::atomic<bool> closed_{false};
  alignas(64) std::size_t tail_ = 0;  // producer-private
  std::size_t head_seen_ = 0;         // producer's cached head_
  alignas(64) std::array<Slot, capacity> slots_{};
};

// in_place: the generator writes into the ring's slots (fill), else each
// line is made as a std::string and pushed.
template <class Slot, bool in_place = false>
void BM_log_spin_ring(benchmark::State& state) {
  tally t;
  const cpu_meter cpu;
  for (auto _ : state) {
    t = tally{};
    auto ring = std::make_unique<spin_ring<Slot>>();
    std::thread consumer([&] {
      ring->drain([&](std::string_view line) {
        const parsed p = parse(line);
        if (p.error) t.add(p);
      });
    });
    line_generator gen(lines_per_run());
    if constexpr (in_place) {
      ring->fill(gen);
    } else {
      while (auto line = gen()) ring->push(std::move(*line));
      ring->close();
    }
    consumer.join();
  }
  finish(state, t, cpu);
}

void BM_log_mutex(benchmark::State& state) {
  const auto threads = static_cast<std::size_t>(state.range(0));
  tally t;
  const cpu_meter cpu;
  for (auto _ : state) {
    t = tally{};
    mutex_queue<std::string> lines(tokens);
    mutex_queue<parsed> results(tokens);
    std::vector<std::thread> parsers;
    for (std::size_t i = 0; i < threads; ++i) {
      parsers.emplace_back([&] {
        while (auto line = lines.pop()) results.push(parse(*line));
      });
    }
    std::thread sink([&] {
      while (auto p = results.pop())
        if (p->error) t.add(*p);
    });
    line_generator gen(lines_per_run());
    while (auto line = gen()) lines.push(std::move(*line));
    lines.close();
    for (auto& th : parsers) th.join();
    results.close();
    sink.join();
  }
  finish(state, t, cpu);
}

void register_all() {
  (void)expected();  // computed once, outside every timed region
  const auto n = static_cast<std::int64_t>(std::max(1u, std::thread::hardware_concurrency()));
  auto timed = [](benchmark::internal::Benchmark* b) {
    b->UseRealTime()->Unit(benchmark::kMillisecond);
    if (runnel_bench::smoke) b->Iterations(1);
  };
  timed(benchmark::RegisterBenchmark("log/generate:source_only", BM_log_source_only));
  for (std::int64_t t = 1; t <= n; ++t) {
    const std::string group = "log/" + std::to_string(t) + "T:";
    // The loop in every group, measured next to the rows it is compared with.
    timed(benchmark::RegisterBenchmark((group + "loop").c_str(), BM_log_loop));
    timed(benchmark::RegisterBenchmark((group + "runnel").c_str(), BM_log_runnel)->Args({t, 0}));
    if (t == n && n > 1)
      timed(benchmark::RegisterBenchmark((group + "runnel_unpinned").c_str(), BM_log_runnel)->Args({t, 1}));
#ifdef RUNNEL_HAVE_TBB
    timed(benchmark::RegisterBenchmark((group + "tbb").c_str(), BM_log_tbb)->Arg(t));
#endif
    timed(benchmark::RegisterBenchmark((group + "mutex").c_str(), BM_log_mutex)->Arg(t));
    if (t == 2) {
      timed(benchmark::RegisterBenchmark((group + "spsc_spin_string").c_str(), BM_log_spin_ring<std::string>));
      timed(benchmark::RegisterBenchmark((group + "spsc_spin_fixed").c_str(), BM_log_spin_ring<fixed_line>));
      timed(benchmark::RegisterBenchmark((group + "spsc_spin_inplace").c_str(), BM_log_spin_ring<fixed_line, true>));
    }
  }
}

}  // namespace

int main(int argc, char** argv) { return runnel_bench::run_main(argc, argv, register_all); }
