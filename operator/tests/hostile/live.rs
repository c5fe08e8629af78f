//! Attacks on live logs (`kubectl kommune logs --follow`): a joined node sends LogChunks for an
//! attempt of another node, for one that ended, with gaps, overlaps, oversized or past the live
//! cap, and floods; each is dropped and counted, and the operator's live tail stays bounded.

use std::time::Duration;

use kommune_operator::outputs::live::{Following, LiveSource as _, MAX_LIVE_ATTEMPTS, TAIL_BYTES};
use kommune_proto::limits::{MAX_LIVE_LOG_BYTES, MAX_LOG_CHUNK_BYTES};
use kommune_proto::v1::{AgentMessage, AttemptState, LogChunk, LogStream, agent_message};

use crate::agent::{HostileAgent, claims};
use crate::harness::*;
use crate::{PRICED, cordon, plausible};

async fn chunk(agent: &HostileAgent, attempt: &str, stream: LogStream, offset: u64, data: &[u8]) {
    let c = LogChunk { attempt_id: attempt.into(), stream: stream as i32, offset, data: data.to_vec() };
    agent.sender().send(AgentMessage { kind: Some(agent_message::Kind::LogChunk(c)) }).await.unwrap();
}

/// Waits until the live chunk counter of `outcome` reads `n` (the session takes them in order,
/// after the test has sent them).
async fn counted(op: &Operator, outcome: &str, n: f64) {
    for _ in 0..200 {
        if op.metric("kommune_live_log_chunks_total", &[("outcome", outcome)]) >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(op.metric("kommune_live_log_chunks_total", &[("outcome", outcome)]), n, "{outcome}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_chunks_not_from_the_holder_not_contiguous_oversized_or_after_the_end_are_dropped_and_the_tail_stays_bounded() {
    let op = operator_with(PRICED).await;
    let dir = tempfile::tempdir().unwrap();
    let mut holder = HostileAgent::join(&op, dir.path(), "live-holder", claims(2000, 2 << 30, "")).await.unwrap();
    let mut other = HostileAgent::join(&op, dir.path(), "live-other", claims(2000, 2 << 30, "")).await.unwrap();
    holder.connect(&op).await;
    other.connect(&op).await;
    cordon(&op, "live-other");
    let jr = job("live-job");
    assert_eq!(
        op.dispatcher.sync(&jr, &policy("workload:\n  exec:\n    command: [/bin/true]\nresources: {cpu: 250m, memory: 64Mi}\n"), None).await.unwrap().placed,
        1
    );
    let assign = holder.assigned().await;
    let id = assign.attempt_id.clone();
    holder.say_running(&id).await;

    chunk(&holder, &id, LogStream::Stdout, 0, b"line one\n").await;
    counted(&op, "accepted", 1.0).await;
    // Another node speaking for the holder's attempt, and an attempt nobody holds.
    chunk(&other, &id, LogStream::Stdout, 9, b"forged\n").await;
    chunk(&holder, "live-job.0.9", LogStream::Stdout, 0, b"made up\n").await;
    counted(&op, "not_held", 2.0).await;
    // Not contiguous within the session: a gap, and bytes already taken sent again.
    chunk(&holder, &id, LogStream::Stdout, 100, b"after a gap\n").await;
    counted(&op, "gap", 1.0).await;
    chunk(&holder, &id, LogStream::Stdout, 0, b"rewritten\n").await;
    counted(&op, "overlap", 1.0).await;
    // Larger than a chunk may be, empty, of no stream, past the live cap.
    chunk(&holder, &id, LogStream::Stderr, 0, &vec![b'x'; MAX_LOG_CHUNK_BYTES + 1]).await;
    chunk(&holder, &id, LogStream::Stderr, 0, b"").await;
    counted(&op, "oversize", 2.0).await;
    chunk(&holder, &id, LogStream::Unspecified, 0, b"x").await;
    counted(&op, "bad_stream", 1.0).await;
    chunk(&holder, &id, LogStream::Stderr, MAX_LIVE_LOG_BYTES - 1, b"xy").await;
    counted(&op, "capped", 1.0).await;

    // A flood of contiguous full chunks: taken up to the cap, then dropped; the tail keeps
    // the last TAIL_BYTES of each stream, whatever was sent.
    let full = vec![b'f'; MAX_LOG_CHUNK_BYTES];
    let mut offset = 0;
    for _ in 0..(2 * MAX_LIVE_LOG_BYTES as usize / MAX_LOG_CHUNK_BYTES) {
        chunk(&holder, &id, LogStream::Stderr, offset, &full).await;
        offset += full.len() as u64;
    }
    let taken = (MAX_LIVE_LOG_BYTES as usize / MAX_LOG_CHUNK_BYTES) as f64;
    counted(&op, "capped", 1.0 + taken).await;
    counted(&op, "accepted", 1.0 + taken).await;
    let live = op.dispatcher.live_logs();
    assert_eq!(live.len(), 1);
    assert_eq!(live.buffered_bytes(), 9 + TAIL_BYTES, "stdout's line and stderr's tail, no more");
    // The session was not ended for any of it: chunks are only dropped.
    chunk(&holder, &id, LogStream::Stdout, 9, b"line two\n").await;
    counted(&op, "accepted", 2.0 + taken).await;
    let Following::Live(followed) = op.dispatcher.follow("live-job".into(), 0).await.unwrap() else { panic!("the task runs") };
    assert_eq!(followed.key.node, "live-holder");

    // Once the attempt ended, its tail is gone and its node may not add to it.
    holder.report(&assign, AttemptState::Succeeded, plausible(100, 250)).await;
    assert!(live.is_empty());
    chunk(&holder, &id, LogStream::Stdout, 18, b"after the end\n").await;
    counted(&op, "ended", 1.0).await;
    assert!(live.is_empty(), "an ended attempt gets no new tail");
    assert!(matches!(op.dispatcher.follow("live-job".into(), 0).await.unwrap(), Following::NotRunning));
    // What all tails together may hold (docs/ARCHITECTURE.md says so).
    const { assert!(MAX_LIVE_ATTEMPTS * 2 * TAIL_BYTES <= 64 << 20, "the documented bound") };
}
