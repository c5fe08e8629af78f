//! Prometheus metrics in the text exposition format, plus the health endpoints, on one small
//! HTTP server (`--metrics-listen`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::get;

use crate::fleet::Fleet;

/// Counters the operator exposes.
#[derive(Default)]
pub struct Metrics {
    reconciles: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    pub fn reconciled(&self) {
        self.reconciles.fetch_add(1, Ordering::Relaxed);
    }

    pub fn reconcile_error(&self, label: &'static str) {
        *self.errors.lock().unwrap_or_else(|p| p.into_inner()).entry(label).or_default() += 1;
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self, fleet: &Fleet) -> String {
        let mut out = String::new();
        out.push_str("# HELP kommune_reconciles_total ComputeJob reconciles started.\n# TYPE kommune_reconciles_total counter\n");
        out.push_str(&format!("kommune_reconciles_total {}\n", self.reconciles.load(Ordering::Relaxed)));
        out.push_str("# HELP kommune_reconcile_errors_total ComputeJob reconciles that failed, by step.\n# TYPE kommune_reconcile_errors_total counter\n");
        for (label, n) in self.errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            out.push_str(&format!("kommune_reconcile_errors_total{{error=\"{label}\"}} {n}\n"));
        }
        out.push_str("# HELP kommune_agent_sessions Agent sessions open on this operator.\n# TYPE kommune_agent_sessions gauge\n");
        out.push_str(&format!("kommune_agent_sessions {}\n", fleet.connected().len()));
        out
    }
}

/// The `/metrics`, `/healthz` and `/readyz` routes. `/readyz` answers 503 while `ready` is
/// false (a standby replica), so a Service sends agents only to the leader.
pub fn router(metrics: Arc<Metrics>, fleet: Arc<Fleet>, ready: Arc<std::sync::atomic::AtomicBool>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let body = metrics.render(&fleet);
                async move { body }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move { if ready { (axum::http::StatusCode::OK, "ok") } else { (axum::http::StatusCode::SERVICE_UNAVAILABLE, "standby: not the leader") } }
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters() {
        let m = Metrics::default();
        m.reconciled();
        m.reconciled();
        m.reconcile_error("kube");
        let text = m.render(&Fleet::default());
        assert!(text.contains("kommune_reconciles_total 2\n"));
        assert!(text.contains("kommune_reconcile_errors_total{error=\"kube\"} 1\n"));
        assert!(text.contains("kommune_agent_sessions 0\n"));
    }
}
