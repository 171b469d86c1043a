// Long randomized stress run for runnel::mpmc_queue and runnel::spsc_queue.
//
//   ring_stress [seconds=60] [seed=random]
//
// Repeats rounds until the time is up. Each round picks a ring (MPMC with 1-8
// producers and 1-8 consumers, or SPSC), a capacity from 1 to 1024 and a
// message count; every thread picks an operation form at random for every
// step (try_push, push, emplace, try_push_n / try_pop(T&), try_pop(), pop,
// try_pop_n). A round checks that every (producer, sequence) pair arrived
// exactly once and that each consumer saw each producer's values in order.
// The first failure prints the round's settings and the seed, and exits 1.
// A round that makes no progress for 120 s is reported as a hang (a lost
// wake-up) and aborts the program.
#include <runnel/mpmc_queue.hpp>
#include <runnel/spsc_queue.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

// One pop in a randomly chosen form (try into a reference, try into an
// optional, blocking, bulk), handing every value taken to `take`; yields
// when a non-blocking form found the queue empty. Shared by both round kinds.
template <class Queue, class Rng, class Take>
void pop_random_form(Queue& q, Rng& rng, std::uint64_t (&batch)[32], Take& take) {
  switch (rng() % 4) {
    case 0: {
      std::uint64_t v;
      if (q.try_pop(v)) take(v);
      else std::this_thread::yield();
      break;
    }
    case 1:
      if (auto o = q.try_pop()) take(*o);
      else std::this_thread::yield();
      break;
    case 2: take(q.pop()); break;
    default: {
      const std::size_t k = q.try_pop_n(batch, 1 + rng() % 32);
      for (std::size_t i = 0; i < k; ++i) take(batch[i]);
      if (k == 0) std::this_thread::yield();
    }
  }
}

constexpr std::uint64_t stop_msg = ~std::uint64_t{0};

// Bumped by consumers; the watchdog reports a hang when it stops moving.
std::atomic<std::uint64_t> progress{0};
std::atomic<bool> finished{false};

struct mpmc_round {
  std::size_t producers, consumers, capacity;
  std::uint64_t per_producer;
};

// Returns an empty string on success, else what went wrong.
std::string run_mpmc(const mpmc_round& r, std::uint64_t seed) {
  runnel::mpmc_queue<std::uint64_t> q(r.capacity);
  std::vector<std::atomic<std::uint8_t>> seen(r.producers * r.per_producer);
  std::atomic<std::uint64_t> order_errors{0}, bad{0}, stops{0};
  std::atomic<std::size_t> producers_left{r.producers};
  std::vector<std::thread> threads;

  for (std::size_t p = 0; p < r.producers; ++p) {
    threads.emplace_back([&, p] {
      std::minstd_rand rng(static_cast<std::uint32_t>(seed + p));
      std::uint64_t batch[32];
      std::uint64_t s = 0;
      while (s < r.per_producer) {
        const std::uint64_t m = (std::uint64_t{p} << 32) | s;
        switch (rng() % 4) {
          case 0: {
            std::uint64_t v = m;
            while (!q.try_push(std::move(v))) std::this_thread::yield();
            ++s;
            break;
          }
          case 1: q.push(std::uint64_t{m}); ++s; break;
          case 2: q.emplace(m); ++s; break;
          default: {
            const std::size_t n = std::min<std::uint64_t>(1 + rng() % 32, r.per_producer - s);
            for (std::size_t i = 0; i < n; ++i) batch[i] = m + i;
            std::size_t done = 0;
            while (done < n) {
              const std::size_t k = q.try_push_n(batch + done, n - done);
              if (k == 0) std::this_thread::yield();
              done += k;
            }
            s += n;
          }
        }
      }
      if (producers_left.fetch_sub(1) == 1)
        for (std::size_t i = 0; i < r.consumers; ++i) q.push(std::uint64_t{stop_msg});
    });
  }
  for (std::size_t c = 0; c < r.consumers; ++c) {
    threads.emplace_back([&, c] {
      std::minstd_rand rng(static_cast<std::uint32_t>(seed + 1000 + c));
      std::vector<std::int64_t> last(r.producers, -1);
      std::uint64_t batch[32];
      bool stopped = false;
      const auto take = [&](std::uint64_t m) {
        if (m == stop_msg) {
          // A bulk pop may pick up several stop signals; keep one and hand
          // the others back so every consumer gets exactly one.
          if (stopped) q.push(std::uint64_t{stop_msg});
          stopped = true;
          return;
        }
        const std::uint64_t p = m >> 32, s = m & 0xffff'ffffu;
        if (p >= r.producers || s >= r.per_producer) {
          ++bad;
          return;
        }
        if (static_cast<std::int64_t>(s) <= last[p]) ++order_errors;
        last[p] = static_cast<std::int64_t>(s);
        // Relaxed: counters read after the joins.
        seen[p * r.per_producer + s].fetch_add(1, std::memory_order_relaxed);
        progress.fetch_add(1, std::memory_order_relaxed);
      };
      while (!stopped) {
        pop_random_form(q, rng, batch, take);
      }
      ++stops;
    });
  }
  for (auto& t : threads) t.join();

  std::uint64_t missing = 0, dup = 0;
  for (auto& s : seen) {
    if (s == 0) ++missing;
    if (s > 1) ++dup;
  }
  std::string err;
  if (missing || dup || order_errors || bad || stops != r.consumers || !q.empty_approx()) {
    err = "missing " + std::to_string(missing) + ", duplicated " + std::to_string(dup) +
          ", order errors " + std::to_string(order_errors.load()) + ", bad " + std::to_string(bad.load()) +
          ", stops " + std::to_string(stops.load()) + ", left " + std::to_string(q.size_approx());
  }
  return err;
}

