//! The embedded store: fjall, an LSM tree with a write-ahead journal.
//!
//! Why fjall: it is made for this job (a journal with group-commit friendly
//! `persist`, atomic write batches, torn-tail recovery, compaction that
//! drops deleted keys so the data dir reaches a plateau) and on this
//! machine commits about three times as many durable records per second as
//! redb or SQLite at 64 records per fsync.
//!
//! Layout of the data dir:
//! - `comet.lock`: held (flock) by the comet using the dir;
//! - `db/`: the fjall database, one keyspace `state`;
//! - `corrupt/`: copies of journal files whose damaged tail was dropped at
//!   start ([`salvage_journal`]), kept for the operator; none normally.
//!
//! Keys start with a table byte and the dev_id (big-endian, so a table's
//! keys sort by dev_id, then user id or channel):
//!
//! | table | key after the dev_id | value |
//! |---|---|---|
//! | `K` users_auth | user id | the key |
//! | `D` users_data | user id | the text |
//! | `T` users_time | user id | unix seconds (i64) |
//! | `R` revoked_tokens | the token | empty |
//! | `L` offline queues | group (u64), kind (u8) | the entries queued, or removed, in one write group ([`super::qlog`]) |
//! | `Q` offline queues, format 1 | user id, position | time (i64), event length (u8), event and message |
//! | `H` history | channel length (u16), channel, entry id | time, user id flag and id, event length (u16), event, message |
//! | `S` pipes_settings | the channel | length (u32) |
//!
//! and one meta key, `\0format`, holding the store format version (u32),
//! written at creation and checked at open. Format 2 writes queue entries
//! as group records (`L`); it reads the `Q` records of format 1 and removes
//! them one by one as they are delivered, and marks the store as format 2
//! at open (a comet that reads only format 1 then refuses it).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fjall::{Database, JournalRecoveryError, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::qlog::{self, Loader, QueueLog, Removed};
use super::{Backend, Change, HistoryRecord, StoreError};
use crate::users::Queued;

/// The memtable: what is written but not yet in sorted tables, held in
/// memory (on top of comet's own state) and replayed from the journal at
/// start. fjall's 64 MiB default is RSS a push server would rather keep.
const MEMTABLE_BYTES: u64 = 16 << 20;
/// The store format this comet writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 2;
const FORMAT_KEY: &[u8] = b"\0format";
/// Block cache: reads happen at start, and in the storage thread when it
/// rewrites an old queue record or rebuilds its bookkeeping after a failed
/// write, so a small cache suffices and keeps loading from doubling the RSS.
const CACHE_BYTES: u64 = 8 << 20;

/// The fjall store of one data dir, with its lock.
pub struct FjallStore {
    path: PathBuf,
    /// `--max-journal-size`.
    max_journal: u64,
    /// The database and its one keyspace; `None` after a failed write
    /// until reopened.
    inner: Option<(Database, Keyspace)>,
    /// Where the offline queue entries are on disk; `None` until loaded,
    /// and after a failed write until rebuilt from the disk.
    qlog: Option<QueueLog>,
    /// The forwarding of rewritten queue records, kept from a failed
    /// write's bookkeeping until it is rebuilt ([`QueueLog::take_moved`]).
    moved: Vec<(u64, u64)>,
    /// Buffers reused from write to write.
    key: Vec<u8>,
    value: Vec<u8>,
    /// Held for the life of the store: one comet per data dir.
    _lock: File,
}

