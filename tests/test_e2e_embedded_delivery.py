"""The embedded default (SQLite, file-system broker, pending folder) recovers lost messages without beat."""
import json
import sqlite3
import subprocess
import sys
import threading
import time

from tests.conftest import ROOT, Stack, wait_until

AIM = 30  # seconds after the last worker start (API.md section 5; 60 at most)


def test_lost_and_killed_messages_are_stored_without_beat(test_environment, tmp_path):
    instance = tmp_path / "instance"
    stack = Stack({"INSTANCE_PATH": str(instance), "APP_ENV": "development", "INGEST_REDELIVER_AFTER": "8"}, tmp_path)
    for name in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL"):
        stack.env.pop(name, None)

    def flask(*args):
        result = subprocess.run([sys.executable, "-m", "flask", "--app", "run", *args], cwd=ROOT, env=stack.env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def stored():
        with sqlite3.connect(instance / "intake.db") as conn:
            return sorted(row[0] for row in conn.execute("SELECT event_id FROM events"))

    try:
        flask("db", "upgrade")
        flask("users", "create", "dev@example.com", "--password", "correct horse", "--verified")
        created = json.loads(flask("apps", "create", "laptop", "--owner", "dev@example.com"))
        headers = {"X-API-Key": created["api_key"]}
        stack.web(workers=1)
        accepted = []
        for i in range(3):
            assert stack.post(f"/api/logs/{created['app_id']}", {"event_name": "e", "event_id": f"lost-{i}"},
                              headers).status_code == 202
            accepted.append(f"lost-{i}")
        assert stack.post(f"/api/logs/{created['app_id']}/batch",
                          [{"event_name": "b", "event_id": f"lost-b{i}"} for i in range(3)],
                          headers=headers).status_code == 202
        accepted += [f"lost-b{i}" for i in range(3)]
        # The broker lost the messages (deleted from its folder); the pending folder still has the groups.
        messages = list((instance / "broker" / "queue").glob("*.msg"))
        assert len(messages) == 4  # three single events posted one by one, one batch
        for message in messages:
            message.unlink()

        worker = stack.worker(queues="default,batch_processing,emails", concurrency=1)
        wait_until(lambda: stored() == sorted(accepted), timeout=AIM, message="the lost groups stored")

        # A stream of events and the worker SIGKILLed in the middle of it.
        stop = threading.Event()

        def load():
            i = 0
            while not stop.is_set():
                if stack.post(f"/api/logs/{created['app_id']}", {"event_name": "s", "event_id": f"s-{i}"},
                              headers).status_code == 202:
                    accepted.append(f"s-{i}")
                i += 1
                time.sleep(0.02)

        thread = threading.Thread(target=load)
        thread.start()
        try:
            time.sleep(2)
            worker.kill()
            stack.worker(queues="default,batch_processing,emails", concurrency=1)
            restarted = time.monotonic()
            time.sleep(1)
        finally:
            stop.set()
            thread.join()
        wait_until(lambda: stored() == sorted(accepted), timeout=AIM, message=f"{len(accepted)} events stored once")
        print(f"embedded default: every accepted event stored {time.monotonic() - restarted:.1f} s after the restart")
        # A group's record goes right after its commit (its tombstone fsynced first): a moment later.
        wait_until(lambda: not list((instance / "pending" / "default").glob("*.json")), timeout=10,
                   message="the pending folder emptied")
    finally:
        stack.stop()
