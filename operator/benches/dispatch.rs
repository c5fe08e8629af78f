//! Dispatch benchmark: the hot path from a placement to a durably recorded result, through the
//! real operator core (gateway, dispatcher, store, ledger) and real agents over loopback mTLS.
//!
//! `cargo bench -p kommune-operator --bench dispatch` prints three lines:
//!
//! ```text
//! dispatch agents=2 tasks=10000 tasks_per_s=X
//! roundtrip p50_ms=Y p99_ms=Z
//! fanin sessions=10000 operator_rss_mib=R heartbeat_cpu_pct=C heartbeat_lag_p99_ms=L
//! ```
//!
//! `KOMMUNE_BENCH_QUICK=1` shrinks every part for a smoke run; `KOMMUNE_BENCH_ONLY=dispatch,
//! roundtrip,fanin` picks parts. `KOMMUNE_BENCH_ONLY=sustained` runs the sustained part, which
//! the default run leaves out (a million tasks take minutes): it prints
//! `sustained tasks=1000000 tasks_per_s=X operator_rss_mib_start=A operator_rss_mib_end=B store_mib=C`
//! (`KOMMUNE_BENCH_SUSTAINED_TASKS` / `_AGENTS` change its size). The fan-in part runs the operator in a child process and the
//! simulated agents in a grandchild, so the operator's RSS and CPU are read cleanly from
//! /proc. docs/PERFORMANCE.md says what each figure means.
//!
//! `KOMMUNE_BENCH_TRACES=logs|otlp` runs the dispatch and round-trip parts with the binaries'
//! telemetry: logs only, or spans exported to an in-process OTLP sink (`support/traces.rs`).
//!
//! `KOMMUNE_BENCH_STAGES=1` adds a breakdown of the round trip: the `kommune::stage` trace
//! events of operator and agents (one process, one clock) and the bench's own marks, as the
//! median and 99th percentile time of each stage from the placement sync's start. Recording
//! them costs a little, so the headline round-trip figure is taken without it.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kommune_agent::join::{self, JoinOptions};
use kommune_agent::runtime::{ExecRuntime, WasmRuntime};
use kommune_agent::session;
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
use kommune_proto::v1::{AgentMessage, Capacity, Heartbeat, Hello, NodeFacts, agent_message, operator_message};
use tokio::sync::mpsc;

#[path = "support/sustained.rs"]
mod sustained;
#[path = "support/traces.rs"]
mod traces;
use tracing_subscriber::layer::SubscriberExt;

const RATES: Rates = Rates { cpu_core_hour: Micros(1_000_000), memory_gib_hour: Micros(0), gpu_hour: Micros(0), output_gib: Micros(0) };

/// A WASI command that does nothing: the trivial task.
const NOOP_WAT: &str = r#"(module (memory (export "memory") 1) (func (export "_start")))"#;

/// The sizes of one run.
struct Sizes {
    tasks: u32,
    parallelism: u32,
    roundtrips: usize,
    sessions: usize,
    heartbeat: Duration,
    steady: Duration,
}

