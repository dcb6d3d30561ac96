//! Hostile traffic (`comet-bench attack <scenario>`): the attacks of the
//! hardening issue as repeatable scenarios, so one command measures the
//! server before a fix and again after it.
//!
//! Every scenario is bounded: each read has a timeout, floods stop after
//! `--seconds` (or early when the server's RSS passes `--rss-limit-mib`, a
//! safety stop for a shared machine, which the figures then report), and
//! loops stop by count. Clients connect over loopback only. A scenario
//! prints the usual table, then its targets as PASS/FAIL lines (in `--json`
//! as `checks`).
//!
//! With `--spawn`, comet's output goes to a temporary file: the table counts
//! the lines the server logged during the run and stderr shows a few. The
//! scenarios that need a server flag (`--echo-path`, a large
//! `--max-query-size` or `--max-message-size`) add it when they spawn comet,
//! unless a `--server-arg` sets it; against a running server, start it with
//! that flag (each scenario's help names it).
//!
//! Not here: protocol helpers (`wire.rs`), /proc readings (`proc.rs`), the
//! table and JSON (`report.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use hdrhistogram::Histogram;

use crate::report::Figures;
use crate::target::{Kind, Target};
use crate::{Global, die, source, wire};

/// How long setting a scenario up may wait on the server (logins,
/// handshakes before the attack starts).
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a probe of "can anyone else still get in" waits.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// An anonymous browser's path, as comet.js builds it; the uuid follows.
const BROWSER_PATH: &str = "/ws/sesion=&myid=&devid=0&v=4.08&api=js&uuid=";

/// The attacks, numbered as in the hardening issue.
#[derive(Subcommand, Clone)]
pub enum Attack {
    /// (1) Anonymous browsers flood web_pipe2 or pipe_count at a channel with
    /// subscribers; meanwhile: server RSS, a bystander's publish-to-receive
    /// latency, backend INSERT latency and the time a new connection takes.
    Flood(FloodArgs),
    /// (2) SHOW VARIABLES LIKE with many `%`: how long one query keeps a shard busy.
    Like(LikeArgs),
    /// (3, 4) Clients that flood pings (or echo messages, `--echo`) and never read.
    Nonreader(NonreaderArgs),
    /// (5) Clients that start a frame (or an HTTP request head) and trickle it.
    Slowloris(SlowlorisArgs),
    /// (6) Frontend connections until the server's descriptors run out; can
    /// a backend still log in and /metrics still answer?
    Exhaust(ExhaustArgs),
    /// (7) Large CometQL queries sent in small writes: server CPU by size.
    /// Needs `--max-query-size` above the largest size (added when spawned).
    Bigquery(BigqueryArgs),
    /// (8) A huge bad channel name: how big is the error that names it?
    /// Needs `--max-query-size` and `--max-message-size` above `--bytes` (added when spawned).
    Errsize(ErrsizeArgs),
    /// (9) Wrong-password backend logins as fast as possible from one address.
    Logins(LoginsArgs),
    /// (internal) opens and holds frontend connections for `exhaust`.
    #[command(hide = true)]
    ExhaustHold {
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        offset: usize,
        #[arg(long)]
        timeout_ms: u64,
        #[arg(long)]
        max_failures: usize,
    },
}

/// The safety stop of the scenarios that grow the server's memory.
#[derive(Args, Clone)]
pub struct Guard {
    /// Stop attacking when the server's RSS passes this many MiB (a safety
    /// stop on a shared machine; the figures say when it fired).
    #[arg(long, default_value_t = 6144)]
    rss_limit_mib: u64,
}

/// What the flooding browsers send.
#[derive(Clone, Copy, ValueEnum)]
pub enum FloodKind {
    /// `web_pipe2` publishes to the flooded channel.
    WebPipe,
    /// `pipe_count` questions about the flooded channel.
    PipeCount,
}

/// Sizes of `attack flood`.
#[derive(Args, Clone)]
pub struct FloodArgs {
    #[arg(long, value_enum, default_value = "web-pipe")]
    kind: FloodKind,
    /// Attacking browsers (anonymous, each sending as fast as it can and
    /// reading its answers).
    #[arg(long, default_value_t = 50)]
    attackers: usize,
    /// Commands per second each attacker sends (0: as fast as it can). At
    /// or under the server's `--client-rate` the attackers are never closed,
    /// and only the per-channel bound (`--channel-rate`) holds the fan-out.
    #[arg(long, default_value_t = 0.0)]
    attacker_rate: f64,
    /// Subscribers of the flooded channel (they read what arrives).
    #[arg(long, default_value_t = 1000)]
    subs: usize,
    /// The subscribers never read (the server drops them as slow consumers
    /// once their queues fill); by default one client thread reads them all,
    /// which costs the client CPU it then does not spend attacking.
    #[arg(long)]
    subs_never_read: bool,
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Bystander publishes per second, and backend INSERTs per second.
    #[arg(long, default_value_t = 5.0)]
    probe_rate: f64,
    /// Client threads driving the attackers.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[command(flatten)]
    guard: Guard,
}

/// Sizes of `attack like`.
#[derive(Args, Clone)]
pub struct LikeArgs {
    /// `%` signs before the trailing `q` (comma-separated for a series,
    /// which stops at the first timeout: the shard is still busy then).
    #[arg(long, value_delimiter = ',', default_value = "16")]
    percents: Vec<usize>,
    /// Seconds to wait for each answer.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
}

/// Sizes of `attack nonreader`.
#[derive(Args, Clone)]
pub struct NonreaderArgs {
    /// Flood the echo endpoint with messages instead of comet's with pings
    /// (a spawned comet gets `--echo-path`).
    #[arg(long)]
    echo: bool,
    /// The WebSocket path of the ping flood.
    #[arg(long, default_value = "/ws/sesion=&myid=&devid=0&v=4.08&api=js&uuid=nonreader")]
    path: String,
    /// The echo endpoint's path (`--echo`).
    #[arg(long, default_value = "/echo")]
    echo_path: String,
    #[arg(long, default_value_t = 40)]
    clients: usize,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Payload bytes of each echo message.
    #[arg(long, default_value_t = 16384)]
    size: usize,
    /// Payload bytes of each ping (at most 125); an empty ping makes the
    /// smallest pong, so the most of them fit under a byte bound.
    #[arg(long, default_value_t = 0)]
    ping_size: usize,
    /// Client threads driving the clients.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[command(flatten)]
    guard: Guard,
}

/// What a slowloris client trickles.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SlowMode {
    /// A WebSocket frame, after a normal upgrade.
    Frame,
    /// The HTTP request head of the upgrade.
    Head,
}

/// Sizes of `attack slowloris`.
#[derive(Args, Clone)]
pub struct SlowlorisArgs {
    #[arg(long, value_enum, default_value = "frame")]
    mode: SlowMode,
    #[arg(long, default_value_t = 20)]
    clients: usize,
    /// Declared payload length of the trickled frame.
    #[arg(long, default_value_t = 65000)]
    frame_size: usize,
    /// Bytes of the frame left to trickle (the rest is sent at once).
    #[arg(long, default_value_t = 4096)]
    remaining: usize,
    /// Seconds between trickled bytes.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// The time the server should allow to finish a frame or head (the
    /// fixed server's `--message-timeout`); the target is a close within it
    /// (plus 2 s for the server's once-a-second sweep and the trickle step).
    #[arg(long, default_value_t = 10.0)]
    message_timeout: f64,
    /// How long to watch [default: 2 x message-timeout + 5].
    #[arg(long)]
    seconds: Option<f64>,
    #[command(flatten)]
    guard: Guard,
}

/// Sizes of `attack exhaust`.
#[derive(Args, Clone)]
pub struct ExhaustArgs {
    /// Frontend connections to try (WebSocket upgrades, held open).
    #[arg(long, default_value_t = 24_000)]
    conns: usize,
    /// Client processes [default: one per 18,000 connections, since one
    /// process may hold 20,000 descriptors here].
    #[arg(long)]
    procs: Option<usize>,
    /// Milliseconds one connect and upgrade may take.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// A client process stops after this many failures in a row (the server
    /// stopped accepting).
    #[arg(long, default_value_t = 3)]
    max_failures: usize,
}

/// Sizes of `attack bigquery`.
#[derive(Args, Clone)]
pub struct BigqueryArgs {
    /// Query sizes in MiB, comma-separated; the first is the ratio's base.
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    mib: Vec<usize>,
    /// Bytes per write.
    #[arg(long, default_value_t = 4096)]
    chunk: usize,
    /// Seconds to wait for each answer.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
}

/// Sizes of `attack errsize`.
#[derive(Args, Clone)]
pub struct ErrsizeArgs {
    /// Bytes of the bad channel name.
    #[arg(long, default_value_t = 4 << 20)]
    bytes: usize,
    /// The largest error that passes (a clipped name of ~256 characters, a
    /// marker, the message around it and, for browsers, the JSON envelope).
    #[arg(long, default_value_t = 512)]
    limit: usize,
}

