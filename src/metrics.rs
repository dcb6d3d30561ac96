//! Counters for `/metrics` (Prometheus text format) and `SHOW STATUS`.
//!
//! Each shard owns one [`ShardMetrics`] and is its only writer; any shard may
//! read all of them when it serves `/metrics`. Relaxed atomics are enough: the
//! numbers are monotonic counters or gauges read for display.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// One shard's counters.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    /// Open TCP connections on the frontend port (any state).
    pub connections: AtomicI64,
    /// Open WebSocket connections.
    pub websockets: AtomicI64,
    /// Connections accepted since start.
    pub accepted: AtomicU64,
    /// Client messages (WebSocket data messages) received.
    pub messages_in: AtomicU64,
    /// Messages queued to clients (one per recipient).
    pub messages_out: AtomicU64,
    /// Bytes written to client sockets.
    pub bytes_out: AtomicU64,
    /// Connections closed with 4008 for exceeding the outbound bound.
    pub slow_consumer_closes: AtomicU64,
    /// Connections closed for not answering pings.
    pub heartbeat_closes: AtomicU64,
    /// Connections handed to another shard.
    pub handoffs: AtomicU64,
    /// Open CometQL (backend) connections.
    pub sql_connections: AtomicI64,
    /// CometQL queries received.
    pub sql_queries: AtomicU64,
    /// Private messages put in offline queues.
    pub offline_queued: AtomicU64,
    /// Offline-queue entries dropped because the queue was full.
    pub offline_dropped: AtomicU64,
    /// Failed accepts (out of descriptors or memory).
    pub accept_errors: AtomicU64,
    /// Frontend connections refused with 503 (`--max-connections`).
    pub refused_full: AtomicU64,
    /// Frontend connections refused with 429 (`--max-connections-per-ip`).
    pub refused_per_ip: AtomicU64,
    /// Commands dropped over `--client-rate`.
    pub rate_limited: AtomicU64,
    /// Connections closed with 4029 for exceeding the rate for 10 s.
    pub rate_limit_closes: AtomicU64,
    /// Connections closed because a started frame, head or packet did not
    /// finish within `--message-timeout`.
    pub message_timeouts: AtomicU64,
    /// Failed CometQL logins.
    pub auth_failures: AtomicU64,
    /// CometQL connections refused because their address failed too often.
    pub auth_refusals: AtomicU64,
    /// Times the shard stopped reading clients because its mail to another
    /// shard passed `--mail-limit`.
    pub mail_congestions: AtomicU64,
    /// Times the shard stopped reading clients because the changes waiting
    /// for the storage thread passed `--mail-limit`.
    pub store_congestions: AtomicU64,
}

impl ShardMetrics {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
}

/// Everything `/metrics` reports.
#[derive(Debug)]
pub struct Registry {
    pub shards: Vec<Arc<ShardMetrics>>,
    /// `io_uring` or `epoll`.
    pub io_backend: &'static str,
    pub started: std::time::Instant,
}

