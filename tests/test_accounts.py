"""Accounts over HTTP (/api/auth): register, verify, login, tokens, logout, password reset, bad input."""
import base64
import json
import logging
import re
import time
from datetime import timedelta

import pytest
from flask_jwt_extended import create_access_token, create_refresh_token, decode_token
from kombu.exceptions import OperationalError
from werkzeug.security import generate_password_hash

from app.accounts import codes, tokens
from app.extensions import db
from app.models import AccountCode, User, utcnow
from tests.conftest import sql

PASSWORD = "correct horse battery"


def queued_mails(redis):
    """The send_email tasks waiting in the `emails` queue: (to, subject, text, html) each."""
    mails = []
    for raw in redis.lrange("emails", 0, -1):
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        mails.append(tuple(args))
    return list(reversed(mails))  # LPUSH: the newest first in the list


def mailed_code(redis, to):
    (code,) = re.findall(r"\b(\d{6})\b", [m for m in queued_mails(redis) if m[0] == to][-1][2])
    return code


def counts():
    return sql("SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM account_codes),"
               " (SELECT count(*) FROM users WHERE email_verified_at IS NOT NULL)")[0]


def register(client, email="ada@example.com", password=PASSWORD):
    return client.post("/api/auth/register", json={"email": email, "password": password})


def verified_login(client, redis, email="ada@example.com", password=PASSWORD):
    assert register(client, email, password).status_code == 201
    assert client.post("/api/auth/verify-email", json={"email": email, "code": mailed_code(redis, email)}).status_code == 200
    answer = client.post("/api/auth/login", json={"email": email, "password": password})
    assert answer.status_code == 200, answer.json
    return answer.json


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def assert_error(answer, status, code):
    assert answer.status_code == status, answer.json
    assert answer.is_json and answer.json["error"]["code"] == code, answer.json
    assert isinstance(answer.json["error"]["message"], str) and answer.json["error"]["message"]


def test_register_creates_an_unverified_user_and_queues_a_code_mail(client, redis):
    answer = register(client, "Ada@Example.com")
    assert answer.status_code == 201
    assert answer.json["email"] == "ada@example.com" and answer.json["email_verified"] is False
    assert set(answer.json) == {"id", "email", "email_verified", "created_at"}
    ((password_hash,),) = sql("SELECT password_hash FROM users")
    assert password_hash.startswith("$argon2id$")
    ((to, subject, text, html),) = queued_mails(redis)
    assert to == "ada@example.com" and "verification" in subject
    code = mailed_code(redis, to)
    assert f"<strong" in html and code in html
    # Stored hashed, never the code itself.
    ((code_hash, attempts, lifetime),) = sql("SELECT code_hash, attempts, expires_at - created_at FROM account_codes")
    assert code not in code_hash and attempts == 0 and lifetime == timedelta(minutes=15)


def test_a_taken_address_is_409_whatever_its_case(client, redis):
    register(client)
    before = counts()
    assert_error(register(client, "ADA@example.com"), 409, "email_taken")
    assert counts() == before and len(queued_mails(redis)) == 1


@pytest.mark.parametrize("body, path", [
    ({"email": "ada@example.com", "password": "short"}, "/password"),
    ({"email": "not an address", "password": PASSWORD}, "/email"),
    ({"email": "ada@example.com"}, "/password"),
])
def test_weak_password_or_bad_email_is_422_and_makes_nothing(client, redis, body, path):
    answer = client.post("/api/auth/register", json=body)
    assert_error(answer, 422, "invalid_request")
    assert [d["path"] for d in answer.json["error"]["details"]] == [path]
    assert counts() == (0, 0, 0) and queued_mails(redis) == []


ROUTES = {
    "/api/auth/register": {"email": "ada@example.com", "password": PASSWORD},
    "/api/auth/verify-email": {"email": "ada@example.com", "code": "123456"},
    "/api/auth/verify-email/resend": {"email": "ada@example.com"},
    "/api/auth/login": {"email": "ada@example.com", "password": PASSWORD},
    "/api/auth/password/forgot": {"email": "ada@example.com"},
    "/api/auth/password/reset": {"email": "ada@example.com", "code": "123456", "new_password": PASSWORD},
}


