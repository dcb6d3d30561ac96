//! comet-bench: the load generator for comet and its peers.
//!
//! Scenarios (subcommands) run against one target, or, with `compare`,
//! against comet, nginx+nchan and a Node.js `ws` server one after another
//! with identical parameters. Client connections are spread over source
//! addresses 127.0.0.1..=127.0.0.N (`--sources`) and, for `idle`, over
//! several processes (`--procs`), since one process may hold at most 20,000
//! descriptors here. Connections that fail to open are counted and reported.
//!
//! Output: a table on stdout, `--json FILE` with every figure, `--svg FILE`
//! with the latency distribution, and a progress line on stderr.

mod attack;
mod cluster;
mod cluster_state;
mod inflight;
mod micro;
mod proc;
mod report;
mod storm;
mod target;
mod wire;

use std::io::{BufRead, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;

use proc::Layout;
use report::Figures;
use target::{Kind, Spawn, Target};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The command line: global options, then one scenario.
#[derive(Parser)]
#[command(name = "comet-bench", about = "Load generator for comet and its peers (nchan, Node.js ws)")]
struct Cli {
    #[command(flatten)]
    g: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Options every scenario shares (`global = true`): which target, how to
/// reach or start it, and where the output goes.
#[derive(Args, Clone)]
struct Global {
    /// Which server to load.
    #[arg(long, value_enum, default_value = "comet", global = true)]
    target: Kind,
    /// Start the target on free loopback ports (else use --server/--backend/--pid).
    #[arg(long, global = true)]
    spawn: bool,
    /// The target's WebSocket address (comet's frontend).
    #[arg(long, default_value = "127.0.0.1:8087", global = true)]
    server: SocketAddr,
    /// comet's CometQL address.
    #[arg(long, default_value = "127.0.0.1:3300", global = true)]
    backend: SocketAddr,
    /// comet's HTTP API address.
    #[arg(long, default_value = "127.0.0.1:8088", global = true)]
    api: SocketAddr,
    /// The target's pid, for CPU and memory readings (its children count too).
    #[arg(long, global = true)]
    pid: Option<u32>,
    /// comet's backend password.
    #[arg(long, default_value = "comet", global = true)]
    password: String,
    /// The comet binary for --spawn and compare.
    #[arg(long, default_value = "target/release/comet", global = true)]
    comet_bin: PathBuf,
    /// comet shards and nginx workers when spawned.
    #[arg(long, default_value_t = 2, global = true)]
    workers: usize,
    /// Offer permessage-deflate in every WebSocket handshake (as browsers
    /// do); compressed frames are inflated by the readers.
    #[arg(long, global = true)]
    deflate: bool,
    /// comet's --io when spawned.
    #[arg(long, default_value = "auto", global = true)]
    io: String,
    /// One more flag for a spawned comet, e.g. `--server-arg=--max-query-size=67108864`
    /// (repeatable; comet only).
    #[arg(long = "server-arg", global = true, allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Run the scenario a second time, in the same invocation, against a
    /// comet spawned with this flag added, e.g. `--variant-arg=--write-delay=20`
    /// (repeatable; needs --spawn); prints both rows and their ratios.
    #[arg(long = "variant-arg", global = true, allow_hyphen_values = true)]
    variant_args: Vec<String>,
    /// Spawned comet and nginx+nchan serve TLS with a throwaway CA and
    /// certificate, and subscribers speak wss (idle, connect and fanout;
    /// the node-ws peer has no TLS and is skipped; nchan is published to
    /// on a second, plaintext listener). For comet alone, or wss
    /// against ws in one run: `--variant-arg=--tls-cert=auto`.
    #[arg(long, global = true)]
    wss: bool,
    /// Spread client sockets over this many source addresses 127.0.0.x.
    #[arg(long, default_value_t = 4, global = true)]
    sources: u8,
    /// Where the processes run. `shared`: anywhere, the server and the
    /// clients competing for the same cores. `pinned`: a spawned server on
    /// CPU 0 and this process with its client processes on CPU 1 (taskset
    /// and sched_setaffinity), so the load generator does not take the
    /// server's core; use with `--workers 1`. `both` (compare only): every
    /// target in each layout, in one invocation.
    #[arg(long, value_enum, default_value = "shared", global = true)]
    layout: LayoutArg,
    /// Write every figure as JSON here.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Write the latency distribution as an SVG chart here.
    #[arg(long, global = true)]
    svg: Option<PathBuf>,
}

/// The scenarios, plus the hidden helpers that client processes run.
#[derive(Subcommand, Clone)]
enum Cmd {
    /// Hold N idle connections subscribed to K channels; memory per connection.
    Idle(IdleArgs),
    /// Handshakes per second (comet: optionally authorized users).
    Connect(ConnectArgs),
    /// S subscribers over C channels, R publishes per second.
    Fanout(FanoutArgs),
    /// comet: U users x D devices, users_messages at R per second.
    Private(PrivateArgs),
    /// comet: pipelined CometQL INSERTs to subscribers of one channel.
    Publish(PublishArgs),
    /// comet: users connecting, authorizing and leaving while private messages flow.
    Churn(ChurnArgs),
    /// comet: clients that stop reading; bounded server memory, 4008 closes.
    Slow(SlowArgs),
    /// comet: hostile traffic, one attack of the hardening issue per scenario,
    /// with the issue's targets printed as PASS/FAIL.
    Attack {
        #[command(subcommand)]
        scenario: attack::Attack,
    },
    /// comet: `private` or `publish` with --durability sync, --durability
    /// async and --ephemeral in one run (fresh temp data dirs); prints each
    /// one's INSERT/s as a share of --ephemeral's.
    Durability {
        /// Rounds of the three modes, each round in another order (sync,
        /// async, ephemeral; then async, ephemeral, sync; ...), each mode's
        /// ratio taken against the ephemeral phase of its own round; prints
        /// every round and the medians. A busy moment on a shared machine
        /// then moves one round, not the result. 1: the single run as before.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// A second comet binary run in every round too, alternating with
        /// `--comet-bin` (e.g. main's build against a branch's): the same
        /// rounds, medians for each.
        #[arg(long)]
        base_bin: Option<PathBuf>,
        #[command(subcommand)]
        scenario: DurabilityScenario,
    },
    /// comet: start-up time and RSS with N users with keys and N queued
    /// messages in the data dir, against --ephemeral holding the same.
    StoreLoad {
        #[arg(long, default_value_t = 1_000_000)]
        users: usize,
    },
    /// Run a scenario against comet, nchan and node-ws; print comet/peer ratios.
    Compare {
        #[command(subcommand)]
        scenario: CompareScenario,
    },
    /// In-process: memory of offline users with queued messages.
    UsersMem {
        #[arg(long, default_value_t = 1_000_000)]
        users: u64,
        #[arg(long, default_value_t = 1)]
        queued: usize,
    },
    /// In-process: CPU cost of one non-blocking send per delivery on
    /// loopback, the floor under any server that writes each delivery with
    /// its own syscall (comet, nchan, node-ws alike).
    SendFloor {
        #[arg(long, default_value_t = 10_000)]
        sockets: usize,
        #[arg(long, default_value_t = 100)]
        rounds: usize,
        /// Bytes per message (a comet frame for a short message is ~90).
        #[arg(long, default_value_t = 90)]
        size: usize,
        /// Submit each round's sends as one io_uring batch instead of one
        /// send(2) per socket, to measure what batching could save.
        #[arg(long)]
        uring: bool,
    },
    /// In-process: server CPU per wss record through comet's TLS adapter,
    /// ring's expanded record keys against comet's compact ones, for every
    /// ECDSA cipher suite.
    TlsRecords {
        #[arg(long, default_value_t = 20_000)]
        records: usize,
        /// Plaintext bytes per record (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = [90usize, 2048, 16384])]
        sizes: Vec<usize>,
    },
    /// In-process: CPU of one permessage-deflate compression of a published
    /// message (what a compressed publish pays once, for all subscribers).
    DeflateCost {
        #[arg(long, default_value_t = 2048)]
        bytes: usize,
        #[arg(long, default_value_t = 5_000)]
        iterations: usize,
    },
    /// In-process: CPU of one sleep and wake-up of a thread woken from the
    /// other CPU, waiting in epoll_wait, poll or io_uring_enter (what a
    /// latency-bound handshake pays per round trip).
    WakeCost {
        #[arg(long, default_value_t = 20_000)]
        rounds: usize,
    },
    /// In-process: time the CometQL lexer, parser and planner.
    Parse {
        #[arg(long, default_value_t = 200_000)]
        iterations: usize,
    },
    /// comet: a reconnect storm. C clients (over several processes and
    /// source addresses, every K-th an authorized user) are subscribed, the
    /// server restarts on the same ports, and all reconnect with jittered
    /// backoff: time until all are subscribed, failed connects, CPU, peak RSS.
    Storm(StormArgs),
    /// comet: fan-out through N nodes over one redis-server (`--redis`)
    /// against one node with the same subscribers: deliveries/s, p99, and
    /// CPU per delivery of the comets and redis-server together.
    Cluster(cluster::ClusterArgs),
    /// comet: writes of keys and user data through a cluster node (OK once
    /// Redis has them) against one comet with a data dir, and how long a
    /// node joining the cluster takes to load the state from Redis.
    ClusterState {
        #[arg(long, default_value_t = 100_000)]
        users: usize,
    },
    /// (internal) one client process of `storm`.
    #[command(hide = true)]
    StormClient {
        #[command(flatten)]
        a: StormArgs,
        #[arg(long)]
        offset: usize,
    },
    /// (internal) subscribers and their reader for `fanout --procs`.
    #[command(hide = true)]
    Sink {
        #[arg(long)]
        subs: usize,
        #[arg(long)]
        offset: usize,
        #[arg(long)]
        channels: usize,
        #[arg(long)]
        messages: usize,
    },
    /// (internal) hold connections for `idle --procs`.
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        channels: usize,
        #[arg(long)]
        offset: usize,
    },
}

/// The scenarios that every target (comet, nchan, node-ws) can run.
#[derive(Subcommand, Clone)]
enum DurabilityScenario {
    Private(PrivateArgs),
    Publish(PublishArgs),
}

/// The scenarios `compare` runs.
#[derive(Subcommand, Clone)]
enum CompareScenario {
    Idle(IdleArgs),
    Connect(ConnectArgs),
    Fanout(FanoutArgs),
}

/// Sizes of `idle`.
#[derive(Args, Clone)]
struct IdleArgs {
    #[arg(long, default_value_t = 10_000)]
    conns: usize,
    /// Channels per connection (peers take one channel per connection).
    #[arg(long, default_value_t = 2)]
    channels: usize,
    /// Client processes to spread the connections over.
    #[arg(long, default_value_t = 1)]
    procs: usize,
}

/// Sizes of `connect`.
#[derive(Args, Clone)]
struct ConnectArgs {
    #[arg(long, default_value_t = 5_000)]
    conns: usize,
    /// comet: connect as users with keys set through CometQL.
    #[arg(long)]
    auth: bool,
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// comet: name the channel in the upgrade URL (`url`, the peers'
    /// shape: one request per connection) or in a `subscription` message
    /// after `serverInfo` (`message`, CppComet's clients: two).
    #[arg(long, value_enum, default_value = "url")]
    subscribe: target::Via,
    /// Handshakes in flight per client thread, on non-blocking sockets (a
    /// reconnect storm); 1 waits for each answer before the next connect.
    #[arg(long, default_value_t = 1)]
    inflight: usize,
}

/// Sizes of `storm`.
#[derive(Args, Clone)]
struct StormArgs {
    #[arg(long, default_value_t = 15_000)]
    clients: usize,
    /// Client processes (one may hold at most 20,000 descriptors here).
    #[arg(long, default_value_t = 3)]
    procs: usize,
    /// Every K-th client is an authorized user (0: none).
    #[arg(long, default_value_t = 10)]
    auth_every: usize,
    #[arg(long, default_value_t = 100)]
    channels: usize,
    /// Attempts per client before it gives up.
    #[arg(long, default_value_t = 20)]
    retries: u32,
    /// Connecting threads per client process.
    #[arg(long, default_value_t = 16)]
    threads: usize,
}

/// Sizes and rate of `fanout`.
#[derive(Args, Clone)]
struct FanoutArgs {
    #[arg(long, default_value_t = 10_000)]
    subs: usize,
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Publishes per second (all channels together).
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Reader threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Client processes to spread the subscribers over (one process may
    /// hold at most 20,000 descriptors here).
    #[arg(long, default_value_t = 1)]
    procs: usize,
    /// Pad each published message with compressible text to this many
    /// bytes (0: the timestamp alone).
    #[arg(long, default_value_t = 0)]
    message_bytes: usize,
}

/// Sizes and rate of `private`.
#[derive(Args, Clone)]
struct PrivateArgs {
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    #[arg(long, default_value_t = 1)]
    devices: usize,
    #[arg(long, default_value_t = 4)]
    conns: usize,
    /// users_messages per second in all (0: as fast as the window allows).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// INSERTs per backend connection.
    #[arg(long, default_value_t = 25_000)]
    inserts: usize,
    #[arg(long, default_value_t = 64)]
    window: usize,
}

/// Sizes of `publish`.
#[derive(Args, Clone)]
struct PublishArgs {
    #[arg(long, default_value_t = 1000)]
    subs: usize,
    #[arg(long, default_value_t = 4)]
    conns: usize,
    #[arg(long, default_value_t = 5000)]
    inserts: usize,
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Messages the channel keeps in its history (pipes_settings); 0: none,
    /// so nothing is written to the store.
    #[arg(long, default_value_t = 0)]
    history: u32,
    /// Also publish over the HTTP API (pipelined keep-alive POSTs, the same
    /// sizes), after the CometQL run against the same server: the two are
    /// reported side by side, as `comet` and `comet-http`.
    #[arg(long)]
    http: bool,
}

/// How `publish` reaches comet.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Pipelined INSERTs over the MySQL protocol.
    CometQl,
    /// Pipelined `POST /api/pipes_messages` on keep-alive connections.
    Http,
}

/// Sizes and rate of `churn`.
#[derive(Args, Clone)]
struct ChurnArgs {
    #[arg(long, default_value_t = 2000)]
    users: usize,
    /// Devices connected at any time.
    #[arg(long, default_value_t = 500)]
    online: usize,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Private messages per second.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Bytes of random letters added to each message (they do not
    /// compress, as the store's journal would compress filler).
    #[arg(long, default_value_t = 0)]
    message_bytes: usize,
}

/// Sizes of `slow`.
#[derive(Args, Clone)]
struct SlowArgs {
    /// Clients that never read.
    #[arg(long, default_value_t = 50)]
    slow: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 16_384)]
    size: usize,
    #[arg(long, default_value_t = 2000)]
    messages: usize,
}

