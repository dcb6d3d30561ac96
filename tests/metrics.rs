//! `/metrics` and the demo page against the real binary: `--metrics ADDR`
//! moves the metrics to their own bounded listener (claimed like the other
//! ports, still answering when the frontend is full), `--demo off` removes
//! the demo page but not comet.js, every metric has per-shard series only,
//! and the Grafana dashboard in `tuning/` names only metrics that exist.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BACKENDS, Server, http_request};

fn start(io: &str, args: &[&str]) -> Server {
    let mut all = vec!["--io", io, "--shards", "2"];
    all.extend_from_slice(args);
    Server::start(&all)
}

fn get(addr: SocketAddr, path: &str) -> (String, String) {
    http_request(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
}

#[test]
fn metrics_listener_serves_metrics_and_the_frontend_no_longer_does() {
    for io in BACKENDS {
        let s = start(io, &["--metrics", "127.0.0.1:0"]);
        let m = s.metrics.expect("the metrics address is logged");
        let (status, body) = get(m, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK", "{io}");
        assert!(body.contains("comet_info{"), "{io}: {body}");
        assert!(body.contains("comet_connections_accepted_total{shard=\"1\"}"), "{io}: {body}");
        assert!(!body.contains("shard=\"all\""), "{io}: no total series");
        let (status, body) = get(s.addr, "/metrics");
        assert_eq!(status, "HTTP/1.1 404 Not Found", "{io}: {body}");
        // The metrics port serves nothing else.
        assert_eq!(get(m, "/").0, "HTTP/1.1 404 Not Found");
        assert_eq!(get(m, "/info").0, "HTTP/1.1 404 Not Found");
        let (status, _) = http_request(m, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
        // HEAD works too (scrapers' health probes).
        let (status, body) = http_request(m, "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", ""), "HEAD has no body");
    }
}

#[test]
fn without_the_flag_metrics_stay_on_the_frontend_with_per_shard_series_only() {
    let s = start("epoll", &[]);
    assert!(s.metrics.is_none());
    let _c = s.client("m1");
    let (status, body) = get(s.addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(!body.contains("shard=\"all\""), "{body}");
    assert_eq!(body.matches("comet_websockets{shard=").count(), 2, "{body}");
    assert_eq!(s.metric("comet_websockets"), 1, "the sum of the shards' series");
}

#[test]
fn metrics_listener_answers_while_the_frontend_is_full() {
    for io in BACKENDS {
        let s = start(io, &["--metrics", "127.0.0.1:0", "--max-connections", "3"]);
        let m = s.metrics.unwrap();
        let mut keep: Vec<common::Raw> = (0..3).map(|_| common::Raw::open(s.addr, "/ws/v=4&uuid=k")).collect();
        // A fourth WebSocket is refused with 503 (the socket is kept open
        // until the head is read, as hostile.rs does).
        let mut probe = TcpStream::connect(s.addr).unwrap();
        probe.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        probe.write_all(common::upgrade_request("/ws/v=4&uuid=x").as_bytes()).unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && probe.read_exact(&mut b).is_ok() {
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 503"), "{io}: the frontend is full: {head}");
        let (status, body) = get(m, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK", "{io}");
        let refused: i64 = body
            .lines()
            .filter(|l| l.starts_with("comet_refused_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<i64>().unwrap())
            .sum();
        assert!(refused >= 1, "{io}: {body}");
        keep.clear();
    }
}

#[test]
fn metrics_listener_bounds_head_size_and_time() {
    let s = start("epoll", &["--metrics", "127.0.0.1:0", "--message-timeout", "1"]);
    let m = s.metrics.unwrap();
    // A head that never ends: 431 once it passes 8 KiB.
    let mut c = TcpStream::connect(m).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = c.write_all(format!("GET /metrics HTTP/1.1\r\nX: {}", "a".repeat(20_000)).as_bytes());
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    // Silent clients holding every worker are cut off after the message
    // timeout: a scrape behind them is answered within it.
    let mut idle: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(m).unwrap()).collect();
    for c in &mut idle {
        let _ = c.write_all(b"GET /met");
    }
    let t0 = Instant::now();
    let (status, _) = get(m, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(t0.elapsed() < Duration::from_secs(6), "answered after {:?}", t0.elapsed());
    for c in &mut idle {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = Vec::new();
        assert!(c.read_to_end(&mut b).is_ok(), "an unfinished head is closed");
        assert!(b.is_empty(), "no answer to a head that never finished");
    }
}

#[test]
fn a_second_comet_on_the_metrics_port_refuses_to_start() {
    let s = start("epoll", &["--metrics", "127.0.0.1:0", "--password", "pw"]);
    let m = s.metrics.unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_comet"))
        .args(["--frontend", "127.0.0.1:0", "--backend", "127.0.0.1:0", "--metrics", &m.to_string(), "--api", "off"])
        .args(["--shards", "1", "--password", "pw"])
        .env_remove("COMET_IO")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run comet");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains(&m.to_string()) && log.contains("--metrics"), "{log}");
    // The running one is unharmed.
    assert_eq!(get(m, "/metrics").0, "HTTP/1.1 200 OK");
    // --metrics on the frontend's port is refused before anything binds.
    let out = Command::new(env!("CARGO_BIN_EXE_comet"))
        .args(["--frontend", "127.0.0.1:18977", "--backend", "127.0.0.1:0", "--metrics", "127.0.0.1:18977"])
        .env_remove("COMET_IO")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run comet");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && log.contains("overlap"), "{log}");
}

#[test]
fn demo_off_removes_the_demo_page_but_keeps_the_client_library() {
    let on = start("epoll", &[]);
    assert_eq!(get(on.addr, "/").0, "HTTP/1.1 200 OK");
    let off = start("epoll", &["--demo", "off"]);
    for path in ["/", "/index.html"] {
        assert_eq!(get(off.addr, path).0, "HTTP/1.1 404 Not Found", "{path}");
    }
    let (status, body) = get(off.addr, "/comet.js");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("CometServer"), "comet.js is still served");
    assert_eq!(get(off.addr, "/info").0, "HTTP/1.1 200 OK");
    assert_eq!(get(off.addr, "/metrics").0, "HTTP/1.1 200 OK");
}

/// Every `comet_*` name in the dashboard's queries must be a metric the
/// server exports, so the dashboard cannot silently rot when one is renamed.
#[test]
fn every_metric_in_the_grafana_dashboard_exists() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tuning/grafana-comet.json");
    let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dash, &mut exprs);
    assert!(exprs.len() >= 8, "the dashboard has panels: {exprs:?}");
    let s = start("epoll", &["--metrics", "127.0.0.1:0"]);
    let text = s.metrics_text();
    let mut names = std::collections::BTreeSet::new();
    for e in &exprs {
        assert!(!e.contains("shard=\"all\""), "{e}");
        let b = e.as_bytes();
        let mut i = 0;
        while let Some(at) = e[i..].find("comet_") {
            let start = i + at;
            let mut end = start;
            while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
                end += 1;
            }
            names.insert(e[start..end].to_string());
            i = end;
        }
    }
    assert!(names.len() >= 8, "{names:?}");
    for n in &names {
        let exported = text.lines().any(|l| l.starts_with(&format!("{n}{{")) || l.starts_with(&format!("{n} ")));
        assert!(exported, "the dashboard uses {n}, which /metrics does not export");
    }
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}