def _bad_bodies(good):
    yield "missing fields", {}
    for field in good:
        yield f"no {field}", {k: v for k, v in good.items() if k != field}
        yield f"{field} a number", {**good, field: 12345678}
        yield f"{field} a list", {**good, field: ["a"]}
        yield f"{field} null", {**good, field: None}
        yield f"{field} oversized", {**good, field: "a" * 5000 + "@example.com"}
    yield "unknown field", {**good, "admin": True}
    yield "an array", [good]
    yield "a string", "hello"


@pytest.mark.parametrize("route", ROUTES)
def test_bad_input_on_every_account_route_is_a_4xx_error_that_changes_nothing(app, client, redis, route, caplog):
    # An unverified account with a live code, so that a bad request could harm something real.
    register(client)
    app.config["AUTH_RATE_LIMIT_PER_IP"] = app.config["AUTH_RATE_LIMIT_PER_ACCOUNT"] = "10000/minute"
    try:
        before, mails = counts(), len(queued_mails(redis))
        for name, body in _bad_bodies(ROUTES[route]):
            answer = client.post(route, json=body)
            assert 400 <= answer.status_code < 500 and answer.json["error"]["code"] == "invalid_request", (name, answer.json)
        for raw, content_type in [(b"{not json", "application/json"), (b"\xff\xfe", "application/json"),
                                  (b"email=a", "application/x-www-form-urlencoded")]:
            answer = client.post(route, data=raw, content_type=content_type)
            assert answer.status_code in (400, 422) and answer.json["error"]["code"] == "invalid_request", answer.json
        assert counts() == before and len(queued_mails(redis)) == mails
        ((attempts,),) = sql("SELECT attempts FROM account_codes")
        assert attempts == 0
    finally:
        app.config["AUTH_RATE_LIMIT_PER_IP"] = "60/minute;600/hour"
        app.config["AUTH_RATE_LIMIT_PER_ACCOUNT"] = "10/minute;100/hour"


def test_verify_then_login_me_refresh_logout(client, redis):
    assert register(client).status_code == 201
    assert_error(client.post("/api/auth/login", json={"email": "ada@example.com", "password": PASSWORD}),
                 403, "email_not_verified")
    code = mailed_code(redis, "ada@example.com")
    answer = client.post("/api/auth/verify-email", json={"email": "ADA@example.com", "code": code})
    assert answer.status_code == 200 and answer.json["email_verified"] is True
    # Used up: a second try with the same code is refused (and tells nothing about the account).
    assert_error(client.post("/api/auth/verify-email", json={"email": "ada@example.com", "code": code}),
                 400, "invalid_code")
    login = client.post("/api/auth/login", json={"email": "ada@example.com", "password": PASSWORD}).json
    assert login["token_type"] == "Bearer" and login["expires_in"] == 900
    with client.application.app_context():
        claims = decode_token(login["access_token"])
    assert isinstance(claims["sub"], str) and claims["type"] == "access"
    me = client.get("/api/auth/me", headers=bearer(login["access_token"]))
    assert me.status_code == 200 and me.json["email"] == "ada@example.com"
    assert_error(client.post("/api/auth/refresh", headers=bearer(login["access_token"])), 401, "wrong_token_type")
    assert_error(client.get("/api/auth/me", headers=bearer(login["refresh_token"])), 401, "wrong_token_type")
    fresh = client.post("/api/auth/refresh", headers=bearer(login["refresh_token"]))
    assert fresh.status_code == 200 and set(fresh.json) == {"access_token", "token_type", "expires_in"}
    assert client.get("/api/auth/me", headers=bearer(fresh.json["access_token"])).status_code == 200
    out = client.post("/api/auth/logout", headers=bearer(login["access_token"]))
    assert out.status_code == 204 and out.data == b""
    assert_error(client.get("/api/auth/me", headers=bearer(login["access_token"])), 401, "token_revoked")
    # The refresh token is revoked by logging out with it.
    assert client.post("/api/auth/logout", headers=bearer(login["refresh_token"])).status_code == 204
    assert_error(client.post("/api/auth/refresh", headers=bearer(login["refresh_token"])), 401, "token_revoked")


def test_the_blocklist_entry_lives_as_long_as_the_token(client, redis):
    login = verified_login(client, redis)
    client.post("/api/auth/logout", headers=bearer(login["access_token"]))
    (key,) = redis.keys(tokens.REVOKED_KEY_PREFIX + "*")
    assert 890 <= redis.ttl(key) <= 901


