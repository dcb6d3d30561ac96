//! Durable state against the real binary on a real disk: SIGKILL and
//! restart, a kill in the middle of a pipelined batch, a full disk, a torn
//! journal, garbage in a journal, two processes on one data dir.

mod common;

use std::fs::File;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{Client, Server, eventually, packet, raw_login};
use mysql::prelude::Queryable;
use serde_json::json;

/// A fresh data dir under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("comet-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(dir: &TempDir, extra: &[&str]) -> Server {
    let mut args = vec!["--shards", "2", "--password", "pw", "--data-dir", dir.path()];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn kill(mut s: Server) -> Vec<String> {
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    s.drain_log()
}

fn db(s: &Server) -> mysql::Conn {
    let url = format!("mysql://root:pw@{}/CometQL_v1", s.backend);
    mysql::Conn::new(mysql::Opts::from_url(&url).unwrap()).expect("mysql connect")
}

fn user(s: &Server, uid: u64, key: &str) -> (Client, serde_json::Value) {
    let mut c = Client::connect(&s.url(&format!("sesion={key}&myid={uid}&devid=0&v=4.08&uuid=d{uid}&api=js")));
    let info = c.recv();
    assert_eq!(info["event"], "serverInfo", "{info}");
    (c, info)
}

#[test]
fn everything_survives_sigkill_and_queued_messages_are_delivered_once() {
    let dir = TempDir::new("sigkill");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let token = comet::users::jwt::sign(&json!({"user_id": 31, "exp": now + 600}), b"pw0");
    let s = start(&dir, &[]);
    let mut d = db(&s);
    set_keys(&mut d, 1..=20);
    d.query_drop("INSERT INTO users_data (id, data) VALUES (3, 'three'), (4, 'four')").unwrap();
    d.query_drop(format!("INSERT INTO revoked_tokens (token) VALUES ('{token}')")).unwrap();
    for i in 0..3 {
        d.query_drop(format!("INSERT INTO users_messages (id, event, message) VALUES (5, 'ev', 'five{i}')")).unwrap();
        d.query_drop(format!("INSERT INTO users_messages (id, event, message) VALUES (6, 'ev', 'six{i}')")).unwrap();
    }
    d.query_drop("INSERT INTO pipes_settings (name, length) VALUES ('web_h', 10)").unwrap();
    for i in 0..3 {
        d.query_drop(format!("INSERT INTO pipes_messages (name, event, message) VALUES ('web_h', 'e', 'h{i}')"))
            .unwrap();
    }
    // A user that comes and goes has a last-online time.
    let (c, _) = user(&s, 7, "key7");
    drop(c);
    assert!(eventually(5, || {
        let t: Option<i64> = d.query_first("SELECT time FROM users_time WHERE id = 7").unwrap();
        t.unwrap_or(0) > 0
    }));
    // Another write after the offline event on the same user: once it is
    // acknowledged, the offline time is on disk too (one lane, in order).
    d.query_drop("INSERT INTO users_data (id, data) VALUES (7, 'seven')").unwrap();
    drop(d);
    kill(s);

    let s = start(&dir, &[]);
    let mut d = db(&s);
    let keys: Vec<(u64, String)> =
        d.query("SELECT id, hash FROM users_auth WHERE id IN (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20)").unwrap();
    assert_eq!(keys.len(), 20, "{keys:?}");
    assert!(keys.contains(&(13, "key13".to_string())));
    let data: Vec<(u64, String)> = d.query("SELECT id, data FROM users_data WHERE id IN (3, 4, 7)").unwrap();
    assert_eq!(data.len(), 3, "{data:?}");
    let tokens: Vec<String> = d.query("SELECT token FROM revoked_tokens").unwrap();
    assert_eq!(tokens, vec![token.clone()]);
    let (_, info) = user(&s, 31, &token);
    assert_eq!(info["authorized"], false, "the revoked token stays revoked");
    let history: Vec<String> = d.query("SELECT message FROM pipes_messages WHERE name = 'web_h'").unwrap();
    assert_eq!(history, ["h0", "h1", "h2"]);
    let settings: Vec<(String, u32)> = d.query("SELECT name, length FROM pipes_settings").unwrap();
    assert_eq!(settings, [("web_h".to_string(), 10)]);
    let t: Option<i64> = d.query_first("SELECT time FROM users_time WHERE id = 7").unwrap();
    assert!(t.unwrap_or(0) > now - 60, "{t:?}");
    let queued: Vec<(u64, String)> = d.query("SELECT id, message FROM users_messages WHERE id IN (5, 6)").unwrap();
    assert_eq!(queued.len(), 6, "{queued:?}");
    // User 5 gets its queue once; another write on it after delivery.
    let (mut c5, info) = user(&s, 5, "key5");
    assert_eq!(info["authorized"], true);
    for i in 0..3 {
        let m = c5.recv();
        assert_eq!((m["data"].as_str(), m["fromQueue"].as_bool()), (Some(format!("five{i}").as_str()), Some(true)));
    }
    drop(c5);
    drop(d);
    kill(s);

    let s = start(&dir, &[]);
    let mut d = db(&s);
    let left: Vec<(u64, String)> = d.query("SELECT id, message FROM users_messages WHERE id IN (5, 6)").unwrap();
    assert_eq!(left.len(), 3, "user 5's delivered queue is gone, user 6's is there: {left:?}");
    assert!(left.iter().all(|(u, _)| *u == 6));
    let (mut c5, _) = user(&s, 5, "key5");
    c5.expect_silence(300);
    let (mut c6, _) = user(&s, 6, "key6");
    assert_eq!(c6.recv()["data"], "six0");
    // History trimmed or deleted leaves the disk too.
    d.query_drop("DELETE FROM pipes_messages WHERE name = 'web_h'").unwrap();
    drop(d);
    kill(s);
    let s = start(&dir, &[]);
    let mut d = db(&s);
    let history: Vec<String> = d.query("SELECT message FROM pipes_messages WHERE name = 'web_h'").unwrap();
    assert!(history.is_empty(), "{history:?}");
    // A graceful stop keeps everything as well.
    s.sigterm();
    drop(d);
}

