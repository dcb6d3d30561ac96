//! The I/O layer under the shards: which backend to use, the listening
//! sockets, and building one compio runtime per shard thread.

pub mod listener;
pub mod probe;

pub use probe::{Backend, choose_backend};

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Duration;

use compio::driver::{DriverType, ProactorBuilder};
use compio::runtime::Runtime;

/// Builds the compio runtime for one shard thread on the chosen backend.
/// Call it on that thread: the io_uring ring accepts submissions from its
/// creator only.
pub fn build_runtime(backend: Backend) -> std::io::Result<compio::runtime::Runtime> {
    let want = match backend {
        Backend::IoUring => DriverType::IoUring,
        Backend::Epoll => DriverType::Poll,
    };
    let build = |tuned: bool| {
        let mut proactor = ProactorBuilder::new();
        proactor.capacity(4096).thread_pool_limit(1).driver_type(want);
        if tuned {
            // The shard thread is the ring's only submitter, and completions
            // are posted when it asks for them (SINGLE_ISSUER and
            // DEFER_TASKRUN) instead of by task work that interrupts it.
            // Measured on the handshake path: 86 and 92 against 102 and 130
            // µs of server CPU per handshake in paired runs (bench/RESULTS.md,
            // "Connect").
            proactor.single_issuer(true).defer_taskrun(true);
            // The kernel raises a flag in the ring while completions wait
            // to be posted, so a poll that must not sleep (`block_on`) still
            // asks for them, and only then.
            proactor.taskrun_flag(true);
        }
        compio::runtime::RuntimeBuilder::new().with_proactor(proactor).build()
    };
    // Kernels before 6.1 refuse the two setup flags: run without them.
    let rt = match build(backend == Backend::IoUring) {
        Ok(rt) => rt,
        Err(_) if backend == Backend::IoUring => build(false)?,
        Err(e) => return Err(e),
    };
    let got = rt.driver_type();
    if got != want {
        return Err(std::io::Error::other(format!("asked compio for {want:?}, got {got:?}")));
    }
    Ok(rt)
}

/// Runs `future` to completion on `rt`, with the shard's other tasks, the
/// way compio's own `block_on` does, except for one thing: when tasks are
/// still queued after a turn, it takes the completed I/O without going to
/// sleep.
///
/// compio's loop asks io_uring for completions with a zero timeout then.
/// With DEFER_TASKRUN that is a wait like any other: the kernel arms a timer
/// that has already expired, puts the thread to sleep and is woken by the
/// timer's interrupt. On this VM that cost a shard about 0.85 timer wake-ups
/// per latency-bound handshake, each dearer than the handshake's own work
/// (`bench/RESULTS.md`, "A wait that was not one"). Here the runtime's
/// waker is rung first, which only marks the awake driver as notified (no
/// syscall), so its poll submits without waiting; the ring's TASKRUN flag
/// (see `build_runtime`) still makes it run and reap what completed. On
/// epoll a zero timeout is a plain `epoll_wait(0)` and compio's way is
/// kept.
///
/// A panic in a task or in `future` is caught and returned once the
/// runtime's loop is left, so that the caller drops the shard's state and
/// the runtime outside the unwind.
pub fn block_on<F: Future>(rt: &Runtime, future: F) -> std::thread::Result<F::Output> {
    let uring = rt.driver_type() == DriverType::IoUring;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.enter(|| {
            let waker = rt.waker();
            let mut cx = Context::from_waker(&waker);
            let mut future = pin!(future);
            loop {
                if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                    rt.run();
                    return out;
                }
                if rt.run() {
                    if uring {
                        waker.wake_by_ref();
                    }
                    rt.poll_with(Some(Duration::ZERO));
                } else {
                    rt.poll();
                }
            }
        })
    }))
}
