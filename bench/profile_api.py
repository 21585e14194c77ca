#!/usr/bin/env python3
"""Where an API process spends its CPU per request: py-spy over Intake's gunicorn.

Starts the stack as bench/run.py does (one gunicorn, rate limit on unless --rate-limit off),
drives one phase (--kind: single events, batches, or OTLP exports of --batch-size log
records; --broker: Redis or a RabbitMQ vhost) with wrk for --duration seconds while `py-spy record` samples every
gunicorn worker (threads that are not idle), and prints one JSON object: the share of
samples in each part of the request (first matching frame, in the order of CATEGORIES) and
the CPU ms per request and per event (log record) of the API workers. On a busy machine a
thread waiting for a core in a socket call or a timed queue wait is sampled too: the
publisher's share then grows. Needs py-spy (`pip install py-spy`) and wrk.
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.run import Bench, log, parse_args  # noqa: E402  (bench/ is run as a script)

# (part, a substring of a frame): a sample counts in the first part one of its frames matches.
CATEGORIES = (
    ("rate limit (app/limits.py)", "limits.py"),
    ("publish (app/publisher.py, app/pending.py)", "publisher.py"),
    ("publish (app/publisher.py, app/pending.py)", "pending.py"),
    ("checks (app/ingest/checks.py)", "checks.py"),
    ("OTLP decoding and mapping (app/ingest/otlp.py)", "otlp.py"),
    ("app and key (app/rules.py)", "rules.py"),
    ("metrics (app/metrics.py, prometheus_client)", "metrics.py"),
    ("metrics (app/metrics.py, prometheus_client)", "prometheus_client"),
    ("logs (app/logs.py, logging)", "logs.py"),
    ("logs (app/logs.py, logging)", "logging/"),
    ("view (app/ingest/views.py)", "views.py"),
    ("Flask (dispatch, request, response)", "flask/"),
    ("Werkzeug (request, response)", "werkzeug/"),
    ("gunicorn (HTTP parsing, sockets)", "gunicorn/"),
    ("other", ""),
)


def breakdown(raw: str) -> dict:
    """Share of samples by part, from py-spy's raw (collapsed) output."""
    parts, total = Counter(), 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        for part, needle in CATEGORIES:
            if needle in stack:
                parts[part] += int(count)
                break
    return {"samples": total, "share": {part: round(n / total, 3) for part, n in parts.most_common()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--kind", choices=("single", "batch", "otlp"), default="single", help="the phase to drive")
    parser.add_argument("--rate-limit", choices=("on", "off"), default="on")
    parser.add_argument("--broker", choices=("redis", "amqp"), default="redis", help="Celery's broker")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--gil", action="store_true",
                        help="sample only the thread holding the GIL (CPU in Python, no waits)")
    parser.add_argument("--raw-output", type=Path, help="also write py-spy's collapsed stacks here")
    own = parser.parse_args()
    args = parse_args(["--duration", str(own.duration), "--rate-limit", own.rate_limit, "--worker-concurrency", "2"])
    bench = Bench(args, "intake", args.modes, own.broker)
    try:
        bench.setup()
        bench.start_stack()
        conn = bench.connect()
        cur = conn.cursor()
        bench.warm_up(cur)
        bench.sampler.scan()
        workers = [pid for pid, (role, _) in bench.sampler.roles.items() if role == "api_worker"]
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        with tempfile.TemporaryDirectory() as folder:
            spies = [subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", str(own.rate),
                                       "--duration", str(own.duration), "--format", "raw", "--nonblocking",
                                       *(["--gil"] if own.gil else []),
                                       "--output", f"{folder}/{pid}.txt"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in workers]
            time.sleep(0.5)
            figures = bench.phase_ingest(cur, own.kind, 1)
            for spy in spies:
                spy.wait(60)
            raw = "\n".join(path.read_text() for path in Path(folder).glob("*.txt"))
            if own.raw_output:
                own.raw_output.write_text(raw)
        conn.close()
    finally:
        bench.teardown()
    result = {"kind": own.kind, "broker": own.broker, "rate_limit": own.rate_limit,
              "accepted_per_s": round(figures["accepted_events_per_s"]),
              "e2e_events_per_s": round(figures["e2e_events_per_s"]),
              "api_cpu_ms_per_request": round(figures["api_cpu_ms_per_event"] * figures["events_per_request"], 3),
              "api_cpu_ms_per_event": round(figures["api_cpu_ms_per_event"], 4),
              "foreign_load_cores": figures["cpu_s_load"]["foreign_cores"], **breakdown(raw)}
    log(f"profile: {result}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
