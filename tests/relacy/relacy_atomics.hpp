// An atomic family (see include/runnel/detail/atomic_family.hpp) backed by
// Relacy's instrumented atomics, so that the ring's own code runs under the
// model checker: every load, store and CAS becomes a scheduling point, and
// Relacy explores the values each may read under the C++ memory model.
//
// Include the runnel headers first, then this: <relacy/relacy.hpp> defines
// macros (new, delete, memory_order_*) that must not reach them; this file
// takes those macros away again.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <source_location>

#include <runnel/detail/chrono.hpp>

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

// Weaken, the tests of the tests (relacy_*_test.cpp): the code under test
// runs with one kind of ordering taken away, and the checker must then
// report a failure.
//   release_stores   a release store becomes relaxed;
//   acquire_loads    an acquire load becomes relaxed;
//   seq_cst_thread0  model thread 0's seq_cst operations become
//                    acquire/release/acq_rel (no StoreLoad order);
//   seq_cst_others   the same for every other thread;
//   fences           seq_cst fences become acq_rel fences (no StoreLoad);
//   rmw_release      a read-modify-write loses its release half (seq_cst
//                    and acq_rel become acquire, release becomes relaxed);
//   seq_cst_loads    a seq_cst load becomes relaxed.
enum class weaken {
  none,
  release_stores,
  acquire_loads,
  seq_cst_thread0,
  seq_cst_others,
  fences,
  rmw_release,
  seq_cst_loads
};

template <weaken Weaken = weaken::none>
struct relacy_atomics {
  // Whether the calling model thread's seq_cst operations are weakened.
  static bool weak_seq_cst() {
    if (Weaken != weaken::seq_cst_thread0 && Weaken != weaken::seq_cst_others) return false;
    return (rl::ctx().current_thread() == 0) == (Weaken == weaken::seq_cst_thread0);
  }

  template <class U>
  class atomic {
   public:
    atomic() = default;
    atomic(U v) : a_(v) {}  // NOLINT: mirrors std::atomic's converting constructor
    atomic(const atomic&) = delete;
    atomic& operator=(const atomic&) = delete;

    U load(std::memory_order mo, std::source_location l = std::source_location::current()) const {
      if (Weaken == weaken::acquire_loads && mo == std::memory_order_acquire) mo = std::memory_order_relaxed;
      if (Weaken == weaken::seq_cst_loads && mo == std::memory_order_seq_cst) mo = std::memory_order_relaxed;
      if (mo == std::memory_order_seq_cst && weak_seq_cst()) mo = std::memory_order_acquire;
      return a_.load(to_rl(mo), where(l));
    }
    void store(U v, std::memory_order mo, std::source_location l = std::source_location::current()) {
      if (Weaken == weaken::release_stores && mo == std::memory_order_release) mo = std::memory_order_relaxed;
      if (mo == std::memory_order_seq_cst && weak_seq_cst()) mo = std::memory_order_release;
      a_.store(v, to_rl(mo), where(l));
    }
    bool compare_exchange_weak(U& expected, U desired, std::memory_order mo,
                               std::source_location l = std::source_location::current()) {
      return a_.compare_exchange_weak(expected, desired, to_rl(rmw(mo)), where(l));
    }
    bool compare_exchange_strong(U& expected, U desired, std::memory_order mo, std::memory_order failure,
                                 std::source_location l = std::source_location::current()) {
      if (failure == std::memory_order_seq_cst && weak_seq_cst()) failure = std::memory_order_acquire;
      return a_.compare_exchange_strong(expected, desired, to_rl(rmw(mo)), where(l), to_rl(failure), where(l));
    }
    U fetch_add(U v, std::memory_order mo, std::source_location l = std::source_location::current()) {
      return a_.fetch_add(v, to_rl(rmw(mo)), where(l));
    }
    U fetch_sub(U v, std::memory_order mo, std::source_location l = std::source_location::current()) {
      return a_.fetch_sub(v, to_rl(rmw(mo)), where(l));
    }
    U fetch_or(U v, std::memory_order mo, std::source_location l = std::source_location::current()) {
      return a_.fetch_or(v, to_rl(rmw(mo)), where(l));
    }

