"""RulesCache against the real database (SQL counted, fake clock) and rule schema checks and violations."""
import threading
import time
from datetime import datetime, timezone

import pytest
from jsonschema import Draft202012Validator
from referencing.exceptions import Unresolvable
from sqlalchemy import event as sa_event
from sqlalchemy.exc import OperationalError

from app.config import Config
from app.extensions import db
from app.models import App, Rule
from app.rules import (
    LOCAL_ONLY,
    NEGATIVE_ENTRIES,
    NEGATIVE_TTL_SECONDS,
    STALE_RECHECK_SECONDS,
    AppEntry,
    InvalidRuleSchema,
    RulesCache,
    RulesUnavailable,
    check_rule_schema,
    compile_rule,
    hash_api_key,
    load_app_entry,
)

TTL = 5.0


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def cache(clock):
    return RulesCache(TTL, clock=clock)


@pytest.fixture
def count_sql(app):
    """Yield a list that collects every SQL statement sent to this run's database."""
    with app.app_context():
        engine = db.engine
    statements = []

    def record(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    sa_event.listen(engine, "before_cursor_execute", record)
    yield statements
    sa_event.remove(engine, "before_cursor_execute", record)


def get(app, cache, app_id):
    """One cache look-up in its own app context, as one request would make it."""
    with app.app_context():
        return cache.get(app_id)


def change(app, function):
    """Change the database in a separate session and commit, as the management API would."""
    with app.app_context():
        function()
        db.session.commit()


def add_rule(app_id, name, action="reject", schema=None, event_name=None, enabled=True):
    db.session.add(Rule(app_id=app_id, name=name, action=action, schema=schema or {"required": ["x"]},
                        event_name=event_name, enabled=enabled))


# --- RulesCache ---------------------------------------------------------------------------


def test_first_lookup_loads_app_and_rules_from_the_database(app, cache, make_app, count_sql):
    app_id, key = make_app(rules=[{"name": "r1", "schema": {"required": ["x"]}, "action": "reject"}])
    count_sql.clear()
    entry = get(app, cache, app_id)
    assert count_sql, "a miss must read the database"
    assert entry.id == app_id
    assert entry.key_matches(key)
    assert [r.name for r in entry.rules] == ["r1"]
    assert (cache.hits, cache.misses) == (0, 1)


def test_cache_hit_issues_no_sql(app, cache, clock, make_app, count_sql):
    app_id, _ = make_app()
    first = get(app, cache, app_id)
    count_sql.clear()
    for _ in range(5):
        clock.advance(0.9)
        assert get(app, cache, app_id) is first
    assert count_sql == []
    assert (cache.hits, cache.misses) == (5, 1)


def test_rule_change_is_seen_only_after_the_ttl(app, cache, clock, make_app, count_sql):
    app_id, _ = make_app()
    assert get(app, cache, app_id).rules == ()

    change(app, lambda: add_rule(app_id, "new_rule"))
    clock.advance(TTL - 0.01)
    count_sql.clear()
    assert get(app, cache, app_id).rules == (), "the cached entry is used until the TTL has passed"
    assert count_sql == []

    clock.advance(0.01)
    assert [r.name for r in get(app, cache, app_id).rules] == ["new_rule"]
    assert count_sql, "an expired entry is reloaded"


def test_disabled_and_deleted_rules_disappear_after_the_ttl(app, cache, clock, make_app):
    app_id, _ = make_app(rules=[{"name": "a", "schema": {}, "action": "warn"},
                                {"name": "b", "schema": {}, "action": "reject"}])
    assert {r.name for r in get(app, cache, app_id).rules} == {"a", "b"}

    def disable_a_delete_b():
        db.session.execute(db.update(Rule).where(Rule.app_id == app_id, Rule.name == "a").values(enabled=False))
        db.session.execute(db.delete(Rule).where(Rule.app_id == app_id, Rule.name == "b"))

    change(app, disable_a_delete_b)
    assert {r.name for r in get(app, cache, app_id).rules} == {"a", "b"}
    clock.advance(TTL)
    assert get(app, cache, app_id).rules == ()


def test_disabled_rules_are_never_loaded(app, cache, make_app):
    app_id, _ = make_app(rules=[{"name": "off", "schema": {}, "action": "reject", "enabled": False},
                                {"name": "on", "schema": {}, "action": "reject"}])
    assert [r.name for r in get(app, cache, app_id).rules] == ["on"]


def test_rotated_key_works_only_after_the_ttl(app, cache, clock, make_app):
    app_id, old_key = make_app()
    assert get(app, cache, app_id).key_matches(old_key)

    def rotate():
        db.session.get(App, app_id).api_key_hash = hash_api_key("ik_new")

    change(app, rotate)
    assert get(app, cache, app_id).key_matches(old_key)
    clock.advance(TTL)
    entry = get(app, cache, app_id)
    assert entry.key_matches("ik_new") and not entry.key_matches(old_key)


def test_deleted_app_is_unknown_after_the_ttl(app, cache, clock, make_app):
    app_id, _ = make_app()
    assert get(app, cache, app_id) is not None

    def delete():
        db.session.get(App, app_id).deleted_at = datetime.now(timezone.utc)

    change(app, delete)
    clock.advance(TTL)
    assert get(app, cache, app_id) is None


def test_unknown_apps_are_cached_too(app, cache, clock, count_sql):
    count_sql.clear()
    assert get(app, cache, "no-such-app") is None
    assert count_sql
    count_sql.clear()
    assert get(app, cache, "no-such-app") is None
    assert count_sql == []
    assert (cache.hits, cache.misses) == (1, 1)

    clock.advance(TTL)
    assert get(app, cache, "no-such-app") is None
    assert count_sql, "an unknown app is looked up again after the TTL"


def test_app_created_after_a_miss_is_found_after_the_ttl(app, cache, clock, make_app):
    app_id, _ = make_app()
    with app.app_context():  # hide it: the cache first sees it as unknown
        db.session.execute(db.update(App).where(App.id == app_id).values(deleted_at=datetime.now(timezone.utc)))
        db.session.commit()
    assert get(app, cache, app_id) is None
    with app.app_context():
        db.session.execute(db.update(App).where(App.id == app_id).values(deleted_at=None))
        db.session.commit()
    assert get(app, cache, app_id) is None
    clock.advance(TTL)
    assert get(app, cache, app_id) is not None


def test_entries_expire_per_app(app, cache, clock, make_app, count_sql):
    first, _ = make_app()
    get(app, cache, first)
    clock.advance(TTL / 2)
    second, _ = make_app()
    get(app, cache, second)
    clock.advance(TTL / 2)
    count_sql.clear()
    get(app, cache, second)
    assert count_sql == []
    get(app, cache, first)
    assert count_sql


def test_the_apps_own_cache_uses_rules_cache_ttl(app):
    assert app.extensions["intake.rules"].ttl == app.config["RULES_CACHE_TTL"] == 1


def test_key_matching(app, cache, make_app):
    app_id, key = make_app()
    entry = get(app, cache, app_id)
    assert entry.key_matches(key)
    assert not entry.key_matches(None)
    assert not entry.key_matches("")
    assert not entry.key_matches(key + "x")


def test_rules_for_an_event_name(app, cache, make_app):
    app_id, _ = make_app(rules=[{"name": "all", "schema": {}, "action": "reject"},
                                {"name": "signup_only", "schema": {}, "action": "reject", "event_name": "signup"}])
    entry = get(app, cache, app_id)
    assert sorted(r.name for r in entry.rules_for("signup")) == ["all", "signup_only"]
    assert [r.name for r in entry.rules_for("login")] == ["all"]


# --- check_rule_schema --------------------------------------------------------------------


@pytest.mark.no_clean  # touches neither the database nor Redis
@pytest.mark.parametrize(
    "schema",
    [
        {"type": "nope"},
        {"type": 5},
        {"minimum": "ten"},
        {"required": "user"},
        {"properties": ["a"]},
        {"pattern": "("},
        {"properties": {"a": {"maxLength": -1}}},
        {"allOf": {}},
        [],
        "object",
        None,
        42,
    ],
)
def test_invalid_schemas_are_refused(schema):
    with pytest.raises(InvalidRuleSchema):
        check_rule_schema(schema)


@pytest.mark.no_clean  # touches neither the database nor Redis
@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "https://example.com/schema.json"},
        {"$ref": "http://example.com/schema.json#/$defs/a"},
        {"$ref": "other.json"},
        {"$ref": "/etc/passwd"},
        {"$ref": "urn:example:thing"},
        {"properties": {"user": {"$ref": "https://example.com/user.json"}}},
        {"items": {"allOf": [{"type": "object"}, {"$ref": "file:///tmp/x.json"}]}},
        {"$defs": {"a": {"$ref": "https://example.com/a"}}},
        {"$dynamicRef": "https://example.com/meta"},
    ],
)
def test_remote_refs_are_refused(schema):
    with pytest.raises(InvalidRuleSchema, match="remote"):
        check_rule_schema(schema)


