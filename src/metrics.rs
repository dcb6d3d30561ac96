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
    /// Connections closed because handling their input panicked.
    pub handler_panics: AtomicU64,
    /// Connections handed to another shard.
    pub handoffs: AtomicU64,
    /// WebSocket connections that negotiated permessage-deflate.
    pub deflate_websockets: AtomicU64,
    /// Frames queued compressed (one per recipient).
    pub deflated_frames: AtomicU64,
    /// Bytes compression saved on the queued frames (one count per recipient).
    pub deflate_bytes_saved: AtomicU64,
    /// Compressed client messages inflated.
    pub inflated_messages: AtomicU64,
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
    /// TLS handshakes completed.
    pub tls_handshakes: AtomicU64,
    /// TLS handshakes that failed: a TLS error, a plaintext client on the
    /// TLS port, or `--tls-handshake-timeout`.
    pub tls_handshake_failures: AtomicU64,
    /// Frontend connections refused with 503 (`--max-connections`).
    pub refused_full: AtomicU64,
    /// Frontend connections refused with 429 (`--max-connections-per-ip`).
    pub refused_per_ip: AtomicU64,
    /// Frontend connections refused with 503 (`--max-accept-rate`).
    pub refused_rate: AtomicU64,
    /// Backend connections refused (`--max-backend-connections`).
    pub refused_backend: AtomicU64,
    /// Backend connections closed for not reading their answers.
    pub unread_answer_closes: AtomicU64,
    /// SELECTs refused for `--answer-memory-limit` (ERR 1037).
    pub answer_memory_refusals: AtomicU64,
    /// Backend connections closed to admit a new one with all slots taken:
    /// the oldest that had not logged in (or was an idle HTTP API one).
    pub evicted_backend: AtomicU64,
    /// Of the refused ones, those answered by one write and closed at once
    /// because 64 refusals were already lingering on their shard.
    pub refused_unlingered: AtomicU64,
    /// Commands dropped over `--client-rate`.
    pub rate_limited: AtomicU64,
    /// Browser publishes dropped over `--channel-rate`.
    pub channel_rate_limited: AtomicU64,
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
    /// The most bytes of changes the shard's lane to the storage thread
    /// ever held (bounded by `--mail-limit` plus one statement's changes).
    pub store_lane_peak: AtomicI64,
    /// Answers that waited for the store and got an error (the change was
    /// not stored).
    pub store_errors: AtomicU64,
    /// 1 once the storage thread is gone (it panicked): every write
    /// statement gets an error until comet restarts.
    pub store_down: AtomicI64,
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
    /// The Redis connection's state with `--redis`; `None` without.
    pub redis: Option<Arc<RedisHealth>>,
    /// The answer bytes held for backend connections (`--answer-memory-limit`).
    pub answers: Option<Arc<crate::shard::answer_memory::AnswerMemory>>,
}

/// Whether the node is connected to Redis (`--redis`), and why not.
#[derive(Debug, Default)]
pub struct RedisHealth {
    up: std::sync::atomic::AtomicBool,
    reason: std::sync::Mutex<String>,
    /// Publishes sent to Redis.
    pub published: AtomicU64,
    /// Messages from other nodes received from Redis.
    pub received: AtomicU64,
    /// Publishes lost with a failed connection, and malformed messages.
    pub lost: AtomicU64,
    /// Times the node wrote all its presence to Redis again.
    pub presence_resyncs: AtomicU64,
    /// Offline messages Redis dropped from users' queues to keep them
    /// within their bounds, when this node queued a newer one.
    pub queue_dropped: AtomicU64,
}

impl RedisHealth {
    pub fn is_up(&self) -> bool {
        self.up.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
    }

