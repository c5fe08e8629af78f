//! Exec tasks attack the agent that runs them, through the real `kommune-agent sandbox-exec`:
//! the node key, other attempts' scratch, escaping with setsid, signalling the agent.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kommune_agent::runtime::{AttemptContext, Ending, ExecRuntime, Outcome, stop_leftover_tasks};
use tokio_util::sync::CancellationToken;

const AGENT: &str = env!("CARGO_BIN_EXE_kommune-agent");
const KEY_TEXT: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIKommuneTestKeyNotARealOne\n-----END PRIVATE KEY-----\n";

/// A state dir laid out like the agent's: node.key, results/, receipts/, scratch/<attempt>.
struct StateDir {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl StateDir {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::write(root.join("node.key"), KEY_TEXT).unwrap();
        for sub in ["results", "receipts", "scratch/attempt-a", "scratch/attempt-b"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        std::fs::write(root.join("results/r1.json"), "spooled result").unwrap();
        std::fs::write(root.join("receipts/epoch-1.log"), "receipt").unwrap();
        std::fs::write(root.join("scratch/attempt-b/secret.txt"), "other attempt's data").unwrap();
        StateDir { _dir: dir, root }
    }

    fn context(&self, timeout: Duration) -> AttemptContext {
        AttemptContext {
            attempt_id: "attempt-a".into(),
            task_identity: String::new(),
            task_index: 0,
            task_count: 1,
            memory_bytes: 64 << 20,
            cpu_millis: 1000,
            timeout: Some(timeout),
            scratch_dir: self.root.join("scratch/attempt-a"),
            keep_streams: None,
            live: None,
            env: vec![("AGENT_PID".into(), std::process::id().to_string())],
        }
    }
}

/// The probe says whether this kernel confines tasks; without Landlock the tests cannot attack.
fn landlock_or_skip() -> bool {
    let probe = std::process::Command::new(AGENT).args(["sandbox-exec", "--probe"]).output().unwrap();
    if !probe.status.success() {
        println!("skipped: no Landlock ({})", String::from_utf8_lossy(&probe.stdout).trim());
    }
    probe.status.success()
}

async fn sh(script: &str, ctx: &AttemptContext) -> Outcome {
    let command = ["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()];
    ExecRuntime::new(true).sandboxed(AGENT.into(), false).run(&command, ctx, CancellationToken::new()).await
}

fn all_output(outcome: &Outcome) -> String {
    format!("{}{}{}", String::from_utf8_lossy(&outcome.stdout_tail), String::from_utf8_lossy(&outcome.stderr_tail), outcome.message)
}

fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

async fn wait_until_dead(pid: u32) -> bool {
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        if is_dead(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn read_pid(path: &Path) -> u32 {
    std::fs::read_to_string(path).unwrap().trim().parse().unwrap()
}

#[tokio::test]
async fn a_task_cannot_read_the_node_key_spool_receipts_or_other_scratch() {
    if !landlock_or_skip() {
        return;
    }
    let state = StateDir::new();
    let outcome = sh(
        "head -c 40 ../../node.key; echo key=$?
         cat ../../results/r1.json; echo spool=$?
         cat ../../receipts/epoch-1.log; echo receipts=$?
         cat ../attempt-b/secret.txt; echo other=$?
         ls ../; echo list=$?
         echo made > mine.txt && cat mine.txt; echo own=$?",
        &state.context(Duration::from_secs(20)),
    )
    .await;
    let stdout = String::from_utf8_lossy(&outcome.stdout_tail);
    assert_eq!(stdout, "key=1\nspool=1\nreceipts=1\nother=1\nlist=2\nmade\nown=0\n", "{outcome:?}");
    let stderr = String::from_utf8_lossy(&outcome.stderr_tail);
    assert!(stderr.contains("../../node.key") && stderr.contains("Permission denied"), "{stderr}");
    let seen = all_output(&outcome);
    for secret in ["PRIVATE KEY", "spooled result", "receipt\n", "other attempt's data"] {
        assert!(!seen.contains(secret), "{secret:?} leaked: {seen}");
    }
    assert_eq!(outcome.ending, Ending::Succeeded);
    assert_eq!(std::fs::read_to_string(state.root.join("scratch/attempt-a/mine.txt")).unwrap(), "made\n");
}

#[tokio::test]
async fn a_task_cannot_write_outside_its_scratch_or_use_tmp() {
    if !landlock_or_skip() {
        return;
    }
    let state = StateDir::new();
    let outcome = sh(
        "echo x > ../attempt-b/planted; echo other=$?; echo x >> ../../node.key; echo key=$?; ls /tmp; echo tmp=$?; ls /usr/bin/env; echo usr=$?",
        &state.context(Duration::from_secs(20)),
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&outcome.stdout_tail), "other=2\nkey=2\ntmp=2\n/usr/bin/env\nusr=0\n", "{outcome:?}");
    assert!(!state.root.join("scratch/attempt-b/planted").exists());
    assert_eq!(std::fs::read_to_string(state.root.join("node.key")).unwrap(), KEY_TEXT);
}

#[tokio::test]
async fn a_setsid_process_does_not_outlive_its_attempt() {
    if !landlock_or_skip() {
        return;
    }
    let state = StateDir::new();
    // setsid leaves the task's process group; the double fork re-parents it away from the shell.
    let outcome = sh("(setsid sleep 30 >/dev/null 2>&1 & echo $! > escaped.pid) ; echo started", &state.context(Duration::from_secs(20))).await;
    assert_eq!(outcome.ending, Ending::Succeeded, "{outcome:?}");
    let escaped = read_pid(&state.root.join("scratch/attempt-a/escaped.pid"));
    assert!(wait_until_dead(escaped).await, "setsid'd process {escaped} outlived its attempt");
}

#[tokio::test]
async fn a_setsid_process_is_stopped_with_a_timed_out_attempt() {
    if !landlock_or_skip() {
        return;
    }
    let state = StateDir::new();
    let outcome = sh("setsid sleep 30 >/dev/null 2>&1 & echo $! > escaped.pid; sleep 30", &state.context(Duration::from_millis(500))).await;
    assert_eq!(outcome.message, "timed out after 500ms");
    assert!(outcome.wall < Duration::from_secs(3), "{:?}", outcome.wall);
    let escaped = read_pid(&state.root.join("scratch/attempt-a/escaped.pid"));
    assert!(wait_until_dead(escaped).await, "setsid'd process {escaped} survived the timeout");
}

#[tokio::test]
async fn a_task_cannot_see_the_machines_unix_sockets() {
    if !landlock_or_skip() {
        return;
    }
    // A listening socket in /run stands in for the D-Bus session bus or docker.sock, which
    // Landlock before ABI 9 would let a task connect to.
    let path = PathBuf::from(format!("/run/kommune-sandbox-test-{}.sock", std::process::id()));
    let Ok(_listener) = std::os::unix::net::UnixListener::bind(&path) else {
        println!("skipped: cannot create a socket in /run as this user");
        return;
    };
    let state = StateDir::new();
    let outcome = sh(&format!("test -S {0}; echo seen=$?", path.display()), &state.context(Duration::from_secs(20))).await;
    let _ = std::fs::remove_file(&path);
    assert_eq!(String::from_utf8_lossy(&outcome.stdout_tail), "seen=1\n", "{outcome:?}");
}

#[tokio::test]
async fn a_task_cannot_signal_the_agent() {
    if !landlock_or_skip() {
        return;
    }
    let state = StateDir::new();
    // $AGENT_PID is this test process, standing in for the agent (same user).
    let outcome = sh("kill -0 $AGENT_PID; echo signal=$?", &state.context(Duration::from_secs(20))).await;
    assert_eq!(String::from_utf8_lossy(&outcome.stdout_tail), "signal=1\n", "{outcome:?}");
}

#[tokio::test]
async fn usage_through_the_sandbox_still_counts_the_command() {
    if !landlock_or_skip() {
        return;
    }
    let state = StateDir::new();
    let busy = "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done";
    let outcome = sh(&format!("( {busy} ) & wait; {busy}"), &state.context(Duration::from_secs(20))).await;
    assert_eq!(outcome.ending, Ending::Succeeded, "{}", outcome.message);
    let u = &outcome.usage;
    assert_eq!(u.source, "proc");
    assert!(u.cpu_micros >= 100_000, "cpu {}us over {:?}", u.cpu_micros, outcome.wall);
    assert!(u.cpu_micros <= outcome.wall.as_micros() as u64 + 50_000, "cpu {}us > wall {:?}", u.cpu_micros, outcome.wall);
    assert!(u.memory_peak_bytes > 0 && u.memory_mib_millis > 0, "{u:?}");

    // The peak is the command's, not the small supervisor's: a shell holding 40 MB.
    let outcome = sh("x=$(head -c 40000000 /dev/zero | tr '\\0' a); sleep 0.4; echo ${#x}", &state.context(Duration::from_secs(20))).await;
    assert_eq!(String::from_utf8_lossy(&outcome.stdout_tail), "40000000\n", "{outcome:?}");
    assert!(outcome.usage.memory_peak_bytes >= 40_000_000, "{:?}", outcome.usage);
}

#[tokio::test]
async fn exit_codes_signals_and_start_failures_come_through_the_sandbox() {
    if !landlock_or_skip() {
        return;
    }
    let state = StateDir::new();
    let ctx = state.context(Duration::from_secs(20));
    let outcome = sh("echo oops >&2; exit 3", &ctx).await;
    assert_eq!((outcome.ending, outcome.exit_code, outcome.message.as_str()), (Ending::Failed, 3, "exited with code 3"));
    let outcome = sh("kill -s TERM $$", &ctx).await;
    assert_eq!((outcome.exit_code, outcome.message.as_str()), (-1, "killed by signal 15"));
    let exec = ExecRuntime::new(true).sandboxed(AGENT.into(), false);
    let outcome = exec.run(&["kommune-no-such-program".to_owned()], &ctx, CancellationToken::new()).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, 127));
    assert_eq!(outcome.message, "cannot start kommune-no-such-program: No such file or directory");
}

#[tokio::test]
async fn a_state_dir_under_a_readable_system_tree_is_refused() {
    // No Landlock needed: the check runs before confinement. The "state dir" is /usr here,
    // two levels above an existing directory that stands in for the scratch dir.
    let Some(scratch) = ["/usr/share/doc", "/usr/lib/x86_64-linux-gnu", "/usr/share/man"].into_iter().find(|d| Path::new(d).is_dir()) else {
        println!("skipped: no /usr/*/* directory");
        return;
    };
    let ctx = AttemptContext { scratch_dir: scratch.into(), ..StateDir::new().context(Duration::from_secs(5)) };
    let exec = ExecRuntime::new(true).sandboxed(AGENT.into(), true);
    let outcome = exec.run(&["/bin/true".to_owned()], &ctx, CancellationToken::new()).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, 125));
    assert!(outcome.message.contains("lies under /usr"), "{outcome:?}");
}

