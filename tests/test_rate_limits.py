"""Rate limits: per app on ingestion, counted in events; 429 with headers; fail open without storage."""
import math
import time

import pytest
from flask import Blueprint

from app.limits import auth_rate_limit
from tests.conftest import free_port
from tests.private_redis import isolated_app


@pytest.fixture
def limited(make_app):
    """A test client whose apps may send 5 events a minute (counters in this run's Redis)."""
    return isolated_app({"INGEST_RATE_LIMIT": "5/minute"}).test_client()


def send(client, app_id, key, body, batch=False):
    path = f"/api/logs/{app_id}/batch" if batch else f"/api/logs/{app_id}"
    return client.post(path, json=body, headers={"X-API-Key": key})


def assert_rate_limited(response, limit="5", remaining="0"):
    assert response.status_code == 429
    assert response.get_json()["error"]["code"] == "rate_limited"
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["RateLimit-Limit"] == limit
    assert response.headers["RateLimit-Remaining"] == remaining
    assert 1 <= int(response.headers["RateLimit-Reset"]) <= 120


def test_the_event_over_the_limit_is_refused_with_headers(limited, make_app):
    app_id, key = make_app()
    for n in range(5):
        assert send(limited, app_id, key, {"event_name": "e", "n": n}).status_code == 202
    assert_rate_limited(send(limited, app_id, key, {"event_name": "e", "n": 5}))
    # Another app has an allowance of its own.
    other_id, other_key = make_app()
    assert send(limited, other_id, other_key, {"event_name": "e"}).status_code == 202


def test_batches_count_by_events_and_a_refused_batch_takes_nothing(limited, make_app):
    app_id, key = make_app()
    three = [{"event_name": "e"}] * 3
    assert send(limited, app_id, key, three, batch=True).status_code == 202
    assert_rate_limited(send(limited, app_id, key, three, batch=True), remaining="2")  # 3 + 3 > 5
    assert send(limited, app_id, key, [{"event_name": "e"}] * 2, batch=True).status_code == 202  # exactly 5
    assert_rate_limited(send(limited, app_id, key, {"event_name": "e"}))


def test_a_batch_larger_than_the_whole_limit_says_so(limited, make_app):
    app_id, key = make_app()
    response = send(limited, app_id, key, [{"event_name": "e"}] * 6, batch=True)
    assert response.status_code == 429
    assert "smaller batches" in response.get_json()["error"]["message"]
    assert send(limited, app_id, key, {"event_name": "e"}).status_code == 202


def test_the_limit_is_shared_by_every_gunicorn_worker(stack, make_app):
    stack.web(workers=2, threads=2, INGEST_RATE_LIMIT="8/minute")
    app_id, key = make_app()
    statuses = [stack.post(f"/api/logs/{app_id}", {"event_name": "e"}, {"X-API-Key": key}).status_code
                for _ in range(12)]
    assert statuses == [202] * 8 + [429] * 4


def test_ingestion_fails_open_when_the_limit_storage_is_down(make_app):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = isolated_app({"INGEST_RATE_LIMIT": "2/minute", "RATELIMIT_STORAGE_URI": dead})
    client = app.test_client()
    app_id, key = make_app()
    started = time.monotonic()
    statuses = [send(client, app_id, key, {"event_name": "e"}).status_code for _ in range(6)]
    assert statuses == [202] * 6  # not limited, and certainly no 500
    assert time.monotonic() - started < 5
    metrics_text = client.get("/metrics").get_data(as_text=True)
    assert "intake_rate_limit_storage_errors_total" in metrics_text


def test_redis_down_altogether_is_a_503_not_a_500(make_app):
    app_id, key = make_app()
    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = isolated_app({"INGEST_RATE_LIMIT": "2/minute", "REDIS_URL": dead, "CELERY_BROKER_URL": dead,
                           "RATELIMIT_STORAGE_URI": dead}).test_client()
    for body, batch in (({"event_name": "e"}, False), ([{"event_name": "e"}], True)):
        started = time.monotonic()
        response = send(client, app_id, key, body, batch=batch)
        assert response.status_code == 503
        assert response.get_json()["error"]["code"] == "queue_unavailable"
        assert time.monotonic() - started < 2.5


def test_account_routes_are_limited_per_account_and_per_address():
    app = isolated_app({"AUTH_RATE_LIMIT_PER_ACCOUNT": "2/minute", "AUTH_RATE_LIMIT_PER_IP": "3/minute"})
    bp = Blueprint("fake_auth", __name__)

    @bp.post("/test-auth/login")
    @auth_rate_limit
    def login():
        return {"ok": True}

    app.register_blueprint(bp)
    client = app.test_client()

    def attempt(email):
        return client.post("/test-auth/login", json={"email": email, "password": "x"})

    first = attempt("a@example.com")
    assert first.status_code == 200
    assert first.headers["RateLimit-Limit"] == "2" and first.headers["RateLimit-Remaining"] == "1"
    assert attempt("A@example.com ").status_code == 200  # the same account
    refused = attempt("a@example.com")
    assert_rate_limited(refused, limit="2")
    assert attempt("b@example.com").status_code == 200  # another account: 3rd try from this address
    assert_rate_limited(attempt("c@example.com"), limit="3")  # the address is now over its limit


