"""Rollups: per-app counts by minute, hour and UTC day, folded from the write path's deltas; stats over them.

Why exact: the statement that stores events (app/events.py INSERT_GROUP) also appends, in
the same transaction, one delta row per (app, minute, event name, level) counting only
the rows that insert really added (a key already in event_keys adds none). A delta thus
exists if and only if its events are committed. The fold below takes deltas with
DELETE … RETURNING and adds them to the rollups in the same transaction, so each delta is
counted once: a second run at the same time waits on the lock (or, with wait=False, leaves
the fold to the run that holds it) and finds the rows gone, a crash rolls both back. There
is no watermark to miss a late commit, and a late event is just a delta for an old minute.
"""
from datetime import datetime, timedelta, timezone

import orjson
import sqlalchemy as sa
from flask import current_app
from sqlalchemy.dialects import sqlite

from app.errors import ApiError
from app.extensions import db, with_reconnect
from app.models import FailedEvent, Rollup, RollupUser, rollup_deltas

LEVELS = ("debug", "info", "warning", "error", "critical")
BUCKETS = {"minute": ("m", timedelta(minutes=1)), "hour": ("h", timedelta(hours=1)), "day": ("d", timedelta(days=1))}
MAX_BUCKETS = 1500
# Deltas folded per transaction: bounded work and locks per step.
FOLD_CHUNK = 20_000
# pg_advisory_xact_lock key of the fold: runs take turns, so they never deadlock on rollup rows.
FOLD_LOCK = 0x1A7E_0001

# PostgreSQL: one statement per chunk. `taken` removes the deltas it folds (SKIP LOCKED:
# rows another transaction is deleting are not waited for); each is spread to its minute,
# hour and day; user ids, made distinct per minute first (a third of the work of doing it
# per bucket), go into the buckets' sets, and only those new to a set count towards the
# bucket's `users`; the sums are added to the rollup rows. Runs take turns on FOLD_LOCK,
# so rows need no ordering against deadlocks.
FOLD = f"""
WITH taken AS (
    DELETE FROM rollup_deltas
    WHERE ctid = ANY(ARRAY(SELECT ctid FROM rollup_deltas LIMIT %(limit)s FOR UPDATE SKIP LOCKED))
    RETURNING app_id, minute, event_name, level, count, user_ids
), spread AS (
    SELECT t.app_id, b.bucket, date_trunc(b.unit, t.minute, 'UTC') AS start, t.event_name, t.level, t.count,
           t.user_ids
    FROM taken t CROSS JOIN (VALUES ('m', 'minute'), ('h', 'hour'), ('d', 'day')) AS b(bucket, unit)
), minute_users AS (
    SELECT t.app_id, t.minute, t.event_name, u.user_id
    FROM taken t CROSS JOIN LATERAL jsonb_array_elements_text(t.user_ids) AS u(user_id)
    GROUP BY 1, 2, 3, 4
), new_users AS (
    INSERT INTO rollup_users (app_id, bucket, start, event_name, user_id)
    SELECT m.app_id, b.bucket, date_trunc(b.unit, m.minute, 'UTC'), m.event_name, m.user_id
    FROM minute_users m CROSS JOIN (VALUES ('m', 'minute'), ('h', 'hour'), ('d', 'day')) AS b(bucket, unit)
    GROUP BY 1, 2, 3, 4, 5
    ON CONFLICT DO NOTHING
    RETURNING app_id, bucket, start, event_name
), user_counts AS (
    SELECT app_id, bucket, start, event_name, count(*) AS users FROM new_users GROUP BY 1, 2, 3, 4
), sums AS (
    SELECT app_id, bucket, start, event_name,
           {", ".join(f"coalesce(sum(count) FILTER (WHERE level = '{level}'), 0) AS {level}" for level in LEVELS)}
    FROM spread GROUP BY 1, 2, 3, 4
), folded AS (
    INSERT INTO rollups (app_id, bucket, start, event_name, {", ".join(LEVELS)}, users)
    SELECT s.app_id, s.bucket, s.start, s.event_name, {", ".join(f"s.{level}" for level in LEVELS)},
           coalesce(u.users, 0)
    FROM sums s LEFT JOIN user_counts u USING (app_id, bucket, start, event_name)
    ON CONFLICT (app_id, bucket, start, event_name) DO UPDATE SET
        {", ".join(f"{name} = rollups.{name} + excluded.{name}" for name in (*LEVELS, "users"))}
    RETURNING 1
)
SELECT coalesce(sum(count), 0), count(*) FROM taken"""