/// `--layout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LayoutArg {
    Shared,
    Pinned,
    Both,
}

fn main() {
    let cli = Cli::parse();
    let g = cli.g.clone();
    let layout = match g.layout {
        LayoutArg::Pinned => Layout::Pinned,
        LayoutArg::Shared | LayoutArg::Both => Layout::Shared,
    };
    layout.enter().unwrap_or_else(|e| die(&format!("--layout {}: {e}", layout.name())));
    if g.layout == LayoutArg::Both && !matches!(cli.cmd, Cmd::Compare { .. }) {
        die("--layout both: compare only");
    }
    wire::OFFER_DEFLATE.store(g.deflate, std::sync::atomic::Ordering::Relaxed);
    let results: Vec<Figures> = match cli.cmd {
        Cmd::Compare { scenario } => compare(&g, scenario),
        Cmd::Durability { rounds, base_bin, scenario } if rounds > 1 || base_bin.is_some() => {
            durability_rounds(&g, scenario, rounds.max(1), base_bin)
        }
        Cmd::Durability { scenario, .. } => durability(&g, scenario),
        Cmd::StoreLoad { users } => {
            store_load(&g, users);
            return;
        }
        Cmd::ClusterState { users } => {
            cluster_state::cluster_state(&g, users);
            return;
        }
        Cmd::Attack { scenario } => match attack::main(&g, &scenario) {
            Some(f) => vec![f],
            None => return,
        },
        Cmd::UsersMem { users, queued } => {
            users_mem(users, queued);
            return;
        }
        Cmd::Parse { iterations } => {
            parse_bench(iterations);
            return;
        }
        Cmd::TlsRecords { records, ref sizes } => {
            micro::tls_records(records, sizes);
            return;
        }
        Cmd::DeflateCost { bytes, iterations } => {
            micro::deflate_cost(bytes, iterations);
            return;
        }
        Cmd::WakeCost { rounds } => {
            micro::wake_cost(rounds);
            return;
        }
        Cmd::SendFloor { sockets, rounds, size, uring } => {
            send_floor(sockets, rounds, size, uring);
            return;
        }
        Cmd::Hold { conns, channels, offset } => {
            hold(&g, conns, channels, offset);
            return;
        }
        Cmd::StormClient { a, offset } => {
            storm::client(&g, &a, offset);
            return;
        }
        Cmd::Storm(a) => vec![storm::storm(&g, &a)],
        Cmd::Cluster(a) => cluster::cluster(&g, &a),
        Cmd::Sink { subs, offset, channels, messages } => {
            sink(&g, subs, offset, channels, messages);
            return;
        }
        Cmd::Publish(a) if a.http => {
            let t = target_for(&g, g.target).unwrap_or_else(|e| die(&format!("cannot start {}: {e}", g.target.name())));
            let cometql = comet_only(&t, "publish", || publish(&g, &t, &a, Via::CometQl));
            vec![cometql, publish(&g, &t, &a, Via::Http)]
        }
        cmd if !g.variant_args.is_empty() => variants(&g, &cmd),
        cmd => {
            let t = target_for(&g, g.target).unwrap_or_else(|e| die(&format!("cannot start {}: {e}", g.target.name())));
            vec![run(&g, &t, &cmd)]
        }
    };
    let mut results = results;
    for f in results.iter_mut().filter(|f| f.layout.is_empty()) {
        f.layout = layout.name().into();
    }
    let mut layouts: Vec<&str> = results.iter().map(|f| f.layout.as_str()).collect();
    layouts.dedup();
    for l in &layouts {
        let these: Vec<&Figures> = results.iter().filter(|f| f.layout == *l).collect();
        if layouts.len() > 1 {
            println!("layout: {l}");
        }
        report::print_table(&these);
        report::print_ratios(&these);
    }
    if let Some(p) = &g.json {
        let text = serde_json::to_string_pretty(&results).expect("json");
        std::fs::write(p, text).unwrap_or_else(|e| die(&format!("cannot write {}: {e}", p.display())));
    }
    if let Some(p) = &g.svg {
        std::fs::write(p, report::svg(&results)).unwrap_or_else(|e| die(&format!("cannot write {}: {e}", p.display())));
    }
}

