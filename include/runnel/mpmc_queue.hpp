// runnel::mpmc_queue<T>: a bounded lock-free multi-producer multi-consumer
// queue with try, bulk and blocking operations.
//
// Guarantees
// - Every value accepted by a push is popped exactly once (or destroyed by
//   ~mpmc_queue if still queued); a push that fails leaves the value with the
//   caller.
// - Values pushed by one thread leave the queue in that thread's order, and
//   each consumer sees them in that order, through any number of laps.
// - try_push/try_emplace/try_pop and the *_n forms never wait for another
//   thread (lock-free), and that makes "full" and "empty" weaker than they
//   sound. A push claims its cell, then moves the value in, then publishes
//   it; pops take cells strictly in claim order. While one push is between
//   claim and publish (a slow move constructor, a descheduled thread), every
//   value published behind it is invisible: try_pop reports empty although
//   completed pushes are queued, and size_approx() counts them (and the one
//   in progress). Likewise a pop between claim and release makes try_push
//   report full while the queue has room. Precisely: try_pop's false/nullopt
//   means "the oldest claimed cell was not yet published", try_push's false
//   means "the cell for the next position was not yet released". The
//   failure lasts as long as that other thread's move.
// - try_push_linearizable / try_pop_linearizable give the strong answers:
//   empty only when every push that completed (or holds a claim) has been
//   popped, full only when no pop is emptying the oldest cell. To get them
//   they wait (spin, then yield) for the push or pop in progress, so they
//   are not lock-free; the wait is for a value or cell already on its way.
//   Use them where a thread acts on "empty"/"full" (e.g. "I pushed, so a pop
//   must succeed"). Blocking push()/pop() spin with the lock-free tries and
//   use the linearizable rule for the last check before they sleep, so a
//   consumer never sleeps while completed values are queued.
// - push()/pop() spin briefly, then sleep on a futex; a thread that never
//   sleeps pays no syscall, and a push or pop with nobody asleep pays no
//   atomic read-modify-write for waking (see detail/event_count.hpp).
// - Capacity is rounded up to a power of two, and to at least 2 (the
//   per-cell sequence numbers cannot tell full from free in a one-cell
//   ring); capacity() reports the real one.
//   0 throws std::invalid_argument, a size whose storage would overflow
//   std::length_error.
// - T is any type with a noexcept move constructor and destructor (checked at
//   compile time): move-only and non-default-constructible types are fine, no
//   value is reserved.
#pragma once

#include <cstddef>
#include <optional>
#include <type_traits>
#include <utility>

#include "detail/assert.hpp"
#include "detail/event_count.hpp"
#include "detail/mpmc_ring.hpp"

namespace runnel {

template <class T>
class mpmc_queue {
 public:
  using value_type = T;

  explicit mpmc_queue(std::size_t capacity) : ring_(capacity) {
    // The padding is computed by hand: a sleeper's update of one event count
    // must not take the other's line, nor the ring's head (the ring pads
    // itself to the end of its head's range).
    static_assert(alignof(mpmc_queue) >= detail::false_sharing_range &&
                      offsetof(mpmc_queue, not_empty_) % detail::false_sharing_range == 0,
                  "not_empty_ starts a false-sharing range of its own");
    static_assert(offsetof(mpmc_queue, not_full_) - offsetof(mpmc_queue, not_empty_) >= detail::false_sharing_range,
                  "the two event counts are a false-sharing range apart");
  }
  mpmc_queue(const mpmc_queue&) = delete;
  mpmc_queue& operator=(const mpmc_queue&) = delete;

  // ---- non-blocking ---------------------------------------------------

  // Moves v in and returns true, or returns false (queue full) and leaves v
  // untouched.
  [[nodiscard("on false the value was not pushed and is still yours")]] bool try_push(T&& v) noexcept {
    if (!ring_.try_push(std::move(v))) return false;
    not_empty_.notify_one();
    return true;
  }

  // Copies v in; the copy is made before the slot is claimed, so a throwing
  // copy constructor leaves the queue unchanged.
  [[nodiscard("on false the value was not pushed")]] bool try_push(const T& v) requires std::is_copy_constructible_v<T> {
    T copy(v);
    return try_push(std::move(copy));
  }

  // Constructs in place. Requires a noexcept constructor for Args: the slot
  // is claimed before construction and could not be given back.
  template <class... Args>
  [[nodiscard("on false nothing was constructed")]] bool try_emplace(Args&&... args) noexcept {
    if (!ring_.try_emplace(std::forward<Args>(args)...)) return false;
    not_empty_.notify_one();
    return true;
  }

  [[nodiscard("on false nothing was popped and out is unchanged")]] bool try_pop(T& out) noexcept {
    if (!ring_.try_pop(out)) return false;
    not_full_.notify_one();
    return true;
  }

