//! A provider's standing: decayed counts of what it was observed doing, and the honesty,
//! reliability and reputation computed from them. Pure: time is passed in, in Unix ms.
//!
//! - **Honesty** is `(agreed + 1) / (agreed + 1 + 10 × outvoted)`: a provider is honest until
//!   outvoted, and one outvoted result undoes ten agreed ones. `Unverified` is neutral: an
//!   unchecked result says nothing about whether it was right, and crediting it would let a
//!   liar raise its score with exactly the results nobody compares (its reliability already
//!   credits the run as `Completed`).
//! - **Reliability** is `(completed + 1) / (completed + lost + timedOut + preempted/2 + 2)`: a
//!   new provider starts at 0.5. A preemption counts half: it is announced and the task is
//!   placed again at once, where a loss or a timeout costs the grace period first. The
//!   submitter's own failures (a task exiting non-zero everywhere) are `Completed` runs.
//! - **Reputation** is honesty × reliability, in thousandths (`placement.minReputation`, score).
//!
//! Each observation weighs `2^(-age / half-life)`, so recent behaviour counts more and an old
//! slip fades; the counts are kept decayed to one instant, so a standing is seven numbers
//! however long the history.

use std::time::Duration;

use super::Observed;
use crate::scheduler::Reputation;

/// How many agreed results one outvoted result undoes.
pub const OUTVOTED_WEIGHT: f64 = 10.0;
/// How much of a loss one preemption is.
pub const PREEMPTED_WEIGHT: f64 = 0.5;
/// How many half-lives of observations a rebuild reads: older ones weigh under 1/32.
pub const WINDOW_HALF_LIVES: i64 = 5;

/// Exponential decay with a half-life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decay {
    half_life_ms: i64,
}

impl Decay {
    /// A decay halving weights every `half_life`, which must be at least a minute (a shorter
    /// one would forget a provider between two of its tasks).
    pub fn new(half_life: Duration) -> Result<Decay, String> {
        let ms = i64::try_from(half_life.as_millis()).map_err(|_| format!("reputation half-life {half_life:?} is too long"))?;
        if ms < 60_000 {
            return Err(format!("reputation half-life {}s is too short: at least 60s", half_life.as_secs()));
        }
        Ok(Decay { half_life_ms: ms })
    }

    pub fn half_life(self) -> Duration {
        Duration::from_millis(self.half_life_ms as u64)
    }

    /// The weight of something `age_ms` old: 1 now, 1/2 one half-life ago. A future instant
    /// (clocks of two operator replicas) weighs 1.
    pub fn factor(self, age_ms: i64) -> f64 {
        if age_ms <= 0 { 1.0 } else { (-(age_ms as f64) / self.half_life_ms as f64).exp2() }
    }

    /// How far back observations still matter: [`WINDOW_HALF_LIVES`] half-lives.
    pub fn window_ms(self) -> i64 {
        self.half_life_ms.saturating_mul(WINDOW_HALF_LIVES)
    }
}

impl Default for Decay {
    /// A week: a provider's standing follows its last few weeks of work.
    fn default() -> Decay {
        Decay { half_life_ms: 7 * 24 * 3600 * 1000 }
    }
}

/// Decayed counts of each kind of observation.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Counts {
    pub agreed: f64,
    pub outvoted: f64,
    pub unverified: f64,
    pub completed: f64,
    pub lost: f64,
    pub timed_out: f64,
    pub preempted: f64,
}

impl Counts {
    pub fn get(&self, o: Observed) -> f64 {
        match o {
            Observed::Agreed => self.agreed,
            Observed::Outvoted => self.outvoted,
            Observed::Unverified => self.unverified,
            Observed::Completed => self.completed,
            Observed::Lost => self.lost,
            Observed::TimedOut => self.timed_out,
            Observed::Preempted => self.preempted,
        }
    }

    fn get_mut(&mut self, o: Observed) -> &mut f64 {
        match o {
            Observed::Agreed => &mut self.agreed,
            Observed::Outvoted => &mut self.outvoted,
            Observed::Unverified => &mut self.unverified,
            Observed::Completed => &mut self.completed,
            Observed::Lost => &mut self.lost,
            Observed::TimedOut => &mut self.timed_out,
            Observed::Preempted => &mut self.preempted,
        }
    }

    fn scaled(mut self, f: f64) -> Counts {
        for o in Observed::ALL {
            *self.get_mut(o) *= f;
        }
        self
    }

    /// The same counts without the verification outcomes (what a quarantine lift forgives).
    pub fn reliability_only(self) -> Counts {
        Counts { agreed: 0.0, outvoted: 0.0, unverified: 0.0, ..self }
    }

    /// Results compared with other providers' (agreed or outvoted).
    pub fn verified(&self) -> f64 {
        self.agreed + self.outvoted
    }

    /// The share of compared results that were outvoted (0 with none compared).
    pub fn outvoted_share(&self) -> f64 {
        if self.verified() <= 0.0 { 0.0 } else { self.outvoted / self.verified() }
    }

