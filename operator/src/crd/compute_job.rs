//! `ComputeJob`: a batch of independent tasks to run on provider machines, like an Indexed Job
//! whose pods land on volunteer hardware instead of cluster nodes.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::TaintEffect;
pub use kommune_core::job::{JobPhase, TaskCounts};

/// A batch of independent tasks to run on Kommune provider machines. Each task gets its index
/// (0..tasks) in `KOMMUNE_TASK_INDEX`; the job succeeds when every index has succeeded once
/// (with `placement.replicas`, once with every copy agreeing).
// kube's printcolumn(...) expands to repeated attributes, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kommune.dev",
    version = "v1alpha1",
    kind = "ComputeJob",
    namespaced,
    status = "ComputeJobStatus",
    shortname = "cj",
    shortname = "cjob",
    category = "kommune",
    doc = "A batch of independent tasks to run on Kommune provider machines.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Pending, Running, Succeeded or Failed"),
    printcolumn(name = "Done", type_ = "string", json_path = ".status.progress", description = "Succeeded tasks / total tasks"),
    printcolumn(name = "Runtime", type_ = "string", json_path = ".status.runtime", priority = "1", description = "Runtime the tasks need"),
    printcolumn(name = "Cost", type_ = "string", json_path = ".status.usage.cost", priority = "1", description = "Credits metered so far"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ComputeJobSpec {
    /// What each task runs: exactly one of `wasm`, `exec` or `container`.
    pub workload: Workload,

    /// Number of independent tasks (indexes 0..tasks). Defaults to 1.
    #[serde(default = "default_tasks")]
    #[schemars(range(min = 1, max = 1000000))]
    pub tasks: u32,

    /// Maximum number of tasks running at the same time. Defaults to all of them. With
    /// `placement.replicas`, a task counts once however many replicas it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub parallelism: Option<u32>,

    /// Resources each task needs on a provider; a task is only placed where they fit.
    #[serde(default)]
    pub resources: Resources,

    /// Where tasks may run: node selector, tolerations, architecture, OS, minimum reputation,
    /// data locality and the number of replicas per task.
    #[serde(default, skip_serializing_if = "Placement::is_default")]
    pub placement: Placement,

    /// Priority against other jobs waiting for room: higher goes first. Between jobs of equal
    /// priority in different namespaces, room is shared by namespace weight (fair share).
    /// Defaults to 0. A job is ranked at most at what the cluster admin grants its namespace
    /// (0 unless granted; a PriorityCapped Event says so).
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,

    /// How often a failed task is tried again.
    #[serde(default)]
    pub retries: Retries,

    /// Time limits for each task and for the whole job.
    #[serde(default)]
    pub timeouts: Timeouts,

    /// Pause the job: running attempts are cancelled (they do not count against retries) and
    /// nothing new is placed until this is set back to false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,

    /// What the job may spend, in credits. Providers are paid from the usage their agents
    /// measure and sign, at the cluster's rates or a provider's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<JobPricing>,

    /// How results are checked before they are accepted and paid: `none`, `replicate`,
    /// `spotCheck` or `adaptive`. See docs/VERIFICATION.md.
    #[serde(default, skip_serializing_if = "crate::crd::VerificationSpec::is_default")]
    pub verification: crate::crd::VerificationSpec,
    /// Files fetched into each attempt's `/scratch/in` before the task starts, each verified
    /// by its sha256 (shared by all tasks, or per task with `{index}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub inputs: Vec<super::JobInput>,

    /// What each attempt uploads when it ends: its stdout, its stderr and the declared files
    /// or directories under `/scratch/out`, bounded and digested, to the operator's store
    /// (default) or the job's S3 bucket. Unset: nothing beyond the result's tails is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<super::JobOutputs>,

    /// Allows env values from Secrets (`env[].valueFrom.secretKeyRef`). Whatever a task
    /// receives (args, env, inputs) is visible to the provider that runs it: setting this says
    /// that the providers running this job may see those Secret values. Without it, a job whose
    /// env names a Secret fails with `SecretEnvNotAllowed` and nothing is placed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expose_secrets_to_providers: bool,

    /// Seconds after the job finished (Succeeded or Failed) when the ComputeJob is deleted,
    /// its outputs with it, as for Kubernetes Jobs. Unset: kept until deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,
}

/// Spending limits of a job. Amounts are decimal strings of credits with at most 6 decimals.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobPricing {
    /// The most the whole job may cost, e.g. "25" or "0.5". No new task is placed when what
    /// was metered so far plus the worst case of every running task and of the next one
    /// (all reserved CPU and memory busy for the whole task timeout, at the node's rates)
    /// could exceed it; the job then reports `BudgetExhausted` in its `Scheduled` condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]{1,6})?$"))]
    pub budget: Option<String>,
    /// The most one task may cost per hour on a provider, e.g. "0.05": its reserved CPU,
    /// memory and GPUs fully used, at that provider's rates. Dearer providers are not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]{1,6})?$"))]
    pub max_price_per_hour: Option<String>,
}

