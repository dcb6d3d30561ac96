//! Offline queue entries as a log of group records, kept inside the
//! engine's keyspace.
//!
//! A record per queued message cost the storage thread an index insert
//! per message (fjall's memtable is a skiplist: key comparisons and cache
//! misses for every record), the largest part of its work. Comet never
//! reads a queue entry back while it runs (memory is the source of reads),
//! so the entries of one write group go to disk as one record:
//!
//! - `L` + group (u64) + `1`: the entries queued in that group, each
//!   dev_id (u32), user id (u64), position (u64), time (i64), event length
//!   (u8), message length (u32), event, message;
//! - `L` + group (u64) + `0`: the entries of earlier groups removed in that
//!   group (delivered, expired, dropped, deleted), each dev_id, user id,
//!   position: a tombstone record.
//!
//! Group numbers grow forever (across restarts too), and a key sorts by
//! group, then removals before entries, so replaying the records in key
//! order replays the queues' history: a user's positions restart at 0 when
//! the queue empties, and a removal only ever names an entry of an earlier
//! group (an entry queued and removed within one group never reaches the
//! disk).
//!
//! [`QueueLog`] is the storage thread's bookkeeping: how many live entries
//! and bytes each group record still has, which of its entries were
//! removed, and the tombstone records. It holds nothing per live entry: the
//! shard keeps, with each queued message, the group its record was written
//! in (a tag, `Queued::tag`, set when the shard's changes go into a lane:
//! the lane says which group the storage thread writes them in), and a
//! removal carries that tag and the entry's bytes, so counting its record
//! down is a lookup among the groups (a few thousand) instead of among the
//! entries (a million). An entry queued and removed before its group is
//! written is tagged with that group, or still pending.
//!
//! A group record whose entries are all removed is deleted in the same
//! write batch; a tombstone record is deleted once no group before it
//! holds a live entry (nothing it removes is on disk any more). What is
//! left is garbage: removed entries inside records that still hold live
//! ones, and tombstones kept by an old live entry. When the garbage passes
//! the live bytes (plus [`SLACK`]) the oldest group record's entries, less
//! the ones listed as removed, are written again into the current group and
//! the old record is deleted, which lets the tombstones after it go: the
//! disk holds at most about twice the live queue entries, and reaches a
//! plateau under a steady load. The shards' tags still name the old group,
//! which now forwards to the new one. The engine's compaction then drops
//! the deleted records.
//!
//! At start the [`Loader`] reads the records, sorts the entries and the
//! removals by key (the last entry written of a key is live unless a later
//! removal names it), and hands each live entry to its shard tagged with
//! its group.
//!
//! Entries written by format 1 (one `Q` record each) are loaded too and
//! removed one by one (group 0 here).

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::users::{Queued, TAG_PENDING};

/// A queue entry's identity: dev_id, user id, position in the user's queue.
pub type QKey = (u32, u64, u64);

/// Garbage allowed above the live bytes before records are rewritten.
pub const SLACK: u64 = 4 << 20;
/// Old group records rewritten at most per write group (bounds the extra
/// work of one group).
const RELOCATE_PER_GROUP: usize = 2;
/// Bytes of an entry before its event and message.
const ENTRY_HEAD: usize = 4 + 8 + 8 + 8 + 1 + 4;
/// Bytes of a removal.
const DEL_LEN: usize = 4 + 8 + 8;

/// The group records' key: `L`, group, kind (0 removals, 1 entries).
pub fn log_key(group: u64, entries: bool) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[0] = b'L';
    k[1..9].copy_from_slice(&group.to_be_bytes());
    k[9] = entries as u8;
    k
}

/// Reads a group record's key: (group, holds entries).
pub fn parse_log_key(k: &[u8]) -> Option<(u64, bool)> {
    if k.len() != 10 || k[0] != b'L' || k[9] > 1 {
        return None;
    }
    Some((u64::from_be_bytes(k[1..9].try_into().ok()?), k[9] == 1))
}

/// A queue entry's identity packed without padding (a group's list of
/// removed entries, and the loader's map, hold them).
type Packed = [u32; 5];

