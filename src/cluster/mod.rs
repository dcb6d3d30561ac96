//! The Redis bridge: several comet nodes as one service (`--redis`).
//!
//! Redis is the broker between nodes. A channel publish on any node is
//! delivered locally by the node that got it (as without `--redis`) and sent
//! once to Redis as one `PUBLISH` on the channel's Redis channel
//! ([`redis_channel`]), tagged with the node's random id; every other node
//! that has local subscribers of the channel receives it from Redis and
//! delivers it to them; the publishing node drops its own copy by the tag.
//!
//! A node `SUBSCRIBE`s to a channel's Redis channel exactly while one of its
//! shards has a local subscriber of it (a count per channel over the
//! shards), so it receives traffic only for channels it serves.
//!
//! Private messages travel the same way on one Redis channel per user
//! ([`user_channel`]), subscribed while the node holds a device of the
//! user; a message for a user with no device on the sending node goes
//! through `PUBLISH_OR_QUEUE`, which queues it in Redis when no node
//! holds one, and a node takes the queue (`DRAIN`) once its subscription
//! to the user's channel is acknowledged. Online/offline is a Redis hash per
//! user of the nodes holding its devices (`ATTACH`, `DETACH`), kept
//! fresh by each node's `HEARTBEAT` and `REFRESH`, which also sweep the
//! nodes that died. Subscriber counts, `users_in_pipes` rows and the
//! cluster-wide device cap are [`presence`]'s. docs/cluster.md is the
//! user's view of all this.
//!
//! Shards never touch Redis and never wait for it. Two threads do, each
//! with its own connection from the maintained `redis` crate's blocking
//! client (no async runtime in the process):
//! - the *publisher* takes what the shards queued ([`Bridge::publish`] and
//!   the others), sends it as one pipeline per wake-up (one `PUBLISH` or
//!   one script call each), pings Redis every second while idle, and runs
//!   the presence heartbeat every 5 seconds;
//! - the *subscriber* keeps the node's subscriptions equal to what the
//!   shards want and hands each message from another node to every shard's
//!   lane ([`Bridge::take`]), ringing the shard's doorbell like the mail
//!   between shards does (a user's private messages go to the user's home
//!   shard only); the shard delivers them in its mailbox turn.
//!
//! Both reconnect with exponential backoff (100 ms to 5 s) and ±50 %
//! jitter, and the subscriber resubscribes everything after a reconnect.
//! While either is disconnected the node is *down* ([`RedisHealth`]):
//! `/info` answers 503 with the reason, `comet_redis_up` is 0, and
//! publishes are refused with a clear error instead of being dropped.
//!
//! Bounds: what waits for the publisher is bounded by `--mail-limit` bytes
//! (past it the shards stop reading their clients, as for the storage
//! lane); each shard's lane from the subscriber too (past it the subscriber
//! stops reading Redis until the shard drained; Redis then buffers, up to
//! its `client-output-buffer-limit pubsub`, and disconnects the node past
//! that: the node reconnects and resubscribes, and the messages Redis
//! dropped are lost).
//!
//! Keys, user data, revoked tokens, last-online times, settings and history
//! are shared through Redis too ([`state`]): the storage thread writes them
//! there instead of a data dir, and the subscriber applies other nodes'
//! changes to the shards' memory.

pub mod state;

pub mod presence;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::frontend::message::ChannelMessage;
use crate::mailbox::Doorbell;
use crate::metrics::RedisHealth;
use crate::shard::mail::Publication;
use crate::users::{QUEUED_FRAME_OVERHEAD, QueueCap};

/// How long the subscriber waits for a message before it re-checks the
/// subscriptions the shards want: the delay before a new channel's
/// messages from other nodes arrive.
const SUBSCRIBE_POLL: Duration = Duration::from_millis(10);
/// How often an idle publisher checks that Redis answers.
const PING_EVERY: Duration = Duration::from_secs(1);
/// How long a connect or a command may take before Redis counts as down.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// First and longest wait between reconnect attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The Redis channel a comet channel's messages travel on.
pub fn redis_channel(dev_id: u32, pipe: &str) -> String {
    format!("comet:{dev_id}:pipe:{pipe}")
}

/// The Redis channel a user's private messages travel on; a node
/// subscribes it while it holds a device of the user.
pub fn user_channel(dev_id: u32, user_id: u64) -> String {
    format!("comet:{dev_id}:user:{user_id}")
}

/// The Redis list holding a user's offline queue in a cluster.
pub fn queue_key(dev_id: u32, user_id: u64) -> String {
    format!("comet:{dev_id}:queue:{user_id}")
}

/// How a private message for a user with no device on this node is queued
/// in Redis when no node holds one either.
#[derive(Debug, Clone, Copy)]
pub struct RedisQueue {
    /// `--offline-queue-size` and half of `--outbound-limit`.
    pub cap: QueueCap,
    /// `--offline-queue-ttl`, seconds.
    pub ttl: u64,
    /// When the message was queued first (unix seconds).
    pub at: i64,
}

/// The (dev_id, user id) of a [`user_channel`] name.
fn parse_user_channel(channel: &str) -> Option<(u32, u64)> {
    let rest = channel.strip_prefix("comet:")?;
    let (dev, rest) = rest.split_once(':')?;
    let uid = rest.strip_prefix("user:")?;
    Some((dev.parse().ok()?, uid.parse().ok()?))
}

