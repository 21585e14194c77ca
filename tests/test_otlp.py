"""OTLP/HTTP logs: the JSON mapping, the record-to-event mapping, and the route's answers (test client, real Redis/PG)."""
import base64
import gzip
import json
import math
import time

import pytest
from google.protobuf import json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from prometheus_client import REGISTRY

from app.ingest import otlp
from app.ingest.otlp import RecordMapper, otlp_json_to_request
from app.ingest.views import _log_record_check
from app.rules import AppEntry
from tests.conftest import free_port, sql
from tests.private_redis import isolated_app
from tests.test_ingest_api import assert_nothing_left, persist, queued

PROTOBUF, JSON = "application/x-protobuf", "application/json"
NOW_NS = time.time_ns()
TRACE_HEX, SPAN_HEX = "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174"
INT64_MAX = 2**63 - 1


# --- helpers ------------------------------------------------------------------------------

def any_value(value) -> AnyValue:
    """A Python value as an OTLP AnyValue (bytes stay bytes, dicts become kvlists)."""
    result = AnyValue()
    if isinstance(value, bool):
        result.bool_value = value
    elif isinstance(value, int):
        result.int_value = value
    elif isinstance(value, float):
        result.double_value = value
    elif isinstance(value, str):
        result.string_value = value
    elif isinstance(value, bytes):
        result.bytes_value = value
    elif isinstance(value, list):
        result.array_value.values.extend(any_value(item) for item in value)
    elif isinstance(value, dict):
        result.kvlist_value.values.extend(key_values(value))
    return result


def key_values(mapping: dict) -> list[KeyValue]:
    return [KeyValue(key=key, value=any_value(value)) for key, value in mapping.items()]


def record(body="hello", attributes=None, **fields) -> LogRecord:
    fields.setdefault("time_unix_nano", NOW_NS)
    log_record = LogRecord(attributes=key_values(attributes or {}), **fields)
    if body is not None:
        log_record.body.CopyFrom(any_value(body))
    return log_record


def export(*records, resource=None, scope=("my.scope", "1.2.3")) -> ExportLogsServiceRequest:
    request = ExportLogsServiceRequest()
    resource_logs = request.resource_logs.add()
    resource_logs.resource.attributes.extend(key_values(resource or {"service.name": "checkout"}))
    scope_logs = resource_logs.scope_logs.add()
    scope_logs.scope.name, scope_logs.scope.version = scope
    scope_logs.log_records.extend(records)
    return request


def as_json(request: ExportLogsServiceRequest) -> dict:
    """The OTLP JSON mapping of a request, written the way OTLP exporters write it (hex ids)."""
    document = json_format.MessageToDict(request)
    for resource_logs in document.get("resourceLogs", []):
        for scope_logs in resource_logs.get("scopeLogs", []):
            for log_record in scope_logs.get("logRecords", []):
                for field in ("traceId", "spanId"):
                    if field in log_record:
                        log_record[field] = base64.b64decode(log_record[field]).hex()
    return document


def post(client, app_id, key, request=None, *, encoding=PROTOBUF, raw=None, headers=None):
    if raw is None:
        raw = request.SerializeToString() if encoding == PROTOBUF else json.dumps(as_json(request))
    all_headers = {"Content-Type": encoding, **({"X-API-Key": key} if key else {}), **(headers or {})}
    return client.post(f"/api/otlp/{app_id}/v1/logs", data=raw, headers=all_headers)


def ok_response(response, encoding=PROTOBUF) -> ExportLogsServiceResponse:
    assert response.status_code == 200, response.data[:500]
    assert response.mimetype == encoding
    if encoding == JSON:
        return json_format.Parse(response.data, ExportLogsServiceResponse())
    return ExportLogsServiceResponse.FromString(response.data)


def status_of(response, http_status, code, grpc_code, encoding=PROTOBUF) -> status_pb2.Status:
    """The google.rpc.Status error body, in the request's encoding, with our error code in its ErrorInfo."""
    assert response.status_code == http_status, response.data[:500]
    assert response.mimetype == encoding
    if encoding == JSON:
        status = json_format.Parse(response.data, status_pb2.Status())
    else:
        status = status_pb2.Status.FromString(response.data)
    assert status.code == grpc_code and status.message
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.reason == code and info.domain == "intake"
    return status