fn pack(k: QKey) -> Packed {
    [k.0, (k.1 >> 32) as u32, k.1 as u32, (k.2 >> 32) as u32, k.2 as u32]
}

fn unpack(k: Packed) -> QKey {
    (k[0], (k[1] as u64) << 32 | k[2] as u64, (k[3] as u64) << 32 | k[4] as u64)
}

/// A group record that still holds live entries.
#[derive(Debug, Default)]
struct Group {
    live: u32,
    live_bytes: u64,
    bytes: u64,
    /// The entries of this record removed since it was written: what a
    /// rewrite of it leaves out. (Garbage, so bounded with it; a record
    /// whose entries are all removed goes, list and all.)
    removed: Vec<Packed>,
    /// Groups whose live entries were rewritten into this record: the
    /// tags of those entries lead here (see [`QueueLog::moved`]).
    from: Vec<u64>,
}

/// What one removal means on disk.
#[derive(Debug, PartialEq, Eq)]
pub enum Removed {
    /// Nothing to write (not on disk, or queued in this same group).
    Nothing,
    /// A tombstone in this group's record.
    Logged,
    /// A format-1 record: delete its key.
    OwnRecord,
}

/// One entry of a group record.
#[derive(Debug)]
pub struct Entry<'a> {
    pub key: QKey,
    pub time: i64,
    pub event: &'a str,
    pub message: &'a str,
    /// The entry's encoded bytes.
    pub raw: &'a [u8],
}

/// Decodes a group record's entries; `None` when it is malformed.
pub fn entries(mut v: &[u8]) -> Option<Vec<Entry<'_>>> {
    let mut out = Vec::new();
    while !v.is_empty() {
        if v.len() < ENTRY_HEAD {
            return None;
        }
        let dev = u32::from_be_bytes(v[0..4].try_into().ok()?);
        let uid = u64::from_be_bytes(v[4..12].try_into().ok()?);
        let seq = u64::from_be_bytes(v[12..20].try_into().ok()?);
        let time = i64::from_be_bytes(v[20..28].try_into().ok()?);
        let elen = v[28] as usize;
        let mlen = u32::from_be_bytes(v[29..33].try_into().ok()?) as usize;
        let end = ENTRY_HEAD.checked_add(elen)?.checked_add(mlen)?;
        if v.len() < end {
            return None;
        }
        let event = std::str::from_utf8(&v[ENTRY_HEAD..ENTRY_HEAD + elen]).ok()?;
        let message = std::str::from_utf8(&v[ENTRY_HEAD + elen..end]).ok()?;
        out.push(Entry { key: (dev, uid, seq), time, event, message, raw: &v[..end] });
        v = &v[end..];
    }
    Some(out)
}

/// Decodes a tombstone record; `None` when it is malformed.
pub fn removals(v: &[u8]) -> Option<Vec<QKey>> {
    if !v.len().is_multiple_of(DEL_LEN) {
        return None;
    }
    Some(
        v.chunks_exact(DEL_LEN)
            .map(|c| {
                let dev = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
                let uid = u64::from_be_bytes(c[4..12].try_into().unwrap_or_default());
                let seq = u64::from_be_bytes(c[12..20].try_into().unwrap_or_default());
                (dev, uid, seq)
            })
            .collect(),
    )
}

fn encode_entry(out: &mut Vec<u8>, k: QKey, m: &Queued) {
    out.extend_from_slice(&k.0.to_be_bytes());
    out.extend_from_slice(&k.1.to_be_bytes());
    out.extend_from_slice(&k.2.to_be_bytes());
    out.extend_from_slice(&m.time.to_be_bytes());
    out.push(m.event().len() as u8);
    out.extend_from_slice(&(m.message().len() as u32).to_be_bytes());
    out.extend_from_slice(m.event().as_bytes());
    out.extend_from_slice(m.message().as_bytes());
}

/// An entry's bytes in a group record (a removal carries it, see
/// `Change::QueueDel`).
pub fn entry_len(m: &Queued) -> u32 {
    (ENTRY_HEAD + m.event().len() + m.message().len()) as u32
}

