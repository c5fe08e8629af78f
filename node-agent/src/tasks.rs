//! The attempts this agent runs. Independent of sessions: tasks keep running while the agent
//! reconnects, and every finished attempt is spooled to disk until the operator acknowledges
//! it, so neither a dropped connection nor an agent restart loses a result.

pub mod inputs;
pub mod outputs;
mod table;
mod trace;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kommune_proto::STAGE_TARGET;
use kommune_proto::v1::{self, AttemptState, Gpu, TaskResult, TaskUpdate, workload::Kind as WorkloadKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info, trace, warn};

use self::table::TaskTable;
use crate::fetch::UrlPolicy;
use crate::receipts::Receipts;
use crate::runtime::{AttemptContext, ContainerRuntime, Ending, ExecRuntime, Outcome, WasmRuntime};
pub use crate::spool::Spool;
use crate::spool::file_name;

/// Largest module downloaded from a URL.
/// CPU a task gets when its assignment names none (an operator older than the field): one core.
const DEFAULT_CPU_MILLIS: u64 = 1000;

/// Where wasm modules come from when they are not cached: the operator, by digest.
#[tonic::async_trait]
pub trait ModuleSource: Send + Sync + 'static {
    async fn fetch(&self, sha256: &str) -> Result<Vec<u8>, String>;

    /// Uploads the first `size` bytes of `path` as output `name` of `attempt` to the operator
    /// (`excess` more were not sent); returns the sha256 the operator computed.
    async fn upload(&self, attempt: &str, name: &str, path: &std::path::Path, size: u64, excess: u64) -> Result<String, String> {
        let _ = (attempt, name, path, size, excess);
        Err("this agent has no connection to upload outputs over".into())
    }
}

