//! Test harness: start the real `comet` binary on random loopback ports and
//! talk to it with real clients (tungstenite, raw TCP).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// Both I/O backends; every behaviour test runs on each.
pub const BACKENDS: [&str; 2] = ["uring", "epoll"];

/// A running server, killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// The CometQL (MySQL protocol) address.
    pub backend: SocketAddr,
    /// The HTTP API's address (None when the test turned it off).
    pub api: Option<SocketAddr>,
    /// The `--metrics` listener, when one was asked for.
    pub metrics: Option<SocketAddr>,
    pub log: mpsc::Receiver<String>,
    /// What the server logged while starting, up to "frontend listening".
    pub startup: Vec<String>,
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        Self::start_with(args, None)
    }

    /// Starts the server; `forbid_uring` installs a seccomp filter that makes
    /// io_uring_setup fail with EPERM, as Docker's default profile does.
    pub fn start_with(args: &[&str], forbid_uring: Option<()>) -> Server {
        Self::launch("127.0.0.1:0", "127.0.0.1:0", args, forbid_uring)
    }

    /// Starts the server on the given addresses instead of random ports.
    pub fn start_at(frontend: SocketAddr, backend: SocketAddr, args: &[&str]) -> Server {
        Self::launch(&frontend.to_string(), &backend.to_string(), args, None)
    }

    /// Starts the server with addresses given as text (`localhost:0`).
    pub fn start_named(frontend: &str, backend: &str, args: &[&str]) -> Server {
        Self::launch(frontend, backend, args, None)
    }

    fn launch(frontend: &str, backend: &str, args: &[&str], forbid_uring: Option<()>) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_comet"));
        cmd.args(["--frontend", frontend, "--backend", backend, "--node-name", "test-node"]);
        // A random port for the HTTP API too, unless the test chose one.
        if !args.contains(&"--api") {
            cmd.args(["--api", "127.0.0.1:0"]);
        }
        cmd.args(args);
        // Tests that do not test persistence leave no data dir behind.
        if !args.iter().any(|a| a.starts_with("--data-dir") || *a == "--ephemeral") {
            cmd.arg("--ephemeral");
        }
        cmd.env_remove("COMET_IO").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        if forbid_uring.is_some() {
            forbid_io_uring(&mut cmd);
        }
        Self::spawn_cmd(cmd)
    }

    /// Starts comet from a prepared command (its stderr is taken over) and
    /// waits until it listens.
    pub fn spawn_cmd(mut cmd: Command) -> Server {
        cmd.env_remove("COMET_IO").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start comet");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        let mut backend = None;
        let mut api = None;
        let mut metrics = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("comet: metrics listening on ") {
                        metrics = Some(a.trim().parse().expect("address"));
                    }
                    if let Some(a) = line.strip_prefix("comet: backend (CometQL) listening on ") {
                        backend = Some(a.trim().parse().expect("address"));
                    }
                    if let Some(a) = line.strip_prefix("comet: HTTP API listening on ") {
                        api = Some(a.trim().parse().expect("address"));
                    }
                    if let Some(a) = line.strip_prefix("comet: frontend listening on ") {
                        let addr = a.trim().parse().expect("address");
                        let backend = backend.expect("backend address logged before frontend");
                        return Server { child, addr, backend, api, metrics, log: rx, startup: seen };
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("server did not start; log: {seen:#?}");
                }
            }
        }
    }

    /// Lines the server logged since the last call.
    pub fn drain_log(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    pub fn url(&self, params: &str) -> String {
        format!("ws://{}/ws/{params}", self.addr)
    }

    /// Connects an anonymous comet client and consumes its serverInfo.
    pub fn client(&self, uuid: &str) -> Client {
        let mut c = Client::connect(&self.url(&format!("sesion=&myid=&devid=0&v=4.08&uuid={uuid}&api=js")));
        let info = c.recv();
        assert_eq!(info["event"], "serverInfo", "{info}");
        c
    }

    /// A plain HTTP GET; returns (status line, body).
    pub fn http_get(&self, path: &str) -> (String, String) {
        http_request(self.addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
    }

    /// The `/metrics` text, from the `--metrics` listener if there is one.
    pub fn metrics_text(&self) -> String {
        let at = self.metrics.unwrap_or(self.addr);
        let (status, body) = http_request(at, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(status.contains("200"), "{status}: {body}");
        body
    }

    /// A metric such as `comet_websockets`: the sum of its per-shard series
    /// (`comet_websockets{shard="0"}`, ...), as Prometheus' `sum()` makes it.
    /// With labels (`comet_websockets{shard="1"}`), that one series.
    pub fn metric(&self, name: &str) -> i64 {
        let body = self.metrics_text();
        let prefix = if name.contains('{') { format!("{name} ") } else { format!("{name}{{") };
        let values: Vec<i64> = body
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .map(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a number"))
            .collect();
        assert!(!values.is_empty(), "no metric {name} in:\n{body}");
        values.iter().sum()
    }

    pub fn sigterm(&self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }
}

/// Makes `io_uring_setup` fail with EPERM in the child, as Docker's default
/// seccomp profile does.
pub fn forbid_io_uring(cmd: &mut Command) {
    let filter: seccompiler::BpfProgram = seccompiler::SeccompFilter::new(
        vec![(libc::SYS_io_uring_setup, vec![])].into_iter().collect(),
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        std::env::consts::ARCH.try_into().expect("supported arch"),
    )
    .expect("filter")
    .try_into()
    .expect("bpf");
    // SAFETY: runs in the forked child before exec; it only makes the
    // prctl/seccomp syscalls on an already-built program, no allocation.
    unsafe {
        cmd.pre_exec(move || seccompiler::apply_filter(&filter).map_err(std::io::Error::other));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http_request(addr: SocketAddr, raw: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.lines().next().unwrap_or("").to_string(), body.to_string())
}

/// A comet WebSocket client.
pub struct Client {
    pub ws: WebSocket<MaybeTlsStream<TcpStream>>,
}

impl Client {
    pub fn connect(url: &str) -> Client {
        let (ws, _) = tungstenite::connect(url).expect("connect");
        Client::from_ws(ws)
    }

    /// A client over a WebSocket the test opened itself.
    pub fn from_ws(ws: WebSocket<MaybeTlsStream<TcpStream>>) -> Client {
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        Client { ws }
    }

    pub fn send(&mut self, text: &str) {
        self.ws.send(Message::text(text)).expect("send");
    }

    /// Next text message as JSON; panics after the read timeout.
    pub fn recv(&mut self) -> Value {
        loop {
            match self.ws.read().expect("read") {
                Message::Text(t) => return serde_json::from_str(&t).expect("json"),
                Message::Close(f) => panic!("closed: {f:?}"),
                _ => continue,
            }
        }
    }

    /// Next text message as raw text.
    pub fn recv_text(&mut self) -> String {
        loop {
            match self.ws.read().expect("read") {
                Message::Text(t) => return t.to_string(),
                Message::Close(f) => panic!("closed: {f:?}"),
                _ => continue,
            }
        }
    }

    /// Asserts nothing arrives within `ms`.
    pub fn expect_silence(&mut self, ms: u64) {
        if let MaybeTlsStream::Plain(s) = self.ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_millis(ms))).unwrap();
        }
        match self.ws.read() {
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            other => panic!("expected silence, got {other:?}"),
        }
        if let MaybeTlsStream::Plain(s) = self.ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
    }

    /// Reads until a close frame; returns its code.
    pub fn expect_close(&mut self) -> u16 {
        loop {
            match self.ws.read() {
                Ok(Message::Close(Some(f))) => return f.code.into(),
                Ok(Message::Close(None)) => return 1005,
                Ok(_) => continue,
                Err(e) => panic!("no close frame: {e}"),
            }
        }
    }

    pub fn subscribe(&mut self, names: &[&str]) {
        self.send(&format!("subscription\n{}", names.join("\n")));
    }
}

/// Waits until `f` holds, polling, for at most `secs` seconds.
pub fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A WebSocket upgrade request for `path`.
pub fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// A raw TCP WebSocket client for byte-level checks.
pub struct Raw {
    pub s: TcpStream,
}

impl Raw {
    /// Opens a WebSocket by hand and reads past the 101 head.
    pub fn open(addr: SocketAddr, path: &str) -> Raw {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(upgrade_request(path).as_bytes()).unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).unwrap();
            head.push(b[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        Raw { s }
    }

    /// Reads one server frame: (opcode, payload).
    pub fn frame(&mut self) -> (u8, Vec<u8>) {
        let (first, p) = read_frame(&mut self.s);
        (first & 0x0F, p)
    }

    /// Sends a masked frame with the given first byte.
    pub fn send_frame(&mut self, first: u8, payload: &[u8], masked: bool) {
        let mut v = vec![first];
        let m = if masked { 0x80 } else { 0 };
        if payload.len() < 126 {
            v.push(m | payload.len() as u8);
        } else if payload.len() <= 0xFFFF {
            v.push(m | 126);
            v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        } else {
            v.push(m | 127);
            v.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        let key = [1u8, 2, 3, 4];
        if masked {
            v.extend_from_slice(&key);
            v.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            v.extend_from_slice(payload);
        }
        self.s.write_all(&v).unwrap();
    }

    /// Reads frames until a close frame; returns its code.
    pub fn close_code(&mut self) -> u16 {
        loop {
            let (op, p) = self.frame();
            if op == 8 {
                return u16::from_be_bytes([p[0], p[1]]);
            }
        }
    }
}

/// Reads one unmasked server frame: (its first byte, payload).
pub fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    let mut len = (h[1] & 0x7F) as u64;
    if len == 126 {
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        len = u16::from_be_bytes(b) as u64;
    } else if len == 127 {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).unwrap();
        len = u64::from_be_bytes(b);
    }
    let mut p = vec![0u8; len as usize];
    s.read_exact(&mut p).unwrap();
    (h[0], p)
}

/// Writes a MySQL packet.
pub fn packet(out: &mut Vec<u8>, seq: u8, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes()[..3]);
    out.push(seq);
    out.extend_from_slice(payload);
}

