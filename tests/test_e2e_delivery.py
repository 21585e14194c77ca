"""Nothing accepted is lost: SIGKILLed workers, messages the broker lost, a backlog, a database outage.

No test here runs beat: recovery lives in the workers (app/redelivery.py). Each runs on both
brokers (the `broker` fixture); the pending store is Redis on both.
"""
import json
import os
import re
import signal
import sys
import threading
import time
import uuid

import psycopg2

from tests.conftest import DATABASE_URL, DB_NAME, Process, free_port, sql, wait_until

# The contract: every accepted event stored within 30 s of the last worker restart (60 s at
# most). INGEST_REDELIVER_AFTER is 8 s in the tests; the workers sweep every 2 s.
AIM, REDELIVERY_BOUND = 30, 60


def stored_ids(app_id):
    return [row[0] for row in sql("SELECT event_id FROM events WHERE app_id = %s", app_id)]


def _wait_stored(app_id, accepted, broker, redis):
    """Wait up to REDELIVERY_BOUND for every accepted event; on time-out say where the rest are."""
    try:
        wait_until(lambda: len(stored_ids(app_id)) >= len(accepted), timeout=REDELIVERY_BOUND,
                   message=f"{len(accepted)} stored events")
    except AssertionError:
        raise AssertionError(f"{len(stored_ids(app_id))} of {len(accepted)} stored {REDELIVERY_BOUND} s after the last "
                             f"restart; queued {broker.depth('default')} / {broker.depth('batch_processing')}, "
                             f"pending {redis.hlen('intake:pending:bodies')}") from None


def test_messages_lost_by_the_broker_are_published_again(broker, stack, make_app):
    app_id, key = make_app()
    stack.web()
    for i in range(5):
        assert stack.post(f"/api/logs/{app_id}", {"event_name": "e", "event_id": f"lost-{i}"},
                          {"X-API-Key": key}).status_code == 202
    assert stack.post(f"/api/logs/{app_id}/batch", [{"event_name": "b", "event_id": f"lost-b{i}"} for i in range(5)],
                      headers={"X-API-Key": key}).status_code == 202
    # What kombu's Redis transport does when a worker dies between BRPOP and its
    # bookkeeping (and what an operator's purge does on any broker): the messages are gone.
    broker.lose("default", "batch_processing")
    stack.worker(queues="default,batch_processing")
    wait_until(lambda: len(stored_ids(app_id)) == 10, timeout=AIM, message="10 redelivered events")
    assert sorted(stored_ids(app_id)) == sorted([f"lost-{i}" for i in range(5)] + [f"lost-b{i}" for i in range(5)])


