// The Go runtime's channel tests, ported to runnel's channels and select.
//
// Origin: src/runtime/chan_test.go of the Go project (https://go.dev),
// Copyright 2009 The Go Authors, BSD-style licence (the Go LICENSE file).
// crossbeam-channel ports the same file in its tests/golang.rs. This is our
// own code following the tests' scenarios, with these differences:
// - Go channels may be unbuffered (capacity 0); ours are bounded with at
//   least one cell, rounded up to a power of two (at least 2). The capacity
//   matrix runs over 1..199 and fills capacity(), not the requested number.
// - A receive from a closed Go channel yields the zero value; ours yields
//   nullopt / status closed. A send on a closed Go channel panics; ours
//   fails and hands the value back.
// - Go's `select { ...; default: }` is try_select; a nil channel in a
//   select is a disabled arm (only_if(false)).
// - "Does not happen within 1 ms" checks (a receive from an empty channel
//   blocks) can only pass wrongly on a slow machine, never fail wrongly.
// RUNNEL_GOLANG_FULL=1 runs every capacity and Go's full iteration counts;
// by default sanitizer builds run a subset (see `full()`).
#include <runnel/select.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <future>
#include <map>
#include <optional>
#include <thread>
#include <vector>

#include "test_support.hpp"

using namespace std::chrono_literals;
using runnel::channel_status;
using runnel::make_channel;
using runnel::recv_arm;
using runnel::send_arm;

namespace {

std::atomic<int> g_thread_errors{0};

bool full() {
  const char* v = std::getenv("RUNNEL_GOLANG_FULL");
  return v != nullptr && v[0] == '1';
}

// Go's iteration count n, or n/20 under a sanitizer unless RUNNEL_GOLANG_FULL=1.
std::size_t iterations(std::size_t n) { return full() ? n : runnel_test::scaled(n); }

// The capacities of the matrix: 1..199, every one in an ordinary build (or
// with RUNNEL_GOLANG_FULL=1), a spread of 20 under a sanitizer.
std::vector<std::size_t> capacities() {
  std::vector<std::size_t> caps;
  const std::size_t step = (runnel_test::under_sanitizer && !full()) ? 10 : 1;
  for (std::size_t c = 1; c < 200; c += step) caps.push_back(c);
  return caps;
}

std::size_t rounded(std::size_t cap) {
  std::size_t r = 2;
  while (r < cap) r *= 2;
  return r;
}

}  // namespace

