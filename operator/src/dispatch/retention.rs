//! How long a job's attempt history stays in the store after the job ended: the cluster's
//! `--attempt-retention-seconds`, noted when a job ends or is deleted and pruned by a sweep.

use std::time::Duration;

use super::{Dispatcher, Result};
use kommune_proto::now_ms;

/// The default retention of an ended job's attempts (a week: time to look into a job).
pub const DEFAULT_ATTEMPT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Attempts deleted per transaction: short enough not to hold up results' group commits.
const PRUNE_BATCH: u32 = 5_000;

impl Dispatcher {
    /// Keeps ended jobs' attempts in the store for `retention`, then lets the sweep delete them.
    pub fn with_attempt_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Notes, once per change, whether the job has ended (its attempts go after the retention)
    /// or runs (they stay: an edited spec can bring an ended job back). A job's first sync in
    /// this process clears any note, so a job revived while no operator ran is safe too.
    /// The hook for a per-job `ttlSecondsAfterFinished`: pass its duration instead of the default.
    pub(super) async fn note_retention(&self, job_uid: &str, ended: bool) -> Result<()> {
        let known = self.ended.lock().unwrap_or_else(|p| p.into_inner()).get(job_uid).copied();
        if known == Some(ended) {
            return Ok(());
        }
        let prune_at = ended.then(|| now_ms().saturating_add(self.retention.as_millis() as i64));
        self.store.retain(job_uid, prune_at).await?;
        self.ended.lock().unwrap_or_else(|p| p.into_inner()).insert(job_uid.to_string(), ended);
        Ok(())
    }

    /// Deletes the attempts of jobs whose retention has passed, in batches; how many.
    pub async fn prune_attempts(&self) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = self.store.prune(now_ms(), PRUNE_BATCH).await?;
            total += n;
            if n < u64::from(PRUNE_BATCH) {
                return Ok(total);
            }
            // Results queued meanwhile commit between batches.
            tokio::task::yield_now().await;
        }
    }
}
