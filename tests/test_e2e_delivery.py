"""Nothing accepted is lost: SIGKILLed workers, messages the broker lost, a database outage."""
import threading
import time

from tests.conftest import free_port, sql, wait_until

# INGEST_REDELIVER_AFTER is 8 s in the tests, and beat sweeps every 5 s.
REDELIVERY_BOUND = 8 + 5 + 30


def stored_ids(app_id):
    return [row[0] for row in sql("SELECT event_id FROM events WHERE app_id = %s", app_id)]


def test_messages_lost_by_the_broker_are_published_again(stack, make_app, redis):
    app_id, key = make_app()
    stack.web()
    for i in range(5):
        assert stack.post(f"/api/logs/{app_id}", {"event_name": "e", "event_id": f"lost-{i}"},
                          {"X-API-Key": key}).status_code == 202
    assert stack.post(f"/api/logs/{app_id}/batch", [{"event_name": "b", "event_id": f"lost-b{i}"} for i in range(5)],
                      headers={"X-API-Key": key}).status_code == 202
    # What kombu's Redis transport does when a worker dies between BRPOP and its
    # bookkeeping: the messages are gone from the broker.
    redis.delete("default", "batch_processing")
    stack.beat()
    stack.worker(queues="default,batch_processing")
    wait_until(lambda: len(stored_ids(app_id)) == 10, timeout=REDELIVERY_BOUND, message="10 redelivered events")
    assert sorted(stored_ids(app_id)) == sorted([f"lost-{i}" for i in range(5)] + [f"lost-b{i}" for i in range(5)])


def test_sigkilled_workers_lose_nothing_and_store_once(stack, make_app, redis):
    app_id, key = make_app()
    stack.web(workers=2, threads=4)
    stack.beat()
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

    threads = [threading.Thread(target=load, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3):
            time.sleep(1.5)
            worker.kill()  # SIGKILL to the whole process group, pool children included
            worker = stack.worker(queues="default,batch_processing", concurrency=2)
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    assert not refused and len(accepted) > 200
    wait_until(lambda: len(stored_ids(app_id)) >= len(accepted), timeout=REDELIVERY_BOUND + 30,
               message=f"{len(accepted)} stored events")
    stored = stored_ids(app_id)
    assert sorted(stored) == sorted(accepted)  # every accepted event, each exactly once
    wait_until(lambda: redis.hlen("intake:pending:bodies") == 0, message="pending store drained")
    assert sql("SELECT count(*) FROM failed_events")[0][0] == 0


def test_database_outage_delays_but_loses_nothing(stack, make_app, redis):
    app_id, key = make_app()
    stack.web()
    stack.beat()
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