fn die(msg: &str) -> ! {
    eprintln!("comet-bench: {msg}");
    std::process::exit(1);
}

fn spawn_opts(g: &Global) -> Spawn {
    let bench_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Spawn {
        comet_bin: g.comet_bin.clone(),
        workers: g.workers,
        io: g.io.clone(),
        password: g.password.clone(),
        bench_dir,
        extra_args: g.server_args.clone(),
        log: std::env::var_os("COMET_BENCH_SERVER_LOG").map(PathBuf::from),
        lift_per_ip_limit: true,
        pin_cpu: (g.layout == LayoutArg::Pinned).then_some(proc::SERVER_CPU),
        tls: g.wss,
    }
}

fn target_for(g: &Global, kind: Kind) -> std::io::Result<Target> {
    if g.spawn {
        Target::spawn(kind, &spawn_opts(g))
    } else {
        let mut t = Target::attach(kind, g.server, (kind == Kind::Comet).then_some(g.backend), &g.password, g.pid);
        t.api = (kind == Kind::Comet).then_some(g.api);
        Ok(t)
    }
}

fn run(g: &Global, t: &Target, cmd: &Cmd) -> Figures {
    if t.tls.is_some() && !matches!(cmd, Cmd::Idle(_) | Cmd::Connect(_) | Cmd::Fanout(_)) {
        die("wss targets run idle, connect and fanout only (the other scenarios read raw WebSocket frames)");
    }
    match cmd {
        Cmd::Idle(a) => idle(g, t, a),
        Cmd::Connect(a) => connect(g, t, a),
        Cmd::Fanout(a) => fanout(g, t, a),
        Cmd::Private(a) => comet_only(t, "private", || private(g, t, a)),
        Cmd::Publish(a) => comet_only(t, "publish", || publish(g, t, a, Via::CometQl)),
        Cmd::Churn(a) => comet_only(t, "churn", || churn(g, t, a)),
        Cmd::Slow(a) => comet_only(t, "slow", || slow(g, t, a)),
        _ => unreachable!("handled in main"),
    }
}

/// The scenario against a spawned comet, then against one spawned with
/// `--variant-arg`s added; the second row is named after them.
fn variants(g: &Global, cmd: &Cmd) -> Vec<Figures> {
    if !g.spawn || g.target != Kind::Comet {
        die("--variant-arg needs --spawn and --target comet");
    }
    let mut out = Vec::new();
    let mut gv = g.clone();
    gv.server_args.extend(g.variant_args.iter().cloned());
    for (i, g) in [g, &gv].into_iter().enumerate() {
        let t = target_for(g, Kind::Comet).unwrap_or_else(|e| die(&format!("cannot start comet: {e}")));
        let mut f = run(g, &t, cmd);
        if i == 1 {
            // Short enough for the table's column: "write-delay=20".
            f.target = g.variant_args.iter().map(|a| a.trim_start_matches('-')).collect::<Vec<_>>().join(",");
        }
        out.push(f);
        drop(t);
        std::thread::sleep(Duration::from_millis(500));
    }
    let r = |a: f64, b: f64| if b > 0.0 { format!("{:.2}", a / b) } else { "n/a".into() };
    let (base, var) = (&out[0], &out[1]);
    println!(
        "comet {} / comet: CPU per delivery {}, p99 latency {:.1} ms vs {:.1} ms ({:+.1} ms)",
        g.variant_args.join(" "),
        r(var.cpu_s_per_million, base.cpu_s_per_million),
        var.p99_ms,
        base.p99_ms,
        var.p99_ms - base.p99_ms
    );
    out
}

fn comet_only(t: &Target, what: &str, f: impl FnOnce() -> Figures) -> Figures {
    if t.kind != Kind::Comet {
        die(&format!("{what} speaks CometQL and comet's user protocol: --target comet only"));
    }
    f()
}

