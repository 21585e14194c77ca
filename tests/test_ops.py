"""GET /health and GET /ready: liveness, and readiness that follows the database and the broker."""
import time

import pytest

from tests.conftest import free_port
from tests.private_redis import PrivateRedis, SilentServer, isolated_app


def timed_get(client_or_stack, path):
    started = time.monotonic()
    response = client_or_stack.get(path)
    return response, time.monotonic() - started


def test_health_touches_no_dependency(tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = isolated_app({"SQLALCHEMY_DATABASE_URI": f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/none",
                        "REDIS_URL": dead, "CELERY_BROKER_URL": dead})
    response = app.test_client().get("/health")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_ready_when_database_and_broker_answer(client):
    response = client.get("/ready")
    assert response.status_code == 200
    body = response.get_json()
    assert body["database"] == "ok" and body["broker"] == "ok"
    assert set(body) <= {"database", "broker", "warnings"}


@pytest.fixture
def broker_to_stop(request, broker, tmp_path):
    """(a server the test can stop and start, the settings that make it the broker): on each broker."""
    if broker.name == "amqp":
        proxy = request.getfixturevalue("rabbit_proxy")
        yield proxy, {"CELERY_BROKER_URL": proxy.url}
        return
    server = PrivateRedis(tmp_path).start()
    yield server, {"REDIS_URL": server.url, "CELERY_BROKER_URL": server.url}
    server.stop()


def test_ready_follows_the_broker_down_and_back_without_restart(broker, stack, broker_to_stop):
    """A real gunicorn on a broker of its own: stop it → 503 naming the broker; start it → 200."""
    server, settings = broker_to_stop
    stack.web(workers=1, **settings)
    response = stack.get("/ready")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["database"] == "ok" and body["broker"] == "ok"
    if broker.name == "redis":
        # The private server runs with --save "" --appendonly no: the operator is warned.
        assert any("persistence is off" in warning for warning in body["warnings"])

    server.stop()
    for _ in range(2):  # every call checks again: no cached answer
        response, took = timed_get(stack, "/ready")
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "not_ready"
        assert "broker" in error["message"] and "database" not in error["message"]
        assert [detail["path"] for detail in error["details"]] == ["/broker"]
        assert "broker" in error["details"][0]["message"]
        assert took < 2.5

    server.start()  # same port
    response = stack.get("/ready")
    assert response.status_code == 200, response.text
    assert response.json()["broker"] == "ok"


def test_ready_names_the_database_when_it_is_unreachable():
    app = isolated_app({"SQLALCHEMY_DATABASE_URI": f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/none"})
    response, took = timed_get(app.test_client(), "/ready")
    assert response.status_code == 503
    error = response.get_json()["error"]
    assert error["code"] == "not_ready"
    assert "database" in error["message"] and "broker" not in error["message"]
    assert [detail["path"] for detail in error["details"]] == ["/database"]
    assert took < 2.5


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_ready_answers_in_about_a_second_when_the_broker_hangs(scheme, test_environment):
    silent = SilentServer()
    try:
        url = f"{scheme}://guest:guest@127.0.0.1:{silent.port}/0"
        pending = url if scheme == "redis" else test_environment["REDIS_URL"]
        client = isolated_app({"REDIS_URL": pending, "CELERY_BROKER_URL": url}).test_client()
        for _ in range(2):  # the second call finds the first check still hanging: not ready either
            response, took = timed_get(client, "/ready")
            assert response.status_code == 503
            assert [d["path"] for d in response.get_json()["error"]["details"]] == ["/broker"]
            assert took < 2.0
    finally:
        silent.close()


def test_ready_warns_about_eviction_and_keeps_quiet_when_config_is_refused(tmp_path):
    evicting = PrivateRedis(tmp_path, "--maxmemory-policy", "allkeys-lru").start()
    managed = PrivateRedis(tmp_path, "--rename-command", "CONFIG", "").start()
    try:
        body = isolated_app({"REDIS_URL": evicting.url, "CELERY_BROKER_URL": evicting.url}).test_client() \
            .get("/ready").get_json()
        assert any("maxmemory-policy is allkeys-lru" in warning for warning in body["warnings"])

        response = isolated_app({"REDIS_URL": managed.url, "CELERY_BROKER_URL": managed.url}).test_client() \
            .get("/ready")
        assert response.status_code == 200
        assert response.get_json() == {"database": "ok", "broker": "ok"}
    finally:
        evicting.stop()
        managed.stop()


def test_ready_checks_the_folder_of_the_filesystem_broker(tmp_path):
    app = isolated_app({"CELERY_BROKER_URL": "filesystem://", "BROKER_FOLDER": str(tmp_path / "broker")})
    client = app.test_client()
    assert client.get("/ready").get_json()["broker"] == "ok"
    (tmp_path / "broker" / "queue").rmdir()
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.get_json()["error"]["details"][0]["path"] == "/broker"


def test_ready_warns_when_a_message_found_no_pending_record(client, app):
    pending = app.extensions["intake.pending"]
    assert "warnings" not in client.get("/ready").get_json() or not any(
        "pending store" in w for w in client.get("/ready").get_json()["warnings"])
    pending.note_missing("default", "g-gone")
    response = client.get("/ready")
    assert response.status_code == 200
    [warning] = [w for w in response.get_json()["warnings"] if w.startswith("pending store")]
    assert "g-gone" in warning and "lost data" in warning


def test_ready_warns_on_the_embedded_default_too(tmp_path):
    app = isolated_app({"CELERY_BROKER_URL": "filesystem://", "BROKER_FOLDER": str(tmp_path / "broker"),
                        "REDIS_URL": None, "PENDING_FOLDER": str(tmp_path / "pending")})
    app.extensions["intake.pending"].note_missing("batch_processing", "g-gone")
    body = app.test_client().get("/ready").get_json()
    assert body["broker"] == "ok" and "g-gone" in body["warnings"][0]
