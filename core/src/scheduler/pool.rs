//! The scheduler's in-memory index: every known node, grouped into classes of nodes that offer
//! the same things (runtimes, arch, os, labels, taints, GPUs, rates), and every reservation.
//!
//! A decision checks each class once against the request's static constraints (cached per
//! request), then walks fitting classes best class-score first, sampling members from a start
//! derived from the seed and the task, and stops once it has [`SAMPLE`] fitting nodes (and
//! enough distinct owners for the replicas). So a decision costs about the number of classes
//! plus the sample, not the number of nodes. A refusal is always exhaustive, and its
//! explanation is a full scan: exact counts, paid only when placement fails.
//!
//! Reservations are exact: `reserve` and `release` are idempotent and never drive a count
//! below zero, and `place` only reserves room that is free.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::fair::{self, Demand, FairShare, Usage};
use super::filter::{self, Exclusion};
use super::score::{self, Weights};
use super::{Explanation, Gpu, GpuRequest, MAX_GPUS, Node, Reputation, Request, Resources, Taint};
use crate::pricing::{Micros, Rates};

/// Fitting nodes scored per decision before the best is taken.
pub const SAMPLE: usize = 32;
/// Fitting nodes taken from one class per decision, so a sample spans several classes.
pub const PER_CLASS: usize = 16;
/// Most tasks of other jobs one sync keeps room for (see [`Pool::place_batch`]).
pub const HOLD_LIMIT: u32 = 4096;
/// Demand not refreshed for this long is forgotten (its job was deleted or stopped syncing).
pub const DEMAND_TTL_MS: i64 = 60_000;

const PRESENT: u8 = 1;
const READY: u8 = 2;
const CORDONED: u8 = 4;
const PAUSED: u8 = 8;
const QUARANTINED: u8 = 16;
/// Present, ready, not cordoned, not quarantined, not paused.
const SCHEDULABLE: u8 = PRESENT | READY;
const NO_CLASS: u32 = u32::MAX;

/// The dynamic state of a node, kept compact for the hot loop.
#[derive(Debug, Clone, Default)]
struct Hot {
    flags: u8,
    reputation: Reputation,
    owner: u32,
    class: u32,
    capacity: Resources,
    allocated: Resources,
    gpus_used: u64,
    running: u32,
}

/// What makes nodes alike for the static filters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClassKey {
    runtimes: Vec<String>,
    arch: String,
    os: String,
    labels: BTreeMap<String, String>,
    taints: Vec<Taint>,
    gpus: Vec<Gpu>,
    rates: Rates,
}

impl ClassKey {
    fn of(n: &Node) -> ClassKey {
        ClassKey {
            runtimes: n.runtimes.clone(),
            arch: n.arch.clone(),
            os: n.os.clone(),
            labels: n.labels.clone(),
            taints: n.taints.clone(),
            gpus: n.gpus.clone(),
            rates: n.rates,
        }
    }
}

#[derive(Debug)]
struct Class {
    /// A node carrying the class's static facts (name and dynamic fields unused).
    facts: Node,
    /// Node ids in the order they joined the class.
    members: Vec<u32>,
    /// Members not ready, cordoned (and ready), quarantined (and ready, not cordoned), paused
    /// (and none of those): kept current so an explanation counts a class that fails a static
    /// filter in O(1).
    unavailable: [u32; 4],
}

/// Which of a class's `unavailable` counters a node with `flags` belongs to.
fn unavailable(flags: u8) -> Option<usize> {
    if flags & READY == 0 {
        Some(0)
    } else if flags & CORDONED != 0 {
        Some(1)
    } else if flags & QUARANTINED != 0 {
        Some(2)
    } else if flags & PAUSED != 0 {
        Some(3)
    } else {
        None
    }
}

/// A request's verdict on every class: the static reason it fails, or None, and the GPU
/// devices the request accepts on the class's nodes.
type Verdicts = Arc<[(Option<Exclusion>, u64)]>;

/// A fitting class for one request: its id, its weighted class-level score (locality and
/// price) and the GPU devices the request accepts on its nodes.
#[derive(Debug, Clone, Copy)]
struct ClassPick {
    class: u32,
    score: u64,
    matching: u64,
}

/// Room reserved on a node for one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reservation {
    node: u32,
    resources: Resources,
    gpus: u64,
    namespace: u32,
    /// Recorded by `reserve` from what the store knows; `refresh` may complete it once.
    partial: bool,
}

