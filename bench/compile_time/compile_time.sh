#!/usr/bin/env bash
# Compile time of runnel against oneTBB for the same small program
# (log_runnel.cpp, log_tbb.cpp), and of each runnel header on its own.
#
#   bash bench/compile_time/compile_time.sh [runs]    (default 5)
#
# Each figure is the lowest user+system CPU time of `runs` compiles (CPU
# time, not wall time, and the minimum, because the machine is shared); the
# ratios compare figures measured in the same run. Needs g++, clang++ and
# libtbb-dev.
set -euo pipefail
cd "$(dirname "$0")"
inc=${RUNNEL_INCLUDE:-$(cd ../../include && pwd)}  # RUNNEL_INCLUDE: another tree, to compare
runs=${1:-5}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Lowest user+sys seconds over $runs runs of: $@
measure() {
  local best=
  for _ in $(seq "$runs"); do
    /usr/bin/time -o "$tmp/t" -f "%U %S" "$@" >/dev/null 2>&1
    local t
    t=$(awk '{printf "%.2f", $1 + $2}' "$tmp/t")
    if [ -z "$best" ] || awk -v a="$t" -v b="$best" 'BEGIN{exit !(a < b)}'; then best=$t; fi
  done
  echo "$best"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a / b}'; }

for cxx in g++ clang++; do
  echo "== $cxx -std=c++20 -O2, whole program (compile + link)"
  r=$(measure "$cxx" -std=c++20 -O2 -I"$inc" log_runnel.cpp -o "$tmp/a" -pthread)
  t=$(measure "$cxx" -std=c++20 -O2 log_tbb.cpp -o "$tmp/b" -ltbb -pthread)
  echo "runnel ${r}s  oneTBB ${t}s  runnel/oneTBB $(ratio "$r" "$t")"
  echo "== $cxx -std=c++20 -fsyntax-only, one #include"
  for h in mpmc_queue spsc_queue channel thread_pool task_group pipeline runnel; do
    echo "#include <runnel/$h.hpp>" >"$tmp/h.cpp"
    echo "  runnel/$h.hpp $(measure "$cxx" -std=c++20 -fsyntax-only -I"$inc" "$tmp/h.cpp")s"
  done
  printf '#include <tbb/parallel_pipeline.h>\n#include <tbb/task_group.h>\n#include <tbb/concurrent_queue.h>\n' >"$tmp/t.cpp"
  echo "  oneTBB (parallel_pipeline, task_group, concurrent_queue) $(measure "$cxx" -std=c++20 -fsyntax-only "$tmp/t.cpp")s"
done
