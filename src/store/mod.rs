//! Durable state: the write-behind log of what the shards hold in memory,
//! and the state they start from.
//!
//! Memory stays the source of every read. A shard that changes persisted
//! state (a key, user data, a revoked token, a last-online time, an offline
//! queue entry, a history entry, a channel setting) records a [`Change`];
//! after each handler the changes go as one [`Batch`] to the storage thread
//! ([`writer`]), which owns the engine ([`Backend`]), applies whatever
//! arrived from every shard in one write batch, syncs it once (group
//! commit) and tells each shard how far its batches are done. A shard never
//! touches the disk and never waits for it: a CometQL answer that must be
//! durable waits in the shard's answer queue like a cross-shard gather.
//!
//! [`Backend`] is the small interface an engine implements: apply changes,
//! sync, replay the state at start. [`fjall::FjallStore`] is the embedded
//! one; a networked store (Redis) fits the same three calls.

pub mod fjall;
pub mod qlog;
pub mod writer;

use std::path::PathBuf;
use std::sync::Arc;

use crate::users::Queued;

/// A change to the persisted state. `None` / `false` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `users_auth`.
    Key { dev: u32, uid: u64, key: Option<Box<str>> },
    /// `users_data`.
    Data { dev: u32, uid: u64, data: Option<Box<str>> },
    /// `users_time`: when the user's last device closed.
    LastOnline { dev: u32, uid: u64, time: Option<i64> },
    /// `revoked_tokens`.
    Revoked { dev: u32, token: Box<str>, on: bool },
    /// An offline queue entry, at position `seq` of the user's queue.
    /// Loaded from the store, `msg` carries the write group that holds it
    /// as its tag ([`Queued::tag`]).
    QueuePut { dev: u32, uid: u64, seq: u64, msg: Queued },
    /// An offline queue entry delivered, expired, dropped or deleted:
    /// `tag` is the entry's ([`Queued::tag`]: the write group it was
    /// written in) and `bytes` its size in that group's record
    /// ([`qlog::entry_len`]), so the storage thread counts the record down
    /// without looking the entry up.
    QueueDel { dev: u32, uid: u64, seq: u64, tag: u64, bytes: u32 },
    /// A channel history entry.
    HistoryPut { dev: u32, channel: Arc<str>, entry: HistoryRecord },
    /// A history entry trimmed or deleted.
    HistoryDel { dev: u32, channel: Arc<str>, id: u64 },
    /// `pipes_settings`: the channel's history length.
    Setting { dev: u32, channel: Arc<str>, len: Option<u32> },
}

/// A history entry as stored (the shard's `history::Entry` without the
/// layering dependency).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRecord {
    pub id: u64,
    pub time: i64,
    pub event: String,
    pub message: String,
    pub user_id: Option<u64>,
}

impl Change {
    /// Bytes this change holds, for the bound on the lane to the storage
    /// thread.
    pub fn weight(&self) -> usize {
        48 + match self {
            Change::Key { key: t, .. } | Change::Data { data: t, .. } => t.as_ref().map_or(0, |t| t.len()),
            Change::Revoked { token, .. } => token.len(),
            Change::QueuePut { msg, .. } => msg.event().len() + msg.message().len(),
            Change::HistoryPut { channel, entry, .. } => channel.len() + entry.event.len() + entry.message.len(),
            Change::HistoryDel { channel, .. } | Change::Setting { channel, .. } => channel.len(),
            Change::LastOnline { .. } | Change::QueueDel { .. } => 0,
        }
    }
}

/// Why the store failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use the data dir {path}: {cause}")]
    Dir { path: PathBuf, cause: String },
    #[error("the data dir {path} is in use by another comet (lock {lock} held); stop it or choose another --data-dir")]
    Locked { path: PathBuf, lock: PathBuf },
    #[error(
        "the data dir {path} was written by a newer comet (store format {found}, this comet reads up to {supported}); run the newer comet or choose another --data-dir"
    )]
    NewerFormat { path: PathBuf, found: u32, supported: u32 },
    #[error("the data dir {path} holds an unreadable record (key {key}): {cause}")]
    Corrupt { path: PathBuf, key: String, cause: String },
    /// A write or sync failed (a full disk, an I/O error).
    #[error("{0}")]
    Write(String),
}

/// The small interface a storage engine implements. Called from the storage
/// thread only (and from the main thread at start).
pub trait Backend: Send {
    /// Applies changes in order, atomically if the engine can; not yet
    /// synced. `group` numbers this write group: it grows with every
    /// group (gaps allowed), starting at [`Backend::next_group`], and is
    /// what the shards tagged the queue entries of `changes` with.
    fn apply(&mut self, group: u64, changes: &[Change]) -> Result<(), StoreError>;
    /// Makes everything applied so far durable.
    fn sync(&mut self) -> Result<(), StoreError>;
    /// Replays the whole persisted state as puts.
    fn load(&mut self, sink: &mut dyn FnMut(Change)) -> Result<(), StoreError>;
    /// Bytes the store takes on disk (for metrics and benches).
    fn disk_size(&self) -> u64;
    /// The first write group number after [`Backend::load`]: above every
    /// group the loaded entries are tagged with.
    fn next_group(&self) -> u64 {
        1
    }
}

/// What a shard sends to the storage thread after a handler: its changes,
/// numbered in order.
#[derive(Debug)]
pub struct Batch {
    pub seq: u64,
    pub changes: Vec<Change>,
    pub weight: usize,
}
