//! Small statistics the benchmarks share, so every `berth bench` reports percentiles the same way.

use std::time::Duration;

/// The nearest-rank percentile of `samples` (`fraction` in 0..=1); zero for no samples.
pub fn percentile(samples: &[Duration], fraction: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((fraction * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// A duration in (fractional) milliseconds, for printing.
pub fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<Duration> = (1..=20).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 0.5), Duration::from_millis(10));
        assert_eq!(percentile(&samples, 0.95), Duration::from_millis(19));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
