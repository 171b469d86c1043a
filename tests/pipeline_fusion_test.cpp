// Tests for fusion (pipeline/nodes.hpp): a stage lane that has just
// pushed a batch into the channel of a serial node runs that node's parked
// lane in its own task. What must not change: a lone message is passed on
// at once (no batch waits to fill), order through serial nodes is kept
// across batch and capacity boundaries, counts are exact, a full output
// still parks, and cancel and errors reach fused nodes.
#include <runnel/pipeline.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <thread>
#include <utility>

#include "pipeline_test_support.hpp"
#include "test_support.hpp"

using runnel::pipeline;
using runnel::thread_pool;

using runnel_test::check_invariant;
using runnel_test::pool_of;

namespace {

// A liveness bound, not a timing claim: far beyond any scheduling delay, so
// it only ends a run that would otherwise hang.
constexpr auto stuck = std::chrono::seconds(60);

}  // namespace

TEST_CASE("fusion: a lone message passes a parallel and a serial stage at once, without a batch to fill",
          "[pipeline][fusion]") {
  const std::uint64_t n = runnel_test::scaled(2000);
  for (std::size_t threads : {1, 2, 4}) {
    INFO("pool of " << threads);
    thread_pool pool(pool_of(threads));
    auto [in_tx, in_rx] = runnel::make_channel<std::uint64_t>(16);
    auto [out_tx, out_rx] = runnel::make_channel<std::uint64_t>(16);
    auto run = pipeline{pool}
                   .from(std::move(in_rx))
                   .stage([](std::uint64_t x) { return x * 3; }, {.workers = 2})
                   .stage([](std::uint64_t x) { return x + 1; })  // serial: run by the lanes above
                   .to(std::move(out_tx))
                   .run();
    // One message in flight at a time: each must come out while the input
    // stays open and nothing follows it.
    std::uint64_t arrived = 0;
    for (std::uint64_t i = 0; i < n; ++i) {
      REQUIRE(in_tx.send(i).ok());
      auto r = out_rx.recv_for(stuck);
      REQUIRE(r.ok());
      CHECK(*r == i * 3 + 1);
      ++arrived;
    }
    in_tx.reset();
    REQUIRE(run.wait_for(stuck));
    CHECK(arrived == n);
    const auto s = run.stats();
    check_invariant(s);
    CHECK(s.delivered == n);
    CHECK(s.stages[1].fused > 0);  // the serial stage was run by its upstream
  }
}

TEST_CASE("fusion: order through serial stages holds across batch and capacity boundaries",
          "[pipeline][fusion]") {
  const std::uint64_t n = runnel_test::scaled(60000);
  for (std::size_t threads : {1, 2, 4}) {
    INFO("pool of " << threads);
    thread_pool pool(pool_of(threads));
    std::uint64_t next = 0, order_errors = 0, count = 0;
    // Batches larger than the capacities after them, so that pushes are
    // partial and lanes park on full outputs while owning a fused lane.
    auto run = pipeline{pool}
                   .source([i = std::uint64_t{0}, end = n]() mutable -> std::optional<std::uint64_t> {
                     if (i == end) return std::nullopt;
                     return i++;
                   }, {.capacity = 8, .batch = 5})
                   .stage([](std::uint64_t x) { return x; }, {.capacity = 4, .batch = 16})
                   .stage([](std::uint64_t x) -> std::optional<std::uint64_t> {
                     if (x % 3 == 2) return std::nullopt;
                     return x;
                   }, {.capacity = 2, .batch = 7})
                   .sink([&](std::uint64_t x) {
                     while (next % 3 == 2) ++next;  // the filtered ones
                     if (x != next) ++order_errors;
                     next = x + 1;
                     ++count;
                   }, {.batch = 3})
                   .run();
    REQUIRE(run.wait_for(stuck));
    CHECK(order_errors == 0);
    CHECK(count == n - n / 3);
    const auto s = run.stats();
    check_invariant(s);
    CHECK(s.filtered == n / 3);
    CHECK(s.stages[2].fused + s.stages[3].fused > 0);
  }
}

