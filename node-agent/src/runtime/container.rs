//! Container runtime: runs an image pinned by digest through the Docker Engine API (Docker, or
//! Podman's compatible socket), locked down: no privileges, no capabilities, read-only root, no network.

mod engine;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::output::SharedCapture;
use super::{AttemptContext, End, Measured, Outcome, deadline, expired, human_bytes};
use engine::Engine;

/// Where the attempt's scratch directory appears inside the container.
pub const SCRATCH_MOUNT: &str = "/scratch";
/// Enough processes for any sane task, few enough to stop a fork bomb at the container.
const PIDS_LIMIT: i64 = 512;
/// How long each clean-up call (kill, logs, remove) may take once the task has stopped: a hung
/// engine must not hold the attempt's result back forever.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);
/// The label every container carries, so leftovers of a crashed agent can be found.
const ATTEMPT_LABEL: &str = "dev.kommune.attempt";
/// The node that started a container, so an agent sweeps only its own leftovers when several
/// agents share one engine.
const NODE_LABEL: &str = "dev.kommune.node";
/// The user a container runs as when the agent itself runs as root under a rootful engine.
const NOBODY: u32 = 65534;
/// How often the engine's stats of a running container are read for the usage receipt. The
/// first read is one interval after start, so a task shorter than that is measured as no CPU.
const STATS_EVERY: Duration = Duration::from_millis(500);

/// CPU and memory of one container as the engine's stats report them (cgroup accounting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EngineStats {
    /// Total CPU time, nanoseconds (`cpu_stats.cpu_usage.total_usage`).
    pub cpu_nanos: u64,
    /// Memory in use now (`memory_stats.usage`).
    pub memory_bytes: u64,
    /// Peak memory when the engine knows it (`memory_stats.max_usage`, cgroup v1 only).
    pub memory_peak_bytes: u64,
}

/// Reads a `/containers/{id}/stats?stream=false` reply (Docker and Podman use the same shape).
/// None when the reply has no CPU figure (a container that has already stopped).
pub(crate) fn parse_stats(v: &Value) -> Option<EngineStats> {
    let cpu_nanos = v.pointer("/cpu_stats/cpu_usage/total_usage").and_then(Value::as_u64).filter(|n| *n > 0)?;
    let memory_bytes = v.pointer("/memory_stats/usage").and_then(Value::as_u64).unwrap_or(0);
    let memory_peak_bytes = v.pointer("/memory_stats/max_usage").and_then(Value::as_u64).unwrap_or(0);
    Some(EngineStats { cpu_nanos, memory_bytes, memory_peak_bytes })
}

/// What the stats sampler saw of one container.
#[derive(Debug)]
struct StatsAccount {
    cpu_nanos: u64,
    memory: super::usage::MemoryIntegral,
    samples: u32,
}

/// Runs `container` workloads through one engine socket.
#[derive(Debug, Clone)]
pub struct ContainerRuntime {
    engine: Engine,
    allow_network: bool,
    node: String,
    /// The engine maps its root to this agent's user (rootless Docker or Podman).
    rootless: Arc<AtomicBool>,
    /// Containers created and not yet removed, for idle-only mode's CPU accounting.
    live: Arc<Mutex<HashSet<String>>>,
}

impl ContainerRuntime {
    /// `socket` is the engine's unix socket (`/var/run/docker.sock`, or Podman's
    /// `$XDG_RUNTIME_DIR/podman/podman.sock`); `allow_network` comes from the agent's
    /// `--allow-container-network`. Nothing is contacted until a task runs.
    pub fn new(socket: PathBuf, allow_network: bool) -> Self {
        Self { engine: Engine::new(socket), allow_network, node: String::new(), rootless: Arc::default(), live: Arc::default() }
    }

    /// Labels containers with this node's name, and sweeps only those.
    pub fn for_node(mut self, node: &str) -> Self {
        self.node = node.to_string();
        self
    }

    /// Asks the engine whether it answers and whether it runs rootless (which decides the user
    /// containers run as). Called once at start, so a wrong socket is a clear error then.
    pub async fn check_engine(&self) -> Result<(), String> {
        let (_, info) = self.engine.call(Method::GET, "/info", None).await?;
        let rootless = info.get("SecurityOptions").and_then(Value::as_array).is_some_and(|o| o.iter().any(|v| v.as_str() == Some("name=rootless")));
        self.rootless.store(rootless, Ordering::Relaxed);
        Ok(())
    }

