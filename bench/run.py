#!/usr/bin/env python3
"""Ingestion benchmark: the real stack on a fresh database, driven by wrk.

One run starts gunicorn (gthread, gunicorn.conf.py), the Celery workers (default and
batch_processing, prefork) and beat on a new PostgreSQL database and a free Redis db
number, then measures in turn:

  health  GET /health                          the HTTP ceiling of this gunicorn
  single  POST /api/logs/<app_id>              1 event per request, accepted/s, latency, end to end
  batch   POST /api/logs/<app_id>/batch        100 events per request, likewise
  otlp    POST /api/otlp/<app_id>/v1/logs      100 OTLP log records per request (protobuf), likewise
  copy    COPY of as many similar rows into a scratch table shaped like `events`
          (the database ceiling)

and, with --write-path ROWS, the worker's write statement before and after this round's
de-duplication keys, partitions and rollup deltas, side by side (bench/write_path.py),

and samples the RSS of every API and worker process throughout. It checks that every
acknowledged event is stored exactly once, prints one JSON object and writes it to
bench/results/latest.json. See bench/README.md.

With `--designs intake,stock` the stock design (bench/stock/: one Celery message and one
INSERT + COMMIT per event, one task per batch request) runs the same loads after Intake's
processes stop, on a database and Redis db of its own; `--rate-limit both` measures single
events with and without a per-app rate limit that is never reached, alternating the two.

`--broker amqp` runs each design with RabbitMQ as the Celery broker (CELERY_BROKER_URL on a
vhost of the run's own; the pending store, rules cache and rate limits stay on Redis);
`--broker both` runs each design's stack on Redis and on RabbitMQ side by side, the repeats
taking turns (redis, amqp; then amqp, redis …), and adds the `amqp_over_redis` comparison.
"""
import argparse
import io
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import redis as redis_lib
from kombu import Connection as BrokerConnection

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
# RabbitMQ for --broker amqp: each design's stack gets a vhost of its own (rabbitmqctl, as root).
AMQP_BASE = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672").rstrip("/")
AMQP_USER = urlsplit(AMQP_BASE).username or "guest"
BROKER_QUEUES = ("default", "batch_processing")
RUN_ID = uuid.uuid4().hex[:10]
DB_NAME = f"intake_bench_{RUN_ID}"
DATABASE_URL = ADMIN_URL.rsplit("/", 1)[0] + "/" + DB_NAME
PENDING_BODIES = "intake:pending:bodies"  # app/pending.py RedisPendingStore.BODIES

# Targets from GitHub issue 3: reported, never asserted.
TARGETS = {
    "single_e2e_over_health": {"target": 0.5, "minimum": 0.3},
    "batch_e2e_over_copy": {"target": 0.5, "minimum": 0.35},
    "single_p99_ms": {"target_max": 25.0},
    "api_worker_peak_rss_mb": {"target_max": 150.0},
    "otlp_e2e_over_batch_e2e": {"target": 0.8},
}
# Issue 17: Intake on RabbitMQ at least 0.9 x Intake on Redis, single events and batches end
# to end, same run: reported, never asserted.
AMQP_OVER_REDIS_TARGET = 0.9
# The OTLP phase's records carry this placeholder in their "bench.id" attribute; otlp.lua
# replaces it with a unique id of the same width (see there).
OTLP_ID_PLACEHOLDER = "Z" * 24


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def otlp_export(event_name: str, numbers, time_unix_nano: int):
    """The OTLP phase's ExportLogsServiceRequest: record n shaped like the n-th batched event, all at one time."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    def attributes(values):
        kinds = {str: "string_value", bool: "bool_value", int: "int_value"}
        return [{"key": key, "value": {kinds[type(value)]: value} if not isinstance(value, list) else
                 {"array_value": {"values": [{"string_value": item} for item in value]}}}
                for key, value in values.items()]

    records = [{"time_unix_nano": time_unix_nano, "severity_number": 9, "severity_text": "INFO",
                "event_name": event_name, "body": {"string_value": "signup button clicked"},
                "attributes": attributes({"bench.id": OTLP_ID_PLACEHOLDER, "user.id": f"u{n % 1000}",
                                          "session": f"s{n % 97}", "page": "/pricing", "button": "signup",
                                          "ms": n % 500, "ok": True, "tags": ["a", "b"]})}
               for n in numbers]
    return ExportLogsServiceRequest(resource_logs=[{
        "resource": {"attributes": attributes({"service.name": "bench", "host.name": "bench-host"})},
        "scope_logs": [{"scope": {"name": "bench", "version": "1.0"}, "log_records": records}]}])


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------- processes

class Process:
    """A child in its own process group (so a signal reaches its children), output to a file."""

    def __init__(self, name, args, env, log_dir):
        self.name = name
        self.args = args
        self.env = env
        self.log_path = Path(log_dir) / f"{name}.log"
        self.proc = None
        self.log_file = None

    def start(self):
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_for_output(self, text, count=1, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.output().count(text) >= count:
                return
            if not self.alive():
                break
            time.sleep(0.2)
        raise BenchError(f"{self.name} did not print {text!r} x{count}:\n{self.output()[-3000:]}")

    def _signal_group(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def tree(self) -> list[tuple[int, int]]:
        """(pid, start time) of this process and its descendants."""
        table = process_table()
        return [(pid, table[pid][3]) for pid in process_tree(self.proc.pid, table)]

    @staticmethod
    def _alive(pid, started) -> bool:
        stat = proc_stat(pid)
        return stat is not None and stat[3] == started

    def stop(self, timeout=25):
        """SIGTERM to the group (a warm shutdown for Celery), then SIGKILL whatever of the tree is left."""
        if self.proc is None:
            return
        tree = self.tree() if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop in {timeout}s: SIGKILL")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(self._alive(*entry) for entry in tree[1:]):
            time.sleep(0.1)
        self._signal_group(signal.SIGKILL)
        for pid, started in tree:
            if self._alive(pid, started):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if self.log_file:
            self.log_file.close()


def rabbitmqctl(*args) -> str:
    result = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise BenchError(f"rabbitmqctl {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def claim_redis_db() -> int:
    """A free Redis db number (1-15), claimed for an hour."""
    # The same claim keys as tests/conftest.py, so a test run and a bench never share a db.
    control = redis_lib.Redis.from_url(f"{REDIS_BASE}/0", socket_connect_timeout=3)
    for number in range(1, 16):
        if control.set(f"intake:test-run:db:{number}", f"bench-{RUN_ID}", nx=True, ex=3600):
            return number
    raise BenchError("no free Redis db number (1-15)")


def release_redis_db(number: int):
    """Give back a number claim_redis_db claimed."""
    redis_lib.Redis.from_url(f"{REDIS_BASE}/0").delete(f"intake:test-run:db:{number}")


def await_health(web: Process, url: str, deadline: float):
    """Wait until gunicorn at `url` answers /health with 200."""
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if not web.alive() or time.monotonic() > deadline:
            raise BenchError(f"gunicorn did not start:\n{web.output()[-3000:]}")
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_stat(pid: int):
    """(ppid, pgid, cpu seconds used, start time) of a process, or None when it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[2]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, int(fields[19])


def process_table() -> dict:
    """pid -> proc_stat(pid) for every process on the machine."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None:
                table[int(entry)] = stat
    return table


def process_tree(root: int, table: dict) -> list[int]:
    """`root` and all its descendants, parents before children. Followed by parent id, not
    process group: start_celery_worker.sh runs each worker in a session of its own."""
    children = {}
    for pid, stat in table.items():
        children.setdefault(stat[0], []).append(pid)
    tree, todo = [], [root] if root in table else []
    while todo:
        pid = todo.pop(0)
        tree.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return tree


def machine_cpu():
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def proc_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def proc_memory_kb(pid: int):
    """(VmRSS, VmHWM) in kB, or None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            values[key] = int(value.split()[0])
    if "VmRSS" not in values:
        return None
    return values["VmRSS"], values.get("VmHWM", values["VmRSS"])


