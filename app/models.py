"""Tables: users, apps, rules, events, failed events; de-duplication keys and rollups."""
import uuid
from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db

# JSONB on PostgreSQL (indexable, compact), plain JSON on the embedded SQLite default.
JSONDocument = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class User(db.Model):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    email: Mapped[str] = mapped_column(sa.String(254), unique=True)
    password_hash: Mapped[str] = mapped_column(sa.String(255))
    email_verified_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
    # Tokens issued before this instant are refused (set by a password reset).
    tokens_valid_after: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)


class App(db.Model):
    __tablename__ = "apps"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(sa.String(255))
    # SHA-256 of the key: keys are long random tokens, so a fast hash is enough.
    api_key_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    retention_days: Mapped[int] = mapped_column(sa.Integer, default=30)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    # Set when deletion starts: the key stops working while the data is removed.
    deleted_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))


class Rule(db.Model):
    __tablename__ = "rules"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    app_id: Mapped[str] = mapped_column(sa.ForeignKey("apps.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(sa.String(255))
    event_name: Mapped[str | None] = mapped_column(sa.String(255))
    schema: Mapped[dict] = mapped_column(JSONDocument)
    action: Mapped[str] = mapped_column(sa.String(8))  # "reject" or "warn"
    enabled: Mapped[bool] = mapped_column(sa.Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Event(db.Model):
    """A stored event: the client's payload unchanged, plus normalised fields."""

    __tablename__ = "events"
    __table_args__ = (
        # "Newest events of an app" and "newest of one name" are index scans.
        sa.Index("ix_events_app_timestamp", "app_id", sa.text("timestamp DESC"), sa.text("id DESC")),
        sa.Index("ix_events_app_name_timestamp", "app_id", "event_name", sa.text("timestamp DESC")),
    )
    # On PostgreSQL the table is partitioned by range of `timestamp` (app/retention.py), so
    # its primary key is (id, timestamp) and idempotency on (app, event_id) lives in
    # EventKey, written by the same statement (app/events.py). The migration builds it.

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    app_id: Mapped[str] = mapped_column(sa.String(36))
    event_id: Mapped[str] = mapped_column(sa.String(128))
    event_name: Mapped[str] = mapped_column(sa.String(255))
    level: Mapped[str] = mapped_column(sa.String(8))
    user_id: Mapped[str | None] = mapped_column(sa.String(255))
    timestamp: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    received_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    processed_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    validation: Mapped[dict] = mapped_column(JSONDocument)
    payload: Mapped[dict] = mapped_column(JSONDocument)


class FailedEvent(db.Model):
    """An accepted event that could not be stored after every retry (a dead letter)."""

    __tablename__ = "failed_events"
    __table_args__ = (
        sa.UniqueConstraint("app_id", "event_id", name="uq_failed_events_app_event_id"),
        sa.Index("ix_failed_events_app_last_failed", "app_id", sa.text("last_failed_at DESC"), "id"),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    app_id: Mapped[str] = mapped_column(sa.String(36))
    event_id: Mapped[str] = mapped_column(sa.String(128))
    # The event as the API accepted it, so a replay goes through the normal path.
    event: Mapped[dict] = mapped_column(JSONDocument)
    error: Mapped[str] = mapped_column(sa.Text)
    attempts: Mapped[int] = mapped_column(sa.Integer)
    first_failed_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    last_failed_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)


class AccountCode(db.Model):
    """A one-time code mailed to a user: email verification or password reset."""

    __tablename__ = "account_codes"
    __table_args__ = (sa.Index("ix_account_codes_user_purpose", "user_id", "purpose", sa.text("created_at DESC")),)

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(sa.String(16))  # "verify_email" or "reset_password"
    # HMAC-SHA256 of the code under SECRET_KEY: a leaked table does not give the codes away.
    code_hash: Mapped[str] = mapped_column(sa.String(64))
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    expires_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)


class RevokedToken(db.Model):
    """A revoked JWT on the embedded default (with REDIS_URL the blocklist lives in Redis)."""

    __tablename__ = "revoked_tokens"

    jti: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), index=True)


# Event listings (app/manage/event_queries.py): the app and one equality filter, then newest first.
INDEXED_LEVELS = ("warning", "error", "critical")
# Declared here, after the class, so that they stay additive to whatever shape `events` takes.
# Only the levels people look for: most events are info (or debug), and each index costs every write.
sa.Index("ix_events_app_level_timestamp", Event.app_id, Event.level, Event.timestamp.desc(), Event.id.desc(),
         postgresql_where=Event.level.in_(INDEXED_LEVELS), sqlite_where=Event.level.in_(INDEXED_LEVELS))
sa.Index("ix_events_app_user_timestamp", Event.app_id, Event.user_id, Event.timestamp.desc(), Event.id.desc(),
         postgresql_where=Event.user_id.isnot(None), sqlite_where=Event.user_id.isnot(None))


class EventKey(db.Model):
    """One stored (app, event_id): the de-duplication record, kept for the app's retention after storing."""

    # No index beyond the key: the purge of keys past the window (app/retention.py) walks the
    # table in block ranges once a day rather than adding an index to every write.
    __tablename__ = "event_keys"

    app_id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    event_id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    # The event's processed_at: the status look-up reads it here, from the one unique index.
    stored_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))


# What the insert really added, per (app, minute, event name, level), appended by the
# statement that stores the events and consumed exactly once by the rollup job
# (app/rollups.py). Append-only: no key, no index, so concurrent workers never wait on
# each other. `user_ids`: the user ids among those events (JSON list, repeats allowed).
rollup_deltas = sa.Table(
    "rollup_deltas",
    db.metadata,
    sa.Column("app_id", sa.String(36), nullable=False),
    sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
    sa.Column("event_name", sa.String(255), nullable=False),
    sa.Column("level", sa.String(8), nullable=False),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("user_ids", JSONDocument),
)


class Rollup(db.Model):
    """Counts of one app's events of one name in one minute, hour or UTC day (`bucket` m, h, d)."""

    __tablename__ = "rollups"

    app_id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    bucket: Mapped[str] = mapped_column(sa.String(1), primary_key=True)
    start: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), primary_key=True)
    event_name: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    debug: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    info: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    warning: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    error: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    critical: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    # Distinct user ids in the bucket, exact: the size of its set in RollupUser.
    users: Mapped[int] = mapped_column(sa.BigInteger, default=0)


class RollupUser(db.Model):
    """One distinct user id seen in one rollup bucket (what makes `users` exact)."""

    __tablename__ = "rollup_users"

    app_id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    bucket: Mapped[str] = mapped_column(sa.String(1), primary_key=True)
    start: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), primary_key=True)
    event_name: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    user_id: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
