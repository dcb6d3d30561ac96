//! One frontend connection: its state, and the shard's handlers for it.
//!
//! A connection starts in [`Phase::Http`] reading a request head. A plain
//! HTTP request is answered and closed; a WebSocket upgrade moves it to
//! [`Phase::Comet`] (or [`Phase::Echo`] on the conformance endpoint). Reads go
//! through the shard's shared scratch buffer; `inbuf` ([`InBuf`]) holds bytes
//! only while a partial frame or head is pending, and a frame that started
//! must finish within `--message-timeout`. Output is an [`OutQueue`] of shared
//! frames written with vectored writes; a queue whose memory passes
//! `--outbound-limit` closes the connection with 4008 instead of growing.
//! Commands are metered by a [`RateLimiter`] (`--client-rate`), and new
//! connections by the process-wide [`ConnCounts`](super::limits::ConnCounts).

use std::net::SocketAddr;
use std::sync::Arc;

use smallvec::SmallVec;

use super::core::{Effect, Pending, ShardCore, Then};
use super::inbuf::InBuf;
use super::limits::{RateLimiter, RateVerdict, Refusal};
use super::mail::{Publication, Query, encode_text_frame};
use super::outq::OutQueue;
use super::{ConnId, home_shard};
use crate::domain::{Peer, clip, is_valid_channel};
use crate::frontend::command::{self, Command};
use crate::frontend::message::{self, ChannelMessage};
use crate::frontend::url;
use crate::http;
use crate::metrics::ShardMetrics;
use crate::ws::{self, CloseCode, Decoder, Event, Fragments, frame::Decoded};

/// Seconds a client has to send its request head (or a backend to log in).
const HANDSHAKE_TIMEOUT: u32 = 10;
/// Refused connections (503/429) one shard keeps while their answer is
/// written; past this, further ones get their answer in one non-blocking
/// write, if the socket takes it at once, and are closed without lingering.
pub const MAX_REFUSING: usize = 64;
/// Seconds a refused connection is kept for its answer to be read.
const REFUSAL_LINGER: u32 = 1;
/// Seconds a refused client is asked to wait (`Retry-After`).
const REFUSAL_RETRY_SECS: u32 = 5;
/// Seconds a client refused over `--max-accept-rate` is asked to wait: a
/// storm is spread over this (and the clients' jitter) rather than over
/// the five seconds of a full server.
const RATE_RETRY_SECS: u32 = 2;
/// Deliveries one connection's commands may make in one turn before the
/// rest of its input waits for the next turn: a burst of publishes to a
/// large channel must not keep every other connection of the shard waiting
/// (about 10 ms of fan-out here).
pub const WORK_PER_WAKE: usize = 4096;
/// Longest event name a browser may publish with (as in CometQL).
const MAX_EVENT_NAME: usize = 64;
/// Refused channel names one subscription reports one by one; the rest are
/// counted in one more error. A list is bounded by its frame or the request
/// head, but a 16 KiB head of `x,x,...` holds 8,000 bad names, and an error
/// frame each was a handshake's worth of work per name.
const MAX_NAME_ERRORS: usize = 3;

/// How long a connection that went over `--client-rate` is not read.
pub const THROTTLE: std::time::Duration = std::time::Duration::from_millis(100);

/// Close code for a client that kept exceeding `--client-rate`.
pub const CLOSE_RATE_LIMIT: CloseCode = CloseCode(4029);
/// Seconds a closing connection waits for the peer's close.
const CLOSE_TIMEOUT: u32 = 3;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the HTTP request head.
    Http,
    /// A comet WebSocket.
    Comet,
    /// The conformance echo endpoint (`--echo-path`).
    Echo,
    /// A CometQL (MySQL protocol) connection on the backend port; its
    /// state is in `Conn::sql`.
    Sql,
    /// Close sent (or HTTP answered): once the output drains the write side
    /// is shut (and with `drop_when_flushed` the connection dropped); then
    /// the peer's close is awaited until `deadline`.
    Closing { deadline: u32, drop_when_flushed: bool },
}

/// Facts about a WebSocket client kept for presence and `users_in_pipes`:
/// its `uuid`, Origin, User-Agent, Accept-Language and the address a
/// trusted proxy forwarded for, in one allocation (`\0`-separated), since
/// every idle connection carries them and five `String`s would cost five
/// allocations and 120 bytes of headers. Empty (no heap) for connections
/// that are not WebSockets. When no proxy forwarded an address, the IP is
/// `Conn::peer`'s.
#[derive(Debug, Default)]
pub struct ClientInfo(Box<str>);

impl ClientInfo {
    pub fn new(
        uuid: &str,
        origin: Option<&str>,
        user_agent: Option<&str>,
        language: Option<&str>,
        ip: Option<&str>,
    ) -> ClientInfo {
        let clean = |s: Option<&str>| s.unwrap_or("").replace('\0', "");
        let s = format!(
            "{}\0{}\0{}\0{}\0{}",
            clean(Some(uuid)),
            clean(origin),
            clean(user_agent),
            clean(language),
            clean(ip)
        );
        ClientInfo(s.into_boxed_str())
    }

    /// The client address forwarded by a trusted proxy, if any.
    pub fn forwarded_ip(&self) -> Option<&str> {
        Some(self.field(4)).filter(|s| !s.is_empty())
    }

    fn field(&self, i: usize) -> &str {
        self.0.split('\0').nth(i).unwrap_or("")
    }

    /// The `uuid` connection parameter (presence members carry it).
    pub fn uuid(&self) -> &str {
        self.field(0)
    }

    pub fn origin(&self) -> &str {
        self.field(1)
    }

    pub fn user_agent(&self) -> &str {
        self.field(2)
    }

    pub fn language(&self) -> &str {
        self.field(3)
    }
}

/// One connection. Kept small: the idle budget is 1 KiB per connection.
/// The socket is not here: the I/O layer owns it, under the same [`ConnId`].
pub struct Conn {
    pub phase: Phase,
    /// Bytes of a partial frame, head or packet; empty (no heap) otherwise.
    pub inbuf: InBuf,
    /// A fragmented message being reassembled (the decoder's state).
    pub fragments: Fragments,
    /// Frames waiting to be written.
    pub out: OutQueue,
    /// Commands allowed per second (WebSocket connections).
    pub rate: RateLimiter,
    /// Cross-shard requests of this connection waiting for answers.
    pub pending: u16,
    /// Counted in the process's connection counts (a frontend connection
    /// that was admitted); uncounted when it goes.
    pub counted: bool,
    /// A refused connection lingering for its 503/429 to be read.
    pub refusing: bool,
    /// Commands were dropped over the rate since the last read: the next
    /// read waits [`THROTTLE`].
    pub throttled: bool,
    /// Shard time the first fragment of a message still being reassembled
    /// arrived (0: none); the whole message is held to `--message-timeout`.
    pub fragments_since: u32,
    /// Channel subscriptions: (channel index, position in its list).
    pub subs: SmallVec<[(u32, u32); 2]>,
    /// 0 for anonymous connections.
    pub user_id: u64,
    pub dev_id: u32,
    /// API major version < 4: messages also carry `event_name`.
    pub legacy: bool,
    /// permessage-deflate: 0 when not negotiated, else the server window
    /// the client allowed, 8..=15 (no context is kept: this byte is all of
    /// it; see [`ws::deflate::fits_window`]).
    pub deflate: u8,
    pub peer: Peer,
    /// Shard time of the last byte received.
    pub last_rx: u32,
    /// Shard time a heartbeat ping was sent, if it is unanswered (0: none;
    /// pings go out after `--ping-interval` of silence, never at time 0).
    pub ping_sent: u32,
    pub opened: u32,
    pub info: ClientInfo,
    /// The MySQL session of a backend connection.
    pub sql: Option<Box<super::sql::SqlConn>>,
}