fn io_cause(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn dir_error(path: &Path, cause: impl std::fmt::Display) -> StoreError {
    StoreError::Dir { path: path.to_path_buf(), cause: cause.to_string() }
}

impl FjallStore {
    /// Opens (creating) the data dir `path`: takes its lock, recovers the
    /// journal (reporting what a torn tail lost), checks the format.
    /// `max_journal` (at least 64 MiB) bounds the sealed journal files.
    pub fn open(path: &Path, max_journal: u64) -> Result<FjallStore, StoreError> {
        std::fs::create_dir_all(path).map_err(|e| dir_error(path, e))?;
        let lock_path = path.join("comet.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| dir_error(path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked { path: path.to_path_buf(), lock: lock_path });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(dir_error(&lock_path, e)),
        }
        // A probe write: a read-only dir must fail here, naming the path,
        // not later on the first statement.
        let probe = path.join("comet.probe");
        std::fs::write(&probe, b"ok").and_then(|()| std::fs::remove_file(&probe)).map_err(|e| dir_error(path, e))?;
        let db_path = path.join("db");
        resume_salvage(path)?;
        let before = journal_sizes(&db_path);
        let (db, state, salvaged) = match open_db(&db_path, max_journal) {
            Ok((db, state)) => (db, state, None),
            Err(e) if unreadable_batch(&e) => {
                let (db, state, file) = salvage_journal(path, &db_path, max_journal, &e)?;
                (db, state, Some(file))
            }
            Err(e @ fjall::Error::JournalRecovery(JournalRecoveryError::InvalidFileName)) => {
                let cause = format!(
                    "{e}: a file in it ends in .jnl but is not named <number>.jnl, as fjall's journal files are; move it out of {}",
                    db_path.display()
                );
                return Err(dir_error(&db_path, cause));
            }
            Err(e) => return Err(dir_error(&db_path, e)),
        };
        for (file, old) in before {
            if salvaged.as_ref() == Some(&file) {
                continue;
            }
            let new = std::fs::metadata(&file).map_or(0, |m| m.len());
            if new < old {
                eprintln!(
                    "comet: store: journal {} had a torn tail (a crash during a write): recovered every complete batch, dropped the last {} bytes",
                    file.display(),
                    old - new
                );
            }
        }
        let found = match state.get(FORMAT_KEY).map_err(|e| dir_error(&db_path, e))? {
            None => 0,
            Some(v) => v.as_ref().try_into().map(u32::from_be_bytes).unwrap_or(u32::MAX),
        };
        if found > FORMAT_VERSION {
            return Err(StoreError::NewerFormat { path: path.to_path_buf(), found, supported: FORMAT_VERSION });
        }
        if found < FORMAT_VERSION {
            state.insert(FORMAT_KEY, FORMAT_VERSION.to_be_bytes()).map_err(|e| dir_error(&db_path, e))?;
            db.persist(PersistMode::SyncAll).map_err(|e| dir_error(&db_path, e))?;
        }
        Ok(FjallStore {
            path: path.to_path_buf(),
            max_journal,
            inner: Some((db, state)),
            qlog: None,
            moved: Vec::new(),
            key: Vec::with_capacity(64),
            value: Vec::with_capacity(256),
            _lock: lock,
        })
    }

    /// After a failed write fjall refuses every later one (it cannot know
    /// what reached the disk): reopen, which replays the journal, so writes
    /// work again once the cause (a full disk) is gone. The old handles go
    /// first: fjall locks its directory.
    fn reopen(&mut self) -> Result<(), StoreError> {
        self.inner = None;
        let opened = open_db(&self.path.join("db"), self.max_journal)
            .map_err(|e| StoreError::Write(format!("cannot reopen the store: {e}")))?;
        self.inner = Some(opened);
        Ok(())
    }

    /// The open database, reopening it after a failure.
    fn handles(&mut self) -> Result<&(Database, Keyspace), StoreError> {
        if self.inner.is_none() {
            self.reopen()?;
        }
        self.inner.as_ref().ok_or_else(|| StoreError::Write("the store is closed".into()))
    }

    /// Handles a failed write: drops the poisoned handles (reopened on the
    /// next write) and names the cause.
    fn failed(&mut self, e: &fjall::Error) -> StoreError {
        self.inner = None;
        if let Some(mut q) = self.qlog.take() {
            self.moved.extend(q.take_moved());
        }
        StoreError::Write(write_cause(e))
    }

    /// Rebuilds the queue bookkeeping from the records on disk (after a
    /// failed write, or when writing before loading).
    fn rebuild_qlog(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let (_, ks) = self.handles()?;
        let mut loader = Loader::default();
        for prefix in [&b"L"[..], &b"Q"[..]] {
            for kv in ks.prefix(prefix) {
                let (k, v) = kv.into_inner().map_err(|e| StoreError::Write(write_cause(&e)))?;
                read_queue_record(&mut loader, &k, &v, false).map_err(|key| corrupt(&path, &key))?;
            }
        }
        let mut log = loader.finish(&mut |_, _| {});
        log.keep_moved(std::mem::take(&mut self.moved));
        self.qlog = Some(log);
        Ok(())
    }
}

fn corrupt(path: &Path, key: &[u8]) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        key: crate::domain::clip(&String::from_utf8_lossy(key)).to_string(),
        cause: "cannot decode the record".into(),
    }
}

/// Feeds a queue record (`L`, or format 1's `Q`) to `loader`; `Err(key)`
/// when it cannot be read.
fn read_queue_record(loader: &mut Loader, k: &[u8], v: &[u8], keep: bool) -> Result<(), Vec<u8>> {
    if k.first() == Some(&b'L') {
        return if loader.record(k, v, keep) { Ok(()) } else { Err(k.to_vec()) };
    }
    match decode(k, v) {
        Some(Change::QueuePut { dev, uid, seq, msg }) => {
            loader.own_record((dev, uid, seq), keep.then_some(msg));
            Ok(())
        }
        _ => Err(k.to_vec()),
    }
}

