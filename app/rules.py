"""Per-process cache of app records and their compiled validation rules.

The ingestion hot path asks this cache, never the database: only a miss (first use,
or an entry older than RULES_CACHE_TTL) loads the app and its enabled rules.
"""
import hashlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
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


def check_rule_schema(schema) -> None:
    """Refuse a schema that is invalid JSON Schema 2020-12 or uses a remote $ref."""
    if not isinstance(schema, (dict, bool)):
        raise InvalidRuleSchema("schema must be a JSON object")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as error:
        raise InvalidRuleSchema(f"not a valid JSON Schema (2020-12): {error.message}") from None
    # Every $ref must resolve inside the schema itself: a remote one would be fetched (it
    # never is), a local one to nowhere would fail every event it meets. The walk follows
    # schema keywords only, so a "$ref" inside const/enum/default data is left alone.
    root = DRAFT202012.create_resource(schema)
    for ref in _unresolvable_refs(LOCAL_ONLY.resolver_with_root(root), root):
        if ref.startswith("#"):
            raise InvalidRuleSchema(f"$ref {ref!r} points to nothing in the schema")
        raise InvalidRuleSchema(f"remote $ref is not allowed: {ref!r}")


def _unresolvable_refs(resolver, resource):
    resolver = resolver.in_subresource(resource)  # follows nested $id
    if isinstance(resource.contents, dict):
        for key in ("$ref", "$dynamicRef"):
            ref = resource.contents.get(key)
            if isinstance(ref, str):
                try:
                    resolver.lookup(ref)
                except Unresolvable:
                    yield ref
    for subresource in resource.subresources():
        yield from _unresolvable_refs(resolver, subresource)


@dataclass(frozen=True)
class CompiledRule:
    name: str
    event_name: str | None
    action: str
    validator: Draft202012Validator

    def violations(self, event: dict) -> list[dict]:
        return [
            {"path": _pointer(error.absolute_path), "message": error.message, "rule": self.name}
            for error in self.validator.iter_errors(event)
        ]


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
    validator = Draft202012Validator(rule.schema, registry=LOCAL_ONLY)
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


class RulesUnavailable(Exception):
    """An app that is not cached yet could not be loaded: the database is unavailable."""


class RulesCache:
    """App entries by id, each reloaded after `ttl` seconds; unknown apps are cached too."""

    def __init__(self, ttl: float, loader=load_app_entry, clock=time.monotonic):
        self.ttl = ttl
        self._loader = loader
        self._clock = clock
        self._entries: dict[str, tuple[float, AppEntry | None]] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, app_id: str) -> AppEntry | None:
        cached = self._entries.get(app_id)
        if cached is not None and self._clock() < cached[0]:
            self.hits += 1
            metrics.RULES_CACHE_HIT.inc()
            return cached[1]
        # One loader at a time per process: a burst of requests for a cold app
        # makes one query, not one per thread.
        with self._lock:
            cached = self._entries.get(app_id)
            if cached is not None and self._clock() < cached[0]:
                self.hits += 1
                metrics.RULES_CACHE_HIT.inc()
                return cached[1]
            self.misses += 1
            metrics.RULES_CACHE_MISS.inc()
            try:
                entry = with_reconnect(lambda: self._loader(app_id))
            except Exception as error:
                rollback_session()
                if cached is None:
                    raise RulesUnavailable(app_id) from error
                # The database is away. Nobody can change a key or a rule meanwhile, so the
                # entry we hold is still the truth: keep ingesting, and look again shortly.
                log.warning("app %s: database unavailable, serving its cached rules (%s)", app_id, type(error).__name__)
                self._entries[app_id] = (self._clock() + min(self.ttl, STALE_RECHECK_SECONDS), cached[1])
                return cached[1]
            self._entries[app_id] = (self._clock() + self.ttl, entry)
            return entry

    def clear(self) -> None:
        self._entries.clear()

    def discard(self, app_id: str) -> None:
        """Forget one app's entry: its next request loads the app and rules afresh."""
        self._entries.pop(app_id, None)
