//! A hostile agent: joins with the real Join (its own ed25519 key and CSR) and speaks the real
//! session protocol over mTLS, but says whatever a test scripts, and signs it with its node key.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use kommune_agent::join::{self, JoinOptions};
use kommune_agent::state::AgentState;
use kommune_proto::v1::operator_message::Kind;
use kommune_proto::v1::{
    AgentMessage, Assign, AttemptState, Capacity, Heartbeat, Hello, NodeFacts, ReceiptBody, TaskResult, TaskUpdate, Usage, UsageReceipt, agent_message,
};
use tokio::sync::mpsc;
use tonic::Streaming;

use crate::harness::Operator;

/// How long a test waits for the operator's next message before calling it missing.
const REPLY_WITHIN: Duration = Duration::from_secs(10);

/// What a node claims about itself: `cpu_millis`, `memory_bytes`, `region`; wasm and exec.
pub fn claims(cpu_millis: u64, memory_bytes: u64, region: &str) -> NodeFacts {
    NodeFacts {
        capacity: Some(Capacity {
            cpu_millis,
            memory_bytes,
            runtimes: vec!["wasm".into(), "exec".into()],
            arch: "x86_64".into(),
            os: "linux".into(),
            ..Default::default()
        }),
        agent_version: "hostile".into(),
        region: region.into(),
        zone: String::new(),
    }
}

/// One joined machine run by a test script rather than by the agent's task manager.
pub struct HostileAgent {
    pub name: String,
    pub state: AgentState,
    pub key: SigningKey,
    pub facts: NodeFacts,
    /// Receipts are numbered per (epoch, sequence) as the real agent does; a random epoch
    /// keeps two hostile agents' numbering apart.
    epoch: u64,
    sequence: u64,
    tx: Option<mpsc::Sender<AgentMessage>>,
    inbound: Option<Streaming<kommune_proto::v1::OperatorMessage>>,
    /// Messages read while waiting for another kind, handed out later in order.
    pending: VecDeque<Kind>,
    /// The attempts heartbeats say the node runs.
    pub running: Arc<Mutex<Vec<String>>>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for HostileAgent {
    fn drop(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }
}

impl HostileAgent {
    /// Joins as `name` with a fresh single-use token, claiming `facts`.
    pub async fn join(op: &Operator, dir: &Path, name: &str, facts: NodeFacts) -> Result<HostileAgent, String> {
        Self::join_with_token(op, dir, name, facts, &op.token(1, 600)).await
    }

    /// Joins as `name` with `token` (which may be shared with other machines).
    pub async fn join_with_token(op: &Operator, dir: &Path, name: &str, facts: NodeFacts, token: &str) -> Result<HostileAgent, String> {
        let state_dir = dir.join(format!("{name}-{}", crate::harness::rand_suffix()));
        let opts = JoinOptions {
            server: &op.url,
            token,
            name: Some(name),
            region: &facts.region,
            zone: &facts.zone,
            state_dir: &state_dir,
            force: false,
            facts: facts.clone(),
        };
        let state = join::join(opts).await.map_err(|e| e.to_string())?;
        let key = kommune_proto::receipt::signing_key_from_pem(&state.key_pem)?;
        Ok(HostileAgent {
            name: state.config.node_name.clone(),
            state,
            key,
            facts,
            epoch: rand::random::<u32>() as u64 + 1,
            sequence: 0,
            tx: None,
            inbound: None,
            pending: VecDeque::new(),
            running: Arc::default(),
            heartbeat: None,
        })
    }

    /// Opens a session with the node's claimed facts and waits for the Welcome; heartbeats then
    /// go out every 200 ms on their own, listing [`Self::running`], until the agent is dropped.
    pub async fn connect(&mut self, op: &Operator) {
        let hello = Hello { facts: Some(self.facts.clone()), running_attempt_ids: self.running.lock().unwrap().clone(), paused: false };
        self.connect_with(op, hello).await.expect("the operator welcomes the session");
    }

