"""Ingestion API through the Flask test client on real PostgreSQL and Redis: errors leave nothing, 202s queue."""
import base64
import gzip
import io
import json
import signal
import time

import pytest

from app import events
from tests.conftest import free_port, sql, wait_until
from tests.private_redis import isolated_app

BODIES = "intake:pending:bodies"
QUEUES = ("default", "batch_processing")
EVENT_LIMIT = 1024 * 1024
BATCH_LIMIT = 5 * 1024 * 1024


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
def app_key(make_app):
    return make_app()


def post(client, app_id, key, body=None, *, batch=False, raw=None, headers=None, **kwargs):
    """POST JSON (or raw bytes) to the single or batch endpoint."""
    path = f"/api/logs/{app_id}" + ("/batch" if batch else "")
    all_headers = {"Content-Type": "application/json", **({"X-API-Key": key} if key is not None else {}),
                   **(headers or {})}
    data = raw if raw is not None else json.dumps(body)
    return client.post(path, data=data, headers=all_headers, **kwargs)


def error_of(response, status, code):
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    body = response.get_json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert set(body["error"]) <= {"code", "message", "details"}
    return body["error"]


def queued(redis, queue):
    """The Celery messages waiting in a Redis list: (task name, task id, args)."""
    messages = []
    for raw in redis.lrange(queue, 0, -1):
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        messages.append((message["headers"]["task"], message["headers"]["id"], args))
    return messages


def row_counts():
    return sql("SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM failed_events)")[0]


def assert_nothing_left(redis):
    assert redis.hlen(BODIES) == 0, "a pending record was left behind"
    for queue in QUEUES:
        assert redis.llen(queue) == 0, f"a message was queued on {queue}"
        for kind in ("due", "flight", "accepted"):  # app/pending.py's sorted sets
            assert redis.zcard(f"intake:pending:{kind}:{queue}") == 0
    assert row_counts() == (0, 0)


def persist(app, queue, group_id):
    with app.app_context():
        return events.persist_pending(queue, group_id)


class Untouchable(io.BytesIO):
    """A request body that fails the test if anybody reads it."""

    def read(self, *args):
        raise AssertionError("the body was read")

    readinto = readline = read


def nested(depth):
    node = 1
    for _ in range(depth - 1):
        node = {"k": node}
    return {"event_name": "deep", "n": node}


# --- refusals of a single event -----------------------------------------------------------


def test_unknown_app_is_404(client, app_key, redis):
    _, key = app_key
    error_of(post(client, "no-such-app", key, {"event_name": "a"}), 404, "app_not_found")
    assert_nothing_left(redis)


@pytest.mark.parametrize("key", [None, "", "ik_wrong"], ids=["missing", "empty", "wrong"])
def test_missing_or_wrong_key_is_401(client, app_key, redis, key):
    app_id, _ = app_key
    error_of(post(client, app_id, key, {"event_name": "a"}), 401, "invalid_api_key")
    assert_nothing_left(redis)


def test_another_apps_key_is_401(client, make_app, redis):
    app_id, _ = make_app()
    _, other_key = make_app()
    error_of(post(client, app_id, other_key, {"event_name": "a"}), 401, "invalid_api_key")
    assert_nothing_left(redis)


def test_app_and_key_are_checked_before_the_body(client, app_key, redis):
    app_id, key = app_key
    huge = {"CONTENT_LENGTH": str(10 * EVENT_LIMIT), "wsgi.input": Untouchable()}
    error_of(post(client, "nope", key, raw=b"", environ_overrides=huge), 404, "app_not_found")
    error_of(post(client, app_id, "bad", raw=b"not json", headers={"Content-Type": "text/plain"}),
             401, "invalid_api_key")
    assert_nothing_left(redis)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"])
def test_non_json_content_type_is_415(client, app_key, redis, content_type):
    app_id, key = app_key
    error_of(post(client, app_id, key, {"event_name": "a"}, headers={"Content-Type": content_type}),
             415, "unsupported_media_type")
    assert_nothing_left(redis)


def test_missing_content_type_is_415(client, app_key, redis):
    app_id, key = app_key
    response = client.post(f"/api/logs/{app_id}", data=b'{"event_name": "a"}', headers={"X-API-Key": key})
    assert response.status_code == 415
    assert_nothing_left(redis)


