//! The container runtime against a real engine (Podman or Docker) on `KOMMUNE_TEST_CONTAINER_SOCKET`:
//! each test is an attack a task could make, run in a busybox image built here from `scratch`.
//!
//! `eval "$(bash hack/podman.sh)"` starts Podman and prints the variable; without it every test
//! prints one "skipped: no container engine" line and passes. Busybox comes from
//! `KOMMUNE_TEST_BUSYBOX` or `/bin/busybox` and must be static (Debian's `busybox-static`).

mod engine_api;

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use engine_api::EngineApi;
use kommune_agent::runtime::{AttemptContext, ContainerRuntime, Ending, Outcome};
use tokio_util::sync::CancellationToken;

const MEMORY: u64 = 64 << 20;

/// A started engine, the test image on it, and a runtime for one (test-unique) node name.
struct Fixture {
    api: EngineApi,
    image: String,
    node: String,
    scratch: tempfile::TempDir,
}

impl Fixture {
    /// None (after one "skipped" line) when no engine is configured.
    async fn new(test: &str) -> Option<Self> {
        let Some(socket) = std::env::var_os("KOMMUNE_TEST_CONTAINER_SOCKET") else {
            eprintln!("skipped: no container engine (set KOMMUNE_TEST_CONTAINER_SOCKET; `eval \"$(bash hack/podman.sh)\"` starts Podman)");
            return None;
        };
        let api = EngineApi { socket: PathBuf::from(socket) };
        let busybox = std::env::var_os("KOMMUNE_TEST_BUSYBOX").map_or_else(|| PathBuf::from("/bin/busybox"), PathBuf::from);
        let image = api.busybox_image(&busybox).await;
        // Unique per test and run, so parallel tests and earlier runs never see each other's containers.
        let node = format!("{test}-{}", std::process::id());
        Some(Self { api, image, node, scratch: tempfile::tempdir().unwrap() })
    }

    async fn runtime(&self) -> ContainerRuntime {
        let runtime = ContainerRuntime::new(self.api.socket.clone(), false).for_node(&self.node);
        runtime.check_engine().await.expect("the engine answers /info");
        runtime
    }

    fn context(&self, timeout: Duration) -> AttemptContext {
        AttemptContext {
            attempt_id: format!("{}-a1", self.node),
            task_identity: String::new(),
            task_index: 1,
            task_count: 2,
            memory_bytes: MEMORY,
            cpu_millis: 500,
            timeout: Some(timeout),
            scratch_dir: self.scratch.path().to_path_buf(),
            keep_streams: None,
            live: None,
            env: vec![("GREETING".into(), "hello".into())],
        }
    }

    /// Runs `script` under the image's `sh`, the job asking for the network (which the
    /// provider's runtime does not allow).
    async fn sh(&self, runtime: &ContainerRuntime, ctx: &AttemptContext, script: &str) -> Outcome {
        let command = ["/bin/sh".to_owned(), "-c".to_owned()];
        runtime.run(&self.image, &command, &[script.to_owned()], ctx, true, CancellationToken::new()).await
    }

    /// Containers of this test's node still known to the engine.
    async fn left(&self) -> Vec<String> {
        self.api.containers_labelled(&format!("dev.kommune.node={}", self.node)).await
    }
}

fn lines(outcome: &Outcome) -> Vec<String> {
    String::from_utf8_lossy(&outcome.stdout_tail).lines().map(str::to_owned).collect()
}

