//! comet-bench: load generator for comet's WebSocket frontend.
//!
//! `idle` holds N connections subscribed to K channels and reports the
//! server's user-space RSS and the kernel's socket memory per connection,
//! separately. `fanout` holds N subscribers on one channel, publishes from a
//! browser connection (`web_pipe2`) and reports deliveries per second, server
//! CPU seconds per million deliveries (from /proc/PID/stat), latency
//! percentiles and loss. Connections are spread over source addresses
//! 127.0.0.1..=127.0.0.K so that one run is not capped by one address's
//! ephemeral ports; connections that fail to open are counted and reported.
//!
//! The full suite (CometQL publishers, users, churn, slow clients, peers side
//! by side) is issue #6; this is the part the foundation's numbers need.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "comet-bench", about = "Load generator for comet")]
struct Cli {
    /// comet's frontend address.
    #[arg(long, default_value = "127.0.0.1:8087", global = true)]
    server: SocketAddr,
    /// The server's pid, for RSS and CPU readings from /proc.
    #[arg(long, global = true)]
    pid: Option<u32>,
    /// Spread client sockets over this many source addresses 127.0.0.x.
    #[arg(long, default_value_t = 4, global = true)]
    sources: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Hold idle connections and report memory per connection.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        /// Channels each connection subscribes to.
        #[arg(long, default_value_t = 2)]
        channels: usize,
    },
    /// Publish through CometQL (pipelined INSERTs over several backend
    /// connections) to subscribers of one channel.
    Publish {
        /// The server's CometQL address.
        #[arg(long, default_value = "127.0.0.1:3300")]
        backend: SocketAddr,
        #[arg(long, default_value = "comet")]
        password: String,
        #[arg(long, default_value_t = 1000)]
        subs: usize,
        /// Backend connections.
        #[arg(long, default_value_t = 4)]
        conns: usize,
        /// INSERTs per backend connection.
        #[arg(long, default_value_t = 5000)]
        inserts: usize,
        /// INSERTs in flight per connection.
        #[arg(long, default_value_t = 32)]
        window: usize,
    },
    /// Private messages: U users x D devices authorized with keys set
    /// through CometQL, `users_messages` INSERTs round-robin over users.
    Private {
        #[arg(long, default_value = "127.0.0.1:3300")]
        backend: SocketAddr,
        #[arg(long, default_value = "comet")]
        password: String,
        #[arg(long, default_value_t = 10_000)]
        users: usize,
        #[arg(long, default_value_t = 1)]
        devices: usize,
        #[arg(long, default_value_t = 4)]
        conns: usize,
        /// INSERTs per backend connection.
        #[arg(long, default_value_t = 25_000)]
        inserts: usize,
        #[arg(long, default_value_t = 64)]
        window: usize,
    },
    /// Memory of offline users with queued messages, in-process (no sockets).
    UsersMem {
        #[arg(long, default_value_t = 1_000_000)]
        users: u64,
        /// Queued messages per user.
        #[arg(long, default_value_t = 1)]
        queued: usize,
    },
    /// Time the CometQL parser and planner in-process (no sockets).
    Parse {
        #[arg(long, default_value_t = 200_000)]
        iterations: usize,
    },
    /// Publish to many subscribers of one channel and report throughput.
    Fanout {
        #[arg(long, default_value_t = 10_000)]
        subs: usize,
        #[arg(long, default_value_t = 200)]
        messages: usize,
        /// Publishes in flight (awaiting their delivery report).
        #[arg(long, default_value_t = 4)]
        window: usize,
        /// Reader threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

fn main() {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Idle { conns, channels } => idle(&cli.server, cli.pid, cli.sources, conns, channels),
        Cmd::Publish { backend, ref password, subs, conns, inserts, window } => {
            publish(&cli.server, &backend, password, cli.pid, cli.sources, subs, conns, inserts, window)
        }
        Cmd::Parse { iterations } => parse_bench(iterations),
        Cmd::Private { backend, ref password, users, devices, conns, inserts, window } => {
            private(&cli.server, &backend, password, cli.pid, cli.sources, users, devices, conns, inserts, window)
        }
        Cmd::UsersMem { users, queued } => users_mem(users, queued),
        Cmd::Fanout { subs, messages, window, threads } => {
            fanout(&cli.server, cli.pid, cli.sources, subs, messages, window, threads)
        }
    }
}

