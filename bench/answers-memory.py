#!/usr/bin/env python3
"""Peak memory of comet while backend clients ask for many big answers and
do not read them (the bounds of unread answers, docs/architecture.md).

Usage: bench/answers-memory.py BACKEND_PORT COMET_PID K [PASSWORD [CONNS]]

Fills channel `hbig` with 1,000 history entries of 4,000 bytes, then from
each of CONNS clients (default 1) with a 4 KiB receive buffer sends one
COM_QUERY packing K `SELECT * FROM pipes_messages WHERE name = 'hbig'`.
The clients read nothing for 3 s while comet's RSS is sampled every 5 ms.
Prints RSS before and the peak, in KiB.
Needs only the Python standard library (a raw MySQL client below).
"""
import hashlib, socket, struct, sys, threading, time


def scramble(pw, salt):
    h1 = hashlib.sha1(pw).digest()
    h2 = hashlib.sha1(h1).digest()
    h3 = hashlib.sha1(salt + h2).digest()
    return bytes(a ^ b for a, b in zip(h1, h3))


class My:
    """Just enough of the MySQL protocol: log in, send a query, read packets."""

    def __init__(self, port, pw):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""
        _, g = self.read_packet()
        i = g.index(b"\0", 1) + 1
        salt = g[i + 4:i + 12] + g[i + 31:i + 43]
        # long password, protocol 41, secure connection, plugin auth,
        # connect with db, multi statements and results
        caps = 0x1 | 0x200 | 0x8000 | 0x80000 | 0x8 | 0x10000 | 0x20000
        body = struct.pack("<IIB23x", caps, 1 << 24, 45) + b"root\0" + bytes([20]) + scramble(pw, salt)
        self.write_packet(1, body + b"CometQL_v1\0mysql_native_password\0")
        seq, r = self.read_packet()
        if r[0] == 0xFE:  # auth switch
            salt = r[r.index(b"\0", 1) + 1:].rstrip(b"\0")
            self.write_packet(seq + 1, scramble(pw, salt))
            _, r = self.read_packet()
        if r[0] != 0:
            sys.exit("login failed: %r" % r)

    def read_packet(self):
        while len(self.buf) < 4:
            self.buf += self.s.recv(1 << 16)
        n = int.from_bytes(self.buf[:3], "little") + 4
        while len(self.buf) < n:
            self.buf += self.s.recv(1 << 16)
        seq, p, self.buf = self.buf[3], self.buf[4:n], self.buf[n:]
        return seq, p

    def write_packet(self, seq, body):
        self.s.sendall(len(body).to_bytes(3, "little") + bytes([seq & 255]) + body)

    def query(self, q):
        """Sends a query and reads its answer up to the OK or ERR at its end."""
        self.write_packet(0, b"\x03" + q.encode())
        while True:
            _, p = self.read_packet()
            if p[0] in (0x00, 0xFF) or (p[0] == 0xFE and len(p) < 9):
                return p


def main():
    port, pid, k = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    pw = (sys.argv[4] if len(sys.argv) > 4 else "comet").encode()
    conns = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    rss = lambda: int(next(l for l in open("/proc/%d/status" % pid) if l.startswith("VmRSS")).split()[1])
    m = My(port, pw)
    m.query("INSERT INTO pipes_settings (name, length) VALUES ('hbig', 1000)")
    for _ in range(10):
        rows = ",".join("('hbig','e','%s')" % ("H" * 4000) for _ in range(100))
        m.query("INSERT INTO pipes_messages (name, event, message) VALUES " + rows)
    before, peak, done = rss(), [0], []

    def sample():
        while not done:
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    query = b"\x03" + ";".join(["SELECT * FROM pipes_messages WHERE name = 'hbig'"] * k).encode()
    clients = []
    for _ in range(conns):
        c = My(port, pw)
        c.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.write_packet(0, query)
        clients.append(c)
    time.sleep(3)
    for c in clients:
        c.s.close()
    time.sleep(0.5)
    done.append(1)
    print("K=%d CONNS=%d rss_before_kib=%d peak_kib=%d" % (k, conns, before, peak[0]))


main()
