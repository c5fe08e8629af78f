//! Outputs retrieval on loopback: the operator's TLS endpoint with its gatekeeper and an
//! in-memory output store, reached by the plugin's client with a user's token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::serve::Listener as _;
use futures::future::BoxFuture;
use kommune_operator::outputs::live::{Following, LiveKey, LiveLogs, LiveSource};
use kommune_operator::outputs::{OutputBody, OutputEntry, OutputReader};
use kommune_operator::web::auth::{AuthError, Authority, Gatekeeper, UserInfo};
use kommune_operator::web::results::{JobLookup, Retrieval};
use kommune_operator::web::{self, Source, tls};
use kubectl_kommune::api::{self, ApiError};
use sha2::Digest as _;

/// Tokens name their user. `reader` may get team-a/render and team-a/ghost (which does not
/// exist); `neighbour` may get every ComputeJob, but in team-b only; anyone else nothing.
struct Rbac;

impl Authority for Rbac {
    fn review_token(&self, token: String) -> BoxFuture<'_, Result<Option<UserInfo>, AuthError>> {
        Box::pin(async move { Ok(["reader", "neighbour", "nobody"].contains(&token.as_str()).then(|| UserInfo { username: token, ..UserInfo::default() })) })
    }
    fn allowed(&self, _: UserInfo, _: &'static str, _: &'static str, _: String) -> BoxFuture<'_, Result<bool, AuthError>> {
        Box::pin(async { Ok(false) })
    }
    fn allowed_object(&self, user: UserInfo, verb: &'static str, resource: &'static str, ns: String, name: String) -> BoxFuture<'_, Result<bool, AuthError>> {
        let ok = verb == "get"
            && resource == "computejobs"
            && match user.username.as_str() {
                "reader" => ns == "team-a" && ["render", "ghost"].contains(&name.as_str()),
                "neighbour" => ns == "team-b",
                _ => false,
            };
        Box::pin(async move { Ok(ok) })
    }
}

struct NoFacts;

impl Source for NoFacts {
    fn facts(&self) -> BoxFuture<'_, Result<web::Facts, String>> {
        Box::pin(async { Ok((vec![], vec![])) })
    }
}

/// team-a/render has uid "uid-render"; nothing else exists.
struct Jobs;

impl JobLookup for Jobs {
    fn uid(&self, namespace: String, name: String) -> BoxFuture<'_, Result<Option<String>, String>> {
        Box::pin(async move { Ok((namespace == "team-a" && name == "render").then(|| "uid-render".to_string())) })
    }
}

enum Stored {
    Bytes(Vec<u8>),
    Redirect(String),
}

/// Outputs by job uid, in listing order.
#[derive(Default)]
struct Memory {
    jobs: Mutex<HashMap<String, Vec<(OutputEntry, Stored)>>>,
}

impl Memory {
    fn put(&self, uid: &str, task: u32, name: &str, bytes: &[u8], stored: Stored) {
        let entry = OutputEntry {
            task_index: task,
            attempt_id: format!("{uid}-{task}-1"),
            name: name.into(),
            size: bytes.len() as u64,
            sha256: hex::encode(sha2::Sha256::digest(bytes)),
            excess_bytes: 0,
        };
        self.jobs.lock().unwrap().entry(uid.into()).or_default().push((entry, stored));
    }
}

impl OutputReader for Memory {
    fn list(&self, job_uid: &str) -> BoxFuture<'_, Result<Vec<OutputEntry>, String>> {
        let items = self.jobs.lock().unwrap().get(job_uid).map(|v| v.iter().map(|(e, _)| e.clone()).collect()).unwrap_or_default();
        Box::pin(async move { Ok(items) })
    }
    fn open(&self, job_uid: &str, task_index: u32, name: &str) -> BoxFuture<'_, Result<Option<OutputBody>, String>> {
        let jobs = self.jobs.lock().unwrap();
        let found = jobs.get(job_uid).and_then(|v| v.iter().find(|(e, _)| e.task_index == task_index && e.name == name));
        let body = found.map(|(_, s)| match s {
            Stored::Bytes(b) => {
                let b = bytes::Bytes::from(b.clone());
                // Two chunks, so the client hashes across chunk boundaries.
                let (x, y) = b.split_at(b.len() / 2);
                let chunks = vec![Ok(bytes::Bytes::copy_from_slice(x)), Ok(bytes::Bytes::copy_from_slice(y))];
                OutputBody::Stream { size: b.len() as u64, body: Box::pin(futures::stream::iter(chunks)) }
            }
            Stored::Redirect(u) => OutputBody::Redirect(u.clone()),
        });
        Box::pin(async move { Ok(body) })
    }
}

async fn start(reader: Option<Arc<dyn OutputReader>>) -> String {
    start_with(reader, None).await
}

