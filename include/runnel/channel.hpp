// runnel channels: a bounded multi-producer multi-consumer channel with
// copyable sender<T> / receiver<T> handles.
//
//   auto [tx, rx] = runnel::make_channel<std::string>(1024);
//   std::thread producer([tx = std::move(tx)]() mutable {
//     tx.send("hello");
//   });                                  // last sender gone: channel closes
//   for (std::string& s : rx) use(s);     // ends when closed and drained
//
// Semantics
// - Capacity is rounded up to a power of two (capacity() tells); 0 throws
//   std::invalid_argument.
// - The channel closes on close() (from either side, idempotent), when the
//   last sender handle is destroyed, or when the last receiver handle is
//   destroyed (nobody could ever receive). Closing wakes every blocked sender
//   and receiver and every parked pipeline stage.
// - After close, sends fail with channel_status::closed and hand the value
//   back; receivers still get every value sent before, then "closed". A send
//   racing with close() either delivers before the end is reported or fails
//   with its value handed back (see channel/channel_state.hpp).
// - Nothing is lost or duplicated: a value is received exactly once, handed
//   back by a failed send, or destroyed with the channel if never received.
// - Values of one sender are received in the order sent.
// - Linearizable: try_recv (and try_recv_n) answers empty only when every
//   send that had completed was already received, and try_send answers full
//   only when every cell held a value that no receiver had started to take.
//   A thread that completed send(x) and then calls try_recv gets a value.
// - try_* never wait for space or for a value. They may wait for a value
//   that is on its way: when the oldest cell was claimed by a send still
//   moving its value in (a slow move constructor, a descheduled sender), a
//   receive spins, then yields, until that move is done, and returns that
//   value; values sent behind it are never reported as absent. Mirror image
//   for a send facing a receive still moving the oldest value out. This wait
//   is bounded by one move of one T on another thread.
// - send/recv spin briefly, then sleep on a futex (no CPU burn). *_for give
//   up at the deadline, except while waiting for a value (or cell) on its way
//   as above, which they finish first: a recv_for never times out while a
//   completed send is unreceived. Timeouts too large for the clock (e.g.
//   hours::max()) mean "no deadline"; zero or negative ones try once.
// - size_approx() counts sends and receives in progress as done.
//
// Blocking calls on pool workers. send/recv/*_for block the calling thread.
// On a runnel::thread_pool worker that takes the worker away from the pool
// for the whole wait; if the value being waited for must come from a task of
// the same pool (always true on a 1-worker pool) the program deadlocks. Use
// try_send/try_recv there, or let runnel::pipeline run the work: its stages
// never block (they park on the channel and are re-scheduled).
//
// Handles are cheap to copy (one shared_ptr plus an atomic count). A
// moved-from or default-constructed handle is empty; using it throws
// std::logic_error.
#pragma once

#include "detail/chrono.hpp"  // not <chrono>: see there
#include <cstddef>
#include <iterator>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "detail/assert.hpp"
#include "detail/blocking_guard.hpp"
#include "channel/channel_state.hpp"
#include "detail/deadline.hpp"

namespace runnel {

template <class T> class sender;
template <class T> class receiver;
template <class T> struct pipeline_access;  // the wiring layer's back door

// Result of a send that may fail: on failure the value comes back.
template <class T>
class send_result {
 public:
  send_result(channel_status s, std::optional<T> v) noexcept : status_(s), value_(std::move(v)) {}

  channel_status status() const noexcept { return status_; }
  bool ok() const noexcept { return status_ == channel_status::ok; }
  explicit operator bool() const noexcept { return ok(); }
  // The value that was not sent (engaged exactly when !ok()).
  std::optional<T>& value() & noexcept { return value_; }
  std::optional<T>&& value() && noexcept { return std::move(value_); }

 private:
  channel_status status_;
  std::optional<T> value_;
};

// Result of a non-blocking or timed receive: ok (value engaged), empty,
// timeout, or closed (closed and drained).
template <class T>
class recv_result {
 public:
  recv_result(channel_status s, std::optional<T> v) noexcept : status_(s), value_(std::move(v)) {}

  channel_status status() const noexcept { return status_; }
  bool ok() const noexcept { return status_ == channel_status::ok; }
  bool closed() const noexcept { return status_ == channel_status::closed; }
  explicit operator bool() const noexcept { return ok(); }
  std::optional<T>& value() & noexcept { return value_; }
  std::optional<T>&& value() && noexcept { return std::move(value_); }
  T& operator*() & noexcept { return *value_; }
  T* operator->() noexcept { return &*value_; }

