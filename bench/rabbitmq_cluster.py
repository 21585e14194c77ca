#!/usr/bin/env python3
"""A RabbitMQ cluster that loses a node while events stream in (issue 17, item 5).

One run:
  1. starts a three-node RabbitMQ cluster of its own on this machine (nodes
     intake-c1-<id>@localhost ... c3, free AMQP and distribution ports, data and logs in a
     temporary folder owned by the `rabbitmq` user), beside and apart from the system's
     rabbit@localhost, and joins nodes 2 and 3 to node 1;
  2. creates a scratch PostgreSQL database (migrated), claims a free Redis db number and
     creates an app with its key (bench/run.py's Bench does these and their removal);
  3. starts gunicorn (2 workers) and one Celery worker for default,batch_processing (-c 2)
     with CELERY_BROKER_URL naming the three nodes as kombu failover URLs;
  4. streams single events and small batches from a few threads at a paced rate, each
     event with a unique event_id, and after --stop-after seconds stops one node: the
     leader of the quorum queue `default` (--victim leader, the default: the interesting
     case) or a node that is neither that leader nor the first URL's (--victim follower);
  5. waits until every event answered 202 is stored and nothing is pending, then prints one
     JSON object: what was sent, accepted, refused (by status), stored, stored exactly once,
     stored although refused, the longest run of refusals (the 503 window), the time from
     the stop to the first 202 after it, latency before and after the stop, drain time;
  6. removes everything it made (processes, nodes, folders, database, Redis db), also on failure.

Run it as root (the nodes run as the rabbitmq user, whose Erlang cookie rabbitmqctl uses):

    .venv/bin/python bench/rabbitmq_cluster.py [--victim leader|follower] [--stop-mode stop_app|kill]

It exits 1 when an accepted event is missing or stored twice. tests/test_rabbitmq_cluster.py
runs it once and checks the same, plus a bound on the 503 window.
"""
import argparse
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import requests

if __package__ in (None, ""):  # run as a script: make `bench` importable like under pytest
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import (Bench, BenchError, Process, await_health, free_port, log, raise_interrupt,  # noqa: E402
                       rounded)
from celery_config import QUEUES  # noqa: E402

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
# Debian's wrapper: run as root it calls the CLI as the rabbitmq user, so the CLI finds the
# same Erlang cookie (/var/lib/rabbitmq/.erlang.cookie) as the nodes started below.
RABBITMQCTL = "/usr/sbin/rabbitmqctl"
EVENT_NAME = "cluster.bench"


# --------------------------------------------------------------------------- the cluster

@dataclass
class Node:
    name: str  # e.g. intake-c1-1a2b3c@localhost
    amqp_port: int
    dist_port: int
    folder: Path
    process: subprocess.Popen | None = None

    def url(self, vhost="/") -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/{vhost}"


