//! comet: a real-time push server.
//!
//! Browsers hold WebSocket connections (the *frontend*, [`frontend`] over
//! [`ws`]); application backends publish through CometQL over the MySQL
//! protocol (the *backend*). The wire protocols are those of CppComet,
//! described in docs/protocol.md and docs/cometql.md. The process runs one shard per core
//! ([`shard`]), each a thread with its own compio runtime ([`runtime`]);
//! shards share nothing but [`mailbox`] rings.
//!
//! Module map:
//! - [`config`]: flags, environment, TOML file, defaults.
//! - [`server`]: start the shards, handle signals, drain on shutdown.
//! - [`runtime`]: I/O backend probe (io_uring or epoll), listeners, runtimes.
//! - [`mailbox`]: SPSC rings between shards with wake-when-parked.
//! - [`shard`]: per-shard state, connections, channels, fan-out.
//! - [`ws`]: WebSocket handshake and frame codec (sans-IO).
//! - [`frontend`]: comet URL parameters, commands and messages (sans-IO).
//! - [`http`]: plain HTTP routes on the frontend port.
//! - [`metrics`]: counters and the Prometheus rendering.
//! - [`cluster`]: the Redis bridge that joins nodes into one service
//!   (`--redis`).
//! - [`store`]: durable state: the storage thread and the embedded engine.
//! - [`users`]: user store: keys, devices, offline queues, JWT (sans-IO).
//! - [`cometql`]: MySQL wire protocol and the CometQL dialect (sans-IO).
//! - [`api`]: the HTTP API for backends, a mirror of the CometQL tables
//!   (sans-IO framing, request → statement, JSON answers).
//! - [`domain`]: the bottom layer every module may use: `ConnId`, channel
//!   names and kinds, constant-time compare, clipping of quoted values.

pub mod api;
pub mod cluster;
pub mod cometql;
pub mod config;
pub mod domain;
pub mod frontend;
pub mod http;
pub mod mailbox;
pub mod metrics;
pub mod runtime;
pub mod server;
pub mod shard;
pub mod store;
pub mod tls;
pub mod users;
pub mod ws;
