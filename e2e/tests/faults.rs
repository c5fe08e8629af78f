//! Fault injection with real agent processes: the `kommune-agent` binary, joined and run the
//! way a provider runs it, against the operator's gateway, dispatcher, store and ledger (in
//! this process, no Kubernetes: the test drives the dispatcher the way the ComputeJob
//! controller does, and runs the same expiry loop as the operator binary). The faults are done
//! to processes: SIGKILL mid-task, and SIGSTOP (a laptop lid closed, a VM paused) for less and
//! for more than the grace, at the operator's default timings. Each test checks afterwards
//! that the task ended exactly once as the retry policy says, that no capacity is still
//! reserved, and that metering counted each attempt at most once.
//!
//! Needs no cluster, so it always runs. It builds the agent binary first (as the walking
//! skeleton does).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kommune_operator::attempt::{Attempt, AttemptPhase};
use kommune_operator::blobs::Blobs;
use kommune_operator::crd::{ComputeJobSpec, JobPhase};
use kommune_operator::dispatch::{Dispatcher, JobRef};
use kommune_operator::fence::Fence;
use kommune_operator::fleet::Fleet;
use kommune_operator::gateway::{Gateway, GatewayConfig};
use kommune_operator::job::{JobPolicy, validate};
use kommune_operator::ledger::{Ledger, LedgerConfig};
use kommune_operator::pki::Ca;
use kommune_operator::pricing::{Micros, RateBook, Rates};
use kommune_operator::store::Store;
use kommune_operator::tokens::MemoryTokens;
use kommune_proto::token::JoinToken;
use tokio::sync::mpsc;

mod support;

const RATES: Rates = Rates { cpu_core_hour: Micros(1_000_000), memory_gib_hour: Micros(0), gpu_hour: Micros(0), output_gib: Micros(0) };

/// The operator binary's defaults: `--heartbeat-seconds 5` (a session is dropped after three
/// silent intervals) and `--node-grace-seconds 30`.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// The operator core on its own runtime, with the expiry loop of the operator binary.
struct Operator {
    url: String,
    ca: Arc<Ca>,
    tokens: Arc<MemoryTokens>,
    dispatcher: Arc<Dispatcher>,
    changed: tokio::sync::Mutex<mpsc::Receiver<String>>,
    runtime: Option<tokio::runtime::Runtime>,
    _dir: tempfile::TempDir,
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Operator {
    async fn start(heartbeat: Duration, grace: Duration) -> Operator {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(Ca::generate().unwrap());
        let tokens = Arc::new(MemoryTokens::default());
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let blobs = Blobs::open(dir.path()).unwrap();
        let (changed_tx, changed_rx) = mpsc::channel(1024);
        let ledger =
            Arc::new(Ledger::open(LedgerConfig { data_dir: dir.path().to_path_buf(), database_url: None, fence: Fence::open(), key_file: None }).unwrap());
        let dispatcher = Arc::new(Dispatcher::new(store, Arc::new(Fleet::default()), changed_tx).with_ledger(ledger, Arc::new(RateBook::new(RATES))));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (events_tx, mut events_rx) = mpsc::channel(1024);
        runtime.spawn(async move { while events_rx.recv().await.is_some() {} });
        let config = GatewayConfig { heartbeat_interval: heartbeat, session_timeout: heartbeat * 3, ..GatewayConfig::default() };
        let gateway = Gateway::new(dispatcher.clone(), tokens.clone(), ca.clone(), blobs, events_tx, config);
        let listener = runtime.spawn(tokio::net::TcpListener::bind(("127.0.0.1", 0))).await.unwrap().unwrap();
        let port = listener.local_addr().unwrap().port();
        runtime.spawn(gateway.serve(listener, std::future::pending()));
        // As in the operator binary's main: every second, attempts of nodes gone past the grace.
        let expiry = dispatcher.clone();
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                expiry.expire_absent(grace).await.unwrap();
            }
        });
        Operator {
            url: format!("https://127.0.0.1:{port}"),
            ca,
            tokens,
            dispatcher,
            changed: tokio::sync::Mutex::new(changed_rx),
            runtime: Some(runtime),
            _dir: dir,
        }
    }

    fn token(&self) -> String {
        let t = JoinToken::generate(&self.ca.pin());
        self.tokens.insert(&t, Timestamp::now() + SignedDuration::from_secs(600), 1);
        t.to_string()
    }

    async fn attempts(&self, job: &JobRef) -> Vec<Attempt> {
        let mut a = self.dispatcher.store().attempts_for_job(&job.uid).await.unwrap();
        a.sort_by_key(|a| a.number);
        a
    }

    /// Waits until `check` holds for the job's attempts, syncing the job on every change the
    /// dispatcher reports (as the controller does); returns how long it took.
    async fn sync_until(&self, job: &JobRef, policy: &JobPolicy, within: Duration, what: &str, check: impl Fn(&[Attempt]) -> bool) -> Duration {
        let started = Instant::now();
        let mut changed = self.changed.lock().await;
        loop {
            self.dispatcher.sync(job, policy, None).await.unwrap();
            let attempts = self.attempts(job).await;
            if check(&attempts) {
                return started.elapsed();
            }
            assert!(started.elapsed() < within, "{what}: not within {within:?}; attempts: {:?}", summary(&attempts));
            let _ = tokio::time::timeout(Duration::from_millis(100), changed.recv()).await;
        }
    }

    async fn wait_connected(&self, name: &str, connected: bool, within: Duration) -> Duration {
        let started = Instant::now();
        while self.dispatcher.fleet().is_connected(name) != connected {
            assert!(started.elapsed() < within, "{name} connected={} after {within:?}", !connected);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        started.elapsed()
    }

    /// When the operator last heard from a node that has no session now: the grace counts
    /// from here.
    fn last_heard(&self, name: &str) -> Instant {
        let absent = self.dispatcher.fleet().absent_for(name).expect("the node is known and absent");
        Instant::now() - absent
    }
}

