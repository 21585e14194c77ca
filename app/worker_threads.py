"""Jobs each Celery worker runs itself, every few seconds, in a thread of its main process (a bootstep).

Recovery (app/redelivery.py) and the rollup fold (app/rollup_timer.py) must wait neither for
beat, which may not be running, nor behind a queue's backlog: every worker runs them. A
thread, not the worker's event loop (its timer): a job waits on Redis, the broker or
PostgreSQL, which must not hold up the consuming of messages. Pool children forked later
while it runs do not use what it holds: redis-py resets its pools on a new pid, logging
re-inits its locks.
"""
import logging
import threading

from celery import bootsteps

log = logging.getLogger(__name__)


class Periodic(threading.Thread):
    """Runs `job()` every `interval` seconds until stopped; an error is logged and the next turn tries again."""

    def __init__(self, label: str, interval: float, job):
        super().__init__(name=f"intake-{label.replace(' ', '-')}", daemon=True)
        self.label, self.interval, self.job = label, interval, job
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.wait(self.interval):
            try:
                self.job()
            except Exception as error:
                log.warning("%s failed: %s", self.label, error)

    def stop(self):
        self.stopping.set()


def add(celery, label: str, interval: float, job, wanted=lambda worker: True) -> None:
    """Run `job()` every `interval` s in each worker of `celery` for which `wanted(worker)` holds."""

    class PeriodicStep(bootsteps.StartStopStep):
        name = f"intake.{label.replace(' ', '_')}"  # steps are told apart by name
        requires = {"celery.worker.components:Pool"}

        def __init__(self, worker, **kwargs):
            super().__init__(worker, **kwargs)
            self.thread = None

        def start(self, worker):
            if not wanted(worker):
                return
            self.thread = Periodic(label, interval, job)
            self.thread.start()
            log.info("%s every %g s in this worker", label, interval)

        def stop(self, worker):
            if self.thread is not None:
                self.thread.stop()

    celery.steps["worker"].add(PeriodicStep)
