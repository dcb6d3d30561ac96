//! One frontend connection: its state, and the shard's handlers for it.
//!
//! A connection starts in [`Phase::Http`] reading a request head. A plain
//! HTTP request is answered and closed; a WebSocket upgrade moves it to
//! [`Phase::Comet`] (or [`Phase::Echo`] on the conformance endpoint). Reads go
//! through the shard's shared scratch buffer; `inbuf` holds bytes only while a
//! partial frame or head is pending. Output is a queue of shared frames
//! written with vectored writes; a queue over `outbound_limit` bytes closes the
//! connection with 4008 instead of growing.

use std::io::{IoSlice, Read};
use std::net::SocketAddr;
use std::sync::Arc;

use compio::driver::SharedFd;
use smallvec::SmallVec;
use socket2::Socket;

use super::mail::{Handoff, Publication, Query, encode_text_frame};
use super::{ConnId, Pending, Shard, Then, home_shard};
use crate::frontend::command::{self, Command};
use crate::frontend::message::{self, ChannelMessage, unix_now};
use crate::frontend::{is_valid_channel, url};
use crate::http;
use crate::metrics::ShardMetrics;
use crate::ws::{self, CloseCode, Decoder, Event, frame::Decoded};

/// Seconds a client has to send its request head.
const HANDSHAKE_TIMEOUT: u32 = 10;
/// Seconds a closing connection waits for the peer's close.
const CLOSE_TIMEOUT: u32 = 3;
/// Reads per readiness event before yielding to other connections.
const READS_PER_WAKE: usize = 8;

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
    /// Close sent (or HTTP answered); waiting for output to drain and the
    /// peer to go, until `deadline`.
    Closing { deadline: u32 },
}

/// Facts about the client kept for `users_in_pipes`: Origin, User-Agent,
/// Accept-Language and the address a trusted proxy forwarded for, in one
/// allocation (`\0`-separated), since every idle connection carries them and
/// four `String`s would cost four allocations and 96 bytes of headers. When
/// no proxy forwarded an address, the IP is `Conn::peer`'s.
#[derive(Debug)]
pub struct ClientInfo(Box<str>);

impl ClientInfo {
    pub fn new(origin: Option<&str>, user_agent: Option<&str>, language: Option<&str>, ip: Option<&str>) -> ClientInfo {
        let clean = |s: Option<&str>| s.unwrap_or("").replace('\0', "");
        let s = format!("{}\0{}\0{}\0{}", clean(origin), clean(user_agent), clean(language), clean(ip));
        ClientInfo(s.into_boxed_str())
    }

    /// The client address forwarded by a trusted proxy, if any.
    pub fn forwarded_ip(&self) -> Option<&str> {
        Some(self.field(3)).filter(|s| !s.is_empty())
    }

    fn field(&self, i: usize) -> &str {
        self.0.split('\0').nth(i).unwrap_or("")
    }

    pub fn origin(&self) -> &str {
        self.field(0)
    }

    pub fn user_agent(&self) -> &str {
        self.field(1)
    }

    pub fn language(&self) -> &str {
        self.field(2)
    }
}

/// One connection. Kept small: the idle budget is 1 KiB per connection.
pub struct Conn {
    pub sock: SharedFd<Socket>,
    pub phase: Phase,
    /// Bytes of a partial frame or request head; empty (no heap) otherwise.
    pub inbuf: Vec<u8>,
    pub decoder: Decoder,
    /// Frames waiting to be written, from `out[out_head]` on; the first may
    /// be partly written. One frame fits inline, so the usual fan-out (one
    /// message per subscriber per round) allocates nothing per subscriber.
    pub out: SmallVec<[Arc<[u8]>; 1]>,
    /// Index of the first unwritten frame in `out` (a queue without moves).
    pub out_head: u32,
    /// Bytes of `out[out_head]` already written.
    pub out_offset: u32,
    /// Bytes in `out` not yet written.
    pub out_bytes: usize,
    /// A writer task is waiting for the socket to become writable.
    pub writer_waiting: bool,
    /// After the output drains: shut down the write side (HTTP answers,
    /// close frames) and, with `drop_after_flush`, drop the connection.
    pub shutdown_after_flush: bool,
    pub drop_after_flush: bool,
    /// Channel subscriptions: (channel index, position in its list).
    pub subs: SmallVec<[(u32, u32); 2]>,
    /// 0 for anonymous connections.
    pub user_id: u64,
    pub dev_id: u32,
    pub uuid: Box<str>,
    /// API major version < 4: messages also carry `event_name`.
    pub legacy: bool,
    pub peer: SocketAddr,
    /// Shard time of the last byte received.
    pub last_rx: u32,
    /// Shard time a heartbeat ping was sent, if it is unanswered.
    pub ping_sent: Option<u32>,
    pub opened: u32,
    pub info: Option<ClientInfo>,
    /// The MySQL session of a backend connection.
    pub sql: Option<Box<super::sql::SqlConn>>,
}

