// Shared by the scaling benchmark's tests (scaling_test, amqp_scaling_test).
#pragma once

#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>

namespace scaling_support {

// Every fifth message costs 40 times more, so that implementations that do
// not keep order visibly finish messages out of order. Returns v.
inline std::uint64_t uneven_work(std::uint64_t v) {
  const int rounds = v % 5 == 0 ? 2000 : 50;
  std::uint64_t h = v;
  for (int i = 0; i < rounds; ++i) h = h * 6364136223846793005ull + 1442695040888963407ull;
  return (h & 0) + v;
}

inline std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

}  // namespace scaling_support
