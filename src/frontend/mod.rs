//! The comet text protocol spoken by browsers over WebSocket (docs/protocol.md).
//!
//! `url` reads the connection parameters from the upgrade path, `command`
//! parses client commands, `message` encodes every server message as JSON with
//! its keys in alphabetical order. All three are sans-IO; the connection
//! driver that uses them lives in `shard::conn`.

pub mod command;
pub mod message;
pub mod url;

/// Channel-name rules live in the bottom layer, shared with CometQL.
pub use crate::domain::{is_name_char, is_valid_channel};

/// The pieces of a list of channel names, as the `subscription` command and
/// the `subscription` connection parameter both read it: split on every
/// character outside `[A-Za-z0-9_-]`, empty pieces dropped. Lengths, kinds
/// and the limit are the shard's to check.
pub fn channel_names(list: &str) -> impl Iterator<Item = &str> {
    list.split(|c: char| !c.is_ascii() || !is_name_char(c as u8)).filter(|s| !s.is_empty())
}
