//! The I/O layer under the shards: which backend to use, the listening
//! sockets, and building one compio runtime per shard thread.

pub mod listener;
pub mod probe;

pub use probe::{Backend, choose_backend};

use compio::driver::{DriverType, ProactorBuilder};

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
