"""The HTTP API from Python's standard library alone (urllib, http.client).

Run by tests/http_api.rs against a real comet with COMET_API_URL and
COMET_API_KEY set; a WebSocket client there subscribes to `py_chan` first
and checks what this script publishes. Exits non-zero on the first failure.
"""

import http.client
import json
import os
import urllib.error
import urllib.request
from urllib.parse import urlsplit

API = os.environ["COMET_API_URL"]
KEY = os.environ["COMET_API_KEY"]


def call(method, path, body=None, key=KEY):
    """One request with urllib; returns (status, decoded JSON answer)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(API + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key is not None:
        req.add_header("Authorization", "Bearer " + key)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def expect(got, want):
    if got != want:
        raise SystemExit(f"expected {want!r}, got {got!r}")


# A JSON object as the message is published as its JSON text.
expect(call("POST", "/api/pipes_messages", {"name": "py_chan", "event": "e", "message": {"from": "python", "n": 1}}),
       (200, {"affected": 1}))
expect(call("GET", "/api/pipes?name=py_chan"), (200, {"rows": [{"name": "py_chan", "users": 1}]}))
expect(call("POST", "/api/users_auth", [{"id": 11, "hash": "h11"}, {"id": 12, "hash": "h12"}]),
       (200, {"affected": 2, "last_insert_id": 12}))
expect(call("GET", "/api/users_auth?id=12"), (200, {"rows": [{"id": 12, "hash": "h12"}]}))
expect(call("DELETE", "/api/users_auth?id=11&id=12"), (200, {"affected": 2}))

# Errors: the HTTP status and the CometQL code.
status, body = call("GET", "/api/pipes?name=py_chan", key="wrong")
expect((status, body["error"]["code"]), (401, 16))
status, body = call("GET", "/api/nope")
expect((status, body["error"]["code"]), (404, 15))
status, body = call("POST", "/api/pipes_messages", {"name": "x y", "event": "e", "message": "m"})
expect((status, body["error"]["code"]), (422, 12))

# Keep-alive: several requests on one http.client connection.
url = urlsplit(API)
conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
for i in range(5):
    conn.request("GET", f"/api/users_time?id={i + 1}", headers={"X-API-Key": KEY})
    r = conn.getresponse()
    expect((r.status, json.loads(r.read())), (200, {"rows": [{"id": i + 1, "time": -1}]}))
conn.close()
print("ok")
