//! Wire conversion: the agent protocol's messages to and from the dispatcher's domain types,
//! bounding everything an agent sends before it is stored.

use kommune_proto::v1;

use super::{ModuleRef, lost};
use crate::attempt::{Attempt, AttemptPhase, AttemptResult};
use crate::fleet::SendError;
use crate::job::{JobPolicy, TaskWorkload};

/// Longest output tail kept per stream.
pub const TAIL_LIMIT: usize = 4096;
const MESSAGE_LIMIT: usize = 1024;

/// What an agent's reported attempt state means for the attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reported {
    Running,
    /// It ended in this phase.
    Ended(AttemptPhase),
    /// A state this operator does not know (a newer or broken agent).
    Unknown,
}

/// Reads a TaskUpdate's `state`.
pub(super) fn reported(state: i32) -> Reported {
    match v1::AttemptState::try_from(state).unwrap_or(v1::AttemptState::Unspecified) {
        v1::AttemptState::Running => Reported::Running,
        v1::AttemptState::Succeeded => Reported::Ended(AttemptPhase::Succeeded),
        v1::AttemptState::Failed => Reported::Ended(AttemptPhase::Failed),
        v1::AttemptState::Cancelled => Reported::Ended(AttemptPhase::Cancelled),
        // The provider took its machine back: re-placed without using a retry, but counted
        // against the node for this job (`job::conduct`).
        v1::AttemptState::Preempted => Reported::Ended(AttemptPhase::Preempted),
        v1::AttemptState::Unspecified => Reported::Unknown,
    }
}

/// At most 128 characters of an id an agent sent, for logs.
pub(crate) fn short(s: &str) -> String {
    s.chars().take(128).collect()
}

/// Copies a result from an agent, bounding every field.
pub(super) fn bounded_result(r: Option<&v1::TaskResult>) -> AttemptResult {
    let Some(r) = r else { return lost("the agent sent no result") };
    let tail = |b: &[u8]| b[b.len().saturating_sub(TAIL_LIMIT)..].to_vec();
    AttemptResult {
        exit_code: r.exit_code,
        output_sha256: if kommune_proto::is_sha256_hex(&r.output_sha256) { r.output_sha256.clone() } else { String::new() },
        output_bytes: r.output_bytes,
        stdout_tail: tail(&r.stdout_tail),
        stderr_tail: tail(&r.stderr_tail),
        message: r.message.chars().take(MESSAGE_LIMIT).collect(),
        wall_millis: r.wall_millis,
        // Filled in by the dispatcher from what it stored itself (`outputs::collected`).
        outputs: vec![],
    }
}

/// The protocol's form of `span`'s trace context; None unless traces are exported.
pub fn trace_context(span: &tracing::Span) -> Option<v1::TraceContext> {
    kommune_telemetry::context_of(span).map(|t| v1::TraceContext { traceparent: t.traceparent, tracestate: t.tracestate })
}

/// The span that records an agent's result: a child of the agent's span of the attempt (the
/// update's trace context), so the task's trace continues across the operator. The context is
/// the agent's word, used for diagnostics only: a provider can at worst misfile its own
/// attempts' operator spans.
pub fn result_span(node: &str, update: &v1::TaskUpdate) -> tracing::Span {
    let span = kommune_telemetry::span!("result", node = %node, attempt = %short(&update.attempt_id), state = update.state);
    let parent = update.trace.as_ref().map(|t| kommune_telemetry::TraceParent { traceparent: t.traceparent.clone(), tracestate: t.tracestate.clone() });
    kommune_telemetry::set_remote_parent(&span, parent.as_ref());
    span
}

/// The Cancel message for an attempt.
pub(super) fn cancel_message(attempt_id: &str, reason: &str) -> v1::operator_message::Kind {
    v1::operator_message::Kind::Cancel(v1::Cancel { attempt_id: attempt_id.to_string(), reason: reason.to_string() })
}

/// The Assign message for an attempt.
pub fn assign_message(a: &Attempt, policy: &JobPolicy, module: Option<&ModuleRef>) -> v1::Assign {
    let workload = match &policy.workload {
        TaskWorkload::Wasm { args, env, .. } => {
            let m = module.cloned().unwrap_or(ModuleRef { sha256: String::new(), url: None });
            v1::workload::Kind::Wasm(v1::WasmWorkload {
                module_sha256: m.sha256,
                url: m.url.unwrap_or_default(),
                args: args.clone(),
                env: env.iter().cloned().collect(),
            })
        }
        TaskWorkload::Exec { command, env } => v1::workload::Kind::Exec(v1::ExecWorkload { command: command.clone(), env: env.iter().cloned().collect() }),
        TaskWorkload::Container { image, command, args, env, network } => v1::workload::Kind::Container(v1::ContainerWorkload {
            image: image.clone(),
            command: command.clone(),
            args: args.clone(),
            env: env.iter().cloned().collect(),
            network: *network,
        }),
    };
    v1::Assign {
        attempt_id: a.id.clone(),
        job: a.job_key.clone(),
        task_index: a.index,
        task_count: policy.tasks,
        workload: Some(v1::Workload { kind: Some(workload) }),
        memory_bytes: policy.memory_bytes,
        cpu_millis: policy.cpu_millis,
        timeout_millis: policy.task_timeout.as_millis() as u64,
        gpus: policy.gpu.count,
        trace: None,
        // Every copy of a round sees the round's first id, so their outputs can match.
        task_identity: crate::attempt::attempt_id(&a.job_uid, a.index, a.number),
        inputs: task_inputs(policy, a.index),
        outputs: policy.outputs.as_ref().map(|o| super::outputs::plan(a, o, policy.task_timeout)),
    }
}

