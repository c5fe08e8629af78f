//! Writes ProviderNodes from gateway events and the sweep: one forced server-side apply of
//! `/status` per change and none when the cached object already shows it, one Event per change.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::controller::events::EventWriter;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, warn};

use super::HEARTBEAT_WRITE;
use super::status::{Change, NodeReason, admin_of, allocatable, desired_status, node_of, transition};
use crate::controller::{Error, MANAGER};
use crate::crd::{NodeEarnings, ProviderNode, ProviderNodeStatus, limits_spec};
use crate::dispatch::Dispatcher;
use crate::gateway::NodeEvent;
use crate::job::status::Severity;
use crate::store::NodeGrant;

/// The ProviderNode writer: its state lives between events and sweeps of one leader.
pub struct NodeWriter {
    api: Api<ProviderNode>,
    dispatcher: Arc<Dispatcher>,
    recorder: EventWriter,
    cache: Store<ProviderNode>,
    /// The object each status write returned, until the watch delivers that version. The cache
    /// lags this writer's own writes by a round trip, and an apply drops the fields the previous
    /// apply set but this one leaves out, so a status computed on the lagging cache could lose
    /// fields (the key hash written at join, say). While it leads, this process is the only
    /// writer of ProviderNode status (a replica that loses the Lease exits).
    written: HashMap<String, ProviderNode>,
    last_heartbeat_write: HashMap<String, Instant>,
    /// ProviderNodes the last sweep saw, so that one an admin deleted is noticed and revoked.
    known: BTreeMap<String, ObjectReference>,
    /// Nodes that left and whose ProviderNode this writer deleted: gone, but not revoked.
    left: BTreeSet<String>,
}

impl NodeWriter {
    /// A writer reading ProviderNodes from `cache`, a reflector's store.
    pub fn new(client: kube::Client, dispatcher: Arc<Dispatcher>, cache: Store<ProviderNode>) -> Self {
        NodeWriter {
            api: Api::all(client.clone()),
            dispatcher,
            recorder: crate::controller::recorder(client),
            cache,
            written: HashMap::new(),
            last_heartbeat_write: HashMap::new(),
            known: BTreeMap::new(),
            left: BTreeSet::new(),
        }
    }