def only_group(redis):
    """The events of the one group queued on batch_processing."""
    (message,) = queued(redis, "batch_processing")
    return json.loads(redis.hget("intake:pending:bodies", message[1]))["events"]


def rejected(reason) -> float:
    return REGISTRY.get_sample_value("intake_events_rejected_total", {"reason": reason}) or 0.0


def mapping(log_record, max_depth=10, **export_kwargs) -> tuple[RecordMapper, dict, dict]:
    """(the mapper, the payload as stored, the reserved fields) of one record, mapped as the route maps it."""
    (item,) = otlp.log_records(export(log_record, **export_kwargs))
    mapper = RecordMapper(max_depth)
    payload, reserved, _ = mapper.event(item)
    return mapper, payload, reserved


def mapped(log_record, max_depth=10, **export_kwargs):
    """(the event as the app's rules see it, event_id) of one record."""
    mapper, payload, reserved = mapping(log_record, max_depth, **export_kwargs)
    return mapper.seen_by_rules(payload, reserved), reserved["event_id"]


def stored_payload(log_record, **export_kwargs) -> dict:
    """The payload stored for one record."""
    return mapping(log_record, **export_kwargs)[1]


def reserved_of(log_record, **export_kwargs) -> dict:
    """The reserved fields the mapper gives checks.typed_reserved_fields for one record."""
    return mapping(log_record, **export_kwargs)[2]


@pytest.fixture
def app_key(make_app):
    return make_app()


# --- the OTLP JSON mapping ----------------------------------------------------------------

def test_json_mapping_reads_hex_ids_string_and_number_integers_enum_numbers_and_both_name_styles():
    document = {"resourceLogs": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "api"}}]},
        "scopeLogs": [{"scope": {"name": "s"}, "logRecords": [
            {"timeUnixNano": "1700000000000000001", "observedTimeUnixNano": 1700000000000000002,
             "severityNumber": 17, "severityText": "ERROR", "traceId": TRACE_HEX.upper(), "spanId": SPAN_HEX,
             "flags": 1, "eventName": "e", "body": {"stringValue": "x"},
             "attributes": [{"key": "n", "value": {"intValue": str(INT64_MAX)}},
                            {"key": "m", "value": {"intValue": -5}},
                            {"key": "b", "value": {"bytesValue": base64.b64encode(b"\x00\xff").decode()}}],
             "someFutureField": {"ignored": True}},
            {"time_unix_nano": "5", "severity_number": "SEVERITY_NUMBER_WARN", "trace_id": TRACE_HEX,
             "span_id": "", "event_name": "snake"},
        ]}],
    }]}
    (first, second) = otlp_json_to_request(document).resource_logs[0].scope_logs[0].log_records
    assert first.time_unix_nano == 1700000000000000001 and first.observed_time_unix_nano == 1700000000000000002
    assert first.severity_number == 17 and first.flags == 1 and first.event_name == "e"
    assert first.trace_id == bytes.fromhex(TRACE_HEX) and first.span_id == bytes.fromhex(SPAN_HEX)
    assert [kv.value.int_value for kv in first.attributes[:2]] == [INT64_MAX, -5]
    assert first.attributes[2].value.bytes_value == b"\x00\xff"
    assert second.time_unix_nano == 5 and second.severity_number == 13 and second.event_name == "snake"
    assert second.trace_id == bytes.fromhex(TRACE_HEX) and second.span_id == b""


@pytest.mark.parametrize("document", [
    [], "x", {"resourceLogs": 5}, {"resourceLogs": [5]},
    {"resourceLogs": [{"scopeLogs": [{"logRecords": [{"traceId": "xyz"}]}]}]},
    {"resourceLogs": [{"scopeLogs": [{"logRecords": [{"spanId": "abc"}]}]}]},  # odd number of digits
    {"resourceLogs": [{"scopeLogs": [{"logRecords": [{"timeUnixNano": "soon"}]}]}]},
    {"resourceLogs": [{"scopeLogs": [{"logRecords": [{"body": {"intValue": str(2**63)}}]}]}]},
    {"resourceLogs": [{"scopeLogs": [{"logRecords": [{"body": {"kvlistValue": {"values": [{"key": 1}]}}}]}]}]},
])
def test_json_mapping_refuses_what_is_not_an_export(document):
    with pytest.raises((ValueError, json_format.ParseError)):
        otlp_json_to_request(document)


