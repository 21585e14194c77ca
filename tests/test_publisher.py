"""The publisher: a group's record and its Celery message reach Redis in one transaction."""
import json
import threading

import pytest
from kombu import Connection

from app.publisher import QueueUnavailable, get_publisher
from tests.private_redis import isolated_app

BODIES = "intake:pending:bodies"
EVENTS = [{"app_id": "a", "event_id": "e-1"}]


@pytest.fixture
def publisher(app):
    with app.app_context():
        yield get_publisher()


def pushed(redis, queue):
    """The messages waiting in a queue (oldest first), decoded."""
    return [json.loads(raw) for raw in reversed(redis.lrange(queue, 0, -1))]


def comparable(message):
    """A message without its delivery tag, which differs between any two publishes."""
    message = json.loads(json.dumps(message))
    message["properties"].pop("delivery_tag")
    return message


def test_the_pending_store_shares_the_brokers_redis_so_one_transaction_publishes(publisher):
    assert publisher.messages is not None


def test_a_broker_of_its_own_or_a_key_prefix_publishes_through_send_task(app, test_environment, monkeypatch):
    from app.publisher import Publisher

    celery, pending = app.extensions["celery"], app.extensions["intake.pending"]
    monkeypatch.setitem(celery.conf, "broker_url", test_environment["REDIS_URL"] + "?other")
    assert Publisher(celery, pending, window_ms=2, max_events=10, timeout=1).messages is None
    monkeypatch.setitem(celery.conf, "broker_url", pending.url)
    monkeypatch.setitem(celery.conf, "broker_transport_options", {"global_keyprefix": "x:"})
    assert Publisher(celery, pending, window_ms=2, max_events=10, timeout=1).messages is None


@pytest.mark.parametrize("queue", ["default", "batch_processing"])
def test_the_message_is_the_one_send_task_would_publish(app, publisher, redis, queue):
    publisher.celery.send_task(
        {"default": "intake.persist_events", "batch_processing": "intake.persist_batch"}[queue],
        args=["g-1"], task_id="g-1", queue=queue, headers={"request_ids": ["r-1"]},
    )
    [(command, (key, payload))] = publisher.messages.redis_commands(queue, "g-1", ["g-1"], {"request_ids": ["r-1"]})
    assert (command, key) == ("lpush", queue)
    [from_celery] = pushed(redis, queue)
    assert comparable(json.loads(payload)) == comparable(from_celery)


def test_a_published_group_has_its_record_and_its_message(publisher, redis):
    group_id = publisher.publish("default", EVENTS, ["r-1"])
    assert json.loads(redis.hget(BODIES, group_id))["events"] == EVENTS
    [message] = pushed(redis, "default")
    assert message["headers"]["id"] == group_id and message["headers"]["request_ids"] == ["r-1"]


def test_a_worker_consumes_the_message_as_a_task(app, publisher, test_environment):
    # kombu itself reads the message back: the task, its arguments, the headers.
    group_id = publisher.publish("default", EVENTS, ["r-1"])
    received = []
    with Connection(test_environment["REDIS_URL"]) as connection:
        queue = connection.SimpleQueue("default")
        message = queue.get(timeout=2)
        received.append((message.headers["task"], message.decode()[0], message.headers["request_ids"]))
        message.ack()
        queue.close()
    assert received == [("intake.persist_events", [group_id], ["r-1"])]


def test_a_failed_transaction_leaves_neither_record_nor_message(publisher, redis, monkeypatch):
    def broken_commands(*args):
        return [("lpush", ("default",))]  # LPUSH without a value: Redis refuses it, so MULTI/EXEC fails

    monkeypatch.setattr(publisher.messages, "redis_commands", broken_commands)
    with pytest.raises(QueueUnavailable):
        publisher.publish("default", EVENTS)
    assert redis.hlen(BODIES) == 0 and redis.llen("default") == 0