impl Conn {
    fn new(peer: SocketAddr, now: u32) -> Conn {
        Conn {
            phase: Phase::Http,
            inbuf: InBuf::default(),
            fragments: Fragments::default(),
            out: OutQueue::default(),
            rate: RateLimiter::default(),
            pending: 0,
            counted: false,
            refusing: false,
            throttled: false,
            fragments_since: 0,
            subs: SmallVec::new(),
            user_id: 0,
            dev_id: 0,
            legacy: false,
            deflate: 0,
            peer: peer.into(),
            last_rx: now,
            ping_sent: 0,
            opened: now,
            info: ClientInfo::default(),
            sql: None,
        }
    }

    /// An HTTP API connection with no request started, no answer owed and
    /// nothing left to write.
    pub fn idle_http(&self) -> bool {
        self.inbuf.is_empty() && self.out.is_empty() && self.sql.as_ref().is_some_and(|s| s.is_http() && !s.answering())
    }

    /// Whether nothing waits to be written.
    pub fn out_is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// Whether channel messages may still be queued to it.
    pub fn accepts_messages(&self) -> bool {
        self.phase == Phase::Comet
    }

    /// Whether unconsumed input is kept (not once closing).
    fn keeps_input(&self) -> bool {
        !matches!(self.phase, Phase::Closing { .. })
    }

    /// Queues a frame; returns true if the connection must be added to the
    /// dirty list (its queue was empty).
    pub fn push_out(&mut self, frame: Arc<[u8]>) -> bool {
        self.out.push(frame)
    }

    /// Queues a frame that goes out at once (an answer, a private message,
    /// a pong, a close, an HTTP or MySQL answer); returns true if the
    /// connection must join the dirty list: its queue was empty, or held
    /// for a `--write-delay` window, which then ends here (its channel
    /// messages go along).
    pub fn push_now(&mut self, frame: Arc<[u8]>) -> bool {
        let was_empty = self.out.push(frame);
        // Ended even when the queue was empty (a TLS write or a dropped
        // backlog took the held frames): a later frame must not find it
        // open and make the connection dirty a second time.
        self.end_window() | was_empty
    }

    /// Ends this connection's `--write-delay` window if one is open;
    /// returns whether it was.
    pub fn end_window(&mut self) -> bool {
        let open = super::delay::WriteDelay::is_open(self.out.window);
        if open {
            self.out.window = super::delay::WriteDelay::ended(self.out.window);
        }
        open
    }
}

/// What the connection task should do after a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Wait for the next readable event.
    Continue,
    /// Do not read: the shard's mail is congested, or this connection has
    /// as many requests waiting as it may. Wait until the shard says so.
    Paused,
    /// This connection's commands made a turn's worth of work: let the
    /// other connections run, then [`ShardCore::resume`] it.
    Yield,
    /// The connection sent commands over `--client-rate`, which were
    /// dropped: read it again only after [`THROTTLE`], so that a flood
    /// waits in the kernel's buffers (and the sender's, through TCP flow
    /// control) instead of costing the shard a decode per dropped command.
    Throttle,
    /// The connection is gone from the shard: stop.
    Gone,
}

/// What became of an accepted frontend connection.
#[derive(Debug)]
pub enum Admission {
    /// Admitted, or refused with an answer it lingers for.
    Open(ConnId),
    /// Refused while [`MAX_REFUSING`] refusals linger: the I/O layer writes
    /// this answer once, without waiting, and closes the socket.
    AnswerAndClose(Vec<u8>),
}

/// What reading a request head led to.
enum Http {
    /// The head is not complete yet.
    Incomplete,
    /// Answered, refused or handed off: no more bytes for this shard.
    Finished,
    /// Upgraded to a WebSocket after this many bytes.
    Upgraded(usize),
}

impl ShardCore {
    /// A frontend connection was accepted from `peer`: admits it (counted
    /// against the connection limits), or registers it to be answered 503
    /// or 429 and closed, or (too many refusals are already lingering)
    /// leaves the answer to a single write before closing.
    pub fn accept(&mut self, peer: SocketAddr) -> Admission {
        ShardMetrics::add(&self.metrics.accepted, 1);
        let c = &self.shared.config;
        if !self.shared.accept_rate.admit(c.max_accept_rate, self.now_ms) {
            return self.refuse(peer, Refusal::Rate);
        }
        match self.shared.conn_counts.admit(peer.ip(), c.max_connections, c.max_connections_per_ip) {
            Ok(()) => {
                let id = self.open(peer);
                if let Some(conn) = self.conns.get_mut(id) {
                    conn.counted = true;
                }
                Admission::Open(id)
            }
            Err(why) => self.refuse(peer, why),
        }
    }

    /// Answers a connection over a limit with 503 or 429 and closes it once
    /// the answer is out (or after one write when too many refusals linger).
    fn refuse(&mut self, peer: SocketAddr, why: Refusal) -> Admission {
        let (counter, resp) = match why {
            Refusal::Full => (
                &self.metrics.refused_full,
                http::unavailable_retry(
                    "comet is at its connection limit (--max-connections); retry later",
                    REFUSAL_RETRY_SECS,
                ),
            ),
            Refusal::Rate => (
                &self.metrics.refused_rate,
                http::unavailable_retry(
                    "comet is taking new connections slower than they come (--max-accept-rate); retry later",
                    RATE_RETRY_SECS,
                ),
            ),
            Refusal::PerIp => (
                &self.metrics.refused_per_ip,
                http::too_many("too many connections from your address (--max-connections-per-ip)", REFUSAL_RETRY_SECS),
            ),
        };
        ShardMetrics::add(counter, 1);
        if self.refusing >= MAX_REFUSING {
            ShardMetrics::add(&self.metrics.refused_unlingered, 1);
            return Admission::AnswerAndClose(resp);
        }
        self.refusing += 1;
        let id = self.open(peer);
        let deadline = self.now + REFUSAL_LINGER;
        self.send_raw(id, resp);
        self.finish_after_flush(id, false);
        if let Some(conn) = self.conns.get_mut(id) {
            conn.refusing = true;
            conn.phase = Phase::Closing { deadline, drop_when_flushed: false };
        }
        Admission::Open(id)
    }

    /// Adds a connection to the shard (accepted here or handed over).
    pub(super) fn open(&mut self, peer: SocketAddr) -> ConnId {
        let conn = Conn::new(peer, self.now);
        let id = self.conns.insert(conn);
        self.metrics.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        id
    }

    /// Takes over a connection handed over by another shard (counted as
    /// accepted, and in the connection counts, once, by the shard that
    /// accepted it); the bytes the other shard read go to
    /// [`ShardCore::adopted_head`].
    pub fn adopt(&mut self, peer: SocketAddr) -> ConnId {
        let id = self.open(peer);
        if let Some(conn) = self.conns.get_mut(id) {
            conn.counted = true;
        }
        id
    }

    /// Handles the request head an adopted connection came with.
    pub fn adopted_head(&mut self, id: ConnId, mut head: Vec<u8>) {
        super::panic_on_adopt_marker(&head);
        self.feed(id, &mut head);
    }

    /// Whether connection `id` may be read now: not while the shard's mail
    /// is congested (its commands would add mail), nor while a backend
    /// connection has `--max-pending` requests waiting, statements parked
    /// behind its gather of rows, statements being started, or more
    /// answers queued than the bound of unread answers (it is read again
    /// once they are written).
    /// A closing connection is always read (what it sends is dropped).
    pub fn may_read(&self, id: ConnId) -> bool {
        let Some(c) = self.conns.get(id) else {
            return true;
        };
        match c.phase {
            Phase::Closing { .. } => true,
            _ if self.outbox.is_congested() || self.store_congested() => false,
            Phase::Sql => {
                c.pending < self.shared.config.max_pending
                    && !c.sql.as_ref().is_some_and(|s| s.holds_input())
                    && c.out.cost() <= self.sql_answer_limit()
            }
            _ => true,
        }
    }