fn summary(attempts: &[Attempt]) -> Vec<(u32, String, AttemptPhase)> {
    attempts.iter().map(|a| (a.number, a.node.clone(), a.phase)).collect()
}

fn agent_binary() -> PathBuf {
    // The same build as the other e2e tests (both binaries): building one package alone would
    // resolve features differently and rebuild shared dependencies back and forth.
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| support::build_binaries().expect("cargo build of the binaries"));
    support::binary("kommune-agent")
}

/// A provider machine: `kommune-agent join`, then `kommune-agent run` as a child process.
struct Provider {
    name: String,
    state_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Provider {
    fn join(op: &Operator, dir: &Path, name: &str) -> Provider {
        let state_dir = dir.join(name);
        let out = Command::new(agent_binary())
            .args(["join", "--server", &op.url, "--token", &op.token(), "--name", name, "--state-dir"])
            .arg(&state_dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "join {name}: {}", String::from_utf8_lossy(&out.stderr));
        let mut p = Provider { name: name.into(), log: dir.join(format!("{name}.log")), state_dir, child: None };
        p.run();
        p
    }

    /// Starts (or restarts) `kommune-agent run`, exec tasks allowed, with a small offer so
    /// placements are easy to follow.
    fn run(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(agent_binary())
            .args(["run", "--allow-exec", "--cpus", "1", "--memory", "1Gi", "--state-dir"])
            .arg(&self.state_dir)
            .env("RUST_LOG", "info,kommune_agent=debug")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill").args([&format!("-{signal}"), &pid]).status().unwrap();
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// SIGKILL, as a crash or an OOM kill would: nothing of the agent runs afterwards.
    fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn print_log(&self) {
        println!("--- {} ({}) ---\n{}", self.name, self.log.display(), std::fs::read_to_string(&self.log).unwrap_or_default());
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-CONT", &c.id().to_string()]).stderr(Stdio::null()).status();
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            self.print_log();
        }
    }
}

fn policy(yaml: &str) -> JobPolicy {
    let spec: ComputeJobSpec = serde_yaml::from_str(yaml).unwrap();
    validate(&spec).unwrap()
}

/// Processes running with their working directory under `dir` (a task runs in its scratch
/// directory, under the agent's state directory).
fn processes_in(dir: &Path) -> Vec<i32> {
    let Ok(dir) = dir.canonicalize() else { return vec![] };
    let mut pids = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        if std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(&dir)) {
            pids.push(pid);
        }
    }
    pids
}

/// One task that sleeps `seconds`, with one retry and no backoff.
fn sleeper(seconds: u32) -> JobPolicy {
    policy(&format!(
        "workload:\n  exec:\n    command: ['/bin/sh', '-c', 'sleep {seconds}; echo done']\nresources: {{cpu: 500m, memory: 64Mi}}\nretries: {{maxAttempts: 2, backoffSeconds: 0}}\n"
    ))
}

fn running_on(attempts: &[Attempt]) -> Option<String> {
    attempts.iter().find(|a| a.phase == AttemptPhase::Running).map(|a| a.node.clone())
}

