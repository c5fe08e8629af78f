//! Providers' standings in memory: decayed counts per node (never raw observations), the
//! reputation the scheduler uses, and quarantines with the admin's lifts.
//!
//! A quarantine is sticky: decay shrinks a provider's counts but not its outvoted share, and a
//! quarantined node gets no work that could vindicate it, so letting decay lift it would only
//! let a liar wait out its sentence. It ends when an admin sets `spec.quarantineLiftedAt`
//! later than it began; outcomes observed before the lift no longer count towards the rule
//! (they still weigh on the reputation until they decay).

use std::collections::HashMap;

use kommune_core::reputation::{Counts, Decay, Observation, QuarantineRule, Standing};

use super::Fleet;
use crate::scheduler::Reputation;

/// Why and since when a node is quarantined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantine {
    /// Unix ms.
    pub since_ms: i64,
    /// The figures that tripped the rule.
    pub why: String,
}

/// A node's record as its ProviderNode shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStanding {
    pub counts: Counts,
    pub reputation: Reputation,
    pub quarantine: Option<Quarantine>,
}

/// What the fleet keeps per node about its standing.
#[derive(Debug, Clone, Default)]
pub(super) struct Record {
    standing: Standing,
    /// The part of `standing` the admin's last lift forgave (observations before it).
    forgiven: Standing,
    /// The lift time (`spec.quarantineLiftedAt`, Unix ms) `forgiven` was computed for.
    lifted_ms: Option<i64>,
    pub(super) quarantine: Option<Quarantine>,
    /// Cached for the pool; None until the first observation (a new provider's).
    pub(super) reputation: Option<Reputation>,
}

/// How standings are weighed and when a provider is quarantined.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReputationModel {
    pub decay: Decay,
    pub rule: QuarantineRule,
}

impl Fleet {
    /// Uses `model` for reputations and quarantines.
    pub fn with_reputation(mut self, model: ReputationModel) -> Self {
        self.model = model;
        self
    }

    pub fn reputation_model(&self) -> ReputationModel {
        self.model
    }

    /// Applies observations already stored. Returns the nodes this quarantined, with why.
    pub fn observe(&self, observations: &[Observation], now_ms: i64) -> Vec<(String, Quarantine)> {
        let ReputationModel { decay, rule } = self.model;
        let mut touched: HashMap<&str, bool> = HashMap::new();
        let mut quarantined = vec![];
        let mut changes = vec![];
        {
            let mut known = self.known();
            for o in observations {
                known.entry(o.node.clone()).or_default().record.standing.record(o.observed, o.at_ms, decay);
                *touched.entry(o.node.as_str()).or_default() |= o.observed.is_verification();
            }
            for (node, verification) in touched {
                let Some(k) = known.get_mut(node) else { continue };
                let r = &mut k.record;
                r.reputation = Some(r.standing.counts_at(now_ms, decay).reputation());
                if verification && r.quarantine.is_none() {
                    let counts = r.standing.since(&r.forgiven, decay).counts_at(now_ms, decay);
                    if rule.trips(&counts) {
                        let q = Quarantine { since_ms: now_ms, why: rule.explain(&counts) };
                        r.quarantine = Some(q.clone());
                        quarantined.push((node.to_string(), q));
                    }
                }
                changes.push((node.to_string(), r.reputation.unwrap_or(Reputation::NEW), r.quarantine.is_some()));
            }
        }
        self.apply_standings(changes);
        quarantined
    }

    /// Replaces every node's counts with those of `observations` (a store read on start or
    /// takeover) and quarantines the nodes whose counts call for it, dated from their last
    /// outvoted result (so an admin's later lift still ends it). Quarantines already known are
    /// kept: they are also restored from ProviderNode conditions, which outlive the decay.
    /// Returns the nodes this quarantined.
    pub fn rebuild_standings(&self, observations: &[Observation], now_ms: i64) -> Vec<(String, Quarantine)> {
        let ReputationModel { decay, rule } = self.model;
        let mut fresh: HashMap<&str, (Standing, i64)> = HashMap::new();
        for o in observations {
            let (s, last_outvoted) = fresh.entry(o.node.as_str()).or_default();
            s.record(o.observed, o.at_ms, decay);
            if o.observed == kommune_core::reputation::Observed::Outvoted {
                *last_outvoted = (*last_outvoted).max(o.at_ms);
            }
        }
        let mut changes = vec![];
        let mut quarantined = vec![];
        {
            let mut known = self.known();
            let names: std::collections::BTreeSet<String> = known.keys().cloned().chain(fresh.keys().map(|n| n.to_string())).collect();
            for node in names {
                let Some((s, last_outvoted)) = fresh.remove(node.as_str()).or_else(|| known.contains_key(&node).then(Default::default)) else { continue };
                let r = &mut known.entry(node.clone()).or_default().record;
                r.standing = s;
                r.reputation = (s != Standing::default()).then(|| s.counts_at(now_ms, decay).reputation());
                if r.quarantine.is_none() {
                    let counts = s.since(&r.forgiven, decay).counts_at(now_ms, decay);
                    if rule.trips(&counts) {
                        let q = Quarantine { since_ms: last_outvoted, why: rule.explain(&counts) };
                        r.quarantine = Some(q.clone());
                        quarantined.push((node.clone(), q));
                    }
                }
                changes.push((node, r.reputation.unwrap_or(Reputation::NEW), r.quarantine.is_some()));
            }
        }
        self.apply_standings(changes);
        quarantined
    }

