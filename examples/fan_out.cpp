// fan_out: a worker pool drains one channel with several concurrent calls.
//
// Threads outside the pool send jobs into a channel; runnel::consume runs
// the handler on up to four pool workers at once. The handler never blocks
// on the channel: it runs as a pool task that is woken when jobs arrive.
#include <runnel/channel.hpp>
#include <runnel/pipeline.hpp>
#include <runnel/thread_pool.hpp>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <thread>
#include <vector>

int main() {
  runnel::thread_pool pool;  // one worker per CPU the process may use
  auto [jobs, inbox] = runnel::make_channel<std::uint64_t>(256);

  std::atomic<std::uint64_t> done{0}, checksum{0};
  // Up to 4 concurrent invocations; the function must be thread-safe.
  auto workers = runnel::consume(pool, std::move(inbox), [&](std::uint64_t job) {
    std::uint64_t h = job;
    for (int i = 0; i < 1000; ++i) h = h * 6364136223846793005ull + 1;  // "work"
    checksum += h & 0xff;
    ++done;
  }, 4);

  // Three producers outside the pool; each holds a copy of the sender.
  std::vector<std::thread> producers;
  for (std::uint64_t p = 0; p < 3; ++p) {
    producers.emplace_back([tx = jobs, p]() mutable {
      for (std::uint64_t i = 0; i < 10000; ++i)
        if (!tx.send(p * 10000 + i)) return;  // fails only once the channel is closed
    });
  }
  jobs.reset();  // only the producers' copies remain: the last one closes
  for (auto& t : producers) t.join();

  workers.wait();  // every job is handled once the channel is closed
  std::printf("handled %llu jobs, checksum %llu\n",
              static_cast<unsigned long long>(done.load()),
              static_cast<unsigned long long>(checksum.load()));
  return done.load() == 30000 ? 0 : 1;
}
