//! Time the operator enforces itself: an attempt that runs past its task timeout is failed
//! and placed again even if its agent stays silent or keeps heartbeating, and every receipt is
//! bounded by what its attempt could have used, including that timeout.

use std::time::Duration;

use tracing::info;

use kommune_core::reputation::Observed;

use super::{Dispatcher, Result, lost, wire};
use crate::attempt::{Attempt, AttemptPhase};
use crate::bounds::{self, Assigned, UsageBounds};
use crate::job::JobPolicy;
use kommune_proto::now_ms;

/// How long past its task timeout an attempt may stay unreported by default. The agent's
/// timer starts when the task starts, after the module download and the sandbox set-up, and
/// its report may wait for a reconnect; this covers both with room to spare.
pub const DEFAULT_TASK_GRACE: Duration = Duration::from_secs(60);

/// What bounds a job's attempts, remembered from its last sync, and the kind of work they
/// run (what observations of them are filed under).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobLimits {
    pub runtime: &'static str,
    pub task_timeout: Duration,
    pub workload: std::sync::Arc<str>,
    /// `spec.outputs`: what an attempt may upload (the gateway holds uploads to it).
    pub outputs: Option<std::sync::Arc<kommune_core::job::data::JobOutputs>>,
}

impl Dispatcher {
    pub(super) fn remember_limits(&self, job_uid: &str, policy: &JobPolicy) {
        let limits = JobLimits {
            runtime: policy.workload.runtime(),
            task_timeout: policy.task_timeout,
            workload: policy.workload.class().into(),
            outputs: policy.outputs.clone().map(std::sync::Arc::new),
        };
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if jobs.get(job_uid) != Some(&limits) {
            jobs.insert(job_uid.to_string(), limits);
        }
    }

    pub(super) fn forget_limits(&self, job_uid: &str) {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).remove(job_uid);
    }

    pub(super) fn limits(&self, job_uid: &str) -> Option<JobLimits> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).get(job_uid).cloned()
    }

    /// The most `a` could have used: its reservation, the runtime's rules, what its node
    /// offers and its job's timeout (`crate::bounds`).
    pub(super) fn usage_bounds(&self, a: &Attempt) -> UsageBounds {
        let job = self.limits(&a.job_uid);
        bounds::for_attempt(&Assigned {
            runtime: job.as_ref().map(|j| j.runtime),
            cpu_millis: a.cpu_millis,
            memory_bytes: a.memory_bytes,
            gpus: a.held.map_or(0, |h| h.gpu_mask.count_ones()),
            node_capacity: self.fleet.node(&a.node).map(|n| n.capacity),
            timeout: job.as_ref().map(|j| j.task_timeout),
            output_files_bytes: job.as_ref().map(|j| j.outputs.as_ref().map_or(0, |o| o.max_attempt_bytes)),
        })
    }

    /// Fails every active attempt that has run longer than its task timeout plus the grace
    /// without a result: its node is told to stop it, it counts as a failure of its task (so
    /// it is retried elsewhere with backoff, within `retries.maxAttempts`), and any receipt
    /// its node sends later is still bounded by the timeout. Attempts of jobs not synced since
    /// this operator started are left for after their first sync. Returns how many were failed.
    pub async fn enforce_timeouts(&self) -> Result<usize> {
        let now = now_ms();
        // Read without the placement lock (it is a scan of every active attempt); finishing is
        // conditional on the attempt still being active, so one that ends meanwhile is left be.
        let overdue: Vec<(Attempt, JobLimits)> = self
            .store
            .all_active()
            .await?
            .into_iter()
            .filter_map(|a| {
                let job = self.limits(&a.job_uid)?;
                let ran = Duration::from_millis(u64::try_from(now.saturating_sub(a.created_ms)).unwrap_or(0));
                (ran > job.task_timeout.saturating_add(self.task_grace)).then_some((a, job))
            })
            .collect();
        if overdue.is_empty() {
            return Ok(0);
        }
        let _guard = self.place_lock.lock().await;
        let mut failed = 0;
        let mut timed_out = vec![];
        for (a, job) in overdue {
            let why = format!(
                "ran past its task timeout of {}s (+{}s grace) without a result from node {}; stopped by the operator",
                job.task_timeout.as_secs(),
                self.task_grace.as_secs(),
                a.node
            );
            if self.finish(&a.id, AttemptPhase::Failed, Some(&lost(&why)), now).await?.is_some() {
                let _ = self.fleet.send(&a.node, wire::cancel_message(&a.id, &why));
                info!(attempt = %a.id, node = %a.node, "attempt failed by the operator past its timeout");
                self.notify(&a.job_key);
                failed += 1;
                timed_out.push(a);
            }
        }
        let observed: Vec<_> = timed_out.iter().map(|a| (a, Observed::TimedOut)).collect();
        self.observe_ended(&observed, now).await;
        Ok(failed)
    }
}
