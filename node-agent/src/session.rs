//! `kommune-agent run`: keep one session with the operator open, reconnecting with backoff,
//! heartbeating, running what is assigned and reporting results until they are acknowledged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kommune_proto::STAGE_TARGET;
use kommune_proto::v1::agent_gateway_client::AgentGatewayClient;
use kommune_proto::v1::{AgentMessage, FetchBlobRequest, Heartbeat, Hello, NodeFacts, RenewCertificate, TaskUpdate, agent_message, operator_message};
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;
use tracing::{debug, info, trace, warn};

use crate::availability::{self, Availability, Gate};
use crate::connect::{self, ConnectError, Server};
use crate::state::AgentState;
use crate::status::{AgentStatus, OfferedGpu, StatusFile};
use crate::tasks::{ModuleSource, Tasks};
use crate::{account, renew, schedule};

const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(60);
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// How often running attempts' new output goes to the operator's live view.
const LIVE_EVERY: Duration = Duration::from_secs(1);
/// Most live bytes sent per tick, so a chatty task cannot hold the session's loop for long;
/// what is left goes on the next tick.
const LIVE_BUDGET: usize = 1 << 20;
/// The session's outbound queue. The loop never waits on it: it reads the operator's messages
/// whatever it has to send. Waiting here while the operator waits for this agent to read its
/// Assigns and Acks could stop both (a cycle of waits seen in the code, not in a run).
const OUTBOUND: usize = 256;
/// Live chunks go out only while the queue has this much room (one tick's worth at most);
/// otherwise the bytes wait for a later tick, nothing is skipped.
const LIVE_ROOM: usize = LIVE_BUDGET / kommune_proto::limits::MAX_LOG_CHUNK_BYTES + 1;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the operator no longer accepts this node ({0}); join again with a new token")]
    Rejected(String),
    #[error("session ended: {0}")]
    Ended(String),
}

impl SessionError {
    /// Errors that retrying cannot fix.
    pub fn is_fatal(&self) -> bool {
        matches!(self, SessionError::Rejected(_))
    }
}

/// Fetches modules from the operator over the current session's channel.
struct OperatorModules(AgentGatewayClient<Channel>);

#[tonic::async_trait]
impl ModuleSource for OperatorModules {
    async fn fetch(&self, sha256: &str) -> Result<Vec<u8>, String> {
        let mut client = self.0.clone();
        client.fetch_blob(FetchBlobRequest { sha256: sha256.to_string() }).await.map(|r| r.into_inner().data).map_err(|s| s.message().to_string())
    }

    async fn upload(&self, attempt: &str, name: &str, path: &std::path::Path, size: u64, excess: u64) -> Result<String, String> {
        use kommune_proto::v1::{OutputUploadChunk, OutputUploadHeader, output_upload_chunk::Kind};
        use tokio::io::AsyncReadExt;
        const CHUNK: usize = 256 << 10;
        let header =
            OutputUploadChunk { kind: Some(Kind::Header(OutputUploadHeader { attempt_id: attempt.into(), name: name.into(), size, excess_bytes: excess })) };
        let file = tokio::fs::File::open(path).await.map_err(|e| format!("{}: {e}", path.display()))?.take(size);
        // Read as the upload goes, one chunk at a time: a large output is never held in memory.
        // A read error ends the stream short, which the operator refuses (fewer bytes than announced).
        fn data(chunk: std::io::Result<tokio_util::bytes::Bytes>) -> Option<OutputUploadChunk> {
            chunk.ok().map(|b| OutputUploadChunk { kind: Some(Kind::Data(b.to_vec())) })
        }
        let chunks = tokio_stream::StreamExt::map_while(tokio_util::io::ReaderStream::with_capacity(file, CHUNK), data);
        let stream = tokio_stream::StreamExt::chain(tokio_stream::iter([header]), chunks);
        let mut client = self.0.clone();
        client.upload_output(stream).await.map(|r| r.into_inner().sha256).map_err(|s| s.message().to_string())
    }
}

