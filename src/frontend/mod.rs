//! The comet text protocol spoken by browsers over WebSocket (PROTOCOL.md §1).
//!
//! `url` reads the connection parameters from the upgrade path, `command`
//! parses client commands, `message` encodes every server message as JSON with
//! its keys in alphabetical order. All three are sans-IO; the connection
//! driver that uses them lives in `shard::conn`.

pub mod command;
pub mod message;
pub mod url;

/// Characters allowed in channel names (PROTOCOL.md §2).
pub fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Whether `name` is a valid channel name (2..64 characters of `[A-Za-z0-9_-]`).
pub fn is_valid_channel(name: &str) -> bool {
    (2..=64).contains(&name.len()) && name.bytes().all(is_name_char)
}
