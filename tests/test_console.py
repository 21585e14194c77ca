"""The console without a browser: every page needs a session, the JavaScript budget, cookie settings."""
import re
from pathlib import Path

from app.config import Config

STATIC = Path(__file__).resolve().parent.parent / "app"


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


def test_sign_in_never_redirects_to_another_site(client, make_user):
    from app.accounts.passwords import hash_password

    make_user(email="ada@example.com", password_hash=hash_password("a long enough secret"))
    for target, expected in (("https://evil.example/", "/console/apps"), ("//evil.example", "/console/apps"),
                             ("/console/apps/x", "/console/apps/x")):
        answer = client.post("/console/sign-in", data={"email": "ada@example.com", "password": "a long enough secret",
                                                       "next": target})
        assert answer.status_code == 302 and answer.headers["Location"] == expected


def test_a_wrong_password_is_shown_on_the_form_and_sets_no_cookie(client):
    answer = client.post("/console/sign-in", data={"email": "nobody@example.com", "password": "wrong password!"})
    assert answer.status_code == 401 and b"The address or the password is wrong." in answer.data
    assert "Set-Cookie" not in answer.headers


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
