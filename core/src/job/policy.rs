//! A validated job: the policy the operator places and runs tasks by. The operator's
//! `validate` turns a ComputeJob spec into one; everything downstream reads only this.

use std::collections::BTreeMap;
use std::time::Duration;

use super::verification::{Mode, RoundRule, Verification};
use crate::pricing::Micros;
use crate::scheduler::{GpuRequest, Locality, Reputation, Request, Resources, Toleration};

/// Default wall-clock limit of one attempt when the job sets none.
pub const DEFAULT_TASK_TIMEOUT: Duration = Duration::from_secs(3600);
/// Upper bound of the retry backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);
pub const MAX_TASKS: u32 = 1_000_000;
pub const MIN_MEMORY: u64 = 1 << 20;
/// Most replicas of one task.
pub const MAX_REPLICAS: u32 = 16;

/// A validated job: everything the operator needs to place and run its tasks.
#[derive(Debug, Clone, PartialEq)]
pub struct JobPolicy {
    pub tasks: u32,
    pub parallelism: u32,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub max_attempts: u32,
    pub backoff: Duration,
    pub task_timeout: Duration,
    pub job_deadline: Option<Duration>,
    /// `spec.suspend`: cancel what runs, place nothing.
    pub suspended: bool,
    pub workload: TaskWorkload,
    /// `spec.pricing.budget`: the most the job may cost.
    pub budget: Option<Micros>,
    /// Scratch disk per task (`spec.resources.ephemeralStorage`), 0 when none is asked.
    pub ephemeral_bytes: u64,
    /// GPUs per task (`spec.resources.gpu`); count 0 when none.
    pub gpu: GpuRequest,
    /// Where tasks may run (`spec.placement`).
    pub placement: PlacementPolicy,
    /// `spec.priority`: higher goes first.
    pub priority: i32,
    /// Most one task may cost per hour on a node; None places regardless of price.
    pub max_price_per_hour: Option<Micros>,
    /// `spec.verification`: how results are verified.
    pub verification: Verification,
    /// `spec.inputs`: files fetched into each attempt's scratch before it starts.
    pub inputs: Vec<crate::job::data::JobInput>,
    /// `spec.outputs`: what each attempt uploads when it ends; None collects nothing.
    pub outputs: Option<crate::job::data::JobOutputs>,
}

/// A validated `spec.placement`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlacementPolicy {
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    /// Normalised to Rust's names (x86_64, aarch64).
    pub arch: Option<String>,
    /// Lowercase.
    pub os: Option<String>,
    pub min_reputation: Reputation,
    pub data_locality: Option<Locality>,
    /// Copies of each task, each on a distinct provider and owner; at least 1.
    pub replicas: u32,
}

impl JobPolicy {
    /// How each round of a task is judged. `placement.replicas` without a verification mode
    /// means what it always did: every copy must agree (a quorum of all of them).
    pub fn round_rule(&self) -> RoundRule {
        match (self.verification.mode, self.placement.replicas) {
            (Mode::None, r) if r > 1 => Mode::Replicate { replicas: r, quorum: r, max_replicas: r }.round_rule(),
            (mode, _) => mode.round_rule(),
        }
    }

    /// What the scheduler needs to place one task of this job.
    pub fn request(&self) -> Request {
        let p = &self.placement;
        Request {
            runtime: self.workload.runtime().to_string(),
            resources: Resources { cpu_millis: self.cpu_millis, memory_bytes: self.memory_bytes, ephemeral_bytes: self.ephemeral_bytes },
            gpu: self.gpu.clone(),
            arch: p.arch.clone(),
            os: p.os.clone(),
            node_selector: p.node_selector.clone(),
            tolerations: p.tolerations.clone(),
            min_reputation: p.min_reputation,
            max_price_per_hour: self.max_price_per_hour,
            data_locality: p.data_locality.clone(),
            replicas: self.round_rule().initial,
            avoid: vec![],
            distinct_from: vec![],
        }
    }
}

/// What each task runs.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskWorkload {
    Wasm {
        source: ModuleSource,
        args: Vec<String>,
        env: Vec<(String, String)>,
    },
    Exec {
        command: Vec<String>,
        env: Vec<(String, String)>,
    },
    /// `image` is pinned by digest.
    Container {
        image: String,
        command: Vec<String>,
        args: Vec<String>,
        env: Vec<(String, String)>,
        network: bool,
    },
}

/// Where a wasm module comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModuleSource {
    ConfigMap { name: String, key: String, sha256: Option<String> },
    Url { url: String, sha256: String },
}

impl TaskWorkload {
    /// The runtime a node must offer to run this workload.
    pub fn runtime(&self) -> &'static str {
        match self {
            TaskWorkload::Wasm { .. } => kommune_proto::runtime::WASM,
            TaskWorkload::Exec { .. } => kommune_proto::runtime::EXEC,
            TaskWorkload::Container { .. } => kommune_proto::runtime::CONTAINER,
        }
    }

    /// The kind of work, for trust earned per workload (`Observation::workload`): the runtime
    /// and what it runs (the module's pinned digest, else where it comes from; the pinned image;
    /// the program), not the arguments, which differ per task.
    pub fn class(&self) -> String {
        match self {
            TaskWorkload::Wasm { source: ModuleSource::Url { sha256, .. }, .. } => format!("wasm:{sha256}"),
            TaskWorkload::Wasm { source: ModuleSource::ConfigMap { sha256: Some(sha256), .. }, .. } => format!("wasm:{sha256}"),
            TaskWorkload::Wasm { source: ModuleSource::ConfigMap { name, key, sha256: None }, .. } => format!("wasm:configmap/{name}/{key}"),
            TaskWorkload::Exec { command, .. } => format!("exec:{}", command.first().map_or("", String::as_str)),
            TaskWorkload::Container { image, .. } => format!("container:{image}"),
        }
    }
}

/// Why a spec cannot run. `reason` becomes the condition reason and the Event reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_class_names_what_runs_not_how_each_task_is_called() {
        let wasm = |source, args: &[&str]| TaskWorkload::Wasm { source, args: args.iter().map(|a| a.to_string()).collect(), env: vec![] };
        let url = || ModuleSource::Url { url: "https://x/m.wasm".into(), sha256: "ab".into() };
        assert_eq!(wasm(url(), &["1"]).class(), wasm(url(), &["2"]).class());
        assert_eq!(wasm(url(), &[]).class(), "wasm:ab");
        let cm = |sha256: Option<&str>| ModuleSource::ConfigMap { name: "m".into(), key: "k".into(), sha256: sha256.map(Into::into) };
        assert_eq!(wasm(cm(Some("cd")), &[]).class(), "wasm:cd");
        assert_eq!(wasm(cm(None), &[]).class(), "wasm:configmap/m/k");
        let exec = TaskWorkload::Exec { command: vec!["/bin/sh".into(), "-c".into(), "x".into()], env: vec![] };
        assert_eq!(exec.class(), "exec:/bin/sh");
        let image = "r/i@sha256:00".to_string();
        let container = TaskWorkload::Container { image: image.clone(), command: vec![], args: vec!["a".into()], env: vec![], network: false };
        assert_eq!(container.class(), format!("container:{image}"));
    }
}