@pytest.mark.no_clean  # touches neither the database nor Redis
@pytest.mark.parametrize(
    "schema",
    [
        {},
        True,
        {"type": "object", "required": ["event_name"], "properties": {"price": {"type": "number", "minimum": 0}}},
        {"$defs": {"id": {"type": "string"}}, "properties": {"user": {"$ref": "#/$defs/id"}}},
        {"$defs": {"id": {"$anchor": "ident", "type": "string"}}, "properties": {"user": {"$ref": "#ident"}}},
        {"$id": "https://example.com/root", "$defs": {"n": {"type": "integer"}}, "items": {"$ref": "#/$defs/n"}},
        {"properties": {"child": {"$ref": "#"}}},
        {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object"},
    ],
)
def test_valid_schemas_and_local_refs_are_accepted(schema):
    check_rule_schema(schema)


@pytest.mark.no_clean  # touches neither the database nor Redis
@pytest.mark.parametrize("schema", [{"$ref": "#/$defs/missing"}, {"properties": {"a": {"$ref": "#nowhere"}}}])
def test_local_refs_that_point_to_nothing_are_refused(schema):
    with pytest.raises(InvalidRuleSchema, match="points to nothing"):
        check_rule_schema(schema)


@pytest.mark.no_clean  # touches neither the database nor Redis
def test_local_ref_is_followed_when_validating():
    schema = {"$defs": {"id": {"type": "string"}}, "properties": {"user": {"$ref": "#/$defs/id"}}}
    rule = compile_rule(Rule(name="ids", event_name=None, action="reject", schema=schema))
    assert rule.violations({"user": "u1"}) == []
    assert [v["path"] for v in rule.violations({"user": 1})] == ["/user"]


@pytest.mark.no_clean  # touches neither the database nor Redis
def test_a_stored_remote_ref_is_never_fetched():
    validator = Draft202012Validator({"$ref": "http://127.0.0.1:9/schema.json"}, registry=LOCAL_ONLY)
    with pytest.raises(Unresolvable):
        list(validator.iter_errors({}))


# --- violations ---------------------------------------------------------------------------


@pytest.mark.no_clean  # touches neither the database nor Redis
def test_violations_carry_pointer_message_and_rule_name():
    schema = {
        "type": "object",
        "required": ["event_name", "user"],
        "properties": {
            "items": {"type": "array", "items": {"type": "integer"}},
            "meta": {"type": "object", "properties": {"a/b": {"type": "string"}, "c~d": {"maximum": 1}}},
        },
    }
    rule = compile_rule(Rule(name="shape", event_name=None, action="reject", schema=schema))
    violations = rule.violations({"event_name": "x", "items": [1, 2, "three"], "meta": {"a/b": 1, "c~d": 5}})
    by_path = {v["path"]: v for v in violations}
    assert set(by_path) == {"", "/items/2", "/meta/a~1b", "/meta/c~0d"}
    assert all(v["rule"] == "shape" for v in violations)
    assert "'user' is a required property" in by_path[""]["message"]
    assert "'three' is not of type 'integer'" in by_path["/items/2"]["message"]
    assert "5 is greater than the maximum of 1" in by_path["/meta/c~0d"]["message"]


@pytest.mark.no_clean  # touches neither the database nor Redis
def test_no_violations_for_a_valid_event():
    rule = compile_rule(Rule(name="r", event_name=None, action="warn", schema={"required": ["a"]}))
    assert rule.violations({"a": 1}) == []


class FlakyLoader:
    """The real loader, until `down` is set: then it fails as an unreachable database does."""

    def __init__(self):
        self.down = False
        self.calls = 0

    def __call__(self, app_id):
        self.calls += 1
        if self.down:
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))
        return load_app_entry(app_id)


