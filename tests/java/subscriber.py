"""A WebSocket subscriber for tests/java/run: subscribes to a channel, says
"ready" once comet counts it (asked over CometQL with PyMySQL), then checks
that the expected messages arrive, in order, within a deadline.

Usage: subscriber.py WS_ADDR BACKEND_PORT PASSWORD CHANNEL EXPECTED...
"""

import base64
import json
import os
import socket
import sys
import time

import pymysql


def read_exact(s, n):
    b = b""
    while len(b) < n:
        chunk = s.recv(n - len(b))
        if not chunk:
            raise EOFError("comet closed the WebSocket")
        b += chunk
    return b


def read_text(s):
    """One unfragmented text frame (the server's frames are unmasked)."""
    while True:
        h = read_exact(s, 2)
        op, n = h[0] & 0x0F, h[1] & 0x7F
        if n == 126:
            n = int.from_bytes(read_exact(s, 2), "big")
        elif n == 127:
            n = int.from_bytes(read_exact(s, 8), "big")
        data = read_exact(s, n)
        if op == 1:
            return data.decode("utf-8")
        if op == 8:
            raise EOFError("close frame %r" % data[:2])


def send_text(s, text):
    data = text.encode("utf-8")
    mask = os.urandom(4)
    head = bytes([0x81, 0x80 | len(data)]) if len(data) < 126 else bytes([0x81, 0xFE]) + len(data).to_bytes(2, "big")
    s.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))


def main():
    addr, port, password, channel, expected = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
    host, ws_port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(ws_port)), timeout=20)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            "GET /ws/sesion=&myid=&devid=0&v=4.08&uuid=javatest&api=js HTTP/1.1\r\n"
            f"Host: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += read_exact(s, 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    read_text(s)  # serverInfo
    send_text(s, "subscription\n" + channel)
    db = pymysql.connect(host="127.0.0.1", port=port, user="root", password=password)
    cur = db.cursor()
    deadline = time.time() + 10
    while True:
        cur.execute("SELECT users FROM pipes WHERE name = %s", (channel,))
        if cur.fetchall() == (("1",),):
            break
        if time.time() > deadline:
            sys.exit("subscriber: comet never counted the subscription")
        time.sleep(0.05)
    print("ready", flush=True)
    got = []
    while len(got) < len(expected):
        m = json.loads(read_text(s))
        if m.get("pipe") == channel:
            got.append(m["data"])
    if got != expected:
        sys.exit("subscriber: expected %r, got %r" % (expected, got))
    print("subscriber: %d messages as expected" % len(got), flush=True)


main()
