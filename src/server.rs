//! Starting and stopping the server: choose the I/O backend, claim each port
//! for this process and bind one SO_REUSEPORT listener per shard on it, start
//! the shard threads, then wait for SIGTERM/SIGINT and drain (close
//! WebSockets with 1001, exit within `shutdown_timeout`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::config::{Config, DEFAULT_PASSWORD};
use crate::mailbox::{self, Doorbell};
use crate::metrics::{Registry, ShardMetrics};
use crate::runtime::{
    self,
    listener::{ListenError, PortClaim},
    probe::ProbeError,
};
use crate::shard::history::HistoryStore;
use crate::shard::io::Port;
use crate::shard::{self, ShardCore, Shared, home_shard, home_shard_of_channel};
use crate::store::fjall::FjallStore;
use crate::store::writer::{Hub, StoreHandle};
use crate::store::{Backend, Change, StoreError};
use crate::users::{UserStore, jwt};

/// Capacity of each shard-to-shard ring, in messages.
const MAILBOX_CAPACITY: usize = 8192;

/// Why the server could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The TLS certificate or key cannot be used (the message names the file).
    #[error("{0}")]
    Tls(String),
    #[error("--io uring: io_uring is not usable here: {0}")]
    NoUring(#[from] ProbeError),
    /// The port is in use: by another comet (whose port group this process
    /// must not join) or by any other program.
    #[error("another comet (or another program) is already listening on {addr}; stop it or choose another --{role}")]
    PortTaken { role: &'static str, addr: SocketAddr },
    /// Another process is stuck half-way through starting on this port.
    #[error("{err}; stop that process (another comet starting?) or choose another --{role}")]
    PortBusy { role: &'static str, err: ListenError },
    #[error("cannot listen on --{role} {addr}: {err}")]
    Bind { role: &'static str, addr: SocketAddr, err: std::io::Error },
    /// Two listeners on one port would join one reuseport group and split
    /// clients between the two protocols at random.
    #[error("--{a_role} {a} and --{b_role} {b} overlap on port {}; give them different ports", a.port())]
    SamePort { a_role: &'static str, a: SocketAddr, b_role: &'static str, b: SocketAddr },
    #[error("shard {shard} failed to start: {err}")]
    Shard { shard: usize, err: String },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("shard {0} stopped unexpectedly")]
    ShardDied(usize),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("cannot start the storage thread: {0}")]
    StoreThread(std::io::Error),
    #[error("{0}")]
    Redis(#[from] crate::cluster::UrlError),
    #[error("cannot start the Redis threads: {0}")]
    RedisThread(std::io::Error),
}

impl ServerError {
    /// Names the flag (`role`) that chose the address the listener failed on.
    fn listen(role: &'static str, err: ListenError) -> ServerError {
        match err {
            ListenError::Taken(addr) => ServerError::PortTaken { role, addr },
            ListenError::LockBusy { .. } => ServerError::PortBusy { role, err },
            ListenError::Io { addr, err } => ServerError::Bind { role, addr, err },
        }
    }
}

/// Claims `addr` for this process (see `runtime::listener` for why) and binds
/// `n` SO_REUSEPORT listeners on it, one per shard. Returns the actual address
/// (port 0 resolved). `role` is the flag that chose the address, for errors.
fn bind_all(role: &'static str, addr: SocketAddr, n: usize) -> Result<(SocketAddr, Vec<socket2::Socket>), ServerError> {
    let claim = PortClaim::take(addr).map_err(|e| ServerError::listen(role, e))?;
    if let Some(e) = claim.lock_error() {
        eprintln!(
            "comet: WARNING: no start-up lock for port {} ({e}); a second comet started at the same instant on it would go unnoticed",
            claim.addr().port()
        );
    }
    let actual = claim.addr();
    let listeners = claim.listen(n).map_err(|e| ServerError::listen(role, e))?;
    Ok((actual, listeners))
}

/// Whether listeners on `a` and `b` would share a port group: same port (not
/// 0, which the kernel resolves to two free ports) and addresses that overlap.
/// Listeners are dual-stack, so `[::]` overlaps every address.
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    match (a.ip(), b.ip()) {
        (x, y) if x == y => true,
        (IpAddr::V6(x), _) | (_, IpAddr::V6(x)) if x.is_unspecified() => true,
        (IpAddr::V4(x), IpAddr::V4(y)) => x.is_unspecified() || y.is_unspecified(),
        _ => false,
    }
}

/// Runs the server until SIGTERM/SIGINT (or a shard dies).
pub fn run(config: Config) -> Result<(), ServerError> {
    if config.password == DEFAULT_PASSWORD {
        eprintln!(
            "comet: WARNING: using the default backend password \"{DEFAULT_PASSWORD}\"; set --password or COMET_PASSWORD before exposing comet"
        );
    }
    // A certificate that cannot serve is refused before anything starts.
    let tls = match &config.tls {
        Some(files) => Some(crate::tls::load(files, unix_now()).map_err(ServerError::Tls)?),
        None => None,
    };
    let (backend, fallback) = runtime::choose_backend(config.io)?;
    if let Some(why) = fallback {
        eprintln!("comet: io_uring unavailable ({why}); using epoll");
    }
    let n = config.shards;

    // The data dir first: a second comet on it must be told about the dir,
    // whatever its ports.
    let mut loaded = match &config.data_dir {
        // In a cluster Redis is the store (docs/cluster.md). A data dir
        // that exists is read once: what it holds seeds a Redis that has
        // no state yet (the way from one comet to a cluster), and is
        // replaced by Redis's state otherwise.
        Some(dir) if config.redis.is_some() && dir.exists() => {
            let l = open_store(dir, n, config.max_journal_size)?;
            eprintln!(
                "comet: --redis: Redis keeps the state; the data dir {} was read once and only seeds a Redis that has no state yet",
                dir.display()
            );
            Some(l)
        }
        _ if config.redis.is_some() => {
            eprintln!(
                "comet: --redis: keys, user data, revoked tokens, last-online times, settings and history are kept in Redis; no data dir is used"
            );
            None
        }
        Some(dir) => Some(open_store(dir, n, config.max_journal_size)?),
        None => {
            eprintln!("comet: --ephemeral: all state is in memory only; a restart loses it");
            None
        }
    };

    let ports: Vec<(&'static str, SocketAddr)> = [("frontend", config.frontend), ("backend", config.backend)]
        .into_iter()
        .chain(config.api.map(|a| ("api", a)))
        .chain(config.metrics.map(|m| ("metrics", m)))
        .collect();
    for (i, &(a_role, a)) in ports.iter().enumerate() {
        if let Some(&(b_role, b)) = ports[i + 1..].iter().find(|(_, b)| overlap(a, *b)) {
            return Err(ServerError::SamePort { a_role, a, b_role, b });
        }
    }
    // Before any listener: a flood of clients at start could otherwise take
    // the last descriptor the signal pipe needs, and a SIGTERM during start
    // would kill the process instead of draining it.
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(ServerError::Signals)?;
    let (addr, listeners) = bind_all("frontend", config.frontend, n)?;
    let (backend_addr, backend_listeners) = bind_all("backend", config.backend, n)?;
    let (api_addr, api_listeners) = match config.api {
        Some(a) => {
            let (addr, socks) = bind_all("api", a, n)?;
            (Some(addr), socks.into_iter().map(Some).collect())
        }
        None => (None, (0..n).map(|_| None).collect::<Vec<_>>()),
    };
    // Claimed like the other ports, so a second comet refuses to start on it.
    let metrics_listener = match config.metrics {
        Some(m) => {
            let (m_addr, mut l) = bind_all("metrics", m, 1)?;
            let l: std::net::TcpListener = l.pop().expect("one listener").into();
            l.set_nonblocking(false).map_err(|err| ServerError::Bind { role: "metrics", addr: m_addr, err })?;
            Some((m_addr, l))
        }
        None => None,
    };

    let redis_health = config.redis.as_ref().map(|_| Arc::new(crate::metrics::RedisHealth::default()));
    let answers = crate::shard::answer_memory::AnswerMemory::new(config.answer_memory_limit);
    let registry = Arc::new(Registry {
        shards: (0..n).map(|_| Arc::new(ShardMetrics::default())).collect(),
        io_backend: backend.name(),
        started: Instant::now(),
        redis: redis_health.clone(),
        answers: Some(answers.clone()),
    });
    let metrics_addr = metrics_listener.map(|(a, l)| {
        crate::metrics::serve(l, registry.clone(), config.message_timeout);
        a
    });
    let shutdown = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Shared {
        config: Arc::new(config.clone()),
        registry,
        shutdown: shutdown.clone(),
        conn_counts: Default::default(),
        backend_conns: Default::default(),
        answers,
        accept_rate: Default::default(),
        auth_failures: Default::default(),
        tls: crate::tls::Current::new(tls),
    });

    let mesh = mailbox::mesh(n, MAILBOX_CAPACITY);
    let bells: Vec<Arc<Doorbell>> = mesh.iter().map(|(_, inbox)| inbox.bell().clone()).collect();
    let mut per_shard: Vec<Option<(StoreHandle, UserStore, HistoryStore)>> = (0..n).map(|_| None).collect();
    let mut storage = None;
    let mut cluster = None;
    if let (Some(url), Some(health)) = (&config.redis, redis_health) {
        let bridge = crate::cluster::Bridge::new(url, &bells, config.mail_limit, health)?;
        // The storage thread writes to Redis (before the subscriber loads
        // the state and hands it to the shards).
        let hub = Hub::new(&bells, config.durability);
        let slot = (bridge.node >> 1) % crate::shard::history::NODE_SLOTS;
        // The data dir's state, if one was read (its engine is closed).
        let (mut users, mut history): (Vec<UserStore>, Vec<HistoryStore>) = match loaded.take() {
            Some(l) => (l.users, l.history),
            None => ((0..n).map(|_| UserStore::default()).collect(), (0..n).map(|_| HistoryStore::default()).collect()),
        };
        for (i, s) in per_shard.iter_mut().enumerate() {
            let mut h = std::mem::take(&mut history[i]);
            h.node_slot = Some(slot);
            *s = Some((StoreHandle::new(&hub, i, config.mail_limit), std::mem::take(&mut users[i]), h));
        }
        let backend = Box::new(crate::cluster::state::RedisStore::new(&bridge));
        let thread = crate::store::writer::spawn(hub.clone(), backend).map_err(ServerError::StoreThread)?;
        storage = Some((hub, thread));
        let threads = crate::cluster::spawn(&bridge).map_err(ServerError::RedisThread)?;
        eprintln!("comet: cluster over Redis at {} (node id {:016x})", bridge.address, bridge.node);
        cluster = Some((bridge, threads));
    }
    if let Some(l) = loaded.take() {
        let hub = Hub::new(&bells, config.durability);
        for (i, (users, history)) in l.users.into_iter().zip(l.history).enumerate() {
            per_shard[i] = Some((StoreHandle::new(&hub, i, config.mail_limit), users, history));
        }
        let thread = crate::store::writer::spawn(hub.clone(), l.backend).map_err(ServerError::StoreThread)?;
        storage = Some((hub, thread));
    }
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<(usize, Result<(), String>)>();
    let mut threads = Vec::with_capacity(n);
    for (i, (((((outbox, inbox), listener), backend_listener), api_listener), state)) in
        mesh.into_iter().zip(listeners).zip(backend_listeners).zip(api_listeners).zip(per_shard).enumerate()
    {
        let shared = shared.clone();
        let ready = ready_tx.clone();
        let timeout = config.shutdown_timeout;
        let bridge = cluster.as_ref().map(|(b, _)| b.clone());
        let t = std::thread::Builder::new()
            .name(format!("comet-shard-{i}"))
            .spawn(move || {
                let rt = match runtime::build_runtime(backend) {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready.send((i, Err(e.to_string())));
                        return;
                    }
                };
                let ran = runtime::block_on(&rt, async move {
                    let listener = Arc::new(listener);
                    let backend_listener = Arc::new(backend_listener);
                    let api_listener = api_listener.map(Arc::new);
                    let mut core = ShardCore::new(i, n, shared, outbox);
                    core.cluster = bridge;
                    if let Some((store, users, history)) = state {
                        core.attach_store(store, users, history);
                    }
                    let all = [Some(listener.clone()), Some(backend_listener.clone()), api_listener.clone()];
                    shard::io::install(core, all.into_iter().flatten().collect());
                    let mut loops = vec![
                        compio::runtime::spawn(shard::io::accept_loop(listener, Port::Frontend)),
                        compio::runtime::spawn(shard::io::accept_loop(backend_listener, Port::Backend)),
                    ];
                    if let Some(l) = api_listener {
                        loops.push(compio::runtime::spawn(shard::io::accept_loop(l, Port::Api)));
                    }
                    loops.push(compio::runtime::spawn(shard::io::mailbox_loop(inbox)));
                    let _ = ready.send((i, Ok(())));
                    // A panic in one of these loops stops the shard, as one
                    // in the sweep loop does (see `runtime::watching`).
                    runtime::watching(shard::io::sweep_loop(timeout), loops).await;
                });
                drop(shard::io::uninstall());
                if let Err(panic) = ran {
                    // The tasks go with the runtime, before the unwind
                    // goes on (compio's own block_on does the same).
                    drop(rt);
                    std::panic::resume_unwind(panic);
                }
            })
            .map_err(|e| ServerError::Shard { shard: i, err: e.to_string() })?;
        threads.push(t);
    }
    drop(ready_tx);
    for _ in 0..n {
        match ready_rx.recv() {
            Ok((_, Ok(()))) => {}
            Ok((shard, Err(err))) => return Err(ServerError::Shard { shard, err }),
            Err(_) => {
                return Err(ServerError::Shard { shard: n, err: "a shard thread exited during start".into() });
            }
        }
    }
    eprintln!("comet: {n} shards on {}", backend.name());
    if let Some(m_addr) = metrics_addr {
        eprintln!("comet: metrics listening on {m_addr}");
    }
    eprintln!("comet: backend (CometQL) listening on {backend_addr}");
    match api_addr {
        Some(a) => eprintln!("comet: HTTP API listening on {a}"),
        None => eprintln!("comet: HTTP API off"),
    }
    eprintln!("comet: frontend listening on {addr}");

    // A shard that stops on its own has hit a bug (a panic, already
    // printed): the others drain as on SIGTERM, the store writes what it
    // was given, and the process exits non-zero for its supervisor.
    let mut died = None;
    'run: loop {
        for sig in signals.pending() {
            if sig != SIGHUP {
                break 'run;
            }
            reload_tls(&config, &shared);
        }
        if let Some(i) = threads.iter().position(|t| t.is_finished()) {
            eprintln!("comet: shard {i} stopped unexpectedly; stopping the others");
            died = Some(i);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("comet: shutting down (closing connections, at most {}s)", config.shutdown_timeout.as_secs());
    shutdown.store(true, Ordering::Release);
    for b in &bells {
        b.force();
    }
    let deadline = Instant::now() + config.shutdown_timeout + Duration::from_millis(500);
    while Instant::now() < deadline && !threads.iter().all(|t| t.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let stuck = threads.iter().filter(|t| !t.is_finished()).count();
    if stuck > 0 {
        eprintln!("comet: {stuck} shard(s) still draining at the shutdown timeout; exiting");
    }
    if let Some((bridge, threads)) = cluster {
        // What the shards queued for Redis goes out first, if Redis is there.
        bridge.stop();
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline && !threads.iter().all(|t| t.is_finished()) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if let Some((hub, thread)) = storage {
        // Whatever the shards sent is written and synced before exit.
        hub.stop();
        let _ = thread.join();
    }
    if let Some(i) = died {
        return Err(ServerError::ShardDied(i));
    }
    if stuck == 0 {
        eprintln!("comet: stopped");
    }
    Ok(())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// SIGHUP: reads the certificate and key again. New connections get the
/// new ones; open connections keep theirs. A file that cannot be used is
/// reported and the old certificate kept.
fn reload_tls(config: &Config, shared: &Shared) {
    let Some(files) = &config.tls else {
        eprintln!("comet: SIGHUP: no --tls-cert configured, nothing to reload");
        return;
    };
    match crate::tls::load(files, unix_now()) {
        Ok(cfg) => {
            shared.tls.set(cfg);
            eprintln!("comet: SIGHUP: reloaded {} and {}", files.cert.display(), files.key.display());
        }
        Err(e) => eprintln!("comet: SIGHUP: {e}; keeping the previous certificate"),
    }
}

/// The opened store and the state it held, already split by home shard.
struct Loaded {
    backend: Box<dyn Backend>,
    users: Vec<UserStore>,
    history: Vec<HistoryStore>,
}

/// Opens the data dir and loads its state into each shard's stores: users
/// on their home shard, history and settings on their channel's.
fn open_store(dir: &std::path::Path, n: usize, max_journal: u64) -> Result<Loaded, ServerError> {
    let started = Instant::now();
    let mut backend = FjallStore::open(dir, max_journal)?;
    let mut users: Vec<UserStore> = (0..n).map(|_| UserStore::default()).collect();
    let mut history: Vec<HistoryStore> = (0..n).map(|_| HistoryStore::default()).collect();
    let mut records = 0u64;
    backend.load(&mut |c| {
        records += 1;
        match &c {
            Change::Key { dev, uid, .. }
            | Change::Data { dev, uid, .. }
            | Change::LastOnline { dev, uid, .. }
            | Change::QueuePut { dev, uid, .. }
            | Change::QueueDel { dev, uid, .. } => users[home_shard(*dev, *uid, n)].restore(c),
            Change::Revoked { dev, token, .. } => {
                let uid = jwt::claimed_user(token).unwrap_or(0);
                users[home_shard(*dev, uid, n)].restore(c)
            }
            Change::HistoryPut { dev, channel, .. }
            | Change::HistoryDel { dev, channel, .. }
            | Change::Setting { dev, channel, .. } => history[home_shard_of_channel(*dev, channel, n)].restore(c),
        }
    })?;
    eprintln!("comet: data dir {}: loaded {records} records in {} ms", dir.display(), started.elapsed().as_millis());
    Ok(Loaded { backend: Box::new(backend), users, history })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_follows_the_kernel_rules_for_one_port() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(overlap(a("127.0.0.1:8087"), a("127.0.0.1:8087")));
        assert!(overlap(a("0.0.0.0:8087"), a("127.0.0.1:8087")));
        assert!(overlap(a("127.0.0.1:8087"), a("[::]:8087")));
        assert!(overlap(a("[::]:8087"), a("[::1]:8087")));
        assert!(!overlap(a("127.0.0.1:8087"), a("127.0.0.2:8087")));
        assert!(!overlap(a("0.0.0.0:8087"), a("[::1]:8087")));
        assert!(!overlap(a("127.0.0.1:8087"), a("127.0.0.1:3300")));
        assert!(!overlap(a("127.0.0.1:0"), a("127.0.0.1:0")));
    }
}
