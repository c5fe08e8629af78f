//! Keeps ProviderNode objects current from what the gateway sees: created on join, Ready while
//! a session is open, NotReady when it closes, Offline past the grace; read through a watch.

mod earnings;
mod standing;
mod status;
mod update;
mod writer;

use std::collections::HashMap;
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
/// A node's write (one to four requests) not done in this long is abandoned and tried again: a
/// request the API server never answers would otherwise hold its slot, and the node's update,
/// for the client's read timeout of almost five minutes.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// A failed write is tried again after this, doubled for each further failure of the same node
/// in a row, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// How long a node's write waits after its `failures`-th failure in a row (1 for the first),
/// stretched by `jitter` in [0, 1) by up to a quarter, so nodes that failed together (an API
/// server restart) do not all come back at once. Pure.
pub fn retry_delay(failures: u32, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    let base = RETRY_FIRST.saturating_mul(1 << doublings).min(RETRY_MAX);
    let jitter = if jitter.is_nan() { 0.0 } else { jitter.clamp(0.0, 1.0) };
    base.mul_f64(1.0 + jitter / 4.0)
}

/// Whether a failed write may succeed if tried again. Everything is (the API server overloaded
/// or restarting, a timeout, this replica briefly fenced, RBAC being fixed, the store busy)
/// except a request the API server refused as malformed or invalid, which the same update would
/// make again: given up, logged. The node's next update is a new write all the same.
pub fn worth_retrying(e: &crate::controller::Error) -> bool {
    !matches!(e, crate::controller::Error::Kube(kube::Error::Api(s)) if s.code == 400 || s.code == 422)
}

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
    /// See [`WRITE_TIMEOUT`].
    pub write_timeout: Duration,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig { concurrency: 32, queue: 65_536, status_refresh: STATUS_REFRESH, grace: Duration::from_secs(30), write_timeout: WRITE_TIMEOUT }
    }
}

/// Writes ProviderNodes from gateway events and sweeps them every `SWEEP` from a reflector's
/// cache, fed by one watch (no periodic LIST). Events are folded per node in a bounded queue and
/// written by up to `concurrency` tasks within `budget`; this loop itself never waits on the
/// API server, so the gateway's channel drains as fast as events come. A write that fails or
/// takes longer than its timeout ([`WRITE_TIMEOUT`] by default) is tried again with backoff ([`retry_delay`]), with the
/// node's newer events folded in after it: an event is never lost to one failed request (a
/// Connected event lost would leave the node NotReady until its next session, as the sweep
/// leaves NotReady nodes to their Connected event). Sends on `capacity_changed` when a node
/// connects so waiting jobs are tried again.
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
    let metrics = dispatcher.metrics().clone();
    let writer = Arc::new(NodeWriter::new(client, dispatcher, cache).with_budget(budget).with_status_refresh(config.status_refresh));
    // Consecutive failed writes by node (only nodes whose last write failed).
    let mut failures: HashMap<String, u32> = HashMap::new();
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
            let (w, within) = (writer.clone(), config.write_timeout);
            let task = tokio::spawn({
                let (node, update) = (node.clone(), update.clone());
                async move { tokio::time::timeout(within, w.write(&node, &update)).await }
            });
            writes.push(async move { (node, update, task.await) });
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
            Some((node, update, done)) = writes.next(), if !writes.is_empty() => {
                let now = Instant::now().into_std();
                let failed = match done {
                    Ok(Ok(Ok(()))) => {
                        metrics.node_write("ok");
                        None
                    }
                    Ok(Ok(Err(e))) if !worth_retrying(&e) => {
                        warn!(%node, error = %e, "cannot update ProviderNode; the API server refused the update as invalid, so it is not tried again");
                        metrics.node_write("given_up");
                        None
                    }
                    Ok(Ok(Err(e))) => Some(e.to_string()),
                    Ok(Err(_)) => Some(format!("not done in {:?}", config.write_timeout)),
                    // A panic: the same update would panic again.
                    Err(e) => {
                        warn!(%node, error = %e, "ProviderNode write task failed");
                        metrics.node_write("given_up");
                        None
                    }
                };
                match failed {
                    None => {
                        failures.remove(&node);
                        queue.done(&node, now);
                    }
                    Some(error) => {
                        let n = failures.entry(node.clone()).or_default();
                        *n += 1;
                        let delay = retry_delay(*n, rand::random::<f64>());
                        warn!(%node, %error, failures = *n, retry_in_ms = delay.as_millis() as u64, "cannot update ProviderNode; trying again");
                        metrics.node_write("retried");
                        queue.retry(&node, update, now + delay);
                    }
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_waits_longer_each_time_up_to_the_cap() {
        let delays: Vec<u64> = (1..=9).map(|n| retry_delay(n, 0.0).as_millis() as u64).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
        assert_eq!(retry_delay(0, 0.0), RETRY_FIRST, "a zero count is the first failure");
        assert_eq!(retry_delay(u32::MAX, 0.0), RETRY_MAX, "no overflow");
    }

    #[test]
    fn jitter_stretches_a_delay_by_at_most_a_quarter_and_bad_jitter_is_clamped() {
        assert_eq!(retry_delay(1, 0.5), Duration::from_millis(562) + Duration::from_micros(500));
        assert_eq!(retry_delay(7, 1.0), RETRY_MAX.mul_f64(1.25));
        assert_eq!(retry_delay(1, 7.0), retry_delay(1, 1.0));
        assert_eq!(retry_delay(1, -1.0), retry_delay(1, 0.0));
        assert_eq!(retry_delay(1, f64::NAN), retry_delay(1, 0.0));
    }

    fn api_error(code: u16) -> crate::controller::Error {
        crate::controller::Error::Kube(kube::Error::Api(Box::new(kube::core::Status::failure("x", "y").with_code(code))))
    }

    #[test]
    fn only_a_request_refused_as_invalid_is_given_up() {
        for code in [400, 422] {
            assert!(!worth_retrying(&api_error(code)), "{code}");
        }
        for code in [403, 404, 409, 429, 500, 503, 504] {
            assert!(worth_retrying(&api_error(code)), "{code}");
        }
        assert!(worth_retrying(&crate::controller::Error::Fenced(crate::fence::Fenced)));
    }
}
