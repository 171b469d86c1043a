// Tests for runnel channels: Go/crossbeam-style semantics (close, drain,
// hand-back of unsent values, last handle closes, timeouts), exact-count
// many-to-many runs with per-sender order (also oversubscribed), the close
// race, and the parking hooks the pipeline uses.
#include <runnel/channel.hpp>
#include <runnel/thread_pool.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <future>
#include <iterator>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "stall_gate.hpp"
#include "test_support.hpp"

using namespace std::chrono_literals;
using runnel::channel_status;
using runnel::make_channel;

namespace {

// Catch2 assertions are not thread-safe: other threads count failures here
// and the test thread checks the count after joining.
std::atomic<int> g_thread_errors{0};

}  // namespace

TEST_CASE("channel: basic send and receive, capacity rounding", "[channel]") {
  auto [tx, rx] = make_channel<int>(5);
  CHECK(tx.capacity() == 8);
  CHECK(rx.capacity() == 8);
  for (int i = 0; i < 8; ++i) REQUIRE(tx.try_send(i).ok());
  auto full = tx.try_send(99);
  CHECK(full.status() == channel_status::full);
  REQUIRE(full.value().has_value());
  CHECK(*full.value() == 99);
  CHECK(rx.size_approx() == 8);
  for (int i = 0; i < 8; ++i) {
    auto r = rx.try_recv();
    REQUIRE(r.ok());
    CHECK(*r == i);
  }
  CHECK(rx.try_recv().status() == channel_status::empty);
  CHECK_THROWS_AS(make_channel<int>(0), std::invalid_argument);
}

TEST_CASE("channel: a failed send hands a move-only value back intact", "[channel]") {
  // A capacity-1 request gets two cells (capacity() tells): fill them.
  auto [tx, rx] = make_channel<std::unique_ptr<int>>(1);
  REQUIRE(tx.capacity() == 2);
  REQUIRE(tx.try_send(std::make_unique<int>(1)).ok());
  REQUIRE(tx.try_send(std::make_unique<int>(10)).ok());
  auto r = tx.try_send(std::make_unique<int>(2));
  REQUIRE(r.status() == channel_status::full);
  REQUIRE(r.value());
  REQUIRE(*r.value());
  CHECK(**r.value() == 2);

  auto t = tx.send_for(std::make_unique<int>(3), 1ms);
  REQUIRE(t.status() == channel_status::timeout);
  REQUIRE(*t.value());
  CHECK(**t.value() == 3);

  tx.close();
  auto c = tx.send(std::make_unique<int>(4));
  REQUIRE(c.status() == channel_status::closed);
  REQUIRE(*c.value());
  CHECK(**c.value() == 4);
  auto c2 = tx.try_send(std::make_unique<int>(5));
  CHECK(c2.status() == channel_status::closed);
  CHECK(**c2.value() == 5);

  // The value sent before close is still delivered, then the end.
  auto got = rx.recv();
  REQUIRE(got);
  CHECK(**got == 1);
  CHECK(**rx.recv() == 10);
  CHECK_FALSE(rx.recv().has_value());
  CHECK(rx.try_recv().status() == channel_status::closed);
  CHECK(rx.recv_for(1ms).status() == channel_status::closed);
}

TEST_CASE("channel: recv drains what was sent before close, then ends", "[channel]") {
  auto [tx, rx] = make_channel<std::string>(16);
  for (int i = 0; i < 10; ++i) REQUIRE(tx.send(std::to_string(i)).ok());
  tx.close();
  CHECK(tx.is_closed());
  CHECK(rx.is_closed());
  int n = 0;
  for (std::string& s : rx) CHECK(s == std::to_string(n++));
  CHECK(n == 10);
  CHECK_FALSE(rx.recv());
}

TEST_CASE("channel: close wakes every blocked receiver", "[channel]") {
  auto [tx, rx] = make_channel<int>(4);
  std::atomic<int> ended{0};
  std::vector<std::thread> ts;
  for (int i = 0; i < 4; ++i) {
    ts.emplace_back([rx = rx, &ended]() mutable {
      if (!rx.recv()) ++ended;
    });
  }
  // Let them block (correctness does not depend on it; it makes the wake path
  // the one exercised).
  std::this_thread::sleep_for(20ms);
  tx.close();
  for (auto& t : ts) t.join();
  CHECK(ended == 4);
}

