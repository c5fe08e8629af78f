//! Task outputs as the retrieval side sees them: what an accepted attempt left (declared files
//! under `/scratch/out`, stdout, stderr) and how to read one, wherever it is stored.

use futures::future::BoxFuture;
use futures::stream::BoxStream;

/// One stored output of a job's task, as listed to someone allowed to `get` the job.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutputEntry {
    /// The task index (`KOMMUNE_TASK_INDEX`).
    pub task_index: u32,
    /// The attempt whose outputs these are (the accepted one once the task has finished).
    pub attempt_id: String,
    /// `stdout`, `stderr`, or a path relative to `/scratch/out` (`out/result.csv`).
    pub name: String,
    /// Bytes stored (after any limit).
    pub size: u64,
    /// Lower-case hex sha256 of the stored bytes.
    pub sha256: String,
    /// Bytes the task produced beyond the limits and that were not stored (0 when complete).
    pub excess_bytes: u64,
}

/// How one output is read back.
pub enum OutputBody {
    /// The bytes, streamed from the operator's own store.
    Stream { size: u64, body: BoxStream<'static, std::io::Result<bytes::Bytes>> },
    /// A short-lived URL (a presigned GET of the job's bucket) the caller follows.
    Redirect(String),
}

/// Read access to stored outputs, keyed by the ComputeJob's uid. The web layer checks the
/// caller's permission on the ComputeJob before calling this; implementations do no authorization.
pub trait OutputReader: Send + Sync {
    /// Every stored output of the job, ordered by task index then name; empty when none.
    fn list(&self, job_uid: &str) -> BoxFuture<'_, Result<Vec<OutputEntry>, String>>;
    /// One output, or `None` when the job has no such output.
    fn open(&self, job_uid: &str, task_index: u32, name: &str) -> BoxFuture<'_, Result<Option<OutputBody>, String>>;
}

pub mod live;
pub mod store;

pub use store::{OutputError, OutputStore, Stored, UploadLimits};

/// Presigned GETs of outputs in a job's bucket are valid this long.
const REDIRECT_VALIDITY: std::time::Duration = std::time::Duration::from_secs(600);
/// Bytes read from disk per streamed chunk.
const READ_CHUNK: usize = 256 << 10;

impl OutputReader for OutputStore {
    fn list(&self, job_uid: &str) -> BoxFuture<'_, Result<Vec<OutputEntry>, String>> {
        let (store, uid) = (self.clone(), job_uid.to_string());
        Box::pin(async move {
            let listed = tokio::task::spawn_blocking(move || store.list(&uid)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
            Ok(listed
                .into_iter()
                .map(|(attempt_id, s)| OutputEntry {
                    task_index: s.task_index,
                    attempt_id,
                    name: s.name,
                    size: s.size,
                    sha256: s.sha256,
                    excess_bytes: s.excess_bytes,
                })
                .collect())
        })
    }

    fn open(&self, job_uid: &str, task_index: u32, name: &str) -> BoxFuture<'_, Result<Option<OutputBody>, String>> {
        let (store, uid, name) = (self.clone(), job_uid.to_string(), name.to_string());
        Box::pin(async move {
            let lookup = store.clone();
            let uid2 = uid.clone();
            let listed = tokio::task::spawn_blocking(move || lookup.list(&uid2)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
            let Some((attempt, stored)) = listed.into_iter().find(|(_, s)| s.task_index == task_index && s.name == name) else { return Ok(None) };
            if let Some(key) = &stored.key {
                let bucket = store
                    .bucket(&uid)
                    .ok_or_else(|| format!("the bucket of job {uid} is not known yet (its ComputeJob has not been reconciled since the operator started)"))?;
                let url = crate::dispatch::presign::get(&bucket, key, REDIRECT_VALIDITY).map_err(|e| e.to_string())?;
                return Ok(Some(OutputBody::Redirect(url)));
            }
            let Some(file) = &stored.file else { return Ok(None) };
            let path = store.file_path(&uid, &attempt, file);
            let f = tokio::fs::File::open(&path).await.map_err(|e| format!("{}: {e}", path.display()))?;
            let body = futures::stream::try_unfold(f, |mut f| async move {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; READ_CHUNK];
                let n = f.read(&mut buf).await?;
                if n == 0 {
                    return Ok(None);
                }
                buf.truncate(n);
                Ok(Some((bytes::Bytes::from(buf), f)))
            });
            Ok(Some(OutputBody::Stream { size: stored.size, body: Box::pin(body) }))
        })
    }
}

#[cfg(test)]
mod tests;
