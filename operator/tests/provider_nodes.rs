//! The ProviderNode writer without a cluster: a `tower_test` mock plays the API server and
//! asserts every request, so a merge patch, a redundant write or a missing Event fails.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kommune_operator::controller::MANAGER;
use kommune_operator::controller::budget::Merge;
use kommune_operator::controller::nodes::{NodeUpdate, NodeWriter};
use kommune_operator::crd::{NodePhase, ProviderNode, ProviderNodeSpec, ProviderNodeStatus, limits_spec};
use kommune_operator::dispatch::Dispatcher;
use kommune_operator::fence::Fence;
use kommune_operator::fleet::{Fleet, NodeFacts};
use kommune_operator::gateway::NodeEvent;
use kommune_operator::scheduler::Resources;
use kommune_operator::store::{CapacityLimits, NodeGrant, Store};
use kube::client::Body;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tower_test::mock;

mod support;
use support::{ApiHandle, Call, next_call};

const NODES: &str = "/apis/kommune.dev/v1alpha1/providernodes";
/// Events about cluster-scoped objects go to `default`, as kube-runtime's recorder does.
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
/// Every status write: server-side apply, forced, under the operator's field manager.
const STATUS_APPLY_QUERY: &str = "&force=true&fieldManager=kommune-operator";
const STEP: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);
const GRACE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Fixtures

fn facts() -> NodeFacts {
    NodeFacts {
        capacity: Resources { cpu_millis: 4000, memory_bytes: 8 << 30, ephemeral_bytes: 0 },
        gpus: vec![],
        runtimes: vec!["wasm".into()],
        arch: "x86_64".into(),
        os: "linux".into(),
        region: "eu-west".into(),
        zone: String::new(),
        agent_version: "0.1.0".into(),
    }
}

/// A ProviderNode as the API server hands it out, with the status a row of a test gives it.
fn provider_node(name: &str, status: Option<ProviderNodeStatus>) -> ProviderNode {
    let mut n = ProviderNode::new(name, ProviderNodeSpec::default());
    n.metadata.uid = Some(format!("uid-{name}"));
    n.metadata.resource_version = Some("1".into());
    n.status = status;
    n
}

/// The status an earlier leader wrote for a node with a session: Ready.
fn ready_status() -> ProviderNodeStatus {
    serde_json::from_value(json!({
        "phase": "Ready",
        "conditions": [{ "type": "Ready", "status": "True", "reason": "SessionOpen", "message": "the agent's session is open",
                         "lastTransitionTime": "2026-01-01T00:00:00Z" }],
        "capacity": { "cpu": "4", "memory": "8Gi", "runtimes": ["wasm"], "arch": "x86_64", "os": "linux" },
        "publicKeySha256": "k",
    }))
    .expect("fixture status parses")
}

/// The same node after its session closed.
fn not_ready_status() -> ProviderNodeStatus {
    let mut s = ready_status();
    s.phase = Some(NodePhase::NotReady);
    let c = &mut s.conditions[0];
    (c.status, c.reason, c.message) = ("False".into(), "SessionClosed".into(), "no message for 15s".into());
    s
}

/// The writer over a real dispatcher and store, a reflector cache the test fills, and the
/// scripted API server.
struct Testbed {
    writer: NodeWriter,
    cache: Writer<ProviderNode>,
    dispatcher: Arc<Dispatcher>,
    api: ApiServer,
    _dir: tempfile::TempDir,
}

fn testbed() -> Testbed {
    testbed_fenced(Fence::open())
}

fn testbed_fenced(fence: Fence) -> Testbed {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(Store::open(dir.path()).expect("store opens"));
    let (changed, _) = mpsc::channel(16);
    let dispatcher = Arc::new(Dispatcher::new(store, Arc::new(Fleet::default()), changed).with_fence(fence));
    let (reader, cache) = reflector::store();
    let writer = NodeWriter::new(client, dispatcher.clone(), reader);
    Testbed { writer, cache, dispatcher, api: ApiServer(handle), _dir: dir }
}

impl Testbed {
    /// The watch delivers `node`: the reflector caches it and the writer takes note.
    fn watch_delivers(&mut self, node: &ProviderNode) {
        let ev = watcher::Event::Apply(node.clone());
        self.cache.apply_watcher_event(&ev);
        self.writer.observe(&ev);
    }

