//! The shard glue for backend connections, on both transports: CometQL
//! (feeds MySQL packets to the sans-IO [`Session`]) and the HTTP API (whose
//! requests `shard::api` turns into the same statements). Here statement
//! [`Plan`]s are carried out across shards and answers are written strictly
//! in the order the queries (or HTTP requests) came, even when a later one
//! is answered before an earlier one finished gathering; only the final
//! encoding of an answer depends on the transport.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use super::ConnId;
use super::answer_memory::Charge;
use super::conn::Phase;
use super::core::{Effect, ShardCore, Then};
use super::mail::{Publication, Query, Records};
use crate::api;
use crate::cometql::charset::Charset;
use crate::cometql::exec::{self, Ctx, Plan, Projection, StmtResult};
use crate::cometql::packet::{self, FrameError, MAX_PAYLOAD};
use crate::cometql::parser::{ParseError, Statement};
use crate::cometql::rows;
use crate::cometql::session::{self, Event, Passwords, Session};
use crate::config::Config;
use crate::frontend::message::ChannelMessage;
use crate::metrics::ShardMetrics;
use crate::shard::limits::{AUTH_FAILURES_ALLOWED, AUTH_WINDOW_SECS};

/// The error code of a statement that needs the cluster's Redis while it
/// is down (docs/cometql.md).
pub const CLUSTER_DOWN: u16 = 503;

/// The error code of a statement that gathers rows while the connection's
/// unread answers are over their bound (MySQL's ER_OUT_OF_RESOURCES).
pub const ANSWERS_UNREAD: u16 = 1041;

/// The error code of a SELECT whose answer alone would pass that bound
/// (MySQL's ER_TOO_BIG_SELECT).
pub const ANSWER_TOO_BIG: u16 = 1104;

/// The error code of a SELECT whose answer would pass what is left of
/// `--answer-memory-limit` now (MySQL's ER_OUTOFMEMORY: try again).
pub const ANSWER_MEMORY_FULL: u16 = 1037;

/// Largest packet accepted before authentication.
const MAX_AUTH_PACKET: usize = 64 * 1024;

/// How a gathered answer becomes a statement result.
#[derive(Debug)]
pub enum SqlThen {
    /// OK with affected rows = the gathered count, and this last_insert_id.
    Affected(u64),
    /// A SELECT: the gathered records, rendered as the rows of the table
    /// they belong to (the kind of [`Records`] names it), projected.
    Select(Projection),
    /// `pipes`: one row per asked channel with its summed count, plus
    /// `remote`, the other nodes' cached counts (`--redis`).
    PipeCounts { names: Vec<String>, proj: Projection, remote: Vec<u64> },
}

/// One query's (or HTTP request's) place in the answer order.
#[derive(Debug, Default)]
pub(super) struct Slot {
    /// Results per statement; `None` while gathering.
    results: Vec<Option<StmtResult>>,
    /// Bytes ready to send instead of results (auth replies, errors).
    raw: Option<Vec<u8>>,
    /// Statements still gathering.
    waiting: usize,
    /// Bytes of `results` held (counted in [`SqlConn::held`]).
    held: usize,
    /// Statements are still being started.
    executing: bool,
    /// Close the connection after this answer.
    close: bool,
    /// Sequence number of the answer's first packet.
    seq: u8,
    /// Rows in the binary protocol (an answer to COM_STMT_EXECUTE).
    binary: bool,
    /// The dev_id an HTTP request acts on (a CometQL session's own dev_id
    /// is read per statement, since `USE db_N` may change it mid-query).
    dev_id: u32,
    /// The character set the answer's text is sent in.
    charset: Charset,
}

impl Slot {
    /// The slot of an HTTP request on `dev_id`; `close`: the connection
    /// closes after its answer.
    pub(super) fn http(dev_id: u32, close: bool) -> Slot {
        Slot { dev_id, close, ..Slot::default() }
    }

    fn ready(&self) -> bool {
        !self.executing && self.waiting == 0 && (self.raw.is_some() || self.results.iter().all(Option::is_some))
    }
}

/// A backend connection's state beyond the generic connection: its
/// transport, and its answers in order.
#[derive(Debug)]
pub struct SqlConn {
    pub transport: Transport,
    slots: VecDeque<Slot>,
    /// Id of `slots[0]`.
    front: u64,
    /// Bytes of the results held in `slots`, not yet encoded and queued.
    held: usize,
    /// The statement (slot id, index) whose rows are being gathered: a
    /// connection gathers rows for one statement at a time, so what it can
    /// make the shards build at once is one answer, however many SELECTs
    /// it pipelines or packs into one query.
    reading: Option<(u64, usize)>,
    /// The statements that wait for `reading`: the connection is not read
    /// meanwhile ([`ShardCore::may_read`]).
    parked: Option<Box<Parked>>,
    /// Its statements are being started ([`ShardCore::sql_execute`] is on
    /// the stack): a gather completing on the spot must not restart them.
    running: bool,
    /// Since when (shard second) its queued answers are over the bound of
    /// unread answers: it is not read meanwhile, and it is disconnected
    /// when that lasts `--message-timeout` ([`ShardCore::tick`]).
    pub(super) over_since: Option<u32>,
    /// What it holds, counted in the process's answer memory
    /// ([`ShardCore::sql_recharge`]); given back when it goes.
    charge: Charge,
    /// Bytes ever queued for its socket, counted as its queue counts them:
    /// less what is queued now (and the front's written part), what its
    /// socket took.
    pub(super) queued: u64,
    /// Of what its socket took, the bytes the peer has not yet received
    /// (the kernel's send queue, `SIOCOUTQ`), as the I/O layer last read
    /// it for [`ShardCore::tick`]: a socket takes a big answer in bursts
    /// of half its send buffer, while its peer takes it steadily.
    pub(super) kernel_unsent: u64,
    /// While the process's answer memory has less than one connection's
    /// bound left and this one has answers unwritten: since when (shard
    /// second), and what it had read then. Unless it reads
    /// [`STALL_PROGRESS`] more within `--message-timeout`, it is
    /// disconnected, so that clients that never read (or read a trickle)
    /// cannot keep the memory from the others.
    pub(super) stalled: Option<(u32, u64)>,
}