pub fn read_packet(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 4];
    s.read_exact(&mut h).unwrap();
    let len = u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize;
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).unwrap();
    (h[3], p)
}

/// Logs in by hand with mysql_native_password; returns the stream.
pub fn raw_login(s: &Server, password: &str) -> (TcpStream, Vec<u8>) {
    raw_login_as(s, password, 0x10000, 45)
}

/// CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH.
pub const BASE_CAPS: u32 = 0x200 | 0x8000 | 0x80000;

/// Logs in by hand with `extra_caps` besides [`BASE_CAPS`] and the
/// character set of `collation`; returns the stream and the answer.
pub fn raw_login_as(s: &Server, password: &str, extra_caps: u32, collation: u8) -> (TcpStream, Vec<u8>) {
    login_on(TcpStream::connect(s.backend).unwrap(), password, extra_caps, collation)
}

/// [`raw_login_as`] over a stream already connected to the backend port.
pub fn login_on(mut t: TcpStream, password: &str, extra_caps: u32, collation: u8) -> (TcpStream, Vec<u8>) {
    use sha1::{Digest, Sha1};
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (_, g) = read_packet(&mut t);
    let vend = g.iter().position(|&b| b == 0).unwrap();
    let mut nonce = g[vend + 5..vend + 13].to_vec();
    // filler, capabilities (low), charset, status, capabilities (high),
    // auth data length, 10 reserved bytes, then the rest of the nonce.
    let rest = &g[vend + 14 + 2 + 1 + 2 + 2 + 1 + 10..];
    nonce.extend_from_slice(&rest[..12]);
    let h1: [u8; 20] = Sha1::digest(password.as_bytes()).into();
    let h2: [u8; 20] = Sha1::digest(h1).into();
    let mut h = Sha1::new();
    h.update(&nonce);
    h.update(h2);
    let h3: [u8; 20] = h.finalize().into();
    let scramble: Vec<u8> = h1.iter().zip(h3).map(|(a, b)| a ^ b).collect();
    let caps: u32 = BASE_CAPS | extra_caps;
    let mut p = Vec::new();
    p.extend_from_slice(&caps.to_le_bytes());
    p.extend_from_slice(&(1u32 << 24).to_le_bytes());
    p.push(collation);
    p.extend_from_slice(&[0; 23]);
    p.extend_from_slice(b"root\0");
    p.push(20);
    p.extend_from_slice(&scramble);
    p.extend_from_slice(b"mysql_native_password\0");
    let mut out = Vec::new();
    packet(&mut out, 1, &p);
    t.write_all(&out).unwrap();
    let (_, ok) = read_packet(&mut t);
    (t, ok)
}
