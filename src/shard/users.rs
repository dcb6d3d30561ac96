//! The shard glue for users: authorizing a connection on its user's home
//! shard, the device array and offline queue in action, private messages,
//! online/offline events, and the CometQL user tables.

use std::slice;
use std::sync::Arc;

use super::conn::Phase;
use super::core::{Deferred, ShardCore, Written};
use super::mail::{Publication, Records, Reply, encode_text_frame, weigh};
use super::outq::OutQueue;
use super::{ConnId, home_shard};
use crate::cluster::RedisQueue;
use crate::cometql::session::Passwords;
use crate::frontend::message::{self, ChannelMessage, Delivery};
use crate::metrics::ShardMetrics;
use crate::users::{Presence, QueueCap, Queued, UserQuery, jwt, queued_cost};
use crate::ws::CloseCode;

/// Close code for a device whose authorization was withdrawn
/// (`users_auth` DELETE or a revoked token).
pub const CLOSE_DEAUTHORIZED: CloseCode = CloseCode(4001);
/// Close code for the oldest device replaced by a 17th (docs/protocol.md, "Users and devices").
pub const CLOSE_REPLACED: CloseCode = CloseCode(4009);

impl ShardCore {
    /// The JWT secret of a dev_id: its password followed by the dev_id.
    pub fn jwt_secret(&self, dev_id: u32) -> Vec<u8> {
        format!("{}{dev_id}", self.shared.config.password(dev_id)).into_bytes()
    }

    fn queue_ttl(&self) -> i64 {
        self.shared.config.offline_queue_ttl.as_secs() as i64
    }

    /// An offline queue's bounds: `--offline-queue-size` messages, and
    /// half of `--outbound-limit` in bytes ([`QueueCap`]).
    fn queue_cap(&self) -> QueueCap {
        let cfg = &self.shared.config;
        QueueCap { count: cfg.offline_queue_size, bytes: cfg.outbound_limit / 2 }
    }

    /// Checks a connecting user's key; called on the user's home shard.
    pub fn authorize(&self, dev_id: u32, user_id: u64, key: &str) -> bool {
        debug_assert_eq!(home_shard(dev_id, user_id, self.shards), self.id);
        self.users.authorize(dev_id, user_id, key, &self.jwt_secret(dev_id), self.unix)
    }

    /// After `serverInfo` of an authorized connection: deliver the offline
    /// queue, register the device (replacing the oldest of 16), announce
    /// `online` if it is the first device.
    pub fn attach_device(&mut self, id: ConnId, dev_id: u32, user_id: u64) {
        let now = self.unix;
        let legacy = self.conns.get(id).is_some_and(|c| c.legacy);
        let mut frames: Vec<_> = self
            .users
            .take_queue(dev_id, user_id, self.queue_ttl(), now)
            .into_iter()
            .map(|q| {
                let msg = private_message(q.event(), q.message(), Some(q.time));
                let d = Delivery { legacy, history_marker: None, from_queue: true };
                encode_text_frame(|o| msg.encode(d, o))
            })
            .collect();
        // The queue was bounded to half of --outbound-limit as it was
        // filled, by an estimate; the frames are measured here, so that
        // escapes in the JSON, or a store filled under a larger limit, can
        // never close the device as a slow consumer, which would lose the
        // whole queue. The oldest that do not fit are dropped and counted.
        let budget = self.queue_cap().bytes;
        let mut cost = 0;
        let fit = frames.iter().rev().take_while(|f| {
            cost += OutQueue::cost_of(f);
            cost <= budget
        });
        let dropped = frames.len() - fit.count();
        if dropped > 0 {
            frames.drain(..dropped);
            ShardMetrics::add(&self.metrics.offline_dropped, dropped as u64);
        }
        // The queue is sent once its removal is stored (on disk with
        // --durability sync), so a crash cannot deliver it a second time.
        match self.record_changes() {
            Written::Wait(seq) if !frames.is_empty() => {
                self.queues_waiting += 1;
                let cost = frames.iter().map(|f| OutQueue::cost_of(f)).sum();
                self.deferred.push_back((seq, Deferred::Frames { conn: id, frames, cost }));
            }
            _ => {
                for f in frames {
                    self.send_frame(id, f);
                }
            }
        }
        let reg = self.users.add_device(dev_id, user_id, id);
        self.cluster_device_attached(dev_id, user_id, id);
        if reg.first
            && let Some(c) = &self.cluster
        {
            c.user_added(dev_id, user_id);
            // users_time on the other nodes: online now.
            self.users.journal_online(dev_id, user_id);
        }
        if let Some(old) = reg.evicted {
            self.send_error(old, "device limit reached: replaced by a newer connection");
            self.close_ws(old, CLOSE_REPLACED, "device limit reached");
        }
        if reg.first {
            match &self.cluster {
                Some(c) => c.user_presence(dev_id, user_id, true),
                None => self.user_status_event(dev_id, user_id, "online"),
            }
        }
    }

