//! The I/O layer of a shard: the only part of the shard that touches
//! sockets, tasks and clocks. It owns the sockets (by [`ConnId`], beside the
//! core's connections) and drives the sans-IO [`ShardCore`] with what
//! happens to them, then carries out what the core asks: queued output is
//! written, [`Effect`]s are applied, paused readers are woken.
//!
//! Every socket is waited on for readiness (a one-shot poll: io_uring
//! `POLL_ADD` or epoll), then read and written with non-blocking syscalls
//! through the shard's shared scratch buffer. So an idle connection has no
//! read buffer pinned in the kernel or in user space, on either backend; the
//! price is one readiness event per burst of reads, which the batching of
//! writes (one vectored write per connection per handler) more than repays
//! at fan-out.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use compio::driver::SharedFd;
use compio::driver::op::{Interest, PollOnce};
use socket2::Socket;

use super::ConnId;
use super::conn::{Admission, Flow};
use super::core::{Effect, ShardCore};
use super::mail::{Handoff, Mail};
use crate::mailbox::Inbox;
use crate::metrics::ShardMetrics;
use crate::tls::TlsConn;

/// Reads per readiness event before yielding to other connections.
const READS_PER_WAKE: usize = 8;
/// The shard's read buffer: what one read takes at most.
const SCRATCH_LEN: usize = 64 * 1024;
/// Deliveries the mailbox task makes per turn (a connection makes
/// [`super::conn::WORK_PER_WAKE`]). Measured: 2x instead of 16x cost 50%
/// more server CPU per pipelined INSERT (`comet-bench publish --subs 1000
/// --conns 4 --inserts 5000 --window 32`: 327-358 against 213-226 µs), for
/// no latency gain measurable on this machine.
const MAIL_WORK_PER_TURN: usize = 16 * super::conn::WORK_PER_WAKE;

/// Which port a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// Browsers: WebSocket and plain HTTP.
    Frontend,
    /// Backends: CometQL over the MySQL protocol.
    Backend,
    /// Backends: the HTTP API.
    Api,
}

impl Port {
    fn name(self) -> &'static str {
        match self {
            Port::Frontend => "frontend",
            Port::Backend => "backend",
            Port::Api => "api",
        }
    }

    /// Whether the client speaks first (HTTP), so that the listener may
    /// defer accepting until it has, and a new socket is read at once.
    /// Not CometQL: a MySQL server sends the greeting.
    fn client_speaks_first(self) -> bool {
        self != Port::Backend
    }
}

/// One connection's socket, with the generation of the id it belongs to.
struct Sock {
    generation: u32,
    fd: SharedFd<Socket>,
    /// A writer task waits for the socket to become writable.
    writer_waiting: bool,
}

/// Result of trying to write a connection's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flush {
    Done,
    Blocked,
    Gone,
}

/// A shard as its thread sees it: the core, and the sockets and tasks
/// around it.
pub struct Shard {
    pub core: ShardCore,
    /// Sockets by connection slot (`ConnId::index`).
    socks: Vec<Option<Sock>>,
    /// Tasks of connections the core may not read now, woken when it says
    /// that may have changed.
    paused: Vec<Waker>,
    /// Read buffer shared by all connections of the shard.
    scratch: Vec<u8>,
    /// Listening sockets, shut down to stop accepting.
    listeners: Vec<Arc<Socket>>,
    /// Origin of the core's monotonic clock.
    started: Instant,
    /// The `--write-delay` deadline a timer task sleeps until, to write
    /// the held connections whose windows ended by then.
    delay_armed: Option<u64>,
    /// TLS state by connection slot, beside `socks`; grown only when a TLS
    /// connection comes, so a plaintext-only comet pays nothing.
    tls: Vec<Option<Box<TlsConn>>>,
    /// Plaintext decrypted from one read, or gathered for one record;
    /// shared by all TLS connections of the shard.
    plain: Vec<u8>,
    /// TLS handshakes under way, by deadline (the timeout is the same for
    /// all, so in order): checked by the once-a-second tick, which costs
    /// an idle connection no timer of its own.
    handshakes: std::collections::VecDeque<(u64, ConnId)>,
}

thread_local! {
    static SHARD: RefCell<Option<Shard>> = const { RefCell::new(None) };
}

