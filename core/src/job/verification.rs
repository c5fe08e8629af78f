//! How a job's results are verified (`spec.verification`) and the pure decisions behind it:
//! how many copies a round starts with, whether an unchecked result is checked, and trust.
//!
//! Modes: `None` accepts the first result; `Replicate` runs `replicas` copies and accepts the
//! first `quorum` matching results, adding copies on other owners up to `max_replicas` on
//! disagreement; `SpotCheck` re-runs a random `fraction` of results, drawn after the first
//! result arrived; `Adaptive` re-runs a result unless its provider earned trust on this kind of
//! work (see [`check_probability`]). A checked result needs two matching copies; on a mismatch
//! a third copy on a third owner breaks the tie (up to `max_replicas`).

use crate::reputation::{Observation, Observed};

/// Most copies one round of a task may run, whatever the mode.
pub const MAX_COPIES: u32 = 16;
/// Parts per million: fractions and probabilities are integers so decisions are exact.
pub const PPM: u32 = 1_000_000;

/// A validated `spec.verification`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verification {
    pub mode: Mode,
    /// Files under the task's scratch directory whose digests are compared too (relative
    /// paths, sorted).
    pub outputs: Vec<String>,
}

/// How results are verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The first result is accepted.
    #[default]
    None,
    /// `replicas` copies from the start; the first `quorum` matching results win.
    Replicate { replicas: u32, quorum: u32, max_replicas: u32 },
    /// `fraction_ppm` of the results are checked by a copy on another owner.
    SpotCheck { fraction_ppm: u32, max_replicas: u32 },
    /// Results are checked unless the provider is trusted on the workload class.
    Adaptive(Adaptive),
}

/// The parameters of adaptive replication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adaptive {
    /// Agreed results in a row (on this workload class, with no outvote in the provider's
    /// recent record) before a result of it may go unchecked.
    pub trusted_after: u32,
    /// The smallest chance a trusted provider's result is still checked, ppm.
    pub min_check_ppm: u32,
    pub max_replicas: u32,
}

impl Default for Adaptive {
    /// Tuned with `cargo bench --bench verification` (docs/VERIFICATION.md).
    fn default() -> Self {
        Adaptive { trusted_after: 6, min_check_ppm: 50_000, max_replicas: 3 }
    }
}

/// How one round of a task is judged: copies it starts with, matching results that win, and
/// the most copies it may grow to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundRule {
    pub initial: u32,
    pub quorum: u32,
    pub max: u32,
    /// Whether a lone first result is accepted only after a decision (spot check, adaptive).
    pub sampled: bool,
}

impl Mode {
    /// The rule each round of a job in this mode follows.
    pub fn round_rule(&self) -> RoundRule {
        match *self {
            Mode::None => RoundRule { initial: 1, quorum: 1, max: 1, sampled: false },
            Mode::Replicate { replicas, quorum, max_replicas } => {
                let initial = replicas.clamp(1, MAX_COPIES);
                RoundRule { initial, quorum: quorum.clamp(1, initial), max: max_replicas.clamp(initial, MAX_COPIES), sampled: false }
            }
            Mode::SpotCheck { max_replicas, .. } | Mode::Adaptive(Adaptive { max_replicas, .. }) => {
                RoundRule { initial: 1, quorum: 2, max: max_replicas.clamp(2, MAX_COPIES), sampled: true }
            }
        }
    }

    /// The name shown in status and the benchmark.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Replicate { .. } => "replicate",
            Mode::SpotCheck { .. } => "spotCheck",
            Mode::Adaptive(_) => "adaptive",
        }
    }
}

/// What a provider's recent record says about its honesty on one workload class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trust {
    /// Agreed results on this class since its last outvote (any class), newest first.
    pub agreed_streak: u32,
    /// Outvotes in the record (any class): a provider caught lying is checked every time.
    pub outvoted: u32,
}

/// Trust from a provider's observations (any order; others' and reliability ones are
/// ignored): the run of agreed results on `workload` after its newest outvote.
pub fn trust(observations: &[Observation], node: &str, workload: &str) -> Trust {
    let mut mine: Vec<&Observation> = observations.iter().filter(|o| o.node == node && o.observed.is_verification()).collect();
    mine.sort_by_key(|o| std::cmp::Reverse(o.at_ms));
    let outvoted = mine.iter().filter(|o| o.observed == Observed::Outvoted).count() as u32;
    let agreed_streak =
        mine.iter().take_while(|o| o.observed != Observed::Outvoted).filter(|o| o.observed == Observed::Agreed && o.workload == workload).count() as u32;
    Trust { agreed_streak, outvoted }
}

/// The chance (ppm) that a result of a provider with `trust` is checked under `a`: always
/// for a new, rarely seen or ever-outvoted provider; after `trusted_after` agreed results in
/// a row, `(trusted_after / streak)²` (trust grows fast with the run, so a liar that slipped
/// through its first checks is still checked often) but never below the minimum.
pub fn check_probability(a: &Adaptive, trust: Trust) -> u32 {
    if trust.outvoted > 0 || trust.agreed_streak < a.trusted_after.max(1) {
        return PPM;
    }
    let (t, s) = (a.trusted_after as u64, trust.agreed_streak as u64);
    let p = (t * t * PPM as u64 / (s * s)) as u32;
    p.clamp(a.min_check_ppm.min(PPM), PPM)
}

