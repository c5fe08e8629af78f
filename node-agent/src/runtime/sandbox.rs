//! The exec sandbox: the agent starts each exec task through its own binary (`sandbox-exec`), a
//! supervisor that confines the command with Landlock and leaves none of its processes behind.
//!
//! Two stages of one hidden subcommand, because the workspace forbids `unsafe` (so no
//! `pre_exec`): the *supervisor* (unconfined, trusted code) becomes a child subreaper and
//! starts the *inner* stage, which restricts itself with Landlock and then `exec`s the task.
//! The task is thus in a Landlock domain the supervisor is not in: with ABI 6 scoping it cannot
//! signal the supervisor or the agent, and whatever it forks, `setsid` included, stays a
//! descendant of the supervisor, which kills them all when the command ends or on SIGTERM.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, LandlockStatus, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};
use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

/// Exit code of the inner stage when the sandbox could not be set up (as env(1) and
/// timeout(1) use 125 for their own failures).
pub const SANDBOX_FAILED: i32 = 125;
/// Exit code when the command itself could not be started (as a shell's 127).
pub const CANNOT_START: i32 = 127;
/// Starts the line the inner stage writes to stderr before exiting with one of the codes above.
pub const MARKER: &str = "kommune-sandbox: ";

mod sockets;

pub use sockets::{Hidden, hide_socket_dirs};

/// The newest ABI whose rights this code names (ABI 9 confines connect() to pathname unix
/// sockets); the crate downgrades to what the kernel has (best effort) and [`Confinement`]
/// says what was actually enforced.
const TARGET_ABI: ABI = ABI::V9;

/// System trees a command may read and execute: what a shell, coreutils, an interpreter and
/// its libraries need. Nothing of the agent's own state may lie beneath these (checked).
pub const READ_ONLY_ROOTS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/proc", "/sys"];
/// Device files a command may read and write.
const DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"];

/// What `sandbox-exec` was asked to do (parsed by the agent's CLI).
#[derive(Debug, Clone)]
pub struct SandboxRequest {
    /// The attempt's scratch directory: the only tree the command may write.
    pub scratch: PathBuf,
    /// Run the command even where Landlock is not available (the provider's explicit choice).
    pub allow_unsandboxed: bool,
    /// The program and its arguments.
    pub command: Vec<OsString>,
}

/// How far the kernel enforced the Landlock ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confinement {
    /// Filesystem rules and signal / abstract-socket scoping all hold.
    Full { abi: i32 },
    /// Filesystem rules hold, some newer rights do not (named in `missing`).
    Partial { abi: i32, missing: String },
    /// Nothing is enforced: no Landlock in this kernel, or it is disabled.
    None { why: String },
}

impl Confinement {
    pub fn is_enforced(&self) -> bool {
        !matches!(self, Confinement::None { .. })
    }
}

impl std::fmt::Display for Confinement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Confinement::Full { abi } => write!(f, "Landlock ABI {abi}: files and signals confined"),
            Confinement::Partial { abi, missing } => write!(f, "Landlock ABI {abi}: files confined, best effort ({missing})"),
            Confinement::None { why } => write!(f, "no Landlock ({why})"),
        }
    }
}

/// Confines the calling process (and every process it later starts) to read+execute on the
/// system trees, read+write on a few devices and full access beneath `scratch`; with ABI 6 it
/// also may not signal or reach abstract unix sockets of processes outside its domain.
pub fn confine(scratch: Option<&Path>) -> Result<Confinement, String> {
    let read = AccessFs::from_read(TARGET_ABI);
    let mut ruleset = Ruleset::default().set_compatibility(CompatLevel::BestEffort);
    ruleset = ruleset.handle_access(AccessFs::from_all(TARGET_ABI)).map_err(|e| format!("landlock: {e}"))?;
    ruleset = ruleset.scope(Scope::from_all(TARGET_ABI)).map_err(|e| format!("landlock: {e}"))?;
    let mut created = ruleset.create().map_err(|e| format!("landlock: {e}"))?;
    for root in READ_ONLY_ROOTS {
        // A tree this machine does not have (/lib32, /opt) is simply not granted.
        if let Ok(fd) = PathFd::new(root) {
            created = created.add_rule(PathBeneath::new(fd, read)).map_err(|e| format!("landlock rule for {root}: {e}"))?;
        }
    }
    for dev in DEVICES {
        if let Ok(fd) = PathFd::new(dev) {
            let rw = AccessFs::ReadFile | AccessFs::WriteFile;
            created = created.add_rule(PathBeneath::new(fd, rw)).map_err(|e| format!("landlock rule for {dev}: {e}"))?;
        }
    }
    if let Some(scratch) = scratch {
        let fd = PathFd::new(scratch).map_err(|e| format!("cannot open the scratch directory {}: {e}", scratch.display()))?;
        created =
            created.add_rule(PathBeneath::new(fd, AccessFs::from_all(TARGET_ABI))).map_err(|e| format!("landlock rule for the scratch directory: {e}"))?;
    }
    let status = created.restrict_self().map_err(|e| format!("landlock: {e}"))?;
    let abi = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => effective_abi as i32,
        LandlockStatus::NotEnabled => {
            return Ok(Confinement::None { why: "Landlock is built into this kernel but not enabled at boot (add landlock to lsm=)".into() });
        }
        LandlockStatus::NotImplemented => {
            return Ok(Confinement::None { why: "this kernel has no Landlock (Linux 5.13 or later with CONFIG_SECURITY_LANDLOCK)".into() });
        }
    };
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Confinement::Full { abi },
        RulesetStatus::PartiallyEnforced => Confinement::Partial { abi, missing: missing_rights(abi) },
        RulesetStatus::NotEnforced => Confinement::None { why: format!("the kernel refused the ruleset (ABI {abi})") },
    })
}

