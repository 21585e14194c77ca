"""Request and response bodies of the management API (marshmallow), shared by its routes and the CLI."""
from datetime import datetime, timezone

from marshmallow import Schema, ValidationError, fields, validate, validates, validates_schema

from app.errors import ApiError
from app.ingest.checks import LEVELS, check_depth
from app.rules import InvalidRuleSchema, check_rule_schema

NAME = validate.Length(min=1, max=255)
# Deeper schemas make the JSON Schema meta-validation itself recurse past Python's limit (~200 levels);
# events are at most INGEST_MAX_DEPTH (10) deep, which a rule describes in about 2 levels each.
RULE_SCHEMA_MAX_DEPTH = 64


class StrictBoolean(fields.Boolean):
    """true or false, nothing that merely looks like one ("yes", 1)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


class StrictInteger(fields.Integer):
    """A JSON integer: not a string of digits, not a boolean."""

    def __init__(self, **kwargs):
        super().__init__(strict=True, **kwargs)

    def _validated(self, value):
        if isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return super()._validated(value)


class Text(fields.String):
    """A string PostgreSQL can store: no NUL character (query strings are not checked like bodies)."""

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        if "\x00" in value:
            raise ValidationError("may not contain NUL (\\u0000)")
        return value


class UtcDateTime(fields.DateTime):
    """ISO 8601 in UTC with a Z; a time without an offset is read as UTC."""

    def _serialize(self, value, attr, obj, **kwargs):
        if value is None:
            return None
        if value.tzinfo is None:  # SQLite hands back naive UTC datetimes
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")

    def _deserialize(self, value, attr, data, **kwargs) -> datetime:
        moment = super()._deserialize(value.strip() if isinstance(value, str) else value, attr, data, **kwargs)
        if moment.tzinfo is None:
            return moment.replace(tzinfo=timezone.utc)
        try:
            return moment.astimezone(timezone.utc)
        except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
            raise ValidationError("out of range") from None


class Level(fields.String):
    """An event level, any case, aliases (warn, fatal) accepted: the normalised level."""

    def _deserialize(self, value, attr, data, **kwargs):
        level = LEVELS.get(super()._deserialize(value, attr, data, **kwargs).lower())
        if level is None:
            raise ValidationError("must be one of debug, info, warning, error, critical")
        return level


# --- apps ----------------------------------------------------------------------------------


class AppCreate(Schema):
    name = fields.String(required=True, validate=NAME)
    retention_days = StrictInteger(load_default=30, validate=validate.Range(1, 3650),
                                   metadata={"description": "Days events are kept (1-3650)."})


class AppPatch(Schema):
    name = fields.String(validate=NAME)
    retention_days = StrictInteger(validate=validate.Range(1, 3650))

    @validates_schema
    def not_empty(self, data, **kwargs):
        if not data:
            raise ValidationError("send at least one of name, retention_days")


class AppOut(Schema):
    id = fields.String()
    name = fields.String()
    retention_days = fields.Integer()
    created_at = UtcDateTime()


class AppCreated(AppOut):
    api_key = fields.String(metadata={"description": "The app's key, shown only in this answer."})


class AppList(Schema):
    apps = fields.List(fields.Nested(AppOut))


class AppKey(Schema):
    id = fields.String()
    api_key = fields.String(metadata={"description": "The new key, shown only in this answer."})


class AppDeleting(Schema):
    id = fields.String()
    status = fields.String(metadata={"description": "deleting: the key no longer works; the data is being removed."})


# --- rules ---------------------------------------------------------------------------------


class RuleIn(Schema):
    """A rule's body; with partial=True, a PATCH of some of its fields."""

    name = fields.String(required=True, validate=NAME)
    event_name = fields.String(load_default=None, allow_none=True, validate=NAME,
                               metadata={"description": "Events it applies to; null for every event."})
    schema = fields.Raw(required=True, metadata={"description": "A JSON Schema (2020-12); no remote $ref."})
    action = fields.String(required=True, validate=validate.OneOf(["reject", "warn"]))
    enabled = StrictBoolean(load_default=True)

    @validates("schema")
    def valid_json_schema(self, value, **kwargs):
        if isinstance(value, dict):
            try:
                check_depth(value, RULE_SCHEMA_MAX_DEPTH)
            except ApiError:
                raise ValidationError(f"schema is nested more than {RULE_SCHEMA_MAX_DEPTH} levels deep") from None
        try:
            check_rule_schema(value)
        except InvalidRuleSchema as error:
            raise ValidationError(str(error)) from None

    @validates_schema
    def not_empty(self, data, **kwargs):
        if not data:
            raise ValidationError("send at least one of name, event_name, schema, action, enabled")


