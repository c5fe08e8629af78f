//! High availability end to end: two operator processes under leader election against a real
//! API server, sharing one PostgreSQL database (attempts and ledger), and one agent reaching
//! them through a proxy that, like the chart's gateway Service, sends each new connection to
//! the ready replica. The leader is frozen (SIGSTOP) while a task runs, for longer than its
//! Lease: the standby takes over, the agent reconnects to it, and the task that was running
//! finishes there on its first attempt and is metered once. Then the old leader thaws: it
//! writes nothing and exits.
//!
//! Needs an API server (`KUBECONFIG`, or `KUBEBUILDER_ASSETS`) and PostgreSQL
//! (`KOMMUNE_TEST_DATABASE_URL`, which `hack/test.sh` provides when PostgreSQL is installed);
//! without them it prints one skip line and passes.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kommune_operator::crd::{ComputeJob, ProviderNode};
use kube::ResourceExt as _;
use kube::api::Api;

mod support;
use support::{binary, build_binaries, eventually, free_port, harness, http_status, http_status_within, install};

const LEASE_SECONDS: u64 = 6;

/// How long `eventually` took.
async fn timed<F, Fut>(what: &str, timeout: Duration, check: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let started = Instant::now();
    eventually(what, timeout, check).await?;
    Ok(started.elapsed())
}

