//! The dashboard of a real run, in headless Chromium: the operator binary with `--web-listen`,
//! two agents in two regions running real tasks, ComputeJobs in a real API server, and the
//! plugin's proxy signing with the admin's kubeconfig. The page must show what that run implies.
//!
//! `KOMMUNE_DASHBOARD_SCREENSHOTS=docs/dashboard` refreshes the README's pictures from this run.

mod support;

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kommune_operator::crd::{ComputeJob, ProviderNode};
use kube::api::Api;

use support::{Installed, SKIPPED, binary, build_binaries, condition, eventually, free_port, harness, install};

/// A job that succeeds: four exec tasks.
const HELLO: &str = "apiVersion: kommune.dev/v1alpha1
kind: ComputeJob
metadata: {name: hello}
spec:
  tasks: 4
  parallelism: 2
  workload:
    exec:
      command: [/bin/sh, -c, 'echo hello from task $KOMMUNE_TASK_INDEX']
  resources: {cpu: 250m, memory: 64Mi}
  retries: {maxAttempts: 2}
  timeouts: {taskSeconds: 60}
";

/// A job whose task 2 fails on each of its two attempts, so the job ends Failed.
const CRUNCH: &str = "apiVersion: kommune.dev/v1alpha1
kind: ComputeJob
metadata: {name: crunch}
spec:
  tasks: 3
  parallelism: 3
  workload:
    exec:
      command: [/bin/sh, -c, 'if [ $KOMMUNE_TASK_INDEX = 2 ]; then echo out of input >&2; exit 3; fi; echo crunched']
  resources: {cpu: 250m, memory: 64Mi}
  retries: {maxAttempts: 2}
  timeouts: {taskSeconds: 60}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_real_run() -> Result<()> {
    let Some(mut h) = harness()? else {
        println!("{SKIPPED}");
        return Ok(());
    };
    let Some(chromium) = chromium() else {
        println!("skipped: no chromium (Debian's package `chromium`; .ci/run installs it)");
        return Ok(());
    };
    build_binaries()?;
    let client = h.client().await?;
    let ns = h.namespace.clone();
    let op_ns = format!("{ns}-system");
    h.create_namespaces(&[&ns, &op_ns]);
    let Installed { operator_kubeconfig, .. } = install(&h, &client, &op_ns).await?;

    // The operator binary with its dashboard, under the chart's RBAC when helm is there.
    let (gateway, metrics, web) = (free_port(), free_port(), free_port());
    let data = h.work.path().join("operator-data");
    let operator = binary("kommune-operator");
    let gateway_listen = format!("127.0.0.1:{gateway}");
    let metrics_listen = format!("127.0.0.1:{metrics}");
    let web_listen = format!("127.0.0.1:{web}");
    h.spawn(
        "operator",
        &operator,
        &operator_kubeconfig,
        &[
            "--gateway-listen",
            &gateway_listen,
            "--metrics-listen",
            &metrics_listen,
            "--web-listen",
            &web_listen,
            "--data-dir",
            data.to_str().unwrap(),
            "--namespace",
            &op_ns,
            "--heartbeat-seconds",
            "2",
            // The tasks are too short to use a micro-credit of CPU at the default rates; a
            // price on output makes every receipt cost something, so cost and earnings show.
            "--rate-output-gib",
            "1000",
        ],
    )?;
    eventually("the operator's gateway", Duration::from_secs(60), || async { Ok(std::net::TcpStream::connect(("127.0.0.1", gateway)).is_ok()) }).await?;

    // Two providers in two regions, each offering 2 cores.
    let token_out =
        Command::new(&operator).env("KUBECONFIG", &h.kubeconfig).args(["token", "create", "--uses", "2", "--ttl", "10m", "--namespace", &op_ns]).output()?;
    assert!(token_out.status.success(), "token create: {}", String::from_utf8_lossy(&token_out.stderr));
    let token = String::from_utf8(token_out.stdout)?.trim().to_string();
    let agent = binary("kommune-agent");
    let server = format!("https://127.0.0.1:{gateway}");
    let providers = [("dash-berlin", "eu-central"), ("dash-ohio", "us-east")];
    for (name, region) in providers {
        let state = h.work.path().join(name);
        let out = Command::new(&agent)
            .args(["join", "--server", &server, "--token", &token, "--name", name, "--region", region, "--state-dir", state.to_str().unwrap()])
            .output()?;
        assert!(out.status.success(), "join {name}: {}", String::from_utf8_lossy(&out.stderr));
        let kubeconfig = h.kubeconfig.clone();
        h.spawn(name, &agent, &kubeconfig, &["run", "--state-dir", state.to_str().unwrap(), "--allow-exec", "--cpus", "2", "--memory", "2Gi"])?;
    }
    let nodes: Api<ProviderNode> = Api::all(client.clone());
    for (name, _) in providers {
        let nodes = nodes.clone();
        eventually(&format!("ProviderNode {name} Ready"), Duration::from_secs(60), move || {
            let nodes = nodes.clone();
            async move { Ok(nodes.get_opt(name).await?.and_then(|n| n.status).is_some_and(|s| kommune_operator::crd::is_true(&s.conditions, "Ready"))) }
        })
        .await?;
    }

    // One job that succeeds and one that fails, run to their end.
    let jobs: Api<ComputeJob> = Api::namespaced(client.clone(), &ns);
    for (name, manifest, end) in [("hello", HELLO, "Succeeded"), ("crunch", CRUNCH, "Failed")] {
        let path = h.work.path().join(format!("{name}.yaml"));
        std::fs::write(&path, manifest)?;
        let out = h.kubectl(&["apply", "-n", &ns, "-f", path.to_str().unwrap()]);
        assert!(out.status.success(), "apply {name}: {}", String::from_utf8_lossy(&out.stderr));
        let watch = jobs.clone();
        eventually(&format!("{name} {end}"), Duration::from_secs(180), move || {
            let jobs = watch.clone();
            async move { Ok(condition(&jobs.get(name).await?, end).is_some_and(|c| c.0 == "True")) }
        })
        .await?;
    }
    // Metered: both jobs' receipts reached the ledger (so the providers have earned something).
    let watch = jobs.clone();
    eventually("usage from the receipts of both jobs", Duration::from_secs(30), move || {
        let jobs = watch.clone();
        async move {
            let receipts = |j: ComputeJob| j.status.and_then(|s| s.usage).map_or(0, |u| u.receipts);
            Ok(receipts(jobs.get("hello").await?) >= 4 && receipts(jobs.get("crunch").await?) >= 2)
        }
    })
    .await?;
    let hello = jobs.get("hello").await?.status.context("hello has a status")?;
    let crunch = jobs.get("crunch").await?.status.context("crunch has a status")?;
    let receipts = hello.usage.as_ref().map_or(0, |u| u.receipts) + crunch.usage.as_ref().map_or(0, |u| u.receipts);
    let watch = nodes.clone();
    eventually("the ProviderNodes' earnings from every receipt", Duration::from_secs(30), move || {
        let nodes = watch.clone();
        async move {
            let mut total = 0;
            for (name, _) in providers {
                total += nodes.get(name).await?.status.and_then(|s| s.earnings).map_or(0, |e| e.receipts);
            }
            Ok(total == receipts)
        }
    })
    .await?;
    let hello_cost = hello.usage.as_ref().map(|u| u.cost.clone()).unwrap_or_default();
    assert!(hello_cost.parse::<f64>().is_ok_and(|c| c > 0.0), "hello cost {hello_cost:?}");
    let failure = crunch.recent_results.iter().find(|r| r.exit_code == 3).context("crunch's failed attempt is in recentResults")?.message.clone();
    assert!(!failure.is_empty(), "the failed attempt says why: {:?}", crunch.recent_results);

    // The plugin's proxy with the admin's kubeconfig (a client certificate of the cluster's CA).
    let kubeconfig = kube::config::Kubeconfig::read_from(&h.kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default()).await?;
    // The dashboard's certificate is verified against the CA the operator published in its
    // namespace (under the chart's RBAC), for `localhost`, one of the names it carries.
    let trust = kubectl_kommune::connect::TrustArgs::default().resolve(&config, &op_ns).await?;
    let operator_client = kubectl_kommune::dashboard::operator_client(config, &format!("https://localhost:{web}"), &trust)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let local = format!("http://{}/", listener.local_addr()?);
    tokio::spawn(kubectl_kommune::dashboard::serve(listener, operator_client));

    let dom = {
        let (c, u) = (chromium.clone(), format!("{local}#all"));
        let out = tokio::task::spawn_blocking(move || headless(&c, &["--dump-dom"], &u)).await?;
        let dom = String::from_utf8_lossy(&out.stdout).into_owned();
        if !dom.contains("data-loaded=\"true\"") {
            bail!("the page did not load its data:\n{dom}\n{}", String::from_utf8_lossy(&out.stderr));
        }
        dom
    };
    println!("dashboard DOM: {} bytes", dom.len());

    // Pool: one ready machine of 2 cores in each region.
    for (_, region) in providers {
        let row = cells(&row(&dom, &format!("data-region=\"{region}\"")));
        assert_eq!(&row[..3], [region, "1", "1"], "{row:?}");
        assert!(row[4].ends_with("of 2 cores"), "{row:?}");
    }
    // Jobs: progress, phase, failures and cost as the run left them.
    let hello_row = cells(&row(&dom, &format!("data-job=\"{ns}/hello\"")));
    assert_eq!(hello_row[2], "Succeeded", "{hello_row:?}");
    assert!(hello_row[4].starts_with("100%") && hello_row[4].ends_with(" 4/4"), "{hello_row:?}");
    assert_eq!(hello_row[7], hello_cost, "{hello_row:?}");
    let crunch_row = cells(&row(&dom, &format!("data-job=\"{ns}/crunch\"")));
    assert_eq!(crunch_row[2], "Failed", "{crunch_row:?}");
    assert!(crunch_row[4].ends_with(" 2/3"), "{crunch_row:?}");
    assert_eq!(crunch_row[6], "1", "one task failed: {crunch_row:?}");
    assert!(crunch_row[8].starts_with("TasksFailed: task(s) 2"), "{crunch_row:?}");
    // Providers: both, Ready, their attempts adding up to the run's (4 + 2 succeeded, 2 failed),
    // and what they earned: the ledger's figures, which the ProviderNodes' status also carries.
    let (mut succeeded, mut failed, mut earned) = (0, 0, 0.0);
    for (name, region) in providers {
        let row = cells(&row(&dom, &format!("data-provider=\"{name}\"")));
        assert_eq!(&row[1..3], [region, "Ready"], "{row:?}");
        succeeded += row[6].parse::<u32>()?;
        failed += row[7].parse::<u32>()?;
        earned += row[8].parse::<f64>()?;
        let pending = nodes.get(name).await?.status.and_then(|s| s.earnings).map(|e| e.pending).unwrap_or_default();
        assert_eq!(row[8].parse::<f64>()?, pending.parse::<f64>()?, "{name} earned what its ProviderNode says: {row:?}");
        println!("{name}: {row:?}");
    }
    assert_eq!((succeeded, failed), (6, 2), "attempts by outcome over both providers");
    assert!(earned > 0.0, "the providers earned something");
    assert!(dom.contains("<polyline"), "an earnings line is drawn");
    // Failures: both failed attempts of task 2, with their exit code and the agent's reason.
    let failures: Vec<Vec<String>> = dom.split("id=\"failure-rows\"").nth(1).context("the failures table")?.split("<tr").skip(1).map(cells).collect();
    let mut attempts: Vec<&str> = failures.iter().map(|r| r[3].as_str()).collect();
    attempts.sort();
    assert_eq!(attempts, ["1", "2"], "{failures:?}");
    for r in &failures {
        assert_eq!((r[1].as_str(), r[2].as_str(), r[5].as_str(), r[6].as_str()), ("crunch", "2", "3", failure.as_str()), "{r:?}");
    }

    if let Ok(dir) = std::env::var("KOMMUNE_DASHBOARD_SCREENSHOTS") {
        let dir = std::fs::canonicalize(kommune_e2e::repo().join(dir))?;
        for view in ["pool", "jobs", "providers", "failures"] {
            let path = dir.join(format!("{view}.png"));
            let shot = format!("--screenshot={}", path.display());
            let (c, u) = (chromium.clone(), format!("{local}#{view}"));
            let out = tokio::task::spawn_blocking(move || headless(&c, &[&shot], &u)).await?;
            assert!(out.status.success() && path.exists(), "screenshot of {view}: {}", String::from_utf8_lossy(&out.stderr));
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

fn chromium() -> Option<String> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
        .map(str::to_string)
}

fn headless(chromium: &str, extra: &[&str], url: &str) -> std::process::Output {
    let profile = tempfile::tempdir().expect("a temporary profile dir");
    Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=8000", "--window-size=1280,520"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("run chromium")
}

/// The table row of the DOM that carries `attr`, up to its `</tr>`.
fn row(dom: &str, attr: &str) -> String {
    dom.split(attr).nth(1).and_then(|r| r.split("</tr>").next()).unwrap_or_else(|| panic!("no row with {attr}")).to_string()
}

/// The text of each `<td>` of a row, tags removed.
fn cells(row: &str) -> Vec<String> {
    row.split("<td").skip(1).map(|c| text(c.split_once('>').map_or("", |x| x.1).split("</td>").next().unwrap_or_default())).collect()
}

fn text(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for ch in html.chars() {
        match ch {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").trim().to_string()
}
