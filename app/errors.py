"""The one JSON error shape, and the handlers that make every error use it."""
import logging

from flask import Flask, g, has_request_context, jsonify
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from app.extensions import rollback_session

log = logging.getLogger(__name__)

# Codes for errors raised by Flask/Werkzeug themselves (unknown route, 405, ...).
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable_entity",
    429: "rate_limited",
    500: "internal_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error with an HTTP status, a stable code and a message for the client."""

    def __init__(self, status, code, message, details=None, headers=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}

    def to_dict(self):
        return {"error": {"code": self.code, "message": self.message, "details": self.details or []}}


def error_response(status, code, message, details=None, headers=None):
    """Build the JSON error response for any route."""
    if has_request_context():
        g.error_code = code  # for the request's log line and the rejected-events metric
    error = ApiError(status, code, message, details, headers)
    response = jsonify(error.to_dict())
    response.status_code = status
    response.headers.update(error.headers)
    return response


def schema_details(messages, path="") -> list[dict]:
    """marshmallow's nested error messages as `details`: one entry per field, JSON pointer paths.

    webargs keys them by location first ({"json": {"email": ["Not a valid email."]}}): the
    location is not part of the pointer.
    """
    details = []
    for key, value in messages.items():
        here = path if key in ("json", "query", "view_args", "form", "headers") and not path else f"{path}/{key}"
        if isinstance(value, dict):
            details.extend(schema_details(value, here))
        else:
            for message in value if isinstance(value, list) else [value]:
                details.append({"path": here or "/", "message": str(message), "rule": "schema"})
    return details


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def handle_api_error(error):
        return error_response(error.status, error.code, error.message, error.details, error.headers)

    @app.errorhandler(HTTPException)
    def handle_http_exception(error):
        status = error.code or 500
        headers = {}
        if status == 405 and error.valid_methods:
            headers["Allow"] = ", ".join(error.valid_methods)
        messages = (getattr(error, "data", None) or {}).get("messages")
        if messages:
            # A request that failed its flask-smorest (marshmallow) schema: one detail per field.
            return error_response(status, "invalid_request", "The request does not match its schema; see details.",
                                  schema_details(messages), headers=headers)
        return error_response(status, HTTP_CODES.get(status, "http_error"), error.description, headers=headers)

    @app.errorhandler(OperationalError)
    def handle_database_unavailable(error):
        # The database is down or unreachable: not the client's fault, and worth a retry.
        log.warning("database unavailable: %s", type(getattr(error, "orig", error)).__name__)
        rollback_session()
        return error_response(503, "service_unavailable", "The database is unavailable; retry shortly.",
                              headers={"Retry-After": "5"})

    @app.errorhandler(Exception)
    def handle_unexpected(error):
        # The trace goes to the log; the client only learns that it was our fault.
        log.exception("unhandled error")
        rollback_session()
        return error_response(500, "internal_error", "Something went wrong on our side; retry later.")
