"""Operator commands: `flask --app run users|apps|rules|rollups|retention …`."""
import json
import secrets

import click
from flask import Flask
from flask.cli import AppGroup
from werkzeug.security import generate_password_hash

from app import retention, rollups
from app.extensions import db
from app.models import App, Rule, User, utcnow
from app.rules import InvalidRuleSchema, check_rule_schema, hash_api_key

users_cli = AppGroup("users", help="Manage users.")
apps_cli = AppGroup("apps", help="Manage apps.")
rules_cli = AppGroup("rules", help="Manage validation rules.")
rollups_cli = AppGroup("rollups", help="Rollups of stored events.")
retention_cli = AppGroup("retention", help="Expiry of stored events.")


def new_api_key() -> str:
    return "ik_" + secrets.token_urlsafe(32)


def create_app_with_key(owner: User, name: str, retention_days: int = 30) -> tuple[App, str]:
    """Add an app for `owner`; return it with its key, which is stored only hashed."""
    key = new_api_key()
    app = App(owner_id=owner.id, name=name, api_key_hash=hash_api_key(key), retention_days=retention_days)
    db.session.add(app)
    return app, key


def validate_rule(body: dict) -> dict:
    """Check a rule body as the rules API takes it; return the fields to store."""
    if not isinstance(body, dict):
        raise click.ClickException("a rule is a JSON object")
    name, action = body.get("name"), body.get("action")
    if not isinstance(name, str) or not 1 <= len(name) <= 255:
        raise click.ClickException("rule 'name' must be a string of 1 to 255 characters")
    if action not in ("reject", "warn"):
        raise click.ClickException("rule 'action' must be 'reject' or 'warn'")
    event_name = body.get("event_name")
    if event_name is not None and (not isinstance(event_name, str) or not 1 <= len(event_name) <= 255):
        raise click.ClickException("rule 'event_name' must be a string of 1 to 255 characters, or null")
    try:
        check_rule_schema(body.get("schema"))
    except InvalidRuleSchema as error:
        raise click.ClickException(str(error)) from None
    enabled = body.get("enabled", True)
    if not isinstance(enabled, bool):
        raise click.ClickException("rule 'enabled' must be true or false")
    return {"name": name, "event_name": event_name, "schema": body["schema"], "action": action, "enabled": enabled}


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
    user = User(email=email.lower(), password_hash=generate_password_hash(password),
                email_verified_at=utcnow() if verified else None)
    db.session.add(user)
    db.session.commit()
    click.echo(json.dumps({"user_id": user.id, "email": user.email}))


@apps_cli.command("create")
@click.argument("name")
@click.option("--owner", required=True, help="E-mail of the owning user.")
@click.option("--retention-days", default=30, type=click.IntRange(1, 3650))
def create_app_command(name, owner, retention_days):
    """Create an app and print its id and key (the key is shown only this once)."""
    user = db.session.scalar(db.select(User).where(User.email == owner.lower()))
    if user is None:
        raise click.ClickException(f"no user with e-mail {owner}")
    app, key = create_app_with_key(user, name, retention_days)
    db.session.commit()
    click.echo(json.dumps({"app_id": app.id, "api_key": key}))


@rules_cli.command("add")
@click.argument("app_id")
@click.option("--file", "rule_file", required=True, type=click.File("r"), help="The rule as JSON.")
def add_rule(app_id, rule_file):
    """Add a validation rule to an app."""
    if db.session.get(App, app_id) is None:
        raise click.ClickException(f"no app with id {app_id}")
    try:
        body = json.load(rule_file)
    except json.JSONDecodeError as error:
        raise click.ClickException(f"the rule file is not JSON: {error}") from None
    rule = Rule(app_id=app_id, **validate_rule(body))
    db.session.add(rule)
    db.session.commit()
    click.echo(json.dumps({"rule_id": rule.id}))


@rollups_cli.command("refresh")
def refresh_rollups():
    """Bring the rollups current now (the beat task's job)."""
    click.echo(json.dumps(rollups.refresh()))


@retention_cli.command("purge")
def purge_expired():
    """Remove the events past their app's retention now (the beat task's job)."""
    click.echo(json.dumps(retention.purge()))


def register_commands(app: Flask) -> None:
    for group in (users_cli, apps_cli, rules_cli, rollups_cli, retention_cli):
        app.cli.add_command(group)
