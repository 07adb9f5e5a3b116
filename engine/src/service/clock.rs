//! The engine's clock, injected: the service reads the time only through [`Clock`], so what
//! depends on it (dedupe day buckets, timer deadlines, the ended index, admission's sliding
//! minute, metering, host report ages) can be driven by a clock a test sets and steps. Production
//! uses [`SystemClock`]. Elapsed-time measurements (latencies, backoff) keep `Instant`: they
//! measure the process, not the wall clock the state is stamped with.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};

/// Where the engine reads the wall-clock time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> DateTime<Utc>;

    /// [`Clock::now`] in milliseconds since the Unix epoch, as Redis scores and thred stamps hold it.
    fn now_ms(&self) -> i64 {
        self.now().timestamp_millis()
    }
}

/// The system's clock.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that stands still until told otherwise (tests).
#[derive(Debug)]
pub struct ManualClock {
    ms: AtomicI64,
}

impl ManualClock {
    /// A clock showing `start`.
    pub fn at(start: DateTime<Utc>) -> ManualClock {
        ManualClock { ms: AtomicI64::new(start.timestamp_millis()) }
    }

    pub fn set(&self, time: DateTime<Utc>) {
        self.ms.store(time.timestamp_millis(), Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        self.ms.fetch_add(i64::try_from(by.as_millis()).unwrap_or(i64::MAX), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        // Out of chrono's range only after year 262143: the epoch is a clear wrong answer then.
        DateTime::from_timestamp_millis(self.ms.load(Ordering::SeqCst)).unwrap_or_default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::service::Keys;

    fn time(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_manual_clock_stands_still_until_set_or_advanced() {
        let clock = ManualClock::at(time("2026-12-01T23:59:59.500Z"));
        assert_eq!(clock.now(), time("2026-12-01T23:59:59.500Z"));
        assert_eq!(clock.now(), clock.now());
        clock.advance(Duration::from_millis(700));
        assert_eq!(clock.now(), time("2026-12-02T00:00:00.200Z"));
        assert_eq!(clock.now_ms(), time("2026-12-02T00:00:00.200Z").timestamp_millis());
        clock.set(time("2027-01-01T00:00:00Z"));
        assert_eq!(clock.now(), time("2027-01-01T00:00:00Z"));
    }

    #[test]
    fn the_dedupe_buckets_roll_over_at_midnight_utc() {
        let keys = Keys::new("p");
        let clock = ManualClock::at(time("2026-12-01T23:59:59.999Z"));
        let (today, yesterday) = keys.seen(clock.now_ms());
        clock.advance(Duration::from_millis(1));
        let (next_today, next_yesterday) = keys.seen(clock.now_ms());
        assert_ne!(today, next_today);
        assert_eq!(today, next_yesterday, "yesterday's set is still checked after midnight");
        assert_ne!(yesterday, next_yesterday);
    }

    #[test]
    fn the_system_clock_is_now() {
        let before = Utc::now();
        let read = SystemClock.now();
        assert!(before <= read && read <= Utc::now());
    }
}
