#!/usr/bin/env python3
"""Stats over the rollups of 10 million events: one app, 30 days, hourly buckets.

Builds, in a scratch database at the current schema, the rollup rows that 10 million
events of one app over the last 30 days make (every minute, hour and day of the 30 days,
for each of --names event names, counts spread over the five levels: exactly what the
fold writes for such a load), plus as many rows for --other-apps other apps so that the
table and its index are not the one app's alone. Then times app_stats(bucket="hour")
over the 30 days, the whole function as the route will call it (query, Python, the
ingestion block), and prints its median and the plan of its query.

    .venv/bin/python bench/stats_bench.py
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

# One app's rows for 30 days; %(events)s events in all, split evenly over the minutes and names.
BUILD = """
INSERT INTO rollups (app_id, bucket, start, event_name, debug, info, warning, error, critical, users)
SELECT %(app)s, b.bucket, s.start, 'event.' || n, 0, b.per * 90 / 100, b.per * 6 / 100, b.per * 3 / 100,
       b.per - b.per * 90 / 100 - b.per * 6 / 100 - b.per * 3 / 100, least(b.per, 500)
FROM (VALUES ('m', interval '1 minute', %(events)s / (43200 * %(names)s)),
             ('h', interval '1 hour', %(events)s / (720 * %(names)s)),
             ('d', interval '1 day', %(events)s / (30 * %(names)s))) AS b(bucket, step, per)
CROSS JOIN LATERAL generate_series(%(first)s::timestamptz, %(last)s::timestamptz, b.step) AS s(start)
CROSS JOIN generate_series(1, %(names)s) AS n
WHERE date_trunc(CASE b.bucket WHEN 'm' THEN 'minute' WHEN 'h' THEN 'hour' ELSE 'day' END, s.start, 'UTC') = s.start"""


def admin(sql):
    conn = psycopg2.connect(ADMIN_URL)
    conn.autocommit = True
    try:
        conn.cursor().execute(sql)
    finally:
        conn.close()


def backend_cpu(pid) -> float:
    """CPU seconds used by a local PostgreSQL backend."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--names", type=int, default=10, help="event names of the app")
    parser.add_argument("--other-apps", type=int, default=4)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database (its name is printed)")
    args = parser.parse_args()

    name = f"intake_statsbench_{uuid.uuid4().hex[:8]}"
    admin(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    instance = tempfile.mkdtemp(prefix="intake-statsbench-")
    env = {"DATABASE_URL": url, "INSTANCE_PATH": instance, "REDIS_URL": "", "CELERY_BROKER_URL": ""}
    os.environ.update(env)
    try:
        subprocess.run([sys.executable, "-m", "flask", "--app", "run", "db", "upgrade"], cwd=ROOT, check=True,
                       capture_output=True)
        until = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
        since = until - timedelta(days=30)
        conn = psycopg2.connect(url)
        conn.autocommit = True
        cur = conn.cursor()
        started = time.perf_counter()
        apps = [str(uuid.uuid4()) for _ in range(args.other_apps + 1)]
        for app_id in apps:
            cur.execute(BUILD, {"app": app_id, "events": args.events, "names": args.names, "first": since,
                                "last": until - timedelta(minutes=1)})
        cur.execute("VACUUM ANALYZE rollups")
        cur.execute("SELECT count(*), pg_size_pretty(pg_total_relation_size('rollups')) FROM rollups")
        rows, size = cur.fetchone()
        cur.execute("SELECT sum(debug + info + warning + error + critical) FROM rollups WHERE app_id = %s "
                    "AND bucket = 'h'", (apps[0],))
        events = cur.fetchone()[0]
        built = time.perf_counter() - started
        conn.close()

        from app import create_app, rollups

        app = create_app()
        with app.app_context():
            from app.extensions import db

            timings, cpu = [], []
            backend = db.session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
            db.session.rollback()
            for _ in range(args.calls):
                t, c, b = time.perf_counter(), time.process_time(), backend_cpu(backend)
                stats = rollups.app_stats(apps[0], bucket="hour", since=since, until=until)
                timings.append(1000 * (time.perf_counter() - t))
                cpu.append(1000 * (time.process_time() - c + backend_cpu(backend) - b))
            connection = db.session.connection()
            parameters = rollups.series_parameters(apps[0], "h", since, until, None)
            plan = [r[0] for r in connection.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + rollups.SERIES,
                                                             parameters)]
            t = time.perf_counter()
            for _ in range(args.calls):
                connection.exec_driver_sql(rollups.SERIES, parameters).all()
            query_ms = 1000 * (time.perf_counter() - t) / args.calls
        print(json.dumps({
            "events_of_the_app": int(events), "rollup_rows": rows, "rollups_size": size,
            "apps": len(apps), "event_names": args.names, "build_s": round(built, 1),
            "series_rows": len(stats["series"]), "total": stats["total"],
            "app_stats_ms": {"median": round(statistics.median(timings), 2),
                             "p90": round(sorted(timings)[int(0.9 * len(timings)) - 1], 2),
                             "min": round(min(timings), 2)},
            # CPU of this process and of its PostgreSQL backend: what the call costs whatever
            # else the machine is doing (the backend's is counted in 10 ms ticks: a mean is exact).
            "app_stats_cpu_ms_mean": round(statistics.mean(cpu), 2),
            "loadavg": os.getloadavg()[0],
            "series_query_ms": round(query_ms, 2),
        }, indent=2))
        print("\n".join(plan))
    finally:
        if args.keep:
            print(f"kept database {name}")
        else:
            admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
