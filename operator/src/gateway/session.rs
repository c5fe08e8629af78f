//! One agent session: Hello, then heartbeats and task updates until the stream ends or goes
//! quiet. Everything the agent says goes through the dispatcher; replies go out on the
//! session's bounded queue.

use std::sync::Arc;

use kommune_proto::v1::{self, AgentMessage, OperatorMessage, agent_message, operator_message::Kind as OpKind};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::timeout;
use tonic::{Status, Streaming};
use tracing::{Instrument as _, debug, info, trace, warn};

use super::{Inner, NodeEvent};
use crate::STAGE;
use crate::dispatch::MAX_RUNNING_IDS;
use crate::fleet::NodeFacts;

type Tx = mpsc::Sender<Result<OperatorMessage, Status>>;

/// Results of one session being made durable at the same time. Waiting for each before reading
/// the next capped an agent at one result per fsync; in flight together they share the store's
/// and the ledger's group commits. The bound keeps a session's memory in check.
const RESULTS_IN_FLIGHT: usize = 256;

/// Acks of one session waiting for room in its outbound queue (the agent reads slower than
/// its results are recorded, or a sync filled the queue with Assigns). Past this an Ack is
/// dropped, counted as `gateway_messages{direction="dropped",kind="ack"}`: the agent resends an
/// unacknowledged result on its next session, and it is recorded once and acknowledged then.
const ACKS_WAITING: usize = 1024;

async fn send(tx: &Tx, kind: OpKind) -> bool {
    tx.send(Ok(OperatorMessage { kind: Some(kind) })).await.is_ok()
}

/// Queues an Ack without making the session's inbound loop wait for room in the outbound
/// queue: a loop that waited there, while the agent waited for room to send its next update
/// instead of reading, could stop both (a cycle of waits seen in the code, not in a run).
fn queue_ack(tx: &Tx, waiting: &Arc<Semaphore>, metrics: &crate::metrics::Metrics, ack: v1::Ack) {
    let msg = match tx.try_send(Ok(OperatorMessage { kind: Some(OpKind::Ack(ack)) })) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
        Err(mpsc::error::TrySendError::Full(msg)) => msg,
    };
    match waiting.clone().try_acquire_owned() {
        Ok(permit) => {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(msg).await;
                drop(permit);
            });
        }
        Err(_) => {
            metrics.message("dropped", "ack", 0);
            debug!("an Ack dropped: {ACKS_WAITING} are waiting for the agent to read; it resends the result on its next session");
        }
    }
}