# --- one record, one event ----------------------------------------------------------------

@pytest.mark.parametrize("number, level", [
    (1, "debug"), (4, "debug"), (5, "debug"), (8, "debug"), (9, "info"), (12, "info"), (13, "warning"),
    (16, "warning"), (17, "error"), (20, "error"), (21, "critical"), (24, "critical"),
])
def test_every_severity_range_maps_to_its_level(number, level):
    event, _ = mapped(record(severity_number=number, severity_text="ERROR"))  # the number wins over the text
    assert event["level"] == level and event["severity_number"] == number


@pytest.mark.parametrize("text, level", [
    ("WARN", "warning"), ("warning", "warning"), ("Error2", "error"), ("FATAL", "critical"), ("trace", "debug"),
    ("DEBUG4", "debug"), ("info", "info"), ("loud", "info"), ("", "info"),
])
def test_unspecified_severity_number_falls_through_to_the_text_then_info(text, level):
    event, _ = mapped(record(severity_number=0, severity_text=text))
    assert event["level"] == level
    assert event["severity_text"] == (text or None)


def test_attribute_types_become_plain_json():
    attributes = {"s": "text", "t": True, "f": False, "i": INT64_MAX, "neg": -(2**63), "d": 1.5, "raw": b"\x00\x01\xfe",
                  "list": [1, "a", [True, 2.5]], "map": {"k": "v", "inner": {"deep": [1, {"x": None}]}}, "empty": None}
    log_record = record(body={"msg": "hi", "n": 3}, attributes=attributes)
    log_record.attributes.add(key="unset")  # an AnyValue with nothing set
    event, _ = mapped(log_record)
    assert event["attributes"] == {
        "s": "text", "t": True, "f": False, "i": INT64_MAX, "neg": -(2**63), "d": 1.5,
        "raw": base64.b64encode(b"\x00\x01\xfe").decode(), "list": [1, "a", [True, 2.5]],
        "map": {"k": "v", "inner": {"deep": [1, {"x": None}]}}, "empty": None, "unset": None}
    assert event["body"] == {"msg": "hi", "n": 3}


def test_the_payload_and_reserved_fields_follow_the_contract_table():
    log_record = record(body="paid", attributes={"event.name": "from.attribute", "user.id": 42, "enduser.id": "x"},
                        time_unix_nano=1_700_000_000_123_456_789, observed_time_unix_nano=1_700_000_001_000_000_000,
                        severity_number=9, severity_text="INFO", trace_id=bytes.fromhex(TRACE_HEX),
                        span_id=bytes.fromhex(SPAN_HEX), flags=1, event_name="checkout.paid")
    event, event_id = mapped(log_record, resource={"service.name": "shop", "host.cpus": 4})
    assert event == {
        "body": "paid", "attributes": {"event.name": "from.attribute", "user.id": 42, "enduser.id": "x"},
        "resource": {"service.name": "shop", "host.cpus": 4}, "scope": {"name": "my.scope", "version": "1.2.3"},
        "trace_id": TRACE_HEX, "span_id": SPAN_HEX, "severity_text": "INFO", "severity_number": 9,
        "time_unix_nano": 1_700_000_000_123_456_789, "observed_time_unix_nano": 1_700_000_001_000_000_000, "flags": 1,
        "event_name": "checkout.paid", "level": "info", "timestamp": "2023-11-14T22:13:20.123456+00:00",
        "user_id": 42,
    }
    assert event_id.startswith("otlp-") and len(event_id) <= 128
    # Stored: the table's payload alone; the four reserved fields are the event's own columns.
    assert stored_payload(log_record, resource={"service.name": "shop", "host.cpus": 4}) == {
        key: value for key, value in event.items() if key not in ("event_name", "level", "timestamp", "user_id")}
    # What the checks take: the name and user id as the event has them, the time as epoch µs.
    assert reserved_of(log_record, resource={"service.name": "shop", "host.cpus": 4}) == {
        "event_id": event_id, "event_name": "checkout.paid", "level": "info", "user_id": 42,
        "timestamp_us": 1_700_000_000_123_456}


