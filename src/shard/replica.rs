//! The shard's side of the state shared through Redis (`--redis`,
//! `crate::cluster::state`): other nodes' changes applied to the shard's
//! memory, the whole state loaded again after a (re)connect, and the
//! shard's state written to a Redis that lost it.
//!
//! Changes applied here are not journaled (they are in Redis already);
//! their effect on this node's clients is the one the writing node had on
//! its own: a removed key or a revoked token closes the user's devices
//! here too.

use super::core::{Pending, ShardCore, Then};
use super::mail::Records;
use crate::cluster::state::QueueAnswer;
use crate::cometql::exec::Plan;
use crate::store::Change;
use crate::users::{UserQuery, jwt};

impl ShardCore {
    /// Why a statement that writes shared state is refused now: the
    /// cluster's Redis is down, and the write would reach neither Redis
    /// nor the other nodes. `None` when it may run.
    pub fn cluster_write_refused(&self, plan: &Plan) -> Option<String> {
        let c = self.cluster.as_ref()?;
        let writes = match plan {
            Plan::HistoryDelete { .. } | Plan::SettingsSet(_) | Plan::SettingsDelete(_) => true,
            Plan::User { query, .. } => matches!(
                query,
                UserQuery::AuthSet(_)
                    | UserQuery::AuthDelete(_)
                    | UserQuery::DataSet(_)
                    | UserQuery::DataDelete(_)
                    | UserQuery::Revoke(_)
                    | UserQuery::Unrevoke(_)
            ),
            _ => false,
        };
        (writes && !c.is_up())
            .then(|| format!("the cluster's Redis is down ({}); nothing was written, retry later", c.down_reason()))
    }

    /// Applies changes another node made, in its order.
    pub fn apply_cluster_state(&mut self, changes: Vec<crate::store::Change>) {
        for c in changes {
            self.apply_one(c);
        }
    }

    fn apply_one(&mut self, c: Change) {
        match c {
            Change::Key { dev, uid, key: None } => {
                self.users.apply_remote(Change::Key { dev, uid, key: None });
                let devices = self.users.devices(dev, uid);
                self.deauthorize(&devices, "authorization removed by the backend");
            }
            Change::Revoked { dev, ref token, on: true } => {
                let token = token.clone();
                self.users.apply_remote(c);
                if let Some(uid) = jwt::claimed_user(&token)
                    && jwt::verify(&token, &self.jwt_secret(dev), uid, self.unix).is_ok()
                {
                    let devices = self.users.devices(dev, uid);
                    self.deauthorize(&devices, "token revoked by the backend");
                }
            }
            Change::HistoryPut { dev, ref channel, .. } => {
                let channel = channel.clone();
                self.history.apply_remote(c);
                self.history.cap_remote(dev, &channel);
            }
            Change::HistoryDel { .. } | Change::Setting { .. } => self.history.apply_remote(c),
            c => self.users.apply_remote(c),
        }
    }

    /// Replaces the shard's copy of the shared state with `snapshot`, the
    /// part of Redis's that this shard holds. Devices, subscriptions and
    /// queues stay.
    pub fn reload_cluster_state(&mut self, snapshot: Vec<Change>) {
        self.users.clear_persisted();
        self.history.clear_all();
        for c in snapshot {
            match c {
                Change::HistoryPut { .. } | Change::Setting { .. } => self.history.apply_remote(c),
                c => self.users.apply_remote(c),
            }
        }
    }

    /// Redis has no state (it restarted empty): writes what the shard
    /// holds, as ordinary changes.
    pub fn reseed_cluster_state(&mut self) {
        self.users.journal_all();
        self.history.journal_all();
        self.record_changes();
    }
}

/// Marks a [`Pending`]'s failure as a failed read of the cluster's Redis
/// (not a change that was not stored): `sql_failed` answers it with 503.
pub const READ_FAILED: &str = "\u{0}redis read: ";

impl ShardCore {
    /// The users whose offline queues a `users_messages` SELECT (false) or
    /// DELETE (true) touches, when they live in Redis (`--redis`).
    pub fn cluster_queue_read(&self, q: &UserQuery) -> Option<(Vec<u64>, bool)> {
        self.cluster.as_ref()?;
        match q {
            UserQuery::QueueSelect(ids) => Some((ids.clone(), false)),
            UserQuery::QueueDelete(ids) => Some((ids.clone(), true)),
            _ => None,
        }
    }

    /// Asks the bridge for the queues; `then` runs with them (as the
    /// user's home shard would answer) when Redis answered. Counted
    /// against the connection's `--max-pending` like a gather.
    pub fn ask_cluster_queues(&mut self, dev_id: u32, (user_ids, delete): (Vec<u64>, bool), then: Then) {
        let Some(c) = self.cluster.clone() else { return };
        let req = self.new_request(Pending::new(1, then));
        c.read_queues(self.id, req, dev_id, user_ids, delete);
    }

    /// The bridge's answer to [`ShardCore::ask_cluster_queues`]. Queued
    /// messages past `--offline-queue-ttl` are not shown (Redis expires
    /// the whole list only).
    pub fn cluster_queues_answered(&mut self, a: QueueAnswer) {
        let ttl = self.shared.config.offline_queue_ttl.as_secs() as i64;
        let now = self.unix;
        let Some(p) = self.pending.get_mut(&a.req) else { return };
        p.remaining -= 1;
        match a.queues {
            Ok(queues) if a.delete => p.count += queues.iter().map(|(_, q)| q.len() as u64).sum::<u64>(),
            Ok(queues) => {
                let live: Vec<_> = queues
                    .into_iter()
                    .map(|(u, q)| (u, q.into_iter().filter(|m| m.time.saturating_add(ttl) > now).collect::<Vec<_>>()))
                    .filter(|(_, q)| !q.is_empty())
                    .collect();
                p.records.append(Records::Queues(live));
            }
            Err(e) => p.failed = Some(format!("{READ_FAILED}{e}").into()),
        }
        self.maybe_complete(a.req);
    }
}