/// Bytes a backend connection's peer must receive per `--message-timeout`
/// to keep its answers while the answer memory is short: a reader at a
/// few KB a second keeps them, one that takes nothing loses them.
pub(super) const STALL_PROGRESS: u64 = 64 * 1024;

/// The rest of a query whose next statement gathers rows while an earlier
/// statement of the connection still does.
#[derive(Debug)]
struct Parked {
    slot_id: u64,
    index: usize,
    plan: Plan,
    rest: std::vec::IntoIter<Result<Statement, ParseError>>,
}

/// How a backend connection speaks.
#[derive(Debug)]
pub enum Transport {
    /// CometQL over the MySQL protocol (boxed: an HTTP connection need not
    /// carry a MySQL session's size).
    MySql(Box<MySqlConn>),
    /// The HTTP API.
    Http(HttpConn),
}

/// The HTTP API side of a backend connection.
#[derive(Debug, Default)]
pub struct HttpConn {
    /// `100 Continue` was sent for the request whose body is arriving.
    pub continued: bool,
    /// A request asked to close the connection after its answer: what
    /// follows it is not read.
    pub closing: bool,
    /// The key of the request whose body is arriving was checked (before
    /// any of the body is held or `100 Continue` is sent).
    pub key_checked: bool,
    /// The last (dev_id, key) that opened its dev_id on this connection:
    /// the same key again needs neither the process-wide failed-login
    /// table (a lock) nor another comparison.
    pub good_key: Option<(u32, Box<str>)>,
}

impl SqlConn {
    /// A new HTTP API connection.
    pub fn http() -> SqlConn {
        SqlConn::new(Transport::Http(HttpConn::default()))
    }

    fn new(transport: Transport) -> SqlConn {
        SqlConn {
            transport,
            slots: VecDeque::new(),
            front: 0,
            held: 0,
            reading: None,
            parked: None,
            running: false,
            over_since: None,
            charge: Charge::default(),
            queued: 0,
            kernel_unsent: 0,
            stalled: None,
        }
    }

    /// Whether the connection must not be read now: statements wait for
    /// an earlier one's rows, or its statements are being started (a
    /// gather completing on the spot may resume reading it from inside
    /// [`ShardCore::sql_execute`], which would start a later query before
    /// the rest of this one).
    pub fn holds_input(&self) -> bool {
        self.parked.is_some() || self.running
    }

    /// The MySQL session of a CometQL connection.
    pub fn session(&self) -> Option<&Session> {
        match &self.transport {
            Transport::MySql(m) => Some(&m.session),
            Transport::Http(_) => None,
        }
    }

    fn mysql(&mut self) -> Option<&mut MySqlConn> {
        match &mut self.transport {
            Transport::MySql(m) => Some(m),
            Transport::Http(_) => None,
        }
    }

    pub fn is_http(&self) -> bool {
        matches!(self.transport, Transport::Http(_))
    }

    /// Whether a CometQL client has not logged in yet (an HTTP connection
    /// has no login: each request carries its key).
    pub fn logging_in(&self) -> bool {
        self.session().is_some_and(|s| !s.is_authenticated())
    }

    /// Whether answers are still owed.
    pub fn answering(&self) -> bool {
        !self.slots.is_empty()
    }

    /// Whether the connection holds a backend slot without having proven
    /// anything: a CometQL client not logged in, or an HTTP API connection
    /// that never showed a good key and has no request under way whose key
    /// was checked. (One that did is proven, as a CometQL login is, even
    /// while the socket still takes its last answer; it closes after
    /// [`super::api::IDLE_TIMEOUT`] idle.)
    pub fn unproven(&self) -> bool {
        match &self.transport {
            Transport::MySql(m) => !m.session.is_authenticated(),
            Transport::Http(h) => !self.answering() && !h.key_checked && h.good_key.is_none(),
        }
    }
}

/// The MySQL side of a CometQL connection.
#[derive(Debug)]
pub struct MySqlConn {
    pub session: Session,
    /// Bytes of an oversized packet still to discard.
    skip: usize,
    /// The discarded packet is continued by another one.
    skip_more: bool,
    /// The error to answer once the oversized query is skipped, and the
    /// sequence number of its last packet seen (the answer follows it).
    skip_error: Option<String>,
    skip_seq: u8,
}

impl Passwords for Config {
    fn password(&self, dev_id: u32) -> &str {
        self.dev_passwords.get(&dev_id).map_or(&self.password, |s| s.as_str())
    }

    fn max_long_data(&self) -> usize {
        self.max_query_size
    }
}

/// 20 random bytes in the printable range, for the auth scramble.
fn nonce() -> [u8; 20] {
    let mut n = [0u8; 20];
    if getrandom::fill(&mut n).is_err() {
        // No entropy source: fall back to time and address bits, still unique.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        for (i, b) in n.iter_mut().enumerate() {
            *b = (t >> ((i % 16) * 8)) as u8 ^ (i as u8).wrapping_mul(31);
        }
    }
    for b in &mut n {
        *b = 0x21 + *b % 94;
    }
    n
}

