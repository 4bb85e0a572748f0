"""One frozen settings object, read from the environment (prefix ``SHOPRANK_``).

Each group has its own prefix so a variable names its group: ``SHOPRANK_KAFKA_BOOTSTRAP_SERVERS``,
``SHOPRANK_REDIS_URL``, ``SHOPRANK_TOPIC_QUERIES``. The README lists them all. Build it with
:func:`load_settings` at an entry point and pass it down; nothing reads the environment elsewhere.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent


def _group(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=prefix, frozen=True, extra="ignore")


class KafkaSettings(BaseSettings):
    """Broker connection, including SASL/SSL for managed clusters."""

    model_config = _group("SHOPRANK_KAFKA_")

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    client_id: str = "shoprank"

    def librdkafka(self) -> dict[str, Any]:
        """Connection settings in librdkafka's vocabulary (confluent-kafka)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            "client.id": self.client_id,
        }
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password.get_secret_value() if self.sasl_password else None,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
        }
        conf.update({k: v for k, v in optional.items() if v is not None})
        return conf


class RedisSettings(BaseSettings):
    """Feature store connection. ``rediss://`` in the URL turns TLS on."""

    model_config = _group("SHOPRANK_REDIS_")

    url: str = "redis://127.0.0.1:6379/0"
    password: SecretStr | None = None
    tls_ca_certs: str | None = None
    socket_timeout_s: float = 5.0
    # A command that meets a connection error or a timeout is retried, after a jittered
    # exponential backoff from retry_base_s up to retry_cap_s (redis-py's Retry); then it fails.
    retries: int = Field(default=10, ge=0)
    retry_base_s: float = Field(default=0.01, gt=0)
    retry_cap_s: float = Field(default=1.0, gt=0)
    # Replicated Redis (make up-cluster): "host:port,host:port,..." of the Sentinels; when set,
    # clients ask them for the primary of ``sentinel_master`` (and follow a failover) instead of
    # connecting to the URL's host and port (its db number and password still apply).
    sentinels: str | None = None
    sentinel_master: str = "shoprank"
    # Scorers read features from a replica (the primary when none answers): spares the primary,
    # at the cost of the replication lag (milliseconds) in freshness. Sentinel only.
    read_from_replicas: bool = False
    # Redis Cluster (make up-redis-cluster): the URL names any node, the client discovers the rest
    # and follows slot moves. The feature state then needs SHOPRANK_FEATURES_SHARDS >= 2.
    cluster: bool = False


class TopicSettings(BaseSettings):
    """Topic names; partition counts and configs live in :mod:`core.topics`."""

    model_config = _group("SHOPRANK_TOPIC_")

    queries: str = "shoprank.queries"
    results: str = "shoprank.results"
    interactions: str = "shoprank.interactions"
    catalog: str = "shoprank.catalog"
    model_updates: str = "shoprank.model-updates"
    dead_letter: str = "shoprank.dead-letter"
    forgotten: str = "shoprank.forgotten"  # `forget` requests, compacted: rebuilds honour them
    labeled: str = "shoprank.labeled"  # served lists joined with what followed (the joiner's output)
    partitions: int = Field(default=4, ge=1)
    # 1 on the single-node broker; 3 and 2 on the cluster (make up-cluster): with acks=all, an
    # acknowledged event is on at least 2 brokers, so losing any one loses none.
    replication_factor: int = Field(default=1, ge=1)
    min_insync_replicas: int = Field(default=1, ge=1)


class ModelSettings(BaseSettings):
    """Where model versions live and how the trainer builds them."""

    model_config = _group("SHOPRANK_MODEL_")

    registry_dir: Path = ROOT / "models"
    seed: int = 13
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=128, ge=1)
    negatives: int = Field(default=63, ge=1)
    learning_rate: float = 1e-3
    encoder_learning_rate: float = 2e-5
    train_layers: int = Field(default=2, ge=0, le=24)  # top encoder layers fine-tuned, the rest frozen
    patience: int = Field(default=1, ge=0)
    max_minutes: float = 20.0
    # After early stopping picks the epochs, fit a fresh model on the validation period too.
    refit: bool = True
    # Each version ships its own embeddings of this many of its training queries, most frequent
    # first (~1.5 KB each): a scorer never runs the encoder for them (scorer.runtime).
    shipped_queries: int = Field(default=10_000, ge=0)
    # The query encoder a version serves: int8 (dynamic quantization; kept only where it agrees
    # with the exported graph, trainer.export) or the exported fp32 graph.
    query_encoder_precision: Literal["fp32", "int8"] = "int8"


