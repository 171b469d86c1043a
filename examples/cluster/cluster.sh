#!/usr/bin/env bash
# A throwaway 3-node RabbitMQ cluster on 127.0.0.1, for trying the bridge's
# fail-over, for the fault harness (tools/amqp_faults) and for benchmarks.
#
#   cluster.sh start DIR       starts a private epmd and three nodes
#                              (<name>-1..3@localhost) with all state under DIR
#                              (created), each with its own AMQP and
#                              distribution ports and data dirs; joins nodes 2
#                              and 3 to node 1 (join_cluster); writes DIR/env
#                              and prints the client URL with all three
#                              addresses: amqp://guest:guest@127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/%2f
#   cluster.sh declare DIR QUEUE [quorum|classic] [DELIVERY_LIMIT]
#                              declares QUEUE (durable; quorum by default, with
#                              x-delivery-limit, default 20, and dead-letter
#                              exchange QUEUE.dlx, a fanout bound to QUEUE.dead)
#   cluster.sh kill DIR N      SIGKILL of node N's Erlang VM (by the pid the
#                              node writes to DIR/nN/beam.pid) and its process
#                              group: a crash, no clean shutdown
#   cluster.sh start-node DIR N  starts node N again (same name, data and
#                              ports) and waits until it is up; it rejoins the
#                              cluster by itself
#   cluster.sh ctl DIR N ARGS...  rabbitmqctl against node N
#   cluster.sh url DIR         prints the client URL again
#   cluster.sh stop DIR        shuts the nodes down (SIGKILL by pid if a
#                              shutdown fails), ends the epmd it started, by
#                              pid, and removes DIR
#
# The nodes start in parallel (about 10-30 s in all on 2 busy cores). They
# run as user rabbitmq (the rabbitmq-server wrapper switches to it when
# started as root), so they share that user's Erlang cookie
# (/var/lib/rabbitmq/.erlang.cookie): that is what lets them cluster. Run as
# root. Nothing listens beyond loopback except the Erlang distribution
# ports, which the nodes bind on all interfaces; nothing here sends to them
# from outside.
set -euo pipefail
cmd=${1:?usage: cluster.sh start|declare|kill|start-node|ctl|url|stop DIR ...}
dir=${2:?usage: cluster.sh $cmd DIR ...}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

load_env() {
  # shellcheck disable=SC1091
  source "$dir/env"
}

# The environment of node $1 (1..3), for rabbitmq-server and rabbitmqctl.
node_env() {
  local i=$1
  load_env
  local amqp="AMQP_PORT_$i" dist="DIST_PORT_$i"
  export RABBITMQ_NODENAME="$NAME-$i@localhost" ERL_EPMD_PORT=$EPMD_PORT ERL_EPMD_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=${!amqp} RABBITMQ_DIST_PORT=${!dist}
  export RABBITMQ_MNESIA_BASE=$dir/n$i/mnesia RABBITMQ_LOG_BASE=$dir/n$i/log
  export RABBITMQ_PID_FILE=$dir/n$i/beam.pid
  export RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins RABBITMQ_CONFIG_FILE=$dir/rabbitmq
}

ctl() {
  local i=$1
  shift
  (node_env "$i" && rabbitmqctl -q -n "$RABBITMQ_NODENAME" "$@")
}

url() {
  load_env
  echo "amqp://guest:guest@127.0.0.1:$AMQP_PORT_1,127.0.0.1:$AMQP_PORT_2,127.0.0.1:$AMQP_PORT_3/%2f"
}

# Starts node $1 in its own session (so its process group is all its own)
# and records that group's leader pid in DIR/n$1/server.pid.
launch() {
  local i=$1
  (
    node_env "$i"
    mkdir -p "$dir/n$i/mnesia" "$dir/n$i/log"
    chown -R rabbitmq:rabbitmq "$dir/n$i"
    rm -f "$RABBITMQ_PID_FILE"
    setsid rabbitmq-server >>"$dir/n$i/server.out" 2>&1 </dev/null &
    echo $! >"$dir/n$i/server.pid"
  )
}

# SIGKILL of node $1: its Erlang VM's process group (the rabbitmq-server
# wrapper switches user with su, which starts a new session, so the VM is not
# in the wrapper's group) and the wrapper's; waits until the VM is gone.
kill_node() {
  local i=$1 beam pg
  beam=$(cat "$dir/n$i/beam.pid" 2>/dev/null || echo)
  if [ -n "$beam" ] && kill -0 "$beam" 2>/dev/null; then
    pg=$(ps -o pgid= -p "$beam" | tr -d ' ')
    [ -n "$pg" ] && kill -9 -- "-$pg" 2>/dev/null
    kill -9 "$beam" 2>/dev/null
  fi
  kill -9 -- "-$(cat "$dir/n$i/server.pid")" 2>/dev/null || true
  for _ in $(seq 1 100); do
    [ -n "$beam" ] && kill -0 "$beam" 2>/dev/null || return 0
    sleep 0.1
  done
  return 0
}

