#!/usr/bin/env bash
# A Redis Cluster on loopback: 3 primaries, each with a replica (Debian's redis-server, installed
# when missing), data under var/redis-shards/<port>. Created once (redis-cli --cluster create);
# afterwards each node's nodes.conf remembers its slots and role, and a restart rejoins them.
#   infra/redis-cluster.sh start|stop|status|env
# Settings (environment): SHOPRANK_REDIS_CLUSTER_PORTS (6 or more, the first half primaries at
# creation; default 17000..17005), SHOPRANK_REDIS_CLUSTER_SHARDS (the feature state's owner
# shards the env line proposes: 6, two per primary), SHOPRANK_REDIS_HOST (127.0.0.1).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
# shellcheck source=infra/daemon.sh
source "$here/daemon.sh"

HOST="${SHOPRANK_REDIS_HOST:-127.0.0.1}"
IFS=, read -r -a PORTS <<< "${SHOPRANK_REDIS_CLUSTER_PORTS:-17000,17001,17002,17003,17004,17005}"
SHARDS="${SHOPRANK_REDIS_CLUSTER_SHARDS:-6}"
VAR="${SHOPRANK_VAR:-$root/var}"
BASE="$VAR/redis-shards"

die() { echo "redis-cluster: $*" >&2; exit 1; }
cli() { local port=$1; shift; redis-cli -h "$HOST" -p "$port" "$@" 2>/dev/null; }
dir() { echo "$BASE/$1"; }
pidfile() { echo "$(dir "$1")/redis.pid"; }
running() { [[ -f "$(pidfile "$1")" ]] && kill -0 "$(cat "$(pidfile "$1")")" 2>/dev/null; }
answers() { cli "$1" ping | grep -q PONG; }
cluster_ok() { cli "$1" cluster info | grep -q "cluster_state:ok"; }
roles() { cli "${PORTS[0]}" cluster nodes | awk -v r="$1" '$3 ~ r' | wc -l; }

start_node() {
  local port=$1 d; d="$(dir "$port")"
  if running "$port" && answers "$port"; then return 0; fi
  answers "$port" && die "port $HOST:$port answers but is not ours: stop that server or set SHOPRANK_REDIS_CLUSTER_PORTS"
  mkdir -p "$d"
  # AOF with an RDB preamble (as infra/redis.sh); the node timeout is how long a silent primary
  # is down before its replica takes over.
  (close_inherited_fds; exec redis-server --bind "$HOST" --port "$port" --dir "$d" \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 5000 \
    --cluster-announce-ip "$HOST" --appendonly yes --appendfsync everysec --save "" \
    --aof-use-rdb-preamble yes --auto-aof-rewrite-percentage 100 --auto-aof-rewrite-min-size 64mb \
    --daemonize yes --pidfile "$(pidfile "$port")" --logfile "$d/redis.log") \
    || die "redis-server on $port failed; see $d/redis.log"
  for _ in $(seq 1 600); do
    answers "$port" && return 0
    running "$port" || cli "$port" ping | grep -q LOADING || break
    sleep 0.2
  done
  die "$HOST:$port did not answer; last lines of its log:
$(tail -5 "$d/redis.log" 2>/dev/null)"
}

start() {
  (( ${#PORTS[@]} >= 6 )) || die "a cluster with a replica per primary needs 6 ports or more"
  "$here/redis.sh" install
  local port
  for port in "${PORTS[@]}"; do start_node "$port"; done
  # Slots assigned already (an earlier start): the nodes rejoin by themselves.
  if [[ "$(cli "${PORTS[0]}" cluster info | awk -F: '/cluster_slots_assigned/ {print $2}' | tr -d '\r')" != "16384" ]]; then
    local addrs=()
    for port in "${PORTS[@]}"; do addrs+=("$HOST:$port"); done
    echo "redis-cluster: creating the cluster on ${PORTS[*]}"
    redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >/dev/null \
      || die "redis-cli --cluster create failed"
  fi
  for _ in $(seq 1 300); do
    local ok=1
    for port in "${PORTS[@]}"; do cluster_ok "$port" || { ok=0; break; }; done
    # Ready once every replica follows its primary, too.
    if [[ $ok -eq 1 && "$(roles slave)" -eq $(( ${#PORTS[@]} / 2 )) ]]; then
      echo "redis-cluster: ready on ${PORTS[*]} ($(roles master) primaries, $(roles slave) replicas)"
      return 0
    fi
    sleep 0.2
  done
  die "the cluster did not reach state ok within 60 s; see $BASE/*/redis.log"
}

stop() {
  local port any=0
  for port in "${PORTS[@]}"; do
    running "$port" || continue
    any=1
    cli "$port" shutdown >/dev/null || kill "$(cat "$(pidfile "$port")")" 2>/dev/null || true
    for _ in $(seq 1 50); do running "$port" || break; sleep 0.2; done
    running "$port" && die "$port did not stop in 10 s"
    rm -f "$(pidfile "$port")"
  done
  [[ $any -eq 1 ]] && echo "redis-cluster: stopped" || echo "redis-cluster: not running"
}

status() {
  local port up=0
  for port in "${PORTS[@]}"; do
    if running "$port"; then
      up=$((up + 1))
      echo "redis-cluster: $port running as $(cli "$port" role | head -1) (pid $(cat "$(pidfile "$port")"))"
    else echo "redis-cluster: $port stopped"; fi
  done
  [[ $up -eq ${#PORTS[@]} ]]
}

env_() {
  echo "SHOPRANK_REDIS_URL=redis://$HOST:${PORTS[0]}/0"
  echo "SHOPRANK_REDIS_CLUSTER=1"
  echo "SHOPRANK_FEATURES_SHARDS=$SHARDS"
}

case "${1:-}" in
  start) start ;; stop) stop ;; status) status ;; env) env_ ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
