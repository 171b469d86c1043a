#!/usr/bin/env bash
# broker.sh start DIR OWNER_PID: once the owner dies without stopping its
# broker (SIGKILL, as a test timeout or a crash would end it), the watcher
# stops the node, its epmd and itself, and removes DIR. Fails if any of them
# is still there a minute later (a bound for a hang, not a timing claim).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
command -v rabbitmq-server >/dev/null || { echo "*** rabbitmq-server is not installed: SKIPPING ***"; exit 0; }
dir=$(mktemp -d /tmp/runnel-owner-XXXXXX)
sleep 600 &
owner=$!
port=$(bash "$here/broker.sh" start "$dir" "$owner")
# shellcheck disable=SC1091
source "$dir/env"
beam=$(cat "$dir/beam.pid")
echo "node up on port $port: vm $beam, epmd $EPMD_PID, watcher ${WATCH_PID:-none}; killing owner $owner"
alive() { for p in "$@"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
if [ -z "${WATCH_PID:-}" ] || ! alive "$WATCH_PID"; then
  echo "FAIL: no watcher running"; kill -9 "$owner"; bash "$here/broker.sh" stop "$dir"; exit 1
fi
{ kill -9 "$owner" && wait "$owner"; } 2>/dev/null || true
for _ in $(seq 1 240); do
  if ! alive "$beam" "$EPMD_PID" "$WATCH_PID" && [ ! -e "$dir" ]; then
    echo "PASS: node, epmd and watcher gone, $dir removed"
    exit 0
  fi
  sleep 0.25
done
echo "FAIL: a minute after the owner died: vm $(alive "$beam" && echo alive || echo gone)," \
  "epmd $(alive "$EPMD_PID" && echo alive || echo gone), watcher $(alive "$WATCH_PID" && echo alive || echo gone)," \
  "dir $([ -e "$dir" ] && echo left || echo removed)"
bash "$here/broker.sh" stop "$dir" || true
exit 1
