"""The factory, the configuration and the one JSON error shape."""
import pytest

from app import create_app
from app.config import Config


def test_health(client):
    assert client.get("/health").get_json() == {"status": "ok"}


def test_unknown_route_is_json_404(client):
    response = client.get("/no/such/route")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


def test_wrong_method_is_json_405(client):
    response = client.delete("/health")
    assert response.status_code == 405
    assert response.get_json()["error"]["code"] == "method_not_allowed"
    assert "GET" in response.headers["Allow"]


def test_unexpected_error_is_json_500_without_trace():
    app = create_app()

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internals")

    response = app.test_client().get("/boom")
    assert response.status_code == 500
    assert response.get_json() == {"error": {"code": "internal_error",
                                             "message": "Something went wrong on our side; retry later.",
                                             "details": []}}
    assert b"secret internals" not in response.data and b"Traceback" not in response.data


def test_production_refuses_to_start_without_secrets():
    with pytest.raises(RuntimeError, match="SECRET_KEY, JWT_SECRET_KEY"):
        Config({"APP_ENV": "production"})
    with pytest.raises(RuntimeError, match="JWT_SECRET_KEY"):
        Config({"APP_ENV": "production", "SECRET_KEY": "s"})
    assert Config({"APP_ENV": "production", "SECRET_KEY": "s", "JWT_SECRET_KEY": "j"}).SECRET_KEY == "s"


def test_database_urls_name_the_shipped_driver():
    assert Config({"DATABASE_URL": "postgres://u:p@db:5432/x"}).SQLALCHEMY_DATABASE_URI == \
        "postgresql+psycopg2://u:p@db:5432/x"
    assert Config({"DATABASE_URL": "postgresql://db/x"}).SQLALCHEMY_DATABASE_URI == "postgresql+psycopg2://db/x"
    assert Config({"INSTANCE_PATH": "/tmp/i"}).SQLALCHEMY_DATABASE_URI == "sqlite:////tmp/i/intake.db"


def test_broker_defaults():
    assert Config({}).CELERY_BROKER_URL == "filesystem://localhost/"
    assert Config({"REDIS_URL": "redis://r:6379/1"}).CELERY_BROKER_URL == "redis://r:6379/1"
    assert Config({"REDIS_URL": "redis://r/1", "CELERY_BROKER_URL": "amqp://mq"}).CELERY_BROKER_URL == "amqp://mq"


def test_database_unavailable_is_503_not_500(tmp_path):
    from tests.conftest import free_port

    app = create_app({"SQLALCHEMY_DATABASE_URI": f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/none"})
    response = app.test_client().get("/api/logs/some-app/events/some-event", headers={"X-API-Key": "k"})
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "service_unavailable"
    assert response.headers["Retry-After"]


def test_any_database_outage_is_503():
    from sqlalchemy.exc import OperationalError

    app = create_app()

    @app.get("/needs-database")
    def needs_database():
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    response = app.test_client().get("/needs-database")
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "service_unavailable"


@pytest.mark.parametrize("name", ["staging", "prod", "Production", "dev", " production"])
def test_an_unknown_app_env_is_refused(name):
    # Only development and testing may run on the built-in development keys.
    with pytest.raises(RuntimeError, match="APP_ENV must be one of development, testing, production"):
        Config({"APP_ENV": name, "SECRET_KEY": "s", "JWT_SECRET_KEY": "j"})


def test_development_and_testing_get_development_keys():
    for name in ("development", "testing"):
        assert Config({"APP_ENV": name}).SECRET_KEY
    assert Config({}).APP_ENV == "development"
