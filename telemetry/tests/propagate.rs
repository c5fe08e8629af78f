//! Trace context in and out of spans with an exporter installed (its own test binary: the
//! subscriber is global). What an agent sends is untrusted: bad contexts are ignored, not parsed into a parent.

use kommune_telemetry::{TraceParent, Traces, context_of, set_remote_parent};
use opentelemetry::trace::TraceContextExt as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

fn trace_id(span: &tracing::Span) -> String {
    span.context().span().span_context().trace_id().to_string()
}

#[tokio::test]
async fn a_context_crosses_by_value_and_bad_ones_are_ignored() {
    // Nothing listens there: spans are only buffered, which is all this test needs.
    let _guard = kommune_telemetry::init_with("propagate-test", Traces::Endpoint("http://127.0.0.1:9".into()));
    assert!(kommune_telemetry::exporting());

    let sender = kommune_telemetry::span!("assign");
    let carried = context_of(&sender).expect("an exported span has a context");
    assert!(carried.traceparent.starts_with("00-") && carried.traceparent.len() == 55, "{carried:?}");

    let receiver = kommune_telemetry::span!("attempt");
    assert!(set_remote_parent(&receiver, Some(&carried)));
    assert_eq!(trace_id(&receiver), trace_id(&sender), "the child joins the sender's trace");

    let bad = [
        TraceParent { traceparent: "00-zz-yy-01".into(), tracestate: String::new() },
        TraceParent { traceparent: "00-00000000000000000000000000000000-b7ad6b7169203331-01".into(), tracestate: String::new() },
        TraceParent { traceparent: format!("{}{}", carried.traceparent, "x".repeat(2000)), tracestate: String::new() },
        TraceParent { traceparent: carried.traceparent.clone(), tracestate: "k=v,".repeat(1000) },
    ];
    for parent in &bad {
        let span = kommune_telemetry::span!("result");
        assert!(!set_remote_parent(&span, Some(parent)), "{:.80}", parent.traceparent);
        assert_ne!(trace_id(&span), trace_id(&sender), "an ignored context starts a trace of its own");
    }
    assert!(!set_remote_parent(&kommune_telemetry::span!("none"), None));
}
