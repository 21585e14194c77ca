"""Operations endpoints: liveness, readiness and Prometheus metrics."""
import logging
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import redis
import sqlalchemy as sa
from flask import Blueprint, Response, current_app
from kombu import Connection
from redis.backoff import NoBackoff
from redis.retry import Retry

from app import metrics
from app.errors import ApiError
from app.extensions import db

log = logging.getLogger(__name__)
bp = Blueprint("ops", __name__)

CHECK_TIMEOUT = 1.0


@bp.get("/health")
def health():
    """Alive: touches no dependency."""
    return {"status": "ok"}


@bp.get("/ready")
def ready():
    """Ready: the database and the broker each answered just now, within about a second."""
    results = run_checks(readiness_checks(current_app.config), CHECK_TIMEOUT)
    failed = {name: error for name, (error, _) in results.items() if error}
    if failed:
        raise ApiError(
            503, "not_ready", f"Not ready: {' and '.join(failed)} unavailable; retry shortly.",
            details=[{"path": f"/{name}", "message": f"{name}: {error}", "rule": name}
                     for name, error in failed.items()],
        )
    body = {name: "ok" for name in results}
    warnings = [warning for _, found in results.values() for warning in found]
    if warnings:
        body["warnings"] = warnings
    return body


@bp.get("/metrics")
def prometheus_metrics():
    """Prometheus text: the sum over every worker process, and the queue depths read now."""
    text, content_type = metrics.render()
    return Response(text, content_type=content_type)


# --- readiness checks -----------------------------------------------------------------
# Each check runs in a thread of its own so that a dependency that hangs (rather than
# refuses) costs /ready about CHECK_TIMEOUT, and the checks run side by side. A check
# still hanging from an earlier call is not started twice: it is reported as failing.

_running: dict[str, tuple[float, Future]] = {}
_running_lock = threading.Lock()


def readiness_checks(config) -> dict:
    """name -> a function that raises when that dependency is unusable, else returns warnings."""
    engine = db.engine
    checks = {"database": lambda: _select_one(engine)}
    broker_url = config["CELERY_BROKER_URL"]
    if broker_url.startswith("filesystem://"):
        checks["broker"] = lambda: _folder_exists(Path(config["BROKER_FOLDER"]) / "queue")
    elif broker_url.startswith(("redis://", "rediss://")):
        checks["broker"] = lambda: _ping_redis(broker_url, "broker")
    else:
        checks["broker"] = lambda: _connect_broker(broker_url)
    redis_url = config["REDIS_URL"]
    if redis_url and redis_url != broker_url:
        # The pending store and rules cache live there: ingestion needs it as much as the broker.
        checks["redis"] = lambda: _ping_redis(redis_url, "redis")
    # The pending store's own warnings (a message that found no record) ride on the check of
    # the server that holds it: the Redis of REDIS_URL, or the embedded default's folders.
    holder = "redis" if "redis" in checks else "broker"
    checks[holder] = _with_pending_warnings(checks[holder], current_app.extensions["intake.pending"])
    return checks


def _with_pending_warnings(check, pending):
    return lambda: (check() or []) + pending.warnings()


def run_checks(checks: dict, timeout: float) -> dict[str, tuple[str | None, list[str]]]:
    """name -> (error or None, warnings), every check answered or given up within `timeout`."""
    futures = {name: _start(name, check) for name, check in checks.items()}
    deadline = time.monotonic() + timeout
    results = {}
    for name, (started, future) in futures.items():
        try:
            results[name] = (None, future.result(timeout=max(0.0, deadline - time.monotonic())))
        except FutureTimeout:
            waited = time.monotonic() - started
            results[name] = (f"no answer after {waited:.1f} s", [])
            log.warning("not ready: %s gave no answer after %.1f s", name, waited)
        except Exception as error:
            # The client learns which dependency failed and how; hosts and the like stay in the log.
            original = getattr(error, "orig", None) or error
            results[name] = (f"unavailable ({type(original).__name__})", [])
            log.warning("not ready: %s unavailable: %s", name, _first_line(original))
    return results


def _start(name: str, check) -> tuple[float, Future]:
    with _running_lock:
        running = _running.get(name)
        if running is not None and not running[1].done():
            return running
        future: Future = Future()
        _running[name] = (time.monotonic(), future)

    def run():
        try:
            future.set_result(check() or [])
        except BaseException as error:  # handed to the caller through the future
            future.set_exception(error)

    threading.Thread(target=run, name=f"intake-ready-{name}", daemon=True).start()
    return _running[name]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _select_one(engine) -> list[str]:
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
    return []


def _folder_exists(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise FileNotFoundError(f"broker folder {folder} is missing")
    return []


def _connect_broker(url: str) -> list[str]:
    with Connection(url, connect_timeout=CHECK_TIMEOUT) as connection:
        connection.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT)
    return []


def _ping_redis(url: str, role: str) -> list[str]:
    """PING a Redis, and warn when its settings can lose queued data (when CONFIG is allowed)."""
    client = redis.Redis.from_url(
        url, socket_timeout=CHECK_TIMEOUT, socket_connect_timeout=CHECK_TIMEOUT, retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )
    try:
        pipe = client.pipeline(transaction=False)
        pipe.ping()
        for name in ("save", "appendonly", "maxmemory-policy"):
            pipe.config_get(name)
        answers = pipe.execute(raise_on_error=False)
    finally:
        client.close()
    if isinstance(answers[0], Exception):
        raise answers[0]
    settings = {}
    for answer in answers[1:]:
        if isinstance(answer, Exception):
            return []  # CONFIG refused (managed Redis): nothing to say
        settings.update(answer)
    return redis_warnings(role, settings)


def redis_warnings(role: str, settings: dict) -> list[str]:
    """Warnings about Redis settings that can lose queued messages or pending events."""
    warnings = []
    if settings.get("save") == "" and settings.get("appendonly") == "no":
        warnings.append(f"{role}: Redis persistence is off (no RDB save points, appendonly no): "
                        "a Redis restart loses every queued message")
    policy = settings.get("maxmemory-policy")
    if policy and policy != "noeviction":
        warnings.append(f"{role}: Redis maxmemory-policy is {policy}, not noeviction: "
                        "under memory pressure Redis may evict queued messages")
    return warnings
