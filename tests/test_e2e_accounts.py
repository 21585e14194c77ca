"""The account journey against real gunicorn, a real `emails` worker and a real SMTP server (aiosmtpd)."""
import re

from tests.conftest import wait_until
from tests.test_e2e_mail import smtp_server  # noqa: F401  (the fixture)

EMAIL = "grace@example.com"
PASSWORD = "a long enough secret"
NEW_PASSWORD = "another long secret"


def mailed_code(inbox, subject_word, count):
    """The 6-digit code of the `count`-th mail, once it has arrived; both parts carry it."""
    wait_until(lambda: len(inbox.messages) >= count, timeout=60, message=f"mail number {count}")
    message = inbox.messages[count - 1]
    assert message["To"] == EMAIL and subject_word in message["Subject"]
    parts = {part.get_content_type(): part.get_payload(decode=True).decode() for part in message.walk()
             if not part.is_multipart()}
    (code,) = set(re.findall(r"\b(\d{6})\b", parts["text/plain"]))
    assert code in parts["text/html"]
    return code


def test_register_verify_login_use_an_app_logout_reset_over_real_processes(stack, smtp_server):  # noqa: F811
    controller, inbox = smtp_server
    web = stack.web(workers=1, threads=4)
    worker = stack.worker(queues="emails,default", MAIL_SERVER="127.0.0.1", MAIL_PORT=str(controller.port),
                          MAIL_USE_TLS="false")
    bearer = lambda token: {"Authorization": f"Bearer {token}"}  # noqa: E731

    assert stack.post("/api/auth/register", {"email": EMAIL, "password": PASSWORD}).status_code == 201
    code = mailed_code(inbox, "verification", 1)
    assert stack.post("/api/auth/login", {"email": EMAIL, "password": PASSWORD}).status_code == 403
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    assert stack.post("/api/auth/verify-email", {"email": EMAIL, "code": wrong}).json()["error"]["code"] == "invalid_code"
    assert stack.post("/api/auth/verify-email", {"email": EMAIL, "code": code}).status_code == 200

    login = stack.post("/api/auth/login", {"email": EMAIL, "password": PASSWORD}).json()
    me = stack.get("/api/auth/me", headers=bearer(login["access_token"]))
    assert me.status_code == 200 and me.json()["email"] == EMAIL and me.json()["email_verified"] is True
    refreshed = stack.post("/api/auth/refresh", headers=bearer(login["refresh_token"])).json()
    assert stack.get("/api/auth/me", headers=bearer(refreshed["access_token"])).status_code == 200

    # The account at work: an app, an event through its key, listed and read back, the key rotated.
    auth = bearer(refreshed["access_token"])
    created = stack.post("/api/apps", {"name": "shop"}, auth)
    assert created.status_code == 201, created.text
    app_id, key = created.json()["id"], created.json()["api_key"]
    sent = stack.post(f"/api/logs/{app_id}", {"event_name": "signup", "event_id": "j-1", "plan": "pro"},
                      {"X-API-Key": key})
    assert sent.status_code == 202
    listed = wait_until(lambda: stack.get(f"/api/apps/{app_id}/events", headers=auth).json()["events"], timeout=30,
                        message="the event listed")
    assert [event["event_id"] for event in listed] == ["j-1"]
    stored = stack.get(f"/api/apps/{app_id}/events/j-1", headers=auth).json()
    assert stored["payload"] == {"event_name": "signup", "event_id": "j-1", "plan": "pro"}
    rotated = stack.post(f"/api/apps/{app_id}/api-key", headers=auth)
    assert rotated.status_code == 201 and rotated.json()["api_key"] != key
    old_key = stack.post(f"/api/logs/{app_id}", {"event_name": "late"}, {"X-API-Key": key})
    assert old_key.status_code == 401 and old_key.json()["error"]["code"] == "invalid_api_key"
    assert stack.post(f"/api/logs/{app_id}", {"event_name": "late"},
                      {"X-API-Key": rotated.json()["api_key"]}).status_code == 202

    assert stack.post("/api/auth/logout", headers=bearer(refreshed["access_token"])).status_code == 204
    refused = stack.get("/api/auth/me", headers=bearer(refreshed["access_token"]))
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "token_revoked"

    # Reset: a code by mail; the refresh token from before the reset is refused afterwards.
    assert stack.post("/api/auth/password/forgot", {"email": EMAIL}).status_code == 202
    assert stack.post("/api/auth/password/forgot", {"email": "nobody@example.com"}).status_code == 202
    reset_code = mailed_code(inbox, "reset", 2)
    answer = stack.post("/api/auth/password/reset", {"email": EMAIL, "code": reset_code, "new_password": NEW_PASSWORD})
    assert answer.status_code == 200
    stale = stack.post("/api/auth/refresh", headers=bearer(login["refresh_token"]))
    assert stale.status_code == 401 and stale.json()["error"]["code"] == "token_revoked"
    new = stack.post("/api/auth/login", {"email": EMAIL, "password": NEW_PASSWORD}).json()
    assert stack.get("/api/auth/me", headers=bearer(new["access_token"])).status_code == 200
    assert len(inbox.messages) == 2  # nothing was sent for the unknown address

    # No address, code, password or token in any log line of the run.
    worker.wait_for_output('"task":"intake.send_email"', timeout=10)
    logs = web.output() + worker.output()
    for secret in (EMAIL, "grace%40example.com", code, wrong, reset_code, PASSWORD, NEW_PASSWORD,
                   login["access_token"], login["refresh_token"], new["access_token"]):
        assert secret not in logs, secret
    assert '"route":"/api/auth/login"' in logs  # the request lines are there, without the secrets
