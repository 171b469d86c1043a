// Model checking of detail::mpmc_ring under Relacy (Debian relacy-dev): the
// ring's own code, instantiated with relacy_atomics, run over every
// interleaving (full search) or every interleaving with few preemptions
// (context bound) of 2-4 threads on a 2-cell ring, with Relacy's model of
// the C++ memory model choosing what each relaxed/acquire load may read.
//
// The values are `payload`s whose contents are Relacy variables: a read or
// write of one that is not ordered by happens-before against another access
// is reported as a data race. So the tests check the hand-over orderings
// (publish's release against claim_pop's acquire, release_pop's release
// against claim_push's acquire) as well as counts, order and the linearizable
// answers of the `wait` policy.
//
// Tests of the tests, run every time: the same models with the orderings
// weakened (release stores made relaxed, acquire loads made relaxed) and with
// the `give_up` policy where `wait` is needed must each be reported as
// failing; a checker that passed them would prove nothing.
//
// Usage: relacy_ring_test [-v] [name-part]   (see relacy_check.hpp)
#include "relacy_invariants.hpp"  // first: see there

#include <runnel/detail/mpmc_ring.hpp>

#include <optional>

#include "relacy_check.hpp"

namespace {

using runnel::detail::claimed_cell;
using runnel::detail::mpmc_ring;
using runnel_model::bounded;
using runnel_model::caught;
using runnel_model::passes;
using runnel_model::random_schedules;
using runnel_model::relacy_atomics;
using runnel_model::weaken;

// A value whose contents Relacy watches for unordered access.
struct payload {
  rl::var<int> v;
  explicit payload(int x) : v(x) {}
  payload(payload&& o) noexcept : v(static_cast<int>(o.v(RL_INFO))) {}
  payload& operator=(payload&&) = delete;
  int get() { return v(RL_INFO); }
};

template <weaken W>
using ring_t = mpmc_ring<payload, relacy_atomics<W>>;

// Retry a lock-free try until it succeeds, yielding to the scheduler between
// tries (a spin the model checker must know is one).
template <class Try>
void until(Try&& t) {
  while (!t()) rl::yield(1, RL_INFO);
}

template <class Ring>
std::optional<int> pop_one(Ring& r, bool linearizable) {
  std::optional<int> out;
  auto sink = [&out](payload&& p) noexcept { out = p.get(); };
  const bool ok = linearizable ? r.template try_consume<claimed_cell::wait>(sink)
                               : r.template try_consume<claimed_cell::give_up>(sink);
  (void)ok;
  return out;
}

// ---- SPSC: one producer pushes 1..4 through a 2-cell ring (two laps), one
// consumer pops them; exact values, in order.
template <weaken W>
struct spsc : rl::test_suite<spsc<W>, 2> {
  std::optional<ring_t<W>> ring;
  int got[4] = {};

  void before() { ring.emplace(2); }
  void thread(unsigned id) {
    if (id == 0) {
      for (int i = 1; i <= 4; ++i) until([&] { return ring->try_push(payload(i)); });
    } else {
      for (int& g : got) {
        std::optional<int> v;
        until([&] { return (v = pop_one(*ring, false)).has_value(); });
        g = *v;
      }
    }
  }
  void after() {
    for (int i = 0; i < 4; ++i) RL_ASSERT(got[i] == i + 1);
    RL_ASSERT(!pop_one(*ring, true));
    ring.reset();
  }
};

// ---- 2P2C: producers 0 and 1 each push two values (10p+1, 10p+2), consumers
// 2 and 3 each pop two. Every value exactly once; each consumer sees each
// producer's values in push order.
template <weaken W>
struct mpmc_2p2c : rl::test_suite<mpmc_2p2c<W>, 4> {
  std::optional<ring_t<W>> ring;
  int got[2][2] = {};

  void before() { ring.emplace(2); }
  void thread(unsigned id) {
    if (id < 2) {
      const int p = static_cast<int>(id);
      for (int i = 1; i <= 2; ++i) until([&] { return ring->try_push(payload(10 * p + i)); });
    } else {
      for (int& g : got[id - 2]) {
        std::optional<int> v;
        until([&] { return (v = pop_one(*ring, false)).has_value(); });
        g = *v;
      }
    }
  }
  void after() {
    int seen[2][3] = {};
    for (auto& c : got) {
      int last[2] = {0, 0};
      for (int v : c) {
        const int p = v / 10, i = v % 10;
        RL_ASSERT(p >= 0 && p < 2 && i >= 1 && i <= 2);
        RL_ASSERT(i > last[p]);  // per-producer order at each consumer
        last[p] = i;
        ++seen[p][i];
      }
    }
    for (auto& p : seen) RL_ASSERT(p[1] == 1 && p[2] == 1);  // exactly once
    RL_ASSERT(!pop_one(*ring, true));
    ring.reset();
  }
};

// ---- Linearizable "empty". Producer 0 pushes a; producer 1 pushes b and
// then raises `done`. The consumer waits for `done` and then makes one
// linearizable try_pop: b's push has completed (happens-before the try) and
// nobody else pops, so the try must find a value, even while a's push holds
// the head cell between claim and publish. With `Linearizable` false (the
// give_up policy) the checker must find the run where it reports empty.
template <bool Linearizable>
struct try_pop_after_completed_push : rl::test_suite<try_pop_after_completed_push<Linearizable>, 3> {
  std::optional<ring_t<weaken::none>> ring;
  rl::atomic<int> done;

