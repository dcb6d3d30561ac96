//! `storm`: a reconnect storm. Client processes hold N subscribed
//! WebSockets (every K-th an authorized user), the server is restarted on
//! the same ports, and every client reconnects at once, retrying with
//! jittered backoff (and the server's `Retry-After` on a 503 or 429) like
//! comet.js, naming their channel in the upgrade URL as comet.js does.
//! Reports how long until all are subscribed again, the failed connects,
//! and the new server's CPU and peak RSS.

use std::io::{BufRead, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::{Global, StormArgs, client_process, die, set_user_keys, source, spawn_opts};
use crate::report::Figures;
use crate::target::{Kind, Target};
use crate::wire;

/// One client's identity: (authorized user id or 0, channel).
fn who(i: usize, auth_every: usize, channels: usize) -> (usize, String) {
    let uid = if auth_every > 0 && i.is_multiple_of(auth_every) { i / auth_every + 1 } else { 0 };
    (uid, format!("bench_storm_{}", i % channels.max(1)))
}

fn users(a: &StormArgs) -> usize {
    if a.auth_every == 0 { 0 } else { a.clients.div_ceil(a.auth_every) }
}

/// One attempt to open client `i` and subscribe it.
fn open(g: &Global, t: &Target, i: usize, auth_every: usize, channels: usize) -> Result<TcpStream, String> {
    let (uid, channel) = who(i, auth_every, channels);
    // A full accept queue drops SYNs, which the kernel retries for minutes:
    // give up on a connect or an answer after 5 s, like a browser would.
    let mut s =
        wire::connect_within(&t.front, source(g, i), Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    // The channel goes in the URL, as comet.js sends it when it reconnects
    // with channels already wanted: no `subscription` message after
    // serverInfo.
    let path = if uid > 0 {
        format!("/ws/sesion=k{uid}&myid={uid}&devid=0&v=4.08&uuid=b{uid}&api=js&subscription={channel}")
    } else {
        format!("/ws/sesion=&myid=&devid=0&v=4.08&uuid=s{i}&api=js&subscription={channel}")
    };
    match wire::ws_upgrade(&mut s, &path) {
        Ok((101, _)) => {}
        Ok((_, head)) => return Err(head),
        Err(e) => return Err(e.to_string()),
    }
    let (_, info) = wire::read_frame(&mut s).map_err(|e| e.to_string())?;
    if uid > 0 && !info.starts_with(b"{\"authorized\":true") {
        // The backend has not given the keys again yet.
        return Err("not authorized yet".into());
    }
    s.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(s)
}

/// Seconds of `Retry-After` in a refused upgrade's head, if any.
fn retry_after(head: &str) -> Option<u64> {
    head.lines().find_map(|l| l.strip_prefix("Retry-After:")).and_then(|v| v.trim().parse().ok())
}

/// A small xorshift for jitter (no crate needed for this).
struct Jitter(u64);

impl Jitter {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Opens clients `range` with retries; returns (sockets, failed attempts,
/// clients given up).
fn open_all(g: &Global, t: &Target, range: std::ops::Range<usize>, a: &StormArgs) -> (Vec<TcpStream>, u64, u64) {
    let (mut socks, mut failed, mut gave_up) = (Vec::new(), 0, 0);
    let mut rng = Jitter(0x9E37_79B9_7F4A_7C15 ^ (range.start as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    for i in range {
        let mut attempt = 0u32;
        loop {
            match open(g, t, i, a.auth_every, a.channels) {
                Ok(s) => {
                    socks.push(s);
                    break;
                }
                Err(e) => {
                    failed += 1;
                    attempt += 1;
                    if attempt >= a.retries {
                        gave_up += 1;
                        break;
                    }
                    // comet.js: Retry-After to twice it; else full jitter
                    // over 0.5 s doubling to 30 s.
                    let wait = match retry_after(&e) {
                        Some(s) => s as f64 * (1.0 + rng.unit()),
                        None => rng.unit() * (0.5 * 2f64.powi(attempt as i32 - 1)).min(30.0),
                    };
                    std::thread::sleep(Duration::from_secs_f64(wait));
                }
            }
        }
    }
    (socks, failed, gave_up)
}

/// Opens `range` on `threads` threads.
fn open_threads(g: &Global, t: &Target, range: std::ops::Range<usize>, a: &StormArgs) -> (Vec<TcpStream>, u64, u64) {
    let threads = a.threads.max(1);
    let per = range.len().div_ceil(threads).max(1);
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|k| {
                let r = (range.start + k * per).min(range.end)..(range.start + (k + 1) * per).min(range.end);
                sc.spawn(move || open_all(g, t, r, a))
            })
            .collect();
        let mut out = (Vec::new(), 0, 0);
        for h in hs {
            let (s, f, gu) = h.join().expect("storm thread");
            out.0.extend(s);
            out.1 += f;
            out.2 += gu;
        }
        out
    })
}

/// Child process: opens its clients, says `ready OK FAILED`, waits for
/// `go` (the server was stopped), reconnects them all and says
/// `{"secs":..,"ok":..,"failed":..,"gave_up":..}`, then holds them until
/// its stdin closes.
pub fn client(g: &Global, a: &StormArgs, offset: usize) {
    let t = Target::attach(Kind::Comet, g.server, None, &g.password, None);
    let (socks, failed, gave_up) = open_threads(g, &t, offset..offset + a.clients, a);
    println!("ready {} {}", socks.len(), failed + gave_up);
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(socks);
    let t0 = Instant::now();
    let (socks, failed, gave_up) = open_threads(g, &t, offset..offset + a.clients, a);
    let secs = t0.elapsed().as_secs_f64();
    println!("{}", serde_json::json!({ "secs": secs, "ok": socks.len(), "failed": failed, "gave_up": gave_up }));
    let _ = std::io::stdout().flush();
    let _ = std::io::stdin().read_line(&mut line);
}

/// Subscribers of every storm channel, as the server counts them.
fn subscribed(t: &Target, channels: usize) -> u64 {
    let Ok(mut p) = t.publisher() else { return 0 };
    (0..channels.max(1)).map(|c| p.publish(&format!("bench_storm_{c}"), "count").unwrap_or(0)).sum()
}

pub fn storm(g: &Global, a: &StormArgs) -> Figures {
    if !g.spawn || g.target != Kind::Comet {
        die("storm restarts the server: --spawn --target comet");
    }
    let mut f = Figures { scenario: "storm".into(), target: "comet".into(), ..Figures::default() };
    let spawn = spawn_opts(g);
    let t = Target::spawn(Kind::Comet, &spawn).unwrap_or_else(|e| die(&format!("cannot start comet: {e}")));
    set_user_keys(&t, users(a));
    let per = a.clients.div_ceil(a.procs.max(1));
    let mut children = Vec::new();
    let mut held = 0u64;
    for p in 0..a.procs.max(1) {
        let n = per.min(a.clients.saturating_sub(p * per));
        let offset = (p * per).to_string();
        let args = storm_child_args(a, n, &offset);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (mut child, out, line) = client_process(g, &t, &args);
        let words: Vec<u64> = line.split_whitespace().skip(1).filter_map(|w| w.parse().ok()).collect();
        held += words.first().copied().unwrap_or(0);
        eprintln!("storm: client process {p}: {}", line.trim());
        let stdin = child.stdin.take().expect("stdin");
        children.push((child, out, stdin));
    }
    f.connections = held;
    eprintln!("storm: {held} subscribed; restarting the server");
    let ports = (t.front, t.back, t.api);
    drop(t);
    let t0 = Instant::now();
    for (_, _, stdin) in &mut children {
        let _ = writeln!(stdin, "go");
    }
    let t = Target::spawn_at(Kind::Comet, &spawn, Some(ports))
        .unwrap_or_else(|e| die(&format!("cannot restart comet: {e}")));
    // The backend gives the keys again (they live in the server's memory).
    set_user_keys(&t, users(a));
    let (mut secs, mut ok, mut failed, mut gave_up) = (0f64, 0u64, 0u64, 0u64);
    for (_, out, _) in &mut children {
        let mut line = String::new();
        out.read_line(&mut line).ok();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        secs = secs.max(v["secs"].as_f64().unwrap_or(f64::NAN));
        ok += v["ok"].as_u64().unwrap_or(0);
        failed += v["failed"].as_u64().unwrap_or(0);
        gave_up += v["gave_up"].as_u64().unwrap_or(0);
    }
    let reconnected = t0.elapsed().as_secs_f64();
    // Subscriptions are not acknowledged: wait until the server counts them.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut counted = subscribed(&t, a.channels);
    while counted < ok && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        counted = subscribed(&t, a.channels);
    }
    let all_subscribed = t0.elapsed().as_secs_f64();
    f.failed_connections = gave_up;
    f.server_cpu_s = t.cpu().unwrap_or(0.0);
    f.rss_kib_after = t.rss_kib().unwrap_or(0);
    f.seconds = all_subscribed;
    f.extra.insert("clients".into(), a.clients as f64);
    f.extra.insert("authorized clients".into(), users(a) as f64);
    f.extra.insert("reconnected after restart".into(), ok as f64);
    f.extra.insert("subscribed after restart (server count)".into(), counted as f64);
    f.extra.insert("s until every client reconnected".into(), reconnected);
    f.extra.insert("s until every client reconnected (slowest process)".into(), secs);
    f.extra.insert("s until all subscribed (server count)".into(), all_subscribed);
    f.extra.insert("failed connect attempts".into(), failed as f64);
    f.extra.insert("clients given up".into(), gave_up as f64);
    f.extra.insert("server CPU s (new process)".into(), f.server_cpu_s);
    f.extra.insert("server peak RSS MiB".into(), t.peak_rss_kib().unwrap_or(0) as f64 / 1024.0);
    for (mut child, _, stdin) in children {
        drop(stdin);
        let _ = child.wait();
    }
    f
}

fn storm_child_args(a: &StormArgs, n: usize, offset: &str) -> Vec<String> {
    [
        "storm-client",
        "--offset",
        offset,
        "--clients",
        &n.to_string(),
        "--procs",
        "1",
        "--auth-every",
        &a.auth_every.to_string(),
        "--channels",
        &a.channels.to_string(),
        "--retries",
        &a.retries.to_string(),
        "--threads",
        &a.threads.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