# Waits (up to 120 s) until node $1 is up; fails early if its process died.
await_node() {
  local i=$1 pid
  pid=$(cat "$dir/n$i/server.pid")
  for _ in $(seq 1 240); do
    if ctl "$i" await_startup --timeout 5 >/dev/null 2>&1; then return 0; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  echo "cluster.sh: node $i did not start; see $dir/n$i/server.out and $dir/n$i/log" >&2
  tail -n 20 "$dir/n$i/server.out" >&2 || true
  return 1
}

case "$cmd" in
  start)
    command -v rabbitmq-server >/dev/null || { echo "cluster.sh: rabbitmq-server is not installed" >&2; exit 3; }
    mkdir -p "$dir"
    {
      echo "NAME=runnel-c$$-$RANDOM"
      echo "EPMD_PORT=$(free_port)"
      for i in 1 2 3; do
        echo "AMQP_PORT_$i=$(free_port)"
        echo "DIST_PORT_$i=$(free_port)"
      done
    } >"$dir/env"
    echo '[].' >"$dir/enabled_plugins"
    cat >"$dir/rabbitmq.conf" <<CONF
loopback_users = none
log.console = false
log.file.level = warning
CONF
    load_env
    ERL_EPMD_ADDRESS=127.0.0.1 epmd -address 127.0.0.1 -port "$EPMD_PORT" >/dev/null 2>&1 &
    echo "EPMD_PID=$!" >>"$dir/env"
    chown rabbitmq:rabbitmq "$dir"
    chmod 755 "$dir"
    for i in 1 2 3; do launch "$i"; done
    pids=()
    for i in 1 2 3; do await_node "$i" & pids+=($!); done
    for p in "${pids[@]}"; do wait "$p"; done
    load_env
    # One join at a time: concurrent joins race on the schema.
    # (start_app logs harmless "tracked connection table" errors: kept out of
    # the output, which is the URL alone.)
    for i in 2 3; do
      for step in stop_app "join_cluster $NAME-1@localhost" start_app; do
        # shellcheck disable=SC2086
        ctl "$i" $step >"$dir/n$i/join.out" 2>&1 || { cat "$dir/n$i/join.out" >&2; exit 1; }
      done
    done
    url
    ;;
  declare)
    queue=${3:?usage: cluster.sh declare DIR QUEUE [quorum|classic] [DELIVERY_LIMIT]}
    kind=${4:-quorum}
    limit=${5:-20}
    load_env
    /usr/bin/python3 - "$AMQP_PORT_1" "$queue" "$kind" "$limit" <<'PY'
import sys, pika
port, queue, kind, limit = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
conn = pika.BlockingConnection(pika.ConnectionParameters(host="127.0.0.1", port=port))
ch = conn.channel()
ch.exchange_declare(queue + ".dlx", exchange_type="fanout", durable=True)
ch.queue_declare(queue + ".dead", durable=True, arguments={"x-queue-type": kind})
ch.queue_bind(queue + ".dead", queue + ".dlx")
args = {"x-queue-type": kind, "x-dead-letter-exchange": queue + ".dlx"}
if kind == "quorum":
    args["x-delivery-limit"] = limit
ch.queue_declare(queue, durable=True, arguments=args)
conn.close()
PY
    ;;
  kill)
    i=${3:?usage: cluster.sh kill DIR N}
    kill_node "$i"
    ;;
  start-node)
    i=${3:?usage: cluster.sh start-node DIR N}
    launch "$i"
    await_node "$i"
    ;;
  ctl)
    i=${3:?usage: cluster.sh ctl DIR N ARGS...}
    shift 3
    ctl "$i" "$@"
    ;;
  url)
    url
    ;;
  stop)
    [ -f "$dir/env" ] || exit 0
    load_env
    for i in 1 2 3; do
      (
        beam=$(cat "$dir/n$i/beam.pid" 2>/dev/null || echo)
        if [ -n "$beam" ] && kill -0 "$beam" 2>/dev/null; then
          ctl "$i" shutdown >/dev/null 2>&1 || true
          for _ in $(seq 1 40); do kill -0 "$beam" 2>/dev/null || break; sleep 0.25; done
        fi
        kill_node "$i"  # whatever is left, by pid
      ) &
    done
    wait
    kill "$EPMD_PID" 2>/dev/null || true
    # A node (re)started while our epmd was briefly unreachable may have
    # spawned its own `epmd -daemon` on this cluster's private port: end
    # whatever listens there, by pid.
    sleep 0.5
    for pid in $(ss -ltnpH "sport = :$EPMD_PORT" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
      kill "$pid" 2>/dev/null || true
    done
    rm -rf "$dir"
    ;;
  *)
    echo "usage: cluster.sh start|declare|kill|start-node|ctl|url|stop DIR ..." >&2
    exit 2
    ;;
esac
