//! The `kommune-agent` binary as a provider meets it: every command, and a clear error for each
//! wrong input that can be checked without an operator (expired and used-up tokens are checked
//! against a real gateway in the operator's component tests). Also checks that the systemd unit
//! we ship runs a command line this binary accepts.

use std::path::Path;
use std::process::{Command, Output};

use clap::Parser;
use kommune_agent::cli::{Cli, Command as Sub};

fn agent(args: &[&str], state_dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kommune-agent"))
        .args(args)
        .env("KOMMUNE_STATE_DIR", state_dir)
        .env_remove("KOMMUNE_SERVER")
        .env_remove("KOMMUNE_TOKEN")
        .env("RUST_LOG", "error")
        .output()
        .expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A state directory as `join` leaves it (the key material is not used by these commands).
fn joined(dir: &Path) {
    std::fs::write(dir.join("agent.json"), r#"{"server": "https://127.0.0.1:1", "node_name": "n1"}"#).unwrap();
    for f in ["ca.crt", "node.crt", "node.key"] {
        std::fs::write(dir.join(f), "not used here").unwrap();
    }
}

fn fails_with(o: &Output, want: &str) {
    assert!(!o.status.success(), "expected a failure, got success: {}", stdout(o));
    assert!(stderr(o).contains(want), "stderr should contain {want:?}:\n{}", stderr(o));
}

#[test]
fn every_command_on_a_machine_that_has_not_joined_says_to_join_first() {
    let dir = tempfile::tempdir().unwrap();
    for cmd in [&["status"][..], &["pause"], &["resume"], &["leave"], &["run"], &["earnings"]] {
        let o = agent(cmd, dir.path());
        fails_with(&o, "has not joined yet");
        fails_with(&o, "kommune-agent join --server URL --token TOKEN");
    }
}

#[test]
fn join_explains_a_bad_server_url_a_bad_token_and_an_unreachable_operator() {
    let dir = tempfile::tempdir().unwrap();
    let token = format!("kmn1.abcdef.{}.{}", "s".repeat(20), "0".repeat(64));
    let o = agent(&["join", "--server", "http://203.0.113.7:30443", "--token", &token], dir.path());
    fails_with(&o, "invalid --server \"http://203.0.113.7:30443\": expected https://HOST:PORT");
    let o = agent(&["join", "--server", "https://127.0.0.1:1", "--token", "kmn1.abc"], dir.path());
    fails_with(&o, "invalid --token");
    let o = agent(&["join", "--server", "https://127.0.0.1:1", "--token", &token], dir.path());
    fails_with(&o, "cannot reach the operator at https://127.0.0.1:1");
    let o = agent(&["join", "--token", &token], dir.path());
    fails_with(&o, "--server");
}

#[test]
fn pause_resume_and_status_on_a_joined_machine() {
    let dir = tempfile::tempdir().unwrap();
    joined(dir.path());
    let o = agent(&["status"], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("node:       n1") && stdout(&o).contains("agent:      not running"), "{}", stdout(&o));

    let o = agent(&["pause"], dir.path());
    assert!(o.status.success() && stdout(&o).contains("n1 is paused"), "{}", stderr(&o));
    assert!(dir.path().join("paused").exists());
    let o = agent(&["resume"], dir.path());
    assert!(o.status.success() && stdout(&o).contains("n1 takes new tasks again"), "{}", stderr(&o));
    assert!(!dir.path().join("paused").exists());
    // Resuming twice is fine.
    assert!(agent(&["resume"], dir.path()).status.success());

    // A running agent (this test process stands in for it) shows why it is paused.
    let status = kommune_agent::status::AgentStatus {
        pid: std::process::id(),
        node_name: "n1".into(),
        connected: true,
        paused: true,
        pause_reason: "outside time window Mon-Fri 18:00-08:00".into(),
        updated_ms: kommune_proto::now_ms(),
        last_heartbeat_ms: kommune_proto::now_ms(),
        offered_cpu_millis: 2000,
        offered_memory_bytes: 4 << 30,
        offered_disk_bytes: 20 << 30,
        runtimes: vec!["wasm".into()],
        running: vec!["u.1.1".into()],
        ..Default::default()
    };
    status.save(dir.path()).unwrap();
    let text = stdout(&agent(&["status"], dir.path()));
    for want in [
        "session:    connected",
        "paused:     outside time window Mon-Fri 18:00-08:00",
        "offered:    cpu 2, memory 4Gi, disk 20Gi, no GPUs",
        "heartbeat:  0s ago",
        "  - u.1.1",
    ] {
        assert!(text.contains(want), "{want:?} in:\n{text}");
    }
}

#[test]
fn run_refuses_bad_config_and_a_missing_container_engine_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    joined(dir.path());
    let missing = dir.path().join("missing.toml");
    let o = agent(&["run", "--config", missing.to_str().unwrap()], dir.path());
    fails_with(&o, &format!("cannot read the config file {}", missing.display()));

    // The default file in the state directory is read, and a typo in it is named.
    std::fs::write(dir.path().join("agent.toml"), "cpus = 2\nmax-cpus = 4\n").unwrap();
    let o = agent(&["run"], dir.path());
    fails_with(&o, &format!("config file {}", dir.path().join("agent.toml").display()));
    fails_with(&o, "unknown field `max-cpus`");
    std::fs::remove_file(dir.path().join("agent.toml")).unwrap();

    let o = agent(&["run", "--window", "Mon-Fri 18:00"], dir.path());
    fails_with(&o, "invalid time window \"Mon-Fri 18:00\"");
    let o = agent(&["run", "--cpus", "two"], dir.path());
    fails_with(&o, "--cpus: \"two\" is not a quantity");

    let socket = dir.path().join("docker.sock");
    let o = agent(&["run", "--container-socket", socket.to_str().unwrap()], dir.path());
    fails_with(&o, &format!("no Docker/Podman socket at {}", socket.display()));
    fails_with(&o, "systemctl");

    let o = agent(&["run", "--exec-user", "nobody"], dir.path());
    fails_with(&o, "--exec-user nobody only applies with --allow-exec");
    let o = agent(&["run", "--allow-exec", "--exec-user", "no-such-user-kommune"], dir.path());
    fails_with(&o, "--exec-user no-such-user-kommune:");
}

#[test]
fn config_example_prints_a_file_that_config_check_accepts_and_flags_override() {
    let dir = tempfile::tempdir().unwrap();
    let o = agent(&["config", "example"], dir.path());
    assert!(o.status.success());
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, stdout(&o)).unwrap();
    let o = agent(&["config", "check"], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for want in [
        format!("config file:  {}", file.display()),
        "cpus:         2".into(),
        "windows:      Mon-Fri 18:00-08:00, Sat,Sun 00:00-24:00".into(),
        "idle-only:    on: busy above 30% cpu".into(),
    ] {
        assert!(text.contains(&want), "{want:?} in:\n{text}");
    }
    let o = agent(&["config", "check", "--cpus", "500m", "--idle-only=false"], dir.path());
    let text = stdout(&o);
    assert!(text.contains("cpus:         500m") && text.contains("idle-only:    off"), "{text}");
}

#[test]
fn earnings_lists_acknowledged_and_pending_receipts() {
    let dir = tempfile::tempdir().unwrap();
    joined(dir.path());
    let o = agent(&["earnings"], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "n1: 0 receipt(s): 0 accepted (0 credits), 0 pending acknowledgement, 0 rejected\n");
    let record = r#"{"epoch":7,"sequence":1,"attemptId":"uid.0.1","job":"ns/j","state":"succeeded","wallMillis":1500,"cpuMicros":900000,"memoryPeakBytes":0,"wasmFuel":0,"finishedUnixMillis":0,"status":"accepted","costMicros":250}"#;
    std::fs::create_dir_all(dir.path().join("receipts")).unwrap();
    std::fs::write(dir.path().join("receipts/acknowledged.jsonl"), format!("{record}\n")).unwrap();
    let text = stdout(&agent(&["earnings"], dir.path()));
    assert!(text.starts_with("n1: 1 receipt(s): 1 accepted (0.00025 credits)"), "{text}");
    assert!(text.contains("uid.0.1") && text.contains("accepted"), "{text}");
    let json = stdout(&agent(&["earnings", "--json"], dir.path()));
    assert_eq!(json.lines().count(), 1);
    assert!(json.contains("\"costMicros\":250"), "{json}");
}

#[test]
fn help_reads_well_for_a_newcomer() {
    let dir = tempfile::tempdir().unwrap();
    let top = stdout(&agent(&["--help"], dir.path()));
    for cmd in ["join", "run", "status", "pause", "resume", "leave", "earnings", "config"] {
        assert!(top.contains(&format!("  {cmd} ")), "{cmd} listed:\n{top}");
    }
    assert!(top.contains("Getting started:"), "{top}");
    let run = stdout(&agent(&["run", "--help"], dir.path()));
    for want in ["order of precedence", "--max-gpus", "--max-disk", "--window", "--idle-only", "Examples:"] {
        assert!(run.contains(want), "{want:?} in run --help");
    }
}

/// The ExecStart of a systemd unit, joined over `\` continuations and split like systemd does
/// for plain words and double quotes.
fn exec_start(unit: &str) -> Vec<String> {
    let joined = unit.replace("\\\n", " ");
    let line = joined.lines().find_map(|l| l.trim().strip_prefix("ExecStart=")).expect("the unit has an ExecStart");
    let mut args = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut any) = (false, false);
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    args.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        args.push(cur);
    }
    args
}

