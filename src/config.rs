//! Configuration: a TOML file (`--config`), `COMET_*` environment variables
//! and command-line flags, in rising precedence, with embedded defaults.
//!
//! Every option is an `Option` in both [`Cli`] and [`FileConfig`] so that
//! "not given" is distinguishable from "given the default"; [`Config::load`]
//! merges them and validates the result once, before any thread starts.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

/// The password comet starts with when none is configured.
pub const DEFAULT_PASSWORD: &str = "comet";

/// Which I/O backend the shards use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IoChoice {
    /// io_uring when the kernel allows it, else epoll.
    Auto,
    /// io_uring, or refuse to start.
    Uring,
    /// epoll, even where io_uring works.
    Epoll,
}

/// A listener that can be turned off: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    Off,
    At(SocketAddr),
}

impl Listen {
    /// The address to listen on, `None` when off.
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Listen::Off => None,
            Listen::At(a) => Some(a),
        }
    }
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Listen, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Listen::Off);
        }
        parse_addr(s).map(Listen::At).map_err(|e| format!("{s:?} is neither \"off\" nor an address: {e}"))
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Listen, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// The end of `--help`: what only the TOML file can say.
const TOML_ONLY_HELP: &str = "\
In the --config TOML file only (no flag, no COMET_* variable):
  public_user_data = [1, 2]     dev_ids whose user_data any connection may read
  [passwords]                   per-dev_id backend passwords, e.g. \"5\" = \"secret\"
Every flag above is also a TOML key: its name with '_' for '-' (max_pending = 64).
Addresses are IP:PORT or HOST:PORT (a host name is resolved once, at start).";

/// An on/off setting (`--demo on|off`; `demo = "off"` in the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    On,
    Off,
}

/// When a statement that changes persisted state is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// The OK is sent once the change is on disk (fsync, grouped).
    Sync,
    /// The OK is sent once the change is handed to the OS (no disk wait);
    /// the data dir is synced at least every second.
    Async,
}

