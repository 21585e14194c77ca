"""Partitions and retention on real PostgreSQL: partitions made ahead, whole weeks dropped, edges deleted in chunks."""
import json
import threading
import time
from datetime import datetime, timedelta, timezone

from app import events, retention, rollups
from tests.conftest import ROOT, sql
from tests.test_persistence import make_event

UTC = timezone.utc


def app_with_retention(make_app, days):
    app_id = make_app()[0]
    sql("UPDATE apps SET retention_days = %s WHERE id = %s", days, app_id)
    return app_id


def partition_names():
    return [name for (name,) in sql("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                    "WHERE i.inhparent = 'events'::regclass ORDER BY 1")]


def where(app_id, event_id):
    return sql("SELECT tableoid::regclass::text FROM events WHERE app_id = %s AND event_id = %s", app_id, event_id)


def test_partitions_are_made_ahead_idempotently(ctx):
    later = datetime.now(UTC) + timedelta(weeks=12)
    made = retention.ensure_partitions(now=later)["created"]
    monday = retention._monday(later)
    assert made == [f"events_p{monday + timedelta(weeks=w):%Y%m%d}" for w in range(retention.WEEKS_AHEAD + 1)]
    assert retention.ensure_partitions(now=later) == {"created": []}
    assert set(made) <= set(partition_names()) and "events_default" in partition_names()
    assert retention.ensure_partitions() == {"created": []}, "the migration made this week and the next ones"
    for name in made:
        sql(f"DROP TABLE {name}")


def test_any_timestamp_is_stored_this_week_in_its_partition_and_an_old_one_in_the_default(ctx, make_app):
    app_id = make_app()[0]
    events.store_events([make_event(app_id, event_id="now"),
                         make_event(app_id, event_id="ancient", timestamp="1999-01-01T00:00:00Z")])
    monday = retention._monday(datetime.now(UTC))
    assert where(app_id, "now") == [(f"events_p{monday:%Y%m%d}",)]
    assert where(app_id, "ancient") == [("events_default",)]


def test_purge_drops_expired_weeks_deletes_expired_edges_and_keeps_the_rest_and_the_rollups(ctx, make_app, runner):
    short, long = app_with_retention(make_app, 7), app_with_retention(make_app, 60)
    now = datetime.now(UTC)
    old = now - timedelta(weeks=20)
    made = retention.ensure_partitions(now=old)["created"]  # weeks 20..16 ago: all expired for both apps
    in_old_week = (retention._monday(old) + timedelta(days=2)).isoformat()
    three_weeks_ago = (now - timedelta(weeks=3)).isoformat()  # expired for `short` only
    batch = []
    for app_id in (short, long):
        batch += [make_event(app_id, event_id=f"old-{i}", timestamp=in_old_week) for i in range(5)]
        batch += [make_event(app_id, event_id=f"mid-{i}", timestamp=three_weeks_ago) for i in range(4)]
        batch += [make_event(app_id, event_id=f"ancient-{i}", timestamp="2001-01-01T00:00:00Z") for i in range(3)]
        batch += [make_event(app_id, event_id=f"new-{i}") for i in range(2)]
    events.store_events(batch)
    rollups.refresh()
    old_partition = f"events_p{retention._monday(old):%Y%m%d}"
    assert where(short, "old-0") == [(old_partition,)]

    result = runner.invoke(args=["retention", "purge"])
    assert result.exit_code == 0, result.output
    # short: 5 old + 4 mid + 3 ancient; long: 5 old + 3 ancient
    assert json.loads(result.output) == {"deleted": 20}
    assert old_partition not in partition_names(), "a week expired for every app in it is dropped whole"
    assert sorted(sql("SELECT app_id, event_id FROM events")) == sorted(
        [(short, "new-0"), (short, "new-1")] + [(long, f"mid-{i}") for i in range(4)] + [(long, "new-0"),
                                                                                         (long, "new-1")])
    assert sql("SELECT sum(info) FROM rollups WHERE bucket = 'd'") == [(28,)], "rollups outlive the events"
    assert json.loads(runner.invoke(args=["retention", "purge"]).output) == {"deleted": 0}
    for name in made:
        sql(f"DROP TABLE IF EXISTS {name}")


def test_a_week_one_app_still_keeps_is_not_dropped(ctx, make_app):
    short, long = app_with_retention(make_app, 7), app_with_retention(make_app, 3650)
    old = datetime.now(UTC) - timedelta(weeks=30)
    made = retention.ensure_partitions(now=old)["created"]
    stamp = (retention._monday(old) + timedelta(days=1)).isoformat()
    events.store_events([make_event(short, event_id="s", timestamp=stamp), make_event(long, event_id="l", timestamp=stamp)])
    assert retention.purge() == {"deleted": 1}
    assert sql("SELECT app_id FROM events") == [(long,)]
    assert f"events_p{retention._monday(old):%Y%m%d}" in partition_names()
    for name in made:
        sql(f"DROP TABLE IF EXISTS {name}")


def test_keys_past_the_window_are_purged_and_recent_ones_kept(ctx, make_app):
    app_id = app_with_retention(make_app, 7)
    events.store_events([make_event(app_id, event_id=f"k{i}") for i in range(3)])
    sql("UPDATE event_keys SET stored_at = now() - interval '9 days' WHERE event_id = 'k0'")
    sql("UPDATE event_keys SET stored_at = now() - interval '7 days 12 hours' WHERE event_id = 'k1'")
    retention.purge()
    # k0: past retention + one day of grace; k1 still inside the grace day
    assert sorted(sql("SELECT event_id FROM event_keys")) == [("k1",), ("k2",)]


def test_ingestion_goes_on_during_a_purge(ctx, make_app, monkeypatch):
    monkeypatch.setattr(retention, "DELETE_CHUNK", 500)
    app_id = app_with_retention(make_app, 1)
    for chunk in range(10):
        events.store_events([make_event(app_id, event_id=f"x{chunk}-{i}", timestamp="2002-02-02T00:00:00Z")
                             for i in range(1000)])
    done, latencies, results = threading.Event(), [], []

    def purge():
        with ctx.app_context():
            results.append(retention.purge())
        done.set()

    thread = threading.Thread(target=purge)
    thread.start()
    n = 0
    while not done.is_set() or n < 20:
        started = time.monotonic()
        events.store_events([make_event(app_id, event_id=f"live-{n}-{i}") for i in range(10)])
        latencies.append(time.monotonic() - started)
        n += 1
    thread.join()
    assert results == [{"deleted": 10_000}]
    assert sql("SELECT count(*) FROM events WHERE app_id = %s", app_id) == [(n * 10,)]
    assert max(latencies) < 2.0, max(latencies)


def test_two_purges_and_two_partition_runs_at_once_neither_fail_nor_count_twice(ctx, make_app, monkeypatch):
    monkeypatch.setattr(retention, "DELETE_CHUNK", 7)  # many chunks
    app_id = app_with_retention(make_app, 7)
    now = datetime.now(UTC)
    old = now - timedelta(weeks=20)
    made = retention.ensure_partitions(now=old)["created"]
    in_old_week = (retention._monday(old) + timedelta(days=2)).isoformat()
    events.store_events([make_event(app_id, event_id=f"old-{i}", timestamp=in_old_week) for i in range(30)]
                        + [make_event(app_id, event_id=f"mid-{i}", timestamp=(now - timedelta(weeks=3)).isoformat())
                           for i in range(20)]
                        + [make_event(app_id, event_id=f"ancient-{i}", timestamp="2001-01-01T00:00:00Z")
                           for i in range(10)]
                        + [make_event(app_id, event_id="new")])
    ahead = now + timedelta(weeks=40)
    expected = [f"events_p{retention._monday(ahead) + timedelta(weeks=w):%Y%m%d}" for w in range(retention.WEEKS_AHEAD + 1)]
    jobs = [retention.purge, retention.purge, lambda: retention.ensure_partitions(now=ahead)["created"],
            lambda: retention.ensure_partitions(now=ahead)["created"]]
    start, results, errors = threading.Barrier(len(jobs)), [None] * len(jobs), []

    def run(index):
        try:
            with ctx.app_context():
                start.wait()
                results[index] = jobs[index]()
        except Exception as error:  # noqa: BLE001 - any error fails the test below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    # A step that lost a 2 s lock_timeout under load is left to the next run: one more of each finishes.
    deleted = results[0]["deleted"] + results[1]["deleted"] + retention.purge()["deleted"]
    created = results[2] + results[3] + retention.ensure_partitions(now=ahead)["created"]
    assert deleted == 60, "every expired event deleted once"
    assert sql("SELECT event_id FROM events WHERE app_id = %s", app_id) == [("new",)]
    assert sorted(created) == expected, "each partition made, and reported, once"
    assert set(expected) <= set(partition_names())
    for name in made + expected:
        sql(f"DROP TABLE IF EXISTS {name}")


def test_the_lifecycle_jobs_are_on_beat_and_call_the_cli_functions(ctx):
    import celery_config
    from app import tasks

    schedule = {entry["task"]: entry for entry in celery_config.beat_schedule.values()}
    for name in ("intake.ensure_partitions", "intake.purge_expired", "intake.resume_app_deletions"):
        assert name in schedule
        # No pile-up: a message not started within one period gives way to the next one.
        period = 24 * 3600.0 if name == "intake.purge_expired" else schedule[name]["schedule"]  # a daily crontab
        assert schedule[name]["options"]["expires"] < period, name
    # The tasks call the same functions as the CLI.
    assert tasks.refresh_rollups() == {"events_rolled_up": 0}
    assert tasks.ensure_partitions() == {"created": []}
    assert tasks.purge_expired() == {"deleted": 0}


def test_the_readme_beat_table_is_the_schedule():
    import celery_config

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Beat schedule", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells
    assert set(rows) == set(celery_config.beat_schedule), "the README's table names every entry and no other"
    for name, entry in celery_config.beat_schedule.items():
        task, queue = rows[name][1], rows[name][2]
        assert task == f"`{entry['task']}`", name
        assert queue == f"`{celery_config.task_routes[entry['task']]['queue']}`", name
