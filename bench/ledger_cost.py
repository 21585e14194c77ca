#!/usr/bin/env python3
"""What the pending store (the ledger) costs a publish on RabbitMQ, side by side in one process.

Publishes groups to a scratch RabbitMQ vhost (quorum queue, publisher confirms, as Intake
declares them) in two ways, alternating rounds so that load on the machine hits both alike:

  ledger    Intake's path on AMQP: the group's events written to the pending store (Redis,
            HSET + two ZADD in one MULTI/EXEC), then a message naming the group, confirmed
  message   the alternative: the events inside the message, confirmed; no Redis write

and prints one JSON object: per group size, the median wall and CPU ms per group of each
way, and their ratio. Needs RabbitMQ (rabbitmqctl, as root) and Redis on this machine.

    .venv/bin/python bench/ledger_cost.py --groups 400 --sizes 4,100
"""
import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import redis as redis_lib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import (ADMIN_URL, AMQP_BASE, AMQP_USER, REDIS_BASE, claim_redis_db, rabbitmqctl,  # noqa: E402
                       release_redis_db)


def event(app_id: str, n: int) -> dict:
    """An event as it travels from the API to the workers (app/ingest/checks.py assemble_event)."""
    return {"event_id": f"e-{n}-{uuid.uuid4().hex[:8]}", "event_name": "bench", "level": "info", "user_id": f"u{n}",
            "timestamp": 1_796_000_000_000_000 + n, "validation": {"status": "valid", "warnings": []},
            "app_id": app_id, "received_at": 1_796_000_000_000_000 + n,
            "payload": {"event_name": "bench", "session": f"s{n % 97}",
                        "properties": {"page": "/pricing", "button": "signup", "ms": n % 500, "ok": True}}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=400, help="groups per way and size (in rounds of 50)")
    parser.add_argument("--sizes", default="4,100", help="events per group, comma-separated")
    args = parser.parse_args(argv)
    vhost = f"intake_ledger_{uuid.uuid4().hex[:8]}"
    number = claim_redis_db()
    redis_url = f"{REDIS_BASE}/{number}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, AMQP_USER, ".*", ".*", ".*")
    os.environ.update({"REDIS_URL": redis_url, "CELERY_BROKER_URL": f"{AMQP_BASE}/{vhost}", "DATABASE_URL": ADMIN_URL})
    try:
        from app import create_app

        app = create_app()
        celery = app.extensions["celery"]
        pending = app.extensions["intake.pending"]
        publisher = app.extensions["intake.publisher"]
        results = {}
        with app.app_context():
            with celery.connection_for_write() as connection:  # the queue, declared as a worker does
                celery.amqp.queues["batch_processing"].bind(connection.default_channel).declare()

            def ledger(events):
                publisher.publish("batch_processing", events, [])

            def message(events):
                celery.send_task("intake.persist_batch", args=[events], task_id=str(uuid.uuid4()),
                                 queue="batch_processing", confirm_timeout=publisher.timeout)

            for size in (int(s) for s in args.sizes.split(",")):
                timings = {"ledger": [], "message": []}
                for round_ in range(max(1, args.groups // 50)):
                    for name, publish in (("ledger", ledger), ("message", message))[::1 if round_ % 2 else -1]:
                        for _ in range(50):
                            events = [event("bench", n) for n in range(size)]
                            wall, cpu = time.perf_counter(), time.process_time()
                            publish(events)
                            timings[name].append((time.perf_counter() - wall, time.process_time() - cpu))
                    pending.redis.flushdb()
                results[f"{size}_events"] = {
                    name: {"wall_ms_per_group": round(1000 * statistics.median(w for w, _ in rows), 3),
                           "cpu_ms_per_group": round(1000 * statistics.mean(c for _, c in rows), 3)}
                    for name, rows in timings.items()}
                per = results[f"{size}_events"]
                per["ledger_over_message"] = {
                    "wall": round(per["ledger"]["wall_ms_per_group"] / per["message"]["wall_ms_per_group"], 2),
                    "cpu": round(per["ledger"]["cpu_ms_per_group"] / per["message"]["cpu_ms_per_group"], 2)}
    finally:
        rabbitmqctl("delete_vhost", vhost)
        redis_lib.Redis.from_url(redis_url).flushdb()
        release_redis_db(number)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