    /// Unregisters a closing connection's device; announces `offline` when
    /// it was the last. Safe to call more than once.
    pub fn detach_device(&mut self, id: ConnId) {
        let Some(c) = self.conns.get(id) else { return };
        if c.user_id == 0 {
            return;
        }
        let (dev_id, user_id) = (c.dev_id, c.user_id);
        self.cluster_device_detached(dev_id, user_id, id);
        if self.users.remove_device(dev_id, user_id, id, self.unix) {
            match &self.cluster {
                Some(c) => {
                    c.user_removed(dev_id, user_id);
                    c.user_presence(dev_id, user_id, false);
                }
                None => self.user_status_event(dev_id, user_id, "offline"),
            }
        }
    }

    fn user_status_event(&mut self, dev_id: u32, user_id: u64, word: &str) {
        let msg = ChannelMessage {
            pipe: format!("user_status_{user_id}"),
            event: word.to_string(),
            data: word.to_string(),
            data_is_json: false,
            time: None,
            user_id: None,
        };
        let mut p = Publication::new(dev_id, msg, None);
        p.store = false;
        self.publish(p, None);
    }

    /// Closes every device of a user with an error frame and 4001.
    pub(super) fn deauthorize(&mut self, devices: &[ConnId], why: &str) {
        for &d in devices {
            self.send_error(d, why);
            self.close_ws(d, CLOSE_DEAUTHORIZED, why);
        }
    }

    /// Delivers a private message to every device, or queues it. Returns
    /// false when the queue had to drop its oldest message.
    fn send_private(&mut self, dev_id: u32, user_id: u64, event: &str, text: &str) -> bool {
        let devices = self.users.devices(dev_id, user_id);
        let now = self.unix;
        if let Some(c) = &self.cluster {
            // Devices on other nodes get it through Redis; with none here,
            // Redis queues it when no node has one (docs/cluster.md).
            let queue = devices.is_empty().then(|| RedisQueue {
                cap: self.queue_cap(),
                ttl: self.shared.config.offline_queue_ttl.as_secs(),
                at: now,
            });
            c.send_private(dev_id, user_id, event, text, queue);
            if devices.is_empty() {
                return true;
            }
        } else if devices.is_empty() {
            let q = Queued::new(now, event, text);
            let e = self.users.enqueue(dev_id, user_id, q, self.queue_cap(), self.queue_ttl(), now);
            ShardMetrics::add(&self.metrics.offline_dropped, e.dropped);
            if e.queued {
                ShardMetrics::add(&self.metrics.offline_queued, 1);
            }
            return e.dropped == 0;
        }
        let msg = private_message(event, text, None);
        let p = Publication::new(dev_id, msg, None);
        for d in devices {
            let legacy = self.conns.get(d).is_some_and(|c| c.legacy);
            let frame = if legacy { p.legacy_frame().clone() } else { p.frame.clone() };
            self.send_after_queue(d, frame);
        }
        true
    }

