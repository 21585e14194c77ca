"""SIGTERM to start_celery_worker.sh: a warm shutdown. Running tasks finish, prefetched messages go back."""
import json
import signal
import sys
import time

import psycopg2
import pytest

from tests.conftest import DATABASE_URL, Process, sql, wait_until


def task_lines(process) -> list[dict]:
    complete = process.output().rpartition("\n")[0]
    return [entry for entry in map(json.loads, filter(str.strip, complete.splitlines()))
            if entry.get("logger") == "intake.task"]


def start_script(stack, tmp_path, name):
    env = {**stack.env, "CELERY_CONCURRENCY": "2", "PATH": f"{sys.prefix}/bin:{stack.env.get('PATH', '')}"}
    process = Process(name, ["./start_celery_worker.sh", "batch_processing"], env, tmp_path).start()
    stack.processes.append(process)
    process.wait_for_output(" ready.", timeout=60)
    return process


@pytest.fixture
def events_locked():
    """Holds a lock that makes every INSERT into events wait, until release() is called."""
    conn = psycopg2.connect(DATABASE_URL)
    cursor = conn.cursor()
    cursor.execute("LOCK TABLE events IN SHARE MODE")
    yield conn
    conn.rollback()
    conn.close()


def waiting_inserts() -> int:
    # The group's statement carries its events inline before "INSERT INTO events", past the
    # 1 kB of query text pg_stat_activity keeps: count the writes waiting on a lock instead.
    return sql("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
               "AND wait_event_type = 'Lock' AND query NOT ILIKE 'LOCK TABLE%%'")[0][0]


def test_sigterm_lets_running_tasks_finish_and_returns_prefetched_ones(broker, stack, make_app, tmp_path, redis,
                                                                       events_locked):
    stack.web(workers=1)
    first = start_script(stack, tmp_path, "worker-first")
    app_id, key = make_app()
    batches = 6
    for n in range(batches):
        batch = [{"event_name": "e", "event_id": f"{n}-{i}"} for i in range(10)]
        assert stack.post(f"/api/logs/{app_id}/batch", batch, {"X-API-Key": key}).status_code == 202
    # Two tasks run (concurrency 2), blocked on the lock; the other four are prefetched.
    wait_until(lambda: waiting_inserts() == 2, timeout=20, message="two tasks in flight")

    first.signal(signal.SIGTERM)  # the whole process group, as honcho or a terminal would
    time.sleep(2)
    assert first.proc.poll() is None, "the worker must wait for its running tasks"
    events_locked.rollback()  # the running tasks can write now

    assert first.proc.wait(30) == 0
    stored_by_first = task_lines(first)
    assert sorted(entry["outcome"] for entry in stored_by_first) == ["stored", "stored"]
    assert sql("SELECT count(*) FROM events")[0][0] == 20
    assert broker.depth("batch_processing") == batches - 2  # back in the queue, not lost
    assert "Warm shutdown" in first.output() and "WorkerLostError" not in first.output()

    second = start_script(stack, tmp_path, "worker-second")
    wait_until(lambda: sql("SELECT count(*) FROM events")[0][0] == batches * 10, timeout=30,
               message="every event stored")
    wait_until(lambda: len(task_lines(second)) == batches - 2, timeout=10, message="the other tasks logged")
    assert sql("SELECT count(DISTINCT event_id) FROM events")[0][0] == batches * 10
    task_ids = [entry["task_id"] for entry in stored_by_first + task_lines(second)]
    assert len(task_ids) == len(set(task_ids)) == batches  # each ran once: none lost, none twice
    assert {entry["outcome"] for entry in task_lines(second)} == {"stored"}
    assert redis.hlen("intake:pending:bodies") == 0