/// Opens the database. The journal: fjall appends to one file until it
/// holds 64 MB, then seals it at the next memtable flush and starts
/// another; a sealed file is deleted once the memtables it holds are
/// flushed to sorted tables, and when sealed files pass `max_journal` fjall
/// flushes the memtables that hold them back. So the journal part of the
/// data dir rises to about 64 MB and falls back (a sawtooth), plus at most
/// `max_journal` of sealed files while flushes lag.
fn open_db(db_path: &Path, max_journal: u64) -> Result<(Database, Keyspace), fjall::Error> {
    let db = open_database(db_path, max_journal)?;
    let state = db.keyspace("state", || KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES))?;
    Ok((db, state))
}

/// Opens the database without touching its keyspaces: the journal is
/// recovered here, so this is what [`salvage_journal`] tries.
fn open_database(db_path: &Path, max_journal: u64) -> Result<Database, fjall::Error> {
    // fjall panics below its minimum; the flag's check says so first.
    let max_journal = max_journal.max(crate::config::MIN_JOURNAL_SIZE);
    // Every committed batch goes to the OS at once (a crash of the process
    // loses nothing in either mode); `persist(SyncAll)` makes it durable.
    // Journal compression is off: a group's queue record is past fjall's
    // 4 KiB threshold, and compressing it cost the storage thread more
    // than writing the bytes does (comet's messages are short).
    Database::builder(db_path)
        .cache_size(CACHE_BYTES)
        .max_journaling_size(max_journal)
        .journal_compression(fjall::CompressionType::None)
        .open()
}

/// Where the data of a journal file ends: fjall preallocates journals with
/// zeros, which recovery cuts off without anything being lost.
fn data_end(path: &Path) -> u64 {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = File::open(path) else { return 0 };
    let mut end = f.metadata().map_or(0, |m| m.len());
    let mut buf = vec![0u8; 1 << 16];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        if f.seek(SeekFrom::Start(start)).is_err() || f.read_exact(&mut buf[..n]).is_err() {
            return end;
        }
        if let Some(i) = buf[..n].iter().rposition(|&b| b != 0) {
            return start + i as u64 + 1;
        }
        end = start;
    }
    0
}

/// Journal files and where their data ends, to tell after recovery what
/// it dropped.
fn journal_sizes(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "jnl") {
                out.push((p.clone(), data_end(&p)));
            }
        }
    }
    out
}

/// Whether opening failed on a journal batch that fjall cannot read back:
/// its end marker parses but its checksum does not match, or it holds fewer
/// or more items than its start marker says. fjall tolerates a last batch
/// that lacks its end marker (a write cut short), not this, yet a crash
/// leaves it too: on a file system that may write a file's data after its
/// size (ext4 with `data=writeback`), blocks of the writes after the last
/// fsync can hold stale bytes. A journal file name fjall cannot parse, a
/// held lock or a newer format are not this.
fn unreadable_batch(e: &fjall::Error) -> bool {
    matches!(
        e,
        fjall::Error::JournalRecovery(
            JournalRecoveryError::ChecksumMismatch
                | JournalRecoveryError::InsufficientLength
                | JournalRecoveryError::TooManyItems
        )
    )
}

/// What is wrong with the batch, for the log.
fn unreadable_what(e: &fjall::Error) -> &'static str {
    match e {
        fjall::Error::JournalRecovery(JournalRecoveryError::InsufficientLength) => {
            "where a batch holds fewer items than its start marker says"
        }
        fjall::Error::JournalRecovery(JournalRecoveryError::TooManyItems) => {
            "where a batch holds more items than its start marker says"
        }
        _ => "where a batch's checksum does not match",
    }
}

/// What an operator can do when comet refuses a data dir whose journal
/// does not read back.
const DAMAGED_ADVICE: &str =
    "restore the data dir from a backup, or move it aside to start with an empty one (without its state)";

