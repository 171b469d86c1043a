// runnel::spsc_queue<T>: a bounded lock-free queue for exactly one producer
// thread and one consumer thread.
//
// Each side owns its index and keeps a private copy of the other side's,
// refreshed only when the copy says full (producer) or empty (consumer). So
// the hot path is a plain load and a release store, with no read-modify-write,
// and the shared index lines move between cores once per "lap" of the cache
// rather than once per value.
//
// The blocking push()/pop() also slip: a side that catches up with a
// streaming partner waits a short fixed time (32 pause instructions) so
// that it then works a batch behind instead of on the neighbouring slot;
// see wait_at_edge(). That trades up to that much latency, only while
// values stream, for 2-4x throughput with 64-byte values in the 1P1C
// benchmark (queue_bench, spsc/64B/1P1C). The try forms never wait.
//
// Same guarantees as mpmc_queue (exactly once, FIFO, noexcept move required,
// capacity rounded up to a power of two), for one producer and one consumer.
// Using it from more threads is undefined behaviour.
#pragma once

#include <atomic>
#include <cstddef>
#include <memory>
#include <new>
#include <optional>
#include <type_traits>
#include <utility>

#include "detail/assert.hpp"
#include "detail/cache_line.hpp"
#include "detail/event_count.hpp"
#include "detail/ring_common.hpp"

namespace runnel {

template <class T>
class spsc_queue {
  static_assert(detail::ring_element<T>);

  struct slot {
    alignas(T) unsigned char storage[sizeof(T)];
    T* value() noexcept { return std::launder(reinterpret_cast<T*>(storage)); }
  };

 public:
  using value_type = T;

  explicit spsc_queue(std::size_t capacity)
      : mask_(detail::checked_ring_capacity(capacity, sizeof(slot), "runnel::spsc_queue") - 1),
        slots_(std::make_unique<slot[]>(mask_ + 1)) {
    check_layout();
  }
  spsc_queue(const spsc_queue&) = delete;
  spsc_queue& operator=(const spsc_queue&) = delete;

  ~spsc_queue() {
    // Relaxed: destruction happens-after every other use of the queue.
    [[maybe_unused]] const std::size_t head = head_.load(std::memory_order_relaxed);
    [[maybe_unused]] const std::size_t tail = tail_.load(std::memory_order_relaxed);
    RUNNEL_ASSERT(tail - head <= capacity() && head == local_head_ && tail == local_tail_,
                  "at destruction at most capacity values are queued and each side's copy of its index is the "
                  "published one");
    if constexpr (!std::is_trivially_destructible_v<T>) {
      for (std::size_t i = head; i != tail; ++i) slots_[i & mask_].value()->~T();
    }
  }

  // ---- producer side ----------------------------------------------------

  [[nodiscard("on false the value was not pushed and is still yours")]] bool try_push(T&& v) noexcept {
    const std::size_t tail = own_tail();
    if (!room_at(tail)) return false;
    ::new (static_cast<void*>(slots_[tail & mask_].storage)) T(std::move(v));
    publish_push(tail + 1);
    return true;
  }

  [[nodiscard("on false the value was not pushed")]] bool try_push(const T& v) requires std::is_copy_constructible_v<T> {
    T copy(v);
    return try_push(std::move(copy));
  }

  template <class... Args>
  [[nodiscard("on false nothing was constructed")]] bool try_emplace(Args&&... args) noexcept(std::is_nothrow_constructible_v<T, Args...>) {
    const std::size_t tail = own_tail();
    if (!room_at(tail)) return false;
    // Only the producer writes tail_, so a throwing constructor simply leaves
    // the slot unpublished: nothing is lost and the queue stays valid.
    ::new (static_cast<void*>(slots_[tail & mask_].storage)) T(std::forward<Args>(args)...);
    publish_push(tail + 1);
    return true;
  }

  // Moves up to n values from first; returns how many (a prefix).
  template <class InputIt>
  [[nodiscard("only that many values were moved in; the rest are still yours")]] std::size_t try_push_n(InputIt first, std::size_t n) noexcept {
    const std::size_t tail = own_tail();
    std::size_t room = capacity() - (tail - head_cache_);
    if (room < n) {
      // Acquire: the consumer has finished with the slots it released.
      head_cache_ = head_.load(std::memory_order_acquire);
      room = capacity() - (tail - head_cache_);
    }
    const std::size_t k = n < room ? n : room;
    for (std::size_t i = 0; i < k; ++i, ++first)
      ::new (static_cast<void*>(slots_[(tail + i) & mask_].storage)) T(std::move(*first));
    if (k != 0) publish_push(tail + k);
    return k;
  }

  void push(T&& v) noexcept {
    const std::size_t tail = own_tail();
    if (!room_at(tail)) wait_for_room(tail);
    ::new (static_cast<void*>(slots_[tail & mask_].storage)) T(std::move(v));
    publish_push(tail + 1);
  }

