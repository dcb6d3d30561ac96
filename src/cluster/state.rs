//! Persisted state in Redis (`--redis`): keys, user data, revoked tokens,
//! last-online times, channel settings and channel history, shared by every
//! node.
//!
//! Redis holds the shared copy; every node keeps all of it in memory as
//! without `--redis`, and memory stays the source of every read, so a
//! connect or a `SELECT` costs no Redis round trip. What changes the state
//! is already recorded by the shards as [`Change`]s for the store; in a
//! cluster the store's engine is [`RedisStore`] (instead of the data dir):
//! the storage thread writes each group of changes to Redis in one
//! `MULTI`/`EXEC` together with one `PUBLISH` of the same changes on
//! [`STATE_CHANNEL`], tagged with the node id. The answer of the statement
//! that made them waits, as for `--durability sync`, until Redis
//! acknowledged them. Every other node's subscriber hands the changes to
//! the shards that hold them ([`deliver`]), which apply them to memory. One
//! node's changes go out on one connection in order, so every node applies
//! them in that order.
//!
//! A node that connects (at start, after Redis was down, or to a Redis
//! that restarted) first subscribes [`STATE_CHANNEL`], then reads the whole
//! state ([`resync`]): the shards replace their copy with it, and changes
//! published after the subscription are applied after it. When Redis has
//! no state at all (no [`SEEDED`] marker: a new cluster, or a Redis that
//! restarted empty) the node writes what it holds instead (every node holds
//! all of it), so an empty Redis is re-seeded from the nodes' memory.
//!
//! Offline queues are not here: they live in Redis lists already
//! (`super::queue_key`), so the queue changes a shard records are skipped.
//!
//! Layout, per dev_id `D` (a standalone Redis or Valkey):
//! - `comet:D:auth`, `comet:D:data`, `comet:D:time`: hashes user id → key,
//!   data text, unix time the user's last device on a node closed;
//! - `comet:D:revoked`: a set of tokens;
//! - `comet:D:settings`: a hash channel → history length;
//! - `comet:D:history:<channel>`: a hash entry id → entry (JSON), and
//!   `comet:D:histories` the set of channels that have one;
//! - `comet:devs`: the set of dev_ids with state; `comet:state:seeded`.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Bridge, IO_TIMEOUT, Inbound};
use crate::store::{Backend, Change, HistoryRecord, StoreError};
use crate::users::ONLINE_ON_ANOTHER_NODE;

/// The Redis channel state changes travel on.
pub const STATE_CHANNEL: &str = "comet:state";
/// Set once Redis holds the cluster's state (re-seeded when missing).
pub const SEEDED: &str = "comet:state:seeded";
/// The set of dev_ids that have state, to find the hashes at load.
const DEVS: &str = "comet:devs";
/// Changes per `MULTI` and per state message, at most: a re-seed of a
/// million users goes out in pieces, not as one message Redis must hold
/// whole.
const CHUNK: usize = 1000;
/// Bytes of changes per state message, at most (one change may be larger):
/// well under Redis's default output limit for a subscriber (32 MB hard),
/// which would disconnect every node for one large message.
const CHUNK_BYTES: usize = 1 << 20;