/// Command-line flags; each also reads `COMET_<NAME>` from the environment.
#[derive(Debug, Parser, Default)]
#[command(
    name = "comet",
    version,
    about = "comet: a real-time push server (WebSocket frontend, CometQL/MySQL-protocol backend)",
    after_help = TOML_ONLY_HELP
)]
pub struct Cli {
    /// TOML configuration file; flags and COMET_* variables override it.
    #[arg(long, env = "COMET_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address for browsers (WebSocket and plain HTTP) [default: 127.0.0.1:8087].
    #[arg(long, env = "COMET_FRONTEND", value_name = "ADDR", value_parser = parse_addr)]
    pub frontend: Option<SocketAddr>,
    /// Address for application backends (CometQL over the MySQL protocol) [default: 127.0.0.1:3300].
    #[arg(long, env = "COMET_BACKEND", value_name = "ADDR", value_parser = parse_addr)]
    pub backend: Option<SocketAddr>,
    /// Address of the HTTP API for backends (the CometQL tables over HTTP/JSON), or "off" [default: 127.0.0.1:8088].
    #[arg(long, env = "COMET_API", value_name = "ADDR|off")]
    pub api: Option<Listen>,
    /// Backend password for every dev_id [default: "comet", refused on non-loopback addresses].
    #[arg(long, env = "COMET_PASSWORD", value_name = "PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Number of shard threads, one runtime each [default: number of CPUs].
    #[arg(long, env = "COMET_SHARDS", value_name = "N")]
    pub shards: Option<usize>,
    /// I/O backend: auto probes io_uring and falls back to epoll [default: auto].
    #[arg(long, env = "COMET_IO", value_enum)]
    pub io: Option<IoChoice>,
    /// Serve a plain WebSocket echo endpoint at this path (for conformance tests) [default: off].
    #[arg(long, env = "COMET_ECHO_PATH", value_name = "PATH")]
    pub echo_path: Option<String>,
    /// Largest message a client may send, in bytes; larger ones close with 1009 [default: 65536].
    #[arg(long, env = "COMET_MAX_MESSAGE_SIZE", value_name = "BYTES")]
    pub max_message_size: Option<usize>,
    /// Largest message the server sends, in bytes; larger publishes are refused [default: 1048576].
    #[arg(long, env = "COMET_MAX_OUTBOUND_MESSAGE", value_name = "BYTES")]
    pub max_outbound_message: Option<usize>,
    /// Seconds of silence before the server pings a connection [default: 25].
    #[arg(long, env = "COMET_PING_INTERVAL", value_name = "SECONDS")]
    pub ping_interval: Option<u64>,
    /// Seconds to wait for any data after a ping before closing [default: 10].
    #[arg(long, env = "COMET_PING_TIMEOUT", value_name = "SECONDS")]
    pub ping_timeout: Option<u64>,
    /// Bytes a connection may have queued for sending before it is closed as a slow consumer (4008) [default: 1048576].
    #[arg(long, env = "COMET_OUTBOUND_LIMIT", value_name = "BYTES")]
    pub outbound_limit: Option<usize>,
    /// Seconds a graceful shutdown may take before the process exits anyway [default: 10].
    #[arg(long, env = "COMET_SHUTDOWN_TIMEOUT", value_name = "SECONDS")]
    pub shutdown_timeout: Option<u64>,
    /// Channels one connection may subscribe to [default: 32].
    #[arg(long, env = "COMET_MAX_SUBSCRIPTIONS", value_name = "N")]
    pub max_subscriptions: Option<usize>,
    /// Node name reported by /info [default: the host name].
    #[arg(long, env = "COMET_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Largest CometQL query in bytes; larger ones get error 11 [default: 1048576].
    #[arg(long, env = "COMET_MAX_QUERY_SIZE", value_name = "BYTES")]
    pub max_query_size: Option<usize>,
    /// Private messages kept per offline user; the oldest is dropped when full [default: 64].
    #[arg(long, env = "COMET_OFFLINE_QUEUE_SIZE", value_name = "N")]
    pub offline_queue_size: Option<usize>,
    /// Seconds a queued private message stays deliverable [default: 300].
    #[arg(long, env = "COMET_OFFLINE_QUEUE_TTL", value_name = "SECONDS")]
    pub offline_queue_ttl: Option<u64>,
    /// Seconds an offline user with no key, data or queue (a JWT user) is remembered for users_time [default: 604800].
    #[arg(long, env = "COMET_USER_RETENTION", value_name = "SECONDS")]
    pub user_retention: Option<u64>,
    /// Origins allowed to open WebSockets, comma-separated (others get 403) [default: any].
    #[arg(long, env = "COMET_ALLOWED_ORIGINS", value_name = "ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// Proxy addresses whose X-Forwarded-For is trusted for the client IP, comma-separated [default: none].
    #[arg(long, env = "COMET_TRUSTED_PROXIES", value_name = "IPS", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<std::net::IpAddr>>,
    /// Frontend connections this process holds at most; more get HTTP 503 [default: the descriptor limit less a reserve for the backend port].
    #[arg(long, env = "COMET_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Frontend connections one client address (an IPv6 /64) may hold; more get HTTP 429 [default: 1000].
    #[arg(long, env = "COMET_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    pub max_connections_per_ip: Option<u32>,
    /// Backend connections (CometQL and HTTP API together) this process holds at most; more get MySQL ERR 1040 or HTTP 503 [default: 256].
    #[arg(long, env = "COMET_MAX_BACKEND_CONNECTIONS", value_name = "N")]
    pub max_backend_connections: Option<usize>,
    /// Bytes of CometQL and HTTP API answers the process holds for all backend connections together (built, or queued and not yet read); a SELECT that would pass it gets ERR 1037 [default: 268435456, or one connection's bound of unread answers if more].
    #[arg(long, env = "COMET_ANSWER_MEMORY_LIMIT", value_name = "BYTES")]
    pub answer_memory_limit: Option<usize>,
    /// New frontend connections per second this process accepts (burst: one second's worth; 0: unlimited); more get HTTP 503 with Retry-After [default: 0].
    #[arg(long, env = "COMET_MAX_ACCEPT_RATE", value_name = "N")]
    pub max_accept_rate: Option<u32>,
    /// Commands per second one WebSocket may send (burst: twice as many); more are dropped with an error [default: 50].
    #[arg(long, env = "COMET_CLIENT_RATE", value_name = "N")]
    pub client_rate: Option<u32>,
    /// Browser publishes per second to one channel, process-wide (burst: twice as many; 0: unlimited); more are dropped with an error [default: 100].
    #[arg(long, env = "COMET_CHANNEL_RATE", value_name = "N")]
    pub channel_rate: Option<u32>,
    /// Milliseconds a channel message may wait so that the messages of a window go to each subscriber in one write (0: at once); a window may end up to 1 ms and a tenth of it early or late, to take along a message due at its end [default: 0].
    #[arg(long, env = "COMET_WRITE_DELAY", value_name = "MS")]
    pub write_delay: Option<u64>,
    /// Seconds a started WebSocket frame, HTTP head or MySQL packet has to arrive whole [default: 10].
    #[arg(long, env = "COMET_MESSAGE_TIMEOUT", value_name = "SECONDS")]
    pub message_timeout: Option<u64>,
    /// Bytes of mail one shard may have in flight to another before it stops reading its clients [default: 16777216].
    #[arg(long, env = "COMET_MAIL_LIMIT", value_name = "BYTES")]
    pub mail_limit: Option<usize>,
    /// Cross-shard requests one connection may have waiting for answers [default: 64].
    #[arg(long, env = "COMET_MAX_PENDING", value_name = "N")]
    pub max_pending: Option<u16>,
    /// Serve Prometheus /metrics on its own listener at this address, and no longer on the frontend port [default: on the frontend port].
    #[arg(long, env = "COMET_METRICS", value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// The demo page at / and /index.html (comet.js is always served) [default: on].
    #[arg(long, env = "COMET_DEMO", value_enum)]
    pub demo: Option<Switch>,
    /// Directory of the persisted state (keys, user data, queues, history), created on first start; not used with --redis, where Redis holds it [default: comet-data].
    #[arg(long, env = "COMET_DATA_DIR", value_name = "PATH")]
    pub data_dir: Option<PathBuf>,
    /// Keep all state in memory only: a restart loses it [default: off].
    #[arg(long, env = "COMET_EPHEMERAL")]
    pub ephemeral: bool,
    /// sync: answer a write once it is on disk; async: once handed to the OS, synced every second [default: sync].
    #[arg(long, env = "COMET_DURABILITY", value_enum)]
    pub durability: Option<Durability>,
    /// Bytes of sealed journal files the store keeps before it flushes what they hold and deletes them; at least 67108864 [default: 67108864].
    #[arg(long, env = "COMET_MAX_JOURNAL_SIZE", value_name = "BYTES")]
    pub max_journal_size: Option<u64>,
    /// permessage-deflate (RFC 7692, without context takeover) for WebSocket clients that offer it [default: on].
    #[arg(long, env = "COMET_COMPRESSION", value_enum)]
    pub compression: Option<Switch>,
    /// Never compress for clients whose User-Agent contains one of these substrings, comma-separated [default: none].
    #[arg(long, env = "COMET_COMPRESSION_EXCLUDE_UA", value_name = "SUBSTRINGS", value_delimiter = ',')]
    pub compression_exclude_ua: Option<Vec<String>>,
    /// PEM certificate chain (the server's certificate first): the frontend port then serves wss and https only [default: off].
    #[arg(long, env = "COMET_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (ECDSA, Ed25519 or RSA; PKCS#8, PKCS#1 or SEC1) of --tls-cert [default: off].
    #[arg(long, env = "COMET_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Seconds a client has to finish the TLS handshake before it is closed [default: 10].
    #[arg(long, env = "COMET_TLS_HANDSHAKE_TIMEOUT", value_name = "SECONDS")]
    pub tls_handshake_timeout: Option<u64>,
    /// compact: each TLS connection keeps its raw record keys and expands them per record (1 KiB less per idle connection; AES-GCM pays a key expansion per record); expanded: keeps ring's expanded keys [default: compact].
    #[arg(long, env = "COMET_TLS_RECORD_KEYS", value_enum)]
    pub tls_record_keys: Option<crate::tls::RecordKeys>,
    /// Refuse CometQL logins that do not use TLS, with ERR 3159 (needs --tls-cert) [default: off].
    #[arg(long, env = "COMET_BACKEND_REQUIRE_TLS")]
    pub backend_require_tls: bool,
    /// Join the cluster of the comet nodes that use this Redis: redis://[user:password@]host:port[/db] (docs/cluster.md) [default: none, a single node].
    #[arg(long, env = "COMET_REDIS", value_name = "URL")]
    pub redis: Option<String>,
}