def test_database_outage_serves_the_cached_entry_and_rechecks_soon(app, clock, make_app):
    loader = FlakyLoader()
    cache = RulesCache(TTL, loader=loader, clock=clock)
    app_id, key = make_app()
    entry = get(app, cache, app_id)
    loader.down = True
    clock.advance(TTL + 0.1)
    assert get(app, cache, app_id) == entry  # stale, but ingestion goes on
    calls = loader.calls
    assert get(app, cache, app_id) == entry and loader.calls == calls  # not a query per request
    clock.advance(STALE_RECHECK_SECONDS + 0.1)
    loader.down = False
    assert get(app, cache, app_id) == entry and loader.calls == calls + 1


def test_database_outage_for_an_uncached_app_is_reported(app, clock):
    loader = FlakyLoader()
    loader.down = True
    with pytest.raises(RulesUnavailable):
        get(app, RulesCache(TTL, loader=loader, clock=clock), "never-seen")


def test_database_outage_gives_503_not_500_for_an_uncached_app(app, client, make_app):
    app_id, key = make_app()
    cache = app.extensions["intake.rules"]
    original = cache._loader
    cache.clear()
    cache._loader = FlakyLoader()
    cache._loader.down = True
    try:
        response = client.post(f"/api/logs/{app_id}", json={"event_name": "e"}, headers={"X-API-Key": key})
    finally:
        cache._loader = original
        cache.clear()
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "service_unavailable"
    assert response.headers["Retry-After"]


