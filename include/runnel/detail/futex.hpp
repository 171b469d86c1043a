// Sleeping on a 32-bit word: Linux futex, or C++20 atomic::wait elsewhere.
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

// Sleep while `word == expected`. May return spuriously; callers re-check.
// We call futex directly rather than atomic::wait: libstdc++'s wait spins and
// yields on its own before sleeping, which would double our spin budget.
inline void futex_wait(std::atomic<std::uint32_t>& word, std::uint32_t expected) noexcept {
#if defined(__linux__)
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected,
            nullptr, nullptr, 0);
#else
  word.wait(expected, std::memory_order_acquire);
#endif
}

// As futex_wait, but gives up at `deadline`. Returns false when the deadline
// has passed.
inline bool futex_wait_until(std::atomic<std::uint32_t>& word, std::uint32_t expected,
                             std::chrono::steady_clock::time_point deadline) noexcept {
  const auto now = std::chrono::steady_clock::now();
  if (now >= deadline) return false;
#if defined(__linux__)
  const auto left = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - now).count();
  ::timespec ts{};
  ts.tv_sec = static_cast<std::time_t>(left / 1'000'000'000);
  ts.tv_nsec = static_cast<long>(left % 1'000'000'000);
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, &ts,
            nullptr, 0);
#else
  // No portable timed atomic wait in C++20: poll with short sleeps.
  if (word.load(std::memory_order_acquire) == expected)
    std::this_thread::sleep_for(std::chrono::microseconds(50));
#endif
  return true;
}

inline void futex_wake(std::atomic<std::uint32_t>& word, int count) noexcept {
#if defined(__linux__)
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAKE_PRIVATE, count, nullptr,
            nullptr, 0);
#else
  if (count == 1) word.notify_one(); else word.notify_all();
#endif
}

}  // namespace runnel::detail
