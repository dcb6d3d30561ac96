//! Channel history and settings, kept on each channel's home shard
//! (hash(dev_id, channel) % shards), so every append for a channel happens
//! on one thread in publish order.

use std::collections::VecDeque;
use std::sync::Arc;

use ahash::AHashMap;

use super::mail::weigh;
use crate::cometql::rows::StoredMessage;
use crate::store::{Change, HistoryRecord};

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: u64,
    pub time: i64,
    pub event: String,
    pub message: String,
    /// The browser sender's id; `None` for backend publishes.
    pub user_id: Option<u64>,
}

impl From<Entry> for StoredMessage {
    /// The entry as `pipes_messages` shows it (the CometQL layer has its
    /// own record so that it does not depend on the shard layer).
    fn from(e: Entry) -> StoredMessage {
        StoredMessage { id: e.id, time: e.time, event: e.event, message: e.message, user_id: e.user_id }
    }
}

/// A channel's stored history and configured length.
#[derive(Debug, Default)]
pub struct Stored {
    /// From `pipes_settings`; `None` means the default (100 for `trust_`, else 0).
    pub setting: Option<u32>,
    pub entries: VecDeque<Entry>,
}

/// Default history length of `trust_` channels.
pub const TRUST_DEFAULT: u32 = 100;

/// Slots history ids are spread over between nodes (`--redis`): two nodes
/// give the same id only when they drew the same slot and append to one
/// channel at the same moment. Ids stay below 2^53 (exact in JavaScript)
/// up to 64 shards.
pub const NODE_SLOTS: u64 = 64;

/// The history and settings of the channels homed on one shard.
#[derive(Debug, Default)]
pub struct HistoryStore {
    channels: AHashMap<u32, AHashMap<Arc<str>, Stored>>,
    /// The largest id given or restored: the next is above it.
    last_id: u64,
    /// With `--redis`: this node's slot among [`NODE_SLOTS`], so that two
    /// nodes appending to one channel give different ids (ids then step by
    /// shards x [`NODE_SLOTS`] from the entry's second x 1024 up).
    pub node_slot: Option<u64>,
    /// Changes to persisted state not yet sent to the store; `None` when
    /// nothing is persisted (`--ephemeral`).
    pub journal: Option<Vec<Change>>,
}

impl From<HistoryRecord> for Entry {
    fn from(r: HistoryRecord) -> Entry {
        Entry { id: r.id, time: r.time, event: r.event, message: r.message, user_id: r.user_id }
    }
}

impl From<&Entry> for HistoryRecord {
    fn from(e: &Entry) -> HistoryRecord {
        HistoryRecord { id: e.id, time: e.time, event: e.event.clone(), message: e.message.clone(), user_id: e.user_id }
    }
}

/// Drops entries from the front down to `len`, from the store too.
fn trim(s: &mut Stored, len: usize, dev: u32, name: &Arc<str>, journal: &mut Option<Vec<Change>>) {
    while s.entries.len() > len {
        if let Some(e) = s.entries.pop_front()
            && let Some(j) = journal.as_mut()
        {
            j.push(Change::HistoryDel { dev, channel: name.clone(), id: e.id });
        }
    }
}

/// The smallest id above `last` that is `shard` modulo `shards`: ids are
/// unique across shards and increase on each, also after a restart (with
/// any shard count) restored `last` from the store. Saturates rather than
/// wrapping (2^64 appends are not reached).
fn next_id(last: u64, shard: usize, shards: usize) -> u64 {
    let (shard, shards) = (shard as u64, shards.max(1) as u64);
    (last / shards).saturating_add(1).saturating_mul(shards).saturating_add(shard)
}

