//! The connected fleet: which nodes have a live session, what they offer, and the channel to
//! each. In memory only: after a restart it refills as agents reconnect with Hello.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use kommune_proto::v1::{OperatorMessage, operator_message};
use tokio::sync::mpsc;

use crate::attempt::Attempt;
use crate::scheduler::{Candidate, Resources};

/// What an agent says its machine offers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub capacity: Resources,
    pub runtimes: Vec<String>,
    pub arch: String,
    pub os: String,
    pub region: String,
    pub zone: String,
    pub agent_version: String,
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
        NodeFacts {
            capacity: Resources { cpu_millis: cap.cpu_millis, memory_bytes: cap.memory_bytes },
            runtimes,
            arch: short(&cap.arch),
            os: short(&cap.os),
            region: short(&f.region),
            zone: short(&f.zone),
            agent_version: short(&f.agent_version),
        }
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
    cordoned: Mutex<HashMap<String, bool>>,
    paused: Mutex<HashMap<String, bool>>,
    next_id: AtomicU64,
    started: Instant,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet {
            sessions: Mutex::default(),
            gone: Mutex::default(),
            cordoned: Mutex::default(),
            paused: Mutex::default(),
            next_id: AtomicU64::new(0),
            started: Instant::now(),
        }
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
        self.lock().insert(node.to_string(), Session { id, tx, facts, last_seen: Instant::now() });
        id
    }

    /// Forgets the session if it is still the current one for the node. Returns true if it was.
    pub fn disconnect(&self, node: &str, session_id: u64) -> bool {
        let mut sessions = self.lock();
        if sessions.get(node).is_some_and(|s| s.id == session_id) {
            if let Some(s) = sessions.remove(node) {
                self.gone().insert(node.to_string(), (s.last_seen, s.facts));
            }
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
        self.paused.lock().unwrap_or_else(|p| p.into_inner()).insert(node.to_string(), paused);
    }

    /// Records an admin's cordon (`spec.unschedulable`).
    pub fn set_cordoned(&self, node: &str, cordoned: bool) {
        self.cordoned.lock().unwrap_or_else(|p| p.into_inner()).insert(node.to_string(), cordoned);
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

    /// The scheduler's view: every connected node, plus the disconnected ones as not ready (so
    /// explanations count them), with reservations from `active` attempts.
    pub fn candidates(&self, active: &[Attempt]) -> Vec<Candidate> {
        let cordoned = self.cordoned.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let paused = self.paused.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let candidate = |name: &String, facts: &NodeFacts, ready: bool| Candidate {
            name: name.clone(),
            ready,
            cordoned: cordoned.get(name).copied().unwrap_or(false),
            paused: paused.get(name).copied().unwrap_or(false),
            runtimes: facts.runtimes.clone(),
            capacity: facts.capacity,
            allocated: Resources::default(),
            running: 0,
        };
        let mut out: Vec<Candidate> = self.lock().iter().map(|(name, s)| candidate(name, &s.facts, true)).collect();
        out.extend(self.gone().iter().map(|(name, (_, facts))| candidate(name, facts, false)));
        out.sort_by(|a, b| a.name.cmp(&b.name));
        for a in active {
            if let Ok(i) = out.binary_search_by(|c| c.name.as_str().cmp(&a.node)) {
                let c = &mut out[i];
                c.allocated = c.allocated.plus(Resources { cpu_millis: a.cpu_millis, memory_bytes: a.memory_bytes });
                c.running += 1;
            }
        }
        out
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
        let c = fleet.candidates(&[]);
        assert_eq!((c.len(), c[0].ready), (1, false), "a gone node is kept as not ready");
        let (tx3, _rx3) = mpsc::channel(1);
        fleet.connect("n", NodeFacts::default(), tx3);
        assert_eq!(fleet.absent_for("n"), None);
        assert!(fleet.candidates(&[])[0].ready);
        assert!(fleet.absent_for("never-seen").is_some());
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
                ..Default::default()
            }),
            agent_version: "1".into(),
            region: "eu".into(),
            zone: String::new(),
        };
        let facts = NodeFacts::from_proto(Some(&f));
        assert_eq!(facts.runtimes, vec!["exec", "wasm"]);
        assert_eq!(facts.arch.len(), 63);
        assert_eq!(NodeFacts::from_proto(None), NodeFacts::default());
    }
}