  void push(const T& v) requires std::is_copy_constructible_v<T> {
    T copy(v);
    push(std::move(copy));
  }

  // ---- consumer side ----------------------------------------------------

  [[nodiscard("on false nothing was popped and out is unchanged")]] bool try_pop(T& out) noexcept {
    static_assert(std::is_nothrow_move_assignable_v<T>,
                  "runnel: try_pop(T&) needs a noexcept move assignment; use the optional<T> form");
    const std::size_t head = own_head();
    if (!item_at(head)) return false;
    T* v = slots_[head & mask_].value();
    out = std::move(*v);
    v->~T();
    publish_pop(head + 1);
    return true;
  }

  [[nodiscard("discarding the result destroys the popped value")]] std::optional<T> try_pop() noexcept {
    std::optional<T> out;
    const std::size_t head = own_head();
    if (!item_at(head)) return out;
    T* v = slots_[head & mask_].value();
    out.emplace(std::move(*v));
    v->~T();
    publish_pop(head + 1);
    return out;
  }

  template <class OutputIt>
  [[nodiscard("only that many outputs were written")]] std::size_t try_pop_n(OutputIt out, std::size_t n) noexcept {
    static_assert(noexcept(*out = std::declval<T&&>()),
                  "runnel: try_pop_n needs a noexcept assignment through the output iterator");
    const std::size_t head = own_head();
    std::size_t avail = tail_cache_ - head;
    if (avail < n) {
      // Acquire: pairs with publish_push(), the values are constructed.
      tail_cache_ = tail_.load(std::memory_order_acquire);
      avail = tail_cache_ - head;
    }
    const std::size_t k = n < avail ? n : avail;
    for (std::size_t i = 0; i < k; ++i, ++out) {
      T* v = slots_[(head + i) & mask_].value();
      *out = std::move(*v);
      v->~T();
    }
    if (k != 0) publish_pop(head + k);
    return k;
  }

  [[nodiscard("discarding the result destroys the popped value")]] T pop() noexcept {
    const std::size_t head = own_head();
    if (!item_at(head)) wait_for_item(head);
    T* v = slots_[head & mask_].value();
    T out(std::move(*v));
    v->~T();
    publish_pop(head + 1);
    return out;
  }

  // ---- observers ----------------------------------------------------------

  std::size_t capacity() const noexcept { return mask_ + 1; }
  std::size_t size_approx() const noexcept {
    // Relaxed: a monitoring snapshot; clamped because the indices are read at
    // different moments.
    const std::size_t head = head_.load(std::memory_order_relaxed);
    const std::size_t tail = tail_.load(std::memory_order_relaxed);
    const std::size_t d = tail - head;
    return d > capacity() ? (static_cast<std::ptrdiff_t>(d) < 0 ? 0 : capacity()) : d;
  }
  bool empty_approx() const noexcept { return size_approx() == 0; }

 private:
  std::size_t own_tail() const noexcept { return local_tail_; }
  std::size_t own_head() const noexcept { return local_head_; }

  // Producer: is slot `tail` free? Reads the consumer's index only when the
  // cached copy says full.
  bool room_at(std::size_t tail) noexcept {
    if (tail - head_cache_ != capacity()) return true;
    // Acquire: pairs with publish_pop(); the consumer is done with the slot.
    head_cache_ = head_.load(std::memory_order_acquire);
    return tail - head_cache_ != capacity();
  }

  void publish_push(std::size_t new_tail) noexcept {
    RUNNEL_ASSERT(new_tail - local_tail_ - 1 < capacity() && new_tail - head_cache_ <= capacity(),
                  "the producer moves forward and never more than capacity ahead of the head it last read");
    local_tail_ = new_tail;
    // Release: the values are constructed before the consumer sees the index.
    tail_.store(new_tail, std::memory_order_release);
    not_empty_.notify_one();
  }

  // Consumer: does slot `head` hold a value? Reads the producer's index only
  // when the cached copy says empty.
  bool item_at(std::size_t head) noexcept {
    if (head != tail_cache_) return true;
    // Acquire: pairs with publish_push(); the value is constructed.
    tail_cache_ = tail_.load(std::memory_order_acquire);
    return head != tail_cache_;
  }

  // The blocking forms' slow paths, out of line and taking the index by
  // value: a lambda capturing the caller's index by reference would keep it
  // in memory, and the fast path would pay a store-to-load round trip on it.
  [[gnu::noinline]] void wait_for_room(const std::size_t tail) noexcept {
    auto room = [this, tail] { return room_at(tail); };
    // Free slots ahead of us once the wait ends.
    auto lead = [this, tail] { return capacity() - (tail - head_cache_); };
    wait_at_edge(not_full_, room, lead, head_, head_cache_);
  }

