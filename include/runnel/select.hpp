// runnel::select: wait on several channel operations at once and perform
// exactly one of them.
//
//   auto r = runnel::select(runnel::recv_arm(orders), runnel::recv_arm(cancels),
//                           runnel::send_arm(log, std::string("tick")));
//   switch (r.index()) {
//     case 0: if (r.ok()) handle(*r.get<0>()); else /* orders closed */; break;
//     case 1: ...
//     case 2: if (!r.ok()) /* log closed: */ keep(std::move(*r.get<2>())); break;
//   }
//
// Arms
// - recv_arm(rx): ready when rx has a value (fires ok, the value in get<I>())
//   or when rx is closed and drained (fires closed, get<I>() empty) — as a
//   receive from a closed channel in Go's select is always ready.
// - send_arm(tx, v): ready when tx has room (fires ok, v moved in) or when tx
//   is closed (fires closed). Every send arm that did not send hands its value
//   back in get<I>() (engaged unless that arm fired ok).
// - arm.only_if(false) disables an arm: never ready, like a nil channel in
//   Go's select (the usual way to stop watching a channel once it closed).
//
// Forms
// - select(arms...): waits until an arm is ready; status ok or closed.
// - try_select(arms...): never waits; status empty (index() == none) when no
//   arm was ready.
// - select_for(timeout, arms...): as select, or status timeout (index() ==
//   none). Zero or negative timeouts try once; huge ones wait for ever.
// select and select_for block the calling thread (std::logic_error on the
// sole worker of a one-worker pool, as recv does); a select whose every arm
// is disabled throws std::logic_error (it could never return). Inside a
// pool, a loop of receiving selects over several channels is
// runnel::pipeline{pool}.from_merged(rx...) (pipeline.hpp): a task parked
// on every channel, taking fair turns, that never blocks a worker.
//
// Fairness. Every scan of the arms polls them in a fresh uniformly random
// order, so when several arms are ready each is chosen with equal
// probability (Go's select does the same; crossbeam's select! also picks a
// ready operation at random). No arm starves another.
//
// Exactly one arm fires: a value is received from one arm only, and sent on
// one arm only. The arms are polled one after the other, not as one atomic
// snapshot (Go's select locks every channel; crossbeam's does not):
// try_select answers empty after two passes over the arms found each one
// empty (or full) when it was polled. The second pass catches a hand-over
// (arm 1 becomes ready, then arm 0 stops being ready) that one pass in the
// wrong order would miss.
//
// Sleeping (no busy wait): after a short spin, the thread registers one
// waker with every enabled arm's channel (the list pipeline tasks park in),
// re-checks each arm after registering it, and sleeps on a futex word of its
// own that any of those channels' notifications raises. See park_all() for
// why no wake-up is lost.
//
// Compared with Go and crossbeam. Go's select takes a value from the sender
// (or sends to the receiver) that woke it; ours and crossbeam's re-poll the
// arms after waking, so another thread may take the value first and the
// select sleeps again. Go panics on a send to a closed channel; here (as in
// crossbeam's select!, whose send operation returns Err with the message) a
// send arm on a closed channel fires with status closed and hands the value
// back. Go has a `default:` case; here that is try_select. crossbeam offers
// a dynamic Select builder for arm sets known only at run time; here the arms
// are a fixed parameter pack.
#pragma once

#include <array>
#include "detail/chrono.hpp"  // not <chrono>: see there
#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <utility>

#include "channel.hpp"
#include "detail/assert.hpp"
#include "detail/backoff.hpp"
#include "detail/blocking_guard.hpp"
#include "detail/deadline.hpp"
#include "detail/fast_random.hpp"
#include "channel/select_parker.hpp"

namespace runnel {

namespace detail {

struct select_access {
  template <class Handle>
  static auto& state(const Handle& h) {
    return h.state();
  }
};

struct select_core;

}  // namespace detail

// Receive from `rx` (which must outlive the select call).
template <class T>
class recv_arm {
 public:
  using value_type = T;

  explicit recv_arm(const receiver<T>& rx) : s_(&detail::select_access::state(rx)) {}

