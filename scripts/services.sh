#!/usr/bin/env bash
# Start or stop the Redis and ZooKeeper that cim's tests (and `make cluster`)
# use: loopback only, non-default ports, data in a temporary directory.
#
#   scripts/services.sh up     install when missing (and chromium, for the
#                              browser tests), start, wait until healthy
#   scripts/services.sh down   stop exactly what `up` started
#   scripts/services.sh env    print the CIM_TEST_* variables
#
# Ports and the state directory come from the environment:
#   CIM_REDIS_PORT (16379), CIM_ZK_PORT (12181), CIM_SERVICES_DIR (.run/services)
set -euo pipefail

REDIS_PORT=${CIM_REDIS_PORT:-16379}
ZK_PORT=${CIM_ZK_PORT:-12181}
DIR=${CIM_SERVICES_DIR:-$(pwd)/.run/services}
ZK_CLASSPATH="/etc/zookeeper/conf:/usr/share/java/*"

log() { echo "services: $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_missing() {
    local pkgs=()
    command -v redis-server >/dev/null 2>&1 || pkgs+=(redis-server)
    [ -f /usr/share/java/zookeeper.jar ] || pkgs+=(zookeeper)
    command -v java >/dev/null 2>&1 || pkgs+=(default-jre-headless)
    # The web client's browser tests (tests/test_web.py): Debian's browser,
    # which playwright drives (it downloads none), and an emoji font.
    command -v chromium >/dev/null 2>&1 || pkgs+=(chromium)
    [ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || pkgs+=(fonts-noto-color-emoji)
    if [ ${#pkgs[@]} -gt 0 ]; then
        log "installing ${pkgs[*]} from Debian packages"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${pkgs[@]}" >/dev/null
    fi
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

redis_ok() {
    [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]
}

zk_ok() {
    local reply
    reply=$( { exec 3<>"/dev/tcp/127.0.0.1/$ZK_PORT" && printf ruok >&3 \
        && timeout 2 cat <&3; } 2>/dev/null) || return 1
    [ "$reply" = imok ]
}

wait_for() {
    local what=$1 check=$2 deadline=$((SECONDS + 60))
    until $check; do
        if [ $SECONDS -ge $deadline ]; then
            log "$what did not become healthy; its log:"
            tail -n 30 "$DIR/$what.log" >&2 || true
            return 1
        fi
        sleep 0.2
    done
    log "$what is up"
}

up() {
    install_missing
    mkdir -p "$DIR"
    if ! alive "$DIR/redis.pid"; then
        mkdir -p "$DIR/redis-data"
        redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$DIR/redis-data" \
            --appendonly yes --appendfsync everysec --save "" \
            --daemonize yes --pidfile "$DIR/redis.pid" --logfile "$DIR/redis.log"
    fi
    if ! alive "$DIR/zookeeper.pid"; then
        mkdir -p "$DIR/zookeeper-data"
        cat >"$DIR/zoo.cfg" <<CFG
tickTime=500
minSessionTimeout=1000
maxSessionTimeout=60000
initLimit=10
syncLimit=5
dataDir=$DIR/zookeeper-data
clientPort=$ZK_PORT
clientPortAddress=127.0.0.1
admin.enableServer=false
4lw.commands.whitelist=ruok,stat,srvr,mntr
CFG
        nohup java -Xmx256m -Dzookeeper.log.dir="$DIR" -cp "$ZK_CLASSPATH" \
            org.apache.zookeeper.server.ZooKeeperServerMain "$DIR/zoo.cfg" \
            >"$DIR/zookeeper.log" 2>&1 </dev/null &
        echo $! >"$DIR/zookeeper.pid"
    fi
    wait_for redis redis_ok
    wait_for zookeeper zk_ok
    # Healthy, but ours?  A port taken by another process answers too.
    for what in redis zookeeper; do
        if ! alive "$DIR/$what.pid"; then
            log "$what did not start (is its port taken by another process?); its log:"
            tail -n 5 "$DIR/$what.log" >&2 || true
            return 1
        fi
    done
}

stop_pid() {
    local name=$1 pidfile="$DIR/$1.pid"
    if alive "$pidfile"; then
        local pid
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        log "$name stopped"
    fi
    rm -f "$pidfile"
}

down() {
    stop_pid redis
    stop_pid zookeeper
    rm -rf "$DIR/redis-data" "$DIR/zookeeper-data"
}

env_vars() {
    echo "CIM_TEST_REDIS=redis://127.0.0.1:$REDIS_PORT/0"
    echo "CIM_TEST_ZK=zk://127.0.0.1:$ZK_PORT/cim"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    env) env_vars ;;
    *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
