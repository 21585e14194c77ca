"""The pending store: every accepted group of events, from before the 202 until it is stored.

Why: on the Redis broker a worker killed at the wrong moment loses a message for good
(shared/FINDINGS.md). So the API writes the events here first and publishes a message
that carries only the group's id; the worker deletes the record after its commit; the
workers' own sweep (app/redelivery.py) publishes again every record whose message is
lost. The same record is the retry schedule: a failed write moves the record's due time
back. Redelivery is safe because storing is idempotent on (app, event_id).

A record is in one of two states on its queue:
- in flight: a message for it was pushed at time T and no worker has taken it yet.
  It is not redelivered while it may still be waiting in the queue. It is lost when a
  worker has taken a message pushed after T (queues are FIFO: it was popped, and the
  worker that popped it died), or when its queue is empty and no worker took anything
  for a lease (nothing is waiting, so nothing is coming) -- and T is a lease ago.
  So a long backlog is never handed copies, and a lost message comes back a lease after
  the workers move on, whatever the backlog.
- due at T: taken by a worker (which renews the lease while it writes), or waiting for
  a retry. At T the sweep publishes it again.
A worker that takes a group counts a delivery; a group taken MAX_DELIVERIES times
without any write finishing kills its process (OOM, hard time limit): it is split.
"""
import contextlib
import fcntl
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import redis

from app.files import sync_folder, write_whole

log = logging.getLogger(__name__)

# A group taken this many times without a write finishing is split instead of written.
MAX_DELIVERIES = 3
# A stored group leaves a tombstone this long, so that a later copy of its message is
# known for a duplicate (longer than any redelivery: kombu restores a dead worker's
# unacknowledged messages after its visibility timeout, 300 s). About 100 bytes a group.
TOMBSTONE_TTL = 3600
# How long /ready warns after a message found no pending record and no tombstone.
MISSING_WARNING_TTL = 3600
# Queues are FIFO, but two web processes' clocks and pushes can disagree by a little.
CLOCK_SLACK = 1.0


@dataclass
class Taken:
    """What a worker finds when it takes a group: `ok` with the record, `stored`, or `missing`."""

    status: str
    record: dict | None = None
    deliveries: int = 0


