// The compile-time comparison program (runnel side): a small log service.
// Lines arrive on a channel from a reader thread, are parsed in parallel,
// filtered, and counted by a sink; a task_group sums a table at the end.
// compile_time.sh compiles this and log_tbb.cpp (the same program on
// oneTBB) and prints the ratio. Runs in a second when executed.
#include <runnel/runnel.hpp>

#include <cstdio>
#include <optional>
#include <string>
#include <thread>

struct Parsed {
  int level = 0;
  std::string text;
};

static std::optional<Parsed> parse(const std::string& line) {
  if (line.size() < 2 || line[1] != ' ') return std::nullopt;
  return Parsed{line[0] - '0', line.substr(2)};
}

int main() {
  runnel::thread_pool pool;
  auto [tx, rx] = runnel::make_channel<std::string>(1024);
  std::thread reader([tx = std::move(tx)]() mutable {
    for (int i = 0; i < 100000; ++i)
      if (!tx.send(std::to_string(i % 5) + " message " + std::to_string(i))) return;
  });
  long counts[5] = {};
  auto run = runnel::pipeline{pool}
                 .on_error([](const runnel::stage_failure& f) {
                   std::fprintf(stderr, "%s failed\n", std::string(f.stage_name).c_str());
                 })
                 .from(std::move(rx))
                 .stage([](const std::string& line) { return parse(line); }, {.workers = 2})
                 .stage([](Parsed p) -> std::optional<Parsed> {
                   if (p.level == 0) return std::nullopt;
                   return p;
                 })
                 .sink([&](const Parsed& p) { ++counts[p.level]; })
                 .run();
  reader.join();
  run.wait();
  long total = 0;
  {
    runnel::task_group g{pool};
    long part[2] = {};
    g.run([&] { part[0] = counts[1] + counts[2]; });
    g.run([&] { part[1] = counts[3] + counts[4]; });
    g.wait();
    total = part[0] + part[1];
  }
  std::printf("%ld\n", total);
  return total == 80000 ? 0 : 1;
}
