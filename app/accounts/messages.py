"""Account mail (verification and reset codes), rendered from templates/mail/ and sent by the `emails` queue."""
import logging

from flask import render_template
from kombu.exceptions import OperationalError

from app import publisher
from app.accounts import codes
from app.errors import ApiError

# The task app/tasks.py names so, routed to the `emails` queue (celery_config.task_routes).
SEND_EMAIL = "intake.send_email"

log = logging.getLogger(__name__)

SUBJECTS = {
    codes.VERIFY_EMAIL: "Your Intake verification code",
    codes.RESET_PASSWORD: "Your Intake password reset code",
}


def queue_code_mail(to: str, purpose: str, code: str) -> None:
    """Queue the mail carrying `code` (plain text and HTML); 503 when the queue cannot take it."""
    context = {"code": code, "minutes": int(codes.CODE_LIFETIME.total_seconds() // 60)}
    text = render_template(f"mail/{purpose}.txt", **context)
    html = render_template(f"mail/{purpose}.html", **context)
    try:
        # This Flask app's own Celery app, by task name (routed to `emails`): the task proxy would use
        # whichever Celery app is current, and would finalize it. No publish retries inside a
        # request: the client is told at once and may retry.
        publisher.send_task(SEND_EMAIL, [to, SUBJECTS[purpose], text, html], retry=False)
    except (OperationalError, OSError) as error:
        log.warning("account mail not queued: %s", type(error).__name__)  # never the address or the code
        raise ApiError(503, "queue_unavailable", "The mail queue is unavailable; nothing was changed. Retry shortly.",
                       headers={"Retry-After": "2"}) from None