    fn watch_deletes(&mut self, node: &ProviderNode) {
        let ev = watcher::Event::Delete(node.clone());
        self.cache.apply_watcher_event(&ev);
        self.writer.observe(&ev);
    }

    /// Handles one gateway event while `script` plays the API server.
    async fn on_event<T>(&mut self, event: NodeEvent, script: impl AsyncFnOnce(&mut ApiServer) -> T) -> T {
        let (result, out) =
            timeout(STEP * 2, async { tokio::join!(self.writer.on_event(&event), script(&mut self.api)) }).await.expect("the write did not finish");
        result.expect("the write succeeds");
        out
    }

    /// Writes one node's folded update while `script` plays the API server.
    async fn write<T>(&mut self, node: &str, update: NodeUpdate, script: impl AsyncFnOnce(&mut ApiServer) -> T) -> T {
        let (result, out) =
            timeout(STEP * 2, async { tokio::join!(self.writer.write(node, &update), script(&mut self.api)) }).await.expect("the write did not finish");
        result.expect("the write succeeds");
        out
    }

    /// Runs one sweep while `script` plays the API server.
    async fn sweep<T>(&mut self, script: impl AsyncFnOnce(&mut ApiServer) -> T) -> T {
        let (result, out) = timeout(STEP * 2, async { tokio::join!(self.writer.sweep(GRACE), script(&mut self.api)) }).await.expect("the sweep did not finish");
        result.expect("the sweep succeeds");
        out
    }
}

// ---------------------------------------------------------------------------------------------
// The scripted API server

struct ApiServer(ApiHandle);

impl ApiServer {
    async fn next(&mut self, expected: &str) -> Call {
        next_call(&mut self.0, STEP, expected).await
    }

    /// One forced server-side apply of the node's `/status`, never a merge patch. Replies with
    /// the node carrying the applied status (resourceVersion moved on) and returns that node.
    async fn status_applied(&mut self, node: &ProviderNode) -> ProviderNode {
        let name = node.metadata.name.as_deref().expect("fixture has a name");
        let call = self.next("the status apply PATCH").await;
        call.is(Method::PATCH, &format!("{NODES}/{name}/status"), STATUS_APPLY_QUERY);
        assert!(call.query.contains(&format!("fieldManager={MANAGER}")));
        assert_eq!(call.content_type, "application/apply-patch+yaml");
        assert_eq!((&call.body["apiVersion"], &call.body["kind"]), (&json!("kommune.dev/v1alpha1"), &json!("ProviderNode")));
        assert_eq!(call.body.as_object().map(|o| o.len()), Some(3), "only apiVersion, kind and status are applied: {}", call.body);
        let status: ProviderNodeStatus = serde_json::from_value(call.body["status"].clone()).expect("the patch carries a ProviderNodeStatus");
        let mut written = node.clone();
        written.status = Some(status);
        let rv: u64 = node.metadata.resource_version.as_deref().unwrap_or("1").parse().expect("numeric fixture resourceVersion");
        written.metadata.resource_version = Some((rv + 1).to_string());
        call.reply(StatusCode::OK, &written);
        written
    }

    /// A new Event about the node. Returns it.
    async fn event_created(&mut self, node: &ProviderNode, type_: &str, reason: &str) -> K8sEvent {
        let call = self.next(&format!("the POST of a {type_} {reason} Event")).await;
        call.is(Method::POST, EVENTS, "");
        let event: K8sEvent = serde_json::from_value(call.body.clone()).expect("an events.k8s.io/v1 Event");
        assert_eq!((event.type_.as_deref(), event.reason.as_deref()), (Some(type_), Some(reason)), "{event:#?}");
        assert_eq!(event.reporting_controller.as_deref(), Some(MANAGER));
        let regarding = event.regarding.clone().expect("the Event names its node");
        assert_eq!(
            (regarding.kind.as_deref(), regarding.name.as_deref(), regarding.uid.as_deref()),
            (Some("ProviderNode"), node.metadata.name.as_deref(), node.metadata.uid.as_deref())
        );
        call.reply(StatusCode::CREATED, &event);
        event
    }

    fn not_found(call: Call, name: &str) {
        call.reply(
            StatusCode::NOT_FOUND,
            &json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "NotFound",
                     "message": format!("providernodes.kommune.dev \"{name}\" not found"), "details": { "name": name }, "code": 404 }),
        );
    }

    async fn no_further_requests(&mut self) {
        if let Ok(Some((request, _))) = timeout(QUIET, self.0.next_request()).await {
            panic!("unexpected request: {} {}", request.method(), request.uri());
        }
    }
}

