#!/bin/bash
# Instructions per operation of the hot paths, counted by callgrind.
#   bash bench/op_instructions/op_instructions.sh [INCLUDE_DIR ...]
# With no argument it measures this checkout's headers; give several include
# directories (e.g. of an older checkout: git worktree add /tmp/old <rev>) to
# compare them side by side. Needs g++ and valgrind.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -gt 0 ] || set -- "$here/../../include"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# ring and channels: one push + one pop a unit; task_group: one run() a unit.
printf '%-18s' op; for inc in "$@"; do printf ' %14s' "$(basename "$(dirname "$(realpath "$inc")")")"; done; echo
n=0
for inc in "$@"; do
  g++ -std=c++20 -O2 -DNDEBUG -I"$inc" "$here/op_instructions.cpp" -o "$work/ops$n" -pthread
  n=$((n + 1))
done
for op in ring channel_try channel_blocking task_group_run; do
  printf '%-18s' "$op"
  for ((i = 0; i < n; i++)); do
    total=$(valgrind --tool=callgrind --callgrind-out-file="$work/cg" "$work/ops$i" "$op" 2>&1 |
            sed -n 's/.*Collected : \([0-9]*\).*/\1/p')
    # 1,000,000 units; the program's fixed start-up (~1.8M) is left in.
    printf ' %14s' "$(awk -v t="$total" 'BEGIN { printf "%.1f", t / 1e6 }')"
  done
  echo
done
