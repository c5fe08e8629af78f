//! Component test of task outputs with real agents over loopback: stdout, stderr and declared
//! files uploaded to the operator's store (or a real S3-compatible server, moto) when an attempt
//! ends, bounded with the excess reported, read back through `OutputReader`, only the accepted
//! attempt's kept, and a full store refusing outputs without touching the attempt store.

#[allow(dead_code)]
#[path = "support/operator.rs"]
mod harness;

use std::time::Duration;

use futures::StreamExt;
use harness::*;
use kommune_core::job::data::{OutputDestination, S3Credentials};
use kommune_operator::attempt::AttemptPhase;
use kommune_operator::crd::JobPhase;
use kommune_operator::outputs::{OutputBody, OutputReader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn sha(b: &[u8]) -> String {
    kommune_proto::sha256_hex(b)
}

fn exec(script: &str, extra: &str) -> String {
    format!("workload:\n  exec:\n    command: ['/bin/sh', '-c', {script:?}]\n{extra}")
}

/// The bytes of one stored output, read through the reader the web layer gets.
async fn read(reader: &dyn OutputReader, uid: &str, task: u32, name: &str) -> Option<Vec<u8>> {
    match reader.open(uid, task, name).await.unwrap()? {
        OutputBody::Stream { size, mut body } => {
            let mut all = vec![];
            while let Some(chunk) = body.next().await {
                all.extend_from_slice(&chunk.unwrap());
            }
            assert_eq!(all.len() as u64, size);
            Some(all)
        }
        OutputBody::Redirect(url) => Some(http("GET", &url, &[]).await.1),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn declared_files_stdout_and_stderr_reach_the_operator_and_read_back_with_their_digests() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let _agent = join_agent(&op, dir.path(), "agent-a", true).await;
    wait_connected(&op, &["agent-a"]).await;

    let script = "mkdir -p out/parts && echo \"words $KOMMUNE_TASK_INDEX\" > out/result.txt && echo part > out/parts/a.txt && echo hello && echo oops >&2";
    let yaml = exec(script, "tasks: 2\noutputs: {paths: [result.txt, parts, missing.txt], verify: [result.txt]}\n");
    let done = op.run_to_end(&job("out-job"), &policy(&yaml), None).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded, "{:?}", done.attempts);
    for a in &done.attempts {
        let r = a.result.as_ref().unwrap();
        let names: Vec<(&str, bool)> = r.outputs.iter().map(|o| (o.name.as_str(), o.counted)).collect();
        assert_eq!(names, vec![("out/parts/a.txt", false), ("out/result.txt", true), ("stderr", false), ("stdout", false)], "{r:?}");
        let result = r.outputs.iter().find(|o| o.name == "out/result.txt").unwrap();
        let expected = format!("words {}\n", a.index);
        assert_eq!((result.size, result.sha256.as_str(), result.excess_bytes), (expected.len() as u64, sha(expected.as_bytes()).as_str(), 0));
    }
    let reader = op.dispatcher.output_reader().expect("the operator keeps outputs");
    let listed = reader.list("out-job").await.unwrap();
    assert_eq!(listed.len(), 8, "{listed:?}");
    assert!(listed.windows(2).all(|w| (w[0].task_index, &w[0].name) < (w[1].task_index, &w[1].name)), "ordered by task then name");
    assert_eq!(read(reader.as_ref(), "out-job", 1, "out/result.txt").await.unwrap(), b"words 1\n");
    assert_eq!(read(reader.as_ref(), "out-job", 0, "stdout").await.unwrap(), b"hello\n");
    assert_eq!(read(reader.as_ref(), "out-job", 0, "stderr").await.unwrap(), b"oops\n");
    assert_eq!(read(reader.as_ref(), "out-job", 0, "out/missing.txt").await, None);
    assert!(reader.list("other-job").await.unwrap().is_empty());
    // Metered (bytes out): each attempt's stdout ("hello\n") and the declared files it sent.
    let sent: u64 = done.attempts.iter().map(|a| 6 + format!("words {}\n", a.index).len() as u64 + "part\n".len() as u64).sum();
    let metered = op.metered_at_least("out-job", 2).await;
    assert_eq!(metered.usage.output_bytes, sent, "{metered:?}");

    // Deleting the job (its finalizer) removes its outputs and gives their room back.
    let store = op.dispatcher.outputs().unwrap();
    let before = store.usage().0;
    store.remove_job("out-job").unwrap();
    assert!(reader.list("out-job").await.unwrap().is_empty());
    assert!(store.usage().0 < before && !op.data_dir().join("outputs/out-job").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_output_over_its_limit_is_cut_and_the_excess_reported_never_hidden() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let _agent = join_agent(&op, dir.path(), "agent-a", true).await;
    wait_connected(&op, &["agent-a"]).await;

    let script = "mkdir -p out && head -c 3000 /dev/zero > out/big.bin && echo small > out/small.txt";
    let yaml = exec(script, "outputs: {paths: [big.bin, small.txt], maxFileSize: 1Ki, maxAttemptSize: 1030}\n");
    let done = op.run_to_end(&job("big-job"), &policy(&yaml), None).await;
    let a = &done.attempts[0];
    assert_eq!(a.phase, AttemptPhase::Succeeded, "{a:?}");
    let r = a.result.as_ref().unwrap();
    let get = |n: &str| r.outputs.iter().find(|o| o.name == n).unwrap().clone();
    assert_eq!((get("out/big.bin").size, get("out/big.bin").excess_bytes), (1024, 3000 - 1024));
    // Stdout and stderr are empty; the attempt's budget leaves 6 of small.txt's 6 bytes.
    assert_eq!((get("out/small.txt").size, get("out/small.txt").excess_bytes), (6, 0));
    assert!(r.message.contains("1976 bytes not uploaded"), "{}", r.message);
    let reader = op.dispatcher.output_reader().unwrap();
    assert_eq!(read(reader.as_ref(), "big-job", 0, "out/big.bin").await.unwrap(), vec![0u8; 1024]);
    let listed = reader.list("big-job").await.unwrap();
    assert_eq!(listed.iter().find(|e| e.name == "out/big.bin").unwrap().excess_bytes, 1976);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_tasks_outputs_are_the_accepted_attempts_and_the_failed_ones_go() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let _agent = join_agent(&op, dir.path(), "agent-a", true).await;
    wait_connected(&op, &["agent-a"]).await;

    // The first attempt (identity `<uid>.0.1`) writes a file and fails; the second succeeds.
    let script = "mkdir -p out && case $KOMMUNE_ATTEMPT_ID in *.1) echo first > out/r.txt; exit 3;; *) echo second > out/r.txt;; esac";
    let yaml = exec(script, "retries: {maxAttempts: 2, backoffSeconds: 0}\noutputs: {paths: [r.txt]}\n");
    let done = op.run_to_end(&job("retry-job"), &policy(&yaml), None).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded, "{:?}", done.attempts);
    assert_eq!(done.attempts.len(), 2);
    let reader = op.dispatcher.output_reader().unwrap();
    let listed = reader.list("retry-job").await.unwrap();
    assert!(listed.iter().all(|e| e.attempt_id == "retry-job.0.2"), "{listed:?}");
    assert_eq!(read(reader.as_ref(), "retry-job", 0, "out/r.txt").await.unwrap(), b"second\n");
    assert!(!op.data_dir().join("outputs/retry-job/retry-job.0.1").exists(), "the failed attempt's outputs are removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_store_refuses_outputs_fails_the_attempt_with_the_reason_and_corrupts_nothing() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let _agent = join_agent(&op, dir.path(), "agent-a", true).await;
    wait_connected(&op, &["agent-a"]).await;
    let store = op.dispatcher.outputs().unwrap().clone();
    store.set_limit(64);

    let yaml = exec("mkdir -p out && head -c 100 /dev/zero > out/x.bin", "retries: {maxAttempts: 1}\noutputs: {paths: [x.bin]}\n");
    let done = op.run_to_end(&job("full-job"), &policy(&yaml), None).await;
    assert_eq!(done.progress.phase, JobPhase::Failed);
    let message = &done.attempts[0].result.as_ref().unwrap().message;
    assert!(message.contains("outputs not stored: out/x.bin: the operator's output store is full"), "{message}");
    assert!(store.refusal("full-job").unwrap().contains("is full"), "the job learns why (its OutputsStored condition)");
    assert!(store.usage().0 <= 64, "nothing beyond the limit was written: {:?}", store.usage());
    // The attempt store and the ledger are untouched: the failure is recorded and metered.
    op.metered_at_least("full-job", 1).await;

    // With room again the next job stores its outputs, and the refusal is cleared by a store.
    store.set_limit(1 << 20);
    let done = op.run_to_end(&job("roomy-job"), &policy(&yaml.replace("full", "roomy")), None).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded, "{:?}", done.attempts);
    assert!(store.refusal("roomy-job").is_none());
}

/// A moto S3 server on a free port, stopped when dropped.
struct Moto {
    child: std::process::Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn moto() -> Option<Moto> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    let child = std::process::Command::new("moto_server")
        .args(["-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let moto = Moto { child, endpoint: format!("http://127.0.0.1:{port}") };
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Some(moto);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// One plain HTTP/1.1 request (moto does not check signatures by default): status and body.
async fn http(method: &str, url: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut conn = tokio::net::TcpStream::connect(host).await.unwrap();
    let head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body).await.unwrap();
    let mut response = vec![];
    conn.read_to_end(&mut response).await.unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = response[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = unchunk(&body);
    }
    (status, body)
}

fn unchunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else { return out };
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 4 + n..];
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outputs_go_to_the_jobs_bucket_through_presigned_puts_and_read_back_through_a_redirect() {
    let Some(s3) = moto().await else {
        eprintln!("skipped: moto_server is not installed (pip install 'moto[server]')");
        return;
    };
    assert_eq!(http("PUT", &format!("{}/results", s3.endpoint), &[]).await.0, 200, "bucket created");
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = join_agent(&op, dir.path(), "agent-a", true).await;
    agent.tasks.set_url_policy(kommune_agent::fetch::UrlPolicy { allow_private: true });
    wait_connected(&op, &["agent-a"]).await;

    let yaml = exec(
        "mkdir -p out && echo \"bucket $KOMMUNE_TASK_INDEX\" > out/r.txt && echo to-stdout",
        &format!("outputs: {{paths: [r.txt], s3: {{endpoint: '{}', bucket: results, key: runs/, secretRef: {{name: s3}}}}}}\n", s3.endpoint),
    );
    let mut p = policy(&yaml);
    // What the controller does with the Secret of type kommune.dev/s3-credentials.
    let OutputDestination::S3(bucket) = &mut p.outputs.as_mut().unwrap().destination else { panic!() };
    bucket.credentials = Some(S3Credentials { access_key_id: "AKIDTEST".into(), secret_access_key: "secret".into() });
    op.dispatcher.outputs().unwrap().set_bucket("s3-job", Some(bucket.clone()));
    let done = op.run_to_end(&job("s3-job"), &p, None).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded, "{:?}", done.attempts);
    let r = done.attempts[0].result.as_ref().unwrap();
    let file = r.outputs.iter().find(|o| o.name == "out/r.txt").unwrap();
    assert_eq!(file.sha256, sha(b"bucket 0\n"));
    let reader = op.dispatcher.output_reader().unwrap();
    match reader.open("s3-job", 0, "out/r.txt").await.unwrap().unwrap() {
        OutputBody::Redirect(url) => {
            // The object is in the bucket under the prefix, job uid, task and attempt.
            let object = format!("{}/results/runs/s3-job/0/s3-job.0.1/out/r.txt?", s3.endpoint);
            assert!(url.starts_with(&object) && url.contains("X-Amz-Signature") && !url.contains("secret"), "{url}");
            assert_eq!(http("GET", &url, &[]).await, (200, b"bucket 0\n".to_vec()));
        }
        OutputBody::Stream { .. } => panic!("a bucket's output is read from the bucket"),
    }
    assert_eq!(read(reader.as_ref(), "s3-job", 0, "stdout").await.unwrap(), b"to-stdout\n");
    assert!(!op.data_dir().join("outputs/s3-job/s3-job.0.1/0.bin").exists(), "nothing passed through the operator");
}

/// The embedded store's practical limit (docs/ARCHITECTURE.md, "Task outputs"): 100 MiB from
/// a real agent through UploadOutput on loopback mTLS, timed from the attempt's start to its
/// result. `cargo nextest run -p kommune-operator --test outputs --run-ignored all throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement: writes 100 MiB"]
async fn throughput_of_a_100_mib_output_through_the_gateway() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let _agent = join_agent(&op, dir.path(), "agent-a", true).await;
    wait_connected(&op, &["agent-a"]).await;
    let yaml =
        exec("mkdir -p out && head -c 104857600 /dev/urandom > out/big.bin", "outputs: {paths: [big.bin], maxFileSize: 128Mi}\ntimeouts: {taskSeconds: 300}\n");
    let started = std::time::Instant::now();
    let done = op.run_to_end(&job("mib-job"), &policy(&yaml), None).await;
    let took = started.elapsed();
    let r = done.attempts[0].result.as_ref().unwrap();
    assert_eq!(r.outputs.iter().find(|o| o.name == "out/big.bin").unwrap().size, 100 << 20, "{r:?}");
    let wall = Duration::from_millis(r.wall_millis);
    let upload = took.saturating_sub(wall);
    println!("100 MiB output: task {wall:?}, whole attempt {took:?}, collect+upload about {upload:?} = {:.0} MiB/s", 100.0 / upload.as_secs_f64());
}
