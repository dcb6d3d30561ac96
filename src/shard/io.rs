//! The async glue of a shard: the tasks that wait on sockets, mailboxes and
//! timers, and call the synchronous handlers of [`Shard`].
//!
//! Every socket is waited on for readiness (a one-shot poll: io_uring
//! `POLL_ADD` or epoll), then read and written with non-blocking syscalls
//! through the shard's shared scratch buffer. So an idle connection has no
//! read buffer pinned in the kernel or in user space, on either backend; the
//! price is one readiness event per burst of reads, which the batching of
//! writes (one vectored write per connection per handler) more than repays
//! at fan-out.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use compio::driver::SharedFd;
use compio::driver::op::{Interest, PollOnce};
use socket2::Socket;

use super::conn::{Flow, Flush};
use super::mail::Mail;
use super::{ConnId, with_shard};
use crate::mailbox::Inbox;
use crate::metrics::ShardMetrics;

/// Waits until `fd` is readable (or hung up / in error).
async fn readable(fd: &SharedFd<Socket>) -> std::io::Result<()> {
    compio::runtime::submit(PollOnce::new(fd.clone(), Interest::Readable)).await.0.map(|_| ())
}

async fn writable(fd: &SharedFd<Socket>) -> std::io::Result<()> {
    compio::runtime::submit(PollOnce::new(fd.clone(), Interest::Writable)).await.0.map(|_| ())
}

/// Accepts connections on one listener until it is shut down; `backend`:
/// the CometQL port, else the frontend (WebSocket and HTTP) port.
pub async fn accept_loop(listener: Arc<Socket>, backend: bool) {
    let fd = SharedFd::new(ListenerFd(listener.clone()));
    let port = if backend { "backend" } else { "frontend" };
    // Accept errors come in storms (every retry while descriptors are out):
    // log the first, then a summary at most every 10 s.
    let mut last_log: Option<std::time::Instant> = None;
    let mut unlogged = 0u64;
    loop {
        if let Err(e) = compio::runtime::submit(PollOnce::new(fd.clone(), Interest::Readable)).await.0 {
            eprintln!("comet: listener poll failed: {e}");
            compio::time::sleep(Duration::from_millis(100)).await;
        }
        if with_shard(|s| s.shutting_down) {
            return;
        }
        let mut backoff = false;
        for _ in 0..256 {
            match listener.accept() {
                Ok((sock, addr)) => {
                    let peer = addr.as_socket().unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
                    if sock.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let accepted =
                        with_shard(|s| if backend { s.on_accept_sql(sock, peer) } else { s.on_accept(sock, peer) });
                    if let Some((id, conn_fd)) = accepted {
                        compio::runtime::spawn(run_conn(id, conn_fd)).detach();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => return,
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: out of descriptors or memory.
                    // Back off rather than spin; the backlog keeps the rest.
                    let shard = with_shard(|s| {
                        ShardMetrics::add(&s.metrics.accept_errors, 1);
                        s.id
                    });
                    unlogged += 1;
                    if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        eprintln!(
                            "comet: shard {shard}: {port} accept failed: {e} ({unlogged} time(s) since the last report; connections wait in the backlog)"
                        );
                        last_log = Some(std::time::Instant::now());
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
pub async fn run_conn(id: ConnId, fd: SharedFd<Socket>) {
    loop {
        if readable(&fd).await.is_err() {
            with_shard(|s| s.drop_conn(id));
            return;
        }
        match with_shard(|s| s.on_readable(id)) {
            Flow::Gone => return,
            Flow::Continue => {}
            Flow::Paused => {
                if !wait_until_readable_allowed(id).await {
                    return;
                }
            }
        }
    }
}

/// Waits until the shard allows reading connection `id` again, handling
/// what it had buffered meanwhile; false when the connection is gone.
async fn wait_until_readable_allowed(id: ConnId) -> bool {
    loop {
        let allowed = poll_fn(|cx| {
            with_shard(|s| {
                if s.conns.get(id).is_none() {
                    Poll::Ready(false)
                } else if s.may_read(id) {
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
        if with_shard(|s| {
            s.resume(id);
            s.may_read(id)
        }) {
            return true;
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

/// Writes a connection's backlog whenever its socket becomes writable.
pub async fn run_writer(id: ConnId, fd: SharedFd<Socket>) {
    loop {
        if writable(&fd).await.is_err() {
            with_shard(|s| s.drop_conn(id));
            return;
        }
        let done = with_shard(|s| match s.flush(id) {
            Flush::Blocked => false,
            Flush::Gone => true,
            Flush::Done => {
                if let Some(c) = s.conns.get_mut(id) {
                    c.writer_waiting = false;
                }
                true
            }
        });
        if done {
            return;
        }
    }
}

/// Handles mail from the other shards, in batches, yielding between
/// batches so a mail storm does not starve the shard's connections; retries
/// its own overflow and ends read backpressure when a receiver pokes it;
/// starts shutdown when the main thread asks for it.
pub async fn mailbox_loop(mut inbox: Inbox<Mail>) {
    let mut batch: Vec<Mail> = Vec::with_capacity(256);
    loop {
        inbox.drain(256, |m| batch.push(m));
        with_shard(|s| {
            for m in batch.drain(..) {
                s.on_mail(m);
            }
            if s.outbox.recheck() {
                s.unpause();
            }
        });
        if inbox.has_mail() {
            yield_now().await;
            continue;
        }
        // The main thread forces the doorbell on SIGTERM/SIGINT.
        with_shard(|s| {
            if s.shared.shutdown.load(Ordering::Acquire) {
                s.begin_shutdown();
            }
        });
        poll_fn(|cx| inbox.poll_park(cx)).await;
    }
}

/// The shard's root task: the once-a-second sweep, and shutdown.
///
/// Returns when shutdown has closed every connection, or its timeout passed.
pub async fn sweep_loop(shutdown_timeout: Duration) {
    let mut deadline = None;
    loop {
        let shutting = with_shard(|s| s.shared.shutdown.load(Ordering::Acquire));
        if shutting && deadline.is_none() {
            with_shard(|s| s.begin_shutdown());
            deadline = Some(std::time::Instant::now() + shutdown_timeout);
        }
        if let Some(d) = deadline {
            if with_shard(|s| s.conns.is_empty() && s.pending.is_empty()) || std::time::Instant::now() >= d {
                return;
            }
            compio::time::sleep(Duration::from_millis(50)).await;
            with_shard(|s| s.sweep());
            continue;
        }
        compio::time::sleep(Duration::from_secs(1)).await;
        with_shard(|s| s.sweep());
    }
}
