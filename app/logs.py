"""Structured logs: one JSON object per line from every process, tied together by request ids.

gunicorn (gunicorn.conf.py), Celery workers and beat (the `setup_logging` signal below) and
the dev server (`python run.py`) all write through `JsonFormatter`. The API logs one line per
request and the workers one line per task; a task's line carries the ids of the requests
whose events it holds, sent in the message headers by the publisher.

Only fields named here are written: never a key, password, token, code or payload. In
particular the `data` that Celery attaches to its own records (task arguments) is dropped.
"""
import logging
import os
import re
import sys
import time
import uuid
import warnings
from datetime import datetime, timezone

import orjson
from celery import signals
from flask import Flask, g, has_request_context, request

from app import metrics

REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID = 128
# A client's request id is echoed and logged: keep only characters that are safe in both.
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._:/+=@-]")

request_log = logging.getLogger("intake.request")
task_log = logging.getLogger("intake.task")


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: time, level, logger, pid, message and its `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def configure(level=logging.INFO) -> None:
    """Send every record of this process to stderr as JSON lines, replacing other root handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


@signals.celeryd_init.connect(weak=False, dispatch_uid="intake.logs.celeryd_init")
def _worker_logging_early(options=None, **_):
    # Before Celery sets up logging: its start-up warnings (e.g. running as root) become JSON too.
    configure((options or {}).get("loglevel") or logging.INFO)
    logging.captureWarnings(True)
    if (os.environ.get("APP_ENV") or "development") == "development":
        # Celery warns of "superuser privileges" for root and for any member of the sudo or
        # wheel group, which is most laptop users: on `make run` that is noise to learn to
        # ignore. The danger it names, pickled messages, does not exist here (JSON only:
        # celery_config.accept_content); deployed workers still say it.
        from celery.exceptions import SecurityWarning

        warnings.filterwarnings("ignore", category=SecurityWarning)


@signals.setup_logging.connect(weak=False, dispatch_uid="intake.logs.setup_logging")
def _celery_logging(loglevel=None, **_):
    # Connected, this replaces Celery's own text logging in workers and beat.
    configure(loglevel or logging.INFO)
    # Our one line per task (intake.task) says all that Celery's "received" and
    # "succeeded" lines say; two more lines per message cost CPU on the hot path.
    for name in ("celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(name).setLevel(logging.WARNING)


@signals.worker_ready.connect(weak=False, dispatch_uid="intake.logs.quiet_term_handler")
def _quiet_warm_shutdown(sender=None, **_):
    # On SIGTERM Celery prints "worker: Warm shutdown (MainProcess)" as plain text: install
    # the same handler without that line; _log_shutdown below says it as JSON instead.
    from celery.apps.worker import install_worker_term_handler

    install_worker_term_handler(sender.controller, verbose=False)


@signals.worker_shutting_down.connect(weak=False, dispatch_uid="intake.logs.shutting_down")
def _log_shutdown(sender=None, sig=None, how=None, **_):
    logging.getLogger("intake.worker").warning(
        "%s shutdown on %s", how, sig, extra={"fields": {"worker": sender, "signal": sig, "shutdown": how}}
    )


# --- requests -------------------------------------------------------------------------

def init_app(app: Flask) -> None:
    """Give every request an id (echoed in X-Request-ID) and log one line when it is answered."""
    # First of all before_request hooks, so that a request refused by an earlier hook has an id.
    app.before_request_funcs.setdefault(None, []).insert(0, _begin_request)
    app.after_request(_log_request)


def clean_request_id(value: str | None) -> str | None:
    """A client's X-Request-ID reduced to safe characters and at most MAX_REQUEST_ID of them."""
    if not value:
        return None
    return _UNSAFE_ID_CHARS.sub("", value)[:MAX_REQUEST_ID] or None


def current_request_id() -> str | None:
    """The id of the request being handled by this thread, if any."""
    return g.get("request_id") if has_request_context() else None


def _begin_request():
    g.request_id = clean_request_id(request.headers.get(REQUEST_ID_HEADER)) or uuid.uuid4().hex
    g.log_started = time.perf_counter()


def _log_request(response):
    request_id = g.get("request_id") or uuid.uuid4().hex
    response.headers[REQUEST_ID_HEADER] = request_id
    route = request.url_rule.rule if request.url_rule is not None else metrics.UNMATCHED_ROUTE
    started = g.get("log_started")
    fields = {
        "method": request.method,
        "route": route,
        "status": response.status_code,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2) if started else None,
        "app_id": (request.view_args or {}).get("app_id"),
        "request_id": request_id,
    }
    if error_code := g.get("error_code"):
        fields["error"] = error_code
    request_log.info("%s %s %s", request.method, route, response.status_code, extra={"fields": fields})
    return response


# --- Celery tasks ---------------------------------------------------------------------

_task_started: dict[str, float] = {}


def request_ids_of(task_request) -> list[str]:
    """The ids of the requests whose events a task carries (message header `request_ids`)."""
    ids = getattr(task_request, "request_ids", None)
    if ids is None:
        ids = (getattr(task_request, "headers", None) or {}).get("request_ids")
    return list(ids) if isinstance(ids, (list, tuple)) else []


@signals.task_prerun.connect(weak=False, dispatch_uid="intake.logs.task_prerun")
def _task_started_at(task_id=None, **_):
    _task_started[task_id] = time.perf_counter()


@signals.task_postrun.connect(weak=False, dispatch_uid="intake.logs.task_postrun")
def _log_task(task_id=None, task=None, retval=None, state=None, **_):
    """One JSON line per finished task, and its metrics, timed once."""
    started = _task_started.pop(task_id, None)
    seconds = time.perf_counter() - started if started else None
    task_request = task.request
    outcome = metrics.task_outcome(state, retval)
    queue = metrics.task_queue(task_request)
    metrics.count_task(task.name, queue, outcome, seconds)
    fields = {
        "task": task.name,
        "task_id": task_id,
        "queue": queue,
        "duration_ms": round(seconds * 1000, 2) if seconds is not None else None,
        "outcome": outcome,
        "retries": task_request.retries or 0,
    }
    request_ids = request_ids_of(task_request)
    if request_ids:
        # One id when one request queued the task; a group commit carries several.
        fields["request_id"] = request_ids[0] if len(request_ids) == 1 else request_ids
    level = logging.WARNING if outcome in ("failure", "failed") else logging.INFO
    task_log.log(level, "%s %s", task.name, outcome, extra={"fields": fields})