def refresh(*, wait: bool = True) -> dict:
    """Fold every delta there is into the rollups; return {"events_rolled_up": N}.

    wait=False: return at once if another run holds the fold lock (the workers' timers,
    app/rollup_timer.py): that run folds until it finds the table empty, and a delta it
    started too early to see is the next run's.
    """
    total = 0
    while True:
        events, deltas = with_reconnect(lambda: _fold_chunk(wait))
        total += events
        # A short chunk means the table was empty (or the rest is another run's): done, even
        # while workers keep appending. None: another run holds the lock.
        if deltas is None or deltas < FOLD_CHUNK:
            return {"events_rolled_up": total}


def _fold_chunk(wait: bool = True) -> tuple[int, int | None]:
    with db.engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            if wait:
                connection.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (FOLD_LOCK,))
            elif not connection.exec_driver_sql("SELECT pg_try_advisory_xact_lock(%s)", (FOLD_LOCK,)).scalar():
                return 0, None
            events, deltas = connection.exec_driver_sql(FOLD, {"limit": FOLD_CHUNK}).one()
            return int(events), deltas
        return _fold_chunk_sqlite(connection)


def _fold_chunk_sqlite(connection) -> tuple[int, int]:
    """The same fold in Python: SQLite runs one writer at a time, and the DELETE comes first."""
    taken = connection.execute(
        sa.delete(rollup_deltas)
        .where(sa.literal_column("rowid").in_(sa.select(sa.literal_column("rowid")).select_from(rollup_deltas)
                                              .limit(FOLD_CHUNK).scalar_subquery()))
        .returning(*rollup_deltas.c)
    ).all()
    sums, users = {}, set()
    for delta in taken:
        minute = delta.minute.replace(tzinfo=timezone.utc)
        for bucket, start in (("m", minute), ("h", minute.replace(minute=0)),
                              ("d", minute.replace(hour=0, minute=0))):
            key = (delta.app_id, bucket, start, delta.event_name)
            row = sums.setdefault(key, dict.fromkeys((*LEVELS, "users"), 0))
            row[delta.level] += delta.count
            users.update((*key, user_id) for user_id in delta.user_ids or ())
    if users:
        statement = sqlite.insert(RollupUser.__table__).on_conflict_do_nothing()
        statement = statement.returning(*(RollupUser.__table__.c[name] for name in ("app_id", "bucket", "start",
                                                                                     "event_name")))
        columns = ("app_id", "bucket", "start", "event_name", "user_id")
        for row in connection.execute(statement, [dict(zip(columns, user)) for user in sorted(users)]):
            sums[(row.app_id, row.bucket, row.start.replace(tzinfo=timezone.utc), row.event_name)]["users"] += 1
    if sums:
        statement = sqlite.insert(Rollup.__table__)
        table = Rollup.__table__
        statement = statement.on_conflict_do_update(
            index_elements=["app_id", "bucket", "start", "event_name"],
            set_={name: table.c[name] + statement.excluded[name] for name in (*LEVELS, "users")},
        )
        connection.execute(statement, [
            {"app_id": app_id, "bucket": bucket, "start": start, "event_name": name, **counts}
            for (app_id, bucket, start, name), counts in sums.items()
        ])
    return sum(delta.count for delta in taken), len(taken)


