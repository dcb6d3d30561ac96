//! `comet-bench cluster`: fan-out through N comet nodes joined by one
//! `redis-server` (`--redis`), against one comet holding the same
//! subscribers, in the same invocation.
//!
//! The subscribers of one channel are spread round-robin over the nodes; a
//! CometQL connection to the first node publishes at a fixed rate, so every
//! message crosses Redis once (one `PUBLISH`) to reach the other nodes. The
//! figures: deliveries per second, latency from publish to delivery, and CPU
//! per delivery of the comets and of redis-server together (redis-server's
//! own CPU per publish in `extra`), so the ratio shows what the Redis hop
//! costs in CPU and latency.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;

use crate::report::Figures;
use crate::target::{Kind, Target};
use crate::{Global, die, gather, progress, readers, source, spawn_opts, wire};

/// Sizes and rate of `cluster`.
#[derive(Args, Clone)]
pub struct ClusterArgs {
    /// Subscribers of the one channel, spread over the nodes.
    #[arg(long, default_value_t = 3_000)]
    subs: usize,
    /// Publishes per second.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// comet nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Reader threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// A redis-server on a free loopback port, without persistence.
pub(crate) struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    pub fn start() -> std::io::Result<Redis> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let end = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > end {
                return Err(std::io::Error::other(format!("redis-server did not listen on {port}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Redis { child, port })
    }

    fn cpu(&self) -> f64 {
        crate::proc::cpu_secs(self.child.id())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One comet, then `nodes` comets over one Redis, under the same load.
pub fn cluster(g: &Global, a: &ClusterArgs) -> Vec<Figures> {
    if !g.spawn || g.target != Kind::Comet {
        die("cluster spawns its comets and a redis-server: use --spawn (and --target comet)");
    }
    let single = {
        let t = Target::spawn(Kind::Comet, &spawn_opts(g)).unwrap_or_else(|e| die(&format!("cannot start comet: {e}")));
        run(g, a, &[t], None, "1-node")
    };
    std::thread::sleep(Duration::from_millis(500));
    let redis =
        Redis::start().unwrap_or_else(|e| die(&format!("cannot start redis-server (apt install redis-server): {e}")));
    let mut opts = spawn_opts(g);
    opts.extra_args.extend(["--redis".to_string(), format!("redis://127.0.0.1:{}", redis.port)]);
    let nodes: Vec<Target> = (0..a.nodes.max(1))
        .map(|_| Target::spawn(Kind::Comet, &opts).unwrap_or_else(|e| die(&format!("cannot start comet: {e}"))))
        .collect();
    let name = format!("{}-nodes+redis", nodes.len());
    let clustered = run(g, a, &nodes, Some(&redis), &name);
    let r = |x: f64, y: f64| if y > 0.0 { format!("{:.2}", x / y) } else { "n/a".into() };
    println!(
        "comet {name} / 1-node: CPU per delivery (comets + redis-server) {}, p99 {:.1} ms vs {:.1} ms ({:+.1} ms for the Redis hop)",
        r(clustered.cpu_s_per_million, single.cpu_s_per_million),
        clustered.p99_ms,
        single.p99_ms,
        clustered.p99_ms - single.p99_ms
    );
    vec![single, clustered]
}

fn run(g: &Global, a: &ClusterArgs, nodes: &[Target], redis: Option<&Redis>, name: &str) -> Figures {
    let mut f = Figures { scenario: "cluster".into(), target: name.into(), ..Figures::default() };
    let channel = "bench_cluster";
    let mut socks = Vec::with_capacity(a.subs);
    for i in 0..a.subs {
        match nodes[i % nodes.len()].subscribe(source(g, i), channel, &format!("c{i}")) {
            Ok(s) => socks.push(s),
            Err(_) => f.failed_connections += 1,
        }
        progress("cluster: subscribers", i + 1, a.subs, f.failed_connections as usize);
    }
    f.connections = socks.len() as u64;
    let mut publisher = nodes[0].publisher().unwrap_or_else(|e| die(&format!("publisher: {e}")));
    // The publishing node counts its own subscribers only: wait for those,
    // then give the other nodes' Redis subscriptions a moment (warm-up
    // messages carry no timestamp and are not counted).
    let local = socks.len().div_ceil(nodes.len()) as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while publisher.publish(channel, "warmup").unwrap_or(0) < local && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let messages = (a.rate * a.seconds).round().max(1.0) as usize;
    f.messages = messages as u64;
    f.expected = f.connections * messages as u64;
    let rs = readers(socks, a.threads, messages as f64);
    let cpu = || nodes.iter().filter_map(Target::cpu).sum::<f64>() + redis.map_or(0.0, Redis::cpu);
    let (cpu0, redis0) = (cpu(), redis.map_or(0.0, Redis::cpu));
    let t0 = Instant::now();
    for m in 0..messages {
        let due = t0 + Duration::from_secs_f64(m as f64 / a.rate);
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        if let Err(e) = publisher.publish(channel, &wire::epoch_us().to_string()) {
            eprintln!("cluster: publish failed: {e}");
        }
    }
    let (got, hist) = gather(rs);
    f.seconds = t0.elapsed().as_secs_f64();
    f.delivered = got;
    f.set_throughput(Some(cpu() - cpu0));
    f.set_latency(&hist);
    if let Some(r) = redis {
        f.extra.insert("redis_cpu_us_per_publish".into(), (r.cpu() - redis0) * 1e6 / messages as f64);
    }
    f
}
