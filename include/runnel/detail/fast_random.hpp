// A per-thread pseudo-random generator for choices that must be fair, not
// unpredictable (runnel::select's poll order): xorshift64* seeded once per
// thread through splitmix64, a few instructions a draw and no shared state.
#pragma once

#include <chrono>
#include <cstdint>

namespace runnel::detail {

inline std::uint64_t splitmix64(std::uint64_t x) noexcept {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The next 64 pseudo-random bits of the calling thread's stream.
inline std::uint64_t thread_random() noexcept {
  // Seeded from the variable's address (differs between live threads) and
  // the clock (differs between runs); | 1 because xorshift's state must not
  // be zero.
  thread_local std::uint64_t state =
      splitmix64(reinterpret_cast<std::uintptr_t>(&state) ^
                 static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count())) |
      1u;
  state ^= state >> 12;
  state ^= state << 25;
  state ^= state >> 27;
  return state * 0x2545F4914F6CDD1Dull;
}

// Uniform in [0, n) for n <= 2^32, up to a bias of n / 2^32 (the top 32
// bits scaled, Lemire's multiply-shift without the rejection step).
inline std::uint32_t thread_random_below(std::uint32_t n) noexcept {
  return static_cast<std::uint32_t>(((thread_random() >> 32) * n) >> 32);
}

}  // namespace runnel::detail
