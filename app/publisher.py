"""Hands accepted events to the broker: many events to one message.

Requests arriving at one API process within a short window (group commit) have their
events travel together in one message: single events to `default`, batch requests to
`batch_processing`. Either way the caller learns the outcome only after the broker has
accepted the message, so a 202 always means "durably queued" and a broker failure
reaches every waiting request.

The group's pending record and its message: on the pending store's Redis, one MULTI/EXEC;
on RabbitMQ, the record sent to Redis, then the message, both answers read (one wait, not
two); otherwise the record, then the message.
"""
import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from flask import current_app

from app import logs, metrics
from app.pending import RedisPendingStore
from app.task_messages import TASK_FOR_QUEUE, AmqpTaskMessages, RedisTaskMessages
from celery_config import is_amqp

log = logging.getLogger(__name__)


def send_task(name: str, args: list, **options):
    """Queue one other task (mail, replay, deletion) with this app's Celery, the broker's confirm awaited as for events."""
    # Without a confirm_timeout a RabbitMQ that never confirms would hold the caller for ever.
    return current_app.extensions["celery"].send_task(
        name, args=args, confirm_timeout=current_app.config["INGEST_PUBLISH_TIMEOUT"], **options
    )


class QueueUnavailable(Exception):
    """The broker (or the pending store beside it) did not take the events."""


