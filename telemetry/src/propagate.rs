//! W3C trace context (`traceparent`, `tracestate`) in and out of `tracing` spans, so one task's
//! spans form one trace across the operator and its agents. Both ends treat it as untrusted text.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Longest header value read from the wire: a `traceparent` is 55 characters, and W3C caps
/// `tracestate` at 32 members of a few hundred bytes; anything longer is ignored.
const MAX_HEADER: usize = 1024;

/// A span's W3C trace context, as carried in the agent protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceParent {
    pub traceparent: String,
    pub tracestate: String,
}

/// The trace context of `span`, or None when spans are not exported or the span is disabled.
pub fn context_of(span: &tracing::Span) -> Option<TraceParent> {
    if !crate::exporting() || span.is_disabled() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut headers = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut headers);
    let traceparent = headers.remove("traceparent")?;
    Some(TraceParent { traceparent, tracestate: headers.remove("tracestate").unwrap_or_default() })
}

/// Makes the remote span `parent` names the parent of `span`, which must not have been entered
/// yet. A missing, malformed or oversized context leaves `span` where it was (a new trace, or
/// under the current span); returns whether the parent was taken.
pub fn set_remote_parent(span: &tracing::Span, parent: Option<&TraceParent>) -> bool {
    let Some(p) = parent.filter(|p| p.traceparent.len() <= MAX_HEADER && p.tracestate.len() <= MAX_HEADER) else { return false };
    if !crate::exporting() || span.is_disabled() {
        return false;
    }
    let mut headers = HashMap::with_capacity(2);
    headers.insert("traceparent".to_string(), p.traceparent.clone());
    if !p.tracestate.is_empty() {
        headers.insert("tracestate".to_string(), p.tracestate.clone());
    }
    let cx = TraceContextPropagator::new().extract(&headers);
    if !cx.span().span_context().is_valid() {
        return false;
    }
    span.set_parent(cx).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_exporter_spans_carry_no_context_and_take_no_parent() {
        let span = tracing::info_span!("x");
        assert_eq!(context_of(&span), None);
        let parent = TraceParent { traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(), tracestate: String::new() };
        assert!(!set_remote_parent(&span, Some(&parent)));
    }

    #[test]
    fn a_malformed_traceparent_is_not_a_context() {
        let cx = TraceContextPropagator::new().extract(&HashMap::from([("traceparent".to_string(), "00-zz-yy-01".to_string())]));
        assert!(!cx.span().span_context().is_valid());
    }
}
