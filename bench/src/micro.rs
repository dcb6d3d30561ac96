//! In-process measurements of one step of the delivery path, with the
//! server's own code and no network: what a wss record costs to encrypt
//! (`tls-records`), and what one compression of a published message costs
//! (`deflate-cost`). They put a number on a trade-off that a fan-out run
//! cannot separate from its noise.

use std::io::Read;
use std::sync::Arc;

use comet::tls::{RecordKeys, TlsConn, TlsFiles};
use rustls::SupportedCipherSuite;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// This thread's CPU time in seconds, to the nanosecond: getrusage's view
/// of a running thread lags by up to a scheduler tick, too coarse for
/// rounds of a few milliseconds.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the one we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Moves the client's ciphertext to the server and the server's back.
fn pump(c: &mut rustls::ClientConnection, s: &mut TlsConn) {
    let mut plain = Vec::new();
    let mut wire = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut wire).expect("client write_tls");
    }
    s.receive(&mut wire, &mut plain).expect("server receive");
    let back = s.pending().to_vec();
    s.sent(back.len());
    let mut rd = &back[..];
    while !rd.is_empty() {
        c.read_tls(&mut rd).expect("client read_tls");
    }
    c.process_new_packets().expect("client process");
}

/// A connected pair: comet's `TlsConn` over `server` against a stock
/// rustls client that offers only `suite`.
fn pair(
    server: &Arc<rustls::ServerConfig>,
    roots: &rustls::RootCertStore,
    suite: SupportedCipherSuite,
) -> (rustls::ClientConnection, Box<TlsConn>) {
    let version = match suite {
        SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
        SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
    };
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![suite];
    let cc = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[version])
        .expect("versions")
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let mut c = rustls::ClientConnection::new(Arc::new(cc), "localhost".try_into().expect("name")).expect("client");
    let mut s = TlsConn::new(server.clone()).expect("server");
    for _ in 0..4 {
        pump(&mut c, &mut s);
    }
    assert!(!s.handshaking(), "handshake with {:?}", suite.suite());
    (c, s)
}

/// Server CPU (this thread) per encrypted record, for each ECDSA cipher
/// suite and record size, with ring's expanded keys (`--tls-record-keys expanded`) against
/// comet's compact keys (`src/tls/keys.rs`), through `TlsConn::encrypt` as a push
/// is.
pub fn tls_records(records: usize, sizes: &[usize]) {
    let dir = std::env::temp_dir().join(format!("comet-bench-tlsrec-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    crate::target::make_certs(&dir).unwrap_or_else(|e| crate::die(&format!("certificates: {e}")));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let load = |record_keys| {
        let files = TlsFiles { cert: dir.join("chain.pem"), key: dir.join("key.pem"), record_keys };
        comet::tls::load(&files, now as i64).unwrap_or_else(|e| crate::die(&e))
    };
    let (ring_keys, compact) = (load(RecordKeys::Expanded), load(RecordKeys::Compact));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(dir.join("ca.pem")).expect("ca.pem")).expect("root");
    let _ = std::fs::remove_dir_all(&dir);
    println!("server CPU ns per record, {records} records each (ring's keys | compact keys | difference)");
    let suites = rustls::crypto::ring::default_provider().cipher_suites;
    for suite in suites.into_iter().filter(|s| !format!("{:?}", s.suite()).contains("_RSA_")) {
        for &size in sizes {
            let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let mut ns = [0.0f64; 2];
            for (k, cfg) in [&ring_keys, &compact].into_iter().enumerate() {
                let (mut c, mut s) = pair(cfg, &roots, suite);
                // The records are real: the client reads one (the timed
                // ones are dropped unread).
                s.encrypt(&payload).expect("encrypt");
                pump(&mut c, &mut s);
                let mut got = vec![0; size];
                c.reader().read_exact(&mut got).expect("client read");
                assert_eq!(got, payload);
                // Best of three rounds: the machine is shared.
                let mut best = f64::MAX;
                for _ in 0..3 {
                    let cpu0 = thread_cpu();
                    for _ in 0..records {
                        s.encrypt(&payload).expect("encrypt");
                        let n = s.pending().len();
                        s.sent(n);
                    }
                    best = best.min((thread_cpu() - cpu0) * 1e9 / records as f64);
                }
                ns[k] = best;
            }
            println!(
                "{:<48} {size:>6} B  {:>8.0} | {:>8.0} | {:>+7.0} ns ({:+.2} ns/B)",
                format!("{:?}", suite.suite()),
                ns[0],
                ns[1],
                ns[1] - ns[0],
                (ns[1] - ns[0]) / size as f64
            );
        }
    }
}

