//! Reconcile tests for the ComputeJob controller without a cluster: a `tower_test` mock stands in
//! for the API server and answers, in order, exactly the requests each scenario expects.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kommune_operator::attempt::{Attempt, AttemptPhase, attempt_id};
use kommune_operator::blobs::{BlobLimits, BlobOwner, Blobs};
use kommune_operator::controller::job::{Context, FINALIZER, error_policy, reconcile};
use kommune_operator::controller::{Error, MANAGER};
use kommune_operator::crd::{ComputeJob, ComputeJobSpec, ComputeJobStatus, JobPhase};
use kommune_operator::dispatch::Dispatcher;
use kommune_operator::fleet::Fleet;
use kommune_operator::metrics::Metrics;
use kommune_operator::store::Store;
use kommune_proto::now_ms;
use kube::ResourceExt;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tower_test::mock;

mod support;
use support::{ApiHandle, Call, next_call};

const NS: &str = "default";
const JOBS: &str = "/apis/kommune.dev/v1alpha1/namespaces/default/computejobs";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
const CONFIGMAPS: &str = "/api/v1/namespaces/default/configmaps";
/// The query of every status write: server-side apply, forced, under the operator's manager.
/// (kube 5 starts the query after `<path>?` with a separator, hence the leading `&`.)
const STATUS_APPLY_QUERY: &str = "&force=true&fieldManager=kommune-operator";
/// How long one expected request may take to arrive; a missing request fails, never hangs.
const STEP: Duration = Duration::from_secs(5);
/// How long "the controller makes no further request" is watched for.
const QUIET: Duration = Duration::from_millis(300);

const EXEC: &str = "workload:\n  exec:\n    command: [echo, hi]\n";
const WASM_FROM_CONFIGMAP: &str = "workload:\n  wasm:\n    configMapRef: {name: hello-module, key: module.wasm}\n";

// ---------------------------------------------------------------------------------------------
// Fixtures

/// A ComputeJob as the API server would hand it to the controller: namespaced, with a uid,
/// generation 1 and no finalizer yet.
fn job(name: &str, spec_yaml: &str) -> ComputeJob {
    let spec: ComputeJobSpec = serde_yaml::from_str(spec_yaml).expect("fixture spec parses");
    let mut job = ComputeJob::new(name, spec);
    job.metadata.namespace = Some(NS.into());
    job.metadata.uid = Some(format!("uid-{name}"));
    job.metadata.generation = Some(1);
    job.metadata.resource_version = Some("1".into());
    job
}

/// Builders that read like the state a job is in.
trait JobFixture: Sized {
    /// The controller's finalizer is already on the job, so reconcile goes to `apply`.
    fn finalized(self) -> Self;
    /// The job was deleted and waits for its finalizers.
    fn deleted(self) -> Self;
    /// The job carries this status, as last written.
    fn with_status(self, status: ComputeJobStatus) -> Self;
}

impl JobFixture for ComputeJob {
    fn finalized(mut self) -> Self {
        self.metadata.finalizers = Some(vec![FINALIZER.into()]);
        self
    }

    fn deleted(mut self) -> Self {
        self.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        self
    }

    fn with_status(mut self, status: ComputeJobStatus) -> Self {
        self.status = Some(status);
        self
    }
}

/// The controller's context over a real dispatcher, store and blob directory in a temp dir;
/// the API server is the returned `ApiServer`. Keep the `TempDir` alive for the test.
fn testbed() -> (Arc<Context>, ApiServer, tempfile::TempDir) {
    testbed_fenced(kommune_operator::fence::Fence::open())
}

/// As [`testbed`], with writes under `fence` (leader election).
fn testbed_fenced(fence: kommune_operator::fence::Fence) -> (Arc<Context>, ApiServer, tempfile::TempDir) {
    testbed_with(fence, BlobLimits::default())
}