class MemorySampler(threading.Thread):
    """Samples VmRSS / VmHWM of every process of the stack (the started processes and their descendants)."""

    def __init__(self, roots: dict, interval=0.5):
        super().__init__(name="rss-sampler", daemon=True)
        self.roots = roots  # pid of a started process -> "web" | "worker" | "beat"
        self.interval = interval
        self.samples = {}  # pid -> list of (monotonic, rss_kb)
        self.hwm = {}  # pid -> last VmHWM kB
        self.roles = {}  # pid -> (role, queue)
        self._halt = threading.Event()

    def members(self, table) -> dict:
        """pid -> (ppid, root) for every process of the stack."""
        found = {}
        for root in self.roots:
            for pid in process_tree(root, table):
                found[pid] = (table[pid][0], root)
        return found

    def classify(self, pid, ppid, root):
        kind = self.roots[root]
        if kind == "web":
            return ("api_master" if pid == root else "api_worker" if ppid == root else "api_other"), None
        if kind == "beat":
            return ("beat" if pid == root else "beat_child"), None
        # Worker group: [bash start_celery_worker.sh] -> celery worker (main) -> prefork pool
        # children, which are forks of the main process with the same command line.
        parent = self.roles.get(ppid)
        if parent and parent[0] == "worker_main":
            return "worker_pool", parent[1]
        cmd = proc_cmdline(pid)
        if any(arg.endswith(":celery") for arg in cmd) and "worker" in cmd:
            flag = "--queues" if "--queues" in cmd else "-Q" if "-Q" in cmd else None
            return "worker_main", cmd[cmd.index(flag) + 1] if flag else None
        return ("worker_script" if pid == root else "worker_other"), None

    def scan(self):
        now = time.monotonic()
        members = self.members(process_table())
        # Parents come before children in the tree, so a pool child finds its worker's role.
        for pid, (ppid, root) in members.items():
            if pid not in self.roles:
                role = self.classify(pid, ppid, root)
                if role[0] == "worker_other":
                    continue  # e.g. the script's short-lived broker check
                self.roles[pid] = role
            memory = proc_memory_kb(pid)
            if memory is None:
                continue
            self.samples.setdefault(pid, []).append((now, memory[0]))
            self.hwm[pid] = memory[1]

    def run(self):
        while not self._halt.is_set():
            try:
                self.scan()
            except Exception as error:  # never let sampling break the run
                log(f"rss sampler: {error}")
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join(5)

    def cpu_snapshot(self, db_name):
        """CPU seconds used so far, by role: the stack's processes, this database's PostgreSQL
        backends, the Redis server and the RabbitMQ server (each shared with anything else
        using it), and the machine."""
        totals = {}
        table = process_table()
        members = self.members(table)
        for pid, stat in table.items():
            if pid in members:
                role = self.roles.get(pid, ("other",))[0]
                role = role if role in ("worker_main", "worker_pool", "api_worker", "api_master", "beat") \
                    else "stack_other"
            else:
                cmd = proc_cmdline(pid)
                head = cmd[0] if cmd else ""
                if head.startswith("postgres:") and f" {db_name} " in head + " ":
                    role = "postgres_backends"
                elif head.startswith("postgres:") and any(w in head for w in ("walwriter", "checkpointer",
                                                                                "background writer")):
                    role = "postgres_shared"
                elif "redis-server" in head:
                    role = "redis_server"
                elif head.endswith("/beam.smp"):  # RabbitMQ (shared, like Redis)
                    role = "rabbitmq_server"
                else:
                    continue
            totals.setdefault(role, {})[pid] = stat[2]
        busy, total = machine_cpu()
        return {"at": time.monotonic(), "roles": totals, "machine": (busy, total)}

    @staticmethod
    def cpu_between(before, after, wrk_s=0.0):
        """CPU seconds per role between two snapshots (processes present in both), wrk's, the
        machine's busy share, and `foreign_cores`: CPU used by anything else on the machine
        (other people's work: a noise indicator), in cores."""
        used = {}
        for role, pids in after["roles"].items():
            earlier = before["roles"].get(role, {})
            used[role] = round(sum(value - earlier[pid] for pid, value in pids.items() if pid in earlier), 3)
        used["wrk"] = round(wrk_s, 3)
        busy = after["machine"][0] - before["machine"][0]
        total = after["machine"][1] - before["machine"][1]
        wall = after["at"] - before["at"]
        foreign = busy / CLOCK_TICKS - sum(used.values())
        used["machine_busy_pct"] = round(100 * busy / total, 1) if total else None
        used["foreign_cores"] = round(max(foreign, 0.0) / wall, 2) if wall > 0 else None
        used["wall_s"] = round(wall, 3)
        return used

    def rss_at(self, pid, moment):
        """The last sample at or before `moment` (kB), else the first one."""
        series = self.samples.get(pid, [])
        best = series[0][1] if series else None
        for at, rss in series:
            if at > moment:
                break
            best = rss
        return best


# --------------------------------------------------------------------------- the run

