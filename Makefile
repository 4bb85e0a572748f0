# The two commands a newcomer needs: `make demo` (set up, start Kafka and Redis, run the main job)
# and `make test` (set up, start the services, run the tests). Both are idempotent and quick the
# second time: the virtualenv, the Kafka artifacts and Redis are installed only when missing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The stamp names this checkout: a virtualenv shared by several clones (CI) is pointed at each anew.
STAMP := $(VENV)/.installed-$(shell printf %s "$(CURDIR)" | md5sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1
# Scripts under infra/ call the project's Python (e.g. Prometheus's configuration): this virtualenv's.
export SHOPRANK_PYTHON := $(abspath $(BIN))/python

.PHONY: help venv up down status topics demo test lint eval bench-streams bench-scorer bench-scorer-gpu bench-trainer bench-swap loop-eval bench-personal clean-data up-cluster down-cluster status-cluster test-cluster bench-chaos up-redis-cluster down-redis-cluster

help:
	@echo "make demo    set up everything, start Kafka and Redis, replay the Best Buy data, show results"
	@echo "make test    set up everything, start Kafka and Redis, run the test suite"
	@echo "make up / down / status    start, stop, inspect the local Kafka, Redis and Prometheus"
	@echo "make up-cluster / down-cluster    3 Kafka brokers (KRaft) + Redis primary, replica, 3 Sentinels"
	@echo "make up-redis-cluster / down-redis-cluster    Redis Cluster: 3 primaries, a replica each"
	@echo "make lint    ruff"
	@echo "make eval    measure ranking quality on the real data, write bench/results/quality.json"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	@touch $(STAMP)

up: venv
	@infra/redis.sh start
	@infra/kafka.sh start
	@$(BIN)/shoprank topics
	@if $(BIN)/python -m shoprank.monitoring enabled; then infra/prometheus.sh start; \
	else echo "prometheus: not started (SHOPRANK_PROMETHEUS_ENABLED=0)"; fi

down:
	@infra/prometheus.sh stop
	@infra/kafka.sh stop
	@infra/redis.sh stop

status:
	@infra/kafka.sh status || true
	@infra/redis.sh status || true
	@infra/prometheus.sh status || true

topics: venv
	$(BIN)/shoprank topics

demo: up
	$(BIN)/shoprank demo

# The replicated topology runs beside the single node (its own loopback ports): the failover
# tests (tests/test_cluster.py) use it, the rest of the suite the single node.
test: up up-cluster up-redis-cluster
	@infra/browser.sh install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Replicated Kafka and Redis on loopback (ports in infra/kafka-cluster.sh, infra/redis-sentinel.sh);
# the engine's settings for it are written to var/cluster.env (set -a; . var/cluster.env; set +a).
CLUSTER_ENV := var/cluster.env
up-cluster: venv
	@infra/redis-sentinel.sh start
	@infra/kafka-cluster.sh start
	@{ infra/kafka-cluster.sh env; infra/redis-sentinel.sh env; \
	   echo SHOPRANK_TOPIC_REPLICATION_FACTOR=3; echo SHOPRANK_TOPIC_MIN_INSYNC_REPLICAS=2; \
	   echo "# a Redis command retried for about 12 s (jittered): through a Sentinel failover (5 s down-after, then the vote)"; \
	   echo SHOPRANK_REDIS_RETRIES=30; } > $(CLUSTER_ENV)
	@set -a; . ./$(CLUSTER_ENV); set +a; $(BIN)/shoprank topics >/dev/null
	@echo "cluster: settings in $(CLUSTER_ENV)"

down-cluster:
	@infra/kafka-cluster.sh stop
	@infra/redis-sentinel.sh stop

# Redis Cluster on loopback (3 primaries, a replica each; ports in infra/redis-cluster.sh): the
# feature state sharded by owner. Its settings go to var/redis-cluster.env; the tests on it use it
# directly (SHOPRANK_TEST_REDIS_CLUSTER_URL).
REDIS_CLUSTER_ENV := var/redis-cluster.env
up-redis-cluster: venv
	@infra/redis-cluster.sh start
	@infra/redis-cluster.sh env > $(REDIS_CLUSTER_ENV)
	@echo "redis-cluster: settings in $(REDIS_CLUSTER_ENV)"

down-redis-cluster:
	@infra/redis-cluster.sh stop

status-cluster:
	@infra/kafka-cluster.sh status || true
	@infra/redis-sentinel.sh status || true

test-cluster: up-cluster
	$(BIN)/python -m pytest -q tests/test_cluster.py $(PYTEST_ARGS)

# SIGKILL one process at a time (a broker, the Redis primary, a feature worker, a scorer, the
# trainer) under steady load on the cluster, then restart it: unanswered, duplicate results, lost
# and double-counted events, the longest gap and the recovery per fault -> bench/results/chaos.json.
bench-chaos: up-cluster
	$(BIN)/python -m bench.chaos $(BENCH_ARGS)

lint: venv
	$(BIN)/ruff check .

# Baselines, then the model rows: train on the Best Buy training period, evaluate through the
# served path, promote the version unless it is worse than the one serving (what `make demo`
# serves), the same model without shopper features, and CrowdFlower's 10-fold fine-tuning.
eval: up
	$(BIN)/shoprank eval
	$(BIN)/shoprank train --ablation --crowdflower

bench-streams: up
	$(BIN)/python -m bench.streams $(BENCH_ARGS)

# The scorer through Kafka on this CPU: p50/p99 at 100 queries/s, max sustained rate, naive eager
# torch baseline, RSS; 100 candidates per query; about 6-8 minutes -> bench/results/scorer.json.
bench-scorer: up
	$(BIN)/python -m bench.scorer $(BENCH_ARGS)

# Hot swaps under load on this CPU: 100 queries/s through Kafka, 5 minutes without swaps, then 5
# minutes with a version announced every 2.5 s (two real-size MiniLM versions in turn, a corrupt
# one every 10th time): dropped, duplicates, p99 steady vs swapping, RSS after 10 swaps vs the end,
# every corrupt one rejected; about 13 minutes -> bench/results/swap.json.
bench-swap: up
	$(BIN)/python -m bench.swap $(BENCH_ARGS)

# The closed loop on this CPU: a zero-shot version serves the Best Buy training period replayed in
# event time through the running engine (feature worker, embedder, joiner, scorer), then one
# `shoprank trainer --once` cycle on the labeled lists; ~15 minutes -> bench/results/trainer.json.
bench-trainer: up
	$(BIN)/python -m bench.trainer $(BENCH_ARGS)

# Proof in event time: Best Buy's test period replayed through the running engine (feature worker,
# joiner, two scorers, the continuous trainer at each simulated day), each search ranked before its
# clicks exist; static version vs continuous loop vs online query table, from the results topics
# -> bench/results/loop.json and loop_*.png. The served version is trained first when none serves.
# Quick: make loop-eval BENCH_ARGS="--days 2 --label-days 7".
loop-eval: up
	$(BIN)/shoprank train --if-missing --no-announce --quiet
	$(BIN)/python -m bench.loop $(BENCH_ARGS)

# Personalization (issue 18): Best Buy's returning-shopper and in-session slices with vs without
# shopper features (a version without them, trained once; one without the validation period's
# clicks, which chooses the session weights, trained once per served version; ~8 min each on a
# 2-core host; walks cached in var/personal), then the
# SIMULATION of shoppers through an engine of its own -> bench/results/personalization.json and
# simulation.json. Both hold the benchmarks' lock. Quick sim: SIM_ARGS="--shoppers 40 --days 2".
bench-personal: up
	flock -o /tmp/shoprank-heavy.lock $(BIN)/python -m bench.personal real
	flock -o /tmp/shoprank-heavy.lock $(BIN)/python -m bench.personal sim $(SIM_ARGS)

# The model path on a lent GPU machine (stage 1 CPU vs CUDA fp16, cross-encoder re-rank of the
# top 100). This prepares var/gpu-bundle here; then, with the device tool (one call, ~3 minutes):
#   run(command="bash bench/gpu.sh run", carry=["var/gpu-bundle"], timeout_s=420)
# and copy the returned scorer_gpu.json to bench/results/.
bench-scorer-gpu: venv
	bash bench/gpu.sh prepare $(BENCH_ARGS)
