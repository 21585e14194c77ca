"""gunicorn settings for `gunicorn run:app -c gunicorn.conf.py` (the Procfile's web process)."""
import os

bind = f"0.0.0.0:{os.environ.get('PORT', '5000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
# A PaaS sends SIGTERM and kills ~30 s later: finish in-flight requests well before.
timeout = 30
graceful_timeout = 20
keepalive = 5
# gunicorn's control socket is one path per user: two instances on a machine (tests,
# benchmarks) would take it from each other, and nothing here uses gunicornc.
control_socket_disable = True
