//! `connect --inflight K`: K handshakes in flight per client thread, on
//! non-blocking sockets, the way a reconnect storm brings them: the server
//! finds several connections ready when it wakes instead of one. With
//! K = 1 the scenario stays latency-bound (one client waits for each
//! answer), the shape of the earlier figures.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::target::{Kind, Target, Via};
use crate::wire;

/// Seconds without any progress after which the handshakes still open
/// count as failed.
const STALL: Duration = Duration::from_secs(15);

/// Where one handshake is.
enum Stage {
    /// Waiting for the connect to finish (writable), then writing the request.
    Sending { written: usize },
    /// Reading the 101 head (and comet's `serverInfo`).
    Reading,
}

/// One handshake in flight.
struct Hs {
    sock: TcpStream,
    request: Vec<u8>,
    /// comet with `--subscribe message`: sent after `serverInfo`.
    command: Option<String>,
    stage: Stage,
    buf: Vec<u8>,
}

/// A non-blocking connect from 127.0.0.`source`.
fn start_connect(server: &SocketAddr, source: u8) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let local: SocketAddr = format!("127.0.0.{source}:0").parse().expect("address");
    sock.bind(&local.into())?;
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    match sock.connect(&(*server).into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(sock.into())
}

/// Where a handshake got to after an event.
enum Progress {
    More,
    Done,
    Failed,
}

impl Hs {
    /// Writes what is left of the request; true once all of it is out.
    fn send(&mut self) -> std::io::Result<bool> {
        let Stage::Sending { written } = &mut self.stage else { return Ok(true) };
        if let Some(e) = self.sock.take_error()? {
            return Err(e);
        }
        while *written < self.request.len() {
            match self.sock.write(&self.request[*written..]) {
                Ok(n) => *written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        self.stage = Stage::Reading;
        Ok(true)
    }

    /// Reads what arrived: done after the 101 (and comet's first frame).
    fn read(&mut self, comet: bool, scratch: &mut [u8]) -> Progress {
        loop {
            match self.sock.read(scratch) {
                Ok(0) => return Progress::Failed,
                Ok(n) => self.buf.extend_from_slice(&scratch[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return Progress::Failed,
            }
        }
        let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) else {
            return if self.buf.len() > 8192 { Progress::Failed } else { Progress::More };
        };
        if !self.buf.starts_with(b"HTTP/1.1 101") {
            return Progress::Failed;
        }
        if comet && wire::parse_frame(&self.buf[end..]).is_none() {
            return Progress::More;
        }
        if let Some(c) = self.command.take() {
            let mut v = Vec::with_capacity(c.len() + 14);
            wire::encode_masked(0x1, c.as_bytes(), &mut v);
            // A few dozen bytes on a fresh socket: the send buffer takes them.
            if self.sock.write(&v).ok() != Some(v.len()) {
                return Progress::Failed;
            }
        }
        Progress::Done
    }
}

/// Opens subscribers `range` of channel `channel`, `k` at a time; returns
/// the open sockets and the number that failed.
pub fn open_range(
    t: &Target,
    range: std::ops::Range<usize>,
    k: usize,
    via: Via,
    channel: &str,
    source: impl Fn(usize) -> u8,
) -> (Vec<TcpStream>, u64) {
    let poller = polling::Poller::new().expect("poller");
    let comet = t.kind == Kind::Comet;
    let mut slots: Vec<Option<Hs>> = (0..k.max(1)).map(|_| None).collect();
    let (mut open, mut failed) = (Vec::with_capacity(range.len()), 0u64);
    let mut next = range.start;
    let mut events = polling::Events::new();
    let mut scratch = vec![0u8; 16 * 1024];
    // Fills free slots with new handshakes (a failed connect counts and
    // the slot takes the next one).
    let fill = |slots: &mut Vec<Option<Hs>>, next: &mut usize, failed: &mut u64| {
        for (key, slot) in slots.iter_mut().enumerate() {
            while slot.is_none() && *next < range.end {
                let i = *next;
                *next += 1;
                let (path, command) = t.subscriber_request(channel, &format!("c{i}"), via);
                match start_connect(&t.front, source(i)) {
                    Ok(sock) => {
                        // SAFETY: the socket is deleted from the poller
                        // before it is dropped or kept (see `finish`).
                        if unsafe { poller.add(&sock, polling::Event::writable(key)) }.is_err() {
                            *failed += 1;
                            continue;
                        }
                        let request = wire::upgrade_request(&path).into_bytes();
                        *slot =
                            Some(Hs { sock, request, command, stage: Stage::Sending { written: 0 }, buf: Vec::new() });
                    }
                    Err(_) => *failed += 1,
                }
            }
        }
    };
    fill(&mut slots, &mut next, &mut failed);
    while slots.iter().any(Option::is_some) {
        events.clear();
        match poller.wait(&mut events, Some(STALL)) {
            Ok(0) => {
                // Nothing moved for STALL: what is still open failed.
                for s in slots.iter_mut() {
                    if let Some(h) = s.take() {
                        let _ = poller.delete(&h.sock);
                        failed += 1;
                    }
                }
                fill(&mut slots, &mut next, &mut failed);
                continue;
            }
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("poll: {e}"),
        }
        let keys: Vec<usize> = events.iter().map(|e| e.key).collect();
        for key in keys {
            let Some(h) = slots[key].as_mut() else { continue };
            let outcome = match h.send() {
                Err(_) => Progress::Failed,
                Ok(false) => Progress::More,
                Ok(true) => h.read(comet, &mut scratch),
            };
            let h = slots[key].as_mut().expect("slot");
            match outcome {
                Progress::More => {
                    let ev = match h.stage {
                        Stage::Sending { .. } => polling::Event::writable(key),
                        Stage::Reading => polling::Event::readable(key),
                    };
                    if poller.modify(&h.sock, ev).is_err() {
                        let h = slots[key].take().expect("slot");
                        let _ = poller.delete(&h.sock);
                        failed += 1;
                    }
                }
                Progress::Done | Progress::Failed => {
                    let h = slots[key].take().expect("slot");
                    let _ = poller.delete(&h.sock);
                    if matches!(outcome, Progress::Done) {
                        open.push(h.sock);
                    } else {
                        failed += 1;
                    }
                }
            }
        }
        fill(&mut slots, &mut next, &mut failed);
    }
    (open, failed)
}
