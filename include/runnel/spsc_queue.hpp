// runnel::spsc_queue<T>: a bounded lock-free queue for exactly one producer
// thread and one consumer thread.
//
// Each side owns its index and keeps a private copy of the other side's,
// refreshed only when the copy says full (producer) or empty (consumer). So
// the hot path is a plain load and a release store, with no read-modify-write,
// and the shared index lines move between cores once per "lap" of the cache
// rather than once per value.
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
        slots_(std::make_unique<slot[]>(mask_ + 1)) {}
  spsc_queue(const spsc_queue&) = delete;
  spsc_queue& operator=(const spsc_queue&) = delete;

  ~spsc_queue() {
    if constexpr (!std::is_trivially_destructible_v<T>) {
      // Relaxed: destruction happens-after every other use of the queue.
      const std::size_t tail = tail_.load(std::memory_order_relaxed);
      for (std::size_t i = head_.load(std::memory_order_relaxed); i != tail; ++i)
        slots_[i & mask_].value()->~T();
    }
  }

  // ---- producer side ----------------------------------------------------

  bool try_push(T&& v) noexcept {
    slot* s = claim_push();
    if (s == nullptr) return false;
    ::new (static_cast<void*>(s->storage)) T(std::move(v));
    publish_push(1);
    return true;
  }

  bool try_push(const T& v) requires std::is_copy_constructible_v<T> {
    T copy(v);
    return try_push(std::move(copy));
  }

  template <class... Args>
  bool try_emplace(Args&&... args) noexcept(std::is_nothrow_constructible_v<T, Args...>) {
    slot* s = claim_push();
    if (s == nullptr) return false;
    // Only the producer writes tail_, so a throwing constructor simply leaves
    // the slot unpublished: nothing is lost and the queue stays valid.
    ::new (static_cast<void*>(s->storage)) T(std::forward<Args>(args)...);
    publish_push(1);
    return true;
  }

  // Moves up to n values from first; returns how many (a prefix).
  template <class InputIt>
  std::size_t try_push_n(InputIt first, std::size_t n) noexcept {
    const std::size_t tail = local_tail_;
    std::size_t room = capacity() - (tail - head_cache_);
    if (room < n) {
      // Acquire: the consumer has finished with the slots it released.
      head_cache_ = head_.load(std::memory_order_acquire);
      room = capacity() - (tail - head_cache_);
    }
    const std::size_t k = n < room ? n : room;
    for (std::size_t i = 0; i < k; ++i, ++first)
      ::new (static_cast<void*>(slots_[(tail + i) & mask_].storage)) T(std::move(*first));
    if (k != 0) publish_push(k);
    return k;
  }

  void push(T&& v) noexcept {
    detail::spin_then_park(not_full_, [&] { return claim_push() != nullptr; });
    ::new (static_cast<void*>(slots_[local_tail_ & mask_].storage)) T(std::move(v));
    publish_push(1);
  }

  void push(const T& v) requires std::is_copy_constructible_v<T> {
    T copy(v);
    push(std::move(copy));
  }

  // ---- consumer side ----------------------------------------------------

  bool try_pop(T& out) noexcept {
    static_assert(std::is_nothrow_move_assignable_v<T>,
                  "runnel: try_pop(T&) needs a noexcept move assignment; use the optional<T> form");
    slot* s = claim_pop();
    if (s == nullptr) return false;
    out = std::move(*s->value());
    s->value()->~T();
    publish_pop(1);
    return true;
  }

  std::optional<T> try_pop() noexcept {
    std::optional<T> out;
    slot* s = claim_pop();
    if (s == nullptr) return out;
    out.emplace(std::move(*s->value()));
    s->value()->~T();
    publish_pop(1);
    return out;
  }

  template <class OutputIt>
  std::size_t try_pop_n(OutputIt out, std::size_t n) noexcept {
    static_assert(noexcept(*out = std::declval<T&&>()),
                  "runnel: try_pop_n needs a noexcept assignment through the output iterator");
    const std::size_t head = local_head_;
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
    if (k != 0) publish_pop(k);
    return k;
  }

  T pop() noexcept {
    detail::spin_then_park(not_empty_, [&] { return claim_pop() != nullptr; });
    T* v = slots_[local_head_ & mask_].value();
    T out(std::move(*v));
    v->~T();
    publish_pop(1);
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
  slot* claim_push() noexcept {
    const std::size_t tail = local_tail_;
    if (tail - head_cache_ == capacity()) {
      // Acquire: pairs with publish_pop(); the consumer is done with the slot.
      head_cache_ = head_.load(std::memory_order_acquire);
      if (tail - head_cache_ == capacity()) return nullptr;
    }
    return &slots_[tail & mask_];
  }

  void publish_push(std::size_t k) noexcept {
    local_tail_ += k;
    // Release: the values are constructed before the consumer sees the index.
    tail_.store(local_tail_, std::memory_order_release);
    not_empty_.notify_one();
  }

  slot* claim_pop() noexcept {
    const std::size_t head = local_head_;
    if (head == tail_cache_) {
      // Acquire: pairs with publish_push(); the value is constructed.
      tail_cache_ = tail_.load(std::memory_order_acquire);
      if (head == tail_cache_) return nullptr;
    }
    return &slots_[head & mask_];
  }

  void publish_pop(std::size_t k) noexcept {
    local_head_ += k;
    // Release: the values are moved out and destroyed before the producer
    // may reuse the slots.
    head_.store(local_head_, std::memory_order_release);
    not_full_.notify_one();
  }

  // Read-only after construction.
  alignas(detail::false_sharing_range) const std::size_t mask_;
  const std::unique_ptr<slot[]> slots_;
  // Producer's line: its own index copy and its cache of the consumer's.
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