/// The next delay: doubled, capped, with ±20% jitter so a fleet does not reconnect in lockstep.
pub fn next_backoff(current: Duration) -> Duration {
    let doubled = (current * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
    let jitter = rand::thread_rng().gen_range(0.8..1.2);
    doubled.mul_f64(jitter)
}

fn initial_status(state: &AgentState, facts: &NodeFacts, gate: &Gate) -> AgentStatus {
    let cap = facts.capacity.clone().unwrap_or_default();
    AgentStatus {
        pid: std::process::id(),
        node_name: state.config.node_name.clone(),
        server: state.config.server.clone(),
        offered_cpu_millis: cap.cpu_millis,
        offered_memory_bytes: cap.memory_bytes,
        offered_disk_bytes: cap.ephemeral_storage_bytes,
        offered_gpus: cap.gpus.iter().map(|g| OfferedGpu { model: g.model.clone(), memory_bytes: g.memory_bytes }).collect(),
        runtimes: cap.runtimes,
        windows: schedule::describe(&gate.windows),
        idle_only: gate.idle.as_ref().map(|(p, _)| p.config().to_string()).unwrap_or_default(),
        ..Default::default()
    }
}

/// Runs sessions until `shutdown` resolves or the operator rejects this node, pausing only when
/// the provider runs `kommune-agent pause`.
pub async fn run(
    state: &AgentState,
    facts: &NodeFacts,
    tasks: &Arc<Tasks>,
    updates: &mut mpsc::UnboundedReceiver<TaskUpdate>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), SessionError> {
    run_with(state, facts, tasks, updates, Gate::manual_only(), shutdown).await
}

/// Like [`run`], also not taking tasks outside the gate's time windows and, in idle-only mode,
/// while the owner uses the machine (preempting what runs, even while disconnected).
pub async fn run_with(
    state: &AgentState,
    facts: &NodeFacts,
    tasks: &Arc<Tasks>,
    updates: &mut mpsc::UnboundedReceiver<TaskUpdate>,
    gate: Gate,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), SessionError> {
    let server = connect::parse_server(&state.config.server)?;
    let status = Arc::new(StatusFile::new(state.dir.clone(), initial_status(state, facts, &gate)));
    status.write(|_| {});
    let (tx, available) = watch::channel(gate.initial(state.is_paused()));
    let watcher = availability::watch(gate, state.pause_file(), tasks.clone(), tx, status.clone());
    let uplink = Uplink { server, state, cert_pem: state.cert_pem.clone(), facts, tasks, updates, available, status: &status };
    tokio::select! {
        r = uplink.sessions(shutdown) => r,
        () = watcher => Ok(()),
    }
}

/// This node's link to the operator, which outlives each session on it: where to dial, who
/// this node is and what it offers, its tasks and their updates, whether it may take work,
/// and the status file `kommune-agent status` reads.
struct Uplink<'a> {
    server: Server,
    state: &'a AgentState,
    /// The client certificate the next connection presents: the state's, or a renewed one.
    cert_pem: String,
    facts: &'a NodeFacts,
    tasks: &'a Arc<Tasks>,
    updates: &'a mut mpsc::UnboundedReceiver<TaskUpdate>,
    available: watch::Receiver<Availability>,
    status: &'a StatusFile,
}

