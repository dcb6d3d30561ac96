//! The shard's side of cluster-wide presence (`--redis`,
//! `crate::cluster::presence`): it reports subscriptions and devices to the
//! bridge, adds the other nodes' cached counts to the ones it gathers, puts
//! the other nodes' rows into its gathers, and closes the devices the
//! cluster-wide cap evicts. Without `--redis` every hook here does nothing.

use std::sync::Arc;

use super::ConnId;
use super::conn::Phase;
use super::core::{Pending, ShardCore, Then};
use super::mail::{Query, Records};
use crate::cluster::presence::{RemoteRows, Row};
use crate::cometql::rows::Subscriber;

impl ShardCore {
    /// Connection `id` joined channel index `ch`: its `users_in_pipes` row
    /// goes to the other nodes.
    pub(super) fn cluster_joined(&self, id: ConnId, ch: u32) {
        let (Some(c), Some(conn), Some(channel)) =
            (&self.cluster, self.conns.get(id), self.channels.get(ch as usize).and_then(Option::as_ref))
        else {
            return;
        };
        let row = || {
            let info = &conn.info;
            Row(
                conn.user_id.to_string(),
                info.uuid().to_string(),
                info.user_agent().to_string(),
                info.forwarded_ip().map_or_else(|| conn.peer.ip().to_string(), str::to_string),
                info.origin().to_string(),
                info.language().to_string(),
            )
        };
        c.channel_joined(channel.dev_id, &channel.name, self.id, id, row);
    }

    /// Connection `id` is about to leave channel index `ch`.
    pub(super) fn cluster_left(&self, id: ConnId, ch: u32) {
        let (Some(c), Some(conn), Some(channel)) =
            (&self.cluster, self.conns.get(id), self.channels.get(ch as usize).and_then(Option::as_ref))
        else {
            return;
        };
        if conn.subs.iter().any(|&(s, _)| s == ch) {
            c.channel_left(channel.dev_id, &channel.name, self.id, id);
        }
    }

    /// Subscribers of a channel on the other nodes (0 without `--redis`).
    pub(super) fn cluster_count(&self, dev_id: u32, pipe: &str) -> u64 {
        self.cluster.as_ref().map_or(0, |c| c.presence_remote_count(dev_id, pipe))
    }

    /// Subscribers on the other nodes of each channel.
    pub(super) fn cluster_counts(&self, dev_id: u32, pipes: &[String]) -> Vec<u64> {
        match &self.cluster {
            Some(c) => c.presence_remote_counts(dev_id, pipes),
            None => vec![0; pipes.len()],
        }
    }

    /// The channels whose other nodes' rows a question needs, if any; an
    /// error when it needs them and Redis is down.
    pub(super) fn cluster_rows_wanted(&self, query: &Query) -> Option<Result<Vec<Arc<str>>, String>> {
        self.cluster.as_ref()?;
        let pipes = match query {
            Query::Members(ch) => vec![ch.clone()],
            Query::Subscribers(names) => names.clone(),
            _ => return None,
        };
        Some(match self.cluster_down() {
            Some(e) => Err(e),
            None => Ok(pipes),
        })
    }

    /// Asks the bridge for the other nodes' rows of gather `req`.
    pub(super) fn cluster_ask_rows(&self, req: u64, dev_id: u32, pipes: Vec<Arc<str>>) {
        if let Some(c) = &self.cluster {
            c.ask_rows(self.id, req, dev_id, pipes);
        }
    }

    /// The other nodes' rows for gather `req` came back.
    pub(super) fn cluster_rows(&mut self, req: u64, rows: RemoteRows) {
        let Some(p) = self.pending.get_mut(&req) else { return };
        p.remaining -= 1;
        match rows {
            Err(why) => p.remote_failed = Some(why),
            Ok(rows) => merge_rows(p, rows),
        }
        self.maybe_complete(req);
    }

    /// The cluster-wide device cap evicted device `conn` of a user homed
    /// here: it is closed with 4009, as a 17th device on one node does.
    pub(super) fn cluster_evict(&mut self, dev_id: u32, user_id: u64, conn: ConnId) {
        let Some(c) = self.conns.get(conn) else { return };
        if c.dev_id != dev_id || c.user_id != user_id || c.phase != Phase::Comet {
            return;
        }
        self.send_error(conn, "device limit reached: replaced by a newer connection");
        self.close_ws(conn, super::users::CLOSE_REPLACED, "device limit reached");
    }

    /// A device of a user attached on this (home) shard.
    pub(super) fn cluster_device_attached(&self, dev_id: u32, user_id: u64, id: ConnId) {
        if let Some(c) = &self.cluster {
            c.device_attached(dev_id, user_id, self.id, id);
        }
    }

    /// A device of a user detached.
    pub(super) fn cluster_device_detached(&self, dev_id: u32, user_id: u64, id: ConnId) {
        if let Some(c) = &self.cluster {
            c.device_detached(dev_id, user_id, self.id, id);
        }
    }
}

/// Adds the other nodes' rows to a gather, in the shape its question asked.
fn merge_rows(p: &mut Pending, rows: Vec<(Arc<str>, Row)>) {
    match p.then {
        Then::TrackUsers { .. } => p.members.extend(rows.into_iter().map(|(_, r)| (r.user_id(), r.1))),
        _ => {
            let subs = rows
                .into_iter()
                .map(|(channel, r)| Subscriber {
                    channel,
                    user_id: r.user_id(),
                    uuid: r.1,
                    user_agent: Some(r.2),
                    ip: r.3,
                    origin: Some(r.4),
                    language: Some(r.5),
                })
                .collect();
            p.records.append(Records::Subscribers(subs));
        }
    }
}
