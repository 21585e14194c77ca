"""Settings read once from the environment."""
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


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
        self.APP_ENV = env.get("APP_ENV", "development")
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
        self.CELERY_BROKER_URL = env.get("CELERY_BROKER_URL") or self.REDIS_URL or "filesystem://"
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