/// Publishes a private message for a user no device of which is on this
/// node, and queues it in Redis when no node subscribes the user's channel
/// (holds a device of the user), in one atomic step: a node that
/// subscribes after it drains the queue (see [`DRAIN`]), so the message is
/// delivered or queued, once.
///
/// The queue keeps at most `--offline-queue-size` entries and, as a
/// single node's, at most half of `--outbound-limit` of bytes, each entry
/// counted as its length plus [`QUEUED_FRAME_OVERHEAD`]: the counter of
/// those bytes lives beside the list (`<queue>:bytes`, same TTL; set anew
/// by the first entry of a list, so a counter left by a list that went
/// another way is not carried over), and the oldest entries go first. An
/// entry larger than the whole bound is not queued (the others stay).
/// Returns the receivers when published, else minus the entries dropped
/// (0 when none was).
///
/// KEYS: user channel, queue, its byte counter; ARGV: message, queue
/// entry, queue size, queue TTL in seconds, queue bytes, overhead per
/// entry.
const PUBLISH_OR_QUEUE: &str = "local n = redis.call('PUBLISH', KEYS[1], ARGV[1]) \
if n > 0 then return n end \
local cap, most, over = tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[6]) \
local cost = #ARGV[2] + over \
if cost > most then return -1 end \
local len = redis.call('RPUSH', KEYS[2], ARGV[2]) \
local bytes = cost \
if len == 1 then redis.call('SET', KEYS[3], cost) else bytes = redis.call('INCRBY', KEYS[3], cost) end \
local dropped = 0 \
while len > 1 and (len > cap or bytes > most) do \
  local old = redis.call('LPOP', KEYS[2]) \
  bytes = redis.call('DECRBY', KEYS[3], #old + over) \
  len = len - 1 \
  dropped = dropped + 1 \
end \
if bytes < 0 then redis.call('SET', KEYS[3], 0) end \
redis.call('EXPIRE', KEYS[2], ARGV[4]) \
redis.call('EXPIRE', KEYS[3], ARGV[4]) \
return -dropped";

/// How long a node counts as alive, and its devices count for a user,
/// after the node last said so: a node that dies without a word leaves the
/// cluster view within this plus one [`PRESENCE_REFRESH`] (another node's
/// sweep), 25 s.
pub const PRESENCE_TTL_SECS: u64 = 20;
/// How often a node says it is alive, re-registers the users it holds
/// devices of, and sweeps dead nodes.
pub const PRESENCE_REFRESH: Duration = Duration::from_secs(5);

/// The Redis hash of the nodes holding devices of a user: field = node id,
/// value = until when (Redis time, seconds) the entry counts.
pub fn presence_key(dev_id: u32, user_id: u64) -> String {
    format!("comet:{dev_id}:online:{user_id}")
}

// The scripts below also use keys they build from the node id
// (`comet:node:<id>` alive flag, `comet:nodeusers:<id>` the presence
// hashes the node is in, `comet:nodes` every node): a standalone Redis (or
// Valkey) is what they are for, not Redis Cluster.

/// The node has its first device of a user: count it, and announce
/// `online` when no other node counts a device of the user. Atomic, so of
/// two nodes attaching at once exactly one announces. KEYS: presence
/// hash, status channel; ARGV: node id, TTL, the `online` message.
const ATTACH: &str = "local now = tonumber(redis.call('TIME')[1]) \
local others = 0 \
local all = redis.call('HGETALL', KEYS[1]) \
for i = 1, #all, 2 do \
  if tonumber(all[i + 1]) <= now then redis.call('HDEL', KEYS[1], all[i]) \
  elseif all[i] ~= ARGV[1] then others = others + 1 end \
end \
redis.call('HSET', KEYS[1], ARGV[1], now + tonumber(ARGV[2])) \
redis.call('EXPIRE', KEYS[1], 2 * tonumber(ARGV[2])) \
redis.call('SADD', 'comet:nodeusers:' .. ARGV[1], KEYS[1]) \
if others == 0 then redis.call('PUBLISH', KEYS[2], ARGV[3]) end \
return others";

/// The node's last device of a user closed: uncount it, and announce
/// `offline` when no other node counts one. KEYS and ARGV as [`ATTACH`].
const DETACH: &str = "local now = tonumber(redis.call('TIME')[1]) \
redis.call('HDEL', KEYS[1], ARGV[1]) \
redis.call('SREM', 'comet:nodeusers:' .. ARGV[1], KEYS[1]) \
local others = 0 \
local all = redis.call('HGETALL', KEYS[1]) \
for i = 1, #all, 2 do \
  if tonumber(all[i + 1]) <= now then redis.call('HDEL', KEYS[1], all[i]) else others = others + 1 end \
end \
if others == 0 then redis.call('PUBLISH', KEYS[2], ARGV[3]) end \
return others";

/// Extends this node's entries (KEYS: presence hashes; ARGV: node, TTL).
const REFRESH: &str = "local now = tonumber(redis.call('TIME')[1]) \
for _, k in ipairs(KEYS) do \
  redis.call('HSET', k, ARGV[1], now + tonumber(ARGV[2])) \
  redis.call('EXPIRE', k, 2 * tonumber(ARGV[2])) \
  redis.call('SADD', 'comet:nodeusers:' .. ARGV[1], k) \
end \
return 0";

/// The node is alive for TTL more seconds; every node whose alive flag
/// expired is swept: its entries leave the users' hashes, and a user no
/// live node counts any more gets `offline` (as [`DETACH`] sends it) and
/// its last-online time ([`state`]).
/// Atomic, so one sweep takes a dead node. ARGV: node id, TTL. Returns the
/// entries swept.
const HEARTBEAT: &str = "local now = tonumber(redis.call('TIME')[1]) \
redis.call('SET', 'comet:node:' .. ARGV[1], '1', 'EX', ARGV[2]) \
redis.call('SADD', 'comet:nodes', ARGV[1]) \
local swept = 0 \
for _, node in ipairs(redis.call('SMEMBERS', 'comet:nodes')) do \
  if redis.call('EXISTS', 'comet:node:' .. node) == 0 then \
    local set = 'comet:nodeusers:' .. node \
    for _, key in ipairs(redis.call('SMEMBERS', set)) do \
      redis.call('HDEL', key, node) \
      local others = 0 \
      local all = redis.call('HGETALL', key) \
      for i = 1, #all, 2 do \
        if tonumber(all[i + 1]) > now then others = others + 1 end \
      end \
      local dev, uid = string.match(key, '^comet:(%d+):online:(%d+)$') \
      if others == 0 and dev then \
        local pipe = 'user_status_' .. uid \
        redis.call('PUBLISH', 'comet:' .. dev .. ':pipe:' .. pipe, \
          cjson.encode({n = 0, d = tonumber(dev), p = pipe, e = 'offline', m = 'offline'})) \
        redis.call('HSET', 'comet:' .. dev .. ':time', uid, now) \
        redis.call('PUBLISH', 'comet:state', '{\"n\":0,\"c\":[{\"k\":\"Time\",\"d\":' .. dev .. \
          ',\"u\":' .. uid .. ',\"t\":' .. now .. '}]}') \
      end \
      swept = swept + 1 \
    end \
    redis.call('DEL', set) \
    redis.call('SREM', 'comet:nodes', node) \
  end \
end \
return swept";

