// Tests for runnel::pipeline::from_merged: a pipeline fed by several
// channels. Exact counts and per-input order (outside producers, producer
// tasks on the same pool, oversubscribed), fair turns checked message by
// message against a model, no starvation by an always-ready input, one
// input closing while the others go on, cancel (busy and parked on idle
// inputs), errors with and without a handler, a one-worker pool, a
// lost-wake-up hunt with tiny channels, one message at a time while the
// merge parks, a wake handed on to another receiver of an input, and a
// node that must not finish while a wake-up from an input is in flight. A
// stalled run is reported by a generous wait_for, never by timing a
// healthy one.
#include <runnel/pipeline.hpp>
#include <runnel/select.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "pipeline_test_support.hpp"
#include "test_support.hpp"

using namespace std::chrono_literals;
using runnel::pipeline;
using runnel::receiver;
using runnel::sender;
using runnel::thread_pool;

using runnel_test::check_invariant;
using runnel_test::pool_of;

namespace {

// Far above any healthy run: only a hang reaches it.
constexpr auto stall_limit = 60s;

// A message: input (producer) p, its i-th value.
constexpr std::uint64_t tag(std::uint64_t p, std::uint64_t i) { return (p << 32) | i; }
constexpr std::uint64_t input_of(std::uint64_t v) { return v >> 32; }
constexpr std::uint64_t index_of(std::uint64_t v) { return v & 0xffffffffu; }

struct channels {
  std::vector<sender<std::uint64_t>> tx;
  std::vector<receiver<std::uint64_t>> rx;
};

channels make_channels(std::size_t k, std::size_t capacity) {
  channels c;
  for (std::size_t i = 0; i < k; ++i) {
    auto [t, r] = runnel::make_channel<std::uint64_t>(capacity);
    c.tx.push_back(std::move(t));
    c.rx.push_back(std::move(r));
  }
  return c;
}

// Per-input order and counts seen by a serial sink.
struct order_check {
  explicit order_check(std::size_t inputs) : next(inputs, 0) {}
  void see(std::uint64_t v) {
    const auto p = input_of(v);
    if (p >= next.size() || index_of(v) != next[p]) ++errors;
    else ++next[p];
    ++count;
  }
  std::vector<std::uint64_t> next;  // the index expected next from each input
  std::uint64_t errors = 0, count = 0;
};

}  // namespace

TEST_CASE("merge: exact counts and per-input order from outside producers, oversubscribed", "[pipeline][merge]") {
  thread_pool pool(pool_of(2));
  const std::uint64_t per = runnel_test::scaled(20000);
  for (std::size_t k : {1u, 2u, 5u}) {
    for (std::size_t producers_per_input : {1u, 2u}) {
      INFO("inputs " << k << " producers per input " << producers_per_input);
      auto c = make_channels(k, 16);
      // Each producer tags its values with its own id, so per-producer order
      // is checked even when two producers share an input.
      const std::size_t producers = k * producers_per_input;
      order_check seen(producers);
      auto run = pipeline{pool}
                     .from_merged(std::move(c.rx), {.capacity = 32, .batch = 8})
                     .stage([](std::uint64_t v) { return v; }, {.workers = 3, .ordered = true, .capacity = 16})
                     .sink([&](std::uint64_t v) { seen.see(v); })
                     .run();
      std::atomic<int> send_failures{0};
      runnel_test::run_threads(producers, [&](std::size_t p) {
        auto tx = c.tx[p % k];  // a copy: the channel closes when all are gone
        for (std::uint64_t i = 0; i < per; ++i)
          if (!tx.send(tag(p, i)).ok()) ++send_failures;
      });
      c.tx.clear();  // every sender gone: every input closes
      REQUIRE(run.wait_for(stall_limit));
      CHECK(send_failures == 0);
      CHECK(seen.count == producers * per);
      CHECK(seen.errors == 0);
      for (auto n : seen.next) CHECK(n == per);
      const auto s = run.stats();
      CHECK(s.stages.front().name == "merge");
      CHECK(s.produced == producers * per);
      CHECK(s.delivered == producers * per);
      check_invariant(s);
    }
  }
}