  // A disabled arm is never ready.
  recv_arm only_if(bool enabled) && {
    enabled_ = enabled;
    return std::move(*this);
  }

  // The value received, engaged when this arm fired ok.
  std::optional<T>& value() & noexcept { return value_; }
  std::optional<T>&& value() && noexcept { return std::move(value_); }

 private:
  friend struct detail::select_core;

  channel_status attempt() noexcept { return s_->try_recv(value_); }
  bool park(detail::waker& w) noexcept { return s_->park_receiver(w); }
  bool unpark(detail::waker& w) noexcept { return s_->unpark(w); }
  void pass_on_wake() noexcept { s_->pass_on_receiver_wake(); }

  detail::channel_state<T>* s_;
  bool enabled_ = true;
  std::optional<T> value_;
};

// Send `value` on `tx` (which must outlive the select call).
template <class T>
class send_arm {
 public:
  using value_type = T;

  send_arm(const sender<T>& tx, T value) : s_(&detail::select_access::state(tx)), value_(std::move(value)) {}

  send_arm only_if(bool enabled) && {
    enabled_ = enabled;
    return std::move(*this);
  }

  // The value, engaged unless this arm fired ok (then it is in the channel).
  std::optional<T>& value() & noexcept { return value_; }
  std::optional<T>&& value() && noexcept { return std::move(value_); }

 private:
  friend struct detail::select_core;

  channel_status attempt() noexcept {
    RUNNEL_ASSERT(value_.has_value(), "a send arm holds its value until it fires");
    const channel_status st = s_->try_send(*value_);
    if (st == channel_status::ok) value_.reset();  // moved into the channel
    return st;
  }
  bool park(detail::waker& w) noexcept { return s_->park_sender(w); }
  bool unpark(detail::waker& w) noexcept { return s_->unpark(w); }
  void pass_on_wake() noexcept { s_->pass_on_sender_wake(); }

  detail::channel_state<T>* s_;
  bool enabled_ = true;
  std::optional<T> value_;
};

template <class T>
recv_arm(const receiver<T>&) -> recv_arm<T>;
template <class T, class U>
send_arm(const sender<T>&, U&&) -> send_arm<T>;

namespace detail {

template <class A>
inline constexpr bool is_select_arm = false;
template <class T>
inline constexpr bool is_select_arm<recv_arm<T>> = true;
template <class T>
inline constexpr bool is_select_arm<send_arm<T>> = true;

}  // namespace detail

// What a select did: which arm fired (index()) and how (status()), and every
// arm's value (get<I>()).
template <class... Arms>
class select_result {
 public:
  static constexpr std::size_t none = static_cast<std::size_t>(-1);

  // The arm that fired, or none (try_select found nothing, select_for timed out).
  std::size_t index() const noexcept { return index_; }
  // ok: arm index() received (or sent) a value; closed: arm index()'s
  // channel is closed (and drained, for a receive arm); empty: try_select
  // found no arm ready; timeout: select_for's time ran out.
  channel_status status() const noexcept { return status_; }
  bool ok() const noexcept { return status_ == channel_status::ok; }
  bool closed() const noexcept { return status_ == channel_status::closed; }
  explicit operator bool() const noexcept { return ok(); }

  // Arm I's value: for a receive arm, the value received (engaged exactly
  // when index() == I and ok()); for a send arm, the value handed back
  // (engaged unless index() == I and ok()).
  template <std::size_t I>
  auto& get() & noexcept {
    return std::get<I>(arms_).value();
  }
  template <std::size_t I>
  auto&& get() && noexcept {
    return std::move(std::get<I>(arms_)).value();
  }

 private:
  friend struct detail::select_core;
  explicit select_result(Arms&&... arms) : arms_(std::move(arms)...) {}

  std::tuple<Arms...> arms_;
  std::size_t index_ = none;
  channel_status status_ = channel_status::empty;
};

namespace detail {

struct select_core {
  template <class... Arms>
  static select_result<Arms...> make(Arms&&... arms) {
    return select_result<Arms...>(std::move(arms)...);
  }

