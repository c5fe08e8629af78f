//! The agent's own Prometheus metrics, served only when asked for (`run --metrics-listen`, a
//! local address): tasks finished by state and runtime, failures by reason, the result spool's
//! depth and the machine's availability. Labels are fixed names, never attempt or job ids.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::routing::get;
use kommune_proto::v1::{Assign, AttemptState, TaskUpdate, workload::Kind as WorkloadKind};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::status::AgentStatus;
use crate::tasks::Tasks;

type Labels<const N: usize> = [(&'static str, &'static str); N];

/// The agent's series; clones share them.
#[derive(Clone)]
pub struct AgentMetrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    finished: Family<Labels<2>, Counter>,
    failures: Family<Labels<1>, Counter>,
    running: Gauge,
    spool_depth: Gauge,
    availability: Family<Labels<1>, Gauge>,
    connected: Gauge,
}

/// Availability states, one of which is 1 at a time.
const STATES: [&str; 3] = ["available", "paused", "preempting"];

impl Default for AgentMetrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("kommune_agent");
        let inner = Inner {
            registry: Registry::default(),
            finished: Family::default(),
            failures: Family::default(),
            running: Gauge::default(),
            spool_depth: Gauge::default(),
            availability: Family::default(),
            connected: Gauge::default(),
        };
        r.register("tasks_finished", "Task attempts this agent finished, by state and runtime", inner.finished.clone());
        r.register("task_failures", "Failed task attempts, by reason (nonzero_exit, timeout, did_not_exit)", inner.failures.clone());
        r.register("tasks_running", "Task attempts running now", inner.running.clone());
        r.register("spool_depth", "Results kept until the operator acknowledges them", inner.spool_depth.clone());
        r.register("availability", "1 for the machine's current availability state (available, paused, preempting)", inner.availability.clone());
        r.register("connected", "1 while a session with the operator is open", inner.connected.clone());
        for state in STATES {
            let _ = inner.availability.get_or_create(&[("state", state)]);
        }
        AgentMetrics { inner: Arc::new(Inner { registry: r, ..inner }) }
    }
}

/// The runtime an assignment runs in, as a label.
pub fn runtime_of(a: &Assign) -> &'static str {
    match a.workload.as_ref().and_then(|w| w.kind.as_ref()) {
        Some(WorkloadKind::Wasm(_)) => kommune_proto::runtime::WASM,
        Some(WorkloadKind::Exec(_)) => kommune_proto::runtime::EXEC,
        Some(WorkloadKind::Container(_)) => kommune_proto::runtime::CONTAINER,
        None => "unknown",
    }
}

/// Why a failed attempt failed, from its result: a fixed set of names.
fn failure_reason(update: &TaskUpdate) -> &'static str {
    let Some(r) = &update.result else { return "did_not_exit" };
    if r.exit_code > 0 {
        "nonzero_exit"
    } else if r.message.contains("timed out") || r.message.contains("timeout") {
        "timeout"
    } else {
        "did_not_exit"
    }
}

impl AgentMetrics {
    /// An attempt of `runtime` ended with `update`.
    pub fn finished(&self, runtime: &'static str, update: &TaskUpdate) {
        let state = match AttemptState::try_from(update.state) {
            Ok(AttemptState::Succeeded) => "succeeded",
            Ok(AttemptState::Failed) => "failed",
            Ok(AttemptState::Cancelled) => "cancelled",
            Ok(AttemptState::Preempted) => "preempted",
            _ => "other",
        };
        self.inner.finished.get_or_create(&[("state", state), ("runtime", runtime)]).inc();
        if state == "failed" {
            self.inner.failures.get_or_create(&[("reason", failure_reason(update))]).inc();
        }
    }