TEST_CASE("merge: pre-filled inputs come out in turns of .batch, message by message", "[pipeline][merge]") {
  // Inputs 0..3 hold 5q+3, 2q, 0 (open: never ready) and q+1 messages; the
  // model takes turns from input 0 on, up to q from one input, passing on at
  // an empty one, retiring a closed and drained one.
  thread_pool pool(pool_of(2));
  for (std::size_t q : {1u, 4u, 16u}) {
    for (std::size_t out_capacity : {2u, 1024u}) {  // a full output must not change the order
      INFO("batch " << q << " output capacity " << out_capacity);
      const std::vector<std::size_t> fill = {5 * q + 3, 2 * q, 0, q + 1};
      auto c = make_channels(fill.size(), 128);
      for (std::size_t p = 0; p < fill.size(); ++p) {
        for (std::size_t i = 0; i < fill[p]; ++i) REQUIRE(c.tx[p].try_send(tag(p, i)).ok());
        if (p != 2) c.tx[p].close();
      }
      std::vector<std::uint64_t> expect;
      {
        std::vector<std::size_t> left = fill, sent(fill.size(), 0);
        std::size_t total = 0;
        for (auto f : fill) total += f;
        for (std::size_t p = 0; expect.size() < total; p = (p + 1) % fill.size())
          for (std::size_t t = 0; t < q && left[p] != 0; ++t, --left[p]) expect.push_back(tag(p, sent[p]++));
      }
      std::vector<std::uint64_t> got;
      auto never_ready = c.tx[2];
      auto run = pipeline{pool}
                     .from_merged(std::move(c.rx), {.capacity = out_capacity, .batch = q})
                     .sink([&](std::uint64_t v) {
                       got.push_back(v);
                       if (got.size() == expect.size()) never_ready.close();  // the last input ends
                     }, {.batch = 3})
                     .run();
      c.tx.clear();
      REQUIRE(run.wait_for(stall_limit));
      CHECK(got == expect);
      check_invariant(run.stats());
    }
  }
}

TEST_CASE("merge: an always-ready input does not starve another", "[pipeline][merge]") {
  // Input 0 is full when the run starts and an outside thread keeps it
  // topped up; input 1 holds nb messages. Turns of q: before input 1's last
  // message, at most one turn of input 0 per turn of input 1.
  thread_pool pool(pool_of(2));
  constexpr std::size_t q = 16, nb = 256;
  auto c = make_channels(2, 1024);
  std::uint64_t a_sent = 0;
  while (c.tx[0].try_send(tag(0, a_sent)).ok()) ++a_sent;
  for (std::size_t i = 0; i < nb; ++i) REQUIRE(c.tx[1].try_send(tag(1, i)).ok());
  c.tx[1].close();
  std::atomic<bool> stop{false};
  std::uint64_t a_before_last_b = 0, a_seen = 0, b_seen = 0;
  order_check seen(2);
  auto run = pipeline{pool}
                 .from_merged(std::move(c.rx), {.capacity = 64, .batch = q})
                 .sink([&](std::uint64_t v) {
                   seen.see(v);
                   if (input_of(v) == 0) {
                     ++a_seen;
                   } else if (++b_seen == nb) {
                     a_before_last_b = a_seen;
                     stop = true;
                   }
                 })
                 .run();
  std::thread feeder([&stop, &a_sent, tx = std::move(c.tx[0])]() mutable {
    while (!stop.load()) {
      if (tx.try_send(tag(0, a_sent)).ok()) ++a_sent;
      else std::this_thread::yield();
    }
  });  // the feeder's sender goes with it: input 0 closes
  feeder.join();
  REQUIRE(run.wait_for(stall_limit));
  INFO("input 0 messages before input 1's last: " << a_before_last_b);
  CHECK(b_seen == nb);
  // Input 0 never ran dry (1024 queued at the start), so it had exactly one
  // turn of q before each of input 1's nb / q turns.
  CHECK(a_before_last_b == nb);
  CHECK(seen.errors == 0);
  CHECK(seen.count == a_sent + nb);
  check_invariant(run.stats());
}

