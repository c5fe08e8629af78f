//! The plugin's port-forward through a real API server to a stand-in kubelet: the Service
//! resolved to a ready Pod, the forwarded connection, and the refusals a user can act on.
//!
//! envtest runs no kubelet, but its API server proxies `pods/portforward` to whatever the
//! Node's status names (here 127.0.0.1 and the stand-in's port), so everything up to the
//! kubelet is the real thing: RBAC, the Service and Pod lookups, the WebSocket upgrade. The
//! operator's web endpoint runs in this process, as in retrieval.rs, and plays the container.

#[path = "port_forward/kubelet.rs"]
mod kubelet;
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use axum::serve::Listener as _;
use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Node, Pod, Service, ServiceAccount};
use kommune_operator::crd::ComputeJob;
use kommune_operator::outputs::{OutputBody, OutputEntry, OutputReader};
use kommune_operator::web::{self, Source, auth, results, tls};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use sha2::Digest as _;
use support::*;

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

/// A Pod bound to `node` with `labels`, its dashboard on container port 9444 named `web` (the
/// chart Service's targetPort), its status set as a kubelet would: Running, podIP.
async fn operator_pod(client: &kube::Client, ns: &str, name: &str, node: &str, labels: &serde_json::Value) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "containers": [{"name": "operator", "image": "kommune-operator", "ports": [{"name": "web", "containerPort": 9444}]}],
        },
    });
    pods.create(&PostParams::default(), &serde_json::from_value(pod)?).await?;
    set_ready(client, ns, name, true).await
}

/// Sets the pod's Ready condition, as its kubelet would after a readiness probe.
async fn set_ready(client: &kube::Client, ns: &str, name: &str, ready: bool) -> Result<()> {
    let now = "2026-01-01T00:00:00Z";
    let status = json!({"status": {
        "phase": "Running",
        "podIP": "127.0.0.1",
        "startTime": now,
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }, "lastTransitionTime": now}],
    }});
    Api::<Pod>::namespaced(client.clone(), ns).patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await?;
    Ok(())
}

/// The outputs of one job uid, as the operator's store would list them.
struct Stored {
    uid: String,
    files: Vec<(u32, &'static str, &'static [u8])>,
}

impl OutputReader for Stored {
    fn list(&self, job_uid: &str) -> BoxFuture<'_, Result<Vec<OutputEntry>, String>> {
        let files = if job_uid == self.uid { self.files.as_slice() } else { &[] };
        let items = files
            .iter()
            .map(|(task, name, bytes)| OutputEntry {
                task_index: *task,
                attempt_id: format!("{}-{task}-1", self.uid),
                name: name.to_string(),
                size: bytes.len() as u64,
                sha256: hex::encode(sha2::Sha256::digest(bytes)),
                excess_bytes: 0,
            })
            .collect();
        Box::pin(async move { Ok(items) })
    }
    fn open(&self, job_uid: &str, task_index: u32, name: &str) -> BoxFuture<'_, Result<Option<OutputBody>, String>> {
        let found = (job_uid == self.uid).then(|| self.files.iter().find(|(t, n, _)| *t == task_index && *n == name)).flatten();
        let body =
            found.map(|(_, _, b)| OutputBody::Stream { size: b.len() as u64, body: Box::pin(futures::stream::iter([Ok(bytes::Bytes::from_static(b))])) });
        Box::pin(async move { Ok(body) })
    }
}

struct NoFacts;

impl Source for NoFacts {
    fn facts(&self) -> BoxFuture<'_, Result<web::Facts, String>> {
        Box::pin(async { Ok((vec![], vec![])) })
    }
}

