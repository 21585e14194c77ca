"""Apps and their keys: list, create, read, change, rotate the key, delete.

`owned_app` is the one ownership check: every route under /api/apps/<app_id> starts with it.
"""
import secrets
import uuid

from app import invalidation, lifecycle
from app.errors import ApiError
from app.extensions import db
from app.models import App, User
from app.rules import hash_api_key


def new_api_key() -> str:
    """A fresh app key: `ik_` and 256 random bits."""
    return "ik_" + secrets.token_urlsafe(32)


def canonical_id(value: str) -> str | None:
    """The id as stored (a lowercase UUID), or None for anything that cannot be one (no query then)."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, TypeError):
        return None


def app_not_found(app_id: str) -> ApiError:
    return ApiError(404, "app_not_found", f"There is no app with id {app_id[:100]!r}.")


def active_app(app_id: str) -> App:
    """The app with this id, unless it is unknown or deleted (404 `app_not_found`)."""
    key = canonical_id(app_id)
    app = db.session.get(App, key) if key else None
    if app is None or app.deleted_at is not None:
        raise app_not_found(app_id)
    return app


def owned_app(user_id: str, app_id: str) -> App:
    """The caller's app; another user's app answers exactly like an unknown one (404, never 403)."""
    app = active_app(app_id)
    if app.owner_id != user_id:
        raise app_not_found(app_id)
    return app


def user_by_email(email: str) -> User:
    """The user with this e-mail address (operators name owners by address)."""
    user = db.session.scalar(db.select(User).where(User.email == email.lower()))
    if user is None:
        raise ApiError(404, "user_not_found", f"no user with e-mail {email}")
    return user


def account(user_id: str) -> User:
    """The token's user, who may have been removed since the token was issued."""
    user = db.session.get(User, user_id)
    if user is None:
        raise ApiError(401, "token_revoked", "The token's account no longer exists.")
    return user


def list_apps(owner_id: str | None = None) -> list[App]:
    """Active apps, oldest first: one owner's, or (operators) everybody's."""
    query = db.select(App).where(App.deleted_at.is_(None)).order_by(App.created_at, App.id)
    if owner_id is not None:
        query = query.where(App.owner_id == owner_id)
    return list(db.session.scalars(query))


def create_app_with_key(owner: User, name: str, retention_days: int = 30) -> tuple[App, str]:
    """Add an app for `owner` to the session; return it with its key, which is stored only hashed."""
    key = new_api_key()
    app = App(owner_id=owner.id, name=name, api_key_hash=hash_api_key(key), retention_days=retention_days)
    db.session.add(app)
    return app, key


def add_app(owner: User, name: str, retention_days: int = 30) -> tuple[App, str]:
    """Create an app; its key is returned this once."""
    app, key = create_app_with_key(owner, name, retention_days)
    db.session.commit()
    return app, key


def change_app(app: App, changes: dict) -> App:
    """Rename an app or change its retention (neither matters to ingestion's cache)."""
    for field in ("name", "retention_days"):
        if field in changes:
            setattr(app, field, changes[field])
    db.session.commit()
    return app


def rotate_key(app: App) -> str:
    """Give the app a new key; the old one is refused by every API process once this returns."""
    key = new_api_key()
    app.api_key_hash = hash_api_key(key)
    db.session.commit()
    invalidation.app_changed(app.id)
    return key


def delete_app(app: App) -> None:
    """Mark the app deleted (its key stops working at once) and have its data removed on batch_processing."""
    lifecycle.schedule_app_deletion(app.id)
    invalidation.app_changed(app.id)