    /// Opens a session with any Hello; the operator's refusal comes back as its status.
    pub async fn connect_with(&mut self, op: &Operator, hello: Hello) -> Result<(), tonic::Status> {
        let server = kommune_agent::connect::parse_server(&op.url).unwrap();
        let mut client = kommune_agent::connect::client(&server, &self.state.ca_pem, Some((&self.state.cert_pem, &self.state.key_pem)))
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel(64);
        tx.send(AgentMessage { kind: Some(agent_message::Kind::Hello(hello)) }).await.unwrap();
        let mut inbound = client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        match tokio::time::timeout(REPLY_WITHIN, inbound.message()).await.expect("a Welcome in time")? {
            Some(kommune_proto::v1::OperatorMessage { kind: Some(Kind::Welcome(_)) }) => {}
            other => panic!("expected a Welcome, got {other:?}"),
        }
        let (beat, running) = (tx.clone(), self.running.clone());
        if let Some(old) = self.heartbeat.replace(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                let hb = Heartbeat { running_attempt_ids: running.lock().unwrap().clone(), paused: false };
                if beat.send(AgentMessage { kind: Some(agent_message::Kind::Heartbeat(hb)) }).await.is_err() {
                    return;
                }
            }
        })) {
            old.abort();
        }
        self.tx = Some(tx);
        self.inbound = Some(inbound);
        self.pending.clear();
        Ok(())
    }

    /// The operator's next message that `wanted` accepts, within `within`; others are kept
    /// for later. None if none came in time or the session ended.
    pub async fn recv(&mut self, within: Duration, wanted: impl Fn(&Kind) -> bool) -> Option<Kind> {
        if let Some(i) = self.pending.iter().position(&wanted) {
            return self.pending.remove(i);
        }
        let deadline = tokio::time::Instant::now() + within;
        let inbound = self.inbound.as_mut().expect("connected");
        loop {
            let m = tokio::time::timeout_at(deadline, inbound.message()).await.ok()?.ok()??;
            let Some(kind) = m.kind else { continue };
            if wanted(&kind) {
                return Some(kind);
            }
            self.pending.push_back(kind);
        }
    }

    /// The next Assign, if one comes within `within`.
    pub async fn assigned_within(&mut self, within: Duration) -> Option<Assign> {
        match self.recv(within, |k| matches!(k, Kind::Assign(_))).await? {
            Kind::Assign(a) => Some(a),
            _ => unreachable!(),
        }
    }

    /// The next Assign, which must come.
    pub async fn assigned(&mut self) -> Assign {
        self.assigned_within(REPLY_WITHIN).await.unwrap_or_else(|| panic!("{} got no Assign", self.name))
    }

    /// The Ack for `attempt`, which must come.
    pub async fn ack_for(&mut self, attempt: &str) -> kommune_proto::v1::Ack {
        match self.recv(REPLY_WITHIN, |k| matches!(k, Kind::Ack(a) if a.attempt_id == attempt)).await {
            Some(Kind::Ack(a)) => a,
            _ => panic!("{} got no Ack for {attempt}", self.name),
        }
    }

    /// The next Ack, whatever its attempt, if one comes within `within`.
    pub async fn any_ack(&mut self, within: Duration) -> Option<kommune_proto::v1::Ack> {
        match self.recv(within, |k| matches!(k, Kind::Ack(_))).await? {
            Kind::Ack(a) => Some(a),
            _ => unreachable!(),
        }
    }

    /// A sender for the session's outbound stream (for floods sent while Acks are read).
    pub fn sender(&self) -> mpsc::Sender<AgentMessage> {
        self.tx.clone().expect("connected")
    }

    /// Says the attempt runs, and lists it in heartbeats from now on.
    pub async fn say_running(&mut self, attempt: &str) {
        self.running.lock().unwrap().push(attempt.to_string());
        let update = TaskUpdate { attempt_id: attempt.into(), state: AttemptState::Running as i32, result: None, receipt: None, trace: None };
        self.sender().send(AgentMessage { kind: Some(agent_message::Kind::TaskUpdate(update)) }).await.unwrap();
    }

    /// A receipt for `attempt` of `job` claiming `usage`, signed with the node key under the
    /// next sequence number.
    pub fn receipt(&mut self, attempt: &str, job: &str, state: AttemptState, usage: Usage) -> UsageReceipt {
        self.sequence += 1;
        let now = kommune_proto::now_ms();
        let body = ReceiptBody {
            node: self.name.clone(),
            epoch: self.epoch,
            sequence: self.sequence,
            attempt_id: attempt.into(),
            job: job.into(),
            state: state as i32,
            started_unix_millis: now - usage.wall_millis.min(i64::MAX as u64) as i64,
            finished_unix_millis: now,
            usage: Some(usage),
        };
        kommune_proto::receipt::sign(&body, &self.key)
    }

    /// The terminal update of `attempt` in `state` carrying `receipt` (exit 0).
    pub fn update(attempt: &str, state: AttemptState, receipt: UsageReceipt) -> AgentMessage {
        let result = TaskResult { exit_code: 0, message: format!("{state:?} (hostile)"), ..Default::default() };
        let update = TaskUpdate { attempt_id: attempt.into(), state: state as i32, result: Some(result), receipt: Some(receipt), trace: None };
        AgentMessage { kind: Some(agent_message::Kind::TaskUpdate(update)) }
    }

    /// Reports the end of an assigned attempt with a receipt claiming `usage`, and returns the
    /// operator's Ack.
    pub async fn report(&mut self, assign: &Assign, state: AttemptState, usage: Usage) -> kommune_proto::v1::Ack {
        let receipt = self.receipt(&assign.attempt_id, &assign.job, state, usage);
        self.running.lock().unwrap().retain(|id| id != &assign.attempt_id);
        self.sender().send(Self::update(&assign.attempt_id, state, receipt)).await.unwrap();
        self.ack_for(&assign.attempt_id).await
    }
}