impl Sizes {
    fn from_env() -> Sizes {
        let quick = std::env::var("KOMMUNE_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let num = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
        let (tasks, roundtrips, sessions, heartbeat, steady) = if quick { (500, 50, 200, 2, 10) } else { (10_000, 1000, 10_000, 10, 60) };
        Sizes {
            tasks: num("KOMMUNE_BENCH_TASKS", tasks) as u32,
            parallelism: num("KOMMUNE_BENCH_PARALLELISM", 256) as u32,
            roundtrips: num("KOMMUNE_BENCH_ROUNDTRIPS", roundtrips) as usize,
            sessions: num("KOMMUNE_BENCH_SESSIONS", sessions) as usize,
            heartbeat: Duration::from_secs(num("KOMMUNE_BENCH_HEARTBEAT_SECS", heartbeat)),
            steady: Duration::from_secs(num("KOMMUNE_BENCH_STEADY_SECS", steady)),
        }
    }
}

fn main() {
    if std::env::var("KOMMUNE_BENCH_STAGES").is_ok_and(|v| v == "1") {
        stages::install();
    }
    let role = std::env::var("KOMMUNE_BENCH_ROLE").unwrap_or_default();
    let sizes = Sizes::from_env();
    match role.as_str() {
        "fanin-operator" => fanin_operator(&sizes),
        "fanin-agents" => fanin_agents(),
        "sustained-operator" => sustained::sustained_operator(),
        "sustained-agents" => sustained::sustained_agents(),
        _ => {
            let traces = traces::BenchTraces::from_env();
            let only = std::env::var("KOMMUNE_BENCH_ONLY").unwrap_or_else(|_| "dispatch,roundtrip,fanin".into());
            let wants = |part: &str| only.split(',').any(|p| p.trim() == part);
            if wants("dispatch") || wants("roundtrip") {
                dispatch_and_roundtrip(&sizes, wants("dispatch"), wants("roundtrip"));
            }
            if wants("fanin") {
                fanin(&sizes);
            }
            // A million tasks take minutes: only when asked for (KOMMUNE_BENCH_ONLY=sustained).
            if only.split(',').any(|p| p.trim() == "sustained") {
                sustained::sustained();
            }
            if !traces.mode.is_empty() {
                println!("traces mode={} spans_exported={}", traces.mode, traces.exported());
            }
        }
    }
}

/// The operator core on its own runtime, as in the component tests.
struct Operator {
    url: String,
    ca: Arc<Ca>,
    tokens: Arc<MemoryTokens>,
    dispatcher: Arc<Dispatcher>,
    blobs: Blobs,
    /// How long the job loop waits after a notification before it syncs (0: at once).
    debounce: Duration,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Starts the gateway, dispatcher, store and ledger in `dir`; returns the operator, the
/// dispatcher's `changed` receiver and the gateway's node events.
fn start_operator(dir: &Path, config: GatewayConfig, workers: usize) -> (Operator, mpsc::Receiver<String>, mpsc::Receiver<NodeEvent>) {
    let ca = Arc::new(Ca::generate().unwrap());
    let tokens = Arc::new(MemoryTokens::default());
    let store = Arc::new(Store::open(dir).unwrap());
    let blobs = Blobs::open(dir).unwrap();
    let fleet = Arc::new(Fleet::default());
    let (changed_tx, changed_rx) = mpsc::channel(1024);
    let ledger = Arc::new(Ledger::open(LedgerConfig { data_dir: dir.to_path_buf(), database_url: None, fence: Fence::open(), key_file: None }).unwrap());
    let dispatcher = Arc::new(Dispatcher::new(store, fleet, changed_tx).with_ledger(ledger, Arc::new(RateBook::new(RATES))));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).thread_name("operator").enable_all().build().unwrap();
    let (events_tx, events_rx) = mpsc::channel(1 << 16);
    let gateway = Gateway::new(dispatcher.clone(), tokens.clone(), ca.clone(), blobs.clone(), events_tx, config);
    let listener = runtime.block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0))).unwrap();
    let port = listener.local_addr().unwrap().port();
    runtime.spawn(gateway.serve(listener, std::future::pending()));
    let debounce = Duration::from_millis(std::env::var("KOMMUNE_BENCH_DEBOUNCE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(0));
    let op = Operator { url: format!("https://127.0.0.1:{port}"), ca, tokens, dispatcher, blobs, debounce, runtime: Some(runtime) };
    (op, changed_rx, events_rx)
}

impl Operator {
    fn token(&self) -> String {
        let t = JoinToken::generate(&self.ca.pin());
        self.tokens.insert(&t, Timestamp::now() + SignedDuration::from_secs(600), 1);
        t.to_string()
    }

    /// Syncs the job until it ends and its receipts are all in the ledger, the way the
    /// controller's reconcile loop does (woken by `changed`).
    async fn run_to_end(&self, changed: &mut mpsc::Receiver<String>, job: &JobRef, policy: &JobPolicy, module: &ModuleRef) -> Synced {
        let ledger = self.dispatcher.ledger().unwrap();
        loop {
            stages::mark(&job.uid, "bench: sync starts");
            let synced = self.dispatcher.sync(job, policy, Some(module)).await.unwrap();
            stages::mark(&job.uid, "bench: sync returned");
            match synced.progress.phase {
                JobPhase::Succeeded if ledger.job_usage(&job.uid).await.unwrap().receipts >= u64::from(policy.tasks) => return synced,
                JobPhase::Failed => {
                    let bad: Vec<_> = synced.attempts.iter().filter(|a| a.phase != AttemptPhase::Succeeded).take(3).collect();
                    panic!("job {} failed: {:?}; e.g. {bad:?}", job.key, synced.progress.counts);
                }
                _ => {}
            }
            // Like kube-runtime, many notifications for one job make one reconcile; with a
            // debounce (KOMMUNE_BENCH_DEBOUNCE_MS, like kube-runtime's `Config::debounce`)
            // those arriving within it too.
            if tokio::time::timeout(Duration::from_millis(200), changed.recv()).await.is_ok() && !self.debounce.is_zero() {
                tokio::time::sleep(self.debounce).await;
            }
            stages::mark(&job.uid, "bench: woken");
            while changed.try_recv().is_ok() {}
        }
    }
}

/// A machine with room for thousands of trivial tasks.
fn roomy_facts() -> NodeFacts {
    NodeFacts {
        capacity: Some(Capacity {
            cpu_millis: 1_000_000,
            memory_bytes: 1 << 40,
            runtimes: vec!["wasm".into()],
            arch: "x86_64".into(),
            os: "linux".into(),
            ..Default::default()
        }),
        agent_version: "bench".into(),
        region: String::new(),
        zone: String::new(),
    }
}

/// Joins a real agent and runs its sessions in the background, receipts signed.
async fn start_agent(op: &Operator, dir: &Path, name: &str) {
    let facts = roomy_facts();
    let state = join::join(JoinOptions {
        server: &op.url,
        token: &op.token(),
        name: Some(name),
        region: "",
        zone: "",
        state_dir: &dir.join(name),
        force: false,
        facts: facts.clone(),
    })
    .await
    .unwrap();
    let (tasks, mut updates) = Tasks::new(WasmRuntime::new().unwrap(), ExecRuntime::new(false), Spool::open(state.results_dir()).unwrap(), state.scratch_dir());
    let key = kommune_proto::receipt::signing_key_from_pem(&state.key_pem).unwrap();
    tasks.sign_receipts(kommune_agent::receipts::Receipts::start(state.receipts_dir(), &state.config.node_name, key).unwrap());
    tokio::spawn(async move { session::run(&state, &facts, &tasks, &mut updates, std::future::pending()).await });
}

fn policy(tasks: u32, parallelism: u32) -> JobPolicy {
    let yaml = format!(
        "workload:\n  wasm:\n    configMapRef: {{name: noop, key: module.wasm}}\ntasks: {tasks}\nparallelism: {parallelism}\nresources: {{cpu: 1m, memory: 1Mi}}\n"
    );
    let spec: ComputeJobSpec = serde_yaml::from_str(&yaml).unwrap();
    validate(&spec).unwrap()
}

fn job(uid: &str) -> JobRef {
    JobRef { uid: uid.into(), key: format!("bench/{uid}") }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn dispatch_and_roundtrip(sizes: &Sizes, dispatch: bool, roundtrip: bool) {
    let dir = tempfile::tempdir().unwrap();
    let config = GatewayConfig { heartbeat_interval: Duration::from_secs(5), session_timeout: Duration::from_secs(30), ..GatewayConfig::default() };
    let (op, mut changed, mut events) = start_operator(&dir.path().join("operator"), config, 2);
    // Nobody keeps ProviderNode objects here: drain the events.
    op.runtime.as_ref().unwrap().spawn(async move { while events.recv().await.is_some() {} });
    let agents = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("agents").enable_all().build().unwrap();
    agents.block_on(async {
        for name in ["agent-a", "agent-b"] {
            start_agent(&op, dir.path(), name).await;
        }
        while op.dispatcher.fleet().connected().len() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Held by the warm-up job, the only one whose attempts fetch it: the agents keep it after.
        let sha256 = op.blobs.put_for(BlobOwner { job_uid: "warm-up", namespace: "bench" }, NOOP_WAT.as_bytes()).unwrap();
        let module = ModuleRef { sha256, url: None };
        // Warm up: both agents fetch and compile the module once, connections are hot.
        let warm = op.run_to_end(&mut changed, &job("warm-up"), &policy(20, 20), &module).await;
        assert!(warm.attempts.iter().any(|a| a.node == "agent-a") && warm.attempts.iter().any(|a| a.node == "agent-b"));

        if dispatch {
            let p = policy(sizes.tasks, sizes.parallelism);
            let (started, cpu0) = (Instant::now(), cpu_seconds());
            let done = op.run_to_end(&mut changed, &job("throughput"), &p, &module).await;
            let (secs, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
            assert_eq!(done.progress.counts.succeeded, sizes.tasks);
            // Read from the store: a large job's finished attempts leave memory as it runs.
            let ran = op.dispatcher.store().attempts_for_job("throughput").await.unwrap();
            let extra: Vec<String> = ran
                .iter()
                .filter(|a| a.number > 1 || a.phase != AttemptPhase::Succeeded)
                .map(|a| format!("{} {:?} {:?}", a.id, a.phase, a.result.as_ref().map(|r| r.message.clone())))
                .collect();
            assert_eq!(ran.len(), sizes.tasks as usize, "every task ran exactly once; not first or not succeeded: {extra:#?}");
            // CPU per task (operator and agents together, all threads) compares runs on a busy machine.
            println!(
                "dispatch agents=2 tasks={} tasks_per_s={:.0} cpu_ms_per_task={:.3}",
                sizes.tasks,
                f64::from(sizes.tasks) / secs,
                cpu * 1e3 / f64::from(sizes.tasks)
            );
            let _ = std::io::stdout().flush();
        }
        if roundtrip {
            let p = policy(1, 1);
            for i in 0..20 {
                op.run_to_end(&mut changed, &job(&format!("rt-warm-{i}")), &p, &module).await;
            }
            let mut ms = Vec::with_capacity(sizes.roundtrips);
            let mut trips = Vec::with_capacity(sizes.roundtrips);
            stages::clear();
            for i in 0..sizes.roundtrips {
                let j = job(&format!("rt-{i}"));
                let started = Instant::now();
                let done = op.run_to_end(&mut changed, &j, &p, &module).await;
                let ended = Instant::now();
                ms.push((ended - started).as_secs_f64() * 1e3);
                trips.push((started, ended, j.uid.clone(), done.attempts[0].id.clone()));
            }
            ms.sort_by(f64::total_cmp);
            println!("roundtrip p50_ms={:.2} p99_ms={:.2}", percentile(&ms, 0.5), percentile(&ms, 0.99));
            stages::report(&trips);
            let _ = std::io::stdout().flush();
        }
    });
    agents.shutdown_background();
    drop(op);
}

// ---- fan-in ------------------------------------------------------------------------------

/// Runs the fan-in part in a child process (the operator) that starts a grandchild (the
/// simulated agents), and prints the operator's figures.
fn fanin(sizes: &Sizes) {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe).env("KOMMUNE_BENCH_ROLE", "fanin-operator").stderr(std::process::Stdio::inherit()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    assert!(out.status.success() && text.contains("fanin "), "the fan-in operator process failed ({}); see stderr", out.status);
    let _ = sizes;
}

/// One simulated node's identity, handed to the agents' process.
#[derive(serde::Serialize, serde::Deserialize)]
struct Identity {
    name: String,
    cert_pem: String,
    key_pem: String,
}

fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

/// (utime + stime) of this process, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux.
    ticks as f64 / 100.0
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap();
    kib / 1024.0
}

/// The operator process of the fan-in part: issues N node identities (CSRs signed by the CA,
/// names registered in the store, as Join does), starts the simulated agents, and measures
/// itself over the steady window.
fn fanin_operator(sizes: &Sizes) {
    let dir = tempfile::tempdir().unwrap();
    let config = GatewayConfig { heartbeat_interval: sizes.heartbeat, session_timeout: sizes.heartbeat * 3, ..GatewayConfig::default() };
    let (op, _changed, mut events) = start_operator(&dir.path().join("operator"), config, 2);
    let rt = op.runtime.as_ref().unwrap();
    // Heartbeat arrivals, by node: the gateway emits the event right after fleet.touch.
    let arrivals: Arc<std::sync::Mutex<Vec<(String, u64)>>> = Arc::default();
    let sink = arrivals.clone();
    rt.spawn(async move {
        while let Some(e) = events.recv().await {
            if let NodeEvent::Heartbeat { node } = e {
                sink.lock().unwrap().push((node, unix_micros()));
            }
        }
    });

    let started = Instant::now();
    let ids_path = dir.path().join("identities.jsonl");
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&ids_path).unwrap());
        let store = op.dispatcher.store();
        for i in 0..sizes.sessions {
            let name = format!("sim-{i:05}");
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
            let csr = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap();
            let (cert_pem, key_sha) = op.ca.sign_node(csr.der(), &name).unwrap();
            rt.block_on(store.register_node(&name, &key_sha, &Default::default(), 0)).unwrap();
            serde_json::to_writer(&mut w, &Identity { name, cert_pem, key_pem: key.serialize_pem() }).unwrap();
            w.write_all(b"\n").unwrap();
        }
    }
    std::fs::write(dir.path().join("ca.pem"), op.ca.cert_pem()).unwrap();
    eprintln!("fanin: {} identities issued in {:.1}s", sizes.sessions, started.elapsed().as_secs_f64());

    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(exe)
        .env("KOMMUNE_BENCH_ROLE", "fanin-agents")
        .env("KOMMUNE_BENCH_DIR", dir.path())
        .env("KOMMUNE_BENCH_URL", &op.url)
        .env("KOMMUNE_BENCH_HEARTBEAT_SECS", sizes.heartbeat.as_secs().to_string())
        .env("KOMMUNE_BENCH_STEADY_SECS", sizes.steady.as_secs().to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // "connected": every session got its Welcome; the steady window starts one heartbeat later.
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, "connected", "the simulated agents did not connect");
    eprintln!("fanin: {} sessions open after {:.1}s", op.dispatcher.fleet().connected().len(), started.elapsed().as_secs_f64());
    std::thread::sleep(sizes.heartbeat);
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let window_start_us = unix_micros();
    let mut rss_max: f64 = 0.0;
    while t0.elapsed() < sizes.steady {
        rss_max = rss_max.max(rss_mib());
        std::thread::sleep(Duration::from_secs(1));
    }
    let (cpu1, wall) = (cpu_seconds(), t0.elapsed().as_secs_f64());
    let window_end_us = unix_micros();
    let connected = op.dispatcher.fleet().connected().len();
    assert_eq!(lines.next().unwrap().unwrap(), "sent", "the simulated agents stopped early");
    child.wait().unwrap();

    // Lag: pair each node's k-th heartbeat sent with its k-th heartbeat seen by the operator.
    let sends: Vec<(String, u64)> = std::fs::read_to_string(dir.path().join("sent.tsv"))
        .unwrap()
        .lines()
        .map(|l| l.split_once('\t').unwrap())
        .map(|(n, t)| (n.to_string(), t.parse().unwrap()))
        .collect();
    let mut by_node: std::collections::HashMap<&str, (Vec<u64>, Vec<u64>)> = std::collections::HashMap::new();
    for (n, t) in &sends {
        by_node.entry(n).or_default().0.push(*t);
    }
    let arrivals = arrivals.lock().unwrap();
    for (n, t) in arrivals.iter() {
        by_node.entry(n).or_default().1.push(*t);
    }
    let mut lags: Vec<f64> = vec![];
    for (sent, seen) in by_node.values_mut() {
        sent.sort();
        seen.sort();
        lags.extend(sent.iter().zip(seen.iter()).filter(|(s, _)| **s >= window_start_us && **s <= window_end_us).map(|(s, r)| (*r as f64 - *s as f64) / 1e3));
    }
    lags.sort_by(f64::total_cmp);
    eprintln!(
        "fanin: {connected} sessions still open; {} heartbeats in the window, lag p50 {:.2} ms, max {:.2} ms; cpu {:.2}s over {wall:.1}s",
        lags.len(),
        percentile(&lags, 0.5),
        lags.last().copied().unwrap_or(f64::NAN),
        cpu1 - cpu0
    );
    println!(
        "fanin sessions={} operator_rss_mib={:.0} heartbeat_cpu_pct={:.2} heartbeat_lag_p99_ms={:.2}",
        connected,
        rss_max,
        (cpu1 - cpu0) / wall * 100.0,
        percentile(&lags, 0.99)
    );
    drop(op);
}

