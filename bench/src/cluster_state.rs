//! `comet-bench cluster-state`: the cost of keeping the shared state in
//! Redis (`--redis`, docs/cluster.md "Shared state").
//!
//! Fills `--users` keys and user data through one node of a cluster, in
//! multi-row INSERTs of 1000 rows (each answered once Redis acknowledged
//! it), and the same into one comet with a data dir (`--durability sync`)
//! in the same invocation; then starts a second node and times how long it
//! takes from spawn until it answers for the last user (start-up plus the
//! load of the whole state from Redis), with its RSS and Redis's memory.

use std::time::{Duration, Instant};

use crate::cluster::Redis;
use crate::target::{Kind, Target};
use crate::{Global, comet_metric, die, rss_kib, spawn_opts, wire};

/// Fills `users` keys and user data through `t`; rows per second.
fn fill(t: &Target, users: usize) -> f64 {
    let back = t.back.expect("comet backend");
    let mut s = wire::mysql_login(&back, &t.password).expect("CometQL login");
    let started = Instant::now();
    for start in (1..=users).step_by(1000) {
        let end = (start + 999).min(users);
        let keys: Vec<String> = (start..=end).map(|u| format!("({u}, 'key-of-user-{u}')")).collect();
        wire::mysql_exec(&mut s, &format!("INSERT INTO users_auth (id, hash) VALUES {}", keys.join(",")))
            .expect("keys");
        let data: Vec<String> = (start..=end).map(|u| format!("({u}, 'data of user {u}')")).collect();
        wire::mysql_exec(&mut s, &format!("INSERT INTO users_data (id, data) VALUES {}", data.join(",")))
            .expect("data");
    }
    (2 * users) as f64 / started.elapsed().as_secs_f64()
}

/// Whether `t` has user `uid`'s key (one `SELECT`).
fn has_key(t: &Target, uid: usize) -> bool {
    let Some(back) = t.back else { return false };
    let Ok(mut s) = wire::mysql_login(&back, &t.password) else { return false };
    let q = format!("SELECT id, hash FROM users_auth WHERE id = {uid}");
    let mut p = vec![0x03];
    p.extend_from_slice(q.as_bytes());
    let mut b = Vec::new();
    wire::mysql_packet(&mut b, 0, &p);
    if std::io::Write::write_all(&mut s, &b).is_err() {
        return false;
    }
    // Column count, two columns, EOF, then a row or EOF.
    for _ in 0..4 {
        if wire::mysql_read(&mut s).is_err() {
            return false;
        }
    }
    wire::mysql_read(&mut s).is_ok_and(|row| row.first() != Some(&0xFE))
}

pub fn cluster_state(g: &Global, users: usize) {
    if !g.spawn || g.target != Kind::Comet {
        die("cluster-state spawns its comets and a redis-server: use --spawn (and --target comet)");
    }
    let dir = std::env::temp_dir().join(format!("comet-bench-cstate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut opts = spawn_opts(g);
    opts.extra_args.extend(["--data-dir".into(), dir.to_string_lossy().into_owned()]);
    let single = Target::spawn(Kind::Comet, &opts).unwrap_or_else(|e| die(&format!("cannot start comet: {e}")));
    let single_rate = fill(&single, users);
    drop(single);
    let _ = std::fs::remove_dir_all(&dir);

    let redis = Redis::start().unwrap_or_else(|e| die(&format!("cannot start redis-server: {e}")));
    let mut opts = spawn_opts(g);
    opts.extra_args.extend(["--redis".to_string(), format!("redis://127.0.0.1:{}", redis.port)]);
    let first = Target::spawn(Kind::Comet, &opts).unwrap_or_else(|e| die(&format!("cannot start comet: {e}")));
    let deadline = Instant::now() + Duration::from_secs(10);
    while comet_metric(&first, "comet_redis_up") != Some(1.0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let cluster_rate = fill(&first, users);
    let started = Instant::now();
    let joiner = Target::spawn(Kind::Comet, &opts).unwrap_or_else(|e| die(&format!("cannot start comet: {e}")));
    let deadline = Instant::now() + Duration::from_secs(600);
    while !has_key(&joiner, users) {
        if Instant::now() > deadline {
            die("the new node never had the last user's key");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let join_ms = started.elapsed().as_secs_f64() * 1000.0;
    std::thread::sleep(Duration::from_millis(300));
    let (rss_first, rss_joiner) = (rss_kib(first.pid.unwrap_or(0)), rss_kib(joiner.pid.unwrap_or(0)));
    println!("cluster-state: {users} users with a key and user data ({} rows)", 2 * users);
    println!("  write rows/s, 1 comet with a data dir (--durability sync): {single_rate:.0}");
    println!(
        "  write rows/s, through a cluster node (OK once Redis has it): {cluster_rate:.0} ({:.2}x)",
        cluster_rate / single_rate.max(1.0)
    );
    println!("  a second node: spawn until it answers for the last user (start + load from Redis): {join_ms:.0} ms");
    println!("  RSS: the writing node {rss_first} KiB, the new node {rss_joiner} KiB");
    println!("  redis-server used_memory: {} KiB", used_memory(redis.port) / 1024);
}

/// Redis's `used_memory`, asked with redis-cli.
fn used_memory(port: u16) -> u64 {
    let out = std::process::Command::new("redis-cli").args(["-p", &port.to_string(), "INFO", "memory"]).output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix("used_memory:")?.trim().parse().ok()).unwrap_or(0)
}
