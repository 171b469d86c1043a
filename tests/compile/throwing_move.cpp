// Compiled by the compile_fail_* / compile_ok_* tests in CMakeLists.txt:
// with ELEMENT_THROWING_MOVE the element's move constructor may throw and
// instantiating the ring must fail with runnel's static_assert; without it
// the same program must compile.
#include <runnel/mpmc_queue.hpp>
#include <runnel/spsc_queue.hpp>

struct element {
  element() = default;
  element(const element&) = default;
#ifdef ELEMENT_THROWING_MOVE
  element(element&&) noexcept(false) {}
#else
  element(element&&) noexcept {}
#endif
  element& operator=(const element&) = default;
  element& operator=(element&&) noexcept { return *this; }
};

int main() {
#if defined(RING_mpmc)
  runnel::mpmc_queue<element> q(8);
#else
  runnel::spsc_queue<element> q(8);
#endif
  (void)q.try_push(element{});
  return q.try_pop().has_value() ? 0 : 1;
}