/// How long a presigned input URL stays valid: the agent fetches inputs as soon as it is
/// assigned, so an hour covers a slow start without leaving a long-lived URL about.
const INPUT_URL_VALIDITY: std::time::Duration = std::time::Duration::from_secs(3600);

/// The inputs of task `index`, `{index}` resolved and S3 objects presigned. An input that
/// cannot be presigned (its Secret not read: the controller does not sync such a job) is sent
/// without a source, so the agent fails the attempt naming it rather than the operator
/// dropping it silently.
fn task_inputs(policy: &JobPolicy, index: u32) -> Vec<v1::InputFile> {
    use kommune_core::job::InputSource;
    policy
        .inputs
        .iter()
        .filter_map(|input| input.for_task(index))
        .map(|t| {
            let url = match t.source {
                InputSource::Url(_) => t.location.clone(),
                InputSource::ConfigMap { .. } => String::new(),
                InputSource::S3(o) => super::presign::get(o, &t.location, INPUT_URL_VALIDITY).unwrap_or_else(|e| format!("unsigned:{e}")),
            };
            v1::InputFile { path: t.path, sha256: t.sha256.to_string(), url }
        })
        .collect()
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::NotConnected => write!(f, "no session"),
            SendError::Full => write!(f, "session queue full"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attempt::attempt_id;
    use crate::dispatch::fixtures::exec_policy;

    #[test]
    fn a_container_job_is_assigned_with_its_image_command_and_network_wish() {
        let image = format!("busybox@sha256:{}", "a".repeat(64));
        let workload = TaskWorkload::Container {
            image: image.clone(),
            command: vec!["sh".into(), "-c".into()],
            args: vec!["echo $A".into()],
            env: vec![("A".into(), "b".into())],
            network: true,
        };
        let policy = JobPolicy { workload, ..exec_policy(3, 500) };
        let attempt = Attempt {
            id: attempt_id("uid", 2, 1),
            job_uid: "uid".into(),
            job_key: "ns/job".into(),
            index: 2,
            number: 1,
            replica: 0,
            node: "n1".into(),
            phase: AttemptPhase::Assigned,
            cpu_millis: 500,
            memory_bytes: 64 << 20,
            held: None,
            created_ms: 0,
            finished_ms: None,
            result: None,
        };
        let assign = assign_message(&attempt, &policy, None);
        assert_eq!((assign.task_index, assign.task_count, assign.cpu_millis, assign.memory_bytes, assign.timeout_millis), (2, 3, 500, 64 << 20, 60_000));
        let expected = v1::ContainerWorkload {
            image,
            command: vec!["sh".into(), "-c".into()],
            args: vec!["echo $A".into()],
            env: [("A".to_owned(), "b".to_owned())].into(),
            network: true,
        };
        assert_eq!(assign.workload.and_then(|w| w.kind), Some(v1::workload::Kind::Container(expected)));
        let copy = Attempt { id: crate::attempt::replica_attempt_id("uid", 2, 1, 2), replica: 2, ..attempt };
        let assign = assign_message(&copy, &policy, None);
        assert_eq!((assign.attempt_id.as_str(), assign.task_identity), (copy.id.as_str(), attempt_id("uid", 2, 1)), "copies share the task identity");
    }

    #[test]
    fn reported_states_map_to_phases_and_a_preemption_reads_as_a_cancel() {
        use v1::AttemptState as S;
        let cases = [
            (S::Running as i32, Reported::Running),
            (S::Succeeded as i32, Reported::Ended(AttemptPhase::Succeeded)),
            (S::Failed as i32, Reported::Ended(AttemptPhase::Failed)),
            (S::Cancelled as i32, Reported::Ended(AttemptPhase::Cancelled)),
            (S::Preempted as i32, Reported::Ended(AttemptPhase::Preempted)),
            (S::Unspecified as i32, Reported::Unknown),
            (999, Reported::Unknown),
        ];
        for (state, want) in cases {
            assert_eq!(reported(state), want, "state {state}");
        }
    }
}