#[test]
fn the_systemd_unit_runs_a_command_line_the_agent_accepts() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/systemd/kommune-agent.service")).unwrap();
    let args = exec_start(&unit);
    assert!(args[0].ends_with("/kommune-agent"), "{args:?}");
    let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("ExecStart {args:?} does not parse: {e}"));
    let Sub::Run(run) = cli.command else { panic!("the unit runs `run`: {args:?}") };
    // systemd's StateDirectory= is where join must have written the identity.
    let state_dir = run.state_dir.expect("the unit names its state directory");
    let wanted = unit.lines().find_map(|l| l.strip_prefix("StateDirectory=")).expect("StateDirectory=");
    assert_eq!(state_dir, Path::new("/var/lib").join(wanted.trim()));
    for hardening in ["NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "RestrictAddressFamilies=", "Restart=on-failure"] {
        assert!(unit.lines().any(|l| l.starts_with(hardening)), "{hardening} in the unit");
    }
    assert!(!unit.lines().any(|l| l.starts_with("User=root")), "never as root");
}

#[test]
fn the_unit_parser_splits_like_systemd() {
    let unit = "[Service]\nExecStart=/usr/bin/kommune-agent run \\\n  --window \"Mon-Fri 18:00-08:00\" --cpus 2\n";
    assert_eq!(exec_start(unit), ["/usr/bin/kommune-agent", "run", "--window", "Mon-Fri 18:00-08:00", "--cpus", "2"]);
}
