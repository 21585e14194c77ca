"""Accounts over HTTP: register, verify, log in, tokens, password reset (/api/auth)."""
from flask import Flask

from app.accounts import tokens
from app.accounts.tokens import current_user_id  # noqa: F401  (for the other JWT routes)


def init_app(app: Flask) -> None:
    """JWT callbacks and the token blocklist; the account routes in the OpenAPI document."""
    from app.accounts.views import blp
    from app.extensions import api

    tokens.init_app(app)
    api.register_blueprint(blp)