# --- patterns run on RE2 ------------------------------------------------------------------

REDOS_PATTERNS = ["^(a+)+$", "^(a|a)*$", "^(a|aa)+$", "^(a*)*b$", "(x+x+)+y", "^([a-zA-Z0-9])(([\\-.]|[_]+)?([a-zA-Z0-9]+))*(@){1}[a-z0-9]+[.]{1}(([a-z]{2,3})|([a-z]{2,3}[.]{1}[a-z]{2,3}))$"]


def fastest_check(rule, event, runs=5) -> float:
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        violations = rule.violations(event)
        timings.append(time.perf_counter() - started)
    assert violations, "the hostile value must not match"
    return min(timings)


@pytest.mark.no_clean
@pytest.mark.parametrize("pattern", REDOS_PATTERNS)
def test_known_redos_patterns_answer_in_under_a_millisecond(pattern):
    # Python's re took 3 s for "^(a+)+$" against 27 a's and a "!", holding the GIL.
    hostile = "a" * 27 + "!"
    for schema, event in [
        ({"properties": {"x": {"pattern": pattern}}}, {"x": hostile}),
        ({"properties": {"x": {"pattern": pattern}}}, {"x": "a" * 5000 + "!"}),
        ({"patternProperties": {pattern: {"type": "integer"}}, "additionalProperties": False}, {hostile: 1}),
        ({"propertyNames": {"pattern": pattern}}, {hostile: 1}),
    ]:
        check_rule_schema(schema)
        rule = compile_rule(Rule(name="redos", event_name=None, action="reject", schema=schema))
        assert fastest_check(rule, event) < 0.001, (schema, event)


@pytest.mark.no_clean
@pytest.mark.parametrize("pattern", ["(?=a)b", "(?!a)b", "(?<=a)b", "(?<!a)b", "(a)\\1", "\\Z"])
def test_patterns_re2_cannot_run_are_refused_with_a_clear_message(pattern):
    for schema in ({"properties": {"x": {"pattern": pattern}}}, {"patternProperties": {pattern: {}}},
                   {"items": {"propertyNames": {"pattern": pattern}}}):
        with pytest.raises(InvalidRuleSchema, match="RE2, which has no lookahead, lookbehind or backreferences"):
            check_rule_schema(schema)


@pytest.mark.no_clean
def test_unevaluated_properties_with_pattern_properties_is_refused():
    # jsonschema's own unevaluatedProperties helper would match those patterns with re.
    with pytest.raises(InvalidRuleSchema, match="unevaluatedProperties with patternProperties"):
        check_rule_schema({"allOf": [{"patternProperties": {"^a": {}}}], "unevaluatedProperties": False})
    check_rule_schema({"properties": {"a": {}}, "unevaluatedProperties": False})


