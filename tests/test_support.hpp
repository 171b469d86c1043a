// Helpers shared by runnel's tests: sanitizer-aware message counts, a start
// gate for threads, and element types that count their own lifetimes.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <thread>
#include <vector>

namespace runnel_test {

// True when built with ThreadSanitizer or AddressSanitizer, which slow atomic
// operations and memory accesses by 5-20x; long tests scale their counts down.
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
inline constexpr bool under_sanitizer = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
inline constexpr bool under_sanitizer = true;
#else
inline constexpr bool under_sanitizer = false;
#endif
#else
inline constexpr bool under_sanitizer = false;
#endif

// n in an ordinary build, n/20 (at least 1) under a sanitizer.
constexpr std::size_t scaled(std::size_t n) noexcept {
  if constexpr (under_sanitizer) {
    return n / 20 == 0 ? 1 : n / 20;
  } else {
    return n;
  }
}

// Runs body(i) for i in [0, n) on n threads released together (so that they
// really overlap) and joins them all.
inline void run_threads(std::size_t n, const std::function<void(std::size_t)>& body) {
  std::atomic<bool> go{false};
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    threads.emplace_back([&go, &body, i] {
      // Acquire pairs with the release store below; plain gate, no data.
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      body(i);
    });
  }
  go.store(true, std::memory_order_release);  // Release: see the load above.
  for (auto& t : threads) t.join();
}

// Lifetime counters for one element type. Each test uses its own Tag so that
// counts from other tests (or other threads of a failed test) do not mix.
struct lifetime_counts {
  // All seq_cst: tests read them after joins, speed does not matter.
  std::atomic<long> live{0};
  std::atomic<long> constructed{0};
  std::atomic<long> destroyed{0};
  std::atomic<long> bad_destroys{0};  // destroy of a dead or never-built object
  std::atomic<long> use_after_move{0};

  void reset() noexcept {
    live = 0;
    constructed = 0;
    destroyed = 0;
    bad_destroys = 0;
    use_after_move = 0;
  }
};

// An element that counts constructions and destructions and detects a double
// destroy (the destructor clears a magic word it checks on entry). Move is
// noexcept as the rings require; the moved-from object keeps living (it is
// still destroyed once) but carries value -1.
template <class Tag>
class tracked {
 public:
  static lifetime_counts& counts() noexcept {
    static lifetime_counts c;
    return c;
  }

  explicit tracked(long v) noexcept : value_(v) { born(); }
  tracked(const tracked& o) noexcept : value_(o.value_) { born(); }
  tracked(tracked&& o) noexcept : value_(o.value_) {
    if (o.value_ == -1) ++counts().use_after_move;
    o.value_ = -1;
    born();
  }
  tracked& operator=(const tracked& o) noexcept {
    value_ = o.value_;
    return *this;
  }
  tracked& operator=(tracked&& o) noexcept {
    value_ = o.value_;
    o.value_ = -1;
    return *this;
  }
  ~tracked() {
    if (magic_ != alive_magic) {
      ++counts().bad_destroys;
      return;
    }
    magic_ = 0;
    --counts().live;
    ++counts().destroyed;
  }

  long value() const noexcept { return value_; }

 private:
  static constexpr std::uint64_t alive_magic = 0x7275'6e6e'656c'0a11;

  void born() noexcept {
    magic_ = alive_magic;
    ++counts().live;
    ++counts().constructed;
  }

  std::uint64_t magic_ = 0;
  long value_;
};

// No default constructor, noexcept move: what the rings must accept.
class no_default {
 public:
  explicit no_default(int v) noexcept : v_(v) {}
  no_default(no_default&&) noexcept = default;
  no_default& operator=(no_default&&) noexcept = default;
  int get() const noexcept { return v_; }

 private:
  int v_;
};

// A type whose move constructor may throw: the rings must reject it at
// compile time (see detail/ring_common.hpp).
struct throwing_move {
  throwing_move() = default;
  throwing_move(const throwing_move&) = default;
  throwing_move(throwing_move&&) noexcept(false) {}
};

// Copy may throw (on request), move may not: copying into a ring must leave
// the ring unchanged when the copy throws.
struct throwing_copy {
  static inline std::atomic<bool> fail{false};
  int v = 0;
  explicit throwing_copy(int x) noexcept : v(x) {}
  throwing_copy(const throwing_copy& o) : v(o.v) {
    if (fail.load()) throw std::runtime_error("copy refused");
  }
  throwing_copy(throwing_copy&&) noexcept = default;
  throwing_copy& operator=(const throwing_copy&) = default;
  throwing_copy& operator=(throwing_copy&&) noexcept = default;
};

}  // namespace runnel_test
