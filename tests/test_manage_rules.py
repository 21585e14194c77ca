"""Rules over HTTP (JWT): list, create, read, replace, patch (enable / disable), delete; bad input changes nothing."""
import json
import uuid

import pytest

from app.manage.app_rules import MAX_RULES_PER_APP
from tests.conftest import sql

RULE = {"name": "amount required", "event_name": "purchase", "action": "reject",
        "schema": {"$defs": {"money": {"type": "number", "minimum": 0}}, "required": ["amount"],
                   "properties": {"amount": {"$ref": "#/$defs/money"}}}}


@pytest.fixture
def owner(make_user):
    return make_user()[1]


@pytest.fixture
def shop(client, owner):
    """(app id, key, rules URL) of an app of `owner`."""
    body = client.post("/api/apps", json={"name": "Shop"}, headers=owner).get_json()
    return body["id"], body["api_key"], f"/api/apps/{body['id']}/rules"


@pytest.fixture
def rule(client, owner, shop):
    response = client.post(shop[2], json=RULE, headers=owner)
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()


def purchase(client, shop, **fields):
    app_id, key, _ = shop
    return client.post(f"/api/logs/{app_id}", json={"event_name": "purchase", **fields}, headers={"X-API-Key": key})


def test_create_list_read(client, owner, shop, rule):
    assert set(rule) == {"id", "app_id", "name", "event_name", "schema", "action", "enabled", "created_at",
                         "updated_at"}
    assert {k: rule[k] for k in RULE} == RULE and rule["enabled"] is True and rule["app_id"] == shop[0]
    assert client.get(shop[2], headers=owner).get_json() == {"rules": [rule]}
    assert client.get(f"{shop[2]}/{rule['id']}", headers=owner).get_json() == rule
    assert sql("SELECT name, event_name, action, enabled, schema FROM rules") == [
        (RULE["name"], "purchase", "reject", True, RULE["schema"])]


def test_each_change_applies_to_the_next_event(client, owner, shop, rule):
    url = f"{shop[2]}/{rule['id']}"
    assert purchase(client, shop).status_code == 422
    assert purchase(client, shop, amount=3).status_code == 202

    disabled = client.patch(url, json={"enabled": False}, headers=owner)
    assert disabled.status_code == 200 and disabled.get_json()["enabled"] is False
    assert disabled.get_json()["name"] == RULE["name"]  # a patch leaves the other fields alone
    assert purchase(client, shop).status_code == 202
    assert client.patch(url, json={"enabled": True}, headers=owner).status_code == 200
    assert purchase(client, shop).status_code == 422

    warn = client.patch(url, json={"action": "warn"}, headers=owner)
    assert warn.get_json()["action"] == "warn"
    accepted = purchase(client, shop)
    assert accepted.status_code == 202 and accepted.get_json()["validation"]["status"] == "warning"

    replaced = client.put(url, json={"name": "needs user", "action": "reject", "schema": {"required": ["user_id"]}},
                          headers=owner)
    assert replaced.status_code == 200
    body = replaced.get_json()
    assert (body["event_name"], body["enabled"], body["schema"]) == (None, True, {"required": ["user_id"]})
    assert purchase(client, shop, user_id=1).status_code == 202
    assert purchase(client, shop).status_code == 422

    assert client.delete(url, headers=owner).status_code == 204
    assert purchase(client, shop).status_code == 202
    assert client.get(url, headers=owner).status_code == 404
    assert client.get(shop[2], headers=owner).get_json() == {"rules": []}


def test_a_rule_of_another_app_of_mine_is_404_there(client, owner, shop, rule):
    other = client.post("/api/apps", json={"name": "Other"}, headers=owner).get_json()["id"]
    for method in ("GET", "PUT", "PATCH", "DELETE"):
        response = client.open(f"/api/apps/{other}/rules/{rule['id']}", method=method,
                               json=RULE if method == "PUT" else {"enabled": False}, headers=owner)
        assert response.status_code == 404 and response.get_json()["error"]["code"] == "rule_not_found"
    assert sql("SELECT app_id, enabled FROM rules") == [(shop[0], True)]


@pytest.mark.parametrize("rule_id", ["nope", "7d0c1a52-3f1e-4b8e-9a55-0c2f4e6b9d11", "%00", "r" * 3000])
def test_bad_or_unknown_rule_ids_are_404(client, owner, shop, rule_id):
    for method in ("GET", "PUT", "PATCH", "DELETE"):
        response = client.open(f"{shop[2]}/{rule_id}", method=method, json=RULE, headers=owner)
        assert response.status_code == 404 and response.get_json()["error"]["code"] == "rule_not_found"


@pytest.mark.parametrize(
    "schema, reason",
    [
        ({"type": "nope"}, "not a valid JSON Schema"),
        ({"properties": {"a": {"minLength": -1}}}, "not a valid JSON Schema"),
        ({"pattern": "(unclosed"}, "not a valid JSON Schema"),
        ({"$ref": "https://example.com/schema.json"}, "remote $ref is not allowed"),
        ({"properties": {"a": {"$ref": "other.json#/x"}}}, "remote $ref is not allowed"),
        ({"$ref": "#/$defs/missing"}, "points to nothing"),
        ([1, 2], "schema must be a JSON object"),
        ("string", "schema must be a JSON object"),
        (None, "null"),
    ],
)
def test_an_invalid_schema_is_422_with_the_reason(client, owner, shop, rule, schema, reason):
    for method, url in (("POST", shop[2]), ("PUT", f"{shop[2]}/{rule['id']}"), ("PATCH", f"{shop[2]}/{rule['id']}")):
        before = sql("SELECT * FROM rules")
        response = client.open(url, method=method, json={**RULE, "schema": schema}, headers=owner)
        assert response.status_code == 422, (method, response.get_data(as_text=True))
        error = response.get_json()["error"]
        assert error["code"] == "invalid_request"
        assert [d["path"] for d in error["details"]] == ["/schema"] and reason in error["details"][0]["message"]
        assert sql("SELECT * FROM rules") == before