// TestChan, one capacity at a time.
TEST_CASE("golang TestChan: empty, full, close, FIFO, many-to-many, len and cap over capacities 1..199",
          "[channel][golang]") {
  for (const std::size_t cap : capacities()) {
    INFO("capacity " << cap);
    {
      // A receive from an empty channel blocks; try forms do not.
      auto ch = make_channel<int>(cap);
      auto& tx = ch.first;
      auto& rx = ch.second;
      std::atomic<bool> recv1{false}, recv2{false};
      std::thread t1([&] {
        (void)rx.recv();
        recv1 = true;
      });
      std::thread t2([&] {
        (void)rx.recv_for(1h);
        recv2 = true;
      });
      std::this_thread::sleep_for(1ms);
      CHECK_FALSE(recv1.load());
      CHECK_FALSE(recv2.load());
      CHECK(rx.try_recv().status() == channel_status::empty);
      CHECK(runnel::try_select(recv_arm(rx)).status() == channel_status::empty);
      REQUIRE(tx.send(0).ok());
      REQUIRE(tx.send(0).ok());
      t1.join();
      t2.join();
    }
    {
      // A send to a full channel blocks; try forms do not.
      auto ch = make_channel<int>(cap);
      auto& tx = ch.first;
      auto& rx = ch.second;
      REQUIRE(tx.capacity() == rounded(cap));
      for (std::size_t i = 0; i < tx.capacity(); ++i) REQUIRE(tx.send(static_cast<int>(i)).ok());
      std::atomic<bool> sent{false};
      std::thread t([&] {
        if (!tx.send(0).ok()) ++g_thread_errors;
        sent = true;
      });
      std::this_thread::sleep_for(1ms);
      CHECK_FALSE(sent.load());
      CHECK(tx.try_send(0).status() == channel_status::full);
      CHECK(runnel::try_select(send_arm(tx, 0)).status() == channel_status::empty);
      REQUIRE(rx.recv() == 0);
      t.join();
      CHECK(sent.load());
    }
    {
      // A closed channel yields what it holds, in order, then closed.
      auto ch = make_channel<int>(cap);
      auto& tx = ch.first;
      auto& rx = ch.second;
      for (std::size_t i = 0; i < tx.capacity(); ++i) REQUIRE(tx.send(static_cast<int>(i)).ok());
      tx.close();
      for (std::size_t i = 0; i < tx.capacity(); ++i) REQUIRE(rx.recv() == static_cast<int>(i));
      CHECK(rx.recv() == std::nullopt);
      CHECK(rx.try_recv().status() == channel_status::closed);
      CHECK(runnel::try_select(recv_arm(rx)).closed());
      // Go panics here; we hand the value back.
      auto r = tx.send(42);
      CHECK(r.status() == channel_status::closed);
      CHECK(r.value() == 42);
    }
    {
      // close unblocks a receive.
      auto ch = make_channel<int>(cap);
      auto& tx = ch.first;
      auto& rx = ch.second;
      std::future<bool> done = std::async(std::launch::async, [&] { return rx.recv() == std::nullopt; });
      std::this_thread::sleep_for(1ms);
      tx.close();
      CHECK(done.get());
    }
    {
      // 100 values in FIFO order, with blocking and with timed receives.
      auto ch = make_channel<int>(cap);
      auto& tx = ch.first;
      auto& rx = ch.second;
      for (int pass = 0; pass < 2; ++pass) {
        std::thread t([&] {
          for (int i = 0; i < 100; ++i)
            if (!tx.send(i).ok()) ++g_thread_errors;
        });
        for (int i = 0; i < 100; ++i) {
          if (pass == 0) {
            REQUIRE(rx.recv() == i);
          } else {
            auto v = rx.recv_for(1h);
            REQUIRE(v.ok());
            REQUIRE(*v == i);
          }
        }
        t.join();
      }
      // 4 senders x 1000 values, 4 receivers x 1000 receives: every value
      // 0..999 arrives exactly 4 times.
      constexpr int P = 4, L = 1000;
      std::vector<std::thread> ts;
      for (int p = 0; p < P; ++p) {
        ts.emplace_back([&] {
          for (int i = 0; i < L; ++i)
            if (!tx.send(i).ok()) ++g_thread_errors;
        });
      }
      std::vector<std::future<std::map<int, int>>> got;
      for (int p = 0; p < P; ++p) {
        got.push_back(std::async(std::launch::async, [&] {
          std::map<int, int> m;
          for (int i = 0; i < L; ++i) ++m[rx.recv().value_or(-1)];
          return m;
        }));
      }
      std::map<int, int> all;
      for (auto& f : got)
        for (auto [k, v] : f.get()) all[k] += v;
      for (auto& t : ts) t.join();
      REQUIRE(all.size() == static_cast<std::size_t>(L));
      int wrong = 0;
      for (auto [k, v] : all) wrong += (k < 0 || k >= L || v != P);
      CHECK(wrong == 0);
    }
    {
      // len and cap exact.
      auto ch = make_channel<int>(cap);
      auto& tx = ch.first;
      CHECK(tx.size_approx() == 0);
      CHECK(tx.capacity() == rounded(cap));
      for (std::size_t i = 0; i < tx.capacity(); ++i) REQUIRE(tx.send(static_cast<int>(i)).ok());
      CHECK(tx.size_approx() == tx.capacity());
      CHECK(tx.capacity() == rounded(cap));
    }
  }
  CHECK(g_thread_errors == 0);
}