TEST_CASE("fusion: errors and cancel reach fused stages and every message is counted",
          "[pipeline][fusion]") {
  const std::uint64_t n = runnel_test::scaled(40000);
  for (std::size_t threads : {1, 2, 4}) {
    INFO("pool of " << threads);
    thread_pool pool(pool_of(threads));
    {  // A fused sink that throws: the handler sees each failure with its node.
      std::uint64_t handled = 0, wrong_node = 0, delivered = 0;
      auto run = pipeline{pool}
                     .on_error([&](const runnel::stage_failure& f) {
                       ++handled;
                       if (f.stage != 2 || f.message<std::uint64_t>() == nullptr) ++wrong_node;
                     })
                     .source([i = std::uint64_t{0}, end = n]() mutable -> std::optional<std::uint64_t> {
                       if (i == end) return std::nullopt;
                       return i++;
                     })
                     .stage([](std::uint64_t x) { return x; }, {.workers = 2, .batch = 8})
                     .sink([&](const std::uint64_t& x) {
                       if (x % 7 == 0) throw std::runtime_error("seven");
                       ++delivered;
                     })
                     .run();
      REQUIRE(run.wait_for(stuck));
      const std::uint64_t sevens = (n + 6) / 7;
      CHECK(handled == sevens);
      CHECK(wrong_node == 0);
      CHECK(delivered == n - sevens);
      const auto s = run.stats();
      CHECK(s.failed == sevens);
      check_invariant(s);
    }
    {  // Cancel while fused stages run and the source never ends.
      std::atomic<std::uint64_t> seen{0};
      auto run = pipeline{pool}
                     .source([i = std::uint64_t{0}]() mutable -> std::optional<std::uint64_t> { return i++; },
                             {.capacity = 16})
                     .stage([](std::uint64_t x) { return x + 1; }, {.workers = 2, .capacity = 4, .batch = 16})
                     .stage([](std::uint64_t x) { return x; }, {.capacity = 4})
                     .sink([&](std::uint64_t) {
                       seen.fetch_add(1, std::memory_order_relaxed);  // Relaxed: a progress count.
                     })
                     .run();
      while (seen.load(std::memory_order_relaxed) < n)  // Relaxed: a progress count.
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      run.cancel();
      REQUIRE(run.wait_for(stuck));
      const auto s = run.stats();
      CHECK(s.cancelled);
      CHECK(seen >= n);
      check_invariant(s);
    }
  }
}

// ---- the source's adaptive fusion (fusion_schedule, pipeline/nodes.hpp) ----

namespace {

// Work a fixed number of steps (not a time): the same amount on any machine
// and under any sanitizer (plain arithmetic is not instrumented).
void busy(std::uint64_t x, int steps) {
  for (int i = 0; i < steps; ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    asm volatile("" : "+r"(x));  // opaque each step: no compiler can fold the loop
  }
}

// Whether a stage ran its message inline in the source's task: the
// generator publishes the thread it runs on, and the stage compares.
struct inline_probe {
  std::atomic<std::thread::id> gen_thread{};
  std::atomic<std::uint64_t> same{0}, other{0};
  void generated() {
    gen_thread.store(std::this_thread::get_id(), std::memory_order_relaxed);  // Relaxed: a label, no data.
  }
  void staged() {
    // Relaxed: counts and a label read after the run (wait() orders them).
    if (gen_thread.load(std::memory_order_relaxed) == std::this_thread::get_id())
      same.fetch_add(1, std::memory_order_relaxed);
    else
      other.fetch_add(1, std::memory_order_relaxed);
  }
};

// The sink of both end-to-end cases: counts x + 1 for x = 0, 1, ... in order.
struct in_order_sink {
  std::uint64_t next = 0, order_errors = 0, count = 0;
  auto fn() {
    return [this](std::uint64_t x) {
      if (x != next + 1) ++order_errors;
      next = x;
      ++count;
    };
  }
  // After the run: every message through, in order, and accounted for.
  template <class Run>
  runnel::pipeline_stats check(Run& run, std::uint64_t n) const {
    REQUIRE(run.wait_for(stuck));
    CHECK(order_errors == 0);
    CHECK(count == n);
    auto s = run.stats();
    check_invariant(s);
    CHECK(s.delivered == n);
    return s;
  }
};

}  // namespace

TEST_CASE("adaptive fusion: a stage cheaper than a hop runs in the source's task", "[pipeline][fusion]") {
  // The generator is the expensive part (the source is the ceiling): a
  // split cannot be 1/8 faster, so the source runs the stage itself.
  const std::uint64_t n = 6000;  // not scaled: the schedule needs a few ms to measure
  thread_pool pool(pool_of(2));
  inline_probe probe;
  in_order_sink out;
  auto run = pipeline{pool}
                 .source([&, i = std::uint64_t{0}]() mutable -> std::optional<std::uint64_t> {
                   if (i == n) return std::nullopt;
                   probe.generated();
                   busy(i, 4000);  // ~4 us of work a message
                   return i++;
                 })
                 .stage([&](std::uint64_t x) {
                   probe.staged();
                   return x + 1;
                 }, {.workers = 2, .ordered = true})
                 .sink(out.fn())
                 .run();
  const auto s = out.check(run, n);
  // Fused activations of the stage: one a batch of the source while fused
  // (none at all when the source never fuses).
  INFO("fused activations " << s.stages[1].fused << " of " << n / 64 << " batches; inline "
                            << probe.same.load() << ", elsewhere " << probe.other.load());
  // Under a sanitizer the pipeline's own atomics cost microseconds a message,
  // so handing them to the other worker can measure faster, as it should:
  // there only the fused probe is certain.
  // The source always probes the fused schedule after its first windows
  // split (the work alone outlasts them), so at least that probe ran fused;
  // how often it chose fused after it depends on what the machine gave
  // each schedule, which the rule's own test below pins down exactly.
  CHECK(s.stages[1].fused >= 1);
}

