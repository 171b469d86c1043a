// Tests for runnel::select / try_select / select_for: which arm fires and
// with what, closed and disabled arms, values handed back by send arms that
// did not fire, fairness between ready arms, wake-ups through any arm (no
// lost wake-up: a stall watchdog reports failure instead of hanging), and
// exact counts with per-producer order under contention, oversubscribed.
#include <runnel/select.hpp>
#include <runnel/thread_pool.hpp>

#include <catch2/catch.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "test_support.hpp"

using namespace std::chrono_literals;
using runnel::channel_status;
using runnel::make_channel;
using runnel::recv_arm;
using runnel::send_arm;

namespace {

// Catch2 assertions are not thread-safe: other threads count failures here
// and the test thread checks the count after joining.
std::atomic<int> g_thread_errors{0};

// Runs `body` on `threads` threads; if `progress` stops moving for `stall`
// (a hang, not a slow run: the limit is far above any healthy round), calls
// `unstick` (which must close the channels, waking every waiter) and
// reports the stall. Returns true when the run ended without a stall.
bool run_with_watchdog(std::size_t threads, const std::function<void(std::size_t)>& body,
                       const std::atomic<std::uint64_t>& progress, const std::function<void()>& unstick,
                       std::chrono::seconds stall = 20s) {
  std::atomic<bool> finished{false};
  std::thread runner([&] {
    runnel_test::run_threads(threads, body);
    finished = true;
  });
  bool stalled = false;
  std::uint64_t last = progress.load();
  auto last_change = std::chrono::steady_clock::now();
  while (!finished.load()) {
    std::this_thread::sleep_for(20ms);
    const std::uint64_t now = progress.load();
    if (now != last) {
      last = now;
      last_change = std::chrono::steady_clock::now();
    } else if (!stalled && std::chrono::steady_clock::now() - last_change > stall) {
      stalled = true;
      unstick();
    }
  }
  runner.join();
  return !stalled;
}

}  // namespace

TEST_CASE("try_select fires the ready arm and reports empty when none is", "[select]") {
  auto tx1_rx1 = make_channel<int>(4);
  [[maybe_unused]] auto& tx1 = tx1_rx1.first;
  auto& rx1 = tx1_rx1.second;
  auto tx2_rx2 = make_channel<std::string>(4);
  auto& tx2 = tx2_rx2.first;
  auto& rx2 = tx2_rx2.second;

  auto none = runnel::try_select(recv_arm(rx1), recv_arm(rx2));
  CHECK(none.status() == channel_status::empty);
  CHECK(none.index() == decltype(none)::none);
  CHECK_FALSE(none.get<0>().has_value());
  CHECK_FALSE(none.get<1>().has_value());

  REQUIRE(tx2.try_send("two").ok());
  auto r = runnel::try_select(recv_arm(rx1), recv_arm(rx2));
  CHECK(r.ok());
  CHECK(r.index() == 1);
  REQUIRE(r.get<1>().has_value());
  CHECK(*r.get<1>() == "two");
  CHECK_FALSE(r.get<0>().has_value());
  CHECK(rx2.try_recv().status() == channel_status::empty);  // taken exactly once
}

TEST_CASE("send arms send on one channel only and hand the other values back", "[select]") {
  auto tx1_rx1 = make_channel<std::unique_ptr<int>>(1);
  auto& tx1 = tx1_rx1.first;
  [[maybe_unused]] auto& rx1 = tx1_rx1.second;  // capacity 2 after rounding
  auto tx2_rx2 = make_channel<std::unique_ptr<int>>(1);
  auto& tx2 = tx2_rx2.first;
  auto& rx2 = tx2_rx2.second;
  REQUIRE(tx1.try_send(std::make_unique<int>(0)).ok());
  REQUIRE(tx1.try_send(std::make_unique<int>(0)).ok());  // tx1 full

  auto r = runnel::try_select(send_arm(tx1, std::make_unique<int>(1)), send_arm(tx2, std::make_unique<int>(2)),
                              recv_arm(rx2));
  REQUIRE(r.ok());
  CHECK(r.index() == 1);
  REQUIRE(r.get<0>() != std::nullopt);  // not sent: handed back intact
  CHECK(**r.get<0>() == 1);
  CHECK(r.get<1>() == std::nullopt);  // sent
  CHECK(r.get<2>() == std::nullopt);  // empty before the select ran the send
  auto got = rx2.try_recv();
  REQUIRE(got.ok());
  CHECK(**got == 2);
  CHECK(rx2.try_recv().status() == channel_status::empty);

  // Nothing ready: every send arm hands its value back.
  REQUIRE(tx2.try_send(std::make_unique<int>(0)).ok());
  REQUIRE(tx2.try_send(std::make_unique<int>(0)).ok());
  auto e = runnel::try_select(send_arm(tx1, std::make_unique<int>(3)), send_arm(tx2, std::make_unique<int>(4)));
  CHECK(e.status() == channel_status::empty);
  REQUIRE(e.get<0>() != std::nullopt);
  REQUIRE(e.get<1>() != std::nullopt);
  CHECK(**e.get<0>() == 3);
  CHECK(**e.get<1>() == 4);
}

