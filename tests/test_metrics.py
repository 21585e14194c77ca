"""GET /metrics: Prometheus text summed over every gunicorn worker; worker task metrics on their own port."""
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Process, free_port, sql, wait_until


def samples(text: str) -> dict:
    """{(sample name, frozenset of labels): value} from Prometheus text."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def scrape(stack) -> str:
    response = stack.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return response.text


def test_request_counter_is_the_sum_over_every_gunicorn_worker(stack):
    process = stack.web(workers=2, threads=2)
    labels = {"method": "GET", "route": "/health", "status": "200"}
    before = value(scrape(stack), "intake_http_requests_total", **labels)

    def served_by() -> set:
        complete = process.output().rpartition("\n")[0]  # a line being written is not read yet
        return {line["pid"] for line in map(json.loads, complete.splitlines()) if line.get("route") == "/health"}

    # Rounds of concurrent requests until both workers have served some (the kernel picks).
    count = 0
    with ThreadPoolExecutor(max_workers=6) as pool:
        while count < 600 and (count == 0 or len(served_by()) < 2):
            statuses = list(pool.map(lambda _: requests.get(stack.base_url + "/health", timeout=10).status_code,
                                     range(30)))
            assert statuses == [200] * 30
            count += 30
    assert len(served_by()) == 2

    text = scrape(stack)
    assert value(text, "intake_http_requests_total", **labels) - before == count
    assert value(text, "intake_http_request_duration_seconds_count", method="GET", route="/health") >= count


def test_ingestion_counters_routes_and_queue_depth(broker, stack, make_app):
    stack.web(workers=2, threads=2)
    app_id, key = make_app()
    headers = {"X-API-Key": key}
    for n in range(3):
        assert stack.post(f"/api/logs/{app_id}", {"event_name": f"e{n}"}, headers).status_code == 202
    assert stack.post(f"/api/logs/{app_id}", {"event_name": "x"}, {"X-API-Key": "wrong"}).status_code == 401
    assert stack.post(f"/api/logs/{app_id}", {"no_name": 1}, headers).status_code == 422
    batch = stack.post(f"/api/logs/{app_id}/batch", [{"event_name": "a"}, {"nope": 1}, {"event_name": "b"}], headers)
    assert batch.status_code == 202 and batch.json()["accepted"] == 2
    refused = stack.post(f"/api/logs/{app_id}/batch", [{"nope": 1}, {"nope": 2}], headers)
    assert refused.status_code == 422
    stack.get("/no/such/page")

    text = scrape(stack)
    assert value(text, "intake_events_accepted_total") == 5
    assert value(text, "intake_events_rejected_total", reason="invalid_api_key") == 1
    assert value(text, "intake_events_rejected_total", reason="invalid_event") == 1 + 1 + 2
    assert value(text, "intake_http_requests_total", method="POST", route="/api/logs/<app_id>", status="202") == 3
    assert value(text, "intake_http_requests_total", method="POST", route="/api/logs/<app_id>/batch",
                 status="422") == 1
    assert value(text, "intake_http_requests_total", method="GET", route="<unmatched>", status="404") == 1
    assert app_id not in text  # routes are URL rules, never concrete paths
    assert value(text, "intake_rules_cache_total", result="miss") >= 1
    assert value(text, "intake_rules_cache_total", result="hit") >= 1
    assert value(text, "intake_publish_duration_seconds_count", queue="batch_processing") == 1
    assert value(text, "intake_publish_duration_seconds_count", queue="default") >= 1
    # No worker runs: the messages wait in their queues, read live at scrape time.
    assert value(text, "intake_queue_depth", queue="batch_processing") == 1
    assert value(text, "intake_queue_depth", queue="default") >= 1
    assert value(text, "intake_queue_depth", queue="emails") == 0
    assert value(text, "intake_broker_up") == 1
    # The pending store, read at scrape time: the groups are accepted and not yet stored.
    assert value(text, "intake_pending_groups", queue="batch_processing") == 1
    assert value(text, "intake_pending_groups", queue="default") >= 1
    assert 0 < value(text, "intake_pending_oldest_seconds", queue="default") < 60


def test_worker_exports_task_metrics_on_its_own_port(stack, make_app, test_environment, tmp_path):
    """start_celery_worker.sh with WORKER_METRICS_PORT: the worker's port sums its pool children."""
    stack.web(workers=1)
    port = free_port()
    env = {**stack.env, "WORKER_METRICS_PORT": str(port), "CELERY_CONCURRENCY": "2",
           "PATH": f"{sys.prefix}/bin:{stack.env.get('PATH', '')}"}
    worker = Process("worker-script", ["./start_celery_worker.sh", "batch_processing"], env, tmp_path).start()
    stack.processes.append(worker)
    worker.wait_for_output("ready.", timeout=60)

    app_id, key = make_app()
    for n in range(4):
        batch = [{"event_name": "m", "event_id": f"{n}-{i}"} for i in range(3)]
        assert stack.post(f"/api/logs/{app_id}/batch", batch, {"X-API-Key": key}).status_code == 202
    wait_until(lambda: sql("SELECT count(*) FROM events")[0][0] == 12, timeout=30, message="12 events stored")

    def tasks_stored():
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        return value(text, "intake_worker_tasks_total", task="intake.persist_batch", queue="batch_processing",
                     outcome="stored") == 4 and text

    text = wait_until(tasks_stored, timeout=10, message="4 stored tasks on the worker's metrics port")
    assert value(text, "intake_worker_task_duration_seconds_count", task="intake.persist_batch",
                 queue="batch_processing") == 4
    assert value(text, "intake_worker_task_failures_total", task="intake.persist_batch",
                 queue="batch_processing") == 0
