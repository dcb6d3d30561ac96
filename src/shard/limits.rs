//! Limits that keep one client from taking what belongs to all: the command
//! rate of a WebSocket, connections per process and per address, and failed
//! backend logins per address. Pure logic over numbers and a clock passed in;
//! the shard applies the verdicts.

use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Seconds of continuous excess after which a connection is closed (4029).
pub const RATE_CLOSE_AFTER: u32 = 10;

/// A token bucket: `rate` a second, burst `2 * rate`. Time is in
/// milliseconds of shard time; the stamp advances only by the time the
/// added tokens represent, so fractions of a token are not lost. A stamp
/// ahead of the clock is a debt ([`Bucket::charge`]): no tokens come until
/// the clock passes it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bucket {
    tokens: u32,
    /// Shard time (ms, wrapping) up to which tokens were added.
    stamp: u32,
}

/// The longest debt [`Bucket::charge`] runs up, in ms.
const MAX_DEBT_MS: u32 = 10_000;

impl Bucket {
    /// A full bucket at shard time `now_ms`.
    pub fn full(rate: u32, now_ms: u64) -> Bucket {
        Bucket { tokens: rate.saturating_mul(2), stamp: now_ms as u32 }
    }

    /// Adds the tokens earned since the stamp (none while in debt).
    fn refill(&mut self, rate: u32, now: u32) {
        let burst = rate.saturating_mul(2);
        let elapsed = now.wrapping_sub(self.stamp);
        if elapsed > i32::MAX as u32 || rate == 0 {
            return; // the stamp is ahead: a debt being paid off
        }
        let add = (elapsed as u64 * rate as u64 / 1000).min(burst as u64) as u32;
        if add > 0 {
            self.tokens = self.tokens.saturating_add(add).min(burst);
            self.stamp = if self.tokens == burst { now } else { self.stamp.wrapping_add(add * 1000 / rate) };
        }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, rate: u32, now_ms: u64) -> bool {
        self.refill(rate, now_ms as u32);
        let had = self.tokens > 0;
        self.tokens = self.tokens.saturating_sub(1);
        had
    }

    /// Takes `n` more tokens for work already done: what the bucket lacks
    /// becomes a debt (up to [`MAX_DEBT_MS`]) that the next tokens pay off.
    pub fn charge(&mut self, n: u32, rate: u32, now_ms: u64) {
        let now = now_ms as u32;
        self.refill(rate, now);
        let short = n.saturating_sub(self.tokens);
        self.tokens = self.tokens.saturating_sub(n);
        if short == 0 || rate == 0 {
            return;
        }
        // Debt runs from the later of the stamp and now.
        let from = if self.stamp.wrapping_sub(now) <= i32::MAX as u32 { self.stamp } else { now };
        let owed = from.wrapping_sub(now).saturating_add((short as u64 * 1000 / rate as u64) as u32);
        self.stamp = now.wrapping_add(owed.min(MAX_DEBT_MS));
    }
}

/// A token bucket per WebSocket: `rate` commands per second, burst
/// `2 * rate`, and the run of excess that ends in 4029.
///
/// Sixteen bytes, since every connection carries one.
#[derive(Debug, Clone, Copy, Default)]
pub struct RateLimiter {
    bucket: Bucket,
    /// Shard second the current run of excess started (0: none).
    over_since: u32,
    /// Shard second of the last dropped command, and whether its error
    /// frame was sent (at most one per second).
    last_drop: u32,
}

/// What to do with one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateVerdict {
    /// Within the rate: handle it.
    Allow,
    /// Over the rate: drop it; `tell` is true for at most one command a
    /// second (answer it with an error frame).
    Drop { tell: bool },
    /// Over the rate for [`RATE_CLOSE_AFTER`] seconds: close with 4029.
    Close,
}

impl RateLimiter {
    /// A full bucket at shard time `now_ms`.
    pub fn new(rate: u32, now_ms: u64) -> RateLimiter {
        RateLimiter { bucket: Bucket::full(rate, now_ms), over_since: 0, last_drop: 0 }
    }