@pytest.mark.no_clean
@pytest.mark.parametrize("schema, event", [
    ({"properties": {"x": {"pattern": "^a.c$"}}}, {"x": "abc"}),
    ({"properties": {"x": {"pattern": "^a.c$"}}}, {"x": "aéc"}),
    ({"properties": {"x": {"pattern": "^a.c$"}}}, {"x": "ac"}),
    ({"properties": {"x": {"pattern": "b"}}}, {"x": "abc"}),
    ({"properties": {"x": {"pattern": "[0-9]{3}"}}}, {"x": 123}),
    ({"patternProperties": {"^x_": {"type": "string"}, "é$": {"type": "integer"}}},
     {"x_a": 1, "x_b": "ok", "café": "no", "y": 2}),
    ({"properties": {"a": {}}, "patternProperties": {"^x_": {}}, "additionalProperties": False},
     {"a": 1, "x_1": 2, "other": 3, "more": 4}),
    ({"properties": {"a": {}}, "patternProperties": {"^x_": {}}, "additionalProperties": False}, {"a": 1, "x_1": 2}),
    ({"properties": {"a": {}}, "additionalProperties": False}, {"a": 1, "b": 2}),
    ({"properties": {"a": {}}, "additionalProperties": {"type": "string"}}, {"a": 1, "b": 2, "c": "s"}),
    ({"patternProperties": {"^x": {}}, "additionalProperties": {"type": "string"}}, {"xa": 1, "b": 2}),
    ({"properties": {"x": {"uniqueItems": True}}}, {"x": [{"a": 1}, {"a": 1.0}]}),
    ({"properties": {"x": {"uniqueItems": True}}}, {"x": [1, True, 0, False, None, "", [], {}]}),
    ({"properties": {"x": {"uniqueItems": True}}}, {"x": [[1, [True]], [1, [1]], {"a": [{"b": 1}]}, {"a": [{"b": True}]}]}),
    ({"properties": {"x": {"uniqueItems": True}}}, {"x": [[1, {"a": "b"}], [1, {"a": "b"}]]}),
    ({"properties": {"x": {"uniqueItems": False}}}, {"x": [1, 1]}),
])
def test_re2_keywords_report_what_jsonschema_reports(schema, event):
    rule = compile_rule(Rule(name="r", event_name=None, action="reject", schema=schema))
    expected = [(list(e.absolute_path), e.message) for e in Draft202012Validator(schema).iter_errors(event)]
    assert sorted((v["path"], v["message"]) for v in rule.violations(event)) == sorted(
        ("".join(f"/{p}" for p in path), message) for path, message in expected)


# --- recursive rules ----------------------------------------------------------------------


@pytest.mark.no_clean
@pytest.mark.parametrize("schema", [
    {"allOf": [{"$ref": "#"}]},
    {"$ref": "#"},
    {"anyOf": [{"type": "string"}, {"$ref": "#"}]},
    {"oneOf": [{"not": {"$ref": "#"}}]},
    {"if": {"$ref": "#"}},
    {"if": {"type": "object"}, "then": {"$ref": "#"}},
    {"if": {"type": "object"}, "else": {"$ref": "#"}},
    {"dependentSchemas": {"x": {"$ref": "#"}}},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"allOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"},
    {"properties": {"child": {"allOf": [{"$ref": "#/properties/child"}]}}},
    {"$defs": {"node": {"$dynamicAnchor": "node", "anyOf": [{"$dynamicRef": "#node"}]}}, "$ref": "#/$defs/node"},
    {"$id": "https://example.com/root", "$defs": {"a": {"$id": "a", "allOf": [{"$ref": "root"}]}}, "$ref": "a"},
])
def test_a_schema_that_applies_itself_to_the_same_value_is_refused(schema):
    with pytest.raises(InvalidRuleSchema, match="same value again without end"):
        check_rule_schema(schema)


@pytest.mark.no_clean
def test_recursion_that_descends_into_the_event_is_kept():
    schema = {"type": "object", "required": ["v"], "properties": {"v": {}, "children": {"items": {"$ref": "#"}}},
              "additionalProperties": {"anyOf": [{"type": "string"}, {"$ref": "#"}]}}
    check_rule_schema(schema)
    rule = compile_rule(Rule(name="tree", event_name=None, action="reject", schema=schema))
    tree = {"v": 1}
    for _ in range(9):
        tree = {"v": 1, "children": [tree, {"v": 2}]}
    assert rule.violations(tree) == []
    tree["children"][0]["children"][0] = {"no_v": "s"}
    assert [v["path"] for v in rule.violations(tree)] == ["/children/0/children/0"]


