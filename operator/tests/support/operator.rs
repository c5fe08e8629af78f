//! The operator a component test talks to: gateway, dispatcher, store and ledger on their own
//! runtime over loopback mTLS, with helpers to join real agents and to speak a session by hand.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kommune_agent::join::{self, JoinOptions};
use kommune_agent::runtime::{ExecRuntime, WasmRuntime};
use kommune_agent::session;
use kommune_agent::state::AgentState;
use kommune_agent::tasks::{Spool, Tasks};
use kommune_operator::attempt::AttemptPhase;
use kommune_operator::blobs::{BlobOwner, Blobs};
use kommune_operator::crd::{ComputeJobSpec, JobPhase};
use kommune_operator::dispatch::{Dispatcher, JobRef, ModuleRef, Synced};
use kommune_operator::fence::Fence;
use kommune_operator::fleet::Fleet;
use kommune_operator::gateway::{Gateway, GatewayConfig, NodeEvent};
use kommune_operator::job::{JobPolicy, validate};
use kommune_operator::ledger::{Ledger, LedgerConfig};
use kommune_operator::pki::Ca;
use kommune_operator::pricing::{Micros, RateBook, Rates};
use kommune_operator::store::Store;
use kommune_operator::tokens::MemoryTokens;
use kommune_proto::token::JoinToken;
use kommune_proto::v1::{Capacity, NodeFacts};
use tokio::sync::{Mutex, mpsc, oneshot};

/// One credit per CPU-core-hour: a second of CPU earns 278 micro-credits.
pub const RATES: Rates = Rates { cpu_core_hour: Micros(1_000_000), memory_gib_hour: Micros(0), gpu_hour: Micros(0), output_gib: Micros(0) };

/// How long the test gateway waits for a TLS handshake: loopback handshakes take milliseconds,
/// and the attack test waits this long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Operator {
    pub url: String,
    pub ca: Arc<Ca>,
    pub tokens: Arc<MemoryTokens>,
    pub dispatcher: Arc<Dispatcher>,
    pub blobs: Blobs,
    pub changed: Mutex<mpsc::Receiver<String>>,
    pub events: Arc<std::sync::Mutex<Vec<NodeEvent>>>,
    /// The operator's own runtime: dropping it kills every task and connection at once, the
    /// way a crashed process would.
    pub runtime: Option<tokio::runtime::Runtime>,
    pub port: u16,
    pub dir: Option<tempfile::TempDir>,
    /// The prices receipts are metered at, kept across a restart.
    pub rates: Rates,
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

pub async fn operator() -> Operator {
    operator_with(RATES).await
}

/// An operator that prices receipts at `rates`.
pub async fn operator_with(rates: Rates) -> Operator {
    let ca = Arc::new(Ca::generate().unwrap());
    start_operator(tempfile::tempdir().unwrap(), ca, Arc::new(MemoryTokens::default()), 0, rates).await
}

