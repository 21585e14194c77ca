#!/usr/bin/env python3
"""What a stored row costs PostgreSQL by its shape: batched event, OTLP record and variants of it.

The workers' statement (app/events.py INSERT_GROUP, prepared as the workers prepare it) on
one scratch database at the current schema, groups of --size rows, the shapes taking turns
in every round, a CHECKPOINT before each. Prints one JSON object: for each shape the
backend's CPU ms a row and the WAL bytes a row, per round (the indexes grow from round to
round, and hash-like ids suffer more as they do). README "Send logs with OpenTelemetry".

    .venv/bin/python bench/row_shapes.py --rounds 5
"""
import argparse
import json
import sys
import time
from pathlib import Path

import orjson
import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.ingest import otlp  # noqa: E402  (bench/ is run as a script)
from bench import run, write_path  # noqa: E402
from bench.write_path import admin, backend_cpu, scratch_database  # noqa: E402

SHAPES = {
    "batch": "the bench's batched event: its payload is the client's JSON, its id the client's",
    "otlp": "the bench's OTLP record as Intake stores it (the contract's payload, hash id)",
    "otlp_no_resource_scope": "the same without resource and scope in the payload (the id kept)",
    "otlp_small_payload": "the same with only body, attributes, severity text and time in the payload (the id kept)",
    "otlp_time_first_id": "the OTLP record with an id that starts with its time",
    "otlp_batch_like_id": "the OTLP record with an id shaped like the batched event's",
}


def payload_and_id(shape: str, n: int, now_us: int, tag: str) -> tuple[dict, str]:
    """The n-th row's payload and event_id: the bench's own events, as Intake's code makes them."""
    batch_id = f"{tag}-0-{n // 100}-{n % 100}"
    if shape == "batch":
        return write_path.batch_payload(n, batch_id), batch_id
    # The OTLP phase's n-th record, mapped by the route's own mapper; its time makes its hash unique.
    nanos = now_us * 1000 + n
    (item,) = otlp.log_records(run.otlp_export("bench.shape", [n], nanos))
    payload, reserved, _ = otlp.RecordMapper(max_depth=10).event(item)
    event_id = reserved["event_id"]
    if shape == "otlp_no_resource_scope":
        del payload["resource"], payload["scope"]
    elif shape == "otlp_small_payload":
        payload = {key: payload[key] for key in ("body", "attributes", "severity_text", "time_unix_nano")}
    elif shape == "otlp_time_first_id":
        event_id = f"otlp-{nanos:016x}-{event_id[5:37]}"
    elif shape == "otlp_batch_like_id":
        event_id = batch_id
    return payload, event_id


def group(shape: str, first: int, size: int, tag: str) -> str:
    """One group as the workers send it: the events' JSON document."""
    now_us = int(time.time() * 1_000_000)
    events = []
    for n in range(first, first + size):
        payload, event_id = payload_and_id(shape, n, now_us, tag)
        events.append({"app_id": "bench-app", "event_id": event_id, "event_name": "bench.shape", "level": "info",
                       "user_id": f"u{n % 1000}", "timestamp": now_us, "received_at": now_us,
                       "validation": {"status": "valid", "warnings": []}, "payload": payload})
    return orjson.dumps(events).decode()


def measure(shapes: list[str], size: int, groups: int, rounds: int) -> dict:
    from app.events import EXECUTE_INSERT_GROUP, PREPARE_INSERT_GROUP

    name, url = scratch_database("head")
    try:
        connection = psycopg2.connect(url)
        connection.autocommit = True  # one commit per group, as the workers do
        cursor = connection.cursor()
        cursor.execute(PREPARE_INSERT_GROUP)
        result = {shape: {"about": SHAPES[shape], "cpu_ms_per_row": [], "wal_bytes_per_row": []} for shape in shapes}
        first = 0
        for round_ in range(rounds):
            for shape in shapes:
                documents = [group(shape, first + g * size, size, f"{shape[0]}{round_}") for g in range(groups)]
                first += groups * size
                cursor.execute("CHECKPOINT")
                cursor.execute("SELECT pg_current_wal_lsn()")
                wal_start = cursor.fetchone()[0]
                cpu_start = backend_cpu(cursor)
                for document in documents:
                    cursor.execute(EXECUTE_INSERT_GROUP, (document,))
                cpu = backend_cpu(cursor) - cpu_start
                cursor.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (wal_start,))
                rows = groups * size
                result[shape]["cpu_ms_per_row"].append(round(1000 * cpu / rows, 4))
                result[shape]["wal_bytes_per_row"].append(int(cursor.fetchone()[0]) // rows)
        connection.close()
        return result
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of: {', '.join(SHAPES)}")
    parser.add_argument("--size", type=int, default=100, help="rows per group")
    parser.add_argument("--groups", type=int, default=300, help="groups per shape and round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes: {', '.join(sorted(unknown))}")
    print(json.dumps(measure(shapes, args.size, args.groups, args.rounds), indent=2))


if __name__ == "__main__":
    main()
