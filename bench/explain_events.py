#!/usr/bin/env python3
"""The plans of the event listings on 1,000,000 rows: every filter combination is an index scan.

Creates a scratch database (`intake_explain_<random>`), migrates it (where `events` is
partitioned by week, with the weeks' partitions made first, as beat makes them), loads `--rows` events
(90 % into one app, the rest into two others; 20 event names, skewed levels, 5,000 users and
30 % without one, 30 days of timestamps), runs ANALYZE, then prints `EXPLAIN (ANALYZE,
BUFFERS)` of the exact query `GET /api/apps/<app_id>/events` runs (app/manage/event_queries.py)
for each combination of the filters event_name, level, user_id and a since/until window, of a
second page (cursor), and of the look-up of one event. Ends with a summary table and exits 1
if any plan reads `events` by a sequential scan. The database is dropped afterwards unless
`--keep`.

    .venv/bin/python bench/explain_events.py               # 1,000,000 rows, about a minute
    .venv/bin/python bench/explain_events.py --rows 100000 --summary-only
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DB_NAME = f"intake_explain_{uuid.uuid4().hex[:10]}"
DATABASE_URL = ADMIN_URL.rsplit("/", 1)[0] + "/" + DB_NAME
MAIN_APP, OTHER_APPS = "11111111-1111-4111-8111-111111111111", ("22222222-2222-4222-8222-222222222222",
                                                                  "33333333-3333-4333-8333-333333333333")
END = datetime(2026, 12, 1, tzinfo=timezone.utc)
DAYS = 30

LOAD = """
INSERT INTO events (app_id, event_id, event_name, level, user_id, "timestamp", received_at, processed_at,
                    validation, payload)
SELECT CASE WHEN i %% 10 = 0 THEN %(other1)s WHEN i %% 10 = 5 THEN %(other2)s ELSE %(main)s END,
       'ev-' || i,
       'event_' || (floor(20 * power(random(), 2)))::int,                  -- a few names are common
       CASE WHEN r < 0.015 THEN 'debug' WHEN r < 0.815 THEN 'info' WHEN r < 0.915 THEN 'warning'
            WHEN r < 0.995 THEN 'error' ELSE 'critical' END,
       CASE WHEN i %% 10 < 3 THEN NULL ELSE 'user-' || (i::bigint * 7919 %% 5000) END,
       ts, ts + interval '5 milliseconds', ts + interval '1 second',
       '{"status": "valid", "warnings": []}'::jsonb,
       jsonb_build_object('event_name', 'event', 'n', i, 'page', '/products/' || (i %% 977))
FROM (SELECT i, random() AS r,
             %(end)s::timestamptz - random() * interval '%(days)s days' AS ts
      FROM generate_series(1, %(rows)s) AS i) AS generated