/// Takes a user's whole queue (KEYS: the queue; its byte counter goes too).
const DRAIN: &str =
    "local v = redis.call('LRANGE', KEYS[1], 0, -1) redis.call('DEL', KEYS[1], KEYS[1] .. ':bytes') return v";

/// A private message as it travels through Redis (JSON), on the user's
/// channel or in the user's queue (where `n` is unused).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PrivateWire {
    pub n: u64,
    pub e: String,
    pub m: String,
    /// When it was queued (unix seconds); `None` for a live message.
    #[serde(default)]
    pub t: Option<i64>,
}

/// A private message for the devices of a user homed on a shard.
#[derive(Debug)]
pub struct PrivateMsg {
    pub event: String,
    pub text: String,
    /// Set for a message from the offline queue: when it was queued.
    pub queued_at: Option<i64>,
}

/// What the bridge hands a shard.
#[derive(Debug)]
pub enum Inbound {
    /// A channel message another node published.
    Channel(Arc<Publication>),
    /// Private messages for a user homed on the shard: live from another
    /// node, or the user's offline queue taken from Redis.
    Private { dev_id: u32, user_id: u64, msgs: Vec<PrivateMsg> },
    /// Another node changed state this shard holds ([`state`]).
    State(Vec<crate::store::Change>),
    /// The whole state this shard holds, as Redis has it: replaces the
    /// shard's copy (after a (re)connect).
    Reload(Vec<crate::store::Change>),
    /// Redis has no state: write what the shard holds.
    Reseed,
    /// The answer to a [`state::QueueRead`] of this shard.
    Queues(state::QueueAnswer),
    /// The other nodes' `users_in_pipes` rows for gather `req`
    /// ([`Bridge::ask_rows`]).
    Rows { req: u64, rows: presence::RemoteRows },
    /// Close a device of a user homed on the shard: the cluster-wide
    /// device cap evicted it (4009).
    Evict { dev_id: u32, user_id: u64, conn: crate::domain::ConnId },
}

impl Inbound {
    fn weight(&self) -> usize {
        match self {
            Inbound::Channel(p) => weight(p),
            Inbound::Private { msgs, .. } => msgs.iter().map(|m| 64 + m.event.len() + m.text.len()).sum(),
            Inbound::State(c) | Inbound::Reload(c) => c.iter().map(crate::store::Change::weight).sum(),
            Inbound::Reseed => 64,
            Inbound::Queues(a) => a.weight(),
            Inbound::Rows { rows, .. } => rows.as_ref().map_or_else(String::len, |r| {
                r.iter().map(|(c, r)| 96 + c.len() + r.1.len() + r.2.len() + r.3.len() + r.4.len() + r.5.len()).sum()
            }),
            Inbound::Evict { .. } => 64,
        }
    }
}

/// What waits for the publisher.
#[derive(Debug)]
enum Out {
    Publish {
        channel: String,
        payload: Vec<u8>,
    },
    /// [`PUBLISH_OR_QUEUE`].
    PrivateOrQueue {
        channel: String,
        queue: String,
        payload: Vec<u8>,
        entry: Vec<u8>,
        cap: QueueCap,
        ttl: u64,
    },
    /// [`DRAIN`], then hand the messages to the user's home shard.
    Drain {
        dev_id: u32,
        user_id: u64,
    },
    /// Read (or, with `delete`, take) users' offline queues for a
    /// `users_messages` statement waiting on shard `shard` ([`state`]).
    Queues(state::QueueRead),
    /// [`ATTACH`] (`online`) or [`DETACH`].
    Presence {
        dev_id: u32,
        user_id: u64,
        online: bool,
        payload: Vec<u8>,
    },
}

impl Out {
    fn weight(&self) -> usize {
        64 + match self {
            Out::Publish { channel, payload } => channel.len() + payload.len(),
            Out::PrivateOrQueue { channel, queue, payload, entry, .. } => {
                channel.len() + queue.len() + payload.len() + entry.len()
            }
            Out::Drain { .. } => 0,
            Out::Queues(q) => 8 * q.user_ids.len(),
            Out::Presence { payload, .. } => payload.len(),
        }
    }
}

/// A publish as it travels through Redis (JSON).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Wire {
    /// The publishing node's id: it drops its own messages.
    pub n: u64,
    pub d: u32,
    pub p: String,
    pub e: String,
    pub m: String,
    /// `m` is raw JSON (presence events).
    #[serde(default)]
    pub j: bool,
    #[serde(default)]
    pub t: Option<i64>,
    #[serde(default)]
    pub u: Option<u64>,
}

impl Wire {
    fn of(node: u64, p: &Publication) -> Wire {
        let m = &p.msg;
        Wire {
            n: node,
            d: p.dev_id,
            p: m.pipe.clone(),
            e: m.event.clone(),
            m: m.data.clone(),
            j: m.data_is_json,
            t: m.time,
            u: m.user_id,
        }
    }

    /// The message from another node, if it is one, well formed, and came
    /// on the Redis channel it names.
    pub fn decode(node: u64, channel: &str, payload: &[u8]) -> Result<Option<Wire>, String> {
        let w: Wire = serde_json::from_slice(payload).map_err(|e| format!("undecodable message on {channel}: {e}"))?;
        if w.n == node {
            return Ok(None);
        }
        if redis_channel(w.d, &w.p) != channel {
            return Err(format!("a message for channel {} of dev_id {} came on {channel}", w.p, w.d));
        }
        if w.j && serde_json::from_str::<serde::de::IgnoredAny>(&w.m).is_err() {
            return Err(format!("a presence message on {channel} holds invalid JSON"));
        }
        Ok(Some(w))
    }

