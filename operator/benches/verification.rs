//! Verification simulation: 100,000 tasks over 1,000 providers, 10% of which lie on 30% of
//! their results and 1% of which lose 30% of their attempts, through the same pure functions
//! the operator judges rounds and samples results with (`kommune_core::job::verify`,
//! `kommune_core::job::verification`). Not timed: it prints, for each mode,
//!
//! ```text
//! mode=M accepted_wrong_per_10k=X overhead_pct=Y
//! ```
//!
//! where overhead is the attempts run beyond one per accepted task (checks, tie-breakers and
//! retries), in percent. A provider outvoted twice is quarantined (placed no more), as the
//! reputation model does; `quarantine=off` lines show the modes without it. Liars return a
//! fresh wrong answer each time (they do not collude). docs/VERIFICATION.md has the figures.

use kommune_core::attempt::{Attempt, AttemptPhase, AttemptResult, replica_attempt_id};
use kommune_core::job::verification::{Adaptive, Mode, PPM, RoundRule, draw, should_check, trust};
use kommune_core::job::verify::{Verdict, verdict};
use kommune_core::reputation::{Observation, Observed};

const TASKS: u32 = 100_000;
const PROVIDERS: usize = 1_000;
const LIARS: usize = 100;
const FLAKY: usize = 10;
const LIE_PPM: u64 = 300_000;
const LOSE_PPM: u64 = 300_000;
const WINDOW: usize = 512;
const QUARANTINE_AFTER: u32 = 2;
const CLASS: &str = "wasm:sim";

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn ppm(&mut self) -> u64 {
        self.next() % PPM as u64
    }
}

struct Provider {
    liar: bool,
    flaky: bool,
    record: Vec<Observation>,
    outvoted: u32,
}

struct Sim {
    rng: Rng,
    providers: Vec<Provider>,
    quarantine: bool,
    clock: i64,
    wrong_answers: u64,
}

impl Sim {
    fn new(seed: u64, quarantine: bool) -> Sim {
        let providers = (0..PROVIDERS).map(|i| Provider { liar: i < LIARS, flaky: (LIARS..LIARS + FLAKY).contains(&i), record: vec![], outvoted: 0 }).collect();
        Sim { rng: Rng(seed), providers, quarantine, clock: 0, wrong_answers: 0 }
    }

    fn node(i: usize) -> String {
        format!("p{i}")
    }

    /// A random provider not quarantined and not among `taken`.
    fn pick(&mut self, taken: &[usize]) -> usize {
        loop {
            let i = (self.rng.next() % PROVIDERS as u64) as usize;
            let quarantined = self.quarantine && self.providers[i].outvoted >= QUARANTINE_AFTER;
            if !taken.contains(&i) && !quarantined {
                return i;
            }
        }
    }

    /// Runs copy `replica` of round `number` of task `index` on provider `p`.
    fn run(&mut self, index: u32, number: u32, replica: u32, p: usize) -> Attempt {
        let pr = &self.providers[p];
        let (liar, flaky) = (pr.liar, pr.flaky);
        let (phase, result) = if flaky && self.rng.ppm() < LOSE_PPM {
            (AttemptPhase::Lost, None)
        } else {
            let digest = if liar && self.rng.ppm() < LIE_PPM {
                self.wrong_answers += 1;
                format!("{:064x}", self.wrong_answers)
            } else {
                format!("{:064x}", 0)
            };
            (AttemptPhase::Succeeded, Some(AttemptResult { exit_code: 0, output_sha256: digest, ..Default::default() }))
        };
        Attempt {
            id: replica_attempt_id("sim", index, number, replica),
            job_uid: "sim".into(),
            job_key: "sim/job".into(),
            index,
            number,
            replica,
            node: Self::node(p),
            phase,
            cpu_millis: 100,
            memory_bytes: 1 << 20,
            held: None,
            created_ms: self.clock,
            finished_ms: Some(self.clock),
            result,
        }
    }

    fn observe(&mut self, p: usize, attempt_id: &str, observed: Observed) {
        self.clock += 1;
        let pr = &mut self.providers[p];
        pr.outvoted += (observed == Observed::Outvoted) as u32;
        pr.record.push(Observation {
            node: Self::node(p),
            workload: CLASS.into(),
            job_uid: "sim".into(),
            attempt_id: attempt_id.into(),
            observed,
            at_ms: self.clock,
        });
        if pr.record.len() > WINDOW {
            pr.record.remove(0);
        }
    }

