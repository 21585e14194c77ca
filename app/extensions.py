"""Extensions, unbound: the factory binds them to an app."""
import gc

from celery import Celery, Task
from celery.signals import worker_process_init
from flask import Flask, has_app_context
from flask_jwt_extended import JWTManager
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_migrate import Migrate
from flask_smorest import Api
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase

import celery_config
from app import folder_broker


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
migrate = Migrate()
jwt = JWTManager()
# The JSON API's OpenAPI document (/api/openapi.json) and its docs page (/api/docs).
api = Api()


def rollback_session() -> None:
    """Roll back the session; if the connection itself is gone, let the pool replace it."""
    try:
        db.session.rollback()
    except Exception:
        db.session.invalidate()


def with_reconnect(work):
    """Run `work()`; if the database had dropped the pooled connection, once more on a new one.

    Pooled connections are not pinged before use (a round trip per task): a connection the
    database closed (restart, idle timeout) is found out on first use instead, and the pool
    then replaces every connection older than the failure.
    """
    try:
        return work()
    except DBAPIError as error:
        rollback_session()
        if not error.connection_invalidated:
            raise
    return work()


# Storage from RATELIMIT_STORAGE_URI; app/limits.py holds the limits. A storage outage never
# fails a request: decorated limits fall back to per-process memory (see app/limits.py).
limiter = Limiter(
    key_func=get_remote_address, strategy="sliding-window-counter", in_memory_fallback_enabled=True, swallow_errors=True
)


def celery_init_app(app: Flask) -> Celery:
    """Create the Celery app whose tasks run inside this Flask app's context."""

    class FlaskTask(Task):
        def __call__(self, *args, **kwargs):
            # Eager mode and tests already have a context; a second one would hide theirs.
            if has_app_context():
                return self.run(*args, **kwargs)
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.import_name, task_cls=FlaskTask)
    celery_app.config_from_object("celery_config")
    broker_url = app.config["CELERY_BROKER_URL"]
    celery_app.conf.broker_url = broker_url
    if broker_url.startswith("filesystem://"):
        celery_app.conf.update(folder_broker.settings(app.config["BROKER_FOLDER"]))
    elif celery_config.is_amqp(broker_url):
        celery_app.conf.update(celery_config.AMQP_SETTINGS)

    @worker_process_init.connect(weak=False)
    def fresh_database_connections(**_):
        # A forked pool child must not share the parent's database connections.
        with app.app_context():
            db.engine.dispose(close=False)
        # What the child inherited is there for good: keep the collector's full passes off it
        # (as gunicorn.conf.py does for web workers).
        gc.freeze()

    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app

