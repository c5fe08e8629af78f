//! ExecRuntime against real processes: /bin/sh, sleep, head.

use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::super::{AttemptContext, Ending, ExecRuntime, Outcome, TAIL_BYTES};

fn context(scratch: &Path) -> AttemptContext {
    AttemptContext {
        attempt_id: "hello-exec-1-a1".into(),
        task_identity: String::new(),
        task_index: 1,
        task_count: 2,
        memory_bytes: 64 << 20,
        cpu_millis: 1000,
        timeout: Some(Duration::from_secs(20)),
        scratch_dir: scratch.to_path_buf(),
        keep_streams: None,
        live: None,
        env: vec![("GREETING".into(), "hello".into())],
    }
}

async fn sh(script: &str, ctx: &AttemptContext) -> Outcome {
    let command = ["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()];
    ExecRuntime::new(true).run(&command, ctx, CancellationToken::new()).await
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// True once `pid` is gone or a zombie waiting for a reaper: either way it no longer runs.
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

async fn wait_until_dead(pid: u32) -> bool {
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        if is_dead(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn exec_is_refused_unless_the_agent_allows_it() {
    let scratch = tempfile::tempdir().unwrap();
    let command = ["/bin/sh".to_owned(), "-c".to_owned(), "touch ran".to_owned()];
    let outcome = ExecRuntime::new(false).run(&command, &context(scratch.path()), CancellationToken::new()).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, -1));
    assert_eq!(outcome.message, "exec runtime disabled: start the agent with --allow-exec");
    assert!(!scratch.path().join("ran").exists());
    assert!(!ExecRuntime::new(false).is_allowed());
}

#[tokio::test]
async fn the_command_runs_in_scratch_with_a_clean_env() {
    let scratch = tempfile::tempdir().unwrap();
    // cargo sets CARGO for the tests it runs; the task must not inherit it.
    assert!(std::env::var_os("CARGO").is_some(), "run this test through cargo");
    let outcome = sh(
        r#"echo "$GREETING from task $KOMMUNE_TASK_INDEX/$KOMMUNE_TASK_COUNT ($KOMMUNE_ATTEMPT_ID)"
           echo "home=$HOME pwd=$(pwd) path=$PATH cargo=${CARGO:-unset}"
           echo file > made-here.txt"#,
        &context(scratch.path()),
    )
    .await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Succeeded, 0), "{outcome:?}");
    let dir = scratch.path().display();
    let expected = format!("hello from task 1/2 (hello-exec-1-a1)\nhome={dir} pwd={dir} path=/usr/bin:/bin cargo=unset\n");
    assert_eq!(text(&outcome.stdout_tail), expected);
    assert_eq!(outcome.output_sha256, hex::encode(Sha256::digest(expected.as_bytes())));
    assert_eq!(outcome.output_bytes, expected.len() as u64);
    assert!(scratch.path().join("made-here.txt").exists());
    assert!(outcome.message.is_empty());
}

#[tokio::test]
async fn a_non_zero_exit_fails_with_its_code_and_stderr() {
    let scratch = tempfile::tempdir().unwrap();
    let outcome = sh("echo oops >&2; exit 3", &context(scratch.path())).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, 3));
    assert_eq!(outcome.message, "exited with code 3");
    assert_eq!(text(&outcome.stderr_tail), "oops\n");
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group_fast() {
    let scratch = tempfile::tempdir().unwrap();
    let ctx = AttemptContext { timeout: Some(Duration::from_millis(300)), ..context(scratch.path()) };
    // The background sleep holds stdout open too: if it survived, draining would hang.
    let outcome = sh("sleep 30 & echo $! > child.pid; sleep 30", &ctx).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, -1));
    assert_eq!(outcome.message, "timed out after 300ms");
    assert!(outcome.wall < Duration::from_secs(2), "{:?}", outcome.wall);
    let child: u32 = std::fs::read_to_string(scratch.path().join("child.pid")).unwrap().trim().parse().unwrap();
    assert!(wait_until_dead(child).await, "background child {child} survived the timeout");
}

#[tokio::test]
async fn background_processes_do_not_outlive_a_task_that_exits() {
    let scratch = tempfile::tempdir().unwrap();
    let outcome = sh("sleep 30 >/dev/null 2>&1 & echo $! > child.pid; echo done", &context(scratch.path())).await;
    assert_eq!(outcome.ending, Ending::Succeeded, "{outcome:?}");
    assert!(outcome.wall < Duration::from_secs(2), "{:?}", outcome.wall);
    let child: u32 = std::fs::read_to_string(scratch.path().join("child.pid")).unwrap().trim().parse().unwrap();
    assert!(wait_until_dead(child).await, "background child {child} outlived its task");
}

