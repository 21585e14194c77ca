"""Operator CLI (API.md section 8): users create, apps create, rules add, on the real database."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, sql


@pytest.fixture
def cli(runner):
    def invoke(*args):
        return runner.invoke(args=list(args))

    return invoke


@pytest.fixture
def owner(cli):
    result = cli("users", "create", "Owner@Example.com", "--password", "s3cret-pass", "--verified")
    assert result.exit_code == 0, result.output
    return "owner@example.com"


@pytest.fixture
def created_app(cli, owner):
    result = cli("apps", "create", "Shop", "--owner", owner)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def write_rule(tmp_path, body, name="rule.json"):
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return str(path)


# --- users create -------------------------------------------------------------------------


def test_users_create_stores_a_user(cli):
    result = cli("users", "create", "Ada@Example.com", "--password", "correct horse")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed["email"] == "ada@example.com"
    [(user_id, email, password_hash, verified)] = sql(
        "SELECT id, email, password_hash, email_verified_at IS NOT NULL FROM users")
    assert (user_id, email, verified) == (printed["user_id"], "ada@example.com", False)
    assert "correct horse" not in password_hash


def test_users_create_verified(cli, owner):
    assert sql("SELECT email_verified_at IS NOT NULL FROM users WHERE email = %s", owner) == [(True,)]


def test_users_create_refuses_a_short_password_and_a_taken_email(cli, owner):
    short = cli("users", "create", "b@example.com", "--password", "short")
    assert short.exit_code != 0 and "8 characters" in short.output
    taken = cli("users", "create", owner.upper(), "--password", "long enough")
    assert taken.exit_code != 0 and "exists" in taken.output
    assert sql("SELECT count(*) FROM users") == [(1,)]


# --- apps create --------------------------------------------------------------------------


def test_apps_create_prints_id_and_key_as_json(created_app, owner):
    assert set(created_app) == {"app_id", "api_key"}
    [(name, owner_email, key_hash, retention)] = sql(
        "SELECT a.name, u.email, a.api_key_hash, a.retention_days FROM apps a JOIN users u ON u.id = a.owner_id"
        " WHERE a.id = %s", created_app["app_id"])
    assert (name, owner_email, retention) == ("Shop", owner, 30)
    assert created_app["api_key"] not in key_hash, "the key is stored only hashed"


def test_the_printed_key_authenticates_ingestion(client, created_app, redis):
    app_id, key = created_app["app_id"], created_app["api_key"]
    response = client.post(f"/api/logs/{app_id}", json={"event_name": "cli"}, headers={"X-API-Key": key})
    assert response.status_code == 202, response.get_data(as_text=True)
    assert redis.llen("default") == 1
    wrong = client.post(f"/api/logs/{app_id}", json={"event_name": "cli"}, headers={"X-API-Key": key[:-1]})
    assert wrong.status_code == 401


def test_apps_create_with_retention(cli, owner):
    result = cli("apps", "create", "Logs", "--owner", owner, "--retention-days", "90")
    assert result.exit_code == 0, result.output
    assert sql("SELECT retention_days FROM apps WHERE id = %s", json.loads(result.output)["app_id"]) == [(90,)]


@pytest.mark.parametrize("days", ["0", "3651", "many"])
def test_apps_create_refuses_retention_out_of_range(cli, owner, days):
    assert cli("apps", "create", "Logs", "--owner", owner, "--retention-days", days).exit_code != 0
    assert sql("SELECT count(*) FROM apps") == [(0,)]


def test_apps_create_refuses_an_unknown_owner(cli):
    result = cli("apps", "create", "Orphan", "--owner", "nobody@example.com")
    assert result.exit_code != 0 and "nobody@example.com" in result.output
    assert sql("SELECT count(*) FROM apps") == [(0,)]


def test_each_app_gets_its_own_key(cli, owner):
    first = json.loads(cli("apps", "create", "A", "--owner", owner).output)
    second = json.loads(cli("apps", "create", "B", "--owner", owner).output)
    assert first["app_id"] != second["app_id"] and first["api_key"] != second["api_key"]


# --- rules add ----------------------------------------------------------------------------


def test_rules_add_stores_a_rule(cli, created_app, tmp_path):
    body = {"name": "amount required", "event_name": "purchase", "action": "reject",
            "schema": {"$defs": {"money": {"type": "number", "minimum": 0}}, "required": ["amount"],
                       "properties": {"amount": {"$ref": "#/$defs/money"}}}}
    result = cli("rules", "add", created_app["app_id"], "--file", write_rule(tmp_path, body))
    assert result.exit_code == 0, result.output
    rule_id = json.loads(result.output)["rule_id"]
    assert sql("SELECT app_id, name, event_name, action, enabled, schema FROM rules WHERE id = %s", rule_id) == [
        (created_app["app_id"], "amount required", "purchase", "reject", True, body["schema"])]


def test_a_rule_added_by_the_cli_is_enforced(cli, client, created_app, tmp_path):
    app_id, key = created_app["app_id"], created_app["api_key"]
    body = {"name": "needs user", "action": "reject", "schema": {"required": ["user_id"]}, "enabled": True}
    assert cli("rules", "add", app_id, "--file", write_rule(tmp_path, body)).exit_code == 0
    # First use of the app in this process: the cache loads the rule with it.
    response = client.post(f"/api/logs/{app_id}", json={"event_name": "x"}, headers={"X-API-Key": key})
    assert response.status_code == 422
    assert response.get_json()["error"]["details"][0]["rule"] == "needs user"


@pytest.mark.parametrize(
    "schema, message",
    [
        ({"type": "nope"}, "not a valid JSON Schema"),
        ({"properties": {"a": {"minLength": -1}}}, "not a valid JSON Schema"),
        ({"pattern": "(unclosed"}, "not a valid JSON Schema"),
        ({"$ref": "https://example.com/schema.json"}, "remote $ref is not allowed"),
        ({"properties": {"a": {"$ref": "other.json#/x"}}}, "remote $ref is not allowed"),
        ({"$ref": "#/$defs/missing"}, "points to nothing"),
        ([1, 2], "schema must be a JSON object"),
    ],
)
def test_rules_add_refuses_an_invalid_schema_or_remote_ref(cli, created_app, tmp_path, schema, message):
    body = {"name": "bad", "action": "reject", "schema": schema}
    result = cli("rules", "add", created_app["app_id"], "--file", write_rule(tmp_path, body))
    assert result.exit_code != 0
    assert "Error:" in result.output and message in result.output
    assert "Traceback" not in result.output
    assert sql("SELECT count(*) FROM rules") == [(0,)]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"action": "reject", "schema": {}}, "'name'"),
        ({"name": "r", "action": "block", "schema": {}}, "'action'"),
        ({"name": "r", "action": "warn", "schema": {}, "event_name": ""}, "'event_name'"),
        ({"name": "r", "action": "warn", "schema": {}, "enabled": "yes"}, "'enabled'"),
        ({"name": "r", "action": "warn"}, "schema"),
        ("{not json", "not JSON"),
        ("[]", "a rule is a JSON object"),
    ],
)
def test_rules_add_refuses_a_malformed_rule(cli, created_app, tmp_path, body, message):
    result = cli("rules", "add", created_app["app_id"], "--file", write_rule(tmp_path, body))
    assert result.exit_code != 0
    assert message in result.output
    assert sql("SELECT count(*) FROM rules") == [(0,)]


def test_rules_add_refuses_an_unknown_app(cli, tmp_path):
    result = cli("rules", "add", "no-such-app", "--file", write_rule(tmp_path, {"name": "r", "action": "warn",
                                                                                 "schema": {}}))
    assert result.exit_code != 0 and "no-such-app" in result.output


def test_rules_add_refuses_a_missing_file(cli, created_app, tmp_path):
    result = cli("rules", "add", created_app["app_id"], "--file", str(tmp_path / "absent.json"))
    assert result.exit_code != 0


def test_the_real_flask_command_prints_only_the_json(test_environment, tmp_path):
    def flask(*args):
        done = subprocess.run([sys.executable, "-m", "flask", "--app", "run", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    flask("users", "create", "real@example.com", "--password", "long enough")
    created = flask("apps", "create", "Real", "--owner", "real@example.com")
    assert set(created) == {"app_id", "api_key"}
    rule = flask("rules", "add", created["app_id"], "--file",
                 write_rule(tmp_path, {"name": "r", "action": "warn", "schema": {"type": "object"}}))
    assert sql("SELECT app_id FROM rules WHERE id = %s", rule["rule_id"]) == [(created["app_id"],)]
    rotated = flask("apps", "rotate-key", created["app_id"])
    assert rotated["app_id"] == created["app_id"] and rotated["api_key"] != created["api_key"]


# --- apps list, apps rotate-key, rules list, rules disable: the functions of the HTTP routes --------


def bearer(app, email):
    """Headers with an access token for the user with this e-mail (to compare with the HTTP routes)."""
    from flask_jwt_extended import create_access_token

    [(user_id,)] = sql("SELECT id FROM users WHERE email = %s", email)
    with app.app_context():
        return {"Authorization": f"Bearer {create_access_token(identity=user_id)}"}


def test_apps_list_prints_what_the_route_answers(app, cli, client, owner, created_app):
    assert cli("users", "create", "other@example.com", "--password", "long enough").exit_code == 0
    theirs = json.loads(cli("apps", "create", "Theirs", "--owner", "other@example.com").output)
    everybody = json.loads(cli("apps", "list").output)
    assert [a["id"] for a in everybody["apps"]] == [created_app["app_id"], theirs["app_id"]]
    mine = cli("apps", "list", "--owner", owner.upper())
    assert mine.exit_code == 0, mine.output
    assert json.loads(mine.output) == client.get("/api/apps", headers=bearer(app, owner)).get_json()
    assert [a["name"] for a in json.loads(mine.output)["apps"]] == ["Shop"]
    unknown = cli("apps", "list", "--owner", "nobody@example.com")
    assert unknown.exit_code != 0 and "nobody@example.com" in unknown.output


def test_apps_rotate_key_prints_the_new_key_once_and_the_old_one_stops(cli, client, created_app):
    app_id, old_key = created_app["app_id"], created_app["api_key"]
    ingest = lambda key: client.post(f"/api/logs/{app_id}", json={"event_name": "e"}, headers={"X-API-Key": key})
    assert ingest(old_key).status_code == 202
    result = cli("apps", "rotate-key", app_id)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed["app_id"] == app_id and printed["api_key"] != old_key
    assert ingest(old_key).status_code == 401
    assert ingest(printed["api_key"]).status_code == 202
    assert printed["api_key"] not in json.dumps(sql("SELECT * FROM apps"), default=str)


@pytest.mark.parametrize("command", [("apps", "rotate-key"), ("rules", "list"), ("rules", "add")])
def test_app_commands_refuse_unknown_and_deleted_apps(cli, created_app, tmp_path, command):
    sql("UPDATE apps SET deleted_at = now()")
    rule_file = ("--file", write_rule(tmp_path, {"name": "r", "action": "warn", "schema": {}}))
    extra = rule_file if command[1] == "add" else ()
    for app_id in (created_app["app_id"], "no-such-app"):
        result = cli(*command, app_id, *extra)
        assert result.exit_code != 0 and app_id in result.output and "Traceback" not in result.output
    assert sql("SELECT count(*) FROM rules") == [(0,)]


def test_rules_list_and_disable(app, cli, client, owner, created_app, tmp_path):
    app_id, key = created_app["app_id"], created_app["api_key"]
    body = {"name": "needs user", "action": "reject", "schema": {"required": ["user_id"]}}
    rule_id = json.loads(cli("rules", "add", app_id, "--file", write_rule(tmp_path, body)).output)["rule_id"]
    listed = cli("rules", "list", app_id)
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.output) == client.get(f"/api/apps/{app_id}/rules", headers=bearer(app, owner)).get_json()
    assert [(r["id"], r["enabled"]) for r in json.loads(listed.output)["rules"]] == [(rule_id, True)]
    ingest = lambda: client.post(f"/api/logs/{app_id}", json={"event_name": "e"}, headers={"X-API-Key": key})
    assert ingest().status_code == 422

    disabled = cli("rules", "disable", rule_id)
    assert disabled.exit_code == 0, disabled.output
    printed = json.loads(disabled.output)
    assert (printed["id"], printed["enabled"], printed["name"]) == (rule_id, False, "needs user")
    assert sql("SELECT enabled FROM rules") == [(False,)]
    assert ingest().status_code == 202
    assert cli("rules", "disable", rule_id).exit_code == 0  # disabling twice is no error


@pytest.mark.parametrize("rule_id", ["no-such-rule", "3f1c1b5e-0000-4000-8000-000000000000"])
def test_rules_disable_refuses_an_unknown_rule(cli, rule_id):
    result = cli("rules", "disable", rule_id)
    assert result.exit_code != 0 and "no rule" in result.output and "Traceback" not in result.output
