//! The operator's Prometheus metrics (a `prometheus-client` registry, OpenMetrics text) and the
//! health endpoints, on one small HTTP server (`--metrics-listen`).
//!
//! Label sets are bounded: a result, a phase, a runtime, a rule name; never a job, task,
//! attempt or node name, so the number of series does not grow with the pool. The series and
//! what they mean are listed in docs/OPERATIONS.md, "Metrics".

mod data;
pub mod exposition;
mod series;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

use crate::fleet::Fleet;
pub use series::{Series, snake_case};

/// What Prometheus is told the body is: OpenMetrics text, which `prometheus-client` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The operator's metrics: every series, the registry that renders them, and the data
/// directory whose files are measured at scrape time.
pub struct Metrics {
    registry: Registry,
    series: Series,
    data_dir: OnceLock<PathBuf>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kommune");
        let series = Series::register(&mut registry);
        Metrics { registry, series, data_dir: OnceLock::new() }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl std::ops::Deref for Metrics {
    type Target = Series;
    fn deref(&self) -> &Series {
        &self.series
    }
}

impl Metrics {
    /// Measures the store's and the blobs' files under `dir` at every scrape (the first call
    /// wins: one operator has one data directory).
    pub fn watch_data_dir(&self, dir: PathBuf) {
        let _ = self.data_dir.set(dir);
    }

    /// Renders every metric in the OpenMetrics text format. Gauges that are cheap to read at
    /// scrape time (connected agents, file sizes) are read now rather than kept up to date.
    pub fn render(&self, fleet: &Fleet) -> String {
        self.series.agents_connected.set(fleet.connected().len() as i64);
        if let Some(dir) = self.data_dir.get() {
            let sizes = data::measure(dir);
            self.series.store_size_bytes.set(sizes.store_bytes as i64);
            self.series.blobs_size_bytes.set(sizes.blob_bytes as i64);
            self.series.blobs.set(sizes.blobs as i64);
        }
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug in a label value.
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// The `/metrics`, `/healthz` and `/readyz` routes. `/readyz` answers 503 while `ready` is
/// false (a standby replica), so a Service sends agents only to the leader.
pub fn router(metrics: Arc<Metrics>, fleet: Arc<Fleet>, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let body = metrics.render(&fleet);
                async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], body) }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move { if ready { (StatusCode::OK, "ok") } else { (StatusCode::SERVICE_UNAVAILABLE, "standby: not the leader") } }
            }),
        )
}

#[cfg(test)]
mod tests;
