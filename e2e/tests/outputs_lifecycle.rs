//! The lifecycle of outputs kept by the operator, against the API server: a job with
//! `ttlSecondsAfterFinished` is deleted by the operator once that time has passed and its
//! outputs leave the operator's volume with it; a job whose outputs do not fit the operator's
//! disk limit fails with the reason, and says so in `OutputsStored=False` and a Warning Event.
//! The operator binary (under the chart's RBAC when helm is there) and a real agent.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::events::v1::Event;
use kommune_operator::crd::ComputeJob;
use kube::ResourceExt as _;
use kube::api::{Api, ListParams};

use support::{Harness, Installed, SKIPPED, binary, build_binaries, condition, eventually, free_port, harness, install};

/// The operator keeps at most this much output on its volume.
const DISK_LIMIT: &str = "16Ki";
/// How long the short-lived job and its outputs stay after it finished.
const TTL_SECONDS: u64 = 15;

fn manifest(name: &str, script: &str, extra: &str) -> String {
    format!(
        "apiVersion: kommune.dev/v1alpha1
kind: ComputeJob
metadata: {{name: {name}}}
spec:
  tasks: 1
  workload:
    exec:
      command: [/bin/sh, -c, '{script}']
  resources: {{cpu: 250m, memory: 64Mi}}
  retries: {{maxAttempts: 1}}
  timeouts: {{taskSeconds: 60}}
{extra}"
    )
}

