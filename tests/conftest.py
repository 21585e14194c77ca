"""Fixtures: a private PostgreSQL database, Redis db and RabbitMQ vhost per run, the app, and real processes.

The suite needs PostgreSQL, Redis and RabbitMQ (TEST_POSTGRES_URL, TEST_REDIS_URL,
TEST_AMQP_URL; defaults are the local servers, and `rabbitmqctl` makes each run's vhost).
If one is unreachable the run stops with an error: it never skips.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import pytest
import redis as redis_lib
import requests
from kombu import Connection
from kombu.exceptions import ChannelError

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
AMQP_BASE = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672").rstrip("/")
RUN_ID = uuid.uuid4().hex[:10]
DB_NAME = f"intake_test_{RUN_ID}"
DATABASE_URL = ADMIN_URL.rsplit("/", 1)[0] + "/" + DB_NAME
VHOST = f"intake_test_{RUN_ID}"
PERSISTENCE_QUEUES = ("default", "batch_processing", "emails")


def pytest_sessionstart(session):
    problems = []
    try:
        psycopg2.connect(ADMIN_URL, connect_timeout=3).close()
    except Exception as error:
        problems.append(f"PostgreSQL at {ADMIN_URL}: {error}")
    try:
        redis_lib.Redis.from_url(REDIS_BASE, socket_connect_timeout=3).ping()
    except Exception as error:
        problems.append(f"Redis at {REDIS_BASE}: {error}")
    try:
        with Connection(f"{AMQP_BASE}//", connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as error:
        problems.append(f"RabbitMQ at {AMQP_BASE}: {error}")
    if problems:
        pytest.exit("The tests need real PostgreSQL, Redis and RabbitMQ:\n  " + "\n  ".join(problems), returncode=3)


def _admin(sql):
    conn = psycopg2.connect(ADMIN_URL)
    conn.autocommit = True
    try:
        conn.cursor().execute(sql)
    finally:
        conn.close()


def _claim_redis_db() -> int:
    """A Redis db number no other test run on this machine is using."""
    control = redis_lib.Redis.from_url(f"{REDIS_BASE}/0")
    for number in range(1, 16):
        if control.set(f"intake:test-run:db:{number}", RUN_ID, nx=True, ex=3600):
            return number
    raise RuntimeError("no free Redis db number (1-15) for this test run")


@pytest.fixture(scope="session", autouse=True)
def test_environment(tmp_path_factory):
    """Point this process (and every process it starts) at this run's database and Redis db."""
    _admin(f'CREATE DATABASE "{DB_NAME}"')
    number = _claim_redis_db()
    redis_url = f"{REDIS_BASE}/{number}"
    redis_lib.Redis.from_url(redis_url).flushdb()
    env = {
        "APP_ENV": "testing",
        "DATABASE_URL": DATABASE_URL,
        "REDIS_URL": redis_url,
        "INSTANCE_PATH": str(tmp_path_factory.mktemp("instance")),
        "RULES_CACHE_TTL": "1",
        "PERSIST_RETRY_BACKOFF": "0.2",
        "PERSIST_MAX_RETRIES": "2",
        "INGEST_REDELIVER_AFTER": "8",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    subprocess.run([sys.executable, "-m", "flask", "--app", "run", "db", "upgrade"], cwd=ROOT, check=True,
                   capture_output=True)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    redis_lib.Redis.from_url(redis_url).flushdb()
    redis_lib.Redis.from_url(f"{REDIS_BASE}/0").delete(f"intake:test-run:db:{number}")
    _admin(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')


class RedisBroker:
    """Redis as the broker: this run's db, where kombu keeps each queue as a list."""

    name = "redis"

    def __init__(self, url):
        self.url = url
        self.client = redis_lib.Redis.from_url(url)

    def depth(self, queue) -> int:
        return self.client.llen(queue)

    def lose(self, *queues):
        """Drop the waiting messages, as a broker that lost them."""
        self.client.delete(*queues)


class RabbitBroker:
    """RabbitMQ as the broker: this run's vhost, made on first use and deleted at the end."""

    name = "amqp"

    def __init__(self):
        self.url = f"{AMQP_BASE}/{VHOST}"
        self.port = urlsplit(AMQP_BASE).port or 5672

    def create(self):
        for args in (["add_vhost", VHOST], ["set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*"]):
            subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)
        return self

    def delete(self):
        subprocess.run(["rabbitmqctl", "delete_vhost", VHOST], capture_output=True, timeout=60)

    def _on_queues(self, queues, act) -> list:
        results = []
        with Connection(self.url, connect_timeout=5) as connection:
            for queue in queues:
                channel = connection.channel()
                try:
                    results.append(act(channel, queue))
                except ChannelError:  # not declared yet: the broker closed the channel
                    results.append(0)
                else:
                    channel.close()
        return results

    def depth(self, queue) -> int:
        """Messages ready in the queue (not those a worker holds unacknowledged)."""
        [count] = self._on_queues([queue], lambda channel, q: channel.queue_declare(q, passive=True).message_count)
        return count

    def lose(self, *queues):
        """Drop the waiting messages, as a broker that lost them."""
        self._on_queues(queues, lambda channel, q: channel.queue_purge(q))

    def declared(self, queue) -> bool:
        """Some worker or publisher has declared the queue (a passive declare finds it)."""
        return self._on_queues([queue], lambda channel, q: channel.queue_declare(q, passive=True) is not None) == [True]

    def clean(self):
        self.lose(*PERSISTENCE_QUEUES)


@pytest.fixture(scope="session")
def rabbit_vhost(test_environment):
    """This run's RabbitMQ vhost: made when a test first needs it, deleted at the end of the run."""
    rabbit = RabbitBroker().create()
    yield rabbit
    rabbit.delete()


@pytest.fixture(params=["redis", "amqp"])
def broker(request, test_environment):
    """Each broker Intake supports in turn, for the end-to-end tests that run on both (README "Brokers")."""
    if request.param == "redis":
        return RedisBroker(test_environment["REDIS_URL"])
    return request.getfixturevalue("rabbit")


@pytest.fixture
def rabbit(rabbit_vhost):
    """RabbitMQ only: this run's vhost, its queues purged afterwards."""
    yield rabbit_vhost
    rabbit_vhost.clean()


@pytest.fixture
def rabbit_proxy(rabbit):
    """The run's RabbitMQ vhost behind a proxy the test can freeze, stop and start."""
    from tests.broker_proxy import BrokerProxy

    proxy = BrokerProxy(rabbit.port).start()
    yield proxy
    proxy.thaw()
    proxy.stop()


@pytest.fixture
def broker_app(broker, app):
    """The app as the test's processes run it: on the test's broker (the session's app is on Redis)."""
    if broker.name == "redis":
        return app
    from tests.private_redis import isolated_app

    return isolated_app({"CELERY_BROKER_URL": broker.url})


@pytest.fixture(scope="session")
def app(test_environment):
    from app import create_app

    return create_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def redis(test_environment):
    return redis_lib.Redis.from_url(test_environment["REDIS_URL"])


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of the test's own (not started), to stop and start again; stopped afterwards."""
    from tests.private_redis import PrivateRedis

    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is needed on PATH for the broker outage tests")
    server = PrivateRedis(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def hanging_broker():
    """The URL of a Redis that accepts connections and never answers: a broker that hangs rather than refuses."""
    from tests.private_redis import SilentServer

    server = SilentServer()
    yield f"redis://127.0.0.1:{server.port}/0"
    server.close()


@pytest.fixture(autouse=True)
def clean_state(request, test_environment):
    """Each test starts with empty tables and an empty Redis db."""
    yield
    from tests.private_redis import stop_isolated_apps

    stop_isolated_apps()
    if "no_clean" in request.keywords:
        return
    conn = psycopg2.connect(DATABASE_URL)
    conn.autocommit = True
    conn.cursor().execute("TRUNCATE events, failed_events, rules, apps, users, account_codes, revoked_tokens, event_keys, "
                          "rollup_deltas, rollups, rollup_users CASCADE")
    conn.close()
    redis_lib.Redis.from_url(test_environment["REDIS_URL"]).flushdb()


def sql(query, *params):
    """Run one query on this run's database and return all rows."""
    conn = psycopg2.connect(DATABASE_URL)
    conn.autocommit = True
    try:
        cursor = conn.cursor()
        cursor.execute(query, params)
        return cursor.fetchall() if cursor.description else []
    finally:
        conn.close()


@pytest.fixture
def ctx(app):
    """The app with its context pushed, for tests that call the domain functions directly."""
    with app.app_context():
        yield app


@pytest.fixture
def app_id(make_app):
    """The id of a fresh app (its key unused)."""
    return make_app()[0]


@pytest.fixture
def make_app(app):
    """Create an owner and an app; returns (app_id, api_key). Rules are `{name, schema, action, ...}`."""
    from app.cli import create_app_with_key
    from app.extensions import db
    from app.models import Rule, User

    def make(rules=(), email=None):
        with app.app_context():
            user = User(email=email or f"{uuid.uuid4().hex[:8]}@example.com", password_hash="x")
            db.session.add(user)
            db.session.flush()
            record, key = create_app_with_key(user, "test app")
            db.session.flush()
            for rule in rules:
                db.session.add(Rule(app_id=record.id, **{"enabled": True, "event_name": None, **rule}))
            db.session.commit()
            return record.id, key

    return make


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Process:
    """A real child process (gunicorn, a Celery worker, beat) with its output in a file."""

    started = []  # this test's, for the failure report (pytest_runtest_makereport)

    def __init__(self, name, args, env, log_dir):
        self.name = name
        self.args = args
        self.env = env
        self.log_path = Path(log_dir) / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self.proc = None

    def start(self):
        self.log = open(self.log_path, "wb")
        # Its own process group, so a kill reaches the pool children too.
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        Process.started.append(self)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, text, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"{self.name} did not print {text!r}:\n{self.output()[-3000:]}")

    def signal(self, sig):
        os.killpg(self.proc.pid, sig)

    def stop(self, timeout=20):
        if self.proc and self.proc.poll() is None:
            try:
                self.signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.kill()
        self.log.close()

    def kill(self):
        try:
            self.signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


class Stack:
    """Starts gunicorn, Celery workers and beat as real processes for end-to-end tests."""

    def __init__(self, env, log_dir):
        self.env = {**os.environ, **env}
        self.log_dir = log_dir
        self.processes = []
        self.base_url = None

    def web(self, workers=2, threads=4, **extra_env):
        port = free_port()
        env = {**self.env, "PORT": str(port), "WEB_CONCURRENCY": str(workers), "GUNICORN_THREADS": str(threads),
               **extra_env}
        process = Process("gunicorn", [sys.executable, "-m", "gunicorn", "run:app", "-c", "gunicorn.conf.py"], env,
                          self.log_dir).start()
        self.processes.append(process)
        self.base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                requests.get(self.base_url + "/health", timeout=2)
                return process
            except requests.RequestException:  # not listening yet, or still booting
                time.sleep(0.2)
        raise AssertionError(f"gunicorn did not start:\n{process.output()[-3000:]}")

    def worker(self, queues="default,batch_processing,emails", concurrency=2, name=None, **extra_env):
        name = name or f"w{uuid.uuid4().hex[:6]}"
        args = [sys.executable, "-m", "celery", "-A", "run:celery", "worker", "-Q", queues, "-n", f"{name}@%h",
                "-c", str(concurrency), "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
        process = Process(f"worker-{name}", args, {**self.env, **extra_env}, self.log_dir).start()
        self.processes.append(process)
        process.wait_for_output("ready.", timeout=60)
        return process

    def beat(self):
        schedule = Path(self.log_dir) / f"beat-{uuid.uuid4().hex[:6]}"
        args = [sys.executable, "-m", "celery", "-A", "run:celery", "beat", "--loglevel", "INFO", "-s", str(schedule)]
        process = Process("beat", args, self.env, self.log_dir).start()
        self.processes.append(process)
        return process

    def post(self, path, body=None, headers=None, **kwargs):
        return requests.post(self.base_url + path, json=body, headers=headers, timeout=10, **kwargs)

    def get(self, path, **kwargs):
        return requests.get(self.base_url + path, timeout=10, **kwargs)

    def stop(self):
        for process in reversed(self.processes):
            process.stop()


@pytest.fixture
def stack(request, test_environment, tmp_path):
    """Real processes for one test (on the test's `broker` when it asks for one); all stopped afterwards."""
    env = dict(test_environment)
    if "broker" in request.fixturenames:
        env["CELERY_BROKER_URL"] = request.getfixturevalue("broker").url
    running = Stack(env, tmp_path)
    yield running
    running.stop()


def wait_until(predicate, timeout=30, interval=0.2, message="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


@pytest.fixture
def make_user(app):
    """Create a verified user; returns (user_id, headers with a Bearer access token for them)."""
    from flask_jwt_extended import create_access_token

    from app.extensions import db
    from app.models import User, utcnow

    def make(email=None, password_hash="x"):
        with app.app_context():
            user = User(email=email or f"{uuid.uuid4().hex[:8]}@example.com", password_hash=password_hash,
                        email_verified_at=utcnow())
            db.session.add(user)
            db.session.commit()
            return user.id, {"Authorization": f"Bearer {create_access_token(identity=user.id)}"}

    return make


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    """Each test's failure report shows the processes that test started, none before."""
    Process.started.clear()
    yield


LOG_TAIL_LINES = 40


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each test's call report on its item (the console's browser fixture screenshots on failure);
    a failed test's report ends with the last lines of each process it started (CI keeps no files)."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.rep_call = report
        if report.failed:
            for process in Process.started:
                try:
                    lines = process.output().splitlines()
                except OSError:
                    continue
                # From the first JSON line on: Celery's banner says nothing the test does not know.
                first = next((number for number, line in enumerate(lines) if line.startswith("{")), 0)
                tail = lines[first:][-LOG_TAIL_LINES:]
                report.sections.append((f"last {len(tail)} lines of {process.log_path.name}", "\n".join(tail)))
