"""The console's session: the accounts' JWTs in HttpOnly cookies, refreshed quietly, CSRF on every change."""
import secrets
from functools import wraps
from hmac import compare_digest

from flask import after_this_request, g, redirect, request, session, url_for
from flask_jwt_extended import (create_access_token, decode_token, get_jwt, get_jwt_identity, set_access_cookies,
                                verify_jwt_in_request)
from flask_jwt_extended.exceptions import CSRFError, JWTExtendedException
from jwt.exceptions import PyJWTError

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


def _verify(refresh=False) -> bool:
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
            g.user_id = get_jwt_identity()
            access = create_access_token(identity=g.user_id)
            g.csrf_token = decode_token(access)["csrf"]
            after_this_request(lambda response: set_access_cookies(response, access) or response)
        else:
            return redirect(url_for("console.sign_in", next=request.full_path.rstrip("?") if request.method == "GET" else None))
        return view(*args, **kwargs)

    return wrapper
