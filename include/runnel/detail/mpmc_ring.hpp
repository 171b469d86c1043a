// The bounded lock-free MPMC ring under runnel::mpmc_queue, the channels and
// the pool's injection queue: try-operations only, no waiting.
//
// Algorithm: Dmitry Vyukov's bounded MPMC queue. Every cell carries a
// sequence number that says whose turn it is:
//   seq == pos          the cell is free for the producer claiming `pos`;
//   seq == pos + 1      it holds the value pushed at `pos`, ready for the
//                       consumer claiming `pos`;
//   seq == pos + cap    free again, for the producer of the next lap.
// Producers claim positions by CAS on `tail_`, consumers by CAS on `head_`, and
// the claim happens only after the cell's sequence said the cell is ready.
// Values of one producer get increasing positions and each consumer claims
// increasing positions, so per-producer order holds through any number of
// wrap-arounds.
//
// Claimed but not yet done. A producer claims position p, then moves its
// value in, then publishes; a consumer claims, moves the value out, then
// releases. Consumers take positions strictly in order, so while the producer
// of p is between claim and publish (say, inside a slow move constructor, or
// descheduled), the values published at p+1, p+2, ... are invisible: a pop
// finds the cell at head_ not ready. Mirror image for pushes: a consumer
// between claim and release keeps the cell at tail_ - capacity busy. Each
// try-operation therefore comes in two policies (claimed_cell):
//   give_up   never waits for another thread (lock-free): "empty" may also
//             mean "the head cell is claimed by a push still in progress",
//             even with completed pushes behind it; "full" may also mean
//             "the cell a push needs is being emptied by a pop in progress".
//   wait      tells the two apart: it reports empty only when no push has
//             claimed a position that no pop has claimed (tail_ == head_ as
//             read), full only when no pop has claimed the oldest value
//             (tail_ - head_ == capacity as read); otherwise it spins, then
//             yields, until the operation in progress is done. It is then
//             linearizable (a push or pop in progress that holds a claim is
//             ordered before it), at the price of waiting as long as that
//             operation's move constructor (or its thread's descheduling)
//             takes. The wait is never for a value that is not on its way.
// Why relaxed index reads suffice for `wait`: a push that happened-before
// the call made its tail_ CAS before it, so by write-read coherence the
// tail_ the call reads includes it; if that tail_ is <= the head_ position
// the call found, that push's position was already claimed by a pop. Same
// argument, mirrored, for pops and "full".
#pragma once

#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "assert.hpp"
#include "atomic_family.hpp"
#include "cache_line.hpp"
#include "claimed_cell.hpp"
#include "ring_common.hpp"

namespace runnel::detail {

// Atomics: the atomic family (detail/atomic_family.hpp); std_atomics except
// under a model checker.
template <class T, class Atomics = std_atomics>
class mpmc_ring {
  static_assert(ring_element<T>);

  using atomic_size = typename Atomics::template atomic<std::size_t>;

  struct plain_cell {
    atomic_size seq;
    alignas(T) unsigned char storage[sizeof(T)];
  };
  // Small cells are packed several to a cache line: a 1024-cell ring of
  // 8-byte values is then 16 KiB and stays in L1, where one cell per line
  // (64 KiB) does not; that alone was ~1.45x in the one-thread benchmark.
  // Cells of half a line or more get a line (or lines) each.
  static constexpr std::size_t cell_align =
      2 * sizeof(plain_cell) <= cache_line_size ? round_up_pow2(sizeof(plain_cell))
      : alignof(plain_cell) > cache_line_size   ? alignof(plain_cell)
                                                : cache_line_size;

  struct alignas(cell_align) cell : plain_cell {
    T* value() noexcept { return std::launder(reinterpret_cast<T*>(this->storage)); }
  };
  static constexpr std::size_t cells_per_line = cell_align < cache_line_size ? cache_line_size / cell_align : 1;
  // at() maps positions to lines assuming packed cells tile a line exactly
  // and bigger ones start on a line each.
  static_assert(std::has_single_bit(cell_align), "the cell alignment is a power of two");
  static_assert(alignof(cell) == cell_align, "cells are aligned as computed");
  static_assert(cell_align >= cache_line_size ? sizeof(cell) % cache_line_size == 0
                                              : sizeof(cell) * cells_per_line == cache_line_size,
                "packed cells tile a cache line exactly; bigger cells fill whole lines");
  // The array starts on a line boundary, so that each line holds exactly
  // cells_per_line cells.
  static constexpr std::size_t array_align = cell_align > cache_line_size ? cell_align : cache_line_size;

