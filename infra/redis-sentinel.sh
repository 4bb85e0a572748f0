#!/usr/bin/env bash
# Redis replicated on loopback: a primary, a replica and 3 Sentinels (Debian's redis-server and
# redis-sentinel, installed when missing), data under var/redis-cluster/<port>. After a failover
# the roles stay where Sentinel put them: each server's config file is rewritten by Sentinel, and
# a restarted former primary rejoins as a replica.
#   infra/redis-sentinel.sh start|stop|status|env|primary
#   infra/redis-sentinel.sh start-node PORT|kill-node PORT|pid PORT   (the chaos bench uses these)
# Settings (environment): SHOPRANK_CLUSTER_REDIS_PORTS (primary first, then replicas; default
# 16379,16380), SHOPRANK_CLUSTER_SENTINEL_PORTS (26379,26380,26381), SHOPRANK_REDIS_SENTINEL_MASTER
# (shoprank), SHOPRANK_CLUSTER_SENTINEL_DOWN_MS (5000: how long a silent primary is down before a
# failover; 2000 failed over a primary that a starved 2-core host kept from answering in time),
# SHOPRANK_REDIS_HOST (127.0.0.1).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"

HOST="${SHOPRANK_REDIS_HOST:-127.0.0.1}"
IFS=, read -r -a PORTS <<< "${SHOPRANK_CLUSTER_REDIS_PORTS:-16379,16380}"
IFS=, read -r -a SPORTS <<< "${SHOPRANK_CLUSTER_SENTINEL_PORTS:-26379,26380,26381}"
MASTER="${SHOPRANK_REDIS_SENTINEL_MASTER:-shoprank}"
DOWN_MS="${SHOPRANK_CLUSTER_SENTINEL_DOWN_MS:-5000}"
QUORUM=$(( ${#SPORTS[@]} / 2 + 1 ))
VAR="${SHOPRANK_VAR:-$root/var}"
BASE="$VAR/redis-cluster"

die() { echo "redis-sentinel: $*" >&2; exit 1; }
cli() { local port=$1; shift; redis-cli -h "$HOST" -p "$port" "$@" 2>/dev/null; }
dir() { echo "$BASE/$1"; }
pidfile() { echo "$(dir "$1")/redis.pid"; }
running() { [[ -f "$(pidfile "$1")" ]] && kill -0 "$(cat "$(pidfile "$1")")" 2>/dev/null; }
answers() { cli "$1" ping | grep -q PONG; }
# A server loading its append-only file answers LOADING, not PONG: it is starting, not absent.
loading() { cli "$1" ping | grep -q LOADING; }
is_sentinel() { local p; for p in "${SPORTS[@]}"; do [[ "$p" == "$1" ]] && return 0; done; return 1; }

install() {
  command -v redis-server >/dev/null && command -v redis-sentinel >/dev/null && command -v redis-cli >/dev/null && return 0
  [[ "$(id -u)" == 0 ]] || die "redis-server / redis-sentinel missing and installing needs root: apt-get install redis-server redis-sentinel"
  echo "redis-sentinel: installing Debian's redis-server and redis-sentinel"
  # Keep the packages from starting their own system-wide services: the project runs its own.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' RETURN
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-sentinel >/dev/null) \
    || die "apt-get install redis-server redis-sentinel failed"
}

write_configs() {  # once: afterwards Sentinel owns them (CONFIG REWRITE after each failover)
  local port d i
  for i in "${!PORTS[@]}"; do
    port=${PORTS[$i]}; d="$(dir "$port")"; mkdir -p "$d"
    [[ -f "$d/redis.conf" ]] && continue
    {
      echo "bind $HOST"; echo "port $port"; echo "dir $d"
      echo "pidfile $d/redis.pid"; echo "logfile $d/redis.log"; echo "daemonize yes"
      # AOF with an RDB preamble, rewritten at twice its size after the last rewrite (64 MB at
      # least): the file stays a small multiple of the data, so a restart reloads in seconds.
      echo "appendonly yes"; echo "appendfsync everysec"; echo "aof-use-rdb-preamble yes"
      echo "auto-aof-rewrite-percentage 100"; echo "auto-aof-rewrite-min-size 64mb"; echo 'save ""'
      echo "replica-read-only yes"
      echo "replica-announce-ip $HOST"
      [[ $i -gt 0 ]] && echo "replicaof $HOST ${PORTS[0]}"
    } > "$d/redis.conf"
  done
  for port in "${SPORTS[@]}"; do
    d="$(dir "$port")"; mkdir -p "$d"
    [[ -f "$d/sentinel.conf" ]] && continue
    cat > "$d/sentinel.conf" <<CONF
bind $HOST
port $port
dir $d
pidfile $d/redis.pid
logfile $d/sentinel.log
daemonize yes
sentinel announce-ip $HOST
sentinel monitor $MASTER $HOST ${PORTS[0]} $QUORUM
sentinel down-after-milliseconds $MASTER $DOWN_MS
sentinel failover-timeout $MASTER 10000
sentinel parallel-syncs $MASTER 1
CONF
  done
}

wait_up() {  # port: until it answers PONG; a loading server is waited for, never started twice
  local port=$1 i
  for i in $(seq 1 600); do
    answers "$port" && return 0
    if ! running "$port" && ! loading "$port"; then
      die "$HOST:$port exited during start-up; last lines of its log:
$(tail -5 "$(dir "$port")"/*.log 2>/dev/null)"
    fi
    [[ $((i % 25)) -eq 0 ]] && loading "$port" && echo "redis-sentinel: $HOST:$port is loading its data, waiting"
    sleep 0.2
  done
  die "$HOST:$port did not answer within 120 s; see $(dir "$port")"
}

start_node() {
  local port=$1 d; d="$(dir "$port")"
  if running "$port"; then wait_up "$port"; return 0; fi
  if answers "$port" || loading "$port"; then
    die "port $HOST:$port answers but is not ours: stop that server or set SHOPRANK_CLUSTER_REDIS_PORTS / SHOPRANK_CLUSTER_SENTINEL_PORTS"
  fi
  if is_sentinel "$port"; then
    redis-sentinel "$d/sentinel.conf" || die "redis-sentinel on $port failed; see $d/sentinel.log"
  else
    redis-server "$d/redis.conf" || die "redis-server on $port failed; see $d/redis.log"
  fi
  wait_up "$port"
}

primary() {  # host:port of the current primary, as the Sentinels say
  local p addr
  for p in "${SPORTS[@]}"; do
    addr="$(cli "$p" sentinel get-master-addr-by-name "$MASTER" | paste -sd: -)" || continue
    [[ -n "$addr" ]] && { echo "$addr"; return 0; }
  done
  return 1
}

start() {
  install
  write_configs
  local port
  for port in "${PORTS[@]}" "${SPORTS[@]}"; do start_node "$port"; done
  # The setting wins over what an earlier start wrote (Sentinel owns its file afterwards).
  for port in "${SPORTS[@]}"; do cli "$port" sentinel set "$MASTER" down-after-milliseconds "$DOWN_MS" >/dev/null; done
  # Ready once the replicas are in sync and a Sentinel names the primary.
  local addr=""
  for _ in $(seq 1 150); do
    addr="$(primary || true)"
    if [[ -n "$addr" ]] && cli "${addr##*:}" info replication | grep -q "connected_slaves:$(( ${#PORTS[@]} - 1 ))"; then
      echo "redis-sentinel: ready: primary $addr, $(( ${#PORTS[@]} - 1 )) replica(s), sentinels on ${SPORTS[*]} (master name $MASTER)"
      return 0
    fi
    sleep 0.2
  done
  die "replication not established within 30 s (primary: ${addr:-unknown}); see $BASE/*/*.log"
}

kill_node() {
  local port=$1
  running "$port" || { echo "redis-sentinel: $port not running"; return 0; }
  local pid; pid="$(cat "$(pidfile "$port")")"
  kill -9 "$pid"
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$(pidfile "$port")"
  echo "redis-sentinel: $port killed (pid $pid)"
}

stop() {
  local port any=0
  # Sentinels first, so stopping the primary does not start a failover.
  for port in "${SPORTS[@]}" "${PORTS[@]}"; do
    running "$port" || continue
    any=1
    cli "$port" shutdown >/dev/null || kill "$(cat "$(pidfile "$port")")" 2>/dev/null || true
    for _ in $(seq 1 50); do running "$port" || break; sleep 0.2; done
    running "$port" && die "$port did not stop in 10 s (pid $(cat "$(pidfile "$port")"))"
    rm -f "$(pidfile "$port")"
  done
  [[ $any -eq 1 ]] && echo "redis-sentinel: stopped" || echo "redis-sentinel: not running"
}

status() {
  local port up=0
  for port in "${PORTS[@]}" "${SPORTS[@]}"; do
    if running "$port"; then
      up=$((up + 1))
      if is_sentinel "$port"; then echo "redis-sentinel: sentinel $port running (pid $(cat "$(pidfile "$port")"))"
      else echo "redis-sentinel: redis $port running as $(cli "$port" role | head -1) (pid $(cat "$(pidfile "$port")"))"; fi
    else echo "redis-sentinel: $port stopped"; fi
  done
  [[ $up -eq $(( ${#PORTS[@]} + ${#SPORTS[@]} )) ]]
}

env_() {
  local out=() p
  for p in "${SPORTS[@]}"; do out+=("$HOST:$p"); done
  echo "SHOPRANK_REDIS_SENTINELS=$(IFS=,; echo "${out[*]}")"
  echo "SHOPRANK_REDIS_SENTINEL_MASTER=$MASTER"
}

case "${1:-}" in
  install) install ;; start) start ;; stop) stop ;; status) status ;; env) env_ ;; primary) primary ;;
  start-node) start_node "${2:?port}" ;; kill-node) kill_node "${2:?port}" ;;
  pid) running "${2:?port}" && cat "$(pidfile "$2")" ;;
  *) echo "usage: $0 start|stop|status|env|primary|start-node PORT|kill-node PORT|pid PORT" >&2; exit 2 ;;
esac