    // A modelled futex on this word, as Relacy's own futex(2) model (which
    // only takes atomic<int>): FUTEX_WAIT makes a full fence, reads the word
    // and parks in one step (no wake can come between the read and the
    // park), and may wake spuriously; FUTEX_WAKE makes a full fence and
    // unparks up to `count` sleepers, who then happen after the waker. This
    // is the kernel's contract (its futex_wait/futex_wake pair an smp_mb()
    // each and meet under the hash-bucket lock). A timed wait may time out
    // at any point the scheduler chooses. Returns false on a time-out.
    bool futex_wait(U expected, bool timed, std::source_location l) {
      rl::context& c = rl::ctx();
      c.sched();
      c.atomic_thread_fence_seq_cst();
      U now;
      {
        rl::preemption_disabler pd(c);
        now = a_.load(rl::mo_acquire, where(l));
      }
      if (now != expected) return true;
      return a_.wait(c, timed, true, where(l)) != rl::unpark_reason_timeout;
    }
    void futex_wake(int count, std::source_location l) {
      if (count <= 0) return;
      rl::context& c = rl::ctx();
      c.sched();
      c.atomic_thread_fence_seq_cst();
      const int most = std::min(count, static_cast<int>(c.get_thread_count()));
      a_.wake(c, static_cast<rl::thread_id_t>(most), where(l));
    }

   private:
    static std::memory_order rmw(std::memory_order mo) {
      if (mo == std::memory_order_seq_cst && weak_seq_cst()) return std::memory_order_acq_rel;
      if (Weaken == weaken::rmw_release) {
        if (mo == std::memory_order_seq_cst || mo == std::memory_order_acq_rel) return std::memory_order_acquire;
        if (mo == std::memory_order_release) return std::memory_order_relaxed;
      }
      return mo;
    }

    // mutable: Relacy's load is const, its history bookkeeping is not ours.
    mutable rl::atomic<U> a_;
  };

  // A wait for another thread's claimed cell is a spin: tell the scheduler,
  // so that it runs the other thread instead of exploring the spin forever.
  static void pause_for_claim(unsigned&) { rl::yield(1, RL_INFO); }

  // No spin before a sleep: every retry of a spin would multiply the
  // interleavings to explore, and the spin is only an optimisation (each
  // round of a spin-then-park still makes its lock-free attempt, then the
  // exact one after preparing to sleep; detail/event_count.hpp).
  struct backoff {
    bool spin() { return false; }
    void reset() {}
  };

  // event_count's handshake. membarrier has no counterpart in the model, so
  // the model runs the fallback: a seq_cst fence on both sides. (The
  // membarrier pair is at least as strong: the heavy side makes every
  // running thread execute a full barrier, which is the fence the light
  // side leaves out; that step is the kernel's promise, not checked here.)
  static bool membarrier_ready() { return false; }
  static void heavy_fence(std::source_location l = std::source_location::current()) { full_fence(l); }
  static void full_fence(std::source_location l = std::source_location::current()) {
    rl::atomic_thread_fence(Weaken == weaken::fences ? rl::mo_acq_rel : rl::mo_seq_cst, where(l));
  }

  static void futex_wait(atomic<std::uint32_t>& word, std::uint32_t expected,
                         std::source_location l = std::source_location::current()) {
    word.futex_wait(expected, false, l);
  }
  static bool futex_wait_until(atomic<std::uint32_t>& word, std::uint32_t expected,
                               std::chrono::steady_clock::time_point,
                               std::source_location l = std::source_location::current()) {
    return word.futex_wait(expected, true, l);
  }
  static void futex_wake(atomic<std::uint32_t>& word, int count,
                         std::source_location l = std::source_location::current()) {
    word.futex_wake(count, l);
  }
};

// RUNNEL_ASSERT under the model: a broken invariant of the code under test
// fails the model (with Relacy's history of the run) instead of aborting.
// See relacy_invariants.hpp.
inline void invariant_failed(const char* what, const std::source_location& l) {
  rl::ctx().fail_test(what, rl::test_result_user_assert_failed, where(l));
}

}  // namespace runnel_model