def test_event_name_and_user_id_fall_back_as_documented():
    event, _ = mapped(record(attributes={"event.name": "from.attribute", "enduser.id": "u-7"}))
    assert (event["event_name"], event["user_id"]) == ("from.attribute", "u-7")
    event, _ = mapped(record(attributes={"user.id": 1.5}))  # not a string or integer: an attribute only
    assert event["event_name"] == "log" and "user_id" not in event


def test_missing_times_ids_body_and_scope_are_null_and_the_id_is_random():
    event, event_id = mapped(record(body=None, time_unix_nano=0), scope=("", ""))
    assert event_id is None  # the route lets the checks make a random one
    assert "timestamp" not in event  # so the time received is used
    assert [event[k] for k in ("body", "trace_id", "span_id", "time_unix_nano", "observed_time_unix_nano",
                               "severity_text")] == [None] * 6
    assert event["scope"] == {"name": None, "version": None}
    # The observed time stands in for the time.
    event, event_id = mapped(record(time_unix_nano=0, observed_time_unix_nano=1_700_000_000_000_000_000))
    assert event["timestamp"] == "2023-11-14T22:13:20.000000+00:00" and event_id
    assert reserved_of(record(time_unix_nano=0))["timestamp_us"] is None
    assert reserved_of(record(time_unix_nano=0, observed_time_unix_nano=1_700_000_000_000_000_999))[
        "timestamp_us"] == 1_700_000_000_000_000


def test_the_event_id_is_a_hash_of_the_payload():
    first = mapped(record(attributes={"a": 1}))[1]
    assert mapped(record(attributes={"a": 1}))[1] == first
    assert mapped(record(attributes={"a": 2}))[1] != first
    assert mapped(record(attributes={"a": 1}), resource={"service.name": "other"})[1] != first


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinite_doubles_refuse_the_record(bad):
    for log_record in (record(body=bad), record(attributes={"x": [1, {"y": bad}]})):
        with pytest.raises(otlp.ApiError) as refused:
            mapped(log_record)
        assert (refused.value.status, refused.value.code) == (400, "invalid_json")


def test_nul_in_any_string_refuses_the_record():
    for log_record in (record(body="a\x00b"), record(attributes={"k\x00": 1}), record(severity_text="\x00"),
                       record(attributes={"m": {"k": ["\x00"]}}), record(event_name="e\x00"),
                       record(attributes={"user.id": "u\x00"})):
        with pytest.raises(otlp.ApiError) as refused:
            mapped(log_record)
        assert refused.value.code == "invalid_json"
    assert mapped(record(body="a backslash: \\u0000 is text"))[0]["body"] == "a backslash: \\u0000 is text"
    with pytest.raises(otlp.ApiError):
        mapped(record(body=None), resource={"service.name": "\x00"})


def nested_value(depth):
    value = 1
    for n in range(depth):
        value = [value] if n % 2 else {"k": value}
    return value


def test_max_depth_applies_to_the_body_and_each_attribute_value():
    assert mapped(record(body=nested_value(3), attributes={"a": nested_value(3)}), max_depth=3)[0]
    for log_record in (record(body=nested_value(4)), record(attributes={"a": nested_value(4)})):
        with pytest.raises(otlp.ApiError) as refused:
            mapped(log_record, max_depth=3)
        assert refused.value.code == "nesting_too_deep"


def test_the_same_record_in_either_encoding_is_the_same_event():
    request = export(record(attributes={"i": INT64_MAX, "b": b"\x01", "d": 0.1, "m": {"l": [1, "x"]}},
                            severity_number=13, trace_id=bytes.fromhex(TRACE_HEX), span_id=bytes.fromhex(SPAN_HEX),
                            observed_time_unix_nano=NOW_NS + 5, flags=1, event_name="e"))
    from_protobuf = otlp.decode(request.SerializeToString(), PROTOBUF)
    from_json = otlp.decode(json.dumps(as_json(request)).encode(), JSON)
    events = [RecordMapper(10).event(item)[:2] for item in otlp.log_records(from_protobuf) + otlp.log_records(from_json)]
    assert events[0] == events[1]