class ScorerSettings(BaseSettings):
    """The ranking service: micro-batching, device, retrieval, HTTP."""

    model_config = _group("SHOPRANK_SCORER_")

    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch: int = Field(default=32, ge=1)
    max_wait_ms: float = Field(default=2.0, ge=0.0)
    retrieve_k: int = Field(default=100, ge=1)
    max_candidates: int = Field(default=1000, ge=1)
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    group_id: str = "shoprank-scorer"
    # Cross-encoder second stage over the top 100 (scorer/rerank.py): "cuda" runs it only when
    # serving on a GPU, "always" on a CPU too, "off" never; needs a version that ships one.
    rerank: Literal["off", "cuda", "always"] = "cuda"
    # How often a scorer reads the product vectors the embedder wrote since (features.embeddings).
    embeddings_refresh_s: float = Field(default=1.0, gt=0)
    # A killed scorer's partitions move to the others after this long without its heartbeats
    # (librdkafka's default, 45 s, left its searches waiting that long).
    session_timeout_s: float = Field(default=10.0, ge=6.0)
    # onnxruntime intra-op threads per session (0: one per core). A scorer's batches are a few
    # queries, and it shares its cores with Kafka and Redis: one thread spent 13% less CPU per
    # query encoding and scoring than two on the 2-core host (15% more wall time per miss).
    threads: int = Field(default=1, ge=0)
    # The results producer's codec. lz4 cost half of zstd's CPU on the producer's thread (0.27
    # against 0.58 ms per result at 100 queries/s) for results about half again as large on the
    # wire (bench/result_size.py --broker; README, The scorer).
    results_compression: Literal["none", "lz4", "zstd", "snappy", "gzip"] = "lz4"


class FeatureSettings(BaseSettings):
    """How shopper, product and query features are computed. Workers and trainer must agree on them.

    Half-lives are in event time (seconds): decay never reads the wall clock, so a replay gives the
    same values. ``user_ttl_s`` is applied in event time too (a shopper idle longer starts afresh)
    and, as a Redis TTL refreshed on activity, to free memory.
    """

    model_config = _group("SHOPRANK_FEATURES_")

    user_half_life_s: float = Field(default=14 * 86400.0, gt=0)
    item_half_life_s: float = Field(default=7 * 86400.0, gt=0)
    # 3 d: which product a query means drifts with launches. 7 d was best of 3/7/30 d on Best Buy
    # validation until the 6 h burst share came; beside it 3 d is (validation MAP@5 0.7930 against
    # 0.7921). Rarely typed queries keep their evidence through the click share.
    query_half_life_s: float = Field(default=3 * 86400.0, gt=0)
    # Clicks after a query also decay with a short half-life: which edition or platform a busy
    # query leads to shifts within a day (a 7 d + 6 h query table beats 7 d alone on Best Buy).
    query_burst_half_life_s: float = Field(default=6 * 3600.0, gt=0)
    recent_half_life_s: float = Field(default=2 * 86400.0, gt=0)
    recent_n: int = Field(default=16, ge=1, le=64)
    affinity_top_k: int = Field(default=8, ge=1, le=32)
    click_weight: float = 1.0
    cart_weight: float = 3.0
    purchase_weight: float = 5.0
    ctr_prior: float = Field(default=0.05, ge=0.0, le=1.0)
    ctr_prior_strength: float = Field(default=20.0, gt=0)
    # A product's share of one location's (or device's) clicks is pulled toward its share of all
    # located clicks by this many pseudo-clicks: a region with few clicks says little.
    context_prior_clicks: float = Field(default=20.0, gt=0)
    # The shopper's affinities and price level count this much weight (a click weighs click_weight)
    # of attention spread elsewhere and of typical-priced interactions: estimated from a few
    # clicks they say little, and read so (docs/personalization.md: the learner's estimates from
    # a simulated shopper's clicks were best shrunk by ~10 clicks).
    preference_prior_weight: float = Field(default=10.0, ge=0.0)
    user_ttl_s: int = Field(default=90 * 86400, ge=60)
    query_item_ttl_s: int = Field(default=180 * 86400, ge=60)
    # A query word that has led to fewer clicks borrows the evidence of the closest word that has
    # led to at least this many ("kimect" -> "kinect", features.speller); 0 turns respelling off.
    spelling_min_clicks: int = Field(default=3, ge=0)
    # How often a scorer reloads that dictionary from Redis (the trainer's is always current).
    spelling_refresh_s: float = Field(default=60.0, gt=0)
    # A shopper's session ends after this long without a search (features.session; 30 min is the
    # web-analytics convention).
    session_gap_s: float = Field(default=1800.0, gt=0)
    # How many owner shards the feature state is split into (features.keys.Shards): 1 keeps one
    # keyspace (a single Redis); a Redis Cluster needs at least 2 (a few per primary). Writers and
    # readers must agree on it, and changing it means `shoprank rebuild`.
    shards: int = Field(default=1, ge=1, le=1024)


