//! libFuzzer entry point for `bodies/mysql_session.rs`; the body is shared with the
//! corpus replay in `tests/fuzz_corpus.rs`, so all checks live there.

#![no_main]

#[path = "../bodies/mysql_session.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