impl Registry {
    /// Renders the Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(4096);
        let _ = writeln!(s, "# HELP comet_info Build and I/O backend.\n# TYPE comet_info gauge");
        let _ = writeln!(
            s,
            "comet_info{{version=\"{}\",io_backend=\"{}\",shards=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            self.io_backend,
            self.shards.len()
        );
        let _ = writeln!(s, "# HELP comet_uptime_seconds Seconds since start.\n# TYPE comet_uptime_seconds gauge");
        let _ = writeln!(s, "comet_uptime_seconds {}", self.started.elapsed().as_secs());
        type Get = fn(&ShardMetrics) -> i64;
        let families: [(&str, &str, &str, Get); 23] = [
            ("comet_refused_total", "counter", "Frontend connections refused with 503 (--max-connections).", |m| {
                m.refused_full.load(Relaxed) as i64
            }),
            (
                "comet_refused_per_ip_total",
                "counter",
                "Frontend connections refused with 429 (--max-connections-per-ip).",
                |m| m.refused_per_ip.load(Relaxed) as i64,
            ),
            ("comet_rate_limited_total", "counter", "Client commands dropped over --client-rate.", |m| {
                m.rate_limited.load(Relaxed) as i64
            }),
            ("comet_rate_limit_closes_total", "counter", "Connections closed with 4029 (rate limit).", |m| {
                m.rate_limit_closes.load(Relaxed) as i64
            }),
            (
                "comet_message_timeouts_total",
                "counter",
                "Connections closed for an unfinished frame, head or packet.",
                |m| m.message_timeouts.load(Relaxed) as i64,
            ),
            ("comet_auth_failures_total", "counter", "Failed CometQL logins.", |m| {
                m.auth_failures.load(Relaxed) as i64
            }),
            (
                "comet_auth_refusals_total",
                "counter",
                "CometQL connections refused after too many failed logins.",
                |m| m.auth_refusals.load(Relaxed) as i64,
            ),
            (
                "comet_mail_congestions_total",
                "counter",
                "Times a shard stopped reading clients for mail backpressure.",
                |m| m.mail_congestions.load(Relaxed) as i64,
            ),
            (
                "comet_store_congestions_total",
                "counter",
                "Times a shard stopped reading clients until the storage thread caught up.",
                |m| m.store_congestions.load(Relaxed) as i64,
            ),
            ("comet_accept_errors_total", "counter", "Failed accepts (out of descriptors or memory).", |m| {
                m.accept_errors.load(Relaxed) as i64
            }),
            ("comet_offline_queued_total", "counter", "Private messages put in offline queues.", |m| {
                m.offline_queued.load(Relaxed) as i64
            }),
            ("comet_offline_dropped_total", "counter", "Offline-queue entries dropped from full queues.", |m| {
                m.offline_dropped.load(Relaxed) as i64
            }),
            ("comet_cometql_connections", "gauge", "Open CometQL (backend) connections.", |m| {
                m.sql_connections.load(Relaxed)
            }),
            ("comet_cometql_queries_total", "counter", "CometQL queries received.", |m| {
                m.sql_queries.load(Relaxed) as i64
            }),
            ("comet_connections", "gauge", "Open frontend TCP connections.", |m| m.connections.load(Relaxed)),
            ("comet_websockets", "gauge", "Open WebSocket connections.", |m| m.websockets.load(Relaxed)),
            ("comet_connections_accepted_total", "counter", "Frontend connections accepted.", |m| {
                m.accepted.load(Relaxed) as i64
            }),
            ("comet_messages_in_total", "counter", "WebSocket messages received from clients.", |m| {
                m.messages_in.load(Relaxed) as i64
            }),
            ("comet_messages_out_total", "counter", "Messages queued to clients, one per recipient.", |m| {
                m.messages_out.load(Relaxed) as i64
            }),
            ("comet_bytes_out_total", "counter", "Bytes written to client sockets.", |m| {
                m.bytes_out.load(Relaxed) as i64
            }),
            ("comet_slow_consumer_closes_total", "counter", "Connections closed with 4008 (slow consumer).", |m| {
                m.slow_consumer_closes.load(Relaxed) as i64
            }),
            ("comet_heartbeat_closes_total", "counter", "Connections closed for missing pongs.", |m| {
                m.heartbeat_closes.load(Relaxed) as i64
            }),
            ("comet_handoffs_total", "counter", "Connections handed to their user's home shard.", |m| {
                m.handoffs.load(Relaxed) as i64
            }),
        ];
        for (name, kind, help, get) in families {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            let mut total = 0i64;
            for (i, m) in self.shards.iter().enumerate() {
                let v = get(m);
                total += v;
                let _ = writeln!(s, "{name}{{shard=\"{i}\"}} {v}");
            }
            let _ = writeln!(s, "{name}{{shard=\"all\"}} {total}");
        }
        s
    }
}