    /// Removes containers a previous run of this agent left behind (it crashed or was killed
    /// mid-task): every container with this node's label. Returns how many were removed.
    pub async fn sweep(&self) -> Result<usize, String> {
        let mut labels = vec![ATTEMPT_LABEL.to_string()];
        if !self.node.is_empty() {
            labels.push(format!("{NODE_LABEL}={}", self.node));
        }
        let filters = json!({ "label": labels }).to_string();
        let (_, list) = self.engine.call(Method::GET, &format!("/containers/json?all=true&filters={}", query(&filters)), None).await?;
        let mut removed = 0;
        for id in list.as_array().into_iter().flatten().filter_map(|c| c.get("Id").and_then(Value::as_str)) {
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                continue;
            }
            match self.engine.call(Method::DELETE, &format!("/containers/{id}?force=true"), None).await {
                Ok(_) => removed += 1,
                Err(e) => tracing::warn!(container = %short(id), error = %e, "cannot remove a container left by an earlier run"),
            }
        }
        Ok(removed)
    }

    /// Ids of the containers running tasks now.
    pub fn live_ids(&self) -> Vec<String> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    /// The `User` containers run as, and the owner to give the scratch directory, if any.
    /// Containers never run as the image's own user: a rootful engine runs them as the agent's
    /// user (so /scratch, made by the agent, is writable and what the task leaves there is the
    /// agent's to delete), or as nobody when the agent is root (the scratch directory is given
    /// to nobody); a rootless engine maps its root to the agent's user, so they run as its root.
    fn user(&self) -> (String, Option<(u32, u32)>) {
        if self.rootless.load(Ordering::Relaxed) {
            return ("0:0".into(), None);
        }
        let (uid, gid) = (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw());
        if uid == 0 { (format!("{NOBODY}:{NOBODY}"), Some((NOBODY, NOBODY))) } else { (format!("{uid}:{gid}"), None) }
    }

    pub fn allows_network(&self) -> bool {
        self.allow_network
    }

    /// Runs `image` (pulled when missing) with `command` as entrypoint and `args` as its
    /// arguments (empty keeps the image's own), the attempt's scratch dir at `/scratch`, and
    /// the network only when the job asks (`network`) and the provider allows it. The
    /// container is removed afterwards whatever happened; on timeout or cancel it is killed first.
    pub async fn run(&self, image: &str, command: &[String], args: &[String], ctx: &AttemptContext, network: bool, cancel: CancellationToken) -> Outcome {
        self.run_with_gpus(image, command, args, ctx, network, &[], cancel).await
    }

    /// Like [`ContainerRuntime::run`], with the GPUs `gpus` (NVIDIA device ids: uuids or
    /// indexes) given to the container through the engine's device requests.
    #[allow(clippy::too_many_arguments)]
    pub async fn run_with_gpus(
        &self,
        image: &str,
        command: &[String],
        args: &[String],
        ctx: &AttemptContext,
        network: bool,
        gpus: &[String],
        cancel: CancellationToken,
    ) -> Outcome {
        let started = Instant::now();
        if !kommune_proto::is_pinned_image(image) {
            return Outcome::not_started(format!(
                "image {:?} is not pinned by digest: use name@sha256:<64 hex digits>",
                image.chars().take(200).collect::<String>()
            ));
        }
        if !self.engine.socket().exists() {
            return Outcome::not_started(format!("container runtime unavailable: no Docker/Podman socket at {}", self.engine.socket().display()));
        }
        if ctx.memory_bytes == 0 {
            return Outcome::not_started("the assignment carries no memory limit; containers never run without one");
        }
        let (user, scratch_owner) = self.user();
        if let Some((uid, gid)) = scratch_owner
            && let Err(e) = std::os::unix::fs::chown(&ctx.scratch_dir, Some(uid), Some(gid))
        {
            return Outcome::not_started(format!("cannot hand the scratch directory {} to uid {uid}: {e}", ctx.scratch_dir.display()));
        }
        let mut spec = create_body(image, command, args, ctx, network && self.allow_network);
        spec["User"] = json!(user);
        if !self.node.is_empty() {
            spec["Labels"][NODE_LABEL] = json!(self.node);
        }
        if !gpus.is_empty() {
            spec["HostConfig"]["DeviceRequests"] = gpu_request(gpus);
        }

        let mut created = None;
        let account = Mutex::new(StatsAccount { cpu_nanos: 0, memory: super::usage::MemoryIntegral::new(started), samples: 0 });
        let stopped = tokio::select! {
            ended = self.start_and_wait(image, &spec, &mut created, ctx, &account) => ended,
            () = cancel.cancelled() => End::cancelled(),
            after = expired(deadline(started, ctx.timeout)) => End::timed_out(after),
        };

        let (stdout, stderr) = SharedCapture::streams_for(ctx);
        let mut end = stopped;
        if let Some(id) = created {
            end = self.collect(&id, end, &stdout, &stderr).await;
            self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        }
        let end = end.check_output(&stdout, &stderr);
        let wall = started.elapsed();
        let account = account.into_inner().unwrap_or_else(|p| p.into_inner());
        let (memory_peak_bytes, memory_mib_millis) = account.memory.finish(started + wall);
        let measured = if account.samples == 0 {
            Measured { gpu_millis: gpu_millis(gpus.len(), wall), ..Measured::none() }
        } else {
            Measured {
                cpu_micros: account.cpu_nanos / 1000,
                memory_peak_bytes,
                memory_mib_millis,
                gpu_millis: gpu_millis(gpus.len(), wall),
                source: "engine-stats",
                ..Measured::default()
            }
        };
        Outcome::from_captures(end, &stdout, &stderr, wall, measured)
    }

    /// Reads the container's stats every [`STATS_EVERY`] into `account`, until dropped.
    async fn sample_stats(&self, id: &str, account: &Mutex<StatsAccount>) {
        loop {
            tokio::time::sleep(STATS_EVERY).await;
            let Ok(Some(reply)) = self.engine.find(&format!("/containers/{id}/stats?stream=false")).await else { continue };
            let Some(stats) = parse_stats(&reply) else { continue };
            let mut a = account.lock().unwrap_or_else(|p| p.into_inner());
            a.cpu_nanos = a.cpu_nanos.max(stats.cpu_nanos);
            a.memory.set(Instant::now(), stats.memory_bytes);
            a.memory.observe_peak(stats.memory_peak_bytes);
            a.samples += 1;
        }
    }

    /// Pulls, creates, starts and waits for the container. `created` names it as soon as it
    /// exists, so the caller removes it even when this future is dropped half-way.
    async fn start_and_wait(&self, image: &str, spec: &Value, created: &mut Option<String>, ctx: &AttemptContext, account: &Mutex<StatsAccount>) -> End {
        if let Err(e) = self.ensure_image(image).await {
            return End::failed(format!("cannot pull image {image}: {e}"));
        }
        let id = match self.engine.call(Method::POST, "/containers/create", Some(spec)).await {
            Ok((_, reply)) => match reply.get("Id").and_then(Value::as_str) {
                Some(id) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()) => id.to_owned(),
                _ => return End::failed("cannot create container: the engine returned no usable container id"),
            },
            Err(e) => return End::failed(format!("cannot create container from {image}: {e}")),
        };
        *created = Some(id.clone());
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone());
        if let Err(e) = self.engine.call(Method::POST, &format!("/containers/{id}/start"), None).await {
            return End::failed(format!("cannot start container {}: {e}", short(&id)));
        }
        let wait_path = format!("/containers/{id}/wait");
        let waited = tokio::select! {
            waited = self.engine.call(Method::POST, &wait_path, None) => waited,
            () = self.sample_stats(&id, account) => unreachable!("sampling never ends"),
        };
        let reply = match waited {
            Ok((_, reply)) => reply,
            Err(e) => return End::failed(format!("cannot wait for container {}: {e}", short(&id))),
        };
        if let Some(message) = reply.pointer("/Error/Message").and_then(Value::as_str).filter(|m| !m.is_empty()) {
            return End::failed(format!("container {} ended with an engine error: {message}", short(&id)));
        }
        let Some(code) = reply.get("StatusCode").and_then(Value::as_i64) else {
            return End::failed(format!("cannot wait for container {}: the engine sent no exit code", short(&id)));
        };
        let code = i32::try_from(code).unwrap_or(-1);
        // 137 is SIGKILL; only the engine knows whether the memory cap sent it, and not every
        // engine does: Podman on cgroup v1 (conmon misses the kernel's OOM event) reports
        // OOMKilled false for a task the memory cgroup killed, so the limit is named either way.
        if code == 137 {
            let limit = human_bytes(ctx.memory_bytes);
            let message = if self.oom_killed(&id).await {
                format!("out of memory: the task needed more than {limit}")
            } else {
                format!("killed by SIGKILL (exit code 137): out of memory if the task reached its {limit} limit (the engine did not say)")
            };
            return End { exit_code: code, ..End::failed(message) };
        }
        End::exited(code)
    }

    async fn ensure_image(&self, image: &str) -> Result<(), String> {
        if self.engine.find(&format!("/images/{image}/json")).await?.is_some() {
            return Ok(());
        }
        let (name, digest) = image.rsplit_once('@').unwrap_or((image, ""));
        self.engine.call_progress(&format!("/images/create?fromImage={}&tag={}", query(name), query(digest))).await
    }

    async fn oom_killed(&self, id: &str) -> bool {
        match self.engine.find(&format!("/containers/{id}/json")).await {
            Ok(Some(info)) => info.pointer("/State/OOMKilled").and_then(Value::as_bool).unwrap_or(false),
            _ => false,
        }
    }

    /// After the task stopped: kills it if it still runs, reads its output, removes it.
    async fn collect(&self, id: &str, end: End, stdout: &SharedCapture, stderr: &SharedCapture) -> End {
        let ran_to_exit = end.exit_code >= 0;
        if !ran_to_exit {
            // 409 (not running) and 404 (gone) are fine: it is stopped either way.
            let _ = tokio::time::timeout(CLEANUP_TIMEOUT, self.engine.call(Method::POST, &format!("/containers/{id}/kill"), None)).await;
        }
        let logs = tokio::time::timeout(CLEANUP_TIMEOUT, self.engine.logs(&format!("/containers/{id}/logs?stdout=1&stderr=1"), stdout, stderr)).await;
        let logs = logs.unwrap_or_else(|_| Err(format!("no answer within {}s", CLEANUP_TIMEOUT.as_secs())));
        let removed = tokio::time::timeout(CLEANUP_TIMEOUT, self.engine.call(Method::DELETE, &format!("/containers/{id}?force=true"), None)).await;
        if let Err(e) = removed.unwrap_or_else(|_| Err("no answer".into())) {
            tracing::warn!(container = %id, error = %e, "cannot remove a finished container; it is left behind");
        }
        match logs {
            // Without its output a result would carry the digest of nothing.
            Err(e) if ran_to_exit => End::failed(format!("cannot read the output of container {}: {e}", short(id))),
            _ => end,
        }
    }
}