impl ShardCore {
    /// Registers a backend connection and sends the MySQL greeting, or an
    /// ERR 1129 and a close when its address failed to log in too often.
    pub fn accept_backend(&mut self, peer: SocketAddr) -> ConnId {
        ShardMetrics::add(&self.metrics.accepted, 1);
        let id = self.open(peer);
        if let Some(secs) = self.shared.auth_failures.refused(peer.ip(), self.unix as u64) {
            ShardMetrics::add(&self.metrics.auth_refusals, 1);
            let msg = format!(
                "Host '{}' is blocked for {secs} s after more than {AUTH_FAILURES_ALLOWED} failed logins in {AUTH_WINDOW_SECS} s",
                peer.ip()
            );
            self.send_raw_bytes(id, session::one(0, &packet::err(1129, &msg)));
            self.close_after_answer(id);
            return id;
        }
        if !self.admit_backend() {
            let max = self.shared.config.max_backend_connections;
            let msg =
                format!("Too many connections: comet holds {max} backend connections (--max-backend-connections)");
            self.send_raw_bytes(id, session::one(0, &packet::err(1040, &msg)));
            self.close_after_answer(id);
            return id;
        }
        self.next_sql_id = self.next_sql_id.wrapping_add(1);
        let conn_id = ((self.id as u32) << 24) | (self.next_sql_id & 0x00FF_FFFF);
        let mut session = Session::new(conn_id, nonce());
        if self.shared.tls.is_on() {
            session.offer_tls(self.shared.config.backend_require_tls);
        }
        let greeting = session.greeting();
        if let Some(c) = self.conns.get_mut(id) {
            c.phase = Phase::Sql;
            c.sql = Some(Box::new(SqlConn::new(Transport::MySql(Box::new(MySqlConn {
                session,
                skip: 0,
                skip_more: false,
                skip_error: None,
                skip_seq: 0,
            })))));
            self.backends.push(id);
        }
        self.metrics.sql_connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.send_raw_bytes(id, greeting);
        id
    }

    /// Counts a new CometQL or HTTP API connection against
    /// `--max-backend-connections`, or says it must be refused (then nothing
    /// is counted). The count is released where a connection that has its
    /// `sql` state is dropped.
    ///
    /// With every slot taken, the new connection takes the slot of this
    /// shard's oldest connection that holds one without having proven
    /// anything ([`SqlConn::unproven`]): connections that never log in
    /// cannot lock the backends out, and a backend's own connections,
    /// logged in or at work, are never closed for another.
    pub(super) fn admit_backend(&mut self) -> bool {
        if self.try_admit_backend() {
            return true;
        }
        if let Some(victim) = self.oldest_unproven_backend() {
            ShardMetrics::add(&self.metrics.evicted_backend, 1);
            // A CometQL connection closed before it logged in counts as a
            // failed login of its address: a flood of connections that
            // never log in gets its address refused at accept, and stops
            // taking slots.
            if self.sql(victim).is_some_and(|s| !s.is_http()) {
                self.login_failed(victim);
            }
            self.drop_conn(victim);
            if self.try_admit_backend() {
                return true;
            }
        }
        ShardMetrics::add(&self.metrics.refused_backend, 1);
        false
    }

    fn try_admit_backend(&self) -> bool {
        let held = &self.shared.backend_conns;
        if held.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= self.shared.config.max_backend_connections {
            held.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            return false;
        }
        true
    }

    /// This shard's backend connection to close for a new one: of those
    /// that prove nothing, one from the address that holds the most of
    /// them (a flood from one address evicts its own connections, not a
    /// backend logging in from another), the oldest of those (since it
    /// opened, or its last request).
    fn oldest_unproven_backend(&self) -> Option<ConnId> {
        let mut unproven: Vec<(std::net::IpAddr, u32, ConnId)> = self
            .backends
            .iter()
            .filter_map(|&id| {
                let c = self.conns.get(id)?;
                let sql = c.sql.as_deref().filter(|s| s.unproven() && c.phase == Phase::Sql)?;
                Some((c.peer.ip(), if sql.is_http() { c.last_rx } else { c.opened }, id))
            })
            .collect();
        // By address, oldest first within one: the first of the longest run.
        unproven.sort_unstable_by_key(|u| (u.0, u.1));
        let mut best: Option<(usize, u32, ConnId)> = None;
        for run in unproven.chunk_by(|a, b| a.0 == b.0) {
            let (n, since, id) = (run.len(), run[0].1, run[0].2);
            if best.is_none_or(|(bn, bs, _)| n > bn || (n == bn && since < bs)) {
                best = Some((n, since, id));
            }
        }
        best.map(|(_, _, id)| id)
    }

    /// Counts and logs a failed login (a CometQL login or an HTTP API key);
    /// refuses the address after too many.
    pub(super) fn login_failed(&mut self, id: ConnId) {
        let Some(peer) = self.conns.get(id).map(|c| c.peer) else { return };
        ShardMetrics::add(&self.metrics.auth_failures, 1);
        let blocked = self.shared.auth_failures.fail(peer.ip(), self.unix as u64);
        // One line per address when it is blocked, and otherwise at most
        // one line a minute per shard, so a guessing storm cannot flood the log.
        let now = self.now;
        if blocked {
            eprintln!(
                "comet: shard {}: backend logins (CometQL and HTTP API) from {} blocked for {AUTH_WINDOW_SECS} s after more than {AUTH_FAILURES_ALLOWED} failures",
                self.id,
                peer.ip()
            );
        } else if self.auth_log_at.is_none_or(|t| now >= t + 60) {
            eprintln!(
                "comet: shard {}: backend login (CometQL or HTTP API key) failed from {peer} (further failures are counted in comet_auth_failures_total)",
                self.id
            );
            self.auth_log_at = Some(now);
        }
    }