    /// Why the node is down (the last connection error).
    pub fn reason(&self) -> String {
        self.reason.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn set_reason(&self, r: String) {
        *self.reason.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = r;
    }
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
        if let Some(a) = &self.answers {
            let name = "comet_answer_memory_bytes";
            let _ = writeln!(
                s,
                "# HELP {name} Bytes of CometQL and HTTP API answers held for all backend connections: parts built or being built, results waiting for their turn, answers not yet written (bound: --answer-memory-limit).\n# TYPE {name} gauge\n{name} {}",
                a.used()
            );
        }
        if let Some(r) = &self.redis {
            let _ = writeln!(
                s,
                "# HELP comet_redis_up Whether the node is connected to Redis (--redis).\n# TYPE comet_redis_up gauge"
            );
            let _ = writeln!(s, "comet_redis_up {}", r.is_up() as u8);
            for (name, help, v) in [
                ("comet_redis_published_total", "Publishes sent to Redis.", &r.published),
                ("comet_redis_received_total", "Messages from other nodes received from Redis.", &r.received),
                (
                    "comet_redis_lost_total",
                    "Publishes lost with a failed Redis connection, and malformed messages.",
                    &r.lost,
                ),
                (
                    "comet_redis_presence_resyncs_total",
                    "Times the node wrote all its subscribers and devices to Redis again (Redis lost them, a write failed, or changes waiting passed --mail-limit).",
                    &r.presence_resyncs,
                ),
                (
                    "comet_redis_queue_dropped_total",
                    "Offline messages dropped from users' queues in Redis, oldest first, to keep each within --offline-queue-size and half of --outbound-limit, when this node queued a newer one.",
                    &r.queue_dropped,
                ),
            ] {
                let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Relaxed));
            }
        }
        type Get = fn(&ShardMetrics) -> i64;
        let families: [(&str, &str, &str, Get); 40] = [
            ("comet_refused_total", "counter", "Frontend connections refused with 503 (--max-connections).", |m| {
                m.refused_full.load(Relaxed) as i64
            }),
            (
                "comet_refused_per_ip_total",
                "counter",
                "Frontend connections refused with 429 (--max-connections-per-ip).",
                |m| m.refused_per_ip.load(Relaxed) as i64,
            ),
            (
                "comet_refused_unlingered_total",
                "counter",
                "Refused frontend connections answered by one write and closed at once (64 refusals already lingering on the shard).",
                |m| m.refused_unlingered.load(Relaxed) as i64,
            ),
            (
                "comet_refused_rate_total",
                "counter",
                "Frontend connections refused with 503 (--max-accept-rate).",
                |m| m.refused_rate.load(Relaxed) as i64,
            ),
            (
                "comet_refused_backend_total",
                "counter",
                "CometQL and HTTP API connections refused (--max-backend-connections).",
                |m| m.refused_backend.load(Relaxed) as i64,
            ),
            (
                "comet_unread_answer_closes_total",
                "counter",
                "CometQL and HTTP API connections closed for leaving 16 x --outbound-limit of answers unread for --message-timeout, or for taking less than 64 KiB of their answers that long while --answer-memory-limit has less than that left.",
                |m| m.unread_answer_closes.load(Relaxed) as i64,
            ),
            (
                "comet_answer_memory_refusals_total",
                "counter",
                "SELECTs refused with ERR 1037 because the answers held for all backend connections would pass --answer-memory-limit.",
                |m| m.answer_memory_refusals.load(Relaxed) as i64,
            ),
            (
                "comet_evicted_backend_total",
                "counter",
                "Backend connections closed to make room for a new one at --max-backend-connections: the shard's oldest CometQL connection not logged in, or idle HTTP API connection.",
                |m| m.evicted_backend.load(Relaxed) as i64,
            ),
            ("comet_rate_limited_total", "counter", "Client commands dropped over --client-rate.", |m| {
                m.rate_limited.load(Relaxed) as i64
            }),
            ("comet_channel_rate_limited_total", "counter", "Browser publishes dropped over --channel-rate.", |m| {
                m.channel_rate_limited.load(Relaxed) as i64
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
            ("comet_auth_failures_total", "counter", "Failed backend logins: CometQL logins and HTTP API keys.", |m| {
                m.auth_failures.load(Relaxed) as i64
            }),
            (
                "comet_auth_refusals_total",
                "counter",
                "CometQL connections and HTTP API requests refused after too many failed logins.",
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
                "Times a shard stopped reading clients until the storage thread (or, with --redis, Redis) caught up.",
                |m| m.store_congestions.load(Relaxed) as i64,
            ),
            (
                "comet_store_lane_peak_bytes",
                "gauge",
                "Most bytes of changes a shard ever had waiting for the storage thread.",
                |m| m.store_lane_peak.load(Relaxed),
            ),
            (
                "comet_store_errors_total",
                "counter",
                "Answers that waited for the store and got an error (not stored).",
                |m| m.store_errors.load(Relaxed) as i64,
            ),
            ("comet_store_down", "gauge", "1 once the storage thread is gone: writes get an error.", |m| {
                m.store_down.load(Relaxed)
            }),
            ("comet_accept_errors_total", "counter", "Failed accepts (out of descriptors or memory).", |m| {
                m.accept_errors.load(Relaxed) as i64
            }),
            ("comet_tls_handshakes_total", "counter", "TLS handshakes completed.", |m| {
                m.tls_handshakes.load(Relaxed) as i64
            }),
            (
                "comet_tls_handshake_failures_total",
                "counter",
                "TLS handshakes that failed (TLS errors, plaintext on the TLS port, --tls-handshake-timeout).",
                |m| m.tls_handshake_failures.load(Relaxed) as i64,
            ),
            ("comet_offline_queued_total", "counter", "Private messages put in offline queues.", |m| {
                m.offline_queued.load(Relaxed) as i64
            }),
            (
                "comet_offline_dropped_total",
                "counter",
                "Offline-queue entries dropped from full queues (by count or bytes), or too large to queue.",
                |m| m.offline_dropped.load(Relaxed) as i64,
            ),
            ("comet_cometql_connections", "gauge", "Open CometQL and HTTP API (backend) connections.", |m| {
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
            (
                "comet_handler_panics_total",
                "counter",
                "Connections closed because handling their input panicked (a bug; the panic is in the log).",
                |m| m.handler_panics.load(Relaxed) as i64,
            ),
            ("comet_handoffs_total", "counter", "Connections handed to their user's home shard.", |m| {
                m.handoffs.load(Relaxed) as i64
            }),
            ("comet_deflate_websockets_total", "counter", "WebSockets that negotiated permessage-deflate.", |m| {
                m.deflate_websockets.load(Relaxed) as i64
            }),
            ("comet_deflated_frames_total", "counter", "Frames queued compressed, one per recipient.", |m| {
                m.deflated_frames.load(Relaxed) as i64
            }),
            ("comet_deflate_bytes_saved_total", "counter", "Bytes permessage-deflate saved on queued frames.", |m| {
                m.deflate_bytes_saved.load(Relaxed) as i64
            }),
            ("comet_inflated_messages_total", "counter", "Compressed client messages inflated.", |m| {
                m.inflated_messages.load(Relaxed) as i64
            }),
        ];
        for (name, kind, help, get) in families {
            // One series per shard and no total: `sum()` makes the total,
            // and a total series would count everything twice in it.
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (i, m) in self.shards.iter().enumerate() {
                let _ = writeln!(s, "{name}{{shard=\"{i}\"}} {}", get(m));
            }
        }
        s
    }
}

/// Connections the `--metrics` listener serves at once: one per worker
/// thread. More wait in the kernel's accept queue; a client holding all of
/// them is cut off after the message timeout, so a scraper waits at most that
/// long. Counted in `config::DESCRIPTOR_RESERVE`.
pub const METRICS_WORKERS: usize = 4;

/// Largest request head the `--metrics` listener reads; longer gets 431.
pub const METRICS_MAX_HEAD: usize = 8 * 1024;

/// Serves `/metrics` on its own listener (`--metrics ADDR`), off the public
/// frontend port. Plain blocking threads, not shards: a scrape every few
/// seconds needs no event loop, and these threads keep answering when the
/// shards are busy or the frontend is at `--max-connections` (they use the
/// descriptor reserve, not the frontend's budget). Each request must arrive
/// whole within `timeout`; every answer closes its connection.
pub fn serve(listener: std::net::TcpListener, registry: Arc<Registry>, timeout: std::time::Duration) {
    let listener = Arc::new(listener);
    for i in 0..METRICS_WORKERS {
        let listener = listener.clone();
        let registry = registry.clone();
        let spawned = std::thread::Builder::new().name(format!("comet-metrics-{i}")).spawn(move || {
            loop {
                match listener.accept() {
                    Ok((stream, _)) => answer(stream, &registry, timeout),
                    // Out of descriptors or memory: wait instead of spinning.
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
                }
            }
        });
        if let Err(e) = spawned {
            eprintln!("comet: cannot start a /metrics thread: {e}");
        }
    }
}

/// Reads one request head from `stream` and answers it.
fn answer(mut stream: std::net::TcpStream, registry: &Registry, timeout: std::time::Duration) {
    use std::io::Read;
    let deadline = std::time::Instant::now() + timeout;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let reply = loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break route(&head[..end]).unwrap_or_else(|| crate::http::metrics_response(registry));
        }
        if head.len() > METRICS_MAX_HEAD {
            let r = crate::http::response(
                "431 Request Header Fields Too Large",
                "text/plain; charset=utf-8",
                "",
                format!("request head over {METRICS_MAX_HEAD} bytes\n").as_bytes(),
            );
            write_by(&mut stream, &r, deadline);
            // Read a little of what is still coming before closing, so the
            // kernel does not reset the connection over unread bytes and
            // lose the answer; bounded by the deadline and 64 KiB.
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let mut drained = 0;
            while drained < 64 * 1024 {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
                    break;
                }
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
            return;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    };
    let mut reply = reply;
    if head.starts_with(b"HEAD ")
        && let Some(end) = reply.windows(4).position(|w| w == b"\r\n\r\n")
    {
        reply.truncate(end + 4);
    }
    write_by(&mut stream, &reply, deadline);
}

/// Writes `bytes` unless `deadline` passes first: each write may wait only
/// for what is left of it (a per-write timeout alone would let a scraper
/// that reads a little now and then hold a worker for ever).
fn write_by(stream: &mut std::net::TcpStream, mut bytes: &[u8], deadline: std::time::Instant) {
    use std::io::Write;
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || stream.set_write_timeout(Some(left)).is_err() {
            return;
        }
        match stream.write(bytes) {
            Ok(0) | Err(_) => return,
            Ok(n) => bytes = &bytes[n..],
        }
    }
}