/// The TOML file: same names as the flags, with `-` spelled `_`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default, deserialize_with = "resolve_addr")]
    pub frontend: Option<SocketAddr>,
    #[serde(default, deserialize_with = "resolve_addr")]
    pub backend: Option<SocketAddr>,
    pub api: Option<Listen>,
    pub password: Option<String>,
    pub shards: Option<usize>,
    pub io: Option<IoChoice>,
    pub echo_path: Option<String>,
    pub max_message_size: Option<usize>,
    pub max_outbound_message: Option<usize>,
    pub ping_interval: Option<u64>,
    pub ping_timeout: Option<u64>,
    pub outbound_limit: Option<usize>,
    pub shutdown_timeout: Option<u64>,
    pub max_subscriptions: Option<usize>,
    pub node_name: Option<String>,
    pub max_query_size: Option<usize>,
    pub offline_queue_size: Option<usize>,
    pub offline_queue_ttl: Option<u64>,
    pub allowed_origins: Option<Vec<String>>,
    pub trusted_proxies: Option<Vec<std::net::IpAddr>>,
    pub user_retention: Option<u64>,
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<u32>,
    pub max_backend_connections: Option<usize>,
    pub answer_memory_limit: Option<usize>,
    pub max_accept_rate: Option<u32>,
    pub client_rate: Option<u32>,
    pub channel_rate: Option<u32>,
    pub write_delay: Option<u64>,
    pub message_timeout: Option<u64>,
    pub mail_limit: Option<usize>,
    pub max_pending: Option<u16>,
    pub metrics: Option<SocketAddr>,
    pub demo: Option<Switch>,
    pub data_dir: Option<PathBuf>,
    pub ephemeral: Option<bool>,
    pub durability: Option<Durability>,
    pub max_journal_size: Option<u64>,
    pub compression: Option<Switch>,
    pub compression_exclude_ua: Option<Vec<String>>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_handshake_timeout: Option<u64>,
    pub tls_record_keys: Option<crate::tls::RecordKeys>,
    pub backend_require_tls: Option<bool>,
    pub redis: Option<String>,
    /// dev_ids whose `user_data` any connection may read.
    pub public_user_data: Option<Vec<u32>>,
    /// Per-dev_id backend passwords: `[passwords]` with `"3" = "secret"`.
    pub passwords: Option<std::collections::BTreeMap<String, String>>,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("config file {path}: {err}")]
    Parse { path: PathBuf, err: toml::de::Error },
    #[error("{0}")]
    Invalid(String),
}