    /// Recomputes a node's reputation at `now_ms` (decay moves it towards a new provider's
    /// while nothing is observed).
    pub fn refresh_reputation(&self, node: &str, now_ms: i64) {
        let decay = self.model.decay;
        let change = self.known().get_mut(node).and_then(|k| {
            let r = &mut k.record;
            r.reputation = Some(r.standing.counts_at(now_ms, decay).reputation()).filter(|_| r.standing != Standing::default());
            Some((node.to_string(), r.reputation?, r.quarantine.is_some()))
        });
        self.apply_standings(change.into_iter().collect());
    }

    /// The lift time the node's forgiven part was computed for.
    pub fn lift_applied(&self, node: &str) -> Option<i64> {
        self.known().get(node).and_then(|k| k.record.lifted_ms)
    }

    /// Applies an admin's lift at `lifted_ms`: `before` are the node's counts from observations
    /// made before it, which no longer count towards the rule; a quarantine that began before it
    /// ends. Returns whether a quarantine ended.
    pub fn apply_lift(&self, node: &str, lifted_ms: i64, before: Standing) -> bool {
        let (ended, quarantined) = {
            let mut known = self.known();
            let r = &mut known.entry(node.to_string()).or_default().record;
            r.forgiven = before;
            r.lifted_ms = Some(lifted_ms);
            let ended = r.quarantine.as_ref().is_some_and(|q| q.since_ms < lifted_ms);
            if ended {
                r.quarantine = None;
            }
            (ended, r.quarantine.is_some())
        };
        if ended {
            self.pool().set_quarantined(node, quarantined);
        }
        ended
    }

    /// Restores a quarantine recorded in the node's ProviderNode (after a restart or a
    /// takeover), unless an admin's lift already applied here is later.
    pub fn restore_quarantine(&self, node: &str, q: Quarantine) {
        let restored = {
            let mut known = self.known();
            let r = &mut known.entry(node.to_string()).or_default().record;
            let lifted = r.lifted_ms.is_some_and(|l| l > q.since_ms);
            let restore = r.quarantine.is_none() && !lifted;
            if restore {
                r.quarantine = Some(q);
            }
            restore
        };
        if restored {
            self.pool().set_quarantined(node, true);
        }
    }

    pub fn quarantine(&self, node: &str) -> Option<Quarantine> {
        self.known().get(node).and_then(|k| k.record.quarantine.clone())
    }

    /// A node's figures at `now_ms`, for its ProviderNode.
    pub fn standing(&self, node: &str, now_ms: i64) -> NodeStanding {
        let decay = self.model.decay;
        let known = self.known();
        let r = known.get(node).map(|k| &k.record);
        let counts = r.map_or_else(Counts::default, |r| r.standing.counts_at(now_ms, decay));
        NodeStanding {
            counts,
            reputation: if r.is_some_and(|r| r.standing != Standing::default()) { counts.reputation() } else { Reputation::NEW },
            quarantine: r.and_then(|r| r.quarantine.clone()),
        }
    }

    /// A node's reputation as the scheduler sees it.
    pub fn reputation(&self, node: &str) -> Reputation {
        self.known().get(node).and_then(|k| k.record.reputation).unwrap_or(Reputation::NEW)
    }

    fn apply_standings(&self, changes: Vec<(String, Reputation, bool)>) {
        let mut pool = self.pool();
        for (node, reputation, quarantined) in changes {
            pool.set_reputation(&node, reputation);
            pool.set_quarantined(&node, quarantined);
        }
    }
}
