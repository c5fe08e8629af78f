//! The agent's spans of an attempt, children of the operator's Assign span through the trace
//! context the Assign carries; created only while traces are exported (kommune-telemetry).

use kommune_proto::v1;

/// The span of one attempt (fetch, run, report), parented to the operator's span that sent
/// `assign` when it carries a usable trace context.
pub(super) fn attempt_span(assign: &v1::Assign) -> tracing::Span {
    let id: String = assign.attempt_id.chars().take(128).collect();
    let span = kommune_telemetry::span!("attempt", attempt = %id, job = %assign.job, task_index = assign.task_index, runtime = runtime_of(assign));
    let parent = assign.trace.as_ref().map(|t| kommune_telemetry::TraceParent { traceparent: t.traceparent.clone(), tracestate: t.tracestate.clone() });
    kommune_telemetry::set_remote_parent(&span, parent.as_ref());
    span
}

/// `span`'s trace context for a TaskUpdate, so the operator's result spans continue the trace.
pub(super) fn context(span: &tracing::Span) -> Option<v1::TraceContext> {
    kommune_telemetry::context_of(span).map(|t| v1::TraceContext { traceparent: t.traceparent, tracestate: t.tracestate })
}

fn runtime_of(assign: &v1::Assign) -> &'static str {
    match assign.workload.as_ref().and_then(|w| w.kind.as_ref()) {
        Some(v1::workload::Kind::Wasm(_)) => "wasm",
        Some(v1::workload::Kind::Exec(_)) => "exec",
        Some(v1::workload::Kind::Container(_)) => "container",
        None => "none",
    }
}
