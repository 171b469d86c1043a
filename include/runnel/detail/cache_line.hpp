// Cache-line sizes used to keep independently written data apart.
#pragma once

#include <cstddef>

namespace runnel::detail {

// One cache line on x86-64 and on the common AArch64 cores. We do not use
// std::hardware_destructive_interference_size: g++ warns when it appears in a
// header (its value may differ between translation units) and clang's
// libstdc++ build does not define it at all.
inline constexpr std::size_t cache_line_size = 64;

// Distance that keeps two hot variables from interfering: x86 adjacent-line
// prefetch pulls lines in 128-byte pairs, so two indices written by different
// cores sit 128 bytes apart.
inline constexpr std::size_t false_sharing_range = 128;

}  // namespace runnel::detail