TEST_CASE("merge: one input closes while the others go on", "[pipeline][merge]") {
  thread_pool pool(pool_of(2));
  auto c = make_channels(3, 8);
  std::atomic<std::uint64_t> from[3] = {0, 0, 0};
  order_check seen(3);
  auto run = pipeline{pool}
                 .from_merged(std::move(c.rx), {.batch = 4})
                 .sink([&](std::uint64_t v) {
                   seen.see(v);  // serial; read by this thread after the run
                   from[input_of(v)].fetch_add(1);
                 })
                 .run();
  for (std::uint64_t i = 0; i < 100; ++i) REQUIRE(c.tx[0].send(tag(0, i)).ok());
  c.tx[0].reset();  // input 0 closes
  while (from[0].load() != 100) std::this_thread::yield();
  // The other inputs still flow, and the run is not over.
  for (std::uint64_t i = 0; i < 50; ++i) {
    REQUIRE(c.tx[1].send(tag(1, i)).ok());
    REQUIRE(c.tx[2].send(tag(2, i)).ok());
  }
  while (from[1].load() != 50 || from[2].load() != 50) std::this_thread::yield();
  CHECK_FALSE(run.done());
  c.tx[1].reset();
  REQUIRE(c.tx[2].send(tag(2, 50)).ok());
  while (from[2].load() != 51) std::this_thread::yield();
  CHECK_FALSE(run.done());
  c.tx.clear();
  REQUIRE(run.wait_for(stall_limit));
  CHECK(seen.errors == 0);
  CHECK(seen.count == 100 + 50 + 51);
  check_invariant(run.stats());
}

TEST_CASE("merge: producer tasks on a one-worker pool, merged and staged, finish", "[pipeline][merge]") {
  // Everything on one worker: producer tasks park on their full channels,
  // the merge parks on its empty inputs and its full output.
  thread_pool pool(pool_of(1));
  const std::uint64_t per = runnel_test::scaled(20000);
  constexpr std::size_t k = 4;
  for (std::size_t cap : {1u, 2u, 64u}) {
    INFO("input capacity " << cap);
    auto c = make_channels(k, cap);
    std::vector<runnel::pipeline_handle> producers;
    for (std::size_t p = 0; p < k; ++p) {
      producers.push_back(runnel::produce(
          pool, std::move(c.tx[p]),
          [p, i = std::uint64_t{0}]() mutable -> std::optional<std::uint64_t> {
            if (i == per) return std::nullopt;
            return tag(p, i++);
          },
          {.capacity = 1, .batch = 1}));
    }
    order_check seen(k);
    auto run = pipeline{pool}
                   .from_merged(std::move(c.rx), {.capacity = 2, .batch = 3})
                   .stage([](std::uint64_t v) { return v; }, {.workers = 3, .ordered = true, .capacity = 2, .batch = 2})
                   .sink([&](std::uint64_t v) { seen.see(v); }, {.batch = 5})
                   .run();
    REQUIRE(run.wait_for(stall_limit));
    for (auto& p : producers) REQUIRE(p.wait_for(stall_limit));
    CHECK(seen.count == k * per);
    CHECK(seen.errors == 0);
    check_invariant(run.stats());
  }
}

TEST_CASE("merge: the outputs of several pipelines, merged", "[pipeline][merge]") {
  // Several sources (each a pipeline of its own ending in a channel) feed one
  // merged pipeline on the same pool.
  thread_pool pool(pool_of(2));
  const std::uint64_t per = runnel_test::scaled(30000);
  constexpr std::size_t k = 3;
  auto c = make_channels(k, 32);
  std::vector<runnel::pipeline_handle> feeds;
  for (std::size_t p = 0; p < k; ++p) {
    feeds.push_back(pipeline{pool}
                        .source([i = std::uint64_t{0}]() mutable -> std::optional<std::uint64_t> {
                          if (i == per) return std::nullopt;
                          return i++;
                        })
                        .stage([p](std::uint64_t i) { return tag(p, i); }, {.workers = 2, .ordered = true})
                        .to(std::move(c.tx[p]))
                        .run());
  }
  order_check seen(k);
  auto run = pipeline{pool}.from_merged(std::move(c.rx)).sink([&](std::uint64_t v) { seen.see(v); }).run();
  REQUIRE(run.wait_for(stall_limit));
  for (auto& f : feeds) REQUIRE(f.wait_for(stall_limit));
  CHECK(seen.count == k * per);
  CHECK(seen.errors == 0);
  check_invariant(run.stats());
}