  // Calls f(arm) for arm i of the tuple.
  template <class Tuple, class F>
  static decltype(auto) visit(Tuple& arms, std::size_t i, F&& f) {
    return visit_impl(arms, i, f, std::make_index_sequence<std::tuple_size_v<Tuple>>{});
  }

  // Polls every enabled arm once, in a fresh random order; the first ready
  // one fires. False when none was ready.
  template <class... Arms>
  static bool poll(select_result<Arms...>& r) noexcept {
    constexpr std::size_t n = sizeof...(Arms);
    std::array<std::size_t, n> order;
    for (std::size_t i = 0; i < n; ++i) order[i] = i;
    // Fisher-Yates: each of the n! orders equally likely, so each ready arm
    // is equally likely to come first among the ready ones.
    for (std::size_t i = n - 1; i > 0; --i) {
      std::swap(order[i], order[thread_random_below(static_cast<std::uint32_t>(i + 1))]);
    }
    for (const std::size_t i : order) {
      const channel_status st = visit(r.arms_, i, [](auto& arm) noexcept {
        return arm.enabled_ ? arm.attempt() : channel_status::empty;
      });
      if (st == channel_status::ok || st == channel_status::closed) {
        r.index_ = i;
        r.status_ = st;
        return true;
      }
    }
    return false;
  }

  // Two passes before answering empty: one arm commonly becomes ready just
  // before another stops being ready (a hand-over), and a single pass in the
  // wrong order would see neither. crossbeam's select! with a default case
  // polls twice the same way (try, then register); Go locks every channel.
  template <class... Arms>
  static void try_select(select_result<Arms...>& r) noexcept {
    if (!poll(r) && !poll(r)) r.status_ = channel_status::empty;
  }

  // Blocking and timed forms (deadline max() for ever).
  template <class... Arms>
  static void run(select_result<Arms...>& r, std::chrono::steady_clock::time_point deadline) {
    constexpr std::size_t n = sizeof...(Arms);
    const bool forever = deadline == std::chrono::steady_clock::time_point::max();
    if (forever && !any_enabled(r))
      throw std::logic_error("runnel::select: every arm is disabled, so it could never return");
    // Arms whose waker a notifier took during the last sleep: their wake is
    // ours to use or to hand on.
    std::array<bool, n> woken{};
    backoff bo;
    for (;;) {
      if (poll(r)) {
        pass_on(r, woken, r.index_);
        return;
      }
      // Nothing fired: each wake we took was for a value (or room) that
      // another thread took before our poll; there is nothing to hand on.
      woken.fill(false);
      if (!forever && std::chrono::steady_clock::now() >= deadline) {
        // A second pass before giving up, as try_select does.
        if (poll(r)) pass_on(r, woken, r.index_);
        else r.status_ = channel_status::timeout;
        return;
      }
      if (bo.spin()) continue;
      park_all(r, woken, deadline);
      bo.reset();
    }
  }

 private:
  template <class Tuple, class F, std::size_t... Is>
  static decltype(auto) visit_impl(Tuple& arms, std::size_t i, F& f, std::index_sequence<Is...>) {
    using R = decltype(f(std::get<0>(arms)));
    if constexpr (std::is_void_v<R>) {
      (void)((i == Is && (f(std::get<Is>(arms)), true)) || ...);
    } else {
      R out{};
      (void)((i == Is && ((out = f(std::get<Is>(arms))), true)) || ...);
      return out;
    }
  }

  template <class... Arms>
  static bool any_enabled(select_result<Arms...>& r) noexcept {
    return std::apply([](auto&... arm) { return (arm.enabled_ || ...); }, r.arms_);
  }

