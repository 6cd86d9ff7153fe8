//! The one formula for pauses between retries: doubling from a first pause
//! up to a cap, optionally jittered.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { first, max }
    }

    /// The pause before retry number `retry` (0 for the first retry):
    /// `first`, doubled for each retry before it, at most `max`.
    pub fn pause(&self, retry: u32) -> Duration {
        // 2^20 × any sensible `first` is past any sensible cap.
        self.first.saturating_mul(1 << retry.min(20)).min(self.max)
    }

    /// [`Backoff::pause`] scaled by a random factor in [0.5, 1.5), so that
    /// writers that collided do not retry in lockstep.
    pub fn jittered(&self, retry: u32) -> Duration {
        use std::hash::{BuildHasher, Hasher};
        // A fresh RandomState is randomly keyed: enough randomness for
        // spreading retries, without a dependency.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(retry);
        let r = (h.finish() % 1000) as f64 / 1000.0;
        self.pause(retry).mul_f64(0.5 + r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));

    #[test]
    fn doubles_up_to_the_cap() {
        assert_eq!(B.pause(0), Duration::from_millis(50));
        assert_eq!(B.pause(1), Duration::from_millis(100));
        assert_eq!(B.pause(5), Duration::from_millis(1600));
        assert_eq!(B.pause(6), Duration::from_secs(2));
        assert_eq!(B.pause(u32::MAX), Duration::from_secs(2));
    }

    #[test]
    fn jitter_is_bounded() {
        for retry in 0..20 {
            let j = B.jittered(retry);
            assert!(
                j >= Duration::from_millis(25) && j < Duration::from_secs(3),
                "{j:?}"
            );
        }
    }
}
