//! Mailboxes between shards: one bounded lock-free SPSC ring per ordered pair.
//!
//! Shard *i* owns an [`Outbox`] holding the producer ends of the rings to every
//! other shard, and an [`Inbox`] holding the consumer ends of the rings from
//! them. A receiver drains all its rings in one pass. A sender rings the
//! receiver's [`Doorbell`] only when the receiver said it is about to park,
//! so a busy receiver costs senders one atomic swap per message and no
//! syscall. A full ring never blocks and never drops: the message waits in the
//! sender's local overflow queue and is retried in order.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;

/// Wakes a parked receiver; shared by all senders to one shard.
#[derive(Debug, Default)]
pub struct Doorbell {
    /// Set by the receiver just before it parks, cleared by whoever wakes it.
    parked: AtomicBool,
    waker: AtomicWaker,
}

impl Doorbell {
    /// Wakes the receiver if it is parked (after a message was pushed).
    pub fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.parked.swap(false, Ordering::SeqCst) {
            self.waker.wake();
        }
    }

    /// Wakes the receiver unconditionally (shutdown, control messages).
    pub fn force(&self) {
        self.parked.store(false, Ordering::SeqCst);
        self.waker.wake();
    }
}

/// The sending ends a shard holds, one per other shard.
pub struct Outbox<T> {
    /// `rings[j]`: the producer to shard j (None for ourselves).
    rings: Vec<Option<rtrb::Producer<T>>>,
    bells: Vec<Arc<Doorbell>>,
    /// Messages that found their ring full, kept in order per destination.
    overflow: Vec<VecDeque<T>>,
}

impl<T> Outbox<T> {
    /// Sends `msg` to shard `to`; never blocks, never drops.
    pub fn send(&mut self, to: usize, msg: T) {
        let Some(ring) = self.rings[to].as_mut() else {
            panic!("a shard cannot mail itself (shard {to})");
        };
        if !self.overflow[to].is_empty() {
            self.overflow[to].push_back(msg);
            self.retry(to);
            return;
        }
        match ring.push(msg) {
            Ok(()) => self.bells[to].ring(),
            Err(rtrb::PushError::Full(msg)) => self.overflow[to].push_back(msg),
        }
    }

    fn retry(&mut self, to: usize) {
        let Some(ring) = self.rings[to].as_mut() else {
            return;
        };
        let mut moved = false;
        while let Some(msg) = self.overflow[to].pop_front() {
            match ring.push(msg) {
                Ok(()) => moved = true,
                Err(rtrb::PushError::Full(msg)) => {
                    self.overflow[to].push_front(msg);
                    break;
                }
            }
        }
        if moved {
            self.bells[to].ring();
        }
    }

    /// Retries every overflow queue; returns whether any message still waits.
    pub fn retry_all(&mut self) -> bool {
        for to in 0..self.rings.len() {
            if !self.overflow[to].is_empty() {
                self.retry(to);
            }
        }
        self.has_overflow()
    }

    pub fn has_overflow(&self) -> bool {
        self.overflow.iter().any(|q| !q.is_empty())
    }

    /// Number of shards (including the owner).
    pub fn shards(&self) -> usize {
        self.rings.len()
    }
}

/// The receiving ends a shard holds, and its doorbell.
pub struct Inbox<T> {
    rings: Vec<rtrb::Consumer<T>>,
    bell: Arc<Doorbell>,
}

impl<T> Inbox<T> {
    /// Takes up to `max` messages from all rings, round-robin by ring.
    pub fn drain(&mut self, max: usize, mut f: impl FnMut(T)) -> usize {
        let mut n = 0;
        for ring in &mut self.rings {
            while n < max {
                match ring.pop() {
                    Ok(m) => {
                        f(m);
                        n += 1;
                    }
                    Err(_) => break,
                }
            }
        }
        n
    }

    fn any_waiting(&self) -> bool {
        self.rings.iter().any(|r| !r.is_empty())
    }

    /// Registers to be woken, then parks unless something arrived meanwhile.
    pub fn poll_park(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.bell.waker.register(cx.waker());
        self.bell.parked.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.any_waiting() {
            self.bell.parked.store(false, Ordering::SeqCst);
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Whether the doorbell was forced or rung while parked: used with
    /// [`Doorbell::force`] for control flags that live outside the rings.
    pub fn bell(&self) -> &Arc<Doorbell> {
        &self.bell
    }
}

/// Builds the full mesh for `n` shards: element i is shard i's (outbox, inbox).
pub fn mesh<T>(n: usize, capacity: usize) -> Vec<(Outbox<T>, Inbox<T>)> {
    let bells: Vec<Arc<Doorbell>> = (0..n).map(|_| Arc::new(Doorbell::default())).collect();
    let mut producers: Vec<Vec<Option<rtrb::Producer<T>>>> = (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    let mut consumers: Vec<Vec<rtrb::Consumer<T>>> = (0..n).map(|_| Vec::new()).collect();
    for (from, row) in producers.iter_mut().enumerate() {
        for (to, slot) in row.iter_mut().enumerate() {
            if from != to {
                let (p, c) = rtrb::RingBuffer::new(capacity);
                *slot = Some(p);
                consumers[to].push(c);
            }
        }
    }
    producers
        .into_iter()
        .zip(consumers)
        .enumerate()
        .map(|(i, (rings, inbound))| {
            (
                Outbox { rings, bells: bells.clone(), overflow: (0..n).map(|_| VecDeque::new()).collect() },
                Inbox { rings: inbound, bell: bells[i].clone() },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[test]
    fn full_ring_keeps_overflow_in_order_and_loses_nothing() {
        let mut m = mesh::<u32>(2, 4);
        let (mut inbox1, mut out0) = {
            let (o1, i1) = m.pop().unwrap();
            let (o0, _i0) = m.pop().unwrap();
            drop(o1);
            (i1, o0)
        };
        for i in 0..10 {
            out0.send(1, i);
        }
        assert!(out0.has_overflow());
        let mut got = Vec::new();
        while got.len() < 10 {
            inbox1.drain(100, |x| got.push(x));
            out0.retry_all();
        }
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        assert!(!out0.has_overflow());
    }

    #[test]
    fn parked_receiver_is_woken_across_threads() {
        let mut m = mesh::<u64>(2, 1024);
        let (_o1, mut inbox1) = m.pop().unwrap();
        let (mut out0, _i0) = m.pop().unwrap();
        let sender = std::thread::spawn(move || {
            for i in 0..100_000u64 {
                out0.send(1, i);
                if out0.has_overflow() {
                    while out0.retry_all() {
                        std::thread::yield_now();
                    }
                }
            }
        });
        let mut sum = 0u64;
        let mut count = 0u64;
        let rt = compio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            while count < 100_000 {
                count += inbox1.drain(4096, |x| sum += x) as u64;
                if count < 100_000 {
                    poll_fn(|cx| inbox1.poll_park(cx)).await;
                }
            }
        });
        sender.join().unwrap();
        assert_eq!(sum, (0..100_000u64).sum::<u64>());
    }
}