TEST_CASE("adaptive fusion: a stage dearer than a hop, counts and order on the split schedule", "[pipeline][fusion]") {
  // The stage is the expensive part: splitting halves the time a message,
  // so the source hands its batches to both workers.
  const std::uint64_t n = 1500;  // not scaled: the schedule needs a few ms to measure
  thread_pool pool(pool_of(2));
  inline_probe probe;
  // Calls that began while another call was running: the two lanes at work
  // at once.
  std::atomic<int> in_flight{0};
  std::atomic<std::uint64_t> overlapped{0};
  in_order_sink out;
  auto run = pipeline{pool}
                 .source([&, i = std::uint64_t{0}]() mutable -> std::optional<std::uint64_t> {
                   if (i == n) return std::nullopt;
                   probe.generated();
                   return i++;
                 }, {.batch = 8})
                 .stage([&](std::uint64_t x) {
                   probe.staged();
                   // Relaxed: counts read after the run (wait() orders them).
                   if (in_flight.fetch_add(1, std::memory_order_relaxed) != 0)
                     overlapped.fetch_add(1, std::memory_order_relaxed);
                   busy(x, 20000);  // ~20 us of work a message
                   in_flight.fetch_sub(1, std::memory_order_relaxed);
                   return x + 1;
                 }, {.workers = 2, .ordered = true, .batch = 8})
                 .sink(out.fn())
                 .run();
  out.check(run, n);
  // Whether the stage spread (the calls overlapping one on the other
  // worker: 1026-1477 of 1500 in 8 runs on a 2-core machine under load) is
  // a matter of what the machine gave each schedule, so it is reported, not
  // asserted; the rule that decides is tested exactly below.
  WARN("overlapping calls " << overlapped.load() << " of " << n << "; inline " << probe.same.load()
                             << ", elsewhere " << probe.other.load());
}

// The rule itself on a clock of the test's own: exact, whatever the machine.
// Windows of `window_ns`; `per_msg` ns a message under each schedule.
namespace {
struct schedule_driver {
  runnel::detail::fusion_schedule s;
  runnel::detail::fusion_schedule::clock::time_point t{std::chrono::seconds(1)};
  // Runs `windows` windows with the given cost a message of split and fused
  // (whichever the rule has chosen runs); returns how many ran fused.
  int run(int windows, std::int64_t split_ns, std::int64_t fused_ns) {
    int fused = 0;
    const std::size_t batch = 64;
    s.account(0, t);  // opens the first window (no-op afterwards)
    for (int w = 0; w < windows; ++w) {
      const bool f = s.fused();
      fused += f ? 1 : 0;
      const std::int64_t per = f ? fused_ns : split_ns;
      // One window: batches until it is at least window_ns long.
      std::int64_t spent = 0;
      while (spent < runnel::detail::fusion_schedule::window_ns) {
        t += std::chrono::nanoseconds(per * static_cast<std::int64_t>(batch));
        spent += per * static_cast<std::int64_t>(batch);
        s.account(batch, t);
      }
    }
    return fused;
  }
};
}  // namespace

TEST_CASE("adaptive fusion: the schedule rule on a test clock", "[pipeline][fusion]") {
  using fs = runnel::detail::fusion_schedule;
  SECTION("a tie, or split faster by less than 1/8, stays fused") {
    schedule_driver d;
    d.run(2 * fs::samples, 400, 400);  // split first, then the fused probe
    CHECK(d.s.fused());
    const int f = d.run(100, 370, 400);  // split 7.5% faster: not enough
    CHECK(f >= 100 - 2 * static_cast<int>(fs::samples) * 3);  // only probes of split
    CHECK(d.s.fused());
  }
  SECTION("split faster by 1/8 or more splits") {
    schedule_driver d;
    d.run(2 * fs::samples, 300, 400);  // split 25% faster
    CHECK_FALSE(d.s.fused());
    const int f = d.run(100, 300, 400);
    CHECK(f <= 2 * static_cast<int>(fs::samples) * 3);  // only probes of fused
    CHECK_FALSE(d.s.fused());
  }
  SECTION("a workload that grows heavier spreads again; lighter, fuses again") {
    schedule_driver d;
    d.run(200, 400, 400);  // cheap downstream: fused, probes grown rare
    CHECK(d.s.fused());
    // Now the downstream costs more than a hop: fused 800, split 450. The
    // next probe of split must switch within the longest interval.
    d.run(static_cast<int>(fs::max_interval + 2 * fs::samples), 450, 800);
    CHECK_FALSE(d.s.fused());
    d.run(static_cast<int>(fs::max_interval + 2 * fs::samples), 450, 420);
    CHECK(d.s.fused());
  }
  SECTION("probes grow rarer while they confirm the choice, up to max_interval") {
    schedule_driver d;
    d.run(2 * fs::samples, 400, 400);
    // Count probes of split (windows run split) over a long fused spell:
    // with doubling intervals far fewer than one every min_interval.
    const int windows = 4000;
    const int split_windows = windows - d.run(windows, 400, 400);
    CHECK(split_windows > 0);  // it does keep probing
    CHECK(split_windows < windows / static_cast<int>(fs::min_interval) / 2);
  }
}