 private:
  channel_status status_;
  std::optional<T> value_;
};

// Result of try_recv_n: how many values were moved, and the channel's state:
// ok (count() > 0), empty (count() == 0: nothing now, more may come) or
// closed (count() == 0: closed, and nothing more will ever arrive, so a loop
// may stop; no accepted value is left behind).
class recv_n_result {
 public:
  recv_n_result(channel_status s, std::size_t count) noexcept : status_(s), count_(count) {}

  channel_status status() const noexcept { return status_; }
  std::size_t count() const noexcept { return count_; }
  bool ok() const noexcept { return status_ == channel_status::ok; }
  bool closed() const noexcept { return status_ == channel_status::closed; }
  explicit operator bool() const noexcept { return ok(); }

 private:
  channel_status status_;
  std::size_t count_;
};

namespace detail {

struct select_access;  // runnel::select's way to the shared state (select.hpp)

// Shared code of the two handle kinds: counting, emptiness checks, close.
template <class T, std::atomic<std::size_t> channel_state<T>::*Count>
class channel_handle {
 public:
  channel_handle() noexcept = default;
  explicit channel_handle(std::shared_ptr<channel_state<T>> s) noexcept : s_(std::move(s)) {
    // Relaxed: a new handle is made from an existing one (or at creation), so
    // the count cannot reach zero concurrently.
    if (s_) ((*s_).*Count).fetch_add(1, std::memory_order_relaxed);
  }
  channel_handle(const channel_handle& o) noexcept : channel_handle(o.s_) {}
  channel_handle(channel_handle&& o) noexcept : s_(std::move(o.s_)) {}
  channel_handle& operator=(channel_handle o) noexcept {
    std::swap(s_, o.s_);
    return *this;
  }
  ~channel_handle() { reset(); }

  // Drops this handle (closing the channel if it was the last of its kind).
  void reset() noexcept {
    if (!s_) return;
    // Acq_rel: the last handle's close must come after every other handle's
    // operations (release), and see them (acquire).
    const std::size_t before = ((*s_).*Count).fetch_sub(1, std::memory_order_acq_rel);
    RUNNEL_ASSERT(before != 0, "a handle is counted from its construction until its reset, once");
    if (before == 1) s_->close();
    s_.reset();
  }

  bool valid() const noexcept { return s_ != nullptr; }
  void close() { state().close(); }
  // True once closed. Values accepted before the close may still be queued
  // or being moved in: a receiver stops on a receive's closed status.
  bool is_closed() const { return state().is_closed(); }
  std::size_t capacity() const { return state().capacity(); }
  std::size_t size_approx() const { return state().size_approx(); }

 protected:
  channel_state<T>& state() const {
    if (!s_) throw std::logic_error(empty_message);
    return *s_;
  }
  std::shared_ptr<channel_state<T>> s_;
  static constexpr const char* empty_message =
      Count == &channel_state<T>::senders
          ? "runnel::sender: used while empty (default-constructed or moved-from)"
          : "runnel::receiver: used while empty (default-constructed or moved-from)";

  friend struct runnel::pipeline_access<T>;
  friend struct select_access;
};

}  // namespace detail

template <class T>
class sender : public detail::channel_handle<T, &detail::channel_state<T>::senders> {
  using base = detail::channel_handle<T, &detail::channel_state<T>::senders>;

 public:
  using value_type = T;
  using base::base;

  // Waits while the channel is full. Fails only when the channel is closed,
  // handing the value back.
  [[nodiscard("a failed send hands the value back in the result")]] send_result<T> send(T value) {
    detail::check_may_block("sender::send");
    auto& s = this->state();
    return result(s.send(value), value);
  }

  // Never waits for room: ok, full (every cell holds a value no receiver
  // has started to take) or closed; the value comes back unless ok.
  [[nodiscard("a full or closed channel hands the value back in the result")]] send_result<T> try_send(T value) {
    auto& s = this->state();
    return result(s.try_send(value), value);
  }

  // As send(), giving up after `timeout` (status timeout, value handed back).
  template <class Rep, class Period>
  [[nodiscard("a failed send hands the value back in the result")]] send_result<T> send_for(T value, std::chrono::duration<Rep, Period> timeout) {
    detail::check_may_block("sender::send_for");
    auto& s = this->state();
    return result(s.send_until(value, detail::deadline_after(timeout)), value);
  }

