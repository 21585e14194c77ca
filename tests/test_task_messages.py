"""Task messages on RabbitMQ: the one send_task would publish, confirmed on a connection of the thread's own."""
import json
import threading
import time

import pytest
from kombu import Connection

from app.task_messages import AmqpTaskMessages
from tests.private_redis import isolated_app


def celery_on(url):
    """The Celery app of a Flask app of the test's own, on the broker at `url`."""
    return isolated_app({"CELERY_BROKER_URL": url}).extensions["celery"]


@pytest.fixture
def amqp_celery(rabbit):
    return celery_on(rabbit.url)


def taken(rabbit, queue):
    """The next message in a queue, taken off it (the raw AMQP message)."""
    with Connection(rabbit.url, connect_timeout=5) as connection:
        return connection.default_channel.basic_get(queue, no_ack=True)


@pytest.mark.parametrize("queue,task", [("default", "intake.persist_events"),
                                        ("batch_processing", "intake.persist_batch")])
def test_the_message_is_the_one_send_task_would_publish(amqp_celery, rabbit, queue, task):
    amqp_celery.send_task(task, args=["g-1"], task_id="g-1", queue=queue, headers={"request_ids": ["r-1"]},
                          confirm_timeout=5)
    AmqpTaskMessages(amqp_celery, timeout=5).publish(queue, "g-1", ["g-1"], {"request_ids": ["r-1"]})
    from_celery, ours = taken(rabbit, queue), taken(rabbit, queue)
    assert ours.properties == from_celery.properties
    assert json.loads(ours.body) == json.loads(from_celery.body)
    assert ours.properties["application_headers"]["task"] == task


def test_the_queues_are_declared_as_the_workers_declare_them(amqp_celery, rabbit):
    # A message to a queue no worker has declared yet would be confirmed and dropped.
    AmqpTaskMessages(amqp_celery, timeout=5).publish("default", "g-1", ["g-1"], {})
    assert rabbit.declared("batch_processing") and rabbit.depth("default") == 1


def test_each_thread_publishes_on_a_connection_of_its_own(amqp_celery, rabbit):
    messages = AmqpTaskMessages(amqp_celery, timeout=5)
    connections = []

    def publish(n):
        messages.publish("default", f"g-{n}", [f"g-{n}"], {})
        connections.append(messages._local.connection)

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(c) for c in connections}) == 3 and rabbit.depth("default") == 3


def test_a_confirm_that_never_comes_fails_in_time_and_its_connection_is_dropped(rabbit_proxy):
    messages = AmqpTaskMessages(celery_on(rabbit_proxy.url), timeout=0.5)
    messages.publish("default", "g-1", ["g-1"], {})
    first = messages._local.connection
    rabbit_proxy.freeze()
    started = time.monotonic()
    with pytest.raises(Exception):
        messages.publish("default", "g-2", ["g-2"], {})
    assert time.monotonic() - started < 1.5
    rabbit_proxy.thaw()
    # A confirm arriving late on the old connection can never be taken for the next message's.
    assert messages._local.connection is None
    messages.publish("default", "g-3", ["g-3"], {})
    assert messages._local.connection is not first


def test_a_broker_that_restarted_since_the_last_publish_costs_no_error(rabbit, rabbit_proxy):
    messages = AmqpTaskMessages(celery_on(rabbit_proxy.url), timeout=2)
    messages.publish("default", "g-1", ["g-1"], {})
    rabbit_proxy.stop()
    rabbit_proxy.start()
    messages.publish("default", "g-2", ["g-2"], {})  # the stale connection fails, a new one publishes
    assert rabbit.depth("default") == 2


def test_a_broker_that_is_down_fails_the_publish_in_time(rabbit_proxy):
    messages = AmqpTaskMessages(celery_on(rabbit_proxy.url), timeout=0.5)
    messages.publish("default", "g-1", ["g-1"], {})
    rabbit_proxy.stop()
    started = time.monotonic()
    with pytest.raises(Exception):
        messages.publish("default", "g-2", ["g-2"], {})  # kombu's own connection retries would go on for ever
    assert time.monotonic() - started < 1.5


def test_alongside_runs_once_between_the_send_and_the_confirm(amqp_celery, rabbit):
    messages = AmqpTaskMessages(amqp_celery, timeout=5)
    calls = []
    messages.publish("default", "g-1", ["g-1"], {}, alongside=lambda: calls.append("record read"))
    assert calls == ["record read"] and rabbit.depth("default") == 1


def test_an_error_alongside_is_raised_as_it_is_and_the_message_is_not_sent_again(amqp_celery, rabbit):
    messages = AmqpTaskMessages(amqp_celery, timeout=5)
    calls = []

    def record_refused():
        calls.append(1)
        raise ConnectionError("redis away")

    with pytest.raises(ConnectionError, match="redis away"):
        messages.publish("default", "g-1", ["g-1"], {}, alongside=record_refused)
    # Its confirm was left unread: the connection goes, so that it is never taken for the next one's.
    assert calls == [1] and messages._local.connection is None
    time.sleep(0.3)
    assert rabbit.depth("default") <= 1


def test_after_a_stale_connection_alongside_still_runs_once(rabbit, rabbit_proxy):
    messages = AmqpTaskMessages(celery_on(rabbit_proxy.url), timeout=2)
    messages.publish("default", "g-1", ["g-1"], {})
    rabbit_proxy.stop()
    rabbit_proxy.start()
    calls = []
    messages.publish("default", "g-2", ["g-2"], {}, alongside=lambda: calls.append(1))
    assert calls == [1] and rabbit.depth("default") >= 2