async fn start_with(reader: Option<Arc<dyn OutputReader>>, live: Option<Arc<dyn LiveSource>>) -> String {
    let (chain, key) = ca().issue_server(&["localhost".into()]).unwrap();
    let listener = tls::TlsListener::bind("127.0.0.1:0".parse().unwrap(), tls::server_config(&chain, &key, None).unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap().addr;
    let gate = Arc::new(Gatekeeper::new(Arc::new(Rbac)));
    let retrieval = Retrieval { jobs: Arc::new(Jobs), reader, live };
    tokio::spawn(web::serve(listener, web::router_with_outputs(gate, Arc::new(NoFacts), Some(retrieval))));
    format!("https://localhost:{}", addr.port())
}

/// The operator CA of this test binary, which the plugin's client is given.
fn ca() -> &'static kommune_operator::pki::Ca {
    static CA: std::sync::OnceLock<kommune_operator::pki::Ca> = std::sync::OnceLock::new();
    CA.get_or_init(|| kommune_operator::pki::Ca::generate().unwrap())
}

fn trust() -> kubectl_kommune::connect::Trust {
    kubectl_kommune::connect::Trust::Roots { ders: kubectl_kommune::connect::roots_from_pem(ca().cert_pem()).unwrap(), server_name: None }
}

async fn client(url: &str, token: Option<&str>) -> kube::Client {
    let user = token.map_or("{}".to_string(), |t| format!("{{token: {t}}}"));
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:1'}}}}]\nusers: [{{name: u, user: {user}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"
    );
    let kc = kube::config::Kubeconfig::from_yaml(&yaml).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.unwrap();
    kubectl_kommune::connect::operator_client(config, url, &trust()).unwrap()
}

fn status_of(e: ApiError) -> u16 {
    match e {
        ApiError::Refused { status, .. } => status.as_u16(),
        ApiError::Unavailable(_) => 503,
        other => panic!("not a refusal: {other}"),
    }
}

fn store() -> Arc<Memory> {
    let m = Memory::default();
    m.put("uid-render", 0, "stdout", b"hello from task 0\n", Stored::Bytes(b"hello from task 0\n".to_vec()));
    m.put("uid-render", 0, "out/result.csv", b"a,b\n1,2\n", Stored::Bytes(b"a,b\n1,2\n".to_vec()));
    m.put("uid-render", 1, "stderr", b"warning: none\n", Stored::Bytes(b"warning: none\n".to_vec()));
    Arc::new(m)
}

#[tokio::test]
async fn a_user_allowed_to_get_the_job_downloads_every_output_verified() {
    let url = start(Some(store())).await;
    let dir = tempfile::tempdir().unwrap();
    let summary = kubectl_kommune::results::download_all(&client(&url, Some("reader")).await, "team-a", "render", dir.path()).await.unwrap();
    assert!(summary.contains("downloaded 3 outputs"), "{summary}");
    assert_eq!(std::fs::read(dir.path().join("task-0/stdout")).unwrap(), b"hello from task 0\n");
    assert_eq!(std::fs::read(dir.path().join("task-0/out/result.csv")).unwrap(), b"a,b\n1,2\n");
    assert_eq!(std::fs::read(dir.path().join("task-1/stderr")).unwrap(), b"warning: none\n");
}

#[tokio::test]
async fn who_may_not_get_the_job_is_refused_and_learns_nothing() {
    let url = start(Some(store())).await;
    let list = |token: Option<&'static str>, ns: &'static str, job: &'static str| {
        let url = url.clone();
        async move { api::list_outputs(&client(&url, token).await, ns, job).await }
    };
    assert_eq!(status_of(list(None, "team-a", "render").await.unwrap_err()), 401);
    assert_eq!(status_of(list(Some("forged"), "team-a", "render").await.unwrap_err()), 401);
    assert_eq!(status_of(list(Some("nobody"), "team-a", "render").await.unwrap_err()), 403);
    // A grant in another namespace does not reach this one.
    let err = list(Some("neighbour"), "team-a", "render").await.unwrap_err();
    assert!(err.to_string().contains("may not get computejobs.kommune.dev \"render\" in namespace \"team-a\""), "{err}");
    assert_eq!(status_of(err), 403);
    // The download of one output is guarded the same way.
    let open = api::open_output(&client(&url, Some("neighbour")).await, "team-a", "render", 0, "stdout").await;
    assert_eq!(status_of(open.err().unwrap()), 403);
    // Only a caller who may get the name learns that no such job exists.
    assert_eq!(status_of(list(Some("reader"), "team-a", "ghost").await.unwrap_err()), 404);
    assert_eq!(status_of(list(Some("neighbour"), "team-a", "ghost").await.unwrap_err()), 403);
    assert_eq!(status_of(list(Some("neighbour"), "team-b", "ghost").await.unwrap_err()), 404);
}

#[tokio::test]
async fn without_an_output_store_the_routes_say_so() {
    let url = start(None).await;
    let err = api::list_outputs(&client(&url, Some("reader")).await, "team-a", "render").await.unwrap_err();
    assert!(err.to_string().contains("outputs are not enabled"), "{err}");
    // Still authorized first: a stranger is refused, not told about the configuration.
    assert_eq!(status_of(api::list_outputs(&client(&url, Some("nobody")).await, "team-a", "render").await.unwrap_err()), 403);
}