    /// Sends a live frame to device `d`, after its offline queue if that
    /// still waits for its removal to be stored. A frame that waits there
    /// is held to `--outbound-limit` as if it were queued for the socket:
    /// the device's outbound queue plus what waits plus this frame. Past
    /// the limit the device is closed as a slow consumer (4008) and what
    /// waits is dropped, as `send_frame` drops what a socket did not start.
    fn send_after_queue(&mut self, d: ConnId, frame: Arc<[u8]>) {
        let Some(i) = self.queue_waiting_for(d) else {
            self.send_frame(d, frame);
            return;
        };
        let limit = self.shared.config.outbound_limit;
        let Some(conn) = self.conns.get(d) else { return };
        let (queued, phase) = (conn.out.cost(), conn.phase);
        let Some((_, Deferred::Frames { frames, cost, .. })) = self.deferred.get_mut(i) else { return };
        match phase {
            Phase::Comet | Phase::Echo if queued + *cost + OutQueue::cost_of(&frame) > limit => {
                frames.clear();
                *cost = 0;
                self.close_slow_consumer(d);
            }
            Phase::Closing { .. } => {}
            _ => {
                *cost += OutQueue::cost_of(&frame);
                frames.push(frame);
            }
        }
    }

    /// Where in `deferred` the offline-queue frames still waiting for their
    /// removal to be stored for device `d` are, if any: a live message
    /// goes after them.
    fn queue_waiting_for(&self, d: ConnId) -> Option<usize> {
        if self.queues_waiting == 0 {
            return None;
        }
        self.deferred.iter().rposition(|(_, a)| matches!(a, Deferred::Frames { conn, .. } if *conn == d))
    }

    /// Writes private messages another node sent (or the user's offline
    /// queue taken from Redis) to the user's devices on this node. Queued
    /// messages older than `--offline-queue-ttl` are dropped, as in a
    /// local queue.
    pub fn deliver_private_from_cluster(&mut self, dev_id: u32, user_id: u64, msgs: Vec<crate::cluster::PrivateMsg>) {
        let devices = self.users.devices(dev_id, user_id);
        let ttl = self.queue_ttl();
        if devices.is_empty() {
            // The user's last device here closed while the queue taken
            // from Redis for it was on its way: this node took it alone, so
            // it goes back through Redis, which queues it again while no
            // node holds a device (after this node's detach, which the
            // publisher sends first) or sends it to one that does. (A live
            // message also went to the user's other nodes: resending it
            // would deliver it twice there.)
            if let Some(c) = &self.cluster {
                let (cap, ttl_secs) = (self.queue_cap(), self.shared.config.offline_queue_ttl.as_secs());
                for m in &msgs {
                    if let Some(at) = m.queued_at.filter(|t| t.saturating_add(ttl) >= self.unix) {
                        let queue = RedisQueue { cap, ttl: ttl_secs, at };
                        c.send_private(dev_id, user_id, &m.event, &m.text, Some(queue));
                    }
                }
            }
            return;
        }
        // A queue read from Redis for a device that just connected is held
        // to the same bytes as a single node's (half of --outbound-limit,
        // each message counted by `queued_cost`): the newest that fit go. Sent whole, a
        // queue of big messages closed the device as a slow consumer and
        // was lost. Redis bounds the queue by count only.
        let budget = self.queue_cap().bytes;
        let mut cost = 0usize;
        let mut oldest_kept = 0;
        for (i, m) in msgs.iter().enumerate().rev() {
            if m.queued_at.is_none() {
                continue;
            }
            cost += queued_cost(m.event.len(), m.text.len());
            if cost > budget {
                oldest_kept = i + 1;
                break;
            }
        }
        let dropped = msgs[..oldest_kept].iter().filter(|m| m.queued_at.is_some()).count();
        ShardMetrics::add(&self.metrics.offline_dropped, dropped as u64);
        for (i, m) in msgs.into_iter().enumerate() {
            if m.queued_at.is_some_and(|t| i < oldest_kept || t.saturating_add(ttl) < self.unix) {
                continue;
            }
            let msg = private_message(&m.event, &m.text, m.queued_at);
            // Encoded once per message (and once more only if a legacy
            // device is among the user's), not once per device.
            let mut frames: [Option<Arc<[u8]>>; 2] = [None, None];
            for &d in &devices {
                let legacy = self.conns.get(d).is_some_and(|c| c.legacy);
                let f = frames[legacy as usize].get_or_insert_with(|| {
                    let delivery = Delivery { legacy, history_marker: None, from_queue: m.queued_at.is_some() };
                    encode_text_frame(|o| msg.encode(delivery, o))
                });
                let f = f.clone();
                self.send_frame(d, f);
            }
        }
    }

