"""Storing events: bulk, idempotent writes; failed events; status look-ups."""
import logging
import random
import time
from datetime import datetime, timezone

import orjson
import sqlalchemy as sa
from flask import current_app
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError

from app import metrics
from app.extensions import db, with_reconnect
from app.models import Event, EventKey, FailedEvent, new_id, rollup_deltas, utcnow
from app.pending import MAX_DELIVERIES

log = logging.getLogger(__name__)


def _from_us(micros: int) -> datetime:
    return datetime.fromtimestamp(micros // 1_000_000, tz=timezone.utc).replace(microsecond=micros % 1_000_000)


def _insert(table):
    dialect = postgresql if db.engine.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def _row(event: dict, processed_at: datetime) -> dict:
    return {
        "app_id": event["app_id"],
        "event_id": event["event_id"],
        "event_name": event["event_name"],
        "level": event["level"],
        "user_id": event["user_id"],
        "timestamp": _from_us(event["timestamp"]),
        "received_at": _from_us(event["received_at"]),
        "processed_at": processed_at,
        "validation": event["validation"],
        "payload": event["payload"],
    }


def is_transient(error: Exception) -> bool:
    """A failure of the database itself (down, restarting, deadlock, schema mid-deploy), not of the data."""
    return database_error_kind(error) != "data"


# SQLSTATE classes and codes (PostgreSQL appendix A) that say the database, not the data, is
# at fault: the write waits for it. A schema mismatch (class 42: an undefined table or column
# while a deploy migrates) waits too, loudly. The rest, 57014 (statement timeout, cancel)
# included, splits like bad data and ends as failed events.
UNAVAILABLE_CLASSES = ("08", "53", "58", "40")  # connection, resources, system/I/O, serialization/deadlock
UNAVAILABLE_CODES = ("57P01", "57P02", "57P03", "57P04", "55P03", "3D000", "28000", "28P01")
SCHEMA_CLASSES = ("42", "3F")
# SQLite (the embedded default) has result codes, not SQLSTATE (low byte: the primary code).
SQLITE_UNAVAILABLE = frozenset({5, 6, 7, 10, 13, 14, 15})  # BUSY, LOCKED, NOMEM, IOERR, FULL, CANTOPEN, PROTOCOL
SQLITE_SCHEMA_TEXT = ("no such table", "no such column", "has no column")


def database_error_kind(error: Exception) -> str:
    """`unavailable` (wait), `schema` (wait, loudly) or `data` (split; in the end a failed event)."""
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return "unavailable"
    original = getattr(error, "orig", None) or error
    code = getattr(original, "pgcode", None)
    if code:
        if code.startswith(UNAVAILABLE_CLASSES) or code in UNAVAILABLE_CODES:
            return "unavailable"
        return "schema" if code.startswith(SCHEMA_CLASSES) else "data"
    sqlite_code = getattr(original, "sqlite_errorcode", None)
    if sqlite_code is not None:
        if sqlite_code & 0xFF in SQLITE_UNAVAILABLE:
            return "unavailable"
        return "schema" if any(text in str(original) for text in SQLITE_SCHEMA_TEXT) else "data"
    # No code at all: the driver never reached the server (refused, closed, timed out).
    dbapi = db.engine.dialect.loaded_dbapi
    return "unavailable" if isinstance(original, (dbapi.OperationalError, dbapi.InterfaceError)) else "data"


# PostgreSQL: the whole group travels as one JSON document and one statement unpacks it.
# One statement, one round trip: for the small groups of single events about twice as fast
# as COPY into a staging table, and as fast for large batches (README "Throughput"). Times
# arrive as integer microseconds and are converted in SQL, exactly. Its data-modifying
# CTEs, in one transaction:
#   keys   the group's (app, event_id) into the de-duplication table; only keys that were
#          new come back (a redelivery, or a concurrent worker's copy, returns nothing);
#   added  into the partitioned events, only those rows (a key repeated within the group
#          was reduced to its first copy before: _distinct);
#   then   one delta row per (app, minute, event name, level) of what `added` really
#          added, into the append-only rollup_deltas: the rollups count exactly the stored
#          rows, and no worker waits on a hot counter row (README "Rollups"). Its user ids
#          are not made distinct here (a sort per delta, a quarter of the statement's time
#          for 100-event groups): the fold does that once for many deltas.
INSERT_GROUP = """
WITH e AS (
    SELECT * FROM jsonb_to_recordset($1)
         AS e(app_id text, event_id text, event_name text, level text, user_id text,
              "timestamp" bigint, received_at bigint, validation jsonb, payload jsonb)
), keys AS (
    INSERT INTO event_keys (app_id, event_id, stored_at)
    SELECT app_id, event_id, now() FROM e
    ON CONFLICT DO NOTHING
    RETURNING app_id, event_id
), added AS (
    INSERT INTO events (app_id, event_id, event_name, level, user_id, "timestamp", received_at, processed_at,
                        validation, payload)
    SELECT e.app_id, e.event_id, e.event_name, e.level, e.user_id,
           'epoch'::timestamptz + e."timestamp" * interval '1 microsecond',
           'epoch'::timestamptz + e.received_at * interval '1 microsecond',
           now(), e.validation, e.payload
    FROM e JOIN keys USING (app_id, event_id)
    RETURNING app_id, event_name, level, user_id, "timestamp"
)
INSERT INTO rollup_deltas (app_id, minute, event_name, level, count, user_ids)
SELECT app_id, date_trunc('minute', "timestamp", 'UTC'), event_name, level, count(*),
       jsonb_agg(user_id) FILTER (WHERE user_id IS NOT NULL)
FROM added
GROUP BY 1, 2, 3, 4"""
PREPARE_INSERT_GROUP = f"PREPARE intake_insert_group(jsonb) AS {INSERT_GROUP}"
EXECUTE_INSERT_GROUP = "EXECUTE intake_insert_group(%s)"
INSERT_GROUP_PREPARED = "intake_insert_group"  # the mark in a DBAPI connection's `info`


def insert_events(events: list[dict]) -> None:
    """Write events, their keys and their rollup deltas in one transaction; a repeated (app, event_id) is skipped."""
    with_reconnect(lambda: _write_events(events))


def _write_events(events: list[dict]) -> None:
    # A Core connection, not the ORM session: nothing here needs the unit of work, and the
    # session's bookkeeping cost as much CPU as the statement itself for small groups.
    events = _distinct(events)
    with db.engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Prepared once per database connection: parsing and planning the three-insert
            # statement cost as much as running it for a 4-event group (backend CPU 0.71 ->
            # 0.44 ms a group; the statement before partitions and rollups took 0.47). A
            # PREPARE outlives a rollback, so a connection is marked once it succeeded. (Behind
            # a transaction-pooling pgbouncer, prepared statements need its
            # max_prepared_statements.)
            dbapi_connection = connection.connection
            if not dbapi_connection.info.get(INSERT_GROUP_PREPARED):
                connection.exec_driver_sql(PREPARE_INSERT_GROUP)
                dbapi_connection.info[INSERT_GROUP_PREPARED] = True
            connection.exec_driver_sql(EXECUTE_INSERT_GROUP, (orjson.dumps(events).decode(),))
        else:
            _write_events_sqlite(connection, events)


def _distinct(events: list[dict]) -> list[dict]:
    """The events with a key repeated within the list (a client retry) reduced to its first copy."""
    keys = {(event["app_id"], event["event_id"]) for event in events}
    if len(keys) == len(events):
        return events
    first = {}
    for event in events:
        first.setdefault((event["app_id"], event["event_id"]), event)
    return list(first.values())


def _write_events_sqlite(connection, events: list[dict]) -> None:
    """The same three writes as INSERT_GROUP, one statement each (SQLite has no data-modifying CTEs)."""
    processed_at = utcnow()
    keys = [{"app_id": e["app_id"], "event_id": e["event_id"], "stored_at": processed_at} for e in events]
    statement = sqlite.insert(EventKey.__table__).on_conflict_do_nothing()
    statement = statement.returning(EventKey.__table__.c.app_id, EventKey.__table__.c.event_id)
    new_keys = {tuple(row) for row in connection.execute(statement, keys)} if keys else set()
    rows = []
    for event in events:
        key = (event["app_id"], event["event_id"])
        if key in new_keys:
            new_keys.discard(key)  # the first copy of a key repeated within the group
            rows.append(_row(event, processed_at))
    if not rows:
        return
    connection.execute(sa.insert(Event.__table__), rows)
    connection.execute(sa.insert(rollup_deltas), rollup_deltas_of(rows))


def rollup_deltas_of(rows: list[dict]) -> list[dict]:
    """The rollup delta rows of stored event rows: counts and distinct users per (app, minute, name, level)."""
    deltas = {}
    for row in rows:
        minute = row["timestamp"].astimezone(timezone.utc).replace(second=0, microsecond=0)
        delta = deltas.setdefault((row["app_id"], minute, row["event_name"], row["level"]), [0, set()])
        delta[0] += 1
        if row["user_id"] is not None:
            delta[1].add(row["user_id"])
    return [
        {"app_id": app_id, "minute": minute, "event_name": name, "level": level, "count": count,
         "user_ids": sorted(users) or None}
        for (app_id, minute, name, level), (count, users) in deltas.items()
    ]


def store_events(events: list[dict]) -> list[tuple[dict, str]]:
    """Store what can be stored; return the events that fail on their own, with the error.

    A write that fails for a reason of the data is split in halves until the events
    that cannot be stored are alone, so one bad event never holds back the others.
    A failure of the database itself is raised: nothing can be stored until it is back.
    """
    try:
        insert_events(events)
        return []
    except Exception as error:
        if is_transient(error):
            raise
        if len(events) == 1:
            return [(events[0], _describe(error))]
    middle = len(events) // 2
    return store_events(events[:middle]) + store_events(events[middle:])


def _describe(error: Exception) -> str:
    original = getattr(error, "orig", None) or error
    code = getattr(original, "pgcode", None)
    text = str(original).strip().splitlines()
    return f"{type(original).__name__}{f' [{code}]' if code else ''}: {text[0][:500] if text else ''}"


def _storable(value):
    """The value with every NUL replaced by U+FFFD: PostgreSQL text and JSONB cannot hold one,
    and an event that failed for that very reason must still become a failed event."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_storable(key): _storable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_storable(item) for item in value]
    return value


def record_failures(failures: list[tuple[dict, str]], attempts: int) -> None:
    """Keep events that could not be stored as the app's failed events (dead letters)."""
    now = utcnow()
    rows = [
        {
            "id": new_id(),
            "app_id": event["app_id"],
            "event_id": _storable(event["event_id"]),
            "event": _storable(event),
            "error": _storable(error),
            "attempts": attempts,
            "first_failed_at": now,
            "last_failed_at": now,
        }
        for event, error in failures
    ]
    # The same event twice in one group (a client retry) is one dead letter, its attempts counted once.
    rows = list({(row["app_id"], row["event_id"]): row for row in rows}.values())
    statement = _insert(FailedEvent.__table__)
    # Failing again (after a replay) updates the dead letter instead of adding one.
    statement = statement.on_conflict_do_update(
        index_elements=["app_id", "event_id"],
        set_={
            "event": statement.excluded.event,
            "error": statement.excluded.error,
            "attempts": FailedEvent.__table__.c.attempts + statement.excluded.attempts,
            "last_failed_at": statement.excluded.last_failed_at,
        },
    )
    try:
        db.session.execute(statement, rows)
        db.session.commit()
    except Exception:
        db.session.rollback()
        raise


def event_status(app_id: str, event_id: str) -> dict | None:
    """Where an accepted event stands: processed, failed, or None while still queued."""
    return with_reconnect(lambda: _event_status(app_id, event_id))


def _event_status(app_id: str, event_id: str) -> dict | None:
    # The key's stored_at is the event's processed_at, found through the one unique index
    # (the partitioned events table has no index on event_id).
    stored = db.session.execute(
        sa.select(EventKey.stored_at).where(EventKey.app_id == app_id, EventKey.event_id == event_id)
    ).first()
    if stored is not None:
        return {"event_id": event_id, "status": "processed", "processed_at": _iso(stored.stored_at), "error": None}
    failed = db.session.execute(
        sa.select(FailedEvent.error, FailedEvent.last_failed_at).where(
            FailedEvent.app_id == app_id, FailedEvent.event_id == event_id
        )
    ).first()
    if failed is not None:
        return {"event_id": event_id, "status": "failed", "processed_at": None, "error": failed.error}
    return None


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:  # SQLite hands back naive UTC datetimes
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")


def retry_delay(attempts: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter: base, 2·base, 4·base … capped, each ±20%."""
    return min(cap, base * 2 ** (attempts - 1)) * random.uniform(0.8, 1.2)


def _take_once_written(pending, queue: str, group_id: str, wait: float):
    """Take a group; a record not there yet is waited for, at most as long as the API waits for its writes.

    On RabbitMQ the API sends the record to Redis, then the message, and reads both answers
    (app/publisher.py): the message can come first. Past `wait` the API has answered 503.
    """
    deadline, pause = time.monotonic() + wait, 0.005
    taken = pending.take(queue, group_id)
    while taken.status == "missing" and time.monotonic() < deadline:
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause *= 2
        taken = pending.take(queue, group_id)
    return taken


def persist_pending(queue: str, group_id: str) -> str:
    """Store a pending group; on failure reschedule it, or after the last try keep it as failed."""
    config = current_app.config
    pending = current_app.extensions["intake.pending"]
    taken = _take_once_written(pending, queue, group_id, config["INGEST_PUBLISH_TIMEOUT"])
    if taken.status == "stored":
        return "duplicate"  # an earlier delivery of this message stored it
    if taken.status == "missing":
        # Neither the record nor its tombstone: the pending store lost data (a Redis restarted
        # without persistence, a worker on another Redis), or a duplicate came after the tombstone expired.
        log.error("pending record of group %s (%s) is missing and there is no sign it was stored: "
                  "the pending store may have lost accepted events", group_id, queue)
        metrics.PENDING_MISSING.labels(queue).inc()
        pending.note_missing(queue, group_id)
        return "missing"
    events, attempts = taken.record["events"], taken.record["attempts"] + 1
    if taken.deliveries > MAX_DELIVERIES:
        return _set_aside_killer(pending, queue, group_id, events, attempts, taken.deliveries)
    delay = retry_delay(attempts, config["PERSIST_RETRY_BACKOFF"], config["PERSIST_RETRY_BACKOFF_MAX"])
    try:
        with pending.hold(queue, group_id):
            failures = store_events(events)
    except Exception as error:
        # The database itself is away: that is no fault of the events, so they wait
        # for it (backoff capped at 10 minutes) instead of becoming failed events.
        kind = database_error_kind(error)
        metrics.DATABASE_ERRORS.labels(kind).inc()
        if kind == "schema":
            log.error("schema mismatch while storing group %s (a deploy half done?); the events wait: %s",
                      group_id, _describe(error))
        else:
            log.warning("database unavailable while storing group %s: %s", group_id, _describe(error))
        pending.reschedule(queue, group_id, events, attempts, delay)
        return "retry"
    if not failures:
        pending.done(queue, group_id)
        return "stored"
    if attempts <= config["PERSIST_MAX_RETRIES"]:
        pending.reschedule(queue, group_id, [event for event, _ in failures], attempts, delay)
        return "retry"
    try:
        record_failures(failures, attempts)
    except Exception:
        # Not even the dead letter can be written: keep the record and come back later.
        pending.reschedule(queue, group_id, [event for event, _ in failures], attempts, delay)
        return "retry"
    pending.done(queue, group_id)
    return "failed"


def _set_aside_killer(pending, queue: str, group_id: str, events: list, attempts: int, deliveries: int) -> str:
    """A group taken again and again with no write finishing kills its process: split it; alone, fail it."""
    killed = deliveries - 1
    if len(events) > 1:
        middle = len(events) // 2
        # Each half is split again at its next death, not after MAX_DELIVERIES more.
        parts = pending.split(queue, group_id, [events[:middle], events[middle:]], attempts - 1, MAX_DELIVERIES - 1)
        log.warning("group %s (%d events) ended its worker process %d times: split into %s", group_id, len(events),
                    killed, ", ".join(parts))
        return "split"
    error = (f"WorkerLost: the write of this event ended the worker process {killed} times "
             "(out of memory or the hard time limit); not tried again")
    log.error("group %s: event %s %s", group_id, events[0].get("event_id"), error)
    record_failures([(events[0], error)], attempts)
    pending.done(queue, group_id)
    return "failed"
