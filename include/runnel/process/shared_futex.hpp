// Sleeping on a 32-bit word that lives in memory shared between processes.
//
// detail/futex.hpp uses FUTEX_*_PRIVATE, which keys the wait queue on the
// address space: a waker in another process would never find the sleeper.
// These calls omit the private flag, so the kernel keys the queue on the
// backing page (here a memfd), and a process pool's parent, launcher and
// workers can wake one another.
#pragma once

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <ctime>

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace runnel::process {

static_assert(std::atomic<std::uint32_t>::is_always_lock_free && sizeof(std::atomic<std::uint32_t>) == 4,
              "a cross-process futex word must be a plain, lock-free 32-bit atomic");

// Sleeps while `word == expected`, at most `timeout` (negative: no limit).
// May return early or spuriously; callers re-check their condition.
inline void shared_futex_wait(std::atomic<std::uint32_t>& word, std::uint32_t expected,
                              std::chrono::nanoseconds timeout = std::chrono::nanoseconds(-1)) noexcept {
  ::timespec ts{};
  ::timespec* tsp = nullptr;
  if (timeout.count() >= 0) {
    ts.tv_sec = static_cast<std::time_t>(timeout.count() / 1'000'000'000);
    ts.tv_nsec = static_cast<long>(timeout.count() % 1'000'000'000);
    tsp = &ts;
  }
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAIT, expected, tsp, nullptr, 0);
}

// Wakes up to `count` sleepers of `word`, in any process mapping it.
inline void shared_futex_wake(std::atomic<std::uint32_t>& word, int count = INT_MAX) noexcept {
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAKE, count, nullptr, nullptr, 0);
}

}  // namespace runnel::process