class Publisher:
    def __init__(self, celery_app, pending, *, window_ms: float, max_events: int, timeout: float):
        self.celery = celery_app
        self.pending = pending
        # The record and its message go in one transaction when the pending store is the broker's
        # Redis. kombu applies a global key prefix in its client, not in the commands it hands
        # back, so with one set the message goes through send_task.
        same_redis = isinstance(pending, RedisPendingStore) and celery_app.conf.broker_url == pending.url
        prefixed = (celery_app.conf.broker_transport_options or {}).get("global_keyprefix")
        self.messages = RedisTaskMessages(celery_app) if same_redis and not prefixed else None
        # On RabbitMQ each publishing thread sends on a confirmed channel of its own.
        self.amqp_messages = AmqpTaskMessages(celery_app, timeout) if is_amqp(celery_app.conf.broker_url) else None
        self.window = window_ms / 1000
        self.max_events = max_events
        self.timeout = timeout
        self._waiting: dict[str, queue.SimpleQueue] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._thread_pid = None
        self._start_lock = threading.Lock()

    def publish(self, queue_name: str, events: list[dict], request_ids: list[str] | None = None) -> str:
        """Record the events as pending, publish one message for them, return its task id."""
        # The ids of the requests that sent the events (default: this one) go in the message
        # headers, so that the worker's log line names them.
        if request_ids is None:
            request_ids = [i for i in [logs.current_request_id()] if i]
        with metrics.PUBLISH_DURATION.labels(queue_name).time():
            return self._publish(queue_name, events, request_ids)

    def _publish(self, queue_name: str, events: list[dict], request_ids: list[str]) -> str:
        group_id = str(uuid.uuid4())
        if self.messages is not None:
            # The record and the message reach Redis together, or neither does.
            try:
                message = self.messages.redis_commands(queue_name, group_id, [group_id], _headers(request_ids))
                self.pending.put(queue_name, group_id, events, message=message)
            except Exception as error:
                raise QueueUnavailable("broker unavailable") from error
            return group_id
        if self.amqp_messages is not None and isinstance(self.pending, RedisPendingStore):
            return self._publish_amqp(queue_name, group_id, events, request_ids)
        try:
            self.pending.put(queue_name, group_id, events)
        except Exception as error:
            raise QueueUnavailable("pending store unavailable") from error
        try:
            self.send(queue_name, group_id, request_ids)
        except Exception as error:
            self._forget(queue_name, group_id)
            raise QueueUnavailable("broker unavailable") from error
        return group_id

    def _publish_amqp(self, queue_name: str, group_id: str, events: list[dict], request_ids: list[str]) -> str:
        # The record is sent first and its answer read while RabbitMQ confirms the message: one
        # wait instead of two. A worker that gets the message before Redis has run the record
        # waits for it (app/events.py).
        try:
            record = self.pending.begin_put(queue_name, group_id, events)
        except Exception as error:
            raise QueueUnavailable("pending store unavailable") from error
        try:
            self.amqp_messages.publish(queue_name, group_id, [group_id], _headers(request_ids), alongside=record.finish)
        except Exception as error:
            # Either write failed: the client is told 503. The tombstone makes a message that
            # did reach the broker a no-op, and drops a record that was written.
            with contextlib.suppress(Exception):
                record.finish()  # if the broker failed first, the record's answer is still unread
            self._forget(queue_name, group_id)
            failed = "pending store" if record.failed else "broker"
            raise QueueUnavailable(f"{failed} unavailable") from error
        return group_id

    def send(self, queue_name: str, group_id: str, request_ids: list[str] = ()) -> None:
        """Publish the message that makes a worker store a pending group."""
        # On RabbitMQ the publish waits for the broker's confirm (celery_config.AMQP_SETTINGS),
        # at most as long as a request waits for it.
        if self.amqp_messages is not None:
            self.amqp_messages.publish(queue_name, group_id, [group_id], _headers(request_ids))
            return
        self.celery.send_task(
            TASK_FOR_QUEUE[queue_name], args=[group_id], task_id=group_id, queue=queue_name,
            headers=_headers(request_ids) or None, confirm_timeout=self.timeout,
        )

    def _forget(self, queue_name, group_id):
        # The client is told 503 and will retry: drop the record so that neither the
        # worker nor the sweeper stores a second copy of events the client sends again.
        try:
            self.pending.done(queue_name, group_id)
        except Exception:
            log.warning("could not drop pending group %s after a failed publish", group_id)

    def submit(self, event: dict) -> Future:
        """Queue one event for the next group to `default`; the future yields its task id."""
        return self._enqueue("default", [event])

    def submit_batch(self, events: list[dict]) -> Future:
        """Queue a batch request's events for the next group to `batch_processing`."""
        return self._enqueue("batch_processing", events)

    def _enqueue(self, queue_name: str, events: list[dict]) -> Future:
        self._ensure_threads()
        future: Future = Future()
        self._waiting[queue_name].put((events, future, logs.current_request_id()))
        return future

    def wait(self, future: Future) -> str:
        """The task id once the broker has the message; QueueUnavailable if not within the timeout.

        A caller that gives up has told its client 503, so its events must not be stored:
        an event not yet published is skipped, and a group every caller gave up on is
        dropped from the pending store even if its message reaches the broker later.
        """
        try:
            return future.result(timeout=self.timeout)
        except FutureTimeout:
            if not future.cancel():
                future.abandoned = True
            raise QueueUnavailable("the broker did not answer in time") from None

    def _ensure_threads(self):
        # Started on first use in each process: gunicorn and Celery fork after the factory.
        if self._thread_pid != os.getpid():
            with self._start_lock:
                if self._thread_pid != os.getpid():
                    self._waiting = {name: queue.SimpleQueue() for name in TASK_FOR_QUEUE}
                    self._threads = {}
                    for name in TASK_FOR_QUEUE:
                        self._start_thread(name)
                    self._thread_pid = os.getpid()
        # Supervision: a publisher thread that died would leave its queue unanswered for ever
        # (503 on every request) while the process looks healthy. Start it again.
        for name, thread in self._threads.items():
            if not thread.is_alive():
                with self._start_lock:
                    if not self._threads[name].is_alive():
                        log.error("publisher thread for %s had died; starting it again", name)
                        self._start_thread(name)

    def _start_thread(self, name: str) -> None:
        thread = threading.Thread(target=self._run, args=(name,), name=f"intake-publisher-{name}", daemon=True)
        self._threads[name] = thread
        thread.start()

    def threads_alive(self) -> bool:
        """Every publisher thread this process started is running."""
        return all(thread.is_alive() for thread in self._threads.values())

    def _next_group(self, waiting: queue.SimpleQueue, carried):
        """The requests of the next window, at most max_events events (a larger request goes alone)."""
        group = [carried or waiting.get()]
        size = len(group[0][0])
        deadline = time.monotonic() + self.window
        while size < self.max_events:
            remaining = deadline - time.monotonic()
            try:
                item = waiting.get(timeout=remaining) if remaining > 0 else waiting.get_nowait()
            except queue.Empty:
                break
            if size + len(item[0]) > self.max_events:
                return group, item  # opens the next group
            group.append(item)
            size += len(item[0])
        return group, None

    def _run(self, queue_name: str):
        waiting, carried = self._waiting[queue_name], None
        while True:
            group = []
            try:
                group, carried = self._next_group(waiting, carried)
                group = [item for item in group if item[1].set_running_or_notify_cancel()]
                if group:
                    self._publish_for([f for _, f, _ in group], queue_name,
                                      [e for events, _, _ in group for e in events], [r for _, _, r in group if r])
            except Exception as error:
                # A bug here must fail the requests in hand, not the thread and every later request.
                log.exception("publisher thread for %s: unexpected error", queue_name)
                carried = None
                for _, future, _ in group:
                    if not future.done():
                        future.set_exception(QueueUnavailable(f"publisher error: {error}"))

    def _publish_for(self, futures: list[Future], queue_name: str, events: list[dict], request_ids: list[str]):
        try:
            task_id = self.publish(queue_name, events, request_ids)
        except Exception as error:
            for future in futures:
                future.set_exception(error)
            return
        if all(getattr(future, "abandoned", False) for future in futures):
            self._forget(queue_name, task_id)
        for future in futures:
            future.set_result(task_id)


def _headers(request_ids) -> dict:
    return {"request_ids": list(request_ids)} if request_ids else {}


def get_publisher() -> Publisher:
    return current_app.extensions["intake.publisher"]
