#!/usr/bin/env bash
# A throwaway RabbitMQ node for tests and benchmarks, on 127.0.0.1 only.
#
#   broker.sh start DIR   starts a private epmd and node with all state under
#                         DIR (created), on free ports; waits until the node is
#                         up; writes DIR/env (AMQP_PORT, NODE, EPMD_PID,
#                         SERVER_PID) and prints the AMQP port.
#   broker.sh stop DIR    shuts the node down and ends the epmd it started, by
#                         pid; then removes DIR.
#   broker.sh ctl DIR ARGS...   rabbitmqctl against that node.
#
# Runs as root: rabbitmq-server switches to user rabbitmq, so DIR is chowned
# to it. Nothing listens beyond loopback except the Erlang distribution port,
# which the node binds on all interfaces; tests never send to it from outside.
set -euo pipefail
cmd=${1:?usage: broker.sh start|stop|ctl DIR}
dir=${2:?usage: broker.sh start|stop|ctl DIR}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

node_env() {
  # shellcheck disable=SC1091
  source "$dir/env"
  export RABBITMQ_NODENAME=$NODE ERL_EPMD_PORT=$EPMD_PORT ERL_EPMD_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=$AMQP_PORT RABBITMQ_DIST_PORT=$DIST_PORT
  export RABBITMQ_MNESIA_BASE=$dir/mnesia RABBITMQ_LOG_BASE=$dir/log
  export RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins RABBITMQ_CONFIG_FILE=$dir/rabbitmq
}

ctl() { node_env; rabbitmqctl -q -n "$NODE" "$@"; }

case "$cmd" in
  start)
    command -v rabbitmq-server >/dev/null || { echo "broker.sh: rabbitmq-server is not installed" >&2; exit 3; }
    mkdir -p "$dir/mnesia" "$dir/log"
    name="runnel-$$-$RANDOM"
    {
      echo "NODE=$name@localhost"
      echo "AMQP_PORT=$(free_port)"
      echo "DIST_PORT=$(free_port)"
      echo "EPMD_PORT=$(free_port)"
    } >"$dir/env"
    echo '[].' >"$dir/enabled_plugins"
    cat >"$dir/rabbitmq.conf" <<CONF
loopback_users = none
log.console = false
CONF
    node_env
    epmd -address 127.0.0.1 -port "$EPMD_PORT" >/dev/null 2>&1 &
    echo "EPMD_PID=$!" >>"$dir/env"
    chown -R rabbitmq:rabbitmq "$dir"
    chmod 755 "$dir"
    setsid rabbitmq-server >"$dir/server.out" 2>&1 </dev/null &
    echo "SERVER_PID=$!" >>"$dir/env"
    node_env
    for _ in $(seq 1 120); do
      if rabbitmqctl -q -n "$NODE" await_startup >/dev/null 2>&1; then
        echo "$AMQP_PORT"
        exit 0
      fi
      if ! kill -0 "$SERVER_PID" 2>/dev/null; then break; fi
      sleep 0.5
    done
    echo "broker.sh: node did not start; see $dir/server.out and $dir/log" >&2
    tail -n 20 "$dir/server.out" >&2 || true
    exit 1
    ;;
  stop)
    [ -f "$dir/env" ] || exit 0
    node_env
    rabbitmqctl -q -n "$NODE" shutdown >/dev/null 2>&1 || kill -9 -- "-$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.25; done
    kill "$EPMD_PID" 2>/dev/null || true
    wait "$EPMD_PID" 2>/dev/null || true
    rm -rf "$dir"
    ;;
  ctl)
    shift 2
    ctl "$@"
    ;;
  *)
    echo "usage: broker.sh start|stop|ctl DIR" >&2
    exit 2
    ;;
esac
