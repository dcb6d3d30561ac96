//! What a scenario measured, and how it is shown: a table on stdout, JSON
//! with every figure (`--json`), and an SVG chart of the latency
//! distribution (`--svg`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::target::Sub;
use crate::wire;

/// Every figure of one run against one target.
#[derive(Debug, Default, Serialize)]
pub struct Figures {
    pub scenario: String,
    pub target: String,
    /// Where server and clients ran: `shared` or `pinned` (`--layout`).
    pub layout: String,
    pub connections: u64,
    pub failed_connections: u64,
    pub messages: u64,
    pub expected: u64,
    pub delivered: u64,
    pub loss: u64,
    pub seconds: f64,
    pub deliveries_per_sec: f64,
    pub server_cpu_s: f64,
    pub cpu_s_per_million: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub rss_kib_before: u64,
    pub rss_kib_after: u64,
    pub rss_bytes_per_conn: f64,
    pub kernel_tcp_bytes_per_conn: f64,
    pub kernel_slab_bytes_per_conn: f64,
    pub handshakes_per_sec: f64,
    /// Scenario-specific figures.
    pub extra: BTreeMap<String, f64>,
    /// (percentile, ms) points of the latency distribution.
    pub latency_curve: Vec<(f64, f64)>,
    /// Targets a hostile-traffic scenario holds the server to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<Check>,
}

/// One target of a hostile-traffic scenario: `value` must stay at or
/// below `limit` (or, with `at_least`, reach it).
#[derive(Debug, Serialize)]
pub struct Check {
    pub what: String,
    pub value: f64,
    pub limit: f64,
    pub unit: String,
    pub at_least: bool,
    pub pass: bool,
}

impl Figures {
    /// Records a target that `value` must not exceed.
    pub fn check_at_most(&mut self, what: &str, value: f64, limit: f64, unit: &str) {
        let pass = value <= limit;
        self.checks.push(Check { what: what.into(), value, limit, unit: unit.into(), at_least: false, pass });
    }

    /// Records a target that `value` must reach.
    pub fn check_at_least(&mut self, what: &str, value: f64, limit: f64, unit: &str) {
        let pass = value >= limit;
        self.checks.push(Check { what: what.into(), value, limit, unit: unit.into(), at_least: true, pass });
    }
}

impl Figures {
    /// Fills the latency figures from a histogram of microseconds.
    pub fn set_latency(&mut self, h: &Histogram<u64>) {
        if h.is_empty() {
            return;
        }
        let ms = |v: u64| v as f64 / 1000.0;
        self.p50_ms = ms(h.value_at_quantile(0.5));
        self.p99_ms = ms(h.value_at_quantile(0.99));
        self.p999_ms = ms(h.value_at_quantile(0.999));
        self.max_ms = ms(h.max());
        self.latency_curve = [0.0, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999]
            .iter()
            .map(|&q| (q * 100.0, ms(h.value_at_quantile(q))))
            .collect();
    }

    pub fn set_throughput(&mut self, cpu: Option<f64>) {
        self.loss = self.expected.saturating_sub(self.delivered);
        if self.seconds > 0.0 {
            self.deliveries_per_sec = self.delivered as f64 / self.seconds;
        }
        if let Some(c) = cpu {
            self.server_cpu_s = c;
            if self.delivered > 0 {
                self.cpu_s_per_million = c / (self.delivered as f64 / 1e6);
            }
        }
    }
}