/// Opens the database after fjall's recovery failed on an unreadable batch
/// ([`unreadable_batch`]) in the newest journal file, the one being written
/// when comet stopped: keeps the longest prefix of that file with which
/// fjall opens, which is every batch before the first unreadable one, and
/// drops the rest. Returns the database and the file it cut.
///
/// Batches after the unreadable one are dropped even when they read back:
/// they were written after it, and applying them without it would give a
/// state comet never had. So damage in the middle of the newest file
/// starts like damage at its end, with the state from before the damaged
/// write, as a crash at that write would have left it.
///
/// The file as it was is first copied and synced to
/// `<data dir>/corrupt/<name>.<unix time>` (its bytes up to the last
/// non-zero one: fjall preallocates journals with zeros), outside `db/`,
/// where fjall looks for journal files.
///
/// The prefix is found by bisection. fjall opens with the first `n` bytes
/// for every `n` up to the end of the first unreadable batch (a prefix that
/// ends inside a batch is cut back to the batch before, as after a torn
/// write) and fails for every longer one (it reads in order, so it meets
/// the same batch), so about log2 of the file's size opens find the
/// boundary: 26 for a full 64 MB journal, each replaying a prefix. Each
/// try first writes its prefix from memory, as fjall cuts the file while
/// recovering; a failed open releases fjall's lock and creates nothing.
///
/// When fjall fails even with the newest file empty, the unreadable batch
/// is in a sealed journal, whose writes were synced before the newest file
/// was started: not a torn tail. comet then refuses to start, with the
/// newest file put back as it was and no copy kept.
fn salvage_journal(
    dir: &Path,
    db_path: &Path,
    max_journal: u64,
    cause: &fjall::Error,
) -> Result<(Database, Keyspace, PathBuf), StoreError> {
    let journals = journal_files(db_path);
    let Some(newest) = journals.last().cloned() else {
        return Err(dir_error(db_path, format!("the journal does not read back ({cause}); {DAMAGED_ADVICE}")));
    };
    let len = std::fs::metadata(&newest).map_err(|e| dir_error(&newest, e))?.len();
    let bytes = read_head(&newest, data_end(&newest)).map_err(|e| dir_error(&newest, e))?;
    let copy = keep_copy(dir, &newest, &bytes).map_err(|e| {
        let cause = format!("cannot keep a copy of the damaged journal {}: {e}", newest.display());
        dir_error(&dir.join("corrupt"), cause)
    })?;
    // The search below rewrites the journal in place: a comet stopped in
    // the middle of it (killed, a power loss) would find the file cut at
    // some trial's length and start with it, having lost good batches
    // without a word. The marker makes the next start put the file back
    // from the copy first ([`resume_salvage`]).
    let marker = salvage_marker(dir);
    let noted = format!("{}\n{}\n", newest.display(), copy.display());
    std::fs::write(&marker, noted)
        .and_then(|()| File::open(dir.join("corrupt"))?.sync_all())
        .map_err(|e| dir_error(&marker, e))?;
    // Puts the newest file back as it was (zeros included) and drops the
    // copy, before refusing to start.
    let refuse = |cause: String| -> StoreError {
        let put_back = write_journal(&newest, &bytes).and_then(|()| {
            let f = std::fs::OpenOptions::new().write(true).open(&newest)?;
            f.set_len(len)?;
            f.sync_all()
        });
        match put_back {
            Ok(()) => {
                let _ = std::fs::remove_file(&marker);
                let _ = std::fs::remove_file(&copy);
                // Only when no earlier copy is in it.
                let _ = std::fs::remove_dir(dir.join("corrupt"));
                dir_error(db_path, cause)
            }
            Err(e) => dir_error(
                db_path,
                format!(
                    "{cause}; and {} could not be put back ({e}): a copy is in {}",
                    newest.display(),
                    copy.display()
                ),
            ),
        }
    };
    let opens = |n: usize| -> Result<bool, String> {
        write_journal(&newest, &bytes[..n]).map_err(|e| format!("cannot write {}: {e}", newest.display()))?;
        match open_database(db_path, max_journal) {
            Ok(_) => Ok(true),
            Err(e) if unreadable_batch(&e) => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    };
    match opens(0) {
        Ok(true) => {}
        Ok(false) => {
            let sealed: Vec<String> = journals[..journals.len() - 1]
                .iter()
                .map(|p| p.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()))
                .collect();
            return Err(refuse(format!(
                "the journal does not read back ({cause}) in a sealed file ({}), not in the newest, {}: a sealed journal holds writes that were synced, which comet does not drop; {DAMAGED_ADVICE}",
                sealed.join(", "),
                newest.display()
            )));
        }
        Err(e) => return Err(refuse(format!("{e}, reading back the damaged journal {}", newest.display()))),
    }
    // A failure that does not come back with the whole file (an I/O
    // error at the first open) cuts nothing.
    let whole = opens(bytes.len())
        .map_err(|e| refuse(format!("{e}, reading back the damaged journal {}", newest.display())))?;
    let (mut good, mut bad) = if whole { (bytes.len(), bytes.len()) } else { (0, bytes.len()) };
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        match opens(mid) {
            Ok(true) => good = mid,
            Ok(false) => bad = mid,
            Err(e) => return Err(refuse(format!("{e}, reading back the damaged journal {}", newest.display()))),
        }
    }
    let opened = write_journal(&newest, &bytes[..good])
        .map_err(|e| e.to_string())
        .and_then(|()| open_db(db_path, max_journal).map_err(|e| e.to_string()));
    let (db, state) = match opened {
        Ok(o) => o,
        Err(e) => return Err(refuse(format!("{e}, reading back the damaged journal {}", newest.display()))),
    };
    let _ = std::fs::remove_file(&marker);
    if whole {
        eprintln!(
            "comet: store: journal {} failed to read back once ({cause}) and whole the next time: nothing dropped; the file as it was is kept in {}",
            newest.display(),
            copy.display()
        );
        return Ok((db, state, newest));
    }
    let kept = std::fs::metadata(&newest).map_or(0, |m| m.len());
    eprintln!(
        "comet: store: journal {} does not read back from offset {kept}, {} (a crash can leave blocks of its last writes that never reached the disk): recovered every batch before it, dropped the {} bytes from offset {kept}; the file as it was is kept in {}",
        newest.display(),
        unreadable_what(cause),
        bytes.len() as u64 - kept,
        copy.display()
    );
    Ok((db, state, newest))
}

