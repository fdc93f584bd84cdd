//! Jittered exponential backoff for retries after database errors.

use std::time::Duration;

const FIRST: Duration = Duration::from_millis(100);

/// Waits that double from 100 ms up to a cap, each drawn uniformly from its
/// upper half so that instances retrying together spread out.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
    rng: fastrand::Rng,
}

impl Backoff {
    pub(crate) fn new(max: Duration, seed: u64) -> Self {
        Backoff {
            next: FIRST.min(max),
            max,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// The wait before the next retry.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = d / 2;
        half + half.mul_f64(self.rng.f64())
    }

    /// Back to the shortest wait, after a success.
    pub(crate) fn reset(&mut self) {
        self.next = FIRST.min(self.max);
    }
}

/// A per-process seed: different in every process, so replicas do not
/// retry or tick in step.
pub(crate) fn process_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), 7);
        let waits: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(waits[0] >= Duration::from_millis(50) && waits[0] <= Duration::from_millis(100));
        assert!(waits[7] >= Duration::from_millis(500) && waits[7] <= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
