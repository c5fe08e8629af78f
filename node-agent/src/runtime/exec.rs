//! Exec runtime: runs a host command in the attempt's scratch dir, when the agent allows it.
//! The agent starts it through its sandbox supervisor (`sandbox.rs`): Landlock, no leftovers.

use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::output::SharedCapture;
use super::sandbox;
use super::usage::{self, MemoryIntegral};
use super::{AttemptContext, End, Measured, Outcome, deadline, expired};

/// The only search path a command gets; the agent's own PATH says nothing about the task.
const TASK_PATH: &str = "/usr/bin:/bin";
/// How long to wait for output pipes to close once the task's process group is gone. Longer
/// means a process that left the group (setsid) still holds them; it is then abandoned.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
const READ_CHUNK: usize = 16 * 1024;
/// How long the sandbox supervisor gets, after SIGTERM, to kill the task's processes and exit
/// before its whole process group is SIGKILLed.
const SUPERVISOR_GRACE: Duration = Duration::from_secs(2);

/// Runs `exec` workloads: argv straight to the kernel, no shell unless the job asks for one.
#[derive(Debug, Clone)]
pub struct ExecRuntime {
    allowed: bool,
    /// Run tasks as this (uid, gid) instead of the agent's own user.
    user: Option<(u32, u32)>,
    /// Start tasks through the agent's own binary (`sandbox-exec`); `None` runs them directly,
    /// unconfined, which only tests and embedders that sandbox otherwise should do.
    sandbox: Option<Sandbox>,
}

#[derive(Debug, Clone)]
struct Sandbox {
    trampoline: PathBuf,
    allow_unsandboxed: bool,
}

/// The user exec tasks run as: a name or a uid, resolved to (uid, gid) through the system's
/// user database. Switching to it needs root, so a non-root agent is told so up front.
pub fn resolve_exec_user(user: &str, agent_is_root: bool) -> Result<(u32, u32), String> {
    use nix::unistd::{Uid, User};
    if !agent_is_root {
        return Err(format!("--exec-user {user}: the agent must run as root to start tasks as another user (or drop --exec-user)"));
    }
    let found = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(user),
    };
    match found {
        Ok(Some(u)) if u.uid.is_root() => Err(format!("--exec-user {user}: that is root; name an unprivileged user")),
        Ok(Some(u)) => Ok((u.uid.as_raw(), u.gid.as_raw())),
        Ok(None) => Err(format!("--exec-user {user}: no such user on this machine (create one, e.g. `useradd --system --no-create-home kommune-task`)")),
        Err(e) => Err(format!("--exec-user {user}: cannot look it up: {e}")),
    }
}

impl ExecRuntime {
    /// `allowed` comes from the agent's `--allow-exec`; when false every run fails with a hint.
    pub fn new(allowed: bool) -> Self {
        Self { allowed, user: None, sandbox: None }
    }

    /// Tasks start through `trampoline` (the agent binary, whose hidden `sandbox-exec`
    /// confines them with Landlock and kills whatever they leave behind). Where the kernel has
    /// no Landlock, tasks fail to start unless `allow_unsandboxed`.
    pub fn sandboxed(mut self, trampoline: PathBuf, allow_unsandboxed: bool) -> Self {
        self.sandbox = Some(Sandbox { trampoline, allow_unsandboxed });
        self
    }

    /// Tasks run as `uid`:`gid` (see [`resolve_exec_user`]); their scratch directory is handed
    /// to that user first. Supplementary groups are dropped.
    pub fn as_user(mut self, uid: u32, gid: u32) -> Self {
        self.user = Some((uid, gid));
        self
    }

    pub fn is_allowed(&self) -> bool {
        self.allowed
    }

