"""The stock design's Celery app: one task per event on `default`, one per batch request on `batch_processing`.

Written plainly, as a newcomer would from the seeds: Celery's defaults (early acks, prefetch 4,
no result backend), a psycopg2 connection per worker process, INSERT + COMMIT per event and
one multi-row INSERT per batch, into the same `events` table as Intake (its migrations; partitioned
there, so ON CONFLICT has no unique index to meet: the bench ids never repeat).
"""
import json
import os
from datetime import datetime, timezone

import psycopg2
from celery import Celery
from celery.signals import worker_process_init
from psycopg2.extras import execute_values

celery = Celery("stock", broker=os.environ["STOCK_REDIS_URL"])
celery.conf.update(
    task_routes={"stock.store_event": {"queue": "default"}, "stock.store_batch": {"queue": "batch_processing"}},
    task_ignore_result=True,
    worker_hijack_root_logger=False,
)

LEVELS = {"debug": "debug", "info": "info", "warning": "warning", "warn": "warning", "error": "error",
          "critical": "critical", "fatal": "critical"}
INSERT = ("INSERT INTO events (app_id, event_id, event_name, level, user_id, timestamp, received_at, processed_at, "
          "validation, payload) VALUES %s ON CONFLICT DO NOTHING")
_connection = None


@worker_process_init.connect
def _forget_parent_connection(**_):
    global _connection
    _connection = None


def connection():
    global _connection
    if _connection is None or _connection.closed:
        _connection = psycopg2.connect(os.environ["STOCK_DATABASE_URL"])
    return _connection


def parse_timestamp(value, default):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(value / 1000 if value > 1e11 else value, timezone.utc)
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    return default


def row(app_id, event):
    received = datetime.fromisoformat(event["received_at"])
    payload = {k: v for k, v in event.items() if k != "received_at"}
    user_id = payload.get("user_id", payload.get("userId"))
    return (app_id, payload["event_id"], payload.get("event_name") or payload.get("eventName"),
            LEVELS.get(str(payload.get("level", "info")).lower(), "info"),
            None if user_id is None else str(user_id), parse_timestamp(payload.get("timestamp"), received), received,
            datetime.now(timezone.utc), json.dumps({"status": "valid", "warnings": []}), json.dumps(payload))


@celery.task(name="stock.store_event")
def store_event(app_id, event):
    conn = connection()
    with conn.cursor() as cur:
        execute_values(cur, INSERT, [row(app_id, event)])
    conn.commit()


@celery.task(name="stock.store_batch")
def store_batch(app_id, events):
    conn = connection()
    with conn.cursor() as cur:
        execute_values(cur, INSERT, [row(app_id, event) for event in events], page_size=len(events))
    conn.commit()
