// The shared state behind runnel::sender / runnel::receiver and the
// pipeline's internal channels: a lock-free ring, a closed flag with an
// in-flight-sender count, and two kinds of waiters per direction (threads
// sleeping on an event_count, pool tasks parked in a task_waiters list).
//
// The close race. A send checks "closed?" and then pushes; close() may run in
// between. If a receiver could then see "closed and empty" before the push
// lands, the value would be delivered after the end was reported (or never).
// So a send announces itself in the same atomic word that holds the closed
// bit (state_ = in_flight * 2 | closed) before it looks at the bit, and
// withdraws after its push is published:
//   - a send whose announcement precedes close() in state_'s modification
//     order completes its push before it withdraws;
//   - a send whose announcement follows close() sees the bit and fails,
//     keeping its value;
//   - a receiver reports "closed and drained" only after it saw the bit set
//     with no send in flight *and* then found the ring empty; everything
//     pushed by announced sends was published before their withdrawal, which
//     that read synchronises with.
// A withdrawal that finds the bit set wakes every receiver, since one of them
// may have seen "closed, but a send is in flight" and gone back to sleep.
//
// Linearizable try-operations. The ring is used with claimed_cell::wait
// (detail/mpmc_ring.hpp): a receive that finds the head cell claimed by a
// send whose value is still being moved in waits (spin, then yield) for that
// move instead of reporting empty, and reports empty only when no send holds
// a claim that no receive has taken; a send likewise reports full only when
// no receive is emptying the oldest cell. So "empty" means no completed send
// was left unreceived and "full" means every cell held a value nobody had
// started to take, as crossbeam's array channel does. The price: a try-
// operation (and a *_for past its deadline) can wait as long as another
// thread's move of one value takes, but only for a value already on its
// way.
//
// Atomics: the atomic family (detail/atomic_family.hpp) of the state word,
// the ring and the threads' event counts; std_atomics except under the
// model checker (tests/relacy/relacy_channel_close_test.cpp checks the close
// race above). The pool tasks' waiter lists and the handle counts are
// always std: the model parks no task.
#pragma once

#include <atomic>
#include "../detail/chrono.hpp"  // not <chrono>: see there
#include <cstddef>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>

#include "../detail/assert.hpp"
#include "../detail/atomic_family.hpp"
#include "../detail/event_count.hpp"
#include "../detail/mpmc_ring.hpp"
#include "task_waiters.hpp"

namespace runnel {

enum class channel_status {
  ok,       // the operation moved a value
  full,     // try_send: every cell held a value no receiver had started to take
  empty,    // try_recv: every completed send was already received, and the
            // channel is open (or closed with a send still in flight)
  closed,   // send: the channel is closed; receiving: closed, and nothing
            // more will ever arrive (every accepted value was received)
  timeout,  // *_for: the time ran out
};

}  // namespace runnel

namespace runnel::detail {

template <class T, class Atomics = std_atomics>
class channel_state {
  template <class U>
  using atomic = typename Atomics::template atomic<U>;
  using event_count = basic_event_count<Atomics>;

 public:
  // task_heavy: pool tasks park on this channel often (a channel between
  // pipeline nodes); see task_waiters for the fence trade-off.
  explicit channel_state(std::size_t capacity, bool task_heavy = false)
      : ring_(capacity), recv_tasks_(task_heavy), send_tasks_(task_heavy) {
    check_layout();
  }
  // Every handle and every pipeline end holds the state alive while it
  // sends, so none can be in flight here.
  ~channel_state() {
    // Relaxed: destruction happens after every other use of the state.
    RUNNEL_ASSERT((state_.load(std::memory_order_relaxed) & ~closed_bit) == 0,
                  "no send is in flight when a channel is destroyed");
  }
  channel_state(const channel_state&) = delete;
  channel_state& operator=(const channel_state&) = delete;

  std::size_t capacity() const noexcept { return ring_.capacity(); }
  std::size_t size_approx() const noexcept { return ring_.size_approx(); }

  bool is_closed() const noexcept {
    // seq_cst: a hint to callers (and the fast refusal of enter_send); the
    // order is free on x86 and keeps the close race's reasoning in one total
    // order (header comment).
    return (state_.load(std::memory_order_seq_cst) & closed_bit) != 0;
  }

