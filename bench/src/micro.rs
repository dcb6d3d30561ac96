//! In-process measurements of one step of the delivery path, with the
//! server's own code and no network: what a wss record costs to encrypt
//! (`tls-records`), and what one compression of a published message costs
//! (`deflate-cost`). They put a number on a trade-off that a fan-out run
//! cannot separate from its noise.

use std::io::Read;
use std::sync::Arc;

use comet::tls::{RecordKeys, TlsConn, TlsFiles};
use rustls::SupportedCipherSuite;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// This thread's CPU time in seconds, to the nanosecond: getrusage's view
/// of a running thread lags by up to a scheduler tick, too coarse for
/// rounds of a few milliseconds.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the one we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Moves the client's ciphertext to the server and the server's back.
fn pump(c: &mut rustls::ClientConnection, s: &mut TlsConn) {
    let mut plain = Vec::new();
    let mut wire = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut wire).expect("client write_tls");
    }
    s.receive(&mut wire, &mut plain).expect("server receive");
    let back = s.pending().to_vec();
    s.sent(back.len());
    let mut rd = &back[..];
    while !rd.is_empty() {
        c.read_tls(&mut rd).expect("client read_tls");
    }
    c.process_new_packets().expect("client process");
}

/// A connected pair: comet's `TlsConn` over `server` against a stock
/// rustls client that offers only `suite`.
fn pair(
    server: &Arc<rustls::ServerConfig>,
    roots: &rustls::RootCertStore,
    suite: SupportedCipherSuite,
) -> (rustls::ClientConnection, Box<TlsConn>) {
    let version = match suite {
        SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
        SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
    };
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![suite];
    let cc = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[version])
        .expect("versions")
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let mut c = rustls::ClientConnection::new(Arc::new(cc), "localhost".try_into().expect("name")).expect("client");
    let mut s = TlsConn::new(server.clone()).expect("server");
    for _ in 0..4 {
        pump(&mut c, &mut s);
    }
    assert!(!s.handshaking(), "handshake with {:?}", suite.suite());
    (c, s)
}

/// Server CPU (this thread) per encrypted record, for each ECDSA cipher
/// suite and record size, with ring's expanded keys (`--tls-record-keys expanded`) against
/// comet's compact keys (`src/tls/keys.rs`), through `TlsConn::encrypt` as a push
/// is.
pub fn tls_records(records: usize, sizes: &[usize]) {
    let dir = std::env::temp_dir().join(format!("comet-bench-tlsrec-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    crate::target::make_certs(&dir).unwrap_or_else(|e| crate::die(&format!("certificates: {e}")));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let load = |record_keys| {
        let files = TlsFiles { cert: dir.join("chain.pem"), key: dir.join("key.pem"), record_keys };
        comet::tls::load(&files, now as i64).unwrap_or_else(|e| crate::die(&e))
    };
    let (ring_keys, compact) = (load(RecordKeys::Expanded), load(RecordKeys::Compact));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(dir.join("ca.pem")).expect("ca.pem")).expect("root");
    let _ = std::fs::remove_dir_all(&dir);
    println!("server CPU ns per record, {records} records each (ring's keys | compact keys | difference)");
    let suites = rustls::crypto::ring::default_provider().cipher_suites;
    for suite in suites.into_iter().filter(|s| !format!("{:?}", s.suite()).contains("_RSA_")) {
        for &size in sizes {
            let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let mut ns = [0.0f64; 2];
            for (k, cfg) in [&ring_keys, &compact].into_iter().enumerate() {
                let (mut c, mut s) = pair(cfg, &roots, suite);
                // The records are real: the client reads one (the timed
                // ones are dropped unread).
                s.encrypt(&payload).expect("encrypt");
                pump(&mut c, &mut s);
                let mut got = vec![0; size];
                c.reader().read_exact(&mut got).expect("client read");
                assert_eq!(got, payload);
                // Best of three rounds: the machine is shared.
                let mut best = f64::MAX;
                for _ in 0..3 {
                    let cpu0 = thread_cpu();
                    for _ in 0..records {
                        s.encrypt(&payload).expect("encrypt");
                        let n = s.pending().len();
                        s.sent(n);
                    }
                    best = best.min((thread_cpu() - cpu0) * 1e9 / records as f64);
                }
                ns[k] = best;
            }
            println!(
                "{:<48} {size:>6} B  {:>8.0} | {:>8.0} | {:>+7.0} ns ({:+.2} ns/B)",
                format!("{:?}", suite.suite()),
                ns[0],
                ns[1],
                ns[1] - ns[0],
                (ns[1] - ns[0]) / size as f64
            );
        }
    }
}

