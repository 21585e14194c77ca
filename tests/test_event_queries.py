"""Event queries over HTTP: filters, keyset pages (no duplicates, no gaps, newest first), one event, index use."""
import base64
import itertools
import json
import struct
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from app.events import insert_events
from app.extensions import db
from app.manage import event_queries
from tests.conftest import sql

BASE = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)
NAMES, LEVELS, USERS = ("signup", "purchase", "page_view"), ("debug", "info", "warning", "error", "critical"), \
    (None, "u1", "u2", "42")


def us(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)


def event(app_id, n, *, at=None, **fields):
    return {"app_id": app_id, "event_id": f"ev-{n}", "event_name": NAMES[n % 3], "level": LEVELS[n % 5],
            "user_id": USERS[n % 4], "timestamp": us(at or BASE + timedelta(seconds=n // 3)),
            "received_at": us(BASE + timedelta(hours=1)), "validation": {"status": "valid", "warnings": []},
            "payload": {"event_name": NAMES[n % 3], "n": n}, **fields}


@pytest.fixture
def owner(make_user):
    return make_user()[1]


@pytest.fixture
def shop(app, client, owner):
    """An app of `owner` with 230 stored events (timestamps tie in threes), and 20 of another app."""
    app_id = client.post("/api/apps", json={"name": "Shop"}, headers=owner).get_json()["id"]
    other = client.post("/api/apps", json={"name": "Other"}, headers=owner).get_json()["id"]
    with app.app_context():
        insert_events([event(app_id, n) for n in range(230)] + [event(other, n) for n in range(20)])
    return app_id


def listing(client, owner, app_id, **query):
    return client.get(f"/api/apps/{app_id}/events", query_string=query, headers=owner)


def every_page(client, owner, app_id, **query):
    """Follow next_cursor to the end; return the event ids in order and the number of pages."""
    ids, pages, cursor = [], 0, None
    while True:
        response = listing(client, owner, app_id, **query, **({"cursor": cursor} if cursor else {}))
        assert response.status_code == 200, response.get_data(as_text=True)
        body = response.get_json()
        ids += [row["event_id"] for row in body["events"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return ids, pages


def expected(app_id, where="", *params):
    rows = sql(f"SELECT event_id FROM events WHERE app_id = %s {where} ORDER BY timestamp DESC, id DESC",
               app_id, *params)
    return [row[0] for row in rows]


def test_pages_round_trip_newest_first_without_duplicates_or_gaps(client, owner, shop):
    ids, pages = every_page(client, owner, shop, limit=17)
    assert ids == expected(shop) and len(ids) == 230 == len(set(ids))
    assert pages == 14  # 13 full pages and the rest; the last page says so with a null cursor
    first = listing(client, owner, shop, limit=3).get_json()["events"]
    assert first[0] == {"event_id": "ev-229", "event_name": NAMES[229 % 3], "level": LEVELS[229 % 5],
                        "user_id": USERS[229 % 4], "timestamp": "2026-11-20T12:01:16Z",
                        "received_at": "2026-11-20T13:00:00Z", "processed_at": first[0]["processed_at"],
                        "validation_status": "valid"}
    # A page ending exactly at the end has no next page.
    assert listing(client, owner, shop, limit=230).get_json()["next_cursor"] is None
    assert len(listing(client, owner, shop).get_json()["events"]) == 100  # default limit
    assert len(listing(client, owner, shop, limit=1000).get_json()["events"]) == 230


def test_every_filter_combination(client, owner, shop):
    values = {"event_name": ("purchase", "event_name = %s"), "level": ("warning", "level = %s"),
              "user_id": ("u2", "user_id = %s")}
    window = {"since": "2026-11-20T12:00:20Z", "until": "2026-11-20T12:01:00"}
    for size in range(4):
        for names in itertools.combinations(values, size):
            query = {name: values[name][0] for name in names}
            where = "".join(f" AND {values[name][1]}" for name in names)
            params = [values[name][0] for name in names]
            assert every_page(client, owner, shop, limit=7, **query)[0] == expected(shop, where, *params), names
            windowed = expected(shop, where + " AND timestamp >= %s AND timestamp < %s", *params,
                                BASE + timedelta(seconds=20), BASE + timedelta(seconds=60))
            assert every_page(client, owner, shop, limit=7, **query, **window)[0] == windowed, names
    # Levels in any case and by alias; user ids sent as integers are stored as strings.
    assert every_page(client, owner, shop, level="WARN")[0] == expected(shop, "AND level = 'warning'")
    assert every_page(client, owner, shop, user_id="42")[0] == expected(shop, "AND user_id = '42'")
    assert every_page(client, owner, shop, event_name="nothing")[0] == []


def test_since_is_inclusive_and_until_exclusive(client, owner, shop):
    ids = every_page(client, owner, shop, since="2026-11-20T12:00:10Z", until="2026-11-20T12:00:11Z")[0]
    assert sorted(ids) == ["ev-30", "ev-31", "ev-32"]
    offset = every_page(client, owner, shop, since="2026-11-20T13:00:10+01:00", until="2026-11-20T12:00:11Z")[0]
    assert offset == ids


def test_read_one_event(app, client, owner, shop):
    warned = {"status": "warning", "warnings": [{"path": "/plan", "message": "'plan' is required", "rule": "r"}]}
    with app.app_context():
        insert_events([event(shop, 1000, event_id="order-1", validation=warned,
                             payload={"event_name": "purchase", "amount": 12.5, "items": [1, 2]}),
                       event(shop, 1001, event_id="orders/2026/ü?#1")])
    response = client.get(f"/api/apps/{shop}/events/order-1", headers=owner)
    assert response.status_code == 200
    body = response.get_json()
    [(processed_at,)] = sql("SELECT processed_at FROM events WHERE event_id = 'order-1'")
    assert body == {"event_id": "order-1", "event_name": NAMES[1000 % 3], "level": LEVELS[0], "user_id": None,
                    "timestamp": "2026-11-20T12:05:33Z", "received_at": "2026-11-20T13:00:00Z",
                    "processed_at": processed_at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
                    "validation": warned, "payload": {"event_name": "purchase", "amount": 12.5, "items": [1, 2]}}
    assert listing(client, owner, shop, limit=2).get_json()["events"][1]["validation_status"] == "warning"
    # Any client event id can be read back: slashes, non-ASCII, URL delimiters (percent-encoded).
    odd = client.get(f"/api/apps/{shop}/events/orders/2026/%C3%BC%3F%231", headers=owner)
    assert odd.status_code == 200 and odd.get_json()["event_id"] == "orders/2026/ü?#1"
    assert client.get(f"/api/apps/{shop}/events/orders%2F2026%2F%C3%BC%3F%231", headers=owner).status_code == 200


@pytest.mark.parametrize("event_id", ["missing", "x" * 129, "%00", "ev-%00"])
def test_unknown_events_are_404(client, owner, shop, event_id):
    response = client.get(f"/api/apps/{shop}/events/{event_id}", headers=owner)
    assert response.status_code == 404 and response.get_json()["error"]["code"] == "event_not_found"


def test_an_event_of_another_app_is_404(client, owner, shop):
    other = sql("SELECT id FROM apps WHERE name = 'Other'")[0][0]
    assert client.get(f"/api/apps/{other}/events/ev-3", headers=owner).status_code == 200
    assert sql("SELECT count(*) FROM events WHERE event_id = 'ev-225'") == [(1,)]  # only the first app has it
    assert client.get(f"/api/apps/{other}/events/ev-225", headers=owner).status_code == 404


def forged(version=1, micros=0, row_id=0, raw=None):
    packed = raw if raw is not None else struct.pack(">Bqq", version, micros, row_id)
    return base64.urlsafe_b64encode(packed).decode().rstrip("=")


@pytest.mark.parametrize("cursor", ["", "abc", "!!!!", "é", "%00", "A" * 5000, forged(version=2),
                                    forged(micros=2**62), forged(micros=-(2**62)), forged(raw=b"\x01" * 16),
                                    forged(raw=b"\x01" * 18), forged() + "=="])
def test_bad_cursors_are_400(client, owner, shop, cursor):
    response = listing(client, owner, shop, cursor=cursor)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.get_json()["error"]["code"] == "invalid_cursor"


@pytest.mark.parametrize(
    "query",
    [{"limit": 0}, {"limit": 1001}, {"limit": "x"}, {"limit": "1.5"}, {"limit": -1}, {"level": "loud"},
     {"level": ""}, {"since": "yesterday"}, {"until": "2026-13-01"}, {"since": "0001-01-01T00:00:00+01:00"},
     {"since": "2026-11-21T00:00:00Z", "until": "2026-11-20T00:00:00Z"}, {"event_name": ""},
     {"event_name": "e" * 256}, {"event_name": "a\x00b"}, {"user_id": "\x00"}, {"user_id": "u" * 256}],
)
def test_bad_filters_are_422_in_the_error_shape(client, owner, shop, query):
    response = listing(client, owner, shop, **query)
    assert response.status_code == 422, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request" and error["details"] and error["details"][0]["path"].startswith("/")


# --- served from indexes -------------------------------------------------------------------


def scans(plan: dict) -> list[tuple[str, str | None]]:
    found = [(plan["Node Type"], plan.get("Index Name"))] if plan.get("Relation Name") or plan.get("Index Name") else []
    for child in plan.get("Plans", []):
        found += scans(child)
    return found


# On a table partitioned by timestamp each partition has its own copy of an index: name them by the
# table's index (pg_inherits links them), so that the assertions hold on either shape of `events`.
PARENT_INDEX = """SELECT child.relname, parent.relname FROM pg_inherits
                  JOIN pg_class child ON child.oid = inhrelid JOIN pg_class parent ON parent.oid = inhparent
                  WHERE child.relkind = 'i'"""


def table_scans(connection, plan: dict) -> list[tuple[str, str | None]]:
    """The plan's scans, one per index of `events` used (one per partition collapsed into one)."""
    parents = dict(connection.exec_driver_sql(PARENT_INDEX).all())
    return list(dict.fromkeys((node, parents.get(index, index)) for node, index in scans(plan)))


INDEX_CASES = [
    ({}, "ix_events_app_timestamp"),
    ({"since": BASE - timedelta(days=3), "until": BASE - timedelta(days=1)}, "ix_events_app_timestamp"),
    ({"event_name": "event_7"}, "ix_events_app_name_timestamp"),
    ({"level": "critical"}, "ix_events_app_level_timestamp"),
    ({"user_id": "user-42"}, "ix_events_app_user_timestamp"),
    ({"event_name": "event_7", "level": "error"}, None),
    ({"event_name": "event_7", "user_id": "user-42", "level": "info", "since": BASE - timedelta(days=9)}, None),
    ({"cursor": event_queries.encode_cursor(BASE - timedelta(days=2), 10**9)}, "ix_events_app_timestamp"),
    ({"cursor": event_queries.encode_cursor(BASE - timedelta(days=2), 10**9), "level": "error"},
     "ix_events_app_level_timestamp"),
    ({"level": "info"}, "ix_events_app_timestamp"),  # the level index holds warning and up only
    ({"level": "debug", "since": BASE - timedelta(days=3)}, "ix_events_app_timestamp"),
]


def test_listings_are_index_scans(app):
    """On 20,000 rows shaped like bench/explain_events.py's million, each listing reads the right index."""
    from bench.explain_events import LOAD, MAIN_APP, OTHER_APPS

    with app.app_context():
        with db.engine.begin() as connection:
            connection.exec_driver_sql(LOAD, {"main": MAIN_APP, "other1": OTHER_APPS[0], "other2": OTHER_APPS[1],
                                              "end": BASE, "days": 30, "rows": 20_000})
            connection.exec_driver_sql("ANALYZE events")
        for filters, index in INDEX_CASES:
            compiled = event_queries.listing_query(MAIN_APP, limit=100, **filters).compile(dialect=db.engine.dialect)
            with db.engine.begin() as connection:
                # On a small table a sequential or bitmap scan and a sort can cost less than an ordered
                # index scan; without them, the planner still picks the index among ours.
                connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
                connection.exec_driver_sql("SET LOCAL enable_bitmapscan = off")
                [plan] = connection.exec_driver_sql("EXPLAIN (FORMAT JSON) " + str(compiled), compiled.params).scalar()
                found = table_scans(connection, plan["Plan"])
                partitioned = connection.exec_driver_sql(
                    "SELECT relkind = 'p' FROM pg_class WHERE relname = 'events'").scalar()
            # (Partitioned, each partition's planner may pick another of the indexes for its few rows.)
            assert {node for node, _ in found} == {"Index Scan"}, (filters, found)
            assert index is None or index in {name for _, name in found}, (filters, found)
            # An Incremental Sort only orders ties by id. (Partitioned, a few rows in the default
            # partition may be read by its primary key and sorted: the planner's call.)
            assert partitioned or '"Sort"' not in json.dumps(plan), (filters, plan)


def test_the_event_look_up_is_an_index_scan(app, shop):
    with app.app_context(), db.engine.begin() as connection:
        connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
        [plan] = connection.execute(sa.text(
            "EXPLAIN (FORMAT JSON) SELECT * FROM events WHERE app_id = :a AND event_id = :e LIMIT 1"),
            {"a": shop, "e": "ev-3"}).scalar()
        found = table_scans(connection, plan["Plan"])
    # Without a timestamp the look-up reads that index in every partition: one scan per partition.
    assert [node for node, _ in found] in (["Index Scan"], ["Bitmap Heap Scan", "Bitmap Index Scan"]), found