/// Starts the operator's web endpoint as the operator, its certificate (from the operator CA
/// it publishes) naming only `server_name`, the dashboard Service's DNS name, as in a cluster.
/// Returns its address and the CA's PEM.
async fn start_web(operator: kube::Client, op_ns: &str, server_name: &str, reader: Arc<dyn OutputReader>) -> Result<(std::net::SocketAddr, String)> {
    let ca = kommune_operator::controller::ca::ensure_ca(operator.clone(), op_ns).await?;
    kommune_operator::controller::ca::publish_ca(operator.clone(), op_ns, &ca).await?;
    let (chain, key) = ca.issue_server(&[server_name.to_string()])?;
    let client_ca = web::cluster_client_ca(operator.clone()).await;
    let listener = tls::TlsListener::bind("127.0.0.1:0".parse()?, tls::server_config(&chain, &key, client_ca.as_deref())?).await?;
    let addr = listener.local_addr()?.addr;
    let gate = Arc::new(auth::Gatekeeper::new(Arc::new(auth::KubeAuthority::new(operator.clone()))));
    let retrieval = results::Retrieval { jobs: Arc::new(results::KubeJobs(operator)), reader: Some(reader), live: None };
    tokio::spawn(web::serve(listener, web::router_with_outputs(gate, Arc::new(NoFacts), Some(retrieval))));
    Ok((addr, ca.cert_pem().to_string()))
}

fn apply(h: &Harness, yaml: &str) {
    let path = h.work.path().join(format!("apply-{}.yaml", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()));
    std::fs::write(&path, yaml).unwrap();
    let out = h.kubectl(&["apply", "-f", path.to_str().unwrap()]);
    assert!(out.status.success(), "kubectl apply: {}\n{yaml}", String::from_utf8_lossy(&out.stderr));
}