fn ready(status: &ProviderNodeStatus) -> (&str, &str, &str) {
    let c = status.conditions.iter().find(|c| c.type_ == "Ready").expect("a Ready condition");
    (c.status.as_str(), c.reason.as_str(), c.message.as_str())
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// API servers before 1.22 refuse an events.k8s.io Event about a cluster-scoped object in
/// `default` (the envtest 1.20 one answers exactly this). The writer then records it as a core
/// Event in `default` without an eventTime, which they accept, folds a repeat into it with a
/// count, and goes to the core API directly from then on.
#[tokio::test]
async fn an_api_server_refusing_cluster_scoped_events_gets_core_events_in_default() {
    const CORE_EVENTS: &str = "/api/v1/namespaces/default/events";
    let mut t = testbed();
    let node = provider_node("n", Some(ready_status()));
    t.watch_delivers(&node);
    let closed = |why: &str| NodeEvent::Disconnected { node: "n".into(), reason: why.into() };
    let written = t
        .on_event(closed("no message for 15s"), async |api| {
            let written = api.status_applied(&node).await;
            let call = api.next("the events.k8s.io POST").await;
            call.is(Method::POST, EVENTS, "");
            call.reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                &json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Invalid", "code": 422,
                    "message": "Event.events.k8s.io \"n.1\" is invalid: involvedObject.namespace: Invalid value: \"\": does not match event.namespace",
                }),
            );
            let call = api.next("the core Event POST").await;
            call.is(Method::POST, CORE_EVENTS, "");
            let event: k8s_openapi::api::core::v1::Event = serde_json::from_value(call.body.clone()).expect("a core/v1 Event");
            assert_eq!(event.metadata.namespace.as_deref(), Some("default"));
            assert_eq!(event.event_time, None, "the old validation accepts `default` only without an eventTime");
            assert_eq!((event.type_.as_deref(), event.reason.as_deref(), event.count), (Some("Warning"), Some("SessionClosed"), Some(1)));
            assert_eq!((event.involved_object.kind.as_deref(), event.involved_object.name.as_deref()), (Some("ProviderNode"), Some("n")));
            call.reply(StatusCode::CREATED, &event);
            api.no_further_requests().await;
            written
        })
        .await;
    t.watch_delivers(&written);

    // The node comes back and goes again with the same reason: the status is written twice,
    // and the second SessionClosed is a count on the first Event, straight through the core API.
    let open = t
        .on_event(NodeEvent::Connected { node: "n".into(), facts: facts() }, async |api| {
            let open = api.status_applied(&written).await;
            let call = api.next("the core SessionOpen Event").await;
            call.is(Method::POST, CORE_EVENTS, "");
            let body = call.body.clone();
            call.reply(StatusCode::CREATED, &body);
            open
        })
        .await;
    t.watch_delivers(&open);
    t.on_event(closed("no message for 15s"), async |api| {
        api.status_applied(&open).await;
        let call = api.next("the count PATCH").await;
        assert_eq!(call.method, Method::PATCH);
        assert!(call.path.starts_with(&format!("{CORE_EVENTS}/n.")), "{}", call.path);
        assert_eq!(call.body["count"], json!(2));
        let body = call.body.clone();
        call.reply(StatusCode::OK, &body);
        api.no_further_requests().await;
    })
    .await;
}

#[tokio::test]
async fn a_connecting_node_is_one_status_apply_and_one_event() {
    let mut t = testbed();
    let node = provider_node("n", Some(not_ready_status()));
    t.watch_delivers(&node);

    let (written, event) = t
        .on_event(NodeEvent::Connected { node: "n".into(), facts: facts() }, async |api| {
            let written = api.status_applied(&node).await;
            let event = api.event_created(&node, "Normal", "SessionOpen").await;
            api.no_further_requests().await;
            (written, event)
        })
        .await;

    let status = written.status.expect("status applied");
    assert_eq!(status.phase, Some(NodePhase::Ready));
    assert_eq!(ready(&status), ("True", "SessionOpen", "the agent's session is open"));
    assert_eq!(status.public_key_sha256.as_deref(), Some("k"), "fields set earlier are applied again, or the apply would drop them");
    assert!(status.last_heartbeat_time.is_some());
    assert_eq!(status.allocated.as_ref().map(|a| (a.cpu.as_str(), a.memory.as_str())), Some(("0", "0")));
    assert_eq!(event.note.as_deref(), Some("the agent's session is open"));
}

