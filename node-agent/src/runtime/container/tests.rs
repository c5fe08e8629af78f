//! ContainerRuntime against an in-process fake Engine API on a unix socket, which records every
//! request. The same hardening against a real engine: node-agent/tests/container_engine/.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::engine::Demux;
use super::*;
use crate::runtime::{Ending, TAIL_BYTES};

const IMAGE: &str = "docker.io/library/busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const ID: &str = "c0ffee00c0ffee00c0ffee00";

/// One request the fake engine saw.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    body: Value,
}

/// How the fake engine answers.
#[derive(Debug, Clone)]
struct Script {
    image_present: bool,
    /// An error sent inside the 200 pull stream, as registries do.
    pull_error: Option<&'static str>,
    create: (u16, Value),
    /// None: the wait never returns (the task runs forever).
    exit_code: Option<i64>,
    oom_killed: bool,
    logs: Vec<u8>,
    /// `/info` says the engine runs rootless.
    rootless: bool,
    /// Containers `/containers/json` lists (ids), as a crashed agent leaves them.
    leftovers: Vec<&'static str>,
    /// How long the wait takes before it returns `exit_code`.
    wait_delay: Duration,
    /// The stats reply of the running container; None answers 404.
    stats: Option<Value>,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            image_present: true,
            pull_error: None,
            create: (201, json!({"Id": ID, "Warnings": []})),
            exit_code: Some(0),
            oom_killed: false,
            logs: Vec::new(),
            rootless: false,
            leftovers: Vec::new(),
            wait_delay: Duration::ZERO,
            stats: None,
        }
    }
}

struct FakeEngine {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeEngine {
    async fn start(script: Script) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("engine.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (script, log) = (Arc::new(script), seen.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (script, log) = (script.clone(), log.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |request| answer(request, script.clone(), log.clone()));
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Self { _dir: dir, socket, seen }
    }