    /// Bytes arrived on connection `id`. Returns whether to keep reading
    /// it, pause (see [`ShardCore::may_read`]), or stop (it is gone).
    pub fn readable(&mut self, id: ConnId, data: &mut [u8]) -> Flow {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(id) else {
            return Flow::Gone;
        };
        conn.last_rx = now;
        conn.ping_sent = 0;
        if let Phase::Closing { .. } = conn.phase {
            // Whatever a closing peer still sends is read and dropped.
            return Flow::Continue;
        }
        if self.feed(id, data) == Flow::Gone {
            return Flow::Gone;
        }
        self.next_flow(id)
    }

    /// The peer closed the connection, or reading or writing it failed.
    pub fn hangup(&mut self, id: ConnId) {
        self.drop_conn(id);
    }

    /// Handles bytes received: after any pending ones (kept in `inbuf`,
    /// which keeps what stays unconsumed), or straight from the read buffer
    /// when nothing was pending, which is the common case.
    fn feed(&mut self, id: ConnId, data: &mut [u8]) -> Flow {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(id) else {
            return Flow::Gone;
        };
        if conn.inbuf.is_empty() {
            let used = self.process(id, data);
            let Some(conn) = self.conns.get_mut(id) else {
                return Flow::Gone;
            };
            if used < data.len() && conn.keeps_input() {
                conn.inbuf.extend(&data[used..]);
                conn.inbuf.consume(0, now);
            }
        } else {
            let mut inbuf = std::mem::take(&mut conn.inbuf);
            inbuf.extend(data);
            let used = self.process(id, inbuf.pending());
            inbuf.consume(used, now);
            let Some(conn) = self.conns.get_mut(id) else {
                return Flow::Gone;
            };
            if conn.keeps_input() {
                conn.inbuf = inbuf;
            }
        }
        Flow::Continue
    }

    /// Handles what the connection has been sent; returns the bytes
    /// consumed (the rest is an unfinished frame, head or packet).
    fn process(&mut self, id: ConnId, buf: &mut [u8]) -> usize {
        let mut pos = 0;
        loop {
            let Some(conn) = self.conns.get(id) else {
                return buf.len();
            };
            match conn.phase {
                Phase::Http => match self.on_http(id, &mut buf[pos..]) {
                    Http::Incomplete => return pos,
                    Http::Finished => return buf.len(),
                    Http::Upgraded(n) => pos += n,
                },
                Phase::Comet | Phase::Echo => return pos + self.on_frames(id, &mut buf[pos..]),
                Phase::Sql => return pos + self.on_sql(id, &mut buf[pos..]),
                Phase::Closing { .. } => return buf.len(),
            }
        }
    }

    /// Resumes a connection that stopped being read or yielded its turn:
    /// handles the complete commands it had buffered (a backend connection
    /// stops mid-buffer at `--max-pending`; any connection stops after
    /// [`WORK_PER_WAKE`] deliveries). The caller resets [`ShardCore::work`]
    /// first; the answer says what to do next, as for [`ShardCore::readable`].
    pub fn resume(&mut self, id: ConnId) -> Flow {
        let Some(c) = self.conns.get(id) else {
            return Flow::Gone;
        };
        if !c.inbuf.is_empty() && matches!(c.phase, Phase::Sql | Phase::Comet | Phase::Echo) && self.may_read(id) {
            self.feed(id, &mut []);
        }
        self.next_flow(id)
    }

    /// After handling input: keep reading, yield the turn, pause, or stop.
    fn next_flow(&mut self, id: ConnId) -> Flow {
        let Some(conn) = self.conns.get_mut(id) else {
            return Flow::Gone;
        };
        if std::mem::take(&mut conn.throttled) {
            Flow::Throttle
        } else if !self.may_read(id) {
            Flow::Paused
        } else if self.work >= WORK_PER_WAKE && self.conns.get(id).is_some_and(|c| c.phase != Phase::Sql) {
            Flow::Yield
        } else {
            Flow::Continue
        }
    }

    /// Reads a request head: answers plain HTTP, hands off or upgrades.
    fn on_http(&mut self, id: ConnId, buf: &mut [u8]) -> Http {
        let req = match ws::parse_request(buf) {
            Ok(Some(r)) => r,
            Ok(None) => return Http::Incomplete,
            Err(e) => {
                self.answer_http(id, http::bad_request(&e.to_string()));
                return Http::Finished;
            }
        };
        let head_len = req.head_len;
        let echo = self.shared.config.echo_path.as_deref() == Some(req.path.as_str());
        let params = url::ws_params(&req.path);
        if !echo && params.is_none() {
            let resp = http::route(&req, &self.shared.registry, &self.shared.config);
            self.answer_http(id, resp);
            return Http::Finished;
        }
        if let Err(e) = req.validate_upgrade() {
            self.answer_http(id, http::bad_request(&e.to_string()));
            return Http::Finished;
        }
        let allowed = &self.shared.config.allowed_origins;
        if !allowed.is_empty()
            && let Some(origin) = req.origin.as_deref()
            && !allowed.iter().any(|a| a == origin.trim_end_matches('/'))
        {
            let msg = format!("origin {} is not allowed to connect", clip(origin));
            self.answer_http(id, http::forbidden(&msg));
            return Http::Finished;
        }
        if echo {
            let deflate = self.wants_deflate(&req);
            self.send_raw(id, req.upgrade_response(deflate));
            if let Some(c) = self.conns.get_mut(id) {
                c.phase = Phase::Echo;
                c.deflate = deflate.map_or(0, |d| d.window_bits());
            }
            self.metrics.websockets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Http::Upgraded(head_len);
        }
        let p = url::parse_params(params.unwrap_or(""));
        // A connection that names a user belongs on the user's home shard.
        if p.user_id > 0 {
            let home = home_shard(p.dev_id, p.user_id, self.shards);
            if home != self.id {
                self.hand_off(id, home, buf);
                return Http::Finished;
            }
        }
        self.open_comet(id, &req, p);
        Http::Upgraded(head_len)
    }

    /// Whether to accept permessage-deflate: offered acceptably, on, and the
    /// client is not one `--compression-exclude-ua` names.
    fn wants_deflate(&self, req: &ws::Request) -> Option<ws::deflate::Accepted> {
        let c = &self.shared.config;
        let ua = req.user_agent.as_deref().unwrap_or("");
        if !c.compression || c.compression_exclude_ua.iter().any(|s| ua.contains(s.as_str())) {
            return None;
        }
        let accepted = req.offers_deflate()?;
        ShardMetrics::add(&self.metrics.deflate_websockets, 1);
        Some(accepted)
    }

    /// Moves connection `id` and its unread bytes to shard `to`.
    fn hand_off(&mut self, id: ConnId, to: usize, bytes: &[u8]) {
        let Some(conn) = self.conns.get(id) else {
            return;
        };
        let peer = conn.peer.addr();
        // The I/O layer moves the socket (it holds it) and mails it on.
        self.forget_conn(id);
        ShardMetrics::add(&self.metrics.handoffs, 1);
        self.effects.push(Effect::HandOff { id, to, peer, head: bytes.to_vec() });
    }

