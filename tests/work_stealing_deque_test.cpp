// Tests of detail::work_stealing_deque on its own (the pool uses it; these
// check it without the pool around it): the owner's LIFO end and the
// thieves' FIFO end, growth keeping every element, a stampede of thieves
// (more threads than cores) against an owner that pops at the same time,
// growth while thieves steal, and owner and thieves racing for the last
// elements. Every element is taken exactly once: each carries its own
// "taken" count and a value written before its push (read by the taker, so
// that ThreadSanitizer sees the hand-over), and the totals and sums are
// exact. The same cases that crossbeam-deque's own suite covers (smoke,
// stampede, stress); the code is ours.
//
// The model-checked counterpart is tests/relacy/relacy_deque_test.cpp.
//
// Mutants tried (x86-64, 2 shared cores, Release):
//   pop's CAS for the last element made a plain store of top_: "racing for
//     the last two elements" failed 4/10 runs (with 200,000 rounds; now
//     1,000,000);
//   steal's CAS made a plain store of top_: the run hangs (thieves pass
//     bottom_), caught by the ctest time-out only;
//   pop's seq_cst store of bottom_ made release (the StoreLoad order): not
//     caught in 10 runs: x86 reorders that store only within its store
//     buffer's drain; the Relacy model catches it every run.
#include <runnel/pool/work_stealing_deque.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "test_support.hpp"

namespace {

using runnel::detail::work_stealing_deque;
using runnel_test::run_threads;
using runnel_test::scaled;

struct job {
  std::uint64_t value = 0;       // written by the owner before the push
  std::atomic<int> taken{0};     // seq_cst: counted, read after the joins
};

// The jobs of one test and the checks on them.
struct jobs {
  explicit jobs(std::size_t n) : all(n) {
    for (std::size_t i = 0; i < n; ++i) all[i].value = i + 1;
  }
  job* at(std::size_t i) { return &all[i]; }
  // Called by whoever took `j` (owner or thief).
  void take(job* j) {
    sum.fetch_add(j->value, std::memory_order_relaxed);  // Relaxed: read after the joins
    count.fetch_add(1, std::memory_order_relaxed);       // Relaxed: as above
    j->taken.fetch_add(1, std::memory_order_relaxed);    // Relaxed: as above
  }
  void require_each_taken_once() {
    std::size_t wrong = 0;
    for (auto& j : all) wrong += j.taken.load() == 1 ? 0 : 1;
    REQUIRE(wrong == 0);
    REQUIRE(count.load() == all.size());
    REQUIRE(sum.load() == all.size() * (all.size() + 1) / 2);
  }

  std::vector<job> all;
  std::atomic<std::uint64_t> sum{0};
  std::atomic<std::size_t> count{0};
};

// More thieves than cores (at least 8), so that thieves are preempted in the
// middle of a steal.
std::size_t oversubscribed_thieves() {
  return std::max<std::size_t>(8, 2 * std::max(1u, std::thread::hardware_concurrency()));
}

}  // namespace

TEST_CASE("the owner pops newest first, thieves steal oldest first, growth keeps every element",
          "[deque]") {
  work_stealing_deque<job*> dq(2);  // grows 9 times below
  jobs js(1000);
  REQUIRE(dq.empty());
  REQUIRE(dq.pop() == nullptr);
  REQUIRE(dq.steal() == nullptr);
  for (std::size_t i = 0; i < 1000; ++i) dq.push(js.at(i));
  REQUIRE(dq.size() == 1000);
  for (std::size_t i = 0; i < 10; ++i) REQUIRE(dq.steal() == js.at(i));
  for (std::size_t i = 999; i >= 10; --i) REQUIRE(dq.pop() == js.at(i));
  REQUIRE(dq.empty());
  REQUIRE(dq.pop() == nullptr);
  REQUIRE(dq.steal() == nullptr);
  // After emptying by pop and by steal, the deque works on (indices moved on).
  dq.push(js.at(0));
  dq.push(js.at(1));
  REQUIRE(dq.steal() == js.at(0));
  REQUIRE(dq.pop() == js.at(1));
  REQUIRE(dq.pop() == nullptr);
}

