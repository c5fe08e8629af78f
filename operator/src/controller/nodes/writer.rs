//! Writes ProviderNodes from gateway events and the sweep: a new node is one create, then one
//! forced server-side apply of `/status` per change (none when the object already shows it),
//! one Event per phase change; every request takes from the process's [`ApiBudget`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::controller::events::EventWriter;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, warn};

use super::status::{Change, NodeReason, admin_of, allocatable, desired_status, heartbeat_due, node_of, transition};
use super::update::NodeUpdate;
use crate::controller::budget::ApiBudget;
use crate::controller::{Error, MANAGER};
use crate::crd::{NodeEarnings, ProviderNode, ProviderNodeStatus, limits_spec};
use crate::dispatch::Dispatcher;
use crate::gateway::NodeEvent;
use crate::job::status::Severity;
use crate::store::NodeGrant;

/// The ProviderNode writer: its state lives between events and sweeps of one leader. Shared by
/// the writes in flight (each of a different node) and the sweep, so its state is behind locks
/// held only between awaits.
pub struct NodeWriter {
    client: kube::Client,
    api: Api<ProviderNode>,
    dispatcher: Arc<Dispatcher>,
    recorder: EventWriter,
    cache: Store<ProviderNode>,
    budget: Arc<ApiBudget>,
    /// A node's last heartbeat time is written again once it is older than this: heartbeats
    /// themselves write nothing.
    status_refresh: Duration,
    /// The object each status write returned, until the watch delivers that version. The cache
    /// lags this writer's own writes by a round trip, and an apply drops the fields the previous
    /// apply set but this one leaves out, so a status computed on the lagging cache could lose
    /// fields (the key hash written at join, say). While it leads, this process is the only
    /// writer of ProviderNode status (a replica that loses the Lease exits).
    written: Mutex<HashMap<String, ProviderNode>>,
    /// Nodes with a write in flight: the sweep leaves them to it, so two writes of one node
    /// never race.
    writing: Mutex<HashSet<String>>,
    /// ProviderNodes the last sweep saw, so that one an admin deleted is noticed and revoked.
    known: Mutex<BTreeMap<String, ObjectReference>>,
    /// Nodes that left and whose ProviderNode this writer deleted: gone, but not revoked.
    left: Mutex<BTreeSet<String>>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks a node as being written for as long as it lives.
struct Writing<'a>(&'a NodeWriter, String);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        locked(&self.0.writing).remove(&self.1);
    }
}