    fn into_publication(self) -> Publication {
        let msg = ChannelMessage {
            pipe: self.p,
            event: self.e,
            data: self.m,
            data_is_json: self.j,
            time: self.t,
            user_id: self.u,
        };
        let mut p = Publication::new(self.d, msg, None);
        // The channel's history is kept by the node that got the publish.
        p.store = false;
        p
    }
}

/// One shard's lane from the subscriber thread.
#[derive(Debug)]
struct Lane {
    inbound: Mutex<Vec<Inbound>>,
    bytes: AtomicUsize,
    bell: Arc<Doorbell>,
}

/// The subscriptions the shards want: a count of shards per Redis channel.
#[derive(Debug, Default)]
struct Wanted {
    channels: HashMap<String, u32>,
    /// Bumped on every change, so the subscriber diffs only when needed.
    generation: u64,
}

/// What the shards and the two Redis threads share.
#[derive(Debug)]
pub struct Bridge {
    /// This node's id, random per start.
    pub node: u64,
    client: redis::Client,
    /// `host:port/db` for messages (never the password).
    pub address: String,
    pub health: Arc<RedisHealth>,
    /// What waits for the publisher, in order.
    out: Mutex<VecDeque<Out>>,
    out_bytes: AtomicUsize,
    /// A shard stopped reading its clients because `out` is full: poke
    /// every shard once it drained.
    out_waiting: AtomicBool,
    limit: usize,
    publisher: OnceLock<std::thread::Thread>,
    wanted: Mutex<Wanted>,
    wanted_generation: AtomicU64,
    lanes: Vec<Lane>,
    /// The publisher and subscriber connections are up.
    pub_up: AtomicBool,
    sub_up: AtomicBool,
    /// Bumped by the subscriber when its connection breaks: the publisher's
    /// connection to the same Redis is then most likely broken too (a Redis
    /// restart), and an idle one would only find out at its next ping, or by
    /// losing the next publish; so it reconnects at once.
    breaks: AtomicU64,
    stop: AtomicBool,
    /// Cluster-wide counts, rows and the device cap (presence.rs).
    presence: presence::Presence,
}

/// Why `--redis` was refused.
#[derive(Debug, thiserror::Error)]
#[error("--redis {url}: {cause}")]
pub struct UrlError {
    pub url: String,
    pub cause: String,
}

/// Checks a `--redis` URL; returns the client and the address to show.
pub fn parse_url(url: &str) -> Result<(redis::Client, String), UrlError> {
    let err = |cause: String| UrlError { url: hide_password(url), cause };
    if !url.starts_with("redis://") {
        return Err(err("expected redis://[user:password@]host:port[/db]".into()));
    }
    let client = redis::Client::open(url).map_err(|e| err(e.to_string()))?;
    let info = client.get_connection_info();
    let address = format!("{}/{}", info.addr(), info.redis_settings().db());
    Ok((client, address))
}

/// The URL with its password replaced, for messages.
pub fn hide_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

impl Bridge {
    /// A bridge for shards ringing `bells`; `limit` bounds each queue in
    /// bytes (`--mail-limit`).
    pub fn new(
        url: &str,
        bells: &[Arc<Doorbell>],
        limit: usize,
        health: Arc<RedisHealth>,
    ) -> Result<Arc<Bridge>, UrlError> {
        let (client, address) = parse_url(url)?;
        // Never 0: that tag marks messages every node delivers.
        let node = getrandom::u64().unwrap_or_else(|_| std::process::id() as u64 ^ now_nanos()) | 1;
        health.set_reason(format!("connecting to Redis at {address}"));
        let bridge = Arc::new(Bridge {
            node,
            client,
            address,
            health,
            out: Mutex::new(VecDeque::new()),
            out_bytes: AtomicUsize::new(0),
            out_waiting: AtomicBool::new(false),
            limit,
            publisher: OnceLock::new(),
            // The state channel, always.
            wanted: Mutex::new(Wanted {
                channels: HashMap::from([(state::STATE_CHANNEL.to_string(), 1)]),
                generation: 0,
            }),
            wanted_generation: AtomicU64::new(0),
            lanes: bells
                .iter()
                .map(|b| Lane { inbound: Mutex::new(Vec::new()), bytes: AtomicUsize::new(0), bell: b.clone() })
                .collect(),
            pub_up: AtomicBool::new(false),
            sub_up: AtomicBool::new(false),
            breaks: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            presence: presence::Presence::default(),
        });
        // Always: the other nodes' counts, and evictions of this node's devices.
        bridge.want(presence::COUNTS_CHANNEL.to_string());
        bridge.want(presence::node_channel(node));
        Ok(bridge)
    }

    /// Whether publishes can go out now.
    pub fn is_up(&self) -> bool {
        self.health.is_up()
    }

    /// Why the node is not connected to Redis, for error messages.
    pub fn down_reason(&self) -> String {
        self.health.reason()
    }

    /// Sends a publish that started on this node to the other nodes. Never
    /// blocks; the caller checked [`Bridge::is_up`] where it can answer an
    /// error.
    pub fn publish(&self, p: &Publication) {
        let payload = match serde_json::to_vec(&Wire::of(self.node, p)) {
            Ok(v) => v,
            Err(_) => return,
        };
        self.send(Out::Publish { channel: redis_channel(p.dev_id, &p.msg.pipe), payload });
    }

