//! The connected fleet: which nodes have a live session, what they offer, the channel to
//! each, and the scheduler's pool built from them. In memory only: after a restart it refills
//! as agents reconnect with Hello and the dispatcher rebuilds reservations from the store.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kommune_proto::v1::{OperatorMessage, operator_message};
use tokio::sync::{Notify, mpsc};

mod claims;
mod standing;

pub use claims::{CEILING, NodeFacts, bounded, normalize_arch};
pub use standing::{NodeStanding, Quarantine, ReputationModel};

use crate::pricing::Rates;
use crate::scheduler::{self, FairShare, Node, Pool, REGION_LABEL, Reputation, Taint, Weights, ZONE_LABEL};
use crate::store::CapacityLimits;

/// What the admin says about a node, from its ProviderNode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAdmin {
    /// `spec.owner` (empty: none set; the join token's owner applies).
    pub owner: String,
    /// `spec.capacityLimits`: each cap set here wins over the join token's.
    pub limits: CapacityLimits,
    /// `spec.unschedulable`.
    pub cordoned: bool,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `spec.taints`.
    pub taints: Vec<Taint>,
    /// The node's effective rates (cluster rates with its overrides).
    pub rates: Rates,
}

/// What the node's registration says (the store's, from its join token).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeRegistration {
    /// The join token's owner; None for nodes registered before owners were recorded.
    pub owner: Option<String>,
    /// The join token's caps.
    pub limits: CapacityLimits,
}

/// Everything known about one node, whatever the state of its session.
#[derive(Debug, Clone, Default)]
struct Known {
    facts: NodeFacts,
    admin: NodeAdmin,
    registration: NodeRegistration,
    paused: bool,
    ready: bool,
    /// Has had a session with this operator: only such nodes are in the pool.
    seen: bool,
    /// What it was observed doing, its reputation and any quarantine.
    record: standing::Record,
    /// The ed25519 key of its sessions' certificate: its earnings are the receipts signed
    /// with it, even if the name had another key in an older ledger.
    public_key: Option<[u8; 32]>,
}

impl Known {
    fn node(&self, name: &str) -> Node {
        let mut labels = self.admin.labels.clone();
        // The agent's declared topology only fills in what the admin left unset: an agent may
        // say anything, and jobs pin regions for data residency.
        for (label, declared) in [(REGION_LABEL, &self.facts.region), (ZONE_LABEL, &self.facts.zone)] {
            if !declared.is_empty() {
                labels.entry(label.to_string()).or_insert_with(|| declared.clone());
            }
        }
        let (capacity, gpus) = bounded(&self.facts, &self.limits());
        Node {
            name: name.to_string(),
            owner: self.owner(name),
            ready: self.ready,
            cordoned: self.admin.cordoned,
            quarantined: self.record.quarantine.is_some(),
            paused: self.paused,
            runtimes: self.facts.runtimes.clone(),
            arch: self.facts.arch.clone(),
            os: self.facts.os.clone(),
            labels,
            taints: self.admin.taints.clone(),
            capacity,
            gpus,
            reputation: self.record.reputation.unwrap_or(Reputation::NEW),
            rates: self.admin.rates,
        }
    }

    /// The party the node belongs to for replica placement, never empty: the admin's
    /// `spec.owner`, else its join token's owner, else (only for nodes registered before owners
    /// were recorded) the node itself.
    fn owner(&self, name: &str) -> String {
        if !self.admin.owner.is_empty() {
            return self.admin.owner.clone();
        }
        match self.registration.owner.as_deref() {
            Some(owner) if !owner.is_empty() => owner.to_string(),
            _ => format!("node:{name}"),
        }
    }

    /// The caps on the agent's claims: each of the admin's, else the join token's.
    fn limits(&self) -> CapacityLimits {
        let (a, t) = (&self.admin.limits, &self.registration.limits);
        CapacityLimits {
            cpu_millis: a.cpu_millis.or(t.cpu_millis),
            memory_bytes: a.memory_bytes.or(t.memory_bytes),
            ephemeral_bytes: a.ephemeral_bytes.or(t.ephemeral_bytes),
            gpus: a.gpus.or(t.gpus),
        }
    }
}