TEST_CASE("channel: close wakes every blocked sender and hands values back", "[channel]") {
  auto [tx, rx] = make_channel<int>(1);
  REQUIRE(tx.try_send(0).ok());
  REQUIRE(tx.try_send(0).ok());
  std::atomic<int> handed_back{0};
  std::vector<std::thread> ts;
  for (int i = 1; i <= 4; ++i) {
    ts.emplace_back([tx = tx, i, &handed_back]() mutable {
      auto r = tx.send(i);
      if (r.status() == channel_status::closed && r.value() && *r.value() == i) ++handed_back;
    });
  }
  std::this_thread::sleep_for(20ms);
  rx.close();
  for (auto& t : ts) t.join();
  CHECK(handed_back == 4);
  CHECK(*rx.recv() == 0);
  CHECK(*rx.recv() == 0);
  CHECK_FALSE(rx.recv());
}

TEST_CASE("channel: the last sender or the last receiver going away closes", "[channel]") {
  SECTION("senders") {
    auto [tx, rx] = make_channel<int>(4);
    auto tx2 = tx;
    REQUIRE(tx.send(1).ok());
    tx.reset();
    CHECK_FALSE(rx.is_closed());
    REQUIRE(tx2.send(2).ok());
    bool sent = false;
    std::thread t([tx3 = std::move(tx2), &sent]() mutable { sent = tx3.send(3).ok(); });
    t.join();
    CHECK(sent);  // the thread's handle was the last one
    CHECK(rx.is_closed());
    CHECK(*rx.recv() == 1);
    CHECK(*rx.recv() == 2);
    CHECK(*rx.recv() == 3);
    CHECK_FALSE(rx.recv());
  }
  SECTION("receivers") {
    auto [tx, rx] = make_channel<int>(1);
    REQUIRE(tx.send(1).ok());
    REQUIRE(tx.send(1).ok());
    bool handed_back = false;
    std::thread blocked([&tx = tx, &handed_back] {
      auto r = tx.send(2);  // full: blocks until the last receiver goes
      handed_back = r.status() == channel_status::closed && *r.value() == 2;
    });
    std::this_thread::sleep_for(10ms);
    { auto moved = std::move(rx); }
    blocked.join();
    CHECK(handed_back);
    CHECK(tx.is_closed());
  }
  SECTION("copy assignment keeps counts right") {
    auto [tx, rx] = make_channel<int>(1);
    auto [tx2, rx2] = make_channel<int>(1);
    tx2 = tx;  // tx2's old channel loses its only sender
    CHECK(rx2.is_closed());
    CHECK_FALSE(rx.is_closed());
    tx.reset();
    CHECK_FALSE(rx.is_closed());
    tx2.reset();
    CHECK(rx.is_closed());
  }
}

TEST_CASE("channel: empty handles throw instead of crashing", "[channel]") {
  runnel::sender<int> tx;
  runnel::receiver<int> rx;
  CHECK_FALSE(tx.valid());
  CHECK_THROWS_AS(tx.try_send(1), std::logic_error);
  CHECK_THROWS_AS(rx.try_recv(), std::logic_error);
  auto [a, b] = make_channel<int>(1);
  auto moved = std::move(a);
  CHECK_THROWS_AS(a.send(1), std::logic_error);
  CHECK(moved.send(1).ok());
}

TEST_CASE("channel: timeouts", "[channel]") {
  auto [tx, rx] = make_channel<int>(2);
  auto r = rx.recv_for(2ms);
  CHECK(r.status() == channel_status::timeout);
  CHECK_FALSE(r.value());
  bool sent = false;
  std::thread t([&tx = tx, &sent] {
    std::this_thread::sleep_for(5ms);
    sent = tx.send(7).ok();
  });
  auto g = rx.recv_for(60s);  // arrives long before
  t.join();
  CHECK(sent);
  REQUIRE(g.ok());
  CHECK(*g == 7);
  REQUIRE(tx.try_send(1).ok());
  REQUIRE(tx.try_send(2).ok());
  auto s = tx.send_for(3, 2ms);
  CHECK(s.status() == channel_status::timeout);
  CHECK(*s.value() == 3);
  int first = 0;
  std::thread u([&rx = rx, &first] {
    std::this_thread::sleep_for(5ms);
    first = *rx.recv();
  });
  CHECK(tx.send_for(3, 60s).ok());
  u.join();
  CHECK(first == 1);
}