/// The simulated agents: one real mTLS session each, Hello, then a Heartbeat every interval
/// (random phase) until the steady window plus a margin has passed. Send times go to sent.tsv.
fn fanin_agents() {
    let dir = PathBuf::from(std::env::var("KOMMUNE_BENCH_DIR").unwrap());
    let url = std::env::var("KOMMUNE_BENCH_URL").unwrap();
    let sizes = Sizes::from_env();
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let ids: Vec<Identity> = std::fs::read_to_string(dir.join("identities.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let server = kommune_agent::connect::parse_server(&url).unwrap();
    // Run for: the operator's wait before the window, the window, and a margin.
    let run_for = sizes.heartbeat * 2 + sizes.steady + Duration::from_secs(2);
    let sent: Arc<std::sync::Mutex<Vec<(usize, u64)>>> = Arc::default();
    // Set once every session is open: the agents stop `run_for` after that.
    let stop_at: Arc<std::sync::OnceLock<tokio::time::Instant>> = Arc::default();
    rt.block_on(async {
        let (welcomed_tx, mut welcomed) = mpsc::channel::<()>(ids.len().max(1));
        let handshakes = Arc::new(tokio::sync::Semaphore::new(64));
        let mut handles = vec![];
        for (i, id) in ids.iter().enumerate() {
            let (server, ca_pem, cert, key) = (server.clone(), ca_pem.clone(), id.cert_pem.clone(), id.key_pem.clone());
            let (welcomed_tx, handshakes, sent, every, stop_at) = (welcomed_tx.clone(), handshakes.clone(), sent.clone(), sizes.heartbeat, stop_at.clone());
            handles.push(tokio::spawn(async move {
                let permit = handshakes.acquire_owned().await.unwrap();
                let mut client = kommune_agent::connect::client(&server, &ca_pem, Some((&cert, &key))).await.unwrap();
                let (tx, rx) = mpsc::channel::<AgentMessage>(4);
                let hello = Hello { facts: Some(roomy_facts()), running_attempt_ids: vec![], paused: false };
                tx.send(AgentMessage { kind: Some(agent_message::Kind::Hello(hello)) }).await.unwrap();
                let mut inbound = client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
                match inbound.message().await {
                    Ok(Some(m)) if matches!(m.kind, Some(operator_message::Kind::Welcome(_))) => {}
                    other => panic!("no Welcome: {other:?}"),
                }
                drop(permit);
                let _ = welcomed_tx.send(()).await;
                // Spread the fleet over the interval, as independent machines are.
                let phase = every.mul_f64(rand::random::<f64>());
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, every);
                let mut mine = vec![];
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            if stop_at.get().is_some_and(|t| tokio::time::Instant::now() > *t) { break; }
                            mine.push((i, unix_micros()));
                            let hb = Heartbeat { running_attempt_ids: vec![], paused: false };
                            if tx.send(AgentMessage { kind: Some(agent_message::Kind::Heartbeat(hb)) }).await.is_err() { break; }
                        }
                        m = inbound.message() => match m {
                            Ok(Some(_)) => {}
                            other => panic!("session of sim-{i:05} ended: {other:?}"),
                        },
                    }
                }
                sent.lock().unwrap().extend(mine);
                (client, inbound, tx)
            }));
        }
        drop(welcomed_tx);
        for _ in 0..ids.len() {
            welcomed.recv().await.unwrap();
        }
        let _ = stop_at.set(tokio::time::Instant::now() + run_for);
        println!("connected");
        let _ = std::io::stdout().flush();
        // Keep every connection open until all are done, so none closes early.
        let mut kept = vec![];
        for h in handles {
            kept.push(h.await.unwrap());
        }
        let mut out = String::new();
        for (i, t) in sent.lock().unwrap().iter() {
            out.push_str(&format!("{}\t{t}\n", ids[*i].name));
        }
        std::fs::write(dir.join("sent.tsv"), out).unwrap();
        println!("sent");
        let _ = std::io::stdout().flush();
        drop(kept);
    });
    rt.shutdown_background();
}

