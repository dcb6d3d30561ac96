//! The sans-IO shard core: one shard's whole state and the handlers that
//! change it, with no sockets, no tasks and no clock of its own.
//!
//! The I/O layer ([`super::io`]) owns the sockets and drives the core with
//! events: a connection accepted ([`ShardCore::accept`]), bytes read
//! ([`ShardCore::readable`]), a hang-up, mail from another shard
//! ([`ShardCore::on_mail`]), the clock ([`ShardCore::set_clock`]) and the
//! once-a-second [`ShardCore::tick`]. The core answers with effects: bytes
//! queued on connections (the [`ShardCore::dirty`] list and each
//! connection's [`OutQueue`](super::outq::OutQueue)), [`Effect`]s (close a
//! socket, move one to another shard), and mail in its outbox. So several
//! cores can run in one test, with a virtual clock and the mail passed by
//! hand (`super::sim`).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use ahash::AHashMap;

use super::answer_memory::Charge;
use super::conn::Conn;
use super::history::{self, HistoryStore};
use super::mail::{Mail, Publication, Query, Records, Reply};
use super::slab::{ConnId, Slab};
use super::{home_shard, home_shard_of_channel};
use crate::cometql::rows::{ChannelHistory, Subscriber};
use crate::config::Config;
use crate::mailbox::Outbox;
use crate::metrics::{Registry, ShardMetrics};

/// A channel's subscribers on this shard.
#[derive(Debug)]
pub struct Channel {
    pub dev_id: u32,
    pub name: Arc<str>,
    /// Local subscribers; each records its position here so leaving is O(1).
    pub subs: Vec<ConnId>,
}

/// What to do when all shards have answered a scattered question.
#[derive(Debug)]
pub enum Then {
    /// Send the `web_pipe2` delivery report to the publishing connection.
    DeliveryReport { conn: ConnId, pipe: String, message: String },
    /// Answer `pipe_count`; `remote`: the other nodes' subscribers.
    PipeCount { conn: ConnId, marker: String, remote: u64 },
    /// Answer `track_pipe_users`.
    TrackUsers { conn: ConnId, marker: String },
    /// Answer `pipe_log` with the channel's history.
    PipeLog { conn: ConnId, pipe: String, marker: String },
    /// Answer the `user_status` command.
    UserStatus { conn: ConnId, user_id: u64 },
    /// Answer the `user_data` command.
    UserData { conn: ConnId, user_id: u64, marker: String },
    /// Fill a statement's result in a CometQL connection's answer queue.
    Sql { conn: ConnId, slot: u64, index: usize, then: super::sql::SqlThen },
}

/// A question waiting for answers from other shards; the answers are
/// merged as they come.
#[derive(Debug)]
pub struct Pending {
    pub remaining: usize,
    pub count: u64,
    pub members: Vec<(u64, String)>,
    pub counts: Vec<u64>,
    /// The typed records gathered so far (CometQL renders them into rows;
    /// a frontend user question reads them directly).
    pub records: Records,
    /// What `records` count in the process's answer memory.
    pub charge: Charge,
    pub log: Vec<history::Entry>,
    /// A shard's change could not be stored: why (a CometQL write answers
    /// this error).
    pub failed: Option<Arc<str>>,
    /// The other nodes' part could not be read from Redis: why.
    pub remote_failed: Option<String>,
    pub then: Then,
}

/// An answer held until the store has the changes it made
/// (`--durability sync`).
#[derive(Debug)]
pub enum Deferred {
    /// Mail this reply to shard `to`.
    Reply { to: usize, req: u64, reply: Reply },
    /// Count this shard's own part of gather `req` as answered.
    Local(u64),
    /// Write a user's offline queue to a device once its removal is stored
    /// (and the live private messages that came meanwhile). `cost` is what
    /// `frames` would add to the device's outbound queue: the live ones
    /// join only within `--outbound-limit`, counting it.
    Frames { conn: ConnId, frames: Vec<Arc<[u8]>>, cost: usize },
}

/// What recording a handler's changes means for its answer.
#[derive(Debug)]
pub enum Written {
    /// Answer at once: nothing persisted changed (or nothing is persisted).
    Now,
    /// Answer once the store has batch `seq`.
    Wait(u64),
}

impl Then {
    /// The connection waiting for this answer.
    fn conn(&self) -> ConnId {
        match self {
            Then::DeliveryReport { conn, .. }
            | Then::PipeCount { conn, .. }
            | Then::TrackUsers { conn, .. }
            | Then::PipeLog { conn, .. }
            | Then::UserStatus { conn, .. }
            | Then::UserData { conn, .. }
            | Then::Sql { conn, .. } => *conn,
        }
    }
}