/// GPU time of a task that held `gpus` GPUs for `wall`.
fn gpu_millis(gpus: usize, wall: Duration) -> u64 {
    (gpus as u64).saturating_mul(wall.as_millis().try_into().unwrap_or(u64::MAX))
}

/// The create request: everything that keeps the task in its box is decided here.
fn create_body(image: &str, command: &[String], args: &[String], ctx: &AttemptContext, network: bool) -> Value {
    let env: Vec<String> = ctx.task_env().into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    let nano_cpus = ctx.cpu_millis.saturating_mul(1_000_000);
    let memory = i64::try_from(ctx.memory_bytes).unwrap_or(i64::MAX);
    let mut body = json!({
        "Image": image,
        "Env": env,
        "Labels": { ATTEMPT_LABEL: ctx.attempt_id },
        "AttachStdin": false,
        "OpenStdin": false,
        "Tty": false,
        "NetworkDisabled": !network,
        "HostConfig": {
            "Memory": memory,
            // Equal to Memory: no swap on top, so the cap is the cap.
            "MemorySwap": memory,
            "NanoCpus": nano_cpus,
            "PidsLimit": PIDS_LIMIT,
            "Privileged": false,
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "ReadonlyRootfs": true,
            "Mounts": [{ "Type": "bind", "Source": ctx.scratch_dir, "Target": SCRATCH_MOUNT, "ReadOnly": false }],
            "NetworkMode": if network { "bridge" } else { "none" },
            "AutoRemove": false,
        },
    });
    if !command.is_empty() {
        body["Entrypoint"] = json!(command);
    }
    if !args.is_empty() {
        body["Cmd"] = json!(args);
    }
    body
}

/// NVIDIA GPUs by device id (not by count: the engine would hand every task the first GPUs).
fn gpu_request(devices: &[String]) -> Value {
    json!([{ "Driver": "nvidia", "DeviceIDs": devices, "Capabilities": [["gpu"]] }])
}

/// Percent-encodes a query value (image names carry `/`, `:` and `@`).
fn query(value: &str) -> String {
    value.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

/// The 12-character id the Docker CLI shows.
fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

#[cfg(test)]
mod tests;