/// A 2 KB JSON message less repetitive than the fan-out filler: an array
/// of chat events with varied ids, names, times and words.
fn realistic_json(bytes: usize) -> String {
    const WORDS: [&str; 24] = [
        "order", "shipped", "delayed", "payment", "refund", "alpha", "beta", "gamma", "north", "south", "green",
        "amber", "ticket", "queue", "urgent", "review", "merged", "opened", "closed", "build", "deploy", "cache",
        "server", "client",
    ];
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut s = String::from("[");
    while s.len() < bytes {
        let r = next();
        let text: Vec<&str> = (0..4 + r % 6).map(|i| WORDS[((r >> (i * 5)) % 24) as usize]).collect();
        s.push_str(&format!(
            "{{\"id\":{},\"user\":\"u{}\",\"ts\":{},\"price\":{}.{:02},\"text\":\"{}\"}},",
            r % 1_000_000,
            r % 9973,
            1_764_000_000 + r % 86_400,
            r % 500,
            r % 100,
            text.join(" ")
        ));
    }
    s.truncate(bytes - 1);
    s.push(']');
    s
}

/// CPU of one compression of a published message into its
/// permessage-deflate frame (`Deflater::frame`, what a publish pays once
/// for all its subscribers), for the fan-out bench's own message and a
/// less repetitive JSON of the same size.
pub fn deflate_cost(bytes: usize, iterations: usize) {
    let mut filler = crate::wire::epoch_us().to_string();
    while filler.len() < bytes {
        filler.push_str(" user 4711 wrote: lorem ipsum dolor sit amet, consectetur;");
    }
    filler.truncate(bytes);
    let mut deflater = comet::ws::deflate::Deflater::default();
    let mut inflater = comet::ws::deflate::Inflater::default();
    for (name, text) in [("fan-out filler", filler), ("varied JSON", realistic_json(bytes))] {
        let json = serde_json::json!({ "event": "bench", "data": text }).to_string();
        let mut frame = Vec::new();
        comet::ws::frame_header(comet::ws::Opcode::Text, json.len(), &mut frame);
        frame.extend_from_slice(json.as_bytes());
        let mut best = f64::MAX;
        let mut out_len = 0;
        for _ in 0..3 {
            let cpu0 = thread_cpu();
            for _ in 0..iterations {
                let z = deflater.frame(&frame).expect("compressible");
                out_len = z.len();
                std::hint::black_box(z);
            }
            best = best.min((thread_cpu() - cpu0) * 1e6 / iterations as f64);
        }
        // What a browser inflates is the same message.
        let z = deflater.frame(&frame).expect("compressible");
        let (_, start, end) = crate::wire::parse_frame(&z).expect("a whole frame");
        let mut out = Vec::new();
        let plain = crate::wire::frame_payload(z[0], &z[start..end], &mut inflater, &mut out);
        assert_eq!(plain, json.as_bytes(), "{name}: the compressed frame does not inflate to the message");
        println!(
            "{name:<16} frame {:>5} B -> {:>5} B ({:.1}x): {best:.1} µs CPU per compression",
            frame.len(),
            out_len,
            frame.len() as f64 / out_len as f64
        );
    }
}

/// Pins the calling thread to one CPU.
fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it;
    // sched_setaffinity reads the set we own for this thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// This thread's voluntary context switches: its sleeps.
