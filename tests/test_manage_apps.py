"""Apps over HTTP (JWT): list, create, read, change, rotate the key, delete; tenant isolation; bad input."""
import json
import time
import uuid

import pytest
import requests

from app.events import insert_events
from app.manage import apps as apps_module
from tests.conftest import sql, wait_until


@pytest.fixture
def owner(make_user):
    return make_user()


@pytest.fixture
def created(client, owner):
    """An app of `owner`, made over HTTP: (app id, key)."""
    response = client.post("/api/apps", json={"name": "Shop"}, headers=owner[1])
    assert response.status_code == 201, response.get_data(as_text=True)
    body = response.get_json()
    return body["id"], body["api_key"]


def ingest(client, app_id, key):
    return client.post(f"/api/logs/{app_id}", json={"event_name": "e"}, headers={"X-API-Key": key})


def assert_error(response, status, code=None):
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    if code:
        assert error["code"] == code
    return error


def test_create_read_list_change(client, owner, created, redis):
    app_id, key = created
    assert key.startswith("ik_")
    [(name, retention, owner_id, key_hash)] = sql("SELECT name, retention_days, owner_id, api_key_hash FROM apps")
    assert (name, retention, owner_id) == ("Shop", 30, owner[0]) and key not in key_hash
    assert ingest(client, app_id, key).status_code == 202

    read = client.get(f"/api/apps/{app_id}", headers=owner[1])
    assert read.status_code == 200
    body = read.get_json()
    assert set(body) == {"id", "name", "retention_days", "created_at"} and body["created_at"].endswith("Z")
    assert client.get("/api/apps", headers=owner[1]).get_json() == {"apps": [body]}

    changed = client.patch(f"/api/apps/{app_id}", json={"name": "Shop EU", "retention_days": 90}, headers=owner[1])
    assert changed.status_code == 200
    assert changed.get_json() == {**body, "name": "Shop EU", "retention_days": 90}
    assert sql("SELECT name, retention_days FROM apps") == [("Shop EU", 90)]
    assert client.patch(f"/api/apps/{app_id}", json={"retention_days": 7}, headers=owner[1]).status_code == 200
    assert sql("SELECT name, retention_days FROM apps") == [("Shop EU", 7)]


def test_create_with_retention_and_the_list_is_only_mine(client, owner, make_user):
    other = make_user()
    client.post("/api/apps", json={"name": "theirs"}, headers=other[1])
    response = client.post("/api/apps", json={"name": "Logs", "retention_days": 3650}, headers=owner[1])
    assert response.status_code == 201 and response.get_json()["retention_days"] == 3650
    assert [a["name"] for a in client.get("/api/apps", headers=owner[1]).get_json()["apps"]] == ["Logs"]


def test_rotate_key_refuses_the_old_key_at_once(client, owner, created):
    app_id, old_key = created
    assert ingest(client, app_id, old_key).status_code == 202  # cached in this process now
    response = client.post(f"/api/apps/{app_id}/api-key", headers=owner[1])
    assert response.status_code == 201
    new_key = response.get_json()["api_key"]
    assert response.get_json()["id"] == app_id and new_key != old_key
    assert ingest(client, app_id, old_key).status_code == 401
    assert ingest(client, app_id, new_key).status_code == 202


def test_delete_refuses_the_key_at_once_and_hands_over_the_data(client, owner, created, monkeypatch):
    app_id, key = created
    removals, schedule = [], apps_module.lifecycle.schedule_app_deletion
    monkeypatch.setattr(apps_module.lifecycle, "schedule_app_deletion",
                        lambda app_id: removals.append(app_id) or schedule(app_id))
    assert ingest(client, app_id, key).status_code == 202
    response = client.delete(f"/api/apps/{app_id}", headers=owner[1])
    assert response.status_code == 202
    assert response.get_json() == {"id": app_id, "status": "deleting"}
    assert removals == [app_id]
    assert sql("SELECT deleted_at IS NOT NULL FROM apps") == [(True,)]
    assert_error(ingest(client, app_id, key), 404, "app_not_found")
    assert_error(client.get(f"/api/apps/{app_id}", headers=owner[1]), 404, "app_not_found")
    assert client.get("/api/apps", headers=owner[1]).get_json() == {"apps": []}
    assert_error(client.delete(f"/api/apps/{app_id}", headers=owner[1]), 404, "app_not_found")
    assert removals == [app_id]


def test_every_route_needs_a_token(client, created):
    app_id, _ = created
    rule_id, event_id = str(uuid.uuid4()), "e1"
    for method, path in ROUTES:
        response = client.open(path.format(app=app_id, rule=rule_id, event=event_id), method=method, json={})
        assert response.status_code == 401, (method, path)


