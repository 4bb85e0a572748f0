#!/usr/bin/env bash
# Apache Kafka, 3 brokers in KRaft mode on loopback: each process is broker and controller, the
# three are the controller quorum's voters. Same Maven artifacts as infra/kafka.sh (its cache),
# data under var/kafka-cluster/<node>. Replication defaults: factor 3, min.insync.replicas 2.
#   infra/kafka-cluster.sh start|stop|status|env
#   infra/kafka-cluster.sh start-node N|kill-node N|pid N     (N = 1..3; the chaos bench uses these)
# Settings (environment): SHOPRANK_CLUSTER_KAFKA_PORTS (client ports, default 19092,19093,19094),
# SHOPRANK_CLUSTER_CONTROLLER_PORTS (19192,19193,19194), SHOPRANK_CLUSTER_KAFKA_HEAP (512m each),
# SHOPRANK_KAFKA_HOST (127.0.0.1).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"

KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/kafka/pom.xml")"
HOST="${SHOPRANK_KAFKA_HOST:-127.0.0.1}"
IFS=, read -r -a PORTS <<< "${SHOPRANK_CLUSTER_KAFKA_PORTS:-19092,19093,19094}"
IFS=, read -r -a CPORTS <<< "${SHOPRANK_CLUSTER_CONTROLLER_PORTS:-19192,19193,19194}"
CACHE="${SHOPRANK_CACHE:-$HOME/.cache/shoprank}"
LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
VAR="${SHOPRANK_VAR:-$root/var}"
BASE="$VAR/kafka-cluster"
HEAP="${SHOPRANK_CLUSTER_KAFKA_HEAP:-512m}"
N=${#PORTS[@]}

die() { echo "kafka-cluster: $*" >&2; exit 1; }
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
[[ $N -eq ${#CPORTS[@]} ]] || die "SHOPRANK_CLUSTER_KAFKA_PORTS and SHOPRANK_CLUSTER_CONTROLLER_PORTS name different counts"
[[ $N -ge 3 ]] || die "a replicated cluster needs at least 3 brokers (replication factor 3, min ISR 2)"
dir() { echo "$BASE/node$1"; }
pidfile() { echo "$(dir "$1")/kafka.pid"; }
running() { [[ -f "$(pidfile "$1")" ]] && kill -0 "$(cat "$(pidfile "$1")")" 2>/dev/null; }
bootstrap() { local out=() i; for i in "${!PORTS[@]}"; do out+=("$HOST:${PORTS[$i]}"); done; (IFS=,; echo "${out[*]}"); }
voters() { local out=() i; for i in "${!CPORTS[@]}"; do out+=("$((i + 1))@$HOST:${CPORTS[$i]}"); done; (IFS=,; echo "${out[*]}"); }

write_config() {  # node id (1-based)
  local n=$1 d; d="$(dir "$n")"
  mkdir -p "$d/logs"
  cat > "$d/server.properties" <<CONF
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$(voters)
listeners=PLAINTEXT://$HOST:${PORTS[$((n - 1))]},CONTROLLER://$HOST:${CPORTS[$((n - 1))]}
advertised.listeners=PLAINTEXT://$HOST:${PORTS[$((n - 1))]}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$d/logs
num.partitions=4
default.replication.factor=3
min.insync.replicas=2
unclean.leader.election.enable=false
auto.create.topics.enable=false
offsets.topic.replication.factor=3
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
group.initial.rebalance.delay.ms=0
log.retention.hours=-1
log.segment.bytes=268435456
# A killed broker's partitions move to the others once the controllers miss its heartbeats
# (KRaft: broker.session.timeout.ms); 6 s instead of 9 s, above the GC pauses of a shared box.
broker.session.timeout.ms=6000
broker.heartbeat.interval.ms=1000
CONF
}

format() {  # node id, cluster id
  local n=$1 d; d="$(dir "$n")"
  [[ -f "$d/logs/meta.properties" ]] && return 0
  java -cp "$LIBS/*" -Dlog4j2.configurationFile="$here/kafka/log4j2.yaml" kafka.tools.StorageTool \
    format -t "$2" -c "$d/server.properties" >"$d/format.log" 2>&1 \
    || die "node $n: storage format failed: $(tail -3 "$d/format.log")"
}

launch() {  # node id: start the JVM, do not wait
  local n=$1 d; d="$(dir "$n")"
  if running "$n"; then return 0; fi
  for p in "${PORTS[$((n - 1))]}" "${CPORTS[$((n - 1))]}"; do
    port_open "$HOST" "$p" && die "port $HOST:$p is taken by another process (not ours): stop it or set SHOPRANK_CLUSTER_KAFKA_PORTS / SHOPRANK_CLUSTER_CONTROLLER_PORTS"
  done
  write_config "$n"
  : > "$d/server.log"
  nohup java -Xms"$HEAP" -Xmx"$HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$here/kafka/log4j2.yaml" -Dkafka.logs.dir="$d" \
    -cp "$LIBS/*" kafka.Kafka "$d/server.properties" >>"$d/server.log" 2>&1 &
  echo $! > "$(pidfile "$n")"
}

wait_ready() {  # node ids...
  local n
  for _ in $(seq 1 240); do
    local pending=0
    for n in "$@"; do
      running "$n" || die "broker $n exited during start-up; last lines of $(dir "$n")/server.log:
$(tail -15 "$(dir "$n")/server.log")"
      if ! { grep -q "Kafka Server started" "$(dir "$n")/server.log" && port_open "$HOST" "${PORTS[$((n - 1))]}"; }; then
        pending=1
      fi
    done
    [[ $pending -eq 0 ]] && return 0
    sleep 0.5
  done
  die "brokers $* not ready after 120 s; see $BASE/node*/server.log"
}

start() {
  "$here/kafka.sh" fetch
  mkdir -p "$BASE"
  local cluster_id n nodes=()
  if [[ -f "$BASE/cluster.id" ]]; then cluster_id="$(cat "$BASE/cluster.id")"; else
    cluster_id="$(java -cp "$LIBS/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)"
    echo "$cluster_id" > "$BASE/cluster.id"
  fi
  for n in $(seq 1 "$N"); do
    nodes+=("$n")
    if running "$n"; then continue; fi
    write_config "$n"; format "$n" "$cluster_id"
  done
  # All at once: a controller quorum forms once a majority of voters is up.
  local down=0
  for n in "${nodes[@]}"; do running "$n" || down=$((down + 1)); launch "$n"; done
  [[ $down -gt 0 ]] && echo "kafka-cluster: starting $down of $N brokers ($KAFKA_VERSION, heap $HEAP each) on $(bootstrap) (data in $BASE)"
  wait_ready "${nodes[@]}"
  echo "kafka-cluster: ready on $(bootstrap)"
}

start_node() {
  local n=$1
  [[ -f "$(dir "$n")/logs/meta.properties" ]] || die "node $n was never formatted: run start first"
  launch "$n"; wait_ready "$n"
  echo "kafka-cluster: broker $n ready on $HOST:${PORTS[$((n - 1))]}"
}

kill_node() {  # SIGKILL, no controlled shutdown: what a crash looks like
  local n=$1
  running "$n" || { echo "kafka-cluster: broker $n not running"; return 0; }
  local pid; pid="$(cat "$(pidfile "$n")")"
  kill -9 "$pid"
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$(pidfile "$n")"
  echo "kafka-cluster: broker $n killed (pid $pid)"
}

stop() {
  local n pids=()
  for n in $(seq 1 "$N"); do running "$n" && { pids+=("$(cat "$(pidfile "$n")")"); kill "${pids[-1]}"; }; done
  [[ ${#pids[@]} -eq 0 ]] && { echo "kafka-cluster: not running"; return 0; }
  for _ in $(seq 1 60); do
    local alive=0 p
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [[ $alive -eq 0 ]] && break
    sleep 0.5
  done
  # The last brokers of a stopping quorum may wait for controllers already gone: SIGKILL them.
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && kill -9 "$p" 2>/dev/null || true; done
  for n in $(seq 1 "$N"); do rm -f "$(pidfile "$n")"; done
  echo "kafka-cluster: stopped"
}

status() {
  local n up=0
  for n in $(seq 1 "$N"); do
    if running "$n"; then up=$((up + 1)); echo "kafka-cluster: broker $n running (pid $(cat "$(pidfile "$n")")) on $HOST:${PORTS[$((n - 1))]}"
    else echo "kafka-cluster: broker $n stopped"; fi
  done
  [[ $up -eq $N ]]
}

case "${1:-}" in
  start) start ;; stop) stop ;; status) status ;;
  env) echo "SHOPRANK_KAFKA_BOOTSTRAP_SERVERS=$(bootstrap)" ;;
  start-node) start_node "${2:?node}" ;; kill-node) kill_node "${2:?node}" ;;
  pid) running "${2:?node}" && cat "$(pidfile "$2")" ;;
  *) echo "usage: $0 start|stop|status|env|start-node N|kill-node N|pid N" >&2; exit 2 ;;
esac
