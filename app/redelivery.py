"""Redelivery: every worker publishes again the pending groups whose message is lost or whose retry is due.

The sweep runs in a thread of each worker's main process (app/worker_threads.py), on every
queue's worker, with or without beat: recovery must not wait for a process that may not
be running. The pending store's atomic claim makes the workers' sweeps safe side by side;
what is lost and when is decided there (app/pending.py). The broker is asked one thing,
through kombu so that any broker answers: is the queue empty.
"""
import logging

from app import worker_threads
from app.task_messages import TASK_FOR_QUEUE

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 2.0  # seconds between sweeps in each worker


def sweep(celery, pending, send) -> int:
    """Claim and publish again what is lost or due on every persistence queue; return how many."""
    count = 0
    for queue in TASK_FOR_QUEUE:
        for group_id in pending.claim_due(queue, queue_empty=queue_is_empty(celery, queue)):
            send(queue, group_id)
            count += 1
    return count


def queue_is_empty(celery, queue: str) -> bool:
    """No message waits in the broker's queue (False when the broker cannot say).

    Declared as the workers declare it (a passive declare fails on a queue no worker has
    declared yet, and on AMQP closes the channel): the answer counts its messages on any broker.
    """
    try:
        with celery.pool.acquire(block=True, timeout=2) as connection:
            declared = celery.amqp.queues[queue].bind(connection.default_channel).queue_declare()
            return declared.message_count == 0
    except Exception as error:
        log.warning("could not read the depth of queue %s: %s", queue, error)
        return False


def sweep_app(app) -> int:
    """One sweep with the app's Celery, pending store and publisher."""
    with app.app_context():
        publisher = app.extensions["intake.publisher"]
        return sweep(app.extensions["celery"], app.extensions["intake.pending"], publisher.send)


def sweep_and_log(app) -> None:
    """One sweep, and a log line when it published anything."""
    count = sweep_app(app)
    if count:
        log.info("redelivery sweep published %d pending group(s) again", count)


def init_app(app, celery) -> None:
    """Sweep every SWEEP_INTERVAL seconds in every worker of this Celery app (started and stopped with it)."""
    worker_threads.add(celery, "redelivery sweep", SWEEP_INTERVAL, lambda: sweep_and_log(app))