def test_each_process_and_thread_gets_a_working_channel(publisher):
    results = []
    threads = [threading.Thread(target=lambda: results.append(publisher.messages.redis_commands(
        "default", "g", ["g"], {}))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(commands[0][0] == "lpush" for commands in results)


# --- group commit ---------------------------------------------------------------------------


@pytest.fixture
def slow_window(app):
    """A publisher whose window is long enough for every submitted event to make one group."""
    from app.publisher import Publisher

    with app.app_context():
        yield Publisher(app.extensions["celery"], app.extensions["intake.pending"], window_ms=300, max_events=500,
                        timeout=5)


def submit_all(publisher, count):
    futures = [publisher.submit({"app_id": "a", "event_id": f"e-{i}"}) for i in range(count)]
    outcomes = []
    for future in futures:
        try:
            outcomes.append(publisher.wait(future))
        except QueueUnavailable as error:
            outcomes.append(error)
    return outcomes


def test_events_submitted_within_the_window_travel_in_one_message(slow_window, redis):
    task_ids = submit_all(slow_window, 20)
    assert len(set(task_ids)) == 1, "every waiting request learns the same message"
    [message] = pushed(redis, "default")
    assert message["headers"]["id"] == task_ids[0]
    record = json.loads(redis.hget(BODIES, task_ids[0]))
    assert [e["event_id"] for e in record["events"]] == [f"e-{i}" for i in range(20)]


def test_a_failed_publish_fails_every_request_waiting_on_the_group(slow_window, redis, monkeypatch):
    monkeypatch.setattr(slow_window.messages, "redis_commands", lambda *args: [("lpush", ("default",))])
    outcomes = submit_all(slow_window, 20)
    assert all(isinstance(outcome, QueueUnavailable) for outcome in outcomes)
    assert redis.hlen(BODIES) == 0 and redis.llen("default") == 0


def test_batch_requests_within_the_window_share_a_message_up_to_the_event_cap(app, redis):
    from app.publisher import Publisher

    with app.app_context():
        publisher = Publisher(app.extensions["celery"], app.extensions["intake.pending"], window_ms=300,
                              max_events=250, timeout=5)
        batches = [[{"app_id": "a", "event_id": f"b{b}-{i}"} for i in range(100)] for b in range(4)]
        futures = [publisher.submit_batch(batch) for batch in batches]
        task_ids = [publisher.wait(future) for future in futures]
    # 100 + 100 fit under the cap of 250; the third would pass it and opens the next group.
    assert task_ids[0] == task_ids[1] != task_ids[2] == task_ids[3]
    assert len(pushed(redis, "batch_processing")) == 2
    first = json.loads(redis.hget(BODIES, task_ids[0]))["events"]
    assert [e["event_id"] for e in first] == [e["event_id"] for e in batches[0] + batches[1]]


def test_a_batch_larger_than_the_cap_travels_alone(app, redis):
    from app.publisher import Publisher

    with app.app_context():
        publisher = Publisher(app.extensions["celery"], app.extensions["intake.pending"], window_ms=50,
                              max_events=10, timeout=5)
        task_id = publisher.wait(publisher.submit_batch([{"app_id": "a", "event_id": str(i)} for i in range(30)]))
    assert len(json.loads(redis.hget(BODIES, task_id))["events"]) == 30


# --- supervision ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_publisher_thread_that_dies_is_started_again(app, redis, monkeypatch, caplog):
    from app.publisher import Publisher

    with app.app_context():
        publisher = Publisher(app.extensions["celery"], app.extensions["intake.pending"], window_ms=2,
                              max_events=500, timeout=2)
        assert publisher.wait(publisher.submit({"app_id": "a", "event_id": "before"}))
        thread = publisher._threads["default"]

        def die(*args):
            raise SystemExit  # what no `except Exception` catches: the thread ends
        monkeypatch.setattr(publisher, "_next_group", die)
        publisher.submit({"app_id": "a", "event_id": "lost-with-the-thread"})
        thread.join(5)
        assert not thread.is_alive() and not publisher.threads_alive()
        monkeypatch.undo()

        task_id = publisher.wait(publisher.submit({"app_id": "a", "event_id": "after"}))
        assert publisher.threads_alive() and publisher._threads["default"] is not thread
    assert "after" in redis.hget(BODIES, task_id).decode()
    assert any(r.levelname == "ERROR" and "had died" in r.getMessage() for r in caplog.records)


def test_an_unexpected_error_fails_the_requests_in_hand_and_the_thread_goes_on(slow_window, monkeypatch):
    real = slow_window._publish_for
    monkeypatch.setattr(slow_window, "_publish_for", lambda *args: 1 / 0)
    [outcome] = submit_all(slow_window, 1)
    assert isinstance(outcome, QueueUnavailable)
    monkeypatch.setattr(slow_window, "_publish_for", real)
    assert isinstance(submit_all(slow_window, 1)[0], str)
    assert slow_window.threads_alive()


@pytest.fixture
def amqp_publisher(rabbit):
    with isolated_app({"CELERY_BROKER_URL": rabbit.url}).app_context():
        yield get_publisher()


def test_on_rabbitmq_a_group_has_its_record_and_a_confirmed_message(amqp_publisher, rabbit, redis):
    group_id = amqp_publisher.publish("default", EVENTS)
    assert json.loads(redis.hget(BODIES, group_id))["events"] == EVENTS
    assert rabbit.depth("default") == 1


def test_on_rabbitmq_a_record_redis_refuses_is_a_503_and_its_message_stores_nothing(amqp_publisher, redis):
    redis.set("intake:pending:flight:default", "not a sorted set")  # the record's transaction fails in Redis
    with pytest.raises(QueueUnavailable, match="pending store unavailable"):
        amqp_publisher.publish("default", EVENTS)
    # The message may have reached the broker: the group's tombstone makes it a no-op for a worker.
    [tombstone] = redis.keys("intake:pending:stored:*")
    group_id = tombstone.decode().rsplit(":", 1)[1]
    assert amqp_publisher.pending.take("default", group_id).status == "stored"
    assert redis.hlen(BODIES) == 0
