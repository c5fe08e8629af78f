//! Live logs in the dispatcher: which agents' LogChunks are taken (only for an attempt the
//! node holds and that still runs), and which attempt a follower of a task reads.

use std::sync::Arc;

use futures::future::BoxFuture;
use kommune_proto::v1;
use tracing::{debug, warn};

use super::Dispatcher;
use crate::attempt::AttemptPhase;
use crate::outputs::live::{Dropped, Following, LiveAttempt, LiveKey, LiveLogs, LiveSource};

fn running(phase: AttemptPhase) -> bool {
    matches!(phase, AttemptPhase::Assigned | AttemptPhase::Running)
}

impl Dispatcher {
    /// The running attempts' live tails.
    pub fn live_logs(&self) -> &Arc<LiveLogs> {
        &self.live
    }

    /// Takes a LogChunk node `node` sent on its session `session`. A refused chunk is dropped
    /// and counted (`live_log_chunks{outcome}`); the session goes on (see [`Dropped`]).
    pub async fn on_log_chunk(&self, node: &str, session: u64, chunk: &v1::LogChunk) -> Result<(), Dropped> {
        let taken = self.take_chunk(node, session, chunk).await;
        let outcome = match taken {
            Ok(()) => "accepted",
            Err(why) => {
                // Not a warning each: a flood would flood the log too. Counted instead.
                debug!(node, attempt = %super::wire::short(&chunk.attempt_id), reason = %why, "live log chunk dropped");
                why.label()
            }
        };
        self.metrics.live_log_chunk(outcome);
        taken
    }

    async fn take_chunk(&self, node: &str, session: u64, chunk: &v1::LogChunk) -> Result<(), Dropped> {
        // Checked before any lookup, so an oversized or malformed chunk costs nothing more.
        let stream = match v1::LogStream::try_from(chunk.stream) {
            Ok(v1::LogStream::Stdout) => 0,
            Ok(v1::LogStream::Stderr) => 1,
            _ => return Err(Dropped::BadStream),
        };
        if chunk.data.is_empty() || chunk.data.len() > kommune_proto::limits::MAX_LOG_CHUNK_BYTES {
            return Err(Dropped::Oversize);
        }
        let live = match self.live.get(&chunk.attempt_id) {
            Some(live) => live,
            None => self.open_live(&chunk.attempt_id, Some(node)).await?,
        };
        if live.key.node != node {
            return Err(Dropped::NotHeld);
        }
        live.append(session, stream, chunk.offset, &chunk.data)
    }

    /// Opens the live tail of a running attempt, from the store's record of it (held in
    /// memory for a running job, so this is no database read); `node`, when given, must hold it.
    async fn open_live(&self, attempt_id: &str, node: Option<&str>) -> Result<Arc<LiveAttempt>, Dropped> {
        // Attempt ids start with their job's uid. A job this operator does not sync has no
        // running attempt here; refused without a lookup, so made-up ids cost no store read.
        if self.limits(attempt_id.split('.').next().unwrap_or_default()).is_none() {
            return Err(Dropped::NotHeld);
        }
        let a = match self.store.attempt(attempt_id).await {
            Ok(Some(a)) => a,
            Ok(None) => return Err(Dropped::NotHeld),
            Err(e) => {
                warn!(error = %e, "cannot look up an attempt for its live logs");
                return Err(Dropped::Ended);
            }
        };
        if node.is_some_and(|n| n != a.node) {
            return Err(Dropped::NotHeld);
        }
        if !running(a.phase) {
            return Err(Dropped::Ended);
        }
        self.live.open(LiveKey { attempt_id: a.id, node: a.node, job_uid: a.job_uid, task_index: a.index })
    }

    /// The attempt of task `index` of job `uid` that runs now (the newest, with replicas).
    async fn running_attempt(&self, uid: &str, index: u32) -> Result<Following, String> {
        let attempts = self.store.job_attempts(uid).await.map_err(|e| format!("cannot read the job's attempts: {e}"))?;
        let newest = attempts.iter().filter(|a| a.index == index && running(a.phase)).max_by_key(|a| (a.number, a.replica));
        let Some(a) = newest else { return Ok(Following::NotRunning) };
        match self.open_live(&a.id, None).await {
            Ok(live) => Ok(Following::Live(live)),
            Err(Dropped::Full) => Err(Dropped::Full.to_string()),
            // It ended between the two reads.
            Err(_) => Ok(Following::NotRunning),
        }
    }
}

impl LiveSource for Dispatcher {
    fn follow(&self, job_uid: String, task_index: u32) -> BoxFuture<'_, Result<Following, String>> {
        Box::pin(async move { self.running_attempt(&job_uid, task_index).await })
    }
}