    /// Runs one task to acceptance (or gives up after 10 rounds). Returns (attempts, whether
    /// the accepted answer is wrong).
    fn task(&mut self, mode: &Mode, rule: RoundRule, index: u32) -> (u64, Option<bool>) {
        let mut attempts = 0u64;
        for number in 1..=10 {
            let mut round: Vec<(Attempt, usize)> = vec![];
            let mut taken = vec![];
            for k in 0..rule.initial {
                let p = self.pick(&taken);
                taken.push(p);
                round.push((self.run(index, number, k, p), p));
            }
            attempts += rule.initial as u64;
            loop {
                let first = &round[0];
                let check = !rule.sampled
                    || round.len() > 1
                    || should_check(mode, trust(&self.providers[first.1].record, &first.0.node, CLASS), draw(0x5eed, &first.0.id));
                let refs: Vec<&Attempt> = round.iter().map(|(a, _)| a).collect();
                match verdict(&refs, rule, check) {
                    Verdict::Extend(n) => {
                        for _ in 0..n {
                            let p = self.pick(&taken);
                            taken.push(p);
                            let replica = round.len() as u32;
                            round.push((self.run(index, number, replica, p), p));
                            attempts += 1;
                        }
                    }
                    Verdict::Verified(d) => {
                        let node_of = |id: &str| round.iter().find(|(a, _)| a.id == id).map(|(_, p)| *p).expect("a copy of the round");
                        let winner = d.agreed.first().or(d.unverified.as_ref()).expect("a verified round names its answer").clone();
                        let wrong = round
                            .iter()
                            .find(|(a, _)| a.id == winner)
                            .and_then(|(a, _)| a.result.as_ref())
                            .is_some_and(|r| r.output_sha256 != format!("{:064x}", 0));
                        if rule.max > 1 {
                            for id in &d.agreed {
                                self.observe(node_of(id), id, Observed::Agreed);
                            }
                            for id in &d.outvoted {
                                self.observe(node_of(id), id, Observed::Outvoted);
                            }
                            if let Some(id) = &d.unverified {
                                self.observe(node_of(id), id, Observed::Unverified);
                            }
                        }
                        return (attempts, Some(wrong));
                    }
                    Verdict::Running => unreachable!("every copy finishes at once here"),
                    Verdict::Failed | Verdict::Disagree(_) | Verdict::Void => break,
                }
            }
        }
        (attempts, None)
    }
}

fn simulate(mode: Mode, quarantine: bool) -> (f64, f64) {
    let mut sim = Sim::new(0x9e37_79b9_7f4a_7c15, quarantine);
    let rule = mode.round_rule();
    let (mut attempts, mut accepted, mut wrong) = (0u64, 0u64, 0u64);
    for index in 0..TASKS {
        let (n, outcome) = sim.task(&mode, rule, index);
        attempts += n;
        if let Some(w) = outcome {
            accepted += 1;
            wrong += w as u64;
        }
    }
    let per_10k = wrong as f64 * 10_000.0 / accepted.max(1) as f64;
    let overhead = (attempts - accepted) as f64 * 100.0 / accepted.max(1) as f64;
    (per_10k, overhead)
}

/// `KOMMUNE_SIM_TUNE=1`: adaptive over a grid of its parameters, to tune the default.
fn tune() {
    for trusted_after in [3, 4, 5, 6, 8, 10] {
        for min_check_ppm in [10_000, 20_000, 30_000, 50_000] {
            let (wrong, overhead) = simulate(Mode::Adaptive(Adaptive { trusted_after, min_check_ppm, max_replicas: 3 }), true);
            println!("mode=adaptive trusted_after={trusted_after} min_check_ppm={min_check_ppm} accepted_wrong_per_10k={wrong:.2} overhead_pct={overhead:.1}");
        }
    }
}

fn main() {
    if std::env::var_os("KOMMUNE_SIM_TUNE").is_some() {
        return tune();
    }
    // `cargo bench` passes --bench; a filter argument, if any, picks modes by name.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let modes = [
        Mode::None,
        Mode::Replicate { replicas: 2, quorum: 2, max_replicas: 3 },
        Mode::SpotCheck { fraction_ppm: PPM / 10, max_replicas: 3 },
        Mode::Adaptive(Adaptive::default()),
    ];
    for quarantine in [true, false] {
        for mode in &modes {
            if filter.as_deref().is_some_and(|f| !mode.name().contains(f)) {
                continue;
            }
            let (wrong, overhead) = simulate(*mode, quarantine);
            let suffix = if quarantine { "" } else { " quarantine=off" };
            println!("mode={} accepted_wrong_per_10k={wrong:.2} overhead_pct={overhead:.1}{suffix}", mode.name());
        }
    }
}
