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
#[derive(Default)]
pub struct Charge {
    pool: Option<Arc<AnswerMemory>>,
    bytes: usize,
}

impl Charge {
    /// `bytes` counted in `pool`.
    pub fn new(pool: &Arc<AnswerMemory>, bytes: usize) -> Charge {
        pool.used.fetch_add(bytes, Ordering::Relaxed);
        Charge { pool: Some(pool.clone()), bytes }
    }

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

    /// Takes over what `other` counts, without counting it twice.
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
        let a = Charge::new(&pool, 300);
        let b = Charge::new(&pool, 200);
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
        let mut held = Charge::new(&p, 1);
        held.absorb(Charge::new(&q, 5));
        assert_eq!((p.used(), q.used(), held.bytes()), (1, 0, 1));
    }
}
