"""Unit tests of app/ingest/checks.py: body reading, gzip, JSON parsing, depth and reserved fields."""
import gzip
import io
import random
import re
import time
import tracemalloc
import zlib
from datetime import datetime, timedelta, timezone

import pytest
from jsonschema import Draft202012Validator
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from app.errors import ApiError
from app.ingest import checks
from app.rules import AppEntry, CompiledRule

UTC = timezone.utc
NOW = datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
LIMIT = 1000

# Pure unit tests: they touch neither the database nor Redis, so nothing needs truncating.
pytestmark = pytest.mark.no_clean


def make_request(body: bytes, content_type="application/json", encoding=None, content_length="auto",
                 stream=None) -> Request:
    """A real WSGI request; content_length None means 'not sent' (a chunked body)."""
    headers = {"Content-Encoding": encoding} if encoding else {}
    environ = EnvironBuilder(method="POST", path="/api/logs/x", headers=headers).get_environ()
    if content_type is not None:
        environ["CONTENT_TYPE"] = content_type
    else:
        environ.pop("CONTENT_TYPE", None)
    environ["wsgi.input"] = stream if stream is not None else io.BytesIO(body)
    if content_length == "auto":
        environ["CONTENT_LENGTH"] = str(len(body))
    elif content_length is None:
        environ.pop("CONTENT_LENGTH", None)
        environ["wsgi.input_terminated"] = True
    else:
        environ["CONTENT_LENGTH"] = str(content_length)
    return Request(environ)