TEST_CASE("channel: values left in a dropped channel are destroyed once", "[channel]") {
  struct tag {};
  using item = runnel_test::tracked<tag>;
  item::counts().reset();
  {
    auto [tx, rx] = make_channel<item>(8);
    for (int i = 0; i < 5; ++i) REQUIRE(tx.try_send(item(i)).ok());
    auto r = rx.try_recv();
    REQUIRE(r.ok());
    CHECK(r->value() == 0);
  }
  CHECK(item::counts().live == 0);
  CHECK(item::counts().bad_destroys == 0);
  CHECK(item::counts().use_after_move == 0);
}

namespace {

// S senders x R receivers, every value (sender, seq) received exactly once,
// each receiver sees each sender's values in increasing order.
void many_to_many(std::size_t senders, std::size_t receivers, std::size_t per_sender,
                  std::size_t capacity, bool use_try) {
  auto [tx, rx] = make_channel<std::uint64_t>(capacity);
  std::vector<std::atomic<std::uint32_t>> seen(senders * per_sender);
  std::atomic<std::size_t> received{0};
  std::atomic<std::size_t> order_errors{0};
  std::vector<std::thread> ts;
  for (std::size_t s = 0; s < senders; ++s) {
    ts.emplace_back([tx = tx, s, per_sender, use_try]() mutable {
      for (std::size_t i = 0; i < per_sender; ++i) {
        std::uint64_t v = (std::uint64_t{s} << 32) | i;
        if (use_try && (i & 1)) {
          for (;;) {
            auto r = tx.try_send(v);
            if (r.ok()) break;
            if (r.status() != channel_status::full) ++g_thread_errors;
            v = *r.value();
            std::this_thread::yield();
          }
        } else {
          if (!tx.send(v).ok()) ++g_thread_errors;
        }
      }
    });
  }
  tx.reset();  // the senders' copies are the last ones: they close on exit
  for (std::size_t r = 0; r < receivers; ++r) {
    ts.emplace_back([rx = rx, &seen, &received, &order_errors, senders, per_sender, use_try]() mutable {
      std::vector<std::int64_t> last(senders, -1);
      auto take = [&](std::uint64_t v) {
        const std::size_t s = v >> 32, i = v & 0xffffffffu;
        if (static_cast<std::int64_t>(i) <= last[s]) ++order_errors;
        last[s] = static_cast<std::int64_t>(i);
        seen[s * per_sender + i].fetch_add(1);
        ++received;
      };
      if (use_try) {
        std::uint64_t buf[16];
        for (;;) {
          const std::size_t k = rx.try_recv_n(buf, 16).count();
          for (std::size_t j = 0; j < k; ++j) take(buf[j]);
          if (k != 0) continue;
          auto r = rx.recv_for(1ms);
          if (r.ok()) take(*r);
          else if (r.closed()) break;
        }
      } else {
        for (std::uint64_t v : rx) take(v);
      }
    });
  }
  rx.reset();
  for (auto& t : ts) t.join();
  CHECK(g_thread_errors == 0);
  CHECK(received == senders * per_sender);
  CHECK(order_errors == 0);
  std::size_t wrong = 0;
  for (auto& c : seen) wrong += c.load() != 1;
  CHECK(wrong == 0);
}

}  // namespace

