// RUNNEL_ASSERT under the model checker: include this before any runnel
// header, so that the invariants the code under test states are checked in
// every explored interleaving (whatever NDEBUG says) and a broken one fails
// the model with Relacy's history of the run instead of aborting the
// program. runnel_model::invariant_failed is defined in relacy_atomics.hpp,
// after <relacy/relacy.hpp>, which cannot come first (see there).
#pragma once

#include <source_location>

#include <runnel/detail/assert.hpp>

namespace runnel_model {
inline void invariant_failed(const char* what, const std::source_location& l);
}  // namespace runnel_model

#undef RUNNEL_ASSERT
#define RUNNEL_ASSERT(cond, what) \
  ((cond) ? static_cast<void>(0) : ::runnel_model::invariant_failed(what, std::source_location::current()))
