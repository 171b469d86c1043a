// Single-threaded checks of the contract that runnel::mpmc_queue and
// runnel::spsc_queue share (see the comment at the top of mpmc_queue.hpp):
// full/empty, FIFO through many laps, the try/optional/bulk forms and their
// edge cases, move-only and non-default-constructible elements, element
// lifetimes, and bad capacities. Each test file instantiates them for its
// queue; the checks are templates over the queue template `Q`.
#pragma once

#include <catch2/catch.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "test_support.hpp"

namespace ring_contract {

using runnel_test::no_default;
using runnel_test::tracked;

// The copying overloads exist only for copyable T (they are constrained with
// `requires`), so pushing an lvalue of a move-only type does not compile.
template <template <class> class Q>
void check_overload_constraints() {
  using up = std::unique_ptr<int>;
  static_assert(!requires(Q<up>& q, const up& v) { q.try_push(v); },
                "a move-only lvalue must not be copied into the queue");
  static_assert(!requires(Q<up>& q, const up& v) { q.push(v); });
  static_assert(requires(Q<up>& q, up&& v) { q.try_push(std::move(v)); });
  static_assert(requires(Q<int>& q, const int& v) { q.try_push(v); });
  static_assert(requires(Q<no_default>& q) { q.try_emplace(3); });
  // The queues are neither copyable nor movable (threads hold references).
  static_assert(!std::is_copy_constructible_v<Q<int>>);
  static_assert(!std::is_copy_assignable_v<Q<int>>);
  // Construction needs an explicit capacity.
  static_assert(!std::is_default_constructible_v<Q<int>>);
  static_assert(!std::is_convertible_v<std::size_t, Q<int>>);
  static_assert(std::is_constructible_v<Q<int>, std::size_t>);
}

template <template <class> class Q>
void check_capacity_rounding() {
  const std::array<std::pair<std::size_t, std::size_t>, 8> cases{{
      {2, 2}, {3, 4}, {4, 4}, {5, 8}, {63, 64}, {64, 64}, {65, 128}, {1000, 1024}}};
  for (const auto& [requested, expected] : cases) {
    Q<int> q(requested);
    INFO("requested " << requested);
    REQUIRE(q.capacity() == expected);
    // The rounded capacity is real: exactly that many values fit.
    for (std::size_t i = 0; i < expected; ++i) REQUIRE(q.try_push(static_cast<int>(i)));
    REQUIRE_FALSE(q.try_push(-1));
    REQUIRE(q.size_approx() == expected);
    for (std::size_t i = 0; i < expected; ++i) REQUIRE(q.try_pop() == std::optional<int>(static_cast<int>(i)));
    REQUIRE_FALSE(q.try_pop().has_value());
  }
}

template <template <class> class Q>
void check_bad_capacity(const std::string& name) {
  using Catch::Matchers::Contains;
  REQUIRE_THROWS_AS(Q<int>(0), std::invalid_argument);
  REQUIRE_THROWS_WITH(Q<int>(0), Contains(name) && Contains("capacity must be at least 1"));

  // Sizes whose storage cannot be represented: the constructor must refuse
  // before allocating anything.
  struct big {
    char bytes[64];
  };
  const std::size_t too_big[] = {std::numeric_limits<std::size_t>::max(),
                                 std::numeric_limits<std::size_t>::max() / 2,
                                 (std::size_t{1} << 62) + 1, std::size_t{1} << 60};
  for (std::size_t n : too_big) {
    INFO("capacity " << n);
    REQUIRE_THROWS_AS(Q<big>(n), std::length_error);
    REQUIRE_THROWS_WITH(Q<big>(n), Contains(name) && Contains(std::to_string(n)) && Contains("too large"));
  }
  REQUIRE_THROWS_AS(Q<char>(std::numeric_limits<std::size_t>::max() / 2), std::length_error);
}

template <template <class> class Q>
void check_full_and_empty(std::size_t cap) {
  Q<std::unique_ptr<int>> q(cap);
  REQUIRE(q.capacity() == cap);
  REQUIRE(q.empty_approx());
  REQUIRE(q.size_approx() == 0);
  REQUIRE_FALSE(q.try_pop().has_value());
  std::unique_ptr<int> out = std::make_unique<int>(-7);
  REQUIRE_FALSE(q.try_pop(out));
  REQUIRE(*out == -7);  // a failed pop does not touch the target

  for (std::size_t i = 0; i < cap; ++i) {
    auto p = std::make_unique<int>(static_cast<int>(i));
    REQUIRE(q.try_push(std::move(p)));
    REQUIRE(p == nullptr);  // moved in
    REQUIRE(q.size_approx() == i + 1);
    REQUIRE_FALSE(q.empty_approx());
  }
  // Full: the value stays with the caller.
  auto extra = std::make_unique<int>(1234);
  REQUIRE_FALSE(q.try_push(std::move(extra)));
  REQUIRE(extra != nullptr);
  REQUIRE(*extra == 1234);
  REQUIRE(q.size_approx() == cap);

  // Pop in FIFO order with both forms.
  for (std::size_t i = 0; i < cap; ++i) {
    if (i % 2 == 0) {
      auto v = q.try_pop();
      REQUIRE(v.has_value());
      REQUIRE(**v == static_cast<int>(i));
    } else {
      REQUIRE(q.try_pop(out));
      REQUIRE(*out == static_cast<int>(i));
    }
    REQUIRE(q.size_approx() == cap - i - 1);
  }
  REQUIRE(q.empty_approx());
  REQUIRE_FALSE(q.try_pop().has_value());
  // The refused value can now go in.
  REQUIRE(q.try_push(std::move(extra)));
  REQUIRE(**q.try_pop() == 1234);
}

// A full queue refuses try_emplace and constructs nothing.
template <template <class> class Q>
void check_emplace_when_full() {
  using T = tracked<struct emplace_full_tag>;
  T::counts().reset();
  {
    Q<T> q(4);
    for (long i = 0; i < 4; ++i) REQUIRE(q.try_emplace(i));
    REQUIRE(T::counts().constructed == 4);
    REQUIRE_FALSE(q.try_emplace(99L));
    REQUIRE(T::counts().constructed == 4);
    for (long i = 0; i < 4; ++i) REQUIRE(q.try_pop()->value() == i);
  }
  REQUIRE(T::counts().live == 0);
  REQUIRE(T::counts().bad_destroys == 0);
}

// Many laps around a small ring, with the fill level varying so that head
// and tail cross the wrap point at every offset.
template <template <class> class Q>
void check_wrap_around(std::size_t cap, std::size_t laps) {
  Q<std::uint64_t> q(cap);
  REQUIRE(q.capacity() == cap);
  std::uint64_t next_in = 0, next_out = 0;
  const std::uint64_t end = static_cast<std::uint64_t>(cap * laps);
  std::size_t step = 0;
  while (next_out < end) {
    const std::size_t want_in = 1 + step % cap;  // 1..cap
    for (std::size_t i = 0; i < want_in && next_in < end; ++i) {
      if (!q.try_push(std::uint64_t{next_in})) break;
      ++next_in;
    }
    REQUIRE(q.size_approx() == next_in - next_out);
    const std::size_t want_out = 1 + (step * 7) % cap;
    for (std::size_t i = 0; i < want_out; ++i) {
      std::uint64_t v = 0;
      if (!q.try_pop(v)) break;
      REQUIRE(v == next_out);
      ++next_out;
    }
    ++step;
  }
  REQUIRE(next_in == end);
  REQUIRE(q.empty_approx());
  REQUIRE_FALSE(q.try_pop().has_value());
}

// The same laps with the bulk forms and batch sizes from 1 to past capacity.
template <template <class> class Q>
void check_wrap_around_bulk(std::size_t cap, std::size_t laps) {
  Q<std::uint64_t> q(cap);
  std::uint64_t next_in = 0, next_out = 0;
  const std::uint64_t end = static_cast<std::uint64_t>(cap * laps);
  std::vector<std::uint64_t> in(2 * cap + 1), out(2 * cap + 1);
  std::size_t step = 0;
  while (next_out < end) {
    const std::size_t n_in = std::min<std::uint64_t>(1 + (step * 5) % (2 * cap + 1), end - next_in);
    for (std::size_t i = 0; i < n_in; ++i) in[i] = next_in + i;
    const std::size_t free_before = q.capacity() - q.size_approx();
    const std::size_t pushed = q.try_push_n(in.begin(), n_in);
    REQUIRE(pushed == std::min(n_in, free_before));
    next_in += pushed;

    const std::size_t n_out = 1 + (step * 3) % (2 * cap + 1);
    const std::size_t size_before = q.size_approx();
    std::fill(out.begin(), out.end(), ~std::uint64_t{0});
    const std::size_t popped = q.try_pop_n(out.begin(), n_out);
    REQUIRE(popped == std::min(n_out, size_before));
    for (std::size_t i = 0; i < popped; ++i) REQUIRE(out[i] == next_out + i);
    // Nothing is written past what was popped.
    for (std::size_t i = popped; i < out.size(); ++i) REQUIRE(out[i] == ~std::uint64_t{0});
    next_out += popped;
    ++step;
  }
  REQUIRE(q.empty_approx());
}

// Bulk edge cases: n = 0, n > capacity, partial when nearly full or nearly
// empty, and the prefix rule (values not moved stay with the caller).
template <template <class> class Q>
void check_bulk_edges() {
  using up = std::unique_ptr<int>;
  Q<up> q(8);
  std::vector<up> src;
  for (int i = 0; i < 20; ++i) src.push_back(std::make_unique<int>(i));
  std::vector<up> dst(20);

  // n = 0 on an empty queue: nothing happens, not even a read of *first.
  REQUIRE(q.try_push_n(src.begin(), 0) == 0);
  REQUIRE(q.try_pop_n(dst.begin(), 0) == 0);
  REQUIRE(q.try_pop_n(dst.begin(), 5) == 0);  // empty
  for (const auto& p : src) REQUIRE(p != nullptr);
  for (const auto& p : dst) REQUIRE(p == nullptr);

  // n > capacity into an empty queue: a prefix of exactly capacity moves.
  REQUIRE(q.try_push_n(src.begin(), 20) == 8);
  for (int i = 0; i < 8; ++i) REQUIRE(src[i] == nullptr);
  for (int i = 8; i < 20; ++i) {
    REQUIRE(src[i] != nullptr);  // not moved: still the caller's
    REQUIRE(*src[i] == i);
  }
  REQUIRE(q.size_approx() == 8);
  // Full: n = 0 and n > 0 both move nothing.
  REQUIRE(q.try_push_n(src.begin() + 8, 0) == 0);
  REQUIRE(q.try_push_n(src.begin() + 8, 3) == 0);
  REQUIRE(*src[8] == 8);

  // Partial pop: ask for 3 of 8.
  REQUIRE(q.try_pop_n(dst.begin(), 3) == 3);
  for (int i = 0; i < 3; ++i) REQUIRE(*dst[i] == i);
  REQUIRE(dst[3] == nullptr);
  REQUIRE(q.size_approx() == 5);

  // Nearly full (3 free), push 5: the first 3 move, the last 2 stay.
  REQUIRE(q.try_push_n(src.begin() + 8, 5) == 3);
  for (int i = 8; i < 11; ++i) REQUIRE(src[i] == nullptr);
  REQUIRE(*src[11] == 11);
  REQUIRE(*src[12] == 12);
  REQUIRE(q.size_approx() == 8);

  // Nearly empty: pop more than is there gets what is there, in order.
  REQUIRE(q.try_pop_n(dst.begin() + 3, 6) == 6);
  for (int i = 3; i < 9; ++i) REQUIRE(*dst[i] == i);
  REQUIRE(q.try_pop_n(dst.begin() + 9, 20) == 2);
  REQUIRE(*dst[9] == 9);
  REQUIRE(*dst[10] == 10);
  REQUIRE(dst[11] == nullptr);
  REQUIRE(q.empty_approx());
  REQUIRE(q.try_pop_n(dst.begin() + 11, 20) == 0);

  // Bulk and single operations interleave in one FIFO order.
  REQUIRE(q.try_push(std::move(src[11])));
  REQUIRE(q.try_push_n(src.begin() + 12, 2) == 2);
  REQUIRE(q.try_push(std::move(src[14])));
  REQUIRE(**q.try_pop() == 11);
  REQUIRE(q.try_pop_n(dst.begin() + 12, 3) == 3);
  REQUIRE(*dst[12] == 12);
  REQUIRE(*dst[13] == 13);
  REQUIRE(*dst[14] == 14);
  REQUIRE(q.empty_approx());

  // Any input iterator works, including a plain pointer and a move_iterator.
  std::uint64_t raw[3] = {1, 2, 3};
  Q<std::uint64_t> qi(4);
  REQUIRE(qi.try_push_n(raw, 3) == 3);
  REQUIRE(qi.try_push_n(std::make_move_iterator(raw), 3) == 1);
  std::uint64_t back[4] = {};
  REQUIRE(qi.try_pop_n(back, 4) == 4);
  REQUIRE(back[0] == 1);
  REQUIRE(back[3] == 1);
}

// try_push/try_emplace/try_pop in every form, and the blocking forms when
// they need not wait.
template <template <class> class Q>
void check_operation_forms() {
  Q<int> q(4);
  const int lvalue = 10;
  REQUIRE(q.try_push(lvalue));  // copy
  REQUIRE(q.try_push(11));      // move
  REQUIRE(q.try_emplace(12));   // in place
  q.push(13);                   // blocking, has room
  REQUIRE_FALSE(q.try_push(14));
  REQUIRE_FALSE(q.try_emplace(14));
  int out = 0;
  REQUIRE(q.try_pop(out));
  REQUIRE(out == 10);
  REQUIRE(q.try_pop() == std::optional<int>(11));
  REQUIRE(q.pop() == 12);  // blocking, has a value
  REQUIRE(q.try_pop() == std::optional<int>(13));
  REQUIRE_FALSE(q.try_pop(out));
  REQUIRE(out == 10);
  q.push(lvalue);
  REQUIRE(q.pop() == 10);
}

template <template <class> class Q>
void check_non_default_constructible() {
  static_assert(!std::is_default_constructible_v<no_default>);
  Q<no_default> q(4);
  REQUIRE(q.try_emplace(1));
  REQUIRE(q.try_push(no_default(2)));
  q.push(no_default(3));
  REQUIRE(q.try_emplace(4));
  REQUIRE_FALSE(q.try_emplace(5));
  no_default out(-1);
  REQUIRE(q.try_pop(out));
  REQUIRE(out.get() == 1);
  REQUIRE(q.try_pop()->get() == 2);
  REQUIRE(q.pop().get() == 3);
  std::vector<no_default> outs;
  outs.emplace_back(-1);
  outs.emplace_back(-1);
  REQUIRE(q.try_pop_n(outs.begin(), 2) == 1);
  REQUIRE(outs[0].get() == 4);
  REQUIRE(outs[1].get() == -1);
  std::vector<no_default> ins;
  for (int i = 0; i < 6; ++i) ins.emplace_back(10 + i);
  REQUIRE(q.try_push_n(ins.begin(), ins.size()) == 4);
  REQUIRE(q.try_pop_n(outs.begin(), 2) == 2);
  REQUIRE(outs[0].get() == 10);
  REQUIRE(outs[1].get() == 11);
}

// Element lifetimes: every constructed element is destroyed exactly once,
// whether it was popped (each form) or still queued when the queue died,
// including values that straddle the wrap point.
template <template <class> class Q, class Tag>
void check_lifetimes(std::size_t cap, std::size_t leave_queued, std::size_t laps) {
  using T = tracked<Tag>;
  auto& c = T::counts();
  c.reset();
  {
    Q<T> q(cap);
    long next_in = 0, next_out = 0;
    // Cycle through every operation form.
    for (std::size_t lap = 0; lap < laps; ++lap) {
      for (std::size_t i = 0; i < cap; ++i) {
        switch ((lap + i) % 4) {
          case 0: REQUIRE(q.try_push(T(next_in))); break;
          case 1: REQUIRE(q.try_emplace(next_in)); break;
          case 2: q.push(T(next_in)); break;
          default: {
            const T copy(next_in);
            REQUIRE(q.try_push(copy));
          }
        }
        ++next_in;
      }
      REQUIRE_FALSE(q.try_push(T(-5)));
      REQUIRE_FALSE(q.try_emplace(-5L));
      for (std::size_t i = 0; i < cap;) {
        switch ((lap + i) % 4) {
          case 0: {
            T out(-2);
            REQUIRE(q.try_pop(out));
            REQUIRE(out.value() == next_out++);
            ++i;
            break;
          }
          case 1: REQUIRE(q.try_pop()->value() == next_out++); ++i; break;
          case 2: REQUIRE(q.pop().value() == next_out++); ++i; break;
          default: {
            std::vector<T> outs;
            for (int k = 0; k < 3; ++k) outs.emplace_back(-3);
            const std::size_t got = q.try_pop_n(outs.begin(), std::min<std::size_t>(3, cap - i));
            REQUIRE(got >= 1);
            for (std::size_t k = 0; k < got; ++k) REQUIRE(outs[k].value() == next_out++);
            i += got;
          }
        }
      }
      REQUIRE(q.empty_approx());
      // Shift the ring by a few positions per lap so later laps wrap inside
      // a bulk operation.
      std::vector<T> ins;
      for (std::size_t k = 0; k < (lap % cap) + 1; ++k) ins.emplace_back(next_in + static_cast<long>(k));
      const std::size_t pushed = q.try_push_n(ins.begin(), ins.size());
      REQUIRE(pushed == ins.size());
      next_in += static_cast<long>(pushed);
      std::vector<T> outs;
      for (std::size_t k = 0; k < pushed; ++k) outs.emplace_back(-4);
      REQUIRE(q.try_pop_n(outs.begin(), pushed) == pushed);
      for (std::size_t k = 0; k < pushed; ++k) REQUIRE(outs[k].value() == next_out++);
    }
    // Leave some values in the queue for the destructor.
    for (std::size_t i = 0; i < leave_queued; ++i) REQUIRE(q.try_emplace(next_in++));
    REQUIRE(c.live == static_cast<long>(leave_queued));
  }
  REQUIRE(c.live == 0);
  REQUIRE(c.constructed == c.destroyed);
  REQUIRE(c.bad_destroys == 0);
  REQUIRE(c.use_after_move == 0);
}

// Copying in with a throwing copy constructor leaves the queue unchanged.
template <template <class> class Q>
void check_throwing_copy() {
  using runnel_test::throwing_copy;
  Q<throwing_copy> q(4);
  const throwing_copy a(1), b(2);
  REQUIRE(q.try_push(a));
  throwing_copy::fail = true;
  REQUIRE_THROWS_AS(q.try_push(b), std::runtime_error);
  REQUIRE_THROWS_AS(q.push(b), std::runtime_error);
  throwing_copy::fail = false;
  REQUIRE(q.size_approx() == 1);
  REQUIRE(q.try_push(b));
  REQUIRE(q.try_pop()->v == 1);
  REQUIRE(q.try_pop()->v == 2);
  REQUIRE_FALSE(q.try_pop().has_value());
}

}  // namespace ring_contract