/// A draw in 0..PPM that a provider cannot predict: a keyed hash of the attempt id with the
/// operator's secret `key` (SplitMix64 over FNV-1a). Deterministic for the same key and id.
pub fn draw(key: u64, attempt_id: &str) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ key;
    for b in attempt_id.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = h.wrapping_add(key.rotate_left(17));
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h % PPM as u64) as u32
}

/// Whether the first result of a round is checked: a spot check draws against the fraction, an
/// adaptive one against the provider's check probability; other modes never sample.
pub fn should_check(mode: &Mode, trust: Trust, draw: u32) -> bool {
    match mode {
        Mode::SpotCheck { fraction_ppm, .. } => draw < *fraction_ppm,
        Mode::Adaptive(a) => draw < check_probability(a, trust),
        Mode::None | Mode::Replicate { .. } => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(at: i64, observed: Observed, workload: &str) -> Observation {
        Observation { node: "n".into(), workload: workload.into(), job_uid: "j".into(), attempt_id: format!("a{at}"), observed, at_ms: at }
    }

    #[test]
    fn each_mode_starts_rounds_with_its_copies_and_quorum() {
        let cases = [
            (Mode::None, RoundRule { initial: 1, quorum: 1, max: 1, sampled: false }),
            (Mode::Replicate { replicas: 3, quorum: 2, max_replicas: 5 }, RoundRule { initial: 3, quorum: 2, max: 5, sampled: false }),
            (Mode::Replicate { replicas: 2, quorum: 9, max_replicas: 1 }, RoundRule { initial: 2, quorum: 2, max: 2, sampled: false }),
            (Mode::SpotCheck { fraction_ppm: 1, max_replicas: 0 }, RoundRule { initial: 1, quorum: 2, max: 2, sampled: true }),
            (Mode::Adaptive(Adaptive::default()), RoundRule { initial: 1, quorum: 2, max: 3, sampled: true }),
        ];
        for (mode, want) in cases {
            assert_eq!(mode.round_rule(), want, "{mode:?}");
        }
    }

    #[test]
    fn trust_is_the_run_of_agreed_results_on_the_class_since_the_last_outvote() {
        let cases: Vec<(&str, Vec<Observation>, Trust)> = vec![
            ("new", vec![], Trust::default()),
            ("three agreed", (1..=3).map(|t| obs(t, Observed::Agreed, "w")).collect(), Trust { agreed_streak: 3, outvoted: 0 }),
            (
                "other classes and unverified do not count",
                vec![obs(1, Observed::Agreed, "x"), obs(2, Observed::Unverified, "w"), obs(3, Observed::Agreed, "w"), obs(4, Observed::Completed, "w")],
                Trust { agreed_streak: 1, outvoted: 0 },
            ),
            (
                "an outvote on any class ends the run",
                vec![obs(1, Observed::Agreed, "w"), obs(2, Observed::Outvoted, "x"), obs(3, Observed::Agreed, "w")],
                Trust { agreed_streak: 1, outvoted: 1 },
            ),
        ];
        for (name, mut o, want) in cases {
            assert_eq!(trust(&o, "n", "w"), want, "{name}");
            o.reverse();
            assert_eq!(trust(&o, "n", "w"), want, "{name}, any order");
            assert_eq!(trust(&o, "other", "w"), Trust::default(), "{name}: another node's record");
        }
    }

    #[test]
    fn new_or_outvoted_providers_are_always_checked_and_trust_grows_with_the_run() {
        let a = Adaptive { trusted_after: 10, min_check_ppm: 50_000, max_replicas: 3 };
        let cases = [
            (Trust { agreed_streak: 0, outvoted: 0 }, PPM),
            (Trust { agreed_streak: 9, outvoted: 0 }, PPM),
            (Trust { agreed_streak: 10, outvoted: 0 }, PPM),
            (Trust { agreed_streak: 20, outvoted: 0 }, PPM / 4),
            (Trust { agreed_streak: 40, outvoted: 0 }, PPM / 16),
            (Trust { agreed_streak: 10_000, outvoted: 0 }, 50_000),
            (Trust { agreed_streak: 10_000, outvoted: 1 }, PPM),
        ];
        for (t, want) in cases {
            assert_eq!(check_probability(&a, t), want, "{t:?}");
        }
    }

    #[test]
    fn a_spot_check_draw_is_keyed_uniform_and_stable() {
        assert_eq!(draw(7, "uid.1.1"), draw(7, "uid.1.1"));
        assert_ne!(draw(7, "uid.1.1"), draw(8, "uid.1.1"), "another operator key draws differently");
        let hits = (0..10_000).filter(|i| draw(42, &format!("uid.{i}.1")) < PPM / 4).count();
        assert!((2_200..2_800).contains(&hits), "about a quarter: {hits}");
        let spot = Mode::SpotCheck { fraction_ppm: PPM, max_replicas: 3 };
        assert!(should_check(&spot, Trust::default(), PPM - 1), "fraction 1.0 checks every result");
        assert!(!should_check(&Mode::SpotCheck { fraction_ppm: 0, max_replicas: 3 }, Trust::default(), 0));
        assert!(
            !should_check(&Mode::None, Trust::default(), 0) && !should_check(&Mode::Replicate { replicas: 2, quorum: 2, max_replicas: 2 }, Trust::default(), 0)
        );
    }
}
