//! wss on the frontend port (`--tls-cert`/`--tls-key`) against the real
//! server on both I/O backends, with certificates made per test by the
//! openssl command line: a Rust client (tungstenite over rustls, TLS 1.2
//! and 1.3), Python `websockets` with compression, curl, a plaintext client
//! on the TLS port, a stalled handshake, bad certificates at start, and
//! SIGHUP with a new certificate.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{BACKENDS, Server, eventually};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tungstenite::{Message, WebSocket};

/// A directory with a CA (`ca.pem`) and a localhost certificate signed by
/// it (`chain.pem`: leaf then CA, `key.pem`), removed on drop.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    /// `kind`: "ec" (P-256) or "rsa"; `days` of validity (-1: expired).
    fn new(name: &str, kind: &str, days: i64) -> Certs {
        let dir = std::env::temp_dir().join(format!("comet-tls-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let newkey = if kind == "rsa" { "rsa:2048" } else { "ec -pkeyopt ec_paramgen_curve:P-256" };
        for cmd in [
            format!(
                "openssl req -x509 -newkey {newkey} -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=comet-test-ca-{name}"
            ),
            format!("openssl req -newkey {newkey} -nodes -keyout key.pem -out srv.csr -subj /CN=localhost"),
            "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > ext".into(),
            format!(
                "openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days {days} -extfile ext -out srv.pem"
            ),
            "cat srv.pem ca.pem > chain.pem".into(),
        ] {
            let out = Command::new("sh").arg("-c").arg(&cmd).current_dir(&dir).output().expect("sh");
            assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Certs { dir }
    }

    fn path(&self, f: &str) -> String {
        self.dir.join(f).to_str().unwrap().to_string()
    }

    fn leaf(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(self.dir.join("srv.pem")).unwrap()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(certs: &Certs, io: &str, extra: &[&str]) -> Server {
    let (cert, key) = (certs.path("chain.pem"), certs.path("key.pem"));
    let mut args = vec!["--io", io, "--password", "pw", "--tls-cert", &cert, "--tls-key", &key];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn client_config(cas: &[&Path], versions: &[&'static rustls::SupportedProtocolVersion]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.add(CertificateDer::from_pem_file(ca).unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn tls_connect(s: &Server, cfg: Arc<rustls::ClientConfig>) -> Tls {
    let tcp = TcpStream::connect(s.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let conn = rustls::ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut t = rustls::StreamOwned::new(conn, tcp);
    while t.conn.is_handshaking() {
        t.conn.complete_io(&mut t.sock).expect("TLS handshake");
    }
    t
}

/// A comet client over wss; returns it after its serverInfo.
fn wss(s: &Server, cfg: Arc<rustls::ClientConfig>, uuid: &str) -> WebSocket<Tls> {
    let t = tls_connect(s, cfg);
    let url = format!("wss://localhost:{}/ws/sesion=&myid=&devid=0&v=4.08&uuid={uuid}&api=js", s.addr.port());
    let (mut ws, resp) = tungstenite::client(url.as_str(), t).expect("wss upgrade");
    assert_eq!(resp.status(), 101);
    let info = text(&mut ws);
    assert!(info.contains("serverInfo"), "{info}");
    ws
}

fn text(ws: &mut WebSocket<Tls>) -> String {
    loop {
        match ws.read().expect("read") {
            Message::Text(t) => return t.to_string(),
            Message::Close(f) => panic!("closed: {f:?}"),
            _ => {}
        }
    }
}

/// A metric summed over shards, read with curl over https (the frontend
/// port serves /metrics over TLS only now).
fn tls_metric(certs: &Certs, s: &Server, name: &str) -> i64 {
    let url = format!("https://localhost:{}/metrics", s.addr.port());
    let out = Command::new("curl").args(["-sS", "--cacert", &certs.path("ca.pem"), &url]).output().expect("curl");
    let body = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("{name}{{");
    let v: Vec<i64> = body
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(!v.is_empty(), "no {name} in {body}");
    v.iter().sum()
}

fn publish(s: &Server, channel: &str, msg: &str) {
    use mysql::prelude::Queryable;
    let url = format!("mysql://root:pw@{}/CometQL_v1", s.backend);
    let mut db = mysql::Conn::new(mysql::Opts::from_url(&url).unwrap()).unwrap();
    db.query_drop(format!("INSERT INTO pipes_messages (name, event, message) VALUES ('{channel}', 'ev', '{msg}')"))
        .unwrap();
}

/// Subscribes and waits until a publish reaches the client.
fn subscribed(s: &Server, ws: &mut WebSocket<Tls>, channel: &str) {
    ws.send(Message::text(format!("subscription\n{channel}"))).unwrap();
    // The subscription may still be on its way when the first publish
    // goes out: that publish reaches nobody, so a read that times out only
    // means "publish again".
    ws.get_ref().sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let got = eventually(10, || {
        publish(s, channel, "ping");
        loop {
            match ws.read() {
                Ok(Message::Text(t)) if t.contains("ping") => return true,
                Ok(Message::Close(f)) => panic!("closed: {f:?}"),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    return false;
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    });
    ws.get_ref().sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(got, "no publish reached the subscriber of {channel}");
}

#[test]
fn wss_carries_pushes_over_tls_1_3_and_1_2_with_ecdsa_and_rsa() {
    // Both ways of keeping record keys (src/tls/keys.rs) on both backends.
    for (io, kind, keys) in [("uring", "ec", "compact"), ("epoll", "rsa", "compact"), ("epoll", "ec", "expanded")] {
        let certs = Certs::new(&format!("push-{io}-{keys}"), kind, 2);
        let s = start(&certs, io, &["--tls-record-keys", keys]);
        let ca = certs.dir.join("ca.pem");
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let cfg = client_config(&[&ca], &[version]);
            let mut ws = wss(&s, cfg, &format!("u-{io}"));
            assert_eq!(ws.get_ref().conn.protocol_version(), Some(version.version), "{io}");
            assert_eq!(ws.get_ref().conn.alpn_protocol(), Some(&b"http/1.1"[..]), "{io}");
            subscribed(&s, &mut ws, "tls_news");
            // Larger than one TLS record: the queue is cut into records.
            let big = "y".repeat(40_000);
            publish(&s, "tls_news", &big);
            let t = text(&mut ws);
            assert!(t.contains(&big), "{io}: a 40 KB push did not arrive whole");
            ws.close(None).unwrap();
        }
        assert!(tls_metric(&certs, &s, "comet_tls_handshakes_total") >= 2, "{io}");
    }
}

/// A panic handling a TLS connection's input (asked for with the debug
/// build's COMET_TEST_PANIC_ON marker) closes that connection alone, with
/// 1011. The shard's read buffer, lent out while a TLS read is decrypted,
/// is put back: the other connections on the shard go on reading.
#[test]
fn a_panic_handling_a_tls_connection_closes_it_alone() {
    let certs = Certs::new("panic", "ec", 2);
    let (cert, key) = (certs.path("chain.pem"), certs.path("key.pem"));
    for io in BACKENDS {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_comet"));
        cmd.args(["--frontend", "127.0.0.1:0", "--backend", "127.0.0.1:0", "--api", "127.0.0.1:0", "--ephemeral"])
            .args(["--io", io, "--shards", "1", "--password", "pw", "--tls-cert", &cert, "--tls-key", &key])
            .env("COMET_TEST_PANIC_ON", "panic-marker");
        let s = Server::spawn_cmd(cmd);
        let cfg = client_config(&[&certs.dir.join("ca.pem")], &[&rustls::version::TLS13]);
        let mut good = wss(&s, cfg.clone(), "good");
        subscribed(&s, &mut good, "tls_news");
        let mut bad = wss(&s, cfg.clone(), "bad");
        bad.send(Message::text("panic-marker")).unwrap();
        let code = loop {
            match bad.read() {
                Ok(Message::Close(Some(f))) => break u16::from(f.code),
                Ok(_) => {}
                Err(e) => panic!("{io}: no close frame: {e}"),
            }
        };
        assert_eq!(code, 1011, "{io}");
        publish(&s, "tls_news", "after");
        while !text(&mut good).contains("after") {}
        let _again = wss(&s, cfg, "again");
        assert_eq!(tls_metric(&certs, &s, "comet_handler_panics_total"), 1, "{io}");
    }
}

#[test]
fn a_plaintext_client_on_the_tls_port_is_told_to_use_tls() {
    for io in BACKENDS {
        let certs = Certs::new(&format!("plain-{io}"), "ec", 2);
        let s = start(&certs, io, &[]);
        let mut t = TcpStream::connect(s.addr).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        t.write_all(common::upgrade_request("/ws/x").as_bytes()).unwrap();
        let mut resp = String::new();
        t.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 400"), "{io}: {resp}");
        assert!(resp.contains("use https:// or wss://"), "{io}: {resp}");
        assert_eq!(tls_metric(&certs, &s, "comet_tls_handshake_failures_total"), 1, "{io}");
        // A TLS client with no protocol in common is told so by an alert.
        let mut cfg = (*client_config(&[&certs.dir.join("ca.pem")], &[&rustls::version::TLS13])).clone();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(s.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap()).unwrap();
        let mut t = rustls::StreamOwned::new(conn, tcp);
        let err = loop {
            match t.conn.complete_io(&mut t.sock) {
                Ok(_) if t.conn.is_handshaking() => {}
                Ok(_) => panic!("{io}: handshake without a common protocol"),
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("NoApplicationProtocol"), "{io}: {err}");
        assert_eq!(tls_metric(&certs, &s, "comet_tls_handshake_failures_total"), 2, "{io}");
    }
}

#[test]
fn a_stalled_handshake_is_closed_and_counted() {
    for io in BACKENDS {
        let certs = Certs::new(&format!("stall-{io}"), "ec", 2);
        let s = start(&certs, io, &["--tls-handshake-timeout", "1"]);
        let mut t = TcpStream::connect(s.addr).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // The start of a ClientHello record, and then nothing.
        t.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 64];
        let n = t.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "{io}: expected the connection closed");
        assert!(started.elapsed() < Duration::from_secs(4), "{io}: closed after {:?}", started.elapsed());
        // A client that finishes its handshake in time is not affected.
        let mut ws = wss(&s, client_config(&[&certs.dir.join("ca.pem")], &[&rustls::version::TLS13]), "late");
        std::thread::sleep(Duration::from_millis(1500));
        subscribed(&s, &mut ws, "still_here");
        drop(ws);
        assert_eq!(tls_metric(&certs, &s, "comet_tls_handshake_failures_total"), 1, "{io}");
    }
}

/// Starts comet expecting it to refuse; returns its stderr.
fn refused(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_comet"))
        .args(["--frontend", "127.0.0.1:0", "--backend", "127.0.0.1:0", "--api", "off", "--ephemeral"])
        .args(args)
        .env_remove("COMET_IO")
        .output()
        .unwrap();
    assert!(!out.status.success(), "comet started with {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_unusable_certificate_at_start_is_refused_naming_the_file() {
    let expired = Certs::new("expired", "ec", -1);
    let good = Certs::new("good", "ec", 2);
    let (cert, key) = (expired.path("chain.pem"), expired.path("key.pem"));
    let err = refused(&["--tls-cert", &cert, "--tls-key", &key]);
    assert!(err.contains("expired on") && err.contains(&cert), "{err}");
    // The key of another certificate.
    let other_key = good.path("key.pem");
    let err = refused(&["--tls-cert", &cert, "--tls-key", &other_key]);
    assert!(err.contains(&cert), "{err}");
    let good_cert = good.path("chain.pem");
    let err = refused(&["--tls-cert", &good_cert, "--tls-key", &key]);
    assert!(err.contains("does not match") && err.contains(&key) && err.contains(&good_cert), "{err}");
    let missing = good.path("missing.pem");
    let err = refused(&["--tls-cert", &missing, "--tls-key", &other_key]);
    assert!(err.contains(&missing) && err.contains("No such file"), "{err}");
    let err = refused(&["--tls-cert", &good_cert]);
    assert!(err.contains("--tls-cert and --tls-key go together"), "{err}");
}

#[test]
fn sighup_serves_a_new_certificate_and_keeps_open_connections() {
    for io in BACKENDS {
        let first = Certs::new(&format!("hup-a-{io}"), "ec", 2);
        let second = Certs::new(&format!("hup-b-{io}"), "rsa", 2);
        // comet reads the files at the paths it was given: the test swaps
        // their contents.
        let live = Certs::new(&format!("hup-live-{io}"), "ec", 2);
        for f in ["chain.pem", "key.pem"] {
            std::fs::copy(first.dir.join(f), live.dir.join(f)).unwrap();
        }
        let s = start(&live, io, &[]);
        let cas = [first.dir.join("ca.pem"), second.dir.join("ca.pem")];
        let cfg = client_config(&[&cas[0], &cas[1]], &[&rustls::version::TLS13]);
        let mut old = wss(&s, cfg.clone(), "old");
        subscribed(&s, &mut old, "hup_chan");
        assert_eq!(old.get_ref().conn.peer_certificates().unwrap()[0], first.leaf());

        let hup = || {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(s.child.id() as i32, libc::SIGHUP) };
        };
        // A broken file: logged, the old certificate stays.
        std::fs::write(live.dir.join("chain.pem"), "not a certificate").unwrap();
        hup();
        let mut log = Vec::new();
        assert!(eventually(5, || {
            log.extend(s.drain_log());
            log.iter().any(|l| l.contains("keeping the previous certificate"))
        }));
        let fresh = wss(&s, cfg.clone(), "mid");
        assert_eq!(fresh.get_ref().conn.peer_certificates().unwrap()[0], first.leaf(), "{io}");

        for f in ["chain.pem", "key.pem"] {
            std::fs::copy(second.dir.join(f), live.dir.join(f)).unwrap();
        }
        hup();
        assert!(
            eventually(5, || {
                log.extend(s.drain_log());
                log.iter().any(|l| l.contains("SIGHUP: reloaded"))
            }),
            "{log:?}"
        );
        let new = wss(&s, cfg.clone(), "new");
        assert_eq!(new.get_ref().conn.peer_certificates().unwrap()[0], second.leaf(), "{io}");
        // The connection made before the reload still gets pushes.
        publish(&s, "hup_chan", "after_reload");
        assert!(text(&mut old).contains("after_reload"), "{io}");
    }
}

/// Python `websockets` (the asyncio client) over wss, with
/// permessage-deflate negotiated and a compressed push received.
#[test]
fn python_websockets_connects_over_wss_with_compression() {
    let probe = Command::new("python3").args(["-c", "import websockets"]).output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "python3 with websockets is needed: tests/run installs it into target/pyenv"
    );
    for io in BACKENDS {
        let certs = Certs::new(&format!("py-{io}"), "ec", 2);
        let s = start(&certs, io, &[]);
        let script = r#"
import asyncio, os, ssl, sys, websockets
async def main():
    ctx = ssl.create_default_context(cafile=os.environ["CA"])
    url = "wss://localhost:%s/ws/sesion=&myid=&devid=0&v=4.08&uuid=py&api=js" % os.environ["PORT"]
    async with websockets.connect(url, ssl=ctx, compression="deflate") as ws:
        ext = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        print("EXT", ext)
        print("INFO", await ws.recv())
        await ws.send("subscription\npy_chan")
        print("READY", flush=True)
        print("GOT", await asyncio.wait_for(ws.recv(), 10))
asyncio.run(main())
"#;
        let mut child = Command::new("python3")
            .args(["-c", script])
            .env("CA", certs.path("ca.pem"))
            .env("PORT", s.addr.port().to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut seen = String::new();
        while !seen.contains("READY") {
            let mut line = String::new();
            assert!(std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0, "{io}: python ended: {seen}");
            seen.push_str(&line);
        }
        std::thread::sleep(Duration::from_millis(300));
        let body = "compressible ".repeat(200);
        publish(&s, "py_chan", &body);
        let _ = out.read_to_string(&mut seen);
        assert!(child.wait().unwrap().success(), "{io}: {seen}");
        assert!(seen.contains("EXT permessage-deflate"), "{io}: {seen}");
        assert!(seen.contains("serverInfo") && seen.contains(&body), "{io}: {seen}");
    }
}

/// The mysql command-line client over TLS (`--ssl-ca`, the server's
/// certificate verified), PyMySQL with `ssl`, and plaintext logins: fine
/// by default, ERR 3159 with `--backend-require-tls`.
#[test]
fn mysql_clients_log_in_over_tls_on_the_backend_port() {
    for io in BACKENDS {
        let certs = Certs::new(&format!("sql-{io}"), "ec", 2);
        let s = start(&certs, io, &[]);
        let port = s.backend.port().to_string();
        let ca = certs.path("ca.pem");
        let out = Command::new("mysql")
            .args(["-h", "127.0.0.1", "-P", &port, "-u", "root", "-ppw", "--ssl-ca", &ca, "--ssl-verify-server-cert"])
            .args(["-e", "status; INSERT INTO pipes_messages (name, event, message) VALUES ('tls_sql', 'e', 'm')"])
            .output()
            .expect("mysql CLI (tests/run installs mariadb-client)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{io}: {text} {}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("Cipher in use is TLS"), "{io}: {text}");
        // Plaintext still logs in when TLS is not required.
        let out = Command::new("mysql")
            .args(["-h", "127.0.0.1", "-P", &port, "-u", "root", "-ppw", "--skip-ssl", "-e", "SHOW TABLES"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{io}: {}", String::from_utf8_lossy(&out.stderr));
        let script = r#"
import os, ssl, pymysql
ctx = ssl.create_default_context(cafile=os.environ["CA"])
c = pymysql.connect(host="127.0.0.1", port=int(os.environ["PORT"]), user="7", password="pw", database="CometQL_v1", ssl=ctx)
cur = c.cursor()
cur.execute("INSERT INTO pipes_messages (name, event, message) VALUES ('py_tls', 'e', %s)", ("hello",))
print("AFFECTED", cur.rowcount, "CIPHER", c._sock.cipher()[0])  # 0: no subscriber got it
"#;
        let out = Command::new("python3")
            .args(["-c", script])
            .env("CA", &ca)
            .env("PORT", &port)
            .output()
            .expect("python3 with PyMySQL");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("AFFECTED 0 CIPHER TLS_"), "{io}: {text} {}", String::from_utf8_lossy(&out.stderr));
    }
    let certs = Certs::new("sql-require", "ec", 2);
    let s = start(&certs, "epoll", &["--backend-require-tls"]);
    let port = s.backend.port().to_string();
    let out = Command::new("mysql")
        .args(["-h", "127.0.0.1", "-P", &port, "-u", "root", "-ppw", "--skip-ssl", "-e", "SHOW TABLES"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("3159") && err.contains("insecure transport"), "{err}");
    let out = Command::new("mysql")
        .args([
            "-h",
            "127.0.0.1",
            "-P",
            &port,
            "-u",
            "root",
            "-ppw",
            "--ssl-ca",
            &certs.path("ca.pem"),
            "-e",
            "SHOW TABLES",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// SIGHUP without a certificate is logged and harmless: it no longer ends
/// the process (the signal's default action).
#[test]
fn sighup_without_tls_keeps_serving() {
    let s = Server::start(&["--io", "epoll"]);
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(s.child.id() as i32, libc::SIGHUP) };
    let mut log = Vec::new();
    assert!(
        eventually(5, || {
            log.extend(s.drain_log());
            log.iter().any(|l| l.contains("nothing to reload"))
        }),
        "{log:?}"
    );
    let (status, body) = s.http_get("/info");
    assert!(status.contains("200"), "{status}: {body}");
}
