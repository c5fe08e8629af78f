//! `spec.verification` of a ComputeJob: how its results are checked before they are accepted
//! and paid (modes none, replicate, spotCheck, adaptive; see docs/VERIFICATION.md).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How results are verified. Copies of a task run on providers with distinct owners and see
/// the same task identity (`KOMMUNE_ATTEMPT_ID` is the task's first copy's id), so an honest
/// deterministic task returns the same answer everywhere. Compared: the exit code, the digest
/// of stdout and (later) of the declared `outputs`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerificationSpec {
    /// `none` (default: the first result is accepted; with `placement.replicas: R > 1` this is
    /// `replicate` with replicas = quorum = maxReplicas = R, every copy must agree),
    /// `replicate` (every task runs `replicas` copies; the first `quorum` matching results
    /// win; copies that disagree or are lost are made up on other owners up to `maxReplicas`,
    /// after which the round fails with a ResultsDisagree condition and is retried),
    /// `spotCheck` (a random `fraction` of results, drawn by the operator after the result
    /// arrived, is re-run on another owner; on a mismatch a third copy breaks the tie and the
    /// outvoted result is neither accepted nor paid), or `adaptive` (a result is re-run unless
    /// its provider has a long run of agreed results on this workload and no outvote on
    /// record; trust grows with the run, new and caught providers are always checked).
    #[serde(default)]
    pub mode: VerificationMode,
    /// `replicate`: copies each task starts with (2..16). Defaults to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 16))]
    pub replicas: Option<u32>,
    /// `replicate`: matching results that verify a task (2..replicas). Defaults to
    /// `replicas` (unanimity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 16))]
    pub quorum: Option<u32>,
    /// Most copies one round may grow to (replicas..16). Defaults to `replicas + 1` for
    /// `replicate`, 3 for `spotCheck` and `adaptive`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 16))]
    pub max_replicas: Option<u32>,
    /// `spotCheck`: the share of results checked, e.g. "0.1" (0 to 1). Required there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(0(\.[0-9]{1,6})?|1(\.0{1,6})?)$"))]
    pub fraction: Option<String>,
}

/// A verification mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum VerificationMode {
    #[default]
    None,
    Replicate,
    SpotCheck,
    Adaptive,
}

impl VerificationSpec {
    pub fn is_default(&self) -> bool {
        self == &VerificationSpec::default()
    }
}