# --- stats --------------------------------------------------------------------------------


def app_stats(app_id: str, *, bucket: str = "hour", since=None, until=None, event_name: str | None = None) -> dict:
    """The stats of one app from the rollups alone (API.md "Stats")."""
    if bucket not in BUCKETS:
        raise ApiError(400, "invalid_query", "bucket must be minute, hour or day.")
    code, size = BUCKETS[bucket]
    until = _moment(until, "until") if until is not None else datetime.now(timezone.utc)
    since = _moment(since, "since") if since is not None else until - timedelta(hours=24)
    if since >= until:
        raise ApiError(400, "invalid_query", "since must be before until.")
    first = _bucket_start(since, code)
    if (until - first) / size > MAX_BUCKETS:
        raise ApiError(400, "invalid_query",
                       f"At most {MAX_BUCKETS} {bucket} buckets per answer: narrow since/until or use a larger bucket.")
    series, totals = with_reconnect(lambda: _series(app_id, code, first, until, event_name))
    total = sum(totals.values())
    return {
        "bucket": bucket, "since": _iso(since), "until": _iso(until),
        "total": total, "by_level": {level: count for level, count in totals.items() if count},
        "series": series,
        "ingestion": ingestion(app_id, first, until, event_name, rolled_up=total),
    }


# PostgreSQL hands the start over as epoch seconds: 30 days of hours for ten names are
# 7,200 rows, and parsing each timestamptz cost more than the rest of the row. (Measured per
# call on those rows, client + server CPU: these rows formatted in Python 36 ms; the whole
# series built as JSON text by the server 46 ms; with json_build_object about twice that.)
SERIES = f"""
SELECT extract(epoch FROM start)::bigint, event_name, {", ".join(LEVELS)}, users
FROM rollups
WHERE app_id = %(app_id)s AND bucket = %(bucket)s AND start >= %(first)s AND start < %(until)s
  AND (%(event_name)s::text IS NULL OR event_name = %(event_name)s)
ORDER BY start, event_name"""


def series_parameters(app_id, code, first, until, event_name) -> dict:
    return {"app_id": app_id, "bucket": code, "first": first, "until": until, "event_name": event_name}


def _series(app_id, code, first, until, event_name) -> tuple[list, dict]:
    parameters = series_parameters(app_id, code, first, until, event_name)
    if db.engine.dialect.name == "postgresql":
        rows = db.session.connection().exec_driver_sql(SERIES, parameters).all()
        start_of = lambda epoch: datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    else:
        rows = db.session.execute(series_query(**parameters)).all()
        start_of = _iso
    db.session.rollback()
    totals, series, starts = [0] * len(LEVELS), [], {}
    for start, name, *counts, users in rows:
        iso = starts.get(start)
        if iso is None:  # ten names share each start: format it once
            iso = starts[start] = start_of(start)
        by_level = {}
        for index, count in enumerate(counts):
            if count:
                by_level[LEVELS[index]] = count
                totals[index] += count
        series.append({"start": iso, "event_name": name, "count": sum(counts), "by_level": by_level, "users": users})
    return series, dict(zip(LEVELS, totals))


def series_query(app_id: str, bucket: str, first: datetime, until: datetime, event_name: str | None):
    """The rollup rows of a series, oldest first, on the embedded SQLite default (PostgreSQL: SERIES)."""
    query = (
        sa.select(Rollup.start, Rollup.event_name, *(getattr(Rollup, level) for level in LEVELS), Rollup.users)
        .where(Rollup.app_id == app_id, Rollup.bucket == bucket, Rollup.start >= first, Rollup.start < until)
        .order_by(Rollup.start, Rollup.event_name)
    )
    return query if event_name is None else query.where(Rollup.event_name == event_name)