def test_a_process_takes_its_allowance_in_leases_not_a_round_trip_per_event(make_app, redis):
    app = isolated_app({"INGEST_RATE_LIMIT": "1000/minute"})  # leases of 10 events
    client = app.test_client()
    app_id, key = make_app()
    for n in range(25):
        assert send(client, app_id, key, {"event_name": "e", "n": n}).status_code == 202
    # Three leases of 10 were counted in Redis for 25 events, not 25 hits.
    assert int(redis.hget(f"intake:ratelimit:ingest:{app_id}", "cur")) == 30
    assert len(client.application.extensions["intake.ingest_limit"].leases) == 1


def hammer(base_url, path, key, until, results):
    """Send single events on one keep-alive connection until `until` (epoch s); note each answer."""
    import http.client
    from urllib.parse import urlsplit

    host = urlsplit(base_url)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=10)
    body = b'{"event_name": "e"}'
    headers = {"Content-Type": "application/json", "X-API-Key": key}
    while time.time() < until:
        sent = time.time()
        conn.request("POST", path, body, headers)
        response = conn.getresponse()
        response.read()
        results.append((sent, time.time(), response.status, dict(response.getheaders())))
    conn.close()


def test_every_process_together_holds_the_limit_over_several_windows(stack, make_app):
    """Two gunicorn processes, hammered by 24 connections: a window admits the limit, +-5 %."""
    import threading

    limit, window = 300, 2  # 300 per 2 seconds: leases of 3 events
    stack.web(workers=2, threads=8, INGEST_RATE_LIMIT=f"{limit}/{window} seconds")
    app_id, key = make_app()
    other_id, other_key = make_app()
    started = time.time()
    # Windows are numbered from the epoch (Redis's clock, this machine's). Skip the partial first one.
    first, windows = window * math.ceil((started + 1) / window), 3
    until = first + windows * window + 0.2
    results, other = [], []
    threads = [threading.Thread(target=hammer, args=(stack.base_url, f"/api/logs/{app_id}", key, until, results))
               for _ in range(24)]

    def another_app():  # a few events meanwhile: the first app's limit is not its own
        while time.time() < until:
            other.append(stack.post(f"/api/logs/{other_id}", {"event_name": "e"}, {"X-API-Key": other_key}).status_code)
            time.sleep(0.05)

    threads.append(threading.Thread(target=another_app))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    accepted = [r for r in results if r[2] == 202]
    refused = [r for r in results if r[2] == 429]
    assert len(accepted) + len(refused) == len(results)  # nothing else: no 500, no 503
    # The clients asked for much more than the limit (so the limit bound them throughout) ...
    rate = len(results) / (until - started)
    assert rate > 1.5 * limit / window, f"only {rate:.0f} requests/s"
    # ... a burst over the limit in the window the clients started in was cut at the limit ...
    assert sum(1 for r in accepted if (r[0] + r[1]) / 2 < window * math.ceil(started / window)) <= 1.05 * limit
    # ... no whole window admitted more than the limit (+5 %: counted by the middle of each
    # request, as the admission happened between sending it and the answer) ...
    bounds = [(first + n * window, first + (n + 1) * window) for n in range(windows)]
    per_window = [sum(1 for r in accepted if start <= (r[0] + r[1]) / 2 < end) for start, end in bounds]
    assert all(count <= 1.05 * limit for count in per_window), per_window
    # ... and every window whose clients were still being refused at its end (the limit bound it
    # to the last, which a loaded machine's slow answers can prevent) admitted at least 95 %.
    bound_to_the_end = [count for count, (start, end) in zip(per_window, bounds)
                        if any(end - 0.05 * window <= r[0] < end for r in refused)]
    assert bound_to_the_end, f"the clients could not keep the limit busy: {per_window}"
    assert all(count >= 0.95 * limit for count in bound_to_the_end), per_window
    headers = refused[-1][3]
    assert headers["RateLimit-Limit"] == str(limit)
    assert int(headers["Retry-After"]) >= 1 and 1 <= int(headers["RateLimit-Reset"]) <= window
    assert 0 <= int(headers["RateLimit-Remaining"]) < limit
    assert other and set(other) == {202}


def test_a_refusal_answered_from_memory_gives_the_same_retry_after(limited, make_app):
    app_id, key = make_app()
    for n in range(5):
        assert send(limited, app_id, key, {"event_name": "e", "n": n}).status_code == 202
    first, second = (send(limited, app_id, key, {"event_name": "e"}) for _ in range(2))  # the second within 50 ms
    assert_rate_limited(first)
    assert_rate_limited(second)
    # 5 of 5 in this minute: one more fits once the window has moved on by a fifth (12 s or more).
    assert int(first.headers["Retry-After"]) >= 12
    assert int(first.headers["Retry-After"]) - int(second.headers["Retry-After"]) in (0, 1)
