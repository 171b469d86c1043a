// Ring throughput across thread counts: runnel::mpmc_queue and
// runnel::spsc_queue against Boost.Lockfree, a mutex + condition-variable
// ring, and (when installed) moodycamel::ConcurrentQueue and atomic_queue.
//
// Each benchmark moves a fixed number of items from P producer threads to C
// consumer threads through a queue of capacity 1024 and reports items/s.
// "1T" is one thread alternating push and pop (the uncontended cost).
// On a machine with fewer cores than P + C the run is oversubscribed: that is
// where designs that spin on a preempted thread collapse.
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <boost/lockfree/queue.hpp>
#include <boost/lockfree/spsc_queue.hpp>
#include <runnel/mpmc_queue.hpp>
#include <runnel/spsc_queue.hpp>

#if RUNNEL_HAVE_MOODYCAMEL
#include <concurrentqueue/concurrentqueue.h>
#endif
#if RUNNEL_HAVE_ATOMIC_QUEUE
#include <atomic_queue/atomic_queue.h>
#endif

#include "bench_support.hpp"

namespace {

constexpr std::size_t capacity = 1024;

struct payload64 {
  std::uint64_t seq;
  std::uint64_t pad[7];
};
static_assert(sizeof(payload64) == 64);

template <class T>
T make(std::uint64_t i) {
  if constexpr (std::is_same_v<T, payload64>) {
    return payload64{i, {i, i, i, i, i, i, i}};
  } else {
    return i;
  }
}

template <class T>
std::uint64_t seq_of(const T& v) {
  if constexpr (std::is_same_v<T, payload64>) {
    return v.seq;
  } else {
    return v;
  }
}

// How a user drives a try-only queue: spin with pause, and yield now and
// then so an oversubscribed machine still makes progress. Every try-form
// adapter below uses this same loop.
template <class Try>
void retry(Try&& attempt) {
  for (unsigned spins = 0; !attempt(); ++spins) {
    if ((spins & 63) == 63) {
      std::this_thread::yield();
    } else {
      runnel::detail::cpu_relax();
    }
  }
}

// ---- adapters: push(T) and pop() -> T ------------------------------------

template <class T>
struct runnel_mpmc {  // blocking forms: spin, then park
  runnel::mpmc_queue<T> q{capacity};
  void push(T v) { q.push(std::move(v)); }
  T pop() { return q.pop(); }
};

template <class T>
struct runnel_mpmc_try {  // try forms in the user's retry loop
  runnel::mpmc_queue<T> q{capacity};
  void push(T v) { retry([&] { return q.try_push(std::move(v)); }); }
  T pop() {
    T v;
    retry([&] { return q.try_pop(v); });
    return v;
  }
};

template <class T>
struct runnel_spsc {
  runnel::spsc_queue<T> q{capacity};
  void push(T v) { q.push(std::move(v)); }
  T pop() { return q.pop(); }
};

template <class T>
struct boost_lockfree {
  boost::lockfree::queue<T, boost::lockfree::fixed_sized<true>> q{capacity};
  void push(T v) { retry([&] { return q.bounded_push(v); }); }
  T pop() {
    T v;
    retry([&] { return q.pop(v); });
    return v;
  }
};

template <class T>
struct boost_spsc {
  boost::lockfree::spsc_queue<T, boost::lockfree::capacity<capacity>> q;
  void push(T v) { retry([&] { return q.push(v); }); }
  T pop() {
    T v;
    retry([&] { return q.pop(v); });
    return v;
  }
};

// The hand-written baseline: a ring guarded by one mutex, two condition
// variables for full and empty.
template <class T>
struct mutex_cv {
  std::mutex m;
  std::condition_variable not_full, not_empty;
  std::vector<std::optional<T>> ring = std::vector<std::optional<T>>(capacity);
  std::size_t head = 0, count = 0;
  void push(T v) {
    std::unique_lock lk(m);
    not_full.wait(lk, [&] { return count < capacity; });
    ring[(head + count) % capacity] = std::move(v);
    ++count;
    lk.unlock();
    not_empty.notify_one();
  }
  T pop() {
    std::unique_lock lk(m);
    not_empty.wait(lk, [&] { return count > 0; });
    T v = std::move(*ring[head]);
    head = (head + 1) % capacity;
    --count;
    lk.unlock();
    not_full.notify_one();
    return v;
  }
};

#if RUNNEL_HAVE_MOODYCAMEL
template <class T>
struct moodycamel_cq {
  // try_enqueue never allocates: the queue is bounded by what the
  // constructor pre-allocated.
  moodycamel::ConcurrentQueue<T> q{capacity};
  void push(T v) { retry([&] { return q.try_enqueue(v); }); }
  T pop() {
    T v;
    retry([&] { return q.try_dequeue(v); });
    return v;
  }
};
#endif

#if RUNNEL_HAVE_ATOMIC_QUEUE
template <class T>
struct atomic_queue_try {
  atomic_queue::AtomicQueue2<T, capacity> q;
  void push(T v) { retry([&] { return q.try_push(v); }); }
  T pop() {
    T v;
    retry([&] { return q.try_pop(v); });
    return v;
  }
};

template <class T>
struct atomic_queue_spin {  // its own push/pop, which spin on the slot
  atomic_queue::AtomicQueue2<T, capacity> q;
  void push(T v) { q.push(v); }
  T pop() { return q.pop(); }
};
#endif

// ---- the measurement ------------------------------------------------------

std::uint64_t total_items(int threads) {
  if (runnel_bench::smoke) return 20'000;
  // Fewer items when oversubscribed: the slow peers would otherwise take
  // minutes. Items/s stays comparable.
  return threads > static_cast<int>(std::thread::hardware_concurrency()) ? 1'000'000 : 4'000'000;
}

template <class Q, class T>
void one_thread(benchmark::State& state) {
  const std::uint64_t n = total_items(1);
  for (auto _ : state) {
    auto q = std::make_unique<Q>();
    std::uint64_t sum = 0;
    for (std::uint64_t i = 0; i < n; ++i) {
      q->push(make<T>(i));
      sum += seq_of(q->pop());
    }
    benchmark::DoNotOptimize(sum);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * n));
}