def test_the_embedded_default_keeps_revoked_tokens_in_a_table(app):
    with app.app_context():
        blocklist = tokens.TableBlocklist()
        blocklist.revoke("jti-1", 60)
        blocklist.revoke("jti-1", 60)  # twice is fine
        blocklist.revoke("jti-old", -5)  # already expired: removed by the next revocation
        blocklist.revoke("jti-2", 60)
        assert blocklist.is_revoked("jti-1") and blocklist.is_revoked("jti-2")
        assert not blocklist.is_revoked("jti-old") and not blocklist.is_revoked("jti-3")
    sql("TRUNCATE revoked_tokens")


def test_the_sixth_try_is_refused_even_with_the_right_code(client, redis):
    register(client)
    code = mailed_code(redis, "ada@example.com")
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    for _ in range(5):
        assert_error(client.post("/api/auth/verify-email", json={"email": "ada@example.com", "code": wrong}),
                     400, "invalid_code")
    assert_error(client.post("/api/auth/verify-email", json={"email": "ada@example.com", "code": code}),
                 400, "invalid_code")
    assert counts()[2] == 0
    # A new code (resend) works, and the old one stays dead.
    assert client.post("/api/auth/verify-email/resend", json={"email": "ada@example.com"}).status_code == 202
    new_code = mailed_code(redis, "ada@example.com")
    if new_code != code:
        assert_error(client.post("/api/auth/verify-email", json={"email": "ada@example.com", "code": code}),
                     400, "invalid_code")
    assert client.post("/api/auth/verify-email", json={"email": "ada@example.com", "code": new_code}).status_code == 200


def test_an_expired_code_is_refused(app, client, redis):
    register(client)
    sql("UPDATE account_codes SET expires_at = now() - interval '1 second'")
    assert_error(client.post("/api/auth/verify-email", json={"email": "ada@example.com",
                                                             "code": mailed_code(redis, "ada@example.com")}),
                 400, "invalid_code")


def test_unknown_address_wrong_code_is_the_same_answer(client):
    assert_error(client.post("/api/auth/verify-email", json={"email": "nobody@example.com", "code": "123456"}),
                 400, "invalid_code")


def test_login_errors_and_a_constant_time_answer_for_unknown_addresses(client, redis):
    verified_login(client, redis)

    def timed(email, password):
        started = time.perf_counter()
        answer = client.post("/api/auth/login", json={"email": email, "password": password})
        return answer, time.perf_counter() - started

    known = [timed("ada@example.com", "wrong password") for _ in range(3)]
    unknown = [timed("nobody@example.com", "wrong password") for _ in range(3)]
    for answer, _ in known + unknown:
        assert_error(answer, 401, "invalid_credentials")
    assert known[0][0].json == unknown[0][0].json
    # Both pay one argon2 verification (~0.1 s): an unknown address is not answered at once.
    median = lambda runs: sorted(t for _, t in runs)[1]  # noqa: E731
    assert median(unknown) > 0.5 * median(known), (known, unknown)


def test_login_is_limited_per_account(app, client, redis):
    app.config["AUTH_RATE_LIMIT_PER_ACCOUNT"] = "3/minute"
    try:
        for _ in range(3):
            client.post("/api/auth/login", json={"email": "ada@example.com", "password": "wrong password"})
        answer = client.post("/api/auth/login", json={"email": "ada@example.com", "password": "wrong password"})
        assert_error(answer, 429, "rate_limited")
        assert int(answer.headers["Retry-After"]) >= 1
        # Another account from the same address is not held back by this one.
        assert client.post("/api/auth/login", json={"email": "bob@example.com", "password": "x"}).status_code == 401
    finally:
        app.config["AUTH_RATE_LIMIT_PER_ACCOUNT"] = "10/minute;100/hour"


def test_token_routes_are_limited_per_user(app, client, redis):
    login = verified_login(client, redis)
    app.config["AUTH_RATE_LIMIT_PER_ACCOUNT"] = "2/minute"
    try:
        for _ in range(2):
            assert client.get("/api/auth/me", headers=bearer(login["access_token"])).status_code == 200
        assert_error(client.get("/api/auth/me", headers=bearer(login["access_token"])), 429, "rate_limited")
    finally:
        app.config["AUTH_RATE_LIMIT_PER_ACCOUNT"] = "10/minute;100/hour"


