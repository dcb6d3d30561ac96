//! A connection's input buffer: the bytes of a frame, head or packet that has
//! started but not finished arriving, with a consume offset.
//!
//! New bytes are appended; the parsers consume from the front; the consumed
//! prefix is dropped only when it is at least half the buffer. Each byte is
//! so copied a bounded number of times, and a 32 MiB query sent in 4 KiB
//! pieces costs linear, not quadratic, CPU (the first design copied the
//! whole pending tail on every read). An empty buffer holds no heap, so an
//! idle connection pins nothing; the buffer also remembers when its
//! unfinished input started, for `--message-timeout`.

/// Bytes received and not yet consumed.
#[derive(Debug, Default)]
pub struct InBuf {
    bytes: Vec<u8>,
    /// Bytes of `bytes` already consumed (u32: input is bounded far below
    /// 4 GiB by the message and query size limits; every idle connection
    /// carries this struct).
    start: u32,
    /// Shard time (seconds) + 1 the unfinished input started arriving; 0
    /// when nothing is pending.
    since: u32,
}

impl InBuf {
    /// Whether no unconsumed bytes are held.
    pub fn is_empty(&self) -> bool {
        self.start as usize == self.bytes.len()
    }

    /// Unconsumed bytes held.
    pub fn len(&self) -> usize {
        self.bytes.len() - self.start as usize
    }

    /// Appends received bytes.
    pub fn extend(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
    }

    /// The unconsumed bytes (mutable: the WebSocket decoder unmasks in place).
    pub fn pending(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start as usize..]
    }

    /// Marks `n` bytes at the front as consumed; `now` is the shard time,
    /// recorded as the start of whatever remains unfinished.
    pub fn consume(&mut self, n: usize, now: u32) {
        let start = (self.start as usize + n).min(self.bytes.len());
        if start == self.bytes.len() {
            // Nothing pending: give the memory back.
            *self = InBuf::default();
            return;
        }
        if n > 0 || self.since == 0 {
            self.since = now.saturating_add(1);
        }
        if start >= self.bytes.len() - start {
            self.bytes.drain(..start);
            self.start = 0;
        } else {
            self.start = start as u32;
        }
    }

    /// When the unfinished input started arriving (None when empty).
    pub fn since(&self) -> Option<u32> {
        self.since.checked_sub(1)
    }

    /// Drops everything held.
    pub fn clear(&mut self) {
        *self = InBuf::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumed_bytes_are_dropped_and_an_empty_buffer_holds_no_heap() {
        let mut b = InBuf::default();
        b.extend(b"hello world");
        b.consume(6, 1);
        assert_eq!(b.pending(), b"world");
        assert_eq!(b.since(), Some(1));
        b.consume(5, 2);
        assert!(b.is_empty());
        assert_eq!(b.bytes.capacity(), 0);
        assert_eq!(b.since(), None);
    }

    #[test]
    fn a_large_input_in_small_pieces_is_copied_a_bounded_number_of_times() {
        // Append 8 MiB in 4 KiB pieces, consuming nothing (one big packet):
        // the Vec's doubling copies each byte at most about twice; nothing
        // re-copies the pending tail per piece.
        let mut b = InBuf::default();
        let piece = [1u8; 4096];
        let mut reallocs = 0;
        let mut cap = 0;
        for _ in 0..2048 {
            b.extend(&piece);
            b.consume(0, 0);
            if b.bytes.capacity() != cap {
                cap = b.bytes.capacity();
                reallocs += 1;
            }
        }
        assert_eq!(b.len(), 8 << 20);
        assert!(reallocs <= 12, "{reallocs} reallocations");
    }

    #[test]
    fn the_start_time_is_that_of_the_oldest_unfinished_input() {
        let mut b = InBuf::default();
        b.extend(b"ab");
        b.consume(0, 5);
        b.extend(b"c");
        b.consume(0, 9);
        assert_eq!(b.since(), Some(5), "more bytes of the same frame keep its start");
        b.consume(1, 12);
        assert_eq!(b.since(), Some(12), "a new unfinished frame starts now");
    }
}
