"""Celery tasks: thin wrappers that take ids or plain JSON and call the domain modules."""
import logging

from celery import shared_task
from flask import current_app
from sqlalchemy.exc import InterfaceError, OperationalError

from app import events, lifecycle, mail, redelivery, retention, rollups

log = logging.getLogger(__name__)


@shared_task(name="intake.persist_events")
def persist_events(group_id: str) -> str:
    """Store a group of single events accepted by the API (queue `default`)."""
    return events.persist_pending("default", group_id)


@shared_task(name="intake.persist_batch")
def persist_batch(group_id: str) -> str:
    """Store the events of one batch request (queue `batch_processing`)."""
    return events.persist_pending("batch_processing", group_id)


@shared_task(name="intake.redeliver_pending")
def redeliver_pending() -> int:
    """Publish again every pending group whose message is lost or whose retry is due (the workers do it on their own)."""
    return redelivery.sweep_app(current_app._get_current_object())


@shared_task(
    name="intake.send_email",
    autoretry_for=(mail.MailFailed, OSError),
    retry_backoff=5,
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=8,
)
def send_email(to: str, subject: str, text: str, html: str | None = None) -> str | None:
    """Send one mail (queue `emails`); a permanent refusal is given up at once ("failed")."""
    try:
        mail.send_message(mail.build_message(to, subject, text, html))
    except mail.MailRefused as refusal:
        log.warning("mail %r refused for good, not retried: %s", subject, refusal)
        return "failed"
    return None


# Database outages are waited out (the failed_events rows and the deletion mark are the
# durable record of the work); the retries only save waiting for the next request or sweep.
DATABASE_AWAY = (OperationalError, InterfaceError)


@shared_task(name=lifecycle.REPLAY_TASK, autoretry_for=DATABASE_AWAY, retry_backoff=5, retry_backoff_max=600,
             retry_jitter=True, max_retries=8)
def replay_failed_events(app_id: str, ids: list[str] | None = None, after_id: str = "") -> dict:
    """Replay an app's failed events through the normal persistence path (queue `batch_processing`)."""
    result = lifecycle.replay(app_id, ids, after_id)
    if result["after_id"]:
        lifecycle.continue_replay(app_id, ids, result["after_id"])
    return result


@shared_task(name=lifecycle.DELETE_TASK, autoretry_for=DATABASE_AWAY, retry_backoff=5, retry_backoff_max=600,
             retry_jitter=True, max_retries=8)
def delete_app_data(app_id: str) -> dict:
    """Remove a deleted app's data in bounded chunks (queue `batch_processing`)."""
    result = lifecycle.delete_app_data(app_id)
    if result["more"]:
        lifecycle.continue_app_deletion(app_id)
    return result


@shared_task(name="intake.resume_app_deletions")
def resume_app_deletions() -> int:
    """Queue the deletion of every app still marked deleted (beat; resumes interrupted deletions)."""
    return lifecycle.resume_app_deletions()


@shared_task(name="intake.refresh_rollups")
def refresh_rollups() -> dict:
    """Fold the stored events' deltas into the rollups (queue `batch_processing`)."""
    return rollups.refresh()


@shared_task(name="intake.ensure_partitions")
def ensure_partitions() -> dict:
    """Make the events table's weekly partitions ahead of time (queue `batch_processing`)."""
    return retention.ensure_partitions()


@shared_task(name="intake.purge_expired")
def purge_expired() -> dict:
    """Remove events past their app's retention (queue `batch_processing`)."""
    return retention.purge()