TEST_CASE("a closed arm fires as closed once drained; a closed send arm hands its value back", "[select]") {
  auto tx1_rx1 = make_channel<int>(4);
  auto& tx1 = tx1_rx1.first;
  auto& rx1 = tx1_rx1.second;
  auto tx2_rx2 = make_channel<int>(4);
  [[maybe_unused]] auto& tx2 = tx2_rx2.first;
  auto& rx2 = tx2_rx2.second;
  REQUIRE(tx1.try_send(7).ok());
  tx1.close();

  // Closed but not drained: the value comes first ...
  auto r = runnel::try_select(recv_arm(rx1), recv_arm(rx2));
  REQUIRE(r.ok());
  CHECK(r.index() == 0);
  CHECK(*r.get<0>() == 7);
  // ... then the arm is ready for good, as closed, in every form.
  for (int i = 0; i < 3; ++i) {
    auto c = runnel::try_select(recv_arm(rx1), recv_arm(rx2));
    CHECK(c.status() == channel_status::closed);
    CHECK(c.closed());
    CHECK(c.index() == 0);
    CHECK_FALSE(c.get<0>().has_value());
  }
  auto b = runnel::select(recv_arm(rx2), recv_arm(rx1));
  CHECK(b.closed());
  CHECK(b.index() == 1);
  auto t = runnel::select_for(1h, recv_arm(rx1));
  CHECK(t.closed());

  // A send arm on a closed channel fires closed, value back.
  auto s = runnel::select(send_arm(tx1, 9), recv_arm(rx2));
  CHECK(s.closed());
  CHECK(s.index() == 0);
  REQUIRE(s.get<0>().has_value());
  CHECK(*s.get<0>() == 9);
}

TEST_CASE("disabled arms never fire; a select with every arm disabled throws", "[select]") {
  auto tx1_rx1 = make_channel<int>(4);
  auto& tx1 = tx1_rx1.first;
  auto& rx1 = tx1_rx1.second;
  auto tx2_rx2 = make_channel<int>(4);
  auto& tx2 = tx2_rx2.first;
  auto& rx2 = tx2_rx2.second;
  REQUIRE(tx1.try_send(1).ok());
  tx2.close();
  auto e = runnel::try_select(recv_arm(rx1).only_if(false), recv_arm(rx2).only_if(false));
  CHECK(e.status() == channel_status::empty);
  auto t = runnel::select_for(0ms, recv_arm(rx1).only_if(false), recv_arm(rx2).only_if(false));
  CHECK(t.status() == channel_status::timeout);
  CHECK_THROWS_AS(runnel::select(recv_arm(rx1).only_if(false), recv_arm(rx2).only_if(false)), std::logic_error);
  // Only the enabled arm fires, though the disabled one is ready too.
  for (int i = 0; i < 20; ++i) {
    auto r = runnel::select(recv_arm(rx1).only_if(false), recv_arm(rx2));
    CHECK(r.index() == 1);
    CHECK(r.closed());
  }
  CHECK(rx1.try_recv().ok());  // still there
}