fn thread_sleeps() -> i64 {
    // SAFETY: getrusage fills the rusage we own.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        ru.ru_nvcsw
    }
}

fn eventfd() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: eventfd returns a new descriptor (checked) that we then own.
    unsafe {
        let fd = libc::eventfd(0, libc::EFD_CLOEXEC);
        assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
        std::os::fd::OwnedFd::from_raw_fd(fd)
    }
}

fn efd_write(fd: std::os::fd::RawFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a buffer we own to an eventfd.
    let n = unsafe { libc::write(fd, one.as_ptr().cast(), 8) };
    assert_eq!(n, 8, "eventfd write");
}

fn efd_read(fd: std::os::fd::RawFd) {
    let mut b = [0u8; 8];
    // SAFETY: reads 8 bytes into a buffer we own from an eventfd.
    let n = unsafe { libc::read(fd, b.as_mut_ptr().cast(), 8) };
    assert_eq!(n, 8, "eventfd read");
}

/// How a thread waits for a descriptor to become readable.
#[derive(Clone, Copy, Debug)]
enum Wait {
    Epoll,
    Poll,
    /// A POLL_ADD and `io_uring_enter` with GETEVENTS and a 1 s timeout,
    /// on a ring set up as comet's shards set theirs up (SINGLE_ISSUER,
    /// DEFER_TASKRUN; NO_IOWAIT when the kernel has it).
    Uring,
    /// The same ring, without DEFER_TASKRUN.
    UringPlain,
    /// `Uring` with 5,000 other polls armed on the ring that never fire,
    /// as a shard has a read armed for every idle connection.
    UringArmed,
}

/// CPU of one sleep and wake-up of a thread, by the way it waits. Thread W
/// (pinned to CPU 0) waits for an eventfd that thread P (CPU 1) writes,
/// then answers on a second one that P blocks on: every round W goes to
/// sleep once and is woken from the other CPU, as a shard is by a client
/// on loopback. Reports W's CPU per round (what the shard pays) and its
/// sleeps per round, for epoll_wait, poll and io_uring_enter.
pub fn wake_cost(rounds: usize) {
    println!("wake-cost: {rounds} rounds; waiter on CPU 0, waker on CPU 1");
    println!("{:<34} {:>14} {:>16} {:>14}", "wait", "waiter µs/round", "waiter sleeps/round", "waker µs/round");
    for tcp in [false, true] {
        println!("woken by {}:", if tcp { "a byte on a loopback TCP connection" } else { "an eventfd" });
        for mode in [Wait::Epoll, Wait::Poll, Wait::Uring, Wait::UringPlain, Wait::UringArmed, Wait::Epoll, Wait::Uring]
        {
            wake_rounds(rounds, mode, tcp);
        }
    }
}

/// One row of [`wake_cost`]: with `tcp`, the waiter is woken by a byte on
/// a loopback TCP connection (the client's softirq wakes it, as in a
/// handshake) and answers with one; else by eventfds.
fn wake_rounds(rounds: usize, mode: Wait, tcp: bool) {
    use std::os::fd::{AsRawFd, OwnedFd};
    {
        let (a, b): (OwnedFd, OwnedFd) = if tcp {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
            let (s, _) = l.accept().expect("accept");
            let _ = (c.set_nodelay(true), s.set_nodelay(true));
            (s.into(), c.into())
        } else {
            (eventfd(), eventfd())
        };
        let (fa, fb) = (a.as_raw_fd(), b.as_raw_fd());
        // eventfds: the waker writes a and reads b; the waiter waits for a,
        // reads it and writes b. TCP: each side reads and writes its own
        // end, the waiter a, the waker b.
        let (w_wait, w_back) = (fa, if tcp { fa } else { fb });
        let (p_write, p_read) = (if tcp { fb } else { fa }, fb);
        let waker = std::thread::spawn(move || {
            pin(1);
            let c0 = thread_cpu();
            for _ in 0..rounds {
                efd_write(p_write);
                efd_read(p_read);
            }
            thread_cpu() - c0
        });
        let waiter = std::thread::spawn(move || {
            pin(0);
            let mut wait = waiter_for(mode, w_wait);
            let (c0, s0) = (thread_cpu(), thread_sleeps());
            for _ in 0..rounds {
                wait();
                efd_read(w_wait);
                efd_write(w_back);
            }
            (thread_cpu() - c0, thread_sleeps() - s0)
        });
        let (w_cpu, w_sleeps) = waiter.join().expect("waiter");
        let p_cpu = waker.join().expect("waker");
        let r = rounds as f64;
        println!(
            "{:<34} {:>14.1} {:>16.2} {:>14.1}",
            format!("{mode:?}"),
            w_cpu * 1e6 / r,
            w_sleeps as f64 / r,
            p_cpu * 1e6 / r
        );
        drop((a, b));
    }
}