/// Opens a WebSocket and reads past the 101 head and the serverInfo frame.
fn open_ws(server: &SocketAddr, source: u8, uuid: &str) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let local: SocketAddr = format!("127.0.0.{source}:0").parse().expect("address");
    sock.bind(&local.into())?;
    sock.connect(&(*server).into())?;
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET /ws/sesion=&myid=&devid=0&v=4.08&uuid={uuid}&api=js HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )?;
    let mut buf = Vec::with_capacity(512);
    let mut b = [0u8; 512];
    // Head, then one complete frame (serverInfo).
    loop {
        let n = s.read(&mut b)?;
        if n == 0 {
            return Err(std::io::Error::other("closed during handshake"));
        }
        buf.extend_from_slice(&b[..n]);
        if let Some(h) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = &buf[h + 4..];
            if let Some((_, used)) = parse_frame(rest)
                && used == rest.len()
            {
                return Ok(s);
            }
        }
    }
}

/// Sends a masked text frame.
fn send_text(s: &mut TcpStream, text: &str) -> std::io::Result<()> {
    let p = text.as_bytes();
    let mut v = Vec::with_capacity(p.len() + 14);
    v.push(0x81);
    if p.len() < 126 {
        v.push(0x80 | p.len() as u8);
    } else {
        v.push(0x80 | 126);
        v.extend_from_slice(&(p.len() as u16).to_be_bytes());
    }
    let key = [0x11u8, 0x22, 0x33, 0x44];
    v.extend_from_slice(&key);
    v.extend(p.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    s.write_all(&v)
}

/// Parses one unmasked server frame: (payload range start, total length).
fn parse_frame(b: &[u8]) -> Option<(usize, usize)> {
    if b.len() < 2 {
        return None;
    }
    let (len, start) = match b[1] & 0x7F {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().ok()?) as usize, 10),
        126 | 127 => return None,
        l => (l as usize, 2),
    };
    (b.len() >= start + len).then_some((start, start + len))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
}

/// utime + stime of a process in seconds.
fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// TCP socket memory in KiB (sockstat `mem` is in pages) and SUnreclaim in KiB.
fn kernel_mem_kib() -> (u64, u64) {
    let tcp_pages = std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("TCP:")).and_then(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.iter().position(|x| *x == "mem").and_then(|i| f.get(i + 1)?.parse::<u64>().ok())
            })
        })
        .unwrap_or(0);
    let sunreclaim = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SUnreclaim:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0);
    (tcp_pages * 4, sunreclaim)
}

fn idle(server: &SocketAddr, pid: Option<u32>, sources: u8, conns: usize, channels: usize) {
    let pid = pid.expect("idle needs --pid to read the server's RSS");
    std::thread::sleep(Duration::from_millis(500));
    let rss0 = rss_kib(pid).unwrap_or(0);
    let (tcp0, slab0) = kernel_mem_kib();
    let t = Instant::now();
    let mut held = Vec::with_capacity(conns);
    let mut failed = 0usize;
    for i in 0..conns {
        let source = 1 + (i % sources.max(1) as usize) as u8;
        match open_ws(server, source, &format!("i{i}")) {
            Ok(mut s) => {
                let names: Vec<String> = (0..channels).map(|k| format!("web_idle_{}", (i + k * 7) % 100)).collect();
                if send_text(&mut s, &format!("subscription\n{}", names.join("\n"))).is_err() {
                    failed += 1;
                    continue;
                }
                held.push(s);
            }
            Err(_) => failed += 1,
        }
        if i % 1000 == 999 {
            eprint!("\ridle: {} open, {failed} failed", held.len());
        }
    }
    eprintln!();
    let open_secs = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let rss1 = rss_kib(pid).unwrap_or(0);
    let (tcp1, slab1) = kernel_mem_kib();
    let n = held.len().max(1) as f64;
    println!(
        "idle: {} connections held ({failed} failed to open), {channels} channels each, opened in {open_secs:.1}s",
        held.len()
    );
    println!(
        "  server RSS: {rss0} KiB -> {rss1} KiB: {:.0} bytes per connection (user space)",
        (rss1 as f64 - rss0 as f64) * 1024.0 / n
    );
    println!(
        "  kernel TCP socket memory (sockstat mem): {tcp0} -> {tcp1} KiB: {:.0} bytes per connection (both ends)",
        (tcp1 as f64 - tcp0 as f64) * 1024.0 / n
    );
    println!(
        "  kernel SUnreclaim (socket structs etc.): {slab0} -> {slab1} KiB: {:.0} bytes per connection (both ends)",
        (slab1 as f64 - slab0 as f64) * 1024.0 / n
    );
}

