"""Settings read once from the environment."""
import os
from datetime import timedelta
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
APP_ENVS = ("development", "testing", "production")


def _int(env, name, default):
    return int(env.get(name) or default)


def _database_url(env, instance):
    url = env.get("DATABASE_URL")
    if not url:
        return f"sqlite:///{instance / 'intake.db'}"
    # Heroku-style URLs say postgres://, which SQLAlchemy no longer accepts, and
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3: name the driver we ship.
    for scheme in ("postgres://", "postgresql://"):
        if url.startswith(scheme):
            return "postgresql+psycopg2://" + url[len(scheme):]
    return url


class Config:
    """One configuration for every process, read from the environment."""

    def __init__(self, env=None):
        env = os.environ if env is None else env
        self.APP_ENV = env.get("APP_ENV") or "development"
        if self.APP_ENV not in APP_ENVS:
            # Anything but production would run on the development keys below: a typo such
            # as "prod" or a "staging" must not start a server with publicly known secrets.
            raise RuntimeError(f"APP_ENV must be one of {', '.join(APP_ENVS)}, not {self.APP_ENV!r}")
        self.TESTING = self.APP_ENV == "testing"
        self.SECRET_KEY = env.get("SECRET_KEY")
        self.JWT_SECRET_KEY = env.get("JWT_SECRET_KEY")
        if self.APP_ENV == "production":
            missing = [k for k in ("SECRET_KEY", "JWT_SECRET_KEY") if not getattr(self, k)]
            if missing:
                raise RuntimeError(f"production needs {', '.join(missing)} in the environment")
        else:
            # Development and tests only: a fixed key is harmless where nothing is real.
            self.SECRET_KEY = self.SECRET_KEY or "dev-secret-key-not-for-production"
            self.JWT_SECRET_KEY = self.JWT_SECRET_KEY or self.SECRET_KEY

        # instance/ holds the embedded default's SQLite file, broker and pending folders.
        instance = Path(env.get("INSTANCE_PATH") or PROJECT_ROOT / "instance")
        self.INSTANCE_PATH = str(instance)
        self.SQLALCHEMY_DATABASE_URI = _database_url(env, instance)
        self.SQLALCHEMY_ENGINE_OPTIONS = {"pool_pre_ping": False}  # see extensions.with_reconnect
        if self.SQLALCHEMY_DATABASE_URI.startswith("postgresql"):
            # A database that hangs must not hold request threads (rules cache misses).
            self.SQLALCHEMY_ENGINE_OPTIONS["connect_args"] = {"connect_timeout": 3}
        self.REDIS_URL = env.get("REDIS_URL") or None
        # The embedded broker's URL names a host only so that kombu does not warn of a missing one.
        self.CELERY_BROKER_URL = env.get("CELERY_BROKER_URL") or self.REDIS_URL or "filesystem://localhost/"
        self.BROKER_FOLDER = str(instance / "broker")
        self.PENDING_FOLDER = str(instance / "pending")

        self.MAIL_SERVER = env.get("MAIL_SERVER") or None
        self.MAIL_PORT = _int(env, "MAIL_PORT", 587)
        self.MAIL_USERNAME = env.get("MAIL_USERNAME") or None
        self.MAIL_PASSWORD = env.get("MAIL_PASSWORD") or None
        self.MAIL_USE_TLS = env.get("MAIL_USE_TLS", "true").lower() in ("1", "true", "yes")
        self.MAIL_FROM = env.get("MAIL_FROM", "Intake <no-reply@intake.local>")
        self.MAIL_TIMEOUT = _int(env, "MAIL_TIMEOUT", 10)

        self.RULES_CACHE_TTL = float(env.get("RULES_CACHE_TTL") or 5)
        # Apps each API process keeps cached (least recently used go first).
        self.RULES_CACHE_SIZE = _int(env, "RULES_CACHE_SIZE", 10_000)
        self.INGEST_MAX_EVENT_BYTES = _int(env, "INGEST_MAX_EVENT_BYTES", 1024 * 1024)
        self.INGEST_MAX_BATCH_BYTES = _int(env, "INGEST_MAX_BATCH_BYTES", 5 * 1024 * 1024)
        self.INGEST_MAX_BATCH_EVENTS = _int(env, "INGEST_MAX_BATCH_EVENTS", 1000)
        self.INGEST_MAX_DEPTH = _int(env, "INGEST_MAX_DEPTH", 10)
        self.INGEST_RATE_LIMIT = env.get("INGEST_RATE_LIMIT") or None
        # Rate-limit counters: Redis, shared by every process; per-process memory without it.
        self.RATELIMIT_STORAGE_URI = env.get("RATELIMIT_STORAGE_URI") or self.REDIS_URL or "memory://"
        self.AUTH_RATE_LIMIT_PER_IP = env.get("AUTH_RATE_LIMIT_PER_IP") or "60/minute;600/hour"
        self.AUTH_RATE_LIMIT_PER_ACCOUNT = env.get("AUTH_RATE_LIMIT_PER_ACCOUNT") or "10/minute;100/hour"
        # Group commit: single events arriving together travel in one message.
        self.INGEST_GROUP_WINDOW_MS = float(env.get("INGEST_GROUP_WINDOW_MS") or 2)
        self.INGEST_GROUP_MAX_EVENTS = _int(env, "INGEST_GROUP_MAX_EVENTS", 500)
        self.INGEST_PUBLISH_TIMEOUT = float(env.get("INGEST_PUBLISH_TIMEOUT") or 1.5)
        # The lease of a pending group (app/pending.py): a message lost this long is published again.
        self.INGEST_REDELIVER_AFTER = float(env.get("INGEST_REDELIVER_AFTER") or 15)

        self.PERSIST_MAX_RETRIES = _int(env, "PERSIST_MAX_RETRIES", 5)
        self.PERSIST_RETRY_BACKOFF = float(env.get("PERSIST_RETRY_BACKOFF") or 2)
        self.PERSIST_RETRY_BACKOFF_MAX = 600.0

        # Accounts: access tokens are short-lived, refresh tokens long-lived; `sub` is the user id.
        self.JWT_ACCESS_TOKEN_EXPIRES = timedelta(seconds=_int(env, "JWT_ACCESS_TOKEN_SECONDS", 900))
        self.JWT_REFRESH_TOKEN_EXPIRES = timedelta(seconds=_int(env, "JWT_REFRESH_TOKEN_SECONDS", 30 * 86400))
        self.JWT_TOKEN_LOCATION = ["headers"]

        # OpenAPI document and docs page (flask-smorest).
        self.API_TITLE = "Intake"
        self.API_VERSION = "1"
        self.OPENAPI_VERSION = "3.0.3"
        self.OPENAPI_URL_PREFIX = "/api"
        self.OPENAPI_JSON_PATH = "openapi.json"
        # App deletion: rows removed per transaction, and how long the app row (the mark)
        # stays after its data is gone, while late-stored events of the app are swept again.
        self.DELETE_CHUNK_ROWS = _int(env, "DELETE_CHUNK_ROWS", 5000)
        self.DELETE_SETTLE_SECONDS = float(env.get("DELETE_SETTLE_SECONDS") or 3600)
        # The docs page's Swagger UI assets are vendored in app/static/swagger-ui (app/openapi.py serves them).
        self.OPENAPI_SWAGGER_UI_PATH = "docs"
        self.OPENAPI_SWAGGER_UI_URL = "/api/docs/assets/"
        # Console (/console): the same JWTs in cookies too. HttpOnly cookies, Secure in production,
        # SameSite=Lax; every change carries the double-submit CSRF token (a form field or the header).
        self.JWT_TOKEN_LOCATION = ["headers", "cookies"]
        self.JWT_COOKIE_SECURE = self.APP_ENV == "production"
        self.JWT_COOKIE_SAMESITE = "Lax"
        self.JWT_COOKIE_CSRF_PROTECT = True
        self.JWT_CSRF_CHECK_FORM = True
        self.JWT_ACCESS_CSRF_FIELD_NAME = "csrf_token"
        self.JWT_SESSION_COOKIE = False
        self.SESSION_COOKIE_SECURE = self.JWT_COOKIE_SECURE  # the console's flash messages
        self.SESSION_COOKIE_SAMESITE = "Lax"
