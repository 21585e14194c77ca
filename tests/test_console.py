"""The console without a browser: every page needs a session, the JavaScript budget, cookie settings."""
import re
import time
from datetime import timedelta
from pathlib import Path

import pytest

from app.config import Config
from tests.conftest import sql

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


@pytest.fixture
def signed_in(client, ada):
    """`client` signed in to the console through its form; returns the user's id."""
    answer = client.post("/console/sign-in", data={"email": "ada@example.com", "password": PASSWORD,
                                                   "csrf_token": form_token(client)})
    assert answer.status_code == 302
    return ada


def cookie_claims(app, client, name) -> dict:
    from flask_jwt_extended import decode_token

    with app.app_context():
        return decode_token(client.get_cookie(name).value, allow_expired=True)


def revoked(app, claims) -> bool:
    from app.accounts import tokens

    with app.app_context():
        return tokens.blocklist().is_revoked(claims["jti"])


def expire_access_token(app, client, user_id, csrf):
    """Make the access cookie an expired token, as 15 minutes after a page with `csrf` in its forms was rendered."""
    from flask_jwt_extended import create_access_token

    with app.app_context():
        client.set_cookie("access_token_cookie", create_access_token(
            identity=user_id, expires_delta=timedelta(seconds=-60), additional_claims={"csrf": csrf}))


def signed_out(client) -> bool:
    return client.get_cookie("access_token_cookie") is None and client.get_cookie("refresh_token_cookie") is None \
        and client.get("/console/apps").status_code == 302


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


def test_sign_out_revokes_both_tokens_and_clears_the_cookies(app, client, signed_in):
    access, refresh = cookie_claims(app, client, "access_token_cookie"), cookie_claims(app, client, "refresh_token_cookie")
    kept = client.get_cookie("refresh_token_cookie").value
    answer = client.post("/console/sign-out", data={"csrf_token": form_token(client, "/console/apps")})
    assert answer.status_code == 302 and answer.headers["Location"] == "/console/sign-in"
    assert revoked(app, access) and revoked(app, refresh)
    assert signed_out(client)
    # A copy of the refresh cookie no longer signs anybody in.
    client.set_cookie("refresh_token_cookie", kept)
    assert client.get("/console/apps").status_code == 302


def test_sign_out_works_after_the_access_token_expired(app, client, signed_in):
    csrf = form_token(client, "/console/apps")
    expire_access_token(app, client, signed_in, csrf)
    refresh = cookie_claims(app, client, "refresh_token_cookie")
    answer = client.post("/console/sign-out", data={"csrf_token": csrf})
    assert answer.status_code == 302 and answer.headers["Location"] == "/console/sign-in"
    assert revoked(app, refresh)
    assert signed_out(client), "the next page must not sign the user in again"


def test_a_live_tail_open_across_a_renewal_keeps_working_forms(app, client, signed_in):
    from app.manage import apps

    with app.app_context():
        app_id = apps.add_app(apps.account(signed_in), "shop")[0].id
    csrf = form_token(client, f"/console/apps/{app_id}")
    expire_access_token(app, client, signed_in, csrf)
    # The 1 s poll renews the access cookie from the refresh cookie...
    polled = client.get(f"/console/apps/{app_id}/tail", headers={"HX-Request": "true"})
    assert polled.status_code == 200 and "access_token_cookie=" in " ".join(polled.headers.getlist("Set-Cookie"))
    assert cookie_claims(app, client, "access_token_cookie")["exp"] > time.time()
    # ...and the forms the page was rendered with are still accepted: a rename, then sign-out.
    assert client.post(f"/console/apps/{app_id}/rename", data={"name": "shop-2", "csrf_token": csrf}).status_code == 302
    refresh = cookie_claims(app, client, "refresh_token_cookie")
    answer = client.post("/console/sign-out", data={"csrf_token": csrf})
    assert answer.status_code == 302 and answer.headers["Location"] == "/console/sign-in"
    assert revoked(app, refresh) and signed_out(client)


