//! The operator's budget of API-server writes: a client-side QPS/burst every ProviderNode and
//! Event write takes from, the coalescing queue feeding it, and the write-rate model.

pub mod bucket;
pub mod coalesce;
pub mod model;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

pub use bucket::TokenBucket;
pub use coalesce::{Coalescer, Merge, Pushed};

/// Requests the writers may make: `burst` at once, then `qps`. Shared by the writers of one
/// process; the leader Lease has a client of its own and takes nothing from it, so a storm of
/// writes can delay ProviderNodes but never the renewal that keeps this replica leader.
pub struct ApiBudget {
    bucket: Mutex<TokenBucket>,
    taken: AtomicU64,
}

impl ApiBudget {
    pub fn new(qps: f64, burst: u32) -> Self {
        ApiBudget { bucket: Mutex::new(TokenBucket::new(burst, qps, tokio::time::Instant::now().into_std())), taken: AtomicU64::new(0) }
    }

    /// A budget that never makes anyone wait (tests that script every request).
    pub fn unlimited() -> Self {
        Self::new(f64::MAX, u32::MAX)
    }

    /// Waits until one request may be made, and counts it.
    pub async fn acquire(&self) {
        loop {
            let wait = self.bucket.lock().unwrap_or_else(|p| p.into_inner()).take(tokio::time::Instant::now().into_std());
            match wait {
                Ok(()) => {
                    self.taken.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(d) => tokio::time::sleep(d).await,
            }
        }
    }

    /// Requests made so far.
    pub fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn acquiring_past_the_burst_waits_for_the_rate() {
        let budget = ApiBudget::new(100.0, 2);
        let start = tokio::time::Instant::now();
        for _ in 0..4 {
            budget.acquire().await;
        }
        assert_eq!(budget.taken(), 4);
        // Two at once, then one every 10 ms.
        assert!(start.elapsed() >= std::time::Duration::from_millis(19), "{:?}", start.elapsed());
    }
}