fn default_tasks() -> u32 {
    1
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// Where a job's tasks may run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Labels a ProviderNode must carry (all of them, with these values) to run the tasks, like
    /// a Pod's nodeSelector. The agent's region and zone appear as
    /// `topology.kubernetes.io/region` and `topology.kubernetes.io/zone`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub node_selector: BTreeMap<String, String>,

    /// Taints of ProviderNodes (`spec.taints`) the tasks tolerate; a tainted node takes only
    /// tasks that tolerate every one of its taints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,

    /// CPU architecture the node must have: x86_64 (alias amd64) or aarch64 (alias arm64).
    /// Any when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub arch: Option<String>,

    /// Operating system the node must run: linux, macos or windows. Any when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub os: Option<String>,

    /// Lowest node reputation accepted, a decimal string from "0" to "1" with at most three
    /// decimals ("0.8"). A node's reputation is (succeeded + 1) / (finished + 2) over its
    /// finished attempts, shown in ProviderNode status. Any when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(0(\.[0-9]{1,3})?|1(\.0{1,3})?)$"))]
    pub min_reputation: Option<String>,

    /// Where the job's input data lives; nodes in that zone, then that region, are preferred.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_locality: Option<DataLocality>,

    /// Copies of each task run for verification, each on a distinct provider with a distinct
    /// owner (so they cannot collude). Defaults to 1. All copies of one attempt are placed
    /// together or not at all, and the attempt succeeds only when every copy succeeds with the
    /// same exit code and output sha256; there is no majority vote (two of three agreeing is a
    /// disagreement too). A disagreement, or a copy that fails or is lost, fails the attempt
    /// (the other copies are cancelled) and counts against `retries.maxAttempts`; a copy that
    /// is preempted or cancelled makes the attempt start over without using a retry.
    /// Disagreements are reported in the `Verified` condition with the nodes and results.
    /// Each copy uses the job's resources and is metered and paid for. Copies see the same
    /// environment and task identity (`KOMMUNE_ATTEMPT_ID` is the first copy's). Means
    /// `verification: {mode: replicate, replicas: R, quorum: R, maxReplicas: R}` (every copy
    /// must agree) unless `spec.verification` sets a mode, which then decides the copies. Not for exec tasks, whose output is not deterministic.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 16))]
    pub replicas: u32,
}

fn default_replicas() -> u32 {
    1
}

impl Default for Placement {
    fn default() -> Self {
        Placement {
            node_selector: BTreeMap::new(),
            tolerations: vec![],
            arch: None,
            os: None,
            min_reputation: None,
            data_locality: None,
            replicas: default_replicas(),
        }
    }
}

impl Placement {
    fn is_default(&self) -> bool {
        *self == Placement::default()
    }
}

/// A toleration of ProviderNode taints, as in a Pod spec.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("self.operator != 'Exists' || !has(self.value) || self.value == ''").message("a toleration with operator Exists must not set a value"))]
#[x_kube(validation = Rule::new("self.operator != 'Equal' || (has(self.key) && self.key != '')").message("a toleration with operator Equal needs a key"))]
#[serde(rename_all = "camelCase")]
pub struct Toleration {
    /// Taint key this toleration applies to; empty with operator Exists tolerates every taint.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 253))]
    pub key: String,
    /// Equal (key and value must match; the default) or Exists (key must match).
    #[serde(default)]
    pub operator: TolerationOperator,
    /// Taint value to match with operator Equal.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 63))]
    pub value: String,
    /// Taint effect to match; every effect when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<TaintEffect>,
}

/// How a toleration matches a taint.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TolerationOperator {
    /// Key and value equal the taint's.
    #[default]
    Equal,
    /// Key equals the taint's (or is empty: any key); the value is ignored.
    Exists,
}

/// Where a job's input data lives.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataLocality {
    /// Region of the inputs, compared with a node's `topology.kubernetes.io/region`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub region: Option<String>,
    /// Zone of the inputs, compared with a node's `topology.kubernetes.io/zone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub zone: Option<String>,
}

