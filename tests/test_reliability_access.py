"""An operator turns on an API key and allows one browser origin: predictions need the key (either
header style), health and metrics stay open, and only the allowed origin gets CORS headers."""
import base64
import http.client
import json

import httpx
import pytest

from tests.service_fixtures import running_server

MODEL = "effnet"
KEY = "correct-horse-battery-staple"
ORIGIN = "https://dashboard.example.org"


@pytest.fixture(scope="module")
def server(served):
    return served([MODEL], API_KEY=KEY, CORS_ORIGINS=f"{ORIGIN}, https://other.example.org")


def announce_huge_body(server, headers: dict) -> httpx.Response:
    """Headers announcing a 1 GB upload, and no body at all: only an early answer can come back."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("PUT", f"/predict/{MODEL}")
    for name, value in {**headers, "Content-Length": str(10**9)}.items():
        connection.putheader(name, value)
    connection.endheaders()
    raw = connection.getresponse()
    response = httpx.Response(raw.status, headers=raw.getheaders(), content=raw.read())
    connection.close()
    return response


def infer_body(image: bytes) -> dict:
    return {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                        "data": [base64.b64encode(image).decode()]}]}


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY},
                                     {"authorization": f"bearer {KEY}"}])
def test_the_key_in_either_header_opens_both_protocols(client, photos, headers):
    image = photos["rocket"].read_bytes()
    assert client.put(f"/predict/{MODEL}", content=image, headers=headers).status_code == 200
    assert client.post(f"/v2/models/{MODEL}/infer", json=infer_body(image),
                       headers=headers).status_code == 200


@pytest.mark.parametrize("headers, reason", [
    ({}, "missing API key"),
    ({"Authorization": "Bearer wrong"}, "wrong API key"),
    ({"X-API-Key": KEY[:-1]}, "wrong API key"),
    ({"Authorization": f"Basic {KEY}"}, "missing API key"),
])
def test_without_the_right_key_predictions_are_a_401_before_the_body_is_read(server, client, photos,
                                                                            headers, reason):
    image = photos["rocket"].read_bytes()
    for response in (client.put(f"/predict/{MODEL}", content=image, headers=headers),
                     client.post(f"/v2/models/{MODEL}/infer", json=infer_body(image), headers=headers),
                     # even a body over the size limit is refused for the key, not its size
                     announce_huge_body(server, headers)):
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        body = json.loads(response.content)
        assert body["code"] == "unauthorized" and body["error"].startswith(reason)


def test_health_metrics_and_model_listing_stay_open(client):
    for path in ("/health/live", "/health/ready", "/metrics", "/v2/health/ready", "/v2/health/live",
                 "/models", f"/v2/models/{MODEL}"):
        assert client.get(path).status_code == 200, path


def test_only_the_configured_origins_get_cors_headers(client):
    preflight = client.options(f"/predict/{MODEL}", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "authorization, x-request-id"})
    assert preflight.status_code == 200  # a browser's preflight carries no key, and needs none
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "PUT" in preflight.headers["access-control-allow-methods"]
    allowed = client.get("/health/live", headers={"Origin": ORIGIN})
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "X-Request-ID" in allowed.headers["access-control-expose-headers"]
    stranger = client.get("/health/live", headers={"Origin": "https://evil.example.com"})
    assert "access-control-allow-origin" not in stranger.headers


def test_an_empty_api_key_is_refused_at_start_saying_so(model_repository, tmp_path):
    """API_KEY="" (a secret that did not render) would turn the check on with a key that an empty
    X-API-Key header matches: the service refuses to start instead."""
    with running_server(model_repository, tmp_path / "service.log", API_KEY="") as server:
        code = server.process.wait(timeout=30)
    assert code != 0
    assert "API_KEY is set but empty" in server.log.read_text()
