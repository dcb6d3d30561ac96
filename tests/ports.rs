//! Who may listen on comet's ports: a second comet on a port a running one
//! holds (which SO_REUSEPORT would otherwise let join its port group and take
//! half of the new clients) and a port held by any other program must both
//! stop the start with an error naming the port, and leave the running comet
//! alone. A restart over the TIME_WAIT connections of the previous process
//! must still work.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{BACKENDS, Client, Server, eventually};
use mysql::prelude::Queryable;

/// How long a refused comet may take to exit.
const EXIT_WITHIN: Duration = Duration::from_secs(5);

fn start(io: &str) -> Server {
    Server::start(&["--io", io, "--shards", "2", "--password", "pw"])
}

/// Runs comet on the given addresses and expects it to exit by itself within
/// [`EXIT_WITHIN`]; returns its status and everything it wrote to stderr.
fn run_refused(frontend: SocketAddr, backend: SocketAddr) -> (ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_comet"))
        .args(["--frontend", &frontend.to_string(), "--backend", &backend.to_string()])
        .args(["--shards", "2", "--password", "pw", "--node-name", "test-node", "--api", "127.0.0.1:0", "--ephemeral"])
        .env_remove("COMET_IO")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start comet");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > EXIT_WITHIN {
            let _ = child.kill();
            let _ = child.wait();
            let mut log = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut log);
            panic!("comet on {frontend} / {backend} still running after {EXIT_WITHIN:?}; log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut log = String::new();
    child.stderr.take().unwrap().read_to_string(&mut log).expect("stderr");
    (status, log)
}

/// A loopback address whose port the kernel picks: for the side of a
/// refused comet that is not under test.
fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Asserts the running server still delivers a publish to every one of
/// `n` WebSocket subscribers: what the split port group broke.
fn assert_serves(s: &Server, n: usize, what: &str) {
    let mut subs: Vec<Client> = (0..n).map(|i| s.client(&format!("p{i}"))).collect();
    for c in &mut subs {
        c.subscribe(&["port_check"]);
    }
    let url = format!("mysql://root:pw@{}/CometQL_v1", s.backend);
    let mut db = mysql::Conn::new(mysql::Opts::from_url(&url).unwrap()).expect("mysql login");
    let all_in = eventually(5, || {
        let users: Option<String> = db.query_first("SELECT users FROM pipes WHERE name = 'port_check'").unwrap();
        users.as_deref() == Some(n.to_string().as_str())
    });
    assert!(all_in, "{what}: port_check never had {n} subscribers");
    db.query_drop("INSERT INTO pipes_messages VALUES ('port_check', 'e', 'still here')").unwrap();
    assert_eq!(db.affected_rows(), n as u64, "{what}");
    for c in &mut subs {
        assert_eq!(c.recv()["data"], "still here", "{what}");
    }
}

#[test]
fn second_comet_on_the_frontend_port_of_a_running_one_exits_naming_the_port() {
    for io in BACKENDS {
        let a = start(io);
        let started = Instant::now();
        let (status, log) = run_refused(a.addr, any_port());
        assert!(!status.success(), "{io}: {status}\n{log}");
        assert!(started.elapsed() < EXIT_WITHIN, "{io}");
        assert!(log.contains(&a.addr.to_string()), "{io}: the error does not name {}:\n{log}", a.addr);
        assert!(log.contains("--frontend"), "{io}: the error does not name the flag:\n{log}");
        assert_serves(&a, 8, io);
    }
}

#[test]
fn second_comet_on_the_backend_port_of_a_running_one_exits_naming_the_port() {
    for io in BACKENDS {
        let a = start(io);
        let (status, log) = run_refused(any_port(), a.backend);
        assert!(!status.success(), "{io}: {status}\n{log}");
        assert!(log.contains(&a.backend.to_string()), "{io}: the error does not name {}:\n{log}", a.backend);
        assert!(log.contains("--backend"), "{io}: the error does not name the flag:\n{log}");
        assert_serves(&a, 8, io);
    }
}

#[test]
fn a_port_held_by_another_program_is_refused_naming_the_port() {
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let held = other.local_addr().unwrap();
    for (frontend, backend, flag) in [(held, any_port(), "--frontend"), (any_port(), held, "--backend")] {
        let (status, log) = run_refused(frontend, backend);
        assert!(!status.success(), "{flag}: {status}\n{log}");
        assert!(log.contains(&format!("already listening on {held}")), "{flag}:\n{log}");
        assert!(log.contains(flag), "{flag}:\n{log}");
    }
    // The other program's socket still gets its connections.
    let _c = std::net::TcpStream::connect(held).unwrap();
    other.set_nonblocking(false).unwrap();
    other.accept().expect("the holder still accepts");
}

#[test]
fn frontend_and_backend_on_one_port_are_refused_naming_the_port() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let frontend: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let backend: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
    let (status, log) = run_refused(frontend, backend);
    assert!(!status.success(), "{status}\n{log}");
    assert!(log.contains(&format!("port {port}")), "{log}");
}

/// Connections on `port` in TIME_WAIT, from /proc/net/tcp{,6}.
fn time_wait_on(port: u16) -> usize {
    let local_port = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| t.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&local_port) && f[3] == "06"
        })
        .count()
}

#[test]
fn a_restarted_comet_takes_its_ports_back_over_time_wait_connections() {
    let a = start("epoll");
    let (frontend, backend) = (a.addr, a.backend);
    // The server closes a plain HTTP exchange first, so the TIME_WAIT entry is
    // on its side of the port: what a restart must bind over.
    for _ in 0..3 {
        let (status, _) = a.http_get("/");
        assert!(!status.is_empty());
    }
    assert!(time_wait_on(frontend.port()) > 0, "no TIME_WAIT connection on {frontend}; the test proves nothing");
    drop(a);
    let b = Server::start_at(frontend, backend, &["--io", "epoll", "--shards", "2", "--password", "pw"]);
    assert_eq!(b.addr, frontend);
    assert_serves(&b, 2, "restarted");
}

#[test]
fn host_names_are_resolved_for_the_listen_addresses() {
    let s = Server::start_named("localhost:0", "localhost:0", &["--password", "pw", "--shards", "1"]);
    assert!(s.addr.ip().is_loopback() && s.backend.ip().is_loopback(), "{} {}", s.addr, s.backend);
    let (status, body) = s.http_get("/info");
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    assert_serves(&s, 1, "localhost");
}

#[test]
fn an_address_without_a_port_is_refused_with_what_to_give() {
    let out = Command::new(env!("CARGO_BIN_EXE_comet"))
        .args(["--frontend", "localhost", "--password", "pw"])
        .output()
        .expect("run comet");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("'localhost'") && err.contains("IP:PORT"), "{err}");
}
