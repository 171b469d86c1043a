// The pool's unit of work: a type-erased void() callable in a fixed-size,
// cache-line-sized node, so the deques and the injection ring move one
// pointer per task.
//
// Allocation is on the hot path of fork-join recursion (one task per call),
// so nodes come from a per-thread free list: a worker frees the nodes of the
// tasks it ran and reuses them for the tasks it spawns, without touching the
// allocator or any shared cache line. A node freed on another thread than
// the one that allocated it simply joins that thread's list. Callables too
// big for the node's inline buffer live in a separate heap block.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>

#include "cache_line.hpp"

namespace runnel::detail {

struct alignas(cache_line_size) task_node {
  static constexpr std::size_t inline_size = cache_line_size - 16;
  static constexpr std::size_t inline_align = 16;

  // Runs the callable (when `run`), then destroys it and frees the node, also
  // when the callable throws (the exception then propagates).
  void (*invoke)(task_node*, bool run);
  alignas(inline_align) unsigned char storage[inline_size];

  void run() { invoke(this, true); }
  void discard() noexcept { invoke(this, false); }
};
static_assert(sizeof(task_node) == cache_line_size);

// Per-thread cache of free nodes, linked through their storage.
class task_node_cache {
 public:
  static constexpr std::size_t max_cached = 4096;  // 256 KiB per thread at most

  task_node_cache() = default;
  task_node_cache(const task_node_cache&) = delete;
  task_node_cache& operator=(const task_node_cache&) = delete;
  ~task_node_cache() {
    while (head_ != nullptr) {
      task_node* n = head_;
      head_ = next(n);
      release(n);
    }
  }

  task_node* allocate() {
    if (head_ != nullptr) {
      task_node* n = head_;
      head_ = next(n);
      --count_;
      return n;
    }
    return static_cast<task_node*>(::operator new(sizeof(task_node), std::align_val_t{alignof(task_node)}));
  }

  void deallocate(task_node* n) noexcept {
    if (count_ >= max_cached) {
      release(n);
      return;
    }
    ::new (static_cast<void*>(n->storage)) task_node*(head_);
    head_ = n;
    ++count_;
  }

 private:
  static task_node* next(task_node* n) noexcept { return *std::launder(reinterpret_cast<task_node**>(n->storage)); }
  static void release(task_node* n) noexcept { ::operator delete(n, std::align_val_t{alignof(task_node)}); }

  task_node* head_ = nullptr;
  std::size_t count_ = 0;
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