TEST_CASE("select_for times out with nothing ready and hands send values back", "[select]") {
  auto tx1_rx1 = make_channel<int>(1);
  auto& tx1 = tx1_rx1.first;
  auto& rx1 = tx1_rx1.second;
  auto tx2_rx2 = make_channel<int>(1);
  auto& tx2 = tx2_rx2.first;
  [[maybe_unused]] auto& rx2 = tx2_rx2.second;
  REQUIRE(tx2.try_send(0).ok());
  REQUIRE(tx2.try_send(0).ok());  // full
  for (auto timeout : {-1ms, 0ms, 1ms, 20ms}) {
    auto r = runnel::select_for(timeout, recv_arm(rx1), send_arm(tx2, 5));
    CHECK(r.status() == channel_status::timeout);
    CHECK(r.index() == decltype(r)::none);
    CHECK_FALSE(r.get<0>().has_value());
    REQUIRE(r.get<1>().has_value());
    CHECK(*r.get<1>() == 5);
  }
  // Ready: no timeout even with a zero one.
  REQUIRE(tx1.try_send(3).ok());
  auto r = runnel::select_for(0ms, recv_arm(rx1), send_arm(tx2, 5));
  CHECK(r.ok());
  CHECK(r.index() == 0);
}

TEST_CASE("blocking select and select_for on the only worker of a one-worker pool throw", "[select][pool]") {
  auto ch = make_channel<int>(4);
  auto& rx = ch.second;
  runnel::thread_pool one({.threads = 1});
  std::future<int> threw = one.submit([&] {
    int n = 0;
    try {
      (void)runnel::select(recv_arm(rx));
    } catch (const std::logic_error&) {
      ++n;
    }
    try {
      (void)runnel::select_for(1ms, recv_arm(rx));
    } catch (const std::logic_error&) {
      ++n;
    }
    // The try form stays allowed.
    if (runnel::try_select(recv_arm(rx)).status() == channel_status::empty) ++n;
    return n;
  });
  REQUIRE(threw.wait_for(20s) == std::future_status::ready);
  CHECK(threw.get() == 3);
}

namespace {

// Runs `trials` selects over the arms made by `arms()` while every arm stays
// ready, and returns how often each index fired.
template <std::size_t N, class Select>
std::array<int, N> fire_counts(int trials, Select select_once) {
  std::array<int, N> wins{};
  for (int i = 0; i < trials; ++i) {
    const std::size_t k = select_once();
    if (k < N) ++wins[k];
  }
  return wins;
}

}  // namespace

TEST_CASE("select is fair: each of two ready arms fires 50% +- 2.2% of 10,000 times", "[select]") {
  // Go's bound (TestSelectFairness): 2.2% of 10,000 is 4.4 standard
  // deviations of a fair coin, so a fair select fails about once in 10^5 runs.
  constexpr int trials = 10000;
  constexpr int lo = trials / 2 - trials * 22 / 1000, hi = trials / 2 + trials * 22 / 1000;
  auto tx1_rx1 = make_channel<int>(2);
  auto& tx1 = tx1_rx1.first;
  auto& rx1 = tx1_rx1.second;
  auto tx2_rx2 = make_channel<int>(2);
  auto& tx2 = tx2_rx2.first;
  auto& rx2 = tx2_rx2.second;
  auto tx3_rx3 = make_channel<int>(2);
  [[maybe_unused]] auto& tx3 = tx3_rx3.first;
  auto& rx3 = tx3_rx3.second;  // never ready
  auto tx4_rx4 = make_channel<int>(2);
  auto& tx4 = tx4_rx4.first;
  auto& rx4 = tx4_rx4.second;
  tx4.close();  // ready for ever, as closed
  REQUIRE(tx1.try_send(1).ok());
  REQUIRE(tx2.try_send(2).ok());
  auto refill = [&](std::size_t k) {
    if (k == 0 && !tx1.try_send(1).ok()) ++g_thread_errors;
    if (k == 2 && !tx2.try_send(2).ok()) ++g_thread_errors;
  };

  SECTION("two values, blocking form") {
    auto w = fire_counts<2>(trials, [&] {
      auto r = runnel::select(recv_arm(rx1), recv_arm(rx2));
      refill(r.index() == 0 ? 0 : 2);
      return r.index();
    });
    CHECK(w[0] >= lo);
    CHECK(w[0] <= hi);
    CHECK(w[0] + w[1] == trials);
  }
  SECTION("two values with a never-ready arm between them, try form") {
    // A random start index with a cyclic scan would give the arm after the
    // gap two chances in three; a random order gives each ready arm one in two.
    auto w = fire_counts<3>(trials, [&] {
      auto r = runnel::try_select(recv_arm(rx1), recv_arm(rx3), recv_arm(rx2));
      refill(r.index());
      return r.index();
    });
    CHECK(w[1] == 0);
    CHECK(w[0] >= lo);
    CHECK(w[0] <= hi);
    CHECK(w[0] + w[2] == trials);
  }
  SECTION("a value and a closed arm, timed form") {
    auto w = fire_counts<2>(trials, [&] {
      auto r = runnel::select_for(1h, recv_arm(rx1), recv_arm(rx4));
      if (r.index() == 0) refill(0);
      else if (!r.closed()) ++g_thread_errors;
      return r.index();
    });
    CHECK(w[0] >= lo);
    CHECK(w[0] <= hi);
    CHECK(w[0] + w[1] == trials);
  }
  SECTION("a receive and a send arm") {
    auto tx5_rx5 = make_channel<int>(2);
    auto& tx5 = tx5_rx5.first;
    auto& rx5 = tx5_rx5.second;
    auto w = fire_counts<2>(trials, [&] {
      auto r = runnel::select(recv_arm(rx1), send_arm(tx5, 5));
      if (r.index() == 0) refill(0);
      else if (!rx5.try_recv().ok()) ++g_thread_errors;  // make room again
      return r.index();
    });
    CHECK(w[0] >= lo);
    CHECK(w[0] <= hi);
    CHECK(w[0] + w[1] == trials);
  }
  CHECK(g_thread_errors == 0);
}

