//! `--write-delay`: when each held connection's output is written.
//!
//! A connection's window opens with the first channel message queued for it
//! and ends at its own deadline; whatever it was queued by then leaves in
//! one write. Deadlines are not one per shard: on a hot channel every
//! subscriber's window opens in the same fan-out pass, and ending them all
//! at once put a whole fan-out's writes (2,000 sends with two frames each)
//! into one burst, which the readers then drained for longer than the
//! window itself (bench/RESULTS.md, "Hot channel"). So connections are
//! split into [`SLICES`] slices by slot, and a slice's windows end a little
//! late, by its share of the spread: the writes of one fan-out go out
//! paced over the spread after the window, not in one burst.
//!
//! The rule, for a frame first queued in millisecond `t` on a connection of
//! slice `j`: the connection is written at `t + 1 + window + j * spread /
//! SLICES` (from the end of that millisecond), where
//! `spread` is half the window, at most [`MAX_SPREAD_MS`]. So no window is
//! shorter than asked (a connection is written at most once per window for
//! its channel messages, the CPU saving), and none is longer than
//! `window + spread + 1` ms. Late rather than early: windows that ended early
//! caught fewer messages (measured: at 100 messages a second and 20 ms,
//! 0.52 to 0.65 of the CPU per delivery without the delay, against 0.39
//! to 0.46 with one end for all; bench/RESULTS.md).
//!
//! Pure: the core holds connections with its clock's `now_ms`, the I/O
//! layer asks for the next deadline to sleep until and takes what is due.

use std::collections::VecDeque;

use super::ConnId;

/// How many groups the connections are split into, each with its own end
/// of window. More slices pace writes more evenly and cost more timer
/// wake-ups (at most one per slice per window).
pub const SLICES: usize = 8;

/// Longest time by which a window may end late. Half a 20 ms window is
/// enough to pace 2,000 sends on this machine (about 10 ms of work); a long
/// window (hundreds of milliseconds) ends at most this much later than
/// asked.
pub const MAX_SPREAD_MS: u64 = 25;

/// The connections whose channel messages are held, by slice; each slice in
/// deadline order (its connections' windows all have the same length, and
/// open in time order).
#[derive(Debug, Default)]
pub struct WriteDelay {
    window_ms: u64,
    spread_ms: u64,
    slices: [VecDeque<(u64, ConnId)>; SLICES],
    held: usize,
}

impl WriteDelay {
    /// A delay with `window_ms` (0: off, nothing is ever held).
    pub fn new(window_ms: u64) -> WriteDelay {
        WriteDelay { window_ms, spread_ms: (window_ms / 2).min(MAX_SPREAD_MS), ..WriteDelay::default() }
    }

    /// Whether channel messages are held at all.
    pub fn is_on(&self) -> bool {
        self.window_ms > 0
    }

    /// The slice of a connection: by its slot, so that the connections of
    /// one channel spread evenly.
    fn slice_of(id: ConnId) -> usize {
        id.index as usize % SLICES
    }

    /// When a window opened at `now_ms` ends for connection `id`.
    ///
    /// The shard's clock counts whole milliseconds, so a window "opened at
    /// `now_ms`" opened up to 1 ms after it: ending it at `now_ms + window`
    /// made it up to 1 ms shorter than asked, and on a channel with a
    /// steady rate the message that arrives one window after the first (at
    /// 100 a second and 20 ms, the third) could miss it. Counted from the
    /// next millisecond, no window is shorter than asked. (On the
    /// hot-channel bench the CPU per delivery did not move beyond the
    /// machine's spread: bench/RESULTS.md.)
    pub fn deadline(&self, id: ConnId, now_ms: u64) -> u64 {
        let late = Self::slice_of(id) as u64 * self.spread_ms / SLICES as u64;
        now_ms + 1 + self.window_ms + late
    }