  struct cells_deleter {
    void operator()(cell* p) const noexcept { ::operator delete(p, std::align_val_t{array_align}); }
  };

  static cell* allocate_cells(std::size_t n) {
    // cell is an implicit-lifetime aggregate of an atomic and raw bytes; the
    // loop starts the lifetime of each (the atomic is set in the constructor).
    void* raw = ::operator new(n * sizeof(cell), std::align_val_t{array_align});
    cell* cells = static_cast<cell*>(raw);
    for (std::size_t i = 0; i < n; ++i) ::new (static_cast<void*>(cells + i)) cell{};
    return cells;
  }

  // Where position `pos` lives. With packed cells, consecutive positions go
  // to different lines (the low bits pick the line, the next bits the cell
  // in it), so a producer and a consumer a few positions apart do not write
  // the same line; a line is revisited only every capacity / cells_per_line
  // positions.
  cell& at(std::size_t pos) const noexcept {
    pos &= mask_;
    return cells_[((pos & line_mask_) << slot_bits_) | (pos >> line_bits_)];
  }

 public:
  // At least two cells: with one, "holds the value pushed at pos" (seq ==
  // pos + 1) and "free for the producer of the next lap" (seq == pos + cap)
  // are the same number, so a second push would overwrite an unpopped value.
  // A request for 1 therefore gets 2, which capacity() reports.
  explicit mpmc_ring(std::size_t capacity)
      : mask_((capacity == 1 ? 2 : checked_ring_capacity(capacity, sizeof(cell), "runnel::mpmc_queue")) - 1),
        slot_bits_(static_cast<unsigned>(std::countr_zero(mask_ + 1 < cells_per_line ? mask_ + 1 : cells_per_line))),
        line_bits_(static_cast<unsigned>(std::countr_zero(mask_ + 1)) - slot_bits_),
        line_mask_((std::size_t{1} << line_bits_) - 1),
        cells_(allocate_cells(mask_ + 1)) {
    check_layout();
    for (std::size_t pos = 0; pos <= mask_; ++pos) {
      // Relaxed: the ring is published to other threads by whatever hands
      // them its address, which happens after construction.
      at(pos).seq.store(pos, std::memory_order_relaxed);
    }
  }

  mpmc_ring(const mpmc_ring&) = delete;
  mpmc_ring& operator=(const mpmc_ring&) = delete;

  // Destroys the values still queued, each exactly once. No other thread may
  // use the ring any more.
  ~mpmc_ring() {
    // Relaxed: destruction happens-after every other use of the ring.
    [[maybe_unused]] const std::size_t head = head_.load(std::memory_order_relaxed);
    [[maybe_unused]] const std::size_t tail = tail_.load(std::memory_order_relaxed);
    RUNNEL_ASSERT(sequences_at_rest(head, tail),
                  "at destruction no push or pop is in progress: cells in [head, tail) hold their value "
                  "(seq == pos + 1), the others are free (seq == pos)");
    if constexpr (!std::is_trivially_destructible_v<T>) {
      for (std::size_t pos = head; pos != tail; ++pos) {
        cell& c = at(pos);
        // Relaxed: as above.
        if (c.seq.load(std::memory_order_relaxed) == pos + 1) c.value()->~T();
      }
    }
    // The cells' lifetimes were started by allocate_cells(); with std::atomic
    // there is nothing to end, with a model checker's atomics there is.
    if constexpr (!std::is_trivially_destructible_v<cell>) {
      for (std::size_t i = 0; i <= mask_; ++i) cells_[i].~cell();
    }
  }

  std::size_t capacity() const noexcept { return mask_ + 1; }

