//! Time-based throttles, pure and clock-injected so they are tested with plain instants: the
//! activity debouncer (one `session.activity` per session per interval) and the per-connection
//! message-rate limiter.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// Folds bursts of user activity into at most one event per session per interval.
///
/// Leading edge: the first activity after a quiet interval is published at once (so an idle
/// session wakes immediately); activity inside the interval is folded into it. The engine's idle
/// timer therefore lags the last keystroke by at most one interval, which is why the interval must
/// stay well below the profile's idle timeout.
#[derive(Debug)]
pub struct ActivityDebouncer {
    interval: Duration,
    last_published: HashMap<String, Instant>,
    admissions_since_sweep: usize,
}

/// Forget sessions after this many admissions if their window has passed, so the map stays small.
const SWEEP_EVERY: usize = 1024;

impl ActivityDebouncer {
    pub fn new(interval: Duration) -> ActivityDebouncer {
        ActivityDebouncer { interval, last_published: HashMap::new(), admissions_since_sweep: 0 }
    }

    /// Whether activity on `session` at `now` should be published (and if so, records it).
    pub fn admit(&mut self, session: &str, now: Instant) -> bool {
        self.admissions_since_sweep += 1;
        if self.admissions_since_sweep >= SWEEP_EVERY {
            self.admissions_since_sweep = 0;
            let interval = self.interval;
            self.last_published.retain(|_, published| now.duration_since(*published) < interval);
        }
        match self.last_published.get(session) {
            Some(published) if now.duration_since(*published) < self.interval => false,
            _ => {
                self.last_published.insert(session.to_owned(), now);
                true
            }
        }
    }

    /// Forgets a publication that did not reach the broker, so the next activity tries again.
    pub fn forget(&mut self, session: &str) {
        self.last_published.remove(session);
    }
}

/// A token bucket: `per_second` frames per second with bursts up to one second's worth.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    tokens: f64,
    refilled_at: Instant,
}

impl RateLimiter {
    pub fn new(per_second: u32, now: Instant) -> RateLimiter {
        let per_second = f64::from(per_second.max(1));
        RateLimiter { per_second, tokens: per_second, refilled_at: now }
    }

    /// Takes one token if there is one.
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        let elapsed = now.duration_since(self.refilled_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.per_second);
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debouncer_admits_one_per_interval_per_session() {
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);
        let mut debouncer = ActivityDebouncer::new(Duration::from_secs(5));
        let admitted: Vec<bool> = [(0, "a"), (100, "a"), (200, "b"), (4_999, "a"), (5_000, "a"), (5_200, "b"), (9_999, "a"), (10_000, "a")]
            .into_iter()
            .map(|(millis, session)| debouncer.admit(session, at(millis)))
            .collect();
        assert_eq!(admitted, [true, false, true, false, true, true, false, true]);
        debouncer.forget("a");
        assert!(debouncer.admit("a", at(10_001)));
    }

    #[test]
    fn rate_limiter_allows_bursts_then_refills() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(3, start);
        let burst: Vec<bool> = (0..4).map(|_| limiter.try_acquire(start)).collect();
        assert_eq!(burst, [true, true, true, false]);
        assert!(!limiter.try_acquire(start + Duration::from_millis(100)));
        assert!(limiter.try_acquire(start + Duration::from_millis(400)));
        assert!(!limiter.try_acquire(start + Duration::from_millis(400)));
    }
}
