// A value whose move constructor can be made to stop half-way, to put a push
// or pop of a ring or channel between its claim and its publish/release, for
// as long as a test wants.
#pragma once

#include <atomic>
#include <chrono>
#include <thread>

namespace runnel_test {

struct stall_gate {
  // The next move of a value tied to this gate stops (once).
  std::atomic<bool> armed{false};
  // Set by the stopped move; the test waits for it.
  std::atomic<bool> entered{false};
  std::atomic<bool> released{false};

  void wait_entered() const noexcept {
    while (!entered.load()) std::this_thread::yield();
  }
  void release() noexcept { released.store(true); }
};

struct stalling {
  int value = 0;
  stall_gate* gate = nullptr;

  stalling() noexcept = default;
  stalling(int v, stall_gate* g) noexcept : value(v), gate(g) {}
  stalling(stalling&& o) noexcept : value(o.value), gate(o.gate) {
    if (gate != nullptr && gate->armed.exchange(false)) {
      gate->entered.store(true);
      while (!gate->released.load()) std::this_thread::yield();
    }
  }
  stalling& operator=(stalling&& o) noexcept {
    value = o.value;
    gate = o.gate;
    return *this;
  }
  ~stalling() = default;
};

// Releases a gate from another thread after a pause (long enough that the
// test thread is usually already waiting; nothing is asserted about time).
class delayed_release {
 public:
  explicit delayed_release(stall_gate& g, std::chrono::milliseconds after = std::chrono::milliseconds(20))
      : t_([&g, after] {
          std::this_thread::sleep_for(after);
          g.release();
        }) {}
  ~delayed_release() { t_.join(); }
  delayed_release(const delayed_release&) = delete;
  delayed_release& operator=(const delayed_release&) = delete;

 private:
  std::thread t_;
};

}  // namespace runnel_test