    /// Completes the upgrade of a comet connection: `101`, `serverInfo`,
    /// then (authorized) the offline queue, then the URL's subscription.
    fn open_comet(&mut self, id: ConnId, req: &ws::Request, p: url::ConnectParams) {
        let now = self.unix;
        let server = concat!("comet ", env!("CARGO_PKG_VERSION"));
        let legacy = p.api_major.is_some_and(|m| m < 4);
        let deflate = self.wants_deflate(req);
        self.send_raw(id, req.upgrade_response(deflate));
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        conn.phase = Phase::Comet;
        conn.deflate = deflate.map_or(0, |d| d.window_bits());
        conn.rate = RateLimiter::new(self.shared.config.client_rate, self.now_ms);
        conn.dev_id = p.dev_id;
        conn.legacy = legacy;
        conn.user_id = 0;
        // X-Forwarded-For counts only from a configured trusted proxy, and
        // only when it is an address.
        let forwarded = req
            .forwarded_for
            .as_deref()
            .filter(|_| self.shared.config.trusted_proxies.contains(&conn.peer.ip()))
            .filter(|f| f.parse::<std::net::IpAddr>().is_ok());
        conn.info = ClientInfo::new(
            &p.uuid,
            req.origin.as_deref(),
            req.user_agent.as_deref(),
            req.accept_language.as_deref(),
            forwarded,
        );
        self.metrics.websockets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // This runs on the user's home shard (the connection was handed
        // over), so the key check and device registration are local.
        let authorized = p.api_major.is_some() && p.user_id > 0 && self.authorize(p.dev_id, p.user_id, &p.key);
        let key = if authorized { p.key.as_str() } else { "" };
        let url_subscription = !p.subscription.is_empty();
        let frame =
            encode_text_frame(|o| message::server_info(authorized, key, now, server, legacy, url_subscription, o));
        self.send_frame(id, frame);
        if p.api_major.is_none() {
            self.fatal(id, 418, "Invalid request Not assigned client api version");
            return;
        }
        if authorized {
            if let Some(c) = self.conns.get_mut(id) {
                c.user_id = p.user_id;
            }
            self.attach_device(id, p.dev_id, p.user_id);
        }
        // `subscription` in the URL: the command's rules, applied after the
        // key check (so `private_` follows the connection's identity), in
        // the same turn as the upgrade: no second wake-up for it. It is part
        // of the upgrade, not a command, so `--client-rate` does not meter it.
        if !p.subscription.is_empty() && self.conns.get(id).is_some_and(|c| c.phase == Phase::Comet) {
            self.cmd_subscribe(id, crate::frontend::channel_names(&p.subscription).collect());
        }
    }

    /// Sends a fatal `error` frame, then closes with 4000 + `code`.
    pub fn fatal(&mut self, id: ConnId, code: u16, text: &str) {
        let legacy = self.conns.get(id).is_some_and(|c| c.legacy);
        let frame = encode_text_frame(|o| message::fatal_error(code, text, self.unix, legacy, o));
        self.send_frame(id, frame);
        self.close_ws(id, CloseCode(4000 + code), text);
    }

    /// Sends a non-fatal `error` frame on `sys`.
    pub fn send_error(&mut self, id: ConnId, text: &str) {
        let legacy = self.conns.get(id).is_some_and(|c| c.legacy);
        let frame = encode_text_frame(|o| message::error(text, self.unix, legacy, o));
        self.send_frame(id, frame);
    }

    /// Decodes and handles WebSocket frames; returns bytes consumed.
    fn on_frames(&mut self, id: ConnId, buf: &mut [u8]) -> usize {
        let Some(conn) = self.conns.get_mut(id) else {
            return buf.len();
        };
        let max = self.shared.config.max_message_size;
        let mut decoder = Decoder::resume(max, conn.deflate > 0, std::mem::take(&mut conn.fragments));
        let mut pos = 0;
        loop {
            if buf.len() == pos {
                break;
            }
            match decoder.decode(&mut buf[pos..]) {
                Decoded::NeedMore => break,
                Decoded::Fragment { consumed } => pos += consumed,
                Decoded::Fail(code) => {
                    pos = buf.len();
                    self.close_ws(id, code, "");
                    break;
                }
                Decoded::Event { event, consumed } => {
                    pos += consumed;
                    let gone = match event {
                        Event::Message { text, compressed: true, payload } => {
                            let whole = decoder.take_assembled();
                            self.on_compressed(id, text, whole.as_deref().unwrap_or(payload))
                        }
                        Event::Message { text, compressed: false, payload } => {
                            if decoder.has_assembled() {
                                let whole = decoder.take_assembled().unwrap_or_default();
                                self.on_message(id, text, &whole)
                            } else {
                                self.on_message(id, text, payload)
                            }
                        }
                        Event::Ping(payload) => {
                            // A ping is a command too: a ping flood must not
                            // turn into a pong flood.
                            if self.admit_command(id, false) {
                                let mut f = Vec::with_capacity(payload.len() + 2);
                                ws::encode_frame(ws::Opcode::Pong, payload, &mut f);
                                self.send_frame(id, f.into());
                            }
                            self.conns.get(id).is_none_or(|c| matches!(c.phase, Phase::Closing { .. }))
                        }
                        Event::Pong => false,
                        Event::Close { code } => {
                            let mut f = Vec::with_capacity(4);
                            match code {
                                Some(c) => ws::encode_close(CloseCode(c), "", &mut f),
                                None => ws::encode_frame(ws::Opcode::Close, &[], &mut f),
                            }
                            self.send_frame(id, f.into());
                            self.finish_after_flush(id, true);
                            pos = buf.len();
                            true
                        }
                    };
                    if gone {
                        break;
                    }
                }
            }
            if self.conns.get(id).is_none_or(|c| !matches!(c.phase, Phase::Comet | Phase::Echo)) {
                pos = buf.len();
                break;
            }
            if self.work >= WORK_PER_WAKE {
                // Enough fan-out for one turn: the rest stays buffered and
                // is handled after the other connections had theirs.
                break;
            }
        }
        let now = self.now;
        if let Some(conn) = self.conns.get_mut(id) {
            conn.fragments_since = match (decoder.has_assembled(), conn.fragments_since) {
                (false, _) => 0,
                (true, 0) => now.max(1),
                (true, t) => t,
            };
            conn.fragments = decoder.suspend();
        }
        pos
    }

    /// Applies `--client-rate` to one command of a comet connection (the
    /// echo endpoint, a conformance tool, is not metered). Returns whether
    /// to handle it; over the rate it is dropped, answered with one `error`
    /// frame a second (`tell`), and after 10 s of excess the connection is
    /// closed with 4029.
    fn admit_command(&mut self, id: ConnId, tell: bool) -> bool {
        let (rate, now_ms) = (self.shared.config.client_rate, self.now_ms);
        let Some(conn) = self.conns.get_mut(id) else {
            return false;
        };
        if conn.phase != Phase::Comet {
            return true;
        }
        match conn.rate.check(rate, now_ms) {
            RateVerdict::Allow => true,
            RateVerdict::Drop { tell: first } => {
                conn.throttled = true;
                ShardMetrics::add(&self.metrics.rate_limited, 1);
                if first && tell {
                    let text =
                        format!("rate limit: at most {rate} commands per second (burst {}); command dropped", 2 * rate);
                    self.send_error(id, &text);
                }
                false
            }
            RateVerdict::Close => {
                ShardMetrics::add(&self.metrics.rate_limited, 1);
                ShardMetrics::add(&self.metrics.rate_limit_closes, 1);
                self.close_ws(id, CLOSE_RATE_LIMIT, "rate limit exceeded");
                false
            }
        }
    }