impl Conn {
    fn new(sock: SharedFd<Socket>, peer: SocketAddr, now: u32, max_message: usize) -> Conn {
        Conn {
            sock,
            phase: Phase::Http,
            inbuf: Vec::new(),
            decoder: Decoder::new(max_message),
            out: SmallVec::new(),
            out_head: 0,
            out_offset: 0,
            out_bytes: 0,
            writer_waiting: false,
            shutdown_after_flush: false,
            drop_after_flush: false,
            subs: SmallVec::new(),
            user_id: 0,
            dev_id: 0,
            uuid: Box::from(""),
            legacy: false,
            peer,
            last_rx: now,
            ping_sent: None,
            opened: now,
            info: None,
            sql: None,
        }
    }

    /// Whether nothing waits to be written.
    pub fn out_is_empty(&self) -> bool {
        self.out_head as usize >= self.out.len()
    }

    /// Whether channel messages may still be queued to it.
    pub fn accepts_messages(&self) -> bool {
        self.phase == Phase::Comet
    }

    /// Queues a frame; returns true if the connection must be added to the
    /// dirty list (its queue was empty and no writer is waiting).
    pub fn push_out(&mut self, frame: Arc<[u8]>) -> bool {
        let was_idle = self.out_is_empty() && !self.writer_waiting;
        self.out_bytes += frame.len();
        self.out.push(frame);
        was_idle
    }
}

/// What the connection task should do after a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Wait for the next readable event.
    Continue,
    /// The connection is gone from the shard: stop.
    Gone,
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

/// Result of trying to write a connection's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    Done,
    Blocked,
    Gone,
}

impl Shard {
    /// Registers an accepted socket; returns its id and the fd for its task.
    pub fn on_accept(&mut self, sock: Socket, peer: SocketAddr) -> (ConnId, SharedFd<Socket>) {
        ShardMetrics::add(&self.metrics.accepted, 1);
        self.register(sock, peer)
    }

    /// Adds a socket to the shard (accepted here or handed over).
    fn register(&mut self, sock: Socket, peer: SocketAddr) -> (ConnId, SharedFd<Socket>) {
        let _ = sock.set_tcp_nodelay(true);
        let fd = SharedFd::new(sock);
        let conn = Conn::new(fd.clone(), peer, self.now, self.shared.config.max_message_size);
        let id = self.conns.insert(conn);
        self.metrics.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (id, fd)
    }

    /// Takes over a connection handed over by another shard (counted as
    /// accepted once, by the shard that accepted it).
    pub fn adopt(&mut self, h: Handoff) {
        let (id, fd) = self.register(h.sock, h.peer);
        let mut head = h.head;
        let flow = self.process(id, &mut head);
        if flow == Flow::Continue {
            compio::runtime::spawn(super::io::run_conn(id, fd)).detach();
        }
    }

    /// Reads what the socket has and handles it.
    pub fn on_readable(&mut self, id: ConnId) -> Flow {
        self.refresh_clock();
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut flow = Flow::Continue;
        for _ in 0..READS_PER_WAKE {
            let Some(conn) = self.conns.get_mut(id) else {
                flow = Flow::Gone;
                break;
            };
            let sock: &Socket = &conn.sock;
            match (&*sock).read(&mut scratch) {
                Ok(0) => {
                    self.drop_conn(id);
                    flow = Flow::Gone;
                    break;
                }
                Ok(n) => {
                    conn.last_rx = self.now;
                    conn.ping_sent = None;
                    if let Phase::Closing { .. } = conn.phase {
                        continue;
                    }
                    if conn.inbuf.is_empty() {
                        flow = self.process(id, &mut scratch[..n]);
                    } else {
                        let mut buf = std::mem::take(&mut conn.inbuf);
                        buf.extend_from_slice(&scratch[..n]);
                        flow = self.process(id, &mut buf);
                    }
                    if flow == Flow::Gone {
                        break;
                    }
                    if n < scratch.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.drop_conn(id);
                    flow = Flow::Gone;
                    break;
                }
            }
        }
        self.scratch = scratch;
        flow
    }

