//! One node's pending ProviderNode write: the gateway's events since its last write, folded so
//! that one write shows what writing each of them in turn would have. Pure.

use crate::controller::budget::Merge;
use crate::fleet::NodeFacts;
use crate::gateway::NodeEvent;

/// What happened to one node since its ProviderNode was last written.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeUpdate {
    /// The latest Joined event: the object must exist (created or adopted) before its status.
    joined: Option<NodeEvent>,
    /// The facts of the latest session opening (or of a join after it, which are newer).
    connected: Option<NodeFacts>,
    /// Why the session closed, if it closed after the last opening.
    closed: Option<String>,
    heartbeat: bool,
    /// The node left the pool: its object goes, whatever else happened.
    left: bool,
}

impl From<NodeEvent> for NodeUpdate {
    fn from(event: NodeEvent) -> Self {
        let mut u = NodeUpdate::default();
        u.add(event);
        u
    }
}

impl Merge for NodeUpdate {
    fn merge(&mut self, newer: Self) {
        // Replayed in the canonical order, which is the order a newer update's events may have
        // come in for all that the result shows.
        for event in newer.events("") {
            self.add(event);
        }
        self.left |= newer.left;
    }
}

impl NodeUpdate {
    fn add(&mut self, event: NodeEvent) {
        match event {
            NodeEvent::Joined { ref facts, .. } => {
                // A join's facts are newer than an earlier opening's, and a join keeps the phase:
                // the same as the join first, then an opening with the join's facts.
                if self.connected.is_some() {
                    self.connected = Some(facts.clone());
                }
                self.joined = Some(event);
            }
            NodeEvent::Connected { facts, .. } => {
                self.connected = Some(facts);
                self.closed = None;
            }
            NodeEvent::Disconnected { reason, .. } => self.closed = Some(reason),
            NodeEvent::Heartbeat { .. } => self.heartbeat = true,
            NodeEvent::Left { .. } => self.left = true,
        }
    }

    /// The events to apply to the node's status, in an order whose result equals that of the
    /// events as they came (Joined, Connected, Heartbeat, Disconnected), or Left alone.
    pub fn events(&self, node: &str) -> Vec<NodeEvent> {
        if self.left {
            return vec![NodeEvent::Left { node: node.to_string() }];
        }
        let mut out = Vec::with_capacity(4);
        if let Some(NodeEvent::Joined { facts, public_key_sha256, grant, .. }) = &self.joined {
            out.push(NodeEvent::Joined { node: node.to_string(), facts: facts.clone(), public_key_sha256: public_key_sha256.clone(), grant: grant.clone() });
        }
        if let Some(facts) = &self.connected {
            out.push(NodeEvent::Connected { node: node.to_string(), facts: facts.clone() });
        }
        if self.heartbeat {
            out.push(NodeEvent::Heartbeat { node: node.to_string() });
        }
        if let Some(reason) = &self.closed {
            out.push(NodeEvent::Disconnected { node: node.to_string(), reason: reason.clone() });
        }
        out
    }

    /// The Joined event, when the object must be created or adopted first.
    pub fn joined(&self) -> Option<&NodeEvent> {
        self.joined.as_ref().filter(|_| !self.left)
    }

    pub fn left(&self) -> bool {
        self.left
    }