    /// Carries out a user-table operation for the users homed here.
    pub fn answer_user(&mut self, dev_id: u32, q: &UserQuery) -> Reply {
        let (me, shards) = (self.id, self.shards);
        let mine = |u: u64| home_shard(dev_id, u, shards) == me;
        let now = self.unix;
        let ttl = self.queue_ttl();
        match q {
            UserQuery::AuthSet(v) => {
                let mine_rows: Vec<_> = v.iter().filter(|(u, _)| mine(*u)).collect();
                for (uid, hash) in &mine_rows {
                    self.users.set_key(dev_id, *uid, hash);
                }
                Reply::Count(mine_rows.len() as u64)
            }
            UserQuery::AuthSelect(ids) => {
                Reply::Records(self.texts(dev_id, ids, |u| u.key.as_deref(), Records::Keys, self.answer_room()))
            }
            UserQuery::AuthDelete(ids) => {
                let mut n = 0;
                for &u in ids.iter().filter(|u| mine(**u)) {
                    let (had, devices) = self.users.remove_key(dev_id, u);
                    n += had as u64;
                    self.deauthorize(&devices, "authorization removed by the backend");
                }
                Reply::Count(n)
            }
            UserQuery::Send(v) => {
                let mut n = 0;
                for (uid, event, text) in v.iter().filter(|(u, _, _)| mine(*u)) {
                    n += self.send_private(dev_id, *uid, event, text) as u64;
                }
                Reply::Count(n)
            }
            UserQuery::QueueSelect(ids) => {
                // Within the bound of a backend connection's unread
                // answers and the process's answer memory left, or
                // nothing (a queue is at most half of --outbound-limit, a
                // thousand of them far more).
                let mut left = self.answer_room();
                let mut found = Vec::new();
                for &u in ids.iter().filter(|u| mine(**u)) {
                    let q = self.users.queued(dev_id, u, ttl, now);
                    let Some(l) = left.checked_sub(weigh::queue(&q)) else {
                        return Reply::Records(self.answer_refused());
                    };
                    left = l;
                    if !q.is_empty() {
                        found.push((u, q));
                    }
                }
                Reply::Records(Records::Queues(found))
            }
            UserQuery::QueueDelete(ids) => {
                Reply::Count(ids.iter().filter(|u| mine(**u)).map(|&u| self.users.clear_queue(dev_id, u)).sum())
            }
            UserQuery::Time(ids) => Reply::Records(Records::Presences(self.presences(dev_id, ids))),
            UserQuery::DataSet(v) => {
                let mine_rows: Vec<_> = v.iter().filter(|(u, _)| mine(*u)).collect();
                for (uid, data) in &mine_rows {
                    self.users.set_data(dev_id, *uid, data);
                }
                Reply::Count(mine_rows.len() as u64)
            }
            UserQuery::DataSelect(ids) => {
                Reply::Records(self.texts(dev_id, ids, |u| u.data.as_deref(), Records::Data, self.answer_room()))
            }
            UserQuery::DataDelete(ids) => {
                Reply::Count(ids.iter().filter(|u| mine(**u)).map(|&u| self.users.remove_data(dev_id, u) as u64).sum())
            }
            UserQuery::Revoke(tokens) => {
                let secret = self.jwt_secret(dev_id);
                let mut n = 0;
                for t in tokens.iter().filter(|t| mine(jwt::claimed_user(t).unwrap_or(0))) {
                    self.users.revoke(dev_id, t);
                    n += 1;
                    if let Some(uid) = jwt::claimed_user(t)
                        && jwt::verify(t, &secret, uid, now).is_ok()
                    {
                        let devices = self.users.devices(dev_id, uid);
                        self.deauthorize(&devices, "token revoked by the backend");
                    }
                }
                Reply::Count(n)
            }
            UserQuery::RevokedSelect(filter) => {
                // Every revoked token, unless some are named: sized before
                // anything is built.
                let found = || {
                    self.users.revoked_iter(dev_id).filter(|t| filter.as_ref().is_none_or(|f| f.iter().any(|x| x == t)))
                };
                let size = found().map(weigh::token).sum::<usize>();
                if size > self.answer_room() {
                    return Reply::Records(self.refused_over(size));
                }
                let mut v: Vec<String> = found().map(str::to_string).collect();
                v.sort();
                Reply::Records(Records::Tokens(v))
            }
            UserQuery::Unrevoke(tokens) => Reply::Count(
                tokens
                    .iter()
                    .filter(|t| mine(jwt::claimed_user(t).unwrap_or(0)))
                    .map(|t| self.users.unrevoke(dev_id, t) as u64)
                    .sum(),
            ),
            // The frontend's questions about one user: the records of
            // `users_time` and `users_data` for that user alone.
            UserQuery::Status(u) => Reply::Records(Records::Presences(self.presences(dev_id, slice::from_ref(u)))),
            // One user's data, for a browser: within a connection's bound
            // alone (the process's answer memory is the backends').
            UserQuery::Data(u) => Reply::Records(self.texts(
                dev_id,
                slice::from_ref(u),
                |u| u.data.as_deref(),
                Records::Data,
                self.sql_answer_limit(),
            )),
        }
    }