/// The sending half of a session's outbound stream.
pub type Outbound = mpsc::Sender<Result<OperatorMessage, tonic::Status>>;

struct Session {
    id: u64,
    tx: Outbound,
    /// Told when a newer session of the node replaces this one, so its task ends at once
    /// rather than when its agent next goes quiet.
    replaced: Arc<Notify>,
    facts: NodeFacts,
    /// When the agent last said anything: a silent loss is counted from here, not from when
    /// the operator noticed it.
    last_seen: Instant,
}

/// A session registered by [`Fleet::connect_session`].
#[derive(Debug, Clone)]
pub struct LiveSession {
    pub id: u64,
    /// Notified once, when a newer session of the same node replaces this one.
    pub replaced: Arc<Notify>,
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
    model: ReputationModel,
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
            model: ReputationModel::default(),
        }
    }

    /// The scheduler's pool. Lock order: never take another fleet lock while holding it.
    pub fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, Known>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Registers a session, replacing any older one for the same node. Returns the session id
    /// to pass to `disconnect`.
    pub fn connect(&self, node: &str, facts: NodeFacts, tx: Outbound) -> u64 {
        self.connect_session(node, facts, tx).id
    }

    /// Registers a session as the node's only live one. An older session of the node is ended:
    /// its stream gets Aborted ("replaced by a newer session") and its task is told through
    /// its [`LiveSession::replaced`], so a loop of session opens never holds more than one.
    pub fn connect_session(&self, node: &str, facts: NodeFacts, tx: Outbound) -> LiveSession {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let replaced = Arc::new(Notify::new());
        self.gone().remove(node);
        let session = Session { id, tx, replaced: replaced.clone(), facts: facts.clone(), last_seen: Instant::now() };
        if let Some(old) = self.lock().insert(node.to_string(), session) {
            let _ = old.tx.try_send(Err(tonic::Status::aborted(format!("session of node {node} replaced by a newer session"))));
            // A permit is stored if the old task is not waiting yet, so it cannot miss this.
            old.replaced.notify_one();
        }
        self.update(node, |k| {
            k.facts = facts;
            k.ready = true;
            k.seen = true;
        });
        LiveSession { id, replaced }
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
                s.replaced.notify_one();
                true
            }
            None => false,
        }
    }

    /// Records the key the node's session authenticated with (its certificate's).
    pub fn set_public_key(&self, node: &str, key: [u8; 32]) {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).entry(node.to_string()).or_default().public_key = Some(key);
    }

    /// The key the node's sessions authenticate with, once one has opened on this operator.
    pub fn public_key(&self, node: &str) -> Option<[u8; 32]> {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).get(node).and_then(|k| k.public_key)
    }

    /// Records whether the node's provider paused it (from Hello and every Heartbeat).
    pub fn set_paused(&self, node: &str, paused: bool) {
        let changed = self.known.lock().unwrap_or_else(|p| p.into_inner()).get(node).is_none_or(|k| k.paused != paused);
        if changed {
            self.update(node, |k| k.paused = paused);
        }
    }

    /// Records what the node's registration says (owner and caps from its join token). Called
    /// before its session opens, so its first placement already sees them.
    pub fn set_registration(&self, node: &str, registration: NodeRegistration) {
        let changed = self.known.lock().unwrap_or_else(|p| p.into_inner()).get(node).is_none_or(|k| k.registration != registration);
        if changed {
            self.update(node, |k| k.registration = registration);
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

    /// Hands a message to a node's session without waiting.
    pub fn send(&self, node: &str, msg: operator_message::Kind) -> Result<(), SendError> {
        let sessions = self.lock();
        let s = sessions.get(node).ok_or(SendError::NotConnected)?;
        s.tx.try_send(Ok(OperatorMessage { kind: Some(msg) })).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::NotConnected,
        })
    }

    /// [`Fleet::send`], but when the session's queue is full, waits up to `within` for the
    /// agent to read and make room: a burst of assignments larger than the queue (a sync
    /// placing hundreds of tasks on one node) then waits for the agent instead of losing the
    /// attempts past the queue's end. A session that makes no room within `within` is `Full`.
    pub async fn send_or_wait(&self, node: &str, msg: operator_message::Kind, within: std::time::Duration) -> Result<(), SendError> {
        let (tx, msg) = {
            let sessions = self.lock();
            let s = sessions.get(node).ok_or(SendError::NotConnected)?;
            match s.tx.try_send(Ok(OperatorMessage { kind: Some(msg) })) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(SendError::NotConnected),
                Err(mpsc::error::TrySendError::Full(msg)) => (s.tx.clone(), msg),
            }
        };
        if within.is_zero() {
            return Err(SendError::Full);
        }
        match tokio::time::timeout(within, tx.reserve()).await {
            Ok(Ok(permit)) => {
                permit.send(msg);
                Ok(())
            }
            Ok(Err(_)) => Err(SendError::NotConnected),
            Err(_) => Err(SendError::Full),
        }
    }

    /// The scheduler's view of one node, as last updated.
    /// The most any known node offers of each resource (each maximum on its own).
    pub fn largest_capacity(&self) -> scheduler::Resources {
        self.pool().nodes().fold(scheduler::Resources::default(), |m, n| scheduler::Resources {
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
    use crate::scheduler::Resources;

    #[test]
    fn a_newer_session_replaces_the_older_and_the_older_cannot_remove_it() {
        let fleet = Fleet::default();
        let (tx1, mut rx1) = mpsc::channel(1);
        let (tx2, _rx2) = mpsc::channel(1);
        let s1 = fleet.connect_session("n", NodeFacts::default(), tx1);
        let s2 = fleet.connect("n", NodeFacts::default(), tx2);
        // The old session's stream ends with a status saying why, and its task is told.
        let ended = rx1.try_recv().expect("the old stream gets a status").unwrap_err();
        assert_eq!(ended.code(), tonic::Code::Aborted);
        assert!(ended.message().contains("replaced by a newer session"), "{ended:?}");
        let told = s1.replaced.notified();
        assert!(futures::FutureExt::now_or_never(told).is_some(), "the old task is told it was replaced");
        let s1 = s1.id;
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
    fn a_nodes_key_is_the_one_its_latest_session_authenticated_with() {
        let fleet = Fleet::default();
        assert_eq!(fleet.public_key("n"), None, "not known before a session");
        fleet.set_public_key("n", [1; 32]);
        fleet.set_public_key("n", [2; 32]);
        assert_eq!(fleet.public_key("n"), Some([2; 32]));
        assert!(fleet.node("n").is_none(), "knowing a key does not put the node in the pool");
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
        fleet.set_admin("n", NodeAdmin { owner: "alice".into(), cordoned: true, labels, taints: vec![taint.clone()], ..Default::default() });
        let n = fleet.node("n").unwrap();
        assert_eq!((n.owner.as_str(), n.cordoned, n.taints.clone()), ("alice", true, vec![taint]));
        assert_eq!(n.labels.get("tier").map(String::as_str), Some("fast"));
        assert_eq!(n.labels.get(REGION_LABEL).map(String::as_str), Some("typed-by-hand"), "the admin's region wins over the agent's");
        assert_eq!(n.labels.get(ZONE_LABEL).map(String::as_str), Some("eu-west-a"), "the agent's zone fills in where the admin set none");
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

    /// A full queue whose agent reads: the message waits for room instead of being refused.
    /// One whose agent does not read: Full once the wait is over. A closed one: not connected.
    #[tokio::test]
    async fn send_or_wait_waits_for_a_reader_and_gives_up_on_one_that_does_not_read() {
        use std::time::Duration;
        let fleet = Fleet::default();
        let (tx, mut rx) = mpsc::channel(1);
        fleet.connect("n", NodeFacts::default(), tx);
        let cancel = |id: &str| operator_message::Kind::Cancel(kommune_proto::v1::Cancel { attempt_id: id.into(), ..Default::default() });
        assert_eq!(fleet.send_or_wait("n", cancel("1"), Duration::ZERO).await, Ok(()));
        assert_eq!(fleet.send_or_wait("n", cancel("2"), Duration::ZERO).await, Err(SendError::Full), "no wait: full at once");
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut got = vec![];
            while let Some(Ok(m)) = rx.recv().await {
                if let Some(operator_message::Kind::Cancel(c)) = m.kind {
                    got.push(c.attempt_id);
                }
                if got.len() == 3 {
                    break;
                }
            }
            (got, rx)
        });
        assert_eq!(fleet.send_or_wait("n", cancel("2"), Duration::from_secs(10)).await, Ok(()), "waited for the reader");
        assert_eq!(fleet.send_or_wait("n", cancel("3"), Duration::from_secs(10)).await, Ok(()));
        let (got, rx) = reader.await.unwrap();
        assert_eq!(got, ["1", "2", "3"], "in order, none lost");
        // Nobody reads any more: full again after the wait.
        assert_eq!(fleet.send_or_wait("n", cancel("4"), Duration::ZERO).await, Ok(()));
        let started = std::time::Instant::now();
        assert_eq!(fleet.send_or_wait("n", cancel("5"), Duration::from_millis(100)).await, Err(SendError::Full));
        assert!(started.elapsed() >= Duration::from_millis(100));
        drop(rx);
        assert_eq!(fleet.send_or_wait("n", cancel("6"), Duration::from_secs(10)).await, Err(SendError::NotConnected));
        assert_eq!(fleet.send_or_wait("other", cancel("7"), Duration::from_secs(10)).await, Err(SendError::NotConnected));
    }

    #[test]
    fn a_nodes_owner_is_the_admins_else_its_tokens_else_its_own_name_and_never_empty() {
        let fleet = Fleet::default();
        let (tx, _rx) = mpsc::channel(1);
        fleet.connect("old", NodeFacts::default(), tx.clone());
        assert_eq!(fleet.node("old").unwrap().owner, "node:old", "registered before owners: a party of its own");
        for n in ["a", "b"] {
            fleet.set_registration(n, NodeRegistration { owner: Some("token:t1".into()), ..Default::default() });
            fleet.connect(n, NodeFacts::default(), tx.clone());
        }
        assert_eq!((fleet.node("a").unwrap().owner, fleet.node("b").unwrap().owner), ("token:t1".to_string(), "token:t1".to_string()), "one token, one owner");
        fleet.set_admin("b", NodeAdmin { owner: "bob".into(), ..Default::default() });
        assert_eq!(fleet.node("b").unwrap().owner, "bob", "the admin's spec.owner wins");
    }

    #[test]
    fn placement_sees_claims_capped_by_the_admin_else_the_token_else_the_ceiling() {
        let fleet = Fleet::default();
        let (tx, _rx) = mpsc::channel(1);
        let claim = NodeFacts { capacity: Resources { cpu_millis: 1_000_000_000, memory_bytes: 1 << 50, ephemeral_bytes: 0 }, ..NodeFacts::default() };
        fleet.connect("n", claim, tx);
        assert_eq!(fleet.node("n").unwrap().capacity.cpu_millis, CEILING.cpu_millis.unwrap(), "10^6 cores are not believed");
        let token = CapacityLimits { cpu_millis: Some(4000), memory_bytes: Some(8 << 30), ..Default::default() };
        fleet.set_registration("n", NodeRegistration { owner: None, limits: token });
        let n = fleet.node("n").unwrap();
        assert_eq!((n.capacity.cpu_millis, n.capacity.memory_bytes), (4000, 8 << 30));
        fleet.set_admin("n", NodeAdmin { limits: CapacityLimits { cpu_millis: Some(2000), ..Default::default() }, ..Default::default() });
        let n = fleet.node("n").unwrap();
        assert_eq!((n.capacity.cpu_millis, n.capacity.memory_bytes), (2000, 8 << 30), "the admin's cap wins; the token's fills in");
    }
}
