//! Cluster-wide presence: subscriber counts, `users_in_pipes` and
//! `track_pipe_users` rows, and the 16-device cap, over Redis.
//!
//! Each node keeps what it holds in Redis under keys it owns:
//! - `comet:subs:<node>:<dev_id>:<channel>`, a hash of the node's
//!   subscribers of the channel (field: the connection, value: its
//!   `users_in_pipes` row as a JSON array of strings), listed in
//!   `comet:pchans:<node>`; the channel's count on the node is its `HLEN`;
//! - one member `<node>:<shard>:<index>:<generation>` per device in the
//!   user's `comet:<dev_id>:devices:<id>` sorted set (score: connect time,
//!   unix ms), those sets listed in `comet:pdevs:<node>`;
//! - `comet:pnodes`, the nodes that registered presence.
//!
//! Shards never wait for Redis. They report each subscribe, unsubscribe,
//! device attach and detach to [`Presence`] (a mutex, no I/O); the Redis
//! publisher thread writes the changed channels only, at most every
//! [`FLUSH_EVERY`], as one `MULTI` with one `PUBLISH` on
//! [`COUNTS_CHANNEL`] of the changed counts. Every node subscribes that
//! channel and keeps the other nodes' counts in a cache, so a publish, a
//! `pipe_count` and `pipes` report local + cached remote counts without a
//! round trip. `users_in_pipes` and `track_pipe_users` read the other
//! nodes' rows with one script call (the answer waits in the shard's
//! gather like another shard's reply).
//!
//! A node whose alive key (`comet:node:<id>`, kept by the heartbeat in
//! `super`) expired is swept by the next node's refresh: its keys are
//! deleted, its `track_` subscribers get `unsubscription` events, and every
//! cache drops its counts. A node that finds itself missing from
//! `comet:pnodes` (Redis restarted empty, or it was swept after a stall)
//! writes everything it holds again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Bridge, Inbound};
use crate::domain::ConnId;

/// How long a subscription change may wait before the node writes it to
/// Redis: the staleness of this node's part in the other nodes' counts and
/// rows (plus the Redis hop).
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// The Redis channel every node announces its changed counts on.
pub const COUNTS_CHANNEL: &str = "comet:counts";
/// Most devices of a user across the cluster.
pub const MAX_DEVICES: usize = crate::users::MAX_DEVICES;

/// The Redis channel a node receives evictions of its devices on.
pub fn node_channel(node: u64) -> String {
    format!("comet:pnode:{node}")
}

/// The hash of node `node`'s subscribers of a channel.
pub fn subs_key(node: u64, dev_id: u32, pipe: &str) -> String {
    format!("comet:subs:{node}:{dev_id}:{pipe}")
}

/// The sorted set of a user's devices, cluster-wide.
pub fn devices_key(dev_id: u32, user_id: u64) -> String {
    format!("comet:{dev_id}:devices:{user_id}")
}

/// The (dev_id, channel) of a [`subs_key`] of node `node`.
fn parse_subs_key(node: &str, key: &str) -> Option<(u32, String)> {
    let rest = key.strip_prefix("comet:subs:")?.strip_prefix(node)?.strip_prefix(':')?;
    let (dev, pipe) = rest.split_once(':')?;
    Some((dev.parse().ok()?, pipe.to_string()))
}

/// A connection, as a hash field and a device member: shard, slot index
/// and generation.
fn conn_field(shard: usize, id: ConnId) -> String {
    format!("{shard}:{}:{}", id.index, id.generation)
}

/// A subscription's connection in the node's mirror: shard, the low 16
/// bits of the generation and the slot index (unique among live
/// connections: a slot is reused only after its connection left every
/// channel). In Redis it is the hash field, in decimal.
fn sub_key(shard: usize, id: ConnId) -> u64 {
    ((shard as u64) << 48) | (u64::from(id.generation & 0xFFFF) << 32) | u64::from(id.index)
}

fn parse_conn_field(s: &str) -> Option<(usize, ConnId)> {
    let mut it = s.split(':');
    let shard = it.next()?.parse().ok()?;
    let index = it.next()?.parse().ok()?;
    let generation = it.next()?.parse().ok()?;
    it.next().is_none().then_some((shard, ConnId { index, generation }))
}

