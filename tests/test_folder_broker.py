"""The embedded broker (app/folder_broker.py): a reader finds a message, or an exchange's table, whole or not at all."""
import logging
import multiprocessing
import os
import time

from kombu import Connection, Exchange, Queue

from app import folder_broker

QUEUE = Queue("default", Exchange("default", type="direct"), routing_key="default")
OURS, KOMBUS = folder_broker.TRANSPORT, "filesystem"


def connect(folder, transport):
    options = folder_broker.settings(str(folder))["broker_transport_options"]
    return Connection("filesystem://", transport=transport, transport_options=options)


def publish(folder, transport, count):
    with connect(folder, transport) as connection:
        producer = connection.Producer()
        for number in range(count):
            producer.publish({"number": number, "padding": "x" * 2000}, exchange=QUEUE.exchange,
                             routing_key="default", declare=[QUEUE])
            time.sleep(0.0005)


def start(target, args, count=1):
    """`count` forked processes running target(*args), started now."""
    processes = [multiprocessing.get_context("fork").Process(target=target, args=args) for _ in range(count)]
    for process in processes:
        process.start()
    return processes


def drain_while_others_publish(folder, transport, publishers=2, each=1500):
    """Read the queue while other processes publish to it; return (messages read, reads that failed)."""
    publish(folder, transport, 0)  # the exchange and its binding, before the race
    read = failed = 0
    with connect(folder, transport) as connection:
        channel = connection.default_channel  # ready to read before the publishers start
        processes = start(publish, (folder, transport, each), publishers)
        deadline = time.monotonic() + 60
        while read + failed < publishers * each and time.monotonic() < deadline:
            try:
                read += channel.basic_get("default", no_ack=True) is not None
            except ValueError:  # kombu's: the JSON of a file not yet written
                failed += 1
    for process in processes:
        process.join()
    return read, failed


def test_a_reader_never_gets_a_message_still_being_written(tmp_path):
    # The race the transport exists for, run on kombu's own transport too: it shows the test sees it.
    _, kombus_failed = drain_while_others_publish(tmp_path / "kombu", KOMBUS)
    read, failed = drain_while_others_publish(tmp_path / "ours", OURS)
    assert kombus_failed > 0
    assert (read, failed) == (3000, 0)


def bind_new_exchanges(folder, transport, count):
    with connect(folder, transport) as connection:
        for number in range(count):
            connection.default_channel._queue_bind(f"exchange-{number}", "key", None, "default")
            time.sleep(0.0005)


def read_tables_while_another_process_binds(folder, transport, count=1000):
    """Read each new exchange's table until it is there while another process creates them; return failed reads."""
    failed = 0
    with connect(folder, transport) as connection:
        channel = connection.default_channel  # ready to read before the binder starts
        (process,) = start(bind_new_exchanges, (folder, transport, count))
        deadline = time.monotonic() + 60
        for number in range(count):
            while time.monotonic() < deadline:
                try:
                    if channel.get_table(f"exchange-{number}"):
                        break
                except ValueError:  # kombu's: the JSON of a table not yet written
                    failed += 1
    process.join()
    return failed


def test_a_new_exchange_is_never_read_before_its_binding_is_written(tmp_path):
    assert read_tables_while_another_process_binds(tmp_path / "kombu", KOMBUS) > 0
    assert read_tables_while_another_process_binds(tmp_path / "ours", OURS) == 0


def test_a_second_binding_joins_the_exchanges_table(tmp_path):
    with connect(tmp_path, OURS) as connection:
        channel = connection.default_channel
        channel._queue_bind("events", "a", None, "first")
        channel._queue_bind("events", "b", None, "second")
        assert sorted(row.queue for row in channel.get_table("events")) == ["first", "second"]
        assert [path.name for path in (tmp_path / "control").iterdir()] == ["events.exchange"]


def test_a_message_is_named_as_kombus_readers_take_it(tmp_path):
    with connect(tmp_path, OURS) as connection:
        channel = connection.default_channel
        channel.queue_declare("default")
        channel._put("default", {"hello": 1})
        assert [name.split(".", 1)[1] for name in os.listdir(tmp_path / "queue")] == ["default.msg"]
        assert channel._size("default") == 1
    with connect(tmp_path, KOMBUS) as connection:
        assert connection.default_channel._get("default") == {"hello": 1}


def test_a_message_being_written_is_neither_read_nor_counted(tmp_path):
    with connect(tmp_path, OURS) as connection:
        channel = connection.default_channel
        (tmp_path / "queue" / ".1_a.default.x7k2.tmp").write_bytes(b'{"half": ')
        assert channel._size("default") == 0
        assert channel.basic_get("default", no_ack=True) is None


def test_an_unreadable_message_is_dropped_and_logged_and_the_next_one_read(tmp_path, caplog):
    with connect(tmp_path, OURS) as connection:
        channel = connection.default_channel
        channel.queue_declare("default")
        (tmp_path / "queue" / "0_damaged.default.msg").write_bytes(b"")  # first in name order
        channel._put("default", {"hello": 2})
        with caplog.at_level(logging.ERROR, logger="app.folder_broker"):
            assert channel.basic_get("default", no_ack=True) is None
        assert "dropped an unreadable message on queue default" in caplog.text
        assert channel._get("default") == {"hello": 2}
        assert not (tmp_path / "queue" / "0_damaged.default.msg").exists()
