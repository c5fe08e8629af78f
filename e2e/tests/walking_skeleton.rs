//! The walking skeleton, end to end against a real API server: CRDs applied, the operator
//! binary running, two agents joined as local processes, both examples run to Succeeded, bad
//! jobs reported with conditions and Events, and a deleted job cleaned up by its finalizer.
//!
//! Runs against `KUBECONFIG`, or starts kube-apiserver + etcd from `KUBEBUILDER_ASSETS`
//! (e2e/envtest-apiserver.sh). With neither it prints one skip line and passes.

mod support;

use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kommune_operator::crd::{ComputeJob, ProviderNode};
use kube::api::{Api, ListParams, Patch, PatchParams};

use kommune_e2e::repo;
use support::{Installed, LEASE_SECONDS, SKIPPED, binary, build_binaries, condition, eventually, free_port, harness, http_status, install};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walking_skeleton() -> Result<()> {
    let Some(mut h) = harness()? else {
        println!("{SKIPPED}");
        return Ok(());
    };
    build_binaries()?;
    let client = h.client().await?;
    let ns = h.namespace.clone();

    let op_ns = format!("{ns}-system");
    h.create_namespaces(&[&ns, &op_ns]);
    // 1. Install: with helm, the chart itself (CRDs, ServiceAccount, RBAC, Services, a
    //    StatefulSet scaled to 0 because the operator runs here as a local process, with exactly
    //    the chart's RBAC by impersonating its ServiceAccount). Without helm, crds/ directly and
    //    the admin's credentials.
    let Installed { operator_kubeconfig, helm } = install(&h, &client, &op_ns).await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());

    // 2. The operator binary, as a local process.
    let gateway = free_port();
    let metrics = free_port();
    let data = h.work.path().join("operator-data");
    let operator = binary("kommune-operator");
    h.spawn(
        "operator",
        &operator,
        &operator_kubeconfig,
        &[
            "--gateway-listen",
            &format!("127.0.0.1:{gateway}"),
            "--metrics-listen",
            &format!("127.0.0.1:{metrics}"),
            "--data-dir",
            data.to_str().unwrap(),
            "--namespace",
            &op_ns,
            "--heartbeat-seconds",
            "2",
            "--leader-election",
            "--leader-identity",
            "e2e-operator-a",
            "--lease-seconds",
            LEASE_SECONDS,
            // As the chart runs it: its schema over the installed CRDs, with the chart's RBAC.
            "--upgrade-crds",
        ],
    )?;
    eventually("the operator's gateway", Duration::from_secs(60), || async { Ok(std::net::TcpStream::connect(("127.0.0.1", gateway)).is_ok()) }).await?;
    assert_eq!(http_status(metrics, "/readyz"), Some(200), "the leader is ready");

    // A second replica stands by: live, not ready, no gateway, nothing written.
    let standby_gateway = free_port();
    let standby_metrics = free_port();
    let standby_data = h.work.path().join("standby-data");
    h.spawn(
        "standby",
        &operator,
        &operator_kubeconfig,
        &[
            "--gateway-listen",
            &format!("127.0.0.1:{standby_gateway}"),
            "--metrics-listen",
            &format!("127.0.0.1:{standby_metrics}"),
            "--data-dir",
            standby_data.to_str().unwrap(),
            "--namespace",
            &op_ns,
            "--leader-election",
            "--leader-identity",
            "e2e-operator-b",
            "--lease-seconds",
            LEASE_SECONDS,
        ],
    )?;
    eventually("the standby's health endpoint", Duration::from_secs(60), || async { Ok(http_status(standby_metrics, "/healthz") == Some(200)) }).await?;
    assert_eq!(http_status(standby_metrics, "/readyz"), Some(503), "a standby is not ready");
    assert!(std::net::TcpStream::connect(("127.0.0.1", standby_gateway)).is_err(), "a standby does not serve agents");

    // 3. A join token, and two agents joining and running as local processes.
    let token_out =
        Command::new(&operator).env("KUBECONFIG", &h.kubeconfig).args(["token", "create", "--uses", "2", "--ttl", "10m", "--namespace", &op_ns]).output()?;
    assert!(token_out.status.success(), "token create: {}", String::from_utf8_lossy(&token_out.stderr));
    let token = String::from_utf8(token_out.stdout)?.trim().to_string();
    let agent = binary("kommune-agent");
    let server = format!("https://127.0.0.1:{gateway}");
    for name in ["e2e-a", "e2e-b"] {
        let state = h.work.path().join(name);
        let out =
            Command::new(&agent).args(["join", "--server", &server, "--token", &token, "--name", name, "--state-dir", state.to_str().unwrap()]).output()?;
        assert!(out.status.success(), "join {name}: {}", String::from_utf8_lossy(&out.stderr));
        let kubeconfig = h.kubeconfig.clone();
        h.spawn(name, &agent, &kubeconfig, &["run", "--state-dir", state.to_str().unwrap(), "--allow-exec"])?;
    }
    // The token had two uses: a third join is refused with a non-zero exit and the one message
    // every bad token gets (which one it was is in the operator's log, not told to the caller).
    let out =
        Command::new(&agent).args(["join", "--server", &server, "--token", &token, "--state-dir", h.work.path().join("e2e-c").to_str().unwrap()]).output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("join token is not valid"), "{}", String::from_utf8_lossy(&out.stderr));

    let nodes: Api<ProviderNode> = Api::all(client.clone());
    for name in ["e2e-a", "e2e-b"] {
        let nodes = nodes.clone();
        eventually(&format!("ProviderNode {name} Ready"), Duration::from_secs(60), move || {
            let nodes = nodes.clone();
            async move {
                let n = nodes.get_opt(name).await?;
                Ok(n.and_then(|n| n.status).is_some_and(|s| kommune_operator::crd::is_true(&s.conditions, "Ready")))
            }
        })
        .await?;
    }

    // 4. Both examples, applied as a user would, run to Succeeded.
    let jobs: Api<ComputeJob> = Api::namespaced(client.clone(), &ns);
    for (file, name, tasks) in [("examples/hello-wasm.yaml", "hello-wasm", 4), ("examples/hello-exec.yaml", "hello-exec", 2)] {
        let out = h.kubectl(&["apply", "-n", &ns, "-f", repo().join(file).to_str().unwrap()]);
        assert!(out.status.success(), "apply {file}: {}", String::from_utf8_lossy(&out.stderr));
        let watch = jobs.clone();
        eventually(&format!("{name} Succeeded"), Duration::from_secs(180), move || {
            let jobs = watch.clone();
            async move {
                let job = jobs.get(name).await?;
                if let Some((_, reason, message)) = condition(&job, "Failed").filter(|c| c.0 == "True") {
                    bail!("{name} failed: {reason}: {message}");
                }
                Ok(condition(&job, "Succeeded").is_some_and(|c| c.0 == "True"))
            }
        })
        .await?;
        let status = jobs.get(name).await?.status.unwrap();
        assert_eq!(status.tasks.succeeded, tasks);
        assert_eq!(status.progress.as_deref(), Some(format!("{tasks}/{tasks}").as_str()));
        assert_eq!(status.recent_results.len(), tasks as usize);
        assert!(status.recent_results.iter().all(|r| r.exit_code == 0 && r.output_sha256.len() == 64));
    }
    let wasm = jobs.get("hello-wasm").await?.status.unwrap();
    assert!(wasm.recent_results.iter().all(|r| r.stdout_tail.contains("primes below 20000")), "{:?}", wasm.recent_results);
    assert_eq!(wasm.completed_indexes.as_deref(), Some("0-3"));

    // Metered: every task's signed receipt is in the ledger, and the job says what it cost.
    let watch = jobs.clone();
    eventually("hello-wasm's usage from 4 receipts", Duration::from_secs(30), move || {
        let jobs = watch.clone();
        async move { Ok(jobs.get("hello-wasm").await?.status.and_then(|s| s.usage).is_some_and(|u| u.receipts == 4)) }
    })
    .await?;
    let usage = jobs.get("hello-wasm").await?.status.and_then(|s| s.usage).unwrap();
    assert!(usage.wasm_fuel > 0 && !usage.cost.is_empty(), "{usage:?}");
    println!("hello-wasm usage: {usage:?}");
    let mut receipts = 0;
    for name in ["e2e-a", "e2e-b"] {
        let out = Command::new(&agent).args(["earnings", "--json", "--state-dir", h.work.path().join(name).to_str().unwrap()]).output()?;
        assert!(out.status.success(), "earnings {name}: {}", String::from_utf8_lossy(&out.stderr));
        let lines = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(lines.lines().all(|l| l.contains("\"status\":\"accepted\"")), "{name}: {lines}");
        receipts += lines.lines().count();
    }
    assert!(receipts >= 4 + 2, "both examples' tasks are in the providers' receipt logs: {receipts}");
    let watch = nodes.clone();
    eventually("ProviderNode earnings", Duration::from_secs(30), move || {
        let nodes = watch.clone();
        async move {
            let mut total = 0;
            for name in ["e2e-a", "e2e-b"] {
                total += nodes.get(name).await?.status.and_then(|s| s.earnings).map_or(0, |e| e.receipts);
            }
            Ok(total as usize == receipts)
        }
    })
    .await?;

    // 5. Bad input ends in a clear condition and a Warning Event, never a silent Pending. (An
    // unpinned image no longer gets this far: the schema refuses it, below.)
    let bad = [("bad-module", "  workload:\n    wasm:\n      configMapRef: {name: does-not-exist, key: module.wasm}\n", "Scheduled", "ModuleUnavailable")];
    for (name, spec, cond, reason) in bad {
        let manifest = format!("apiVersion: kommune.dev/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: {name}\nspec:\n{spec}");
        let path = h.work.path().join(format!("{name}.yaml"));
        std::fs::write(&path, manifest)?;
        let out = h.kubectl(&["apply", "-n", &ns, "-f", path.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let watch = jobs.clone();
        eventually(&format!("{name}: {cond} reason {reason}"), Duration::from_secs(60), move || {
            let jobs = watch.clone();
            async move { Ok(condition(&jobs.get(name).await?, cond).is_some_and(|c| c.1 == reason)) }
        })
        .await?;
        let events: Api<Event> = Api::namespaced(client.clone(), &ns);
        let ev_name = name.to_string();
        eventually(&format!("a Warning Event {reason} on {name}"), Duration::from_secs(30), move || {
            let (events, ev_name) = (events.clone(), ev_name.clone());
            async move {
                let list = events.list(&ListParams::default()).await?;
                Ok(list.items.iter().any(|e| {
                    e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(ev_name.as_str())
                        && e.reason.as_deref() == Some(reason)
                        && e.type_.as_deref() == Some("Warning")
                }))
            }
        })
        .await?;
    }
    // Zero tasks is refused by the schema at admission, with the field named.
    let zero = h.work.path().join("zero.yaml");
    std::fs::write(
        &zero,
        "apiVersion: kommune.dev/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: zero\nspec:\n  tasks: 0\n  workload:\n    exec: {command: [echo]}\n",
    )?;
    let out = h.kubectl(&["apply", "-n", &ns, "-f", zero.to_str().unwrap()]);
    assert!(!out.status.success(), "tasks: 0 was accepted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec.tasks"), "{}", String::from_utf8_lossy(&out.stderr));
    // So is a container image not pinned by digest: a tag can be moved to other content.
    let unpinned = h.work.path().join("unpinned.yaml");
    std::fs::write(
        &unpinned,
        "apiVersion: kommune.dev/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: unpinned\nspec:\n  workload:\n    container: {image: 'busybox:latest'}\n",
    )?;
    let out = h.kubectl(&["apply", "-n", &ns, "-f", unpinned.to_str().unwrap()]);
    assert!(!out.status.success(), "an unpinned image was accepted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec.workload.container.image"), "{}", String::from_utf8_lossy(&out.stderr));

    // 6. Deleting a job runs its finalizer and the object goes away.
    for name in ["hello-wasm", "hello-exec", "bad-module"] {
        jobs.delete(name, &Default::default()).await?;
    }
    let jobs_left = jobs.clone();
    eventually("deleted jobs to disappear", Duration::from_secs(60), move || {
        let jobs = jobs_left.clone();
        async move { Ok(jobs.list(&ListParams::default()).await?.items.is_empty()) }
    })
    .await?;

    // 7. An admin cordons e2e-a: it turns Draining; uncordoned, Ready again.
    for (cordon, want) in [(true, "Draining"), (false, "Ready")] {
        nodes.patch("e2e-a", &PatchParams::default(), &Patch::Merge(&serde_json::json!({ "spec": { "unschedulable": cordon } }))).await?;
        let watch = nodes.clone();
        eventually(&format!("e2e-a {want}"), Duration::from_secs(30), move || {
            let nodes = watch.clone();
            async move { Ok(serde_json::to_value(nodes.get("e2e-a").await?.status)?["phase"] == want) }
        })
        .await?;
    }

    // 8. The provider's own view, then leaving: the operator deletes the ProviderNode.
    let out = Command::new(&agent).args(["status", "--state-dir", h.work.path().join("e2e-a").to_str().unwrap()]).output()?;
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && shown.contains("session:    connected") && shown.contains("node:       e2e-a"), "{shown}");
    let out = Command::new(&agent).args(["leave", "--state-dir", h.work.path().join("e2e-b").to_str().unwrap()]).output()?;
    assert!(out.status.success(), "leave: {}", String::from_utf8_lossy(&out.stderr));
    let watch = nodes.clone();
    eventually("ProviderNode e2e-b deleted after leave", Duration::from_secs(30), move || {
        let nodes = watch.clone();
        async move { Ok(nodes.get_opt("e2e-b").await?.is_none()) }
    })
    .await?;

    // 9. The leader dies: the standby takes over within the Lease duration.
    let killed = std::time::Instant::now();
    h.kill("operator");
    eventually("the standby to take over", Duration::from_secs(60), || async { Ok(http_status(standby_metrics, "/readyz") == Some(200)) }).await?;
    let takeover = killed.elapsed();
    // The dead leader's ledger verifies end to end: chain, signatures, totals.
    // The operator was killed, not stopped: entries after its last checkpoint carry no operator
    // signature yet, so strict verification would refuse them; they are checked all the same.
    let out = Command::new(&operator).args(["ledger", "verify", "--accept-unsigned-tail", "--data-dir", data.to_str().unwrap()]).output()?;
    let report = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ledger verify: {report}");
    println!("ledger verify: {report}");
    println!("leader takeover: standby ready {:.1}s after the leader was killed (lease {LEASE_SECONDS}s)", takeover.as_secs_f64());
    assert!(takeover < Duration::from_secs(LEASE_SECONDS.parse::<u64>()? + 10), "took {takeover:?}");
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), &op_ns);
    let holder = leases.get("kommune-operator").await?.spec.and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some("e2e-operator-b"));

    // 10. Uninstall: the release's objects go, the CRDs (and so every ComputeJob) are kept.
    let _ = nodes.delete("e2e-a", &Default::default()).await;
    h.kill("standby");
    if let Some(helm) = &helm {
        let release = support::release_name(&op_ns);
        let out = Command::new(helm).env("KUBECONFIG", &h.kubeconfig).args(["uninstall", &release, "--namespace", &op_ns]).output()?;
        assert!(out.status.success(), "helm uninstall: {}", String::from_utf8_lossy(&out.stderr));
        let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(client.clone());
        assert!(roles.get_opt(&release).await?.is_none(), "the release's ClusterRole is gone");
        for name in ["computejobs.kommune.dev", "providernodes.kommune.dev", "payoutstatements.kommune.dev"] {
            assert!(crds.get_opt(name).await?.is_some(), "{name} is kept on uninstall");
        }

        // 11. Reinstall into another namespace: the kept CRDs belong to no release, so the new
        //     one installs beside them (a templated CRD would still name the old release).
        let other_ns = format!("{op_ns}-again");
        h.create_namespaces(&[&other_ns]);
        let Installed { operator_kubeconfig, .. } = install(&h, &client, &other_ns).await?;

        // 12. Upgrade with a changed CRD: Helm never upgrades crds/, the operator does. Make
        //     the installed schema an older one (a printer column missing), start the new
        //     release's operator with the chart's RBAC, and see its schema come back.
        let column = |crd: &CustomResourceDefinition| crd.spec.versions[0].additional_printer_columns.clone().unwrap_or_default().len();
        let current = crds.get("computejobs.kommune.dev").await?;
        let want = column(&current);
        let mut older: serde_json::Value = serde_json::to_value(&current)?;
        older["spec"]["versions"][0]["additionalPrinterColumns"].as_array_mut().unwrap().pop();
        older["metadata"] = serde_json::json!({"name": "computejobs.kommune.dev", "resourceVersion": current.metadata.resource_version});
        crds.replace("computejobs.kommune.dev", &Default::default(), &serde_json::from_value(older)?).await?;
        assert_eq!(column(&crds.get("computejobs.kommune.dev").await?), want - 1);
        h.spawn(
            "upgrader",
            &operator,
            &operator_kubeconfig,
            &[
                "--gateway-listen",
                &format!("127.0.0.1:{}", free_port()),
                "--metrics-listen",
                &format!("127.0.0.1:{}", free_port()),
                "--data-dir",
                h.work.path().join("upgrader-data").to_str().unwrap(),
                "--namespace",
                &other_ns,
                "--upgrade-crds",
            ],
        )?;
        eventually("the operator to upgrade the ComputeJob CRD", Duration::from_secs(60), || async {
            Ok(column(&crds.get("computejobs.kommune.dev").await?) == want)
        })
        .await?;
        h.kill("upgrader");
        let out =
            Command::new(helm).env("KUBECONFIG", &h.kubeconfig).args(["uninstall", &support::release_name(&other_ns), "--namespace", &other_ns]).output()?;
        assert!(out.status.success(), "helm uninstall: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