/// What each task runs. Exactly one field must be set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("[has(self.wasm), has(self.exec), has(self.container)].exists_one(x, x)").message("workload must set exactly one of wasm, exec or container"))]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// A WebAssembly (WASI preview 1) command module: sandboxed, portable, deterministic. The
    /// recommended runtime for untrusted providers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm: Option<WasmWorkload>,

    /// A plain command run on the provider's machine. Only providers that started their agent
    /// with `--allow-exec` run it; meant for trusted fleets and development.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecWorkload>,

    /// A container image pinned by digest, run through Docker or Podman with no privileges, no
    /// capabilities, a read-only root filesystem and no network. Only providers that started
    /// their agent with `--container-socket` run it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerWorkload>,
}

/// A WASI command module, from a ConfigMap in the job's namespace or from a URL pinned by digest.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.url) != has(self.configMapRef)").message("wasm must set exactly one of url or configMapRef"))]
#[x_kube(validation = Rule::new("!has(self.url) || has(self.sha256)").message("wasm.url requires wasm.sha256 so agents can verify what they download"))]
#[serde(rename_all = "camelCase")]
pub struct WasmWorkload {
    /// The module in a ConfigMap's `binaryData` in the job's namespace (up to ~1 MiB). The
    /// operator hands it to agents by its sha256 digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<ConfigMapKeyRef>,

    /// An https URL agents download the module from (for large modules). Requires `sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub url: Option<String>,

    /// Lowercase hex sha256 of the module. Required with `url`; with `configMapRef` it is
    /// optional and, when set, checked against the ConfigMap's content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,

    /// Arguments passed to the module after argv[0].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub args: Vec<String>,

    /// Environment variables for the module; `KOMMUNE_TASK_INDEX`, `KOMMUNE_TASK_COUNT` and
    /// `KOMMUNE_ATTEMPT_ID` are always added.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub env: Vec<EnvVar>,
}

/// A key of a ConfigMap in the job's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ConfigMapKeyRef {
    /// Name of the ConfigMap.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the ConfigMap's `binaryData` (or `data`).
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A command run directly on providers that opted in with `--allow-exec`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecWorkload {
    /// The program and its arguments (argv). No shell is involved unless you name one.
    #[schemars(length(min = 1, max = 256))]
    pub command: Vec<String>,

    /// Environment variables; the process gets only these, a minimal PATH and `KOMMUNE_*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub env: Vec<EnvVar>,
}

/// A container image, pinned by digest.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerWorkload {
    /// Image reference pinned by digest, `name@sha256:<64 hex>`: a tag can be moved to other
    /// content, a digest cannot, so an image without one is refused at admission. The task's
    /// scratch directory is mounted at `/scratch`.
    #[schemars(length(min = 1, max = 1024), regex(pattern = kommune_proto::PINNED_IMAGE_PATTERN))]
    pub image: String,
    /// Overrides the image entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Arguments to the entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Asks for network access (default: none). The provider must also allow it
    /// (`--allow-container-network`); otherwise the task runs without a network.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub network: bool,
}

/// An environment variable: a value, or a key of a Secret (`valueFrom.secretKeyRef`). The
/// provider that runs the task sees every value it is given.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("!(has(self.value) && has(self.valueFrom))").message("an env entry sets value or valueFrom, not both"))]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    /// Variable name.
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub name: String,
    /// Variable value (empty when omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32768))]
    pub value: Option<String>,
    /// Takes the value from a key of a Secret in the job's namespace instead. The provider
    /// that runs the task sees the value (it can read the task's environment and memory), so
    /// this is allowed only when the job sets `spec.exposeSecretsToProviders: true`, and only
    /// from Secrets labelled `kommune.dev/expose-to-providers: "true"` by whoever may edit them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<EnvVarSource>,
}

/// Where an environment variable's value comes from.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvVarSource {
    /// A key of a Secret in the job's namespace.
    pub secret_key_ref: SecretKeySelector,
}

/// A key of a Secret in the job's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct SecretKeySelector {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret's `data`.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Resources one task needs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// CPU per task, as a Kubernetes quantity ("250m", "2"). Defaults to 250m.
    #[serde(default = "default_cpu")]
    pub cpu: Quantity,
    /// Memory per task, as a Kubernetes quantity ("64Mi", "1Gi"); the task's hard memory cap.
    /// Defaults to 128Mi.
    #[serde(default = "default_memory")]
    pub memory: Quantity,
    /// Scratch disk per task, as a quantity ("10Gi"). Only nodes that report at least this much
    /// free ephemeral storage take the task. None by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_storage: Option<Quantity>,
    /// GPUs per task. None by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuResources>,
}

impl Default for Resources {
    fn default() -> Self {
        Resources { cpu: default_cpu(), memory: default_memory(), ephemeral_storage: None, gpu: None }
    }
}