    fn send(&self, out: Out) {
        if !self.is_up() {
            if let Out::Queues(q) = out {
                // On the asking shard's thread: no waiting for its lane.
                let (shard, answer) = state::queue_answer(q, Err(self.down_reason()));
                return push_now(&self.lanes[shard], answer);
            }
            // Statements that need Redis were refused already; what is left
            // (presence and status events) is lost while Redis is down, and
            // counted.
            self.health.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.out_bytes.fetch_add(out.weight(), Ordering::SeqCst);
        self.out.lock().unwrap_or_else(PoisonError::into_inner).push_back(out);
        if let Some(t) = self.publisher.get() {
            t.unpark();
        }
    }

    /// Sends a private message to the user's devices on other nodes. With
    /// `queue` (the user has no device on this node; the offline queue's
    /// size and TTL in seconds), Redis queues it when no node has one.
    pub fn send_private(&self, dev_id: u32, user_id: u64, event: &str, text: &str, queue: Option<RedisQueue>) {
        let wire = |t: Option<i64>| {
            serde_json::to_vec(&PrivateWire { n: self.node, e: event.to_string(), m: text.to_string(), t })
                .unwrap_or_default()
        };
        let channel = user_channel(dev_id, user_id);
        // `--offline-queue-size 0` queues nothing, as on a single node.
        match queue.filter(|q| q.cap.count > 0) {
            None => self.send(Out::Publish { channel, payload: wire(None) }),
            Some(q) => self.send(Out::PrivateOrQueue {
                channel,
                queue: queue_key(dev_id, user_id),
                payload: wire(None),
                entry: wire(Some(q.at)),
                cap: q.cap,
                ttl: q.ttl.max(1),
            }),
        }
    }

    /// Reads (or takes) users' offline queues from Redis for shard
    /// `shard`'s gather `req`; the answer comes back on the shard's lane,
    /// an error one too when Redis is down.
    pub fn read_queues(&self, shard: usize, req: u64, dev_id: u32, user_ids: Vec<u64>, delete: bool) {
        self.send(Out::Queues(state::QueueRead { shard, req, dev_id, user_ids, delete }));
    }

    /// Too much waits for the publisher: the shard stops reading clients.
    pub fn is_congested(&self) -> bool {
        if self.out_bytes.load(Ordering::SeqCst) > self.limit {
            self.out_waiting.store(true, Ordering::SeqCst);
            return true;
        }
        false
    }

    /// A shard has its first local subscriber of a channel.
    pub fn channel_added(&self, dev_id: u32, pipe: &str) {
        self.want(redis_channel(dev_id, pipe));
    }

    /// A shard lost its last local subscriber of a channel.
    pub fn channel_removed(&self, dev_id: u32, pipe: &str) {
        self.unwant(redis_channel(dev_id, pipe));
    }

    /// The node holds its first device of a user (on the user's home
    /// shard): receive the user's private messages, and take the user's
    /// offline queue once subscribed.
    pub fn user_added(&self, dev_id: u32, user_id: u64) {
        self.want(user_channel(dev_id, user_id));
    }

    /// The node's last device of a user closed.
    pub fn user_removed(&self, dev_id: u32, user_id: u64) {
        self.unwant(user_channel(dev_id, user_id));
    }

    /// Counts the node's first device of a user cluster-wide (`online`
    /// true), or uncounts its last one; Redis announces `online` on
    /// `user_status_<id>` for the user's first device anywhere, `offline`
    /// for the last.
    pub fn user_presence(&self, dev_id: u32, user_id: u64, online: bool) {
        let word = if online { "online" } else { "offline" };
        // Tagged with node id 0, which no node has: every node delivers
        // it, this one included.
        let wire = Wire {
            n: 0,
            d: dev_id,
            p: format!("user_status_{user_id}"),
            e: word.into(),
            m: word.into(),
            j: false,
            t: None,
            u: None,
        };
        let payload = serde_json::to_vec(&wire).unwrap_or_default();
        self.send(Out::Presence { dev_id, user_id, online, payload });
    }

    fn want(&self, key: String) {
        let mut w = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        let n = w.channels.entry(key).or_insert(0);
        *n += 1;
        if *n == 1 {
            w.generation += 1;
            self.wanted_generation.store(w.generation, Ordering::SeqCst);
        }
    }

    fn unwant(&self, key: String) {
        let mut w = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = w.channels.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                w.channels.remove(&key);
                w.generation += 1;
                self.wanted_generation.store(w.generation, Ordering::SeqCst);
            }
        }
    }

    /// Redis channels this node is asked to subscribe (for tests and
    /// metrics).
    pub fn wanted_count(&self) -> usize {
        self.wanted.lock().unwrap_or_else(PoisonError::into_inner).channels.len()
    }

    /// What other nodes sent shard `shard`, in arrival order.
    pub fn take(&self, shard: usize) -> Vec<Inbound> {
        let lane = &self.lanes[shard];
        let v = std::mem::take(&mut *lane.inbound.lock().unwrap_or_else(PoisonError::into_inner));
        let w: usize = v.iter().map(Inbound::weight).sum();
        lane.bytes.fetch_sub(w, Ordering::SeqCst);
        v
    }

    /// Ends both threads (at shutdown).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.publisher.get() {
            t.unpark();
        }
    }

    fn set_up(&self, which: &AtomicBool, up: bool, reason: Option<String>) {
        which.store(up, Ordering::SeqCst);
        let all = self.pub_up.load(Ordering::SeqCst) && self.sub_up.load(Ordering::SeqCst);
        if let Some(r) = reason {
            self.health.set_reason(r);
        }
        let was = self.health.is_up();
        self.health.set_up(all);
        if all && !was {
            eprintln!("comet: redis: connected to {} (node id {:016x})", self.address, self.node);
        }
    }

    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let con = self.client.get_connection_with_timeout(IO_TIMEOUT)?;
        con.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(con)
    }
}

fn weight(p: &Publication) -> usize {
    64 + p.frame.len() + p.msg.data.len()
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Reconnect waits: doubling from `BACKOFF_MIN` to `BACKOFF_MAX`, each
/// drawn from 50–150 % of the step so that nodes do not reconnect in step.
#[derive(Debug)]
pub struct Backoff {
    step: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { step: BACKOFF_MIN }
    }
}

impl Backoff {
    /// The next wait.
    pub fn next_wait(&mut self) -> Duration {
        let r = getrandom::u32().unwrap_or_else(|_| now_nanos() as u32) % 1001;
        let wait = self.step.mul_f64(0.5 + r as f64 / 1000.0);
        self.step = (self.step * 2).min(BACKOFF_MAX);
        wait
    }

    pub fn reset(&mut self) {
        self.step = BACKOFF_MIN;
    }
}

/// Sleeps `d`, waking early when the bridge stops. Returns false then.
fn nap(bridge: &Bridge, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if bridge.stop.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
    }
    !bridge.stop.load(Ordering::SeqCst)
}

