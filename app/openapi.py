"""The OpenAPI document (/api/openapi.json) beyond what flask-smorest gathers, and the docs page (/api/docs).

flask-smorest documents the blueprints registered with `api` from their schemas. The ingestion
and operations routes are plain Flask views whose bodies are free-form (parsing them through
marshmallow would cost every request), so their paths are described here, once, at start-up:
documentation only, nothing on the request path. Every error response uses the one error shape.
"""
import http
from pathlib import Path

from flask import Blueprint, Flask
from marshmallow import Schema, fields

from app.errors import HTTP_CODES
from app.extensions import api

STATIC_FOLDER = Path(__file__).resolve().parent / "static" / "swagger-ui"
DOCS_ASSETS = "/api/docs/assets/"
BEARER = "bearerAuth"
API_KEY = "apiKeyAuth"


class ErrorDetailSchema(Schema):
    path = fields.String(metadata={"description": "JSON pointer to the offending part of the request."})
    message = fields.String()
    rule = fields.String(metadata={"description": "The rule or check that failed."})


class ErrorBodySchema(Schema):
    code = fields.String(required=True, metadata={"description": "A stable snake_case code (README: Error codes)."})
    message = fields.String(required=True)
    details = fields.List(fields.Nested(ErrorDetailSchema))


class ErrorSchema(Schema):
    """The one error shape of every route (API.md section 3)."""

    error = fields.Nested(ErrorBodySchema, required=True)


def describe(status: int, codes: list[str]) -> str:
    """An error response's description: its status and the codes it may carry ("Not Found: `app_not_found`")."""
    return f"{http.HTTPStatus(status).phrase}: " + ", ".join(f"`{code}`" for code in codes)


def errors(blp, codes: dict[int, list[str]]):
    """Document a route's error answers: `{status: [code, ...]}`, each with the one error shape."""
    def decorate(view):
        for status, names in codes.items():
            view = blp.alt_response(status, schema=ErrorSchema, description=describe(status, names))(view)
        return view
    return decorate


def init_app(app: Flask) -> None:
    """Describe the error shape, the security schemes and the plain Flask routes; serve the docs page's assets."""
    spec = api.spec
    spec.components.schema("ErrorResponse", schema=ErrorSchema)
    # flask-smorest's own error responses (e.g. 422 of @blp.arguments) point at its ErrorSchema,
    # which is not our shape: register them again, lazily as it does, over ours.
    for status in http.HTTPStatus:
        if status >= 400:
            spec.components.response(status.name, _error_response(describe(status, [_shared_code(status)])), lazy=True)
    spec.components.response("DEFAULT_ERROR", _error_response("Error"), lazy=True)
    spec.components.security_scheme(BEARER, {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                                             "description": "An access token from POST /api/auth/login."})
    spec.components.security_scheme(API_KEY, {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                              "description": "The app's key (ingestion routes)."})
    rules = {rule.rule: rule for rule in app.url_map.iter_rules()}
    for path, operations in _plain_routes().items():
        # The path and its parameters come from the view's own URL rule.
        spec.path(rule=rules[path], operations=operations, parameters=[])
    app.register_blueprint(Blueprint("docs_assets", __name__, static_folder=str(STATIC_FOLDER),
                                     static_url_path=DOCS_ASSETS.rstrip("/")))


def _shared_code(status: int) -> str:
    # The shared responses are the ones flask-smorest adds by itself: its 422 is a body that broke
    # its schema; others are Flask's own errors, coded by status (app/errors.py).
    return "invalid_request" if status == 422 else HTTP_CODES.get(status, "http_error")


def _error_response(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": "ErrorResponse"}}}


def _errors(codes: dict[int, list[str]]) -> dict:
    return {str(status): _error_response(describe(status, names)) for status, names in codes.items()}


VALIDATION = {
    "type": "object",
    "required": ["status", "warnings"],
    "properties": {"status": {"type": "string", "enum": ["valid", "warning"]},
                   "warnings": {"type": "array", "items": {"type": "object"}}},
}
EVENT = {
    "type": "object",
    "description": "One event: any JSON object; the reserved fields below are checked, the whole object is stored.",
    "required": ["event_name"],
    "additionalProperties": True,
    "properties": {
        "event_name": {"type": "string", "minLength": 1, "maxLength": 255, "description": "Alias `eventName`."},
        "event_id": {"type": "string", "minLength": 1, "maxLength": 128, "description": "Idempotency key."},
        "timestamp": {"oneOf": [{"type": "string", "format": "date-time"}, {"type": "number"}],
                      "description": "ISO 8601 (no offset = UTC) or epoch seconds / milliseconds."},
        "level": {"type": "string", "description": "debug, info, warning (warn), error, critical (fatal); any case."},
        "user_id": {"oneOf": [{"type": "string"}, {"type": "integer"}], "description": "Alias `userId`."},
    },
}
ACCEPTED = {
    "type": "object",
    "required": ["status", "event_id", "task_id", "validation"],
    "properties": {"status": {"type": "string", "enum": ["accepted"]}, "event_id": {"type": "string"},
                   "task_id": {"type": "string"}, "validation": VALIDATION},
}
REJECTED_ITEM = {"type": "object", "required": ["index", "error"],
                 "properties": {"index": {"type": "integer"}, "error": {"type": "object"}}}
BATCH_RESULT = {
    "type": "object",
    "required": ["status", "accepted", "event_ids", "rejected", "task_id"],
    "properties": {"status": {"type": "string"}, "accepted": {"type": "integer"},
                   "event_ids": {"type": "array", "items": {"type": "string"}},
                   "rejected": {"type": "array", "items": REJECTED_ITEM},
                   "task_id": {"type": "string", "nullable": True},
                   "error": {"type": "object"}},
}
INGEST_ERRORS = {
    400: ["invalid_json", "not_an_object", "invalid_encoding"],
    401: ["invalid_api_key"],
    404: ["app_not_found"],
    413: ["payload_too_large"],
    415: ["unsupported_media_type", "unsupported_encoding"],
    422: ["invalid_event", "nesting_too_deep", "validation_failed"],
    429: ["rate_limited"],
    503: ["queue_unavailable", "service_unavailable"],
}
JSON_BODY = {"application/json": {"schema": EVENT}}


# OTLP/HTTP answers in the request's encoding, errors as a google.rpc.Status (API.md section 4);
# our error code rides in its ErrorInfo `reason`.
RPC_STATUS = {
    "type": "object",
    "description": "google.rpc.Status: `code` (gRPC), `message`, `details` (an ErrorInfo whose `reason` is our code).",
    "properties": {"code": {"type": "integer"}, "message": {"type": "string"},
                   "details": {"type": "array", "items": {"type": "object"}}},
}
OTLP_ERRORS = {
    400: ["invalid_json", "invalid_body", "invalid_encoding"],
    401: ["invalid_api_key"],
    404: ["app_not_found"],
    413: ["payload_too_large"],
    415: ["unsupported_media_type", "unsupported_encoding"],
    429: ["rate_limited"],
    500: ["internal_error"],
    503: ["queue_unavailable", "service_unavailable"],
}
OTLP_CONTENT = {"application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": {"type": "object"}}}