  // Closes the channel (idempotent) and wakes every waiter on both sides.
  void close() noexcept {
    // seq_cst RMW: its place in state_'s modification order against the
    // sends' announcements decides which sends count (header comment).
    const std::uint64_t prev = state_.fetch_or(closed_bit, std::memory_order_seq_cst);
    if ((prev & closed_bit) != 0) return;
    wake_all();
  }

  // ---- non-blocking core ------------------------------------------------

  // Moves v in (ok), or leaves v intact (full / closed). With give_up (used
  // only while a blocking send spins) "full" may also mean a cell being
  // emptied; see the header comment.
  template <claimed_cell Policy = claimed_cell::wait>
  channel_status try_send(T& v) noexcept {
    if (!enter_send()) return channel_status::closed;
    const bool ok = ring_.template try_push<Policy>(std::move(v));
    leave_send();
    if (!ok) return channel_status::full;
    not_empty_.notify_one();
    recv_tasks_.notify_n(1);
    return channel_status::ok;
  }

  // Moves a prefix of [first, first + n) in; returns its length, or nullopt
  // when the channel is closed (nothing moved).
  template <class It>
  std::optional<std::size_t> try_send_n(It first, std::size_t n) noexcept {
    if (!enter_send()) return std::nullopt;
    const std::size_t k = ring_.template try_push_n<claimed_cell::wait>(first, n);
    leave_send();
    if (k != 0) {
      k == 1 ? not_empty_.notify_one() : not_empty_.notify_all();
      recv_tasks_.notify_n(k);
    }
    return k;
  }

  // Hands up to n values to sink(T&&) (which must not throw); returns how
  // many, or nullopt when the channel is closed and drained (nothing more
  // will ever arrive). 0 means empty in the linearizable sense above.
  // With give_up (used only while a blocking recv spins) 0 may also mean
  // the head cell is still being filled. "Closed and drained" is exact under
  // either policy: it is only reported with no send in flight, and then
  // every claimed cell has been published.
  template <claimed_cell Policy = claimed_cell::wait, class Sink>
  std::optional<std::size_t> try_recv_n(Sink&& sink, std::size_t n) noexcept {
    std::size_t k = ring_.template try_consume_n<Policy>(sink, n);
    RUNNEL_ASSERT(k <= n, "a bulk receive takes at most n values");
    if (k == 0) {
      if (!drained_if_closed()) return std::size_t{0};
      // Closed with no send in flight: whatever is in the ring now is all
      // there will ever be. Look once more (see the header comment).
      k = ring_.template try_consume_n<Policy>(sink, n);
      if (k == 0) {
        // Release: see drained_if_closed().
        ended_.store(true, std::memory_order_release);
        return std::nullopt;
      }
    }
    k == 1 ? not_full_.notify_one() : not_full_.notify_all();
    send_tasks_.notify_n(k);
    return k;
  }

  template <claimed_cell Policy = claimed_cell::wait>
  channel_status try_recv(std::optional<T>& out) noexcept {
    const auto r = try_recv_n<Policy>([&out](T&& v) noexcept { out.emplace(std::move(v)); }, 1);
    if (!r) return channel_status::closed;
    return *r == 0 ? channel_status::empty : channel_status::ok;
  }

  // ---- blocking (threads) -------------------------------------------------

  // Waits while full; ok or closed (v intact when closed). Spins with the
  // lock-free try and makes the check before sleeping the linearizable one:
  // a sender never sleeps while the only "full" cell is being emptied, and
  // the spinning never waits on another thread's move.
  channel_status send(T& v) noexcept {
    channel_status st = channel_status::full;
    spin_then_park(not_full_, [&](auto policy) noexcept {
      st = try_send<policy.value>(v);
      return st != channel_status::full;
    });
    return st;
  }

  channel_status send_until(T& v, std::chrono::steady_clock::time_point deadline) noexcept {
    return wait_until(not_full_, deadline, [&]() noexcept { return try_send(v); },
                      channel_status::full);
  }

