//! `tuning/check` against a made-up `/proc/sys` tree: each setting's status
//! says which way it is off (LOW: raise it; HIGH: lower it; NARROW: widen the
//! port range; OTHER: a different mode), and only a worse value is flagged.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Writes `settings` as a /proc/sys tree, runs tuning/check on it and
/// returns its exit status and each setting's status word.
fn check(settings: &[(&str, &str)]) -> (bool, HashMap<String, String>) {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let root = std::env::temp_dir().join(format!("comet-tuning-{}-{run}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for (key, value) in settings {
        let path = root.join(key.replace('.', "/"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, format!("{value}\n")).unwrap();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning/check");
    let out = Command::new("bash").arg(script).env("COMET_CHECK_PROC_SYS", &root).output().expect("run tuning/check");
    std::fs::remove_dir_all(&root).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let statuses = text
        .lines()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            (words.len() >= 3 && words[0].contains('.'))
                .then(|| (words[0].to_string(), words.last().unwrap().to_string()))
        })
        .collect();
    (out.status.success(), statuses)
}

#[test]
fn a_lower_fin_timeout_is_ok_and_a_higher_one_is_high_not_low() {
    let (_, s) = check(&[("net.ipv4.tcp_fin_timeout", "10"), ("kernel.io_uring_disabled", "0")]);
    assert_eq!(s["net.ipv4.tcp_fin_timeout"], "ok");
    assert_eq!(s["kernel.io_uring_disabled"], "ok");
    let (ok, s) = check(&[("net.ipv4.tcp_fin_timeout", "60"), ("kernel.io_uring_disabled", "2")]);
    assert_eq!(s["net.ipv4.tcp_fin_timeout"], "HIGH");
    assert_eq!(s["kernel.io_uring_disabled"], "HIGH");
    assert!(!ok, "a setting that is off makes the exit status non-zero");
}

#[test]
fn amounts_are_low_only_when_below_the_recommendation() {
    let (_, s) = check(&[
        ("net.core.somaxconn", "4096"),
        ("fs.nr_open", "4200000"),
        ("net.ipv4.tcp_mem", "786432 2097152 3000000"),
        ("net.ipv4.tcp_rmem", "4096 16384 8388608"),
    ]);
    assert_eq!(s["net.core.somaxconn"], "LOW");
    assert_eq!(s["fs.nr_open"], "ok");
    assert_eq!(s["net.ipv4.tcp_mem"], "LOW", "one field below is enough");
    assert_eq!(s["net.ipv4.tcp_rmem"], "ok");
    assert_eq!(s["fs.file-max"], "skip", "a missing setting is skipped");
}

#[test]
fn the_port_range_must_cover_the_recommended_one_and_tw_reuse_must_match() {
    let (_, s) = check(&[("net.ipv4.ip_local_port_range", "32768 60999"), ("net.ipv4.tcp_tw_reuse", "2")]);
    assert_eq!(s["net.ipv4.ip_local_port_range"], "NARROW");
    assert_eq!(s["net.ipv4.tcp_tw_reuse"], "OTHER");
    let (_, s) = check(&[("net.ipv4.ip_local_port_range", "1024 65535"), ("net.ipv4.tcp_tw_reuse", "1")]);
    assert_eq!(s["net.ipv4.ip_local_port_range"], "ok");
    assert_eq!(s["net.ipv4.tcp_tw_reuse"], "ok");
}

#[test]
fn every_recommended_value_passes_its_own_check() {
    let conf = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning/sysctl.d/90-comet.conf"))
        .expect("read the sysctl file");
    let settings: Vec<(&str, &str)> = conf
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    assert!(settings.len() >= 10, "{settings:?}");
    let (ok, s) = check(&settings);
    assert!(s.values().all(|v| v == "ok"), "{s:?}");
    assert!(ok);
}
