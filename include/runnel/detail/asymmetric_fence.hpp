// An asymmetric StoreLoad fence for the "publish, then check for sleepers" /
// "announce sleep, then re-check" handshake.
//
// Both sides of that handshake need a full StoreLoad barrier, or each may read
// the other's stale value and a wake-up is lost. The publishing side runs on
// every push and pop; the sleeping side only on the way into a syscall. So we
// make the fast side a compiler barrier and the slow side membarrier(2) with
// MEMBARRIER_CMD_PRIVATE_EXPEDITED, which makes every running thread of the
// process execute a full barrier before it returns. Where membarrier is not
// available (non-Linux, old kernels, seccomp filters), both sides fall back
// to ordinary seq_cst fences (RUNNEL_NO_MEMBARRIER=1 in the environment forces
// that fallback).
#pragma once

#include <atomic>
#include <cstdlib>

#if defined(__linux__)
#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace runnel::detail {

// A full (StoreLoad) fence for the fallback path. ThreadSanitizer does not
// model stand-alone fences and g++ rejects them under -fsanitize=thread
// (-Werror=tsan), so there we use a seq_cst read-modify-write of a private
// atomic, which is a full barrier on every target TSan supports.
inline void full_fence() noexcept {
#if defined(__SANITIZE_THREAD__)
  static std::atomic<int> dummy{0};
  dummy.fetch_add(0, std::memory_order_seq_cst);
#else
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

// True when the expedited private membarrier is registered for this process.
// Registration happens once, at first use, under the guard of a function-local
// static; the result never changes afterwards.
inline bool membarrier_ready() noexcept {
#if defined(__linux__) && defined(__NR_membarrier)
  static const bool ready = [] {
    // RUNNEL_NO_MEMBARRIER=1 forces the fence-on-both-sides fallback, so that
    // tests can exercise it on machines that have membarrier.
    if (const char* off = std::getenv("RUNNEL_NO_MEMBARRIER"); off != nullptr && off[0] == '1') return false;
    const long cmds = ::syscall(__NR_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);
    if (cmds < 0 || (cmds & MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0) return false;
    return ::syscall(__NR_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0;
  }();
  return ready;
#else
  return false;
#endif
}

// The cheap side: run after publishing data and before reading a sleeper flag.
inline void light_fence() noexcept {
  if (membarrier_ready()) {
    // The heavy side's membarrier orders our earlier store before our later
    // load on the hardware; we only stop the compiler from swapping them.
    std::atomic_signal_fence(std::memory_order_seq_cst);
  } else {
    full_fence();
  }
}

// The expensive side: run after announcing a sleeper and before re-checking
// the data it waits for.
inline void heavy_fence() noexcept {
#if defined(__linux__) && defined(__NR_membarrier)
  if (membarrier_ready() &&
      ::syscall(__NR_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) == 0) {
    return;
  }
#endif
  // Unreachable with membarrier registered (the call cannot fail once
  // registered); without it, light_fence() is a full fence too.
  full_fence();
}

}  // namespace runnel::detail