#[tokio::test]
async fn a_heartbeat_right_after_a_write_sends_nothing() {
    let mut t = testbed();
    let node = provider_node("n", Some(ready_status()));
    t.watch_delivers(&node);
    t.on_event(NodeEvent::Heartbeat { node: "n".into() }, async |api| {
        // The first heartbeat moves lastHeartbeatTime: one apply, and no Event (no phase change).
        let written = api.status_applied(&node).await;
        assert!(written.status.as_ref().unwrap().last_heartbeat_time.is_some());
        api.no_further_requests().await;
    })
    .await;

    t.on_event(NodeEvent::Heartbeat { node: "n".into() }, ApiServer::no_further_requests).await;
}

#[tokio::test]
async fn the_same_change_twice_is_written_once() {
    let mut t = testbed();
    let node = provider_node("n", Some(ready_status()));
    t.watch_delivers(&node);
    let closed = || NodeEvent::Disconnected { node: "n".into(), reason: "no message for 15s".into() };
    let written = t
        .on_event(closed(), async |api| {
            let written = api.status_applied(&node).await;
            api.event_created(&node, "Warning", "SessionClosed").await;
            written
        })
        .await;
    assert_eq!(ready(written.status.as_ref().unwrap()), ("False", "SessionClosed", "no message for 15s"));

    // Before the watch delivers the write, the writer knows what it wrote...
    t.on_event(closed(), ApiServer::no_further_requests).await;
    // ...and after, the cache shows it.
    t.watch_delivers(&written);
    t.on_event(closed(), ApiServer::no_further_requests).await;
}

/// A new node is one create carrying what its token granted, then one status apply: the
/// admin's spec is never applied (created fields are the admin's to change), and no merge patch.
#[tokio::test]
async fn a_join_creates_the_object_with_its_grant_then_applies_its_status() {
    let mut t = testbed();
    let fresh = provider_node("n", None);
    let limits = CapacityLimits { cpu_millis: Some(2000), ..Default::default() };
    let grant = NodeGrant { owner: "token:t1".into(), limits };
    let written = t
        .on_event(NodeEvent::Joined { node: "n".into(), facts: facts(), public_key_sha256: "abc".into(), grant }, async |api| {
            let call = api.next("the create of the ProviderNode").await;
            call.is(Method::POST, NODES, "&fieldManager=kommune-operator");
            assert_eq!(call.body["metadata"]["labels"], json!({ "app.kubernetes.io/managed-by": MANAGER }));
            assert_eq!(call.body["spec"], json!({ "owner": "token:t1", "capacityLimits": { "cpu": "2" } }), "only what the token granted");
            call.reply(StatusCode::CREATED, &fresh);
            let written = api.status_applied(&fresh).await;
            api.event_created(&fresh, "Normal", "Joined").await;
            api.no_further_requests().await;
            written
        })
        .await;
    let status = written.status.unwrap();
    assert_eq!((status.phase, status.public_key_sha256.as_deref()), (Some(NodePhase::NotReady), Some("abc")));
    assert_eq!(status.capacity.map(|c| c.cpu), Some("4".to_string()));
}

/// A join and the session opening right after it, folded in the writer's queue: one create,
/// one status apply showing the node Ready, one Event. Written one by one they were two
/// applies and two Events.
#[tokio::test]
async fn a_join_and_its_session_folded_together_are_one_create_one_apply_and_one_event() {
    let mut t = testbed();
    let fresh = provider_node("n", None);
    let mut update = NodeUpdate::from(NodeEvent::Joined { node: "n".into(), facts: facts(), public_key_sha256: "abc".into(), grant: Default::default() });
    update.merge(NodeUpdate::from(NodeEvent::Connected { node: "n".into(), facts: facts() }));
    update.merge(NodeUpdate::from(NodeEvent::Heartbeat { node: "n".into() }));
    let written = t
        .write("n", update, async |api| {
            let call = api.next("the create").await;
            call.is(Method::POST, NODES, "&fieldManager=kommune-operator");
            call.reply(StatusCode::CREATED, &fresh);
            let written = api.status_applied(&fresh).await;
            api.event_created(&fresh, "Normal", "SessionOpen").await;
            api.no_further_requests().await;
            written
        })
        .await;
    let status = written.status.unwrap();
    assert_eq!((status.phase, status.public_key_sha256.as_deref()), (Some(NodePhase::Ready), Some("abc")));
    assert_eq!(ready(&status), ("True", "SessionOpen", "the agent's session is open"));
}