/// As [`testbed`], with module blobs held to `limits`.
fn testbed_with(fence: kommune_operator::fence::Fence, limits: BlobLimits) -> (Arc<Context>, ApiServer, tempfile::TempDir) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, NS);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(Store::open(dir.path()).expect("store opens"));
    let (changed, _) = mpsc::channel(16);
    let dispatcher = Arc::new(Dispatcher::new(store, Arc::new(Fleet::default()), changed).with_fence(fence));
    let blobs = Blobs::open_with(dir.path(), limits).expect("blob dir opens");
    let ctx = Arc::new(Context::new(client, dispatcher, blobs, Arc::new(Metrics::default())));
    (ctx, ApiServer(handle), dir)
}

/// Reconciles `job` once while `script` plays the API server, and returns both outcomes.
async fn reconcile_against<T>(job: &ComputeJob, ctx: &Arc<Context>, script: impl Future<Output = T>) -> (Result<Action, Error>, T) {
    let both = async { tokio::join!(reconcile(Arc::new(job.clone()), ctx.clone()), script) };
    timeout(STEP * 2, both).await.expect("the reconcile did not finish")
}

fn condition<'a>(status: &'a ComputeJobStatus, type_: &str) -> &'a Condition {
    status.conditions.iter().find(|c| c.type_ == type_).unwrap_or_else(|| panic!("no {type_} condition in {status:#?}"))
}

// ---------------------------------------------------------------------------------------------
// The scripted API server

/// Answers the controller's requests one by one, asserting each is the one expected.
struct ApiServer(ApiHandle);

impl ApiServer {
    async fn next(&mut self, expected: &str) -> Call {
        next_call(&mut self.0, STEP, expected).await
    }

    /// The finalizer helper adds the finalizer with a JSON patch that first tests the list is
    /// absent, so a concurrent writer makes it fail instead of duplicating the entry.
    async fn finalizer_added(&mut self, job: &ComputeJob) {
        let call = self.next("the PATCH adding the finalizer").await;
        call.is(Method::PATCH, &format!("{JOBS}/{}", job.name_any()), "");
        assert_eq!(call.content_type, "application/json-patch+json");
        assert_eq!(
            call.body,
            json!([
                { "op": "test", "path": "/metadata/finalizers", "value": null },
                { "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER] },
            ])
        );
        call.reply(StatusCode::OK, &job.clone().finalized());
    }

    /// Removing the finalizer tests it is still at the index the controller saw, then removes it.
    async fn finalizer_removed(&mut self, job: &ComputeJob) {
        let call = self.next("the PATCH removing the finalizer").await;
        call.is(Method::PATCH, &format!("{JOBS}/{}", job.name_any()), "");
        assert_eq!(call.content_type, "application/json-patch+json");
        assert_eq!(
            call.body,
            json!([
                { "op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER },
                { "op": "remove", "path": "/metadata/finalizers/0" },
            ])
        );
        let mut released = job.clone();
        released.metadata.finalizers = Some(vec![]);
        call.reply(StatusCode::OK, &released);
    }

    /// Status is written with a forced server-side apply of `/status` under the operator's field
    /// manager. Returns the status written.
    async fn status_applied(&mut self, job: &ComputeJob) -> ComputeJobStatus {
        let call = self.next("the status apply PATCH").await;
        call.is(Method::PATCH, &format!("{JOBS}/{}/status", job.name_any()), STATUS_APPLY_QUERY);
        assert!(call.query.contains(&format!("fieldManager={MANAGER}")));
        assert_eq!(call.content_type, "application/apply-patch+yaml");
        assert_eq!(call.body["apiVersion"], "kommune.dev/v1alpha1");
        assert_eq!(call.body["kind"], "ComputeJob");
        let status: ComputeJobStatus = serde_json::from_value(call.body["status"].clone()).expect("the patch carries a ComputeJobStatus");
        call.reply(StatusCode::OK, &job.clone().with_status(status.clone()));
        status
    }

    /// The status write is refused, as it is when the operator's Role lacks `computejobs/status`.
    async fn status_refused(&mut self, job: &ComputeJob) {
        let call = self.next("the status apply PATCH").await;
        call.is(Method::PATCH, &format!("{JOBS}/{}/status", job.name_any()), STATUS_APPLY_QUERY);
        call.reply(
            StatusCode::FORBIDDEN,
            &json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "computejobs.kommune.dev \"refused\" is forbidden", "reason": "Forbidden", "code": 403,
            }),
        );
    }

