"""Rollup timer: every worker that consumes batch_processing folds the rollups every 30 s.

The fold runs in a thread of each such worker's main process (a Celery bootstep), as the
redelivery sweep does (app/redelivery.py), on the queue whose workers build rollups (API.md
"Queues"); a worker of `default` or `emails` alone runs none. The timers of several workers
do not wait for each other: one takes the fold's lock and folds, the others find it taken
and skip that turn (app/rollups.py, refresh(wait=False)).
"""
import logging
import threading

from celery import bootsteps

from app import rollups

log = logging.getLogger(__name__)

QUEUE = "batch_processing"  # the workers of this queue build the rollups
REFRESH_INTERVAL = 30.0  # seconds between folds in each of them (rollups current within 2 minutes)


def consumes(worker, queue: str = QUEUE) -> bool:
    """The worker consumes `queue` (what -Q selected, less -X; every queue without -Q)."""
    return queue in worker.app.amqp.queues.consume_from


def refresh_app(app) -> dict:
    """One fold with the app's database; none if another run holds the fold lock."""
    with app.app_context():
        return rollups.refresh(wait=False)


class Folder(threading.Thread):
    """Folds the rollups every `interval` seconds until stopped; an error is logged and the next fold tries again."""

    # Why a thread in the worker and not a beat task: a task on batch_processing waits behind
    # the batch backlog (beat's refresh expired there after 25 s and the rollups stopped for
    # as long as a large import lasted), and beat may not be running at all. A thread, not
    # the worker's event loop: a fold waits on PostgreSQL, which must not hold up consuming.

    def __init__(self, app, interval: float = REFRESH_INTERVAL):
        super().__init__(name="intake-rollups", daemon=True)
        self.app = app
        self.interval = interval
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.wait(self.interval):
            try:
                result = refresh_app(self.app)
            except Exception as error:
                log.warning("rollup fold failed: %s", error)
                continue
            if result["events_rolled_up"]:
                log.info("rollup fold: %d event(s) rolled up", result["events_rolled_up"])

    def stop(self):
        self.stopping.set()


def init_app(app, celery) -> None:
    """Run a Folder in every worker of this Celery app that consumes batch_processing."""

    class RollupTimer(bootsteps.StartStopStep):
        requires = {"celery.worker.components:Pool"}

        def __init__(self, worker, **kwargs):
            super().__init__(worker, **kwargs)
            self.folder = None

        def start(self, worker):
            if not consumes(worker):
                return
            self.folder = Folder(app)
            self.folder.start()
            log.info("rollup fold every %g s in this worker (it consumes %s)", self.folder.interval, QUEUE)

        def stop(self, worker):
            if self.folder is not None:
                self.folder.stop()

    celery.steps["worker"].add(RollupTimer)
