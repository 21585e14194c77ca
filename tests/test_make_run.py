"""`make run` as a developer uses it: a clean start-up log, one Ctrl-C stops everything, and a
port another server holds is refused."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, free_port, wait_until

# Lines honcho prefixes with the time and the process: "21:15:09 web.1    | ...".
HONCHO_LINE = re.compile(r"^\d\d:\d\d:\d\d (\S+)\s*\| (.*)$")
PROCESSES = ("web", "worker", "emails", "batch", "beat")


def embedded_env(tmp_path, port) -> dict:
    """The environment of a laptop: no DATABASE_URL / REDIS_URL, development, our own folder."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "APP_ENV", "PROMETHEUS_MULTIPROC_DIR",
                          "MAKEFLAGS", "MAKELEVEL", "MFLAGS", "WORKER_METRICS_PORT")}
    return {**env, "INSTANCE_PATH": str(tmp_path / "instance"), "PORT": str(port)}


def processes_with(marker: str) -> list[int]:
    """Pids of the processes whose environment holds `marker` (this test's INSTANCE_PATH)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours to read
                pass
    return pids


def process_lines(output: str) -> list[tuple[str, str]]:
    """(process, text) for each line a Procfile process printed, honcho's own lines apart."""
    lines = []
    for line in output.splitlines():
        match = HONCHO_LINE.match(line)
        if match:
            lines.append((match.group(1), match.group(2)))
    return lines


@pytest.mark.no_clean  # uses its own SQLite file and broker folder
def test_make_run_starts_cleanly_and_one_ctrl_c_stops_everything(tmp_path):
    port = free_port()
    env = embedded_env(tmp_path, port)
    log_path = tmp_path / "make-run.log"
    with open(log_path, "wb") as log:
        # A session of its own, as a terminal's job: the Ctrl-C below reaches its whole group.
        # SIGINT as a terminal's job has it: a suite started in the background (`cmd &` without
        # job control) hands its children SIGINT ignored, and make then never dies of it.
        make = subprocess.Popen(["make", "run"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    output = lambda: log_path.read_text(errors="replace")  # noqa: E731
    try:
        try:
            wait_until(lambda: output().count(" ready.") == 3 and "beat: Starting..." in output(), timeout=150,
                       interval=0.5, message="make run to start")
        except AssertionError as error:
            raise AssertionError(f"{error}:\n{output()[-3000:]}") from None
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200

        # A second server on the same port is refused with a clear error, and the first keeps it.
        second = subprocess.run([sys.executable, "-m", "gunicorn", "run:app", "-c", "gunicorn.conf.py"], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert f"Port {port} is already in use: another server listens on http://0.0.0.0:{port}" in second.stderr
        assert "Booting worker" not in second.stderr
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200

        started = output()
        lines = process_lines(started)
        # Every Procfile process printed JSON lines only, and not one warning or error.
        for name, text in lines:
            if name == "system":
                continue
            entry = json.loads(text)
            assert entry["level"] == "INFO", f"{name}: {text}"
        assert not re.search(r"warn|traceback|exception", started, re.IGNORECASE), started
        assert f'"message":"Listening at: http://0.0.0.0:{port} (' in started

        interrupted = time.monotonic()
        os.killpg(make.pid, signal.SIGINT)  # one Ctrl-C
        make.wait(30)
        assert wait_until(lambda: not processes_with(env["INSTANCE_PATH"]), timeout=30, interval=0.1,
                          message="every process of make run to exit")
        stopped_after = time.monotonic() - interrupted
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
        for pid in processes_with(env["INSTANCE_PATH"]):
            os.kill(pid, signal.SIGKILL)

    stop = output()[len(started):]
    print(f"make run: every process stopped {stopped_after:.1f} s after Ctrl-C")
    assert stopped_after < 10, stop
    assert "SIGKILL" not in stop, stop
    assert stop.count("Warm shutdown") == 3, stop  # once per worker, none repeated
    for name in PROCESSES:
        assert f"{name}.1 stopped (rc=0)" in stop, stop
    # make reports the interrupt and ends as a Ctrl-C'ed program does: the shell shows 130.
    assert make.returncode == -signal.SIGINT, make.returncode


def test_gunicorn_refuses_a_port_another_program_listens_on(test_environment, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PORT": str(port), "WEB_CONCURRENCY": "1"}
        result = subprocess.run([sys.executable, "-m", "gunicorn", "run:app", "-c", "gunicorn.conf.py"], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"Port {port} is already in use" in result.stderr and "choose another port with PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_honcho_waits_long_enough_for_a_warm_shutdown():
    # run_local.py relies on honcho 2.0.0's module constant KILL_WAIT (pinned).
    result = subprocess.run([sys.executable, "-c", "import runpy, honcho.manager as m; "
                             "runpy.run_path('run_local.py', run_name='not_main'); print(m.KILL_WAIT)"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "15", result.stderr
    from honcho import __version__

    assert __version__ == "2.0.0"
    assert "KILL_WAIT" in Path(sys.modules["honcho"].__file__).with_name("manager.py").read_text()