    fn runtime(&self) -> ContainerRuntime {
        ContainerRuntime::new(self.socket.clone(), false)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// "POST /containers/create" for each request, without the API version prefix.
    fn calls(&self) -> Vec<String> {
        self.seen().iter().map(|s| format!("{} {}", s.method, s.path.trim_start_matches("/v1.41"))).collect()
    }

    fn create_body(&self) -> Value {
        self.seen().into_iter().find(|s| s.path == "/v1.41/containers/create").expect("a container was created").body
    }
}

async fn answer(request: Request<Incoming>, script: Arc<Script>, log: Arc<Mutex<Vec<Seen>>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = request.method().to_string();
    let path = request.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let bytes = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    log.lock().unwrap().push(Seen { method: method.clone(), path: path.clone(), body });
    let reply = |status: u16, body: Vec<u8>| Ok(Response::builder().status(status).body(Full::new(Bytes::from(body))).unwrap());
    let json_reply = |status: u16, value: Value| reply(status, value.to_string().into_bytes());
    let container = format!("/v1.41/containers/{ID}");
    match (method.as_str(), path.as_str()) {
        ("GET", p) if p.starts_with("/v1.41/images/") => {
            if script.image_present {
                json_reply(200, json!({"Id": "sha256:feed"}))
            } else {
                json_reply(404, json!({"message": "No such image"}))
            }
        }
        ("POST", p) if p.starts_with("/v1.41/images/create?") => {
            let mut stream = b"{\"status\":\"Pulling fs layer\"}\r\n".to_vec();
            if let Some(error) = script.pull_error {
                stream.extend(json!({"errorDetail": {"message": error}, "error": error}).to_string().into_bytes());
                stream.push(b'\n');
            }
            reply(200, stream)
        }
        ("POST", "/v1.41/containers/create") => json_reply(script.create.0, script.create.1.clone()),
        ("POST", p) if p == format!("{container}/start") => reply(204, vec![]),
        ("GET", p) if p == format!("{container}/stats?stream=false") => match &script.stats {
            Some(stats) => json_reply(200, stats.clone()),
            None => json_reply(404, json!({"message": "no stats"})),
        },
        ("POST", p) if p == format!("{container}/wait") => match script.exit_code {
            Some(code) => {
                tokio::time::sleep(script.wait_delay).await;
                json_reply(200, json!({"StatusCode": code, "Error": null}))
            }
            None => std::future::pending().await,
        },
        ("GET", p) if p == format!("{container}/json") => json_reply(200, json!({"State": {"OOMKilled": script.oom_killed}})),
        ("GET", p) if p == format!("{container}/logs?stdout=1&stderr=1") => reply(200, script.logs.clone()),
        ("POST", p) if p == format!("{container}/kill") => reply(204, vec![]),
        ("DELETE", p) if p == format!("{container}?force=true") => reply(204, vec![]),
        ("GET", "/v1.41/info") => {
            let mut options = vec!["name=seccomp,profile=builtin"];
            if script.rootless {
                options.push("name=rootless");
            }
            json_reply(200, json!({ "SecurityOptions": options }))
        }
        ("GET", p) if p.starts_with("/v1.41/containers/json?") => {
            json_reply(200, json!(script.leftovers.iter().map(|id| json!({"Id": id})).collect::<Vec<_>>()))
        }
        ("DELETE", p) if script.leftovers.iter().any(|id| p == format!("/v1.41/containers/{id}?force=true")) => reply(204, vec![]),
        _ => json_reply(404, json!({"message": format!("fake engine: no route for {method} {path}")})),
    }
}

/// One frame of the engine's multiplexed log stream.
fn frame(stream: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![stream, 0, 0, 0];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn context(scratch: &Path) -> AttemptContext {
    AttemptContext {
        attempt_id: "hello-container-1-a1".into(),
        task_identity: String::new(),
        task_index: 1,
        task_count: 2,
        memory_bytes: 64 << 20,
        cpu_millis: 500,
        timeout: Some(Duration::from_secs(20)),
        scratch_dir: scratch.to_path_buf(),
        keep_streams: None,
        live: None,
        env: vec![("GREETING".into(), "hello".into())],
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

async fn run(runtime: &ContainerRuntime, ctx: &AttemptContext, network: bool, cancel: CancellationToken) -> Outcome {
    runtime.run(IMAGE, &strings(&["/bin/sh", "-c"]), &strings(&["echo hi"]), ctx, network, cancel).await
}

#[tokio::test]
async fn a_container_runs_locked_down_and_reports_its_demultiplexed_output() {
    let logs = [frame(1, b"hello "), frame(2, b"warning\n"), frame(1, b"world\n")].concat();
    let engine = FakeEngine::start(Script { logs, ..Script::default() }).await;
    let scratch = tempfile::tempdir().unwrap();
    let outcome = run(&engine.runtime(), &context(scratch.path()), false, CancellationToken::new()).await;

    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Succeeded, 0), "{}", outcome.message);
    assert_eq!(outcome.stdout_tail, b"hello world\n");
    assert_eq!(outcome.stderr_tail, b"warning\n");
    assert_eq!(outcome.output_sha256, hex::encode(Sha256::digest(b"hello world\n")));
    assert_eq!(outcome.output_bytes, 12);
    let id = format!("/containers/{ID}");
    assert_eq!(
        engine.calls(),
        [
            format!("GET /images/{IMAGE}/json"),
            "POST /containers/create".into(),
            format!("POST {id}/start"),
            format!("POST {id}/wait"),
            format!("GET {id}/logs?stdout=1&stderr=1"),
            format!("DELETE {id}?force=true"),
        ]
    );

    let body = engine.create_body();
    assert_eq!(body["Image"], IMAGE);
    assert_eq!(body["Entrypoint"], json!(["/bin/sh", "-c"]));
    assert_eq!(body["Cmd"], json!(["echo hi"]));
    assert_eq!(body["Tty"], false);
    assert_eq!(body["NetworkDisabled"], true);
    assert_eq!(body["Env"], json!(["GREETING=hello", "KOMMUNE_TASK_INDEX=1", "KOMMUNE_TASK_COUNT=2", "KOMMUNE_ATTEMPT_ID=hello-container-1-a1"]));
    let host = &body["HostConfig"];
    assert_eq!(host["Privileged"], false);
    assert_eq!(host["CapDrop"], json!(["ALL"]));
    assert!(host.get("CapAdd").is_none());
    assert_eq!(host["SecurityOpt"], json!(["no-new-privileges"]));
    assert_eq!(host["ReadonlyRootfs"], true);
    assert_eq!(host["NetworkMode"], "none");
    assert_eq!(host["Memory"], 64 << 20);
    assert_eq!(host["MemorySwap"], 64 << 20);
    assert_eq!(host["NanoCpus"], 500_000_000);
    assert_eq!(host["PidsLimit"], PIDS_LIMIT);
    assert_eq!(host["AutoRemove"], false);
    assert!(host.get("Binds").is_none(), "only the scratch mount: {host}");
    assert_eq!(host["Mounts"], json!([{"Type": "bind", "Source": scratch.path(), "Target": "/scratch", "ReadOnly": false}]));
    for shared in ["PidMode", "IpcMode", "UsernsMode", "Devices", "VolumesFrom"] {
        assert!(host.get(shared).is_none(), "{shared} must stay unset: {host}");
    }
}

// Recorded from Docker 28 on cgroup v2 (trimmed to the fields the agent reads and a few more).
const DOCKER_STATS: &str = r#"{"read":"2026-11-22T01:02:03.4Z","pids_stats":{"current":3},
  "cpu_stats":{"cpu_usage":{"total_usage":300000000,"usage_in_kernelmode":40000000,"usage_in_usermode":260000000},"system_cpu_usage":9000000000,"online_cpus":2},
  "memory_stats":{"usage":10485760,"stats":{"anon":9000000,"file":1000000},"limit":67108864}}"#;

#[test]
fn engine_stats_are_read_from_docker_and_podman_replies() {
    let docker: Value = serde_json::from_str(DOCKER_STATS).unwrap();
    assert_eq!(parse_stats(&docker), Some(EngineStats { cpu_nanos: 300_000_000, memory_bytes: 10 << 20, memory_peak_bytes: 0 }));
    let v1 = json!({"cpu_stats": {"cpu_usage": {"total_usage": 5}}, "memory_stats": {"usage": 7, "max_usage": 9}});
    assert_eq!(parse_stats(&v1), Some(EngineStats { cpu_nanos: 5, memory_bytes: 7, memory_peak_bytes: 9 }));
    // A stopped container reports zeros: no figure rather than a wrong one.
    assert_eq!(parse_stats(&json!({"cpu_stats": {"cpu_usage": {"total_usage": 0}}, "memory_stats": {}})), None);
    assert_eq!(parse_stats(&json!({})), None);
}

#[tokio::test]
async fn a_running_container_is_metered_from_the_engines_stats() {
    let mut stats: Value = serde_json::from_str(DOCKER_STATS).unwrap();
    stats["memory_stats"]["max_usage"] = json!(12 << 20);
    let engine = FakeEngine::start(Script { wait_delay: Duration::from_millis(1300), stats: Some(stats), ..Script::default() }).await;
    let scratch = tempfile::tempdir().unwrap();
    let outcome = run(&engine.runtime(), &context(scratch.path()), false, CancellationToken::new()).await;
    assert_eq!(outcome.ending, Ending::Succeeded, "{}", outcome.message);
    let u = &outcome.usage;
    assert_eq!((u.source, u.cpu_micros, u.memory_peak_bytes), ("engine-stats", 300_000, 12 << 20), "{u:?}");
    assert!(u.memory_mib_millis >= 10 * 500, "10 MiB for at least the time after the first sample: {u:?}");
    // A container too short to sample says so rather than claiming zero work was measured.
    let quick = FakeEngine::start(Script::default()).await;
    let outcome = run(&quick.runtime(), &context(scratch.path()), false, CancellationToken::new()).await;
    assert_eq!((outcome.usage.source, outcome.usage.cpu_micros), ("none", 0));
}

#[tokio::test]
async fn the_network_needs_both_the_job_and_the_provider() {
    let scratch = tempfile::tempdir().unwrap();
    for (job_asks, provider_allows, mode) in [(true, false, "none"), (false, true, "none"), (true, true, "bridge")] {
        let engine = FakeEngine::start(Script::default()).await;
        let runtime = ContainerRuntime::new(engine.socket.clone(), provider_allows);
        let outcome = run(&runtime, &context(scratch.path()), job_asks, CancellationToken::new()).await;
        assert_eq!(outcome.ending, Ending::Succeeded, "{}", outcome.message);
        let body = engine.create_body();
        assert_eq!(body["HostConfig"]["NetworkMode"], mode, "job {job_asks}, provider {provider_allows}");
        assert_eq!(body["NetworkDisabled"], mode == "none");
    }
}

#[tokio::test]
async fn an_image_not_pinned_by_digest_is_refused_before_the_engine_is_asked() {
    let engine = FakeEngine::start(Script::default()).await;
    let scratch = tempfile::tempdir().unwrap();
    for image in ["busybox", "busybox:1.36", "busybox@sha256:abc"] {
        let outcome = engine.runtime().run(image, &[], &[], &context(scratch.path()), false, CancellationToken::new()).await;
        assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, -1));
        assert_eq!(outcome.message, format!("image {image:?} is not pinned by digest: use name@sha256:<64 hex digits>"));
    }
    assert!(engine.seen().is_empty());
}

