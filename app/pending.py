"""The pending store: every accepted group of events, from before the 202 until it is stored.

Why: on the Redis broker a worker killed at the wrong moment loses a message for good
(shared/FINDINGS.md). So the API writes the events here first and publishes a message
that carries only the group's id; the worker deletes the record after its commit; a
beat task (`redeliver_pending`) publishes again every record that is overdue. The
same record is the retry schedule: a failed write moves the record's due time back.
Redelivery is safe because storing is idempotent on (app, event_id).
"""
import json
import os
import time
from pathlib import Path

import orjson
import redis

# A record redelivered again and again without progress is most likely still waiting in
# a backed-up queue: each redelivery doubles its next lease (up to 2**MAX_DOUBLINGS times),
# so that an overloaded system is not handed ever more copies of the same work.
MAX_DOUBLINGS = 3
# Claim overdue ids atomically, pushing their due time forward, so that two sweepers
# running at once (a PaaS can briefly run two beats) publish each id once.
CLAIM_DUE = """
local now, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  local redeliveries = redis.call('HINCRBY', KEYS[2], id, 1)
  redis.call('ZADD', KEYS[1], now + lease * 2 ^ math.min(redeliveries - 1, tonumber(ARGV[4])), id)
end
return ids
"""
# Reschedule only a record that still exists: a duplicate delivery may have stored it.
# A worker got to it, so its redeliveries start again from none.
RESCHEDULE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""


def _record(events, attempts):
    return orjson.dumps({"attempts": attempts, "events": events})


class RedisPendingStore:
    """Pending records in Redis: a hash of bodies and, per queue, a sorted set of due times."""

    BODIES = "intake:pending:bodies"
    REDELIVERIES = "intake:pending:redeliveries"

    def __init__(self, url: str, redeliver_after: float):
        self.url = url
        self.redeliver_after = redeliver_after
        self.redis = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._claim = self.redis.register_script(CLAIM_DUE)
        self._reschedule = self.redis.register_script(RESCHEDULE)

    @staticmethod
    def _due_key(queue):
        return f"intake:pending:due:{queue}"

    def put(self, queue: str, group_id: str, events: list, attempts: int = 0, message=()) -> None:
        """Record a group; `message`: Redis commands publishing its broker message in the same transaction."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.BODIES, group_id, _record(events, attempts))
        pipe.zadd(self._due_key(queue), {group_id: time.time() + self.redeliver_after})
        for command, args in message:
            getattr(pipe, command)(*args)
        pipe.execute()

    def load(self, queue: str, group_id: str) -> dict | None:
        body = self.redis.hget(self.BODIES, group_id)
        return None if body is None else orjson.loads(body)

    def done(self, queue: str, group_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self.BODIES, group_id)
        pipe.zrem(self._due_key(queue), group_id)
        pipe.hdel(self.REDELIVERIES, group_id)
        pipe.execute()

    def reschedule(self, queue: str, group_id: str, events: list, attempts: int, delay: float) -> bool:
        keys = [self.BODIES, self._due_key(queue), self.REDELIVERIES]
        return bool(self._reschedule(keys=keys, args=[group_id, _record(events, attempts), time.time() + delay]))

    def claim_due(self, queue: str, limit: int = 1000) -> list[str]:
        now = time.time()
        ids = self._claim(keys=[self._due_key(queue), self.REDELIVERIES],
                          args=[now, self.redeliver_after, limit, MAX_DOUBLINGS])
        return [i.decode() for i in ids]


class FolderPendingStore:
    """Pending records as files under instance/, for the embedded default (no Redis)."""

    def __init__(self, folder: str, redeliver_after: float):
        self.folder = Path(folder)
        self.redeliver_after = redeliver_after

    def _path(self, queue, group_id):
        return self.folder / queue / f"{group_id}.json"

    def _write(self, queue, group_id, events, attempts, due, redeliveries=0):
        path = self._path(queue, group_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"due": due, "attempts": attempts, "redeliveries": redeliveries, "events": events}))
        os.replace(tmp, path)

    def put(self, queue, group_id, events, attempts=0):
        self._write(queue, group_id, events, attempts, time.time() + self.redeliver_after)

    def load(self, queue, group_id):
        try:
            return json.loads(self._path(queue, group_id).read_text())
        except FileNotFoundError:
            return None

    def done(self, queue, group_id):
        self._path(queue, group_id).unlink(missing_ok=True)

    def reschedule(self, queue, group_id, events, attempts, delay):
        if not self._path(queue, group_id).exists():
            return False
        self._write(queue, group_id, events, attempts, time.time() + delay)
        return True

    def claim_due(self, queue, limit=1000):
        now, claimed = time.time(), []
        for path in sorted((self.folder / queue).glob("*.json"))[: limit * 10]:
            record = self.load(queue, path.stem)
            if record and record["due"] <= now and len(claimed) < limit:
                redeliveries = record.get("redeliveries", 0) + 1
                lease = self.redeliver_after * 2 ** min(redeliveries - 1, MAX_DOUBLINGS)
                self._write(queue, path.stem, record["events"], record["attempts"], now + lease, redeliveries)
                claimed.append(path.stem)
        return claimed


def pending_store_from_config(config) -> RedisPendingStore | FolderPendingStore:
    if config["REDIS_URL"]:
        return RedisPendingStore(config["REDIS_URL"], config["INGEST_REDELIVER_AFTER"])
    return FolderPendingStore(config["PENDING_FOLDER"], config["INGEST_REDELIVER_AFTER"])
