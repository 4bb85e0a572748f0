#!/usr/bin/env bash
# Prometheus from Debian's prometheus package, installed when missing, data in the project's var/
# folder. It scrapes the scorer, the feature workers, the joiner and the trainer on the ports their
# settings name, and evaluates infra/prometheus/alerts.yml. The configuration is generated from the
# settings at each start (python -m shoprank.monitoring config) into var/prometheus/prometheus.yml.
#   infra/prometheus.sh install|start|stop|status|config
# `make up` starts it unless SHOPRANK_PROMETHEUS_ENABLED=0.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"

VAR="${SHOPRANK_VAR:-$root/var}"
DATA="$VAR/prometheus"
PIDFILE="$DATA/prometheus.pid"
LOG="$DATA/prometheus.log"
CONFIG="$DATA/prometheus.yml"
PY="${SHOPRANK_PYTHON:-$root/.venv/bin/python}"

die() { echo "prometheus: $*" >&2; exit 1; }
running() { [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }
# host, port and retention from the settings (SHOPRANK_PROMETHEUS_HOST/PORT/RETENTION).
setting() { "$PY" -m shoprank.monitoring get "$1"; }

install() {
  command -v prometheus >/dev/null && command -v promtool >/dev/null && return 0
  [[ "$(id -u)" == 0 ]] || die "prometheus is missing and installing it needs root: apt-get install prometheus"
  echo "prometheus: installing Debian's prometheus"
  # Keep the package from starting its own system-wide server on 9090: the project runs its own.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' RETURN
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    prometheus >/dev/null) || die "apt-get install prometheus failed"
}

config() {
  mkdir -p "$DATA"
  "$PY" -m shoprank.monitoring config > "$CONFIG.tmp" || die "could not generate $CONFIG"
  promtool check config "$CONFIG.tmp" >/dev/null || die "generated configuration is invalid: $(promtool check config "$CONFIG.tmp" 2>&1 | tail -3)"
  mv "$CONFIG.tmp" "$CONFIG"
}

start() {
  install
  local host port url
  host="$(setting host)"; port="$(setting port)"; url="http://$host:$port"
  if running; then echo "prometheus: already running (pid $(cat "$PIDFILE")) on $url"; return 0; fi
  curl -fsS -o /dev/null "$url/-/ready" 2>/dev/null \
    && die "$url answers but is not ours: stop that server or set SHOPRANK_PROMETHEUS_PORT"
  config
  # setsid: its own session, so the shell that ran `make up` can end without taking it along; no
  # descriptor but stdio inherited (under `flock /tmp/shoprank-heavy.lock make ...` the daemon
  # would otherwise hold the benchmarks' lock for as long as it runs).
  local retention; retention="$(setting retention)"
  setsid bash -c 'for fd in /proc/$$/fd/*; do n=${fd##*/}; (( n > 2 )) && eval "exec $n>&-"; done 2>/dev/null
    exec "$@"' prometheus prometheus --config.file="$CONFIG" --storage.tsdb.path="$DATA/tsdb" \
    --storage.tsdb.retention.time="$retention" --web.listen-address="$host:$port" \
    --web.enable-lifecycle >>"$LOG" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  for _ in $(seq 1 100); do
    running || die "exited at start; last lines of $LOG:
$(tail -5 "$LOG" 2>/dev/null)"
    curl -fsS -o /dev/null "$url/-/ready" 2>/dev/null \
      && { echo "prometheus: ready on $url (config $CONFIG, data in $DATA/tsdb)"; return 0; }
    sleep 0.2
  done
  die "no answer on $url after 20 s; last lines of $LOG:
$(tail -5 "$LOG" 2>/dev/null)"
}

stop() {
  if ! running; then echo "prometheus: not running"; rm -f "$PIDFILE"; return 0; fi
  kill "$(cat "$PIDFILE")" 2>/dev/null || true
  for _ in $(seq 1 100); do running || { echo "prometheus: stopped"; rm -f "$PIDFILE"; return 0; }; sleep 0.2; done
  die "did not stop in 20 s (pid $(cat "$PIDFILE"))"
}

status() {
  if running; then echo "prometheus: running (pid $(cat "$PIDFILE")) on http://$(setting host):$(setting port)"
  else echo "prometheus: stopped"; return 1; fi
}

case "${1:-}" in
  install) install ;; start) start ;; stop) stop ;; status) status ;; config) config; echo "$CONFIG" ;;
  *) echo "usage: $0 install|start|stop|status|config" >&2; exit 2 ;;
esac
