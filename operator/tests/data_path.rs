//! Component test of a job's data path with real agents over loopback: inputs fetched from an
//! HTTP server, from the operator's blob store (ConfigMap inputs) and from a real S3-compatible
//! server (moto) through presigned URLs, each verified by digest before the task starts.

#[allow(dead_code)]
#[path = "support/operator.rs"]
mod harness;

use std::time::Duration;

use harness::*;
use kommune_agent::fetch::UrlPolicy;
use kommune_operator::attempt::AttemptPhase;
use kommune_operator::blobs::{BlobOwner, input_owner};
use kommune_operator::crd::JobPhase;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves `body` for every request on loopback (plain HTTP/1.1), `extra` bytes of zeros after
/// it, so a test can serve a file larger than an agent accepts without holding it.
async fn serve(body: Vec<u8>, extra: u64) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut request = vec![0u8; 4096];
                let _ = conn.read(&mut request).await;
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len() as u64 + extra);
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(&body).await;
                let zeros = vec![0u8; 1 << 20];
                let mut left = extra;
                while left > 0 {
                    let n = left.min(zeros.len() as u64) as usize;
                    if conn.write_all(&zeros[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            });
        }
    });
    format!("http://{addr}")
}

fn sha(b: &[u8]) -> String {
    kommune_proto::sha256_hex(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_url_and_per_task_configmap_inputs_reach_each_task_verified() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = join_agent(&op, dir.path(), "agent-a", true).await;
    // The test's server is on loopback, which only a provider's explicit allowance opens.
    agent.tasks.set_url_policy(UrlPolicy { allow_private: true });
    wait_connected(&op, &["agent-a"]).await;

    let dict = b"the quick brown fox\n".to_vec();
    let url = serve(dict.clone(), 0).await;
    let shards = [b"alpha beta\n".to_vec(), b"gamma delta epsilon\n".to_vec()];
    // What the controller does with a ConfigMap input: each task's file held by the job.
    for (i, s) in shards.iter().enumerate() {
        op.blobs.put_for(BlobOwner { job_uid: &input_owner("inputs-job", 0, Some(i as u32)), namespace: "default" }, s).unwrap();
    }
    let yaml = format!(
        "workload:\n  exec:\n    command: ['/bin/sh', '-c', 'cat in/dict.txt in/shards/shard-$KOMMUNE_TASK_INDEX.txt | wc -w']
tasks: 2
inputs:
- {{path: 'shards/shard-{{index}}.txt', configMapRef: {{name: shards, key: 'shard-{{index}}.txt'}}, sha256PerTask: ['{}', '{}']}}
- {{path: dict.txt, url: '{url}/dict.txt', sha256: '{}'}}
",
        sha(&shards[0]),
        sha(&shards[1]),
        sha(&dict)
    );
    let done = op.run_to_end(&job("inputs-job"), &policy(&yaml), None).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded, "{:?}", done.attempts);
    let mut words: Vec<(u32, String)> =
        done.attempts.iter().map(|a| (a.index, String::from_utf8_lossy(&a.result.as_ref().unwrap().stdout_tail).trim().to_string())).collect();
    words.sort();
    assert_eq!(words, vec![(0, "6".to_string()), (1, "7".to_string())], "each task read the shared file and its own shard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_unreachable_oversized_or_foreign_input_fails_the_attempt_with_its_reason() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = join_agent(&op, dir.path(), "agent-a", true).await;
    agent.tasks.set_url_policy(UrlPolicy { allow_private: true });
    wait_connected(&op, &["agent-a"]).await;

    let served = serve(b"tampered".to_vec(), 0).await;
    let huge = serve(vec![], kommune_agent::fetch::MAX_DOWNLOAD_BYTES + 1).await;
    // A blob another job holds: this job's attempts may not fetch it by naming its digest.
    let foreign = op.blobs.put_for(BlobOwner { job_uid: &input_owner("other-job", 0, None), namespace: "default" }, b"someone else's data").unwrap();
    let expected = sha(b"expected");
    let cases = [
        (
            "mismatch",
            format!("url: '{served}/d'"),
            expected.clone(),
            format!("input in/d: the fetched file has sha256 {}, but the job expects {expected}", sha(b"tampered")),
        ),
        ("unreachable", "url: 'http://127.0.0.1:1/d'".into(), expected.clone(), "cannot download input in/d from 127.0.0.1: connection failed".into()),
        ("oversize", format!("url: '{huge}/d'"), expected.clone(), "cannot download input in/d from 127.0.0.1: the input in/d is larger than 64 MiB".into()),
        (
            "foreign",
            "configMapRef: {name: x, key: d}".into(),
            foreign.clone(),
            "cannot fetch input in/d from the operator: node agent-a holds no assigned or running attempt".into(),
        ),
    ];
    for (name, source, digest, reason) in cases {
        let yaml = format!("workload:\n  exec:\n    command: [/bin/true]\nretries: {{maxAttempts: 1}}\ninputs:\n- {{path: d, {source}, sha256: '{digest}'}}\n");
        let done = op.run_to_end(&job(&format!("bad-{name}")), &policy(&yaml), None).await;
        assert_eq!(done.progress.phase, JobPhase::Failed, "{name}");
        let a = &done.attempts[0];
        assert_eq!(a.phase, AttemptPhase::Failed, "{name}");
        let message = &a.result.as_ref().unwrap().message;
        assert!(message.starts_with(&reason), "{name}: {message}");
    }
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
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let moto = Moto { child, endpoint: format!("http://127.0.0.1:{port}") };
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Some(moto);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// One plain HTTP/1.1 request (moto does not check signatures by default); the status code.
async fn http(endpoint: &str, method: &str, path: &str, body: &[u8]) -> u16 {
    let host = endpoint.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(host).await.unwrap();
    let head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body).await.unwrap();
    let mut reply = vec![];
    conn.read_to_end(&mut reply).await.unwrap();
    String::from_utf8_lossy(&reply[9..12]).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_inputs_are_fetched_from_a_real_s3_server_with_urls_presigned_per_attempt() {
    let Some(s3) = moto().await else {
        println!("skipped: no S3 server (pip install 'moto[server]' for moto_server)");
        return;
    };
    assert_eq!(http(&s3.endpoint, "PUT", "/shards", b"").await, 200);
    let shards = [b"one two\n".to_vec(), b"three four five\n".to_vec()];
    for (i, s) in shards.iter().enumerate() {
        assert_eq!(http(&s3.endpoint, "PUT", &format!("/shards/in/shard-{i}.txt"), s).await, 200);
    }
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = join_agent(&op, dir.path(), "agent-a", true).await;
    agent.tasks.set_url_policy(UrlPolicy { allow_private: true });
    wait_connected(&op, &["agent-a"]).await;
    let yaml = format!(
        "workload:\n  exec:\n    command: ['/bin/sh', '-c', 'wc -w < in/shard.txt']
tasks: 2
inputs:
- {{path: shard.txt, s3: {{endpoint: '{}', bucket: shards, key: 'in/shard-{{index}}.txt', secretRef: {{name: s3}}}}, sha256PerTask: ['{}', '{}']}}
",
        s3.endpoint,
        sha(&shards[0]),
        sha(&shards[1])
    );
    let mut p = policy(&yaml);
    // What the controller fills in from the Secret; the agent only ever sees presigned URLs.
    let kommune_core::job::InputSource::S3(o) = &mut p.inputs[0].source else { unreachable!() };
    o.credentials = Some(kommune_core::job::S3Credentials { access_key_id: "testing".into(), secret_access_key: "testing".into() });
    let done = op.run_to_end(&job("s3-job"), &p, None).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded, "{:?}", done.attempts);
    let mut words: Vec<(u32, String)> =
        done.attempts.iter().map(|a| (a.index, String::from_utf8_lossy(&a.result.as_ref().unwrap().stdout_tail).trim().to_string())).collect();
    words.sort();
    assert_eq!(words, vec![(0, "2".to_string()), (1, "3".to_string())]);
}
