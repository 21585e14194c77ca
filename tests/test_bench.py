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