/// Runs attempts and reports their updates.
pub struct Tasks {
    /// Running attempts, their GPUs and preemption, under one lock.
    table: Mutex<TaskTable>,
    /// Shared with the blocking threads that compile modules.
    wasm: Arc<WasmRuntime>,
    exec: ExecRuntime,
    /// None unless the agent was given an engine socket.
    container: Option<ContainerRuntime>,
    spool: Spool,
    /// Signs usage receipts; unset, terminal updates carry none (tests of other parts).
    receipts: OnceLock<Receipts>,
    scratch_root: PathBuf,
    /// Verified input files by digest, next to the scratch directories (which the agent
    /// empties at start; the cache survives restarts).
    input_cache: inputs::InputCache,
    /// What wasm module URLs may reach; unset: public addresses only.
    url_policy: OnceLock<UrlPolicy>,
    // Unbounded: at most two updates per assigned attempt, and the operator bounds assignments.
    updates: mpsc::UnboundedSender<TaskUpdate>,
    /// Counted whether or not `run --metrics-listen` serves them: a counter is cheap.
    metrics: crate::metrics::AgentMetrics,
    /// One lock per module being fetched and compiled: the attempts of a module not cached yet
    /// wait for one fetch and one compilation instead of each doing both (600 attempts of a new
    /// module assigned at once were 600 downloads and 600 compilations, minutes of CPU).
    loading: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Tasks {
    pub fn new(wasm: WasmRuntime, exec: ExecRuntime, spool: Spool, scratch_root: PathBuf) -> (Arc<Tasks>, mpsc::UnboundedReceiver<TaskUpdate>) {
        Self::with_container(wasm, exec, None, spool, scratch_root)
    }

    /// Like [`Tasks::new`], also running `container` workloads when `container` is set.
    pub fn with_container(
        wasm: WasmRuntime,
        exec: ExecRuntime,
        container: Option<ContainerRuntime>,
        spool: Spool,
        scratch_root: PathBuf,
    ) -> (Arc<Tasks>, mpsc::UnboundedReceiver<TaskUpdate>) {
        let (updates, rx) = mpsc::unbounded_channel();
        let tasks = Tasks {
            table: Mutex::default(),
            wasm: Arc::new(wasm),
            exec,
            container,
            spool,
            receipts: OnceLock::new(),
            input_cache: inputs::InputCache::new(scratch_root.with_file_name("input-cache"), inputs::DEFAULT_CACHE_BYTES),
            scratch_root,
            url_policy: OnceLock::new(),
            updates,
            metrics: Default::default(),
            loading: Mutex::default(),
        };
        (Arc::new(tasks), rx)
    }

    /// What module URLs may reach (set once, before the first assignment; public addresses
    /// only when never set).
    pub fn set_url_policy(&self, policy: UrlPolicy) {
        let _ = self.url_policy.set(policy);
    }

    /// The GPUs container tasks may be given (what the agent offers).
    pub fn offer_gpus(&self, gpus: &[Gpu]) {
        self.table().offer_gpus(gpus);
    }

    /// The provider needs the machine back: stops every running attempt and hands it back to
    /// the operator as PREEMPTED (not a failure of the task), and hands back new assignments
    /// at once, until [`Tasks::stop_preempting`].
    pub fn preempt_all(&self, reason: &str) {
        self.table().preempt_all(reason);
    }

    /// Takes assignments again after [`Tasks::preempt_all`].
    pub fn stop_preempting(&self) {
        self.table().stop_preempting();
    }

    /// A poisoned lock only means a panic elsewhere; the table is still usable.
    fn table(&self) -> std::sync::MutexGuard<'_, TaskTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attempts this agent knows: running, or finished and not yet acknowledged (for Hello).
    pub fn known_ids(&self) -> Vec<String> {
        let mut ids = self.table().ids();
        ids.extend(self.spool.ids());
        ids.sort();
        ids.dedup();
        ids
    }

    /// Ids of attempts running right now (for Heartbeat).
    pub fn running_ids(&self) -> Vec<String> {
        self.table().ids()
    }

    /// What running attempts wrote since the last call, as LogChunks for the operator's live
    /// view: at most `budget` bytes (the rest waits for the next call, nothing is skipped).
    pub fn live_chunks(&self, mut budget: usize) -> Vec<v1::LogChunk> {
        let logs = self.table().live_logs();
        logs.iter().flat_map(|(id, live)| live.take(id, &mut budget)).collect()
    }

    /// Finished attempts not yet acknowledged, to resend after (re)connecting.
    pub fn unacknowledged(&self) -> Vec<TaskUpdate> {
        self.spool.all()
    }

    /// From now on every terminal update carries a usage receipt signed by `receipts`. Set
    /// once, before the first assignment; a second call is ignored.
    pub fn sign_receipts(&self, receipts: Receipts) {
        let _ = self.receipts.set(receipts);
    }

    /// The operator recorded this attempt's result (and its receipt).
    pub fn ack(self: &Arc<Self>, attempt_id: &str) {
        self.acknowledge(&v1::Ack { attempt_id: attempt_id.to_string(), ..Default::default() });
    }

    /// The operator recorded this attempt's result and says what became of its receipt: the
    /// verdict goes to the receipt log (for `kommune-agent earnings`), and once that is on disk
    /// the spooled update is dropped (the log's thread does it, so the session never waits on
    /// the disk; until then a resend of the result is harmless, as the operator acknowledges
    /// it again).
    pub fn acknowledge(self: &Arc<Self>, ack: &v1::Ack) {
        if !ack.receipt_rejected.is_empty() {
            warn!(attempt = %ack.attempt_id, reason = %ack.receipt_rejected, "the operator rejected this attempt's usage receipt");
        }
        let (Some(receipts), Some(update)) = (self.receipts.get(), self.spool.get(&ack.attempt_id)) else {
            self.spool.remove(&ack.attempt_id);
            return;
        };
        let (tasks, id) = (self.clone(), ack.attempt_id.clone());
        receipts.acknowledged_then(
            &update,
            ack,
            Box::new(move |written| {
                if let Err(e) = written {
                    warn!(attempt = %id, error = %e, "cannot record the acknowledged receipt for `earnings`");
                }
                tasks.spool.remove(&id);
            }),
        );
    }

    /// Stops an attempt if it is running.
    pub fn cancel(&self, attempt_id: &str) {
        if self.table().cancel(attempt_id) {
            info!(attempt = attempt_id, "cancelling");
        }
    }

    /// The agent's metrics (`run --metrics-listen`).
    pub fn metrics(&self) -> &crate::metrics::AgentMetrics {
        &self.metrics
    }

    /// Starts an attempt. Idempotent by attempt id: a repeated Assign for a running attempt is
    /// ignored, and one for a finished attempt re-sends its result.
    pub fn assign(self: &Arc<Self>, assign: v1::Assign, modules: Arc<dyn ModuleSource>) {
        let id = assign.attempt_id.clone();
        if file_name(&id).is_none() {
            warn!(attempt = %id.chars().take(64).collect::<String>(), "assignment with an unusable attempt id ignored");
            return;
        }
        // One lookup, not a scan of the whole spool for every assignment.
        if let Some(done) = self.spool.get(&id) {
            let _ = self.updates.send(done);
            return;
        }
        let cancel = CancellationToken::new();
        if !self.table().start(&id, cancel.clone()) {
            return;
        }
        let me = self.clone();
        let span = trace::attempt_span(&assign);
        let attempt_span = span.clone();
        let run = async move {
            let _ = me.updates.send(TaskUpdate { attempt_id: id.clone(), state: AttemptState::Running as i32, result: None, receipt: None, trace: None });
            info!(attempt = %id, job = %assign.job, index = assign.task_index, "attempt started");
            let started_ms = kommune_proto::now_ms();
            let refused = me.table().refuse_while_preempting(&id);
            let outcome = match refused {
                Some(reason) => Outcome::not_started(reason),
                None => {
                    trace!(target: STAGE_TARGET, attempt = %id, "task starting");
                    let outcome = me.execute(&assign, modules, cancel).await;
                    trace!(target: STAGE_TARGET, attempt = %id, "task ended");
                    outcome
                }
            };
            let preempted = me.table().ended(&id);
            // Entered only while nothing is awaited: the spool's fsync is waited for after it.
            let report = kommune_telemetry::span!("report", ending = ?outcome.ending, exit = outcome.exit_code).entered();
            let mut update = terminal_update(&id, &assign.job, &outcome, preempted.as_deref(), me.receipts.get(), started_ms);
            update.trace = trace::for_result(&attempt_span, &assign);
            // Sent while its spool write is in flight, not after: a crash before the write is
            // durable loses no more than a crash before sending would have (and the operator
            // may already have it); the Ack cannot overtake the queued write.
            me.metrics.finished(crate::metrics::runtime_of(&assign), &update);
            let durable = me.spool.begin_put(&update);
            me.table().remove(&id);
            info!(attempt = %id, ending = ?outcome.ending, exit = outcome.exit_code, "attempt finished");
            let _ = me.updates.send(update);
            drop(report);
            let spooled = match durable {
                Ok(durable) => durable.await,
                Err(e) => Err(e),
            };
            match spooled {
                Ok(()) => trace!(target: STAGE_TARGET, attempt = %id, "result spooled"),
                Err(e) => warn!(attempt = %id, error = %e, "cannot spool the result; it is sent but will not survive a restart"),
            }
        };
        tokio::spawn(run.instrument(span));
    }

    async fn execute(&self, a: &v1::Assign, modules: Arc<dyn ModuleSource>, cancel: CancellationToken) -> Outcome {
        let kind = a.workload.as_ref().and_then(|w| w.kind.as_ref());
        let gpus = match (a.gpus, kind) {
            (0, _) => vec![],
            (n, Some(WorkloadKind::Container(_))) => match self.table().take_gpus(&a.attempt_id, n) {
                Ok(devices) => devices,
                Err(message) => return Outcome::not_started(message),
            },
            (n, _) => return Outcome::not_started(format!("the task asks for {n} GPU(s), but GPUs are given to container tasks only")),
        };
        let scratch = self.scratch_root.join(&a.attempt_id);
        if let Err(e) = std::fs::create_dir_all(&scratch) {
            return Outcome::not_started(format!("cannot create scratch directory {}: {e}", scratch.display()));
        }
        let url_policy = *self.url_policy.get().unwrap_or(&UrlPolicy::default());
        if let Err(message) = inputs::stage(&a.inputs, &scratch, &self.input_cache, modules.as_ref(), url_policy).await {
            let _ = std::fs::remove_dir_all(&scratch);
            return Outcome::not_started(message);
        }
        let timeout = (a.timeout_millis > 0).then(|| Duration::from_millis(a.timeout_millis));
        let mut ctx = AttemptContext {
            attempt_id: a.attempt_id.clone(),
            task_identity: a.task_identity.clone(),
            task_index: a.task_index,
            task_count: a.task_count,
            memory_bytes: a.memory_bytes,
            cpu_millis: if a.cpu_millis == 0 { DEFAULT_CPU_MILLIS } else { a.cpu_millis },
            timeout,
            scratch_dir: scratch.clone(),
            env: vec![],
            keep_streams: None,
            live: self.table().live(&a.attempt_id),
        };
        // Full copies of stdout and stderr go next to the scratch directory, out of the task's reach.
        let streams = self.scratch_root.join(format!("{}.streams", a.attempt_id));
        if let Some(plan) = &a.outputs {
            match std::fs::create_dir_all(&streams) {
                Ok(()) => ctx.keep_streams = Some((streams.clone(), plan.max_file_bytes)),
                Err(e) => warn!(attempt = %a.attempt_id, error = %e, "cannot keep stdout and stderr for upload"),
            }
        }
        let outcome = match kind {
            Some(WorkloadKind::Wasm(w)) => {
                ctx.env = w.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                ctx.env.sort();
                let fetch = kommune_telemetry::span!("fetch", module = %w.module_sha256.chars().take(64).collect::<String>(), from_url = !w.url.is_empty());
                match self.ensure_module(w, modules.clone()).instrument(fetch).await {
                    Ok(()) => self.wasm.run(&w.module_sha256, &w.args, &ctx, cancel).instrument(run_span("wasm")).await,
                    Err(message) => Outcome::not_started(message),
                }
            }
            Some(WorkloadKind::Exec(e)) => {
                ctx.env = e.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                ctx.env.sort();
                self.exec.run(&e.command, &ctx, cancel).instrument(run_span("exec")).await
            }
            Some(WorkloadKind::Container(c)) => {
                ctx.env = c.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                ctx.env.sort();
                match &self.container {
                    // Pulling the image is part of this span: the engine does it on create.
                    Some(runtime) => {
                        runtime.run_with_gpus(&c.image, &c.command, &c.args, &ctx, c.network, &gpus, cancel).instrument(run_span("container")).await
                    }
                    None => Outcome::not_started("container runtime disabled: start the agent with --container-socket PATH"),
                }
            }
            None => Outcome::not_started("the assignment carried no workload"),
        };
        let mut outcome = outcome;
        if let Some(plan) = &a.outputs
            && outcome.ending != Ending::Cancelled
        {
            outputs::deliver(&a.attempt_id, plan, &scratch, &streams, modules.as_ref(), &mut outcome).await;
        }
        let _ = std::fs::remove_dir_all(&streams);
        let _ = std::fs::remove_dir_all(&scratch);
        outcome
    }

    async fn ensure_module(&self, w: &v1::WasmWorkload, modules: Arc<dyn ModuleSource>) -> Result<(), String> {
        if !kommune_proto::is_sha256_hex(&w.module_sha256) {
            return Err(format!("the assignment's module digest {:?} is not a sha256", w.module_sha256.chars().take(80).collect::<String>()));
        }
        if self.wasm.is_cached(&w.module_sha256) {
            return Ok(());
        }
        let lock = self.loading.lock().unwrap_or_else(|p| p.into_inner()).entry(w.module_sha256.clone()).or_default().clone();
        let _loading = lock.lock().await;
        let loaded = self.load_module(w, modules).await;
        // Whoever comes later finds it cached (or loads it again after a failure).
        self.loading.lock().unwrap_or_else(|p| p.into_inner()).remove(&w.module_sha256);
        loaded
    }

    /// Fetches and compiles one module, unless an attempt that held the lock before did.
    async fn load_module(&self, w: &v1::WasmWorkload, modules: Arc<dyn ModuleSource>) -> Result<(), String> {
        if self.wasm.is_cached(&w.module_sha256) {
            return Ok(());
        }
        let bytes = if w.url.is_empty() {
            modules.fetch(&w.module_sha256).await.map_err(|e| format!("cannot fetch module {} from the operator: {e}", w.module_sha256))?
        } else {
            crate::fetch::download(&w.url, *self.url_policy.get().unwrap_or(&UrlPolicy::default())).await?
        };
        // Compiling a large module takes seconds of CPU: on a blocking thread, so the session's
        // heartbeats and other attempts' messages keep flowing meanwhile.
        let (wasm, sha256) = (self.wasm.clone(), w.module_sha256.clone());
        tokio::task::spawn_blocking(move || wasm.load(&sha256, &bytes).map_err(|e| e.to_string()))
            .await
            .map_err(|e| format!("module compilation failed: {e}"))?
    }
}

/// The span of running a task (after its module is fetched), when traces are exported.
fn run_span(runtime: &'static str) -> tracing::Span {
    kommune_telemetry::span!("run", runtime)
}

/// The terminal update of a finished attempt: its state, its result and, with `receipts`, the
/// usage receipt signed for it. `preempted` is why the provider took the machine back while it
/// ran, if it did; `started_ms` is when it started (Unix ms). Public so that simulated agents
/// (the e2e scale scenario) report results exactly as this agent does.
pub fn terminal_update(attempt_id: &str, job: &str, outcome: &Outcome, preempted: Option<&str>, receipts: Option<&Receipts>, started_ms: i64) -> TaskUpdate {
    let mut state = state_of(outcome.ending);
    let mut result = result_of(outcome);
    // A task that finished just as it was preempted keeps its success.
    if let Some(reason) = preempted.filter(|_| outcome.ending != Ending::Succeeded) {
        state = AttemptState::Preempted;
        result.message = format!("preempted: the provider needs the machine back ({reason})");
    }
    // Preempted work is metered too: the provider's machine did it.
    let receipt = receipts.map(|r| {
        let usage = outcome.usage.to_usage(outcome.wall, outcome.output_bytes);
        r.issue(attempt_id, job, state, usage, started_ms, started_ms.saturating_add(outcome.wall.as_millis() as i64))
    });
    TaskUpdate { attempt_id: attempt_id.to_string(), state: state as i32, result: Some(result), receipt, trace: None }
}

fn state_of(e: Ending) -> AttemptState {
    match e {
        Ending::Succeeded => AttemptState::Succeeded,
        Ending::Failed => AttemptState::Failed,
        Ending::Cancelled => AttemptState::Cancelled,
    }
}

fn result_of(o: &Outcome) -> TaskResult {
    TaskResult {
        exit_code: o.exit_code,
        output_sha256: o.output_sha256.clone(),
        stdout_tail: o.stdout_tail.clone(),
        stderr_tail: o.stderr_tail.clone(),
        message: o.message.clone(),
        wall_millis: o.wall.as_millis() as u64,
        output_bytes: o.output_bytes,
        outputs: o.outputs.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoModules;
    #[tonic::async_trait]
    impl ModuleSource for NoModules {
        async fn fetch(&self, _: &str) -> Result<Vec<u8>, String> {
            Err("offline".into())
        }
    }

    fn tasks(dir: &std::path::Path, allow_exec: bool) -> (Arc<Tasks>, mpsc::UnboundedReceiver<TaskUpdate>) {
        Tasks::new(WasmRuntime::new().unwrap(), ExecRuntime::new(allow_exec), Spool::open(dir.join("results")).unwrap(), dir.join("scratch"))
    }

    fn exec_assign(id: &str, cmd: &[&str]) -> v1::Assign {
        v1::Assign {
            attempt_id: id.into(),
            job: "ns/j".into(),
            task_index: 1,
            task_count: 2,
            workload: Some(v1::Workload {
                kind: Some(WorkloadKind::Exec(v1::ExecWorkload { command: cmd.iter().map(|s| s.to_string()).collect(), env: Default::default() })),
            }),
            memory_bytes: 64 << 20,
            cpu_millis: 100,
            timeout_millis: 10_000,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn an_attempt_reports_running_then_its_result_and_is_spooled_until_acked() {
        let dir = tempfile::tempdir().unwrap();
        let (tasks, mut rx) = tasks(dir.path(), true);
        tasks.assign(exec_assign("u.1.1", &["/bin/sh", "-c", "echo task $KOMMUNE_TASK_INDEX"]), Arc::new(NoModules));
        tasks.assign(exec_assign("u.1.1", &["/bin/sh", "-c", "echo duplicate"]), Arc::new(NoModules));
        let running = rx.recv().await.unwrap();
        assert_eq!(running.state, AttemptState::Running as i32);
        let done = rx.recv().await.unwrap();
        assert_eq!(done.state, AttemptState::Succeeded as i32);
        assert_eq!(done.result.as_ref().unwrap().stdout_tail, b"task 1\n");
        assert!(tasks.running_ids().is_empty());
        assert_eq!(tasks.known_ids(), vec!["u.1.1".to_string()]);
        // A repeated Assign for a finished attempt re-sends its result instead of running again.
        tasks.assign(exec_assign("u.1.1", &["/bin/sh", "-c", "echo again"]), Arc::new(NoModules));
        assert_eq!(rx.recv().await.unwrap(), done);
        tasks.ack("u.1.1");
        assert!(tasks.known_ids().is_empty());
        assert!(!dir.path().join("scratch/u.1.1").exists());
    }

    #[tokio::test]
    async fn a_module_that_cannot_be_fetched_fails_the_attempt_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (tasks, mut rx) = tasks(dir.path(), false);
        let mut a = exec_assign("u.2.1", &[]);
        a.workload = Some(v1::Workload { kind: Some(WorkloadKind::Wasm(v1::WasmWorkload { module_sha256: "a".repeat(64), ..Default::default() })) });
        tasks.assign(a, Arc::new(NoModules));
        rx.recv().await.unwrap();
        let done = rx.recv().await.unwrap();
        assert_eq!(done.state, AttemptState::Failed as i32);
        assert!(done.result.unwrap().message.contains("offline"));
    }

    #[tokio::test]
    async fn a_container_task_fails_with_a_hint_when_no_engine_socket_was_given() {
        let dir = tempfile::tempdir().unwrap();
        let (tasks, mut rx) = tasks(dir.path(), false);
        let mut a = exec_assign("u.7.1", &[]);
        let image = format!("busybox@sha256:{}", "a".repeat(64));
        a.workload = Some(v1::Workload { kind: Some(WorkloadKind::Container(v1::ContainerWorkload { image, ..Default::default() })) });
        tasks.assign(a, Arc::new(NoModules));
        rx.recv().await.unwrap();
        let done = rx.recv().await.unwrap();
        assert_eq!(done.state, AttemptState::Failed as i32);
        assert_eq!(done.result.unwrap().message, "container runtime disabled: start the agent with --container-socket PATH");
    }

    /// Serves `body` over plain HTTP/1.1 on loopback, once per connection, for URL modules.
    async fn serve_once(body: Vec<u8>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut request = vec![0u8; 4096];
                let _ = conn.read(&mut request).await;
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(&body).await;
            }
        });
        format!("http://{addr}/module.wasm")
    }

