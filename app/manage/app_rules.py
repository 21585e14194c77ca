"""An app's validation rules: list, create, read, replace or change, delete.

Every change is published (app/invalidation.py), so every API process applies it before the
change is answered, or at the latest within RULES_CACHE_TTL.
"""
from marshmallow import ValidationError

from app import invalidation
from app.errors import ApiError, schema_details
from app.extensions import db
from app.manage.apps import active_app, canonical_id
from app.manage.schemas import RuleIn
from app.models import App, Rule

# Each enabled rule costs every matching event a JSON Schema validation on the ingestion path.
MAX_RULES_PER_APP = 100
FIELDS = ("name", "event_name", "schema", "action", "enabled")


def validate_rule(body) -> dict:
    """Check a rule body as the rules API takes it (e.g. a CLI file); return the fields to store."""
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", "a rule is a JSON object")
    try:
        return RuleIn().load(body)
    except ValidationError as error:
        details = schema_details(error.messages)
        first = details[0]
        raise ApiError(422, "invalid_request", f"rule '{first['path'].lstrip('/')}': {first['message']}",
                       details) from None


def rule_not_found() -> ApiError:
    return ApiError(404, "rule_not_found", "The app has no rule with this id.")


def list_rules(app: App) -> list[Rule]:
    """The app's rules, oldest first."""
    return list(db.session.scalars(db.select(Rule).where(Rule.app_id == app.id).order_by(Rule.created_at, Rule.id)))


def app_rule(app: App, rule_id: str) -> Rule:
    """One of the app's rules (404 for a rule of another app, as for an unknown one)."""
    key = canonical_id(rule_id)
    rule = db.session.get(Rule, key) if key else None
    if rule is None or rule.app_id != app.id:
        raise rule_not_found()
    return rule


def rule_by_id(rule_id: str) -> Rule:
    """A rule of any active app (operators)."""
    key = canonical_id(rule_id)
    rule = db.session.get(Rule, key) if key else None
    if rule is None:
        raise rule_not_found()
    active_app(rule.app_id)
    return rule


def create_rule(app: App, fields: dict) -> Rule:
    """Add a checked rule (see `validate_rule`) to the app."""
    count = db.session.scalar(db.select(db.func.count()).select_from(Rule).where(Rule.app_id == app.id))
    if count >= MAX_RULES_PER_APP:
        raise ApiError(409, "too_many_rules", f"An app holds at most {MAX_RULES_PER_APP} rules; delete one first.")
    rule = Rule(app_id=app.id, **{field: fields[field] for field in FIELDS})
    db.session.add(rule)
    db.session.commit()
    invalidation.app_changed(app.id)
    return rule


def change_rule(rule: Rule, fields: dict) -> Rule:
    """Replace (every field) or change (some fields) a rule, e.g. {"enabled": false}."""
    for field in FIELDS:
        if field in fields:
            setattr(rule, field, fields[field])
    db.session.commit()
    invalidation.app_changed(rule.app_id)
    return rule


def delete_rule(rule: Rule) -> None:
    """Remove a rule."""
    db.session.delete(rule)
    db.session.commit()
    invalidation.app_changed(rule.app_id)