    pub(super) fn sql(&mut self, id: ConnId) -> Option<&mut SqlConn> {
        self.conns.get_mut(id).and_then(|c| c.sql.as_deref_mut())
    }

    /// The MySQL side of CometQL connection `id`.
    fn mysql(&mut self, id: ConnId) -> Option<&mut MySqlConn> {
        self.sql(id).and_then(SqlConn::mysql)
    }

    /// Handles bytes from a backend connection; returns bytes consumed.
    pub fn on_sql(&mut self, id: ConnId, buf: &mut [u8]) -> usize {
        if self.sql(id).is_some_and(|sc| sc.is_http()) {
            return self.on_api(id, buf);
        }
        let config = self.shared.config.clone();
        let mut pos = 0;
        loop {
            let Some(sc) = self.mysql(id) else { return buf.len() };
            if sc.skip > 0 || sc.skip_more {
                if sc.skip == 0 {
                    // The next packet continues the oversized payload.
                    if buf.len() - pos < 4 {
                        break;
                    }
                    let len = u32::from_le_bytes([buf[pos], buf[pos + 1], buf[pos + 2], 0]) as usize;
                    sc.skip = 4 + len;
                    sc.skip_more = len == MAX_PAYLOAD;
                    sc.skip_seq = buf[pos + 3];
                }
                let n = sc.skip.min(buf.len() - pos);
                sc.skip -= n;
                pos += n;
                if sc.skip > 0 {
                    break;
                }
                if !sc.skip_more
                    && let Some(msg) = sc.skip_error.take()
                {
                    // The whole oversized query is gone: answer after its
                    // last packet's sequence number.
                    let seq = sc.skip_seq.wrapping_add(1);
                    self.sql_push_raw(id, session::one(seq, &packet::err(11, &msg)), false);
                }
                continue;
            }
            let authenticated = sc.session.is_authenticated();
            // Backend queries are not held to a connection's turn of work:
            // an authenticated backend publishing is what the server is
            // for, and a pipelined batch then goes out as one write per
            // subscriber. --max-pending and mail backpressure bound it.
            if authenticated && !self.may_read(id) {
                // --max-pending reached, or the shard's mail is congested:
                // leave the rest buffered until answers come back.
                break;
            }
            let Some(sc) = self.mysql(id) else { return buf.len() };
            let limit = if authenticated { config.max_query_size + 1 } else { MAX_AUTH_PACKET };
            match packet::read_frame(&buf[pos..], limit) {
                Ok(None) => break,
                Err(FrameError::TooLarge { .. }) => {
                    let len = u32::from_le_bytes([buf[pos], buf[pos + 1], buf[pos + 2], 0]) as usize;
                    let authenticated = sc.session.is_authenticated();
                    sc.skip = 4 + len;
                    sc.skip_more = len == MAX_PAYLOAD;
                    let msg = format!(
                        "Query of {}{} bytes is larger than max_query_size ({} bytes)",
                        if sc.skip_more { "more than " } else { "" },
                        len.saturating_sub(1),
                        config.max_query_size
                    );
                    if !authenticated {
                        let seq = buf[pos + 3].wrapping_add(1);
                        self.sql_push_raw(id, session::one(seq, &packet::err(11, &msg)), true);
                        return buf.len();
                    }
                    sc.skip_seq = buf[pos + 3];
                    sc.skip_error = Some(msg);
                }
                Ok(Some(frame)) => {
                    pos += frame.consumed;
                    let events = sc.session.on_packet(frame, &*config);
                    if !authenticated
                        && !sc.session.is_authenticated()
                        && events.iter().any(|e| matches!(e, Event::Close))
                    {
                        self.login_failed(id);
                    }
                    for e in events {
                        match e {
                            Event::Reply(bytes) => self.sql_push_raw(id, bytes, false),
                            Event::Query(stmts, seq, binary, charset) => {
                                self.sql_query(id, stmts, Slot { seq, binary, charset, ..Slot::default() })
                            }
                            Event::Close => {
                                self.sql_push_raw(id, Vec::new(), true);
                                return buf.len();
                            }
                            Event::StartTls => {
                                // What follows the SSLRequest is the start of
                                // the ClientHello: it goes to the I/O layer's
                                // TLS, none of it to the MySQL parser.
                                let leftover = buf[pos..].to_vec();
                                self.effects.push(Effect::StartTls { id, leftover });
                                return buf.len();
                            }
                        }
                    }
                }
            }
        }
        pos
    }

    /// Queues ready bytes (possibly none) in answer order; `close` closes
    /// the connection once they are written.
    pub fn sql_push_raw(&mut self, id: ConnId, bytes: Vec<u8>, close: bool) {
        let Some(sc) = self.sql(id) else { return };
        sc.slots.push_back(Slot { raw: Some(bytes), close, ..Slot::default() });
        self.sql_flush(id);
    }

