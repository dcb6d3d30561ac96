//! The WebSocket layer (RFC 6455), sans-IO.
//!
//! `handshake` turns the bytes of an HTTP upgrade request into a validated
//! request and the `101` answer; `frame` decodes client frames (masking,
//! fragmentation, control frames, size and UTF-8 limits) and encodes server
//! frames. Nothing here touches a socket: the shard's connection driver feeds
//! bytes in and writes the bytes that come out, which is what lets the unit
//! tests and the Autobahn suite pin the behaviour exactly.

pub mod deflate;
pub mod frame;
pub mod handshake;

pub use frame::{CloseCode, Decoder, Event, Fragments, Opcode, encode_close, encode_frame, frame_header};
pub use handshake::{HandshakeError, Request, accept_key, parse_request};