    /// Takes one token for a command at `now_ms` (ms); `rate` per second.
    pub fn check(&mut self, rate: u32, now_ms: u64) -> RateVerdict {
        // Seconds are counted from 1 so that 0 can mean "none".
        let sec = (now_ms / 1000) as u32 + 1;
        if self.bucket.take(rate, now_ms) {
            // A second with no drop ends a run of excess.
            if self.over_since != 0 && sec > self.last_drop + 1 {
                self.over_since = 0;
            }
            return RateVerdict::Allow;
        }
        if self.over_since == 0 || sec > self.last_drop + 1 {
            self.over_since = sec;
        }
        let tell = sec != self.last_drop;
        self.last_drop = sec;
        if sec - self.over_since >= RATE_CLOSE_AFTER {
            return RateVerdict::Close;
        }
        RateVerdict::Drop { tell }
    }

    /// Takes `n` more tokens for what a command that was let through
    /// turned out to cost (the presence events of a subscription change):
    /// the commands that follow wait until it is paid off.
    pub fn charge(&mut self, n: u32, rate: u32, now_ms: u64) {
        self.bucket.charge(n, rate, now_ms);
    }
}

/// Buckets of the per-channel table (a power of two).
const CHANNEL_BUCKETS: usize = 1 << 14;

/// `--channel-rate`: browser publishes per second to one channel, each
/// shard admitting its share.
///
/// The cost of a publish is its fan-out, which a per-connection rate does
/// not bound: fifty browsers within their own rate, all publishing to a
/// channel with a thousand subscribers, ask for millions of deliveries a
/// second. A fixed table of token buckets indexed by a keyed hash of
/// (dev_id, channel): 128 KiB a shard whatever the number of channels, and
/// no client can grow it. Channels that share a bucket share its rate; with
/// a random key and 16,384 buckets an attacker cannot pick whose channel
/// his flood shares, and the few buckets a flood drains are a small part of
/// the table.
pub struct ChannelRates {
    /// This shard's share of the rate (0: unlimited).
    rate: u32,
    buckets: Box<[Bucket]>,
    hasher: ahash::RandomState,
}

impl std::fmt::Debug for ChannelRates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelRates").field("rate", &self.rate).finish_non_exhaustive()
    }
}

impl ChannelRates {
    /// `rate` per second in the whole process (0: unlimited), shared by
    /// `shards` shards; every shard admits at least one a second.
    pub fn new(rate: u32, shards: usize, now_ms: u64) -> ChannelRates {
        let share = if rate == 0 { 0 } else { rate.div_ceil(shards.max(1) as u32) };
        let buckets =
            if share == 0 { Box::default() } else { vec![Bucket::full(share, now_ms); CHANNEL_BUCKETS].into() };
        ChannelRates { rate: share, buckets, hasher: ahash::RandomState::new() }
    }

    /// This shard's share of the rate (0: unlimited).
    pub fn share(&self) -> u32 {
        self.rate
    }

    /// Whether a browser publish to `channel` of `dev_id` is within the rate.
    pub fn admit(&mut self, dev_id: u32, channel: &str, now_ms: u64) -> bool {
        if self.rate == 0 {
            return true;
        }
        let i = self.hasher.hash_one((dev_id, channel)) as usize & (CHANNEL_BUCKETS - 1);
        self.buckets[i].take(self.rate, now_ms)
    }
}

/// Why a new frontend connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The process holds `--max-connections` (HTTP 503).
    Full,
    /// The client address holds `--max-connections-per-ip` (HTTP 429).
    PerIp,
    /// New connections come faster than `--max-accept-rate` (HTTP 503).
    Rate,
}

/// `--max-accept-rate`: new frontend connections a second, process-wide,
/// burst one second's worth.
///
/// One token bucket shared by every shard, lock-free: a single `AtomicU64`
/// holds the shard time of the last refill (ms, high half) and the
/// thousandths of a token spent and not yet refilled (low half), so a
/// full bucket is all zeroes. Counting in thousandths keeps fractions of a
/// token at any rate up to 1,000,000 a second, and a compare-and-swap
/// updates both halves at once. Shards' clocks start a few milliseconds
/// apart; a stamp from a clock that is ahead only delays the next refill
/// by that much.
#[derive(Debug, Default)]
pub struct AcceptRate {
    state: AtomicU64,
}