/// The validated configuration every shard reads (shared, immutable).
#[derive(Debug, Clone)]
pub struct Config {
    pub frontend: SocketAddr,
    pub backend: SocketAddr,
    /// The HTTP API's address; `None`: off.
    pub api: Option<SocketAddr>,
    pub password: String,
    pub shards: usize,
    pub io: IoChoice,
    pub echo_path: Option<String>,
    pub max_message_size: usize,
    pub max_outbound_message: usize,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub outbound_limit: usize,
    pub shutdown_timeout: Duration,
    pub max_subscriptions: usize,
    pub node_name: String,
    pub max_query_size: usize,
    /// Passwords of dev_ids that do not use `password`.
    pub dev_passwords: std::collections::BTreeMap<u32, String>,
    pub offline_queue_size: usize,
    pub offline_queue_ttl: Duration,
    /// dev_ids whose `user_data` any connection may read (the file's
    /// `public_user_data = [..]`); others only read their own.
    pub public_user_data: Vec<u32>,
    /// When not empty, WebSocket upgrades with another Origin get 403.
    pub allowed_origins: Vec<String>,
    /// Peers whose first X-Forwarded-For entry is the client's address.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// How long an offline user that holds nothing else is remembered.
    pub user_retention: Duration,
    /// Frontend connections the process holds at most (HTTP 503 beyond).
    pub max_connections: usize,
    /// Frontend connections per client address (IPv6: per /64); 429 beyond.
    pub max_connections_per_ip: u32,
    /// CometQL and HTTP API connections the process holds at most (within
    /// [`DESCRIPTOR_RESERVE`]); MySQL ERR 1040 or HTTP 503 beyond.
    pub max_backend_connections: usize,
    /// Answer bytes held for all backend connections together; a SELECT
    /// whose part would pass it gets ERR 1037.
    pub answer_memory_limit: usize,
    /// New frontend connections a second, process-wide (0: unlimited);
    /// HTTP 503 beyond.
    pub max_accept_rate: u32,
    /// Commands per second per WebSocket; the burst is twice this.
    pub client_rate: u32,
    /// Browser publishes per second to one channel (0: unlimited); each
    /// shard admits its share.
    pub channel_rate: u32,
    /// Milliseconds channel messages wait, per shard window, so that each
    /// subscriber gets the window's messages in one write (0: at once).
    pub write_delay_ms: u64,
    /// How long a started frame, head or packet may take to arrive whole.
    pub message_timeout: Duration,
    /// Bytes of mail in flight from one shard to another before the sender
    /// stops reading its clients (backpressure).
    pub mail_limit: usize,
    /// Cross-shard requests a connection may have outstanding.
    pub max_pending: u16,
    /// Where `/metrics` has its own listener; `None`: on the frontend port.
    pub metrics: Option<SocketAddr>,
    /// Whether the frontend serves the demo page at `/`.
    pub demo: bool,
    /// Where the persisted state lives; `None` with `--ephemeral`.
    pub data_dir: Option<PathBuf>,
    pub durability: Durability,
    /// Bytes of sealed journals the store keeps before it flushes their
    /// memtables and deletes them (fjall's `max_journaling_size`).
    pub max_journal_size: u64,
    /// Whether WebSockets may negotiate permessage-deflate.
    pub compression: bool,
    /// User-Agent substrings of clients never offered compression.
    pub compression_exclude_ua: Vec<String>,
    /// The certificate chain and key of the frontend's TLS; `None`: plain.
    pub tls: Option<crate::tls::TlsFiles>,
    /// How long a TLS handshake may take.
    pub tls_handshake_timeout: Duration,
    /// CometQL logins over plaintext get ERR 3159.
    pub backend_require_tls: bool,
    /// The Redis that joins this node to a cluster; `None`: a single node.
    pub redis: Option<String>,
}

/// The smallest `--max-journal-size`: fjall writes one journal file up to
/// 64 MB before it rotates it, and needs room for at least that.
pub const MIN_JOURNAL_SIZE: u64 = 64 << 20;

/// The data dir used when none is given: in the working directory.
pub const DEFAULT_DATA_DIR: &str = "comet-data";

/// Descriptors kept out of `max_connections`' default: the backend
/// connections (`max_backend_connections`, 256 by default), `/metrics` (its own listener holds at most `metrics::METRICS_WORKERS`
/// connections plus the listening socket), refusals being answered, files.
pub const DESCRIPTOR_RESERVE: usize = 384;

/// The process's open-file limit (soft), if it can be read.
pub fn descriptor_limit() -> Option<usize> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit(2) writes into the struct we pass and nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    (rc == 0).then_some(r.rlim_cur as usize)
}

impl Default for Config {
    fn default() -> Config {
        Config {
            frontend: "127.0.0.1:8087".parse().expect("literal address"),
            backend: "127.0.0.1:3300".parse().expect("literal address"),
            api: Some("127.0.0.1:8088".parse().expect("literal address")),
            password: DEFAULT_PASSWORD.to_string(),
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            io: IoChoice::Auto,
            echo_path: None,
            max_message_size: 64 * 1024,
            max_outbound_message: 1024 * 1024,
            ping_interval: Duration::from_secs(25),
            ping_timeout: Duration::from_secs(10),
            outbound_limit: 1024 * 1024,
            shutdown_timeout: Duration::from_secs(10),
            max_subscriptions: 32,
            node_name: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "comet".to_string()),
            max_query_size: 1024 * 1024,
            dev_passwords: Default::default(),
            offline_queue_size: 64,
            offline_queue_ttl: Duration::from_secs(300),
            public_user_data: Vec::new(),
            allowed_origins: Vec::new(),
            trusted_proxies: Vec::new(),
            user_retention: Duration::from_secs(7 * 24 * 3600),
            max_connections: descriptor_limit()
                .map_or(65_536, |n| n.saturating_sub(DESCRIPTOR_RESERVE).max(64))
                .min(10_000_000),
            max_connections_per_ip: 1000,
            max_backend_connections: 256,
            answer_memory_limit: 256 << 20,
            max_accept_rate: 0,
            client_rate: 50,
            channel_rate: 100,
            write_delay_ms: 0,
            message_timeout: Duration::from_secs(10),
            mail_limit: 16 << 20,
            max_pending: 64,
            metrics: None,
            demo: true,
            data_dir: Some(PathBuf::from(DEFAULT_DATA_DIR)),
            durability: Durability::Sync,
            max_journal_size: MIN_JOURNAL_SIZE,
            compression: true,
            compression_exclude_ua: Vec::new(),
            tls: None,
            tls_handshake_timeout: Duration::from_secs(10),
            backend_require_tls: false,
            redis: None,
        }
    }
}

impl Config {
    /// How many bytes of answers one backend connection may leave unread:
    /// 16x the browser bound, and room for answers as big as the largest
    /// query. Past it, queued answers stop its reading (and disconnect it
    /// after `--message-timeout`), statements that gather rows are
    /// refused, and so is any one shard's part of an answer that is bigger.
    pub fn answer_bound(&self) -> usize {
        self.outbound_limit.saturating_mul(16).max(self.max_query_size.saturating_mul(4))
    }