def _otlp_errors() -> dict:
    return {str(status): {"description": describe(status, names) + " Body: a google.rpc.Status.",
                          "content": {"application/json": {"schema": RPC_STATUS},
                                      "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}}}}
            for status, names in OTLP_ERRORS.items()}


def _plain_routes() -> dict:
    """URL rule -> OpenAPI operations, for the routes flask-smorest does not see (ingestion, operations)."""
    key = [{API_KEY: []}]
    batch_errors = {**INGEST_ERRORS, 400: INGEST_ERRORS[400] + ["invalid_batch"]}
    del batch_errors[422]
    return {
        "/api/logs/<app_id>": {"post": {
            "tags": ["Ingestion"], "summary": "Send one event.", "security": key,
            "requestBody": {"required": True, "content": JSON_BODY},
            "responses": {"202": {"description": "Durably queued.",
                                  "content": {"application/json": {"schema": ACCEPTED}}},
                          **_errors(INGEST_ERRORS)},
        }},
        "/api/logs/<app_id>/batch": {"post": {
            "tags": ["Ingestion"], "summary": "Send 1 to INGEST_MAX_BATCH_EVENTS events.", "security": key,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
                {"type": "array", "items": EVENT},
                {"type": "object", "required": ["events"], "properties": {"events": {"type": "array", "items": EVENT}}},
            ]}}}},
            "responses": {
                "202": {"description": "At least one event was accepted and durably queued.",
                        "content": {"application/json": {"schema": BATCH_RESULT}}},
                "422": {"description": "No event was accepted (`validation_failed`); `rejected` says why.",
                        "content": {"application/json": {"schema": BATCH_RESULT}}},
                **_errors(batch_errors),
            },
        }},
        "/api/logs/<app_id>/events/<event_id>": {"get": {
            "tags": ["Ingestion"], "summary": "Where is my event?", "security": key,
            "responses": {
                "200": {"description": "Stored, or failed for good.", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["event_id", "status"],
                    "properties": {"event_id": {"type": "string"},
                                   "status": {"type": "string", "enum": ["processed", "failed"]},
                                   "processed_at": {"type": "string", "nullable": True},
                                   "error": {"type": "string", "nullable": True}}}}}},
                **_errors({401: ["invalid_api_key"], 404: ["app_not_found", "event_not_found"],
                           500: ["internal_error"], 503: ["service_unavailable"]}),
            },
        }},
        "/api/otlp/<app_id>/v1/logs": {"post": {
            "tags": ["Ingestion"], "summary": "OpenTelemetry logs (OTLP/HTTP): one event per log record.",
            "security": key,
            "requestBody": {"required": True, "content": {
                "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": {"type": "object", "description": "ExportLogsServiceRequest, "
                                                "in the OTLP JSON mapping."}}}},
            "responses": {"200": {"description": "Every accepted record is durably queued: an "
                                                 "ExportLogsServiceResponse, with `partialSuccess` when records "
                                                 "were refused.", "content": OTLP_CONTENT},
                          **_otlp_errors()},
        }},
        "/health": {"get": {
            "tags": ["Operations"], "summary": "Alive (touches no dependency).",
            "responses": {"200": {"description": "Alive.", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"status": {"type": "string"}}}}}}},
        }},
        "/ready": {"get": {
            "tags": ["Operations"], "summary": "The database and the broker answered just now.",
            "responses": {
                "200": {"description": "Ready.", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"database": {"type": "string"}, "broker": {"type": "string"},
                                                     "warnings": {"type": "array", "items": {"type": "string"}}}}}}},
                **_errors({503: ["not_ready"]}),
            },
        }},
        "/metrics": {"get": {
            "tags": ["Operations"], "summary": "Prometheus metrics, summed over the web workers.",
            "responses": {"200": {"description": "Prometheus text format.",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }},
    }
