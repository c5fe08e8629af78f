//! Token buckets for the gateway's entry points: Joins per source address (unauthenticated, so
//! the only key there is) and session opens per node, each a burst and then a steady rate.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A burst and a steady rate after it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests allowed at once after a quiet period.
    pub burst: u32,
    /// Requests allowed per second once the burst is spent.
    pub per_second: f64,
}

/// Keys kept before buckets that have refilled are dropped; past this many live ones, new keys
/// are refused (a flood from very many addresses gets no memory of its own).
const MAX_KEYS: usize = 65_536;

/// One bucket per key, refilled continuously.
pub struct RateLimiter<K> {
    rate: Rate,
    buckets: Mutex<HashMap<K, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(rate: Rate) -> Self {
        RateLimiter { rate, buckets: Mutex::default() }
    }

    /// Takes one request from `key`'s bucket; when it is empty, how long until one is available.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let burst = f64::from(self.rate.burst.max(1));
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(key) && buckets.len() >= MAX_KEYS {
            // A bucket back at full burst says nothing a fresh one would not.
            buckets.retain(|_, b| self.refilled(b, now) < burst);
            if buckets.len() >= MAX_KEYS {
                return Err(Duration::from_secs(1));
            }
        }
        let b = buckets.entry(key.clone()).or_insert(Bucket { tokens: burst, at: now });
        b.tokens = self.refilled(b, now);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else if self.rate.per_second > 0.0 {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.rate.per_second))
        } else {
            Err(Duration::from_secs(3600))
        }
    }

    fn refilled(&self, b: &Bucket, now: Instant) -> f64 {
        let burst = f64::from(self.rate.burst.max(1));
        (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * self.rate.per_second).min(burst)
    }

    /// How many keys have a bucket (for tests and metrics).
    pub fn keys(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The key a source address is limited under: the IPv4 address, or the IPv6 /64 (one site
/// usually holds a whole /64, so per-address buckets there would cost nothing to evade).
pub fn source_key(addr: Option<SocketAddr>) -> IpAddr {
    match addr.map(|a| a.ip().to_canonical()) {
        Some(IpAddr::V6(v6)) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        Some(v4) => v4,
        // Only a transport without addresses (none the gateway serves): one shared bucket.
        None => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    }
}

/// The retry hint given with a refusal, rounded up to a tenth of a second.
pub fn retry_hint(after: Duration) -> String {
    format!("{:.1}s", (after.as_secs_f64() * 10.0).ceil() / 10.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_steady_rate() {
        let limiter = RateLimiter::new(Rate { burst: 3, per_second: 2.0 });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check_at(&"a", t0).is_ok());
        }
        let wait = limiter.check_at(&"a", t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert!(limiter.check_at(&"b", t0).is_ok(), "keys are independent");
        assert!(limiter.check_at(&"a", t0 + Duration::from_millis(500)).is_ok(), "one request back after 1/rate");
        assert!(limiter.check_at(&"a", t0 + Duration::from_millis(600)).is_err());
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        let allowed = (0..10).filter(|_| limiter.check_at(&"a", later).is_ok()).count();
        assert_eq!(allowed, 3);
    }

    #[test]
    fn ipv6_sources_share_their_64() {
        let a: SocketAddr = "[2001:db8:1:2:aaaa::1]:5000".parse().unwrap();
        let b: SocketAddr = "[2001:db8:1:2:bbbb::9]:6000".parse().unwrap();
        let c: SocketAddr = "[2001:db8:1:3::1]:6000".parse().unwrap();
        assert_eq!(source_key(Some(a)), source_key(Some(b)));
        assert_ne!(source_key(Some(a)), source_key(Some(c)));
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:1".parse().unwrap();
        assert_eq!(source_key(Some(mapped)), "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(retry_hint(Duration::from_millis(201)), "0.3s");
    }
}
