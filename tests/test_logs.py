"""Logs: JSON lines from gunicorn and the workers; the request id travels from the request to the task."""
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.logs import MAX_REQUEST_ID
from tests.conftest import Process, sql, wait_until


def json_lines(text: str) -> list[dict]:
    """Every complete line parsed as a JSON object (fails on a line that is not one)."""
    complete = text.rpartition("\n")[0]
    lines = [line for line in complete.splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert isinstance(entry, dict), line
        parsed.append(entry)
    return parsed


@pytest.fixture
def worker_script(stack, tmp_path):
    """start_celery_worker.sh for default and batch_processing, as the Procfile runs it."""
    env = {**stack.env, "CELERY_CONCURRENCY": "1", "PATH": f"{sys.prefix}/bin:{stack.env.get('PATH', '')}"}
    process = Process("worker-script", ["./start_celery_worker.sh", "default", "batch_processing"], env,
                      tmp_path).start()
    stack.processes.append(process)
    wait_until(lambda: process.output().count(" ready.") == 2, timeout=60, message="both workers ready")
    return process


def test_request_and_task_lines_are_json_and_share_the_request_id(stack, worker_script, make_app):
    # A wide group-commit window, so that concurrent single events travel together.
    web = stack.web(workers=1, threads=8, INGEST_GROUP_WINDOW_MS="300")
    app_id, key = make_app()
    marker = "payload-content-that-must-not-be-logged"
    single = stack.post(f"/api/logs/{app_id}", {"event_name": "signup", "secret": marker},
                        {"X-API-Key": key, "X-Request-ID": "req-single-1"})
    assert single.status_code == 202
    assert single.headers["X-Request-ID"] == "req-single-1"
    batch = stack.post(f"/api/logs/{app_id}/batch", [{"event_name": "a", "secret": marker}, {"event_name": "b"}],
                       {"X-API-Key": key, "X-Request-ID": "req-batch-1"})
    assert batch.status_code == 202
    wait_until(lambda: sql("SELECT count(*) FROM events")[0][0] == 3, timeout=30, message="3 events stored")

    def task_lines():
        lines = [e for e in json_lines(worker_script.output()) if e.get("logger") == "intake.task"]
        return len(lines) >= 2 and lines

    tasks = {entry["task"]: entry for entry in wait_until(task_lines, timeout=10, message="two task lines")}
    persisted = tasks["intake.persist_events"]
    assert persisted["request_id"] == "req-single-1"
    assert persisted["queue"] == "default"
    assert persisted["outcome"] == "stored"
    assert persisted["task_id"] == single.json()["task_id"]
    assert persisted["retries"] == 0 and persisted["duration_ms"] >= 0
    batched = tasks["intake.persist_batch"]
    assert (batched["request_id"], batched["queue"]) == ("req-batch-1", "batch_processing")
    assert batched["outcome"] == "stored"

    requests_logged = [e for e in json_lines(web.output()) if e.get("logger") == "intake.request"]
    single_line = next(e for e in requests_logged if e["request_id"] == "req-single-1")
    assert single_line["method"] == "POST"
    assert single_line["route"] == "/api/logs/<app_id>"
    assert single_line["status"] == 202
    assert single_line["app_id"] == app_id
    assert single_line["duration_ms"] > 0
    assert any(e["message"].startswith("Booting worker") for e in json_lines(web.output()))  # gunicorn's own

    # Single events from several requests share one message: its task names every request.
    group_ids = {f"req-group-{n}" for n in range(4)}
    with ThreadPoolExecutor(max_workers=4) as pool:
        sent = list(pool.map(lambda rid: stack.post(f"/api/logs/{app_id}", {"event_name": "g"},
                                                    {"X-API-Key": key, "X-Request-ID": rid}), sorted(group_ids)))
    assert [response.status_code for response in sent] == [202] * 4
    wait_until(lambda: sql("SELECT count(*) FROM events")[0][0] == 7, timeout=30, message="7 events stored")

    def group_lines():
        lines = [e for e in json_lines(worker_script.output())
                 if e.get("logger") == "intake.task" and str(e.get("request_id")).count("req-group-")]
        logged = set()
        for entry in lines:
            ids = entry["request_id"]
            logged.update(ids if isinstance(ids, list) else [ids])
        return logged == group_ids and lines

    lines = wait_until(group_lines, timeout=10, message="the grouped requests' ids in task lines")
    assert any(isinstance(e["request_id"], list) and len(e["request_id"]) >= 2 for e in lines)

    everything = web.output() + worker_script.output()
    assert key not in everything and marker not in everything


def test_a_request_id_is_made_when_absent_and_cleaned_when_given(client):
    made = client.get("/health").headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert client.get("/health").headers["X-Request-ID"] != made
    dirty = client.get("/health", headers={"X-Request-ID": 'abc def\t"<x>";' + "y" * 500}).headers["X-Request-ID"]
    assert dirty.startswith("abcdefx") and len(dirty) == MAX_REQUEST_ID
    assert client.get("/health", headers={"X-Request-ID": "\t;"}).headers["X-Request-ID"] != "\t;"


def test_errors_are_logged_with_their_code(app, client, caplog):
    caplog.set_level("INFO", logger="intake.request")
    response = client.get("/no/such/route", headers={"X-Request-ID": "lost-1"})
    assert response.status_code == 404
    record = next(r for r in caplog.records if r.name == "intake.request" and r.fields["request_id"] == "lost-1")
    assert record.fields["route"] == "<unmatched>"
    assert record.fields["status"] == 404
    assert record.fields["error"] == "not_found"
