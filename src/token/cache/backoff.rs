//! Back-off after failed fetches and the gaps between retries in one burst: pure functions.

use std::time::Duration;

use rand::Rng;

use crate::token::error::FetchError;
use crate::token::spec::CacheSettings;

/// First gap between retries of one fetch; doubles per retry.
const FIRST_RETRY_GAP: Duration = Duration::from_millis(100);
/// Attempts in one retry burst.
pub(super) const MAX_ATTEMPTS: u32 = 4;

/// How long a failing credential is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Until the next background attempt (refresh-ahead, prefetch, the fleet's record).
    pub wait: Duration,
    /// Until a request that has no usable token may probe the endpoint again: no later than
    /// `max_probe_interval` after the failure, unless the provider said when to come back (or
    /// refused the credentials), so that recovery is seen within seconds however long the
    /// outage made the back-off.
    pub probe: Duration,
}

/// Back-off after `failures` consecutive failures: the provider's `Retry-After` when it gives
/// one; else doubling from `failure_backoff` up to `max_failure_backoff`, with probes for
/// waiting requests every `max_probe_interval` at most; rejected credentials wait the maximum
/// (retrying soon cannot help), or a `Retry-After` longer than that.
pub fn backoff(settings: &CacheSettings, failures: u32, error: &FetchError) -> Backoff {
    let asked = error.retry_after().filter(|asked| !asked.is_zero());
    let (wait, probe) = match (error, asked) {
        (FetchError::Rejected { .. }, _) => {
            let wait = settings.max_failure_backoff.max(asked.unwrap_or_default());
            (wait, wait)
        }
        // The fleet's back-off: as long as it says, but a waiting request may still ask the
        // fleet again within the probe interval (where the fleet's own probe time is kept).
        (FetchError::FleetBackoff { .. }, Some(asked)) => (asked, asked.min(settings.max_probe_interval)),
        (_, Some(asked)) => (asked, asked),
        (_, None) => {
            let wait = doubling(settings, failures);
            (wait, wait.min(settings.max_probe_interval))
        }
    };
    Backoff { wait, probe }
}

/// `failure_backoff` doubled per repetition after the first, up to `max_failure_backoff`.
pub(super) fn doubling(settings: &CacheSettings, repetitions: u32) -> Duration {
    let exponent = repetitions.saturating_sub(1).min(20);
    settings
        .failure_backoff
        .saturating_mul(1u32 << exponent)
        .min(settings.max_failure_backoff)
}

/// The gap before retrying a failed fetch, or `None` when retrying soon cannot help.
pub fn retry_gap(error: &FetchError, attempt: u32) -> Option<Duration> {
    let doubling = FIRST_RETRY_GAP.saturating_mul(1u32 << attempt.saturating_sub(1).min(10));
    let jittered = doubling.mul_f64(rand::thread_rng().gen_range(0.8..1.2));
    match error {
        FetchError::Rejected { .. } | FetchError::Unsendable { .. } | FetchError::Throttled { .. } => None,
        FetchError::Status { status, .. } if *status < 500 => None,
        // The fleet already waits; its time left is the answer.
        FetchError::FleetBackoff { .. } => None,
        FetchError::RateLimited { retry_after } | FetchError::Status { retry_after, .. } => {
            Some(retry_after.unwrap_or(jittered).max(jittered))
        }
        FetchError::Malformed { .. }
        | FetchError::Timeout
        | FetchError::Unreachable { .. }
        | FetchError::Aborted => Some(jittered),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> CacheSettings {
        CacheSettings::default()
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let err = FetchError::Status {
            status: 503,
            retry_after: None,
        };
        let waits: Vec<u64> = (1..=8)
            .map(|n| backoff(&settings(), n, &err).wait.as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn waiting_requests_probe_within_the_probe_interval_however_long_the_backoff() {
        let err = FetchError::Status {
            status: 503,
            retry_after: None,
        };
        let probes: Vec<u64> = (1..=8)
            .map(|n| backoff(&settings(), n, &err).probe.as_secs())
            .collect();
        assert_eq!(probes, [1, 2, 4, 5, 5, 5, 5, 5]);
    }

    #[test]
    fn a_fleets_long_back_off_still_lets_waiting_requests_ask_again_within_the_probe_interval() {
        let err = FetchError::FleetBackoff {
            failure: crate::token::error::FleetFailure::Status(503),
            retry_after: Some(Duration::from_secs(32)),
        };
        let backoff = backoff(&settings(), 6, &err);
        assert_eq!(backoff.wait, Duration::from_secs(32));
        assert_eq!(backoff.probe, Duration::from_secs(5));
    }

    #[test]
    fn the_providers_retry_after_is_the_wait_even_when_shorter_than_the_doubling() {
        let err = FetchError::Status {
            status: 503,
            retry_after: Some(Duration::from_secs(2)),
        };
        let at_the_tenth = backoff(&settings(), 10, &err);
        assert_eq!(at_the_tenth.wait, Duration::from_secs(2));
        assert_eq!(at_the_tenth.probe, Duration::from_secs(2));
    }

    #[test]
    fn rejected_credentials_wait_the_maximum() {
        let err = FetchError::Rejected {
            status: 401,
            reason: None,
        };
        let backoff = backoff(&settings(), 1, &err);
        assert_eq!(
            (backoff.wait, backoff.probe),
            (Duration::from_secs(60), Duration::from_secs(60))
        );
    }

    #[test]
    fn retry_gaps_grow_and_skip_hopeless_errors() {
        let err = FetchError::Status {
            status: 503,
            retry_after: None,
        };
        let gaps: Vec<Duration> = (1..=3).map(|n| retry_gap(&err, n).unwrap()).collect();
        assert!(
            gaps[0] >= Duration::from_millis(80) && gaps[0] <= Duration::from_millis(120),
            "{gaps:?}"
        );
        assert!(
            gaps[1] >= Duration::from_millis(160) && gaps[2] >= Duration::from_millis(320),
            "{gaps:?}"
        );
        assert_eq!(
            retry_gap(
                &FetchError::Rejected {
                    status: 401,
                    reason: None
                },
                1
            ),
            None
        );
        assert_eq!(
            retry_gap(
                &FetchError::Status {
                    status: 404,
                    retry_after: None
                },
                1
            ),
            None
        );
        let limited = FetchError::RateLimited {
            retry_after: Some(Duration::from_secs(3)),
        };
        assert_eq!(retry_gap(&limited, 1), Some(Duration::from_secs(3)));
    }

    #[test]
    fn retry_after_is_honoured_and_zero_means_the_doubling() {
        let err = FetchError::RateLimited {
            retry_after: Some(Duration::from_secs(120)),
        };
        assert_eq!(backoff(&settings(), 1, &err).wait, Duration::from_secs(120));
        let err = FetchError::RateLimited {
            retry_after: Some(Duration::from_secs(0)),
        };
        assert_eq!(backoff(&settings(), 3, &err).wait, Duration::from_secs(4));
    }
}