#[tokio::test]
async fn a_missing_socket_says_the_runtime_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docker.sock");
    let outcome = run(&ContainerRuntime::new(socket.clone(), false), &context(dir.path()), false, CancellationToken::new()).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, -1));
    assert_eq!(outcome.message, format!("container runtime unavailable: no Docker/Podman socket at {}", socket.display()));
}

#[tokio::test]
async fn a_missing_image_is_pulled_by_digest_and_a_pull_error_names_the_image() {
    let engine = FakeEngine::start(Script { image_present: false, ..Script::default() }).await;
    let scratch = tempfile::tempdir().unwrap();
    let outcome = run(&engine.runtime(), &context(scratch.path()), false, CancellationToken::new()).await;
    assert_eq!(outcome.ending, Ending::Succeeded, "{}", outcome.message);
    let digest = IMAGE.rsplit_once('@').unwrap().1.replace(':', "%3A");
    assert_eq!(engine.calls()[1], format!("POST /images/create?fromImage=docker.io%2Flibrary%2Fbusybox&tag={digest}"));

    let engine = FakeEngine::start(Script { image_present: false, pull_error: Some("manifest unknown"), ..Script::default() }).await;
    let outcome = run(&engine.runtime(), &context(scratch.path()), false, CancellationToken::new()).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, -1));
    assert_eq!(outcome.message, format!("cannot pull image {IMAGE}: manifest unknown"));
    assert!(!engine.calls().iter().any(|c| c.contains("/containers/")), "nothing created after a failed pull");
}

