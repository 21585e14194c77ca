"""bench/: the stock design stores what it accepts; the side-by-side figures and their ratios."""
import importlib
import sys
from pathlib import Path

import pytest
from celery import _state

from bench import run
from tests.conftest import sql


@pytest.fixture
def stock_web(test_environment, monkeypatch):
    """bench/stock/web.py on this run's database and Redis, its tasks run eagerly; Celery's current app kept."""
    monkeypatch.setenv("STOCK_DATABASE_URL", test_environment["DATABASE_URL"])
    monkeypatch.setenv("STOCK_REDIS_URL", test_environment["REDIS_URL"])
    monkeypatch.setenv("STOCK_RATE_LIMIT", "4/minute")
    saved = _state.default_app, getattr(_state._tls, "current_app", None)
    for name in ("bench.stock.web", "bench.stock.tasks"):
        sys.modules.pop(name, None)
    web = importlib.import_module("bench.stock.web")
    web.store_event.app.conf.task_always_eager = True  # a unit test of the bench's own code: no worker
    yield web
    _state.default_app, _state._tls.current_app = saved


def test_the_stock_design_stores_single_events_and_batches(make_app, stock_web):
    app_id, key = make_app()
    client = stock_web.app.test_client()
    headers = {"X-API-Key": key}
    single = client.post(f"/api/logs/{app_id}", json={"event_name": "one", "event_id": "s-1", "user_id": 7},
                         headers=headers)
    assert single.status_code == 202 and single.get_json()["event_id"] == "s-1"
    batch = client.post(f"/api/logs/{app_id}/batch", json=[{"event_name": "many"}, {"level": "info"}],
                        headers=headers)
    assert batch.status_code == 202 and batch.get_json()["accepted"] == 1
    assert client.post(f"/api/logs/{app_id}", json={"event_name": "x"}, headers={"X-API-Key": "no"}).status_code == 401
    # Flask-Limiter counts events per app, before the key is checked: 1 + 2 + 1 of 4 a minute are spent.
    assert client.post(f"/api/logs/{app_id}", json={"event_name": "late"}, headers=headers).status_code == 429
    rows = sql("SELECT event_id, event_name, user_id, level FROM events WHERE app_id = %s ORDER BY event_name", app_id)
    assert [(r[1], r[2], r[3]) for r in rows] == [("many", None, "info"), ("one", "7", "info")]


def test_side_by_side_gives_the_ratios_of_the_issue(tmp_path):
    args = run.parse_args(["--designs", "intake,stock", "--rate-limit", "both", "--output", str(tmp_path / "x")])

    def result(health, on, off, batch):
        return {"health_rps": health, "single": {"e2e_events_per_s": on}, "single_rate_limit_off":
                {"e2e_events_per_s": off}, "batch_e2e_events_per_s": batch, "single_p99_ms": 10.0,
                "api_worker_peak_rss_mb": 90.0, "correct": True, "machine": {"foreign_load_cores": {}}}

    comparison = run.side_by_side(args, {"intake": result(6000, 2400, 2500, 60000),
                                         "stock": result(6000, 900, 1200, 25000)})
    ratios = comparison["ratios"]
    assert round(ratios["single_intake_over_stock"], 3) == round(2400 / 900, 3)
    assert ratios["batch_intake_over_stock"] == 2.4
    assert ratios["intake_single_over_health"] == 0.4
    assert round(ratios["intake_rate_limit_cost"], 3) == 0.04
    assert round(ratios["stock_rate_limit_cost"], 3) == 0.25
    targets = comparison["targets"]
    assert targets["single_intake_over_stock"]["meets_target"] is True
    assert targets["batch_intake_over_stock"]["meets_target"] is False
    assert targets["batch_intake_over_stock"]["meets_minimum"] is True
    assert targets["intake_rate_limit_cost"]["meets_target"] is True
    assert Path(args.output).parent == tmp_path


def test_the_broker_option_defaults_to_redis_and_both_runs_redis_first():
    assert run.parse_args([]).brokers == ["redis"]
    assert run.parse_args(["--broker", "amqp"]).brokers == ["amqp"]
    assert run.parse_args(["--broker", "both"]).brokers == ["redis", "amqp"]
    with pytest.raises(SystemExit):
        run.parse_args(["--broker", "kafka"])


