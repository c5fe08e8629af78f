//! Task outputs in the dispatcher: what an Assign tells the agent to collect, which uploads the
//! gateway lets through, what a result records (the operator's own digests) and what is kept.

use kommune_core::job::data::{JobOutputs, OutputDestination};
use kommune_proto::v1;
use tracing::warn;

use super::Dispatcher;
use crate::attempt::{Attempt, AttemptPhase, AttemptResult, OutputDigest};
use crate::job::{JobPolicy, Progress};
use crate::outputs::{OutputError, OutputStore, Stored, UploadLimits, store::Upload, store::valid_name};

/// How long a presigned output URL stays valid: the task's timeout plus this, so it still
/// works when the attempt ends at its timeout and uploads then.
const PUT_URL_SLACK: std::time::Duration = std::time::Duration::from_secs(3600);

/// Bounds what an agent says it produced but did not send (`excess_bytes`), which nobody can
/// measure: all of an attempt's outputs together, stored bytes and excess, cannot exceed the
/// scratch disk it could have filled (`bound`). Claims are cut, in name order, to what is left;
/// returns the bytes cut (0 for an honest agent, whose outputs all fit on its disk).
pub fn bound_excess(outputs: &mut [OutputDigest], bound: u64) -> u64 {
    let mut left = bound.saturating_sub(outputs.iter().fold(0u64, |t, o| t.saturating_add(o.size)));
    let mut cut = 0u64;
    for o in outputs.iter_mut() {
        let kept = o.excess_bytes.min(left);
        cut = cut.saturating_add(o.excess_bytes - kept);
        left -= kept;
        o.excess_bytes = kept;
    }
    cut
}

/// Why an upload was refused, as the gateway answers it.
#[derive(Debug, thiserror::Error)]
pub enum UploadRefused {
    /// The node does not hold the attempt (or it ended): one answer whatever the reason.
    #[error("node {node} holds no assigned or running attempt {attempt}")]
    NotHeld { node: String, attempt: String },
    #[error("job of attempt {0} stores no outputs with the operator")]
    NoOutputs(String),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// The object key of output `name` of attempt `a` under the job's prefix.
pub fn bucket_key(prefix: &str, a: &Attempt, name: &str) -> String {
    let prefix = prefix.trim_matches('/');
    let sep = if prefix.is_empty() { "" } else { "/" };
    format!("{prefix}{sep}{}/{}/{}/{name}", a.job_uid, a.index, a.id)
}

/// The Assign's output plan for attempt `a`: limits and, for a bucket, presigned PUTs.
pub(super) fn plan(a: &Attempt, o: &JobOutputs, task_timeout: std::time::Duration) -> v1::OutputPlan {
    let mut plan = v1::OutputPlan {
        paths: o.paths.clone(),
        max_file_bytes: o.max_file_bytes,
        max_attempt_bytes: o.max_attempt_bytes,
        max_files: o.max_files,
        put_urls: Default::default(),
    };
    if let OutputDestination::S3(bucket) = &o.destination {
        let names = ["stdout".to_string(), "stderr".to_string()].into_iter().chain(o.paths.iter().map(|p| format!("out/{p}")));
        for name in names {
            let url = super::presign::put(bucket, &bucket_key(&bucket.key, a, &name), task_timeout + PUT_URL_SLACK).unwrap_or_else(|e| format!("unsigned:{e}"));
            plan.put_urls.insert(name, url);
        }
    }
    plan
}

impl Dispatcher {
    /// Stores uploaded outputs in `outputs`.
    pub fn with_outputs(mut self, outputs: OutputStore) -> Self {
        self.outputs = Some(outputs);
        self
    }

    /// The output store, if this operator keeps outputs.
    pub fn outputs(&self) -> Option<&OutputStore> {
        self.outputs.as_ref()
    }

    /// Read access to stored outputs for the web layer (which checks the caller's permission
    /// on the ComputeJob first); None when this operator keeps no outputs.
    pub fn output_reader(&self) -> Option<std::sync::Arc<dyn crate::outputs::OutputReader>> {
        self.outputs.clone().map(|s| std::sync::Arc::new(s) as std::sync::Arc<dyn crate::outputs::OutputReader>)
    }

