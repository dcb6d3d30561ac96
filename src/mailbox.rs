//! Mailboxes between shards: one bounded lock-free SPSC ring per ordered pair.
//!
//! Shard *i* owns an [`Outbox`] holding the producer ends of the rings to every
//! other shard, and an [`Inbox`] holding the consumer ends of the rings from
//! them. A receiver drains all its rings in one pass. A sender rings the
//! receiver's [`Doorbell`] only when the receiver said it is about to park,
//! so a busy receiver costs senders one atomic swap per message and no
//! syscall. A full ring never blocks and never drops: the message waits in the
//! sender's local overflow queue and is retried in order.
//!
//! Mail is bounded in bytes per destination: every message has a
//! [`Weigh::weight`], a [`Lane`] counts what is in flight (ring and overflow),
//! and past `limit` the sender's outbox is *congested*, which tells the shard
//! to stop reading the clients whose commands make mail. The receiver, after
//! draining a lane whose sender waits, pokes the sender's doorbell, so the
//! sender resumes when space frees rather than by polling.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;

/// What a message costs a mailbox: its bytes, roughly, with its heap parts.
pub trait Weigh {
    fn weight(&self) -> usize;
}

/// The shared state of one ordered pair of shards.
#[derive(Debug, Default)]
pub struct Lane {
    /// Weight of the messages in flight (ring and the sender's overflow):
    /// added by the sender, subtracted by the receiver as it takes them.
    bytes: AtomicUsize,
    /// The sender waits for this lane to drain (it overflowed, or went over
    /// its limit); the receiver pokes the sender after draining.
    waiting: AtomicBool,
}

/// Wakes a parked receiver; shared by all senders to one shard.
#[derive(Debug, Default)]
pub struct Doorbell {
    /// Set by the receiver just before it parks, cleared by whoever wakes it.
    parked: AtomicBool,
    /// Set by a receiver that drained a lane this shard was waiting on: the
    /// shard must retry its overflow and re-check congestion.
    poked: AtomicBool,
    waker: AtomicWaker,
}

impl Doorbell {
    /// Tells the owner that a lane it waited on drained.
    pub fn poke(&self) {
        self.poked.store(true, Ordering::SeqCst);
        self.ring();
    }

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
    /// `lanes[j]`: what is in flight to shard j.
    lanes: Vec<Arc<Lane>>,
    /// Bytes in flight per destination before the outbox is congested.
    limit: usize,
    /// A destination went over `limit` (or overflowed its ring) and has not
    /// drained to half of it since.
    congested: bool,
}