/// Heartbeats write nothing until the shown heartbeat time is a refresh old.
#[tokio::test]
async fn heartbeats_of_a_node_shown_recently_write_nothing() {
    let mut t = testbed();
    let mut status = ready_status();
    status.last_heartbeat_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    let node = provider_node("n", Some(status));
    t.watch_delivers(&node);
    for _ in 0..3 {
        t.on_event(NodeEvent::Heartbeat { node: "n".into() }, ApiServer::no_further_requests).await;
    }
}

#[tokio::test]
async fn a_join_copies_its_tokens_owner_and_caps_into_the_spec_where_the_admin_set_none() {
    let mut t = testbed();
    // The admin created the object first and named its owner: that owner stays.
    let mut precreated = provider_node("n", None);
    precreated.spec.owner = Some("alice".into());
    let limits = CapacityLimits { cpu_millis: Some(4000), memory_bytes: Some(8 << 30), ..Default::default() };
    let grant = NodeGrant { owner: "token:t1".into(), limits };
    let mut patched = precreated.clone();
    patched.spec.capacity_limits = limits_spec(&limits);
    t.on_event(NodeEvent::Joined { node: "n".into(), facts: facts(), public_key_sha256: "abc".into(), grant }, async |api| {
        // Not cached yet: the create finds the admin's object, which is then adopted.
        let call = api.next("the create of the ProviderNode").await;
        call.is(Method::POST, NODES, "&fieldManager=kommune-operator");
        call.reply(
            StatusCode::CONFLICT,
            &json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "AlreadyExists",
                     "message": "providernodes.kommune.dev \"n\" already exists", "details": { "name": "n" }, "code": 409 }),
        );
        let call = api.next("the apply adopting the ProviderNode").await;
        call.is(Method::PATCH, &format!("{NODES}/n"), "&fieldManager=kommune-operator");
        assert_eq!(call.body["spec"], json!({}), "the apply never carries spec fields");
        call.reply(StatusCode::OK, &precreated);
        let call = api.next("the merge patch of the unset spec fields").await;
        call.is(Method::PATCH, &format!("{NODES}/n"), "&fieldManager=kommune-operator");
        assert_eq!(call.content_type, "application/merge-patch+json");
        assert_eq!(call.body, json!({ "spec": { "capacityLimits": { "cpu": "4", "memory": "8Gi" } } }), "the admin's owner is not overwritten");
        call.reply(StatusCode::OK, &patched);
        api.status_applied(&patched).await;
        api.event_created(&patched, "Normal", "Joined").await;
        api.no_further_requests().await;
    })
    .await;
}

#[tokio::test]
async fn a_node_the_cache_has_not_seen_is_read_from_the_api_server() {
    let mut t = testbed();
    let node = provider_node("n", Some(not_ready_status()));
    t.on_event(NodeEvent::Connected { node: "n".into(), facts: facts() }, async |api| {
        let call = api.next("the GET of the uncached node").await;
        call.is(Method::GET, &format!("{NODES}/n"), "");
        call.reply(StatusCode::OK, &node);
        api.status_applied(&node).await;
        api.event_created(&node, "Normal", "SessionOpen").await;
        api.no_further_requests().await;
    })
    .await;

    t.on_event(NodeEvent::Heartbeat { node: "other".into() }, async |api| {
        let call = api.next("the GET of a node without an object").await;
        call.is(Method::GET, &format!("{NODES}/other"), "");
        ApiServer::not_found(call, "other");
        api.no_further_requests().await;
    })
    .await;
}

#[tokio::test]
async fn a_sweep_marks_a_node_without_a_session_not_ready_once() {
    let mut t = testbed();
    let node = provider_node("n", Some(ready_status()));
    t.watch_delivers(&node);

    let written = t
        .sweep(async |api| {
            let written = api.status_applied(&node).await;
            let event = api.event_created(&node, "Warning", "NoSession").await;
            assert_eq!(event.note.as_deref(), Some("the agent has no session with this operator"));
            api.no_further_requests().await;
            written
        })
        .await;
    let status = written.status.clone().unwrap();
    assert_eq!((status.phase, ready(&status).1), (Some(NodePhase::NotReady), "NoSession"));
    assert_eq!(status.public_key_sha256.as_deref(), Some("k"));

    t.sweep(ApiServer::no_further_requests).await;
    t.watch_delivers(&written);
    t.sweep(ApiServer::no_further_requests).await;
}