def rabbitmqctl(node: str, *args, timeout=60, check=True) -> str:
    result = subprocess.run([RABBITMQCTL, "-n", node, *args], capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise BenchError(f"rabbitmqctl -n {node} {' '.join(args)} failed ({result.returncode}):\n"
                         f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result.stdout


class Cluster:
    """Three (or `size`) RabbitMQ nodes of this run, clustered, each in a folder of its own."""

    def __init__(self, size=3):
        self.run_id = uuid.uuid4().hex[:6]
        self.folder = Path(tempfile.mkdtemp(prefix=f"intake-rabbit-{self.run_id}-"))
        self.nodes = [Node(f"intake-c{i}-{self.run_id}@localhost", free_port(), free_port(),
                           self.folder / f"c{i}") for i in range(1, size + 1)]

    @property
    def broker_url(self) -> str:
        """All nodes as kombu failover URLs, node 1 first."""
        return ";".join(node.url() for node in self.nodes)

    def start(self, timeout=90):
        if os.geteuid() != 0:
            raise BenchError("run as root: the RabbitMQ nodes run as the rabbitmq user (runuser)")
        if not Path(RABBITMQ_SERVER).exists():
            raise BenchError(f"{RABBITMQ_SERVER} is missing: apt-get install rabbitmq-server")
        self._prepare_folders()
        started = time.monotonic()
        # The nodes boot in parallel (a boot is ~8 s, mostly waiting), then 2 and 3 join 1 in turn.
        for node in self.nodes:
            self._launch(node)
        for node in self.nodes:
            self._await_startup(node, started + timeout)
        for node in self.nodes[1:]:
            rabbitmqctl(node.name, "stop_app")
            rabbitmqctl(node.name, "join_cluster", self.nodes[0].name)
            rabbitmqctl(node.name, "start_app")
        self._await_running(len(self.nodes), started + timeout)
        log(f"cluster of {len(self.nodes)} up in {time.monotonic() - started:.1f}s: "
            + ", ".join(f"{n.name} amqp {n.amqp_port}" for n in self.nodes))

    def _prepare_folders(self):
        rabbitmq = pwd.getpwnam("rabbitmq")
        self.folder.chmod(0o755)  # mkdtemp makes it 0700 for root: the rabbitmq user must get in
        # An empty plugin list (no management plugin: faster boots, no HTTP ports to collide on).
        (self.folder / "enabled_plugins").write_text("[].\n")
        # Our own (empty) env file instead of /etc/rabbitmq/rabbitmq-env.conf, whose
        # NODENAME=rabbit@localhost is the system node's.
        (self.folder / "rabbitmq-env.conf").write_text("")
        for node in self.nodes:
            for sub in ("mnesia", "log"):
                (node.folder / sub).mkdir(parents=True)
            # /etc/rabbitmq/rabbitmq.conf pins 5672 (the system node's): each node its own config.
            (node.folder / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{node.amqp_port}\n")
        for path in [self.folder, *self.folder.rglob("*")]:
            os.chown(path, rabbitmq.pw_uid, rabbitmq.pw_gid)

    def _launch(self, node: Node):
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_CONF_ENV_FILE": str(self.folder / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(node.folder / "rabbitmq.conf"),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_MNESIA_BASE": str(node.folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.folder / "log"),
            "RABBITMQ_PID_FILE": str(node.folder / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
            # What the system env file sets besides the node name: epmd and distribution on loopback.
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        output = open(node.folder / "server.out", "wb")
        # runuser, not Debian's wrapper: the wrapper, run as rabbitmq, would write the system
        # node's startup_log. A session of its own, so that a kill reaches the whole node.
        node.process = subprocess.Popen(["runuser", "-u", "rabbitmq", "--", RABBITMQ_SERVER], env=env,
                                        cwd=self.folder, stdin=subprocess.DEVNULL, stdout=output,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        output.close()  # the child has its own copy

    def _await_startup(self, node: Node, deadline: float):
        while True:
            if node.process.poll() is not None:
                raise BenchError(f"{node.name} exited ({node.process.returncode}):\n{self.node_output(node)}")
            # Fails at once while the node is not registered with epmd yet, hence the loop.
            try:
                rabbitmqctl(node.name, "await_startup", "--timeout", "10", timeout=20)
                return
            except (BenchError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise BenchError(f"{node.name} did not start:\n{self.node_output(node)}") from None
                time.sleep(0.5)

    def node_output(self, node: Node, tail=2000) -> str:
        text = ""
        for path in [node.folder / "server.out", *sorted((node.folder / "log").glob("*.log"))]:
            try:
                text += f"--- {path.name}\n" + path.read_text(errors="replace")[-tail if tail else 0:]
            except OSError:
                pass
        return text

    def running_nodes(self, via: Node) -> list[str]:
        status = json.loads(rabbitmqctl(via.name, "cluster_status", "--formatter", "json"))
        return sorted(status.get("running_nodes", []))

    def _await_running(self, count: int, deadline: float):
        while len(running := self.running_nodes(self.nodes[0])) < count:
            if time.monotonic() > deadline:
                raise BenchError(f"only {running} running after the joins")
            time.sleep(0.5)

    def queue_leaders(self, via: Node) -> dict[str, str]:
        """Intake's queue name -> the node leading it. (Celery 5.5+ also declares 28 quorum
        queues celery_delayed_N for native delayed delivery; they are left out.)"""
        rows = json.loads(rabbitmqctl(via.name, "list_queues", "name", "type", "leader", "--formatter", "json"))
        return {row["name"]: row.get("leader") for row in rows if row["name"] in QUEUES}

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def stop_node(self, node: Node, mode: str):
        """Take one node out: `stop_app` (RabbitMQ stops, its Erlang VM stays) or `kill` (SIGKILL, a crash)."""
        if mode == "kill":
            os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait(10)
        else:
            rabbitmqctl(node.name, "stop_app")

    def teardown(self):
        """Stop every node (at the same time: a stop takes seconds) and remove the folder; never raises."""
        stops = [threading.Thread(target=self._stop, args=(node,)) for node in self.nodes]
        for stop in stops:
            stop.start()
        for stop in stops:
            stop.join()
        shutil.rmtree(self.folder, ignore_errors=True)

    @staticmethod
    def _stop(node: Node):
        if node.process is None or node.process.poll() is not None:
            return
        try:
            rabbitmqctl(node.name, "stop", timeout=30, check=False)
            node.process.wait(20)
        except (subprocess.TimeoutExpired, OSError) as error:
            log(f"teardown, stopping {node.name}: {error!r}")
        if node.process.poll() is None:  # a node that hangs, or was never reachable
            try:
                os.killpg(node.process.pid, signal.SIGKILL)
                node.process.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


# --------------------------------------------------------------------------- the stream

@dataclass
class Answer:
    sent: float  # seconds since the stream began
    answered: float
    status: str  # "202", "503", ..., or "error" (no HTTP answer)
    event_ids: list[str]
    accepted_ids: list[str] = field(default_factory=list)

    @property
    def latency_ms(self) -> float:
        return (self.answered - self.sent) * 1000


class Stream:
    """Paced senders: each request is one event or a small batch, every event_id unique."""

    def __init__(self, base_url, app_id, api_key, *, rate, threads, batch_size, prefix):
        self.base_url = base_url
        self.app_id = app_id
        self.api_key = api_key
        self.threads = threads
        self.batch_size = batch_size
        self.prefix = prefix
        # Singles and batches alternate: on average (1 + batch_size) / 2 events per request.
        self.interval = threads * (1 + batch_size) / 2 / rate
        self.answers: list[Answer] = []
        self.lock = threading.Lock()
        self.t0 = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def run(self, duration: float, at: float, action):
        """Stream for `duration` seconds, calling `action()` from this thread after `at` seconds."""
        self.t0 = time.monotonic()
        senders = [threading.Thread(target=self._send_loop, args=(n, duration), daemon=True)
                   for n in range(self.threads)]
        for sender in senders:
            sender.start()
        time.sleep(max(0.0, at - self.now()))
        try:
            return action()
        finally:
            for sender in senders:
                sender.join(duration + 30)

    def _send_loop(self, number, duration):
        session = requests.Session()
        headers = {"X-API-Key": self.api_key}
        next_at = number * self.interval / self.threads  # spread the threads over one interval
        sequence = 0
        while next_at < duration:
            time.sleep(max(0.0, next_at - self.now()))
            batch = sequence % 2 == 1
            ids = [f"{self.prefix}-{number}-{sequence}-{i}" for i in range(self.batch_size if batch else 1)]
            body = [{"event_name": EVENT_NAME, "event_id": i} for i in ids] if batch else \
                {"event_name": EVENT_NAME, "event_id": ids[0]}
            path = f"/api/logs/{self.app_id}" + ("/batch" if batch else "")
            self._record(self._post(session, path, body, headers, ids))
            sequence += 1
            # No catching up after a slow answer: a backlog would turn into a burst.
            next_at = max(next_at + self.interval, self.now())

    def _post(self, session, path, body, headers, ids) -> Answer:
        sent = self.now()
        try:
            response = session.post(self.base_url + path, json=body, headers=headers, timeout=10)
        except requests.RequestException:
            return Answer(sent, self.now(), "error", ids)
        answer = Answer(sent, self.now(), str(response.status_code), ids)
        if response.status_code == 202:
            document = response.json()
            answer.accepted_ids = document.get("event_ids") or [document["event_id"]]
        return answer

    def _record(self, answer: Answer):
        with self.lock:
            self.answers.append(answer)


# --------------------------------------------------------------------------- the run

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--victim", choices=("leader", "follower"), default="leader",
                        help="the node to stop: the leader of the queue `default`, or a node that neither "
                             "leads it nor is the first URL's")
    parser.add_argument("--stop-mode", choices=("stop_app", "kill"), default="stop_app",
                        help="rabbitmqctl stop_app, or SIGKILL of the node's processes (a crash)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of streaming")
    parser.add_argument("--stop-after", type=float, default=6.0, help="seconds into the stream")
    parser.add_argument("--rate", type=float, default=300.0, help="events per second, all threads together")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    parser.add_argument("--keep-logs", metavar="FOLDER", help="copy the API, worker and node logs there")
    return parser.parse_args(argv)


def start_stack(bench: Bench, cluster: Cluster) -> list[Process]:
    """gunicorn (2 workers) and one Celery worker, both on the cluster; ready once a probe is stored."""
    env = {**bench.env, "CELERY_BROKER_URL": cluster.broker_url}
    port = free_port()
    web = bench.start(Process("gunicorn", [sys.executable, "-m", "gunicorn", "run:app", "-c", "gunicorn.conf.py"],
                              {**env, "PORT": str(port), "WEB_CONCURRENCY": "2", "GUNICORN_THREADS": "4"},
                              bench.tmp))
    worker = bench.start(Process("worker", [
        sys.executable, "-m", "celery", "-A", "run:celery", "worker", "-Q", "default,batch_processing",
        "-c", "2", "-n", f"cluster-{cluster.run_id}@%h", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle"], env, bench.tmp))
    bench.base_url = f"http://127.0.0.1:{port}"
    await_health(web, bench.base_url, time.monotonic() + 60)
    worker.wait_for_output(" ready.", timeout=60)
    bench.probe([worker], timeout=60)  # an event and a batch through both queues, stored
    return [web, worker]


def in_parallel(*calls):
    """Run the calls in threads of their own, wait for all, raise the first error."""
    errors = []

    def call(function):
        try:
            function()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=call, args=(function,)) for function in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def choose_victim(cluster: Cluster, leaders: dict, victim: str) -> Node:
    leader = leaders.get("default")
    if not leader:
        raise BenchError(f"the queue `default` has no quorum leader: {leaders}")
    if victim == "leader":
        return cluster.node(leader)
    # A node no client is connected to (clients start on the first URL) that leads nothing we use.
    for node in cluster.nodes[1:]:
        if node.name != leader:
            return node
    raise BenchError("no follower to stop")


def wait_stored(bench: Bench, accepted: set, timeout: float) -> tuple[list[str], dict]:
    """Poll until every accepted event is stored and nothing is pending any more (so nothing
    can still arrive: a refused event stored late would be seen); (stored ids, seconds each took)."""
    started = time.monotonic()
    took = {"all_accepted_stored_s": None, "pending_empty_s": None}
    conn = bench.connect()
    try:
        cursor = conn.cursor()
        while True:
            cursor.execute("SELECT event_id FROM events WHERE app_id = %s AND event_name = %s",
                           (bench.app_id, EVENT_NAME))
            stored = [row[0] for row in cursor.fetchall()]
            elapsed = time.monotonic() - started
            if took["all_accepted_stored_s"] is None and accepted <= set(stored):
                took["all_accepted_stored_s"] = elapsed
            if took["pending_empty_s"] is None and bench.pending_count() == 0:
                took["pending_empty_s"] = elapsed
            if None not in took.values() or elapsed > timeout:
                return stored, took
            time.sleep(0.25)
    finally:
        conn.close()


def percentile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency(answers) -> dict:
    values = [a.latency_ms for a in answers if a.status == "202"]
    return {"requests": len(values), "p50_ms": percentile(values, 0.5), "p99_ms": percentile(values, 0.99),
            "max_ms": max(values) if values else None}


def refusal_runs(answers) -> dict:
    """The longest run of consecutive non-202 answers (in answer order): its length in seconds
    (earliest sending of one of them to the last answer) and in answers; and the longest gap
    between two 202 answers."""
    ordered = sorted(answers, key=lambda a: a.answered)
    longest = {"seconds": 0.0, "answers": 0, "from_s": None, "to_s": None}
    run = []
    for answer in ordered + [None]:
        if answer is not None and answer.status != "202":
            run.append(answer)
            continue
        # From the earliest sending of a refused request to the last refusal: how long a client saw no 202.
        first_sent = min((a.sent for a in run), default=None)
        if run and run[-1].answered - first_sent > longest["seconds"]:
            longest = {"seconds": run[-1].answered - first_sent, "answers": len(run),
                       "from_s": first_sent, "to_s": run[-1].answered}
        run = []
    accepted_times = [a.answered for a in ordered if a.status == "202"]
    gaps = [b - a for a, b in zip(accepted_times, accepted_times[1:])]
    return {"longest_refusal_run": longest, "longest_gap_between_202s_s": max(gaps) if gaps else None}


def summarize(answers, stored, stop_at, stream_end, drain: dict) -> dict:
    sent_ids = [i for a in answers for i in a.event_ids]
    accepted = {i for a in answers for i in a.accepted_ids}
    refused = {i for a in answers if a.status != "202" for i in a.event_ids}
    counts = Counter(stored)
    by_status = Counter()
    for a in answers:
        by_status[a.status] += len(a.event_ids)
    missing = accepted - counts.keys()
    duplicated = [i for i, n in counts.items() if n > 1]
    after = [a for a in answers if a.sent >= stop_at]
    first_202 = min((a.answered for a in after if a.status == "202"), default=None)
    return {
        "events_sent": len(sent_ids),
        "events_sent_unique": len(set(sent_ids)),
        "events_per_s": len(sent_ids) / stream_end,
        "requests": len(answers),
        "accepted_202": len(accepted),
        "refused": len(refused),
        "events_by_status": dict(sorted(by_status.items())),
        "stored_rows": len(stored),
        "stored_unique": len(counts),
        "accepted_missing": len(missing),
        "duplicated": len(duplicated),
        "stored_exactly_once": not missing and not duplicated,
        # The contract: a 503 means nothing of that request was accepted, so none of it is stored.
        "stored_but_refused": len(refused & counts.keys()),
        "stored_never_sent": len(counts.keys() - set(sent_ids)),
        "stop_at_s": stop_at,
        # From the moment the stop began to the first 202 of a request sent after it.
        "first_202_after_stop_s": None if first_202 is None else first_202 - stop_at,
        "refusals_after_stop": sum(1 for a in after if a.status != "202"),
        **refusal_runs(answers),
        "latency_before_stop": latency([a for a in answers if a.sent < stop_at]),
        "latency_after_stop": latency(after),
        "latency_last_5s": latency([a for a in answers if a.sent >= stream_end - 5]),
        "stream_s": stream_end,
        # From the stream's end: every accepted event stored; the pending store empty.
        **drain,
        "drain_s": None if None in drain.values() else max(drain.values()),
    }


def connected_ports(process: Process) -> list[int]:
    """The AMQP ports a Celery worker logged connecting to, in order (its failovers)."""
    return [int(port) for port in re.findall(r"Connected to amqp://[^@]*@127\.0\.0\.1:(\d+)/", process.output())]


def longest_task_gap(process: Process) -> float | None:
    """The longest time between two tasks the worker finished (its log's intake.task lines).
    Under a steady stream a gap of more than a moment is the worker not consuming."""
    times = []
    for line in process.output().splitlines():
        if '"logger":"intake.task"' in line:
            try:
                times.append(datetime.fromisoformat(json.loads(line)["ts"].replace("Z", "+00:00")).timestamp())
            except (ValueError, KeyError):
                continue
    return max((b - a for a, b in zip(times, times[1:])), default=None)


def run(args) -> dict:
    started = time.monotonic()
    bench = Bench(argparse.Namespace(log_level="INFO", keep_logs=False))
    cluster = Cluster()
    try:
        # The database, Redis db and app are made while the nodes boot (both take ~15-25 s).
        in_parallel(cluster.start, bench.setup)
        web, worker = start_stack(bench, cluster)
        leaders_before = cluster.queue_leaders(cluster.nodes[0])
        victim = choose_victim(cluster, leaders_before, args.victim)
        survivor = next(node for node in cluster.nodes if node is not victim)
        log(f"queue leaders {leaders_before}; streaming {args.duration:.0f}s at {args.rate:.0f} events/s, "
            f"{args.stop_mode} of {victim.name} after {args.stop_after:.0f}s")

        stream = Stream(bench.base_url, bench.app_id, bench.api_key, rate=args.rate, threads=args.threads,
                        batch_size=args.batch_size, prefix=cluster.run_id)

        def stop():
            at = stream.now()
            cluster.stop_node(victim, args.stop_mode)
            return at, stream.now() - at

        stop_at, stop_command_s = stream.run(args.duration, args.stop_after, stop)
        stream_end = stream.now()
        bench.check_stack()
        accepted = {i for a in stream.answers for i in a.accepted_ids}
        stored, drain = wait_stored(bench, accepted, args.drain_timeout)
        result = {
            "victim": args.victim,
            "stop_mode": args.stop_mode,
            "stopped_node": victim.name,
            "stopped_node_is_first_url": victim is cluster.nodes[0],
            "stop_command_s": stop_command_s,
            "queue_leaders_before": leaders_before,
            "queue_leaders_after": cluster.queue_leaders(survivor),
            "running_nodes_after": cluster.running_nodes(survivor),
            "node_ports": {node.name: node.amqp_port for node in cluster.nodes},
            "worker_connected_to_ports": connected_ports(worker),
            "worker_longest_task_gap_s": longest_task_gap(worker),
            # Celery's DelayedDelivery step (quorum queues) sets up every failover URL on each
            # (re)connect, and retries a dead one for seconds before the worker consumes again.
            "worker_delayed_delivery_setup_failures": worker.output().count("Failed to declare exchanges and queues"),
            "rate_target": args.rate,
            **summarize(stream.answers, stored, stop_at, stream_end, drain),
        }
        result["drained"] = result["drain_s"] is not None
        return result
    finally:
        if args.keep_logs:
            keep_logs(bench, cluster, Path(args.keep_logs))
        bench.teardown()
        cluster.teardown()
        log(f"done in {time.monotonic() - started:.1f}s")


def keep_logs(bench: Bench, cluster: Cluster, folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    for path in bench.tmp.glob("*.log"):
        shutil.copy(path, folder / path.name)
    for node in cluster.nodes:
        (folder / f"{node.name.split('@')[0]}.log").write_text(cluster.node_output(node, tail=None))
    log(f"logs kept in {folder}")


def main(argv=None) -> dict:
    """Run once, print the result as one JSON object, return it."""
    started = time.monotonic()
    result = rounded(run(parse_args(argv)))
    result["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, raise_interrupt)  # a SIGTERM still runs the teardown
    sys.exit(0 if main()["stored_exactly_once"] else 1)
