"""The management routes (JWT): /api/apps, its keys, rules and events. Load → check → act → respond."""
from http import HTTPStatus

from flask import request
from flask.views import MethodView
from flask_jwt_extended import get_jwt_identity, jwt_required
from flask_smorest import Blueprint as SmorestBlueprint
from webargs.flaskparser import FlaskParser, is_json_request

from app import lifecycle, rollups
from app.errors import ApiError
from app.ingest import checks
from app.manage import app_rules, apps, event_queries
from app.manage.schemas import (AppCreate, AppCreated, AppDeleting, AppKey, AppList, AppOut, AppPatch, ErrorAnswer,
                                EventList, EventOut, EventQuery, FailedEventsOut, FailedEventsQuery, ReplayIn,
                                ReplayOut, RuleIn, RuleList, RuleOut, RulePatch, StatsOut, StatsQuery)

# A rule body (its schema included) is small; anything larger is refused before it is read.
MAX_BODY_BYTES = 256 * 1024


class JsonParser(FlaskParser):
    """webargs' parser reading bodies as ingestion does: only JSON that PostgreSQL can store."""

    def _raw_load_json(self, req):
        if not is_json_request(req):
            raise ApiError(415, "unsupported_media_type",
                           "Send the body as JSON with 'Content-Type: application/json'.")
        return checks.parse_json(req.get_data(cache=True))  # 400 invalid_json, 422 nesting_too_deep


class Blueprint(SmorestBlueprint):
    ARGUMENTS_PARSER = JsonParser()


def _limit_body():
    # Werkzeug then answers 413 for a larger body, whether Content-Length says so or not.
    request.max_content_length = MAX_BODY_BYTES


apps_blp = Blueprint("apps", __name__, url_prefix="/api/apps", description="Your apps and their keys.")
rules_blp = Blueprint("rules", __name__, url_prefix="/api/apps/<app_id>/rules",
                      description="An app's validation rules.")
events_blp = Blueprint("events", __name__, url_prefix="/api/apps/<app_id>/events",
                       description="An app's stored events.")
for _blueprint in (apps_blp, rules_blp, events_blp):
    _blueprint.before_request(_limit_body)


# The error answers of these routes by code (422 `invalid_request`: a body or query against its schema).
ERROR_STATUS = {"invalid_json": 400, "invalid_cursor": 400, "app_not_found": 404, "rule_not_found": 404,
                "event_not_found": 404, "too_many_rules": 409, "payload_too_large": 413, "unsupported_media_type": 415,
                "invalid_request": 422, "nesting_too_deep": 422, "invalid_query": 400, "invalid_limit": 400,
                "invalid_ids": 400, "queue_unavailable": 503}
BODY_ERRORS = ("invalid_json", "payload_too_large", "unsupported_media_type", "invalid_request", "nesting_too_deep")
# What flask-jwt-extended's refusals answer (the accounts work's error loaders), on every route here.
TOKEN_ERRORS = ("missing_token", "invalid_token", "token_expired", "token_revoked", "wrong_token_type")
BEARER = [{"bearerAuth": []}]


def fails_with(*codes):
    """Document a route's token and error answers in the OpenAPI document (the one error shape, codes by status)."""
    by_status = {401: list(TOKEN_ERRORS)}
    for code in codes:
        by_status.setdefault(ERROR_STATUS[code], []).append(code)

    def decorate(view):
        for status, names in by_status.items():
            description = f"{HTTPStatus(status).phrase}: " + ", ".join(f"`{name}`" for name in names)
            view = apps_blp.alt_response(status, schema=ErrorAnswer, description=description)(view)
        return apps_blp.doc(security=BEARER)(view)

    return decorate


def my_app(app_id: str):
    """The caller's app (404 `app_not_found` for anybody else's)."""
    return apps.owned_app(get_jwt_identity(), app_id)


# --- apps ----------------------------------------------------------------------------------


@apps_blp.route("")
class Apps(MethodView):
    decorators = [jwt_required()]

    @apps_blp.response(200, AppList)
    @fails_with()
    def get(self):
        """List your apps."""
        return {"apps": apps.list_apps(get_jwt_identity())}

    @apps_blp.arguments(AppCreate)
    @apps_blp.response(201, AppCreated)
    @fails_with(*BODY_ERRORS)
    def post(self, body):
        """Create an app; its key is in this answer only."""
        record, key = apps.add_app(apps.account(get_jwt_identity()), body["name"], body["retention_days"])
        return {"id": record.id, "name": record.name, "retention_days": record.retention_days,
                "created_at": record.created_at, "api_key": key}


@apps_blp.route("/<app_id>")
class OneApp(MethodView):
    decorators = [jwt_required()]

    @apps_blp.response(200, AppOut)
    @fails_with("app_not_found")
    def get(self, app_id):
        """Read one app."""
        return my_app(app_id)

    @apps_blp.arguments(AppPatch)
    @apps_blp.response(200, AppOut)
    @fails_with("app_not_found", *BODY_ERRORS)
    def patch(self, changes, app_id):
        """Rename an app or change its retention."""
        return apps.change_app(my_app(app_id), changes)

    @apps_blp.response(202, AppDeleting)
    @fails_with("app_not_found")
    def delete(self, app_id):
        """Delete an app: its key stops working at once, its data is removed in the background."""
        record = my_app(app_id)
        apps.delete_app(record)
        return {"id": record.id, "status": "deleting"}