/// GPUs one task needs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuResources {
    /// Number of GPU devices. Defaults to 1.
    #[serde(default = "default_gpu_count")]
    #[schemars(range(min = 1, max = 64))]
    pub count: u32,
    /// GPU model pattern, a case-insensitive glob: `*` matches any run of characters, `?` one
    /// ("a100*", "*4090"). Any model when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub model: Option<String>,
    /// Least memory each GPU must have, as a quantity ("40Gi"). Any when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_memory: Option<Quantity>,
}

fn default_gpu_count() -> u32 {
    1
}

fn default_cpu() -> Quantity {
    Quantity("250m".into())
}

fn default_memory() -> Quantity {
    Quantity("128Mi".into())
}

/// Retry policy for failed tasks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Attempts per task before the task, and with it the job, fails. Defaults to 3. With
    /// replicas, one attempt runs every copy once.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles for each further attempt, up to 10 minutes.
    /// Defaults to 5.
    #[serde(default = "default_backoff")]
    #[schemars(range(max = 3600))]
    pub backoff_seconds: u32,
}

impl Default for Retries {
    fn default() -> Self {
        Retries { max_attempts: default_max_attempts(), backoff_seconds: default_backoff() }
    }
}

fn default_max_attempts() -> u32 {
    3
}

fn default_backoff() -> u32 {
    5
}

/// Time limits.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// Wall-clock limit for one task attempt, in seconds; an attempt past it is stopped and
    /// counts as failed. Defaults to 3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub task_seconds: Option<u32>,
    /// Wall-clock limit for the whole job from its first placement, in seconds; past it the
    /// job fails with reason `DeadlineExceeded` and its running attempts are cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2592000))]
    pub job_seconds: Option<u32>,
}

/// Observed state of a ComputeJob. A summary: it stays small for any number of tasks.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComputeJobStatus {
    /// Pending, Running, Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Kubernetes-style conditions: `Valid`, `Scheduled`, `Succeeded`, `Failed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Task counts by state.
    #[serde(default)]
    pub tasks: TaskCounts,
    /// "succeeded/total", for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Runtime the tasks need (wasm, exec, container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// Succeeded task indexes as compact ranges, e.g. "0-3,7".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_indexes: Option<String>,
    /// Task indexes that used up their attempts, as compact ranges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_indexes: Option<String>,
    /// sha256 of the wasm module the tasks run, once resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_sha256: Option<String>,
    /// When the first task was placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job reached Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The most recent task results (at most 16), newest first, with bounded output tails.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_results: Vec<TaskResultSummary>,
    /// Usage and cost metered so far, from the providers' signed receipts in the ledger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<JobUsage>,
    /// How the finished tasks' results were verified and what verification cost (present when
    /// results are compared or sampled: `spec.verification` or `placement.replicas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<JobVerification>,
}

/// How a job's results were verified.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobVerification {
    /// Task counts by how they were verified, and the extra copies run.
    #[serde(flatten)]
    pub counts: kommune_core::job::phase::VerificationCounts,
    /// Extra copies per succeeded task, in percent, e.g. "12.5".
    pub overhead_percent: String,
    /// Tasks whose copies returned different results (at most 8): the task, the attempt and
    /// each node's answer; an outvoted result is neither accepted nor paid.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disputes: Vec<String>,
}

/// Metered usage of a job, summed over the accepted receipts of its attempts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobUsage {
    /// Receipts accepted into the ledger (one per finished attempt).
    pub receipts: u64,
    /// CPU time, in seconds (3 decimals).
    pub cpu_seconds: String,
    /// Wall time of all attempts, in seconds (3 decimals).
    pub wall_seconds: String,
    /// Memory integrated over time, in GiB-hours (6 decimals).
    pub memory_gib_hours: String,
    /// Wasm fuel consumed (about one unit per wasm instruction).
    #[serde(default)]
    pub wasm_fuel: u64,
    /// Output written, in bytes.
    #[serde(default)]
    pub output_bytes: u64,
    /// What it cost, in credits.
    pub cost: String,
    /// The job's budget, when it has one, in credits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<String>,
}

/// The outcome of one finished task attempt.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskResultSummary {
    /// Task index.
    pub index: u32,
    /// Attempt number of this task, from 1.
    pub attempt: u32,
    /// Which copy of the attempt (`placement.replicas`), from 0; absent for 0.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub replica: u32,
    /// ProviderNode that ran it.
    pub node: String,
    /// Exit code; -1 when the task did not exit on its own.
    pub exit_code: i32,
    /// sha256 of the task's complete stdout.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output_sha256: String,
    /// The end of stdout (at most 256 bytes, lossy UTF-8).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stdout_tail: String,
    /// Why the attempt failed, if it did.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}