fn missing_rights(abi: i32) -> String {
    let mut missing = Vec::new();
    if abi < 2 {
        missing.push("renaming files across directories is refused outright (ABI 2)");
    }
    if abi < 3 {
        missing.push("truncating files outside scratch is not confined (ABI 3)");
    }
    if abi < 5 {
        missing.push("device ioctls are not confined (ABI 5)");
    }
    if abi < 6 {
        missing.push("the task may signal same-user processes and reach abstract unix sockets (ABI 6, Linux 6.12)");
    }
    if abi < 9 {
        missing.push("connecting to pathname unix sockets is not confined (ABI 9, Linux 7.1)");
    }
    missing.join("; ")
}

/// The read-only root that holds `dir`, if any: the agent's state must not lie there, or the
/// task could read the node key through the read rule.
pub fn exposed_by(dir: &Path) -> Option<&'static str> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    READ_ONLY_ROOTS.iter().copied().find(|root| dir.starts_with(root))
}

/// The path that starts this very binary again: `/proc/self/exe`, resolved by each new child
/// (a copy of this process), still names it after an upgrade replaced the file on disk, where
/// the path `current_exe` reads would end in " (deleted)".
pub fn own_binary() -> PathBuf {
    let proc_exe = Path::new("/proc/self/exe");
    if proc_exe.exists() { proc_exe.to_path_buf() } else { std::env::current_exe().unwrap_or_else(|_| proc_exe.to_path_buf()) }
}

/// Writes `message` as the sandbox's own failure and exits with `code`.
fn fail(code: i32, message: &str) -> ! {
    eprintln!("{MARKER}{message}");
    std::process::exit(code)
}

/// The inner stage: confine this process, then become the task's command. Never returns.
pub fn run_inner(request: &SandboxRequest) -> ! {
    // The supervisor blocks the signals it waits for; the task must get the default mask.
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    let Some((program, args)) = request.command.split_first() else { fail(SANDBOX_FAILED, "empty command") };
    // The agent's state dir is two levels above the scratch dir (<state>/scratch/<attempt>).
    if let Some(state) = request.scratch.parent().and_then(Path::parent)
        && let Some(root) = exposed_by(state)
    {
        fail(SANDBOX_FAILED, &format!("the agent's state directory {} lies under {root}, which exec tasks may read: move it (--state-dir)", state.display()));
    }
    // Before Landlock, which forbids mounting once in force.
    match hide_socket_dirs(Some(&request.scratch)) {
        Ok(_) => {}
        Err(e) => fail(SANDBOX_FAILED, &format!("cannot hide the socket directories: {e}")),
    }
    match confine(Some(&request.scratch)) {
        Err(e) => fail(SANDBOX_FAILED, &format!("cannot set up the exec sandbox: {e}")),
        Ok(c) if !c.is_enforced() && !request.allow_unsandboxed => {
            fail(SANDBOX_FAILED, &format!("exec sandbox unavailable: {c}; start the agent with --allow-unsandboxed-exec to run exec tasks without it"))
        }
        Ok(_) => {}
    }
    let error = std::process::Command::new(program).args(args).exec();
    let text = error.to_string();
    let text = text.split(" (os error ").next().unwrap_or(&text);
    fail(CANNOT_START, &format!("cannot start {}: {text}", program.to_string_lossy()))
}