/// Reads one OK or ERR answer; true for OK.
fn read_ok(t: &mut std::net::TcpStream) -> Option<bool> {
    let mut h = [0u8; 4];
    std::io::Read::read_exact(t, &mut h).ok()?;
    let mut p = vec![0u8; u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize];
    std::io::Read::read_exact(t, &mut p).ok()?;
    Some(p.first() == Some(&0))
}

#[test]
fn every_acknowledged_insert_survives_a_sigkill_in_the_middle_of_a_pipeline() {
    let dir = TempDir::new("pipeline");
    let s = start(&dir, &["--offline-queue-size", "10000"]);
    let (mut t, ok) = raw_login(&s, "pw");
    assert_eq!(ok[0], 0);
    let mut out = Vec::new();
    for i in 0..3000 {
        let mut p = vec![0x03];
        p.extend_from_slice(
            format!("INSERT INTO users_messages (id, event, message) VALUES (42, 'e', 'm{i}')").as_bytes(),
        );
        packet(&mut out, 0, &p);
    }
    let mut writer = t.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&out);
    });
    let mut acked = 0;
    while acked < 1000 {
        assert_eq!(read_ok(&mut t), Some(true), "answer {acked}");
        acked += 1;
    }
    let pid = s.child.id() as i32;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    while let Some(true) = read_ok(&mut t) {
        acked += 1;
    }
    let _ = sender.join();
    kill(s);
    let s = start(&dir, &["--offline-queue-size", "10000"]);
    let mut d = db(&s);
    let stored: Vec<String> = d.query("SELECT message FROM users_messages WHERE id = 42").unwrap();
    assert!(stored.len() >= acked, "{} stored, {acked} acknowledged", stored.len());
    for (i, m) in stored.iter().take(acked).enumerate() {
        assert_eq!(m, &format!("m{i}"));
    }
    eprintln!("{acked} acknowledged before the kill, {} stored", stored.len());
}

/// Starts comet on `dir` expecting it to refuse; returns what it logged.
fn refused_start(dir: &TempDir) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_comet"))
        .args(["--frontend", "127.0.0.1:0", "--backend", "127.0.0.1:0", "--api", "off", "--data-dir", dir.path()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_second_comet_on_the_same_data_dir_refuses_naming_the_dir() {
    let dir = TempDir::new("twice");
    let _first = start(&dir, &[]);
    let err = refused_start(&dir);
    assert!(err.contains(dir.path()) && err.contains("in use by another comet"), "{err}");
}

#[test]
fn an_unusable_data_dir_refuses_to_start_naming_the_path() {
    let file = TempDir::new("notadir");
    std::fs::write(&file.0, b"a file").unwrap();
    let bad = format!("{}/sub", file.path());
    let out = Command::new(env!("CARGO_BIN_EXE_comet"))
        .args(["--frontend", "127.0.0.1:0", "--backend", "127.0.0.1:0", "--data-dir", &bad])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&bad), "{err}");
    let _ = std::fs::remove_file(&file.0);
}