impl AcceptRate {
    /// Takes a token for a new connection at shard time `now_ms`; false
    /// when the bucket is empty. `rate` 0 admits everything.
    pub fn admit(&self, rate: u32, now_ms: u64) -> bool {
        if rate == 0 {
            return true;
        }
        let now = now_ms as u32;
        let cap = rate as u64 * 1000;
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let (stamp, spent) = ((cur >> 32) as u32, cur as u32 as u64);
            // A stamp up to a minute "ahead" of now comes from another
            // shard's clock: no refill until this one catches up.
            let elapsed = now.wrapping_sub(stamp);
            let (stamp, spent) = if elapsed <= u32::MAX - 60_000 {
                (now, spent.saturating_sub(elapsed as u64 * rate as u64))
            } else {
                (stamp, spent)
            };
            if spent + 1000 > cap {
                return false;
            }
            let next = (stamp as u64) << 32 | (spent + 1000);
            match self.state.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(seen) => cur = seen,
            }
        }
    }
}

/// Buckets of the per-address table (a power of two).
const IP_BUCKETS: usize = 1 << 16;

/// Process-wide frontend connection counts: the total and per address.
///
/// Per address is a fixed table of counters indexed by a keyed hash of the
/// address (an IPv6 address by its /64, which one subscriber usually gets
/// whole): lock-free, 256 KiB whatever the number of clients, and no client
/// can grow it. Two addresses that share a bucket share its limit; with a
/// random key and 65,536 buckets that takes thousands of connections from
/// colliding addresses, which the attacker cannot choose.
pub struct ConnCounts {
    total: AtomicUsize,
    per_ip: Box<[AtomicU32]>,
    hasher: ahash::RandomState,
}

impl std::fmt::Debug for ConnCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnCounts").field("total", &self.total).finish_non_exhaustive()
    }
}

impl Default for ConnCounts {
    fn default() -> Self {
        ConnCounts {
            total: AtomicUsize::new(0),
            per_ip: (0..IP_BUCKETS).map(|_| AtomicU32::new(0)).collect(),
            hasher: ahash::RandomState::new(),
        }
    }
}

impl ConnCounts {
    fn bucket(&self, ip: IpAddr) -> &AtomicU32 {
        let key: u128 = match ip {
            IpAddr::V4(a) => u32::from(a) as u128,
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => u32::from(v4) as u128,
                None => u128::from(a) >> 64 << 64 | 1 << 32,
            },
        };
        &self.per_ip[self.hasher.hash_one(key) as usize & (IP_BUCKETS - 1)]
    }

    /// Counts a new connection from `ip`, or says why it must be refused
    /// (then nothing is counted).
    pub fn admit(&self, ip: IpAddr, max_total: usize, max_per_ip: u32) -> Result<(), Refusal> {
        if self.total.fetch_add(1, Ordering::Relaxed) >= max_total {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::Full);
        }
        let b = self.bucket(ip);
        if b.fetch_add(1, Ordering::Relaxed) >= max_per_ip {
            b.fetch_sub(1, Ordering::Relaxed);
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::PerIp);
        }
        Ok(())
    }

    /// Uncounts a connection admitted from `ip`.
    pub fn release(&self, ip: IpAddr) {
        self.total.fetch_sub(1, Ordering::Relaxed);
        self.bucket(ip).fetch_sub(1, Ordering::Relaxed);
    }

    /// Connections counted now.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

/// Failed logins from one address in one window before it is refused.
pub const AUTH_FAILURES_ALLOWED: u32 = 20;
/// The window, and how long a refused address stays refused (seconds).
pub const AUTH_WINDOW_SECS: u64 = 10;
/// Addresses the failure table remembers at most; the stalest is forgotten
/// first, so a scan from many addresses cannot grow it.
pub const AUTH_TABLE_SIZE: usize = 4096;

/// Failed backend logins per address, process-wide. A mutex is fine here:
/// it is taken once per backend connection and once per failed login, never
/// on a message path.
#[derive(Debug, Default)]
pub struct AuthFailures {
    table: Mutex<ahash::AHashMap<IpAddr, AuthRecord>>,
}

/// One address's failures.
#[derive(Debug, Clone, Copy)]
struct AuthRecord {
    /// Start of the current window (unix seconds).
    window: u64,
    failures: u32,
    /// Refused until this time (unix seconds), 0 when not refused.
    refused_until: u64,
}

impl AuthFailures {
    /// Seconds `ip` stays refused, if it is refused at `now` (unix seconds).
    pub fn refused(&self, ip: IpAddr, now: u64) -> Option<u64> {
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.get(&ip).filter(|r| r.refused_until > now).map(|r| r.refused_until - now)
    }

