"""The JSON routes over rollups and failed events: stats, failed-events, replay (owner only)."""
from app import events, rollups
from tests.test_persistence import make_event


def test_stats_failed_events_and_replay_answer_the_owner_and_404_everyone_else(app, client, make_user):
    owner_id, owner = make_user()
    _, stranger = make_user()
    created = client.post("/api/apps", json={"name": "shop"}, headers=owner)
    assert created.status_code == 201, created.get_json()
    app_id = created.get_json()["id"]
    with app.app_context():
        events.insert_events([make_event(app_id, event_id=f"e{i}", level="error" if i % 2 else "info")
                              for i in range(4)])
        rollups.refresh()

    stats = client.get(f"/api/apps/{app_id}/stats?bucket=hour", headers=owner)
    assert stats.status_code == 200, stats.get_json()
    body = stats.get_json()
    assert body["total"] == 4 and body["by_level"] == {"info": 2, "error": 2}
    assert body["ingestion"]["stored"] == 4

    failed = client.get(f"/api/apps/{app_id}/failed-events?limit=10", headers=owner)
    assert failed.status_code == 200 and failed.get_json() == {"failed_events": [], "next_cursor": None}
    replay = client.post(f"/api/apps/{app_id}/failed-events/replay", json={}, headers=owner)
    assert replay.status_code == 202 and replay.get_json() == {"status": "accepted", "replaying": 0, "task_id": None}

    assert client.get(f"/api/apps/{app_id}/stats?bucket=week", headers=owner).status_code == 422
    assert client.get(f"/api/apps/{app_id}/failed-events?cursor=nope", headers=owner).status_code == 400
    for answer in (client.get(f"/api/apps/{app_id}/stats", headers=stranger),
                   client.get(f"/api/apps/{app_id}/failed-events", headers=stranger),
                   client.post(f"/api/apps/{app_id}/failed-events/replay", json={}, headers=stranger)):
        assert answer.status_code == 404 and answer.get_json()["error"]["code"] == "app_not_found"
