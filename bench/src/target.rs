//! The servers a scenario runs against: comet itself, nginx + nchan, and a
//! Node.js `ws` server. Each adapter knows how to start its server on free
//! loopback ports, open a subscriber and publish; the scenarios are written
//! once against this interface, so every target sees identical load.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::wire;

/// A throwaway CA and a localhost certificate (ECDSA P-256) in `d`, made
/// with the openssl command line; returns a client configuration that
/// trusts the CA.
pub(crate) fn make_certs(d: &std::path::Path) -> std::io::Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    std::fs::create_dir_all(d)?;
    let ec = "ec -pkeyopt ec_paramgen_curve:P-256";
    for cmd in [
        format!("openssl req -x509 -newkey {ec} -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=comet-bench-ca"),
        format!("openssl req -newkey {ec} -nodes -keyout key.pem -out srv.csr -subj /CN=localhost"),
        "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > ext".into(),
        "openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext -out srv.pem"
            .into(),
        "cat srv.pem ca.pem > chain.pem".into(),
    ] {
        let out = Command::new("sh").arg("-c").arg(&cmd).current_dir(d).output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!("{cmd}: {}", String::from_utf8_lossy(&out.stderr))));
        }
    }
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls::pki_types::CertificateDer::from_pem_file(d.join("ca.pem")).map_err(std::io::Error::other)?;
    roots.add(ca).map_err(std::io::Error::other)?;
    let cfg =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(std::sync::Arc::new(cfg))
}

/// A subscriber a reader drains: its socket, and for wss the client's TLS
/// state (which may already hold received plaintext).
pub struct Sub {
    pub sock: TcpStream,
    pub tls: Option<Box<rustls::ClientConnection>>,
}

impl From<TcpStream> for Sub {
    fn from(sock: TcpStream) -> Sub {
        Sub { sock, tls: None }
    }
}

/// How a comet subscriber names its channel: in the upgrade URL (the
/// shape of the peers, which take it from the path), or in a
/// `subscription` message after `serverInfo` (CppComet's clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Url,
    Message,
}

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Comet,
    Nchan,
    Node,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Comet => "comet",
            Kind::Nchan => "nchan",
            Kind::Node => "node-ws",
        }
    }
}

/// How to start targets.
#[derive(Debug, Clone)]
pub struct Spawn {
    pub comet_bin: PathBuf,
    /// comet shards and nginx workers (node is single-threaded).
    pub workers: usize,
    pub io: String,
    pub password: String,
    /// The repository's bench/ folder (for the peers' files).
    pub bench_dir: PathBuf,
    /// More flags for a spawned comet (`--server-arg`), after the bench's own.
    pub extra_args: Vec<String>,
    /// Where a spawned server's stdout and stderr go (default: discarded).
    pub log: Option<PathBuf>,
    /// A load test from a few loopback addresses: lift comet's per-address
    /// connection limit (through the environment, which older builds
    /// ignore, so old and new binaries run the same command). Attack
    /// scenarios leave comet's defaults alone.
    pub lift_per_ip_limit: bool,
    /// Run the server on this CPU only (`--layout pinned`), through taskset.
    pub pin_cpu: Option<usize>,
    /// `--wss`: comet and nchan serve TLS with a throwaway certificate.
    pub tls: bool,
}

