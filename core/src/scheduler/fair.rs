//! Fair share between namespaces. Jobs are reconciled one at a time, so fairness is enforced
//! where they meet: the pool. Every sync records its job's waiting demand; before a job
//! places, the pool keeps room for the tasks of jobs ranked ahead of it, and frees that room
//! after. Jobs rank by priority (higher first), then by their namespace's weighted dominant
//! share (lower first), then by fewer waiting tasks, then by name: a strict order, so two jobs
//! never keep room for each other.
//!
//! How much room a job ahead gets kept: all its waiting tasks when its priority is higher;
//! with equal priority, as many as fit in what its namespace is still owed: its weight's share
//! of the pool minus what it already holds. A job of the same namespace is never held for
//! (within a namespace, first come first served).
//!
//! The bound this gives (proved by the property test in pool tests): a job in namespace B
//! waiting with n tasks, whose namespace is owed room for them, is not starved by a job of
//! any size in namespace A: A's sync leaves that room free, so B's next sync places them.

use std::collections::{BTreeMap, HashMap};

use super::{Request, Resources};

/// Resources as counted for shares: cpu, memory and GPU devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpus: u64,
}

impl Usage {
    /// Usage of `resources` and `gpus` devices.
    pub fn of(resources: Resources, gpus: u64) -> Usage {
        Usage { cpu_millis: resources.cpu_millis, memory_bytes: resources.memory_bytes, gpus }
    }

    pub fn plus(self, o: Usage) -> Usage {
        Usage {
            cpu_millis: self.cpu_millis.saturating_add(o.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(o.memory_bytes),
            gpus: self.gpus.saturating_add(o.gpus),
        }
    }

    pub fn minus(self, o: Usage) -> Usage {
        Usage {
            cpu_millis: self.cpu_millis.saturating_sub(o.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(o.memory_bytes),
            gpus: self.gpus.saturating_sub(o.gpus),
        }
    }

    /// The largest fraction of `total` this uses of any one resource (DRF's dominant share).
    pub fn dominant_share(&self, total: Usage) -> f64 {
        let f = |used: u64, cap: u64| if cap == 0 { 0.0 } else { used as f64 / cap as f64 };
        f(self.cpu_millis, total.cpu_millis).max(f(self.memory_bytes, total.memory_bytes)).max(f(self.gpus, total.gpus))
    }
}

/// A job's waiting demand, as recorded by its last sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    /// "namespace/name".
    pub job: String,
    pub namespace: String,
    /// `spec.priority`: higher goes first.
    pub priority: i32,
    pub request: Request,
    /// Tasks waiting to be placed.
    pub remaining: u32,
    /// When the job last synced (Unix ms); stale demand is forgotten.
    pub seen_ms: i64,
}

/// Namespace weights (`--namespace-weight team-a=2`); unnamed namespaces weigh 1. And the
/// highest `spec.priority` each namespace's jobs may use (`--namespace-max-priority team-a=100`):
/// priority is ranked across namespaces, so it is the cluster admin's to grant; a namespace not
/// named may order its own jobs below 0 but never rank above another namespace's default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FairShare {
    weights: BTreeMap<String, u32>,
    max_priority: BTreeMap<String, i32>,
}

/// The highest priority a namespace may use unless the admin grants more.
pub const DEFAULT_MAX_PRIORITY: i32 = 0;

impl FairShare {
    /// Weights from "namespace=weight" entries (weight 1..=1000).
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<FairShare, String> {
        let mut weights = BTreeMap::new();
        for e in entries {
            let (ns, w) = e.split_once('=').ok_or_else(|| format!("{e:?} is not namespace=weight (e.g. team-a=2)"))?;
            let w: u32 =
                w.trim().parse().ok().filter(|w| (1..=1000).contains(w)).ok_or_else(|| format!("{e:?}: the weight must be an integer from 1 to 1000"))?;
            if ns.trim().is_empty() {
                return Err(format!("{e:?}: the namespace is empty"));
            }
            weights.insert(ns.trim().to_string(), w);
        }
        Ok(FairShare { weights, max_priority: BTreeMap::new() })
    }

