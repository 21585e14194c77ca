"""The app answers and errors are JSON."""


def test_health(client):
    assert client.get("/health").get_json() == {"status": "ok"}


def test_unknown_route_is_json_404(client):
    response = client.get("/no/such/route")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


def test_wrong_method_is_json_405(client):
    response = client.delete("/health")
    assert response.status_code == 405
    assert response.get_json()["error"]["code"] == "method_not_allowed"