/// Prints the figures that the scenario produced (non-zero ones).
pub fn print_table(all: &[&Figures]) {
    type Row = (&'static str, fn(&Figures) -> f64, &'static str);
    let rows: [Row; 14] = [
        ("connections", |f| f.connections as f64, ""),
        ("failed connections", |f| f.failed_connections as f64, ""),
        ("messages published", |f| f.messages as f64, ""),
        ("deliveries expected", |f| f.expected as f64, ""),
        ("deliveries received", |f| f.delivered as f64, ""),
        ("loss", |f| f.loss as f64, ""),
        ("deliveries/s", |f| f.deliveries_per_sec, ""),
        ("server CPU s / million deliveries", |f| f.cpu_s_per_million, ""),
        ("latency p50 ms", |f| f.p50_ms, ""),
        ("latency p99 ms", |f| f.p99_ms, ""),
        ("latency p99.9 ms", |f| f.p999_ms, ""),
        ("latency max ms", |f| f.max_ms, ""),
        ("server RSS bytes / connection", |f| f.rss_bytes_per_conn, ""),
        ("handshakes/s", |f| f.handshakes_per_sec, ""),
    ];
    let keys: std::collections::BTreeSet<&String> = all.iter().flat_map(|f| f.extra.keys()).collect();
    let w = keys.iter().map(|k| k.chars().count() + 1).max().unwrap_or(0).max(36);
    let mut out = String::new();
    let _ = write!(out, "{:<w$}", format!("{} ", all.first().map_or("", |f| f.scenario.as_str())));
    for f in all {
        let _ = write!(out, "{:>16}", f.target);
    }
    out.push('\n');
    for (name, get, _) in rows {
        // Loss is shown even when zero, except for attacks, which count none.
        let loss_counts = all.iter().any(|f| !f.scenario.starts_with("attack"));
        if all.iter().all(|f| get(f) == 0.0) && (name != "loss" || !loss_counts) {
            continue;
        }
        let _ = write!(out, "{name:<w$}");
        for f in all {
            let v = get(f);
            let _ = if v.fract() == 0.0 { write!(out, "{:>16}", v as u64) } else { write!(out, "{v:>16.3}") };
        }
        out.push('\n');
    }
    for k in keys {
        let _ = write!(out, "{k:<w$}");
        for f in all {
            let _ = write!(out, "{:>16.3}", f.extra.get(k).copied().unwrap_or(0.0));
        }
        out.push('\n');
    }
    for f in all.iter().filter(|f| !f.checks.is_empty()) {
        let _ = writeln!(out, "targets ({}):", f.target);
        for c in &f.checks {
            let op = if c.at_least { ">=" } else { "<=" };
            let verdict = if c.pass { "PASS" } else { "FAIL" };
            let _ = writeln!(
                out,
                "  {verdict}  {:<48} {:>12} {op} {} {}",
                c.what,
                format_value(c.value),
                format_value(c.limit),
                c.unit
            );
        }
    }
    print!("{out}");
}

/// A figure without needless decimals.
fn format_value(v: f64) -> String {
    if v.is_infinite() {
        "inf".into()
    } else if v.fract() == 0.0 {
        format!("{}", v as i64)
    } else {
        format!("{v:.3}")
    }
}

/// comet / peer ratios: below 1 is better for comet on CPU, latency and
/// memory; above 1 is better on throughput.
pub fn print_ratios(all: &[&Figures]) {
    let Some(comet) = all.iter().find(|f| f.target == "comet") else { return };
    for peer in all.iter().filter(|f| f.target != "comet") {
        let r = |a: f64, b: f64| if b > 0.0 { format!("{:.2}", a / b) } else { "n/a".into() };
        println!(
            "comet / {}: CPU per delivery {}, p99 latency {}, RSS per connection {}, throughput {}",
            peer.target,
            r(comet.cpu_s_per_million, peer.cpu_s_per_million),
            r(comet.p99_ms, peer.p99_ms),
            r(comet.rss_bytes_per_conn, peer.rss_bytes_per_conn),
            r(
                comet.deliveries_per_sec.max(comet.handshakes_per_sec),
                peer.deliveries_per_sec.max(peer.handshakes_per_sec)
            ),
        );
        // Handshakes: comet's handshakes per server CPU-second over the
        // peer's (above 1 is better for comet), the figure issue 14 sets.
        let hs = "server CPU µs per handshake";
        if let (Some(c), Some(p)) = (comet.extra.get(hs), peer.extra.get(hs)) {
            println!("comet / {}: handshakes per server CPU-second {} ({c:.1} / {p:.1} µs)", peer.target, r(*p, *c));
        }
    }
}

