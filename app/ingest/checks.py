"""Every check an event passes before it is accepted, in the documented order.

Each check raises ApiError with the status and code of API.md section 4; the last
one, `check_event`, returns the event as it travels to the workers. A route that builds
its events itself (OTLP) checks their reserved fields with `typed_reserved_fields` and
ends in the same `assemble_event`.
"""
import functools
import json
import re
import uuid
import zlib
from datetime import datetime, timedelta, timezone

import orjson
from flask import Request

from app.errors import ApiError
from app.rules import AppEntry, RuleFailed

LEVELS = {
    "debug": "debug",
    "info": "info",
    "warning": "warning",
    "warn": "warning",
    "error": "error",
    "critical": "critical",
    "fatal": "critical",
}
MAX_FUTURE = timedelta(minutes=10)
# Epoch numbers at least this large are milliseconds (as seconds they would be year 5138+).
EPOCH_MS_THRESHOLD = 1e11
LONG_DIGITS = re.compile(rb"\d{19}")
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1


def read_body(request: Request, limit: int) -> bytes:
    """Return the request body, inflated, refusing wrong types and oversize bodies early."""
    if request.mimetype != "application/json":
        raise ApiError(415, "unsupported_media_type", "Send the body as JSON with 'Content-Type: application/json'.")
    return read_encoded_body(request, limit)


