"""OTLP/HTTP logs: decode an ExportLogsServiceRequest, map each log record to an event, answer in kind.

The body is decoded by opentelemetry-proto's generated classes (protobuf) or, for the
OTLP JSON mapping, by protobuf's json_format after `otlp_json_to_request` has handled
the mapping's one difference from proto3 JSON (hex trace and span ids). Either way the
records are read from the same message, so the same record in either encoding becomes
the same event (API.md section 4, "POST /api/otlp/<app_id>/v1/logs").
"""
import base64
import hashlib
import math
import re
from datetime import datetime, timezone

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse

from app.errors import ApiError
from app.ingest import checks
from app.ingest.checks import LEVELS

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
ENCODINGS = (PROTOBUF, JSON)
# How many refused records the partialSuccess message names.
REASONS_NAMED = 3
EVENT_ID_PREFIX = "otlp-"
HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")
# severityNumber ranges (OTel log data model): 1-4 TRACE, 5-8 DEBUG, 9-12 INFO, 13-16 WARN, 17-20 ERROR, 21-24 FATAL.
SEVERITY_LEVELS = ("debug",) * 8 + ("info",) * 4 + ("warning",) * 4 + ("error",) * 4 + ("critical",) * 4
# severityText as OTel writes it ("WARN", "ERROR2", "Trace") read as one of our levels.
SEVERITY_TEXT = re.compile(r"([a-z]+)\d*")
TEXT_LEVELS = {**LEVELS, "trace": "debug", "information": "info"}
GRPC_CODES = {
    400: code_pb2.INVALID_ARGUMENT, 401: code_pb2.UNAUTHENTICATED, 403: code_pb2.PERMISSION_DENIED,
    404: code_pb2.NOT_FOUND, 405: code_pb2.UNIMPLEMENTED, 413: code_pb2.INVALID_ARGUMENT,
    415: code_pb2.INVALID_ARGUMENT, 422: code_pb2.INVALID_ARGUMENT, 429: code_pb2.RESOURCE_EXHAUSTED,
    500: code_pb2.INTERNAL, 503: code_pb2.UNAVAILABLE,
}
_ID_FIELDS = ("traceId", "trace_id", "spanId", "span_id")


# --- decoding -------------------------------------------------------------------------

def request_encoding(mimetype: str) -> str:
    """The request's encoding (PROTOBUF or JSON), or 415 for any other content type."""
    if mimetype not in ENCODINGS:
        raise ApiError(415, "unsupported_media_type",
                       f"Send OTLP logs as '{PROTOBUF}' or '{JSON}' (the OTLP JSON mapping).")
    return mimetype


def answer_encoding(mimetype: str) -> str:
    """The encoding of the answer: the request's, protobuf (OTLP's default) when it is neither."""
    return JSON if mimetype == JSON else PROTOBUF


def decode(body: bytes, encoding: str) -> ExportLogsServiceRequest:
    """The ExportLogsServiceRequest in the body, or 400 `invalid_body` when it cannot be decoded."""
    if encoding == PROTOBUF:
        try:
            return ExportLogsServiceRequest.FromString(body)
        except DecodeError as error:
            raise ApiError(400, "invalid_body", f"The body is not an OTLP ExportLogsServiceRequest: {error}.") from None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise ApiError(400, "invalid_json", f"The body is not valid JSON: {error}.") from None
    try:
        return otlp_json_to_request(document)
    except (json_format.ParseError, ValueError, TypeError) as error:
        raise ApiError(400, "invalid_body", f"The body is not an OTLP ExportLogsServiceRequest: {error}.") from None


def otlp_json_to_request(document) -> ExportLogsServiceRequest:
    """Read the OTLP JSON mapping of an ExportLogsServiceRequest; raise ValueError/ParseError if it is not one.

    protobuf's json_format reads the rest of the mapping as it is: lowerCamelCase names (and
    the proto's snake_case ones, as the Collector does), 64-bit integers as strings or
    numbers, enums as numbers (or names), bytes as base64, unknown fields ignored (OTLP says
    receivers must). What it would get wrong are trace and span ids: hex in OTLP JSON,
    base64 in proto3 JSON. So those are turned into base64 first, in place.
    """
    if not isinstance(document, dict):
        raise ValueError("an ExportLogsServiceRequest is a JSON object")
    for resource_logs in _items(document, "resourceLogs", "resource_logs"):
        for scope_logs in _items(resource_logs, "scopeLogs", "scope_logs"):
            for record in _items(scope_logs, "logRecords", "log_records"):
                if isinstance(record, dict):
                    # json_format would read a string here as an object of unknown fields: an empty body.
                    if not isinstance(record.get("body", {}), (dict, type(None))):
                        raise ValueError('body must be an AnyValue object, e.g. {"stringValue": "…"}')
                    for field in _ID_FIELDS:
                        if isinstance(record.get(field), str):
                            record[field] = _hex_to_base64(record[field], field)
    return json_format.ParseDict(document, ExportLogsServiceRequest(), ignore_unknown_fields=True)