#[tokio::test]
async fn an_engine_error_fails_the_attempt_naming_the_step() {
    let create = (500, json!({"message": "invalid mount config"}));
    let engine = FakeEngine::start(Script { create, ..Script::default() }).await;
    let scratch = tempfile::tempdir().unwrap();
    let outcome = run(&engine.runtime(), &context(scratch.path()), false, CancellationToken::new()).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, -1));
    assert_eq!(outcome.message, format!("cannot create container from {IMAGE}: invalid mount config (HTTP 500)"));

    let engine = FakeEngine::start(Script { create: (201, json!({"Warnings": []})), ..Script::default() }).await;
    let outcome = run(&engine.runtime(), &context(scratch.path()), false, CancellationToken::new()).await;
    assert_eq!(outcome.message, "cannot create container: the engine returned no usable container id");
}

#[tokio::test]
async fn a_non_zero_exit_fails_with_its_code_and_an_oom_kill_says_so() {
    let scratch = tempfile::tempdir().unwrap();
    let engine = FakeEngine::start(Script { exit_code: Some(3), logs: frame(2, b"boom\n"), ..Script::default() }).await;
    let outcome = run(&engine.runtime(), &context(scratch.path()), false, CancellationToken::new()).await;
    assert_eq!((outcome.ending, outcome.exit_code, outcome.message.as_str()), (Ending::Failed, 3, "exited with code 3"));
    assert_eq!(outcome.stderr_tail, b"boom\n");

    let engine = FakeEngine::start(Script { exit_code: Some(137), oom_killed: true, ..Script::default() }).await;
    let outcome = run(&engine.runtime(), &context(scratch.path()), false, CancellationToken::new()).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, 137));
    assert_eq!(outcome.message, "out of memory: the task needed more than 64 MiB");

    // An engine that does not report OOM kills (Podman on cgroup v1): the limit is still named.
    let engine = FakeEngine::start(Script { exit_code: Some(137), oom_killed: false, ..Script::default() }).await;
    let outcome = run(&engine.runtime(), &context(scratch.path()), false, CancellationToken::new()).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, 137));
    assert_eq!(outcome.message, "killed by SIGKILL (exit code 137): out of memory if the task reached its 64 MiB limit (the engine did not say)");
}