pub(super) async fn run(inner: Arc<Inner>, node: String, public_key: [u8; 32], mut inbound: Streaming<AgentMessage>, tx: Tx) {
    let hello = match timeout(inner.config.session_timeout, inbound.message()).await {
        Ok(Ok(Some(AgentMessage { kind: Some(agent_message::Kind::Hello(h)) }))) => h,
        Ok(Ok(Some(_))) => {
            let _ = tx.send(Err(Status::failed_precondition("the first message of a session must be Hello"))).await;
            return;
        }
        Ok(Ok(None)) | Ok(Err(_)) => return,
        Err(_) => {
            let _ = tx.send(Err(Status::deadline_exceeded("no Hello received"))).await;
            return;
        }
    };

    inner.dispatcher.metrics().message("received", "hello", prost::Message::encoded_len(&hello));
    if hello.running_attempt_ids.len() > MAX_RUNNING_IDS {
        warn!(%node, listed = hello.running_attempt_ids.len(), "Hello refused: too many attempt ids");
        let why = format!("the Hello lists {} attempts; a node may list at most {MAX_RUNNING_IDS}", hello.running_attempt_ids.len());
        let _ = tx.send(Err(Status::invalid_argument(why))).await;
        return;
    }
    let facts = NodeFacts::from_proto(hello.facts.as_ref());
    inner.dispatcher.fleet().set_paused(&node, hello.paused);
    inner.dispatcher.fleet().set_public_key(&node, public_key);
    let (session, unwanted) = match inner.dispatcher.open_session(&node, facts.clone(), tx.clone(), &hello.running_attempt_ids).await {
        Ok(opened) => opened,
        Err(e) => {
            warn!(%node, error = %e, "cannot reconcile the node's attempts");
            let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
            return;
        }
    };
    let session_id = session.id;
    let metrics = inner.dispatcher.metrics().clone();
    metrics.session_opened();
    info!(%node, running = hello.running_attempt_ids.len(), "session opened");
    let welcome = v1::Welcome { node_name: node.clone(), heartbeat_interval_millis: inner.config.heartbeat_interval.as_millis() as u64 };
    // Subscribed before the first account is read: a change meanwhile is sent again.
    let mut earnings_version = inner.earnings.subscribe();
    let mut earnings_sent = None;
    if send(&tx, OpKind::Welcome(welcome)).await {
        for id in unwanted {
            send(&tx, OpKind::Cancel(v1::Cancel { attempt_id: id, reason: "the operator does not know this attempt".into() })).await;
        }
        if let Some(ledger) = inner.dispatcher.ledger() {
            super::earnings::send(ledger, &node, public_key, &tx, &mut earnings_sent).await;
        }
    }
    super::record(&inner.events, NodeEvent::Connected { node: node.clone(), facts });

    let in_flight = Arc::new(Semaphore::new(RESULTS_IN_FLIGHT));
    let acks_waiting = Arc::new(Semaphore::new(ACKS_WAITING));
    let mut last_renewal = None;
    let mut last_heartbeat = std::time::Instant::now();
    let reason = loop {
        let next = tokio::select! {
            // The fleet already sent the stream its status (replaced, or the node revoked).
            () = session.replaced.notified() => break "ended by the operator: replaced by a newer session or removed".to_string(),
            Ok(()) = earnings_version.changed() => {
                if let Some(ledger) = inner.dispatcher.ledger()
                    && !super::earnings::send(ledger, &node, public_key, &tx, &mut earnings_sent).await
                {
                    break "the session's stream closed".into();
                }
                continue;
            }
            next = timeout(inner.config.session_timeout, inbound.message()) => next,
        };
        let msg = match next {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => break "the agent closed the session".to_string(),
            Ok(Err(status)) => break format!("stream error: {}", status.message()),
            Err(_) => {
                let _ = tx.send(Err(Status::deadline_exceeded("no heartbeat received in time"))).await;
                break format!("no message for {:?}", inner.config.session_timeout);
            }
        };
        inner.dispatcher.fleet().touch(&node, session_id);
        metrics.message("received", agent_kind(&msg), prost::Message::encoded_len(&msg));
        if let Some(agent_message::Kind::TaskUpdate(u)) = &msg.kind {
            trace!(target: STAGE, attempt = %u.attempt_id, state = u.state, "update received");
        }
        match msg.kind {
            Some(agent_message::Kind::Heartbeat(hb)) => {
                metrics.heartbeat(last_heartbeat.elapsed(), inner.config.heartbeat_interval);
                last_heartbeat = std::time::Instant::now();
                inner.dispatcher.fleet().set_paused(&node, hb.paused);
                super::record(&inner.events, NodeEvent::Heartbeat { node: node.clone() });
            }
            Some(agent_message::Kind::TaskUpdate(update)) if is_result(&update) => {
                // A result waits for two fsyncs; the next message is read meanwhile. A Running
                // update of the same attempt always came earlier and was applied inline.
                let Ok(permit) = in_flight.clone().acquire_owned().await else { break "session closed".into() };
                let (inner, node, tx, acks_waiting) = (inner.clone(), node.clone(), tx.clone(), acks_waiting.clone());
                let span = crate::dispatch::result_span(&node, &update);
                tokio::spawn(async move {
                    let recorded = inner.dispatcher.on_update(&node, &public_key, &update).instrument(span.clone()).await;
                    // Recorded: the next result may be read; the Ack never holds the slot.
                    drop(permit);
                    match recorded {
                        Ok(Some(ack)) => {
                            trace!(target: STAGE, attempt = %ack.attempt_id, "ack queued");
                            let acked = kommune_telemetry::span!(parent: &span, "ack", attempt = %crate::dispatch::short(&ack.attempt_id), receipt_rejected = !ack.receipt_rejected.is_empty(), cost_micros = ack.cost_micros);
                            acked.in_scope(|| queue_ack(&tx, &acks_waiting, inner.dispatcher.metrics(), ack));
                        }
                        Ok(None) => {}
                        Err(e) => {
                            // Not acknowledged: the agent resends it on its next session, which
                            // this error makes it open (waited for in this task, not the loop).
                            warn!(%node, error = %e, "cannot record a task update");
                            let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                        }
                    }
                });
            }
            Some(agent_message::Kind::TaskUpdate(update)) => match inner.dispatcher.on_update(&node, &public_key, &update).await {
                Ok(Some(ack)) => queue_ack(&tx, &acks_waiting, &metrics, ack),
                Ok(None) => {}
                Err(e) => {
                    // Not acknowledged: the agent resends it on its next session.
                    warn!(%node, error = %e, "cannot record a task update");
                    let _ = tx.try_send(Err(Status::unavailable(e.to_string())));
                    break format!("store error: {e}");
                }
            },
            Some(agent_message::Kind::Renew(r)) => {
                let reply = super::renew::renew(&inner, &node, &public_key, &r.csr_der, &mut last_renewal).await;
                // Not waited for here (see `queue_ack`); renewals are rate-limited per node.
                let tx = tx.clone();
                tokio::spawn(async move { send(&tx, OpKind::Certificate(reply)).await });
            }
            Some(agent_message::Kind::LogChunk(chunk)) => {
                // Inline, before the next message: an attempt's chunks come before its result
                // on the stream, so none is taken after the attempt ended. A refused chunk is
                // only dropped: it can spoil no more than its own attempt's live view.
                let _ = inner.dispatcher.on_log_chunk(&node, session_id, &chunk).await;
            }
            Some(agent_message::Kind::Hello(_)) => {
                let _ = tx.send(Err(Status::failed_precondition("Hello may only be sent once per session"))).await;
                break "protocol error: a second Hello".into();
            }
            None => debug!(%node, "empty message ignored"),
        }
    };

    metrics.session_closed(close_kind(&reason));
    if inner.dispatcher.fleet().disconnect(&node, session_id) {
        info!(%node, %reason, "session closed");
        super::record(&inner.events, NodeEvent::Disconnected { node, reason });
    }
}