    /// A compressed client message: inflated with the shard's inflater,
    /// held to `--max-message-size` (1009) and, for text, to UTF-8 (1007).
    /// Returns true when the connection closed.
    fn on_compressed(&mut self, id: ConnId, text: bool, deflated: &[u8]) -> bool {
        use ws::deflate::InflateError;
        let max = self.shared.config.max_message_size;
        let mut out = std::mem::take(&mut self.inflated);
        let result = self.inflater.inflate(deflated, max, &mut out);
        ShardMetrics::add(&self.metrics.inflated_messages, 1);
        let gone = match result {
            Err(InflateError::TooBig) => {
                self.close_ws(id, CloseCode::TOO_BIG, "message too big");
                true
            }
            Err(InflateError::Invalid) => {
                self.close_ws(id, CloseCode::INVALID_PAYLOAD, "invalid deflate data");
                true
            }
            Ok(()) if text && std::str::from_utf8(&out).is_err() => {
                self.close_ws(id, CloseCode::INVALID_PAYLOAD, "");
                true
            }
            Ok(()) => self.on_message(id, text, &out),
        };
        // Keep the buffer for the next message, but not a big one.
        out.clear();
        if out.capacity() > 64 * 1024 {
            out = Vec::new();
        }
        self.inflated = out;
        gone
    }

    /// One complete client message. Returns true when the connection closed.
    fn on_message(&mut self, id: ConnId, text: bool, payload: &[u8]) -> bool {
        ShardMetrics::add(&self.metrics.messages_in, 1);
        super::panic_on_test_marker(payload);
        if !self.admit_command(id, true) {
            return self.conns.get(id).is_none_or(|c| matches!(c.phase, Phase::Closing { .. }));
        }
        let Some(conn) = self.conns.get(id) else {
            return true;
        };
        if conn.phase == Phase::Echo {
            let mut f = Vec::with_capacity(payload.len() + 10);
            ws::encode_frame(if text { ws::Opcode::Text } else { ws::Opcode::Binary }, payload, &mut f);
            self.send_frame(id, f.into());
            return false;
        }
        let Ok(body) = std::str::from_utf8(payload) else {
            self.send_error(id, "Binary command is not valid UTF-8 text");
            return false;
        };
        self.on_command(id, command::parse(body));
        self.conns.get(id).is_none()
    }

    fn on_command(&mut self, id: ConnId, cmd: Command<'_>) {
        let asks = matches!(
            cmd,
            Command::WebPipe { .. }
                | Command::PipeLog { .. }
                | Command::PipeCount { .. }
                | Command::TrackPipeUsers { .. }
                | Command::UserStatus { .. }
                | Command::UserData { .. }
        );
        if asks && !self.may_ask(id) {
            let max = self.shared.config.max_pending;
            self.send_error(id, &format!("too many requests waiting for answers (at most {max}); command dropped"));
            return;
        }
        match cmd {
            Command::Subscribe(names) => self.cmd_subscribe(id, names),
            Command::WebPipe { pipe, event, message } => self.cmd_web_pipe(id, pipe, event, message),
            Command::PipeLog { pipe, marker } => {
                if !is_valid_channel(pipe) {
                    self.send_error(id, &format!("Invalid channel name {}", clip(pipe)));
                    return;
                }
                let dev_id = self.conns.get(id).map_or(0, |c| c.dev_id);
                let then = Then::PipeLog { conn: id, pipe: pipe.to_string(), marker: marker.to_string() };
                self.ask_all(dev_id, Query::Log(Arc::from(pipe)), then);
            }
            Command::PipeCount { pipe, marker } => {
                if !(pipe.starts_with("web_") || pipe.starts_with("track_")) || !is_valid_channel(pipe) {
                    self.send_error(
                        id,
                        &format!("pipe_count is only allowed for web_ and track_ channels, not {}", clip(pipe)),
                    );
                    return;
                }
                let dev_id = self.conns.get(id).map_or(0, |c| c.dev_id);
                if let Some(e) = self.cluster_down() {
                    self.send_error(id, &e);
                    return;
                }
                let remote = self.cluster_count(dev_id, pipe);
                self.ask_all(
                    dev_id,
                    Query::Count(Arc::from(pipe)),
                    Then::PipeCount { conn: id, marker: marker.to_string(), remote },
                );
            }
            Command::TrackPipeUsers { pipe, marker } => {
                if !pipe.starts_with("track_") || !is_valid_channel(pipe) {
                    self.send_error(
                        id,
                        &format!("track_pipe_users is only allowed for track_ channels, not {}", clip(pipe)),
                    );
                    return;
                }
                let dev_id = self.conns.get(id).map_or(0, |c| c.dev_id);
                self.ask_all(
                    dev_id,
                    Query::Members(Arc::from(pipe)),
                    Then::TrackUsers { conn: id, marker: marker.to_string() },
                );
            }
            Command::UserStatus { user_id } => {
                let Some(uid) = user_id.trim().parse::<u64>().ok().filter(|&u| u > 0) else {
                    self.send_error(id, &format!("user_status needs a user id, got {}", clip(user_id)));
                    return;
                };
                let dev_id = self.conns.get(id).map_or(0, |c| c.dev_id);
                let home = home_shard(dev_id, uid, self.shards);
                let q = Query::User(crate::users::UserQuery::Status(uid));
                self.ask_shards(&[home], dev_id, q, Then::UserStatus { conn: id, user_id: uid });
            }
            Command::UserData { marker, user_id } => {
                let Some(uid) = user_id.trim().parse::<u64>().ok().filter(|&u| u > 0) else {
                    self.send_error(id, &format!("user_data needs a user id, got {}", clip(user_id)));
                    return;
                };
                let Some(c) = self.conns.get(id) else { return };
                let dev_id = c.dev_id;
                if c.user_id != uid && !self.shared.config.public_user_data.contains(&dev_id) {
                    self.send_error(id, "user_data is only available for your own user id");
                    return;
                }
                let home = home_shard(dev_id, uid, self.shards);
                let q = Query::User(crate::users::UserQuery::Data(uid));
                let then = Then::UserData { conn: id, user_id: uid, marker: marker.to_string() };
                self.ask_shards(&[home], dev_id, q, then);
            }
            Command::Statistics => {}
            Command::Unknown(word) => {
                self.send_error(id, &format!("Unknown command {}", clip(word)));
            }
        }
    }

    fn cmd_subscribe(&mut self, id: ConnId, names: Vec<&str>) {
        let Some(conn) = self.conns.get(id) else {
            return;
        };
        let (dev_id, anonymous) = (conn.dev_id, conn.user_id == 0);
        let max = self.shared.config.max_subscriptions;
        let mut wanted: SmallVec<[&str; 8]> = SmallVec::new();
        let mut errors: Vec<String> = Vec::new();
        let (mut refused, mut over_limit) = (0usize, false);
        for name in names {
            if name == "msg" || wanted.contains(&name) {
                continue;
            }
            if !(2..=64).contains(&name.len()) {
                refused += 1;
                if errors.len() < MAX_NAME_ERRORS {
                    errors.push(format!("Invalid channel name {}: it must be 2..64 characters", clip(name)));
                }
                continue;
            }
            if name == "sys" || name.starts_with("_answer") {
                refused += 1;
                if errors.len() < MAX_NAME_ERRORS {
                    errors.push(format!("Channel '{name}' is for server replies only"));
                }
                continue;
            }
            if anonymous && name.starts_with("private_") {
                continue;
            }
            if wanted.len() >= max {
                over_limit = true;
                continue;
            }
            wanted.push(name);
        }
        if refused > errors.len() {
            errors.push(format!("{} more refused channel names were ignored", refused - errors.len()));
        }
        if over_limit {
            errors.push(format!("Too many channels: at most {max} per connection; the rest were ignored"));
        }
        // Leave what is no longer wanted, join what is new: a channel kept
        // across the re-subscription emits no presence events.
        let current: SmallVec<[(u32, Arc<str>); 4]> = conn
            .subs
            .iter()
            .filter_map(|&(ch, _)| self.channels[ch as usize].as_ref().map(|c| (ch, c.name.clone())))
            .collect();
        let mut announced = 0u32;
        for (ch, name) in &current {
            if !wanted.contains(&&**name) {
                self.leave(id, *ch, name);
                announced += name.starts_with("track_") as u32;
            }
        }
        for name in wanted {
            if current.iter().all(|(_, n)| &**n != name) && self.subscribe(id, dev_id, name) {
                self.presence_event(id, dev_id, name, "subscription");
                announced += name.starts_with("track_") as u32;
            }
        }
        // Each presence event goes to every member of its channel: a
        // command that joins and leaves many `track_` channels costs a
        // command per event, so that toggling them is held to
        // --client-rate events a second, not commands.
        if announced > 0 {
            let (rate, now_ms) = (self.shared.config.client_rate, self.now_ms);
            if let Some(c) = self.conns.get_mut(id) {
                c.rate.charge(announced, rate, now_ms);
            }
        }
        for e in errors {
            self.send_error(id, &e);
        }
    }