/// The storage thread's view of the queue records on disk.
///
/// It holds nothing per live entry: a removal names the group its entry
/// was written in (the tag the shard keeps with the entry) and its bytes,
/// so counting the record down is a lookup among the groups, not among
/// the entries. What a record's rewrite must leave out is the list of its
/// removed entries, kept with the record.
#[derive(Debug, Default)]
pub struct QueueLog {
    /// The group being built (the next one after [`QueueLog::finish`]).
    group: u64,
    /// Live entries and their bytes.
    live_n: u64,
    live_bytes: u64,
    /// Group records on disk with live entries, by group.
    groups: BTreeMap<u64, Group>,
    /// Groups whose record was rewritten, and the group that holds their
    /// live entries now (the shards' tags still name the old group). At
    /// most one hop: a rewrite re-points the groups moved into the old
    /// record. An entry goes when the record it points to goes.
    moved: HashMap<u64, u64, ahash::RandomState>,
    /// Groups rewritten into the group being finished: they forward to it
    /// once its write is done ([`QueueLog::written`]). A write that fails
    /// leaves the old records on disk, and the tags must keep leading to
    /// them.
    moving: Vec<u64>,
    /// Tombstone records on disk: group, bytes.
    tombs: BTreeMap<u64, u64>,
    garbage: u64,
    /// Records left with no live entry (found at load, or emptied in
    /// this group), deleted with this group.
    dead_groups: Vec<u64>,
    // The group being built.
    puts: Vec<Option<QKey>>,
    put_buf: Vec<u8>,
    /// Where each of `puts` starts in `put_buf`, and its length.
    put_at: Vec<(u32, u32)>,
    del_buf: Vec<u8>,
    /// What the group writes, once finished.
    pub out: Out,
    /// [`SLACK`] unless a test sets a smaller one.
    slack: Option<u64>,
    /// Old group records rewritten so far.
    pub rewritten: u64,
}

/// What a finished group writes: its records and the deletions.
#[derive(Debug, Default)]
pub struct Out {
    pub group: u64,
    /// The entries record (empty: none).
    pub entries: Vec<u8>,
    /// The tombstone record (empty: none).
    pub removals: Vec<u8>,
    /// Group records (entries) and tombstone records to delete.
    pub delete_entries: Vec<u64>,
    pub delete_removals: Vec<u64>,
}

impl QueueLog {
    /// Live entries and their bytes (for tests and metrics).
    pub fn live(&self) -> (u64, u64) {
        (self.live_n, self.live_bytes)
    }

    /// Bytes of removed entries and tombstones still on disk.
    pub fn garbage(&self) -> u64 {
        self.garbage
    }

    /// The first group number after the ones on disk.
    pub fn next_group(&self) -> u64 {
        self.group.max(1)
    }

    /// Starts group `group` (greater than every earlier one).
    pub fn begin(&mut self, group: u64) {
        self.group = group;
        self.moving.clear();
        self.puts.clear();
        self.put_buf.clear();
        self.put_at.clear();
        self.del_buf.clear();
    }

    /// An entry queued in this group.
    pub fn put(&mut self, k: QKey, m: &Queued) {
        let bytes = entry_len(m);
        let at = self.put_buf.len() as u32;
        encode_entry(&mut self.put_buf, k, m);
        self.put_at.push((at, bytes));
        self.puts.push(Some(k));
    }

    /// An entry removed in this group: `tag` is the group it was written
    /// in (as the shard tagged it), `bytes` its size there.
    pub fn remove(&mut self, k: QKey, tag: u64, bytes: u32) -> Removed {
        if tag == 0 {
            return Removed::OwnRecord;
        }
        if tag == self.group || tag == TAG_PENDING {
            // Queued in this group: it never reaches the disk. (The last
            // put of the key: an earlier one was removed before it.)
            if let Some(p) = self.puts.iter_mut().rev().find(|p| **p == Some(k)) {
                *p = None;
            }
            return Removed::Nothing;
        }
        let group = self.moved.get(&tag).copied().unwrap_or(tag);
        // Not on disk: its group's write failed, or it is gone already.
        let Some(g) = self.groups.get_mut(&group) else { return Removed::Nothing };
        let bytes = bytes as u64;
        // A miscount would delete a record that still holds live entries:
        // the tests (debug builds) stop at it; release builds saturate.
        debug_assert!(g.live > 0 && g.live_bytes >= bytes, "removal past a group's live entries: {k:?} in {group}");
        g.live = g.live.saturating_sub(1);
        g.live_bytes = g.live_bytes.saturating_sub(bytes);
        g.removed.push(pack(k));
        if g.live == 0 {
            self.dead_groups.push(group);
        }
        self.live_n = self.live_n.saturating_sub(1);
        self.live_bytes = self.live_bytes.saturating_sub(bytes);
        self.garbage += bytes;
        self.del_buf.extend_from_slice(&k.0.to_be_bytes());
        self.del_buf.extend_from_slice(&k.1.to_be_bytes());
        self.del_buf.extend_from_slice(&k.2.to_be_bytes());
        Removed::Logged
    }

