"""Rollup timer: every worker that consumes batch_processing folds the rollups every 30 s.

The fold runs in a thread of each such worker's main process (app/worker_threads.py), as the
redelivery sweep does, on the queue whose workers build rollups (API.md "Queues"); a worker
of `default` or `emails` alone runs none. Not a beat task: one on batch_processing waited
behind the batch backlog (beat's refresh expired there after 25 s and the rollups stopped
for as long as a large import lasted), and beat may not be running at all. The timers of
several workers do not wait for each other: one takes the fold's lock and folds, the others
find it taken and skip that turn (app/rollups.py, refresh(wait=False)).
"""
import logging

from app import rollups, worker_threads

log = logging.getLogger(__name__)

QUEUE = "batch_processing"  # the workers of this queue build the rollups
REFRESH_INTERVAL = 30.0  # seconds between folds in each of them (rollups current within 2 minutes)


def consumes(worker) -> bool:
    """The worker consumes QUEUE (what -Q selected, less -X; every queue without -Q)."""
    return QUEUE in worker.app.amqp.queues.consume_from


def fold_and_log(app) -> None:
    """One fold (none if another run holds the fold lock), and a log line when it rolled anything up."""
    with app.app_context():
        result = rollups.refresh(wait=False)
    if result["events_rolled_up"]:
        log.info("rollup fold: %d event(s) rolled up", result["events_rolled_up"])


def init_app(app, celery) -> None:
    """Fold every REFRESH_INTERVAL seconds in every worker of this Celery app that consumes batch_processing."""
    worker_threads.add(celery, "rollup fold", REFRESH_INTERVAL, lambda: fold_and_log(app), wanted=consumes)
