"""Rollups exactly once and the stats over them, in-process on real PostgreSQL and Redis."""
import json
import threading
import time
from datetime import datetime, timedelta, timezone

import psycopg2
import pytest

from app import events, retention, rollup_timer, rollups
from app.errors import ApiError
from tests.conftest import DATABASE_URL, sql, wait_until
from tests.test_persistence import make_event

UTC = timezone.utc


def at(minutes_ago, now=datetime.now(UTC).replace(second=30, microsecond=0)):
    return (now - timedelta(minutes=minutes_ago)).isoformat()


def ev(app_id, event_id, minutes_ago, name="page_view", level="info", user=None):
    payload = {"event_id": event_id, "event_name": name, "level": level, "timestamp": at(minutes_ago)}
    if user is not None:
        payload["user_id"] = user
    return make_event(app_id, **payload)


def assert_rollups_match_events(app_id):
    """Every bucket's counts and distinct users equal what COUNT(*) over the stored events gives."""
    for bucket, unit in (("m", "minute"), ("h", "hour"), ("d", "day")):
        expected = sql(f"""
            SELECT date_trunc('{unit}', "timestamp", 'UTC'), event_name,
                   count(*) FILTER (WHERE level = 'info'), count(*) FILTER (WHERE level = 'error'),
                   count(*) FILTER (WHERE level = 'warning'), count(DISTINCT user_id)
            FROM events WHERE app_id = %s GROUP BY 1, 2 ORDER BY 1, 2""", app_id)
        actual = sql("""SELECT start, event_name, info, error, warning, users FROM rollups
                        WHERE app_id = %s AND bucket = %s ORDER BY 1, 2""", app_id, bucket)
        assert actual == expected, bucket
    assert sql("SELECT count(*) FROM rollup_deltas") == [(0,)]


def test_mixed_load_with_redeliveries_concurrent_refreshes_and_late_events_counts_each_event_once(ctx, app_id):
    levels = ("info", "error", "warning")
    groups = [[ev(app_id, f"e{g}-{i}", minutes_ago=(g * 7 + i) % 150, name=f"n{i % 3}", level=levels[i % 3],
                  user=f"u{(g + i) % 5}" if i % 4 else None) for i in range(12)] for g in range(30)]
    # Redelivered messages: a third of the groups again, and a client retry inside a group.
    groups += groups[::3]
    groups[1].append(groups[1][0])

    def write(part):
        with ctx.app_context():
            for group in part:
                assert events.store_events(group) == []

    def refresh_twice():
        with ctx.app_context():
            results.extend(rollups.refresh()["events_rolled_up"] for _ in range(2))

    results = []
    threads = [threading.Thread(target=write, args=(groups[k::3],)) for k in range(3)]
    threads += [threading.Thread(target=refresh_twice) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.append(rollups.refresh()["events_rolled_up"])
    stored = sql("SELECT count(*) FROM events WHERE app_id = %s", app_id)[0][0]
    assert stored == 30 * 12
    assert sum(results) == stored, "each stored event folded exactly once"
    assert_rollups_match_events(app_id)

    # Late events: timestamps in minutes, hours and a day that were rolled up already.
    late = [ev(app_id, f"late-{i}", minutes_ago=m, level="error", user=f"u{i}")
            for i, m in enumerate((3, 70, 149, 60 * 30))]
    events.store_events(late + [groups[0][0]])
    assert rollups.refresh() == {"events_rolled_up": 4}
    assert rollups.refresh() == {"events_rolled_up": 0}
    assert_rollups_match_events(app_id)


def test_two_refreshes_at_once_fold_every_delta_once(ctx, app_id, monkeypatch):
    monkeypatch.setattr(rollups, "FOLD_CHUNK", 7)  # many small chunks, so the two runs interleave
    for g in range(40):
        events.store_events([ev(app_id, f"c{g}-{i}", minutes_ago=g, user=f"u{i}") for i in range(5)])
    results = []

    def run():
        with ctx.app_context():
            results.append(rollups.refresh()["events_rolled_up"])

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(results) == 200
    assert_rollups_match_events(app_id)


def test_a_refresh_that_finds_the_fold_lock_taken_skips_at_once_and_folds_once_it_is_free(ctx, app_id):
    events.store_events([ev(app_id, f"l{i}", minutes_ago=1) for i in range(3)])
    holder = psycopg2.connect(DATABASE_URL)  # another run, in the middle of a chunk
    try:
        holder.cursor().execute("SELECT pg_advisory_lock(%s)", (rollups.FOLD_LOCK,))
        started = time.monotonic()
        assert rollups.refresh(wait=False) == {"events_rolled_up": 0}
        assert time.monotonic() - started < 1, "a worker's timer is not held up by another's fold"
        assert sql("SELECT sum(count) FROM rollup_deltas") == [(3,)]
        holder.cursor().execute("SELECT pg_advisory_unlock(%s)", (rollups.FOLD_LOCK,))
    finally:
        holder.close()
    assert rollups.refresh(wait=False) == {"events_rolled_up": 3}
    assert_rollups_match_events(app_id)


def test_a_batch_processing_worker_folds_the_rollups_on_its_own_behind_a_backlog_without_beat(app, app_id, redis, stack):
    import celery_config

    assert "intake.refresh_rollups" not in {entry["task"] for entry in celery_config.beat_schedule.values()}
    assert celery_config.task_routes["intake.refresh_rollups"] == {"queue": "batch_processing"}
    celery = app.extensions["celery"]
    backlog = 2_000
    # The worker's one pool process waits on a purge whose lock this test holds; behind it,
    # a batch backlog that nothing drains while the test runs: no task of this queue could fold.
    holder = psycopg2.connect(DATABASE_URL)
    try:
        holder.cursor().execute("SELECT pg_advisory_lock(%s)", (retention.PURGE_LOCK,))
        with celery.producer_or_acquire() as producer:
            celery.send_task("intake.purge_expired", producer=producer)
            for n in range(backlog):
                celery.send_task("intake.persist_batch", args=[f"backlog-{n}"], producer=producer)
        worker = stack.worker(queues="batch_processing", concurrency=1)  # as the Procfile's `batch` runs it
        assert f"rollup fold every {rollup_timer.REFRESH_INTERVAL:g} s" in worker.output()
        wait_until(lambda: sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s AND NOT granted",
                               retention.PURGE_LOCK) == [(1,)], timeout=10, message="the pool busy with the purge")
        with app.app_context():
            events.store_events([ev(app_id, f"b{i}", minutes_ago=1, user=f"u{i % 2}") for i in range(5)])
        wait_until(lambda: sql("SELECT count(*) FROM rollup_deltas") == [(0,)], timeout=rollup_timer.REFRESH_INTERVAL + 5,
                   message="the worker's fold within a period")
        assert_rollups_match_events(app_id)
        assert "rollup fold: 5 event(s) rolled up" in worker.output()
        assert redis.llen("batch_processing") >= backlog - 4, "folded ahead of the backlog (the worker prefetches 4)"
    finally:
        holder.close()


