// A growable work-stealing deque of pointers: the owning worker pushes and
// pops at the bottom (LIFO, cache-warm), thieves steal at the top (FIFO, the
// oldest and usually largest pieces of work).
//
// Algorithm: the dynamic circular work-stealing deque of Chase and Lev
// (SPAA 2005), with the C11 memory orders of Lê, Pop, Cohen and Zappa
// Nardelli, "Correct and Efficient Work-Stealing for Weak Memory Models"
// (PPoPP 2013). Where the paper places seq_cst fences (between the store and
// the load of pop, and between the two loads of steal) we make those accesses
// seq_cst operations instead: they sit in the single total order S, which is
// exactly what the proof needs (pop's store of bottom precedes its load of
// top in S, and a thief that reads a top written after that load must also
// read the new bottom), and ThreadSanitizer understands seq_cst operations
// but not stand-alone fences.
//
// Invariants:
//   top_ only grows (CAS by thieves, and by the owner for the last element);
//   bottom_ is written only by the owner;
//   [top_, bottom_) are the live elements of the current buffer;
//   a buffer replaced by growth stays allocated until the deque dies, since
//   a thief may still read an element from it (it holds the same values);
//   elements are never null (null is the "nothing" answer).
// The checks that cost nothing but a compare are RUNNEL_ASSERTs.
//
// Atomics: the atomic family (detail/atomic_family.hpp); std_atomics except
// under the model checker (tests/relacy/relacy_deque_test.cpp).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "../detail/assert.hpp"
#include "../detail/atomic_family.hpp"
#include "../detail/cache_line.hpp"

namespace runnel::detail {

template <class T, class Atomics = std_atomics>
class work_stealing_deque {
  static_assert(std::is_pointer_v<T>, "elements are pointers (null means 'nothing')");

  template <class U>
  using atomic = typename Atomics::template atomic<U>;

  struct buffer {
    explicit buffer(std::int64_t cap) : mask(cap - 1), slots(new atomic<T>[static_cast<std::size_t>(cap)]) {
      RUNNEL_ASSERT(cap >= 2 && (cap & (cap - 1)) == 0, "a buffer's capacity is a power of two");
    }
    std::int64_t capacity() const noexcept { return mask + 1; }
    // Slots are atomics only because a thief may read a slot the owner is
    // overwriting after a wrap-around (the thief's CAS then fails and the
    // value is discarded). Relaxed: the element's contents are published by
    // the release store of bottom_ and the acquire loads that read it.
    T get(std::int64_t i) const noexcept { return slots[static_cast<std::size_t>(i & mask)].load(std::memory_order_relaxed); }
    void put(std::int64_t i, T v) noexcept { slots[static_cast<std::size_t>(i & mask)].store(v, std::memory_order_relaxed); }

    const std::int64_t mask;
    const std::unique_ptr<atomic<T>[]> slots;
  };

 public:
  explicit work_stealing_deque(std::int64_t initial_capacity = 256) {
    std::int64_t cap = 2;
    while (cap < initial_capacity) cap <<= 1;
    auto b = std::make_unique<buffer>(cap);
    // Relaxed: the deque is handed to other threads after construction.
    buffer_.store(b.get(), std::memory_order_relaxed);
    buffers_.push_back(std::move(b));
  }

  work_stealing_deque(const work_stealing_deque&) = delete;
  work_stealing_deque& operator=(const work_stealing_deque&) = delete;

  // Owner only. Never fails (grows instead); may throw std::bad_alloc while
  // growing, in which case the deque is unchanged.
  void push(T v) {
    RUNNEL_ASSERT(v != nullptr, "null is the 'nothing' answer, never an element");
    // Relaxed: bottom_ is written only by this thread.
    const std::int64_t b = bottom_.load(std::memory_order_relaxed);
    // Acquire: pairs with a thief's CAS on top_, so its read of a slot is
    // done before we overwrite that slot on a later lap.
    const std::int64_t t = top_.load(std::memory_order_acquire);
    // Relaxed: buffer_ is written only by this thread.
    buffer* buf = buffer_.load(std::memory_order_relaxed);
    // Outside pop() top_ never passes bottom_; our t may be stale, so smaller.
    RUNNEL_ASSERT(t <= b, "top passed bottom outside pop()");
    if (b - t > buf->capacity() - 1) buf = grow(buf, t, b);
    RUNNEL_ASSERT(b - t < buf->capacity(), "the live elements and the new one fit the buffer");
    buf->put(b, v);
    // Release: the element (and what it points to) is visible to a thief
    // that reads the new bottom.
    bottom_.store(b + 1, std::memory_order_release);
  }

