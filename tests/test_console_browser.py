"""The console in a real browser (headless Debian Chromium driven by Playwright) over gunicorn and a worker."""
import hashlib
import os
import re
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from playwright.sync_api import expect, sync_playwright

from tests.conftest import sql, wait_until
from tests.test_e2e_accounts import mailed_code  # noqa: F401
from tests.test_e2e_mail import smtp_server  # noqa: F401  (the fixture)

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
PASSWORD = "a long enough secret"
DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def browser():
    """One Chromium for the module; no browser is a failure, never a skip."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, tmp_path, request):
    """A fresh context; JavaScript errors are collected, and every page is screenshotted on failure."""
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    tab = context.new_page()
    tab.js_errors = []
    tab.on("pageerror", lambda error: tab.js_errors.append(str(error)))
    tab.on("console", lambda message: message.type == "error" and tab.js_errors.append(message.text))
    yield tab
    if getattr(request.node, "rep_call", None) is None or request.node.rep_call.failed:
        shots = Path("test-screenshots")
        shots.mkdir(exist_ok=True)
        for number, open_page in enumerate(context.pages):
            open_page.screenshot(path=str(shots / f"{request.node.name}-{number}.png"), full_page=True)
    context.close()


@pytest.fixture
def screenshots(tmp_path):
    """Where the journey's screenshots go: docs/ (the README's) with UPDATE_SCREENSHOTS=1, else a temporary folder.

    Refreshing the README's pictures is a deliberate act: a plain test run must leave the git tree clean.
    It still takes them, so the code path is exercised every run.
    """
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        yield DOCS
        return

    def digests():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in DOCS.glob("console-*.png")}

    before = digests()
    yield tmp_path
    assert digests() == before, "docs/console-*.png changed without UPDATE_SCREENSHOTS=1"


def access_cookie(page) -> str | None:
    return next((c["value"] for c in page.context.cookies() if c["name"] == "access_token_cookie"), None)


def check_page(page, narrow=False):
    """Every visible form control has an accessible name; `narrow`: the document does not scroll sideways."""
    for control in page.locator("input:visible, select:visible, textarea:visible").all():
        expect(control).to_have_accessible_name(re.compile(r"\S"))
    if narrow:
        widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert widths[0] <= widths[1], (page.url, widths)


def send(stack, app_id, key, **event):
    answer = stack.post(f"/api/logs/{app_id}", event, headers={"X-API-Key": key})
    assert answer.status_code == 202, answer.text


def test_the_console_journey_in_a_browser(stack, smtp_server, page, app, screenshots):  # noqa: F811
    controller, inbox = smtp_server
    stack.web(workers=1, threads=4)
    stack.worker(MAIL_SERVER="127.0.0.1", MAIL_PORT=str(controller.port), MAIL_USE_TLS="false")
    stack.beat()  # redelivers the retried group until it is a dead letter
    base = stack.base_url
    email = "grace@example.com"

    # Sign up, the code from the mail, sign in.
    page.goto(base + "/console/sign-up")
    check_page(page)
    page.get_by_label("E-mail address").fill(email)
    page.get_by_label("Password (at least 12 characters)").fill(PASSWORD)
    page.get_by_role("button", name="Sign up").click()
    check_page(page)
    page.get_by_label("6-digit code from the mail").fill(mailed_code(inbox, "verification", 1))
    page.get_by_role("button", name="Verify").click()
    expect(page.get_by_text("Address verified")).to_be_visible()
    check_page(page)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Your apps")).to_be_visible()
    check_page(page)
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["access_token_cookie"]["httpOnly"] and cookies["access_token_cookie"]["sameSite"] == "Lax"

    # Create an app; the key is shown once and copied with the button.
    page.get_by_label("App name").fill("shop")
    page.get_by_role("button", name="Create app").click()
    key = page.get_by_label("App key").input_value()
    check_page(page)
    page.get_by_role("button", name="Copy").click()
    expect(page.get_by_text("Copied.")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == key
    # The key page is a GET after the POST: a reload creates no second app and no longer shows the key.
    page.reload()
    expect(page.get_by_text("was shown once")).to_be_visible()
    assert sql("SELECT count(*) FROM apps")[0][0] == 1
    page.get_by_role("link", name="Live tail").first.click()
    app_id = re.search(r"/console/apps/([0-9a-f-]{36})", page.url).group(1)

    # Events sent through the API show in the live tail within 2 s, without a reload.
    expect(page.get_by_text("No events yet.")).to_be_visible()
    check_page(page)
    send(stack, app_id, key, event_name="checkout", level="error", user_id="u1", event_id="ev-1", amount=3)
    send(stack, app_id, key, event_name="signup", level="info", user_id="u2", event_id="ev-2")
    sent = time.monotonic()
    expect(page.locator("#tail [data-event-id=ev-1]")).to_be_visible(timeout=2000)
    expect(page.locator("#tail [data-event-id=ev-2]")).to_be_visible(timeout=max(100, 2000 - int((time.monotonic() - sent) * 1000)))
    page.screenshot(path=str(screenshots / "console-live-tail.png"))
    # Keyboard focus survives the polls (htmx puts it back only on an element with the same id).
    page.locator("#tail [data-event-id=ev-1]").focus()
    page.wait_for_timeout(2500)
    assert page.evaluate("document.activeElement.dataset.eventId") == "ev-1"
    # Filters, then one event's stored payload, fields and validation.
    page.get_by_label("Level").select_option("error")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#tail [data-event-id=ev-2]")).to_have_count(0, timeout=3000)
    page.locator("#tail [data-event-id=ev-1]").click()
    expect(page.locator("#detail .payload")).to_contain_text('"amount": 3')
    expect(page.locator("#detail .validation")).to_contain_text("valid")

    # The chart draws, by level, from the rollups.
    with app.app_context():
        from app import rollups
        rollups.refresh()
    page.get_by_role("link", name="Charts").click()
    page.get_by_label("Time range").select_option("1h")
    page.get_by_role("button", name="Show").click()
    expect(page.locator("#chart canvas")).to_be_visible()
    expect(page.locator("td[data-level=error]")).to_have_text("1")
    expect(page.locator("td[data-level=info]")).to_have_text("1")
    assert int(page.locator("#chart").get_attribute("data-points")) >= 1
    check_page(page)
    page.screenshot(path=str(screenshots / "console-charts.png"))

    # A persistence failure ends in failed events; replayed from the page, it is stored.
    sql("ALTER TABLE events ADD CONSTRAINT console_refuse CHECK (NOT (payload ? 'refuse'))")
    try:
        send(stack, app_id, key, event_name="broken", event_id="ev-bad", refuse=True)
        wait_until(lambda: sql("SELECT count(*) FROM failed_events WHERE event_id = 'ev-bad'")[0][0], timeout=60,
                   message="the dead letter")
    finally:
        sql("ALTER TABLE events DROP CONSTRAINT IF EXISTS console_refuse")
    page.get_by_role("link", name="Failed events").click()
    expect(page.get_by_text("console_refuse")).to_be_visible()
    page.get_by_role("button", name="Replay ev-bad").click()
    expect(page.get_by_text("Replaying 1 failed event(s)")).to_be_visible()
    # The replay runs on batch_processing: wait for it to store the event and take it off the list.
    wait_until(lambda: sql("SELECT count(*) FROM events WHERE event_id = 'ev-bad'")[0][0], timeout=30,
               message="the replayed event stored")
    wait_until(lambda: not sql("SELECT count(*) FROM failed_events WHERE event_id = 'ev-bad'")[0][0], timeout=30,
               message="the replayed event off the failed events")
    page.reload()
    expect(page.get_by_text("No failed events.")).to_be_visible()

    # A rule: an invalid schema is refused with the error next to the field; saved, then disabled and enabled.
    page.get_by_role("link", name="Rules").click()
    expect(page.get_by_role("heading", name="New rule")).to_be_visible()
    check_page(page)
    page.get_by_label("Name", exact=True).fill("checkout-user")
    page.get_by_label("Event name (empty: every event)").fill("checkout")
    page.get_by_label("Action").select_option("warn")
    page.get_by_label("JSON Schema").fill('{"type": "objekt"}')
    assert page.js_errors == []
    page.get_by_role("button", name="Save rule").click()
    schema = page.get_by_label("JSON Schema")
    expect(schema).to_have_attribute("aria-invalid", "true")
    expect(schema).to_have_accessible_description(re.compile("not a valid JSON Schema"))
    expect(page.locator("#f-schema + .field-error")).to_contain_text("not a valid JSON Schema")
    check_page(page)
    assert sql("SELECT count(*) FROM rules")[0][0] == 0
    # Chromium logs the form's 422 answer as a console error: that was the point.
    assert all("422" in error for error in page.js_errors)
    page.js_errors.clear()
    schema.fill('{"type": "object", "required": ["user_id"]}')
    page.get_by_role("button", name="Save rule").click()
    expect(page.get_by_text("Rule saved.")).to_be_visible()
    row = page.get_by_role("row").filter(has_text="checkout-user")
    for button, state in (("Disable", "disabled"), ("Enable", "enabled")):
        row.get_by_role("button", name=button).click()
        expect(row.get_by_role("cell", name=state, exact=True)).to_be_visible()
        assert sql("SELECT enabled FROM rules")[0][0] is (state == "enabled")
    page.get_by_role("link", name="Send your first event").click()
    expect(page.get_by_text(f"{base}/api/logs/{app_id}").first).to_be_visible()

    # Rename and rotate the key from the settings page: the old key stops, the new one is shown once.
    page.get_by_role("link", name="Settings").click()
    check_page(page)
    page.get_by_label("Name", exact=True).fill("shop-2")
    page.get_by_role("button", name="Rename").click()
    expect(page.get_by_text("Renamed to shop-2.")).to_be_visible()
    page.get_by_role("button", name="Rotate the key").click()
    new_key = page.get_by_label("App key").input_value()
    assert new_key != key
    page.reload()  # rotates nothing: the new key below still works
    expect(page.get_by_text("was shown once")).to_be_visible()
    assert stack.post(f"/api/logs/{app_id}", {"event_name": "x"}, headers={"X-API-Key": key}).status_code == 401
    send(stack, app_id, new_key, event_name="after-rotation")

    # At 375 px wide (a phone) the main pages fit: the document itself never scrolls sideways.
    page.set_viewport_size({"width": 375, "height": 800})
    for path, ready in (("/console/apps", "main"), (f"/console/apps/{app_id}", "#tail [data-event-id=ev-1]"),
                        (f"/console/apps/{app_id}/charts", "#chart canvas"), (f"/console/apps/{app_id}/rules", "main")):
        page.goto(base + path)
        expect(page.locator(ready)).to_be_visible()
        check_page(page, narrow=True)
    page.set_viewport_size({"width": 1100, "height": 800})
    assert page.js_errors == []

    # A change without the CSRF token is refused, and changes nothing.
    refused = page.request.post(base + f"/console/apps/{app_id}/rename", form={"name": "hijacked"})
    assert refused.status == 400 and "CSRF" in refused.text()
    assert sql("SELECT name FROM apps WHERE id = %s", app_id)[0][0] == "shop-2"

    # Another user's app is 404 in the browser too.
    other = sql("INSERT INTO users (id, email, password_hash, created_at) VALUES (%s, 'o@example.com', 'x', now())"
                " RETURNING id", str(uuid.uuid4()))[0][0]
    foreign = sql("INSERT INTO apps (id, owner_id, name, api_key_hash, retention_days, created_at)"
                  " VALUES (%s, %s, 'theirs', 'h', 30, now()) RETURNING id", str(uuid.uuid4()), other)[0][0]
    for path in ("", "/charts", "/failed", "/rules", "/settings", "/tail"):
        assert page.goto(base + f"/console/apps/{foreign}{path}").status == 404
        expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    # Chromium logs each 404 document it was sent to as a console error: those were the point.
    assert all("404" in error for error in page.js_errors)
    page.js_errors.clear()

    # Sign out from a live tail open across a renewal: the access token expires, the poll renews it from the
    # refresh cookie, and the page's forms (rendered before) still sign out; then every URL leads to sign-in.
    page.goto(base + f"/console/apps/{app_id}")
    csrf = page.locator("header input[name=csrf_token]").input_value()
    with app.app_context():
        from flask_jwt_extended import create_access_token
        expired = create_access_token(identity=sql("SELECT id FROM users WHERE email = %s", email)[0][0],
                                      expires_delta=timedelta(seconds=-60), additional_claims={"csrf": csrf})
    page.context.add_cookies([{"name": "access_token_cookie", "value": expired, "url": base, "httpOnly": True}])
    wait_until(lambda: access_cookie(page) not in (None, expired), timeout=15, message="the poll's renewal (every 1 s)")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    for path in ("/console/apps", f"/console/apps/{app_id}", f"/console/apps/{app_id}/charts",
                 f"/console/apps/{app_id}/failed", f"/console/apps/{app_id}/rules", f"/console/apps/{app_id}/start"):
        page.goto(base + path)
        assert page.url.startswith(base + "/console/sign-in"), path
    assert requests.post(base + f"/console/apps/{app_id}/rename", data={"name": "x"}, allow_redirects=False,
                         timeout=10).status_code == 302
    assert page.js_errors == []