    /// The exposition, with the gauges read now: running tasks and the spool from `tasks`,
    /// availability and connection from the status file `run` keeps in `state_dir`.
    pub fn render(&self, tasks: &Tasks, state_dir: &std::path::Path) -> String {
        let i = &self.inner;
        i.running.set(tasks.running_ids().len() as i64);
        i.spool_depth.set(tasks.unacknowledged().len() as i64);
        let status = AgentStatus::load(state_dir).unwrap_or_default();
        let now = if status.preempting {
            "preempting"
        } else if status.paused {
            "paused"
        } else {
            "available"
        };
        for state in STATES {
            i.availability.get_or_create(&[("state", state)]).set(i64::from(state == now));
        }
        i.connected.set(i64::from(status.connected));
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &i.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// The `/metrics` route over `tasks` and the agent's state directory.
pub fn router(tasks: Arc<Tasks>, state_dir: PathBuf) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let body = tasks.metrics().render(&tasks, &state_dir);
            async move { ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body) }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{ExecRuntime, WasmRuntime};
    use crate::tasks::{ModuleSource, Spool};
    use kommune_proto::v1;

    struct NoModules;
    #[tonic::async_trait]
    impl ModuleSource for NoModules {
        async fn fetch(&self, _: &str) -> Result<Vec<u8>, String> {
            Err("offline".into())
        }
    }

    fn exec(id: &str, script: &str) -> Assign {
        Assign {
            attempt_id: id.into(),
            job: "ns/j".into(),
            task_count: 1,
            workload: Some(v1::Workload {
                kind: Some(WorkloadKind::Exec(v1::ExecWorkload { command: vec!["/bin/sh".into(), "-c".into(), script.into()], env: Default::default() })),
            }),
            memory_bytes: 64 << 20,
            cpu_millis: 100,
            timeout_millis: 10_000,
            ..Default::default()
        }
    }

    /// GET /metrics over plain HTTP/1.1, as Prometheus would.
    async fn scrape(addr: std::net::SocketAddr) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).map(|v| v.trim().parse().unwrap()))
    }

    #[tokio::test]
    async fn the_listener_reports_tasks_failures_spool_and_availability() {
        let dir = tempfile::tempdir().unwrap();
        let (tasks, mut rx) =
            Tasks::new(WasmRuntime::new().unwrap(), ExecRuntime::new(true), Spool::open(dir.path().join("results")).unwrap(), dir.path().join("scratch"));
        tasks.assign(exec("u.0.1", "true"), Arc::new(NoModules));
        tasks.assign(exec("u.1.1", "exit 3"), Arc::new(NoModules));
        let mut wasm = exec("u.2.1", "");
        wasm.workload = Some(v1::Workload { kind: Some(WorkloadKind::Wasm(v1::WasmWorkload { module_sha256: "a".repeat(64), ..Default::default() })) });
        tasks.assign(wasm, Arc::new(NoModules));
        let mut ended = 0;
        while ended < 3 {
            if rx.recv().await.unwrap().state != AttemptState::Running as i32 {
                ended += 1;
            }
        }
        // The operator acknowledged one result; two wait in the spool.
        tasks.ack("u.0.1");
        AgentStatus { paused: true, connected: true, ..Default::default() }.save(dir.path()).unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(axum::serve(listener, router(tasks.clone(), dir.path().to_path_buf())).into_future());
        let text = scrape(addr).await;
        assert_eq!(value(&text, "kommune_agent_tasks_finished_total{state=\"succeeded\",runtime=\"exec\"}"), Some(1.0), "{text}");
        assert_eq!(value(&text, "kommune_agent_tasks_finished_total{state=\"failed\",runtime=\"exec\"}"), Some(1.0), "{text}");
        assert_eq!(value(&text, "kommune_agent_tasks_finished_total{state=\"failed\",runtime=\"wasm\"}"), Some(1.0), "{text}");
        assert_eq!(value(&text, "kommune_agent_task_failures_total{reason=\"nonzero_exit\"}"), Some(1.0), "{text}");
        assert_eq!(value(&text, "kommune_agent_task_failures_total{reason=\"did_not_exit\"}"), Some(1.0), "{text}");
        assert_eq!(value(&text, "kommune_agent_spool_depth"), Some(2.0), "{text}");
        assert_eq!(value(&text, "kommune_agent_tasks_running"), Some(0.0), "{text}");
        assert_eq!(value(&text, "kommune_agent_availability{state=\"paused\"}"), Some(1.0), "{text}");
        assert_eq!(value(&text, "kommune_agent_availability{state=\"available\"}"), Some(0.0), "{text}");
        assert_eq!(value(&text, "kommune_agent_connected"), Some(1.0), "{text}");
    }
}