def test_a_token_whose_user_is_gone_creates_nothing(client, owner):
    sql("DELETE FROM users")
    assert_error(client.post("/api/apps", json={"name": "x"}, headers=owner[1]), 401)
    assert sql("SELECT count(*) FROM apps") == [(0,)]


# --- tenant isolation ----------------------------------------------------------------------

ROUTES = [
    ("GET", "/api/apps/{app}"),
    ("PATCH", "/api/apps/{app}"),
    ("DELETE", "/api/apps/{app}"),
    ("POST", "/api/apps/{app}/api-key"),
    ("GET", "/api/apps/{app}/rules"),
    ("POST", "/api/apps/{app}/rules"),
    ("GET", "/api/apps/{app}/rules/{rule}"),
    ("PUT", "/api/apps/{app}/rules/{rule}"),
    ("PATCH", "/api/apps/{app}/rules/{rule}"),
    ("DELETE", "/api/apps/{app}/rules/{rule}"),
    ("GET", "/api/apps/{app}/events"),
    ("GET", "/api/apps/{app}/events/{event}"),
]
RULE = {"name": "needs user", "action": "reject", "schema": {"required": ["user_id"]}}


def test_another_user_gets_404_on_every_route_and_changes_nothing(app, client, owner, created, make_user):
    app_id, key = created
    rule = client.post(f"/api/apps/{app_id}/rules", json=RULE, headers=owner[1]).get_json()
    with app.app_context():
        insert_events([{"app_id": app_id, "event_id": "e1", "event_name": "secret", "level": "info", "user_id": None,
                        "timestamp": 1_700_000_000_000_000, "received_at": 1_700_000_000_000_000,
                        "validation": {"status": "valid", "warnings": []}, "payload": {"event_name": "secret"}}])
    before = sql("SELECT a.*, r.* FROM apps a JOIN rules r ON r.app_id = a.id")
    _, stranger = make_user()
    bodies = {"PATCH": {"name": "mine now"}, "POST": RULE, "PUT": RULE}
    for method, path in ROUTES:
        url = path.format(app=app_id, rule=rule["id"], event="e1")
        response = client.open(url, method=method, json=bodies.get(method), headers=stranger)
        error = assert_error(response, 404, "app_not_found")
        assert set(response.get_json()) == {"error"} and "secret" not in response.get_data(as_text=True)
        assert error["details"] == []
    assert client.get("/api/apps", headers=stranger).get_json() == {"apps": []}
    assert sql("SELECT a.*, r.* FROM apps a JOIN rules r ON r.app_id = a.id") == before
    assert ingest(client, app_id, key).status_code == 422  # the key and the rule still work


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "%00", "x" * 5000, "00000000-0000-0000-0000-000000000000",
                                    "%F0%9F%92%A9", "1%20OR%201=1"])
def test_bad_or_unknown_app_ids_are_404(client, owner, bad_id):
    for method, path in ROUTES:
        response = client.open(path.format(app=bad_id, rule=str(uuid.uuid4()), event="e1"), method=method,
                               json=RULE if method in ("POST", "PUT") else {"name": "n"}, headers=owner[1])
        assert_error(response, 404, "app_not_found")


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status",
    [
        ({}, 422),
        ({"name": ""}, 422),
        ({"name": "x" * 256}, 422),
        ({"name": 12}, 422),
        ({"name": None}, 422),
        ({"name": "ok", "retention_days": 0}, 422),
        ({"name": "ok", "retention_days": 3651}, 422),
        ({"name": "ok", "retention_days": "30"}, 422),
        ({"name": "ok", "retention_days": True}, 422),
        ({"name": "ok", "retention_days": 1.5}, 422),
        ({"name": "ok", "owner_id": "someone-else"}, 422),
        (["name"], 422),
        ("not json", 400),
        ('{"name": NaN}', 400),
        ('{"name": "a\\u0000b"}', 400),
        ('{"name": "\\ud800"}', 400),
        ("[" * 100_000, 422),
        ("", 400),
    ],
)
def test_create_refuses_bad_input(client, owner, body, status):
    data = body if isinstance(body, str) else json.dumps(body)
    response = client.post("/api/apps", data=data, content_type="application/json", headers=owner[1])
    error = assert_error(response, status)
    if status == 422 and error["code"] == "invalid_request":
        assert error["details"] and all({"path", "message", "rule"} <= set(d) for d in error["details"])
    assert sql("SELECT count(*) FROM apps") == [(0,)]


