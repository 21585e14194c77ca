"""app/events.py in-process on real PostgreSQL and Redis: idempotent bulk writes, splitting, retries, dead letters."""
import base64
import json
import time
from datetime import datetime, timedelta, timezone

import pytest
from jsonschema import Draft202012Validator

from app import events
from app.ingest import checks
from app.rules import AppEntry, CompiledRule
from tests.conftest import sql

UTC = timezone.utc
BODIES = "intake:pending:bodies"


@pytest.fixture
def ctx(app):
    with app.app_context():
        yield app


@pytest.fixture
def pending(app):
    return app.extensions["intake.pending"]


@pytest.fixture
def app_id(make_app):
    return make_app()[0]


def make_event(app_id, received_at=None, rules=(), **payload):
    """An event exactly as the API hands it to the workers."""
    entry = AppEntry(app_id, "unused", tuple(rules))
    if "eventName" not in payload:
        payload.setdefault("event_name", "test")
    return checks.check_event(entry, payload, max_depth=10, received_at=received_at or datetime.now(UTC))


def poison(app_id, event_id="poison"):
    """An event PostgreSQL refuses: JSONB cannot hold \\u0000 (the API never lets one through)."""
    event = make_event(app_id, event_id=event_id)
    event["payload"]["bad"] = "nul\x00here"
    return event


def stored_ids(app_id):
    return sorted(r[0] for r in sql("SELECT event_id FROM events WHERE app_id = %s", app_id))


def failed_rows(app_id):
    return sql("SELECT event_id, error, attempts, event FROM failed_events WHERE app_id = %s ORDER BY event_id",
               app_id)


def due(redis, queue, group_id):
    return redis.zscore(f"intake:pending:due:{queue}", group_id)


# --- idempotent writes --------------------------------------------------------------------


def test_same_event_id_twice_is_stored_once(ctx, app_id):
    events.insert_events([make_event(app_id, event_id="e-1", n=1)])
    events.insert_events([make_event(app_id, event_id="e-1", n=2)])
    assert sql("SELECT payload->>'n' FROM events WHERE app_id = %s", app_id) == [("1",)], "the first copy stays"


def test_same_event_id_twice_in_one_list_is_stored_once(ctx, app_id):
    batch = [make_event(app_id, event_id=event_id) for event_id in ("dup", "other", "dup")]
    assert events.store_events(batch) == []
    assert stored_ids(app_id) == ["dup", "other"]


def test_a_pooled_connection_the_database_closed_is_replaced_without_losing_the_write(ctx, app_id):
    # Connections are not pinged before use (a round trip per task): the first use finds out.
    from app.extensions import db
    events.insert_events([make_event(app_id, event_id="before")])
    backend = db.session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
    db.session.commit()  # the connection goes back to the pool
    sql("SELECT pg_terminate_backend(%s)", backend)
    events.insert_events([make_event(app_id, event_id="after")])
    assert stored_ids(app_id) == ["after", "before"]
    assert events.event_status(app_id, "after")["status"] == "processed"


def test_same_event_id_in_two_apps_is_two_events(ctx, make_app):
    first, second = make_app()[0], make_app()[0]
    events.store_events([make_event(first, event_id="shared"), make_event(second, event_id="shared")])
    assert sql("SELECT count(*) FROM events WHERE event_id = 'shared'") == [(2,)]


def test_stored_row_keeps_the_payload_and_adds_normalised_fields(ctx, app_id, pending):
    received = datetime(2025, 6, 1, 10, 0, 0, 123456, tzinfo=UTC)
    payload = {"eventName": "  Checkout ", "event_id": "row-1", "level": "FATAL", "userId": 1234,
               "timestamp": "2025-06-01T11:30:00.5+02:00",
               "cart": {"items": [{"sku": "a", "qty": 2, "price": 9.99}], "coupon": None, "gift": False},
               "unicode": "é ✓ 😀", "big": 9007199254740993, "empty": {}, "list": []}
    original = json.loads(json.dumps(payload))
    warn = CompiledRule("wants session", None, "warn", Draft202012Validator({"required": ["session"]}))
    event = make_event(app_id, received_at=received, rules=[warn], **payload)
    pending.put("default", "g-row", [event])

    assert events.persist_pending("default", "g-row") == "stored"
    [row] = sql("SELECT event_name, level, user_id, timestamp, received_at, processed_at, validation, payload"
                " FROM events WHERE app_id = %s AND event_id = 'row-1'", app_id)
    name, level, user_id, timestamp, received_at, processed_at, validation, stored_payload = row
    assert stored_payload == original
    assert (name, level, user_id) == ("Checkout", "critical", "1234")
    assert timestamp == datetime(2025, 6, 1, 9, 30, 0, 500000, tzinfo=UTC)
    assert received_at == received
    assert received_at <= processed_at <= datetime.now(UTC) + timedelta(seconds=5)
    assert validation["status"] == "warning"
    assert [w["rule"] for w in validation["warnings"]] == ["wants session"]