fn compare(g: &Global, scenario: CompareScenario) -> Vec<Figures> {
    let mut g = g.clone();
    g.spawn = true;
    let cmd = match scenario {
        CompareScenario::Idle(a) => Cmd::Idle(a),
        CompareScenario::Connect(a) => Cmd::Connect(a),
        CompareScenario::Fanout(a) => Cmd::Fanout(a),
    };
    let layouts: &[Layout] = match g.layout {
        LayoutArg::Shared => &[Layout::Shared],
        LayoutArg::Pinned => &[Layout::Pinned],
        LayoutArg::Both => &[Layout::Shared, Layout::Pinned],
    };
    let mut out = Vec::new();
    for &layout in layouts {
        layout.enter().unwrap_or_else(|e| die(&format!("--layout {}: {e}", layout.name())));
        g.layout = if layout == Layout::Pinned { LayoutArg::Pinned } else { LayoutArg::Shared };
        for kind in [Kind::Comet, Kind::Nchan, Kind::Node] {
            eprintln!("compare: {} ({})", kind.name(), layout.name());
            match target_for(&g, kind) {
                Ok(t) => {
                    let mut f = run(&g, &t, &cmd);
                    f.layout = layout.name().into();
                    out.push(f);
                }
                Err(e) => eprintln!("compare: cannot start {}: {e} (skipped)", kind.name()),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    out
}

/// Runs a CometQL scenario against comet with each durability setting.
fn durability(g: &Global, scenario: DurabilityScenario) -> Vec<Figures> {
    let cmd = durability_cmd(scenario);
    let mut out: Vec<Figures> = Vec::new();
    for mode in ["sync", "async", "ephemeral"] {
        out.push(durability_phase(g, &cmd, mode));
    }
    let rate = |f: &Figures| f.extra.get("INSERTs/s").copied().unwrap_or(0.0);
    if let Some(eph) = out.iter().find(|f| f.target == "comet ephemeral").map(rate) {
        for f in &out {
            println!("{}: {:.0} INSERT/s, {:.0}% of ephemeral", f.target, rate(f), 100.0 * rate(f) / eph.max(1.0));
        }
    }
    out
}

fn durability_cmd(scenario: DurabilityScenario) -> Cmd {
    match scenario {
        DurabilityScenario::Private(a) => Cmd::Private(a),
        DurabilityScenario::Publish(a) => Cmd::Publish(a),
    }
}

/// One spawned comet in durability `mode` (`sync`, `async` or
/// `ephemeral`, on a fresh data dir) running `cmd`.
fn durability_phase(g: &Global, cmd: &Cmd, mode: &str) -> Figures {
    let mut g = g.clone();
    g.spawn = true;
    let dir = std::env::temp_dir().join(format!("comet-bench-store-{}-{mode}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if mode == "ephemeral" {
        g.server_args.push("--ephemeral".into());
    } else {
        g.server_args.extend(["--data-dir".into(), dir.to_string_lossy().into_owned()]);
        g.server_args.extend(["--durability".into(), mode.into()]);
    }
    eprintln!("durability: {mode} ({})", g.comet_bin.display());
    let mut f = match Target::spawn(Kind::Comet, &spawn_opts(&g)) {
        Ok(t) => run(&g, &t, cmd),
        Err(e) => die(&format!("cannot start comet: {e}")),
    };
    f.target = format!("comet {mode}");
    let _ = std::fs::remove_dir_all(&dir);
    std::thread::sleep(Duration::from_millis(500));
    f
}

/// `durability --rounds N [--base-bin B]`: the three modes (of each
/// binary) in every round, in an order that rotates from round to round;
/// each ratio against the ephemeral phase of the same binary and round;
/// medians at the end.
fn durability_rounds(g: &Global, scenario: DurabilityScenario, rounds: usize, base: Option<PathBuf>) -> Vec<Figures> {
    let cmd = durability_cmd(scenario);
    let modes = ["sync", "async", "ephemeral"];
    let mut bins = vec![("this", g.comet_bin.clone())];
    if let Some(b) = base {
        bins.push(("base", b));
    }
    let rate = |f: &Figures| f.extra.get("INSERTs/s").copied().unwrap_or(0.0);
    let cpu =
        |f: &Figures| f.extra.iter().find(|(k, _)| k.starts_with("server CPU µs per")).map_or(f64::NAN, |(_, v)| *v);
    // (binary, mode) -> INSERT/s, ratio, CPU per round.
    type Rows = std::collections::BTreeMap<(usize, usize), Vec<(f64, f64, f64)>>;
    let mut table: Rows = Default::default();
    let mut out = Vec::new();
    for r in 0..rounds {
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let load: String = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
        // Rotate the order of the modes and of the binaries.
        let mut phases: Vec<(usize, usize)> = Vec::new();
        for i in 0..bins.len() {
            let b = (i + r) % bins.len();
            for j in 0..modes.len() {
                phases.push((b, (j + r) % modes.len()));
            }
        }
        let mut got: std::collections::BTreeMap<(usize, usize), Figures> = Default::default();
        for (b, m) in phases {
            let mut gb = g.clone();
            gb.comet_bin = bins[b].1.clone();
            let mut f = durability_phase(&gb, &cmd, modes[m]);
            f.target = format!("comet {} {} round {}", bins[b].0, modes[m], r + 1);
            got.insert((b, m), f);
        }
        for (b, (name, _)) in bins.iter().enumerate() {
            let eph = got.get(&(b, 2)).map(rate).unwrap_or(0.0).max(1.0);
            let mut line = format!("round {} ({name}, load {load}):", r + 1);
            for (m, mode) in modes.iter().enumerate() {
                let f = &got[&(b, m)];
                let row = (rate(f), 100.0 * rate(f) / eph, cpu(f));
                line += &format!(" {mode} {:.0}/s {:.0}% {:.1} µs;", row.0, row.1, row.2);
                table.entry((b, m)).or_default().push(row);
            }
            println!("{}", line.trim_end_matches(';'));
        }
        out.extend(got.into_values());
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
    };
    for (b, (name, bin)) in bins.iter().enumerate() {
        println!("median of {rounds} rounds, {name} ({}):", bin.display());
        for (m, mode) in modes.iter().enumerate() {
            let rows = &table[&(b, m)];
            let ratios: Vec<String> = rows.iter().map(|r| format!("{:.0}", r.1)).collect();
            println!(
                "  {mode}: {:.0} INSERT/s, {:.0}% of ephemeral (rounds: {}%), {:.1} µs server CPU per message",
                median(rows.iter().map(|r| r.0).collect()),
                median(rows.iter().map(|r| r.1).collect()),
                ratios.join(", "),
                median(rows.iter().map(|r| r.2).collect()),
            );
        }
    }
    out
}

/// RSS of a process in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

/// Fills a comet with `users` keys and as many queued messages, in
/// multi-row INSERTs.
fn fill_users(t: &Target, users: usize) {
    let back = t.back.expect("comet backend");
    let mut s = wire::mysql_login(&back, &t.password).expect("CometQL login");
    for start in (1..=users).step_by(1000) {
        let end = (start + 999).min(users);
        let keys: Vec<String> = (start..=end).map(|u| format!("({u}, 'key-of-user-{u}')")).collect();
        wire::mysql_exec(&mut s, &format!("INSERT INTO users_auth (id, hash) VALUES {}", keys.join(",")))
            .expect("keys");
        let msgs: Vec<String> = (start..=end).map(|u| format!("({u}, 'bench', 'queued message for {u}')")).collect();
        wire::mysql_exec(&mut s, &format!("INSERT INTO users_messages (id, event, message) VALUES {}", msgs.join(",")))
            .expect("messages");
        if start % 100_000 == 1 {
            eprint!("\rstore-load: {end}/{users}   ");
        }
    }
    eprintln!();
}

/// Start-up time and RSS with `users` users and queued messages loaded
/// from the data dir, and RSS of --ephemeral holding the same.
fn store_load(g: &Global, users: usize) {
    let dir = std::env::temp_dir().join(format!("comet-bench-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut g = g.clone();
    // Long queue TTL: the messages must still be there at the restart.
    g.server_args.extend(["--offline-queue-ttl".into(), "86400".into()]);
    let mut eg = g.clone();
    eg.server_args.push("--ephemeral".into());
    let t = Target::spawn(Kind::Comet, &spawn_opts(&eg)).unwrap_or_else(|e| die(&format!("cannot start comet: {e}")));
    fill_users(&t, users);
    let rss_ephemeral = rss_kib(t.pid.unwrap_or(0));
    drop(t);
    let mut dg = g.clone();
    dg.server_args.extend(["--data-dir".into(), dir.to_string_lossy().into_owned()]);
    dg.server_args.extend(["--durability".into(), "async".into()]);
    let t = Target::spawn(Kind::Comet, &spawn_opts(&dg)).unwrap_or_else(|e| die(&format!("cannot start comet: {e}")));
    fill_users(&t, users);
    let rss_filled = rss_kib(t.pid.unwrap_or(0));
    drop(t);
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let t = Target::spawn(Kind::Comet, &spawn_opts(&dg)).unwrap_or_else(|e| die(&format!("cannot start comet: {e}")));
    let start_ms = started.elapsed().as_secs_f64() * 1000.0;
    std::thread::sleep(Duration::from_millis(500));
    let rss_loaded = rss_kib(t.pid.unwrap_or(0));
    let back = t.back.expect("comet backend");
    let mut s = wire::mysql_login(&back, &t.password).expect("CometQL login");
    let probe = format!("SELECT message FROM users_messages WHERE id = {users}");
    let q = {
        let mut q = vec![0x03];
        q.extend_from_slice(probe.as_bytes());
        let mut b = Vec::new();
        wire::mysql_packet(&mut b, 0, &q);
        b
    };
    s.write_all(&q).expect("probe");
    // Column count, column, EOF, then a row (or EOF when there is none).
    for _ in 0..3 {
        wire::mysql_read(&mut s).expect("probe answer");
    }
    let row = wire::mysql_read(&mut s).expect("probe row");
    let found = row.first() != Some(&0xFE);
    drop(t);
    let du = dir_size(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    println!("store-load: {users} users with keys and {users} queued messages");
    println!("  start-up (spawn to listening, load included): {start_ms:.0} ms");
    println!("  RSS --ephemeral after filling:       {rss_ephemeral} KiB");
    println!("  RSS with the store after filling:    {rss_filled} KiB");
    println!(
        "  RSS after a restart that loaded it:  {rss_loaded} KiB ({:.2}x ephemeral)",
        rss_loaded as f64 / rss_ephemeral.max(1) as f64
    );
    println!("  data dir: {} MiB", du / (1 << 20));
    println!("  the last user's queued message after the restart: {}", if found { "there" } else { "MISSING" });
}

/// Bytes of the files under `dir`.
fn dir_size(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                total += e.metadata().map_or(0, |m| m.len());
            }
        }
    }
    total
}

fn source(g: &Global, i: usize) -> u8 {
    1 + (i % g.sources.max(1) as usize) as u8
}

fn progress(what: &str, done: usize, total: usize, failed: usize) {
    if done.is_multiple_of(500) || done == total {
        eprint!("\r{what}: {done}/{total} ({failed} failed)   ");
        if done == total {
            eprintln!();
        }
    }
}

/// Starts this binary as a client process running a hidden subcommand
/// (`args`) against `t`; returns it, its stdout, and its first line. The
/// child's stdin is a pipe: closing it tells a `hold` child to let go.
fn client_process(
    g: &Global,
    t: &Target,
    args: &[&str],
) -> (std::process::Child, std::io::BufReader<std::process::ChildStdout>, String) {
    let mut child = std::process::Command::new(std::env::current_exe().expect("own path"))
        .args(args)
        .args(["--target", t.kind.name_arg(), "--server", &t.front.to_string(), "--sources", &g.sources.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| die(&format!("cannot start a client process: {e}")));
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).ok();
    (child, out, line)
}

fn idle_channels(t: &Target, i: usize, channels: usize) -> String {
    let names: Vec<String> = (0..channels.max(1)).map(|k| format!("bench_idle_{}", (i + k * 7) % 100)).collect();
    match t.kind {
        Kind::Comet => names.join("\n"),
        // A peer subscriber names one channel in its URL.
        Kind::Nchan | Kind::Node => names[0].clone(),
    }
}

fn idle(g: &Global, t: &Target, a: &IdleArgs) -> Figures {
    let mut f = Figures { scenario: "idle".into(), target: t.kind.name().into(), ..Figures::default() };
    std::thread::sleep(Duration::from_millis(300));
    f.rss_kib_before = t.rss_kib().unwrap_or(0);
    let (tcp0, slab0) = proc::kernel_mem_kib();
    let mut held = Vec::new();
    let mut children = Vec::new();
    if a.procs > 1 && t.tls.is_some() {
        die("idle --procs: the client processes speak plain ws only; wss (--tls-cert=auto) runs in one process");
    }
    if a.procs <= 1 {
        for i in 0..a.conns {
            match t.subscribe(source(g, i), &idle_channels(t, i, a.channels), &format!("i{i}")) {
                Ok(s) => held.push(s),
                Err(_) => f.failed_connections += 1,
            }
            progress("idle", i + 1, a.conns, f.failed_connections as usize);
        }
    } else {
        let per = a.conns.div_ceil(a.procs);
        for p in 0..a.procs {
            let n = per.min(a.conns.saturating_sub(p * per));
            let args = [
                "hold",
                "--conns",
                &n.to_string(),
                "--channels",
                &a.channels.to_string(),
                "--offset",
                &(p * per).to_string(),
            ];
            let (child, _out, line) = client_process(g, t, &args);
            let failed: u64 = line
                .trim()
                .strip_prefix("held ")
                .and_then(|r| r.split(' ').nth(1))
                .and_then(|x| x.parse().ok())
                .unwrap_or(n as u64);
            f.failed_connections += failed;
            eprintln!("idle: client process {p} holds {} of {n}", n as u64 - failed.min(n as u64));
            children.push(child);
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    f.connections = a.conns as u64 - f.failed_connections;
    f.rss_kib_after = t.rss_kib().unwrap_or(0);
    let (tcp1, slab1) = proc::kernel_mem_kib();
    let n = f.connections.max(1) as f64;
    f.rss_bytes_per_conn = (f.rss_kib_after as f64 - f.rss_kib_before as f64) * 1024.0 / n;
    f.kernel_tcp_bytes_per_conn = (tcp1 as f64 - tcp0 as f64) * 1024.0 / n;
    f.kernel_slab_bytes_per_conn = (slab1 as f64 - slab0 as f64) * 1024.0 / n;
    f.extra.insert("kernel SUnreclaim bytes/conn (both ends)".into(), f.kernel_slab_bytes_per_conn);
    f.extra.insert("kernel TCP mem bytes/conn (both ends)".into(), f.kernel_tcp_bytes_per_conn);
    drop(held);
    for mut c in children {
        drop(c.stdin.take());
        let _ = c.wait();
    }
    f
}

impl Kind {
    fn name_arg(self) -> &'static str {
        match self {
            Kind::Comet => "comet",
            Kind::Nchan => "nchan",
            Kind::Node => "node",
        }
    }
}

/// Child process of `idle --procs`: opens connections, reports, then holds
/// them until its stdin closes.
fn hold(g: &Global, conns: usize, channels: usize, offset: usize) {
    let t = Target::attach(g.target, g.server, None, &g.password, None);
    let mut held = Vec::with_capacity(conns);
    let mut failed = 0;
    for i in offset..offset + conns {
        match t.subscribe(source(g, i), &idle_channels(&t, i, channels), &format!("i{i}")) {
            Ok(s) => held.push(s),
            Err(_) => failed += 1,
        }
    }
    println!("held {} {failed}", held.len());
    let _ = std::io::stdout().flush();
    let mut sink = String::new();
    let _ = std::io::stdin().read_line(&mut sink);
}

fn connect(g: &Global, t: &Target, a: &ConnectArgs) -> Figures {
    let shape = match (a.auth, a.subscribe) {
        (true, _) => "authorized".to_string(),
        (false, via) => format!("subscribe {}", if via == target::Via::Url { "url" } else { "message" }),
    };
    let mut f = Figures {
        scenario: format!("connect ({shape}, inflight {})", a.inflight.max(1)),
        target: t.kind.name().into(),
        ..Figures::default()
    };
    if a.auth {
        if t.kind != Kind::Comet {
            die("connect --auth: authorized users exist only on comet");
        }
        set_user_keys(t, a.conns);
    }
    if a.inflight > 1 && (a.auth || t.tls.is_some()) {
        die("connect --inflight > 1: anonymous plaintext subscribers only (not --auth, not --wss)");
    }
    // Every thread holds its sockets until all have connected and the
    // server's CPU has been read: the figure is the handshakes alone, not
    // the closes. Then the server is asked how many it counts subscribed.
    let threads = a.threads.max(1);
    let (connected, counted) = (std::sync::Barrier::new(threads + 1), std::sync::Barrier::new(threads + 1));
    let (connected, counted) = (&connected, &counted);
    let cpu0 = t.cpu_precise();
    let sleeps0 = t.pid.map(proc::sleeps);
    let t0 = Instant::now();
    let per = a.conns.div_ceil(threads);
    let mut cpu1 = None;
    let mut sleeps1 = None;
    let mut subscribed = None;
    let results: Vec<(u64, u64)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|th| {
                sc.spawn(move || {
                    let range = (th * per).min(a.conns)..((th + 1) * per).min(a.conns);
                    // A thread that panics still meets both barriers (else
                    // the main thread waits for it forever), then panics.
                    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        if a.inflight > 1 {
                            inflight::open_range(t, range, a.inflight, a.subscribe, "bench_connect", |i| source(g, i))
                        } else {
                            let (mut keep, mut bad) = (Vec::with_capacity(per), 0u64);
                            for i in range {
                                let r = if a.auth {
                                    open_user(g, t, i % a.conns + 1, source(g, i))
                                } else {
                                    t.subscribe_via(source(g, i), "bench_connect", &format!("c{i}"), a.subscribe)
                                        .map(|s| s.sock)
                                };
                                match r {
                                    Ok(s) => keep.push(s),
                                    Err(_) => bad += 1,
                                }
                            }
                            (keep, bad)
                        }
                    }));
                    connected.wait();
                    counted.wait();
                    match opened {
                        Ok((keep, bad)) => (keep.len() as u64, bad),
                        Err(e) => std::panic::resume_unwind(e),
                    }
                })
            })
            .collect();
        connected.wait();
        f.seconds = t0.elapsed().as_secs_f64();
        cpu1 = t.cpu_precise();
        sleeps1 = t.pid.map(proc::sleeps);
        if !a.auth {
            // One publish: comet answers the connections written, the
            // peers their subscriber count.
            std::thread::sleep(Duration::from_millis(200));
            subscribed = t.publisher().and_then(|mut p| p.publish("bench_connect", "count")).ok();
        }
        counted.wait();
        hs.into_iter().map(|h| h.join().expect("connect thread")).collect()
    });
    f.connections = results.iter().map(|r| r.0).sum();
    f.failed_connections = results.iter().map(|r| r.1).sum();
    f.handshakes_per_sec = f.connections as f64 / f.seconds;
    if let (Some(a0), Some(a1)) = (cpu0, cpu1) {
        f.server_cpu_s = a1 - a0;
        f.extra.insert("server CPU µs per handshake".into(), (a1 - a0) * 1e6 / f.connections.max(1) as f64);
    }
    if let (Some(s0), Some(s1)) = (sleeps0, sleeps1) {
        f.extra
            .insert("server sleeps per handshake".into(), s1.saturating_sub(s0) as f64 / f.connections.max(1) as f64);
    }
    if let Some(n) = subscribed {
        f.extra.insert("subscribed (server count)".into(), n as f64);
    }
    f
}