/// The journal files of the database at `db_path`, oldest first: fjall
/// names them `<number>.jnl` and writes to the highest number.
fn journal_files(db_path: &Path) -> Vec<PathBuf> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(db_path)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let id = name.to_str()?.strip_suffix(".jnl")?.parse().ok()?;
            Some((id, e.path()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

/// The first `n` bytes of a file.
fn read_head(path: &Path, n: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    File::open(path)?.take(n).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The file that says a journal salvage is under way: the journal's path
/// and its copy's, a line each.
fn salvage_marker(dir: &Path) -> PathBuf {
    dir.join("corrupt").join("salvaging")
}

/// Puts back the journal a salvage was rewriting when comet stopped (see
/// [`salvage_journal`]), from the copy the salvage kept, so that this start
/// salvages it again from the start; then removes the marker.
fn resume_salvage(dir: &Path) -> Result<(), StoreError> {
    let marker = salvage_marker(dir);
    let noted = match std::fs::read_to_string(&marker) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(dir_error(&marker, e)),
    };
    let mut lines = noted.lines();
    let (Some(journal), Some(copy)) = (lines.next(), lines.next()) else {
        return Err(dir_error(&marker, "it does not name a journal and its copy; remove it"));
    };
    let bytes = std::fs::read(copy).map_err(|e| dir_error(Path::new(copy), e))?;
    write_journal(Path::new(journal), &bytes).map_err(|e| dir_error(Path::new(journal), e))?;
    std::fs::remove_file(&marker).map_err(|e| dir_error(&marker, e))?;
    eprintln!(
        "comet: store: the salvage of journal {journal} was cut short; it is put back from {copy} and salvaged again"
    );
    Ok(())
}

/// Replaces a journal file's contents with `bytes`.
fn write_journal(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Copies a damaged journal's `bytes` to `<dir>/corrupt/<name>.<unix time>`
/// (never over an earlier copy) and syncs it; returns where.
fn keep_copy(dir: &Path, journal: &Path, bytes: &[u8]) -> std::io::Result<PathBuf> {
    let folder = dir.join("corrupt");
    std::fs::create_dir_all(&folder)?;
    let name = journal.file_name().map_or_else(|| "journal".into(), |n| n.to_string_lossy().into_owned());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut k = 0;
    let (mut f, path) = loop {
        let path = match k {
            0 => folder.join(format!("{name}.{now}")),
            _ => folder.join(format!("{name}.{now}-{k}")),
        };
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => break (f, path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => k += 1,
            Err(e) => return Err(e),
        }
    };
    f.write_all(bytes)?;
    f.sync_all()?;
    File::open(&folder)?.sync_all()?;
    Ok(path)
}

// The encoders write into buffers the caller reuses: fjall copies keys
// and values into its own memory anyway, so a fresh `Vec` per record would
// only add an allocation and a free.

fn user_key(k: &mut Vec<u8>, table: u8, dev: u32, uid: u64) -> &[u8] {
    k.clear();
    k.push(table);
    k.extend_from_slice(&dev.to_be_bytes());
    k.extend_from_slice(&uid.to_be_bytes());
    k
}

fn queue_key(k: &mut Vec<u8>, dev: u32, uid: u64, seq: u64) -> &[u8] {
    user_key(k, b'Q', dev, uid);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn text_key<'a>(k: &'a mut Vec<u8>, table: u8, dev: u32, text: &str) -> &'a [u8] {
    k.clear();
    k.push(table);
    k.extend_from_slice(&dev.to_be_bytes());
    k.extend_from_slice(text.as_bytes());
    k
}

fn history_key<'a>(k: &'a mut Vec<u8>, dev: u32, channel: &str, id: u64) -> &'a [u8] {
    k.clear();
    k.push(b'H');
    k.extend_from_slice(&dev.to_be_bytes());
    k.extend_from_slice(&(channel.len() as u16).to_be_bytes());
    k.extend_from_slice(channel.as_bytes());
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// A format-1 queue record's value (tests write format-1 stores with it).
#[cfg(test)]
fn queued_value<'a>(v: &'a mut Vec<u8>, m: &Queued) -> &'a [u8] {
    v.clear();
    v.extend_from_slice(&m.time.to_be_bytes());
    v.push(m.event().len() as u8);
    v.extend_from_slice(m.event().as_bytes());
    v.extend_from_slice(m.message().as_bytes());
    v
}