  // Claims one position for a push; nullptr when full (see claimed_cell for
  // what "full" means under each policy). On success the caller must
  // construct the value in the returned cell and call publish().
  template <claimed_cell Policy = claimed_cell::give_up>
  cell* claim_push(std::size_t& pos) noexcept {
    // Relaxed: the position is only a guess, validated by the cell's seq.
    pos = tail_.load(std::memory_order_relaxed);
    unsigned round = 0;
    for (;;) {
      cell& c = at(pos);
      // Acquire: pairs with the consumer's release in release_pop(), so the
      // previous lap's value is gone before we construct over it.
      const std::size_t seq = c.seq.load(std::memory_order_acquire);
      const auto dif = static_cast<std::intptr_t>(seq - pos);
      if (dif == 0) {
        // Relaxed: the claim only needs atomicity; the data hand-over is
        // ordered by the cell's seq.
        if (tail_.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) return &c;
      } else if (dif < 0) {
        // The cell still holds last lap's value.
        if constexpr (Policy == claimed_cell::give_up) {
          return nullptr;
        } else {
          if (!pop_in_progress_at(pos)) return nullptr;  // full
          Atomics::pause_for_claim(round);
          pos = tail_.load(std::memory_order_relaxed);
        }
      } else {
        pos = tail_.load(std::memory_order_relaxed);  // another producer won; retry
      }
    }
  }

  void publish(cell* c, std::size_t pos) noexcept {
    // Relaxed: our own claim's cell; nobody else writes it until we publish.
    RUNNEL_ASSERT(c->seq.load(std::memory_order_relaxed) == pos, "a push publishes the cell it claimed, once");
    // Release: the value is constructed before a consumer can see the cell full.
    c->seq.store(pos + 1, std::memory_order_release);
  }

  template <claimed_cell Policy = claimed_cell::give_up>
  bool try_push(T&& v) noexcept {
    std::size_t pos;
    cell* c = claim_push<Policy>(pos);
    if (c == nullptr) return false;
    ::new (static_cast<void*>(c->storage)) T(std::move(v));
    publish(c, pos);
    return true;
  }

  template <claimed_cell Policy = claimed_cell::give_up, class... Args>
  bool try_emplace(Args&&... args) noexcept(std::is_nothrow_constructible_v<T, Args...>) {
    static_assert(std::is_nothrow_constructible_v<T, Args...>,
                  "runnel: try_emplace needs a noexcept constructor (the cell is claimed before "
                  "construction); build the value first and try_push it");
    std::size_t pos;
    cell* c = claim_push<Policy>(pos);
    if (c == nullptr) return false;
    ::new (static_cast<void*>(c->storage)) T(std::forward<Args>(args)...);
    publish(c, pos);
    return true;
  }

  // Moves up to n values from first[0..n) with a single claim; returns how
  // many were moved (a prefix). Values not moved stay with the caller.
  template <claimed_cell Policy = claimed_cell::give_up, class It>
  std::size_t try_push_n(It first, std::size_t n) noexcept {
    if (n == 0) return 0;
    // Relaxed: as in claim_push().
    std::size_t pos = tail_.load(std::memory_order_relaxed);
    std::size_t k;
    unsigned round = 0;
    for (;;) {
      k = 0;
      std::intptr_t dif = 0;
      // Count the free cells after pos. Acquire as in claim_push(). The claim
      // below fails if anyone moved tail_, so what we saw is still ours.
      while (k < n && k <= mask_) {
        const std::size_t seq = at(pos + k).seq.load(std::memory_order_acquire);
        dif = static_cast<std::intptr_t>(seq - (pos + k));
        if (dif != 0) break;
        ++k;
      }
      if (k == 0 && dif < 0) {
        // The first cell still holds last lap's value, as in claim_push().
        if constexpr (Policy == claimed_cell::give_up) {
          return 0;
        } else {
          if (!pop_in_progress_at(pos)) return 0;  // full
          Atomics::pause_for_claim(round);
        }
      }
      if (k != 0 && tail_.compare_exchange_weak(pos, pos + k, std::memory_order_relaxed)) break;
      if (k == 0) pos = tail_.load(std::memory_order_relaxed);
    }
    for (std::size_t i = 0; i < k; ++i, ++first) {
      cell& c = at(pos + i);
      ::new (static_cast<void*>(c.storage)) T(std::move(*first));
      publish(&c, pos + i);
    }
    return k;
  }