  [[nodiscard("discarding the result destroys the popped value")]] std::optional<T> try_pop() noexcept {
    std::optional<T> out;
    if (ring_.try_consume([&out](T&& v) noexcept { out.emplace(std::move(v)); })) not_full_.notify_one();
    return out;
  }

  // As try_push(T&&) / try_pop(), linearizable: false only when the queue
  // was full, nullopt only when it was empty, in the strong sense above. May
  // wait for a push or pop in progress on another thread.
  bool try_push_linearizable(T&& v) noexcept {
    if (!ring_.template try_push<detail::claimed_cell::wait>(std::move(v))) return false;
    not_empty_.notify_one();
    return true;
  }

  std::optional<T> try_pop_linearizable() noexcept {
    std::optional<T> out;
    if (ring_.template try_consume<detail::claimed_cell::wait>([&out](T&& v) noexcept { out.emplace(std::move(v)); }))
      not_full_.notify_one();
    return out;
  }

  // Moves up to n values from the range starting at first, with one claim of
  // the tail; returns how many were moved (always a prefix of the range).
  template <class InputIt>
  [[nodiscard("only that many values were moved in; the rest are still yours")]] std::size_t try_push_n(InputIt first, std::size_t n) noexcept {
    const std::size_t k = ring_.try_push_n(first, n);
    RUNNEL_ASSERT(k <= n, "a bulk push moves a prefix of the range");
    if (k != 0) k == 1 ? not_empty_.notify_one() : not_empty_.notify_all();
    return k;
  }

  // Pops up to n values into *out, *(out+1), ... (any output iterator whose
  // assignment is noexcept); returns how many.
  template <class OutputIt>
  [[nodiscard("only that many outputs were written")]] std::size_t try_pop_n(OutputIt out, std::size_t n) noexcept {
    static_assert(noexcept(*out = std::declval<T&&>()),
                  "runnel: try_pop_n needs a noexcept assignment through the output iterator; a "
                  "throwing one would lose values that were already claimed");
    const std::size_t k = ring_.try_consume_n(
        [&out](T&& v) noexcept {
          *out = std::move(v);
          ++out;
        },
        n);
    RUNNEL_ASSERT(k <= n, "a bulk pop takes at most n values");
    if (k != 0) k == 1 ? not_full_.notify_one() : not_full_.notify_all();
    return k;
  }

  // ---- blocking (for threads that may wait) ---------------------------

  void push(T&& v) noexcept {
    // Lock-free tries while spinning; the linearizable one before sleeping,
    // so a producer never sleeps on a queue whose only "full" cell is being
    // emptied (whose pop's notify may already have woken someone else).
    detail::spin_then_park(not_full_, [&](auto policy) noexcept {
      return ring_.template try_push<policy.value>(std::move(v));
    });
    not_empty_.notify_one();
  }

  void push(const T& v) requires std::is_copy_constructible_v<T> {
    T copy(v);
    push(std::move(copy));
  }

  template <class... Args>
  void emplace(Args&&... args) noexcept {
    // Forwarding on every attempt is safe: an attempt that fails constructs
    // nothing.
    detail::spin_then_park(not_full_, [&](auto policy) noexcept {
      return ring_.template try_emplace<policy.value>(std::forward<Args>(args)...);
    });
    not_empty_.notify_one();
  }

  [[nodiscard("discarding the result destroys the popped value")]] T pop() noexcept {
    // Claim a cell first (waiting if empty), then move the value straight
    // into the return object: no intermediate optional on the hot path.
    std::size_t pos;
    decltype(ring_.claim_pop(pos)) cell = nullptr;
    // Lock-free claims while spinning; the linearizable one before sleeping,
    // so a consumer never sleeps while completed pushes are queued behind a
    // push still in progress (that push's notify wakes only one sleeper).
    detail::spin_then_park(not_empty_, [&](auto policy) noexcept {
      return (cell = ring_.template claim_pop<policy.value>(pos)) != nullptr;
    });
    RUNNEL_ASSERT(cell != nullptr, "spin_then_park returns once the claim succeeded");
    T* v = cell->value();
    T out(std::move(*v));
    v->~T();
    ring_.release_pop(cell, pos);
    not_full_.notify_one();
    return out;
  }

  // ---- observers ------------------------------------------------------

  std::size_t capacity() const noexcept { return ring_.capacity(); }
  // A snapshot that may be stale by the time it is read; counts pushes and
  // pops in progress as done.
  std::size_t size_approx() const noexcept { return ring_.size_approx(); }
  bool empty_approx() const noexcept { return size_approx() == 0; }

 private:
  detail::mpmc_ring<T> ring_;
  // Consumers sleep on not_empty_, producers on not_full_; each on its own
  // line so a sleeper's count update does not disturb the other side.
  alignas(detail::false_sharing_range) detail::event_count not_empty_;
  alignas(detail::false_sharing_range) detail::event_count not_full_;
};

}  // namespace runnel
