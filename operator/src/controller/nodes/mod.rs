//! Keeps ProviderNode objects current from what the gateway sees: created on join, Ready while
//! a session is open, NotReady when it closes, Offline past the grace; read through a watch.

mod earnings;
mod standing;
mod status;
mod update;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use kube::api::Api;
use kube::runtime::reflector::{self, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, warn};

pub use standing::{QUARANTINED, quarantine_transition, recorded_quarantine, with_standing};
pub use status::{Change, NodeReason, absent_phase, admin_of, allocatable, apply_event, connected_phase, desired_status, heartbeat_due, transition};
pub use update::NodeUpdate;
pub use writer::NodeWriter;

use crate::controller::budget::{ApiBudget, Coalescer, Pushed};
use crate::crd::ProviderNode;
use crate::dispatch::Dispatcher;
use crate::gateway::NodeEvent;

/// A quiet node's last heartbeat time is written this often by default (kubelet reports a
/// node's status every 5 minutes too): 10,000 quiet nodes are 33 writes a second.
pub const STATUS_REFRESH: Duration = Duration::from_secs(300);
/// How often all cached ProviderNodes are compared with the live sessions.
pub const SWEEP: Duration = Duration::from_secs(10);
/// A newly queued node's write waits this long, so a join and the session opening right after
/// it are one status write.
const LINGER: Duration = Duration::from_millis(200);

/// How the writer spends its budget.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Writes of different nodes in flight at once (one node is never written twice at once).
    pub concurrency: usize,
    /// Nodes with a write waiting; past it the gateway's events wait in their channel.
    pub queue: usize,
    /// See [`STATUS_REFRESH`].
    pub status_refresh: Duration,
    /// A node without a session is Offline after this.
    pub grace: Duration,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig { concurrency: 32, queue: 65_536, status_refresh: STATUS_REFRESH, grace: Duration::from_secs(30) }
    }
}

/// Writes ProviderNodes from gateway events and sweeps them every `SWEEP` from a reflector's
/// cache, fed by one watch (no periodic LIST). Events are folded per node in a bounded queue and
/// written by up to `concurrency` tasks within `budget`; this loop itself never waits on the
/// API server, so the gateway's channel drains as fast as events come. Sends on
/// `capacity_changed` when a node connects so waiting jobs are tried again.
pub async fn run(
    client: kube::Client,
    dispatcher: Arc<Dispatcher>,
    mut events: mpsc::Receiver<NodeEvent>,
    capacity_changed: mpsc::Sender<()>,
    budget: Arc<ApiBudget>,
    config: WriterConfig,
) {
    let (cache, store) = reflector::store();
    let watch = reflector(store, watcher(Api::<ProviderNode>::all(client.clone()), watcher::Config::default().any_semantic())).default_backoff();
    let mut watch = std::pin::pin!(watch);
    let writer = Arc::new(NodeWriter::new(client, dispatcher, cache).with_budget(budget).with_status_refresh(config.status_refresh));
    let mut queue: Coalescer<String, NodeUpdate> = Coalescer::new(config.queue, LINGER);
    let mut writes = FuturesUnordered::new();
    let concurrency = config.concurrency.max(1);
    // The sweep waits for the first complete listing: on an empty cache it would see nothing.
    let mut synced = false;
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sweeping: Option<tokio::task::JoinHandle<Result<(), crate::controller::Error>>> = None;
    loop {
        while writes.len() < concurrency
            && let Some((node, update)) = queue.pop_ready(Instant::now().into_std())
        {
            // Spawned, so a write runs on any worker and a panic in one is that write's alone.
            let w = writer.clone();
            let task = tokio::spawn({
                let node = node.clone();
                async move { w.write(&node, &update).await }
            });
            writes.push(async move { (node, task.await) });
        }
        let next_due = queue.next_due().filter(|_| writes.len() < concurrency).map(Instant::from_std);
        tokio::select! {
            // Past the queue's bound the events wait in their channel, and Join refuses while
            // that is full (the gateway never waits on it).
            ev = events.recv(), if queue.len() < config.queue => {
                let Some(ev) = ev else { return };
                let connected = matches!(ev, NodeEvent::Connected { .. });
                let node = status::node_of(&ev).to_string();
                if queue.push(node.clone(), NodeUpdate::from(ev), Instant::now().into_std()) == Pushed::Full {
                    warn!(%node, "ProviderNode write queue full; event dropped");
                }
                if connected {
                    let _ = capacity_changed.try_send(());
                }
            }
            Some((node, done)) = writes.next(), if !writes.is_empty() => {
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(%node, error = %e, "cannot update ProviderNode"),
                    Err(e) => warn!(%node, error = %e, "ProviderNode write task failed"),
                }
                queue.done(&node, Instant::now().into_std());
            }
            _ = tokio::time::sleep_until(next_due.unwrap_or_else(Instant::now)), if next_due.is_some() => {}
            w = watch.next() => match w {
                Some(Ok(ev)) => {
                    synced |= matches!(ev, watcher::Event::InitDone);
                    writer.observe(&ev);
                }
                Some(Err(e)) => warn!(error = %e, "ProviderNode watch failed; retrying with backoff"),
                None => return,
            },
            _ = sweep.tick(), if synced && sweeping.is_none() => {
                let (w, grace) = (writer.clone(), config.grace);
                sweeping = Some(tokio::spawn(async move { w.sweep(grace).await }));
            }
            swept = async { sweeping.as_mut().expect("guarded by is_some").await }, if sweeping.is_some() => {
                sweeping = None;
                match swept {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!(error = %e, "ProviderNode sweep failed"),
                    Err(e) => warn!(error = %e, "ProviderNode sweep task failed"),
                }
            }
        }
    }
}
