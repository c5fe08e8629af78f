//! Payouts end to end: statements closed into the ledger appear as PayoutStatement objects that
//! a user bound to the chart's view role can read, and the payout webhook receives each one,
//! retried after a failure until it answers 2xx.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kommune_ledger::check::tests::{input, node_key};
use kommune_operator::crd::PayoutStatement;
use kommune_operator::ledger::{Ledger, LedgerConfig, ReceiptKey};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, Config};
use support::{Installed, SKIPPED, binary, build_binaries, eventually, free_port, harness, install};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A ledger with two closed statements (alice: pn-1 and pn-2; pn-3 its own owner), written
/// before the operator starts (a payout command may not append beside a running operator).
fn settled_ledger(data: &std::path::Path, key: &std::path::Path) -> Result<()> {
    let config = LedgerConfig { data_dir: data.into(), database_url: None, fence: kommune_operator::fence::Fence::open(), key_file: Some(key.into()) };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let ledger = Ledger::open(config)?;
    rt.block_on(async {
        for (seed, owner) in [(1u8, "alice"), (2, "alice"), (3, "")] {
            ledger.register_owned_node_key(&format!("pn-{seed}"), node_key(seed).verifying_key().to_bytes(), owner).await?;
        }
        for s in 1..=2 {
            for seed in 1..=3 {
                ledger.submit(input(seed, 1, s)).await?;
            }
        }
        ledger.reverse(ReceiptKey::Attempt("a-2-1-2".into()), "outvoted by 2 of 3 replicas").await?;
        anyhow::ensure!(ledger.close_period().await?.len() == 2, "two owners, two statements");
        Ok(())
    })
}

/// A webhook receiver on a loopback port: answers 500 to the first POST, 200 afterwards, and
/// keeps every body it was sent.
async fn webhook() -> Result<(String, Arc<Mutex<Vec<serde_json::Value>>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/statements", listener.local_addr()?);
    let seen = Arc::new(Mutex::new(vec![]));
    let kept = seen.clone();
    tokio::spawn(async move {
        let mut calls = 0;
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = vec![];
            let mut chunk = [0u8; 8192];
            // Headers, then Content-Length bytes of body.
            let body = loop {
                let Ok(n) = conn.read(&mut chunk).await else { break None };
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text[..end]
                        .lines()
                        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break Some(buf[end + 4..end + 4 + len].to_vec());
                    }
                }
            };
            calls += 1;
            let status = if calls == 1 { "500 Internal Server Error" } else { "200 OK" };
            if let Some(b) = body
                && status.starts_with("200")
            {
                kept.lock().unwrap().push(serde_json::from_slice(&b).unwrap_or_default());
            }
            let _ = conn.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes()).await;
        }
    });
    Ok((url, seen))
}

