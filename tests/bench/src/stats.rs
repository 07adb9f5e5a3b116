//! The one statistics module of every `berth bench`: latencies go into an HDR histogram
//! (`hdrhistogram`, three significant digits, so a percentile is within 0.1% of the sample it
//! stands for), and every bench reads its percentiles from one, the same way.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Significant decimal digits the histograms keep: 0.1% resolution at any magnitude.
const SIGNIFICANT_DIGITS: u8 = 3;

/// Recorded durations (nanoseconds in an auto-resizing HDR histogram).
#[derive(Debug, Clone)]
pub struct Latencies {
    histogram: Histogram<u64>,
}

impl Latencies {
    /// An empty record.
    pub fn new() -> Self {
        // Three significant digits is within the range `new` accepts (0..=5): it cannot fail.
        let histogram = Histogram::new(SIGNIFICANT_DIGITS).unwrap_or_else(|_| unreachable!("3 significant digits are valid"));
        Self { histogram }
    }

    /// Adds one sample (saturating at `u64::MAX` nanoseconds, some 584 years).
    pub fn record(&mut self, sample: Duration) {
        let nanos = u64::try_from(sample.as_nanos()).unwrap_or(u64::MAX);
        // The histogram grows to fit (`record` resizes it); only a value past what it can ever
        // track is clamped (`saturating_record` alone would clamp at the initial range).
        if self.histogram.record(nanos.max(1)).is_err() {
            self.histogram.saturating_record(nanos.max(1));
        }
    }

    /// How many samples were recorded.
    pub fn len(&self) -> u64 {
        self.histogram.len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.histogram.is_empty()
    }

    /// The value at `fraction` (0..=1) of the samples; zero for no samples.
    pub fn percentile(&self, fraction: f64) -> Duration {
        if self.histogram.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.histogram.value_at_quantile(fraction.clamp(0.0, 1.0)))
    }

    /// The mean sample; zero for no samples.
    pub fn mean(&self) -> Duration {
        if self.histogram.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(self.histogram.mean() / 1e9)
    }

    /// The largest sample; zero for no samples.
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.histogram.max())
    }
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> FromIterator<&'a Duration> for Latencies {
    fn from_iter<I: IntoIterator<Item = &'a Duration>>(samples: I) -> Self {
        let mut latencies = Self::new();
        for sample in samples {
            latencies.record(*sample);
        }
        latencies
    }
}

impl FromIterator<Duration> for Latencies {
    fn from_iter<I: IntoIterator<Item = Duration>>(samples: I) -> Self {
        samples.into_iter().collect::<Vec<_>>().iter().collect()
    }
}

/// The value at `fraction` (0..=1) of `samples`; zero for no samples. For a bench that keeps its
/// samples in order (to print or reuse them) and reads a percentile or two at the end.
pub fn percentile(samples: &[Duration], fraction: f64) -> Duration {
    samples.iter().collect::<Latencies>().percentile(fraction)
}

/// A duration in (fractional) milliseconds, for printing.
pub fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within the histogram's resolution (0.1%) of the nearest-rank sample.
    fn close(actual: Duration, expected: Duration) -> bool {
        actual.abs_diff(expected).as_secs_f64() <= expected.as_secs_f64() / 1000.0
    }

    #[test]
    fn percentiles_are_the_nearest_rank_within_the_resolution() {
        let samples: Vec<Duration> = (1..=20).map(Duration::from_millis).collect();
        assert!(close(percentile(&samples, 0.5), Duration::from_millis(10)), "{:?}", percentile(&samples, 0.5));
        assert!(close(percentile(&samples, 0.95), Duration::from_millis(19)), "{:?}", percentile(&samples, 0.95));
        assert!(close(percentile(&samples, 1.0), Duration::from_millis(20)));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn a_record_counts_and_averages_its_samples() {
        let latencies: Latencies = [Duration::from_micros(100), Duration::from_micros(300)].into_iter().collect();
        assert_eq!(latencies.len(), 2);
        assert!(close(latencies.mean(), Duration::from_micros(200)), "{:?}", latencies.mean());
        assert!(close(latencies.max(), Duration::from_micros(300)));
        assert!(Latencies::new().is_empty());
        assert_eq!(Latencies::new().percentile(0.99), Duration::ZERO);
    }

    #[test]
    fn long_and_short_samples_share_one_record() {
        let latencies: Latencies = [Duration::from_nanos(1), Duration::from_secs(3600)].into_iter().collect();
        assert!(close(latencies.percentile(1.0), Duration::from_secs(3600)));
        assert!(latencies.percentile(0.5) < Duration::from_micros(1));
    }
}
