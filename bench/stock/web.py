"""The stock design's API: Flask, the app and its rules' compiled jsonschema validators cached a few
seconds, one `delay()` per event or batch request, and (STOCK_RATE_LIMIT) a per-app Flask-Limiter
limit on Redis counted in events. Run: gunicorn bench.stock.web:app (bench/run.py does)."""
import hashlib
import hmac
import os
import threading
import time
import uuid
from datetime import datetime, timezone

import jsonschema
import psycopg2
from flask import Flask, jsonify, request
from flask_limiter import Limiter

from bench.stock.tasks import store_batch, store_event

app = Flask(__name__)
RATE_LIMIT = os.environ.get("STOCK_RATE_LIMIT") or None
limiter = Limiter(key_func=lambda: request.view_args["app_id"], app=app, storage_uri=os.environ["STOCK_REDIS_URL"],
                  enabled=RATE_LIMIT is not None)

EVENT_SCHEMA = {
    "type": "object",
    "required": ["event_name"],
    "properties": {
        "event_name": {"type": "string", "minLength": 1, "maxLength": 255},
        "event_id": {"type": "string", "minLength": 1, "maxLength": 128},
        "level": {"enum": ["debug", "info", "warning", "warn", "error", "critical", "fatal"]},
        "user_id": {"type": ["string", "integer"]},
        "timestamp": {"type": ["string", "number"]},
    },
}
EVENT_VALIDATOR = jsonschema.Draft202012Validator(EVENT_SCHEMA)
CACHE_TTL = 5.0
_cache = {}  # app_id -> (expires, key hash, [(event_name, validator)])
_cache_lock = threading.Lock()


def load_app(app_id):
    entry = _cache.get(app_id)
    if entry and entry[0] > time.monotonic():
        return entry
    conn = psycopg2.connect(os.environ["STOCK_DATABASE_URL"])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT api_key_hash FROM apps WHERE id = %s AND deleted_at IS NULL", (app_id,))
            found = cur.fetchone()
            if found is None:
                return None
            cur.execute("SELECT event_name, schema FROM rules WHERE app_id = %s AND enabled", (app_id,))
            rules = [(name, jsonschema.Draft202012Validator(schema)) for name, schema in cur.fetchall()]
    finally:
        conn.close()
    entry = (time.monotonic() + CACHE_TTL, found[0], rules)
    with _cache_lock:
        _cache[app_id] = entry
    return entry


def error(status, code, message):
    return jsonify({"error": {"code": code, "message": message}}), status


def check(entry, event):
    """The event with its id and receive time, or an error message."""
    if not isinstance(event, dict):
        return None, "an event is a JSON object"
    problems = [e.message for e in EVENT_VALIDATOR.iter_errors(event)]
    for name, validator in entry[2]:
        if name is None or name == event.get("event_name"):
            problems.extend(e.message for e in validator.iter_errors(event))
    if problems:
        return None, "; ".join(problems)
    return {**event, "event_id": event.get("event_id") or str(uuid.uuid4()),
            "received_at": datetime.now(timezone.utc).isoformat()}, None


def authenticate(app_id):
    entry = load_app(app_id)
    if entry is None:
        return None, error(404, "app_not_found", "There is no app with this id.")
    key = request.headers.get("X-API-Key") or ""
    if not hmac.compare_digest(hashlib.sha256(key.encode()).hexdigest(), entry[1]):
        return None, error(401, "invalid_api_key", "Send the app's key in the X-API-Key header.")
    return entry, None


def batch_events():
    body = request.get_json(silent=True)
    return body.get("events") if isinstance(body, dict) else body


def limited(cost=1):
    """The per-app limit in events (both routes share it), when STOCK_RATE_LIMIT is set."""
    return limiter.shared_limit(RATE_LIMIT or "1/second", scope="ingest", cost=cost)


@app.get("/health")
@limiter.exempt
def health():
    return {"status": "ok"}


@app.post("/api/logs/<app_id>")
@limited()
def ingest_event(app_id):
    entry, failure = authenticate(app_id)
    if failure:
        return failure
    body = request.get_json(silent=True)
    if body is None:
        return error(400, "invalid_json", "The body is not JSON.")
    event, problem = check(entry, body)
    if problem:
        return error(422, "validation_failed", problem)
    result = store_event.delay(app_id, event)
    return {"status": "accepted", "event_id": event["event_id"], "task_id": result.id}, 202


@app.post("/api/logs/<app_id>/batch")
@limited(cost=lambda: len(batch_events()) if isinstance(batch_events(), list) else 1)
def ingest_batch(app_id):
    entry, failure = authenticate(app_id)
    if failure:
        return failure
    items = batch_events()
    if not isinstance(items, list) or not 1 <= len(items) <= 1000:
        return error(400, "invalid_batch", "Send a JSON array of 1 to 1000 events.")
    accepted, rejected = [], []
    for index, item in enumerate(items):
        event, problem = check(entry, item)
        if problem:
            rejected.append({"index": index, "error": {"code": "validation_failed", "message": problem}})
        else:
            accepted.append(event)
    if not accepted:
        return error(422, "validation_failed", "No event in the batch was accepted.")
    result = store_batch.delay(app_id, accepted)
    return {"status": "accepted", "accepted": len(accepted), "event_ids": [e["event_id"] for e in accepted],
            "rejected": rejected, "task_id": result.id}, 202
