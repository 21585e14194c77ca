"""Prometheus metrics for the API and the workers.

When PROMETHEUS_MULTIPROC_DIR is set (gunicorn.conf.py sets it for the web process,
start_celery_worker.sh for each worker) prometheus-client runs in multiprocess mode: every
gunicorn worker and Celery pool child writes its samples to files there and a scrape sums
them. The variable must be set before this module is imported. Queue depths are read from
the broker at scrape time, never stored.
"""
import logging
import os
import time
from pathlib import Path

import redis
from celery import signals
from flask import Flask, current_app, g, request
from kombu import Connection
from kombu.exceptions import ChannelError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from redis.backoff import NoBackoff
from redis.retry import Retry

import celery_config

log = logging.getLogger(__name__)

QUEUES = celery_config.QUEUES
UNMATCHED_ROUTE = "<unmatched>"
INGEST_ENDPOINTS = frozenset({"ingest.ingest_event", "ingest.ingest_batch", "otlp.export_logs"})
# Any other method is one label value, so that odd requests cannot add series without bound.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TASK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 240.0)
# What the persistence tasks return (app/events.py persist_pending): more telling than "success".
PERSIST_RESULTS = frozenset({"stored", "duplicate", "retry", "failed", "missing", "split"})
# The queues whose groups wait in the pending store.
PENDING_QUEUES = ("default", "batch_processing")

HTTP_REQUESTS = Counter("intake_http_requests_total", "HTTP requests answered.", ["method", "route", "status"])
HTTP_DURATION = Histogram(
    "intake_http_request_duration_seconds", "Time to answer an HTTP request.", ["method", "route"], buckets=FAST_BUCKETS
)
EVENTS_ACCEPTED = Counter("intake_events_accepted_total", "Events accepted (queued) by the API.")
EVENTS_REJECTED = Counter(
    "intake_events_rejected_total", "Events refused by the API, by error code; one per event in a batch.", ["reason"]
)
PUBLISH_DURATION = Histogram(
    "intake_publish_duration_seconds", "Time to queue a group of events durably (pending record and message).",
    ["queue"], buckets=FAST_BUCKETS,
)
RULES_CACHE = Counter("intake_rules_cache_total", "Look-ups in the per-process app and rules cache.", ["result"])
RULES_CACHE_HIT = RULES_CACHE.labels(result="hit")
RULES_CACHE_MISS = RULES_CACHE.labels(result="miss")
RATE_LIMIT_STORAGE_ERRORS = Counter(
    "intake_rate_limit_storage_errors_total", "Ingestion rate checks skipped because the rate-limit storage failed."
)

WORKER_TASKS = Counter("intake_worker_tasks_total", "Celery tasks run, by outcome.", ["task", "queue", "outcome"])
WORKER_TASK_DURATION = Histogram(
    "intake_worker_task_duration_seconds", "Time a Celery task ran.", ["task", "queue"], buckets=TASK_BUCKETS
)
WORKER_TASK_RETRIES = Counter(
    "intake_worker_task_retries_total", "Tasks that will run again: Celery retries and rescheduled event groups.",
    ["task", "queue"],
)
WORKER_TASK_FAILURES = Counter(
    "intake_worker_task_failures_total", "Tasks that raised, or whose events went to the failed events.",
    ["task", "queue"],
)
PENDING_MISSING = Counter(
    "intake_pending_missing_total",
    "Messages whose pending record was gone with no sign it was stored: the pending store lost data.", ["queue"],
)
DATABASE_ERRORS = Counter(
    "intake_database_errors_total",
    "Writes that waited for the database: kind unavailable (down, busy) or schema (a mismatch, as mid-deploy).",
    ["kind"],
)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


# --- the API --------------------------------------------------------------------------

def init_app(app: Flask) -> None:
    """Count and time every request by method, URL rule and status."""
    app.before_request_funcs.setdefault(None, []).insert(0, _start_timer)
    app.after_request(_count_request)


def _start_timer():
    g.metrics_started = time.perf_counter()


def _count_request(response):
    method = request.method if request.method in METHODS else "OTHER"
    route = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
    HTTP_REQUESTS.labels(method, route, str(response.status_code)).inc()
    started = g.get("metrics_started")
    if started is not None:
        HTTP_DURATION.labels(method, route).observe(time.perf_counter() - started)
    # A refused ingestion request refuses every event it carried (g.ingest_events once known).
    if response.status_code >= 400 and request.endpoint in INGEST_ENDPOINTS and (code := g.get("error_code")):
        EVENTS_REJECTED.labels(code).inc(g.get("ingest_events", 1))
    return response


def count_batch(accepted: int, rejected: list[dict]) -> None:
    """Count a batch's accepted events and each rejected item under its error code."""
    if accepted:
        EVENTS_ACCEPTED.inc(accepted)
    for item in rejected:
        EVENTS_REJECTED.labels(item["error"]["code"]).inc()


def render() -> tuple[bytes, str]:
    """The Prometheus text for this deployment: every process's samples and the live queue depths."""
    registry = REGISTRY
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    live = CollectorRegistry()
    live.register(QueueDepthCollector(current_app.config))
    live.register(PendingCollector(current_app.extensions["intake.pending"]))
    return generate_latest(registry) + generate_latest(live), CONTENT_TYPE_LATEST