/// Whatever happened, afterwards: one success, no reservation left, and the ledger's receipts
/// are for distinct attempts of this job (each metered at most once).
async fn assert_clean_end(op: &Operator, job: &JobRef, expected: &[(u32, &str, AttemptPhase)]) {
    let attempts = op.attempts(job).await;
    let got: Vec<(u32, &str, AttemptPhase)> = attempts.iter().map(|a| (a.number, a.node.as_str(), a.phase)).collect();
    assert_eq!(got, expected);
    // The room is released just after the result commits (the store shows the end first).
    let ended = Instant::now();
    while op.dispatcher.fleet().pool().reservations() > 0 && ended.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let held: Vec<&str> = attempts.iter().filter(|a| op.dispatcher.fleet().pool().is_reserved(&a.id)).map(|a| a.id.as_str()).collect();
    assert_eq!(op.dispatcher.fleet().pool().reservations(), 0, "capacity is still reserved after the job ended (of this job's attempts: {held:?})");
    let usage = op.dispatcher.ledger().unwrap().job_usage(&job.uid).await.unwrap();
    assert!(usage.receipts <= attempts.len() as u64, "more receipts ({}) than attempts ({})", usage.receipts, attempts.len());
    assert!(usage.receipts >= 1, "the successful attempt is metered");
    println!("{}: {} receipts for {} attempts, none reserved", job.key, usage.receipts, attempts.len());
}

/// The agent process running a task is SIGKILLed. Its connection closes with it, so the node
/// is gone at once; the attempt is Lost after the grace and runs again on the other machine.
/// The task's own processes outlive the killed agent; its next run stops them before taking
/// work, and does not bring the old attempt back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_process_killed_mid_task_loses_its_attempt_after_the_grace_and_the_task_runs_once_elsewhere() {
    const GRACE: Duration = Duration::from_secs(3);
    let op = Operator::start(Duration::from_secs(1), GRACE).await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = Provider::join(&op, dir.path(), "kill-a");
    let mut b = Provider::join(&op, dir.path(), "kill-b");
    for p in [&a, &b] {
        op.wait_connected(&p.name, true, Duration::from_secs(30)).await;
    }
    let job = JobRef { uid: "killed-agent".into(), key: "default/killed-agent".into() };
    let work = sleeper(10);
    op.sync_until(&job, &work, Duration::from_secs(30), "the task runs", |a| running_on(a).is_some()).await;
    let victim_name = running_on(&op.attempts(&job).await).unwrap();
    let (victim, survivor) = if victim_name == a.name { (&mut a, &b) } else { (&mut b, &a) };
    let scratch = victim.state_dir.join("scratch");
    assert!(!processes_in(&scratch).is_empty(), "the task's processes run in its scratch directory");

    let killed = Instant::now();
    victim.kill9();
    let detected = op.wait_connected(&victim.name, false, Duration::from_secs(10)).await;
    let last_heard = op.last_heard(&victim.name);
    let orphans = processes_in(&scratch);
    assert!(!orphans.is_empty(), "a SIGKILLed agent cannot stop its task: its processes live on");
    op.sync_until(&job, &work, Duration::from_secs(30), "the attempt is placed elsewhere", |a| a.iter().any(|a| a.number == 2)).await;
    let moved = killed.elapsed();
    println!(
        "measured: agent SIGKILLed mid-task: node gone after {:.2} s, its attempt placed elsewhere after {:.2} s (grace {} s from its last message, {:.2} s before the kill)",
        detected.as_secs_f64(),
        moved.as_secs_f64(),
        GRACE.as_secs(),
        last_heard.elapsed().saturating_sub(killed.elapsed()).as_secs_f64()
    );
    // The grace counts from the node's last message (a heartbeat up to 1 s before the kill).
    assert!(last_heard.elapsed() >= GRACE, "moved {:?} after the node's last message, before the grace", last_heard.elapsed());
    assert!(moved <= GRACE + Duration::from_secs(3), "not moved soon after the grace: {moved:?}");

    // The killed agent comes back: it stops what its earlier run left, the old attempt stays
    // Lost, nothing runs twice.
    victim.run();
    op.wait_connected(&victim.name, true, Duration::from_secs(30)).await;
    let restarted = Instant::now();
    while !processes_in(&scratch).is_empty() {
        assert!(restarted.elapsed() < Duration::from_secs(5), "the restarted agent left its old task running: {:?}", processes_in(&scratch));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(killed.elapsed() < Duration::from_secs(10), "the old task would have ended by itself by now; the check above proves nothing");
    op.sync_until(&job, &work, Duration::from_secs(60), "the task succeeds on the other machine", |a| a.iter().any(|a| a.phase == AttemptPhase::Succeeded))
        .await;
    let expected = [(1, victim.name.as_str(), AttemptPhase::Lost), (2, survivor.name.as_str(), AttemptPhase::Succeeded)];
    assert_clean_end(&op, &job, &expected).await;
    assert_eq!(op.dispatcher.sync(&job, &work, None).await.unwrap().progress.phase, JobPhase::Succeeded);
}