    /// Runs `command` with a clean environment in `ctx.scratch_dir`, in a process group of its
    /// own that is killed as a whole on timeout, cancel, output past its cap, when the command
    /// exits (stragglers) and when the returned future is dropped. Sandboxed (the agent's
    /// case), the group leader is the `sandbox-exec` supervisor, which is asked to stop first
    /// because only it can find processes that left the group with setsid.
    ///
    /// `ctx.memory_bytes` is NOT enforced for exec yet: RLIMIT_AS would break runtimes that
    /// reserve address space up front, and a per-task cgroup needs privileges the agent does
    /// not assume. The agent pod's own memory limit is the only backstop.
    pub async fn run(&self, command: &[String], ctx: &AttemptContext, cancel: CancellationToken) -> Outcome {
        let started = Instant::now();
        if !self.allowed {
            return Outcome::not_started("exec runtime disabled: start the agent with --allow-exec");
        }
        let Some((program, args)) = command.split_first() else {
            return Outcome::not_started("exec workload has an empty command");
        };
        let mut command = match &self.sandbox {
            None => task_command(program.as_ref(), args, ctx),
            Some(sandbox) => {
                let mut command = task_command(sandbox.trampoline.as_os_str(), ["sandbox-exec".to_owned(), "--scratch".to_owned()], ctx);
                // What `ps` shows, whatever path started the binary (/proc/self/exe).
                command.as_std_mut().arg0("kommune-agent");
                command.arg(&ctx.scratch_dir);
                if sandbox.allow_unsandboxed {
                    command.arg("--allow-unsandboxed");
                }
                // The supervisor must get its SIGTERM (to clean up) before anything SIGKILLs it.
                command.arg("--").arg(program).args(args).kill_on_drop(false);
                command
            }
        };
        let supervised = self.sandbox.is_some();
        if let Some((uid, gid)) = self.user {
            if let Err(e) = std::os::unix::fs::chown(&ctx.scratch_dir, Some(uid), Some(gid)) {
                return Outcome::not_started(format!("cannot hand the scratch directory {} to uid {uid}: {e}", ctx.scratch_dir.display()));
            }
            // std drops supplementary groups when a root parent sets the uid.
            command.uid(uid).gid(gid);
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                return Outcome::not_started(format!("cannot start {program}: {}", describe(&e)));
            }
        };
        let pid = child.id();
        let group = pid.map(|pid| ProcessGroup { pgid: pid, supervised });
        let sampler = pid.map(|pid| MemorySampler::start(pid, started));

        let (stdout, stderr) = SharedCapture::streams_for(ctx);
        let over_limit = CancellationToken::new();
        let mut readers = tokio::task::JoinSet::new();
        if let Some(pipe) = child.stdout.take() {
            readers.spawn(drain(pipe, stdout.clone(), over_limit.clone()));
        }
        if let Some(pipe) = child.stderr.take() {
            readers.spawn(drain(pipe, stderr.clone(), over_limit.clone()));
        }

        let stopped = tokio::select! {
            () = leader_exited(pid) => None,
            () = cancel.cancelled() => Some(End::cancelled()),
            after = expired(deadline(started, ctx.timeout)) => Some(End::timed_out(after)),
            () = over_limit.cancelled() => Some(End::failed("output limit exceeded")),
        };
        if stopped.is_some() {
            // Stop paths: kill the leader (and, below, its group) so it exits, then account it.
            // A supervisor is asked first: it alone can find the task's setsid'd processes.
            if supervised && let Some(pid) = pid {
                terminate(pid);
                if tokio::time::timeout(SUPERVISOR_GRACE, leader_exited(Some(pid))).await.is_err() {
                    tracing::warn!(attempt = %ctx.attempt_id, "the sandbox supervisor did not stop; killing its process group");
                }
            }
            let _ = child.start_kill();
            leader_exited(pid).await;
        }
        // The leader has exited but is not reaped yet: its /proc entry still holds its final CPU
        // times, including every descendant it waited for.
        let times = pid.and_then(|pid| usage::proc_times(Path::new("/proc"), pid));
        // Whatever happened, nothing of the task outlives the attempt: background processes
        // included. The unreaped leader keeps the group id from being reused meanwhile.
        if let Some(group) = group {
            group.finish();
        }
        let status = child.wait().await;
        let end = match stopped {
            Some(end) => end,
            None if supervised => sandbox_end(status, &stderr),
            None => exit_end(status),
        };
        if tokio::time::timeout(DRAIN_GRACE, async { while readers.join_next().await.is_some() {} }).await.is_err() {
            tracing::warn!(attempt = %ctx.attempt_id, "task output still open after its process group was killed; giving up on it");
            readers.abort_all();
        }
        let wall = started.elapsed();
        let memory = match sampler {
            Some(s) => s.stop().await,
            None => MemoryIntegral::new(started),
        };
        let (memory_peak_bytes, memory_mib_millis) = memory.finish(started + wall);
        let measured = match times {
            Some(t) => Measured { cpu_micros: t.total_micros(), memory_peak_bytes, memory_mib_millis, source: "proc", ..Default::default() },
            None => Measured { memory_peak_bytes, memory_mib_millis, source: "proc-partial", ..Default::default() },
        };
        let end = end.check_output(&stdout, &stderr);
        Outcome::from_captures(end, &stdout, &stderr, wall, measured)
    }
}

fn task_command<A: AsRef<std::ffi::OsStr>>(program: &std::ffi::OsStr, args: impl IntoIterator<Item = A>, ctx: &AttemptContext) -> Command {
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .env("PATH", TASK_PATH)
        .env("HOME", &ctx.scratch_dir)
        // Temp files land in the scratch dir too, so they go away with it.
        .env("TMPDIR", &ctx.scratch_dir)
        .envs(ctx.task_env())
        .current_dir(&ctx.scratch_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    command
}

/// Feeds one pipe into its capture until EOF, or until the stream passes its cap, which it
/// reports through `over_limit` so the task is stopped.
async fn drain(mut pipe: impl AsyncRead + Unpin, capture: SharedCapture, over_limit: CancellationToken) {
    let mut buf = vec![0; READ_CHUNK];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if !capture.push(&buf[..n]) {
                    over_limit.cancel();
                    return;
                }
            }
        }
    }
}

