//! What the dispatcher tells about a job's module: whether a node holds an attempt that needs
//! it (FetchBlob's authorization), and whether a job needs its module any more.

use std::collections::HashSet;

use super::{Dispatcher, Result};
use crate::crd::JobPhase;
use crate::job::JobPolicy;
use crate::job::Recorded;
use crate::job::progress::progress_recorded;
use kommune_proto::now_ms;

impl Dispatcher {
    /// Whether `node` holds an active (Assigned or Running) attempt of one of `job_uids`. Read
    /// from memory for jobs being synced; one indexed read of the node's active attempts when
    /// some job is not loaded (after a restart, before its first sync).
    pub async fn node_holds_attempt_of(&self, node: &str, job_uids: &[String]) -> Result<bool> {
        let mut unloaded = false;
        for uid in job_uids {
            match self.store.loaded_job_attempts(uid) {
                Some(attempts) if attempts.iter().any(|a| a.node == node && !a.phase.is_terminal()) => return Ok(true),
                Some(_) => {}
                None => unloaded = true,
            }
        }
        if !unloaded {
            return Ok(false);
        }
        let wanted: HashSet<&str> = job_uids.iter().map(String::as_str).collect();
        Ok(self.store.active_on_node(node).await?.iter().any(|a| wanted.contains(a.job_uid.as_str())))
    }

    /// Whether the job has ended with none of its attempts still active: nothing of it will
    /// fetch its module again. `recorded` is what the job's status records as done (see
    /// [`Dispatcher::sync_recorded`]).
    pub async fn job_ended(&self, job_uid: &str, policy: &JobPolicy, recorded: &Recorded) -> Result<bool> {
        let attempts = self.store.job_attempts(job_uid).await?;
        let known = self.known(job_uid, recorded);
        let ended = matches!(progress_recorded(policy, &attempts, now_ms(), &|_| true, &known).phase, JobPhase::Succeeded | JobPhase::Failed);
        Ok(ended && attempts.iter().all(|a| a.phase.is_terminal()))
    }
}
