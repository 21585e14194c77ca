"""App deletion (app/lifecycle.py): the key stops at once, every row of the app goes in bounded chunks, a kill resumes."""
import json
import time

import psycopg2
import pytest

import celery_config
from app import events, lifecycle, rollups
from app.errors import ApiError
from app.rules import load_app_entry
from tests.conftest import DATABASE_URL, sql, wait_until
from tests.test_persistence import make_event


@pytest.fixture
def settings(app):
    """Change app settings for one test."""
    saved = dict(app.config)

    def change(**values):
        app.config.update(values)

    yield change
    app.config.clear()
    app.config.update(saved)


def fill(app_id, count, prefix="e"):
    """Store events through the normal insert, rules and dead letters for one app."""
    for start in range(0, count, 2000):
        events.insert_events([make_event(app_id, event_id=f"{prefix}-{i}") for i in range(start, min(count, start + 2000))])
    events.record_failures([(make_event(app_id, event_id=f"dead-{i}"), "boom") for i in range(3)], 6)


def rows_by_table(app_id) -> dict:
    """Rows of the app in every table with an app_id column (and its apps row): whatever tables exist."""
    tables = [t for (t,) in sql("SELECT table_name FROM information_schema.columns WHERE table_schema = 'public'"
                                " AND column_name = 'app_id' ORDER BY table_name")]
    counts = {t: sql(f'SELECT count(*) FROM "{t}" WHERE app_id = %s', app_id)[0][0] for t in tables}
    counts["apps"] = sql("SELECT count(*) FROM apps WHERE id = %s", app_id)[0][0]
    return counts


def queued_tasks(redis):
    return [json.loads(m)["headers"] for m in redis.lrange("batch_processing", 0, -1)]


@pytest.fixture
def two_apps(make_app):
    rule = {"name": "r", "action": "warn", "schema": {"type": "object"}}
    return make_app(rules=[rule]), make_app(rules=[rule])


def test_scheduling_stops_the_key_at_once_and_queues_the_deletion(ctx, two_apps, redis):
    (victim, _), (other, _) = two_apps
    answer = lifecycle.schedule_app_deletion(victim)
    assert answer["status"] == "accepted" and answer["app_id"] == victim and answer["task_id"]
    assert load_app_entry(victim) is None, "the rules cache finds no app: the key stops working"
    assert load_app_entry(other) is not None
    [(deleted_at,)] = sql("SELECT deleted_at FROM apps WHERE id = %s", victim)
    assert deleted_at is not None
    [task] = queued_tasks(redis)
    assert (task["task"], task["id"]) == (lifecycle.DELETE_TASK, answer["task_id"])

    lifecycle.schedule_app_deletion(victim)  # twice: the first mark stays
    assert sql("SELECT deleted_at FROM apps WHERE id = %s", victim) == [(deleted_at,)]
    with pytest.raises(ApiError) as raised:
        lifecycle.schedule_app_deletion("no-such-app")
    assert (raised.value.status, raised.value.code) == (404, "app_not_found")


def test_ingestion_refuses_the_key_once_the_app_is_deleted(ctx, app, make_app):
    app_id, key = make_app()
    client = app.test_client()
    assert client.post(f"/api/logs/{app_id}", json={"event_name": "x"}, headers={"X-API-Key": key}).status_code == 202
    lifecycle.schedule_app_deletion(app_id)
    time.sleep(app.config["RULES_CACHE_TTL"] + 0.1)  # this process's cached entry expires (others: invalidation)
    answer = client.post(f"/api/logs/{app_id}", json={"event_name": "x"}, headers={"X-API-Key": key})
    assert answer.status_code == 404 and answer.json["error"]["code"] == "app_not_found"


def test_deletion_removes_every_row_of_the_app_and_nothing_else(ctx, two_apps, settings):
    settings(DELETE_CHUNK_ROWS=7, DELETE_SETTLE_SECONDS=0)
    (victim, _), (other, _) = two_apps
    fill(victim, 100)
    fill(other, 40, prefix="o")
    others_before = rows_by_table(other)
    assert rows_by_table(victim)["events"] == 100

    lifecycle.schedule_app_deletion(victim)
    result = lifecycle.delete_app_data(victim)
    assert result["done"] and not result["more"]
    deleted = result["deleted"]
    assert (deleted["events"], deleted["event_keys"], deleted["failed_events"], deleted["rules"]) == (100, 100, 3, 1)
    assert set(rows_by_table(victim).values()) == {0}
    assert rows_by_table(other) == others_before
    assert lifecycle.delete_app_data(victim)["done"], "run again: nothing left, nothing else touched"
    assert rows_by_table(other) == others_before


def test_every_table_with_app_rows_is_in_the_deletion_list(ctx):
    tables = {t for (t,) in sql("SELECT table_name FROM information_schema.columns WHERE table_schema = 'public'"
                                " AND column_name = 'app_id'")}
    # Partitions of a listed table are covered by it.
    partitions = {t for (t,) in sql("SELECT c.relname FROM pg_inherits JOIN pg_class c ON c.oid = inhrelid")}
    assert tables - partitions <= {table for table, _ in lifecycle.APP_DATA_TABLES}