/// Sets keys `k<uid>` for users 1..=n through CometQL.
fn set_user_keys(t: &Target, n: usize) {
    let back = t.back.unwrap_or_else(|| die("comet target without a backend address"));
    let mut s = wire::mysql_login(&back, &t.password).unwrap_or_else(|e| die(&format!("CometQL login: {e}")));
    for b in 0..n.div_ceil(1000) {
        let rows: Vec<String> = (b * 1000 + 1..=((b + 1) * 1000).min(n)).map(|u| format!("({u}, 'k{u}')")).collect();
        wire::mysql_exec(&mut s, &format!("INSERT INTO users_auth (id, hash) VALUES {}", rows.join(",")))
            .unwrap_or_else(|e| die(&format!("users_auth: {e}")));
    }
}

/// Opens a comet connection as user `uid` (key `k<uid>`); checks authorization.
fn open_user(_g: &Global, t: &Target, uid: usize, source: u8) -> std::io::Result<TcpStream> {
    let mut s = wire::connect_from(&t.front, source)?;
    wire::ws_handshake(&mut s, &format!("/ws/sesion=k{uid}&myid={uid}&devid=0&v=4.08&uuid=b{uid}&api=js"))?;
    let (_, info) = wire::read_frame(&mut s)?;
    if !info.starts_with(b"{\"authorized\":true") {
        return Err(std::io::Error::other(format!("not authorized: {}", String::from_utf8_lossy(&info))));
    }
    Ok(s)
}

/// Starts reader threads over `socks`; returns their join handles.
fn readers<S: Into<target::Sub> + Send + 'static>(
    socks: Vec<S>,
    threads: usize,
    expected_per_sock: f64,
) -> Vec<std::thread::JoinHandle<(u64, Histogram<u64>)>> {
    let per = socks.len().div_ceil(threads.max(1)).max(1);
    let mut socks = socks;
    let mut out = Vec::new();
    while !socks.is_empty() {
        let rest = socks.split_off(socks.len().min(per));
        let chunk = std::mem::replace(&mut socks, rest);
        let want = (chunk.len() as f64 * expected_per_sock).round() as u64;
        out.push(std::thread::spawn(move || report::read_all(chunk, want)));
    }
    out
}

fn gather(rs: Vec<std::thread::JoinHandle<(u64, Histogram<u64>)>>) -> (u64, Histogram<u64>) {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("histogram");
    let mut n = 0;
    for r in rs {
        let (got, h) = r.join().expect("reader");
        n += got;
        let _ = hist.add(&h);
    }
    (n, hist)
}

