"""One-time codes mailed to users: 6 digits, stored hashed, 15 minutes, 5 attempts, single use."""
import hashlib
import hmac
import secrets
from datetime import datetime, timedelta, timezone

from flask import current_app

from app.errors import ApiError
from app.extensions import db
from app.models import AccountCode, User, utcnow

VERIFY_EMAIL = "verify_email"
RESET_PASSWORD = "reset_password"
CODE_LIFETIME = timedelta(minutes=15)
MAX_ATTEMPTS = 5


def as_utc(moment: datetime) -> datetime:
    """A stored time as an aware UTC datetime (SQLite hands back naive ones)."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def _digest(code: str) -> str:
    # Keyed: a million codes are quickly hashed, so a plain hash of a leaked row gives the code away.
    key = current_app.config["SECRET_KEY"].encode()
    return hmac.new(key, code.encode(), hashlib.sha256).hexdigest()


def issue_code(user: User, purpose: str) -> str:
    """A new code for `user` (added to the session); earlier unused codes of the purpose stop working."""
    now = utcnow()
    db.session.execute(
        db.update(AccountCode)
        .where(AccountCode.user_id == user.id, AccountCode.purpose == purpose, AccountCode.used_at.is_(None))
        .values(used_at=now)
    )
    code = f"{secrets.randbelow(10**6):06d}"
    db.session.add(AccountCode(user_id=user.id, purpose=purpose, code_hash=_digest(code), attempts=0,
                               expires_at=now + CODE_LIFETIME, created_at=now))
    return code


def invalid_code() -> ApiError:
    return ApiError(400, "invalid_code", "The code is wrong, expired or used up; ask for a new one if needed.")


def consume_code(user: User | None, purpose: str, code: str) -> None:
    """Use up `user`'s current code if `code` is it, else count the attempt and raise 400 `invalid_code`.

    The attempt is committed even when the code is wrong, so that a refused try still counts.
    """
    if user is None:
        raise invalid_code()
    # Row lock: two concurrent tries cannot both be counted as the same attempt.
    record = db.session.scalar(
        db.select(AccountCode)
        .where(AccountCode.user_id == user.id, AccountCode.purpose == purpose, AccountCode.used_at.is_(None))
        .order_by(AccountCode.created_at.desc())
        .limit(1)
        .with_for_update()
    )
    now = utcnow()
    if record is None or as_utc(record.expires_at) <= now or record.attempts >= MAX_ATTEMPTS:
        db.session.rollback()
        raise invalid_code()
    record.attempts += 1
    if not hmac.compare_digest(record.code_hash, _digest(code)):
        db.session.commit()
        raise invalid_code()
    record.used_at = now
