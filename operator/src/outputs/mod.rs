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
