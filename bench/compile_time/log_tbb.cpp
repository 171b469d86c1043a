// The compile-time comparison program (oneTBB side): the same log service as
// log_runnel.cpp, with tbb::concurrent_bounded_queue, tbb::parallel_pipeline
// and tbb::task_group.
#include <tbb/concurrent_queue.h>
#include <tbb/parallel_pipeline.h>
#include <tbb/task_group.h>

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
  tbb::concurrent_bounded_queue<std::optional<std::string>> q;
  q.set_capacity(1024);
  std::thread reader([&q] {
    for (int i = 0; i < 100000; ++i) q.push(std::to_string(i % 5) + " message " + std::to_string(i));
    q.push(std::nullopt);
  });
  long counts[5] = {};
  tbb::parallel_pipeline(
      16,
      tbb::make_filter<void, std::string>(tbb::filter_mode::serial_in_order,
                                          [&](tbb::flow_control& fc) -> std::string {
                                            std::optional<std::string> line;
                                            q.pop(line);
                                            if (!line) {
                                              fc.stop();
                                              return {};
                                            }
                                            return *line;
                                          }) &
          tbb::make_filter<std::string, std::optional<Parsed>>(
              tbb::filter_mode::parallel, [](const std::string& line) { return parse(line); }) &
          tbb::make_filter<std::optional<Parsed>, std::optional<Parsed>>(
              tbb::filter_mode::serial_in_order,
              [](std::optional<Parsed> p) -> std::optional<Parsed> {
                if (!p || p->level == 0) return std::nullopt;
                return p;
              }) &
          tbb::make_filter<std::optional<Parsed>, void>(tbb::filter_mode::serial_in_order,
                                                        [&](const std::optional<Parsed>& p) {
                                                          if (p) ++counts[p->level];
                                                        }));
  reader.join();
  long total = 0;
  {
    tbb::task_group g;
    long part[2] = {};
    g.run([&] { part[0] = counts[1] + counts[2]; });
    g.run([&] { part[1] = counts[3] + counts[4]; });
    g.wait();
    total = part[0] + part[1];
  }
  std::printf("%ld\n", total);
  return total == 80000 ? 0 : 1;
}