#[allow(clippy::too_many_arguments)]
fn fanout(
    server: &SocketAddr,
    pid: Option<u32>,
    sources: u8,
    subs: usize,
    messages: usize,
    window: usize,
    threads: usize,
) {
    let channel = "web_fanout";
    let mut socks = Vec::with_capacity(subs);
    let mut failed = 0usize;
    for i in 0..subs {
        let source = 1 + (i % sources.max(1) as usize) as u8;
        match open_ws(server, source, &format!("f{i}")).and_then(|mut s| {
            send_text(&mut s, &format!("subscription\n{channel}"))?;
            Ok(s)
        }) {
            Ok(s) => socks.push(s),
            Err(_) => failed += 1,
        }
    }
    let mut publisher = open_ws(server, 1, "publisher").expect("publisher");
    // Wait until the server counts every subscriber.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        send_text(&mut publisher, &format!("pipe_count\n{channel}\nm\n")).expect("send");
        let f = read_frame(&mut publisher).expect("pipe_count answer");
        let text = String::from_utf8_lossy(&f);
        if text.contains(&format!("\"user_in_pipe\":{}}}", socks.len())) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("fanout: {} subscribers ({failed} failed to open)", socks.len());
    let expected = socks.len() as u64 * messages as u64;
    let per = socks.len().div_ceil(threads.max(1));
    let start = Instant::now();
    let mut readers = Vec::new();
    let mut chunks: Vec<Vec<TcpStream>> = Vec::new();
    while !socks.is_empty() {
        let rest = socks.split_off(socks.len().min(per));
        chunks.push(std::mem::replace(&mut socks, rest));
    }
    for chunk in chunks {
        let want = chunk.len() as u64 * messages as u64;
        readers.push(std::thread::spawn(move || read_all(chunk, want, start)));
    }
    let cpu0 = pid.and_then(cpu_secs);
    let t0 = Instant::now();
    let mut in_flight = 0usize;
    let mut sent = 0usize;
    let mut reports = 0usize;
    while reports < messages {
        while sent < messages && in_flight < window {
            let ts = start.elapsed().as_micros();
            send_text(&mut publisher, &format!("web_pipe2\n{channel}\nbench\n*\n{ts}")).expect("publish");
            sent += 1;
            in_flight += 1;
        }
        let f = read_frame(&mut publisher).expect("delivery report");
        if String::from_utf8_lossy(&f).contains("_answer_to_") {
            reports += 1;
            in_flight -= 1;
        }
    }
    let mut received = 0u64;
    let mut lat: Vec<u32> = Vec::new();
    for r in readers {
        let (n, mut l) = r.join().expect("reader");
        received += n;
        lat.append(&mut l);
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = match (cpu0, pid.and_then(cpu_secs)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    lat.sort_unstable();
    let pct =
        |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0);
    println!("fanout: {messages} messages x {} subscribers, window {window}", expected / messages.max(1) as u64);
    println!(
        "  delivered {received} of {expected} (loss {}) in {secs:.2}s: {:.0} deliveries/s",
        expected - received.min(expected),
        received as f64 / secs
    );
    if let Some(c) = cpu {
        println!("  server CPU {c:.2}s: {:.2} CPU-seconds per million deliveries", c / (received.max(1) as f64 / 1e6));
    }
    println!(
        "  latency publish->receipt: p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms",
        pct(0.5) as f64 / 1000.0,
        pct(0.99) as f64 / 1000.0,
        pct(0.999) as f64 / 1000.0,
        lat.last().copied().unwrap_or(0) as f64 / 1000.0
    );
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h)?;
    let len = match h[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b)?;
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b)?;
            u64::from_be_bytes(b) as usize
        }
        l => l as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p)?;
    Ok(p)
}

