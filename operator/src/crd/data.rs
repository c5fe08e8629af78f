//! A ComputeJob's data path: `spec.inputs`, the files each task gets in `/scratch/in`, from a
//! URL, a ConfigMap of the job's namespace or an S3-compatible bucket; `spec.outputs`, what
//! each attempt leaves in `/scratch/out` and where it is kept.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ConfigMapKeyRef;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// A file fetched into every attempt's `/scratch/in/<path>` before the task starts (for exec
/// tasks `in/<path>` under their working directory). Whatever a task receives is visible to
/// the provider that runs it: do not put secrets in inputs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("[has(self.url), has(self.configMapRef), has(self.s3)].exists_one(x, x)").message("an input must set exactly one of url, configMapRef or s3"))]
#[x_kube(validation = Rule::new("has(self.sha256) != (has(self.sha256PerTask) && size(self.sha256PerTask) > 0)").message("an input must set exactly one of sha256 or sha256PerTask"))]
#[serde(rename_all = "camelCase")]
pub struct JobInput {
    /// Where the file goes, relative to `/scratch/in/`. `{index}` is replaced by the task
    /// index, e.g. `shard-{index}.csv`.
    #[schemars(length(min = 1, max = 1024))]
    pub path: String,

    /// An http(s) URL agents download the file from (public addresses only, unless the
    /// provider allows more). May hold `{index}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub url: Option<String>,

    /// A key of a ConfigMap in the job's namespace (up to ~1 MiB in all), stored and served by
    /// the operator like a wasm module. The key may hold `{index}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<ConfigMapKeyRef>,

    /// An object in an S3-compatible bucket, fetched with a GET URL the operator presigns for
    /// each attempt: the provider never sees the credentials. The key may hold `{index}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Location>,

    /// Lowercase hex sha256 of the file every task gets. An attempt whose download does not
    /// match fails before the task starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,

    /// For per-task inputs (`{index}` in the path or source): the sha256 of each task's file,
    /// one per task in index order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10000))]
    pub sha256_per_task: Vec<String>,
}

/// An object, or a key prefix, in an S3-compatible bucket, with the Secret holding the keys.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Location {
    /// The service endpoint, e.g. `https://s3.eu-west-1.amazonaws.com` or a MinIO URL.
    #[schemars(length(min = 1, max = 2048))]
    pub endpoint: String,
    /// The bucket.
    #[schemars(length(min = 1, max = 63))]
    pub bucket: String,
    /// The object key; may hold `{index}`.
    // No `default: ''` in the schema: API servers before about 1.22 refuse an empty-string
    // default as null, and then refuse the whole CRD.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 1024))]
    pub key: String,
    /// The bucket's region. Defaults to us-east-1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub region: Option<String>,
    /// Address objects as `endpoint/bucket/key` (MinIO and most S3-compatible servers) rather
    /// than `bucket.endpoint/key`. Defaults to true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
    /// A Secret of the job's namespace of type `kommune.dev/s3-credentials` with the keys
    /// `accessKeyId` and `secretAccessKey`. Its type is the Secret owner's consent: the
    /// operator signs with no other Secret, so naming a Secret in a job does not let the job's
    /// author use credentials that were not meant for jobs.
    pub secret_ref: SecretName,
}

/// A Secret of the job's namespace, by name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct SecretName {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// What each attempt uploads when it ends (`spec.outputs`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobOutputs {
    /// Files or directories under `/scratch/out` (for exec tasks `out/` under their working
    /// directory) to upload, e.g. `result.csv` or `plots`. Stdout and stderr are always
    /// uploaded. A declared path the task did not write is simply absent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub paths: Vec<String>,

    /// Which declared paths count in verification: copies whose files differ disagree. Defaults
    /// to all of `paths`; `[]` counts none (stdout always counts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub verify: Option<Vec<String>>,

    /// Most bytes one output may have ("16Mi"); what a task writes beyond it is not uploaded and
    /// is reported as excess in the result. Defaults to 64Mi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_file_size: Option<Quantity>,

    /// Most bytes all outputs of one attempt may have together, stdout and stderr included.
    /// Defaults to 256Mi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempt_size: Option<Quantity>,

    /// Most files one attempt may upload, stdout and stderr included. Defaults to 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 1024))]
    pub max_files: Option<u32>,

    /// Upload to this S3-compatible bucket instead of the operator's store: `key` is the prefix
    /// under which `<job uid>/<task index>/<attempt>/<name>` is written, with PUT URLs the
    /// operator presigns per attempt (the provider never sees the credentials). Only declared
    /// files, not directories, can go to a bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Location>,
}
