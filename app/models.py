"""Tables: users, apps, rules, events and failed events."""
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
        # Idempotency: one row per (app, event_id), whatever the deliveries.
        sa.UniqueConstraint("app_id", "event_id", name="uq_events_app_event_id"),
        # "Newest events of an app" and "newest of one name" are index scans.
        sa.Index("ix_events_app_timestamp", "app_id", sa.text("timestamp DESC"), sa.text("id DESC")),
        sa.Index("ix_events_app_name_timestamp", "app_id", "event_name", sa.text("timestamp DESC")),
    )

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


# Event listings (app/manage/event_queries.py): the app and one equality filter, then newest first.
INDEXED_LEVELS = ("warning", "error", "critical")
# Declared here, after the class, so that they stay additive to whatever shape `events` takes.
# Only the levels people look for: most events are info (or debug), and each index costs every write.
sa.Index("ix_events_app_level_timestamp", Event.app_id, Event.level, Event.timestamp.desc(), Event.id.desc(),
         postgresql_where=Event.level.in_(INDEXED_LEVELS), sqlite_where=Event.level.in_(INDEXED_LEVELS))
sa.Index("ix_events_app_user_timestamp", Event.app_id, Event.user_id, Event.timestamp.desc(), Event.id.desc(),
         postgresql_where=Event.user_id.isnot(None), sqlite_where=Event.user_id.isnot(None))