def _items(node, *names):
    # Anything but a list is left where it is, for json_format to refuse with its own message.
    if isinstance(node, dict):
        for name in names:
            value = node.get(name)
            if isinstance(value, list):
                yield from value


def _hex_to_base64(value: str, field: str) -> str:
    if not HEX.fullmatch(value):
        raise ValueError(f"{field} must be hex digits (OTLP JSON), e.g. 5b8efff798038103d269b633813fc60c")
    return base64.b64encode(bytes.fromhex(value)).decode()


def log_records(export: ExportLogsServiceRequest) -> list[tuple]:
    """Every log record of the request as (resource, scope, record), in order."""
    records = []
    for resource_logs in export.resource_logs:
        resource = resource_logs.resource
        for scope_logs in resource_logs.scope_logs:
            scope = scope_logs.scope
            records.extend((resource, scope, record) for record in scope_logs.log_records)
    return records


# --- one record, one event ------------------------------------------------------------

class RecordMapper:
    """Maps log records to events (the contract's table); resources and scopes are converted once per request."""

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self._converted = {}  # id(Resource or scope) -> its JSON, or the ApiError that refuses its records
        self._second, self._second_text = None, ""

    def event(self, item: tuple) -> tuple[dict, dict, bytes]:
        """(the payload as stored, its reserved fields for typed_reserved_fields, the payload's canonical JSON)."""
        resource, scope, record = item
        body = record.body  # unset: an empty AnyValue, which _value reads as None
        payload = {
            "body": body.string_value or self._value(body, self.max_depth),
            "attributes": self._attributes(record.attributes, self.max_depth),
            "resource": self._once(resource, self._resource),
            "scope": self._once(scope, _scope),
            "trace_id": record.trace_id.hex() or None,
            "span_id": record.span_id.hex() or None,
            "severity_text": record.severity_text or None,
            "severity_number": record.severity_number,
            "time_unix_nano": record.time_unix_nano or None,
            "observed_time_unix_nano": record.observed_time_unix_nano or None,
            "flags": record.flags,
        }
        canonical = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
        # One look for NUL in every string and key at once: orjson writes it as \u0000. (An
        # escaped backslash before "u0000" matches too; parse_json then looks closer.)
        if b"\\u0000" in canonical:
            checks.parse_json(canonical)
        nanos = record.time_unix_nano or record.observed_time_unix_nano
        # Never the time received: a retried export must give the same id. Without either
        # time nothing tells two identical records apart, so such records are not deduplicated.
        event_id = EVENT_ID_PREFIX + hashlib.sha256(canonical).hexdigest() if nanos else None
        attributes = payload["attributes"]
        reserved = {"event_id": event_id, "event_name": _event_name(record, attributes),
                    "level": _level(record.severity_number, payload["severity_text"]), "user_id": _user_id(attributes),
                    "timestamp_us": nanos // 1000 if nanos else None}  # None: the time received
        return payload, reserved, canonical

    def seen_by_rules(self, payload: dict, reserved: dict) -> dict:
        """What the app's rules see: the payload with the reserved fields added at its top level (API.md)."""
        # Only for an app with rules: the stored payload is the contract's table alone (the
        # reserved fields are the event's own columns), 100 bytes a record less to carry and store.
        seen = {**payload, "event_name": reserved["event_name"], "level": reserved["level"]}
        if reserved["timestamp_us"] is not None:
            seen["timestamp"] = self._iso(reserved["timestamp_us"])
        if reserved["user_id"] is not None:
            seen["user_id"] = reserved["user_id"]
        return seen

    def _once(self, message, convert):
        # Every record of a ResourceLogs (ScopeLogs) shares its resource (scope): convert it once.
        converted = self._converted.get(id(message))
        if converted is None:
            try:
                converted = convert(message)
            except ApiError as error:
                converted = error
            self._converted[id(message)] = converted
        if isinstance(converted, ApiError):
            raise converted
        return converted

    def _resource(self, resource) -> dict:
        return self._attributes(resource.attributes, self.max_depth)

    def _attributes(self, key_values, levels_left: int) -> dict:
        attributes = {}
        for kv in key_values:
            value = kv.value
            # Most attribute values are strings: reading the field is cheaper than asking
            # which one is set, and a non-empty string can only be the one set.
            attributes[kv.key] = value.string_value or self._value(value, levels_left)
        return attributes

    def _value(self, value, levels_left: int):
        """An AnyValue as plain JSON; arrays and kvlists may nest `levels_left` levels deep."""
        kind = value.WhichOneof("value")
        if kind == "string_value":
            return value.string_value
        if kind == "int_value" or kind == "bool_value":
            return getattr(value, kind)
        if kind == "double_value":
            number = value.double_value
            if not math.isfinite(number):
                raise ApiError(400, "invalid_json", "NaN and Infinity cannot be stored: send such doubles as strings.")
            return number
        if kind is None:
            return None
        if kind == "bytes_value":
            return base64.b64encode(value.bytes_value).decode()
        if levels_left < 1:
            raise ApiError(422, "nesting_too_deep",
                           f"The body or an attribute value is nested more than {self.max_depth} levels deep.")
        if kind == "array_value":
            return [item.string_value or self._value(item, levels_left - 1) for item in value.array_value.values]
        return self._attributes(value.kvlist_value.values, levels_left - 1)

    def _iso(self, timestamp_us: int) -> str:
        """The time as ISO 8601 in UTC, to the microsecond; the records of an export mostly share their second."""
        seconds, micros = divmod(timestamp_us, 1_000_000)
        if seconds != self._second:
            moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
            self._second, self._second_text = seconds, moment.strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._second_text}.{micros:06d}+00:00"