class JoinerSettings(BaseSettings):
    """The joiner: ranked results + the interactions that followed them -> graded labeled lists."""

    model_config = _group("SHOPRANK_JOINER_")

    group_id: str = "shoprank-joiner"
    # Event time after the impression during which a click or add-to-cart counts for it; the list
    # is emitted once the partition's event time has passed it.
    click_window_s: float = Field(default=1800.0, gt=0)
    # A purchase inside this window (> click_window_s) still counts: it emits a correction.
    purchase_window_s: float = Field(default=86400.0, gt=0)
    # A labeled list keeps the first this many positions and every product acted on below them
    # (0: the whole impression).
    max_list_len: int = Field(default=100, ge=0)
    batch_size: int = Field(default=2000, ge=1)
    batch_within_s: float = Field(default=0.05, gt=0)
    # An input with nothing new for this long (wall time) no longer holds the watermark back.
    idle_s: float = Field(default=5.0, gt=0)
    # A joiner that dies holds its partitions this long before the group hands them on.
    session_timeout_s: float = Field(default=10.0, ge=6.0)
    # Prometheus /metrics (None: off); a port another process holds is logged and left unserved.
    metrics_port: int | None = 9101


class TrainerSettings(BaseSettings):
    """The continuous trainer (``shoprank trainer``): when it trains, on what, and the gate."""

    model_config = _group("SHOPRANK_TRAINER_")

    interval_s: float = Field(default=3600.0, gt=0)  # a cycle at least this often (wall clock) ...
    min_new_lists: int = Field(default=2000, ge=1)  # ... or once this many new labeled lists arrived
    fresh_lists: int = Field(default=20000, ge=1)  # the newest lists a cycle trains on
    older_sample: int = Field(default=5000, ge=0)  # plus this many sampled from before them
    holdout_lists: int = Field(default=1000, ge=10)  # the freshest, never trained on: the gate's data
    epochs: int = Field(default=1, ge=1)
    # The ranking head's learning rate when fine-tuning (None: SHOPRANK_MODEL_LEARNING_RATE, the
    # offline run's). AdamW moves a weight by about this much per step whatever its gradient, and
    # a cycle over a few thousand lists is tens of steps, so it bounds how far a cycle can move
    # the head, e.g. the weight of a feature switched on at zero (docs/personalization.md).
    learning_rate: float | None = Field(default=None, gt=0)
    # A cycle (reading, fine-tuning, export, gate) aims to end within this: fine-tuning stops,
    # whatever the epoch, early enough for the export and the gate (as long as they last took).
    max_cycle_s: float = Field(default=110.0, gt=0)
    # Queries a cycle's version ships embedded (SHOPRANK_MODEL_SHIPPED_QUERIES is the offline
    # run's): each costs one pass of the fine-tuned encoder at export, ~7 ms of CPU on the 2-core
    # host. On Best Buy the 1,000 most frequent cover 88.9% of the test period's searches, all
    # 3,970 training texts 91.7%.
    shipped_queries: int = Field(default=1000, ge=0)
    gate_margin: float = Field(default=0.005, ge=0)  # the candidate may trail by at most this (MAP@5)
    gate_max_ms_per_query: float = Field(default=200.0, gt=0)  # sanity check of the candidate graph
    bootstrap_samples: int = Field(default=1000, ge=100)
    # Online guardrail: after a swap, roll back when the served lists' click MRR trails the
    # previous version's by more than this over at least ``guardrail_min_lists`` lists each.
    guardrail_margin: float = Field(default=0.05, ge=0)
    guardrail_min_lists: int = Field(default=300, ge=1)
    lease_ttl_s: float = Field(default=600.0, gt=0)  # one trainer writes at a time
    group_id: str = "shoprank-trainer"
    # A served list is trained on its first ``max_list_len`` positions plus every product acted on
    # further down (bounds the padded arrays when some lists carry 1,000 candidates).
    max_list_len: int = Field(default=100, ge=2)
    # Inverse-propensity weights of click gains: "auto" trains with and without, keeps the better
    # on the holdout; a weight is at most ``ipw_clip``. "off" by default: it lost on the holdout
    # in every run measured (README), and "auto" halves each variant's share of the cycle.
    position_debias: Literal["auto", "on", "off"] = "off"
    ipw_clip: float = Field(default=10.0, ge=1.0)
    poll_s: float = Field(default=5.0, gt=0)  # how often the service reads new lists (guardrail)
    metrics_port: int | None = 9102  # Prometheus: cycles by outcome, rollbacks, last model update