def api_error(function, *args, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as caught:
        function(*args, **kwargs)
    return caught.value


def as_datetime(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


def nested(depth: int, leaf=1):
    """An object `depth` containers deep, alternating objects and arrays (the outer one is an object)."""
    node = leaf
    for level in range(depth - 1, 0, -1):
        node = {"k": node} if level % 2 == 0 else [node]
    return {"event_name": "deep", "n": node}


# --- content type, sizes ------------------------------------------------------------------


def test_plain_json_body_is_returned_as_is():
    assert checks.read_body(make_request(b'{"event_name": "a"}'), LIMIT) == b'{"event_name": "a"}'


def test_json_with_charset_parameter_is_accepted():
    request = make_request(b"{}", content_type="application/json; charset=utf-8")
    assert checks.read_body(request, LIMIT) == b"{}"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_non_json_content_type_is_415(content_type):
    error = api_error(checks.read_body, make_request(b"{}", content_type=content_type), LIMIT)
    assert (error.status, error.code) == (415, "unsupported_media_type")


def test_unknown_content_encoding_is_415():
    error = api_error(checks.read_body, make_request(b"{}", encoding="br"), LIMIT)
    assert error.status == 415


def test_body_of_exactly_the_limit_is_accepted():
    assert len(checks.read_body(make_request(b"x" * LIMIT), LIMIT)) == LIMIT


def test_content_length_over_the_limit_is_413_before_the_body_is_read():
    class Untouchable(io.BytesIO):
        def read(self, *args):
            raise AssertionError("the body was read")

        readinto = readline = read

    request = make_request(b"", content_length=LIMIT + 1, stream=Untouchable())
    error = api_error(checks.read_body, request, LIMIT)
    assert (error.status, error.code) == (413, "payload_too_large")


def test_body_without_content_length_is_413_by_actual_size():
    error = api_error(checks.read_body, make_request(b"x" * (LIMIT + 1), content_length=None), LIMIT)
    assert (error.status, error.code) == (413, "payload_too_large")


def test_body_without_content_length_under_the_limit_is_read():
    assert checks.read_body(make_request(b"[1, 2]", content_length=None), LIMIT) == b"[1, 2]"


def test_event_size_of_a_batch_item():
    checks.check_event_size({"event_name": "x" * 100}, 200)
    error = api_error(checks.check_event_size, {"event_name": "x" * 300}, 200)
    assert (error.status, error.code) == (413, "payload_too_large")


# --- gzip ---------------------------------------------------------------------------------


def test_gzip_body_is_inflated():
    body = b'{"event_name": "zipped", "pad": "' + b"a" * 5000 + b'"}'
    compressed = gzip.compress(body)
    assert len(compressed) < LIMIT < len(body) + LIMIT
    assert checks.read_body(make_request(compressed, encoding="gzip"), 10_000) == body


def test_gzip_encoding_name_is_case_insensitive():
    assert checks.read_body(make_request(gzip.compress(b"{}"), encoding=" GZIP "), LIMIT) == b"{}"


def test_gzip_inflating_to_exactly_the_limit_is_accepted():
    body = b"[" + b" " * (LIMIT - 2) + b"]"
    assert checks.read_body(make_request(gzip.compress(body), encoding="gzip"), LIMIT) == body


def test_gzip_inflating_past_the_limit_is_413():
    body = b"[" + b" " * (LIMIT - 1) + b"]"
    error = api_error(checks.read_body, make_request(gzip.compress(body), encoding="gzip"), LIMIT)
    assert (error.status, error.code) == (413, "payload_too_large")


def test_compressed_body_over_the_limit_is_413():
    incompressible = gzip.compress(random.Random(7).randbytes(2 * LIMIT))
    assert len(incompressible) > LIMIT
    error = api_error(checks.read_body, make_request(incompressible, encoding="gzip"), LIMIT)
    assert error.status == 413


def test_invalid_gzip_is_400():
    error = api_error(checks.read_body, make_request(b"this is not gzip at all", encoding="gzip"), LIMIT)
    assert (error.status, error.code) == (400, "invalid_encoding")


def test_gzip_with_a_corrupt_checksum_is_400():
    compressed = bytearray(gzip.compress(b'{"event_name": "a"}'))
    compressed[-6] ^= 0xFF  # inside the CRC32 trailer
    error = api_error(checks.read_body, make_request(bytes(compressed), encoding="gzip"), LIMIT)
    assert (error.status, error.code) == (400, "invalid_encoding")


@pytest.mark.parametrize("cut", [4, 12, 20])
def test_truncated_gzip_is_400(cut):
    compressed = gzip.compress(b'{"event_name": "truncated", "x": "' + b"y" * 200 + b'"}')
    error = api_error(checks.read_body, make_request(compressed[:-cut], encoding="gzip"), LIMIT)
    assert (error.status, error.code) == (400, "invalid_encoding")


def test_gzip_bomb_is_413_without_inflating_everything():
    # ~64 KB of gzip that would inflate to 64 MiB of zeros.
    deflater = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = b"\0" * (1 << 20)
    bomb = b"".join(deflater.compress(chunk) for _ in range(64)) + deflater.flush()
    limit = 1 << 20
    assert len(bomb) < limit
    request = make_request(bomb, encoding="gzip")

    tracemalloc.start()
    try:
        error = api_error(checks.read_body, request, limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (error.status, error.code) == (413, "payload_too_large")
    # The compressed body plus at most limit + 1 inflated bytes, with slack; never 64 MiB.
    assert peak < 8 * limit


# --- parse_json ---------------------------------------------------------------------------


def test_parse_json_returns_the_document():
    assert checks.parse_json(b'{"event_name": "a", "n": [1, 2.5, null, true], "s": "\\u00e9\\ud83d\\ude00"}') == {
        "event_name": "a", "n": [1, 2.5, None, True], "s": "é😀"}


def test_escaped_backslash_before_u0000_is_not_a_nul():
    # The JSON text "\\u0000" is a backslash followed by "u0000": six ordinary characters.
    assert checks.parse_json(b'{"s": "\\\\u0000"}') == {"s": "\\u0000"}


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b'{"a": 1e400}',
        b'{"a": "x\\u0000y"}',
        b'{"a\\u0000": 1}',
        b'{"a": {"b": ["ok", "\\u0000"]}}',
        b'{"a": "\\ud800"}',
        b'{"a": "\\udc00"}',
        b'{"a": "\\ud800\\u0041"}',
        b'{"a": "\xff"}',
        b'{"a": "\xc3"}',
        b'{"a": "\xed\xa0\x80"}',
        b"\xef\xbb\xbf\xff{}",
        b'{"a": 1',
        b'{"a": 1} trailing',
        b"",
        b"{'a': 1}",
    ],
    ids=[
        "nan", "infinity", "minus-infinity", "overflowing-number", "nul-in-value", "nul-in-key", "nested-nul",
        "lone-high-surrogate", "lone-low-surrogate", "high-surrogate-then-letter", "invalid-utf8-byte",
        "truncated-utf8", "utf8-encoded-surrogate", "garbage-after-bom", "truncated-json", "trailing-garbage",
        "empty", "single-quotes",
    ],
)
def test_unstorable_or_malformed_json_is_400_invalid_json(body):
    error = api_error(checks.parse_json, body)
    assert (error.status, error.code) == (400, "invalid_json")


def test_json_nested_past_the_parsers_own_limit_is_nesting_too_deep():
    body = b'{"event_name": "x", "n": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    error = api_error(checks.parse_json, body)
    assert (error.status, error.code) == (422, "nesting_too_deep")


# --- depth --------------------------------------------------------------------------------


def test_depth_of_ten_is_accepted():
    checks.check_depth(nested(10), 10)
    checks.check_depth(nested(10, leaf={}), 11)


def test_a_thousand_levels_stop_the_check_at_the_limit():
    error = api_error(checks.check_depth, nested(1000), 10)  # no RecursionError: the walk stops at 10
    assert error.code == "nesting_too_deep"


def test_depth_of_eleven_is_422():
    error = api_error(checks.check_depth, nested(11), 10)
    assert (error.status, error.code) == (422, "nesting_too_deep")


def test_empty_container_counts_as_a_level():
    error = api_error(checks.check_depth, nested(10, leaf=[]), 10)
    assert error.code == "nesting_too_deep"


def test_scalars_and_wide_objects_do_not_add_depth():
    checks.check_depth({"a": 1, "b": "s", "c": [1, 2, 3], "d": {"e": None}}, 2)


# --- reserved fields ----------------------------------------------------------------------


def fields(**event):
    return checks.reserved_fields(event, NOW)


def invalid(**event) -> list[dict]:
    error = api_error(checks.reserved_fields, event, NOW)
    assert (error.status, error.code) == (422, "invalid_event")
    return error.details


def test_minimal_event_gets_defaults():
    result = fields(event_name="signup")
    assert result["event_name"] == "signup"
    assert result["level"] == "info"
    assert result["user_id"] is None
    assert as_datetime(result["timestamp"]) == NOW
    assert len(result["event_id"]) == 36  # a server-made UUID


def test_server_made_event_ids_are_unique():
    assert fields(event_name="a")["event_id"] != fields(event_name="a")["event_id"]


def test_event_name_alias_and_trimming():
    assert fields(eventName="  Page View \t")["event_name"] == "Page View"


def test_event_name_takes_precedence_over_alias():
    assert fields(event_name="a", eventName="b")["event_name"] == "a"


@pytest.mark.parametrize("name", ["x", "x" * 255, "  " + "x" * 255 + "  "])
def test_event_name_lengths_accepted(name):
    assert fields(event_name=name)["event_name"] == name.strip()


@pytest.mark.parametrize("name", [None, "", "   ", "x" * 256, 42, ["a"], {"a": 1}, True])
def test_event_name_refused(name):
    details = invalid(event_name=name) if name is not None else invalid()
    assert [d["path"] for d in details] == ["/event_name"]
    assert details[0]["rule"] == "reserved_fields" and details[0]["message"]


@pytest.mark.parametrize("event_id", ["a", "x" * 128, "550e8400-e29b-41d4-a716-446655440000"])
def test_event_id_kept(event_id):
    assert fields(event_name="a", event_id=event_id)["event_id"] == event_id


@pytest.mark.parametrize("event_id", ["", "x" * 129, 12, ["a"], True])
def test_event_id_refused(event_id):
    assert [d["path"] for d in invalid(event_name="a", event_id=event_id)] == ["/event_id"]


@pytest.mark.parametrize(
    "value, expected",
    [
        ("2026-11-24T09:00:00Z", datetime(2026, 11, 24, 9, 0, tzinfo=UTC)),
        ("2026-11-24T09:00:00", datetime(2026, 11, 24, 9, 0, tzinfo=UTC)),
        ("2026-11-24T11:30:00+02:00", datetime(2026, 11, 24, 9, 30, tzinfo=UTC)),
        ("2026-11-24T04:00:00.123456-05:00", datetime(2026, 11, 24, 9, 0, 0, 123456, tzinfo=UTC)),
        ("2026-11-24", datetime(2026, 11, 24, tzinfo=UTC)),
        (1_700_000_000, datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        (1_700_000_000.5, datetime(2023, 11, 14, 22, 13, 20, 500000, tzinfo=UTC)),
        (1_700_000_000_123, datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)),
        (0, EPOCH),
    ],
)
def test_timestamps_are_normalised_to_utc(value, expected):
    assert as_datetime(fields(event_name="a", timestamp=value)["timestamp"]) == expected


def test_null_timestamp_means_time_received():
    assert as_datetime(fields(event_name="a", timestamp=None)["timestamp"]) == NOW


def test_timestamp_up_to_ten_minutes_ahead_is_accepted():
    ahead = NOW + timedelta(minutes=9, seconds=59)
    assert as_datetime(fields(event_name="a", timestamp=ahead.isoformat())["timestamp"]) == ahead


@pytest.mark.parametrize(
    "value",
    [
        (NOW + timedelta(minutes=10, seconds=1)).isoformat(),
        (NOW + timedelta(minutes=11)).replace(tzinfo=None).isoformat(),
        int((NOW + timedelta(minutes=11)).timestamp()),
        int((NOW + timedelta(minutes=11)).timestamp() * 1000),
    ],
    ids=["iso-offset", "iso-naive", "epoch-seconds", "epoch-ms"],
)
def test_timestamp_more_than_ten_minutes_in_the_future_is_422(value):
    details = invalid(event_name="a", timestamp=value)
    assert details[0]["path"] == "/timestamp" and "future" in details[0]["message"]


@pytest.mark.parametrize(
    "value",
    ["yesterday", "", "2026-13-01T00:00:00Z", True, [2026], {"t": 1}, 1e300, -1e300,
     "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"],
)
def test_malformed_or_out_of_range_timestamp_is_422(value):
    assert [d["path"] for d in invalid(event_name="a", timestamp=value)] == ["/timestamp"]


@pytest.mark.parametrize(
    "level, expected",
    [("debug", "debug"), ("INFO", "info"), ("warning", "warning"), ("warn", "warning"), ("WARN", "warning"),
     ("Error", "error"), ("critical", "critical"), ("fatal", "critical"), ("FaTaL", "critical")],
)
def test_levels_and_aliases_any_case(level, expected):
    assert fields(event_name="a", level=level)["level"] == expected


@pytest.mark.parametrize("level", ["verbose", "", 3, ["info"]])
def test_unknown_level_is_422(level):
    assert [d["path"] for d in invalid(event_name="a", level=level)] == ["/level"]


@pytest.mark.parametrize(
    "event, expected",
    [({"user_id": 42}, "42"), ({"user_id": "u-1"}, "u-1"), ({"userId": 7}, "7"), ({"userId": "abc"}, "abc"),
     ({"user_id": 0}, "0"), ({"user_id": None}, None), ({}, None)],
)
def test_user_id_string_or_integer(event, expected):
    assert fields(event_name="a", **event)["user_id"] == expected


@pytest.mark.parametrize("user_id", [1.5, True, ["u"], {"id": 1}, "x" * 256])
def test_user_id_of_another_type_is_422(user_id):
    assert [d["path"] for d in invalid(event_name="a", user_id=user_id)] == ["/user_id"]


def test_every_reserved_field_problem_is_reported_at_once():
    details = invalid(event_id="", timestamp="soon", level="loud", user_id=1.5)
    assert sorted(d["path"] for d in details) == ["/event_id", "/event_name", "/level", "/timestamp", "/user_id"]
    assert all(d["message"] and d["rule"] == "reserved_fields" for d in details)


# --- typed reserved fields (a route that builds its events: OTLP) ------------------------


def typed(event_id=None, event_name="a", level="info", user_id=None, timestamp_us=None) -> dict:
    return checks.typed_reserved_fields(event_id, event_name, level, user_id, timestamp_us, NOW)


def test_typed_reserved_fields_are_normalised_as_reserved_fields_does():
    moment = checks._epoch_us(NOW - timedelta(hours=1))
    assert typed("otlp-1", " click ", "warning", 9, moment) == {
        "event_id": "otlp-1", "event_name": "click", "level": "warning", "user_id": "9", "timestamp": moment}
    result = typed()
    assert result["timestamp"] == checks._epoch_us(NOW) and result["user_id"] is None
    assert len(result["event_id"]) == 36 and result["event_id"] != typed()["event_id"]  # a server-made UUID


def test_typed_reserved_fields_accept_up_to_ten_minutes_ahead_and_255_characters():
    ahead = checks._epoch_us(NOW + timedelta(minutes=10))
    assert typed(event_name="x" * 255, user_id="u" * 255, timestamp_us=ahead)["timestamp"] == ahead


def test_typed_reserved_fields_refuse_with_the_words_and_order_of_reserved_fields():
    ahead = NOW + timedelta(minutes=10, microseconds=1)
    error = api_error(typed, event_name="x" * 256, user_id="u" * 256, timestamp_us=checks._epoch_us(ahead))
    assert (error.status, error.code) == (422, "invalid_event")
    assert error.message == "Reserved fields are missing or malformed."
    assert error.details == invalid(event_name="x" * 256, user_id="u" * 256, timestamp=ahead.isoformat())
    assert [d["path"] for d in error.details] == ["/event_name", "/timestamp", "/user_id"]
    assert [d["path"] for d in api_error(typed, event_name="  ").details] == ["/event_name"]
    assert [d["path"] for d in api_error(typed, user_id=10**256).details] == ["/user_id"]


def test_assemble_event_is_what_check_event_returns():
    payload = {"event_name": "a", "level": "error", "extra": [1]}
    fields = checks.reserved_fields(payload, NOW)
    assembled = checks.assemble_event(entry(), dict(fields), payload, NOW)
    assert assembled == {**checks.check_event(entry(), payload, max_depth=10, received_at=NOW),
                         "event_id": fields["event_id"]}


# --- check_event --------------------------------------------------------------------------


def entry(*rules) -> AppEntry:
    compiled = tuple(CompiledRule(name, event_name, action, Draft202012Validator(schema))
                     for name, event_name, action, schema in rules)
    return AppEntry("app-1", "hash", compiled)


@pytest.mark.parametrize("document", [[], ["a"], "event", 3, None])
def test_check_event_refuses_a_non_object(document):
    error = api_error(checks.check_event, entry(), document, max_depth=10, received_at=NOW)
    assert (error.status, error.code) == (400, "not_an_object")


def test_check_event_checks_depth_before_reserved_fields():
    error = api_error(checks.check_event, entry(), {"n": [[[[{}]]]]}, max_depth=3, received_at=NOW)
    assert error.code == "nesting_too_deep"


def test_check_event_returns_the_travelling_event():
    payload = {"eventName": " click ", "level": "WARN", "userId": 9, "timestamp": "2026-11-24T09:00:00Z",
               "event_id": "e-1", "extra": {"a": [1, 2]}}
    original = {**payload}
    event = checks.check_event(entry(), payload, max_depth=10, received_at=NOW)
    assert event == {
        "event_id": "e-1", "event_name": "click", "level": "warning", "user_id": "9",
        "timestamp": checks._epoch_us(datetime(2026, 11, 24, 9, tzinfo=UTC)),
        "validation": {"status": "valid", "warnings": []},
        "app_id": "app-1", "received_at": checks._epoch_us(NOW), "payload": original,
    }
    assert payload == original  # the payload itself is never rewritten


def test_check_event_reject_rule_lists_every_violation():
    rules = entry(("needs_user", None, "reject", {"required": ["user"]}),
                  ("price_number", "buy", "reject", {"properties": {"price": {"type": "number"}}}),
                  ("only_signup", "signup", "reject", {"required": ["never"]}))
    error = api_error(checks.check_event, rules, {"event_name": "buy", "price": "free"}, max_depth=10,
                      received_at=NOW)
    assert (error.status, error.code) == (422, "validation_failed")
    assert sorted((d["rule"], d["path"]) for d in error.details) == [("needs_user", ""), ("price_number", "/price")]


def test_check_event_warn_rule_lets_the_event_through_with_warnings():
    rules = entry(("has_user", None, "warn", {"required": ["user"]}))
    event = checks.check_event(rules, {"event_name": "a"}, max_depth=10, received_at=NOW)
    assert event["validation"]["status"] == "warning"
    assert [w["rule"] for w in event["validation"]["warnings"]] == ["has_user"]


# --- gzip: many members -------------------------------------------------------------------


def test_many_empty_gzip_members_are_inflated_in_linear_time():
    # 4 MiB of empty members (~210,000 of them): 13 s of CPU when each member was handed the
    # whole rest of the body, about 0.3 s now. The bound allows for a loaded machine.
    member = gzip.compress(b"")
    body = member * (4 * 1024 * 1024 // len(member))
    started = time.process_time()
    assert checks.read_body(make_request(body, encoding="gzip"), 5 * 1024 * 1024) == b""
    assert time.process_time() - started < 3


def test_gzip_members_of_every_size_are_inflated_in_order():
    rng = random.Random(11)
    parts = [b"", b"{", rng.randbytes(200_000), b"x" * 70_000, b"", rng.randbytes(3), b"}"]
    body = b"".join(gzip.compress(part) for part in parts)
    assert checks.read_body(make_request(body, encoding="gzip"), 1 << 20) == b"".join(parts)


def test_many_gzip_members_past_the_limit_are_413():
    body = gzip.compress(b" " * 100) * 11
    error = api_error(checks.read_body, make_request(body, encoding="gzip"), LIMIT)
    assert (error.status, error.code) == (413, "payload_too_large")
    assert checks.read_body(make_request(gzip.compress(b" " * 100) * 10, encoding="gzip"), LIMIT) == b" " * LIMIT


@pytest.mark.parametrize("tail", [b"\0", b"garbage", gzip.compress(b"{}", mtime=0)[:-3]])
def test_a_gzip_member_followed_by_garbage_or_a_cut_member_is_400(tail):
    body = gzip.compress(b"{}") + tail
    error = api_error(checks.read_body, make_request(body, encoding="gzip"), LIMIT)
    assert (error.status, error.code) == (400, "invalid_encoding")


def test_an_empty_gzip_body_is_400():
    error = api_error(checks.read_body, make_request(b"", encoding="gzip"), LIMIT)
    assert (error.status, error.code) == (400, "invalid_encoding")


# --- rules that fail at run time ----------------------------------------------------------


def test_a_rule_that_fails_at_run_time_is_skipped_with_a_warning():
    # Stored before creation refused such schemas, or a cycle the creation check cannot see.
    from app.rules import LOCAL_ONLY, RuleValidator

    looping = CompiledRule("loops", None, "reject", RuleValidator({"allOf": [{"$ref": "#"}]}, registry=LOCAL_ONLY))
    sound = CompiledRule("needs_user", None, "warn", RuleValidator({"required": ["user"]}))
    rules = AppEntry(id="app-1", api_key_hash="x", rules=(looping, sound))
    for _ in range(2):
        event = checks.check_event(rules, {"event_name": "a"}, max_depth=10, received_at=NOW)
        validation = event["validation"]
        assert validation["status"] == "warning"
        by_rule = {w["rule"]: w for w in validation["warnings"]}
        assert set(by_rule) == {"loops", "needs_user"}
        # Python's recursion limit or the rule's time budget, whichever this machine reaches first.
        assert re.search("RecursionError|RuleTooCostly", by_rule["loops"]["message"])
        assert "skipped" in by_rule["loops"]["message"]