    /// Merges file, environment and flags over the defaults, then validates.
    pub fn load(cli: Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|err| ConfigError::Read { path: path.clone(), err })?;
                toml::from_str::<FileConfig>(&text).map_err(|err| ConfigError::Parse { path: path.clone(), err })?
            }
            None => FileConfig::default(),
        };
        if (cli.ephemeral || file.ephemeral == Some(true)) && (cli.data_dir.is_some() || file.data_dir.is_some()) {
            return Err(ConfigError::Invalid(
                "--ephemeral keeps nothing on disk and --data-dir names where to keep it: give one of them".into(),
            ));
        }
        let d = Config::default();
        let secs = Duration::from_secs;
        let answer_memory_set = cli.answer_memory_limit.or(file.answer_memory_limit);
        let mut c = Config {
            frontend: cli.frontend.or(file.frontend).unwrap_or(d.frontend),
            backend: cli.backend.or(file.backend).unwrap_or(d.backend),
            api: cli.api.or(file.api).map_or(d.api, Listen::addr),
            password: cli.password.or(file.password).unwrap_or(d.password),
            shards: cli.shards.or(file.shards).unwrap_or(d.shards),
            io: cli.io.or(file.io).unwrap_or(d.io),
            echo_path: cli.echo_path.or(file.echo_path).filter(|p| !p.is_empty()),
            max_message_size: cli.max_message_size.or(file.max_message_size).unwrap_or(d.max_message_size),
            max_outbound_message: cli
                .max_outbound_message
                .or(file.max_outbound_message)
                .unwrap_or(d.max_outbound_message),
            ping_interval: cli.ping_interval.or(file.ping_interval).map_or(d.ping_interval, secs),
            ping_timeout: cli.ping_timeout.or(file.ping_timeout).map_or(d.ping_timeout, secs),
            outbound_limit: cli.outbound_limit.or(file.outbound_limit).unwrap_or(d.outbound_limit),
            shutdown_timeout: cli.shutdown_timeout.or(file.shutdown_timeout).map_or(d.shutdown_timeout, secs),
            max_subscriptions: cli.max_subscriptions.or(file.max_subscriptions).unwrap_or(d.max_subscriptions),
            node_name: cli.node_name.or(file.node_name).unwrap_or(d.node_name),
            max_query_size: cli.max_query_size.or(file.max_query_size).unwrap_or(d.max_query_size),
            dev_passwords: parse_passwords(file.passwords.unwrap_or_default())?,
            offline_queue_size: cli.offline_queue_size.or(file.offline_queue_size).unwrap_or(d.offline_queue_size),
            offline_queue_ttl: cli.offline_queue_ttl.or(file.offline_queue_ttl).map_or(d.offline_queue_ttl, secs),
            public_user_data: file.public_user_data.unwrap_or_default(),
            allowed_origins: cli
                .allowed_origins
                .or(file.allowed_origins)
                .unwrap_or_default()
                .into_iter()
                .map(|o| o.trim().trim_end_matches('/').to_string())
                .filter(|o| !o.is_empty())
                .collect(),
            trusted_proxies: cli.trusted_proxies.or(file.trusted_proxies).unwrap_or_default(),
            user_retention: cli.user_retention.or(file.user_retention).map_or(d.user_retention, secs),
            max_connections: cli.max_connections.or(file.max_connections).unwrap_or(d.max_connections),
            max_connections_per_ip: cli
                .max_connections_per_ip
                .or(file.max_connections_per_ip)
                .unwrap_or(d.max_connections_per_ip),
            max_backend_connections: cli
                .max_backend_connections
                .or(file.max_backend_connections)
                .unwrap_or(d.max_backend_connections),
            answer_memory_limit: answer_memory_set.unwrap_or(d.answer_memory_limit),
            max_accept_rate: cli.max_accept_rate.or(file.max_accept_rate).unwrap_or(d.max_accept_rate),
            client_rate: cli.client_rate.or(file.client_rate).unwrap_or(d.client_rate),
            channel_rate: cli.channel_rate.or(file.channel_rate).unwrap_or(d.channel_rate),
            write_delay_ms: cli.write_delay.or(file.write_delay).unwrap_or(d.write_delay_ms),
            message_timeout: cli.message_timeout.or(file.message_timeout).map_or(d.message_timeout, secs),
            mail_limit: cli.mail_limit.or(file.mail_limit).unwrap_or(d.mail_limit),
            max_pending: cli.max_pending.or(file.max_pending).unwrap_or(d.max_pending),
            metrics: cli.metrics.or(file.metrics),
            demo: cli.demo.or(file.demo).map_or(d.demo, |s| s == Switch::On),
            data_dir: if cli.ephemeral || file.ephemeral == Some(true) {
                None
            } else {
                Some(cli.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)))
            },
            durability: cli.durability.or(file.durability).unwrap_or(d.durability),
            max_journal_size: cli.max_journal_size.or(file.max_journal_size).unwrap_or(d.max_journal_size),
            compression: cli.compression.or(file.compression).map_or(d.compression, |s| s == Switch::On),
            compression_exclude_ua: cli
                .compression_exclude_ua
                .or(file.compression_exclude_ua)
                .unwrap_or_default()
                .into_iter()
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect(),
            tls: match (cli.tls_cert.or(file.tls_cert), cli.tls_key.or(file.tls_key)) {
                (Some(cert), Some(key)) => Some(crate::tls::TlsFiles {
                    cert,
                    key,
                    record_keys: cli.tls_record_keys.or(file.tls_record_keys).unwrap_or_default(),
                }),
                (None, None) => None,
                _ => {
                    return Err(ConfigError::Invalid(
                        "--tls-cert and --tls-key go together: give both or neither".into(),
                    ));
                }
            },
            tls_handshake_timeout: cli
                .tls_handshake_timeout
                .or(file.tls_handshake_timeout)
                .map_or(d.tls_handshake_timeout, secs),
            backend_require_tls: cli.backend_require_tls || file.backend_require_tls == Some(true),
            redis: cli.redis.or(file.redis).filter(|u| !u.is_empty()),
        };
        // The default leaves room for at least one answer as big as a
        // connection may leave unread, however high that bound was set.
        if answer_memory_set.is_none() {
            c.answer_memory_limit = c.answer_memory_limit.max(c.answer_bound());
        }
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.redis {
            crate::cluster::parse_url(url).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        if self.offline_queue_size > 100_000 {
            return Err(ConfigError::Invalid(format!(
                "offline-queue-size must be at most 100000, got {}",
                self.offline_queue_size
            )));
        }
        if self.dev_passwords.values().any(String::is_empty) {
            return Err(ConfigError::Invalid("[passwords]: a dev_id password must not be empty".into()));
        }
        if self.max_query_size < 1024 || self.max_query_size > 64 << 20 {
            return Err(ConfigError::Invalid(format!(
                "max-query-size must be 1024..=67108864 bytes, got {}",
                self.max_query_size
            )));
        }
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.shards == 0 || self.shards > 256 {
            return bad(format!("shards must be 1..=256, got {}", self.shards));
        }
        if self.password.is_empty() {
            return bad("password must not be empty".into());
        }
        if self.password == DEFAULT_PASSWORD {
            let api = self.api.map(|a| ("api", a));
            for (what, addr) in [("frontend", self.frontend), ("backend", self.backend)].into_iter().chain(api) {
                if !addr.ip().is_loopback() {
                    return bad(format!(
                        "refusing to bind {what} {addr} (not loopback) with the default password; set --password or COMET_PASSWORD"
                    ));
                }
            }
        }
        if self.max_message_size < 125 {
            return bad(format!("max-message-size must be at least 125 bytes, got {}", self.max_message_size));
        }
        if self.outbound_limit < self.max_outbound_message.min(64 * 1024) {
            return bad(format!("outbound-limit {} is too small", self.outbound_limit));
        }
        if self.ping_interval.is_zero() || self.ping_timeout.is_zero() {
            return bad("ping-interval and ping-timeout must be at least 1 second".into());
        }
        if self.max_connections == 0 || self.max_connections_per_ip == 0 || self.max_backend_connections == 0 {
            return bad("max-connections, max-connections-per-ip and max-backend-connections must be at least 1".into());
        }
        if self.answer_memory_limit < self.answer_bound() {
            return bad(format!(
                "answer-memory-limit must be at least one backend connection's bound of unread answers, {} bytes (16 x outbound-limit, or 4 x max-query-size if more), got {}",
                self.answer_bound(),
                self.answer_memory_limit
            ));
        }
        if self.max_accept_rate > 1_000_000 {
            return bad(format!(
                "max-accept-rate must be 0..=1000000 connections per second, got {}",
                self.max_accept_rate
            ));
        }
        if self.client_rate == 0 || self.client_rate > 1_000_000 {
            return bad(format!("client-rate must be 1..=1000000 commands per second, got {}", self.client_rate));
        }
        if self.channel_rate > 1_000_000 {
            return bad(format!("channel-rate must be 0..=1000000 publishes per second, got {}", self.channel_rate));
        }
        if self.write_delay_ms > 1000 {
            return bad(format!("write-delay must be 0..=1000 milliseconds, got {}", self.write_delay_ms));
        }
        if self.backend_require_tls && self.tls.is_none() {
            return bad("--backend-require-tls needs --tls-cert and --tls-key".into());
        }
        if self.tls_handshake_timeout.is_zero() || self.tls_handshake_timeout > Duration::from_secs(300) {
            return bad(format!(
                "tls-handshake-timeout must be 1..=300 seconds, got {}",
                self.tls_handshake_timeout.as_secs()
            ));
        }
        if self.message_timeout.is_zero() {
            return bad("message-timeout must be at least 1 second".into());
        }
        if self.mail_limit < 1 << 20 {
            return bad(format!("mail-limit must be at least 1048576 bytes, got {}", self.mail_limit));
        }
        if self.max_journal_size < MIN_JOURNAL_SIZE {
            return bad(format!(
                "max-journal-size must be at least {MIN_JOURNAL_SIZE} bytes (the store's journal file size), got {}",
                self.max_journal_size
            ));
        }
        if self.max_pending == 0 {
            return bad("max-pending must be at least 1".into());
        }
        if let Some(p) = &self.echo_path
            && !p.starts_with('/')
        {
            return bad(format!("echo-path must start with '/', got {p:?}"));
        }
        Ok(())
    }
}

