"""An app's data over its life: failed events (list, replay) and app deletion, in bounded chunks."""
import base64
import binascii
import logging
import time
from datetime import datetime, timedelta, timezone

import orjson
import sqlalchemy as sa
from flask import current_app

from app import publisher
from app.errors import ApiError
from app.events import record_failures, store_events
from app.extensions import db, with_reconnect
from app.models import App, FailedEvent, utcnow

log = logging.getLogger(__name__)

# Task names (routed to batch_processing in celery_config.py; defined in app/tasks.py).
REPLAY_TASK = "intake.replay_failed_events"
DELETE_TASK = "intake.delete_app_data"

MAX_PAGE = 1000
MAX_REPLAY_IDS = 1000
# Failed events replayed per statement: each holds a whole accepted event (up to
# INGEST_MAX_EVENT_BYTES), so a chunk is kept small.
REPLAY_CHUNK = 100
# One task works this long at most, then hands the rest to a fresh message: far below
# task_soft_time_limit (200 s), and a killed run loses at most this much progress.
TASK_BUDGET_SECONDS = 60.0

# Every table holding an app's rows, with the column naming the app: app deletion empties
# them in this order, then removes the app row itself. A table added to the schema that
# holds per-app rows must be added here (tests/test_app_deletion.py checks every table
# with an app_id column).
APP_DATA_TABLES = (
    ("events", "app_id"),
    ("event_keys", "app_id"),
    ("rollup_deltas", "app_id"),
    ("rollups", "app_id"),
    ("rollup_users", "app_id"),
    ("failed_events", "app_id"),
    ("rules", "app_id"),
)
# Session-level advisory lock (PostgreSQL) held while one process deletes one app's data, so
# that two runs at once (a beat resume beside the first task) do not both work on it.
DELETE_LOCK_CLASS = 0x1A7E


# --- failed events: the list ---------------------------------------------------------------


def failed_events_page(app_id: str, *, limit=100, cursor: str | None = None) -> dict:
    """One page of the app's failed events, newest failure first, with the cursor of the next."""
    limit = _page_limit(limit)
    position = _decode_cursor(cursor) if cursor is not None else None
    return with_reconnect(lambda: _failed_events_page(app_id, limit, position))


def _failed_events_page(app_id, limit, position) -> dict:
    table = FailedEvent.__table__.c
    query = (
        sa.select(table.id, table.event_id, table.error, table.attempts, table.first_failed_at, table.last_failed_at,
                  table.event["payload"].label("payload"))
        .where(table.app_id == app_id)
        # The order of ix_failed_events_app_last_failed (app_id, last_failed_at DESC, id): one index range scan.
        .order_by(table.last_failed_at.desc(), table.id)
        .limit(limit + 1)
    )
    if position is not None:
        moment, last_id = position
        # The plain `<=` bounds the index range; the OR picks up after the cursor's row.
        query = query.where(table.last_failed_at <= moment,
                            sa.or_(table.last_failed_at < moment, table.id > last_id))
    rows = db.session.execute(query).all()
    db.session.commit()
    page, more = rows[:limit], len(rows) > limit
    return {
        "failed_events": [
            {"id": r.id, "event_id": r.event_id, "error": r.error, "attempts": r.attempts,
             "first_failed_at": _iso(r.first_failed_at), "last_failed_at": _iso(r.last_failed_at),
             "payload": r.payload}
            for r in page
        ],
        "next_cursor": _encode_cursor(page[-1].last_failed_at, page[-1].id) if more else None,
    }