  // Owner only. Newest element, or nullptr when empty (or a thief took the
  // last one).
  T pop() noexcept {
    // Relaxed: only this thread writes bottom_ and buffer_.
    const std::int64_t b = bottom_.load(std::memory_order_relaxed) - 1;
    // Cheap exit when surely empty: top_ never decreases, so a top_ at or past
    // our bottom stays so until we push. Relaxed: a stale (smaller) top_ only
    // sends us down the full path. Saves the seq_cst store on an idle worker.
    if (top_.load(std::memory_order_relaxed) > b) return nullptr;
    buffer* buf = buffer_.load(std::memory_order_relaxed);
    // seq_cst store then seq_cst load: the StoreLoad order of the paper's
    // fence. Thieves that read top_ later than our load see this bottom.
    bottom_.store(b, std::memory_order_seq_cst);
    std::int64_t t = top_.load(std::memory_order_seq_cst);
    // Thieves move top_ only up to the bottom_ they read, at most b + 1.
    RUNNEL_ASSERT(t <= b + 1, "top passed the old bottom");
    if (t > b) {
      // Empty. Release: keeps every store of bottom_ a release, so a thief
      // reading any of them also sees all earlier pushes.
      bottom_.store(b + 1, std::memory_order_release);
      return nullptr;
    }
    T v = buf->get(b);
    RUNNEL_ASSERT(v != nullptr, "a live slot holds an element");
    if (t == b) {
      // The last element: race the thieves for it on top_.
      // Relaxed on failure: we return nothing and read nothing more.
      if (!top_.compare_exchange_strong(t, t + 1, std::memory_order_seq_cst, std::memory_order_relaxed))
        v = nullptr;
      bottom_.store(b + 1, std::memory_order_release);  // Release: as above.
    }
    return v;
  }

  // Any thread. Oldest element, or nullptr when empty or when another thief
  // (or the owner) won the race for it; callers that must know whether the
  // deque is empty check empty() afterwards.
  T steal() noexcept {
    std::int64_t t = top_.load(std::memory_order_seq_cst);
    const std::int64_t b = bottom_.load(std::memory_order_seq_cst);
    if (t >= b) return nullptr;
    // Acquire: pairs with the release store in grow(), so the new buffer's
    // copied slots are visible.
    buffer* buf = buffer_.load(std::memory_order_acquire);
    T v = buf->get(t);
    // Relaxed on failure: the value is discarded.
    if (!top_.compare_exchange_strong(t, t + 1, std::memory_order_seq_cst, std::memory_order_relaxed))
      return nullptr;
    // Our CAS won slot t while t < b, so the slot held a pushed element.
    RUNNEL_ASSERT(v != nullptr, "a stolen slot holds an element");
    return v;
  }

  // A snapshot; exact only when the owner is not running.
  std::int64_t size() const noexcept {
    const std::int64_t b = bottom_.load(std::memory_order_seq_cst);
    const std::int64_t t = top_.load(std::memory_order_seq_cst);
    return b > t ? b - t : 0;
  }
  bool empty() const noexcept { return size() == 0; }

 private:
  buffer* grow(buffer* old, std::int64_t t, std::int64_t b) {
    auto bigger = std::make_unique<buffer>(old->capacity() * 2);
    for (std::int64_t i = t; i < b; ++i) bigger->put(i, old->get(i));
    buffer* nb = bigger.get();
    buffers_.push_back(std::move(bigger));  // may throw: then nothing changed
    // Release: the copied slots are visible to a thief that loads nb.
    buffer_.store(nb, std::memory_order_release);
    return nb;
  }

  static constexpr std::size_t tail_bytes = sizeof(atomic<buffer*>) + sizeof(std::vector<int>);

  alignas(false_sharing_range) atomic<std::int64_t> top_{0};
  alignas(false_sharing_range) atomic<std::int64_t> bottom_{0};
  atomic<buffer*> buffer_{nullptr};
  std::vector<std::unique_ptr<buffer>> buffers_;  // owner only; all buffers ever used
  // (A model checker's atomics outgrow a line; they need no padding.)
  char pad_[tail_bytes < false_sharing_range ? false_sharing_range - tail_bytes : 1]{};
};

}  // namespace runnel::detail
