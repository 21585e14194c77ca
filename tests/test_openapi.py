"""The OpenAPI document: valid, covering every route and its error codes; the docs page; schemathesis."""
import collections
import re

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

# Served for the document itself, not part of the API it describes.
UNDOCUMENTED = {"/api/openapi.json", "/api/docs", "/api/docs/assets/<path:filename>"}


@pytest.fixture
def document(client):
    answer = client.get("/api/openapi.json")
    assert answer.status_code == 200
    return answer.json


def test_the_document_is_valid_openapi(document):
    validate(document)
    assert document["openapi"].startswith("3.")


def _openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule)


def test_every_route_of_the_app_is_in_the_document(app, document):
    for rule in app.url_map.iter_rules():
        if rule.rule in UNDOCUMENTED or rule.rule.startswith("/console"):  # HTML pages, not the JSON API
            continue
        operations = document["paths"].get(_openapi_path(rule.rule))
        assert operations is not None, f"{rule.rule} is not in the OpenAPI document"
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in operations, f"{method} {rule.rule} is not in the OpenAPI document"


def test_every_error_response_names_its_codes_and_uses_the_error_shape(document):
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":
                continue
            for status, response in operation["responses"].items():
                if status == "default" or int(status) < 400:
                    continue
                if "$ref" in response:  # a shared response: #/components/responses/NAME
                    response = document["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
                assert re.search(r"`[a-z_]+`", response["description"]), (method, path, status)
                schema = response["content"]["application/json"]["schema"]
                assert "$ref" in schema or "properties" in schema, (method, path, status)


def test_ingestion_routes_carry_their_contract_codes(document):
    text = str(document["paths"]["/api/logs/{app_id}"]["post"]["responses"])
    for code in ("invalid_json", "not_an_object", "invalid_encoding", "invalid_api_key", "app_not_found",
                 "payload_too_large", "unsupported_media_type", "unsupported_encoding", "invalid_event",
                 "nesting_too_deep", "validation_failed", "rate_limited", "queue_unavailable", "service_unavailable"):
        assert f"`{code}`" in text, code
    assert document["paths"]["/api/logs/{app_id}"]["post"]["security"] == [{"apiKeyAuth": []}]
    assert "`event_not_found`" in str(document["paths"]["/api/logs/{app_id}/events/{event_id}"]["get"]["responses"])
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                                     "description": schemes["bearerAuth"]["description"]}
    assert schemes["apiKeyAuth"]["in"] == "header" and schemes["apiKeyAuth"]["name"] == "X-API-Key"
    assert document["paths"]["/api/auth/me"]["get"]["security"] == [{"bearerAuth": []}]


def test_the_docs_page_and_its_assets_are_served_by_intake(client):
    page = client.get("/api/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(asset.startswith("/api/docs/assets/") for asset in assets), assets
    assert "/api/openapi.json" in html
    for asset in assets:
        answer = client.get(asset)
        assert answer.status_code == 200 and len(answer.data) > 1000, asset
    assert client.get("/api/docs/assets/LICENSE").status_code == 200


TOKEN_ROUTES = ("/api/auth/me", "/api/auth/logout", "/api/auth/refresh")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 8  # per operation and mode: the whole run stays under a minute on a loaded machine


def test_generated_requests_get_no_5xx_and_answers_that_match_the_document(app, make_user):
    """schemathesis over every operation the document has (valid and invalid requests)."""
    from flask_jwt_extended import create_refresh_token

    def token_for(path):
        # Token routes also get a real token of the right kind, so that their success paths are reached.
        user_id, headers = make_user()
        if path == "/api/auth/refresh":
            with app.app_context():
                headers = {"Authorization": f"Bearer {create_refresh_token(identity=user_id)}"}
        return headers

    def owned(case):
        """A user of their own with an app, its key and a rule, put in the case where it names them.

        Without it every app, rule and event operation would only ever answer 401 or 404, and
        their success bodies would never be checked against the document.
        """
        from app.extensions import db
        from app.manage import app_rules, apps

        user_id, headers = make_user()
        with app.app_context():
            owner = db.session.get(apps.User, user_id)
            owned_app, key = apps.add_app(owner, "fuzzed")
            rule = app_rules.create_rule(owned_app, {"name": "r", "event_name": None, "action": "warn", "enabled": True,
                                                     "schema": {"type": "object"}})
            app_id, rule_id = owned_app.id, rule.id
        parameters = case.path_parameters or {}
        if "app_id" in parameters:
            parameters["app_id"] = app_id
        if "rule_id" in parameters:
            parameters["rule_id"] = rule_id
        return {**headers, "X-API-Key": key}

    saved = {key: app.config[key] for key in ("AUTH_RATE_LIMIT_PER_IP", "AUTH_RATE_LIMIT_PER_ACCOUNT")}
    app.config.update({key: "100000/minute" for key in saved})  # reach the routes' own checks
    try:
        schema = schemathesis.openapi.from_wsgi("/api/openapi.json", app)
        operations = [result.ok() for result in schema.get_all_operations()]
        answered = collections.defaultdict(set)
        assert len(operations) >= 15
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck), phases=[Phase.generate])
                def run(case):
                    headers = None
                    if mode == GenerationMode.POSITIVE and case.path in TOKEN_ROUTES:
                        headers = token_for(case.path)
                    elif mode == GenerationMode.POSITIVE and "{app_id}" in case.path:
                        headers = owned(case)
                    response = case.call_and_validate(headers=headers, checks=CHECKS)
                    answered[operation.label].add(response.status_code // 100)

                try:
                    run()
                except Unsatisfiable:
                    # Nothing to make invalid (e.g. GET /health has no parameters).
                    assert mode == GenerationMode.NEGATIVE, operation.label
    finally:
        app.config.update(saved)
    # Every operation was reached, and the success paths of many, not only their refusals.
    assert set(answered) == {operation.label for operation in operations}
    succeeded = sorted(label for label, classes in answered.items() if 2 in classes)
    assert len(succeeded) >= 8, succeeded
    for label in ("GET /api/apps/{app_id}", "GET /api/apps/{app_id}/rules", "GET /api/apps/{app_id}/events",
                  "GET /api/apps/{app_id}/stats", "GET /api/apps/{app_id}/rules/{rule_id}"):
        assert 2 in answered[label], (label, answered[label])
