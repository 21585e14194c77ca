"""Account routes under /api/auth: load (schemas) → check → act → respond; the logic is in users, codes, tokens."""
from flask_jwt_extended import get_jwt, jwt_required
from flask_smorest import Blueprint

from app.accounts import schemas, tokens, users
from app.limits import auth_rate_limit
from app.openapi import BEARER, errors

blp = Blueprint("accounts", __name__, url_prefix="/api/auth", description="Accounts: sign up, log in, tokens.")

# Every route: a body that breaks its schema, a body that is not JSON, too many attempts.
BODY_ERRORS = {400: ["invalid_request"], 422: ["invalid_request"], 429: ["rate_limited"]}
TOKEN_ERRORS = {401: ["missing_token", "invalid_token", "token_expired", "token_revoked", "wrong_token_type"],
                429: ["rate_limited"], 503: ["service_unavailable"]}
BEARER_AUTH = {"security": [{BEARER: []}]}


@blp.post("/register")
@auth_rate_limit
@blp.arguments(schemas.CredentialsSchema)
@blp.response(201, schemas.UserSchema)
@errors(blp, {**BODY_ERRORS, 409: ["email_taken"], 503: ["queue_unavailable"]})
def register(body):
    """Create an account and mail a 6-digit verification code to its address."""
    return users.user_view(users.register(body["email"], body["password"]))


@blp.post("/verify-email")
@auth_rate_limit
@blp.arguments(schemas.VerifyEmailSchema)
@blp.response(200, schemas.UserSchema)
@errors(blp, {**BODY_ERRORS, 400: ["invalid_request", "invalid_code"]})
def verify_email(body):
    """Confirm the address with the code from the mail (15 minutes, 5 tries, once)."""
    return users.user_view(users.verify_email(body["email"], body["code"]))


@blp.post("/verify-email/resend")
@auth_rate_limit
@blp.arguments(schemas.EmailSchema)
@blp.response(202, schemas.StatusSchema)
@errors(blp, {**BODY_ERRORS, 503: ["queue_unavailable"]})
def resend_verification(body):
    """Mail a new verification code (the same answer whether or not the account exists)."""
    users.resend_verification(body["email"])
    return {"status": "accepted", "message": "If the address has an unverified account, a new code is on its way."}


@blp.post("/login")
@auth_rate_limit
@blp.arguments(schemas.LoginSchema)
@blp.response(200, schemas.TokensSchema)
@errors(blp, {**BODY_ERRORS, 401: ["invalid_credentials"], 403: ["email_not_verified"]})
def login(body):
    """Exchange address and password for an access and a refresh token."""
    return users.login(body["email"], body["password"])


@blp.post("/refresh")
@jwt_required(refresh=True)
@auth_rate_limit
@blp.response(200, schemas.AccessTokenSchema)
@errors(blp, TOKEN_ERRORS)
@blp.doc(**BEARER_AUTH, description="Send the refresh token (not the access token) as the Bearer token.")
def refresh():
    """A new access token for a refresh token."""
    return tokens.refresh_access_token(tokens.current_user_id())


@blp.post("/logout")
@jwt_required(verify_type=False)
@auth_rate_limit
@blp.response(204)
@errors(blp, TOKEN_ERRORS)
@blp.doc(**BEARER_AUTH, description="Revokes the Bearer token sent (access or refresh) at once.")
def logout():
    """Revoke the token of this request."""
    tokens.revoke(get_jwt())


@blp.post("/password/forgot")
@auth_rate_limit
@blp.arguments(schemas.EmailSchema)
@blp.response(202, schemas.StatusSchema)
@errors(blp, {**BODY_ERRORS, 503: ["queue_unavailable"]})
def forgot_password(body):
    """Mail a reset code (the same answer whether or not the account exists)."""
    users.forgot_password(body["email"])
    return {"status": "accepted", "message": "If the address has an account, a reset code is on its way."}


@blp.post("/password/reset")
@auth_rate_limit
@blp.arguments(schemas.ResetPasswordSchema)
@blp.response(200, schemas.UserSchema)
@errors(blp, {**BODY_ERRORS, 400: ["invalid_request", "invalid_code"]})
def reset_password(body):
    """Set a new password with the mailed code; every token issued before is revoked."""
    return users.user_view(users.reset_password(body["email"], body["code"], body["new_password"]))


@blp.get("/me")
@jwt_required()
@auth_rate_limit
@blp.response(200, schemas.UserSchema)
@errors(blp, TOKEN_ERRORS)
@blp.doc(**BEARER_AUTH)
def me():
    """The user of the access token."""
    return users.user_view(users.get_user(tokens.current_user_id()))
