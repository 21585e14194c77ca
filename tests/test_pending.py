"""The pending store: overdue records are claimed once, and repeated redeliveries back off."""
import time

import pytest

from app.pending import MAX_DOUBLINGS, FolderPendingStore, RedisPendingStore

LEASE = 10.0


@pytest.fixture(params=["redis", "folder"])
def store(request, test_environment, tmp_path):
    if request.param == "redis":
        return RedisPendingStore(test_environment["REDIS_URL"], LEASE)
    return FolderPendingStore(str(tmp_path / "pending"), LEASE)


def make_overdue(store, group_id):
    if isinstance(store, RedisPendingStore):
        store.redis.zadd(store._due_key("default"), {group_id: 0})
    else:
        record = store.load("default", group_id)
        store._write("default", group_id, record["events"], record["attempts"], 0, record["redeliveries"])


def due_of(store, group_id):
    if isinstance(store, RedisPendingStore):
        return store.redis.zscore(store._due_key("default"), group_id)
    return store.load("default", group_id)["due"]


def test_a_fresh_record_is_not_claimed(store):
    store.put("default", "g1", [{"event_id": "e"}])
    assert store.claim_due("default") == []


def test_each_redelivery_doubles_the_next_lease_up_to_a_cap(store):
    store.put("default", "g1", [{"event_id": "e"}])
    leases = []
    for _ in range(MAX_DOUBLINGS + 2):
        make_overdue(store, "g1")
        before = time.time()
        assert store.claim_due("default") == ["g1"]
        assert store.claim_due("default") == []  # claimed once, not again until the lease ends
        leases.append(round((due_of(store, "g1") - before) / LEASE))
    assert leases == [1, 2, 4, 8, 8]


def test_progress_resets_the_backoff(store):
    store.put("default", "g1", [{"event_id": "e"}])
    for _ in range(3):
        make_overdue(store, "g1")
        store.claim_due("default")
    assert store.reschedule("default", "g1", [{"event_id": "e"}], attempts=1, delay=0)
    before = time.time()
    assert store.claim_due("default") == ["g1"]
    assert round((due_of(store, "g1") - before) / LEASE) == 1


def test_done_forgets_everything(store):
    store.put("default", "g1", [{"event_id": "e"}])
    make_overdue(store, "g1")
    store.claim_due("default")
    store.done("default", "g1")
    assert store.load("default", "g1") is None
    assert store.claim_due("default") == []
    if isinstance(store, RedisPendingStore):
        assert not store.redis.exists(store.REDELIVERIES)
