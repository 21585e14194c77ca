"""The console without a browser: every page needs a session, the JavaScript budget, cookie settings."""
import re
from pathlib import Path

import pytest

from app.config import Config

STATIC = Path(__file__).resolve().parent.parent / "app"
PASSWORD = "a long enough secret"
SIGNED_OUT_FORMS = ("/console/sign-in", "/console/sign-up", "/console/verify", "/console/forgot", "/console/reset")


def form_token(client, path="/console/sign-in") -> str:
    """The CSRF value the forms of the page at `path` post."""
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).get_data(as_text=True)).group(1)


@pytest.fixture
def ada(make_user):
    """A verified user with a known password; returns their id."""
    from app.accounts.passwords import hash_password

    return make_user(email="ada@example.com", password_hash=hash_password(PASSWORD))[0]


def test_every_console_page_sends_the_signed_out_to_sign_in(app, client):
    public = {"console.sign_in", "console.sign_up", "console.verify", "console.forgot", "console.reset",
              "console.vendor", "console.static", "console.home"}
    rules = [rule for rule in app.url_map.iter_rules() if rule.endpoint.startswith("console.")
             and rule.endpoint not in public]
    assert len(rules) > 15
    for rule in rules:
        url = re.sub(r"<[^>]+>", "00000000-0000-0000-0000-000000000000", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            answer = client.open(url, method=method)
            assert answer.status_code == 302 and "/console/sign-in" in answer.headers["Location"], (method, url)


def test_sign_in_never_redirects_to_another_site(client, ada):
    token = form_token(client)
    for target, expected in (("https://evil.example/", "/console/apps"), ("//evil.example", "/console/apps"),
                             ("/console/apps/x", "/console/apps/x")):
        answer = client.post("/console/sign-in", data={"email": "ada@example.com", "password": PASSWORD,
                                                       "next": target, "csrf_token": token})
        assert answer.status_code == 302 and answer.headers["Location"] == expected


def test_a_wrong_password_is_shown_on_the_form_and_sets_no_cookie(client):
    answer = client.post("/console/sign-in", data={"email": "nobody@example.com", "password": "wrong password!",
                                                   "csrf_token": form_token(client)})
    assert answer.status_code == 401 and b"The address or the password is wrong." in answer.data
    assert "Set-Cookie" not in answer.headers


def test_the_forms_before_sign_in_refuse_a_post_without_their_csrf_token(app, client, ada):
    # Login CSRF: another site must not sign the browser in to the attacker's account (or post the other forms).
    other = app.test_client()
    foreign = form_token(other)  # a valid token, but of another browser
    for path in SIGNED_OUT_FORMS:
        mine = form_token(client, path)
        for sent in ({}, {"csrf_token": ""}, {"csrf_token": foreign}):
            answer = client.post(path, data={"email": "ada@example.com", "password": PASSWORD, **sent})
            assert answer.status_code == 400 and b"CSRF" in answer.data, (path, sent)
            assert "Set-Cookie" not in answer.headers
        assert mine == form_token(client), "one token per browser session"
    answer = client.post("/console/sign-in", data={"email": "ada@example.com", "password": PASSWORD,
                                                   "csrf_token": form_token(client)})
    assert answer.status_code == 302 and client.get_cookie("access_token_cookie")


def test_cookies_are_secure_in_production_and_csrf_protected():
    config = Config({"APP_ENV": "production", "SECRET_KEY": "s", "JWT_SECRET_KEY": "j"})
    assert config.JWT_COOKIE_SECURE and config.JWT_COOKIE_CSRF_PROTECT and config.JWT_COOKIE_SAMESITE == "Lax"
    assert config.JWT_TOKEN_LOCATION == ["headers", "cookies"]


def test_the_javascript_a_page_loads_stays_under_150_kb():
    vendored = STATIC / "static" / "vendor"
    own = STATIC / "console" / "static"
    heaviest = max((vendored / "htmx" / "htmx.min.js").stat().st_size,
                   (vendored / "uplot" / "uPlot.iife.min.js").stat().st_size + (own / "charts.js").stat().st_size)
    assert heaviest + (own / "console.js").stat().st_size < 150 * 1024
