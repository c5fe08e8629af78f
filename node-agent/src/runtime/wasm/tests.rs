//! WasmRuntime against small WAT guests and the hello-wasm example module.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::super::{AttemptContext, Ending, Outcome, TAIL_BYTES, WasmRuntime};
use super::RuntimeError;

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn context(scratch: &Path) -> AttemptContext {
    AttemptContext {
        attempt_id: "hello-2-a1".into(),
        task_identity: String::new(),
        task_index: 2,
        task_count: 4,
        memory_bytes: 64 << 20,
        cpu_millis: 1000,
        timeout: Some(Duration::from_secs(20)),
        scratch_dir: scratch.to_path_buf(),
        keep_streams: None,
        live: None,
        env: Vec::new(),
    }
}

/// Loads `module` into a fresh runtime and runs it once.
async fn run_module(module: &[u8], args: &[&str], ctx: &AttemptContext) -> Outcome {
    let runtime = WasmRuntime::new().unwrap();
    let sha = sha256_hex(module);
    runtime.load(&sha, module).unwrap();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    runtime.run(&sha, &args, ctx, CancellationToken::new()).await
}

async fn run_wat(wat: &str, ctx: &AttemptContext) -> Outcome {
    run_module(wat.as_bytes(), &[], ctx).await
}