/// Where one task's replicas went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Index of the task in the batch.
    pub task: usize,
    /// One node per replica, in the order of the task's attempt ids.
    pub nodes: Vec<String>,
}

/// The outcome of placing a job's batch of tasks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Batch {
    pub placed: Vec<Placement>,
    /// Why the rest could not be placed.
    pub unplaced: Option<Explanation>,
    /// Jobs ("namespace/name") whose room this batch kept free: they should sync soon.
    pub held_for: Vec<String>,
}

/// Allocation on one node, for status and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Allocation {
    pub resources: Resources,
    pub gpus: u32,
    pub running: u32,
}

/// The index of nodes and reservations. Deterministic: the same sequence of calls with the
/// same seed gives the same placements.
#[derive(Debug)]
pub struct Pool {
    seed: u64,
    weights: Weights,
    fair: FairShare,
    nodes: Vec<Node>,
    hot: Vec<Hot>,
    by_name: HashMap<String, u32>,
    classes: Vec<Class>,
    class_of: HashMap<ClassKey, u32>,
    owners: HashMap<String, u32>,
    namespaces: HashMap<String, u32>,
    ns_names: Vec<String>,
    ns_usage: Vec<Usage>,
    capacity: Usage,
    present: usize,
    reservations: HashMap<String, Reservation>,
    demands: BTreeMap<String, Demand>,
    cache: HashMap<Request, (usize, Arc<[ClassPick]>, Verdicts)>,
}