@pytest.mark.no_clean
def test_a_schema_that_multiplies_its_own_work_is_refused():
    # No cycle, but each definition applies the next twice: 2**30 applications to one value.
    definitions = {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"$ref": f"#/$defs/d{i + 1}"}]} for i in range(30)}
    with pytest.raises(InvalidRuleSchema, match="more than 1000 subschemas"):
        check_rule_schema({"$defs": {**definitions, "d30": {"type": "object"}}, "$ref": "#/$defs/d0"})
    shared = {f"d{i}": {"allOf": [{"$ref": f"#/$defs/d{i + 1}"}]} for i in range(30)}
    check_rule_schema({"$defs": {**shared, "d30": {}}, "$ref": "#/$defs/d0"})  # a chain is fine


@pytest.mark.no_clean
def test_a_schema_nested_too_deeply_is_refused_not_crashed():
    schema = {}
    node = schema
    for _ in range(5000):
        node["not"] = {}
        node = node["not"]
    with pytest.raises(InvalidRuleSchema, match="nested too deeply"):
        check_rule_schema(schema)


def test_a_stored_recursive_rule_never_makes_ingestion_answer_500(app, client, make_app):
    app_id, key = make_app(rules=[{"name": "loops", "schema": {"allOf": [{"$ref": "#"}]}, "action": "reject"},
                                  {"name": "needs_user", "schema": {"required": ["user"]}, "action": "reject"}])
    headers = {"X-API-Key": key}
    response = client.post(f"/api/logs/{app_id}", json={"event_name": "e", "user": 1}, headers=headers)
    assert response.status_code == 202, response.get_json()
    (warning,) = response.get_json()["validation"]["warnings"]
    assert warning["rule"] == "loops" and "skipped" in warning["message"]
    # The other rules still apply.
    response = client.post(f"/api/logs/{app_id}", json={"event_name": "e"}, headers=headers)
    assert response.status_code == 422 and response.get_json()["error"]["details"][0]["rule"] == "needs_user"
    batch = client.post(f"/api/logs/{app_id}/batch", json=[{"event_name": "e", "user": 1}], headers=headers)
    assert batch.status_code == 202 and batch.get_json()["accepted"] == 1


# --- RulesCache: bounded, brief negative entries, a lock per app, discard -----------------


class CountingLoader:
    """Answers from a dict, counting calls; `gate` (an Event) holds the ids in `held` until set."""

    def __init__(self, known=(), held=(), delay=0.0):
        self.known = set(known)
        self.held = set(held)
        self.gate = threading.Event()
        self.delay = delay
        self.calls = []

    def __call__(self, app_id):
        self.calls.append(app_id)
        if app_id in self.held:
            assert self.gate.wait(10)
        time.sleep(self.delay)
        return AppEntry(app_id, "hash", ()) if app_id in self.known else None


@pytest.mark.no_clean
def test_the_cache_holds_at_most_size_apps_least_recently_used_first(app, clock):
    loader = CountingLoader(known={"a", "b", "c"})
    cache = RulesCache(TTL, loader=loader, clock=clock, size=2)
    get(app, cache, "a"), get(app, cache, "b"), get(app, cache, "a")
    get(app, cache, "c")  # pushes out b, the least recently used
    assert len(cache) == 2
    loader.calls.clear()
    get(app, cache, "a"), get(app, cache, "c")
    assert loader.calls == []
    get(app, cache, "b")
    assert loader.calls == ["b"]


def test_the_apps_cache_size_comes_from_rules_cache_size():
    from app import create_app

    assert create_app({"RULES_CACHE_SIZE": 7}).config["RULES_CACHE_SIZE"] == 7
    assert Config({"RULES_CACHE_SIZE": "123"}).RULES_CACHE_SIZE == 123
    assert Config({}).RULES_CACHE_SIZE == 10_000


@pytest.mark.no_clean
def test_unknown_ids_are_kept_briefly_and_never_push_out_known_apps(app, clock):
    loader = CountingLoader(known={"real"})
    cache = RulesCache(60, loader=loader, clock=clock, size=10)
    assert get(app, cache, "real") is not None
    for n in range(5000):
        assert get(app, cache, f"random-{n}") is None
    assert len(cache) <= 10 + NEGATIVE_ENTRIES
    loader.calls.clear()
    assert get(app, cache, "real") is not None and loader.calls == []  # still cached
    assert get(app, cache, "random-4999") is None and loader.calls == []  # briefly remembered
    clock.advance(NEGATIVE_TTL_SECONDS)
    assert get(app, cache, "random-4999") is None and loader.calls == ["random-4999"]
    assert get(app, cache, "real") is not None and loader.calls == ["random-4999"]  # TTL 60 s


