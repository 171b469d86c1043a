// Tests for runnel::pipeline and the produce/consume primitives: exact counts
// for several shapes (fan-out, fan-in, 1..8 workers per stage, ordered and
// unordered, filters), more stages than workers on a 1-worker pool, errors
// with and without a handler, cancel under load, .from/.to with outside
// threads, and the accounting invariant
//   produced == delivered + filtered + failed + discarded.
#include <runnel/pipeline.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "pipeline_test_support.hpp"
#include "test_support.hpp"

using runnel::pipeline;
using runnel::stage_options;
using runnel::thread_pool;

using runnel_test::check_invariant;
using runnel_test::pool_of;

namespace {

// A counting source of n values 0..n-1.
auto counter(std::uint64_t n) {
  return [i = std::uint64_t{0}, n]() mutable -> std::optional<std::uint64_t> {
    if (i == n) return std::nullopt;
    return i++;
  };
}

}  // namespace

TEST_CASE("pipeline: source -> stage -> sink, 1..8 workers, ordered and unordered",
          "[pipeline]") {
  const std::uint64_t n = runnel_test::scaled(100000);
  thread_pool pool(pool_of(2));
  for (std::size_t workers : {1, 2, 3, 8}) {
    for (bool ordered : {false, true}) {
      INFO("workers " << workers << " ordered " << ordered);
      std::uint64_t sum = 0, count = 0, next = 0;
      bool in_order = true;
      auto run = pipeline{pool}
                     .source(counter(n), {.capacity = 64})
                     .stage([](std::uint64_t x) { return 2 * x + 1; },
                            {.workers = workers, .ordered = ordered, .capacity = 32, .batch = 16})
                     .sink([&](std::uint64_t y) {  // serial: one lane
                       in_order &= y == 2 * next + 1;
                       ++next;
                       sum += y;
                       ++count;
                     })
                     .run();
      run.wait();
      CHECK(count == n);
      CHECK(sum == n * n);  // sum of the first n odd numbers
      if (ordered || workers == 1) CHECK(in_order);
      auto s = run.stats();
      CHECK(s.produced == n);
      CHECK(s.delivered == n);
      check_invariant(s);
    }
  }
}

TEST_CASE("pipeline: filters, several parallel stages, fan-out sink", "[pipeline]") {
  const std::uint64_t n = runnel_test::scaled(60000);
  thread_pool pool(pool_of(2));
  std::atomic<std::uint64_t> sum{0}, count{0};
  auto run = pipeline{pool}
                 .source(counter(n))
                 .stage([](std::uint64_t x) -> std::optional<std::uint64_t> {
                   if (x % 3 == 0) return std::nullopt;
                   return x;
                 }, {.workers = 4, .ordered = true, .capacity = 16, .batch = 8})
                 .stage([](const std::uint64_t& x) { return std::to_string(x); },
                        {.workers = 3, .capacity = 128})
                 .stage([](std::string s) -> std::optional<std::uint64_t> {
                   const auto v = std::stoull(s);
                   if (v % 5 == 0) return std::nullopt;
                   return v;
                 }, {.workers = 2, .ordered = true, .batch = 3})
                 .sink([&](std::uint64_t v) {
                   sum += v;
                   ++count;
                 }, {.workers = 4})
                 .run();
  run.wait();
  std::uint64_t want_sum = 0, want_count = 0;
  for (std::uint64_t x = 0; x < n; ++x) {
    if (x % 3 != 0 && x % 5 != 0) {
      want_sum += x;
      ++want_count;
    }
  }
  CHECK(count == want_count);
  CHECK(sum == want_sum);
  auto s = run.stats();
  CHECK(s.filtered == n - want_count);
  CHECK(s.discarded == 0);
  CHECK(s.stages.size() == 5);
  check_invariant(s);
}

