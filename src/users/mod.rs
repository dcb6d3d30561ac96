//! Users, sans-IO: keys, the fixed 16-slot device array, the ring-buffer
//! offline queue, last-online times, user data and revoked tokens
//! (docs/protocol.md, "Users and devices"). One [`UserStore`] lives on each shard and holds the
//! users whose home is that shard, so every operation on a user is local.
//!
//! An offline user costs one map entry and a small struct: the device array
//! is boxed and exists only while the user is online, and the queue holds no
//! allocation while empty.

pub mod jwt;

use std::collections::VecDeque;

use ahash::{AHashMap, AHashSet};
use smallvec::SmallVec;

use crate::domain::{ConnId, ct_eq};
use crate::store::Change;

/// `offline_since` of a user with a device on another node (`--redis`):
/// the shared last-online time says "online now".
pub const ONLINE_ON_ANOTHER_NODE: i64 = -1;

/// Devices (authorized connections) one user may have at once.
pub const MAX_DEVICES: usize = 16;

/// A private message waiting for the user to come back. Event and message
/// share one allocation (the event is at most 64 bytes), since an offline
/// user's queue is what a million idle users cost.
#[derive(Debug, Clone)]
pub struct Queued {
    /// When it was queued (unix seconds); sent as `message_send_time`.
    pub time: i64,
    /// The event name followed by the message text.
    text: Box<str>,
    /// Where the store keeps it: the write group its record was written
    /// in (48 bits, in what would be padding), so that its removal tells
    /// the storage thread which record to count down without a lookup
    /// per message there (`store::qlog`). [`TAG_PENDING`] until the
    /// shard's changes are sent; 0 for an entry of store format 1.
    tag: [u16; 3],
    event_len: u8,
}

/// The tag of a queue entry whose change has not been sent to the store
/// yet: it is in the batch being built.
pub const TAG_PENDING: u64 = (1 << 48) - 1;

/// Equal messages: the store's tag is bookkeeping, not part of it.
impl PartialEq for Queued {
    fn eq(&self, o: &Queued) -> bool {
        self.time == o.time && self.event_len == o.event_len && self.text == o.text
    }
}

impl Eq for Queued {}

impl Queued {
    /// A queued message; an event longer than 255 bytes is cut (CometQL
    /// allows 64).
    pub fn new(time: i64, event: &str, message: &str) -> Queued {
        let mut cut = event.len().min(255);
        while !event.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut text = String::with_capacity(cut + message.len());
        text.push_str(&event[..cut]);
        text.push_str(message);
        let mut q = Queued { time, text: text.into_boxed_str(), tag: [0; 3], event_len: cut as u8 };
        q.set_tag(TAG_PENDING);
        q
    }

    pub fn event(&self) -> &str {
        &self.text[..self.event_len as usize]
    }

    pub fn message(&self) -> &str {
        &self.text[self.event_len as usize..]
    }

    /// The store's tag (the low 48 bits of a write group).
    pub fn tag(&self) -> u64 {
        self.tag[0] as u64 | (self.tag[1] as u64) << 16 | (self.tag[2] as u64) << 32
    }

    pub fn set_tag(&mut self, group: u64) {
        self.tag = [group as u16, (group >> 16) as u16, (group >> 32) as u16];
    }

    /// The message with the store's tag set.
    pub fn tagged(mut self, group: u64) -> Queued {
        self.set_tag(group);
        self
    }

    /// About what delivering it costs a connection's outbound queue: its
    /// text, the event a second time (legacy clients get `event_name` too)
    /// and [`QUEUED_FRAME_OVERHEAD`]. Escapes in the JSON are not counted:
    /// the delivery measures the real frames (`attach_device`).
    pub fn cost(&self) -> usize {
        queued_cost(self.event().len(), self.message().len())
    }
}

/// [`Queued::cost`] of a message with an event and a text of these
/// lengths; also what a node counts for a queue it reads from Redis.
pub fn queued_cost(event_len: usize, message_len: usize) -> usize {
    message_len + 2 * event_len + QUEUED_FRAME_OVERHEAD
}

/// What a queued message's frame holds besides its text, at most: the JSON
/// keys and punctuation, the send time, the WebSocket header, and the
/// bookkeeping an outbound queue counts per frame (64 bytes).
pub const QUEUED_FRAME_OVERHEAD: usize = 224;

/// What [`UserStore::enqueue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The message is in the queue.
    pub queued: bool,
    /// Messages dropped: the oldest, to make room, or this one.
    pub dropped: u64,
}

/// The bounds of one user's offline queue: at most `count` messages
/// (`--offline-queue-size`) whose [`Queued::cost`] adds up to at most
/// `bytes` (half of `--outbound-limit`, so that a device that connects
/// takes its whole queue without being closed as a slow consumer).
#[derive(Debug, Clone, Copy)]
pub struct QueueCap {
    pub count: usize,
    pub bytes: usize,
}