    /// Lets an upload of output `name` of `attempt` begin: only from the node that holds the
    /// attempt while it is Assigned or Running, within its job's limits and the store's room.
    pub async fn begin_upload(&self, node: &str, attempt: &str, name: &str, size: u64, excess: u64) -> Result<Upload, UploadRefused> {
        let not_held = || UploadRefused::NotHeld { node: node.to_string(), attempt: super::wire::short(attempt) };
        let a = self.store.attempt(attempt).await?.ok_or_else(not_held)?;
        if a.node != node || !matches!(a.phase, AttemptPhase::Assigned | AttemptPhase::Running) {
            return Err(not_held());
        }
        let (Some(store), Some(o)) = (&self.outputs, self.limits(&a.job_uid).and_then(|l| l.outputs)) else {
            return Err(UploadRefused::NoOutputs(a.id.clone()));
        };
        if o.destination != OutputDestination::Operator {
            return Err(UploadRefused::NoOutputs(a.id.clone()));
        }
        // The excess is a claim; no single file can have outgrown the attempt's scratch.
        let excess = excess.min(self.scratch_bound(&a).saturating_sub(size));
        Ok(store.begin(&a.id, name, size, excess, UploadLimits::from(o.as_ref()))?)
    }

    /// The most scratch disk attempt `a` could have filled: what its node offers (as believed,
    /// under the admin's caps and the built-in ceiling), else that ceiling.
    fn scratch_bound(&self, a: &Attempt) -> u64 {
        let ceiling = crate::fleet::CEILING.ephemeral_bytes.unwrap_or(u64::MAX);
        match self.fleet.node(&a.node).map(|n| n.capacity.ephemeral_bytes) {
            Some(offered) if offered > 0 => offered.min(ceiling),
            _ => ceiling,
        }
    }

    /// Fills `result.outputs` for an attempt of a job with outputs: for the operator's store,
    /// from what it received and hashed itself (what the agent claims is not believed), plus
    /// outputs the agent reports it could not send at all; for a bucket, from the agent's
    /// report, bounded, and recorded so the outputs can be listed. Whether each counts in
    /// verification is the job's word, never the agent's.
    pub(super) async fn collected_outputs(&self, a: &Attempt, reported: Option<&v1::TaskResult>, result: &mut AttemptResult) {
        let (Some(store), Some(o)) = (&self.outputs, self.limits(&a.job_uid).and_then(|l| l.outputs)) else { return };
        let reported: Vec<&v1::OutputFile> =
            reported.map(|r| r.outputs.iter().filter(|f| valid_name(&f.name)).take(o.max_files as usize).collect()).unwrap_or_default();
        let mut outputs: Vec<OutputDigest> = vec![];
        match &o.destination {
            OutputDestination::Operator => {
                let (store2, id) = (store.clone(), a.id.clone());
                let stored = tokio::task::spawn_blocking(move || store2.manifest(&id)).await.ok().and_then(|r| r.ok()).unwrap_or_default();
                outputs.extend(stored.into_iter().map(|s| OutputDigest {
                    name: s.name,
                    size: s.size,
                    sha256: s.sha256,
                    excess_bytes: s.excess_bytes,
                    counted: false,
                }));
                let unsent: Vec<&&v1::OutputFile> = reported.iter().filter(|f| f.size == 0 && !outputs.iter().any(|s| s.name == f.name)).collect();
                for f in unsent {
                    outputs.push(OutputDigest { name: f.name.clone(), size: 0, sha256: String::new(), excess_bytes: f.excess_bytes, counted: false });
                }
            }
            OutputDestination::S3(bucket) => {
                let mut total = 0u64;
                let mut recorded = vec![];
                for f in reported {
                    let fits = f.size <= o.max_file_bytes && total + f.size <= o.max_attempt_bytes && kommune_proto::is_sha256_hex(&f.sha256);
                    if !fits || outputs.iter().any(|s| s.name == f.name) {
                        continue;
                    }
                    total += f.size;
                    outputs.push(OutputDigest { name: f.name.clone(), size: f.size, sha256: f.sha256.clone(), excess_bytes: f.excess_bytes, counted: false });
                    let key = bucket_key(&bucket.key, a, &f.name);
                    recorded.push(Stored {
                        task_index: a.index,
                        name: f.name.clone(),
                        size: f.size,
                        sha256: f.sha256.clone(),
                        excess_bytes: f.excess_bytes,
                        file: None,
                        key: Some(key),
                    });
                }
                // A file write and fsync: off the runtime's threads, as the manifest read above.
                let (store, id) = (store.clone(), a.id.clone());
                match tokio::task::spawn_blocking(move || store.record_in_bucket(&id, recorded)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(attempt = %a.id, error = %e, "cannot record the attempt's outputs in the bucket"),
                    Err(e) => warn!(attempt = %a.id, error = %e, "the task recording the attempt's outputs failed"),
                }
            }
        }
        for out in &mut outputs {
            out.counted = o.counts(&out.name);
        }
        outputs.sort_by(|x, y| x.name.cmp(&y.name));
        let cut = bound_excess(&mut outputs, self.scratch_bound(a));
        if cut > 0 {
            warn!(attempt = %a.id, node = %a.node, cut, "the agent claimed more unsent output than its scratch disk holds; the claim was cut");
        }
        result.outputs = outputs;
    }