#[tokio::test]
async fn bytes_that_do_not_match_the_listed_digest_are_not_saved() {
    let m = Memory::default();
    m.put("uid-render", 0, "stdout", b"what the task wrote", Stored::Bytes(b"what a provider swapped in".to_vec()));
    let url = start(Some(Arc::new(m))).await;
    let dir = tempfile::tempdir().unwrap();
    let err = kubectl_kommune::results::download_all(&client(&url, Some("reader")).await, "team-a", "render", dir.path()).await.unwrap_err();
    assert!(err.to_string().contains("not saved"), "{err}");
    assert!(!dir.path().join("task-0/stdout").exists());
    assert!(!dir.path().join("task-0/.stdout.part").exists());
}

#[tokio::test]
async fn a_listing_with_an_escaping_name_writes_nothing() {
    let m = Memory::default();
    m.put("uid-render", 0, "stdout", b"fine", Stored::Bytes(b"fine".to_vec()));
    m.put("uid-render", 0, "../../escaped", b"gotcha", Stored::Bytes(b"gotcha".to_vec()));
    let url = start(Some(Arc::new(m))).await;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("results");
    let err = kubectl_kommune::results::download_all(&client(&url, Some("reader")).await, "team-a", "render", &dir).await.unwrap_err();
    assert!(err.to_string().contains("outside the task's directory"), "{err}");
    assert!(!dir.exists() && !parent.path().join("escaped").exists());
}

#[tokio::test]
async fn a_redirected_output_is_fetched_without_the_user_s_token() {
    // A stand-in for a bucket's presigned URL: plain HTTP on loopback, recording what it got.
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let bucket = {
        let seen = seen.clone();
        axum::Router::new().route(
            "/bucket/{*key}",
            axum::routing::get(move |headers: axum::http::HeaderMap| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(headers.get("authorization").map(|h| h.to_str().unwrap().to_string()));
                    "from the bucket"
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bucket_url = format!("http://{}/bucket/job/0/stdout?X-Amz-Signature=abc", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, bucket).await });

    let m = Memory::default();
    m.put("uid-render", 0, "stdout", b"from the bucket", Stored::Redirect(bucket_url));
    let url = start(Some(Arc::new(m))).await;
    let dir = tempfile::tempdir().unwrap();
    kubectl_kommune::results::download_all(&client(&url, Some("reader")).await, "team-a", "render", dir.path()).await.unwrap();
    assert_eq!(std::fs::read(dir.path().join("task-0/stdout")).unwrap(), b"from the bucket");
    assert_eq!(*seen.lock().unwrap(), vec![None], "the bucket must not see the user's credentials");
}

/// Task 0 of team-a/render runs as attempt "att-1" while `logs` has its tail.
struct Running(Arc<LiveLogs>);

impl LiveSource for Running {
    fn follow(&self, uid: String, task: u32) -> BoxFuture<'_, Result<Following, String>> {
        let found = if uid == "uid-render" && task == 0 { self.0.get("att-1") } else { None };
        Box::pin(async move { Ok(found.map_or(Following::NotRunning, Following::Live)) })
    }
}

#[tokio::test]
async fn a_follower_reads_the_running_task_s_output_as_it_comes_and_nothing_twice() {
    let logs = Arc::new(LiveLogs::default());
    let key = LiveKey { attempt_id: "att-1".into(), node: "pn-a".into(), job_uid: "uid-render".into(), task_index: 0 };
    let attempt = logs.open(key).unwrap();
    attempt.append(1, 0, 0, b"one\n").unwrap();
    let url = start_with(None, Some(Arc::new(Running(logs.clone())))).await;
    let reader = client(&url, Some("reader")).await;
    // Guarded like the outputs.
    let refused = api::follow_logs(&client(&url, Some("nobody")).await, "team-a", "render", 0).await;
    assert_eq!(status_of(refused.err().expect("refused")), 403);
    // A task with no running attempt: the plugin waits and asks again.
    assert!(matches!(api::follow_logs(&reader, "team-a", "render", 1).await.unwrap(), api::Live::NotRunning(_)));

    let api::Live::Stream(body) = api::follow_logs(&reader, "team-a", "render", 0).await.unwrap() else { panic!("task 0 runs") };
    let writer = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        attempt.append(1, 0, 4, b"two\n").unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        logs.end("att-1", "Succeeded");
    });
    let mut printed = kubectl_kommune::follow::Printed::default();
    kubectl_kommune::follow::print_stream(body, &mut printed).await.unwrap();
    writer.await.unwrap();
    // Both lines were printed live; the stored stdout of att-1 is printed from byte 8 on.
    assert_eq!(printed.already("att-1", "stdout"), 8);
}

#[tokio::test]
async fn an_operator_without_live_logs_is_told_apart_from_a_refusal() {
    let url = start(None).await;
    let answer = api::follow_logs(&client(&url, Some("reader")).await, "team-a", "render", 0).await.unwrap();
    assert!(matches!(answer, api::Live::NotOffered(why) if why.contains("no live logs")));
}
