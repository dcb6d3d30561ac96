//! TLS: the certificate and key (loaded and checked at start, replaced on
//! SIGHUP), and [`TlsConn`], one connection's TLS state over rustls's
//! unbuffered API.
//!
//! [`TlsConn`] is sans-IO like the protocol code: ciphertext in, plaintext
//! out, and ciphertext for the I/O layer to send. It holds no buffer while
//! the connection is idle: an unfinished record is kept only until the rest
//! arrives, and ciphertext only until the socket takes it. rustls's buffered
//! API (and the async wrappers around it) would keep two buffers per
//! connection for its whole life.
//!
//! The crypto provider is *ring*: it builds in seconds with a C compiler
//! alone, where aws-lc-rs needs a much longer build (and cmake on some
//! systems); its handshakes are slower, which `comet-bench connect`
//! measures (bench/RESULTS.md). Its record keys are replaced by compact
//! ones ([`keys`]): an idle connection keeps 112 bytes of keys, not 1,120.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

pub mod keys;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus};

/// The first byte of every TLS handshake record (a ClientHello).
pub const HANDSHAKE_RECORD: u8 = 0x16;

/// Most plaintext encrypted into one record (TLS's maximum fragment).
pub const MAX_PLAINTEXT: usize = 16 * 1024;

/// Where the certificate and key come from (for reloads), and how the
/// record keys are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub record_keys: RecordKeys,
}

/// How a connection keeps its record keys (`--tls-record-keys`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RecordKeys {
    /// The raw key and IV (56 bytes a direction), expanded per record:
    /// AES-GCM pays a key expansion per record written or read.
    #[default]
    Compact,
    /// ring's expanded keys (560 bytes a direction), kept for the
    /// connection's life: no setup per record.
    Expanded,
}

/// The server configuration new connections use; SIGHUP replaces it, and
/// connections keep the one they started with.
#[derive(Default)]
pub struct Current(RwLock<Option<Arc<ServerConfig>>>);

impl Current {
    pub fn new(cfg: Option<Arc<ServerConfig>>) -> Current {
        Current(RwLock::new(cfg))
    }

    /// The configuration for a new connection; None: TLS is off.
    pub fn get(&self) -> Option<Arc<ServerConfig>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, cfg: Arc<ServerConfig>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(cfg);
    }

    pub fn is_on(&self) -> bool {
        self.0.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tls::Current({})", if self.is_on() { "on" } else { "off" })
    }
}

