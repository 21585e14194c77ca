"""Per-process cache of app records and their compiled validation rules.

The ingestion hot path asks this cache, never the database: only a miss (first use,
or an entry older than RULES_CACHE_TTL) loads the app and its enabled rules.

A rule is a tenant's code running on every event, so it is held to what cannot stall a
process: patterns run on RE2 (linear time, no backtracking), schemas that would apply
themselves to the same value for ever are refused when the rule is created, and a rule
that still fails at run time is skipped with a warning instead of failing the request.
"""
import functools
import hashlib
import hmac
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import re2
from cachetools import LRUCache
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, ValidationError
from referencing import Registry
from referencing.exceptions import NoSuchResource, Unresolvable
from referencing.jsonschema import DRAFT202012

from app import metrics
from app.extensions import db, rollback_session, with_reconnect
from app.models import App, Rule

log = logging.getLogger(__name__)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _refuse_remote(uri):
    raise NoSuchResource(ref=uri)


# Rules may only reference their own definitions: nothing is ever fetched.
LOCAL_ONLY = Registry(retrieve=_refuse_remote)


class InvalidRuleSchema(ValueError):
    """A rule schema that is not valid JSON Schema 2020-12, or references remote documents."""


# --- patterns: RE2 instead of Python's backtracking `re` ----------------------------------
# Python's `re` backtracks: "^(a+)+$" against 27 a's and a "!" held a process (and, through
# the GIL, every other app's requests) for 3 s. RE2 answers in linear time. jsonschema calls
# `re.search` in exactly three keywords, which are replaced here; `unevaluatedProperties`
# matches patternProperties with `re` inside jsonschema's own helper, so a rule may not
# combine the two (refused by check_rule_schema). The "regex" format is never asserted on
# events (no format checker), so user data is never compiled as a pattern.
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is the rule author's error, not a log line
# Texts up to this length have their results cached: property names and short values repeat
# from event to event, and a cached answer costs a tenth of a match.
CACHED_TEXT_LENGTH = 256


@functools.lru_cache(maxsize=4096)
def _regex(pattern: str):
    return re2.compile(pattern, _RE2_OPTIONS)


def _search(pattern: str, text: str) -> bool:
    # Matching UTF-8 bytes skips google-re2's translation of byte offsets back into str
    # offsets (5 us a match instead of 2): only whether there is a match matters here.
    return _regex(pattern).search(text.encode()) is not None


_search_cached = functools.lru_cache(maxsize=8192)(_search)


def _matches(pattern: str, text: str) -> bool:
    return (_search_cached if len(text) <= CACHED_TEXT_LENGTH else _search)(pattern, text)