TEST_CASE("merge: cancel stops a busy merged run and one parked on idle inputs", "[pipeline][merge]") {
  thread_pool pool(pool_of(2));
  SECTION("busy: outside producers keep every input full") {
    for (int round = 0; round < 4; ++round) {
      auto c = make_channels(3, 16);
      std::atomic<std::uint64_t> delivered{0};
      auto run = pipeline{pool}
                     .from_merged(std::move(c.rx), {.capacity = 16, .batch = 4})
                     .stage([](std::uint64_t v) { return v; }, {.workers = 2, .ordered = round % 2 == 0})
                     .sink([&](std::uint64_t) { delivered.fetch_add(1); }, {.workers = 2})
                     .run();
      std::vector<std::thread> ts;
      std::atomic<std::uint64_t> accepted{0};
      for (std::size_t p = 0; p < 3; ++p) {
        ts.emplace_back([&accepted, tx = std::move(c.tx[p]), p]() mutable {
          for (std::uint64_t i = 0;; ++i) {
            const auto r = tx.try_send(tag(p, i));
            if (r.status() == runnel::channel_status::closed) return;  // the run dropped its receiver
            if (r.ok()) accepted.fetch_add(1);
            else std::this_thread::yield();
          }
        });
      }
      while (delivered.load() < 2000) std::this_thread::yield();
      run.cancel();
      REQUIRE(run.wait_for(stall_limit));
      for (auto& t : ts) t.join();  // ended by the closed channels
      const auto s = run.stats();
      CHECK(s.cancelled);
      CHECK(s.delivered == delivered.load());
      CHECK(s.produced <= accepted.load());  // the rest was left in the channels
      check_invariant(s);
    }
  }
  SECTION("parked: nobody sends") {
    for (int round = 0; round < 20; ++round) {
      auto c = make_channels(4, 4);
      REQUIRE(c.tx[round % 4].send(tag(0, 0)).ok());
      std::atomic<int> seen{0};
      auto run = pipeline{pool}.from_merged(std::move(c.rx)).sink([&](std::uint64_t) { ++seen; }).run();
      while (seen.load() != 1) std::this_thread::yield();
      if (round % 2 == 0) std::this_thread::sleep_for(1ms);  // parked on all four inputs by now
      run.cancel();
      REQUIRE(run.wait_for(stall_limit));
      const auto s = run.stats();
      CHECK(s.cancelled);
      CHECK(s.produced == 1);
      CHECK(s.delivered == 1);
      check_invariant(s);
      for (auto& tx : c.tx) CHECK(tx.is_closed());  // the run held the last receivers
    }
  }
}

