//! The I/O layer under the shards: which backend to use, the listening
//! sockets, building one compio runtime per shard thread, the loop that
//! runs it ([`block_on`], compio's own loop minus a zero-timeout wait that
//! io_uring turns into a timer sleep), and [`watching`], which makes a
//! panic in a shard's long-lived tasks stop the shard.

pub mod listener;
pub mod probe;

pub use probe::{Backend, choose_backend};

use std::future::Future;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use compio::driver::{DriverType, ProactorBuilder};
use compio::runtime::{JoinHandle, Runtime};

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
/// A panic in `future` is caught and returned once the runtime's loop is
/// left, so that the caller drops the shard's state and the runtime
/// outside the unwind. (A panic in a spawned task never reaches here:
/// compio's executor catches it and ends that task only.)
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

/// Runs `main`, the shard's main future, while watching `tasks`, its
/// long-lived tasks (the accept loops and the mailbox loop): a panic in
/// one of them is resumed here, so that it stops the shard (and the
/// process) as a panic in `main` does. compio's executor catches a task's
/// panic and ends that task alone, which would leave the shard running
/// without its mail or its accepts. A task that ends without a panic (or
/// was cancelled, which only a dropped handle does, and these are held
/// here) is no longer watched; the ones still running when `main` ends are
/// detached, as if they had never been watched.
pub async fn watching<T>(main: impl Future<Output = T>, mut tasks: Vec<JoinHandle<()>>) -> T {
    let mut main = pin!(main);
    let out = std::future::poll_fn(|cx| {
        let mut i = 0;
        while i < tasks.len() {
            match Pin::new(&mut tasks[i]).poll(cx) {
                Poll::Pending => i += 1,
                Poll::Ready(end) => {
                    drop(tasks.swap_remove(i));
                    if let Err(e) = end {
                        e.resume_unwind();
                    }
                }
            }
        }
        main.as_mut().poll(cx)
    })
    .await;
    for task in tasks {
        task.detach();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::rc::Rc;

    use compio::driver::SharedFd;
    use compio::driver::op::{Interest, PollOnce};

    /// A readiness wait completes while another task keeps the run queue
    /// busy: `block_on` then never sleeps, so this holds only if its
    /// non-waiting polls really reap completions (on io_uring, through the
    /// ring's TASKRUN flag). Without them the wait ends only when the
    /// spinner gives up, and the test fails.
    fn io_completes_while_tasks_stay_queued(backend: Backend) {
        let rt = build_runtime(backend).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            b.write_all(b"x").unwrap();
            b
        });
        let done = Rc::new(Cell::new(false));
        let spins = Rc::new(Cell::new(0u64));
        let ran = block_on(&rt, {
            let (done, spins) = (done.clone(), spins.clone());
            async move {
                compio::runtime::spawn({
                    let (done, spins) = (done.clone(), spins.clone());
                    async move {
                        let start = std::time::Instant::now();
                        // Gives up after 3 s, so that a broken loop fails
                        // the test below instead of hanging it.
                        while !done.get() && start.elapsed() < Duration::from_secs(3) {
                            spins.set(spins.get() + 1);
                            let mut yielded = false;
                            std::future::poll_fn(|cx| {
                                if std::mem::replace(&mut yielded, true) {
                                    Poll::Ready(())
                                } else {
                                    cx.waker().wake_by_ref();
                                    Poll::Pending
                                }
                            })
                            .await;
                        }
                    }
                })
                .detach();
                let fd = SharedFd::new(a);
                let start = std::time::Instant::now();
                compio::runtime::submit(PollOnce::new(fd, Interest::Readable)).await.0.unwrap();
                done.set(true);
                start.elapsed()
            }
        });
        let waited = ran.expect("the spinner or the wait panicked");
        // The byte comes after 50 ms; a wait that lasted until the spinner
        // gave up was reaped only once the run queue emptied.
        assert!(waited < Duration::from_secs(1), "readable after {waited:?} while tasks stayed queued");
        assert!(spins.get() > 0, "the spinner never ran");
        drop(writer.join().unwrap());
    }

    #[test]
    fn io_uring_completions_are_reaped_while_tasks_stay_queued() {
        if probe::probe_io_uring().is_err() {
            eprintln!("io_uring unavailable here; skipped");
            return;
        }
        io_completes_while_tasks_stay_queued(Backend::IoUring);
    }

    #[test]
    fn epoll_readiness_is_reaped_while_tasks_stay_queued() {
        io_completes_while_tasks_stay_queued(Backend::Epoll);
    }

    /// A panic in a shard's main future comes back from `block_on` as an
    /// error (the caller then drops the shard and the runtime, and the
    /// process stops), on either backend. A panic in a spawned task does
    /// not: compio's executor catches it and ends that task only (a
    /// detached task's panic is printed and dropped), and the shard goes
    /// on. This test pins both, so that a compio update that changes
    /// either is noticed.
    #[test]
    fn a_panic_in_the_future_comes_back_as_an_error_and_one_in_a_task_ends_that_task() {
        let mut backends = vec![Backend::Epoll];
        if probe::probe_io_uring().is_ok() {
            backends.push(Backend::IoUring);
        }
        for backend in backends {
            let rt = build_runtime(backend).unwrap();
            let ran = block_on(&rt, async {
                if std::hint::black_box(true) {
                    panic!("in the future");
                }
            });
            let payload = ran.expect_err("the future panicked");
            assert_eq!(payload.downcast_ref::<&str>(), Some(&"in the future"), "{backend:?}");
            drop(rt);

            let rt = build_runtime(backend).unwrap();
            let ran = block_on(&rt, async {
                compio::runtime::spawn(async {
                    if std::hint::black_box(true) {
                        panic!("in a task");
                    }
                })
                .detach();
                compio::time::sleep(Duration::from_millis(20)).await;
                "the future went on"
            });
            assert_eq!(ran.expect("a task's panic stays in the task"), "the future went on", "{backend:?}");
            drop(rt);
        }
    }

    /// What `watching` is for: a watched task's panic stops `block_on` at
    /// once, while the main future still waits; a watched task that ends
    /// normally does not.
    #[test]
    fn a_panic_in_a_watched_task_comes_back_as_an_error() {
        let rt = build_runtime(Backend::Epoll).unwrap();
        let start = std::time::Instant::now();
        let ran = block_on(&rt, async {
            let done = compio::runtime::spawn(async {});
            let panics = compio::runtime::spawn(async {
                compio::time::sleep(Duration::from_millis(20)).await;
                if std::hint::black_box(true) {
                    panic!("in a watched task");
                }
            });
            watching(compio::time::sleep(Duration::from_secs(5)), vec![done, panics]).await
        });
        let payload = ran.expect_err("the watched task panicked");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"in a watched task"));
        assert!(start.elapsed() < Duration::from_secs(2), "at once, not after main: {:?}", start.elapsed());
        drop(rt);

        // A task that ends normally first, one that outlives `main`: it is
        // detached, not cancelled, so it still finishes afterwards.
        let rt = build_runtime(Backend::Epoll).unwrap();
        let finished = Rc::new(Cell::new(false));
        let ran = block_on(&rt, {
            let finished = finished.clone();
            async move {
                let ends = compio::runtime::spawn(async {});
                let runs_on = compio::runtime::spawn(async move {
                    compio::time::sleep(Duration::from_millis(10)).await;
                    finished.set(true);
                });
                let main = async {
                    // Once past the first poll, so that `ends` has ended.
                    compio::time::sleep(Duration::from_millis(1)).await;
                    7
                };
                let out = watching(main, vec![ends, runs_on]).await;
                compio::time::sleep(Duration::from_millis(50)).await;
                out
            }
        });
        assert_eq!(ran.expect("nothing panicked"), 7);
        assert!(finished.get(), "the task still running when main ended was detached, not cancelled");
    }
}