def test_content_length_over_the_limit_is_413_before_the_body_is_read(client, app_key, redis):
    app_id, key = app_key
    overrides = {"CONTENT_LENGTH": str(EVENT_LIMIT + 1), "wsgi.input": Untouchable()}
    error_of(post(client, app_id, key, raw=b"", environ_overrides=overrides), 413, "payload_too_large")
    assert_nothing_left(redis)


def test_oversized_body_is_413(client, app_key, redis):
    app_id, key = app_key
    body = json.dumps({"event_name": "big", "pad": "x" * EVENT_LIMIT})
    error_of(post(client, app_id, key, raw=body), 413, "payload_too_large")
    assert_nothing_left(redis)


def test_oversized_body_without_content_length_is_413_by_its_actual_size(client, app_key, redis):
    app_id, key = app_key
    body = json.dumps({"event_name": "big", "pad": "x" * EVENT_LIMIT}).encode()
    chunked = {"wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True, "CONTENT_LENGTH": ""}
    error_of(post(client, app_id, key, raw=b"", environ_overrides=chunked), 413, "payload_too_large")
    assert_nothing_left(redis)


def test_gzip_body_inflating_past_the_limit_is_413(client, app_key, redis):
    app_id, key = app_key
    bomb = gzip.compress(json.dumps({"event_name": "bomb", "pad": "0" * (20 * EVENT_LIMIT)}).encode())
    assert len(bomb) < EVENT_LIMIT
    error_of(post(client, app_id, key, raw=bomb, headers={"Content-Encoding": "gzip"}), 413, "payload_too_large")
    assert_nothing_left(redis)


@pytest.mark.parametrize(
    "raw",
    [b'{"event_name": "a", "v": NaN}', b'{"event_name": "a", "v": Infinity}', b'{"event_name": "a", "v": 1e999}',
     b'{"event_name": "a\\u0000"}', b'{"event_name": "a", "m": {"k\\u0000": 1}}', b'{"event_name": "\\ud800"}',
     b'{"event_name": "\\udfff"}', b'{"event_name": "\xff\xfe"}', b'{"event_name": "a"', b"", b"{,}"],
    ids=["nan", "infinity", "overflow", "nul-value", "nul-key", "lone-high-surrogate", "lone-low-surrogate",
         "invalid-utf8", "truncated", "empty", "garbage"],
)
def test_invalid_json_is_400(client, app_key, redis, raw):
    app_id, key = app_key
    error_of(post(client, app_id, key, raw=raw), 400, "invalid_json")
    assert_nothing_left(redis)


def test_invalid_gzip_is_400(client, app_key, redis):
    app_id, key = app_key
    truncated = gzip.compress(b'{"event_name": "a", "pad": "' + b"z" * 100 + b'"}')[:-10]
    for raw in (b'{"event_name": "not gzipped"}', truncated):
        response = post(client, app_id, key, raw=raw, headers={"Content-Encoding": "gzip"})
        assert response.status_code == 400 and response.get_json()["error"]["code"] == "invalid_encoding"
    assert_nothing_left(redis)


@pytest.mark.parametrize("body", [[{"event_name": "a"}], "event", 42, None, True])
def test_non_object_is_400(client, app_key, redis, body):
    app_id, key = app_key
    error_of(post(client, app_id, key, body), 400, "not_an_object")
    assert_nothing_left(redis)


def test_nesting_of_ten_is_accepted_and_eleven_is_422(client, app_key, redis):
    app_id, key = app_key
    error_of(post(client, app_id, key, nested(11)), 422, "nesting_too_deep")
    error_of(post(client, app_id, key, raw=b'{"event_name": "a", "n": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
             422, "nesting_too_deep")
    assert_nothing_left(redis)
    assert post(client, app_id, key, nested(10)).status_code == 202


def test_reserved_field_problems_are_422_with_every_detail(client, app_key, redis):
    app_id, key = app_key
    error = error_of(post(client, app_id, key, {"event_name": " ", "event_id": "x" * 129, "level": "loud",
                                                "timestamp": "2999-01-01T00:00:00Z", "user_id": {"id": 1}}),
                     422, "invalid_event")
    assert sorted(d["path"] for d in error["details"]) == ["/event_id", "/event_name", "/level", "/timestamp",
                                                           "/user_id"]
    assert all(d["message"] and d["rule"] for d in error["details"])
    assert_nothing_left(redis)


def test_event_far_in_the_future_is_422(client, app_key, redis):
    app_id, key = app_key
    future_ms = int((time.time() + 3600) * 1000)
    error = error_of(post(client, app_id, key, {"event_name": "a", "timestamp": future_ms}), 422, "invalid_event")
    assert [d["path"] for d in error["details"]] == ["/timestamp"]
    assert_nothing_left(redis)


def test_reject_rules_give_422_with_every_violation(client, make_app, redis):
    app_id, key = make_app(rules=[
        {"name": "purchase shape", "action": "reject", "event_name": "purchase",
         "schema": {"required": ["amount", "currency"], "properties": {"amount": {"type": "number"}}}},
        {"name": "user required", "action": "reject", "schema": {"required": ["user_id"]}},
        {"name": "other events", "action": "reject", "event_name": "signup", "schema": {"required": ["never"]}},
        {"name": "soft", "action": "warn", "schema": {"required": ["session"]}},
    ])
    error = error_of(post(client, app_id, key, {"event_name": "purchase", "amount": "ten"}), 422, "validation_failed")
    details = sorted((d["rule"], d["path"], d["message"]) for d in error["details"])
    assert [(rule, path) for rule, path, _ in details] == [
        ("purchase shape", ""), ("purchase shape", "/amount"), ("user required", "")]
    assert "'currency' is a required property" in details[0][2]
    assert "'ten' is not of type 'number'" in details[1][2]
    assert_nothing_left(redis)


def test_error_bodies_on_other_routes_are_json(client, app_key):
    app_id, key = app_key
    error_of(client.get(f"/api/logs/{app_id}", headers={"X-API-Key": key}), 405, "method_not_allowed")
    error_of(client.get(f"/api/logs/{app_id}/events/x/y"), 404, "not_found")


# --- accepted single events ---------------------------------------------------------------


def test_accepted_event_is_202_with_the_documented_body_and_is_queued(client, app, app_key, redis):
    app_id, key = app_key
    response = post(client, app_id, key, {"event_name": "signup", "event_id": "evt-1", "plan": "pro"})
    assert response.status_code == 202, response.get_data(as_text=True)
    body = response.get_json()
    assert list(body) == ["status", "event_id", "task_id", "validation"]
    assert body["status"] == "accepted"
    assert body["event_id"] == "evt-1"
    assert body["validation"] == {"status": "valid", "warnings": []}

    assert queued(redis, "default") == [("intake.persist_events", body["task_id"], [body["task_id"]])]
    assert redis.llen("batch_processing") == 0
    record = json.loads(redis.hget(BODIES, body["task_id"]))
    assert record["attempts"] == 0
    [event] = record["events"]
    assert event["payload"] == {"event_name": "signup", "event_id": "evt-1", "plan": "pro"}
    assert (event["app_id"], event["event_id"], event["event_name"]) == (app_id, "evt-1", "signup")
    assert redis.zscore("intake:pending:flight:default", body["task_id"]) <= time.time()  # its message pushed
    assert row_counts() == (0, 0), "the API never writes events itself"


def test_server_makes_an_event_id_when_absent(client, app_key, redis):
    app_id, key = app_key
    first = post(client, app_id, key, {"eventName": "a"}).get_json()
    second = post(client, app_id, key, {"eventName": "a"}).get_json()
    assert len(first["event_id"]) == 36 and first["event_id"] != second["event_id"]
    assert redis.hlen(BODIES) >= 1


def test_gzip_event_is_accepted(client, app_key, redis):
    app_id, key = app_key
    raw = gzip.compress(json.dumps({"event_name": "zipped", "event_id": "z-1"}).encode())
    response = post(client, app_id, key, raw=raw, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 202
    assert response.get_json()["event_id"] == "z-1"
    assert redis.llen("default") == 1


def test_warn_rules_let_the_event_through_with_warnings(client, app, make_app, redis):
    app_id, key = make_app(rules=[
        {"name": "has user", "action": "warn", "schema": {"required": ["user_id"]}},
        {"name": "small price", "action": "warn", "schema": {"properties": {"price": {"maximum": 100}}}},
    ])
    response = post(client, app_id, key, {"event_name": "buy", "price": 500, "event_id": "w-1"})
    assert response.status_code == 202
    validation = response.get_json()["validation"]
    assert validation["status"] == "warning"
    assert sorted((w["rule"], w["path"]) for w in validation["warnings"]) == [("has user", ""),
                                                                              ("small price", "/price")]
    assert all(w["message"] for w in validation["warnings"])

    assert persist(app, "default", response.get_json()["task_id"]) == "stored"
    assert sql("SELECT validation FROM events WHERE event_id = 'w-1'")[0][0] == validation


def test_rule_change_takes_effect_within_the_ttl(client, app, app_key):
    from app.extensions import db
    from app.models import Rule

    app_id, key = app_key
    assert post(client, app_id, key, {"event_name": "a"}).status_code == 202
    with app.app_context():
        db.session.add(Rule(app_id=app_id, name="block", action="reject", schema={"required": ["x"]}))
        db.session.commit()
    ttl = app.config["RULES_CACHE_TTL"]
    wait_until(lambda: post(client, app_id, key, {"event_name": "a"}).status_code == 422, timeout=ttl + 2,
               interval=0.1, message="the new rule")


def test_event_status_is_404_until_stored_then_processed(client, app, app_key):
    app_id, key = app_key
    accepted = post(client, app_id, key, {"event_name": "a", "event_id": "track-me"}).get_json()
    headers = {"X-API-Key": key}
    error_of(client.get(f"/api/logs/{app_id}/events/track-me", headers=headers), 404, "event_not_found")

    assert persist(app, "default", accepted["task_id"]) == "stored"
    response = client.get(f"/api/logs/{app_id}/events/track-me", headers=headers)
    assert response.status_code == 200
    body = response.get_json()
    assert list(body) == ["event_id", "status", "processed_at", "error"]
    assert (body["event_id"], body["status"], body["error"]) == ("track-me", "processed", None)
    assert body["processed_at"].endswith("Z")


def test_event_status_needs_the_apps_key(client, make_app):
    app_id, key = make_app()
    _, other_key = make_app()
    error_of(client.get(f"/api/logs/{app_id}/events/x"), 401, "invalid_api_key")
    error_of(client.get(f"/api/logs/{app_id}/events/x", headers={"X-API-Key": other_key}), 401, "invalid_api_key")
    error_of(client.get("/api/logs/nope/events/x", headers={"X-API-Key": key}), 404, "app_not_found")


def test_event_status_of_a_failed_event(client, app, app_key):
    app_id, key = app_key
    sql("INSERT INTO failed_events (id, app_id, event_id, event, error, attempts, first_failed_at, last_failed_at)"
        " VALUES ('f1', %s, 'bad-1', '{}', 'DataError: boom', 3, now(), now())", app_id)
    body = client.get(f"/api/logs/{app_id}/events/bad-1", headers={"X-API-Key": key}).get_json()
    assert body == {"event_id": "bad-1", "status": "failed", "processed_at": None, "error": "DataError: boom"}


# --- batches ------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [False, True], ids=["array", "events-object"])
def test_batch_is_accepted_in_both_forms(client, app_key, redis, wrap):
    app_id, key = app_key
    items = [{"event_name": "click", "event_id": f"c-{i}"} for i in range(3)]
    response = post(client, app_id, key, {"events": items} if wrap else items, batch=True)
    assert response.status_code == 202
    body = response.get_json()
    assert list(body) == ["status", "accepted", "event_ids", "rejected", "task_id"]
    assert body == {"status": "accepted", "accepted": 3, "event_ids": ["c-0", "c-1", "c-2"], "rejected": [],
                    "task_id": body["task_id"]}
    assert queued(redis, "batch_processing") == [("intake.persist_batch", body["task_id"], [body["task_id"]])]
    assert redis.llen("default") == 0
    record = json.loads(redis.hget(BODIES, body["task_id"]))
    assert [e["event_id"] for e in record["events"]] == ["c-0", "c-1", "c-2"]


def test_batch_with_invalid_events_accepts_the_valid_ones(client, app, make_app, redis):
    app_id, key = make_app(rules=[{"name": "amount", "action": "reject", "event_name": "pay",
                                   "schema": {"required": ["amount"]}}])
    items = [
        {"event_name": "ok", "event_id": "b-0"},
        {"event_id": "no-name"},
        {"event_name": "pay", "event_id": "b-2", "amount": 3},
        {"event_name": "pay"},
        "not an object",
        nested(11),
        {"event_name": "ok", "level": "nope"},
        {"eventName": "ok", "event_id": "b-7"},
    ]
    response = post(client, app_id, key, items, batch=True)
    assert response.status_code == 202
    body = response.get_json()
    assert body["accepted"] == 3 and body["event_ids"] == ["b-0", "b-2", "b-7"]
    codes = {r["index"]: r["error"]["code"] for r in body["rejected"]}
    assert codes == {1: "invalid_event", 3: "validation_failed", 4: "not_an_object", 5: "nesting_too_deep",
                     6: "invalid_event"}
    rejected = {r["index"]: r["error"] for r in body["rejected"]}
    assert rejected[3]["details"][0]["rule"] == "amount"
    assert rejected[1]["details"][0]["path"] == "/event_name"
    assert all(e["message"] for e in rejected.values())

    assert persist(app, "batch_processing", body["task_id"]) == "stored"
    assert sorted(r[0] for r in sql("SELECT event_id FROM events WHERE app_id = %s", app_id)) == ["b-0", "b-2", "b-7"]


def test_batch_with_no_valid_event_is_422_and_leaves_nothing(client, app_key, redis):
    app_id, key = app_key
    response = post(client, app_id, key, {"events": [{"level": "info"}, [], {"event_name": ""}]}, batch=True)
    assert response.status_code == 422
    body = response.get_json()
    assert body["accepted"] == 0 and body["event_ids"] == [] and body["task_id"] is None
    assert [r["index"] for r in body["rejected"]] == [0, 1, 2]
    assert body["error"]["code"] and body["error"]["message"]
    assert_nothing_left(redis)


@pytest.mark.parametrize(
    "body",
    [[], {"events": []}, {"events": "x"}, {"event_name": "single"}, "x", 5, None],
    ids=["empty-array", "empty-events", "events-not-a-list", "single-object", "string", "number", "null"],
)
def test_malformed_batch_is_400_invalid_batch(client, app_key, redis, body):
    app_id, key = app_key
    error_of(post(client, app_id, key, body, batch=True), 400, "invalid_batch")
    assert_nothing_left(redis)


def test_batch_of_too_many_events_is_400_and_the_maximum_is_accepted(client, app, app_key, redis):
    app_id, key = app_key
    limit = app.config["INGEST_MAX_BATCH_EVENTS"]
    error_of(post(client, app_id, key, [{"event_name": "e"}] * (limit + 1), batch=True), 400, "invalid_batch")
    assert_nothing_left(redis)
    response = post(client, app_id, key, [{"event_name": "e"}] * limit, batch=True)
    assert response.status_code == 202 and response.get_json()["accepted"] == limit


def test_oversized_item_is_rejected_alone(client, app_key, redis):
    app_id, key = app_key
    items = [{"event_name": "small", "event_id": "s-0"}, {"event_name": "big", "pad": "x" * EVENT_LIMIT},
             {"event_name": "small", "event_id": "s-2"}]
    response = post(client, app_id, key, items, batch=True)
    assert response.status_code == 202
    body = response.get_json()
    assert body["event_ids"] == ["s-0", "s-2"]
    assert [(r["index"], r["error"]["code"]) for r in body["rejected"]] == [(1, "payload_too_large")]
    assert len(redis.hget(BODIES, body["task_id"])) < 10_000


def test_oversized_batch_is_413(client, app_key, redis):
    app_id, key = app_key
    overrides = {"CONTENT_LENGTH": str(BATCH_LIMIT + 1), "wsgi.input": Untouchable()}
    error_of(post(client, app_id, key, raw=b"", batch=True, environ_overrides=overrides), 413, "payload_too_large")
    items = [{"event_name": "e", "pad": "x" * (EVENT_LIMIT // 2)} for _ in range(11)]
    error_of(post(client, app_id, key, items, batch=True), 413, "payload_too_large")
    assert_nothing_left(redis)


def test_gzip_batch_is_accepted(client, app_key, redis):
    app_id, key = app_key
    raw = gzip.compress(json.dumps([{"event_name": "z", "n": i} for i in range(100)]).encode())
    response = post(client, app_id, key, raw=raw, batch=True, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 202 and response.get_json()["accepted"] == 100
    assert redis.llen("batch_processing") == 1


def test_batch_errors_before_parsing_leave_nothing(client, app_key, redis):
    app_id, key = app_key
    error_of(post(client, app_id, "wrong", [{"event_name": "a"}], batch=True), 401, "invalid_api_key")
    error_of(post(client, app_id, key, [{"event_name": "a"}], batch=True, headers={"Content-Type": "text/plain"}),
             415, "unsupported_media_type")
    error_of(post(client, app_id, key, raw=b'[{"event_name": NaN}]', batch=True), 400, "invalid_json")
    assert_nothing_left(redis)


# --- broker unavailable -------------------------------------------------------------------


def assert_503_fast(client, app_id, key, batch=False):
    started = time.monotonic()
    response = post(client, app_id, key, [{"event_name": "a"}] if batch else {"event_name": "a"}, batch=batch)
    elapsed = time.monotonic() - started
    error_of(response, 503, "queue_unavailable")
    assert response.headers["Retry-After"].isdigit()
    assert elapsed < 2, f"503 took {elapsed:.2f}s"


def test_broker_down_is_503_within_two_seconds(app_key, redis):
    app_id, key = app_key
    closed = f"redis://127.0.0.1:{free_port()}/0"
    down = isolated_app({"REDIS_URL": closed, "CELERY_BROKER_URL": closed})
    client = down.test_client()
    for _ in range(2):
        assert_503_fast(client, app_id, key)
        assert_503_fast(client, app_id, key, batch=True)
    assert_nothing_left(redis)


def test_broker_down_with_pending_store_up_is_503_and_leaves_no_record(app_key, redis, test_environment):
    app_id, key = app_key
    closed = f"redis://127.0.0.1:{free_port()}/0"
    down = isolated_app({"REDIS_URL": test_environment["REDIS_URL"], "CELERY_BROKER_URL": closed})
    client = down.test_client()
    assert_503_fast(client, app_id, key)
    assert_503_fast(client, app_id, key, batch=True)
    assert_nothing_left(redis)


@pytest.mark.parametrize("what", ["broker-and-pending-store", "broker-only"])
def test_broker_outage_and_recovery_without_restart(private_redis, app_key, redis, test_environment, what):
    app_id, key = app_key
    broker = private_redis.start().client()
    pending_url = private_redis.url if what == "broker-and-pending-store" else test_environment["REDIS_URL"]
    flask_app = isolated_app({"REDIS_URL": pending_url, "CELERY_BROKER_URL": private_redis.url})
    client = flask_app.test_client()

    first = post(client, app_id, key, {"event_name": "before"})
    assert first.status_code == 202
    assert [m[1] for m in queued(broker, "default")] == [first.get_json()["task_id"]]

    private_redis.stop()
    for _ in range(2):
        assert_503_fast(client, app_id, key)
    assert_503_fast(client, app_id, key, batch=True)
    if what == "broker-only":
        # The first event is still pending; the refused ones left no record behind.
        assert redis.hkeys(BODIES) == [first.get_json()["task_id"].encode()]

    broker = private_redis.start().client()
    again = wait_until(lambda: (r := post(client, app_id, key, {"event_name": "after"})).status_code == 202 and r,
                       timeout=5, interval=0.2, message="202 after the broker is back")
    batch = post(client, app_id, key, [{"event_name": "after"}], batch=True)
    assert batch.status_code == 202
    assert [m[1] for m in queued(broker, "default")] == [again.get_json()["task_id"]]
    assert [m[1] for m in queued(broker, "batch_processing")] == [batch.get_json()["task_id"]]


def test_hanging_broker_is_503_within_two_seconds_and_leaves_nothing(hanging_broker, app_key, redis, test_environment):
    app_id, key = app_key
    hung = isolated_app({"REDIS_URL": test_environment["REDIS_URL"], "CELERY_BROKER_URL": hanging_broker})
    client = hung.test_client()
    assert_503_fast(client, app_id, key)
    assert_503_fast(client, app_id, key, batch=True)
    # The publishes that were cut short give up in the background and drop their pending records.
    wait_until(lambda: redis.hlen(BODIES) == 0, timeout=15, message="the refused events' records dropped")
    assert_nothing_left(redis)


def test_hanging_pending_store_is_503_within_two_seconds(hanging_broker, app_key, redis):
    app_id, key = app_key
    hung = isolated_app({"REDIS_URL": hanging_broker, "CELERY_BROKER_URL": hanging_broker})
    client = hung.test_client()
    assert_503_fast(client, app_id, key)
    assert_503_fast(client, app_id, key, batch=True)
    assert_nothing_left(redis)


def test_frozen_broker_that_recovers_stores_nothing_the_client_was_refused(private_redis, app_key, redis,
                                                                           test_environment):
    app_id, key = app_key
    private_redis.start()
    frozen = isolated_app({"REDIS_URL": test_environment["REDIS_URL"], "CELERY_BROKER_URL": private_redis.url})
    client = frozen.test_client()
    assert post(client, app_id, key, {"event_name": "warm-up"}).status_code == 202
    redis.delete(BODIES, *(f"intake:pending:{kind}:default" for kind in ("due", "flight", "accepted")))
    private_redis.proc.send_signal(signal.SIGSTOP)  # alive, but answers nothing
    try:
        assert_503_fast(client, app_id, key)
        assert_503_fast(client, app_id, key, batch=True)
    finally:
        private_redis.proc.send_signal(signal.SIGCONT)
    # The cut-short publishes may now reach the broker, but the client was told 503: the
    # pending records are dropped, so a worker finds nothing to store for them.
    time.sleep(3)
    wait_until(lambda: redis.hlen(BODIES) == 0, timeout=15, message="the refused events' records dropped")


# --- RabbitMQ: publisher confirms ---------------------------------------------------------


def test_rabbitmq_that_does_not_confirm_is_503_and_keeps_nothing_refused(rabbit_proxy, app_key, redis,
                                                                          test_environment):
    app_id, key = app_key
    flask_app = isolated_app({"REDIS_URL": test_environment["REDIS_URL"], "CELERY_BROKER_URL": rabbit_proxy.url})
    client = flask_app.test_client()
    warm_up = post(client, app_id, key, {"event_name": "warm-up"})
    assert warm_up.status_code == 202  # confirmed by the broker
    warm_up_id = warm_up.get_json()["task_id"].encode()
    assert redis.hkeys(BODIES) == [warm_up_id]

    rabbit_proxy.freeze()  # the connection stays open; no confirm comes back
    assert_503_fast(client, app_id, key)
    assert_503_fast(client, app_id, key, batch=True)
    rabbit_proxy.thaw()
    # The client was told 503: whatever reaches the broker now finds no pending record.
    wait_until(lambda: redis.hkeys(BODIES) == [warm_up_id], timeout=15, message="the refused events' records dropped")

    after = wait_until(lambda: (r := post(client, app_id, key, {"event_name": "after"})).status_code == 202 and r,
                       timeout=10, interval=0.2, message="202 once the broker confirms again")
    assert set(redis.hkeys(BODIES)) == {warm_up_id, after.get_json()["task_id"].encode()}


def test_rabbitmq_down_is_503_and_back_without_restart(rabbit, rabbit_proxy, app_key, test_environment):
    app_id, key = app_key
    flask_app = isolated_app({"REDIS_URL": test_environment["REDIS_URL"], "CELERY_BROKER_URL": rabbit_proxy.url})
    client = flask_app.test_client()
    assert post(client, app_id, key, {"event_name": "before"}).status_code == 202

    rabbit_proxy.stop()
    for _ in range(2):
        assert_503_fast(client, app_id, key)
    assert_503_fast(client, app_id, key, batch=True)

    rabbit_proxy.start()
    wait_until(lambda: post(client, app_id, key, {"event_name": "after"}).status_code == 202, timeout=10,
               interval=0.2, message="202 after the broker is back")
    assert post(client, app_id, key, [{"event_name": "after"}], batch=True).status_code == 202
    assert rabbit.depth("default") == 2 and rabbit.depth("batch_processing") == 1
