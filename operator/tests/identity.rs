//! Identity through the real gateway over loopback mTLS: a used node name is never given to
//! another key, machines joined with one token are one owner for replica placement, and what
//! an agent claims is capped by its token.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kommune_agent::join::{self, JoinOptions};
use kommune_agent::state::AgentState;
use kommune_operator::blobs::Blobs;
use kommune_operator::crd::ComputeJobSpec;
use kommune_operator::dispatch::{Dispatcher, JobRef, ModuleRef};
use kommune_operator::fleet::{Fleet, NodeAdmin};
use kommune_operator::gateway::{Gateway, GatewayConfig};
use kommune_operator::job::{JobPolicy, validate};
use kommune_operator::pki::Ca;
use kommune_operator::scheduler::REGION_LABEL;
use kommune_operator::store::{CapacityLimits, Store};
use kommune_operator::tokens::MemoryTokens;
use kommune_proto::token::JoinToken;
use kommune_proto::v1::{Capacity, NodeFacts};
use tokio::sync::mpsc;

struct Operator {
    url: String,
    ca: Arc<Ca>,
    tokens: Arc<MemoryTokens>,
    dispatcher: Arc<Dispatcher>,
    _dir: tempfile::TempDir,
}

async fn operator() -> Operator {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(Ca::generate().unwrap());
    let tokens = Arc::new(MemoryTokens::default());
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let (changed, _) = mpsc::channel(1024);
    let dispatcher = Arc::new(Dispatcher::new(store, Arc::new(Fleet::default()), changed));
    let (events, mut sink) = mpsc::channel(1024);
    tokio::spawn(async move { while sink.recv().await.is_some() {} });
    let config = GatewayConfig { heartbeat_interval: Duration::from_millis(200), session_timeout: Duration::from_secs(2), ..GatewayConfig::default() };
    let gateway = Gateway::new(dispatcher.clone(), tokens.clone(), ca.clone(), Blobs::open(dir.path()).unwrap(), events, config);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    tokio::spawn(gateway.serve(listener, std::future::pending()));
    Operator { url, ca, tokens, dispatcher, _dir: dir }
}

impl Operator {
    /// A token for `uses` joins, owned by `owner` (None: the token itself), capped at `limits`.
    fn token(&self, uses: u32, owner: Option<&str>, limits: CapacityLimits) -> String {
        let t = JoinToken::generate(&self.ca.pin());
        self.tokens.insert_owned(&t, Timestamp::now() + SignedDuration::from_secs(600), uses, owner, limits);
        t.to_string()
    }

    async fn join(&self, dir: &Path, token: &str, name: &str, facts: NodeFacts) -> Result<AgentState, String> {
        let opts = JoinOptions { server: &self.url, token, name: Some(name), region: "", zone: "", state_dir: &dir.join(name), force: true, facts };
        join::join(opts).await.map_err(|e| e.to_string())
    }

    /// Joins and runs the agent's sessions in the background until its node is connected.
    async fn join_and_connect(&self, dir: &Path, token: &str, name: &str, facts: NodeFacts) -> AgentState {
        let state = self.join(dir, token, name, facts.clone()).await.unwrap();
        self.run_agent(&state, facts).await;
        state
    }

    /// Runs a joined agent's sessions in the background until its node is connected.
    async fn run_agent(&self, state: &AgentState, facts: NodeFacts) {
        let (tasks, mut updates) = kommune_agent::tasks::Tasks::new(
            kommune_agent::runtime::WasmRuntime::new().unwrap(),
            kommune_agent::runtime::ExecRuntime::new(true),
            kommune_agent::tasks::Spool::open(state.results_dir()).unwrap(),
            state.scratch_dir(),
        );
        let s = state.clone();
        tokio::spawn(async move { kommune_agent::session::run(&s, &facts, &tasks, &mut updates, std::future::pending()).await });
        self.wait_connected(&state.config.node_name).await;
    }