#[tokio::test]
async fn a_timeout_kills_and_removes_the_container() {
    let engine = FakeEngine::start(Script { exit_code: None, logs: frame(1, b"partial\n"), ..Script::default() }).await;
    let scratch = tempfile::tempdir().unwrap();
    let ctx = AttemptContext { timeout: Some(Duration::from_millis(300)), ..context(scratch.path()) };
    let outcome = run(&engine.runtime(), &ctx, false, CancellationToken::new()).await;
    assert_eq!((outcome.ending, outcome.exit_code, outcome.message.as_str()), (Ending::Failed, -1, "timed out after 300ms"));
    assert_eq!(outcome.stdout_tail, b"partial\n");
    let calls = engine.calls();
    let id = format!("/containers/{ID}");
    assert_eq!(calls[calls.len() - 3..], [format!("POST {id}/kill"), format!("GET {id}/logs?stdout=1&stderr=1"), format!("DELETE {id}?force=true")]);
}

#[tokio::test]
async fn cancel_kills_and_removes_the_container() {
    let engine = FakeEngine::start(Script { exit_code: None, ..Script::default() }).await;
    let scratch = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let later = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        later.cancel();
    });
    let ctx = AttemptContext { timeout: None, ..context(scratch.path()) };
    let outcome = run(&engine.runtime(), &ctx, false, cancel).await;
    assert_eq!((outcome.ending, outcome.exit_code, outcome.message.as_str()), (Ending::Cancelled, -1, "cancelled"));
    let calls = engine.calls();
    assert!(calls.contains(&format!("POST /containers/{ID}/kill")), "{calls:?}");
    assert_eq!(calls.last().unwrap(), &format!("DELETE /containers/{ID}?force=true"));
}

#[tokio::test]
async fn output_past_its_cap_fails_the_attempt() {
    let big = vec![b'x'; (crate::runtime::output::STDERR_LIMIT + 1) as usize];
    let engine = FakeEngine::start(Script { logs: frame(2, &big), ..Script::default() }).await;
    let scratch = tempfile::tempdir().unwrap();
    let outcome = run(&engine.runtime(), &context(scratch.path()), false, CancellationToken::new()).await;
    assert_eq!((outcome.ending, outcome.message.as_str()), (Ending::Failed, "stderr limit 1 MiB exceeded"));
    assert_eq!(outcome.stderr_tail.len(), TAIL_BYTES);
    assert_eq!(engine.calls().last().unwrap(), &format!("DELETE /containers/{ID}?force=true"));
}

#[tokio::test]
async fn a_gpu_task_gets_exactly_its_devices_through_a_device_request() {
    let engine = FakeEngine::start(Script::default()).await;
    let scratch = tempfile::tempdir().unwrap();
    let gpus = strings(&["GPU-5b3e0c2a-8f1d-4d7a-9a0e-2f0c6f1b9e11"]);
    let ctx = context(scratch.path());
    let outcome = engine.runtime().run_with_gpus(IMAGE, &[], &[], &ctx, false, &gpus, CancellationToken::new()).await;
    assert_eq!(outcome.ending, Ending::Succeeded, "{}", outcome.message);
    let host = &engine.create_body()["HostConfig"];
    // By device id, not by count: with `Count` the engine gives every task the first GPUs.
    assert_eq!(host["DeviceRequests"], json!([{"Driver": "nvidia", "DeviceIDs": ["GPU-5b3e0c2a-8f1d-4d7a-9a0e-2f0c6f1b9e11"], "Capabilities": [["gpu"]]}]));
    assert_eq!(host["Privileged"], false, "a GPU does not unlock privileges");

    let engine = FakeEngine::start(Script::default()).await;
    run(&engine.runtime(), &context(scratch.path()), false, CancellationToken::new()).await;
    assert!(engine.create_body()["HostConfig"].get("DeviceRequests").is_none(), "no GPU unless asked");
}

