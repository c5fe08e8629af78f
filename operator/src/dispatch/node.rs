//! Node lifecycle: a session opening (reconciled against what the node should run), a node
//! gone past its grace, drained, revoked or leaving, and what becomes of its attempts.

use std::collections::HashSet;

use futures::StreamExt;

use tracing::info;

use kommune_core::reputation::Observed;

use super::{Dispatcher, Result, lost, wire};
use crate::attempt::AttemptPhase;
use crate::fleet::{LiveSession, NodeFacts, Outbound};
use crate::store::Removal;
use kommune_proto::now_ms;

/// Store reads of a Hello's unknown ids in flight at once.
const LOOKUPS_IN_FLIGHT: usize = 32;

impl Dispatcher {
    /// Gives up on attempts whose node has had no session for longer than `grace`: they become
    /// Lost (a failure, retried elsewhere with backoff). A node back within the grace keeps
    /// them. Returns how many were expired.
    pub async fn expire_absent(&self, grace: std::time::Duration) -> Result<usize> {
        let _guard = self.place_lock.lock().await;
        let now = now_ms();
        let mut expired = vec![];
        for a in self.store.all_active().await? {
            let Some(absent) = self.fleet.absent_for(&a.node).filter(|d| *d > grace) else { continue };
            let why = format!("node {} has been unreachable for {}s (grace {}s)", a.node, absent.as_secs(), grace.as_secs());
            if self.finish(&a.id, AttemptPhase::Lost, Some(&lost(&why)), now).await?.is_some() {
                info!(attempt = %a.id, node = %a.node, "attempt lost with its node");
                self.notify(&a.job_key);
                expired.push(a);
            }
        }
        let observed: Vec<_> = expired.iter().map(|a| (a, Observed::Lost)).collect();
        self.observe_ended(&observed, now).await;
        Ok(expired.len())
    }

    /// Drains a node (its admin set `spec.drain`; the caller has cordoned it): every attempt
    /// running there is stopped on the agent and Cancelled, so it is placed elsewhere at once
    /// without counting against its retries. The agent still sends what the attempt used, which
    /// is metered. Returns how many attempts moved.
    pub async fn drain_node(&self, node: &str) -> Result<usize> {
        let _guard = self.place_lock.lock().await;
        let why = format!("node {node} is being drained by its admin");
        let now = now_ms();
        let mut moved = 0;
        for a in self.store.active_on_node(node).await? {
            let _ = self.fleet.send(node, wire::cancel_message(&a.id, &why));
            if self.finish(&a.id, AttemptPhase::Cancelled, Some(&lost(&why)), now).await?.is_some() {
                self.notify(&a.job_key);
                moved += 1;
            }
        }
        if moved > 0 {
            info!(node, moved, "node drained");
        }
        Ok(moved)
    }

    /// Revokes a node (its ProviderNode was deleted): the registration goes, so its certificate
    /// opens no further session; an open session is ended with PermissionDenied, which makes
    /// the agent stop; its running attempts are Lost and placed elsewhere.
    pub async fn revoke_node(&self, node: &str) -> Result<usize> {
        self.remove_node(node, "was removed from the pool by an admin", AttemptPhase::Lost, Removal::Revoked).await
    }

    /// A node leaves of its own accord: like a revocation, but its attempts are Cancelled, so
    /// they are placed elsewhere without counting against their retries. Returns how many.
    pub async fn leave(&self, node: &str) -> Result<usize> {
        self.remove_node(node, "left the pool", AttemptPhase::Cancelled, Removal::Left).await
    }

