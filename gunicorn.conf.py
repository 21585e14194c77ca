"""gunicorn settings for `gunicorn run:app -c gunicorn.conf.py` (the Procfile's web process)."""
import errno
import logging
import os
import shutil
import socket
import sys
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
# The price: a second server on the same port would start as well and the kernel would split
# the traffic between the two, so on_starting below first makes sure nobody listens there.
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


def _addresses(cfg) -> str:
    return ",".join(f"unix:{a}" if isinstance(a, str) else f"http://{a[0]}:{a[1]}" for a in cfg.address
                    if not isinstance(a, int))


class Logger(glogging.Logger):
    """gunicorn's logger without the access log (unless --access-logfile): the app logs each request."""

    @property
    def access_log_enabled(self):
        return bool(self.cfg.accesslog)

    def info(self, msg, *args, **kwargs):
        # With reuse_port the master holds no socket (each worker binds its own), so gunicorn
        # would log "Listening at:  (pid)": name the configured address instead.
        if msg == "Listening at: %s (%s)" and args and not args[0]:
            args = (_addresses(self.cfg), *args[1:])
        super().info(msg, *args, **kwargs)


logger_class = Logger

# --- metrics: prometheus-client multiprocess mode ------------------------------------------
# Every worker writes its samples under this folder and /metrics sums them. It must be in the
# environment before a worker imports the app; without one, a temporary folder per run.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=TEMPORARY_METRICS_PREFIX)


def _refuse_a_taken_port(server):
    # A plain bind, without SO_REUSEPORT, fails while any socket listens on the address, also
    # another gunicorn's reuse_port sockets. SO_REUSEADDR only lets it past connections of an
    # earlier run still in TIME_WAIT. Skipped when gunicorn is handed its sockets (systemd)
    # or re-executes itself (USR2): there the address is rightly taken.
    if server.master_pid or os.environ.get("LISTEN_FDS"):
        return
    for address in server.cfg.address:
        if not isinstance(address, tuple):
            continue
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address[:2])
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    raise
                server.log.error("Port %s is already in use: another server listens on %s. Stop it, or "
                                 "choose another port with PORT.", address[1], _addresses(server.cfg))
                on_exit(server)
                sys.exit(1)


def on_starting(server):
    """Refuse a port another server listens on; start from an empty metrics folder."""
    _refuse_a_taken_port(server)
    # An earlier run's samples must not be summed.
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