TEST_CASE("pipeline: more stages than workers on a 1-worker pool finishes", "[pipeline]") {
  const std::uint64_t n = runnel_test::scaled(20000);
  thread_pool pool(pool_of(1));
  auto add = [](std::uint64_t x) { return x + 1; };
  std::uint64_t sum = 0;
  auto run = pipeline{pool}
                 .source(counter(n), {.capacity = 2, .batch = 1})
                 .stage(add, {.capacity = 2})
                 .stage(add, {.workers = 3, .ordered = true, .capacity = 1, .batch = 1})
                 .stage(add, {.workers = 2, .capacity = 2})
                 .stage(add, {.capacity = 2, .batch = 2})
                 .stage(add, {.workers = 4, .ordered = true, .capacity = 2})
                 .stage(add, {.capacity = 1})
                 .stage(add, {.workers = 2, .ordered = true, .capacity = 2, .batch = 5})
                 .stage(add, {.capacity = 2})
                 .stage(add, {.capacity = 2})
                 .stage(add, {.capacity = 2})
                 .stage(add, {.capacity = 2})
                 .stage(add, {.capacity = 2})
                 .sink([&](std::uint64_t v) { sum += v; })
                 .run();
  run.wait();
  CHECK(sum == n * (n - 1) / 2 + 12 * n);
  check_invariant(run.stats());
}

TEST_CASE("pipeline: ordered delivery survives a 1-worker pool and tiny windows", "[pipeline]") {
  const std::uint64_t n = runnel_test::scaled(20000);
  thread_pool pool(pool_of(1));
  std::uint64_t next = 0;
  bool in_order = true;
  auto run = pipeline{pool}
                 .source(counter(n), {.capacity = 1})
                 .stage([](std::uint64_t x) { return x; }, {.workers = 5, .ordered = true, .capacity = 1, .batch = 1})
                 .stage([](std::uint64_t x) { return x; }, {.workers = 3, .ordered = true, .capacity = 3, .batch = 2})
                 .sink([&](std::uint64_t v) { in_order &= v == next++; })
                 .run();
  run.wait();
  CHECK(next == n);
  CHECK(in_order);
  check_invariant(run.stats());
}

TEST_CASE("pipeline: errors reach the handler with their message and the run goes on",
          "[pipeline]") {
  const std::uint64_t n = runnel_test::scaled(20000);
  thread_pool pool(pool_of(2));
  std::uint64_t handled = 0, wrong = 0, delivered = 0;  // the handler is serialised
  std::string seen_name;
  auto run = pipeline{pool}
                 .on_error([&](const runnel::stage_failure& f) {
                   ++handled;
                   const std::uint64_t* m = f.message<std::uint64_t>();
                   if (m == nullptr || *m % 7 != 0 || f.stage != 1) ++wrong;
                   if (f.message<int>() != nullptr) ++wrong;  // wrong type: nullptr
                   try {
                     std::rethrow_exception(f.error);
                   } catch (const std::runtime_error& e) {
                     if (std::string(e.what()) != "seven") ++wrong;
                   }
                   seen_name = f.stage_name;
                 })
                 .source(counter(n))
                 .stage([](const std::uint64_t& x) {
                   if (x % 7 == 0) throw std::runtime_error("seven");
                   return x;
                 }, {.workers = 3, .ordered = true, .name = "picky"})
                 .sink([&](std::uint64_t) { ++delivered; })
                 .run();
  run.wait();
  const std::uint64_t sevens = (n + 6) / 7;
  CHECK(handled == sevens);
  CHECK(wrong == 0);
  CHECK(seen_name == "picky");
  CHECK(delivered == n - sevens);
  auto s = run.stats();
  CHECK(s.failed == sevens);
  CHECK(s.stages[1].name == "picky");
  CHECK(s.discarded == 0);
  check_invariant(s);
}

