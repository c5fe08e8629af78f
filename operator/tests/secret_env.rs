//! Env values from Secrets through the real controller, with a `tower_test` mock as the API
//! server and one connected provider: refused without `spec.exposeSecretsToProviders`, held with
//! a clear condition while the Secret is missing, unmarked or unreadable, and once allowed the
//! value reaches the provider's Assign and never a status, an Event or any other request. An S3
//! input's Secret the operator may not read is a condition too.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::{Method, Request, Response, StatusCode};
use kommune_operator::blobs::{BlobLimits, Blobs};
use kommune_operator::controller::job::{Context, FINALIZER, reconcile};
use kommune_operator::crd::{ComputeJob, ComputeJobSpec, ComputeJobStatus, JobPhase};
use kommune_operator::dispatch::Dispatcher;
use kommune_operator::fleet::{Fleet, NodeFacts};
use kommune_operator::metrics::Metrics;
use kommune_operator::scheduler::Resources;
use kommune_operator::store::Store;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tower_test::mock;

// Shared with the reconcile tests; this file reads requests more loosely than `Call::is`.
#[allow(dead_code)]
mod support;
use support::{ApiHandle, next_call};

const NS: &str = "default";
const SECRET_PATH: &str = "/api/v1/namespaces/default/secrets/api";
const VALUE: &str = "hunter2-do-not-leak";
const QUIET: Duration = Duration::from_millis(400);

const WITH_SECRET: &str = "workload:\n  exec:\n    command: [sh, -c, 'echo $TOKEN']\n    env:\n    - {name: MODE, value: fast}\n    - name: TOKEN\n      valueFrom: {secretKeyRef: {name: api, key: token}}\n";

fn job(spec_yaml: &str) -> ComputeJob {
    let spec: ComputeJobSpec = serde_yaml::from_str(spec_yaml).expect("fixture spec parses");
    let mut job = ComputeJob::new("tokened", spec);
    job.metadata.namespace = Some(NS.into());
    job.metadata.uid = Some("uid-tokened".into());
    job.metadata.generation = Some(1);
    job.metadata.resource_version = Some("1".into());
    job.metadata.finalizers = Some(vec![FINALIZER.into()]);
    job
}

/// The controller over a real dispatcher with one connected exec provider (its session's
/// receiver returned), and the mock API server's handle.
fn testbed() -> (Arc<Context>, ApiHandle, mpsc::Receiver<Result<kommune_proto::v1::OperatorMessage, tonic::Status>>, tempfile::TempDir) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, NS);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(Store::open(dir.path()).expect("store opens"));
    let fleet = Arc::new(Fleet::default());
    let (tx, rx) = mpsc::channel(16);
    let facts =
        NodeFacts { capacity: Resources { cpu_millis: 2000, memory_bytes: 1 << 30, ephemeral_bytes: 0 }, runtimes: vec!["exec".into()], ..Default::default() };
    fleet.connect("provider-1", facts, tx);
    let (changed, _) = mpsc::channel(16);
    let dispatcher = Arc::new(Dispatcher::new(store, fleet, changed));
    let blobs = Blobs::open_with(dir.path(), BlobLimits::default()).expect("blob dir opens");
    (Arc::new(Context::new(client, dispatcher, blobs, Arc::new(Metrics::default()))), handle, rx, dir)
}

/// How the mock answers a GET of Secret `api`.
enum SecretAnswer {
    Found { labelled: bool, data: Value },
    Status(u16),
}

/// Everything the controller sent: (method, path, body).
type Sent = Vec<(Method, String, Value)>;