def test_sigkilled_workers_lose_nothing_and_store_once(broker, stack, make_app, redis):
    app_id, key = make_app()
    stack.web(workers=2, threads=4)
    worker = stack.worker(queues="default,batch_processing", concurrency=2)
    accepted, refused, stop = [], [], threading.Event()

    def load(thread):
        i = 0
        while not stop.is_set():
            if i % 5 == 0:
                ids = [f"{thread}-{i}-{k}" for k in range(20)]
                response = stack.post(f"/api/logs/{app_id}/batch", [{"event_name": "b", "event_id": e} for e in ids],
                                      headers={"X-API-Key": key})
            else:
                ids = [f"{thread}-{i}"]
                response = stack.post(f"/api/logs/{app_id}", {"event_name": "s", "event_id": ids[0]},
                                      {"X-API-Key": key})
            (accepted if response.status_code == 202 else refused).extend(ids)
            i += 1
            # Paced: the kills, not the size of the drain afterwards, are what is tested (unpaced,
            # a loaded CI machine accepted 40,000 events in 6 s and took over a minute to store
            # them; at 5 ms a busy 2-core machine still accepted 31,000 and stored 30,000 in time).
            time.sleep(0.02)

    threads = [threading.Thread(target=load, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3):
            time.sleep(1.5)
            worker.kill()  # SIGKILL to the whole process group, pool children included
            worker = stack.worker(queues="default,batch_processing", concurrency=2)
        restarted = time.monotonic()
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    assert not refused and len(accepted) > 200
    _wait_stored(app_id, accepted, broker, redis)
    print(f"{broker.name}: every accepted event stored {time.monotonic() - restarted:.1f} s after the last restart")
    stored = stored_ids(app_id)
    assert sorted(stored) == sorted(accepted)  # every accepted event, each exactly once
    wait_until(lambda: redis.hlen("intake:pending:bodies") == 0, message="pending store drained")
    assert sql("SELECT count(*) FROM failed_events")[0][0] == 0


def test_database_outage_delays_but_loses_nothing(broker, stack, make_app, redis):
    app_id, key = make_app()
    stack.web()
    # A worker whose database is unreachable: every write fails for a reason of the database.
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    broken = stack.worker(queues="default,batch_processing", DATABASE_URL=unreachable)
    for i in range(3):
        assert stack.post(f"/api/logs/{app_id}", {"event_name": "e", "event_id": f"o-{i}"},
                          {"X-API-Key": key}).status_code == 202
    # Let it retry past PERSIST_MAX_RETRIES (2 in the tests): the events must still wait.
    wait_until(lambda: _attempts(redis) > 3, timeout=60, message="several failed attempts")
    broken.stop()
    stack.worker(queues="default,batch_processing")
    wait_until(lambda: len(stored_ids(app_id)) == 3, timeout=60, message="3 events stored after the outage")
    assert sql("SELECT count(*) FROM failed_events")[0][0] == 0


def _attempts(redis):
    import orjson

    bodies = redis.hvals("intake:pending:bodies")
    return min((orjson.loads(body)["attempts"] for body in bodies), default=0)


def worker_log_lines(stack):
    for process in stack.processes:
        if process.name.startswith("worker-"):
            for line in process.output().splitlines():
                if line.startswith("{"):
                    try:
                        yield json.loads(line)
                    except ValueError:
                        continue


def test_a_backlog_on_each_queue_and_three_kills_keep_the_bound_without_copies(broker, stack, broker_app, make_app,
                                                                              redis, capsys):
    """A backlog of 10-20 s on each queue (the issue's 60 s, scaled to keep the test short)."""
    from tests.test_persistence import make_event

    app_id, key = make_app()
    stack.web(workers=2, threads=4)
    # The backlog: real groups with their records and messages, published as the API does.
    backlog, made = [], {"default": 0, "batch_processing": 0}

    def top_up(queue, groups):
        """Publish `groups` more groups to `queue` (one event each on default, ten on batch_processing)."""
        with broker_app.app_context():
            publisher = broker_app.extensions["intake.publisher"]
            for i in range(made[queue], made[queue] + groups):
                ids = [f"q-{i}"] if queue == "default" else [f"qb-{i}-{k}" for k in range(10)]
                backlog.extend(ids)
                publisher.publish(queue, [make_event(app_id, event_id=e) for e in ids], [])
        made[queue] += groups

    backlog_single, backlog_batches = BACKLOG[broker.name]
    top_up("default", backlog_single)
    top_up("batch_processing", backlog_batches)
    accepted, refused, stop = backlog, [], threading.Event()

    def load(thread):
        i = 0
        while not stop.is_set():
            ids = [f"{thread}-{i}-{k}" for k in range(10)] if i % 3 == 0 else [f"{thread}-{i}"]
            if len(ids) > 1:
                response = stack.post(f"/api/logs/{app_id}/batch", [{"event_name": "b", "event_id": e} for e in ids],
                                      headers={"X-API-Key": key})
            else:
                response = stack.post(f"/api/logs/{app_id}", {"event_name": "s", "event_id": ids[0]},
                                      {"X-API-Key": key})
            (accepted if response.status_code == 202 else refused).extend(ids)
            i += 1
            time.sleep(0.05)  # light: the backlog, not this stream, keeps the workers busy

    def workers():
        # Both started at once, then both waited for: a restart as a platform does it.
        started = [Process(f"worker-{queue}", [sys.executable, "-m", "celery", "-A", "run:celery", "worker", "-Q", queue,
                                               "-n", f"{queue}-{uuid.uuid4().hex[:6]}@%h", "-c", "2", "--loglevel",
                                               "INFO", "--without-gossip", "--without-mingle"],
                           stack.env, stack.log_dir).start() for queue in ("default", "batch_processing")]
        stack.processes.extend(started)
        for process in started:
            process.wait_for_output("ready.", timeout=60)
        return started

    started = time.monotonic()
    running = workers()
    threads = [threading.Thread(target=load, args=(t,)) for t in range(2)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3):
            time.sleep(2)
            # Every kill lands on a backlog, however fast this machine drains one.
            for queue, groups in (("default", backlog_single // 4), ("batch_processing", backlog_batches // 4)):
                if broker.depth(queue) < groups:
                    top_up(queue, groups)
            assert broker.depth("default") > 0 and broker.depth("batch_processing") > 0, "the backlog is still there"
            for worker in running:
                worker.kill()
            running = workers()
        restarted = time.monotonic()
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    assert not refused
    _wait_stored(app_id, accepted, broker, redis)
    took = time.monotonic() - restarted
    assert sorted(stored_ids(app_id)) == sorted(accepted)  # every accepted event, each exactly once
    wait_until(lambda: redis.hlen("intake:pending:bodies") == 0, message="pending store drained")
    lines = list(worker_log_lines(stack))
    duplicates = sum(1 for line in lines if line.get("outcome") == "duplicate")
    published_again = sum(int(m.group(1)) for line in lines
                          if (m := re.match(r"redelivery sweep published (\d+)", line.get("message", ""))))
    with capsys.disabled():
        print(f"\n{broker.name}: backlog {made['default']} + {made['batch_processing']} groups, {len(accepted)} events, three kills: "
              f"all stored {took:.1f} s after the last restart ({time.monotonic() - started:.1f} s in all, kills "
              f"over {restarted - started:.1f} s); "
              f"the sweep published {published_again} group(s) again, {duplicates} of them duplicates")
    assert took <= REDELIVERY_BOUND
    # RabbitMQ hands a killed worker's unacknowledged messages back: a group it had stored but not
    # yet acknowledged is delivered again and found stored ("duplicate"), at most the tasks
    # running at each kill (3 kills x 2 workers x 2 processes). Redis returns them only after
    # the visibility timeout, long after the sweep has published them again.
    redelivered_by_the_broker = 3 * 2 * 2 if broker.name == "amqp" else 0
    assert published_again <= 100, "a backlog is not handed copies"
    assert duplicates <= published_again + redelivered_by_the_broker


# (single-event groups, 10-event groups) sized for 10-20 s of backlog on each queue on a loaded
# 2-core machine: on Redis about 100 single-event groups a second drain, with the live load
# beside them; RabbitMQ pushes messages to its consumers and drains about three times as fast
# (280 and 170 groups a second here). The issue says 60 s: scaled down to keep `make test`
# short; the mechanism does not depend on the length.
BACKLOG = {"redis": (1200, 400), "amqp": (3600, 1600)}


def _pool_children(worker) -> list[int]:
    """The prefork pool processes of a worker started by the stack (children of its main process)."""
    path = f"/proc/{worker.proc.pid}/task/{worker.proc.pid}/children"
    try:
        with open(path) as children:
            return [int(pid) for pid in children.read().split()]
    except FileNotFoundError:
        return []


def _lock_waits() -> int:
    """Backends of this run's database (other than the asking one) waiting for a lock."""
    return sql("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
               " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")[0][0]


def test_a_group_whose_write_kills_its_process_is_split_and_the_killer_kept_as_failed(broker, stack, broker_app,
                                                                                      make_app, redis):
    """Real deaths: the pool process dies (SIGKILL, as the OOM killer or the hard time limit do) mid-write."""
    from tests.test_persistence import make_event

    app_id, _ = make_app()
    # A backend whose client died notices it only when it next talks to it, not while it waits
    # for a lock: have the server check, so that a killed write lets go of its keys at once (as a
    # write that was not waiting does when it finishes).
    sql(f'ALTER DATABASE "{DB_NAME}" SET client_connection_check_interval = \'100ms\'')
    worker = stack.worker(queues="default", concurrency=1)
    # The killer: its key is being inserted by a transaction the test holds open, so the worker's
    # write of any group holding it waits; the test kills the process every time it waits there.
    holder = psycopg2.connect(DATABASE_URL)
    holder.cursor().execute("INSERT INTO event_keys (app_id, event_id, stored_at) VALUES (%s, 'k-1', now())",
                            (app_id,))
    ids = ["k-0", "k-1", "k-2", "k-3"]
    try:
        with broker_app.app_context():
            broker_app.extensions["intake.publisher"].publish("default", [make_event(app_id, event_id=e) for e in ids],
                                                              [])
        kills, deadline = 0, time.monotonic() + 90
        while not sql("SELECT 1 FROM failed_events WHERE app_id = %s AND event_id = 'k-1'", app_id):
            assert time.monotonic() < deadline, f"no failed event after {kills} kills:\n{worker.output()[-3000:]}"
            if _lock_waits():
                for pid in _pool_children(worker):
                    os.kill(pid, signal.SIGKILL)
                kills += 1
                # The dead backend's lock wait ends with its connection; then the next delivery.
                wait_until(lambda: not _lock_waits(), timeout=10, interval=0.05, message="the killed write gone")
            time.sleep(0.1)
    finally:
        holder.rollback()
        holder.close()
        sql(f'ALTER DATABASE "{DB_NAME}" RESET client_connection_check_interval')
    wait_until(lambda: len(stored_ids(app_id)) == 3, timeout=REDELIVERY_BOUND, message="the other three stored")
    assert sorted(stored_ids(app_id)) == ["k-0", "k-2", "k-3"]
    [(error, attempts)] = sql("SELECT error, attempts FROM failed_events WHERE app_id = %s", app_id)
    assert error.startswith("WorkerLost") and "ended the worker process" in error
    # MAX_DELIVERIES (3) deaths of the whole group, then one death of each part holding the killer
    # (a part starts one delivery short of the cap): 4 events -> 2 + 2 -> 1 + 1.
    assert kills == 3 + 1 + 1, kills
    print(f"\n{kills} process deaths: 3 of the group's events stored, the killer kept as a failed event")
    wait_until(lambda: redis.hlen("intake:pending:bodies") == 0, message="pending store drained")