    /// The group [`QueueLog::finish`] built is written: the records it
    /// rewrote forward to it.
    pub fn written(&mut self) {
        let g = self.out.group;
        for f in self.moving.drain(..) {
            self.moved.insert(f, g);
        }
    }

    /// The forwarding of rewritten groups, to keep across a rebuild of
    /// the bookkeeping after a failed write (the shards' tags still name
    /// the rewritten groups).
    pub fn take_moved(&mut self) -> Vec<(u64, u64)> {
        self.moved.drain().collect()
    }

    /// Keeps the forwarding that leads to records on disk (after a
    /// rebuild from the disk).
    pub fn keep_moved(&mut self, moved: Vec<(u64, u64)>) {
        for (from, to) in moved {
            if let Some(g) = self.groups.get_mut(&to) {
                g.from.push(from);
                self.moved.insert(from, to);
            }
        }
    }

    /// Forgets a record that left the disk, and the tags that led to it.
    fn drop_group(&mut self, g: u64) -> Option<Group> {
        let s = self.groups.remove(&g)?;
        for f in &s.from {
            self.moved.remove(f);
        }
        Some(s)
    }

    /// Ends the group: what it writes and deletes is in [`QueueLog::out`].
    /// `read` reads a group record back (to rewrite its live entries).
    pub fn finish(&mut self, read: &mut dyn FnMut(u64) -> Option<Vec<u8>>) {
        let g = self.group;
        let out = &mut self.out;
        out.group = g;
        out.entries.clear();
        out.removals.clear();
        out.delete_entries.clear();
        out.delete_removals.clear();
        // The entries queued in this group and still live.
        let mut new = Group::default();
        for (i, k) in self.puts.iter().enumerate() {
            if k.is_none() {
                continue;
            }
            let (at, len) = self.put_at[i];
            out.entries.extend_from_slice(&self.put_buf[at as usize..(at + len) as usize]);
            new.live += 1;
            new.live_bytes += len as u64;
        }
        self.live_n += new.live as u64;
        self.live_bytes += new.live_bytes;
        // Group records left with no live entry go.
        for e in std::mem::take(&mut self.dead_groups) {
            if let Some(s) = self.drop_group(e) {
                self.garbage -= s.bytes - s.live_bytes;
                self.out.delete_entries.push(e);
            }
        }
        // Too much garbage: rewrite the oldest records' live entries here.
        for _ in 0..RELOCATE_PER_GROUP {
            if self.garbage <= self.live_bytes + self.slack.unwrap_or(SLACK) {
                break;
            }
            let Some(&old) = self.groups.keys().next() else { break };
            let Some(v) = read(old) else { break };
            let Some(list) = entries(&v) else { break };
            let Some(stat) = self.groups.remove(&old) else { break };
            let removed: HashSet<Packed, ahash::RandomState> = stat.removed.iter().copied().collect();
            for e in list {
                if !removed.contains(&pack(e.key)) {
                    self.out.entries.extend_from_slice(e.raw);
                    new.live += 1;
                    new.live_bytes += e.raw.len() as u64;
                }
            }
            self.garbage -= stat.bytes - stat.live_bytes;
            self.out.delete_entries.push(old);
            // The tags of its entries, and of those moved into it, lead
            // here once this group is written.
            for f in stat.from.into_iter().chain([old]) {
                self.moving.push(f);
                new.from.push(f);
            }
            self.rewritten += 1;
        }
        let out = &mut self.out;
        if new.live > 0 {
            new.bytes = out.entries.len() as u64;
            self.groups.insert(g, new);
        } else {
            self.moving.clear();
        }
        // Tombstones go once no earlier group holds a live entry; this
        // group's own is not written then.
        let oldest_live = self.groups.keys().next().copied().unwrap_or(u64::MAX);
        if !self.del_buf.is_empty() && oldest_live < g {
            out.removals.extend_from_slice(&self.del_buf);
            self.tombs.insert(g, self.del_buf.len() as u64);
            self.garbage += self.del_buf.len() as u64;
        }
        // (The removed entries' bytes were garbage until their record or
        // the tombstone's predecessors went; the accounting above keeps
        // `garbage` = dead bytes in live records + tombstone bytes.)
        while let Some((&t, &bytes)) = self.tombs.first_key_value() {
            if t > oldest_live {
                break;
            }
            self.tombs.remove(&t);
            self.garbage -= bytes;
            out.delete_removals.push(t);
        }
        self.group = g + 1;
    }
}