/// A provider's machine freezes (SIGSTOP: a laptop lid closed, a VM paused): its connection
/// stays open but nothing comes from it. At the operator's default timings: first frozen for
/// 20 s, less than the grace: the node is noticed gone after the session timeout, but its
/// attempt is kept, and when it thaws it reconnects and the task finishes there, once. Then
/// frozen past the grace: the attempt is Lost and runs on the other machine; when the frozen
/// one thaws, its stale attempt is not recorded as the task's result and not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_keeps_its_task_within_the_grace_and_loses_it_past_the_grace_at_default_timings() {
    let op = Operator::start(DEFAULT_HEARTBEAT, DEFAULT_GRACE).await;
    let dir = tempfile::tempdir().unwrap();
    let a = Provider::join(&op, dir.path(), "freeze-a");
    let b = Provider::join(&op, dir.path(), "freeze-b");
    for p in [&a, &b] {
        op.wait_connected(&p.name, true, Duration::from_secs(30)).await;
    }
    let by_name = |n: &str| if n == a.name { &a } else { &b };

    // 1. Frozen for less than the grace.
    let short = JobRef { uid: "short-freeze".into(), key: "default/short-freeze".into() };
    let work = sleeper(4);
    op.sync_until(&short, &work, Duration::from_secs(30), "the task runs", |a| running_on(a).is_some()).await;
    let frozen = by_name(&running_on(&op.attempts(&short).await).unwrap());
    frozen.signal("STOP");
    let stopped = Instant::now();
    let detected = op.wait_connected(&frozen.name, false, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(stopped.elapsed())).await;
    assert!(op.attempts(&short).await.iter().all(|a| a.number == 1), "nothing moved within the grace: {:?}", summary(&op.attempts(&short).await));
    frozen.signal("CONT");
    let back = op.wait_connected(&frozen.name, true, Duration::from_secs(30)).await;
    op.sync_until(&short, &work, Duration::from_secs(30), "the task finishes where it ran", |a| a.iter().any(|a| a.phase == AttemptPhase::Succeeded)).await;
    println!(
        "measured (defaults: heartbeat {} s, session timeout {} s, grace {} s): agent frozen 20 s: noticed gone after {:.2} s, reconnected {:.2} s after it thawed, kept its attempt",
        DEFAULT_HEARTBEAT.as_secs(),
        DEFAULT_HEARTBEAT.as_secs() * 3,
        DEFAULT_GRACE.as_secs(),
        detected.as_secs_f64(),
        back.as_secs_f64()
    );
    assert_clean_end(&op, &short, &[(1, frozen.name.as_str(), AttemptPhase::Succeeded)]).await;

    // 2. Frozen past the grace.
    let long = JobRef { uid: "long-freeze".into(), key: "default/long-freeze".into() };
    op.sync_until(&long, &work, Duration::from_secs(30), "the task runs", |a| running_on(a).is_some()).await;
    let frozen = by_name(&running_on(&op.attempts(&long).await).unwrap());
    let other = if frozen.name == a.name { &b } else { &a };
    frozen.signal("STOP");
    let stopped = Instant::now();
    let detected = op.wait_connected(&frozen.name, false, Duration::from_secs(30)).await;
    let last_heard = op.last_heard(&frozen.name);
    op.sync_until(&long, &work, Duration::from_secs(60), "the attempt is placed elsewhere", |a| a.iter().any(|a| a.number == 2)).await;
    let moved = stopped.elapsed();
    let since_last_message = last_heard.elapsed();
    op.sync_until(&long, &work, Duration::from_secs(30), "the task succeeds elsewhere", |a| a.iter().any(|a| a.phase == AttemptPhase::Succeeded)).await;
    frozen.signal("CONT");
    op.wait_connected(&frozen.name, true, Duration::from_secs(30)).await;
    // Time for the thawed agent to report what its stale attempt did.
    tokio::time::sleep(Duration::from_secs(3)).await;
    op.dispatcher.sync(&long, &work, None).await.unwrap();
    println!(
        "measured (defaults): agent frozen past the grace: noticed gone after {:.2} s, its attempt placed elsewhere {:.2} s after it froze",
        detected.as_secs_f64(),
        moved.as_secs_f64()
    );
    assert!(detected <= DEFAULT_HEARTBEAT * 3 + Duration::from_secs(2), "noticed within the session timeout (and a margin): {detected:?}");
    // The grace counts from the node's last message, which came at most one heartbeat before
    // it froze; the expiry loop runs every second.
    assert!(since_last_message >= DEFAULT_GRACE, "moved {since_last_message:?} after the node's last message, within the grace");
    assert!(moved <= DEFAULT_GRACE + Duration::from_secs(3), "not moved soon after the grace: {moved:?}");
    assert_clean_end(&op, &long, &[(1, frozen.name.as_str(), AttemptPhase::Lost), (2, other.name.as_str(), AttemptPhase::Succeeded)]).await;
    assert_eq!(op.dispatcher.sync(&long, &work, None).await.unwrap().progress.phase, JobPhase::Succeeded);
}
