//! Listening sockets: one per shard per port, all bound with SO_REUSEPORT so
//! the kernel spreads new connections across shards, and the port claim that
//! keeps every other process out of that port group.
//!
//! # Why a claim
//!
//! SO_REUSEPORT does not know about processes: Linux lets any socket of the
//! same user join a reuseport group. A second comet started on the same port
//! therefore used to start without a word and receive half of the new
//! connections, while publishes reached only the subscribers of the process
//! that took them. [`PortClaim`] makes that second start fail instead, in two
//! steps taken before the reuseport binds:
//!
//! 1. **Probe.** Bind a plain socket (SO_REUSEADDR, no SO_REUSEPORT) on the
//!    address. Linux refuses it with EADDRINUSE whenever any socket, of any
//!    program and any user, listens on an overlapping address: the same one,
//!    `0.0.0.0` or `[::]` against a specific one, and the other way round.
//!    SO_REUSEADDR is what lets a restarted comet bind over the TIME_WAIT
//!    connections of the one it replaces, and it never allows a bind over a
//!    listening socket. The probe never listens, so it does not get in the way
//!    of this process's own reuseport binds (a socket that only *binds* with
//!    SO_REUSEADDR coexists with them; a listening one would not).
//! 2. **Start-up lock.** Two comets starting at the same instant could both
//!    probe before either listens. Each therefore takes the abstract Unix
//!    socket `@comet-port-<port>` around "probe, bind every shard, listen".
//!    The kernel releases it when the socket closes or the process dies, so a
//!    crash never leaves a stale lock, and it lives in the network namespace
//!    like the port it guards. The name holds the port and not the address so
//!    that `0.0.0.0:8087` and `127.0.0.1:8087` serialize too. It is held only
//!    during start-up: once the listeners exist the probe alone excludes
//!    everyone, and two comets on `127.0.0.1:8087` and `127.0.0.2:8087`, which
//!    do not overlap, can both run.
//!
//! Shards of one process are not affected: they bind the claimed address
//! with SO_REUSEPORT as before and share the port.

use std::io;
use std::net::SocketAddr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// Accept backlog asked of the kernel (capped by net.core.somaxconn).
const BACKLOG: i32 = 4096;

/// How long to wait for another process's start-up lock on the same port.
/// Holders keep it for the milliseconds a start-up bind takes, so running out
/// means that process is stuck (or is squatting the name); the total stays
/// well under the five seconds a second comet may take to fail.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Pause between two attempts at a busy start-up lock.
const LOCK_RETRY: Duration = Duration::from_millis(5);

/// Why a port could not be claimed or listened on.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Something already listens on an address overlapping this one.
    #[error("another comet (or another program) is already listening on {0}")]
    Taken(SocketAddr),
    /// Another process kept the start-up lock of this port past `LOCK_WAIT` (2 s).
    #[error(
        "another process has held the start-up lock of port {port} (abstract Unix socket @{}) for over {} s",
        lock_name(*port),
        LOCK_WAIT.as_secs()
    )]
    LockBusy { port: u16 },
    /// Any other failure to bind or listen (permissions, a bad address).
    #[error("cannot listen on {addr}: {err}")]
    Io { addr: SocketAddr, err: io::Error },
}

/// This process's claim on one TCP address: taken before the shard
/// listeners are bound, consumed by [`PortClaim::listen`] once they are. See
/// the module docs for why it is a probe plus a start-up lock.
#[derive(Debug)]
pub struct PortClaim {
    /// The address to bind, with port 0 already resolved to a real port.
    addr: SocketAddr,
    /// A bound, never-listening probe socket, kept until the listeners exist
    /// so that no other port-0 bind is handed the same port meanwhile.
    _probe: Socket,
    /// The start-up lock; `None` only when it could not be created at all.
    _lock: Option<UnixDatagram>,
    /// Why the lock could not be created, for a start-up warning.
    lock_error: Option<io::Error>,
}