/// The supervisor: starts the inner stage as its child, waits, and when the command ends (or a
/// SIGTERM/SIGINT/SIGHUP arrives) kills every remaining descendant. Returns the command's exit
/// code, or dies by the signal that killed the command.
pub fn supervise(request: &SandboxRequest, own_exe: &Path) -> i32 {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        fail(SANDBOX_FAILED, &format!("cannot become a child subreaper: {e}"));
    }
    // Blocked before the child exists, so no SIGCHLD or SIGTERM is lost; taken with sigwait.
    let mut waited = SigSet::empty();
    for s in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        waited.add(s);
    }
    if let Err(e) = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&waited), None) {
        fail(SANDBOX_FAILED, &format!("cannot block signals: {e}"));
    }
    let mut inner = std::process::Command::new(own_exe);
    inner.arg0("kommune-agent").arg("sandbox-exec").arg("--inner").arg("--scratch").arg(&request.scratch);
    if request.allow_unsandboxed {
        inner.arg("--allow-unsandboxed");
    }
    inner.arg("--").args(&request.command);
    let child = match inner.spawn() {
        Ok(child) => Pid::from_raw(child.id() as i32),
        Err(e) => fail(SANDBOX_FAILED, &format!("cannot start the sandbox stage {}: {e}", own_exe.display())),
    };
    let status = loop {
        match waited.wait() {
            Ok(Signal::SIGCHLD) => {
                if let Some(status) = reap_ready(child) {
                    break status;
                }
            }
            // Told to stop: the command goes with everything else.
            Ok(_) => break WaitStatus::Signaled(child, Signal::SIGTERM, false),
            Err(_) => {}
        }
    };
    kill_descendants();
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, signal, _) => {
            // Die the same way, so the agent reports "killed by signal N". Only signals
            // whose default action ends a process can have ended the command.
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
            let _ = kill(Pid::this(), signal);
            128 + signal as i32
        }
        _ => SANDBOX_FAILED,
    }
}

/// Reaps every child that has ended; the command's status once it is among them.
fn reap_ready(command: Pid) -> Option<WaitStatus> {
    let mut found = None;
    loop {
        match waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return found,
            Ok(status @ (WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _))) if pid == command => found = Some(status),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return found,
        }
    }
}

/// SIGKILLs every descendant of this process and reaps them, until none is left. As a
/// subreaper it inherits every orphan below it, so "no child left" means "no descendant left";
/// a process forking meanwhile is found on the next pass.
fn kill_descendants() {
    let me = std::process::id() as i32;
    loop {
        for pid in descendants(Path::new("/proc"), me) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        match waitpid(None, None) {
            Err(Errno::ECHILD) => return,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

/// The pids below `root` in the process tree, read from /proc/<pid>/stat.
pub fn descendants(proc_root: &Path, root: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(proc_root) else { return vec![] };
    let parents: Vec<(i32, i32)> = entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let ppid = stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut found = vec![root];
    let mut at = 0;
    while at < found.len() {
        let parent = found[at];
        found.extend(parents.iter().filter(|&&(_, ppid)| ppid == parent).map(|&(pid, _)| pid));
        at += 1;
    }
    found.remove(0);
    found
}

/// `sandbox-exec --probe`: confines a throwaway process and says how far that went, so the
/// agent can refuse exec tasks up front on a kernel without Landlock.
pub fn probe() -> i32 {
    let (hidden, broken) = match hide_socket_dirs(None) {
        Ok(Hidden::Dirs(dirs)) => (format!("socket dirs hidden: {}", dirs.join(" ")), false),
        Ok(Hidden::Unavailable(why)) => (format!("socket dirs NOT hidden ({why})"), false),
        Err(e) => (format!("cannot hide the socket dirs ({e}), so exec tasks would fail to start"), true),
    };
    match confine(None) {
        Ok(c) => {
            println!("{c}; {hidden}");
            if c.is_enforced() && !broken { 0 } else { 3 }
        }
        Err(e) => {
            println!("no Landlock ({e})");
            3
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_dir_may_not_lie_where_tasks_can_read() {
        assert_eq!(exposed_by(Path::new("/etc/kommune")), Some("/etc"));
        assert_eq!(exposed_by(Path::new("/usr/local/lib/kommune")), Some("/usr"));
        assert_eq!(exposed_by(Path::new("/var/lib/kommune")), None);
        assert_eq!(exposed_by(Path::new("/home/ann/.local/state/kommune")), None);
    }

    #[test]
    fn descendants_follow_parent_links_through_proc() {
        let dir = tempfile::tempdir().unwrap();
        for (pid, ppid) in [(10, 1), (11, 10), (12, 11), (13, 1), (14, 12)] {
            std::fs::create_dir(dir.path().join(pid.to_string())).unwrap();
            std::fs::write(dir.path().join(format!("{pid}/stat")), format!("{pid} (odd) name) S {ppid} 1 1 0")).unwrap();
        }
        let mut found = descendants(dir.path(), 10);
        found.sort_unstable();
        assert_eq!(found, vec![11, 12, 14]);
    }
}