/// Reads every subscriber until `want` messages arrived or 30 s of silence;
/// returns the count and latencies in microseconds.
fn read_all(socks: Vec<TcpStream>, want: u64, start: Instant) -> (u64, Vec<u32>) {
    let poller = polling::Poller::new().expect("poller");
    let mut bufs: HashMap<usize, Vec<u8>> = HashMap::new();
    for (i, s) in socks.iter().enumerate() {
        s.set_nonblocking(true).expect("nonblocking");
        // SAFETY: each socket outlives its registration: every source is
        // deleted from the poller below, before `socks` is dropped.
        unsafe { poller.add(s, polling::Event::readable(i)) }.expect("register");
    }
    let mut got = 0u64;
    let mut lat = Vec::with_capacity(want as usize / 8 + 1);
    let mut events = polling::Events::new();
    let mut scratch = vec![0u8; 64 * 1024];
    let mut sample = 0u64;
    let mut last_progress = Instant::now();
    while got < want && last_progress.elapsed() < Duration::from_secs(30) {
        events.clear();
        poller.wait(&mut events, Some(Duration::from_millis(200))).expect("wait");
        for ev in events.iter() {
            let i = ev.key;
            let mut s = &socks[i];
            loop {
                match s.read(&mut scratch) {
                    Ok(0) => break,
                    Ok(n) => {
                        let buf = bufs.entry(i).or_default();
                        buf.extend_from_slice(&scratch[..n]);
                        let mut pos = 0;
                        while let Some((ps, end)) = parse_frame(&buf[pos..]) {
                            let payload = &buf[pos + ps..pos + end];
                            got += 1;
                            sample += 1;
                            // Latency of every 8th message keeps memory small.
                            if sample.is_multiple_of(8)
                                && let Some(ts) = payload_ts(payload)
                            {
                                let now = start.elapsed().as_micros() as u64;
                                lat.push(now.saturating_sub(ts) as u32);
                            }
                            pos += end;
                        }
                        buf.drain(..pos);
                        last_progress = Instant::now();
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => break,
                }
            }
            poller.modify(s, polling::Event::readable(i)).expect("rearm");
        }
    }
    for s in &socks {
        let _ = poller.delete(s);
    }
    (got, lat)
}

/// The publish time (µs since the run started) carried as the message data.
fn payload_ts(p: &[u8]) -> Option<u64> {
    let key = b"\"data\":\"";
    let at = p.windows(key.len()).position(|w| w == key)? + key.len();
    let digits: Vec<u8> = p[at..].iter().take_while(|b| b.is_ascii_digit()).copied().collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// Writes one MySQL packet.
fn mysql_packet(out: &mut Vec<u8>, seq: u8, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes()[..3]);
    out.push(seq);
    out.extend_from_slice(payload);
}

fn mysql_read(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h)?;
    let mut p = vec![0u8; u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize];
    s.read_exact(&mut p)?;
    Ok(p)
}

/// Logs in to CometQL with mysql_native_password.
fn mysql_login(addr: &SocketAddr, password: &str) -> std::io::Result<TcpStream> {
    use sha1::{Digest, Sha1};
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let g = mysql_read(&mut s)?;
    let vend = g.iter().position(|&b| b == 0).ok_or_else(|| std::io::Error::other("bad greeting"))?;
    let mut nonce = g[vend + 5..vend + 13].to_vec();
    nonce.extend_from_slice(&g[vend + 32..vend + 44]);
    let h1: [u8; 20] = Sha1::digest(password.as_bytes()).into();
    let h2: [u8; 20] = Sha1::digest(h1).into();
    let mut h = Sha1::new();
    h.update(&nonce);
    h.update(h2);
    let h3: [u8; 20] = h.finalize().into();
    let caps: u32 = 0x200 | 0x8000 | 0x80000;
    let mut p = Vec::new();
    p.extend_from_slice(&caps.to_le_bytes());
    p.extend_from_slice(&(1u32 << 24).to_le_bytes());
    p.push(45);
    p.extend_from_slice(&[0; 23]);
    p.extend_from_slice(b"root\0");
    p.push(20);
    p.extend(h1.iter().zip(h3).map(|(a, b)| a ^ b));
    p.extend_from_slice(b"mysql_native_password\0");
    let mut out = Vec::new();
    mysql_packet(&mut out, 1, &p);
    s.write_all(&out)?;
    let ok = mysql_read(&mut s)?;
    if ok.first() != Some(&0) {
        return Err(std::io::Error::other(format!("login refused: {}", String::from_utf8_lossy(&ok))));
    }
    Ok(s)
}