def _pattern(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and not _matches(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator, patterns, instance, schema):
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _matches(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator, additional, instance, schema):
    # jsonschema's additionalProperties, with patternProperties matched by RE2.
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    extras = {key for key in instance
              if key not in properties and not any(_matches(pattern, key) for pattern in patterns)}
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        if patterns:
            verb = "does" if len(extras) == 1 else "do"
            joined = ", ".join(repr(each) for each in sorted(extras))
            listed = ", ".join(repr(each) for each in sorted(patterns))
            yield ValidationError(f"{joined} {verb} not match any of the regexes: {listed}")
        else:
            names = sorted(extras, key=str)
            verb = "was" if len(names) == 1 else "were"
            yield ValidationError(f"Additional properties are not allowed ({', '.join(map(repr, names))} {verb} unexpected)")


def _unique_items(validator, unique, instance, schema):
    # jsonschema compares unsortable items (objects) pair by pair: 20,000 small objects in one
    # array took minutes. A hashable form of each item makes it one pass; JSON equality as
    # jsonschema has it: 1 == 1.0, but true is not 1.
    if unique and validator.is_type(instance, "array"):
        seen = set()
        for item in instance:
            key = _hashable(item)
            if key in seen:
                yield ValidationError(f"{instance!r} has non-unique elements")
                return
            seen.add(key)


def _hashable(value):
    if isinstance(value, dict):
        return "object", frozenset((key, _hashable(item)) for key, item in value.items())
    if isinstance(value, list):
        return "array", tuple(_hashable(item) for item in value)
    if isinstance(value, bool) or value is None:
        return "literal", value
    return ("string" if isinstance(value, str) else "number"), value


# --- a time budget for each rule and event --------------------------------------------------
# Without cycles a schema can still multiply its work with the event's nesting (anyOf of
# branches that each recurse into items: branches ** depth). Every keyword that applies a
# subschema checks the deadline first; past it the rule fails (RuleFailed: skipped, with a
# warning) instead of holding the process, and is skipped for the rest of its cache entry's
# life (RULES_CACHE_TTL), so that a batch of such events costs one budget, not one each.
RULE_TIME_BUDGET_SECONDS = 0.1
APPLICATORS = (
    "$ref", "$dynamicRef", "allOf", "anyOf", "oneOf", "not", "if", "dependentSchemas", "items", "prefixItems",
    "contains", "properties", "patternProperties", "additionalProperties", "propertyNames", "unevaluatedItems",
    "unevaluatedProperties",
)


class RuleTooCostly(Exception):
    """A rule ran past RULE_TIME_BUDGET_SECONDS on one event."""


class _Deadline(threading.local):
    at = float("inf")  # no budget outside CompiledRule.violations


_deadline = _Deadline()


def _within_budget(keyword):
    @functools.wraps(keyword)
    def checked(validator, value, instance, schema):
        if time.perf_counter() > _deadline.at:
            raise RuleTooCostly(f"more than {RULE_TIME_BUDGET_SECONDS * 1000:.0f} ms on one event")
        return keyword(validator, value, instance, schema)

    return checked


_keywords = {**Draft202012Validator.VALIDATORS, "pattern": _pattern, "patternProperties": _pattern_properties,
             "additionalProperties": _additional_properties, "uniqueItems": _unique_items}
RuleValidator = validators.extend(
    Draft202012Validator,
    {name: _within_budget(keyword) if name in APPLICATORS else keyword for name, keyword in _keywords.items()},
)


# --- checking a rule when it is created ---------------------------------------------------
# Keywords whose subschemas apply to the same value as their own schema: a cycle through
# them alone (e.g. {"allOf": [{"$ref": "#"}]}) never reaches a smaller value and never ends.
# Recursion through keywords that descend (properties, items, ...) ends with the event's
# nesting, which INGEST_MAX_DEPTH bounds.
IN_PLACE_LISTS = ("allOf", "anyOf", "oneOf")
IN_PLACE_SINGLE = ("not", "if", "then", "else")
REFERENCES = ("$ref", "$dynamicRef")
# The most subschemas a rule may apply to one value through in-place keywords: a chain of
# anyOf's each naming the next twice costs 2**n without any cycle.
MAX_IN_PLACE_SCHEMAS = 1000


def check_rule_schema(schema) -> None:
    """Refuse a schema that is invalid JSON Schema 2020-12, uses a remote $ref, a pattern RE2
    cannot run, or applies itself to the same value without end."""
    if not isinstance(schema, (dict, bool)):
        raise InvalidRuleSchema("schema must be a JSON object")
    try:
        Draft202012Validator.check_schema(schema)
        root = DRAFT202012.create_resource(schema)
        subschemas = [(resolver, contents) for resolver, contents in
                      _subschemas(LOCAL_ONLY.resolver_with_root(root), root) if isinstance(contents, dict)]
        for resolver, contents in subschemas:
            _check_refs(resolver, contents)
            _check_patterns(contents)
        if any("unevaluatedProperties" in c for _, c in subschemas) and \
                any("patternProperties" in c for _, c in subschemas):
            raise InvalidRuleSchema("a rule cannot combine unevaluatedProperties with patternProperties")
        costs = {}
        for resolver, contents in subschemas:
            _in_place_cost(resolver, contents, costs, active=set())
    except SchemaError as error:
        raise InvalidRuleSchema(f"not a valid JSON Schema (2020-12): {error.message}") from None
    except RecursionError:
        raise InvalidRuleSchema("the schema is nested too deeply") from None


def _subschemas(resolver, resource):
    # Follows schema keywords only, so a "$ref" or "pattern" inside const/enum/default data
    # is left alone; in_subresource follows nested $id.
    resolver = resolver.in_subresource(resource)
    yield resolver, resource.contents
    for subresource in resource.subresources():
        yield from _subschemas(resolver, subresource)


def _check_refs(resolver, contents):
    # Every $ref must resolve inside the schema itself: a remote one would be fetched (it
    # never is), a local one to nowhere would fail every event it meets.
    for keyword in REFERENCES:
        ref = contents.get(keyword)
        if isinstance(ref, str):
            try:
                resolver.lookup(ref)
            except Unresolvable:
                if ref.startswith("#"):
                    raise InvalidRuleSchema(f"$ref {ref!r} points to nothing in the schema") from None
                raise InvalidRuleSchema(f"remote $ref is not allowed: {ref!r}") from None


def _check_patterns(contents):
    patterns = list(contents.get("patternProperties", {}))
    if isinstance(contents.get("pattern"), str):
        patterns.append(contents["pattern"])
    for pattern in patterns:
        try:
            _regex(pattern)
        except re2.error as error:
            reason = error.args[0].decode(errors="replace") if error.args and isinstance(error.args[0], bytes) else error
            raise InvalidRuleSchema(
                f"pattern {pattern!r} is not supported: {reason}. Patterns run on RE2, which has no "
                "lookahead, lookbehind or backreferences") from None


def _in_place(resolver, contents):
    """The (resolver, schema) pairs that apply to the same value as `contents`."""
    children = []
    for keyword in IN_PLACE_LISTS:
        children.extend(contents.get(keyword, ()))
    children.extend(contents[keyword] for keyword in IN_PLACE_SINGLE if keyword in contents)
    children.extend(contents.get("dependentSchemas", {}).values())
    for child in children:
        yield resolver.in_subresource(DRAFT202012.create_resource(child)), child, None
    for keyword in REFERENCES:
        ref = contents.get(keyword)
        if isinstance(ref, str):
            resolved = resolver.lookup(ref)
            yield resolved.resolver, resolved.contents, ref


def _in_place_cost(resolver, contents, costs, active, via=None) -> int:
    """How many schemas apply to one value from `contents`; refuse an in-place cycle."""
    if not isinstance(contents, dict):
        return 1
    key = id(contents)
    if key in costs:
        return costs[key]
    if key in active:
        raise InvalidRuleSchema(
            f"$ref {via!r} makes the schema apply to the same value again without end; recursion is "
            "allowed only through keywords that descend into the event (properties, items, ...)")
    active.add(key)
    cost = 1 + sum(_in_place_cost(r, child, costs, active, ref or via) for r, child, ref in _in_place(resolver, contents))
    active.discard(key)
    if cost > MAX_IN_PLACE_SCHEMAS:
        raise InvalidRuleSchema(
            f"the schema applies more than {MAX_IN_PLACE_SCHEMAS} subschemas to one value (through "
            "allOf/anyOf/oneOf/$ref...); simplify it")
    costs[key] = cost
    return cost


class RuleFailed(Exception):
    """A rule that raised instead of answering; `detail` reports it in the error-detail shape."""

    def __init__(self, detail: dict):
        super().__init__(detail["message"])
        self.detail = detail


@dataclass(frozen=True)
class CompiledRule:
    name: str
    event_name: str | None
    action: str
    validator: Draft202012Validator
    # Set once this compiled rule has logged a failure: one log line per rule and cache
    # load, not one per event; and once it ran out of time (see RULE_TIME_BUDGET_SECONDS).
    _failure_logged: list = field(default_factory=list, compare=False, repr=False)
    _out_of_time: list = field(default_factory=list, compare=False, repr=False)

    def violations(self, event: dict) -> list[dict]:
        """The rule's violations by `event`; RuleFailed if the rule itself fails to run."""
        if self._out_of_time:
            raise RuleFailed(self._failure(self._out_of_time[0]))
        _deadline.at = time.perf_counter() + RULE_TIME_BUDGET_SECONDS
        try:
            return [
                {"path": _pointer(error.absolute_path), "message": error.message, "rule": self.name}
                for error in self.validator.iter_errors(event)
            ]
        except Exception as error:  # RecursionError included: whatever a stored schema does
            reason = type(error).__name__
            if isinstance(error, RuleTooCostly):
                reason = f"{reason}: {error}"
                self._out_of_time.append(reason)
            if not self._failure_logged:
                self._failure_logged.append(True)
                log.warning("rule %r failed while checking an event (%s): skipped", self.name, reason,
                            extra={"fields": {"rule": self.name, "error": reason}})
            raise RuleFailed(self._failure(reason)) from None
        finally:
            _deadline.at = float("inf")

    def _failure(self, reason: str) -> dict:
        return {"path": "", "rule": self.name,
                "message": f"the rule could not be checked ({reason}) and was skipped; fix or disable it"}


@dataclass(frozen=True)
class AppEntry:
    """What ingestion needs to know about an app, immutable once cached."""

    id: str
    api_key_hash: str
    rules: tuple[CompiledRule, ...]

    def key_matches(self, key: str | None) -> bool:
        return key is not None and hmac.compare_digest(hash_api_key(key), self.api_key_hash)

    def rules_for(self, event_name: str):
        return [r for r in self.rules if r.event_name is None or r.event_name == event_name]


def _pointer(path) -> str:
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


def compile_rule(rule: Rule) -> CompiledRule:
    validator = RuleValidator(rule.schema, registry=LOCAL_ONLY)
    return CompiledRule(rule.name, rule.event_name, rule.action, validator)


def load_app_entry(app_id: str) -> AppEntry | None:
    """Read an active app and its enabled rules from the database."""
    app = db.session.get(App, app_id)
    if app is None or app.deleted_at is not None:
        return None
    rules = db.session.scalars(
        db.select(Rule).where(Rule.app_id == app_id, Rule.enabled.is_(True)).order_by(Rule.created_at)
    )
    return AppEntry(app.id, app.api_key_hash, tuple(compile_rule(r) for r in rules))


STALE_RECHECK_SECONDS = 1.0
# Unknown app ids are remembered briefly and apart from known apps: a stream of random ids
# costs at most one query per id per second and cannot push real apps out of the cache.
NEGATIVE_TTL_SECONDS = 1.0
NEGATIVE_ENTRIES = 1024


class RulesUnavailable(Exception):
    """An app that is not cached yet could not be loaded: the database is unavailable."""


class _KeyedLocks:
    """A lock per key, alive only while someone holds or waits for it."""

    def __init__(self):
        self._guard = threading.Lock()
        self._locks: dict[str, list] = {}  # key -> [lock, holders and waiters]

    @contextmanager
    def hold(self, key: str):
        with self._guard:
            slot = self._locks.setdefault(key, [threading.Lock(), 0])
            slot[1] += 1
        try:
            with slot[0]:
                yield
        finally:
            with self._guard:
                slot[1] -= 1
                if not slot[1]:
                    del self._locks[key]


class RulesCache:
    """App entries by id, each reloaded after `ttl` seconds: at most `size` known apps (least
    recently used go first) and NEGATIVE_ENTRIES unknown ids, each for NEGATIVE_TTL_SECONDS."""

    def __init__(self, ttl: float, loader=load_app_entry, clock=time.monotonic, size: int = 10_000):
        self.ttl = ttl
        self.negative_ttl = min(ttl, NEGATIVE_TTL_SECONDS)
        self._loader = loader
        self._clock = clock
        # (expires at, entry) by app id; cachetools' caches are not thread-safe: one short
        # lock around each access (never held during a query).
        self._known: LRUCache = LRUCache(maxsize=max(1, size))
        self._unknown: LRUCache = LRUCache(maxsize=NEGATIVE_ENTRIES)
        self._lock = threading.Lock()
        self._loading = _KeyedLocks()
        self._discards = 0  # a load that overlapped a discard must not cache what it read
        self.hits = 0
        self.misses = 0

    def _cached(self, app_id: str):
        with self._lock:
            return self._known.get(app_id) or self._unknown.get(app_id)

    def _fresh(self, app_id: str):
        cached = self._cached(app_id)
        if cached is not None and self._clock() < cached[0]:
            self.hits += 1
            metrics.RULES_CACHE_HIT.inc()
            return True, cached
        return False, cached

    def _store(self, app_id: str, entry: AppEntry | None, ttl: float, discards: int) -> None:
        with self._lock:
            if discards != self._discards:
                return
            if entry is None:
                self._known.pop(app_id, None)
                self._unknown[app_id] = (self._clock() + min(ttl, self.negative_ttl), None)
            else:
                self._unknown.pop(app_id, None)
                self._known[app_id] = (self._clock() + ttl, entry)

    def get(self, app_id: str) -> AppEntry | None:
        fresh, cached = self._fresh(app_id)
        if fresh:
            return cached[1]
        # One loader at a time per app id: a burst of requests for a cold app makes one
        # query, not one per thread, and other apps' misses do not wait behind it.
        with self._loading.hold(app_id):
            fresh, cached = self._fresh(app_id)
            if fresh:
                return cached[1]
            self.misses += 1
            metrics.RULES_CACHE_MISS.inc()
            discards = self._discards
            try:
                entry = with_reconnect(lambda: self._loader(app_id))
            except Exception as error:
                rollback_session()
                if cached is None:
                    raise RulesUnavailable(app_id) from error
                # The database is away. Nobody can change a key or a rule meanwhile, so the
                # entry we hold is still the truth: keep ingesting, and look again shortly.
                log.warning("app %s: database unavailable, serving its cached rules (%s)", app_id, type(error).__name__)
                self._store(app_id, cached[1], min(self.ttl, STALE_RECHECK_SECONDS), discards)
                return cached[1]
            self._store(app_id, entry, self.ttl, discards)
            return entry

    def discard(self, app_id: str) -> None:
        """Forget one app: its next request reads the database (a key or rule just changed)."""
        with self._lock:
            self._discards += 1
            self._known.pop(app_id, None)
            self._unknown.pop(app_id, None)

    def clear(self) -> None:
        with self._lock:
            self._discards += 1
            self._known.clear()
            self._unknown.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._known) + len(self._unknown)