def ingestion(app_id: str, since: datetime, until: datetime, event_name: str | None, *, rolled_up: int) -> dict:
    """Accepted, stored, failed and lag for events timestamped in [since, until), from what the workers know.

    Nothing is counted on the API's hot path: stored = the rollups plus the deltas not
    folded yet; failed = the app's failed events; what is still pending is read from the
    pending store; accepted = stored + failed + pending.
    """
    unfolded, failed = with_reconnect(lambda: _stored_and_failed(app_id, since, until, event_name))
    pending, oldest = pending_events(current_app.extensions["intake.pending"], app_id, since, until, event_name)
    stored = rolled_up + unfolded
    lag = max(0.0, datetime.now(timezone.utc).timestamp() - oldest / 1e6) if oldest is not None else 0.0
    return {"accepted": stored + failed + pending, "stored": stored, "failed": failed, "lag_seconds": round(lag, 3)}


def ingestion_queries(app_id, since, until, event_name):
    """Events stored but not folded yet, and failed events, timestamped in [since, until)."""
    deltas = sa.select(sa.func.coalesce(sa.func.sum(rollup_deltas.c.count), 0)).where(
        rollup_deltas.c.app_id == app_id, rollup_deltas.c.minute >= since, rollup_deltas.c.minute < until)
    if event_name is not None:
        deltas = deltas.where(rollup_deltas.c.event_name == event_name)
    # The dead letter keeps the event as accepted: its timestamp in integer microseconds.
    stamp = sa.cast(FailedEvent.event["timestamp"].as_string(), sa.BigInteger)
    failed = sa.select(sa.func.count()).where(
        FailedEvent.app_id == app_id, stamp >= _micros(since), stamp < _micros(until))
    if event_name is not None:
        failed = failed.where(FailedEvent.event["event_name"].as_string() == event_name)
    return deltas, failed


def _stored_and_failed(app_id, since, until, event_name):
    deltas, failed = ingestion_queries(app_id, since, until, event_name)
    counts = int(db.session.scalar(deltas)), int(db.session.scalar(failed))
    db.session.rollback()
    return counts


def pending_events(store, app_id, since, until, event_name, limit=10_000) -> tuple[int, int | None]:
    """Events of the app in the pending store in [since, until), and the oldest received_at (µs) of any.

    Reads at most `limit` pending groups: the store is small unless the workers are far
    behind, and then the lag is what matters.
    """
    low, high, count, oldest = _micros(since), _micros(until), 0, None
    for events in _pending_groups(store, limit):
        for event in events:
            if event.get("app_id") != app_id:
                continue
            oldest = event["received_at"] if oldest is None else min(oldest, event["received_at"])
            if low <= event["timestamp"] < high and event_name in (None, event["event_name"]):
                count += 1
    return count, oldest


def _pending_groups(store, limit):
    if hasattr(store, "redis"):  # RedisPendingStore
        for _, body in zip(range(limit), store.redis.hscan_iter(store.BODIES, count=500)):
            yield orjson.loads(body[1])["events"]
        return
    for path in list(store.folder.glob("*/*.json"))[:limit]:  # FolderPendingStore
        try:
            yield orjson.loads(path.read_bytes())["events"]
        except (FileNotFoundError, orjson.JSONDecodeError):
            continue  # stored meanwhile, or being replaced


def _moment(value, name) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ApiError(400, "invalid_query", f"{name} must be an ISO 8601 time, e.g. 2026-11-24T10:00:00Z.") from None
    if not isinstance(value, datetime):
        raise ApiError(400, "invalid_query", f"{name} must be an ISO 8601 time.")
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _bucket_start(moment: datetime, code: str) -> datetime:
    moment = moment.replace(second=0, microsecond=0)
    if code in ("h", "d"):
        moment = moment.replace(minute=0)
    if code == "d":
        moment = moment.replace(hour=0)
    return moment


def _micros(moment: datetime) -> int:
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:  # SQLite hands back naive UTC datetimes
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