  // Claims one position for a pop; nullptr when empty (see claimed_cell for
  // what "empty" means under each policy).
  template <claimed_cell Policy = claimed_cell::give_up>
  cell* claim_pop(std::size_t& pos) noexcept {
    // Relaxed: a guess validated by the cell's seq.
    pos = head_.load(std::memory_order_relaxed);
    unsigned round = 0;
    for (;;) {
      cell& c = at(pos);
      // Acquire: pairs with publish(), so the value is fully constructed.
      const std::size_t seq = c.seq.load(std::memory_order_acquire);
      const auto dif = static_cast<std::intptr_t>(seq - (pos + 1));
      if (dif == 0) {
        // Relaxed: atomicity only, as in claim_push().
        if (head_.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) return &c;
      } else if (dif < 0) {
        // Not yet pushed, or claimed by a push not yet published.
        if constexpr (Policy == claimed_cell::give_up) {
          return nullptr;
        } else {
          if (!push_in_progress_at(pos)) return nullptr;  // empty
          Atomics::pause_for_claim(round);
          pos = head_.load(std::memory_order_relaxed);
        }
      } else {
        pos = head_.load(std::memory_order_relaxed);
      }
    }
  }

  void release_pop(cell* c, std::size_t pos) noexcept {
    // Relaxed: our own claim's cell, as in publish().
    RUNNEL_ASSERT(c->seq.load(std::memory_order_relaxed) == pos + 1, "a pop releases the cell it claimed, once");
    // Release: the value is destroyed before the next lap's producer reuses
    // the cell.
    c->seq.store(pos + mask_ + 1, std::memory_order_release);
  }

  // Pops into `out` by move-assignment.
  bool try_pop(T& out) noexcept {
    static_assert(std::is_nothrow_move_assignable_v<T>,
                  "runnel: try_pop(T&) needs a noexcept move assignment; use the optional<T> form");
    std::size_t pos;
    cell* c = claim_pop(pos);
    if (c == nullptr) return false;
    T* v = c->value();
    out = std::move(*v);
    v->~T();
    release_pop(c, pos);
    return true;
  }

  // Pops by invoking sink(T&&) on the value; sink must not throw.
  template <claimed_cell Policy = claimed_cell::give_up, class Sink>
  bool try_consume(Sink&& sink) noexcept {
    std::size_t pos;
    cell* c = claim_pop<Policy>(pos);
    if (c == nullptr) return false;
    T* v = c->value();
    std::forward<Sink>(sink)(std::move(*v));
    v->~T();
    release_pop(c, pos);
    return true;
  }

  // Pops up to n values with a single claim, handing each to sink(T&&) in
  // queue order; returns how many. sink must not throw.
  template <claimed_cell Policy = claimed_cell::give_up, class Sink>
  std::size_t try_consume_n(Sink&& sink, std::size_t n) noexcept {
    if (n == 0) return 0;
    // Relaxed: as in claim_pop().
    std::size_t pos = head_.load(std::memory_order_relaxed);
    std::size_t k;
    unsigned round = 0;
    for (;;) {
      k = 0;
      std::intptr_t dif = 0;
      // Acquire: pairs with publish() of each counted cell.
      while (k < n && k <= mask_) {
        const std::size_t seq = at(pos + k).seq.load(std::memory_order_acquire);
        dif = static_cast<std::intptr_t>(seq - (pos + k + 1));
        if (dif != 0) break;
        ++k;
      }
      if (k == 0 && dif < 0) {
        // The first cell is not ready, as in claim_pop().
        if constexpr (Policy == claimed_cell::give_up) {
          return 0;
        } else {
          if (!push_in_progress_at(pos)) return 0;  // empty
          Atomics::pause_for_claim(round);
        }
      }
      if (k != 0 && head_.compare_exchange_weak(pos, pos + k, std::memory_order_relaxed)) break;
      if (k == 0) pos = head_.load(std::memory_order_relaxed);
    }
    for (std::size_t i = 0; i < k; ++i) {
      cell& c = at(pos + i);
      T* v = c.value();
      sink(std::move(*v));
      v->~T();
      release_pop(&c, pos + i);
    }
    return k;
  }

