#!/usr/bin/env python3
"""A WebSocket subscriber that checks what the backend examples send.

Standard library only (no package to install): it speaks just enough of
RFC 6455 for comet's text frames.

    subscriber.py channel HOST:PORT CHANNEL EVENT FROM
        Subscribes anonymously to CHANNEL, makes sure the subscription is in
        place (a pipe_count round trip), prints "ready", then waits for one
        message with EVENT on CHANNEL and prints it as JSON.
    subscriber.py user HOST:PORT USER_ID KEY EVENT FROM
        Connects as USER_ID with KEY, requires "authorized": true, then waits
        for a private message (pipe "msg") with EVENT and prints it.

The message's data must be JSON text whose "from" is FROM (the example that
sent it).

Exits 1 with a reason when the expected message does not come within 10 s.
"""

import base64
import json
import os
import socket
import struct
import sys
import time

TIMEOUT = 10.0


class Ws:
    def __init__(self, addr, params):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /ws/{params} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            fail(f"upgrade refused: {head.decode(errors='replace')}")

    def _recv(self):
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            fail(f"nothing arrived within {TIMEOUT} s")
        if not data:
            fail("the server closed the connection")
        return data

    def _take(self, n):
        while len(self.buf) < n:
            self.buf += self._recv()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, text):
        payload = text.encode()
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x81, 0x80 | n)
        else:
            head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + body)

    def recv(self):
        """The next text message as JSON; answers pings, fails on close."""
        while True:
            b0, b1 = self._take(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._take(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._take(8))
            payload = self._take(n)
            op = b0 & 0x0F
            if op == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                fail(f"the server closed the WebSocket with {code} {payload[2:].decode(errors='replace')}")
            if op == 0x9:
                mask = os.urandom(4)
                self.sock.sendall(struct.pack("!BB", 0x8A, 0x80 | n) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
                continue
            if op in (0x1, 0x2):
                return json.loads(payload)

    def wait_for(self, what, pred):
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            msg = self.recv()
            if pred(msg):
                return msg
        fail(f"no {what} within {TIMEOUT} s")


def fail(reason):
    print(f"subscriber.py: {reason}", file=sys.stderr)
    sys.exit(1)


def params(user_id="", key=""):
    return f"sesion={key}&myid={user_id}&devid=0&v=4.08&uuid=examples&api=js"


def main(argv):
    if len(argv) == 6 and argv[1] == "channel":
        _, _, addr, channel, event, sender = argv
        ws = Ws(addr, params())
        ws.wait_for("serverInfo", lambda m: m.get("event") == "serverInfo")
        # A subscription is not acknowledged. pipe_count works on web_
        # channels only, so subscribe to one in the same command: when the
        # count includes us, the whole set is in place.
        ws.send(f"subscription\n{channel}\nweb_examples_ready")
        ws.send("pipe_count\nweb_examples_ready\nready")
        ws.wait_for("pipe_count answer", lambda m: m.get("marker") == "ready" and m["data"]["user_in_pipe"] >= 1)
        print("ready", flush=True)
        msg = ws.wait_for(f"'{event}' on {channel}", lambda m: m.get("pipe") == channel and m.get("event") == event)
    elif len(argv) == 7 and argv[1] == "user":
        _, _, addr, user_id, key, event, sender = argv
        ws = Ws(addr, params(user_id, key))
        info = ws.wait_for("serverInfo", lambda m: m.get("event") == "serverInfo")
        if info.get("authorized") is not True:
            fail(f"user {user_id} was not authorized with key {key!r}: {info}")
        msg = ws.wait_for(f"private '{event}'", lambda m: m.get("pipe") == "msg" and m.get("event") == event)
    else:
        fail(__doc__)
    print(json.dumps(msg, sort_keys=True), flush=True)
    try:
        got = json.loads(msg["data"]).get("from")
    except (TypeError, ValueError, AttributeError):
        got = None
    if got != sender:
        fail(f"the message is not from {sender}: {msg}")


if __name__ == "__main__":
    main(sys.argv)
