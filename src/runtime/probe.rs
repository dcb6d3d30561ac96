//! Choosing the I/O backend once, at start (docs/architecture.md).
//!
//! io_uring is blocked in many real deployments (Docker's default seccomp
//! profile, gVisor, `kernel.io_uring_disabled`, RHEL 9), where
//! `io_uring_setup` fails with EPERM, ENOSYS or EINVAL. `--io auto` probes the
//! way the shards will use it (set up a ring, probe the opcodes comet needs,
//! push one NOP through `io_uring_enter`) and falls back to epoll; `--io uring`
//! turns the same failure into a clear start-up error.

use io_uring::{IoUring, Probe, opcode};

use crate::config::IoChoice;

/// The backend every shard of this process uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    IoUring,
    Epoll,
}

impl Backend {
    /// The name used in logs and `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::IoUring => "io_uring",
            Backend::Epoll => "epoll",
        }
    }
}

/// Why io_uring cannot be used here.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("io_uring_setup failed: {0} (blocked by seccomp, sysctl kernel.io_uring_disabled, or an old kernel)")]
    Setup(std::io::Error),
    #[error("io_uring opcode probe failed: {0}")]
    Probe(std::io::Error),
    #[error("io_uring lacks opcode {0} that comet needs")]
    Opcode(&'static str),
    #[error("io_uring_enter failed: {0}")]
    Enter(std::io::Error),
}

/// Tries io_uring end to end; `Ok` means the shards can use it.
pub fn probe_io_uring() -> Result<(), ProbeError> {
    let mut ring = IoUring::new(4).map_err(ProbeError::Setup)?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(ProbeError::Probe)?;
    for (code, name) in [
        (opcode::PollAdd::CODE, "POLL_ADD"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
        (opcode::Nop::CODE, "NOP"),
        (opcode::Timeout::CODE, "TIMEOUT"),
    ] {
        if !probe.is_supported(code) {
            return Err(ProbeError::Opcode(name));
        }
    }
    let nop = opcode::Nop::new().build().user_data(7);
    // SAFETY: a NOP entry references no memory, so nothing it points to can
    // be freed before the kernel completes it; we wait for that completion.
    unsafe { ring.submission().push(&nop) }.map_err(|_| ProbeError::Enter(std::io::Error::other("SQ full")))?;
    ring.submit_and_wait(1).map_err(ProbeError::Enter)?;
    match ring.completion().next() {
        Some(cqe) if cqe.user_data() == 7 && cqe.result() >= 0 => Ok(()),
        Some(cqe) => Err(ProbeError::Enter(std::io::Error::from_raw_os_error(-cqe.result()))),
        None => Err(ProbeError::Enter(std::io::Error::other("no completion for NOP"))),
    }
}

/// Applies `--io`: returns the backend, or the reason `uring` cannot be had.
pub fn choose_backend(choice: IoChoice) -> Result<(Backend, Option<ProbeError>), ProbeError> {
    match choice {
        IoChoice::Epoll => Ok((Backend::Epoll, None)),
        IoChoice::Uring => probe_io_uring().map(|()| (Backend::IoUring, None)),
        IoChoice::Auto => match probe_io_uring() {
            Ok(()) => Ok((Backend::IoUring, None)),
            Err(e) => Ok((Backend::Epoll, Some(e))),
        },
    }
}
