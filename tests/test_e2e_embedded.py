"""The embedded default (SQLite + the file-system broker) carries an event end to end, past a damaged message."""
import json
import sqlite3
import subprocess
import sys

from tests.conftest import ROOT, Stack, wait_until


def test_embedded_default_stores_an_event(test_environment, tmp_path):
    stack = Stack({"INSTANCE_PATH": str(tmp_path / "instance"), "APP_ENV": "development"}, tmp_path)
    for name in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL"):
        stack.env.pop(name, None)

    def flask(*args):
        result = subprocess.run([sys.executable, "-m", "flask", "--app", "run", *args], cwd=ROOT, env=stack.env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    try:
        flask("db", "upgrade")
        flask("users", "create", "dev@example.com", "--password", "correct horse", "--verified")
        created = json.loads(flask("apps", "create", "laptop", "--owner", "dev@example.com"))
        stack.web(workers=1)
        worker = stack.worker(queues="default,batch_processing,emails", concurrency=1)
        # A message file damaged on disk, first in the worker's way: dropped and logged, not fatal.
        (tmp_path / "instance" / "broker" / "queue" / "0_damaged.default.msg").write_bytes(b'{"bod')
        response = stack.post(f"/api/logs/{created['app_id']}", {"event_name": "hello", "event_id": "e-1"},
                              {"X-API-Key": created["api_key"]})
        assert response.status_code == 202, response.text

        database = tmp_path / "instance" / "intake.db"

        def stored():
            with sqlite3.connect(database) as conn:
                return conn.execute("SELECT event_name, event_id FROM events").fetchall()

        assert wait_until(stored, message="the event in SQLite") == [("hello", "e-1")]
        assert worker.proc.poll() is None
        assert "dropped an unreadable message on queue default" in worker.output()

        inspect = subprocess.run([sys.executable, "-m", "celery", "-A", "run:celery", "inspect", "active_queues",
                                  "--json", "--timeout", "5"], cwd=ROOT, env=stack.env, capture_output=True,
                                 text=True, timeout=60)
        assert inspect.returncode == 0, inspect.stderr
        (queues,) = json.loads(inspect.stdout.strip().splitlines()[-1]).values()
        assert {q["name"] for q in queues} == {"default", "emails", "batch_processing"}
    finally:
        stack.stop()
