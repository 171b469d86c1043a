// runnel::scaling: a core-count benchmark for your own stage. You write a
// message generator, a stage and (optionally) a consumer; this header gives
// the command-line program that runs them through a runnel::pipeline on 1, 2,
// 4, ... cores, beside the obvious alternatives, and reports how the
// throughput scales.
//
//   #include <runnel/scaling.hpp>
//   struct record { std::uint64_t id; std::string text; };
//   int main(int argc, char** argv) {
//     return runnel::scaling::run_main(argc, argv, "my stage",
//         [](std::uint64_t seq) { return record{seq, make_text(seq)}; },  // generate, serial
//         [](const record& r) { return expensive(r); },                   // process, concurrent
//         [sum = 0ull](std::uint64_t h) mutable { sum += h; });           // consume, serial
//   }
//
// CMake: target_link_libraries(my_bench PRIVATE runnel::scaling). The target
// needs CLI11 and nlohmann_json (Debian: libcli11-dev, nlohmann-json3-dev) and
// uses oneTBB as a peer when found; the core target runnel::runnel does not
// depend on any of them, and runnel.hpp does not include this header.
// runnel::scaling_amqp (when librabbitmq is found) adds --amqp URL --queue Q:
// runnel's stage fed from RabbitMQ through the bridge (scaling/amqp_feed.hpp).
//
// For each core count and implementation the program runs the whole stream
// --repetitions times (repetitions interleaved across implementations, so a
// slow phase of a shared machine hits all of them) and reports messages/s
// (median, min, max), speed-up over 1 core, speed-up over the single-thread
// loop, parallel efficiency, latency percentiles from generation to
// consumption, and process CPU time. The shape measured for runnel:
//   source(generate) -> stage(process, workers = cores) -> sink(consume)
// on a thread_pool of `cores` pinned workers. Run `--help` for the flags;
// bad arguments print a reason and exit with status 2, a failed run (an
// exception from a user function, a lost message) exits with status 1.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "pipeline.hpp"
#include "scaling/options.hpp"
#include "scaling/peers.hpp"
#include "scaling/report.hpp"
#include "scaling/svg_chart.hpp"
#include "thread_pool.hpp"

#ifdef RUNNEL_SCALING_HAVE_AMQP
#include "scaling/amqp_feed.hpp"
#endif

