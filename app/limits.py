"""Rate limits: per app on ingestion, counted in events; per client and account on account routes.

Counters live in RATELIMIT_STORAGE_URI: REDIS_URL by default, shared by every process, or
per-process memory on the embedded default. The limits use a sliding window counter: one
round trip per request, and a refused request takes nothing from the window.

When the storage does not answer, ingestion is not limited (fail open) until it answers
again: refusing events because the limiter is down would lose data, while a short spell
without a limit costs only capacity. Account routes fall back to per-process in-memory
limits instead (Flask-Limiter's fallback), so that password guessing stays limited.
"""
import hashlib
import logging
import math
import time

from flask import Flask, current_app, request
from flask_jwt_extended import get_jwt_identity
from limits import RateLimitItem, parse
from limits.strategies import SlidingWindowCounterRateLimiter
from redis.backoff import NoBackoff
from redis.retry import Retry

from app import metrics
from app.errors import ApiError
from app.extensions import limiter

log = logging.getLogger(__name__)

# After a storage failure, ingestion goes unlimited this long before the storage is tried again,
# so that an unreachable Redis costs one timeout per second and process, not one per request.
RETRY_STORAGE_AFTER = 1.0
AUTH_LIMIT_MESSAGE = "Too many attempts; wait for the time in the Retry-After header before trying again."


def init_app(app: Flask) -> None:
    """Bind the limiter and set up the per-app ingestion limit (INGEST_RATE_LIMIT)."""
    if app.config["RATELIMIT_STORAGE_URI"].startswith(("redis://", "rediss://")):
        # A Redis that is down must fail fast: no retries with backoff inside a request.
        app.config.setdefault(
            "RATELIMIT_STORAGE_OPTIONS",
            {"socket_timeout": 0.5, "socket_connect_timeout": 0.5, "retry": Retry(NoBackoff(), 1)},
        )
    limiter.init_app(app)
    if not (app.config.get("RATELIMIT_DEFAULT") or app.config.get("RATELIMIT_APPLICATION")):
        # Only decorated limits here, which their decorators check: Flask-Limiter's check before
        # every request would find nothing to do, at ~40 µs a request on the ingestion path.
        app.before_request_funcs[None].remove(limiter._check_request_limit)
    rate = app.config["INGEST_RATE_LIMIT"]
    app.extensions["intake.ingest_limit"] = AppRateLimit(parse(rate), limiter.storage) if rate else None
    app.after_request(_account_limit_headers)


def limit_headers(limit: int, remaining: int, reset: int, *, refused: bool) -> dict:
    """The RateLimit-* headers (reset in seconds from now), and Retry-After on a refusal."""
    headers = {"RateLimit-Limit": str(limit), "RateLimit-Remaining": str(max(0, remaining)),
               "RateLimit-Reset": str(max(0, reset))}
    if refused:
        headers["Retry-After"] = str(max(1, reset))
    return headers


class AppRateLimit:
    """One app's ingestion allowance (`item`, e.g. 5000 per second), charged one per event."""

    def __init__(self, item: RateLimitItem, storage):
        self.item = item
        self.strategy = SlidingWindowCounterRateLimiter(storage)
        self._skip_until = 0.0
        self._failing = False

    def charge(self, app_id: str, events: int) -> None:
        """Take `events` from the app's allowance, or raise 429 `rate_limited` taking nothing."""
        if self._skip_until and time.monotonic() < self._skip_until:
            return
        try:
            if self.strategy.hit(self.item, "ingest", app_id, cost=events):
                self._recovered()
                return
            stats = self.strategy.get_window_stats(self.item, "ingest", app_id)
        except Exception as error:
            self._storage_failed(error)
            return
        reset = max(1, math.ceil(stats.reset_time - time.time()))
        if events > self.item.amount:
            message = (f"A batch of {events} events is more than this app's whole allowance of {self.item} "
                       "events; send smaller batches.")
        else:
            message = f"This app is over its rate limit of {self.item} events; retry in {reset} s."
        headers = limit_headers(self.item.amount, stats.remaining, reset, refused=True)
        raise ApiError(429, "rate_limited", message, headers=headers)

    def _storage_failed(self, error: Exception) -> None:
        metrics.RATE_LIMIT_STORAGE_ERRORS.inc()
        if not self._failing:
            log.warning("rate-limit storage unavailable, ingestion is not rate limited until it answers: %s", error)
        self._failing = True
        self._skip_until = time.monotonic() + RETRY_STORAGE_AFTER

    def _recovered(self) -> None:
        if self._failing:
            log.warning("rate-limit storage answers again, ingestion is rate limited again")
            self._failing = False
            self._skip_until = 0.0


def charge_app(app_id: str, events: int) -> None:
    """Count `events` against the app's ingestion rate: 429 `rate_limited` when over it."""
    app_limit = current_app.extensions.get("intake.ingest_limit")
    if app_limit is not None:
        app_limit.charge(app_id, events)


# --- account routes (login, register, verify-email, password) ---------------------------

def client_address() -> str:
    """The client's IP address. Behind a proxy or PaaS router, wrap the app in werkzeug's ProxyFix."""
    return request.remote_addr or "unknown"


def account_key() -> str:
    """Whom an account request is about: a hash of the body's email, the token's user, else the client address."""
    try:
        user_id = get_jwt_identity()  # routes that take a token check it before their limits
    except RuntimeError:  # no verified token in this request
        user_id = None
    if user_id:
        return "user:" + str(user_id)
    body = request.get_json(silent=True)
    email = body.get("email") if isinstance(body, dict) else None
    if isinstance(email, str) and email.strip():
        return "account:" + hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]
    return "address:" + client_address()


def auth_rate_limit(view):
    """Limit an account route per client address (shared by all account routes) and per account."""
    # Use under the route decorator: `@bp.post("/login")`, then `@auth_rate_limit`. The limits
    # are AUTH_RATE_LIMIT_PER_IP and AUTH_RATE_LIMIT_PER_ACCOUNT, e.g. "10/minute;100/hour".
    view = limiter.limit(
        lambda: current_app.config["AUTH_RATE_LIMIT_PER_ACCOUNT"], key_func=account_key,
        error_message=AUTH_LIMIT_MESSAGE,
    )(view)
    return limiter.shared_limit(
        lambda: current_app.config["AUTH_RATE_LIMIT_PER_IP"], scope="auth", key_func=client_address,
        error_message=AUTH_LIMIT_MESSAGE,
    )(view)


def _account_limit_headers(response):
    # Flask-Limiter checked a decorated route: tell the client where it stands.
    current = limiter.current_limit if limiter.initialized else None
    if current is None:
        return response
    try:
        reset = math.ceil(current.reset_at - time.time())
        response.headers.update(
            limit_headers(current.limit.amount, current.remaining, reset, refused=response.status_code == 429)
        )
    except Exception as error:  # the storage went away between the check and now
        log.warning("rate-limit headers unavailable: %s", error)
    return response