impl Pending {
    pub fn new(remaining: usize, then: Then) -> Pending {
        Pending {
            remaining,
            count: 0,
            members: Vec::new(),
            counts: Vec::new(),
            records: Records::None,
            charge: Charge::default(),
            log: Vec::new(),
            failed: None,
            remote_failed: None,
            then,
        }
    }

    fn merge(&mut self, reply: Reply) {
        match reply {
            Reply::Count(n) => self.count += n,
            Reply::Members(mut m) => self.members.append(&mut m),
            Reply::Counts(c) => {
                if self.counts.len() < c.len() {
                    self.counts.resize(c.len(), 0);
                }
                for (a, b) in self.counts.iter_mut().zip(c) {
                    *a += b;
                }
            }
            Reply::Log(mut l) => self.log.append(&mut l),
            Reply::Records(r) => self.records.append(r),
            Reply::Charged(r, c) => {
                self.records.append(r);
                self.charge.absorb(c);
            }
            Reply::Failed(e) => self.failed = Some(e),
        }
    }
}

/// Things a shard shares read-only with the process.
#[derive(Debug)]
pub struct Shared {
    pub config: Arc<Config>,
    pub registry: Arc<Registry>,
    /// Set by the main thread on SIGTERM/SIGINT.
    pub shutdown: Arc<AtomicBool>,
    /// Frontend connections held, in total and per client address.
    pub conn_counts: super::limits::ConnCounts,
    /// CometQL and HTTP API connections held (`--max-backend-connections`).
    pub backend_conns: std::sync::atomic::AtomicUsize,
    /// Answer bytes held for all of them (`--answer-memory-limit`).
    pub answers: Arc<super::answer_memory::AnswerMemory>,
    /// New frontend connections a second (`--max-accept-rate`).
    pub accept_rate: super::limits::AcceptRate,
    /// Failed backend logins per client address.
    pub auth_failures: super::limits::AuthFailures,
    /// The frontend's TLS configuration for new connections (SIGHUP
    /// replaces it); off when no certificate is configured.
    pub tls: crate::tls::Current,
}

/// One shard's whole state.
pub struct ShardCore {
    pub id: usize,
    pub shards: usize,
    pub shared: Arc<Shared>,
    pub metrics: Arc<ShardMetrics>,
    pub conns: Slab<Conn>,
    /// Channel lookup: dev_id → name → index into `channels`.
    pub channel_index: AHashMap<u32, AHashMap<Arc<str>, u32>>,
    pub channels: Vec<Option<Channel>>,
    free_channels: Vec<u32>,
    pub outbox: Outbox<Mail>,
    pub pending: AHashMap<u64, Pending>,
    next_req: u64,
    /// Connections with queued output not yet tried this round.
    pub dirty: Vec<ConnId>,
    /// With `--write-delay`: connections that channel messages made dirty,
    /// each written when its own window ends (on a later message's arrival,
    /// or at its deadline, which the I/O layer sleeps until), together with
    /// whatever else it was queued by then. A window opens when a
    /// connection's queue turns non-empty, so at most once until it is
    /// written; its mark is in the connection's `OutQueue`.
    pub delayed: super::delay::WriteDelay,
    /// Effects for the I/O layer, in order.
    pub effects: Vec<Effect>,
    /// Deliveries made since the I/O layer last reset it: the measure of a
    /// turn's work (see [`super::conn::WORK_PER_WAKE`]).
    pub work: usize,
    /// While a part of a backend's answer is built: the bytes reserved
    /// for it in the process's answer memory ([`Self::answer_room`]).
    pub(super) building: Option<usize>,
    /// Something that kept connections from being read may have changed
    /// (mail drained, answers came back): the I/O layer re-checks them.
    pub unpaused: bool,
    /// Seconds of shard time (the I/O layer's monotonic clock), for
    /// deadlines.
    pub now: u32,
    /// The same clock in milliseconds (for rate limits).
    pub now_ms: u64,
    /// Wall-clock unix seconds, for message timestamps and token expiry.
    pub unix: i64,
    /// Refused connections lingering for their answer to be read.
    pub refusing: usize,
    pub shutting_down: bool,
    /// History and settings of the channels homed here.
    pub history: HistoryStore,
    /// CometQL connection ids handed out by this shard.
    pub next_sql_id: u32,
    /// The users homed on this shard.
    pub users: crate::users::UserStore,
    /// Shard time of the last sweep of expired offline-queue entries.
    pub last_queue_purge: u32,
    /// Shard time a failed backend login was last logged.
    pub auth_log_at: Option<u32>,
    /// When a backend client not reading its answers was last logged.
    pub unread_log_at: Option<u32>,
    /// `--channel-rate`: this shard's share of browser publishes per channel.
    pub channel_rates: super::limits::ChannelRates,
    /// This shard's backend connections (CometQL and HTTP API), at most
    /// `--max-backend-connections`: where a new one looks for a slot to
    /// take when all are taken, without walking every connection.
    pub backends: Vec<ConnId>,
    /// This shard's lane to the storage thread; `None` with `--ephemeral`.
    pub store: Option<crate::store::writer::StoreHandle>,
    /// Answers waiting for the store, by batch number (ascending).
    pub deferred: std::collections::VecDeque<(u64, Deferred)>,
    /// `Deferred::Frames` entries in `deferred`: devices whose offline
    /// queue waits for its removal to be stored. Live private messages to
    /// them join the queue's frames, so they never overtake it.
    pub queues_waiting: usize,
    /// permessage-deflate: the shard's one compressor and one inflater
    /// (reset per message: no connection keeps a context), and the buffer
    /// client messages are inflated into.
    pub deflater: crate::ws::deflate::Deflater,
    pub inflater: crate::ws::deflate::Inflater,
    pub inflated: Vec<u8>,
    /// With `--redis`: the bridge to the other nodes (crate::cluster).
    pub cluster: Option<Arc<crate::cluster::Bridge>>,
}

