// Tests for runnel::spsc_queue: the single-threaded contract (ring_contract.hpp),
// then one producer and one consumer thread with exact counts and strict FIFO
// for every operation form, and blocking runs in which one side parks.
#include <runnel/spsc_queue.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "ring_contract.hpp"
#include "test_support.hpp"

using runnel::spsc_queue;

// A throwing move is rejected by the static_assert in detail::ring_element
// when spsc_queue<T> is instantiated (a hard error; tests/stress/ holds the
// compile-fail check). Here: the trait it rests on.
static_assert(!std::is_nothrow_move_constructible_v<runnel_test::throwing_move>);
static_assert(runnel::detail::ring_element<std::unique_ptr<int>>);
static_assert(runnel::detail::ring_element<runnel_test::no_default>);

TEST_CASE("spsc_queue: copying overloads are constrained to copyable types", "[spsc_queue]") {
  ring_contract::check_overload_constraints<spsc_queue>();
  SUCCEED("checked at compile time");
}

// ---- single-threaded contract ------------------------------------------------

TEST_CASE("spsc_queue: capacity rounds up to a power of two", "[spsc_queue]") {
  ring_contract::check_capacity_rounding<spsc_queue>();
}

TEST_CASE("spsc_queue: capacity 1 holds exactly one value", "[spsc_queue]") {
  spsc_queue<int> q(1);
  REQUIRE(q.capacity() == 1);
  REQUIRE(q.try_push(7));
  REQUIRE_FALSE(q.try_push(8));
  REQUIRE(q.size_approx() == 1);
  REQUIRE(q.try_pop() == std::optional<int>(7));
  REQUIRE_FALSE(q.try_pop().has_value());
  ring_contract::check_wrap_around<spsc_queue>(1, 1000);
  ring_contract::check_wrap_around_bulk<spsc_queue>(1, 1000);
}

TEST_CASE("spsc_queue: bad capacities throw meaningful exceptions", "[spsc_queue]") {
  ring_contract::check_bad_capacity<spsc_queue>("runnel::spsc_queue");
}

TEST_CASE("spsc_queue: full and empty, move-only values", "[spsc_queue]") {
  for (std::size_t cap : {1u, 2u, 4u, 8u, 64u}) {
    INFO("capacity " << cap);
    ring_contract::check_full_and_empty<spsc_queue>(cap);
  }
  ring_contract::check_emplace_when_full<spsc_queue>();
}

TEST_CASE("spsc_queue: FIFO through 1000 laps of a small ring", "[spsc_queue]") {
  for (std::size_t cap : {2u, 4u, 8u}) {
    INFO("capacity " << cap);
    ring_contract::check_wrap_around<spsc_queue>(cap, 1000);
    ring_contract::check_wrap_around_bulk<spsc_queue>(cap, 1000);
  }
}

TEST_CASE("spsc_queue: bulk edge cases and prefix semantics", "[spsc_queue]") {
  ring_contract::check_bulk_edges<spsc_queue>();
}

TEST_CASE("spsc_queue: every push and pop form", "[spsc_queue]") {
  ring_contract::check_operation_forms<spsc_queue>();
  ring_contract::check_throwing_copy<spsc_queue>();
}

TEST_CASE("spsc_queue: non-default-constructible elements", "[spsc_queue]") {
  ring_contract::check_non_default_constructible<spsc_queue>();
}

namespace {
// Construction from an int throws for negative values; move is noexcept.
struct picky {
  static inline std::atomic<long> live{0};
  int v;
  explicit picky(int x) : v(x) {
    if (x < 0) throw std::domain_error("negative");
    ++live;
  }
  picky(picky&& o) noexcept : v(o.v) { ++live; }
  picky& operator=(picky&&) noexcept = default;
  ~picky() { --live; }
};
}  // namespace

TEST_CASE("spsc_queue: try_emplace with a throwing constructor leaves the queue unchanged", "[spsc_queue]") {
  // spsc_queue allows a throwing constructor in try_emplace: only the
  // producer writes the tail, so the claimed slot is simply not published.
  static_assert(!noexcept(std::declval<spsc_queue<picky>&>().try_emplace(1)));
  picky::live = 0;
  {
    spsc_queue<picky> q(2);
    REQUIRE(q.try_emplace(1));
    REQUIRE_THROWS_AS(q.try_emplace(-1), std::domain_error);
    REQUIRE(q.size_approx() == 1);
    REQUIRE(q.try_emplace(2));
    REQUIRE_FALSE(q.try_emplace(3));
    REQUIRE(q.try_pop()->v == 1);
    REQUIRE_THROWS_AS(q.try_emplace(-2), std::domain_error);  // into the wrapped slot
    REQUIRE(q.try_emplace(4));
    REQUIRE(q.try_pop()->v == 2);
    REQUIRE(q.try_pop()->v == 4);
    REQUIRE_FALSE(q.try_pop().has_value());
    REQUIRE(q.try_emplace(5));  // left for the destructor
  }
  REQUIRE(picky::live == 0);
}