TEST_CASE("golang: close wakes every blocked receiver and every blocked sender, and sends after close hand the value back",
          "[channel][golang]") {
  constexpr int waiters = 6;
  {
    auto ch = make_channel<int>(1);
    auto& tx = ch.first;
    auto& rx = ch.second;
    std::vector<std::future<bool>> rs;
    for (int i = 0; i < waiters; ++i) {
      rs.push_back(std::async(std::launch::async, [&, i] {
        if (i % 3 == 0) return rx.recv() == std::nullopt;
        if (i % 3 == 1) return rx.recv_for(1h).closed();
        return runnel::select(recv_arm(rx)).closed();
      }));
    }
    std::this_thread::sleep_for(2ms);
    tx.close();
    for (auto& f : rs) CHECK(f.get());
  }
  {
    auto ch = make_channel<int>(1);
    auto& tx = ch.first;
    auto& rx = ch.second;
    REQUIRE(tx.try_send(-1).ok());
    REQUIRE(tx.try_send(-1).ok());  // full
    std::vector<std::future<bool>> ss;
    for (int i = 0; i < waiters; ++i) {
      ss.push_back(std::async(std::launch::async, [&, i] {
        if (i % 3 == 0) {
          auto r = tx.send(i);
          return r.status() == channel_status::closed && r.value() == i;
        }
        if (i % 3 == 1) {
          auto r = tx.send_for(i, 1h);
          return r.status() == channel_status::closed && r.value() == i;
        }
        auto r = runnel::select(send_arm(tx, i));
        return r.closed() && r.get<0>() == i;
      }));
    }
    std::this_thread::sleep_for(2ms);
    rx.close();
    for (auto& f : ss) CHECK(f.get());
  }
}

TEST_CASE("golang TestNonblockRecvRace: a value sent before close is seen by a non-blocking receive",
          "[channel][golang]") {
  const std::size_t n = iterations(5000);
  int not_ready = 0;
  for (std::size_t i = 0; i < n; ++i) {
    auto ch = make_channel<int>(1);
    auto& tx = ch.first;
    auto& rx = ch.second;
    REQUIRE(tx.send(1).ok());
    std::future<bool> f = std::async(std::launch::async, [&] {
      // The value or, once it is taken, the close: never empty.
      return runnel::try_select(recv_arm(rx)).status() != channel_status::empty;
    });
    tx.close();
    (void)rx.recv();
    if (!f.get()) ++not_ready;
  }
  CHECK(not_ready == 0);
}

namespace {

// TestNonblockSelectRace(2): from the moment the selecting thread starts, c1
// or c2 is always ready, so its try_select never answers empty.
int nonblock_select_race(std::size_t n, bool close_c2) {
  int empties = 0;
  for (std::size_t i = 0; i < n; ++i) {
    auto c1 = make_channel<int>(1);
    auto c2 = make_channel<int>(1);
    REQUIRE(c1.first.send(1).ok());
    std::future<bool> f = std::async(std::launch::async, [&] {
      return runnel::try_select(recv_arm(c1.second), recv_arm(c2.second)).status() != channel_status::empty;
    });
    if (close_c2) c2.first.close();
    else REQUIRE(c2.first.send(1).ok());
    (void)runnel::try_select(recv_arm(c1.second));
    if (!f.get()) ++empties;
  }
  return empties;
}

}  // namespace

TEST_CASE("golang TestNonblockSelectRace: a ready hand-over is never reported empty", "[select][golang]") {
  CHECK(nonblock_select_race(iterations(5000), false) == 0);
}

TEST_CASE("golang TestNonblockSelectRace2: the same with close as the hand-over", "[select][golang]") {
  CHECK(nonblock_select_race(iterations(5000), true) == 0);
}

TEST_CASE("golang TestSelfSelect: send and receive arms on the same channel neither crash nor deadlock",
          "[select][golang]") {
  for (const std::size_t cap : {1, 10}) {
    auto ch = make_channel<int>(cap);
    auto& tx = ch.first;
    auto& rx = ch.second;
    runnel_test::run_threads(2, [&](std::size_t p) {
      for (int i = 0; i < 1000; ++i) {
        const int v = static_cast<int>(p);
        if (p == 0 || i % 2 == 0) {
          auto r = runnel::select(send_arm(tx, v), recv_arm(rx));
          if (!r.ok()) ++g_thread_errors;
        } else {
          auto r = runnel::select(recv_arm(rx), send_arm(tx, v));
          if (!r.ok()) ++g_thread_errors;
        }
      }
    });
  }
  CHECK(g_thread_errors == 0);
}