def read_encoded_body(request: Request, limit: int) -> bytes:
    """The body, inflated, for a route that checks the content type itself (OTLP: protobuf or JSON)."""
    too_large = ApiError(413, "payload_too_large", f"The body is larger than the limit of {limit} bytes.")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    data = request.stream.read(limit + 1)
    if len(data) > limit:
        raise too_large
    encoding = (request.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding == "gzip":
        return _gunzip(data, limit, too_large)
    if encoding != "identity":
        raise ApiError(415, "unsupported_encoding", "Content-Encoding must be gzip or absent.")
    return data


# The first piece of each gzip member fed to the inflater; each next piece of the same
# member is twice as large (up to GZIP_PIECE_MAX). zlib copies what follows a member's end
# into `unused_data`, so feeding the whole rest of the body to each member cost time
# quadratic in the number of members (4 MiB of empty members: 7.4 s); this way the copy is
# at most about twice the member's own size.
GZIP_PIECE_MIN = 64
GZIP_PIECE_MAX = 64 * 1024


def _gunzip(data: bytes, limit: int, too_large: ApiError) -> bytes:
    # Inflate at most limit + 1 bytes: a gzip bomb stops here, not in memory. A body may
    # hold several gzip members one after the other (RFC 1952); each is inflated in turn,
    # in time linear in the body's size.
    view = memoryview(data)
    body = bytearray()
    position = 0
    while True:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        piece = GZIP_PIECE_MIN
        while not inflater.eof:
            if position >= len(data):
                raise ApiError(400, "invalid_encoding", "The gzip body is truncated.")
            chunk = view[position:position + piece]
            position += len(chunk)
            piece = min(piece * 2, GZIP_PIECE_MAX)
            try:
                body += inflater.decompress(chunk, limit + 1 - len(body))
            except zlib.error:
                raise ApiError(400, "invalid_encoding", "The body is not valid gzip.") from None
            if len(body) > limit or inflater.unconsumed_tail:
                raise too_large
        position -= len(inflater.unused_data)
        if position >= len(data):
            return bytes(body)


def parse_json(body: bytes):
    """Parse JSON that PostgreSQL can store: no NaN/Infinity, NUL, lone surrogates or bad UTF-8."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        if str(error).startswith("depth limit exceeded"):  # orjson stops at 1024 levels, far past ours
            raise ApiError(422, "nesting_too_deep", "The body is nested too deep.") from None
        raise ApiError(400, "invalid_json", f"The body is not valid JSON: {error}.") from None
    # NUL can only arrive escaped; look for it only when the escape is there at all.
    if b"\\u0000" in body and _contains_nul(value):
        raise ApiError(400, "invalid_json", "Strings may not contain \\u0000 (NUL).")
    # orjson turns integers past 64 bits into floats: the payload would not be stored as
    # sent. Only a body with a long run of digits can hold one, so only then look closer.
    if LONG_DIGITS.search(body):
        _check_integer_range(body)
    return value


def _exact_integer(literal: str) -> int:
    value = int(literal)
    if not INT64_MIN <= value <= UINT64_MAX:
        raise ValueError(literal)
    return value


def _check_integer_range(body: bytes) -> None:
    try:
        json.loads(body, parse_int=_exact_integer)
    except ValueError:
        raise ApiError(400, "invalid_json", "Integers must fit in 64 bits; send larger numbers as strings.") from None


def _contains_nul(value) -> bool:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                return True
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def check_event_size(event, limit: int) -> None:
    """Refuse one event of a batch whose JSON is larger than the event limit."""
    try:
        size = len(orjson.dumps(event))
    except orjson.JSONEncodeError:  # nested past orjson's own limit, far past ours
        raise ApiError(422, "nesting_too_deep", "The event is nested too deep.") from None
    check_size(size, limit)


def check_size(size: int, limit: int) -> None:
    """Refuse one event whose JSON, already measured, is `size` bytes when that is over the event limit."""
    if size > limit:
        raise ApiError(413, "payload_too_large", f"The event is larger than the limit of {limit} bytes.")


def check_depth(event: dict, max_depth: int) -> None:
    """Refuse objects and arrays nested deeper than max_depth (the event itself is depth 1)."""
    if max_depth < 1 or _nested_deeper(event, max_depth - 1):
        raise ApiError(422, "nesting_too_deep", f"The event is nested more than {max_depth} levels deep.")


def _nested_deeper(node, levels_left: int) -> bool:
    # Recursion stops after max_depth levels, whatever the input's depth.
    for child in node.values() if isinstance(node, dict) else node:
        if isinstance(child, (dict, list)) and (levels_left <= 0 or _nested_deeper(child, levels_left - 1)):
            return True
    return False


def _detail(field, message):
    return {"path": f"/{field}", "message": message, "rule": "reserved_fields"}


# The problems with reserved fields, the same words whichever route found them.
EVENT_NAME_PROBLEM = "event_name is required: a string of 1 to 255 characters"
EVENT_ID_PROBLEM = "event_id must be a string of 1 to 128 characters"
FUTURE_PROBLEM = "timestamp is more than 10 minutes in the future"
LEVEL_PROBLEM = "level must be one of debug, info, warning, error, critical"
USER_ID_PROBLEM = "user_id must be a string (at most 255 characters) or an integer"


def _reserved_refusal(problems: list) -> ApiError:
    return ApiError(422, "invalid_event", "Reserved fields are missing or malformed.", problems)


EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MICROSECOND = timedelta(microseconds=1)
MAX_FUTURE_US = MAX_FUTURE // MICROSECOND


# Cached: every event of a request converts the same time received, twice (its reserved
# fields and the event itself), and the conversion cost 2 % of an API process's CPU.
@functools.lru_cache(maxsize=64)
def _epoch_us(moment: datetime) -> int:
    return (moment - EPOCH) // MICROSECOND


def parse_timestamp(value, now: datetime) -> datetime:
    """An ISO 8601 string (no offset = UTC) or epoch seconds/milliseconds, as an aware UTC datetime."""
    if isinstance(value, bool):
        raise ValueError("timestamp must be an ISO 8601 string or epoch seconds/milliseconds")
    if isinstance(value, (int, float)):
        seconds = value / 1000 if abs(value) >= EPOCH_MS_THRESHOLD else value
        try:
            moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise ValueError("timestamp is out of range") from None
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError("timestamp is not ISO 8601 (e.g. 2026-11-24T10:00:00Z)") from None
        try:
            moment = moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
        except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
            raise ValueError("timestamp is out of range") from None
    else:
        raise ValueError("timestamp must be an ISO 8601 string or epoch seconds/milliseconds")
    if moment > now + MAX_FUTURE:
        raise ValueError(FUTURE_PROBLEM)
    return moment


def reserved_fields(event: dict, now: datetime) -> dict:
    """Check and normalise the reserved top-level fields; report every problem at once."""
    problems = []
    name = event.get("event_name", event.get("eventName"))
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 255:
        problems.append(_detail("event_name", EVENT_NAME_PROBLEM))
    else:
        name = name.strip()

    event_id = event.get("event_id")
    if event_id is None:
        event_id = str(uuid.uuid4())
    elif not isinstance(event_id, str) or not 1 <= len(event_id) <= 128:
        problems.append(_detail("event_id", EVENT_ID_PROBLEM))

    timestamp = now
    if event.get("timestamp") is not None:
        try:
            timestamp = parse_timestamp(event["timestamp"], now)
        except ValueError as error:
            problems.append(_detail("timestamp", str(error)))

    level = event.get("level")
    level = "info" if level is None else level  # null counts as absent, like the other fields
    level = LEVELS.get(level.lower()) if isinstance(level, str) else None
    if level is None:
        problems.append(_detail("level", LEVEL_PROBLEM))

    user_id = event.get("user_id", event.get("userId"))
    if isinstance(user_id, int) and not isinstance(user_id, bool):
        user_id = str(user_id)
    if user_id is not None and (not isinstance(user_id, str) or len(user_id) > 255):
        problems.append(_detail("user_id", USER_ID_PROBLEM))

    if problems:
        raise _reserved_refusal(problems)
    return {
        "event_id": event_id,
        "event_name": name,
        "level": level,
        "user_id": user_id,
        "timestamp": _epoch_us(timestamp),
    }


def typed_reserved_fields(event_id: str | None, event_name: str, level: str, user_id: str | int | None,
                          timestamp_us: int | None, received_at: datetime) -> dict:
    """`reserved_fields` for values whose types are already right: only their bounds are checked."""
    # For a route that builds the event itself (OTLP): its name is a str, its level one of
    # LEVELS' values, its user id a str or int and its time epoch microseconds, so nothing
    # is parsed again. The problems are reported as reserved_fields reports them, in its order.
    problems = []
    name = event_name.strip()
    if not 1 <= len(name) <= 255:
        problems.append(_detail("event_name", EVENT_NAME_PROBLEM))
    received_us = _epoch_us(received_at)
    if timestamp_us is None:
        timestamp_us = received_us
    elif timestamp_us > received_us + MAX_FUTURE_US:
        problems.append(_detail("timestamp", FUTURE_PROBLEM))
    if isinstance(user_id, int):
        user_id = str(user_id)
    if user_id is not None and len(user_id) > 255:
        problems.append(_detail("user_id", USER_ID_PROBLEM))
    if problems:
        raise _reserved_refusal(problems)
    return {
        "event_id": str(uuid.uuid4()) if event_id is None else event_id,
        "event_name": name,
        "level": level,
        "user_id": user_id,
        "timestamp": timestamp_us,
    }


def apply_rules(entry: AppEntry, event_name: str, event: dict) -> dict:
    """Run the app's rules: reject rules refuse the event, warn rules annotate it."""
    rejections, warnings = [], []
    for rule in entry.rules_for(event_name):
        try:
            violations = rule.violations(event)
        except RuleFailed as failure:
            # A broken rule must not refuse (or lose) the app's events: it is skipped, and
            # the event says so in its warnings (README "Validation rules").
            warnings.append(failure.detail)
            continue
        (rejections if rule.action == "reject" else warnings).extend(violations)
    if rejections:
        raise ApiError(422, "validation_failed", "The event breaks the app's validation rules.", rejections)
    return {"status": "warning" if warnings else "valid", "warnings": warnings}


def check_event(entry: AppEntry, event, *, max_depth: int, received_at: datetime) -> dict:
    """Check one parsed event and return it as it travels to the workers."""
    if not isinstance(event, dict):
        raise ApiError(400, "not_an_object", "An event must be a JSON object.")
    check_depth(event, max_depth)
    return assemble_event(entry, reserved_fields(event, received_at), event, received_at)


def assemble_event(entry: AppEntry, fields: dict, event: dict, received_at: datetime,
                   seen_by_rules: dict | None = None) -> dict:
    """Run the app's rules on an event whose reserved fields are checked; return it as it travels to the workers.

    `event` is the payload stored; the rules see `seen_by_rules` instead when it is given (OTLP).
    """
    fields["validation"] = apply_rules(entry, fields["event_name"], event if seen_by_rules is None else seen_by_rules)
    fields["app_id"] = entry.id
    fields["received_at"] = _epoch_us(received_at)
    fields["payload"] = event
    return fields

