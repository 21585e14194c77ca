"""Tell every API process at once that an app's key or rules changed (Redis pub/sub).

Each API process caches apps and their rules for RULES_CACHE_TTL (app/rules.py). A change
made through the management API or the CLI is published on the channel; every web process
runs one listener thread (started by its first request, so after gunicorn forks, never in
the factory) that discards the app's entry and acknowledges. The publisher waits for as many
acknowledgements as Redis counted subscribers (at most ACK_TIMEOUT), so when the change is
answered every process has already forgotten the old key or rules.

What falls back to the TTL: no REDIS_URL (the embedded default), Redis unreachable, a
listener too busy to acknowledge in time. Messages published while a listener is
disconnected are lost, so it clears its whole cache each time its subscription is
(re)confirmed.
"""
import logging
import os
import threading
import time
import uuid

import orjson
import redis
from flask import Flask, current_app

log = logging.getLogger(__name__)

# Pub/sub channels are shared by every db number of a Redis server: the channel names the db,
# so that deployments (or test runs) on other db numbers of the same server hear nothing.
CHANNEL_PREFIX = "intake:rules-changed"
ACK_KEY_PREFIX = "intake:rules-changed-ack"
ACK_TIMEOUT = 1.0  # seconds the publisher waits for every listener
ACK_KEY_TTL = 10  # seconds an acknowledgement list outlives a publisher that gave up
POLL_SECONDS = 5.0  # the listener wakes this often, so a dead connection is noticed (health checks)
RETRY_MAX_SECONDS = 10.0
LISTENER_NAME = "intake-invalidation"  # as CLIENT LIST shows the listeners' connections


class Invalidation:
    """The publisher and the (one per process) listener for app changes."""

    def __init__(self, redis_url: str | None, cache):
        self.redis_url = redis_url
        self.cache = cache
        self._client = None
        self._listener_pid = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    @property
    def channel(self) -> str:
        db = redis.connection.parse_url(self.redis_url).get("db", 0) if self.redis_url else 0
        return f"{CHANNEL_PREFIX}:{db}"

    def _redis(self) -> redis.Redis:
        if self._client is None:
            # The socket outlives the longest BLPOP wait.
            self._client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=0.5,
                                                socket_timeout=ACK_TIMEOUT + 1)
        return self._client

    def publish(self, app_id: str) -> None:
        """Make every API process forget `app_id` now; on failure the TTL still bounds the delay."""
        self.cache.discard(app_id)
        if not self.redis_url:
            return
        ack_key = f"{ACK_KEY_PREFIX}:{uuid.uuid4().hex}"
        try:
            client = self._redis()
            listeners = client.publish(self.channel, orjson.dumps({"app_id": app_id, "ack": ack_key}))
            deadline = time.monotonic() + ACK_TIMEOUT
            for _ in range(listeners):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or client.blpop([ack_key], timeout=remaining) is None:
                    log.warning("app %s changed: not every API process acknowledged within %.1f s; "
                                "the rest catch up within RULES_CACHE_TTL", app_id, ACK_TIMEOUT)
                    break
            client.delete(ack_key)
        except redis.RedisError as error:
            log.warning("app %s changed: could not tell the API processes (%s); they catch up within "
                        "RULES_CACHE_TTL", app_id, type(error).__name__)

    def ensure_listening(self) -> None:
        """Start this process's listener once (again in a forked child: threads do not survive fork)."""
        if self._listener_pid == os.getpid() or not self.redis_url:
            return
        with self._lock:
            if self._listener_pid == os.getpid():
                return
            self._listener_pid = os.getpid()
            threading.Thread(target=self._listen, name="intake-invalidation", daemon=True).start()

    def _listen(self) -> None:
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1.0, socket_keepalive=True,
                                      health_check_interval=POLL_SECONDS * 2, client_name=LISTENER_NAME)
        delay = 0.5
        while not self._stopping.is_set():
            pubsub = client.pubsub()
            try:
                pubsub.subscribe(self.channel)
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=POLL_SECONDS)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        # Whatever was published before this moment never reaches us.
                        self.cache.clear()
                        delay = 0.5
                    elif message["type"] == "message":
                        self._handle(client, message["data"])
            except Exception as error:  # the thread must outlive any failure, Redis's or a bad message's
                log.warning("invalidation listener: %s; retrying in %.1f s (RULES_CACHE_TTL applies meanwhile)",
                            type(error).__name__, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
            finally:
                pubsub.close()

    def stop(self) -> None:
        """End this process's listener (within POLL_SECONDS); the TTL alone bounds staleness after."""
        self._stopping.set()

    def _handle(self, client: redis.Redis, data: bytes) -> None:
        try:
            change = orjson.loads(data)
            app_id, ack_key = str(change["app_id"]), str(change["ack"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("invalidation listener: ignored a malformed message")
            return
        self.cache.discard(app_id)
        with client.pipeline(transaction=False) as pipe:
            pipe.rpush(ack_key, os.getpid())
            pipe.expire(ack_key, ACK_KEY_TTL)
            pipe.execute()


def init_app(app: Flask) -> None:
    """Attach the publisher; the listener starts with the process's first request (no I/O here)."""
    app.extensions["intake.invalidation"] = Invalidation(app.config["REDIS_URL"], app.extensions["intake.rules"])
    app.before_request(_ensure_listening)


def _ensure_listening() -> None:
    current_app.extensions["intake.invalidation"].ensure_listening()


def app_changed(app_id: str) -> None:
    """An app's key, rules or existence changed: every API process reloads it."""
    current_app.extensions["intake.invalidation"].publish(app_id)