/// The chart's view ClusterRole, rendered without helm (its only template parts are the name
/// and the labels).
fn chart_view_role(name: &str) -> Result<ClusterRole> {
    let text = std::fs::read_to_string(kommune_e2e::repo().join("charts/kommune/templates/clusterrole-view.yaml"))?;
    let rendered: String = text
        .lines()
        .filter(|l| !l.contains("include \"kommune.labels\""))
        .map(|l| l.replace("{{ include \"kommune.fullname\" . }}", name))
        .collect::<Vec<_>>()
        .join("\n");
    Ok(serde_yaml::from_str(&rendered)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_are_readable_by_viewers_and_delivered_to_the_webhook() -> Result<()> {
    let Some(mut h) = harness()? else {
        println!("{SKIPPED}");
        return Ok(());
    };
    // A failure panics while the harness lives, so it prints the operator's log.
    if let Err(e) = scenario(&mut h).await {
        panic!("{e:#}");
    }
    Ok(())
}

async fn scenario(h: &mut support::Harness) -> Result<()> {
    build_binaries()?;
    let client = h.client().await?;
    let op_ns = format!("{}-system", h.namespace);
    h.create_namespaces(&[&op_ns]);
    let Installed { operator_kubeconfig, .. } = install(h, &client, &op_ns).await?;

    let data = h.work.path().join("operator-data");
    let key = h.work.path().join("ledger.key");
    let (d, k) = (data.clone(), key.clone());
    tokio::task::spawn_blocking(move || settled_ledger(&d, &k)).await??;
    let (url, delivered) = webhook().await?;

    let (gateway, metrics) = (free_port(), free_port());
    h.spawn(
        "operator",
        &binary("kommune-operator"),
        &operator_kubeconfig,
        &[
            "--gateway-listen",
            &format!("127.0.0.1:{gateway}"),
            "--metrics-listen",
            &format!("127.0.0.1:{metrics}"),
            "--data-dir",
            data.to_str().unwrap(),
            "--ledger-key-file",
            key.to_str().unwrap(),
            "--namespace",
            &op_ns,
            "--payout-webhook-url",
            &url,
        ],
    )?;

    // A user bound to the chart's view role (cluster-wide: statements are cluster-scoped).
    let role_name = format!("{op_ns}-view");
    let roles: Api<ClusterRole> = Api::all(client.clone());
    roles.create(&PostParams::default(), &chart_view_role(&role_name)?).await?;
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": { "name": role_name },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name },
        "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "auditor@example.org" }],
    }))?;
    Api::<ClusterRoleBinding>::all(client.clone()).create(&PostParams::default(), &binding).await?;
    let kubeconfig = kube::config::Kubeconfig::read_from(&h.kubeconfig)?;
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.context("admin kubeconfig")?;
    config.auth_info.impersonate = Some("auditor@example.org".into());
    let viewer: Api<PayoutStatement> = Api::all(Client::try_from(config)?);

    let list = viewer.clone();
    eventually("two PayoutStatements readable by the viewer", Duration::from_secs(60), move || {
        let list = list.clone();
        async move { Ok(list.list(&Default::default()).await.map(|l| l.items.len() == 2).unwrap_or(false)) }
    })
    .await?;
    let alice = viewer.list(&Default::default()).await?.items.into_iter().find(|s| s.spec.owner == "alice").context("alice's statement")?;
    assert_eq!((alice.spec.receipts, alice.spec.nodes.len()), (4, 2));
    assert_eq!(alice.status.as_ref().map(|s| s.paid.as_str()), Some("No"));
    let err = viewer.delete(&alice.metadata.name.clone().unwrap(), &DeleteParams::default()).await.expect_err("viewers only read");
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 403), "{err}");

    // The webhook: the first POST got a 500, and was retried until it was taken.
    let all: Api<PayoutStatement> = Api::all(client.clone());
    let check = all.clone();
    eventually("both statements Delivered to the webhook", Duration::from_secs(60), move || {
        let api = check.clone();
        async move {
            let items = api.list(&Default::default()).await?.items;
            Ok(items.len() == 2 && items.iter().all(|s| s.status.as_ref().and_then(|st| st.webhook.as_ref()).is_some_and(|w| w.state == "Delivered")))
        }
    })
    .await?;
    let attempts: Vec<u32> =
        all.list(&Default::default()).await?.items.iter().filter_map(|s| s.status.as_ref()?.webhook.as_ref().map(|w| w.attempts)).collect();
    assert_eq!(attempts.iter().sum::<u32>(), 3, "one statement needed a retry after the 500: {attempts:?}");
    let bodies = delivered.lock().unwrap().clone();
    let mut owners: Vec<&str> = bodies.iter().filter_map(|b| b["statement"]["owner"].as_str()).collect();
    owners.sort();
    assert_eq!(owners, ["alice", "pn-3"], "each statement delivered once: {bodies:?}");
    println!("webhook received statements of {owners:?}; attempts {attempts:?}");

    // The ledger is the truth: a deleted statement comes back, delivered already.
    let name = alice.metadata.name.clone().unwrap();
    all.delete(&name, &DeleteParams::default()).await?;
    let (again, deleted) = (all.clone(), name.clone());
    eventually("the deleted PayoutStatement re-created", Duration::from_secs(30), move || {
        let (api, name) = (again.clone(), deleted.clone());
        async move { Ok(api.get_opt(&name).await?.is_some_and(|o| o.metadata.deletion_timestamp.is_none() && o.spec.owner == "alice")) }
    })
    .await?;

    // Paid while the operator runs: an admin annotates the statement with the payment's
    // reference and the operator appends the paid entry. A reference the ledger refuses (too
    // long) is shown in status, not recorded.
    let other = all.list(&Default::default()).await?.items.into_iter().find(|s| s.spec.owner != "alice").context("the other statement")?;
    let annotate = |reference: String| Patch::Merge(serde_json::json!({ "metadata": { "annotations": { "kommune.dev/paid-reference": reference } } }));
    all.patch(&name, &PatchParams::default(), &annotate("wire-2026-0042".into())).await?;
    let other_name = other.metadata.name.clone().unwrap();
    all.patch(&other_name, &PatchParams::default(), &annotate("x".repeat(600))).await?;
    let paid = all.clone();
    eventually("the annotated statement Paid with its reference", Duration::from_secs(60), move || {
        let (api, name) = (paid.clone(), name.clone());
        async move {
            let st = api.get(&name).await?.status.unwrap_or_default();
            Ok(st.paid == "Yes" && st.paid_reference.as_deref() == Some("wire-2026-0042") && st.paid_seq.is_some())
        }
    })
    .await?;
    let refused = all.clone();
    eventually("the refused reference shown in status", Duration::from_secs(60), move || {
        let (api, name) = (refused.clone(), other_name.clone());
        async move {
            let st = api.get(&name).await?.status.unwrap_or_default();
            Ok(st.paid == "No" && st.paid_refused.as_deref().is_some_and(|r| r.contains("reference")))
        }
    })
    .await?;
    Ok(())
}
