// The pool's unit of work: a type-erased void() callable in a fixed-size,
// cache-line-sized node, so the deques and the injection ring move one
// pointer per task.
//
// Allocation is on the hot path of fork-join recursion (one task per call),
// so nodes come from a per-thread free list: a worker frees the nodes of the
// tasks it ran and reuses them for the tasks it spawns, without touching the
// allocator or any shared cache line. A node freed on another thread than
// the one that allocated it joins that thread's list; full lists move
// between threads in batches through a shared depot. Callables too big for
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

#include "cache_line.hpp"

namespace runnel::detail {

// 64 bytes but only 16-aligned: an over-aligned node would need the aligned
// operator new, which glibc serves from a much slower path than malloc.
struct alignas(16) task_node {
  static constexpr std::size_t inline_size = cache_line_size - 16;
  static constexpr std::size_t inline_align = 16;

  // Runs the callable (when `run`), then destroys it and frees the node, also
  // when the callable throws (the exception then propagates).
  void (*invoke)(task_node*, bool run);
  // Link for the intrusive lists a node can sit in: the pool's overflow
  // queue while queued (where producers and the consumer race on it, hence
  // atomic), the free lists while unused.
  std::atomic<task_node*> next;
  alignas(inline_align) unsigned char storage[inline_size];

  void run() { invoke(this, true); }
  void discard() noexcept { invoke(this, false); }
};
static_assert(sizeof(task_node) == cache_line_size);

// Free nodes travel between threads in batches: a thread whose cache is
// full hands the whole list to this depot, a thread whose cache is empty takes
// one back. This keeps the allocator off the path where one thread creates
// tasks and others run (and free) them, e.g. posts from outside the pool.
// One lock per `batch` nodes.
class task_node_depot {
 public:
  static constexpr std::size_t max_batches = 256;  // beyond: give memory back

  task_node_depot() = default;
  task_node_depot(const task_node_depot&) = delete;
  task_node_depot& operator=(const task_node_depot&) = delete;
  ~task_node_depot() {
    for (task_node* list : batches_) free_list(list);
  }

  // Takes ownership of a null-terminated list.
  void put(task_node* list) noexcept {
    {
      std::lock_guard lock(m_);
      if (batches_.size() < max_batches) {
        try {
          batches_.push_back(list);
          return;
        } catch (...) {
          // No room to keep it: free it below.
        }
      }
    }
    free_list(list);
  }

  // A full batch, or nullptr.
  task_node* take() noexcept {
    std::lock_guard lock(m_);
    if (batches_.empty()) return nullptr;
    task_node* list = batches_.back();
    batches_.pop_back();
    return list;
  }

  // Relaxed: a free node belongs to one thread; lists change hands under the
  // depot's mutex or through the task queues, which order these accesses.
  static task_node* next(task_node* n) noexcept { return n->next.load(std::memory_order_relaxed); }
  static void set_next(task_node* n, task_node* next) noexcept { n->next.store(next, std::memory_order_relaxed); }
  static void free_list(task_node* list) noexcept {
    while (list != nullptr) {
      task_node* n = list;
      list = next(n);
      ::operator delete(n);
    }
  }

 private:
  std::mutex m_;
  std::vector<task_node*> batches_;  // guarded by m_
};

// The depot lives until the end of the program (leaked on purpose: worker
// threads of a pool with static storage duration may free nodes after other
// statics are gone).
inline task_node_depot& node_depot() noexcept {
  static task_node_depot* const depot = new task_node_depot;
  return *depot;
}

// Per-thread cache of free nodes, linked through `next`.
class task_node_cache {
 public:
  static constexpr std::size_t batch = 256;

  task_node_cache() = default;
  task_node_cache(const task_node_cache&) = delete;
  task_node_cache& operator=(const task_node_cache&) = delete;
  ~task_node_cache() {
    if (head_ != nullptr) node_depot().put(head_);
  }

  task_node* allocate() {
    if (head_ == nullptr) {
      head_ = node_depot().take();
      count_ = head_ != nullptr ? batch : 0;
      if (head_ == nullptr) return static_cast<task_node*>(::operator new(sizeof(task_node)));
    }
    task_node* n = head_;
    head_ = task_node_depot::next(n);
    --count_;
    // The next free node was most likely last written by another core (the
    // one that ran its task): start fetching it for writing now, rather than
    // stall on it in the next allocate().
    if (head_ != nullptr) __builtin_prefetch(head_, 1);
    return n;
  }

  void deallocate(task_node* n) noexcept {
    if (count_ == batch) {
      node_depot().put(head_);
      head_ = nullptr;
      count_ = 0;
    }
    task_node_depot::set_next(n, head_);
    head_ = n;
    ++count_;
  }

 private:
  task_node* head_ = nullptr;
  std::size_t count_ = 0;  // nodes in head_'s list
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
