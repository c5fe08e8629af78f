//! Keeps ProviderNode objects current from what the gateway sees: created on join, Ready while
//! a session is open, NotReady when it closes, Offline past the grace; read through a watch.

mod earnings;
mod standing;
mod status;
mod writer;

use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::reflector::{self, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tracing::{debug, warn};

pub use standing::{QUARANTINED, quarantine_transition, recorded_quarantine, with_standing};
pub use status::{Change, NodeReason, absent_phase, admin_of, allocatable, apply_event, connected_phase, desired_status, transition};
pub use writer::NodeWriter;

use crate::crd::ProviderNode;
use crate::dispatch::Dispatcher;
use crate::gateway::NodeEvent;

/// Minimum time between two heartbeat writes of one node.
pub const HEARTBEAT_WRITE: Duration = Duration::from_secs(30);
/// How often all cached ProviderNodes are compared with the live sessions.
const SWEEP: Duration = Duration::from_secs(10);

/// Writes ProviderNodes from gateway events and sweeps them every `SWEEP` from a reflector's
/// cache, fed by one watch (no periodic LIST). Sends on `capacity_changed` when a node connects
/// so waiting jobs are tried again.
pub async fn run(
    client: kube::Client,
    dispatcher: std::sync::Arc<Dispatcher>,
    mut events: mpsc::Receiver<NodeEvent>,
    capacity_changed: mpsc::Sender<()>,
    grace: Duration,
) {
    let (cache, store) = reflector::store();
    let watch = reflector(store, watcher(Api::<ProviderNode>::all(client.clone()), watcher::Config::default().any_semantic())).default_backoff();
    let mut watch = std::pin::pin!(watch);
    let mut nodes = NodeWriter::new(client, dispatcher, cache);
    // The sweep waits for the first complete listing: on an empty cache it would see nothing.
    let mut synced = false;
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = events.recv() => {
                let Some(ev) = ev else { return };
                if let Err(e) = nodes.on_event(&ev).await {
                    warn!(node = %status::node_of(&ev), error = %e, "cannot update ProviderNode");
                }
                if matches!(ev, NodeEvent::Connected { .. }) {
                    let _ = capacity_changed.try_send(());
                }
            }
            w = watch.next() => match w {
                Some(Ok(ev)) => {
                    synced |= matches!(ev, watcher::Event::InitDone);
                    nodes.observe(&ev);
                }
                Some(Err(e)) => warn!(error = %e, "ProviderNode watch failed; retrying with backoff"),
                None => return,
            },
            _ = sweep.tick(), if synced => {
                if let Err(e) = nodes.sweep(grace).await {
                    debug!(error = %e, "ProviderNode sweep failed");
                }
            }
        }
    }
}
