//! Write fencing for leader election: a leader may write only until the moment its last Lease
//! renewal stops protecting it. Checked before every state-changing step, so a leader that was
//! frozen (paused VM, SIGSTOP, long GC-like stall) past its Lease cannot write when it wakes,
//! even before its renewal loop notices and stops the process.

use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A write permit with an expiry. `Fence::open()` never expires (no leader election).
#[derive(Clone, Debug)]
pub struct Fence {
    until: Option<Arc<Mutex<Option<Instant>>>>,
}

/// Refusal to write: this replica is not (or no longer) the leader.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this operator replica is not the leader (its Lease is not held or has lapsed); refusing to write")]
pub struct Fenced;

impl Fence {
    /// No fencing: a single replica without leader election.
    pub fn open() -> Self {
        Fence { until: None }
    }

    /// Fenced, and closed until `extend` is called.
    pub fn closed() -> Self {
        Fence { until: Some(Arc::new(Mutex::new(None))) }
    }

    /// Allows writes until `deadline`.
    pub fn extend(&self, deadline: Instant) {
        if let Some(u) = &self.until {
            *u.lock().unwrap_or_else(|p| p.into_inner()) = Some(deadline);
        }
    }

    /// Refuses writes from now on.
    pub fn close(&self) {
        if let Some(u) = &self.until {
            *u.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// Whether writes are under leader election (not `Fence::open()`). An elected writer also
    /// claims a new epoch in each database it writes when it opens it, and checks inside every
    /// write transaction that the epoch is still its own: a replica frozen past its Lease (whose
    /// clock check above passed just before the freeze) cannot commit once another has claimed.
    pub fn elected(&self) -> bool {
        self.until.is_some()
    }

    /// Whether writes are allowed now, by the time since the last Lease renewal.
    pub fn check(&self) -> Result<(), Fenced> {
        match &self.until {
            None => Ok(()),
            Some(u) => match *u.lock().unwrap_or_else(|p| p.into_inner()) {
                Some(deadline) if Instant::now() < deadline => Ok(()),
                _ => Err(Fenced),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_fence_opens_until_its_deadline() {
        assert_eq!(Fence::open().check(), Ok(()));
        assert!(!Fence::open().elected());
        let f = Fence::closed();
        assert!(f.elected());
        assert_eq!(f.check(), Err(Fenced));
        f.extend(Instant::now() + Duration::from_secs(60));
        assert_eq!(f.clone().check(), Ok(()));
        f.extend(Instant::now() - Duration::from_millis(1));
        assert_eq!(f.check(), Err(Fenced));
        f.extend(Instant::now() + Duration::from_secs(60));
        f.close();
        assert_eq!(f.check(), Err(Fenced));
    }
}
