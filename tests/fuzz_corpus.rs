//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the
//! same bodies the cargo-fuzz targets run (`fuzz/bodies/<target>.rs`), so CI
//! checks every input a fuzzer once found interesting without a fuzzer or a
//! nightly toolchain. A missing or empty corpus fails: a renamed directory
//! must not turn this into a test of nothing.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

#[path = "../fuzz/bodies/charset.rs"]
mod charset;
#[path = "../fuzz/bodies/cometql.rs"]
mod cometql;
#[path = "../fuzz/bodies/command.rs"]
mod command;
#[path = "../fuzz/bodies/http_api.rs"]
mod http_api;
#[path = "../fuzz/bodies/jwt.rs"]
mod jwt;
#[path = "../fuzz/bodies/mysql_packet.rs"]
mod mysql_packet;
#[path = "../fuzz/bodies/mysql_prepared.rs"]
mod mysql_prepared;
#[path = "../fuzz/bodies/mysql_session.rs"]
mod mysql_session;
#[path = "../fuzz/bodies/url.rs"]
mod url;
#[path = "../fuzz/bodies/ws_frame.rs"]
mod ws_frame;
#[path = "../fuzz/bodies/ws_handshake.rs"]
mod ws_handshake;

/// A fuzz body: the same `run` the cargo-fuzz target calls.
type Body = fn(&[u8]);

/// Every fuzz target and its body; `every_target_is_replayed` keeps this
/// list in step with `fuzz/fuzz_targets/`.
const TARGETS: &[(&str, Body)] = &[
    ("charset", charset::run),
    ("cometql", cometql::run),
    ("command", command::run),
    ("http_api", http_api::run),
    ("jwt", jwt::run),
    ("mysql_packet", mysql_packet::run),
    ("mysql_prepared", mysql_prepared::run),
    ("mysql_session", mysql_session::run),
    ("url", url::run),
    ("ws_frame", ws_frame::run),
    ("ws_handshake", ws_handshake::run),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Runs every file of `fuzz/corpus/<target>/` through `body`; reports all
/// failing files (name and bytes) at once.
fn replay(target: &str) {
    let body = TARGETS.iter().find(|(name, _)| *name == target).expect("target listed in TARGETS").1;
    let dir = fuzz_dir().join("corpus").join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries.map(|e| e.expect("corpus entry").path()).collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    let mut failed = Vec::new();
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        if catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
            failed.push(format!("{} ({} bytes): {:?}", f.display(), data.len(), data.escape_ascii().to_string()));
        }
    }
    assert!(failed.is_empty(), "{} of {} {target} inputs failed:\n{}", failed.len(), files.len(), failed.join("\n"));
}

#[test]
fn every_target_is_replayed() {
    let mut on_disk: Vec<String> = std::fs::read_dir(fuzz_dir().join("fuzz_targets"))
        .expect("fuzz/fuzz_targets")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .map(|p| p.file_stem().expect("stem").to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let listed: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
    assert_eq!(on_disk, listed, "fuzz/fuzz_targets and TARGETS disagree");
}

#[test]
fn corpus_charset() {
    replay("charset");
}

#[test]
fn corpus_cometql() {
    replay("cometql");
}

#[test]
fn corpus_command() {
    replay("command");
}

#[test]
fn corpus_http_api() {
    replay("http_api");
}

#[test]
fn corpus_jwt() {
    replay("jwt");
}

#[test]
fn corpus_mysql_packet() {
    replay("mysql_packet");
}

#[test]
fn corpus_mysql_prepared() {
    replay("mysql_prepared");
}

#[test]
fn corpus_mysql_session() {
    replay("mysql_session");
}

#[test]
fn corpus_url() {
    replay("url");
}

#[test]
fn corpus_ws_frame() {
    replay("ws_frame");
}

#[test]
fn corpus_ws_handshake() {
    replay("ws_handshake");
}