TEST_CASE("pipeline: without a handler the first exception cancels and wait() rethrows",
          "[pipeline]") {
  thread_pool pool(pool_of(2));
  for (bool in_sink : {false, true}) {
    auto flow = pipeline{pool}.source(counter(1'000'000'000)).stage(
        [in_sink](std::uint64_t x) {
          if (!in_sink && x == 1000) throw std::domain_error("boom");
          return x;
        }, {.workers = 2});
    auto run = std::move(flow)
                   .sink([in_sink](std::uint64_t x) {
                     if (in_sink && x >= 500) throw std::domain_error("sink boom");
                   })
                   .run();
    CHECK_THROWS_AS(run.wait(), std::domain_error);
    auto s = run.stats();
    CHECK(s.cancelled);
    CHECK(s.failed >= 1);
    check_invariant(s);
  }
}

TEST_CASE("pipeline: generator exceptions", "[pipeline]") {
  thread_pool pool(pool_of(2));
  SECTION("with a handler: reported without a message, generator called again") {
    int calls = 0, reported = 0, no_msg = 0;
    std::uint64_t got = 0;
    auto run = pipeline{pool}
                   .on_error([&](const runnel::stage_failure& f) {
                     ++reported;
                     if (f.message<int>() == nullptr && f.stage == 0) ++no_msg;
                   })
                   .source([&]() -> std::optional<int> {
                     ++calls;
                     if (calls > 100) return std::nullopt;
                     if (calls % 10 == 0) throw std::runtime_error("gen");
                     return calls;
                   })
                   .sink([&](int) { ++got; })
                   .run();
    run.wait();
    CHECK(reported == 10);
    CHECK(no_msg == 10);
    CHECK(got == 90);
    check_invariant(run.stats());
  }
  SECTION("without a handler") {
    auto run = pipeline{pool}
                   .source([n = 0]() mutable -> std::optional<int> {
                     if (++n == 50) throw std::runtime_error("gen");
                     return n;
                   })
                   .sink([](int) {})
                   .run();
    CHECK_THROWS_AS(run.wait(), std::runtime_error);
    check_invariant(run.stats());
  }
}

TEST_CASE("pipeline: cancel under load stops and counts everything", "[pipeline]") {
  thread_pool pool(pool_of(2));
  for (int round = 0; round < 6; ++round) {
    std::atomic<std::uint64_t> delivered{0};
    auto run = pipeline{pool}
                   .source(counter(UINT64_MAX), {.capacity = 256})
                   .stage([](std::uint64_t x) { return x ^ 1; },
                          {.workers = 3, .ordered = (round & 1) != 0, .capacity = 64})
                   .stage([](std::uint64_t x) -> std::optional<std::uint64_t> {
                     if (x % 10 == 0) return std::nullopt;
                     return x;
                   }, {.workers = 2, .capacity = 64})
                   .sink([&](std::uint64_t) { ++delivered; }, {.workers = 2})
                   .run();
    while (delivered.load() < 1000 * static_cast<std::uint64_t>(round + 1)) std::this_thread::yield();
    auto mid = run.stats();  // readable while running
    CHECK_FALSE(mid.finished);
    for (const auto& st : mid.stages) CHECK(st.queue_depth <= 256);
    run.cancel();
    run.wait();  // no exception: cancel is not an error
    auto s = run.stats();
    CHECK(s.cancelled);
    CHECK(s.delivered == delivered.load());
    check_invariant(s);
  }
}

TEST_CASE("pipeline: destroying an unfinished handle cancels it", "[pipeline]") {
  thread_pool pool(pool_of(2));
  std::atomic<std::uint64_t> delivered{0};
  {
    auto run = pipeline{pool}.source(counter(UINT64_MAX)).sink([&](std::uint64_t) { ++delivered; }).run();
    while (delivered.load() < 100) std::this_thread::yield();
  }
  pool.wait_idle();
  const auto after = delivered.load();
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  CHECK(delivered.load() == after);
}

TEST_CASE("pipeline: .from and .to connect threads outside the pool", "[pipeline]") {
  const std::uint64_t per = runnel_test::scaled(20000);
  constexpr std::uint64_t producers = 3;
  thread_pool pool(pool_of(2));
  for (bool ordered : {false, true}) {
    auto [in_tx, in_rx] = runnel::make_channel<std::uint64_t>(16);
    auto [out_tx, out_rx] = runnel::make_channel<std::uint64_t>(8);
    auto run = pipeline{pool}
                   .from(std::move(in_rx))
                   .stage([](std::uint64_t x) { return x * 10; },
                          {.workers = ordered ? 4u : 1u, .ordered = ordered, .capacity = 8})
                   .to(std::move(out_tx))
                   .run();
    std::vector<std::thread> ts;
    std::atomic<int> send_failures{0};
    for (std::uint64_t p = 0; p < producers; ++p) {
      ts.emplace_back([tx = in_tx, p, count = per, &send_failures]() mutable {
        for (std::uint64_t i = 0; i < count; ++i)
          if (!tx.send((p << 32) | i).ok()) ++send_failures;
      });
    }
    in_tx.reset();  // the producers' copies close the channel when they finish
    std::vector<std::int64_t> last(producers, -1);
    std::uint64_t got = 0, order_errors = 0;
    for (std::uint64_t v : out_rx) {  // ends when the pipeline drops its sender
      v /= 10;
      const auto p = v >> 32;
      const auto i = static_cast<std::int64_t>(v & 0xffffffffu);
      if (i <= last[p]) ++order_errors;  // per-producer order kept (ordered or 1 worker)
      last[p] = i;
      ++got;
    }
    for (auto& t : ts) t.join();
    run.wait();
    CHECK(send_failures == 0);
    CHECK(got == producers * per);
    CHECK(order_errors == 0);
    check_invariant(run.stats());
  }
}

TEST_CASE("pipeline: produce/consume primitives, fan-in and fan-out", "[pipeline]") {
  const std::uint64_t per = runnel_test::scaled(30000);
  thread_pool pool(pool_of(2));
  auto [tx, rx] = runnel::make_channel<std::uint64_t>(32);
  std::vector<runnel::pipeline_handle> producers;
  for (std::uint64_t p = 0; p < 3; ++p)  // fan-in: three producer tasks, one channel
    producers.push_back(runnel::produce(pool, tx, counter(per)));
  tx.reset();
  std::atomic<std::uint64_t> sum{0}, count{0};
  std::atomic<int> concurrent{0}, max_concurrent{0};
  auto consumer = runnel::consume(pool, std::move(rx), [&](std::uint64_t v) {  // fan-out
    const int c = ++concurrent;
    int m = max_concurrent.load();
    while (c > m && !max_concurrent.compare_exchange_weak(m, c)) {}
    sum += v;
    ++count;
    --concurrent;
  }, 4);
  for (auto& p : producers) p.wait();
  consumer.wait();
  CHECK(count == 3 * per);
  CHECK(sum == 3 * (per * (per - 1) / 2));
  CHECK(max_concurrent <= 4);
  check_invariant(consumer.stats());
}

TEST_CASE("pipeline: several pipelines share one pool", "[pipeline]") {
  const std::uint64_t n = runnel_test::scaled(20000);
  thread_pool pool(pool_of(2));
  constexpr int k = 5;
  std::vector<std::atomic<std::uint64_t>> sums(k);
  std::vector<runnel::pipeline_handle> runs;
  for (int i = 0; i < k; ++i) {
    runs.push_back(pipeline{pool}
                       .source(counter(n), {.capacity = 8})
                       .stage([](std::uint64_t x) { return x + 1; }, {.workers = 2, .ordered = i % 2 == 0})
                       .sink([&sums, i](std::uint64_t v) { sums[i] += v; })
                       .run());
  }
  for (auto& r : runs) r.wait();
  for (int i = 0; i < k; ++i) CHECK(sums[i] == n * (n + 1) / 2);
}

TEST_CASE("pipeline: the source is not called while its output is full", "[pipeline]") {
  const std::uint64_t n = runnel_test::scaled(5000);
  thread_pool pool(pool_of(2));
  std::atomic<std::uint64_t> generated{0}, consumed{0};
  std::atomic<int> violations{0};
  // In flight at any moment: the channel (4), the source's held value (1),
  // the sink's batch (1).
  constexpr std::uint64_t bound = 4 + 1 + 1;
  auto run = pipeline{pool}
                 .source([&]() -> std::optional<std::uint64_t> {
                   if (generated.load() == n) return std::nullopt;
                   if (generated.load() - consumed.load() >= bound) ++violations;
                   return generated++;
                 }, {.capacity = 4})
                 .sink([&](std::uint64_t) {
                   for (int i = 0; i < 5; ++i) std::this_thread::yield();  // slow consumer
                   ++consumed;
                 }, {.batch = 1})
                 .run();
  run.wait();
  CHECK(consumed == n);
  CHECK(violations == 0);
}

TEST_CASE("pipeline: move-only messages", "[pipeline]") {
  thread_pool pool(pool_of(2));
  std::uint64_t sum = 0;
  auto run = pipeline{pool}
                 .source([i = 0]() mutable -> std::optional<std::unique_ptr<int>> {
                   if (i == 1000) return std::nullopt;
                   return std::make_unique<int>(i++);
                 })
                 .stage([](std::unique_ptr<int> p) { *p *= 2; return p; }, {.workers = 3, .ordered = true})
                 .sink([&](std::unique_ptr<int> p) { sum += static_cast<std::uint64_t>(*p); })
                 .run();
  run.wait();
  CHECK(sum == 999 * 1000);
}

TEST_CASE("pipeline: bad arguments and misuse are reported", "[pipeline]") {
  thread_pool pool(pool_of(1));
  auto gen = counter(10);
  CHECK_THROWS_AS(pipeline{pool}.source(gen, {.workers = 2}), std::invalid_argument);
  CHECK_THROWS_AS(pipeline{pool}.source(gen, {.capacity = 0}), std::invalid_argument);
  CHECK_THROWS_AS(pipeline{pool}.source(gen).stage([](std::uint64_t x) { return x; }, {.workers = 0}),
                  std::invalid_argument);
  CHECK_THROWS_AS(pipeline{pool}.source(gen).sink([](std::uint64_t) {}, {.batch = 0}),
                  std::invalid_argument);
  runnel::receiver<int> empty;
  CHECK_THROWS_AS(pipeline{pool}.from(empty), std::invalid_argument);
  runnel::pipeline_handle none;
  CHECK_THROWS_AS(none.wait(), std::logic_error);

  auto run = pipeline{pool}.source(counter(10)).sink([](std::uint64_t) {}).run();
  auto f = pool.submit([&run] {
    try {
      run.wait();
    } catch (const std::logic_error&) {
      return true;
    }
    return false;
  });
  CHECK(f.get());
  run.wait();
  check_invariant(run.stats());
}

TEST_CASE("pipeline: cancel reaches nodes parked on the user's channels", "[pipeline]") {
  thread_pool pool(pool_of(2));
  SECTION("parked on an idle .from() channel") {
    auto [tx, rx] = runnel::make_channel<int>(4);
    auto run = pipeline{pool}.from(std::move(rx)).sink([](int) {}, {.workers = 3}).run();
    REQUIRE(tx.send(1).ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // let the lanes park
    run.cancel();
    run.wait();
    auto s = run.stats();
    CHECK(s.produced == 1);
    check_invariant(s);
    // The pipeline dropped its receiver, the last one: the channel is closed.
    CHECK(tx.is_closed());
  }
  SECTION("parked on a full .to() channel nobody reads") {
    auto [tx, rx] = runnel::make_channel<std::uint64_t>(4);
    auto run = pipeline{pool}
                   .source(counter(UINT64_MAX), {.capacity = 8})
                   .stage([](std::uint64_t x) { return x; }, {.workers = 2, .ordered = true})
                   .to(std::move(tx))
                   .run();
    while (rx.size_approx() < rx.capacity()) std::this_thread::yield();
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    run.cancel();
    run.wait();
    auto s = run.stats();
    CHECK(s.delivered == rx.capacity());
    CHECK(s.discarded > 0);
    check_invariant(s);
    std::uint64_t got = 0;
    for (std::uint64_t v : rx) CHECK(v == got++);  // closed: the pipeline held the last sender
    CHECK(got == rx.capacity());
  }
  SECTION("the receivers of the .to() channel go away") {
    auto [tx, rx] = runnel::make_channel<std::uint64_t>(4);
    auto run = pipeline{pool}.source(counter(UINT64_MAX)).stage([](std::uint64_t x) { return x; }).to(std::move(tx)).run();
    for (int i = 0; i < 10; ++i) CHECK(rx.recv().has_value());
    rx.reset();  // closes the channel: the run cancels itself
    run.wait();
    auto s = run.stats();
    CHECK(s.cancelled);
    check_invariant(s);
  }
}

// Runs `rounds` pipelines from in_rx through an identity stage to out_tx and
// drops each run's handle on a pool worker (which only cancels it), calling
// before_drop(round) in between; returns how many drops ran.
template <class Msg, class BeforeDrop>
int drop_runs_on_worker(thread_pool& pool, runnel::receiver<Msg>& in_rx, runnel::sender<Msg>& out_tx, int rounds,
                        BeforeDrop before_drop) {
  std::atomic<int> dropped{0};
  for (int r = 0; r < rounds; ++r) {
    auto run = pipeline{pool}.from(in_rx).stage([](Msg m) { return m; }).to(out_tx).run();
    before_drop(r);
    pool.post([h = std::move(run), &dropped]() mutable {
      h = runnel::pipeline_handle{};  // drops the run on a worker: cancels only
      dropped.fetch_add(1);
    });
    while (dropped.load() != r + 1) std::this_thread::yield();
  }
  return dropped.load();
}

TEST_CASE("pipeline: a handle dropped on a worker while outside threads send into .from() and read .to()",
          "[pipeline]") {
  // A lane parked on a user's channel is unlinked by the outside thread's
  // send/receive, which calls its wake-up after unlocking; dropping the
  // handle on a worker only cancels, so the run state must stay alive for
  // that wake-up (it was freed: use-after-free, or bad_weak_ptr in noexcept).
  thread_pool pool(pool_of(2));
  const int rounds = runnel_test::under_sanitizer ? 5000 : 20000;
  auto [in_tx, in_rx] = runnel::make_channel<int>(2);
  auto [out_tx, out_rx] = runnel::make_channel<int>(1);
  std::atomic<bool> done{false};
  // Outside threads keep the lanes parking and being woken on both channels.
  std::thread sender([&done, tx = in_tx]() mutable {
    for (int i = 0; !done.load(std::memory_order_relaxed); ++i) (void)tx.try_send(i);
  });
  std::thread reader([&done, rx = out_rx]() mutable {
    while (!done.load(std::memory_order_relaxed)) (void)rx.try_recv();
  });
  const int dropped = drop_runs_on_worker(pool, in_rx, out_tx, rounds, [](int) {});
  done = true;
  sender.join();
  reader.join();
  pool.wait_idle();  // the cancelled runs finish in pool tasks
  CHECK(dropped == rounds);
}

TEST_CASE("pipeline: wait_for / wait_until time out, finish, rethrow, and saturate huge values", "[pipeline]") {
  thread_pool pool(pool_of(2));
  auto [tx, rx] = runnel::make_channel<int>(4);
  std::atomic<int> seen{0};
  auto run = pipeline{pool}.from(std::move(rx)).sink([&](int) { ++seen; }).run();
  REQUIRE(tx.send(1).ok());
  // The run cannot end before the channel closes: these must time out.
  CHECK_FALSE(run.wait_for(std::chrono::milliseconds(1)));
  CHECK_FALSE(run.wait_for(std::chrono::seconds(-1)));
  CHECK_FALSE(run.wait_until(std::chrono::steady_clock::now()));
  CHECK_FALSE(run.wait_until(std::chrono::system_clock::now() + std::chrono::milliseconds(1)));
  CHECK_FALSE(run.done());
  // On a worker of the pipeline's pool the timed forms throw as wait() does.
  CHECK_THROWS_AS(pool.submit([&] { return run.wait_for(std::chrono::seconds(1)); }).get(), std::logic_error);
  std::thread closer([&tx = tx] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    tx.reset();  // last sender: the channel closes, the run ends naturally
  });
  // A huge timeout must wait (an overflowing deadline returned false at once).
  CHECK(run.wait_for(std::chrono::hours::max()));
  closer.join();
  CHECK(run.wait_until(std::chrono::steady_clock::time_point::max()));
  CHECK(run.wait_for(std::chrono::seconds(0)));
  CHECK(seen.load() == 1);
  check_invariant(run.stats());

  auto failing = pipeline{pool}
                     .source(counter(10))
                     .sink([](std::uint64_t x) {
                       if (x == 3) throw std::runtime_error("three");
                     })
                     .run();
  CHECK_THROWS_WITH(failing.wait_for(std::chrono::hours::max()), "three");
  CHECK_THROWS_WITH(failing.wait_until(std::chrono::system_clock::time_point::max()), "three");

  runnel::pipeline_handle empty;
  CHECK_THROWS_AS(empty.wait_for(std::chrono::seconds(1)), std::logic_error);
}

namespace {

// How the live messages of a run were destroyed, by the fate the pipeline
// reported at the time.
struct fate_ledger {
  std::atomic<std::uint64_t> normal{0}, discarded{0}, failed{0};
};

// A message that records current_message_fate() when its live value is
// destroyed (a moved-from husk records nothing).
struct fated {
  std::uint64_t id = 0;
  fate_ledger* led = nullptr;
  fated(std::uint64_t i, fate_ledger* l) : id(i), led(l) {}
  fated(fated&& o) noexcept : id(o.id), led(std::exchange(o.led, nullptr)) {}
  fated& operator=(fated&& o) noexcept {
    record();
    id = o.id;
    led = std::exchange(o.led, nullptr);
    return *this;
  }
  fated(const fated&) = delete;
  fated& operator=(const fated&) = delete;
  ~fated() { record(); }
  void record() noexcept {
    if (led == nullptr) return;
    switch (runnel::current_message_fate()) {
      case runnel::message_fate::normal: led->normal.fetch_add(1); break;
      case runnel::message_fate::discarded: led->discarded.fetch_add(1); break;
      case runnel::message_fate::failed: led->failed.fetch_add(1); break;
    }
    led = nullptr;
  }
};

auto fated_source(fate_ledger& led, std::uint64_t n) {
  return [&led, n, i = std::uint64_t{0}]() mutable -> std::optional<fated> {
    if (i == n) return std::nullopt;
    return std::optional<fated>(std::in_place, i++, &led);
  };
}

}  // namespace

TEST_CASE("pipeline: message_fate reports failed for a failing message, discarded for what cancel drops",
          "[pipeline]") {
  thread_pool pool(pool_of(2));
  CHECK(runnel::current_message_fate() == runnel::message_fate::normal);
  SECTION("a stage taking the message by reference throws") {
    for (bool ordered : {false, true}) {
      fate_ledger led;
      const std::uint64_t n = 2000;
      std::atomic<std::uint64_t> handled{0}, sunk{0};
      auto run = pipeline{pool}
                     .source(fated_source(led, n), {.capacity = 64})
                     .stage([](fated& m) -> fated {
                       if (m.id % 10 == 3) throw std::runtime_error("odd one");
                       return std::move(m);
                     }, {.workers = 2, .ordered = ordered, .capacity = 64})
                     .sink([&](fated&) { sunk.fetch_add(1); })
                     .on_error([&](const runnel::stage_failure&) { handled.fetch_add(1); })
                     .run();
      run.wait();
      const auto s = run.stats();
      check_invariant(s);
      CHECK(handled.load() == n / 10);
      CHECK(s.failed == n / 10);
      CHECK(led.failed.load() == n / 10);  // each failed message, once
      CHECK(led.normal.load() == n - n / 10);
      CHECK(sunk.load() == n - n / 10);
      CHECK(led.discarded.load() == 0);
    }
  }
  SECTION("cancel mid-run") {
    std::uint64_t discarded_total = 0;
    for (int round = 0; round < 4; ++round) {
      fate_ledger led;
      std::atomic<std::uint64_t> sunk{0};
      auto run = pipeline{pool}
                     .source(fated_source(led, UINT64_MAX), {.capacity = 64})
                     .stage([](fated& m) -> fated { return std::move(m); },
                            {.workers = 2, .ordered = (round & 1) != 0, .capacity = 64})
                     .sink([&](fated) { sunk.fetch_add(1); }, {.workers = 2})
                     .run();
      while (sunk.load() < 500) std::this_thread::yield();
      run.cancel();
      run.wait();
      const auto s = run.stats();
      check_invariant(s);
      // Every produced message destroyed once: normally if delivered, as
      // discarded if cancel dropped it.
      CHECK(led.normal.load() == s.delivered);
      CHECK(led.discarded.load() == s.discarded);
      CHECK(led.failed.load() == 0);
      CHECK(led.normal.load() + led.discarded.load() == s.produced);
      discarded_total += s.discarded;
    }
    CHECK(discarded_total > 0);  // cancel did drop something to report
  }
  CHECK(runnel::current_message_fate() == runnel::message_fate::normal);
}

TEST_CASE("pipeline: a handle dropped on a worker accounts for every message it took from .from()",
          "[pipeline]") {
  // The accounting invariant on the drop-on-worker path: every value an
  // outside sender got into .from() is either read from .to(), destroyed as
  // discarded by the cancelled run, or still in one of the two channels at
  // the end. Nothing vanishes and nothing is counted twice.
  thread_pool pool(pool_of(2));
  const int rounds = runnel_test::under_sanitizer ? 300 : 2000;
  fate_ledger led;
  auto [in_tx, in_rx] = runnel::make_channel<fated>(4);
  auto [out_tx, out_rx] = runnel::make_channel<fated>(2);
  std::atomic<bool> done{false};
  std::uint64_t sent = 0, read = 0;
  std::thread sender([&done, &sent, &led, tx = in_tx]() mutable {
    for (std::uint64_t i = 0; !done.load(std::memory_order_relaxed); ++i) {
      if (tx.try_send(fated(i, &led)).ok()) ++sent;
    }
  });
  std::thread reader([&done, &read, rx = out_rx]() mutable {
    while (!done.load(std::memory_order_relaxed)) {
      if (rx.try_recv().ok()) ++read;
    }
  });
  // Let some messages through before the drop, on most rounds.
  (void)drop_runs_on_worker(pool, in_rx, out_tx, rounds, [](int r) {
    if (r % 4 != 0) std::this_thread::yield();
  });
  done = true;
  sender.join();
  reader.join();
  pool.wait_idle();  // the cancelled runs finish in pool tasks
  std::uint64_t left = 0;
  while (in_rx.try_recv().ok()) ++left;
  while (out_rx.try_recv().ok()) ++left;
  INFO("sent " << sent << " read " << read << " discarded " << led.discarded.load() << " left " << left);
  CHECK(sent > 0);
  CHECK(read > 0);  // the runs did move messages, not only start and stop
  CHECK(led.failed.load() == 0);
  CHECK(sent == read + led.discarded.load() + left);
}