def test_forgot_answers_202_for_everyone_and_mails_only_accounts(client, redis):
    register(client)
    before = len(queued_mails(redis))
    unknown = client.post("/api/auth/password/forgot", json={"email": "nobody@example.com"})
    known = client.post("/api/auth/password/forgot", json={"email": "ada@example.com"})
    assert unknown.status_code == known.status_code == 202 and unknown.json == known.json
    mails = queued_mails(redis)[before:]
    assert [m[0] for m in mails] == ["ada@example.com"] and "reset" in mails[0][1]


def test_reset_revokes_every_earlier_token_and_the_code_is_single_use(client, redis):
    login = verified_login(client, redis)
    client.post("/api/auth/password/forgot", json={"email": "ada@example.com"})
    code = mailed_code(redis, "ada@example.com")
    body = {"email": "ada@example.com", "code": code, "new_password": "a brand new secret"}
    answer = client.post("/api/auth/password/reset", json=body)
    assert answer.status_code == 200 and answer.json["email"] == "ada@example.com"
    assert_error(client.post("/api/auth/password/reset", json=body), 400, "invalid_code")
    assert_error(client.post("/api/auth/refresh", headers=bearer(login["refresh_token"])), 401, "token_revoked")
    assert_error(client.get("/api/auth/me", headers=bearer(login["access_token"])), 401, "token_revoked")
    assert_error(client.post("/api/auth/login", json={"email": "ada@example.com", "password": PASSWORD}),
                 401, "invalid_credentials")
    # Tokens made right after the reset (the same second) work.
    new = client.post("/api/auth/login", json={"email": "ada@example.com", "password": "a brand new secret"}).json
    assert client.get("/api/auth/me", headers=bearer(new["access_token"])).status_code == 200
    assert client.post("/api/auth/refresh", headers=bearer(new["refresh_token"])).status_code == 200


def test_jwt_failures_answer_in_the_error_shape(app, client, make_user):
    user_id, headers = make_user()
    assert client.get("/api/auth/me", headers=headers).status_code == 200
    with app.app_context():
        expired = create_access_token(identity=user_id, expires_delta=timedelta(seconds=-10))
    for sent, code in [({}, "missing_token"), (bearer("not.a.token"), "invalid_token"),
                       (bearer(expired), "token_expired"), ({"Authorization": "Basic abc"}, "missing_token")]:
        answer = client.get("/api/auth/me", headers=sent)
        assert_error(answer, 401, code)
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    # A token signed with another key.
    import jwt as pyjwt
    forged = pyjwt.encode({"sub": user_id, "type": "access", "jti": "x", "exp": time.time() + 60,
                           "iat": time.time(), "nbf": time.time(), "fresh": False}, "another key, long enough for HS256 to be happy", algorithm="HS256")
    assert_error(client.get("/api/auth/me", headers=bearer(forged)), 401, "invalid_token")
    # The account is gone: its token stops working.
    sql("DELETE FROM users")
    assert_error(client.get("/api/auth/me", headers=headers), 401, "token_revoked")


def test_current_user_id_is_the_token_subject(app, make_user):
    from flask_jwt_extended import verify_jwt_in_request

    from app import accounts

    user_id, headers = make_user()
    with app.test_request_context(headers=headers):
        verify_jwt_in_request()
        assert accounts.current_user_id() == user_id


def test_werkzeug_hashes_still_log_in_and_are_upgraded(app, client):
    with app.app_context():
        db.session.add(User(email="old@example.com", password_hash=generate_password_hash(PASSWORD),
                            email_verified_at=utcnow()))
        db.session.commit()
    assert client.post("/api/auth/login", json={"email": "old@example.com", "password": PASSWORD}).status_code == 200
    ((password_hash,),) = sql("SELECT password_hash FROM users")
    assert password_hash.startswith("$argon2id$")
    assert client.post("/api/auth/login", json={"email": "old@example.com", "password": PASSWORD}).status_code == 200


def test_the_cli_makes_argon2_hashes_that_log_in(runner, client):
    result = runner.invoke(args=["users", "create", "cli@example.com", "--password", PASSWORD, "--verified"])
    assert result.exit_code == 0, result.output
    ((password_hash,),) = sql("SELECT password_hash FROM users")
    assert password_hash.startswith("$argon2id$")
    assert client.post("/api/auth/login", json={"email": "cli@example.com", "password": PASSWORD}).status_code == 200


def refuse_the_mail(app, monkeypatch):
    """From now on the queue refuses every task message, as a broker that is down."""
    def refuse(*args, **kwargs):
        raise OperationalError("broker down")

    monkeypatch.setattr(app.extensions["celery"], "send_task", refuse)