impl NodeWriter {
    /// Marks `node` as being written, unless a write of it is in progress already.
    fn claim(&self, node: &str) -> Option<Writing<'_>> {
        locked(&self.writing).insert(node.to_string()).then(|| Writing(self, node.to_string()))
    }

    /// A writer reading ProviderNodes from `cache`, a reflector's store, with no budget (tests
    /// that script every request) and the default status refresh.
    pub fn new(client: kube::Client, dispatcher: Arc<Dispatcher>, cache: Store<ProviderNode>) -> Self {
        NodeWriter {
            api: Api::all(client.clone()),
            recorder: crate::controller::recorder(client.clone()),
            client,
            dispatcher,
            cache,
            budget: Arc::new(ApiBudget::unlimited()),
            status_refresh: super::STATUS_REFRESH,
            written: Mutex::default(),
            writing: Mutex::default(),
            known: Mutex::default(),
            left: Mutex::default(),
        }
    }

    /// Every request takes from `budget`.
    pub fn with_budget(mut self, budget: Arc<ApiBudget>) -> Self {
        self.budget = budget;
        self
    }

    /// A quiet node's status is written at most every `every`.
    pub fn with_status_refresh(mut self, every: Duration) -> Self {
        self.status_refresh = every;
        self
    }

    /// Takes note of what the watch delivered (the reflector has already cached it): once a
    /// version this writer wrote is in the cache, the cache is the newest view again.
    pub fn observe(&self, event: &watcher::Event<ProviderNode>) {
        let mut written = locked(&self.written);
        match event {
            watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                if written.get(&o.name_any()).is_some_and(|w| w.resource_version() == o.resource_version()) {
                    written.remove(&o.name_any());
                }
            }
            watcher::Event::Delete(o) => {
                written.remove(&o.name_any());
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }

    /// Writes what one gateway event changes.
    pub async fn on_event(&self, event: &NodeEvent) -> Result<(), Error> {
        self.write(node_of(event), &NodeUpdate::from(event.clone())).await
    }

    /// Writes what `update` changes of `node`: its object created (or adopted) if it joined,
    /// then one status apply for all its events, or nothing if the object shows it already. A
    /// heartbeat alone writes only once the last heartbeat time shown is `status_refresh` old,
    /// so thousands of agents are not thousands of writes a second.
    pub async fn write(&self, node: &str, update: &NodeUpdate) -> Result<(), Error> {
        // A sweep publishing this node's status holds it briefly: wait for it, so neither
        // write starts from a status the other is replacing.
        let _writing = loop {
            if let Some(w) = self.claim(node) {
                break w;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if update.left() {
            return self.delete(node).await;
        }
        if let Some(NodeEvent::Joined { grant, .. }) = update.joined() {
            let created = self.create_or_adopt(node, grant).await?;
            locked(&self.written).insert(node.to_string(), created);
        }
        let Some(base) = self.current_or_get(node).await? else {
            debug!(%node, "no ProviderNode yet; status not written");
            return Ok(());
        };
        let now = Timestamp::now();
        if update.heartbeat_only() && !heartbeat_due(base.status.as_ref(), now, self.status_refresh) {
            return Ok(());
        }
        let active = self.dispatcher.store().active_on_node(node).await?;
        let allocated = active.iter().fold((0, 0), |(c, m), a| (c + a.cpu_millis, m + a.memory_bytes));
        let mut next = base.clone();
        for event in update.events(node) {
            let change = Change::Event { event: &event, running: active.len() as u32, allocated };
            next.status = Some(desired_status(&next, &change, now));
        }
        let desired = self.with_allocatable(node, next.status.unwrap_or_default());
        self.publish(&base, self.with_standing(node, desired)).await
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
    pub async fn sweep(&self, grace: Duration) -> Result<(), Error> {
        self.dispatcher.may_write()?;
        let nodes = self.cache.state();
        let present: BTreeMap<String, ObjectReference> = nodes.iter().map(|n| (n.name_any(), n.object_ref(&()))).collect();
        let gone: Vec<(String, ObjectReference)> =
            locked(&self.known).iter().filter(|(k, _)| !present.contains_key(*k)).map(|(k, r)| (k.clone(), r.clone())).collect();
        for (name, regarding) in gone {
            self.dispatcher.revoke_node(&name).await?;
            locked(&self.known).remove(&name);
            locked(&self.written).remove(&name);
            if !locked(&self.left).remove(&name) {
                let note = "the ProviderNode was deleted: the node's registration is removed, its session ended and its attempts are placed elsewhere";
                self.event(&regarding, Severity::Warning, NodeReason::Revoked, note).await;
            }
        }
        *locked(&self.known) = present;
        let fleet = self.dispatcher.fleet().clone();
        let mut failed = None;
        for n in nodes {
            let name = n.name_any();
            match self.sweep_one(&fleet, &n, grace).await {
                Ok(()) => {}
                // Not the leader (any more): every other node would be refused too.
                Err(e @ Error::Fenced(_)) => return Err(e),
                // One node's failed write does not hold up the others; the next sweep tries again.
                Err(e) => {
                    warn!(node = %name, error = %e, "cannot sweep ProviderNode");
                    failed.get_or_insert(e);
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// What the sweep does for one cached node.
    async fn sweep_one(&self, fleet: &crate::fleet::Fleet, n: &ProviderNode, grace: Duration) -> Result<(), Error> {
        let name = n.name_any();
        match crate::pricing::overrides_from(n.spec.pricing.as_ref()) {
            Ok(o) => self.dispatcher.rates().set_overrides(&name, o),
            Err(e) => warn!(node = %name, error = %e, "ProviderNode pricing ignored; the cluster rates apply"),
        }
        if let Err(e) = crate::crd::limits_from(n.spec.capacity_limits.as_ref()) {
            warn!(node = %name, error = %e, "ProviderNode capacityLimits ignored; the join token's caps and the ceiling apply");
        }
        let mut admin = admin_of(n);
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
        // Held until the status is published: an event's write that started after a check
        // (while this read the ledger) published Ready, then this sweep's apply, computed from
        // the Joined status before it, put the node back to NotReady for good (seen in CI: one
        // of 1,000 nodes NotReady for ten minutes, no write failed).
        let Some(_writing) = self.claim(&name) else {
            // Its write in flight starts from newer facts; the next sweep looks again.
            return Ok(());
        };
        let earnings = earnings(&self.dispatcher, &name).await;
        let base = self.current(&name).unwrap_or_else(|| n.clone());
        self.sync_quarantine(&base).await?;
        let change = Change::Sweep { absent: fleet.absent_for(&name), grace, earnings };
        let desired = self.with_allocatable(&name, desired_status(&base, &change, Timestamp::now()));
        self.publish(&base, self.with_standing(&name, desired)).await
    }

    /// The node as the cache shows it, with the status of this writer's newer write if the
    /// watch has not delivered that yet.
    fn current(&self, node: &str) -> Option<ProviderNode> {
        let cached = self.cache.get(&ObjectRef::new(node)).map(|n| ProviderNode::clone(&n));
        match (cached, locked(&self.written).get(node)) {
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
        self.budget.acquire().await;
        Ok(self.api.get_opt(node).await?)
    }

    /// Applies `desired` as the node's status unless `base` already shows it, and records the
    /// Event the change deserves.
    async fn publish(&self, base: &ProviderNode, desired: ProviderNodeStatus) -> Result<(), Error> {
        let prev = base.status.clone().unwrap_or_default();
        if desired == prev {
            return Ok(());
        }
        let name = base.name_any();
        let patch = json!({ "apiVersion": ProviderNode::api_version(&()), "kind": ProviderNode::kind(&()), "status": desired });
        self.dispatcher.may_write()?;
        self.budget.acquire().await;
        match self.api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await {
            Ok(written) => {
                locked(&self.written).insert(name, written);
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                debug!(node = %name, "ProviderNode deleted meanwhile; status not written");
                locked(&self.written).remove(&name);
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

    /// Creates a joined node's object, with what its join token granted (owner, caps) in its
    /// spec: one request. A node the cache holds, or whose object exists already (an admin made
    /// it first), is adopted instead.
    async fn create_or_adopt(&self, node: &str, grant: &NodeGrant) -> Result<ProviderNode, Error> {
        if self.current(node).is_some() {
            return self.adopt(node, grant).await;
        }
        let mut spec = serde_json::Map::new();
        if !grant.owner.is_empty() {
            spec.insert("owner".into(), json!(grant.owner));
        }
        if let Some(limits) = limits_spec(&grant.limits) {
            spec.insert("capacityLimits".into(), json!(limits));
        }
        let obj = json!({
            "apiVersion": ProviderNode::api_version(&()),
            "kind": ProviderNode::kind(&()),
            "metadata": { "name": node, "labels": { "app.kubernetes.io/managed-by": MANAGER } },
            "spec": spec,
        });
        // Created, not applied: the spec fields are then the admin's to change (an apply would
        // make this manager their owner, and a later apply without them would remove them).
        let pp = PostParams { field_manager: Some(MANAGER.into()), ..Default::default() };
        let request = kube::core::Request::new(ProviderNode::url_path(&(), None))
            .create(&pp, serde_json::to_vec(&obj).map_err(kube::Error::SerdeError)?)
            .map_err(kube::Error::BuildRequest)?;
        self.dispatcher.may_write()?;
        self.budget.acquire().await;
        match self.client.request::<ProviderNode>(request).await {
            Ok(created) => Ok(created),
            Err(kube::Error::Api(s)) if s.code == 409 => self.adopt(node, grant).await,
            Err(e) => Err(e.into()),
        }
    }

    /// Adopts an existing node's object; the operator owns only its label, never the admin's
    /// spec, so this apply is not forced. Then fills in what the join token granted (owner,
    /// caps) where the admin has not set it: a merge patch of only the unset fields, so an
    /// admin's value always wins and a later apply of this manager never removes them.
    async fn adopt(&self, node: &str, grant: &NodeGrant) -> Result<ProviderNode, Error> {
        let obj = json!({
            "apiVersion": ProviderNode::api_version(&()),
            "kind": ProviderNode::kind(&()),
            "metadata": { "name": node, "labels": { "app.kubernetes.io/managed-by": MANAGER } },
            "spec": {},
        });
        self.dispatcher.may_write()?;
        self.budget.acquire().await;
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
        self.budget.acquire().await;
        Ok(self.api.patch(node, &PatchParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &Patch::Merge(&patch)).await?)
    }

    /// A node left the pool: its ProviderNode goes (already gone is fine).
    async fn delete(&self, node: &str) -> Result<(), Error> {
        self.dispatcher.may_write()?;
        self.budget.acquire().await;
        match self.api.delete(node, &Default::default()).await {
            Ok(_) => {
                if locked(&self.known).contains_key(node) {
                    locked(&self.left).insert(node.to_string());
                }
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        locked(&self.written).remove(node);
        Ok(())
    }

    /// Publishes an Event about a node.
    async fn event(&self, regarding: &ObjectReference, severity: Severity, reason: NodeReason, note: &str) {
        self.budget.acquire().await;
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
