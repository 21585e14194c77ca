#!/usr/bin/env python3
"""The worker's write statement before and after de-duplication keys, partitions and rollup deltas.

Two scratch databases side by side on one server: one at the initial schema running the
statement as it was (one INSERT … ON CONFLICT into a plain `events`), one at the current
schema running app/events.py INSERT_GROUP (keys, partitioned events, deltas), prepared
once per connection as the workers run it. Rounds
alternate between them, so load on the machine hits both alike. Prints one JSON object:
ms per group and per event for each group size, the ratio after ÷ before, and what the
rollup job costs per event on top (off the write path, on batch_processing).

    .venv/bin/python bench/write_path.py --rows 100000          # groups of 4 and of 100
"""
import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg2

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
INITIAL = "b757319f68a8"

# app/events.py INSERT_GROUP before this work (commit f07f651), for the side-by-side comparison.
BEFORE = """
INSERT INTO events (app_id, event_id, event_name, level, user_id, "timestamp", received_at, processed_at,
                    validation, payload)
SELECT app_id, event_id, event_name, level, user_id,
       'epoch'::timestamptz + "timestamp" * interval '1 microsecond',
       'epoch'::timestamptz + received_at * interval '1 microsecond',
       now(), validation, payload
FROM jsonb_to_recordset(%s::jsonb) AS e(app_id text, event_id text, event_name text, level text, user_id text,
                                        "timestamp" bigint, received_at bigint, validation jsonb, payload jsonb)
ON CONFLICT (app_id, event_id) DO NOTHING"""


def admin(sql):
    conn = psycopg2.connect(ADMIN_URL)
    conn.autocommit = True
    try:
        conn.cursor().execute(sql)
    finally:
        conn.close()


def scratch_database(revision):
    name = f"intake_writepath_{uuid.uuid4().hex[:8]}"
    admin(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    env = {**os.environ, "DATABASE_URL": url, "INSTANCE_PATH": "/tmp/intake-writepath"}
    env.pop("REDIS_URL", None)
    subprocess.run([sys.executable, "-m", "flask", "--app", "run", "db", "upgrade", revision], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    return name, url


def batch_payload(n: int, event_id: str) -> dict:
    """The payload of the bench's n-th batched event (wrk_common.lua's event_json)."""
    return {"event_name": "bench", "event_id": event_id, "level": "info", "user_id": f"u{n % 1000}",
            "session": f"s{n % 97}",
            "properties": {"page": "/pricing", "button": "signup", "ms": n % 500, "ok": True, "tags": ["a", "b"]}}


def groups(size, rows, tag):
    now_us = int(time.time() * 1_000_000)
    validation = {"status": "valid", "warnings": []}
    for g in range(rows // size):
        group = []
        for i in range(size):
            n = g * size + i
            event_id = f"{tag}-{n}"
            group.append({"app_id": "bench-app", "event_id": event_id, "event_name": f"bench.{n % 3}",
                          "level": "info", "user_id": f"u{n % 1000}", "timestamp": now_us - (n % 5) * 1_000_000,
                          "received_at": now_us, "validation": validation, "payload": batch_payload(n, event_id)})
        yield json.dumps(group)


def backend_cpu(cursor) -> float:
    """CPU seconds the connection's PostgreSQL backend has used (the server is local): steady under load."""
    cursor.execute("SELECT pg_backend_pid()")
    fields = Path(f"/proc/{cursor.fetchone()[0]}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(cursor, statement, documents):
    cpu, started = backend_cpu(cursor), time.perf_counter()
    for document in documents:
        cursor.execute(statement, (document,))
    return time.perf_counter() - started, backend_cpu(cursor) - cpu


def compare(rows=100_000, sizes=(4, 100), rounds=4) -> dict:
    """Time both statements on `rows` rows for each group size; rounds alternate between them."""
    from app.events import EXECUTE_INSERT_GROUP, PREPARE_INSERT_GROUP
    from app.rollups import FOLD

    before_name, before_url = scratch_database(INITIAL)
    after_name, after_url = scratch_database("head")
    try:
        before, after = psycopg2.connect(before_url), psycopg2.connect(after_url)
        before.autocommit = after.autocommit = True  # one commit per group, as the workers do
        after.cursor().execute(PREPARE_INSERT_GROUP)  # as app/events.py does once per connection
        result = {}
        for size in sizes:
            seconds, cpu = {"before": 0.0, "after": 0.0}, {"before": 0.0, "after": 0.0}
            for r in range(rounds):
                order = (("before", before, BEFORE), ("after", after, EXECUTE_INSERT_GROUP))
                for label, conn, statement in order if r % 2 == 0 else reversed(order):
                    documents = list(groups(size, rows // rounds, f"{size}-{r}"))
                    conn.cursor().execute("CHECKPOINT")
                    wall, used = timed(conn.cursor(), statement, documents)
                    seconds[label] += wall
                    cpu[label] += used
            count = rows // size
            result[f"groups_of_{size}"] = {
                "before_ms_per_group": 1000 * seconds["before"] / count,
                "after_ms_per_group": 1000 * seconds["after"] / count,
                "before_us_per_event": 1e6 * seconds["before"] / rows,
                "after_us_per_event": 1e6 * seconds["after"] / rows,
                "after_over_before": seconds["after"] / seconds["before"],
                "before_backend_cpu_ms_per_group": 1000 * cpu["before"] / count,
                "after_backend_cpu_ms_per_group": 1000 * cpu["after"] / count,
                "backend_cpu_after_over_before": cpu["after"] / cpu["before"] if cpu["before"] else None,
            }
        cursor = after.cursor()
        cursor.execute("SELECT coalesce(sum(count), 0), count(*) FROM rollup_deltas")
        events, deltas = cursor.fetchone()
        started = time.perf_counter()
        folded = 0
        while True:
            cursor.execute(FOLD, {"limit": 20_000})
            step, rows = cursor.fetchone()
            folded += step
            if rows < 20_000:
                break
        fold_s = time.perf_counter() - started
        result["rollup_fold"] = {"events": int(events), "delta_rows": deltas, "folded": int(folded),
                                 "seconds": fold_s, "us_per_event": 1e6 * fold_s / max(events, 1)}
        before.close()
        after.close()
        return result
    finally:
        admin(f'DROP DATABASE IF EXISTS "{before_name}" WITH (FORCE)')
        admin(f'DROP DATABASE IF EXISTS "{after_name}" WITH (FORCE)')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows per group size and statement")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds the rows are split into")
    args = parser.parse_args()
    print(json.dumps(compare(args.rows, rounds=args.rounds), indent=2))


if __name__ == "__main__":
    main()