    /// Rows for SHOW STATUS: real counters from every shard.
    fn status_rows(&self) -> Vec<(String, String)> {
        use std::sync::atomic::Ordering::Relaxed;
        let r = &self.shared.registry;
        let sum = |f: fn(&ShardMetrics) -> i64| r.shards.iter().map(|m| f(m)).sum::<i64>().to_string();
        vec![
            ("Uptime".into(), r.started.elapsed().as_secs().to_string()),
            ("Threads_connected".into(), sum(|m| m.sql_connections.load(Relaxed))),
            ("Questions".into(), sum(|m| m.sql_queries.load(Relaxed) as i64)),
            ("Comet_io_backend".into(), r.io_backend.to_string()),
            ("Comet_shards".into(), r.shards.len().to_string()),
            ("Comet_websockets".into(), sum(|m| m.websockets.load(Relaxed))),
            ("Comet_connections_accepted".into(), sum(|m| m.accepted.load(Relaxed) as i64)),
            ("Comet_messages_in".into(), sum(|m| m.messages_in.load(Relaxed) as i64)),
            ("Comet_messages_out".into(), sum(|m| m.messages_out.load(Relaxed) as i64)),
            ("Comet_bytes_out".into(), sum(|m| m.bytes_out.load(Relaxed) as i64)),
            ("Comet_slow_consumer_closes".into(), sum(|m| m.slow_consumer_closes.load(Relaxed) as i64)),
            ("Comet_handler_panics".into(), sum(|m| m.handler_panics.load(Relaxed) as i64)),
        ]
    }

    /// Starts executing a COM_QUERY's statements (or an HTTP request's
    /// one statement) in a new answer slot made from `slot`, which says how
    /// the answer is encoded.
    pub(super) fn sql_query(&mut self, id: ConnId, stmts: Vec<Result<Statement, ParseError>>, slot: Slot) {
        ShardMetrics::add(&self.metrics.sql_queries, 1);
        let n = stmts.len();
        let Some(sc) = self.sql(id) else { return };
        let slot_id = sc.front + sc.slots.len() as u64;
        sc.slots.push_back(Slot { results: (0..n).map(|_| None).collect(), executing: true, ..slot });
        self.sql_execute(
            id,
            Parked {
                slot_id,
                index: 0,
                plan: Plan::Done(StmtResult::Ok { affected: 0, last_insert_id: 0 }),
                rest: stmts.into_iter(),
            },
            false,
        );
    }

    /// Runs the statements of a slot from `at.index`: `at.plan` first when
    /// `planned` (a statement parked before), then `at.rest`. Stops after
    /// a statement that failed, and parks before a statement that gathers
    /// rows while another of this connection still does, or refuses it
    /// when the connection's unread answers are over its bound.
    fn sql_execute(&mut self, id: ConnId, at: Parked, planned: bool) {
        let Parked { slot_id, mut index, plan, mut rest } = at;
        let mut first = planned.then_some(plan);
        let Some(sc) = self.sql(id) else { return };
        sc.running = true;
        loop {
            let plan = match first.take() {
                Some(p) => p,
                None => {
                    let Some(st) = rest.next() else { break };
                    // A statement that did not parse fails here, after the
                    // ones before it ran, as MySQL does.
                    let st = st.unwrap_or_else(Statement::Failed);
                    let Some(p) = self.sql_plan(id, slot_id, st) else { return };
                    p
                }
            };
            if plan.gathers_rows() {
                // Answers queued for the socket hold the connection's input
                // back (`may_read`); results waiting for the rest of their
                // query are bounded here.
                let limit = self.sql_answer_limit();
                let Some(sc) = self.sql(id) else { return };
                let unsent = sc.held;
                if sc.reading.is_some() {
                    debug_assert!(sc.parked.is_none(), "one query parks at a time");
                    sc.parked = Some(Box::new(Parked { slot_id, index, plan, rest }));
                    sc.running = false;
                    return;
                }
                if unsent > limit {
                    let e = format!(
                        "Not run: the answers this connection waits to send take {unsent} bytes, over the limit of {limit} bytes (16 x --outbound-limit, or 4 x --max-query-size if more); ask for fewer rows in one query"
                    );
                    self.sql_set(id, slot_id, index, StmtResult::err(ANSWERS_UNREAD, e));
                    if let Some(slot) = self.sql_slot(id, slot_id) {
                        slot.results.truncate(index + 1);
                    }
                    break;
                }
                sc.reading = Some((slot_id, index));
            }
            let failed = self.sql_run(id, slot_id, index, plan);
            // A gather that failed at once, or completed on the spot, is
            // not in flight.
            let answered =
                self.sql_slot(id, slot_id).is_some_and(|s| s.results.get(index).is_some_and(Option::is_some));
            if let Some(sc) = self.sql(id)
                && answered
                && sc.reading == Some((slot_id, index))
            {
                sc.reading = None;
            }
            if failed {
                if let Some(slot) = self.sql_slot(id, slot_id) {
                    slot.results.truncate(index + 1);
                }
                break;
            }
            index += 1;
        }
        if let Some(sc) = self.sql(id) {
            sc.running = false;
        }
        if let Some(slot) = self.sql_slot(id, slot_id) {
            slot.executing = false;
        }
        self.sql_flush(id);
    }

