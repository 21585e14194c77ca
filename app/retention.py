"""Retention: weekly partitions of events made ahead of time; expired events removed without long locks.

On PostgreSQL `events` is partitioned by range of `timestamp`: one partition per week
(`events_pYYYYMMDD`, from Monday 00:00 UTC) and `events_default` for any timestamp no
weekly partition covers (old timestamps are legal input). A partition all of whose events
are expired, for every app in it, is dropped whole (metadata only, a lock of milliseconds);
everything else expired — the edges, an app with a shorter retention in a partition others
still need, the default partition, SQLite's plain table — is deleted in bounded chunks,
each its own short transaction. De-duplication keys are removed a day after their app's
retention past the time they were stored (README "De-duplication window"). Rollups stay.
"""
import logging
import re
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from app.extensions import db, with_reconnect
from app.models import App, utcnow

log = logging.getLogger(__name__)

WEEKS_AHEAD = 4
PARTITION_NAME = re.compile(r"^events_p(\d{8})$")
DELETE_CHUNK = 5_000
KEY_BLOCKS = 1_000  # event_keys pages per step of the key purge (about 100,000 keys)
# A key outlives the last moment its event can still be stored (a timestamp at most 10
# minutes ahead), so an event is always gone before its key.
KEY_GRACE = timedelta(days=1)
# Schema changes wait at most this long for a lock: ingestion must not queue behind them.
LOCK_TIMEOUT = "2s"
PURGE_LOCK = 0x1A7E_0002  # pg_advisory_lock keys: one purge, one partition maker at a time
PARTITION_LOCK = 0x1A7E_0003

# The apps with events in a partition (a skip scan of ix_events_app_timestamp: one index
# probe per app) and their retention now; an app no longer in `apps` is being deleted.
APPS_IN_PARTITION = """
WITH RECURSIVE present AS (
    (SELECT app_id FROM {table} ORDER BY app_id LIMIT 1)
    UNION ALL
    SELECT (SELECT app_id FROM {table} WHERE app_id > present.app_id ORDER BY app_id LIMIT 1)
    FROM present WHERE present.app_id IS NOT NULL
)
SELECT present.app_id, apps.retention_days
FROM present LEFT JOIN apps ON apps.id = present.app_id
WHERE present.app_id IS NOT NULL"""


def _monday(moment: datetime) -> datetime:
    day = moment.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=day.weekday())


def partitions(connection) -> list[tuple[str, datetime, datetime]]:
    """The weekly partitions of events: (name, start, end), oldest first."""
    names = connection.exec_driver_sql(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'events'::regclass").scalars()
    weeks = []
    for name in names:
        match = PARTITION_NAME.match(name)
        if match:
            start = datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=timezone.utc)
            weeks.append((name, start, start + timedelta(days=7)))
    return sorted(weeks, key=lambda week: week[1])


def ensure_partitions(now: datetime | None = None) -> dict:
    """Make the weekly partitions from this week to WEEKS_AHEAD ahead; return {"created": [names]}."""
    if db.engine.dialect.name != "postgresql":
        return {"created": []}
    monday, created = _monday(now or utcnow()), []
    with db.engine.connect() as connection:
        existing = {name for name, _, _ in partitions(connection)}
        connection.rollback()
    for week in range(WEEKS_AHEAD + 1):
        start = monday + timedelta(weeks=week)
        name = f"events_p{start:%Y%m%d}"
        if name not in existing and _create_partition(name, start):
            created.append(name)
    return {"created": created}


def _create_partition(name: str, start: datetime) -> bool:
    try:
        with db.engine.begin() as connection:
            connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
            if connection.exec_driver_sql("SELECT to_regclass(%s)", (name,)).scalar() is not None:
                return False  # made by another run while this one waited for the lock
            connection.exec_driver_sql(
                f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF events FOR VALUES FROM (%s) TO (%s)",
                (start, start + timedelta(days=7)))
        return True
    except sa.exc.DBAPIError as error:
        # A lock not granted in time: the next run (hourly) tries again, weeks ahead. Rows
        # already in the default partition for that week: the week stays in the default.
        log.warning("partition %s not created: %s", name, str(getattr(error, "orig", error)).strip())
        return False


def purge(now: datetime | None = None) -> dict:
    """Remove every event past its app's retention, and keys past the window; return {"deleted": N}."""
    now = now or utcnow()
    retention = {app_id: days for app_id, days in db.session.execute(sa.select(App.id, App.retention_days))}
    db.session.rollback()
    if db.engine.dialect.name != "postgresql":
        return {"deleted": _delete_expired(retention, now, sqlite=True)}
    with db.engine.connect() as holder:
        # A second purge (a second beat, the CLI) waits for this one, then finds little left.
        holder.exec_driver_sql("SELECT pg_advisory_lock(%s)", (PURGE_LOCK,))
        holder.commit()
        try:
            deleted = _drop_expired_partitions(retention, now)
            deleted += _delete_expired(retention, now, sqlite=False)
            _purge_keys_postgresql(now)
        finally:
            holder.exec_driver_sql("SELECT pg_advisory_unlock(%s)", (PURGE_LOCK,))
            holder.commit()
    return {"deleted": deleted}


