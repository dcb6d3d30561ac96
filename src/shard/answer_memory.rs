//! `--answer-memory-limit`: the bytes of CometQL and HTTP API answers the
//! whole process holds, for every backend connection together.
//!
//! One connection's answers are bounded on its own shard (16x
//! `--outbound-limit`, see `ShardCore::sql_answer_limit`), but 256 backend
//! connections each at that bound would hold gigabytes. This pool counts
//! what they hold together, from the moment a shard starts building a part
//! of an answer (the part carries a [`Charge`] through the mailboxes)
//! until the connection's queue drained or the connection went. A shard
//! reserves what is left of the pool, up to a connection's bound, before
//! it builds a part ([`Charge::reserve`]), so shards building at once
//! cannot pass the limit together; it keeps what the part weighs, and a
//! part that does not fit gets ERR 1037 instead of being built.
//!
//! Rows that come from Redis (`--redis`: other nodes' subscribers, offline
//! queues kept there) are counted only once they are results waiting at
//! the connection.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The process-wide count of answer bytes held, and its bound.
///
/// One atomic counter that every shard adds to and takes from, without a
/// lock or a message: a part is built on one shard and held on another,
/// and the check before building must see what all of them hold now.
#[derive(Debug)]
pub struct AnswerMemory {
    used: AtomicUsize,
    limit: usize,
}

impl AnswerMemory {
    /// An empty pool of `limit` bytes (`--answer-memory-limit`).
    pub fn new(limit: usize) -> Arc<AnswerMemory> {
        Arc::new(AnswerMemory { used: AtomicUsize::new(0), limit })
    }

    /// Bytes held now, over all backend connections and parts in flight.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The bound, `--answer-memory-limit`.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes a new part of an answer may still take.
    pub fn room(&self) -> usize {
        self.limit.saturating_sub(self.used())
    }
}

/// Bytes counted in an [`AnswerMemory`] for as long as the charge lives:
/// dropping it (the answer sent, the connection gone, a reply thrown
/// away) gives them back.
///
/// A guard rather than a number, so that no path that drops an answer
/// (a closed connection, a failed store write, mail thrown away at
/// shutdown) can forget to give its bytes back. The pool is optional so
/// that an empty charge, which every backend connection and gather starts
/// with, costs no reference count.
#[derive(Default)]
pub struct Charge {
    pool: Option<Arc<AnswerMemory>>,
    bytes: usize,
}

impl Charge {
    /// What is left of the pool, up to `want` bytes, counted at once: a
    /// budget for building a part that no other shard can take meanwhile.
    /// Shrink it to what the part weighs with [`Charge::set`].
    pub fn reserve(pool: &Arc<AnswerMemory>, want: usize) -> Charge {
        let mut took = 0;
        let _ = pool.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
            took = want.min(pool.limit.saturating_sub(used));
            Some(used + took)
        });
        Charge { pool: Some(pool.clone()), bytes: took }
    }

    /// Bytes counted.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Counts `bytes` instead of what was counted so far.
    pub fn set(&mut self, pool: &Arc<AnswerMemory>, bytes: usize) {
        let pool = self.pool.get_or_insert_with(|| pool.clone());
        if bytes > self.bytes {
            pool.used.fetch_add(bytes - self.bytes, Ordering::Relaxed);
        } else {
            pool.used.fetch_sub(self.bytes - bytes, Ordering::Relaxed);
        }
        self.bytes = bytes;
    }

    /// Takes over what `other` counts, without counting it twice. A charge
    /// of another pool (no such thing in one process) is not taken over:
    /// dropped, it gives its bytes back to its own pool.
    pub fn absorb(&mut self, mut other: Charge) {
        if other.bytes == 0 {
            return;
        }
        match (&self.pool, &other.pool) {
            (Some(a), Some(b)) if !Arc::ptr_eq(a, b) => return,
            (None, _) => self.pool = other.pool.take(),
            _ => {}
        }
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.used.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

impl fmt::Debug for Charge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Charge({} bytes)", self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_counts_until_dropped_and_moves_without_counting_twice() {
        let pool = AnswerMemory::new(1000);
        let (mut a, mut b) = (Charge::default(), Charge::default());
        a.set(&pool, 300);
        b.set(&pool, 200);
        assert_eq!((pool.used(), pool.room()), (500, 500));
        let mut held = Charge::default();
        held.absorb(a);
        held.absorb(b);
        assert_eq!((held.bytes(), pool.used()), (500, 500));
        held.set(&pool, 1200);
        assert_eq!((pool.used(), pool.room()), (1200, 0));
        held.set(&pool, 40);
        assert_eq!(pool.used(), 40);
        drop(held);
        assert_eq!(pool.used(), 0);
    }

    #[test]
    fn reservations_never_pass_the_limit_together() {
        let pool = AnswerMemory::new(1000);
        let a = Charge::reserve(&pool, 600);
        let mut b = Charge::reserve(&pool, 600);
        let c = Charge::reserve(&pool, 600);
        assert_eq!((a.bytes(), b.bytes(), c.bytes(), pool.used()), (600, 400, 0, 1000));
        b.set(&pool, 150);
        assert_eq!(Charge::reserve(&pool, 600).bytes(), 250);
        drop((a, b, c));
        assert_eq!(pool.used(), 0);
    }

    #[test]
    fn a_charge_from_another_pool_is_not_taken_over() {
        let (p, q) = (AnswerMemory::new(10), AnswerMemory::new(10));
        let (mut held, mut other) = (Charge::default(), Charge::default());
        held.set(&p, 1);
        other.set(&q, 5);
        held.absorb(other);
        assert_eq!((p.used(), q.used(), held.bytes()), (1, 0, 1));
    }
}
