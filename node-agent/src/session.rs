//! `kommune-agent run`: keep one session with the operator open, reconnecting with backoff,
//! heartbeating, running what is assigned and reporting results until they are acknowledged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kommune_proto::v1::agent_gateway_client::AgentGatewayClient;
use kommune_proto::v1::{AgentMessage, FetchBlobRequest, Heartbeat, Hello, NodeFacts, TaskUpdate, agent_message, operator_message};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::connect::{self, ConnectError, Server};
use crate::state::AgentState;
use crate::status::{self, AgentStatus};
use crate::tasks::{ModuleSource, Tasks};

const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(60);
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

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
}

/// The next delay: doubled, capped, with ±20% jitter so a fleet does not reconnect in lockstep.
pub fn next_backoff(current: Duration) -> Duration {
    let doubled = (current * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
    let jitter = rand::thread_rng().gen_range(0.8..1.2);
    doubled.mul_f64(jitter)
}

/// Keeps `<state dir>/status.json` current for `kommune-agent status`. Best effort.
struct StatusFile {
    dir: std::path::PathBuf,
    status: AgentStatus,
}

impl StatusFile {
    fn new(state: &AgentState, facts: &NodeFacts) -> Self {
        let cap = facts.capacity.clone().unwrap_or_default();
        let status = AgentStatus {
            pid: std::process::id(),
            node_name: state.config.node_name.clone(),
            server: state.config.server.clone(),
            offered_cpu_millis: cap.cpu_millis,
            offered_memory_bytes: cap.memory_bytes,
            runtimes: cap.runtimes,
            ..Default::default()
        };
        StatusFile { dir: state.dir.clone(), status }
    }

    fn write(&mut self, change: impl FnOnce(&mut AgentStatus)) {
        change(&mut self.status);
        self.status.updated_ms = status::now_ms();
        if let Err(e) = self.status.save(&self.dir) {
            tracing::debug!(error = %e, "cannot write status.json");
        }
    }
}

/// Runs sessions until `shutdown` resolves or the operator rejects this node.
pub async fn run(
    state: &AgentState,
    facts: &NodeFacts,
    tasks: &Arc<Tasks>,
    updates: &mut mpsc::UnboundedReceiver<TaskUpdate>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), SessionError> {
    let server = connect::parse_server(&state.config.server)?;
    let mut backoff = Duration::ZERO;
    let mut status = StatusFile::new(state, facts);
    status.write(|_| {});
    tokio::pin!(shutdown);
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            r = session(&server, state, facts, tasks, updates, &mut status) => r,
            _ = &mut shutdown => return Ok(()),
        };
        let err = match result {
            Ok(()) => SessionError::Ended("the operator closed the session".into()),
            Err(e) => e,
        };
        let message = err.to_string();
        status.write(|s| {
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

fn status_error(s: tonic::Status) -> SessionError {
    match s.code() {
        Code::Unauthenticated | Code::PermissionDenied => SessionError::Rejected(s.message().to_string()),
        _ => SessionError::Ended(format!("{}: {}", s.code(), s.message())),
    }
}

async fn session(
    server: &Server,
    state: &AgentState,
    facts: &NodeFacts,
    tasks: &Arc<Tasks>,
    updates: &mut mpsc::UnboundedReceiver<TaskUpdate>,
    status: &mut StatusFile,
) -> Result<(), SessionError> {
    let mut client = connect::client(server, &state.ca_pem, Some((&state.cert_pem, &state.key_pem))).await?;
    let (tx, rx) = mpsc::channel::<AgentMessage>(256);
    let send = |kind: agent_message::Kind| {
        let tx = tx.clone();
        async move { tx.send(AgentMessage { kind: Some(kind) }).await.map_err(|_| SessionError::Ended("outbound stream closed".into())) }
    };
    let mut paused = state.is_paused();
    send(agent_message::Kind::Hello(Hello { facts: Some(facts.clone()), running_attempt_ids: tasks.known_ids(), paused })).await?;
    status.write(|s| s.paused = paused);
    let mut inbound = client.session(ReceiverStream::new(rx)).await.map_err(status_error)?.into_inner();
    let modules: Arc<dyn ModuleSource> = Arc::new(OperatorModules(client.clone()));

    // Whatever finished while disconnected is in the spool; drop the stale channel copies.
    while updates.try_recv().is_ok() {}
    for u in tasks.unacknowledged() {
        send(agent_message::Kind::TaskUpdate(u)).await?;
    }

    // `kommune-agent pause`/`resume` flip a file; a change is told to the operator at once.
    let mut pause_check = tokio::time::interval(Duration::from_secs(1));
    let mut heartbeat = tokio::time::interval(DEFAULT_HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                    Some(operator_message::Kind::Assign(a)) => tasks.assign(a, modules.clone()),
                    Some(operator_message::Kind::Cancel(c)) => tasks.cancel(&c.attempt_id),
                    Some(operator_message::Kind::Ack(a)) => tasks.acknowledge(&a),
                    None => {}
                }
            }
            _ = heartbeat.tick() => {
                let running = tasks.running_ids();
                send(agent_message::Kind::Heartbeat(Heartbeat { running_attempt_ids: running.clone(), paused })).await?;
                status.write(|s| {
                    s.last_heartbeat_ms = status::now_ms();
                    s.running = running;
                });
            }
            _ = pause_check.tick() => {
                let now = state.is_paused();
                if now != paused {
                    paused = now;
                    info!(paused, "provider {} this machine", if paused { "paused" } else { "resumed" });
                    send(agent_message::Kind::Heartbeat(Heartbeat { running_attempt_ids: tasks.running_ids(), paused })).await?;
                    status.write(|s| s.paused = paused);
                }
            }
            Some(u) = updates.recv() => {
                send(agent_message::Kind::TaskUpdate(u)).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_cap_with_jitter() {
        let mut b = Duration::ZERO;
        for _ in 0..20 {
            let next = next_backoff(b);
            assert!(next >= MIN_BACKOFF.mul_f64(0.8) && next <= MAX_BACKOFF.mul_f64(1.2), "{next:?}");
            b = next;
        }
        assert!(b >= MAX_BACKOFF.mul_f64(0.8));
    }
}