  void before() {
    ring.emplace(2);
    done.store(0, rl::mo_relaxed, RL_INFO);
  }
  void thread(unsigned id) {
    if (id == 0) {
      RL_ASSERT(ring->template try_push<claimed_cell::wait>(payload(1)));
    } else if (id == 1) {
      RL_ASSERT(ring->template try_push<claimed_cell::wait>(payload(2)));
      done.store(1, rl::mo_release, RL_INFO);
    } else {
      until([&] { return done.load(rl::mo_acquire, RL_INFO) == 1; });
      const auto v = pop_one(*ring, Linearizable);
      RL_ASSERT(v.has_value());
    }
  }
  void after() { ring.reset(); }
};

// ---- Linearizable "full", the mirror image. The ring starts full (1, 2);
// consumers 0 and 1 each pop one value, and consumer 1 then raises `done`.
// The producer waits for `done` and makes one linearizable try_push: a pop
// has completed, so the ring has room, even while the other pop holds the
// oldest cell between claim and release.
template <bool Linearizable>
struct try_push_after_completed_pop : rl::test_suite<try_push_after_completed_pop<Linearizable>, 3> {
  std::optional<ring_t<weaken::none>> ring;
  rl::atomic<int> done;
  int got[2] = {};

  void before() {
    ring.emplace(2);
    RL_ASSERT(ring->try_push(payload(1)));
    RL_ASSERT(ring->try_push(payload(2)));
    done.store(0, rl::mo_relaxed, RL_INFO);
  }
  void thread(unsigned id) {
    if (id < 2) {
      const auto v = pop_one(*ring, true);
      RL_ASSERT(v.has_value());
      got[id] = *v;
      if (id == 1) done.store(1, rl::mo_release, RL_INFO);
    } else {
      until([&] { return done.load(rl::mo_acquire, RL_INFO) == 1; });
      const bool ok = Linearizable ? ring->template try_push<claimed_cell::wait>(payload(3))
                                   : ring->template try_push<claimed_cell::give_up>(payload(3));
      RL_ASSERT(ok);
    }
  }
  void after() {
    RL_ASSERT(got[0] + got[1] == 3 && got[0] != got[1]);
    const auto v = pop_one(*ring, true);
    RL_ASSERT(v == 3);
    ring.reset();
  }
};

// ---- Full and empty edges. One producer makes three linearizable
// try_pushes into the 2-cell ring without retrying, one consumer three
// linearizable try_pops. The first two pushes can never see "full" (only
// one producer, so at most two values are ever unpopped); a third push that
// fails means no pop had claimed a value yet; the consumer gets a prefix of
// the pushed values in order; the values pushed are exactly those popped
// plus those left in the ring.
struct full_empty_edges : rl::test_suite<full_empty_edges, 2> {
  std::optional<ring_t<weaken::none>> ring;
  bool pushed[3] = {};
  int popped[3] = {};
  int npopped = 0;
  int popped_before_third_push = -1;

  void before() { ring.emplace(2); }
  void thread(unsigned id) {
    if (id == 0) {
      for (int i = 0; i < 3; ++i) pushed[i] = ring->template try_push<claimed_cell::wait>(payload(i + 1));
    } else {
      for (int i = 0; i < 3; ++i) {
        if (const auto v = pop_one(*ring, true)) popped[npopped++] = *v;
      }
    }
  }
  void after() {
    RL_ASSERT(pushed[0] && pushed[1]);
    if (!pushed[2]) {
      // "full" on the third push: the consumer had not claimed 1 then, so
      // everything it popped came after; it can have popped 1 and 2 only.
      RL_ASSERT(npopped <= 2);
    }
    for (int i = 0; i < npopped; ++i) RL_ASSERT(popped[i] == i + 1);
    int left = 0;
    while (const auto v = pop_one(*ring, true)) {
      RL_ASSERT(*v == npopped + left + 1);
      ++left;
    }
    RL_ASSERT(npopped + left == 2 + (pushed[2] ? 1 : 0));
    ring.reset();
  }
};

}  // namespace

int main(int argc, char** argv) {
  return runnel_model::run_models(
      argc, argv,
      {
          passes<spsc<weaken::none>>("spsc, 2 cells, 4 values", bounded(2)),
          // Four threads are too many for a systematic search in seconds
          // (context bound 1 runs for minutes): random schedules instead.
          passes<mpmc_2p2c<weaken::none>>("2P2C, 2 cells, 2 values each (random)", random_schedules(100000)),
          passes<try_pop_after_completed_push<true>>("try_pop<wait> after a completed push", bounded(2)),
          passes<try_push_after_completed_pop<true>>("try_push<wait> after a completed pop", bounded(2)),
          passes<full_empty_edges>("full/empty edges, linearizable tries", bounded(2)),

          // Tests of the tests: each must be caught.
          caught<spsc<weaken::release_stores>>("release stores relaxed: spsc", bounded(), rl::test_result_data_race),
          caught<spsc<weaken::acquire_loads>>("acquire loads relaxed: spsc", bounded(), rl::test_result_data_race),
          caught<mpmc_2p2c<weaken::release_stores>>("release stores relaxed: 2P2C", random_schedules(20000),
                                                    rl::test_result_data_race),
          caught<try_pop_after_completed_push<false>>("try_pop<give_up> after a completed push", bounded(),
                                                      rl::test_result_user_assert_failed),
          caught<try_push_after_completed_pop<false>>("try_push<give_up> after a completed pop", bounded(),
                                                      rl::test_result_user_assert_failed),
      });
}