  // As send(): a receiver never sleeps while completed sends are queued
  // behind one still moving its value in.
  channel_status recv(std::optional<T>& out) noexcept {
    channel_status st = channel_status::empty;
    spin_then_park(not_empty_, [&](auto policy) noexcept {
      st = try_recv<policy.value>(out);
      return st != channel_status::empty;
    });
    return st;
  }

  channel_status recv_until(std::optional<T>& out,
                            std::chrono::steady_clock::time_point deadline) noexcept {
    return wait_until(not_empty_, deadline, [&]() noexcept { return try_recv(out); },
                      channel_status::empty);
  }

  // ---- parking hooks for pool tasks ----------------------------------------
  //
  // park_*(w): registers w to be woken when the channel may have become
  // readable (resp. writable) or closed. Returns true when w stays parked (the
  // caller must return and let w.wake resume it, exactly once), false when
  // the condition already holds and w was taken back (the caller retries).

  // `also` is an extra condition re-checked after registering (e.g. "the
  // run was cancelled"); whoever makes it true must then unpark(w).
  bool park_receiver(waker& w) noexcept { return park_receiver(w, [] { return false; }); }
  bool park_sender(waker& w) noexcept { return park_sender(w, [] { return false; }); }
  template <class Also>
  bool park_receiver(waker& w, Also also) noexcept {
    return park(recv_tasks_, w, [&]() noexcept { return readable_or_ended() || also(); });
  }
  template <class Also>
  bool park_sender(waker& w, Also also) noexcept {
    return park(send_tasks_, w, [&]() noexcept { return writable_or_closed() || also(); });
  }
  // Takes w back from whichever list of this channel holds it; false if it
  // is in neither (already woken, or never parked here).
  bool unpark(waker& w) noexcept { return recv_tasks_.remove(w) || send_tasks_.remove(w); }

  // A thread in runnel::select that was woken through a waker registered by
  // park_receiver (resp. park_sender) but fired another arm hands that wake
  // on to the next parked waiter, if the condition it announced still holds:
  // a notify_n(1) woke only it, and a value (or cell) nobody is awake for
  // would otherwise wait for the next send (see select.hpp).
  void pass_on_receiver_wake() noexcept {
    if (readable_or_ended()) recv_tasks_.notify_n(1);
  }
  void pass_on_sender_wake() noexcept {
    if (writable_or_closed()) send_tasks_.notify_n(1);
  }

  // Senders and receivers alive (handles, pipeline ends). The last of either
  // kind to go closes the channel, so nobody waits for a peer that is gone.
  std::atomic<std::size_t> senders{0};
  std::atomic<std::size_t> receivers{0};

 private:
  static constexpr std::uint64_t closed_bit = 1;
  static constexpr std::uint64_t one_sender = 2;

  // Announce a send; false (and withdrawn) when the channel is closed.
  bool enter_send() noexcept {
    // Fast refusal once closed, so that late sends do not keep bumping the
    // in-flight count that receivers wait to see at zero.
    if (is_closed()) return false;
    // seq_cst RMW: its place in state_'s modification order relative to
    // close()'s fetch_or decides whether this send counts (header comment).
    if ((state_.fetch_add(one_sender, std::memory_order_seq_cst) & closed_bit) == 0) return true;
    leave_send();
    return false;
  }

  void leave_send() noexcept {
    // seq_cst RMW: its release half hands the pushed value over to a
    // receiver that then reads "closed, nothing in flight" (release alone
    // would do; the extra order is free on x86 and keeps the reasoning
    // simple).
    const std::uint64_t prev = state_.fetch_sub(one_sender, std::memory_order_seq_cst);
    RUNNEL_ASSERT(prev >= one_sender, "a send withdraws only after it announced itself");
    if ((prev & closed_bit) != 0 && prev - one_sender == closed_bit) [[unlikely]] {
      wake_receivers_after_last_send();
    }
  }

  // The last in-flight send after close(): receivers that saw it in flight
  // went back to waiting; now they can finish. Out of line: rare, and kept
  // out of every send's inlined body.
  [[gnu::noinline, gnu::cold]] void wake_receivers_after_last_send() noexcept {
    not_empty_.notify_all();
    recv_tasks_.notify_all();
  }

