//! Listening sockets: one per shard per port, all bound with SO_REUSEPORT so
//! the kernel spreads new connections across shards.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Accept backlog asked of the kernel (capped by net.core.somaxconn).
const BACKLOG: i32 = 4096;

/// Binds a non-blocking listener on `addr` with SO_REUSEPORT.
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(false)?;
    }
    sock.bind(&addr.into())?;
    sock.listen(BACKLOG)?;
    Ok(sock)
}