#[tokio::test]
async fn a_sweep_with_nothing_to_change_sends_nothing() {
    let mut t = testbed();
    t.watch_delivers(&provider_node("n", Some(not_ready_status())));
    t.watch_delivers(&provider_node("fresh", None));
    t.sweep(ApiServer::no_further_requests).await;
}

#[tokio::test]
async fn a_deleted_provider_node_revokes_its_node_with_one_event() {
    let mut t = testbed();
    let node = provider_node("n", Some(not_ready_status()));
    t.dispatcher.store().register_node("n", "k", &Default::default(), 0).await.expect("node registered");
    t.watch_delivers(&node);
    t.sweep(ApiServer::no_further_requests).await;

    t.watch_deletes(&node);
    let event = t
        .sweep(async |api| {
            let event = api.event_created(&node, "Warning", "Revoked").await;
            api.no_further_requests().await;
            event
        })
        .await;
    assert!(event.note.as_deref().is_some_and(|n| n.contains("deleted")), "{event:?}");
    assert_eq!(t.dispatcher.store().node_key("n").await.expect("store reads"), None, "the registration is removed");
    t.sweep(ApiServer::no_further_requests).await;
}

/// `spec.drain`: the attempts running on the node are stopped (placed elsewhere), and the node
/// gets one Normal `Drained` Event saying how many; a second sweep has nothing left to drain
/// and tells nothing.
#[tokio::test]
async fn a_drained_provider_node_stops_its_attempts_with_one_event() {
    use kommune_operator::attempt::{Attempt, AttemptPhase};
    let mut t = testbed();
    // NotReady: the testbed's fleet holds no session, and a Ready node without one would be
    // marked NotReady by the sweep as well (another Event, not the one under test).
    let mut node = provider_node("n", Some(not_ready_status()));
    node.spec.drain = true;
    let running = |i: u32| Attempt {
        id: format!("u.{i}.1"),
        job_uid: "u".into(),
        job_key: "ns/j".into(),
        index: i,
        number: 1,
        replica: 0,
        node: "n".into(),
        phase: AttemptPhase::Running,
        cpu_millis: 100,
        memory_bytes: 1,
        held: None,
        created_ms: 1,
        finished_ms: None,
        result: None,
    };
    t.dispatcher.store().insert_attempts(&[running(0), running(1)]).await.expect("attempts stored");
    t.watch_delivers(&node);
    let drained = t
        .sweep(async |api| {
            let drained = api.event_created(&node, "Normal", "Drained").await;
            api.no_further_requests().await;
            drained
        })
        .await;
    assert_eq!(drained.note.as_deref(), Some("spec.drain: stopped 2 running attempt(s); they are placed elsewhere without using a retry"), "{drained:?}");
    assert!(t.dispatcher.store().active_on_node("n").await.expect("store reads").is_empty(), "nothing runs on a drained node");
    t.sweep(ApiServer::no_further_requests).await;
}

#[tokio::test]
async fn a_node_that_left_is_deleted_and_not_revoked() {
    let mut t = testbed();
    let node = provider_node("n", Some(ready_status()));
    t.watch_delivers(&node);
    t.sweep(async |api| {
        api.status_applied(&node).await;
        api.event_created(&node, "Warning", "NoSession").await;
    })
    .await;

    t.on_event(NodeEvent::Left { node: "n".into() }, async |api| {
        let call = api.next("the DELETE of the node that left").await;
        call.is(Method::DELETE, &format!("{NODES}/n"), "");
        call.reply(StatusCode::OK, &node);
        api.no_further_requests().await;
    })
    .await;
    t.watch_deletes(&node);
    t.sweep(ApiServer::no_further_requests).await;
}