/// What the chart's gateway Service does for agents: each new connection goes to the replica
/// whose `/readyz` answers 200 (`backends` pairs each gateway port with its metrics port).
/// Connections already open stay where they are, as with kube-proxy.
async fn ready_proxy(backends: Vec<(u16, u16)>) -> Result<u16> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let backends = backends.clone();
            tokio::spawn(async move {
                let ready = tokio::task::spawn_blocking(move || {
                    backends.iter().find(|(_, m)| http_status_within(*m, "/readyz", Duration::from_secs(1)) == Some(200)).map(|(g, _)| *g)
                })
                .await
                .ok()
                .flatten();
                let Some(gateway) = ready else { return };
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", gateway)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Ok(port)
}

fn database(base: &str, name: &str) -> Result<String> {
    let mut admin = postgres::Client::connect(base, postgres::NoTls).context("connect to KOMMUNE_TEST_DATABASE_URL")?;
    admin.batch_execute(&format!("CREATE DATABASE {name}"))?;
    // Replace the database name (the path) of the URL.
    let (prefix, rest) = base.rsplit_once('/').context("KOMMUNE_TEST_DATABASE_URL has no database path")?;
    let query = rest.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
    Ok(format!("{prefix}/{name}{query}"))
}

#[allow(clippy::too_many_arguments)]
fn operator_args<'a>(
    gateway: &'a str,
    metrics: &'a str,
    data: &'a str,
    ns: &'a str,
    identity: &'a str,
    url: &'a str,
    lease: &'a str,
    key: &'a str,
) -> Vec<&'a str> {
    vec![
        // One ledger, one signing key: the chart mounts one Secret into every replica.
        "--ledger-key-file",
        key,
        "--gateway-listen",
        gateway,
        "--metrics-listen",
        metrics,
        "--data-dir",
        data,
        "--namespace",
        ns,
        "--heartbeat-seconds",
        "2",
        "--node-grace-seconds",
        "60",
        "--leader-election",
        "--leader-identity",
        identity,
        "--lease-seconds",
        lease,
        "--database-url",
        url,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_frozen_past_its_lease_hands_running_work_to_the_standby_and_writes_nothing_when_it_thaws() -> Result<()> {
    let Some(mut h) = harness()? else {
        println!("{}", support::SKIPPED);
        return Ok(());
    };
    let Some(base_url) = std::env::var("KOMMUNE_TEST_DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: no PostgreSQL (set KOMMUNE_TEST_DATABASE_URL; hack/test.sh starts one when PostgreSQL is installed)");
        return Ok(());
    };
    build_binaries()?;
    let client = h.client().await?;
    let ns = h.namespace.clone();
    let op_ns = format!("{ns}-system");
    h.create_namespaces(&[&ns, &op_ns]);
    // The chart's CRDs and RBAC (with helm): both replicas run as its ServiceAccount.
    let installed = install(&h, &client, &op_ns).await?;
    let kubeconfig = installed.operator_kubeconfig.clone();

    // Two replicas on one database, each with its own data directory (its own disk).
    // The sync PostgreSQL client must not run on the test's async runtime.
    let name = format!("kommune_ha_{}", std::process::id());
    let url = tokio::task::spawn_blocking(move || database(&base_url, &name)).await??;
    let operator = binary("kommune-operator");
    let lease = LEASE_SECONDS.to_string();
    let mut replicas = vec![];
    let key = h.work.path().join("ledger-key.pem").display().to_string();
    for name in ["leader", "standby"] {
        let (gateway, metrics) = (free_port(), free_port());
        let data = h.work.path().join(format!("{name}-data"));
        let (g, m, d) = (format!("127.0.0.1:{gateway}"), format!("127.0.0.1:{metrics}"), data.display().to_string());
        let identity = format!("ha-{name}");
        h.spawn(name, &operator, &kubeconfig, &operator_args(&g, &m, &d, &op_ns, &identity, &url, &lease, &key))?;
        replicas.push((gateway, metrics));
        // The first becomes the leader before the second starts.
        eventually(&format!("{name} healthy"), Duration::from_secs(60), || async move { Ok(http_status(metrics, "/healthz") == Some(200)) }).await?;
        if name == "leader" {
            eventually("the leader ready", Duration::from_secs(60), || async move { Ok(http_status(metrics, "/readyz") == Some(200)) }).await?;
        }
    }
    let (leader_metrics, standby_metrics) = (replicas[0].1, replicas[1].1);
    assert_eq!(http_status(standby_metrics, "/readyz"), Some(503), "the standby is not ready");
    let service = ready_proxy(replicas.clone()).await?;

    // One agent, joined and connected through the "Service".
    let out =
        Command::new(&operator).env("KUBECONFIG", &h.kubeconfig).args(["token", "create", "--uses", "1", "--ttl", "10m", "--namespace", &op_ns]).output()?;
    assert!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    let agent = binary("kommune-agent");
    let state = h.work.path().join("ha-agent");
    let server = format!("https://127.0.0.1:{service}");
    let out =
        Command::new(&agent).args(["join", "--server", &server, "--token", &token, "--name", "ha-agent", "--state-dir", state.to_str().unwrap()]).output()?;
    assert!(out.status.success(), "join: {}", String::from_utf8_lossy(&out.stderr));
    let agent_kubeconfig = h.kubeconfig.clone();
    h.spawn("agent", &agent, &agent_kubeconfig, &["run", "--state-dir", state.to_str().unwrap(), "--allow-exec"])?;
    let nodes: Api<ProviderNode> = Api::all(client.clone());
    eventually("ProviderNode ha-agent Ready", Duration::from_secs(60), || {
        let nodes = nodes.clone();
        async move { Ok(nodes.get_opt("ha-agent").await?.and_then(|n| n.status).is_some_and(|s| kommune_operator::crd::is_true(&s.conditions, "Ready"))) }
    })
    .await?;

    // A task that runs across the takeover; one attempt allowed, so a re-run would fail it.
    let job_yaml = "apiVersion: kommune.dev/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: across-takeover\nspec:\n  tasks: 1\n  workload:\n    exec:\n      command: ['/bin/sh', '-c', 'sleep 12; echo survived']\n  resources: {cpu: 100m, memory: 32Mi}\n  retries: {maxAttempts: 1}\n";
    let job_file = h.work.path().join("job.yaml");
    std::fs::write(&job_file, job_yaml)?;
    let out = h.kubectl(&["apply", "-n", &ns, "-f", job_file.to_str().unwrap()]);
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
    let jobs: Api<ComputeJob> = Api::namespaced(client.clone(), &ns);
    let running = |jobs: Api<ComputeJob>| async move { Ok(jobs.get("across-takeover").await?.status.is_some_and(|s| s.tasks.running == 1)) };
    eventually("the task running", Duration::from_secs(60), || running(jobs.clone())).await?;

    // Freeze the leader for three Lease durations.
    h.signal("leader", "STOP");
    let frozen = Instant::now();
    let takeover = timed("the standby ready", Duration::from_secs(60), || async move { Ok(http_status(standby_metrics, "/readyz") == Some(200)) }).await?;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), &op_ns);
    assert_eq!(leases.get("kommune-operator").await?.spec.and_then(|s| s.holder_identity).as_deref(), Some("ha-standby"));
    let done = |jobs: Api<ComputeJob>| async move {
        let job = jobs.get("across-takeover").await?;
        let status = job.status.unwrap_or_default();
        if status.tasks.failed > 0 {
            bail!("the task failed: {:?}", status.recent_results);
        }
        Ok(status.tasks.succeeded == 1)
    };
    timed("the task finished under the new leader", Duration::from_secs(90), || done(jobs.clone())).await?;
    let finished = frozen.elapsed();
    let status = jobs.get("across-takeover").await?.status.unwrap();
    let result = &status.recent_results[0];
    assert_eq!((result.attempt, result.node.as_str(), result.stdout_tail.as_str()), (1, "ha-agent", "survived\n"), "{result:?}");
    eventually("the task metered", Duration::from_secs(30), || {
        let jobs = jobs.clone();
        async move { Ok(jobs.get("across-takeover").await?.status.and_then(|s| s.usage).is_some_and(|u| u.receipts == 1)) }
    })
    .await?;
    let thaw_at = Duration::from_secs(LEASE_SECONDS * 3);
    tokio::time::sleep(thaw_at.saturating_sub(frozen.elapsed())).await;
    println!(
        "HA: leader frozen; standby ready after {:.1} s (lease {LEASE_SECONDS} s); the running task finished under it {:.1} s after the freeze, on its first attempt",
        takeover.as_secs_f64(),
        finished.as_secs_f64()
    );

    // The old leader thaws: it must see it lost the Lease and exit, writing nothing.
    let jobs_before = jobs.get("across-takeover").await?;
    h.signal("leader", "CONT");
    let thawed = Instant::now();
    let exit = loop {
        if let Some(status) = h.try_wait("leader")? {
            break status;
        }
        assert!(thawed.elapsed() < Duration::from_secs(30), "the thawed leader is still running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("HA: the thawed old leader exited after {:.1} s: {exit}", thawed.elapsed().as_secs_f64());
    assert!(!exit.success());
    let log = std::fs::read_to_string(h.log("leader"))?;
    assert!(log.contains("lost the leader Lease") || log.contains("could not renew the leader Lease"), "the old leader says why it stopped");
    assert_eq!(jobs.get("across-takeover").await?.resource_version(), jobs_before.resource_version(), "the old leader wrote nothing to the job");
    assert_eq!(http_status(standby_metrics, "/readyz"), Some(200), "the new leader still leads");
    assert_eq!(http_status_within(leader_metrics, "/readyz", Duration::from_secs(1)), None);

    // One ledger for both: it verifies, with the one receipt.
    // The operator was killed, not stopped: entries after its last checkpoint carry no operator
    // signature yet, so strict verification would refuse them; they are checked all the same.
    let out = Command::new(&operator).args(["ledger", "verify", "--accept-unsigned-tail", "--database-url", &url]).output()?;
    let report = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ledger verify: {report}");
    println!("HA: ledger verify: {}", report.trim());
    Ok(())
}