def test_an_app_not_marked_deleted_is_never_touched(ctx, make_app):
    app_id = make_app()[0]
    fill(app_id, 10)
    before = rows_by_table(app_id)
    assert lifecycle.delete_app_data(app_id)["deleted"] == {}
    assert rows_by_table(app_id) == before


def test_events_stored_after_the_deletion_are_swept_until_the_app_row_settles(ctx, make_app, settings):
    settings(DELETE_CHUNK_ROWS=1000, DELETE_SETTLE_SECONDS=3600)
    app_id = make_app()[0]
    fill(app_id, 20)
    lifecycle.schedule_app_deletion(app_id)
    first = lifecycle.delete_app_data(app_id)
    assert not first["done"] and not first["more"], "the data is gone, the app row waits"
    assert rows_by_table(app_id)["apps"] == 1 and rows_by_table(app_id)["events"] == 0
    assert load_app_entry(app_id) is None

    # Accepted before the deletion, stored after it (a backed-up queue): the next sweep removes it.
    events.insert_events([make_event(app_id, event_id="late")])
    assert lifecycle.resume_app_deletions() == 1
    assert lifecycle.delete_app_data(app_id)["deleted"] == {"events": 1, "event_keys": 1, "rollup_deltas": 1}

    sql("UPDATE apps SET deleted_at = deleted_at - interval '2 hours' WHERE id = %s", app_id)
    assert lifecycle.delete_app_data(app_id)["done"]
    assert set(rows_by_table(app_id).values()) == {0}
    assert lifecycle.resume_app_deletions() == 0


def test_a_deletion_out_of_time_goes_on_in_a_new_task(ctx, make_app, settings):
    settings(DELETE_CHUNK_ROWS=5, DELETE_SETTLE_SECONDS=0)
    app_id = make_app()[0]
    fill(app_id, 12)
    lifecycle.schedule_app_deletion(app_id)
    runs = []
    while not (runs and runs[-1]["done"]):
        runs.append(lifecycle.delete_app_data(app_id, time_budget=0))
        assert len(runs) < 20
    assert [r["more"] for r in runs[:-1]] == [True] * (len(runs) - 1) and len(runs) > 3
    assert sum(r["deleted"].get("events", 0) for r in runs) == 12
    assert set(rows_by_table(app_id).values()) == {0}


def test_two_deletions_of_one_app_at_once_do_not_both_work(ctx, make_app, settings):
    settings(DELETE_SETTLE_SECONDS=0)
    app_id = make_app()[0]
    fill(app_id, 5)
    lifecycle.schedule_app_deletion(app_id)
    holder = psycopg2.connect(DATABASE_URL)
    holder.autocommit = True
    try:
        holder.cursor().execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (lifecycle.DELETE_LOCK_CLASS, app_id))
        busy = lifecycle.delete_app_data(app_id)
        assert busy["busy"] and not busy["done"] and rows_by_table(app_id)["events"] == 5
    finally:
        holder.close()  # the lock goes with the connection, as with a killed worker
    # The server lets go of it when that backend has finished exiting, a moment after the close.
    wait_until(lambda: not sql("SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = %s"
                               " AND objid = hashtext(%s)::oid AND database = (SELECT oid FROM pg_database"
                               " WHERE datname = current_database())", lifecycle.DELETE_LOCK_CLASS, app_id),
               timeout=10, interval=0.05, message="the lock released")
    assert lifecycle.delete_app_data(app_id)["done"]


@pytest.mark.no_clean
def test_deletion_tasks_run_on_batch_processing_and_beat_resumes_them():
    for task in (lifecycle.DELETE_TASK, lifecycle.REPLAY_TASK, "intake.resume_app_deletions"):
        assert celery_config.task_routes[task] == {"queue": "batch_processing"}
    [entry] = [e for e in celery_config.beat_schedule.values() if e["task"] == "intake.resume_app_deletions"]
    assert entry["schedule"] <= 60


def test_a_deletion_killed_mid_way_resumes_and_finishes(ctx, two_apps, stack):
    (victim, _), (other, _) = two_apps
    total = 6_000
    fill(victim, total)
    fill(other, 500, prefix="o")
    rollups.refresh()  # as the worker's own fold would, meanwhile: the other app's counts stay put
    others_before = rows_by_table(other)
    # Small chunks: hundreds of transactions per table, so that the kill lands in the middle
    # (it lands after about 20 of them); a loaded CI machine takes 10-15 ms a chunk.
    worker_env = {"DELETE_CHUNK_ROWS": "10", "DELETE_SETTLE_SECONDS": "0"}
    worker = stack.worker(queues="batch_processing", **worker_env)

    lifecycle.schedule_app_deletion(victim)
    wait_until(lambda: rows_by_table(victim)["events"] < total - 200, interval=0.05, message="the deletion started")
    worker.kill()  # SIGKILL to the whole process group, pool children included
    left = rows_by_table(victim)
    assert 0 < left["events"] < total and left["apps"] == 1, left
    time.sleep(0.5)
    assert rows_by_table(victim) == left, "nothing deletes while no worker runs"

    stack.worker(queues="batch_processing", **worker_env)
    lifecycle.resume_app_deletions()  # what beat runs every minute
    wait_until(lambda: set(rows_by_table(victim).values()) == {0}, timeout=120, message="every row of the app gone")
    assert rows_by_table(other) == others_before