@pytest.mark.parametrize(
    "schema, reason",
    [
        ({"allOf": [{"$ref": "#"}]}, "without end"),  # would recurse on the same value for ever
        ({"properties": {"x": {"pattern": "(?=a)a"}}}, "RE2"),  # lookahead: RE2 cannot run it
    ],
)
def test_a_schema_the_validator_cannot_run_is_refused_on_every_write(client, owner, shop, rule, schema, reason):
    url = f"{shop[2]}/{rule['id']}"
    before = sql("SELECT * FROM rules")
    for method, path, body in (("POST", shop[2], {**RULE, "schema": schema}), ("PUT", url, {**RULE, "schema": schema}),
                               ("PATCH", url, {"schema": schema})):
        response = client.open(path, method=method, json=body, headers=owner)
        assert response.status_code == 422, (method, response.get_data(as_text=True))
        answer = response.get_json()
        assert set(answer) == {"error"} and set(answer["error"]) == {"code", "message", "details"}
        assert answer["error"]["code"] == "invalid_request" and answer["error"]["message"]
        [detail] = answer["error"]["details"]
        assert detail["path"] == "/schema" and reason in detail["message"], detail
    assert sql("SELECT * FROM rules") == before
    assert client.get(shop[2], headers=owner).get_json() == {"rules": [rule]}
    assert purchase(client, shop, amount=1, x="b").status_code == 202  # the app's rule is the one it had


def nested(depth):
    schema = {}
    for _ in range(depth):
        schema = {"items": schema}
    return schema


@pytest.mark.parametrize(
    "body, status",
    [
        ({"action": "reject", "schema": {}}, 422),
        ({"name": "", "action": "reject", "schema": {}}, 422),
        ({"name": "x" * 256, "action": "reject", "schema": {}}, 422),
        ({"name": 5, "action": "reject", "schema": {}}, 422),
        ({"name": "r", "action": "block", "schema": {}}, 422),
        ({"name": "r", "schema": {}}, 422),
        ({"name": "r", "action": "warn"}, 422),
        ({"name": "r", "action": "warn", "schema": {}, "event_name": ""}, 422),
        ({"name": "r", "action": "warn", "schema": {}, "event_name": 7}, 422),
        ({"name": "r", "action": "warn", "schema": {}, "event_name": "e" * 256}, 422),
        ({"name": "r", "action": "warn", "schema": {}, "enabled": "yes"}, 422),
        ({"name": "r", "action": "warn", "schema": {}, "enabled": 1}, 422),
        ({"name": "r", "action": "warn", "schema": {}, "app_id": str(uuid.uuid4())}, 422),
        ({"name": "r", "action": "warn", "schema": nested(200)}, 422),
        ({"name": "r", "action": "warn", "schema": {"const": "a\u0000"}}, 400),
        ([RULE], 422),
        ("{not json", 400),
        ('{"name": "r", "action": "warn", "schema": {"maximum": Infinity}}', 400),
        ("[" * 5000, 422),
        ("", 400),
    ],
)
def test_bad_rule_bodies_change_nothing(client, owner, shop, rule, body, status):
    data = body if isinstance(body, str) else json.dumps(body)
    before = sql("SELECT * FROM rules")
    for method, url in (("POST", shop[2]), ("PUT", f"{shop[2]}/{rule['id']}")):
        response = client.open(url, method=method, data=data, content_type="application/json", headers=owner)
        assert response.status_code == status, (method, response.get_data(as_text=True))
        assert response.get_json()["error"]["message"]
    assert sql("SELECT * FROM rules") == before


@pytest.mark.parametrize("body", [{}, {"enabled": "no"}, {"action": "drop"}, {"name": None}, {"id": "x"}])
def test_bad_patches_change_nothing(client, owner, shop, rule, body):
    before = sql("SELECT * FROM rules")
    response = client.patch(f"{shop[2]}/{rule['id']}", json=body, headers=owner)
    assert response.status_code == 422 and response.get_json()["error"]["code"] == "invalid_request"
    assert sql("SELECT * FROM rules") == before


def test_other_media_types_and_oversized_bodies_are_refused(client, owner, shop):
    assert client.post(shop[2], data="x", content_type="text/plain", headers=owner).status_code == 415
    huge = {**RULE, "schema": {"description": "x" * (300 * 1024)}}
    response = client.post(shop[2], json=huge, headers=owner)
    assert response.status_code == 413 and response.get_json()["error"]["code"] == "payload_too_large"
    assert sql("SELECT count(*) FROM rules") == [(0,)]


def test_an_app_holds_a_bounded_number_of_rules(app, client, owner, shop):
    from app.extensions import db
    from app.models import Rule

    with app.app_context():
        db.session.add_all(Rule(app_id=shop[0], name=f"r{n}", schema={}, action="warn")
                           for n in range(MAX_RULES_PER_APP))
        db.session.commit()
    response = client.post(shop[2], json=RULE, headers=owner)
    assert response.status_code == 409 and response.get_json()["error"]["code"] == "too_many_rules"
    assert sql("SELECT count(*) FROM rules") == [(MAX_RULES_PER_APP,)]