fn history_value<'a>(v: &'a mut Vec<u8>, e: &HistoryRecord) -> &'a [u8] {
    v.clear();
    v.extend_from_slice(&e.time.to_be_bytes());
    v.push(e.user_id.is_some() as u8);
    v.extend_from_slice(&e.user_id.unwrap_or(0).to_be_bytes());
    // Event names are at most 64 bytes at every edge; never let a longer
    // one wrap its two-byte length and corrupt the record.
    let mut elen = e.event.len().min(u16::MAX as usize);
    while !e.event.is_char_boundary(elen) {
        elen -= 1;
    }
    v.extend_from_slice(&(elen as u16).to_be_bytes());
    v.extend_from_slice(&e.event.as_bytes()[..elen]);
    v.extend_from_slice(e.message.as_bytes());
    v
}

/// Reads a key or value left to right; `None` when it is too short.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)?.try_into().ok().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_be_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.u64().map(|v| v as i64)
    }
    fn str(&mut self, n: usize) -> Option<&'a str> {
        std::str::from_utf8(self.take(n)?).ok()
    }
    fn rest(&mut self) -> Option<&'a str> {
        let n = self.0.len();
        self.str(n)
    }
}

/// Decodes one stored record into the change that recreates it.
fn decode(key: &[u8], value: &[u8]) -> Option<Change> {
    let mut k = Reader(key);
    let mut v = Reader(value);
    let table = k.u8()?;
    let dev = k.u32()?;
    Some(match table {
        b'K' => Change::Key { dev, uid: k.u64()?, key: Some(v.rest()?.into()) },
        b'D' => Change::Data { dev, uid: k.u64()?, data: Some(v.rest()?.into()) },
        b'T' => Change::LastOnline { dev, uid: k.u64()?, time: Some(v.i64()?) },
        b'R' => Change::Revoked { dev, token: k.rest()?.into(), on: true },
        b'Q' => {
            let (uid, seq) = (k.u64()?, k.u64()?);
            let time = v.i64()?;
            let elen = v.u8()? as usize;
            let event = v.str(elen)?;
            Change::QueuePut { dev, uid, seq, msg: Queued::new(time, event, v.rest()?).tagged(0) }
        }
        b'H' => {
            let clen = k.u16()? as usize;
            let channel: Arc<str> = k.str(clen)?.into();
            let id = k.u64()?;
            let time = v.i64()?;
            let has_user = v.u8()? == 1;
            let user = v.u64()?;
            let elen = v.u16()? as usize;
            let event = v.str(elen)?.to_string();
            let message = v.rest()?.to_string();
            let entry = HistoryRecord { id, time, event, message, user_id: has_user.then_some(user) };
            Change::HistoryPut { dev, channel, entry }
        }
        b'S' => Change::Setting { dev, channel: k.rest()?.into(), len: Some(v.u32()?) },
        _ => return None,
    })
}

