//! The connected fleet: which nodes have a live session, what they offer, the channel to
//! each, and the scheduler's pool built from them. In memory only: after a restart it refills
//! as agents reconnect with Hello and the dispatcher rebuilds reservations from the store.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use kommune_proto::v1::{OperatorMessage, operator_message};
use tokio::sync::mpsc;

use crate::pricing::Rates;
use crate::scheduler::{self, FairShare, Gpu, Node, Pool, REGION_LABEL, Reputation, Resources, Taint, Weights, ZONE_LABEL};

/// What an agent says its machine offers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// CPU, memory and ephemeral storage (0 when the agent does not report disk).
    pub capacity: Resources,
    /// GPU devices (none when the agent does not report them).
    pub gpus: Vec<Gpu>,
    pub runtimes: Vec<String>,
    pub arch: String,
    pub os: String,
    pub region: String,
    pub zone: String,
    pub agent_version: String,
}

/// Kubernetes and Go name architectures differently from Rust; the scheduler speaks Rust's.
pub fn normalize_arch(arch: &str) -> String {
    match arch.to_ascii_lowercase().as_str() {
        "amd64" | "x86-64" | "x64" => "x86_64".into(),
        "arm64" => "aarch64".into(),
        other => other.into(),
    }
}

impl NodeFacts {
    /// Converts and bounds what the agent sent: strings are truncated, unknown runtimes dropped.
    pub fn from_proto(f: Option<&kommune_proto::v1::NodeFacts>) -> NodeFacts {
        let Some(f) = f else { return NodeFacts::default() };
        let cap = f.capacity.clone().unwrap_or_default();
        let short = |s: &str| s.chars().take(63).collect::<String>();
        let known = [kommune_proto::runtime::WASM, kommune_proto::runtime::EXEC, kommune_proto::runtime::CONTAINER];
        let mut runtimes: Vec<String> = cap.runtimes.iter().filter(|r| known.contains(&r.as_str())).cloned().collect();
        runtimes.sort();
        runtimes.dedup();
        // At most 64 GPUs per machine are believed; a longer list is cut, never padded.
        let gpus = cap.gpus.iter().take(64).map(|g| crate::scheduler::Gpu { model: short(&g.model), memory_bytes: g.memory_bytes }).collect();
        NodeFacts {
            capacity: Resources { cpu_millis: cap.cpu_millis, memory_bytes: cap.memory_bytes, ephemeral_bytes: cap.ephemeral_storage_bytes },
            gpus,
            runtimes,
            arch: normalize_arch(&short(&cap.arch)),
            os: short(&cap.os).to_ascii_lowercase(),
            region: short(&f.region),
            zone: short(&f.zone),
            agent_version: short(&f.agent_version),
        }
    }
}

/// What the admin says about a node, from its ProviderNode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAdmin {
    /// `spec.owner` (empty: the node is its own party).
    pub owner: String,
    /// `spec.unschedulable`.
    pub cordoned: bool,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `spec.taints`.
    pub taints: Vec<Taint>,
    /// The node's effective rates (cluster rates with its overrides).
    pub rates: Rates,
}

/// Everything known about one node, whatever the state of its session.
#[derive(Debug, Clone, Default)]
struct Known {
    facts: NodeFacts,
    admin: NodeAdmin,
    paused: bool,
    ready: bool,
    /// Has had a session with this operator: only such nodes are in the pool.
    seen: bool,
    succeeded: u64,
    failed: u64,
}

impl Known {
    fn node(&self, name: &str) -> Node {
        let mut labels = self.admin.labels.clone();
        // The agent's declared topology wins over a label an admin typed by hand.
        if !self.facts.region.is_empty() {
            labels.insert(REGION_LABEL.into(), self.facts.region.clone());
        }
        if !self.facts.zone.is_empty() {
            labels.insert(ZONE_LABEL.into(), self.facts.zone.clone());
        }
        Node {
            name: name.to_string(),
            owner: self.admin.owner.clone(),
            ready: self.ready,
            cordoned: self.admin.cordoned,
            paused: self.paused,
            runtimes: self.facts.runtimes.clone(),
            arch: self.facts.arch.clone(),
            os: self.facts.os.clone(),
            labels,
            taints: self.admin.taints.clone(),
            capacity: self.facts.capacity,
            gpus: self.facts.gpus.clone(),
            reputation: self.reputation(),
            rates: self.admin.rates,
        }
    }

