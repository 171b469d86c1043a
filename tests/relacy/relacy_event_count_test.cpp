// Model checking of detail::basic_event_count (park/wake) under Relacy
// (Debian relacy-dev): the event count's own code, instantiated with
// relacy_atomics, run over the interleavings of sleepers (prepare_wait, the
// condition's re-check, then cancel_wait or wait) against notifiers (publish,
// then notify), with Relacy's model of the C++ memory model choosing what each
// load may read.
//
// How the sleep is modelled. The event count sleeps in futex(2) on its epoch
// word; relacy_atomics gives the word a modelled futex (see futex_wait there):
// FUTEX_WAIT re-reads the word and parks in one step, FUTEX_WAKE unparks up to
// n parked threads, both with the kernel's full barrier, and a parked thread
// may also wake spuriously (the event count must sleep again). A timed wait
// may time out at any point. A lost wake-up is then a thread parked for ever:
// Relacy reports it as a deadlock (every thread left is blocked). membarrier
// has no counterpart in the model, so the handshake runs its fallback, a
// seq_cst fence on each side (relacy_atomics.hpp says why that stands for
// the membarrier pair too).
//
// What must hold: no lost wake-up (no deadlock); a sleeper that wakes sees
// what the notifier published before its notify, even in a plain variable
// read with no ordering of its own (the epoch's release/acquire hands it
// over; otherwise a data race); every prepare_wait() is ended exactly once
// (has_waiters() is false at the end, and the count never goes below zero:
// the header's RUNNEL_ASSERT, checked here in every interleaving).
//
// Tests of the tests, run every time (each must be reported as failing):
//   the handshake's fences made acq_rel (no StoreLoad): a lost wake-up
//     (a deadlock), with one sleeper and with two;
//   the epoch's acquire loads made relaxed: a data race on the published
//     value.
// Not a mutant here: the epoch bump's release made relaxed. In the model's
// fallback handshake the notifier's seq_cst fence comes just before the bump
// and already makes it a release (a release fence then a relaxed write that
// an acquire load reads); the checker rightly passes it. The bump's own
// release is for the membarrier path, whose light side is only a compiler
// barrier, and that path is not modelled.
//
// Usage: relacy_event_count_test [-v] [name-part]   (see relacy_check.hpp)
#include "relacy_invariants.hpp"  // first: see there

#include <runnel/detail/event_count.hpp>

#include <optional>

#include "relacy_check.hpp"

namespace {

using runnel::detail::basic_event_count;
using runnel_model::bounded;
using runnel_model::caught;
using runnel_model::full_search;
using runnel_model::passes;
using runnel_model::random_schedules;
using runnel_model::relacy_atomics;
using runnel_model::weaken;

template <weaken W>
using ec_t = basic_event_count<relacy_atomics<W>>;

// ---- One sleeper, one notifier. The notifier writes `data` (a plain
// variable), raises `ready` and notifies once. The sleeper checks `ready`,
// prepares, re-checks, then cancels or waits; once past either, it reads
// `data` without looking at `ready` again: the event count alone must have
// ordered the write before the read.
template <weaken W>
struct one_sleeper : rl::test_suite<one_sleeper<W>, 2> {
  std::optional<ec_t<W>> ec;
  rl::atomic<int> ready;
  rl::var<int> data;

