"""The embedded broker: kombu's file-system transport, with every message written whole.

kombu's transport creates a message's file in the queue folder and only then writes it. A
worker listing the folder in between reads an empty or partial message, and the JSON error
stops the worker ("Unrecoverable error"): one API process publishing while a worker drained
the folder gave 324 such reads in 6,000 messages. Here a message is written under a name no
reader takes and renamed into place, so a reader finds it whole or not at all. A message
that still cannot be read (a file damaged on disk) is dropped and logged instead of
stopping the worker; if it carried an event group, the group's pending record is published
again (app/redelivery.py). An exchange's table of bindings is created the same way, whole.

`_put`, `_get` and `_queue_bind` are the hooks kombu's virtual transports leave to their
storage (kombu is pinned in requirements.txt); tests/test_folder_broker.py checks the file
names read here.
"""
import logging
import os
import uuid
from pathlib import Path
from queue import Empty
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

from app import files

log = logging.getLogger(__name__)

TRANSPORT = "app.folder_broker:Transport"  # celery's broker_transport setting, beside a filesystem:// URL


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        """Put a message on `queue`: written beside under a `.tmp` name, then renamed to the name readers take."""
        # kombu's own name: readers take `<ms>_<uuid>.<queue>.msg` files in name order. Not
        # fsynced: a message lost to a power cut comes back from its pending record.
        path = Path(self.data_folder_out) / f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        try:
            files.write_whole(path, str_to_bytes(dumps(payload)), sync=False)
        except OSError as error:
            raise ChannelError(f"Cannot add file {str(path)!r} to directory") from error

    def _get(self, queue):
        """The next message on `queue`; one that cannot be read is dropped (and logged), not raised."""
        try:
            return super()._get(queue)
        except ValueError as error:  # kombu has already taken the file out of the queue folder
            log.error("dropped an unreadable message on queue %s (%s); an event group's comes back from the "
                      "pending store", queue, error)
            raise Empty() from None

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        """Bind `queue` to `exchange`; a new exchange's table file appears with the binding in it."""
        # kombu creates the table file empty and then writes it: a publisher looking the exchange
        # up in between reads empty JSON and fails. A file of our own, linked to the table's name
        # only if there is none yet; else kombu adds the binding to the table under its lock.
        table = self._exchange_file(exchange)
        if not table.exists():
            self.control_folder.mkdir(exist_ok=True)
            binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
            draft = table.with_name(f".{table.name}.{uuid.uuid4()}.tmp")
            draft.write_bytes(str_to_bytes(dumps([binding])))
            try:
                os.link(draft, table)
                return
            except OSError:  # another process created it meanwhile (or no hard links here): kombu's way
                pass
            finally:
                draft.unlink()
        super()._queue_bind(exchange, routing_key, pattern, queue)


class Transport(filesystem.Transport):
    Channel = Channel


def settings(folder: str) -> dict:
    """Celery settings for the embedded broker: this transport, on plain folders under `folder`."""
    base = Path(folder)
    # kombu expects the folders to exist; creating empty folders is not I/O worth deferring.
    for name in ("queue", "processed", "control"):
        (base / name).mkdir(parents=True, exist_ok=True)
    return {
        "broker_transport": TRANSPORT,
        "broker_transport_options": {
            "data_folder_in": str(base / "queue"),
            "data_folder_out": str(base / "queue"),
            "processed_folder": str(base / "processed"),
            "store_processed": False,
            "control_folder": str(base / "control"),
        },
    }