    /// Only heartbeats: written only when the node's last heartbeat time is stale.
    pub fn heartbeat_only(&self) -> bool {
        self.heartbeat && !self.left && self.joined.is_none() && self.connected.is_none() && self.closed.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::nodes::apply_event;
    use crate::crd::ProviderNodeStatus;
    use crate::scheduler::Resources;
    use k8s_openapi::jiff::Timestamp;

    fn facts(cpu: u64, region: &str) -> NodeFacts {
        NodeFacts {
            capacity: Resources { cpu_millis: cpu, memory_bytes: 8 << 30, ephemeral_bytes: 0 },
            gpus: vec![],
            runtimes: vec!["wasm".into()],
            arch: "x86_64".into(),
            os: "linux".into(),
            region: region.into(),
            zone: String::new(),
            agent_version: "0.1.0".into(),
        }
    }

    /// Every event a node's update can hold, with two variants of each that carries data.
    fn alphabet() -> Vec<NodeEvent> {
        let n = || "n".to_string();
        vec![
            NodeEvent::Joined { node: n(), facts: facts(1000, "a"), public_key_sha256: "k1".into(), grant: Default::default() },
            NodeEvent::Joined { node: n(), facts: facts(2000, "b"), public_key_sha256: "k2".into(), grant: Default::default() },
            NodeEvent::Connected { node: n(), facts: facts(3000, "c") },
            NodeEvent::Connected { node: n(), facts: facts(4000, "d") },
            NodeEvent::Heartbeat { node: n() },
            NodeEvent::Disconnected { node: n(), reason: "no message for 15s".into() },
            NodeEvent::Disconnected { node: n(), reason: "replaced".into() },
        ]
    }

    /// Statuses a node may have when its update is written: none yet, Ready, NotReady.
    fn starts(now: Timestamp) -> Vec<ProviderNodeStatus> {
        let none = ProviderNodeStatus::default();
        let joined = apply_event(&none, &alphabet()[0], 0, (0, 0), now);
        let ready = apply_event(&joined, &alphabet()[2], 0, (0, 0), now);
        let closed = apply_event(&ready, &alphabet()[5], 0, (0, 0), now);
        vec![none, joined, ready, closed]
    }

    /// What a write shows, without the conditions' transition times: a flap folded into one
    /// write never reached the API server, so the condition keeps its earlier transition time.
    fn shown(mut s: ProviderNodeStatus) -> ProviderNodeStatus {
        for c in &mut s.conditions {
            c.last_transition_time = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH);
        }
        s
    }

    fn fold<'a>(start: &ProviderNodeStatus, events: impl IntoIterator<Item = &'a NodeEvent>, now: Timestamp) -> ProviderNodeStatus {
        events.into_iter().fold(start.clone(), |s, e| apply_event(&s, e, 1, (500, 1 << 30), now))
    }

    fn sequences(len: usize) -> Vec<Vec<NodeEvent>> {
        let a = alphabet();
        let mut out = vec![vec![]];
        for _ in 0..len {
            out = out.into_iter().flat_map(|s| a.iter().map(move |e| [s.clone(), vec![e.clone()]].concat())).collect();
        }
        out
    }

    /// Exhaustive over every sequence of up to four events from every starting status: the
    /// folded update writes what the events one by one would have.
    #[test]
    fn one_folded_write_shows_what_every_event_in_turn_would_have() {
        let now = Timestamp::now();
        for len in 1..=4 {
            for seq in sequences(len) {
                let mut update = NodeUpdate::from(seq[0].clone());
                for e in &seq[1..] {
                    update.merge(NodeUpdate::from(e.clone()));
                }
                for start in starts(now) {
                    let one_by_one = shown(fold(&start, &seq, now));
                    let folded = shown(fold(&start, &update.events("n"), now));
                    assert_eq!(folded, one_by_one, "events {seq:?} from {start:?}");
                }
            }
        }
    }

    /// Merging is associative where it matters: folding updates that were themselves folded
    /// (a write that failed and is queued again with newer ones) writes the same.
    #[test]
    fn folding_folded_updates_writes_the_same() {
        let now = Timestamp::now();
        for seq in sequences(4) {
            let (head, tail) = seq.split_at(2);
            let fold_all = |events: &[NodeEvent]| {
                let mut u = NodeUpdate::default();
                for e in events {
                    u.merge(NodeUpdate::from(e.clone()));
                }
                u
            };
            let mut nested = fold_all(head);
            nested.merge(fold_all(tail));
            for start in starts(now) {
                assert_eq!(shown(fold(&start, &nested.events("n"), now)), shown(fold(&start, &seq, now)), "{seq:?}");
            }
        }
    }

    #[test]
    fn leaving_overrides_everything_and_is_not_a_join() {
        let mut u = NodeUpdate::from(alphabet()[0].clone());
        u.merge(NodeUpdate::from(alphabet()[2].clone()));
        u.merge(NodeUpdate::from(NodeEvent::Left { node: "n".into() }));
        u.merge(NodeUpdate::from(alphabet()[4].clone()));
        assert!(u.left());
        assert_eq!(u.joined(), None);
        assert_eq!(u.events("n"), vec![NodeEvent::Left { node: "n".into() }]);
        assert!(!u.heartbeat_only());
    }

    #[test]
    fn only_heartbeats_are_heartbeat_only() {
        let mut u = NodeUpdate::from(NodeEvent::Heartbeat { node: "n".into() });
        u.merge(NodeUpdate::from(NodeEvent::Heartbeat { node: "n".into() }));
        assert!(u.heartbeat_only());
        assert_eq!(u.events("n").len(), 1);
        u.merge(NodeUpdate::from(alphabet()[5].clone()));
        assert!(!u.heartbeat_only());
    }
}
