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
        Ok(store.begin(&a.id, name, size, excess, UploadLimits::from(o.as_ref()))?)
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
