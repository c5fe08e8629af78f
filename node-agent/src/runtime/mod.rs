//! Task runtimes: run one task attempt in a sandbox and report what it produced.
//! `WasmRuntime` runs WASI modules under wasmtime; `ExecRuntime` runs host commands when allowed;
//! `ContainerRuntime` runs pinned images through a Docker or Podman socket.

mod container;
mod exec;
pub mod live;
mod output;
pub mod sandbox;
pub mod usage;
mod wasm;

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use container::ContainerRuntime;
pub use exec::{ExecRuntime, pgid_from_stat, resolve_exec_user, stop_leftover_tasks};
pub use usage::Measured;
pub use wasm::WasmRuntime;

use output::SharedCapture;

/// How many bytes of the end of stdout and of stderr an [`Outcome`] keeps.
pub const TAIL_BYTES: usize = 4096;

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Succeeded,
    Failed,
    Cancelled,
}

/// What a finished attempt produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub ending: Ending,
    /// Exit code; -1 when the task did not run to an exit (trap, timeout, cancel, start failure).
    pub exit_code: i32,
    /// sha256 (lowercase hex) of the complete stdout.
    pub output_sha256: String,
    /// Total stdout bytes.
    pub output_bytes: u64,
    /// The last [`TAIL_BYTES`] bytes of stdout.
    pub stdout_tail: Vec<u8>,
    /// The last [`TAIL_BYTES`] bytes of stderr.
    pub stderr_tail: Vec<u8>,
    /// Why the attempt did not end in a clean exit; empty when it did.
    pub message: String,
    pub wall: Duration,
    /// CPU, memory and fuel the attempt used, as the operating system accounted them.
    pub usage: Measured,
    /// The outputs collected and uploaded when the attempt ended (`Assign.outputs`).
    pub outputs: Vec<kommune_proto::v1::OutputFile>,
}

impl Outcome {
    /// An attempt that failed before any task code ran (bad input, unknown module, runtime
    /// disabled): no output, exit code -1.
    pub fn not_started(message: impl Into<String>) -> Self {
        let none = SharedCapture::stdout();
        Self {
            ending: Ending::Failed,
            exit_code: -1,
            output_sha256: none.digest_hex(),
            output_bytes: 0,
            stdout_tail: Vec::new(),
            stderr_tail: Vec::new(),
            message: message.into(),
            wall: Duration::ZERO,
            usage: Measured::none(),
            outputs: Vec::new(),
        }
    }

    /// An attempt that succeeded at once with no output and no measured usage (`source`
    /// "simulated"): what the e2e scale scenario's simulated agents report, since they run
    /// nothing.
    pub fn simulated_success() -> Self {
        Self {
            ending: Ending::Succeeded,
            exit_code: 0,
            message: String::new(),
            usage: Measured { source: "simulated", ..Measured::none() },
            ..Self::not_started("")
        }
    }

    fn from_captures(end: End, stdout: &SharedCapture, stderr: &SharedCapture, wall: Duration, usage: Measured) -> Self {
        Self {
            ending: end.ending,
            exit_code: end.exit_code,
            output_sha256: stdout.digest_hex(),
            output_bytes: stdout.total(),
            stdout_tail: stdout.tail(),
            stderr_tail: stderr.tail(),
            message: end.message,
            wall,
            usage,
            outputs: Vec::new(),
        }
    }
}

/// How a task ended, before its output is attached.
#[derive(Debug)]
struct End {
    ending: Ending,
    exit_code: i32,
    message: String,
}

impl End {
    fn exited(code: i32) -> Self {
        if code == 0 {
            Self { ending: Ending::Succeeded, exit_code: 0, message: String::new() }
        } else {
            Self { ending: Ending::Failed, exit_code: code, message: format!("exited with code {code}") }
        }
    }

    fn failed(message: impl Into<String>) -> Self {
        Self { ending: Ending::Failed, exit_code: -1, message: message.into() }
    }

    fn cancelled() -> Self {
        Self { ending: Ending::Cancelled, exit_code: -1, message: "cancelled".into() }
    }

    fn timed_out(after: Duration) -> Self {
        Self::failed(format!("timed out after {}", human_duration(after)))
    }

    /// Output over its cap fails the attempt even after a clean exit: its digest would name
    /// truncated output. Cancellation still wins.
    fn check_output(self, stdout: &SharedCapture, stderr: &SharedCapture) -> Self {
        if self.ending == Ending::Cancelled {
            return self;
        }
        match [stdout, stderr].into_iter().find(|c| c.exceeded()) {
            Some(capture) => Self { ending: Ending::Failed, exit_code: self.exit_code, message: capture.limit_message() },
            None => self,
        }
    }
}

/// Limits and context of one attempt.
#[derive(Debug, Clone)]
pub struct AttemptContext {
    pub attempt_id: String,
    /// What the task sees as `KOMMUNE_ATTEMPT_ID`: the same for every copy of a verified task,
    /// so honest copies' output matches; empty means `attempt_id`.
    pub task_identity: String,
    pub task_index: u32,
    pub task_count: u32,
    /// Hard cap on the task's memory (wasm linear memory, container cgroup; not enforced for
    /// exec yet).
    pub memory_bytes: u64,
    /// CPU the task may use, in millicores (enforced for containers only).
    pub cpu_millis: u64,
    pub timeout: Option<Duration>,
    /// Per-attempt directory, created by the caller: the only directory the task may touch.
    pub scratch_dir: PathBuf,
    /// User environment from the job.
    pub env: Vec<(String, String)>,
    /// Where full copies of stdout and stderr are kept for upload (files `stdout`, `stderr`),
    /// at most this many bytes each; None keeps only the tails.
    pub keep_streams: Option<(PathBuf, u64)>,
    /// Where stdout and stderr also go as they are written, for the operator's live view.
    pub live: Option<live::LiveLog>,
}

