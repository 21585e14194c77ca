"""gunicorn settings for `gunicorn run:app -c gunicorn.conf.py` (the Procfile's web process)."""
import logging
import os
import shutil
import tempfile
from pathlib import Path

from gunicorn import glogging

TEMPORARY_METRICS_PREFIX = "intake-metrics-"

bind = f"0.0.0.0:{os.environ.get('PORT', '5000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
# Requests waiting on the broker hold a thread each; more threads per process let group
# commit put more events in one message (README "Throughput").
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
# A PaaS sends SIGTERM and kills ~30 s later: finish in-flight requests well before.
timeout = 30
graceful_timeout = 20
keepalive = 5
# Each worker listens on a socket of its own and the kernel (Linux) spreads new connections
# over them. On one shared socket the worker that wakes first accepts a burst of connections:
# 16 keep-alive clients split 14/2 as often as 8/8, and the busier process is held by its GIL.
reuse_port = True
# gunicorn's control socket is one path per user: two instances on a machine (tests,
# benchmarks) would take it from each other, and nothing here uses gunicornc.
control_socket_disable = True

# --- logs: one JSON object per line, gunicorn's own lines included -------------------------
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "app.logs.JsonFormatter"}},
    "handlers": {"json": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
    "root": {"level": loglevel.upper(), "handlers": ["json"]},
    "loggers": {
        "gunicorn.error": {"level": loglevel.upper(), "handlers": ["json"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["json"], "propagate": False},
    },
}
logging.captureWarnings(True)  # Python warnings become JSON lines as well


class Logger(glogging.Logger):
    """gunicorn's logger without the access log (unless --access-logfile): the app logs each request."""

    @property
    def access_log_enabled(self):
        return bool(self.cfg.accesslog)


logger_class = Logger

# --- metrics: prometheus-client multiprocess mode ------------------------------------------
# Every worker writes its samples under this folder and /metrics sums them. It must be in the
# environment before a worker imports the app; without one, a temporary folder per run.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=TEMPORARY_METRICS_PREFIX)


def on_starting(server):
    """Start from an empty metrics folder: an earlier run's samples must not be summed."""
    folder = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.glob("*.db"):
        path.unlink(missing_ok=True)


def child_exit(server, worker):
    """Drop a dead worker's live gauges; its counters and histograms stay in the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics folder if it is the temporary one made above."""
    folder = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    if folder.name.startswith(TEMPORARY_METRICS_PREFIX) and folder.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(folder, ignore_errors=True)


def post_worker_init(worker):
    """Exempt everything loaded at start from the garbage collector's full passes.

    A full collection walks every tracked object: the app's modules and their objects
    (~80 MB) made each one a pause of tens of milliseconds in the middle of requests.
    """
    import gc

    gc.freeze()