impl Backend for FjallStore {
    fn apply(&mut self, group: u64, changes: &[Change]) -> Result<(), StoreError> {
        if self.qlog.is_none() {
            self.rebuild_qlog()?;
        }
        self.handles()?;
        let (Some((db, ks)), Some(ql)) = (self.inner.as_ref(), self.qlog.as_mut()) else {
            return Err(StoreError::Write("the store is closed".into()));
        };
        let mut batch = db.batch();
        let (k, v) = (&mut self.key, &mut self.value);
        ql.begin(group);
        for c in changes {
            match c {
                Change::Key { dev, uid, key: Some(t) } => batch.insert(ks, user_key(k, b'K', *dev, *uid), t.as_bytes()),
                Change::Key { dev, uid, key: None } => batch.remove(ks, user_key(k, b'K', *dev, *uid)),
                Change::Data { dev, uid, data: Some(t) } => {
                    batch.insert(ks, user_key(k, b'D', *dev, *uid), t.as_bytes())
                }
                Change::Data { dev, uid, data: None } => batch.remove(ks, user_key(k, b'D', *dev, *uid)),
                Change::LastOnline { dev, uid, time: Some(t) } => {
                    batch.insert(ks, user_key(k, b'T', *dev, *uid), &t.to_be_bytes()[..])
                }
                Change::LastOnline { dev, uid, time: None } => batch.remove(ks, user_key(k, b'T', *dev, *uid)),
                Change::Revoked { dev, token, on: true } => batch.insert(ks, text_key(k, b'R', *dev, token), &b""[..]),
                Change::Revoked { dev, token, on: false } => batch.remove(ks, text_key(k, b'R', *dev, token)),
                Change::QueuePut { dev, uid, seq, msg } => ql.put((*dev, *uid, *seq), msg),
                Change::QueueDel { dev, uid, seq, tag, bytes } => {
                    if ql.remove((*dev, *uid, *seq), *tag, *bytes) == Removed::OwnRecord {
                        batch.remove(ks, queue_key(k, *dev, *uid, *seq));
                    }
                }
                Change::HistoryPut { dev, channel, entry } => {
                    batch.insert(ks, history_key(k, *dev, channel, entry.id), history_value(v, entry))
                }
                Change::HistoryDel { dev, channel, id } => batch.remove(ks, history_key(k, *dev, channel, *id)),
                Change::Setting { dev, channel, len: Some(n) } => {
                    batch.insert(ks, text_key(k, b'S', *dev, channel), &n.to_be_bytes()[..])
                }
                Change::Setting { dev, channel, len: None } => batch.remove(ks, text_key(k, b'S', *dev, channel)),
            }
        }
        // A record read back to be rewritten; one that cannot be read stays.
        ql.finish(&mut |g| ks.get(qlog::log_key(g, true)).ok().flatten().map(|v| v.to_vec()));
        let out = &ql.out;
        for g in &out.delete_entries {
            batch.remove(ks, qlog::log_key(*g, true));
        }
        for g in &out.delete_removals {
            batch.remove(ks, qlog::log_key(*g, false));
        }
        if !out.entries.is_empty() {
            batch.insert(ks, qlog::log_key(out.group, true), &out.entries[..]);
        }
        if !out.removals.is_empty() {
            batch.insert(ks, qlog::log_key(out.group, false), &out.removals[..]);
        }
        batch.commit().map_err(|e| self.failed(&e))?;
        if let Some(q) = self.qlog.as_mut() {
            q.written();
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        let (db, _) = self.handles()?;
        db.persist(PersistMode::SyncAll).map_err(|e| self.failed(&e))
    }

    fn load(&mut self, sink: &mut dyn FnMut(Change)) -> Result<(), StoreError> {
        let path = self.path.clone();
        let (_, state) = self.handles()?;
        let mut loader = Loader::default();
        for kv in state.iter() {
            let (k, v) = kv.into_inner().map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                key: "?".into(),
                cause: io_cause(e),
            })?;
            if k.as_ref() == FORMAT_KEY {
                continue;
            }
            if matches!(k.first(), Some(b'L' | b'Q')) {
                read_queue_record(&mut loader, &k, &v, true).map_err(|key| corrupt(&path, &key))?;
                continue;
            }
            match decode(&k, &v) {
                Some(c) => sink(c),
                None => return Err(corrupt(&path, &k)),
            }
        }
        // Each user's queue from its oldest entry.
        let log = loader.finish(&mut |(dev, uid, seq), msg| sink(Change::QueuePut { dev, uid, seq, msg }));
        self.qlog = Some(log);
        Ok(())
    }

    fn disk_size(&self) -> u64 {
        self.inner.as_ref().map_or(0, |(db, _)| db.disk_space().unwrap_or(0))
    }

    fn next_group(&self) -> u64 {
        self.qlog.as_ref().map_or(1, QueueLog::next_group)
    }
}