/// The answer to a request head, or `None` for `GET /metrics` (rendered by
/// the caller).
fn route(head: &[u8]) -> Option<Vec<u8>> {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let text = "text/plain; charset=utf-8";
    if method != "GET" && method != "HEAD" {
        let body = format!("method {} is not allowed here\n", crate::domain::clip(method));
        return Some(crate::http::response("405 Method Not Allowed", text, "Allow: GET, HEAD\r\n", body.as_bytes()));
    }
    if path != "/metrics" {
        let body = format!("no such path: {}; this port serves /metrics only\n", crate::domain::clip(path));
        return Some(crate::http::response("404 Not Found", text, "", body.as_bytes()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served_and_there_is_no_total_series() {
        assert!(route(b"GET /metrics HTTP/1.1\r\nHost: x").is_none());
        assert!(route(b"GET /metrics?x=1 HTTP/1.0").is_none());
        let r = String::from_utf8(route(b"GET / HTTP/1.1").unwrap()).unwrap();
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = String::from_utf8(route(b"POST /metrics HTTP/1.1").unwrap()).unwrap();
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");
        let reg = Registry {
            shards: vec![Arc::default(), Arc::default()],
            io_backend: "epoll",
            started: std::time::Instant::now(),
            redis: None,
            answers: None,
        };
        reg.shards[1].accepted.fetch_add(3, Relaxed);
        let text = reg.render();
        assert!(text.contains("comet_connections_accepted_total{shard=\"1\"} 3\n"), "{text}");
        assert!(!text.contains("shard=\"all\""), "{text}");
    }
}