template <class Q, class T>
void producers_consumers(benchmark::State& state, int producers, int consumers) {
  const std::uint64_t n = total_items(producers + consumers);
  const std::uint64_t per_producer = n / static_cast<std::uint64_t>(producers);
  const std::uint64_t items = per_producer * static_cast<std::uint64_t>(producers);
  for (auto _ : state) {
    auto q = std::make_unique<Q>();
    std::atomic<std::uint64_t> checksum{0};
    std::vector<std::thread> threads;
    threads.reserve(static_cast<std::size_t>(producers + consumers));
    for (int c = 0; c < consumers; ++c) {
      // Consumers split the items; the first takes the remainder.
      const std::uint64_t share = items / static_cast<std::uint64_t>(consumers) +
                                  (c == 0 ? items % static_cast<std::uint64_t>(consumers) : 0);
      threads.emplace_back([&, share] {
        std::uint64_t sum = 0;
        for (std::uint64_t i = 0; i < share; ++i) sum += seq_of(q->pop());
        // Relaxed: summed once per thread and read after join().
        checksum.fetch_add(sum, std::memory_order_relaxed);
      });
    }
    for (int p = 0; p < producers; ++p) {
      threads.emplace_back([&] {
        for (std::uint64_t i = 0; i < per_producer; ++i) q->push(make<T>(i));
      });
    }
    for (auto& t : threads) t.join();
    const std::uint64_t expected = static_cast<std::uint64_t>(producers) * per_producer * (per_producer - 1) / 2;
    if (checksum.load() != expected) state.SkipWithError("checksum mismatch: items lost or duplicated");
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * items));
}

template <template <class> class Q, class T>
void register_queue(const std::string& family, const std::string& type, const std::string& impl,
                    const std::vector<std::pair<int, int>>& shapes) {
  auto reg = [&](const std::string& shape, auto fn) {
    auto* b = benchmark::RegisterBenchmark((family + "/" + type + "/" + shape + ":" + impl).c_str(), fn);
    b->UseRealTime()->Unit(benchmark::kMillisecond);
    if (runnel_bench::smoke) b->Iterations(1);
  };
  reg("1T", [](benchmark::State& s) { one_thread<Q<T>, T>(s); });
  for (auto [p, c] : shapes) {
    reg(std::to_string(p) + "P" + std::to_string(c) + "C",
        [p = p, c = c](benchmark::State& s) { producers_consumers<Q<T>, T>(s, p, c); });
  }
}

template <class T>
void register_type(const std::string& type) {
  const std::vector<std::pair<int, int>> mpmc_shapes = {{1, 1}, {2, 2}, {4, 4}, {1, 3}, {3, 1}};
  register_queue<runnel_mpmc, T>("mpmc", type, "runnel", mpmc_shapes);
  register_queue<runnel_mpmc_try, T>("mpmc", type, "runnel_try", mpmc_shapes);
  register_queue<boost_lockfree, T>("mpmc", type, "boost_lockfree", mpmc_shapes);
  register_queue<mutex_cv, T>("mpmc", type, "mutex_cv", mpmc_shapes);
#if RUNNEL_HAVE_MOODYCAMEL
  register_queue<moodycamel_cq, T>("mpmc", type, "moodycamel", mpmc_shapes);
#endif
#if RUNNEL_HAVE_ATOMIC_QUEUE
  register_queue<atomic_queue_try, T>("mpmc", type, "atomic_queue_try", mpmc_shapes);
  register_queue<atomic_queue_spin, T>("mpmc", type, "atomic_queue_spin", mpmc_shapes);
#endif
  const std::vector<std::pair<int, int>> spsc_shapes = {{1, 1}};
  register_queue<runnel_spsc, T>("spsc", type, "runnel", spsc_shapes);
  register_queue<boost_spsc, T>("spsc", type, "boost_spsc", spsc_shapes);
}

}  // namespace

int main(int argc, char** argv) {
  return runnel_bench::run_main(argc, argv, [] {
    register_type<std::uint64_t>("u64");
    register_type<payload64>("64B");
  });
}