/// What the core asks of the I/O layer, besides writing queued output.
#[derive(Debug)]
pub enum Effect {
    /// Shut the connection's socket both ways and forget it (the core
    /// already has).
    Close(ConnId),
    /// Move the connection's socket to shard `to`, with the bytes read so
    /// far; the core already forgot it.
    HandOff { id: ConnId, to: usize, peer: std::net::SocketAddr, head: Vec<u8> },
    /// Another shard handed a connection over: register its socket, then
    /// [`ShardCore::adopt`] it.
    Adopt(super::mail::Handoff),
    /// A CometQL client sent an SSLRequest: its transport becomes TLS, and
    /// `leftover` (read after the request) is the start of its ClientHello.
    /// The core reads plaintext again once the I/O layer decrypts it.
    StartTls { id: ConnId, leftover: Vec<u8> },
}

impl ShardCore {
    pub fn new(id: usize, shards: usize, shared: Arc<Shared>, mut outbox: Outbox<Mail>) -> ShardCore {
        let metrics = shared.registry.shards[id].clone();
        outbox.set_limit(shared.config.mail_limit);
        let channel_rates = super::limits::ChannelRates::new(shared.config.channel_rate, shards, 0);
        let delayed = super::delay::WriteDelay::new(shared.config.write_delay_ms);
        ShardCore {
            id,
            shards,
            shared,
            metrics,
            conns: Slab::default(),
            channel_index: AHashMap::default(),
            channels: Vec::new(),
            free_channels: Vec::new(),
            outbox,
            pending: AHashMap::default(),
            next_req: 0,
            dirty: Vec::new(),
            delayed,
            effects: Vec::new(),
            work: 0,
            building: None,
            unpaused: false,
            now: 0,
            now_ms: 0,
            unix: 0,
            refusing: 0,
            shutting_down: false,
            history: HistoryStore::default(),
            next_sql_id: 0,
            users: crate::users::UserStore::default(),
            last_queue_purge: 0,
            auth_log_at: None,
            unread_log_at: None,
            channel_rates,
            backends: Vec::new(),
            deflater: Default::default(),
            inflater: Default::default(),
            inflated: Vec::new(),
            store: None,
            deferred: Default::default(),
            queues_waiting: 0,
            cluster: None,
        }
    }

    /// Connects the shard to the store, with the state loaded for it: from
    /// now on its changes are recorded and sent.
    pub fn attach_store(
        &mut self,
        store: crate::store::writer::StoreHandle,
        mut users: crate::users::UserStore,
        mut history: HistoryStore,
    ) {
        users.journal = Some(Vec::new());
        history.journal = Some(Vec::new());
        self.users = users;
        self.history = history;
        self.store = Some(store);
    }

    /// Sends the changes recorded since the last call to the store.
    /// Returns what that means for the answer of the handler that made them.
    pub fn record_changes(&mut self) -> Written {
        let Some(store) = self.store.as_mut() else { return Written::Now };
        let mut changes = self.users.take_changes();
        changes.append(&mut self.history.take_changes());
        if changes.is_empty() {
            // Nothing to send: the list keeps its capacity for the next
            // changes (most calls, after every handler, find none).
            if let Some(j) = self.users.journal.as_mut() {
                *j = changes;
            }
            return Written::Now;
        }
        // Both modes wait for the storage thread: sync until the change is
        // on disk, async only until it is handed to the OS (no disk wait),
        // so that a crash of the process never loses an acknowledged write.
        // The queue entries put are tagged with the write group that will
        // hold them: their removals name it (`store::qlog`).
        let users = &mut self.users;
        let seq = store.send(changes, |c, group| users.retag(c, group));
        // The next changes go into a list the storage thread emptied.
        if let Some(j) = self.users.journal.as_mut()
            && j.capacity() == 0
        {
            *j = store.spare_list();
        }
        Written::Wait(seq)
    }