/// An offline queue, oldest first. `head` is the stored position of the
/// oldest entry: entries are stored at consecutive positions, so removing
/// the oldest is one delete of a key the store can compute.
#[derive(Debug, Default)]
pub struct Queue {
    pub head: u64,
    pub items: VecDeque<Queued>,
    /// The sum of the items' [`Queued::cost`].
    pub bytes: usize,
}

/// The device slots of an online user.
#[derive(Debug, Default)]
pub struct Devices {
    slots: [Option<ConnId>; MAX_DEVICES],
    /// Registration order per slot, to find the oldest.
    since: [u64; MAX_DEVICES],
}

/// One user.
#[derive(Debug, Default)]
pub struct User {
    /// The key set with `users_auth` (compared in constant time).
    pub key: Option<Box<str>>,
    /// Text set with `users_data`.
    pub data: Option<Box<str>>,
    /// Present while at least one device is connected.
    pub devices: Option<Box<Devices>>,
    /// The offline queue: a ring bounded by the configured capacity; boxed
    /// so that a user without one pays 8 bytes, not a `VecDeque`'s 32.
    pub queue: Option<Box<Queue>>,
    /// Unix time the last device closed; 0 when never seen offline;
    /// [`ONLINE_ON_ANOTHER_NODE`] in a cluster.
    pub offline_since: i64,
}

impl User {
    fn is_empty(&self) -> bool {
        self.key.is_none()
            && self.data.is_none()
            && self.devices.is_none()
            && self.queue.is_none()
            && self.offline_since == 0
    }
}

/// What registering a device did.
#[derive(Debug, PartialEq, Eq)]
pub struct Registered {
    /// It is the user's only device: publish `online`.
    pub first: bool,
    /// The oldest device, replaced because all 16 slots were taken.
    pub evicted: Option<ConnId>,
}

/// `users_time` / `user_status`: online now, offline since, or unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Online,
    Offline(i64),
    Unknown,
}

impl Presence {
    /// The `users_time` value: 0 online, the offline time, or -1.
    pub fn time(self) -> i64 {
        match self {
            Presence::Online => 0,
            Presence::Offline(t) => t,
            Presence::Unknown => -1,
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            Presence::Online => "online",
            Presence::Offline(_) => "offline",
            Presence::Unknown => "unknown",
        }
    }
}

/// The users homed on one shard.
#[derive(Debug, Default)]
pub struct UserStore {
    users: AHashMap<u32, AHashMap<u64, User>>,
    revoked: AHashMap<u32, AHashSet<Box<str>>>,
    registrations: u64,
    /// Messages dropped from full offline queues, or too large to queue.
    pub dropped: u64,
    /// Changes to persisted state not yet sent to the store; `None` when
    /// nothing is persisted (`--ephemeral`).
    pub journal: Option<Vec<Change>>,
}

impl UserStore {
    fn log(&mut self, c: impl FnOnce() -> Change) {
        if let Some(j) = self.journal.as_mut() {
            j.push(c());
        }
    }