    /// Connection `id`'s queue turned non-empty at `now_ms`: its window
    /// opens. Called once per window (the queue stays non-empty until the
    /// connection is written), so a connection is held at most once at a
    /// time unless something else wrote it meanwhile (an answer to a
    /// command takes the held frames along; the stale entry then ends in
    /// an empty write). So a client holds at most one entry per write it
    /// caused within a window, which `--client-rate` bounds.
    pub fn hold(&mut self, id: ConnId, now_ms: u64) {
        let at = self.deadline(id, now_ms);
        let slice = &mut self.slices[Self::slice_of(id)];
        // Deadlines of one slice come in order as long as the clock does;
        // a clock that stepped back (it is monotonic) would only end this
        // window with the ones before it.
        let at = slice.back().map_or(at, |&(last, _)| at.max(last));
        slice.push_back((at, id));
        self.held += 1;
    }

    /// Connections held (one entry per opened window).
    pub fn len(&self) -> usize {
        self.held
    }

    pub fn is_empty(&self) -> bool {
        self.held == 0
    }

    /// The earliest deadline of any held connection.
    pub fn next_deadline(&self) -> Option<u64> {
        self.slices.iter().filter_map(|s| s.front().map(|&(at, _)| at)).min()
    }

    /// Moves every connection whose window ended by `now_ms` to `out`
    /// (the core's dirty list).
    pub fn take_due(&mut self, now_ms: u64, out: &mut Vec<ConnId>) {
        for slice in &mut self.slices {
            while let Some(&(at, id)) = slice.front() {
                if at > now_ms {
                    break;
                }
                slice.pop_front();
                out.push(id);
                self.held -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(index: u32) -> ConnId {
        ConnId { index, generation: 0 }
    }

    #[test]
    fn the_ends_of_window_spread_over_half_a_short_window_after_it() {
        let mut d = WriteDelay::new(20);
        for i in 0..16 {
            d.hold(conn(i), 1000);
        }
        assert_eq!(d.len(), 16);
        // From the end of ms 1000, slice j ends 10 * j / 8 ms late: 1021,
        // 1022, 1023, 1024, 1026, ...
        let mut ends = Vec::new();
        let mut now = 1000;
        while let Some(at) = d.next_deadline() {
            assert!(at > now, "deadlines move forward");
            now = at;
            let mut due = Vec::new();
            d.take_due(now, &mut due);
            due.sort_by_key(|c| c.index);
            ends.push((now, due.iter().map(|c| c.index).collect::<Vec<_>>()));
        }
        assert_eq!(
            ends,
            [
                (1021, vec![0, 8]),
                (1022, vec![1, 9]),
                (1023, vec![2, 10]),
                (1024, vec![3, 11]),
                (1026, vec![4, 12]),
                (1027, vec![5, 13]),
                (1028, vec![6, 14]),
                (1029, vec![7, 15]),
            ]
        );
        assert!(d.is_empty());
    }

    #[test]
    fn no_window_is_shorter_than_asked_nor_longer_than_the_window_and_the_spread() {
        for window in [1, 2, 5, 20, 100, 300, 1000] {
            let d = WriteDelay::new(window);
            let spread = (window / 2).min(MAX_SPREAD_MS);
            for i in 0..SLICES as u32 {
                // Opened anywhere within ms 5000: counted from its end.
                let wait = d.deadline(conn(i), 5000) - 5001;
                assert!(wait >= window && wait <= window + spread, "window {window}, slice {i}: {wait}");
            }
            // A long window ends at most 25 ms late.
            assert!(d.deadline(conn(SLICES as u32 - 1), 0) <= 1 + window + MAX_SPREAD_MS);
        }
        assert!(!WriteDelay::new(0).is_on());
    }

    #[test]
    fn a_connection_is_due_only_once_its_own_window_ended() {
        let mut d = WriteDelay::new(20);
        d.hold(conn(0), 0);
        d.hold(conn(1), 5);
        // conn 1's window opened later and ends late by its slice's share.
        assert_eq!(d.deadline(conn(1), 5), 27);
        let mut due = Vec::new();
        d.take_due(20, &mut due);
        assert!(due.is_empty(), "20 ms from ms 0's start, not from its end");
        d.take_due(21, &mut due);
        assert_eq!(due, [conn(0)]);
        assert_eq!(d.next_deadline(), Some(27));
        d.take_due(26, &mut due);
        assert_eq!(due, [conn(0)]);
        d.take_due(27, &mut due);
        assert_eq!(due, [conn(0), conn(1)]);
        assert_eq!(d.next_deadline(), None);
    }
}
