//! A token bucket with the time passed in: `burst` requests at once, then `per_second`. Pure,
//! so every refill and wait is unit-tested without sleeping.

use std::time::{Duration, Instant};

/// A client-side request budget, as client-go's QPS/burst: bursts up to `burst`, sustained
/// `per_second`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    burst: f64,
    per_second: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`. A zero burst is taken as one (a bucket that can never hold a
    /// token would never allow a request); a non-positive rate never refills.
    pub fn new(burst: u32, per_second: f64, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket { burst, per_second: per_second.max(0.0), tokens: burst, at: now }
    }

    /// Takes one token at `now`, or says how long until one is there. A refused take leaves
    /// the bucket as it was, so waiters that retry after the answer are served in turn.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        if self.per_second == 0.0 {
            return Err(Duration::from_secs(3600));
        }
        Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_second))
    }

    /// Tokens available at `now` (whole requests allowed at once).
    pub fn available(&mut self, now: Instant) -> u32 {
        self.refill(now);
        self.tokens as u32
    }

    fn refill(&mut self, now: Instant) {
        // An `Instant` older than the last one (two callers racing) adds nothing.
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.at = self.at.max(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_full_bucket_allows_its_burst_then_waits_one_token_time() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3, 10.0, t0);
        for _ in 0..3 {
            assert_eq!(b.take(t0), Ok(()));
        }
        assert_eq!(b.take(t0), Err(ms(100)));
        // A refused take costs nothing: the same wait again.
        assert_eq!(b.take(t0), Err(ms(100)));
        assert_eq!(b.take(t0 + ms(100)), Ok(()));
        assert_eq!(b.take(t0 + ms(100)), Err(ms(100)));
    }

    #[test]
    fn the_sustained_rate_is_the_configured_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 50.0, t0);
        // Over 10 s, taking whenever allowed every millisecond: burst + 10 s × 50.
        let mut taken = 0;
        for i in 0..=10_000 {
            if b.take(t0 + ms(i)).is_ok() {
                taken += 1;
            }
        }
        assert!((509..=511).contains(&taken), "{taken}");
    }

    #[test]
    fn a_quiet_period_refills_to_the_burst_and_no_further() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(5, 100.0, t0);
        for _ in 0..5 {
            b.take(t0).unwrap();
        }
        assert_eq!(b.available(t0), 0);
        assert_eq!(b.available(t0 + ms(20)), 2);
        assert_eq!(b.available(t0 + Duration::from_secs(60)), 5);
    }

    #[test]
    fn degenerate_settings_neither_panic_nor_allow_more_than_they_say() {
        let t0 = Instant::now();
        let mut zero_burst = TokenBucket::new(0, 1.0, t0);
        assert_eq!(zero_burst.take(t0), Ok(()));
        assert_eq!(zero_burst.take(t0), Err(Duration::from_secs(1)));
        let mut no_rate = TokenBucket::new(1, 0.0, t0);
        assert_eq!(no_rate.take(t0), Ok(()));
        assert!(no_rate.take(t0 + Duration::from_secs(1000)).is_err());
        let mut negative = TokenBucket::new(1, -5.0, t0);
        assert_eq!(negative.take(t0), Ok(()));
        assert!(negative.take(t0 + Duration::from_secs(10)).is_err());
    }

    #[test]
    fn a_clock_read_out_of_order_adds_no_tokens() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1, 10.0, t0 + ms(500));
        b.take(t0 + ms(500)).unwrap();
        // An earlier instant (a caller that read the clock before another took) refills nothing.
        assert!(b.take(t0).is_err());
        assert_eq!(b.take(t0 + ms(600)), Ok(()));
    }
}