    /// The changes recorded since the last call.
    pub fn take_changes(&mut self) -> Vec<Change> {
        self.journal.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Tags the entries queued by `changes` (now on their way to the
    /// store) with the write group that will hold them.
    pub fn retag(&mut self, changes: &[Change], group: u64) {
        for c in changes {
            if let Change::QueuePut { dev, uid, seq, .. } = c
                && let Some(q) = self.users.get_mut(dev).and_then(|m| m.get_mut(uid)).and_then(|u| u.queue.as_mut())
                && let Some(m) = seq.checked_sub(q.head).and_then(|i| q.items.get_mut(i as usize))
            {
                m.set_tag(group);
            }
        }
    }

    /// Puts back state read from the store at start (not journaled).
    pub fn restore(&mut self, c: Change) {
        match c {
            Change::Key { dev, uid, key } => self.entry(dev, uid).key = key,
            Change::Data { dev, uid, data } => self.entry(dev, uid).data = data,
            Change::LastOnline { dev, uid, time } => self.entry(dev, uid).offline_since = time.unwrap_or(0),
            Change::Revoked { dev, token, on: true } => {
                self.revoked.entry(dev).or_default().insert(token);
            }
            Change::QueuePut { dev, uid, seq, msg } => {
                let q = self
                    .entry(dev, uid)
                    .queue
                    .get_or_insert_with(|| Box::new(Queue { head: seq, items: VecDeque::new(), bytes: 0 }));
                q.bytes += msg.cost();
                q.items.push_back(msg);
            }
            _ => {}
        }
    }

    /// Applies a change another node made (`--redis`), not journaled:
    /// unlike [`UserStore::restore`], removals too.
    pub fn apply_remote(&mut self, c: Change) {
        match c {
            Change::Revoked { dev, token, on: false } => {
                if let Some(s) = self.revoked.get_mut(&dev) {
                    s.remove(&token);
                    if s.is_empty() {
                        self.revoked.remove(&dev);
                    }
                }
            }
            Change::Key { dev, uid, .. } | Change::Data { dev, uid, .. } | Change::LastOnline { dev, uid, .. } => {
                self.restore(c);
                self.tidy(dev, uid);
            }
            Change::Revoked { .. } => self.restore(c),
            // Offline queues live in Redis lists in a cluster.
            _ => {}
        }
    }

    /// Forgets every key, user data, last-online time and revoked token
    /// (not the devices nor the queues), before the state is loaded again
    /// from Redis.
    pub fn clear_persisted(&mut self) {
        for m in self.users.values_mut() {
            for u in m.values_mut() {
                u.key = None;
                u.data = None;
                u.offline_since = 0;
            }
            m.retain(|_, u| !u.is_empty());
        }
        self.users.retain(|_, m| !m.is_empty());
        self.revoked.clear();
    }

    /// Journals every key, user data, last-online time and revoked token
    /// as puts: to write them to a store that lost them (an empty Redis).
    pub fn journal_all(&mut self) {
        let Some(j) = self.journal.as_mut() else { return };
        for (&dev, m) in &self.users {
            for (&uid, u) in m {
                if let Some(k) = &u.key {
                    j.push(Change::Key { dev, uid, key: Some(k.clone()) });
                }
                if let Some(d) = &u.data {
                    j.push(Change::Data { dev, uid, data: Some(d.clone()) });
                }
                if u.offline_since != 0 {
                    j.push(Change::LastOnline { dev, uid, time: Some(u.offline_since) });
                }
            }
        }
        for (&dev, set) in &self.revoked {
            j.extend(set.iter().map(|t| Change::Revoked { dev, token: t.clone(), on: true }));
        }
    }

    pub fn get(&self, dev: u32, uid: u64) -> Option<&User> {
        self.users.get(&dev)?.get(&uid)
    }

    fn entry(&mut self, dev: u32, uid: u64) -> &mut User {
        self.users.entry(dev).or_default().entry(uid).or_default()
    }

    fn tidy(&mut self, dev: u32, uid: u64) {
        if let Some(m) = self.users.get_mut(&dev) {
            if m.get(&uid).is_some_and(User::is_empty) {
                m.remove(&uid);
            }
            if m.is_empty() {
                self.users.remove(&dev);
            }
        }
    }

    /// Number of users held (for memory measurements).
    pub fn len(&self) -> usize {
        self.users.values().map(|m| m.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn set_key(&mut self, dev: u32, uid: u64, key: &str) {
        self.entry(dev, uid).key = Some(key.into());
        self.log(|| Change::Key { dev, uid, key: Some(key.into()) });
    }

    /// Removes the key; returns whether there was one and the devices to close.
    pub fn remove_key(&mut self, dev: u32, uid: u64) -> (bool, SmallVec<[ConnId; 4]>) {
        let Some(u) = self.users.get_mut(&dev).and_then(|m| m.get_mut(&uid)) else {
            return (false, SmallVec::new());
        };
        let had = u.key.take().is_some();
        if had {
            self.log(|| Change::Key { dev, uid, key: None });
        }
        let devices = self.devices(dev, uid);
        self.tidy(dev, uid);
        (had, devices)
    }

    /// Checks a connection's key: the stored hash, or a valid, unrevoked JWT
    /// signed with `secret`.
    pub fn authorize(&self, dev: u32, uid: u64, key: &str, secret: &[u8], now: i64) -> bool {
        if uid == 0 || key.is_empty() {
            return false;
        }
        if let Some(stored) = self.get(dev, uid).and_then(|u| u.key.as_deref())
            && ct_eq(stored.as_bytes(), key.as_bytes())
        {
            return true;
        }
        jwt::looks_like_jwt(key) && !self.is_revoked(dev, key) && jwt::verify(key, secret, uid, now).is_ok()
    }

    /// Registers a device, evicting the oldest when all slots are taken.
    pub fn add_device(&mut self, dev: u32, uid: u64, conn: ConnId) -> Registered {
        self.registrations += 1;
        let seq = self.registrations;
        let u = self.entry(dev, uid);
        let first = u.devices.is_none();
        let d = u.devices.get_or_insert_with(Box::default);
        let (slot, evicted) = match d.slots.iter().position(Option::is_none) {
            Some(i) => (i, None),
            None => {
                let oldest = (0..MAX_DEVICES).min_by_key(|&i| d.since[i]).unwrap_or(0);
                (oldest, d.slots[oldest])
            }
        };
        d.slots[slot] = Some(conn);
        d.since[slot] = seq;
        Registered { first, evicted }
    }

    /// Unregisters a device; returns true when it was the last (now offline).
    pub fn remove_device(&mut self, dev: u32, uid: u64, conn: ConnId, now: i64) -> bool {
        let Some(u) = self.users.get_mut(&dev).and_then(|m| m.get_mut(&uid)) else { return false };
        let Some(d) = u.devices.as_mut() else { return false };
        let Some(i) = d.slots.iter().position(|s| *s == Some(conn)) else { return false };
        d.slots[i] = None;
        if d.slots.iter().all(Option::is_none) {
            u.devices = None;
            u.offline_since = now;
            self.log(|| Change::LastOnline { dev, uid, time: Some(now) });
            return true;
        }
        false
    }

    /// The user's connected devices.
    pub fn devices(&self, dev: u32, uid: u64) -> SmallVec<[ConnId; 4]> {
        self.get(dev, uid)
            .and_then(|u| u.devices.as_ref())
            .map(|d| d.slots.iter().flatten().copied().collect())
            .unwrap_or_default()
    }

    /// Queues a message for an offline user; says whether it was queued
    /// (not when it alone is over `cap.bytes`) and how many messages were
    /// dropped: the oldest, to make room, or this one.
    pub fn enqueue(&mut self, dev: u32, uid: u64, q: Queued, cap: QueueCap, ttl: i64, now: i64) -> Enqueued {
        let cost = q.cost();
        if cap.count == 0 || cost > cap.bytes {
            self.dropped += 1;
            return Enqueued { queued: false, dropped: 1 };
        }
        let mut journal = self.journal.take();
        let u = self.entry(dev, uid);
        let queue =
            u.queue.get_or_insert_with(|| Box::new(Queue { head: 0, items: VecDeque::with_capacity(1), bytes: 0 }));
        expire(queue, ttl, now, dev, uid, journal.as_mut());
        let mut dropped = 0;
        while queue.items.len() >= cap.count || (!queue.items.is_empty() && queue.bytes + cost > cap.bytes) {
            pop_oldest(queue, dev, uid, journal.as_mut());
            dropped += 1;
        }
        if let Some(j) = journal.as_mut() {
            j.push(Change::QueuePut { dev, uid, seq: queue.head + queue.items.len() as u64, msg: q.clone() });
        }
        queue.bytes += cost;
        queue.items.push_back(q);
        self.journal = journal;
        self.dropped += dropped;
        Enqueued { queued: true, dropped }
    }

    /// Takes the user's unexpired queued messages, oldest first (the store
    /// forgets all of them, expired or not).
    pub fn take_queue(&mut self, dev: u32, uid: u64, ttl: i64, now: i64) -> Vec<Queued> {
        let Some(u) = self.users.get_mut(&dev).and_then(|m| m.get_mut(&uid)) else { return Vec::new() };
        let Some(mut queue) = u.queue.take() else { return Vec::new() };
        let mut journal = self.journal.take();
        expire(&mut queue, ttl, now, dev, uid, journal.as_mut());
        forget(&queue, dev, uid, journal.as_mut());
        self.journal = journal;
        queue.items.into()
    }

    /// The unexpired queued messages (for `SELECT ... FROM users_messages`).
    pub fn queued(&mut self, dev: u32, uid: u64, ttl: i64, now: i64) -> Vec<Queued> {
        let Some(u) = self.users.get_mut(&dev).and_then(|m| m.get_mut(&uid)) else { return Vec::new() };
        let Some(queue) = u.queue.as_mut() else { return Vec::new() };
        expire(queue, ttl, now, dev, uid, self.journal.as_mut());
        queue.items.iter().cloned().collect()
    }

    /// Empties a queue; returns how many messages were removed.
    pub fn clear_queue(&mut self, dev: u32, uid: u64) -> u64 {
        let Some(u) = self.users.get_mut(&dev).and_then(|m| m.get_mut(&uid)) else { return 0 };
        let queue = u.queue.take();
        if let Some(q) = &queue {
            forget(q, dev, uid, self.journal.as_mut());
        }
        let n = queue.map_or(0, |q| q.items.len() as u64);
        self.tidy(dev, uid);
        n
    }

    /// Drops expired queue entries of every user (a periodic sweep).
    /// Also forgets users that hold nothing but an offline time older than
    /// `retention` seconds (typically JWT users, who have no stored key), so
    /// the table does not grow with every user id ever seen; `users_time`
    /// then answers -1 (unknown) for them. Returns how many were forgotten.
    pub fn purge_expired(&mut self, ttl: i64, now: i64, retention: i64) -> usize {
        let mut forgotten = 0;
        let mut journal = self.journal.take();
        for (&dev, m) in self.users.iter_mut() {
            for (&uid, u) in m.iter_mut() {
                if let Some(q) = u.queue.as_mut() {
                    expire(q, ttl, now, dev, uid, journal.as_mut());
                    if q.items.is_empty() {
                        u.queue = None;
                    }
                }
            }
            let before = m.len();
            m.retain(|&uid, u| {
                let forget = u.key.is_none()
                    && u.data.is_none()
                    && u.devices.is_none()
                    && u.queue.is_none()
                    && u.offline_since > 0
                    && now - u.offline_since >= retention;
                if forget && let Some(j) = journal.as_mut() {
                    j.push(Change::LastOnline { dev, uid, time: None });
                }
                !forget
            });
            forgotten += before - m.len();
        }
        self.users.retain(|_, m| !m.is_empty());
        // A revoked token past its `exp` could not be used anyway.
        for (&dev, set) in self.revoked.iter_mut() {
            set.retain(|t| {
                let keep = jwt::claimed_exp(t).is_none_or(|exp| exp > now);
                if !keep && let Some(j) = journal.as_mut() {
                    j.push(Change::Revoked { dev, token: t.clone(), on: false });
                }
                keep
            });
        }
        self.journal = journal;
        self.revoked.retain(|_, s| !s.is_empty());
        forgotten
    }

    pub fn presence(&self, dev: u32, uid: u64) -> Presence {
        match self.get(dev, uid) {
            Some(u) if u.devices.is_some() || u.offline_since == ONLINE_ON_ANOTHER_NODE => Presence::Online,
            Some(u) if u.offline_since > 0 => Presence::Offline(u.offline_since),
            _ => Presence::Unknown,
        }
    }

    /// Records, for the other nodes of a cluster, that the user is online
    /// (this node has its first device).
    pub fn journal_online(&mut self, dev: u32, uid: u64) {
        self.log(|| Change::LastOnline { dev, uid, time: Some(ONLINE_ON_ANOTHER_NODE) });
    }

    pub fn set_data(&mut self, dev: u32, uid: u64, data: &str) {
        self.entry(dev, uid).data = Some(data.into());
        self.log(|| Change::Data { dev, uid, data: Some(data.into()) });
    }

    pub fn remove_data(&mut self, dev: u32, uid: u64) -> bool {
        let had = self.users.get_mut(&dev).and_then(|m| m.get_mut(&uid)).is_some_and(|u| u.data.take().is_some());
        if had {
            self.log(|| Change::Data { dev, uid, data: None });
        }
        self.tidy(dev, uid);
        had
    }

    pub fn revoke(&mut self, dev: u32, token: &str) -> bool {
        let new = self.revoked.entry(dev).or_default().insert(token.into());
        if new {
            self.log(|| Change::Revoked { dev, token: token.into(), on: true });
        }
        new
    }

    pub fn unrevoke(&mut self, dev: u32, token: &str) -> bool {
        let had = self.revoked.get_mut(&dev).is_some_and(|s| s.remove(token));
        if had {
            self.log(|| Change::Revoked { dev, token: token.into(), on: false });
        }
        had
    }

    pub fn is_revoked(&self, dev: u32, token: &str) -> bool {
        self.revoked.get(&dev).is_some_and(|s| s.contains(token))
    }

    /// The revoked tokens of `dev_id`, unsorted.
    pub fn revoked_iter(&self, dev: u32) -> impl Iterator<Item = &str> {
        self.revoked.get(&dev).into_iter().flat_map(|s| s.iter().map(|t| &**t))
    }

    /// Revoked tokens of a dev_id, sorted.
    pub fn revoked(&self, dev: u32) -> Vec<String> {
        let mut v: Vec<String> = self.revoked_iter(dev).map(str::to_string).collect();
        v.sort();
        v
    }
}

/// Drops the queue's expired entries (from the store too).
fn expire(q: &mut Queue, ttl: i64, now: i64, dev: u32, uid: u64, mut journal: Option<&mut Vec<Change>>) {
    while q.items.front().is_some_and(|m| m.time + ttl <= now) {
        pop_oldest(q, dev, uid, journal.as_deref_mut());
    }
}

/// Drops the oldest entry (from the store too).
fn pop_oldest(q: &mut Queue, dev: u32, uid: u64, journal: Option<&mut Vec<Change>>) {
    if let Some(m) = q.items.pop_front() {
        q.bytes -= m.cost();
        if let Some(j) = journal {
            j.push(removal(dev, uid, q.head, &m));
        }
        q.head += 1;
    }
}

/// Removes every entry of a queue being taken or cleared from the store.
fn forget(q: &Queue, dev: u32, uid: u64, journal: Option<&mut Vec<Change>>) {
    if let Some(j) = journal {
        j.extend(q.items.iter().enumerate().map(|(i, m)| removal(dev, uid, q.head + i as u64, m)));
    }
}

/// The store's removal of entry `m` at position `seq`: it names the
/// record (the tag) and the bytes it frees there.
fn removal(dev: u32, uid: u64, seq: u64, m: &Queued) -> Change {
    Change::QueueDel { dev, uid, seq, tag: m.tag(), bytes: crate::store::qlog::entry_len(m) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(i: u32) -> ConnId {
        ConnId { index: i, generation: 0 }
    }

    fn msg(t: i64, m: &str) -> Queued {
        Queued::new(t, "e", m)
    }

    /// A bound of `count` messages and no bound in bytes.
    fn cap(count: usize) -> QueueCap {
        QueueCap { count, bytes: usize::MAX }
    }

    #[test]
    fn a_queue_keeps_the_newest_messages_that_fit_its_bytes() {
        let mut s = UserStore { journal: Some(Vec::new()), ..UserStore::default() };
        let m = |t, len| Queued::new(t, "e", &"x".repeat(len));
        // 1,000-byte messages cost 1,000 + 2 + 224; four fit in 5,000.
        let bound = QueueCap { count: 64, bytes: 5000 };
        for t in 0..4 {
            assert_eq!(
                s.enqueue(0, 5, m(100 + t, 1000), bound, 300, 100),
                Enqueued { queued: true, dropped: 0 },
                "{t}"
            );
        }
        let e = s.enqueue(0, 5, m(104, 1000), bound, 300, 100);
        assert_eq!(e, Enqueued { queued: true, dropped: 1 }, "the oldest is dropped to make room");
        let kept: Vec<i64> = s.queued(0, 5, 300, 100).iter().map(|q| q.time).collect();
        assert_eq!(kept, [101, 102, 103, 104]);
        // One big message takes the room of several.
        assert_eq!(s.enqueue(0, 5, m(105, 3000), bound, 300, 100), Enqueued { queued: true, dropped: 3 });
        let kept: Vec<i64> = s.queued(0, 5, 300, 100).iter().map(|q| q.time).collect();
        assert_eq!(kept, [104, 105]);
        // A message over the whole bound is not queued, and the queue stays.
        assert_eq!(s.enqueue(0, 5, m(106, 5000), bound, 300, 100), Enqueued { queued: false, dropped: 1 });
        assert_eq!(s.dropped, 1 + 3 + 1);
        assert_eq!(s.queued(0, 5, 300, 100).len(), 2);
        // What leaves, by expiry or delivery, frees its bytes.
        assert_eq!(s.take_queue(0, 5, 300, 100).len(), 2);
        for t in 0..4 {
            assert_eq!(s.enqueue(0, 5, m(200 + t, 1000), bound, 300, 200).dropped, 0, "{t}");
        }
        let e = s.enqueue(0, 5, m(600, 1000), bound, 300, 600);
        assert_eq!(e.dropped, 0, "the four expired, and their bytes with them");
        let removals = s.take_changes().iter().filter(|c| matches!(c, Change::QueueDel { .. })).count();
        assert_eq!(removals, 1 + 3 + 2 + 4, "every drop is stored");
    }

    #[test]
    fn seventeenth_device_replaces_the_oldest() {
        let mut s = UserStore::default();
        let r = s.add_device(0, 7, conn(0));
        assert_eq!(r, Registered { first: true, evicted: None });
        for i in 1..16 {
            assert_eq!(s.add_device(0, 7, conn(i)).evicted, None);
        }
        assert_eq!(s.add_device(0, 7, conn(16)), Registered { first: false, evicted: Some(conn(0)) });
        assert_eq!(s.devices(0, 7).len(), 16);
        assert!(!s.devices(0, 7).contains(&conn(0)));
        // The next eviction takes the next oldest.
        assert_eq!(s.add_device(0, 7, conn(17)).evicted, Some(conn(1)));
    }

    #[test]
    fn last_device_leaving_makes_the_user_offline() {
        let mut s = UserStore::default();
        assert_eq!(s.presence(0, 1), Presence::Unknown);
        s.add_device(0, 1, conn(1));
        s.add_device(0, 1, conn(2));
        assert_eq!(s.presence(0, 1), Presence::Online);
        assert!(!s.remove_device(0, 1, conn(1), 100));
        assert!(s.remove_device(0, 1, conn(2), 200));
        assert_eq!(s.presence(0, 1), Presence::Offline(200));
        assert_eq!(s.presence(1, 1), Presence::Unknown, "dev_ids are separate");
    }

    #[test]
    fn a_removal_names_the_group_its_entry_was_sent_in_and_its_bytes() {
        let mut s = UserStore { journal: Some(Vec::new()), ..UserStore::default() };
        s.enqueue(0, 5, msg(100, "a"), cap(3), 300, 100);
        s.enqueue(0, 5, msg(100, "bb"), cap(3), 300, 100);
        // Sent: the lane said group 7.
        let sent = s.take_changes();
        s.retag(&sent, 7);
        // Queued, and dropped from the full queue, before being sent: its
        // removal is pending like its put.
        s.enqueue(0, 5, msg(101, "c"), cap(3), 300, 101);
        s.enqueue(0, 5, msg(101, "d"), cap(2), 300, 101);
        s.take_queue(0, 5, 300, 102);
        let dels: Vec<(u64, u64, u32)> = s
            .take_changes()
            .into_iter()
            .filter_map(|c| match c {
                Change::QueueDel { seq, tag, bytes, .. } => Some((seq, tag, bytes)),
                _ => None,
            })
            .collect();
        let len = |m: &str| crate::store::qlog::entry_len(&msg(0, m));
        assert_eq!(dels, [(0, 7, len("a")), (1, 7, len("bb")), (2, TAG_PENDING, len("c")), (3, TAG_PENDING, len("d"))]);
    }

    #[test]
    fn queue_is_a_bounded_ring_with_ttl() {
        let mut s = UserStore::default();
        for i in 0..3 {
            assert_eq!(s.enqueue(0, 5, msg(100 + i, &i.to_string()), cap(3), 300, 100 + i).dropped, 0);
        }
        assert_eq!(s.enqueue(0, 5, msg(103, "3"), cap(3), 300, 103).dropped, 1, "full: oldest dropped");
        assert_eq!(s.dropped, 1);
        let got: Vec<String> = s.queued(0, 5, 300, 104).into_iter().map(|q| q.message().to_string()).collect();
        assert_eq!(got, ["1", "2", "3"]);
        // At 401 the first two (queued at 101 and 102) have expired.
        let got: Vec<String> = s.take_queue(0, 5, 300, 402).into_iter().map(|q| q.message().to_string()).collect();
        assert_eq!(got, ["3"]);
        assert!(s.take_queue(0, 5, 300, 402).is_empty(), "taking empties the queue");
    }

    #[test]
    fn offline_users_with_nothing_else_are_forgotten_after_the_retention() {
        let mut s = UserStore::default();
        s.add_device(0, 1, conn(1));
        s.remove_device(0, 1, conn(1), 1000);
        s.set_key(0, 2, "k");
        s.add_device(0, 2, conn(2));
        s.remove_device(0, 2, conn(2), 1000);
        assert_eq!(s.purge_expired(300, 1500, 3600), 0, "within the retention");
        assert_eq!(s.presence(0, 1), Presence::Offline(1000));
        assert_eq!(s.purge_expired(300, 4600, 3600), 1);
        assert_eq!(s.presence(0, 1), Presence::Unknown, "forgotten");
        assert_eq!(s.presence(0, 2), Presence::Offline(1000), "a user with a key is kept");
        let live = jwt::sign(&serde_json::json!({"user_id": 1, "exp": 9000}), b"s");
        let dead = jwt::sign(&serde_json::json!({"user_id": 1, "exp": 4000}), b"s");
        s.revoke(0, &live);
        s.revoke(0, &dead);
        s.revoke(0, "not-a-jwt");
        s.purge_expired(300, 4600, 3600);
        assert_eq!(s.revoked(0), {
            let mut v = vec![live, "not-a-jwt".to_string()];
            v.sort();
            v
        });
    }

    #[test]
    fn keys_and_jwts_authorize() {
        let mut s = UserStore::default();
        s.set_key(0, 9, "h4sh");
        assert!(s.authorize(0, 9, "h4sh", b"x", 0));
        assert!(!s.authorize(0, 9, "h4sH", b"x", 0));
        assert!(!s.authorize(1, 9, "h4sh", b"x", 0), "dev_ids are separate");
        assert!(!s.authorize(0, 0, "h4sh", b"x", 0));
        let t = jwt::sign(&serde_json::json!({"user_id": 9, "exp": 2_000_000_000}), b"comet0");
        assert!(s.authorize(0, 9, &t, b"comet0", 1_700_000_000));
        s.revoke(0, &t);
        assert!(!s.authorize(0, 9, &t, b"comet0", 1_700_000_000));
        let (had, _) = s.remove_key(0, 9);
        assert!(had);
        assert!(!s.authorize(0, 9, "h4sh", b"x", 0));
    }
}

/// A CometQL operation on user tables, carried to the users' home shards.
/// Each shard acts only on the ids (or tokens) whose home it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserQuery {
    /// `users_auth` INSERT: (id, hash).
    AuthSet(Vec<(u64, String)>),
    AuthSelect(Vec<u64>),
    /// Remove keys and close every device of those users.
    AuthDelete(Vec<u64>),
    /// `users_messages` INSERT: (id, event, message).
    Send(Vec<(u64, String, String)>),
    QueueSelect(Vec<u64>),
    QueueDelete(Vec<u64>),
    /// `users_time` SELECT.
    Time(Vec<u64>),
    DataSet(Vec<(u64, String)>),
    DataSelect(Vec<u64>),
    DataDelete(Vec<u64>),
    /// `revoked_tokens` INSERT.
    Revoke(Vec<String>),
    /// `revoked_tokens` SELECT, all or these tokens.
    RevokedSelect(Option<Vec<String>>),
    Unrevoke(Vec<String>),
    /// The frontend's `user_status` command.
    Status(u64),
    /// The frontend's `user_data` command.
    Data(u64),
}

impl UserQuery {
    /// The user ids this operation touches (to route it to home shards);
    /// `None` means every shard.
    pub fn user_ids(&self) -> Option<Vec<u64>> {
        match self {
            UserQuery::AuthSet(v) | UserQuery::DataSet(v) => Some(v.iter().map(|x| x.0).collect()),
            UserQuery::Send(v) => Some(v.iter().map(|x| x.0).collect()),
            UserQuery::AuthSelect(v)
            | UserQuery::AuthDelete(v)
            | UserQuery::QueueSelect(v)
            | UserQuery::QueueDelete(v)
            | UserQuery::Time(v)
            | UserQuery::DataSelect(v)
            | UserQuery::DataDelete(v) => Some(v.clone()),
            UserQuery::Revoke(tokens) | UserQuery::Unrevoke(tokens) => {
                Some(tokens.iter().map(|t| jwt::claimed_user(t).unwrap_or(0)).collect())
            }
            UserQuery::RevokedSelect(_) => None,
            UserQuery::Status(u) | UserQuery::Data(u) => Some(vec![*u]),
        }
    }
}

#[cfg(test)]
mod queued_tests {
    use super::Queued;

    #[test]
    fn event_and_message_share_one_allocation_and_read_back() {
        let q = Queued::new(5, "ev-1", "hello\0world");
        assert_eq!((q.event(), q.message(), q.time), ("ev-1", "hello\0world", 5));
        let long = "é".repeat(200);
        let q = Queued::new(0, &long, "m");
        assert!(q.event().len() <= 255 && long.starts_with(q.event()));
        assert_eq!(q.message(), "m");
    }

    #[test]
    fn the_store_tag_costs_no_memory_and_holds_48_bits() {
        // Time, the text's pointer and length, and the tag and event
        // length in what would otherwise be padding.
        assert_eq!(std::mem::size_of::<Queued>(), 32);
        let q = Queued::new(5, "e", "m");
        assert_eq!(q.tag(), super::TAG_PENDING);
        let g = (1 << 47) + 12_345;
        assert_eq!(q.clone().tagged(g).tag(), g);
        assert_eq!(q.clone().tagged(g), q, "the tag is not part of the message");
    }
}

#[cfg(test)]
mod cluster_tests {
    use super::*;

    #[test]
    fn remote_changes_apply_removals_too_and_online_elsewhere_reads_as_online() {
        let mut u = UserStore::default();
        u.apply_remote(Change::Key { dev: 0, uid: 5, key: Some("k".into()) });
        u.apply_remote(Change::Revoked { dev: 0, token: "t".into(), on: true });
        assert!(u.authorize(0, 5, "k", b"s", 0));
        assert!(u.is_revoked(0, "t"));
        u.apply_remote(Change::Key { dev: 0, uid: 5, key: None });
        u.apply_remote(Change::Revoked { dev: 0, token: "t".into(), on: false });
        assert!(!u.authorize(0, 5, "k", b"s", 0));
        assert!(!u.is_revoked(0, "t"));
        assert!(u.is_empty(), "nothing left is kept");
        u.apply_remote(Change::LastOnline { dev: 0, uid: 6, time: Some(ONLINE_ON_ANOTHER_NODE) });
        assert_eq!(u.presence(0, 6), Presence::Online);
        u.apply_remote(Change::LastOnline { dev: 0, uid: 6, time: Some(100) });
        assert_eq!(u.presence(0, 6), Presence::Offline(100));
    }

    #[test]
    fn a_reload_keeps_devices_and_a_reseed_journals_everything_held() {
        let mut u = UserStore { journal: Some(Vec::new()), ..UserStore::default() };
        u.set_key(0, 1, "k1");
        u.set_data(0, 2, "d2");
        u.revoke(0, "tok");
        u.add_device(0, 1, ConnId { index: 1, generation: 0 });
        u.take_changes();
        u.journal_all();
        let mut got = u.take_changes();
        got.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(got.len(), 3, "{got:?}");
        u.clear_persisted();
        assert!(u.get(0, 1).is_some_and(|x| x.key.is_none() && x.devices.is_some()), "devices stay");
        assert!(u.get(0, 2).is_none() && !u.is_revoked(0, "tok"));
        assert!(u.take_changes().is_empty(), "a reload journals nothing");
    }
}