/// The hello-wasm module and the ComputeJob's args and env, read from examples/hello-wasm.yaml.
struct HelloExample {
    module: Vec<u8>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

fn hello_example() -> HelloExample {
    use serde::Deserialize;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello-wasm.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text).map(|doc| serde_yaml::Value::deserialize(doc).unwrap()).collect();
    let of_kind = |kind: &str| docs.iter().find(|d| d["kind"].as_str() == Some(kind)).unwrap();
    let config_map = of_kind("ConfigMap");
    let job = of_kind("ComputeJob");
    let wasm = &job["spec"]["workload"]["wasm"];
    assert_eq!(wasm["configMapRef"]["name"], config_map["metadata"]["name"]);
    let key = wasm["configMapRef"]["key"].as_str().unwrap();
    let encoded = config_map["binaryData"][key].as_str().unwrap();
    HelloExample {
        module: base64::engine::general_purpose::STANDARD.decode(encoded).unwrap(),
        args: wasm["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect(),
        env: wasm["env"].as_sequence().unwrap().iter().map(|e| (e["name"].as_str().unwrap().to_owned(), e["value"].as_str().unwrap().to_owned())).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_wasm_from_the_example_counts_primes_for_its_task() {
    let example = hello_example();
    let scratch = tempfile::tempdir().unwrap();
    let ctx = AttemptContext { env: example.env.clone(), ..context(scratch.path()) };
    let runtime = WasmRuntime::new().unwrap();
    let sha = sha256_hex(&example.module);
    assert!(!runtime.is_cached(&sha));
    runtime.load(&sha, &example.module).unwrap();
    assert!(runtime.is_cached(&sha));

    let outcome = runtime.run(&sha, &example.args, &ctx, CancellationToken::new()).await;

    let expected = "hello from task 2/4: 2262 primes below 20000\n";
    assert_eq!(outcome.ending, Ending::Succeeded, "{outcome:?}");
    assert_eq!(outcome.exit_code, 0);
    assert_eq!(String::from_utf8_lossy(&outcome.stdout_tail), expected);
    assert_eq!(outcome.output_sha256, sha256_hex(expected.as_bytes()));
    assert_eq!(outcome.output_bytes, expected.len() as u64);
    assert!(outcome.stderr_tail.is_empty());
    assert!(outcome.message.is_empty());
    // Usage: fuel counts the work done, the thread clock its CPU time, linear memory its size.
    let u = &outcome.usage;
    assert_eq!(u.source, "wasm-thread");
    assert!(u.wasm_fuel > 100_000, "sieving 20000 numbers takes hundreds of thousands of instructions: {u:?}");
    assert!(u.cpu_micros > 0 && u.cpu_micros <= outcome.wall.as_micros() as u64 + 20_000, "{u:?} wall {:?}", outcome.wall);
    assert!(u.memory_peak_bytes >= 64 << 10, "at least one wasm page: {u:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_work_costs_the_same_fuel_every_time() {
    let example = hello_example();
    let scratch = tempfile::tempdir().unwrap();
    let ctx = AttemptContext { env: example.env.clone(), ..context(scratch.path()) };
    let runtime = WasmRuntime::new().unwrap();
    let sha = sha256_hex(&example.module);
    runtime.load(&sha, &example.module).unwrap();
    let a = runtime.run(&sha, &example.args, &ctx, CancellationToken::new()).await;
    let b = runtime.run(&sha, &example.args, &ctx, CancellationToken::new()).await;
    assert_eq!(a.usage.wasm_fuel, b.usage.wasm_fuel);
    assert_eq!(a.usage.memory_peak_bytes, b.usage.memory_peak_bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_module_runs_again_with_other_args_and_env() {
    let example = hello_example();
    let scratch = tempfile::tempdir().unwrap();
    let runtime = WasmRuntime::new().unwrap();
    let sha = sha256_hex(&example.module);
    runtime.load(&sha, &example.module).unwrap();
    runtime.load(&sha, &example.module).unwrap();

    let ctx = AttemptContext { task_index: 0, task_count: 1, env: vec![("GREETING".into(), "hej".into())], ..context(scratch.path()) };
    let outcome = runtime.run(&sha, &["100".into()], &ctx, CancellationToken::new()).await;
    assert_eq!(String::from_utf8_lossy(&outcome.stdout_tail), "hej from task 0/1: 25 primes below 100\n");

    let outcome = runtime.run(&sha, &["many".into()], &ctx, CancellationToken::new()).await;
    assert_eq!(outcome.ending, Ending::Failed);
    assert_eq!(outcome.exit_code, 2);
    assert_eq!(outcome.message, "exited with code 2");
    let stderr = String::from_utf8_lossy(&outcome.stderr_tail);
    assert!(stderr.contains("N must be a non-negative integer, got \"many\""), "{stderr}");
    assert!(outcome.stdout_tail.is_empty());
}

/// Writes its argv buffer, then its environ buffer, to stdout: NUL-separated, as WASI hands them over.
const DUMP_ARGS_AND_ENV: &str = r#"
(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; 0: count, 4: buffer size, 16: iovec, 24: nwritten, 1024: pointers, 4096: strings
  (func $write_strings (param $len i32)
    (i32.store (i32.const 16) (i32.const 4096))
    (i32.store (i32.const 20) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24))))
  (func (export "_start")
    (drop (call $args_sizes_get (i32.const 0) (i32.const 4)))
    (drop (call $args_get (i32.const 1024) (i32.const 4096)))
    (call $write_strings (i32.load (i32.const 4)))
    (drop (call $environ_sizes_get (i32.const 0) (i32.const 4)))
    (drop (call $environ_get (i32.const 1024) (i32.const 4096)))
    (call $write_strings (i32.load (i32.const 4)))))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_gets_exactly_its_args_and_env_and_nothing_from_the_host() {
    let scratch = tempfile::tempdir().unwrap();
    let ctx = AttemptContext { env: vec![("GREETING".into(), "hi there".into()), ("KOMMUNE_TASK_INDEX".into(), "99".into())], ..context(scratch.path()) };
    let outcome = run_module(DUMP_ARGS_AND_ENV.as_bytes(), &["20000", "two words"], &ctx).await;
    assert_eq!(outcome.ending, Ending::Succeeded, "{outcome:?}");
    let strings = |items: &[&str]| items.iter().map(|s| format!("{s}\0")).collect::<String>();
    let argv = strings(&["task.wasm", "20000", "two words"]);
    let environ = strings(&["GREETING=hi there", "KOMMUNE_TASK_INDEX=2", "KOMMUNE_TASK_COUNT=4", "KOMMUNE_ATTEMPT_ID=hello-2-a1"]);
    assert_eq!(String::from_utf8_lossy(&outcome.stdout_tail), argv + &environ);
}

const EXIT_WITH_7: &str = r#"
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (call $exit (i32.const 7))))
"#;

const EXIT_WITH_0: &str = r#"
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (call $exit (i32.const 0))))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proc_exit_sets_the_exit_code_and_only_zero_succeeds() {
    let scratch = tempfile::tempdir().unwrap();
    let outcome = run_wat(EXIT_WITH_7, &context(scratch.path())).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, 7));
    assert_eq!(outcome.message, "exited with code 7");

    let outcome = run_wat(EXIT_WITH_0, &context(scratch.path())).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Succeeded, 0));
}