/// Messages per channel when `messages` publishes go round-robin over `channels`.
fn messages_per_channel(messages: usize, channels: usize) -> Vec<u64> {
    (0..channels.max(1)).map(|c| (0..messages).filter(|m| m % channels.max(1) == c).count() as u64).collect()
}

/// Child process of `fanout --procs`: opens its share of the subscribers,
/// reports them per channel, reads until every expected message arrived,
/// then prints the count and the latency histogram as JSON.
fn sink(g: &Global, subs: usize, offset: usize, channels: usize, messages: usize) {
    let t = Target::attach(g.target, g.server, None, &g.password, None);
    let mut socks = Vec::with_capacity(subs);
    let mut per_channel = vec![0u64; channels.max(1)];
    let mut failed = 0;
    for i in offset..offset + subs {
        let c = i % channels.max(1);
        match t.subscribe(source(g, i), &format!("bench_fan_{c}"), &format!("f{i}")) {
            Ok(s) => {
                socks.push(s);
                per_channel[c] += 1;
            }
            Err(_) => failed += 1,
        }
    }
    let counts: Vec<String> = per_channel.iter().map(u64::to_string).collect();
    println!("ready {failed} {}", counts.join(" "));
    let _ = std::io::stdout().flush();
    let mpc = messages_per_channel(messages, channels);
    let want: u64 = per_channel.iter().zip(&mpc).map(|(s, m)| s * m).sum();
    let (got, hist) = report::read_all(socks, want);
    let pairs: Vec<(u64, u64)> = hist.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect();
    println!("{}", serde_json::json!({ "got": got, "hist": pairs }));
}

fn fanout(g: &Global, t: &Target, a: &FanoutArgs) -> Figures {
    let mut f = Figures { scenario: "fanout".into(), target: t.kind.name().into(), ..Figures::default() };
    let chans: Vec<String> = (0..a.channels.max(1)).map(|c| format!("bench_fan_{c}")).collect();
    let messages = (a.rate * a.seconds).round().max(1.0) as usize;
    let mut socks = Vec::with_capacity(a.subs);
    let mut per_channel = vec![0u64; chans.len()];
    let mut children = Vec::new();
    if a.procs > 1 && t.tls.is_some() {
        die("fanout --procs: the client processes speak plain ws only; wss runs in one process");
    }
    if a.procs <= 1 {
        for i in 0..a.subs {
            let c = i % chans.len();
            match t.subscribe_reader(source(g, i), &chans[c], &format!("f{i}")) {
                Ok(s) => {
                    socks.push(s);
                    per_channel[c] += 1;
                }
                Err(_) => f.failed_connections += 1,
            }
            progress("fanout: subscribers", i + 1, a.subs, f.failed_connections as usize);
        }
    } else {
        let per = a.subs.div_ceil(a.procs);
        for p in 0..a.procs {
            let n = per.min(a.subs.saturating_sub(p * per));
            let (n_s, off_s, ch_s, m_s) =
                (n.to_string(), (p * per).to_string(), chans.len().to_string(), messages.to_string());
            let args = ["sink", "--subs", &n_s, "--offset", &off_s, "--channels", &ch_s, "--messages", &m_s];
            let (child, out, line) = client_process(g, t, &args);
            let mut words = line.split_whitespace().skip(1).map(|w| w.parse::<u64>().unwrap_or(0));
            f.failed_connections += words.next().unwrap_or(n as u64);
            for (c, v) in words.enumerate().take(chans.len()) {
                per_channel[c] += v;
            }
            eprintln!("fanout: client process {p} ready");
            children.push((child, out));
        }
    }
    f.connections = per_channel.iter().sum();
    let mut publisher = t.publisher().unwrap_or_else(|e| die(&format!("publisher: {e}")));
    // Wait until the server counts every subscriber: warm-up publishes carry
    // no timestamp, so readers do not count them.
    let deadline = Instant::now() + Duration::from_secs(30);
    for (c, name) in chans.iter().enumerate() {
        loop {
            let n = publisher.publish(name, "warmup").unwrap_or(0);
            if n >= per_channel[c]
                || Instant::now() > deadline
                || t.kind == Kind::Nchan && n == 0 && per_channel[c] == 0
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    if t.kind == Kind::Nchan {
        // nchan's publisher answer counts subscribers per worker lazily; give
        // the last subscriptions a moment instead.
        std::thread::sleep(Duration::from_millis(500));
    }
    f.messages = messages as u64;
    let mpc = messages_per_channel(messages, chans.len());
    f.expected = per_channel.iter().zip(&mpc).map(|(s, m)| s * m).sum();
    let per_sock = if socks.is_empty() { 0.0 } else { f.expected as f64 / f.connections.max(1) as f64 };
    report::PER_MESSAGE.lock().expect("per-message lock").clear();
    let rs = readers(socks, a.threads, per_sock);
    let cpu0 = t.cpu();
    let t0 = Instant::now();
    for m in 0..messages {
        let due = t0 + Duration::from_secs_f64(m as f64 / a.rate);
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        let mut text = wire::epoch_us().to_string();
        while text.len() < a.message_bytes {
            text.push_str(" user 4711 wrote: lorem ipsum dolor sit amet, consectetur;");
        }
        text.truncate(a.message_bytes.max(16).min(text.len()));
        if let Err(e) = publisher.publish(&chans[m % chans.len()], &text) {
            eprintln!("fanout: publish failed: {e}");
        }
        if m.is_multiple_of(20) {
            eprint!("\rfanout: published {m}/{messages}   ");
        }
    }
    eprintln!();
    let (mut got, mut hist) = gather(rs);
    let children_reported = children.len();
    for (mut child, mut out) in children {
        let mut line = String::new();
        out.read_line(&mut line).ok();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            got += v["got"].as_u64().unwrap_or(0);
            for pair in v["hist"].as_array().into_iter().flatten() {
                let (val, count) = (pair[0].as_u64().unwrap_or(1), pair[1].as_u64().unwrap_or(0));
                let _ = hist.record_n(val.max(1), count);
            }
        }
        let _ = child.wait();
    }
    f.seconds = t0.elapsed().as_secs_f64();
    f.delivered = got;
    f.set_throughput(t.cpu().zip(cpu0).map(|(b, a)| b - a));
    f.set_latency(&hist);
    // Readers in this process only (`--procs 1`): client processes report
    // their histograms alone.
    if children_reported == 0 {
        report::per_message_figures(&mut f);
    }
    f
}

fn private(g: &Global, t: &Target, a: &PrivateArgs) -> Figures {
    let mut f = Figures { scenario: "private".into(), target: t.kind.name().into(), ..Figures::default() };
    set_user_keys(t, a.users);
    let mut socks = Vec::with_capacity(a.users * a.devices);
    for i in 0..a.users * a.devices {
        match open_user(g, t, i % a.users + 1, source(g, i)) {
            Ok(s) => socks.push(s),
            Err(_) => f.failed_connections += 1,
        }
        progress("private: devices", i + 1, a.users * a.devices, f.failed_connections as usize);
    }
    f.connections = socks.len() as u64;
    let total = a.conns * a.inserts;
    f.messages = total as u64;
    f.expected = (total * a.devices) as u64;
    let rs = readers(socks, 2, f.expected as f64 / f.connections.max(1) as f64);
    let cpu0 = t.cpu();
    let t0 = Instant::now();
    let back = t.back.expect("comet backend");
    let conns = wire::mysql_logins_spread(&back, &t.password, a.conns, g.workers)
        .unwrap_or_else(|e| die(&format!("CometQL login: {e}")));
    let writers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(w, mut s)| {
            let (inserts, window, users, rate, conns) = (a.inserts, a.window, a.users, a.rate, a.conns);
            std::thread::spawn(move || {
                pipelined(&mut s, inserts, window, |i| {
                    if rate > 0.0 {
                        let due = t0 + Duration::from_secs_f64((i * conns + w) as f64 / rate);
                        if let Some(d) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(d);
                        }
                    }
                    let uid = (w * inserts + i) % users + 1;
                    let ts = wire::epoch_us();
                    format!("INSERT INTO users_messages (id, event, message) VALUES ({uid}, 'bench', '{ts}')")
                })
            })
        })
        .collect();
    finish_inserts(f, t, writers, rs, cpu0, t0, total, "server CPU µs per private message")
}

/// Joins the CometQL writers and the readers of an INSERT-driven run and
/// fills the throughput, latency and per-INSERT figures.
#[allow(clippy::too_many_arguments)]
fn finish_inserts(
    mut f: Figures,
    t: &Target,
    writers: Vec<std::thread::JoinHandle<u64>>,
    rs: Vec<std::thread::JoinHandle<(u64, Histogram<u64>)>>,
    cpu0: Option<f64>,
    t0: Instant,
    total: usize,
    per_insert_label: &str,
) -> Figures {
    let affected: u64 = writers.into_iter().map(|w| w.join().expect("writer")).sum();
    let insert_secs = t0.elapsed().as_secs_f64();
    let (got, hist) = gather(rs);
    f.seconds = t0.elapsed().as_secs_f64();
    f.delivered = got;
    f.set_throughput(t.cpu().zip(cpu0).map(|(b, a)| b - a));
    f.set_latency(&hist);
    f.extra.insert("INSERTs/s".into(), total as f64 / insert_secs);
    f.extra.insert("affected rows".into(), affected as f64);
    f.extra.insert(per_insert_label.into(), f.server_cpu_s * 1e6 / total as f64);
    f
}

