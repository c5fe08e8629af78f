//! What the operator observes about a provider's work, the input of its reputation and of
//! adaptive verification, and the model that weighs them (`standing`).

use std::fmt;

pub mod standing;

pub use standing::{Counts, Decay, QuarantineRule, Standing};

/// One thing the operator saw a provider do with one attempt.
///
/// Honesty and reliability are kept apart: a result that was outvoted says the provider lied
/// (or its machine is broken); an attempt it lost or let time out says it is unreliable.
/// Failures caused by the submitter (a task that exits non-zero everywhere, a timeout too
/// short for any machine) are neither and are not observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Observed {
    /// Its result was compared with another provider's and they matched.
    Agreed,
    /// Its result was compared and lost: a quorum of other providers returned another one.
    Outvoted,
    /// Its result was accepted without being compared (not chosen for a check).
    Unverified,
    /// It ran the attempt to an end (any exit code) and reported it.
    Completed,
    /// It went away with the attempt running (session lost past the grace period).
    Lost,
    /// The operator failed the attempt for running past its timeout plus grace.
    TimedOut,
    /// It stopped the attempt itself (the machine's owner took it back).
    Preempted,
}

impl Observed {
    pub const ALL: [Observed; 7] =
        [Observed::Agreed, Observed::Outvoted, Observed::Unverified, Observed::Completed, Observed::Lost, Observed::TimedOut, Observed::Preempted];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Observed::Agreed => "Agreed",
            Observed::Outvoted => "Outvoted",
            Observed::Unverified => "Unverified",
            Observed::Completed => "Completed",
            Observed::Lost => "Lost",
            Observed::TimedOut => "TimedOut",
            Observed::Preempted => "Preempted",
        }
    }

    /// The variant for a stored name.
    pub fn parse(s: &str) -> Option<Observed> {
        Observed::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// Whether it is about the provider's honesty (a verification outcome) rather than its
    /// reliability.
    pub fn is_verification(self) -> bool {
        matches!(self, Observed::Agreed | Observed::Outvoted | Observed::Unverified)
    }
}

impl fmt::Display for Observed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One observation, as stored. An attempt has at most one observation of each kind, so
/// recording one twice is harmless; a later check may add `Agreed` or `Outvoted` to an attempt
/// first observed `Unverified`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub node: String,
    /// The kind of work, for trust that is earned per workload (adaptive verification): the
    /// runtime and what it runs, e.g. `wasm:<module sha256>` or `container:<image>`.
    pub workload: String,
    pub job_uid: String,
    pub attempt_id: String,
    pub observed: Observed,
    /// When it was observed, Unix ms.
    pub at_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_observation_kind_reads_back_from_its_stored_name() {
        for o in Observed::ALL {
            assert_eq!(Observed::parse(o.as_str()), Some(o));
        }
        assert_eq!(Observed::parse("agreed"), None);
        assert_eq!(Observed::ALL.iter().filter(|o| o.is_verification()).count(), 3);
    }
}