    /// Unsubscribes and, for `track_` channels, tells the others.
    fn leave(&mut self, id: ConnId, ch: u32, name: &str) {
        let dev_id = self.conns.get(id).map_or(0, |c| c.dev_id);
        self.unsubscribe(id, ch);
        self.presence_event(id, dev_id, name, "unsubscription");
    }

    fn presence_event(&mut self, id: ConnId, dev_id: u32, channel: &str, event: &str) {
        if !channel.starts_with("track_") {
            return;
        }
        let Some(conn) = self.conns.get(id) else {
            return;
        };
        let msg = ChannelMessage {
            pipe: channel.to_string(),
            event: event.to_string(),
            data: message::presence_data(conn.user_id, conn.info.uuid()),
            data_is_json: true,
            time: Some(self.unix),
            user_id: None,
        };
        self.publish(Publication::new(dev_id, msg, Some((self.id, id))), None);
    }

    fn cmd_web_pipe(&mut self, id: ConnId, pipe: &str, event: &str, text: &str) {
        let Some(conn) = self.conns.get(id) else {
            return;
        };
        let (dev_id, user_id) = (conn.dev_id, conn.user_id);
        let (pipe, hide) = match pipe.strip_prefix('@') {
            Some(p) if p.starts_with("web_") => (p, true),
            _ => (pipe, false),
        };
        if pipe.starts_with("webauth_") {
            if user_id == 0 {
                self.send_error(id, &format!("Only authorized users may publish to {}", clip(pipe)));
                return;
            }
        } else if !pipe.starts_with("web_") {
            self.send_error(id, "Invalid channel name. The channel should begin with web_");
            return;
        }
        if !is_valid_channel(pipe) {
            self.send_error(id, &format!("Invalid channel name {}: 2..64 characters of A-Za-z0-9_-", clip(pipe)));
            return;
        }
        // The same bound as CometQL's (the stored history keeps an event
        // name's length in two bytes).
        if event.len() > MAX_EVENT_NAME {
            self.send_error(id, &format!("Event name {} is longer than {MAX_EVENT_NAME} characters", clip(event)));
            return;
        }
        if !self.channel_rates.admit(dev_id, pipe, self.now_ms) {
            ShardMetrics::add(&self.metrics.channel_rate_limited, 1);
            let rate = self.shared.config.channel_rate;
            self.send_error(
                id,
                &format!(
                    "rate limit: channel {pipe} takes at most {rate} messages per second from browsers; message dropped"
                ),
            );
            return;
        }
        let msg = ChannelMessage {
            pipe: pipe.to_string(),
            event: event.to_string(),
            data: text.to_string(),
            data_is_json: false,
            time: Some(self.unix),
            user_id: Some(if hide { 0 } else { user_id }),
        };
        let p = Publication::new(dev_id, msg, Some((self.id, id)));
        if p.wire_len() > self.shared.config.max_outbound_message {
            self.send_error(
                id,
                &format!(
                    "Message too long: {} bytes, at most {}",
                    p.wire_len(),
                    self.shared.config.max_outbound_message
                ),
            );
            return;
        }
        if let Some(e) = self.cluster_down() {
            self.send_error(id, &e);
            return;
        }
        let then = Then::DeliveryReport { conn: id, pipe: pipe.to_string(), message: text.to_string() };
        self.publish(p, Some(then));
    }

    /// Runs the continuation of a question every shard has answered.
    pub fn complete(&mut self, p: Pending) {
        let now = self.unix;
        match p.then {
            Then::DeliveryReport { conn, pipe, message } => {
                let Some(c) = self.conns.get(conn) else {
                    return;
                };
                let legacy = c.legacy;
                let f = encode_text_frame(|o| message::delivery_report(&pipe, &message, p.count, now, legacy, o));
                self.send_frame(conn, f);
            }
            Then::PipeCount { conn, marker, remote } => {
                let Some(c) = self.conns.get(conn) else {
                    return;
                };
                let legacy = c.legacy;
                let f = encode_text_frame(|o| message::pipe_count(p.count + remote, &marker, now, legacy, o));
                self.send_frame(conn, f);
            }
            Then::TrackUsers { conn, marker } => {
                let Some(c) = self.conns.get(conn) else {
                    return;
                };
                if let Some(why) = p.remote_failed {
                    self.send_error(conn, &format!("track_pipe_users: {why}; retry later"));
                    return;
                }
                let legacy = c.legacy;
                let f = encode_text_frame(|o| message::track_users(&p.members, &marker, now, legacy, o));
                self.send_frame(conn, f);
            }
            Then::PipeLog { conn, pipe, marker } => {
                let Some(c) = self.conns.get(conn) else { return };
                let legacy = c.legacy;
                // A history can hold more than a connection may have queued
                // (1000 messages of up to --max-outbound-message): sent
                // whole, it closed the asker as a slow consumer every time.
                // The newest that fit in half of --outbound-limit, less
                // what already waits for the socket, go, as an offline
                // queue does; they are encoded newest first, and no further
                // than the budget.
                let mut budget = (self.shared.config.outbound_limit / 2).saturating_sub(c.out.cost());
                let mut frames: Vec<Arc<[u8]>> = Vec::new();
                for e in p.log.into_iter().rev() {
                    let msg = ChannelMessage {
                        pipe: pipe.clone(),
                        event: e.event,
                        data: e.message,
                        data_is_json: false,
                        time: Some(e.time),
                        user_id: e.user_id,
                    };
                    let d = message::Delivery { legacy, history_marker: Some(&marker), from_queue: false };
                    let f = encode_text_frame(|o| msg.encode(d, o));
                    let Some(left) = budget.checked_sub(OutQueue::cost_of(&f)) else { break };
                    budget = left;
                    frames.push(f);
                }
                for f in frames.into_iter().rev() {
                    self.send_frame(conn, f);
                }
            }
            Then::UserStatus { conn, user_id } => self.answer_user_status(conn, user_id, p.records),
            Then::UserData { conn, user_id, marker } => self.answer_user_data(conn, user_id, &marker, p.records),
            Then::Sql { conn, slot, index, then } => match p.failed {
                Some(cause) => self.sql_failed(conn, slot, index, &cause),
                None if p.remote_failed.is_some() => {
                    let why = p.remote_failed.unwrap_or_default();
                    self.sql_cluster_failed(conn, slot, index, &why);
                }
                None => self.sql_complete(conn, slot, index, then, p.count, p.counts, p.records, p.charge),
            },
        }
    }