// ---- round-trip stages ---------------------------------------------------------------------

/// The round trip's breakdown: every `kommune::stage` event (operator and agents alike) and the
/// bench's own marks, with the time it happened, by attempt or job.
mod stages {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    use kommune_proto::v1::AttemptState;
    use tracing::field::{Field, Visit};
    use tracing_subscriber::layer::{Context, Layer};

    use super::{SubscriberExt, percentile};

    static ON: AtomicBool = AtomicBool::new(false);
    /// (when, attempt id or job uid, what)
    static SEEN: Mutex<Vec<(Instant, String, String)>> = Mutex::new(Vec::new());

    pub fn install() {
        let only_stages = tracing_subscriber::filter::Targets::new().with_target(kommune_proto::STAGE_TARGET, tracing::Level::TRACE);
        let subscriber = tracing_subscriber::registry().with(Recorder.with_filter(only_stages));
        tracing::subscriber::set_global_default(subscriber).expect("no other subscriber in the bench");
        ON.store(true, Ordering::Relaxed);
    }

    pub fn clear() {
        SEEN.lock().unwrap().clear();
    }

    /// A mark of the bench's own (keyed by job uid: the attempt id is not known yet).
    pub fn mark(job_uid: &str, what: &str) {
        if ON.load(Ordering::Relaxed) {
            SEEN.lock().unwrap().push((Instant::now(), job_uid.to_string(), what.to_string()));
        }
    }