/// Sends pipelined COM_QUERYs, at most `window` unanswered; returns the
/// summed affected rows.
fn pipelined(s: &mut TcpStream, count: usize, window: usize, query: impl Fn(usize) -> String) -> u64 {
    let mut reader = s.try_clone().expect("clone");
    let (tx, rx) = std::sync::mpsc::sync_channel::<()>(window);
    let collector = std::thread::spawn(move || {
        let mut sum = 0u64;
        for _ in 0..count {
            let p = wire::mysql_read(&mut reader).expect("answer");
            assert_eq!(p[0], 0, "query failed: {}", String::from_utf8_lossy(&p));
            let mut rest = &p[1..];
            sum += wire::lenenc(&mut rest);
            let _ = rx.recv();
        }
        sum
    });
    let mut buf = Vec::with_capacity(256);
    for i in 0..count {
        let mut q = vec![0x03];
        q.extend_from_slice(query(i).as_bytes());
        buf.clear();
        wire::mysql_packet(&mut buf, 0, &q);
        tx.send(()).expect("window");
        s.write_all(&buf).expect("write");
    }
    drop(tx);
    collector.join().expect("collector")
}

/// Sends pipelined keep-alive HTTP requests (`request(i)` gives each one's
/// bytes), at most `window` unanswered; returns the summed `"affected"`.
fn http_pipelined(s: &mut TcpStream, count: usize, window: usize, request: impl Fn(usize) -> Vec<u8>) -> u64 {
    let reader = s.try_clone().expect("clone");
    let (tx, rx) = std::sync::mpsc::sync_channel::<()>(window);
    let collector = std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(reader);
        let mut sum = 0u64;
        for _ in 0..count {
            let mut line = String::new();
            r.read_line(&mut line).expect("status line");
            assert!(line.starts_with("HTTP/1.1 200"), "request failed: {line}");
            let mut len = 0;
            loop {
                let mut h = String::new();
                r.read_line(&mut h).expect("header");
                let h = h.trim_end().to_ascii_lowercase();
                if h.is_empty() {
                    break;
                }
                if let Some(v) = h.strip_prefix("content-length:") {
                    len = v.trim().parse().expect("length");
                }
            }
            let mut body = vec![0u8; len];
            std::io::Read::read_exact(&mut r, &mut body).expect("body");
            let v: serde_json::Value = serde_json::from_slice(&body).expect("json answer");
            sum += v["affected"].as_u64().unwrap_or(0);
            let _ = rx.recv();
        }
        sum
    });
    for i in 0..count {
        tx.send(()).expect("window");
        s.write_all(&request(i)).expect("write");
    }
    drop(tx);
    collector.join().expect("collector")
}