/// A 2 KB JSON message less repetitive than the fan-out filler: an array
/// of chat events with varied ids, names, times and words.
fn realistic_json(bytes: usize) -> String {
    const WORDS: [&str; 24] = [
        "order", "shipped", "delayed", "payment", "refund", "alpha", "beta", "gamma", "north", "south", "green",
        "amber", "ticket", "queue", "urgent", "review", "merged", "opened", "closed", "build", "deploy", "cache",
        "server", "client",
    ];
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut s = String::from("[");
    while s.len() < bytes {
        let r = next();
        let text: Vec<&str> = (0..4 + r % 6).map(|i| WORDS[((r >> (i * 5)) % 24) as usize]).collect();
        s.push_str(&format!(
            "{{\"id\":{},\"user\":\"u{}\",\"ts\":{},\"price\":{}.{:02},\"text\":\"{}\"}},",
            r % 1_000_000,
            r % 9973,
            1_764_000_000 + r % 86_400,
            r % 500,
            r % 100,
            text.join(" ")
        ));
    }
    s.truncate(bytes - 1);
    s.push(']');
    s
}

/// CPU of one compression of a published message into its
/// permessage-deflate frame (`Deflater::frame`, what a publish pays once
/// for all its subscribers), for the fan-out bench's own message and a
/// less repetitive JSON of the same size.
pub fn deflate_cost(bytes: usize, iterations: usize) {
    let mut filler = crate::wire::epoch_us().to_string();
    while filler.len() < bytes {
        filler.push_str(" user 4711 wrote: lorem ipsum dolor sit amet, consectetur;");
    }
    filler.truncate(bytes);
    let mut deflater = comet::ws::deflate::Deflater::default();
    let mut inflater = comet::ws::deflate::Inflater::default();
    for (name, text) in [("fan-out filler", filler), ("varied JSON", realistic_json(bytes))] {
        let json = serde_json::json!({ "event": "bench", "data": text }).to_string();
        let mut frame = Vec::new();
        comet::ws::frame_header(comet::ws::Opcode::Text, json.len(), &mut frame);
        frame.extend_from_slice(json.as_bytes());
        let mut best = f64::MAX;
        let mut out_len = 0;
        for _ in 0..3 {
            let cpu0 = thread_cpu();
            for _ in 0..iterations {
                let z = deflater.frame(&frame).expect("compressible");
                out_len = z.len();
                std::hint::black_box(z);
            }
            best = best.min((thread_cpu() - cpu0) * 1e6 / iterations as f64);
        }
        // What a browser inflates is the same message.
        let z = deflater.frame(&frame).expect("compressible");
        let (_, start, end) = crate::wire::parse_frame(&z).expect("a whole frame");
        let mut out = Vec::new();
        let plain = crate::wire::frame_payload(z[0], &z[start..end], &mut inflater, &mut out);
        assert_eq!(plain, json.as_bytes(), "{name}: the compressed frame does not inflate to the message");
        println!(
            "{name:<16} frame {:>5} B -> {:>5} B ({:.1}x): {best:.1} µs CPU per compression",
            frame.len(),
            out_len,
            frame.len() as f64 / out_len as f64
        );
    }
}