TEST_CASE("golang TestSelectStress: plain and select senders and receivers on four channels finish",
          "[select][golang]") {
  // Go: 4 channels (capacities 0, 0, 2, 3); per channel one plain sender and
  // one plain receiver of N values; one thread sending N values on each
  // channel through a single select, one receiving likewise; an arm is
  // disabled (Go: set to nil) once it has done its N.
  const std::size_t N = iterations(10000);
  std::array<std::pair<runnel::sender<int>, runnel::receiver<int>>, 4> c{
      make_channel<int>(1), make_channel<int>(1), make_channel<int>(2), make_channel<int>(3)};
  std::atomic<std::size_t> received{0};
  runnel_test::run_threads(10, [&](std::size_t id) {
    if (id < 4) {
      for (std::size_t i = 0; i < N; ++i)
        if (!c[id].first.send(0).ok()) ++g_thread_errors;
    } else if (id < 8) {
      for (std::size_t i = 0; i < N; ++i)
        if (c[id - 4].second.recv() == 0) ++received;
    } else if (id == 8) {
      std::array<std::size_t, 4> n{};
      for (std::size_t i = 0; i < 4 * N; ++i) {
        auto r = runnel::select(send_arm(c[3].first, 0).only_if(n[3] < N), send_arm(c[2].first, 0).only_if(n[2] < N),
                                send_arm(c[0].first, 0).only_if(n[0] < N), send_arm(c[1].first, 0).only_if(n[1] < N));
        if (!r.ok()) ++g_thread_errors;
        static constexpr std::size_t channel_of[] = {3, 2, 0, 1};
        ++n[channel_of[r.index()]];
      }
    } else {
      std::array<std::size_t, 4> n{};
      for (std::size_t i = 0; i < 4 * N; ++i) {
        auto r = runnel::select(recv_arm(c[0].second).only_if(n[0] < N), recv_arm(c[1].second).only_if(n[1] < N),
                                recv_arm(c[2].second).only_if(n[2] < N), recv_arm(c[3].second).only_if(n[3] < N));
        if (!r.ok()) ++g_thread_errors;
        ++n[r.index()];
        ++received;
      }
    }
  });
  CHECK(g_thread_errors == 0);
  CHECK(received == 8 * N);
}

TEST_CASE("golang TestSelectFairness: two ready arms among four each win 50% +- 2.2% of 10,000",
          "[select][golang]") {
  constexpr int trials = 10000;
  auto c1 = make_channel<std::uint8_t>(trials + 1);
  auto c2 = make_channel<std::uint8_t>(trials + 1);
  for (int i = 0; i < trials + 1; ++i) {
    REQUIRE(c1.first.send(1).ok());
    REQUIRE(c2.first.send(2).ok());
  }
  auto c3 = make_channel<std::uint8_t>(1);
  auto c4 = make_channel<std::uint8_t>(1);
  auto out = make_channel<std::uint8_t>(1);
  auto done = make_channel<std::uint8_t>(1);
  std::thread t([&] {
    for (;;) {
      auto r = runnel::select(recv_arm(c3.second), recv_arm(c4.second), recv_arm(c1.second), recv_arm(c2.second));
      std::uint8_t b = 0;
      if (r.index() == 2) b = *r.get<2>();
      else if (r.index() == 3) b = *r.get<3>();
      auto s = runnel::select(send_arm(out.first, b), recv_arm(done.second));
      if (s.index() == 1) return;
    }
  });
  int cnt1 = 0, cnt2 = 0, other = 0;
  for (int i = 0; i < trials; ++i) {
    const auto b = out.second.recv();
    if (b == 1) ++cnt1;
    else if (b == 2) ++cnt2;
    else ++other;
  }
  done.first.close();
  t.join();
  CHECK(other == 0);
  // Go's bound: 4.4 standard deviations of a fair coin over `trials`.
  const double r = static_cast<double>(cnt1) / trials;
  CHECK(r >= 0.5 - 0.022);
  CHECK(r <= 0.5 + 0.022);
  CHECK(cnt1 + cnt2 == trials);
}