/// Plays the API server until the controller has been quiet for a while.
async fn serve(api: &mut ApiHandle, job: &ComputeJob, secret: &SecretAnswer) -> Sent {
    let mut sent = vec![];
    // The context keeps the client alive, so a quiet spell (not a closed channel) ends this.
    while let Ok(call) = timeout(QUIET, next_call(api, Duration::from_secs(3600), "a request")).await {
        sent.push((call.method.clone(), call.path.clone(), call.body.clone()));
        match (call.method.clone(), call.path.as_str()) {
            (Method::GET, SECRET_PATH) => match secret {
                SecretAnswer::Found { labelled, data } => {
                    let labels = if *labelled { json!({"kommune.dev/expose-to-providers": "true"}) } else { json!({}) };
                    call.reply(StatusCode::OK, &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "api", "namespace": NS, "labels": labels}, "data": data}))
                }
                SecretAnswer::Status(code) => call.reply(
                    StatusCode::from_u16(*code).unwrap(),
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "no", "reason": if *code == 404 { "NotFound" } else { "Forbidden" }, "code": code}),
                ),
            },
            (Method::PATCH, p) if p.ends_with("/computejobs/tokened/status") => {
                let status: ComputeJobStatus = serde_json::from_value(call.body["status"].clone()).expect("a ComputeJobStatus");
                let mut written = job.clone();
                written.status = Some(status);
                call.reply(StatusCode::OK, &written)
            }
            (Method::POST | Method::PATCH, p) if p.contains("/events") => {
                let body = call.body.clone();
                call.reply(StatusCode::CREATED, &body)
            }
            (m, p) => panic!("unexpected request {m} {p}: {}", call.body),
        }
    }
    sent
}

/// Reconciles once against the mock; returns what was sent and the last status written.
async fn run(job: &ComputeJob, ctx: &Arc<Context>, api: &mut ApiHandle, secret: SecretAnswer) -> (Sent, ComputeJobStatus) {
    let (result, sent) = tokio::join!(reconcile(Arc::new(job.clone()), ctx.clone()), serve(api, job, &secret));
    result.expect("reconcile succeeds");
    let status =
        sent.iter().rev().find(|(m, p, _)| *m == Method::PATCH && p.ends_with("/status")).map(|(_, _, b)| b["status"].clone()).expect("a status write");
    (sent, serde_json::from_value(status).unwrap())
}

