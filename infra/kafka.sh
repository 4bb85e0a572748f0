#!/usr/bin/env bash
# Apache Kafka, single node, KRaft mode (no ZooKeeper), on loopback.
# Artifacts come from Maven Central (infra/kafka/pom.xml) into a cache folder that later runs reuse;
# data lives in the project's var/ folder so a restart keeps topics and their data.
#   infra/kafka.sh fetch|start|stop|status
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
# shellcheck source=infra/daemon.sh
source "$here/daemon.sh"

KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/kafka/pom.xml")"
KAFKA_HOST="${SHOPRANK_KAFKA_HOST:-127.0.0.1}"
KAFKA_PORT="${SHOPRANK_KAFKA_PORT:-9092}"
CONTROLLER_PORT="${SHOPRANK_KAFKA_CONTROLLER_PORT:-9093}"
CACHE="${SHOPRANK_CACHE:-$HOME/.cache/shoprank}"
LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
VAR="${SHOPRANK_VAR:-$root/var}"
DATA="$VAR/kafka"
PIDFILE="$DATA/kafka.pid"
LOG="$DATA/server.log"
HEAP="${SHOPRANK_KAFKA_HEAP:-768m}"

die() { echo "kafka: $*" >&2; exit 1; }
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
running() { [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

fetch() {
  command -v java >/dev/null || die "Java is missing: install a JDK 17+ (apt-get install openjdk-17-jre-headless)"
  if [[ -f "$LIBS/.complete" ]]; then return 0; fi
  command -v mvn >/dev/null || die "Maven is missing: install it (apt-get install maven) to fetch Kafka $KAFKA_VERSION"
  echo "kafka: fetching org.apache.kafka:kafka_2.13:$KAFKA_VERSION and its dependencies into $LIBS"
  rm -rf "$LIBS"
  mvn -q -B -f "$here/kafka/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$LIBS" || die "mvn could not fetch Kafka $KAFKA_VERSION"
  touch "$LIBS/.complete"
}

java_run() { java -cp "$LIBS/*" -Dlog4j2.configurationFile="$here/kafka/log4j2.yaml" "$@"; }

write_config() {
  mkdir -p "$DATA/logs"
  cat > "$DATA/server.properties" <<CONF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$KAFKA_HOST:$CONTROLLER_PORT
listeners=PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT,CONTROLLER://$KAFKA_HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA/logs
num.partitions=4
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=-1
log.segment.bytes=268435456
CONF
}

start() {
  fetch
  if running; then echo "kafka: already running (pid $(cat "$PIDFILE")) on $KAFKA_HOST:$KAFKA_PORT"; return 0; fi
  for p in "$KAFKA_PORT" "$CONTROLLER_PORT"; do
    port_open "$KAFKA_HOST" "$p" && die "port $KAFKA_HOST:$p is taken by another process (not ours): stop it or set SHOPRANK_KAFKA_PORT / SHOPRANK_KAFKA_CONTROLLER_PORT"
  done
  write_config
  if [[ ! -f "$DATA/logs/meta.properties" ]]; then
    local cluster_id
    cluster_id="$(java_run kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)"
    echo "kafka: formatting storage in $DATA/logs (cluster $cluster_id)"
    java_run kafka.tools.StorageTool format -t "$cluster_id" -c "$DATA/server.properties" >"$DATA/format.log" 2>&1 \
      || die "storage format failed: $(tail -3 "$DATA/format.log")"
  fi
  echo "kafka: starting $KAFKA_VERSION on $KAFKA_HOST:$KAFKA_PORT (data in $DATA)"
  : > "$LOG"
  (close_inherited_fds; exec nohup java -Xms"$HEAP" -Xmx"$HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$here/kafka/log4j2.yaml" -Dkafka.logs.dir="$DATA" \
    -cp "$LIBS/*" kafka.Kafka "$DATA/server.properties") >>"$LOG" 2>&1 &
  echo $! > "$PIDFILE"
  for _ in $(seq 1 120); do
    if ! running; then die "the broker exited during start-up; last lines of $LOG:
$(tail -15 "$LOG")"; fi
    if grep -q "Kafka Server started" "$LOG" && port_open "$KAFKA_HOST" "$KAFKA_PORT"; then
      echo "kafka: ready on $KAFKA_HOST:$KAFKA_PORT"; return 0
    fi
    sleep 0.5
  done
  die "no answer on $KAFKA_HOST:$KAFKA_PORT after 60 s; see $LOG"
}

stop() {
  if ! running; then echo "kafka: not running"; rm -f "$PIDFILE"; return 0; fi
  local pid; pid="$(cat "$PIDFILE")"
  kill "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || { rm -f "$PIDFILE"; echo "kafka: stopped"; return 0; }; sleep 0.5; done
  echo "kafka: did not stop in 30 s, killing" >&2; kill -9 "$pid" 2>/dev/null || true; rm -f "$PIDFILE"
}

status() { if running; then echo "kafka: running (pid $(cat "$PIDFILE")) on $KAFKA_HOST:$KAFKA_PORT"; else echo "kafka: stopped"; return 1; fi; }

case "${1:-}" in
  fetch) fetch ;; start) start ;; stop) stop ;; status) status ;;
  *) echo "usage: $0 fetch|start|stop|status" >&2; exit 2 ;;
esac