impl Uplink<'_> {
    /// Opens sessions one after another, with backoff, until `shutdown` or a fatal error.
    async fn sessions(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), SessionError> {
        let mut backoff = Duration::ZERO;
        tokio::pin!(shutdown);
        loop {
            let started = Instant::now();
            let result = tokio::select! {
                r = self.session() => r,
                _ = &mut shutdown => return Ok(()),
            };
            let err = match result {
                Ok(()) => SessionError::Ended("the operator closed the session".into()),
                Err(e) => e,
            };
            let message = err.to_string();
            self.status.write(|s| {
                s.connected = false;
                s.last_error = message;
            });
            if err.is_fatal() {
                return Err(err);
            }
            if started.elapsed() > STABLE_SESSION {
                backoff = Duration::ZERO;
            }
            backoff = next_backoff(backoff);
            warn!(error = %err, retry_in = ?backoff, "session lost; reconnecting");
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = &mut shutdown => return Ok(()),
            }
        }
    }

    /// One session: Hello, resend unacknowledged results, then serve the operator's messages,
    /// heartbeats and task updates until the stream ends.
    async fn session(&mut self) -> Result<(), SessionError> {
        let (server, state, facts, tasks, status) = (&self.server, self.state, self.facts, self.tasks, self.status);
        let (updates, available, cert_pem) = (&mut *self.updates, &mut self.available, &mut self.cert_pem);
        let mut client = connect::client(server, &state.ca_pem, Some((cert_pem.as_str(), &state.key_pem))).await?;
        let (tx, rx) = mpsc::channel::<AgentMessage>(OUTBOUND);
        let send = |kind: agent_message::Kind| {
            let tx = tx.clone();
            async move { tx.send(AgentMessage { kind: Some(kind) }).await.map_err(|_| SessionError::Ended("outbound stream closed".into())) }
        };
        // Inside the loop: queued if there is room, else `Full` (the caller decides).
        let try_send = |kind: agent_message::Kind| match tx.try_send(AgentMessage { kind: Some(kind) }) {
            Ok(()) => Ok(true),
            Err(mpsc::error::TrySendError::Full(_)) => Ok(false),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SessionError::Ended("outbound stream closed".into())),
        };
        let mut paused = available.borrow_and_update().paused;
        send(agent_message::Kind::Hello(Hello { facts: Some(facts.clone()), running_attempt_ids: tasks.known_ids(), paused })).await?;
        let mut inbound = client.session(ReceiverStream::new(rx)).await.map_err(status_error)?.into_inner();
        let modules: Arc<dyn ModuleSource> = Arc::new(OperatorModules(client.clone()));

        // Whatever finished while disconnected is in the spool; drop the stale channel copies.
        // Resent from the loop below (a spool larger than the queue must not stop this agent
        // from reading the operator's Acks of the first ones).
        while updates.try_recv().is_ok() {}
        let mut backlog: std::collections::VecDeque<TaskUpdate> = tasks.unacknowledged().into();

        let mut heartbeat = tokio::time::interval(DEFAULT_HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is at once: a session opened with an ageing certificate renews it.
        let mut renew_check = tokio::time::interval(renew::CHECK_EVERY);
        let mut renewing = false;
        let mut live = tokio::time::interval(LIVE_EVERY);
        live.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut earnings = account::Assembly::default();
        loop {
            tokio::select! {
                msg = inbound.message() => {
                    let msg = match msg {
                        Ok(Some(m)) => m,
                        Ok(None) => return Ok(()),
                        Err(s) => return Err(status_error(s)),
                    };
                    match msg.kind {
                        Some(operator_message::Kind::Welcome(w)) => {
                            info!(node = %w.node_name, "session open");
                            status.write(|s| {
                                s.connected = true;
                                s.last_error.clear();
                            });
                            let every = Duration::from_millis(w.heartbeat_interval_millis).clamp(Duration::from_millis(100), Duration::from_secs(300));
                            heartbeat = tokio::time::interval(every);
                            heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        }
                        Some(operator_message::Kind::Assign(a)) => {
                            trace!(target: STAGE_TARGET, attempt = %a.attempt_id, "assign received");
                            tasks.assign(a, modules.clone())
                        }
                        Some(operator_message::Kind::Cancel(c)) => tasks.cancel(&c.attempt_id),
                        Some(operator_message::Kind::Ack(a)) => tasks.acknowledge(&a),
                        Some(operator_message::Kind::Certificate(c)) => {
                            renewing = false;
                            if !c.refused.is_empty() {
                                warn!(reason = %c.refused, "the operator refused to renew the node certificate; keeping the current one");
                            } else {
                                match renew::install(&state.dir, &state.key_pem, &c.certificate_pem) {
                                    Ok(()) => {
                                        info!("node certificate renewed; the next connection uses it");
                                        *cert_pem = c.certificate_pem;
                                    }
                                    Err(e) => warn!(error = %e, "cannot keep the renewed node certificate"),
                                }
                            }
                        }
                        Some(operator_message::Kind::Earnings(page)) => match earnings.push(page, kommune_proto::now_ms()) {
                            Ok(Some(account)) => match account.save(&state.receipts_dir()) {
                                Ok(()) => debug!(as_of = account.as_of_seq, "the operator's earnings account is kept"),
                                Err(e) => warn!(error = %e, "cannot keep the operator's earnings account"),
                            },
                            Ok(None) => {}
                            // Informational, so a bad page costs only the account being sent.
                            Err(e) => warn!(error = %e, "ignoring the operator's earnings account; the last one received is kept"),
                        },
                        None => {}
                    }
                }
                _ = renew_check.tick(), if !renewing => {
                    if renew::needs_renewal(cert_pem, kommune_proto::now_ms() / 1000) {
                        match renew::request(&state.key_pem, &state.config.node_name) {
                            Ok(csr_der) => {
                                info!("the node certificate is in the last third of its lifetime; asking the operator to renew it");
                                // Asked again at the next check if the queue is full now.
                                renewing = try_send(agent_message::Kind::Renew(RenewCertificate { csr_der }))?;
                            }
                            Err(e) => warn!(error = %e, "cannot ask for a renewed node certificate"),
                        }
                    }
                }
                _ = heartbeat.tick() => {
                    let running = tasks.running_ids();
                    // A full queue is traffic the operator will read anyway: this beat is skipped.
                    try_send(agent_message::Kind::Heartbeat(Heartbeat { running_attempt_ids: running.clone(), paused }))?;
                    status.write(|s| {
                        s.last_heartbeat_ms = kommune_proto::now_ms();
                        s.running = running;
                    });
                }
                // Taken only when there is something new. Sent before any later result of the
                // same attempt (the same loop sends both), so the operator sees them while the
                // attempt still runs; an attempt's last bytes go with its stored logs instead.
                _ = live.tick(), if tx.capacity() >= LIVE_ROOM => {
                    for chunk in tasks.live_chunks(LIVE_BUDGET) {
                        try_send(agent_message::Kind::LogChunk(chunk))?;
                    }
                }
                // Pause, resume, a window or the owner: the operator hears of a change at once.
                Ok(()) = available.changed() => {
                    let now = available.borrow_and_update().paused;
                    if now != paused {
                        paused = now;
                        // Sent as soon as there is room, before any later update.
                        heartbeat.reset_immediately();
                    }
                }
                Some(u) = updates.recv() => backlog.push_back(u),
                // Updates in order, as the queue has room (results are spooled on disk; the
                // backlog holds no more than the agent's own attempts produced).
                permit = tx.reserve(), if !backlog.is_empty() => {
                    let permit = permit.map_err(|_| SessionError::Ended("outbound stream closed".into()))?;
                    let u = backlog.pop_front().expect("guarded by !is_empty");
                    trace!(target: STAGE_TARGET, attempt = %u.attempt_id, state = u.state, "update sent");
                    permit.send(AgentMessage { kind: Some(agent_message::Kind::TaskUpdate(u)) });
                }
            }
        }
    }
}

fn status_error(s: tonic::Status) -> SessionError {
    match s.code() {
        Code::Unauthenticated | Code::PermissionDenied => SessionError::Rejected(s.message().to_string()),
        _ => SessionError::Ended(format!("{}: {}", s.code(), s.message())),
    }
}