fn condition(status: &ComputeJobStatus, type_: &str) -> (String, String, String) {
    let c = status.conditions.iter().find(|c| c.type_ == type_).unwrap_or_else(|| panic!("no {type_} in {status:#?}"));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

fn events(sent: &Sent) -> Vec<(String, String)> {
    sent.iter()
        .filter(|(_, p, _)| p.contains("/events"))
        .map(|(_, _, b)| (b["reason"].as_str().unwrap_or_default().to_string(), b["note"].as_str().unwrap_or_default().to_string()))
        .collect()
}

fn secret_value() -> Value {
    json!({"token": base64::engine::general_purpose::STANDARD.encode(VALUE)})
}

fn assert_nothing_leaked(sent: &Sent) {
    for (m, p, body) in sent {
        assert!(!body.to_string().contains(VALUE), "the Secret's value was sent in {m} {p}: {body}");
    }
}

#[tokio::test]
async fn without_the_opt_in_the_job_fails_and_no_secret_is_read_or_task_placed() {
    let (ctx, mut api, mut rx, _dir) = testbed();
    let (sent, status) = run(&job(WITH_SECRET), &ctx, &mut api, SecretAnswer::Found { labelled: true, data: secret_value() }).await;

    assert!(!sent.iter().any(|(_, p, _)| p == SECRET_PATH), "the Secret was read: {sent:?}");
    assert_eq!(status.phase, Some(JobPhase::Failed));
    let (valid, reason, message) = condition(&status, "Valid");
    assert_eq!((valid.as_str(), reason.as_str()), ("False", "SecretEnvNotAllowed"));
    assert!(message.contains("spec.workload.exec.env[1] (TOKEN)") && message.contains("spec.exposeSecretsToProviders: true"), "{message}");
    assert!(events(&sent).contains(&("SecretEnvNotAllowed".to_string(), message)), "{:?}", events(&sent));
    assert!(rx.try_recv().is_err(), "a task was placed");
}

#[tokio::test]
async fn a_missing_unmarked_or_unreadable_secret_holds_the_job_with_a_clear_condition() {
    let opted_in = format!("{WITH_SECRET}exposeSecretsToProviders: true\n");
    let cases = [
        (SecretAnswer::Status(404), "SecretUnavailable", "Secret default/api (spec.workload.exec.env[1].valueFrom.secretKeyRef) does not exist"),
        (SecretAnswer::Status(403), "SecretUnavailable", "cannot be read by the operator: the cluster admin allows it with the chart's jobSecrets.enabled"),
        (SecretAnswer::Found { labelled: false, data: secret_value() }, "SecretNotExposed", "is not labelled kommune.dev/expose-to-providers=true"),
        (SecretAnswer::Found { labelled: true, data: json!({"other": "eA=="}) }, "SecretUnavailable", "has no key \"token\""),
    ];
    for (answer, want_reason, want_message) in cases {
        let (ctx, mut api, mut rx, _dir) = testbed();
        let (sent, status) = run(&job(&opted_in), &ctx, &mut api, answer).await;
        assert_eq!(status.phase, Some(JobPhase::Pending));
        assert_eq!(condition(&status, "Valid").0, "True");
        let (scheduled, reason, message) = condition(&status, "Scheduled");
        assert_eq!((scheduled.as_str(), reason.as_str()), ("False", want_reason), "{scheduled} {reason}: {message}");
        assert!(message.contains(want_message), "{message}");
        assert!(events(&sent).iter().any(|(r, n)| r == want_reason && *n == message), "{:?}", events(&sent));
        assert_nothing_leaked(&sent);
        assert!(rx.try_recv().is_err(), "a task was placed while the Secret is not usable ({want_reason})");
    }
}

/// The same holds for an S3 input's credentials: a Secret the operator may not read (the chart's
/// `jobSecrets.enabled` off) is a condition the job waits on, not a reconcile error.
#[tokio::test]
async fn an_s3_input_whose_secret_the_operator_may_not_read_holds_the_job_with_a_condition() {
    let sha = "a".repeat(64);
    let spec = format!(
        "workload:\n  exec:\n    command: [cat, in/x]\ninputs:\n- {{path: x, s3: {{endpoint: 'http://127.0.0.1:9', bucket: shards, key: k, secretRef: {{name: api}}}}, sha256: '{sha}'}}\n"
    );
    let (ctx, mut api, mut rx, _dir) = testbed();
    let (sent, status) = run(&job(&spec), &ctx, &mut api, SecretAnswer::Status(403)).await;
    assert_eq!(status.phase, Some(JobPhase::Pending), "{:?}", status.conditions);
    let (scheduled, reason, message) = condition(&status, "Scheduled");
    assert_eq!((scheduled.as_str(), reason.as_str()), ("False", "S3CredentialsUnavailable"), "{message}");
    assert!(message.contains("Secret default/api (s3.secretRef) cannot be read by the operator") && message.contains("jobSecrets.enabled"), "{message}");
    assert!(events(&sent).iter().any(|(r, n)| r == "S3CredentialsUnavailable" && *n == message), "{:?}", events(&sent));
    assert!(rx.try_recv().is_err(), "a task was placed without its input's credentials");
}

#[tokio::test]
async fn a_marked_secret_s_value_reaches_the_provider_and_nothing_else() {
    let (ctx, mut api, mut rx, _dir) = testbed();
    let job = job(&format!("{WITH_SECRET}exposeSecretsToProviders: true\n"));
    let (sent, status) = run(&job, &ctx, &mut api, SecretAnswer::Found { labelled: true, data: secret_value() }).await;

    let assign = timeout(Duration::from_secs(5), rx.recv()).await.expect("an Assign comes").expect("the session is open").expect("not an error");
    let text = format!("{assign:?}");
    assert!(text.contains("Assign") && text.contains("TOKEN") && text.contains(VALUE) && text.contains("MODE"), "{text}");
    assert_ne!(condition(&status, "Scheduled").1, "SecretUnavailable");
    assert_nothing_leaked(&sent);
    assert!(!format!("{status:?}").contains(VALUE));
}