  // Claimed push positions minus claimed pop positions: counts pushes and
  // pops in progress as done (a value a stalled push is still moving in is
  // counted, and so are the published values behind it).
  std::size_t size_approx() const noexcept {
    // Relaxed: a monitoring snapshot; the two indices are read at different
    // moments, hence the clamp to [0, capacity].
    const std::size_t head = head_.load(std::memory_order_relaxed);
    const std::size_t tail = tail_.load(std::memory_order_relaxed);
    const auto d = static_cast<std::intptr_t>(tail - head);
    if (d <= 0) return 0;
    return static_cast<std::size_t>(d) > capacity() ? capacity() : static_cast<std::size_t>(d);
  }

 private:
  // The padding below is computed by hand: the read-only line, the
  // producers' tail_ and the consumers' head_ are a false-sharing range apart,
  // and nothing after head_ shares its range. With clang's view of
  // std::unique_ptr the ring is not standard-layout; g++ and clang compute
  // offsetof for it as usual (no virtual bases), and the warning is silenced
  // for the check only. A model checker's atomics are left unchecked.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winvalid-offsetof"
  void check_layout() const noexcept {
    if constexpr (std::is_same_v<Atomics, std_atomics>) {
      static_assert(offsetof(mpmc_ring, tail_) - offsetof(mpmc_ring, mask_) >= false_sharing_range,
                    "tail_ is a false-sharing range away from the read-only fields");
      static_assert(offsetof(mpmc_ring, head_) - offsetof(mpmc_ring, tail_) >= false_sharing_range,
                    "head_ and tail_ are a false-sharing range apart");
      static_assert(sizeof(mpmc_ring) - offsetof(mpmc_ring, head_) >= false_sharing_range,
                    "head_ is padded to the end of its false-sharing range");
    }
  }
#pragma GCC diagnostic pop

  // At destruction: every value in [head, tail) published, every other cell
  // released for its next lap, and no more than capacity values queued.
  bool sequences_at_rest(std::size_t head, std::size_t tail) const noexcept {
    if (tail - head > capacity()) return false;
    for (std::size_t pos = head; pos != head + capacity(); ++pos) {
      // Relaxed: destruction happens-after every other use of the ring.
      const std::size_t seq = at(pos).seq.load(std::memory_order_relaxed);
      const bool queued = pos - head < tail - head;
      if (seq != (queued ? pos + 1 : pos)) return false;
    }
    return true;
  }

  // The cell at head position `pos` is not ready: has a push claimed it (it
  // is then on its way), or is the ring empty?
  bool push_in_progress_at(std::size_t pos) const noexcept {
    // Relaxed: coherence alone makes "empty" linearizable against
    // happens-before (header comment).
    return static_cast<std::intptr_t>(tail_.load(std::memory_order_relaxed) - pos) > 0;
  }

  // The cell at tail position `pos` still holds the value of position
  // pos - capacity: has a pop claimed that value (the cell is then being
  // emptied), or is the ring full?
  bool pop_in_progress_at(std::size_t pos) const noexcept {
    // Relaxed: as in push_in_progress_at().
    const auto used = static_cast<std::intptr_t>(pos - head_.load(std::memory_order_relaxed));
    return used < static_cast<std::intptr_t>(capacity());
  }

  // Read-only after construction; own line so the hot indices do not share it.
  alignas(false_sharing_range) const std::size_t mask_;
  const unsigned slot_bits_;       // log2 of the cells per line actually used
  const unsigned line_bits_;       // log2 of the number of lines
  const std::size_t line_mask_;
  const std::unique_ptr<cell[], cells_deleter> cells_;
  // Written by producers only.
  alignas(false_sharing_range) atomic_size tail_{0};
  // Written by consumers only.
  alignas(false_sharing_range) atomic_size head_{0};
  char pad_[false_sharing_range > sizeof(atomic_size) ? false_sharing_range - sizeof(atomic_size) : 1]{};
};

}  // namespace runnel::detail