/// Files under `dir`, recursively (none when it does not exist).
fn files_under(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().map(|e| if e.path().is_dir() { files_under(&e.path()) } else { 1 }).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_expire_with_their_job_and_a_full_store_says_so() -> Result<()> {
    let Some(mut h) = harness()? else {
        println!("{SKIPPED}");
        return Ok(());
    };
    // A panic while the harness lives prints the processes' logs and the cluster's objects.
    if let Err(e) = scenario(&mut h).await {
        panic!("{e:?}");
    }
    Ok(())
}

async fn scenario(h: &mut Harness) -> Result<()> {
    build_binaries()?;
    let client = h.client().await?;
    let ns = h.namespace.clone();
    let op_ns = format!("{ns}-system");
    h.create_namespaces(&[&ns, &op_ns]);
    let Installed { operator_kubeconfig, .. } = install(h, &client, &op_ns).await?;

    let (gateway, metrics) = (free_port(), free_port());
    let data = h.work.path().join("operator-data");
    let operator = binary("kommune-operator");
    let (gateway_listen, metrics_listen) = (format!("127.0.0.1:{gateway}"), format!("127.0.0.1:{metrics}"));
    h.spawn(
        "operator",
        &operator,
        &operator_kubeconfig,
        &[
            "--gateway-listen",
            &gateway_listen,
            "--metrics-listen",
            &metrics_listen,
            "--data-dir",
            data.to_str().unwrap(),
            "--namespace",
            &op_ns,
            "--heartbeat-seconds",
            "2",
            "--outputs-disk-limit",
            DISK_LIMIT,
        ],
    )?;
    eventually("the operator's gateway", Duration::from_secs(60), || async { Ok(std::net::TcpStream::connect(("127.0.0.1", gateway)).is_ok()) }).await?;
    let token_out =
        Command::new(&operator).env("KUBECONFIG", &h.kubeconfig).args(["token", "create", "--uses", "1", "--ttl", "10m", "--namespace", &op_ns]).output()?;
    assert!(token_out.status.success(), "token create: {}", String::from_utf8_lossy(&token_out.stderr));
    let token = String::from_utf8(token_out.stdout)?.trim().to_string();
    let agent = binary("kommune-agent");
    let state = h.work.path().join("agent");
    let out = Command::new(&agent)
        .args(["join", "--server", &format!("https://127.0.0.1:{gateway}"), "--token", &token, "--name", "keeper", "--state-dir", state.to_str().unwrap()])
        .output()?;
    assert!(out.status.success(), "join: {}", String::from_utf8_lossy(&out.stderr));
    let kubeconfig = h.kubeconfig.clone();
    h.spawn("agent", &agent, &kubeconfig, &["run", "--state-dir", state.to_str().unwrap(), "--allow-exec", "--cpus", "2", "--memory", "2Gi"])?;

    let jobs: Api<ComputeJob> = Api::namespaced(client.clone(), &ns);
    let apply = |name: &str, yaml: String| {
        let path = h.work.path().join(format!("{name}.yaml"));
        std::fs::write(&path, yaml).expect("write a manifest");
        let out = h.kubectl(&["apply", "-n", &ns, "-f", path.to_str().unwrap()]);
        assert!(out.status.success(), "apply {name}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let phase_is = |name: &'static str, phase: &'static str| {
        let jobs = jobs.clone();
        move || {
            let jobs = jobs.clone();
            async move { Ok(condition(&jobs.get(name).await?, phase).is_some_and(|c| c.0 == "True")) }
        }
    };

    // 1. A job whose outputs fit, deleted TTL_SECONDS after it succeeded, outputs and all.
    apply(
        "short-lived",
        manifest(
            "short-lived",
            "mkdir -p out && head -c 3000 /dev/zero > out/r.bin && echo stored",
            &format!("  outputs: {{paths: [r.bin]}}\n  ttlSecondsAfterFinished: {TTL_SECONDS}\n"),
        ),
    );
    eventually("short-lived Succeeded", Duration::from_secs(120), phase_is("short-lived", "Succeeded")).await?;
    let done = Instant::now();
    let job = jobs.get("short-lived").await?;
    let uid = job.uid().context("the job has a uid")?;
    let kept = data.join("outputs").join(&uid);
    // out/r.bin and stdout (stderr is empty, and stored too when the agent sends it).
    assert!(files_under(&kept) >= 2, "the accepted attempt's outputs are on the operator's volume under {}", kept.display());
    assert!(condition(&job, "OutputsStored").is_none_or(|c| c.0 == "True"), "{:?}", condition(&job, "OutputsStored"));
    let watch = jobs.clone();
    eventually("the operator deletes short-lived after its TTL", Duration::from_secs(TTL_SECONDS + 60), move || {
        let jobs = watch.clone();
        async move { Ok(jobs.get_opt("short-lived").await?.is_none()) }
    })
    .await?;
    let after = done.elapsed();
    assert!(after >= Duration::from_secs(TTL_SECONDS - 1), "deleted {after:?} after it finished, before its TTL of {TTL_SECONDS} s");
    println!("short-lived deleted {:.1} s after it succeeded (ttlSecondsAfterFinished: {TTL_SECONDS})", after.as_secs_f64());
    assert!(!kept.exists(), "the deleted job's outputs are removed from {}", kept.display());

    // 2. A job whose output does not fit the operator's disk limit: the attempt fails with the
    // reason, the job says why in OutputsStored and a Warning Event, and the store stays usable.
    apply("overflow", manifest("overflow", "mkdir -p out && head -c 40000 /dev/zero > out/big.bin", "  outputs: {paths: [big.bin]}\n"));
    eventually("overflow Failed", Duration::from_secs(120), phase_is("overflow", "Failed")).await?;
    let watch = jobs.clone();
    eventually("overflow: OutputsStored=False OutputStoreFull", Duration::from_secs(30), move || {
        let jobs = watch.clone();
        async move { Ok(condition(&jobs.get("overflow").await?, "OutputsStored").is_some_and(|c| c.0 == "False" && c.1 == "OutputStoreFull")) }
    })
    .await?;
    let job = jobs.get("overflow").await?;
    let (_, _, message) = condition(&job, "OutputsStored").unwrap_or_default();
    assert!(message.contains("the operator's output store is full") && message.contains("out/big.bin"), "{message}");
    let failure = job.status.as_ref().and_then(|s| s.recent_results.first()).map(|r| r.message.clone()).unwrap_or_default();
    assert!(failure.contains("outputs not stored: out/big.bin"), "the attempt failed saying why: {failure:?}");
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    eventually("a Warning Event OutputStoreFull on overflow", Duration::from_secs(30), move || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await?;
            Ok(list.items.iter().any(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("overflow")
                    && e.reason.as_deref() == Some("OutputStoreFull")
                    && e.type_.as_deref() == Some("Warning")
            }))
        }
    })
    .await?;

    // 3. The store still takes outputs that fit.
    apply("after", manifest("after", "mkdir -p out && echo fits > out/r.txt", "  outputs: {paths: [r.txt]}\n"));
    eventually("after Succeeded", Duration::from_secs(120), phase_is("after", "Succeeded")).await?;
    Ok(())
}