def test_create_refuses_other_media_types_and_oversized_bodies(client, owner):
    assert_error(client.post("/api/apps", data="name=x", content_type="application/x-www-form-urlencoded",
                             headers=owner[1]), 415, "unsupported_media_type")
    huge = json.dumps({"name": "x" * (300 * 1024)})
    assert_error(client.post("/api/apps", data=huge, content_type="application/json", headers=owner[1]), 413)
    assert sql("SELECT count(*) FROM apps") == [(0,)]


@pytest.mark.parametrize("body", [{}, {"name": ""}, {"retention_days": 0}, {"retention_days": "7"},
                                  {"name": "n", "api_key_hash": "x"}, {"deleted_at": None}])
def test_patch_refuses_bad_input_and_changes_nothing(client, owner, created, body):
    app_id, _ = created
    before = sql("SELECT * FROM apps")
    assert_error(client.patch(f"/api/apps/{app_id}", json=body, headers=owner[1]), 422, "invalid_request")
    assert sql("SELECT * FROM apps") == before


# --- across processes: two gunicorn workers ------------------------------------------------


def fresh_requests(stack, app_id, key, count=16, event=None):
    """Statuses of `count` ingestion requests, each on a new connection (spread over the workers)."""
    return [requests.post(f"{stack.base_url}/api/logs/{app_id}", json=event or {"event_name": "e"},
                          headers={"X-API-Key": key, "Connection": "close"}, timeout=10).status_code
            for _ in range(count)]


def test_journey_on_two_gunicorn_workers_and_a_real_worker(stack, redis, owner, test_environment):
    """Create an app, add a rule, ingest, list and read what a worker stored; rotate and delete the key.

    The cache TTL is a minute here: only the broadcast can make both workers refuse the old key at once.
    """
    stack.web(workers=2, threads=2, RULES_CACHE_TTL="60")
    stack.worker(queues="default,batch_processing", concurrency=1)
    _, headers = owner
    api = lambda method, path, **kw: requests.request(method, stack.base_url + path, headers=headers, timeout=10, **kw)
    created = api("POST", "/api/apps", json={"name": "two workers"})
    assert created.status_code == 201, created.text
    app_id, old_key = created.json()["id"], created.json()["api_key"]
    rule = {"name": "plan wanted", "event_name": "signup", "action": "warn", "schema": {"required": ["plan"]}}
    assert api("POST", f"/api/apps/{app_id}/rules", json=rule).status_code == 201

    signup = stack.post(f"/api/logs/{app_id}", {"event_name": "signup", "user_id": 7, "event_id": "s-1"},
                        {"X-API-Key": old_key})
    assert signup.status_code == 202 and signup.json()["validation"]["status"] == "warning"
    batch = stack.post(f"/api/logs/{app_id}/batch", [{"event_name": "view", "level": "ERROR"}, {"event_name": "view"}],
                       {"X-API-Key": old_key})
    assert batch.status_code == 202
    listed = wait_until(lambda: (lambda body: len(body["events"]) == 3 and body)(
        api("GET", f"/api/apps/{app_id}/events").json()), timeout=30, message="three stored events")
    assert {e["event_id"] for e in listed["events"]} == {"s-1", *batch.json()["event_ids"]}
    errors = api("GET", f"/api/apps/{app_id}/events", params={"level": "error", "event_name": "view"}).json()
    assert [e["event_id"] for e in errors["events"]] == batch.json()["event_ids"][:1]
    stored = api("GET", f"/api/apps/{app_id}/events/s-1").json()
    assert stored["payload"] == {"event_name": "signup", "user_id": 7, "event_id": "s-1"}
    assert (stored["user_id"], stored["level"], stored["validation"]["status"]) == ("7", "info", "warning")
    assert stored["validation"]["warnings"][0]["rule"] == "plan wanted"
    assert stored["received_at"] <= stored["processed_at"]

    assert fresh_requests(stack, app_id, old_key) == [202] * 16  # cached in both workers
    db = test_environment["REDIS_URL"].rsplit("/", 1)[1]
    # Both workers have subscribed (each at its first request).
    wait_until(lambda: redis.pubsub_numsub(f"intake:rules-changed:{db}")[0][1] >= 2, timeout=10,
               message="both workers listening")
    rotated = api("POST", f"/api/apps/{app_id}/api-key")
    assert rotated.status_code == 201
    new_key = rotated.json()["api_key"]
    assert fresh_requests(stack, app_id, old_key) == [401] * 16
    assert fresh_requests(stack, app_id, new_key) == [202] * 16

    checkout = {"event_name": "checkout"}
    strict = api("POST", f"/api/apps/{app_id}/rules", json={**rule, "event_name": "checkout", "action": "reject"})
    assert fresh_requests(stack, app_id, new_key, event=checkout) == [422] * 16
    assert api("PATCH", f"/api/apps/{app_id}/rules/{strict.json()['id']}", json={"enabled": False}).status_code == 200
    assert fresh_requests(stack, app_id, new_key, event=checkout) == [202] * 16

    assert api("DELETE", f"/api/apps/{app_id}").status_code == 202
    assert fresh_requests(stack, app_id, new_key) == [404] * 16