    /// Removes the node's registration, ends its session and finishes its attempts as `phase`.
    async fn remove_node(&self, node: &str, why: &str, phase: AttemptPhase, removal: Removal) -> Result<usize> {
        let _guard = self.place_lock.lock().await;
        self.store.remove_node(node, removal, now_ms()).await?;
        let closed = self.fleet.close(node, tonic::Status::permission_denied(format!("node {node} {why}")));
        let now = now_ms();
        let mut moved = 0;
        for a in self.store.active_on_node(node).await? {
            if self.finish(&a.id, phase, Some(&lost(&format!("node {node} {why}"))), now).await?.is_some() {
                self.notify(&a.job_key);
                moved += 1;
            }
        }
        info!(node, closed, moved, why, "node removed");
        Ok(moved)
    }

    /// Opens a node's session: reconciles what the node runs with what the store says it should
    /// run, then registers the session (replacing any older one of the node). Only the node's
    /// expected attempts are read under the placement lock, so no placement lands between that
    /// read and the registration; the ids the agent lists that it should not run are looked up
    /// after the lock is released, so a Hello full of unknown ids delays only its own session.
    /// Attempts the node should run but does not list are Lost (or placed again, if it never
    /// confirmed them); attempts it runs that it should not are returned for cancelling.
    ///
    /// The caller bounds `running` (the gateway refuses a Hello listing more than
    /// [`super::MAX_RUNNING_IDS`] before calling this): each unknown id costs a store read.
    #[tracing::instrument(skip_all, fields(node = %node))]
    pub async fn open_session(&self, node: &str, facts: NodeFacts, tx: Outbound, running: &[String]) -> Result<(LiveSession, Vec<String>)> {
        let running: HashSet<&str> = running.iter().map(String::as_str).collect();
        let mut lost_here = vec![];
        let now = now_ms();
        let (session, expected) = {
            let _guard = self.place_lock.lock().await;
            let expected = self.store.active_on_node(node).await?;
            for a in expected.iter().filter(|a| !running.contains(a.id.as_str())) {
                if a.phase == AttemptPhase::Assigned {
                    // Never confirmed running, and the node does not have it: the Assign was
                    // lost on the way (the session or the operator ended first). Nothing ran,
                    // so it is placed again without using a retry.
                    info!(attempt = %a.id, node, "node reconnected without an attempt it never confirmed; placing it again");
                    let why = "the assignment never reached the node (it reconnected without it); placed again without using a retry";
                    self.finish(&a.id, AttemptPhase::Cancelled, Some(&lost(why)), now).await?;
                } else {
                    info!(attempt = %a.id, node, "node reconnected without this attempt; marking it lost");
                    let why = "the node restarted or reconnected without this attempt";
                    if let Some(done) = self.finish(&a.id, AttemptPhase::Lost, Some(&lost(why)), now).await? {
                        lost_here.push(done);
                    }
                }
                self.notify(&a.job_key);
            }
            let expected: HashSet<String> = expected.into_iter().map(|a| a.id).collect();
            (self.fleet.connect_session(node, facts, tx), expected)
        };
        // It started them and forgot them: its own doing, as a loss past the grace is.
        let observed: Vec<_> = lost_here.iter().map(|a| (a, Observed::Lost)).collect();
        self.observe_ended(&observed, now).await;
        // Finished-but-unacknowledged attempts are listed too; their TaskUpdate follows. An
        // attempt of this node that is still active was placed after the lock was released
        // (its Assign is on its way on this session), so it is not cancelled. Several reads
        // are in flight at once, so the store's thread answers them back to back.
        let unknown: Vec<String> = running.iter().filter(|id| !expected.contains(**id)).map(|id| id.to_string()).collect();
        let store = &self.store;
        let mut lookups = futures::stream::iter(unknown.into_iter().map(|id| async move {
            let known_here = store.attempt(&id).await?.is_some_and(|a| a.node == node);
            Ok::<_, crate::store::StoreError>((!known_here).then_some(id))
        }))
        .buffer_unordered(LOOKUPS_IN_FLIGHT);
        let mut unwanted = vec![];
        while let Some(found) = lookups.next().await {
            unwanted.extend(found?);
        }
        Ok((session, unwanted))
    }
}
