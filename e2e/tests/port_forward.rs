//! The plugin's port-forward through a real API server to a stand-in kubelet: the Service
//! resolved to a ready Pod, the forwarded connection, and the refusals a user can act on.

#[path = "port_forward/kubelet.rs"]
mod kubelet;
mod support;

use std::time::Duration;

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::{Node, Pod, Service, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A Node whose kubelet is the stand-in on 127.0.0.1:`port`.
async fn register_node(client: &kube::Client, name: &str, port: u16) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": name}}))?).await?;
    let status = json!({"status": {
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
        "conditions": [{"type": "Ready", "status": "True", "reason": "StandIn", "message": "stand-in kubelet"}],
    }});
    nodes.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await?;
    Ok(())
}

/// A Pod bound to `node` with `labels`, its status set as a kubelet would (Running, Ready
/// as `ready` says).
async fn running_pod(client: &kube::Client, ns: &str, name: &str, node: &str, labels: serde_json::Value, ready: bool) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "containers": [{"name": "operator", "image": "kommune-operator", "ports": [{"name": "dashboard", "containerPort": 8444}]}],
        },
    });
    pods.create(&PostParams::default(), &serde_json::from_value(pod)?).await?;
    let now = "2026-01-01T00:00:00Z";
    let status = json!({"status": {
        "phase": "Running",
        "podIP": "127.0.0.1",
        "startTime": now,
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }, "lastTransitionTime": now}],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_the_api_server_proxies_portforward_to_the_stand_in() -> Result<()> {
    let Some(h) = harness()? else {
        println!("{SKIPPED}");
        return Ok(());
    };
    let admin = h.client().await?;
    let ns = h.namespace.clone();
    h.create_namespaces(&[&ns]);
    // The ServiceAccount admission plugin wants the namespace's default ServiceAccount, which
    // no controller manager makes here.
    Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "default"}}))?)
        .await?;

    // An echo server plays the container.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let target = echo.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut c, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let kubelet = kubelet::start(target).await?;
    register_node(&admin, &format!("{ns}-node"), kubelet.port).await?;
    running_pod(&admin, &ns, "op", &format!("{ns}-node"), json!({"app": "op"}), true).await?;
    let _ = Api::<Service>::namespaced(admin.clone(), &ns);

    let mut pf = Api::<Pod>::namespaced(admin.clone(), &ns).portforward("op", &[8444]).await.context("portforward")?;
    let mut stream = pf.take_stream(8444).context("no stream")?;
    stream.write_all(b"hello through the api server").await?;
    let mut buf = vec![0u8; 28];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut buf)).await??;
    assert_eq!(&buf, b"hello through the api server");
    println!("forwarded: {:?}", kubelet.forwarded.lock().unwrap());
    Ok(())
}