class QueueDepthCollector:
    """Reads how many messages wait in each queue when Prometheus scrapes (one round trip)."""

    def __init__(self, config):
        self.broker_url = config["CELERY_BROKER_URL"]
        self.broker_folder = config["BROKER_FOLDER"]

    def collect(self):
        depth = GaugeMetricFamily("intake_queue_depth", "Messages waiting in each Celery queue.", labels=["queue"])
        up = GaugeMetricFamily("intake_broker_up", "1 when the broker answered this scrape, else 0.")
        try:
            counts = self._counts()
        except Exception as error:
            log.warning("queue depth unavailable: %s", error)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        if counts is not None:
            for queue, count in counts.items():
                depth.add_metric([queue], count)
            yield depth

    def _counts(self) -> dict[str, int] | None:
        if self.broker_url.startswith(("redis://", "rediss://")):
            client = redis.Redis.from_url(
                self.broker_url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
            )
            try:
                pipe = client.pipeline(transaction=False)
                for queue in QUEUES:
                    for key in _redis_queue_keys(queue):
                        pipe.llen(key)
                lengths = iter(pipe.execute())
                return {queue: sum(next(lengths) for _ in _redis_queue_keys(queue)) for queue in QUEUES}
            finally:
                client.close()
        if self.broker_url.startswith("filesystem://"):
            folder = Path(self.broker_folder) / "queue"
            return {queue: sum(1 for _ in folder.glob(f"*.{queue}.msg")) for queue in QUEUES}
        if celery_config.is_amqp(self.broker_url):
            return _amqp_queue_counts(self.broker_url)
        return None  # another broker: use its own exporter


def _amqp_queue_counts(broker_url: str) -> dict[str, int]:
    """RabbitMQ: the messages ready in each queue (passive declares), from the first node of a failover list that answers."""
    nodes = broker_url.split(";")
    for node in nodes[:-1]:
        try:
            return _amqp_node_queue_counts(node)
        except Exception as error:
            log.info("queue depth: %s did not answer (%s), trying the next node", node.rsplit("@", 1)[-1], error)
    return _amqp_node_queue_counts(nodes[-1])


def _amqp_node_queue_counts(url: str) -> dict[str, int]:
    """One node's answer; a queue no worker has declared yet is left out."""
    timeouts = {"read_timeout": 0.5, "write_timeout": 0.5}  # a hung broker must not hang the scrape
    counts = {}
    with Connection(url, connect_timeout=0.5, transport_options=timeouts) as connection:
        for queue in QUEUES:
            channel = connection.channel()
            try:
                counts[queue] = channel.queue_declare(queue, passive=True).message_count
            except ChannelError:  # NOT_FOUND closes the channel; the next queue gets a new one
                continue
            channel.close()
    return counts


class PendingCollector:
    """Reads the pending store when Prometheus scrapes: groups accepted, not yet stored, and the oldest's age."""

    def __init__(self, pending):
        self.pending = pending

    def collect(self):
        try:
            stats = self.pending.stats(PENDING_QUEUES)
        except Exception as error:
            log.warning("pending store unavailable for metrics: %s", error)
            return
        groups = GaugeMetricFamily("intake_pending_groups", "Groups accepted and not yet stored.", labels=["queue"])
        oldest = GaugeMetricFamily("intake_pending_oldest_seconds",
                                   "Age of the oldest group accepted and not yet stored (0 when none).",
                                   labels=["queue"])
        for queue, (count, age) in stats.items():
            groups.add_metric([queue], count)
            oldest.add_metric([queue], age)
        yield groups
        yield oldest


def _redis_queue_keys(queue: str) -> tuple[str, ...]:
    # kombu's Redis transport keeps one list per queue and priority step (0 is the bare name).
    return (queue,) + tuple(f"{queue}\x06\x16{priority}" for priority in (3, 6, 9))


# --- Celery workers -------------------------------------------------------------------

def task_outcome(state: str | None, retval) -> str:
    """stored / duplicate / retry / failed for persistence tasks; else success / retry / failure."""
    if state == "SUCCESS":
        return retval if isinstance(retval, str) and retval in PERSIST_RESULTS else "success"
    return (state or "unknown").lower()


def task_queue(task_request) -> str:
    return (getattr(task_request, "delivery_info", None) or {}).get("routing_key") or "unknown"


def count_task(name: str, queue: str, outcome: str, seconds: float | None) -> None:
    """Count one finished task (called from the task log line in app/logs.py, which times it)."""
    WORKER_TASKS.labels(name, queue, outcome).inc()
    if seconds is not None:
        WORKER_TASK_DURATION.labels(name, queue).observe(seconds)
    if outcome == "retry":
        WORKER_TASK_RETRIES.labels(name, queue).inc()
    elif outcome in ("failure", "failed"):
        WORKER_TASK_FAILURES.labels(name, queue).inc()


@signals.celeryd_init.connect(weak=False, dispatch_uid="intake.metrics.worker_server")
def _serve_worker_metrics(**_):
    # A worker's own metrics port (WORKER_METRICS_PORT), summing its pool children when
    # PROMETHEUS_MULTIPROC_DIR is set (start_celery_worker.sh gives each worker one).
    port = os.environ.get("WORKER_METRICS_PORT")
    if not port:
        return
    registry = REGISTRY
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        log.warning("WORKER_METRICS_PORT without PROMETHEUS_MULTIPROC_DIR: prefork pool children are not counted")
    try:
        start_http_server(int(port), addr=os.environ.get("WORKER_METRICS_ADDR", "0.0.0.0"), registry=registry)
    except OSError as error:
        log.error("worker metrics port %s unavailable: %s", port, error)
        return
    log.info("worker metrics on port %s", port)


@signals.worker_process_shutdown.connect(weak=False, dispatch_uid="intake.metrics.child_exit")
def _child_exit(**_):
    if multiprocess_dir():
        multiprocess.mark_process_dead(os.getpid())
