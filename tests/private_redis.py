"""A Redis server of a test's own, to stop and start again: for outage tests."""
import socket
import subprocess
import threading
import time

import redis as redis_lib
from celery import _state

from tests.conftest import free_port


class PrivateRedis:
    """`redis-server` on a free port, without persistence; stop() and start() keep the port."""

    def __init__(self, workdir, *extra_args):
        self.port = free_port()
        self.workdir = workdir
        self.extra_args = list(extra_args)
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), *self.extra_args]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                return self
            except redis_lib.ConnectionError:
                assert self.proc.poll() is None, f"redis-server on port {self.port} exited"
                time.sleep(0.05)
        raise AssertionError(f"redis-server on port {self.port} did not start")

    def client(self) -> redis_lib.Redis:
        return redis_lib.Redis.from_url(self.url, socket_connect_timeout=0.2)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class SilentServer:
    """A TCP port that accepts connections and never answers: a hung dependency."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self):
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def isolated_app(config):
    """create_app(config) for one test, leaving Celery's default app as it was."""
    from app import create_app

    saved = _state.default_app
    app = create_app(config)
    _state.set_default_app(saved)
    ISOLATED_APPS.append(app)
    return app


# Apps made by isolated_app, whose invalidation listeners (threads of this process) are stopped
# after each test: their private Redis is gone by then, and they would retry for ever.
ISOLATED_APPS = []


def stop_isolated_apps():
    while ISOLATED_APPS:
        ISOLATED_APPS.pop().extensions["intake.invalidation"].stop()