impl<T: Weigh> Outbox<T> {
    /// Sends `msg` to shard `to`; never blocks, never drops.
    pub fn send(&mut self, to: usize, msg: T) {
        if self.rings[to].is_none() {
            panic!("a shard cannot mail itself (shard {to})");
        }
        let lane = &self.lanes[to];
        let in_flight = lane.bytes.fetch_add(msg.weight(), Ordering::SeqCst) + msg.weight();
        if in_flight > self.limit {
            self.congested = true;
            lane.waiting.store(true, Ordering::SeqCst);
        }
        if !self.overflow[to].is_empty() {
            self.overflow[to].push_back(msg);
            self.retry(to);
            return;
        }
        let Some(ring) = self.rings[to].as_mut() else { return };
        match ring.push(msg) {
            Ok(()) => self.bells[to].ring(),
            Err(rtrb::PushError::Full(msg)) => {
                self.overflow[to].push_back(msg);
                self.congested = true;
                self.lanes[to].waiting.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Sets the bytes in flight per destination past which the outbox is
    /// congested (`--mail-limit`).
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Whether the shard should stop reading the clients that make mail.
    pub fn is_congested(&self) -> bool {
        self.congested
    }

    /// Bytes in flight to shard `to`.
    pub fn in_flight(&self, to: usize) -> usize {
        self.lanes[to].bytes.load(Ordering::SeqCst)
    }

    /// After a poke: retries the overflow and re-checks congestion, which
    /// ends once every lane is at half its limit or less with no overflow.
    /// Returns true when congestion ended with this call.
    pub fn recheck(&mut self) -> bool {
        self.retry_all();
        if !self.congested {
            return false;
        }
        // Ask to be poked before looking, so a drain in between is not missed.
        for lane in &self.lanes {
            lane.waiting.store(true, Ordering::SeqCst);
        }
        let clear = !self.has_overflow() && self.lanes.iter().all(|l| l.bytes.load(Ordering::SeqCst) <= self.limit / 2);
        if clear {
            self.congested = false;
        }
        clear
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
    /// Per inbound ring: the consumer, its lane, and the sender's doorbell.
    rings: Vec<(rtrb::Consumer<T>, Arc<Lane>, Arc<Doorbell>)>,
    bell: Arc<Doorbell>,
}

impl<T: Weigh> Inbox<T> {
    /// Takes up to `max` messages from all rings, ring by ring; pokes each
    /// sender that waits on a lane this drained.
    pub fn drain(&mut self, max: usize, mut f: impl FnMut(T)) -> usize {
        let mut n = 0;
        for (ring, lane, sender) in &mut self.rings {
            let before = n;
            while n < max {
                match ring.pop() {
                    Ok(m) => {
                        let w = m.weight();
                        f(m);
                        lane.bytes.fetch_sub(w, Ordering::SeqCst);
                        n += 1;
                    }
                    Err(_) => break,
                }
            }
            if n > before && lane.waiting.swap(false, Ordering::SeqCst) {
                sender.poke();
            }
        }
        n
    }

    fn any_waiting(&self) -> bool {
        self.rings.iter().any(|(r, _, _)| !r.is_empty())
    }

    /// Whether any message waits to be drained.
    pub fn has_mail(&self) -> bool {
        self.any_waiting()
    }

    /// Registers to be woken, then parks unless something arrived meanwhile
    /// (mail, or a poke: then the owner must [`Outbox::recheck`]).
    pub fn poll_park(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.bell.waker.register(cx.waker());
        self.bell.parked.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.any_waiting() || self.bell.poked.swap(false, Ordering::SeqCst) {
            self.bell.parked.store(false, Ordering::SeqCst);
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Like [`Inbox::poll_park`], but waits for a poke (or a ring, or a
    /// force) even when mail is waiting: the owner does not take mail now
    /// (its own storage lane is full) and waits for whoever will poke it.
    pub fn poll_park_for_poke(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.bell.waker.register(cx.waker());
        self.bell.parked.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.bell.poked.swap(false, Ordering::SeqCst) {
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
/// The outboxes have no byte limit until [`Outbox::set_limit`].
pub fn mesh<T>(n: usize, capacity: usize) -> Vec<(Outbox<T>, Inbox<T>)> {
    let bells: Vec<Arc<Doorbell>> = (0..n).map(|_| Arc::new(Doorbell::default())).collect();
    let lanes: Vec<Vec<Arc<Lane>>> = (0..n).map(|_| (0..n).map(|_| Arc::new(Lane::default())).collect()).collect();
    let mut producers: Vec<Vec<Option<rtrb::Producer<T>>>> = (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    type Inbound<T> = Vec<(rtrb::Consumer<T>, Arc<Lane>, Arc<Doorbell>)>;
    let mut consumers: Vec<Inbound<T>> = (0..n).map(|_| Vec::new()).collect();
    for (from, row) in producers.iter_mut().enumerate() {
        for (to, slot) in row.iter_mut().enumerate() {
            if from != to {
                let (p, c) = rtrb::RingBuffer::new(capacity);
                *slot = Some(p);
                consumers[to].push((c, lanes[from][to].clone(), bells[from].clone()));
            }
        }
    }
    producers
        .into_iter()
        .zip(consumers)
        .zip(lanes)
        .enumerate()
        .map(|(i, ((rings, inbound), lanes))| {
            (
                Outbox {
                    rings,
                    bells: bells.clone(),
                    overflow: (0..n).map(|_| VecDeque::new()).collect(),
                    lanes,
                    limit: usize::MAX,
                    congested: false,
                },
                Inbox { rings: inbound, bell: bells[i].clone() },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    impl Weigh for u32 {
        fn weight(&self) -> usize {
            4
        }
    }

    impl Weigh for u64 {
        fn weight(&self) -> usize {
            8
        }
    }

    #[test]
    fn bytes_in_flight_congest_the_sender_until_the_receiver_drains_half() {
        let mut m = mesh::<u32>(2, 1024);
        let (_o1, mut inbox1) = m.pop().unwrap();
        let (mut out0, inbox0) = m.pop().unwrap();
        out0.set_limit(40);
        for i in 0..10 {
            out0.send(1, i);
        }
        assert!(!out0.is_congested(), "exactly at the limit");
        out0.send(1, 10);
        assert!(out0.is_congested());
        assert_eq!(out0.in_flight(1), 44);
        assert!(!out0.recheck(), "nothing drained yet");
        // The receiver takes 5 (24 bytes left, over half the limit).
        let mut got = Vec::new();
        inbox1.drain(5, |x| got.push(x));
        assert!(inbox0.bell().poked.load(Ordering::SeqCst), "the drain pokes the waiting sender");
        assert!(!out0.recheck());
        inbox1.drain(100, |x| got.push(x));
        assert!(out0.recheck(), "congestion ends at half the limit");
        assert_eq!(got, (0..11).collect::<Vec<_>>());
        assert_eq!(out0.in_flight(1), 0);
    }

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

    #[test]
    fn parking_for_a_poke_waits_with_mail_in_the_ring_until_poked() {
        use std::task::{Wake, Waker};
        struct Flag(AtomicBool);
        impl Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let mut m = mesh::<u32>(2, 16);
        let (_o1, inbox1) = m.pop().unwrap();
        let (mut out0, _i0) = m.pop().unwrap();
        out0.send(1, 7);
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        // Mail waits: an ordinary park returns at once, a park for a poke
        // does not (the owner takes no mail now).
        assert!(inbox1.poll_park(&mut cx).is_ready());
        assert!(inbox1.poll_park_for_poke(&mut cx).is_pending());
        // The poke (the storage thread took the lane) wakes it, and the
        // next park for a poke sees it.
        inbox1.bell().poke();
        assert!(flag.0.load(Ordering::SeqCst));
        assert!(inbox1.poll_park_for_poke(&mut cx).is_ready());
        // A poke that came before the park is not lost.
        inbox1.bell().poke();
        assert!(inbox1.poll_park_for_poke(&mut cx).is_ready());
        assert!(inbox1.poll_park_for_poke(&mut cx).is_pending());
    }
}
