"""The console's session: the accounts' JWTs in HttpOnly cookies, refreshed quietly, CSRF on every change."""
import secrets
from functools import wraps
from hmac import compare_digest

from flask import after_this_request, current_app, g, redirect, request, session, url_for
from flask_jwt_extended import (create_access_token, decode_token, get_jwt, get_jwt_identity, set_access_cookies,
                                unset_jwt_cookies, verify_jwt_in_request)
from flask_jwt_extended.exceptions import CSRFError, JWTExtendedException
from jwt.exceptions import PyJWTError

from app.accounts import tokens
from app.errors import ApiError


# Before sign-in there is no JWT to carry a CSRF value: the forms of those pages post one kept in Flask's
# signed session cookie (the one flash messages use), which another site can neither read nor set.
SIGNED_OUT_CSRF = "console.csrf"


def csrf_failed() -> ApiError:
    return ApiError(400, "csrf_failed", "The form is missing its CSRF token; reload the page and try again.")


def _same(sent: str, expected: str) -> bool:
    return compare_digest(sent.encode(), expected.encode())


def signed_out_csrf_token() -> str:
    """The CSRF value of the forms used before sign-in (sign in, sign up, verify, forgot, reset)."""
    if SIGNED_OUT_CSRF not in session:
        session[SIGNED_OUT_CSRF] = secrets.token_urlsafe(32)
    return session[SIGNED_OUT_CSRF]


def check_signed_out_csrf() -> None:
    """Refuse (400) a form posted before sign-in without this browser's CSRF value."""
    expected = session.get(SIGNED_OUT_CSRF)
    if not expected or not _same(request.form.get("csrf_token", ""), expected):
        raise csrf_failed()


def _cookie_claims(kind: str) -> dict | None:
    """The claims of the `kind` ("access" or "refresh") cookie's token, expired or not; None if absent or forged."""
    encoded = request.cookies.get(current_app.config[f"JWT_{kind.upper()}_COOKIE_NAME"])
    if not encoded:
        return None
    try:
        claims = decode_token(encoded, allow_expired=True)  # the signature is still checked
    except (JWTExtendedException, PyJWTError):
        return None
    return claims if claims.get("type") == kind else None


def end_session() -> None:
    """Revoke the cookies' access and refresh tokens, expired ones too, and clear the cookies.

    Not behind a valid access token: sign-out must work after it expired too (a redirect to sign-in that kept
    the cookies would let the next page renew the session). CSRF is still checked, against the access token's
    own value, which a renewal keeps (see signed_in).
    """
    access, refresh = _cookie_claims("access"), _cookie_claims("refresh")
    if access or refresh:
        sent = request.form.get(current_app.config["JWT_ACCESS_CSRF_FIELD_NAME"], "")
        if access is None or not _same(sent, access["csrf"]):
            raise csrf_failed()
    # On every answer from here, the error page of a revocation that failed (503) too: the browser signs out.
    after_this_request(lambda response: unset_jwt_cookies(response) or response)
    for claims in (access, refresh):
        if claims:
            tokens.revoke(claims)


def _verify(refresh=False) -> bool:
    # flask-jwt-extended compares the posted CSRF value with hmac.compare_digest, which raises
    # TypeError (a 500) for a str that is not ASCII; no value we hand out is.
    if not request.form.get(current_app.config["JWT_ACCESS_CSRF_FIELD_NAME"], "").isascii():
        raise csrf_failed()
    try:
        verify_jwt_in_request(refresh=refresh, locations=["cookies"])
        return True
    except CSRFError:
        raise csrf_failed() from None
    except (JWTExtendedException, PyJWTError):
        return False


def signed_in(view):
    """Run the view for a signed-in user (g.user_id, g.csrf_token); anybody else is sent to sign in."""

    @wraps(view)
    def wrapper(*args, **kwargs):
        if _verify():
            g.user_id, g.csrf_token = get_jwt_identity(), get_jwt()["csrf"]
        elif request.method == "GET" and _verify(refresh=True):
            # The access token expired (15 minutes): a new one from the refresh cookie, as /api/auth/refresh does.
            # It keeps the expired token's CSRF value: a page open across the renewal (the live tail renews from
            # its poll) still posts that value from its forms, and a new one would make them all fail.
            g.user_id = get_jwt_identity()
            expired = _cookie_claims("access")
            kept = {"csrf": expired["csrf"]} if expired and expired["sub"] == g.user_id else None
            access = create_access_token(identity=g.user_id, additional_claims=kept)
            g.csrf_token = decode_token(access)["csrf"]
            after_this_request(lambda response: set_access_cookies(response, access) or response)
        else:
            return redirect(url_for("console.sign_in", next=request.full_path.rstrip("?") if request.method == "GET" else None))
        return view(*args, **kwargs)

    return wrapper
