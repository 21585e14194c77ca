"""app/events.py in-process on real PostgreSQL and Redis: idempotent bulk writes, splitting, retries, dead letters."""
import base64
import json
import threading
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
def pending(app):
    return app.extensions["intake.pending"]


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
    assert stored_ids(app_id) == ["once"]


def test_a_missing_record_is_not_a_duplicate_but_loud(ctx, app_id, pending, redis, caplog):
    from app import metrics

    before = metrics.PENDING_MISSING.labels("default")._value.get()
    # The record and its tombstone are gone: as after a Redis restarted without persistence.
    pending.put("default", "g-lost", [make_event(app_id, event_id="lost")])
    redis.flushdb()
    started = time.monotonic()
    assert events.persist_pending("default", "g-lost") == "missing"
    # Only after waiting as long as the API waits for its writes, in case the record was on its way.
    assert time.monotonic() - started >= ctx.config["INGEST_PUBLISH_TIMEOUT"]
    assert metrics.PENDING_MISSING.labels("default")._value.get() == before + 1
    [line] = [r for r in caplog.records if "g-lost" in r.getMessage()]
    assert line.levelname == "ERROR" and "missing" in line.getMessage()
    assert "g-lost" in pending.warnings()[0]


def test_a_message_that_comes_before_its_record_waits_for_it(ctx, app_id, pending):
    # On RabbitMQ the API sends the record, then the message, and reads both answers: the
    # message may reach a worker first (app/publisher.py).
    late = threading.Timer(0.05, pending.put, ("default", "g-late", [make_event(app_id, event_id="late")]))
    late.start()
    assert events.persist_pending("default", "g-late") == "stored"
    late.join()
    assert stored_ids(app_id) == ["late"]


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


def queued_ids(redis, queue, last=-1):
    return [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in redis.lrange(queue, 0, last)]


def sweep(app):
    from app import redelivery

    return redelivery.sweep_app(app)


def test_the_sweep_publishes_only_lost_messages(ctx, app, app_id, pending, redis):
    for queue in ("default", "batch_processing"):
        pending.put(queue, f"{queue}-lost", [make_event(app_id)])
        pending.put(queue, f"{queue}-queued", [make_event(app_id)])
        # A worker took a message pushed after "-lost" a lease ago: "-lost" was popped and its worker died.
        redis.zadd(f"intake:pending:flight:{queue}", {f"{queue}-lost": time.time() - 60})
        redis.hset(f"intake:pending:progress:{queue}", mapping={"pushed": time.time() - 30, "at": time.time()})
        redis.lpush(queue, "a message still waiting")

    assert sweep(app) == 2
    assert queued_ids(redis, "default", last=0) == ["default-lost"]  # the newest message
    assert queued_ids(redis, "batch_processing", last=0) == ["batch_processing-lost"]
    assert sweep(app) == 0, "claimed once: its new message is in flight"
    assert redis.llen("default") == 2 and redis.llen("batch_processing") == 2


def test_a_rescheduled_retry_is_redelivered_when_due(ctx, app, app_id, pending, redis):
    pending.put("default", "g-retry", [poison(app_id)])
    assert events.persist_pending("default", "g-retry") == "retry"
    time.sleep(app.config["PERSIST_RETRY_BACKOFF"] * 1.2 + 0.05)
    assert sweep(app) == 1
    assert queued_ids(redis, "default") == ["g-retry"]


# --- a group that kills its process ---------------------------------------------------------


def test_a_group_that_kills_its_process_is_split_until_the_killer_fails_alone(ctx, app_id, pending, caplog):
    from app.pending import MAX_DELIVERIES

    group = [make_event(app_id, event_id=f"k-{i}") for i in range(4)]
    pending.put("default", "g-kill", group)
    for _ in range(MAX_DELIVERIES):
        pending.take("default", "g-kill")  # each delivery took the group and its process died mid-write
    assert events.persist_pending("default", "g-kill") == "split"
    assert stored_ids(app_id) == [], "a suspected killer is not written again"
    assert [e["event_id"] for e in pending.load("default", "g-kill.0")["events"]] == ["k-0", "k-1"]

    # "k-3" is the killer: the half without it is stored; the half with it dies once more, splits again.
    assert events.persist_pending("default", "g-kill.0") == "stored"
    pending.take("default", "g-kill.1")
    assert events.persist_pending("default", "g-kill.1") == "split"
    assert events.persist_pending("default", "g-kill.1.0") == "stored"
    pending.take("default", "g-kill.1.1")
    assert events.persist_pending("default", "g-kill.1.1") == "failed"
    assert stored_ids(app_id) == ["k-0", "k-1", "k-2"]
    [(event_id, error, _, _)] = failed_rows(app_id)
    assert event_id == "k-3" and "ended the worker process" in error
    assert pending.load("default", "g-kill.1.1") is None
    assert events.persist_pending("default", "g-kill") == "duplicate"