#[tokio::test]
async fn cancel_stops_the_command_quickly() {
    let scratch = tempfile::tempdir().unwrap();
    let ctx = AttemptContext { timeout: None, ..context(scratch.path()) };
    let cancel = CancellationToken::new();
    let canceller = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        canceller.cancel();
    });
    let command = ["sleep".to_owned(), "30".to_owned()];
    let outcome = ExecRuntime::new(true).run(&command, &ctx, cancel).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Cancelled, -1));
    assert_eq!(outcome.message, "cancelled");
    assert!(outcome.wall < Duration::from_secs(2), "{:?}", outcome.wall);
}

#[tokio::test]
async fn a_missing_program_or_an_empty_command_says_so() {
    let scratch = tempfile::tempdir().unwrap();
    let ctx = context(scratch.path());
    let exec = ExecRuntime::new(true);

    let command = ["kommune-no-such-program".to_owned()];
    let outcome = exec.run(&command, &ctx, CancellationToken::new()).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, -1));
    assert_eq!(outcome.message, "cannot start kommune-no-such-program: No such file or directory");

    let outcome = exec.run(&[], &ctx, CancellationToken::new()).await;
    assert_eq!(outcome.ending, Ending::Failed);
    assert_eq!(outcome.message, "exec workload has an empty command");
}

#[tokio::test]
async fn a_command_killed_by_a_signal_reports_it() {
    let scratch = tempfile::tempdir().unwrap();
    let outcome = sh("kill -s TERM $$", &context(scratch.path())).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, -1));
    assert_eq!(outcome.message, "killed by signal 15");
}

#[tokio::test]
async fn the_tail_is_bounded_and_the_digest_covers_all_of_stdout() {
    let scratch = tempfile::tempdir().unwrap();
    let outcome = sh("seq 1 200000", &context(scratch.path())).await;
    let expected: String = (1..=200_000).map(|i| format!("{i}\n")).collect();
    assert_eq!(outcome.ending, Ending::Succeeded, "{outcome:?}");
    assert_eq!(outcome.output_bytes, expected.len() as u64);
    assert_eq!(outcome.output_sha256, hex::encode(Sha256::digest(expected.as_bytes())));
    assert_eq!(outcome.stdout_tail, expected.as_bytes()[expected.len() - TAIL_BYTES..]);
}

#[tokio::test]
async fn stdout_past_its_cap_stops_the_command() {
    let scratch = tempfile::tempdir().unwrap();
    let outcome = sh("cat /dev/zero", &context(scratch.path())).await;
    assert_eq!(outcome.ending, Ending::Failed);
    assert_eq!(outcome.message, "stdout limit 16 MiB exceeded");
    assert_eq!(outcome.output_bytes, 16 << 20);
    assert!(outcome.wall < Duration::from_secs(5), "{:?}", outcome.wall);
}

#[tokio::test]
async fn cpu_time_of_the_task_and_the_children_it_waited_for_is_measured_by_the_kernel() {
    let scratch = tempfile::tempdir().unwrap();
    // A busy loop in a child shell the task waits for, then one in the task itself.
    let busy = "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done";
    let outcome = sh(&format!("( {busy} ) & wait; {busy}"), &context(scratch.path())).await;
    assert_eq!(outcome.ending, Ending::Succeeded, "{}", outcome.message);
    let u = &outcome.usage;
    assert_eq!(u.source, "proc");
    // Two loops of the same size: the measured CPU covers well over one of them.
    assert!(u.cpu_micros >= 100_000, "cpu {}us over {:?}", u.cpu_micros, outcome.wall);
    // CPU time can exceed wall time only with parallel work; these loops run one after another.
    assert!(u.cpu_micros <= outcome.wall.as_micros() as u64 + 20_000, "cpu {}us > wall {:?}", u.cpu_micros, outcome.wall);
    assert!(u.memory_peak_bytes > 0 && u.memory_mib_millis > 0, "{u:?}");
}