/// An SVG chart of latency by percentile, one line per target.
pub fn svg(all: &[Figures]) -> String {
    let (w, h, left, bottom, top, right) = (760.0, 420.0, 70.0, 50.0, 40.0, 150.0);
    // x: "nines" scale, -log10(1 - p); p = 99.99% is 4.
    let x_of = |pct: f64| -(1.0 - (pct / 100.0).min(0.9999)).log10();
    let max_ms = all.iter().flat_map(|f| f.latency_curve.iter().map(|p| p.1)).fold(1.0_f64, f64::max) * 1.1;
    let px = |pct: f64| left + x_of(pct) / 4.0 * (w - left - right);
    let py = |ms: f64| h - bottom - ms / max_ms * (h - top - bottom);
    let colors = ["#0ea5e9", "#f97316", "#22c55e", "#a855f7"];
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"#
    );
    let title = all.first().map_or(String::new(), |f| format!("{}: latency by percentile (ms)", f.scenario));
    let _ = write!(s, r#"<text x="{left}" y="22" font-size="15">{title}</text>"#);
    for (pct, label) in [(0.0, "0%"), (90.0, "90%"), (99.0, "99%"), (99.9, "99.9%"), (99.99, "99.99%")] {
        let x = px(pct);
        let _ = write!(
            s,
            r##"<line x1="{x}" y1="{top}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{label}</text>"##,
            h - bottom,
            h - bottom + 18.0
        );
    }
    for i in 0..=4 {
        let ms = max_ms * i as f64 / 4.0;
        let y = py(ms);
        let _ = write!(
            s,
            r##"<line x1="{left}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{ms:.1}</text>"##,
            w - right,
            left - 6.0,
            y + 4.0
        );
    }
    for (i, f) in all.iter().enumerate() {
        let c = colors[i % colors.len()];
        let pts: Vec<String> = f.latency_curve.iter().map(|&(p, ms)| format!("{:.1},{:.1}", px(p), py(ms))).collect();
        let _ = write!(s, r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#, pts.join(" "));
        let _ = write!(
            s,
            r#"<rect x="{}" y="{}" width="12" height="12" fill="{c}"/><text x="{}" y="{}">{}</text>"#,
            w - right + 16.0,
            top + 20.0 * i as f64,
            w - right + 34.0,
            top + 20.0 * i as f64 + 11.0,
            f.target
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Reads every socket until `want` timestamped messages arrived or 20 s
/// pass without progress; returns the count and a latency histogram (µs).
/// Per published message (keyed by its timestamp): the latency of its first
/// and of its last delivery seen by this process's readers, in µs. Tells
/// the time to the first subscriber from the time the fan-out takes.
pub static PER_MESSAGE: std::sync::Mutex<BTreeMap<u64, (u64, u64)>> = std::sync::Mutex::new(BTreeMap::new());

/// Median, over messages, of the first and the last delivery's latency, and
/// the worst last delivery, in ms (from [`PER_MESSAGE`]).
pub fn per_message_figures(f: &mut Figures) {
    let per = PER_MESSAGE.lock().expect("per-message lock");
    if per.is_empty() {
        return;
    }
    let median = |mut v: Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2] as f64 / 1000.0
    };
    f.extra.insert("first delivery ms (median message)".into(), median(per.values().map(|p| p.0).collect()));
    f.extra.insert("last delivery ms (median message)".into(), median(per.values().map(|p| p.1).collect()));
    f.extra.insert(
        "last delivery ms (worst message)".into(),
        per.values().map(|p| p.1).max().unwrap_or(0) as f64 / 1000.0,
    );
    if std::env::var_os("COMET_BENCH_PER_MESSAGE").is_some() {
        let t0 = per.keys().next().copied().unwrap_or(0);
        for (ts, (first, last)) in per.iter() {
            eprintln!(
                "message at +{:.1} ms: first {:.1} ms, last {:.1} ms",
                (ts - t0) as f64 / 1e3,
                *first as f64 / 1e3,
                *last as f64 / 1e3
            );
        }
    }
}

/// Answers a ping, best effort (a pong is a few bytes; a full socket
/// buffer drops it and the next ping is answered).
fn pong(sock: &mut TcpStream, tls: Option<&mut rustls::ClientConnection>, payload: &[u8]) {
    let mut frame = Vec::with_capacity(payload.len() + 6);
    wire::encode_masked(0xA, payload, &mut frame);
    match tls {
        None => {
            let _ = sock.write(&frame);
        }
        Some(c) => {
            let _ = c.writer().write_all(&frame);
            while c.wants_write() {
                if c.write_tls(sock).is_err() {
                    break;
                }
            }
        }
    }
}

/// Plaintext from a wss subscriber into `out`: what the client's TLS
/// state holds, else what decrypting the socket's bytes gives. None: the
/// socket has nothing more now (or failed).
fn tls_read(c: &mut rustls::ClientConnection, sock: &mut TcpStream, out: &mut [u8]) -> Option<usize> {
    loop {
        match c.reader().read(out) {
            Ok(n) if n > 0 => return Some(n),
            Ok(_) => return Some(0),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return None,
        }
        match c.read_tls(sock) {
            Ok(0) => return Some(0),
            Ok(_) => {
                c.process_new_packets().ok()?;
            }
            Err(_) => return None,
        }
    }
}

/// Reads every subscriber until `want` timestamped messages arrived (or
/// 20 s pass without one), answering pings: the count and the latency
/// histogram.
pub fn read_all<S: Into<Sub>>(socks: Vec<S>, want: u64) -> (u64, Histogram<u64>) {
    let mut socks: Vec<Sub> = socks.into_iter().map(Into::into).collect();
    let mut per_message: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds");
    let poller = polling::Poller::new().expect("poller");
    let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); socks.len()];
    for (i, s) in socks.iter().enumerate() {
        s.sock.set_nonblocking(true).expect("nonblocking");
        // SAFETY: each socket outlives its registration: every source is
        // deleted from the poller below, before `socks` is dropped.
        unsafe { poller.add(&s.sock, polling::Event::readable(i)) }.expect("register");
    }
    let mut got = 0u64;
    let mut events = polling::Events::new();
    let mut scratch = vec![0u8; 64 * 1024];
    let (mut inflater, mut inflated) = (comet::ws::deflate::Inflater::default(), Vec::new());
    let mut last_progress = Instant::now();
    let mut counted = false;
    // wss: plaintext the handshake already decrypted is read first.
    let mut ready: Vec<usize> = (0..socks.len()).filter(|&i| socks[i].tls.is_some()).collect();
    while got < want && last_progress.elapsed() < Duration::from_secs(20) {
        events.clear();
        poller.wait(&mut events, Some(Duration::from_millis(if ready.is_empty() { 200 } else { 0 }))).expect("wait");
        ready.extend(events.iter().map(|ev| ev.key));
        for i in std::mem::take(&mut ready) {
            let Sub { sock, tls } = &mut socks[i];
            loop {
                let n = match tls {
                    None => match sock.read(&mut scratch) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(_) => break,
                    },
                    Some(c) => match tls_read(c, sock, &mut scratch) {
                        Some(0) | None => break,
                        Some(n) => n,
                    },
                };
                // One clock reading per read: the frames it returned
                // arrived together (reading the clock per frame made a
                // reader slower on many small frames per write than on one,
                // which `--write-delay` runs measured as latency).
                let now = wire::epoch_us();
                let buf = &mut bufs[i];
                buf.extend_from_slice(&scratch[..n]);
                let mut pos = 0;
                while let Some((op, ps, end)) = wire::parse_frame(&buf[pos..]) {
                    let p = wire::frame_payload(buf[pos], &buf[pos + ps..pos + end], &mut inflater, &mut inflated);
                    if op == 9 {
                        // A ping is answered, as a browser does: comet closes
                        // a subscriber that stays silent past its ping
                        // timeout (a long wss set-up reaches it).
                        pong(sock, tls.as_deref_mut(), p);
                    }
                    if op == 1
                        && let Some(ts) = wire::payload_ts(p)
                    {
                        got += 1;
                        counted = true;
                        let lat = now.saturating_sub(ts).max(1);
                        let _ = hist.record(lat);
                        let e = per_message.entry(ts).or_insert((lat, lat));
                        e.0 = e.0.min(lat);
                        e.1 = e.1.max(lat);
                    }
                    pos += end;
                }
                buf.drain(..pos);
            }
            if std::mem::take(&mut counted) {
                // Only a counted message is progress: pings keep coming
                // while anything is lost.
                last_progress = Instant::now();
            }
            let _ = poller.modify(&*sock, polling::Event::readable(i));
        }
    }
    for s in &socks {
        let _ = poller.delete(&s.sock);
    }
    let mut all = PER_MESSAGE.lock().expect("per-message lock");
    for (ts, (first, last)) in per_message {
        let e = all.entry(ts).or_insert((first, last));
        e.0 = e.0.min(first);
        e.1 = e.1.max(last);
    }
    (got, hist)
}
