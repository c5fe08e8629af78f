//! Telemetry for Kommune binaries: `tracing` logs filtered by `RUST_LOG` (default `info`), and
//! OpenTelemetry traces exported over OTLP/gRPC only when an endpoint is configured.

mod propagate;

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use self::propagate::{TraceParent, context_of, set_remote_parent};

#[doc(hidden)]
pub mod __private {
    pub use tracing;
}

/// Set once an OTLP exporter is installed. The task-lifecycle spans ([`span!`]) are created
/// only then, so without a collector the hot path pays one relaxed load per span site.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported over OTLP (an exporter was installed by [`init`] or [`init_with`]).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// An INFO span that exists only while spans are exported; otherwise `Span::none()`, which
/// costs nothing to enter, record into or drop. Same syntax as `tracing::info_span!`.
#[macro_export]
macro_rules! span {
    ($($args:tt)*) => {
        if $crate::exporting() {
            $crate::__private::tracing::info_span!($($args)*)
        } else {
            $crate::__private::tracing::Span::none()
        }
    };
}

/// Flushes buffered spans when dropped; keep it alive for the life of `main`.
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Guard {
    /// Exports every span ended so far, waiting for the collector's answer. Blocks: call it
    /// outside async code (or in `spawn_blocking`).
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            let _ = p.force_flush();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// True when traces should be exported (the standard OTLP endpoint variables are set).
pub fn otlp_enabled() -> bool {
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"].iter().any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// Where traces go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Traces {
    /// Not exported: no exporter, no task-lifecycle spans.
    Off,
    /// To the endpoint the standard `OTEL_EXPORTER_OTLP_*` variables name.
    FromEnv,
    /// To this OTLP/gRPC endpoint (e.g. `http://127.0.0.1:4317`), whatever the environment says.
    Endpoint(String),
}

/// Installs the global subscriber for `service` (e.g. "kommune-operator"). Logs go to stderr;
/// traces are exported when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set.
/// An OTLP exporter that cannot be built is reported and skipped, never fatal. Must be called
/// inside a tokio runtime when the endpoint is set (the gRPC channel is made on it).
pub fn init(service: &'static str) -> Guard {
    init_with(service, if otlp_enabled() { Traces::FromEnv } else { Traces::Off })
}

/// [`init`] with the trace destination given explicitly (tests point the operator and the
/// agents of one process at an in-process collector this way).
pub fn init_with(service: &'static str, traces: Traces) -> Guard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // RUST_LOG filters the log lines only: the exported spans are INFO and above whatever it says.
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false).with_ansi(ansi).with_filter(filter);
    let (provider, problem) = match exporter(&traces) {
        None => (None, None),
        Some(Ok(exporter)) => {
            let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
            (Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build()), None)
        }
        Some(Err(e)) => (None, Some(e.to_string())),
    };
    let otel = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)).with_filter(LevelFilter::INFO));
    let installed = tracing_subscriber::registry().with(fmt).with(otel).try_init().is_ok();
    if installed && provider.is_some() {
        EXPORTING.store(true, Ordering::Relaxed);
        tracing::info!("exporting traces over OTLP");
    }
    if let Some(p) = problem {
        tracing::warn!(error = %p, "OTLP trace export is disabled: cannot build the exporter");
    }
    Guard { provider: provider.filter(|_| installed) }
}

fn exporter(traces: &Traces) -> Option<Result<opentelemetry_otlp::SpanExporter, opentelemetry_otlp::ExporterBuildError>> {
    let builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    match traces {
        Traces::Off => None,
        Traces::FromEnv => Some(builder.build()),
        Traces::Endpoint(url) => Some(builder.with_endpoint(url.clone()).build()),
    }
}
