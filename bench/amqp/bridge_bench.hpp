// Shared by the broker benchmarks (amqp_bench, amqp_sqlite_bench): the work a
// message costs, its calibration, and the private broker they run against.
#pragma once

#include <time.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "../../tests/amqp/broker.hpp"

namespace runnel_bench {

// W rounds of a 64-bit LCG seeded from the body (FNV-1a of its first 8 bytes).
inline std::uint64_t work(const char* body, std::size_t len, std::uint64_t w) {
  std::uint64_t x = 1469598103934665603ULL;
  for (std::size_t i = 0; i < len && i < 8; ++i) x = (x ^ static_cast<unsigned char>(body[i])) * 1099511628211ULL;
  for (std::uint64_t i = 0; i < w; ++i) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
  return x;
}

// The W that costs about 20 us of CPU on this machine, measured once at
// start-up on the thread's CPU clock (a wall-clock probe would shrink W
// whenever other load on the shared machine preempts it).
inline std::uint64_t heavy_w() {
  static const std::uint64_t w = [] {
    auto cpu_ns = [] {
      timespec t{};
      ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
      return static_cast<double>(t.tv_sec) * 1e9 + static_cast<double>(t.tv_nsec);
    };
    const std::uint64_t probe = 2000000;
    const double t0 = cpu_ns();
    volatile std::uint64_t sink = work("calibrate", 9, probe);
    (void)sink;
    const double ns = cpu_ns() - t0;
    return static_cast<std::uint64_t>(20000.0 * static_cast<double>(probe) / ns);  // ~20 us
  }();
  return w;
}

// The private broker, started on first use; exits with a message naming
// `program` when rabbitmq-server is not installed.
inline runnel_test::broker& the_broker(const char* program) {
  runnel_test::broker* b = runnel_test::broker::get();
  if (b == nullptr) {
    std::fprintf(stderr, "%s: rabbitmq-server is not installed\n", program);
    std::exit(1);
  }
  return *b;
}

}  // namespace runnel_bench