# Claim what is lost or due, atomically, so that the sweeps of every worker running at
# once publish each id once. KEYS: due, flight, progress. ARGV: now, lease, limit,
# queue empty (1/0), clock slack.
CLAIM = """
local now, lease, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local progress = redis.call('HMGET', KEYS[3], 'pushed', 'at')
local seen, at = tonumber(progress[1] or '0'), tonumber(progress[2] or '0')
local upto = math.min(seen - tonumber(ARGV[5]), now - lease)
if ARGV[4] == '1' and now - at >= lease then upto = now - lease end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', upto, 'LIMIT', 0, limit)) do
  table.insert(ids, id)
end
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZADD', KEYS[2], now, id)
end
return ids
"""
# A worker takes a group before writing it. KEYS: bodies, due, flight, deliveries,
# progress, tombstone. ARGV: id, now, lease.
TAKE = """
local body = redis.call('HGET', KEYS[1], ARGV[1])
if not body then
  if redis.call('EXISTS', KEYS[6]) == 1 then return {'stored'} end
  return {'missing'}
end
local pushed = redis.call('ZSCORE', KEYS[3], ARGV[1])
if pushed then
  if tonumber(pushed) > tonumber(redis.call('HGET', KEYS[5], 'pushed') or '0') then
    redis.call('HSET', KEYS[5], 'pushed', pushed)
  end
  redis.call('ZREM', KEYS[3], ARGV[1])
end
redis.call('HSET', KEYS[5], 'at', ARGV[2])
redis.call('ZADD', KEYS[2], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
return {'ok', body, redis.call('HINCRBY', KEYS[4], ARGV[1], 1)}
"""
# Reschedule only a record that still exists: a duplicate delivery may have stored it.
# A write finished, so its deliveries start again from none.
RESCHEDULE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
return 1
"""


def _record(events, attempts):
    return orjson.dumps({"attempts": attempts, "events": events})


class _Holding:
    """Groups this process is writing now; a thread renews their leases so that a long write is not redelivered."""

    def __init__(self, store):
        self.store = store
        self.held: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()
        self.pid = None

    @contextlib.contextmanager
    def hold(self, queue: str, group_id: str):
        key = (queue, group_id)
        with self.lock:
            if self.pid != os.getpid():  # started on first use in each (forked) process
                self.held, self.pid = {}, os.getpid()
                threading.Thread(target=self._renew, name="intake-pending-renew", daemon=True).start()
            self.held[key] = self.held.get(key, 0) + 1
        try:
            yield
        finally:
            with self.lock:
                self.held[key] -= 1
                if not self.held[key]:
                    del self.held[key]

    def _renew(self):
        while True:
            time.sleep(self.store.redeliver_after / 3)
            with self.lock:
                held = list(self.held)
            for queue, group_id in held:
                try:
                    self.store.renew(queue, group_id)
                except Exception as error:  # the next round tries again; the lease is three rounds long
                    log.warning("could not renew the lease of group %s: %s", group_id, error)


class RedisPendingStore:
    """Pending records in Redis: a hash of bodies and, per queue, sorted sets of due and push times."""

    BODIES = "intake:pending:bodies"
    DELIVERIES = "intake:pending:deliveries"
    MISSING_COUNT = "intake:pending:missing:count"
    MISSING_LAST = "intake:pending:missing:last"

    def __init__(self, url: str, redeliver_after: float):
        self.url = url
        self.redeliver_after = redeliver_after
        self.redis = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._claim = self.redis.register_script(CLAIM)
        self._take = self.redis.register_script(TAKE)
        self._reschedule = self.redis.register_script(RESCHEDULE)
        self._holding = _Holding(self)

    @staticmethod
    def _due_key(queue):
        return f"intake:pending:due:{queue}"

    @staticmethod
    def _flight_key(queue):
        return f"intake:pending:flight:{queue}"

    @staticmethod
    def _accepted_key(queue):
        return f"intake:pending:accepted:{queue}"

    @staticmethod
    def _progress_key(queue):
        return f"intake:pending:progress:{queue}"

    @staticmethod
    def _tombstone_key(group_id):
        return f"intake:pending:stored:{group_id}"

    def put(self, queue: str, group_id: str, events: list, attempts: int = 0, message=()) -> None:
        """Record a group; `message`: Redis commands publishing its broker message in the same transaction."""
        pipe = self.redis.pipeline(transaction=True)
        for command in self._record_commands(queue, group_id, events, attempts):
            pipe.execute_command(*command)
        for command, args in message:
            getattr(pipe, command)(*args)
        pipe.execute()

    def begin_put(self, queue: str, group_id: str, events: list) -> "RecordWrite":
        """Send a group's record to Redis without waiting: `finish()` on the answer reads it.

        The publisher on RabbitMQ sends the record, then the message, and reads both answers:
        one wait instead of two. A worker that takes the message before Redis has run the
        record waits for it (app/events.py).
        """
        return RecordWrite(self.redis.connection_pool, self._record_commands(queue, group_id, events, 0))

    def _record_commands(self, queue: str, group_id: str, events: list, attempts: int) -> list[tuple]:
        """The Redis commands that record a group: its body, and its push and acceptance times."""
        now = time.time()
        return [("HSET", self.BODIES, group_id, _record(events, attempts)),
                ("ZADD", self._flight_key(queue), now, group_id),
                ("ZADD", self._accepted_key(queue), now, group_id)]

    def load(self, queue: str, group_id: str) -> dict | None:
        body = self.redis.hget(self.BODIES, group_id)
        return None if body is None else orjson.loads(body)

    def take(self, queue: str, group_id: str) -> Taken:
        """A worker starts on a group: count the delivery, note the queue's progress, start its lease."""
        keys = [self.BODIES, self._due_key(queue), self._flight_key(queue), self.DELIVERIES,
                self._progress_key(queue), self._tombstone_key(group_id)]
        answer = self._take(keys=keys, args=[group_id, time.time(), self.redeliver_after])
        status = answer[0].decode()
        if status != "ok":
            return Taken(status)
        return Taken(status, orjson.loads(answer[1]), int(answer[2]))

    def hold(self, queue: str, group_id: str):
        """Context manager: keep the group's lease renewed while this process writes it."""
        return self._holding.hold(queue, group_id)

    def renew(self, queue: str, group_id: str) -> None:
        self.redis.zadd(self._due_key(queue), {group_id: time.time() + self.redeliver_after}, xx=True)

    def _forget(self, pipe, queue, group_id):
        pipe.hdel(self.BODIES, group_id)
        pipe.zrem(self._due_key(queue), group_id)
        pipe.zrem(self._flight_key(queue), group_id)
        pipe.zrem(self._accepted_key(queue), group_id)
        pipe.hdel(self.DELIVERIES, group_id)
        pipe.set(self._tombstone_key(group_id), 1, ex=TOMBSTONE_TTL)

    def done(self, queue: str, group_id: str) -> None:
        """The group is stored (or given up on purpose): drop it, leaving a tombstone."""
        pipe = self.redis.pipeline(transaction=True)
        self._forget(pipe, queue, group_id)
        pipe.execute()

    def reschedule(self, queue: str, group_id: str, events: list, attempts: int, delay: float) -> bool:
        keys = [self.BODIES, self._due_key(queue), self._flight_key(queue), self.DELIVERIES]
        return bool(self._reschedule(keys=keys, args=[group_id, _record(events, attempts), time.time() + delay]))

    def split(self, queue: str, group_id: str, parts: list[list], attempts: int, deliveries: int) -> list[str]:
        """Replace a group by one record per part, due now (the sweep publishes them); return their ids."""
        accepted = self.redis.zscore(self._accepted_key(queue), group_id) or time.time()
        ids = [f"{group_id}.{number}" for number in range(len(parts))]
        pipe = self.redis.pipeline(transaction=True)
        self._forget(pipe, queue, group_id)
        for part_id, events in zip(ids, parts):
            pipe.hset(self.BODIES, part_id, _record(events, attempts))
            pipe.zadd(self._due_key(queue), {part_id: time.time()})
            pipe.zadd(self._accepted_key(queue), {part_id: accepted})
            pipe.hset(self.DELIVERIES, part_id, deliveries)
        pipe.execute()
        return ids

    def claim_due(self, queue: str, queue_empty: bool = False, limit: int = 1000) -> list[str]:
        """Ids whose message is lost or whose retry is due, each claimed once; `queue_empty`: the broker's queue."""
        keys = [self._due_key(queue), self._flight_key(queue), self._progress_key(queue)]
        ids = self._claim(keys=keys, args=[time.time(), self.redeliver_after, limit, int(queue_empty), CLOCK_SLACK])
        return [i.decode() for i in ids]

    def stats(self, queues) -> dict[str, tuple[int, float]]:
        """queue -> (pending groups, age in seconds of the oldest)."""
        pipe = self.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.zcard(self._accepted_key(queue))
            pipe.zrange(self._accepted_key(queue), 0, 0, withscores=True)
        answers, now = pipe.execute(), time.time()
        result = {}
        for number, queue in enumerate(queues):
            oldest = answers[2 * number + 1]
            result[queue] = (answers[2 * number], max(0.0, now - oldest[0][1]) if oldest else 0.0)
        return result

    def note_missing(self, queue: str, group_id: str) -> None:
        """Remember, for /ready, that a message found neither its record nor a tombstone."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.incr(self.MISSING_COUNT)
        pipe.expire(self.MISSING_COUNT, MISSING_WARNING_TTL)
        pipe.set(self.MISSING_LAST, f"{time.time():.0f} {queue} {group_id}", ex=MISSING_WARNING_TTL)
        pipe.execute()

    def warnings(self) -> list[str]:
        count, last = self.redis.mget(self.MISSING_COUNT, self.MISSING_LAST)
        return [_missing_warning(int(count), last.decode())] if count and last else []


class RecordWrite:
    """Commands sent to Redis in one MULTI/EXEC on a pooled connection, their answer read by `finish()`.

    What redis-py's transaction pipeline does, split in two: its `execute()` sends and reads in
    one call. Only the Connection's public methods are used (pack, send, read, disconnect).
    """

    def __init__(self, pool, commands: list[tuple]):
        self._pool = pool
        self._connection = pool.get_connection()
        self._answers = len(commands) + 2  # +OK for MULTI, QUEUED for each command, then EXEC's array
        self._error = None
        self._finished = False
        try:
            self._connection.send_packed_command(self._connection.pack_commands([("MULTI",), *commands, ("EXEC",)]))
        except Exception:
            self._close()
            raise

    def finish(self) -> None:
        """Read Redis's answer (the first call only) and raise if the commands did not all run."""
        if not self._finished:
            self._finished = True
            try:
                answers = [self._connection.read_response() for _ in range(self._answers)]
                failed = [answer for answer in answers[-1] if isinstance(answer, Exception)]
                if failed:
                    raise failed[0]
            except Exception as error:
                self._error = error
                self._close()
            else:
                self._pool.release(self._connection)
        if self._error is not None:
            raise self._error

    @property
    def failed(self) -> bool:
        """The answer was read and the commands did not all run."""
        return self._error is not None

    def _close(self):
        # An answer left unread on the connection would be taken for the next command's.
        self._connection.disconnect()
        self._pool.release(self._connection)