    /// Too many changes wait for the store, or too many publishes for
    /// Redis: stop reading clients.
    pub fn store_congested(&self) -> bool {
        self.store.as_ref().is_some_and(|s| s.is_congested()) || self.cluster.as_ref().is_some_and(|c| c.is_congested())
    }

    /// Why a publish cannot reach the other nodes now (`--redis` and Redis
    /// is down); `None` when it can (or there are no other nodes).
    pub fn cluster_down(&self) -> Option<String> {
        let c = self.cluster.as_ref()?;
        (!c.is_up())
            .then(|| format!("the cluster's Redis is down ({}); nothing was published, retry later", c.down_reason()))
    }

    /// Delivers what other nodes published (through Redis) to this shard's
    /// subscribers; lets clients be read again once the publishes waiting
    /// for Redis drained.
    pub fn cluster_progress(&mut self) {
        let Some(c) = self.cluster.clone() else { return };
        for msg in c.take(self.id) {
            match msg {
                crate::cluster::Inbound::Channel(p) => {
                    self.deliver_local(&p);
                }
                crate::cluster::Inbound::Private { dev_id, user_id, msgs } => {
                    self.deliver_private_from_cluster(dev_id, user_id, msgs);
                }
                crate::cluster::Inbound::State(changes) => self.apply_cluster_state(changes),
                crate::cluster::Inbound::Reload(snapshot) => self.reload_cluster_state(snapshot),
                crate::cluster::Inbound::Reseed => self.reseed_cluster_state(),
                crate::cluster::Inbound::Queues(answer) => self.cluster_queues_answered(answer),
                crate::cluster::Inbound::Rows { req, rows } => self.cluster_rows(req, rows),
                crate::cluster::Inbound::Evict { dev_id, user_id, conn } => self.cluster_evict(dev_id, user_id, conn),
            }
        }
        if !c.is_congested() && !self.store_congested() {
            self.unpause();
        }
    }

    /// Mails `reply` to shard `to` once the changes the answer made are
    /// stored (at once when there are none).
    fn reply_after_write(&mut self, to: usize, req: u64, reply: Reply) {
        match self.record_changes() {
            Written::Now => self.outbox.send(to, Mail::Reply { req, reply }),
            Written::Wait(seq) => self.deferred.push_back((seq, Deferred::Reply { to, req, reply })),
        }
    }