def _scope(scope) -> dict:
    return {"name": scope.name or None, "version": scope.version or None}


def _text(text: str) -> str:
    if "\x00" in text:
        raise ApiError(400, "invalid_json", "Strings may not contain NUL (\\u0000): PostgreSQL cannot store it.")
    return text


def _event_name(record, attributes: dict) -> str:
    name = record.event_name
    if name.strip():
        return _text(name)
    name = attributes.get("event.name")
    return name if isinstance(name, str) and name.strip() else "log"


def _level(number: int, text: str | None) -> str:
    if 1 <= number <= 24:
        return SEVERITY_LEVELS[number - 1]
    if text:
        match = SEVERITY_TEXT.fullmatch(text.strip().lower())
        if match and match.group(1) in TEXT_LEVELS:
            return TEXT_LEVELS[match.group(1)]
    return "info"


def _user_id(attributes: dict):
    # Only what user_id accepts (a string or an integer); anything else stays an attribute only,
    # rather than refusing a log record over an attribute of another type.
    for key in ("user.id", "enduser.id"):
        value = attributes.get(key)
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            return value
    return None


# --- answers --------------------------------------------------------------------------

def export_response(records: int, rejected: list[dict], encoding: str) -> tuple[bytes, int, dict]:
    """200 with an ExportLogsServiceResponse; partialSuccess names the first refused records' reasons."""
    response = ExportLogsServiceResponse()
    if rejected:
        reasons = "; ".join(f"record {item['index']}: {item['error']['code']}: {item['error']['message']}"
                            for item in rejected[:REASONS_NAMED])
        more = f"; and {len(rejected) - REASONS_NAMED} more" if len(rejected) > REASONS_NAMED else ""
        response.partial_success.rejected_log_records = len(rejected)
        response.partial_success.error_message = (f"{len(rejected)} of {records} log records were refused "
                                                  f"(records numbered in request order from 0): {reasons}{more}")
    return _serialize(response, encoding), 200, {"Content-Type": encoding}


def status_body(status: int, code: str, message: str, encoding: str) -> bytes:
    """A google.rpc.Status for an error answer; its ErrorInfo's reason is our error code."""
    body = status_pb2.Status(code=GRPC_CODES.get(status, code_pb2.UNKNOWN), message=message)
    body.details.add().Pack(error_details_pb2.ErrorInfo(reason=code, domain="intake"))
    return _serialize(body, encoding)


def _serialize(message, encoding: str) -> bytes:
    if encoding == JSON:
        return json_format.MessageToJson(message, indent=None).encode()
    return message.SerializeToString()