/// Runs `f` on this thread's shard, then carries out what the core asked.
/// Never held across an `.await`.
pub fn with_shard<R>(f: impl FnOnce(&mut Shard) -> R) -> R {
    SHARD.with_borrow_mut(|s| {
        let s = s.as_mut().expect("with_shard called off a shard thread");
        let congested = s.core.outbox.is_congested();
        let store_congested = s.core.store_congested();
        let r = f(s);
        s.settle();
        if !congested && s.core.outbox.is_congested() {
            ShardMetrics::add(&s.core.metrics.mail_congestions, 1);
        }
        if !store_congested && s.core.store_congested() {
            ShardMetrics::add(&s.core.metrics.store_congestions, 1);
        }
        r
    })
}

/// Installs a shard on the current thread, with its listeners.
pub fn install(core: ShardCore, listeners: Vec<Arc<Socket>>) {
    let mut shard = Shard {
        core,
        socks: Vec::new(),
        paused: Vec::new(),
        scratch: vec![0; SCRATCH_LEN],
        listeners,
        started: Instant::now(),
        delay_armed: None,
        tls: Vec::new(),
        plain: Vec::new(),
        handshakes: Default::default(),
    };
    shard.clock();
    SHARD.with_borrow_mut(|s| *s = Some(shard));
}

/// Removes the shard (at thread exit).
pub fn uninstall() -> Option<Shard> {
    SHARD.with_borrow_mut(|s| s.take())
}

impl Shard {
    /// Gives the core the time: monotonic since start, and the wall clock.
    fn clock(&mut self) {
        let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.core.set_clock(self.started.elapsed().as_millis() as u64, unix as i64);
    }

    fn sock(&mut self, id: ConnId) -> Option<&mut Sock> {
        self.socks.get_mut(id.index as usize)?.as_mut().filter(|s| s.generation == id.generation)
    }

    fn insert(&mut self, id: ConnId, fd: SharedFd<Socket>, tls: Option<Box<TlsConn>>) {
        let i = id.index as usize;
        if self.socks.len() <= i {
            self.socks.resize_with(i + 1, || None);
        }
        self.socks[i] = Some(Sock { generation: id.generation, fd, writer_waiting: false });
        if tls.is_some() && self.tls.len() <= i {
            self.tls.resize_with(i + 1, || None);
        }
        if let Some(slot) = self.tls.get_mut(i) {
            *slot = tls;
        }
    }

    /// Removes connection `id`'s socket, with its TLS state.
    fn take_sock(&mut self, id: ConnId) -> Option<(Sock, Option<Box<TlsConn>>)> {
        self.sock(id)?;
        let i = id.index as usize;
        let tls = self.tls.get_mut(i).and_then(Option::take);
        Some((self.socks[i].take()?, tls))
    }

    /// Connection `id`'s TLS state, when it is a TLS connection.
    fn tls_of(&mut self, id: ConnId) -> Option<&mut TlsConn> {
        self.sock(id)?;
        self.tls.get_mut(id.index as usize)?.as_deref_mut()
    }