TEST_CASE("merge: errors reach the handler, or end the run and are rethrown", "[pipeline][merge]") {
  thread_pool pool(pool_of(2));
  SECTION("with a handler") {
    auto c = make_channels(2, 8);
    std::uint64_t handled = 0, wrong = 0, delivered = 0;
    auto run = pipeline{pool}
                   .on_error([&](const runnel::stage_failure& f) {
                     ++handled;
                     const std::uint64_t* m = f.message<std::uint64_t>();
                     if (m == nullptr || index_of(*m) % 10 != 7 || f.stage != 1) ++wrong;
                   })
                   .from_merged(std::move(c.rx))
                   .sink([&](const std::uint64_t& v) {
                     if (index_of(v) % 10 == 7) throw std::runtime_error("seven");
                     ++delivered;
                   })
                   .run();
    std::atomic<int> send_failures{0};
    runnel_test::run_threads(2, [&](std::size_t p) {
      for (std::uint64_t i = 0; i < 1000; ++i)
        if (!c.tx[p].send(tag(p, i)).ok()) ++send_failures;
      c.tx[p].reset();
    });
    CHECK(send_failures == 0);
    REQUIRE(run.wait_for(stall_limit));
    CHECK(handled == 200);
    CHECK(wrong == 0);
    CHECK(delivered == 1800);
    CHECK(run.stats().failed == 200);
    check_invariant(run.stats());
  }
  SECTION("without a handler, with inputs still open") {
    auto c = make_channels(3, 8);
    auto run = pipeline{pool}
                   .from_merged(std::move(c.rx))
                   .stage([](std::uint64_t v) {
                     if (input_of(v) == 2) throw std::domain_error("two");
                     return v;
                   })
                   .sink([](std::uint64_t) {})
                   .run();
    REQUIRE(c.tx[0].send(tag(0, 0)).ok());
    REQUIRE(c.tx[2].send(tag(2, 0)).ok());
    CHECK_THROWS_AS(run.wait(), std::domain_error);
    const auto s = run.stats();
    CHECK(s.cancelled);
    CHECK(s.failed == 1);
    check_invariant(s);
  }
}

TEST_CASE("merge: lost wake-up hunt with tiny channels and stop-and-go producers", "[pipeline][merge]") {
  // The merge parks and is woken all the time: any lost wake-up stalls the
  // run (reported by wait_for); short runs also end while wakes are in
  // flight (freed too early, ASan reports it).
  thread_pool pool(pool_of(2));
  const int rounds = runnel_test::under_sanitizer ? 20 : 50;
  constexpr std::size_t k = 3;
  const std::uint64_t per = 200;
  std::uint64_t total = 0;
  for (int round = 0; round < rounds; ++round) {
    auto c = make_channels(k, 1);
    std::uint64_t count = 0;
    auto run = pipeline{pool}
                   .from_merged(std::move(c.rx), {.capacity = 1, .batch = 1 + static_cast<std::size_t>(round % 3)})
                   .sink([&](std::uint64_t) { ++count; }, {.batch = 1})
                   .run();
    runnel_test::run_threads(k, [&c, round](std::size_t p) {
      auto tx = std::move(c.tx[p]);
      // try_send and yield rather than send: a blocked send sleeps on a
      // futex, and on a loaded machine those sleeps, not the merge, would
      // set the pace.
      for (std::uint64_t i = 0; i < per;) {
        const auto r = tx.try_send(tag(p, i));
        if (r.status() == runnel::channel_status::closed) return;
        if (r.ok()) ++i;
        if (!r.ok() || (i + p + static_cast<std::uint64_t>(round)) % 7 == 0) std::this_thread::yield();
      }
    });
    REQUIRE(run.wait_for(stall_limit));
    CHECK(count == k * per);
    total += count;
  }
  CHECK(total == static_cast<std::uint64_t>(rounds) * k * per);
}

TEST_CASE("merge: a message sent while the merge parks is never left behind", "[pipeline][merge]") {
  // One message at a time, each sent as soon as the previous one was
  // delivered, so that sends land while the merge is parking on its eight
  // inputs: a wake-up lost there leaves the message behind for good (no
  // later send would come to rescue it), which the watchdog reports.
  thread_pool pool(pool_of(2));
  const std::uint64_t n = runnel_test::under_sanitizer ? 1500 : 20000;
  constexpr std::size_t k = 8;
  auto c = make_channels(k, 4);
  std::atomic<std::uint64_t> delivered{0};
  auto run = pipeline{pool}.from_merged(std::move(c.rx)).sink([&](std::uint64_t) { delivered.fetch_add(1); }).run();
  std::uint64_t sent = 0;
  bool stalled = false;
  for (std::uint64_t i = 0; i < n && !stalled; ++i) {
    // Mostly input 0, which the merge registers first: the widest window.
    const std::size_t p = i % 2 == 0 ? 0 : i % k;
    REQUIRE(c.tx[p].send(tag(p, i)).ok());
    ++sent;
    const auto since = std::chrono::steady_clock::now();
    while (delivered.load() != sent && !stalled) {
      std::this_thread::yield();
      stalled = std::chrono::steady_clock::now() - since > stall_limit / 6;
    }
  }
  c.tx.clear();  // closing every input ends the run even after a lost wake-up
  REQUIRE(run.wait_for(stall_limit));
  INFO("delivered " << delivered.load() << " of " << sent);
  CHECK_FALSE(stalled);
  CHECK(delivered.load() == n);
  check_invariant(run.stats());
}