TEST_CASE("channel: many senders and receivers, exact counts, per-sender order", "[channel]") {
  const std::size_t n = runnel_test::scaled(100000);
  SECTION("1x1") { many_to_many(1, 1, n, 64, false); }
  SECTION("4x4 small capacity") { many_to_many(4, 4, n / 4, 4, false); }
  SECTION("8x8 oversubscribed, try forms mixed in") { many_to_many(8, 8, n / 8, 16, true); }
  SECTION("8x8 oversubscribed, capacity 1") { many_to_many(8, 8, n / 16, 1, false); }
  SECTION("2x8") { many_to_many(2, 8, n / 2, 32, false); }
}

TEST_CASE("channel: the close race neither loses values nor delivers after the end",
          "[channel]") {
  const int rounds = static_cast<int>(runnel_test::scaled(400));
  for (int round = 0; round < rounds; ++round) {
    auto [tx, rx] = make_channel<int>(8);
    std::atomic<long> accepted{0}, handed_back{0}, received{0}, late{0};
    std::vector<std::thread> ts;
    for (int s = 0; s < 3; ++s) {
      ts.emplace_back([tx = tx, &accepted, &handed_back]() mutable {
        for (int i = 0;; ++i) {
          auto r = (i & 1) ? tx.try_send(i) : tx.send_for(i, 1ms);
          if (r.ok()) {
            ++accepted;
          } else if (r.status() == channel_status::closed) {
            if (r.value() && *r.value() == i) ++handed_back;
            return;
          }
        }
      });
    }
    for (int r = 0; r < 2; ++r) {
      ts.emplace_back([rx = rx, &received, &late]() mutable {
        while (rx.recv()) ++received;
        // The end was reported: nothing may show up afterwards.
        for (int k = 0; k < 100; ++k) {
          auto again = rx.try_recv();
          if (again.ok()) ++late;
          if (!again.closed()) ++late;
        }
      });
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50 * (round % 7)));
    if (round & 1) tx.close(); else rx.close();
    for (auto& t : ts) t.join();
    CHECK(handed_back == 3);
    CHECK(late == 0);
    REQUIRE(received == accepted);
  }
}

// ---- parking hooks ---------------------------------------------------------

namespace {

struct counting_waker : runnel::detail::waker {
  std::atomic<int> woken{0};
  counting_waker() {
    wake = [](runnel::detail::waker* w) noexcept {
      static_cast<counting_waker*>(w)->woken.fetch_add(1);
    };
  }
};

}  // namespace

TEST_CASE("channel: task parking hooks wake exactly once", "[channel]") {
  auto s = std::make_shared<runnel::detail::channel_state<int>>(2);
  counting_waker w;
  SECTION("receiver parks on empty, woken by a send") {
    REQUIRE(s->park_receiver(w));
    int v = 1;
    REQUIRE(s->try_send(v) == channel_status::ok);
    CHECK(w.woken == 1);
    v = 2;
    REQUIRE(s->try_send(v) == channel_status::ok);
    CHECK(w.woken == 1);  // no longer registered
    // Non-empty: parking is refused.
    CHECK_FALSE(s->park_receiver(w));
  }
  SECTION("sender parks on full, woken by a receive") {
    int a = 1, b = 2;
    REQUIRE(s->try_send(a) == channel_status::ok);
    REQUIRE(s->try_send(b) == channel_status::ok);
    REQUIRE(s->park_sender(w));
    std::optional<int> out;
    REQUIRE(s->try_recv(out) == channel_status::ok);
    CHECK(w.woken == 1);
    CHECK_FALSE(s->park_sender(w));
  }
  SECTION("close wakes parked receivers and senders; unpark takes a waker back") {
    counting_waker w2, w3;
    REQUIRE(s->park_receiver(w));
    REQUIRE(s->park_receiver(w2));
    REQUIRE(s->park_receiver(w3));
    CHECK(s->unpark(w3));
    CHECK_FALSE(s->unpark(w3));
    s->close();
    CHECK(w.woken == 1);
    CHECK(w2.woken == 1);
    CHECK(w3.woken == 0);
    CHECK_FALSE(s->park_receiver(w));  // closed and drained: nothing to wait for
  }
}

