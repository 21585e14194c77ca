"""A TCP proxy in front of the shared RabbitMQ: a broker of a test's own to hang, stop and start again."""
import socket
import threading

from tests.conftest import VHOST, free_port


class BrokerProxy:
    """Forwards 127.0.0.1:<port> to a target; freeze() stops forwarding (a hung broker), stop()/start() refuse and accept."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.forwarding = threading.Event()
        self.forwarding.set()
        self.listener = None
        self.sockets = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        """The run's vhost, through the proxy."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{VHOST}"

    def start(self):
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()
        return self

    def stop(self):
        """Close the port and every connection through it: a broker that went down (again: nothing)."""
        if self.listener.fileno() != -1:
            # shutdown() first: close() alone leaves the accept() blocked in the other thread listening.
            self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self.sockets.clear()

    def freeze(self):
        """Connections stay open and nothing more gets through, either way: a broker that hangs."""
        self.forwarding.clear()

    def thaw(self):
        self.forwarding.set()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # stopped
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source, sink):
        try:
            while data := source.recv(65536):
                self.forwarding.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
