// Sleeping on a 32-bit word: Linux futex, or C++20 atomic::wait elsewhere.
//
// Scope. futex_scope::process (the default) uses FUTEX_*_PRIVATE: the kernel
// keys the wait queue on the address space, which is cheaper (no page
// lookup) and right for every word that only this process's threads touch.
// futex_scope::shared omits FUTEX_PRIVATE_FLAG, so the kernel keys the queue
// on the backing page (e.g. a memfd mapped MAP_SHARED), and processes mapping
// the same page can wake one another: the process pool's parent, launcher
// and workers. A private wait on a word shared between processes is never
// woken by a waker in another process. Off Linux the shared scope is
// process-local like the other (the process pool is Linux only).
#pragma once

#include <atomic>
#include "chrono.hpp"  // not <chrono>: see there
#include <cstdint>
#include <thread>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <ctime>
#endif

namespace runnel::detail {

enum class futex_scope { process, shared };

#if defined(__linux__)
static_assert(std::atomic<std::uint32_t>::is_always_lock_free && sizeof(std::atomic<std::uint32_t>) == 4,
              "a futex word must be a plain, lock-free 32-bit atomic (also between processes)");

inline constexpr int futex_op(int op, futex_scope scope) noexcept {
  return scope == futex_scope::process ? (op | FUTEX_PRIVATE_FLAG) : op;
}
#endif

// Sleep while `word == expected`. May return spuriously; callers re-check.
// We call futex directly rather than atomic::wait: libstdc++'s wait spins and
// yields on its own before sleeping, which would double our spin budget.
inline void futex_wait(std::atomic<std::uint32_t>& word, std::uint32_t expected,
                       futex_scope scope = futex_scope::process) noexcept {
#if defined(__linux__)
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), futex_op(FUTEX_WAIT, scope), expected,
            nullptr, nullptr, 0);
#else
  (void)scope;
  word.wait(expected, std::memory_order_acquire);
#endif
}

// As futex_wait, but gives up at `deadline`. Returns false when the deadline
// has passed.
inline bool futex_wait_until(std::atomic<std::uint32_t>& word, std::uint32_t expected,
                             std::chrono::steady_clock::time_point deadline,
                             futex_scope scope = futex_scope::process) noexcept {
  const auto now = std::chrono::steady_clock::now();
  if (now >= deadline) return false;
#if defined(__linux__)
  const auto left = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - now).count();
  ::timespec ts{};
  ts.tv_sec = static_cast<std::time_t>(left / 1'000'000'000);
  ts.tv_nsec = static_cast<long>(left % 1'000'000'000);
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), futex_op(FUTEX_WAIT, scope), expected, &ts,
            nullptr, 0);
#else
  (void)scope;
  // No portable timed atomic wait in C++20: poll with short sleeps.
  if (word.load(std::memory_order_acquire) == expected)
    std::this_thread::sleep_for(std::chrono::microseconds(50));
#endif
  return true;
}

inline void futex_wake(std::atomic<std::uint32_t>& word, int count,
                       futex_scope scope = futex_scope::process) noexcept {
#if defined(__linux__)
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), futex_op(FUTEX_WAKE, scope), count, nullptr,
            nullptr, 0);
#else
  (void)scope;
  if (count == 1) word.notify_one(); else word.notify_all();
#endif
}

}  // namespace runnel::detail