/// splitmix64: a fast, well-mixed, portable hash step.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// FNV-1a of a string: a stable salt for a task from its attempt id.
pub fn salt(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl Pool {
    /// An empty pool. `seed` makes tie-breaks and sampling reproducible.
    pub fn new(seed: u64, weights: Weights, fair: FairShare) -> Pool {
        Pool {
            seed,
            weights,
            fair,
            nodes: vec![],
            hot: vec![],
            by_name: HashMap::new(),
            classes: vec![],
            class_of: HashMap::new(),
            owners: HashMap::new(),
            namespaces: HashMap::new(),
            ns_names: vec![],
            ns_usage: vec![],
            capacity: Usage::default(),
            present: 0,
            reservations: HashMap::new(),
            demands: BTreeMap::new(),
            cache: HashMap::new(),
        }
    }

    /// The score weights in use.
    pub fn weights(&self) -> Weights {
        self.weights
    }

    /// Nodes known (connected, or gone and not yet forgotten).
    pub fn len(&self) -> usize {
        self.present
    }

    /// True when no node is known.
    pub fn is_empty(&self) -> bool {
        self.present == 0
    }

    fn slot(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.by_name.get(name) {
            return id;
        }
        let id = self.nodes.len() as u32;
        self.nodes.push(Node { name: name.to_string(), ..Default::default() });
        self.hot.push(Hot { class: NO_CLASS, ..Default::default() });
        self.by_name.insert(name.to_string(), id);
        id
    }

    /// The slots of the nodes `r` avoids (unknown names are skipped).
    fn avoided(&self, r: &Request) -> Vec<u32> {
        r.avoid.iter().filter_map(|n| self.by_name.get(n).copied()).collect()
    }

    fn owner_id(&mut self, node: &Node) -> u32 {
        // An empty owner is its own party: a key no real owner can collide with.
        let key = if node.owner.is_empty() { format!("\0node/{}", node.name) } else { node.owner.clone() };
        let next = self.owners.len() as u32;
        *self.owners.entry(key).or_insert(next)
    }

    fn namespace_id(&mut self, ns: &str) -> u32 {
        if let Some(&id) = self.namespaces.get(ns) {
            return id;
        }
        let id = self.ns_names.len() as u32;
        self.namespaces.insert(ns.to_string(), id);
        self.ns_names.push(ns.to_string());
        self.ns_usage.push(Usage::default());
        id
    }

    /// Adds (`on`) or removes a member's contribution to its class's counters.
    fn account(&mut self, id: u32, on: bool) {
        let h = &self.hot[id as usize];
        if h.class == NO_CLASS || h.flags & PRESENT == 0 {
            return;
        }
        if let Some(i) = unavailable(h.flags) {
            let c = &mut self.classes[h.class as usize].unavailable[i];
            *c = if on { *c + 1 } else { c.saturating_sub(1) };
        }
    }

    fn leave_class(&mut self, id: u32) {
        let class = self.hot[id as usize].class;
        if class != NO_CLASS {
            let members = &mut self.classes[class as usize].members;
            if let Some(pos) = members.iter().position(|&m| m == id) {
                members.remove(pos);
            }
            self.hot[id as usize].class = NO_CLASS;
        }
    }

    /// Adds a node or replaces what is known about it (facts, flags, owner, reputation). Its
    /// reservations are kept.
    pub fn upsert(&mut self, mut node: Node) {
        node.runtimes.sort();
        node.runtimes.dedup();
        node.taints.sort();
        node.taints.dedup();
        node.gpus.truncate(MAX_GPUS);
        node.gpus.sort();
        let id = self.slot(&node.name);
        let key = ClassKey::of(&node);
        let class = match self.class_of.get(&key) {
            Some(&c) => c,
            None => {
                let c = self.classes.len() as u32;
                let facts = Node { name: String::new(), ..node.clone() };
                self.classes.push(Class { facts, members: vec![], unavailable: [0; 4] });
                self.class_of.insert(key, c);
                c
            }
        };
        let owner = self.owner_id(&node);
        self.account(id, false);
        let h = &self.hot[id as usize];
        if h.flags & PRESENT != 0 {
            self.capacity = self.capacity.minus(Usage::of(h.capacity, self.nodes[id as usize].gpus.len() as u64));
        } else {
            self.present += 1;
        }
        if self.hot[id as usize].class != class {
            self.leave_class(id);
            self.classes[class as usize].members.push(id);
        }
        self.capacity = self.capacity.plus(Usage::of(node.capacity, node.gpus.len() as u64));
        let h = &mut self.hot[id as usize];
        h.flags = PRESENT
            | if node.ready { READY } else { 0 }
            | if node.cordoned { CORDONED } else { 0 }
            | if node.quarantined { QUARANTINED } else { 0 }
            | if node.paused { PAUSED } else { 0 };
        h.reputation = node.reputation;
        h.owner = owner;
        h.class = class;
        h.capacity = node.capacity;
        self.nodes[id as usize] = node;
        self.account(id, true);
    }

    fn set_flag(&mut self, name: &str, flag: u8, on: bool) {
        if let Some(&id) = self.by_name.get(name) {
            self.account(id, false);
            let h = &mut self.hot[id as usize];
            if on {
                h.flags |= flag;
            } else {
                h.flags &= !flag;
            }
            let n = &mut self.nodes[id as usize];
            match flag {
                READY => n.ready = on,
                CORDONED => n.cordoned = on,
                QUARANTINED => n.quarantined = on,
                _ => n.paused = on,
            }
            self.account(id, true);
        }
    }

    /// Marks a node ready (session open) or not.
    pub fn set_ready(&mut self, name: &str, ready: bool) {
        self.set_flag(name, READY, ready);
    }

    /// Records an admin's cordon.
    pub fn set_cordoned(&mut self, name: &str, cordoned: bool) {
        self.set_flag(name, CORDONED, cordoned);
    }

    /// Records the operator's quarantine (or its lifting).
    pub fn set_quarantined(&mut self, name: &str, quarantined: bool) {
        self.set_flag(name, QUARANTINED, quarantined);
    }

    /// Records the provider's pause.
    pub fn set_paused(&mut self, name: &str, paused: bool) {
        self.set_flag(name, PAUSED, paused);
    }

    /// Updates a node's reputation.
    pub fn set_reputation(&mut self, name: &str, reputation: Reputation) {
        if let Some(&id) = self.by_name.get(name) {
            self.hot[id as usize].reputation = reputation;
            self.nodes[id as usize].reputation = reputation;
        }
    }

    /// Forgets a node (revoked or left). Reservations on it stay until released.
    pub fn remove(&mut self, name: &str) {
        let Some(&id) = self.by_name.get(name) else { return };
        if self.hot[id as usize].flags & PRESENT == 0 {
            return;
        }
        self.account(id, false);
        self.leave_class(id);
        let h = &mut self.hot[id as usize];
        h.flags = 0;
        self.capacity = self.capacity.minus(Usage::of(h.capacity, self.nodes[id as usize].gpus.len() as u64));
        self.present -= 1;
    }

    /// A known node as last upserted (with current flags and reputation).
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.by_name.get(name).filter(|&&id| self.hot[id as usize].flags & PRESENT != 0).map(|&id| &self.nodes[id as usize])
    }

    /// Every known node, by name.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.by_name.values().filter(|&&id| self.hot[id as usize].flags & PRESENT != 0).map(|&id| &self.nodes[id as usize])
    }

    /// What is reserved on a node (also for nodes not connected yet).
    pub fn allocation(&self, name: &str) -> Allocation {
        self.by_name
            .get(name)
            .map(|&id| {
                let h = &self.hot[id as usize];
                Allocation { resources: h.allocated, gpus: h.gpus_used.count_ones(), running: h.running }
            })
            .unwrap_or_default()
    }

    /// Number of reservations held.
    pub fn reservations(&self) -> usize {
        self.reservations.len()
    }

    /// Whether `attempt_id` holds a reservation.
    pub fn is_reserved(&self, attempt_id: &str) -> bool {
        self.reservations.contains_key(attempt_id)
    }

    /// What `namespace` has reserved across the pool.
    pub fn namespace_usage(&self, namespace: &str) -> Usage {
        self.namespaces.get(namespace).map(|&i| self.ns_usage[i as usize]).unwrap_or_default()
    }

    fn apply(&mut self, id: &str, r: Reservation) {
        let h = &mut self.hot[r.node as usize];
        h.allocated = h.allocated.plus(r.resources);
        h.gpus_used |= r.gpus;
        h.running += 1;
        let u = &mut self.ns_usage[r.namespace as usize];
        *u = u.plus(Usage::of(r.resources, r.gpus.count_ones() as u64));
        self.reservations.insert(id.to_string(), r);
    }

    /// Records that `attempt_id` occupies `resources` and `gpu` devices on `node`, whether or
    /// not they fit (after a restart the store is the truth). Idempotent: a second call for the
    /// same id changes nothing and returns false. A node not known yet gets a placeholder that
    /// its first `upsert` fills in.
    pub fn reserve(&mut self, attempt_id: &str, node: &str, resources: Resources, gpu: &GpuRequest, namespace: &str) -> bool {
        if self.reservations.contains_key(attempt_id) {
            return false;
        }
        let id = self.slot(node);
        let ns = self.namespace_id(namespace);
        let h = &self.hot[id as usize];
        let gpus = pick_gpus(filter::matching_gpus(&self.nodes[id as usize].gpus, gpu) & !h.gpus_used, gpu.count);
        self.apply(attempt_id, Reservation { node: id, resources, gpus, namespace: ns, partial: true });
        true
    }

    /// Records that `attempt_id` holds exactly `resources` and the GPU devices `gpu_mask` on
    /// `node` (as [`Pool::held_gpus`] reported when it was placed), whether or not they fit:
    /// how reservations are rebuilt from a store that recorded them. Exact, so `refresh`
    /// leaves it alone. Idempotent like `reserve`.
    pub fn reserve_exact(&mut self, attempt_id: &str, node: &str, resources: Resources, gpu_mask: u64, namespace: &str) -> bool {
        if self.reservations.contains_key(attempt_id) {
            return false;
        }
        let id = self.slot(node);
        let ns = self.namespace_id(namespace);
        self.apply(attempt_id, Reservation { node: id, resources, gpus: gpu_mask, namespace: ns, partial: false });
        true
    }

    /// The GPU devices `attempt_id` holds on its node, one bit per device in the pool's order
    /// of the node's GPUs; None when it holds no reservation.
    pub fn held_gpus(&self, attempt_id: &str) -> Option<u64> {
        self.reservations.get(attempt_id).map(|r| r.gpus)
    }

    /// Completes a reservation recorded by `reserve` with `resources` and `gpu` (after a
    /// restart the store knows only cpu and memory; the job's first sync fills in the rest),
    /// once. Never creates one, so a release that raced ahead is not undone, and never changes
    /// one `place` made. Returns whether it changed anything.
    pub fn refresh(&mut self, attempt_id: &str, resources: Resources, gpu: &GpuRequest) -> bool {
        let Some(old) = self.reservations.get_mut(attempt_id) else { return false };
        if !old.partial {
            return false;
        }
        old.partial = false;
        if old.resources == resources && old.gpus.count_ones() == gpu.count {
            return false;
        }
        let (node, namespace) = (old.node, old.namespace);
        self.release(attempt_id);
        let h = &self.hot[node as usize];
        let gpus = pick_gpus(filter::matching_gpus(&self.nodes[node as usize].gpus, gpu) & !h.gpus_used, gpu.count);
        self.apply(attempt_id, Reservation { node, resources, gpus, namespace, partial: false });
        true
    }

    /// Frees what `attempt_id` reserved. Idempotent: returns false when it held nothing.
    pub fn release(&mut self, attempt_id: &str) -> bool {
        let Some(r) = self.reservations.remove(attempt_id) else { return false };
        let h = &mut self.hot[r.node as usize];
        h.allocated = h.allocated.saturating_sub(r.resources);
        h.gpus_used &= !r.gpus;
        h.running = h.running.saturating_sub(1);
        let u = &mut self.ns_usage[r.namespace as usize];
        *u = u.minus(Usage::of(r.resources, r.gpus.count_ones() as u64));
        true
    }

    /// The fitting classes for `r`, best class-score first, and the verdict on every class;
    /// cached per request until a class is added.
    fn cached(&mut self, r: &Request) -> (Arc<[ClassPick]>, Verdicts) {
        if let Some((n, picks, verdicts)) = self.cache.get(r)
            && *n == self.classes.len()
        {
            return (picks.clone(), verdicts.clone());
        }
        let verdicts: Verdicts = self.classes.iter().map(|c| (filter::static_exclusion(&c.facts, r), filter::matching_gpus(&c.facts.gpus, &r.gpu))).collect();
        let mut fit: Vec<(u32, Micros, u64, u64)> = vec![];
        for (i, c) in self.classes.iter().enumerate() {
            if verdicts[i].0.is_none() {
                let loc = score::locality(&c.facts, r.data_locality.as_ref());
                fit.push((i as u32, r.hourly_price(&c.facts.rates), loc, verdicts[i].1));
            }
        }
        let cheapest = fit.iter().map(|f| f.1).min().unwrap_or_default();
        let w = self.weights;
        let mut picks: Vec<ClassPick> = fit
            .into_iter()
            .map(|(class, price, loc, matching)| ClassPick { class, score: w.locality as u64 * loc + w.price as u64 * score::price(price, cheapest), matching })
            .collect();
        picks.sort_by(|a, b| b.score.cmp(&a.score).then(a.class.cmp(&b.class)));
        let picks: Arc<[ClassPick]> = picks.into();
        if self.cache.len() >= 256 {
            self.cache.clear();
        }
        self.cache.insert(r.clone(), (self.classes.len(), picks.clone(), verdicts.clone()));
        (picks, verdicts)
    }

    /// Chooses `r.replicas` nodes on distinct owners, best score first, without reserving.
    fn choose(&mut self, r: &Request, salt: u64) -> Option<Vec<(u32, u64)>> {
        let replicas = r.replicas.max(1) as usize;
        let (picks, _) = self.cached(r);
        let avoid = self.avoided(r);
        let taboo: Vec<u32> = r.distinct_from.iter().filter_map(|n| self.by_name.get(n)).map(|&id| self.hot[id as usize].owner).collect();
        let start = mix(self.seed ^ salt);
        let (wr, wb) = (self.weights.reputation as u64, self.weights.balance as u64);
        let mut found: Vec<(u64, u64, u32, u32, u64)> = Vec::with_capacity(SAMPLE + PER_CLASS);
        let mut owners: Vec<u32> = vec![];
        // Classes with the same class score form a tier; each decision enters a tier at a
        // rotating position so equal classes share the load.
        let mut i = 0;
        'tiers: while i < picks.len() {
            let mut end = i + 1;
            while end < picks.len() && picks[end].score == picks[i].score {
                end += 1;
            }
            let tier = &picks[i..end];
            let first = (start % tier.len() as u64) as usize;
            for k in 0..tier.len() {
                if found.len() >= SAMPLE && owners.len() >= replicas {
                    break 'tiers;
                }
                let pick = tier[(first + k) % tier.len()];
                let members = &self.classes[pick.class as usize].members;
                if members.is_empty() {
                    continue;
                }
                let offset = (mix(start ^ pick.class as u64) % members.len() as u64) as usize;
                let mut taken = 0;
                for j in 0..members.len() {
                    let id = members[(offset + j) % members.len()];
                    let h = &self.hot[id as usize];
                    if h.flags != SCHEDULABLE
                        || taboo.contains(&h.owner)
                        || filter::dynamic_exclusion(h.reputation, avoid.contains(&id), h.capacity, h.allocated, h.gpus_used, pick.matching, r).is_some()
                    {
                        continue;
                    }
                    let s = pick.score + wr * h.reputation.0 as u64 + wb * score::balance(h.capacity, h.allocated, r);
                    found.push((s, mix(start ^ id as u64), id, h.owner, pick.matching));
                    if !owners.contains(&h.owner) {
                        owners.push(h.owner);
                    }
                    taken += 1;
                    if taken >= PER_CLASS {
                        break;
                    }
                }
            }
            i = end;
        }
        if owners.len() < replicas {
            return None;
        }
        found.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut chosen: Vec<(u32, u64)> = Vec::with_capacity(replicas);
        let mut used_owners: Vec<u32> = Vec::with_capacity(replicas);
        for (_, _, id, owner, matching) in found {
            if !used_owners.contains(&owner) {
                used_owners.push(owner);
                chosen.push((id, matching));
                if chosen.len() == replicas {
                    return Some(chosen);
                }
            }
        }
        None
    }

    /// Places one task: `attempt_ids` has one id per replica (`r.replicas` of them), each put
    /// on a distinct provider with a distinct owner. All replicas are reserved or none. `salt`
    /// varies the sampling between tasks (use [`salt`] of the first attempt id).
    pub fn place(&mut self, r: &Request, attempt_ids: &[String], namespace: &str, salt: u64) -> Result<Vec<String>, Box<Explanation>> {
        let r1;
        let r = if r.replicas as usize == attempt_ids.len() {
            r
        } else {
            r1 = Request { replicas: attempt_ids.len() as u32, ..r.clone() };
            &r1
        };
        match self.place_quiet(r, attempt_ids, namespace, salt) {
            Some(nodes) => Ok(nodes),
            None => Err(Box::new(self.explain(r))),
        }
    }

    fn place_quiet(&mut self, r: &Request, attempt_ids: &[String], namespace: &str, salt: u64) -> Option<Vec<String>> {
        if attempt_ids.is_empty() || attempt_ids.iter().any(|id| self.reservations.contains_key(id)) {
            return None;
        }
        let chosen = self.choose(r, salt)?;
        let ns = self.namespace_id(namespace);
        let mut names = Vec::with_capacity(chosen.len());
        for ((node, matching), id) in chosen.into_iter().zip(attempt_ids) {
            let gpus = pick_gpus(matching & !self.hot[node as usize].gpus_used, r.gpu.count);
            self.apply(id, Reservation { node, resources: r.resources, gpus, namespace: ns, partial: false });
            names.push(self.nodes[node as usize].name.clone());
        }
        Some(names)
    }

    /// Counts, for each reason, the known nodes that cannot take `r`. Exact: classes that
    /// fail a static filter are counted from their counters, the members of the others one by
    /// one.
    pub fn explain(&mut self, r: &Request) -> Explanation {
        let mut e = Explanation::new(self.present, r);
        let (_, verdicts) = self.cached(r);
        let avoid = self.avoided(r);
        let mut counts = [0usize; Exclusion::ALL.len()];
        let mut owners: Vec<u32> = vec![];
        for (class, (verdict, matching)) in self.classes.iter().zip(verdicts.iter()) {
            let [unready, cordoned, quarantined, paused] = class.unavailable.map(|n| n as usize);
            counts[Exclusion::NotReady as usize] += unready;
            counts[Exclusion::Cordoned as usize] += cordoned;
            counts[Exclusion::Quarantined as usize] += quarantined;
            counts[Exclusion::Paused as usize] += paused;
            if let Some(why) = verdict {
                counts[*why as usize] += class.members.len().saturating_sub(unready + cordoned + quarantined + paused);
                continue;
            }
            for &id in &class.members {
                let h = &self.hot[id as usize];
                if h.flags != SCHEDULABLE {
                    continue;
                }
                match filter::dynamic_exclusion(h.reputation, avoid.contains(&id), h.capacity, h.allocated, h.gpus_used, *matching, r) {
                    Some(why) => counts[why as usize] += 1,
                    None if owners.len() < r.replicas as usize && !owners.contains(&h.owner) => owners.push(h.owner),
                    None => {}
                }
            }
        }
        e.excluded = Exclusion::ALL.iter().zip(counts).filter(|(_, n)| *n > 0).map(|(w, n)| (*w, n)).collect();
        if r.replicas > 1 && e.fitting() > 0 && owners.len() < r.replicas as usize {
            e.owners = Some(owners.len());
        }
        e
    }

    /// Classes of alike nodes (for diagnostics and the benchmark).
    pub fn classes(&self) -> usize {
        self.classes.len()
    }

    /// Places a job's batch of tasks (each with one attempt id per replica) fairly: first
    /// it records the job's waiting demand, then keeps room for the tasks of other jobs ahead
    /// of it in the fair-share queue (see [`fair::owed`]), places what it can in the rest,
    /// and frees the kept room again. Stops at the first task that does not fit.
    pub fn place_batch(&mut self, demand: Demand, tasks: &[Vec<String>], now_ms: i64) -> Batch {
        self.demands.retain(|_, d| d.seen_ms + DEMAND_TTL_MS > now_ms);
        // Ranked at the priority the admin lets its namespace use, whatever the job asked for.
        let priority = self.fair.effective_priority(&demand.namespace, demand.priority);
        let me = Demand { remaining: tasks.len() as u32, seen_ms: now_ms, priority, ..demand };
        self.demands.insert(me.job.clone(), me.clone());
        let usage: HashMap<String, Usage> = self.namespaces.iter().map(|(n, &i)| (n.clone(), self.ns_usage[i as usize])).collect();
        let owed = fair::owed(&me, self.demands.values(), &usage, self.capacity, &self.fair);
        let mut holds: Vec<String> = vec![];
        let mut held_for = vec![];
        for (job, count) in owed {
            let Some(d) = self.demands.get(&job).cloned() else { continue };
            let mut held = 0;
            for i in 0..count.min(HOLD_LIMIT - holds.len().min(HOLD_LIMIT as usize) as u32) {
                let ids: Vec<String> = (0..d.request.replicas.max(1)).map(|k| format!("\0hold/{job}/{i}/{k}")).collect();
                if self.place_quiet(&d.request, &ids, &d.namespace, salt(&ids[0])).is_none() {
                    break;
                }
                holds.extend(ids);
                held += 1;
            }
            if held > 0 {
                held_for.push(job);
            }
        }
        let mut batch = Batch::default();
        let mut failed = false;
        for (t, ids) in tasks.iter().enumerate() {
            let r = Request { replicas: ids.len() as u32, ..me.request.clone() };
            match self.place_quiet(&r, ids, &me.namespace, salt(ids.first().map_or("", String::as_str))) {
                Some(nodes) => batch.placed.push(Placement { task: t, nodes }),
                None => {
                    failed = true;
                    break;
                }
            }
        }
        let held_count = holds.len();
        for id in &holds {
            self.release(id);
        }
        if failed {
            let r = Request { replicas: tasks.get(batch.placed.len()).map_or(1, |ids| ids.len() as u32), ..me.request.clone() };
            let mut e = self.explain(&r);
            if held_count > 0 && e.fitting() >= r.replicas as usize && e.owners.is_none() {
                e.held_for_others = held_count / r.replicas.max(1) as usize;
            }
            batch.unplaced = Some(e);
        }
        let remaining = tasks.len() - batch.placed.len();
        if remaining == 0 {
            self.demands.remove(&me.job);
        } else if let Some(d) = self.demands.get_mut(&me.job) {
            d.remaining = remaining as u32;
        }
        batch.held_for = held_for;
        batch
    }

    /// The namespace weights and priority grants placement follows.
    pub fn fair(&self) -> &FairShare {
        &self.fair
    }

    /// Forgets a job's waiting demand (it was deleted, finished or suspended).
    pub fn forget_demand(&mut self, job: &str) {
        self.demands.remove(job);
    }

    /// Jobs waiting for room, for metrics and tests.
    pub fn demands(&self) -> impl Iterator<Item = &Demand> {
        self.demands.values()
    }
}

/// The lowest `count` devices of `free`; fewer when fewer are free.
fn pick_gpus(mut free: u64, count: u32) -> u64 {
    let mut mask = 0;
    for _ in 0..count {
        if free == 0 {
            break;
        }
        let bit = free & free.wrapping_neg();
        mask |= bit;
        free &= !bit;
    }
    mask
}

#[cfg(test)]
mod tests;