#[tokio::test]
async fn a_restarted_agent_stops_what_a_killed_one_left_even_setsid_elsewhere() {
    if !landlock_or_skip() {
        return;
    }
    use std::os::unix::process::CommandExt;
    let state = StateDir::new();
    let scratch = state.root.join("scratch/attempt-a");
    // The supervisor of a task whose agent was SIGKILLed: still running, its task has moved a
    // setsid'd process out of the scratch dir, where a search by working directory misses it.
    let script =
        format!("cd /usr && setsid sleep 60 >/dev/null 2>&1 & echo $! > {0}/escaped.tmp && mv {0}/escaped.tmp {0}/escaped.pid; sleep 60", scratch.display());
    let mut supervisor = std::process::Command::new(AGENT)
        .args(["sandbox-exec", "--scratch"])
        .arg(&scratch)
        .args(["--", "/bin/sh", "-c", &script])
        .current_dir(&scratch)
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid_file = scratch.join("escaped.pid");
    let until = Instant::now() + Duration::from_secs(5);
    while !pid_file.exists() {
        assert!(Instant::now() < until, "the task never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let escaped = read_pid(&pid_file);
    assert!(!is_dead(escaped));
    let stopped = stop_leftover_tasks(Path::new("/proc"), &state.root.join("scratch"));
    assert!(stopped.contains(&(supervisor.id() as i32)), "{stopped:?}");
    assert!(wait_until_dead(escaped).await, "the setsid'd process {escaped} survived the restart");
    let _ = supervisor.wait();
}