@pytest.mark.no_clean
def test_a_slow_miss_does_not_hold_back_other_apps(app):
    loader = CountingLoader(known={"slow", "quick"}, held={"slow"})
    cache = RulesCache(TTL, loader=loader)
    slow = threading.Thread(target=get, args=(app, cache, "slow"))
    slow.start()
    try:
        deadline = time.monotonic() + 5
        while "slow" not in loader.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        assert get(app, cache, "quick").id == "quick"
        assert time.monotonic() - started < 1, "another app's miss waited for the slow one"
        assert slow.is_alive()
    finally:
        loader.gate.set()
        slow.join(10)


@pytest.mark.no_clean
def test_a_burst_for_a_cold_app_makes_one_query(app):
    loader = CountingLoader(known={"cold"}, delay=0.2)
    cache = RulesCache(TTL, loader=loader)
    results = []
    threads = [threading.Thread(target=lambda: results.append(get(app, cache, "cold"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 8 and all(r.id == "cold" for r in results)
    assert loader.calls == ["cold"]
    assert not cache._loading._locks, "per-app locks are dropped once nobody waits"


def test_discard_makes_the_next_lookup_read_the_database(app, cache, make_app, count_sql):
    app_id, key = make_app()
    assert get(app, cache, app_id).key_matches(key)
    change(app, lambda: setattr(db.session.get(App, app_id), "api_key_hash", hash_api_key("ik_new")))
    assert get(app, cache, app_id).key_matches(key)
    cache.discard(app_id)
    count_sql.clear()
    assert get(app, cache, app_id).key_matches("ik_new")
    assert count_sql
    cache.discard("never-seen")  # discarding what is not there is fine


@pytest.mark.no_clean
def test_a_load_that_overlaps_a_discard_is_not_cached(app):
    loader = CountingLoader(known={"a"}, held={"a"})
    cache = RulesCache(TTL, loader=loader)
    reader = threading.Thread(target=get, args=(app, cache, "a"))
    reader.start()
    deadline = time.monotonic() + 5
    while not loader.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    cache.discard("a")  # e.g. the key was rotated while the read was under way
    loader.gate.set()
    reader.join(10)
    assert get(app, cache, "a") is not None
    assert loader.calls == ["a", "a"], "what the overlapping read saw may be older than the change"


# --- rules that cost too much at run time ---------------------------------------------------


@pytest.mark.no_clean
def test_unique_items_of_many_objects_takes_linear_time():
    # jsonschema compared unsortable items pair by pair: 5,000 objects took over ten seconds.
    rule = compile_rule(Rule(name="u", event_name=None, action="reject", schema={"properties": {"x": {"uniqueItems": True}}}))
    started = time.process_time()
    assert rule.violations({"x": [{"n": n} for n in range(5000)]}) == []
    assert [v["path"] for v in rule.violations({"x": [{"n": n} for n in range(5000)] + [{"n": 7}]})] == ["/x"]
    assert time.process_time() - started < 1


@pytest.mark.no_clean
def test_a_rule_that_multiplies_its_work_with_the_events_nesting_runs_out_of_time():
    # No cycle and few in-place schemas, but ten branches that each recurse into the items:
    # 20 ** 8 applications on an event of nested pairs. Refused statically it cannot be.
    from app.rules import RULE_TIME_BUDGET_SECONDS, RuleFailed

    schema = {"anyOf": [{"items": {"$ref": "#"}, "type": "string"} for _ in range(10)]}
    check_rule_schema(schema)
    rule = compile_rule(Rule(name="costly", event_name=None, action="reject", schema=schema))
    nested = 1
    for _ in range(8):
        nested = [nested, nested]
    started = time.perf_counter()
    with pytest.raises(RuleFailed, match="RuleTooCostly") as failure:
        rule.violations(nested)
    assert time.perf_counter() - started < RULE_TIME_BUDGET_SECONDS + 1
    assert failure.value.detail["rule"] == "costly" and "skipped" in failure.value.detail["message"]
    # From then on, until the cache reloads the rule, it is skipped at once.
    started = time.perf_counter()
    with pytest.raises(RuleFailed, match="RuleTooCostly"):
        rule.violations(["x"])
    assert time.perf_counter() - started < 0.01
    # Other rules keep their own budget.
    assert compile_rule(Rule(name="fine", event_name=None, action="reject", schema=schema)).violations("x") == []