    fn reputation(&self) -> Reputation {
        Reputation::from_history(self.succeeded, self.failed)
    }
}

/// The sending half of a session's outbound stream.
pub type Outbound = mpsc::Sender<Result<OperatorMessage, tonic::Status>>;

struct Session {
    id: u64,
    tx: Outbound,
    facts: NodeFacts,
    /// When the agent last said anything: a silent loss is counted from here, not from when
    /// the operator noticed it.
    last_seen: Instant,
}

/// Live sessions by node name, and the nodes whose session went away (kept, not ready, so
/// explanations count them and their attempts can be expired after a grace period).
pub struct Fleet {
    sessions: Mutex<HashMap<String, Session>>,
    gone: Mutex<HashMap<String, (Instant, NodeFacts)>>,
    known: Mutex<HashMap<String, Known>>,
    pool: Mutex<Pool>,
    next_id: AtomicU64,
    started: Instant,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet::new(0, Weights::default(), FairShare::default())
    }
}

/// Why a message could not be handed to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// No session is open.
    NotConnected,
    /// The session's outbound queue is full (the agent is not reading).
    Full,
}

impl Fleet {
    /// A fleet whose scheduler uses `seed`, score `weights` and namespace weights `fair`.
    pub fn new(seed: u64, weights: Weights, fair: FairShare) -> Self {
        Fleet {
            sessions: Mutex::default(),
            gone: Mutex::default(),
            known: Mutex::default(),
            pool: Mutex::new(Pool::new(seed, weights, fair)),
            next_id: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// The scheduler's pool. Lock order: never take another fleet lock while holding it.
    pub fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes what is known about `node` and brings the pool up to date.
    fn update(&self, node: &str, change: impl FnOnce(&mut Known)) {
        let n = {
            let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            let k = known.entry(node.to_string()).or_default();
            change(k);
            k.seen.then(|| k.node(node))
        };
        if let Some(n) = n {
            self.pool().upsert(n);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gone(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, NodeFacts)>> {
        self.gone.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session, replacing (and so closing) any older one for the same node.
    /// Returns the session id to pass to `disconnect`.
    pub fn connect(&self, node: &str, facts: NodeFacts, tx: Outbound) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.gone().remove(node);
        self.lock().insert(node.to_string(), Session { id, tx, facts: facts.clone(), last_seen: Instant::now() });
        self.update(node, |k| {
            k.facts = facts;
            k.ready = true;
            k.seen = true;
        });
        id
    }

    /// Forgets the session if it is still the current one for the node. Returns true if it was.
    pub fn disconnect(&self, node: &str, session_id: u64) -> bool {
        let mut sessions = self.lock();
        if sessions.get(node).is_some_and(|s| s.id == session_id) {
            if let Some(s) = sessions.remove(node) {
                self.gone().insert(node.to_string(), (s.last_seen, s.facts));
            }
            drop(sessions);
            self.update(node, |k| k.ready = false);
            true
        } else {
            false
        }
    }

    /// Records that the node's current session just heard from the agent.
    pub fn touch(&self, node: &str, session_id: u64) {
        if let Some(s) = self.lock().get_mut(node).filter(|s| s.id == session_id) {
            s.last_seen = Instant::now();
        }
    }

    pub fn is_connected(&self, node: &str) -> bool {
        self.lock().contains_key(node)
    }

    /// How long a node has been silent without a session (counted from its last message): None
    /// while connected; for a node not seen since this operator started, the time since then.
    pub fn absent_for(&self, node: &str) -> Option<std::time::Duration> {
        if self.is_connected(node) {
            return None;
        }
        Some(self.gone().get(node).map_or(self.started, |(since, _)| *since).elapsed())
    }

    pub fn connected(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().keys().cloned().collect();
        names.sort();
        names
    }

    /// Ends a node's session with `status` (the agent sees it as the stream's error) and forgets
    /// the node entirely. Returns whether a session was open.
    pub fn close(&self, node: &str, status: tonic::Status) -> bool {
        self.gone().remove(node);
        if let Some(k) = self.known.lock().unwrap_or_else(|p| p.into_inner()).get_mut(node) {
            k.ready = false;
            k.seen = false;
        }
        self.pool().remove(node);
        match self.lock().remove(node) {
            Some(s) => {
                let _ = s.tx.try_send(Err(status));
                true
            }
            None => false,
        }
    }

    /// Records whether the node's provider paused it (from Hello and every Heartbeat).
    pub fn set_paused(&self, node: &str, paused: bool) {
        let changed = self.known.lock().unwrap_or_else(|p| p.into_inner()).get(node).is_none_or(|k| k.paused != paused);
        if changed {
            self.update(node, |k| k.paused = paused);
        }
    }

    /// Records an admin's cordon (`spec.unschedulable`).
    pub fn set_cordoned(&self, node: &str, cordoned: bool) {
        self.update(node, |k| k.admin.cordoned = cordoned);
    }

    /// Records what the admin says about a node (its ProviderNode spec and labels). Only
    /// nodes that have a session or had one are scheduled on; this never adds a node.
    pub fn set_admin(&self, node: &str, admin: NodeAdmin) {
        let changed = self.known.lock().unwrap_or_else(|p| p.into_inner()).get(node).is_none_or(|k| k.admin != admin);
        if changed {
            self.update(node, |k| k.admin = admin);
        }
    }

    /// Counts a finished attempt on `node` towards its reputation: a success, or (when
    /// `success` is false) a failure or loss. Cancellations do not count.
    pub fn record_outcome(&self, node: &str, success: bool) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let k = known.entry(node.to_string()).or_default();
        if success {
            k.succeeded += 1;
        } else {
            k.failed += 1;
        }
        let reputation = k.reputation();
        drop(known);
        self.pool().set_reputation(node, reputation);
    }

    /// Sets a node's history wholesale (rebuilt from the store at startup).
    pub fn set_history(&self, node: &str, succeeded: u64, failed: u64) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let k = known.entry(node.to_string()).or_default();
        (k.succeeded, k.failed) = (succeeded, failed);
        let reputation = k.reputation();
        drop(known);
        self.pool().set_reputation(node, reputation);
    }

    /// A node's reputation from its finished attempts.
    pub fn reputation(&self, node: &str) -> Reputation {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).get(node).map_or(Reputation::from_history(0, 0), Known::reputation)
    }

    /// Hands a message to a node's session without waiting.
    pub fn send(&self, node: &str, msg: operator_message::Kind) -> Result<(), SendError> {
        let sessions = self.lock();
        let s = sessions.get(node).ok_or(SendError::NotConnected)?;
        s.tx.try_send(Ok(OperatorMessage { kind: Some(msg) })).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::NotConnected,
        })
    }

    /// The scheduler's view of one node, as last updated.
    /// The most any known node offers of each resource (each maximum on its own).
    pub fn largest_capacity(&self) -> Resources {
        self.pool().nodes().fold(Resources::default(), |m, n| Resources {
            cpu_millis: m.cpu_millis.max(n.capacity.cpu_millis),
            memory_bytes: m.memory_bytes.max(n.capacity.memory_bytes),
            ephemeral_bytes: m.ephemeral_bytes.max(n.capacity.ephemeral_bytes),
        })
    }

    pub fn node(&self, name: &str) -> Option<scheduler::Node> {
        self.pool().node(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_session_replaces_the_older_and_the_older_cannot_remove_it() {
        let fleet = Fleet::default();
        let (tx1, mut rx1) = mpsc::channel(1);
        let (tx2, _rx2) = mpsc::channel(1);
        let s1 = fleet.connect("n", NodeFacts::default(), tx1);
        let s2 = fleet.connect("n", NodeFacts::default(), tx2);
        // The old session's sender was dropped: its stream ends.
        assert!(rx1.try_recv().is_err());
        assert!(!fleet.disconnect("n", s1));
        assert!(fleet.is_connected("n"));
        assert!(fleet.disconnect("n", s2));
        assert!(!fleet.is_connected("n"));
        assert!(fleet.absent_for("n").is_some());
        let known = fleet.pool().len();
        assert_eq!((known, fleet.node("n").unwrap().ready), (1, false), "a gone node is kept as not ready");
        let (tx3, _rx3) = mpsc::channel(1);
        fleet.connect("n", NodeFacts::default(), tx3);
        assert_eq!(fleet.absent_for("n"), None);
        assert!(fleet.node("n").unwrap().ready);
        assert!(fleet.absent_for("never-seen").is_some());
    }

    #[test]
    fn the_pool_sees_agent_facts_admin_labels_taints_owner_and_history() {
        let fleet = Fleet::default();
        // A ProviderNode whose agent never connected here is not scheduled on.
        fleet.set_admin("idle", NodeAdmin { owner: "bob".into(), ..Default::default() });
        assert!(fleet.node("idle").is_none());
        let (tx, _rx) = mpsc::channel(1);
        let facts = NodeFacts { region: "eu-west".into(), zone: "eu-west-a".into(), arch: "x86_64".into(), ..NodeFacts::default() };
        fleet.connect("n", facts, tx);
        let taint = Taint { key: "dedicated".into(), value: "ml".into(), ..Default::default() };
        let labels = BTreeMap::from([("tier".to_string(), "fast".to_string()), (REGION_LABEL.to_string(), "typed-by-hand".to_string())]);
        fleet.set_admin("n", NodeAdmin { owner: "alice".into(), cordoned: true, labels, taints: vec![taint.clone()], rates: Rates::default() });
        fleet.record_outcome("n", true);
        fleet.record_outcome("n", false);
        let n = fleet.node("n").unwrap();
        assert_eq!((n.owner.as_str(), n.cordoned, n.taints.clone()), ("alice", true, vec![taint]));
        assert_eq!(n.labels.get("tier").map(String::as_str), Some("fast"));
        assert_eq!(n.labels.get(REGION_LABEL).map(String::as_str), Some("eu-west"), "the agent's declared region wins");
        assert_eq!(n.labels.get(ZONE_LABEL).map(String::as_str), Some("eu-west-a"));
        assert_eq!(n.reputation, Reputation(500));
        assert_eq!(fleet.reputation("n"), Reputation(500));
        fleet.close("n", tonic::Status::permission_denied("revoked"));
        assert!(fleet.node("n").is_none(), "a revoked node leaves the pool");
    }

    #[test]
    fn architectures_are_named_the_rust_way() {
        assert_eq!(normalize_arch("amd64"), "x86_64");
        assert_eq!(normalize_arch("ARM64"), "aarch64");
        assert_eq!(normalize_arch("riscv64"), "riscv64");
    }

    #[test]
    fn send_reports_full_and_missing_sessions() {
        let fleet = Fleet::default();
        let (tx, _rx) = mpsc::channel(1);
        fleet.connect("n", NodeFacts::default(), tx);
        let cancel = || operator_message::Kind::Cancel(kommune_proto::v1::Cancel::default());
        assert_eq!(fleet.send("n", cancel()), Ok(()));
        assert_eq!(fleet.send("n", cancel()), Err(SendError::Full));
        assert_eq!(fleet.send("other", cancel()), Err(SendError::NotConnected));
    }

    #[test]
    fn facts_from_agents_are_bounded() {
        let f = kommune_proto::v1::NodeFacts {
            capacity: Some(kommune_proto::v1::Capacity {
                cpu_millis: 4000,
                memory_bytes: 1 << 30,
                runtimes: vec!["exec".into(), "wasm".into(), "bogus".into(), "wasm".into()],
                arch: "x".repeat(500),
                os: "linux".into(),
                gpus: (0..100)
                    .map(|i| kommune_proto::v1::Gpu { model: "NVIDIA A100-SXM4-80GB".into(), memory_bytes: 80 << 30, uuid: format!("GPU-{i}") })
                    .collect(),
                ephemeral_storage_bytes: 20 << 30,
            }),
            agent_version: "1".into(),
            region: "eu".into(),
            zone: String::new(),
        };
        let facts = NodeFacts::from_proto(Some(&f));
        assert_eq!(facts.runtimes, vec!["exec", "wasm"]);
        assert_eq!(facts.arch.len(), 63);
        assert_eq!(facts.gpus.len(), 64, "GPUs the agent detected are believed, up to a bound");
        assert_eq!(facts.gpus[0], crate::scheduler::Gpu { model: "NVIDIA A100-SXM4-80GB".into(), memory_bytes: 80 << 30 });
        assert_eq!(facts.capacity.ephemeral_bytes, 20 << 30);
        assert_eq!(NodeFacts::from_proto(None), NodeFacts::default());
    }
}
