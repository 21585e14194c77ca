"""Failed events (dead letters): a forced persistence failure, the list and its pages, replay (app/lifecycle.py)."""
import base64
import json
from datetime import datetime, timedelta, timezone

import pytest

from app import events, lifecycle, rollups
from app.errors import ApiError
from tests.conftest import sql, wait_until
from tests.test_persistence import make_event
from tests.test_rollups import assert_rollups_match_events

UTC = timezone.utc


@pytest.fixture
def refuse():
    """Make PostgreSQL refuse events whose payload has a `refuse` field: a failure of the data, not of the database.

    `refuse(name)` (re)creates the check under that name, so the error changes with it; `refuse(None)` lifts it.
    """
    names = []

    def set_check(name):
        for old in names:
            sql(f"ALTER TABLE events DROP CONSTRAINT IF EXISTS {old}")
        if name:
            sql(f"ALTER TABLE events ADD CONSTRAINT {name} CHECK (NOT (payload ? 'refuse'))")
            names.append(name)

    yield set_check
    set_check(None)


def fail_through_persistence(app, app_id, *event_ids, group="g-refused", **fields):
    """Send events through persist_pending until they are dead letters, as a worker would."""
    pending = app.extensions["intake.pending"]
    pending.put("batch_processing", group,
                [make_event(app_id, event_id=e, refuse=True, n=i, **fields) for i, e in enumerate(event_ids)])
    outcomes = [events.persist_pending("batch_processing", group) for _ in range(app.config["PERSIST_MAX_RETRIES"] + 1)]
    assert outcomes[-1] == "failed", outcomes


def stored(app_id, event_id):
    return sql("SELECT count(*) FROM events WHERE app_id = %s AND event_id = %s", app_id, event_id)[0][0]


def everything(app_id, limit=1000):
    return lifecycle.failed_events_page(app_id, limit=limit)["failed_events"]


def add_failures(app_id, count, prefix="f", when=None):
    """Dead letters written directly, with last_failed_at set as given (default: now)."""
    failures = [(make_event(app_id, event_id=f"{prefix}-{i}", i=i), f"error {i}") for i in range(count)]
    events.record_failures(failures, 3)
    if when is not None:
        for i in range(count):
            sql("UPDATE failed_events SET last_failed_at = %s WHERE app_id = %s AND event_id = %s",
                when(i), app_id, f"{prefix}-{i}")


# --- a forced failure ends in failed events; the list ----------------------------------------


def test_a_forced_persistence_failure_ends_in_the_failed_events_list(ctx, app, app_id, refuse):
    refuse("refuse_marked")
    before = datetime.now(UTC)
    fail_through_persistence(app, app_id, "bad-1")
    page = lifecycle.failed_events_page(app_id)
    assert page["next_cursor"] is None
    [item] = page["failed_events"]
    assert set(item) == {"id", "event_id", "error", "attempts", "first_failed_at", "last_failed_at", "payload"}
    assert item["event_id"] == "bad-1"
    assert "refuse_marked" in item["error"] and item["error"].startswith("CheckViolation")
    assert item["attempts"] == app.config["PERSIST_MAX_RETRIES"] + 1
    assert item["payload"] == {"event_name": "test", "event_id": "bad-1", "refuse": True, "n": 0}, "the client's payload"
    first = datetime.fromisoformat(item["first_failed_at"].replace("Z", "+00:00"))
    assert item["first_failed_at"].endswith("Z") and before <= first <= datetime.now(UTC)
    assert item["last_failed_at"] == item["first_failed_at"]
    assert stored(app_id, "bad-1") == 0


