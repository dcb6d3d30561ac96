//! Readings from /proc: CPU time and resident memory of a server process
//! and all its descendants (nginx runs a master and workers), and the
//! kernel's socket memory.

use std::collections::HashMap;

/// Pids of `pid` and every process below it.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat"))
                && let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..])
                && let Some(pp) = after.split_whitespace().nth(1).and_then(|x| x.parse().ok())
            {
                parent.insert(p, pp);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        out.extend(parent.iter().filter(|(_, pp)| **pp == cur).map(|(p, _)| *p));
        i += 1;
    }
    out
}

/// utime + stime of one process, in seconds.
fn cpu_one(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s[s.rfind(')')? + 2..].split_whitespace().collect();
    Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
}

/// CPU seconds of a process tree.
pub fn cpu_secs(pid: u32) -> f64 {
    tree(pid).into_iter().filter_map(cpu_one).sum()
}

/// Time on CPU of every thread of one process, in seconds, from
/// `/proc/PID/task/*/schedstat` (nanoseconds, counted at every switch),
/// where `stat`'s utime and stime are sampled at the 100 Hz tick: for a
/// server that runs in bursts of microseconds, the tick's sampling is off
/// by tens of percent over a second of handshakes.
fn run_one(pid: u32) -> Option<f64> {
    let mut ns = 0u64;
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        // A thread that ended since the listing is skipped, not a reason to
        // fall back to the tick for this reading only (two clocks would
        // then be subtracted).
        let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) else { continue };
        ns += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}

/// CPU seconds of a process tree from the scheduler's own clock (see
/// [`run_one`]); None where schedstat is not available.
pub fn run_secs(pid: u32) -> Option<f64> {
    tree(pid).into_iter().map(run_one).sum()
}

/// Voluntary context switches of every thread of a process tree: how
/// often the server went to sleep waiting for work (each one is a wake-up
/// later).
pub fn sleeps(pid: u32) -> u64 {
    let mut n = 0;
    for p in tree(pid) {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{p}/task")) else { continue };
        for e in dir.flatten() {
            let s = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            n += s
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    n
}

fn rss_one(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
}

/// Peak resident memory of one process (VmHWM), KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
}

/// Resident memory of a process tree, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    tree(pid).into_iter().filter_map(rss_one).sum()
}

/// (TCP socket memory KiB from sockstat, SUnreclaim KiB from meminfo).
pub fn kernel_mem_kib() -> (u64, u64) {
    let tcp_pages = std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("TCP:")).and_then(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.iter().position(|x| *x == "mem").and_then(|i| f.get(i + 1)?.parse::<u64>().ok())
            })
        })
        .unwrap_or(0);
    let sunreclaim = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SUnreclaim:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0);
    (tcp_pages * 4, sunreclaim)
}

/// The CPU a spawned server runs on in the pinned layout.
pub const SERVER_CPU: usize = 0;
/// The CPU the load generator (this process and its client processes) runs
/// on in the pinned layout.
pub const CLIENT_CPU: usize = 1;

/// Where server and clients run (`--layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Anywhere: server and clients compete for the same cores.
    Shared,
    /// The server on [`SERVER_CPU`], the clients on [`CLIENT_CPU`].
    Pinned,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Shared => "shared",
            Layout::Pinned => "pinned",
        }
    }

    /// Moves this thread to the layout's client CPUs (every CPU for
    /// `Shared`); threads and processes started afterwards inherit them.
    pub fn enter(self) -> std::io::Result<()> {
        // SAFETY: sysconf has no memory effects.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
        if self == Layout::Pinned && online <= CLIENT_CPU {
            return Err(std::io::Error::other(format!(
                "needs at least {} CPUs, this machine has {online}",
                CLIENT_CPU + 1
            )));
        }
        // SAFETY: a zeroed cpu_set_t is a valid empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let cpus = match self {
            Layout::Shared => 0..online,
            Layout::Pinned => CLIENT_CPU..CLIENT_CPU + 1,
        };
        for c in cpus {
            // SAFETY: CPU_SET only checks `c` against the set's size and sets a bit.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
        // SAFETY: pid 0 is the calling thread; the set and its size match.
        let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    }
}

/// `cmd` run on `cpu` only: the same program, arguments and environment
/// under `taskset`, which execs it (the pid stays the server's).
pub fn on_cpu(cmd: &std::process::Command, cpu: usize) -> std::process::Command {
    let mut t = std::process::Command::new("taskset");
    t.arg("-c").arg(cpu.to_string()).arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => t.env(k, v),
            None => t.env_remove(k),
        };
    }
    t
}