def test_default_timestamp_is_the_time_received(ctx, app_id):
    received = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    events.store_events([make_event(app_id, received_at=received, event_id="ts")])
    assert sql("SELECT timestamp = received_at, timestamp FROM events WHERE event_id = 'ts'") == [(True, received)]


def test_old_timestamps_before_1970_are_stored_exactly(ctx, app_id):
    events.store_events([make_event(app_id, event_id="old", timestamp="1969-07-20T20:17:40.250001Z")])
    [(timestamp,)] = sql("SELECT timestamp FROM events WHERE event_id = 'old'")
    assert timestamp == datetime(1969, 7, 20, 20, 17, 40, 250001, tzinfo=UTC)


# --- one bad event never holds back the others --------------------------------------------


def test_a_poison_event_among_ten_fails_alone(ctx, app_id):
    batch = [make_event(app_id, event_id=f"ok-{i}") for i in range(9)]
    batch.insert(6, poison(app_id))
    failures = events.store_events(batch)
    assert [event["event_id"] for event, _ in failures] == ["poison"]
    assert "unsupported Unicode escape sequence" in failures[0][1]
    assert stored_ids(app_id) == [f"ok-{i}" for i in range(9)]


def test_two_poison_events_are_both_isolated(ctx, app_id):
    good = [make_event(app_id, event_id=f"ok-{i}") for i in range(7)]
    batch = [poison(app_id, "p-a"), *good, poison(app_id, "p-b")]
    assert sorted(e["event_id"] for e, _ in events.store_events(batch)) == ["p-a", "p-b"]
    assert len(stored_ids(app_id)) == 7


def test_persist_pending_retries_then_dead_letters_the_poison_event(ctx, app, app_id, pending, redis):
    max_retries = app.config["PERSIST_MAX_RETRIES"]
    batch = [make_event(app_id, event_id=f"ok-{i}") for i in range(9)] + [poison(app_id)]
    pending.put("batch_processing", "g-poison", batch)
    first_due = due(redis, "batch_processing", "g-poison")

    previous_due = first_due
    for attempt in range(1, max_retries + 1):
        started = time.time()
        assert events.persist_pending("batch_processing", "g-poison") == "retry"
        record = pending.load("batch_processing", "g-poison")
        assert record["attempts"] == attempt
        assert [e["event_id"] for e in record["events"]] == ["poison"], "only the failing event is kept"
        new_due = due(redis, "batch_processing", "g-poison")
        assert new_due != previous_due
        backoff = app.config["PERSIST_RETRY_BACKOFF"] * 2 ** (attempt - 1)
        assert started + 0.8 * backoff - 0.05 <= new_due <= time.time() + 1.2 * backoff + 0.05
        previous_due = new_due
        assert failed_rows(app_id) == []
    assert stored_ids(app_id) == [f"ok-{i}" for i in range(9)]

    assert events.persist_pending("batch_processing", "g-poison") == "failed"
    [(event_id, error, attempts, event)] = failed_rows(app_id)
    assert event_id == "poison"
    assert attempts == max_retries + 1
    assert "unsupported Unicode escape sequence" in error
    assert event["payload"]["event_name"] == "test" and event["app_id"] == app_id
    assert event["payload"]["bad"] == "nul\ufffdhere", "the NUL JSONB refuses is replaced, the rest kept"
    assert pending.load("batch_processing", "g-poison") is None
    assert due(redis, "batch_processing", "g-poison") is None
    assert redis.hlen(BODIES) == 0
    assert stored_ids(app_id) == [f"ok-{i}" for i in range(9)], "nothing was stored twice"
    assert events.event_status(app_id, "poison")["status"] == "failed"
    assert events.event_status(app_id, "ok-0")["status"] == "processed"