#[allow(clippy::too_many_arguments)]
fn publish(
    server: &SocketAddr,
    backend: &SocketAddr,
    password: &str,
    pid: Option<u32>,
    sources: u8,
    subs: usize,
    conns: usize,
    inserts: usize,
    window: usize,
) {
    let channel = "bench_publish";
    let mut socks = Vec::with_capacity(subs);
    let mut failed = 0;
    for i in 0..subs {
        let source = 1 + (i % sources.max(1) as usize) as u8;
        match open_ws(server, source, &format!("p{i}")).and_then(|mut s| {
            send_text(&mut s, &format!("subscription\n{channel}"))?;
            Ok(s)
        }) {
            Ok(s) => socks.push(s),
            Err(_) => failed += 1,
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let expected = socks.len() as u64 * (conns * inserts) as u64;
    let start = Instant::now();
    let reader = {
        let want = expected;
        std::thread::spawn(move || read_all(socks, want, start))
    };
    let cpu0 = pid.and_then(cpu_secs);
    let t0 = Instant::now();
    let writers: Vec<_> = (0..conns)
        .map(|_| {
            let backend = *backend;
            let password = password.to_string();
            std::thread::spawn(move || -> u64 {
                let mut s = mysql_login(&backend, &password).expect("CometQL login");
                let mut reader = s.try_clone().expect("clone");
                let mut affected = 0u64;
                let (tx, rx) = std::sync::mpsc::sync_channel::<()>(window);
                let collector = std::thread::spawn(move || {
                    let mut sum = 0u64;
                    for _ in 0..inserts {
                        let p = mysql_read(&mut reader).expect("answer");
                        assert_eq!(p[0], 0, "INSERT failed: {}", String::from_utf8_lossy(&p));
                        sum += p[1] as u64 + if p[1] == 0xFC { (p[2] as u64 | (p[3] as u64) << 8) - 0xFC } else { 0 };
                        let _ = rx.recv();
                    }
                    sum
                });
                let mut buf = Vec::with_capacity(256);
                for _ in 0..inserts {
                    let ts = start.elapsed().as_micros();
                    let q = format!(
                        "\x03INSERT INTO pipes_messages (name, event, message) VALUES ('{channel}', 'bench', '{ts}')"
                    );
                    buf.clear();
                    mysql_packet(&mut buf, 0, q.as_bytes());
                    tx.send(()).expect("window");
                    s.write_all(&buf).expect("write");
                }
                drop(tx);
                affected += collector.join().expect("collector");
                affected
            })
        })
        .collect();
    let mut affected = 0;
    for w in writers {
        affected += w.join().expect("writer");
    }
    let insert_secs = t0.elapsed().as_secs_f64();
    let (received, mut lat) = reader.join().expect("reader");
    let secs = t0.elapsed().as_secs_f64();
    let cpu = match (cpu0, pid.and_then(cpu_secs)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    lat.sort_unstable();
    let pct =
        |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0);
    let total = conns * inserts;
    println!(
        "publish: {total} INSERTs over {conns} CometQL connections (window {window}) to {} subscribers ({failed} failed to open)",
        expected / total.max(1) as u64
    );
    println!(
        "  {:.0} INSERTs/s (all answered in {insert_secs:.2}s); affected rows summed {affected}",
        total as f64 / insert_secs
    );
    println!(
        "  delivered {received} of {expected} (loss {}) in {secs:.2}s: {:.0} deliveries/s",
        expected - received.min(expected),
        received as f64 / secs
    );
    if let Some(c) = cpu {
        println!(
            "  server CPU {c:.2}s: {:.1} µs per INSERT, {:.2} CPU-seconds per million deliveries",
            c * 1e6 / total as f64,
            c / (received.max(1) as f64 / 1e6)
        );
    }
    println!(
        "  latency INSERT->receipt: p50 {:.1} ms, p99 {:.1} ms",
        pct(0.5) as f64 / 1000.0,
        pct(0.99) as f64 / 1000.0
    );
}

/// Parses and plans a typical publish INSERT in a loop.
fn parse_bench(iterations: usize) {
    use comet::cometql::{exec, parser};
    let sql = r#"INSERT INTO pipes_messages (name, event, message) VALUES ('bench_publish', 'bench', '{\"text\":\"hello world\",\"n\":12345}')"#;
    let may = |_: u32| true;
    let status = Vec::new;
    let ctx = exec::Ctx {
        dev_id: 0,
        database: "CometQL_v1",
        connection_id: 1,
        may_use_dev: &may,
        status: &status,
        max_query_size: 1 << 20,
    };
    let t = Instant::now();
    let mut n = 0usize;
    for _ in 0..iterations {
        let st = parser::parse(sql).expect("parse");
        for s in st {
            if let exec::Plan::Publish(v) = exec::plan(s, &ctx) {
                n += v.len();
            }
        }
    }
    let per = t.elapsed().as_nanos() as f64 / iterations as f64;
    println!("parse: {iterations} INSERTs lexed, parsed and planned ({n} publishes): {per:.0} ns each");
}

/// Sends pipelined COM_QUERYs on `s`, at most `window` unanswered; returns
/// the summed affected rows. `query(i)` makes the i-th statement.
fn pipelined(s: &mut TcpStream, count: usize, window: usize, query: impl Fn(usize) -> String) -> u64 {
    let mut reader = s.try_clone().expect("clone");
    let (tx, rx) = std::sync::mpsc::sync_channel::<()>(window);
    let collector = std::thread::spawn(move || {
        let mut sum = 0u64;
        for _ in 0..count {
            let p = mysql_read(&mut reader).expect("answer");
            assert_eq!(p[0], 0, "query failed: {}", String::from_utf8_lossy(&p));
            let mut rest = &p[1..];
            sum += lenenc(&mut rest);
            let _ = rx.recv();
        }
        sum
    });
    let mut buf = Vec::with_capacity(256);
    for i in 0..count {
        let mut q = vec![0x03];
        q.extend_from_slice(query(i).as_bytes());
        buf.clear();
        mysql_packet(&mut buf, 0, &q);
        tx.send(()).expect("window");
        s.write_all(&buf).expect("write");
    }
    drop(tx);
    collector.join().expect("collector")
}

fn lenenc(p: &mut &[u8]) -> u64 {
    let (v, used) = match p.first() {
        Some(&b) if b < 251 => (b as u64, 1),
        Some(0xFC) => (u16::from_le_bytes([p[1], p[2]]) as u64, 3),
        Some(0xFD) => (u32::from_le_bytes([p[1], p[2], p[3], 0]) as u64, 4),
        _ => (u64::from_le_bytes(p[1..9].try_into().unwrap_or_default()), 9),
    };
    *p = &p[used..];
    v
}

/// Opens a WebSocket as user `uid` with `key`; checks it was authorized.
fn open_user(server: &SocketAddr, source: u8, uid: usize, key: &str) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let local: SocketAddr = format!("127.0.0.{source}:0").parse().expect("address");
    sock.bind(&local.into())?;
    sock.connect(&(*server).into())?;
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET /ws/sesion={key}&myid={uid}&devid=0&v=4.08&uuid=b{uid}&api=js HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b)?;
        head.push(b[0]);
    }
    let info = read_frame(&mut s)?;
    if !info.starts_with(b"{\"authorized\":true") {
        return Err(std::io::Error::other(format!("not authorized: {}", String::from_utf8_lossy(&info))));
    }
    Ok(s)
}