"""


def admin(sql):
    conn = psycopg2.connect(ADMIN_URL, connect_timeout=5)
    conn.autocommit = True
    try:
        conn.cursor().execute(sql)
    finally:
        conn.close()


def migrate() -> None:
    env = {**os.environ, "DATABASE_URL": DATABASE_URL, "APP_ENV": "testing"}
    env.pop("REDIS_URL", None)
    subprocess.run([sys.executable, "-m", "flask", "--app", "run", "db", "upgrade"], cwd=ROOT, env=env, check=True,
                   capture_output=True)


def make_partitions() -> None:
    """Where `events` is partitioned by week (app/retention.py), the weeks the rows fall in, as in production."""
    try:
        from app import retention
    except ImportError:  # a plain table
        return
    for week in range(0, DAYS + 7, 7):
        retention.ensure_partitions(END - timedelta(days=DAYS) + timedelta(days=week))


def load(rows: int) -> None:
    conn = psycopg2.connect(DATABASE_URL)
    conn.autocommit = True
    cur = conn.cursor()
    started = time.monotonic()
    cur.execute(LOAD, {"main": MAIN_APP, "other1": OTHER_APPS[0], "other2": OTHER_APPS[1], "end": END,
                       "days": DAYS, "rows": rows})
    cur.execute("VACUUM ANALYZE events")
    print(f"loaded {rows:,} rows in {time.monotonic() - started:.1f} s", file=sys.stderr)
    conn.close()


def cases():
    """(label, filters) for every combination of the equality filters, with and without a window."""
    values = {"event_name": "event_3", "level": "critical", "user_id": "user-42"}
    window = {"since": END - timedelta(days=9), "until": END - timedelta(days=2)}
    for size in range(len(values) + 1):
        for names in itertools.combinations(values, size):
            filters = {name: values[name] for name in names}
            yield " + ".join(names) or "(none)", filters
            yield " + ".join(names + ("since/until",)), {**filters, **window}
    # The level index holds warning and up; info and debug read ix_events_app_timestamp and skip the rest.
    yield "level=info (80 % of rows)", {"level": "info"}
    yield "level=info + since/until", {"level": "info", **window}
    yield "level=debug (1.5 % of rows)", {"level": "debug"}
    yield "level=debug + since/until", {"level": "debug", **window}
    yield "event_name (most common) + level=error", {"event_name": "event_0", "level": "error"}


PARENT_INDEX = """SELECT child.relname, parent.relname FROM pg_inherits
                  JOIN pg_class child ON child.oid = inhrelid JOIN pg_class parent ON parent.oid = inhparent
                  WHERE child.relkind = 'i'"""


def explain(connection, statement) -> tuple[str, list[str], float]:
    compiled = statement.compile(dialect=connection.dialect)
    rows = connection.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + str(compiled),
                                      compiled.params).scalar()
    plan = rows[0] if isinstance(rows, list) else json.loads(rows)[0]
    text = "\n".join(r[0] for r in connection.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + str(compiled),
                                                             compiled.params))
    found = []

    def walk(node):
        if node.get("Relation Name") or node.get("Index Name"):
            kind = node["Node Type"]
            if kind == "Seq Scan" and not node.get("Actual Rows") and not node.get("Rows Removed by Filter"):
                kind = "Seq Scan of an empty partition"  # reads no page: nothing to index
            found.append((kind, node.get("Index Name")))
        for child in node.get("Plans", []):
            walk(child)

    walk(plan["Plan"])
    # Partitioned by timestamp, each partition scans its own copy of an index: name the table's index
    # once, with the number of partitions scanned.
    parents = dict(connection.exec_driver_sql(PARENT_INDEX).all())
    names = [node + (f" using {parents.get(index, index)}" if index else "") for node, index in found]
    scans = [name + (f" (x{names.count(name)} partitions)" if names.count(name) > 1 else "")
             for name in dict.fromkeys(names)]
    return text, scans, plan["Execution Time"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep", action="store_true", help=f"keep the database ({DB_NAME})")
    parser.add_argument("--summary-only", action="store_true", help="print only the summary table")
    args = parser.parse_args()

    admin(f'CREATE DATABASE "{DB_NAME}"')
    try:
        migrate()
        os.environ.update({"DATABASE_URL": DATABASE_URL, "APP_ENV": "testing"})
        os.environ.pop("REDIS_URL", None)
        sys.path.insert(0, str(ROOT))
        from app import create_app
        from app.extensions import db
        from app.manage import event_queries
        from app.models import Event

        app = create_app()
        with app.app_context():
            make_partitions()
        load(args.rows)
        summary, sequential = [], []
        with app.app_context(), db.engine.connect() as connection:
            first = db.session.execute(event_queries.listing_query(MAIN_APP, limit=100)).all()
            cursor = event_queries.encode_cursor(first[-1].timestamp, first[-1].id)
            statements = [(label, event_queries.listing_query(MAIN_APP, limit=100, **filters))
                          for label, filters in cases()]
            statements.append(("second page (cursor)", event_queries.listing_query(MAIN_APP, limit=100,
                                                                                   cursor=cursor)))
            statements.append(("second page + event_name", event_queries.listing_query(
                MAIN_APP, limit=100, cursor=cursor, event_name="event_3")))
            statements.append(("one event by event_id", db.select(Event).where(
                Event.app_id == MAIN_APP, Event.event_id == "ev-77").limit(1)))
            for label, statement in statements:
                text, scans, milliseconds = explain(connection, statement)
                summary.append((label, ", ".join(scans), milliseconds))
                if any(scan.startswith("Seq Scan") and "empty partition" not in scan for scan in scans):
                    sequential.append(label)
                if not args.summary_only:
                    print(f"\n=== {label}\n{text}")
        width = max(len(label) for label, _, _ in summary)
        print(f"\n{'filters':<{width}}  {'ms':>8}  scan of events ({args.rows:,} rows)")
        for label, scans, milliseconds in summary:
            print(f"{label:<{width}}  {milliseconds:8.2f}  {scans}")
        if sequential:
            print(f"\nsequential scans: {', '.join(sequential)}")
            return 1
        return 0
    finally:
        if args.keep:
            print(f"kept database {DB_NAME}", file=sys.stderr)
        else:
            admin(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')


if __name__ == "__main__":
    sys.exit(main())
