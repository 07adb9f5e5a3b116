//! The one backoff policy of every reconnect and retry loop (the bus, the agents' watchers and
//! consumers, the engine's store): `backon`'s exponential backoff, so no component does the
//! doubling and capping by hand. A loop takes its next delay from the iterator [`doubling`]
//! returns, and takes a fresh one to start again from the first delay.

use std::time::Duration;

use backon::BackoffBuilder;
pub use backon::ExponentialBackoff;

/// Delays from `first`, doubling up to `cap`, without end and without jitter.
pub fn doubling(first: Duration, cap: Duration) -> ExponentialBackoff {
    backon::ExponentialBuilder::new().with_min_delay(first).with_max_delay(cap).with_factor(2.0).without_max_times().build()
}

/// The same delays, `times` of them: a retry loop that gives up after `times + 1` attempts.
pub fn doubling_times(first: Duration, cap: Duration, times: usize) -> ExponentialBackoff {
    backon::ExponentialBuilder::new().with_min_delay(first).with_max_delay(cap).with_factor(2.0).with_max_times(times).build()
}

/// The next delay of an endless [`doubling`] backoff; `cap` if it ever ran out.
pub fn next_delay(delays: &mut ExponentialBackoff, cap: Duration) -> Duration {
    delays.next().unwrap_or(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_go_on() {
        let mut delays = doubling(Duration::from_millis(100), Duration::from_millis(500));
        let taken: Vec<Duration> = (0..6).map(|_| next_delay(&mut delays, Duration::from_secs(9))).collect();
        let millis: Vec<u128> = taken.iter().map(Duration::as_millis).collect();
        assert_eq!(millis, [100, 200, 400, 500, 500, 500]);
    }

    #[test]
    fn a_limit_ends_the_delays() {
        let delays = doubling_times(Duration::from_millis(10), Duration::from_secs(1), 2);
        assert_eq!(delays.count(), 2);
    }
}