/// An entry read at start: its key, the group record holding it (0 for a
/// format-1 record of its own), its bytes there, and its message (when
/// loading, not when rebuilding the bookkeeping).
#[derive(Debug)]
struct Read {
    key: Packed,
    bytes: u32,
    group: u64,
    msg: Option<Queued>,
}

/// Builds a [`QueueLog`] from the records on disk, in key order, and
/// collects the live entries, each tagged with the group that holds it.
///
/// It keeps every entry and every removal read, sorts both by key, and
/// then tells for each key which entry is live: the last one written, if
/// no removal came after it. No map of the live entries is built: at
/// start, with a million queued messages, a map is the peak of memory the
/// loading adds (and an allocator gives that back to the system late).
#[derive(Debug, Default)]
pub struct Loader {
    log: QueueLog,
    reads: Vec<Read>,
    /// The removals read: the entry's key, the group of the tombstone.
    removed: Vec<(Packed, u64)>,
    /// The highest group seen.
    top: u64,
}

impl Loader {
    /// A group record (`keep`: keep the entries' texts, to load them).
    /// `false` when it is malformed.
    pub fn record(&mut self, key: &[u8], value: &[u8], keep: bool) -> bool {
        let Some((group, has_entries)) = parse_log_key(key) else { return false };
        self.top = self.top.max(group);
        if has_entries {
            let Some(list) = entries(value) else { return false };
            let stat = self.log.groups.entry(group).or_default();
            stat.bytes += value.len() as u64;
            stat.live += list.len() as u32;
            stat.live_bytes += value.len() as u64;
            for e in list {
                let msg = keep.then(|| Queued::new(e.time, e.event, e.message));
                self.reads.push(Read { key: pack(e.key), bytes: e.raw.len() as u32, group, msg });
            }
        } else {
            let Some(list) = removals(value) else { return false };
            self.log.tombs.insert(group, value.len() as u64);
            self.removed.extend(list.into_iter().map(|k| (pack(k), group)));
        }
        true
    }

    /// A format-1 record of its own (deleted by key, so not counted in
    /// the log's bytes).
    pub fn own_record(&mut self, k: QKey, m: Option<Queued>) {
        self.reads.push(Read { key: pack(k), bytes: 0, group: 0, msg: m });
    }