fn publish(g: &Global, t: &Target, a: &PublishArgs, via: Via) -> Figures {
    let target = match via {
        Via::CometQl => t.kind.name().to_string(),
        Via::Http => format!("{}-http", t.kind.name()),
    };
    let mut f = Figures { scenario: "publish".into(), target, ..Figures::default() };
    let channel = if via == Via::Http { "bench_publish_http" } else { "bench_publish" };
    let mut socks = Vec::with_capacity(a.subs);
    for i in 0..a.subs {
        match t.subscribe(source(g, i), channel, &format!("p{i}")) {
            Ok(s) => socks.push(s),
            Err(_) => f.failed_connections += 1,
        }
    }
    f.connections = socks.len() as u64;
    if a.history > 0 {
        let back = t.back.expect("comet backend");
        let mut s = wire::mysql_login(&back, &t.password).expect("CometQL login");
        wire::mysql_exec(
            &mut s,
            &format!("INSERT INTO pipes_settings (name, length) VALUES ('{channel}', {})", a.history),
        )
        .expect("pipes_settings");
    }
    std::thread::sleep(Duration::from_millis(500));
    let total = a.conns * a.inserts;
    f.messages = total as u64;
    f.expected = f.connections * total as u64;
    let rs = readers(socks, 1, total as f64);
    let cpu0 = t.cpu();
    let t0 = Instant::now();
    let (back, api) = (t.back.expect("comet backend"), t.api);
    let mut sql = match via {
        Via::CometQl => wire::mysql_logins_spread(&back, &t.password, a.conns, g.workers)
            .unwrap_or_else(|e| die(&format!("CometQL login: {e}"))),
        Via::Http => Vec::new(),
    };
    let writers: Vec<_> = (0..a.conns)
        .map(|_| {
            let (password, inserts, window) = (t.password.clone(), a.inserts, a.window);
            let conn = sql.pop();
            std::thread::spawn(move || match via {
                Via::CometQl => {
                    let mut s = conn.expect("one connection per writer");
                    pipelined(&mut s, inserts, window, |_| {
                        let ts = wire::epoch_us();
                        format!("INSERT INTO pipes_messages (name, event, message) VALUES ('{channel}', 'bench', '{ts}')")
                    })
                }
                Via::Http => {
                    let api = api.expect("comet's HTTP API address (--api)");
                    let mut s = TcpStream::connect(api).expect("HTTP API connection");
                    let _ = s.set_nodelay(true);
                    http_pipelined(&mut s, inserts, window, |_| {
                        let body = format!(
                            "{{\"name\":\"{channel}\",\"event\":\"bench\",\"message\":\"{}\"}}",
                            wire::epoch_us()
                        );
                        format!(
                            "POST /api/pipes_messages HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {password}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .into_bytes()
                    })
                }
            })
        })
        .collect();
    // Over HTTP, one POST is one INSERT: the figures share their rows.
    finish_inserts(f, t, writers, rs, cpu0, t0, total, "server CPU µs per INSERT")
}

fn churn(g: &Global, t: &Target, a: &ChurnArgs) -> Figures {
    let mut f = Figures { scenario: "churn".into(), target: t.kind.name().into(), ..Figures::default() };
    set_user_keys(t, a.users);
    let back = t.back.expect("comet backend");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let cpu0 = t.cpu();
    let t0 = Instant::now();
    // The backend sends private messages to random users at `rate`.
    let sender = {
        let (stop, sent, password, users, rate) = (stop.clone(), sent.clone(), t.password.clone(), a.users, a.rate);
        let pad_len = a.message_bytes;
        std::thread::spawn(move || {
            let mut s = wire::mysql_login(&back, &password).expect("CometQL login");
            let mut rng = 0x9E37_79B9_7F4A_7C15u64;
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let due = t0 + Duration::from_secs_f64(i as f64 / rate);
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let uid = rng % users as u64 + 1;
                let mut pad = String::with_capacity(pad_len);
                let mut x = rng | 1;
                for _ in 0..pad_len {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    pad.push((b'a' + (x % 26) as u8) as char);
                }
                if wire::mysql_exec(
                    &mut s,
                    &format!("INSERT INTO users_messages (id, event, message) VALUES ({uid}, 'churn', 'm{i}{pad}')"),
                )
                .is_ok()
                {
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                i += 1;
            }
        })
    };
    // Devices come and go: each step replaces the oldest connection with a
    // new user's, reading what arrived before it closes.
    let mut online: std::collections::VecDeque<TcpStream> = std::collections::VecDeque::new();
    let (mut connects, mut live, mut queued, mut failed) = (0u64, 0u64, 0u64, 0u64);
    let mut next_user = 0usize;
    let contains = |p: &[u8], needle: &[u8]| p.windows(needle.len()).any(|w| w == needle);
    let drain = |s: &mut TcpStream, live: &mut u64, queued: &mut u64| {
        let _ = s.set_nonblocking(true);
        let mut buf = Vec::new();
        let mut tmp = [0u8; 16384];
        while let Ok(n) = std::io::Read::read(s, &mut tmp) {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        let mut pos = 0;
        while let Some((op, ps, end)) = wire::parse_frame(&buf[pos..]) {
            let p = &buf[pos + ps..pos + end];
            if op == 1 && contains(p, b"\"event\":\"churn\"") {
                if contains(p, b"\"fromQueue\":true") {
                    *queued += 1;
                } else {
                    *live += 1;
                }
            }
            pos += end;
        }
    };
    while t0.elapsed().as_secs_f64() < a.seconds {
        let uid = next_user % a.users + 1;
        next_user += 1;
        match open_user(g, t, uid, source(g, next_user)) {
            Ok(s) => {
                connects += 1;
                online.push_back(s);
            }
            Err(_) => failed += 1,
        }
        while online.len() > a.online {
            if let Some(mut s) = online.pop_front() {
                drain(&mut s, &mut live, &mut queued);
            }
        }
        if connects.is_multiple_of(200) {
            eprint!("\rchurn: {connects} connects, {live} live + {queued} queued deliveries   ");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sender.join();
    std::thread::sleep(Duration::from_millis(300));
    for mut s in online.drain(..) {
        drain(&mut s, &mut live, &mut queued);
    }
    eprintln!();
    f.seconds = t0.elapsed().as_secs_f64();
    f.connections = connects;
    f.failed_connections = failed;
    f.messages = sent.load(std::sync::atomic::Ordering::Relaxed);
    f.delivered = live + queued;
    f.set_throughput(t.cpu().zip(cpu0).map(|(b, a)| b - a));
    f.handshakes_per_sec = connects as f64 / f.seconds;
    f.extra.insert("live deliveries".into(), live as f64);
    f.extra.insert("offline-queue deliveries (fromQueue)".into(), queued as f64);
    f
}

fn slow(g: &Global, t: &Target, a: &SlowArgs) -> Figures {
    let mut f = Figures { scenario: "slow".into(), target: t.kind.name().into(), ..Figures::default() };
    let channel = "bench_slow";
    let mut slow = Vec::new();
    for i in 0..a.slow {
        match t.subscribe(source(g, i), channel, &format!("s{i}")) {
            Ok(s) => {
                // A tiny receive buffer: the kernel takes little before the
                // server has to queue (or give up).
                let _ = socket2::SockRef::from(&s).set_recv_buffer_size(4096);
                slow.push(s);
            }
            Err(_) => f.failed_connections += 1,
        }
    }
    f.connections = slow.len() as u64;
    let mut publisher = t.publisher().unwrap_or_else(|e| die(&format!("publisher: {e}")));
    std::thread::sleep(Duration::from_millis(300));
    f.rss_kib_before = t.rss_kib().unwrap_or(0);
    let body = "x".repeat(a.size);
    let mut peak = f.rss_kib_before;
    let t0 = Instant::now();
    for m in 0..a.messages {
        let _ = publisher.publish(channel, &body);
        if m.is_multiple_of(50) {
            peak = peak.max(t.rss_kib().unwrap_or(0));
            eprint!("\rslow: published {m}/{}, server RSS {peak} KiB   ", a.messages);
        }
    }
    eprintln!();
    f.messages = a.messages as u64;
    f.seconds = t0.elapsed().as_secs_f64();
    f.rss_kib_after = t.rss_kib().unwrap_or(0);
    // The server's own count; a slow client that cannot drain its backlog
    // within the close deadline is dropped before it could read the frame.
    let server_closes = comet_metric(t, "comet_slow_consumer_closes_total");
    f.extra.insert("server slow-consumer closes (4008)".into(), server_closes.unwrap_or(-1.0));
    // Clients that can still read find the 4008 close after their backlog.
    let mut closed_4008 = 0u64;
    for s in &mut slow {
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        while let Ok((op, p)) = wire::read_frame(s) {
            if op == 8 {
                if p.len() >= 2 && u16::from_be_bytes([p[0], p[1]]) == 4008 {
                    closed_4008 += 1;
                }
                break;
            }
        }
    }
    f.extra.insert("slow clients closed with 4008".into(), closed_4008 as f64);
    f.extra.insert("server RSS peak KiB".into(), peak as f64);
    f.extra.insert("server RSS growth KiB".into(), peak as f64 - f.rss_kib_before as f64);
    f
}

/// One value from comet's /metrics.
fn comet_metric(t: &Target, name: &str) -> Option<f64> {
    use std::io::Read;
    let mut s = TcpStream::connect(t.front).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    // One series per shard: the total is their sum.
    let prefix = format!("{name}{{");
    let values: Vec<f64> =
        body.lines().filter(|l| l.starts_with(&prefix)).filter_map(|l| l.rsplit(' ').next()?.parse().ok()).collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// CPU seconds the calling thread has used.
fn thread_cpu_secs() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole rusage into the pointer we own.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_THREAD, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Sends `frame` to every socket through io_uring, in batches of the ring's
/// size; returns (sent, failed).
fn uring_round(ring: &mut io_uring::IoUring, socks: &[TcpStream], frame: &[u8]) -> (u64, u64) {
    use std::os::fd::AsRawFd;
    let (mut sent, mut failed) = (0u64, 0u64);
    for chunk in socks.chunks(ring.params().sq_entries() as usize) {
        for (i, s) in chunk.iter().enumerate() {
            let e = io_uring::opcode::Send::new(io_uring::types::Fd(s.as_raw_fd()), frame.as_ptr(), frame.len() as u32)
                .flags(libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
                .build()
                .user_data(i as u64);
            // SAFETY: `frame` and the sockets outlive the submission: we wait
            // for every completion of this chunk before returning.
            unsafe { ring.submission().push(&e) }.expect("submission queue has room for the chunk");
        }
        ring.submit_and_wait(chunk.len()).expect("io_uring_enter");
        for cqe in ring.completion() {
            if cqe.result() > 0 { sent += 1 } else { failed += 1 }
        }
    }
    (sent, failed)
}

fn send_floor(sockets: usize, rounds: usize, size: usize, uring: bool) {
    let mut ring = uring.then(|| io_uring::IoUring::new(4096).expect("io_uring"));
    use std::net::TcpListener;
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut senders = Vec::with_capacity(sockets);
    let mut receivers = Vec::with_capacity(sockets);
    for i in 0..sockets {
        let c = wire::connect_from(&addr, 1 + (i % 4) as u8).expect("connect");
        let (s, _) = listener.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        s.set_nonblocking(true).expect("nonblocking");
        senders.push(s);
        receivers.push(c);
    }
    // Each message carries a timestamp so the shared reader counts it.
    let want = (sockets * rounds) as u64;
    let reader = std::thread::spawn(move || report::read_all(receivers, want));
    let mut frame = vec![0x81u8, 0];
    let mut sent = 0u64;
    let mut would_block = 0u64;
    let cpu0 = thread_cpu_secs();
    let t0 = Instant::now();
    for _ in 0..rounds {
        let ts = wire::epoch_us().to_string();
        let mut payload = ts.into_bytes();
        payload.resize(size.saturating_sub(2).clamp(payload.len(), 125), b' ');
        frame.truncate(1);
        frame.push(payload.len() as u8);
        frame.extend_from_slice(&payload);
        if let Some(ring) = ring.as_mut() {
            let (ok, bad) = uring_round(ring, &senders, &frame);
            sent += ok;
            would_block += bad;
        } else {
            for s in &senders {
                match socket2::SockRef::from(s).send_with_flags(&frame, libc::MSG_NOSIGNAL) {
                    Ok(_) => sent += 1,
                    Err(_) => would_block += 1,
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let cpu = thread_cpu_secs() - cpu0;
    let (got, hist) = reader.join().expect("reader");
    let wall = t0.elapsed().as_secs_f64();
    let how = if uring { "io_uring batches" } else { "send(2) each" };
    println!(
        "send-floor: {sent} sends of {size} bytes to {sockets} loopback sockets via {how} ({would_block} failed), {got} received in {wall:.2}s"
    );
    println!(
        "  sender thread CPU {cpu:.2}s: {:.2} µs per send = {:.2} CPU-seconds per million deliveries; receipt p50 {:.2} ms",
        cpu * 1e6 / sent.max(1) as f64,
        cpu / (sent.max(1) as f64 / 1e6),
        hist.value_at_quantile(0.5) as f64 / 1000.0
    );
}

/// Resident memory of this process in KiB.
fn self_rss_kib() -> u64 {
    proc::rss_kib(std::process::id())
}

fn users_mem(users: u64, queued: usize) {
    use comet::users::{QueueCap, Queued, UserStore};
    let before = self_rss_kib();
    let mut store = UserStore::default();
    for u in 1..=users {
        for i in 0..queued {
            let q = Queued::new(1_700_000_000 + i as i64, "message", &format!("{{\"n\":{u}}}"));
            // The defaults: 64 messages, half of a 1 MiB --outbound-limit.
            store.enqueue(0, u, q, QueueCap { count: 64, bytes: 512 * 1024 }, 300, 1_700_000_000);
        }
    }
    let after = self_rss_kib();
    println!(
        "users-mem: {} offline users with {queued} queued message(s) each: RSS {before} -> {after} KiB, {:.0} bytes per user",
        store.len(),
        (after - before) as f64 * 1024.0 / users as f64
    );
}

/// Parses and plans a typical publish INSERT in a loop.
fn parse_bench(iterations: usize) {
    use comet::cometql::{exec, parser};
    let sql = r#"INSERT INTO pipes_messages (name, event, message) VALUES ('bench_publish', 'bench', '{\"text\":\"hello world\",\"n\":12345}')"#;
    let ctx = exec::Ctx::standalone(1 << 20);
    let t = Instant::now();
    let mut n = 0usize;
    for _ in 0..iterations {
        for s in parser::parse(sql).expect("parse") {
            if let exec::Plan::Publish(v) = exec::plan(s, &ctx) {
                n += v.len();
            }
        }
    }
    let per = t.elapsed().as_nanos() as f64 / iterations as f64;
    println!("parse: {iterations} INSERTs lexed, parsed and planned ({n} publishes): {per:.0} ns each");
}