/// Starts the publisher and the subscriber threads.
pub fn spawn(bridge: &Arc<Bridge>) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let b = bridge.clone();
    let publisher = std::thread::Builder::new().name("comet-redis-pub".into()).spawn(move || publisher(&b))?;
    let _ = bridge.publisher.set(publisher.thread().clone());
    let b = bridge.clone();
    let subscriber = std::thread::Builder::new().name("comet-redis-sub".into()).spawn(move || subscriber(&b))?;
    Ok(vec![publisher, subscriber])
}

fn publisher(bridge: &Bridge) {
    let mut backoff = Backoff::default();
    while !bridge.stop.load(Ordering::SeqCst) {
        let mut con = match bridge.connect() {
            Ok(c) => c,
            Err(e) => {
                bridge.set_up(&bridge.pub_up, false, Some(format!("Redis at {} is unreachable: {e}", bridge.address)));
                presence::fail_asks(bridge, &e.to_string());
                nap(bridge, backoff.next_wait());
                continue;
            }
        };
        let _ = con.set_read_timeout(Some(IO_TIMEOUT));
        if let Err(e) = redis::cmd("PING").query::<String>(&mut con) {
            bridge.set_up(&bridge.pub_up, false, Some(format!("Redis at {} does not answer: {e}", bridge.address)));
            nap(bridge, backoff.next_wait());
            continue;
        }
        backoff.reset();
        let breaks = bridge.breaks.load(Ordering::SeqCst);
        bridge.set_up(&bridge.pub_up, true, None);
        let error = publish_until_error(bridge, &mut con, breaks);
        if let Some(e) = error {
            presence::fail_asks(bridge, &e.to_string());
            eprintln!("comet: redis: publisher lost {}: {e}; reconnecting", bridge.address);
            bridge.set_up(
                &bridge.pub_up,
                false,
                Some(format!("lost the connection to Redis at {}: {e}", bridge.address)),
            );
            nap(bridge, backoff.next_wait());
        }
    }
}

/// Sends queued publishes until the connection fails (its error) or the
/// bridge stops (`None`).
fn publish_until_error(bridge: &Bridge, con: &mut redis::Connection, breaks: u64) -> Option<redis::RedisError> {
    let mut last_ping = Instant::now();
    // At once after a (re)connect: a Redis that restarted empty learns
    // again which users this node holds.
    let mut last_refresh = Instant::now() - PRESENCE_REFRESH;
    loop {
        if bridge.breaks.load(Ordering::SeqCst) != breaks {
            return Some(redis::RedisError::from(std::io::Error::other("the subscriber's connection broke")));
        }
        if let Err(e) = presence::work(bridge, con) {
            return Some(e);
        }
        // Busy or idle: a node that stopped refreshing counts as dead.
        if last_refresh.elapsed() >= PRESENCE_REFRESH {
            if let Err(e) = refresh_presence(bridge, con).and_then(|()| presence::refresh(bridge, con)) {
                return Some(e);
            }
            last_refresh = Instant::now();
        }
        let batch = std::mem::take(&mut *bridge.out.lock().unwrap_or_else(PoisonError::into_inner));
        if batch.is_empty() {
            if bridge.stop.load(Ordering::SeqCst) {
                // Best effort: a node that cannot say goodbye is swept.
                let _ = presence::leave(bridge, con);
                return None;
            }
            if last_ping.elapsed() >= PING_EVERY {
                if let Err(e) = redis::cmd("PING").query::<String>(con) {
                    return Some(e);
                }
                last_ping = Instant::now();
            }
            std::thread::park_timeout(bridge.presence_wait(PING_EVERY));
            continue;
        }
        let bytes: usize = batch.iter().map(Out::weight).sum();
        let mut pipe = redis::pipe();
        for out in &batch {
            match out {
                Out::Publish { channel, payload } => {
                    pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
                }
                Out::PrivateOrQueue { channel, queue, payload, entry, cap, ttl } => {
                    pipe.cmd("EVAL").arg(PUBLISH_OR_QUEUE).arg(3).arg(channel).arg(queue).arg(format!("{queue}:bytes"));
                    pipe.arg(payload).arg(entry).arg(cap.count).arg(*ttl).arg(cap.bytes).arg(QUEUED_FRAME_OVERHEAD);
                }
                Out::Drain { dev_id, user_id } => {
                    pipe.cmd("EVAL").arg(DRAIN).arg(1).arg(queue_key(*dev_id, *user_id));
                }
                Out::Queues(q) => q.add_to(&mut pipe),
                Out::Presence { dev_id, user_id, online, payload } => {
                    let status = redis_channel(*dev_id, &format!("user_status_{user_id}"));
                    pipe.cmd("EVAL").arg(if *online { ATTACH } else { DETACH }).arg(2);
                    pipe.arg(presence_key(*dev_id, *user_id)).arg(status);
                    pipe.arg(bridge.node.to_string()).arg(PRESENCE_TTL_SECS).arg(payload).ignore();
                }
            }
        }
        let result = pipe.query::<Vec<redis::Value>>(con);
        bridge.out_bytes.fetch_sub(bytes, Ordering::SeqCst);
        if bridge.out_waiting.swap(false, Ordering::SeqCst) {
            for l in &bridge.lanes {
                l.bell.poke();
            }
        }
        match result {
            Ok(lists) => {
                let sent = batch.iter().filter(|o| !matches!(o, Out::Drain { .. } | Out::Queues(_))).count();
                bridge.health.published.fetch_add(sent as u64, Ordering::Relaxed);
                // The answers that came back, in the order their commands
                // went: lists of queue entries, and what each queueing
                // script dropped.
                let list = |v: redis::Value| redis::from_redis_value::<Vec<Vec<u8>>>(v).unwrap_or_default();
                let mut lists = lists.into_iter();
                for out in batch {
                    let (dev_id, user_id) = match out {
                        Out::Drain { dev_id, user_id } => (dev_id, user_id),
                        Out::Queues(q) => {
                            let got: Vec<Vec<Vec<u8>>> = lists.by_ref().take(q.user_ids.len()).map(list).collect();
                            state::answer_queues(bridge, q, Ok(got));
                            continue;
                        }
                        Out::PrivateOrQueue { .. } => {
                            if let Some(redis::Value::Int(n)) = lists.next()
                                && n < 0
                            {
                                bridge.health.queue_dropped.fetch_add(n.unsigned_abs(), Ordering::Relaxed);
                            }
                            continue;
                        }
                        Out::Publish { .. } | Out::Presence { .. } => continue,
                    };
                    let Some(entries) = lists.next().map(list) else { break };
                    let msgs: Vec<PrivateMsg> = entries
                        .iter()
                        .filter_map(|e| serde_json::from_slice::<PrivateWire>(e).ok())
                        .map(|w| PrivateMsg { event: w.e, text: w.m, queued_at: Some(w.t.unwrap_or(0)) })
                        .collect();
                    if !msgs.is_empty() {
                        to_shard(bridge, Inbound::Private { dev_id, user_id, msgs });
                    }
                }
            }
            Err(e) => {
                bridge.health.lost.fetch_add(batch.len() as u64, Ordering::Relaxed);
                for out in batch {
                    if let Out::Queues(q) = out {
                        state::answer_queues(bridge, q, Err(format!("Redis at {} failed: {e}", bridge.address)));
                    }
                }
                return Some(e);
            }
        };
        last_ping = Instant::now();
    }
}