    /// Plans one statement of slot `slot_id` in the connection's session as
    /// it is now (a `USE` before it in the same query counts); `None` when
    /// the connection is gone.
    fn sql_plan(&mut self, id: ConnId, slot_id: u64, st: Statement) -> Option<Plan> {
        let status = self.status_rows();
        let config = self.shared.config.clone();
        let dev_id = self.sql_dev_id(id, slot_id)?;
        let sc = self.sql(id)?;
        let session = sc.session();
        // An HTTP request's key opens its dev_id and no other.
        let may = |d: u32| session.map_or(d == dev_id, |s| s.may_use_dev(d, &*config));
        let status_fn = || status.clone();
        let ctx = Ctx {
            dev_id,
            database: session.map_or("CometQL_v1", |s| s.database.as_str()),
            connection_id: session.map_or(0, |s| s.connection_id),
            may_use_dev: &may,
            status: &status_fn,
            max_query_size: config.max_query_size,
            charsets: session.map_or((Charset::Utf8mb4, Charset::Utf8mb4), |s| (s.client_charset, s.results_charset)),
        };
        Some(exec::plan(st, &ctx))
    }

    /// How many bytes of answers a backend connection may leave unread
    /// ([`Config::answer_bound`]).
    pub(super) fn sql_answer_limit(&self) -> usize {
        self.shared.config.answer_bound()
    }

    /// Bytes one shard's part of a SELECT's answer may take: the bound of
    /// a connection's unread answers, or what is left of the process's
    /// `--answer-memory-limit` if less (reserved for the part while it is
    /// built, [`ShardCore::charged_answer`]).
    pub(super) fn answer_room(&self) -> usize {
        match self.building {
            Some(reserved) => reserved,
            None => self.sql_answer_limit().min(self.shared.answers.room()),
        }
    }

    /// The records of a part sized before it was built at `size` bytes,
    /// more than [`Self::answer_room`]: too big for any connection is not
    /// worth a retry, whatever the memory left.
    pub(super) fn refused_over(&self, size: usize) -> Records {
        let limit = self.sql_answer_limit();
        if size > limit { Records::TooBig(limit) } else { self.answer_refused() }
    }

    /// The records of a part that did not fit in [`Self::answer_room`]:
    /// too big for any connection, or (when the room was less than that)
    /// too big for the memory left now.
    pub(super) fn answer_refused(&self) -> Records {
        let (limit, pool) = (self.sql_answer_limit(), &self.shared.answers);
        if self.answer_room() < limit {
            // What others hold: this part's own reservation aside.
            let used = pool.used().saturating_sub(self.building.unwrap_or(0));
            Records::Busy { used, limit: pool.limit() }
        } else {
            Records::TooBig(limit)
        }
    }

    /// Statement `index` of slot `slot_id` has its answer: if it was the
    /// connection's gather of rows, the statements parked behind it run,
    /// and the connection is read again.
    fn sql_answered(&mut self, id: ConnId, slot_id: u64, index: usize) {
        let Some(sc) = self.sql(id) else { return };
        if sc.reading != Some((slot_id, index)) {
            return;
        }
        sc.reading = None;
        if sc.running {
            return;
        }
        if let Some(p) = sc.parked.take() {
            self.sql_execute(id, *p, true);
            if self.sql(id).is_some_and(|sc| !sc.holds_input()) {
                self.resume(id);
                self.unpause();
            }
        }
    }

    /// The dev_id the statements of slot `slot_id` act on now.
    fn sql_dev_id(&mut self, id: ConnId, slot_id: u64) -> Option<u32> {
        if let Some(m) = self.mysql(id) {
            return Some(m.session.dev_id);
        }
        self.sql_slot(id, slot_id).map(|s| s.dev_id)
    }

    fn sql_slot(&mut self, id: ConnId, slot_id: u64) -> Option<&mut Slot> {
        let sc = self.sql(id)?;
        let k = slot_id.checked_sub(sc.front)? as usize;
        sc.slots.get_mut(k)
    }

    fn sql_set(&mut self, id: ConnId, slot_id: u64, index: usize, r: StmtResult) {
        let w = r.weight();
        if let Some(slot) = self.sql_slot(id, slot_id)
            && let Some(cell) = slot.results.get_mut(index)
        {
            let old = cell.replace(r).map_or(0, |o| o.weight());
            slot.held = slot.held + w - old;
            if let Some(sc) = self.sql(id) {
                sc.held = sc.held + w - old;
            }
        }
    }

