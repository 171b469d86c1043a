// The pool's unit of work: a type-erased void() callable in a fixed-size,
// cache-line-sized node, so the deques and the injection ring move one
// pointer per task.
//
// Allocation is on the hot path of fork-join recursion (one task per call),
// so nodes come from a per-thread free list: a worker frees the nodes of the
// tasks it ran and reuses them for the tasks it spawns, without touching the
// allocator or any shared cache line. A node freed on another thread than
// the one that allocated it joins that thread's cache; full batches move
// between threads through a shared depot. Callables too big for
// the node's inline buffer live in a separate heap block.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "../detail/assert.hpp"
#include "../detail/cache_line.hpp"

namespace runnel::detail {

// 64 bytes but only 16-aligned: an over-aligned node would need the aligned
// operator new, which glibc serves from a much slower path than malloc.
struct alignas(16) task_node {
  static constexpr std::size_t inline_size = cache_line_size - 16;
  static constexpr std::size_t inline_align = 16;

  // Runs the callable (when `run`), then destroys it and frees the node, also
  // when the callable throws (the exception then propagates).
  void (*invoke)(task_node*, bool run);
  // Link in the pool's overflow queue while queued there (producers and the
  // consumer race on it, hence atomic).
  std::atomic<task_node*> next;
  alignas(inline_align) unsigned char storage[inline_size];

  // A node is run or discarded once: invoke() frees it, and in a checked
  // build the free clears `invoke` (see task_node_cache::deallocate()).
  void run() {
    RUNNEL_ASSERT(invoke != nullptr, "a task is run or discarded once");
    invoke(this, true);
  }
  void discard() noexcept {
    RUNNEL_ASSERT(invoke != nullptr, "a task is run or discarded once");
    invoke(this, false);
  }
};
// One line per node, the callable's buffer filling it after the two
// pointers, and no more than the ordinary malloc alignment.
static_assert(sizeof(task_node) == cache_line_size, "a task node is one cache line");
static_assert(alignof(task_node) == task_node::inline_align, "a task node needs no over-aligned allocation");
static_assert(offsetof(task_node, storage) + task_node::inline_size == sizeof(task_node),
              "the inline buffer fills the node after its two pointers");

// A batch of free nodes: an array of pointers, so taking a node from a batch
// never reads the node itself (it was most likely last written by another
// core, and a linked free list would stall on that cache miss per node).
struct task_node_batch {
  static constexpr std::size_t capacity = 256;
  std::size_t count = 0;
  task_node* items[capacity];

  void free_all() noexcept {
    while (count != 0) ::operator delete(items[--count]);
  }
};

// Free nodes travel between threads in batches: a thread whose cache is
// full hands the batch to this depot, a thread whose cache is empty takes a
// full one back. This keeps the allocator off the path where one thread
// creates tasks and others run (and free) them, e.g. posts from outside the
// pool. One lock per batch.
class task_node_depot {
 public:
  static constexpr std::size_t max_batches = 256;  // beyond: give memory back

  task_node_depot() = default;
  task_node_depot(const task_node_depot&) = delete;
  task_node_depot& operator=(const task_node_depot&) = delete;
  ~task_node_depot() {
    for (task_node_batch* b : full_) {
      b->free_all();
      delete b;
    }
    for (task_node_batch* b : empty_) delete b;
  }

  // Trades a full batch for an empty one (nullptr: the caller allocates).
  task_node_batch* put_full(task_node_batch* full) noexcept {
    RUNNEL_ASSERT(full != nullptr && full->count != 0, "only batches holding nodes go to the depot");
    std::lock_guard lock(m_);
    task_node_batch* empty = nullptr;
    if (!empty_.empty()) {
      empty = empty_.back();
      empty_.pop_back();
    }
    if (full_.size() < max_batches && full_.size() < full_.capacity()) {
      full_.push_back(full);  // capacity reserved: cannot throw
    } else {
      full->free_all();
      if (empty == nullptr) return full;  // reuse it as the empty batch
      delete full;
    }
    return empty;
  }