/// An eviction as `DEVICE_ADD` publishes it: `<devices key>|<member>`,
/// the member being `<node>:<shard>:<index>:<generation>`. Returns the
/// dev_id, the user id, the shard and the connection.
fn parse_eviction(text: &str) -> Option<(u32, u64, usize, ConnId)> {
    let (key, member) = text.split_once('|')?;
    let rest = key.strip_prefix("comet:")?;
    let (dev, rest) = rest.split_once(':')?;
    let uid = rest.strip_prefix("devices:")?;
    let (_, conn) = member.split_once(':')?;
    let (shard, id) = parse_conn_field(conn)?;
    Some((dev.parse().ok()?, uid.parse().ok()?, shard, id))
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One subscriber's `users_in_pipes` row (without the channel), as it is
/// stored in Redis: `[user_id, uuid, user_agent, ip, origin, language]`,
/// all strings (Lua reads the user id without a float conversion).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row(pub String, pub String, pub String, pub String, pub String, pub String);

impl Row {
    pub fn user_id(&self) -> u64 {
        self.0.parse().unwrap_or(0)
    }
}

/// Changed counts of one node, as they travel on [`COUNTS_CHANNEL`].
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct CountsWire {
    /// The node.
    n: u64,
    /// Its flush number: a snapshot older than an entry does not undo it.
    v: u64,
    /// Every channel of the node is listed (after a resync): the others
    /// are at 0.
    #[serde(default)]
    f: bool,
    /// (dev_id, channel, subscribers on the node).
    c: Vec<(u32, String, u64)>,
}

type ChanKey = (u32, Arc<str>);

/// What this node holds, mirrored for Redis, and what changed since the
/// last flush.
#[derive(Debug, Default)]
struct Local {
    /// Subscribers per channel: connection ([`sub_key`]) → row (JSON),
    /// one allocation per connection shared by its channels.
    channels: HashMap<ChanKey, HashMap<u64, Arc<str>>>,
    /// Channels with changed subscribers, and which.
    dirty: HashMap<ChanKey, HashSet<u64>>,
    /// The last row made per shard: a connection's next channels reuse it.
    last_row: HashMap<usize, (ConnId, Arc<str>)>,
    /// Devices per user: member → connect time (unix ms).
    devices: HashMap<(u32, u64), HashMap<String, u64>>,
    /// Device changes in order: (user, member, connect time or `None` for
    /// a removal).
    device_ops: Vec<((u32, u64), String, Option<u64>)>,
    /// Bytes held by `dirty` and `device_ops`, against `--mail-limit`.
    pending_bytes: usize,
    /// Write everything again (Redis lost it, or a write failed).
    resync: bool,
    last_flush: Option<Instant>,
    /// Flush number, for [`CountsWire::v`].
    seq: u64,
}

/// One other node's counts in the cache.
#[derive(Debug, Default)]
struct NodeCounts {
    /// Channel → (count, flush number it was set by).
    channels: HashMap<ChanKey, (u64, u64)>,
    /// The cache has had all of the node's channels (a snapshot or a full
    /// list), not only changes: it need not be loaded again.
    complete: bool,
}

/// The other nodes' counts.
#[derive(Debug, Default)]
struct Remote {
    nodes: HashMap<u64, NodeCounts>,
    /// The sum over the nodes, per dev_id and channel.
    totals: HashMap<u32, HashMap<Arc<str>, u64>>,
}

impl Remote {
    fn total(&self, dev_id: u32, pipe: &str) -> u64 {
        self.totals.get(&dev_id).and_then(|m| m.get(pipe)).copied().unwrap_or(0)
    }

    fn adjust(&mut self, key: &ChanKey, old: u64, new: u64) {
        if old == new {
            return;
        }
        let m = self.totals.entry(key.0).or_default();
        let t = m.entry(key.1.clone()).or_insert(0);
        *t = t.saturating_add(new).saturating_sub(old);
        if *t == 0 {
            m.remove(&key.1);
            if m.is_empty() {
                self.totals.remove(&key.0);
            }
        }
    }

    /// Sets a node's count of a channel as of flush `v` (0 removes it).
    fn set(&mut self, node: u64, key: ChanKey, count: u64, v: u64) {
        let n = self.nodes.entry(node).or_default();
        let old = match count {
            0 => n.channels.remove(&key).map_or(0, |(c, _)| c),
            _ => n.channels.insert(key.clone(), (count, v)).map_or(0, |(c, _)| c),
        };
        self.adjust(&key, old, count);
    }

    /// A message from `COUNTS_CHANNEL`: newer than anything the cache has
    /// of that node (Redis delivers one node's messages in order).
    fn apply(&mut self, w: CountsWire) {
        let listed: HashSet<ChanKey> = w.c.iter().map(|(d, p, _)| (*d, Arc::from(p.as_str()))).collect();
        if w.f {
            let gone: Vec<ChanKey> = self
                .nodes
                .get(&w.n)
                .map(|n| n.channels.keys().filter(|k| !listed.contains(*k)).cloned().collect())
                .unwrap_or_default();
            for k in gone {
                self.set(w.n, k, 0, w.v);
            }
        }
        for (d, p, c) in w.c {
            self.set(w.n, (d, Arc::from(p.as_str())), c, w.v);
        }
        if w.f {
            self.nodes.entry(w.n).or_default().complete = true;
        }
    }

    /// A snapshot read from Redis at flush `v` of the node: it replaces
    /// what the cache has from flushes up to `v`, never a newer entry.
    fn snapshot(&mut self, node: u64, v: u64, entries: Vec<(ChanKey, u64)>) {
        let listed: HashSet<&ChanKey> = entries.iter().map(|(k, _)| k).collect();
        let stale: Vec<ChanKey> = self
            .nodes
            .get(&node)
            .map(|n| n.channels.iter().filter(|(k, (_, at))| *at <= v && !listed.contains(k)).map(|(k, _)| k.clone()))
            .into_iter()
            .flatten()
            .collect();
        for k in stale {
            self.set(node, k, 0, v);
        }
        for (k, c) in entries {
            let newer = self.nodes.get(&node).and_then(|n| n.channels.get(&k)).is_some_and(|(_, at)| *at > v);
            if !newer {
                self.set(node, k, c, v);
            }
        }
        self.nodes.entry(node).or_default().complete = true;
    }

    fn drop_node(&mut self, node: u64) {
        if let Some(n) = self.nodes.remove(&node) {
            for (k, (c, _)) in n.channels {
                self.adjust(&k, c, 0);
            }
        }
    }
}

/// A question for the other nodes' rows, answered into a shard's gather.
#[derive(Debug)]
struct RowsAsk {
    shard: usize,
    req: u64,
    dev_id: u32,
    pipes: Vec<Arc<str>>,
}

/// The other nodes' rows of the asked channels, or why Redis could not
/// give them.
pub type RemoteRows = Result<Vec<(Arc<str>, Row)>, String>;

/// The presence state a node shares between its shards and its Redis
/// threads.
#[derive(Debug, Default)]
pub struct Presence {
    local: Mutex<Local>,
    remote: Mutex<Remote>,
    asks: Mutex<Vec<RowsAsk>>,
    /// Reload the whole cache (the subscriber (re)subscribed the counts).
    reload: std::sync::atomic::AtomicBool,
}

impl Presence {
    fn local(&self) -> std::sync::MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn remote(&self) -> std::sync::MutexGuard<'_, Remote> {
        self.remote.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Subscribers of a channel on the other nodes, as last announced.
    pub fn remote_count(&self, dev_id: u32, pipe: &str) -> u64 {
        self.remote().total(dev_id, pipe)
    }

    /// Subscribers on the other nodes of each channel.
    pub fn remote_counts<S: AsRef<str>>(&self, dev_id: u32, pipes: &[S]) -> Vec<u64> {
        let r = self.remote();
        pipes.iter().map(|p| r.total(dev_id, p.as_ref())).collect()
    }

    /// Records a change unless Redis is down (then everything is written
    /// again on reconnect) or too much waits (past `limit` bytes, the same).
    fn note(&self, up: bool, limit: usize, l: &mut Local, bytes: usize) -> bool {
        if l.resync {
            return false;
        }
        if !up || l.pending_bytes + bytes > limit {
            l.resync = true;
            l.dirty.clear();
            l.device_ops.clear();
            l.pending_bytes = 0;
            return false;
        }
        l.pending_bytes += bytes;
        true
    }
}

impl Bridge {
    /// Subscribers of a channel on the other nodes, as last announced.
    pub fn presence_remote_count(&self, dev_id: u32, pipe: &str) -> u64 {
        self.presence.remote_count(dev_id, pipe)
    }

    /// Subscribers on the other nodes of each channel.
    pub fn presence_remote_counts<S: AsRef<str>>(&self, dev_id: u32, pipes: &[S]) -> Vec<u64> {
        self.presence.remote_counts(dev_id, pipes)
    }

    /// A connection on `shard` subscribed a channel; `row` makes its
    /// `users_in_pipes` row (called once per connection and batch of
    /// channels).
    pub fn channel_joined(&self, dev_id: u32, pipe: &Arc<str>, shard: usize, id: ConnId, row: impl FnOnce() -> Row) {
        let field = sub_key(shard, id);
        let key: ChanKey = (dev_id, pipe.clone());
        let mut l = self.presence.local();
        let value = match l.last_row.get(&shard) {
            Some((c, v)) if *c == id => v.clone(),
            _ => {
                let v: Arc<str> = serde_json::to_string(&row()).unwrap_or_default().into();
                l.last_row.insert(shard, (id, v.clone()));
                v
            }
        };
        let weight = 80 + pipe.len();
        let first = l.dirty.is_empty();
        if self.presence.note(self.is_up(), self.limit, &mut l, weight) {
            l.dirty.entry(key.clone()).or_default().insert(field);
        }
        l.channels.entry(key).or_default().insert(field, value);
        drop(l);
        if first {
            // The publisher may sleep up to a second when idle.
            self.wake_publisher();
        }
    }

    /// A connection on `shard` left a channel (or closed).
    pub fn channel_left(&self, dev_id: u32, pipe: &Arc<str>, shard: usize, id: ConnId) {
        let field = sub_key(shard, id);
        let key: ChanKey = (dev_id, pipe.clone());
        let mut l = self.presence.local();
        if let Some(m) = l.channels.get_mut(&key) {
            m.remove(&field);
            if m.is_empty() {
                l.channels.remove(&key);
            }
        }
        let weight = 80 + pipe.len();
        let first = l.dirty.is_empty();
        if self.presence.note(self.is_up(), self.limit, &mut l, weight) {
            l.dirty.entry(key).or_default().insert(field);
        }
        drop(l);
        if first {
            self.wake_publisher();
        }
    }

    /// A device of a user attached on `shard`: counted against the
    /// cluster-wide cap; the oldest device anywhere past it is evicted.
    pub fn device_attached(&self, dev_id: u32, user_id: u64, shard: usize, id: ConnId) {
        let member = format!("{}:{}", self.node, conn_field(shard, id));
        let since = unix_ms();
        let mut l = self.presence.local();
        l.devices.entry((dev_id, user_id)).or_default().insert(member.clone(), since);
        if self.presence.note(self.is_up(), self.limit, &mut l, 96 + member.len()) {
            l.device_ops.push(((dev_id, user_id), member, Some(since)));
        }
        drop(l);
        self.wake_publisher();
    }

    /// A device of a user closed.
    pub fn device_detached(&self, dev_id: u32, user_id: u64, shard: usize, id: ConnId) {
        let member = format!("{}:{}", self.node, conn_field(shard, id));
        let mut l = self.presence.local();
        let Some(m) = l.devices.get_mut(&(dev_id, user_id)) else { return };
        if m.remove(&member).is_none() {
            return;
        }
        if m.is_empty() {
            l.devices.remove(&(dev_id, user_id));
        }
        if self.presence.note(self.is_up(), self.limit, &mut l, 96 + member.len()) {
            l.device_ops.push(((dev_id, user_id), member, None));
        }
    }

    /// Asks the other nodes' rows of `pipes` for gather `req` of `shard`;
    /// the answer comes back as [`Inbound::Rows`] (an error when Redis
    /// fails before it answers). The caller checked [`Bridge::is_up`].
    pub fn ask_rows(&self, shard: usize, req: u64, dev_id: u32, pipes: Vec<Arc<str>>) {
        self.presence.asks.lock().unwrap_or_else(PoisonError::into_inner).push(RowsAsk { shard, req, dev_id, pipes });
        self.wake_publisher();
    }

    fn wake_publisher(&self) {
        if let Some(t) = self.publisher.get() {
            t.unpark();
        }
    }

    /// How long the publisher may sleep before presence work is due.
    pub(super) fn presence_wait(&self, idle: Duration) -> Duration {
        let l = self.presence.local();
        if l.resync || !l.dirty.is_empty() || !l.device_ops.is_empty() {
            let since = l.last_flush.map_or(FLUSH_EVERY, |t| t.elapsed());
            return FLUSH_EVERY.saturating_sub(since).min(idle);
        }
        idle
    }

    /// The subscriber's connection broke: the cache is stale until it has
    /// resubscribed and reloaded.
    pub(super) fn presence_lost(&self) {
        let mut r = self.presence.remote();
        r.nodes.clear();
        r.totals.clear();
    }

    /// The subscriber has (re)subscribed [`COUNTS_CHANNEL`]: load every
    /// node's counts once.
    pub(super) fn presence_subscribed(&self) {
        self.presence.reload.store(true, Ordering::SeqCst);
        self.wake_publisher();
    }

    /// Handles a message on a presence channel; false when it is not one.
    pub(super) fn presence_deliver(&self, channel: &str, payload: &[u8]) -> bool {
        if channel == COUNTS_CHANNEL {
            match serde_json::from_slice::<CountsWire>(payload) {
                Ok(w) if w.n == self.node => {}
                Ok(w) => self.presence.remote().apply(w),
                Err(e) => eprintln!("comet: redis: undecodable counts: {e}"),
            }
            return true;
        }
        if channel != node_channel(self.node) {
            return false;
        }
        let text = String::from_utf8_lossy(payload);
        match parse_eviction(&text) {
            Some((dev_id, user_id, shard, conn)) if shard < self.lanes.len() => {
                super::push(self, &self.lanes[shard], Inbound::Evict { dev_id, user_id, conn });
            }
            _ => eprintln!("comet: redis: undecodable eviction {}", crate::domain::clip(&text)),
        }
        true
    }
}

/// Removes every entry of this node (before a resync). ARGV: node.
const RESET: &str = "local n = ARGV[1] \
for _, k in ipairs(redis.call('SMEMBERS', 'comet:pchans:' .. n)) do redis.call('DEL', k) end \
redis.call('DEL', 'comet:pchans:' .. n) \
for _, k in ipairs(redis.call('SMEMBERS', 'comet:pdevs:' .. n)) do \
  for _, m in ipairs(redis.call('ZRANGE', k, 0, -1)) do \
    if string.sub(m, 1, #n + 1) == n .. ':' then redis.call('ZREM', k, m) end \
  end \
end \
redis.call('DEL', 'comet:pdevs:' .. n) \
return 0";

/// A device attaches: drop the user's devices on dead nodes, add it, and
/// evict the oldest past the cap by telling the node that holds it.
/// KEYS: the user's devices; ARGV: member, connect time, cap, node.
const DEVICE_ADD: &str = "local k = KEYS[1] \
for _, m in ipairs(redis.call('ZRANGE', k, 0, -1)) do \
  local n = string.match(m, '^(%d+):') \
  if n and n ~= ARGV[4] and redis.call('EXISTS', 'comet:node:' .. n) == 0 then redis.call('ZREM', k, m) end \
end \
redis.call('ZADD', k, ARGV[2], ARGV[1]) \
redis.call('SADD', 'comet:pdevs:' .. ARGV[4], k) \
local evicted = 0 \
while redis.call('ZCARD', k) > tonumber(ARGV[3]) do \
  local old = redis.call('ZPOPMIN', k) \
  local n = string.match(old[1], '^(%d+):') \
  if n then redis.call('PUBLISH', 'comet:pnode:' .. n, k .. '|' .. old[1]) end \
  evicted = evicted + 1 \
end \
return evicted";

/// Registers this node for presence (returns 1 when Redis did not know it:
/// it must write everything again), and sweeps the nodes whose alive key
/// expired: their entries go, and their `track_` subscribers get
/// `unsubscription`. ARGV: node.
const SWEEP: &str = "local added = redis.call('SADD', 'comet:pnodes', ARGV[1]) \
local t = redis.call('TIME') \
local swept = 0 \
for _, n in ipairs(redis.call('SMEMBERS', 'comet:pnodes')) do \
  if n ~= ARGV[1] and redis.call('EXISTS', 'comet:node:' .. n) == 0 then \
    for _, k in ipairs(redis.call('SMEMBERS', 'comet:pchans:' .. n)) do \
      local dev, pipe = string.match(k, '^comet:subs:%d+:(%d+):(.+)$') \
      if dev and string.sub(pipe, 1, 6) == 'track_' then \
        for _, row in ipairs(redis.call('HVALS', k)) do \
          local ok, r = pcall(cjson.decode, row) \
          if ok and type(r) == 'table' and r[1] and r[2] then \
            local data = '{\"user_id\":' .. r[1] .. ',\"uuid\":' .. cjson.encode(r[2]) .. '}' \
            redis.call('PUBLISH', 'comet:' .. dev .. ':pipe:' .. pipe, cjson.encode({n = 0, d = tonumber(dev), \
              p = pipe, e = 'unsubscription', m = data, j = true, t = tonumber(t[1])})) \
          end \
        end \
      end \
      redis.call('DEL', k) \
      swept = swept + 1 \
    end \
    for _, k in ipairs(redis.call('SMEMBERS', 'comet:pdevs:' .. n)) do \
      for _, m in ipairs(redis.call('ZRANGE', k, 0, -1)) do \
        if string.sub(m, 1, #n + 1) == n .. ':' then redis.call('ZREM', k, m) end \
      end \
    end \
    redis.call('DEL', 'comet:pchans:' .. n, 'comet:pdevs:' .. n, 'comet:pseq:' .. n) \
    redis.call('SREM', 'comet:pnodes', n) \
  end \
end \
return {added, swept}";

/// The live nodes other than this one, each with its flush number, and
/// the counts of those not in ARGV (the ones the cache lacks): one array
/// per node, `{node, seq, key, count, key, count, ...}`. ARGV: node, the
/// nodes already cached.
const LOAD: &str = "local known = {} \
for i = 2, #ARGV do known[ARGV[i]] = true end \
local out = {} \
for _, n in ipairs(redis.call('SMEMBERS', 'comet:pnodes')) do \
  if n ~= ARGV[1] and redis.call('EXISTS', 'comet:node:' .. n) == 1 then \
    local e = {n, redis.call('GET', 'comet:pseq:' .. n) or '0'} \
    if not known[n] then \
      for _, k in ipairs(redis.call('SMEMBERS', 'comet:pchans:' .. n)) do \
        table.insert(e, k) \
        table.insert(e, tostring(redis.call('HLEN', k))) \
      end \
    end \
    table.insert(out, e) \
  end \
end \
return out";

/// The rows of the asked channels on the other live nodes, as `{channel,
/// row, channel, row, ...}`. ARGV: node, dev_id, channels...
const ROWS: &str = "local out = {} \
for _, n in ipairs(redis.call('SMEMBERS', 'comet:pnodes')) do \
  if n ~= ARGV[1] and redis.call('EXISTS', 'comet:node:' .. n) == 1 then \
    for i = 3, #ARGV do \
      for _, row in ipairs(redis.call('HVALS', 'comet:subs:' .. n .. ':' .. ARGV[2] .. ':' .. ARGV[i])) do \
        table.insert(out, ARGV[i]) \
        table.insert(out, row) \
      end \
    end \
  end \
end \
return out";

/// The publisher's presence work for one turn of its loop: answer row
/// questions, reload the cache when asked, and flush changes when due.
pub(super) fn work(bridge: &Bridge, con: &mut redis::Connection) -> redis::RedisResult<()> {
    let asks = std::mem::take(&mut *bridge.presence.asks.lock().unwrap_or_else(PoisonError::into_inner));
    // The same question asked several times while the last script ran
    // (browsers repeating `track_pipe_users` on a big channel) costs Redis
    // one script call.
    type Question = (u32, Vec<Arc<str>>);
    let mut groups: Vec<(Question, Vec<(usize, u64)>)> = Vec::new();
    let mut index: HashMap<Question, usize> = HashMap::new();
    for a in asks {
        let q = (a.dev_id, a.pipes);
        match index.get(&q) {
            Some(&i) => groups[i].1.push((a.shard, a.req)),
            None => {
                index.insert(q.clone(), groups.len());
                groups.push((q, vec![(a.shard, a.req)]));
            }
        }
    }
    for (i, ((dev_id, pipes), askers)) in groups.iter().enumerate() {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(ROWS).arg(0).arg(bridge.node.to_string()).arg(*dev_id);
        for p in pipes {
            cmd.arg(&**p);
        }
        match cmd.query::<Vec<String>>(con) {
            Ok(flat) => {
                let rows: Vec<(Arc<str>, Row)> = flat
                    .chunks_exact(2)
                    .filter_map(|c| Some((Arc::from(c[0].as_str()), serde_json::from_str::<Row>(&c[1]).ok()?)))
                    .collect();
                for &(shard, req) in askers {
                    super::push(bridge, &bridge.lanes[shard], Inbound::Rows { req, rows: Ok(rows.clone()) });
                }
            }
            Err(e) => {
                for &(shard, req) in groups[i..].iter().flat_map(|(_, a)| a) {
                    let why = format!("the cluster's Redis failed: {e}");
                    super::push(bridge, &bridge.lanes[shard], Inbound::Rows { req, rows: Err(why) });
                }
                return Err(e);
            }
        }
    }
    if bridge.presence.reload.swap(false, Ordering::SeqCst) {
        bridge.presence_lost();
        load(bridge, con)?;
    }
    let due = {
        let l = bridge.presence.local();
        (l.resync || !l.dirty.is_empty() || !l.device_ops.is_empty())
            && l.last_flush.is_none_or(|t| t.elapsed() >= FLUSH_EVERY)
    };
    if due && let Err(e) = flush(bridge, con) {
        bridge.presence.local().resync = true;
        return Err(e);
    }
    Ok(())
}

/// The node stops: its subscribers and devices leave the cluster view at
/// once (instead of when its alive key expires).
pub(super) fn leave(bridge: &Bridge, con: &mut redis::Connection) -> redis::RedisResult<()> {
    let node = bridge.node;
    let seq = {
        let mut l = bridge.presence.local();
        l.seq += 1;
        l.seq
    };
    let wire = CountsWire { n: node, v: seq, f: true, c: Vec::new() };
    redis::pipe()
        .atomic()
        .cmd("EVAL")
        .arg(RESET)
        .arg(0)
        .arg(node.to_string())
        .ignore()
        .cmd("SREM")
        .arg("comet:pnodes")
        .arg(node.to_string())
        .ignore()
        .cmd("DEL")
        .arg(format!("comet:pseq:{node}"))
        .ignore()
        .cmd("PUBLISH")
        .arg(COUNTS_CHANNEL)
        .arg(serde_json::to_vec(&wire).unwrap_or_default())
        .ignore()
        .query(con)
}

/// The publisher lost Redis: the questions waiting for it get the error.
pub(super) fn fail_asks(bridge: &Bridge, why: &str) {
    let asks = std::mem::take(&mut *bridge.presence.asks.lock().unwrap_or_else(PoisonError::into_inner));
    for a in asks {
        let rows = Err(format!("the cluster's Redis failed: {why}"));
        super::push(bridge, &bridge.lanes[a.shard], Inbound::Rows { req: a.req, rows });
    }
}

/// Every [`super::PRESENCE_REFRESH`], after the heartbeat: registers the
/// node (writing everything again when Redis did not know it), sweeps dead
/// nodes, and refreshes the cache's list of live nodes.
pub(super) fn refresh(bridge: &Bridge, con: &mut redis::Connection) -> redis::RedisResult<()> {
    let (added, swept): (i64, i64) = redis::cmd("EVAL").arg(SWEEP).arg(0).arg(bridge.node.to_string()).query(con)?;
    if added == 1 {
        bridge.presence.local().resync = true;
    }
    if swept > 0 {
        eprintln!("comet: redis: {swept} channel(s) of nodes that stopped answering left the cluster view");
    }
    load(bridge, con)
}

/// Loads the counts of live nodes the cache lacks, and drops the nodes
/// that are no longer alive.
fn load(bridge: &Bridge, con: &mut redis::Connection) -> redis::RedisResult<()> {
    // Nodes the cache has only changes of are loaded (again) too.
    let known: Vec<u64> = bridge.presence.remote().nodes.iter().filter(|(_, n)| n.complete).map(|(k, _)| *k).collect();
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(LOAD).arg(0).arg(bridge.node.to_string());
    for n in &known {
        cmd.arg(n.to_string());
    }
    let live: Vec<Vec<String>> = cmd.query(con)?;
    let mut r = bridge.presence.remote();
    let mut alive = HashSet::new();
    for e in live {
        let (Some(node), Some(seq)) = (e.first().and_then(|n| n.parse::<u64>().ok()), e.get(1)) else { continue };
        alive.insert(node);
        if known.contains(&node) {
            continue;
        }
        let seq = seq.parse().unwrap_or(0);
        let name = node.to_string();
        let entries = e[2..]
            .chunks_exact(2)
            .filter_map(|c| {
                let (dev, pipe) = parse_subs_key(&name, &c[0])?;
                Some(((dev, Arc::from(pipe.as_str())), c[1].parse().ok()?))
            })
            .collect();
        r.snapshot(node, seq, entries);
    }
    let dead: Vec<u64> = r.nodes.keys().filter(|n| !alive.contains(n)).copied().collect();
    for n in dead {
        r.drop_node(n);
    }
    Ok(())
}

/// Writes the changed channels and devices (or everything, on a resync)
/// as one transaction, and announces the changed counts.
fn flush(bridge: &Bridge, con: &mut redis::Connection) -> redis::RedisResult<()> {
    let node = bridge.node;
    let chans = format!("comet:pchans:{node}");
    let devs = format!("comet:pdevs:{node}");
    let mut pipe = redis::pipe();
    pipe.atomic();
    let mut counts = Vec::new();
    let (full, seq) = {
        let mut l = bridge.presence.local();
        l.last_flush = Some(Instant::now());
        l.seq += 1;
        let full = std::mem::take(&mut l.resync);
        if full {
            bridge.health.presence_resyncs.fetch_add(1, Ordering::Relaxed);
        }
        let dirty = std::mem::take(&mut l.dirty);
        let ops = std::mem::take(&mut l.device_ops);
        l.pending_bytes = 0;
        if full {
            pipe.cmd("EVAL").arg(RESET).arg(0).arg(node.to_string()).ignore();
            for ((dev, name), subs) in &l.channels {
                let key = subs_key(node, *dev, name);
                let cmd = pipe.cmd("HSET").arg(&key);
                for (f, v) in subs {
                    cmd.arg(*f).arg(&**v);
                }
                cmd.ignore();
                pipe.cmd("SADD").arg(&chans).arg(&key).ignore();
                counts.push((*dev, name.to_string(), subs.len() as u64));
            }
            for ((dev, uid), members) in &l.devices {
                let key = devices_key(*dev, *uid);
                for (m, since) in members {
                    pipe.cmd("ZADD").arg(&key).arg(*since).arg(m).ignore();
                }
                pipe.cmd("SADD").arg(&devs).arg(&key).ignore();
            }
        } else {
            for ((dev, name), fields) in dirty {
                let key = subs_key(node, dev, &name);
                let now = l.channels.get(&(dev, name.clone()));
                match now {
                    None => {
                        pipe.cmd("DEL").arg(&key).ignore();
                        pipe.cmd("SREM").arg(&chans).arg(&key).ignore();
                    }
                    Some(subs) => {
                        let (set, del): (Vec<u64>, Vec<u64>) = fields.iter().partition(|f| subs.contains_key(f));
                        if !set.is_empty() {
                            let cmd = pipe.cmd("HSET").arg(&key);
                            for f in set {
                                cmd.arg(f).arg(&*subs[&f]);
                            }
                            cmd.ignore();
                        }
                        if !del.is_empty() {
                            pipe.cmd("HDEL").arg(&key).arg(del).ignore();
                        }
                        pipe.cmd("SADD").arg(&chans).arg(&key).ignore();
                    }
                }
                counts.push((dev, name.to_string(), now.map_or(0, |s| s.len() as u64)));
            }
            for ((dev, uid), member, since) in ops {
                let key = devices_key(dev, uid);
                match since {
                    Some(since) => {
                        pipe.cmd("EVAL").arg(DEVICE_ADD).arg(1).arg(&key).arg(&member).arg(since);
                        pipe.arg(MAX_DEVICES).arg(node.to_string()).ignore();
                    }
                    None => {
                        pipe.cmd("ZREM").arg(&key).arg(&member).ignore();
                    }
                }
            }
        }
        (full, l.seq)
    };
    pipe.cmd("SET").arg(format!("comet:pseq:{node}")).arg(seq).ignore();
    if full || !counts.is_empty() {
        let wire = CountsWire { n: node, v: seq, f: full, c: counts };
        pipe.cmd("PUBLISH").arg(COUNTS_CHANNEL).arg(serde_json::to_vec(&wire).unwrap_or_default()).ignore();
    }
    pipe.query::<()>(con)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(d: u32, p: &str) -> ChanKey {
        (d, Arc::from(p))
    }

    #[test]
    fn keys_and_fields_parse_back() {
        assert_eq!(parse_subs_key("77", &subs_key(77, 3, "web_a:b")), Some((3, "web_a:b".to_string())));
        assert_eq!(parse_subs_key("7", &subs_key(77, 3, "web_a")), None);
        let id = ConnId { index: 12, generation: 4 };
        assert_eq!(parse_conn_field(&conn_field(1, id)), Some((1, id)));
        assert_eq!(parse_conn_field("1:2"), None);
        assert_eq!(parse_conn_field("1:2:3:4"), None);
    }

    #[test]
    fn an_eviction_names_the_user_and_the_connection() {
        let id = ConnId { index: 5, generation: 2 };
        let text = format!("{}|77:{}", devices_key(3, 900), conn_field(1, id));
        assert_eq!(text, "comet:3:devices:900|77:1:5:2");
        assert_eq!(parse_eviction(&text), Some((3, 900, 1, id)));
        assert_eq!(parse_eviction("comet:3:devices:900"), None);
        assert_eq!(parse_eviction("comet:3:online:900|77:1:5:2"), None);
        assert_eq!(parse_eviction("comet:3:devices:x|77:1:5:2"), None);
    }

    #[test]
    fn a_row_is_an_array_of_strings() {
        let r = Row("42".into(), "u".into(), "ua".into(), "1.2.3.4".into(), "o".into(), "en".into());
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"["42","u","ua","1.2.3.4","o","en"]"#);
        assert_eq!(serde_json::from_str::<Row>(&s).unwrap().user_id(), 42);
    }

    #[test]
    fn the_cache_sums_nodes_and_forgets_a_dead_one() {
        let mut r = Remote::default();
        r.apply(CountsWire { n: 1, v: 1, f: false, c: vec![(0, "web_a".into(), 3), (0, "web_b".into(), 1)] });
        r.apply(CountsWire { n: 2, v: 1, f: false, c: vec![(0, "web_a".into(), 2)] });
        assert_eq!((r.total(0, "web_a"), r.total(0, "web_b"), r.total(1, "web_a")), (5, 1, 0));
        r.apply(CountsWire { n: 1, v: 2, f: false, c: vec![(0, "web_a".into(), 0)] });
        assert_eq!(r.total(0, "web_a"), 2);
        // A full list drops what it does not name.
        r.apply(CountsWire { n: 1, v: 3, f: true, c: vec![(0, "web_c".into(), 4)] });
        assert_eq!((r.total(0, "web_b"), r.total(0, "web_c")), (0, 4));
        r.drop_node(2);
        assert_eq!(r.total(0, "web_a"), 0);
        r.drop_node(1);
        assert!(r.totals.is_empty());
    }

    #[test]
    fn an_older_snapshot_never_undoes_a_newer_message() {
        let mut r = Remote::default();
        r.apply(CountsWire { n: 1, v: 5, f: false, c: vec![(0, "web_a".into(), 7)] });
        // Read at flush 4: web_a then had 2, web_b 1, and web_c is gone.
        r.snapshot(1, 4, vec![(key(0, "web_a"), 2), (key(0, "web_b"), 1)]);
        assert_eq!((r.total(0, "web_a"), r.total(0, "web_b")), (7, 1));
        // Read at flush 6: web_a gone since.
        r.snapshot(1, 6, vec![(key(0, "web_b"), 1)]);
        assert_eq!((r.total(0, "web_a"), r.total(0, "web_b")), (0, 1));
        assert!(r.nodes[&1].complete);
        // Changes alone do not make a node's entry complete.
        r.apply(CountsWire { n: 2, v: 9, f: false, c: vec![(0, "web_a".into(), 1)] });
        assert!(!r.nodes[&2].complete);
    }

    #[test]
    fn counts_travel_as_compact_json() {
        let w = CountsWire { n: 9, v: 2, f: false, c: vec![(0, "web_a".into(), 3)] };
        let s = serde_json::to_string(&w).unwrap();
        assert_eq!(s, r#"{"n":9,"v":2,"f":false,"c":[[0,"web_a",3]]}"#);
        assert_eq!(serde_json::from_str::<CountsWire>(&s).unwrap(), w);
    }
}