#[tokio::test]
async fn containers_run_as_the_agents_user_so_scratch_is_writable_and_removable() {
    let scratch = tempfile::tempdir().unwrap();
    let engine = FakeEngine::start(Script::default()).await;
    let runtime = engine.runtime();
    runtime.check_engine().await.unwrap();
    run(&runtime, &context(scratch.path()), false, CancellationToken::new()).await;
    let (uid, gid) = (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw());
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(scratch.path()).unwrap());
    if uid == 0 {
        // A root agent never runs tasks as root: they run as nobody, who gets the scratch dir.
        assert_eq!(engine.create_body()["User"], "65534:65534");
        assert_eq!(owner, 65534);
    } else {
        assert_eq!(engine.create_body()["User"], format!("{uid}:{gid}"));
        assert_eq!(owner, uid);
    }

    // Rootless engines map their root to the agent's user.
    let engine = FakeEngine::start(Script { rootless: true, ..Script::default() }).await;
    let runtime = engine.runtime();
    runtime.check_engine().await.unwrap();
    run(&runtime, &context(scratch.path()), false, CancellationToken::new()).await;
    assert_eq!(engine.create_body()["User"], "0:0");
}

#[tokio::test]
async fn containers_a_crashed_run_left_behind_are_swept_at_start() {
    let engine = FakeEngine::start(Script { leftovers: vec!["aaaa1111", "bbbb2222"], ..Script::default() }).await;
    let runtime = engine.runtime().for_node("n1");
    assert_eq!(runtime.sweep().await, Ok(2));
    let calls = engine.calls();
    let filters = query(&json!({"label": ["dev.kommune.attempt", "dev.kommune.node=n1"]}).to_string());
    assert_eq!(
        calls,
        [
            format!("GET /containers/json?all=true&filters={filters}"),
            "DELETE /containers/aaaa1111?force=true".to_string(),
            "DELETE /containers/bbbb2222?force=true".to_string(),
        ]
    );

    // New containers carry the node label, so the next start finds them.
    let scratch = tempfile::tempdir().unwrap();
    run(&runtime, &context(scratch.path()), false, CancellationToken::new()).await;
    assert_eq!(engine.create_body()["Labels"], json!({"dev.kommune.attempt": "hello-container-1-a1", "dev.kommune.node": "n1"}));
    assert!(runtime.live_ids().is_empty(), "a removed container is no longer counted as the agent's");

    let engine = FakeEngine::start(Script::default()).await;
    assert_eq!(engine.runtime().sweep().await, Ok(0));
}

#[tokio::test]
async fn an_engine_that_does_not_answer_fails_the_start_check() {
    let dir = tempfile::tempdir().unwrap();
    let err = ContainerRuntime::new(dir.path().join("docker.sock"), false).check_engine().await.unwrap_err();
    assert!(err.starts_with("cannot connect to "), "{err}");
}

#[test]
fn frames_cut_anywhere_are_reassembled() {
    let stream = [frame(1, b"out-1 "), frame(2, b"err"), frame(0, b"ignored"), frame(1, b""), frame(1, b"out-2")].concat();
    for cut in 1..stream.len() {
        let (stdout, stderr) = (SharedCapture::stdout(), SharedCapture::stderr());
        let mut demux = Demux::default();
        for chunk in stream.chunks(cut) {
            assert!(demux.feed(chunk, &stdout, &stderr));
        }
        assert_eq!((stdout.tail(), stderr.tail()), (b"out-1 out-2".to_vec(), b"err".to_vec()), "chunks of {cut}");
    }
}
