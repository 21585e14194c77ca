"""Intake: an event and log ingestion service."""
from flask import Flask

from app import redelivery, rollup_timer
from app.config import PROJECT_ROOT, Config
from app.extensions import api, celery_init_app, db, jwt, migrate
from app.pending import pending_store_from_config
from app.publisher import Publisher
from app.rules import RulesCache


def create_app(config: dict | None = None) -> Flask:
    """Build the Flask app; `config` overrides settings read from the environment."""
    settings = Config()
    app = Flask(__name__, instance_path=settings.INSTANCE_PATH, static_folder=None)
    app.config.from_object(settings)
    app.config.update(config or {})
    app.json.sort_keys = False

    db.init_app(app)
    migrate.init_app(app, db, directory=str(PROJECT_ROOT / "migrations"))
    jwt.init_app(app)
    api.init_app(app)  # before our error handlers, which replace its HTTPException handler
    celery = celery_init_app(app)
    pending = pending_store_from_config(app.config)
    app.extensions["intake.pending"] = pending
    app.extensions["intake.rules"] = RulesCache(app.config["RULES_CACHE_TTL"], size=app.config["RULES_CACHE_SIZE"])
    app.extensions["intake.publisher"] = Publisher(
        celery,
        pending,
        window_ms=app.config["INGEST_GROUP_WINDOW_MS"],
        max_events=app.config["INGEST_GROUP_MAX_EVENTS"],
        timeout=app.config["INGEST_PUBLISH_TIMEOUT"],
    )

    # tasks register themselves with Celery
    from app import accounts, cli, errors, invalidation, limits, logs, metrics, openapi, tasks  # noqa: F401
    from app.console.views import bp as console_bp
    from app.ingest.views import bp as ingest_bp
    from app.ingest.views import otlp_bp
    from app.manage.views import BLUEPRINTS as manage_blueprints
    from app.ops import bp as ops_bp

    app.register_blueprint(ops_bp)
    app.register_blueprint(ingest_bp)
    app.register_blueprint(otlp_bp)
    openapi.init_app(app)
    accounts.init_app(app)
    for blueprint in manage_blueprints:
        api.register_blueprint(blueprint)
    invalidation.init_app(app)
    app.register_blueprint(console_bp)
    errors.register_error_handlers(app)
    cli.register_commands(app)
    logs.init_app(app)
    metrics.init_app(app)
    limits.init_app(app)
    redelivery.init_app(app, celery)
    rollup_timer.init_app(app, celery)
    return app