#[tokio::test]
async fn a_replica_that_is_not_the_leader_sends_nothing() {
    let fence = Fence::closed();
    let mut t = testbed_fenced(fence);
    t.watch_delivers(&provider_node("n", Some(ready_status())));

    let connected = NodeEvent::Connected { node: "n".into(), facts: facts() };
    let (event, ()) = tokio::join!(t.writer.on_event(&connected), t.api.no_further_requests());
    assert!(event.expect_err("a fenced write fails").to_string().contains("not the leader"));
    let (sweep, ()) = tokio::join!(t.writer.sweep(GRACE), t.api.no_further_requests());
    assert!(sweep.is_err(), "a fenced sweep fails");
}

/// The writer's loop (`nodes::run`, as the operator runs it) against an API server that fails:
/// a join whose create gets a 500, and whose status apply is then never answered, is tried
/// again until the node shows Ready. Before, one failed request lost the join and the session
/// opening for good: the node stayed without an object, or NotReady, until it reconnected.
#[tokio::test]
async fn a_failed_or_unanswered_write_is_tried_again_until_the_node_shows_ready() {
    use kommune_operator::controller::budget::ApiBudget;
    use kommune_operator::controller::nodes::{self, WriterConfig};

    let (service, mut api) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(Store::open(dir.path()).expect("store opens"));
    let (changed, _) = mpsc::channel(16);
    let dispatcher = Arc::new(Dispatcher::new(store, Arc::new(Fleet::default()), changed));
    let (events, events_rx) = mpsc::channel(16);
    let (capacity, _capacity_rx) = mpsc::channel(1);
    let config = WriterConfig { write_timeout: Duration::from_millis(300), ..Default::default() };
    let run = tokio::spawn(nodes::run(client, dispatcher.clone(), events_rx, capacity, Arc::new(ApiBudget::unlimited()), config));
    events.send(NodeEvent::Joined { node: "n".into(), facts: facts(), public_key_sha256: "abc".into(), grant: Default::default() }).await.unwrap();
    events.send(NodeEvent::Connected { node: "n".into(), facts: facts() }).await.unwrap();

    let fresh = provider_node("n", None);
    let (mut creates, mut adopts, mut applies) = (0, 0, 0);
    // Answers kept, never sent: the watch that stays open, and the status apply left unanswered.
    let mut held = Vec::new();
    let shown = loop {
        let call = next_call(&mut api, STEP * 4, "the writer's next request").await;
        match (call.method.clone(), call.path.clone()) {
            (Method::GET, p) if p == NODES && call.query.contains("watch=true") => held.push(call.respond),
            (Method::GET, p) if p == NODES => call.reply(
                StatusCode::OK,
                &json!({ "apiVersion": "kommune.dev/v1alpha1", "kind": "ProviderNodeList", "metadata": { "resourceVersion": "1" }, "items": [] }),
            ),
            (Method::POST, p) if p == NODES => {
                creates += 1;
                if creates == 1 {
                    let status = json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "InternalError",
                                         "message": "etcdserver: request timed out", "code": 500 });
                    call.reply(StatusCode::INTERNAL_SERVER_ERROR, &status);
                } else {
                    call.reply(StatusCode::CREATED, &fresh);
                }
            }
            // The retried write finds the object it created and adopts it (an apply of the label).
            (Method::PATCH, p) if p == format!("{NODES}/n") => {
                adopts += 1;
                call.reply(StatusCode::OK, &fresh);
            }
            (Method::PATCH, p) if p == format!("{NODES}/n/status") => {
                applies += 1;
                if applies == 1 {
                    held.push(call.respond);
                } else {
                    let status: ProviderNodeStatus = serde_json::from_value(call.body["status"].clone()).expect("a ProviderNodeStatus");
                    let mut written = fresh.clone();
                    written.status = Some(status.clone());
                    call.reply(StatusCode::OK, &written);
                    break status;
                }
            }
            (Method::POST, p) if p == EVENTS => {
                let body = call.body.clone();
                call.reply(StatusCode::CREATED, &body);
            }
            (m, p) => panic!("unexpected request: {m} {p}?{}", call.query),
        }
    };
    assert_eq!(shown.phase, Some(NodePhase::Ready), "the session opening was not lost: {shown:#?}");
    assert_eq!(shown.public_key_sha256.as_deref(), Some("abc"), "nor the join");
    assert_eq!((creates, adopts, applies), (2, 1, 2));
    let exposition = dispatcher.metrics().render(&Fleet::default());
    assert!(exposition.contains("kommune_provider_node_writes_total{outcome=\"retried\"} 2"), "{exposition}");
    run.abort();
    drop(held);
}