    /// Takes note of what the watch delivered (the reflector has already cached it): once a
    /// version this writer wrote is in the cache, the cache is the newest view again.
    pub fn observe(&mut self, event: &watcher::Event<ProviderNode>) {
        match event {
            watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                if self.written.get(&o.name_any()).is_some_and(|w| w.resource_version() == o.resource_version()) {
                    self.written.remove(&o.name_any());
                }
            }
            watcher::Event::Delete(o) => {
                self.written.remove(&o.name_any());
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }

    /// Writes what one gateway event changes. Heartbeats are written at most every
    /// `HEARTBEAT_WRITE` per node, so thousands of agents are not thousands of writes a second.
    pub async fn on_event(&mut self, event: &NodeEvent) -> Result<(), Error> {
        let node = node_of(event).to_string();
        if matches!(event, NodeEvent::Heartbeat { .. }) && self.last_heartbeat_write.get(&node).is_some_and(|t| t.elapsed() < HEARTBEAT_WRITE) {
            return Ok(());
        }
        self.last_heartbeat_write.insert(node.clone(), Instant::now());
        match event {
            NodeEvent::Left { .. } => return self.delete(&node).await,
            NodeEvent::Joined { grant, .. } => {
                let adopted = self.adopt(&node, grant).await?;
                self.written.insert(node.clone(), adopted);
            }
            _ => {}
        }
        let Some(base) = self.current_or_get(&node).await? else {
            debug!(%node, "no ProviderNode yet; status not written");
            return Ok(());
        };
        let active = self.dispatcher.store().active_on_node(&node).await?;
        let allocated = active.iter().fold((0, 0), |(c, m), a| (c + a.cpu_millis, m + a.memory_bytes));
        let change = Change::Event { event, running: active.len() as u32, allocated };
        let desired = self.with_allocatable(&node, desired_status(&base, &change, Timestamp::now()));
        self.publish(&base, self.with_standing(&node, desired)).await
    }

    /// `status` with what placement counts on for the node, once the fleet has it (after the
    /// node's first session here).
    fn with_allocatable(&self, node: &str, mut status: ProviderNodeStatus) -> ProviderNodeStatus {
        if let (Some(n), Some(claimed)) = (self.dispatcher.fleet().node(node), status.capacity.as_ref()) {
            status.allocatable = Some(allocatable(&n, claimed));
        }
        status
    }

    /// `status` with the node's reputation, figures and quarantine as the fleet has them now.
    fn with_standing(&self, node: &str, status: ProviderNodeStatus) -> ProviderNodeStatus {
        let fleet = self.dispatcher.fleet();
        let now = kommune_proto::now_ms();
        fleet.refresh_reputation(node, now);
        super::with_standing(status, &fleet.standing(node, now), fleet.reputation_model().decay.half_life())
    }

    /// Brings the fleet's quarantine of a node in line with its ProviderNode: an admin's lift
    /// (`spec.quarantineLiftedAt`) is applied once, and a quarantine recorded in its status is
    /// restored after a restart or a takeover (an earlier lift does not undo a later one).
    async fn sync_quarantine(&self, n: &ProviderNode) -> Result<(), Error> {
        let name = n.name_any();
        if let Some(lifted) = super::standing::lifted_at(n) {
            self.dispatcher.apply_quarantine_lift(&name, lifted).await?;
        }
        if let Some(q) = super::recorded_quarantine(n) {
            self.dispatcher.fleet().restore_quarantine(&name, q);
        }
        Ok(())
    }

    /// Compares every cached ProviderNode with the live sessions: phases of nodes without a
    /// session here move on (Ready → NotReady → Offline past `grace`), cordons, taints, pricing
    /// and drains reach the scheduler, earnings come from the ledger, and a ProviderNode that
    /// disappeared since the last sweep revokes its node (only nodes seen before, so a node that
    /// just joined is not revoked before its object is cached).
    pub async fn sweep(&mut self, grace: Duration) -> Result<(), Error> {
        self.dispatcher.may_write()?;
        let nodes = self.cache.state();
        let present: BTreeMap<String, ObjectReference> = nodes.iter().map(|n| (n.name_any(), n.object_ref(&()))).collect();
        let gone: Vec<(String, ObjectReference)> = self.known.iter().filter(|(k, _)| !present.contains_key(*k)).map(|(k, r)| (k.clone(), r.clone())).collect();
        for (name, regarding) in gone {
            self.dispatcher.revoke_node(&name).await?;
            self.known.remove(&name);
            self.written.remove(&name);
            self.last_heartbeat_write.remove(&name);
            if !self.left.remove(&name) {
                let note = "the ProviderNode was deleted: the node's registration is removed, its session ended and its attempts are placed elsewhere";
                self.event(&regarding, Severity::Warning, NodeReason::Revoked, note).await;
            }
        }
        self.known = present;
        let fleet = self.dispatcher.fleet().clone();
        for n in nodes {
            let name = n.name_any();
            match crate::pricing::overrides_from(n.spec.pricing.as_ref()) {
                Ok(o) => self.dispatcher.rates().set_overrides(&name, o),
                Err(e) => warn!(node = %name, error = %e, "ProviderNode pricing ignored; the cluster rates apply"),
            }
            if let Err(e) = crate::crd::limits_from(n.spec.capacity_limits.as_ref()) {
                warn!(node = %name, error = %e, "ProviderNode capacityLimits ignored; the join token's caps and the ceiling apply");
            }
            let mut admin = admin_of(&n);
            admin.rates = self.dispatcher.rates().for_node(&name);
            fleet.set_admin(&name, admin);
            if n.spec.drain {
                // Cordoned just above, so nothing drained comes back here.
                let moved = self.dispatcher.drain_node(&name).await?;
                if moved > 0 {
                    let note = format!("spec.drain: stopped {moved} running attempt(s); they are placed elsewhere without using a retry");
                    self.event(&n.object_ref(&()), Severity::Normal, NodeReason::Drained, &note).await;
                }
            }
            let earnings = earnings(&self.dispatcher, &name).await;
            let base = self.current(&name).unwrap_or_else(|| (*n).clone());
            self.sync_quarantine(&base).await?;
            let change = Change::Sweep { absent: fleet.absent_for(&name), grace, earnings };
            let desired = self.with_allocatable(&name, desired_status(&base, &change, Timestamp::now()));
            self.publish(&base, self.with_standing(&name, desired)).await?;
        }
        Ok(())
    }

    /// The node as the cache shows it, with the status of this writer's newer write if the
    /// watch has not delivered that yet.
    fn current(&self, node: &str) -> Option<ProviderNode> {
        let cached = self.cache.get(&ObjectRef::new(node)).map(|n| ProviderNode::clone(&n));
        match (cached, self.written.get(node)) {
            (Some(mut n), Some(w)) => {
                n.status = w.status.clone();
                Some(n)
            }
            (cached, written) => cached.or_else(|| written.cloned()),
        }
    }

    /// As [`Self::current`], asking the API server when the cache has not seen the node (it may
    /// still be listing after a restart, while agents reconnect): a Connected event dropped
    /// here would leave the node NotReady until its next session.
    async fn current_or_get(&self, node: &str) -> Result<Option<ProviderNode>, Error> {
        if let Some(n) = self.current(node) {
            return Ok(Some(n));
        }
        self.dispatcher.may_write()?;
        Ok(self.api.get_opt(node).await?)
    }

    /// Applies `desired` as the node's status unless `base` already shows it, and records the
    /// Event the change deserves.
    async fn publish(&mut self, base: &ProviderNode, desired: ProviderNodeStatus) -> Result<(), Error> {
        let prev = base.status.clone().unwrap_or_default();
        if desired == prev {
            return Ok(());
        }
        let name = base.name_any();
        let patch = json!({ "apiVersion": ProviderNode::api_version(&()), "kind": ProviderNode::kind(&()), "status": desired });
        self.dispatcher.may_write()?;
        match self.api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await {
            Ok(written) => {
                self.written.insert(name, written);
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                debug!(node = %name, "ProviderNode deleted meanwhile; status not written");
                self.written.remove(&name);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        if let Some((severity, reason, note)) = transition(&prev, &desired) {
            self.event(&base.object_ref(&()), severity, reason, &note).await;
        }
        if let Some((severity, reason, note)) = super::quarantine_transition(&prev, &desired) {
            self.event(&base.object_ref(&()), severity, reason, &note).await;
        }
        Ok(())
    }

    /// Creates (or adopts) a joined node's object; the operator owns only its label, never the
    /// admin's spec, so this apply is not forced. Then fills in what the join token granted
    /// (owner, caps) where the admin has not set it: a merge patch of only the unset fields, so an
    /// admin's value always wins and a later apply of this manager never removes them.
    async fn adopt(&self, node: &str, grant: &NodeGrant) -> Result<ProviderNode, Error> {
        let obj = json!({
            "apiVersion": ProviderNode::api_version(&()),
            "kind": ProviderNode::kind(&()),
            "metadata": { "name": node, "labels": { "app.kubernetes.io/managed-by": MANAGER } },
            "spec": {},
        });
        self.dispatcher.may_write()?;
        let adopted = self.api.patch(node, &PatchParams::apply(MANAGER), &Patch::Apply(&obj)).await?;
        let mut spec = serde_json::Map::new();
        if adopted.spec.owner.is_none() && !grant.owner.is_empty() {
            spec.insert("owner".into(), json!(grant.owner));
        }
        if adopted.spec.capacity_limits.is_none()
            && let Some(limits) = limits_spec(&grant.limits)
        {
            spec.insert("capacityLimits".into(), json!(limits));
        }
        if spec.is_empty() {
            return Ok(adopted);
        }
        let patch = json!({ "spec": spec });
        Ok(self.api.patch(node, &PatchParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &Patch::Merge(&patch)).await?)
    }

    /// A node left the pool: its ProviderNode goes (already gone is fine).
    async fn delete(&mut self, node: &str) -> Result<(), Error> {
        self.dispatcher.may_write()?;
        match self.api.delete(node, &Default::default()).await {
            Ok(_) => {
                if self.known.contains_key(node) {
                    self.left.insert(node.to_string());
                }
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        self.written.remove(node);
        self.last_heartbeat_write.remove(node);
        Ok(())
    }

    /// Publishes an Event about a node.
    async fn event(&self, regarding: &ObjectReference, severity: Severity, reason: NodeReason, note: &str) {
        crate::controller::publish_event(&self.recorder, &self.dispatcher, regarding, severity, &reason.to_string(), note).await;
    }
}

/// A node's earnings from the ledger, for its status (None without a ledger or on a read
/// error, which is logged: the status keeps its last figures).
async fn earnings(dispatcher: &Dispatcher, node: &str) -> Option<NodeEarnings> {
    let ledger = dispatcher.ledger()?;
    // Only what the node's own key signed: a name that had another key in an older ledger
    // (before names were retired for good) never shows that identity's earnings.
    let key = dispatcher.fleet().public_key(node);
    let read = async {
        let e = match key {
            Some(k) => ledger.node_earnings_of_key(node, k).await?,
            None => ledger.node_earnings(node).await?,
        };
        Ok::<_, crate::ledger::LedgerError>((e, ledger.rejected_count(node).await?.distinct))
    };
    match read.await {
        Ok((e, rejected)) => Some(super::earnings::status(ledger, e, rejected).await),
        Err(e) => {
            warn!(%node, error = %e, "cannot read the node's earnings from the ledger");
            None
        }
    }
}