# --- the broadcast itself (app/invalidation.py) --------------------------------------------


class RecordingCache:
    def __init__(self):
        self.calls = []

    def discard(self, app_id):
        self.calls.append(("discard", app_id))

    def clear(self):
        self.calls.append(("clear",))


def listening(redis_url, redis):
    from app.invalidation import Invalidation

    cache = RecordingCache()
    invalidation = Invalidation(redis_url, cache)
    before = redis.pubsub_numsub(invalidation.channel)[0][1]
    invalidation.ensure_listening()
    wait_until(lambda: ("clear",) in cache.calls and redis.pubsub_numsub(invalidation.channel)[0][1] > before,
               timeout=10, message="the listener subscribed")
    return invalidation, cache


def test_without_redis_only_this_process_forgets(caplog):
    from app.invalidation import Invalidation

    cache = RecordingCache()
    Invalidation(None, cache).publish("a1")
    Invalidation(None, cache).ensure_listening()  # nothing to listen to: no thread
    assert cache.calls == [("discard", "a1")]
    unreachable = Invalidation("redis://127.0.0.1:1/0", cache)
    started = time.monotonic()
    unreachable.publish("a2")  # logs, never raises: the change is committed, the TTL bounds the rest
    assert time.monotonic() - started < 3
    assert cache.calls[-1] == ("discard", "a2") and "RULES_CACHE_TTL" in caplog.text


def test_the_listener_forgets_acknowledges_and_resubscribes(test_environment, redis):
    from app.invalidation import LISTENER_NAME

    invalidation, cache = listening(test_environment["REDIS_URL"], redis)
    publisher = type(invalidation)(test_environment["REDIS_URL"], RecordingCache())
    started = time.monotonic()
    publisher.publish("app-1")  # returns once every listener (this one included) acknowledged
    assert ("discard", "app-1") in cache.calls and time.monotonic() - started < 0.9
    redis.publish(invalidation.channel, b"not json")  # a stray message is ignored, the listener lives on
    publisher.publish("app-2")
    assert ("discard", "app-2") in cache.calls
    # The subscription drops (Redis restarted, a network blip): messages meanwhile are lost, so the
    # listener clears everything when it is subscribed again.
    cleared = cache.calls.count(("clear",))
    db = test_environment["REDIS_URL"].rsplit("/", 1)[1]
    for client in redis.client_list(_type="pubsub"):  # ours only: other runs share this server
        if client["name"] == LISTENER_NAME and client["db"] == db:
            redis.client_kill_filter(_id=client["id"])
    wait_until(lambda: cache.calls.count(("clear",)) > cleared, timeout=15, message="subscribed again")
    publisher.publish("app-3")
    assert ("discard", "app-3") in cache.calls


def test_a_listener_that_does_not_acknowledge_delays_the_answer_at_most_a_second(test_environment, redis):
    from app.invalidation import ACK_TIMEOUT, Invalidation

    mute = redis.pubsub()
    mute.subscribe(Invalidation(test_environment["REDIS_URL"], None).channel)
    try:
        started = time.monotonic()
        Invalidation(test_environment["REDIS_URL"], RecordingCache()).publish("app-1")
        assert ACK_TIMEOUT - 0.1 < time.monotonic() - started < ACK_TIMEOUT + 1
    finally:
        mute.close()


def test_a_stopped_listener_ends_its_thread_even_while_redis_is_unreachable():
    import threading

    from app.invalidation import POLL_SECONDS, Invalidation

    before = set(threading.enumerate())
    unreachable = Invalidation("redis://127.0.0.1:1/0", RecordingCache())
    unreachable.ensure_listening()
    [listener] = [t for t in threading.enumerate() if t not in before and t.name == "intake-invalidation"]
    time.sleep(1)  # failing to connect, waiting to retry
    unreachable.stop()
    listener.join(POLL_SECONDS + 2)
    assert not listener.is_alive()
