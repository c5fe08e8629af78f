//! The agent's spans of an attempt, children of the operator's Assign span through the trace
//! context the Assign carries; created only while traces are exported (kommune-telemetry).

use kommune_proto::v1;

/// The span of one attempt (fetch, run, report), parented to the operator's span that sent
/// `assign` when it carries a usable trace context.
pub(super) fn attempt_span(assign: &v1::Assign) -> tracing::Span {
    let span = kommune_telemetry::span!(
        "attempt",
        attempt = %assign.attempt_id.chars().take(128).collect::<String>(),
        job = %assign.job,
        task_index = assign.task_index,
        runtime = runtime_of(assign)
    );
    let parent = assign.trace.as_ref().map(|t| kommune_telemetry::TraceParent { traceparent: t.traceparent.clone(), tracestate: t.tracestate.clone() });
    kommune_telemetry::set_remote_parent(&span, parent.as_ref());
    span
}

/// The trace context a terminal update carries, so the operator's result spans continue the
/// task's trace: the agent's `attempt` span when this agent exports spans, otherwise the
/// Assign's own context echoed back (the result then hangs under the operator's Assign span,
/// and a provider that exports nothing does not split the operator's trace in two).
pub(super) fn for_result(attempt: &tracing::Span, assign: &v1::Assign) -> Option<v1::TraceContext> {
    kommune_telemetry::context_of(attempt).map(|t| v1::TraceContext { traceparent: t.traceparent, tracestate: t.tracestate }).or_else(|| assign.trace.clone())
}

fn runtime_of(assign: &v1::Assign) -> &'static str {
    match assign.workload.as_ref().and_then(|w| w.kind.as_ref()) {
        Some(v1::workload::Kind::Wasm(_)) => "wasm",
        Some(v1::workload::Kind::Exec(_)) => "exec",
        Some(v1::workload::Kind::Container(_)) => "container",
        None => "none",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kommune_proto::v1::{self, AttemptState};

    use crate::runtime::{ExecRuntime, WasmRuntime};
    use crate::tasks::{ModuleSource, Spool, Tasks};

    struct NoModules;
    #[tonic::async_trait]
    impl ModuleSource for NoModules {
        async fn fetch(&self, _: &str) -> Result<Vec<u8>, String> {
            Err("offline".into())
        }
    }

    #[tokio::test]
    async fn an_agent_that_exports_nothing_echoes_the_assigns_trace_context_in_its_result() {
        assert!(!kommune_telemetry::exporting());
        let dir = tempfile::tempdir().unwrap();
        let (tasks, mut rx) =
            Tasks::new(WasmRuntime::new().unwrap(), ExecRuntime::new(true), Spool::open(dir.path().join("results")).unwrap(), dir.path().join("scratch"));
        let trace = v1::TraceContext { traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(), tracestate: "k=v".into() };
        let exec = v1::ExecWorkload { command: vec!["/bin/true".into()], env: Default::default() };
        let assign = v1::Assign {
            attempt_id: "t.0.1".into(),
            workload: Some(v1::Workload { kind: Some(v1::workload::Kind::Exec(exec)) }),
            memory_bytes: 64 << 20,
            trace: Some(trace.clone()),
            ..Default::default()
        };
        tasks.assign(assign, Arc::new(NoModules));
        let running = rx.recv().await.unwrap();
        assert_eq!((running.state, running.trace), (AttemptState::Running as i32, None));
        let done = rx.recv().await.unwrap();
        assert_eq!(done.state, AttemptState::Succeeded as i32, "{:?}", done.result);
        assert_eq!(done.trace, Some(trace), "the result carries the operator's context back");
        // Spooled with it, so a result resent after a restart still joins the task's trace.
        assert_eq!(tasks.unacknowledged().first().and_then(|u| u.trace.clone()), done.trace);
    }
}