    /// The bookkeeping; the live entries go to `sink` in key order (each
    /// user's queue from its oldest entry), tagged with their group.
    pub fn finish(mut self, sink: &mut dyn FnMut(QKey, Queued)) -> QueueLog {
        // Of one key, the entries in the order written (a position is
        // reused only once its entry was removed), and its removals.
        self.reads.sort_unstable_by_key(|r| (r.key, r.group));
        self.removed.sort_unstable();
        let log = &mut self.log;
        let mut removed = self.removed.iter().peekable();
        let mut reads = std::mem::take(&mut self.reads).into_iter().peekable();
        // The key of the last read and the latest group a removal of it
        // was written in.
        let mut last_removal: Option<(Packed, u64)> = None;
        while let Some(r) = reads.next() {
            if last_removal.is_none_or(|(k, _)| k != r.key) {
                while removed.next_if(|(k, _)| *k < r.key).is_some() {}
                let mut latest = 0;
                while let Some((_, t)) = removed.next_if(|(k, _)| *k == r.key) {
                    latest = latest.max(*t);
                }
                last_removal = Some((r.key, latest));
            }
            // A later entry of the key, or a removal written after it (in
            // a later group), removed it.
            let replaced = reads.peek().is_some_and(|n| n.key == r.key);
            let gone = last_removal.is_some_and(|(_, t)| t > r.group);
            if replaced || gone {
                // Dead in its record: a rewrite leaves it out.
                if let Some(g) = log.groups.get_mut(&r.group) {
                    g.live -= 1;
                    g.live_bytes -= r.bytes as u64;
                    g.removed.push(r.key);
                }
                continue;
            }
            log.live_n += (r.group != 0) as u64;
            log.live_bytes += r.bytes as u64;
            if let Some(m) = r.msg {
                sink(unpack(r.key), m.tagged(r.group));
            }
        }
        log.dead_groups = log.groups.iter().filter(|(_, s)| s.live == 0).map(|(g, _)| *g).collect();
        log.garbage =
            log.groups.values().map(|s| s.bytes - s.live_bytes).sum::<u64>() + log.tombs.values().sum::<u64>();
        log.group = self.top + 1;
        self.log
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk of group records, as the store keeps them.
    #[derive(Default)]
    struct Disk(BTreeMap<Vec<u8>, Vec<u8>>);

    impl Disk {
        fn write(&mut self, log: &QueueLog) {
            let o = &log.out;
            for g in &o.delete_entries {
                self.0.remove(&log_key(*g, true)[..]);
            }
            for g in &o.delete_removals {
                self.0.remove(&log_key(*g, false)[..]);
            }
            if !o.entries.is_empty() {
                self.0.insert(log_key(o.group, true).to_vec(), o.entries.clone());
            }
            if !o.removals.is_empty() {
                self.0.insert(log_key(o.group, false).to_vec(), o.removals.clone());
            }
        }
        fn bytes(&self) -> usize {
            self.0.values().map(Vec::len).sum()
        }
        fn load(&self) -> (QueueLog, Vec<(QKey, Queued)>) {
            let mut l = Loader::default();
            for (k, v) in &self.0 {
                assert!(l.record(k, v, true));
            }
            let mut got = Vec::new();
            let log = l.finish(&mut |k, m| got.push((k, m)));
            (log, got)
        }
    }

    /// Plays one write group as the shards play it: each entry put is
    /// tagged with the group (`tags`, as `UserStore::retag` does), and a
    /// removal carries the tag and the bytes of the entry it removes.
    fn group(
        log: &mut QueueLog,
        disk: &mut Disk,
        tags: &mut HashMap<QKey, (u64, u32)>,
        puts: &[(QKey, &str)],
        dels: &[QKey],
    ) {
        let g = log.next_group();
        log.begin(g);
        for (k, t) in puts {
            let m = Queued::new(1, "e", t);
            log.put(*k, &m);
            tags.insert(*k, (g, entry_len(&m)));
        }
        for k in dels {
            let (tag, bytes) = tags.remove(k).expect("removes a live entry");
            log.remove(*k, tag, bytes);
        }
        log.finish(&mut |g| disk.0.get(&log_key(g, true)[..]).cloned());
        disk.write(log);
        log.written();
    }

    #[test]
    fn a_queue_replays_from_its_group_records() {
        let (mut log, mut disk, mut tags) = (QueueLog::default(), Disk::default(), HashMap::new());
        let (log, disk, t) = (&mut log, &mut disk, &mut tags);
        group(log, disk, t, &[((0, 5, 0), "a"), ((0, 5, 1), "b"), ((0, 6, 0), "c")], &[]);
        group(log, disk, t, &[((0, 5, 2), "d")], &[(0, 5, 0)]);
        // Queued and removed in one group: never on disk.
        group(log, disk, t, &[((0, 7, 0), "gone")], &[(0, 7, 0)]);
        let (_, got) = disk.load();
        let got: Vec<_> = got.iter().map(|(k, m)| (*k, m.message().to_string(), m.tag())).collect();
        assert_eq!(
            got,
            [((0, 5, 1), "b".into(), 1), ((0, 5, 2), "d".into(), 2), ((0, 6, 0), "c".into(), 1)],
            "loaded entries are tagged with the group that holds them"
        );
        // User 6's queue is taken, then refilled from position 0.
        group(log, disk, t, &[], &[(0, 6, 0)]);
        group(log, disk, t, &[((0, 6, 0), "again")], &[]);
        let (_, got) = disk.load();
        assert_eq!(got.iter().find(|(k, _)| k.1 == 6).map(|(_, m)| m.message()), Some("again"));
        assert_eq!(got.len(), 3);
    }

    /// The model of the randomized test: per user, the position of its
    /// head and its messages, each with the tag the shard keeps (the group
    /// it was put in, or pending while its group is being built) and its
    /// bytes.
    type Model = BTreeMap<u64, (u64, std::collections::VecDeque<(String, u64, u32)>)>;

    fn tag_pending(model: &mut Model, g: u64) {
        for (_, q) in model.values_mut() {
            for e in q.iter_mut().filter(|e| e.1 == TAG_PENDING) {
                e.1 = g;
            }
        }
    }

    /// Random queues played as the shards play them (entries appended at
    /// the tail, removed from the head or all at once, positions restarting
    /// at 0 once a queue empties), in random groups, with a small slack so
    /// that old records are rewritten often: the disk always replays to
    /// what is live, and the bookkeeping matches a reload.
    #[test]
    fn random_queues_replay_exactly_and_rewrites_keep_them() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let (mut log, mut disk) = (QueueLog { slack: Some(512), ..QueueLog::default() }, Disk::default());
        let mut model: Model = BTreeMap::new();
        let (mut g, mut rewritten) = (0, 0);
        for round in 0..3000 {
            // Group numbers grow with gaps (idle rounds of the writer).
            g += 1 + next(3);
            log.begin(g);
            for _ in 0..next(12) {
                let uid = next(20);
                let (head, q) = model.entry(uid).or_insert((0, Default::default()));
                match next(10) {
                    0..=5 => {
                        let text = format!("{round}-{}", next(1000));
                        let k = (0, uid, *head + q.len() as u64);
                        let m = Queued::new(1, "e", &text);
                        log.put(k, &m);
                        q.push_back((text, m.tag(), entry_len(&m)));
                    }
                    6..=8 => {
                        if let Some((_, tag, bytes)) = q.pop_front() {
                            log.remove((0, uid, *head), tag, bytes);
                            *head += 1;
                        }
                    }
                    _ => {
                        for (i, (_, tag, bytes)) in q.iter().enumerate() {
                            log.remove((0, uid, *head + i as u64), *tag, *bytes);
                        }
                        model.remove(&uid);
                    }
                }
                if model.get(&uid).is_some_and(|(_, q)| q.is_empty()) {
                    model.remove(&uid);
                }
                // A shard sent its batch within the group: its entries
                // carry the group's number, a later removal in the same
                // group names it (the others are still pending: both mean
                // "not on disk yet").
                if next(3) == 0 {
                    tag_pending(&mut model, g);
                }
            }
            log.finish(&mut |g| disk.0.get(&log_key(g, true)[..]).cloned());
            disk.write(&log);
            log.written();
            // The shard tags what it sent with the group.
            tag_pending(&mut model, g);
            if round % 100 == 99 {
                let (reloaded, got) = disk.load();
                let want: Vec<(QKey, String)> = model
                    .iter()
                    .flat_map(|(uid, (head, q))| {
                        q.iter().enumerate().map(move |(i, t)| ((0, *uid, head + i as u64), t.0.clone()))
                    })
                    .collect();
                let got: Vec<(QKey, String)> = got.into_iter().map(|(k, m)| (k, m.message().to_string())).collect();
                assert_eq!(got, want, "round {round}");
                assert_eq!(reloaded.live(), log.live(), "round {round}");
                assert_eq!(reloaded.garbage(), log.garbage(), "round {round}");
                if round % 500 == 499 {
                    // A restart: go on with the bookkeeping rebuilt from
                    // the disk, and the shards hold the loaded tags.
                    let (reloaded, tagged) = disk.load();
                    rewritten += log.rewritten;
                    log = QueueLog { slack: Some(512), ..reloaded };
                    let mut it = tagged.iter();
                    for (_, q) in model.values_mut() {
                        for e in q.iter_mut() {
                            e.1 = it.next().expect("as many entries").1.tag();
                        }
                    }
                }
            }
        }
        rewritten += log.rewritten;
        assert!(rewritten > 10, "old records were rewritten ({rewritten})");
        assert!(disk.bytes() < 64 * 1024, "the disk stays bounded: {}", disk.bytes());
    }

