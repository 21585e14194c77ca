"""Broker settings: what changes on RabbitMQ (celery_config.AMQP_SETTINGS) and what stays."""
import threading
import time

import pytest
from celery.worker.consumer import Consumer

import celery_config
from app.amqp_consumer import DELAYED_DELIVERY, IntakeConsumer
from tests.conftest import VHOST, free_port
from tests.private_redis import isolated_app


@pytest.mark.parametrize("url, amqp", [
    ("amqp://guest:guest@127.0.0.1:5672//", True),
    ("pyamqp://127.0.0.1//", True),
    ("amqps://rabbit.example.com//", True),
    ("amqp://guest@127.0.0.1:5681/v;amqp://guest@127.0.0.1:5682/v", True),  # a cluster's failover list
    ("redis://127.0.0.1:6379/0", False),
    ("rediss://127.0.0.1:6379/0", False),
    ("filesystem://localhost/", False),
])
def test_is_amqp_names_rabbitmq_urls(url, amqp):
    assert celery_config.is_amqp(url) is amqp


def test_on_rabbitmq_the_queues_are_quorum_and_publishes_are_confirmed():
    celery = isolated_app({"CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/x"}).extensions["celery"]
    queues = {queue.name: queue for queue in celery.conf.task_queues}
    assert set(queues) == set(celery_config.QUEUES)
    assert all(q.durable and q.queue_arguments == {"x-queue-type": "quorum"} for q in queues.values())
    assert celery.conf.broker_transport_options["confirm_publish"] is True
    assert celery.conf.worker_consumer == "app.amqp_consumer:IntakeConsumer"


def test_on_redis_the_queues_and_transport_are_as_before(app):
    celery = app.extensions["celery"]
    assert all(not q.queue_arguments for q in celery.conf.task_queues)
    assert "confirm_publish" not in celery.conf.broker_transport_options
    assert celery.conf.worker_consumer == "celery.worker.consumer:Consumer"


def test_the_worker_consumer_keeps_every_step_of_celerys_but_delayed_delivery():
    # If a Celery upgrade renames the step, this fails rather than the step silently coming back.
    assert DELAYED_DELIVERY in Consumer.Blueprint.default_steps
    assert IntakeConsumer.Blueprint.default_steps == [
        step for step in Consumer.Blueprint.default_steps if step != DELAYED_DELIVERY]


def test_a_rabbitmq_that_never_confirms_holds_no_other_publish_for_ever(rabbit_proxy, test_environment):
    """Mail, replays and deletions wait for the confirm as events do: at most INGEST_PUBLISH_TIMEOUT a try."""
    from app import lifecycle

    flask_app = isolated_app({"REDIS_URL": test_environment["REDIS_URL"], "CELERY_BROKER_URL": rabbit_proxy.url,
                              "INGEST_PUBLISH_TIMEOUT": 1.0})
    outcome = {}

    def publish():
        with flask_app.app_context():
            lifecycle.continue_app_deletion("no-such-app")  # connects and declares while the broker answers
            rabbit_proxy.freeze()
            started = time.monotonic()
            try:
                lifecycle.continue_app_deletion("no-such-app")
            except Exception as error:
                outcome["error"] = error
            outcome["took"] = time.monotonic() - started

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the publish waited for a confirm that never came"
    assert "error" in outcome and outcome["took"] < 5  # a try and kombu's one retry (task_publish_retry_policy)


def test_queue_depth_on_a_failover_list_comes_from_the_first_node_that_answers(rabbit):
    from prometheus_client import CollectorRegistry, generate_latest

    from app.metrics import QueueDepthCollector
    from app.task_messages import AmqpTaskMessages

    AmqpTaskMessages(isolated_app({"CELERY_BROKER_URL": rabbit.url}).extensions["celery"], timeout=5).publish(
        "default", "g-1", ["g-1"], {})
    down = f"amqp://guest:guest@127.0.0.1:{free_port()}/{VHOST}"
    registry = CollectorRegistry()
    registry.register(QueueDepthCollector({"CELERY_BROKER_URL": f"{down};{rabbit.url}", "BROKER_FOLDER": None}))
    text = generate_latest(registry).decode()
    assert "intake_broker_up 1.0" in text and 'intake_queue_depth{queue="default"} 1.0' in text
