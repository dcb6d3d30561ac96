//! CometQL: the backend API, a small SQL dialect over the MySQL client/server
//! protocol (docs/cometql.md), so any MySQL driver is a comet client.
//!
//! Everything here is sans-IO: `packet` frames and encodes MySQL packets,
//! `session` runs the handshake, authentication and command dispatch,
//! `charset` converts the client's character set to UTF-8 and back,
//! `lexer` and `parser` read the dialect, `like` matches SHOW ... LIKE
//! patterns, `tables` describes the tables, `rows` renders the shards' typed
//! answers into each table's rows in its column order, and `exec` turns a
//! statement into a [`exec::Plan`]. `prepared` (server-side prepared
//! statements) builds on `packet`, never the other way round. The shard glue that carries
//! plans out across shards is `shard::sql`.

pub mod charset;
pub mod exec;
pub mod lexer;
pub mod like;
pub mod packet;
pub mod parser;
pub mod prepared;
pub mod rows;
pub mod session;
pub mod tables;