#[tokio::test]
async fn a_task_has_no_capabilities_a_read_only_root_and_only_scratch_writable() {
    let Some(fx) = Fixture::new("caps").await else { return };
    let runtime = fx.runtime().await;
    let script = r#"
        echo "task $KOMMUNE_TASK_INDEX/$KOMMUNE_TASK_COUNT $GREETING"; echo oops >&2
        grep -E '^(CapInh|CapEff|CapPrm|CapBnd|CapAmb|NoNewPrivs):' /proc/self/status | tr -d '\t'
        echo "user $(id -u):$(id -g)"
        for f in /x /etc/passwd /bin/busybox /proc/sys/kernel/hostname /sys/kernel/x; do (echo x >> $f) 2>/dev/null && echo "wrote $f"; done
        echo data > /scratch/out && echo "wrote /scratch/out"
        awk '$2 == "/" { split($4, o, ","); print "root", o[1] }' /proc/self/mounts
        # Writable mounts backed by anything but memory or the kernel: only /scratch may be one.
        awk '$4 ~ /^rw/ && $3 !~ /^(tmpfs|proc|sysfs|devpts|mqueue|cgroup|cgroup2)$/ { print "rw", $2 }' /proc/self/mounts
        echo "memory $(cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes)"
        echo "pids $(cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max)"
        # Busy for a second, so the engine's stats are sampled at least once.
        end=$(( $(date +%s) + 2 )); while [ $(date +%s) -lt $end ]; do :; done
        exit 4"#;
    let outcome = fx.sh(&runtime, &fx.context(Duration::from_secs(30)), script).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, 4), "{}", outcome.message);
    // A root agent runs tasks as nobody; any other agent as itself (see ContainerRuntime::user).
    let (uid, gid) = (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw());
    let user = if uid == 0 { "user 65534:65534".to_owned() } else { format!("user {uid}:{gid}") };
    let want = [
        "task 1/2 hello",
        "CapInh:0000000000000000",
        "CapPrm:0000000000000000",
        "CapEff:0000000000000000",
        "CapBnd:0000000000000000",
        "CapAmb:0000000000000000",
        "NoNewPrivs:1",
        &user,
        "wrote /scratch/out",
        "root ro",
        "rw /scratch",
        &format!("memory {MEMORY}"),
        "pids 512",
    ];
    assert_eq!(lines(&outcome), want);
    assert_eq!(outcome.stderr_tail, b"oops\n");
    assert_eq!(std::fs::read_to_string(fx.scratch.path().join("out")).unwrap(), "data\n");
    assert_eq!(outcome.usage.source, "engine-stats", "the engine's stats of a running container are read");
    assert!(outcome.usage.cpu_micros > 100_000, "a second of busy loop is metered: {:?}", outcome.usage);
    assert!(fx.left().await.is_empty(), "the container is removed once its output is read");
}

/// Host IPv4 addresses (loopback and every interface's), from the kernel's routing trie.
fn host_addresses() -> Vec<String> {
    let trie = std::fs::read_to_string("/proc/net/fib_trie").unwrap_or_default();
    let mut found = vec!["127.0.0.1".to_owned()];
    let mut last = "";
    for line in trie.lines() {
        if let Some(addr) = line.trim_start().strip_prefix("|-- ") {
            last = addr;
        } else if line.contains("/32 host LOCAL") && !found.iter().any(|a| a == last) && !last.starts_with("127.") {
            found.push(last.to_owned());
        }
    }
    found
}

#[tokio::test]
async fn a_task_asking_for_the_network_gets_only_loopback_when_the_provider_does_not_allow_it() {
    let Some(fx) = Fixture::new("net").await else { return };
    let runtime = fx.runtime().await;
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let addresses = host_addresses();
    let script = format!(
        r#"awk -F: 'NR > 2 {{ gsub(/ /, "", $1); print "interface", $1 }}' /proc/net/dev
        for a in {}; do
            if wget -q -T 3 -O /dev/null http://$a:{port}/ 2>/dev/null; then echo "reached $a"; else echo "unreachable $a"; fi
        done"#,
        addresses.join(" ")
    );
    let outcome = fx.sh(&runtime, &fx.context(Duration::from_secs(60)), &script).await;
    assert_eq!(outcome.ending, Ending::Succeeded, "{}", outcome.message);
    let want: Vec<String> = ["interface lo".to_owned()].into_iter().chain(addresses.iter().map(|a| format!("unreachable {a}"))).collect();
    assert_eq!(lines(&outcome), want);
    assert!(listener.accept().is_err(), "no connection reached the host's listener");
}

#[tokio::test]
async fn a_fork_bomb_is_held_at_the_pids_limit_and_the_task_ends_cleanly() {
    let Some(fx) = Fixture::new("forks").await else { return };
    let runtime = fx.runtime().await;
    // Forks until the limit refuses one (ash then ends the subshell), then counts the
    // container's processes with builtins only: a fork would fail here too.
    let script = r#"(i=0; while [ $i -lt 2000 ]; do sleep 60 & i=$((i+1)); done) 2>/dev/null
        set -- /proc/[0-9]*; echo "processes $#"; exit 3"#;
    // 512 processes' kernel memory can pass 64 MiB: room enough that the pids limit, not the
    // memory limit, is what stops them.
    let ctx = AttemptContext { memory_bytes: 512 << 20, ..fx.context(Duration::from_secs(60)) };
    let started = Instant::now();
    let outcome = fx.sh(&runtime, &ctx, script).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, 3), "{}", outcome.message);
    let count: usize = lines(&outcome).last().and_then(|l| l.strip_prefix("processes ")).and_then(|n| n.parse().ok()).expect("a process count");
    assert!((400..=512).contains(&count), "the pids limit (512) held the task at {count} processes");
    assert!(started.elapsed() < Duration::from_secs(30), "the task ended when its shell did, with its sleeps");

    // The classic bomb never ends by itself: the timeout kills it and the container goes.
    let outcome = fx.sh(&runtime, &fx.context(Duration::from_secs(4)), "b() { b | b & }; b; sleep 60").await;
    assert_eq!((outcome.ending, outcome.message.as_str()), (Ending::Failed, "timed out after 4s"));
    assert!(fx.left().await.is_empty(), "the bomb's container is removed");
}