    /// Handles `buf` (bytes received, after any earlier pending bytes) and
    /// keeps an incomplete tail in the connection's `inbuf`.
    fn process(&mut self, id: ConnId, buf: &mut [u8]) -> Flow {
        let mut pos = 0;
        loop {
            let Some(conn) = self.conns.get(id) else {
                return Flow::Gone;
            };
            match conn.phase {
                Phase::Http => match self.on_http(id, &mut buf[pos..]) {
                    Http::Incomplete => {
                        let Some(conn) = self.conns.get_mut(id) else {
                            return Flow::Gone;
                        };
                        conn.inbuf.clear();
                        conn.inbuf.extend_from_slice(&buf[pos..]);
                        return Flow::Continue;
                    }
                    Http::Finished => {
                        return if self.conns.get(id).is_some() { Flow::Continue } else { Flow::Gone };
                    }
                    Http::Upgraded(n) => pos += n,
                },
                Phase::Comet | Phase::Echo => {
                    pos += self.on_frames(id, &mut buf[pos..]);
                    let Some(conn) = self.conns.get_mut(id) else {
                        return Flow::Gone;
                    };
                    conn.inbuf.clear();
                    if pos < buf.len() && matches!(conn.phase, Phase::Comet | Phase::Echo) {
                        conn.inbuf.extend_from_slice(&buf[pos..]);
                    } else if conn.inbuf.capacity() > 0 {
                        conn.inbuf = Vec::new();
                    }
                    return Flow::Continue;
                }
                Phase::Sql => {
                    pos += self.on_sql(id, &mut buf[pos..]);
                    let Some(conn) = self.conns.get_mut(id) else { return Flow::Gone };
                    conn.inbuf.clear();
                    if pos < buf.len() && conn.phase == Phase::Sql {
                        conn.inbuf.extend_from_slice(&buf[pos..]);
                    } else if conn.inbuf.capacity() > 0 {
                        conn.inbuf = Vec::new();
                    }
                    return Flow::Continue;
                }
                Phase::Closing { .. } => return Flow::Continue,
            }
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
            let msg = format!("origin '{}' is not allowed to connect", clip(origin));
            self.answer_http(id, http::forbidden(&msg));
            return Http::Finished;
        }
        if echo {
            self.send_raw(id, req.upgrade_response());
            if let Some(c) = self.conns.get_mut(id) {
                c.phase = Phase::Echo;
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

    /// Moves connection `id` and its unread bytes to shard `to`.
    fn hand_off(&mut self, id: ConnId, to: usize, bytes: &[u8]) {
        let Some(conn) = self.conns.get(id) else {
            return;
        };
        match conn.sock.try_clone() {
            Ok(dup) => {
                let head = bytes.to_vec();
                let peer = conn.peer;
                self.forget_conn(id);
                ShardMetrics::add(&self.metrics.handoffs, 1);
                self.outbox.send(to, super::mail::Mail::Handoff(Handoff { sock: dup, peer, head }));
                self.schedule_overflow_retry();
            }
            Err(e) => {
                eprintln!("comet: shard {}: cannot hand off {} to shard {to}: {e}", self.id, conn.peer);
                self.answer_http(id, http::unavailable("cannot hand off connection"));
            }
        }
    }

    /// Completes the upgrade of a comet connection: `101`, `serverInfo`.
    fn open_comet(&mut self, id: ConnId, req: &ws::Request, p: url::ConnectParams) {
        let now = unix_now();
        let server = concat!("comet ", env!("CARGO_PKG_VERSION"));
        let legacy = p.api_major.is_some_and(|m| m < 4);
        self.send_raw(id, req.upgrade_response());
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        conn.phase = Phase::Comet;
        conn.dev_id = p.dev_id;
        conn.legacy = legacy;
        conn.uuid = p.uuid.clone().into_boxed_str();
        conn.user_id = 0;
        // X-Forwarded-For counts only from a configured trusted proxy, and
        // only when it is an address.
        let forwarded = req
            .forwarded_for
            .as_deref()
            .filter(|_| self.shared.config.trusted_proxies.contains(&conn.peer.ip()))
            .filter(|f| f.parse::<std::net::IpAddr>().is_ok());
        conn.info = Some(ClientInfo::new(
            req.origin.as_deref(),
            req.user_agent.as_deref(),
            req.accept_language.as_deref(),
            forwarded,
        ));
        self.metrics.websockets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // This runs on the user's home shard (the connection was handed
        // over), so the key check and device registration are local.
        let authorized = p.api_major.is_some() && p.user_id > 0 && self.authorize(p.dev_id, p.user_id, &p.key);
        let key = if authorized { p.key.as_str() } else { "" };
        let frame = encode_text_frame(|o| message::server_info(authorized, key, now, server, legacy, o));
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
    }

    /// Sends a fatal `error` frame, then closes with 4000 + `code`.
    pub fn fatal(&mut self, id: ConnId, code: u16, text: &str) {
        let legacy = self.conns.get(id).is_some_and(|c| c.legacy);
        let frame = encode_text_frame(|o| message::fatal_error(code, text, unix_now(), legacy, o));
        self.send_frame(id, frame);
        self.close_ws(id, CloseCode(4000 + code), text);
    }

    /// Sends a non-fatal `error` frame on `sys`.
    pub fn send_error(&mut self, id: ConnId, text: &str) {
        let legacy = self.conns.get(id).is_some_and(|c| c.legacy);
        let frame = encode_text_frame(|o| message::error(text, unix_now(), legacy, o));
        self.send_frame(id, frame);
    }

    /// Decodes and handles WebSocket frames; returns bytes consumed.
    fn on_frames(&mut self, id: ConnId, buf: &mut [u8]) -> usize {
        let Some(conn) = self.conns.get_mut(id) else {
            return buf.len();
        };
        let mut decoder = std::mem::replace(&mut conn.decoder, Decoder::new(0));
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
                        Event::Message { text, payload } => {
                            if decoder.has_assembled() {
                                let whole = decoder.take_assembled().unwrap_or_default();
                                self.on_message(id, text, &whole)
                            } else {
                                self.on_message(id, text, payload)
                            }
                        }
                        Event::Ping(payload) => {
                            let mut f = Vec::with_capacity(payload.len() + 2);
                            ws::encode_frame(ws::Opcode::Pong, payload, &mut f);
                            self.send_frame(id, f.into());
                            false
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
        }
        if let Some(conn) = self.conns.get_mut(id) {
            conn.decoder = decoder;
        }
        pos
    }

    /// One complete client message. Returns true when the connection closed.
    fn on_message(&mut self, id: ConnId, text: bool, payload: &[u8]) -> bool {
        ShardMetrics::add(&self.metrics.messages_in, 1);
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
        match cmd {
            Command::Subscribe(names) => self.cmd_subscribe(id, names),
            Command::WebPipe { pipe, event, message } => self.cmd_web_pipe(id, pipe, event, message),
            Command::PipeLog { pipe, marker } => {
                if !is_valid_channel(pipe) {
                    self.send_error(id, &format!("Invalid channel name '{}'", clip(pipe)));
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
                        &format!("pipe_count is only allowed for web_ and track_ channels, not '{}'", clip(pipe)),
                    );
                    return;
                }
                let dev_id = self.conns.get(id).map_or(0, |c| c.dev_id);
                self.ask_all(
                    dev_id,
                    Query::Count(Arc::from(pipe)),
                    Then::PipeCount { conn: id, marker: marker.to_string() },
                );
            }
            Command::TrackPipeUsers { pipe, marker } => {
                if !pipe.starts_with("track_") || !is_valid_channel(pipe) {
                    self.send_error(
                        id,
                        &format!("track_pipe_users is only allowed for track_ channels, not '{}'", clip(pipe)),
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
                    self.send_error(id, &format!("user_status needs a user id, got '{}'", clip(user_id)));
                    return;
                };
                let dev_id = self.conns.get(id).map_or(0, |c| c.dev_id);
                let home = home_shard(dev_id, uid, self.shards);
                let q = Query::User(crate::users::UserQuery::Status(uid));
                self.ask_shards(&[home], dev_id, q, Then::UserStatus { conn: id, user_id: uid });
            }
            Command::UserData { marker, user_id } => {
                let Some(uid) = user_id.trim().parse::<u64>().ok().filter(|&u| u > 0) else {
                    self.send_error(id, &format!("user_data needs a user id, got '{}'", clip(user_id)));
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
                self.send_error(id, &format!("Unknown command '{}'", clip(word)));
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
        let mut over_limit = false;
        for name in names {
            if name == "msg" || wanted.contains(&name) {
                continue;
            }
            if !(2..=64).contains(&name.len()) {
                errors.push(format!("Invalid channel name '{}': it must be 2..64 characters", clip(name)));
                continue;
            }
            if name == "sys" || name.starts_with("_answer") {
                errors.push(format!("Channel '{name}' is for server replies only"));
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
        for (ch, name) in &current {
            if !wanted.contains(&&**name) {
                self.leave(id, *ch, name);
            }
        }
        for name in wanted {
            if current.iter().all(|(_, n)| &**n != name) && self.subscribe(id, dev_id, name) {
                self.presence_event(id, dev_id, name, "subscription");
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
            data: message::presence_data(conn.user_id, &conn.uuid),
            data_is_json: true,
            time: Some(unix_now()),
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
                self.send_error(id, &format!("Only authorized users may publish to '{}'", clip(pipe)));
                return;
            }
        } else if !pipe.starts_with("web_") {
            self.send_error(id, "Invalid channel name. The channel should begin with web_");
            return;
        }
        if !is_valid_channel(pipe) {
            self.send_error(id, &format!("Invalid channel name '{}': 2..64 characters of A-Za-z0-9_-", clip(pipe)));
            return;
        }
        let msg = ChannelMessage {
            pipe: pipe.to_string(),
            event: event.to_string(),
            data: text.to_string(),
            data_is_json: false,
            time: Some(unix_now()),
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
        let then = Then::DeliveryReport { conn: id, pipe: pipe.to_string(), message: text.to_string() };
        self.publish(p, Some(then));
    }

    /// Runs the continuation of a question every shard has answered.
    pub fn complete(&mut self, p: Pending) {
        let now = unix_now();
        match p.then {
            Then::DeliveryReport { conn, pipe, message } => {
                let Some(c) = self.conns.get(conn) else {
                    return;
                };
                let legacy = c.legacy;
                let f = encode_text_frame(|o| message::delivery_report(&pipe, &message, p.count, now, legacy, o));
                self.send_frame(conn, f);
            }
            Then::PipeCount { conn, marker } => {
                let Some(c) = self.conns.get(conn) else {
                    return;
                };
                let legacy = c.legacy;
                let f = encode_text_frame(|o| message::pipe_count(p.count, &marker, now, legacy, o));
                self.send_frame(conn, f);
            }
            Then::TrackUsers { conn, marker } => {
                let Some(c) = self.conns.get(conn) else {
                    return;
                };
                let legacy = c.legacy;
                let f = encode_text_frame(|o| message::track_users(&p.members, &marker, now, legacy, o));
                self.send_frame(conn, f);
            }
            Then::PipeLog { conn, pipe, marker } => {
                let Some(c) = self.conns.get(conn) else { return };
                let legacy = c.legacy;
                for e in p.log {
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
                    self.send_frame(conn, f);
                }
            }
            Then::UserStatus { conn, user_id } => self.answer_user_status(conn, user_id, p.rows),
            Then::UserData { conn, user_id, marker } => self.answer_user_data(conn, user_id, &marker, p.rows),
            Then::Sql { conn, slot, index, then } => {
                self.sql_complete(conn, slot, index, then, p.count, p.counts, p.rows);
            }
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
        if conn.out_bytes + frame.len() > limit && conn.phase == Phase::Comet {
            self.close_slow_consumer(id);
            return;
        }
        ShardMetrics::add(&self.metrics.messages_out, 1);
        if conn.push_out(frame) {
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
        // A CometQL client that pipelines answers it never reads gets a
        // generous bound (16x the browser one, and room for answers as big
        // as the largest query), then is disconnected.
        let c = &self.shared.config;
        let sql_limit = c.outbound_limit.saturating_mul(16).max(c.max_query_size.saturating_mul(4));
        let Some(conn) = self.conns.get_mut(id) else { return };
        if conn.phase == Phase::Sql && conn.out_bytes + bytes.len() > sql_limit {
            eprintln!(
                "comet: shard {}: CometQL client {} does not read its answers; disconnecting",
                self.id, conn.peer
            );
            self.drop_conn(id);
            return;
        }
        if conn.push_out(bytes.into()) {
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
    fn finish_after_flush(&mut self, id: ConnId, drop_now: bool) {
        let now = self.now;
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        let was_ws = matches!(conn.phase, Phase::Comet | Phase::Echo);
        conn.phase = Phase::Closing { deadline: now + CLOSE_TIMEOUT };
        conn.shutdown_after_flush = true;
        conn.drop_after_flush = drop_now;
        let subs: SmallVec<[(u32, u32); 2]> = conn.subs.clone();
        if was_ws {
            self.metrics.websockets.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.leave_all(id, &subs);
        self.detach_device(id);
        if self.conns.get(id).is_some_and(|c| c.out_is_empty()) {
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
        let front = if conn.out_offset > 0 { conn.out.get(conn.out_head as usize).cloned() } else { None };
        conn.out = SmallVec::new();
        conn.out_head = 0;
        conn.out_bytes = 0;
        if let Some(f) = front {
            conn.out_bytes = f.len() - conn.out_offset as usize;
            conn.out.push(f);
        }
        self.close_ws(id, CloseCode::SLOW_CONSUMER, "slow consumer");
    }

    /// Removes a connection entirely: leaves channels, closes the socket.
    pub fn drop_conn(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get(id) else {
            return;
        };
        if conn.sql.is_some() {
            self.metrics.sql_connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        if matches!(conn.phase, Phase::Comet | Phase::Echo) {
            self.metrics.websockets.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        let subs = conn.subs.clone();
        self.leave_all(id, &subs);
        self.detach_device(id);
        if let Some(conn) = self.conns.get(id) {
            // Wakes the connection's task (readable with EOF) so it ends.
            let _ = conn.sock.shutdown(std::net::Shutdown::Both);
        }
        self.forget_conn(id);
    }

    /// Removes the connection from the slab without touching the socket
    /// beyond dropping this shard's handle (hand-off keeps a duplicate).
    fn forget_conn(&mut self, id: ConnId) {
        if self.conns.remove(id).is_some() {
            self.metrics.connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Writes every connection that got output during this handler.
    pub fn flush_dirty(&mut self) {
        while !self.dirty.is_empty() {
            let mut dirty = std::mem::take(&mut self.dirty);
            for id in dirty.drain(..) {
                if self.flush(id) == Flush::Blocked
                    && let Some(conn) = self.conns.get_mut(id)
                    && !conn.writer_waiting
                {
                    conn.writer_waiting = true;
                    compio::runtime::spawn(super::io::run_writer(id, conn.sock.clone())).detach();
                }
            }
            // Keep the list's capacity: the next fan-out to as many
            // subscribers then grows nothing.
            if self.dirty.is_empty() {
                self.dirty = dirty;
            }
        }
    }

    /// Writes as much of the queue as the socket takes.
    pub fn flush(&mut self, id: ConnId) -> Flush {
        let Some(conn) = self.conns.get_mut(id) else {
            return Flush::Gone;
        };
        let mut written = 0u64;
        let mut failed = false;
        while !conn.out_is_empty() {
            let res = {
                let off = conn.out_offset as usize;
                let pending = &conn.out[conn.out_head as usize..];
                if pending.len() == 1 {
                    // The common fan-out case: one frame, a plain send
                    // (no iovec array to build and copy in).
                    conn.sock.send_with_flags(&pending[0][off..], libc::MSG_NOSIGNAL)
                } else {
                    let mut slices: SmallVec<[IoSlice<'_>; 64]> = SmallVec::new();
                    for (i, f) in pending.iter().take(64).enumerate() {
                        slices.push(IoSlice::new(if i == 0 { &f[off..] } else { &f[..] }));
                    }
                    conn.sock.send_vectored_with_flags(&slices, libc::MSG_NOSIGNAL)
                }
            };
            match res {
                Ok(mut n) => {
                    written += n as u64;
                    conn.out_bytes -= n;
                    while n > 0 {
                        let left = conn.out[conn.out_head as usize].len() - conn.out_offset as usize;
                        if n >= left {
                            n -= left;
                            conn.out_head += 1;
                            conn.out_offset = 0;
                        } else {
                            conn.out_offset += n as u32;
                            n = 0;
                        }
                    }
                    // Drop written frames now and then, so a long backlog
                    // neither keeps them alive nor grows without bound.
                    let head = conn.out_head as usize;
                    if head >= 32 && head * 2 >= conn.out.len() {
                        conn.out.drain(..head);
                        conn.out_head = 0;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    ShardMetrics::add(&self.metrics.bytes_out, written);
                    return Flush::Blocked;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            ShardMetrics::add(&self.metrics.bytes_out, written);
            self.drop_conn(id);
            return Flush::Gone;
        }
        ShardMetrics::add(&self.metrics.bytes_out, written);
        // Everything is written: an idle connection keeps no queue allocation.
        conn.out = SmallVec::new();
        conn.out_head = 0;
        if conn.shutdown_after_flush {
            conn.shutdown_after_flush = false;
            let _ = conn.sock.shutdown(std::net::Shutdown::Write);
            if conn.drop_after_flush {
                self.drop_conn(id);
                return Flush::Gone;
            }
        }
        Flush::Done
    }

    /// Heartbeats, handshake and close deadlines; runs about once a second.
    pub fn sweep(&mut self) {
        self.refresh_clock();
        self.purge_queues();
        let now = self.now;
        let interval = self.shared.config.ping_interval.as_secs() as u32;
        let timeout = self.shared.config.ping_timeout.as_secs() as u32;
        for id in self.conns.ids() {
            let Some(conn) = self.conns.get_mut(id) else {
                continue;
            };
            match conn.phase {
                Phase::Http if now.saturating_sub(conn.opened) >= HANDSHAKE_TIMEOUT => self.drop_conn(id),
                // A backend client that has not logged in within the
                // handshake time is dropped, like a silent browser.
                Phase::Sql
                    if now.saturating_sub(conn.opened) >= HANDSHAKE_TIMEOUT
                        && conn.sql.as_ref().is_some_and(|s| !s.session.is_authenticated()) =>
                {
                    self.drop_conn(id)
                }
                Phase::Closing { deadline } if now >= deadline => self.drop_conn(id),
                Phase::Comet | Phase::Echo => match conn.ping_sent {
                    Some(t) if now.saturating_sub(t) >= timeout => {
                        ShardMetrics::add(&self.metrics.heartbeat_closes, 1);
                        self.close_ws(id, CloseCode::HEARTBEAT_TIMEOUT, "no answer to ping");
                    }
                    None if now.saturating_sub(conn.last_rx) >= interval => {
                        conn.ping_sent = Some(now);
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

    /// Starts a graceful shutdown: stop accepting, close every WebSocket with
    /// 1001, drop connections still reading a request.
    pub fn begin_shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        for l in self.listeners.drain(..) {
            let _ = l.shutdown(std::net::Shutdown::Both);
        }
        for id in self.conns.ids() {
            match self.conns.get(id).map(|c| c.phase) {
                Some(Phase::Comet | Phase::Echo) => self.close_ws(id, CloseCode::GOING_AWAY, "server shutting down"),
                Some(Phase::Http) => self.drop_conn(id),
                // Answer what was asked, then close.
                Some(Phase::Sql) => self.sql_push_raw(id, Vec::new(), true),
                _ => {}
            }
        }
    }
}

/// Clips a client-supplied value for an error message.
fn clip(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::ClientInfo;

    #[test]
    fn client_info_keeps_three_fields_in_one_allocation() {
        let i = ClientInfo::new(Some("https://a.example"), None, Some("de\0-DE"), None);
        assert_eq!((i.origin(), i.user_agent(), i.language()), ("https://a.example", "", "de-DE"));
        assert_eq!(i.forwarded_ip(), None);
        assert_eq!(ClientInfo::new(None, None, None, Some("203.0.113.9")).forwarded_ip(), Some("203.0.113.9"));
    }
}
