//! Outputs retrieval and the dashboard with real Kubernetes permissions: users (ServiceAccount
//! tokens from the TokenRequest API) with and without RBAC grants, against the API server.
//!
//! The operator's web endpoint runs in this process with the chart's RBAC (TokenReview,
//! SubjectAccessReview and ComputeJob lookups through the API server), and an in-memory output
//! store stands in for the operator's (issue 17's store plugs into the same trait). The plugin
//! is the real `kubectl-kommune` binary; it reaches the endpoint with `--operator-url` (its
//! port-forward is tested in port_forward.rs), and verifies its certificate
//! against the CA the operator publishes (read with the user's own token), as by default.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::serve::Listener as _;
use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kommune_operator::crd::ComputeJob;
use kommune_operator::outputs::{OutputBody, OutputEntry, OutputReader};
use kommune_operator::web::{self, Source, auth, results, tls};
use kube::api::{Api, PostParams};
use sha2::Digest as _;
use support::*;

/// Outputs of one job uid, as the operator's store would list them.
struct Stored {
    uid: String,
    files: Vec<(u32, &'static str, &'static [u8])>,
}

impl OutputReader for Stored {
    fn list(&self, job_uid: &str) -> BoxFuture<'_, Result<Vec<OutputEntry>, String>> {
        let items = if job_uid == self.uid {
            self.files
                .iter()
                .map(|(task, name, bytes)| OutputEntry {
                    task_index: *task,
                    attempt_id: format!("{}-{task}-1", self.uid),
                    name: name.to_string(),
                    size: bytes.len() as u64,
                    sha256: hex::encode(sha2::Sha256::digest(bytes)),
                    excess_bytes: 0,
                })
                .collect()
        } else {
            vec![]
        };
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

fn apply(h: &Harness, yaml: &str) {
    let path = h.work.path().join(format!("apply-{}.yaml", rand_suffix()));
    std::fs::write(&path, yaml).unwrap();
    let out = h.kubectl(&["apply", "-f", path.to_str().unwrap()]);
    assert!(out.status.success(), "kubectl apply: {}\n{yaml}", String::from_utf8_lossy(&out.stderr));
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// A token of ServiceAccount `namespace/name`, from the TokenRequest API.
async fn token(client: &kube::Client, namespace: &str, name: &str) -> Result<String> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let req =
        TokenRequest { spec: TokenRequestSpec { audiences: vec![], expiration_seconds: Some(3600), ..TokenRequestSpec::default() }, ..TokenRequest::default() };
    let out = api.create_token_request(name, &PostParams::default(), &req).await.with_context(|| format!("TokenRequest for {namespace}/{name}"))?;
    Ok(out.status.context("TokenRequest without status")?.token)
}

/// A kubeconfig for the same cluster as the admin's, authenticating with `token` only.
fn user_kubeconfig(h: &Harness, who: &str, token: &str, namespace: &str) -> Result<PathBuf> {
    let mut kc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&h.kubeconfig)?)?;
    let context = kc["current-context"].as_str().context("no current-context")?.to_string();
    let ctx = kc["contexts"].as_sequence().context("no contexts")?.iter().find(|c| c["name"].as_str() == Some(&context)).context("current context")?.clone();
    let cluster_name = ctx["context"]["cluster"].as_str().context("context without cluster")?.to_string();
    let cluster = kc["clusters"].as_sequence().context("no clusters")?.iter().find(|c| c["name"].as_str() == Some(&cluster_name)).context("cluster")?.clone();
    kc = serde_yaml::from_str(&format!(
        "apiVersion: v1\nkind: Config\nusers: [{{name: {who}, user: {{token: {token}}}}}]\ncontexts: [{{name: {who}, context: {{cluster: {cluster_name}, user: {who}, namespace: {namespace}}}}}]\ncurrent-context: {who}\n"
    ))?;
    kc["clusters"] = serde_yaml::Value::Sequence(vec![cluster]);
    let path = h.work.path().join(format!("{who}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&kc)?)?;
    Ok(path)
}

/// Starts the operator's web endpoint as the operator (the chart's RBAC): real TokenReview,
/// SubjectAccessReview and ComputeJob lookups, the cluster's client CA, and `reader` as store.
/// Its certificate comes from the operator CA of `op_ns`, published as the operator does.
async fn start_web(operator: kube::Client, op_ns: &str, reader: Arc<dyn OutputReader>) -> Result<(String, String)> {
    let ca = kommune_operator::controller::ca::ensure_ca(operator.clone(), op_ns).await?;
    kommune_operator::controller::ca::publish_ca(operator.clone(), op_ns, &ca).await?;
    let (chain, key) = ca.issue_server(&["localhost".into()])?;
    let client_ca = web::cluster_client_ca(operator.clone()).await;
    let listener = tls::TlsListener::bind("127.0.0.1:0".parse()?, tls::server_config(&chain, &key, client_ca.as_deref())?).await?;
    let addr = listener.local_addr()?.addr;
    let gate = Arc::new(auth::Gatekeeper::new(Arc::new(auth::KubeAuthority::new(operator.clone()))));
    let retrieval = results::Retrieval { jobs: Arc::new(results::KubeJobs(operator)), reader: Some(reader), live: None };
    tokio::spawn(web::serve(listener, web::router_with_outputs(gate, Arc::new(NoFacts), Some(retrieval))));
    Ok((format!("https://localhost:{}", addr.port()), ca.cert_pem().to_string()))
}

fn plugin<S: AsRef<std::ffi::OsStr>>(kubeconfig: &Path, args: &[S]) -> std::process::Output {
    Command::new(binary("kubectl-kommune")).env("KUBECONFIG", kubeconfig).args(args).output().expect("kubectl-kommune runs")
}

fn text(out: &std::process::Output) -> String {
    format!("status {}\nstdout:\n{}\nstderr:\n{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// GET /api/v1/overview as the user of `kubeconfig` (None: no credentials at all), trusting
/// the operator CA `ca_pem`.
async fn overview_status(url: &str, ca_pem: &str, kubeconfig: Option<&Path>) -> Result<u16> {
    let config = match kubeconfig {
        Some(p) => kube::Config::from_custom_kubeconfig(kube::config::Kubeconfig::read_from(p)?, &kube::config::KubeConfigOptions::default()).await?,
        None => kube::Config::new(url.parse()?),
    };
    let trust = kubectl_kommune::connect::Trust::Roots { ders: kubectl_kommune::connect::roots_from_pem(ca_pem)?, server_name: None };
    let client = kubectl_kommune::connect::operator_client(config, url, &trust)?;
    let req = http::Request::get("/api/v1/overview").body(Vec::new())?.map(kube::client::Body::from);
    Ok(client.send(req).await?.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_and_the_dashboard_follow_kubernetes_permissions() -> Result<()> {
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
    let (team_a, team_b) = (format!("{op_ns}-team-a"), format!("{op_ns}-team-b"));
    h.create_namespaces(&[&op_ns, &team_a, &team_b]);
    let installed = install(&h, &admin, &op_ns).await?;
    let operator = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kube::config::Kubeconfig::read_from(&installed.operator_kubeconfig)?, &kube::config::KubeConfigOptions::default())
            .await?,
    )?;

    // The job (no operator runs it: its stored outputs come from the in-memory store below).
    apply(
        &h,
        &format!(
            "apiVersion: kommune.dev/v1alpha1\nkind: ComputeJob\nmetadata: {{name: render, namespace: {team_a}}}\nspec: {{tasks: 2, workload: {{exec: {{command: [/bin/true]}}}}}}\n"
        ),
    );
    let job = Api::<ComputeJob>::namespaced(admin.clone(), &team_a).get("render").await?;
    let uid = job.metadata.uid.context("the job has no uid")?;

    // reader: may get this one job (resourceNames, so the review must name it); stranger:
    // nothing; elsewhere: may get every ComputeJob, but in team-b; viewer: may list ComputeJobs
    // cluster-wide (the dashboard).
    apply(
        &h,
        &format!(
            r#"
apiVersion: v1
kind: ServiceAccount
metadata: {{name: reader, namespace: {team_a}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: stranger, namespace: {team_a}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: elsewhere, namespace: {team_a}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: viewer, namespace: {team_a}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: render-reader, namespace: {team_a}}}
rules: [{{apiGroups: [kommune.dev], resources: [computejobs], resourceNames: [render], verbs: [get]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: render-reader, namespace: {team_a}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: render-reader}}
subjects: [{{kind: ServiceAccount, name: reader, namespace: {team_a}}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: job-reader, namespace: {team_b}}}
rules: [{{apiGroups: [kommune.dev], resources: [computejobs], verbs: [get, list]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: job-reader, namespace: {team_b}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: job-reader}}
subjects: [{{kind: ServiceAccount, name: elsewhere, namespace: {team_a}}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: {op_ns}-viewer}}
rules: [{{apiGroups: [kommune.dev], resources: [computejobs], verbs: [list]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: {op_ns}-viewer}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {op_ns}-viewer}}
subjects: [{{kind: ServiceAccount, name: viewer, namespace: {team_a}}}]
"#
        ),
    );
    let mut users = std::collections::HashMap::new();
    for who in ["reader", "stranger", "elsewhere", "viewer"] {
        let t = token(&admin, &team_a, who).await?;
        users.insert(who, user_kubeconfig(&h, who, &t, &team_a)?);
    }

    let stored: &'static [(u32, &'static str, &'static [u8])] =
        &[(0, "stdout", b"hello from task 0\n"), (0, "out/result.csv", b"a,b\n1,2\n"), (1, "stdout", b"hello from task 1\n")];
    let (url, ca_pem) = start_web(operator, &op_ns, Arc::new(Stored { uid, files: stored.to_vec() })).await?;
    // The plugin reads the operator's CA from its namespace, as a user: the chart lets every
    // authenticated user get that one ConfigMap. Without the chart, nobody may: hand it over.
    let ca_file = h.work.path().join("operator-ca.crt");
    std::fs::write(&ca_file, &ca_pem)?;
    let mut reach = vec!["--operator-url", &url, "--operator-namespace", &op_ns];
    if installed.helm.is_none() {
        reach.extend(["--operator-ca", ca_file.to_str().unwrap()]);
    }
    let with = |args: &[&str]| -> Vec<String> { args.iter().chain(reach.iter()).map(|s| s.to_string()).collect() };

    // A user with get on the job downloads every output, digests checked by the plugin.
    let dir = h.work.path().join("results");
    let out = plugin(&users["reader"], &with(&["results", "render", "-n", &team_a, "-o", dir.to_str().unwrap()]));
    assert!(out.status.success(), "reader's download: {}", text(&out));
    assert_eq!(std::fs::read(dir.join("task-0/out/result.csv"))?, b"a,b\n1,2\n");
    assert_eq!(std::fs::read(dir.join("task-1/stdout"))?, b"hello from task 1\n");
    println!("reader downloaded: {}", String::from_utf8_lossy(&out.stdout).trim());
    let out = plugin(&users["reader"], &with(&["logs", "render", "-n", &team_a, "--task", "1"]));
    assert!(out.status.success() && out.stdout == b"hello from task 1\n", "reader's logs: {}", text(&out));
    // get reads the job from the API server as the user (the Role allows exactly that).
    let out = plugin(&users["reader"], &["get", "render", "-n", &team_a]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&format!("Job:          {team_a}/render")), "reader's get: {}", text(&out));

    // Refused: no grant at all, and a grant in another namespace.
    for who in ["stranger", "elsewhere"] {
        let dir = h.work.path().join(format!("results-{who}"));
        let out = plugin(&users[who], &with(&["results", "render", "-n", &team_a, "-o", dir.to_str().unwrap()]));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("403") && err.contains("may not get computejobs.kommune.dev"), "{who}: {}", text(&out));
        assert!(!dir.join("task-0").exists(), "{who} got files");
    }
    // Whoever may get the name learns the job is missing; others do not.
    let out = plugin(&users["elsewhere"], &with(&["results", "render", "-n", &team_b, "-o", h.work.path().join("b").to_str().unwrap()]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"), "elsewhere in its own namespace: {}", text(&out));

    // An endpoint with a certificate of another CA is refused before any credential is sent.
    let other_ca = h.work.path().join("other-ca.crt");
    std::fs::write(&other_ca, kommune_operator::pki::Ca::generate()?.cert_pem())?;
    let out = plugin(&users["reader"], &["logs", "render", "-n", &team_a, "--operator-url", &url, "--operator-ca", other_ca.to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("the operator's certificate is not trusted"), "another CA: {}", text(&out));

    // The dashboard's overview: 401 without credentials, 403 without list rights, 200 with.
    assert_eq!(overview_status(&url, &ca_pem, None).await?, 401);
    assert_eq!(overview_status(&url, &ca_pem, Some(&users["reader"])).await?, 403);
    assert_eq!(overview_status(&url, &ca_pem, Some(&users["viewer"])).await?, 200);
    Ok(())
}