/// Reads and checks the certificate chain and key, and builds the server
/// configuration: TLS 1.2 and 1.3, ALPN `http/1.1`, no client certificates.
/// Errors name the file at fault: unreadable, not PEM, expired or not yet
/// valid, a key that does not match the certificate.
pub fn load(files: &TlsFiles, now_unix: i64) -> Result<Arc<ServerConfig>, String> {
    let provider = match files.record_keys {
        RecordKeys::Compact => keys::provider(),
        RecordKeys::Expanded => rustls::crypto::ring::default_provider(),
    };
    let cert = &files.cert;
    let key = &files.key;
    let certs = read_certs(cert)?;
    let (not_before, not_after) = validity(&certs[0])
        .ok_or_else(|| format!("--tls-cert {}: cannot read the certificate's validity dates", cert.display()))?;
    if now_unix > not_after {
        return Err(format!(
            "--tls-cert {}: the certificate expired on {} (UTC)",
            cert.display(),
            format_unix(not_after)
        ));
    }
    if now_unix < not_before {
        return Err(format!(
            "--tls-cert {}: the certificate is not valid before {} (UTC)",
            cert.display(),
            format_unix(not_before)
        ));
    }
    let key_der = read_key(key)?;
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                format!("--tls-key {} does not match the certificate in --tls-cert {}", key.display(), cert.display())
            }
            e => format!("--tls-key {}: {e}", key.display()),
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("--tls-cert {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("--tls-cert {}: not a PEM certificate chain: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("--tls-cert {}: no CERTIFICATE in the file", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("--tls-key {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| format!("--tls-key {}: no PEM private key: {e}", path.display()))
}

/// One DER element: (tag, contents, the rest after it).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| a << 8 | b as usize);
        rest = &rest[n..];
        len
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The certificate's notBefore and notAfter, in Unix seconds.
fn validity(cert: &[u8]) -> Option<(i64, i64)> {
    let (_, cert, _) = der(cert)?;
    let (_, tbs, _) = der(cert)?;
    let mut rest = tbs;
    // [0] version (optional), serial, signature algorithm, issuer.
    let (tag, _, r) = der(rest)?;
    if tag == 0xa0 {
        rest = r;
    }
    for _ in 0..3 {
        rest = der(rest)?.2;
    }
    let (_, validity, _) = der(rest)?;
    let (t1, v1, r) = der(validity)?;
    let (t2, v2, _) = der(r)?;
    Some((asn1_time(t1, v1)?, asn1_time(t2, v2)?))
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn asn1_time(tag: u8, v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?.strip_suffix('Z')?;
    let num = |a: usize, b: usize| s.get(a..b)?.parse::<i64>().ok();
    let (year, at) = match (tag, s.len()) {
        (0x17, 12) => {
            let y = num(0, 2)?;
            (if y >= 50 { 1900 + y } else { 2000 + y }, 2)
        }
        (0x18, 14) => (num(0, 4)?, 4),
        _ => return None,
    };
    let (mo, d, h, mi, sec) =
        (num(at, at + 2)?, num(at + 2, at + 4)?, num(at + 4, at + 6)?, num(at + 6, at + 8)?, num(at + 8, at + 10)?);
    Some(days_from_civil(year, mo, d) * 86400 + h * 3600 + mi * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn format_unix(t: i64) -> String {
    let days = t.div_euclid(86400);
    let secs = t.rem_euclid(86400);
    // civil_from_days
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// Appends the handshake data (or alert) rustls has ready to `out`.
fn encode(
    e: &mut rustls::unbuffered::EncodeTlsData<'_, rustls::server::ServerConnectionData>,
    out: &mut Vec<u8>,
) -> Result<(), rustls::Error> {
    let at = out.len();
    out.resize(at + 4096, 0);
    let n = match e.encode(&mut out[at..]) {
        Ok(n) => Ok(n),
        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
            out.resize(at + required_size, 0);
            e.encode(&mut out[at..]).map_err(|e| rustls::Error::General(e.to_string()))
        }
        Err(e) => Err(rustls::Error::General(e.to_string())),
    }
    .inspect_err(|_| out.truncate(at))?;
    out.truncate(at + n);
    Ok(())
}

/// What [`TlsConn::receive`] found besides plaintext.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The handshake finished during this call.
    pub handshake_done: bool,
    /// The peer sent close_notify: nothing more will come.
    pub peer_closed: bool,
}

/// One connection's TLS state. Boxed by the I/O layer, beside the socket.
pub struct TlsConn {
    conn: UnbufferedServerConnection,
    /// Ciphertext of an unfinished record (or handshake message); empty and
    /// unallocated between records.
    pending_in: Vec<u8>,
    /// Ciphertext not yet taken by the socket, from `sent` on; empty and
    /// unallocated once sent.
    pending_out: Vec<u8>,
    sent: usize,
    /// Application data may be encrypted (the handshake is far enough).
    may_write: bool,
    /// No byte has been received yet (the first one tells TLS from not).
    pub fresh: bool,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn").field("handshaking", &self.handshaking()).field("buffered", &self.buffered()).finish()
    }
}

impl TlsConn {
    pub fn new(cfg: Arc<ServerConfig>) -> Result<Box<TlsConn>, rustls::Error> {
        Ok(Box::new(TlsConn {
            conn: UnbufferedServerConnection::new(cfg)?,
            pending_in: Vec::new(),
            pending_out: Vec::new(),
            sent: 0,
            may_write: false,
            fresh: true,
        }))
    }

    /// The handshake is not finished: application data cannot be sent yet.
    pub fn handshaking(&self) -> bool {
        !self.may_write
    }

    /// Ciphertext waiting for the socket.
    pub fn pending(&self) -> &[u8] {
        &self.pending_out[self.sent..]
    }

    /// The socket took `n` bytes of [`TlsConn::pending`].
    pub fn sent(&mut self, n: usize) {
        self.sent += n;
        if self.sent >= self.pending_out.len() {
            // Free it: an idle connection holds no buffer.
            self.pending_out = Vec::new();
            self.sent = 0;
        }
    }

    /// Heap bytes this connection holds beyond its fixed state.
    pub fn buffered(&self) -> usize {
        self.pending_in.capacity() + self.pending_out.capacity()
    }

    /// Takes ciphertext just read. `data` may be decrypted in place;
    /// plaintext is appended to `plain`, and what rustls has to send
    /// (handshake messages, tickets) to [`TlsConn::pending`].
    pub fn receive(&mut self, data: &mut [u8], plain: &mut Vec<u8>) -> Result<Received, rustls::Error> {
        if !data.is_empty() {
            self.fresh = false;
        }
        let mut got = Received::default();
        let TlsConn { conn, pending_in, pending_out, may_write, .. } = self;
        let was_writing = *may_write;
        let from_pending = !pending_in.is_empty();
        if from_pending {
            pending_in.extend_from_slice(data);
        }
        let buf: &mut [u8] = if from_pending { pending_in.as_mut_slice() } else { data };
        let mut start = 0;
        let result = loop {
            let UnbufferedStatus { mut discard, state } = conn.process_tls_records(&mut buf[start..]);
            let state = match state {
                Ok(s) => s,
                Err(e) => break Err(e),
            };
            let mut stop = false;
            match state {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        match rec {
                            Ok(rec) => {
                                discard += rec.discard;
                                plain.extend_from_slice(rec.payload);
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => encode(&mut e, pending_out)?,
                // The I/O layer sends `pending_out` after this call, in order.
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::BlockedHandshake => stop = true,
                ConnectionState::WriteTraffic(_) => {
                    *may_write = true;
                    stop = true;
                }
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    got.peer_closed = true;
                    stop = true;
                }
                // Early data is never accepted (max_early_data_size is 0).
                _ => break Err(rustls::Error::General("unexpected TLS state".into())),
            }
            start += discard;
            if stop {
                break Ok(());
            }
        };
        // Keep what is left of an unfinished record, and nothing else.
        if from_pending {
            pending_in.drain(..start.min(pending_in.len()));
            if pending_in.is_empty() {
                *pending_in = Vec::new();
            }
        } else if start < data.len() {
            pending_in.extend_from_slice(&data[start..]);
        }
        result?;
        got.handshake_done = !was_writing && self.may_write;
        Ok(got)
    }

    /// After [`TlsConn::receive`] failed: puts the alert rustls made for the
    /// peer (a handshake failure, no common protocol) onto
    /// [`TlsConn::pending`], so the client learns why before the close.
    pub fn take_alert(&mut self) {
        let TlsConn { conn, pending_out, .. } = self;
        for _ in 0..4 {
            let UnbufferedStatus { state, .. } = conn.process_tls_records(&mut []);
            let Ok(ConnectionState::EncodeTlsData(mut e)) = state else { return };
            if encode(&mut e, pending_out).is_err() {
                return;
            }
        }
    }

    /// Encrypts `plaintext` (at most [`MAX_PLAINTEXT`] bytes make one
    /// record) onto [`TlsConn::pending`].
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<(), rustls::Error> {
        self.with_write(|w, out| w.encrypt(plaintext, out), plaintext.len() + 64)
    }

    /// Queues a close_notify alert onto [`TlsConn::pending`].
    pub fn close_notify(&mut self) -> Result<(), rustls::Error> {
        self.with_write(|w, out| w.queue_close_notify(out), 64)
    }

    fn with_write(
        &mut self,
        mut f: impl FnMut(
            &mut rustls::unbuffered::WriteTraffic<'_, rustls::server::ServerConnectionData>,
            &mut [u8],
        ) -> Result<usize, EncryptError>,
        guess: usize,
    ) -> Result<(), rustls::Error> {
        let TlsConn { conn, pending_out, .. } = self;
        let UnbufferedStatus { state, .. } = conn.process_tls_records(&mut []);
        let ConnectionState::WriteTraffic(mut w) = state? else {
            return Err(rustls::Error::General("TLS connection cannot send application data now".into()));
        };
        let at = pending_out.len();
        pending_out.resize(at + guess, 0);
        let n = match f(&mut w, &mut pending_out[at..]) {
            Ok(n) => n,
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                pending_out.resize(at + required_size, 0);
                f(&mut w, &mut pending_out[at..]).map_err(|e| rustls::Error::General(e.to_string()))?
            }
            Err(e) => return Err(rustls::Error::General(e.to_string())),
        };
        pending_out.truncate(at + n);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A CA and a server certificate for localhost, made with the openssl
    /// command line in a fresh directory; `days` may be negative (expired).
    pub(crate) fn make_certs(dir: &Path, kind: &str, days: i64) {
        std::fs::create_dir_all(dir).unwrap();
        let sh = |cmd: &str| {
            let out = std::process::Command::new("sh").arg("-c").arg(cmd).current_dir(dir).output().unwrap();
            assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let newkey = if kind == "rsa" { "rsa:2048" } else { "ec -pkeyopt ec_paramgen_curve:P-256" };
        sh(&format!(
            "openssl req -x509 -newkey {newkey} -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=comet-test-ca"
        ));
        sh(&format!("openssl req -newkey {newkey} -nodes -keyout key.pem -out srv.csr -subj /CN=localhost"));
        sh("printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > ext");
        sh(&format!(
            "openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days {days} -extfile ext -out srv.pem"
        ));
        sh("cat srv.pem ca.pem > chain.pem");
    }

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("comet-tls-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn files(d: &Path) -> TlsFiles {
        TlsFiles { cert: d.join("chain.pem"), key: d.join("key.pem"), record_keys: RecordKeys::Compact }
    }

    /// A server config over a fresh EC certificate valid two days, and the
    /// roots a client needs to trust it (the files are removed).
    fn served_ec(name: &str) -> (Arc<ServerConfig>, rustls::RootCertStore) {
        let d = temp(name);
        make_certs(&d, "ec", 2);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let cfg = load(&files(&d), now).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(d.join("ca.pem")).unwrap()).unwrap();
        let _ = std::fs::remove_dir_all(&d);
        (cfg, roots)
    }

    fn client(d: &Path) -> rustls::ClientConnection {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(d.join("ca.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap()
    }

    /// Moves the client's ciphertext to the server in `chunk`-byte pieces
    /// (records cut anywhere), and the server's back.
    fn pump(c: &mut rustls::ClientConnection, s: &mut TlsConn, chunk: usize, plain: &mut Vec<u8>) -> Received {
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let mut got = Received::default();
        for piece in wire.chunks_mut(chunk) {
            let r = s.receive(piece, plain).unwrap();
            got.handshake_done |= r.handshake_done;
            got.peer_closed |= r.peer_closed;
        }
        let back = s.pending().to_vec();
        s.sent(back.len());
        let mut rd = &back[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
        }
        c.process_new_packets().unwrap();
        got
    }

    #[test]
    fn a_connection_is_served_and_then_holds_no_buffer() {
        for (kind, version) in [("ec", &rustls::version::TLS13), ("rsa", &rustls::version::TLS12)] {
            let d = temp(kind);
            make_certs(&d, kind, 2);
            let cfg = load(&files(&d), 1_800_000_000 - 86400 * 365 * 2).err();
            assert!(cfg.is_some_and(|e| e.contains("not valid before")), "{kind}");
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
            let cfg = load(&files(&d), now).unwrap();
            let mut s = TlsConn::new(cfg).unwrap();
            let mut c = client(&d);
            if version == &rustls::version::TLS12 {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let mut roots = rustls::RootCertStore::empty();
                roots.add(CertificateDer::from_pem_file(d.join("ca.pem")).unwrap()).unwrap();
                let cc = rustls::ClientConfig::builder_with_provider(provider)
                    .with_protocol_versions(&[version])
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                c = rustls::ClientConnection::new(Arc::new(cc), "localhost".try_into().unwrap()).unwrap();
            }
            let mut plain = Vec::new();
            let mut done = false;
            for _ in 0..6 {
                done |= pump(&mut c, &mut s, 7, &mut plain).handshake_done;
            }
            assert!(done && !s.handshaking() && !c.is_handshaking(), "{kind}");
            assert_eq!(c.protocol_version(), Some(version.version), "{kind}");
            c.writer().write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            pump(&mut c, &mut s, 3, &mut plain);
            assert_eq!(plain, b"GET / HTTP/1.1\r\n\r\n");
            let big = vec![b'x'; MAX_PLAINTEXT];
            s.encrypt(&big).unwrap();
            s.encrypt(b"tail").unwrap();
            pump(&mut c, &mut s, 1000, &mut plain);
            let mut got = Vec::new();
            let _ = c.reader().read_to_end(&mut got);
            assert_eq!(got.len(), MAX_PLAINTEXT + 4, "{kind}");
            assert_eq!(s.buffered(), 0, "{kind}: an idle connection keeps a buffer");
            c.send_close_notify();
            assert!(pump(&mut c, &mut s, 100, &mut plain).peer_closed);
            let _ = std::fs::remove_dir_all(&d);
        }
    }

    /// Every cipher suite served with the compact record keys talks to
    /// rustls's stock client (ring's own keys) both ways: the handshake,
    /// small and full-size records, and a record altered on the wire is
    /// refused, not delivered.
    #[test]
    fn every_suite_round_trips_with_compact_keys() {
        let (cfg, roots) = served_ec("suites");
        let ring = rustls::crypto::ring::default_provider();
        let ecdsa = ring.cipher_suites.iter().filter(|s| !format!("{:?}", s.suite()).contains("_RSA_"));
        let mut served = Vec::new();
        for suite in ecdsa {
            let version = match suite {
                rustls::SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
                rustls::SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
            };
            let mut provider = rustls::crypto::ring::default_provider();
            provider.cipher_suites = vec![*suite];
            let cc = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            let mut c = rustls::ClientConnection::new(Arc::new(cc), "localhost".try_into().unwrap()).unwrap();
            let mut s = TlsConn::new(cfg.clone()).unwrap();
            let mut plain = Vec::new();
            for _ in 0..4 {
                pump(&mut c, &mut s, 1000, &mut plain);
            }
            let name = format!("{:?}", suite.suite());
            assert!(!s.handshaking(), "{name}");
            assert_eq!(c.negotiated_cipher_suite().map(|n| n.suite()), Some(suite.suite()), "{name}");
            for n in [1, 100, 2048, MAX_PLAINTEXT] {
                let sent: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
                c.writer().write_all(&sent).unwrap();
                plain.clear();
                pump(&mut c, &mut s, 4096, &mut plain);
                assert_eq!(plain, sent, "{name}: client to server, {n} bytes");
                s.encrypt(&sent).unwrap();
                pump(&mut c, &mut s, 4096, &mut plain);
                let mut got = vec![0; n];
                c.reader().read_exact(&mut got).unwrap();
                assert_eq!(got, sent, "{name}: server to client, {n} bytes");
            }
            // One bit flipped in the last byte (the tag) of a record.
            c.writer().write_all(b"not this").unwrap();
            let mut wire = Vec::new();
            c.write_tls(&mut wire).unwrap();
            *wire.last_mut().unwrap() ^= 1;
            plain.clear();
            assert!(s.receive(&mut wire, &mut plain).is_err(), "{name}: a forged record was accepted");
            assert!(plain.is_empty(), "{name}");
            served.push(name);
        }
        assert_eq!(served.len(), 6, "{served:?}");
    }

    /// An idle wss connection's fixed TLS state, boxed beside its socket
    /// (heap inside rustls comes on top; `comet-bench --tls idle` measures
    /// the whole, against bench/RESULTS.md).
    #[test]
    fn tls_state_stays_within_its_budget() {
        assert!(std::mem::size_of::<TlsConn>() <= 1152, "TlsConn is {} bytes", std::mem::size_of::<TlsConn>());
    }

    /// Garbage after a handshake record header is a TLS error, and what an
    /// unfinished record can make the connection keep is bounded by TLS's
    /// record and handshake message sizes, whatever is sent.
    #[test]
    fn garbage_is_an_error_and_pending_input_stays_bounded() {
        let (cfg, _) = served_ec("garbage");
        let mut plain = Vec::new();
        let mut s = TlsConn::new(cfg.clone()).unwrap();
        assert!(s.receive(&mut [0x16, 3, 1, 0, 5, 1, 2, 3, 4, 5], &mut plain).is_err());
        // A record that claims to be longer than TLS allows.
        let mut s = TlsConn::new(cfg.clone()).unwrap();
        assert!(s.receive(&mut [0x16, 3, 1, 0xff, 0xff, 1], &mut plain).is_err());
        // Handshake records that never complete a message: rustls refuses
        // the message before the connection holds more than about 64 KiB.
        let mut s = TlsConn::new(cfg).unwrap();
        let mut hello = vec![0x16, 3, 1, 0x40, 0x00, 1, 0xff, 0xff, 0xff];
        hello.resize(5 + 0x4000, 0);
        let mut failed = false;
        for _ in 0..40 {
            let mut rec = hello.clone();
            if !s.fresh {
                rec[5..9].copy_from_slice(&[0; 4]);
            }
            match s.receive(&mut rec, &mut plain) {
                Ok(_) => assert!(s.buffered() <= 80 * 1024, "holds {}", s.buffered()),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(failed, "an endless handshake message was accepted");
        assert!(plain.is_empty());
    }

    /// A client with no protocol in common (ALPN h2 only) is told so with
    /// an alert, not a bare close.
    #[test]
    fn a_failed_handshake_sends_the_alert() {
        let (cfg, roots) = served_ec("alert");
        let mut cc = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cc.alpn_protocols = vec![b"h2".to_vec()];
        let mut c = rustls::ClientConnection::new(Arc::new(cc), "localhost".try_into().unwrap()).unwrap();
        let mut s = TlsConn::new(cfg).unwrap();
        let mut wire = Vec::new();
        c.write_tls(&mut wire).unwrap();
        assert!(s.receive(&mut wire, &mut Vec::new()).is_err());
        s.take_alert();
        let mut rd = s.pending();
        assert!(!rd.is_empty(), "no alert");
        c.read_tls(&mut rd).unwrap();
        let err = c.process_new_packets().unwrap_err();
        assert!(
            matches!(err, rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)),
            "{err:?}"
        );
    }

    #[test]
    fn bad_files_are_refused_with_their_name() {
        let d = temp("bad");
        make_certs(&d, "ec", -1);
        // Both made before `now`: a certificate made after it would not be
        // valid yet at `now` (openssl takes seconds on a loaded machine).
        let other = temp("other");
        make_certs(&other, "ec", 2);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let e = load(&files(&d), now).unwrap_err();
        assert!(e.contains("expired on 20") && e.contains("chain.pem"), "{e}");
        let mismatched = TlsFiles { cert: other.join("chain.pem"), ..files(&d) };
        let e = load(&mismatched, now).unwrap_err();
        assert!(e.contains("does not match") && e.contains("key.pem"), "{e}");
        let missing = TlsFiles { cert: d.join("nope.pem"), ..files(&d) };
        let e = load(&missing, now).unwrap_err();
        assert!(e.contains("nope.pem"), "{e}");
        let not_pem = TlsFiles { cert: d.join("ext"), ..files(&d) };
        let e = load(&not_pem, now).unwrap_err();
        assert!(e.contains("no CERTIFICATE") && e.contains("ext"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_dir_all(&other);
    }

    #[test]
    fn asn1_times_convert_to_unix_seconds() {
        assert_eq!(asn1_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(asn1_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(asn1_time(0x18, b"20260101000000Z"), Some(1_767_225_600));
        assert_eq!(asn1_time(0x18, b"2026010100000Z"), None);
        assert_eq!(format_unix(1_767_225_600), "2026-01-01 00:00:00");
    }

    #[test]
    fn der_lengths_in_long_form_are_read() {
        let mut v = vec![0x30, 0x82, 0x01, 0x00];
        v.extend(std::iter::repeat_n(7u8, 256));
        let (tag, body, rest) = der(&v).unwrap();
        assert_eq!((tag, body.len(), rest.len()), (0x30, 256, 0));
        assert!(der(&[0x30, 0x82, 0x01]).is_none());
        assert!(der(&[0x30, 0x05, 1, 2]).is_none());
    }
}
