"""Mail leaves through the `emails` queue's worker to a real SMTP server (aiosmtpd)."""
import email
import logging
import threading

import pytest
from aiosmtpd.controller import Controller

from tests.conftest import free_port, wait_until
from tests.private_redis import isolated_app


class Inbox:
    """An aiosmtpd handler that keeps every message it receives."""

    def __init__(self):
        self.messages = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def smtp_server():
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller, inbox
    controller.stop()


def test_send_email_task_delivers_over_smtp(stack, app, smtp_server):
    controller, inbox = smtp_server
    stack.worker(queues="emails", MAIL_SERVER="127.0.0.1", MAIL_PORT=str(controller.port), MAIL_USE_TLS="false",
                 MAIL_FROM="Intake <intake@example.com>")
    celery = app.extensions["celery"]
    celery.send_task("intake.send_email", args=["ada@example.com", "Your code", "Code: 123456",
                                                "<p>Code: <b>123456</b></p>"])
    wait_until(lambda: inbox.messages, message="a delivered mail")
    (message,) = inbox.messages
    assert message["To"] == "ada@example.com" and message["Subject"] == "Your code"
    assert message["From"] == "Intake <intake@example.com>"
    parts = {part.get_content_type(): part.get_payload(decode=True).decode() for part in message.walk()
             if not part.is_multipart()}
    assert parts["text/plain"].strip() == "Code: 123456"
    assert "<b>123456</b>" in parts["text/html"]


def test_send_email_retries_until_the_server_answers(stack, app):
    port = free_port()
    worker = stack.worker(queues="emails", MAIL_SERVER="127.0.0.1", MAIL_PORT=str(port), MAIL_USE_TLS="false")
    app.extensions["celery"].send_task("intake.send_email", args=["ada@example.com", "Later", "body"])
    # Connection refused → retried with backoff: the task's own log line says so, twice.
    worker.wait_for_output('"outcome":"retry","retries":1', timeout=30)


def test_without_mail_server_the_mail_goes_to_the_log(stack, app):
    worker = stack.worker(queues="emails", MAIL_SERVER="")
    app.extensions["celery"].send_task("intake.send_email", args=["ada@example.com", "Dev mail", "Code: 654321"])
    worker.wait_for_output("Code: 654321", timeout=30)


@pytest.fixture
def starttls_server(tmp_path):
    """An SMTP server that requires STARTTLS, with a self-signed certificate for 127.0.0.1."""
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port(), tls_context=context, require_starttls=True)
    controller.start()
    yield controller, inbox, cert
    controller.stop()


def test_starttls_verifies_the_servers_certificate(starttls_server, monkeypatch):
    import ssl

    from app import create_app, mail

    controller, inbox, cert = starttls_server
    app = create_app({"MAIL_SERVER": "127.0.0.1", "MAIL_PORT": controller.port, "MAIL_USE_TLS": True})
    with app.app_context():
        with pytest.raises(ssl.SSLCertVerificationError):
            mail.send_message(mail.build_message("ada@example.com", "Your code", "Code: 123456"))
        assert inbox.messages == []
        # The same server, its certificate trusted: the mail goes through encrypted.
        default_context = ssl.create_default_context
        monkeypatch.setattr(ssl, "create_default_context", lambda: default_context(cafile=str(cert)))
        mail.send_message(mail.build_message("ada@example.com", "Your code", "Code: 123456"))
    assert [m["Subject"] for m in inbox.messages] == ["Your code"]


# --- refusals: permanent ones are not retried, and no log line names the recipient ----------

ADDRESS = "ada@example.com"


class Refusing:
    """An aiosmtpd handler that refuses at `stage` (RCPT or DATA) with `code`, quoting the address as servers do."""

    def __init__(self, stage, code):
        self.stage, self.code, self.attempts = stage, code, 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.attempts += 1
        if self.stage == "RCPT":
            return f"{self.code} {self.code // 100}.1.1 <{address}>: Recipient address rejected"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        return f"{self.code} {self.code // 100}.7.1 message to <{envelope.rcpt_tos[0]}> refused"


@pytest.fixture
def refusing_server(request):
    handler = Refusing(*request.param)
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller, handler
    controller.stop()


def our_log(caplog) -> str:
    """Every line logged in this process but the SMTP server's own conversation (aiosmtpd's `mail.log`)."""
    return "\n".join(record.getMessage() + (caplog.handler.formatter.formatException(record.exc_info)
                                            if record.exc_info else "")
                     for record in caplog.records if not record.name.startswith("mail.log"))


def send_eagerly(controller):
    """Run the send_email task in this process (eager: its retries follow at once); its result."""
    from app import tasks

    app = isolated_app({"MAIL_SERVER": "127.0.0.1", "MAIL_PORT": controller.port, "MAIL_USE_TLS": False})
    with app.app_context():
        return tasks.send_email.apply(args=[ADDRESS, "Your code", "Code: 123456"])


@pytest.mark.parametrize("refusing_server", [("RCPT", 550), ("RCPT", 553), ("DATA", 554)], indirect=True)
def test_a_permanent_refusal_is_tried_once_and_logged_without_the_address(refusing_server, caplog):
    controller, handler = refusing_server
    caplog.set_level(logging.DEBUG)
    result = send_eagerly(controller)
    assert handler.attempts == 1
    assert result.state == "SUCCESS" and result.result == "failed"  # given up: the task line says "failed"
    refused = [r for r in caplog.records if "refused" in r.getMessage() and not r.name.startswith("mail.log")]
    assert len(refused) == 1 and str(handler.code) in refused[0].getMessage()
    assert ADDRESS not in our_log(caplog)


@pytest.mark.parametrize("refusing_server", [("RCPT", 450), ("DATA", 451)], indirect=True)
def test_a_temporary_refusal_is_retried_and_its_retries_do_not_name_the_address(refusing_server, caplog):
    from app import tasks

    controller, handler = refusing_server
    caplog.set_level(logging.DEBUG)
    result = send_eagerly(controller)
    assert handler.attempts == tasks.send_email.max_retries + 1
    assert result.state == "FAILURE"
    # What Celery logs for a retry or a failure: the exception and its traceback.
    assert str(handler.code) in str(result.result)
    assert ADDRESS not in repr(result.result) and ADDRESS not in (result.traceback or "")
    assert ADDRESS not in our_log(caplog)


@pytest.mark.parametrize("refusing_server", [("RCPT", 550)], indirect=True)
def test_a_worker_gives_up_a_refused_mail_at_once_without_logging_the_address(stack, app, refusing_server):
    controller, handler = refusing_server
    worker = stack.worker(queues="emails", MAIL_SERVER="127.0.0.1", MAIL_PORT=str(controller.port),
                          MAIL_USE_TLS="false")
    app.extensions["celery"].send_task("intake.send_email", args=[ADDRESS, "Your code", "Code: 123456"])
    worker.wait_for_output('"task":"intake.send_email"', timeout=30)
    worker.wait_for_output('"outcome":"failed"', timeout=30)  # the give-up is counted below: one attempt
    assert handler.attempts == 1
    assert ADDRESS not in worker.output()
