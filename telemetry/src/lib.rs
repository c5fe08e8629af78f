//! Telemetry for Kommune binaries: `tracing` logs filtered by `RUST_LOG` (default `info`), and
//! OpenTelemetry traces exported over OTLP/gRPC only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Flushes buffered spans when dropped; keep it alive for the life of `main`.
pub struct Guard {
    provider: Option<SdkTracerProvider>,
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

/// Installs the global subscriber for `service` (e.g. "kommune-operator"). Logs go to stderr.
/// An OTLP exporter that cannot be built is reported and skipped, never fatal.
pub fn init(service: &'static str) -> Guard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false).with_ansi(ansi);
    let (provider, otel, problem) = if otlp_enabled() {
        match opentelemetry_otlp::SpanExporter::builder().with_tonic().build() {
            Ok(exporter) => {
                let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
                let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
                let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer(service)).boxed();
                (Some(provider), Some(layer), None)
            }
            Err(e) => (None, None, Some(e.to_string())),
        }
    } else {
        (None, None, None)
    };
    let _ = tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init();
    if let Some(p) = problem {
        tracing::warn!(error = %p, "OTLP trace export is disabled: cannot build the exporter");
    } else if provider.is_some() {
        tracing::info!("exporting traces over OTLP");
    }
    Guard { provider }
}