/// Says this node is alive, extends its presence entries for every user it
/// holds a device of (500 users per script call), and sweeps the nodes
/// that stopped saying so.
fn refresh_presence(bridge: &Bridge, con: &mut redis::Connection) -> redis::RedisResult<()> {
    let node = bridge.node.to_string();
    let swept: i64 = redis::cmd("EVAL").arg(HEARTBEAT).arg(0).arg(&node).arg(PRESENCE_TTL_SECS).query(con)?;
    if swept > 0 {
        eprintln!("comet: redis: {swept} user(s) of nodes that stopped answering left the cluster view");
    }
    let keys: Vec<String> = {
        let w = bridge.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        w.channels.keys().filter_map(|c| parse_user_channel(c)).map(|(d, u)| presence_key(d, u)).collect()
    };
    for chunk in keys.chunks(500) {
        redis::cmd("EVAL")
            .arg(REFRESH)
            .arg(chunk.len())
            .arg(chunk)
            .arg(&node)
            .arg(PRESENCE_TTL_SECS)
            .query::<i64>(con)?;
    }
    Ok(())
}

fn subscriber(bridge: &Bridge) {
    let mut backoff = Backoff::default();
    while !bridge.stop.load(Ordering::SeqCst) {
        let mut con = match bridge.connect() {
            Ok(c) => c,
            Err(e) => {
                bridge.set_up(&bridge.sub_up, false, Some(format!("Redis at {} is unreachable: {e}", bridge.address)));
                nap(bridge, backoff.next_wait());
                continue;
            }
        };
        let error = subscribe_until_error(bridge, &mut con, &mut backoff);
        if let Some(e) = error {
            bridge.breaks.fetch_add(1, Ordering::SeqCst);
            bridge.presence_lost();
            if let Some(t) = bridge.publisher.get() {
                t.unpark();
            }
            eprintln!("comet: redis: subscriber lost {}: {e}; reconnecting", bridge.address);
            bridge.set_up(
                &bridge.sub_up,
                false,
                Some(format!("lost the connection to Redis at {}: {e}", bridge.address)),
            );
            nap(bridge, backoff.next_wait());
        }
    }
}

/// Keeps the subscriptions and hands messages to the shards until the
/// connection fails (its error) or the bridge stops (`None`).
fn subscribe_until_error(
    bridge: &Bridge,
    con: &mut redis::Connection,
    backoff: &mut Backoff,
) -> Option<redis::RedisError> {
    let mut ps = con.as_pubsub();
    // A node with nothing subscribed still proves the connection works.
    if let Err(e) = patient(&mut ps, |ps| ps.ping::<String>()) {
        return Some(e);
    }
    // Other nodes' state changes from now on, then the state as it is:
    // nothing falls between the two.
    if let Err(e) = patient(&mut ps, |ps| ps.subscribe(state::STATE_CHANNEL)) {
        return Some(e);
    }
    if let Err(e) = state::resync(bridge) {
        return Some(e);
    }
    let mut current: HashSet<String> = HashSet::from([state::STATE_CHANNEL.to_string()]);
    let mut seen_generation = u64::MAX;
    backoff.reset();
    bridge.set_up(&bridge.sub_up, true, None);
    let mut last_ping = Instant::now();
    loop {
        if bridge.stop.load(Ordering::SeqCst) {
            return None;
        }
        let generation = bridge.wanted_generation.load(Ordering::SeqCst);
        if generation != seen_generation {
            let want: HashSet<String> =
                bridge.wanted.lock().unwrap_or_else(PoisonError::into_inner).channels.keys().cloned().collect();
            let add: Vec<&String> = want.difference(&current).collect();
            let drop: Vec<&String> = current.difference(&want).collect();
            if !add.is_empty()
                && let Err(e) = patient(&mut ps, |ps| ps.subscribe(&add))
            {
                return Some(e);
            }
            // Subscribed (Redis answered): a private message sent from now
            // on reaches this node, so what was queued before is taken now.
            for (dev_id, user_id) in add.iter().filter_map(|c| parse_user_channel(c)) {
                bridge.send(Out::Drain { dev_id, user_id });
            }
            if add.iter().any(|c| *c == presence::COUNTS_CHANNEL) {
                bridge.presence_subscribed();
            }
            if !drop.is_empty()
                && let Err(e) = patient(&mut ps, |ps| ps.unsubscribe(&drop))
            {
                return Some(e);
            }
            current = want;
            seen_generation = generation;
        }
        match ps.get_message() {
            Ok(msg) => {
                last_ping = Instant::now();
                deliver(bridge, msg.get_channel_name(), msg.get_payload_bytes());
            }
            Err(e) if e.is_timeout() => {
                if last_ping.elapsed() >= PING_EVERY {
                    // Subscribed, Redis answers a PING with ["pong", ""].
                    if let Err(e) = patient(&mut ps, |ps| ps.ping::<redis::Value>()) {
                        return Some(e);
                    }
                    last_ping = Instant::now();
                }
            }
            Err(e) => return Some(e),
        }
    }
}