std::string run_spsc(std::size_t capacity, std::uint64_t n, std::uint64_t seed) {
  runnel::spsc_queue<std::uint64_t> q(capacity);
  std::uint64_t received = 0, wrong = 0;
  std::thread producer([&] {
    std::minstd_rand rng(static_cast<std::uint32_t>(seed));
    std::uint64_t batch[32];
    std::uint64_t s = 0;
    while (s < n) {
      switch (rng() % 4) {
        case 0: {
          std::uint64_t v = s;
          while (!q.try_push(std::move(v))) std::this_thread::yield();
          ++s;
          break;
        }
        case 1: q.push(std::uint64_t{s}); ++s; break;
        case 2:
          while (!q.try_emplace(s)) std::this_thread::yield();
          ++s;
          break;
        default: {
          const std::size_t k = std::min<std::uint64_t>(1 + rng() % 32, n - s);
          for (std::size_t i = 0; i < k; ++i) batch[i] = s + i;
          std::size_t done = 0;
          while (done < k) {
            const std::size_t d = q.try_push_n(batch + done, k - done);
            if (d == 0) std::this_thread::yield();
            done += d;
          }
          s += k;
        }
      }
    }
  });
  std::thread consumer([&] {
    std::minstd_rand rng(static_cast<std::uint32_t>(seed + 1));
    std::uint64_t batch[32];
    const auto take = [&](std::uint64_t v) {
      if (v != received) ++wrong;
      ++received;
      progress.fetch_add(1, std::memory_order_relaxed);  // Relaxed: a liveness hint.
    };
    while (received < n) {
      pop_random_form(q, rng, batch, take);
    }
  });
  producer.join();
  consumer.join();
  if (received != n || wrong != 0 || !q.empty_approx())
    return "received " + std::to_string(received) + " of " + std::to_string(n) + ", out of order " +
           std::to_string(wrong);
  return {};
}

}  // namespace

int main(int argc, char** argv) {
  const double seconds = argc > 1 ? std::atof(argv[1]) : 60.0;
  const std::uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : std::random_device{}();
  std::printf("ring_stress: %.0f s, seed %llu\n", seconds, static_cast<unsigned long long>(seed));
  std::fflush(stdout);

  std::thread watchdog([] {
    std::uint64_t last = ~std::uint64_t{0};
    auto since = std::chrono::steady_clock::now();
    while (!finished.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      const std::uint64_t now = progress.load();
      if (now != last) {
        last = now;
        since = std::chrono::steady_clock::now();
      } else if (std::chrono::steady_clock::now() - since > std::chrono::seconds(120)) {
        std::fprintf(stderr, "ring_stress: no progress for 120 s (lost wake-up?)\n");
        std::abort();
      }
    }
  });

  std::mt19937_64 rng(seed);
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  std::uint64_t rounds = 0, messages = 0;
  int status = 0;
  while (std::chrono::steady_clock::now() < end) {
    const std::uint64_t round_seed = rng();
    const std::size_t capacity = std::size_t{1} << (rng() % 11);  // 1 .. 1024
    std::string err, what;
    if (rng() % 4 == 0) {
      const std::uint64_t n = 1 + rng() % 500'000;
      what = "spsc capacity " + std::to_string(capacity) + ", " + std::to_string(n) + " values";
      err = run_spsc(capacity, n, round_seed);
      messages += n;
    } else {
      const mpmc_round r{1 + rng() % 8, 1 + rng() % 8, capacity, 1 + rng() % 100'000};
      what = "mpmc " + std::to_string(r.producers) + "x" + std::to_string(r.consumers) + " capacity " +
             std::to_string(r.capacity) + ", " + std::to_string(r.per_producer) + " per producer";
      err = run_mpmc(r, round_seed);
      messages += r.per_producer * r.producers;
    }
    ++rounds;
    if (!err.empty()) {
      std::fprintf(stderr, "FAILED round %llu (%s, round seed %llu): %s\n", static_cast<unsigned long long>(rounds),
                   what.c_str(), static_cast<unsigned long long>(round_seed), err.c_str());
      status = 1;
      break;
    }
  }
  finished = true;
  watchdog.join();
  std::printf("ring_stress: %llu rounds, %llu messages, %s\n", static_cast<unsigned long long>(rounds),
              static_cast<unsigned long long>(messages), status == 0 ? "all passed" : "FAILED");
  return status;
}
