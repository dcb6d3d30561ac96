//! One shard: its state and handlers ([`core`], sans-IO), and the glue that
//! drives them from sockets, mailboxes and timers ([`io`]).
//!
//! A shard is one thread with one compio runtime. It owns its connections,
//! its part of every channel's subscriber list, the users homed on it and
//! the history of the channels homed on it; nothing is shared with other
//! threads except through [`mail::Mail`] and a few process-wide counters.
//! The pure pieces the core is made of are modules of their own: the
//! outbound queue ([`outq`]), the input buffer ([`inbuf`]), rate and
//! connection limits ([`limits`]), history ([`history`]), the slab of
//! connections ([`slab`]). [`conn`], [`sql`], [`api`] and [`users`] hold
//! the core's handlers for WebSocket, CometQL, the HTTP API and user
//! operations.

pub mod answer_memory;
pub mod api;
mod cluster;
pub mod conn;
pub mod core;
pub mod delay;
pub mod history;
pub mod inbuf;
pub mod io;
pub mod limits;
pub mod mail;
pub mod outq;
mod replica;
#[cfg(test)]
mod sim;
pub mod slab;
pub mod sql;
pub mod users;

pub use conn::Conn;
pub use core::{Effect, ShardCore, Shared};
pub use slab::{ConnId, Slab};

/// The home shard of a channel: where its history and settings live.
pub fn home_shard_of_channel(dev_id: u32, name: &str, shards: usize) -> usize {
    // FNV-1a over dev_id and name: stable across shards and runs.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in dev_id.to_le_bytes().iter().chain(name.as_bytes()) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards as u64) as usize
}

/// The home shard of a user: where all its devices live.
pub fn home_shard(dev_id: u32, user_id: u64, shards: usize) -> usize {
    // splitmix64: every shard computes the same answer without shared state.
    let mut z = ((dev_id as u64) << 48 ^ user_id).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % shards as u64) as usize
}

/// Debug builds only (the integration tests run them): with
/// `COMET_TEST_PANIC_ON` set, input that contains its text makes the
/// handler panic, a bug on demand, so that a test can check that a panic
/// in one connection's handling closes that connection alone. Called with
/// what a connection sent: raw bytes as read (CometQL, HTTP) and each
/// WebSocket message unmasked. `COMET_TEST_PANIC_ON_ADOPT` does the same
/// for the request head of a connection handed over from another shard,
/// as the user's home shard takes it ([`panic_on_adopt_marker`]). Release
/// builds have no such hook.
#[cfg(debug_assertions)]
pub(crate) fn panic_on_test_marker(input: &[u8]) {
    static MARKER: std::sync::OnceLock<Option<Vec<u8>>> = std::sync::OnceLock::new();
    panic_on(&MARKER, "COMET_TEST_PANIC_ON", input);
}

#[cfg(debug_assertions)]
pub(crate) fn panic_on_adopt_marker(head: &[u8]) {
    static MARKER: std::sync::OnceLock<Option<Vec<u8>>> = std::sync::OnceLock::new();
    panic_on(&MARKER, "COMET_TEST_PANIC_ON_ADOPT", head);
}

#[cfg(debug_assertions)]
fn panic_on(marker: &std::sync::OnceLock<Option<Vec<u8>>>, var: &str, input: &[u8]) {
    let marker = marker.get_or_init(|| std::env::var_os(var).map(|m| m.into_encoded_bytes()));
    if let Some(m) = marker.as_deref()
        && !m.is_empty()
        && input.windows(m.len()).any(|w| w == m)
    {
        panic!("{var} matched a connection's input");
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub(crate) fn panic_on_test_marker(_: &[u8]) {}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub(crate) fn panic_on_adopt_marker(_: &[u8]) {}
