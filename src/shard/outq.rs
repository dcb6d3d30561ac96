//! A connection's outbound queue: shared frames waiting to be written, and
//! what they cost in memory.
//!
//! Frames are `Arc<[u8]>`: a publish is encoded once and the same bytes are
//! queued to every subscriber, so queuing is a reference-count increment and
//! one slot. One frame fits inline (the usual fan-out round queues one
//! message per subscriber), so that case allocates nothing per subscriber.
//!
//! The bound (`--outbound-limit`) is on [`OutQueue::cost`], which counts each
//! frame's bytes *plus* [`FRAME_OVERHEAD`]: a client that floods pings and
//! never reads queues many two-byte pongs, and counting only frame bytes let
//! such a client pin 34 MiB of headers and slots under a 1 MiB bound. No I/O
//! here: the I/O layer asks for [`OutQueue::slices`] and reports what it
//! wrote with [`OutQueue::advance`].

use std::io::IoSlice;
use std::sync::Arc;

use smallvec::SmallVec;

/// Memory a queued frame costs beyond its bytes: the `Arc` header (two
/// counters), the allocator's rounding, and the 16-byte slot in the queue.
pub const FRAME_OVERHEAD: usize = 64;

/// Frames handed to one vectored write at most.
pub const MAX_IOV: usize = 64;

/// The frames waiting for one connection, oldest first.
#[derive(Debug, Default)]
pub struct OutQueue {
    /// Frames from `frames[head]` on are unwritten; the first may be partly
    /// written. Written frames are released in batches (see `advance`).
    frames: SmallVec<[Arc<[u8]>; 1]>,
    /// Index of the first unwritten frame (a queue without moves).
    head: u32,
    /// Bytes of `frames[head]` already written.
    offset: u32,
    /// Memory charged for the unwritten frames (bytes + overhead each);
    /// u32 because every bound on it is far below 4 GiB and every idle
    /// connection carries this struct.
    cost: u32,
    /// `--write-delay`: when this queue's window opened, or when its last
    /// one ended (see [`super::delay::Mark`]). Kept here, where it fills
    /// the struct's padding, rather than in `Conn`, which it would grow.
    pub window: super::delay::Mark,
}

impl OutQueue {
    /// Whether nothing waits to be written.
    pub fn is_empty(&self) -> bool {
        self.head as usize >= self.frames.len()
    }

    /// Memory charged for what waits: the figure `--outbound-limit` bounds.
    pub fn cost(&self) -> usize {
        self.cost as usize
    }

    /// What queuing `frame` would add to [`OutQueue::cost`].
    pub fn cost_of(frame: &[u8]) -> usize {
        frame.len() + FRAME_OVERHEAD
    }

    /// Queues a frame; returns true if the queue was empty before.
    pub fn push(&mut self, frame: Arc<[u8]>) -> bool {
        let was_empty = self.is_empty();
        self.cost = self.cost.saturating_add(Self::cost_of(&frame) as u32);
        self.frames.push(frame);
        was_empty
    }

    /// Bytes of the front frame already written (its cost is released
    /// only with its last byte).
    pub fn front_written(&self) -> usize {
        self.offset as usize
    }

    /// Whether the front frame is partly written (a close frame must wait
    /// for it, or the stream would be corrupt).
    pub fn front_started(&self) -> bool {
        self.offset > 0
    }

    /// The unwritten bytes, as at most [`MAX_IOV`] slices, for one write.
    pub fn slices(&self) -> SmallVec<[IoSlice<'_>; MAX_IOV]> {
        let off = self.offset as usize;
        self.frames[self.head as usize..]
            .iter()
            .take(MAX_IOV)
            .enumerate()
            .map(|(i, f)| IoSlice::new(if i == 0 { &f[off..] } else { &f[..] }))
            .collect()
    }

    /// The unwritten part of the front frame, when it is the only one (the
    /// common fan-out case: a plain send, no iovec array).
    pub fn single(&self) -> Option<&[u8]> {
        (self.frames.len() == self.head as usize + 1).then(|| &self.frames[self.head as usize][self.offset as usize..])
    }

