"""Celery tasks: thin wrappers that take ids or plain JSON and call the domain modules."""
import smtplib

from celery import shared_task
from flask import current_app

from app import events, mail, redelivery


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
    autoretry_for=(smtplib.SMTPException, OSError),
    retry_backoff=5,
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=8,
)
def send_email(to: str, subject: str, text: str, html: str | None = None) -> None:
    """Send one mail (queue `emails`)."""
    mail.send_message(mail.build_message(to, subject, text, html))