/// Parses a listen address: `IP:PORT`, or `HOST:PORT` resolved once with the
/// system resolver (`localhost:8087`); the first address it answers is used.
pub fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let hint = "give IP:PORT (127.0.0.1:8087, [::1]:8087) or HOST:PORT (localhost:8087)";
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs.next().ok_or_else(|| format!("'{text}' resolves to no address; {hint}")),
        Err(e) => Err(format!("cannot use '{text}' as an address ({e}); {hint}")),
    }
}

/// serde's side of [`parse_addr`], for the TOML file's addresses.
fn resolve_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    parse_addr(&text).map(Some).map_err(serde::de::Error::custom)
}

fn parse_passwords(
    m: std::collections::BTreeMap<String, String>,
) -> Result<std::collections::BTreeMap<u32, String>, ConfigError> {
    m.into_iter()
        .map(|(k, v)| {
            k.parse::<u32>()
                .map(|d| (d, v))
                .map_err(|_| ConfigError::Invalid(format!("[passwords]: '{k}' is not a dev_id (a number)")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_loopback_with_default_password() {
        let c = Config::load(Cli::default()).unwrap();
        assert_eq!(c.frontend.to_string(), "127.0.0.1:8087");
        assert_eq!(c.backend.to_string(), "127.0.0.1:3300");
        assert_eq!(c.password, DEFAULT_PASSWORD);
    }

    #[test]
    fn the_data_dir_is_on_by_default_and_ephemeral_turns_it_off() {
        let c = Config::load(Cli::default()).unwrap();
        assert_eq!(c.data_dir.as_deref(), Some(std::path::Path::new(DEFAULT_DATA_DIR)));
        assert_eq!(c.durability, Durability::Sync);
        let c = Config::load(Cli { ephemeral: true, ..Cli::default() }).unwrap();
        assert_eq!(c.data_dir, None);
        let both = Cli { ephemeral: true, data_dir: Some("/tmp/x".into()), ..Cli::default() };
        let e = Config::load(both).unwrap_err().to_string();
        assert!(e.contains("--ephemeral") && e.contains("--data-dir"), "{e}");
    }

    #[test]
    fn the_journal_bound_defaults_to_fjalls_minimum_and_refuses_less() {
        assert_eq!(Config::load(Cli::default()).unwrap().max_journal_size, 64 << 20);
        let big = Cli { max_journal_size: Some(256 << 20), ..Cli::default() };
        assert_eq!(Config::load(big).unwrap().max_journal_size, 256 << 20);
        let small = Cli { max_journal_size: Some(1 << 20), ..Cli::default() };
        let e = Config::load(small).unwrap_err().to_string();
        assert!(e.contains("max-journal-size") && e.contains("1048576"), "{e}");
    }

    #[test]
    fn the_answer_memory_defaults_to_room_for_one_connections_bound_and_refuses_less() {
        assert_eq!(Config::load(Cli::default()).unwrap().answer_memory_limit, 256 << 20);
        // 16 x 1 GiB of unread answers for one connection: the default grows.
        let big = Cli { outbound_limit: Some(1 << 30), ..Cli::default() };
        assert_eq!(Config::load(big).unwrap().answer_memory_limit, 16 << 30);
        let small = Cli { answer_memory_limit: Some(8 << 20), ..Cli::default() };
        let e = Config::load(small).unwrap_err().to_string();
        assert!(e.contains("answer-memory-limit") && e.contains("16777216") && e.contains("8388608"), "{e}");
    }

    #[test]
    fn default_password_on_public_address_is_refused() {
        let cli = Cli { frontend: Some("0.0.0.0:8087".parse().unwrap()), ..Cli::default() };
        let e = Config::load(cli).unwrap_err().to_string();
        assert!(e.contains("0.0.0.0:8087"), "{e}");
        let cli =
            Cli { frontend: Some("0.0.0.0:8087".parse().unwrap()), password: Some("s3cret".into()), ..Cli::default() };
        assert!(Config::load(cli).is_ok());
    }

    #[test]
    fn the_api_listener_defaults_to_loopback_and_can_be_turned_off() {
        assert_eq!(Config::load(Cli::default()).unwrap().api, Some("127.0.0.1:8088".parse().unwrap()));
        let off = Cli { api: Some("off".parse().unwrap()), ..Cli::default() };
        assert_eq!(Config::load(off).unwrap().api, None);
        let public = Cli { api: Some("0.0.0.0:8088".parse().unwrap()), ..Cli::default() };
        let e = Config::load(public).unwrap_err().to_string();
        assert!(e.contains("api 0.0.0.0:8088"), "{e}");
        assert!("nowhere".parse::<Listen>().unwrap_err().contains("\"nowhere\""));
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("comet-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "shards = 3\nping_interval = 7\nio = \"epoll\"\n").unwrap();
        let cli = Cli { config: Some(path.clone()), shards: Some(2), ..Cli::default() };
        let c = Config::load(cli).unwrap();
        assert_eq!((c.shards, c.ping_interval.as_secs(), c.io), (2, 7, IoChoice::Epoll));
        std::fs::write(&path, "[passwords]\n3 = \"three\"\n").unwrap();
        let c = Config::load(Cli { config: Some(path.clone()), ..Cli::default() }).unwrap();
        assert_eq!(c.dev_passwords.get(&3).map(String::as_str), Some("three"));
        std::fs::write(&path, "[passwords]\nx = \"three\"\n").unwrap();
        let e = Config::load(Cli { config: Some(path.clone()), ..Cli::default() }).unwrap_err().to_string();
        assert!(e.contains("'x'"), "{e}");
        std::fs::write(&path, "metrics = \"127.0.0.1:9100\"\ndemo = \"off\"\n").unwrap();
        let c = Config::load(Cli { config: Some(path.clone()), ..Cli::default() }).unwrap();
        assert_eq!((c.metrics.map(|a| a.port()), c.demo), (Some(9100), false));
        let cli = Cli { config: Some(path.clone()), demo: Some(Switch::On), ..Cli::default() };
        assert!(Config::load(cli).unwrap().demo);
        std::fs::write(&path, "compression = \"off\"\ncompression_exclude_ua = [\"OldBot/1\", \" \"]\n").unwrap();
        let c = Config::load(Cli { config: Some(path.clone()), ..Cli::default() }).unwrap();
        assert_eq!((c.compression, c.compression_exclude_ua), (false, vec!["OldBot/1".to_string()]));
        let cli = Cli { config: Some(path.clone()), compression: Some(Switch::On), ..Cli::default() };
        assert!(Config::load(cli).unwrap().compression);
        std::fs::write(&path, "shardz = 3\n").unwrap();
        let e = Config::load(Cli { config: Some(path), ..Cli::default() }).unwrap_err().to_string();
        assert!(e.contains("shardz"), "{e}");
    }

    #[test]
    fn tls_settings_come_from_the_file_or_flags_and_go_together() {
        let dir = std::env::temp_dir().join(format!("comet-cfg-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "tls_cert = \"/x/chain.pem\"\ntls_key = \"/x/key.pem\"\ntls_handshake_timeout = 3\nbackend_require_tls = true\n",
        )
        .unwrap();
        let c = Config::load(Cli { config: Some(path.clone()), ..Cli::default() }).unwrap();
        let tls = c.tls.expect("tls");
        assert_eq!((tls.cert.to_str(), tls.key.to_str()), (Some("/x/chain.pem"), Some("/x/key.pem")));
        assert_eq!(tls.record_keys, crate::tls::RecordKeys::Compact);
        assert_eq!((c.tls_handshake_timeout.as_secs(), c.backend_require_tls), (3, true));
        std::fs::write(&path, "tls_cert = \"/x/c.pem\"\ntls_key = \"/x/k.pem\"\ntls_record_keys = \"expanded\"\n")
            .unwrap();
        let c = Config::load(Cli { config: Some(path.clone()), ..Cli::default() }).unwrap();
        assert_eq!(c.tls.expect("tls").record_keys, crate::tls::RecordKeys::Expanded);
        let cli = Cli {
            config: Some(path.clone()),
            tls_record_keys: Some(crate::tls::RecordKeys::Compact),
            ..Cli::default()
        };
        assert_eq!(Config::load(cli).unwrap().tls.expect("tls").record_keys, crate::tls::RecordKeys::Compact);
        let cli = Cli { config: Some(path.clone()), tls_handshake_timeout: Some(0), ..Cli::default() };
        assert!(Config::load(cli).unwrap_err().to_string().contains("tls-handshake-timeout"));
        let d = Config::load(Cli::default()).unwrap();
        assert_eq!((d.tls.is_none(), d.tls_handshake_timeout.as_secs(), d.backend_require_tls), (true, 10, false));
        let cli = Cli { tls_key: Some("/x/key.pem".into()), ..Cli::default() };
        assert!(Config::load(cli).unwrap_err().to_string().contains("go together"));
        let cli = Cli { backend_require_tls: true, ..Cli::default() };
        assert!(Config::load(cli).unwrap_err().to_string().contains("needs --tls-cert"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_accept_rate_and_write_delay_come_from_flags_the_file_or_defaults_and_are_bounded() {
        let d = Config::load(Cli::default()).unwrap();
        assert_eq!((d.max_accept_rate, d.write_delay_ms), (0, 0));
        let dir = std::env::temp_dir().join(format!("comet-storm-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "max_accept_rate = 5000\nwrite_delay = 20\n").unwrap();
        let c = Config::load(Cli { config: Some(path.clone()), ..Cli::default() }).unwrap();
        assert_eq!((c.max_accept_rate, c.write_delay_ms), (5000, 20));
        let cli = Cli::try_parse_from(["comet", "--max-accept-rate", "7", "--write-delay", "5"]).unwrap();
        let c = Config::load(Cli { config: Some(path), ..cli }).unwrap();
        assert_eq!((c.max_accept_rate, c.write_delay_ms), (7, 5));
        let e = Config::load(Cli { write_delay: Some(1001), ..Cli::default() }).unwrap_err().to_string();
        assert!(e.contains("write-delay") && e.contains("1001"), "{e}");
        let e = Config::load(Cli { max_accept_rate: Some(2_000_000), ..Cli::default() }).unwrap_err().to_string();
        assert!(e.contains("max-accept-rate"), "{e}");
    }

    #[test]
    fn addresses_may_be_host_names() {
        let a = parse_addr("localhost:8087").unwrap();
        assert!(a.ip().is_loopback() && a.port() == 8087, "{a}");
        assert_eq!(parse_addr("[::1]:9").unwrap().to_string(), "[::1]:9");
        let e = parse_addr("localhost").unwrap_err();
        assert!(e.contains("'localhost'") && e.contains("HOST:PORT"), "{e}");
        let cli = Cli::try_parse_from(["comet", "--frontend", "localhost:0"]).unwrap();
        assert!(cli.frontend.unwrap().ip().is_loopback());
        let dir = std::env::temp_dir().join(format!("comet-addr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "backend = \"localhost:3301\"\n").unwrap();
        let c = Config::load(Cli { config: Some(path), ..Cli::default() }).unwrap();
        assert!(c.backend.ip().is_loopback() && c.backend.port() == 3301);
    }

    #[test]
    fn help_names_units_and_the_toml_only_keys() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        for want in ["--ping-interval <SECONDS>", "--outbound-limit <BYTES>", "--shards <N>", "--frontend <ADDR>"] {
            assert!(help.contains(want), "help lacks {want}:\n{help}");
        }
        assert!(!help.contains("<PING_INTERVAL>"), "{help}");
        assert!(help.contains("public_user_data") && help.contains("[passwords]"), "{help}");
    }
}