    /// Records that `n` bytes from the front were written.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.frames.get(self.head as usize) else {
                break;
            };
            let left = front.len() - self.offset as usize;
            if n >= left {
                n -= left;
                self.cost = self.cost.saturating_sub(Self::cost_of(front) as u32);
                self.head += 1;
                self.offset = 0;
            } else {
                self.offset += n as u32;
                n = 0;
            }
        }
        if self.is_empty() {
            // An idle connection keeps no queue allocation (its window's
            // mark stays: it tells whether a stream goes on).
            *self = OutQueue { window: self.window, ..OutQueue::default() };
        } else {
            // Release written frames now and then, so a long backlog
            // neither keeps them alive nor grows without bound.
            let head = self.head as usize;
            if head >= 32 && head * 2 >= self.frames.len() {
                self.frames.drain(..head);
                self.head = 0;
            }
        }
    }

    /// Drops every frame not yet started; keeps a partly written front frame
    /// (it must be finished before anything else goes out), and an unwritten
    /// front that is the upgrade's `101` answer (a close frame without it
    /// would reach a client still waiting for its handshake).
    pub fn drop_unstarted(&mut self) {
        let keep = |f: &[u8]| f.starts_with(b"HTTP/1.1 101 ");
        let front = self.frames.get(self.head as usize).filter(|f| self.front_started() || keep(f)).cloned();
        let offset = self.offset;
        *self = OutQueue { window: self.window, ..OutQueue::default() };
        if let Some(f) = front {
            self.push(f);
            self.offset = offset;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Arc<[u8]> {
        vec![7u8; n].into()
    }

    #[test]
    fn cost_counts_overhead_per_frame_and_is_released_as_written() {
        let mut q = OutQueue::default();
        assert!(q.push(frame(2)));
        assert!(!q.push(frame(10)));
        assert_eq!(q.cost(), 2 + 10 + 2 * FRAME_OVERHEAD);
        q.advance(1);
        assert_eq!(q.cost(), 2 + 10 + 2 * FRAME_OVERHEAD, "a partly written frame is still charged");
        assert!(q.front_started());
        q.advance(1);
        assert_eq!(q.cost(), 10 + FRAME_OVERHEAD);
        q.advance(10);
        assert!(q.is_empty());
        assert_eq!(q.cost(), 0);
    }

    #[test]
    fn a_pong_flood_is_charged_for_its_headers_not_just_its_bytes() {
        // 1 MiB of two-byte pongs used to be 512k frames; now the bound is
        // reached after 1 MiB / 66 of them.
        let mut q = OutQueue::default();
        let limit = 1 << 20;
        let mut n = 0;
        while q.cost() + OutQueue::cost_of(&[0, 0]) <= limit {
            q.push(frame(2));
            n += 1;
        }
        assert_eq!(n, limit / (2 + FRAME_OVERHEAD));
    }

    #[test]
    fn slices_start_inside_a_partly_written_frame_and_are_capped() {
        let mut q = OutQueue::default();
        for i in 0..100u8 {
            q.push(vec![i; 4].into());
        }
        q.advance(6);
        let s = q.slices();
        assert_eq!(s.len(), MAX_IOV);
        assert_eq!(&*s[0], &[1, 1]);
        assert_eq!(&*s[1], &[2, 2, 2, 2]);
        assert!(q.single().is_none());
    }

    #[test]
    fn drop_unstarted_keeps_only_the_started_front() {
        let mut q = OutQueue::default();
        q.push(frame(10));
        q.push(frame(10));
        q.advance(3);
        q.drop_unstarted();
        assert_eq!(q.single().map(<[u8]>::len), Some(7));
        assert_eq!(q.cost(), 10 + FRAME_OVERHEAD);
        let mut q = OutQueue::default();
        q.push(frame(10));
        q.drop_unstarted();
        assert!(q.is_empty());
        // The upgrade's answer, not yet written, stays ahead of a close.
        let mut q = OutQueue::default();
        q.push(Arc::from(&b"HTTP/1.1 101 Switching Protocols\r\n\r\n"[..]));
        q.push(frame(10));
        q.drop_unstarted();
        assert_eq!(q.single().map(<[u8]>::len), Some(36));
    }

    #[test]
    fn written_frames_are_released_in_batches() {
        let mut q = OutQueue::default();
        for _ in 0..100 {
            q.push(frame(1));
        }
        q.advance(60);
        assert!(q.frames.len() <= 40 + 1, "released: {}", q.frames.len());
        assert_eq!(q.slices().len(), 40);
    }
}