  // True when closed with no send in flight. A send that arrives after
  // close() announces itself for an instant before it sees the bit; ended_
  // remembers a positive answer so that "closed and drained", once reported,
  // stays reported.
  bool drained_if_closed() const noexcept {
    // Acquire, pairing with the release that sets it: ended_ is only set
    // after a read of state_ saw the channel closed with nothing in flight,
    // and a reader of the flag must see that closed state_ too (the check
    // below; the model checker found a relaxed flag let it read an older
    // state_). A reader that misses the flag falls back to the read below.
    if (ended_.load(std::memory_order_acquire)) {
      // Relaxed: a check; the acquire above makes the closed state_ visible,
      // and closed is never cleared.
      RUNNEL_ASSERT((state_.load(std::memory_order_relaxed) & closed_bit) != 0, "a channel seen drained stays closed");
      return true;
    }
    // seq_cst load: its acquire half takes over every value pushed by the
    // sends whose withdrawal it follows, so the look at the ring after it
    // sees them (header comment).
    if (state_.load(std::memory_order_seq_cst) != closed_bit) return false;
    return true;
  }

  bool readable_or_ended() const noexcept {
    // size_approx counts claimed-but-unpublished cells as present: it may say
    // "readable" early, which only costs the caller a retry, never a lost
    // wake-up (the publisher notifies after publishing).
    return ring_.size_approx() != 0 || drained_if_closed();
  }
  bool writable_or_closed() const noexcept {
    return ring_.size_approx() < ring_.capacity() || is_closed();
  }

  // The padding is computed by hand: the sends' word and each side's
  // waiters start a false-sharing range of their own, past the ring's
  // padded head. channel_state mixes public and private members, so it is
  // not standard-layout; g++ and clang compute offsetof for it as usual (no
  // virtual bases), and the warning is silenced for the check only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winvalid-offsetof"
  static constexpr void check_layout() noexcept {
    // A model checker's atomics are left unchecked.
    if constexpr (std::is_same_v<Atomics, std_atomics>) {
      constexpr std::size_t range = false_sharing_range;
      static_assert(alignof(channel_state) >= range && offsetof(channel_state, state_) % range == 0 &&
                        offsetof(channel_state, not_empty_) % range == 0 &&
                        offsetof(channel_state, not_full_) % range == 0,
                    "the sends' word and each side's waiters start a false-sharing range");
      static_assert(offsetof(channel_state, not_empty_) - offsetof(channel_state, state_) >= range &&
                        offsetof(channel_state, not_full_) - offsetof(channel_state, not_empty_) >= range,
                    "the sends' word and each side's waiters are a false-sharing range apart");
    }
  }
#pragma GCC diagnostic pop

  template <class Cond>
  static bool park(task_waiters& list, waker& w, Cond cond) noexcept {
    list.add(w);
    if (!cond()) return true;
    return !list.remove(w);
  }

  template <class Attempt>
  static channel_status wait_until(event_count& ec, std::chrono::steady_clock::time_point deadline,
                                   Attempt attempt, channel_status busy) noexcept {
    typename Atomics::backoff bo;
    for (;;) {
      const channel_status st = attempt();
      if (st != busy) return st;
      if (std::chrono::steady_clock::now() >= deadline) return channel_status::timeout;
      if (bo.spin()) continue;
      const auto key = ec.prepare_wait();
      const channel_status again = attempt();
      if (again != busy) {
        ec.cancel_wait();
        return again;
      }
      ec.wait_until(key, deadline);
      bo.reset();
    }
  }

  void wake_all() noexcept {
    not_empty_.notify_all();
    not_full_.notify_all();
    recv_tasks_.notify_all();
    send_tasks_.notify_all();
  }

  mpmc_ring<T, Atomics> ring_;
  // in_flight_sends * 2 | closed. See the header comment.
  alignas(false_sharing_range) atomic<std::uint64_t> state_{0};
  // Set once some receiver saw the channel closed and drained (see
  // drained_if_closed()); never cleared.
  atomic<bool> ended_{false};
  // Receivers (threads / tasks) wait on the first pair, senders on the second.
  alignas(false_sharing_range) event_count not_empty_;
  task_waiters recv_tasks_;
  alignas(false_sharing_range) event_count not_full_;
  task_waiters send_tasks_;
};

}  // namespace runnel::detail
