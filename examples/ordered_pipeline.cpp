// ordered_pipeline: read records, transform them in parallel, write the
// results in the original order.
//
// The source parses "records" (here: generated lines), a parallel ordered
// stage does the expensive part on every pool worker, a filter drops what
// is not wanted, and the sink writes results one at a time in input order.
#include <runnel/pipeline.hpp>
#include <runnel/thread_pool.hpp>

#include <cstdio>
#include <optional>
#include <stdexcept>
#include <string>

struct record {
  int id;
  std::string text;
};

int main() {
  runnel::thread_pool pool;
  const int total = 2000;
  int next_id = 0;

  auto run =
      runnel::pipeline{pool}
          // Errors thrown by a stage arrive here, with the message; the run goes on.
          .on_error([](const runnel::stage_failure& f) {
            const record* r = f.message<record>();
            std::fprintf(stderr, "%.*s failed on record %d\n", static_cast<int>(f.stage_name.size()),
                         f.stage_name.data(), r ? r->id : -1);
          })
          // Source: called serially, never while its output channel is full.
          .source([&]() -> std::optional<record> {
            if (next_id == total) return std::nullopt;  // end of input
            const int id = next_id++;
            return record{id, "line " + std::to_string(id)};
          }, {.capacity = 256})
          // Parallel and ordered: results leave in the order records came in.
          .stage([](const record& r) {
            if (r.id == 1234) throw std::runtime_error("bad record");
            unsigned h = 0;
            for (char c : r.text) h = h * 31 + static_cast<unsigned char>(c);
            return record{r.id, r.text + " -> " + std::to_string(h % 1000)};
          }, {.workers = pool.size(), .ordered = true, .name = "hash"})
          // Returning an empty optional filters a message out.
          .stage([](record r) -> std::optional<record> {
            if (r.id % 100 != 0) return std::nullopt;
            return r;
          })
          // Sink: serial, in order.
          .sink([](const record& r) { std::printf("%s\n", r.text.c_str()); })
          .run();

  run.wait();
  const auto s = run.stats();
  std::printf("produced %llu, delivered %llu, filtered %llu, failed %llu\n",
              static_cast<unsigned long long>(s.produced), static_cast<unsigned long long>(s.delivered),
              static_cast<unsigned long long>(s.filtered), static_cast<unsigned long long>(s.failed));
  return 0;
}
