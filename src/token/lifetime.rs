//! The refresh policy: when a token should be refreshed and when it must no longer be sent.
//!
//! One pure function of (lifetime, policy, jitter). Lifetimes run from 10 s to a year, so the
//! margins scale with the lifetime and are capped:
//! - *expiry margin*: a token is not sent in its last `min(max(10% of L, 1 s), L/2, cap 30 s)`,
//!   when it could expire in flight;
//! - *refresh ahead*: a refresh starts `min(25% of L, cap 5 min)` before expiry (never later than
//!   the expiry margin), moved up to 10% earlier by per-token jitter so a fleet does not refresh
//!   in lockstep.

use std::time::{Duration, SystemTime};

/// The tunable part of the policy (`[cache]` in the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefreshPolicy {
    /// Share of a token's lifetime before expiry at which a refresh starts.
    pub refresh_fraction: f64,
    /// Upper bound on how far ahead of expiry a refresh starts.
    pub max_refresh_ahead: Duration,
    /// Upper bound on the final stretch in which a token is no longer sent.
    pub max_expiry_margin: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self {
            refresh_fraction: 0.25,
            max_refresh_ahead: Duration::from_secs(300),
            max_expiry_margin: Duration::from_secs(30),
        }
    }
}

const EXPIRY_MARGIN_FRACTION: f64 = 0.1;
const MIN_EXPIRY_MARGIN: Duration = Duration::from_secs(1);
const JITTER_FRACTION: f64 = 0.1;

/// When one token moves from fresh to due-for-refresh to unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub refresh_at: SystemTime,
    pub unusable_at: SystemTime,
    pub expires_at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Use it.
    Fresh,
    /// Use it, and refresh it in the background.
    RefreshDue,
    /// Do not send it: expired or about to.
    Unusable,
}

impl RefreshPolicy {
    /// The schedule of a token obtained at `obtained_at` that expires at `expires_at`.
    /// `jitter` in `[0, 1)` moves the refresh point earlier by up to 10% of the refresh window.
    pub fn schedule(&self, obtained_at: SystemTime, expires_at: SystemTime, jitter: f64) -> Schedule {
        let lifetime = expires_at.duration_since(obtained_at).unwrap_or(Duration::ZERO);
        let margin = self.expiry_margin(lifetime);
        let ahead = self.refresh_ahead(lifetime, margin, jitter);
        Schedule {
            refresh_at: expires_at - ahead,
            unusable_at: expires_at - margin,
            expires_at,
        }
    }

    /// The final stretch of a token's life in which it is not sent.
    pub fn expiry_margin(&self, lifetime: Duration) -> Duration {
        lifetime
            .mul_f64(EXPIRY_MARGIN_FRACTION)
            .max(MIN_EXPIRY_MARGIN)
            .min(lifetime / 2)
            .min(self.max_expiry_margin)
    }

    fn refresh_ahead(&self, lifetime: Duration, margin: Duration, jitter: f64) -> Duration {
        let base = lifetime
            .mul_f64(self.refresh_fraction.clamp(0.0, 1.0))
            .min(self.max_refresh_ahead)
            .max(margin);
        let jitter = jitter.clamp(0.0, 1.0);
        (base + base.mul_f64(JITTER_FRACTION * jitter)).min(lifetime)
    }
}