namespace runnel::scaling {

template <class J>
run_sample run_runnel(const options& o, std::size_t cores, const J& j) {
  using M = typename J::message;
  using R = typename J::result;
  auto generate = j.generate;
  auto consume = j.consume;
  runnel::thread_pool pool({.threads = cores, .pin = true, .name_prefix = "scaling"});
  detail::budget b(o);
  run_sample s;
  std::uint64_t next = 0, delivered = 0;
  const detail::stopwatch clock;
  auto run = runnel::pipeline{pool}
                 .source(
                     [&]() -> std::optional<detail::item<M>> {
                       if (b.done(next)) return std::nullopt;
                       const std::uint64_t seq = next++;
                       M m = generate(seq);
                       return detail::item<M>{seq, detail::now_ns(), std::move(m)};
                     },
                     {.capacity = o.capacity, .batch = o.batch, .name = "generate"})
                 .stage(
                     [&j](detail::item<M>& it) {
                       return detail::item<R>{it.seq, it.t0, j.process(it.value)};
                     },
                     {.workers = cores, .ordered = o.ordered, .capacity = o.capacity, .batch = o.batch,
                      .name = "process"})
                 .sink(
                     [&](detail::item<R>& it) {
                       consume(it.value);
                       s.latency.record(static_cast<std::uint64_t>(detail::now_ns() - it.t0));
                       ++delivered;
                     },
                     {.batch = o.batch, .name = "consume"})
                 .run();
  run.wait();
  clock.stop(s);
  detail::check_count("runnel", next, delivered);
  s.messages = delivered;
  return s;
}

// Implementations run on `cores` (the loop only on 1), in table order.
inline std::vector<std::string> implementations(const options& o, std::size_t cores) {
  std::vector<std::string> v;
  if (o.peers && cores == 1) v.emplace_back(loop_name);
  // With --amqp, runnel is fed from the broker; the peers stay in-process.
  v.emplace_back(o.amqp_url.empty() ? "runnel" : "runnel+amqp");
  if (o.peers) {
    v.emplace_back("mutex+threads");
    if (have_tbb) v.emplace_back("tbb");
  }
  return v;
}

template <class J>
run_sample run_one(const std::string& impl, const options& o, std::size_t cores, const J& j) {
  if (impl == loop_name) return run_loop(o, j);
  if (impl == "mutex+threads") return run_mutex_threads(o, cores, j);
#ifdef RUNNEL_SCALING_HAVE_TBB
  if (impl == "tbb") return run_tbb(o, cores, j);
#endif
#ifdef RUNNEL_SCALING_HAVE_AMQP
  if (impl == amqp_name) return run_runnel_amqp(o, cores, j);
#endif
  return run_runnel(o, cores, j);
}

// Runs every implementation on every core count, o.repetitions times.
// progress(line) is called before each run (empty line: finished).
template <class J, class Progress>
report run(const std::string& title, const options& o, std::size_t cpus, const J& j, Progress progress) {
  report rep{title, o, cpus, {}};
  for (std::size_t c : o.cores)
    for (const auto& impl : implementations(o, c)) {
      result_row r;
      r.implementation = impl;
      r.cores = c;
      rep.rows.push_back(std::move(r));
    }
  std::size_t done = 0;
  const std::size_t total = rep.rows.size() * o.repetitions;
  for (std::size_t rp = 0; rp < o.repetitions; ++rp)
    for (auto& r : rep.rows) {
      progress("[" + std::to_string(++done) + "/" + std::to_string(total) + "] " + r.implementation + " on " +
               std::to_string(r.cores) + (r.cores == 1 ? " core" : " cores") + ", repetition " +
               std::to_string(rp + 1) + "/" + std::to_string(o.repetitions));
      run_sample s = run_one(r.implementation, o, r.cores, j);
      r.rates.push_back(s.rate());
      r.cpu_seconds.push_back(s.cpu_seconds);
      r.counts.push_back(s.messages);
      r.latency.merge(s.latency);
    }
  progress("");
  summarise(rep);
  return rep;
}

namespace detail {

// On stderr, only when it is a terminal: one line, rewritten in place.
inline void terminal_progress(const std::string& line) {
  static const bool tty = isatty(STDERR_FILENO) == 1;
  if (!tty) return;
  static std::size_t last = 0;
  std::cerr << '\r' << line;
  if (line.size() < last) std::cerr << std::string(last - line.size(), ' ') << '\r' << line;
  std::cerr << std::flush;
  last = line.size();
}

template <class Write>
bool write_file(const std::string& path, const char* what, Write write) {
  if (path.empty()) return true;
  std::ofstream f(path);
  if (f) write(f);
  f.close();
  if (!f) {
    std::cerr << "error: could not write the " << what << " to " << path << '\n';
    return false;
  }
  std::cout << what << ": " << path << '\n';
  return true;
}

}  // namespace detail

// The whole program: parses argv, runs, prints the table, writes the files.
// Returns the exit status (0 ok, 1 failed run or unwritable file, 2 usage).
template <class Gen, class Stage, class Sink = discard>
int run_main(int argc, const char* const* argv, const std::string& title, Gen generate, Stage process,
             Sink consume = {}) {
  const std::size_t cpus = allowed_cpus();
  options o;
  try {
    o = parse_args(argc, argv, cpus, title + " -- runnel core-count scaling benchmark");
  } catch (const help_requested& h) {
    std::cout << h.text;
    return 0;
  } catch (const usage_error& e) {
    std::cerr << (argc > 0 ? argv[0] : "scaling") << ": " << e.what() << "\nRun with --help for the options.\n";
    return 2;
  }
  const job<Gen, Stage, Sink> j{std::move(generate), std::move(process), std::move(consume)};
  report rep;
  try {
    rep = run(title, o, cpus, j, detail::terminal_progress);
  } catch (const usage_error& e) {
    detail::terminal_progress("");
    std::cerr << (argc > 0 ? argv[0] : "scaling") << ": " << e.what() << '\n';
    return 2;
  } catch (const std::exception& e) {
    detail::terminal_progress("");
    std::cerr << "error: " << e.what() << '\n';
    return 1;
  }
  write_table(rep, std::cout);
  bool ok = detail::write_file(o.json, "JSON", [&](std::ostream& f) { write_json(rep, f); });
  ok = detail::write_file(o.csv, "CSV", [&](std::ostream& f) { write_csv(rep, f); }) && ok;
  ok = detail::write_file(o.plot, "chart", [&](std::ostream& f) { write_svg(rep, f); }) && ok;
  return ok ? 0 : 1;
}

template <class Gen, class Stage, class Sink = discard>
int run_main(int argc, char** argv, const std::string& title, Gen generate, Stage process, Sink consume = {}) {
  return run_main(argc, const_cast<const char* const*>(argv), title, std::move(generate), std::move(process),
                  std::move(consume));
}

}  // namespace runnel::scaling