TEST_CASE("channel: task parking has no lost wake-up under contention", "[channel]") {
  // A "task" thread that only ever parks (never blocks on the channel): it
  // drains, parks, and waits for its waker before draining again.
  const std::size_t n = runnel_test::scaled(200000);
  // Both fence flavours: asymmetric (user channels) and symmetric (channels
  // between pipeline nodes).
  const bool task_heavy = GENERATE(false, true);
  auto s = std::make_shared<runnel::detail::channel_state<std::size_t>>(16, task_heavy);
  struct flag_waker : runnel::detail::waker {
    std::atomic<std::uint32_t> flag{0};
    flag_waker() {
      wake = [](runnel::detail::waker* w) noexcept {
        auto* self = static_cast<flag_waker*>(w);
        self->flag.store(1);
        self->flag.notify_one();
      };
    }
  } w;
  std::thread producer([&] {
    for (std::size_t i = 0; i < n; ++i) {
      std::size_t v = i;
      if (s->send(v) != channel_status::ok) ++g_thread_errors;
    }
    s->close();
  });
  std::size_t expect = 0;
  bool bad_order = false;
  for (;;) {
    const auto k = s->try_recv_n([&](std::size_t v) noexcept {
      bad_order |= v != expect;
      ++expect;
    }, 64);
    if (!k) break;
    if (*k != 0) continue;
    w.flag.store(0);
    if (s->park_receiver(w)) w.flag.wait(0);  // would hang on a lost wake-up
  }
  producer.join();
  CHECK(g_thread_errors == 0);
  CHECK_FALSE(bad_order);
  CHECK(expect == n);
}

// ---- linearizable try-operations --------------------------------------------
//
// A cell claimed by an operation still in progress (a sender moving its value
// in, a receiver moving one out) must not make the channel look empty (full)
// while completed sends (free cells) exist: the try-operations wait for the
// operation in progress, as crossbeam's array channel does.

namespace {

// A value whose move takes a while (`pauses` processor pauses), so that sends
// spend time between claim and publish and receives between claim and
// release: where a close can land, and where a non-linearizable try-operation
// would see a claimed cell. Moves of different lengths let a later operation
// overtake an earlier one, which is what exposes such a try-operation.
struct slow_move {
  int v = 0;
  int pauses = 64;
  slow_move() noexcept = default;
  explicit slow_move(int x, int p = 64) noexcept : v(x), pauses(p) {}
  slow_move(slow_move&& o) noexcept : v(o.v), pauses(o.pauses) {
    for (int i = 0; i < pauses; ++i) runnel::detail::cpu_relax();
  }
  slow_move& operator=(slow_move&& o) noexcept {
    v = o.v;
    pauses = o.pauses;
    return *this;
  }
};

}  // namespace

TEST_CASE("channel: a thread's try_recv after its own completed send is never empty",
          "[channel][linearizable]") {
  // Every thread alternates send; try_recv. When a thread's send has
  // completed, the values sent so far outnumber the receives that have
  // claimed one, so a linearizable try_recv must find a value. The threads'
  // sends keep claiming cells that others' try_recv must wait past.
  const std::size_t threads = GENERATE(4u, 8u);  // 8: oversubscribed
  const std::size_t pairs = runnel_test::scaled(100000);
  auto [tx, rx] = make_channel<slow_move>(4);
  std::atomic<std::size_t> empties{0}, closed{0}, received{0};
  runnel_test::run_threads(threads, [&, tx = tx, rx = rx](std::size_t t) mutable {
    for (std::size_t i = 0; i < pairs / threads; ++i) {
      // Every few sends one moves slowly, and the other threads' sends
      // overtake it (all threads slow down alike, so they stay together).
      const int pauses = i % threads == t ? 200 : 0;
      if (!tx.send(slow_move(static_cast<int>(t), pauses)).ok()) ++g_thread_errors;
      auto r = rx.try_recv();
      if (r.ok()) {
        ++received;
      } else {
        if (r.status() == channel_status::empty) ++empties;
        else ++closed;
        // Take the value anyway, so that the channel stays near empty for
        // the others (a value left over would hide the next claimed cell).
        if (rx.recv()) ++received;
      }
    }
  });
  CHECK(g_thread_errors == 0);
  CHECK(empties == 0);
  CHECK(closed == 0);
  CHECK(received == pairs / threads * threads);
  CHECK(rx.try_recv().status() == channel_status::empty);
}