/// Cuts `changes` into pieces of at most [`CHUNK`] changes and about
/// [`CHUNK_BYTES`] bytes, in order.
fn chunks(changes: &[Change]) -> Vec<&[Change]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, c) in changes.iter().enumerate() {
        if i > start && (i - start >= CHUNK || bytes + c.weight() > CHUNK_BYTES) {
            out.push(&changes[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += c.weight();
    }
    if start < changes.len() {
        out.push(&changes[start..]);
    }
    out
}

fn key(dev: u32, what: &str) -> String {
    format!("comet:{dev}:{what}")
}

fn history_key(dev: u32, channel: &str) -> String {
    format!("comet:{dev}:history:{channel}")
}

/// A history entry as stored in its channel's hash and sent on the state
/// channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEntry {
    pub i: u64,
    pub t: i64,
    pub e: String,
    pub m: String,
    #[serde(default)]
    pub u: Option<u64>,
}

/// A [`Change`] as it travels through Redis (JSON, short names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "k")]
pub enum WireChange {
    Key { d: u32, u: u64, v: Option<String> },
    Data { d: u32, u: u64, v: Option<String> },
    Time { d: u32, u: u64, t: Option<i64> },
    Revoked { d: u32, t: String, on: bool },
    Setting { d: u32, c: String, l: Option<u32> },
    HistPut { d: u32, c: String, e: WireEntry },
    HistDel { d: u32, c: String, i: u64 },
}

/// One node's group of changes on [`STATE_CHANNEL`].
#[derive(Debug, Serialize, Deserialize)]
pub struct StateMsg {
    /// The writing node: it has them already and drops its own.
    pub n: u64,
    pub c: Vec<WireChange>,
}

impl WireChange {
    /// The change in Redis's form; `None` for the offline queue's changes,
    /// which are not kept here.
    pub fn of(c: &Change) -> Option<WireChange> {
        let s = |t: &Option<Box<str>>| t.as_ref().map(|t| t.to_string());
        Some(match c {
            Change::Key { dev, uid, key } => WireChange::Key { d: *dev, u: *uid, v: s(key) },
            Change::Data { dev, uid, data } => WireChange::Data { d: *dev, u: *uid, v: s(data) },
            Change::LastOnline { dev, uid, time } => WireChange::Time { d: *dev, u: *uid, t: *time },
            Change::Revoked { dev, token, on } => WireChange::Revoked { d: *dev, t: token.to_string(), on: *on },
            Change::Setting { dev, channel, len } => WireChange::Setting { d: *dev, c: channel.to_string(), l: *len },
            Change::HistoryPut { dev, channel, entry } => WireChange::HistPut {
                d: *dev,
                c: channel.to_string(),
                e: WireEntry {
                    i: entry.id,
                    t: entry.time,
                    e: entry.event.clone(),
                    m: entry.message.clone(),
                    u: entry.user_id,
                },
            },
            Change::HistoryDel { dev, channel, id } => WireChange::HistDel { d: *dev, c: channel.to_string(), i: *id },
            Change::QueuePut { .. } | Change::QueueDel { .. } => return None,
        })
    }

    /// Back to the shards' form.
    pub fn into_change(self) -> Change {
        let b = |t: Option<String>| t.map(String::into_boxed_str);
        match self {
            WireChange::Key { d, u, v } => Change::Key { dev: d, uid: u, key: b(v) },
            WireChange::Data { d, u, v } => Change::Data { dev: d, uid: u, data: b(v) },
            WireChange::Time { d, u, t } => Change::LastOnline { dev: d, uid: u, time: t },
            WireChange::Revoked { d, t, on } => Change::Revoked { dev: d, token: t.into(), on },
            WireChange::Setting { d, c, l } => Change::Setting { dev: d, channel: c.into(), len: l },
            WireChange::HistPut { d, c, e } => Change::HistoryPut {
                dev: d,
                channel: c.into(),
                entry: HistoryRecord { id: e.i, time: e.t, event: e.e, message: e.m, user_id: e.u },
            },
            WireChange::HistDel { d, c, i } => Change::HistoryDel { dev: d, channel: c.into(), id: i },
        }
    }

    fn dev(&self) -> u32 {
        match self {
            WireChange::Key { d, .. }
            | WireChange::Data { d, .. }
            | WireChange::Time { d, .. }
            | WireChange::Revoked { d, .. }
            | WireChange::Setting { d, .. }
            | WireChange::HistPut { d, .. }
            | WireChange::HistDel { d, .. } => *d,
        }
    }

    /// Adds the Redis commands that make this change to `pipe`.
    fn write(&self, pipe: &mut redis::Pipeline) {
        match self {
            WireChange::Key { d, u, v } => hash_set(pipe, &key(*d, "auth"), &u.to_string(), v.as_deref()),
            WireChange::Data { d, u, v } => hash_set(pipe, &key(*d, "data"), &u.to_string(), v.as_deref()),
            WireChange::Time { d, u, t } => {
                let t = t.map(|t| t.to_string());
                hash_set(pipe, &key(*d, "time"), &u.to_string(), t.as_deref());
            }
            WireChange::Revoked { d, t, on } => {
                pipe.cmd(if *on { "SADD" } else { "SREM" }).arg(key(*d, "revoked")).arg(t).ignore();
            }
            WireChange::Setting { d, c, l } => {
                let l = l.map(|l| l.to_string());
                hash_set(pipe, &key(*d, "settings"), c, l.as_deref());
            }
            WireChange::HistPut { d, c, e } => {
                let json = serde_json::to_string(e).unwrap_or_default();
                pipe.cmd("HSET").arg(history_key(*d, c)).arg(e.i).arg(json).ignore();
                pipe.cmd("SADD").arg(key(*d, "histories")).arg(c).ignore();
            }
            WireChange::HistDel { d, c, i } => {
                pipe.cmd("HDEL").arg(history_key(*d, c)).arg(i).ignore();
            }
        }
    }
}

fn hash_set(pipe: &mut redis::Pipeline, hash: &str, field: &str, value: Option<&str>) {
    match value {
        Some(v) => pipe.cmd("HSET").arg(hash).arg(field).arg(v).ignore(),
        None => pipe.cmd("HDEL").arg(hash).arg(field).ignore(),
    };
}

/// The shard that holds a change's state: the user's home shard, the
/// token's user's, or the channel's.
pub fn home_of(c: &Change, shards: usize) -> usize {
    use crate::shard::{home_shard, home_shard_of_channel};
    match c {
        Change::Key { dev, uid, .. }
        | Change::Data { dev, uid, .. }
        | Change::LastOnline { dev, uid, .. }
        | Change::QueuePut { dev, uid, .. }
        | Change::QueueDel { dev, uid, .. } => home_shard(*dev, *uid, shards),
        Change::Revoked { dev, token, .. } => {
            home_shard(*dev, crate::users::jwt::claimed_user(token).unwrap_or(0), shards)
        }
        Change::HistoryPut { dev, channel, .. }
        | Change::HistoryDel { dev, channel, .. }
        | Change::Setting { dev, channel, .. } => home_shard_of_channel(*dev, channel, shards),
    }
}

/// Adds the `PUBLISH` of `changes` (if any) to `pipe`, and empties it.
fn publish_state(pipe: &mut redis::Pipeline, node: u64, changes: &mut Vec<WireChange>) {
    if changes.is_empty() {
        return;
    }
    let msg = serde_json::to_vec(&StateMsg { n: node, c: std::mem::take(changes) }).unwrap_or_default();
    pipe.cmd("PUBLISH").arg(STATE_CHANNEL).arg(msg).ignore();
}

/// A node's last device of a user closed: sets the user's last-online time,
/// unless another node's entry in the user's presence hash (`super::ATTACH`)
/// is still alive, in which case the user stays online (-1). Publishes the
/// outcome to every node. KEYS: the time hash, the presence hash; ARGV:
/// user id, time, node id, the offline message, the online message.
const WENT_OFFLINE: &str = "local now = tonumber(redis.call('TIME')[1]) \
local all = redis.call('HGETALL', KEYS[2]) \
for i = 1, #all, 2 do \
  if all[i] ~= ARGV[3] and tonumber(all[i + 1]) > now then \
    redis.call('HSET', KEYS[1], ARGV[1], -1) \
    redis.call('PUBLISH', 'comet:state', ARGV[5]) \
    return -1 \
  end \
end \
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) \
redis.call('PUBLISH', 'comet:state', ARGV[4]) \
return 1";

/// The storage engine of a node in a cluster: Redis, through its own
/// connection on the storage thread.
pub struct RedisStore {
    client: redis::Client,
    con: Option<redis::Connection>,
    node: u64,
    address: String,
}

impl RedisStore {
    /// The engine for `bridge`'s Redis and node id.
    pub fn new(bridge: &Bridge) -> RedisStore {
        RedisStore { client: bridge.client.clone(), con: None, node: bridge.node, address: bridge.address.clone() }
    }

    fn connection(&mut self) -> Result<&mut redis::Connection, StoreError> {
        if self.con.is_none() {
            let con = connect(&self.client).map_err(|e| self.failed(&e))?;
            self.con = Some(con);
        }
        self.con.as_mut().ok_or_else(|| StoreError::Write("no connection to Redis".into()))
    }

    /// This node's last device of user `u` closed at `t`: the shared
    /// last-online time becomes `t`, or stays "online" when another live
    /// node holds a device of the user ([`WENT_OFFLINE`]). Every node, this
    /// one too, applies what the script decided.
    fn went_offline(&self, pipe: &mut redis::Pipeline, d: u32, u: u64, t: i64) {
        let msg = |t: i64| serde_json::to_vec(&StateMsg { n: 0, c: vec![WireChange::Time { d, u, t: Some(t) }] });
        let (offline, online) = (msg(t).unwrap_or_default(), msg(ONLINE_ON_ANOTHER_NODE).unwrap_or_default());
        pipe.cmd("EVAL").arg(WENT_OFFLINE).arg(2).arg(key(d, "time")).arg(super::presence_key(d, u));
        pipe.arg(u).arg(t).arg(self.node.to_string()).arg(offline).arg(online).ignore();
    }

    fn failed(&self, e: &redis::RedisError) -> StoreError {
        StoreError::Write(format!("the cluster's Redis at {} failed ({e}); the change was not stored", self.address))
    }
}

/// A plain connection with comet's timeouts.
fn connect(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let con = client.get_connection_with_timeout(IO_TIMEOUT)?;
    con.set_write_timeout(Some(IO_TIMEOUT))?;
    con.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok(con)
}

impl Backend for RedisStore {
    fn apply(&mut self, _group: u64, changes: &[Change]) -> Result<(), StoreError> {
        // Statements that write are refused while Redis is down before they
        // change anything (`ShardCore::cluster_write_refused`); what still
        // comes (a last-online time, a re-seed racing the reconnect) is
        // tried.
        let node = self.node;
        for part in chunks(changes) {
            let chunk: Vec<WireChange> = part.iter().filter_map(WireChange::of).collect();
            if chunk.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            pipe.atomic();
            let devs: BTreeSet<u32> = chunk.iter().map(WireChange::dev).collect();
            pipe.cmd("SADD").arg(DEVS).arg(devs.into_iter().collect::<Vec<_>>()).ignore();
            // In order; a user's last device on this node leaving is
            // decided by a script (is the user online on another node?)
            // that publishes its own message, so the changes before it are
            // published before it.
            let mut plain: Vec<WireChange> = Vec::new();
            for c in &chunk {
                match c {
                    WireChange::Time { d, u, t: Some(t) } if *t > 0 => {
                        publish_state(&mut pipe, node, &mut plain);
                        self.went_offline(&mut pipe, *d, *u, *t);
                    }
                    c => {
                        c.write(&mut pipe);
                        plain.push(c.clone());
                    }
                }
            }
            publish_state(&mut pipe, node, &mut plain);
            // Once again on a new connection when the old one failed (Redis
            // restarted since the last write; how the break shows varies):
            // the commands are idempotent, and a state message applied
            // twice changes nothing.
            let mut tries = 0;
            loop {
                let con = self.connection()?;
                match pipe.query::<()>(con) {
                    Ok(()) => break,
                    Err(e) => {
                        self.con = None;
                        tries += 1;
                        if tries == 2 {
                            return Err(self.failed(&e));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Redis acknowledged every write already (its own durability is its
    /// AOF: docs/cluster.md).
    fn sync(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn load(&mut self, sink: &mut dyn FnMut(Change)) -> Result<(), StoreError> {
        let con = self.connection()?;
        let r = snapshot(con, sink);
        r.map_err(|e| {
            self.con = None;
            self.failed(&e)
        })
    }

    fn disk_size(&self) -> u64 {
        0
    }
}

/// Every field and value of a hash, in pieces (HSCAN), as pairs.
fn hash_pairs(con: &mut redis::Connection, hash: &str) -> redis::RedisResult<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, flat): (u64, Vec<String>) =
            redis::cmd("HSCAN").arg(hash).arg(cursor).arg("COUNT").arg(1000).query(con)?;
        let mut it = flat.into_iter();
        while let (Some(f), Some(v)) = (it.next(), it.next()) {
            out.push((f, v));
        }
        if next == 0 {
            return Ok(out);
        }
        cursor = next;
    }
}

fn set_members(con: &mut redis::Connection, set: &str) -> redis::RedisResult<Vec<String>> {
    let mut out = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, mut part): (u64, Vec<String>) =
            redis::cmd("SSCAN").arg(set).arg(cursor).arg("COUNT").arg(1000).query(con)?;
        out.append(&mut part);
        if next == 0 {
            return Ok(out);
        }
        cursor = next;
    }
}

/// Reads the whole state from Redis as puts (history in id order per
/// channel). Unparsable fields are skipped with a log line: another
/// program's keys must not stop a node.
pub fn snapshot(con: &mut redis::Connection, sink: &mut dyn FnMut(Change)) -> redis::RedisResult<()> {
    let bad = |what: &str, f: &str| eprintln!("comet: redis: skipping {what} {}", crate::domain::clip(f));
    for dev in set_members(con, DEVS)? {
        let Ok(d) = dev.parse::<u32>() else {
            bad("dev_id", &dev);
            continue;
        };
        for (table, make) in [
            (
                "auth",
                (|d, u, v: String| Change::Key { dev: d, uid: u, key: Some(v.into()) })
                    as fn(u32, u64, String) -> Change,
            ),
            ("data", |d, u, v: String| Change::Data { dev: d, uid: u, data: Some(v.into()) }),
        ] {
            for (f, v) in hash_pairs(con, &key(d, table))? {
                match f.parse::<u64>() {
                    Ok(u) => sink(make(d, u, v)),
                    Err(_) => bad("user id", &f),
                }
            }
        }
        for (f, v) in hash_pairs(con, &key(d, "time"))? {
            match (f.parse::<u64>(), v.parse::<i64>()) {
                (Ok(u), Ok(t)) => sink(Change::LastOnline { dev: d, uid: u, time: Some(t) }),
                _ => bad("users_time entry", &f),
            }
        }
        for t in set_members(con, &key(d, "revoked"))? {
            sink(Change::Revoked { dev: d, token: t.into(), on: true });
        }
        for (c, l) in hash_pairs(con, &key(d, "settings"))? {
            match l.parse::<u32>() {
                Ok(l) => sink(Change::Setting { dev: d, channel: c.into(), len: Some(l) }),
                Err(_) => bad("setting of", &c),
            }
        }
        for c in set_members(con, &key(d, "histories"))? {
            let mut entries: Vec<WireEntry> = hash_pairs(con, &history_key(d, &c))?
                .into_iter()
                .filter_map(|(_, v)| serde_json::from_str(&v).ok())
                .collect();
            entries.sort_by_key(|e| e.i);
            let channel: Arc<str> = c.into();
            for e in entries {
                let entry = HistoryRecord { id: e.i, time: e.t, event: e.e, message: e.m, user_id: e.u };
                sink(Change::HistoryPut { dev: d, channel: channel.clone(), entry });
            }
        }
    }
    Ok(())
}

/// Hands a state message from another node to the shards that hold what
/// it changes, in order.
pub(super) fn deliver(bridge: &Bridge, payload: &[u8]) {
    let msg: StateMsg = match serde_json::from_slice(payload) {
        Ok(m) => m,
        Err(e) => {
            bridge.health.lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            eprintln!("comet: redis: undecodable state message: {e}");
            return;
        }
    };
    if msg.n == bridge.node {
        return;
    }
    bridge.health.received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for (shard, changes) in split(msg.c.into_iter().map(WireChange::into_change), bridge.lanes.len()) {
        if !changes.is_empty() {
            super::push(bridge, &bridge.lanes[shard], Inbound::State(changes));
        }
    }
}

/// Changes grouped by the shard that holds them, order kept within each.
fn split(changes: impl Iterator<Item = Change>, shards: usize) -> Vec<(usize, Vec<Change>)> {
    let mut per: Vec<Vec<Change>> = (0..shards).map(|_| Vec::new()).collect();
    for c in changes {
        per[home_of(&c, shards)].push(c);
    }
    per.into_iter().enumerate().collect()
}

/// After the subscriber (re)subscribed [`STATE_CHANNEL`]: replaces the
/// shards' copy of the state with Redis's, or, when Redis has none (it
/// restarted empty, or the cluster is new), has the shards write theirs.
pub(super) fn resync(bridge: &Bridge) -> redis::RedisResult<()> {
    let mut con = connect(&bridge.client)?;
    let seeded: bool = redis::cmd("EXISTS").arg(SEEDED).query(&mut con)?;
    let shards = bridge.lanes.len();
    if !seeded {
        for lane in &bridge.lanes {
            super::push(bridge, lane, Inbound::Reseed);
        }
        let _: () = redis::cmd("SET").arg(SEEDED).arg(bridge.node.to_string()).query(&mut con)?;
        eprintln!("comet: redis: no cluster state in Redis; this node writes what it holds");
        return Ok(());
    }
    // Straight into each shard's part: one shard's part replaces its copy
    // at once, so no shard serves half a state.
    let mut per: Vec<Vec<Change>> = (0..shards).map(|_| Vec::new()).collect();
    let mut records = 0usize;
    snapshot(&mut con, &mut |c| {
        records += 1;
        per[home_of(&c, shards)].push(c);
    })?;
    for (lane, changes) in bridge.lanes.iter().zip(per) {
        super::push(bridge, lane, Inbound::Reload(changes));
    }
    eprintln!("comet: redis: loaded {records} state records");
    Ok(())
}

/// A `users_messages` SELECT (or DELETE, `delete`) in a cluster: the
/// offline queues are Redis lists (`super::queue_key`), read by the
/// publisher thread in its next pipeline.
#[derive(Debug)]
pub struct QueueRead {
    /// The shard whose gather `req` waits for the answer.
    pub shard: usize,
    pub req: u64,
    pub dev_id: u32,
    pub user_ids: Vec<u64>,
    /// Take the queues (`DELETE`) instead of reading them.
    pub delete: bool,
}

impl QueueRead {
    /// One `LRANGE` (or the atomic take, `super::DRAIN`) per user.
    pub(super) fn add_to(&self, pipe: &mut redis::Pipeline) {
        for &u in &self.user_ids {
            let key = super::queue_key(self.dev_id, u);
            match self.delete {
                true => pipe.cmd("EVAL").arg(super::DRAIN).arg(1).arg(key),
                false => pipe.cmd("LRANGE").arg(key).arg(0).arg(-1),
            };
        }
    }
}

/// What a [`QueueRead`] found: per user, the queued messages (oldest
/// first), or why Redis could not be read.
#[derive(Debug)]
pub struct QueueAnswer {
    pub req: u64,
    pub delete: bool,
    pub queues: Result<Vec<(u64, Vec<crate::users::Queued>)>, String>,
}

impl QueueAnswer {
    pub(super) fn weight(&self) -> usize {
        64 + self.queues.as_ref().map_or(0, |q| {
            q.iter().map(|(_, m)| m.iter().map(|m| 16 + m.event().len() + m.message().len()).sum::<usize>()).sum()
        })
    }
}

/// Hands the lists Redis returned for `q` (or the error) to its shard.
pub(super) fn answer_queues(bridge: &Bridge, q: QueueRead, lists: Result<Vec<Vec<Vec<u8>>>, String>) {
    let (shard, answer) = queue_answer(q, lists);
    if let Some(lane) = bridge.lanes.get(shard) {
        super::push(bridge, lane, answer);
    }
}

/// The shard waiting for `q`, and its answer.
pub(super) fn queue_answer(q: QueueRead, lists: Result<Vec<Vec<Vec<u8>>>, String>) -> (usize, Inbound) {
    let queues = lists.map(|lists| {
        q.user_ids
            .iter()
            .zip(lists)
            .map(|(&u, entries)| {
                let msgs = entries
                    .iter()
                    .filter_map(|e| serde_json::from_slice::<super::PrivateWire>(e).ok())
                    .map(|w| crate::users::Queued::new(w.t.unwrap_or(0), &w.e, &w.m))
                    .collect();
                (u, msgs)
            })
            .collect()
    });
    (q.shard, Inbound::Queues(QueueAnswer { req: q.req, delete: q.delete, queues }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_replicated_change_round_trips_and_queue_changes_stay_out() {
        let entry = HistoryRecord { id: 9, time: 5, event: "e".into(), message: "m \"q\"".into(), user_id: Some(3) };
        let changes = vec![
            Change::Key { dev: 1, uid: 2, key: Some("k".into()) },
            Change::Key { dev: 1, uid: 2, key: None },
            Change::Data { dev: 1, uid: 2, data: Some("d".into()) },
            Change::LastOnline { dev: 1, uid: 2, time: Some(77) },
            Change::Revoked { dev: 1, token: "a.b.c".into(), on: true },
            Change::Setting { dev: 1, channel: "web_x".into(), len: Some(10) },
            Change::HistoryPut { dev: 1, channel: "web_x".into(), entry },
            Change::HistoryDel { dev: 1, channel: "web_x".into(), id: 9 },
        ];
        let wire: Vec<WireChange> = changes.iter().filter_map(WireChange::of).collect();
        let json = serde_json::to_vec(&StateMsg { n: 4, c: wire }).unwrap();
        let back: StateMsg = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.n, 4);
        let back: Vec<Change> = back.c.into_iter().map(WireChange::into_change).collect();
        assert_eq!(back, changes);
        let q = Change::QueueDel { dev: 1, uid: 2, seq: 0, tag: 1, bytes: 40 };
        assert_eq!(WireChange::of(&q), None);
    }

    #[test]
    fn changes_go_out_in_pieces_bounded_in_count_and_bytes() {
        let small = |u| Change::Data { dev: 0, uid: u, data: Some("x".into()) };
        let many: Vec<Change> = (0..2500).map(small).collect();
        let sizes: Vec<usize> = chunks(&many).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [1000, 1000, 500]);
        let big = |u| Change::Data { dev: 0, uid: u, data: Some("y".repeat(400 << 10).into()) };
        let large: Vec<Change> = (0..7).map(big).collect();
        let sizes: Vec<usize> = chunks(&large).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [2, 2, 2, 1]);
        let huge = vec![Change::Data { dev: 0, uid: 1, data: Some("z".repeat(3 << 20).into()) }, small(2)];
        assert_eq!(chunks(&huge).len(), 2, "a change over the bound goes alone");
        assert!(chunks(&[]).is_empty());
    }

    #[test]
    fn a_change_goes_to_the_shard_that_holds_its_user_or_channel() {
        let c = Change::Data { dev: 3, uid: 12345, data: None };
        assert_eq!(home_of(&c, 4), crate::shard::home_shard(3, 12345, 4));
        let s = Change::Setting { dev: 3, channel: "web_a".into(), len: None };
        assert_eq!(home_of(&s, 4), crate::shard::home_shard_of_channel(3, "web_a", 4));
        let grouped = split(vec![c.clone(), s.clone(), c.clone()].into_iter(), 4);
        let total: usize = grouped.iter().map(|(_, v)| v.len()).sum();
        assert_eq!(total, 3);
        assert_eq!(grouped[crate::shard::home_shard(3, 12345, 4)].1.iter().filter(|x| **x == c).count(), 2);
    }
}
