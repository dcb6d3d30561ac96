//! The I/O layer under the shards: which backend to use, the listening
//! sockets, and building one compio runtime per shard thread.

pub mod listener;
pub mod probe;

pub use probe::{Backend, choose_backend};

use compio::driver::{DriverType, ProactorBuilder};

/// Builds the compio runtime for one shard thread on the chosen backend.
pub fn build_runtime(backend: Backend) -> std::io::Result<compio::runtime::Runtime> {
    let mut proactor = ProactorBuilder::new();
    proactor.capacity(4096).thread_pool_limit(1);
    proactor.driver_type(match backend {
        Backend::IoUring => DriverType::IoUring,
        Backend::Epoll => DriverType::Poll,
    });
    let rt = compio::runtime::RuntimeBuilder::new().with_proactor(proactor).build()?;
    let got = rt.driver_type();
    let want = match backend {
        Backend::IoUring => DriverType::IoUring,
        Backend::Epoll => DriverType::Poll,
    };
    if got != want {
        return Err(std::io::Error::other(format!("asked compio for {want:?}, got {got:?}")));
    }
    Ok(rt)
}