    fn hello_module() -> Vec<u8> {
        use base64::Engine as _;
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/hello-wasm.yaml")).unwrap();
        let line = text.lines().find(|l| l.trim_start().starts_with("module.wasm:")).unwrap();
        base64::engine::general_purpose::STANDARD.decode(line.split_once(':').unwrap().1.trim()).unwrap()
    }

    fn wasm_assign(id: &str, url: &str, sha256: &str) -> v1::Assign {
        let mut a = exec_assign(id, &[]);
        a.workload = Some(v1::Workload {
            kind: Some(WorkloadKind::Wasm(v1::WasmWorkload {
                module_sha256: sha256.into(),
                url: url.into(),
                args: vec!["100".into()],
                env: Default::default(),
            })),
        });
        a
    }

    #[tokio::test]
    async fn a_module_from_a_url_is_downloaded_checked_and_run() {
        let dir = tempfile::tempdir().unwrap();
        let (tasks, mut rx) = tasks(dir.path(), false);
        // The test's server is on loopback, which only a provider's explicit allowance opens.
        tasks.set_url_policy(UrlPolicy { allow_private: true });
        let module = hello_module();
        let url = serve_once(module.clone()).await;
        tasks.assign(wasm_assign("u.4.1", &url, &kommune_proto::sha256_hex(&module)), Arc::new(NoModules));
        rx.recv().await.unwrap();
        let done = rx.recv().await.unwrap();
        assert_eq!(done.state, AttemptState::Succeeded as i32, "{:?}", done.result);
        assert_eq!(done.result.unwrap().stdout_tail, b"hello from task 1/2: 25 primes below 100\n");
    }