/// Sizes of `attack logins`.
#[derive(Args, Clone)]
pub struct LoginsArgs {
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// The guesses come from 127.0.0.N.
    #[arg(long, default_value_t = 1)]
    source: u8,
    /// Milliseconds one login attempt may take.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

/// Runs one attack scenario; `None` for the internal helper.
pub fn main(g: &Global, attack: &Attack) -> Option<Figures> {
    if let Attack::ExhaustHold { conns, offset, timeout_ms, max_failures } = *attack {
        exhaust_hold(g, conns, offset, Duration::from_millis(timeout_ms), max_failures);
        return None;
    }
    if g.target != Kind::Comet {
        die("attack scenarios speak comet's protocols: --target comet only");
    }
    let log = g.spawn.then(|| std::env::temp_dir().join(format!("comet-bench-attack-{}.log", std::process::id())));
    let t = if g.spawn {
        let mut opts = crate::spawn_opts(g);
        opts.extra_args = server_flags(attack, &g.server_args);
        opts.log = log.clone();
        opts.lift_per_ip_limit = false;
        Target::spawn(Kind::Comet, &opts).unwrap_or_else(|e| die(&format!("cannot start comet: {e}")))
    } else {
        Target::attach(Kind::Comet, g.server, Some(g.backend), &g.password, g.pid)
    };
    if t.pid.is_none() {
        eprintln!("attack: no --pid, so no server RSS or CPU figures");
    }
    // The server logs its start after it listens: wait until that settles.
    let log_lines = |p: &std::path::Path| std::fs::read_to_string(p).map_or(0, |s| s.lines().count());
    let mut log_start = log.as_deref().map_or(0, log_lines);
    if let Some(p) = &log {
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(200));
            let n = log_lines(p);
            if n == log_start {
                break;
            }
            log_start = n;
        }
    }
    let mut f = match attack {
        Attack::Flood(a) => flood(g, &t, a),
        Attack::Like(a) => like(&t, a),
        Attack::Nonreader(a) => nonreader(g, &t, a),
        Attack::Slowloris(a) => slowloris(g, &t, a),
        Attack::Exhaust(a) => exhaust(g, &t, a),
        Attack::Bigquery(a) => bigquery(&t, a),
        Attack::Errsize(a) => errsize(&t, a),
        Attack::Logins(a) => logins(&t, a),
        Attack::ExhaustHold { .. } => unreachable!("handled above"),
    };
    if let Some(p) = &log {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        let lines: Vec<&str> = text.lines().skip(log_start).collect();
        f.extra.insert("server log lines during the run".into(), lines.len() as f64);
        for l in lines.iter().take(5) {
            eprintln!("server log: {}", clip(l, 200));
        }
        if lines.len() > 5 {
            eprintln!("server log: ... and {} more line(s)", lines.len() - 5);
        }
    }
    drop(t);
    if let Some(p) = &log {
        let _ = std::fs::remove_file(p);
    }
    Some(f)
}

/// The flags a spawned comet needs for `attack`, then the user's own
/// (`--server-arg`); a flag the user sets is not added twice.
fn server_flags(attack: &Attack, user: &[String]) -> Vec<String> {
    let needs: Vec<(&str, String)> = match attack {
        Attack::Nonreader(a) if a.echo => vec![("--echo-path", a.echo_path.clone())],
        Attack::Bigquery(a) => {
            vec![("--max-query-size", ((a.mib.iter().copied().max().unwrap_or(1) + 1) << 20).to_string())]
        }
        Attack::Errsize(a) => {
            let room = (a.bytes + (1 << 20)).to_string();
            vec![("--max-query-size", room.clone()), ("--max-message-size", room)]
        }
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for (flag, value) in needs {
        if !user.iter().any(|u| u == flag || u.starts_with(&format!("{flag}="))) {
            out.push(flag.to_string());
            out.push(value);
        }
    }
    out.extend(user.iter().cloned());
    out
}

fn figures(scenario: &str) -> Figures {
    Figures { scenario: scenario.into(), target: Kind::Comet.name().into(), ..Figures::default() }
}

fn clip(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}... ({} bytes)", &s[..i], s.len()),
        None => s.to_string(),
    }
}

/// An I/O error as a person reads it: a read timeout is EAGAIN to the OS.
fn why(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "timed out".into(),
        _ => e.to_string(),
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn new_hist() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

/// A quantile of a histogram of microseconds, in ms (infinite when empty:
/// no sample is no evidence of speed).
fn q_ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() { f64::INFINITY } else { h.value_at_quantile(q) as f64 / 1000.0 }
}

/// Sleeps until `t0 + i / rate`, waking every 50 ms to look at `stop`;
/// false when stopped.
fn pace(t0: Instant, i: u64, rate: f64, stop: &AtomicBool) -> bool {
    let due = t0 + Duration::from_secs_f64(i as f64 / rate.max(0.001));
    while let Some(d) = due.checked_duration_since(Instant::now()) {
        if stop.load(Relaxed) {
            return false;
        }
        std::thread::sleep(d.min(Duration::from_millis(50)));
    }
    !stop.load(Relaxed)
}

