"""The Celery worker's consumer for RabbitMQ: Celery's own, without its native delayed delivery.

Celery adds a DelayedDelivery step whenever a queue is a quorum queue. At every connection it
declares 28 `celery_delayed_*` queues and tries each URL of a failover list, three times for a
node that is down (1 + 3 + 5 s), before the worker consumes again: 17-20 s without a task
after a cluster lost a node (bench/rabbitmq_cluster.py). The step serves countdown and ETA
messages only, and Intake sends none (persistence retries are due times in the pending
store, app/pending.py). Blueprint.default_steps is Celery's own list, pinned with celery in
requirements.txt; tests/test_brokers.py checks that the rest of it is kept as it is.
"""
from celery.worker.consumer import Consumer

DELAYED_DELIVERY = "celery.worker.consumer.delayed_delivery:DelayedDelivery"


class IntakeConsumer(Consumer):
    """Consumer whose blueprint leaves out DelayedDelivery (celery_config.AMQP_SETTINGS names it)."""

    class Blueprint(Consumer.Blueprint):
        default_steps = [step for step in Consumer.Blueprint.default_steps if step != DELAYED_DELIVERY]