impl Schedule {
    pub fn freshness(&self, now: SystemTime) -> Freshness {
        if now >= self.unusable_at {
            Freshness::Unusable
        } else if now >= self.refresh_at {
            Freshness::RefreshDue
        } else {
            Freshness::Fresh
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000;

    fn at(secs_after_t0: f64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(T0) + Duration::from_secs_f64(secs_after_t0)
    }

    fn schedule_for(lifetime_secs: f64) -> Schedule {
        RefreshPolicy::default().schedule(at(0.0), at(lifetime_secs), 0.0)
    }

    fn offset(t: SystemTime) -> f64 {
        t.duration_since(at(0.0)).unwrap().as_secs_f64()
    }

    /// (lifetime, refresh starts at, unusable from), seconds after the token was obtained.
    const TABLE: &[(f64, f64, f64)] = &[
        (10.0, 7.5, 9.0),
        (60.0, 45.0, 54.0),
        (900.0, 675.0, 870.0),
        (3600.0, 3300.0, 3570.0),
        (7200.0, 6900.0, 7170.0),
        (31_556_926.0, 31_556_626.0, 31_556_896.0),
    ];

    #[test]
    fn schedule_for_each_lifetime_class() {
        for &(lifetime, refresh, unusable) in TABLE {
            let s = schedule_for(lifetime);
            assert_eq!(offset(s.refresh_at), refresh, "refresh point for {lifetime} s");
            assert_eq!(offset(s.unusable_at), unusable, "unusable point for {lifetime} s");
        }
    }

    #[test]
    fn a_ten_second_token_is_used_for_most_of_its_life() {
        let s = schedule_for(10.0);
        assert_eq!(s.freshness(at(0.0)), Freshness::Fresh);
        assert_eq!(s.freshness(at(7.4)), Freshness::Fresh);
        assert_eq!(s.freshness(at(7.5)), Freshness::RefreshDue);
        assert_eq!(s.freshness(at(8.9)), Freshness::RefreshDue);
        assert_eq!(s.freshness(at(9.0)), Freshness::Unusable);
    }

    #[test]
    fn long_tokens_do_not_wait_for_their_last_seconds() {
        let s = schedule_for(7200.0);
        assert_eq!(s.freshness(at(7200.0 - 301.0)), Freshness::Fresh);
        assert_eq!(s.freshness(at(7200.0 - 299.0)), Freshness::RefreshDue);
        assert_eq!(s.freshness(at(7200.0 - 29.0)), Freshness::Unusable);
    }

    #[test]
    fn zero_and_negative_lifetimes_are_never_usable() {
        for s in [
            RefreshPolicy::default().schedule(at(0.0), at(0.0), 0.5),
            RefreshPolicy::default().schedule(at(10.0), at(0.0), 0.5),
        ] {
            assert_eq!(s.freshness(at(0.0)), Freshness::Unusable);
            assert_eq!(s.freshness(at(10.0)), Freshness::Unusable);
        }
    }

    #[test]
    fn an_expiry_already_past_by_our_clock_is_unusable() {
        // Obtained at t0 with a 60 s lifetime, but our clock jumped ahead by 2 minutes.
        assert_eq!(schedule_for(60.0).freshness(at(120.0)), Freshness::Unusable);
    }

    #[test]
    fn very_short_lifetimes_keep_half_their_life_usable() {
        let s = schedule_for(1.0);
        assert_eq!(offset(s.unusable_at), 0.5);
        assert!(offset(s.refresh_at) <= 0.5);
    }

    #[test]
    fn jitter_only_moves_refresh_earlier_by_at_most_ten_percent_of_the_window() {
        let policy = RefreshPolicy::default();
        for &(lifetime, refresh, unusable) in TABLE {
            let window = lifetime - refresh;
            let s = policy.schedule(at(0.0), at(lifetime), 0.999);
            let jittered = offset(s.refresh_at);
            assert!(
                jittered <= refresh && jittered >= refresh - window * 0.1 - 1e-6,
                "{lifetime}: {jittered}"
            );
            assert_eq!(offset(s.unusable_at), unusable, "jitter never changes the margin");
        }
    }

    #[test]
    fn configured_caps_are_honoured() {
        let policy = RefreshPolicy {
            refresh_fraction: 0.5,
            max_refresh_ahead: Duration::from_secs(60),
            max_expiry_margin: Duration::from_secs(5),
        };
        let s = policy.schedule(at(0.0), at(3600.0), 0.0);
        assert_eq!(offset(s.refresh_at), 3540.0);
        assert_eq!(offset(s.unusable_at), 3595.0);
    }
}
