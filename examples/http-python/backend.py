#!/usr/bin/env python3
"""A backend that drives comet over its HTTP API, with Python's standard
library only.

It does the three things every comet backend does:

1. authorizes a user: stores the key the user's browser will present
   (`POST /api/users_auth`);
2. sends that user a private message (`POST /api/users_messages`);
3. publishes to a channel every subscriber receives
   (`POST /api/pipes_messages`).

To show that the messages arrive, it also plays the browser: a tiny
WebSocket client (standard library sockets) logs in as the user and
subscribes to the channel before the backend sends anything.

Settings come from the environment:
  COMET_API_URL  the HTTP API        (default http://127.0.0.1:8088)
  COMET_WS_URL   the frontend port   (default ws://127.0.0.1:8087)
  COMET_API_KEY  the backend password (default comet)
"""

import base64
import json
import os
import secrets
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

API_URL = os.environ.get("COMET_API_URL", "http://127.0.0.1:8088")
WS_URL = os.environ.get("COMET_WS_URL", "ws://127.0.0.1:8087")
API_KEY = os.environ.get("COMET_API_KEY", "comet")


# --- the backend: three HTTP calls -------------------------------------------

def comet(method, table, body=None, **where):
    """Calls the HTTP API: POST inserts `body`, GET/DELETE use `where`."""
    query = "&".join(f"{k}={v}" for k, v in where.items())
    url = f"{API_URL}/api/{table}" + (f"?{query}" if query else "")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": f"Bearer {API_KEY}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        error = json.load(e)["error"]
        raise SystemExit(f"{method} {table}: HTTP {e.code}, error {error['code']}: {error['message']}")


def authorize(user_id):
    """Gives the user a fresh key; the page passes it to comet.js."""
    key = secrets.token_hex(16)
    comet("POST", "users_auth", {"id": user_id, "hash": key})
    return key


def send_private(user_id, event, message):
    return comet("POST", "users_messages", {"id": user_id, "event": event, "message": message})


def publish(channel, event, message):
    return comet("POST", "pipes_messages", {"name": channel, "event": event, "message": message})


# --- the browser's side, to check delivery -----------------------------------

class Browser:
    """A minimal WebSocket client speaking comet's protocol."""

    def __init__(self, user_id, key):
        url = urlsplit(WS_URL)
        self.sock = socket.create_connection((url.hostname, url.port or 80), timeout=10)
        path = f"/ws/sesion={key}&myid={user_id}&devid=0&v=4.08&uuid=example&api=py"
        nonce = base64.b64encode(secrets.token_bytes(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {url.hostname}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def _exact(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("comet closed the WebSocket")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, text):
        payload, mask = text.encode(), secrets.token_bytes(4)
        assert len(payload) < 126
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)

    def recv(self):
        """The next comet message (a JSON object)."""
        while True:
            b0, b1 = self._exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(self._exact(2), "big")
            elif n == 127:
                n = int.from_bytes(self._exact(8), "big")
            payload = self._exact(n)
            if b0 & 0x0F == 0x1:
                return json.loads(payload)


def main():
    user_id = 1001
    key = authorize(user_id)
    browser = Browser(user_id, key)
    info = browser.recv()
    assert info["event"] == "serverInfo" and info["authorized"], info
    print(f"user {user_id} authorized with key {key}")

    browser.send("subscription\nexample_news")
    # The subscription takes effect asynchronously: wait until comet counts it.
    for _ in range(100):
        if comet("GET", "pipes", name="example_news")["rows"][0]["users"] == 1:
            break
        time.sleep(0.05)

    answer = send_private(user_id, "greeting", {"text": "hello, user 1001"})
    message = browser.recv()
    assert message["pipe"] == "msg" and json.loads(message["data"]) == {"text": "hello, user 1001"}, message
    print(f"private message delivered ({answer})")

    answer = publish("example_news", "headline", {"title": "comet speaks HTTP"})
    message = browser.recv()
    assert message["pipe"] == "example_news" and json.loads(message["data"])["title"] == "comet speaks HTTP", message
    print(f"channel message delivered to {answer['affected']} subscriber(s)")


if __name__ == "__main__":
    main()