    async fn wait_connected(&self, name: &str) {
        for _ in 0..400 {
            if self.dispatcher.fleet().is_connected(name) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{name} did not connect");
    }
}

fn facts(cpu_millis: u64, region: &str) -> NodeFacts {
    NodeFacts {
        capacity: Some(Capacity {
            cpu_millis,
            memory_bytes: 2 << 30,
            runtimes: vec!["wasm".into(), "exec".into()],
            arch: "x86_64".into(),
            os: "linux".into(),
            ..Default::default()
        }),
        agent_version: "test".into(),
        region: region.into(),
        zone: String::new(),
    }
}

fn policy(yaml: &str) -> JobPolicy {
    let spec: ComputeJobSpec = serde_yaml::from_str(yaml).unwrap();
    validate(&spec).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_was_used_is_never_given_to_another_key_and_the_refusal_keeps_the_token() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let first = op.join(dir.path(), &op.token(1, None, CapacityLimits::default()), "reused", facts(2000, "")).await.unwrap();

    // Registered: another machine cannot take the name.
    let token = op.token(1, None, CapacityLimits::default());
    let err = op.join(&dir.path().join("thief"), &token, "reused", facts(2000, "")).await.unwrap_err();
    assert!(err.contains("taken by another machine"), "{err}");

    // Left: the name is retired, for every key. Before tombstones the new key got the name and
    // the ledger, keyed by name, merged the two identities' earnings.
    kommune_agent::leave::leave(&first, false).await.unwrap();
    let err = op.join(&dir.path().join("thief"), &token, "reused", facts(2000, "")).await.unwrap_err();
    assert!(err.contains("left the pool") && err.contains("never reused"), "{err}");
    let record = op.dispatcher.store().node("reused").await.unwrap().unwrap();
    assert_eq!(record.public_key_sha256, kommune_operator::pki::public_key_sha256_of(&pem_der(&first.cert_pem)).unwrap(), "the tombstone keeps the first key");

    // Revoked: the same. The refusals used none of the token: it still joins under a new name.
    op.join(&dir.path().join("b"), &op.token(1, None, CapacityLimits::default()), "evicted", facts(2000, "")).await.unwrap();
    op.dispatcher.revoke_node("evicted").await.unwrap();
    let err = op.join(&dir.path().join("thief"), &token, "evicted", facts(2000, "")).await.unwrap_err();
    assert!(err.contains("removed from the pool by an admin"), "{err}");
    op.join(&dir.path().join("thief"), &token, "fresh-name", facts(2000, "")).await.expect("the token was not used up by the refusals");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_machines_joined_with_one_token_cannot_hold_both_copies_of_a_replicated_task() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let shared = op.token(2, None, CapacityLimits::default());
    op.join_and_connect(dir.path(), &shared, "sybil-1", facts(2000, "")).await;
    op.join_and_connect(dir.path(), &shared, "sybil-2", facts(2000, "")).await;
    let owners: Vec<String> = ["sybil-1", "sybil-2"].iter().map(|n| op.dispatcher.fleet().node(n).unwrap().owner).collect();
    assert!(owners[0].starts_with("token:") && owners[0] == owners[1], "{owners:?}");

    let replicated = policy("workload:\n  wasm:\n    configMapRef: {name: m, key: module.wasm}\nplacement: {replicas: 2}\n");
    // Placement only: the module need not exist (the agents' fetch of it fails afterwards).
    let module = ModuleRef { sha256: "0".repeat(64), url: None };
    let job = JobRef { uid: "replicated".into(), key: "default/replicated".into() };
    let synced = op.dispatcher.sync(&job, &replicated, Some(&module)).await.unwrap();
    assert_eq!(synced.placed, 0, "one token is one owner: {:?}", synced.attempts);
    let why = synced.unplaced.expect("the job says why it waits").to_string();
    assert!(why.contains("1 owner(s)"), "{why}");

    // A machine of another owner makes the job placeable: one copy on it, one on a sybil.
    op.join_and_connect(dir.path(), &op.token(1, Some("carol"), CapacityLimits::default()), "carol-pc", facts(2000, "")).await;
    let synced = op.dispatcher.sync(&job, &replicated, Some(&module)).await.unwrap();
    assert_eq!(synced.placed, 2);
    let mut nodes: Vec<&str> = synced.attempts.iter().map(|a| a.node.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes[0], "carol-pc");
    assert!(nodes[1].starts_with("sybil-"), "{nodes:?}");

    // The admin's spec.owner wins over the token's: naming the two sybils apart lets them pair.
    op.dispatcher.fleet().set_admin("sybil-2", NodeAdmin { owner: "dave".into(), ..Default::default() });
    assert_eq!(op.dispatcher.fleet().node("sybil-2").unwrap().owner, "dave");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_an_agent_claims_is_capped_by_its_token_and_the_admins_region_wins() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let capped = op.token(1, None, CapacityLimits { cpu_millis: Some(4000), ..Default::default() });
    op.join_and_connect(dir.path(), &capped, "boaster", facts(1_000_000_000, "eu-west")).await;
    let n = op.dispatcher.fleet().node("boaster").unwrap();
    assert_eq!((n.capacity.cpu_millis, n.capacity.memory_bytes), (4000, 2 << 30), "a million cores are believed up to the token's cap");
    op.join_and_connect(dir.path(), &op.token(1, None, CapacityLimits::default()), "uncapped", facts(1_000_000_000, "")).await;
    assert_eq!(op.dispatcher.fleet().node("uncapped").unwrap().capacity.cpu_millis, 128_000, "no cap: the built-in ceiling");

    assert_eq!(n.labels.get(REGION_LABEL).map(String::as_str), Some("eu-west"), "the agent's region fills in where the admin set none");
    let labels = [(REGION_LABEL.to_string(), "us-east".to_string())].into();
    op.dispatcher.fleet().set_admin("boaster", NodeAdmin { labels, ..Default::default() });
    assert_eq!(op.dispatcher.fleet().node("boaster").unwrap().labels.get(REGION_LABEL).map(String::as_str), Some("us-east"));
}

/// (not before, not after) of a PEM certificate, unix seconds.
fn validity(pem: &str) -> (i64, i64) {
    let der = pem_der(pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    (cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp())
}

fn now_secs() -> i64 {
    kommune_proto::now_ms() / 1000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_renews_its_ageing_certificate_over_its_session_and_reconnects_with_the_new_one() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    // Joined with a certificate that expires in 3 s: well inside the last third of its life.
    op.ca.set_node_validity(Duration::from_secs(3));
    let state = op.join(dir.path(), &op.token(1, None, CapacityLimits::default()), "renewer", facts(2000, "")).await.unwrap();
    op.ca.set_node_validity(Duration::from_secs(90 * 86400));
    let old = state.cert_pem.clone();
    op.run_agent(&state, facts(2000, "")).await;

    let mut renewed = String::new();
    for _ in 0..200 {
        renewed = std::fs::read_to_string(state.dir.join("node.crt")).unwrap();
        if renewed != old {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_ne!(renewed, old, "the agent renewed its certificate at session start");
    assert!(validity(&renewed).1 > now_secs() + 89 * 86400, "the new certificate has the operator's full lifetime");
    let key_of = |pem: &str| kommune_operator::pki::public_key_sha256_of(&pem_der(pem)).unwrap();
    assert_eq!(key_of(&renewed), key_of(&old), "same key: the ledger's key for the node still verifies its receipts");
    assert_eq!(kommune_operator::pki::node_name_of(&pem_der(&renewed)).as_deref(), Some("renewer"));

    // Once the old certificate has expired, the gateway's TLS refuses it: the agent gets back in
    // only with the renewed one.
    while now_secs() <= validity(&old).1 + 1 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(op.dispatcher.fleet().close("renewer", tonic::Status::unavailable("test: reconnect")));
    op.wait_connected("renewer").await;
    assert_eq!(AgentState::load(&state.dir).unwrap().cert_pem, renewed, "a restarted agent also starts with the new certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_for_another_key_or_name_is_refused_and_renewals_are_rate_limited() {
    use kommune_proto::v1::{AgentMessage, Hello, RenewCertificate, agent_message, operator_message};
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let state = op.join(dir.path(), &op.token(1, None, CapacityLimits::default()), "asker", facts(2000, "")).await.unwrap();
    let server = kommune_agent::connect::parse_server(&op.url).unwrap();
    let mut client = kommune_agent::connect::client(&server, &state.ca_pem, Some((&state.cert_pem, &state.key_pem))).await.unwrap();
    let (tx, rx) = mpsc::channel(8);
    tx.send(AgentMessage { kind: Some(agent_message::Kind::Hello(Hello { facts: Some(facts(2000, "")), ..Default::default() })) }).await.unwrap();
    let mut inbound = client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    assert!(matches!(inbound.message().await.unwrap().unwrap().kind, Some(operator_message::Kind::Welcome(_))));
    let mut ask = async |csr_der: Vec<u8>| {
        tx.send(AgentMessage { kind: Some(agent_message::Kind::Renew(RenewCertificate { csr_der })) }).await.unwrap();
        loop {
            if let Some(operator_message::Kind::Certificate(c)) = inbound.message().await.unwrap().unwrap().kind {
                return c;
            }
        }
    };

    let other_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let stolen = ask(kommune_agent::renew::request(&other_key.serialize_pem(), "asker").unwrap()).await;
    assert!(stolen.certificate_pem.is_empty() && stolen.refused.contains("another key"), "{stolen:?}");
    let victim = ask(kommune_agent::renew::request(&state.key_pem, "victim").unwrap()).await;
    assert!(victim.certificate_pem.is_empty() && victim.refused.contains("victim"), "{victim:?}");

    let own = ask(kommune_agent::renew::request(&state.key_pem, "asker").unwrap()).await;
    assert!(own.refused.is_empty(), "{own:?}");
    assert_eq!(kommune_operator::pki::node_name_of(&pem_der(&own.certificate_pem)).as_deref(), Some("asker"));
    let again = ask(kommune_agent::renew::request(&state.key_pem, "asker").unwrap()).await;
    assert!(again.refused.contains("less than 60s ago"), "{again:?}");
}

fn pem_der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(body).unwrap()
}