    /// Queues a frame for one connection (not a fan-out).
    pub fn send_frame(&mut self, id: ConnId, frame: Arc<[u8]>) {
        let limit = self.shared.config.outbound_limit;
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        if matches!(conn.phase, Phase::Closing { .. }) {
            return;
        }
        if conn.out.cost() + OutQueue::cost_of(&frame) > limit && matches!(conn.phase, Phase::Comet | Phase::Echo) {
            self.close_slow_consumer(id);
            return;
        }
        ShardMetrics::add(&self.metrics.messages_out, 1);
        // Connections that negotiated permessage-deflate get big data frames
        // (echo, history, answers) compressed here, one frame at a time.
        let z = match conn.deflate {
            0 => None,
            w if conn.phase == Phase::Echo => self.deflater.frame_every(&frame, w),
            w if ws::deflate::fits_window(frame.len(), w) => self.deflater.frame(&frame),
            _ => None,
        };
        let frame = match z {
            Some(z) => {
                ShardMetrics::add(&self.metrics.deflated_frames, 1);
                ShardMetrics::add(&self.metrics.deflate_bytes_saved, frame.len().saturating_sub(z.len()) as u64);
                z.into()
            }
            None => frame,
        };
        if conn.push_now(frame) {
            self.dirty.push(id);
        }
    }

    /// Queues bytes that are not a WebSocket frame (HTTP, MySQL packets).
    pub fn send_raw_bytes(&mut self, id: ConnId, bytes: Vec<u8>) {
        self.send_raw(id, bytes);
    }

    /// Closes a connection once its queued answer is written.
    pub fn close_after_answer(&mut self, id: ConnId) {
        self.finish_after_flush(id, true);
    }

    fn send_raw(&mut self, id: ConnId, bytes: Vec<u8>) {
        // A backend client whose answers pass the bound of unread answers
        // is not read until they are written (`may_read`), and is
        // disconnected if that lasts (`tick`). The answer itself is queued
        // whole: it is built already (one gather of rows at a time, each
        // within the bound), and a client that reads must get it.
        let (sql_limit, now) = (self.sql_answer_limit(), self.now);
        let Some(conn) = self.conns.get_mut(id) else { return };
        let cost = OutQueue::cost_of(&bytes);
        if let Some(sc) = conn.sql.as_deref_mut() {
            sc.queued += cost as u64;
            if conn.phase == Phase::Sql && conn.out.cost() + cost > sql_limit {
                sc.over_since.get_or_insert(now);
            }
        }
        if conn.push_now(bytes.into()) {
            self.dirty.push(id);
        }
    }

    /// Answers a plain HTTP request and closes once it is written.
    fn answer_http(&mut self, id: ConnId, resp: Vec<u8>) {
        self.send_raw(id, resp);
        self.finish_after_flush(id, false);
    }

