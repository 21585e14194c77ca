"""Operator commands: `flask --app run users|apps|rules|rollups|retention …`."""
import functools
import json

import click
from flask import Flask
from flask.cli import AppGroup

from app import retention, rollups
from app.accounts.passwords import hash_password
from app.errors import ApiError
from app.extensions import db
from app.manage import app_rules, apps
from app.manage.apps import create_app_with_key, new_api_key  # noqa: F401  (tests/conftest.py and older callers)
from app.manage.schemas import AppList, RuleList, RuleOut
from app.models import User, utcnow

users_cli = AppGroup("users", help="Manage users.")
apps_cli = AppGroup("apps", help="Manage apps.")
rules_cli = AppGroup("rules", help="Manage validation rules.")
rollups_cli = AppGroup("rollups", help="Rollups of stored events.")
retention_cli = AppGroup("retention", help="Expiry of stored events.")


def _domain_errors(command):
    """Show a domain error (ApiError) as click's one-line error, exit status 1, no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ApiError as error:
            raise click.ClickException(error.message) from None

    return wrapper


def _echo(document: dict) -> None:
    click.echo(json.dumps(document))


@users_cli.command("create")
@click.argument("email")
@click.option("--password", required=True, help="At least 8 characters.")
@click.option("--verified", is_flag=True, help="Mark the e-mail address as verified.")
def create_user(email, password, verified):
    """Create a user."""
    if len(password) < 8:
        raise click.ClickException("the password needs at least 8 characters")
    if db.session.scalar(db.select(User).where(User.email == email.lower())):
        raise click.ClickException(f"a user with e-mail {email} exists already")
    user = User(email=email.lower(), password_hash=hash_password(password),
                email_verified_at=utcnow() if verified else None)
    db.session.add(user)
    db.session.commit()
    click.echo(json.dumps({"user_id": user.id, "email": user.email}))


@apps_cli.command("create")
@click.argument("name")
@click.option("--owner", required=True, help="E-mail of the owning user.")
@click.option("--retention-days", default=30, type=click.IntRange(1, 3650))
@_domain_errors
def create_app_command(name, owner, retention_days):
    """Create an app and print its id and key (the key is shown only this once)."""
    app, key = apps.add_app(apps.user_by_email(owner), name, retention_days)
    _echo({"app_id": app.id, "api_key": key})


@apps_cli.command("list")
@click.option("--owner", help="Only the apps of the user with this e-mail.")
@_domain_errors
def list_apps_command(owner):
    """List active apps (GET /api/apps), everybody's or one owner's."""
    owner_id = apps.user_by_email(owner).id if owner else None
    _echo(AppList().dump({"apps": apps.list_apps(owner_id)}))


@apps_cli.command("rotate-key")
@click.argument("app_id")
@_domain_errors
def rotate_key_command(app_id):
    """Give an app a new key and print it (shown only this once); the old key stops working."""
    app = apps.active_app(app_id)
    _echo({"app_id": app.id, "api_key": apps.rotate_key(app)})


@rules_cli.command("add")
@click.argument("app_id")
@click.option("--file", "rule_file", required=True, type=click.File("r"), help="The rule as JSON.")
@_domain_errors
def add_rule(app_id, rule_file):
    """Add a validation rule to an app (the body of POST /api/apps/<app_id>/rules)."""
    app = apps.active_app(app_id)
    try:
        body = json.load(rule_file)
    except json.JSONDecodeError as error:
        raise click.ClickException(f"the rule file is not JSON: {error}") from None
    rule = app_rules.create_rule(app, app_rules.validate_rule(body))
    _echo({"rule_id": rule.id})


@rules_cli.command("list")
@click.argument("app_id")
@_domain_errors
def list_rules_command(app_id):
    """List an app's rules (GET /api/apps/<app_id>/rules)."""
    _echo(RuleList().dump({"rules": app_rules.list_rules(apps.active_app(app_id))}))


@rules_cli.command("disable")
@click.argument("rule_id")
@_domain_errors
def disable_rule_command(rule_id):
    """Disable a rule (PATCH {"enabled": false}); print it."""
    _echo(RuleOut().dump(app_rules.change_rule(app_rules.rule_by_id(rule_id), {"enabled": False})))


@rollups_cli.command("refresh")
def refresh_rollups():
    """Bring the rollups current now (what the batch_processing workers do every 30 s)."""
    click.echo(json.dumps(rollups.refresh()))


@retention_cli.command("purge")
def purge_expired():
    """Remove the events past their app's retention now (the beat task's job)."""
    click.echo(json.dumps(retention.purge()))


def register_commands(app: Flask) -> None:
    for group in (users_cli, apps_cli, rules_cli, rollups_cli, retention_cli):
        app.cli.add_command(group)