TEST_CASE("channel: a thread's try_send after its own completed recv is never full",
          "[channel][linearizable]") {
  const std::size_t threads = GENERATE(4u, 8u);  // 8: oversubscribed
  const std::size_t pairs = runnel_test::scaled(100000);
  auto [tx, rx] = make_channel<slow_move>(4);
  for (int v = 0; v < 4; ++v) REQUIRE(tx.try_send(slow_move(v, 0)).ok());
  std::atomic<std::size_t> fulls{0}, sent{0};
  runnel_test::run_threads(threads, [&, tx = tx, rx = rx](std::size_t t) mutable {
    for (std::size_t i = 0; i < pairs / threads; ++i) {
      if (!rx.recv()) ++g_thread_errors;
      // Every few values one moves slowly, and receives of the others
      // overtake its receive.
      const int pauses = i % threads == t ? 200 : 0;
      auto r = tx.try_send(slow_move(static_cast<int>(t), pauses));
      if (r.ok()) {
        ++sent;
      } else {
        if (r.status() == channel_status::full) ++fulls;
        else ++g_thread_errors;
        // Keep the count of values in the channel at 4 for the others.
        if (!tx.send(std::move(*r.value())).ok()) ++g_thread_errors;
      }
    }
  });
  CHECK(g_thread_errors == 0);
  CHECK(fulls == 0);
  CHECK(sent == pairs / threads * threads);
  CHECK(rx.size_approx() == 4);
}

TEST_CASE("channel: a sender stalled in its move constructor hides no completed send",
          "[channel][linearizable]") {
  using runnel_test::stalling;
  runnel_test::stall_gate gate;
  auto [tx, rx] = make_channel<stalling>(8);
  gate.armed = true;
  // Its cell is claimed first; the value is moved in (and stops there) after.
  // (jthread: a failed REQUIRE below must still release and join it.)
  std::jthread slow([&gate, tx = tx]() mutable {
    if (!tx.send(stalling(0, &gate)).ok()) ++g_thread_errors;
  });
  gate.wait_entered();
  for (int i = 1; i <= 3; ++i) REQUIRE(tx.send(stalling(i, nullptr)).ok());
  // Documented: size_approx counts the send in progress.
  CHECK(rx.size_approx() == 4);
  int next = 1;  // the first value the checks after the sections expect

  SECTION("try_recv waits for the value on its way, then takes the rest in order") {
    runnel_test::delayed_release rel(gate);
    auto r = rx.try_recv();
    REQUIRE(r.ok());
    CHECK(r->value == 0);
  }
  SECTION("recv_for does not time out while completed sends are queued") {
    runnel_test::delayed_release rel(gate);
    auto r = rx.recv_for(1ms);
    REQUIRE(r.ok());
    CHECK(r->value == 0);
  }
  SECTION("try_recv_n waits likewise and takes everything behind it") {
    runnel_test::delayed_release rel(gate);
    stalling got[4];
    auto r = rx.try_recv_n(got, 4);
    REQUIRE(r.ok());
    REQUIRE(r.count() == 4);
    for (int i = 0; i < 4; ++i) CHECK(got[i].value == i);
    next = 4;
  }
  slow.join();
  for (int i = next; i <= 3; ++i) {
    auto r = rx.try_recv();
    REQUIRE(r.ok());
    CHECK(r->value == i);
  }
  CHECK(rx.try_recv().status() == channel_status::empty);
  CHECK(g_thread_errors == 0);
}