    /// Counts fetches, each slow enough that the attempts assigned together overlap.
    struct CountingModules(Vec<u8>, std::sync::atomic::AtomicUsize);
    #[tonic::async_trait]
    impl ModuleSource for CountingModules {
        async fn fetch(&self, _: &str) -> Result<Vec<u8>, String> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            Ok(self.0.clone())
        }
    }

    /// Attempts of a module not cached yet, assigned at once: one fetch and one compilation,
    /// and every attempt runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attempts_of_a_new_module_assigned_together_fetch_and_compile_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let (tasks, mut rx) = tasks(dir.path(), false);
        let module = hello_module();
        let sha = kommune_proto::sha256_hex(&module);
        let source = Arc::new(CountingModules(module, Default::default()));
        for i in 0..20 {
            tasks.assign(wasm_assign(&format!("u.{i}.1"), "", &sha), source.clone());
        }
        let mut succeeded = 0;
        while succeeded < 20 {
            let u = rx.recv().await.unwrap();
            if u.state != AttemptState::Running as i32 {
                assert_eq!(u.state, AttemptState::Succeeded as i32, "{:?}", u.result);
                succeeded += 1;
            }
        }
        assert_eq!(source.1.load(std::sync::atomic::Ordering::SeqCst), 1, "one fetch for twenty attempts");
        assert!(tasks.loading.lock().unwrap().is_empty(), "no lock is left behind");
    }

    #[tokio::test]
    async fn by_default_a_module_url_on_the_providers_own_network_fails_the_attempt_unfetched() {
        let dir = tempfile::tempdir().unwrap();
        let (tasks, mut rx) = tasks(dir.path(), false);
        let module = hello_module();
        let url = serve_once(module.clone()).await;
        tasks.assign(wasm_assign("u.7.1", &url, &kommune_proto::sha256_hex(&module)), Arc::new(NoModules));
        let done = loop {
            let u = rx.recv().await.unwrap();
            if u.state != AttemptState::Running as i32 {
                break u;
            }
        };
        assert_eq!(done.state, AttemptState::Failed as i32);
        let message = done.result.unwrap().message;
        assert!(message.contains("non-public addresses"), "{message}");
    }

    #[tokio::test]
    async fn a_downloaded_module_with_the_wrong_digest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (tasks, mut rx) = tasks(dir.path(), false);
        tasks.set_url_policy(UrlPolicy { allow_private: true });
        let url = serve_once(hello_module()).await;
        let wrong = "0".repeat(64);
        tasks.assign(wasm_assign("u.5.1", &url, &wrong), Arc::new(NoModules));
        rx.recv().await.unwrap();
        let done = rx.recv().await.unwrap();
        assert_eq!(done.state, AttemptState::Failed as i32);
        let message = done.result.unwrap().message;
        assert!(message.contains(&wrong), "{message}");
        let unreachable = wasm_assign("u.6.1", "http://127.0.0.1:1/m.wasm", &wrong);
        tasks.assign(unreachable, Arc::new(NoModules));
        rx.recv().await.unwrap();
        let done = rx.recv().await.unwrap();
        assert!(done.result.unwrap().message.contains("cannot download module"));
    }

    #[tokio::test]
    async fn cancel_stops_a_running_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let (tasks, mut rx) = tasks(dir.path(), true);
        tasks.assign(exec_assign("u.3.1", &["sleep", "30"]), Arc::new(NoModules));
        rx.recv().await.unwrap();
        tasks.cancel("u.3.1");
        let done = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
        assert_eq!(done.state, AttemptState::Cancelled as i32);
    }

    #[test]
    fn a_simulated_success_is_reported_succeeded_with_a_receipt_the_node_key_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let public = key.verifying_key().to_bytes();
        let receipts = Receipts::start(dir.path().join("receipts"), "sim-1", key).unwrap();
        let update = terminal_update("u.1.1", "ns/j", &Outcome::simulated_success(), None, Some(&receipts), 1_000);
        assert_eq!(update.state, AttemptState::Succeeded as i32);
        let result = update.result.unwrap();
        assert_eq!((result.exit_code, result.output_sha256.len()), (0, 64));
        let body = kommune_proto::receipt::verify(&update.receipt.unwrap(), &public).unwrap();
        assert_eq!((body.node.as_str(), body.attempt_id.as_str(), body.job.as_str(), body.sequence), ("sim-1", "u.1.1", "ns/j", 1));
        assert_eq!(body.usage.unwrap().source, "simulated");
    }
}