    /// Releases the answers whose changes the store now has (or failed to
    /// write), in order; lets clients be read again when the lane drained.
    pub fn storage_progress(&mut self) {
        let Some(store) = self.store.as_ref() else { return };
        let done = store.take_done();
        if done.is_empty() {
            return;
        }
        self.metrics.store_lane_peak.store(store.peak() as i64, std::sync::atomic::Ordering::Relaxed);
        self.metrics.store_down.store(store.dead().is_some() as i64, std::sync::atomic::Ordering::Relaxed);
        for d in done {
            while self.deferred.front().is_some_and(|(seq, _)| *seq <= d.upto) {
                let Some((_, action)) = self.deferred.pop_front() else { break };
                if d.error.is_some() {
                    ShardMetrics::add(&self.metrics.store_errors, 1);
                }
                match action {
                    Deferred::Reply { to, req, reply } => {
                        let reply = match &d.error {
                            Some(e) => Reply::Failed(e.clone()),
                            None => reply,
                        };
                        self.outbox.send(to, Mail::Reply { req, reply });
                    }
                    Deferred::Frames { conn, frames, .. } => {
                        self.queues_waiting -= 1;
                        for f in frames {
                            self.send_frame(conn, f);
                        }
                    }
                    Deferred::Local(req) => {
                        if let Some(p) = self.pending.get_mut(&req) {
                            p.remaining -= 1;
                            if let Some(e) = &d.error {
                                p.failed = Some(e.clone());
                            }
                            self.maybe_complete(req);
                        }
                    }
                }
            }
        }
        if !self.store_congested() {
            self.unpause();
        }
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Sets the clock: `now_ms` of monotonic shard time and the wall
    /// clock's unix seconds. The core reads no clock of its own.
    pub fn set_clock(&mut self, now_ms: u64, unix: i64) {
        self.now_ms = now_ms;
        self.now = (now_ms / 1000) as u32;
        self.unix = unix;
    }

    /// Tells the I/O layer to re-check the connections it stopped reading.
    pub fn unpause(&mut self) {
        self.unpaused = true;
    }

    pub fn find_channel(&self, dev_id: u32, name: &str) -> Option<u32> {
        self.channel_index.get(&dev_id)?.get(name).copied()
    }

    fn channel_or_create(&mut self, dev_id: u32, name: &str) -> u32 {
        if let Some(i) = self.find_channel(dev_id, name) {
            return i;
        }
        let name: Arc<str> = Arc::from(name);
        if let Some(c) = &self.cluster {
            c.channel_added(dev_id, &name);
        }
        let ch = Channel { dev_id, name: name.clone(), subs: Vec::new() };
        let idx = match self.free_channels.pop() {
            Some(i) => {
                self.channels[i as usize] = Some(ch);
                i
            }
            None => {
                self.channels.push(Some(ch));
                (self.channels.len() - 1) as u32
            }
        };
        self.channel_index.entry(dev_id).or_default().insert(name, idx);
        idx
    }

    /// Adds `id` to channel `name`; returns false if already subscribed.
    pub fn subscribe(&mut self, id: ConnId, dev_id: u32, name: &str) -> bool {
        let ch = self.channel_or_create(dev_id, name);
        let Some(conn) = self.conns.get_mut(id) else {
            return false;
        };
        if conn.subs.iter().any(|&(c, _)| c == ch) {
            return false;
        }
        let Some(channel) = self.channels[ch as usize].as_mut() else {
            return false;
        };
        conn.subs.push((ch, channel.subs.len() as u32));
        channel.subs.push(id);
        self.cluster_joined(id, ch);
        true
    }

    /// Removes `id` from channel index `ch` (O(1) swap-remove).
    pub fn unsubscribe(&mut self, id: ConnId, ch: u32) {
        self.cluster_left(id, ch);
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        let Some(k) = conn.subs.iter().position(|&(c, _)| c == ch) else {
            return;
        };
        let (_, pos) = conn.subs.swap_remove(k);
        let Some(channel) = self.channels[ch as usize].as_mut() else {
            return;
        };
        let pos = pos as usize;
        channel.subs.swap_remove(pos);
        if let Some(&moved) = channel.subs.get(pos)
            && let Some(mc) = self.conns.get_mut(moved)
            && let Some(entry) = mc.subs.iter_mut().find(|(c, _)| *c == ch)
        {
            entry.1 = pos as u32;
        }
        if channel.subs.is_empty() {
            let (dev_id, name) = (channel.dev_id, channel.name.clone());
            if let Some(c) = &self.cluster {
                c.channel_removed(dev_id, &name);
            }
            self.channels[ch as usize] = None;
            self.free_channels.push(ch);
            if let Some(m) = self.channel_index.get_mut(&dev_id) {
                m.remove(&*name);
                if m.is_empty() {
                    self.channel_index.remove(&dev_id);
                }
            }
        }
    }

    /// Number of local subscribers of a channel.
    pub fn local_count(&self, dev_id: u32, name: &str) -> u64 {
        self.find_channel(dev_id, name)
            .and_then(|i| self.channels[i as usize].as_ref())
            .map_or(0, |c| c.subs.len() as u64)
    }

    /// Presence members of a channel on this shard.
    pub fn local_members(&self, dev_id: u32, name: &str) -> Vec<(u64, String)> {
        let Some(ch) = self.find_channel(dev_id, name).and_then(|i| self.channels[i as usize].as_ref()) else {
            return Vec::new();
        };
        ch.subs.iter().filter_map(|&id| self.conns.get(id)).map(|c| (c.user_id, c.info.uuid().to_string())).collect()
    }

    /// Ends the `--write-delay` windows whose deadline is `now_ms` or
    /// before: their connections join the dirty list, unless the window
    /// already ended (on an arrival, or with an answer that took its
    /// frames along).
    pub fn end_delay_windows(&mut self, now_ms: u64) {
        let (conns, dirty) = (&mut self.conns, &mut self.dirty);
        self.delayed.take_due(now_ms, |id, mark| {
            if let Some(conn) = conns.get_mut(id)
                && conn.out.window == mark
            {
                conn.out.window = super::delay::WriteDelay::ended(mark);
                dirty.push(id);
            }
        });
    }

    /// When the next `--write-delay` window ends, if one is open; entries
    /// of windows that ended already are dropped, not waited for.
    pub fn next_delay_deadline(&mut self) -> Option<u64> {
        let conns = &self.conns;
        self.delayed.next_live_deadline(|id, mark| conns.get(id).is_some_and(|c| c.out.window == mark))
    }

    /// Writes a publication to this shard's subscribers; returns how many
    /// connections it was queued to.
    pub fn deliver_local(&mut self, p: &Publication) -> u64 {
        if p.store && home_shard_of_channel(p.dev_id, &p.msg.pipe, self.shards) == self.id {
            let entry = history::Entry {
                id: 0,
                time: p.msg.time.unwrap_or(self.unix),
                event: p.msg.event.clone(),
                message: p.msg.data.clone(),
                user_id: p.msg.user_id,
            };
            self.history.append(p.dev_id, &p.msg.pipe, entry, self.id, self.shards);
        }
        let Some(ch) = self.find_channel(p.dev_id, &p.msg.pipe) else {
            return 0;
        };
        let Some(channel) = self.channels[ch as usize].as_ref() else {
            return 0;
        };
        let delay = self.delayed.is_on();
        let now_ms = self.now_ms;
        let exclude = p.exclude.filter(|(s, _)| *s == self.id).map(|(_, c)| c);
        let limit = self.shared.config.outbound_limit;
        let mut delivered = 0u64;
        let (mut deflated, mut saved) = (0u64, 0u64);
        let mut slow: Vec<ConnId> = Vec::new();
        for &id in &channel.subs {
            if Some(id) == exclude {
                continue;
            }
            let Some(conn) = self.conns.get_mut(id) else {
                continue;
            };
            if !conn.accepts_messages() {
                continue;
            }
            let plain = if conn.legacy { p.legacy_frame() } else { &p.frame };
            let frame = match conn.deflate {
                0 => plain,
                w if crate::ws::deflate::fits_window(plain.len(), w) => {
                    p.deflated_frame(conn.legacy, &mut self.deflater).unwrap_or(plain)
                }
                _ => plain,
            };
            if conn.out.cost() + super::outq::OutQueue::cost_of(frame) > limit {
                slow.push(id);
                continue;
            }
            if frame.len() < plain.len() {
                deflated += 1;
                saved += (plain.len() - frame.len()) as u64;
            }
            if conn.push_out(frame.clone()) {
                if delay {
                    conn.out.window = self.delayed.open(id, conn.out.window, now_ms);
                } else {
                    self.dirty.push(id);
                }
            } else if delay && self.delayed.ends_on_arrival(conn.out.window, now_ms) {
                // Near its end: this message goes along (see `shard::delay`).
                conn.out.window = super::delay::WriteDelay::ended(conn.out.window);
                self.dirty.push(id);
            }
            delivered += 1;
        }
        ShardMetrics::add(&self.metrics.messages_out, delivered);
        if deflated > 0 {
            ShardMetrics::add(&self.metrics.deflated_frames, deflated);
            ShardMetrics::add(&self.metrics.deflate_bytes_saved, saved);
        }
        self.work += 1 + delivered as usize;
        for id in slow {
            self.close_slow_consumer(id);
        }
        delivered
    }

    /// Publishes on every shard; `then` (if any) runs when all have answered
    /// with the number of connections written.
    pub fn publish(&mut self, p: Publication, then: Option<Then>) {
        self.publish_many(vec![p], then);
    }

    /// Publishes several messages in order; `then` gets the total count.
    pub fn publish_many(&mut self, pubs: Vec<Publication>, then: Option<Then>) {
        let n = pubs.len();
        let req = then.map(|then| {
            let id = self.new_request(Pending::new((self.shards - 1) * n, then));
            (self.id, id)
        });
        for p in pubs {
            let p = Arc::new(p);
            if let Some(c) = &self.cluster {
                c.publish(&p);
            }
            let local = self.deliver_local(&p);
            let written = self.record_changes();
            let remote = if req.is_some() { self.cluster_count(p.dev_id, &p.msg.pipe) } else { 0 };
            if let Some((_, id)) = req
                && let Some(pending) = self.pending.get_mut(&id)
            {
                pending.count += local + remote;
                match written {
                    Written::Now => {}
                    Written::Wait(seq) => {
                        pending.remaining += 1;
                        self.deferred.push_back((seq, Deferred::Local(id)));
                    }
                }
            }
            for to in (0..self.shards).filter(|&s| s != self.id) {
                self.outbox.send(to, Mail::Deliver { publication: p.clone(), req });
            }
        }
        if let Some((_, id)) = req {
            self.maybe_complete(id);
        }
    }

    /// Registers a gather; its connection counts it against `--max-pending`.
    pub(super) fn new_request(&mut self, p: Pending) -> u64 {
        if let Some(c) = self.conns.get_mut(p.then.conn()) {
            c.pending = c.pending.saturating_add(1);
        }
        self.next_req += 1;
        self.pending.insert(self.next_req, p);
        self.next_req
    }

    /// Whether connection `id` may start another gather (`--max-pending`).
    pub fn may_ask(&self, id: ConnId) -> bool {
        self.conns.get(id).is_some_and(|c| c.pending < self.shared.config.max_pending)
    }

    /// Asks every shard (this one included) `query`; `then` runs with the
    /// merged answers.
    pub fn ask_all(&mut self, dev_id: u32, query: Query, then: Then) {
        let all: Vec<usize> = (0..self.shards).collect();
        self.ask_shards(&all, dev_id, query, then);
    }

    /// Asks the shards in `targets` (distinct) `query`; `then` runs with
    /// the merged answers.
    pub fn ask_shards(&mut self, targets: &[usize], dev_id: u32, query: Query, then: Then) {
        let others: Vec<usize> = targets.iter().copied().filter(|&s| s != self.id).collect();
        let local = targets.contains(&self.id).then(|| self.charged_answer(dev_id, &query));
        let written = self.record_changes();
        let remote = self.cluster_rows_wanted(&query);
        let waits =
            others.len() + matches!(written, Written::Wait(_)) as usize + matches!(remote, Some(Ok(_))) as usize;
        let mut pending = Pending::new(waits, then);
        if let Some(l) = local {
            pending.merge(l);
        }
        let ask = match remote {
            Some(Err(why)) => {
                pending.remote_failed = Some(why);
                None
            }
            Some(Ok(pipes)) => Some(pipes),
            None => None,
        };
        let id = self.new_request(pending);
        if let Some(pipes) = ask {
            self.cluster_ask_rows(id, dev_id, pipes);
        }
        if let Written::Wait(seq) = written {
            self.deferred.push_back((seq, Deferred::Local(id)));
        }
        let query = Arc::new(query);
        for to in others {
            self.outbox.send(to, Mail::Ask { dev_id, query: query.clone(), req: (self.id, id) });
        }
        self.maybe_complete(id);
    }

    /// The distinct home shards of `user_ids` (every shard for `None`).
    pub fn user_targets(&self, dev_id: u32, user_ids: Option<Vec<u64>>) -> Vec<usize> {
        match user_ids {
            None => (0..self.shards).collect(),
            Some(ids) => {
                let mut t: Vec<usize> = ids.iter().map(|&u| home_shard(dev_id, u, self.shards)).collect();
                t.sort_unstable();
                t.dedup();
                t
            }
        }
    }

    /// [`Self::answer`], with the records it built for a backend counted
    /// in the process's answer memory until whoever asked is done with
    /// them. The parts that can be big are built within a reservation
    /// taken first, so that shards building at once cannot pass the limit
    /// together.
    fn charged_answer(&mut self, dev_id: u32, q: &Query) -> Reply {
        use crate::users::UserQuery;
        // A browser's questions about its own user are not backend answers.
        if matches!(q, Query::User(UserQuery::Status(_) | UserQuery::Data(_))) {
            return self.answer(dev_id, q);
        }
        let pool = self.shared.answers.clone();
        let mut charge = Charge::default();
        if q.builds_within_room() {
            charge = Charge::reserve(&pool, self.sql_answer_limit());
            self.building = Some(charge.bytes());
        }
        let reply = self.answer(dev_id, q);
        self.building = None;
        match reply {
            Reply::Records(r) => {
                charge.set(&pool, r.weight());
                Reply::Charged(r, charge)
            }
            other => other,
        }
    }

    /// Answers a question from this shard's own state.
    pub fn answer(&mut self, dev_id: u32, q: &Query) -> Reply {
        let (me, shards) = (self.id, self.shards);
        let home = move |_: &ShardCore, name: &str| home_shard_of_channel(dev_id, name, shards) == me;
        match q {
            Query::Count(ch) => Reply::Count(self.local_count(dev_id, ch)),
            Query::Members(ch) => Reply::Members(self.local_members(dev_id, ch)),
            Query::Counts(names) => Reply::Counts(names.iter().map(|n| self.local_count(dev_id, n)).collect()),
            Query::Subscribers(names) => Reply::Records(self.local_subscribers(dev_id, names)),
            Query::History { names, rows, skip } => {
                // Never more than a backend connection may leave unread,
                // nor than the process's answer memory has left: past it,
                // nothing is built and the SELECT is refused.
                let mut budget = self.answer_room();
                let mut found = Vec::new();
                for n in names.iter().filter(|n| home(self, n)) {
                    match self.history.entries_within(dev_id, n, *rows, *skip, &mut budget) {
                        None => return Reply::Records(self.answer_refused()),
                        Some(m) if m.is_empty() => {}
                        Some(m) => found.push(ChannelHistory {
                            channel: n.clone(),
                            messages: m.into_iter().map(Into::into).collect(),
                        }),
                    }
                }
                Reply::Records(Records::History(found))
            }
            Query::HistoryDelete { names, ids } => {
                // `WHERE name AND id` removes those ids from those channels
                // only; `WHERE name` clears them; `WHERE id` looks everywhere.
                let mut n = 0;
                if ids.is_empty() {
                    for name in names.iter().filter(|n| home_shard_of_channel(dev_id, n, shards) == me) {
                        n += self.history.clear(dev_id, name);
                    }
                } else {
                    let within = (!names.is_empty()).then_some(&names[..]);
                    n += self.history.remove_ids(dev_id, within, ids);
                }
                Reply::Count(n)
            }
            Query::SettingsSet(items) => {
                let mut n = 0;
                for (name, len) in items.iter().filter(|(n, _)| home_shard_of_channel(dev_id, n, shards) == me) {
                    self.history.set_length(dev_id, name, *len);
                    n += 1;
                }
                Reply::Count(n)
            }
            Query::SettingsSelect(names) => {
                // Every channel's setting, unless names are given: sized
                // before anything is built.
                match self.history.settings_within(dev_id, names.as_deref(), self.answer_room()) {
                    Ok(v) => Reply::Records(Records::Settings(v)),
                    Err(size) => Reply::Records(self.refused_over(size)),
                }
            }
            Query::SettingsDelete(names) => {
                let mut n = 0;
                for name in names.iter().filter(|n| home_shard_of_channel(dev_id, n, shards) == me) {
                    n += self.history.remove_setting(dev_id, name) as u64;
                }
                Reply::Count(n)
            }
            Query::User(q) => self.answer_user(dev_id, q),
            Query::Log(name) => {
                if home(self, name) {
                    Reply::Log(self.history.entries(dev_id, name))
                } else {
                    Reply::Log(Vec::new())
                }
            }
        }
    }

    /// The local subscribers of `names` (`users_in_pipes`), channel by
    /// channel in the order asked.
    ///
    /// Within the bound of a backend connection's unread answers and what
    /// is left of the process's answer memory (each row counted as a
    /// gathered reply counts it), or [`Self::answer_refused`].
    fn local_subscribers(&self, dev_id: u32, names: &[Arc<str>]) -> Records {
        let mut left = self.answer_room();
        let mut subscribers = Vec::new();
        for name in names {
            let Some(ch) = self.find_channel(dev_id, name).and_then(|i| self.channels[i as usize].as_ref()) else {
                continue;
            };
            for c in ch.subs.iter().filter_map(|&id| self.conns.get(id)) {
                let info = &c.info;
                // The texts below (an address at most 40), counted as a
                // gathered reply counts them.
                let w = super::mail::weigh::subscriber(
                    name.len()
                        + info.uuid().len()
                        + info.user_agent().len()
                        + info.origin().len()
                        + info.language().len()
                        + 40,
                );
                let Some(l) = left.checked_sub(w) else {
                    return self.answer_refused();
                };
                left = l;
                subscribers.push(Subscriber {
                    channel: name.clone(),
                    user_id: c.user_id,
                    uuid: info.uuid().to_string(),
                    user_agent: Some(info.user_agent().to_string()),
                    ip: info.forwarded_ip().map_or_else(|| c.peer.ip().to_string(), str::to_string),
                    origin: Some(info.origin().to_string()),
                    language: Some(info.language().to_string()),
                });
            }
        }
        Records::Subscribers(subscribers)
    }

    pub(super) fn maybe_complete(&mut self, req: u64) {
        if self.pending.get(&req).is_some_and(|p| p.remaining == 0)
            && let Some(p) = self.pending.remove(&req)
        {
            let conn = p.then.conn();
            let max = self.shared.config.max_pending;
            let mut was_full = false;
            if let Some(c) = self.conns.get_mut(conn) {
                was_full = c.pending >= max;
                c.pending = c.pending.saturating_sub(1);
            }
            self.complete(p);
            if was_full {
                // A backend connection stopped at --max-pending reads again.
                self.resume(conn);
                self.unpause();
            }
        }
    }

    /// Handles one message from another shard.
    pub fn on_mail(&mut self, mail: Mail) {
        match mail {
            Mail::Deliver { publication, req } => {
                let n = self.deliver_local(&publication);
                match req {
                    Some((from, id)) => self.reply_after_write(from, id, Reply::Count(n)),
                    None => {
                        self.record_changes();
                    }
                }
            }
            Mail::Ask { dev_id, query, req: (from, id) } => {
                let reply = self.charged_answer(dev_id, &query);
                self.reply_after_write(from, id, reply);
            }
            Mail::Reply { req, reply } => {
                if let Some(p) = self.pending.get_mut(&req) {
                    p.remaining -= 1;
                    p.merge(reply);
                    self.maybe_complete(req);
                }
            }
            // The socket is the I/O layer's to register; it then calls `adopt`.
            Mail::Handoff(h) => self.effects.push(Effect::Adopt(h)),
        }
    }

    /// Seconds since the shard started, for `elapsed` checks.
    pub fn uptime(&self) -> u32 {
        self.now
    }
}