TEST_CASE("channel: a receiver stalled in its move constructor does not make a channel with room look full",
          "[channel][linearizable]") {
  using runnel_test::stalling;
  runnel_test::stall_gate gate;
  auto [tx, rx] = make_channel<stalling>(4);
  for (int i = 0; i < 4; ++i) REQUIRE(tx.try_send(stalling(i, &gate)).ok());
  gate.armed = true;
  // Claims the oldest value, then stops while moving it out.
  std::jthread slow([rx = rx]() mutable {
    auto r = rx.try_recv();
    if (!r.ok() || r->value != 0) ++g_thread_errors;
  });
  gate.wait_entered();
  SECTION("try_send") {
    runnel_test::delayed_release rel(gate);
    CHECK(tx.try_send(stalling(4, nullptr)).ok());
  }
  SECTION("send_for") {
    runnel_test::delayed_release rel(gate);
    CHECK(tx.send_for(stalling(4, nullptr), 1ms).ok());
  }
  slow.join();
  for (int i = 1; i <= 4; ++i) {
    auto r = rx.try_recv();
    REQUIRE(r.ok());
    CHECK(r->value == i);
  }
  CHECK(g_thread_errors == 0);
}

TEST_CASE("channel: blocking recv does not sleep while completed sends are queued",
          "[channel][linearizable]") {
  // recv() spins with a lock-free try that cannot see past the stalled
  // cell; the check it makes before sleeping must. Each send wakes one
  // sleeper, so a receiver that slept again after a wake-up that found only
  // the stalled cell would wait for ever once the sends stop.
  using runnel_test::stalling;
  const int receivers = 4;
  for (int round = 0; round < static_cast<int>(runnel_test::scaled(20)); ++round) {
    runnel_test::stall_gate gate;
    auto [tx, rx] = make_channel<stalling>(16);
    gate.armed = true;
    std::jthread slow([&gate, tx = tx]() mutable {
      if (!tx.send(stalling(0, &gate)).ok()) ++g_thread_errors;
    });
    gate.wait_entered();
    std::atomic<int> sum{0};
    std::vector<std::jthread> ts;
    for (int c = 0; c < receivers; ++c)
      ts.emplace_back([&sum, rx = rx]() mutable {
        auto r = rx.recv();
        if (r) sum += r->value; else ++g_thread_errors;
      });
    // Let the receivers park on the stalled cell (not required for the test
    // to pass, only for it to mean something).
    std::this_thread::sleep_for(2ms);
    for (int i = 1; i < receivers; ++i) REQUIRE(tx.send(stalling(i, nullptr)).ok());
    std::this_thread::sleep_for(2ms);
    gate.release();
    for (auto& t : ts) t.join();  // hangs if a receiver sleeps on a non-empty channel
    CHECK(sum == receivers * (receivers - 1) / 2);
  }
  CHECK(g_thread_errors == 0);
}

// ---- try_recv_n and the close race ------------------------------------------

TEST_CASE("channel: try_recv_n reports closed only when nothing more will arrive",
          "[channel]") {
  // Receivers poll with try_recv_n only and stop on its closed status; every
  // value a send reported as accepted must have been received by then, and
  // the status must stay closed.
  const int rounds = static_cast<int>(runnel_test::scaled(600));
  for (int round = 0; round < rounds; ++round) {
    auto [tx, rx] = make_channel<slow_move>(8);
    std::atomic<long> accepted{0}, received{0}, late{0};
    std::vector<std::thread> ts;
    for (int s = 0; s < 3; ++s) {
      ts.emplace_back([tx = tx, &accepted]() mutable {
        for (int i = 0;; ++i) {
          auto r = (i & 1) ? tx.try_send(slow_move(i, 400)) : tx.send_for(slow_move(i, 400), 1ms);
          if (r.ok()) ++accepted;
          else if (r.status() == channel_status::closed) return;
        }
      });
    }
    for (int r = 0; r < 2; ++r) {
      ts.emplace_back([rx = rx, &received, &late]() mutable {
        slow_move buf[4];
        for (;;) {
          const auto got = rx.try_recv_n(buf, 4);
          received += static_cast<long>(got.count());
          if (got.closed()) break;
          if (got.count() == 0) std::this_thread::yield();
        }
        for (int k = 0; k < 10; ++k) {
          const auto again = rx.try_recv_n(buf, 4);
          if (!again.closed() || again.count() != 0) ++late;
        }
      });
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50 * (round % 7)));
    if (round & 1) tx.close(); else rx.close();
    for (auto& t : ts) t.join();
    CHECK(late == 0);
    REQUIRE(received == accepted);
  }
}

// ---- huge and negative timeouts ------------------------------------------------

