//! What the e2e tests share: the API server under test (KUBECONFIG, or kube-apiserver + etcd
//! from KUBEBUILDER_ASSETS), the processes started against it, and the install steps.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kommune_operator::crd::ComputeJob;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config};

use kommune_e2e::repo;

/// The line a test prints when there is no API server to run against.
pub const SKIPPED: &str = "skipped: no cluster (set KUBECONFIG, or KUBEBUILDER_ASSETS to a dir with kube-apiserver and etcd; see e2e/README.md)";

/// The API server under test and everything started against it; stops it all on drop and, if
/// the test is failing, prints the logs and objects first.
pub struct Harness {
    pub work: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    envtest_dir: Option<PathBuf>,
    children: Vec<(String, Child)>,
    pub namespace: String,
    /// RUST_LOG of the processes started.
    pub rust_log: String,
    /// kubectl commands whose output is printed when the test fails.
    pub diagnostics: Vec<Vec<String>>,
    /// Namespaces this run created (removed at the end on a shared cluster).
    created: std::sync::Mutex<Vec<String>>,
}

impl Harness {
    fn new(work: tempfile::TempDir, kubeconfig: PathBuf, envtest_dir: Option<PathBuf>, namespace: String) -> Harness {
        let diagnostics =
            [vec!["get", "computejobs", "-A", "-o", "yaml"], vec!["get", "providernodes", "-o", "yaml"], vec!["get", "events", "-n", namespace.as_str()]]
                .iter()
                .map(|a| a.iter().map(|s| s.to_string()).collect())
                .collect();
        let rust_log = "info,kommune_operator=debug,kommune_agent=debug".into();
        Harness { work, kubeconfig, envtest_dir, children: vec![], namespace, rust_log, diagnostics, created: Default::default() }
    }