def test_pages_are_newest_failure_first_and_the_cursor_round_trips(ctx, app_id, make_app):
    base = datetime(2026, 3, 1, tzinfo=UTC)
    # Ties on last_failed_at (pairs of rows share a time) and microsecond steps: both must page exactly.
    add_failures(app_id, 11, when=lambda i: base + timedelta(microseconds=i // 2))
    other = make_app()[0]
    add_failures(other, 3, prefix="other")

    seen, cursor, pages = [], None, 0
    while True:
        page = lifecycle.failed_events_page(app_id, limit=3, cursor=cursor)
        pages += 1
        assert len(page["failed_events"]) <= 3
        seen += page["failed_events"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert isinstance(cursor, str)
    assert pages == 4
    assert sorted(item["event_id"] for item in seen) == sorted(f"f-{i}" for i in range(11)), "each exactly once"
    keys = [(item["last_failed_at"], item["id"]) for item in seen]
    assert [k[0] for k in keys] == sorted((k[0] for k in keys), reverse=True), "newest failure first"
    assert seen[0]["last_failed_at"] == "2026-03-01T00:00:00.000005Z"
    assert lifecycle.failed_events_page(app_id, limit=11)["next_cursor"] is None
    assert sorted(item["event_id"] for item in everything(other)) == ["other-0", "other-1", "other-2"]


def test_the_page_query_is_one_range_of_the_index(ctx, app_id):
    add_failures(app_id, 5)
    cursor = lifecycle.failed_events_page(app_id, limit=2)["next_cursor"]
    moment, last_id = lifecycle._decode_cursor(cursor)
    # enable_seqscan off: a tiny table would be read whole; this shows the plan a large one gets.
    plan = "\n".join(row[0] for row in sql(
        "SET enable_seqscan = off; EXPLAIN SELECT id FROM failed_events WHERE app_id = %s AND last_failed_at <= %s"
        " AND (last_failed_at < %s OR id > %s) ORDER BY last_failed_at DESC, id LIMIT 3",
        app_id, moment, moment, last_id))
    assert "ix_failed_events_app_last_failed" in plan and "Sort" not in plan, plan


@pytest.mark.parametrize("cursor", [
    "", "not a cursor", "%%%", base64.urlsafe_b64encode(b"[1]").decode(),
    base64.urlsafe_b64encode(b'{"a": 1}').decode(), base64.urlsafe_b64encode(b'["x", "y"]').decode(),
    base64.urlsafe_b64encode(b'[true, "y"]').decode(), base64.urlsafe_b64encode(b"[99999999999999999999, \"y\"]").decode(),
    base64.urlsafe_b64encode(b'[1e300, "y"]').decode(), base64.urlsafe_b64encode(b"\xff\xfe").decode(), "é",
])
def test_a_bad_cursor_is_a_400(ctx, app_id, cursor):
    with pytest.raises(ApiError) as raised:
        lifecycle.failed_events_page(app_id, cursor=cursor)
    assert (raised.value.status, raised.value.code) == (400, "invalid_cursor")


@pytest.mark.parametrize("limit", [0, -1, 1001, "abc", "", True, 2.5, None, "10000", "²", "５", "-3"])
def test_a_bad_limit_is_a_400(ctx, app_id, limit):
    with pytest.raises(ApiError) as raised:
        lifecycle.failed_events_page(app_id, limit=limit)
    assert (raised.value.status, raised.value.code) == (400, "invalid_limit")


def test_limit_from_a_query_string_is_accepted(ctx, app_id):
    add_failures(app_id, 3)
    assert len(lifecycle.failed_events_page(app_id, limit="2")["failed_events"]) == 2
    assert len(lifecycle.failed_events_page(app_id, limit=1000)["failed_events"]) == 3


# --- replay --------------------------------------------------------------------------------


def queued_replays(redis):
    messages = [json.loads(m) for m in redis.lrange("batch_processing", 0, -1)]
    return [m["headers"] for m in messages if m["headers"]["task"] == lifecycle.REPLAY_TASK]


def test_replay_stores_it_once_and_it_leaves_the_list(ctx, app, app_id, refuse, redis):
    refuse("refuse_marked")
    fail_through_persistence(app, app_id, "bad-1", "bad-2")
    refuse(None)  # whatever made it fail is fixed

    answer = lifecycle.replay_failed_events(app_id)
    assert answer["status"] == "accepted" and answer["replaying"] == 2 and answer["task_id"]
    [headers] = queued_replays(redis)  # queued on batch_processing, for its workers
    assert headers["id"] == answer["task_id"]

    assert lifecycle.replay(app_id) == {"stored": 2, "failed": 0, "after_id": None}  # what the task runs
    assert stored(app_id, "bad-1") == 1 and stored(app_id, "bad-2") == 1
    assert everything(app_id) == []
    assert events.event_status(app_id, "bad-1")["status"] == "processed"
    [(payload,)] = sql("SELECT payload FROM events WHERE app_id = %s AND event_id = 'bad-1'", app_id)
    assert payload == {"event_name": "test", "event_id": "bad-1", "refuse": True, "n": 0}

    # A second replay changes nothing.
    assert lifecycle.replay_failed_events(app_id) == {"status": "accepted", "replaying": 0, "task_id": None}
    assert lifecycle.replay(app_id) == {"stored": 0, "failed": 0, "after_id": None}
    assert sql("SELECT count(*) FROM events WHERE app_id = %s", app_id) == [(2,)]


def test_a_replayed_failure_is_stored_once_and_counted_once_in_the_stats(ctx, app, app_id, refuse):
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    stamp, window = (hour + timedelta(minutes=10)).isoformat(), {"since": hour, "until": hour + timedelta(hours=1)}
    refuse("refuse_marked")
    events.store_events([make_event(app_id, event_id="ok", timestamp=stamp, user_id="u1")])
    fail_through_persistence(app, app_id, "bad-1", "bad-2", timestamp=stamp, user_id="u2")
    rollups.refresh()
    before = rollups.app_stats(app_id, **window)
    assert before["total"] == 1
    assert before["ingestion"] == {"accepted": 3, "stored": 1, "failed": 2, "lag_seconds": 0.0}

    refuse(None)
    assert lifecycle.replay(app_id) == {"stored": 2, "failed": 0, "after_id": None}
    # The same events again: a second replay, and a client that re-sends one.
    assert lifecycle.replay(app_id) == {"stored": 0, "failed": 0, "after_id": None}
    events.store_events([make_event(app_id, event_id="bad-1", refuse=True, n=0, timestamp=stamp, user_id="u2")])
    rollups.refresh()
    after = rollups.app_stats(app_id, **window)
    assert stored(app_id, "bad-1") == 1 and stored(app_id, "bad-2") == 1
    assert after["total"] == 3 and after["by_level"] == {"info": 3}
    [row] = after["series"]
    assert (row["count"], row["users"]) == (3, 2)
    assert after["ingestion"] == {"accepted": 3, "stored": 3, "failed": 0, "lag_seconds": 0.0}
    assert_rollups_match_events(app_id)


def test_replay_of_an_event_stored_meanwhile_does_not_store_it_twice(ctx, app_id):
    # The dead letter is still listed but the event was stored after all (a client retry with the same
    # event_id, or a replay killed between its insert and its delete).
    add_failures(app_id, 1)
    events.insert_events([make_event(app_id, event_id="f-0", i=0)])
    assert lifecycle.replay(app_id)["stored"] == 1
    assert stored(app_id, "f-0") == 1 and everything(app_id) == []


def test_one_that_fails_again_stays_with_its_new_error_and_one_more_attempt(ctx, app, app_id, refuse):
    refuse("refuse_first")
    fail_through_persistence(app, app_id, "bad-1")
    [before] = everything(app_id)
    refuse("refuse_second")  # still refused, for another reason

    assert lifecycle.replay(app_id) == {"stored": 0, "failed": 1, "after_id": None}
    [after] = everything(app_id)
    assert after["id"] == before["id"] and after["event_id"] == "bad-1"
    assert "refuse_second" in after["error"] and "refuse_first" not in after["error"]
    assert after["attempts"] == before["attempts"] + 1
    assert after["first_failed_at"] == before["first_failed_at"]
    assert after["last_failed_at"] > before["last_failed_at"]
    assert after["payload"] == before["payload"]
    assert stored(app_id, "bad-1") == 0


def test_replay_by_ids_counts_only_the_apps_own(ctx, app_id, make_app, redis):
    add_failures(app_id, 4)
    other = make_app()[0]
    add_failures(other, 1, prefix="other")
    ids = [item["id"] for item in everything(app_id) if item["event_id"] in ("f-1", "f-3")]
    foreign = everything(other)[0]["id"]

    answer = lifecycle.replay_failed_events(app_id, ids + [foreign, "no-such-id", ids[0]])
    assert answer["replaying"] == 2
    [headers] = queued_replays(redis)
    assert lifecycle.replay(app_id, sorted(set(ids + [foreign, "no-such-id"])))["stored"] == 2
    assert sorted(item["event_id"] for item in everything(app_id)) == ["f-0", "f-2"]
    assert len(everything(other)) == 1 and stored(other, "other-0") == 0
    assert lifecycle.replay_failed_events(app_id, []) == {"status": "accepted", "replaying": 0, "task_id": None}


@pytest.mark.parametrize("ids", ["f-1", {"id": "x"}, [1, 2], [None], ["a"] * 1001])
def test_bad_ids_are_a_400(ctx, app_id, ids):
    with pytest.raises(ApiError) as raised:
        lifecycle.replay_failed_events(app_id, ids)
    assert (raised.value.status, raised.value.code) == (400, "invalid_ids")


def test_a_replay_that_runs_out_of_time_says_where_to_go_on(ctx, app_id):
    add_failures(app_id, lifecycle.REPLAY_CHUNK + 20)
    first = lifecycle.replay(app_id, time_budget=0)
    assert first["stored"] == lifecycle.REPLAY_CHUNK and first["after_id"]
    rest = lifecycle.replay(app_id, after_id=first["after_id"], time_budget=0)
    assert rest == {"stored": 20, "failed": 0, "after_id": rest["after_id"]}
    assert lifecycle.replay(app_id, after_id=rest["after_id"])["stored"] == 0
    assert everything(app_id) == []
    assert sql("SELECT count(DISTINCT event_id) FROM events WHERE app_id = %s", app_id) == [
        (lifecycle.REPLAY_CHUNK + 20,)]


def test_a_deleted_app_is_not_replayed(ctx, app_id):
    add_failures(app_id, 2)
    sql("UPDATE apps SET deleted_at = now() WHERE id = %s", app_id)
    assert lifecycle.replay(app_id)["stored"] == 0
    assert sql("SELECT count(*) FROM events WHERE app_id = %s", app_id) == [(0,)]


def test_replay_runs_on_a_real_batch_processing_worker(ctx, app, app_id, refuse, stack):
    refuse("refuse_marked")
    fail_through_persistence(app, app_id, *[f"bad-{i}" for i in range(lifecycle.REPLAY_CHUNK + 5)])
    refuse(None)
    stack.worker(queues="batch_processing")
    answer = lifecycle.replay_failed_events(app_id)
    assert answer["replaying"] == lifecycle.REPLAY_CHUNK + 5
    wait_until(lambda: not everything(app_id), timeout=60, message="the failed events replayed")
    assert sql("SELECT count(*), count(DISTINCT event_id) FROM events WHERE app_id = %s", app_id) == [
        (lifecycle.REPLAY_CHUNK + 5, lifecycle.REPLAY_CHUNK + 5)]