  void before() {
    ec.emplace();
    ready.store(0, rl::mo_relaxed, RL_INFO);
    data(RL_INFO) = 0;
  }
  void thread(unsigned id) {
    if (id == 0) {
      const auto k = ec->prepare_wait();
      if (ready.load(rl::mo_acquire, RL_INFO) == 1) {
        ec->cancel_wait();
      } else {
        ec->wait(k);
      }
      RL_ASSERT(data(RL_INFO) == 42);
    } else {
      data(RL_INFO) = 42;
      ready.store(1, rl::mo_release, RL_INFO);
      ec->notify_one();
    }
  }
  void after() {
    RL_ASSERT(!ec->has_waiters());
    ec.reset();
  }
};

// ---- Two sleepers, one notifier handing out two tokens with a notify_one
// each (a semaphore, the way the rings' not_empty/not_full are used). Each
// sleeper loops: take a token, or prepare, retry, and cancel or wait. Both
// must get a token: a notify_one that wakes nobody useful, or a wake-up lost
// between the two sleepers, leaves one parked for ever.
template <weaken W>
struct two_sleepers_two_tokens : rl::test_suite<two_sleepers_two_tokens<W>, 3> {
  std::optional<ec_t<W>> ec;
  rl::atomic<int> tokens;

  void before() {
    ec.emplace();
    tokens.store(0, rl::mo_relaxed, RL_INFO);
  }
  bool take() {
    int t = tokens.load(rl::mo_relaxed, RL_INFO);
    while (t > 0) {
      if (tokens.compare_exchange_weak(t, t - 1, rl::mo_acquire, RL_INFO)) return true;
    }
    return false;
  }
  void thread(unsigned id) {
    if (id < 2) {
      for (;;) {
        if (take()) return;
        const auto k = ec->prepare_wait();
        if (take()) {
          ec->cancel_wait();
          return;
        }
        ec->wait(k);
      }
    } else {
      for (int i = 0; i < 2; ++i) {
        tokens.fetch_add(1, rl::mo_release, RL_INFO);
        ec->notify_one();
      }
    }
  }
  void after() {
    RL_ASSERT(tokens.load(rl::mo_relaxed, RL_INFO) == 0);
    RL_ASSERT(!ec->has_waiters());
    ec.reset();
  }
};

// ---- Timed wait: as one_sleeper, but the sleeper uses wait_until, which
// may time out at any point. A wake (true) means the data is there; either
// way the wait has ended (no waiter left counted).
template <weaken W>
struct timed_sleeper : rl::test_suite<timed_sleeper<W>, 2> {
  std::optional<ec_t<W>> ec;
  rl::atomic<int> ready;
  rl::var<int> data;

  void before() {
    ec.emplace();
    ready.store(0, rl::mo_relaxed, RL_INFO);
    data(RL_INFO) = 0;
  }
  void thread(unsigned id) {
    if (id == 0) {
      const auto k = ec->prepare_wait();
      if (ready.load(rl::mo_acquire, RL_INFO) == 1) {
        ec->cancel_wait();
        RL_ASSERT(data(RL_INFO) == 42);
      } else if (ec->wait_until(k, std::chrono::steady_clock::time_point::max())) {
        RL_ASSERT(data(RL_INFO) == 42);
      }
    } else {
      data(RL_INFO) = 42;
      ready.store(1, rl::mo_release, RL_INFO);
      ec->notify_all();
    }
  }
  void after() {
    RL_ASSERT(!ec->has_waiters());
    ec.reset();
  }
};

}  // namespace

int main(int argc, char** argv) {
  return runnel_model::run_models(
      argc, argv,
      {
          passes<one_sleeper<weaken::none>>("one sleeper, one notify (full search)", full_search()),
          passes<timed_sleeper<weaken::none>>("timed sleeper, one notify_all", bounded(4)),
          passes<two_sleepers_two_tokens<weaken::none>>("two sleepers, two tokens, notify_one (random)",
                                                        random_schedules(100000)),

          // Tests of the tests: each must be caught.
          caught<one_sleeper<weaken::fences>>("fences without StoreLoad: one sleeper", full_search(),
                                              rl::test_result_deadlock),
          caught<two_sleepers_two_tokens<weaken::fences>>("fences without StoreLoad: two sleepers",
                                                          random_schedules(100000), rl::test_result_deadlock),
          caught<one_sleeper<weaken::acquire_loads>>("epoch loads relaxed: one sleeper", full_search(),
                                                     rl::test_result_data_race),
      });
}
