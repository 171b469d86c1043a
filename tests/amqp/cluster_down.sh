#!/usr/bin/env bash
# Every node of a 3-node cluster down for a while (default 60 s), then back:
# the worker, given all three addresses, keeps retrying through the outage
# (rotating through the addresses with capped backoff), does not exit,
# reconnects when the nodes return, and every input ends in the output queue.
#
#   cluster_down.sh WORKER [MESSAGES] [DOWN_SECONDS]
#
# WORKER is example_amqp_worker. The cluster is examples/cluster/cluster.sh's
# (127.0.0.1 only, state under a temp dir, stopped after); the queues are
# classic and durable (declared by the worker), the messages persistent, so
# they survive `rabbitmqctl stop_app` / `start_app` on every node. A long
# check, run by hand (about 3-5 minutes on 2 cores), not by CI. As root.
set -euo pipefail
py=/usr/bin/python3
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=check_output.sh
source "$here/check_output.sh"
cluster="$here/../../examples/cluster/cluster.sh"
worker=${1:?usage: cluster_down.sh WORKER [MESSAGES] [DOWN_SECONDS]}
n=${2:-100000}
down=${3:-60}

dir=$(mktemp -d /tmp/runnel-cluster-down-XXXXXX)
chmod 755 "$dir"  # the nodes run as user rabbitmq
wpid=
cleanup() {
  [ -n "$wpid" ] && kill -9 "$wpid" 2>/dev/null || true
  bash "$cluster" stop "$dir/c" >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT

url=$(bash "$cluster" start "$dir/c")
port1=$(echo "$url" | sed -E 's|.*@127\.0\.0\.1:([0-9]+),.*|\1|')
echo "cluster_down: cluster up ($SECONDS s): $url"
count() {  # ready messages in queue $1 (through node 1)
  "$py" - "$port1" "$1" <<'PY'
import sys, pika
c = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", int(sys.argv[1])))
print(c.channel().queue_declare(sys.argv[2], durable=True).method.message_count)
c.close()
PY
}

"$py" - "$port1" "$n" <<'PY'
import sys, pika
c = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", int(sys.argv[1])))
ch = c.channel()
for q in ("down.in", "down.out", "down.dead"):
    ch.queue_declare(q, durable=True)
for i in range(int(sys.argv[2])):
    ch.basic_publish("", "down.in", str(i), pika.BasicProperties(delivery_mode=2))
c.close()
PY
[ "$(count down.in)" = "$n" ] || { echo "cluster_down: FAIL: the input queue does not hold $n messages"; exit 1; }

RUNNEL_AMQP_URL="$url?heartbeat=2" "$worker" down.in down.out down.dead >"$dir/worker.log" 2>&1 &
wpid=$!

# Down once a quarter is through, so deliveries and results are in flight.
for _ in $(seq 1 600); do
  [ "$(count down.out)" -ge $((n / 4)) ] && break
  sleep 0.1
done
echo "cluster_down: $(count down.out) of $n results out; stopping every node for $down s ($SECONDS s)"
pids=()
for i in 1 2 3; do bash "$cluster" ctl "$dir/c" "$i" stop_app >"$dir/stop$i.out" 2>&1 & pids+=($!); done
for i in 1 2 3; do
  wait "${pids[$((i - 1))]}" || { echo "cluster_down: FAIL: stop_app on node $i:"; cat "$dir/stop$i.out"; exit 1; }
done
t_down=$SECONDS
# Every AMQP port must now refuse: the outage is real.
"$py" - "$url" <<'PY' || { echo "cluster_down: FAIL: a node still accepts AMQP connections"; exit 1; }
import sys, re, socket
for port in re.findall(r"127\.0\.0\.1:(\d+)", sys.argv[1]):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", int(port)))
        print(f"port {port} still accepts")
        sys.exit(1)
    except OSError:
        pass
    finally:
        s.close()
PY
echo "cluster_down: every AMQP port refuses ($SECONDS s)"
sleep "$down"
kill -0 "$wpid" 2>/dev/null || { echo "cluster_down: FAIL: the worker exited during the outage"; cat "$dir/worker.log"; exit 1; }
# Together: a node of a cluster waits at start for the others it saw last.
pids=()
for i in 1 2 3; do bash "$cluster" ctl "$dir/c" "$i" start_app >"$dir/start$i.out" 2>&1 & pids+=($!); done
for i in 1 2 3; do
  wait "${pids[$((i - 1))]}" || { echo "cluster_down: FAIL: start_app on node $i:"; cat "$dir/start$i.out"; exit 1; }
done
echo "cluster_down: every node back after $((SECONDS - t_down)) s down ($SECONDS s)"

ok=0
deadline=$((SECONDS + 180))
while [ "$SECONDS" -lt "$deadline" ]; do
  if [ "$(count down.in)" = 0 ] &&
     bash "$cluster" ctl "$dir/c" 1 list_queues name messages_unacknowledged | grep -qE '^down\.in\s+0$'; then
    ok=1
    break
  fi
  sleep 0.5
done
kill -TERM "$wpid"
wait "$wpid" || { echo "cluster_down: FAIL: the worker exited with an error"; cat "$dir/worker.log"; exit 1; }
wpid=
final=$(grep '^final:' "$dir/worker.log" || true)
echo "cluster_down: worker $final ($SECONDS s)"
[ "$ok" = 1 ] || { echo "cluster_down: FAIL: down.in did not drain"; cat "$dir/worker.log"; exit 1; }

check_output cluster_down "$port1" "$n" down "$final"