TEST_CASE("golang TestPseudoRandomSend: a select between two sends on one channel sends both values",
          "[select][golang]") {
  constexpr int n = 100;
  auto ch = make_channel<int>(n);
  auto& tx = ch.first;
  auto& rx = ch.second;
  std::future<std::vector<int>> got = std::async(std::launch::async, [&] {
    std::vector<int> l;
    for (int i = 0; i < n; ++i) {
      std::this_thread::yield();
      l.push_back(rx.recv().value_or(-1));
    }
    return l;
  });
  for (int i = 0; i < n; ++i) REQUIRE(runnel::select(send_arm(tx, 1), send_arm(tx, 0)).ok());
  int n0 = 0, n1 = 0;
  for (int v : got.get()) {
    n0 += v == 0;
    n1 += v == 1;
  }
  CHECK(n0 + n1 == n);
  CHECK(n0 > n / 10);
  CHECK(n1 > n / 10);
}

TEST_CASE("golang TestMultiConsumer: 23 workers relay 271,828 items, count and sum exact",
          "[channel][golang]") {
  constexpr int nwork = 23;
  const std::size_t niter = iterations(271828);
  static constexpr int pn[] = {2, 3, 7, 11, 13, 17, 19, 23, 27, 31};
  auto q = make_channel<int>(nwork * 3);
  auto r = make_channel<int>(nwork * 3);
  std::vector<std::thread> workers;
  for (int w = 0; w < nwork; ++w) {
    workers.emplace_back([rx = q.second, tx = r.first, w]() mutable {
      for (int v : rx) {
        // Stir the FIFO-ish order, as Go's test does with Gosched.
        if (pn[w % 10] == v) std::this_thread::yield();
        if (!tx.send(v).ok()) ++g_thread_errors;
      }
    });
  }
  q.second.reset();
  r.first.reset();  // the workers hold the last senders of r: it closes when they end
  std::int64_t expect = 0;
  std::thread feeder([&, tx = std::move(q.first)]() mutable {
    for (std::size_t i = 0; i < niter; ++i) {
      const int v = pn[i % 10];
      expect += v;
      if (!tx.send(v).ok()) ++g_thread_errors;
    }
  });  // tx destroyed with the thread's lambda: q closes, workers end
  std::size_t n = 0;
  std::int64_t s = 0;
  for (int v : r.second) {
    ++n;
    s += v;
  }
  feeder.join();
  for (auto& w : workers) w.join();
  CHECK(g_thread_errors == 0);
  CHECK(n == niter);
  CHECK(s == expect);
}

TEST_CASE("golang TestSelectDuplicateChannel: a select with the same channel twice leaves its list intact",
          "[select][golang]") {
  auto c = make_channel<int>(1);
  auto d = make_channel<int>(1);
  auto e = make_channel<int>(1);
  // A waits on c twice and on d.
  std::thread a([&] {
    auto r = runnel::select(recv_arm(c.second), recv_arm(c.second), recv_arm(d.second));
    if (r.index() != 2) ++g_thread_errors;
    if (!e.first.send(9).ok()) ++g_thread_errors;
  });
  std::this_thread::sleep_for(1ms);  // A (usually) parks first on c
  std::future<std::optional<int>> b = std::async(std::launch::async, [&] {
    return runnel::select(recv_arm(c.second)).get<0>();
  });
  std::this_thread::sleep_for(1ms);
  REQUIRE(d.first.send(7).ok());  // wakes A, which takes its wakers off c
  REQUIRE(e.second.recv() == 9);
  REQUIRE(c.first.send(8).ok());  // must reach B
  REQUIRE(b.wait_for(20s) == std::future_status::ready);
  CHECK(b.get() == 8);
  a.join();
  CHECK(g_thread_errors == 0);
}