def test_broker_comparison_gives_amqp_over_redis_and_the_target(tmp_path):
    args = run.parse_args(["--designs", "intake,stock", "--broker", "both", "--repeat", "2",
                           "--output", str(tmp_path / "x")])

    def phase(e2e, publish=None):
        return {"e2e_events_per_s": e2e, "api_cpu_ms_per_event": 0.5, "worker_cpu_ms_per_event": 0.3,
                "postgres_cpu_ms_per_event": 0.1, "redis_cpu_ms_per_event": 0.05, "rabbitmq_cpu_ms_per_event": 0.2,
                "publish_ms_per_message": publish, "events_per_message": 5.0, "messages_queued_at_load_end": 3,
                "drain_s": 0.5}

    def result(single, batch, runs=None):
        return {"single_e2e_events_per_s": single, "batch_e2e_events_per_s": batch, "otlp_e2e_records_per_s": None,
                "single_accepted_per_s": single, "batch_accepted_events_per_s": batch, "single_p50_ms": 5.0,
                "single_p99_ms": 20.0, "batch_p50_ms": 30.0, "batch_p99_ms": 90.0, "single": phase(single, 2.0),
                "batch": phase(batch, 9.0), "correct": True, "machine": {"foreign_load_cores": {}},
                "runs": runs}

    def runs(*pairs):
        return [{"single": {"e2e_events_per_s": s}, "batch": {"e2e_events_per_s": b}} for s, b in pairs]

    compared = run.broker_comparison(args, {
        "intake": {"redis": result(1000, 40000, runs((1000, 40000), (900, 42000))),
                   "amqp": result(950, 34000, runs((800, 34000), (990, 36000)))},
        "stock": {"redis": result(400, 16000), "amqp": result(300, 16000)}})
    intake = compared["intake"]["amqp_over_redis"]
    assert intake["single_e2e"] == 0.95 and intake["batch_e2e"] == 0.85
    assert intake["per_run"]["single_e2e"] == [0.8, 1.1]
    assert compared["stock"]["amqp_over_redis"]["single_e2e"] == 0.75
    assert "per_run" not in compared["stock"]["amqp_over_redis"]
    assert compared["intake"]["amqp"]["cpu_ms_per_event"]["single"] == {
        "api": 0.5, "workers": 0.3, "postgres": 0.1, "redis_server": 0.05, "rabbitmq_server": 0.2}
    assert compared["intake"]["redis"]["publish_ms_per_message"] == {"single": 2.0, "batch": 9.0}
    assert compared["intake_over_stock"]["amqp"] == {"single": 950 / 300, "batch": 34000 / 16000}
    targets = compared["targets"]
    assert targets["single_e2e_amqp_over_redis"] == {"value": 0.95, "target": 0.9, "meets_target": True}
    assert targets["batch_e2e_amqp_over_redis"]["meets_target"] is False
    lines = run.comparison_lines(compared)
    assert lines[0] == ("intake amqp/redis: single e2e 950 / 1,000 events/s = 0.95 (meets 0.9), "
                        "batch e2e 34,000 / 40,000 events/s = 0.85 (misses 0.9)")
    assert any(line.startswith("intake/stock on amqp: single 3.17") for line in lines)


def test_broker_comparison_splits_cpu_per_event_into_intakes_processes_and_the_broker_servers(tmp_path):
    args = run.parse_args(["--broker", "both", "--output", str(tmp_path / "x")])

    def result(api, redis_server, rabbitmq_server):
        phase = {"e2e_events_per_s": 500.0, "api_cpu_ms_per_event": api, "worker_cpu_ms_per_event": 0.5,
                 "postgres_cpu_ms_per_event": 0.25, "redis_cpu_ms_per_event": redis_server,
                 "rabbitmq_cpu_ms_per_event": rabbitmq_server, "publish_ms_per_message": None,
                 "events_per_message": 4.0, "messages_queued_at_load_end": 0, "drain_s": 0.1}
        return {"single_e2e_events_per_s": 500.0, "batch_e2e_events_per_s": 500.0, "otlp_e2e_records_per_s": None,
                "single_accepted_per_s": 500.0, "batch_accepted_events_per_s": 500.0, "single_p50_ms": 5.0,
                "single_p99_ms": 20.0, "batch_p50_ms": 30.0, "batch_p99_ms": 90.0, "single": phase, "batch": phase,
                "correct": True, "machine": {"foreign_load_cores": {}}, "runs": None}

    # The same CPU in Intake's processes; RabbitMQ takes 0.35 ms per event where Redis takes 0.1.
    compared = run.broker_comparison(args, {"intake": {"redis": result(1.25, 0.1, 0.0),
                                                       "amqp": result(1.25, 0.05, 0.35)}})
    split = compared["intake"]["redis_over_amqp_cpu_per_event"]["single"]
    assert split["intake"] == 1.0
    assert split["all"] == 2.1 / 2.4
    assert "  CPU per event redis/amqp: single 1.00 for Intake's processes, 0.88 with the broker servers, " \
           "batch 1.00 for Intake's processes, 0.88 with the broker servers" in run.comparison_lines(compared)


def test_row_shapes_stores_the_contracts_otlp_payload_and_measures_every_shape():
    from bench import row_shapes

    payload, event_id = row_shapes.payload_and_id("otlp", 7, 1_700_000_000_000_000, "t")
    assert set(payload) == {"body", "attributes", "resource", "scope", "trace_id", "span_id", "severity_text",
                            "severity_number", "time_unix_nano", "observed_time_unix_nano", "flags"}
    assert event_id.startswith("otlp-") and len(event_id) == 69
    _, time_first = row_shapes.payload_and_id("otlp_time_first_id", 7, 1_700_000_000_000_000, "t")
    assert time_first.startswith(f"otlp-{1_700_000_000_000_000_007:016x}-")
    result = row_shapes.measure(list(row_shapes.SHAPES), size=4, groups=2, rounds=1)
    assert set(result) == set(row_shapes.SHAPES)
    assert all(len(shape["cpu_ms_per_row"]) == 1 and shape["wal_bytes_per_row"][0] > 0 for shape in result.values())
