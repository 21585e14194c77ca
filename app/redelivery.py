"""Redelivery: every worker publishes again the pending groups whose message is lost or whose retry is due.

The sweep runs in a thread of each worker's main process (a Celery bootstep), on every
queue's worker, with or without beat: recovery must not wait for a process that may not
be running. The pending store's atomic claim makes the workers' sweeps safe side by side;
what is lost and when is decided there (app/pending.py). The broker is asked one thing,
through kombu so that any broker answers: is the queue empty.
"""
import logging
import threading

from celery import bootsteps

from app.publisher import TASK_FOR_QUEUE

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


class Sweeper(threading.Thread):
    """Sweeps every SWEEP_INTERVAL seconds until stopped; an error is logged and the next sweep tries again."""

    # A thread, not the worker's event loop (its timer): a sweep waits on Redis and the broker,
    # which must not hold up the consuming of messages. Pool children forked later while it runs
    # do not use what it holds: redis-py resets its pools on a new pid, logging re-inits its locks.

    def __init__(self, app, interval: float = SWEEP_INTERVAL):
        super().__init__(name="intake-redelivery", daemon=True)
        self.app = app
        self.interval = interval
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.wait(self.interval):
            try:
                count = sweep_app(self.app)
            except Exception as error:
                log.warning("redelivery sweep failed: %s", error)
                continue
            if count:
                log.info("redelivery sweep published %d pending group(s) again", count)

    def stop(self):
        self.stopping.set()


def init_app(app, celery) -> None:
    """Run a Sweeper in every worker of this Celery app (started with the worker, stopped with it)."""

    class RedeliverySweep(bootsteps.StartStopStep):
        requires = {"celery.worker.components:Pool"}

        def __init__(self, worker, **kwargs):
            super().__init__(worker, **kwargs)
            self.sweeper = None

        def start(self, worker):
            self.sweeper = Sweeper(app)
            self.sweeper.start()

        def stop(self, worker):
            if self.sweeper is not None:
                self.sweeper.stop()

    celery.steps["worker"].add(RedeliverySweep)
