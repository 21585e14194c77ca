"""The pending store: what is lost is claimed once and fast, what waits in a queue is not, records survive."""
import json
import os
import threading
import time

import pytest

from app import pending as pending_module
from app.pending import FolderPendingStore, RedisPendingStore

LEASE = 0.4


@pytest.fixture(params=["redis", "folder"])
def store(request, test_environment, tmp_path, monkeypatch):
    # Pushes in a test are milliseconds apart: no slack for clocks of several web processes.
    monkeypatch.setattr(pending_module, "CLOCK_SLACK", 0.0)
    if request.param == "redis":
        return RedisPendingStore(test_environment["REDIS_URL"], LEASE)
    return FolderPendingStore(str(tmp_path / "pending"), LEASE)


def put(store, *ids):
    for group_id in ids:
        store.put("default", group_id, [{"event_id": group_id}])
        time.sleep(0.01)  # pushed one after the other, as a FIFO queue holds them


def after_lease():
    time.sleep(LEASE + 0.05)


def test_a_message_waiting_in_a_moving_queue_is_not_redelivered(store):
    put(store, "a", "b", "c")
    assert store.take("default", "a").status == "ok"
    store.done("default", "a")
    after_lease()
    # b and c are older than a lease, but nothing pushed after them was taken: still queued.
    assert store.claim_due("default", queue_empty=False) == []
    assert store.take("default", "b").status == "ok"
    store.done("default", "b")
    assert store.claim_due("default", queue_empty=False) == []


def test_a_message_popped_by_a_dead_worker_is_claimed_once_a_lease_after_its_push(store):
    put(store, "lost", "next")
    assert store.take("default", "next").status == "ok"  # a worker took a later message: "lost" was popped
    store.done("default", "next")
    assert store.claim_due("default") == []  # not yet a lease old
    after_lease()
    assert store.claim_due("default") == ["lost"]
    assert store.claim_due("default") == []  # claimed once: its new message is in flight
    after_lease()
    assert store.claim_due("default") == [], "no worker took anything pushed after the new message"


def test_an_empty_idle_queue_gives_its_messages_up_after_a_lease(store):
    put(store, "only")
    after_lease()
    assert store.claim_due("default", queue_empty=False) == [], "messages wait in the queue: no copies"
    assert store.claim_due("default", queue_empty=True) == ["only"]
    assert store.claim_due("default", queue_empty=True) == []


def test_a_taken_group_is_claimed_a_lease_after_its_worker_stopped_renewing(store):
    put(store, "g")
    assert store.take("default", "g").status == "ok"
    with store.hold("default", "g"):
        time.sleep(LEASE * 2.5)  # a long write: renewed every third of a lease
        assert store.claim_due("default") == []
    after_lease()
    assert store.claim_due("default") == ["g"]


def test_deliveries_are_counted_until_a_write_finishes(store):
    put(store, "g")
    assert [store.take("default", "g").deliveries for _ in range(3)] == [1, 2, 3]
    assert store.reschedule("default", "g", [{"event_id": "g"}], attempts=1, delay=0)
    assert store.take("default", "g").deliveries == 1


def test_a_retry_is_claimed_when_due(store):
    put(store, "g")
    store.take("default", "g")
    store.reschedule("default", "g", [{"event_id": "g"}], attempts=1, delay=0.2)
    assert store.claim_due("default") == []
    time.sleep(0.25)
    assert store.claim_due("default") == ["g"]
    assert store.load("default", "g")["attempts"] == 1


def test_a_stored_group_leaves_a_tombstone_and_an_unknown_one_is_missing(store):
    put(store, "g")
    store.take("default", "g")
    store.done("default", "g")
    assert store.load("default", "g") is None
    assert store.take("default", "g").status == "stored"
    assert store.take("default", "never-seen").status == "missing"
    assert store.warnings() == []
    store.note_missing("default", "never-seen")
    store.note_missing("default", "never-seen-2")
    [warning] = store.warnings()
    assert "2 message(s)" in warning and "never-seen-2" in warning and "lost data" in warning
    assert store.claim_due("default", queue_empty=True) == []


def test_a_split_replaces_the_group_by_its_parts_due_now(store):
    put(store, "g")
    ids = store.split("default", "g", [[{"event_id": 1}], [{"event_id": 2}]], attempts=0, deliveries=2)
    assert ids == ["g.0", "g.1"]
    assert store.take("default", "g").status == "stored"
    assert sorted(store.claim_due("default")) == ids
    assert store.take("default", "g.0").deliveries == 3
    assert store.load("default", "g.1")["events"] == [{"event_id": 2}]


def test_stats_count_groups_and_age_the_oldest(store):
    assert store.stats(["default", "batch_processing"]) == {"default": (0, 0.0), "batch_processing": (0, 0.0)}
    put(store, "a", "b")
    time.sleep(0.3)
    stats = store.stats(["default", "batch_processing"])
    assert stats["default"][0] == 2 and 0.3 <= stats["default"][1] < 5
    assert stats["batch_processing"] == (0, 0.0)
    store.take("default", "a")
    store.reschedule("default", "a", [], attempts=1, delay=5)  # a retry keeps its age
    assert store.stats(["default"])["default"][1] >= 0.3
    store.done("default", "a")
    store.done("default", "b")
    assert store.stats(["default"])["default"] == (0, 0.0)