def test_sign_out_without_the_csrf_token_changes_nothing(app, client, signed_in):
    csrf = form_token(client, "/console/apps")
    access, refresh = cookie_claims(app, client, "access_token_cookie"), cookie_claims(app, client, "refresh_token_cookie")
    for sent in ({}, {"csrf_token": ""}, {"csrf_token": csrf + "x"}, {"csrf_token": "é"}):
        answer = client.post("/console/sign-out", data=sent)
        assert answer.status_code == 400 and b"CSRF" in answer.data, sent
        assert "Set-Cookie" not in answer.headers
    expire_access_token(app, client, signed_in, csrf)
    assert client.post("/console/sign-out", data={"csrf_token": "forged"}).status_code == 400
    assert not revoked(app, access) and not revoked(app, refresh)
    assert client.get("/console/apps").status_code == 200


def test_a_csrf_value_that_is_not_ascii_is_refused_not_a_500(app, client, signed_in):
    from app.manage import apps

    with app.app_context():
        app_id = apps.add_app(apps.account(signed_in), "shop")[0].id
    for path in (f"/console/apps/{app_id}/rename", "/console/apps", "/console/sign-in"):
        answer = client.post(path, data={"name": "x", "csrf_token": "é"})
        assert answer.status_code == 400 and b"CSRF" in answer.data, path
    assert client.get(f"/console/apps/{app_id}").status_code == 200 and b"shop" in client.get("/console/apps").data


def test_sign_out_clears_the_cookies_even_when_revocation_fails(app, client, signed_in, monkeypatch):
    import redis

    def unavailable(jti, seconds_left):
        raise redis.ConnectionError("down")

    monkeypatch.setattr(app.extensions["intake.blocklist"], "revoke", unavailable)
    answer = client.post("/console/sign-out", data={"csrf_token": form_token(client, "/console/apps")})
    assert answer.status_code == 503
    assert client.get_cookie("access_token_cookie") is None and client.get_cookie("refresh_token_cookie") is None


def key_shown(answer) -> str | None:
    found = re.search(r'id="api-key" readonly value="([^"]+)"', answer.get_data(as_text=True))
    return found and found.group(1)


def shown_once(client, answer, app_id):
    """The POST redirected to the key page, which shows the app's key the first time only, never cached."""
    from app.rules import hash_api_key

    # POST-redirect-GET: the page a reload repeats is a GET that changes nothing.
    assert answer.status_code in (302, 303) and answer.headers["Location"] == f"/console/apps/{app_id}/key"
    shown = client.get(answer.headers["Location"])
    stored = sql("SELECT api_key_hash FROM apps WHERE id = %s", app_id)[0][0]
    assert shown.status_code == 200 and hash_api_key(key_shown(shown)) == stored
    reloaded = client.get(answer.headers["Location"])
    assert reloaded.status_code == 200 and key_shown(reloaded) is None and b"shown once" in reloaded.data
    assert shown.headers["Cache-Control"] == reloaded.headers["Cache-Control"] == "no-store"
    assert sql("SELECT api_key_hash FROM apps") == [(stored,)], "a second app or a second rotation"


def test_a_new_key_is_shown_once_and_a_reload_neither_creates_nor_rotates_again(client, signed_in):
    csrf = form_token(client, "/console/apps")
    created = client.post("/console/apps", data={"name": "shop", "csrf_token": csrf})
    app_id = sql("SELECT id FROM apps")[0][0]
    shown_once(client, created, app_id)
    shown_once(client, client.post(f"/console/apps/{app_id}/rotate-key", data={"csrf_token": csrf}), app_id)


def contrast(one: str, other: str) -> float:
    """WCAG 2 contrast ratio of two colours (#rgb or #rrggbb)."""
    def luminance(colour):
        if len(colour) == 4:
            colour = "#" + "".join(c * 2 for c in colour[1:])
        channels = [int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        r, g, b = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * r + 0.7152 * g + 0.0722 * b
    lighter, darker = sorted((luminance(one), luminance(other)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def test_the_focus_ring_shows_on_the_dark_header_and_the_white_page():
    css = (STATIC / "console" / "static" / "console.css").read_text()
    ring = re.search(r":focus-visible\{outline:\S+ solid (#[0-9a-f]{3,6})\b", css).group(1)
    header = re.search(r"\.top\{[^}]*background:(#[0-9a-f]{3,6})\b", css).group(1)
    page = re.search(r"body\{[^}]*background:(#[0-9a-f]{3,6})\b", css).group(1)
    # WCAG 2.2 (1.4.11, non-text contrast): at least 3:1 against what the ring is drawn on.
    assert contrast(ring, header) >= 3 and contrast(ring, page) >= 3, (ring, contrast(ring, header), contrast(ring, page))
