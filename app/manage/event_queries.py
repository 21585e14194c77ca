"""Stored events of an app: filtered listings, newest first, in keyset pages; one event by its id.

Every listing is an index scan (bench/explain_events.py prints the plans on 1,000,000 rows):
the app and one equality filter lead an index that ends in (timestamp DESC, id DESC), and a page
continues below the last (timestamp, id) seen, never with OFFSET. Written for a plain `events`
table and for one partitioned by `timestamp` alike.
"""
import base64
import binascii
import struct
from datetime import datetime, timedelta, timezone

from app.errors import ApiError
from app.extensions import db
from app.models import Event

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MICROSECOND = timedelta(microseconds=1)
# The cursor is opaque to clients: a version byte, the last row's timestamp (epoch microseconds) and id.
CURSOR = struct.Struct(">Bqq")
CURSOR_VERSION = 1
CURSOR_LENGTH = 23  # base64 of the 17 bytes, unpadded
MIN_US = (datetime(1, 1, 2, tzinfo=timezone.utc) - EPOCH) // MICROSECOND
MAX_US = (datetime(9999, 12, 30, tzinfo=timezone.utc) - EPOCH) // MICROSECOND

LISTED = (Event.event_id, Event.event_name, Event.level, Event.user_id, Event.timestamp, Event.received_at,
          Event.processed_at, Event.validation["status"].as_string().label("validation_status"), Event.id)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment  # SQLite: naive UTC


def encode_cursor(timestamp: datetime, row_id: int) -> str:
    packed = CURSOR.pack(CURSOR_VERSION, (_utc(timestamp) - EPOCH) // MICROSECOND, row_id)
    return base64.urlsafe_b64encode(packed).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    """The (timestamp, id) a page continues below; 400 `invalid_cursor` for anything we did not make."""
    try:
        if len(cursor) > CURSOR_LENGTH:
            raise ValueError(cursor)
        version, micros, row_id = CURSOR.unpack(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, struct.error, ValueError):
        version, micros, row_id = None, 0, 0
    if version != CURSOR_VERSION or not MIN_US <= micros <= MAX_US:
        raise ApiError(400, "invalid_cursor", "The cursor is not one this API gave out: pass next_cursor unchanged.")
    return EPOCH + micros * MICROSECOND, row_id


def listing_query(app_id: str, *, limit: int = 100, cursor: str | None = None, event_name: str | None = None,
                  level: str | None = None, user_id: str | None = None, since: datetime | None = None,
                  until: datetime | None = None):
    """The SELECT of one page (one row more than `limit`, to know whether another page follows)."""
    query = db.select(*LISTED).where(Event.app_id == app_id)
    for column, value in ((Event.event_name, event_name), (Event.level, level), (Event.user_id, user_id)):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(Event.timestamp >= since)
    if until is not None:
        query = query.where(Event.timestamp < until)
    if cursor is not None:
        timestamp, row_id = decode_cursor(cursor)
        # Written out rather than as a row comparison: `timestamp <= t` bounds the scan of any
        # index ending in timestamp (also those without id), the rest only drops the ties seen.
        query = query.where(Event.timestamp <= timestamp,
                            (Event.timestamp < timestamp) | (Event.id < row_id))
    return query.order_by(Event.timestamp.desc(), Event.id.desc()).limit(limit + 1)


def list_events(app_id: str, *, limit: int = 100, **filters) -> tuple[list, str | None]:
    """One page of the app's events, newest first, and the cursor of the next page (None at the end).

    `filters`: event_name, level, user_id, since (inclusive), until (exclusive), cursor.
    """
    rows = db.session.execute(listing_query(app_id, limit=limit, **filters)).all()
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], encode_cursor(last.timestamp, last.id)


def event_not_found() -> ApiError:
    return ApiError(404, "event_not_found", "The app has no stored event with this id (it may still be queued).")


def get_event(app_id: str, event_id: str) -> Event:
    """The stored event with this (client) id; 404 `event_not_found` while queued or unknown."""
    if not 1 <= len(event_id) <= 128 or "\x00" in event_id:  # no stored event_id looks like this
        raise event_not_found()
    event = db.session.scalar(db.select(Event).where(Event.app_id == app_id, Event.event_id == event_id).limit(1))
    if event is None:
        raise event_not_found()
    return event