    /// These weights with priority grants from "namespace=max" entries (max -1000..=1000).
    pub fn with_max_priorities<'a>(mut self, entries: impl IntoIterator<Item = &'a str>) -> Result<FairShare, String> {
        for e in entries {
            let (ns, p) = e.split_once('=').ok_or_else(|| format!("{e:?} is not namespace=priority (e.g. batch-urgent=100)"))?;
            let p: i32 = p
                .trim()
                .parse()
                .ok()
                .filter(|p| (-1000..=1000).contains(p))
                .ok_or_else(|| format!("{e:?}: the priority must be an integer from -1000 to 1000"))?;
            if ns.trim().is_empty() {
                return Err(format!("{e:?}: the namespace is empty"));
            }
            self.max_priority.insert(ns.trim().to_string(), p);
        }
        Ok(self)
    }

    /// The highest priority `namespace` may use.
    pub fn max_priority(&self, namespace: &str) -> i32 {
        self.max_priority.get(namespace).copied().unwrap_or(DEFAULT_MAX_PRIORITY)
    }

    /// The priority a job of `namespace` asking for `priority` is ranked at.
    pub fn effective_priority(&self, namespace: &str, priority: i32) -> i32 {
        priority.min(self.max_priority(namespace))
    }

    /// The weight of `namespace`.
    pub fn weight(&self, namespace: &str) -> u32 {
        self.weights.get(namespace).copied().unwrap_or(1)
    }
}

