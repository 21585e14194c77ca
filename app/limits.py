"""Rate limits: per app on ingestion, counted in events; per client and account on account routes.

Counters live in RATELIMIT_STORAGE_URI: REDIS_URL by default, shared by every process, or
per-process memory on the embedded default. Both kinds of limit use a sliding window
counter, and a refused request takes nothing from the window.

The per-app ingestion limit does not ask Redis on every request: each API process takes its
allowance in leases of many events (1 % of the limit, by a Lua script that grants them
atomically) and spends them locally. A round trip per request cost a quarter of single-event
throughput (README "Throughput"). Events are counted in Redis when leased, so all processes
together never accept more than the limit; what a process leased and did not spend lapses at
the end of the window (at most a lease per process: 1 % of the limit each).

When the storage does not answer, ingestion is not limited (fail open) until it answers
again: refusing events because the limiter is down would lose data, while a short spell
without a limit costs only capacity. Account routes fall back to per-process in-memory
limits instead (Flask-Limiter's fallback), so that password guessing stays limited.
"""
import hashlib
import logging
import math
import threading
import time
from typing import NamedTuple

import redis as redis_lib
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
# A lease is this share of the limit (at least one event): few round trips, and what leases
# leave unspent at the end of a window is at most 1 % of the limit per API process.
LEASE_SHARE = 0.01
# A process that was refused answers further refusals for the same app from memory for this
# long at most (never past the moment the refused request would fit): over its limit, an app
# costs a round trip per 50 ms and process, not one per request.
REFUSAL_MEMORY = 0.05
INGEST_LIMIT_KEY = "intake:ratelimit:ingest:{}"  # + app id: a hash {w: window number, cur, prev}
STORAGE_OPTIONS = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}

# Grant `need` to `want` events of the app's sliding window counter, or none. Redis's clock
# decides the window, so API processes on different hosts agree on it. Returns {granted,
# remaining after the grant, ms to the end of the window, ms until `need` would fit}.
LEASE_SCRIPT = """
local limit, window, need, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local position = (tonumber(t[1]) + tonumber(t[2]) / 1000000) / window
local index = math.floor(position)
local done = position - index
local state = redis.call('HMGET', KEYS[1], 'w', 'cur', 'prev')
local w, cur, prev = tonumber(state[1]), tonumber(state[2]) or 0, tonumber(state[3]) or 0
if w ~= index then
  if w == index - 1 then prev = cur else prev = 0 end
  cur = 0
end
local remaining = math.floor(limit - prev * (1 - done) - cur)
local left_ms = math.ceil((1 - done) * window * 1000)
if need > remaining then
  local wait
  if need > limit then
    wait = 1 - done
  elseif cur + need <= limit and prev > 0 then
    wait = (1 - (limit - cur - need) / prev) - done
  elseif cur > 0 then
    wait = (1 - done) + math.max(0, 1 - (limit - need) / cur)
  else
    wait = 1 - done
  end
  return {0, remaining, left_ms, math.ceil(math.max(wait, 0) * window * 1000)}
end
local grant = math.min(want, remaining)
redis.call('HSET', KEYS[1], 'w', index, 'cur', cur + grant, 'prev', prev)
redis.call('PEXPIRE', KEYS[1], math.ceil(2 * window * 1000))
return {grant, remaining - grant, left_ms, 0}
"""


def init_app(app: Flask) -> None:
    """Bind the limiter and set up the per-app ingestion limit (INGEST_RATE_LIMIT)."""
    uri = app.config["RATELIMIT_STORAGE_URI"]
    on_redis = uri.startswith(("redis://", "rediss://"))
    if on_redis:
        # A Redis that is down must fail fast: no retries with backoff inside a request.
        app.config.setdefault("RATELIMIT_STORAGE_OPTIONS", {**STORAGE_OPTIONS, "retry": Retry(NoBackoff(), 1)})
    limiter.init_app(app)
    if not (app.config.get("RATELIMIT_DEFAULT") or app.config.get("RATELIMIT_APPLICATION")):
        # Only decorated limits here, which their decorators check: Flask-Limiter's check before
        # every request would find nothing to do, at ~40 µs a request on the ingestion path.
        app.before_request_funcs[None].remove(limiter._check_request_limit)
    rate = app.config["INGEST_RATE_LIMIT"]
    if rate:
        item = parse(rate)
        source = RedisAllowance(uri, item) if on_redis else StorageAllowance(limiter.storage, item)
        app.extensions["intake.ingest_limit"] = AppRateLimit(item, source)
    else:
        app.extensions["intake.ingest_limit"] = None
    app.after_request(_account_limit_headers)