  [[gnu::noinline]] void wait_for_item(const std::size_t head) noexcept {
    auto item = [this, head] { return item_at(head); };
    // Values ahead of us once the wait ends.
    auto lead = [this, head] { return tail_cache_ - head; };
    wait_at_edge(not_empty_, item, lead, tail_, tail_cache_);
  }

  // The blocking forms' wait, with temporal slipping.
  //
  // When the consumer catches up with a producer that is still streaming (or
  // the producer with a consumer, at the full end), the two threads work on
  // neighbouring slots: every value then costs a transfer of the index line
  // and of the slot's line between the cores, each way. Measured on the
  // 64-byte ring benchmark that is 2-4x slower than working a batch apart.
  // So when the wait ends almost at once (the other side is streaming) and
  // fewer than slip_items_ are ready, we pause a fixed short time without
  // touching shared lines, and then take what has piled up with one read of
  // the other index. A wait that lasted longer (the other side was idle, or
  // is a request/response partner) does not slip, so a lone value is not
  // delayed; a streaming value may wait up to slip_pauses more.
  template <class Ready, class Lead>
  void wait_at_edge(detail::event_count& ec, Ready& ready, Lead& lead,
                    const std::atomic<std::size_t>& other_index, std::size_t& other_cache) noexcept {
    detail::cpu_relax();
    if (!ready()) {
      detail::spin_then_park_slow(ec, ready);
      return;
    }
    if (lead() >= slip_items_) return;
    for (int i = 0; i < slip_pauses; ++i) detail::cpu_relax();
    // Acquire: as in room_at() / item_at(), whose cache this refreshes.
    other_cache = other_index.load(std::memory_order_acquire);
  }

  void publish_pop(std::size_t new_head) noexcept {
    RUNNEL_ASSERT(new_head - local_head_ - 1 < capacity() && tail_cache_ - new_head <= capacity(),
                  "the consumer moves forward and never past the tail it last read");
    // Release: the values are moved out and destroyed before the producer
    // may reuse the slots.
    local_head_ = new_head;
    head_.store(new_head, std::memory_order_release);
    not_full_.notify_one();
  }

  // The padding below is computed by hand: each side's private line, each
  // shared index and each event count sit a false-sharing range apart.
  void check_layout() const noexcept {
    constexpr std::size_t range = detail::false_sharing_range;
    static_assert(offsetof(spsc_queue, local_tail_) - offsetof(spsc_queue, mask_) >= range,
                  "the producer's line is a false-sharing range away from the read-only fields");
    static_assert(offsetof(spsc_queue, local_head_) - offsetof(spsc_queue, local_tail_) >= range,
                  "the producer's and the consumer's lines are a false-sharing range apart");
    static_assert(offsetof(spsc_queue, tail_) - offsetof(spsc_queue, local_head_) >= range,
                  "tail_ is a false-sharing range away from the consumer's line");
    static_assert(offsetof(spsc_queue, head_) - offsetof(spsc_queue, tail_) >= range,
                  "head_ and tail_ are a false-sharing range apart");
    static_assert(offsetof(spsc_queue, not_empty_) - offsetof(spsc_queue, head_) >= range,
                  "not_empty_ is a false-sharing range away from head_");
    static_assert(offsetof(spsc_queue, not_full_) - offsetof(spsc_queue, not_empty_) >= range,
                  "the two event counts are a false-sharing range apart");
  }

  // Slipping (see wait_at_edge): aim for two 128-byte blocks of values per
  // batch, at least 4 values, at most half the ring; and pause for about
  // 0.2-1.5 us, depending on the CPU's pause latency.
  static constexpr std::size_t slip_target = 2 * detail::false_sharing_range / sizeof(slot) > 4
                                                 ? 2 * detail::false_sharing_range / sizeof(slot)
                                                 : 4;
  static constexpr int slip_pauses = 32;

  // Read-only after construction.
  alignas(detail::false_sharing_range) const std::size_t mask_;
  const std::size_t slip_items_ = slip_target < (mask_ + 1) / 2 ? slip_target : (mask_ + 1) / 2;
  const std::unique_ptr<slot[]> slots_;
  // Producer's line: its own index and its cache of the consumer's, both
  // touched by the producer only (the consumer reads tail_ below).
  alignas(detail::false_sharing_range) std::size_t local_tail_ = 0;
  std::size_t head_cache_ = 0;
  // Consumer's line.
  alignas(detail::false_sharing_range) std::size_t local_head_ = 0;
  std::size_t tail_cache_ = 0;
  // Shared indices, each written by one side only.
  alignas(detail::false_sharing_range) std::atomic<std::size_t> tail_{0};
  alignas(detail::false_sharing_range) std::atomic<std::size_t> head_{0};
  alignas(detail::false_sharing_range) detail::event_count not_empty_;
  alignas(detail::false_sharing_range) detail::event_count not_full_;
};

}  // namespace runnel