/// How many waiting tasks of each job ranked ahead of `me` to keep room for, in queue order.
/// `usage` is what each namespace holds now, `total` the pool's capacity.
pub fn owed<'a>(me: &Demand, demands: impl Iterator<Item = &'a Demand>, usage: &HashMap<String, Usage>, total: Usage, fair: &FairShare) -> Vec<(String, u32)> {
    let demands: Vec<&Demand> = demands.filter(|d| d.remaining > 0).collect();
    let used = |ns: &str| usage.get(ns).copied().unwrap_or_default();
    let weighted = |ns: &str| used(ns).dominant_share(total) / fair.weight(ns) as f64;
    let rank = |d: &Demand| (std::cmp::Reverse(d.priority), weighted(&d.namespace), d.remaining, d.job.clone());
    let ahead = |d: &Demand| {
        let (a, b) = (rank(d), rank(me));
        a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3)).is_lt()
    };
    // Namespaces in the game: those waiting and those holding room.
    let mut active: Vec<&str> = demands.iter().map(|d| d.namespace.as_str()).collect();
    active.extend(usage.iter().filter(|(_, u)| u.dominant_share(total) > 0.0).map(|(n, _)| n.as_str()));
    active.sort();
    active.dedup();
    let total_weight: f64 = active.iter().map(|ns| fair.weight(ns) as f64).sum::<f64>().max(1.0);

    let mut queue: Vec<&Demand> = demands.into_iter().filter(|d| d.job != me.job && d.namespace != me.namespace && ahead(d)).collect();
    queue.sort_by(|a, b| {
        let (x, y) = (rank(a), rank(b));
        x.0.cmp(&y.0).then(x.1.total_cmp(&y.1)).then(x.2.cmp(&y.2)).then(x.3.cmp(&y.3))
    });
    let mut promised: HashMap<&str, f64> = HashMap::new();
    let mut out = vec![];
    for d in queue {
        let count = if d.priority > me.priority {
            d.remaining
        } else {
            let per_task = Usage::of(d.request.resources, d.request.gpu.count as u64).dominant_share(total) * d.request.replicas.max(1) as f64;
            let entitled = fair.weight(&d.namespace) as f64 / total_weight;
            let given = promised.entry(d.namespace.as_str()).or_insert(0.0);
            let slack = entitled - used(&d.namespace).dominant_share(total) - *given;
            let n = if per_task <= 0.0 {
                d.remaining
            } else if slack <= 0.0 {
                0
            } else {
                ((slack / per_task + 1e-9).floor() as u64).min(d.remaining as u64) as u32
            };
            *given += n as f64 * per_task;
            n
        };
        if count > 0 {
            out.push((d.job.clone(), count));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(job: &str, ns: &str, priority: i32, remaining: u32) -> Demand {
        Demand {
            job: job.into(),
            namespace: ns.into(),
            priority,
            request: Request::new("wasm", Resources { cpu_millis: 1000, memory_bytes: 1 << 30, ephemeral_bytes: 0 }),
            remaining,
            seen_ms: 0,
        }
    }

    const TOTAL: Usage = Usage { cpu_millis: 100_000, memory_bytes: 100 << 30, gpus: 0 };

    #[test]
    fn namespace_weights_parse_and_default_to_one() {
        let f = FairShare::parse(["team-a=2", " team-b = 5"]).unwrap();
        assert_eq!((f.weight("team-a"), f.weight("team-b"), f.weight("other")), (2, 5, 1));
        assert!(FairShare::parse(["team-a"]).unwrap_err().contains("namespace=weight"));
        assert!(FairShare::parse(["team-a=0"]).unwrap_err().contains("from 1 to 1000"));
        assert!(FairShare::parse(["=3"]).unwrap_err().contains("namespace is empty"));
    }

    #[test]
    fn a_big_job_keeps_room_for_a_small_one_of_another_namespace_but_not_the_reverse() {
        let big = demand("a/big", "a", 0, 100_000);
        let small = demand("b/small", "b", 0, 10);
        let usage = HashMap::from([("a".to_string(), Usage { cpu_millis: 50_000, memory_bytes: 0, gpus: 0 })]);
        let all = [big.clone(), small.clone()];
        assert_eq!(owed(&big, all.iter(), &usage, TOTAL, &FairShare::default()), vec![("b/small".to_string(), 10)]);
        assert_eq!(owed(&small, all.iter(), &usage, TOTAL, &FairShare::default()), vec![]);
        // Even when neither holds anything yet, the smaller demand ranks first.
        assert_eq!(owed(&big, all.iter(), &HashMap::new(), TOTAL, &FairShare::default()), vec![("b/small".to_string(), 10)]);
    }

    #[test]
    fn room_kept_is_capped_by_the_namespace_share_and_weights_move_it() {
        let a = demand("a/j", "a", 0, 1_000);
        let b = demand("b/j", "b", 0, 500);
        let usage = HashMap::from([("a".to_string(), Usage { cpu_millis: 60_000, memory_bytes: 0, gpus: 0 })]);
        // Equal weights: b is owed half the pool, 50 tasks of 1 cpu out of 100.
        assert_eq!(owed(&a, [a.clone(), b.clone()].iter(), &usage, TOTAL, &FairShare::default()), vec![("b/j".to_string(), 50)]);
        let weighted = FairShare::parse(["b=3"]).unwrap();
        assert_eq!(owed(&a, [a.clone(), b.clone()].iter(), &usage, TOTAL, &weighted), vec![("b/j".to_string(), 75)]);
    }

    #[test]
    fn priority_above_what_the_admin_granted_a_namespace_is_capped() {
        let fair = FairShare::parse(["team-a=2"]).unwrap().with_max_priorities(["urgent=100", "batch=-10"]).unwrap();
        assert_eq!(fair.effective_priority("anyone", 1000), 0, "ungranted namespaces rank at most at 0");
        assert_eq!(fair.effective_priority("anyone", -5), -5, "lowering one's own jobs is always allowed");
        assert_eq!(fair.effective_priority("urgent", 1000), 100);
        assert_eq!(fair.effective_priority("urgent", 50), 50);
        assert_eq!(fair.effective_priority("batch", 0), -10);
        assert_eq!(fair.weight("team-a"), 2, "weights are kept");
        for bad in ["urgent", "=5", "x=1001", "x=high"] {
            assert!(FairShare::default().with_max_priorities([bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn higher_priority_goes_first_and_same_namespace_is_first_come() {
        let low = demand("a/low", "a", 0, 10);
        let high = demand("b/high", "b", 5, 1_000);
        let sibling = demand("a/sibling", "a", 9, 3);
        let all = [low.clone(), high.clone(), sibling.clone()];
        assert_eq!(owed(&low, all.iter(), &HashMap::new(), TOTAL, &FairShare::default()), vec![("b/high".to_string(), 1_000)]);
        // Priority crosses namespaces: the sibling's 9 beats b's 5.
        assert_eq!(owed(&high, all.iter(), &HashMap::new(), TOTAL, &FairShare::default()), vec![("a/sibling".to_string(), 3)]);
    }
}
