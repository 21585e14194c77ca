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

# Each worker runs in a session of its own: a SIGTERM sent to this script's whole process
# group (honcho, Ctrl-C in a terminal, `kill -- -PGID`) reaches only this script, which asks
# each worker's main process for a warm shutdown. Sent straight to the pool children, it
# would kill the tasks they are running. Should this script die without passing a signal
# on, the kernel sends the workers SIGTERM (setpriv --pdeathsig): none is left orphaned.
launch=(setsid)
command -v setpriv >/dev/null && launch+=(setpriv --pdeathsig TERM)
# Worker metrics (optional): WORKER_METRICS_PORT for the first worker, +1 for the next …;
# each worker sums its pool children through a prometheus folder of its own.
port=${WORKER_METRICS_PORT:-}
# Pool processes per worker: CELERY_CONCURRENCY if set, else 2, and 4 for batch_processing,
# whose tasks spend most of their time waiting for PostgreSQL: with 2 the cores sat a
# quarter idle while a batch backlog drained (README "Throughput").
processes_for() {
  if [ -n "${CELERY_CONCURRENCY:-}" ]; then echo "$CELERY_CONCURRENCY"
  elif [ "$1" = batch_processing ]; then echo 4
  else echo 2; fi
}
pids=()
metrics_dirs=()
for queue in "${queues[@]}"; do
  metrics_env=(-u PROMETHEUS_MULTIPROC_DIR -u WORKER_METRICS_PORT)
  if [ -n "$port" ]; then
    metrics_dirs+=("$(mktemp -d -t intake-worker-metrics-XXXXXX)")
    metrics_env=(WORKER_METRICS_PORT="$port" PROMETHEUS_MULTIPROC_DIR="${metrics_dirs[-1]}")
    port=$((port + 1))
  fi
  env "${metrics_env[@]}" "${launch[@]}" celery -A run:celery --quiet worker --queues "$queue" \
    --hostname "$queue@%h" --concurrency "$(processes_for "$queue")" --loglevel "${LOG_LEVEL:-INFO}" &
  pids+=($!)
done

stopping=""
stop() {
  # Warm shutdown: running tasks finish, prefetched messages go back to the queue. A PaaS
  # may send SIGTERM more than once: a repeat changes nothing.
  [ -n "$stopping" ] && return
  stopping=1
  kill -TERM "${pids[@]}" 2>/dev/null
}
interrupt() {
  # Ctrl-C: warm shutdown; a second Ctrl-C: cold shutdown (running tasks go back as well).
  if [ -n "$stopping" ]; then kill -QUIT "${pids[@]}" 2>/dev/null; else stop; fi
}
trap stop TERM
trap interrupt INT
# Wake when a worker exits or a signal arrives; either way stop the others and wait.
wait -n
status=$?
if [ -n "$stopping" ]; then status=0; else stop; fi
until wait; do :; done  # a signal interrupts `wait`: keep waiting for every worker
[ ${#metrics_dirs[@]} -eq 0 ] || rm -rf "${metrics_dirs[@]}"
exit "$status"