impl PortClaim {
    /// Claims `addr`. Port 0 is resolved here, by the probe, so that the
    /// lock is taken on the port that will really be used.
    pub fn take(addr: SocketAddr) -> Result<PortClaim, ListenError> {
        let mut addr = addr;
        let mut resolved = None;
        if addr.port() == 0 {
            let probe = bind_probe(addr)?;
            addr = probe
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or_else(|| ListenError::Io { addr, err: io::Error::other("no local address") })?;
            resolved = Some(probe);
        }
        let (lock, lock_error) = match lock_port(addr.port()) {
            Ok(lock) => (Some(lock), None),
            Err(LockFailure::Busy) => return Err(ListenError::LockBusy { port: addr.port() }),
            Err(LockFailure::Unavailable(err)) => (None, Some(err)),
        };
        // Probe under the lock even when port 0 was resolved above: another
        // comet may have asked for that very port between the two steps.
        let probe = bind_probe(addr)?;
        Ok(PortClaim { addr, _probe: resolved.unwrap_or(probe), _lock: lock, lock_error })
    }

    /// The claimed address (port 0 resolved).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Why the start-up lock could not be created (the probe still
    /// protects the port; only two comets starting at the same instant would
    /// go unnoticed).
    pub fn lock_error(&self) -> Option<&io::Error> {
        self.lock_error.as_ref()
    }

    /// Binds and listens `n` SO_REUSEPORT sockets on the claimed address,
    /// one per shard, then releases the claim.
    pub fn listen(self, n: usize) -> Result<Vec<Socket>, ListenError> {
        let addr = self.addr;
        (0..n)
            .map(|_| {
                bind_reuseport(addr).map_err(|err| match err.raw_os_error() {
                    Some(libc::EADDRINUSE) => ListenError::Taken(addr),
                    _ => ListenError::Io { addr, err },
                })
            })
            .collect()
    }
}

/// Binds a non-blocking listener on `addr` with SO_REUSEPORT.
///
/// TCP_NODELAY is set here, once: Linux copies it to every accepted socket,
/// which saves a `setsockopt` per connection.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_tcp_nodelay(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(false)?;
    }
    sock.bind(&addr.into())?;
    sock.listen(BACKLOG)?;
    Ok(sock)
}

/// Accepts one connection, already non-blocking and close-on-exec: one
/// `accept4` where `accept` and `set_nonblocking` took three syscalls.
pub fn accept_nonblocking(listener: &Socket) -> io::Result<(Socket, socket2::SockAddr)> {
    listener.accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
}

/// Seconds a connection may stay silent before the kernel hands it to
/// `accept` anyway, on the ports where the client speaks first.
pub const DEFER_ACCEPT_SECS: libc::c_int = 5;

/// Sets TCP_DEFER_ACCEPT: the kernel wakes `accept` only once the client's
/// first bytes (an HTTP request head) have arrived, so the accepted socket
/// can be read at once instead of waiting for readiness first. Only for
/// ports where the client speaks first (not MySQL, whose server greets).
pub fn defer_accept(listener: &Socket, secs: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket descriptor, and a c_int option value whose
    // size is the length passed; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Binds the probe: SO_REUSEADDR (to pass TIME_WAIT leftovers), no
/// SO_REUSEPORT (so any listener on an overlapping address refuses it), and
/// dual-stack like the listeners so that a `[::]` probe covers IPv4 too.
fn bind_probe(addr: SocketAddr) -> Result<Socket, ListenError> {
    let io_err = |err| ListenError::Io { addr, err };
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP)).map_err(io_err)?;
    sock.set_reuse_address(true).map_err(io_err)?;
    if addr.is_ipv6() {
        sock.set_only_v6(false).map_err(io_err)?;
    }
    sock.bind(&addr.into()).map_err(|err| match err.raw_os_error() {
        Some(libc::EADDRINUSE) => ListenError::Taken(addr),
        _ => ListenError::Io { addr, err },
    })?;
    Ok(sock)
}

/// The abstract socket name of a port's start-up lock.
fn lock_name(port: u16) -> String {
    format!("comet-port-{port}")
}

/// Why the start-up lock was not taken.
enum LockFailure {
    /// Another process held it for all of [`LOCK_WAIT`].
    Busy,
    /// The socket could not be created or bound for another reason (a
    /// sandbox without AF_UNIX, say).
    Unavailable(io::Error),
}

