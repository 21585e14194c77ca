"""Account mail and alerts over SMTP, sent by the `emails` queue."""
import logging
import smtplib
import ssl
from email.message import EmailMessage

from flask import current_app

log = logging.getLogger(__name__)


def build_message(to: str, subject: str, text: str, html: str | None = None) -> EmailMessage:
    message = EmailMessage()
    message["From"] = current_app.config["MAIL_FROM"]
    message["To"] = to
    message["Subject"] = subject
    message.set_content(text)
    if html:
        message.add_alternative(html, subtype="html")
    return message


def send_message(message: EmailMessage) -> None:
    """Send over SMTP; with no MAIL_SERVER, write it to the log (the body only in development)."""
    config = current_app.config
    if not config["MAIL_SERVER"]:
        if config["APP_ENV"] == "production":
            log.warning("MAIL_SERVER is not set: mail %r was not sent", message["Subject"])
        else:
            log.info("MAIL_SERVER is not set; the mail follows:\n%s", message.as_string())
        return
    with smtplib.SMTP(config["MAIL_SERVER"], config["MAIL_PORT"], timeout=config["MAIL_TIMEOUT"]) as smtp:
        if config["MAIL_USE_TLS"]:
            # Verify the server's certificate and name: without a context STARTTLS encrypts
            # but accepts any certificate, so anyone on the path could read the codes.
            smtp.starttls(context=ssl.create_default_context())
        if config["MAIL_USERNAME"]:
            smtp.login(config["MAIL_USERNAME"], config["MAIL_PASSWORD"] or "")
        smtp.send_message(message)