# --- the route ----------------------------------------------------------------------------

def test_protobuf_export_is_200_and_queues_one_event_per_record(client, app, app_key, redis):
    app_id, key = app_key
    request = export(record(body="one", severity_number=17, attributes={"user.id": "u1"}),
                     record(body="two", time_unix_nano=0))
    response = post(client, app_id, key, request)
    assert ok_response(response) == ExportLogsServiceResponse()  # no partialSuccess: everything accepted
    events = only_group(redis)
    assert [(e["event_name"], e["level"], e["user_id"], e["payload"]["body"]) for e in events] == [
        ("log", "error", "u1", "one"), ("log", "info", None, "two")]
    assert events[0]["event_id"].startswith("otlp-") and not events[1]["event_id"].startswith("otlp-")
    assert events[0]["timestamp"] == NOW_NS // 1000
    assert persist(app, "batch_processing", queued(redis, "batch_processing")[0][1]) == "stored"
    rows = sql("SELECT event_id, payload->>'body' FROM events WHERE app_id = %s ORDER BY 2", app_id)
    assert rows == [(events[0]["event_id"], "one"), (events[1]["event_id"], "two")]


def test_json_export_is_200_in_json_and_gives_the_same_events(client, app_key, redis):
    app_id, key = app_key
    request = export(record(attributes={"n": INT64_MAX}, trace_id=bytes.fromhex(TRACE_HEX)))
    assert ok_response(post(client, app_id, key, request), PROTOBUF) == ExportLogsServiceResponse()
    assert ok_response(post(client, app_id, key, request, encoding=JSON), JSON) == ExportLogsServiceResponse()
    (first, second) = [json.loads(redis.hget("intake:pending:bodies", m[1]))["events"][0]
                       for m in queued(redis, "batch_processing")]
    for event in (first, second):
        event.pop("received_at")
    assert first == second and first["payload"]["attributes"]["n"] == INT64_MAX
    assert first["payload"]["trace_id"] == TRACE_HEX


def test_gzip_export_is_accepted(client, app_key, redis):
    app_id, key = app_key
    response = post(client, app_id, key, raw=gzip.compress(export(record()).SerializeToString()),
                    headers={"Content-Encoding": "gzip"})
    ok_response(response)
    assert len(only_group(redis)) == 1


def test_refused_records_give_a_partial_success_naming_the_reasons_and_are_counted(client, make_app, redis):
    app_id, key = make_app(rules=[{"name": "needs order", "action": "reject", "event_name": "paid",
                                   "schema": {"required": ["attributes"], "properties": {
                                       "attributes": {"required": ["order"]}}}}])
    nan, invalid = rejected("invalid_json"), rejected("validation_failed")
    request = export(record(body="fine"), record(body=math.nan), record(event_name="paid"),
                     record(event_name="paid", attributes={"order": 7}))
    for encoding in (PROTOBUF, JSON):
        answer = ok_response(post(client, app_id, key, request, encoding=encoding), encoding)
        assert answer.partial_success.rejected_log_records == 2
        message = answer.partial_success.error_message
        assert "2 of 4 log records" in message and "record 1: invalid_json" in message
        assert "record 2: validation_failed" in message
    assert rejected("invalid_json") == nan + 2 and rejected("validation_failed") == invalid + 2
    groups = [json.loads(redis.hget("intake:pending:bodies", m[1]))["events"] for m in queued(redis, "batch_processing")]
    assert [[e["payload"]["body"] for e in events] for events in groups] == [["fine", "hello"]] * 2