/// Opens an anonymous comet WebSocket and reads its serverInfo.
fn open_anon(front: &SocketAddr, source: u8, uuid: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let mut s = wire::connect_within(front, source, Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    wire::ws_handshake(&mut s, &format!("{BROWSER_PATH}{uuid}"))?;
    wire::read_frame(&mut s)?;
    Ok(s)
}

/// Logs in to CometQL from 127.0.0.`source`, every step within `timeout`.
fn login_within(back: &SocketAddr, source: u8, password: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let mut s = wire::connect_within(back, source, Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    wire::mysql_auth(&mut s, password)?;
    Ok(s)
}

/// A plain HTTP GET from 127.0.0.`source`; (status, whole answer) within `timeout`.
fn http_get(front: &SocketAddr, source: u8, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let deadline = Instant::now() + timeout;
    let mut s = wire::connect_within(front, source, Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut answer = Vec::new();
    let mut tmp = [0u8; 16384];
    while Instant::now() < deadline && answer.len() < (4 << 20) {
        match s.read(&mut tmp) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&tmp[..n]),
            Err(e) if answer.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    if status == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no HTTP answer"));
    }
    Ok((status, text))
}

/// One metric from comet's /metrics summed over its per-shard series, if
/// it answers within a few seconds.
fn metric(t: &Target, name: &str) -> Option<f64> {
    let (_, body) = http_get(&t.front, 1, "/metrics", PROBE_TIMEOUT).ok()?;
    let prefix = format!("{name}{{");
    let values: Vec<f64> =
        body.lines().filter(|l| l.starts_with(&prefix)).filter_map(|l| l.rsplit(' ').next()?.parse().ok()).collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// A CometQL answer.
enum Answer {
    /// OK with affected rows.
    Ok,
    /// A result set with this many rows.
    Rows(u64),
    /// ERR: code and message.
    Err(u16, String),
}

/// The COM_QUERY packets for `sql`, split at the protocol's 16 MiB packet size.
fn query_packets(sql: &[u8]) -> Vec<u8> {
    const MAX: usize = 0xFF_FFFF;
    let mut payload = Vec::with_capacity(sql.len() + 1);
    payload.push(0x03);
    payload.extend_from_slice(sql);
    let mut out = Vec::with_capacity(payload.len() + 4 * (payload.len() / MAX + 2));
    let mut seq = 0u8;
    for chunk in payload.chunks(MAX) {
        wire::mysql_packet(&mut out, seq, chunk);
        seq = seq.wrapping_add(1);
    }
    if payload.len().is_multiple_of(MAX) {
        wire::mysql_packet(&mut out, seq, &[]);
    }
    out
}

/// Reads one whole CometQL answer (a classic result set ends at its second EOF).
fn read_answer(s: &mut TcpStream) -> std::io::Result<Answer> {
    let err = |p: &[u8]| {
        let code = u16::from_le_bytes([p.get(1).copied().unwrap_or(0), p.get(2).copied().unwrap_or(0)]);
        let msg = if p.get(3) == Some(&b'#') { p.get(9..) } else { p.get(3..) };
        Answer::Err(code, String::from_utf8_lossy(msg.unwrap_or_default()).into_owned())
    };
    let p = wire::mysql_read(s)?;
    match p.first() {
        Some(0) => Ok(Answer::Ok),
        Some(0xFF) => Ok(err(&p)),
        _ => {
            let (mut eofs, mut rows) = (0, 0);
            loop {
                let p = wire::mysql_read(s)?;
                match p.first() {
                    Some(0xFE) if p.len() < 9 => {
                        eofs += 1;
                        if eofs == 2 {
                            return Ok(Answer::Rows(rows));
                        }
                    }
                    Some(0xFF) => return Ok(err(&p)),
                    _ if eofs == 1 => rows += 1,
                    _ => {}
                }
            }
        }
    }
}

/// Sends `sql` and reads its answer.
fn run_query(s: &mut TcpStream, sql: &str) -> std::io::Result<Answer> {
    s.write_all(&query_packets(sql.as_bytes()))?;
    read_answer(s)
}

/// Samples the server's RSS every 100 ms on a thread: the peak, and
/// whether it passed the safety limit.
struct RssWatch {
    peak: Arc<AtomicU64>,
    over: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RssWatch {
    fn start(pid: Option<u32>, limit_mib: u64) -> RssWatch {
        let peak = Arc::new(AtomicU64::new(pid.map_or(0, crate::proc::rss_kib)));
        let over = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = pid.map(|pid| {
            let (peak, over, stop) = (peak.clone(), over.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    let rss = crate::proc::rss_kib(pid);
                    peak.fetch_max(rss, Relaxed);
                    if rss > limit_mib * 1024 {
                        over.store(true, Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        });
        RssWatch { peak, over, stop, thread }
    }

    fn peak_kib(&self) -> u64 {
        self.peak.load(Relaxed)
    }

    fn over(&self) -> bool {
        self.over.load(Relaxed)
    }

    /// Stops sampling; returns the peak in KiB.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak_kib()
    }
}

/// Round trips measured while an attack runs. Each begins with a timestamp
/// (µs since the epoch) and ends answered or failed; one still pending when
/// the scenario ends counts with the time it had waited so far, a lower
/// bound, so a stalled server cannot look fast by never answering.
struct Probe {
    hist: Histogram<u64>,
    ok: u64,
    failed: u64,
    pending: BTreeSet<u64>,
    first_error: Option<String>,
}

type SharedProbe = Arc<Mutex<Probe>>;

/// What a probe measured.
struct ProbeStats {
    ok: u64,
    failed: u64,
    unanswered: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Probe {
    fn shared() -> SharedProbe {
        Arc::new(Mutex::new(Probe { hist: new_hist(), ok: 0, failed: 0, pending: BTreeSet::new(), first_error: None }))
    }

    fn begin(p: &SharedProbe) -> u64 {
        let mut p = p.lock().expect("probe");
        let mut ts = wire::epoch_us();
        while p.pending.contains(&ts) {
            ts += 1;
        }
        p.pending.insert(ts);
        ts
    }

    fn answered(p: &SharedProbe, ts: u64) {
        let mut p = p.lock().expect("probe");
        if p.pending.remove(&ts) {
            let _ = p.hist.record(wire::epoch_us().saturating_sub(ts).max(1));
            p.ok += 1;
        }
    }

    fn failed(p: &SharedProbe, ts: u64, e: &str) {
        let mut p = p.lock().expect("probe");
        if p.pending.remove(&ts) {
            let _ = p.hist.record(wire::epoch_us().saturating_sub(ts).max(1));
            p.failed += 1;
            if p.first_error.is_none() {
                p.first_error = Some(clip(e, 160));
            }
        }
    }

    fn pending(p: &SharedProbe) -> usize {
        p.lock().expect("probe").pending.len()
    }

    /// Closes the books: pending round trips count with their wait so far.
    fn finish(p: &SharedProbe) -> ProbeStats {
        let mut p = p.lock().expect("probe");
        let now = wire::epoch_us();
        let pending = std::mem::take(&mut p.pending);
        for ts in &pending {
            let _ = p.hist.record(now.saturating_sub(*ts).max(1));
        }
        ProbeStats {
            ok: p.ok,
            failed: p.failed,
            unanswered: pending.len() as u64,
            p50_ms: q_ms(&p.hist, 0.5),
            p99_ms: q_ms(&p.hist, 0.99),
            max_ms: if p.hist.is_empty() { f64::INFINITY } else { p.hist.max() as f64 / 1000.0 },
        }
    }

    fn first_error(p: &SharedProbe) -> Option<String> {
        p.lock().expect("probe").first_error.clone()
    }
}

/// Adds a probe's figures to `f` under `name`.
fn probe_figures(f: &mut Figures, name: &str, s: &ProbeStats) {
    f.extra.insert(format!("{name}: answered"), s.ok as f64);
    f.extra.insert(format!("{name}: failed"), s.failed as f64);
    f.extra.insert(format!("{name}: unanswered at the end"), s.unanswered as f64);
    f.extra.insert(format!("{name}: p50 ms"), s.p50_ms);
    f.extra.insert(format!("{name}: p99 ms"), s.p99_ms);
    f.extra.insert(format!("{name}: max ms"), s.max_ms);
}

/// One attacking connection driven without blocking: it writes `burst`
/// (whole frames of `frame_len` bytes) over and over and, when `reads`,
/// reads and sorts what comes back.
struct Pumped {
    s: TcpStream,
    burst: Arc<[u8]>,
    frame_len: usize,
    at: usize,
    written: u64,
    /// Frames per second at most (0: unlimited).
    rate: f64,
    reads: bool,
    inbuf: Vec<u8>,
    answered: u64,
    refused: u64,
    /// Seconds after the attack started when the server closed it.
    closed_at: Option<f64>,
    close_code: Option<u16>,
    first_refusal: Option<String>,
}

impl Pumped {
    fn new(s: TcpStream, burst: Arc<[u8]>, frame_len: usize, reads: bool) -> std::io::Result<Pumped> {
        s.set_nonblocking(true)?;
        Ok(Pumped {
            s,
            burst,
            frame_len,
            at: 0,
            written: 0,
            rate: 0.0,
            reads,
            inbuf: Vec::new(),
            answered: 0,
            refused: 0,
            closed_at: None,
            close_code: None,
            first_refusal: None,
        })
    }

    /// Whole frames written.
    fn sent(&self) -> u64 {
        self.written / self.frame_len as u64
    }

    fn close(&mut self, t0: Instant) {
        if self.closed_at.is_none() {
            self.closed_at = Some(t0.elapsed().as_secs_f64());
        }
    }

    /// Bytes it may write now (its rate, counted from `t0`).
    fn budget(&self, t0: Instant) -> usize {
        if self.rate <= 0.0 {
            return usize::MAX;
        }
        let allowed = (t0.elapsed().as_secs_f64() * self.rate).floor() as u64 * self.frame_len as u64;
        allowed.saturating_sub(self.written) as usize
    }

    fn write_some(&mut self, t0: Instant) {
        for _ in 0..4 {
            let n = (self.burst.len() - self.at).min(self.budget(t0));
            if n == 0 {
                return;
            }
            match (&self.s).write(&self.burst[self.at..self.at + n]) {
                Ok(0) => return self.close(t0),
                Ok(n) => {
                    self.written += n as u64;
                    self.at = (self.at + n) % self.burst.len();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return self.close(t0),
            }
        }
    }

    fn read_some(&mut self, scratch: &mut [u8], t0: Instant) {
        for _ in 0..8 {
            match (&self.s).read(scratch) {
                Ok(0) => return self.close(t0),
                Ok(n) => {
                    self.inbuf.extend_from_slice(&scratch[..n]);
                    self.sort(t0);
                    if n < scratch.len() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return self.close(t0),
            }
        }
    }

    /// Counts the whole frames in `inbuf`: answers, `error` frames, a close.
    fn sort(&mut self, t0: Instant) {
        let mut pos = 0;
        while let Some((op, ps, end)) = wire::parse_frame(&self.inbuf[pos..]) {
            let p = &self.inbuf[pos + ps..pos + end];
            match op {
                1 | 2 if contains(p, b"\"event\":\"error\"") => {
                    self.refused += 1;
                    if self.first_refusal.is_none() {
                        self.first_refusal = Some(clip(&String::from_utf8_lossy(p), 200));
                    }
                }
                1 | 2 => self.answered += 1,
                8 => {
                    self.close_code = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                    self.close(t0);
                }
                _ => {}
            }
            pos += end;
        }
        self.inbuf.drain(..pos);
    }
}

/// Drives `conns` until `stop`, or until the server closed every one.
fn pump(conns: &mut [Pumped], t0: Instant, stop: &AtomicBool) {
    let mut scratch = vec![0u8; 64 * 1024];
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(conns.len());
    let mut live: Vec<usize> = Vec::with_capacity(conns.len());
    while !stop.load(Relaxed) {
        live.clear();
        fds.clear();
        for (i, c) in conns.iter().enumerate() {
            if c.closed_at.is_none() {
                live.push(i);
                // A client that never reads still sees the server's FIN.
                let out = if c.budget(t0) > 0 { libc::POLLOUT } else { 0 };
                let events = out | if c.reads { libc::POLLIN } else { libc::POLLRDHUP };
                fds.push(libc::pollfd { fd: c.s.as_raw_fd(), events, revents: 0 });
            }
        }
        if live.is_empty() {
            return;
        }
        // Paced attackers wait for their next frame's time, not a socket.
        if !poll_ready(&mut fds, 10) {
            continue;
        }
        for (k, &i) in live.iter().enumerate() {
            let re = fds[k].revents;
            if re == 0 {
                continue;
            }
            let c = &mut conns[i];
            if c.reads && re & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                c.read_some(&mut scratch, t0);
            }
            if c.closed_at.is_none() && re & libc::POLLOUT != 0 {
                c.write_some(t0);
            }
            if c.closed_at.is_none() && re & (libc::POLLHUP | libc::POLLERR | libc::POLLRDHUP) != 0 {
                c.close(t0);
            }
        }
    }
}

/// Splits `conns` over `threads` threads that pump them until `stop`.
fn start_pumps(
    mut conns: Vec<Pumped>,
    threads: usize,
    t0: Instant,
    stop: &Arc<AtomicBool>,
) -> Vec<JoinHandle<Vec<Pumped>>> {
    let per = conns.len().div_ceil(threads.max(1)).max(1);
    let mut out = Vec::new();
    while !conns.is_empty() {
        let rest = conns.split_off(per.min(conns.len()));
        let mut group = std::mem::replace(&mut conns, rest);
        let stop = stop.clone();
        out.push(std::thread::spawn(move || {
            pump(&mut group, t0, &stop);
            group
        }));
    }
    out
}

/// Reads and counts the frames arriving on `socks` until `stop`; returns
/// (text frames, sockets the server closed).
fn drain(socks: Vec<TcpStream>, stop: &AtomicBool) -> (u64, u64) {
    let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); socks.len()];
    let mut open = vec![true; socks.len()];
    for s in &socks {
        let _ = s.set_nonblocking(true);
    }
    let mut scratch = vec![0u8; 64 * 1024];
    let (mut frames, mut closed) = (0u64, 0u64);
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(socks.len());
    let mut idx: Vec<usize> = Vec::with_capacity(socks.len());
    while !stop.load(Relaxed) {
        fds.clear();
        idx.clear();
        for (i, s) in socks.iter().enumerate().filter(|(i, _)| open[*i]) {
            idx.push(i);
            fds.push(libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        if fds.is_empty() {
            break;
        }
        if !poll_ready(&mut fds, 100) {
            continue;
        }
        for (k, &i) in idx.iter().enumerate() {
            if fds[k].revents == 0 {
                continue;
            }
            for _ in 0..8 {
                match (&socks[i]).read(&mut scratch) {
                    Ok(0) => {
                        open[i] = false;
                        closed += 1;
                        break;
                    }
                    Ok(n) => {
                        let buf = &mut bufs[i];
                        buf.extend_from_slice(&scratch[..n]);
                        let mut pos = 0;
                        while let Some((op, _, end)) = wire::parse_frame(&buf[pos..]) {
                            frames += u64::from(op == 1);
                            pos += end;
                        }
                        buf.drain(..pos);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        open[i] = false;
                        closed += 1;
                        break;
                    }
                }
            }
        }
    }
    (frames, closed)
}

/// Sums what attacking connections saw: sent frames, answers, refusals,
/// closes by code, the first refusal's text, close times.
struct Tally {
    sent: u64,
    answered: u64,
    refused: u64,
    closes: BTreeMap<u16, u64>,
    close_times: Vec<f64>,
    first_refusal: Option<String>,
}

fn tally(conns: &[Pumped]) -> Tally {
    let mut t = Tally {
        sent: 0,
        answered: 0,
        refused: 0,
        closes: BTreeMap::new(),
        close_times: Vec::new(),
        first_refusal: None,
    };
    for c in conns {
        t.sent += c.sent();
        t.answered += c.answered;
        t.refused += c.refused;
        if let Some(at) = c.closed_at {
            *t.closes.entry(c.close_code.unwrap_or(0)).or_default() += 1;
            t.close_times.push(at);
        }
        if t.first_refusal.is_none() {
            t.first_refusal.clone_from(&c.first_refusal);
        }
    }
    t.close_times.sort_by(f64::total_cmp);
    t
}

/// Adds the server-side closes of `t` to `f` as "<who> closed by the
/// server (code N)" (code 0: no close frame was read).
fn close_figures(f: &mut Figures, who: &str, t: &Tally) {
    f.extra.insert(format!("{who} closed by the server"), t.close_times.len() as f64);
    for (code, n) in &t.closes {
        let how = if *code == 0 { "no close frame read".to_string() } else { format!("close code {code}") };
        f.extra.insert(format!("{who} closed by the server ({how})"), *n as f64);
    }
}

impl FloodKind {
    fn word(self) -> &'static str {
        match self {
            FloodKind::WebPipe => "web_pipe2",
            FloodKind::PipeCount => "pipe_count",
        }
    }

    fn command(self, channel: &str) -> String {
        match self {
            FloodKind::WebPipe => format!("web_pipe2\n{channel}\nflood\n*\nflood message"),
            FloodKind::PipeCount => format!("pipe_count\n{channel}\nm\n"),
        }
    }
}

/// Publishes a timestamped `web_pipe2` on `channel` at `rate` until `stop`.
fn publish_probes(mut tx: TcpStream, channel: &'static str, rate: f64, probe: SharedProbe, stop: Arc<AtomicBool>) {
    let t0 = Instant::now();
    let mut i = 0;
    while pace(t0, i, rate, &stop) {
        let ts = Probe::begin(&probe);
        if let Err(e) = wire::send_text(&mut tx, &format!("web_pipe2\n{channel}\nprobe\n*\n{ts}")) {
            Probe::failed(&probe, ts, &why(&e));
        }
        i += 1;
    }
}

/// Reads the bystander's channel until `stop`, ending each probe whose
/// timestamp arrives.
fn receive_probes(mut rx: TcpStream, probe: SharedProbe, stop: Arc<AtomicBool>) {
    let _ = rx.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = Vec::new();
    let mut tmp = vec![0u8; 64 * 1024];
    while !stop.load(Relaxed) {
        match rx.read(&mut tmp) {
            Ok(0) => return,
            Ok(n) => {
                buf.extend_from_slice(&tmp[..n]);
                let mut pos = 0;
                while let Some((op, ps, end)) = wire::parse_frame(&buf[pos..]) {
                    if op == 1
                        && let Some(ts) = wire::payload_ts(&buf[pos + ps..pos + end])
                    {
                        Probe::answered(&probe, ts);
                    }
                    pos += end;
                }
                buf.drain(..pos);
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Backend INSERTs (to a channel of their own) at `rate` until `stop`.
fn insert_probes(mut sql: TcpStream, rate: f64, probe: SharedProbe, stop: Arc<AtomicBool>) {
    // A slow answer is what is measured; the scenario's end closes the books.
    let _ = sql.set_read_timeout(Some(Duration::from_secs(600)));
    let t0 = Instant::now();
    let mut i = 0;
    while pace(t0, i, rate, &stop) {
        let ts = Probe::begin(&probe);
        match wire::mysql_exec(
            &mut sql,
            "INSERT INTO pipes_messages (name, event, message) VALUES ('bench_probe', 'probe', 'x')",
        ) {
            Ok(_) => Probe::answered(&probe, ts),
            // An ERR packet leaves the connection usable; I/O errors do not.
            Err(e) if e.kind() == std::io::ErrorKind::Other => Probe::failed(&probe, ts, &why(&e)),
            Err(e) => {
                Probe::failed(&probe, ts, &why(&e));
                return;
            }
        }
        i += 1;
    }
}

/// Opens a new anonymous WebSocket every `every` until `stop`.
fn connect_probes(front: SocketAddr, src: u8, every: Duration, probe: SharedProbe, stop: Arc<AtomicBool>) {
    let t0 = Instant::now();
    let mut i = 0;
    while pace(t0, i, 1.0 / every.as_secs_f64(), &stop) {
        let ts = Probe::begin(&probe);
        match open_anon(&front, src, &format!("np{i}"), Duration::from_secs(10)) {
            Ok(_) => Probe::answered(&probe, ts),
            Err(e) => Probe::failed(&probe, ts, &why(&e)),
        }
        i += 1;
    }
}

/// Sends warm-up messages from `tx` until `rx` sees one (the subscription
/// is not acknowledged), for at most 5 s.
fn warm_up(tx: &mut TcpStream, rx: &mut TcpStream, channel: &str) -> bool {
    let _ = rx.set_read_timeout(Some(Duration::from_millis(200)));
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if wire::send_text(tx, &format!("web_pipe2\n{channel}\nwarmup\n*\nwarmup")).is_err() {
            return false;
        }
        while let Ok((op, p)) = wire::read_frame(rx) {
            if op == 1 && contains(&p, format!("\"pipe\":\"{channel}\"").as_bytes()) {
                return true;
            }
        }
    }
    false
}

fn flood(g: &Global, t: &Target, a: &FloodArgs) -> Figures {
    let mut f = figures(&format!("attack flood ({})", a.kind.word()));
    let back = t.back.unwrap_or_else(|| die("comet target without a backend address"));
    let channel = "web_flood";
    let by_channel = "web_bystander";
    let mut subs = Vec::with_capacity(a.subs);
    for i in 0..a.subs {
        match t.subscribe(source(g, i), channel, &format!("fs{i}")) {
            Ok(s) => subs.push(s),
            Err(_) => f.failed_connections += 1,
        }
        crate::progress("flood: subscribers", i + 1, a.subs, f.failed_connections as usize);
    }
    let mut frame = Vec::new();
    wire::encode_masked(1, a.kind.command(channel).as_bytes(), &mut frame);
    let burst: Arc<[u8]> = frame.repeat((64 * 1024 / frame.len()).max(1)).into();
    let mut attackers = Vec::with_capacity(a.attackers);
    for i in 0..a.attackers {
        match open_anon(&t.front, source(g, a.subs + i), &format!("fa{i}"), SETUP_TIMEOUT)
            .and_then(|s| Pumped::new(s, burst.clone(), frame.len(), true))
            .map(|p| Pumped { rate: a.attacker_rate, ..p })
        {
            Ok(p) => attackers.push(p),
            Err(_) => f.failed_connections += 1,
        }
    }
    let n_attackers = attackers.len();
    let mut by_rx = t
        .subscribe(source(g, 0), by_channel, "by_rx")
        .unwrap_or_else(|e| die(&format!("flood: bystander subscriber: {e}")));
    let mut by_tx = open_anon(&t.front, source(g, 1), "by_tx", SETUP_TIMEOUT)
        .unwrap_or_else(|e| die(&format!("flood: bystander publisher: {e}")));
    if !warm_up(&mut by_tx, &mut by_rx, by_channel) {
        die("flood: the bystander's warm-up message never arrived (before any attack)");
    }
    let sql = login_within(&back, source(g, 2), &t.password, SETUP_TIMEOUT)
        .unwrap_or_else(|e| die(&format!("flood: CometQL login: {e}")));
    f.connections = (subs.len() + n_attackers + 2) as u64;

    let stop_attack = Arc::new(AtomicBool::new(false));
    let stop_probes = Arc::new(AtomicBool::new(false));
    let watch = RssWatch::start(t.pid, a.guard.rss_limit_mib);
    f.rss_kib_before = watch.peak_kib();
    let cpu0 = t.cpu();
    let t0 = Instant::now();
    let sub_reader = {
        let (stop, read) = (stop_probes.clone(), !a.subs_never_read);
        // Unread subscribers stay open (or are closed by the server) until
        // the scenario ends.
        std::thread::spawn(move || {
            if read {
                return drain(subs, &stop);
            }
            while !stop.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
            }
            drop(subs);
            (0, 0)
        })
    };
    let tx_reader = {
        let (stop, tx) = (stop_probes.clone(), by_tx.try_clone().expect("clone"));
        std::thread::spawn(move || drain(vec![tx], &stop))
    };
    let pumps = start_pumps(attackers, a.threads, t0, &stop_attack);
    let (bystander, inserts, connects) = (Probe::shared(), Probe::shared(), Probe::shared());
    // The probe threads are not joined: one may wait on a stalled server
    // for long; the books are closed below and the process ends anyway.
    {
        let (p, stop) = (bystander.clone(), stop_attack.clone());
        let rate = a.probe_rate;
        std::thread::spawn(move || publish_probes(by_tx, by_channel, rate, p, stop));
        let (p, stop) = (bystander.clone(), stop_probes.clone());
        std::thread::spawn(move || receive_probes(by_rx, p, stop));
        let (p, stop) = (inserts.clone(), stop_attack.clone());
        std::thread::spawn(move || insert_probes(sql, rate, p, stop));
        let (p, stop, front, src) = (connects.clone(), stop_attack.clone(), t.front, source(g, 3));
        std::thread::spawn(move || connect_probes(front, src, Duration::from_secs(1), p, stop));
    }
    let mut stopped_early = false;
    let mut last_report = 0;
    while t0.elapsed().as_secs_f64() < a.seconds {
        std::thread::sleep(Duration::from_millis(100));
        if watch.over() {
            stopped_early = true;
            break;
        }
        let s = t0.elapsed().as_secs();
        if s > last_report {
            last_report = s;
            eprint!(
                "\rflood: {s} s, server RSS {:.0} MiB, bystander {} pending, INSERT {} pending, connect {} pending   ",
                mib(watch.peak_kib()),
                Probe::pending(&bystander),
                Probe::pending(&inserts),
                Probe::pending(&connects),
            );
        }
    }
    eprintln!();
    let attack_secs = t0.elapsed().as_secs_f64();
    stop_attack.store(true, Relaxed);
    let groups: Vec<Vec<Pumped>> = pumps.into_iter().map(|h| h.join().expect("attacker thread")).collect();
    let cpu_attack = t.cpu().zip(cpu0).map(|(b, a)| b - a);
    // The server may still be working through the flood: give round trips
    // already started a few seconds (at most the attack's length) before
    // counting them unanswered.
    let grace = Instant::now() + Duration::from_secs_f64(a.seconds.min(5.0));
    while Instant::now() < grace && [&bystander, &inserts, &connects].iter().any(|p| Probe::pending(p) > 0) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (by, ins, con) = (Probe::finish(&bystander), Probe::finish(&inserts), Probe::finish(&connects));
    stop_probes.store(true, Relaxed);
    let (sub_frames, sub_closed) = sub_reader.join().expect("subscriber reader");
    let _ = tx_reader.join();
    f.rss_kib_after = t.rss_kib().unwrap_or(0);
    let peak = watch.finish().max(f.rss_kib_after);
    let all: Vec<Pumped> = groups.into_iter().flatten().collect();
    let tl = tally(&all);

    f.seconds = attack_secs;
    if let Some(c) = cpu_attack {
        f.server_cpu_s = c;
    }
    f.extra.insert("attack seconds".into(), attack_secs);
    f.extra.insert("stopped early at the RSS limit".into(), if stopped_early { 1.0 } else { 0.0 });
    f.extra.insert("attackers".into(), n_attackers as f64);
    f.extra.insert("attacker commands sent".into(), tl.sent as f64);
    f.extra.insert("attacker commands sent/s".into(), tl.sent as f64 / attack_secs);
    f.extra.insert("attacker commands answered".into(), tl.answered as f64);
    f.extra.insert("attacker commands refused (error frames)".into(), tl.refused as f64);
    close_figures(&mut f, "attackers", &tl);
    if !a.subs_never_read {
        f.extra.insert("flood deliveries read by subscribers".into(), sub_frames as f64);
        f.extra.insert("subscribers closed by the server".into(), sub_closed as f64);
    }
    if let Some(v) = metric(t, "comet_slow_consumer_closes_total") {
        f.extra.insert("server slow-consumer closes (4008)".into(), v);
    }
    f.extra.insert("server RSS peak MiB".into(), mib(peak));
    f.extra.insert("server RSS at the end MiB".into(), mib(f.rss_kib_after));
    probe_figures(&mut f, "bystander publish-to-receive", &by);
    probe_figures(&mut f, "backend INSERT", &ins);
    probe_figures(&mut f, "new WebSocket connection", &con);
    if let Some(r) = &tl.first_refusal {
        eprintln!("flood: first refusal an attacker read: {r}");
    }
    for (name, p) in [("bystander", &bystander), ("INSERT", &inserts), ("new connection", &connects)] {
        if let Some(e) = Probe::first_error(p) {
            eprintln!("flood: first {name} failure: {e}");
        }
    }
    if t.pid.is_some() {
        f.check_at_most("server RSS peak", mib(peak), 256.0, "MiB");
    }
    f.check_at_most("bystander publish-to-receive p99", by.p99_ms, 100.0, "ms");
    f.check_at_most("backend INSERT p99", ins.p99_ms, 100.0, "ms");
    f.check_at_most("new WebSocket connection, slowest", con.max_ms, 1000.0, "ms");
    f
}

fn like(t: &Target, a: &LikeArgs) -> Figures {
    let mut f = figures("attack like");
    let back = t.back.unwrap_or_else(|| die("comet target without a backend address"));
    let cpu0 = t.cpu();
    for &n in &a.percents {
        let sql = format!("SHOW VARIABLES LIKE '{}q'", "%".repeat(n));
        let mut s = login_within(&back, 1, &t.password, SETUP_TIMEOUT)
            .unwrap_or_else(|e| die(&format!("like: CometQL login: {e}")));
        let _ = s.set_read_timeout(Some(Duration::from_secs_f64(a.timeout)));
        let t0 = Instant::now();
        let r = run_query(&mut s, &sql);
        let secs = t0.elapsed().as_secs_f64();
        let label = format!("SHOW VARIABLES LIKE with {n} %");
        match r {
            Ok(ans) => {
                eprintln!(
                    "like: {n} %: answered in {secs:.3} s ({})",
                    match ans {
                        Answer::Ok => "OK".to_string(),
                        Answer::Rows(r) => format!("{r} rows"),
                        Answer::Err(c, m) => format!("error {c}: {}", clip(&m, 120)),
                    }
                );
                f.extra.insert(format!("{label}: seconds"), secs);
                f.check_at_most(&label, secs * 1000.0, 1000.0, "ms");
            }
            Err(e) => {
                eprintln!("like: {n} %: no answer within {secs:.1} s ({}); the shard is still busy", why(&e));
                f.extra.insert(format!("{label}: seconds (timed out)"), secs);
                f.check_at_most(&format!("{label} (timed out)"), secs * 1000.0, 1000.0, "ms");
                // Which of the server's other clients share the busy shard?
                let tries = 6;
                let sql_ok = (0..tries)
                    .filter(|_| {
                        login_within(&back, 1, &t.password, Duration::from_secs(2))
                            .and_then(|mut s| run_query(&mut s, "SELECT 1"))
                            .is_ok()
                    })
                    .count();
                let http_ok = (0..tries)
                    .filter(|_| http_get(&t.front, 1, "/info", Duration::from_secs(2)).is_ok_and(|(c, _)| c == 200))
                    .count();
                f.extra
                    .insert(format!("meanwhile: new backend logins + SELECT 1 answered (of {tries})"), sql_ok as f64);
                f.extra.insert(format!("meanwhile: GET /info answered (of {tries})"), http_ok as f64);
                break;
            }
        }
    }
    if let (Some(a1), Some(a0)) = (t.cpu(), cpu0) {
        f.server_cpu_s = a1 - a0;
    }
    f
}

fn nonreader(g: &Global, t: &Target, a: &NonreaderArgs) -> Figures {
    let mut f = figures(if a.echo { "attack nonreader (echo)" } else { "attack nonreader (ping)" });
    let (opcode, path, size) = if a.echo { (1, &a.echo_path, a.size) } else { (9, &a.path, a.ping_size.min(125)) };
    let mut frame = Vec::new();
    wire::encode_masked(opcode, &vec![b'p'; size], &mut frame);
    let burst: Arc<[u8]> = frame.repeat((256 * 1024 / frame.len()).max(1)).into();
    let mut clients = Vec::with_capacity(a.clients);
    for i in 0..a.clients {
        let opened = (|| {
            let mut s = wire::connect_within(&t.front, source(g, i), Some(SETUP_TIMEOUT))?;
            // A small receive window: the server's answers back up at once.
            let _ = socket2::SockRef::from(&s).set_recv_buffer_size(4096);
            s.set_write_timeout(Some(SETUP_TIMEOUT))?;
            wire::ws_handshake(&mut s, path)?;
            if !a.echo {
                wire::read_frame(&mut s)?;
            }
            Pumped::new(s, burst.clone(), frame.len(), false)
        })();
        keep_opened(&mut clients, &mut f, opened, "nonreader");
    }
    f.connections = clients.len() as u64;
    let watch = RssWatch::start(t.pid, a.guard.rss_limit_mib);
    f.rss_kib_before = watch.peak_kib();
    let cpu0 = t.cpu();
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let pumps = start_pumps(clients, a.threads, t0, &stop);
    let mut stopped_early = false;
    let mut last_report = 0;
    while t0.elapsed().as_secs_f64() < a.seconds && !pumps.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
        if watch.over() {
            stopped_early = true;
            break;
        }
        let s = t0.elapsed().as_secs();
        if s > last_report {
            last_report = s;
            eprint!("\rnonreader: {s} s, server RSS {:.0} MiB   ", mib(watch.peak_kib()));
        }
    }
    eprintln!();
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    let all: Vec<Pumped> = pumps.into_iter().flat_map(|h| h.join().expect("client thread")).collect();
    let cpu = t.cpu().zip(cpu0).map(|(b, a)| b - a);
    let peak = watch.finish();
    f.rss_kib_after = t.rss_kib().unwrap_or(0);
    let tl = tally(&all);
    let bytes: u64 = all.iter().map(|c| c.written).sum();
    let n = all.len().max(1) as f64;
    f.seconds = secs;
    if let Some(c) = cpu {
        f.server_cpu_s = c;
    }
    f.extra.insert("stopped early at the RSS limit".into(), if stopped_early { 1.0 } else { 0.0 });
    f.extra.insert("frames sent by the clients".into(), tl.sent as f64);
    f.extra.insert("MiB sent by the clients".into(), bytes as f64 / 1048576.0);
    f.extra.insert("clients closed by the server".into(), tl.close_times.len() as f64);
    if let (Some(first), Some(last)) = (tl.close_times.first(), tl.close_times.last()) {
        f.extra.insert("first close after s".into(), *first);
        f.extra.insert("median close after s".into(), tl.close_times[tl.close_times.len() / 2]);
        f.extra.insert("last close after s".into(), *last);
    }
    let growth = mib(peak.saturating_sub(f.rss_kib_before));
    f.extra.insert("server RSS peak MiB".into(), mib(peak));
    f.extra.insert("server RSS growth MiB".into(), growth);
    f.extra.insert("server RSS growth per client MiB".into(), growth / n);
    if let Some(v) = metric(t, "comet_slow_consumer_closes_total") {
        f.extra.insert("server slow-consumer closes (4008)".into(), v);
    }
    f.check_at_least("clients closed by the server", tl.close_times.len() as f64, all.len() as f64, "clients");
    if t.pid.is_some() {
        // The server's documented outbound bound is 1 MiB per connection;
        // the other MiB is room for a partial inbound message.
        f.check_at_most("server RSS growth per client", growth / n, 2.0, "MiB");
    }
    f
}

/// One slowloris client.
struct Slow {
    s: TcpStream,
    started: Instant,
    next: Instant,
    /// Bytes of the frame payload sent (the mask cycles over it).
    at: usize,
    closed_after: Option<f64>,
    close_code: Option<u16>,
    inbuf: Vec<u8>,
}

fn slowloris(g: &Global, t: &Target, a: &SlowlorisArgs) -> Figures {
    let head = a.mode == SlowMode::Head;
    let mut f = figures(if head { "attack slowloris (head)" } else { "attack slowloris (frame)" });
    let watch_for = a.seconds.unwrap_or(2.0 * a.message_timeout + 5.0);
    let interval = Duration::from_secs_f64(a.interval.max(0.01));
    let key = [0x11u8, 0x22, 0x33, 0x44];
    let masked = |from: usize, n: usize| -> Vec<u8> { (from..from + n).map(|i| b'a' ^ key[i % 4]).collect() };
    let watch = RssWatch::start(t.pid, a.guard.rss_limit_mib);
    f.rss_kib_before = watch.peak_kib();
    let mut clients = Vec::with_capacity(a.clients);
    for i in 0..a.clients {
        let opened = (|| {
            let mut s = if head {
                let mut s = wire::connect_within(&t.front, source(g, i), Some(SETUP_TIMEOUT))?;
                write!(s, "GET {BROWSER_PATH}slow{i} HTTP/1.1\r\nHost: bench\r\nX-Slow: ")?;
                s
            } else {
                open_anon(&t.front, source(g, i), &format!("slow{i}"), SETUP_TIMEOUT)?
            };
            let at = if head {
                0
            } else {
                let mut v = vec![0x81];
                wire::push_masked_len(a.frame_size, &mut v);
                v.extend_from_slice(&key);
                let first = a.frame_size.saturating_sub(a.remaining);
                v.extend_from_slice(&masked(0, first));
                s.write_all(&v)?;
                first
            };
            s.set_nonblocking(true)?;
            let now = Instant::now();
            Ok::<_, std::io::Error>(Slow {
                s,
                started: now,
                next: now + interval,
                at,
                closed_after: None,
                close_code: None,
                inbuf: Vec::new(),
            })
        })();
        keep_opened(&mut clients, &mut f, opened, "slowloris");
    }
    f.connections = clients.len() as u64;
    let t0 = Instant::now();
    let mut tmp = [0u8; 4096];
    let mut stopped_early = false;
    let mut last_report = 0;
    while t0.elapsed().as_secs_f64() < watch_for && clients.iter().any(|c| c.closed_after.is_none()) {
        if watch.over() {
            stopped_early = true;
            break;
        }
        let now = Instant::now();
        for c in clients.iter_mut().filter(|c| c.closed_after.is_none()) {
            // Anything but a heartbeat ping from the server means it gave up:
            // an HTTP answer, a close frame, or the end of the stream.
            let gone = match (&c.s).read(&mut tmp) {
                Ok(0) => true,
                Ok(n) if head => {
                    c.inbuf.extend_from_slice(&tmp[..n]);
                    true
                }
                Ok(n) => {
                    c.inbuf.extend_from_slice(&tmp[..n]);
                    let mut pos = 0;
                    let mut closed = false;
                    while let Some((op, ps, end)) = wire::parse_frame(&c.inbuf[pos..]) {
                        if op == 8 {
                            let p = &c.inbuf[pos + ps..pos + end];
                            c.close_code = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                            closed = true;
                        }
                        pos += end;
                    }
                    c.inbuf.drain(..pos);
                    closed
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
                Err(_) => true,
            };
            if !gone && now >= c.next {
                c.next += interval;
                let b = if head { vec![b'a'] } else { masked(c.at, 1) };
                c.at += 1;
                if !matches!((&c.s).write(&b), Ok(1)) {
                    c.closed_after = Some(c.started.elapsed().as_secs_f64());
                }
            }
            if gone {
                c.closed_after = Some(c.started.elapsed().as_secs_f64());
            }
        }
        let s = t0.elapsed().as_secs();
        if s > last_report {
            last_report = s;
            let closed = clients.iter().filter(|c| c.closed_after.is_some()).count();
            eprint!("\rslowloris: {s} s, {closed}/{} closed by the server   ", clients.len());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!();
    let peak = watch.finish();
    f.rss_kib_after = t.rss_kib().unwrap_or(0);
    f.seconds = t0.elapsed().as_secs_f64();
    let mut times: Vec<f64> = clients.iter().filter_map(|c| c.closed_after).collect();
    times.sort_by(f64::total_cmp);
    let mut codes: BTreeMap<u16, u64> = BTreeMap::new();
    for c in clients.iter().filter(|c| c.closed_after.is_some()) {
        *codes.entry(c.close_code.unwrap_or(0)).or_default() += 1;
    }
    if let Some(c) = clients.iter().find(|c| head && !c.inbuf.is_empty()) {
        eprintln!("slowloris: the server answered: {}", clip(&String::from_utf8_lossy(&c.inbuf), 120));
    }
    f.extra.insert("stopped early at the RSS limit".into(), if stopped_early { 1.0 } else { 0.0 });
    f.extra.insert("watched for s".into(), f.seconds);
    f.extra.insert("clients closed by the server".into(), times.len() as f64);
    f.extra.insert("clients never closed".into(), (clients.len() - times.len()) as f64);
    for (code, n) in &codes {
        let how = if *code == 0 { "no close frame".to_string() } else { format!("close code {code}") };
        f.extra.insert(format!("clients closed ({how})"), *n as f64);
    }
    if let (Some(first), Some(last)) = (times.first(), times.last()) {
        f.extra.insert("first close after s (from its start)".into(), *first);
        f.extra.insert("last close after s (from its start)".into(), *last);
    }
    f.extra.insert("server RSS peak MiB".into(), mib(peak));
    f.extra.insert("server RSS growth MiB".into(), mib(peak.saturating_sub(f.rss_kib_before)));
    f.check_at_least("clients closed by the server", times.len() as f64, clients.len() as f64, "clients");
    // Unclosed clients count as closed when we stopped watching: a lower bound.
    let slowest = if times.len() < clients.len() { f.seconds } else { times.last().copied().unwrap_or(0.0) };
    f.check_at_most("slowest close after the frame/head began", slowest, a.message_timeout + 2.0, "s");
    f
}

/// Child process of `exhaust`: opens connections until told how many,
/// or until the server stops taking them; reports one JSON line and holds
/// them until its stdin closes.
fn exhaust_hold(g: &Global, conns: usize, offset: usize, timeout: Duration, max_failures: usize) {
    let (mut held, mut r503, mut r429, mut other) = (Vec::with_capacity(conns), 0u64, 0u64, 0u64);
    let (mut failures, mut in_a_row, mut client_limit, mut server_stopped) = (0u64, 0usize, false, false);
    let mut first_error = String::new();
    let t0 = Instant::now();
    for i in offset..offset + conns {
        let r = wire::connect_within(&g.server, source(g, i), Some(timeout)).and_then(|mut s| {
            s.set_write_timeout(Some(timeout))?;
            wire::ws_upgrade(&mut s, &format!("{BROWSER_PATH}x{i}")).map(|(code, _)| (s, code))
        });
        match r {
            Ok((s, 101)) => {
                held.push(s);
                in_a_row = 0;
            }
            Ok((_, code)) => {
                match code {
                    503 => r503 += 1,
                    429 => r429 += 1,
                    _ => other += 1,
                }
                in_a_row = 0;
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                client_limit = true;
                first_error = format!("client: {e}");
                break;
            }
            Err(e) => {
                failures += 1;
                in_a_row += 1;
                if first_error.is_empty() {
                    first_error = format!("connection {}: {}", i - offset, why(&e));
                }
            }
        }
        if in_a_row >= max_failures {
            server_stopped = true;
            break;
        }
        if (i - offset + 1).is_multiple_of(2000) {
            eprint!("\rexhaust: a client process at {}: {} held   ", i - offset + 1, held.len());
        }
    }
    if conns >= 2000 {
        eprintln!();
    }
    let line = serde_json::json!({
        "held": held.len(), "refused_503": r503, "refused_429": r429, "refused_other": other,
        "failures": failures, "client_limit": client_limit, "server_stopped": server_stopped,
        "seconds": t0.elapsed().as_secs_f64(), "first_error": first_error,
    });
    println!("{line}");
    let _ = std::io::stdout().flush();
    let mut sink = String::new();
    let _ = std::io::stdin().read_line(&mut sink);
}

fn exhaust(g: &Global, t: &Target, a: &ExhaustArgs) -> Figures {
    let mut f = figures("attack exhaust");
    let back = t.back.unwrap_or_else(|| die("comet target without a backend address"));
    let procs = a.procs.unwrap_or_else(|| a.conns.div_ceil(18_000)).max(1);
    let per = a.conns.div_ceil(procs);
    let t0 = Instant::now();
    let mut children = Vec::new();
    let sum = |k: &str, label: &str, v: &serde_json::Value, f: &mut Figures| {
        *f.extra.entry(label.into()).or_default() += v[k].as_f64().unwrap_or(0.0);
    };
    let (mut client_limit, mut server_stopped) = (false, false);
    for p in 0..procs {
        let n = per.min(a.conns.saturating_sub(p * per));
        if n == 0 {
            break;
        }
        let (n_s, off_s, to_s, mf_s) =
            (n.to_string(), (p * per).to_string(), a.timeout_ms.to_string(), a.max_failures.to_string());
        let args = [
            "attack",
            "exhaust-hold",
            "--conns",
            &n_s,
            "--offset",
            &off_s,
            "--timeout-ms",
            &to_s,
            "--max-failures",
            &mf_s,
        ];
        let (child, _out, line) = crate::client_process(g, t, &args);
        children.push(child);
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap_or_default();
        eprintln!("exhaust: client process {p} of {n}: {}", line.trim());
        for (k, label) in [
            ("held", "connections held"),
            ("refused_503", "upgrades refused with HTTP 503"),
            ("refused_429", "upgrades refused with HTTP 429"),
            ("refused_other", "upgrades refused with another status"),
            ("failures", "connections failed (timeout, reset)"),
        ] {
            sum(k, label, &v, &mut f);
        }
        client_limit |= v["client_limit"].as_bool().unwrap_or(false);
        server_stopped |= v["server_stopped"].as_bool().unwrap_or(false);
        if server_stopped {
            break;
        }
    }
    let open_secs = t0.elapsed().as_secs_f64();
    f.connections = f.extra.get("connections held").copied().unwrap_or(0.0) as u64;
    f.extra.insert("seconds opening".into(), open_secs);
    f.extra.insert("a client process ran out of descriptors".into(), if client_limit { 1.0 } else { 0.0 });
    f.extra.insert("the server stopped taking connections".into(), if server_stopped { 1.0 } else { 0.0 });
    std::thread::sleep(Duration::from_secs(1));
    // Can the operator still get in? From an address no attacker used.
    let probe_src = 250;
    let l0 = Instant::now();
    let login = login_within(&back, probe_src, &t.password, PROBE_TIMEOUT);
    let login_ms = l0.elapsed().as_secs_f64() * 1000.0;
    let m0 = Instant::now();
    let metrics = http_get(&t.front, probe_src, "/metrics", PROBE_TIMEOUT);
    let metrics_ms = m0.elapsed().as_secs_f64() * 1000.0;
    let w0 = Instant::now();
    let ws = wire::connect_within(&t.front, probe_src, Some(PROBE_TIMEOUT))
        .and_then(|mut s| wire::ws_upgrade(&mut s, &format!("{BROWSER_PATH}probe")));
    let ws_ms = w0.elapsed().as_secs_f64() * 1000.0;
    match &login {
        Ok(_) => eprintln!("exhaust: backend login from 127.0.0.{probe_src}: OK in {login_ms:.1} ms"),
        Err(e) => {
            eprintln!("exhaust: backend login from 127.0.0.{probe_src}: failed after {login_ms:.0} ms: {}", why(e))
        }
    }
    match &metrics {
        Ok((code, _)) => eprintln!("exhaust: GET /metrics: HTTP {code} in {metrics_ms:.1} ms"),
        Err(e) => eprintln!("exhaust: GET /metrics: failed after {metrics_ms:.0} ms: {}", why(e)),
    }
    match &ws {
        Ok((code, _)) => eprintln!("exhaust: one more WebSocket upgrade: HTTP {code} in {ws_ms:.1} ms"),
        Err(e) => eprintln!("exhaust: one more WebSocket upgrade: failed after {ws_ms:.0} ms: {}", why(e)),
    }
    if let Ok((_, body)) = &metrics
        && let Some(v) =
            body.lines().find_map(|l| l.strip_prefix("comet_connections")).and_then(|v| v.trim().parse().ok())
    {
        f.extra.insert("server's comet_connections".into(), v);
    }
    f.rss_kib_after = t.rss_kib().unwrap_or(0);
    f.extra.insert("backend login ms".into(), login_ms);
    f.extra.insert("backend login worked".into(), if login.is_ok() { 1.0 } else { 0.0 });
    f.extra.insert("GET /metrics ms".into(), metrics_ms);
    f.extra.insert("one more upgrade: HTTP status (0: none)".into(), ws.as_ref().map_or(0.0, |(c, _)| f64::from(*c)));
    f.extra.insert("one more upgrade ms".into(), ws_ms);
    f.check_at_most(
        "backend login while the frontend is full",
        if login.is_ok() { login_ms } else { f64::INFINITY },
        1000.0,
        "ms",
    );
    f.check_at_least(
        "GET /metrics answered 200",
        if metrics.as_ref().is_ok_and(|(c, _)| *c == 200) { 1.0 } else { 0.0 },
        1.0,
        "",
    );
    for mut c in children {
        drop(c.stdin.take());
        let _ = c.wait();
    }
    f
}

fn bigquery(t: &Target, a: &BigqueryArgs) -> Figures {
    let mut f = figures("attack bigquery");
    let back = t.back.unwrap_or_else(|| die("comet target without a backend address"));
    let timeout = Duration::from_secs_f64(a.timeout);
    let mut cpus: Vec<(usize, f64)> = Vec::new();
    for &m in &a.mib {
        // A query the server answers cheaply once it has it all: the cost
        // measured is receiving it.
        let mut sql = b"SELECT 1".to_vec();
        sql.resize(m << 20, b' ');
        let bytes = query_packets(&sql);
        drop(sql);
        let mut s = login_within(&back, 1, &t.password, SETUP_TIMEOUT)
            .unwrap_or_else(|e| die(&format!("bigquery: login: {e}")));
        let _ = s.set_write_timeout(Some(timeout));
        let _ = s.set_read_timeout(Some(timeout));
        let cpu0 = t.cpu();
        let t0 = Instant::now();
        let mut wrote = Ok(());
        for c in bytes.chunks(a.chunk.max(1)) {
            wrote = s.write_all(c);
            if wrote.is_err() {
                break;
            }
        }
        let write_secs = t0.elapsed().as_secs_f64();
        let answer = wrote.and_then(|_| read_answer(&mut s));
        let secs = t0.elapsed().as_secs_f64();
        let cpu = t.cpu().zip(cpu0).map(|(b, a)| b - a);
        let what = match &answer {
            Ok(Answer::Rows(_) | Answer::Ok) => "answered".to_string(),
            Ok(Answer::Err(c, m)) => format!("error {c}: {}", clip(m, 120)),
            Err(e) => format!("no answer: {}", why(e)),
        };
        eprintln!(
            "bigquery: {m} MiB in {}-byte writes: {what}; written in {write_secs:.2} s, answered after {secs:.2} s, server CPU {} s",
            a.chunk,
            cpu.map_or("?".into(), |c| format!("{c:.2}"))
        );
        f.extra.insert(format!("{m} MiB: seconds until answered"), secs);
        f.extra.insert(
            format!("{m} MiB: answered without error"),
            if matches!(answer, Ok(Answer::Rows(_))) { 1.0 } else { 0.0 },
        );
        if let Some(c) = cpu {
            f.extra.insert(format!("{m} MiB: server CPU s"), c);
            cpus.push((m, c));
        }
    }
    if let (Some(&(m0, c0)), Some(&(m1, c1))) = (cpus.first(), cpus.last())
        && m1 > m0
    {
        // CPU seconds come in 10 ms ticks; a base under one tick counts as one.
        let ratio = c1 / c0.max(0.01);
        f.extra.insert(format!("CPU ratio {m1} MiB / {m0} MiB"), ratio);
        f.check_at_most(&format!("server CPU, {m1} MiB / {m0} MiB"), ratio, 1.5 * m1 as f64 / m0 as f64, "x");
    }
    f
}

fn errsize(t: &Target, a: &ErrsizeArgs) -> Figures {
    let mut f = figures("attack errsize");
    let back = t.back.unwrap_or_else(|| die("comet target without a backend address"));
    let name = format!("web_{}", "x".repeat(a.bytes));
    let timeout = Duration::from_secs(30);
    let sql = [
        ("CometQL INSERT", format!("INSERT INTO pipes_messages (name, event, message) VALUES ('{name}', 'e', 'm')")),
        ("CometQL SELECT", format!("SELECT * FROM pipes WHERE name = '{name}'")),
    ];
    for (label, q) in sql {
        let r = login_within(&back, 1, &t.password, SETUP_TIMEOUT).and_then(|mut s| {
            s.set_read_timeout(Some(timeout))?;
            run_query(&mut s, &q)
        });
        let key = format!("{label}: error bytes");
        match r {
            Ok(Answer::Err(code, msg)) => {
                eprintln!("errsize: {label}: error {code}, {} bytes: {}", msg.len(), clip(&msg, 100));
                f.extra.insert(key.clone(), msg.len() as f64);
                f.check_at_most(&key, msg.len() as f64, a.limit as f64, "bytes");
            }
            Ok(_) => {
                eprintln!("errsize: {label}: no error for a {}-byte name", name.len());
                f.extra.insert(format!("{label}: accepted"), 1.0);
            }
            Err(e) => {
                eprintln!("errsize: {label}: no answer: {}", why(&e));
                f.extra.insert(format!("{label}: no answer"), 1.0);
            }
        }
    }
    let commands = [
        ("browser subscription", format!("subscription\n{name}")),
        ("browser pipe_count", format!("pipe_count\n{name}\nm\n")),
        ("browser web_pipe2", format!("web_pipe2\n{name}\ne\n*\nm")),
    ];
    for (i, (label, cmd)) in commands.into_iter().enumerate() {
        let key = format!("{label}: error frame bytes");
        let r = open_anon(&t.front, 1, &format!("errsize{i}"), SETUP_TIMEOUT).and_then(|mut s| {
            s.set_read_timeout(Some(timeout))?;
            wire::send_text(&mut s, &cmd)?;
            loop {
                let (op, p) = wire::read_frame(&mut s)?;
                if op == 8 {
                    let code = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                    return Err(std::io::Error::other(format!("closed with {code:?}")));
                }
                if op == 1 && contains(&p, b"\"event\":\"error\"") {
                    return Ok(p);
                }
            }
        });
        match r {
            Ok(p) => {
                eprintln!("errsize: {label}: {} bytes: {}", p.len(), clip(&String::from_utf8_lossy(&p), 100));
                f.extra.insert(key.clone(), p.len() as f64);
                f.check_at_most(&key, p.len() as f64, a.limit as f64, "bytes");
            }
            Err(e) => {
                eprintln!("errsize: {label}: no error frame: {}", why(&e));
                f.extra.insert(format!("{label}: no error frame"), 1.0);
            }
        }
    }
    f
}

/// How one wrong-password login ended.
enum Guess {
    /// The server checked the password and said no.
    Denied,
    /// Refused before the password was looked at: an error instead of the
    /// greeting, a close, or an error that is not "Access denied".
    Refused(String),
    /// Timed out or failed on our side (counted apart).
    Failed(String),
}

fn guess(back: &SocketAddr, src: u8, timeout: Duration) -> Guess {
    let r = (|| {
        let mut s = wire::connect_within(back, src, Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        // Reset on close: 4,000 closes a second would otherwise fill the
        // port range with TIME_WAIT.
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        let greeting = match wire::mysql_read(&mut s) {
            Ok(g) => g,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(Guess::Refused("closed before the greeting".into()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Ok(Guess::Refused("reset before the greeting".into()));
            }
            Err(e) => return Err(e),
        };
        if greeting.first() == Some(&0xFF) {
            return Ok(Guess::Refused(format!("greeting: {}", String::from_utf8_lossy(&greeting))));
        }
        s.write_all(&wire::native_auth_response(&greeting, "wrong password")?)?;
        match wire::mysql_read(&mut s) {
            Ok(p) if contains(&p, b"Access denied for user") => Ok(Guess::Denied),
            Ok(p) => Ok(Guess::Refused(format!("after the password: {}", String::from_utf8_lossy(&p)))),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Ok(Guess::Refused("closed after the password".into()))
            }
            Err(e) => Err(e),
        }
    })();
    r.unwrap_or_else(|e| Guess::Failed(why(&e)))
}

fn logins(t: &Target, a: &LoginsArgs) -> Figures {
    let mut f = figures("attack logins");
    let back = t.back.unwrap_or_else(|| die("comet target without a backend address"));
    let timeout = Duration::from_millis(a.timeout_ms);
    let (mut denied, mut refused, mut failed) = (0u64, 0u64, 0u64);
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let t0 = Instant::now();
    let mut last_report = 0;
    while t0.elapsed().as_secs_f64() < a.seconds {
        match guess(&back, a.source, timeout) {
            Guess::Denied => denied += 1,
            Guess::Refused(why) => {
                refused += 1;
                *seen.entry(clip(&why, 100)).or_default() += 1;
            }
            Guess::Failed(why) => {
                failed += 1;
                *seen.entry(format!("client side: {}", clip(&why, 100))).or_default() += 1;
            }
        }
        let s = t0.elapsed().as_secs();
        if s > last_report {
            last_report = s;
            eprint!("\rlogins: {s} s, {denied} denied after the password check, {refused} refused before it   ");
        }
    }
    eprintln!();
    let secs = t0.elapsed().as_secs_f64();
    for (why, n) in seen.iter().take(5) {
        eprintln!("logins: {n} x {why}");
    }
    let attempts = denied + refused + failed;
    let timed = |src: u8| {
        let t1 = Instant::now();
        let r = login_within(&back, src, &t.password, timeout);
        (r.is_ok(), t1.elapsed().as_secs_f64() * 1000.0, r.err())
    };
    let (same_ok, same_ms, same_err) = timed(a.source);
    let other = if a.source == 2 { 3 } else { 2 };
    let (other_ok, other_ms, other_err) = timed(other);
    eprintln!(
        "logins: right password from 127.0.0.{} right after: {} in {same_ms:.1} ms{}",
        a.source,
        if same_ok { "OK" } else { "refused" },
        same_err.map_or(String::new(), |e| format!(" ({})", clip(&e.to_string(), 100)))
    );
    eprintln!(
        "logins: right password from 127.0.0.{other}: {} in {other_ms:.1} ms{}",
        if other_ok { "OK" } else { "refused" },
        other_err.map_or(String::new(), |e| format!(" ({})", clip(&e.to_string(), 100)))
    );
    f.seconds = secs;
    f.connections = attempts;
    f.extra.insert("attempts".into(), attempts as f64);
    f.extra.insert("attempts/s".into(), attempts as f64 / secs);
    f.extra.insert("denied after the password check".into(), denied as f64);
    f.extra.insert("refused before the password check".into(), refused as f64);
    f.extra.insert("failed on the client side".into(), failed as f64);
    f.extra.insert("right password, same address, right after: worked".into(), if same_ok { 1.0 } else { 0.0 });
    f.extra.insert("right password, other address: worked".into(), if other_ok { 1.0 } else { 0.0 });
    f.extra.insert("right password, other address: ms".into(), other_ms);
    // The rule: more than 20 failures in 10 s refuse the address
    // for 10 s, so at most 21 checks per started 10-second window.
    let windows = (secs / 10.0).floor() + 1.0;
    f.check_at_most("password checks from one address", denied as f64, 21.0 * windows, "checks");
    f.check_at_least("refused before the password check", refused as f64, 1.0, "attempts");
    f.check_at_least("right password from another address works", if other_ok { 1.0 } else { 0.0 }, 1.0, "");
    f
}

/// Keeps a client that opened, or counts the failure (and reports the first).
fn keep_opened<T>(clients: &mut Vec<T>, f: &mut Figures, opened: std::io::Result<T>, scenario: &str) {
    match opened {
        Ok(c) => clients.push(c),
        Err(e) => {
            f.failed_connections += 1;
            if f.failed_connections == 1 {
                eprintln!("{scenario}: cannot open a client: {e}");
            }
        }
    }
}

/// Waits up to `ms` for any of `fds` to be ready; false on timeout or error.
fn poll_ready(fds: &mut [libc::pollfd], ms: i32) -> bool {
    // SAFETY: `fds` is a live slice of `fds.len()` initialized pollfd structs,
    // which poll(2) reads and whose `revents` it writes, and nothing else.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) > 0 }
}