TEST_CASE("spsc_queue: element lifetimes balance, including values left queued", "[spsc_queue]") {
  SECTION("empty at destruction") { ring_contract::check_lifetimes<spsc_queue, struct lt0>(4, 0, 50); }
  SECTION("partly full, wrapped") { ring_contract::check_lifetimes<spsc_queue, struct lt1>(8, 5, 37); }
  SECTION("full at destruction") { ring_contract::check_lifetimes<spsc_queue, struct lt2>(16, 16, 9); }
  SECTION("capacity 1") { ring_contract::check_lifetimes<spsc_queue, struct lt3>(1, 1, 20); }
  SECTION("never used") {
    using T = runnel_test::tracked<struct lt4>;
    T::counts().reset();
    { spsc_queue<T> q(64); }
    REQUIRE(T::counts().constructed == 0);
  }
}

// ---- one producer thread, one consumer thread --------------------------------

namespace {

enum class side { try_spin, blocking, bulk };

const char* side_name(side s) {
  switch (s) {
    case side::try_spin: return "try";
    case side::blocking: return "blocking";
    default: return "bulk";
  }
}

struct result {
  std::uint64_t received = 0;
  std::uint64_t out_of_order = 0;  // values that were not exactly the next one
  std::uint64_t first_bad = 0;
};

// Sends 0..n-1 with the producer form `ps` and receives with `cs`. FIFO for
// one producer means the consumer must see exactly 0, 1, 2, ...: that checks
// exactly-once and order in one comparison per value. `pause_every` (if not
// 0) makes one side sleep now and then so the other parks.
result run_pair(std::uint64_t n, std::size_t cap, side ps, side cs, bool slow_consumer = false,
                std::uint64_t pause_every = 0) {
  spsc_queue<std::uint64_t> q(cap);
  result r;
  const auto pause = [] { std::this_thread::sleep_for(std::chrono::microseconds(200)); };
  std::thread producer([&] {
    std::uint64_t batch[40];
    std::uint64_t s = 0;
    std::size_t round = 0;
    while (s < n) {
      if (pause_every != 0 && !slow_consumer && s % pause_every == 0) pause();
      switch (ps) {
        case side::try_spin: {
          std::uint64_t v = s;
          while (!q.try_push(std::move(v))) std::this_thread::yield();
          ++s;
          break;
        }
        case side::blocking:
          if (s % 2 == 0) q.push(std::uint64_t{s});
          else q.push(static_cast<const std::uint64_t&>(s));
          ++s;
          break;
        case side::bulk: {
          std::size_t want = std::min<std::uint64_t>(1 + round++ % 40, n - s);
          // A slow producer pauses on multiples of pause_every: stop there.
          if (pause_every != 0 && !slow_consumer)
            want = std::min<std::uint64_t>(want, pause_every - s % pause_every);
          for (std::size_t i = 0; i < want; ++i) batch[i] = s + i;
          std::size_t done = 0;
          while (done < want) {
            const std::size_t k = q.try_push_n(batch + done, want - done);
            if (k == 0) std::this_thread::yield();
            done += k;
          }
          s += want;
          break;
        }
      }
    }
  });
  std::thread consumer([&] {
    std::uint64_t batch[40];
    std::size_t round = 0;
    const auto take = [&](std::uint64_t v) {
      if (v != r.received && r.out_of_order++ == 0) r.first_bad = v;
      ++r.received;
    };
    while (r.received < n) {
      if (pause_every != 0 && slow_consumer && r.received % pause_every == 0) pause();
      switch (cs) {
        case side::try_spin: {
          std::uint64_t v = 0;
          if (r.received % 2 == 0 ? q.try_pop(v) : [&] {
                auto o = q.try_pop();
                if (o) v = *o;
                return o.has_value();
              }()) {
            take(v);
          } else {
            std::this_thread::yield();
          }
          break;
        }
        case side::blocking: take(q.pop()); break;
        case side::bulk: {
          const std::size_t k = q.try_pop_n(batch, 1 + round++ % 40);
          for (std::size_t i = 0; i < k; ++i) take(batch[i]);
          if (k == 0) std::this_thread::yield();
          break;
        }
      }
    }
  });
  producer.join();
  consumer.join();
  CHECK(q.empty_approx());
  CHECK_FALSE(q.try_pop().has_value());
  return r;
}

void check_pair(std::uint64_t n, std::size_t cap, side ps, side cs, bool slow_consumer = false,
                std::uint64_t pause_every = 0) {
  INFO("producer " << side_name(ps) << ", consumer " << side_name(cs) << ", capacity " << cap << ", "
                   << n << " values");
  const result r = run_pair(n, cap, ps, cs, slow_consumer, pause_every);
  REQUIRE(r.received == n);
  INFO("first value out of place: " << r.first_bad);
  REQUIRE(r.out_of_order == 0);
}

}  // namespace