    /// (user id, text) for the users homed here among `ids` that have the
    /// text `field` picks (a key, user data).
    ///
    /// Within `room` bytes (each text counted as a gathered reply counts
    /// it: `mail::weigh`), or [`ShardCore::answer_refused`] with nothing
    /// built.
    fn texts(
        &self,
        dev_id: u32,
        ids: &[u64],
        field: impl Fn(&crate::users::User) -> Option<&str>,
        records: fn(Vec<(u64, String)>) -> Records,
        room: usize,
    ) -> Records {
        let mine = |u: &&u64| home_shard(dev_id, **u, self.shards) == self.id;
        let found = || ids.iter().filter(mine).filter_map(|&u| Some((u, field(self.users.get(dev_id, u)?)?)));
        let size = found().map(|(_, t)| weigh::text(t)).sum::<usize>();
        if size > room {
            return self.refused_over(size);
        }
        records(found().map(|(u, t)| (u, t.to_string())).collect())
    }

    /// (user id, presence) for the users homed here among `ids`.
    fn presences(&self, dev_id: u32, ids: &[u64]) -> Vec<(u64, Presence)> {
        ids.iter()
            .filter(|&&u| home_shard(dev_id, u, self.shards) == self.id)
            .map(|&u| (u, self.users.presence(dev_id, u)))
            .collect()
    }

    /// Answers the `user_status` command once the home shard replied with
    /// the user's presence (`unknown` for a user it has never seen).
    pub fn answer_user_status(&mut self, conn: ConnId, user_id: u64, records: Records) {
        let Some(c) = self.conns.get(conn) else { return };
        let legacy = c.legacy;
        let presence = match records {
            Records::Presences(v) => v.into_iter().find(|(u, _)| *u == user_id).map(|(_, p)| p),
            _ => None,
        }
        .unwrap_or(Presence::Unknown);
        let (word, time) = (presence.word(), presence.time());
        let f = encode_text_frame(|o| message::user_status_answer(user_id, word, time, self.unix, legacy, o));
        self.send_frame(conn, f);
    }

    /// Answers the `user_data` command once the home shard replied with
    /// the user's data text; a user without data gets an empty text.
    pub fn answer_user_data(&mut self, conn: ConnId, user_id: u64, marker: &str, records: Records) {
        let Some(c) = self.conns.get(conn) else { return };
        let legacy = c.legacy;
        let data = match records {
            Records::Data(v) => v.into_iter().find(|(u, _)| *u == user_id).map(|(_, d)| d),
            _ => None,
        }
        .unwrap_or_default();
        let f = encode_text_frame(|o| message::user_data_answer(user_id, &data, marker, self.unix, legacy, o));
        self.send_frame(conn, f);
    }

    /// Drops expired offline-queue entries once a minute.
    pub fn purge_queues(&mut self) {
        if self.now.saturating_sub(self.last_queue_purge) >= 60 {
            self.last_queue_purge = self.now;
            let ttl = self.queue_ttl();
            let retention = self.shared.config.user_retention.as_secs() as i64;
            self.users.purge_expired(ttl, self.unix, retention);
        }
    }
}

/// A private message on pipe `msg`.
fn private_message(event: &str, text: &str, time: Option<i64>) -> ChannelMessage {
    ChannelMessage {
        pipe: "msg".into(),
        event: event.to_string(),
        data: text.to_string(),
        data_is_json: false,
        time,
        user_id: None,
    }
}