/// The cause of a failed write, as an operator reads it.
fn write_cause(e: &fjall::Error) -> String {
    match e {
        fjall::Error::Io(io) => format!("cannot write the data dir: {io}"),
        other => format!("cannot write the data dir: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_round_trips_through_its_key_and_value() {
        let dir = std::env::temp_dir().join(format!("comet-store-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let changes = vec![
            Change::Key { dev: 1, uid: 7, key: Some("k".into()) },
            Change::Data { dev: 1, uid: 7, data: Some("{\"a\":1}".into()) },
            Change::LastOnline { dev: 0, uid: 9, time: Some(1_700_000_000) },
            Change::Revoked { dev: 2, token: "a.b.c".into(), on: true },
            Change::QueuePut { dev: 0, uid: 9, seq: 3, msg: Queued::new(5, "ev", "hello") },
            Change::HistoryPut {
                dev: 0,
                channel: "web_x".into(),
                entry: HistoryRecord { id: 11, time: 6, event: "e".into(), message: "m".into(), user_id: Some(4) },
            },
            Change::Setting { dev: 0, channel: "web_x".into(), len: Some(10) },
        ];
        {
            let mut s = FjallStore::open(&dir, 64 << 20).unwrap();
            s.apply(1, &changes).unwrap();
            let gone = Queued::new(5, "ev", "gone");
            let bytes = qlog::entry_len(&gone);
            s.apply(2, &[Change::QueuePut { dev: 0, uid: 9, seq: 4, msg: gone }]).unwrap();
            s.apply(3, &[Change::QueueDel { dev: 0, uid: 9, seq: 4, tag: 2, bytes }]).unwrap();
            s.sync().unwrap();
            assert!(matches!(FjallStore::open(&dir, 64 << 20), Err(StoreError::Locked { .. })));
        }
        let mut s = FjallStore::open(&dir, 64 << 20).unwrap();
        let mut got = Vec::new();
        s.load(&mut |c| got.push(c)).unwrap();
        for c in &changes {
            assert!(got.contains(c), "{c:?} not in {got:?}");
        }
        assert_eq!(got.len(), changes.len());
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_format_1_store_is_read_and_its_queue_records_removed_one_by_one() {
        let dir = std::env::temp_dir().join(format!("comet-store-unit-v1-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            // A format-1 store: its own record per queued message.
            let (db, ks) = open_db(&dir.join("db"), 64 << 20).unwrap();
            ks.insert(FORMAT_KEY, 1u32.to_be_bytes()).unwrap();
            let (mut k, mut v) = (Vec::new(), Vec::new());
            for seq in 0..3 {
                let m = Queued::new(5, "ev", &format!("old {seq}"));
                ks.insert(queue_key(&mut k, 0, 9, seq), queued_value(&mut v, &m)).unwrap();
            }
            db.persist(PersistMode::SyncAll).unwrap();
        }
        std::fs::create_dir_all(&dir).unwrap();
        let load = |s: &mut FjallStore| {
            let mut got = Vec::new();
            s.load(&mut |c| {
                if let Change::QueuePut { seq, msg, .. } = c {
                    got.push((seq, msg.message().to_string()));
                }
            })
            .unwrap();
            got
        };
        {
            let mut s = FjallStore::open(&dir, 64 << 20).unwrap();
            assert_eq!(load(&mut s), [(0, "old 0".into()), (1, "old 1".into()), (2, "old 2".into())]);
            // The oldest is delivered, one more is queued behind the rest.
            let group = s.next_group();
            s.apply(
                group,
                &[
                    Change::QueueDel { dev: 0, uid: 9, seq: 0, tag: 0, bytes: 0 },
                    Change::QueuePut { dev: 0, uid: 9, seq: 3, msg: Queued::new(6, "ev", "new 3") },
                ],
            )
            .unwrap();
            s.sync().unwrap();
        }
        let mut s = FjallStore::open(&dir, 64 << 20).unwrap();
        assert_eq!(load(&mut s), [(1, "old 1".into()), (2, "old 2".into()), (3, "new 3".into())]);
        let (_, ks) = s.inner.as_ref().unwrap();
        assert_eq!(ks.get(FORMAT_KEY).unwrap().unwrap().as_ref(), &FORMAT_VERSION.to_be_bytes()[..]);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn after_a_failed_write_the_queue_bookkeeping_is_rebuilt_from_the_disk() {
        let dir = std::env::temp_dir().join(format!("comet-store-unit-rebuild-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut s = FjallStore::open(&dir, 64 << 20).unwrap();
        s.load(&mut |_| {}).unwrap();
        let put = |seq| Change::QueuePut { dev: 0, uid: 1, seq, msg: Queued::new(1, "e", "m") };
        s.apply(1, &[put(0), put(1)]).unwrap();
        // As after a failed write: the bookkeeping is dropped.
        s.qlog = None;
        let bytes = qlog::entry_len(&Queued::new(1, "e", "m"));
        s.apply(2, &[Change::QueueDel { dev: 0, uid: 1, seq: 0, tag: 1, bytes }]).unwrap();
        s.sync().unwrap();
        drop(s);
        let mut s = FjallStore::open(&dir, 64 << 20).unwrap();
        let mut got = Vec::new();
        s.load(&mut |c| got.push(c)).unwrap();
        assert_eq!(got, [put(1)], "the removal made after the rebuild reached the disk");
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