    /// Marks the connection as closing: no more messages; after the queue
    /// drains the write side is shut; `drop_now` drops it right after.
    pub(super) fn finish_after_flush(&mut self, id: ConnId, drop_now: bool) {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        let was_ws = matches!(conn.phase, Phase::Comet | Phase::Echo);
        conn.phase = Phase::Closing { deadline: now + CLOSE_TIMEOUT, drop_when_flushed: drop_now };
        let subs: SmallVec<[(u32, u32); 2]> = conn.subs.clone();
        if was_ws {
            self.metrics.websockets.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.leave_all(id, &subs);
        self.detach_device(id);
        // Written now: with an empty queue to shut the write side, with
        // frames held for a `--write-delay` window to send them first.
        if self.conns.get_mut(id).is_some_and(|c| c.end_window() | c.out_is_empty()) {
            self.dirty.push(id);
        }
    }

    fn leave_all(&mut self, id: ConnId, subs: &[(u32, u32)]) {
        for &(ch, _) in subs {
            if let Some(name) = self.channels[ch as usize].as_ref().map(|c| c.name.clone()) {
                self.leave(id, ch, &name);
            }
        }
    }

    /// Closes a WebSocket with a close frame carrying `code`.
    pub fn close_ws(&mut self, id: ConnId, code: CloseCode, reason: &str) {
        let Some(conn) = self.conns.get(id) else {
            return;
        };
        if !matches!(conn.phase, Phase::Comet | Phase::Echo) {
            return;
        }
        let mut f = Vec::with_capacity(4 + reason.len());
        ws::encode_close(code, reason, &mut f);
        self.send_raw(id, f);
        self.finish_after_flush(id, false);
    }

    /// Closes a connection whose input handling panicked (a bug, logged by
    /// the panic hook): a WebSocket gets 1011 after the frame being written,
    /// anything else is dropped, and either is counted. The connection goes
    /// now rather than when the heartbeat sweep finds it unread. What the
    /// handler changed before the panic stays as it was left; the one
    /// piece of shard state a panic can take away, the change lists that
    /// the user and history stores lend out while they work, is put back,
    /// so that the shard goes on recording changes for the store.
    pub fn close_after_panic(&mut self, id: ConnId) {
        ShardMetrics::add(&self.metrics.handler_panics, 1);
        if self.store.is_some() {
            self.users.journal.get_or_insert_with(Vec::new);
            self.history.journal.get_or_insert_with(Vec::new);
        }
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        if !matches!(conn.phase, Phase::Comet | Phase::Echo) {
            self.drop_conn(id);
            return;
        }
        conn.out.drop_unstarted();
        let mut f = Vec::with_capacity(20);
        ws::encode_close(CloseCode::INTERNAL_ERROR, "internal error", &mut f);
        self.send_raw(id, f);
        self.finish_after_flush(id, true);
    }

    /// Disconnects a backend client that did not read its answers.
    fn unread_answers_close(&mut self, id: ConnId) {
        let Some(peer) = self.conns.get(id).map(|c| c.peer) else { return };
        // One line a minute per shard at most: a client must not be able
        // to fill the log by being disconnected over and over.
        let now = self.now;
        if self.unread_log_at.is_none_or(|t| now >= t + 60) {
            eprintln!(
                "comet: shard {}: backend client {peer} (CometQL or HTTP API) does not read its answers; disconnecting (others are counted in comet_unread_answer_closes_total)",
                self.id
            );
            self.unread_log_at = Some(now);
        }
        ShardMetrics::add(&self.metrics.unread_answer_closes, 1);
        self.drop_conn(id);
    }

    /// Closes a connection whose queue went over the bound (4008).
    pub fn close_slow_consumer(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        if !matches!(conn.phase, Phase::Comet | Phase::Echo) {
            return;
        }
        ShardMetrics::add(&self.metrics.slow_consumer_closes, 1);
        // Drop what is queued but not started; a half-written frame must be
        // finished first or the close frame would corrupt the stream.
        conn.out.drop_unstarted();
        self.close_ws(id, CloseCode::SLOW_CONSUMER, "slow consumer");
    }

    /// Removes a connection entirely: leaves channels, closes the socket.
    pub fn drop_conn(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get(id) else {
            return;
        };
        let (counted, refusing, ip) = (conn.counted, conn.refusing, conn.peer.ip());
        if counted {
            self.shared.conn_counts.release(ip);
        }
        if refusing {
            self.refusing -= 1;
        }
        // A task waiting to be allowed to read must see that it is gone.
        self.unpause();
        let Some(conn) = self.conns.get(id) else {
            return;
        };
        if conn.sql.is_some() {
            self.shared.backend_conns.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            self.metrics.sql_connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            self.backends.retain(|&b| b != id);
        }
        if matches!(conn.phase, Phase::Comet | Phase::Echo) {
            self.metrics.websockets.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        let subs = conn.subs.clone();
        self.leave_all(id, &subs);
        self.detach_device(id);
        // The I/O layer shuts the socket, which ends its task.
        self.effects.push(Effect::Close(id));
        self.forget_conn(id);
    }

    /// Removes the connection from the slab without touching the socket
    /// beyond dropping this shard's handle (hand-off keeps a duplicate).
    fn forget_conn(&mut self, id: ConnId) {
        if self.conns.remove(id).is_some() {
            self.metrics.connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Connection `id`'s queue was written out. A closing connection then
    /// has its write side shut (returns true), and is dropped if it asked to be.
    pub fn flushed(&mut self, id: ConnId) -> bool {
        let Some(conn) = self.conns.get(id) else {
            return false;
        };
        match conn.phase {
            Phase::Closing { drop_when_flushed, .. } => {
                if drop_when_flushed {
                    self.drop_conn(id);
                } else {
                    // A lingering HTTP API close: its answer is out.
                    self.sql_recharge(id);
                }
                true
            }
            // A backend connection held for its answers is read again, and
            // what they took of the answer memory is free.
            Phase::Sql => {
                if let Some(sc) = self.conns.get_mut(id).and_then(|c| c.sql.as_deref_mut()) {
                    sc.stalled = None;
                    if sc.over_since.take().is_some() {
                        self.unpause();
                    }
                }
                self.sql_recharge(id);
                false
            }
            _ => false,
        }
    }

    /// Heartbeats, handshake, message and close deadlines; the I/O layer
    /// calls it about once a second, after [`ShardCore::set_clock`].
    pub fn tick(&mut self) {
        self.purge_queues();
        let now = self.now;
        let interval = self.shared.config.ping_interval.as_secs() as u32;
        let timeout = self.shared.config.ping_timeout.as_secs() as u32;
        let message_timeout = self.shared.config.message_timeout.as_secs() as u32;
        let sql_limit = self.sql_answer_limit();
        for id in self.conns.ids() {
            // Input held while the shard does not read the connection
            // (answers it waits for, congested mail) is not the client's delay.
            let reading = self.may_read(id);
            let Some(conn) = self.conns.get_mut(id) else {
                continue;
            };
            // A frame, head or packet that started must finish in time: one
            // byte every few seconds must not pin a buffer forever.
            let started = conn.inbuf.since().or((conn.fragments_since > 0).then_some(conn.fragments_since));
            if started.is_some_and(|t| now.saturating_sub(t) >= message_timeout) && conn.keeps_input() && reading {
                ShardMetrics::add(&self.metrics.message_timeouts, 1);
                conn.inbuf.clear();
                match conn.phase {
                    Phase::Comet | Phase::Echo => self.close_ws(id, CloseCode::POLICY, "message timeout"),
                    _ => self.drop_conn(id),
                }
                continue;
            }
            if conn.phase == Phase::Sql
                && let Some(sc) = conn.sql.as_deref_mut()
            {
                // The answer memory cannot take one more connection's
                // worth: answers left unread are the ones to reclaim. Read
                // for each connection, as closing one may have freed enough.
                let short = self.shared.answers.room() < sql_limit;
                let cost = conn.out.cost();
                // What the peer received: what the socket took (whole
                // frames, and the front one's written part) less what its
                // kernel still holds. Saturating: bytes queued before the
                // connection was a backend one are not in `queued`.
                let read = (sc.queued.saturating_sub(cost as u64) + conn.out.front_written() as u64)
                    .saturating_sub(sc.kernel_unsent);
                let stalled = match sc.stalled {
                    _ if !short || cost == 0 => {
                        sc.stalled = None;
                        false
                    }
                    Some((since, from)) if read < from + super::sql::STALL_PROGRESS => {
                        now.saturating_sub(since) >= message_timeout
                    }
                    // It read enough since: a new spell counts from now.
                    _ => {
                        sc.stalled = Some((now, read));
                        false
                    }
                };
                if stalled {
                    self.unread_answers_close(id);
                    continue;
                }
            }
            match conn.phase {
                Phase::Http if now.saturating_sub(conn.opened) >= HANDSHAKE_TIMEOUT.min(message_timeout) => {
                    self.drop_conn(id)
                }
                // A backend client that has not logged in within the
                // handshake time is dropped, like a silent browser.
                Phase::Sql
                    if now.saturating_sub(conn.opened) >= HANDSHAKE_TIMEOUT
                        && conn.sql.as_ref().is_some_and(|s| s.logging_in()) =>
                {
                    self.drop_conn(id)
                }
                // A backend client that leaves the bound of unread answers
                // queued for --message-timeout does not read them.
                Phase::Sql
                    if conn
                        .sql
                        .as_ref()
                        .and_then(|s| s.over_since)
                        .is_some_and(|t| now.saturating_sub(t) >= message_timeout) =>
                {
                    if conn.out.cost() > sql_limit {
                        self.unread_answers_close(id);
                    } else if let Some(sc) = conn.sql.as_deref_mut() {
                        // Under the bound again (still writing): a new spell
                        // over it counts from its own start.
                        sc.over_since = None;
                    }
                }
                // An HTTP API connection that keeps nothing waiting (no
                // request started, no answer owed) is closed after a while.
                Phase::Sql if now.saturating_sub(conn.last_rx) >= super::api::IDLE_TIMEOUT && conn.idle_http() => {
                    self.drop_conn(id)
                }
                Phase::Closing { deadline, .. } if now >= deadline => self.drop_conn(id),
                Phase::Comet | Phase::Echo => match conn.ping_sent {
                    t if t != 0 && now.saturating_sub(t) >= timeout => {
                        ShardMetrics::add(&self.metrics.heartbeat_closes, 1);
                        self.close_ws(id, CloseCode::HEARTBEAT_TIMEOUT, "no answer to ping");
                    }
                    0 if now.saturating_sub(conn.last_rx) >= interval => {
                        conn.ping_sent = now.max(1);
                        let mut f = Vec::with_capacity(2);
                        ws::encode_frame(ws::Opcode::Ping, &[], &mut f);
                        self.send_frame(id, f.into());
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }

    /// Starts a graceful shutdown (the I/O layer stops accepting): close
    /// every WebSocket with 1001, drop connections still reading a request,
    /// answer what backends asked, then close them.
    pub fn begin_shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        for id in self.conns.ids() {
            match self.conns.get(id).map(|c| c.phase) {
                Some(Phase::Comet | Phase::Echo) => self.close_ws(id, CloseCode::GOING_AWAY, "server shutting down"),
                Some(Phase::Http) => self.drop_conn(id),
                // An HTTP API connection that is owed nothing just goes.
                Some(Phase::Sql) if self.conns.get(id).is_some_and(|c| c.idle_http()) => self.drop_conn(id),
                // Answer what was asked, then close.
                Some(Phase::Sql) => self.sql_push_raw(id, Vec::new(), true),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{ClientInfo, Conn};

    #[test]
    fn client_info_keeps_five_fields_in_one_allocation() {
        let i = ClientInfo::new("u-1", Some("https://a.example"), None, Some("de\0-DE"), None);
        assert_eq!((i.uuid(), i.origin(), i.user_agent(), i.language()), ("u-1", "https://a.example", "", "de-DE"));
        assert_eq!(i.forwarded_ip(), None);
        assert_eq!(ClientInfo::new("a\0b", None, None, None, Some("203.0.113.9")).forwarded_ip(), Some("203.0.113.9"));
        assert_eq!(ClientInfo::new("a\0b", None, None, None, None).uuid(), "ab");
        assert_eq!(ClientInfo::default().uuid(), "");
    }

    /// Every idle connection carries a `Conn`: growing it is a decision
    /// to make here, against the idle-memory figures in bench/RESULTS.md.
    #[test]
    fn conn_stays_within_its_budget() {
        assert!(std::mem::size_of::<Conn>() <= 208, "Conn is {} bytes", std::mem::size_of::<Conn>());
    }
}
