// Command-line options of a runnel::scaling benchmark and their parsing
// (CLI11). Part of the runnel::scaling target, not of the dependency-free
// core: include <runnel/scaling.hpp>.
//
// Every bad argument throws scaling::usage_error with a one-line reason; the
// program prints it with a pointer to --help and exits with status 2.
#pragma once

#include <sched.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#ifdef RUNNEL_SCALING_HAVE_AMQP
#include "../amqp/options.hpp"  // URL parsing only: no broker library
#endif

namespace runnel::scaling {

// Bad command line: the program exits with status 2.
struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// --help: the text to print; the program exits with status 0.
struct help_requested {
  std::string text;
};

inline constexpr std::uint64_t default_messages = 200'000;

struct options {
  std::vector<std::size_t> cores;  // ascending, unique, each >= 1
  std::uint64_t messages = default_messages;  // per run; 0 when `seconds` is set
  double seconds = 0;                         // per run; 0: run `messages`
  bool ordered = false;
  std::size_t batch = 64;
  std::size_t capacity = 1024;
  std::size_t repetitions = 3;
  bool peers = false;
  bool oversubscribe = false;
  std::string json, csv, plot;  // output files; empty: not written
  std::string amqp_url, queue;  // feed the stage from RabbitMQ (needs the bridge)
};

// CPUs this process may run on (its sched_getaffinity mask), so that
// taskset and container CPU sets are honoured.
inline std::size_t allowed_cpus() noexcept {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return static_cast<std::size_t>(n);
  }
  const unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : hc;
}

// 1, 2, 4, ... up to `cpus`, and `cpus` itself when it is not a power of two.
inline std::vector<std::size_t> doubling_cores(std::size_t cpus) {
  std::vector<std::size_t> v;
  for (std::size_t c = 1; c < cpus; c *= 2) v.push_back(c);
  v.push_back(cpus);
  return v;
}

namespace detail {

inline std::size_t parse_count(const std::string& s, const char* what) {
  std::size_t used = 0;
  unsigned long long v = 0;
  try {
    if (s.empty() || s[0] == '-' || s[0] == '+') throw std::invalid_argument(s);
    v = std::stoull(s, &used);
  } catch (const std::exception&) {
    throw usage_error(std::string(what) + ": '" + s + "' is not a whole number");
  }
  if (used != s.size()) throw usage_error(std::string(what) + ": '" + s + "' is not a whole number");
  if (v == 0) throw usage_error(std::string(what) + " must be at least 1");
  return static_cast<std::size_t>(v);
}

// "all" or a comma-separated list of core counts.
inline std::vector<std::size_t> parse_cores(const std::string& s, std::size_t cpus) {
  if (s == "all") return doubling_cores(cpus);
  std::vector<std::size_t> v;
  std::size_t start = 0;
  for (;;) {
    const std::size_t comma = s.find(',', start);
    v.push_back(parse_count(s.substr(start, comma - start), "--cores"));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}

}  // namespace detail

// Parses argv (argv[0] is the program name). `cpus` is the number of CPUs the
// run may use (allowed_cpus() in a real program; tests pass their own).
// Throws usage_error or help_requested.
inline options parse_args(int argc, const char* const* argv, std::size_t cpus,
                          const std::string& description = "") {
  CLI::App app{description.empty() ? "runnel core-count scaling benchmark" : description};
  options o;
  std::string cores = "all", messages, seconds, batch = "64", capacity = "1024", repetitions = "3";
  app.add_option("--cores", cores,
                 "core counts to run: a list such as 1,2,4, or 'all' (1, 2, 4, ... up to the allowed CPUs)");
  auto* m = app.add_option("--messages", messages, "messages per run (default 200000)");
  auto* s = app.add_option("--seconds", seconds, "run each measurement for this long instead of --messages");
  m->excludes(s);
  app.add_flag("--ordered", o.ordered, "keep outputs in input order");
  app.add_option("--batch", batch, "messages a node takes per batch (default 64)");
  app.add_option("--capacity", capacity, "capacity of every queue/channel; oneTBB tokens (default 1024)");
  app.add_option("--repetitions", repetitions, "runs per implementation and core count (default 3)");
  app.add_option("--json", o.json, "write the results as JSON to this file");
  app.add_option("--csv", o.csv, "write the results as CSV to this file");
  app.add_option("--plot", o.plot, "write an SVG chart of speed-up against cores to this file");
  app.add_flag("--peers", o.peers,
               "also run the peers: a single-thread loop, a mutex queue + std::threads, and oneTBB "
               "parallel_pipeline when built with it");
  app.add_flag("--oversubscribe", o.oversubscribe, "allow --cores beyond the CPUs this process may use");
  auto* a = app.add_option("--amqp", o.amqp_url, "feed the stage from this RabbitMQ URL (needs the bridge)");
  auto* q = app.add_option("--queue", o.queue, "the RabbitMQ queue to consume (with --amqp)");
  a->needs(q);
  q->needs(a);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    throw help_requested{app.help()};
  } catch (const CLI::ParseError& e) {
    throw usage_error(e.what());
  }

  o.cores = detail::parse_cores(cores, cpus);
  if (!o.oversubscribe && o.cores.back() > cpus)
    throw usage_error("--cores " + std::to_string(o.cores.back()) + " is more than the " +
                      std::to_string(cpus) + " CPUs this process may use; add --oversubscribe to run anyway");
  if (!seconds.empty()) {
    std::size_t used = 0;
    try {
      o.seconds = std::stod(seconds, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != seconds.size() || !(o.seconds > 0) || o.seconds > 1e6)
      throw usage_error("--seconds: '" + seconds + "' is not a positive number of seconds");
    o.messages = 0;
  } else if (!messages.empty()) {
    o.messages = detail::parse_count(messages, "--messages");
  }
  o.batch = detail::parse_count(batch, "--batch");
  o.capacity = detail::parse_count(capacity, "--capacity");
  o.repetitions = detail::parse_count(repetitions, "--repetitions");
  if (!o.amqp_url.empty()) {
#ifdef RUNNEL_SCALING_HAVE_AMQP
    // The broker is preloaded with exactly the messages of a run.
    if (o.seconds > 0) throw usage_error("--amqp runs a number of --messages, not --seconds");
    if (o.queue.empty()) throw usage_error("--queue: empty queue name");
    try {
      (void)amqp::connection_options::from_url(o.amqp_url);
    } catch (const amqp::error& e) {
      throw usage_error(std::string("--amqp: ") + e.what());
    }
#else
    // Asking for a broker without the bridge is refused rather than silently
    // using the in-process generator.
    throw usage_error("--amqp: this program was not built with the RabbitMQ bridge (link runnel::scaling_amqp "
                      "instead of runnel::scaling); drop --amqp and --queue to use the in-process generator");
#endif
  }
  return o;
}

}  // namespace runnel::scaling