def test_a_poison_event_sent_twice_in_one_group_becomes_one_failed_event(ctx, app, app_id, pending):
    pending.put("default", "g-twice", [poison(app_id), make_event(app_id, event_id="fine"), poison(app_id)])
    outcomes = [events.persist_pending("default", "g-twice") for _ in range(app.config["PERSIST_MAX_RETRIES"] + 1)]
    assert outcomes[-1] == "failed"
    assert [row[:1] + row[2:3] for row in failed_rows(app_id)] == [("poison", app.config["PERSIST_MAX_RETRIES"] + 1)]
    assert stored_ids(app_id) == ["fine"]
    assert pending.load("default", "g-twice") is None


def test_failing_again_after_a_replay_updates_the_dead_letter(ctx, app_id):
    event = poison(app_id)
    events.record_failures([(event, "first error")], 3)
    events.record_failures([(event, "second error")], 3)
    [(event_id, error, attempts, _)] = failed_rows(app_id)
    assert (event_id, error, attempts) == ("poison", "second error", 6)


def test_a_good_group_is_stored_and_its_record_removed(ctx, app_id, pending, redis):
    pending.put("default", "g-ok", [make_event(app_id, event_id=f"g-{i}") for i in range(3)])
    assert events.persist_pending("default", "g-ok") == "stored"
    assert stored_ids(app_id) == ["g-0", "g-1", "g-2"]
    assert redis.hlen(BODIES) == 0 and due(redis, "default", "g-ok") is None


def test_duplicate_delivery_is_reported_and_stores_nothing_more(ctx, app_id, pending):
    pending.put("default", "g-dup", [make_event(app_id, event_id="once")])
    assert events.persist_pending("default", "g-dup") == "stored"
    assert events.persist_pending("default", "g-dup") == "duplicate"
    assert events.persist_pending("default", "never-existed") == "duplicate"
    assert stored_ids(app_id) == ["once"]


def test_redelivering_a_group_whose_events_are_stored_adds_no_rows(ctx, app_id, pending):
    batch = [make_event(app_id, event_id=f"r-{i}") for i in range(4)]
    events.store_events(batch[:2])  # an earlier delivery stored part of it, then died before removing the record
    pending.put("default", "g-again", batch)
    assert events.persist_pending("default", "g-again") == "stored"
    assert stored_ids(app_id) == ["r-0", "r-1", "r-2", "r-3"]


@pytest.mark.no_clean  # touches neither the database nor Redis
def test_retry_delay_is_exponential_capped_and_jittered():
    for attempts, expected in [(1, 2), (2, 4), (3, 8), (10, 600), (30, 600)]:
        delays = [events.retry_delay(attempts, 2, 600) for _ in range(50)]
        assert all(0.8 * expected <= d <= 1.2 * expected for d in delays)
    assert len({events.retry_delay(1, 2, 600) for _ in range(10)}) > 1


# --- redelivery of overdue records --------------------------------------------------------


def queued_ids(redis, queue):
    return [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in redis.lrange(queue, 0, -1)]


def test_redeliver_overdue_publishes_only_overdue_records(ctx, app, app_id, pending, redis):
    publisher = app.extensions["intake.publisher"]
    for queue in ("default", "batch_processing"):
        pending.put(queue, f"{queue}-overdue", [make_event(app_id)])
        pending.put(queue, f"{queue}-not-due", [make_event(app_id)])
        redis.zadd(f"intake:pending:due:{queue}", {f"{queue}-overdue": time.time() - 1})

    assert publisher.redeliver_overdue() == 2
    assert queued_ids(redis, "default") == ["default-overdue"]
    assert queued_ids(redis, "batch_processing") == ["batch_processing-overdue"]
    # Claimed: pushed forward by INGEST_REDELIVER_AFTER, so the next sweep does not publish it again.
    assert due(redis, "default", "default-overdue") > time.time() + app.config["INGEST_REDELIVER_AFTER"] - 2
    assert publisher.redeliver_overdue() == 0
    assert redis.llen("default") == 1 and redis.llen("batch_processing") == 1


def test_a_rescheduled_retry_is_redelivered_when_due(ctx, app, app_id, pending, redis):
    pending.put("default", "g-retry", [poison(app_id)])
    assert events.persist_pending("default", "g-retry") == "retry"
    publisher = app.extensions["intake.publisher"]
    time.sleep(app.config["PERSIST_RETRY_BACKOFF"] * 1.2 + 0.05)
    assert publisher.redeliver_overdue() == 1
    assert queued_ids(redis, "default") == ["g-retry"]