# --- transient or data error, by SQLSTATE --------------------------------------------------------


def pg_error(query, *setup):
    import psycopg2

    from tests.conftest import DATABASE_URL

    conn = psycopg2.connect(DATABASE_URL)
    try:
        cursor = conn.cursor()
        for statement in setup:
            cursor.execute(statement)
        cursor.execute(query)
    except psycopg2.Error as error:
        return error
    finally:
        conn.close()
    raise AssertionError(f"{query} did not fail")


def coded(pgcode):
    return type("FakeError", (Exception,), {"pgcode": pgcode})()


def test_errors_are_classified_by_sqlstate(ctx):
    kind = events.database_error_kind
    assert kind(pg_error("SELECT * FROM no_such_table")) == "schema"  # 42P01
    assert kind(pg_error("SELECT no_such_column FROM events")) == "schema"  # 42703
    assert kind(pg_error("SELECT 1 / 0")) == "data"  # 22012
    assert kind(pg_error("SELECT pg_sleep(1)", "SET statement_timeout = 10")) == "data"  # 57014: splits
    for code in ("08006", "08001", "57P01", "57P02", "57P03", "53100", "53200", "40001", "40P01"):
        assert kind(coded(code)) == "unavailable", code
    for code in ("23505", "22P02", "22021", "57014"):
        assert kind(coded(code)) == "data", code


def test_errors_are_classified_on_sqlite():
    import sqlite3

    connection = sqlite3.connect(":memory:")
    connection.execute("CREATE TABLE t (x INTEGER NOT NULL)")
    def error_of(statement):
        try:
            connection.execute(statement)
        except sqlite3.Error as error:
            return error
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = 5
    assert events.database_error_kind(locked) == "unavailable"
    assert events.database_error_kind(error_of("SELECT * FROM nowhere")) == "schema"
    assert events.database_error_kind(error_of("INSERT INTO t VALUES (NULL)")) == "data"


def test_a_statement_timeout_splits_like_bad_data(ctx, app_id, monkeypatch):
    error = pg_error("SELECT pg_sleep(1)", "SET statement_timeout = 10")
    real_insert = events.insert_events

    def insert(group):
        if any(e["event_id"] == "slow" for e in group):
            raise error
        real_insert(group)

    monkeypatch.setattr(events, "insert_events", insert)
    failures = events.store_events([make_event(app_id, event_id=i) for i in ("a", "slow", "b")])
    assert [(e["event_id"], message.split(":")[0]) for e, message in failures] == [("slow", "QueryCanceled [57014]")]
    assert stored_ids(app_id) == ["a", "b"]


def test_a_schema_mismatch_waits_loudly_and_never_dead_letters(ctx, app, app_id, pending, caplog):
    from app import metrics

    before = metrics.DATABASE_ERRORS.labels("schema")._value.get()
    pending.put("default", "g-deploy", [make_event(app_id, event_id="d-1")])
    sql("ALTER TABLE events RENAME COLUMN validation TO validation_v2")  # a deploy half done
    try:
        for _ in range(app.config["PERSIST_MAX_RETRIES"] + 2):
            assert events.persist_pending("default", "g-deploy") == "retry"
    finally:
        sql("ALTER TABLE events RENAME COLUMN validation_v2 TO validation")
    assert failed_rows(app_id) == []
    assert metrics.DATABASE_ERRORS.labels("schema")._value.get() == before + app.config["PERSIST_MAX_RETRIES"] + 2
    assert any(r.levelname == "ERROR" and "schema mismatch" in r.getMessage() for r in caplog.records)
    assert events.persist_pending("default", "g-deploy") == "stored"
    assert stored_ids(app_id) == ["d-1"]
