// Store-buffering litmus test of the pool's wake-up handshake between a
// worker that publishes a task and the last searcher leaving the search.
//
// Thread A (publisher, owner of a work-stealing deque) pushes a task, then
// runs detail::publisher_must_wake(): light fence, read the idle state.
// Thread B (the last searcher) runs detail::last_searcher_sees_work():
// decrement the searcher count, heavy fence, look for queued work. Both are
// the very functions thread_pool calls. The lost wake-up is the outcome where
// A skips waking (it saw B still searching) and B finds nothing queued (it
// missed A's push): the task would then sit in a busy worker's deque while
// another worker sleeps. With membarrier active the light fence is only a
// compiler barrier, so A's push may still sit in its store buffer when it
// reads the state; only B's heavy fence (membarrier) rules the outcome out.
// Without the heavy fence the outcome showed up 0-34 times in 320,000
// handshakes on a busy 2-core x86 machine (the test also runs that old
// protocol, as a control, and reports its count without asserting it: it is
// timing dependent, so a single run of the default size may miss it; raise
// the rounds below for a stronger check). Without membarrier
// (RUNNEL_NO_MEMBARRIER=1) both fences are full fences and neither protocol
// loses a wake-up. Under ThreadSanitizer the same code runs on the hardware
// (membarrier still works), with fewer rounds.
//
// RUNNEL_LITMUS_ROUNDS=<n> in the environment sets the number of rounds of
// 16 handshakes each (default 20,000; 1,000 under a sanitizer).
#include "runnel/detail/asymmetric_fence.hpp"
#include "runnel/detail/backoff.hpp"
#include "runnel/pool/work_stealing_deque.hpp"
#include "runnel/pool/idle_workers.hpp"

#include <atomic>
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "test_support.hpp"

namespace {

using runnel::detail::idle_counts;

// Two-thread spin barrier; yields after a while so that it also makes
// progress when the machine is oversubscribed.
class spin_barrier {
 public:
  void arrive_and_wait() noexcept {
    // Acquire: pairs with the release store of the generation below, so what
    // the other thread wrote before arriving is visible after we leave.
    const std::uint32_t gen = generation_.load(std::memory_order_acquire);
    // Acq_rel: the last arriver must see the first one's writes (acquire)
    // and publish its own to the one spinning (release, via generation_).
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == 1) {
      // Relaxed: ordered before the release store below.
      arrived_.store(0, std::memory_order_relaxed);
      // Release: see the acquire loads.
      generation_.store(gen + 1, std::memory_order_release);
      return;
    }
    int spins = 0;
    // Acquire: see the first load.
    while (generation_.load(std::memory_order_acquire) == gen) {
      if (++spins < 4096) {
        runnel::detail::cpu_relax();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  std::atomic<std::uint32_t> arrived_{0};     // threads at the barrier this generation
  std::atomic<std::uint32_t> generation_{0};  // bumped by the last arriver
};

std::size_t litmus_rounds() {
  if (const char* s = std::getenv("RUNNEL_LITMUS_ROUNDS"); s != nullptr && *s != '\0')
    return static_cast<std::size_t>(std::strtoull(s, nullptr, 10));
  return runnel_test::under_sanitizer ? 1'000 : 20'000;
}

// A short pause of 0-15 spins, different per round and per side, so that
// the two sides' operations sweep over each other's timing.
void jitter(std::uint32_t& rng) noexcept {
  rng ^= rng << 13;
  rng ^= rng >> 17;
  rng ^= rng << 5;
  for (std::uint32_t i = 0; i < (rng & 15u); ++i) runnel::detail::cpu_relax();
}

// Three workers: A (busy, unparked), B (unparked, the only searcher) and
// one parked worker.
constexpr std::size_t workers = 3;
constexpr std::uint64_t initial_state = 2 * idle_counts::one_unparked + idle_counts::one_searching;

struct slot {
  // The pool's idle state, as in thread_pool; own cache line, as there.
  alignas(runnel::detail::false_sharing_range) std::atomic<std::uint64_t> state{initial_state};
  runnel::detail::work_stealing_deque<int*> deque;
  // Written by one side before the round's second barrier, read by A after it.
  bool a_wakes = false;
  bool b_sees_work = false;
};

// Runs `rounds` rounds of the handshake on `slots` independent (state,
// deque) pairs per round (fewer barriers per handshake); `leave` is B's side.
// Returns the number of handshakes in which both sides missed each other.
template <class Leave>
std::size_t count_lost_wakeups(std::size_t rounds, Leave leave) {
  constexpr std::size_t slots = 16;
  std::vector<std::unique_ptr<slot>> s;
  for (std::size_t k = 0; k < slots; ++k) s.push_back(std::make_unique<slot>());
  int token = 0;
  spin_barrier barrier;
  std::size_t lost = 0;

  std::thread b([&] {
    std::uint32_t rng = 0x9e3779b9u;
    for (std::size_t r = 0; r < rounds; ++r) {
      barrier.arrive_and_wait();
      jitter(rng);
      for (auto& x : s) {
        const runnel::detail::work_stealing_deque<int*>* d = &x->deque;
        x->b_sees_work = leave(x->state, workers, [d] { return !d->empty(); });
      }
      barrier.arrive_and_wait();
      // Relaxed: the next round's barrier publishes it to A.
      for (auto& x : s) x->state.store(initial_state, std::memory_order_relaxed);
    }
  });
  std::uint32_t rng = 0x85ebca6bu;
  bool all_popped = true;
  for (std::size_t r = 0; r < rounds; ++r) {
    barrier.arrive_and_wait();
    jitter(rng);
    for (auto& x : s) {
      x->deque.push(&token);
      x->a_wakes = runnel::detail::publisher_must_wake(x->state, workers);
    }
    barrier.arrive_and_wait();
    for (auto& x : s) {
      if (!x->a_wakes && !x->b_sees_work) ++lost;
      // Take the task back so that the next round starts empty.
      all_popped = all_popped && x->deque.pop() == &token;
    }
  }
  b.join();
  CHECK(all_popped);
  return lost;
}

}  // namespace

TEST_CASE("the last searcher leaving and a worker posting cannot both miss each other", "[pool][litmus]") {
  const std::size_t rounds = litmus_rounds();
  const bool membarrier = runnel::detail::membarrier_ready();

  // The protocol thread_pool runs.
  const std::size_t lost = count_lost_wakeups(rounds, [](auto& state, std::size_t workers, auto queued) {
    return runnel::detail::last_searcher_sees_work(state, workers, queued);
  });

  // Control: the protocol before the fix (no heavy fence after the
  // decrement). Reported, not asserted.
  const std::size_t lost_old = count_lost_wakeups(rounds, [](auto& state, std::size_t workers, auto queued) {
    const std::uint64_t before = state.fetch_sub(idle_counts::one_searching, std::memory_order_seq_cst);
    if (idle_counts::searching_of(before) != 1 || idle_counts::unparked_of(before) >= workers) return false;
    return static_cast<bool>(queued());
  });
  WARN("idle-protocol litmus, " << rounds * 16 << " handshakes, membarrier " << (membarrier ? "on" : "off")
                                << ": lost wake-ups " << lost << " (pool's protocol), " << lost_old
                                << " (control without the heavy fence)");
  if (!membarrier) {
    // Both fences are full fences then; the control has no reason to fail
    // either, so the test cannot tell the protocols apart here.
    WARN("membarrier unavailable or disabled: the light fence is a full fence, so this run cannot "
         "distinguish the protocols");
  }
  CHECK(lost == 0);
}