const SPIN_FOREVER: &str = r#"
(module
  (memory (export "memory") 1)
  (func (export "_start") (loop $spin (br $spin))))
"#;

/// Parks in the host: one poll_oneoff on a 30 s monotonic clock.
const SLEEP_30S: &str = r#"
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (i32.store8 (i32.const 8) (i32.const 0))          ;; subscription tag: clock
    (i32.store (i32.const 16) (i32.const 1))          ;; clock id: monotonic
    (i64.store (i32.const 24) (i64.const 30000000000)) ;; 30 s in ns
    (drop (call $poll_oneoff (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_loop_is_stopped_by_the_timeout() {
    let scratch = tempfile::tempdir().unwrap();
    let ctx = AttemptContext { timeout: Some(Duration::from_millis(300)), ..context(scratch.path()) };
    let outcome = run_wat(SPIN_FOREVER, &ctx).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, -1));
    assert_eq!(outcome.message, "timed out after 300ms");
    assert!(outcome.wall >= Duration::from_millis(300), "{:?}", outcome.wall);
    assert!(outcome.wall < Duration::from_secs(3), "{:?}", outcome.wall);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_sleeping_in_the_host_is_stopped_by_the_timeout() {
    let scratch = tempfile::tempdir().unwrap();
    let ctx = AttemptContext { timeout: Some(Duration::from_millis(300)), ..context(scratch.path()) };
    let outcome = run_wat(SLEEP_30S, &ctx).await;
    assert_eq!(outcome.message, "timed out after 300ms");
    assert!(outcome.wall < Duration::from_secs(3), "{:?}", outcome.wall);
}

async fn run_and_cancel_after(wat: &str, after: Duration) -> (Outcome, Duration) {
    let scratch = tempfile::tempdir().unwrap();
    let ctx = AttemptContext { timeout: None, ..context(scratch.path()) };
    let runtime = WasmRuntime::new().unwrap();
    let sha = sha256_hex(wat.as_bytes());
    runtime.load(&sha, wat.as_bytes()).unwrap();
    let cancel = CancellationToken::new();
    let canceller = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        canceller.cancel();
    });
    let started = Instant::now();
    let outcome = runtime.run(&sha, &[], &ctx, cancel).await;
    (outcome, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_spinning_guest_at_once() {
    let (outcome, took) = run_and_cancel_after(SPIN_FOREVER, Duration::from_millis(100)).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Cancelled, -1));
    assert_eq!(outcome.message, "cancelled");
    assert!(took < Duration::from_secs(1), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_guest_sleeping_in_the_host_at_once() {
    let (outcome, took) = run_and_cancel_after(SLEEP_30S, Duration::from_millis(100)).await;
    assert_eq!(outcome.ending, Ending::Cancelled);
    assert!(took < Duration::from_secs(1), "{took:?}");
}

/// Grows memory a page at a time until refused, then traps as an allocator would.
const GROW_UNTIL_REFUSED: &str = r#"
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $grow
      (br_if $grow (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
    unreachable))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growing_memory_past_the_cap_fails_with_the_cap_in_the_message() {
    let scratch = tempfile::tempdir().unwrap();
    let ctx = AttemptContext { memory_bytes: 4 << 20, ..context(scratch.path()) };
    let outcome = run_wat(GROW_UNTIL_REFUSED, &ctx).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, -1));
    assert!(outcome.message.starts_with("memory limit 4 MiB exceeded (wasm trap:"), "{}", outcome.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_whose_initial_memory_is_over_the_cap_does_not_start() {
    let example = hello_example();
    let scratch = tempfile::tempdir().unwrap();
    let ctx = AttemptContext { memory_bytes: 1 << 20, ..context(scratch.path()) };
    let outcome = run_module(&example.module, &[], &ctx).await;
    assert_eq!(outcome.ending, Ending::Failed);
    assert!(outcome.message.starts_with("memory limit 1 MiB exceeded (cannot instantiate module"), "{}", outcome.message);
}

/// Probes the sandbox through the only preopen (fd 3) and exits with the number of the first
/// check that failed: 9/10 preopens, 11 `../secret.txt`, 12 `/etc/passwd`, 15 `link/secret.txt`
/// (a symlink out of scratch), 13/14 creating and writing `out.txt`.
const PROBE_FILESYSTEM: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_prestat_get" (func $prestat_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_dir_name" (func $prestat_dir_name (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 256) "../secret.txt")
  (data (i32.const 288) "/etc/passwd")
  (data (i32.const 320) "out.txt")
  (data (i32.const 352) "written by wasm\n")
  (data (i32.const 384) "link/secret.txt")
  (func $fail_if (param $failed i32) (param $code i32)
    (if (local.get $failed) (then (call $exit (local.get $code)))))
  ;; path_open relative to fd 3, following symlinks; the new fd lands at 120
  (func $open (param $path i32) (param $len i32) (param $oflags i32) (param $rights i64) (result i32)
    (call $path_open (i32.const 3) (i32.const 1) (local.get $path) (local.get $len) (local.get $oflags)
      (local.get $rights) (i64.const 0) (i32.const 0) (i32.const 120)))
  (func $write (param $fd i32) (param $ptr i32) (param $len i32) (result i32)
    (i32.store (i32.const 144) (local.get $ptr))
    (i32.store (i32.const 148) (local.get $len))
    (call $fd_write (local.get $fd) (i32.const 144) (i32.const 1) (i32.const 152)))
  (func (export "_start")
    ;; fd 3 is a preopen: print its name
    (call $fail_if (i32.ne (call $prestat_get (i32.const 3) (i32.const 100)) (i32.const 0)) (i32.const 9))
    (drop (call $prestat_dir_name (i32.const 3) (i32.const 512) (i32.load (i32.const 104))))
    (drop (call $write (i32.const 1) (i32.const 512) (i32.load (i32.const 104))))
    ;; and the only one: fd 4 is EBADF (8)
    (call $fail_if (i32.ne (call $prestat_get (i32.const 4) (i32.const 100)) (i32.const 8)) (i32.const 10))
    ;; every way out must fail (rights: fd_read)
    (call $fail_if (i32.eqz (call $open (i32.const 256) (i32.const 13) (i32.const 0) (i64.const 2))) (i32.const 11))
    (call $fail_if (i32.eqz (call $open (i32.const 288) (i32.const 11) (i32.const 0) (i64.const 2))) (i32.const 12))
    (call $fail_if (i32.eqz (call $open (i32.const 384) (i32.const 15) (i32.const 0) (i64.const 2))) (i32.const 15))
    ;; creat|trunc out.txt with fd_read|fd_write, write to it, close it
    (call $fail_if (call $open (i32.const 320) (i32.const 7) (i32.const 9) (i64.const 66)) (i32.const 13))
    (call $fail_if (call $write (i32.load (i32.const 120)) (i32.const 352) (i32.const 16)) (i32.const 14))
    (drop (call $fd_close (i32.load (i32.const 120))))))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_can_write_scratch_and_reach_nothing_else() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("secret.txt"), "not for guests").unwrap();
    let scratch = root.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    // Relative, so only path resolution can stop it: cap-std refuses absolute links outright.
    std::os::unix::fs::symlink("..", scratch.join("link")).unwrap();

    let outcome = run_wat(PROBE_FILESYSTEM, &context(&scratch)).await;

    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Succeeded, 0), "{outcome:?}");
    assert_eq!(String::from_utf8_lossy(&outcome.stdout_tail), "/scratch");
    assert_eq!(std::fs::read_to_string(scratch.join("out.txt")).unwrap(), "written by wasm\n");
}

