"""Account mail and alerts over SMTP, sent by the `emails` queue."""
import logging
import smtplib
import ssl
from email.message import EmailMessage

from flask import current_app

log = logging.getLogger(__name__)


class MailFailed(Exception):
    """SMTP did not take a mail; the message names the error's kind and SMTP code, never the server's text."""


class MailRefused(MailFailed):
    """The server refused the mail for good (a 5xx reply): sending it again would fail again."""


def _retold(error: smtplib.SMTPException) -> MailFailed:
    # The server's text and SMTPRecipientsRefused's own quote the recipient's address, and
    # Celery logs the exception of every retry and failure: keep only the codes.
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in error.recipients.values()]
    else:
        codes = [getattr(error, "smtp_code", None)]
    codes = [code for code in codes if isinstance(code, int) and code > 0]
    what = type(error).__name__ + (f": SMTP reply {codes[0]}" if codes else "")
    return MailRefused(what) if codes and all(500 <= code < 600 for code in codes) else MailFailed(what)


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
    """Send over SMTP; with no MAIL_SERVER, write it to the log (the body only in development).

    An SMTP error is raised as MailRefused (permanent) or MailFailed (worth a retry), without the address.
    """
    config = current_app.config
    if not config["MAIL_SERVER"]:
        if config["APP_ENV"] == "production":
            log.warning("MAIL_SERVER is not set: mail %r was not sent", message["Subject"])
        else:
            log.info("MAIL_SERVER is not set; the mail follows:\n%s", message.as_string())
        return
    try:
        with smtplib.SMTP(config["MAIL_SERVER"], config["MAIL_PORT"], timeout=config["MAIL_TIMEOUT"]) as smtp:
            if config["MAIL_USE_TLS"]:
                # Verify the server's certificate and name: without a context STARTTLS encrypts
                # but accepts any certificate, so anyone on the path could read the codes.
                smtp.starttls(context=ssl.create_default_context())
            if config["MAIL_USERNAME"]:
                smtp.login(config["MAIL_USERNAME"], config["MAIL_PASSWORD"] or "")
            smtp.send_message(message)
            return
    except smtplib.SMTPException as error:
        failure = _retold(error)
    # Raised outside the handler so that the original (and its text) is not chained to it.
    raise failure