class RulePatch(RuleIn):
    """Some of a rule's fields (load it with partial=True)."""


class RuleOut(Schema):
    id = fields.String()
    app_id = fields.String()
    name = fields.String()
    event_name = fields.String(allow_none=True)
    schema = fields.Raw()
    action = fields.String()
    enabled = fields.Boolean()
    created_at = UtcDateTime()
    updated_at = UtcDateTime()


class RuleList(Schema):
    rules = fields.List(fields.Nested(RuleOut))


# --- events --------------------------------------------------------------------------------


class EventQuery(Schema):
    event_name = Text(validate=NAME)
    level = Level(metadata={"enum": ["debug", "info", "warning", "error", "critical"],
                            "description": "Any case; warn and fatal are read as warning and critical."})
    user_id = Text(validate=NAME)
    since = UtcDateTime(metadata={"description": "Events at or after this time (ISO 8601; no offset = UTC)."})
    until = UtcDateTime(metadata={"description": "Events before this time."})
    limit = fields.Integer(load_default=100, validate=validate.Range(1, 1000))
    cursor = fields.String(metadata={"description": "next_cursor of the previous page (opaque)."})

    @validates_schema
    def since_before_until(self, data, **kwargs):
        if "since" in data and "until" in data and data["since"] >= data["until"]:
            raise ValidationError("since must be before until", "since")


class EventRow(Schema):
    """An event in a listing: its normalised fields, not its payload (read the event for that)."""

    event_id = fields.String()
    event_name = fields.String()
    level = fields.String()
    user_id = fields.String(allow_none=True)
    timestamp = UtcDateTime()
    received_at = UtcDateTime()
    processed_at = UtcDateTime()
    validation_status = fields.String(metadata={"description": "valid, or warning when a warn rule was broken."})


class EventList(Schema):
    events = fields.List(fields.Nested(EventRow))
    next_cursor = fields.String(allow_none=True, metadata={"description": "Pass as cursor for the next page; "
                                                                         "null on the last page."})


class EventOut(Schema):
    event_id = fields.String()
    event_name = fields.String()
    level = fields.String()
    user_id = fields.String(allow_none=True)
    timestamp = UtcDateTime()
    received_at = UtcDateTime()
    processed_at = UtcDateTime()
    validation = fields.Raw(metadata={"description": '{"status": "valid" | "warning", "warnings": [...]}'})
    payload = fields.Raw(metadata={"description": "The event exactly as it was sent."})


# --- errors (app/errors.py's one shape, for the OpenAPI document) --------------------------


class ErrorAnswerDetail(Schema):
    path = fields.String(metadata={"description": "JSON pointer to the field"})
    message = fields.String()
    rule = fields.String()


class ErrorAnswerBody(Schema):
    code = fields.String(metadata={"description": "stable snake_case code"})
    message = fields.String()
    details = fields.List(fields.Nested(ErrorAnswerDetail))


class ErrorAnswer(Schema):
    error = fields.Nested(ErrorAnswerBody)


class StatsQuery(Schema):
    bucket = fields.String(load_default="hour", validate=validate.OneOf(["minute", "hour", "day"]))
    since = UtcDateTime(metadata={"description": "Default: 24 hours before until (ISO 8601; no offset = UTC)."})
    until = UtcDateTime(metadata={"description": "Default: now."})
    event_name = Text(validate=NAME)


class StatsOut(Schema):
    """Counts from the rollups (API.md "Stats")."""

    bucket = fields.String()
    since = fields.String()
    until = fields.String()
    total = fields.Integer()
    by_level = fields.Dict(keys=fields.String(), values=fields.Integer())
    series = fields.List(fields.Dict())
    ingestion = fields.Dict()


class FailedEventsQuery(Schema):
    limit = fields.Integer(load_default=100, validate=validate.Range(1, 1000))
    cursor = fields.String(metadata={"description": "next_cursor of the previous page (opaque)."})


class FailedEventsOut(Schema):
    failed_events = fields.List(fields.Dict())
    next_cursor = fields.String(allow_none=True)


class ReplayIn(Schema):
    ids = fields.List(fields.String(validate=validate.Length(min=1, max=36)), validate=validate.Length(max=1000),
                      metadata={"description": "Failed events' ids; absent: all of the app's failed events."})


class ReplayOut(Schema):
    status = fields.String()
    replaying = fields.Integer()
    task_id = fields.String(allow_none=True)