/// Writes `repeats` chunks of `chunk` bytes of 'a', then "END\n".
fn spew(chunk: usize, repeats: usize) -> String {
    let pages = chunk / 65536 + 2;
    format!(
        r#"
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") {pages})
  (data (i32.const 64) "END\n")
  (func (export "_start") (local $i i32)
    (memory.fill (i32.const 4096) (i32.const 97) (i32.const {chunk}))
    (i32.store (i32.const 16) (i32.const 4096))
    (i32.store (i32.const 20) (i32.const {chunk}))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (i32.const {repeats})))
        (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.store (i32.const 16) (i32.const 64))
    (i32.store (i32.const 20) (i32.const 4))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tail_is_bounded_and_the_digest_covers_all_of_stdout() {
    let scratch = tempfile::tempdir().unwrap();
    let (chunk, repeats) = (65536, 20);
    let outcome = run_wat(&spew(chunk, repeats), &context(scratch.path())).await;

    let mut expected = vec![b'a'; chunk * repeats];
    expected.extend_from_slice(b"END\n");
    assert_eq!(outcome.ending, Ending::Succeeded, "{outcome:?}");
    assert_eq!(outcome.output_bytes, expected.len() as u64);
    assert_eq!(outcome.output_sha256, sha256_hex(&expected));
    assert_eq!(outcome.stdout_tail.len(), TAIL_BYTES);
    assert_eq!(outcome.stdout_tail, expected[expected.len() - TAIL_BYTES..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_past_its_cap_fails_the_attempt() {
    let scratch = tempfile::tempdir().unwrap();
    // 16 MiB + 64 KiB + 4 bytes
    let outcome = run_wat(&spew(65536, 257), &context(scratch.path())).await;
    assert_eq!(outcome.ending, Ending::Failed);
    assert_eq!(outcome.message, "stdout limit 16 MiB exceeded");
    assert_eq!(outcome.output_bytes, 16 << 20);
}

const TRAP: &str = r#"(module (memory (export "memory") 1) (func (export "_start") unreachable))"#;
const NO_START: &str = r#"(module (memory (export "memory") 1) (func (export "main")))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_guests_fail_with_a_message_instead_of_a_panic() {
    let scratch = tempfile::tempdir().unwrap();
    let ctx = context(scratch.path());

    let outcome = run_wat(TRAP, &ctx).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, -1));
    assert!(outcome.message.starts_with("wasm trap: "), "{}", outcome.message);
    assert!(outcome.message.contains("unreachable"), "{}", outcome.message);

    let outcome = run_wat(NO_START, &ctx).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Failed, -1));
    assert!(outcome.message.contains("no `_start`"), "{}", outcome.message);

    let runtime = WasmRuntime::new().unwrap();
    let unknown = "0".repeat(64);
    let outcome = runtime.run(&unknown, &[], &ctx, CancellationToken::new()).await;
    assert_eq!(outcome.ending, Ending::Failed);
    assert_eq!(outcome.message, format!("module sha256 {unknown} is not loaded on this node"));
}