/// The supervisor's status is the command's, except when the sandbox itself or the start of
/// the command failed: then its stderr's last line says why. A task that forges that line only
/// changes its own failure message; its usage is measured all the same.
fn sandbox_end(status: io::Result<ExitStatus>, stderr: &SharedCapture) -> End {
    let code = status.as_ref().ok().and_then(|s| s.code());
    if let Some(code @ (sandbox::SANDBOX_FAILED | sandbox::CANNOT_START)) = code {
        let tail = String::from_utf8_lossy(&stderr.tail()).into_owned();
        if let Some(line) = tail.lines().last().and_then(|l| l.strip_prefix(sandbox::MARKER)) {
            return End { exit_code: code, ..End::failed(line) };
        }
    }
    exit_end(status)
}

/// Asks a sandbox supervisor to stop its task (it kills every process of it, then exits).
fn terminate(pid: u32) {
    use nix::sys::signal::{Signal, kill};
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM);
    }
}

fn exit_end(status: io::Result<ExitStatus>) -> End {
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => End::exited(code),
            (None, Some(signal)) => End::failed(format!("killed by signal {signal}")),
            (None, None) => End::failed(format!("ended with {status}")),
        },
        Err(e) => End::failed(format!("cannot wait for the task: {e}")),
    }
}

/// How often resident memory of the task's process tree is sampled.
const MEMORY_SAMPLE: Duration = Duration::from_millis(100);

/// Samples the resident memory of a task's process tree until stopped.
struct MemorySampler {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<MemoryIntegral>,
}

impl MemorySampler {
    fn start(pid: u32, started: Instant) -> Self {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let handle = tokio::spawn(async move {
            let mut memory = MemoryIntegral::new(started);
            let mut tick = tokio::time::interval(MEMORY_SAMPLE);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = token.cancelled() => return memory,
                }
                let (rss, hwm) = usage::tree_memory(Path::new("/proc"), pid);
                memory.set(Instant::now(), rss);
                memory.observe_peak(hwm);
            }
        });
        MemorySampler { stop, handle }
    }

    async fn stop(self) -> MemoryIntegral {
        self.stop.cancel();
        self.handle.await.unwrap_or_else(|_| MemoryIntegral::new(Instant::now()))
    }
}

/// Resolves once the task's leader has exited, without reaping it (waitid with WNOWAIT), so its
/// final accounting can still be read from /proc. Never resolves without a pid.
async fn leader_exited(pid: Option<u32>) {
    use nix::errno::Errno;
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) else { return std::future::pending().await };
    let _ = tokio::task::spawn_blocking(move || {
        loop {
            match waitid(Id::Pid(nix::unistd::Pid::from_raw(pid)), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Err(Errno::EINTR) => continue,
                // Exited, or already reaped (ECHILD): either way it is gone.
                _ => return,
            }
        }
    })
    .await;
}

/// "No such file or directory" rather than "No such file or directory (os error 2)".
fn describe(error: &io::Error) -> String {
    let text = error.to_string();
    match text.find(" (os error ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// The task's process group (its leader's pid). Dropped without [`ProcessGroup::finish`] (the
/// run's future was dropped), it SIGKILLs every process still in it, or, when the leader is a
/// sandbox supervisor, asks that to stop the task, since only it can find setsid'd processes.
struct ProcessGroup {
    pgid: u32,
    supervised: bool,
}

impl ProcessGroup {
    /// The leader has exited (and is not reaped yet): SIGKILL whatever is left in the group.
    fn finish(self) {
        kill_process_group(self.pgid);
        std::mem::forget(self);
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if self.supervised {
            terminate(self.pgid);
        } else {
            kill_process_group(self.pgid);
        }
    }
}

/// std has no killpg and the workspace forbids unsafe code, so this asks kill(1) (procps,
/// util-linux or busybox; the agent image must ship one). Without it only the leader dies,
/// through the child handle. kill(1) is one short fork+exec, cheap enough to wait for inline.
///
/// Once the leader has been reaped its pid could in principle be reused as a new group id,
/// but not while any process of the old group lives, and the kill follows the reap at once.
fn kill_process_group(pgid: u32) {
    // Group 0 is our own and 1 would be init's: never signal those.
    if pgid <= 1 {
        return;
    }
    let killed = std::process::Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{pgid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if let Err(e) = killed {
        tracing::warn!(pgid, error = %e, "cannot run kill(1): the task's background processes may outlive it");
    }
}

mod leftovers;
pub use leftovers::{pgid_from_stat, stop_leftover_tasks};

#[cfg(test)]
mod tests;