  // Registers a waker with every enabled arm, sleeps until one is woken (or
  // the deadline), and takes them all back; woken[i] tells which ones a
  // notifier took.
  //
  // No lost wake-up. Invariant: from the moment arm i's waker is added to
  // its channel's list until this function takes it back, either the waker
  // is in that list or a notifier has taken it and raises the parker's word.
  // add() issues the heavy side of the list's fence and the re-check inside
  // park() follows it; a sender (receiver) publishes its value (free cell)
  // and then issues the light side and reads the list's count. So for every
  // change that makes arm i ready, either this thread's re-check of arm i
  // sees it (park() returns false, we do not sleep) or the notifier sees a
  // non-empty list and wakes its head. The head may be another waiter; then
  // that waiter takes the value, or finds it taken, or — a select that fired
  // another arm — hands the wake on (pass_on below), so that the wake is
  // only ever dropped by a thread that saw the value consumed. Re-checking
  // only after registering is what makes this work: a check made before
  // add() could miss a value whose notifier then saw an empty list.
  template <class... Arms>
  static void park_all(select_result<Arms...>& r, std::array<bool, sizeof...(Arms)>& woken,
                       std::chrono::steady_clock::time_point deadline) noexcept {
    constexpr std::size_t n = sizeof...(Arms);
    select_parker parker;
    std::array<select_parker::arm_waker, n> wakers;
    std::array<bool, n> registered{};
    bool ready = false;
    for (std::size_t i = 0; i < n && !ready; ++i) {
      visit(r.arms_, i, [&](auto& arm) noexcept {
        if (!arm.enabled_) return;
        parker.prepare(wakers[i]);
        // park() == false: arm i was ready on the re-check and the waker is
        // back in our hands. True: registered (or already taken by a
        // notifier, which will raise the word).
        if (arm.park(wakers[i])) registered[i] = true;
        else ready = true;
      });
    }
    [[maybe_unused]] const bool raised = !ready && parker.sleep_until(deadline);
    [[maybe_unused]] bool taken = false;
    for (std::size_t i = 0; i < n; ++i) {
      if (!registered[i]) continue;
      const bool back = visit(r.arms_, i, [&](auto& arm) noexcept { return arm.unpark(wakers[i]); });
      if (!back) {
        select_parker::finish(wakers[i]);
        woken[i] = true;
        taken = true;
      }
    }
    RUNNEL_ASSERT(!raised || taken, "the parker's word is raised only by a notifier that took one of its wakers");
  }

  // Hands on the wakes this call took from arms other than the one that
  // fired (see park_all()).
  template <class... Arms>
  static void pass_on(select_result<Arms...>& r, const std::array<bool, sizeof...(Arms)>& woken,
                      std::size_t fired) noexcept {
    for (std::size_t i = 0; i < woken.size(); ++i) {
      if (woken[i] && i != fired) visit(r.arms_, i, [](auto& arm) noexcept { arm.pass_on_wake(); });
    }
  }
};

}  // namespace detail

// Waits until one arm is ready and fires it; status ok or closed.
template <class... Arms>
  requires(sizeof...(Arms) > 0 && (detail::is_select_arm<Arms> && ...))
[[nodiscard("the result holds the received value and every unsent value")]] select_result<Arms...> select(Arms... arms) {
  detail::check_may_block("select");
  auto r = detail::select_core::make(std::move(arms)...);
  detail::select_core::run(r, std::chrono::steady_clock::time_point::max());
  return r;
}

// Fires one ready arm if there is any; status empty when none was ready.
template <class... Arms>
  requires(sizeof...(Arms) > 0 && (detail::is_select_arm<Arms> && ...))
[[nodiscard("the result holds the received value and every unsent value")]] select_result<Arms...> try_select(Arms... arms) {
  auto r = detail::select_core::make(std::move(arms)...);
  detail::select_core::try_select(r);
  return r;
}

// As select(), giving up after `timeout` (status timeout).
template <class Rep, class Period, class... Arms>
  requires(sizeof...(Arms) > 0 && (detail::is_select_arm<Arms> && ...))
[[nodiscard("the result holds the received value and every unsent value")]] select_result<Arms...> select_for(
    std::chrono::duration<Rep, Period> timeout, Arms... arms) {
  detail::check_may_block("select_for");
  auto r = detail::select_core::make(std::move(arms)...);
  detail::select_core::run(r, detail::deadline_after(timeout));
  return r;
}

}  // namespace runnel