def _missing_warning(count: int, last: str) -> str:
    moment, queue, group_id = last.split(" ", 2)
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(moment)))
    return (f"pending store: {count} message(s) in the last hour found no pending record and no sign of having "
            f"been stored (last: group {group_id} on {queue} at {at}); the pending store may have lost data "
            "(Redis restarted without persistence, or workers on another Redis)")


class FolderPendingStore:
    """Pending records as files under instance/, for the embedded default (no Redis).

    One JSON file per group in a folder per queue, written to a unique temporary file,
    fsynced, renamed and the folder fsynced: a power cut leaves the old record or the
    new one; a stored group's tombstone, then its record's removal, are fsynced too. A record
    that does not parse or has not the shape written here is moved aside to corrupt/ (and
    logged). The file's modification time is the group's acceptance time (for the
    gauges, without reading every file). Claims and takes hold a lock per queue.
    """

    def __init__(self, folder: str, redeliver_after: float):
        self.folder = Path(folder)
        self.redeliver_after = redeliver_after
        self._holding = _Holding(self)
        self._pruned = 0.0

    def _path(self, queue, group_id):
        return self.folder / queue / f"{group_id}.json"

    @contextlib.contextmanager
    def _locked(self, queue):
        (self.folder / queue).mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"{queue}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write(self, queue, group_id, record: dict, accepted: float) -> None:
        path = self._path(queue, group_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, json.dumps(record).encode())
        os.utime(path, (accepted, accepted))

    def _read(self, path: Path) -> dict | None:
        """The record, or None if there is none; a corrupt or unusable one is moved aside (and logged)."""
        try:
            record = json.loads(path.read_bytes())
            _check_record(record)
            return record
        except FileNotFoundError:
            return None
        except (ValueError, RecursionError) as error:  # json's errors and _check_record's
            aside = self.folder / "corrupt" / f"{path.parent.name}-{path.name}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, aside)
                log.error("corrupt pending record %s moved to %s: %s", path, aside, error)
            return None

    def put(self, queue, group_id, events, attempts=0):
        now = time.time()
        self._write(queue, group_id, {"flight": now, "due": None, "attempts": attempts, "events": events}, now)

    def load(self, queue, group_id):
        return self._read(self._path(queue, group_id))

    def take(self, queue, group_id) -> Taken:
        path = self._path(queue, group_id)
        with self._locked(queue):
            record = self._read(path)
            if record is None:
                return Taken("stored" if (self.folder / "stored" / group_id).exists() else "missing")
            now, accepted = time.time(), path.stat().st_mtime
            progress = self._progress(queue)
            if record.get("flight") is not None:
                progress["pushed"] = max(progress.get("pushed", 0), record["flight"])
            progress["at"] = now
            write_whole(self.folder / f"{queue}.progress", json.dumps(progress).encode(), sync=False)
            record.update(flight=None, due=now + self.redeliver_after, deliveries=record.get("deliveries", 0) + 1)
            self._write(queue, group_id, record, accepted)
        return Taken("ok", record, record["deliveries"])

    def _progress(self, queue) -> dict:
        try:
            return json.loads((self.folder / f"{queue}.progress").read_bytes())
        except (FileNotFoundError, ValueError):
            return {}

    def hold(self, queue, group_id):
        return self._holding.hold(queue, group_id)

    def renew(self, queue, group_id):
        path = self._path(queue, group_id)
        with self._locked(queue):
            record = self._read(path)
            if record is not None and record.get("due") is not None:
                record["due"] = time.time() + self.redeliver_after
                self._write(queue, group_id, record, path.stat().st_mtime)

    def _tombstone(self, group_id):
        # Synced before the record goes: else a power cut could leave neither, and a later
        # copy of the group's message would be reported as lost data.
        tombstone = self.folder / "stored" / group_id
        tombstone.parent.mkdir(parents=True, exist_ok=True)
        tombstone.touch()
        sync_folder(tombstone.parent)

    def _remove(self, queue, group_id):
        path = self._path(queue, group_id)
        path.unlink(missing_ok=True)
        sync_folder(path.parent)  # else a power cut brings the stored group back, to be written again

    def done(self, queue, group_id):
        self._tombstone(group_id)
        with self._locked(queue):  # not while a claim rewrites it
            self._remove(queue, group_id)

    def reschedule(self, queue, group_id, events, attempts, delay):
        path = self._path(queue, group_id)
        with self._locked(queue):
            if not path.exists():
                return False
            record = {"flight": None, "due": time.time() + delay, "attempts": attempts, "events": events}
            self._write(queue, group_id, record, path.stat().st_mtime)
        return True

    def split(self, queue, group_id, parts, attempts, deliveries):
        path = self._path(queue, group_id)
        accepted = path.stat().st_mtime if path.exists() else time.time()
        ids = [f"{group_id}.{number}" for number in range(len(parts))]
        with self._locked(queue):
            for part_id, events in zip(ids, parts):
                record = {"flight": None, "due": time.time(), "attempts": attempts, "deliveries": deliveries,
                          "events": events}
                self._write(queue, part_id, record, accepted)
            self._tombstone(group_id)
            self._remove(queue, group_id)
        return ids

    def claim_due(self, queue, queue_empty=False, limit=1000):
        now, claimed = time.time(), []
        with self._locked(queue):
            progress = self._progress(queue)
            upto = min(progress.get("pushed", 0) - CLOCK_SLACK, now - self.redeliver_after)
            if queue_empty and now - progress.get("at", 0) >= self.redeliver_after:
                upto = now - self.redeliver_after
            for path in sorted((self.folder / queue).glob("*.json")):
                if len(claimed) >= limit:
                    break
                record = self._read(path)
                if record is None:
                    continue
                due = record.get("due") is not None and record["due"] <= now
                lost = record.get("flight") is not None and record["flight"] <= upto
                if due or lost:
                    record.update(flight=now, due=None)
                    self._write(queue, path.stem, record, path.stat().st_mtime)
                    claimed.append(path.stem)
        self._prune(now)
        return claimed

    def _prune(self, now):
        # Tombstones past their time, and temporary files a crash left behind, at most once a minute.
        if now - self._pruned < 60:
            return
        self._pruned = now
        for pattern, age in (("stored/*", TOMBSTONE_TTL), ("*/*.tmp", 3600)):
            for path in self.folder.glob(pattern):
                with contextlib.suppress(FileNotFoundError):
                    if now - path.stat().st_mtime > age:
                        path.unlink()

    def stats(self, queues):
        now, result = time.time(), {}
        for queue in queues:
            times = []
            for path in (self.folder / queue).glob("*.json"):
                with contextlib.suppress(FileNotFoundError):
                    times.append(path.stat().st_mtime)
            result[queue] = (len(times), max(0.0, now - min(times)) if times else 0.0)
        return result

    def note_missing(self, queue, group_id):
        path = self.folder / "missing.json"
        try:
            count = json.loads(path.read_bytes())["count"] if time.time() - path.stat().st_mtime < MISSING_WARNING_TTL \
                else 0
        except (FileNotFoundError, ValueError, KeyError):
            count = 0
        self.folder.mkdir(parents=True, exist_ok=True)
        write_whole(path, json.dumps({"count": count + 1, "last": f"{time.time():.0f} {queue} {group_id}"}).encode(),
                       sync=False)

    def warnings(self):
        path = self.folder / "missing.json"
        try:
            if time.time() - path.stat().st_mtime > MISSING_WARNING_TTL:
                return []
            found = json.loads(path.read_bytes())
            return [_missing_warning(found["count"], found["last"])]
        except (FileNotFoundError, ValueError, KeyError):
            return []


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_record(record) -> None:
    """Raise ValueError unless `record` has the shape FolderPendingStore writes (JSON that parses may not)."""
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object but {type(record).__name__}")
    if not isinstance(record.get("events"), list):
        raise ValueError("events is not a list")
    for field, value in (("attempts", record.get("attempts")), ("deliveries", record.get("deliveries", 0))):
        if not _is_int(value):
            raise ValueError(f"{field} is not an integer")
    for field in ("flight", "due"):
        value = record.get(field)
        if value is not None and not ((_is_int(value) or isinstance(value, float)) and math.isfinite(value)):
            raise ValueError(f"{field} is not a time")


def pending_store_from_config(config) -> RedisPendingStore | FolderPendingStore:
    if config["REDIS_URL"]:
        return RedisPendingStore(config["REDIS_URL"], config["INGEST_REDELIVER_AFTER"])
    return FolderPendingStore(config["PENDING_FOLDER"], config["INGEST_REDELIVER_AFTER"])