    struct Recorder;

    #[derive(Default)]
    struct Fields {
        attempt: String,
        message: String,
        state: Option<i64>,
    }

    impl Visit for Fields {
        fn record_i64(&mut self, field: &Field, value: i64) {
            if field.name() == "state" {
                self.state = Some(value);
            }
        }

        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            match field.name() {
                "attempt" => self.attempt = format!("{value:?}"),
                "message" => self.message = format!("{value:?}"),
                _ => {}
            }
        }
    }

    impl<S: tracing::Subscriber> Layer<S> for Recorder {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            let at = Instant::now();
            let mut f = Fields::default();
            event.record(&mut f);
            let side = if event.metadata().module_path().is_some_and(|m| m.starts_with("kommune_agent")) { "agent" } else { "operator" };
            let what = match f.state {
                Some(s) if s == AttemptState::Running as i64 => format!("{side}: {} (Running)", f.message),
                Some(_) => format!("{side}: {} (result)", f.message),
                None => format!("{side}: {}", f.message),
            };
            SEEN.lock().unwrap().push((at, f.attempt, what));
        }
    }

    /// Prints, for each stage, when it happened after the placement sync started (p50, p99 over
    /// the round trips), in order of the median; a stage seen several times in one round trip
    /// (the bench's syncs) counts its first and last occurrence as two stages.
    pub fn report(trips: &[(Instant, Instant, String, String)]) {
        if !ON.load(Ordering::Relaxed) {
            return;
        }
        let seen = std::mem::take(&mut *SEEN.lock().unwrap());
        let mut by_key: BTreeMap<&str, Vec<(Instant, &str)>> = BTreeMap::new();
        for (at, key, what) in &seen {
            by_key.entry(key.as_str()).or_default().push((*at, what.as_str()));
        }
        let mut offsets: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (started, ended, uid, attempt) in trips {
            let mut firsts: BTreeMap<String, f64> = BTreeMap::new();
            let mut lasts: BTreeMap<String, f64> = BTreeMap::new();
            for key in [uid.as_str(), attempt.as_str()] {
                for (at, what) in by_key.get(key).into_iter().flatten() {
                    if at < started || at > ended {
                        continue;
                    }
                    let ms = (*at - *started).as_secs_f64() * 1e3;
                    firsts.entry(what.to_string()).or_insert(ms);
                    lasts.insert(what.to_string(), ms);
                }
            }
            for (what, first) in &firsts {
                let last = lasts[what];
                if last > *first && what.starts_with("bench") {
                    offsets.entry(format!("{what} (last)")).or_default().push(last);
                }
                offsets.entry(what.clone()).or_default().push(*first);
            }
            offsets.entry("bench: round trip ends".into()).or_default().push((*ended - *started).as_secs_f64() * 1e3);
        }
        let mut rows: Vec<(f64, f64, usize, String)> = offsets
            .into_iter()
            .map(|(what, mut ms)| {
                ms.sort_by(f64::total_cmp);
                (percentile(&ms, 0.5), percentile(&ms, 0.99), ms.len(), what)
            })
            .collect();
        rows.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut previous = 0.0;
        for (p50, p99, n, what) in rows {
            println!("stage at_p50_ms={p50:.3} step_p50_ms={:.3} at_p99_ms={p99:.3} seen={n}/{} {what}", p50 - previous, trips.len());
            previous = p50;
        }
    }
}
