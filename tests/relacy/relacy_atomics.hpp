// An atomic family (see include/runnel/detail/atomic_family.hpp) backed by
// Relacy's instrumented atomics, so that the ring's own code runs under the
// model checker: every load, store and CAS becomes a scheduling point, and
// Relacy explores the values each may read under the C++ memory model.
//
// Include the runnel headers first, then this: <relacy/relacy.hpp> defines
// macros (new, delete, memory_order_*) that must not reach them; this file
// takes those macros away again.
#pragma once

#include <atomic>
#include <source_location>

#include <relacy/relacy.hpp>

#undef new
#undef delete
#undef malloc
#undef calloc
#undef realloc
#undef free
#undef memory_order_relaxed
#undef memory_order_consume
#undef memory_order_acquire
#undef memory_order_release
#undef memory_order_acq_rel
#undef memory_order_seq_cst

namespace runnel_model {

inline rl::debug_info where(const std::source_location& l) {
  // The file and line of the ring's own statement, without the (long)
  // function signature, so that Relacy's histories stay readable.
  return rl::debug_info("", l.file_name(), l.line());
}

inline rl::memory_order to_rl(std::memory_order mo) {
  switch (mo) {
    case std::memory_order_relaxed: return rl::mo_relaxed;
    case std::memory_order_consume: return rl::mo_consume;
    case std::memory_order_acquire: return rl::mo_acquire;
    case std::memory_order_release: return rl::mo_release;
    case std::memory_order_acq_rel: return rl::mo_acq_rel;
    case std::memory_order_seq_cst: return rl::mo_seq_cst;
  }
  return rl::mo_seq_cst;
}

// Weaken: a release store becomes relaxed, an acquire load relaxed. The
// checker must then report a data race on the values handed over (the test
// of the test, see relacy_ring_test.cpp).
enum class weaken { none, release_stores, acquire_loads };

template <weaken Weaken = weaken::none>
struct relacy_atomics {
  template <class U>
  class atomic {
   public:
    atomic() = default;
    atomic(U v) : a_(v) {}  // NOLINT: mirrors std::atomic's converting constructor
    atomic(const atomic&) = delete;
    atomic& operator=(const atomic&) = delete;

    U load(std::memory_order mo, std::source_location l = std::source_location::current()) const {
      if (Weaken == weaken::acquire_loads && mo == std::memory_order_acquire) mo = std::memory_order_relaxed;
      return a_.load(to_rl(mo), where(l));
    }
    void store(U v, std::memory_order mo, std::source_location l = std::source_location::current()) {
      if (Weaken == weaken::release_stores && mo == std::memory_order_release) mo = std::memory_order_relaxed;
      a_.store(v, to_rl(mo), where(l));
    }
    bool compare_exchange_weak(U& expected, U desired, std::memory_order mo,
                               std::source_location l = std::source_location::current()) {
      return a_.compare_exchange_weak(expected, desired, to_rl(mo), where(l));
    }
    U fetch_add(U v, std::memory_order mo, std::source_location l = std::source_location::current()) {
      return a_.fetch_add(v, to_rl(mo), where(l));
    }

   private:
    // mutable: Relacy's load is const, its history bookkeeping is not ours.
    mutable rl::atomic<U> a_;
  };

  // A wait for another thread's claimed cell is a spin: tell the scheduler,
  // so that it runs the other thread instead of exploring the spin forever.
  static void pause_for_claim(unsigned&) { rl::yield(1, RL_INFO); }
};

}  // namespace runnel_model