TEST_CASE("a blocked select is woken by a send on any arm, by room on a send arm, and by close", "[select]") {
  auto tx1_rx1 = make_channel<int>(2);
  auto& tx1 = tx1_rx1.first;
  auto& rx1 = tx1_rx1.second;
  auto tx2_rx2 = make_channel<int>(2);
  auto& tx2 = tx2_rx2.first;
  auto& rx2 = tx2_rx2.second;
  auto tx3_rx3 = make_channel<int>(1);
  auto& tx3 = tx3_rx3.first;
  auto& rx3 = tx3_rx3.second;
  REQUIRE(tx3.try_send(0).ok());
  REQUIRE(tx3.try_send(0).ok());  // full: the send arm waits for room
  const int rounds = static_cast<int>(runnel_test::scaled(300));
  for (int round = 0; round < rounds; ++round) {
    const int which = round % 4;
    std::atomic<int> fired{-1};
    std::atomic<int> value{-1};
    std::thread t([&] {
      auto r = runnel::select(recv_arm(rx1), recv_arm(rx2), send_arm(tx3, 30));
      fired = static_cast<int>(r.index());
      if (r.index() == 0 && r.ok()) value = *r.get<0>();
      if (r.index() == 1 && r.ok()) value = *r.get<1>();
      if (r.index() == 2 && r.ok()) value = 30;
      if (r.index() != 2 && *r.get<2>() != 30) ++g_thread_errors;  // handed back
    });
    // Vary how long the select has to get to sleep (none, spinning, asleep).
    std::this_thread::sleep_for(std::chrono::microseconds((round % 7) * 40));
    if (which == 0) REQUIRE(tx1.send(10).ok());
    if (which == 1) REQUIRE(tx2.send(20).ok());
    if (which == 2) REQUIRE(rx3.recv() == 0);
    if (which == 3) rx1.close();  // ends below: fresh channels
    t.join();
    CHECK(fired == (which == 3 ? 0 : which));
    if (which < 3) CHECK(value == (which + 1) * 10);
    if (which == 2) {
      REQUIRE(rx3.recv() == 0);
      REQUIRE(rx3.recv() == 30);
      REQUIRE(tx3.try_send(0).ok());
      REQUIRE(tx3.try_send(0).ok());
    }
    if (which == 3) {
      auto a_b = make_channel<int>(2);
      auto& a = a_b.first;
      auto& b = a_b.second;
      tx1 = std::move(a);
      rx1 = std::move(b);
    }
  }
  CHECK(g_thread_errors == 0);
}