TEST_CASE("a stampede of thieves and the popping owner take every element exactly once", "[deque][stress]") {
  const std::size_t n = scaled(200'000);
  const std::size_t thieves = oversubscribed_thieves();
  work_stealing_deque<job*> dq(256);
  jobs js(n);
  for (std::size_t i = 0; i < n; ++i) dq.push(js.at(i));
  std::atomic<std::size_t> left{n};  // seq_cst: the stop condition of every thread
  run_threads(thieves + 1, [&](std::size_t id) {
    while (left.load() != 0) {
      job* j = id == 0 ? dq.pop() : dq.steal();
      if (j == nullptr) continue;
      js.take(j);
      left.fetch_sub(1);
    }
  });
  js.require_each_taken_once();
  REQUIRE(dq.empty());
}

TEST_CASE("thieves steal while the owner grows the deque from 2 slots, pushing and popping", "[deque][stress]") {
  const std::size_t n = scaled(400'000);
  const std::size_t thieves = GENERATE(as<std::size_t>{}, 1, 3, oversubscribed_thieves());
  CAPTURE(thieves);
  work_stealing_deque<job*> dq(2);
  jobs js(n);
  std::atomic<bool> owner_done{false};  // seq_cst: read by the thieves' loop
  run_threads(thieves + 1, [&](std::size_t id) {
    if (id == 0) {
      // Bursts of growing length (the deque grows while thieves read the
      // old buffer), each followed by popping about half of it back.
      std::size_t next = 0, burst = 1;
      while (next < n) {
        for (std::size_t k = 0; k < burst && next < n; ++k) dq.push(js.at(next++));
        for (std::size_t k = 0; k < burst / 2; ++k) {
          if (job* j = dq.pop()) js.take(j);
        }
        burst = burst >= 4096 ? 1 : burst * 2;
      }
      while (job* j = dq.pop()) js.take(j);
      owner_done.store(true);
    } else {
      for (;;) {
        const bool done = owner_done.load();  // read before the steal: then empty means done
        if (job* j = dq.steal()) js.take(j);
        else if (done && dq.empty()) return;
        else std::this_thread::yield();
      }
    }
  });
  js.require_each_taken_once();
}

TEST_CASE("owner and thieves racing for the last two elements take each exactly once", "[deque][stress]") {
  const std::size_t rounds = scaled(1'000'000);
  const std::size_t thieves = GENERATE(as<std::size_t>{}, 2, oversubscribed_thieves());
  CAPTURE(thieves);
  work_stealing_deque<job*> dq(2);
  jobs js(2 * rounds);
  std::atomic<bool> owner_done{false};  // seq_cst: read by the thieves' loop
  run_threads(thieves + 1, [&](std::size_t id) {
    if (id == 0) {
      // Two elements a round, then pop both: each pop races the thieves
      // (pop's StoreLoad order decides the first, the CAS on top the second).
      for (std::size_t r = 0; r < rounds; ++r) {
        dq.push(js.at(2 * r));
        dq.push(js.at(2 * r + 1));
        if (job* j = dq.pop()) js.take(j);
        if (job* j = dq.pop()) js.take(j);
      }
      owner_done.store(true);
    } else {
      // Spin on steal (the race needs thieves at the top while the owner
      // pops), with a yield now and then for the oversubscribed runs.
      for (unsigned misses = 0; !owner_done.load();) {
        if (job* j = dq.steal()) js.take(j);
        else if (++misses % 64 == 0) std::this_thread::yield();
      }
    }
  });
  REQUIRE(dq.empty());  // both pops of a round find the deque empty or take
  js.require_each_taken_once();
}
