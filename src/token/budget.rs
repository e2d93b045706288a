//! The fetch budget of a provider (`max_fetch_rate`, `max_fetch_burst`): token requests to
//! its endpoint are spread so as to stay within it. The limiter is a GCRA (a virtual
//! scheduling of one request every `interval`, with `burst` of them allowed at once after a
//! pause): a fetch reserves the next slot and waits for it, so that waiters go in order and a
//! burst of prefetches is staggered, not refused. A slot further away than the longest a fetch
//! may wait is not reserved: the fetch fails as throttled, with the time to that slot.
//!
//! With `[cache.shared]` the whole fleet keeps one budget, in Redis (the same arithmetic in a
//! script, on Redis' clock); here each sidecar keeps its own — the whole budget, or, while
//! Redis is away, its share of it ([`Share`]).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::sync::lock;

/// The longest a fetch waits for its slot; beyond, it is throttled.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// `max_fetch_rate` and `max_fetch_burst`, as a GCRA's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchRate {
    /// One fetch every this long, in the long run.
    pub interval: Duration,
    /// Fetches allowed at once after a pause (at least 1).
    pub burst: u32,
}

impl FetchRate {
    /// How far ahead of its slot a fetch may go: the burst's slack.
    pub fn tolerance(&self) -> Duration {
        self.interval.saturating_mul(self.burst.saturating_sub(1))
    }

    /// This rate shared out among `members` (each keeps its part).
    pub fn share(&self, members: u32) -> Self {
        Self {
            interval: self.interval.saturating_mul(members.max(1)),
            burst: self.burst,
        }
    }
}

/// Which part of a provider's budget a fetch draws on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Share {
    /// The whole budget is this sidecar's (no fleet).
    #[default]
    Whole,
    /// The fleet's limiter already granted this fetch its slot.
    Granted,
    /// The fleet cannot be asked (Redis is away): this sidecar's part, one of this many.
    OneOf(u32),
}

/// One provider's budget, kept by this sidecar.
#[derive(Debug)]
pub struct Budget {
    rate: FetchRate,
    /// The theoretical arrival time of the next fetch.
    next: Mutex<Option<Instant>>,
}

impl Budget {
    pub fn new(rate: FetchRate) -> Self {
        Self {
            rate,
            next: Mutex::new(None),
        }
    }

    pub fn rate(&self) -> FetchRate {
        self.rate
    }

    /// Reserves the next slot of `share` of the budget: how long to wait for it, or — when
    /// that is longer than [`MAX_WAIT`] — `Err` with that wait, nothing reserved.
    pub fn reserve(&self, share: Share, now: Instant) -> Result<Duration, Duration> {
        let rate = match share {
            Share::Granted => return Ok(Duration::ZERO),
            Share::Whole => self.rate,
            Share::OneOf(members) => self.rate.share(members),
        };
        let mut next = lock(&self.next);
        let arrival = next.map_or(now, |next| next.max(now));
        let wait = (arrival.checked_sub(rate.tolerance()).unwrap_or(arrival)).saturating_duration_since(now);
        if wait > MAX_WAIT {
            return Err(wait);
        }
        *next = Some(arrival + rate.interval);
        Ok(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: u32, burst: u32) -> FetchRate {
        FetchRate {
            interval: Duration::from_secs(1) / per_second,
            burst,
        }
    }

    #[test]
    fn a_burst_goes_at_once_then_fetches_are_spread_at_the_rate() {
        let budget = Budget::new(rate(10, 3));
        let now = Instant::now();
        let waits: Vec<u128> = (0..6)
            .map(|_| budget.reserve(Share::Whole, now).unwrap().as_millis())
            .collect();
        assert_eq!(waits, [0, 0, 0, 100, 200, 300]);
    }

    #[test]
    fn a_pause_refills_the_burst_but_no_more() {
        let budget = Budget::new(rate(10, 2));
        let start = Instant::now();
        budget.reserve(Share::Whole, start).unwrap();
        budget.reserve(Share::Whole, start).unwrap();
        let later = start + Duration::from_secs(10);
        let waits: Vec<u128> = (0..3)
            .map(|_| budget.reserve(Share::Whole, later).unwrap().as_millis())
            .collect();
        assert_eq!(waits, [0, 0, 100]);
    }

    #[test]
    fn a_slot_beyond_the_longest_wait_is_not_reserved() {
        let budget = Budget::new(rate(1, 1));
        let now = Instant::now();
        for _ in 0..31 {
            budget.reserve(Share::Whole, now).unwrap();
        }
        let refused = budget.reserve(Share::Whole, now).unwrap_err();
        assert_eq!(refused, Duration::from_secs(31));
        assert_eq!(
            budget
                .reserve(Share::Whole, now + Duration::from_secs(1))
                .unwrap(),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn a_share_of_the_fleets_budget_is_a_slower_rate_and_a_granted_fetch_waits_for_nothing() {
        let budget = Budget::new(rate(100, 1));
        let now = Instant::now();
        budget.reserve(Share::OneOf(4), now).unwrap();
        assert_eq!(
            budget.reserve(Share::OneOf(4), now).unwrap(),
            Duration::from_millis(40)
        );
        assert_eq!(budget.reserve(Share::Granted, now).unwrap(), Duration::ZERO);
    }
}
