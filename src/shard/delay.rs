//! `--write-delay`: when each held connection's output is written.
//!
//! A channel message queued to a connection with nothing queued opens that
//! connection's window; what it is queued until the window ends leaves in
//! one write. Three rules decide when a window ends.
//!
//! - **It may end on an arrival.** At a steady rate the message that comes
//!   one window after the first (at 100 a second and 20 ms, the third) is
//!   due exactly at the window's end. Catching it is what halves the CPU
//!   (three messages per write instead of two), and waiting for it past
//!   the end is what pushed the p99 over the delay. In the shard's clock
//!   (whole milliseconds), a window opened in millisecond `t` ends at
//!   `t + window`. A message queued to the connection from `t + window -
//!   margin` on (the margin is `1 + window / 10` ms) ends the window then
//!   and there, and goes along; and a whole window waits as long past its
//!   end for one (its deadline is the end of millisecond `t + window +
//!   margin`), so a message a little late also goes along.
//! - **First windows are staggered.** A hot channel queues its message to
//!   every subscriber in the same fan-out pass, so all their windows would
//!   open and end together, and each end would be one burst of a whole
//!   fan-out's writes that the readers must then drain. A window that opens
//!   after a quiet spell (its connection's last window opened two windows
//!   and two margins ago or more) is shortened by the connection's group:
//!   the connections are split into [`GROUPS`], and group `j`'s first
//!   windows last `j / (GROUPS - 1)` of the window (group 0 is written at
//!   the next millisecond, the last group waits the whole window). Later
//!   windows, opened while the stream goes on, are whole, so each group
//!   keeps the phase its first window gave it: at 100 messages a second
//!   and 20 ms, each arrival ends the windows of part of the subscribers
//!   instead of all of them every third arrival.
//! - **Each round starts afresh.** Groups only ever fall into step: a
//!   window that misses its last message (it came later than the margin)
//!   moves its group's phase onto another group's, and the two then end
//!   their windows together. So the shard's clock is cut into rounds (ten
//!   windows, at least [`MIN_ROUND_MS`]), a connection's first window to
//!   open in a new round is a first window too, and the groups are drawn
//!   afresh each round (from the slot and the round, hashed), so that
//!   connections in step split again. It costs one shortened window per
//!   connection a round.
//!
//! No message waits longer than the window, the margin and the rest of its
//! first millisecond (24 ms for 20).
//!
//! A connection carries one `u32` for this, its [`Mark`]: the millisecond
//! its window opened in, and whether it is still open. The entries here
//! are checked against it, so an entry whose window ended on an arrival, or
//! whose frames an answer took along, ends nothing.
//!
//! Pure: the core holds connections with its clock's `now_ms`, the I/O
//! layer asks for the next deadline to sleep until and ends what is due.

use std::collections::VecDeque;

use super::ConnId;

/// How many groups the connections are split into, each with its own
/// length of first window. More groups pace a hot channel's writes in
/// smaller steps and cost more timer wake-ups when a stream starts (at
/// most one per group).
pub const GROUPS: usize = 8;
const _: () = assert!(GROUPS.is_power_of_two(), "a group is drawn from the top bits of a hash");

/// Groups start afresh every this many windows: each time costs a
/// connection one shortened window.
pub const ROUND_WINDOWS: u64 = 10;
/// ... and at most every this many milliseconds (short windows).
pub const MIN_ROUND_MS: u64 = 250;

/// A connection's `--write-delay` state: the shard millisecond its last
/// window opened in (31 bits, wrapping after 24 days; read for ages up to
/// two windows and two margins, and for the round it fell in; 0 at
/// first), and [`OPEN`] while that window is open. Two windows opened in
/// the same millisecond have the same mark, so an old entry may end the
/// newer one: early, never late.
pub type Mark = u32;

const OPEN: Mark = 1 << 31;
const CLOCK: Mark = OPEN - 1;

/// One held connection: when its window ends, and the mark it opened with.
type Held = (u64, ConnId, Mark);

/// The connections whose channel messages are held, in deadline order
/// within each queue.
///
/// Queues, not a heap: windows of one length opened in clock order end in
/// that order, so each length gets its own queue (whole windows in
/// `steady`, each group's first windows in `first`), and holding, the next
/// deadline and taking what is due are O(1) per entry. An entry carries the
/// mark it opened with instead of being removed when its window ends early:
/// removal from the middle would need a search per arrival.
#[derive(Debug, Default)]
pub struct WriteDelay {
    window_ms: u64,
    /// How much before its deadline an arrival ends a window.
    early_ms: u64,
    /// How often groups start afresh.
    round_ms: u64,
    /// Windows opened while a stream goes on: all `window_ms` long.
    steady: VecDeque<Held>,
    /// First windows, by group (each group's are all as long; the last
    /// group's are whole, and listed in `steady`).
    first: [VecDeque<Held>; GROUPS],
    held: usize,
}