TEST_CASE("merge: a merge parked on its output does not keep a wake from another receiver of its input",
          "[pipeline][merge]") {
  // The merge's waker stays registered on input a after input b woke it;
  // then the merge parks on its full output. A select thread sharing input a
  // parks behind that stale waker. A send on a wakes the list's head, the
  // stale waker: it must hand the wake on, or the select sleeps with a value
  // waiting (until the watchdog's time-out).
  thread_pool pool(pool_of(2));
  auto [a_tx, a_rx] = runnel::make_channel<int>(4);
  auto [b_tx, b_rx] = runnel::make_channel<int>(4);
  auto [o_tx, o_rx] = runnel::make_channel<int>(2);
  auto run = pipeline{pool}.from_merged(a_rx, b_rx).to(std::move(o_tx)).run();
  std::this_thread::sleep_for(5ms);  // parked on a and b (else the test proves less, and still passes)
  for (int i = 0; i < 3; ++i) REQUIRE(b_tx.send(i).ok());
  while (o_rx.size_approx() != o_rx.capacity()) std::this_thread::yield();
  std::this_thread::sleep_for(5ms);  // holding the third value, parked on the output
  auto [rescue_tx, rescue_rx] = runnel::make_channel<int>(2);
  std::atomic<int> outcome{-1};
  std::thread other([&outcome, rx = a_rx, rescue = rescue_rx] {
    auto r = runnel::select(runnel::recv_arm(rx), runnel::recv_arm(rescue));
    outcome = r.index() == 0 && r.ok() ? *r.get<0>() : -2;
  });
  std::this_thread::sleep_for(5ms);  // the select is parked behind the merge's waker
  REQUIRE(a_tx.send(42).ok());
  // A select that missed its wake sleeps for ever: the watchdog wakes it
  // through its second arm and reports it.
  bool stalled = false;
  const auto since = std::chrono::steady_clock::now();
  while (outcome.load() == -1 && !stalled) {
    std::this_thread::yield();
    stalled = std::chrono::steady_clock::now() - since > stall_limit / 6;
  }
  if (stalled) REQUIRE(rescue_tx.send(0).ok());
  other.join();
  CHECK_FALSE(stalled);
  CHECK(outcome.load() == 42);
  run.cancel();
  REQUIRE(run.wait_for(stall_limit));
  check_invariant(run.stats());
}

namespace {

// A waker the test registers in an input's list behind the merge's own:
// the notifier that takes both calls this one first (see
// task_waiters::take_and_wake) and it stops there until released, so the
// merge's wake-up, taken with it, stays in flight for as long as the test
// wants.
struct gate_waker : runnel::detail::waker {
  std::atomic<bool> entered{false};
  std::atomic<bool> released{false};
  gate_waker() noexcept { wake = &on_wake; }
  static void on_wake(runnel::detail::waker* w) noexcept {
    auto* g = static_cast<gate_waker*>(w);
    g->entered.store(true);
    while (!g->released.load()) std::this_thread::yield();
  }
};

}  // namespace

