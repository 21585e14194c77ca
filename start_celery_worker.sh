#!/usr/bin/env bash
# Start Celery workers: one per queue named on the command line, or one for each of
# default, emails and batch_processing. Waits for the broker first; SIGTERM (or Ctrl-C)
# is passed to every worker for a warm shutdown: running tasks finish, the rest stay queued.
set -uo pipefail
cd "$(dirname "$0")"

queues=("$@")
[ ${#queues[@]} -eq 0 ] && queues=(default emails batch_processing)

python - <<'PY' || exit 1
import sys, time
from run import celery
deadline = time.monotonic() + 60
while True:
    try:
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        break
    except Exception as error:
        if time.monotonic() > deadline:
            sys.exit(f"broker unreachable after 60 s: {error}")
        print(f"waiting for the broker: {error}", file=sys.stderr)
        time.sleep(2)
PY

pids=()
for queue in "${queues[@]}"; do
  celery -A run:celery worker --queues "$queue" --hostname "$queue@%h" \
    --concurrency "${CELERY_CONCURRENCY:-2}" --loglevel "${LOG_LEVEL:-INFO}" &
  pids+=($!)
done

stop() { kill -TERM "${pids[@]}" 2>/dev/null; }
trap stop TERM INT
# Wake when a worker exits or a signal arrives; either way stop the others and wait.
wait -n
status=$?
stop
wait
exit "$status"