  // Trades an empty batch (may be nullptr) for a full one, or returns
  // nullptr (and keeps nothing) when the depot holds no full batch.
  task_node_batch* take_full(task_node_batch* empty) noexcept {
    std::lock_guard lock(m_);
    if (full_.empty()) return nullptr;
    task_node_batch* full = full_.back();
    full_.pop_back();
    RUNNEL_ASSERT(full->count != 0, "a batch taken from the depot holds nodes");
    if (empty != nullptr) {
      if (empty_.size() < empty_.capacity()) {
        empty_.push_back(empty);  // capacity reserved: cannot throw
      } else {
        delete empty;
      }
    }
    return full;
  }

  task_node_depot* init() {
    full_.reserve(max_batches);
    empty_.reserve(max_batches);
    return this;
  }

 private:
  std::mutex m_;
  std::vector<task_node_batch*> full_;   // guarded by m_
  std::vector<task_node_batch*> empty_;  // guarded by m_
};

// The depot lives until the end of the program (leaked on purpose: worker
// threads of a pool with static storage duration may free nodes after other
// statics are gone).
inline task_node_depot& node_depot() noexcept {
  static task_node_depot* const depot = (new task_node_depot)->init();
  return *depot;
}

// Per-thread cache of free nodes: one batch.
class task_node_cache {
 public:
  task_node_cache() = default;
  task_node_cache(const task_node_cache&) = delete;
  task_node_cache& operator=(const task_node_cache&) = delete;
  ~task_node_cache() {
    if (batch_ == nullptr) return;
    if (batch_->count == 0) {
      delete batch_;
    } else if (task_node_batch* empty = node_depot().put_full(batch_)) {
      delete empty;
    }
  }

  task_node* allocate() {
    if (batch_ == nullptr || batch_->count == 0) {
      if (task_node_batch* full = node_depot().take_full(batch_)) {
        batch_ = full;
      } else {
        return static_cast<task_node*>(::operator new(sizeof(task_node)));
      }
    }
    return batch_->items[--batch_->count];
  }

  void deallocate(task_node* n) noexcept {
    if (batch_ == nullptr) {
      batch_ = new (std::nothrow) task_node_batch;
      if (batch_ == nullptr) {
        ::operator delete(n);
        return;
      }
    } else if (batch_->count == task_node_batch::capacity) {
      batch_ = node_depot().put_full(batch_);
      if (batch_ == nullptr) batch_ = new (std::nothrow) task_node_batch;
      if (batch_ == nullptr) {
        ::operator delete(n);
        return;
      }
    }
#if RUNNEL_ASSERTS
    n->invoke = nullptr;  // a second run() or discard() of n now stops at its assert
#endif
    batch_->items[batch_->count++] = n;
  }

 private:
  task_node_batch* batch_ = nullptr;
};

inline task_node_cache& local_node_cache() noexcept {
  thread_local task_node_cache cache;
  return cache;
}

template <class D>
inline constexpr bool fits_inline =
    sizeof(D) <= task_node::inline_size && alignof(D) <= task_node::inline_align;

// Builds a node owning a decayed copy of f. Throws what allocation or the
// callable's constructor throws; nothing leaks then.
template <class F>
task_node* make_task(F&& f) {
  using D = std::decay_t<F>;
  static_assert(std::is_invocable_v<D&>, "a task must be callable with no arguments");
  task_node_cache& cache = local_node_cache();
  task_node* n = cache.allocate();
  if constexpr (fits_inline<D>) {
    try {
      ::new (static_cast<void*>(n->storage)) D(std::forward<F>(f));
    } catch (...) {
      cache.deallocate(n);
      throw;
    }
    n->invoke = [](task_node* self, bool run) {
      D* d = std::launder(reinterpret_cast<D*>(self->storage));
      struct cleanup {
        task_node* node;
        D* fn;
        ~cleanup() {
          fn->~D();
          local_node_cache().deallocate(node);
        }
      } guard{self, d};
      if (run) std::invoke(*d);
    };
  } else {
    D* heap;
    try {
      heap = new D(std::forward<F>(f));
    } catch (...) {
      cache.deallocate(n);
      throw;
    }
    ::new (static_cast<void*>(n->storage)) D*(heap);
    n->invoke = [](task_node* self, bool run) {
      D* d = *std::launder(reinterpret_cast<D**>(self->storage));
      struct cleanup {
        task_node* node;
        D* fn;
        ~cleanup() {
          delete fn;
          local_node_cache().deallocate(node);
        }
      } guard{self, d};
      if (run) std::invoke(*d);
    };
  }
  return n;
}

}  // namespace runnel::detail