TEST_CASE("spsc_queue: exact count and order, try_push/try_pop", "[spsc_queue][mt]") {
  check_pair(runnel_test::scaled(2'000'000), 64, side::try_spin, side::try_spin);
  check_pair(runnel_test::scaled(200'000), 1, side::try_spin, side::try_spin);
}

TEST_CASE("spsc_queue: exact count and order, blocking push/pop", "[spsc_queue][mt]") {
  check_pair(runnel_test::scaled(2'000'000), 64, side::blocking, side::blocking);
  check_pair(runnel_test::scaled(100'000), 1, side::blocking, side::blocking);
}

TEST_CASE("spsc_queue: exact count and order, try_push_n/try_pop_n", "[spsc_queue][mt]") {
  check_pair(runnel_test::scaled(2'000'000), 64, side::bulk, side::bulk);
  check_pair(runnel_test::scaled(200'000), 2, side::bulk, side::bulk);
}

TEST_CASE("spsc_queue: exact count and order, mixed forms", "[spsc_queue][mt]") {
  const auto n = runnel_test::scaled(300'000);
  check_pair(n, 16, side::bulk, side::blocking);
  check_pair(n, 16, side::blocking, side::bulk);
  check_pair(n, 16, side::try_spin, side::blocking);
  check_pair(n, 16, side::blocking, side::try_spin);
}

TEST_CASE("spsc_queue: the producer parks on full while the consumer is slow", "[spsc_queue][mt][parking]") {
  const std::uint64_t n = runnel_test::under_sanitizer ? 10'000 : 50'000;
  check_pair(n, 16, side::blocking, side::blocking, true, 40);
  check_pair(n / 5, 1, side::blocking, side::blocking, true, 7);
  // The parked producer woken by try_pop_n.
  check_pair(n, 16, side::blocking, side::bulk, true, 40);
}

TEST_CASE("spsc_queue: the consumer parks on empty while the producer is slow", "[spsc_queue][mt][parking]") {
  const std::uint64_t n = runnel_test::under_sanitizer ? 10'000 : 50'000;
  check_pair(n, 16, side::blocking, side::blocking, false, 40);
  check_pair(n / 5, 1, side::blocking, side::blocking, false, 7);
  // The parked consumer woken by try_push_n.
  check_pair(n, 16, side::bulk, side::blocking, false, 40);
}

TEST_CASE("spsc_queue: tracked values across threads, none leaked", "[spsc_queue][mt]") {
  using T = runnel_test::tracked<struct spsc_mt_tag>;
  T::counts().reset();
  const long n = static_cast<long>(runnel_test::scaled(200'000));
  long bad = 0;
  {
    spsc_queue<T> q(32);
    std::thread producer([&] {
      for (long i = 0; i < n; ++i) q.push(T(i));
    });
    // Leave the last 10 values in the queue for the destructor.
    for (long i = 0; i < n - 10; ++i)
      if (q.pop().value() != i) ++bad;
    producer.join();
    REQUIRE(q.size_approx() == 10);
    REQUIRE(T::counts().live == 10);
  }
  REQUIRE(bad == 0);
  REQUIRE(T::counts().live == 0);
  REQUIRE(T::counts().constructed == T::counts().destroyed);
  REQUIRE(T::counts().bad_destroys == 0);
  REQUIRE(T::counts().use_after_move == 0);
}