#[allow(clippy::too_many_arguments)]
fn private(
    server: &SocketAddr,
    backend: &SocketAddr,
    password: &str,
    pid: Option<u32>,
    sources: u8,
    users: usize,
    devices: usize,
    conns: usize,
    inserts: usize,
    window: usize,
) {
    let mut admin = mysql_login(backend, password).expect("CometQL login");
    let batches = users.div_ceil(1000);
    pipelined(&mut admin, batches, 8, |b| {
        let rows: Vec<String> =
            (b * 1000 + 1..=((b + 1) * 1000).min(users)).map(|u| format!("({u}, 'k{u}')")).collect();
        format!("INSERT INTO users_auth (id, hash) VALUES {}", rows.join(","))
    });
    let mut socks = Vec::with_capacity(users * devices);
    let mut failed = 0;
    for i in 0..users * devices {
        let uid = i % users + 1;
        let source = 1 + (i % sources.max(1) as usize) as u8;
        match open_user(server, source, uid, &format!("k{uid}")) {
            Ok(s) => socks.push(s),
            Err(_) => failed += 1,
        }
        if i % 1000 == 999 {
            eprint!("\rprivate: {} devices open, {failed} failed", socks.len());
        }
    }
    eprintln!();
    let expected = (conns * inserts * devices) as u64;
    let start = Instant::now();
    let per = socks.len().div_ceil(2);
    let mut chunks = Vec::new();
    while !socks.is_empty() {
        let rest = socks.split_off(socks.len().min(per));
        chunks.push(std::mem::replace(&mut socks, rest));
    }
    let total_socks: usize = chunks.iter().map(|c| c.len()).sum();
    let readers: Vec<_> = chunks
        .into_iter()
        .map(|c| {
            let want = (c.len() as u64 * expected).div_ceil(total_socks.max(1) as u64);
            std::thread::spawn(move || read_all(c, want, start))
        })
        .collect();
    let cpu0 = pid.and_then(cpu_secs);
    let t0 = Instant::now();
    let writers: Vec<_> = (0..conns)
        .map(|w| {
            let backend = *backend;
            let password = password.to_string();
            std::thread::spawn(move || {
                let mut s = mysql_login(&backend, &password).expect("CometQL login");
                pipelined(&mut s, inserts, window, |i| {
                    let uid = (w * inserts + i) % users + 1;
                    let ts = start.elapsed().as_micros();
                    format!("INSERT INTO users_messages (id, event, message) VALUES ({uid}, 'bench', '{ts}')")
                })
            })
        })
        .collect();
    let affected: u64 = writers.into_iter().map(|w| w.join().expect("writer")).sum();
    let insert_secs = t0.elapsed().as_secs_f64();
    let mut received = 0;
    let mut lat = Vec::new();
    for r in readers {
        let (n, mut l) = r.join().expect("reader");
        received += n;
        lat.append(&mut l);
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = match (cpu0, pid.and_then(cpu_secs)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    lat.sort_unstable();
    let pct =
        |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0);
    let total = conns * inserts;
    println!(
        "private: {users} users x {devices} devices ({failed} failed to open), {total} users_messages INSERTs over {conns} connections (window {window})"
    );
    println!(
        "  {:.0} INSERTs/s (answered in {insert_secs:.2}s), affected rows summed {affected}",
        total as f64 / insert_secs
    );
    println!(
        "  delivered {received} of {expected} (loss {}) in {secs:.2}s: {:.0} deliveries/s",
        expected.saturating_sub(received),
        received as f64 / secs
    );
    if let Some(c) = cpu {
        println!("  server CPU {c:.2}s: {:.1} µs per private message", c * 1e6 / total as f64);
    }
    println!(
        "  latency INSERT->receipt: p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms",
        pct(0.5) as f64 / 1000.0,
        pct(0.99) as f64 / 1000.0,
        pct(0.999) as f64 / 1000.0,
        lat.last().copied().unwrap_or(0) as f64 / 1000.0
    );
}

/// Resident memory of this process in KiB.
fn self_rss_kib() -> u64 {
    rss_kib(std::process::id()).unwrap_or(0)
}

fn users_mem(users: u64, queued: usize) {
    use comet::users::{Queued, UserStore};
    let before = self_rss_kib();
    let mut store = UserStore::default();
    for u in 1..=users {
        for i in 0..queued {
            let q = Queued {
                time: 1_700_000_000 + i as i64,
                event: "message".into(),
                message: format!("{{\"n\":{u}}}").into(),
            };
            store.enqueue(0, u, q, 64, 300, 1_700_000_000);
        }
    }
    let after = self_rss_kib();
    println!(
        "users-mem: {} offline users with {queued} queued message(s) each: RSS {before} -> {after} KiB, {:.0} bytes per user",
        store.len(),
        (after - before) as f64 * 1024.0 / users as f64
    );
}
