"""End to end: the OpenTelemetry Python SDK exports logs to a real gunicorn and Celery worker, which store them."""
import json
import threading
import time

import pytest
import redis as redis_lib
import requests
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

from tests.conftest import sql, wait_until
from tests.private_redis import PrivateRedis
from tests.test_otlp import INT64_MAX, as_json, export, record

TRACE_ID, SPAN_ID = 0x5B8EFFF798038103D269B633813FC60C, 0xEEE19B7EC3C1B174
COLUMNS = "event_id, event_name, level, user_id, timestamp, validation, payload"


def provider_for(service: str, exporter: OTLPLogExporter) -> LoggerProvider:
    provider = LoggerProvider(resource=Resource.create({"service.name": service}))
    provider.add_log_record_processor(BatchLogRecordProcessor(exporter, schedule_delay_millis=100))
    return provider


def stored(app_id, extra="") -> list[tuple]:
    return sql(f"SELECT {COLUMNS} FROM events WHERE app_id = %s {extra} ORDER BY event_id", app_id)


def nothing_pending(env) -> bool:
    return redis_lib.Redis.from_url(env["REDIS_URL"]).hlen("intake:pending:bodies") == 0


def test_the_sdk_exports_through_the_documented_variables_and_records_are_stored_mapped(stack, make_app,
                                                                                       monkeypatch):
    app_id, key = make_app()
    stack.web()
    stack.worker(queues="batch_processing")
    # Exactly the README's set-up: the endpoint and the key header from the environment.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", f"{stack.base_url}/api/otlp/{app_id}/v1/logs")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"x-api-key={key}")
    provider = provider_for("checkout", OTLPLogExporter())
    logger = provider.get_logger("shop.payments", "2.0.1")
    span = set_span_in_context(NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, False, TraceFlags(1))))
    logger.emit(timestamp=1_700_000_000_123_456_789, severity_number=SeverityNumber.ERROR, severity_text="ERROR",
                body={"message": "card declined", "codes": [51, 5]}, event_name="payment.declined",
                attributes={"user.id": "u-42", "amount": 12.5, "big": INT64_MAX, "ok": False,
                            "tags": ["a", "b"], "raw": b"\x00\xff"}, context=span)
    logger.emit(severity_number=SeverityNumber.TRACE2, body="tick")
    logger.emit(severity_text="WARN", body="disk 91% full", attributes={"enduser.id": "ops"})
    assert provider.force_flush(20_000)
    provider.shutdown()

    rows = wait_until(lambda: len(r := stored(app_id)) == 3 and r, timeout=30, message="3 stored log records")
    by_name = {(row[1], row[2]): row for row in rows}
    event_id, _, _, user_id, timestamp, validation, payload = by_name[("payment.declined", "error")]
    assert event_id.startswith("otlp-") and user_id == "u-42" and validation == {"status": "valid", "warnings": []}
    assert timestamp.isoformat() == "2023-11-14T22:13:20.123456+00:00"
    assert payload["body"] == {"message": "card declined", "codes": [51, 5]}
    assert payload["attributes"] == {"user.id": "u-42", "amount": 12.5, "big": INT64_MAX, "ok": False,
                                     "tags": ["a", "b"], "raw": "AP8="}
    assert payload["resource"]["service.name"] == "checkout"
    assert payload["scope"] == {"name": "shop.payments", "version": "2.0.1"}
    assert (payload["trace_id"], payload["span_id"], payload["flags"]) == (f"{TRACE_ID:032x}", f"{SPAN_ID:016x}", 1)
    assert (payload["severity_number"], payload["severity_text"]) == (17, "ERROR")
    assert payload["time_unix_nano"] == 1_700_000_000_123_456_789 and payload["observed_time_unix_nano"]
    tick = by_name[("log", "debug")][6]
    assert tick["body"] == "tick" and tick["trace_id"] is None and tick["span_id"] is None
    assert tick["time_unix_nano"] is None and tick["observed_time_unix_nano"]  # the SDK sets the observed time
    warning = by_name[("log", "warning")]
    assert warning[3] == "ops" and warning[6]["body"] == "disk 91% full"