/// Runs a command on the subscriber's connection with the command timeout
/// instead of the short poll it waits for messages with (a Redis that takes
/// more than the poll to answer is slow, not gone).
fn patient<T>(
    ps: &mut redis::PubSub<'_>,
    f: impl FnOnce(&mut redis::PubSub<'_>) -> redis::RedisResult<T>,
) -> redis::RedisResult<T> {
    ps.set_read_timeout(Some(IO_TIMEOUT))?;
    let r = f(ps);
    ps.set_read_timeout(Some(SUBSCRIBE_POLL))?;
    r
}

/// Hands a message from Redis to the shards that need it.
fn deliver(bridge: &Bridge, channel: &str, payload: &[u8]) {
    if channel == state::STATE_CHANNEL {
        state::deliver(bridge, payload);
        return;
    }
    if bridge.presence_deliver(channel, payload) {
        return;
    }
    if let Some((dev_id, user_id)) = parse_user_channel(channel) {
        match serde_json::from_slice::<PrivateWire>(payload) {
            Ok(w) if w.n == bridge.node => {}
            Ok(w) => {
                bridge.health.received.fetch_add(1, Ordering::Relaxed);
                let msgs = vec![PrivateMsg { event: w.e, text: w.m, queued_at: None }];
                to_shard(bridge, Inbound::Private { dev_id, user_id, msgs });
            }
            Err(e) => {
                bridge.health.lost.fetch_add(1, Ordering::Relaxed);
                eprintln!("comet: redis: undecodable message on {}: {e}", crate::domain::clip(channel));
            }
        }
        return;
    }
    let wire = match Wire::decode(bridge.node, channel, payload) {
        Ok(Some(w)) => w,
        Ok(None) => return,
        Err(e) => {
            bridge.health.lost.fetch_add(1, Ordering::Relaxed);
            eprintln!("comet: redis: {}", crate::domain::clip(&e));
            return;
        }
    };
    bridge.health.received.fetch_add(1, Ordering::Relaxed);
    let p = Arc::new(wire.into_publication());
    for lane in &bridge.lanes {
        push(bridge, lane, Inbound::Channel(p.clone()));
    }
}

/// Hands private messages to the user's home shard.
fn to_shard(bridge: &Bridge, msg: Inbound) {
    let Inbound::Private { dev_id, user_id, .. } = &msg else { return };
    let home = crate::shard::home_shard(*dev_id, *user_id, bridge.lanes.len());
    push(bridge, &bridge.lanes[home], msg);
}

fn push(bridge: &Bridge, lane: &Lane, msg: Inbound) {
    // A shard behind by --mail-limit: stop reading Redis until it catches
    // up (Redis buffers meanwhile).
    while lane.bytes.load(Ordering::SeqCst) > bridge.limit && !bridge.stop.load(Ordering::SeqCst) {
        lane.bell.poke();
        std::thread::sleep(Duration::from_millis(1));
    }
    push_now(lane, msg);
}

/// [`push`] without waiting: for a shard answering itself (it would wait
/// for its own lane to drain), past the bound by one small message.
fn push_now(lane: &Lane, msg: Inbound) {
    lane.bytes.fetch_add(msg.weight(), Ordering::SeqCst);
    lane.inbound.lock().unwrap_or_else(PoisonError::into_inner).push(msg);
    lane.bell.poke();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(n: u64) -> Wire {
        Wire { n, d: 3, p: "web_a".into(), e: "ev".into(), m: "hi \"there\"".into(), j: false, t: Some(5), u: None }
    }

    #[test]
    fn a_message_round_trips_and_its_own_node_drops_it() {
        let bytes = serde_json::to_vec(&wire(7)).unwrap();
        let ch = redis_channel(3, "web_a");
        assert_eq!(Wire::decode(8, &ch, &bytes).unwrap(), Some(wire(7)));
        assert_eq!(Wire::decode(7, &ch, &bytes).unwrap(), None);
    }

    #[test]
    fn a_message_on_the_wrong_channel_or_malformed_is_refused() {
        let bytes = serde_json::to_vec(&wire(7)).unwrap();
        assert!(Wire::decode(8, &redis_channel(3, "web_b"), &bytes).unwrap_err().contains("web_a"));
        assert!(Wire::decode(8, "x", b"{nope").unwrap_err().contains("undecodable"));
        let mut j = wire(7);
        j.j = true;
        j.m = "{not json".into();
        let bytes = serde_json::to_vec(&j).unwrap();
        assert!(Wire::decode(8, &redis_channel(3, "web_a"), &bytes).unwrap_err().contains("invalid JSON"));
    }

    #[test]
    fn user_channels_parse_back() {
        assert_eq!(parse_user_channel(&user_channel(4, 99)), Some((4, 99)));
        assert_eq!(parse_user_channel(&redis_channel(4, "user:99")), None);
        assert_eq!(parse_user_channel("comet:x:user:1"), None);
    }

    #[test]
    fn urls_are_checked_and_passwords_never_shown() {
        let (_, addr) = parse_url("redis://user:secret@127.0.0.1:6390/2").unwrap();
        assert_eq!(addr, "127.0.0.1:6390/2");
        let e = parse_url("http://user:secret@h:1").unwrap_err().to_string();
        assert!(!e.contains("secret") && e.contains("redis://"), "{e}");
        assert_eq!(hide_password("redis://u:p@h:1/0"), "redis://***@h:1/0");
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter() {
        let mut b = Backoff::default();
        let first = b.next_wait();
        assert!(first >= BACKOFF_MIN / 2 && first <= BACKOFF_MIN * 3 / 2, "{first:?}");
        for _ in 0..20 {
            let d = b.next_wait();
            assert!(d <= BACKOFF_MAX * 3 / 2, "{d:?}");
        }
        assert!(b.next_wait() >= BACKOFF_MAX / 2);
        b.reset();
        assert!(b.next_wait() <= BACKOFF_MIN * 3 / 2);
    }
}