class EmbedderSettings(BaseSettings):
    """``shoprank embedder``: catalog products -> vectors of the serving version's product tower."""

    model_config = _group("SHOPRANK_EMBEDDER_")

    group_id: str = "shoprank-embedder"
    batch_size: int = Field(default=64, ge=1, le=1024)  # products per onnxruntime call
    check_s: float = Field(default=2.0, gt=0)  # how often it looks for a new serving version
    threads: int = Field(default=0, ge=0)  # onnxruntime intra-op threads (0: onnxruntime decides)


class StreamsSettings(BaseSettings):
    """The feature workers: engine, consumer group, batching, dedup window, ports."""

    model_config = _group("SHOPRANK_STREAMS_")

    # batch: librdkafka batches, decode overlapped with the Redis commit (streams/batch.py);
    # faust: one faust agent per topic taking batches from its stream (streams/app.py).
    engine: Literal["batch", "faust"] = "batch"
    group_id: str = "shoprank-streams"
    # Static membership: a restarted worker with the same id takes its partitions back at once.
    instance_id: str | None = None
    # Larger batches share each product's statistics among more events in the commit script
    # (measured: 4000 costs Redis 14% less CPU per event than 2000); the script's arguments cap it.
    batch_size: int = Field(default=4000, ge=1, le=4000)
    batch_within_s: float = Field(default=0.005, gt=0)
    dedup_ttl_s: int = Field(default=86400, ge=60)
    query_text_ttl_s: int = Field(default=86400, ge=60)
    session_timeout_s: float = Field(default=10.0, ge=6.0)
    commit_interval_s: float = Field(default=1.0, gt=0)  # Kafka offsets (Redis holds the truth)
    web_port: int | None = None
    # Prometheus /metrics (None: off); a second worker on the host finds it taken and serves none
    # (logged): give each worker its own port to scrape them all.
    metrics_port: int | None = 9100
    event_loop: Literal["aio", "uvloop"] = "aio"  # uvloop (install it first) measured no faster here


class ConsoleSettings(BaseSettings):
    """``shoprank console``: the web pages people look at (search with explain, shoppers, models,
    quality plots, live figures)."""

    model_config = _group("SHOPRANK_CONSOLE_")

    host: str = "127.0.0.1"
    port: int = 8090
    # The scorer's Prometheus endpoint, scraped for live throughput and p99.
    scorer_metrics_url: str = "http://127.0.0.1:8080/metrics"
    scrape_s: float = Field(default=2.0, gt=0)  # how often the console scrapes it
    live_window_s: float = Field(default=60.0, gt=0)  # throughput and p99 over this much of the past
    kafka_timeout_s: float = Field(default=3.0, gt=0)  # consumer lag: a broker that does not answer
    top_k: int = Field(default=10, ge=1, le=100)  # products a search shows
    # What make loop-eval wrote: quality per day and latency per arm.
    loop_results: Path = ROOT / "bench" / "results" / "loop.json"


class PrometheusSettings(BaseSettings):
    """Monitoring: the Prometheus server ``make up`` starts (infra/prometheus.sh) and the address
    the feature workers, joiner and trainer serve /metrics on (the scorer serves it on its HTTP
    port). The scrape targets are the services' own port settings."""

    model_config = _group("SHOPRANK_PROMETHEUS_")

    enabled: bool = True  # make up starts Prometheus
    host: str = "127.0.0.1"
    port: int = 9090
    scrape_interval_s: float = Field(default=5.0, gt=0)
    retention: str = "15d"
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 in containers, where Prometheus scrapes from outside


class Settings(BaseSettings):
    """Everything configurable, grouped; frozen so no part can change another's view."""

    model_config = _group("SHOPRANK_")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    scorer: ScorerSettings = Field(default_factory=ScorerSettings)
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    streams: StreamsSettings = Field(default_factory=StreamsSettings)
    joiner: JoinerSettings = Field(default_factory=JoinerSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    embedder: EmbedderSettings = Field(default_factory=EmbedderSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    prometheus: PrometheusSettings = Field(default_factory=PrometheusSettings)
    # Long work without a terminal (CI, containers, a log file) logs its progress this often
    # instead of redrawing a progress bar (core.progress).
    progress_log_s: float = Field(default=30.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    data_dir: Path = ROOT / "data"
    var_dir: Path = ROOT / "var"


@lru_cache(maxsize=1)
def load_settings() -> Settings:
    """Read the environment once per process."""
    return Settings()