def _cutoff(now: datetime, days: int) -> datetime:
    return now - timedelta(days=days)


def _drop_expired_partitions(retention: dict, now: datetime) -> int:
    shortest = min(retention.values(), default=0)
    dropped = 0
    with db.engine.connect() as connection:
        candidates = [week for week in partitions(connection) if week[2] <= _cutoff(now, shortest)]
        connection.rollback()
    for name, _, end in candidates:
        dropped += with_reconnect(lambda: _drop_if_expired(name, end, now))
    return dropped


def _all_expired(connection, name, end, now) -> bool:
    """Whether every event in the partition is past its app's retention (read now, not at the purge's start)."""
    present = connection.exec_driver_sql(APPS_IN_PARTITION.format(table=name)).all()
    return all(days is None or end <= _cutoff(now, days) for _, days in present)


def _drop_if_expired(name: str, end: datetime, now: datetime) -> int:
    with db.engine.connect() as connection:
        if not _all_expired(connection, name, end, now):
            connection.rollback()
            return 0  # left to the chunked deletes
        count = connection.exec_driver_sql(f"SELECT count(*) FROM {name}").scalar()
        connection.rollback()
    try:
        with db.engine.begin() as connection:
            connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            # Lock out inserts for the instant of the check and the drop: an event of an app
            # that still keeps this week must not arrive between the two.
            connection.exec_driver_sql(f"LOCK TABLE events, {name} IN ACCESS EXCLUSIVE MODE")
            if not _all_expired(connection, name, end, now):
                return 0
            connection.exec_driver_sql(f"DROP TABLE {name}")
    except sa.exc.OperationalError as error:
        log.warning("partition %s not dropped this time: %s", name, str(getattr(error, "orig", error)).strip())
        return 0
    log.info("dropped partition %s (%d expired events)", name, count)
    return count


def _delete_expired(retention: dict, now: datetime, *, sqlite: bool) -> int:
    """Delete expired events app by app in chunks of DELETE_CHUNK rows, each chunk one transaction."""
    deleted = 0
    for app_id, days in retention.items():
        cutoff = _cutoff(now, days)
        while True:
            count = with_reconnect(lambda: _delete_chunk(app_id, cutoff, sqlite))
            deleted += count
            if count < DELETE_CHUNK:
                break
        if sqlite:
            with_reconnect(lambda: _delete_keys_sqlite(app_id, now - timedelta(days=days) - KEY_GRACE))
    return deleted


def _delete_chunk(app_id: str, cutoff: datetime, sqlite: bool) -> int:
    expired = 'app_id = :app_id AND "timestamp" < :cutoff'
    with db.engine.begin() as connection:
        if sqlite:
            statement = f"DELETE FROM events WHERE id IN (SELECT id FROM events WHERE {expired} LIMIT :n)"
        else:
            # Through the parent: partitions wholly newer than the cutoff are pruned, and each
            # chunk is found by ix_events_app_timestamp and removed by primary key.
            statement = (f"DELETE FROM events WHERE {expired} AND id = ANY(ARRAY("
                         f"SELECT id FROM events WHERE {expired} LIMIT :n))")
        statement = sa.text(statement).bindparams(sa.bindparam("cutoff", type_=sa.DateTime(timezone=True)))
        return connection.execute(statement, {"app_id": app_id, "cutoff": cutoff, "n": DELETE_CHUNK}).rowcount


def _delete_keys_sqlite(app_id: str, before: datetime) -> None:
    statement = sa.text(
        "DELETE FROM event_keys WHERE rowid IN (SELECT rowid FROM event_keys "
        "WHERE app_id = :app_id AND stored_at < :before LIMIT :n)"
    ).bindparams(sa.bindparam("before", type_=sa.DateTime(timezone=True)))
    while True:
        with db.engine.begin() as connection:
            if connection.execute(statement, {"app_id": app_id, "before": before, "n": DELETE_CHUNK}).rowcount < DELETE_CHUNK:
                return


def _purge_keys_postgresql(now: datetime) -> int:
    """Walk event_keys once, KEY_BLOCKS pages a step, deleting keys past their app's window.

    By page range rather than by an index on stored_at: the table needs no second index
    (a cost on every write), each page is read once per purge, and every step is bounded.
    """
    with db.engine.connect() as connection:
        pages = connection.exec_driver_sql(
            "SELECT pg_relation_size('event_keys') / current_setting('block_size')::int").scalar()
        connection.rollback()
    removed = 0
    for first in range(0, pages + 1, KEY_BLOCKS):
        removed += with_reconnect(lambda: _purge_key_pages(first, now))
    return removed


def _purge_key_pages(first: int, now: datetime) -> int:
    with db.engine.begin() as connection:
        return connection.exec_driver_sql(
            "DELETE FROM event_keys k USING apps a "
            "WHERE k.ctid >= %(low)s::tid AND k.ctid < %(high)s::tid AND a.id = k.app_id "
            "AND k.stored_at < %(now)s - a.retention_days * interval '1 day' - %(grace)s",
            {"low": f"({first},0)", "high": f"({first + KEY_BLOCKS},0)", "now": now, "grace": KEY_GRACE},
        ).rowcount