def _page_limit(limit) -> int:
    if isinstance(limit, str) and limit.strip().isascii() and limit.strip().isdigit():
        limit = int(limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise ApiError(400, "invalid_limit", f"limit must be an integer from 1 to {MAX_PAGE}.")
    return limit


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment  # SQLite: naive UTC


def _iso(moment: datetime) -> str:
    return _utc(moment).isoformat(timespec="microseconds").replace("+00:00", "Z")  # fixed width


EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _encode_cursor(moment: datetime, row_id: str) -> str:
    # Integer microseconds: the position survives the round trip exactly.
    micros = (_utc(moment) - EPOCH) // timedelta(microseconds=1)
    return base64.urlsafe_b64encode(orjson.dumps([micros, row_id])).decode().rstrip("=")


def _decode_cursor(cursor) -> tuple[datetime, str]:
    try:
        micros, row_id = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if isinstance(micros, bool) or not isinstance(micros, int) or not isinstance(row_id, str):
            raise ValueError(cursor)
        return EPOCH + timedelta(microseconds=micros), row_id
    except (TypeError, ValueError, OverflowError, binascii.Error):
        raise ApiError(400, "invalid_cursor",
                       "cursor is not one this API handed out; pass next_cursor from the previous page.") from None


# --- failed events: replay -----------------------------------------------------------------


def replay_failed_events(app_id: str, ids=None) -> dict:
    """Queue a replay of the app's failed events (all, or those with these ids) on batch_processing."""
    ids = _replay_ids(ids)
    count = with_reconnect(lambda: _count_failed(app_id, ids))
    if count == 0:
        return {"status": "accepted", "replaying": 0, "task_id": None}
    try:
        task = publisher.send_task(REPLAY_TASK, [app_id, ids])
    except Exception as error:
        log.warning("could not queue a replay for app %s: %s", app_id, type(error).__name__)
        raise ApiError(503, "queue_unavailable", "The task queue is unavailable; nothing was replayed. Retry shortly.",
                       headers={"Retry-After": "2"}) from None
    return {"status": "accepted", "replaying": count, "task_id": task.id}


def _replay_ids(ids) -> list[str] | None:
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or len(ids) > MAX_REPLAY_IDS:
        raise ApiError(400, "invalid_ids", f'ids must be a list of at most {MAX_REPLAY_IDS} failed-event ids'
                                           ' (strings), or absent to replay them all.')
    return sorted(set(ids))


def _failed_filter(app_id, ids):
    table = FailedEvent.__table__.c
    condition = table.app_id == app_id
    return condition if ids is None else sa.and_(condition, table.id.in_(ids))


def _count_failed(app_id, ids) -> int:
    count = db.session.scalar(sa.select(sa.func.count()).select_from(FailedEvent).where(_failed_filter(app_id, ids)))
    db.session.commit()
    return count


def replay(app_id: str, ids: list[str] | None = None, after_id: str = "", time_budget=TASK_BUDGET_SECONDS) -> dict:
    """Send failed events through the normal persistence path; the stored ones leave the list.

    Chunk by chunk in id order: each event is written with store_events (idempotent on
    (app, event_id), so a replay killed half-way or run twice stores nothing twice); in one
    transaction the stored ones are deleted from failed_events and those that fail again are
    recorded with their new error and one more attempt. When the time budget runs out the
    answer says where to go on (`after_id`).
    """
    result = {"stored": 0, "failed": 0, "after_id": None}
    if not with_reconnect(lambda: _app_is_live(app_id)):
        return result  # deleted meanwhile: storing its events again would undo the deletion
    deadline = time.monotonic() + time_budget
    table = FailedEvent.__table__
    while True:
        rows = db.session.execute(
            sa.select(table.c.id, table.c.event)
            .where(_failed_filter(app_id, ids), table.c.id > after_id)
            .order_by(table.c.id)
            .limit(REPLAY_CHUNK)
        ).all()
        db.session.commit()  # no transaction stays open while the events are written
        if not rows:
            return result
        failures = store_events([row.event for row in rows])
        failed_keys = {event["event_id"] for event, _ in failures}
        stored = [row.id for row in rows if row.event["event_id"] not in failed_keys]
        if stored:
            db.session.execute(sa.delete(table).where(table.c.id.in_(stored)))
        if failures:
            record_failures(failures, 1)  # commits the delete above with it
        else:
            db.session.commit()
        result["stored"] += len(stored)
        result["failed"] += len(rows) - len(stored)
        after_id = rows[-1].id
        if time.monotonic() > deadline:
            result["after_id"] = after_id
            return result


def continue_replay(app_id: str, ids: list[str] | None, after_id: str) -> None:
    """Hand the rest of a replay that ran out of time to a fresh message."""
    publisher.send_task(REPLAY_TASK, [app_id, ids], kwargs={"after_id": after_id})


def _app_is_live(app_id) -> bool:
    live = db.session.scalar(sa.select(App.id).where(App.id == app_id, App.deleted_at.is_(None))) is not None
    db.session.commit()
    return live


# --- app deletion --------------------------------------------------------------------------


def schedule_app_deletion(app_id: str) -> dict:
    """Mark the app deleted (its key stops working) and queue the removal of its data."""
    marked = db.session.execute(
        sa.update(App).where(App.id == app_id).values(deleted_at=sa.func.coalesce(App.deleted_at, utcnow()))
    ).rowcount
    db.session.commit()
    if not marked:
        raise ApiError(404, "app_not_found", "There is no app with this id.")
    try:
        task_id = publisher.send_task(DELETE_TASK, [app_id]).id
    except Exception as error:
        # The mark is the durable record: the periodic resume_app_deletions starts the work.
        log.warning("could not queue the deletion of app %s (%s); the periodic resume will", app_id,
                    type(error).__name__)
        task_id = None
    return {"status": "accepted", "app_id": app_id, "task_id": task_id}


def delete_app_data(app_id: str, *, time_budget=TASK_BUDGET_SECONDS) -> dict:
    """Remove a deleted app's rows table by table in bounded chunks, then the app row.

    Only an app marked deleted (or already gone) is touched. The app row, the mark, goes last
    and only DELETE_SETTLE_SECONDS after the mark: until then each resume sweeps the tables
    again, removing events that were accepted before the deletion but stored after it (a
    backed-up queue, a retry). `done` is False while anything is left, the app row included;
    `more` is True when the time budget ran out with rows left.
    """
    result = {"app_id": app_id, "deleted": {}, "done": False, "more": False}
    if db.engine.dialect.name != "postgresql":
        return _delete_app_data(app_id, time_budget, result)
    with db.engine.connect() as lock:
        if not lock.exec_driver_sql("SELECT pg_try_advisory_lock(%s, hashtext(%s))",
                                    (DELETE_LOCK_CLASS, app_id)).scalar():
            result["busy"] = True  # another process is deleting it now
            return result
        lock.commit()  # the lock outlives the transaction: nothing stays idle in one
        try:
            return _delete_app_data(app_id, time_budget, result)
        finally:
            lock.exec_driver_sql("SELECT pg_advisory_unlock(%s, hashtext(%s))", (DELETE_LOCK_CLASS, app_id))
            lock.commit()


def _delete_app_data(app_id, time_budget, result) -> dict:
    config = current_app.config
    with db.engine.connect() as connection:
        deleted_at = connection.execute(sa.select(App.deleted_at).where(App.id == app_id)).first()
        connection.rollback()
    if deleted_at is not None and deleted_at[0] is None:
        log.warning("app %s is not marked deleted: its data is kept", app_id)
        return result
    deadline = time.monotonic() + time_budget
    for table, column in APP_DATA_TABLES:
        while True:
            with db.engine.begin() as connection:
                count = connection.execute(_delete_chunk(connection, table, column),
                                           {"app_id": app_id, "chunk": config["DELETE_CHUNK_ROWS"]}).rowcount
            if count:
                result["deleted"][table] = result["deleted"].get(table, 0) + count
            if not count:
                break
            if time.monotonic() > deadline:
                result["more"] = True
                return result
    settled_before = utcnow() - timedelta(seconds=config["DELETE_SETTLE_SECONDS"])
    with db.engine.begin() as connection:
        connection.execute(sa.delete(App).where(App.id == app_id, App.deleted_at <= settled_before))
        result["done"] = connection.execute(sa.select(App.id).where(App.id == app_id)).first() is None
    return result


def _delete_chunk(connection, table: str, column: str) -> sa.TextClause:
    """At most `chunk` rows of one app from one table, in one short transaction."""
    quote = connection.dialect.identifier_preparer.quote
    table, column = quote(table), quote(column)
    if connection.dialect.name == "postgresql":
        # Rows picked by physical address through the app's index, removed by a TID scan: no
        # key column is needed, so any table fits. On a partitioned table a picked address may
        # also match a row of the same app in another partition: it goes too, which is wanted.
        return sa.text(f"DELETE FROM {table} WHERE {column} = :app_id AND ctid = ANY(ARRAY("
                       f"SELECT ctid FROM {table} WHERE {column} = :app_id LIMIT :chunk))")
    return sa.text(f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE {column} = :app_id"
                   f" LIMIT :chunk)")


def continue_app_deletion(app_id: str) -> None:
    """Hand the rest of a deletion that ran out of time to a fresh message."""
    publisher.send_task(DELETE_TASK, [app_id])


def resume_app_deletions(limit: int = 100) -> int:
    """Queue a deletion task for every app marked deleted whose row is still there (oldest first)."""
    app_ids = db.session.scalars(
        sa.select(App.id).where(App.deleted_at.is_not(None)).order_by(App.deleted_at).limit(limit)
    ).all()
    db.session.commit()
    for app_id in app_ids:
        publisher.send_task(DELETE_TASK, [app_id])
    return len(app_ids)
