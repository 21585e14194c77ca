"""The console's session: the accounts' JWTs in HttpOnly cookies, refreshed quietly, CSRF on every change."""
from functools import wraps

from flask import after_this_request, g, redirect, request, url_for
from flask_jwt_extended import (create_access_token, decode_token, get_jwt, get_jwt_identity, set_access_cookies,
                                verify_jwt_in_request)
from flask_jwt_extended.exceptions import CSRFError, JWTExtendedException
from jwt.exceptions import PyJWTError

from app.errors import ApiError


def _verify(refresh=False) -> bool:
    try:
        verify_jwt_in_request(refresh=refresh, locations=["cookies"])
        return True
    except CSRFError:
        raise ApiError(400, "csrf_failed", "The form is missing its CSRF token; reload the page and try again.") \
            from None
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
