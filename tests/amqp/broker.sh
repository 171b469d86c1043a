#!/usr/bin/env bash
# A throwaway RabbitMQ node for tests and benchmarks, on 127.0.0.1 only.
#
#   broker.sh start DIR [OWNER_PID]
#                         starts a private epmd and node with all state under
#                         DIR (created), on free ports; waits until the node is
#                         up; writes DIR/env (AMQP_PORT, NODE, EPMD_PID,
#                         SERVER_PID) and prints the AMQP port. With OWNER_PID
#                         (the test program), a detached watcher (DIR/env:
#                         WATCH_PID) stops the node once that process is gone,
#                         however it ended: a test killed by a signal or a
#                         timeout never leaves its broker behind.
#   broker.sh stop DIR    shuts the node down (if rabbitmqctl cannot, SIGKILL
#                         of its Erlang VM by the pid in DIR/beam.pid) and ends
#                         the epmd and the watcher it started, by pid; then
#                         removes DIR.
#   broker.sh ctl DIR ARGS...   rabbitmqctl against that node.
#
# RUNNEL_BROKER_TLS=1 also makes a throwaway CA and certificates in DIR/tls
# (make_certs below) and opens a TLS listener (DIR/env: TLS_PORT) that wants
# a client certificate from that CA, with EXTERNAL login enabled (plugin
# rabbitmq_auth_mechanism_ssl, user name = the certificate's CN).
# RUNNEL_BROKER_DEFINITIONS=FILE loads users, permissions, queues and
# exchanges from a definitions file at boot (no rabbitmqctl round trips).
#
# Runs as root: rabbitmq-server switches to user rabbitmq, so DIR is chowned
# to it. Nothing listens beyond loopback except the Erlang distribution port,
# which the node binds on all interfaces; tests never send to it from outside.
set -euo pipefail
cmd=${1:?usage: broker.sh start|stop|ctl DIR}
dir=${2:?usage: broker.sh start|stop|ctl DIR}
self=$(readlink -f "$0")

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
  export RABBITMQ_PID_FILE=$dir/beam.pid
}

# SIGKILL of the node's Erlang VM by the pid it wrote to DIR/beam.pid, and of
# its process group (the wrapper switches user with su, which starts a new
# session, so the VM is not in the wrapper's group), then of the wrapper's.
kill_node() {
  local beam pg
  beam=$(cat "$dir/beam.pid" 2>/dev/null || echo)
  if [ -n "$beam" ] && kill -0 "$beam" 2>/dev/null; then
    pg=$(ps -o pgid= -p "$beam" | tr -d ' ')
    [ -n "$pg" ] && kill -9 -- "-$pg" 2>/dev/null
    kill -9 "$beam" 2>/dev/null
  fi
  kill -9 -- "-$SERVER_PID" 2>/dev/null || true
}

ctl() { node_env; rabbitmqctl -q -n "$NODE" "$@"; }

# DIR/tls: ca.pem (+key), server.pem for DNS:localhost only (so 127.0.0.1 is
# a host name mismatch), client.pem (CN runnel-client), expired.pem (a client
# certificate of that CA whose validity ended yesterday), other-ca.pem (a CA
# that signed nothing here). EC keys: fast to make.
make_certs() {
  local t=$1
  mkdir -p "$t"
  local newkey=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${newkey[@]}" -keyout "$t/ca.key" -out "$t/ca.pem" -days 2 -subj /CN=runnel-test-ca 2>/dev/null
  openssl req -x509 "${newkey[@]}" -keyout "$t/other-ca.key" -out "$t/other-ca.pem" -days 2 \
    -subj /CN=runnel-other-ca 2>/dev/null
  sign() {  # name CN days extensions
    openssl req "${newkey[@]}" -keyout "$t/$1.key" -out "$t/$1.csr" -subj "/CN=$2" 2>/dev/null
    printf '%s\n' "$4" >"$t/$1.ext"
    openssl x509 -req -in "$t/$1.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" -CAcreateserial -days "$3" \
      -extfile "$t/$1.ext" -out "$t/$1.pem" 2>/dev/null
  }
  sign server localhost 2 "subjectAltName=DNS:localhost
extendedKeyUsage=serverAuth"
  sign client runnel-client 2 "extendedKeyUsage=clientAuth"
  sign expired runnel-client -1 "extendedKeyUsage=clientAuth"
}

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
    if [ "${RUNNEL_BROKER_TLS:-0}" = 1 ]; then
      make_certs "$dir/tls"
      tls_port=$(free_port)
      echo "TLS_PORT=$tls_port" >>"$dir/env"
      echo '[rabbitmq_auth_mechanism_ssl].' >"$dir/enabled_plugins"
      cat >>"$dir/rabbitmq.conf" <<CONF
listeners.ssl.default = 127.0.0.1:$tls_port
ssl_options.cacertfile = $dir/tls/ca.pem
ssl_options.certfile = $dir/tls/server.pem
ssl_options.keyfile = $dir/tls/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
ssl_options.versions.1 = tlsv1.3
ssl_options.versions.2 = tlsv1.2
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = AMQPLAIN
auth_mechanisms.3 = EXTERNAL
ssl_cert_login_from = common_name
CONF
    fi
    if [ -n "${RUNNEL_BROKER_DEFINITIONS:-}" ]; then
      cp "$RUNNEL_BROKER_DEFINITIONS" "$dir/definitions.json"
      echo "load_definitions = $dir/definitions.json" >>"$dir/rabbitmq.conf"
    fi
    node_env
    # The watcher starts before anything it must clean up, so no moment is
    # left in which the owner can die unwatched. It is detached (own session,
    # no inherited descriptors: the caller reads our stdout to its end) and
    # polls, as a dead process cannot be waited for by a non-parent.
    if [ -n "${3:-}" ]; then
      setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; exec bash "$2" stop "$3"' \
        watch "$3" "$self" "$dir" </dev/null >/dev/null 2>&1 &
      echo "WATCH_PID=$!" >>"$dir/env"
    fi
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
    rabbitmqctl -q -n "$NODE" shutdown >/dev/null 2>&1 || kill_node
    beam=$(cat "$dir/beam.pid" 2>/dev/null || echo)
    for _ in $(seq 1 40); do
      kill -0 "$SERVER_PID" 2>/dev/null || { [ -n "$beam" ] && kill -0 "$beam" 2>/dev/null; } || break
      sleep 0.25
    done
    # Still there (a shutdown that hung half-way): by pid, as above.
    if kill -0 "$SERVER_PID" 2>/dev/null || { [ -n "$beam" ] && kill -0 "$beam" 2>/dev/null; }; then kill_node; fi
    kill "$EPMD_PID" 2>/dev/null || true
    wait "$EPMD_PID" 2>/dev/null || true
    # The watcher, unless it is the one stopping the node (it execs this script).
    if [ -n "${WATCH_PID:-}" ] && [ "$WATCH_PID" != "$$" ]; then kill "$WATCH_PID" 2>/dev/null || true; fi
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