#[tokio::test]
async fn memory_past_the_limit_is_killed_and_reported_as_out_of_memory() {
    let Some(fx) = Fixture::new("oom").await else { return };
    let runtime = fx.runtime().await;
    let ctx = fx.context(Duration::from_secs(60));
    // dd fills one buffer of `bs` bytes: under the limit it runs, over it the kernel kills it.
    let outcome = fx.sh(&runtime, &ctx, "dd if=/dev/zero of=/dev/null bs=16M count=1 2>/dev/null && echo fits").await;
    assert_eq!((outcome.ending, lines(&outcome)), (Ending::Succeeded, vec!["fits".to_owned()]), "{}", outcome.message);
    let outcome = fx.sh(&runtime, &ctx, "dd if=/dev/zero of=/dev/null bs=200M count=1").await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, 137), "{}", outcome.message);
    // Podman on cgroup v1 does not report the kernel's OOM kill (OOMKilled stays false), so
    // either message is the engine's truth; both name the limit.
    let oom = "out of memory: the task needed more than 64 MiB";
    let unreported = "killed by SIGKILL (exit code 137): out of memory if the task reached its 64 MiB limit (the engine did not say)";
    assert!([oom, unreported].contains(&outcome.message.as_str()), "{}", outcome.message);
    assert!(fx.left().await.is_empty());
}

#[tokio::test]
async fn containers_left_by_a_crashed_agent_are_removed_at_its_next_start_and_no_others() {
    let Some(fx) = Fixture::new("crash").await else { return };
    let other = Fixture { node: format!("{}-other", fx.node), scratch: tempfile::tempdir().unwrap(), ..fx.clone_engine() };

    // Two agents each start a long task, then "crash": their tasks are dropped mid-run, so
    // nothing stops or removes the containers.
    for f in [&fx, &other] {
        let runtime = f.runtime().await;
        let ctx = f.context(Duration::from_secs(120));
        let (image, command) = (f.image.clone(), ["/bin/busybox".to_owned(), "sleep".to_owned(), "120".to_owned()]);
        let task = {
            let runtime = runtime.clone();
            tokio::spawn(async move { runtime.run(&image, &command, &[], &ctx, false, CancellationToken::new()).await })
        };
        // Only the runtime is watched until the container exists: polling the engine's list
        // meanwhile slowed Podman's create to a minute. Then the "crash" waits for it to run.
        let deadline = Instant::now() + Duration::from_secs(60);
        let id = loop {
            if let Some(id) = runtime.live_ids().pop() {
                break id;
            }
            assert!(Instant::now() < deadline, "the task's container was never created");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        while f.api.json("GET", &format!("/containers/{id}/json")).await["State"]["Running"] != true {
            assert!(Instant::now() < deadline, "the task's container never ran");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        task.abort();
        let _ = task.await;
    }
    assert_eq!(fx.left().await.len(), 1, "the crashed agent left its container behind");

    // The next start of the first agent sweeps its own leftovers, not the other node's.
    assert_eq!(fx.runtime().await.sweep().await, Ok(1));
    assert!(fx.left().await.is_empty());
    assert_eq!(other.left().await.len(), 1, "another node's container on the same engine is not touched");
    assert_eq!(other.runtime().await.sweep().await, Ok(1));
    assert!(other.left().await.is_empty());
}

impl Fixture {
    /// The same engine and image, for a second node.
    fn clone_engine(&self) -> Self {
        Self { api: EngineApi { socket: self.api.socket.clone() }, image: self.image.clone(), node: self.node.clone(), scratch: tempfile::tempdir().unwrap() }
    }
}