def test_a_worker_that_does_not_consume_batch_processing_runs_no_fold(stack):
    worker = stack.worker(queues="default,emails", concurrency=1)
    assert "rollup fold every" not in worker.output()


def test_app_stats_answers_the_contract_shape(ctx, app_id, make_app):
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    stamp = lambda hours, minute=5: (now - timedelta(hours=hours) + timedelta(minutes=minute)).isoformat()
    rows = [("a", "page_view", "info", "u1", 2), ("b", "page_view", "error", "u2", 2), ("c", "page_view", "info", "u1", 2),
            ("d", "signup", "info", None, 2), ("e", "page_view", "info", "u3", 0), ("old", "page_view", "info", "u1", 30)]
    events.store_events([make_event(app_id, event_id=i, event_name=n, level=lv, timestamp=stamp(h),
                                    **({"user_id": u} if u else {})) for i, n, lv, u, h in rows])
    other_app = make_app()[0]
    events.store_events([make_event(other_app, event_id="x", event_name="page_view", timestamp=stamp(2))])
    rollups.refresh()

    stats = rollups.app_stats(app_id, until=now + timedelta(hours=1))
    assert stats["bucket"] == "hour"
    assert stats["total"] == 5 and stats["by_level"] == {"info": 4, "error": 1}
    two_ago = (now - timedelta(hours=2)).isoformat().replace("+00:00", "Z")
    assert stats["series"] == [
        {"start": two_ago, "event_name": "page_view", "count": 3, "by_level": {"info": 2, "error": 1}, "users": 2},
        {"start": two_ago, "event_name": "signup", "count": 1, "by_level": {"info": 1}, "users": 0},
        {"start": now.isoformat().replace("+00:00", "Z"), "event_name": "page_view", "count": 1,
         "by_level": {"info": 1}, "users": 1},
    ]
    assert stats["ingestion"] == {"accepted": 5, "stored": 5, "failed": 0, "lag_seconds": 0.0}
    assert set(stats) == {"bucket", "since", "until", "total", "by_level", "series", "ingestion"}

    day = rollups.app_stats(app_id, bucket="day", since=now - timedelta(days=40), until=now + timedelta(hours=1),
                            event_name="page_view")
    assert day["total"] == 5 and {row["event_name"] for row in day["series"]} == {"page_view"}
    assert sum(row["count"] for row in day["series"]) == 5
    minute = rollups.app_stats(app_id, bucket="minute", since=(now - timedelta(hours=3)).isoformat(),
                               until=(now - timedelta(hours=1)).isoformat().replace("+00:00", "Z"))
    assert [row["start"][11:16] for row in minute["series"]] == [f"{(now - timedelta(hours=2)).hour:02d}:05"] * 2


