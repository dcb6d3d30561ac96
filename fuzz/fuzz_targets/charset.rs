//! libFuzzer entry point for `bodies/charset.rs`; the body is shared with the
//! corpus replay in `tests/fuzz_corpus.rs`, so all checks live there.

#![no_main]

#[path = "../bodies/charset.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
