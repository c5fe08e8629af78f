//! A job's data path as policy: the files each task gets before it starts (`spec.inputs`),
//! with `{index}` resolved per task.

use std::fmt;

/// What a template writes for the task index: `shard-{index}.csv` is `shard-3.csv` for task 3.
pub const INDEX_PLACEHOLDER: &str = "{index}";

/// `template` for task `index`.
pub fn expand(template: &str, index: u32) -> String {
    template.replace(INDEX_PLACEHOLDER, &index.to_string())
}

/// A file fetched into every attempt's `<scratch>/in/` before the task starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInput {
    /// Relative path under `in/`; may hold `{index}`.
    pub path: String,
    pub source: InputSource,
    pub sha256: InputDigest,
}

/// Where an input comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputSource {
    /// An http(s) URL the agent downloads (public addresses only, unless its provider allows
    /// more); may hold `{index}`.
    Url(String),
    /// A key of a ConfigMap in the job's namespace, served by the operator by digest; the key
    /// may hold `{index}`.
    ConfigMap { name: String, key: String },
    /// An object of an S3-compatible bucket, fetched with a GET URL the operator presigns per
    /// attempt from the credentials of a Secret of the job's namespace; the key may hold `{index}`.
    S3(S3Object),
}

/// An object in an S3-compatible bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Object {
    /// The bucket's endpoint, e.g. `https://s3.eu-west-1.amazonaws.com`.
    pub endpoint: String,
    pub bucket: String,
    pub key: String,
    pub region: String,
    /// `endpoint/bucket/key` (true) or `bucket.endpoint/key` addressing.
    pub path_style: bool,
    /// The Secret (type `kommune.dev/s3-credentials`) in the job's namespace with the keys.
    pub secret: String,
    /// The Secret's keys, once the operator has read them (validation leaves None): what
    /// URLs are presigned with. Never sent to an agent.
    pub credentials: Option<S3Credentials>,
}

/// An access key pair for presigning. Its Debug never shows the secret key.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "S3Credentials({}, <secret key redacted>)", self.access_key_id)
    }
}

/// An input's expected content.
#[derive(Clone, PartialEq, Eq)]
pub enum InputDigest {
    /// Every task gets the same file.
    Shared(String),
    /// Task i gets the file whose digest is the i-th.
    PerTask(Vec<String>),
}

impl fmt::Debug for InputDigest {
    // A per-task list can hold a million digests: logs get its length.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InputDigest::Shared(s) => write!(f, "Shared({s})"),
            InputDigest::PerTask(v) => write!(f, "PerTask({} digests)", v.len()),
        }
    }
}

/// One input as one task sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInput<'a> {
    pub path: String,
    pub sha256: &'a str,
    pub source: &'a InputSource,
    /// The ConfigMap key, URL or S3 key with the index in.
    pub location: String,
}

impl JobInput {
    /// This input for task `index`; None when the job has no digest for that index (validation
    /// refuses such a job, so only a stale policy gets here).
    pub fn for_task(&self, index: u32) -> Option<TaskInput<'_>> {
        let sha256 = match &self.sha256 {
            InputDigest::Shared(s) => s.as_str(),
            InputDigest::PerTask(v) => v.get(index as usize)?.as_str(),
        };
        let location = match &self.source {
            InputSource::Url(url) => expand(url, index),
            InputSource::ConfigMap { key, .. } => expand(key, index),
            InputSource::S3(o) => expand(&o.key, index),
        };
        Some(TaskInput { path: expand(&self.path, index), sha256, source: &self.source, location })
    }

    /// Whether tasks get different files (the path or the source names the index).
    pub fn per_task(&self) -> bool {
        matches!(self.sha256, InputDigest::PerTask(_))
    }
}

/// What every attempt of a job collects when it ends (`spec.outputs`): stdout, stderr and the
/// declared paths under `out/`, bounded, and where they go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutputs {
    /// Files or directories under `out/` (plain relative paths).
    pub paths: Vec<String>,
    /// Output names (`out/<path>`, or a file under a declared directory) that count in
    /// verification: a declared path counts itself and everything under it.
    pub verify: Vec<String>,
    pub max_file_bytes: u64,
    pub max_attempt_bytes: u64,
    pub max_files: u32,
    pub destination: OutputDestination,
}

/// Where a job's outputs are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputDestination {
    /// The operator's own store, uploaded over the agents' gateway.
    Operator,
    /// The job's bucket: `key` is the prefix; agents PUT to URLs presigned per attempt.
    S3(S3Object),
}

impl JobOutputs {
    /// Whether output `name` (`stdout`, `stderr`, `out/...`) counts in verification.
    pub fn counts(&self, name: &str) -> bool {
        let Some(rest) = name.strip_prefix("out/") else { return false };
        self.verify.iter().any(|v| rest == v || rest.strip_prefix(v.as_str()).is_some_and(|r| r.starts_with('/')))
    }
}

pub use kommune_proto::is_plain_relative_path;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_gets_its_own_shard_and_digest_and_shared_inputs_stay_shared() {
        let per_task = JobInput {
            path: "shard-{index}.csv".into(),
            source: InputSource::ConfigMap { name: "shards".into(), key: "shard-{index}.csv".into() },
            sha256: InputDigest::PerTask(vec!["a".into(), "b".into()]),
        };
        let t1 = per_task.for_task(1).unwrap();
        assert_eq!((t1.path.as_str(), t1.sha256, t1.location.as_str()), ("shard-1.csv", "b", "shard-1.csv"));
        assert_eq!(per_task.for_task(2), None);
        let shared = JobInput { path: "dict.txt".into(), source: InputSource::Url("https://x/dict.txt".into()), sha256: InputDigest::Shared("c".into()) };
        assert_eq!(shared.for_task(7).unwrap().sha256, "c");
        assert_eq!(format!("{:?}", per_task.sha256), "PerTask(2 digests)");
    }

    #[test]
    fn only_plain_relative_paths_may_go_under_scratch() {
        for ok in ["a", "a/b.csv", "shard-3.csv", "..a"] {
            assert!(is_plain_relative_path(ok), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/", "a\0b"] {
            assert!(!is_plain_relative_path(bad), "{bad:?}");
        }
    }
}