def test_rules_see_the_reserved_fields_that_the_stored_payload_leaves_to_the_columns(client, make_app, redis):
    app_id, key = make_app(rules=[{"name": "errors of users", "action": "reject", "event_name": "log", "schema": {
        "required": ["event_name", "level", "timestamp", "user_id"], "properties": {"level": {"const": "error"}}}}])
    request = export(record(body="info", severity_number=9, attributes={"user.id": "u1"}),
                     record(body="error", severity_number=17, attributes={"user.id": "u1"}))
    assert ok_response(post(client, app_id, key, request)).partial_success.rejected_log_records == 1
    (message,) = queued(redis, "batch_processing")
    (event,) = json.loads(redis.hget("intake:pending:bodies", message[1]))["events"]
    assert (event["payload"]["body"], event["event_name"], event["level"], event["user_id"]) == ("error", "log",
                                                                                               "error", "u1")
    assert not {"event_name", "level", "timestamp", "user_id"} & event["payload"].keys()


def test_reserved_field_problems_refuse_the_record_with_the_json_routes_details(client, app, app_key, redis):
    app_id, key = app_key
    future_ns = time.time_ns() + 11 * 60 * 10**9
    bad = {"name": record(event_name="n" * 256), "user": record(attributes={"user.id": "u" * 256}),
           "time": record(time_unix_nano=future_ns), "all": record(event_name="n" * 256, time_unix_nano=future_ns,
                                                                   attributes={"enduser.id": "u" * 256})}
    check, details = _log_record_check(AppEntry(app_id, "hash", ()), app.config), {}
    for name, log_record in bad.items():
        (item,) = otlp.log_records(export(log_record))
        with pytest.raises(otlp.ApiError) as refused:
            check(item)
        assert (refused.value.status, refused.value.code) == (422, "invalid_event")
        details[name] = refused.value.details
    # The same words, in the same order, as the JSON route's for the same fields.
    response = client.post(f"/api/logs/{app_id}", headers={"X-API-Key": key}, json={
        "event_name": "n" * 256, "timestamp": future_ns // 10**9, "user_id": "u" * 256})
    assert response.status_code == 422 and details["all"] == response.get_json()["error"]["details"]
    assert details["all"] == details["name"] + details["time"] + details["user"]
    assert [d["path"] for d in details["all"]] == ["/event_name", "/timestamp", "/user_id"]
    # Within ten minutes is accepted, as on the JSON route; and 255 characters are.
    fine = export(record(time_unix_nano=time.time_ns() + 9 * 60 * 10**9, event_name="n" * 255,
                         attributes={"user.id": "u" * 255}))
    assert not ok_response(post(client, app_id, key, fine)).HasField("partial_success")


def test_an_export_with_every_record_refused_is_200_with_all_rejected_and_queues_nothing(client, app_key, redis):
    app_id, key = app_key
    answer = ok_response(post(client, app_id, key, export(record(body=math.inf), record(body="\x00"))))
    assert answer.partial_success.rejected_log_records == 2
    assert not answer.partial_success.error_message.endswith("more")
    assert_nothing_left(redis)


def test_the_partial_success_message_names_the_first_three_reasons(client, app_key, redis):
    app_id, key = app_key
    answer = ok_response(post(client, app_id, key, export(*[record(body=math.nan)] * 5)))
    assert answer.partial_success.rejected_log_records == 5
    assert answer.partial_success.error_message.count("invalid_json") == 3
    assert answer.partial_success.error_message.endswith("and 2 more")


@pytest.mark.parametrize("encoding", [PROTOBUF, JSON])
def test_an_empty_export_is_200(client, app_key, redis, encoding):
    app_id, key = app_key
    for raw in ((b"" if encoding == PROTOBUF else b"{}"), None):
        response = post(client, app_id, key, ExportLogsServiceRequest(), encoding=encoding, raw=raw)
        assert ok_response(response, encoding) == ExportLogsServiceResponse()
    assert_nothing_left(redis)


@pytest.mark.parametrize("encoding", [PROTOBUF, JSON])
def test_app_and_key_errors_are_a_status_in_the_requests_encoding(client, app_key, redis, encoding):
    app_id, key = app_key
    request = export(record())
    status_of(post(client, "no-such-app", key, request, encoding=encoding), 404, "app_not_found",
              code_pb2.NOT_FOUND, encoding)
    status_of(post(client, app_id, None, request, encoding=encoding), 401, "invalid_api_key",
              code_pb2.UNAUTHENTICATED, encoding)
    status_of(post(client, app_id, "wrong", request, encoding=encoding), 401, "invalid_api_key",
              code_pb2.UNAUTHENTICATED, encoding)
    assert_nothing_left(redis)


@pytest.mark.parametrize("content_type", ["text/plain", "application/protobuf", "application/x-www-form-urlencoded",
                                          None])
def test_other_content_types_are_415(client, app_key, redis, content_type):
    app_id, key = app_key
    headers = {"X-API-Key": key, **({"Content-Type": content_type} if content_type else {})}
    response = client.post(f"/api/otlp/{app_id}/v1/logs", data=export(record()).SerializeToString(), headers=headers)
    status_of(response, 415, "unsupported_media_type", code_pb2.INVALID_ARGUMENT)
    assert_nothing_left(redis)


@pytest.mark.parametrize("encoding", [PROTOBUF, JSON])
def test_content_encodings_other_than_gzip_are_415_and_bad_gzip_is_400(client, app_key, redis, encoding):
    app_id, key = app_key
    request = export(record())
    status_of(post(client, app_id, key, request, encoding=encoding, headers={"Content-Encoding": "br"}), 415,
              "unsupported_encoding", code_pb2.INVALID_ARGUMENT, encoding)
    status_of(post(client, app_id, key, request, encoding=encoding, raw=b"not gzip",
                   headers={"Content-Encoding": "gzip"}), 400, "invalid_encoding", code_pb2.INVALID_ARGUMENT, encoding)
    assert_nothing_left(redis)


@pytest.mark.parametrize("encoding, raw, code", [
    (PROTOBUF, b"\xff\xff\xff", "invalid_body"),
    (PROTOBUF, b"\x0a\x05\x12\x03\x1a\x01", "invalid_body"),  # truncated
    (PROTOBUF, export(record(body="\u00e9")).SerializeToString().replace(b"\xc3\xa9", b"\xc3\x28"), "invalid_body"),
    (JSON, b'{"resourceLogs": [', "invalid_json"),
    (JSON, b'{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"traceId": "not hex"}]}]}]}', "invalid_body"),
    (JSON, b'{"resourceLogs": {"a": 1}}', "invalid_body"),
    (JSON, b'[1, 2]', "invalid_body"),
    (JSON, b'{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"body": "a string, not an AnyValue"}]}]}]}',
     "invalid_body"),
    (JSON, b'{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"body": ' + b'{"arrayValue": {"values": [' * 200
     + b"]}}" * 200 + b"}]}]}]}", "invalid_body"),
    (JSON, b'{"a": "\\ud800"}', "invalid_json"),
], ids=lambda value: "body" if isinstance(value, bytes) else None)
def test_a_body_that_cannot_be_decoded_is_400(client, app_key, redis, encoding, raw, code):
    app_id, key = app_key
    status_of(post(client, app_id, key, encoding=encoding, raw=raw), 400, code, code_pb2.INVALID_ARGUMENT, encoding)
    assert_nothing_left(redis)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, written by hand: the SDK refuses to write what we test here."""
    size, length = len(payload), b""
    while True:
        byte, size = size & 0x7F, size >> 7
        length += bytes([byte | (0x80 if size else 0)])
        if not size:
            return bytes([number << 3 | 2]) + length + payload


def test_a_deeply_nested_protobuf_body_is_400_not_a_crash(client, app_key, redis):
    app_id, key = app_key
    value = AnyValue(string_value="x").SerializeToString()
    for _ in range(150):
        value = _field(5, _field(1, value))  # AnyValue.array_value -> ArrayValue.values
    raw = _field(1, _field(2, _field(2, _field(5, value))))  # resource_logs -> scope_logs -> log_records -> body
    status_of(post(client, app_id, key, raw=raw), 400, "invalid_body", code_pb2.INVALID_ARGUMENT)
    assert_nothing_left(redis)


def test_over_the_byte_limit_is_413_before_and_after_inflating(client, app_key, redis):
    app_id, key = app_key
    limit = 5 * 1024 * 1024
    big = export(record(body="x" * (limit + 10))).SerializeToString()
    status_of(post(client, app_id, key, raw=big), 413, "payload_too_large", code_pb2.INVALID_ARGUMENT)
    status_of(post(client, app_id, key, raw=gzip.compress(big), headers={"Content-Encoding": "gzip"}), 413,
              "payload_too_large", code_pb2.INVALID_ARGUMENT)
    assert_nothing_left(redis)


def test_more_records_than_the_batch_limit_is_413_and_the_limit_itself_is_accepted(client, app_key, redis):
    app_id, key = app_key
    too_large = rejected("payload_too_large")
    records = [record(attributes={"n": n}) for n in range(1001)]
    status_of(post(client, app_id, key, export(*records)), 413, "payload_too_large", code_pb2.INVALID_ARGUMENT)
    assert rejected("payload_too_large") == too_large + 1001
    assert_nothing_left(redis)
    ok_response(post(client, app_id, key, export(*records[:1000])))
    assert len(only_group(redis)) == 1000


def test_a_record_over_the_event_limit_is_refused_alone(client, app_key, redis):
    app_id, key = app_key
    answer = ok_response(post(client, app_id, key, export(record(body="x" * (1024 * 1024)), record(body="small"))))
    assert answer.partial_success.rejected_log_records == 1
    assert "record 0: payload_too_large" in answer.partial_success.error_message
    assert [e["payload"]["body"] for e in only_group(redis)] == ["small"]


def test_a_retried_export_has_the_same_event_ids_and_is_stored_once(client, app, app_key, redis):
    app_id, key = app_key
    request = export(record(body="a"), record(body="b"))
    for encoding in (PROTOBUF, JSON, PROTOBUF):
        ok_response(post(client, app_id, key, request, encoding=encoding), encoding)
    groups = [m[1] for m in queued(redis, "batch_processing")]
    ids = [[e["event_id"] for e in json.loads(redis.hget("intake:pending:bodies", g))["events"]] for g in groups]
    assert ids[0] == ids[1] == ids[2] and len(set(ids[0])) == 2
    for group in groups:
        persist(app, "batch_processing", group)
    assert sql("SELECT count(*) FROM events WHERE app_id = %s", app_id) == [(2,)]


def test_rate_limit_counts_records_and_answers_429_with_retry_after_one(make_app, redis):
    limited = isolated_app({"INGEST_RATE_LIMIT": "5/minute"}).test_client()
    app_id, key = make_app()
    ok_response(post(limited, app_id, key, export(*[record(attributes={"n": n}) for n in range(4)])))
    response = post(limited, app_id, key, export(record(attributes={"n": 4}), record(attributes={"n": 5})))
    status_of(response, 429, "rate_limited", code_pb2.RESOURCE_EXHAUSTED)
    assert response.headers["Retry-After"] == "1" and response.headers["RateLimit-Remaining"] == "1"
    ok_response(post(limited, app_id, key, export(record(attributes={"n": 4}))))


@pytest.mark.parametrize("encoding", [PROTOBUF, JSON])
def test_broker_down_is_503_with_retry_after_one_within_two_seconds(app, make_app, redis, encoding):
    closed = f"redis://127.0.0.1:{free_port()}/0"
    down = isolated_app({"REDIS_URL": closed, "CELERY_BROKER_URL": closed}).test_client()
    app_id, key = make_app()
    started = time.monotonic()
    response = post(down, app_id, key, export(record()), encoding=encoding)
    assert time.monotonic() - started < 2
    status_of(response, 503, "queue_unavailable", code_pb2.UNAVAILABLE, encoding)
    assert response.headers["Retry-After"] == "1"
    assert_nothing_left(redis)


def test_metrics_label_the_route_by_its_url_rule(client, app_key):
    app_id, key = app_key
    labels = {"method": "POST", "route": "/api/otlp/<app_id>/v1/logs", "status": "200"}
    before = REGISTRY.get_sample_value("intake_http_requests_total", labels) or 0.0
    ok_response(post(client, app_id, key, export(record())))
    assert REGISTRY.get_sample_value("intake_http_requests_total", labels) == before + 1
