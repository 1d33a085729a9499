//! Backoff after transient failures: exponential from `backoff_min` to `backoff_max`, with
//! jitter, never earlier than the provider's `Retry-After`.

use rand::Rng;
use std::time::Duration;

/// Jitter spread: each delay is scaled by a random factor in `1 ± JITTER`. Enough to keep a
/// ledger of chains that failed together from retrying in lockstep, small enough to keep the
/// schedule predictable for operators.
pub const JITTER: f64 = 0.2;

/// When an attempt's outcome is unknown (a timeout, a 5xx, a garbled 200), the provider may
/// have rotated the token, and the same token can be presented again only inside the reuse
/// leeway. Retries of such an attempt come at least this often, so that several fit inside
/// the leeway whatever `backoff_max` says.
pub const AMBIGUOUS_RETRY_MAX: Duration = Duration::from_secs(45);

/// The delay before attempt number `failures + 1`, given `failures >= 1` consecutive
/// failures so far.
pub fn delay(
    failures: u32,
    min: Duration,
    max: Duration,
    retry_after: Option<Duration>,
    ambiguous: bool,
) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let base = min.saturating_mul(1u32 << exp.min(20)).min(max);
    let factor = jitter_factor();
    let mut d = base.mul_f64(factor).min(max);
    if ambiguous {
        d = d.min(AMBIGUOUS_RETRY_MAX);
    }
    match retry_after {
        Some(r) => d.max(r),
        None => d,
    }
}

fn jitter_factor() -> f64 {
    let range = (1.0 - JITTER)..=(1.0 + JITTER);
    #[cfg(test)]
    if let Some(f) = crate::model::seeded(|r| r.random_range(range.clone())) {
        return f;
    }
    rand::rng().random_range(range)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn grows_exponentially_within_bounds() {
        for _ in 0..200 {
            let d1 = delay(1, S(30), S(1800), None, false);
            assert!(d1 >= S(24) && d1 <= S(36), "{d1:?}");
            let d3 = delay(3, S(30), S(1800), None, false);
            assert!(d3 >= S(96) && d3 <= S(144), "{d3:?}");
            let d30 = delay(30, S(30), S(1800), None, false);
            assert!(d30 >= S(1440) && d30 <= S(1800), "{d30:?}");
            assert!(delay(u32::MAX, S(30), S(1800), None, false) <= S(1800));
        }
    }

    #[test]
    fn retry_after_is_a_floor() {
        assert!(delay(1, S(1), S(5), Some(S(60)), false) >= S(60));
        assert!(delay(1, S(1), S(5), Some(S(60)), true) >= S(60));
    }

    #[test]
    fn ambiguous_outcomes_retry_inside_the_leeway() {
        assert!(delay(10, S(30), S(1800), None, true) <= AMBIGUOUS_RETRY_MAX);
    }

    #[test]
    fn jitter_spreads_delays() {
        let ds: std::collections::HashSet<_> = (0..50)
            .map(|_| delay(2, S(30), S(1800), None, false))
            .collect();
        assert!(ds.len() > 10, "jitter must spread delays, got {}", ds.len());
    }
}