@apps_blp.route("/<app_id>/api-key")
class AppApiKey(MethodView):
    decorators = [jwt_required()]

    @apps_blp.response(201, AppKey)
    @fails_with("app_not_found")
    def post(self, app_id):
        """Rotate the app's key: the old one stops working; the new one is in this answer only."""
        record = my_app(app_id)
        return {"id": record.id, "api_key": apps.rotate_key(record)}


# --- rules ---------------------------------------------------------------------------------


@rules_blp.route("")
class Rules(MethodView):
    decorators = [jwt_required()]

    @rules_blp.response(200, RuleList)
    @fails_with("app_not_found")
    def get(self, app_id):
        """List the app's rules."""
        return {"rules": app_rules.list_rules(my_app(app_id))}

    @rules_blp.arguments(RuleIn)
    @rules_blp.response(201, RuleOut)
    @fails_with("app_not_found", "too_many_rules", *BODY_ERRORS)
    def post(self, fields, app_id):
        """Add a rule: a JSON Schema (2020-12) that rejects or flags the events it does not match."""
        return app_rules.create_rule(my_app(app_id), fields)


@rules_blp.route("/<rule_id>")
class OneRule(MethodView):
    decorators = [jwt_required()]

    @rules_blp.response(200, RuleOut)
    @fails_with("app_not_found", "rule_not_found")
    def get(self, app_id, rule_id):
        """Read one rule."""
        return app_rules.app_rule(my_app(app_id), rule_id)

    @rules_blp.arguments(RuleIn)
    @rules_blp.response(200, RuleOut)
    @fails_with("app_not_found", "rule_not_found", *BODY_ERRORS)
    def put(self, fields, app_id, rule_id):
        """Replace a rule."""
        return app_rules.change_rule(app_rules.app_rule(my_app(app_id), rule_id), fields)

    @rules_blp.arguments(RulePatch(partial=True))
    @rules_blp.response(200, RuleOut)
    @fails_with("app_not_found", "rule_not_found", *BODY_ERRORS)
    def patch(self, fields, app_id, rule_id):
        """Change some of a rule's fields, e.g. {"enabled": false}."""
        return app_rules.change_rule(app_rules.app_rule(my_app(app_id), rule_id), fields)

    @rules_blp.response(204)
    @fails_with("app_not_found", "rule_not_found")
    def delete(self, app_id, rule_id):
        """Delete a rule."""
        app_rules.delete_rule(app_rules.app_rule(my_app(app_id), rule_id))


# --- events --------------------------------------------------------------------------------


@events_blp.route("")
class Events(MethodView):
    decorators = [jwt_required()]

    @events_blp.arguments(EventQuery, location="query")
    @events_blp.response(200, EventList)
    @fails_with("app_not_found", "invalid_cursor", "invalid_request")
    def get(self, query, app_id):
        """List the app's stored events, newest first, a page at a time (pass next_cursor as cursor)."""
        rows, next_cursor = event_queries.list_events(my_app(app_id).id, **query)
        return {"events": rows, "next_cursor": next_cursor}


@events_blp.route("/<path:event_id>")  # client event ids may hold slashes
class OneEvent(MethodView):
    decorators = [jwt_required()]

    @events_blp.response(200, EventOut)
    @fails_with("app_not_found", "event_not_found")
    def get(self, app_id, event_id):
        """Read one stored event: payload, normalised fields, validation result, received and processed times."""
        return event_queries.get_event(my_app(app_id).id, event_id)


# --- stats and failed events (app/rollups.py, app/lifecycle.py) ------------------------------


@apps_blp.route("/<app_id>/stats")
class Stats(MethodView):
    decorators = [jwt_required()]

    @apps_blp.arguments(StatsQuery, location="query")
    @apps_blp.response(200, StatsOut)
    @fails_with("app_not_found", "invalid_query", "invalid_request")
    def get(self, query, app_id):
        """Counts by bucket, event name and level, from the rollups alone."""
        return rollups.app_stats(my_app(app_id).id, **query)


@apps_blp.route("/<app_id>/failed-events")
class FailedEvents(MethodView):
    decorators = [jwt_required()]

    @apps_blp.arguments(FailedEventsQuery, location="query")
    @apps_blp.response(200, FailedEventsOut)
    @fails_with("app_not_found", "invalid_cursor", "invalid_limit", "invalid_request")
    def get(self, query, app_id):
        """The app's failed events (dead letters), newest failure first, a page at a time."""
        return lifecycle.failed_events_page(my_app(app_id).id, **query)


@apps_blp.route("/<app_id>/failed-events/replay")
class ReplayFailedEvents(MethodView):
    decorators = [jwt_required()]

    @apps_blp.arguments(ReplayIn)
    @apps_blp.response(202, ReplayOut)
    @fails_with("app_not_found", "invalid_ids", "queue_unavailable", *BODY_ERRORS)
    def post(self, body, app_id):
        """Replay the app's failed events (all, or these ids) through the normal persistence path."""
        return lifecycle.replay_failed_events(my_app(app_id).id, body.get("ids"))


BLUEPRINTS = (apps_blp, rules_blp, events_blp)