TEST_CASE("channel: huge timeouts mean no deadline and negative ones try once", "[channel]") {
  using std::chrono::hours;
  using std::chrono::nanoseconds;
  const auto now = std::chrono::steady_clock::now();
  CHECK(runnel::detail::deadline_after(hours::max()) == std::chrono::steady_clock::time_point::max());
  CHECK(runnel::detail::deadline_after(nanoseconds::max()) == std::chrono::steady_clock::time_point::max());
  CHECK(runnel::detail::deadline_after(std::chrono::duration<double>::max()) ==
        std::chrono::steady_clock::time_point::max());
  CHECK(runnel::detail::deadline_after(hours::min()) >= now);
  CHECK(runnel::detail::deadline_after(hours::min()) < std::chrono::steady_clock::time_point::max());
  CHECK(runnel::detail::deadline_after(hours(1)) > now + std::chrono::minutes(59));

  auto [tx, rx] = make_channel<int>(2);
  CHECK(rx.recv_for(hours::min()).status() == channel_status::timeout);
  CHECK(rx.recv_for(-1s).status() == channel_status::timeout);
  SECTION("recv_for(hours::max()) waits for the value") {
    std::thread t([tx = tx]() mutable {
      std::this_thread::sleep_for(5ms);
      if (!tx.send(7).ok()) ++g_thread_errors;
    });
    auto r = rx.recv_for(hours::max());
    t.join();
    REQUIRE(r.ok());
    CHECK(*r == 7);
  }
  SECTION("send_for(nanoseconds::max()) waits for room") {
    REQUIRE(tx.try_send(1).ok());
    REQUIRE(tx.try_send(2).ok());
    CHECK(tx.send_for(3, nanoseconds::min()).status() == channel_status::timeout);
    std::thread t([rx = rx]() mutable {
      std::this_thread::sleep_for(5ms);
      if (!rx.recv()) ++g_thread_errors;
    });
    CHECK(tx.send_for(3, nanoseconds::max()).ok());
    t.join();
  }
  CHECK(g_thread_errors == 0);
}

// A blocking recv/send on the only worker of a one-worker pool would stop
// every task of that pool, the partner included: it throws instead of
// hanging. The watchdog below turns a hang (the check missing) into a
// failure: after a generous wait it unblocks the call and fails the test.
TEST_CASE("blocking channel calls on the only worker of a one-worker pool throw instead of hanging", "[channel][pool]") {
  runnel::thread_pool one({.threads = 1});
  auto channel = runnel::make_channel<int>(1);
  auto& tx = channel.first;  // named references: lambdas may not capture structured bindings (clang 14)
  auto& rx = channel.second;
  auto expect_throw = [&](auto call, auto unblock) {
    std::future<bool> threw = one.submit([&] {
      try {
        call();
        return false;
      } catch (const std::logic_error& e) {
        return std::string(e.what()).find("one-worker pool") != std::string::npos;
      }
    });
    if (threw.wait_for(std::chrono::seconds(20)) != std::future_status::ready) {
      unblock();
      FAIL("the blocking call hung on the pool's only worker");
    }
    CHECK(threw.get());
  };
  expect_throw([&] { (void)rx.recv(); }, [&] { (void)tx.send(1); });
  expect_throw([&] { (void)rx.recv_for(std::chrono::hours(1)); }, [&] { (void)tx.send(1); });
  REQUIRE(tx.try_send(7).ok());  // the channel is full now
  expect_throw([&] { (void)tx.send(8); }, [&] { (void)rx.recv(); });
  expect_throw([&] { (void)tx.send_for(9, std::chrono::hours(1)); }, [&] { (void)rx.recv(); });
  // The try_ forms stay allowed, and on a pool of two workers blocking is
  // allowed (another worker can run the partner).
  CHECK(one.submit([&] { return rx.try_recv().value().value_or(-1); }).get() == 7);
  runnel::thread_pool two({.threads = 2});
  std::future<int> got = two.submit([&] { return rx.recv().value_or(-1); });
  REQUIRE(tx.send(5).ok());
  CHECK(got.get() == 5);
}
