//! `KOMMUNE_BENCH_TRACES`: what the bench's process does with spans. Unset: no subscriber at
//! all (the default, comparable with older runs); `logs`: the binaries' setup with traces off
//! (log lines at INFO to stderr); `otlp`: traces exported to an in-process OTLP sink that counts them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kommune_telemetry::{Guard, Traces};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};

/// Counts the spans it is sent and keeps none.
#[derive(Clone, Default)]
struct Sink(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(&self, request: tonic::Request<ExportTraceServiceRequest>) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request.into_inner().resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
        self.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// The bench's telemetry; keep it for the whole run. `runtime` serves the sink.
pub struct BenchTraces {
    pub mode: String,
    guard: Option<Guard>,
    exported: Arc<AtomicU64>,
    _runtime: Option<tokio::runtime::Runtime>,
}

impl BenchTraces {
    pub fn from_env() -> BenchTraces {
        let mode = std::env::var("KOMMUNE_BENCH_TRACES").unwrap_or_default();
        let exported = Arc::new(AtomicU64::new(0));
        let (guard, runtime) = match mode.as_str() {
            "" => (None, None),
            "logs" => (Some(kommune_telemetry::init_with("kommune-bench", Traces::Off)), None),
            "otlp" => {
                let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("otlp-sink").enable_all().build().unwrap();
                let sink = Sink(exported.clone());
                let guard = rt.block_on(async {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                    let addr = listener.local_addr().unwrap();
                    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                    tokio::spawn(tonic::transport::Server::builder().add_service(TraceServiceServer::new(sink)).serve_with_incoming(incoming));
                    kommune_telemetry::init_with("kommune-bench", Traces::Endpoint(format!("http://{addr}")))
                });
                assert!(kommune_telemetry::exporting(), "KOMMUNE_BENCH_TRACES=otlp: no exporter was installed");
                (Some(guard), Some(rt))
            }
            other => panic!("KOMMUNE_BENCH_TRACES={other:?}: expected logs or otlp"),
        };
        BenchTraces { mode, guard, exported, _runtime: runtime }
    }

    /// Spans the sink received so far, after a flush (0 unless exporting).
    pub fn exported(&self) -> u64 {
        if let Some(g) = &self.guard {
            g.flush();
        }
        self.exported.load(Ordering::Relaxed)
    }
}