 private:
  static send_result<T> result(channel_status st, T& v) noexcept {
    if (st == channel_status::ok) return {st, std::nullopt};
    return {st, std::optional<T>(std::move(v))};
  }
};

template <class T>
class receiver : public detail::channel_handle<T, &detail::channel_state<T>::receivers> {
  using base = detail::channel_handle<T, &detail::channel_state<T>::receivers>;

 public:
  using value_type = T;
  using base::base;

  // Waits for a value; nullopt only when the channel is closed and drained.
  [[nodiscard("discarding the result destroys the received value")]] std::optional<T> recv() {
    detail::check_may_block("receiver::recv");
    std::optional<T> out;
    this->state().recv(out);
    return out;
  }

  // Never waits for a value: ok (value engaged), empty (no completed send
  // left unreceived), or closed (closed, nothing more will ever arrive).
  [[nodiscard("discarding the result destroys the received value")]] recv_result<T> try_recv() {
    std::optional<T> out;
    const channel_status st = this->state().try_recv(out);
    return {st, std::move(out)};
  }

  // As recv(), giving up after `timeout` (status timeout).
  template <class Rep, class Period>
  [[nodiscard("discarding the result destroys the received value")]] recv_result<T> recv_for(std::chrono::duration<Rep, Period> timeout) {
    detail::check_may_block("receiver::recv_for");
    std::optional<T> out;
    const channel_status st = this->state().recv_until(out, detail::deadline_after(timeout));
    return {st, std::move(out)};
  }

  // Moves up to n available values to *out, *(out+1), ... as try_recv does
  // one; count() says how many. Stop on closed(), not on is_closed(): a
  // channel can be closed while a send accepted before the close is still
  // moving its value in.
  template <class OutputIt>
  recv_n_result try_recv_n(OutputIt out, std::size_t n) {
    static_assert(noexcept(*out = std::declval<T&&>()),
                  "runnel: try_recv_n needs a noexcept assignment through the output iterator");
    const auto k = this->state().try_recv_n(
        [&out](T&& v) noexcept {
          *out = std::move(v);
          ++out;
        },
        n);
    if (!k) return {channel_status::closed, 0};
    return {*k == 0 ? channel_status::empty : channel_status::ok, *k};
  }

  // Waiting on several channels at once (a value from whichever is ready
  // first, or room in whichever has room): runnel::select, try_select and
  // select_for with recv_arm(rx) / send_arm(tx, v), in select.hpp.

  // Input iteration with blocking recv(): `for (T& v : rx)` ends when the
  // channel is closed and drained.
  class iterator {
   public:
    using iterator_category = std::input_iterator_tag;
    using value_type = T;
    using difference_type = std::ptrdiff_t;
    using pointer = T*;
    using reference = T&;

    iterator() noexcept = default;
    explicit iterator(receiver* rx) : rx_(rx) { ++*this; }
    T& operator*() const noexcept { return *cur_; }
    T* operator->() const noexcept { return &*cur_; }
    iterator& operator++() {
      cur_ = rx_->recv();
      if (!cur_) rx_ = nullptr;
      return *this;
    }
    void operator++(int) { ++*this; }
    friend bool operator==(const iterator& a, std::default_sentinel_t) noexcept {
      return a.rx_ == nullptr;
    }

   private:
    receiver* rx_ = nullptr;
    mutable std::optional<T> cur_;
  };

  iterator begin() { return iterator(this); }
  std::default_sentinel_t end() const noexcept { return {}; }
};

// Creates a channel holding at least `capacity` values.
template <class T>
[[nodiscard("the channel closes as soon as its last sender or receiver is destroyed")]] auto make_channel(std::size_t capacity) {
  // The ring's checks would name the ring; name the call the user made.
  if (capacity == 0) throw std::invalid_argument("runnel::make_channel: capacity must be at least 1");
  std::shared_ptr<detail::channel_state<T>> s;
  try {
    s = std::make_shared<detail::channel_state<T>>(capacity);
  } catch (const std::length_error&) {
    throw std::length_error("runnel::make_channel: capacity " + std::to_string(capacity) +
                            " is too large (storage size overflows)");
  }
  return std::pair<sender<T>, receiver<T>>(sender<T>(s), receiver<T>(s));
}

}  // namespace runnel