TEST_CASE("no lost wake-up: two selects over the same two channels each get one value a round",
          "[select]") {
  // Each round the producer sends one value on A and one on B, while both
  // consumers (each doing one select over {A, B} per round) are spinning,
  // registering or asleep. Both wakes may go to the same consumer (it is the
  // head of both lists); that consumer takes one value and must hand the
  // other wake on, or the second consumer sleeps beside a ready value. A
  // missing re-check after registration loses a wake the same way. A lost
  // wake stalls the round: the watchdog reports it and closes everything.
  const int rounds = static_cast<int>(runnel_test::scaled(4000));
  auto ta_ra = make_channel<int>(4);
  auto& ta = ta_ra.first;
  auto& ra = ta_ra.second;
  auto tb_rb = make_channel<int>(4);
  auto& tb = tb_rb.first;
  auto& rb = tb_rb.second;
  auto tack_rack = make_channel<int>(4);
  auto& tack = tack_rack.first;
  auto& rack = tack_rack.second;
  auto tgo_rgo = make_channel<int>(4);
  auto& tgo = tgo_rgo.first;
  auto& rgo = tgo_rgo.second;
  std::atomic<std::uint64_t> progress{0};
  std::atomic<long> received{0};
  auto body = [&](std::size_t id) {
    if (id == 0) {  // producer
      std::minstd_rand rng(12345);
      for (int round = 0; round < rounds; ++round) {
        std::this_thread::sleep_for(std::chrono::microseconds(rng() % 120));
        if (!ta.send(round).ok() || !tb.send(round).ok()) return;
        if (!rack.recv() || !rack.recv()) return;
        ++progress;
        if (!tgo.send(0).ok() || !tgo.send(0).ok()) return;
      }
      return;
    }
    for (;;) {  // consumers
      auto r = runnel::select(recv_arm(ra), recv_arm(rb));
      if (!r.ok()) return;
      ++received;
      if (!tack.send(1).ok()) return;
      if (!rgo.recv()) return;
    }
  };
  auto close_all = [&] {
    ta.close();
    tb.close();
    tack.close();
    tgo.close();
  };
  const bool ok = run_with_watchdog(
      3,
      [&](std::size_t id) {
        body(id);
        if (id == 0) close_all();  // ends the consumers after the last round
      },
      progress, close_all);
  CHECK(ok);
  CHECK(progress == static_cast<std::uint64_t>(rounds));
  CHECK(received == 2L * rounds);
}

namespace {

// `channels` channels, `per_channel` producers on each, `consumers` threads
// each selecting over every channel (disabling an arm once it reports
// closed), `plain` threads receiving from channel 0 with recv. Checks that
// every value is received exactly once and that each consumer sees each
// producer's values in order.
template <std::size_t Channels>
void contention(std::size_t per_channel, std::size_t consumers, std::size_t plain, std::size_t per_producer,
                std::size_t capacity) {
  const std::size_t producers = Channels * per_channel;
  std::vector<runnel::sender<std::uint64_t>> tx;
  std::vector<runnel::receiver<std::uint64_t>> rx;
  for (std::size_t c = 0; c < Channels; ++c) {
    auto t_r = make_channel<std::uint64_t>(capacity);
    auto& t = t_r.first;
    auto& r = t_r.second;
    tx.push_back(std::move(t));
    rx.push_back(std::move(r));
  }
  std::vector<std::atomic<std::uint32_t>> seen(producers * per_producer);
  std::atomic<std::size_t> received{0}, order_errors{0};
  auto take = [&](std::vector<std::int64_t>& last, std::uint64_t v) {
    const std::size_t p = v >> 32, i = v & 0xffffffffu;
    if (p >= producers || i >= per_producer) {
      ++g_thread_errors;
      return;
    }
    if (static_cast<std::int64_t>(i) <= last[p]) ++order_errors;
    last[p] = static_cast<std::int64_t>(i);
    seen[p * per_producer + i].fetch_add(1);
    ++received;
  };
  std::vector<std::thread> ts;
  for (std::size_t p = 0; p < producers; ++p) {
    ts.emplace_back([t = tx[p % Channels], p, per_producer]() mutable {
      for (std::size_t i = 0; i < per_producer; ++i) {
        if (!t.send((std::uint64_t{p} << 32) | i).ok()) ++g_thread_errors;
      }
    });
  }
  tx.clear();  // the producers hold the last senders: each channel closes when its producers end
  for (std::size_t c = 0; c < consumers; ++c) {
    ts.emplace_back([rx, &take, producers] {
      std::vector<std::int64_t> last(producers, -1);
      std::array<bool, Channels> open;
      open.fill(true);
      auto arms = [&]<std::size_t... Is>(std::index_sequence<Is...>) {
        return runnel::select(recv_arm(rx[Is]).only_if(open[Is])...);
      };
      for (;;) {
        bool any = false;
        for (bool o : open) any = any || o;
        if (!any) return;
        auto r = arms(std::make_index_sequence<Channels>{});
        if (r.closed()) {
          open[r.index()] = false;
          continue;
        }
        [&]<std::size_t... Is>(std::index_sequence<Is...>) {
          ((r.index() == Is ? take(last, *r.template get<Is>()) : void()), ...);
        }(std::make_index_sequence<Channels>{});
      }
    });
  }
  for (std::size_t c = 0; c < plain; ++c) {
    ts.emplace_back([r = rx[0], &take, producers]() mutable {
      std::vector<std::int64_t> last(producers, -1);
      for (std::uint64_t v : r) take(last, v);
    });
  }
  rx.clear();
  for (auto& t : ts) t.join();
  CHECK(g_thread_errors == 0);
  CHECK(received == producers * per_producer);
  CHECK(order_errors == 0);
  std::size_t wrong = 0;
  for (auto& c : seen) wrong += c.load() != 1;
  CHECK(wrong == 0);
}

}  // namespace

