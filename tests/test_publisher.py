"""The publisher: a group's record and its Celery message reach Redis in one transaction."""
import json
import threading

import pytest
from kombu import Connection

from app.publisher import QueueUnavailable, get_publisher

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