def limit_headers(limit: int, remaining: int, reset: int, *, refused: bool) -> dict:
    """The RateLimit-* headers (reset in seconds from now), and Retry-After on a refusal."""
    headers = {"RateLimit-Limit": str(limit), "RateLimit-Remaining": str(max(0, remaining)),
               "RateLimit-Reset": str(max(0, reset))}
    if refused:
        headers["Retry-After"] = str(max(1, reset))
    return headers


class Grant(NamedTuple):
    """What the shared counter answered: events granted (0 or at least the need), events left
    in the window after the grant, seconds to the window's end, seconds until the need fits."""

    granted: int
    remaining: int
    window_left: float
    wait: float


class RedisAllowance:
    """The app's sliding window counter in Redis, taken from in leases (LEASE_SCRIPT)."""

    def __init__(self, uri: str, item: RateLimitItem):
        # A client of its own (created lazily, no I/O here) rather than Flask-Limiter's storage
        # internals; the same fail-fast timeouts.
        self.client = redis_lib.Redis.from_url(uri, retry=Retry(NoBackoff(), 1), **STORAGE_OPTIONS)
        self.script = self.client.register_script(LEASE_SCRIPT)
        self.item = item

    def take(self, app_id: str, need: int, want: int) -> Grant:
        granted, remaining, left_ms, wait_ms = self.script(
            keys=[INGEST_LIMIT_KEY.format(app_id)], args=[self.item.amount, self.item.get_expiry(), need, want]
        )
        return Grant(int(granted), int(remaining), left_ms / 1000, wait_ms / 1000)


class StorageAllowance:
    """Any other limits storage (memory:// on the embedded default): exactly the need, per request."""

    def __init__(self, storage, item: RateLimitItem):
        self.strategy = SlidingWindowCounterRateLimiter(storage)
        self.item = item

    def take(self, app_id: str, need: int, want: int) -> Grant:
        if self.strategy.hit(self.item, "ingest", app_id, cost=need):
            return Grant(need, 0, 0.0, 0.0)
        stats = self.strategy.get_window_stats(self.item, "ingest", app_id)
        wait = max(0.0, stats.reset_time - time.time())
        return Grant(0, stats.remaining, wait, wait)


class Lease:
    """Events one process holds of one app's allowance, and the last refusal it saw."""

    __slots__ = ("lock", "left", "expires", "refused_until", "room", "fits_at")

    def __init__(self):
        self.lock = threading.Lock()
        self.left = 0  # leased events not spent yet
        self.expires = 0.0  # monotonic end of the window they were leased in
        self.refused_until = 0.0  # until then, a request for more than left + room is refused here
        self.room = 0  # events the window had left at that refusal
        self.fits_at = 0.0  # monotonic time the refused request would have fitted (Retry-After)


class AppRateLimit:
    """One app's ingestion allowance (`item`, e.g. 5000 per second), charged one per event."""

    def __init__(self, item: RateLimitItem, source):
        self.item = item
        self.source = source
        self.lease_size = max(1, int(item.amount * LEASE_SHARE))
        self.refusal_memory = min(REFUSAL_MEMORY, item.get_expiry() * LEASE_SHARE)
        self.leases: dict[str, Lease] = {}
        self._skip_until = 0.0
        self._failing = False

    def charge(self, app_id: str, events: int) -> None:
        """Take `events` from the app's allowance, or raise 429 `rate_limited` taking nothing."""
        if self._skip_until and time.monotonic() < self._skip_until:
            return
        lease = self.leases.get(app_id) or self.leases.setdefault(app_id, Lease())
        with lease.lock:
            now = time.monotonic()
            if now >= lease.expires:
                lease.left = 0
            if events <= lease.left:
                lease.left -= events
                return
            if now < lease.refused_until and events > lease.left + lease.room:
                self.refuse(events, lease.left + lease.room, lease.fits_at - now)
            need = events - lease.left
            try:
                grant = self.source.take(app_id, need, max(need, self.lease_size))
            except Exception as error:
                self._storage_failed(error)
                return
            self._recovered()
            if grant.granted:
                lease.left += grant.granted - events
                lease.expires = now + grant.window_left
                return
            lease.refused_until = now + min(grant.wait, self.refusal_memory)
            lease.room = grant.remaining
            lease.fits_at = now + grant.wait
            self.refuse(events, lease.left + grant.remaining, grant.wait)

    def refuse(self, events: int, remaining: int, wait: float):
        """Raise 429 `rate_limited` with Retry-After (when `events` would fit) and RateLimit-*."""
        reset = max(1, math.ceil(wait))
        if events > self.item.amount:
            message = (f"A batch of {events} events is more than this app's whole allowance of {self.item} "
                       "events; send smaller batches.")
        else:
            message = f"This app is over its rate limit of {self.item} events; retry in {reset} s."
        headers = limit_headers(self.item.amount, remaining, reset, refused=True)
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
