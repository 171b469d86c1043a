#!/usr/bin/env bash
# The network cut: a bridge consumer whose broker goes silent (packets
# dropped, no reset) for longer than two heartbeats must notice through the
# heartbeats, reconnect once traffic flows again, and lose nothing.
#
#   netcut.sh WORKER [MESSAGES] [CUT_SECONDS]
#
# WORKER is build/.../examples/example_amqp_worker. Everything runs inside a
# private network namespace made here (`unshare -n`, as root): its own
# loopback, a throwaway broker on that namespace's 127.0.0.1 (broker.sh), the
# worker with heartbeat=2, and iptables DROP rules on the broker's AMQP port
# for CUT_SECONDS (default 7 > 2 x 2 s). The host's network namespace and
# its rules are never touched. Exits 0 on PASS, 1 on FAIL, and 0 with a
# SKIPPED line when unshare or iptables is not permitted here.
set -euo pipefail
# Debian's python3 (with python3-pika), whatever python3 comes first on PATH.
py=/usr/bin/python3
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=check_output.sh
source "$here/check_output.sh"
worker=${1:?usage: netcut.sh WORKER [MESSAGES] [CUT_SECONDS]}
n=${2:-20000}
cut=${3:-7}

if [ "${RUNNEL_NETCUT_INSIDE:-}" != 1 ]; then
  if ! unshare -n true 2>/dev/null; then
    echo "netcut: SKIPPED: a private network namespace (unshare -n) is not permitted here"
    exit 0
  fi
  if ! unshare -n sh -c 'iptables -w -L -n >/dev/null 2>&1'; then
    echo "netcut: SKIPPED: iptables is not permitted inside a private network namespace here"
    exit 0
  fi
  worker=$(cd "$(dirname "$worker")" && pwd)/$(basename "$worker")
  exec unshare -n env RUNNEL_NETCUT_INSIDE=1 bash "$0" "$worker" "$n" "$cut"
fi

# From here on: inside the private namespace.
ip link set lo up
dir=$(mktemp -d /tmp/runnel-netcut-XXXXXX)
chmod 755 "$dir"
wpid=
cleanup() {
  [ -n "$wpid" ] && kill -9 "$wpid" 2>/dev/null || true
  bash "$here/broker.sh" stop "$dir/node" >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT

port=$(bash "$here/broker.sh" start "$dir/node")
url="amqp://guest:guest@127.0.0.1:$port/%2f?heartbeat=2"
count() {  # ready messages in queue $1
  "$py" - "$port" "$1" <<'PY'
import sys, pika
c = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", int(sys.argv[1])))
print(c.channel().queue_declare(sys.argv[2], durable=True).method.message_count)
c.close()
PY
}

# The input: ids 0..n-1.
"$py" - "$port" "$n" <<'PY'
import sys, pika
c = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", int(sys.argv[1])))
ch = c.channel()
for q in ("cut.in", "cut.out", "cut.dead"):
    ch.queue_declare(q, durable=True)
n = int(sys.argv[2])
# Without confirms (pika's blocking confirms cost a round trip each): the
# queue's count, checked below, shows every message arrived.
for i in range(n):
    ch.basic_publish("", "cut.in", str(i), pika.BasicProperties(delivery_mode=2))
c.close()
PY
echo "netcut: broker up and $n messages in ($SECONDS s)"
[ "$(count cut.in)" = "$n" ] || { echo "netcut: FAIL: the input queue does not hold $n messages"; exit 1; }

RUNNEL_AMQP_URL=$url "$worker" cut.in cut.out cut.dead >"$dir/worker.log" 2>&1 &
wpid=$!

# Cut once a quarter is through, so deliveries and results are in flight.
for _ in $(seq 1 600); do
  [ "$(count cut.out)" -ge $((n / 4)) ] && break
  sleep 0.1
done
rules=(-p tcp --dport "$port" -j DROP)
rules_back=(-p tcp --sport "$port" -j DROP)
out_at_cut=$(count cut.out)
iptables -w -A INPUT "${rules[@]}"
iptables -w -A INPUT "${rules_back[@]}"
iptables -w -A OUTPUT "${rules[@]}"
iptables -w -A OUTPUT "${rules_back[@]}"
echo "netcut: port $port cut for ${cut} s (heartbeat 2 s) with $out_at_cut of $n results out ($SECONDS s)"
sleep "$cut"
iptables -w -D INPUT "${rules[@]}"
iptables -w -D INPUT "${rules_back[@]}"
iptables -w -D OUTPUT "${rules[@]}"
iptables -w -D OUTPUT "${rules_back[@]}"

# Drained: every input acked, every result in cut.out (at least once).
# (A bound, not a measurement: a worker that never notices the cut would
# otherwise wait for TCP to give up, about 15 minutes.)
ok=0
deadline=$((SECONDS + 120))
while [ "$SECONDS" -lt "$deadline" ]; do
  if [ "$(count cut.in)" = 0 ] &&
     bash "$here/broker.sh" ctl "$dir/node" list_queues name messages_unacknowledged | grep -qE '^cut\.in\s+0$'; then
    ok=1
    break
  fi
  sleep 0.2
done
kill -TERM "$wpid"
wait "$wpid" || { echo "netcut: FAIL: the worker exited with an error"; cat "$dir/worker.log"; exit 1; }
wpid=
final=$(grep '^final:' "$dir/worker.log" || true)
echo "netcut: worker $final ($SECONDS s)"
[ "$ok" = 1 ] || { echo "netcut: FAIL: cut.in did not drain"; cat "$dir/worker.log"; exit 1; }

check_output netcut "$port" "$n" cut "$final"
