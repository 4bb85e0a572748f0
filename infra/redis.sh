#!/usr/bin/env bash
# Redis from Debian's redis-server, installed when missing, AOF on, data in the project's var/ folder.
#   infra/redis.sh install|start|stop|status
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
# shellcheck source=infra/daemon.sh
source "$here/daemon.sh"

REDIS_HOST="${SHOPRANK_REDIS_HOST:-127.0.0.1}"
REDIS_PORT="${SHOPRANK_REDIS_PORT:-6379}"
VAR="${SHOPRANK_VAR:-$root/var}"
DATA="$VAR/redis"
PIDFILE="$DATA/redis.pid"

die() { echo "redis: $*" >&2; exit 1; }
ping() { redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }
running() { [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

install() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return 0
  [[ "$(id -u)" == 0 ]] || die "redis-server is missing and installing it needs root: apt-get install redis-server"
  echo "redis: installing Debian's redis-server"
  # Keep the package from starting its own system-wide server on 6379: the project runs its own.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' RETURN
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
    || die "apt-get install redis-server failed"
}

start() {
  install
  if running && ping; then echo "redis: already running (pid $(cat "$PIDFILE")) on $REDIS_HOST:$REDIS_PORT"; return 0; fi
  ping && die "port $REDIS_HOST:$REDIS_PORT answers but is not ours: stop that server or set SHOPRANK_REDIS_PORT"
  mkdir -p "$DATA"
  # AOF rewrites fork and rewrite the whole dataset: at the default 64 MB threshold a feature
  # worker at 20,000 events/s triggered one every few seconds (10 in 4 minutes of benchmark),
  # each taking a core for ~2 s and showing in the freshness tail. At 1 GB the file reached 738 MB
  # for 42 MB of data and a restart took 25 s to reload it. 256 MB, rewritten once it doubles
  # (RDB preamble: the rewrite is a snapshot plus the tail): the file stays under 256 MB or twice
  # the last snapshot, seconds to reload; at that rate (~2.7 MB/s of AOF) a rewrite every ~90 s.
  (close_inherited_fds; exec redis-server --bind "$REDIS_HOST" --port "$REDIS_PORT" --dir "$DATA" \
    --appendonly yes --appendfsync everysec --save "" \
    --aof-use-rdb-preamble yes --auto-aof-rewrite-percentage 100 --auto-aof-rewrite-min-size 256mb \
    --daemonize yes --pidfile "$PIDFILE" --logfile "$DATA/redis.log") \
    || die "redis-server failed to start; see $DATA/redis.log"
  # Loading a large AOF takes a while (14 s for a few hundred MB here): wait while it runs.
  for _ in $(seq 1 600); do
    ping && { echo "redis: ready on $REDIS_HOST:$REDIS_PORT (AOF in $DATA)"; return 0; }
    running || break
    sleep 0.2
  done
  die "no answer on $REDIS_HOST:$REDIS_PORT; last lines of $DATA/redis.log:
$(tail -5 "$DATA/redis.log" 2>/dev/null)"
}

stop() {
  if ! running; then echo "redis: not running"; rm -f "$PIDFILE"; return 0; fi
  redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" shutdown >/dev/null 2>&1 || kill "$(cat "$PIDFILE")" 2>/dev/null || true
  for _ in $(seq 1 50); do running || { echo "redis: stopped"; return 0; }; sleep 0.2; done
  die "did not stop in 10 s (pid $(cat "$PIDFILE"))"
}

status() { if running; then echo "redis: running (pid $(cat "$PIDFILE")) on $REDIS_HOST:$REDIS_PORT"; else echo "redis: stopped"; return 1; fi; }

case "${1:-}" in
  install) install ;; start) start ;; stop) stop ;; status) status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