    /// The outputs of each task's accepted attempt are kept; its other attempts' go.
    pub(super) async fn keep_accepted_outputs(&self, policy: &JobPolicy, progress: &Progress) {
        let (Some(store), Some(_)) = (&self.outputs, &policy.outputs) else { return };
        if progress.accepted.is_empty() {
            return;
        }
        let (store, accepted) = (store.clone(), progress.accepted.clone());
        let done = tokio::task::spawn_blocking(move || {
            for (_, id) in &accepted {
                if let Err(e) = store.accept(id) {
                    warn!(attempt = %id, error = %e, "cannot keep the accepted attempt's outputs");
                }
            }
        });
        let _ = done.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(name: &str, size: u64, excess: u64) -> OutputDigest {
        OutputDigest { name: name.into(), size, sha256: String::new(), excess_bytes: excess, counted: false }
    }

    fn excess(outputs: &[OutputDigest]) -> Vec<u64> {
        outputs.iter().map(|o| o.excess_bytes).collect()
    }

    #[test]
    fn claims_that_fit_the_scratch_disk_are_kept_whole() {
        let mut honest = [out("out/a", 100, 900), out("stdout", 50, 0), out("stderr", 0, 24)];
        assert_eq!(bound_excess(&mut honest, 1100), 0);
        assert_eq!(excess(&honest), [900, 0, 24]);
    }

    #[test]
    fn claims_past_the_scratch_disk_are_cut_in_order_to_what_is_left() {
        let mut liar = [out("out/a", 100, 500), out("out/b", 0, u64::MAX), out("stdout", 10, 7)];
        assert_eq!(bound_excess(&mut liar, 1000), (u64::MAX - 390) + 7);
        assert_eq!(excess(&liar), [500, 390, 0]);
        assert_eq!(liar.iter().map(|o| o.size + o.excess_bytes).sum::<u64>(), 1000, "all of it fills the disk, no more");
    }

    #[test]
    fn stored_bytes_alone_past_the_bound_leave_no_room_for_claims() {
        // Stored sizes are the operator's own count (bounded by the job's limits); only the
        // claims are cut, and sums never overflow.
        let mut outputs = [out("out/a", u64::MAX, 1), out("out/b", u64::MAX, u64::MAX)];
        assert_eq!(bound_excess(&mut outputs, 10), u64::MAX, "the cut saturates too");
        assert_eq!(excess(&outputs), [0, 0]);
        assert_eq!(bound_excess(&mut [], 0), 0);
    }
}
