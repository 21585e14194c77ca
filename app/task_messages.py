"""The persistence tasks' Celery messages, built by Celery's and kombu's own code and sent the cheapest way each broker allows.

Celery's `send_task` does a great deal per message that the publisher does not need
(routing look-ups, signals, a pooled producer and its retry wrapper): under load it cost the
API about 1.5 ms of CPU per message on RabbitMQ (README "Throughput", round 3). Both classes
here build exactly the message `send_task` would (the tests compare them) and send it:

- `RedisTaskMessages` hands back the Redis commands (an LPUSH) so that the publisher runs them
  in the same MULTI/EXEC as the group's pending record;
- `AmqpTaskMessages` publishes on a RabbitMQ channel of the publishing thread's own and waits
  for the broker's confirm (doing the caller's other write, the pending record, meanwhile).
"""
import os
import threading
import time

from amqp import spec
from amqp.exceptions import MessageNacked
from kombu import serialization

TASK_FOR_QUEUE = {"default": "intake.persist_events", "batch_processing": "intake.persist_batch"}


def _message(celery_app, channel, queue_name: str, task_id: str, args: list, headers: dict):
    """The task message as `send_task` builds it, prepared for `channel`'s transport."""
    task_headers, properties, body, _ = celery_app.amqp.as_task_v2(
        task_id, TASK_FOR_QUEUE[queue_name], args=args, reply_to=celery_app.thread_oid, ignore_result=None
    )
    task_headers.update(headers)
    content_type, encoding, data = serialization.dumps(body, serializer=celery_app.conf.task_serializer)
    properties["delivery_mode"] = 2  # persistent, as Celery publishes by default
    # priority 0: what kombu's Producer.publish passes when the task names none.
    return channel.prepare_message(data, 0, content_type, encoding, task_headers, properties)


class RedisTaskMessages:
    """Task messages as kombu's Redis transport pushes them, for the pending record's transaction.

    One round trip instead of two, and none of kombu's per-publish set-up (a Redis client per
    message): publishing a 4-event group costs about 0.25 ms of CPU instead of 0.65.
    """

    def __init__(self, celery_app):
        self.celery = celery_app
        self._channel = None
        self._pid = None
        self._lock = threading.Lock()

    def _get_channel(self):
        # Opened on first use in each process (one PING): gunicorn forks after the factory.
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._channel = self.celery.connection_for_write().default_channel
                    self._pid = os.getpid()
        return self._channel

    def redis_commands(self, queue_name: str, task_id: str, args: list, headers: dict) -> list[tuple]:
        """The Redis commands (an LPUSH) that `send_task` would run for this task message."""
        channel = self._get_channel()
        message = _message(self.celery, channel, queue_name, task_id, args, headers)
        collected = _CommandCollector()
        # kombu's own routing and encoding, handing back the commands instead of running them
        # (the hook its PublishBatch uses).
        channel.basic_publish(message, exchange="", routing_key=queue_name, _publish_batch=collected)
        return collected.commands


class _CommandCollector:
    def __init__(self):
        self.commands = []

    def add(self, name, *args):
        self.commands.append((name, args))


class AmqpTaskMessages:
    """Task messages published to RabbitMQ on a connection of the calling thread's own, each confirmed.

    Each publishing thread owns its connection (publisher confirms belong to a channel, and a
    channel to one thread). Any error drops the connection: a confirm that timed out could
    otherwise arrive later and be taken for the next message's. A stale connection (the broker
    restarted since the last publish) is retried once on a new one while time is left.
    """

    def __init__(self, celery_app, timeout: float):
        self.celery = celery_app
        self.timeout = timeout
        self._local = threading.local()  # a forked child's threads start without one

    def publish(self, queue_name: str, task_id: str, args: list, headers: dict, alongside=None) -> None:
        """Publish the task message and return once the broker has confirmed it (else raise).

        `alongside`, if given, is called once, as soon as the message is sent, while the broker
        works: the publisher reads the pending record's answer there. What it raises is raised
        here as it is, never retried.
        """
        started, still_to_call = time.monotonic(), alongside

        def once():
            nonlocal still_to_call
            if still_to_call is not None:
                call, still_to_call = still_to_call, None
                try:
                    call()
                except Exception as error:
                    raise _AlongsideFailed() from error

        for attempt in (1, 2):
            try:
                self._publish(queue_name, task_id, args, headers, self.timeout - (time.monotonic() - started), once)
                return
            except _AlongsideFailed as failed:
                self._drop()  # the message's confirm is left unread
                raise failed.__cause__ from None
            except Exception:
                self._drop()
                # A stale connection (the broker restarted) is tried again on a new one while
                # time is left. A second copy, if the first did reach the broker, is stored once
                # (the pending record and the events' keys make the worker idempotent).
                if attempt == 2 or self.timeout - (time.monotonic() - started) < self.timeout / 2:
                    raise

    def _publish(self, queue_name, task_id, args, headers, timeout, alongside):
        channel = self._channel()
        message = _message(self.celery, channel, queue_name, task_id, args, headers)
        # The anonymous exchange and the queue's name, as send_task routes a direct queue. The
        # channel is in confirm mode, but basic_publish does not wait (see _channel): the wait
        # below is the one py-amqp's basic_publish_confirm makes, moved after `alongside`.
        channel.basic_publish(message, exchange="", routing_key=queue_name)
        alongside()
        channel.wait([spec.Basic.Ack, spec.Basic.Nack], callback=_raise_if_nacked, timeout=timeout)

    def _channel(self):
        local = self._local
        if getattr(local, "channel", None) is None:
            # confirm_publish off for this connection: py-amqp would then wait inside
            # basic_publish. The channel is put in confirm mode below and _publish waits.
            connection = self.celery.connection_for_write(connect_timeout=self.timeout,
                                                          transport_options={"confirm_publish": False})
            local.connection = connection
            # Each node of a failover list once, and no pause: kombu's default retries for ever,
            # which would hold the thread (and every request behind it) while the broker is down.
            nodes = len(self.celery.conf.broker_url.split(";"))
            connection.ensure_connection(max_retries=nodes, interval_start=0, interval_step=0, timeout=self.timeout)
            channel = connection.default_channel
            channel.confirm_select()
            # Declared as the workers declare them (quorum queues), as send_task would: a
            # message to a queue nobody has declared yet would be confirmed and dropped.
            for name in TASK_FOR_QUEUE:
                self.celery.amqp.queues[name].bind(channel).declare()
            local.channel = channel
        return local.channel

    def _drop(self):
        local = self._local
        connection = getattr(local, "connection", None)
        local.connection = local.channel = None
        if connection is not None:
            try:
                connection.collect()  # closes the socket without a handshake that could block
            except Exception:
                pass


class _AlongsideFailed(Exception):
    """The caller's own write failed, not the broker: raised as it is, never retried here."""


def _raise_if_nacked(method, *args):
    if method == spec.Basic.Nack:
        raise MessageNacked()