# --- the embedded default's folder --------------------------------------------------------


@pytest.fixture
def folder_store(tmp_path):
    return FolderPendingStore(str(tmp_path / "pending"), LEASE)


@pytest.fixture
def synced(monkeypatch):
    """The names of the files and folders fsynced from now on, in order."""
    names = []
    real_fsync = os.fsync

    def fsync(fd):
        names.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return names


def test_a_record_is_fsynced_with_its_folder(folder_store, synced):
    folder_store.put("default", "g", [{"event_id": "e"}])
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == "default"


def test_concurrent_rewrites_of_one_record_use_their_own_temporary_files(folder_store):
    folder_store.put("default", "g", [{"event_id": "e"}])
    errors = []

    def rewrite():
        try:
            for attempt in range(100):
                folder_store.reschedule("default", "g", [{"event_id": "e"}], attempt, 0)
                folder_store.claim_due("default")
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=rewrite) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert folder_store.load("default", "g")["events"] == [{"event_id": "e"}]
    assert not list((folder_store.folder / "default").glob("*.tmp"))


def test_a_corrupt_record_is_moved_aside_and_the_sweep_goes_on(folder_store, caplog):
    folder_store.put("default", "a", [{"event_id": "a"}])
    folder_store.put("default", "b", [{"event_id": "b"}])
    (folder_store.folder / "default" / "a.json").write_text('{"flight": 1, "ev')  # torn by a crash
    after_lease()
    assert folder_store.claim_due("default", queue_empty=True) == ["b"]
    assert not (folder_store.folder / "default" / "a.json").exists()
    assert (folder_store.folder / "corrupt" / "default-a.json").read_text() == '{"flight": 1, "ev'
    assert "corrupt pending record" in caplog.text
    assert json.loads((folder_store.folder / "default" / "b.json").read_text())["events"] == [{"event_id": "b"}]


@pytest.mark.parametrize("content", ["[]", '"x"', "3", "null", "[" * 100_000,
                                     '{"flight": 1, "due": null, "attempts": 0}',
                                     '{"flight": "soon", "due": null, "attempts": 0, "events": []}',
                                     '{"flight": NaN, "due": null, "attempts": 0, "events": []}',
                                     '{"flight": null, "due": 1, "attempts": "0", "events": []}',
                                     '{"flight": null, "due": 1, "attempts": 0, "deliveries": [], "events": []}'])
def test_a_record_that_parses_but_is_unusable_is_moved_aside_too(folder_store, caplog, content):
    folder_store.put("default", "a", [{"event_id": "a"}])
    folder_store.put("default", "b", [{"event_id": "b"}])
    folder_store.put("default", "c", [{"event_id": "c"}])
    (folder_store.folder / "default" / "a.json").write_text(content)
    (folder_store.folder / "default" / "c.json").write_text(content)
    assert folder_store.take("default", "c").status == "missing"  # a worker's take is not halted either
    after_lease()
    assert folder_store.claim_due("default", queue_empty=True) == ["b"]
    assert not (folder_store.folder / "default" / "a.json").exists()
    assert (folder_store.folder / "corrupt" / "default-a.json").read_text() == content
    assert caplog.text.count("corrupt pending record") == 2
    assert folder_store.stats(["default"])["default"][0] == 1


def test_a_stored_group_is_fsynced_away_after_its_tombstone(folder_store, synced):
    folder_store.put("default", "g", [{"event_id": "e"}])
    folder_store.split("default", "g", [[{"event_id": "e"}]], attempts=0, deliveries=1)
    synced.clear()
    folder_store.done("default", "g.0")
    # The tombstone's name is durable before the record's removal, and the removal itself.
    assert synced == ["stored", "default"]
    synced.clear()
    folder_store.put("default", "h", [{"event_id": "e"}])
    synced.clear()
    folder_store.split("default", "h", [[{"event_id": "e"}], [{"event_id": "f"}]], attempts=0, deliveries=1)
    assert synced[-2:] == ["stored", "default"]


def test_a_record_sent_ahead_is_there_once_its_answer_is_read(test_environment):
    store = RedisPendingStore(test_environment["REDIS_URL"], LEASE)
    write = store.begin_put("default", "g-ahead", [{"event_id": "e-1"}])
    write.finish()
    write.finish()  # the answer is read once; a second call only reports it
    assert not write.failed
    taken = store.take("default", "g-ahead")
    assert taken.status == "ok" and taken.record == {"attempts": 0, "events": [{"event_id": "e-1"}]}


def test_a_record_redis_refuses_fails_its_write_and_leaves_no_answer_behind(test_environment, redis):
    import redis as redis_lib

    store = RedisPendingStore(test_environment["REDIS_URL"], LEASE)
    redis.set(store.BODIES, "not a hash")
    write = store.begin_put("default", "g-refused", [{"event_id": "e-1"}])
    with pytest.raises(redis_lib.ResponseError):
        write.finish()
    assert write.failed
    redis.delete(store.BODIES)
    # The connection went back to the pool closed: the next command gets its own answer.
    store.put("default", "g-next", [{"event_id": "e-2"}])
    assert store.load("default", "g-next") == {"attempts": 0, "events": [{"event_id": "e-2"}]}
