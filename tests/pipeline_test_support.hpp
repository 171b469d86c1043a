// Helpers shared by the pipeline tests: an unpinned pool of a given size and
// the accounting every finished run must satisfy.
#pragma once

#include <runnel/pipeline.hpp>
#include <runnel/thread_pool.hpp>

#include <catch2/catch.hpp>

#include <cstddef>

namespace runnel_test {

// Unpinned, so that several pools of a test (and the sanitizers' own threads)
// share the CPUs as the OS sees fit.
inline runnel::pool_options pool_of(std::size_t threads) {
  runnel::pool_options o;
  o.threads = threads;
  o.pin = false;
  return o;
}

// Every message is accounted for once: overall (produced = delivered +
// filtered + failed + discarded), at each node (what came in went out or was
// filtered, failed or discarded; a source's "in" is what it generated) and
// between nodes (what one node put out the next one took in).
inline void check_invariant(const runnel::pipeline_stats& s) {
  INFO("produced " << s.produced << " delivered " << s.delivered << " filtered " << s.filtered << " failed "
                   << s.failed << " discarded " << s.discarded);
  CHECK(s.finished);
  CHECK(s.produced == s.delivered + s.filtered + s.failed + s.discarded);
  for (std::size_t i = 0; i < s.stages.size(); ++i) {
    const auto& n = s.stages[i];
    INFO("node " << i << " (" << n.name << ")");
    if (i == 0 && n.name == "source") {
      CHECK(n.in == n.out + n.discarded);  // an exception from a generator is reported, not a message
    } else {
      CHECK(n.in == n.out + n.filtered + n.failed + n.discarded);
    }
    if (i + 1 < s.stages.size()) CHECK(n.out == s.stages[i + 1].in);
  }
}

}  // namespace runnel_test