/// Variables the agent sets for every task; a job cannot override them.
const TASK_INDEX_VAR: &str = "KOMMUNE_TASK_INDEX";
const TASK_COUNT_VAR: &str = "KOMMUNE_TASK_COUNT";
const ATTEMPT_ID_VAR: &str = "KOMMUNE_ATTEMPT_ID";

impl AttemptContext {
    /// The task's environment: the job's variables, then the agent's `KOMMUNE_*` ones. A job
    /// variable with a reserved name is dropped rather than shadowed, because WASI passes
    /// duplicates through and guests would see whichever comes first.
    fn task_env(&self) -> Vec<(String, String)> {
        let reserved = [TASK_INDEX_VAR, TASK_COUNT_VAR, ATTEMPT_ID_VAR];
        self.env
            .iter()
            .filter(|(name, _)| !reserved.contains(&name.as_str()))
            .cloned()
            .chain([
                (TASK_INDEX_VAR.to_owned(), self.task_index.to_string()),
                (TASK_COUNT_VAR.to_owned(), self.task_count.to_string()),
                (ATTEMPT_ID_VAR.to_owned(), if self.task_identity.is_empty() { &self.attempt_id } else { &self.task_identity }.clone()),
            ])
            .collect()
    }
}

/// Why a runtime could not be set up or a module could not be accepted.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot set up the wasm engine: {0}")]
    Engine(String),
    #[error("module digest mismatch: expected sha256 {expected}, got sha256 {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("module sha256 {sha256} is not a valid wasm module: {reason}")]
    InvalidModule { sha256: String, reason: String },
    #[error("module sha256 {sha256} needs imports the sandbox does not provide: {reason}")]
    UnsupportedImports { sha256: String, reason: String },
}

/// When an attempt started at `started` runs out of time, with the timeout itself for
/// messages. None without a timeout, or with one too large to reach.
fn deadline(started: Instant, timeout: Option<Duration>) -> Option<(Duration, Instant)> {
    let after = timeout?;
    Some((after, started.checked_add(after)?))
}

/// Resolves with the timeout once `deadline` passes; never without one.
async fn expired(deadline: Option<(Duration, Instant)>) -> Duration {
    match deadline {
        Some((after, at)) => {
            tokio::time::sleep_until(at.into()).await;
            after
        }
        None => std::future::pending().await,
    }
}

/// "5s" for whole seconds, "250ms" otherwise: timeouts come from `taskSeconds` or tests.
fn human_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 { format!("{}s", d.as_secs()) } else { format!("{}ms", d.as_millis()) }
}

/// "64 MiB" for whole mebibytes, a byte count otherwise.
fn human_bytes(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    if bytes >= MIB && bytes.is_multiple_of(MIB) { format!("{} MiB", bytes / MIB) } else { format!("{bytes} bytes") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_env_puts_agent_variables_last_and_drops_job_overrides() {
        let ctx = AttemptContext {
            attempt_id: "job-1-2-a1".into(),
            task_identity: String::new(),
            task_index: 2,
            task_count: 4,
            memory_bytes: 1 << 20,
            cpu_millis: 1000,
            timeout: None,
            scratch_dir: PathBuf::from("/tmp/x"),
            keep_streams: None,
            live: None,
            env: vec![("GREETING".into(), "hi".into()), ("KOMMUNE_TASK_INDEX".into(), "99".into())],
        };
        let env = ctx.task_env();
        let names: Vec<_> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(names, ["GREETING=hi", "KOMMUNE_TASK_INDEX=2", "KOMMUNE_TASK_COUNT=4", "KOMMUNE_ATTEMPT_ID=job-1-2-a1"]);
        // A copy of a verified task sees its task's identity, not its own attempt id.
        let copy = AttemptContext { attempt_id: "job-1-2-a1.r1".into(), task_identity: "job-1-2-a1".into(), ..ctx };
        assert_eq!(copy.task_env().last(), Some(&("KOMMUNE_ATTEMPT_ID".to_string(), "job-1-2-a1".to_string())));
    }

    #[test]
    fn a_timeout_too_large_to_reach_means_no_deadline() {
        let now = Instant::now();
        assert_eq!(deadline(now, None), None);
        assert_eq!(deadline(now, Some(Duration::MAX)), None);
        let second = Duration::from_secs(1);
        assert_eq!(deadline(now, Some(second)), Some((second, now + second)));
    }

    #[test]
    fn durations_and_sizes_read_like_a_person_wrote_them() {
        assert_eq!(human_duration(Duration::from_secs(5)), "5s");
        assert_eq!(human_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(human_bytes(64 << 20), "64 MiB");
        assert_eq!(human_bytes(1000), "1000 bytes");
    }

    #[test]
    fn an_attempt_that_never_started_has_the_digest_of_no_output() {
        let outcome = Outcome::not_started("nope");
        assert_eq!(outcome.ending, Ending::Failed);
        assert_eq!(outcome.exit_code, -1);
        assert_eq!(outcome.output_sha256, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(outcome.message, "nope");
    }
}
