//! What an idle wss connection's TLS state holds on the heap, counted by
//! a global allocator around the server's calls only: the boxed
//! `TlsConn` and everything rustls keeps for the connection once the
//! handshake is over (keys, key schedule, the state machine). Together
//! with the read task, the socket slot and `Conn` (held by their own size
//! tests), this is the user-space cost bench/RESULTS.md measures as RSS.
//!
//! Measured (rustls 0.23, ring, comet's compact record keys), TLS 1.3
//! 2,713 bytes, TLS 1.2 2,417: the boxed `TlsConn` (1,152), rustls's
//! handshake deframer (640, allocated with the connection and never given
//! back), the traffic state (224 in 1.3), two record keys (56 each: raw
//! key and IV, see `src/tls/keys.rs`; ring's expanded keys were 560
//! each), two queues rustls grew during the handshake (96 each), and small
//! pieces; 384 of it (1.3) is the connection's entries in the
//! session-resumption cache, which holds at most 256 in all.
//!
//! The bound is the goal's share: an idle wss connection costs at most
//! 4 KiB, of which the plain connection has 1 KiB (its own goal), so TLS
//! gets 3 KiB.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::sync::Arc;

use comet::tls::{RecordKeys, TlsConn, TlsFiles};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

struct Counting;

thread_local! {
    /// Counting is on (the server's calls).
    static ON: Cell<bool> = const { Cell::new(false) };
    /// Net bytes allocated while on.
    static NET: Cell<isize> = const { Cell::new(0) };
}

fn add(n: isize) {
    let _ = ON.try_with(|on| {
        if on.get() {
            let _ = NET.try_with(|c| c.set(c.get() + n));
        }
    });
}

// SAFETY: every call is passed on to the system allocator unchanged; the
// counters are thread-local cells that never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        add(l.size() as isize);
        // SAFETY: as the caller promised for `l`.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        add(-(l.size() as isize));
        // SAFETY: `p` was allocated by `System` with `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        add(new as isize - l.size() as isize);
        // SAFETY: as the caller promised for `p` and `l`.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Runs `f` with the server's allocations counted.
fn server<R>(f: impl FnOnce() -> R) -> R {
    ON.with(|o| o.set(true));
    let r = f();
    ON.with(|o| o.set(false));
    r
}

fn certs(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    let ec = "ec -pkeyopt ec_paramgen_curve:P-256";
    for cmd in [
        format!("openssl req -x509 -newkey {ec} -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=mem-ca"),
        format!("openssl req -newkey {ec} -nodes -keyout key.pem -out srv.csr -subj /CN=localhost"),
        "printf 'subjectAltName=DNS:localhost\\n' > ext".into(),
        "openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext -out srv.pem"
            .into(),
        "cat srv.pem ca.pem > chain.pem".into(),
    ] {
        let out = std::process::Command::new("sh").arg("-c").arg(&cmd).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Moves bytes both ways until neither side has anything to say.
fn pump(c: &mut rustls::ClientConnection, s: &mut TlsConn, plain: &mut Vec<u8>) {
    for _ in 0..4 {
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        server(|| s.receive(&mut wire, plain).unwrap());
        let back = s.pending().to_vec();
        server(|| s.sent(back.len()));
        let mut rd = &back[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
        }
        c.process_new_packets().unwrap();
    }
}

#[test]
fn an_idle_tls_connection_holds_at_most_its_budget() {
    let dir = std::env::temp_dir().join(format!("comet-tls-mem-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    certs(&dir);
    let files = TlsFiles { cert: dir.join("chain.pem"), key: dir.join("key.pem"), record_keys: RecordKeys::Compact };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let cfg = comet::tls::load(&files, now).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let mut report = Vec::new();
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let cc = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        let mut c = rustls::ClientConnection::new(Arc::new(cc), "localhost".try_into().unwrap()).unwrap();
        NET.with(|n| n.set(0));
        let mut s = server(|| TlsConn::new(cfg.clone()).unwrap());
        let mut plain = Vec::new();
        pump(&mut c, &mut s, &mut plain);
        assert!(!s.handshaking(), "{version:?}");
        // A request in, a push out: then the connection is idle.
        c.writer().write_all(b"GET /ws HTTP/1.1\r\n\r\n").unwrap();
        pump(&mut c, &mut s, &mut plain);
        server(|| s.encrypt(b"pushed").unwrap());
        pump(&mut c, &mut s, &mut plain);
        let mut got = [0u8; 6];
        c.reader().read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pushed");
        // The plaintext the test collected is the caller's, not the
        // connection's.
        let held = NET.with(|n| n.get()) - plain.capacity() as isize;
        report.push(format!("{version:?}: {held} bytes"));
        assert!(held <= 3 * 1024, "{version:?}: an idle TLS connection holds {held} bytes of heap");
        drop(s);
    }
    eprintln!("idle TLS state: {}", report.join(", "));
}