/// The journal files of a data dir, largest last.
fn journals(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "jnl") {
                out.push(p);
            }
        }
    }
    out.sort_by_key(|p| std::fs::metadata(p).map_or(0, |m| m.len()));
    out
}

#[test]
fn a_torn_journal_tail_is_recovered_and_logged() {
    let dir = TempDir::new("torn");
    let s = start(&dir, &[]);
    let mut d = db(&s);
    for uid in 1..=50 {
        d.query_drop(format!("INSERT INTO users_data (id, data) VALUES ({uid}, '{}')", "x".repeat(200))).unwrap();
    }
    drop(d);
    kill(s);
    let jnl = journals(&dir.0).pop().expect("a journal file");
    // Journals are preallocated with zeros: the data ends at the last
    // non-zero byte. Cut the last write in half, as a crash during it would.
    let bytes = std::fs::read(&jnl).unwrap();
    let end = bytes.iter().rposition(|&b| b != 0).unwrap() + 1;
    std::fs::OpenOptions::new().write(true).open(&jnl).unwrap().set_len(end as u64 - 100).unwrap();
    let s = start(&dir, &[]);
    let log = s.startup.clone();
    let mut d = db(&s);
    let data: Vec<(u64, String)> = d
        .query(format!(
            "SELECT id, data FROM users_data WHERE id IN ({})",
            (1..=50).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
        ))
        .unwrap();
    assert!((45..50).contains(&data.len()), "all but the torn last batch: {}", data.len());
    assert!(log.iter().any(|l| l.contains("torn tail") && l.contains("dropped")), "{log:#?}");
    // It writes again.
    d.query_drop("INSERT INTO users_data (id, data) VALUES (99, 'after')").unwrap();
}

/// Sets key `key<uid>` for each user, one statement (one write batch) each.
fn set_keys(d: &mut mysql::Conn, uids: std::ops::RangeInclusive<u64>) {
    for uid in uids {
        d.query_drop(format!("INSERT INTO users_auth (id, hash) VALUES ({uid}, 'key{uid}')")).unwrap();
    }
}

/// Which of `uids` have a key, in order (rows come from the users' shards
/// in no set order).
fn keys_among(d: &mut mysql::Conn, uids: std::ops::RangeInclusive<u64>) -> Vec<u64> {
    let list = uids.map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let mut keys: Vec<u64> = d.query(format!("SELECT id FROM users_auth WHERE id IN ({list})")).unwrap();
    keys.sort();
    keys
}

/// The journal file fjall writes to: the highest-numbered `<n>.jnl` in
/// `db/`.
fn newest_journal(dir: &Path) -> PathBuf {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir.join("db"))
        .unwrap()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.strip_suffix(".jnl")?.parse().ok()?, e.path())))
        .collect();
    found.sort();
    found.pop().expect("a journal file").1
}

/// Overwrites the `n` bytes of `jnl` that end `back` bytes before the end
/// of `text` (a value the test wrote: the journal is not compressed) with
/// pseudo-random bytes, as a crash can leave blocks of a write that never
/// reached the disk. The damage stays inside that one batch's value, so
/// its end marker still parses and its checksum fails: what fjall's own
/// recovery refuses (checked here, so the test is about that case).
/// Returns the offset of the damage and the bytes written there.
fn damage(dir: &TempDir, jnl: &Path, text: &str, back: usize, n: usize) -> (usize, Vec<u8>) {
    use std::os::unix::fs::FileExt;
    let bytes = std::fs::read(jnl).unwrap();
    let start = bytes.windows(text.len()).position(|w| w == text.as_bytes()).expect("the value in the journal");
    let at = start + text.len() - back - n;
    let garbage: Vec<u8> = noise(n, 0x9E37_79B9_7F4A_7C15).bytes().map(|b| b.wrapping_mul(37) ^ 0xA5).collect();
    std::fs::OpenOptions::new().write(true).open(jnl).unwrap().write_all_at(&garbage, at as u64).unwrap();
    let err = fjall::Database::builder(dir.0.join("db")).open().err();
    assert!(
        matches!(err, Some(fjall::Error::JournalRecovery(fjall::JournalRecoveryError::ChecksumMismatch))),
        "fjall alone refuses the damaged journal: {err:?}"
    );
    (at, garbage)
}