    #[test]
    fn a_rewritten_record_still_takes_removals_by_its_old_tag_after_a_failed_write() {
        let (mut log, mut disk, mut tags) =
            (QueueLog { slack: Some(0), ..QueueLog::default() }, Disk::default(), HashMap::new());
        // Group 1 holds the entry kept; removing its neighbour makes
        // garbage enough to rewrite group 1 into group 2.
        group(&mut log, &mut disk, &mut tags, &[((0, 1, 0), "keep"), ((0, 2, 0), "a long message, garbage soon")], &[]);
        group(&mut log, &mut disk, &mut tags, &[], &[(0, 2, 0)]);
        assert_eq!(log.rewritten, 1);
        assert!(!disk.0.contains_key(&log_key(1, true)[..]), "group 1's record was rewritten");
        // Group 3's write fails: the bookkeeping is rebuilt from the disk,
        // keeping the forwarding of group 1.
        log.begin(3);
        log.put((0, 3, 0), &Queued::new(1, "e", "lost"));
        log.finish(&mut |g| disk.0.get(&log_key(g, true)[..]).cloned());
        let moved = log.take_moved();
        let (mut rebuilt, _) = disk.load();
        rebuilt.keep_moved(moved);
        // The shard still tags the kept entry with group 1.
        let (tag, bytes) = tags[&(0, 1, 0)];
        assert_eq!(tag, 1);
        rebuilt.begin(4);
        assert_eq!(rebuilt.remove((0, 1, 0), tag, bytes), Removed::Logged);
        rebuilt.finish(&mut |g| disk.0.get(&log_key(g, true)[..]).cloned());
        disk.write(&rebuilt);
        rebuilt.written();
        assert!(disk.load().1.is_empty(), "the delivered entry is not loaded again: {:?}", disk.load().1);
    }

