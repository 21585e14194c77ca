"""Celery settings: queues, routes, delivery guarantees and the beat schedule.

The broker URL comes from the Flask config (REDIS_URL / CELERY_BROKER_URL); on RabbitMQ
app/extensions.py adds AMQP_SETTINGS (below).
"""
from celery.schedules import crontab
from kombu import Exchange, Queue

QUEUES = ("default", "emails", "batch_processing")

task_queues = tuple(Queue(name, Exchange(name), routing_key=name) for name in QUEUES)
task_default_queue = "default"
task_routes = {
    "intake.persist_events": {"queue": "default"},
    "intake.persist_batch": {"queue": "batch_processing"},
    "intake.redeliver_pending": {"queue": "batch_processing"},
    "intake.send_email": {"queue": "emails"},
    "intake.replay_failed_events": {"queue": "batch_processing"},
    "intake.delete_app_data": {"queue": "batch_processing"},
    "intake.resume_app_deletions": {"queue": "batch_processing"},
    # Not on beat: batch_processing's workers fold on their own (app/rollup_timer.py); the
    # task is there for an operator who wants a fold now.
    "intake.refresh_rollups": {"queue": "batch_processing"},
    "intake.ensure_partitions": {"queue": "batch_processing"},
    "intake.purge_expired": {"queue": "batch_processing"},
}

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
task_ignore_result = True
timezone = "UTC"
enable_utc = True

# A message is acknowledged only after its task has run, and goes back to the queue
# when the process running it dies. The pending store (app/pending.py) covers what
# the Redis transport can still lose on SIGKILL; see README "Delivery".
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 4
worker_cancel_long_running_tasks_on_connection_loss = True
task_time_limit = 240
task_soft_time_limit = 200

broker_connection_timeout = 1.0
broker_connection_retry_on_startup = True
broker_pool_limit = 16
broker_transport_options = {
    # Longer than the longest task (task_time_limit), short enough that a dead
    # worker's unacknowledged messages come back within minutes.
    "visibility_timeout": 300,
    "unacked_restore_interval": 5,
    "socket_timeout": 2.0,
    "socket_connect_timeout": 1.0,
    "health_check_interval": 25,
}
# A dead broker must turn into a 503 quickly, not a hanging request.
task_publish_retry = True
task_publish_retry_policy = {
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.2,
}

# RabbitMQ (CELERY_BROKER_URL amqp://…): what changes there (README "Brokers").
# - Quorum queues: durable, replicated to a majority of a cluster's nodes before the publish
#   is confirmed, and a consumer that dies hands its unacknowledged messages back when its
#   connection closes. Celery sees the queue type and uses per-consumer prefetch (quorum
#   queues refuse a global one). Nothing here uses countdown or ETA, which quorum queues
#   would need Celery's delayed-delivery exchanges for: persistence retries are due times
#   in the pending store (app/pending.py), so that step is left out of the worker.
# - Publisher confirms: a publish returns only once the broker has the message (for a quorum
#   queue: a majority has written it), so the 202 comes after the confirm. The publisher waits
#   for it at most INGEST_PUBLISH_TIMEOUT (app/publisher.py), then answers 503.
AMQP_SETTINGS = {
    "task_queues": tuple(
        Queue(name, Exchange(name), routing_key=name, durable=True, queue_arguments={"x-queue-type": "quorum"})
        for name in QUEUES
    ),
    "broker_transport_options": {"confirm_publish": True},
    # Without Celery's native delayed delivery, which stalled workers for 17-20 s after a node
    # of a cluster was lost and serves ETA messages only (app/amqp_consumer.py).
    "worker_consumer": "app.amqp_consumer:IntakeConsumer",
}


def is_amqp(url: str) -> bool:
    """The broker URL names RabbitMQ (kombu's amqp, pyamqp and amqps transports)."""
    return url.split("://", 1)[0] in ("amqp", "pyamqp", "amqps")


worker_send_task_events = False
worker_hijack_root_logger = False

# Redelivery of pending groups runs in every worker (app/redelivery.py), and the rollup fold
# every 30 s in every worker of batch_processing (app/rollup_timer.py), not here: neither may
# depend on beat, nor wait behind a queue's backlog. Beat only runs schedules.
beat_schedule = {
    # The three entries on batch_processing may expire while a batch backlog lasts, and that is
    # harmless: the deletions the resume would queue wait behind that backlog anyway (and each
    # was queued once already when its app was deleted); partitions are made WEEKS_AHEAD weeks
    # ahead; a purge skipped today is done by tomorrow's, which removes everything expired.
    # App deletions a killed worker left unfinished, and the settle sweeps (app/lifecycle.py).
    "resume-app-deletions": {
        "task": "intake.resume_app_deletions",
        "schedule": 60.0,
        "options": {"expires": 55},
    },
    # Idempotent (CREATE … IF NOT EXISTS), WEEKS_AHEAD weeks of margin.
    "ensure-partitions": {
        "task": "intake.ensure_partitions",
        "schedule": 3600.0,
        "options": {"expires": 1800},
    },
    # Daily; a second purge waits on the first's advisory lock, then finds nothing left.
    "purge-expired": {
        "task": "intake.purge_expired",
        "schedule": crontab(hour=3, minute=17),
        "options": {"expires": 3 * 3600},
    },
}