/// How many bytes a salvage log line says were dropped, and from which
/// offset.
fn dropped_from(line: &str) -> (u64, u64) {
    let num = |after: &str| -> u64 {
        let rest = &line[line.find(after).unwrap_or_else(|| panic!("{after:?} in {line}")) + after.len()..];
        rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    (num("dropped the "), num("from offset "))
}

/// The copies of damaged journals comet kept.
fn corrupt_copies(dir: &TempDir) -> Vec<PathBuf> {
    std::fs::read_dir(dir.0.join("corrupt")).map_or_else(|_| Vec::new(), |rd| rd.flatten().map(|e| e.path()).collect())
}

/// A salvage rewrites the newest journal in place while it searches: a
/// comet stopped in the middle (killed, a power loss) must not start the
/// next time with the file cut at a trial's length, which opens cleanly
/// and loses good batches without a word. Its marker makes the next start
/// put the file back from the copy and salvage it again.
#[test]
fn a_salvage_cut_short_is_put_back_and_done_again_at_the_next_start() {
    let dir = TempDir::new("salvage-cut");
    let s = start(&dir, &[]);
    let mut d = db(&s);
    set_keys(&mut d, 1..=20);
    let last = noise(2000, 11);
    d.query_drop(format!("INSERT INTO users_data (id, data) VALUES (99, '{last}')")).unwrap();
    drop(d);
    kill(s);
    let jnl = newest_journal(&dir.0);
    damage(&dir, &jnl, &last, 0, 200);
    // What a salvage leaves when it is killed after its copy and marker,
    // in the middle of its search: the journal cut short.
    let bytes = std::fs::read(&jnl).unwrap();
    let corrupt = dir.0.join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    let copy = corrupt.join(format!("{}.1", jnl.file_name().unwrap().to_str().unwrap()));
    std::fs::write(&copy, &bytes).unwrap();
    std::fs::write(corrupt.join("salvaging"), format!("{}\n{}\n", jnl.display(), copy.display())).unwrap();
    std::fs::write(&jnl, &bytes[..64]).unwrap();

    let s = start(&dir, &[]);
    assert!(
        s.startup.iter().any(|l| l.contains("was cut short") && l.contains(&*copy.to_string_lossy())),
        "{:#?}",
        s.startup
    );
    assert!(s.startup.iter().any(|l| l.contains("does not read back")), "salvaged again: {:#?}", s.startup);
    assert!(!corrupt.join("salvaging").exists());
    let mut d = db(&s);
    assert_eq!(keys_among(&mut d, 1..=20), (1..=20).collect::<Vec<u64>>(), "every batch before the damage is back");
}

#[test]
fn garbage_at_the_end_of_the_newest_journal_is_dropped_logged_and_kept_aside() {
    let dir = TempDir::new("garbage-tail");
    let s = start(&dir, &[]);
    let mut d = db(&s);
    set_keys(&mut d, 1..=20);
    for i in 0..3 {
        d.query_drop(format!("INSERT INTO users_messages (id, event, message) VALUES (5, 'ev', 'five{i}')")).unwrap();
    }
    d.query_drop("INSERT INTO pipes_settings (name, length) VALUES ('web_h', 10)").unwrap();
    d.query_drop("INSERT INTO pipes_messages (name, event, message) VALUES ('web_h', 'e', 'h0')").unwrap();
    // Everything above is acknowledged, so synced: the last write is a
    // batch of its own, the one the crash damages.
    let last = noise(2000, 7);
    d.query_drop(format!("INSERT INTO users_data (id, data) VALUES (99, '{last}')")).unwrap();
    drop(d);
    kill(s);
    let jnl = newest_journal(&dir.0);
    // The last 200 bytes of the value, just before the batch's end marker.
    let (at, garbage) = damage(&dir, &jnl, &last, 0, 200);

    let s = start(&dir, &[]);
    let line = s.startup.iter().find(|l| l.contains("does not read back")).cloned();
    let line = line.unwrap_or_else(|| panic!("the drop is logged: {:#?}", s.startup));
    let copies = corrupt_copies(&dir);
    assert_eq!(copies.len(), 1, "{copies:?}");
    let name = jnl.file_name().unwrap().to_str().unwrap();
    assert!(line.starts_with("comet: store: journal ") && line.contains(name), "{line}");
    assert!(line.contains(&format!("kept in {}", copies[0].display())), "{line}");
    let (dropped, from) = dropped_from(&line);
    assert!(from as usize <= at && from + dropped >= (at + 200) as u64, "{line}, damage at {at}");
    // The copy is the journal as the crash left it.
    let copy = std::fs::read(&copies[0]).unwrap();
    assert_eq!(&copy[at..at + 200], &garbage[..]);
    assert_eq!(copy.len() as u64, from + dropped, "the copy holds the journal up to the end of its data");

    let mut d = db(&s);
    let keys = keys_among(&mut d, 1..=20);
    assert_eq!(keys.len(), 20, "{keys:?}");
    let queued: Vec<String> = d.query("SELECT message FROM users_messages WHERE id = 5").unwrap();
    assert_eq!(queued, ["five0", "five1", "five2"]);
    let history: Vec<String> = d.query("SELECT message FROM pipes_messages WHERE name = 'web_h'").unwrap();
    assert_eq!(history, ["h0"]);
    // The damaged batch is gone whole, not read half.
    let data: Option<String> = d.query_first("SELECT data FROM users_data WHERE id = 99").unwrap();
    assert_eq!(data, None);
    // It writes again, and the next start finds nothing to drop.
    d.query_drop("INSERT INTO users_data (id, data) VALUES (98, 'after')").unwrap();
    drop(d);
    kill(s);
    let s = start(&dir, &[]);
    assert!(!s.startup.iter().any(|l| l.contains("does not read back") || l.contains("torn")), "{:#?}", s.startup);
    let mut d = db(&s);
    let after: Option<String> = d.query_first("SELECT data FROM users_data WHERE id = 98").unwrap();
    assert_eq!(after.as_deref(), Some("after"));
    let queued: Vec<String> = d.query("SELECT message FROM users_messages WHERE id = 5").unwrap();
    assert_eq!(queued.len(), 3);
}

#[test]
fn garbage_in_the_middle_of_the_newest_journal_keeps_every_batch_before_it() {
    // Batches after the damaged one read back, but are dropped with it:
    // applied without it they would give a state comet never had
    // (`salvage_journal` in src/store/fjall.rs).
    let dir = TempDir::new("garbage-middle");
    let s = start(&dir, &[]);
    let mut d = db(&s);
    set_keys(&mut d, 1..=10);
    let middle = noise(2000, 11);
    d.query_drop(format!("INSERT INTO users_data (id, data) VALUES (97, '{middle}')")).unwrap();
    set_keys(&mut d, 11..=20);
    d.query_drop("INSERT INTO users_messages (id, event, message) VALUES (6, 'ev', 'six')").unwrap();
    drop(d);
    kill(s);
    let jnl = newest_journal(&dir.0);
    let (at, _) = damage(&dir, &jnl, &middle, 500, 200);

    let s = start(&dir, &[]);
    let line = s.startup.iter().find(|l| l.contains("does not read back")).cloned();
    let line = line.unwrap_or_else(|| panic!("the drop is logged: {:#?}", s.startup));
    let (_, from) = dropped_from(&line);
    assert!((from as usize) < at, "{line}, damage at {at}");
    assert_eq!(corrupt_copies(&dir).len(), 1);
    let mut d = db(&s);
    let keys = keys_among(&mut d, 1..=20);
    assert_eq!(keys, (1..=10).collect::<Vec<u64>>(), "every batch before the damaged one, none after");
    let data: Option<String> = d.query_first("SELECT data FROM users_data WHERE id = 97").unwrap();
    assert_eq!(data, None);
    let queued: Vec<String> = d.query("SELECT message FROM users_messages WHERE id = 6").unwrap();
    assert!(queued.is_empty(), "{queued:?}");
    d.query_drop("INSERT INTO users_auth (id, hash) VALUES (11, 'again')").unwrap();
}

#[test]
fn garbage_in_a_sealed_journal_refuses_to_start_saying_what_to_do() {
    let dir = TempDir::new("garbage-sealed");
    let s = start(&dir, &[]);
    let mut d = db(&s);
    d.query_drop("INSERT INTO users_auth (id, hash) VALUES (1, 'key1')").unwrap();
    let last = noise(2000, 13);
    d.query_drop(format!("INSERT INTO users_data (id, data) VALUES (1, '{last}')")).unwrap();
    drop(d);
    kill(s);
    let jnl = newest_journal(&dir.0);
    damage(&dir, &jnl, &last, 0, 200);
    // fjall starts a new journal file, preallocated with zeros, when it
    // seals one: the damaged file is now a sealed journal, written (and
    // synced) before the newest.
    let n: u64 = jnl.file_stem().unwrap().to_str().unwrap().parse().unwrap();
    let next = jnl.with_file_name(format!("{}.jnl", n + 1));
    File::create(&next).unwrap().set_len(64 << 20).unwrap();
    let before = std::fs::read(&jnl).unwrap();
    let err = refused_start(&dir);
    let name = jnl.file_name().unwrap().to_str().unwrap();
    assert!(err.contains(dir.path()) && err.contains("sealed") && err.contains(name), "{err}");
    assert!(err.contains("restore the data dir from a backup") && err.contains("move it aside"), "{err}");
    // The dir is left as it was.
    assert_eq!(std::fs::read(&jnl).unwrap(), before);
    assert_eq!(std::fs::metadata(&next).unwrap().len(), 64 << 20);
    assert!(!dir.0.join("corrupt").exists(), "{:?}", corrupt_copies(&dir));
}

#[test]
fn a_full_disk_gives_errors_not_a_crash_and_writes_resume_when_space_returns() {
    let dir = TempDir::new("full");
    let exe = env!("CARGO_BIN_EXE_comet");
    let mut cmd = Command::new(exe);
    cmd.args(["--frontend", "127.0.0.1:0", "--backend", "127.0.0.1:0", "--shards", "2", "--password", "pw"]);
    cmd.args(["--data-dir", dir.path(), "--node-name", "test-node"]);
    cmd.args(["--offline-queue-size", "100000", "--max-query-size", "4194304"]);
    // SAFETY: signal(2) in the forked child before exec: no allocation,
    // no lock. SIGXFSZ is ignored so that a write over the file size limit
    // fails (EFBIG) instead of killing the process.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let s = Server::spawn_cmd(cmd);
    let mut d = db(&s);
    // The disk fills: a file size limit, set on the running process, is
    // what a full disk looks like to the writer (no write past 2 MiB of any
    // file, EFBIG where a full disk gives ENOSPC).
    let set_limit = |bytes: u64| {
        let lim = libc::rlimit { rlim_cur: bytes, rlim_max: libc::RLIM_INFINITY };
        // SAFETY: prlimit(2) on our own child's pid with a valid struct.
        let rc = unsafe { libc::prlimit(s.child.id() as i32, libc::RLIMIT_FSIZE, &lim, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    };
    set_limit(2 << 20);
    let mut watcher = s.client("w");
    watcher.subscribe(&["web_live"]);
    // Incompressible text (the journal compresses).
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let big: String = (0..60_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (b'a' + (x % 26) as u8) as char
        })
        .collect();
    let mut failed = None;
    for i in 0..40 {
        let rows: Vec<String> = (0..10).map(|j| format!("(8, 'e', '{big}{i}.{j}')")).collect();
        match d.query_drop(format!("INSERT INTO users_messages (id, event, message) VALUES {}", rows.join(", "))) {
            Ok(()) => {}
            Err(e) => {
                failed = Some(e.to_string());
                break;
            }
        }
    }
    let failed = failed.expect("a write fails when the disk is full");
    assert!(failed.contains("File too large") && failed.contains("not stored"), "{failed}");
    assert!(s.metric("comet_store_errors_total") > 0);
    assert_eq!(s.metric("comet_store_down"), 0, "a full disk is not a dead storage thread");
    // Deliveries to online users go on.
    d.query_drop("INSERT INTO pipes_messages (name, event, message) VALUES ('web_live', 'e', 'still here')").unwrap();
    assert_eq!(watcher.recv()["data"], "still here");
    // Space returns.
    set_limit(libc::RLIM_INFINITY);
    assert!(eventually(10, || d.query_drop("INSERT INTO users_data (id, data) VALUES (8, 'back')").is_ok()));
    let log = s.drain_log();
    assert!(log.iter().any(|l| l.contains("File too large")), "{log:#?}");
    kill(s);
    let s = start(&dir, &[]);
    let mut d = db(&s);
    let back: Option<String> = d.query_first("SELECT data FROM users_data WHERE id = 8").unwrap();
    assert_eq!(back.as_deref(), Some("back"));
}

#[test]
fn async_durability_loses_nothing_when_the_process_is_killed() {
    let dir = TempDir::new("async");
    let s = start(&dir, &["--durability", "async"]);
    let mut d = db(&s);
    for uid in 1..=30 {
        d.query_drop(format!("INSERT INTO users_auth (id, hash) VALUES ({uid}, 'k{uid}')")).unwrap();
    }
    drop(d);
    kill(s);
    let s = start(&dir, &["--durability", "async"]);
    let mut d = db(&s);
    let n: Vec<u64> = d.query("SELECT id FROM users_auth WHERE id IN (1, 15, 30)").unwrap();
    assert_eq!(n.len(), 3, "{n:?}");
}

#[test]
fn a_store_of_a_newer_format_refuses_to_start() {
    let dir = TempDir::new("newer");
    kill(start(&dir, &[]));
    {
        let db = fjall::Database::builder(dir.0.join("db")).open().unwrap();
        let state = db.keyspace("state", fjall::KeyspaceCreateOptions::default).unwrap();
        state.insert(b"\0format", 99u32.to_be_bytes()).unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let err = refused_start(&dir);
    assert!(err.contains("newer comet") && err.contains("format 99") && err.contains(dir.path()), "{err}");
}

#[test]
fn a_backend_outrunning_the_disk_is_paused_by_the_mail_limit_and_nothing_is_lost() {
    // --mail-limit also bounds the changes waiting for the storage thread:
    // with the smallest one (1 MiB) and 60 KB messages the shard stops
    // reading the flooding connection, and resumes each time the storage
    // thread caught up.
    let dir = TempDir::new("lane");
    // Whether the lane fills depends on which is faster, the disk or the
    // shard parsing 60 KB queries, and a busy machine slows the shard: the
    // debug build's slow-disk hook makes each group commit take 100 ms more.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_comet"));
    cmd.args(["--frontend", "127.0.0.1:0", "--backend", "127.0.0.1:0", "--api", "off", "--shards", "2"])
        .args(["--password", "pw", "--data-dir", dir.path(), "--mail-limit", "1048576"])
        .args(["--offline-queue-size", "10000"])
        // Queues of 60 KB messages: room for them all in bytes (half of
        // --outbound-limit), so that every one is kept.
        .args(["--outbound-limit", "1073741824"])
        .env("COMET_TEST_SLOW_SYNC_MS", "100");
    let s = Server::spawn_cmd(cmd);
    let (mut t, ok) = raw_login(&s, "pw");
    assert_eq!(ok[0], 0);
    let text = "z".repeat(60_000);
    let n = 400;
    // Send rounds of 24 MB until the bound was reached, at most five.
    let mut rounds = 0;
    while rounds < 5 {
        rounds += 1;
        let mut out = Vec::new();
        for i in 0..n {
            let mut p = vec![0x03];
            p.extend_from_slice(
                format!("INSERT INTO users_messages (id, event, message) VALUES ({}, 'e', '{text}{i}')", i % 7 + 1)
                    .as_bytes(),
            );
            packet(&mut out, 0, &p);
        }
        let mut writer = t.try_clone().unwrap();
        let sender = std::thread::spawn(move || writer.write_all(&out).is_ok());
        for i in 0..n {
            assert_eq!(read_ok(&mut t), Some(true), "round {rounds}, answer {i}");
        }
        assert!(sender.join().unwrap());
        if s.metric("comet_store_congestions_total") > 0 {
            break;
        }
    }
    assert!(s.metric("comet_store_congestions_total") > 0, "the bound was reached in {rounds} rounds");
    for shard in 0..2 {
        let peak = s.metric(&format!("comet_store_lane_peak_bytes{{shard=\"{shard}\"}}"));
        assert!(peak <= (1 << 20) + 128 * 1024, "shard {shard}'s storage lane held {peak} bytes");
    }
    let mut d = db(&s);
    let ids = "1, 2, 3, 4, 5, 6, 7";
    let got: Vec<u64> = d.query(format!("SELECT id FROM users_messages WHERE id IN ({ids})")).unwrap();
    assert_eq!(got.len(), n * rounds);
    drop(d);
    kill(s);
    let s = start(&dir, &["--offline-queue-size", "10000"]);
    let mut d = db(&s);
    let got: Vec<u64> = d.query(format!("SELECT id FROM users_messages WHERE id IN ({ids})")).unwrap();
    assert_eq!(got.len(), n * rounds, "all of them on disk");
}

/// `n` bytes of text that does not compress (the journal compresses).
fn noise(n: usize, seed: u64) -> String {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (b'a' + (x % 26) as u8) as char
        })
        .collect()
}

#[test]
fn statements_arriving_as_mail_from_another_shard_respect_the_storage_lane_bound() {
    // Backend connections on shard 0 flood private messages to users whose
    // home is shard 1: every statement reaches shard 1 as mail and is
    // written from there. Shard 1's lane to the storage thread must stay
    // within --mail-limit (plus the one statement that crossed it), as for
    // its own clients: it stops taking mail while the lane is full.
    let dir = TempDir::new("mail-lane");
    let limit: i64 = 1 << 20;
    // --outbound-limit: room in bytes for every queued 60 KB message.
    let args = ["--mail-limit", "1048576", "--offline-queue-size", "100000", "--outbound-limit", "1073741824"];
    let s = start(&dir, &args);
    let on_shard_1: Vec<u64> = (1..).filter(|&u| comet::shard::home_shard(0, u, 2) == 1).take(7).collect();
    let mut flooders = Vec::new();
    let mut others = Vec::new();
    while flooders.len() < 3 {
        assert!(others.len() < 60, "no backend connection lands on shard 0");
        let before = s.metric("comet_cometql_connections{shard=\"0\"}");
        let (t, ok) = raw_login(&s, "pw");
        assert_eq!(ok[0], 0);
        if s.metric("comet_cometql_connections{shard=\"0\"}") > before {
            flooders.push(t);
        } else {
            others.push(t);
        }
    }
    let n = 300;
    let text = noise(60_000, 0x2545_F491_4F6C_DD1D);
    let mut rounds = 0;
    while rounds < 5 {
        rounds += 1;
        let mut threads = Vec::new();
        for (c, t) in flooders.iter().enumerate() {
            let mut out = Vec::new();
            for i in 0..n {
                let uid = on_shard_1[i % on_shard_1.len()];
                let mut p = vec![0x03];
                p.extend_from_slice(
                    format!("INSERT INTO users_messages (id, event, message) VALUES ({uid}, 'e', '{text}{c}.{i}')")
                        .as_bytes(),
                );
                packet(&mut out, 0, &p);
            }
            let mut writer = t.try_clone().unwrap();
            let mut reader = t.try_clone().unwrap();
            threads.push(std::thread::spawn(move || {
                let sender = std::thread::spawn(move || writer.write_all(&out).is_ok());
                let oks = (0..n).filter(|_| read_ok(&mut reader) == Some(true)).count();
                assert!(sender.join().unwrap());
                oks
            }));
        }
        for t in threads {
            assert_eq!(t.join().unwrap(), n, "round {rounds}: every INSERT answered OK");
        }
        if s.metric("comet_store_congestions_total{shard=\"1\"}") > 0 {
            break;
        }
    }
    let peak = s.metric("comet_store_lane_peak_bytes{shard=\"1\"}");
    assert!(s.metric("comet_store_congestions_total{shard=\"1\"}") > 0, "the bound was reached in {rounds} rounds");
    assert_eq!(s.metric("comet_store_lane_peak_bytes{shard=\"0\"}"), 0, "shard 0 wrote nothing itself");
    assert!(peak <= limit + 128 * 1024, "shard 1's storage lane held {peak} bytes, over the limit {limit}");
    let mut d = db(&s);
    let ids: Vec<String> = on_shard_1.iter().map(u64::to_string).collect();
    let got: Vec<u64> = d.query(format!("SELECT id FROM users_messages WHERE id IN ({})", ids.join(", "))).unwrap();
    assert_eq!(got.len(), n * rounds * flooders.len());
}
