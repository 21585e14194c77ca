"""Accounts: register, verify the address, log in, reset the password. One function per route."""
from sqlalchemy.exc import IntegrityError

from app.accounts import codes, passwords, tokens
from app.accounts.messages import queue_code_mail
from app.errors import ApiError
from app.extensions import db
from app.models import User, utcnow


def normalise_email(email: str) -> str:
    return email.strip().lower()


def find_user(email: str) -> User | None:
    return db.session.scalar(db.select(User).where(User.email == normalise_email(email)))


def user_view(user: User) -> dict:
    return {"id": user.id, "email": user.email, "email_verified": user.email_verified_at is not None,
            "created_at": user.created_at}


def _taken() -> ApiError:
    return ApiError(409, "email_taken", "An account with this address exists already; log in, or reset the password.")


def register(email: str, password: str) -> User:
    """Create an unverified user and mail them a verification code."""
    if find_user(email) is not None:
        raise _taken()
    user = User(email=normalise_email(email), password_hash=passwords.hash_password(password))
    db.session.add(user)
    # Queued before the commit: if the queue refuses, nothing was made and the client may simply retry.
    try:
        db.session.flush()  # a concurrent request may have taken the address since the check
        queue_code_mail(user.email, codes.VERIFY_EMAIL, codes.issue_code(user, codes.VERIFY_EMAIL))
        db.session.commit()
    except IntegrityError:  # the same address registered by a concurrent request
        db.session.rollback()
        raise _taken() from None
    except ApiError:
        db.session.rollback()
        raise
    return user


def resend_verification(email: str) -> None:
    """Mail a new verification code to an unverified account; nothing for others (no enumeration)."""
    user = find_user(email)
    if user is None or user.email_verified_at is not None:
        return
    queue_code_mail(user.email, codes.VERIFY_EMAIL, codes.issue_code(user, codes.VERIFY_EMAIL))
    db.session.commit()


def verify_email(email: str, code: str) -> User:
    """Mark the address verified if `code` is its current verification code."""
    user = find_user(email)
    # A verified address has no live code left: any code is refused, so that this route does not
    # tell who is verified.
    codes.consume_code(user, codes.VERIFY_EMAIL, code)
    user.email_verified_at = utcnow()
    db.session.commit()
    return user


def bad_credentials() -> ApiError:
    return ApiError(401, "invalid_credentials", "The address or the password is wrong.")


def login(email: str, password: str) -> dict:
    """Tokens for a verified user whose password matches."""
    user = find_user(email)
    if user is None:
        passwords.burn_verification(password)  # the same time as a wrong password for a real account
        raise bad_credentials()
    if not passwords.verify_password(user.password_hash, password):
        raise bad_credentials()
    if passwords.needs_rehash(user.password_hash):
        user.password_hash = passwords.hash_password(password)
        db.session.commit()
    if user.email_verified_at is None:
        raise ApiError(403, "email_not_verified",
                       "Verify the address first with the code we mailed (POST /api/auth/verify-email).")
    return tokens.issue_tokens(user)


def forgot_password(email: str) -> None:
    """Mail a reset code if the account exists; nothing otherwise (the answer is the same)."""
    user = find_user(email)
    if user is None:
        return
    try:
        queue_code_mail(user.email, codes.RESET_PASSWORD, codes.issue_code(user, codes.RESET_PASSWORD))
    except ApiError:
        # The answer stays 202: a 503 here, and only here, would tell that the account exists.
        # queue_code_mail logged it; the person asks again when no mail comes.
        db.session.rollback()
        return
    db.session.commit()


def reset_password(email: str, code: str, new_password: str) -> User:
    """Set a new password with a reset code; every token issued before now stops working."""
    user = find_user(email)
    codes.consume_code(user, codes.RESET_PASSWORD, code)
    user.password_hash = passwords.hash_password(new_password)
    user.tokens_valid_after = utcnow()
    # The code came to this mailbox: the address is proven as well as by a verification code.
    user.email_verified_at = user.email_verified_at or user.tokens_valid_after
    db.session.commit()
    return user


def get_user(user_id: str) -> User:
    user = db.session.get(User, user_id)
    if user is None:  # deleted after its token was checked
        raise ApiError(401, "token_revoked", "The token's account no longer exists.")
    return user
