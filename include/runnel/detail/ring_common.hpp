// What the rings share: capacity checks and the element-type requirements.
#pragma once

#include <cstddef>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "assert.hpp"

namespace runnel::detail {

// Smallest power of two >= n; n must be in (0, 2^63].
constexpr std::size_t round_up_pow2(std::size_t n) noexcept {
  // Beyond 2^63 the loop below would shift p out and never end.
  RUNNEL_ASSERT(n != 0 && n <= (std::size_t{1} << 63), "round_up_pow2 takes n in (0, 2^63]");
  std::size_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Checks a requested ring capacity and returns it rounded up to a power of
// two. Throws std::invalid_argument for 0 and std::length_error when the
// storage size would overflow.
inline std::size_t checked_ring_capacity(std::size_t requested, std::size_t cell_size,
                                         const char* who) {
  if (requested == 0) throw std::invalid_argument(std::string(who) + ": capacity must be at least 1");
  // Positions are compared as signed differences, so keep the ring below 2^62
  // cells; the byte size must fit in size_t as well.
  constexpr std::size_t max_cells = std::size_t{1} << 62;
  if (requested > max_cells || round_up_pow2(requested) > std::numeric_limits<std::size_t>::max() / cell_size)
    throw std::length_error(std::string(who) + ": capacity " + std::to_string(requested) +
                            " is too large (storage size overflows)");
  return round_up_pow2(requested);
}

// A ring moves values in and out after a slot is claimed; a move or destroy
// that throws there would lose the value, so both must be noexcept.
template <class T>
inline constexpr bool ring_element = [] {
  static_assert(std::is_nothrow_move_constructible_v<T>,
                "runnel: the element type's move constructor must be noexcept (a throwing move "
                "could lose a value half-way through a push or pop)");
  static_assert(std::is_nothrow_destructible_v<T>,
                "runnel: the element type's destructor must be noexcept");
  return true;
}();

}  // namespace runnel::detail