/// A kubeconfig for the admin's cluster that authenticates as ServiceAccount `namespace/name`
/// with a token from the TokenRequest API, and nothing else.
async fn user_kubeconfig(h: &Harness, admin: &kube::Client, namespace: &str, name: &str) -> Result<PathBuf> {
    let req =
        TokenRequest { spec: TokenRequestSpec { audiences: vec![], expiration_seconds: Some(3600), ..TokenRequestSpec::default() }, ..TokenRequest::default() };
    let api: Api<ServiceAccount> = Api::namespaced(admin.clone(), namespace);
    let token = api.create_token_request(name, &PostParams::default(), &req).await?.status.context("TokenRequest without status")?.token;
    let kc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&h.kubeconfig)?)?;
    let cluster = kc["clusters"][0].clone();
    let cluster_name = cluster["name"].as_str().context("cluster without a name")?.to_string();
    let mut user: serde_yaml::Value = serde_yaml::from_str(&format!(
        "apiVersion: v1\nkind: Config\nusers: [{{name: {name}, user: {{token: {token}}}}}]\ncontexts: [{{name: {name}, context: {{cluster: {cluster_name}, user: {name}, namespace: {namespace}}}}}]\ncurrent-context: {name}\n"
    ))?;
    user["clusters"] = serde_yaml::Value::Sequence(vec![cluster]);
    let path = h.work.path().join(format!("{name}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&user)?)?;
    Ok(path)
}

fn plugin<S: AsRef<std::ffi::OsStr>>(kubeconfig: &Path, args: &[S]) -> std::process::Output {
    Command::new(binary("kubectl-kommune")).env("KUBECONFIG", kubeconfig).args(args).output().expect("kubectl-kommune runs")
}

fn text(out: &std::process::Output) -> String {
    format!("status {}\nstdout:\n{}\nstderr:\n{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_port_forwards_to_the_operator_through_the_api_server() -> Result<()> {
    let Some(h) = harness()? else {
        println!("{SKIPPED}");
        return Ok(());
    };
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(kommune_e2e::repo())
        .args(["build", "-p", "kubectl-kommune"])
        .status()?;
    anyhow::ensure!(status.success(), "cargo build -p kubectl-kommune failed");

    let admin = h.client().await?;
    let op_ns = h.namespace.clone();
    let team = format!("{op_ns}-team");
    h.create_namespaces(&[&op_ns, &team]);
    let installed = install(&h, &admin, &op_ns).await?;
    let operator = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kube::config::Kubeconfig::read_from(&installed.operator_kubeconfig)?, &kube::config::KubeConfigOptions::default())
            .await?,
    )?;
    // The ServiceAccount admission plugin wants each namespace's default ServiceAccount, which
    // no controller manager makes here.
    for ns in [&op_ns, &team] {
        let sa = serde_json::from_value(json!({"metadata": {"name": "default"}}))?;
        match Api::<ServiceAccount>::namespaced(admin.clone(), ns).create(&PostParams::default(), &sa).await {
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            r => drop(r?),
        }
    }

    // The dashboard Service: the chart's (release = namespace, so <ns>-dashboard), or one like
    // it (targetPort named web) without helm.
    let service = format!("{op_ns}-dashboard");
    let services: Api<Service> = Api::namespaced(admin.clone(), &op_ns);
    if installed.helm.is_none() {
        let svc = json!({"metadata": {"name": service}, "spec": {"selector": {"app.kubernetes.io/name": "kommune"}, "ports": [{"name": "web", "port": 8444, "targetPort": "web"}]}});
        services.create(&PostParams::default(), &serde_json::from_value(svc)?).await?;
    }
    let selector = serde_json::to_value(services.get(&service).await?.spec.and_then(|s| s.selector).context("the dashboard Service has no selector")?)?;

    // The job and its stored outputs, served by the operator's web endpoint in this process,
    // whose certificate names the Service only: reaching it as 127.0.0.1 verifies only if the
    // plugin checks the certificate for the Service's name.
    apply(
        &h,
        &format!(
            "apiVersion: kommune.dev/v1alpha1\nkind: ComputeJob\nmetadata: {{name: render, namespace: {team}}}\nspec: {{tasks: 1, workload: {{exec: {{command: [/bin/true]}}}}}}\n"
        ),
    );
    let uid = Api::<ComputeJob>::namespaced(admin.clone(), &team).get("render").await?.metadata.uid.context("the job has no uid")?;
    let stored = vec![(0, "stdout", &b"forwarded through the API server\n"[..]), (0, "out/result.csv", &b"a,b\n1,2\n"[..])];
    let server_name = kubectl_kommune::connect::service_server_name(&service, &op_ns);
    let (web_addr, ca_pem) = start_web(operator, &op_ns, &server_name, Arc::new(Stored { uid, files: stored })).await?;

    // The stand-in kubelet relays to it; the Node names the kubelet, the Pod runs on the Node.
    let kubelet = kubelet::start(web_addr).await?;
    let node = format!("{op_ns}-node");
    register_node(&admin, &node, kubelet.port).await?;
    operator_pod(&admin, &op_ns, "operator-0", &node, &selector).await?;

    // Users: "forwarder" has the chart's dashboard-user Role (or the same rules without helm)
    // and may get the job; "looker" may get the Service and list pods, but not port-forward.
    let user_role = format!("{op_ns}-dashboard-user");
    if installed.helm.is_none() {
        apply(
            &h,
            &format!(
                r#"apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: {user_role}, namespace: {op_ns}}}
rules:
  - {{apiGroups: [""], resources: [services], resourceNames: [{service}], verbs: [get]}}
  - {{apiGroups: [""], resources: [pods], verbs: [list]}}
  - {{apiGroups: [""], resources: [pods/portforward], verbs: [get, create]}}
"#
            ),
        );
    }
    apply(
        &h,
        &format!(
            r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: forwarder, namespace: {team}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: looker, namespace: {team}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: forwarder, namespace: {op_ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {user_role}}}
subjects: [{{kind: ServiceAccount, name: forwarder, namespace: {team}}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: looker, namespace: {op_ns}}}
rules:
  - {{apiGroups: [""], resources: [services], verbs: [get]}}
  - {{apiGroups: [""], resources: [pods], verbs: [list]}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: looker, namespace: {op_ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: looker}}
subjects: [{{kind: ServiceAccount, name: looker, namespace: {team}}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: job-reader, namespace: {team}}}
rules: [{{apiGroups: [kommune.dev], resources: [computejobs], verbs: [get]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: job-reader, namespace: {team}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: job-reader}}
subjects: [{{kind: ServiceAccount, name: forwarder, namespace: {team}}}, {{kind: ServiceAccount, name: looker, namespace: {team}}}]
"#
        ),
    );
    let forwarder = user_kubeconfig(&h, &admin, &team, "forwarder").await?;
    let looker = user_kubeconfig(&h, &admin, &team, "looker").await?;
    // Without the chart nobody is granted the CA ConfigMap: hand the CA over.
    let ca_file = h.work.path().join("operator-ca.crt");
    std::fs::write(&ca_file, &ca_pem)?;
    let mut reach = vec!["--operator-namespace".to_string(), op_ns.clone(), "--operator-service".into(), service.clone()];
    if installed.helm.is_none() {
        reach.extend(["--operator-ca".into(), ca_file.to_str().unwrap().into()]);
    }
    let with = |args: &[&str]| -> Vec<String> { args.iter().map(|s| s.to_string()).chain(reach.iter().cloned()).collect() };

    // No --operator-url: the plugin resolves the Service to the pod and its named port, and
    // downloads both outputs through the port-forward, digests checked.
    let dir = h.work.path().join("results");
    let out = plugin(&forwarder, &with(&["results", "render", "-n", &team, "-o", dir.to_str().unwrap()]));
    assert!(out.status.success(), "results through the port-forward: {}", text(&out));
    assert_eq!(std::fs::read(dir.join("task-0/stdout"))?, b"forwarded through the API server\n");
    assert_eq!(std::fs::read(dir.join("task-0/out/result.csv"))?, b"a,b\n1,2\n");
    let forwarded = kubelet.forwarded.lock().unwrap().clone();
    assert!(!forwarded.is_empty() && forwarded.iter().all(|f| *f == format!("{op_ns}/operator-0:9444")), "the kubelet forwarded {forwarded:?}");
    println!("results through the port-forward: {}; kubelet saw {forwarded:?}", String::from_utf8_lossy(&out.stdout).trim());

    // The certificate is checked for the Service's name: another Service in front of the same
    // pod leads to the same endpoint, whose certificate does not name it.
    let other = json!({"metadata": {"name": "other-dashboard"}, "spec": {"selector": selector, "ports": [{"port": 8444, "targetPort": "web"}]}});
    services.create(&PostParams::default(), &serde_json::from_value(other)?).await?;
    let ca_args = ["--operator-namespace", &op_ns, "--operator-service", "other-dashboard", "--operator-ca", ca_file.to_str().unwrap()];
    let other_dir = h.work.path().join("other");
    let out = plugin(&h.kubeconfig, &[&["results", "render", "-n", &team, "-o", other_dir.to_str().unwrap()][..], &ca_args].concat());
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("the operator's certificate is not trusted"),
        "another Service's name: {}",
        text(&out)
    );

    // Who may not port-forward learns which right is missing.
    let out = plugin(&looker, &with(&["results", "render", "-n", &team, "-o", h.work.path().join("looker").to_str().unwrap()]));
    let want = format!("you may not port-forward to pods in {op_ns} (RBAC: get and create pods/portforward), or pass --operator-url");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains(&want), "looker: {}", text(&out));

    // A pod that is not ready is not forwarded to.
    set_ready(&admin, &op_ns, "operator-0", false).await?;
    let out = plugin(&forwarder, &with(&["results", "render", "-n", &team, "-o", h.work.path().join("unready").to_str().unwrap()]));
    let want = format!("no ready pod behind svc/{service} in {op_ns}");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains(&want), "no ready pod: {}", text(&out));
    Ok(())
}