TEST_CASE("select consumers under contention: exact counts, per-producer order", "[select]") {
  const std::size_t n = runnel_test::scaled(40000);
  SECTION("3 channels x 1 producer, 1 select consumer") { contention<3>(1, 1, 0, n, 64); }
  SECTION("3 channels x 2 producers, 3 select consumers, capacity 1 (oversubscribed)") {
    contention<3>(2, 3, 0, n / 4, 1);
  }
  SECTION("2 channels x 3 producers, 2 select consumers and 2 plain receivers (oversubscribed)") {
    contention<2>(3, 2, 2, n / 4, 4);
  }
}

TEST_CASE("select producers under contention: every value sent once, per-producer order", "[select]") {
  // Producers send each value on whichever of two channels has room;
  // consumers receive plainly. Exercises send arms parking on full channels.
  constexpr std::size_t per_producer = runnel_test::scaled(20000);
  constexpr std::size_t producers = 4, consumers_per_channel = 2;
  auto ta_ra = make_channel<std::uint64_t>(2);
  auto& ta = ta_ra.first;
  auto& ra = ta_ra.second;
  auto tb_rb = make_channel<std::uint64_t>(2);
  auto& tb = tb_rb.first;
  auto& rb = tb_rb.second;
  std::vector<std::atomic<std::uint32_t>> seen(producers * per_producer);
  std::atomic<std::size_t> received{0}, order_errors{0};
  std::vector<std::thread> ts;
  for (std::size_t p = 0; p < producers; ++p) {
    ts.emplace_back([ta = ta, tb = tb, p] {
      for (std::size_t i = 0; i < per_producer; ++i) {
        const std::uint64_t v = (std::uint64_t{p} << 32) | i;
        auto r = runnel::select(send_arm(ta, v), send_arm(tb, v));
        if (!r.ok()) ++g_thread_errors;
        // The arm that did not fire hands its copy back.
        if (r.get<0>().has_value() == (r.index() == 0)) ++g_thread_errors;
        if (r.get<1>().has_value() == (r.index() == 1)) ++g_thread_errors;
      }
    });
  }
  ta.reset();
  tb.reset();
  for (std::size_t c = 0; c < 2 * consumers_per_channel; ++c) {
    ts.emplace_back([r = c % 2 ? ra : rb, &seen, &received, &order_errors]() mutable {
      std::vector<std::int64_t> last(producers, -1);
      for (std::uint64_t v : r) {
        const std::size_t p = v >> 32, i = v & 0xffffffffu;
        if (static_cast<std::int64_t>(i) <= last[p]) ++order_errors;
        last[p] = static_cast<std::int64_t>(i);
        seen[p * per_producer + i].fetch_add(1);
        ++received;
      }
    });
  }
  ra.reset();
  rb.reset();
  for (auto& t : ts) t.join();
  CHECK(g_thread_errors == 0);
  CHECK(received == producers * per_producer);
  CHECK(order_errors == 0);
  std::size_t wrong = 0;
  for (auto& c : seen) wrong += c.load() != 1;
  CHECK(wrong == 0);
}