    /// Records a failed login; returns true when this failure made the
    /// address refused.
    pub fn fail(&self, ip: IpAddr, now: u64) -> bool {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() >= AUTH_TABLE_SIZE && !t.contains_key(&ip) {
            // Forget the stalest record (expired ones first, by window).
            if let Some(old) = t.iter().min_by_key(|(_, r)| r.window.max(r.refused_until)).map(|(k, _)| *k) {
                t.remove(&old);
            }
        }
        let r = t.entry(ip).or_insert(AuthRecord { window: now, failures: 0, refused_until: 0 });
        if now >= r.window + AUTH_WINDOW_SECS {
            r.window = now;
            r.failures = 0;
        }
        r.failures += 1;
        if r.failures > AUTH_FAILURES_ALLOWED && r.refused_until <= now {
            r.refused_until = now + AUTH_WINDOW_SECS;
            r.window = now;
            r.failures = 0;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod channel_rate_tests {
    use super::ChannelRates;

    #[test]
    fn a_channel_gets_its_share_and_others_are_untouched() {
        // 100 a second over 2 shards: 50 here, burst 100.
        let mut r = ChannelRates::new(100, 2, 0);
        assert_eq!(r.share(), 50);
        let admitted = (0..1000).filter(|_| r.admit(1, "web_flood", 0)).count();
        assert_eq!(admitted, 100);
        // A channel in another bucket keeps its whole burst.
        let bucket =
            |r: &ChannelRates, name: &str| r.hasher.hash_one((1u32, name)) as usize & (super::CHANNEL_BUCKETS - 1);
        let flood = bucket(&r, "web_flood");
        let quiet = (0..).map(|i| format!("web_quiet{i}")).find(|n| bucket(&r, n) != flood).unwrap();
        assert_eq!((0..1000).filter(|_| r.admit(1, &quiet, 0)).count(), 100);
        // The same name under another dev_id is another channel.
        assert!(r.admit(2, "web_flood", 0));
        // A second later, one second's worth comes back.
        let again = (0..1000).filter(|_| r.admit(1, "web_flood", 1000)).count();
        assert_eq!(again, 50);
    }

    #[test]
    fn zero_means_unlimited_and_costs_no_table() {
        let mut r = ChannelRates::new(0, 2, 0);
        assert!((0..100_000).all(|_| r.admit(1, "web_x", 0)));
        assert_eq!(r.buckets.len(), 0);
        assert_eq!(ChannelRates::new(1, 4, 0).share(), 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_past_the_tokens_is_a_debt_paid_before_the_next_command() {
        // 10 a second, burst 20: 20 commands, then a charge of 30 more.
        let mut b = Bucket::full(10, 1_000);
        assert_eq!((0..25).filter(|_| b.take(10, 1_000)).count(), 20);
        b.charge(30, 10, 1_000);
        // 30 tokens owed at 10 a second: nothing for 3 s, then the rate.
        assert!(!b.take(10, 3_900));
        assert!(b.take(10, 4_100));
        // Within the tokens, a charge is no debt.
        let mut b = Bucket::full(10, 0);
        b.charge(5, 10, 0);
        assert_eq!((0..20).filter(|_| b.take(10, 0)).count(), 15);
        // A debt stops at 10 s, and a later one adds to it.
        let mut b = Bucket::full(10, 0);
        b.charge(1_000, 10, 0);
        b.charge(10, 10, 50);
        assert!(!b.take(10, 9_990));
        assert!(b.take(10, 10_200));
    }

    #[test]
    fn the_accept_rate_allows_a_second_worth_then_the_rate_without_losing_fractions() {
        let r = AcceptRate::default();
        assert!((0..1000).all(|_| r.admit(0, 0)), "0: unlimited");
        assert_eq!((0..100).filter(|_| r.admit(30, 5)).count(), 30, "a full bucket: one second's worth");
        // 1.5 tokens a step at 1500/s over 1 ms steps: 1,500 in a second.
        let r = AcceptRate::default();
        assert_eq!((0..5000).filter(|_| r.admit(1500, 0)).count(), 1500);
        let mut more = 0;
        for ms in 1..=1000 {
            more += (0..10).filter(|_| r.admit(1500, ms)).count();
        }
        assert_eq!(more, 1500);
        // A clock a few ms behind the stamp (another shard's) refills
        // nothing and does not wrap into a refill.
        assert!(!r.admit(1500, 990));
        // An idle day refills the bucket to its burst, no more.
        assert_eq!((0..5000).filter(|_| r.admit(1500, 86_400_000)).count(), 1500);
    }

    #[test]
    fn the_accept_rate_is_shared_exactly_between_threads() {
        let r = std::sync::Arc::new(AcceptRate::default());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || (0..10_000).filter(|_| r.admit(5000, 7)).count())
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().expect("thread")).sum();
        assert_eq!(total, 5000, "no token granted twice, none lost");
    }

    #[test]
    fn the_bucket_allows_a_burst_of_twice_the_rate_then_the_rate() {
        let mut r = RateLimiter::new(50, 0);
        let allowed = (0..200).filter(|_| r.check(50, 0) == RateVerdict::Allow).count();
        assert_eq!(allowed, 100);
        // One second later: 50 more, and no fraction lost over 20 ms steps.
        let mut n = 0;
        for t in (20..=1000).step_by(20) {
            while r.check(50, t) == RateVerdict::Allow {
                n += 1;
            }
        }
        assert_eq!(n, 50);
    }

    #[test]
    fn drops_are_told_once_a_second_and_ten_seconds_of_excess_close() {
        let mut r = RateLimiter::new(1, 0);
        assert_eq!(r.check(1, 0), RateVerdict::Allow);
        assert_eq!(r.check(1, 0), RateVerdict::Allow);
        assert_eq!(r.check(1, 10), RateVerdict::Drop { tell: true });
        assert_eq!(r.check(1, 20), RateVerdict::Drop { tell: false });
        // Keep flooding at 10 commands a second.
        let mut closed_at = None;
        for t in (100..20_000).step_by(100) {
            if r.check(1, t) == RateVerdict::Close {
                closed_at = Some(t);
                break;
            }
        }
        assert_eq!(closed_at.map(|t| t / 1000), Some(RATE_CLOSE_AFTER as u64));
    }

    #[test]
    fn a_client_that_slows_down_is_forgiven() {
        // Over the rate for a few seconds from second 1...
        let mut r = RateLimiter::new(1, 0);
        r.check(1, 0);
        r.check(1, 0);
        for t in 0..4 {
            r.check(1, t * 1000 + 500);
            r.check(1, t * 1000 + 600);
        }
        // ...then quiet for 16 s. A new drop at second 21 starts a new run
        // of excess: it is told, not closed (the old run began 20 s ago).
        assert_eq!(r.check(1, 20_000), RateVerdict::Allow);
        assert_eq!(r.check(1, 20_000), RateVerdict::Allow);
        assert_eq!(r.check(1, 20_000), RateVerdict::Drop { tell: true });
    }

    #[test]
    fn connection_counts_refuse_past_the_total_and_per_address() {
        let c = ConnCounts::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(c.admit(a, 3, 2), Ok(()));
        assert_eq!(c.admit(a, 3, 2), Ok(()));
        assert_eq!(c.admit(a, 3, 2), Err(Refusal::PerIp));
        assert_eq!(c.admit(b, 3, 2), Ok(()));
        assert_eq!(c.admit(b, 3, 2), Err(Refusal::Full));
        assert_eq!(c.total(), 3);
        c.release(a);
        assert_eq!(c.admit(b, 3, 2), Ok(()));
    }

    #[test]
    fn ipv6_addresses_count_per_64() {
        let c = ConnCounts::default();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(c.admit(a, 10, 1), Ok(()));
        assert_eq!(c.admit(b, 10, 1), Err(Refusal::PerIp));
    }

    #[test]
    fn twenty_failures_in_ten_seconds_refuse_the_address_for_ten_seconds() {
        let f = AuthFailures::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..AUTH_FAILURES_ALLOWED {
            assert!(!f.fail(ip, 1000));
        }
        assert_eq!(f.refused(ip, 1000), None);
        assert!(f.fail(ip, 1001));
        assert_eq!(f.refused(ip, 1001), Some(10));
        assert_eq!(f.refused(ip, 1011), None);
        // Failures spread over more than the window never refuse.
        let g = AuthFailures::default();
        for t in 0..100 {
            assert!(!g.fail(ip, t));
        }
    }

    #[test]
    fn the_failure_table_is_bounded() {
        let f = AuthFailures::default();
        for i in 0..(AUTH_TABLE_SIZE as u32 + 500) {
            f.fail(IpAddr::from(i.to_be_bytes()), 1000 + i as u64);
        }
        assert_eq!(f.table.lock().unwrap().len(), AUTH_TABLE_SIZE);
    }
}
