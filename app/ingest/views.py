"""POST /api/logs/<app_id>[/batch]: load → check → publish → 202; the status look-up."""
from datetime import datetime, timezone

from flask import Blueprint, current_app, g, request

from app import events, limits, metrics
from app.errors import ApiError
from app.ingest import checks
from app.publisher import QueueUnavailable, get_publisher
from app.rules import AppEntry, RulesUnavailable

bp = Blueprint("ingest", __name__, url_prefix="/api/logs")


def queue_unavailable() -> ApiError:
    return ApiError(
        503, "queue_unavailable", "The event queue is unavailable; nothing was accepted. Retry shortly.",
        headers={"Retry-After": "2"},
    )


def authenticate(app_id: str) -> AppEntry:
    """The cached app whose key the request carries (404 unknown app, 401 wrong key)."""
    try:
        entry = current_app.extensions["intake.rules"].get(app_id)
    except RulesUnavailable:
        raise ApiError(503, "service_unavailable", "The app's records cannot be read right now; retry shortly.",
                       headers={"Retry-After": "5"}) from None
    if entry is None:
        raise ApiError(404, "app_not_found", "There is no app with this id.")
    if not entry.key_matches(request.headers.get("X-API-Key")):
        raise ApiError(401, "invalid_api_key", "Send the app's key in the X-API-Key header.")
    return entry


@bp.post("/<app_id>")
def ingest_event(app_id):
    entry = authenticate(app_id)
    limits.charge_app(entry.id, 1)
    config = current_app.config
    body = checks.read_body(request, config["INGEST_MAX_EVENT_BYTES"])
    event = checks.check_event(
        entry, checks.parse_json(body), max_depth=config["INGEST_MAX_DEPTH"], received_at=datetime.now(timezone.utc)
    )
    publisher = get_publisher()
    try:
        task_id = publisher.wait(publisher.submit(event))
    except QueueUnavailable:
        raise queue_unavailable() from None
    metrics.EVENTS_ACCEPTED.inc()
    return {"status": "accepted", "event_id": event["event_id"], "task_id": task_id, "validation": event["validation"]}, 202


def _batch_items(document, max_events: int) -> list:
    items = document.get("events") if isinstance(document, dict) else document
    if not isinstance(items, list):
        raise ApiError(400, "invalid_batch", 'Send a JSON array of events or {"events": [...]}.')
    if not 1 <= len(items) <= max_events:
        raise ApiError(400, "invalid_batch", f"A batch holds 1 to {max_events} events; this one has {len(items)}.")
    return items


@bp.post("/<app_id>/batch")
def ingest_batch(app_id):
    entry = authenticate(app_id)
    config = current_app.config
    body = checks.read_body(request, config["INGEST_MAX_BATCH_BYTES"])
    items = _batch_items(checks.parse_json(body), config["INGEST_MAX_BATCH_EVENTS"])
    g.ingest_events = len(items)  # a refusal from here on refuses this many events (metrics)
    limits.charge_app(entry.id, len(items))
    accepted, rejected, task_id = queue_batch(items, _batch_event_check(entry, config, len(body)))
    result = {"accepted": len(accepted), "event_ids": [e["event_id"] for e in accepted], "rejected": rejected}
    if not accepted:
        error = {"code": "validation_failed", "message": "No event in the batch was accepted; see rejected."}
        return {"error": error, "status": "rejected", **result, "task_id": None}, 422
    return {"status": "accepted", **result, "task_id": task_id}, 202


def _batch_event_check(entry: AppEntry, config, body_bytes: int):
    """The check of one batch item: the event limit (when the body could exceed it), then check_event."""
    # No single event can exceed the event limit when the whole body fits in it.
    measure_events = body_bytes > config["INGEST_MAX_EVENT_BYTES"]
    event_limit, max_depth = config["INGEST_MAX_EVENT_BYTES"], config["INGEST_MAX_DEPTH"]
    received_at = datetime.now(timezone.utc)

    def check(item) -> dict:
        if measure_events:
            checks.check_event_size(item, event_limit)
        return checks.check_event(entry, item, max_depth=max_depth, received_at=received_at)

    return check


def queue_batch(items: list, check) -> tuple[list[dict], list[dict], str | None]:
    """Check each item; queue the accepted events as one batch on batch_processing; (accepted, rejected, task id)."""
    accepted, rejected = [], []
    for index, item in enumerate(items):
        try:
            accepted.append(check(item))
        except ApiError as error:
            rejected.append({"index": index, **error.to_dict()})
    if not accepted:
        metrics.count_batch(0, rejected)
        return accepted, rejected, None
    # Bounded like a single event: a broker that hangs (not refuses) must still give a 503 in time.
    publisher = get_publisher()
    try:
        task_id = publisher.wait(publisher.submit_batch(accepted))
    except QueueUnavailable:
        raise queue_unavailable() from None
    metrics.count_batch(len(accepted), rejected)
    return accepted, rejected, task_id


@bp.get("/<app_id>/events/<event_id>")
def event_status(app_id, event_id):
    authenticate(app_id)
    status = events.event_status(app_id, event_id)
    if status is None:
        raise ApiError(404, "event_not_found", "No such event is stored yet: it is still queued, or was never accepted.")
    return status