def test_a_queue_that_refuses_the_mail_is_503_and_makes_nothing(app, client, redis, monkeypatch):
    refuse_the_mail(app, monkeypatch)
    assert_error(register(client), 503, "queue_unavailable")
    assert counts() == (0, 0, 0)
    assert register(client).status_code == 503  # and a retry is not a 409


def test_forgot_is_202_for_an_account_even_when_the_queue_refuses_the_mail(app, client, redis, monkeypatch):
    register(client)
    mails_before = len(queued_mails(redis))
    codes_before = sql("SELECT count(*) FROM account_codes")[0][0]
    refuse_the_mail(app, monkeypatch)
    known = client.post("/api/auth/password/forgot", json={"email": "ada@example.com"})
    unknown = client.post("/api/auth/password/forgot", json={"email": "nobody@example.com"})
    # A 503 for known addresses only would tell who has an account.
    assert known.status_code == unknown.status_code == 202 and known.json == unknown.json
    assert len(queued_mails(redis)) == mails_before
    assert sql("SELECT count(*) FROM account_codes")[0][0] == codes_before  # no code without its mail


def test_a_register_that_loses_the_race_for_its_address_is_409(app, client, redis, monkeypatch):
    from app.accounts import users

    # The address is taken between the check and the insert, as by a concurrent request.
    monkeypatch.setattr(users, "find_user", lambda email: None)
    assert register(client).status_code == 201
    assert_error(register(client), 409, "email_taken")
    assert counts()[0] == 1


def test_no_address_code_or_password_in_the_logs(client, redis, caplog):
    caplog.set_level(logging.DEBUG)
    login = verified_login(client, redis)
    client.post("/api/auth/password/forgot", json={"email": "ada@example.com"})
    client.post("/api/auth/login", json={"email": "ada@example.com", "password": "wrong password"})
    client.post("/api/auth/logout", headers=bearer(login["access_token"]))
    secrets = ["ada@example.com", PASSWORD, login["access_token"], login["refresh_token"]]
    secrets += [re.findall(r"\b(\d{6})\b", mail[2])[0] for mail in queued_mails(redis)]
    text = "\n".join(record.getMessage() + " " + repr(getattr(record, "fields", "")) for record in caplog.records)
    for secret in secrets:
        assert secret not in text


def test_codes_are_issued_hashed_and_a_new_one_replaces_the_old(app, make_user):
    user_id, _ = make_user()
    with app.app_context():
        user = db.session.get(User, user_id)
        first = codes.issue_code(user, codes.RESET_PASSWORD)
        second = codes.issue_code(user, codes.RESET_PASSWORD)
        db.session.commit()
        assert re.fullmatch(r"\d{6}", first) and re.fullmatch(r"\d{6}", second)
        live = db.session.scalars(db.select(AccountCode).where(AccountCode.used_at.is_(None))).all()
        assert len(live) == 1
        with pytest.raises(Exception):
            codes.consume_code(user, codes.RESET_PASSWORD, first if first != second else "x")
        codes.consume_code(db.session.get(User, user_id), codes.RESET_PASSWORD, second)


def test_token_routes_answer_503_quickly_when_the_blocklist_redis_is_down(make_user):
    from tests.private_redis import isolated_app

    dead = isolated_app({})
    dead.extensions["intake.blocklist"] = tokens.RedisBlocklist("redis://127.0.0.1:1/0")
    _, headers = make_user()
    started = time.monotonic()
    answer = dead.test_client().get("/api/auth/me", headers=headers)
    assert_error(answer, 503, "service_unavailable")
    assert answer.headers["Retry-After"] and time.monotonic() - started < 3


def test_logout_on_the_embedded_default_revokes_through_the_table(make_user):
    from tests.private_redis import isolated_app

    embedded = isolated_app({"REDIS_URL": None})
    assert isinstance(embedded.extensions["intake.blocklist"], tokens.TableBlocklist)
    client = embedded.test_client()
    _, headers = make_user()
    assert client.post("/api/auth/logout", headers=headers).status_code == 204
    assert_error(client.get("/api/auth/me", headers=headers), 401, "token_revoked")
    ((rows,),) = sql("SELECT count(*) FROM revoked_tokens WHERE expires_at > now() + interval '800 seconds'")
    assert rows == 1