impl HistoryStore {
    /// The changes recorded since the last call.
    pub fn take_changes(&mut self) -> Vec<Change> {
        self.journal.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Puts back state read from the store at start (not journaled).
    /// Entries come in key order, which is id order within a channel.
    pub fn restore(&mut self, c: Change) {
        match c {
            Change::HistoryPut { dev, channel, entry } => {
                self.last_id = self.last_id.max(entry.id);
                self.channels.entry(dev).or_default().entry(channel).or_default().entries.push_back(entry.into());
            }
            Change::Setting { dev, channel, len } => {
                self.channels.entry(dev).or_default().entry(channel).or_default().setting = len;
            }
            _ => {}
        }
    }

    /// Applies a change another node made (`--redis`), not journaled:
    /// entries keep id order and an entry already held is not added twice
    /// (a re-seed or a reload may repeat it).
    pub fn apply_remote(&mut self, c: Change) {
        match c {
            Change::HistoryPut { dev, channel, entry } => {
                self.last_id = self.last_id.max(entry.id);
                let s = self.channels.entry(dev).or_default().entry(channel).or_default();
                let at = s.entries.iter().rposition(|e| e.id <= entry.id).map_or(0, |i| i + 1);
                if at > 0 && s.entries[at - 1].id == entry.id {
                    return;
                }
                s.entries.insert(at, entry.into());
            }
            Change::HistoryDel { dev, channel, id } => {
                let Some(m) = self.channels.get_mut(&dev) else { return };
                if let Some(s) = m.get_mut(&channel) {
                    s.entries.retain(|e| e.id != id);
                    if s.entries.is_empty() && s.setting.is_none() {
                        m.remove(&channel);
                    }
                }
            }
            Change::Setting { dev, ref channel, len: None } => {
                if let Some(s) = self.channels.get_mut(&dev).and_then(|m| m.get_mut(channel)) {
                    s.setting = None;
                }
            }
            c @ Change::Setting { .. } => self.restore(c),
            _ => {}
        }
    }

    /// Forgets every channel's history and setting, before they are loaded
    /// again from Redis.
    pub fn clear_all(&mut self) {
        self.channels.clear();
    }

    /// Journals every setting and history entry as puts: to write them to
    /// a store that lost them (an empty Redis).
    pub fn journal_all(&mut self) {
        let Some(j) = self.journal.as_mut() else { return };
        for (&dev, m) in &self.channels {
            for (name, s) in m {
                if let Some(len) = s.setting {
                    j.push(Change::Setting { dev, channel: name.clone(), len: Some(len) });
                }
                for e in &s.entries {
                    j.push(Change::HistoryPut { dev, channel: name.clone(), entry: e.into() });
                }
            }
        }
    }

    /// Trims a channel to its length after another node's append, not
    /// journaled: that node's trim travels as its own change, but Redis
    /// may drop a pub/sub message, and the copy must not grow past the
    /// channel's length for it.
    pub fn cap_remote(&mut self, dev: u32, channel: &Arc<str>) {
        let Some(s) = self.channels.get_mut(&dev).and_then(|m| m.get_mut(channel)) else { return };
        let limit = Self::limit(channel, Some(s)) as usize;
        trim(s, limit, dev, channel, &mut None);
    }

    fn limit(name: &str, s: Option<&Stored>) -> u32 {
        match s.and_then(|s| s.setting) {
            Some(n) => n,
            None if name.starts_with("trust_") => TRUST_DEFAULT,
            None => 0,
        }
    }

    /// Stores a message if the channel keeps history; `id_base`/`stride`
    /// make ids unique across shards.
    pub fn append(&mut self, dev_id: u32, name: &str, mut e: Entry, shard: usize, shards: usize) {
        let existing = self.channels.get(&dev_id).and_then(|m| m.get(name));
        let limit = Self::limit(name, existing) as usize;
        if limit == 0 {
            return;
        }
        e.id = match self.node_slot {
            Some(slot) => {
                // Not below the entry's second (times 1024 appends a
                // second per slot): entries from different nodes keep
                // their order by time, not by which node drew the larger
                // slot.
                let stride = shards * NODE_SLOTS as usize;
                let floor = (e.time.max(0) as u64).saturating_mul(1024 * stride as u64);
                next_id(self.last_id.max(floor), shard + shards * slot as usize, stride)
            }
            None => next_id(self.last_id, shard, shards),
        };
        self.last_id = e.id;
        let m = self.channels.entry(dev_id).or_default();
        let key = match m.get_key_value(name) {
            Some((k, _)) => k.clone(),
            None => Arc::from(name),
        };
        let s = m.entry(key.clone()).or_default();
        if let Some(j) = self.journal.as_mut() {
            j.push(Change::HistoryPut { dev: dev_id, channel: key.clone(), entry: (&e).into() });
        }
        s.entries.push_back(e);
        trim(s, limit, dev_id, &key, &mut self.journal);
    }

    /// The history of a channel, oldest first.
    pub fn entries(&self, dev_id: u32, name: &str) -> Vec<Entry> {
        self.channels
            .get(&dev_id)
            .and_then(|m| m.get(name))
            .map(|s| s.entries.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The first `rows` entries of a channel's history, oldest first, the
    /// first `skip` of them without their texts (placeholders that keep
    /// the others' positions), while their weight (as a gathered reply
    /// counts them: `mail::weigh`) fits in `budget`, which they take from;
    /// `None` when it would not.
    pub fn entries_within(
        &self,
        dev_id: u32,
        name: &str,
        rows: u64,
        skip: u64,
        budget: &mut usize,
    ) -> Option<Vec<Entry>> {
        let Some(s) = self.channels.get(&dev_id).and_then(|m| m.get(name)) else {
            return Some(Vec::new());
        };
        let mut out = Vec::new();
        for (i, e) in s.entries.iter().take(rows.min(usize::MAX as u64) as usize).enumerate() {
            if (i as u64) < skip {
                *budget = budget.checked_sub(weigh::history_entry("", ""))?;
                out.push(Entry { event: String::new(), message: String::new(), ..*e });
                continue;
            }
            *budget = budget.checked_sub(weigh::history_entry(&e.event, &e.message))?;
            out.push(e.clone());
        }
        Some(out)
    }

    /// Clears a channel's history; returns how many entries went.
    pub fn clear(&mut self, dev_id: u32, name: &str) -> u64 {
        let Some(m) = self.channels.get_mut(&dev_id) else { return 0 };
        let Some(key) = m.get_key_value(name).map(|(k, _)| k.clone()) else { return 0 };
        let Some(s) = m.get_mut(name) else { return 0 };
        let n = s.entries.len() as u64;
        trim(s, 0, dev_id, &key, &mut self.journal);
        if s.setting.is_none() {
            m.remove(name);
        }
        n
    }

    /// Removes entries with these ids from the dev_id's channels: from
    /// every channel, or only from the `within` ones (`WHERE name AND id`).
    pub fn remove_ids(&mut self, dev_id: u32, within: Option<&[Arc<str>]>, ids: &[u64]) -> u64 {
        let Some(m) = self.channels.get_mut(&dev_id) else { return 0 };
        let mut n = 0;
        for (key, s) in m.iter_mut() {
            if within.is_some_and(|names| !names.contains(key)) {
                continue;
            }
            let before = s.entries.len();
            s.entries.retain(|e| {
                let keep = !ids.contains(&e.id);
                if !keep && let Some(j) = self.journal.as_mut() {
                    j.push(Change::HistoryDel { dev: dev_id, channel: key.clone(), id: e.id });
                }
                keep
            });
            n += (before - s.entries.len()) as u64;
        }
        n
    }

    /// Sets a channel's history length, trimming what is over it.
    pub fn set_length(&mut self, dev_id: u32, name: &str, len: u32) {
        let m = self.channels.entry(dev_id).or_default();
        let key = match m.get_key_value(name) {
            Some((k, _)) => k.clone(),
            None => Arc::from(name),
        };
        let s = m.entry(key.clone()).or_default();
        s.setting = Some(len);
        if let Some(j) = self.journal.as_mut() {
            j.push(Change::Setting { dev: dev_id, channel: key.clone(), len: Some(len) });
        }
        trim(s, len as usize, dev_id, &key, &mut self.journal);
    }

    /// Removes a channel's setting and history; returns whether it had a setting.
    pub fn remove_setting(&mut self, dev_id: u32, name: &str) -> bool {
        let Some(m) = self.channels.get_mut(&dev_id) else { return false };
        let Some((key, mut s)) = m.remove_entry(name) else { return false };
        trim(&mut s, 0, dev_id, &key, &mut self.journal);
        if s.setting.is_some()
            && let Some(j) = self.journal.as_mut()
        {
            j.push(Change::Setting { dev: dev_id, channel: key, len: None });
        }
        s.setting.is_some()
    }

    /// Channels with settings: (name, length), optionally only `names`.
    pub fn settings(&self, dev_id: u32, names: Option<&[Arc<str>]>) -> Vec<(String, u32)> {
        self.settings_within(dev_id, names, usize::MAX).unwrap_or_default()
    }

    /// [`Self::settings`], if its rows weigh at most `room` bytes
    /// (`mail::weigh::setting`); what they weigh, with nothing built, if
    /// more.
    pub fn settings_within(
        &self,
        dev_id: u32,
        names: Option<&[Arc<str>]>,
        room: usize,
    ) -> Result<Vec<(String, u32)>, usize> {
        let Some(m) = self.channels.get(&dev_id) else { return Ok(Vec::new()) };
        let found =
            || m.iter().filter(|(k, s)| s.setting.is_some() && names.is_none_or(|ns| ns.iter().any(|n| n == *k)));
        let size = found().map(|(k, _)| weigh::setting(k)).sum::<usize>();
        if size > room {
            return Err(size);
        }
        let mut v: Vec<(String, u32)> = found().map(|(k, s)| (k.to_string(), s.setting.unwrap_or(0))).collect();
        v.sort();
        Ok(v)
    }
}

#[cfg(test)]
mod id_tests {
    use super::next_id;

    #[test]
    fn ids_stay_unique_per_shard_and_grow_by_at_most_the_shard_count_across_restarts() {
        // 16 shards, a restart after every append: the restored largest id
        // is where the next starts (it used to be multiplied by 16).
        let mut last = 0;
        for _ in 0..100 {
            let id = next_id(last, 3, 16);
            assert!(id > last && id - last <= 32 && id % 16 == 3, "{last} -> {id}");
            last = id;
        }
        assert!(last < 100 * 16 + 16);
        // Another shard count after a restart still gives a larger id.
        assert!(next_id(last, 1, 2) > last);
        assert_eq!(next_id(u64::MAX - 3, 0, 4), u64::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(msg: &str) -> Entry {
        Entry { id: 0, time: 1, event: "e".into(), message: msg.into(), user_id: None }
    }

    #[test]
    fn history_keeps_the_newest_up_to_the_length() {
        let mut h = HistoryStore::default();
        h.append(0, "web_x", e("ignored"), 0, 1);
        assert!(h.entries(0, "web_x").is_empty(), "no setting, no history");
        h.set_length(0, "web_x", 3);
        for m in ["a", "b", "c", "d"] {
            h.append(0, "web_x", e(m), 0, 1);
        }
        let got: Vec<String> = h.entries(0, "web_x").into_iter().map(|e| e.message).collect();
        assert_eq!(got, ["b", "c", "d"]);
        assert!(h.entries(1, "web_x").is_empty(), "dev_ids are separate");
        h.set_length(0, "web_x", 1);
        assert_eq!(h.entries(0, "web_x").len(), 1);
    }

    #[test]
    fn trust_channels_keep_100_by_default() {
        let mut h = HistoryStore::default();
        for i in 0..150 {
            h.append(0, "trust_t", e(&i.to_string()), 0, 1);
        }
        let got = h.entries(0, "trust_t");
        assert_eq!(got.len(), 100);
        assert_eq!(got[0].message, "50");
    }

    #[test]
    fn ids_are_unique_across_shards_and_removable() {
        let mut a = HistoryStore::default();
        let mut b = HistoryStore::default();
        a.set_length(0, "web_a", 5);
        b.set_length(0, "web_b", 5);
        a.append(0, "web_a", e("x"), 0, 2);
        b.append(0, "web_b", e("y"), 1, 2);
        let (ia, ib) = (a.entries(0, "web_a")[0].id, b.entries(0, "web_b")[0].id);
        assert_ne!(ia, ib);
        assert_eq!(a.remove_ids(0, Some(&["web_b".into()]), &[ia]), 0, "not in that channel");
        assert_eq!(a.remove_ids(0, None, &[ia]), 1);
        assert!(a.entries(0, "web_a").is_empty());
        assert_eq!(a.settings(0, None), vec![("web_a".into(), 5)]);
        assert!(a.remove_setting(0, "web_a"));
        assert!(a.settings(0, None).is_empty());
    }
}

#[cfg(test)]
mod cluster_tests {
    use super::*;

    fn e(time: i64, msg: &str) -> Entry {
        Entry { id: 0, time, event: "e".into(), message: msg.into(), user_id: None }
    }

    #[test]
    fn two_nodes_give_distinct_time_ordered_ids_and_a_replica_keeps_id_order_once() {
        let (mut a, mut b, mut replica) = (HistoryStore::default(), HistoryStore::default(), HistoryStore::default());
        a.node_slot = Some(3);
        b.node_slot = Some(5);
        for h in [&mut a, &mut b, &mut replica] {
            h.set_length(0, "web_h", 10);
        }
        a.append(0, "web_h", e(1_800_000_000, "a1"), 1, 16);
        b.append(0, "web_h", e(1_800_000_000, "b1"), 1, 16);
        b.append(0, "web_h", e(1_800_000_001, "b2"), 1, 16);
        a.append(0, "web_h", e(1_800_000_002, "a2"), 1, 16);
        let (ea, eb) = (a.entries(0, "web_h"), b.entries(0, "web_h"));
        assert!(ea.iter().chain(&eb).all(|x| x.id < 1 << 53), "{ea:?} {eb:?}");
        assert_ne!(ea[0].id, eb[0].id);
        assert!(eb[1].id < ea[1].id && ea[0].id < eb[1].id, "later seconds, larger ids");
        // Applied in any order, twice: one copy each, in id order.
        for x in eb.iter().chain(&ea).chain(&eb) {
            replica.apply_remote(Change::HistoryPut { dev: 0, channel: "web_h".into(), entry: x.into() });
        }
        let mut want: Vec<u64> = ea.iter().chain(&eb).map(|x| x.id).collect();
        want.sort_unstable();
        let got: Vec<u64> = replica.entries(0, "web_h").iter().map(|x| x.id).collect();
        assert_eq!(got, want);
        replica.apply_remote(Change::HistoryDel { dev: 0, channel: "web_h".into(), id: want[0] });
        assert_eq!(replica.entries(0, "web_h").len(), 3);
    }

    #[test]
    fn a_copy_whose_deletes_were_lost_is_capped_at_the_channel_length() {
        let mut replica = HistoryStore { journal: Some(Vec::new()), ..Default::default() };
        replica.set_length(0, "web_c", 2);
        let _ = replica.take_changes();
        let channel: Arc<str> = "web_c".into();
        for id in 1..=5u64 {
            let entry = Entry { id, ..e(1, "m") };
            replica.apply_remote(Change::HistoryPut { dev: 0, channel: channel.clone(), entry: (&entry).into() });
            replica.cap_remote(0, &channel);
        }
        let ids: Vec<u64> = replica.entries(0, "web_c").iter().map(|x| x.id).collect();
        assert_eq!(ids, [4, 5], "the newest, up to the length");
        assert!(replica.take_changes().is_empty(), "another node's entries are not journaled here");
    }
}