#[test]
fn load_checks_the_digest_and_names_both() {
    let runtime = WasmRuntime::new().unwrap();
    let actual = sha256_hex(TRAP.as_bytes());
    let claimed = "ab".repeat(32);
    let err = runtime.load(&claimed, TRAP.as_bytes()).unwrap_err();
    assert!(matches!(err, RuntimeError::DigestMismatch { .. }));
    let message = err.to_string();
    assert!(message.contains(&claimed) && message.contains(&actual), "{message}");
    assert!(!runtime.is_cached(&claimed) && !runtime.is_cached(&actual));
}

#[test]
fn load_accepts_an_uppercase_digest() {
    let runtime = WasmRuntime::new().unwrap();
    let sha = sha256_hex(TRAP.as_bytes());
    runtime.load(&sha.to_ascii_uppercase(), TRAP.as_bytes()).unwrap();
    assert!(runtime.is_cached(&sha));
}

#[test]
fn load_rejects_bytes_that_are_not_wasm() {
    let runtime = WasmRuntime::new().unwrap();
    for bytes in [&b"\0asm\x01\0\0\0garbage"[..], b"\xff\xfe not a module", b""] {
        let sha = sha256_hex(bytes);
        let err = runtime.load(&sha, bytes).unwrap_err();
        assert!(matches!(err, RuntimeError::InvalidModule { .. }), "{err}");
        assert!(!runtime.is_cached(&sha));
    }
}