/// A closure that blocks until `fd` is readable, the way `mode` waits.
fn waiter_for(mode: Wait, fd: std::os::fd::RawFd) -> Box<dyn FnMut()> {
    match mode {
        Wait::Epoll => {
            // SAFETY: epoll_create1 returns a new descriptor (checked);
            // epoll_ctl registers `fd`, which outlives the closure's use.
            let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            assert!(ep >= 0);
            let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: 0 };
            // SAFETY: as above.
            assert_eq!(unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) }, 0);
            Box::new(move || {
                let mut out = [libc::epoll_event { events: 0, u64: 0 }; 4];
                // SAFETY: epoll_wait writes at most 4 events into `out`.
                let n = unsafe { libc::epoll_wait(ep, out.as_mut_ptr(), 4, 1000) };
                assert!(n > 0, "epoll_wait: {n}");
            })
        }
        Wait::Poll => Box::new(move || {
            let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: poll reads and writes the one pollfd we own.
            let n = unsafe { libc::poll(&mut p, 1, 1000) };
            assert!(n > 0, "poll: {n}");
        }),
        Wait::Uring | Wait::UringPlain | Wait::UringArmed => {
            let mut b = io_uring::IoUring::<io_uring::squeue::Entry, io_uring::cqueue::Entry>::builder();
            if !matches!(mode, Wait::UringPlain) {
                b.setup_single_issuer().setup_defer_taskrun();
            }
            let mut ring = b.build(64).expect("io_uring");
            let no_iowait = ring.params().is_feature_no_iowait();
            let idle: Vec<std::os::fd::OwnedFd> =
                if matches!(mode, Wait::UringArmed) { (0..5000).map(|_| eventfd()).collect() } else { Vec::new() };
            for chunk in idle.chunks(32) {
                for f in chunk {
                    use std::os::fd::AsRawFd;
                    let p = io_uring::opcode::PollAdd::new(io_uring::types::Fd(f.as_raw_fd()), libc::POLLIN as u32)
                        .build()
                        .user_data(1);
                    // SAFETY: the entry refers to a descriptor the closure keeps open.
                    unsafe { ring.submission().push(&p) }.expect("sq full");
                }
                ring.submit().expect("submit");
            }
            Box::new(move || {
                let poll = io_uring::opcode::PollAdd::new(io_uring::types::Fd(fd), libc::POLLIN as u32).build();
                // SAFETY: the entry refers to `fd` only, which outlives it.
                unsafe { ring.submission().push(&poll) }.expect("sq full");
                let ts = io_uring::types::Timespec::new().sec(1);
                let args = io_uring::types::SubmitArgs::new().timespec(&ts);
                let flags = if no_iowait { io_uring::EnterFlags::NO_IOWAIT } else { io_uring::EnterFlags::empty() };
                ring.submitter().submit_with_args_and_flags(1, &args, flags).expect("enter");
                assert!(ring.completion().next().is_some(), "a completion");
                let _ = &idle;
            })
        }
    }
}