/// Takes the start-up lock of `port`, waiting up to [`LOCK_WAIT`] while
/// another process holds it.
fn lock_port(port: u16) -> Result<UnixDatagram, LockFailure> {
    let name = std::os::unix::net::SocketAddr::from_abstract_name(lock_name(port)).map_err(LockFailure::Unavailable)?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match UnixDatagram::bind_addr(&name) {
            Ok(lock) => return Ok(lock),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
                if Instant::now() >= deadline {
                    return Err(LockFailure::Busy);
                }
                std::thread::sleep(LOCK_RETRY);
            }
            Err(e) => return Err(LockFailure::Unavailable(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback_any_port() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[test]
    fn shards_of_one_process_share_the_claimed_port() {
        let claim = PortClaim::take(loopback_any_port()).unwrap();
        let addr = claim.addr();
        assert_ne!(addr.port(), 0);
        let socks = claim.listen(3).unwrap();
        for s in &socks {
            assert_eq!(s.local_addr().unwrap().as_socket(), Some(addr));
        }
    }

    #[test]
    fn a_claim_on_a_listening_port_is_refused_whatever_the_overlap() {
        let socks = PortClaim::take(loopback_any_port()).unwrap().listen(1).unwrap();
        let addr = socks[0].local_addr().unwrap().as_socket().unwrap();
        let wildcard = SocketAddr::new("0.0.0.0".parse().unwrap(), addr.port());
        let dual = SocketAddr::new("::".parse().unwrap(), addr.port());
        for a in [addr, wildcard, dual] {
            match PortClaim::take(a) {
                Err(ListenError::Taken(t)) => assert_eq!(t, a),
                // A host without IPv6 cannot hold a `[::]` socket at all.
                Err(ListenError::Io { err, .. }) if a.is_ipv6() && err.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
                other => panic!("{a}: expected Taken, got {other:?}"),
            }
        }
    }

    /// The race the lock exists for: a claim taken while another claim on the
    /// same port is still binding waits for it, then sees its listeners.
    /// Without the lock the second probe would pass (the first claim is not
    /// listening yet) and both would end up in one reuseport group.
    #[test]
    fn a_concurrent_claim_waits_for_the_first_and_is_then_refused() {
        let first = PortClaim::take(loopback_any_port()).unwrap();
        let addr = first.addr();
        let second = std::thread::spawn(move || PortClaim::take(addr));
        std::thread::sleep(Duration::from_millis(200));
        assert!(!second.is_finished(), "the second claim did not wait for the first one's lock");
        let _listeners = first.listen(2).unwrap();
        match second.join().unwrap() {
            Err(ListenError::Taken(t)) => assert_eq!(t, addr),
            other => panic!("expected Taken({addr}), got {other:?}"),
        }
    }

    /// The per-connection `setsockopt` and `fcntl`s were dropped on the
    /// strength of these two: an accepted socket inherits TCP_NODELAY from
    /// the listener, and `accept_nonblocking` returns it non-blocking.
    #[test]
    fn an_accepted_socket_is_nodelay_and_nonblocking_without_a_syscall_of_its_own() {
        let socks = PortClaim::take(loopback_any_port()).unwrap().listen(1).unwrap();
        let addr = socks[0].local_addr().unwrap().as_socket().unwrap();
        defer_accept(&socks[0], DEFER_ACCEPT_SECS).unwrap();
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        // Deferred: nothing to accept until the client has spoken.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(accept_nonblocking(&socks[0]).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        std::io::Write::write_all(&mut client, b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let started = Instant::now();
        let (sock, peer) = loop {
            match accept_nonblocking(&socks[0]) {
                Ok(a) => break a,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && started.elapsed() < Duration::from_secs(5) => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        assert_eq!(peer.as_socket(), Some(client.local_addr().unwrap()));
        assert!(sock.tcp_nodelay().unwrap());
        assert!(sock.nonblocking().unwrap());
        // The head is there to read at once.
        let mut buf = [0u8; 64];
        let n = std::io::Read::read(&mut &sock, &mut buf).unwrap();
        assert!(n > 0);
    }

    #[test]
    fn a_lock_held_too_long_is_reported_with_its_port() {
        let first = PortClaim::take(loopback_any_port()).unwrap();
        let port = first.addr().port();
        let started = Instant::now();
        let err = PortClaim::take(first.addr()).unwrap_err();
        assert!(started.elapsed() >= LOCK_WAIT);
        assert!(matches!(err, ListenError::LockBusy { port: p } if p == port), "{err:?}");
        assert!(err.to_string().contains(&format!("port {port}")), "{err}");
    }
}