    /// Registers an accepted socket with the core; returns what its read
    /// task needs, or None when the core refused it outright (answered at
    /// most once, then closed).
    fn accept(&mut self, sock: Socket, peer: std::net::SocketAddr, port: Port) -> Option<(ConnId, SharedFd<Socket>)> {
        self.clock();
        // TCP_NODELAY comes from the listener (see `bind_reuseport`).
        let tls = match port {
            Port::Frontend => self.core.shared.tls.get(),
            Port::Backend | Port::Api => None,
        };
        let id = match port {
            Port::Frontend => match self.core.accept(peer) {
                Admission::Open(id) => id,
                Admission::AnswerAndClose(answer) => {
                    answer_and_close(&sock, &answer, &mut self.scratch);
                    return None;
                }
            },
            Port::Backend => self.core.accept_backend(peer),
            Port::Api => self.core.accept_api(peer),
        };
        let tls = match tls.map(TlsConn::new) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(e)) => {
                eprintln!("comet: shard {}: cannot start TLS for {peer}: {e}", self.core.id);
                self.core.hangup(id);
                return None;
            }
        };
        let handshaking = tls.is_some();
        let fd = SharedFd::new(sock);
        self.insert(id, fd.clone(), tls);
        if handshaking {
            self.arm_handshake_deadline(id);
        }
        Some((id, fd))
    }

    /// Carries out the core's effects and writes what it queued, until
    /// neither is left; wakes paused readers when the core says so.
    fn settle(&mut self) {
        // Completions the storage thread sent meanwhile: answered now,
        // with this round's writes, instead of at the mailbox task's turn.
        self.core.storage_progress();
        // Changes no answer waits for (a device leaving, a queue delivered,
        // a sweep, what the completions above resumed) go to the store now.
        self.core.record_changes();
        loop {
            if !self.core.effects.is_empty() {
                for e in std::mem::take(&mut self.core.effects) {
                    self.apply(e);
                }
                continue;
            }
            if self.core.dirty.is_empty() {
                break;
            }
            let mut dirty = std::mem::take(&mut self.core.dirty);
            for id in dirty.drain(..) {
                self.flush(id);
            }
            // Keep the list's capacity: the next fan-out to as many
            // subscribers then grows nothing.
            if self.core.dirty.is_empty() {
                self.core.dirty = dirty;
            }
        }
        if std::mem::take(&mut self.core.unpaused) {
            for w in self.paused.drain(..) {
                w.wake();
            }
        }
        // One timer at a time, for the earliest end of window of the held
        // connections (see `shard::delay`); a window that ends before the
        // one waited for gets a timer of its own.
        if let Some(at) = self.core.next_delay_deadline()
            && self.delay_armed.is_none_or(|armed| at < armed)
        {
            self.delay_armed = Some(at);
            let when = self.started + Duration::from_millis(at);
            compio::runtime::spawn(async move {
                compio::time::sleep_until(when).await;
                with_shard(|s| s.end_delay_windows(at));
            })
            .detach();
        }
    }

    /// The `--write-delay` deadline `at` has come: the held connections
    /// whose windows ended join the dirty list, which `settle` writes (each
    /// queue in one vectored write), then arms the next deadline.
    fn end_delay_windows(&mut self, at: u64) {
        if self.delay_armed == Some(at) {
            self.delay_armed = None;
        }
        self.clock();
        let now = self.core.now_ms.max(at);
        self.core.end_delay_windows(now);
    }

    fn apply(&mut self, e: Effect) {
        match e {
            Effect::Close(id) => {
                if let Some((s, _)) = self.take_sock(id) {
                    // Wakes the read task (readable with EOF) so it ends.
                    let _ = s.fd.shutdown(std::net::Shutdown::Both);
                }
                // A task waiting to be allowed to read must see it is gone.
                for w in self.paused.drain(..) {
                    w.wake();
                }
            }
            Effect::HandOff { id, to, peer, head } => {
                let Some((s, tls)) = self.take_sock(id) else { return };
                // The read task of this socket ends at its next wake-up (its
                // slot is empty); the duplicate lives on, on shard `to`.
                match s.fd.try_clone() {
                    Ok(sock) => self.core.outbox.send(to, Mail::Handoff(Handoff { sock, peer, head, tls })),
                    Err(e) => {
                        eprintln!("comet: shard {}: cannot hand off {peer} to shard {to}: {e}", self.core.id);
                        let _ = s.fd.shutdown(std::net::Shutdown::Both);
                    }
                }
            }
            Effect::StartTls { id, leftover } => self.start_tls(id, leftover),
            Effect::Adopt(h) => {
                let fd = SharedFd::new(h.sock);
                let id = self.core.adopt(h.peer);
                // A panic handling the head closes this connection alone,
                // as one handling its reads does ([`handling`]).
                let head = h.head;
                let core = &mut self.core;
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| core.adopted_head(id, head))).is_err() {
                    self.core.close_after_panic(id);
                }
                if self.core.conns.get(id).is_some() {
                    self.insert(id, fd.clone(), h.tls);
                    compio::runtime::spawn(run_conn(id, fd)).detach();
                }
            }
        }
    }

    /// While the answer memory is short (less than one connection's bound
    /// of it left), reads how much of each backend connection's written
    /// answers its peer has not received yet, for the stall rule of
    /// [`ShardCore::tick`]. One `ioctl` per backend connection with
    /// answers queued, and none while the memory is not short.
    fn note_unsent_answers(&mut self) {
        let core = &self.core;
        if core.shared.answers.room() >= core.shared.config.answer_bound() {
            return;
        }
        for i in 0..self.core.backends.len() {
            let id = self.core.backends[i];
            if self.core.conns.get(id).is_none_or(|c| c.out.is_empty()) {
                continue;
            }
            let Some(fd) = self.sock(id).map(|s| s.fd.as_raw_fd()) else { continue };
            let unsent = unsent_bytes(fd);
            if let Some(sc) = self.core.conns.get_mut(id).and_then(|c| c.sql.as_deref_mut()) {
                sc.kernel_unsent = unsent;
            }
        }
    }

    /// Writes connection `id`'s queue now, or leaves it to its writer task.
    fn flush(&mut self, id: ConnId) {
        let Some(s) = self.sock(id) else {
            return;
        };
        if s.writer_waiting {
            return;
        }
        if self.write(id) == Flush::Blocked
            && let Some(s) = self.sock(id)
        {
            s.writer_waiting = true;
            compio::runtime::spawn(run_writer(id, s.fd.clone())).detach();
        }
    }

    /// Writes as much of the queue as the socket takes.
    fn write(&mut self, id: ConnId) -> Flush {
        let Some(fd) = self.sock(id).map(|s| s.fd.clone()) else {
            return Flush::Gone;
        };
        if self.tls_of(id).is_some() {
            return self.write_tls(id, &fd);
        }
        let Some(conn) = self.core.conns.get_mut(id) else {
            return Flush::Gone;
        };
        let mut written = 0u64;
        let mut result = Flush::Done;
        while !conn.out.is_empty() {
            let res = match conn.out.single() {
                // The common fan-out case: one frame, a plain send (no
                // iovec array to build and copy in).
                Some(bytes) => fd.send_with_flags(bytes, libc::MSG_NOSIGNAL),
                None => fd.send_vectored_with_flags(&conn.out.slices(), libc::MSG_NOSIGNAL),
            };
            match res {
                Ok(n) => {
                    written += n as u64;
                    conn.out.advance(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    result = Flush::Blocked;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    result = Flush::Gone;
                    break;
                }
            }
        }
        ShardMetrics::add(&self.core.metrics.bytes_out, written);
        match result {
            Flush::Gone => self.core.hangup(id),
            Flush::Done => {
                if self.core.flushed(id) {
                    let _ = fd.shutdown(std::net::Shutdown::Write);
                }
            }
            Flush::Blocked => {}
        }
        result
    }

    /// Writes a TLS connection: first the ciphertext it has pending, then
    /// the queue, one record (up to 16 KiB of plaintext) at a time, so at
    /// most one record's ciphertext waits outside the counted queue.
    fn write_tls(&mut self, id: ConnId, fd: &SharedFd<Socket>) -> Flush {
        let i = id.index as usize;
        let Some(tls) = self.tls.get_mut(i).and_then(|t| t.as_deref_mut()) else {
            return Flush::Gone;
        };
        let mut written = 0u64;
        let result = 'out: loop {
            while !tls.pending().is_empty() {
                match fd.send_with_flags(tls.pending(), libc::MSG_NOSIGNAL) {
                    Ok(n) => {
                        written += n as u64;
                        tls.sent(n);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break 'out Flush::Blocked,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break 'out Flush::Gone,
                }
            }
            let Some(conn) = self.core.conns.get_mut(id) else {
                break Flush::Gone;
            };
            if conn.out.is_empty() {
                break Flush::Done;
            }
            if tls.handshaking() {
                // Sent once the handshake is done (a refusal answered at
                // accept waits for it): not flushed yet.
                return Flush::Done;
            }
            self.plain.clear();
            for s in conn.out.slices() {
                let take = s.len().min(crate::tls::MAX_PLAINTEXT - self.plain.len());
                self.plain.extend_from_slice(&s[..take]);
                if self.plain.len() == crate::tls::MAX_PLAINTEXT {
                    break;
                }
            }
            if tls.encrypt(&self.plain).is_err() {
                break Flush::Gone;
            }
            conn.out.advance(self.plain.len());
        };
        ShardMetrics::add(&self.core.metrics.bytes_out, written);
        match result {
            Flush::Gone => self.core.hangup(id),
            Flush::Done => {
                if self.core.flushed(id) {
                    // The TLS close, best effort, before the TCP one.
                    if let Some(tls) = self.tls_of(id)
                        && tls.close_notify().is_ok()
                    {
                        let _ = fd.send_with_flags(tls.pending(), libc::MSG_NOSIGNAL);
                    }
                    let _ = fd.shutdown(std::net::Shutdown::Write);
                }
            }
            Flush::Blocked => {}
        }
        result
    }

    fn arm_handshake_deadline(&mut self, id: ConnId) {
        let timeout = self.core.shared.config.tls_handshake_timeout.as_millis() as u64;
        self.handshakes.push_back((self.started.elapsed().as_millis() as u64 + timeout, id));
    }

    /// Closes the connections whose handshake outlived its deadline.
    fn expire_handshakes(&mut self) {
        let now = self.started.elapsed().as_millis() as u64;
        while let Some(&(deadline, id)) = self.handshakes.front() {
            if deadline > now {
                break;
            }
            self.handshakes.pop_front();
            self.handshake_deadline(id);
        }
        if self.handshakes.is_empty() && self.handshakes.capacity() > 64 {
            self.handshakes = Default::default();
        }
    }

    /// A CometQL connection asked for TLS (SSLRequest): from now on its
    /// bytes are TLS records, starting with `leftover`.
    fn start_tls(&mut self, id: ConnId, mut leftover: Vec<u8>) {
        let Some(fd) = self.sock(id).map(|s| s.fd.clone()) else { return };
        let tls = match self.core.shared.tls.get().map(TlsConn::new) {
            Some(Ok(mut t)) => {
                // Not the frontend's sniffing: a MySQL client's garbage is
                // a TLS error, not an HTTP request.
                t.fresh = false;
                t
            }
            _ => {
                self.core.hangup(id);
                return;
            }
        };
        let i = id.index as usize;
        if self.tls.len() <= i {
            self.tls.resize_with(i + 1, || None);
        }
        self.tls[i] = Some(tls);
        self.arm_handshake_deadline(id);
        if !leftover.is_empty() {
            // Its flow is the read task's business: it reads again anyway.
            let _ = self.on_tls_input(id, &fd, &mut leftover);
        }
    }

    /// `--tls-handshake-timeout` passed since connection `id` was accepted:
    /// closed if its handshake is still not done.
    fn handshake_deadline(&mut self, id: ConnId) {
        if self.tls_of(id).is_some_and(|t| t.handshaking()) {
            ShardMetrics::add(&self.core.metrics.tls_handshake_failures, 1);
            self.core.hangup(id);
        }
    }

    /// Bytes read from a TLS connection: a ClientHello starts it, anything
    /// else is answered in plain HTTP and closed; ciphertext is decrypted
    /// and the plaintext handed to the core.
    fn on_tls_readable(&mut self, id: ConnId, fd: &SharedFd<Socket>, n: usize) -> Flow {
        let mut scratch = std::mem::take(&mut self.scratch);
        let flow = self.on_tls_input(id, fd, &mut scratch[..n]);
        self.scratch = scratch;
        flow
    }

    /// Ciphertext `data` from a TLS connection (read, or left over from the
    /// MySQL SSLRequest's read).
    fn on_tls_input(&mut self, id: ConnId, fd: &SharedFd<Socket>, data: &mut [u8]) -> Flow {
        let i = id.index as usize;
        let Some(tls) = self.tls.get_mut(i).and_then(|t| t.as_deref_mut()) else {
            return Flow::Gone;
        };
        if tls.fresh && data.first().is_some_and(|&b| b != crate::tls::HANDSHAKE_RECORD) {
            ShardMetrics::add(&self.core.metrics.tls_handshake_failures, 1);
            let _ = fd.send_with_flags(&crate::http::plaintext_on_tls_port(), libc::MSG_NOSIGNAL);
            let _ = fd.shutdown(std::net::Shutdown::Write);
            self.core.hangup(id);
            return Flow::Gone;
        }
        self.plain.clear();
        let was_handshaking = tls.handshaking();
        let got = tls.receive(data, &mut self.plain);
        let got = match got {
            Ok(got) => got,
            Err(_) => {
                if was_handshaking {
                    ShardMetrics::add(&self.core.metrics.tls_handshake_failures, 1);
                }
                // The alert, best effort (a socket that will not take it
                // is closed all the same).
                if let Some(tls) = self.tls_of(id) {
                    tls.take_alert();
                    let _ = fd.send_with_flags(tls.pending(), libc::MSG_NOSIGNAL);
                }
                self.core.hangup(id);
                return Flow::Gone;
            }
        };
        if got.handshake_done {
            ShardMetrics::add(&self.core.metrics.tls_handshakes, 1);
        }
        let mut flow = Flow::Continue;
        if !self.plain.is_empty() {
            let mut plain = std::mem::take(&mut self.plain);
            flow = self.core.readable(id, &mut plain);
            self.plain = plain;
        }
        if got.peer_closed {
            self.core.hangup(id);
            return Flow::Gone;
        }
        // Handshake messages to send, or a queue that waited for the
        // handshake.
        if self.tls_of(id).is_some_and(|t| !t.pending().is_empty() || got.handshake_done) {
            self.flush(id);
        }
        flow
    }

    /// Reads what connection `id`'s socket has and hands it to the core.
    fn on_readable(&mut self, id: ConnId) -> Flow {
        self.clock();
        // No socket: it was closed or handed to another shard, whose
        // duplicate now reads it; this task must not take its bytes.
        let Some(fd) = self.sock(id).map(|s| s.fd.clone()) else {
            return Flow::Gone;
        };
        if !self.core.may_read(id) {
            return Flow::Paused;
        }
        self.core.work = 0;
        let mut flow = Flow::Continue;
        for _ in 0..READS_PER_WAKE {
            match (&*fd).read(&mut self.scratch) {
                Ok(0) => {
                    self.core.hangup(id);
                    return Flow::Gone;
                }
                Ok(n) if self.tls.get(id.index as usize).is_some_and(Option::is_some) => {
                    flow = self.on_tls_readable(id, &fd, n);
                    if flow != Flow::Continue || n < self.scratch.len() {
                        break;
                    }
                }
                Ok(n) => {
                    super::panic_on_test_marker(&self.scratch[..n]);
                    flow = self.core.readable(id, &mut self.scratch[..n]);
                    // An SSLRequest: what comes next is TLS, for the
                    // effect to set up before anything more is read.
                    if flow != Flow::Continue
                        || n < self.scratch.len()
                        || self.core.effects.iter().any(|e| matches!(e, Effect::StartTls { .. }))
                    {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.core.hangup(id);
                    return Flow::Gone;
                }
            }
        }
        flow
    }

    /// Stops accepting and starts the core's graceful shutdown.
    fn begin_shutdown(&mut self) {
        for l in self.listeners.drain(..) {
            let _ = l.shutdown(std::net::Shutdown::Both);
        }
        self.core.begin_shutdown();
    }
}

/// Refuses a connection without keeping it: reads what the client already
/// sent (its request head, there at once after a deferred accept; at most
/// two reads), writes `answer` once if the socket takes it without waiting,
/// and closes (on drop). Reading first matters: closing a socket with
/// unread input sends a reset, which makes the client's kernel discard the
/// answer it has not read yet.
fn answer_and_close(sock: &Socket, answer: &[u8], scratch: &mut [u8]) {
    for _ in 0..2 {
        match (&*sock).read(scratch) {
            Ok(n) if n == scratch.len() => continue,
            _ => break,
        }
    }
    let _ = sock.send_with_flags(answer, libc::MSG_NOSIGNAL);
    let _ = sock.shutdown(std::net::Shutdown::Write);
}

/// Waits until `fd` is readable (or hung up / in error).
async fn readable(fd: &SharedFd<Socket>) -> std::io::Result<()> {
    compio::runtime::submit(PollOnce::new(fd.clone(), Interest::Readable)).await.0.map(|_| ())
}

async fn writable(fd: &SharedFd<Socket>) -> std::io::Result<()> {
    compio::runtime::submit(PollOnce::new(fd.clone(), Interest::Writable)).await.0.map(|_| ())
}

/// Accepts connections on one listener until it is shut down.
pub async fn accept_loop(listener: Arc<Socket>, which: Port) {
    let fd = SharedFd::new(ListenerFd(listener.clone()));
    let port = which.name();
    // Deferred accepting: a connection reaches accept with its request head
    // already in, which the read task then reads without waiting first.
    let deferred = which.client_speaks_first()
        && match crate::runtime::listener::defer_accept(&listener, crate::runtime::listener::DEFER_ACCEPT_SECS) {
            Ok(()) => true,
            Err(e) => {
                eprintln!("comet: {port}: TCP_DEFER_ACCEPT not set ({e}); new connections wait for readiness first");
                false
            }
        };
    // Accept errors come in storms (every retry while descriptors are out):
    // log the first, then a summary at most every 10 s.
    let mut last_log: Option<Instant> = None;
    let mut unlogged = 0u64;
    loop {
        if let Err(e) = compio::runtime::submit(PollOnce::new(fd.clone(), Interest::Readable)).await.0 {
            eprintln!("comet: listener poll failed: {e}");
            compio::time::sleep(Duration::from_millis(100)).await;
        }
        if with_shard(|s| s.core.shutting_down) {
            return;
        }
        let mut backoff = false;
        for _ in 0..256 {
            match crate::runtime::listener::accept_nonblocking(&listener) {
                Ok((sock, addr)) => {
                    let peer = addr.as_socket().unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
                    if let Some((id, conn_fd)) = with_shard(|s| s.accept(sock, peer, which)) {
                        start_conn(id, conn_fd, deferred);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => return,
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: out of descriptors or memory.
                    // Back off rather than spin; the backlog keeps the rest.
                    let shard = with_shard(|s| {
                        ShardMetrics::add(&s.core.metrics.accept_errors, 1);
                        s.core.id
                    });
                    unlogged += 1;
                    if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        eprintln!(
                            "comet: shard {shard}: {port} accept failed: {e} ({unlogged} time(s) since the last report; connections wait in the backlog)"
                        );
                        last_log = Some(Instant::now());
                        unlogged = 0;
                    }
                    backoff = true;
                    break;
                }
            }
        }
        if backoff {
            compio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A listener shared with the shard (which shuts it down) as a pollable fd.
struct ListenerFd(Arc<Socket>);

impl std::os::fd::AsFd for ListenerFd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Drives one connection's reads until it is gone.
///
/// Every idle connection carries this task, so its state is kept to the
/// readiness wait: what a read may lead to besides more reading (yielding
/// the turn, a pause, a throttle) is a separate future, boxed only while
/// it runs.
async fn run_conn(id: ConnId, fd: SharedFd<Socket>) {
    loop {
        if readable(&fd).await.is_err() {
            with_shard(|s| s.core.hangup(id));
            return;
        }
        let flow = handling(id, |s| s.on_readable(id));
        if flow != Flow::Continue && !Box::pin(after_read(id, flow)).await {
            return;
        }
    }
}

/// Starts a new connection's read task. `read_first`: its first bytes are
/// in already (a deferred accept), so they are read now, before any
/// readiness wait, and the task starts waiting for the next ones. Done
/// here rather than in [`run_conn`] so that the task of every idle
/// connection stays as small as it was.
fn start_conn(id: ConnId, fd: SharedFd<Socket>, read_first: bool) {
    if !read_first {
        compio::runtime::spawn(run_conn(id, fd)).detach();
        return;
    }
    match handling(id, |s| s.on_readable(id)) {
        Flow::Gone => {}
        Flow::Continue => compio::runtime::spawn(run_conn(id, fd)).detach(),
        flow => compio::runtime::spawn(async move {
            if after_read(id, flow).await {
                run_conn(id, fd).await;
            }
        })
        .detach(),
    }
}

/// Runs `f`, the handling of connection `id`'s input, on the shard. A
/// panic in it (a bug, which the panic hook logs) closes that connection
/// alone ([`ShardCore::close_after_panic`]) and ends its read task. Left
/// to compio, the task would end and the connection stay open, unread,
/// until the heartbeat sweep. Only `f` is caught: what [`with_shard`]
/// does after it (effects, other connections' writes) is not this
/// connection's doing.
fn handling(id: ConnId, f: impl FnOnce(&mut Shard) -> Flow) -> Flow {
    with_shard(|s| match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(s))) {
        Ok(flow) => flow,
        Err(_) => {
            // A TLS read lends the read buffer out while it decrypts: a
            // panic there left the shard reading into nothing (every read
            // a hang-up, on every connection).
            if s.scratch.len() != SCRATCH_LEN {
                s.scratch = vec![0; SCRATCH_LEN];
            }
            s.core.close_after_panic(id);
            Flow::Gone
        }
    })
}

/// Carries out what the core asked after a read; false when the
/// connection is gone.
async fn after_read(id: ConnId, mut flow: Flow) -> bool {
    // A turn's worth of work done: let the others run, then go on with
    // what this connection has buffered.
    while flow == Flow::Yield {
        yield_now().await;
        flow = handling(id, |s| {
            s.core.work = 0;
            s.core.resume(id)
        });
    }
    match flow {
        Flow::Gone => false,
        Flow::Continue | Flow::Yield => true,
        Flow::Throttle => {
            compio::time::sleep(super::conn::THROTTLE).await;
            true
        }
        Flow::Paused => wait_until_readable_allowed(id).await,
    }
}

/// Waits until the core allows reading connection `id` again, handling
/// what it had buffered meanwhile; false when the connection is gone.
async fn wait_until_readable_allowed(id: ConnId) -> bool {
    loop {
        let allowed = poll_fn(|cx| {
            with_shard(|s| {
                if s.sock(id).is_none() || s.core.conns.get(id).is_none() {
                    Poll::Ready(false)
                } else if s.core.may_read(id) {
                    Poll::Ready(true)
                } else {
                    s.paused.push(cx.waker().clone());
                    Poll::Pending
                }
            })
        })
        .await;
        if !allowed {
            return false;
        }
        // Commands buffered before the pause may pause it again.
        loop {
            match handling(id, |s| {
                s.core.work = 0;
                s.core.resume(id)
            }) {
                Flow::Gone => return false,
                Flow::Continue | Flow::Throttle => return true,
                Flow::Yield => yield_now().await,
                Flow::Paused => break,
            }
        }
    }
}

/// Writes a connection's backlog whenever its socket becomes writable.
async fn run_writer(id: ConnId, fd: SharedFd<Socket>) {
    loop {
        if writable(&fd).await.is_err() {
            with_shard(|s| s.core.hangup(id));
            return;
        }
        let done = with_shard(|s| {
            let r = s.write(id);
            if r != Flush::Blocked
                && let Some(sock) = s.sock(id)
            {
                sock.writer_waiting = false;
            }
            r != Flush::Blocked
        });
        if done {
            return;
        }
    }
}

/// Lets the runtime run other tasks once before continuing.
async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

/// Handles mail from the other shards, in batches, yielding between
/// batches so a mail storm does not starve the shard's connections; retries
/// its own overflow and ends read backpressure when a receiver pokes it;
/// starts shutdown when the main thread asks for it.
///
/// While the shard's own lane to the storage thread is over its bound, no
/// mail is taken either (mail from other shards carries statements that
/// write too): the senders' outboxes fill and they stop reading their
/// clients, and this loop waits for the storage thread's poke.
pub async fn mailbox_loop(mut inbox: Inbox<Mail>) {
    let mut batch: std::collections::VecDeque<Mail> = std::collections::VecDeque::with_capacity(256);
    loop {
        let store_congested = with_shard(|s| {
            s.clock();
            s.core.storage_progress();
            s.core.cluster_progress();
            s.core.store_congested()
        });
        if batch.is_empty() && !store_congested {
            inbox.drain(256, |m| batch.push_back(m));
        }
        let store_congested = with_shard(|s| {
            // Mail gets a larger turn than a connection (it carries the
            // work of every other shard's connections and the answers
            // they wait for), but still a bounded one.
            s.core.work = 0;
            while s.core.work < MAIL_WORK_PER_TURN
                && !s.core.store_congested()
                && let Some(m) = batch.pop_front()
            {
                s.core.on_mail(m);
            }
            if s.core.outbox.recheck() {
                s.core.unpause();
            }
            s.core.store_congested()
        });
        if !store_congested && (!batch.is_empty() || inbox.has_mail()) {
            yield_now().await;
            continue;
        }
        // The main thread forces the doorbell on SIGTERM/SIGINT.
        with_shard(|s| {
            if s.core.shared.shutdown.load(Ordering::Acquire) {
                s.begin_shutdown();
            }
        });
        if store_congested {
            // The storage thread pokes once it has taken the lane.
            poll_fn(|cx| inbox.poll_park_for_poke(cx)).await;
        } else {
            poll_fn(|cx| inbox.poll_park(cx)).await;
        }
    }
}

/// Bytes in socket `fd`'s send queue that its peer has not acknowledged
/// (`SIOCOUTQ`); 0 if the kernel cannot say.
fn unsent_bytes(fd: std::os::fd::RawFd) -> u64 {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ for a TCP socket) writes one c_int
    // through the pointer, which points to `n`, alive for the call; `fd`
    // is an open socket of this shard's (a closed or reused one only makes
    // the call fail or answer for that descriptor).
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    if rc == 0 { n.max(0) as u64 } else { 0 }
}

/// The shard's root task: the once-a-second tick, and shutdown.
///
/// Returns when shutdown has closed every connection, or its timeout passed.
pub async fn sweep_loop(shutdown_timeout: Duration) {
    let mut deadline = None;
    loop {
        let shutting = with_shard(|s| s.core.shared.shutdown.load(Ordering::Acquire));
        if shutting && deadline.is_none() {
            with_shard(|s| s.begin_shutdown());
            deadline = Some(Instant::now() + shutdown_timeout);
        }
        let tick = |s: &mut Shard| {
            s.clock();
            s.expire_handshakes();
            s.note_unsent_answers();
            s.core.tick();
        };
        if let Some(d) = deadline {
            if with_shard(|s| s.core.conns.is_empty() && s.core.pending.is_empty()) || Instant::now() >= d {
                return;
            }
            compio::time::sleep(Duration::from_millis(50)).await;
            with_shard(tick);
            continue;
        }
        compio::time::sleep(Duration::from_secs(1)).await;
        with_shard(tick);
    }
}
#[cfg(test)]
mod tests {
    /// Every idle connection carries its read task: growing the task's
    /// state (a timer is 112 bytes) is a decision to make here, against the
    /// idle-memory figures in bench/RESULTS.md.
    #[test]
    fn the_read_task_of_an_idle_connection_stays_small() {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let fd = compio::driver::SharedFd::new(s);
        let task = super::run_conn(super::ConnId { index: 0, generation: 0 }, fd);
        assert!(std::mem::size_of_val(&task) <= 80, "{} bytes", std::mem::size_of_val(&task));
    }
}