/// A running (or attached) server.
pub struct Target {
    pub kind: Kind,
    pub front: SocketAddr,
    /// comet's CometQL address.
    pub back: Option<SocketAddr>,
    /// comet's HTTP API address.
    pub api: Option<SocketAddr>,
    pub password: String,
    pub pid: Option<u32>,
    /// comet spawned with `--server-arg=--tls-cert=auto`: subscribers
    /// speak wss, trusting the throwaway CA made for the run.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    child: Option<Child>,
    _dir: Option<PathBuf>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

fn wait_port(addr: SocketAddr, child: &mut Child, what: &str) -> std::io::Result<()> {
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(std::io::Error::other(format!("{what} exited at start: {st}")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(std::io::Error::other(format!("{what} did not listen on {addr}")))
}

impl Target {
    /// Uses a server that is already running.
    pub fn attach(kind: Kind, front: SocketAddr, back: Option<SocketAddr>, password: &str, pid: Option<u32>) -> Target {
        Target { kind, front, back, api: None, password: password.to_string(), pid, tls: None, child: None, _dir: None }
    }

    /// Starts a server of `kind` on free loopback ports.
    pub fn spawn(kind: Kind, s: &Spawn) -> std::io::Result<Target> {
        Target::spawn_at(kind, s, None)
    }

    /// Starts comet again on the ports of `old` (a restart), or a server of
    /// `kind` on free ports.
    pub fn spawn_at(
        kind: Kind,
        s: &Spawn,
        old: Option<(SocketAddr, Option<SocketAddr>, Option<SocketAddr>)>,
    ) -> std::io::Result<Target> {
        let port_or_free =
            |a: Option<SocketAddr>| a.unwrap_or_else(|| format!("127.0.0.1:{}", free_port()).parse().expect("address"));
        let front: SocketAddr = port_or_free(old.map(|o| o.0));
        let mut back = None;
        let mut api = None;
        let mut dir = None;
        let mut tls = None;
        let mut cmd = match kind {
            Kind::Comet => {
                let b = port_or_free(old.and_then(|o| o.1));
                back = Some(b);
                let mut c = Command::new(&s.comet_bin);
                c.args(["--frontend", &front.to_string(), "--backend", &b.to_string()]).args([
                    "--shards",
                    &s.workers.to_string(),
                    "--io",
                    &s.io,
                    "--password",
                    &s.password,
                ]);
                // Builds older than the HTTP API (A/B runs against a base
                // commit) have no --api and no default port 8088 to clash on.
                let help = comet_help(&s.comet_bin);
                if help.contains("--api") {
                    let a = port_or_free(old.and_then(|o| o.2));
                    api = Some(a);
                    c.args(["--api", &a.to_string()]);
                }
                let auto = s.tls.then(|| "--tls-cert=auto".to_string());
                for a in s.extra_args.iter().chain(&auto) {
                    if a == "--tls-cert=auto" {
                        let d = std::env::temp_dir().join(format!(
                            "comet-bench-tls-{}-{}",
                            std::process::id(),
                            front.port()
                        ));
                        tls = Some(make_certs(&d)?);
                        c.arg(format!("--tls-cert={}", d.join("chain.pem").display()));
                        c.arg(format!("--tls-key={}", d.join("key.pem").display()));
                        dir = Some(d);
                    } else {
                        c.arg(a);
                    }
                }
                // A bench measures the memory path unless it asks for a data
                // dir (builds older than the store have no --ephemeral).
                if help.contains("--ephemeral")
                    && !s.extra_args.iter().any(|a| a.starts_with("--data-dir") || a == "--ephemeral")
                {
                    c.arg("--ephemeral");
                }
                if s.lift_per_ip_limit {
                    c.env("COMET_MAX_CONNECTIONS_PER_IP", "10000000");
                }
                c
            }
            Kind::Nchan => {
                let d = std::env::temp_dir().join(format!("comet-bench-nchan-{}-{}", std::process::id(), front.port()));
                std::fs::create_dir_all(&d)?;
                let template = std::fs::read_to_string(s.bench_dir.join("peers/nchan/nginx.conf.template"))?;
                let mut template = template;
                if s.tls {
                    tls = Some(make_certs(&d)?);
                    let ssl = format!(
                        "reuseport ssl;\n        ssl_certificate {0}/chain.pem;\n        ssl_certificate_key {0}/key.pem;",
                        d.display()
                    );
                    template = template.replace("reuseport;", &ssl);
                    // The publisher stays plaintext (as comet's CometQL
                    // port does in the comparison): a second listener.
                    let p = port_or_free(old.and_then(|o| o.2));
                    api = Some(p);
                    template = template.replace(
                        "        location ~ ^/sub/",
                        &format!("        listen 127.0.0.1:{} reuseport;\n\n        location ~ ^/sub/", p.port()),
                    );
                }
                let conf = template
                    .replace("@PORT@", &front.port().to_string())
                    .replace("@PREFIX@", &d.to_string_lossy())
                    .replace("@WORKERS@", &s.workers.to_string());
                let conf_path = d.join("nginx.conf");
                std::fs::write(&conf_path, conf)?;
                let mut c = Command::new("nginx");
                c.args(["-p", &d.to_string_lossy(), "-c", &conf_path.to_string_lossy()]);
                dir = Some(d);
                c
            }
            Kind::Node => {
                if s.tls {
                    return Err(std::io::Error::other("the node-ws peer has no TLS (--wss)"));
                }
                let mut c = Command::new("node");
                c.arg(s.bench_dir.join("peers/node-ws/server.js")).env("PORT", front.port().to_string());
                c
            }
        };
        let (out, err) = match &s.log {
            Some(p) => {
                let f = std::fs::File::create(p)?;
                (Stdio::from(f.try_clone()?), Stdio::from(f))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        if let Some(cpu) = s.pin_cpu {
            cmd = crate::proc::on_cpu(&cmd, cpu);
        }
        let mut child = cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn()?;
        for addr in std::iter::once(front).chain(back).chain(api) {
            wait_port(addr, &mut child, kind.name())?;
        }
        let password = if kind == Kind::Comet { s.password.clone() } else { String::new() };
        Ok(Target { kind, front, back, api, password, pid: Some(child.id()), tls, child: Some(child), _dir: dir })
    }

    /// Opens a WebSocket subscribed to `channel` (waits for comet's
    /// serverInfo). For wss the client keeps only the socket: an idle
    /// subscriber never reads, and the server's state is what is measured.
    pub fn subscribe(&self, source: u8, channel: &str, uuid: &str) -> std::io::Result<TcpStream> {
        self.subscribe_reader(source, channel, uuid).map(|s| s.sock)
    }

    /// What a subscriber of `channel` sends: the upgrade path, and for
    /// comet subscribing by message the `subscription` command that follows
    /// `serverInfo`. The peers take the channel from the path, as comet
    /// does with [`Via::Url`].
    pub fn subscriber_request(&self, channel: &str, uuid: &str, via: Via) -> (String, Option<String>) {
        let anon = format!("/ws/sesion=&myid=&devid=0&v=4.08&uuid={uuid}&api=js");
        match (self.kind, via) {
            (Kind::Comet, Via::Url) => (format!("{anon}&subscription={channel}"), None),
            (Kind::Comet, Via::Message) => (anon, Some(format!("subscription\n{channel}"))),
            (Kind::Nchan | Kind::Node, _) => (format!("/sub/{channel}"), None),
        }
    }

    /// [`Target::subscribe`] for a subscriber that will be read: wss keeps
    /// its TLS state.
    pub fn subscribe_reader(&self, source: u8, channel: &str, uuid: &str) -> std::io::Result<Sub> {
        self.subscribe_via(source, channel, uuid, Via::Message)
    }

    /// Opens a subscriber, subscribing as `via` says (comet only).
    pub fn subscribe_via(&self, source: u8, channel: &str, uuid: &str, via: Via) -> std::io::Result<Sub> {
        let (path, command) = self.subscriber_request(channel, uuid, via);
        let mut s = wire::connect_from(&self.front, source)?;
        if let Some(cfg) = &self.tls {
            // wss: the handshakes and the subscription over TLS.
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let conn = rustls::ClientConnection::new(cfg.clone(), name).map_err(std::io::Error::other)?;
            let mut t = rustls::StreamOwned::new(conn, s);
            while t.conn.is_handshaking() {
                t.conn.complete_io(&mut t.sock)?;
            }
            wire::ws_handshake(&mut t, &path)?;
            if self.kind == Kind::Comet {
                wire::read_frame(&mut t)?;
            }
            if let Some(c) = command {
                wire::send_text(&mut t, &c)?;
            }
            std::io::Write::flush(&mut t)?;
            return Ok(Sub { sock: t.sock, tls: Some(Box::new(t.conn)) });
        }
        wire::ws_handshake(&mut s, &path)?;
        if self.kind == Kind::Comet {
            // serverInfo: with the channel in the URL, comet has subscribed
            // the connection by the time it is sent.
            wire::read_frame(&mut s)?;
        }
        if let Some(c) = command {
            wire::send_text(&mut s, &c)?;
        }
        Ok(s.into())
    }

    /// A publishing connection.
    pub fn publisher(&self) -> std::io::Result<Publisher> {
        match self.kind {
            Kind::Comet => {
                let back = self.back.ok_or_else(|| std::io::Error::other("comet target without a backend address"))?;
                Ok(Publisher::Sql(wire::mysql_login(&back, &self.password)?))
            }
            Kind::Nchan | Kind::Node => {
                // nchan with TLS publishes on its plaintext listener.
                let s = TcpStream::connect(self.api.unwrap_or(self.front))?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(15)))?;
                Ok(Publisher::Http(s))
            }
        }
    }

    /// CPU seconds and RSS KiB of the server (and its children).
    pub fn cpu(&self) -> Option<f64> {
        self.pid.map(crate::proc::cpu_secs)
    }

    /// CPU seconds of the server from the scheduler's nanosecond clock
    /// (`proc::run_secs`), falling back to [`Target::cpu`].
    pub fn cpu_precise(&self) -> Option<f64> {
        self.pid.and_then(|p| crate::proc::run_secs(p).or_else(|| Some(crate::proc::cpu_secs(p))))
    }

    pub fn rss_kib(&self) -> Option<u64> {
        self.pid.map(crate::proc::rss_kib)
    }

    /// Peak resident memory of the server process (VmHWM), KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.pid.and_then(crate::proc::peak_rss_kib)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            // SIGTERM first: nginx's master takes its workers down with it.
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let end = Instant::now() + Duration::from_secs(3);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A connection that publishes to channels.
pub enum Publisher {
    /// comet: CometQL `INSERT INTO pipes_messages`.
    Sql(TcpStream),
    /// nchan and node: `POST /pub/CHANNEL`.
    Http(TcpStream),
}

impl Publisher {
    /// Publishes `text` on `channel`; returns subscribers written when the
    /// server says (comet: affected rows; node: the body), else 0.
    pub fn publish(&mut self, channel: &str, text: &str) -> std::io::Result<u64> {
        match self {
            Publisher::Sql(s) => wire::mysql_exec(
                s,
                &format!("INSERT INTO pipes_messages (name, event, message) VALUES ('{channel}', 'bench', '{text}')"),
            ),
            Publisher::Http(s) => {
                let body = wire::http_post(s, &format!("/pub/{channel}"), text)?;
                // node answers the count; nchan answers a status block with
                // "active subscribers: N".
                Ok(body
                    .trim()
                    .parse()
                    .ok()
                    .or_else(|| {
                        body.lines()
                            .find_map(|l| l.trim().strip_prefix("active subscribers:"))
                            .and_then(|v| v.trim().parse().ok())
                    })
                    .unwrap_or(0))
            }
        }
    }
}

/// What `comet --help` prints, to tell which flags this build has.
fn comet_help(bin: &std::path::Path) -> String {
    Command::new(bin)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}
