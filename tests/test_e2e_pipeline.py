"""End to end on real processes: gunicorn and a Celery worker store events in PostgreSQL (on either broker)."""
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import ROOT, sql, wait_until


def stored_count(app_id):
    return sql("SELECT count(*) FROM events WHERE app_id = %s", app_id)[0][0]


def test_single_events_and_batches_are_stored(broker, stack, make_app):
    app_id, key = make_app()
    stack.web()
    stack.worker()
    headers = {"X-API-Key": key}

    single = stack.post(f"/api/logs/{app_id}", {"event_name": " signup ", "userId": 7, "level": "FATAL",
                                                "plan": {"tier": "pro"}}, headers)
    assert single.status_code == 202, single.text
    body = single.json()
    assert body["status"] == "accepted" and body["validation"] == {"status": "valid", "warnings": []}
    batch = stack.post(f"/api/logs/{app_id}/batch", {"events": [{"event_name": "click", "i": i} for i in range(50)]},
                       headers)
    assert batch.status_code == 202, batch.text
    assert batch.json()["accepted"] == 50

    wait_until(lambda: stored_count(app_id) == 51, message="51 stored events")
    row = sql("SELECT event_name, level, user_id, payload, validation, received_at <= processed_at"
              " FROM events WHERE event_id = %s", body["event_id"])[0]
    assert row == ("signup", "critical", "7", {"event_name": " signup ", "userId": 7, "level": "FATAL",
                                                "plan": {"tier": "pro"}}, {"status": "valid", "warnings": []}, True)
    status = stack.get(f"/api/logs/{app_id}/events/{body['event_id']}", headers=headers).json()
    assert status["status"] == "processed" and status["error"] is None and status["processed_at"]


def test_concurrent_single_events_share_messages(broker, stack, make_app):
    app_id, key = make_app()
    stack.web(workers=1, threads=8)
    stack.worker()

    def send(i):
        response = stack.post(f"/api/logs/{app_id}", {"event_name": "tick", "event_id": f"t-{i}"},
                              {"X-API-Key": key})
        assert response.status_code == 202, response.text
        return response.json()["task_id"]

    with ThreadPoolExecutor(16) as pool:
        task_ids = list(pool.map(send, range(300)))
    wait_until(lambda: stored_count(app_id) == 300, message="300 stored events")
    # Group commit: events that arrived together travelled in one message.
    assert len(set(task_ids)) < 300
    assert sql("SELECT count(DISTINCT event_id) FROM events WHERE app_id = %s", app_id)[0][0] == 300


def test_same_event_id_twice_is_stored_once(broker, stack, make_app):
    app_id, key = make_app()
    stack.web()
    stack.worker()
    headers = {"X-API-Key": key}
    for _ in range(2):
        assert stack.post(f"/api/logs/{app_id}", {"event_name": "pay", "event_id": "order-1"}, headers).status_code == 202
    assert stack.post(f"/api/logs/{app_id}/batch", [{"event_name": "pay", "event_id": "order-1"}] * 3,
                      headers=headers).status_code == 202
    wait_until(lambda: stack.get(f"/api/logs/{app_id}/events/order-1", headers=headers).status_code == 200)
    wait_until(lambda: not _pending(stack), message="every message handled")
    assert stored_count(app_id) == 1


def _pending(stack):
    import redis

    return redis.Redis.from_url(stack.env["REDIS_URL"]).hlen("intake:pending:bodies")


def test_rejected_events_leave_nothing(broker, stack, make_app):
    app_id, key = make_app(rules=[{"name": "needs amount", "action": "reject",
                                   "schema": {"required": ["amount"]}, "event_name": "pay"}])
    stack.web()
    stack.worker()
    refused = stack.post(f"/api/logs/{app_id}", {"event_name": "pay"}, {"X-API-Key": key})
    assert refused.status_code == 422
    assert refused.json()["error"]["details"] == [{"path": "", "message": "'amount' is a required property",
                                                    "rule": "needs amount"}]
    assert stack.post(f"/api/logs/{app_id}", {"event_name": "pay", "amount": 3}, {"X-API-Key": key}).status_code == 202
    wait_until(lambda: stored_count(app_id) == 1)
    assert sql("SELECT payload FROM events WHERE app_id = %s", app_id) == [({"event_name": "pay", "amount": 3},)]


def test_inspect_lists_the_three_queues_and_the_tasks(broker, stack):
    stack.worker(queues="default,emails,batch_processing")

    def inspect(command):
        result = subprocess.run([sys.executable, "-m", "celery", "-A", "run:celery", "inspect", command, "--json",
                                 "--timeout", "5"], cwd=ROOT, env=stack.env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    (queues,) = inspect("active_queues").values()
    assert {q["name"] for q in queues} == {"default", "emails", "batch_processing"}
    if broker.name == "amqp":  # replicated, durable: celery_config.AMQP_SETTINGS
        assert [(q["durable"], q["queue_arguments"]) for q in queues] == [(True, {"x-queue-type": "quorum"})] * 3
        assert not broker.declared("celery_delayed_0"), "Celery's delayed delivery is left out (app/amqp_consumer.py)"
    (registered,) = inspect("registered").values()
    assert {"intake.persist_events", "intake.persist_batch", "intake.send_email",
            "intake.redeliver_pending"} <= set(registered)