TEST_CASE("merge: the node does not finish while a wake-up from an input is in flight", "[pipeline][merge]") {
  // Input a closes: its notifier takes the merge's waker and the gate
  // behind it, and stops in the gate before calling the merge's. Then the
  // lane is resumed another way (b closes, or cancel) and finds every input
  // ended. It must wait for a's wake-up: that callback still writes the
  // node's word. Every step is awaited (pool.wait_idle, the gate's flag),
  // nothing is timed: the run may not be done while the gate holds the
  // wake-up, and it finishes once released. A node that finished at once
  // is seen done here (and its state could be freed under the callback).
  const bool by_cancel = GENERATE(false, true);
  const std::size_t workers = GENERATE(std::size_t{1}, std::size_t{2});
  INFO((by_cancel ? "resumed by cancel" : "resumed by b's close") << ", " << workers << " worker(s)");
  thread_pool pool(pool_of(workers));
  const int rounds = runnel_test::under_sanitizer ? 8 : 20;
  int done_early = 0;
  for (int round = 0; round < rounds; ++round) {
    auto [a_tx, a_rx] = runnel::make_channel<std::uint64_t>(1);
    auto [b_tx, b_rx] = runnel::make_channel<std::uint64_t>(1);
    const auto a_state = runnel::pipeline_access<std::uint64_t>::state(a_tx);
    std::uint64_t count = 0;
    auto run = pipeline{pool}
                   .from_merged(std::move(a_rx), std::move(b_rx))
                   .sink([&count](std::uint64_t) { ++count; })
                   .run();
    pool.wait_idle();  // the merge is parked on a and b: its wakers are registered
    gate_waker gate;
    REQUIRE(a_state->park_receiver(gate));  // behind the merge's waker on a
    std::thread closer([tx = std::move(a_tx)]() mutable { tx.reset(); });  // closes a
    while (!gate.entered.load()) std::this_thread::yield();
    // The merge's wake-up from a is taken and not yet delivered.
    if (by_cancel) run.cancel();
    else b_tx.reset();  // closes b: its wake resumes the lane
    pool.wait_idle();  // the lane ran: found a and b ended (or cancel), and parked
    if (run.done()) ++done_early;
    gate.released.store(true);
    closer.join();
    if (by_cancel) b_tx.reset();
    REQUIRE(run.wait_for(stall_limit));
    CHECK(count == 0);
    check_invariant(run.stats());
  }
  CHECK(done_early == 0);
}

TEST_CASE("merge: bad arguments are reported", "[pipeline][merge]") {
  thread_pool pool(pool_of(1));
  CHECK_THROWS_AS(pipeline{pool}.from_merged(std::vector<receiver<int>>{}), std::invalid_argument);
  {
    auto c = make_channels(2, 2);
    c.rx[1].reset();
    CHECK_THROWS_AS(pipeline{pool}.from_merged(std::move(c.rx)), std::invalid_argument);
  }
  {
    auto c = make_channels(64, 2);
    CHECK_THROWS_WITH(pipeline{pool}.from_merged(std::move(c.rx)), Catch::Contains("at most 63"));
  }
  {
    auto c = make_channels(2, 2);
    CHECK_THROWS_AS(pipeline{pool}.from_merged(c.rx, {.workers = 2}), std::invalid_argument);
    CHECK_THROWS_AS(pipeline{pool}.from_merged(c.rx, {.batch = 0}), std::invalid_argument);
    CHECK_THROWS_AS(pipeline{pool}.from_merged(c.rx, {.capacity = 0}), std::invalid_argument);
  }
  {
    // 63 inputs work, and the variadic form.
    auto c = make_channels(63, 2);
    for (std::size_t p = 0; p < 63; ++p) {
      REQUIRE(c.tx[p].send(tag(p, 0)).ok());
      c.tx[p].reset();
    }
    std::uint64_t got = 0;
    auto run = pipeline{pool}.from_merged(std::move(c.rx)).sink([&](std::uint64_t) { ++got; }).run();
    REQUIRE(run.wait_for(stall_limit));
    CHECK(got == 63);
    auto [tx1, rx1] = runnel::make_channel<int>(2);
    auto [tx2, rx2] = runnel::make_channel<int>(2);
    REQUIRE(tx1.send(1).ok());
    REQUIRE(tx2.send(2).ok());
    tx1.reset();
    tx2.reset();
    int sum = 0;
    auto run2 = pipeline{pool}.from_merged(std::move(rx1), std::move(rx2)).sink([&](int v) { sum += v; }).run();
    REQUIRE(run2.wait_for(stall_limit));
    CHECK(sum == 3);
  }
}
