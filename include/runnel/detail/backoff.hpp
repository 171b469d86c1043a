// Bounded exponential backoff for spin loops: pause, then yield, then tell
// the caller it is time to park.
#pragma once

#include <cstdint>
#include <thread>


namespace runnel::detail {

// One processor hint that we are spinning: frees the sibling hyper-thread and
// avoids the memory-order mis-speculation penalty when the spin ends.
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  // The builtin, not _mm_pause from <immintrin.h>: that header costs about
  // 0.5 s of every compile (every SIMD intrinsic) for one instruction.
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#else
  std::this_thread::yield();
#endif
}

// Pauses in one waiting round of a spin that re-checks its condition between
// rounds (the pool's idle search, a task group's wait, the process pool's
// supervisor watch): ~0.6 us where a pause takes ~19 ns (measured on the
// 2-core machine the benches ran on), long enough that a round is not just
// cache traffic on the lines being watched, short enough that news arriving
// meanwhile waits little.
inline constexpr int pauses_per_round = 32;

// One such round of pauses.
inline void pause_round() noexcept {
  for (int i = 0; i < pauses_per_round; ++i) cpu_relax();
}

// Spin with doubling pause counts (capped, so that the condition is still
// re-checked often), then a few scheduler yields (on an oversubscribed
// machine the thread we wait for may need our core), then report
// `should_park()`. With the defaults the spin phase is a few hundred pauses,
// on the order of 10-50 microseconds, which bounds idle burn before sleeping.
class backoff {
 public:
  explicit backoff(std::uint32_t spin_limit = 32, std::uint32_t yield_limit = 4) noexcept
      : spin_limit_(spin_limit), yield_limit_(yield_limit) {}

  // Wait a little; returns false once the budget is spent.
  bool spin() noexcept {
    if (step_ < spin_limit_) {
      const std::uint32_t pauses = step_ < max_pause_shift ? 1u << step_ : 1u << max_pause_shift;
      for (std::uint32_t i = 0; i < pauses; ++i) cpu_relax();
    } else if (step_ < spin_limit_ + yield_limit_) {
      std::this_thread::yield();
    } else {
      return false;
    }
    ++step_;
    return true;
  }

  bool should_park() const noexcept { return step_ >= spin_limit_ + yield_limit_; }
  void reset() noexcept { step_ = 0; }

 private:
  static constexpr std::uint32_t max_pause_shift = 4;  // at most 16 pauses between checks
  std::uint32_t spin_limit_;
  std::uint32_t yield_limit_;
  std::uint32_t step_ = 0;
};

}  // namespace runnel::detail
