"""The partitioning migration on databases that already hold events, PostgreSQL and SQLite."""
import json
import os
import sqlite3
import subprocess
import sys
import uuid

import psycopg2
import pytest

from tests.conftest import ADMIN_URL, ROOT, _admin

INITIAL = "b757319f68a8"
ROWS = [  # event_id, timestamp, user_id
    ("a", "2026-11-30 10:00:01+00", "u1"),
    ("b", "2026-11-30 10:00:59+00", "u1"),
    ("c", "2026-11-30 10:01:00+00", None),
    ("d", "1999-12-31 23:59:59+00", "u2"),  # older than any weekly partition
]


def upgrade(env, revision="head"):
    result = subprocess.run([sys.executable, "-m", "flask", "--app", "run", "db", "upgrade", revision], cwd=ROOT,
                            env={**os.environ, **env}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def flask(env, *args):
    result = subprocess.run([sys.executable, "-m", "flask", "--app", "run", *args], cwd=ROOT,
                            env={**os.environ, **env}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def scratch_postgres():
    name = f"intake_migration_{uuid.uuid4().hex[:8]}"
    _admin(f'CREATE DATABASE "{name}"')
    yield ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def seed(cursor, now_sql, sqlite=False):
    cursor.execute(f"INSERT INTO users VALUES ('u', 'a@example.com', 'x', NULL, NULL, {now_sql})")
    cursor.execute(f"INSERT INTO apps VALUES ('app', 'u', 'n', 'h', 3650, {now_sql}, NULL)")
    for event_id, stamp, user in ROWS:
        if sqlite:  # as SQLAlchemy writes a DateTime there
            stamp = stamp.replace("+00", ".000000")
        cursor.execute(
            "INSERT INTO events (app_id, event_id, event_name, level, user_id, timestamp, received_at, processed_at,"
            f" validation, payload) VALUES ('app', '{event_id}', 'view', 'info', {'NULL' if user is None else repr(user)},"
            f" '{stamp}', '{stamp}', '{stamp}', '{{}}', '{{\"n\": \"{event_id}\"}}')")


def test_postgresql_upgrade_keeps_every_event_and_its_idempotency(scratch_postgres, tmp_path):
    env = {"DATABASE_URL": scratch_postgres, "INSTANCE_PATH": str(tmp_path)}
    upgrade(env, INITIAL)
    conn = psycopg2.connect(scratch_postgres)
    conn.autocommit = True
    cursor = conn.cursor()
    seed(cursor, "now()")
    upgrade(env)

    cursor.execute("SELECT event_id, payload->>'n', tableoid::regclass::text FROM events ORDER BY event_id")
    rows = cursor.fetchall()
    assert [(r[0], r[1]) for r in rows] == [(e, e) for e, _, _ in ROWS]
    assert rows[3][2] == "events_default" and rows[0][2].startswith("events_p")
    cursor.execute("SELECT relkind FROM pg_class WHERE relname = 'events'")
    assert cursor.fetchone() == ("p",), "partitioned"
    cursor.execute("SELECT count(*) FROM event_keys")
    assert cursor.fetchone() == (4,)
    # Idempotency survives: the same keys are skipped by the new write path; ids continue.
    from app.events import EXECUTE_INSERT_GROUP, PREPARE_INSERT_GROUP
    group = [{"app_id": "app", "event_id": e, "event_name": "view", "level": "info", "user_id": None,
              "timestamp": 1_764_496_800_000_000, "received_at": 1_764_496_800_000_000, "validation": {},
              "payload": {"n": "again"}} for e in ("a", "d", "new")]
    cursor.execute(PREPARE_INSERT_GROUP)
    cursor.execute(EXECUTE_INSERT_GROUP, (json.dumps(group),))
    cursor.execute("SELECT event_id, payload->>'n' FROM events ORDER BY id")
    assert cursor.fetchall() == [(e, e) for e, _, _ in ROWS] + [("new", "again")]
    conn.close()

    assert flask(env, "rollups", "refresh") == {"events_rolled_up": 5}, "existing events are rolled up too"
    conn = psycopg2.connect(scratch_postgres)
    cursor = conn.cursor()
    cursor.execute("SELECT start, info, users FROM rollups WHERE bucket = 'm' ORDER BY start")
    assert [(str(s)[:16], i, u) for s, i, u in cursor.fetchall()] == [
        ("1999-12-31 23:59", 1, 1), ("2025-11-30 10:00", 1, 0), ("2026-11-30 10:00", 2, 1), ("2026-11-30 10:01", 1, 0)]
    conn.close()


def test_sqlite_upgrade_keeps_every_event_and_its_idempotency(tmp_path):
    env = {"DATABASE_URL": "", "REDIS_URL": "", "CELERY_BROKER_URL": "", "INSTANCE_PATH": str(tmp_path)}
    upgrade(env, INITIAL)
    [path] = tmp_path.glob("*.db")
    conn = sqlite3.connect(path)
    seed(conn.cursor(), "'2026-11-30 10:00:00.000000'", sqlite=True)
    conn.commit()
    conn.close()
    upgrade(env)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM events").fetchone() == (4,)
    assert conn.execute("SELECT count(*) FROM event_keys").fetchone() == (4,)
    conn.close()
    assert flask(env, "rollups", "refresh") == {"events_rolled_up": 4}
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT sum(info), sum(users) FROM rollups WHERE bucket = 'd'").fetchone() == (4, 2)
    conn.close()
    stats = json.loads(subprocess.run(
        [sys.executable, "-c", "import json; from app import create_app; from app.rollups import app_stats; "
         "app = create_app(); app.app_context().push(); "
         "print(json.dumps(app_stats('app', bucket='minute', since='2026-11-30T09:59:00Z', until='2026-11-30T10:02:00Z')))"],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    assert stats["total"] == 3 and stats["ingestion"] == {"accepted": 3, "stored": 3, "failed": 0, "lag_seconds": 0.0}
    assert [(row["start"], row["count"], row["users"]) for row in stats["series"]] == [
        ("2026-11-30T10:00:00Z", 2, 1), ("2026-11-30T10:01:00Z", 1, 0)]
    assert flask(env, "retention", "purge") == {"deleted": 1}, "the event of 1999 is past 3650 days"
    conn = sqlite3.connect(path)
    assert [r[0] for r in conn.execute("SELECT event_id FROM events ORDER BY 1")] == ["a", "b", "c"]
    conn.close()