    /// An admin client for the API server.
    pub async fn client(&self) -> Result<Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        Ok(Client::try_from(Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?)?)
    }

    /// Creates the test namespaces.
    pub fn create_namespaces(&self, names: &[&str]) {
        for n in names {
            let out = self.kubectl(&["create", "namespace", n]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            self.created.lock().unwrap_or_else(|p| p.into_inner()).push(n.to_string());
        }
    }

    /// On a cluster that outlives the test (KUBECONFIG): takes away what the test made, so the
    /// next run's operator does not find this run's jobs and run them on its agents. The
    /// operator is gone by now, so finalizers are cleared by hand. Best effort: a failure here
    /// is printed, not raised.
    fn clean_up_shared_cluster(&self) {
        let helm = kommune_e2e::helm();
        for ns in self.created.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if let Some(helm) = &helm {
                let _ = Command::new(helm).env("KUBECONFIG", &self.kubeconfig).args(["uninstall", &release_name(ns), "--namespace", ns]).output();
            }
            let jobs = self.kubectl(&["get", "computejobs", "-n", ns, "-o", "name"]);
            for job in String::from_utf8_lossy(&jobs.stdout).lines() {
                let _ = self.kubectl(&["patch", job, "-n", ns, "--type=merge", "-p", r#"{"metadata":{"finalizers":null}}"#]);
                let _ = self.kubectl(&["delete", job, "-n", ns, "--wait=false"]);
            }
            let out = self.kubectl(&["delete", "namespace", ns, "--wait=false"]);
            if !out.status.success() {
                eprintln!("e2e cleanup: namespace {ns}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.work.path().join(format!("{name}.log"))
    }

    pub fn spawn(&mut self, name: &str, program: &Path, kubeconfig: &Path, args: &[&str]) -> Result<()> {
        let log = std::fs::File::create(self.log(name))?;
        let child = Command::new(program)
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", &self.rust_log)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// Fails if the child process `name` has exited: a long wait should not outlive it.
    pub fn ensure_running(&mut self, name: &str) -> Result<()> {
        if let Some((_, child)) = self.children.iter_mut().find(|(n, _)| n == name)
            && let Some(status) = child.try_wait()?
        {
            bail!("{name} exited ({status}); see its log below");
        }
        Ok(())
    }

    /// Kills a child process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self, name: &str) {
        if let Some((_, child)) = self.children.iter_mut().find(|(n, _)| n == name) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (STOP, CONT, ...) to the child process `name`.
    pub fn signal(&self, name: &str, signal: &str) {
        let (_, child) = self.children.iter().find(|(n, _)| n == name).expect("started");
        let status = Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status().expect("kill runs");
        assert!(status.success(), "kill -{signal} {name}");
    }

    /// How the child process `name` ended, if it has.
    pub fn try_wait(&mut self, name: &str) -> Result<Option<std::process::ExitStatus>> {
        let (_, child) = self.children.iter_mut().find(|(n, _)| n == name).context("no such child")?;
        Ok(child.try_wait()?)
    }

    pub fn kubectl(&self, args: &[&str]) -> std::process::Output {
        Command::new("kubectl").env("KUBECONFIG", &self.kubeconfig).args(args).output().expect("kubectl runs")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("\n===== e2e failed: diagnostics =====");
            for (name, _) in &self.children {
                let text = std::fs::read_to_string(self.log(name)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(80).collect();
                eprintln!("----- {name} log (last 80 lines) -----");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
            for args in &self.diagnostics {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let out = self.kubectl(&args);
                eprintln!("----- kubectl {} -----\n{}{}", args.join(" "), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            }
        }
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        match &self.envtest_dir {
            Some(dir) => drop(Command::new(repo().join("e2e/envtest-apiserver.sh")).arg("stop").arg(dir).status()),
            None => self.clean_up_shared_cluster(),
        }
    }
}

/// Finds an API server: KUBECONFIG first, then KUBEBUILDER_ASSETS. None means skip.
pub fn harness() -> Result<Option<Harness>> {
    let work = tempfile::Builder::new().prefix("kommune-e2e-").tempdir()?;
    let namespace = format!("kommune-e2e-{}", std::process::id());
    if let Some(kc) = std::env::var_os("KUBECONFIG").filter(|k| !k.is_empty()) {
        return Ok(Some(Harness::new(work, kc.into(), None, namespace)));
    }
    if std::env::var_os("KUBEBUILDER_ASSETS").is_some_and(|k| !k.is_empty()) {
        let dir = work.path().join("apiserver");
        let out = Command::new(repo().join("e2e/envtest-apiserver.sh")).arg("start").arg(&dir).stderr(Stdio::inherit()).output()?;
        if !out.status.success() {
            bail!("e2e/envtest-apiserver.sh start failed");
        }
        let kubeconfig = PathBuf::from(String::from_utf8(out.stdout)?.trim());
        return Ok(Some(Harness::new(work, kubeconfig, Some(dir), namespace)));
    }
    Ok(None)
}

/// Lease duration for the e2e operators: short, so a takeover is quick to observe.
pub const LEASE_SECONDS: &str = "6";

/// The HTTP status of GET `path` on a loopback port, or None if nothing answers.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    http_status_within(port, path, Duration::from_secs(5))
}

/// As [`http_status`], giving up after `timeout` without an answer (a frozen process accepts
/// connections but never answers).
pub fn http_status_within(port: u16, path: &str, timeout: Duration) -> Option<u16> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(timeout)).ok()?;
    write!(conn, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Whether the binaries the tests start are built with `--release`: for measuring (the scale
/// scenario's figures with `cargo test --release -p kommune-e2e --test scale`), never in CI.
fn release_binaries() -> bool {
    std::env::var("KOMMUNE_E2E_PROFILE").is_ok_and(|p| p == "release")
}

pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target"));
    target.join(if release_binaries() { "release" } else { "debug" }).join(name)
}

pub fn build_binaries() -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut args = vec!["build", "-p", "kommune-operator", "-p", "kommune-agent"];
    if release_binaries() {
        args.push("--release");
    }
    let status = Command::new(cargo).current_dir(repo()).args(&args).status()?;
    if !status.success() {
        bail!("cargo build of the binaries failed");
    }
    Ok(())
}

pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The Helm release of a test run: named after its namespace, so runs against one persistent
/// cluster do not share (and so fight over) its cluster-scoped RBAC objects.
pub fn release_name(namespace: &str) -> String {
    namespace.to_string()
}

/// `helm install`s the chart into `namespace` as [`release_name`] (StatefulSet scaled to 0: the
/// operator runs as a local process). Returns the operator's ServiceAccount name.
pub fn helm_install(h: &Harness, helm: &Path, namespace: &str, cel: bool) -> Result<String> {
    let release = release_name(namespace);
    let mut cmd = Command::new(helm);
    cmd.env("KUBECONFIG", &h.kubeconfig).args(["install", &release]).arg(repo().join("charts/kommune")).args([
        "--namespace",
        namespace,
        "--set",
        "replicas=0",
        // The operator runs as a local process, so no Service needs a node port; a fixed one
        // (the chart's default 30443) would clash with another run's release on a shared cluster.
        "--set",
        "gateway.service.type=ClusterIP",
    ]);
    if !cel {
        // helm's client-side schema check would refuse x-kubernetes-validations on such servers.
        cmd.arg("--disable-openapi-validation");
    }
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("helm install failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let rendered = kommune_e2e::render_release(helm, &release, namespace, &[])?;
    kommune_e2e::documents(&rendered)?
        .iter()
        .find(|d| d["kind"] == "StatefulSet")
        .and_then(|d| d["spec"]["template"]["spec"]["serviceAccountName"].as_str().map(str::to_string))
        .context("the chart's StatefulSet names no serviceAccountName")
}

/// Applies crds/ directly, as `kubectl apply -f crds/` would.
pub async fn apply_crds(client: &Client, cel: bool) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for file in ["computejob.yaml", "providernode.yaml", "payoutstatement.yaml"] {
        let mut crd: serde_json::Value = serde_yaml::from_str(&std::fs::read_to_string(repo().join("crds").join(file))?)?;
        if !cel {
            strip_key(&mut crd, "x-kubernetes-validations");
        }
        let name = crd["metadata"]["name"].as_str().unwrap().to_string();
        crds.patch(&name, &PatchParams::apply("kommune-e2e").force(), &Patch::Apply(&crd)).await?;
    }
    Ok(())
}

/// A copy of the admin kubeconfig that acts as the ServiceAccount (needs impersonation rights,
/// which the admin of a test cluster has). Everything the operator does is then authorised by
/// the chart's RBAC alone, so a missing rule fails the suite.
pub fn impersonating_kubeconfig(h: &Harness, sa: &str, namespace: &str) -> Result<PathBuf> {
    let mut kc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&h.kubeconfig)?)?;
    let users = kc["users"].as_sequence_mut().context("kubeconfig has no users")?;
    for u in users {
        let user = u["user"].as_mapping_mut().context("kubeconfig user is not a mapping")?;
        user.insert("as".into(), format!("system:serviceaccount:{namespace}:{sa}").into());
        let groups: Vec<serde_yaml::Value> =
            ["system:serviceaccounts".to_string(), format!("system:serviceaccounts:{namespace}"), "system:authenticated".into()]
                .into_iter()
                .map(Into::into)
                .collect();
        user.insert("as-groups".into(), groups.into());
    }
    let path = h.work.path().join("operator.kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&kc)?)?;
    Ok(path)
}

/// Removes `key` everywhere in a JSON tree.
pub fn strip_key(v: &mut serde_json::Value, key: &str) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove(key);
            m.values_mut().for_each(|c| strip_key(c, key));
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|c| strip_key(c, key)),
        _ => {}
    }
}

pub fn condition(job: &ComputeJob, type_: &str) -> Option<(String, String, String)> {
    job.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_).map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// What [`install`] set up.
pub struct Installed {
    /// The kubeconfig the operator runs with: the chart's ServiceAccount with helm, else the admin's.
    pub operator_kubeconfig: PathBuf,
    /// The helm binary used, if one was found.
    pub helm: Option<PathBuf>,
}

/// Installs the chart into `op_ns` with helm (StatefulSet scaled to 0, the operator runs as a
/// local process with the chart's RBAC by impersonating its ServiceAccount), or without helm
/// applies crds/ and runs the operator with the admin's credentials; waits for both CRDs.
pub async fn install(h: &Harness, client: &Client, op_ns: &str) -> Result<Installed> {
    let version = client.apiserver_version().await?;
    let minor: u32 = version.minor.trim_end_matches('+').parse().unwrap_or(0);
    let cel = version.major == "1" && minor >= 25;
    if !cel {
        println!("note: API server {}.{} predates CRD validation rules (1.25); the CRDs go in without x-kubernetes-validations", version.major, version.minor);
    }
    let helm = kommune_e2e::helm();
    let operator_kubeconfig = match &helm {
        Some(helm) => {
            let sa = helm_install(h, helm, op_ns, cel)?;
            println!("installed the chart; the operator runs as {sa} with the chart's RBAC");
            impersonating_kubeconfig(h, &sa, op_ns)?
        }
        None => {
            println!("note: no helm found: applying crds/ and running the operator with the admin kubeconfig instead of the chart's RBAC");
            apply_crds(client, cel).await?;
            h.kubeconfig.clone()
        }
    };
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in ["computejobs.kommune.dev", "providernodes.kommune.dev", "payoutstatements.kommune.dev"] {
        tokio::time::timeout(Duration::from_secs(30), await_condition(crds.clone(), name, conditions::is_crd_established())).await??;
    }
    Ok(Installed { operator_kubeconfig, helm })
}