def test_ingestion_counts_pending_and_failed_events_and_the_lag(ctx, app_id):
    pending = ctx.extensions["intake.pending"]
    received = datetime.now(UTC) - timedelta(seconds=42)
    waiting = [make_event(app_id, event_id=f"p{i}", received_at=received) for i in range(3)]
    pending.put("default", "g-waiting", waiting)
    events.store_events([make_event(app_id, event_id="s1")])
    events.record_failures([(make_event(app_id, event_id="f1"), "ValueError: no")], attempts=3)
    stats = rollups.app_stats(app_id)  # the stored event is still a delta: counted as stored already
    assert stats["total"] == 0
    ingestion = stats["ingestion"]
    assert (ingestion["accepted"], ingestion["stored"], ingestion["failed"]) == (5, 1, 1)
    assert 41 <= ingestion["lag_seconds"] < 60


@pytest.mark.parametrize("arguments, message", [
    ({"bucket": "week"}, "bucket"),
    ({"bucket": "minute", "since": "2026-11-01T00:00:00Z", "until": "2026-11-03T00:00:00Z"}, "1500"),
    ({"since": "2026-11-03T00:00:00Z", "until": "2026-11-01T00:00:00Z"}, "before"),
    ({"since": "yesterday"}, "ISO 8601"),
])
def test_app_stats_refuses_bad_arguments_with_a_400(ctx, app_id, arguments, message):
    with pytest.raises(ApiError) as raised:
        rollups.app_stats(app_id, **arguments)
    assert raised.value.status == 400 and raised.value.code == "invalid_query"
    assert message in raised.value.message


def test_exactly_1500_buckets_are_allowed(ctx, app_id):
    since = datetime(2026, 11, 1, tzinfo=UTC)
    assert rollups.app_stats(app_id, bucket="minute", since=since, until=since + timedelta(minutes=1500))["total"] == 0


def test_stats_queries_touch_the_rollups_never_events(ctx, app_id):
    from app.extensions import db

    connection = db.session.connection()
    since, until = datetime.now(UTC) - timedelta(days=30), datetime.now(UTC)
    cursor = connection.connection.cursor()
    for name in (None, "page_view"):
        series = cursor.mogrify(rollups.SERIES, rollups.series_parameters(app_id, "h", since, until, name)).decode()
        assert relations(connection, series) == {"rollups"}
        for query in rollups.ingestion_queries(app_id, since, until, name):
            compiled = str(query.compile(connection, compile_kwargs={"literal_binds": True}))
            assert relations(connection, compiled) <= {"rollup_deltas", "failed_events"}
    db.session.rollback()


def relations(connection, statement):
    plan = connection.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}".replace("%", "%%")).scalar()
    return {value for key, value in _walk(plan) if key == "Relation Name"}


def _walk(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def test_cli_rollups_refresh_prints_the_events_rolled_up(ctx, app_id, runner):
    events.store_events([ev(app_id, f"cli-{i}", minutes_ago=i) for i in range(3)])
    result = runner.invoke(args=["rollups", "refresh"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"events_rolled_up": 3}
    assert json.loads(runner.invoke(args=["rollups", "refresh"]).output) == {"events_rolled_up": 0}


def test_event_names_with_quotes_backslashes_and_unicode_come_back_exactly(ctx, app_id):
    names = ['say "hi"', "back\\slash", "naïve ✓ 😀", "tab\tnew\nline", "</script>"]
    events.store_events([make_event(app_id, event_id=f"n{i}", event_name=name) for i, name in enumerate(names)])
    rollups.refresh()
    series = rollups.app_stats(app_id, bucket="day")["series"]
    assert sorted(row["event_name"] for row in series) == sorted(names)
