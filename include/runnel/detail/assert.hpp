// RUNNEL_ASSERT(cond, "what the invariant is"): checks an invariant that a
// comment states (a lane activated once, a waiter registered once, a deque
// index in bounds). On in Debug builds and in sanitizer builds, where a broken
// invariant should stop the program at the line that knows it rather than
// surface later as a lost message; compiled out under NDEBUG (the condition
// is not evaluated, so it may be as costly as it needs to be).
//
//   -DRUNNEL_ASSERTS=1  forces the checks on (e.g. in a Release test build),
//   -DRUNNEL_ASSERTS=0  forces them off (e.g. in a Debug build of a benchmark).
//
// A failed check prints the expression, the message and where, then aborts:
// the invariants guard memory that other threads may be reading, so nothing
// is safe to unwind through (and the hot paths are noexcept).
#pragma once

#include <cstdio>
#include <cstdlib>

#if !defined(RUNNEL_ASSERTS)
#if !defined(NDEBUG) || defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define RUNNEL_ASSERTS 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(undefined_behavior_sanitizer)
#define RUNNEL_ASSERTS 1
#endif
#endif
#endif
#if !defined(RUNNEL_ASSERTS)
#define RUNNEL_ASSERTS 0
#endif

namespace runnel::detail {

[[noreturn]] inline void assert_failed(const char* expr, const char* what, const char* file, int line) noexcept {
  std::fprintf(stderr, "runnel: invariant broken at %s:%d: %s (%s)\n", file, line, what, expr);
  std::fflush(stderr);
  std::abort();
}

}  // namespace runnel::detail

#if RUNNEL_ASSERTS
#define RUNNEL_ASSERT(cond, what) \
  ((cond) ? static_cast<void>(0) : ::runnel::detail::assert_failed(#cond, what, __FILE__, __LINE__))
#else
#define RUNNEL_ASSERT(cond, what) static_cast<void>(0)
#endif
