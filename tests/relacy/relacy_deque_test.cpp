// Model checking of detail::work_stealing_deque under Relacy (Debian
// relacy-dev): the deque's own code, instantiated with relacy_atomics, run
// over the interleavings of its owner (model thread 0: push and pop at the
// bottom) against one or two thieves (steal at the top), with Relacy's model
// of the C++ memory model choosing what each load may read. The deque starts
// at its smallest capacity (2 slots), so the owner's third push grows it
// while a thief may be reading the old buffer.
//
// The elements are pointers to `item`s whose contents are Relacy variables,
// written by the owner before the push and read by whoever takes the item: a
// read not ordered by happens-before after the write is a data race. So the
// models check the hand-over (push's release store of bottom_ against
// steal's loads, grow's release store of buffer_ against steal's acquire)
// as well as the counts: every item pushed is taken exactly once, by the
// owner, by a thief, or by the final drain, and null only ever means
// "nothing". The deque's own RUNNEL_ASSERTs (bounds, non-null elements) are
// checked in every interleaving too (relacy_invariants.hpp).
//
// Tests of the tests, run every time (each must be reported as failing):
//   pop's StoreLoad order taken away (the owner's seq_cst accesses made
//     release/acquire: the paper's fence in pop): owner and thief both take
//     the last item;
//   the thieves' seq_cst taken away (the fence between steal's two loads);
//   push's and grow's release stores made relaxed: data race on an item;
//   steal's acquire load of the buffer made relaxed: a thief reads a slot of
//     the grown buffer before the copy into it (uninitialised or race).
//
// Usage: relacy_deque_test [-v] [name-part]   (see relacy_check.hpp)
#include "relacy_invariants.hpp"  // first: see there

#include <runnel/pool/work_stealing_deque.hpp>

#include <optional>

#include "relacy_check.hpp"

namespace {

using runnel::detail::work_stealing_deque;
using runnel_model::bounded;
using runnel_model::caught;
using runnel_model::passes;
using runnel_model::random_schedules;
using runnel_model::relacy_atomics;
using runnel_model::weaken;

struct item {
  rl::var<int> v;
};

constexpr int max_items = 4;

// The state every model shares: the deque, the items, who took what.
template <weaken W, int Threads>
struct deque_model {
  std::optional<work_stealing_deque<item*, relacy_atomics<W>>> dq;
  std::optional<item> items[max_items];
  int taken[max_items] = {};
  int pushed = 0;

  void setup() {
    dq.emplace(2);
    for (auto& i : items) i.emplace();
    pushed = 0;
    for (int& t : taken) t = 0;
  }
  // Owner only: write the item's contents, then push it.
  void push() {
    item* it = &*items[pushed];
    it->v(RL_INFO) = 100 + pushed;
    dq->push(it);
    ++pushed;
  }
  // Whoever got `it`: its contents must be those written before its push.
  void took(item* it) {
    if (it == nullptr) return;
    int i = 0;
    while (i < pushed && it != &*items[i]) ++i;
    RL_ASSERT(i < pushed);  // one of the items pushed
    RL_ASSERT(it->v(RL_INFO) == 100 + i);
    ++taken[i];
  }
  void pop() { took(dq->pop()); }
  void steal() { took(dq->steal()); }
  // After the threads: the owner drains what is left; every item exactly once.
  void drain_and_count() {
    while (item* it = dq->pop()) took(it);
    RL_ASSERT(dq->empty());
    RL_ASSERT(dq->steal() == nullptr);
    for (int i = 0; i < pushed; ++i) RL_ASSERT(taken[i] == 1);
    dq.reset();
    for (auto& i : items) i.reset();
  }
};

// ---- Growth while stealing: the owner pushes three items into the 2-slot
// deque (the third push grows it), pops one, pushes a fourth and pops twice;
// one thief steals twice.
template <weaken W>
struct grow_vs_thief : rl::test_suite<grow_vs_thief<W>, 2> {
  deque_model<W, 2> m;
  void before() { m.setup(); }
  void thread(unsigned id) {
    if (id == 0) {
      m.push();
      m.push();
      m.push();
      m.pop();
      m.push();
      m.pop();
      m.pop();
    } else {
      m.steal();
      m.steal();
    }
  }
  void after() { m.drain_and_count(); }
};

// ---- The last item: the owner pushes two and pops twice, two thieves steal
// once each, so owner and thieves race for the same slot in both ways (pop's
// CAS on top_ against a thief's, and two thieves' CASes).
template <weaken W>
struct last_item_two_thieves : rl::test_suite<last_item_two_thieves<W>, 3> {
  deque_model<W, 3> m;
  void before() { m.setup(); }
  void thread(unsigned id) {
    if (id == 0) {
      m.push();
      m.push();
      m.pop();
      m.pop();
    } else {
      m.steal();
    }
  }
  void after() { m.drain_and_count(); }
};

// ---- Two thieves during growth: the owner pushes three (growing on the
// third) and pops one, while two thieves steal once each.
template <weaken W>
struct grow_two_thieves : rl::test_suite<grow_two_thieves<W>, 3> {
  deque_model<W, 3> m;
  void before() { m.setup(); }
  void thread(unsigned id) {
    if (id == 0) {
      m.push();
      m.push();
      m.push();
      m.pop();
    } else {
      m.steal();
    }
  }
  void after() { m.drain_and_count(); }
};

}  // namespace

int main(int argc, char** argv) {
  return runnel_model::run_models(
      argc, argv,
      {
          passes<grow_vs_thief<weaken::none>>("owner vs 1 thief, growth", bounded(2)),
          passes<last_item_two_thieves<weaken::none>>("last item, owner vs 2 thieves", bounded(2)),
          passes<grow_two_thieves<weaken::none>>("growth, owner vs 2 thieves", bounded(2)),
          passes<grow_two_thieves<weaken::none>>("growth, owner vs 2 thieves (random)", random_schedules(100000)),

          // Tests of the tests: each must be caught.
          caught<last_item_two_thieves<weaken::seq_cst_thread0>>("pop without StoreLoad: last item", bounded(2),
                                                                 rl::test_result_user_assert_failed),
          caught<last_item_two_thieves<weaken::seq_cst_others>>("steal without StoreLoad: last item", bounded(2),
                                                                rl::test_result_user_assert_failed),
          caught<grow_vs_thief<weaken::release_stores>>("release stores relaxed: growth", bounded(),
                                                        rl::test_result_data_race),
          caught<grow_vs_thief<weaken::acquire_loads>>("acquire loads relaxed: growth", bounded(),
                                                       rl::test_result_unitialized_access),
      });
}
