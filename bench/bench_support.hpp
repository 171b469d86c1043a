// Shared by runnel's benchmark binaries: naming convention, a --smoke mode
// for CI, and a closing table of speed ratios against the peers measured in
// the same run (absolute times on a shared machine mean little; ratios do).
//
// Name every benchmark "<group>:<impl>", e.g. "mpmc/u64/2P2C:boost_lockfree".
// Implementations whose name starts with "runnel" are ours; every other impl
// in the same group is a peer. The table prints, per group, each runnel impl's
// speed divided by each peer's (> 1 means runnel is faster). Speed is the
// items_per_second counter when a benchmark sets it, else 1 / real time.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstring>
#include <unistd.h>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace runnel_bench {

// Set by --smoke: benchmarks shrink their work so that CI can run every
// binary once in seconds.
inline bool smoke = false;

class ratio_reporter : public benchmark::ConsoleReporter {
 public:
  // Colour only on a terminal, so that logs and CI output stay plain text.
  ratio_reporter() : ConsoleReporter(::isatty(STDOUT_FILENO) ? OO_ColorTabular : OO_Tabular) {}

  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      if (run.error_occurred) continue;
      const bool aggregate = run.run_type == Run::RT_Aggregate;
      // With repetitions, keep only the median; without, the single run.
      if (run.repetitions > 1 ? !(aggregate && run.aggregate_name == "median") : aggregate) continue;
      const std::string& name = run.run_name.function_name;
      const auto colon = name.rfind(':');
      if (colon == std::string::npos) continue;
      double speed = 0;
      if (auto it = run.counters.find("items_per_second"); it != run.counters.end()) {
        speed = it->second.value;
      } else if (run.GetAdjustedRealTime() > 0) {
        speed = 1.0 / run.GetAdjustedRealTime();
      }
      std::string group = name.substr(0, colon);
      if (auto it = order_.find(group); it == order_.end()) {
        order_.emplace(group, groups_.size());
        groups_.push_back({group, {}});
      }
      groups_[order_[group]].second.emplace_back(name.substr(colon + 1), speed);
    }
  }

  void Finalize() override {
    ConsoleReporter::Finalize();
    std::printf("\nratios in this run (runnel speed / peer speed; > 1.00 means runnel is faster)\n");
    std::printf("%-34s %-22s %-24s %7s\n", "group", "runnel impl", "peer", "ratio");
    for (const auto& [group, impls] : groups_) {
      for (const auto& [ours, our_speed] : impls) {
        if (ours.rfind("runnel", 0) != 0) continue;
        for (const auto& [peer, peer_speed] : impls) {
          if (peer.rfind("runnel", 0) == 0 || peer_speed <= 0) continue;
          std::printf("%-34s %-22s %-24s %7.2f\n", group.c_str(), ours.c_str(), peer.c_str(),
                      our_speed / peer_speed);
        }
      }
    }
    std::fflush(stdout);
  }

 private:
  std::vector<std::pair<std::string, std::vector<std::pair<std::string, double>>>> groups_;
  std::map<std::string, std::size_t> order_;
};

// Parses --smoke (ours) and Google Benchmark's flags, calls `register_all`
// (which may read `smoke` to size the work), then runs every registered
// benchmark with `reporter` (a ratio_reporter, or one built on it that adds
// its own summary).
inline int run_main(int argc, char** argv, void (*register_all)(), ratio_reporter& reporter) {
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--smoke") == 0) {
      smoke = true;
    } else {
      args.push_back(argv[i]);
    }
  }
  register_all();
  int n = static_cast<int>(args.size());
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}

// The same with the ratio table at the end.
inline int run_main(int argc, char** argv, void (*register_all)()) {
  ratio_reporter reporter;
  return run_main(argc, argv, register_all, reporter);
}

}  // namespace runnel_bench
