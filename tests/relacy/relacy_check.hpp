// The driver shared by the relacy_*_test programs: each program's main() is
// a table of models, each row a model, the search of its interleavings and
// the result the checker must report; run_models runs the rows in order,
// prints for each the number of interleavings explored, and fails the
// program if any result differs from the expected one. The tests of the
// tests (a model run on a deliberately weakened instance, which the checker
// must report as failing) are rows made with caught(); their names are
// printed with a "[mutant] " prefix.
//
// Usage of each program: <program> [-v] [name-part]
//   -v         prints Relacy's per-model statistics
//   name-part  runs only the models whose name contains it ("[mutant]":
//              only the tests of the tests)
// RUNNEL_RELACY_BOUND=n in the environment deepens the context-bound
// searches (CI uses 1 or 2; 3 takes minutes).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <iostream>

#include "relacy_atomics.hpp"

namespace runnel_model {

// How a model's interleavings are explored.
struct search {
  rl::scheduler_type_e type = rl::fair_full_search_scheduler_type;
  unsigned context_bound = 1;  // preemptions, for a context-bound search
  rl::iteration_t iterations = 0;  // schedules, for a random search (0: Relacy's default)
};

// Every interleaving (small models only).
inline search full_search() { return {rl::fair_full_search_scheduler_type, 1, 0}; }
// Every interleaving with at most `preemptions` preemptions (blocking and
// yielding are free); RUNNEL_RELACY_BOUND overrides the bound.
inline search bounded(unsigned preemptions = 1) {
  return {rl::fair_context_bound_scheduler_type, preemptions, 0};
}
// `n` random schedules (models too large for a systematic search).
inline search random_schedules(rl::iteration_t n) { return {rl::random_scheduler_type, 0, n}; }

// One row of a program's table.
struct model {
  const char* name;
  bool mutant;  // a test of the test: the checker must report a failure
  search how;
  rl::test_result_e expect;
  rl::test_params (*simulate)(const search&, std::ostream&);
};

template <class Test>
rl::test_params simulate(const search& s, std::ostream& out) {
  rl::test_params p;
  p.search_type = s.type;
  p.context_bound = s.context_bound;
  if (s.iterations != 0) p.iteration_count = s.iterations;
  p.output_stream = &out;
  p.progress_stream = &out;
  rl::simulate<Test>(p);
  std::fflush(stdout);
  return p;
}

// A model that must pass.
template <class Test>
model passes(const char* name, search how) {
  return {name, false, how, rl::test_result_success, &simulate<Test>};
}

// A test of the test: Test on a weakened instance, which the checker must
// report as failing with `expect`.
template <class Test>
model caught(const char* name, search how, rl::test_result_e expect) {
  return {name, true, how, expect, &simulate<Test>};
}

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

// Runs one row; true when the checker reported what it expects.
inline bool check(const check_options& o, model m) {
  static constexpr char prefix[] = "[mutant] ";
  char name[160];
  std::snprintf(name, sizeof name, "%s%s", m.mutant ? prefix : "", m.name);
  if (o.only != nullptr && std::strstr(name, o.only) == nullptr) return true;
  if (const char* b = std::getenv("RUNNEL_RELACY_BOUND"); b != nullptr && m.how.type == rl::fair_context_bound_scheduler_type)
    m.how.context_bound = static_cast<unsigned>(std::atoi(b));
  // Relacy replaces operator new/delete while a model runs, so its report
  // cannot go to a growing std::ostringstream: it goes to stdout (-v, or
  // on an unexpected result, rerun) or to /dev/null.
  std::ofstream null("/dev/null");
  const rl::test_params p = m.simulate(m.how, o.verbose ? std::cout : null);
  const bool ok = p.test_result == m.expect;
  std::printf("%-60s %-6s %s after %llu interleavings (expected %s)\n", name, ok ? "ok" : "FAILED",
              rl::test_result_str(p.test_result), static_cast<unsigned long long>(p.stop_iteration),
              rl::test_result_str(m.expect));
  if (!ok && !o.verbose) m.simulate(m.how, std::cout);
  std::fflush(stdout);
  return ok;
}

// Runs every row of a program's table (all of them, even after a failure);
// the program's exit status.
inline int run_models(int argc, char** argv, std::initializer_list<model> table) {
  const check_options o(argc, argv);
  bool ok = true;
  for (const model& m : table) ok &= check(o, m);
  return ok ? 0 : 1;
}

}  // namespace runnel_model