    #[test]
    fn records_of_removed_entries_leave_the_disk_and_it_reaches_a_plateau() {
        let (mut log, mut disk, mut tags) = (QueueLog::default(), Disk::default(), HashMap::new());
        // One entry that is never removed pins the tombstones after it
        // until it is rewritten; everything else churns.
        group(&mut log, &mut disk, &mut tags, &[((0, 1, 0), "old")], &[]);
        let mut most = 0;
        let mut relocated = false;
        for round in 0..12_000u64 {
            let puts: Vec<_> = (0..64).map(|i| ((1, round * 64 + i, 0), "0123456789")).collect();
            let dels: Vec<_> = if round > 0 { (0..64).map(|i| (1, (round - 1) * 64 + i, 0)).collect() } else { vec![] };
            group(&mut log, &mut disk, &mut tags, &puts, &dels);
            most = most.max(disk.bytes());
            relocated |= !disk.0.contains_key(&log_key(1, true)[..]);
        }
        // Written in all: 12,000 x 64 x 44 bytes of entries (34 MB) and
        // 12,000 x 64 x 20 of tombstones (15 MB); live: 65 entries.
        assert!(relocated && log.rewritten > 0, "the old entry's record was rewritten");
        assert!(most < (SLACK as usize) + 256 * 1024, "the disk kept {most} bytes");
        let (reloaded, got) = disk.load();
        assert_eq!(got.len(), 65);
        assert!(got.iter().any(|(k, m)| *k == (0, 1, 0) && m.message() == "old"), "the old entry survived rewrites");
        assert_eq!(reloaded.live(), log.live());
        assert_eq!(reloaded.garbage(), log.garbage(), "bookkeeping after load matches the running one");
    }
}
