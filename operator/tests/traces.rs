//! One task's life is one OpenTelemetry trace across operator and agent: an in-process OTLP
//! collector receives the spans of a task run through the real gateway and a real agent.

#[allow(dead_code)]
#[path = "support/operator.rs"]
mod harness;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::*;
use kommune_operator::dispatch::ModuleRef;
use kommune_telemetry::Traces;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct Received {
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: HashMap<String, String>,
}

/// An OTLP/gRPC trace collector that keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(&self, request: tonic::Request<ExportTraceServiceRequest>) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut kept = self.0.lock().unwrap();
        for span in request.into_inner().resource_spans.into_iter().flat_map(|r| r.scope_spans).flat_map(|s| s.spans) {
            let attributes = span
                .attributes
                .into_iter()
                .map(|kv| {
                    let v = match kv.value.and_then(|v| v.value) {
                        Some(Value::StringValue(s)) => s,
                        Some(Value::IntValue(i)) => i.to_string(),
                        Some(Value::BoolValue(b)) => b.to_string(),
                        other => format!("{other:?}"),
                    };
                    (kv.key, v)
                })
                .collect();
            kept.push(Received { name: span.name, trace_id: span.trace_id, span_id: span.span_id, parent_span_id: span.parent_span_id, attributes });
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    async fn serve(&self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)));
        addr
    }

    fn spans(&self) -> Vec<Received> {
        self.0.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tasks_spans_form_one_trace_across_operator_and_agent() {
    let collector = Collector::default();
    let addr = collector.serve().await;
    // Operator and agent share this process, so one explicitly configured exporter serves both.
    let telemetry = Arc::new(kommune_telemetry::init_with("kommune-trace-test", Traces::Endpoint(format!("http://{addr}"))));
    assert!(kommune_telemetry::exporting());

    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let _agent = join_agent(&op, dir.path(), "traced-pc", false).await;
    wait_connected(&op, &["traced-pc"]).await;
    let sha = op.store_module("traced-job", &hello_module());
    let wasm = policy("workload:\n  wasm:\n    configMapRef: {name: m, key: module.wasm}\n    args: ['100']\nresources: {cpu: 250m, memory: 64Mi}\n");
    let done = op.run_to_end(&job("traced-job"), &wasm, Some(&ModuleRef { sha256: sha, url: None })).await;
    let attempt = done.attempts[0].id.clone();

    // The Ack is the last span of the task: wait until it has been exported.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let t = telemetry.clone();
        tokio::task::spawn_blocking(move || t.flush()).await.unwrap();
        let spans = collector.spans();
        if spans.iter().any(|s| s.name == "ack" && s.attributes.get("attempt") == Some(&attempt)) {
            break spans;
        }
        assert!(tokio::time::Instant::now() < deadline, "no ack span for {attempt} among {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let assign = one(&spans, "assign", &attempt);
    let trace: Vec<&Received> = spans.iter().filter(|s| s.trace_id == assign.trace_id).collect();
    let named = |name: &str| -> &Received {
        let found: Vec<_> = trace.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "one {name} span in the task's trace: {:?}", trace.iter().map(|s| &s.name).collect::<Vec<_>>());
        found[0]
    };
    let parent_of = |child: &Received| -> &str { trace.iter().find(|s| s.span_id == child.parent_span_id).map_or("<none in this trace>", |s| s.name.as_str()) };
    // Operator: sync (the reconcile's work) → place → assign.
    let sync = named("sync");
    assert!(sync.parent_span_id.is_empty(), "sync is the root here (the controller's reconcile span is its parent in a cluster)");
    let place = named("place");
    assert_eq!(parent_of(place), "sync");
    assert_eq!(place.attributes.get("tasks_placed").map(String::as_str), Some("1"));
    assert_eq!(parent_of(assign), "place");
    assert_eq!(assign.attributes.get("node").map(String::as_str), Some("traced-pc"));
    assert_eq!(assign.attributes.get("job").map(String::as_str), Some("default/traced-job"));
    assert_eq!(assign.attributes.get("task_index").map(String::as_str), Some("0"));
    // Agent: its attempt is a child of the operator's Assign, carried in the protocol.
    let agent = named("attempt");
    assert_eq!(agent.parent_span_id, assign.span_id, "the agent's attempt span's parent is the operator's assign span");
    assert_eq!(agent.attributes.get("attempt"), Some(&attempt));
    for step in ["fetch", "run", "report"] {
        assert_eq!(parent_of(named(step)), "attempt", "{step}");
    }
    // Operator again: the result continues from the agent's attempt (carried in TaskUpdate).
    let result = named("result");
    assert_eq!(result.parent_span_id, agent.span_id, "the operator's result span's parent is the agent's attempt span");
    assert_eq!(parent_of(named("on_update")), "result");
    assert_eq!(parent_of(named("record")), "on_update");
    assert_eq!(parent_of(named("receipt")), "on_update");
    let ack = named("ack");
    assert_eq!(parent_of(ack), "result");
    assert_eq!(ack.attributes.get("receipt_rejected").map(String::as_str), Some("false"));
}

fn one<'a>(spans: &'a [Received], name: &str, attempt: &str) -> &'a Received {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name && s.attributes.get("attempt").map(String::as_str) == Some(attempt)).collect();
    assert_eq!(found.len(), 1, "one {name} span for {attempt}");
    found[0]
}