impl WriteDelay {
    /// A delay with `window_ms` (0: off, nothing is ever held).
    pub fn new(window_ms: u64) -> WriteDelay {
        WriteDelay {
            window_ms,
            early_ms: 1 + window_ms / 10,
            round_ms: (ROUND_WINDOWS * window_ms).max(MIN_ROUND_MS),
            ..WriteDelay::default()
        }
    }

    /// Whether channel messages are held at all.
    pub fn is_on(&self) -> bool {
        self.window_ms > 0
    }

    /// The round of the shard's clock that `mark` or `now_ms` falls in.
    fn round(&self, clock: Mark) -> u64 {
        u64::from(clock & CLOCK) / self.round_ms
    }

    /// The group of a connection in a round: its slot and the round, mixed
    /// (SplitMix64's finalizer), so that what is drawn does not depend on
    /// the phase a connection is in.
    fn group_of(id: ConnId, round: u64) -> usize {
        let mut z = (round << 32 | u64::from(id.index)).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> (64 - GROUPS.ilog2())) as usize
    }

    fn clock(now_ms: u64) -> Mark {
        now_ms as Mark & CLOCK
    }

    /// Milliseconds from the time in `mark` to `now_ms`.
    fn age(mark: Mark, now_ms: u64) -> u64 {
        u64::from(Self::clock(now_ms).wrapping_sub(mark & CLOCK) & CLOCK)
    }

    /// Whether a connection marked `mark` has a window open.
    pub fn is_open(mark: Mark) -> bool {
        mark & OPEN != 0
    }

    /// The mark of a connection whose window, marked `mark`, ended.
    pub fn ended(mark: Mark) -> Mark {
        mark & CLOCK
    }

    /// How long a window opening now on connection `id`, marked `mark`,
    /// lasts: the whole window while a stream goes on (the last window
    /// opened less than two windows and two margins ago, in the same round;
    /// or it is still open, its frames having gone with a write it did not
    /// end, such as a TLS record's), its group's share otherwise.
    pub fn length(&self, id: ConnId, mark: Mark, now_ms: u64) -> u64 {
        let now = Self::clock(now_ms);
        let stream = mark != 0
            && self.round(mark) == self.round(now)
            && Self::age(mark, now_ms) < 2 * (self.window_ms + self.early_ms);
        if mark & OPEN != 0 || stream {
            self.window_ms
        } else {
            self.window_ms * Self::group_of(id, self.round(now)) as u64 / (GROUPS as u64 - 1)
        }
    }

    /// Connection `id`'s queue turned non-empty at `now_ms`: its window
    /// opens. `mark` is the connection's mark; the one returned replaces it.
    ///
    /// One entry is listed per window opened. An entry outlives its window
    /// when the window ended on an arrival (by up to twice the margin and
    /// 1 ms) or when an answer took the held frames along, so a connection
    /// can hold several; but a window opens only when a delivery finds the
    /// connection's queue empty, at most once per write, and every entry
    /// goes at its deadline (`window`, the margin and 1 ms at most after
    /// it opened): what a connection holds is bounded by the writes it got
    /// in that time, not by anything it sends.
    pub fn open(&mut self, id: ConnId, mark: Mark, now_ms: u64) -> Mark {
        let len = self.length(id, mark, now_ms);
        let (queue, at) = if len == self.window_ms {
            // A whole window waits for a message up to the early margin
            // late, as it ends for one up to the margin early.
            (&mut self.steady, now_ms + 1 + len + self.early_ms)
        } else {
            (&mut self.first[Self::group_of(id, self.round(Self::clock(now_ms)))], now_ms + 1 + len)
        };
        // Deadlines of one queue come in order as long as the clock does;
        // a clock that stepped back (it is monotonic) would only end this
        // window with the ones before it.
        let at = queue.back().map_or(at, |&(last, ..)| at.max(last));
        let mark = OPEN | Self::clock(now_ms);
        queue.push_back((at, id, mark));
        self.held += 1;
        mark
    }

    /// Whether a channel message queued at `now_ms` to a connection marked
    /// `mark`, with frames queued already, ends its window now.
    pub fn ends_on_arrival(&self, mark: Mark, now_ms: u64) -> bool {
        // Counted in the clock's whole milliseconds: from the millisecond
        // `window - margin` after the one it opened in. (Ending one
        // millisecond later, from the window's end as its deadline counts
        // it, let a message a little early wait for the deadline: the p99
        // rose by 2-4 ms in bench/RESULTS.md's runs.)
        mark & OPEN != 0 && Self::age(mark, now_ms) + self.early_ms >= self.window_ms
    }

    /// Entries listed (one per opened window, until its deadline or until
    /// found stale at the front of its queue).
    pub fn len(&self) -> usize {
        self.held
    }

    pub fn is_empty(&self) -> bool {
        self.held == 0
    }

    /// The earliest deadline of any listed connection.
    pub fn next_deadline(&self) -> Option<u64> {
        std::iter::once(&self.steady).chain(&self.first).filter_map(|q| q.front().map(|&(at, ..)| at)).min()
    }

    /// The earliest deadline that ends a window: first drops the entries
    /// at the front whose window ended already (`live(id, mark)` false), so
    /// that a stream whose windows end on arrivals sets no timer for them.
    pub fn next_live_deadline(&mut self, mut live: impl FnMut(ConnId, Mark) -> bool) -> Option<u64> {
        for queue in std::iter::once(&mut self.steady).chain(&mut self.first) {
            while let Some(&(_, id, mark)) = queue.front() {
                if live(id, mark) {
                    break;
                }
                queue.pop_front();
                self.held -= 1;
            }
        }
        self.next_deadline()
    }

    /// Takes every entry whose deadline is at or before `now_ms`, and calls
    /// `end(id, mark)` for it: the caller ends the window if the
    /// connection's mark is still `mark`.
    pub fn take_due(&mut self, now_ms: u64, mut end: impl FnMut(ConnId, Mark)) {
        for queue in std::iter::once(&mut self.steady).chain(&mut self.first) {
            while let Some(&(at, id, mark)) = queue.front() {
                if at > now_ms {
                    break;
                }
                queue.pop_front();
                self.held -= 1;
                end(id, mark);
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

    /// Ends what is due at `now` for connections whose marks are in
    /// `marks` (indexed by slot), as the core does; returns them by slot.
    fn end_due(d: &mut WriteDelay, marks: &mut [Mark], now: u64) -> Vec<u32> {
        let mut ended = Vec::new();
        d.take_due(now, |id, mark| {
            if marks[id.index as usize] == mark {
                marks[id.index as usize] = WriteDelay::ended(mark);
                ended.push(id.index);
            }
        });
        ended.sort_unstable();
        ended
    }

    #[test]
    fn first_windows_are_staggered_by_group_and_none_is_longer_than_the_window() {
        let mut d = WriteDelay::new(21);
        let mut marks = vec![0; 64];
        for (i, mark) in marks.iter_mut().enumerate() {
            *mark = d.open(conn(i as u32), *mark, 1000);
        }
        assert_eq!(d.len(), 64);
        let mut ends = Vec::new();
        let mut now = 1000;
        while let Some(at) = d.next_deadline() {
            assert!(at > now, "deadlines move forward");
            now = at;
            ends.push((now - 1001, end_due(&mut d, &mut marks, now)));
        }
        assert!(d.is_empty());
        // From the end of ms 1000, group j waits 21 * j / 7 ms: 0, 3, ...
        // 18; the last group's first window is whole, and like every whole
        // window waits the early margin (1 + 21 / 10 ms) more for a message.
        let wait = |j: usize| if j < 7 { 3 * j as u64 } else { 24 };
        for (waited, conns) in &ends {
            for &i in conns {
                assert_eq!(*waited, wait(WriteDelay::group_of(conn(i), d.round(1000))), "conn {i}");
            }
        }
        assert_eq!(ends.len(), GROUPS, "every group has connections: {ends:?}");
        assert!(ends.iter().all(|(_, conns)| (2..=16).contains(&conns.len())), "spread evenly: {ends:?}");
        for window in [1, 2, 5, 20, 100, 1000] {
            let d = WriteDelay::new(window);
            let lengths: Vec<u64> = (0..64).map(|i| d.length(conn(i), 0, 5000)).collect();
            assert!(lengths.iter().all(|&l| l <= window));
            assert!(lengths.contains(&window), "the last group waits it whole");
            assert!(lengths.contains(&0), "the first is written at once");
        }
        assert!(!WriteDelay::new(0).is_on());
    }

    #[test]
    fn the_groups_are_drawn_afresh_each_round() {
        // Of the connections in one group, each other group gets some the
        // next round.
        let in_group_0: Vec<ConnId> = (0..1024).map(conn).filter(|&c| WriteDelay::group_of(c, 4) == 0).collect();
        let mut next: Vec<usize> = in_group_0.iter().map(|&c| WriteDelay::group_of(c, 5)).collect();
        next.sort_unstable();
        next.dedup();
        assert_eq!(next.len(), GROUPS, "{next:?}");
        // Rounds: ten windows, at least 250 ms.
        let (short, long) = (WriteDelay::new(20), WriteDelay::new(300));
        assert_eq!((short.round(249), short.round(250), short.round(1999), short.round(2000)), (0, 1, 7, 8));
        assert_eq!((long.round(2999), long.round(3000)), (0, 1));
    }

    /// The mark of a connection whose last window opened at `ms` and ended.
    fn closed(ms: u64) -> Mark {
        WriteDelay::clock(ms)
    }

    #[test]
    fn a_window_opened_while_a_stream_goes_on_lasts_the_whole_window() {
        let mut d = WriteDelay::new(20);
        // A connection in group 1 in rounds 0 and 4 (ms 0-249 and
        // 1000-1249): its first windows are 2 ms long.
        let c = (0..10_000)
            .map(conn)
            .find(|&c| WriteDelay::group_of(c, 0) == 1 && WriteDelay::group_of(c, 4) == 1)
            .unwrap();
        assert_eq!(d.length(c, 0, 100), 2, "no window yet");
        assert_eq!(d.length(c, closed(100), 130), 20);
        assert_eq!(d.length(c, closed(85), 130), 20);
        assert_eq!(d.length(c, closed(84), 130), 2, "two windows and two margins ago: a quiet spell");
        assert_eq!(d.length(c, closed(990), 1010), 2, "a new round starts afresh");
        assert_eq!(d.length(c, closed(1010), 1030), 20);
        let mark = d.open(c, closed(95), 100);
        assert_eq!(d.next_deadline(), Some(124), "20 ms from the end of ms 100, and the early margin");
        // Still open with its frames gone (a TLS write took them): the
        // next one is whole too.
        assert_eq!(d.length(c, mark, 150), 20);
    }

    #[test]
    fn an_arrival_near_the_end_ends_the_window_and_its_entry_then_ends_nothing() {
        let mut d = WriteDelay::new(20);
        let mut marks = vec![closed(1090)];
        marks[0] = d.open(conn(0), marks[0], 1100);
        // The early margin is 1 + 20 / 10 = 3 ms.
        // The window opened in ms 1100: an arrival in ms 1117 (20 - 3 ms
        // on) ends it, and it waits for one until 1124 (20 ms from the end
        // of ms 1100, and 3 ms).
        assert!(!d.ends_on_arrival(marks[0], 1110));
        assert!(!d.ends_on_arrival(marks[0], 1116));
        assert!(d.ends_on_arrival(marks[0], 1117));
        assert!(d.ends_on_arrival(marks[0], 1123), "up to the margin late");
        assert_eq!(d.next_deadline(), Some(1124));
        // The core ends it on the arrival at ms 1120, and the next arrival
        // at 1130 opens a new window, with the stream: whole.
        marks[0] = WriteDelay::ended(marks[0]);
        assert!(!d.ends_on_arrival(marks[0], 1121), "an ended window ends nothing");
        marks[0] = d.open(conn(0), marks[0], 1130);
        assert_eq!(end_due(&mut d, &mut marks, 1124), Vec::<u32>::new(), "the old entry is stale");
        assert_eq!(d.len(), 1);
        assert_eq!(end_due(&mut d, &mut marks, 1153), Vec::<u32>::new());
        assert_eq!(end_due(&mut d, &mut marks, 1154), vec![0]);
        assert!(d.is_empty());
    }

    #[test]
    fn marks_survive_the_clock_wrapping() {
        let d = WriteDelay::new(20);
        let before = (1u64 << 31) - 5;
        let mark = OPEN | WriteDelay::clock(before);
        assert!(!d.ends_on_arrival(mark, before + 10));
        assert!(d.ends_on_arrival(mark, before + 18));
        // The clock's wrap starts a new round: one staggered window.
        let c = conn(3);
        let first = 20 * WriteDelay::group_of(c, 0) as u64 / 7;
        assert_eq!(d.length(c, closed(before), before + 10), first);
        let before = (1u64 << 31) - 15;
        assert_eq!(d.length(c, closed(before), before + 10), 20);
    }
}