/// The bounded metric label for a session's end, from the reasons the loop above gives.
fn close_kind(reason: &str) -> &'static str {
    const KINDS: [(&str, &str); 7] = [
        ("ended by the operator", "ended_by_operator"),
        ("the agent closed", "agent_closed"),
        ("stream error", "stream_error"),
        ("no message for", "timeout"),
        ("protocol error", "protocol_error"),
        ("store error", "store_error"),
        ("the session's stream closed", "stream_closed"),
    ];
    KINDS.iter().find(|(prefix, _)| reason.starts_with(prefix)).map_or("other", |(_, kind)| kind)
}

/// The kind of an agent's message, as a metric label.
fn agent_kind(m: &AgentMessage) -> &'static str {
    match &m.kind {
        Some(agent_message::Kind::Hello(_)) => "hello",
        Some(agent_message::Kind::Heartbeat(_)) => "heartbeat",
        Some(agent_message::Kind::TaskUpdate(_)) => "task_update",
        Some(agent_message::Kind::Renew(_)) => "renew",
        Some(agent_message::Kind::LogChunk(_)) => "log_chunk",
        None => "empty",
    }
}

/// The kind of an operator's message, as a metric label.
pub(super) fn operator_kind(m: &OperatorMessage) -> &'static str {
    match &m.kind {
        Some(OpKind::Welcome(_)) => "welcome",
        Some(OpKind::Assign(_)) => "assign",
        Some(OpKind::Cancel(_)) => "cancel",
        Some(OpKind::Ack(_)) => "ack",
        Some(OpKind::Certificate(_)) => "certificate",
        Some(OpKind::Earnings(_)) => "earnings",
        None => "empty",
    }
}

/// Whether an update reports an attempt's end (what must be made durable before its Ack).
fn is_result(update: &v1::TaskUpdate) -> bool {
    !matches!(v1::AttemptState::try_from(update.state), Ok(v1::AttemptState::Running | v1::AttemptState::Unspecified) | Err(_))
}