pub async fn start_operator(dir: tempfile::TempDir, ca: Arc<Ca>, tokens: Arc<MemoryTokens>, port: u16, rates: Rates) -> Operator {
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let blobs = Blobs::open(dir.path()).unwrap();
    let fleet = Arc::new(Fleet::default());
    let (changed_tx, changed_rx) = mpsc::channel(1024);
    let ledger = Arc::new(Ledger::open(LedgerConfig { data_dir: dir.path().to_path_buf(), database_url: None, fence: Fence::open(), key_file: None }).unwrap());
    // A short grace past a task's timeout, so tests of the operator's own timeout run quickly.
    let outputs = kommune_operator::outputs::OutputStore::open(dir.path(), 1 << 30).unwrap();
    let dispatcher = Arc::new(
        Dispatcher::new(store, fleet, changed_tx)
            .with_ledger(ledger, Arc::new(RateBook::new(rates)))
            .with_task_grace(Duration::from_secs(1))
            .with_outputs(outputs),
    );
    dispatcher.metrics().watch_data_dir(dir.path().to_path_buf());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (events_tx, mut events_rx) = mpsc::channel(1024);
    let events = Arc::new(std::sync::Mutex::new(vec![]));
    let sink = events.clone();
    runtime.spawn(async move {
        while let Some(e) = events_rx.recv().await {
            sink.lock().unwrap().push(e);
        }
    });
    let config = GatewayConfig {
        heartbeat_interval: Duration::from_millis(200),
        session_timeout: Duration::from_secs(2),
        handshake_timeout: HANDSHAKE_TIMEOUT,
        // Agents hear of a reversal, close or paid mark within a test's patience.
        earnings_poll: Duration::from_millis(100),
        ..GatewayConfig::default()
    };
    let gateway = Gateway::new(dispatcher.clone(), tokens.clone(), ca.clone(), blobs.clone(), events_tx, config);
    // After a crash the old runtime lets go of the port a moment later.
    let listener = runtime
        .spawn(async move {
            for _ in 0..100 {
                match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                    Ok(l) => return l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            panic!("port {port} stayed busy");
        })
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    runtime.spawn(gateway.serve(listener, std::future::pending()));
    Operator {
        url: format!("https://127.0.0.1:{port}"),
        ca,
        tokens,
        dispatcher,
        blobs,
        changed: Mutex::new(changed_rx),
        events,
        runtime: Some(runtime),
        port,
        dir: Some(dir),
        rates,
    }
}

impl Operator {
    /// Kills the operator (every task and connection at once) and starts a new one on the same
    /// store, CA, join tokens and port, as a restarted process would.
    pub async fn crash_and_restart(mut self) -> Operator {
        self.runtime.take().unwrap().shutdown_background();
        let (dir, ca, tokens, port, rates) = (self.dir.take().unwrap(), self.ca.clone(), self.tokens.clone(), self.port, self.rates);
        // Everything of the old process goes before the new one opens the store and ledger.
        drop(self);
        start_operator(dir, ca, tokens, port, rates).await
    }

    /// Runs the operator's expiry loop on its runtime, as `main` does (every 100 ms here, every
    /// second there): attempts of nodes gone past `grace` are lost and placed again, attempts
    /// past their task timeout (plus the dispatcher's grace) are failed.
    pub fn expire_every_tick(&self, grace: Duration) {
        let dispatcher = self.dispatcher.clone();
        self.runtime.as_ref().unwrap().spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                if let Err(e) = dispatcher.expire_absent(grace).await {
                    eprintln!("expiry: {e}");
                }
                if let Err(e) = dispatcher.enforce_timeouts().await {
                    eprintln!("timeouts: {e}");
                }
            }
        });
    }

    /// Stores `module` as the module of job `uid` of namespace `default` (what `job(uid)`
    /// makes), as the controller does for a ConfigMap module: only that job's attempts may
    /// fetch it. Returns its digest.
    pub fn store_module(&self, uid: &str, module: &[u8]) -> String {
        self.blobs.put_for(BlobOwner { job_uid: uid, namespace: "default" }, module).unwrap()
    }

    /// The operator's data directory (store, ledger, blobs).
    pub fn data_dir(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    /// The job's receipts in the ledger, once there are at least `at_least` (a result is
    /// recorded a moment before its receipt), or whatever is there after 5 s.
    pub async fn metered_at_least(&self, job_uid: &str, at_least: u64) -> kommune_operator::ledger::backend::JobUsage {
        let ledger = self.dispatcher.ledger().unwrap();
        for _ in 0..250 {
            let u = ledger.job_usage(job_uid).await.unwrap();
            if u.receipts >= at_least {
                return u;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ledger.job_usage(job_uid).await.unwrap()
    }

    /// What `/metrics` would say now, parsed.
    pub fn scrape(&self) -> Vec<kommune_operator::metrics::exposition::Sample> {
        let text = self.dispatcher.metrics().render(self.dispatcher.fleet());
        kommune_operator::metrics::exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    /// One series of [`Operator::scrape`], summed over the labels not given (0 when absent).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        kommune_operator::metrics::exposition::value(&self.scrape(), name, labels).unwrap_or(0.0)
    }

    pub fn token(&self, uses: u32, ttl_secs: i64) -> String {
        let t = JoinToken::generate(&self.ca.pin());
        self.tokens.insert(&t, Timestamp::now() + SignedDuration::from_secs(ttl_secs), uses);
        t.to_string()
    }

    /// Syncs the job until it ends, the way the controller's reconcile loop would.
    pub async fn run_to_end(&self, job: &JobRef, policy: &JobPolicy, module: Option<&ModuleRef>) -> Synced {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut changed = self.changed.lock().await;
        loop {
            let synced = self.dispatcher.sync(job, policy, module).await.unwrap();
            if matches!(synced.progress.phase, JobPhase::Succeeded | JobPhase::Failed) {
                return synced;
            }
            assert!(tokio::time::Instant::now() < deadline, "job {} did not finish: {:?}", job.key, synced.progress);
            let _ = tokio::time::timeout(Duration::from_millis(200), changed.recv()).await;
        }
    }
}

pub fn facts(allow_exec: bool) -> NodeFacts {
    let mut runtimes = vec!["wasm".to_string()];
    if allow_exec {
        runtimes.push("exec".into());
    }
    NodeFacts {
        capacity: Some(Capacity { cpu_millis: 2000, memory_bytes: 2 << 30, runtimes, arch: "x86_64".into(), os: "linux".into(), ..Default::default() }),
        agent_version: "test".into(),
        region: String::new(),
        zone: String::new(),
    }
}

/// One agent: its identity, its task manager (which outlives sessions) and a running session.
pub struct Agent {
    pub state: AgentState,
    pub facts: NodeFacts,
    pub tasks: Arc<Tasks>,
    pub session: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<mpsc::UnboundedReceiver<kommune_proto::v1::TaskUpdate>>)>,
    pub updates: Option<mpsc::UnboundedReceiver<kommune_proto::v1::TaskUpdate>>,
}

/// Joins a machine with a fresh single-use token and returns its state.
pub async fn join_only(op: &Operator, dir: &Path, name: &str, allow_exec: bool) -> AgentState {
    join_as(op, dir, name, allow_exec, &op.token(1, 600)).await
}

/// Joins a machine (wasm only) with `token` and returns its state.
pub async fn join_only_with(op: &Operator, dir: &Path, name: &str, token: &str) -> AgentState {
    join_as(op, dir, name, false, token).await
}

async fn join_as(op: &Operator, dir: &Path, name: &str, allow_exec: bool, token: &str) -> AgentState {
    let state = join::join(JoinOptions {
        server: &op.url,
        token,
        name: Some(name),
        region: "",
        zone: "",
        state_dir: &dir.join(name),
        force: false,
        facts: facts(allow_exec),
    })
    .await
    .unwrap();
    assert_eq!(state.config.node_name, name);
    state
}

/// A task manager for `state` that signs usage receipts with the node key, as `run` sets up.
pub fn tasks_for(state: &AgentState, allow_exec: bool, results: PathBuf) -> (Arc<Tasks>, mpsc::UnboundedReceiver<kommune_proto::v1::TaskUpdate>) {
    let (tasks, updates) = Tasks::new(WasmRuntime::new().unwrap(), ExecRuntime::new(allow_exec), Spool::open(results).unwrap(), state.scratch_dir());
    let key = kommune_proto::receipt::signing_key_from_pem(&state.key_pem).unwrap();
    tasks.sign_receipts(kommune_agent::receipts::Receipts::start(state.receipts_dir(), &state.config.node_name, key).unwrap());
    (tasks, updates)
}

/// Runs an agent's sessions in the background (exec allowed) until the operator rejects it;
/// the handle tells how it ended.
pub fn run_detached(state: &AgentState) -> tokio::task::JoinHandle<Result<(), session::SessionError>> {
    let (tasks, mut updates) = tasks_for(state, true, state.results_dir());
    let state = state.clone();
    tokio::spawn(async move { session::run(&state, &facts(true), &tasks, &mut updates, std::future::pending()).await })
}

pub async fn join_agent(op: &Operator, dir: &Path, name: &str, allow_exec: bool) -> Agent {
    let state = join_only(op, dir, name, allow_exec).await;
    let (tasks, updates) = tasks_for(&state, allow_exec, state.results_dir());
    let mut agent = Agent { state, facts: facts(allow_exec), tasks, session: None, updates: Some(updates) };
    agent.connect();
    agent
}

impl Agent {
    pub fn connect(&mut self) {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (state, facts, tasks) = (self.state.clone(), self.facts.clone(), self.tasks.clone());
        let mut updates = self.updates.take().expect("not connected");
        let handle = tokio::spawn(async move {
            session::run(&state, &facts, &tasks, &mut updates, async {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
            updates
        });
        self.session = Some((stop_tx, handle));
    }

    /// Drops the session (the connection closes) but keeps the tasks running.
    pub async fn disconnect(&mut self) {
        let (stop, handle) = self.session.take().expect("connected");
        let _ = stop.send(());
        self.updates = Some(handle.await.unwrap());
    }
}

pub async fn wait_connected(op: &Operator, names: &[&str]) {
    for _ in 0..200 {
        if names.iter().all(|n| op.dispatcher.fleet().is_connected(n)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("agents {names:?} did not connect; connected: {:?}", op.dispatcher.fleet().connected());
}

pub async fn wait_disconnected(op: &Operator, name: &str) {
    for _ in 0..200 {
        if !op.dispatcher.fleet().is_connected(name) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{name} is still connected");
}

/// Waits until the agent has confirmed it runs the attempt (it received the Assign).
pub async fn wait_running(op: &Operator, attempt: &str) {
    for _ in 0..200 {
        if op.dispatcher.store().attempt(attempt).await.unwrap().is_some_and(|a| a.phase == AttemptPhase::Running) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{attempt} never ran");
}

pub fn hello_module() -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/hello-wasm.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let cm: serde_yaml::Value = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .find(|v: &serde_yaml::Value| v["kind"] == "ConfigMap")
        .unwrap();
    base64::engine::general_purpose::STANDARD.decode(cm["binaryData"]["module.wasm"].as_str().unwrap()).unwrap()
}

pub fn policy(yaml: &str) -> JobPolicy {
    let spec: ComputeJobSpec = serde_yaml::from_str(yaml).unwrap();
    validate(&spec).unwrap()
}

pub fn job(uid: &str) -> JobRef {
    JobRef { uid: uid.into(), key: format!("default/{uid}") }
}

/// The next message from the operator on a raw session, or the stream's error. Earnings
/// accounts are skipped: they are informational, sent after Welcome and whenever a settlement
/// line concerning the node is appended, and tests of other messages need not expect them.
pub async fn next(
    inbound: &mut tonic::Streaming<kommune_proto::v1::OperatorMessage>,
) -> Result<Option<kommune_proto::v1::operator_message::Kind>, tonic::Status> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), inbound.message()).await.expect("a reply in time").map(|m| m.and_then(|m| m.kind))?;
        if !matches!(m, Some(kommune_proto::v1::operator_message::Kind::Earnings(_))) {
            return Ok(m);
        }
    }
}

/// A session spoken by hand as `state`'s node: Hello sent and Welcome received. Returns the
/// outbound queue and the operator's messages.
pub async fn raw_session(
    op: &Operator,
    state: &AgentState,
) -> (mpsc::Sender<kommune_proto::v1::AgentMessage>, tonic::Streaming<kommune_proto::v1::OperatorMessage>) {
    raw_session_running(op, state, vec![]).await
}

/// As [`raw_session`], with a Hello that says the node runs `running`.
pub async fn raw_session_running(
    op: &Operator,
    state: &AgentState,
    running: Vec<String>,
) -> (mpsc::Sender<kommune_proto::v1::AgentMessage>, tonic::Streaming<kommune_proto::v1::OperatorMessage>) {
    use kommune_proto::v1::{AgentMessage, Hello, agent_message, operator_message};
    let mut client =
        kommune_agent::connect::client(&kommune_agent::connect::parse_server(&op.url).unwrap(), &state.ca_pem, Some((&state.cert_pem, &state.key_pem)))
            .await
            .unwrap();
    let (tx, rx) = mpsc::channel(16);
    let hello = Hello { facts: Some(facts(true)), running_attempt_ids: running, paused: false };
    tx.send(AgentMessage { kind: Some(agent_message::Kind::Hello(hello)) }).await.unwrap();
    let mut inbound = client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    assert!(matches!(next(&mut inbound).await, Ok(Some(operator_message::Kind::Welcome(_)))));
    (tx, inbound)
}

pub fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

pub fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(body).unwrap()
}