class Bench:
    def __init__(self, args, design="intake", modes=("off",), broker="redis"):
        self.args = args
        self.design = design  # "intake", or "stock": bench/stock/
        self.modes = list(modes)  # rate limit "on" / "off": one gunicorn each, the first is the main one
        self.broker = broker  # Celery's broker: "redis" (the claimed db) or "amqp" (a RabbitMQ vhost of its own)
        self.webs = {}  # mode -> base URL
        name = DB_NAME if design == "intake" else f"{DB_NAME}_{design}"
        self.db_name = f"{name}_amqp" if broker == "amqp" else name
        self.database_url = ADMIN_URL.rsplit("/", 1)[0] + "/" + self.db_name
        self.vhost = name if broker == "amqp" else None
        self.vhost_created = False
        self.broker_url = None
        self.amqp = None  # connection for queue depths (passive queue_declare)
        self.rabbitmq_version = None
        self.tmp = Path(tempfile.mkdtemp(prefix="intake-bench-"))
        self.processes: list[Process] = []
        self.redis_number = None
        self.redis = None
        self.db_created = False
        self.sampler = None
        self.wrk_proc = None
        self.base_url = None
        self.env = None
        self.app_id = None
        self.api_key = None
        self.phase_windows = []  # (label, start, mid, end) monotonic, for RSS flatness
        self.last_wrk_cpu_s = 0.0

    # ----- set-up and tear-down

    def admin(self, sql):
        conn = psycopg2.connect(ADMIN_URL, connect_timeout=5)
        conn.autocommit = True
        try:
            conn.cursor().execute(sql)
        finally:
            conn.close()

    def create_vhost(self) -> str:
        """A RabbitMQ vhost for this stack (guest may use it): the broker URL on it."""
        if shutil.which("rabbitmqctl") is None:
            raise BenchError("--broker amqp needs rabbitmqctl (RabbitMQ's CLI, run as root) to make a vhost")
        rabbitmqctl("add_vhost", self.vhost)
        self.vhost_created = True
        rabbitmqctl("set_permissions", "-p", self.vhost, AMQP_USER, ".*", ".*", ".*")
        url = f"{AMQP_BASE}/{self.vhost}"
        try:
            with BrokerConnection(url, connect_timeout=3) as conn:
                conn.ensure_connection(max_retries=1)
                self.rabbitmq_version = conn.connection.server_properties.get("version")
        except Exception as error:
            raise BenchError(f"RabbitMQ at {AMQP_BASE.rsplit('@', 1)[-1]} is unreachable: {error}") from None
        log(f"{self.design}: RabbitMQ {self.rabbitmq_version} vhost {self.vhost}")
        return url

    def setup(self):
        try:
            psycopg2.connect(ADMIN_URL, connect_timeout=3).close()
        except Exception as error:
            raise BenchError(f"PostgreSQL at {ADMIN_URL} is unreachable: {error}") from None
        try:
            redis_lib.Redis.from_url(REDIS_BASE, socket_connect_timeout=3).ping()
        except Exception as error:
            raise BenchError(f"Redis at {REDIS_BASE} is unreachable: {error}") from None

        log(f"{self.design}/{self.broker}: creating database {self.db_name}")
        self.admin(f'CREATE DATABASE "{self.db_name}"')
        self.db_created = True
        self.redis_number = claim_redis_db()
        redis_url = f"{REDIS_BASE}/{self.redis_number}"
        self.redis = redis_lib.Redis.from_url(redis_url)
        self.redis.flushdb()
        log(f"Redis db {self.redis_number}")
        self.broker_url = self.create_vhost() if self.broker == "amqp" else redis_url

        venv_bin = str(Path(sys.executable).parent)
        instance = self.tmp / "instance"
        instance.mkdir()
        self.env = {
            **os.environ,
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            "APP_ENV": "development",
            "DATABASE_URL": self.database_url,
            "REDIS_URL": redis_url,
            "INSTANCE_PATH": str(instance),
            "LOG_LEVEL": self.args.log_level,
            "PYTHONUNBUFFERED": "1",
        }
        # Nothing from the caller's shell may point the stack elsewhere (e.g. gunicorn.conf.py
        # empties PROMETHEUS_MULTIPROC_DIR at start: it must be a folder of this run's own).
        for key in ("CELERY_BROKER_URL", "FLASK_DEBUG", "PROMETHEUS_MULTIPROC_DIR", "WORKER_METRICS_PORT",
                    "RATELIMIT_STORAGE_URI", "INGEST_RATE_LIMIT", "PORT", "STOCK_RATE_LIMIT"):
            self.env.pop(key, None)
        if self.broker == "amqp":
            # Intake's config (app/config.py) and, for bench/stock/'s Celery app, Celery itself
            # (its broker_url setting prefers this variable to the app's STOCK_REDIS_URL).
            self.env["CELERY_BROKER_URL"] = self.broker_url
        if self.design == "stock":  # bench/stock/ reads these; Intake's CLI below makes its schema and app
            self.env.update({"STOCK_DATABASE_URL": self.database_url, "STOCK_REDIS_URL": redis_url})

        self.flask("db", "upgrade")
        email = f"bench-{RUN_ID}@example.com"
        self.flask("users", "create", email, "--password", uuid.uuid4().hex, "--verified")
        created = self.flask("apps", "create", "bench", "--owner", email)
        self.app_id, self.api_key = created["app_id"], created["api_key"]
        log(f"app {self.app_id}")

    def flask(self, *args):
        result = subprocess.run([sys.executable, "-m", "flask", "--app", "run", *args], cwd=ROOT, env=self.env,
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise BenchError(f"flask {' '.join(args[:2])} failed:\n{result.stdout}\n{result.stderr}")
        for line in reversed(result.stdout.strip().splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        return None

    def start_stack(self):
        webs = []
        for mode in self.modes:
            port = free_port()
            self.webs[mode] = f"http://127.0.0.1:{port}"
            web_env = {**self.env, "PORT": str(port), "WEB_CONCURRENCY": str(self.args.web_workers),
                       "GUNICORN_THREADS": str(self.args.web_threads)}
            if self.design == "stock":
                if mode == "on":
                    web_env["STOCK_RATE_LIMIT"] = self.args.rate_limit_value
                args = [sys.executable, "-m", "gunicorn", "bench.stock.web:app", "--worker-class", "gthread",
                        "--workers", str(self.args.web_workers), "--threads", str(self.args.web_threads),
                        "--bind", f"127.0.0.1:{port}", "--log-level", "warning"]
            else:
                if mode == "on":
                    web_env["INGEST_RATE_LIMIT"] = self.args.rate_limit_value
                args = [sys.executable, "-m", "gunicorn", "run:app", "-c", "gunicorn.conf.py"]
            webs.append(self.start(Process(f"gunicorn-{self.design}-rate-limit-{mode}", args, web_env, self.tmp)))
        self.base_url = self.webs[self.modes[0]]
        worker_env = dict(self.env)
        worker_env.pop("CELERY_CONCURRENCY", None)
        if self.args.worker_concurrency:  # else the start script's own defaults, as deployed
            worker_env["CELERY_CONCURRENCY"] = str(self.args.worker_concurrency)
        beat = None
        if self.design == "stock":
            # One plain `celery worker -c N` per queue (N: --worker-concurrency, else 2).
            workers = [self.start(Process(f"stock-worker-{queue}", [
                sys.executable, "-m", "celery", "-A", "bench.stock.tasks:celery", "worker", "--queues", queue,
                "--hostname", f"stock-{queue}-{RUN_ID}@%h", "--concurrency", str(self.args.worker_concurrency or 2),
                "--loglevel", self.args.log_level], self.env, self.tmp)) for queue in ("default", "batch_processing")]
            expected_ready = 1
        elif self.args.shared_worker:
            args = [sys.executable, "-m", "celery", "-A", "run:celery", "worker", "--queues",
                    "default,batch_processing", "--hostname", f"bench-{RUN_ID}@%h",
                    "--concurrency", str(self.args.worker_concurrency or 2), "--loglevel", self.args.log_level]
            workers, expected_ready = [self.start(Process("worker", args, worker_env, self.tmp))], 1
        else:
            # The project's own start script: one prefork worker per queue, as the Procfile runs them.
            workers = [self.start(Process("worker", ["bash", "start_celery_worker.sh", "default", "batch_processing"],
                                          worker_env, self.tmp))]
            expected_ready = 2
        if self.design == "intake":
            beat = self.start(Process("beat", [sys.executable, "-m", "celery", "-A", "run:celery", "beat",
                                               "--loglevel", "INFO", "-s", str(self.tmp / "beat-schedule")],
                                      self.env, self.tmp))
        deadline = time.monotonic() + 60
        for web, url in zip(webs, self.webs.values()):
            await_health(web, url, deadline)
        if self.args.log_level.upper() in ("INFO", "DEBUG"):
            for worker in workers:
                worker.wait_for_output(" ready.", count=expected_ready, timeout=90)
        for url in self.webs.values():
            self.base_url = url
            self.probe(workers)
        self.base_url = self.webs[self.modes[0]]
        if beat is not None and not beat.alive():
            raise BenchError(f"celery beat exited:\n{beat.output()[-3000:]}")
        roots = {web.pid: "web" for web in webs}
        roots.update({worker.pid: "worker" for worker in workers})
        if beat is not None:
            roots[beat.pid] = "beat"
        self.sampler = MemorySampler(roots)
        self.sampler.start()
        log(f"{self.design}/{self.broker} stack up: {len(webs)} x gunicorn "
            f"{self.args.web_workers}x{self.args.web_threads} "
            f"(rate limit {', '.join(self.modes)}), workers "
            f"({'shared' if self.args.shared_worker else 'per queue'}, {processes(self.args, self.design)})"
            f"{', beat' if beat else ''}")

    def start(self, process):
        self.processes.append(process)
        return process.start()

    def post(self, path, body):
        request = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json", "X-API-Key": self.api_key})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status

    def probe(self, workers, timeout=90):
        """Ready means: one event and one batch go through both queues and are stored."""
        name = f"bench.probe.{len(self.phase_windows)}.{self.base_url.rsplit(':', 1)[1]}"
        self.post(f"/api/logs/{self.app_id}", {"event_name": name, "event_id": f"probe-{name}"})
        self.post(f"/api/logs/{self.app_id}/batch", [{"event_name": name, "event_id": f"probe-{name}-{i}"}
                                                     for i in range(2)])
        conn = self.connect()
        try:
            deadline = time.monotonic() + timeout
            while self.count_events(conn.cursor(), name)[0] < 3:
                if time.monotonic() > deadline or not all(worker.alive() for worker in workers):
                    raise BenchError(f"the workers did not store a probe event within {timeout}s:\n"
                                     + "\n".join(worker.output()[-3000:] for worker in workers))
                time.sleep(0.2)
        finally:
            conn.close()

    def check_stack(self):
        for process in self.processes:
            if not process.alive():
                raise BenchError(f"{process.name} exited during the run:\n{process.output()[-3000:]}")

    def teardown(self):
        """Stop everything this run started and remove its database and Redis data; never raises."""
        def attempt(what, action):
            try:
                action()
            except BaseException as error:  # keep going: the next step must still run
                log(f"teardown, {what}: {error!r}")

        if self.wrk_proc and self.wrk_proc.poll() is None:
            attempt("wrk", lambda: os.killpg(self.wrk_proc.pid, signal.SIGKILL))
        if self.sampler:
            attempt("rss sampler", self.sampler.stop)
        for process in reversed(self.processes):
            attempt(f"stopping {process.name}", process.stop)
        if self.args.keep_logs:
            attempt("keeping logs", self.keep_logs)
        if self.amqp is not None:
            attempt("closing the queue-depth connection", self.amqp.release)
            self.amqp = None
        if self.vhost_created:
            attempt(f"deleting vhost {self.vhost}", lambda: rabbitmqctl("delete_vhost", self.vhost))
            self.vhost_created = False
            log(f"deleted vhost {self.vhost}")
        if self.redis_number is not None:
            attempt(f"flushing Redis db {self.redis_number}", self.redis.flushdb)
            attempt("releasing the Redis db claim", lambda: release_redis_db(self.redis_number))
            self.redis_number = None
        if self.db_created:
            attempt(f"dropping {self.db_name}",
                    lambda: self.admin(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
            self.db_created = False
            log(f"dropped database {self.db_name}")
        shutil.rmtree(self.tmp, ignore_errors=True)

    def keep_logs(self):
        kept = RESULTS / "logs"
        if self.broker == self.args.brokers[0] and self.design == self.args.designs[0]:
            shutil.rmtree(kept, ignore_errors=True)  # the run's first stack: last run's logs go
        kept.mkdir(parents=True, exist_ok=True)
        for path in self.tmp.glob("*.log"):
            shutil.copy(path, kept / (path.name if self.broker == "redis" else f"{path.stem}-{self.broker}.log"))
        log(f"logs kept in {kept}")

    def broker_config(self) -> dict:
        """What the JSON says about this stack's broker."""
        if self.broker == "redis":
            return {"broker": "redis", "broker_url": self.broker_url}
        queues = ("quorum queues, publisher confirms (celery_config.AMQP_SETTINGS)" if self.design == "intake"
                  else "Celery's defaults: classic durable queues, no publisher confirms")
        return {"broker": "amqp", "broker_url": re.sub(r"//[^@/]*@", "//", self.broker_url),
                "rabbitmq_version": self.rabbitmq_version, "queues": queues}

    # ----- database helpers

    def connect(self):
        conn = psycopg2.connect(self.database_url)
        conn.autocommit = True
        return conn

    def count_events(self, cur, event_name) -> tuple[int, int]:
        cur.execute("SELECT count(*) FROM events WHERE app_id = %s AND event_name = %s", (self.app_id, event_name))
        stored = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM failed_events WHERE app_id = %s AND event->>'event_name' = %s",
                    (self.app_id, event_name))
        return stored, cur.fetchone()[0]

    def published_messages(self, queue):
        """(messages, seconds spent publishing them) the API has published to `queue` so far, from
        its /metrics (None if unavailable): a publish is the pending record and the message (on
        RabbitMQ: until the broker's confirm)."""
        if self.design != "intake":
            return None
        try:
            with urllib.request.urlopen(self.base_url + "/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return None
        found = [re.search(r'^intake_publish_duration_seconds_%s\{queue="%s"\} (\S+)$' % (stat, queue), text, re.M)
                 for stat in ("count", "sum")]
        return (float(found[0].group(1)), float(found[1].group(1))) if all(found) else None

    def queued_messages(self) -> int:
        """Messages waiting in the broker's queues for a worker (taken but unacknowledged ones not
        counted): Redis list lengths, or RabbitMQ's message_count from a passive queue_declare."""
        if self.broker == "redis":
            return sum(self.redis.llen(queue) for queue in BROKER_QUEUES)
        for attempt in (1, 2):
            try:
                if self.amqp is None:
                    self.amqp = BrokerConnection(self.broker_url, connect_timeout=3)
                channel = self.amqp.default_channel
                return sum(channel.queue_declare(queue=queue, passive=True).message_count for queue in BROKER_QUEUES)
            except Exception:
                # A passive declare that fails closes the channel: start over on a new connection.
                if self.amqp is not None:
                    self.amqp.release()
                self.amqp = None
                if attempt == 2:
                    raise

    def pending_count(self) -> int:
        if self.design == "stock":  # no pending store: messages still queued
            return self.queued_messages()
        return self.redis.hlen(PENDING_BODIES)  # Intake's pending store is on Redis whatever the broker

    def wait_drained(self, cur, event_name, accepted, timeout):
        """Wait until nothing is pending and every accepted event is stored (or failed);
        return (epoch seconds when that was seen, whether it was)."""
        started = time.monotonic()
        while True:
            if self.pending_count() == 0:
                stored, failed = self.count_events(cur, event_name)
                if stored + failed >= accepted:
                    return time.time(), True
            if time.monotonic() - started > timeout:
                return time.time(), False
            time.sleep(self.args.poll_interval)

    # ----- wrk

    def wrk(self, script, path, duration, *, prefix="-", event_name="bench", per_request=1, expected=200,
            api_key="-", ids_dir="-", deadline=None, grace=0, watch=None, extra_args=()):
        """Run wrk for `duration` (+ `grace`) seconds and return its result.

        With `deadline` (epoch seconds) the Lua script sends no request after it, and wrk
        keeps running `grace` seconds more so that the requests in flight finish. `watch`,
        if given, is called every poll interval while wrk runs (to see the queue drain)."""
        args = ["wrk", "-t", str(self.args.threads), "-c", str(self.args.connections),
                "-d", f"{duration + grace}s", "--timeout", "10s", "-s", str(BENCH / script), self.base_url + path,
                "--", api_key, prefix, str(ids_dir), str(per_request), event_name, str(expected),
                "-" if deadline is None else f"{deadline:.6f}", *extra_args]
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            self.wrk_proc = subprocess.Popen(args, stdout=out, stderr=err, text=True, start_new_session=True)
            limit = time.monotonic() + duration + grace + 60
            while self.wrk_proc.poll() is None:
                if time.monotonic() > limit:
                    raise BenchError("wrk did not finish in time")
                if watch is not None:
                    watch()
                time.sleep(self.args.poll_interval)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.last_wrk_cpu_s = (children_after.ru_utime + children_after.ru_stime
                               - children_before.ru_utime - children_before.ru_stime)
        if self.wrk_proc.returncode != 0:
            raise BenchError(f"wrk failed ({self.wrk_proc.returncode}):\n{stdout}\n{stderr}")
        for line in stdout.splitlines():
            if line.startswith("BENCH_WRK_JSON "):
                return json.loads(line[len("BENCH_WRK_JSON "):]), time.monotonic()
        raise BenchError(f"wrk printed no result:\n{stdout}\n{stderr}")

    # ----- phases

    def warm_up(self, cur):
        """A short burst on each endpoint (connections, caches, publisher thread), then drain."""
        seconds = self.args.warmup
        if seconds <= 0:
            return
        name = "bench.warmup"
        accepted = 0
        for mode, url in self.webs.items():
            self.base_url = url
            for script, path, per_request in (("single.lua", "", 1), ("batch.lua", "/batch", self.args.batch_size)):
                result, _ = self.wrk(script, f"/api/logs/{self.app_id}{path}", seconds,
                                     prefix=f"warm{mode}{per_request}", event_name=name, per_request=per_request,
                                     expected=202, api_key=self.api_key)
                accepted += result["acked_events"]
            if self.design == "intake":
                result, _ = self.wrk("otlp.lua", f"/api/otlp/{self.app_id}/v1/logs", seconds, prefix=f"warmo{mode}",
                                     event_name=name, per_request=self.args.batch_size, expected=200,
                                     api_key=self.api_key, extra_args=self.otlp_template(name))
                accepted += result["ok"] * self.args.batch_size
            self.wrk("health.lua", "/health", min(seconds, 1))
        self.base_url = self.webs[self.modes[0]]
        _, drained = self.wait_drained(cur, name, accepted, self.args.drain_timeout)
        log(f"{self.design}/{self.broker} warm-up: {accepted} events {'drained' if drained else 'NOT drained'}")

    def phase_health(self):
        started = time.monotonic()
        cpu_before = self.sampler.cpu_snapshot(self.db_name)
        result, ended = self.wrk("health.lua", "/health", self.args.duration)
        cpu = self.sampler.cpu_between(cpu_before, self.sampler.cpu_snapshot(self.db_name), self.last_wrk_cpu_s)
        self.phase_windows.append(("health", started, ended, ended))
        rps = result["ok"] / result["duration_s"]
        log(f"{self.design}/{self.broker} health: {rps:,.0f} req/s, p99 {result['latency_ms']['p99']:.1f} ms, "
            f"non-200 {result['other']}, "
            f"machine busy {cpu['machine_busy_pct']}%, foreign load {cpu['foreign_cores']} cores")
        return {"requests_per_s": rps, "requests": result["requests"], "non_200": result["other"],
                "latency_ms": result["latency_ms"], "socket_errors": result["socket_errors"],
                "api_cpu_ms_per_request": 1000 * cpu.get("api_worker", 0) / max(result["ok"], 1),
                "cpu_s": cpu}

    def otlp_template(self, event_name) -> tuple[str, str]:
        """otlp.lua's arguments: a file holding one protobuf export of --batch-size records, and the placeholder."""
        request = otlp_export(event_name, range(self.args.batch_size), time.time_ns())
        path = self.tmp / f"otlp-{event_name}.pb"
        path.write_bytes(request.SerializeToString())
        return str(path), OTLP_ID_PLACEHOLDER

    def phase_ingest(self, cur, kind, repeat, label=None):
        label = label or kind  # e.g. single_rate_limit_off: the same load on the other gunicorn
        per_request = 1 if kind == "single" else self.args.batch_size
        script = {"single": "single.lua", "batch": "batch.lua", "otlp": "otlp.lua"}[kind]
        path = {"single": f"/api/logs/{self.app_id}", "batch": f"/api/logs/{self.app_id}/batch",
                "otlp": f"/api/otlp/{self.app_id}/v1/logs"}[kind]
        name = f"bench.{label}.r{repeat}"
        # OTLP answers 200 with an empty body: no event ids come back, so its records are
        # counted, and checked by their unique bench.id, instead.
        expected = 200 if kind == "otlp" else 202
        extra_args = self.otlp_template(name) if kind == "otlp" else ()
        ids_dir = self.tmp / f"ids-{label}-{repeat}"
        ids_dir.mkdir()
        queue = "default" if kind == "single" else "batch_processing"
        cur.execute("CHECKPOINT")  # see phase_copy
        published_before = self.published_messages(queue)
        started = time.monotonic()
        cpu_start = self.sampler.cpu_snapshot(self.db_name)
        deadline = time.time() + self.args.duration
        # While wrk runs: after the deadline, note the load's end (stored count, CPU) and the
        # first moment nothing is pending any more (the queue may drain before wrk exits).
        seen = {"load_end": None, "empty_at": None, "queued": None}

        def watch():
            if time.time() < deadline:
                return
            if seen["load_end"] is None:
                seen["load_end"] = (time.time(), self.count_events(cur, name)[0], self.sampler.cpu_snapshot(self.db_name))
                seen["queued"] = self.queued_messages()  # the broker's backlog when the load ended
            if self.pending_count() == 0:
                seen["empty_at"] = seen["empty_at"] or time.time()
            else:
                seen["empty_at"] = None

        prefix = f"{kind[0]}{repeat}" if label == kind else f"{kind[0]}{label[-3:].strip('_')}{repeat}"
        result, _ = self.wrk(script, path, self.args.duration, prefix=prefix, event_name=name,
                             per_request=per_request, expected=expected, api_key=self.api_key, ids_dir=ids_dir,
                             deadline=deadline, grace=self.args.grace, watch=watch, extra_args=extra_args)
        wrk_cpu_s = self.last_wrk_cpu_s
        if seen["load_end"] is None:
            watch()
        load_end_at, stored_at_load_end, cpu_load_end = seen["load_end"]
        first_at, last_at = result["first_request_at"], result["last_response_at"]
        load_s = last_at - first_at if first_at and last_at > first_at else self.args.duration
        acked_ids = []
        for path_ in sorted(ids_dir.glob("accepted-*.txt")):
            acked_ids.extend(line for line in path_.read_text().splitlines() if line)
        accepted = result["ok"] * per_request  # 202 responses x events per request
        target = max(accepted, len(acked_ids))
        stored_now, failed_now = self.count_events(cur, name)
        if seen["empty_at"] is not None and self.pending_count() == 0 and stored_now + failed_now >= target:
            drained_at, drained = max(seen["empty_at"], last_at), True
        else:
            # Wait for every event the server acknowledged (its ids, read from the 202 bodies).
            drained_at, drained = self.wait_drained(cur, name, target, self.args.drain_timeout)
        drain_s = max(drained_at - last_at, 0.0)
        cpu_drained = self.sampler.cpu_snapshot(self.db_name)
        published_after = self.published_messages(queue)
        messages, publish_s = ((None, None) if published_before is None or published_after is None else
                               (published_after[0] - published_before[0], published_after[1] - published_before[1]))
        stored_at_drain, failed = self.count_events(cur, name)
        cpu_load = self.sampler.cpu_between(cpu_start, cpu_load_end, wrk_cpu_s)
        cpu_drain = self.sampler.cpu_between(cpu_load_end, cpu_drained)

        def used(*roles):
            """CPU seconds of these roles during the load and the drain."""
            return sum(c.get(r, 0) for c in (cpu_load, cpu_drain) for r in roles)

        worker_cpu, pg_cpu = used("worker_pool", "worker_main"), used("postgres_backends")
        # The broker servers are shared (the other broker's idle stack, anyone else): an upper bound.
        redis_cpu, rabbitmq_cpu = used("redis_server"), used("rabbitmq_server")
        # Requests cut off when wrk stopped may still be stored: let them land before the id check.
        time.sleep(0.5)
        settle = time.monotonic() + 10
        while self.pending_count() and time.monotonic() < settle:
            time.sleep(0.1)
        drained_mono = time.monotonic() - (time.time() - drained_at)
        self.phase_windows.append((f"{kind}.r{repeat}", started, started + load_s / 2, drained_mono))

        cur.execute("SELECT event_id, count(*) FROM events WHERE app_id = %s AND event_name = %s GROUP BY event_id",
                    (self.app_id, name))
        stored_counts = dict(cur.fetchall())
        stored_rows = sum(stored_counts.values())
        acked_set = set(acked_ids)
        stored_set = set(stored_counts)
        lost = len(acked_set - stored_set)
        duplicated_rows = stored_rows - len(stored_set)  # same event_id stored twice
        acked_twice = len(acked_ids) - len(acked_set)  # same event_id acknowledged twice
        unacknowledged_stored = len(stored_set - acked_set)  # in flight when wrk stopped
        if kind == "otlp":
            # Event ids are hashes of the records: count the distinct records (bench.id) instead.
            cur.execute("SELECT count(DISTINCT payload->'attributes'->>'bench.id') FROM events"
                        " WHERE app_id = %s AND event_name = %s", (self.app_id, name))
            distinct_records = cur.fetchone()[0]
            lost = max(accepted - distinct_records, 0)
            duplicated_rows += stored_rows - distinct_records
            unacknowledged_stored = max(distinct_records - accepted, 0)

        figures = {
            "load_s": load_s,
            "drain_s": drain_s,
            "drained": drained,
            "requests": result["requests"],
            "responses_202": result["ok"],
            "non_202": result["other"],
            "statuses": result["statuses"],
            "socket_errors": result["socket_errors"],
            "first_error_body": result["first_error"] or None,
            "events_per_request": per_request,
            "accepted_events": accepted,
            "acked_event_ids": len(acked_ids),
            "requests_per_s": result["ok"] / load_s,
            "accepted_events_per_s": accepted / load_s,
            "rows_stored": stored_rows,
            "rows_stored_at_drain": stored_at_drain,
            "failed_events": failed,
            "e2e_events_per_s": stored_at_drain / (load_s + drain_s),
            "rows_stored_at_load_end": stored_at_load_end,
            "stored_during_load_per_s": stored_at_load_end / load_s,
            "drain_events_per_s": ((stored_at_drain - stored_at_load_end) / (drained_at - load_end_at)
                                   if drained_at - load_end_at > 0.2 else None),
            # Group commit: how many events travel in one message (the API's /metrics, if it has them).
            "messages_published": messages,
            "events_per_message": stored_at_drain / messages if messages else None,
            # Mean time to publish one group (pending record + message; on RabbitMQ until its confirm).
            "publish_ms_per_message": 1000 * publish_s / messages if messages else None,
            "messages_queued_at_load_end": seen["queued"],
            "api_cpu_ms_per_event": 1000 * cpu_load.get("api_worker", 0) / max(accepted, 1),
            "worker_cpu_ms_per_event": 1000 * worker_cpu / max(stored_at_drain, 1),
            "postgres_cpu_ms_per_event": 1000 * pg_cpu / max(stored_at_drain, 1),
            "redis_cpu_ms_per_event": 1000 * redis_cpu / max(stored_at_drain, 1),
            "rabbitmq_cpu_ms_per_event": 1000 * rabbitmq_cpu / max(stored_at_drain, 1),
            "cpu_s_load": cpu_load,
            "cpu_s_drain": cpu_drain,
            "latency_ms": result["latency_ms"],
            "p50_ms": result["latency_ms"]["p50"],
            "p99_ms": result["latency_ms"]["p99"],
            "count_check_stored_minus_accepted": stored_rows - accepted,
            "lost": lost,
            "duplicated": duplicated_rows + acked_twice,
            "stored_unacknowledged": unacknowledged_stored,
        }
        publish = figures["publish_ms_per_message"]
        log(f"{self.design}/{self.broker} {label}: {figures['accepted_events_per_s']:,.0f} accepted events/s "
            f"({figures['requests_per_s']:,.0f} req/s), p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms, "
            f"drain {drain_s:.2f}s, e2e {figures['e2e_events_per_s']:,.0f} events/s, stored {stored_rows}, "
            f"CPU ms/event api {figures['api_cpu_ms_per_event']:.2f} workers {figures['worker_cpu_ms_per_event']:.2f} "
            f"pg {figures['postgres_cpu_ms_per_event']:.2f} redis {figures['redis_cpu_ms_per_event']:.2f} "
            f"rabbitmq {figures['rabbitmq_cpu_ms_per_event']:.2f}"
            f"{f', publish {publish:.2f} ms/message' if publish is not None else ''}, "
            f"machine busy {cpu_load['machine_busy_pct']}%, "
            f"foreign load {cpu_load['foreign_cores']} cores, "
            f"accepted {accepted}, lost {lost}, duplicated {figures['duplicated']}, non-202 {result['other']}")
        return figures

    def phase_copy(self, cur, rows):
        """COPY `rows` rows like the batch phase's into a scratch table shaped like `events`."""
        rows = max(rows, 1000)
        # Each timed phase starts right after a checkpoint: one that the earlier phases' WAL
        # set off in the middle of a COPY made it read anywhere from 53,000 to 92,000 rows/s.
        cur.execute("CHECKPOINT")
        cur.execute("DROP TABLE IF EXISTS bench_copy_scratch")
        cur.execute("CREATE TABLE bench_copy_scratch (LIKE events INCLUDING ALL)")
        # The idempotency index moved from events to event_keys (partitioned tables cannot
        # hold it): the ceiling keeps it, so that it is the same table as before that move.
        cur.execute("CREATE UNIQUE INDEX ON bench_copy_scratch (app_id, event_id)")
        cur.execute("CREATE SEQUENCE bench_copy_scratch_id_seq OWNED BY bench_copy_scratch.id")
        cur.execute("ALTER TABLE bench_copy_scratch ALTER COLUMN id SET DEFAULT nextval('bench_copy_scratch_id_seq')")
        now = datetime.now(timezone.utc)
        stamp = now.isoformat()
        validation = json.dumps({"status": "valid", "warnings": []})
        buffer = io.StringIO()
        prefix = f"copy-{uuid.uuid4().hex[:6]}"
        for n in range(rows):
            event_id = f"{prefix}-{n // 100}-{n % 100}"
            payload = json.dumps({"event_name": "bench.copy", "event_id": event_id, "level": "info",
                                  "user_id": f"u{n % 1000}", "session": f"s{n % 97}",
                                  "properties": {"page": "/pricing", "button": "signup", "ms": n % 500, "ok": True,
                                                 "tags": ["a", "b"]}}, separators=(",", ":"))
            buffer.write("\t".join((self.app_id, event_id, "bench.copy", "info", f"u{n % 1000}", stamp, stamp, stamp,
                                    validation, payload)))
            buffer.write("\n")
        buffer.seek(0)
        conn = psycopg2.connect(self.database_url)
        try:
            copy_cur = conn.cursor()
            started = time.perf_counter()
            copy_cur.copy_expert(
                "COPY bench_copy_scratch (app_id, event_id, event_name, level, user_id, timestamp, received_at, "
                "processed_at, validation, payload) FROM STDIN", buffer)
            conn.commit()
            elapsed = time.perf_counter() - started
        finally:
            conn.close()
        cur.execute("DROP TABLE bench_copy_scratch")
        rate = rows / elapsed
        log(f"copy: {rows} rows in {elapsed:.3f}s = {rate:,.0f} rows/s")
        return {"rows": rows, "seconds": elapsed, "rows_per_s": rate}

    def run_once(self, cur, repeat):
        self.check_stack()
        main_url = self.webs[self.modes[0]]
        figures = {"health": self.phase_health()}
        # Single events on each gunicorn (rate limit on / off), the order alternating from run to run.
        for mode in (self.modes if repeat % 2 else list(reversed(self.modes))):
            self.check_stack()
            self.base_url = self.webs[mode]
            label = "single" if mode == self.modes[0] else f"single_rate_limit_{mode}"
            figures[label] = self.phase_ingest(cur, "single", repeat, label=label)
        self.base_url = main_url
        self.check_stack()
        figures["batch"] = self.phase_ingest(cur, "batch", repeat)
        self.check_stack()
        if self.design == "intake":  # the OTLP route and the database ceiling: Intake's run only
            figures["otlp"] = self.phase_ingest(cur, "otlp", repeat)
            self.check_stack()
            figures["copy"] = self.phase_copy(cur, figures["batch"]["rows_stored_at_drain"])
        figures["ratios"] = ratios(figures)
        return figures

    def rss_report(self):
        sampler = self.sampler
        if sampler is None:
            return {}
        sampler.scan()
        processes = []
        for pid, (role, queue) in sorted(sampler.roles.items()):
            series = sampler.samples.get(pid)
            if not series:
                continue
            rss = [value for _, value in series]
            # Growth during the second half of each ingest phase (mid-load to drained): a process
            # whose memory keeps rising under a steady load of the same shape is not flat.
            growth = []
            for label, start, mid, end in self.phase_windows:
                if label == "health":
                    continue
                before, after = sampler.rss_at(pid, mid), sampler.rss_at(pid, end)
                if before is not None and after is not None:
                    growth.append({"phase": label, "mb": round((after - before) / 1024, 1)})
            max_growth = max((g["mb"] for g in growth), default=0.0)
            peak = max(max(rss), sampler.hwm.get(pid, 0))
            processes.append({
                "role": role, "queue": queue, "pid": pid,
                "rss_first_mb": round(rss[0] / 1024, 1),
                "rss_last_mb": round(rss[-1] / 1024, 1),
                "rss_peak_sampled_mb": round(max(rss) / 1024, 1),
                "vm_hwm_mb": round(sampler.hwm.get(pid, 0) / 1024, 1),
                "peak_mb": round(peak / 1024, 1),
                "growth_second_half_of_phase_mb": growth,
                "max_growth_mb": max_growth,
                "flat": max_growth <= max(5.0, 0.05 * max(rss) / 1024),
                "samples": len(rss),
            })

        def peak(role):
            return max((p["peak_mb"] for p in processes if p["role"] == role), default=None)

        def flat(role):
            chosen = [p["flat"] for p in processes if p["role"] == role]
            return all(chosen) if chosen else None

        return {
            "api_worker_peak_rss_mb": peak("api_worker"),
            "api_master_peak_rss_mb": peak("api_master"),
            "worker_pool_peak_rss_mb": peak("worker_pool"),
            "worker_main_peak_rss_mb": peak("worker_main"),
            "beat_peak_rss_mb": peak("beat"),
            "api_worker_rss_flat": flat("api_worker"),
            "worker_rss_flat": flat("worker_pool") and flat("worker_main"),
            "flat_rule": "growth from mid-load to drained in every ingest phase <= max(5 MB, 5% of peak)",
            "processes": processes,
        }


def processes(args, design="intake") -> str:
    """The pool processes of the bench's workers, for the log and the JSON."""
    if args.worker_concurrency:
        return f"-c{args.worker_concurrency}"
    return "-c2" if args.shared_worker or design == "stock" else "default -c2, batch_processing -c4"


def ratios(figures):
    health = figures["health"]["requests_per_s"]
    copy = figures.get("copy", {}).get("rows_per_s")
    return {
        "single_e2e_over_health": figures["single"]["e2e_events_per_s"] / health if health else None,
        "single_accepted_over_health": figures["single"]["accepted_events_per_s"] / health if health else None,
        "batch_e2e_over_copy": figures["batch"]["e2e_events_per_s"] / copy if copy else None,
        "batch_accepted_over_copy": figures["batch"]["accepted_events_per_s"] / copy if copy else None,
        "otlp_e2e_over_batch_e2e": (figures["otlp"]["e2e_events_per_s"] / figures["batch"]["e2e_events_per_s"]
                                    if "otlp" in figures and figures["batch"]["e2e_events_per_s"] else None),
    }


# Fault counts are totals over the runs; every other number is the median of the runs.
SUMMED = {"lost", "duplicated", "non_202", "non_200", "failed_events", "stored_unacknowledged", "statuses",
          "socket_errors"}


def _sum(values):
    if all(isinstance(v, dict) for v in values):
        keys = {k for v in values for k in v}
        return {k: _sum([v[k] for v in values if k in v]) for k in sorted(keys)}
    return sum(values)


def median_of(runs):
    """Median of each number over the runs; fault counts (lost, duplicated, non-2xx …) are summed."""
    first = runs[0]
    if isinstance(first, dict):
        merged = {}
        for key in first:
            values = [run[key] for run in runs if key in run]
            merged[key] = _sum(values) if key in SUMMED else median_of(values)
        return merged
    if isinstance(first, bool):
        return all(runs)
    if first is None or isinstance(first, (int, float)):
        numbers = [v for v in runs if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return statistics.median(numbers) if numbers else None
    return first


def rounded(value):
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def verdicts(result):
    single_ratio = result["ratios"]["single_e2e_over_health"]
    batch_ratio = result["ratios"]["batch_e2e_over_copy"]
    p99 = result["single"]["p99_ms"]
    api_rss = result["rss"].get("api_worker_peak_rss_mb")
    otlp_ratio = result["ratios"]["otlp_e2e_over_batch_e2e"]
    return {
        "single_e2e_over_health": {"value": single_ratio, **TARGETS["single_e2e_over_health"],
                                   "meets_target": single_ratio >= 0.5, "meets_minimum": single_ratio >= 0.3},
        "batch_e2e_over_copy": {"value": batch_ratio, **TARGETS["batch_e2e_over_copy"],
                                "meets_target": batch_ratio >= 0.5, "meets_minimum": batch_ratio >= 0.35},
        "single_p99_ms": {"value": p99, **TARGETS["single_p99_ms"], "meets_target": p99 <= 25.0},
        "api_worker_peak_rss_mb": {"value": api_rss, **TARGETS["api_worker_peak_rss_mb"],
                                   "meets_target": api_rss is not None and api_rss <= 150.0},
        "otlp_e2e_over_batch_e2e": {"value": otlp_ratio, **TARGETS["otlp_e2e_over_batch_e2e"],
                                    "meets_target": otlp_ratio is not None and otlp_ratio >= 0.8},
    }


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "app", "celery_config.py", "gunicorn.conf.py",
                                "run.py", "start_celery_worker.sh"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--duration", type=float, default=10, help="seconds of load per phase")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--repeat", type=int, default=1, help="run the phases N times; report the median")
    parser.add_argument("--batch-size", type=int, default=100, help="events per batch request")
    parser.add_argument("--warmup", type=float, default=1, help="seconds of warm-up load per endpoint (0: none)")
    parser.add_argument("--drain-timeout", type=float, default=60, help="seconds to wait for the queue to drain")
    parser.add_argument("--grace", type=int, default=2,
                        help="seconds wrk keeps running after the deadline so that requests in flight finish")
    parser.add_argument("--poll-interval", type=float, default=0.05, help="seconds between drain checks")
    parser.add_argument("--web-workers", type=int, default=2, help="gunicorn workers (WEB_CONCURRENCY)")
    parser.add_argument("--web-threads", type=int, default=8, help="gunicorn threads per worker (as deployed: 8)")
    parser.add_argument("--worker-concurrency", type=int, default=0,
                        help="Celery prefork concurrency of every worker (0: start_celery_worker.sh's defaults, "
                             "as deployed: 2, and 4 for batch_processing)")
    parser.add_argument("--shared-worker", action="store_true",
                        help="one Celery worker for both queues instead of one per queue (start_celery_worker.sh)")
    parser.add_argument("--log-level", default="INFO", help="Celery workers' log level (as deployed: INFO)")
    parser.add_argument("--designs", default="intake",
                        help="comma-separated, run in this order: intake, stock (bench/stock/: the design of the "
                             "seeds, on the same loads, after Intake's processes stop)")
    parser.add_argument("--broker", choices=("redis", "amqp", "both"), default="redis",
                        help="Celery's broker for every design: redis (the run's Redis db), amqp (RabbitMQ at "
                             "BENCH_AMQP_URL, a vhost of the run's own; Redis keeps the pending store, rules cache and "
                             "rate limits), both: each design's stack on each, side by side, the repeats taking turns")
    parser.add_argument("--rate-limit", choices=("on", "off", "both"), default="off",
                        help="per-app rate limit (--rate-limit-value, never reached) on the API; both: one gunicorn "
                             "with and one without, single events on each (alternating), everything else with")
    parser.add_argument("--rate-limit-value", default="1000000/second",
                        help="INGEST_RATE_LIMIT of Intake and the stock design's Flask-Limiter limit")
    parser.add_argument("--keep-logs", action="store_true", help="copy the processes' logs to bench/results/logs")
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json", help="where to write the JSON")
    parser.add_argument("--write-path", type=int, default=0, metavar="ROWS",
                        help="also time the worker's write statement before and after de-duplication keys, "
                             "partitions and rollup deltas on ROWS rows per group size (bench/write_path.py)")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.connections < 1 or args.repeat < 1 or args.threads < 1:
        parser.error("--duration, --connections, --repeat and --threads must be positive")
    args.duration = int(round(args.duration))
    args.warmup = int(round(args.warmup))
    args.threads = min(args.threads, args.connections)
    args.designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    if not args.designs or set(args.designs) - {"intake", "stock"}:
        parser.error("--designs takes intake and/or stock")
    args.modes = {"on": ["on"], "off": ["off"], "both": ["on", "off"]}[args.rate_limit]
    args.brokers = {"redis": ["redis"], "amqp": ["amqp"], "both": ["redis", "amqp"]}[args.broker]
    return args


def raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def measure(args, design):
    """Set up one design's stack on each broker (side by side), run its phases --repeat times, the
    brokers taking turns in alternating order (so that a noisy stretch of the machine hits both
    alike), tear them down: {broker: (runs, rss, broker config)}."""
    benches = {broker: Bench(args, design, args.modes, broker) for broker in args.brokers}
    runs = {broker: [] for broker in benches}
    conns = []
    try:
        cursors = {}
        for broker, bench in benches.items():
            bench.setup()
            bench.start_stack()
            conns.append(bench.connect())
            cursors[broker] = conns[-1].cursor()
        for broker, bench in benches.items():
            bench.warm_up(cursors[broker])
        for repeat in range(1, args.repeat + 1):
            for broker in (args.brokers if repeat % 2 else list(reversed(args.brokers))):
                log(f"{design}/{broker}: run {repeat}/{args.repeat}")
                runs[broker].append(benches[broker].run_once(cursors[broker], repeat))
        return {broker: (runs[broker], bench.rss_report(), bench.broker_config()) for broker, bench in benches.items()}
    finally:
        # Ignore further Ctrl-C / SIGTERM while cleaning up, so that nothing is left behind.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for conn in conns:
            try:
                conn.close()
            except Exception:
                pass
        for bench in benches.values():
            bench.teardown()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, raise_interrupt)


def summarize(args, design, runs, rss, broker, load_before, started):
    """One design's JSON on one broker: medians over the runs, fault counts summed (the fields
    bench/README.md lists)."""
    summary = median_of(runs)
    summary["ratios"] = median_of([run["ratios"] for run in runs])
    single, batch, otlp = summary["single"], summary["batch"], summary.get("otlp")
    extra = {key: summary[key] for key in summary if key.startswith("single_rate_limit_")}
    checked = [single, batch, *extra.values(), *([otlp] if otlp else [])]
    result = {
        "bench": "intake ingestion" if design == "intake" else f"{design} design (bench/{design}/)",
        "broker": broker["broker"],
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    # CPU used by processes that are not part of this benchmark, in cores, while
                    # each load ran: above ~0.2 the figures are noisy; compare ratios, not absolutes.
                    "foreign_load_cores": {"health": summary["health"]["cpu_s"]["foreign_cores"],
                                           "single": single["cpu_s_load"]["foreign_cores"],
                                           "batch": batch["cpu_s_load"]["foreign_cores"],
                                           **{key: value["cpu_s_load"]["foreign_cores"]
                                              for key, value in extra.items()},
                                           **({"otlp": otlp["cpu_s_load"]["foreign_cores"]} if otlp else {})}},
        "config": {"duration_s": args.duration, "connections": args.connections, "wrk_threads": args.threads,
                   "repeat": args.repeat, "batch_size": args.batch_size, "warmup_s": args.warmup,
                   "gunicorn": f"gthread {args.web_workers} workers x {args.web_threads} threads",
                   "celery": f"prefork {processes(args, design)}, "
                             f"{'one worker for both queues' if args.shared_worker else 'one worker per queue'}",
                   "worker_log_level": args.log_level,
                   # "on": `single`, `batch` and /health ran with the limit; "both": `single_rate_limit_off` without.
                   "rate_limit": args.rate_limit, "rate_limit_value": args.rate_limit_value,
                   **broker},
        "health_rps": summary["health"]["requests_per_s"],
        "single_accepted_per_s": single["accepted_events_per_s"],
        "single_p50_ms": single["p50_ms"],
        "single_p99_ms": single["p99_ms"],
        "single_e2e_events_per_s": single["e2e_events_per_s"],
        "batch_requests_per_s": batch["requests_per_s"],
        "batch_accepted_events_per_s": batch["accepted_events_per_s"],
        "batch_p50_ms": batch["p50_ms"],
        "batch_p99_ms": batch["p99_ms"],
        "batch_e2e_events_per_s": batch["e2e_events_per_s"],
        "otlp_requests_per_s": otlp and otlp["requests_per_s"],
        "otlp_accepted_records_per_s": otlp and otlp["accepted_events_per_s"],
        "otlp_p50_ms": otlp and otlp["p50_ms"],
        "otlp_p99_ms": otlp and otlp["p99_ms"],
        "otlp_e2e_records_per_s": otlp and otlp["e2e_events_per_s"],
        "copy_rows_per_s": summary.get("copy", {}).get("rows_per_s"),
        "ratios": summary["ratios"],
        # Where the CPU goes (ms of CPU per event; /health: per request) and group commit.
        "cpu_ms": {
            "health_api_per_request": summary["health"]["api_cpu_ms_per_request"],
            "single_per_event": cpu_per_event(single),
            "batch_per_event": cpu_per_event(batch),
            "otlp_per_record": otlp and cpu_per_event(otlp),
        },
        "single_events_per_message": single["events_per_message"],
        "batch_events_per_message": batch["events_per_message"],
        # Mean time to publish one group: pending record + message (on RabbitMQ: until the confirm).
        "single_publish_ms_per_message": single["publish_ms_per_message"],
        "batch_publish_ms_per_message": batch["publish_ms_per_message"],
        "api_worker_peak_rss_mb": rss.get("api_worker_peak_rss_mb"),
        "worker_pool_peak_rss_mb": rss.get("worker_pool_peak_rss_mb"),
        "worker_main_peak_rss_mb": rss.get("worker_main_peak_rss_mb"),
        "worker_rss_flat": rss.get("worker_rss_flat"),
        "lost": sum(phase["lost"] for phase in checked),
        "duplicated": sum(phase["duplicated"] for phase in checked),
        "non_202": sum(phase["non_202"] for phase in checked),  # OTLP: responses other than 200
        # 202 responses x events per request == rows in `events`, in every ingest phase.
        "stored_equals_accepted": all(phase["count_check_stored_minus_accepted"] == 0 for phase in checked),
        "drained": all(phase["drained"] for phase in checked),
        "targets": None,
        "health": summary["health"],
        "single": single,
        **extra,
        "batch": batch,
        "otlp": otlp,
        "copy": summary.get("copy"),
        "rss": rss,
        "runs": runs if args.repeat > 1 else None,
        "wall_s": time.monotonic() - started,
    }
    if design == "intake":
        result["targets"] = verdicts(result)
    else:
        result.pop("targets")
    result["correct"] = result["lost"] == 0 and result["duplicated"] == 0 and result["drained"]
    return result


def cpu_per_event(phase) -> dict:
    """CPU ms per stored event by component; the Redis and RabbitMQ servers are shared (upper bounds)."""
    return {"api": phase["api_cpu_ms_per_event"], "workers": phase["worker_cpu_ms_per_event"],
            "postgres": phase["postgres_cpu_ms_per_event"], "redis_server": phase["redis_cpu_ms_per_event"],
            "rabbitmq_server": phase["rabbitmq_cpu_ms_per_event"]}


INTAKE_PARTS = ("api", "workers", "postgres")  # Intake's own processes; the rest are the broker servers


def cpu_split(cost: dict) -> dict:
    """CPU ms per stored event: Intake's own processes, and all of it (with the broker servers)."""
    intake = sum(cost[part] or 0 for part in INTAKE_PARTS)
    return {"intake": intake, "all": intake + (cost["redis_server"] or 0) + (cost["rabbitmq_server"] or 0)}


def ratio(a, b):
    """a / b, or None when either is missing (or b is 0)."""
    return a / b if a is not None and b else None


def verdict(value, target, minimum=None, at_most=False):
    """A reported target: the value, the bound(s) and whether it meets them."""
    if value is None:
        return {"value": None}
    meets = (lambda bound: value <= bound) if at_most else (lambda bound: value >= bound)
    entry = {"value": value, "target": target, "meets_target": meets(target)}
    if minimum is not None:
        entry.update(minimum=minimum, meets_minimum=meets(minimum))
    return entry


def side_by_side(args, results):
    """The issue 15 figures of each design, their ratios and the targets (reported, never asserted)."""
    def figures(result):
        off = result.get("single_rate_limit_off")
        on = result["single"] if args.rate_limit in ("on", "both") else None
        return {
            "health_rps": result["health_rps"],
            "single_e2e_rate_limit_on": on["e2e_events_per_s"] if on else None,
            "single_e2e_rate_limit_off": off["e2e_events_per_s"] if off else
            (result["single_e2e_events_per_s"] if args.rate_limit == "off" else None),
            "batch_e2e": result["batch_e2e_events_per_s"],
            "single_p99_ms": result["single_p99_ms"],
            "api_worker_peak_rss_mb": result["api_worker_peak_rss_mb"],
            "correct": result["correct"],
            "foreign_load_cores": result["machine"]["foreign_load_cores"],
        }

    designs = {name: figures(result) for name, result in results.items()}
    intake, stock = designs.get("intake"), designs.get("stock")
    single_key = "single_e2e_rate_limit_on" if args.rate_limit != "off" else "single_e2e_rate_limit_off"
    ratios_ = {}
    for name, design in designs.items():
        ratios_[f"{name}_single_over_health"] = ratio(design[single_key], design["health_rps"])
        ratios_[f"{name}_single_over_health_rate_limit_off"] = ratio(design["single_e2e_rate_limit_off"],
                                                                     design["health_rps"])
        cost = ratio(design["single_e2e_rate_limit_on"], design["single_e2e_rate_limit_off"])
        ratios_[f"{name}_rate_limit_cost"] = None if cost is None else 1 - cost
    if intake and stock:
        ratios_["single_intake_over_stock"] = ratio(intake[single_key], stock[single_key])
        ratios_["batch_intake_over_stock"] = ratio(intake["batch_e2e"], stock["batch_e2e"])
    limit_on = args.rate_limit != "off"
    targets = {
        "single_intake_over_stock": verdict(ratios_.get("single_intake_over_stock"), 2.5, 2.0),
        "batch_intake_over_stock": verdict(ratios_.get("batch_intake_over_stock"), 2.5, 2.0),
        "intake_single_over_health": verdict(ratios_.get("intake_single_over_health"), 0.4, 0.3),
        "intake_rate_limit_cost": verdict(ratios_.get("intake_rate_limit_cost"), 0.05, at_most=True),
        "intake_single_p99_ms": verdict(intake["single_p99_ms"] if intake else None, 20.0, at_most=True),
        "intake_api_worker_peak_rss_mb": verdict(intake["api_worker_peak_rss_mb"] if intake else None, 150.0,
                                                 at_most=True),
    }
    return {"rate_limit": args.rate_limit_value if limit_on else None,
            "figures": "events stored per second end to end (health: requests/s); single and batch with the "
                       "rate limit on when it ran, single_e2e_rate_limit_off without",
            "designs": designs, "ratios": ratios_, "targets": targets}


def broker_comparison(args, results):
    """Issue 17: each design on each broker, amqp ÷ redis, and Intake's target (single events and
    batches end to end on RabbitMQ ≥ 0.9 × on Redis): reported, never asserted."""
    def figures(result):
        phases = {"single": result["single"], "batch": result["batch"]}
        return {
            "single_e2e": result["single_e2e_events_per_s"],
            "single_e2e_rate_limit_off": (result.get("single_rate_limit_off") or {}).get("e2e_events_per_s"),
            "batch_e2e": result["batch_e2e_events_per_s"],
            "otlp_e2e": result["otlp_e2e_records_per_s"],
            "single_accepted": result["single_accepted_per_s"],
            "batch_accepted": result["batch_accepted_events_per_s"],
            "single_p50_ms": result["single_p50_ms"], "single_p99_ms": result["single_p99_ms"],
            "batch_p50_ms": result["batch_p50_ms"], "batch_p99_ms": result["batch_p99_ms"],
            "cpu_ms_per_event": {kind: cpu_per_event(phase) for kind, phase in phases.items()},
            "publish_ms_per_message": {kind: phase["publish_ms_per_message"] for kind, phase in phases.items()},
            "events_per_message": {kind: phase["events_per_message"] for kind, phase in phases.items()},
            "messages_queued_at_load_end": {kind: phase["messages_queued_at_load_end"]
                                            for kind, phase in phases.items()},
            "drain_s": {kind: phase["drain_s"] for kind, phase in phases.items()},
            "correct": result["correct"],
            "foreign_load_cores": result["machine"]["foreign_load_cores"],
        }

    compared = {"figures": "events stored per second end to end (single: the main gunicorn, with the rate limit "
                           "when it ran), p50/p99 of the requests, CPU ms per stored event by component (the Redis "
                           "and RabbitMQ servers are shared: upper bounds), mean ms to publish one message",
                "target": AMQP_OVER_REDIS_TARGET}
    for design, by_broker in results.items():
        entry = {broker: figures(result) for broker, result in by_broker.items()}
        if "redis" in entry and "amqp" in entry:
            redis_, amqp = entry["redis"], entry["amqp"]
            keys = ("single_e2e", "single_e2e_rate_limit_off", "batch_e2e", "otlp_e2e", "single_accepted",
                    "batch_accepted")
            entry["amqp_over_redis"] = {key: ratio(amqp[key], redis_[key]) for key in keys}
            runs = {broker: by_broker[broker].get("runs") for broker in ("redis", "amqp")}
            if all(runs.values()):  # each repeat's pair (run one after the other): how much the ratio moves
                entry["amqp_over_redis"]["per_run"] = {
                    f"{kind}_e2e": [ratio(a[kind]["e2e_events_per_s"], r[kind]["e2e_events_per_s"])
                                    for r, a in zip(runs["redis"], runs["amqp"])] for kind in ("single", "batch")}
            # Where a gap comes from on a machine the brokers share with Intake: Redis's CPU per event
            # over RabbitMQ's, for Intake's own processes and for everything. On a machine that is
            # CPU-bound, "all" is about the amqp/redis throughput the CPU allows; "intake" is that
            # ratio with the broker servers on hosts of their own.
            entry["redis_over_amqp_cpu_per_event"] = {
                kind: {part: ratio(cpu_split(redis_["cpu_ms_per_event"][kind])[part],
                                   cpu_split(amqp["cpu_ms_per_event"][kind])[part]) for part in ("intake", "all")}
                for kind in ("single", "batch")}
        compared[design] = entry
    if "intake" in results and "stock" in results:
        compared["intake_over_stock"] = {
            broker: {"single": ratio(compared["intake"][broker]["single_e2e"], compared["stock"][broker]["single_e2e"]),
                     "batch": ratio(compared["intake"][broker]["batch_e2e"], compared["stock"][broker]["batch_e2e"])}
            for broker in args.brokers if broker in compared["intake"] and broker in compared["stock"]}
    intake_ratios = compared.get("intake", {}).get("amqp_over_redis", {})
    compared["targets"] = {f"{kind}_e2e_amqp_over_redis": verdict(intake_ratios.get(f"{kind}_e2e"),
                                                                  AMQP_OVER_REDIS_TARGET)
                           for kind in ("single", "batch")}
    return compared


def comparison_lines(compared) -> list[str]:
    """The broker comparison in a few lines, for the end of the run."""
    lines = []
    for design in ("intake", "stock"):
        entry = compared.get(design)
        if not entry or "amqp_over_redis" not in entry:
            continue
        ratios_ = entry["amqp_over_redis"]
        parts = []
        for kind in ("single", "batch"):
            value = ratios_[f"{kind}_e2e"]
            met = "" if design != "intake" or value is None else \
                f" ({'meets' if value >= AMQP_OVER_REDIS_TARGET else 'misses'} {AMQP_OVER_REDIS_TARGET})"
            parts.append(f"{kind} e2e {entry['amqp'][f'{kind}_e2e']:,.0f} / {entry['redis'][f'{kind}_e2e']:,.0f} "
                         f"events/s = {value:.2f}{met}" if value is not None else f"{kind} e2e n/a")
        lines.append(f"{design} amqp/redis: " + ", ".join(parts))
        cpu_ratios = entry.get("redis_over_amqp_cpu_per_event", {})
        if all(value["intake"] and value["all"] for value in cpu_ratios.values()):
            lines.append("  CPU per event redis/amqp: " + ", ".join(
                f"{kind} {value['intake']:.2f} for Intake's processes, {value['all']:.2f} with the broker servers"
                for kind, value in cpu_ratios.items()))
        for broker in ("redis", "amqp"):
            figures = entry[broker]
            cpu = "; ".join(f"{kind} " + " ".join(f"{k.split('_')[0]} {v:.3f}" for k, v in cost.items()
                                                  if v is not None)
                            for kind, cost in figures["cpu_ms_per_event"].items())
            publish = figures["publish_ms_per_message"]
            lines.append(f"  {design}/{broker}: p99 single {figures['single_p99_ms']:.1f} ms batch "
                         f"{figures['batch_p99_ms']:.1f} ms; CPU ms/event {cpu}"
                         + (f"; publish ms/message single {publish['single']:.2f} batch {publish['batch']:.2f}"
                            if publish["single"] is not None and publish["batch"] is not None else ""))
    for broker, value in compared.get("intake_over_stock", {}).items():
        if value["single"] is not None and value["batch"] is not None:
            lines.append(f"intake/stock on {broker}: single {value['single']:.2f}, batch {value['batch']:.2f}")
    return lines


def main(argv=None):
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed. Install it with:\n"
              "    apt-get update && apt-get install -y wrk\n"
              "(`make bench` does this when run as root).", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, raise_interrupt)
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGHUP, raise_interrupt)
    started = time.monotonic()
    results = {}  # design -> broker -> its JSON
    try:
        for design in args.designs:
            design_started, load_before = time.monotonic(), os.getloadavg()
            results[design] = {broker: summarize(args, design, runs, rss, config, load_before, design_started)
                               for broker, (runs, rss, config) in measure(args, design).items()}
    except KeyboardInterrupt:
        log("interrupted: stopping the stack")
        return 130
    except BenchError as error:
        log(f"error: {error}")
        return 1

    write_path = None
    if args.write_path:
        import write_path as write_path_bench  # bench/write_path.py, beside this file

        log(f"write path: before vs after on {args.write_path} rows per group size")
        write_path = write_path_bench.compare(args.write_path)
    # The first design's figures on the first broker at the top level (Intake's on Redis by
    # default: the fields the README quotes), every design's beside it, each with its figures on
    # the other brokers under "brokers", and the comparisons.
    first, first_broker = args.designs[0], args.brokers[0]
    on_first = {}
    for name, by_broker in results.items():
        on_first[name] = dict(by_broker[first_broker])
        if len(by_broker) > 1:
            on_first[name]["brokers"] = {broker: value for broker, value in by_broker.items() if broker != first_broker}
    result = on_first[first]
    if len(results) > 1 or args.rate_limit == "both":
        result["designs"] = {name: value for name, value in on_first.items() if name != first}
        result["comparison"] = side_by_side(args, {name: value[first_broker] for name, value in results.items()})
    compared = broker_comparison(args, results) if len(args.brokers) > 1 else None
    if compared:
        result["broker_comparison"] = compared
    result["wall_s"] = time.monotonic() - started
    result["correct"] = all(value["correct"] for by_broker in results.values() for value in by_broker.values())
    result["write_path"] = write_path
    result = rounded(result)
    text = json.dumps(result, indent=2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    print(text)
    for line in comparison_lines(result["broker_comparison"]) if compared else ():
        log(line)
    log(f"wrote {args.output} in {result['wall_s']:.0f}s")
    return 0 if result["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