#[tokio::test]
async fn a_sleeping_task_uses_almost_no_cpu_and_a_cancelled_one_is_still_measured() {
    let scratch = tempfile::tempdir().unwrap();
    let outcome = sh("sleep 0.3", &context(scratch.path())).await;
    assert!(outcome.usage.cpu_micros < 100_000, "{:?}", outcome.usage);
    assert_eq!(outcome.usage.source, "proc");
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        stop.cancel();
    });
    let command = ["/bin/sh".to_owned(), "-c".to_owned(), "while :; do :; done".to_owned()];
    let outcome = ExecRuntime::new(true).run(&command, &context(scratch.path()), cancel).await;
    assert_eq!(outcome.ending, Ending::Cancelled);
    assert_eq!(outcome.usage.source, "proc");
    // How much CPU a spinning second gets depends on the machine's load; some it always gets.
    assert!(outcome.usage.cpu_micros >= 20_000 && outcome.usage.cpu_micros <= outcome.wall.as_micros() as u64 + 20_000, "{:?}", outcome.usage);
}

#[tokio::test]
async fn with_an_exec_user_the_task_runs_as_that_user_and_owns_its_scratch() {
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: switching users needs root");
        return;
    }
    let (uid, gid) = super::resolve_exec_user("65534", true).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    // The scratch directory's parent must be enterable by that user, as the agent's is.
    std::fs::set_permissions(scratch.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ctx = context(scratch.path());
    let command = ["/bin/sh".to_owned(), "-c".to_owned(), "id -u; id -G; touch /scratch-test 2>/dev/null || echo no-root-write; touch ok".to_owned()];
    let outcome = ExecRuntime::new(true).as_user(uid, gid).run(&command, &ctx, CancellationToken::new()).await;
    assert_eq!(outcome.ending, Ending::Succeeded, "{}", outcome.message);
    let out = text(&outcome.stdout_tail);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(uid.to_string().as_str()), "{out}");
    assert_eq!(lines.next(), Some(gid.to_string().as_str()), "only its own group, no supplementary ones: {out}");
    assert_eq!(lines.next(), Some("no-root-write"), "{out}");
    assert!(scratch.path().join("ok").exists(), "the scratch directory is writable for the task");
}

#[test]
fn an_exec_user_is_resolved_or_refused_with_the_reason() {
    let e = super::resolve_exec_user("nobody", false).unwrap_err();
    assert!(e.contains("must run as root"), "{e}");
    assert!(super::resolve_exec_user("root", true).unwrap_err().contains("that is root"));
    assert!(super::resolve_exec_user("0", true).unwrap_err().contains("that is root"));
    assert!(super::resolve_exec_user("no-such-user-kommune", true).unwrap_err().contains("no such user"));
    assert_eq!(super::resolve_exec_user("65534", true).map(|(uid, _)| uid), Ok(65534));
}

#[test]
fn the_process_group_is_read_from_proc_stat_even_with_odd_command_names() {
    assert_eq!(super::pgid_from_stat("4242 (sleep) S 4200 4201 4200 0 -1 4194560 105 0"), Some(4201));
    assert_eq!(super::pgid_from_stat("4242 (a) b (c d) R 1 77 77 0"), Some(77), "the name holds spaces and parentheses");
    assert_eq!(super::pgid_from_stat("4242 (sleep) S 4200"), None);
    assert_eq!(super::pgid_from_stat("garbage"), None);
    assert_eq!(super::pgid_from_stat(""), None);
}

/// What an agent killed mid-task leaves behind: the task's process group, running in its
/// scratch directory with nobody to stop it. The next run of the agent stops it, and nothing
/// outside the scratch directory.
#[test]
fn task_processes_left_by_a_killed_agent_are_stopped_and_nothing_else() {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let root = tempfile::tempdir().unwrap();
    let scratch = root.path().join("scratch");
    std::fs::create_dir_all(scratch.join("job.0.1")).unwrap();
    let spawn = |dir: &std::path::Path| {
        std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 60 & wait"])
            .current_dir(dir)
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut leftover = spawn(&scratch.join("job.0.1"));
    let mut bystander = spawn(root.path());
    // The shell has started its sleep once the group has two processes in /proc.
    std::thread::sleep(Duration::from_millis(300));
    let stopped = super::stop_leftover_tasks(Path::new("/proc"), &scratch);
    assert_eq!(stopped, vec![leftover.id() as i32]);
    assert_eq!(leftover.wait().unwrap().signal(), Some(9));
    assert!(bystander.try_wait().unwrap().is_none(), "a process outside the scratch directory is left alone");
    // The group's other process (the sleep) dies a moment after the signal.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !super::stop_leftover_tasks(Path::new("/proc"), &scratch).is_empty() {
        assert!(Instant::now() < deadline, "the leftover group is still there");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(bystander.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    bystander.wait().unwrap();
    assert!(super::stop_leftover_tasks(Path::new("/proc"), &root.path().join("missing")).is_empty());
}