    /// Carries out one plan; returns true when it failed (execution stops).
    fn sql_run(&mut self, id: ConnId, slot_id: u64, index: usize, plan: Plan) -> bool {
        let Some(dev_id) = self.sql_dev_id(id, slot_id) else { return true };
        if let Some(e) = self.cluster_write_refused(&plan) {
            self.sql_set(id, slot_id, index, StmtResult::err(CLUSTER_DOWN, e));
            return true;
        }
        let arcs = |v: &[String]| v.iter().map(|s| Arc::<str>::from(s.as_str())).collect::<Vec<_>>();
        let then = |t: super::sql::SqlThen| Then::Sql { conn: id, slot: slot_id, index, then: t };
        let (query, sql_then) = match plan {
            Plan::Done(r) => {
                let failed = matches!(r, StmtResult::Err(..));
                self.sql_set(id, slot_id, index, r);
                return failed;
            }
            Plan::UseDb { dev_id, name } => {
                if let Some(m) = self.mysql(id) {
                    m.session.use_db(dev_id, &name);
                }
                self.sql_set(id, slot_id, index, StmtResult::Ok { affected: 0, last_insert_id: 0 });
                return false;
            }
            Plan::Publish(msgs) => {
                if let Some(e) = self.cluster_down() {
                    self.sql_set(id, slot_id, index, StmtResult::err(CLUSTER_DOWN, e));
                    return true;
                }
                let max = self.shared.config.max_outbound_message;
                let now = self.unix;
                let mut pubs = Vec::with_capacity(msgs.len());
                for (pipe, event, data) in msgs {
                    let msg = ChannelMessage { pipe, event, data, data_is_json: false, time: Some(now), user_id: None };
                    let p = Publication::new(dev_id, msg, None);
                    if p.wire_len() > max {
                        let e = format!(
                            "Message for channel '{}' is {} bytes on the wire; the limit is {max}",
                            p.msg.pipe,
                            p.wire_len()
                        );
                        self.sql_set(id, slot_id, index, StmtResult::err(11, e));
                        return true;
                    }
                    pubs.push(p);
                }
                if let Some(slot) = self.sql_slot(id, slot_id) {
                    slot.waiting += 1;
                }
                self.publish_many(pubs, Some(then(SqlThen::Affected(0))));
                return false;
            }
            Plan::PipeCounts { .. } | Plan::Subscribers { .. } if self.cluster_down().is_some() => {
                let e = self.cluster_down().unwrap_or_default();
                self.sql_set(id, slot_id, index, StmtResult::err(CLUSTER_DOWN, e));
                return true;
            }
            Plan::PipeCounts { names, proj } => {
                let remote = self.cluster_counts(dev_id, &names);
                (Query::Counts(arcs(&names)), SqlThen::PipeCounts { names, proj, remote })
            }
            Plan::Subscribers { names, proj } => (Query::Subscribers(arcs(&names)), SqlThen::Select(proj)),
            Plan::HistorySelect { names, proj } => {
                // A LIMIT takes at most offset + count rows of each
                // channel; of one channel, the first `offset` are dropped
                // (the shard sends them without their texts).
                let rows = proj.limit.map_or(u64::MAX, |(offset, count)| offset.saturating_add(count));
                let skip = match names.len() {
                    1 => proj.limit.map_or(0, |(offset, _)| offset),
                    _ => 0,
                };
                (Query::History { names: arcs(&names), rows, skip }, SqlThen::Select(proj))
            }
            Plan::HistoryDelete { names, ids } => {
                (Query::HistoryDelete { names: arcs(&names), ids }, SqlThen::Affected(0))
            }
            Plan::SettingsSet(items) => (
                Query::SettingsSet(items.iter().map(|(n, l)| (Arc::<str>::from(n.as_str()), *l)).collect()),
                SqlThen::Affected(0),
            ),
            Plan::SettingsSelect { names, proj } => {
                (Query::SettingsSelect(names.as_deref().map(arcs)), SqlThen::Select(proj))
            }
            Plan::SettingsDelete(names) => (Query::SettingsDelete(arcs(&names)), SqlThen::Affected(0)),
            Plan::User { query, proj, last_insert_id } => {
                if let crate::users::UserQuery::Send(msgs) = &query {
                    if let Some(e) = self.cluster_down() {
                        self.sql_set(id, slot_id, index, StmtResult::err(CLUSTER_DOWN, e));
                        return true;
                    }
                    let max = self.shared.config.max_outbound_message;
                    if let Some((uid, _, m)) = msgs.iter().find(|(_, e, m)| m.len() + e.len() + 64 > max) {
                        let e = format!("Message for user {uid} is {} bytes; the limit is {max}", m.len());
                        self.sql_set(id, slot_id, index, StmtResult::err(11, e));
                        return true;
                    }
                }
                let targets = self.user_targets(dev_id, query.user_ids());
                let t = match proj {
                    Some(p) => SqlThen::Select(p),
                    None => SqlThen::Affected(last_insert_id),
                };
                // In a cluster the offline queues are in Redis.
                if let Some(read) = self.cluster_queue_read(&query) {
                    if let Some(e) = self.cluster_down() {
                        self.sql_set(id, slot_id, index, StmtResult::err(CLUSTER_DOWN, e));
                        return true;
                    }
                    if let Some(slot) = self.sql_slot(id, slot_id) {
                        slot.waiting += 1;
                    }
                    self.ask_cluster_queues(dev_id, read, then(t));
                    return false;
                }
                if let Some(slot) = self.sql_slot(id, slot_id) {
                    slot.waiting += 1;
                }
                self.ask_shards(&targets, dev_id, Query::User(query), then(t));
                return false;
            }
        };
        if let Some(slot) = self.sql_slot(id, slot_id) {
            slot.waiting += 1;
        }
        self.ask_all(dev_id, query, then(sql_then));
        false
    }

    /// A gathered answer for statement `index` of slot `slot_id`.
    #[allow(clippy::too_many_arguments)]
    pub fn sql_complete(
        &mut self,
        id: ConnId,
        slot_id: u64,
        index: usize,
        then: SqlThen,
        count: u64,
        counts: Vec<u64>,
        records: Records,
        charge: Charge,
    ) {
        // The records' bytes stay counted until the answer made of them is
        // written (`sql_flush` counts what the connection holds then).
        if let Some(sc) = self.sql(id) {
            sc.charge.absorb(charge);
        }
        if matches!(records, Records::Busy { .. }) {
            ShardMetrics::add(&self.metrics.answer_memory_refusals, 1);
        }
        let r = match then {
            SqlThen::Affected(last_insert_id) => StmtResult::Ok { affected: count, last_insert_id },
            SqlThen::Select(proj) => select(&proj, records),
            SqlThen::PipeCounts { names, proj, remote } => {
                let mut counts = counts;
                counts.resize(names.len(), 0);
                for (c, r) in counts.iter_mut().zip(remote) {
                    *c += r;
                }
                StmtResult::Rows(proj.apply(rows::pipes(names, &counts)))
            }
        };
        self.sql_set(id, slot_id, index, r);
        if let Some(slot) = self.sql_slot(id, slot_id) {
            slot.waiting = slot.waiting.saturating_sub(1);
        }
        self.sql_flush(id);
        self.sql_answered(id, slot_id, index);
    }

