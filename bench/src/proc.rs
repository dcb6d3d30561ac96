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