    /// `(agreed + 1) / (agreed + 1 + 10 × outvoted)`: 1 until outvoted.
    pub fn honesty(&self) -> Reputation {
        thousandths((self.agreed + 1.0) / (self.agreed + 1.0 + OUTVOTED_WEIGHT * self.outvoted))
    }

    /// `(completed + 1) / (completed + lost + timedOut + preempted/2 + 2)`: 0.5 for a new provider.
    pub fn reliability(&self) -> Reputation {
        let failures = self.lost + self.timed_out + PREEMPTED_WEIGHT * self.preempted;
        thousandths((self.completed + 1.0) / (self.completed + failures + 2.0))
    }

    /// Honesty × reliability.
    pub fn reputation(&self) -> Reputation {
        Reputation((self.honesty().0 as u32 * self.reliability().0 as u32 / 1000) as u16)
    }
}

/// A ratio in 0..=1 as thousandths, rounded down (a standing is never rounded up into a
/// job's `minReputation`).
fn thousandths(ratio: f64) -> Reputation {
    Reputation((ratio.clamp(0.0, 1.0) * 1000.0).floor() as u16)
}

/// A provider's counts, decayed to one instant: recording an observation decays what is there
/// to the newer of the two instants and adds the observation at its own age.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Standing {
    counts: Counts,
    /// The instant `counts` are decayed to (0: nothing recorded).
    as_of_ms: i64,
}

impl Standing {
    /// Adds one observation made at `at_ms`, in any order relative to earlier ones.
    pub fn record(&mut self, observed: Observed, at_ms: i64, decay: Decay) {
        if at_ms > self.as_of_ms {
            self.counts = self.counts.scaled(decay.factor(at_ms - self.as_of_ms));
            self.as_of_ms = at_ms;
        }
        *self.counts.get_mut(observed) += decay.factor(self.as_of_ms - at_ms);
    }

    /// The counts as they weigh at `now_ms`.
    pub fn counts_at(&self, now_ms: i64, decay: Decay) -> Counts {
        self.counts.scaled(decay.factor(now_ms - self.as_of_ms))
    }

    /// This standing minus `earlier` (a snapshot of it taken before, at `earlier.as_of`): what
    /// was recorded since that snapshot, which is how a quarantine lift forgives the past
    /// without reading it again. Decayed sums are linear, so this is exact up to rounding.
    pub fn since(&self, earlier: &Standing, decay: Decay) -> Standing {
        let now = self.as_of_ms.max(earlier.as_of_ms);
        let (a, b) = (self.counts_at(now, decay), earlier.counts_at(now, decay));
        let mut counts = Counts::default();
        for o in Observed::ALL {
            *counts.get_mut(o) = (a.get(o) - b.get(o)).max(0.0);
        }
        Standing { counts, as_of_ms: now }
    }
}

/// When a provider is quarantined: more than `max_outvoted_share` of its compared results
/// (decayed) were outvoted, over at least `min_verified` of them, so one bad result does not
/// quarantine a new provider.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuarantineRule {
    pub max_outvoted_share: f64,
    pub min_verified: f64,
}

impl QuarantineRule {
    /// A rule; the share must be in 0..1 and the minimum at least 1.
    pub fn new(max_outvoted_share: f64, min_verified: f64) -> Result<QuarantineRule, String> {
        if !(0.0..1.0).contains(&max_outvoted_share) {
            return Err(format!("quarantine outvoted share {max_outvoted_share} must be at least 0 and below 1"));
        }
        if !(min_verified >= 1.0 && min_verified.is_finite()) {
            return Err(format!("quarantine minimum of verified results {min_verified} must be at least 1"));
        }
        Ok(QuarantineRule { max_outvoted_share, min_verified })
    }

    /// Whether `counts` call for a quarantine. The number of compared results is taken to one
    /// decimal, as the figures show it: results made minutes apart have decayed by a hair, and
    /// ten of them count as ten.
    pub fn trips(&self, counts: &Counts) -> bool {
        (counts.verified() * 10.0).round() >= self.min_verified * 10.0 && counts.outvoted_share() > self.max_outvoted_share
    }

    /// Why, in figures: "4.0 of 10.0 compared results outvoted (40%, limit 10%)".
    pub fn explain(&self, counts: &Counts) -> String {
        format!(
            "{:.1} of {:.1} compared results outvoted ({:.0}%, limit {:.0}% over at least {:.0})",
            counts.outvoted,
            counts.verified(),
            counts.outvoted_share() * 100.0,
            self.max_outvoted_share * 100.0,
            self.min_verified
        )
    }
}

impl Default for QuarantineRule {
    /// Honest machines are outvoted only when broken (a flaky one about 1 in 100); a provider
    /// lying on a tenth of its results trips it once ten of them were compared.
    fn default() -> QuarantineRule {
        QuarantineRule { max_outvoted_share: 0.1, min_verified: 10.0 }
    }
}

#[cfg(test)]
#[path = "standing_tests.rs"]
mod tests;
