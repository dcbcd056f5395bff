#!/usr/bin/env bash
# A local cim cluster: Redis and ZooKeeper (scripts/services.sh), one route
# and two IM servers as separate twistd processes, with pid and log files
# under .run/cluster.
#
#   scripts/cluster.sh up | down | status
#
# Ports: route 8083; servers 11211/8081 and 11212/8082.  The cluster secret
# is CIM_SECRET, or one generated into .run/cluster/secret.
set -euo pipefail

cd "$(dirname "$0")/.."
RUN=${CIM_CLUSTER_DIR:-$(pwd)/.run/cluster}
TWISTD=.venv/bin/twistd
# The standard ports, so that every daemon's defaults point at them.
export CIM_REDIS_PORT=${CIM_CLUSTER_REDIS_PORT:-6379}
export CIM_ZK_PORT=${CIM_CLUSTER_ZK_PORT:-2181}
REDIS_PORT=$CIM_REDIS_PORT
ZK_PORT=$CIM_ZK_PORT
STORE="redis://127.0.0.1:$REDIS_PORT/0"
REGISTRY="zk://127.0.0.1:$ZK_PORT/cim"

daemon() {
    local name=$1
    shift
    if [ -f "$RUN/$name.pid" ] && kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; then
        echo "cluster: $name already running"
        return
    fi
    CIM_SECRET=$SECRET "$TWISTD" --pidfile "$RUN/$name.pid" --logfile "$RUN/$name.log" "$@"
    echo "cluster: started $name (log $RUN/$name.log)"
}

wait_http() {
    local name=$1 port=$2 deadline=$((SECONDS + 30))
    until curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            echo "cluster: $name did not come up; its log:" >&2
            tail -n 30 "$RUN/$name.log" >&2 || true
            return 1
        fi
        sleep 0.2
    done
}

up() {
    mkdir -p "$RUN"
    CIM_SERVICES_DIR="$RUN/services" scripts/services.sh up
    if [ -n "${CIM_SECRET:-}" ]; then
        SECRET=$CIM_SECRET
    else
        [ -f "$RUN/secret" ] || head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$RUN/secret"
        SECRET=$(cat "$RUN/secret")
    fi
    daemon server1 cim-server --port 11211 --http-port 8081 --ws-port 8084 --store "$STORE" --registry "$REGISTRY"
    daemon server2 cim-server --port 11212 --http-port 8082 --ws-port 8085 --store "$STORE" --registry "$REGISTRY"
    wait_http server1 8081
    wait_http server2 8082
    daemon route cim-route --port 8083 --store "$STORE" --registry "$REGISTRY"
    wait_http route 8083
    echo "cluster: up. Chat with: .venv/bin/twistd -n cim-client --user alice"
}

down() {
    for name in route server1 server2; do
        if [ -f "$RUN/$name.pid" ]; then
            pid=$(cat "$RUN/$name.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$RUN/$name.pid"
            echo "cluster: stopped $name"
        fi
    done
    CIM_SERVICES_DIR="$RUN/services" scripts/services.sh down
}

status() {
    for name in route server1 server2; do
        if [ -f "$RUN/$name.pid" ] && kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; then
            echo "$name: running (pid $(cat "$RUN/$name.pid"))"
        else
            echo "$name: stopped"
        fi
    done
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
