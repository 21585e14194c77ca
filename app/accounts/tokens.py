"""JWTs: issuing, revocation (a blocklist with each token's remaining life), and the error answers."""
import logging
import time
from datetime import datetime, timezone

import redis
from flask import Flask, current_app
from flask_jwt_extended import create_access_token, create_refresh_token, get_jwt_identity
from flask_jwt_extended.exceptions import WrongTokenError

from app.errors import ApiError, error_response
from app.extensions import db, jwt
from app.models import RevokedToken, User, utcnow

log = logging.getLogger(__name__)

REVOKED_KEY_PREFIX = "intake:auth:revoked:"
# Microseconds since the epoch at issue: `iat` has whole seconds, too coarse to tell a token
# made just before a password reset from one made just after it.
ISSUED_CLAIM = "iat_us"


def current_user_id() -> str:
    """The id of the user whose token the request carries (call under @jwt_required())."""
    return get_jwt_identity()


def issue_tokens(user: User) -> dict:
    """An access and a refresh token for `user`, as the login route answers them."""
    return {
        "access_token": create_access_token(identity=user.id),
        "refresh_token": create_refresh_token(identity=user.id),
        "token_type": "Bearer",
        "expires_in": access_token_seconds(),
    }


def refresh_access_token(user_id: str) -> dict:
    return {"access_token": create_access_token(identity=user_id), "token_type": "Bearer",
            "expires_in": access_token_seconds()}


def access_token_seconds() -> int:
    return int(current_app.config["JWT_ACCESS_TOKEN_EXPIRES"].total_seconds())


class RedisBlocklist:
    """Revoked token ids as Redis keys that expire with the token."""

    def __init__(self, url: str):
        self.url = url
        self._client = None

    @property
    def client(self) -> redis.Redis:
        # Made on first use, after the web worker forked.
        if self._client is None:
            self._client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        return self._client

    def revoke(self, jti: str, seconds_left: int) -> None:
        self.client.set(REVOKED_KEY_PREFIX + jti, 1, ex=max(1, seconds_left))

    def is_revoked(self, jti: str) -> bool:
        return bool(self.client.exists(REVOKED_KEY_PREFIX + jti))


class TableBlocklist:
    """Revoked token ids in the database, for the embedded default (no Redis)."""

    def revoke(self, jti: str, seconds_left: int) -> None:
        now = utcnow()
        db.session.execute(db.delete(RevokedToken).where(RevokedToken.expires_at < now))
        if db.session.get(RevokedToken, jti) is None:
            db.session.add(RevokedToken(jti=jti, expires_at=datetime.fromtimestamp(time.time() + seconds_left,
                                                                                   timezone.utc)))
        db.session.commit()

    def is_revoked(self, jti: str) -> bool:
        return db.session.get(RevokedToken, jti) is not None


def blocklist():
    return current_app.extensions["intake.blocklist"]


def revoke(payload: dict) -> None:
    """Refuse the token whose claims are `payload` from now until it would have expired anyway."""
    seconds_left = int(payload["exp"] - time.time()) + 1
    try:
        blocklist().revoke(payload["jti"], seconds_left)
    except redis.RedisError:
        raise _blocklist_unavailable() from None


def _blocklist_unavailable() -> ApiError:
    return ApiError(503, "service_unavailable", "Tokens cannot be checked right now; retry shortly.",
                    headers={"Retry-After": "2"})


def _token_refused(payload: dict) -> bool:
    """Revoked (logout), issued before the user's last password reset, or the user is gone."""
    try:
        if blocklist().is_revoked(payload["jti"]):
            return True
    except redis.RedisError:
        # Fail closed: a token that may have been revoked is not honoured while Redis is away.
        raise _blocklist_unavailable() from None
    user = db.session.get(User, payload["sub"])
    if user is None:
        return True
    if user.tokens_valid_after is not None:
        issued_us = payload.get(ISSUED_CLAIM, payload["iat"] * 1_000_000)
        valid_after = user.tokens_valid_after
        if valid_after.tzinfo is None:
            valid_after = valid_after.replace(tzinfo=timezone.utc)
        if issued_us < valid_after.timestamp() * 1_000_000:
            return True
    return False


def _refused(status: int, code: str, message: str):
    # The WWW-Authenticate header is what RFC 6750 asks of a refused Bearer token.
    return error_response(status, code, message, headers={"WWW-Authenticate": "Bearer"})


def init_app(app: Flask) -> None:
    """Pick the blocklist for this app and make every JWT failure answer in the one error shape."""
    app.extensions["intake.blocklist"] = RedisBlocklist(app.config["REDIS_URL"]) if app.config["REDIS_URL"] \
        else TableBlocklist()

    jwt.additional_claims_loader(lambda identity: {ISSUED_CLAIM: time.time_ns() // 1000})
    jwt.token_in_blocklist_loader(lambda header, payload: _token_refused(payload))
    jwt.unauthorized_loader(lambda reason: _refused(
        401, "missing_token", "Send an access token in the header 'Authorization: Bearer <token>'."))
    jwt.invalid_token_loader(lambda reason: _refused(
        401, "invalid_token", "The token is not valid (malformed, or not signed by Intake); log in again."))
    jwt.expired_token_loader(lambda header, payload: _refused(
        401, "token_expired", "The token has expired; get a new access token from /api/auth/refresh or log in."))
    jwt.revoked_token_loader(lambda header, payload: _refused(
        401, "token_revoked", "The token was revoked (logout or password reset); log in again."))
    jwt.user_lookup_error_loader(lambda header, payload: _refused(
        401, "token_revoked", "The token's account no longer exists."))

    @app.errorhandler(WrongTokenError)
    def wrong_token_type(error):
        # Registered after JWTManager's own handler, which would call it an invalid token.
        return _refused(401, "wrong_token_type",
                        "This route takes the other kind of token (an access token, or the refresh token for "
                        "/api/auth/refresh).")
