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