    /// A wasm job's module is looked up in its ConfigMap; this one does not exist.
    async fn configmap_not_found(&mut self, name: &str) {
        let call = self.next("the GET of the module's ConfigMap").await;
        call.is(Method::GET, &format!("{CONFIGMAPS}/{name}"), "");
        call.reply(
            StatusCode::NOT_FOUND,
            &json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("configmaps \"{name}\" not found"), "reason": "NotFound",
                "details": { "name": name, "kind": "configmaps" }, "code": 404,
            }),
        );
    }

    /// The module's ConfigMap exists and holds `module` under `module.wasm`.
    async fn configmap_found(&mut self, name: &str, module: &[u8]) {
        use base64::Engine as _;
        let call = self.next("the GET of the module's ConfigMap").await;
        call.is(Method::GET, &format!("{CONFIGMAPS}/{name}"), "");
        let data = base64::engine::general_purpose::STANDARD.encode(module);
        call.reply(
            StatusCode::OK,
            &json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": name, "namespace": NS }, "binaryData": { "module.wasm": data } }),
        );
    }

    /// A new Event about `job` is created. Returns it.
    async fn event_created(&mut self, job: &ComputeJob, type_: &str, reason: &str) -> K8sEvent {
        let call = self.next(&format!("the POST of a {type_} {reason} Event")).await;
        call.is(Method::POST, EVENTS, "");
        let event: K8sEvent = serde_json::from_value(call.body.clone()).expect("an events.k8s.io/v1 Event");
        assert_eq!((event.type_.as_deref(), event.reason.as_deref()), (Some(type_), Some(reason)), "{event:#?}");
        assert_eq!(event.action.as_deref(), Some("Reconcile"));
        assert_eq!(event.reporting_controller.as_deref(), Some(MANAGER));
        let regarding = event.regarding.clone().expect("the Event names its object");
        assert_eq!(
            (regarding.kind.as_deref(), regarding.name.as_deref(), regarding.namespace.as_deref(), regarding.uid.as_deref()),
            (Some("ComputeJob"), job.metadata.name.as_deref(), Some(NS), job.metadata.uid.as_deref())
        );
        call.reply(StatusCode::CREATED, &event);
        event
    }

    /// The controller makes no further request.
    async fn no_further_requests(&mut self) {
        if let Ok(Some((request, _))) = timeout(QUIET, self.0.next_request()).await {
            panic!("unexpected request: {} {}", request.method(), request.uri());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios

#[tokio::test]
async fn a_new_job_gets_the_finalizer_before_anything_else() {
    let (ctx, mut api, _dir) = testbed();
    let job = job("fresh", EXEC);

    let (action, ()) = reconcile_against(&job, &ctx, api.finalizer_added(&job)).await;

    assert_eq!(action.expect("reconcile succeeds"), Action::await_change());
    api.no_further_requests().await;
}

/// An invalid spec fails the job once, with both conditions naming the field; it is not an
/// error, so the controller does not retry it until the spec changes.
async fn assert_invalid_spec_fails_the_job(spec_yaml: &str, reason: &str, field: &str) {
    let (ctx, mut api, _dir) = testbed();
    let job = job("broken", spec_yaml).finalized();

    let (action, (status, events)) = reconcile_against(&job, &ctx, async {
        let status = api.status_applied(&job).await;
        let event = api.event_created(&job, "Warning", reason).await;
        (status, [event])
    })
    .await;

    assert_eq!(action.expect("an invalid spec is not a reconcile error"), Action::await_change());
    assert_eq!(status.phase, Some(JobPhase::Failed));
    assert_eq!(status.observed_generation, Some(1));
    let failed = condition(&status, "Failed");
    assert_eq!((failed.status.as_str(), failed.reason.as_str()), ("True", reason));
    assert!(failed.message.contains(field), "{failed:?}");
    let valid = condition(&status, "Valid");
    assert_eq!((valid.status.as_str(), valid.reason.as_str(), &valid.message), ("False", reason, &failed.message));
    assert!(events.iter().all(|e| e.note.as_deref() == Some(failed.message.as_str())), "{events:#?}");
    api.no_further_requests().await;
}

#[tokio::test]
async fn a_job_without_a_workload_fails_with_invalid_spec() {
    assert_invalid_spec_fails_the_job("workload: {}\n", "InvalidSpec", "spec.workload").await;
}

#[tokio::test]
async fn a_job_with_zero_tasks_fails_with_invalid_spec() {
    assert_invalid_spec_fails_the_job(&format!("{EXEC}tasks: 0\n"), "InvalidSpec", "spec.tasks").await;
}

#[tokio::test]
async fn a_container_job_with_an_unpinned_image_fails_as_invalid() {
    assert_invalid_spec_fails_the_job("workload:\n  container: {image: busybox}\n", "InvalidSpec", "spec.workload.container.image").await;
}

#[tokio::test]
async fn a_wasm_job_waits_for_its_missing_configmap() {
    let (ctx, mut api, _dir) = testbed();
    let job = job("wasm", WASM_FROM_CONFIGMAP).finalized();

    let (action, (status, event)) = reconcile_against(&job, &ctx, async {
        api.configmap_not_found("hello-module").await;
        let status = api.status_applied(&job).await;
        let event = api.event_created(&job, "Warning", "ModuleUnavailable").await;
        (status, event)
    })
    .await;

    assert_eq!(action.expect("a missing ConfigMap is not a reconcile error"), Action::requeue(Duration::from_secs(30)));
    assert_eq!(status.phase, Some(JobPhase::Pending));
    let scheduled = condition(&status, "Scheduled");
    assert_eq!((scheduled.status.as_str(), scheduled.reason.as_str()), ("False", "ModuleUnavailable"));
    assert_eq!(scheduled.message, "ConfigMap default/hello-module (spec.workload.wasm.configMapRef) does not exist");
    assert_eq!(condition(&status, "Valid").status, "True");
    assert_eq!(event.note.as_deref(), Some(scheduled.message.as_str()));
    api.no_further_requests().await;
}

#[tokio::test]
async fn an_exec_job_waits_while_no_agent_has_joined() {
    let (ctx, mut api, _dir) = testbed();
    let job = job("lonely", EXEC).finalized();

    let (action, (status, event)) = reconcile_against(&job, &ctx, async {
        let status = api.status_applied(&job).await;
        let event = api.event_created(&job, "Warning", "Unschedulable").await;
        (status, event)
    })
    .await;

    assert_eq!(action.expect("reconcile succeeds"), Action::requeue(Duration::from_secs(5)));
    assert_eq!(status.phase, Some(JobPhase::Pending));
    assert_eq!(status.runtime.as_deref(), Some("exec"));
    assert_eq!((status.tasks.total, status.tasks.pending), (1, 1));
    let scheduled = condition(&status, "Scheduled");
    assert_eq!((scheduled.status.as_str(), scheduled.reason.as_str()), ("False", "Unschedulable"));
    assert_eq!(scheduled.message, "1 task(s) waiting: 0/0 nodes: no provider node is connected");
    assert_eq!(event.note.as_deref(), Some(scheduled.message.as_str()));
    api.no_further_requests().await;
}

/// A replica whose Lease has lapsed (say it was frozen past it) and that has not noticed yet
/// reconciles a job that needs a new status: it writes nothing to the API server, no status
/// and no Event, and the reconcile fails as fenced.
#[tokio::test]
async fn a_replica_that_is_not_the_leader_writes_nothing_to_the_api_server() {
    let fence = kommune_operator::fence::Fence::closed();
    fence.extend(std::time::Instant::now() + Duration::from_secs(600));
    let (ctx, mut api, _dir) = testbed_fenced(fence.clone());
    let job = job("broken", "workload: {}\n").finalized();
    fence.close();
    let (result, ()) = reconcile_against(&job, &ctx, api.no_further_requests()).await;
    let err = result.as_ref().expect_err("a fenced reconcile fails");
    assert!(err.to_string().contains("not the leader"), "{err}");
    error_policy(Arc::new(job.clone()), &result.unwrap_err(), ctx.clone());
    api.no_further_requests().await;
}

#[tokio::test]
async fn a_status_that_is_already_current_is_not_written_again() {
    let (ctx, mut api, _dir) = testbed();
    let job = job("steady", EXEC).finalized();
    let (first, written) = reconcile_against(&job, &ctx, async {
        let status = api.status_applied(&job).await;
        api.event_created(&job, "Warning", "Unschedulable").await;
        status
    })
    .await;
    first.expect("first reconcile succeeds");

    let job = job.with_status(written);
    let (again, ()) = reconcile_against(&job, &ctx, api.no_further_requests()).await;

    assert_eq!(again.expect("second reconcile succeeds"), Action::requeue(Duration::from_secs(5)));
}

#[tokio::test]
async fn an_invalid_job_is_not_failed_and_announced_again() {
    let (ctx, mut api, _dir) = testbed();
    let job = job("still-broken", "workload: {}\n").finalized();
    let (first, written) = reconcile_against(&job, &ctx, async {
        let status = api.status_applied(&job).await;
        api.event_created(&job, "Warning", "InvalidSpec").await;
        status
    })
    .await;
    first.expect("first reconcile succeeds");

    let job = job.with_status(written);
    let (again, ()) = reconcile_against(&job, &ctx, api.no_further_requests()).await;

    assert_eq!(again.expect("second reconcile succeeds"), Action::await_change());
}

#[tokio::test]
async fn a_job_still_waiting_for_its_configmap_only_looks_it_up_again() {
    let (ctx, mut api, _dir) = testbed();
    let job = job("still-waiting", WASM_FROM_CONFIGMAP).finalized();
    let (first, written) = reconcile_against(&job, &ctx, async {
        api.configmap_not_found("hello-module").await;
        let status = api.status_applied(&job).await;
        api.event_created(&job, "Warning", "ModuleUnavailable").await;
        status
    })
    .await;
    first.expect("first reconcile succeeds");

    let job = job.with_status(written);
    let (again, ()) = reconcile_against(&job, &ctx, async {
        api.configmap_not_found("hello-module").await;
        api.no_further_requests().await;
    })
    .await;

    assert_eq!(again.expect("second reconcile succeeds"), Action::requeue(Duration::from_secs(30)));
}

#[tokio::test]
async fn a_deleted_job_releases_its_finalizer_without_touching_status() {
    let (ctx, mut api, _dir) = testbed();
    let job = job("gone", EXEC).finalized().deleted();

    let (action, ()) = reconcile_against(&job, &ctx, api.finalizer_removed(&job)).await;

    assert_eq!(action.expect("cleanup succeeds"), Action::await_change());
    api.no_further_requests().await;
}

/// Task 0's first attempt of job `name` (uid `uid`), running on node-a.
fn running_attempt(uid: &str, name: &str) -> Attempt {
    Attempt {
        id: attempt_id(uid, 0, 1),
        job_uid: uid.to_string(),
        job_key: format!("{NS}/{name}"),
        index: 0,
        number: 1,
        replica: 0,
        node: "node-a".into(),
        phase: AttemptPhase::Running,
        cpu_millis: 250,
        memory_bytes: 128 << 20,
        held: None,
        created_ms: now_ms(),
        finished_ms: None,
        result: None,
    }
}

#[tokio::test]
async fn a_deleted_job_cancels_its_running_attempts_before_releasing_the_finalizer() {
    let (ctx, mut api, _dir) = testbed();
    let job = job("busy", EXEC).finalized().deleted();
    let uid = job.uid().expect("fixture has a uid");
    let running = running_attempt(&uid, "busy");
    ctx.dispatcher.store().insert_attempts(&[running]).await.expect("attempt recorded");

    let (action, event) = reconcile_against(&job, &ctx, async {
        let event = api.event_created(&job, "Normal", "Cancelled").await;
        api.finalizer_removed(&job).await;
        event
    })
    .await;

    assert_eq!(action.expect("cleanup succeeds"), Action::await_change());
    assert_eq!(event.note.as_deref(), Some("cancelled 1 running attempt(s) of the deleted job"));
    let attempts = ctx.dispatcher.store().attempts_for_job(&uid).await.expect("store reads");
    assert_eq!(attempts.iter().map(|a| a.phase).collect::<Vec<_>>(), vec![AttemptPhase::Cancelled]);
    api.no_further_requests().await;
}

#[tokio::test]
async fn a_deleted_job_without_the_finalizer_is_left_alone() {
    let (ctx, mut api, _dir) = testbed();
    let job = job("released", EXEC).deleted();

    let (action, ()) = reconcile_against(&job, &ctx, api.no_further_requests()).await;

    assert_eq!(action.expect("nothing to do"), Action::await_change());
}

#[tokio::test]
async fn a_failing_reconcile_is_told_to_the_jobs_owner_with_a_warning_event() {
    let (ctx, mut api, _dir) = testbed();
    let job = job("unlucky", EXEC).finalized();
    let error = Error::MissingMetadata("unlucky".into());

    let action = error_policy(Arc::new(job.clone()), &error, ctx.clone());
    let event = timeout(Duration::from_secs(5), api.event_created(&job, "Warning", "ReconcileError")).await.expect("an Event");

    assert_eq!(action, Action::requeue(Duration::from_secs(15)));
    assert!(event.note.as_deref().is_some_and(|n| n.contains("could not reconcile") && n.contains("unlucky")), "{event:?}");
}

/// A failure is counted under the step that failed: a refused status write is a `status_patch`
/// error, not a `finalizer` one (kube's finalizer helper wraps every step's error).
#[tokio::test]
async fn a_refused_status_write_is_counted_as_a_status_patch_failure() {
    let (ctx, mut api, _dir) = testbed();
    let job = job("refused", EXEC).finalized();

    let (result, ()) = reconcile_against(&job, &ctx, api.status_refused(&job)).await;
    let error = result.expect_err("a refused status write fails the reconcile");
    assert_eq!(error.label(), "status_patch", "{error}");

    error_policy(Arc::new(job.clone()), &error, ctx.clone());
    let event = api.event_created(&job, "Warning", "ReconcileError").await;
    assert!(event.note.as_deref().is_some_and(|n| n.contains("(status_patch)") && n.contains("forbidden")), "{event:?}");
    let metrics = ctx.metrics.render(&Fleet::default());
    assert!(metrics.contains("kommune_reconcile_errors_total{error=\"status_patch\"} 1\n"), "{metrics}");
    assert!(!metrics.contains("error=\"finalizer\""), "{metrics}");
}

/// The spec is editable: once fixed (a new generation), a job that failed validation is no
/// longer Failed, whether it now waits for nodes or for its module's ConfigMap.
#[tokio::test]
async fn a_fixed_spec_clears_the_failed_condition() {
    for fixed_spec in [EXEC, WASM_FROM_CONFIGMAP] {
        let (ctx, mut api, _dir) = testbed();
        let broken = job("repaired", "workload: {}\n").finalized();
        let (first, failed) = reconcile_against(&broken, &ctx, async {
            let status = api.status_applied(&broken).await;
            api.event_created(&broken, "Warning", "InvalidSpec").await;
            status
        })
        .await;
        first.expect("first reconcile succeeds");

        let mut fixed = job("repaired", fixed_spec).finalized().with_status(failed);
        fixed.metadata.generation = Some(2);
        let (again, status) = reconcile_against(&fixed, &ctx, async {
            if fixed_spec == WASM_FROM_CONFIGMAP {
                api.configmap_not_found("hello-module").await;
            }
            let status = api.status_applied(&fixed).await;
            let reason = if fixed_spec == EXEC { "Unschedulable" } else { "ModuleUnavailable" };
            api.event_created(&fixed, "Warning", reason).await;
            status
        })
        .await;
        again.expect("second reconcile succeeds");

        assert_eq!(status.phase, Some(JobPhase::Pending), "{fixed_spec}");
        assert_eq!(condition(&status, "Valid").status, "True", "{fixed_spec}");
        assert!(
            status.conditions.iter().all(|c| c.type_ != "Failed" || c.status != "True"),
            "{fixed_spec}: the Failed condition of generation 1 survived the fix: {:#?}",
            status.conditions
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Module blobs

/// Blob files in the testbed's blob directory.
fn stored_blobs(dir: &tempfile::TempDir) -> usize {
    std::fs::read_dir(dir.path().join("blobs")).unwrap().filter(|e| e.as_ref().unwrap().file_name().len() == 64).count()
}

/// A namespace user puts a module larger than the namespace's blob quota in the job's
/// ConfigMap. Nothing is stored; the job waits and says why (BlobQuotaExceeded).
#[tokio::test]
async fn a_module_over_the_namespace_blob_quota_is_not_stored_and_the_job_says_why() {
    let limits = BlobLimits { quota_bytes: 1000, ..BlobLimits::default() };
    let (ctx, mut api, dir) = testbed_with(kommune_operator::fence::Fence::open(), limits);
    let job = job("greedy", WASM_FROM_CONFIGMAP).finalized();

    let (action, (status, event)) = reconcile_against(&job, &ctx, async {
        api.configmap_found("hello-module", &[7; 2000]).await;
        let status = api.status_applied(&job).await;
        let event = api.event_created(&job, "Warning", "BlobQuotaExceeded").await;
        (status, event)
    })
    .await;

    assert_eq!(action.expect("a refused module is not a reconcile error"), Action::requeue(Duration::from_secs(30)));
    assert_eq!(status.phase, Some(JobPhase::Pending));
    let scheduled = condition(&status, "Scheduled");
    println!("{}", scheduled.message);
    assert_eq!((scheduled.status.as_str(), scheduled.reason.as_str()), ("False", "BlobQuotaExceeded"));
    assert!(scheduled.message.contains("namespace default") && scheduled.message.contains("quota of 1000 bytes"), "{}", scheduled.message);
    assert_eq!(event.note.as_deref(), Some(scheduled.message.as_str()));
    assert_eq!(stored_blobs(&dir), 0, "the module was not stored");
    api.no_further_requests().await;
}

/// A wasm job whose only task succeeded: its module is let go of without its ConfigMap being
/// read, and the sweep deletes it once the grace has passed. A deleted job's module goes too.
#[tokio::test]
async fn a_job_that_ended_or_was_deleted_lets_go_of_its_module() {
    let (ctx, mut api, dir) = testbed();
    let ended = job("ended", WASM_FROM_CONFIGMAP).finalized();
    let uid = ended.uid().unwrap();
    let sha = ctx.blobs.put_for(BlobOwner { job_uid: &uid, namespace: NS }, b"ended module").unwrap();
    let done = running_attempt(&uid, "ended");
    ctx.dispatcher.store().insert_attempts(std::slice::from_ref(&done)).await.unwrap();
    let ok = kommune_operator::attempt::AttemptResult { exit_code: 0, ..Default::default() };
    ctx.dispatcher.store().finish(&done.id, AttemptPhase::Succeeded, Some(&ok), now_ms()).await.unwrap();

    let (action, status) = reconcile_against(&ended, &ctx, async {
        let status = api.status_applied(&ended).await;
        // Whatever Events the ending deserves; never a GET of the ConfigMap.
        while let Ok(Some((request, send))) = timeout(QUIET, api.0.next_request()).await {
            assert_eq!((request.method(), request.uri().path()), (&Method::POST, EVENTS), "only Events after the status");
            send.send_response(Response::builder().status(StatusCode::CREATED).body(Body::from(b"{}".to_vec())).unwrap());
        }
        status
    })
    .await;
    assert_eq!(action.expect("reconcile succeeds"), Action::await_change());
    assert_eq!(status.phase, Some(JobPhase::Succeeded));

    let deleted = job("deleted", WASM_FROM_CONFIGMAP).finalized().deleted();
    let other = ctx.blobs.put_for(BlobOwner { job_uid: &deleted.uid().unwrap(), namespace: NS }, b"deleted module").unwrap();
    let (action, ()) = reconcile_against(&deleted, &ctx, api.finalizer_removed(&deleted)).await;
    action.expect("cleanup succeeds");

    assert_eq!(stored_blobs(&dir), 2, "kept for the grace");
    let swept = ctx.blobs.sweep_at(now_ms() + ctx.blobs.limits().grace.as_millis() as i64 + 1).unwrap();
    assert_eq!(swept.deleted, 2);
    assert_eq!((ctx.blobs.get(&sha).unwrap(), ctx.blobs.get(&other).unwrap()), (None, None));
}

/// The measured bug: an operator restarted on an empty data directory moved a Succeeded 4/4
/// job back to `Pending 0/4` (and would have run it again). The status is the record of what
/// is done: the job's status stays as it was, nothing is written and nothing is placed.
#[tokio::test]
async fn a_succeeded_job_stays_succeeded_when_the_operator_starts_on_an_empty_store() {
    let (ctx, mut api, _dir) = testbed();
    let job = job("finished", &format!("{EXEC}tasks: 4\n")).finalized();
    let uid = job.uid().expect("fixture has a uid");
    let store = ctx.dispatcher.store();
    for index in 0..4 {
        let a = Attempt { id: attempt_id(&uid, index, 1), index, ..running_attempt(&uid, "finished") };
        store.insert_attempts(std::slice::from_ref(&a)).await.expect("attempt recorded");
        let ok = kommune_operator::attempt::AttemptResult { exit_code: 0, ..Default::default() };
        store.finish(&a.id, AttemptPhase::Succeeded, Some(&ok), now_ms()).await.expect("finished");
    }
    let (first, written) = reconcile_against(&job, &ctx, async {
        let status = api.status_applied(&job).await;
        api.event_created(&job, "Normal", "AllTasksSucceeded").await;
        status
    })
    .await;
    assert_eq!(first.expect("reconcile succeeds"), Action::await_change());
    assert_eq!((written.phase, written.progress.as_deref(), written.completed_indexes.as_deref()), (Some(JobPhase::Succeeded), Some("4/4"), Some("0-3")));

    // A new operator on an empty data directory.
    let (ctx, mut api, _empty) = testbed();
    let job = job.with_status(written);
    let (again, ()) = reconcile_against(&job, &ctx, api.no_further_requests()).await;
    assert_eq!(again.expect("reconcile succeeds"), Action::await_change());
    assert!(ctx.dispatcher.store().attempts_for_job(&uid).await.expect("store reads").is_empty(), "nothing placed again");
}
