"""POST /api/logs/<app_id>[/batch]: load → check → publish → 202; the status look-up; OTLP logs."""
from datetime import datetime, timezone

from flask import Blueprint, current_app, g, request

from app import events, limits, metrics
from app.errors import ApiError
from app.ingest import checks, otlp
from app.publisher import QueueUnavailable, get_publisher
from app.rules import AppEntry, RulesUnavailable

bp = Blueprint("ingest", __name__, url_prefix="/api/logs")
otlp_bp = Blueprint("otlp", __name__, url_prefix="/api/otlp")


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


@otlp_bp.post("/<app_id>/v1/logs")
def export_logs(app_id):
    """OTLP/HTTP logs: each log record becomes an event, checked and queued like a batch event."""
    entry = authenticate(app_id)
    encoding = otlp.request_encoding(request.mimetype)
    config = current_app.config
    body = checks.read_encoded_body(request, config["INGEST_MAX_BATCH_BYTES"])
    records = otlp.log_records(otlp.decode(body, encoding))
    g.ingest_events = len(records)  # a refusal from here on refuses this many records (metrics)
    max_records = config["INGEST_MAX_BATCH_EVENTS"]
    if len(records) > max_records:
        raise ApiError(413, "payload_too_large",
                       f"An export holds at most {max_records} log records; this one has {len(records)}.")
    if records:
        limits.charge_app(entry.id, len(records))
        _, rejected, _ = queue_batch(records, _log_record_check(entry, config))
    else:
        rejected = []
    return otlp.export_response(len(records), rejected, encoding)


def _log_record_check(entry: AppEntry, config):
    """The check of one log record: map it to its event (API.md's table), then check it like a batch event."""
    mapper = otlp.RecordMapper(config["INGEST_MAX_DEPTH"])
    event_limit = config["INGEST_MAX_EVENT_BYTES"]
    received_at = datetime.now(timezone.utc)

    def check(record) -> dict:
        # The mapper has bounded the depth of the body and of each attribute value (no
        # check_depth), and knows the types of the reserved fields (no parsing them again).
        payload, reserved, canonical = mapper.event(record)
        checks.check_size(len(canonical), event_limit)  # the canonical JSON is the payload's, keys sorted
        fields = checks.typed_reserved_fields(**reserved, received_at=received_at)
        seen = mapper.seen_by_rules(payload, reserved) if entry.rules else None
        return checks.assemble_event(entry, fields, payload, received_at, seen_by_rules=seen)

    return check


@otlp_bp.after_request
def otlp_error_body(response):
    """OTLP clients read errors as a google.rpc.Status in the request's encoding, and retry after 1 s."""
    if response.status_code < 400 or not response.is_json:
        return response
    error = (response.get_json(silent=True) or {}).get("error")
    if not isinstance(error, dict):
        return response
    encoding = otlp.answer_encoding(request.mimetype)
    response.set_data(otlp.status_body(response.status_code, error.get("code", ""), error.get("message", ""),
                                       encoding))
    response.mimetype = encoding
    if response.status_code in (429, 503):
        # The exporters wait this long and retry within their own timeout (about 10 s for Python's).
        response.headers["Retry-After"] = "1"
    return response