def test_the_same_export_as_protobuf_and_as_json_stores_identical_events_once(stack, make_app):
    first_app, first_key = make_app()
    second_app, second_key = make_app()
    stack.web()
    stack.worker(queues="batch_processing")
    request = export(record(body="one", attributes={"n": INT64_MAX, "d": 0.25, "m": {"l": [True]}}, severity_number=21,
                            trace_id=TRACE_ID.to_bytes(16, "big"), span_id=SPAN_ID.to_bytes(8, "big"),
                            event_name="e"),
                     record(body="two", attributes={"enduser.id": 9}, time_unix_nano=0,
                            observed_time_unix_nano=1_700_000_000_000_000_000, severity_text="warn"))

    def send(app_id, key, encoding):
        data = request.SerializeToString() if encoding == "protobuf" else json.dumps(as_json(request))
        response = requests.post(f"{stack.base_url}/api/otlp/{app_id}/v1/logs", data=data, timeout=10,
                                 headers={"Content-Type": f"application/{'x-protobuf' if encoding == 'protobuf' else 'json'}",
                                          "X-API-Key": key})
        assert response.status_code == 200 and response.content in (b"", b"{}"), response.content

    send(first_app, first_key, "protobuf")
    send(second_app, second_key, "json")
    wait_until(lambda: len(stored(first_app)) == 2 and len(stored(second_app)) == 2, message="both exports stored")
    assert stored(first_app) == stored(second_app)
    (one, two) = sorted(stored(first_app), key=lambda row: row[6]["body"])
    assert (one[1], one[2], two[2], two[3]) == ("e", "critical", "warning", "9")
    # The exporter retries (in either encoding): nothing is stored twice.
    send(first_app, first_key, "json")
    send(first_app, first_key, "protobuf")
    wait_until(lambda: nothing_pending(stack.env), message="the retries handled")
    assert stored(first_app) == stored(second_app)


@pytest.fixture
def private_broker(tmp_path):
    server = PrivateRedis(tmp_path).start()
    yield server
    server.stop()


def test_the_exporter_rides_out_a_broker_outage(stack, make_app, private_broker):
    app_id, key = make_app()
    env = {"REDIS_URL": private_broker.url, "CELERY_BROKER_URL": private_broker.url}
    web = stack.web(**env)
    stack.worker(queues="batch_processing", **env)
    exporter = OTLPLogExporter(endpoint=f"{stack.base_url}/api/otlp/{app_id}/v1/logs", headers={"x-api-key": key})
    provider = provider_for("outage", exporter)
    logger = provider.get_logger("outage")
    logger.emit(body="before", severity_number=SeverityNumber.INFO)
    assert provider.force_flush(20_000)
    wait_until(lambda: len(stored(app_id)) == 1, message="the record sent before the outage")

    private_broker.stop()
    for n in range(5):
        logger.emit(body=f"during {n}", severity_number=SeverityNumber.WARN)
    flushed = {}
    flusher = threading.Thread(target=lambda: flushed.setdefault("ok", provider.force_flush(30_000)))
    flusher.start()
    time.sleep(2.5)  # the exporter is answered 503 with Retry-After: 1 and retries
    private_broker.start()
    flusher.join(30)
    assert flushed.get("ok"), "the exporter gave up"
    provider.shutdown()
    rows = wait_until(lambda: len(r := stored(app_id)) == 6 and r, timeout=60, message="every record stored")
    assert sorted(row[6]["body"] for row in rows) == ["before"] + [f"during {n}" for n in range(5)]
    lines = [json.loads(line) for line in web.output().splitlines() if line.startswith("{")]
    statuses = [line["status"] for line in lines if line.get("route") == "/api/otlp/<app_id>/v1/logs"]
    assert 503 in statuses and statuses[-1] == 200, statuses
