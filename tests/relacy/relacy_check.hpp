// Running one Relacy model and comparing its result with the expected one;
// shared by the relacy_*_test programs.
//
// Usage of each program: <program> [-v] [name-part]
//   -v         prints Relacy's per-model statistics
//   name-part  runs only the models whose name contains it
// RUNNEL_RELACY_BOUND=n in the environment deepens the context-bound
// searches (CI uses 1 or 2; 3 takes minutes).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>

#include "relacy_atomics.hpp"

namespace runnel_model {

struct check_options {
  bool verbose = false;
  const char* only = nullptr;  // run only the models whose name contains this

  check_options(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
      if (std::strcmp(argv[i], "-v") == 0) verbose = true;
      else only = argv[i];
    }
  }
};

// Runs one model; `expect` is the result the checker must report. Prints the
// number of interleavings explored (Relacy's iterations).
template <class Test>
bool check(const check_options& o, const char* name, rl::scheduler_type_e search, rl::test_result_e expect,
           unsigned context_bound = 1, rl::iteration_t iterations = 0) {
  if (o.only != nullptr && std::strstr(name, o.only) == nullptr) return true;
  if (const char* b = std::getenv("RUNNEL_RELACY_BOUND"); b != nullptr && search == rl::fair_context_bound_scheduler_type)
    context_bound = static_cast<unsigned>(std::atoi(b));
  // Relacy replaces operator new/delete while a model runs, so its report
  // cannot go to a growing std::ostringstream: it goes to stdout (-v, or
  // on an unexpected result, rerun) or to /dev/null.
  auto run = [&](std::ostream& out) {
    rl::test_params p;
    p.search_type = search;
    p.context_bound = context_bound;
    if (iterations != 0) p.iteration_count = iterations;
    p.output_stream = &out;
    p.progress_stream = &out;
    rl::simulate<Test>(p);
    std::fflush(stdout);
    return p;
  };
  std::ofstream null("/dev/null");
  const rl::test_params p = o.verbose ? run(std::cout) : run(null);
  const bool ok = p.test_result == expect;
  std::printf("%-60s %-6s %s after %llu interleavings (expected %s)\n", name, ok ? "ok" : "FAILED",
              rl::test_result_str(p.test_result), static_cast<unsigned long long>(p.stop_iteration),
              rl::test_result_str(expect));
  if (!ok && !o.verbose) run(std::cout);
  std::fflush(stdout);
  return ok;
}

}  // namespace runnel_model