#[test]
fn load_rejects_imports_the_sandbox_does_not_provide() {
    let runtime = WasmRuntime::new().unwrap();
    let wat = r#"(module (import "env" "open_socket" (func)) (func (export "_start")))"#;
    let err = runtime.load(&sha256_hex(wat.as_bytes()), wat.as_bytes()).unwrap_err();
    assert!(matches!(err, RuntimeError::UnsupportedImports { .. }), "{err}");
    assert!(err.to_string().contains("open_socket"), "{err}");
}

/// Tries `sock_accept` on every descriptor 0..32 (stdio, the /scratch preopen and beyond) and
/// exits 1 if any call succeeds. WASI preview 1 cannot create sockets, only use preopened ones,
/// and the sandbox preopens none: every call must fail.
const TRY_EVERY_SOCKET: &str = r#"
(module
  (import "wasi_snapshot_preview1" "sock_accept" (func $sock_accept (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (local $fd i32)
    (loop $next
      (if (i32.eqz (call $sock_accept (local.get $fd) (i32.const 0) (i32.const 64)))
        (then (call $proc_exit (i32.const 1))))
      (local.set $fd (i32.add (local.get $fd) (i32.const 1)))
      (br_if $next (i32.lt_u (local.get $fd) (i32.const 32))))
    (call $proc_exit (i32.const 0))))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_has_no_socket_to_use() {
    let scratch = tempfile::tempdir().unwrap();
    let outcome = run_wat(TRY_EVERY_SOCKET, &context(scratch.path())).await;
    assert_eq!((outcome.ending, outcome.exit_code), (Ending::Succeeded, 0), "{}", outcome.message);
}

#[test]
fn the_compiled_module_cache_keeps_the_most_recent_modules_and_no_more() {
    let rt = WasmRuntime::new().unwrap();
    let n = super::MAX_CACHED_MODULES + 3;
    let modules: Vec<String> = (0..n).map(|i| format!("(module (func (export \"_start\")) (global i32 (i32.const {i})))")).collect();
    for m in &modules {
        rt.load(&sha256_hex(m.as_bytes()), m.as_bytes()).unwrap();
    }
    assert_eq!(rt.cache().len(), super::MAX_CACHED_MODULES);
    for (i, m) in modules.iter().enumerate() {
        assert_eq!(rt.is_cached(&sha256_hex(m.as_bytes())), i >= 3, "module {i}");
    }
    // An evicted module compiles again when it comes back.
    rt.load(&sha256_hex(modules[0].as_bytes()), modules[0].as_bytes()).unwrap();
    assert!(rt.is_cached(&sha256_hex(modules[0].as_bytes())));
    assert_eq!(rt.cache().len(), super::MAX_CACHED_MODULES);
}