    /// Statement `index` changed state in memory that the store could not
    /// write: it answers MySQL's "error writing file" with the cause.
    pub fn sql_failed(&mut self, id: ConnId, slot_id: u64, index: usize, cause: &str) {
        let result = match cause.strip_prefix(super::replica::READ_FAILED) {
            // A read of the cluster's Redis, not a change.
            Some(why) => StmtResult::err(CLUSTER_DOWN, format!("the cluster's Redis could not be read: {why}")),
            None => StmtResult::err(
                1026,
                format!("The change is made in memory but not stored, so a restart loses it: {cause}"),
            ),
        };
        self.sql_set(id, slot_id, index, result);
        if let Some(slot) = self.sql_slot(id, slot_id) {
            slot.waiting = slot.waiting.saturating_sub(1);
        }
        self.sql_flush(id);
        self.sql_answered(id, slot_id, index);
    }

    /// Statement `index` needed the other nodes' part from Redis, which
    /// failed: ERR 503 with the cause.
    pub fn sql_cluster_failed(&mut self, id: ConnId, slot_id: u64, index: usize, why: &str) {
        let msg = format!("{why}; nothing was read, retry later");
        self.sql_set(id, slot_id, index, StmtResult::err(CLUSTER_DOWN, msg));
        if let Some(slot) = self.sql_slot(id, slot_id) {
            slot.waiting = slot.waiting.saturating_sub(1);
        }
        self.sql_flush(id);
        self.sql_answered(id, slot_id, index);
    }

    /// Sends every answer at the front of the queue that is complete, then
    /// counts what the connection holds in the process's answer memory.
    fn sql_flush(&mut self, id: ConnId) {
        self.sql_send_ready(id);
        self.sql_recharge(id);
    }

    /// Counts in the process's answer memory what backend connection `id`
    /// holds now: results waiting for their turn and answers not yet
    /// written. Called when answers are queued and when its queue drained;
    /// between the two a partial write leaves it counting a little more
    /// than it holds, never less.
    pub(super) fn sql_recharge(&mut self, id: ConnId) {
        let pool = self.shared.answers.clone();
        let Some(c) = self.conns.get_mut(id) else { return };
        let cost = c.out.cost();
        if let Some(sc) = c.sql.as_deref_mut() {
            sc.charge.set(&pool, sc.held + cost);
        }
    }

    /// Encodes and queues the complete answers at the front of the
    /// connection's order, up to the first still gathering; closes after
    /// one that asked for it.
    fn sql_send_ready(&mut self, id: ConnId) {
        loop {
            let Some(sc) = self.sql(id) else { return };
            if !sc.slots.front().is_some_and(Slot::ready) {
                return;
            }
            let deprecate_eof = sc.session().is_some_and(Session::deprecate_eof);
            let http = sc.is_http();
            let Some(slot) = sc.slots.pop_front() else { return };
            sc.front += 1;
            sc.held -= slot.held;
            let bytes = match slot.raw {
                Some(b) => b,
                None => {
                    let results: Vec<StmtResult> = slot.results.into_iter().flatten().collect();
                    match results.first() {
                        Some(r) if http => api::answer(r, slot.close),
                        _ => session::encode_results(&results, deprecate_eof, slot.seq, slot.binary, slot.charset),
                    }
                }
            };
            if !bytes.is_empty() {
                self.send_raw_bytes(id, bytes);
            }
            if slot.close {
                if http {
                    // Lingering close: the client may still be sending (a
                    // refused body); reading on until it closes keeps a
                    // reset from destroying the answer before it is read.
                    self.finish_after_flush(id, false);
                } else {
                    self.close_after_answer(id);
                }
                return;
            }
        }
    }
}

/// A SELECT's result: `records` rendered by the renderer of their table in
/// `cometql::rows`, then projected. No records (no shard was asked, as for
/// `WHERE id IN ()`) is a result without rows.
fn select(proj: &Projection, records: Records) -> StmtResult {
    let all = match records {
        Records::None => Vec::new(),
        Records::Busy { used, limit } => {
            return StmtResult::err(
                ANSWER_MEMORY_FULL,
                format!(
                    "Not built: the answers held for all backend connections take {used} bytes, and this one would pass --answer-memory-limit ({limit} bytes); retry once clients have read their answers, or ask for fewer rows"
                ),
            );
        }
        Records::TooBig(limit) => {
            return StmtResult::err(
                ANSWER_TOO_BIG,
                format!(
                    "The answer would take more than {limit} bytes (16 x --outbound-limit, or 4 x --max-query-size if more); ask for fewer rows: fewer channels or user ids, or a LIMIT on pipes_messages"
                ),
            );
        }
        Records::History(h) => rows::pipes_messages(h),
        Records::Subscribers(s) => rows::users_in_pipes(s),
        Records::Settings(s) => rows::pipes_settings(s),
        Records::Keys(k) => rows::users_auth(k),
        Records::Data(d) => rows::users_data(d),
        Records::Queues(q) => rows::users_messages(q),
        Records::Presences(p) => rows::users_time(p),
        Records::Tokens(t) => rows::revoked_tokens(t),
    };
    StmtResult::Rows(proj.apply(all))
}
