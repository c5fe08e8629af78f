//! Floods of the gateway itself (issue 15): a Hello listing 200,000 attempts, 10,000 Joins a
//! second from one address, a loop of session opens and a connection that never finishes TLS.

use std::time::{Duration, Instant};

use kommune_agent::connect::{client, parse_server};
use kommune_agent::state::AgentState;
use kommune_operator::dispatch::MAX_RUNNING_IDS;
use kommune_proto::token::JoinToken;
use kommune_proto::v1::operator_message::Kind;
use kommune_proto::v1::{AgentMessage, Heartbeat, Hello, JoinRequest, OperatorMessage, agent_message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::{Code, Status, Streaming};

use crate::harness::{HANDSHAKE_TIMEOUT, facts, job, join_agent, join_only, operator, operator_with, policy, wait_connected};
use crate::measure::rss_kib;
use crate::{PRICED, cordon};

type Session = (mpsc::Sender<AgentMessage>, Streaming<OperatorMessage>);

/// Opens a session as `state`'s node with `hello` on a connection of its own, and keeps both
/// directions open: the operator's Welcome, or its refusal as a status.
async fn open_session(url: String, state: AgentState, hello: Hello) -> Result<Session, Status> {
    let server = parse_server(&url).unwrap();
    let mut client = client(&server, &state.ca_pem, Some((&state.cert_pem, &state.key_pem))).await.map_err(|e| Status::unavailable(e.to_string()))?;
    let (tx, rx) = mpsc::channel(16);
    tx.send(AgentMessage { kind: Some(agent_message::Kind::Hello(hello)) }).await.unwrap();
    let mut inbound = client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    match tokio::time::timeout(Duration::from_secs(30), inbound.message()).await.expect("an answer to the Hello in time")? {
        Some(OperatorMessage { kind: Some(Kind::Welcome(_)) }) => Ok((tx, inbound)),
        other => panic!("expected a Welcome, got {other:?}"),
    }
}

fn hello(ids: Vec<String>) -> Hello {
    Hello { facts: Some(facts(true)), running_attempt_ids: ids, paused: false }
}

/// `n` distinct ids of three characters: short enough that 200,000 fit in one 1 MiB message.
fn short_ids(n: usize) -> Vec<String> {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    assert!(n <= 62 * 62 * 62);
    (0..n).map(|i| [i / (62 * 62), (i / 62) % 62, i % 62].iter().map(|&d| DIGITS[d] as char).collect()).collect()
}

/// An agent lists 200,000 attempts it does not have (each once cost a store read under the
/// placement lock: seconds without placement). It is refused with a clear status, and a Hello
/// at the cap is answered while placement goes on undisturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hello_listing_200000_unknown_attempts_does_not_hold_up_placement() {
    let op = operator_with(PRICED).await;
    let dir = tempfile::tempdir().unwrap();
    let _honest = join_agent(&op, dir.path(), "honest", true).await;
    let flooder = join_only(&op, dir.path(), "flooder", true).await;
    cordon(&op, "flooder");
    wait_connected(&op, &["honest"]).await;
    let echo = policy("workload:\n  exec:\n    command: [echo]\nresources: {cpu: 10m, memory: 1Mi}\n");
    let t = Instant::now();
    op.dispatcher.sync(&job("baseline"), &echo, None).await.unwrap();
    println!("placement with no Hello in flight: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);

    for listed in [200_000, MAX_RUNNING_IDS] {
        let started = Instant::now();
        let answer = tokio::spawn(open_session(op.url.clone(), flooder.clone(), hello(short_ids(listed))));
        // Place one job after another until the Hello is answered: none may wait on it.
        let (mut slowest, mut placements) = (Duration::ZERO, 0);
        while placements == 0 || !answer.is_finished() {
            let t = Instant::now();
            op.dispatcher.sync(&job(&format!("during-{listed}-{placements}")), &echo, None).await.unwrap();
            slowest = slowest.max(t.elapsed());
            placements += 1;
            assert!(started.elapsed() < Duration::from_secs(30), "the Hello was never answered");
        }
        let answer = answer.await.unwrap();
        let answered_in = started.elapsed();
        println!(
            "Hello listing {listed} ids: answered in {:.0} ms ({}); {placements} placements meanwhile, slowest {:.1} ms",
            answered_in.as_secs_f64() * 1e3,
            answer.as_ref().map_or_else(|s| format!("{:?}: {}", s.code(), s.message()), |_| "Welcome".into()),
            slowest.as_secs_f64() * 1e3
        );
        assert!(slowest < Duration::from_secs(1), "a placement waited {slowest:?} on a Hello of {listed} ids");
        if listed > MAX_RUNNING_IDS {
            let refused = answer.expect_err("an oversized Hello is refused");
            assert_eq!(refused.code(), Code::InvalidArgument);
            assert!(refused.message().contains(&format!("at most {MAX_RUNNING_IDS}")), "{refused:?}");
            continue;
        }
        // At the cap, the session opens and every unknown id is cancelled.
        let (_tx, mut inbound) = answer.expect("a Hello at the cap is welcomed");
        let mut cancels = 0;
        while cancels < listed {
            match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
                Ok(Ok(Some(OperatorMessage { kind: Some(Kind::Cancel(_)) }))) => cancels += 1,
                Ok(Ok(Some(_))) => {}
                other => panic!("after {cancels} Cancels: {other:?}"),
            }
        }
        println!("{cancels} unknown attempts cancelled, {:.0} ms after the Hello", started.elapsed().as_secs_f64() * 1e3);
    }
}

/// 10,000 Joins in one second from one address, each with a made-up token. Past a small burst
/// they are refused at once with ResourceExhausted and a retry hint, before any token is read;
/// an honest agent's job finishes meanwhile and memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_joins_a_second_from_one_address_are_refused_quickly() {
    let op = operator_with(PRICED).await;
    let dir = tempfile::tempdir().unwrap();
    let _honest = join_agent(&op, dir.path(), "honest", true).await;
    wait_connected(&op, &["honest"]).await;
    let rss_before = rss_kib();
    let server = parse_server(&op.url).unwrap();
    let mut clients = vec![];
    for _ in 0..8 {
        clients.push(client(&server, op.ca.cert_pem(), None).await.unwrap());
    }
    let bogus = JoinToken::generate(&op.ca.pin()).to_string();
    let flood = async {
        let started = Instant::now();
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..10_000usize {
            if i % 1000 == 0 {
                // Ten batches of 1,000, one every 100 ms.
                tokio::time::sleep_until(tokio::time::Instant::from_std(started + Duration::from_millis(i as u64 / 10))).await;
            }
            let mut c = clients[i % clients.len()].clone();
            let request = JoinRequest { token: bogus.clone(), requested_name: format!("flood-{i}"), csr_der: vec![1; 64], facts: None };
            calls.spawn(async move {
                let t = Instant::now();
                let r = c.join(request).await;
                (r.err(), t.elapsed())
            });
        }
        let mut outcomes = vec![];
        while let Some(r) = calls.join_next().await {
            outcomes.push(r.unwrap());
        }
        (outcomes, started.elapsed())
    };
    let echo = policy("workload:\n  exec:\n    command: [echo, honest]\n");
    let honest_job = async {
        let t = Instant::now();
        let synced = op.run_to_end(&job("honest-work"), &echo, None).await;
        (synced, t.elapsed())
    };
    let ((outcomes, flood_took), (synced, honest_took)) = tokio::join!(flood, honest_job);
    let rss_after = rss_kib();

    let code = |c: Code| outcomes.iter().filter(|(e, _)| e.as_ref().is_some_and(|s| s.code() == c)).count();
    let (exhausted, unauthenticated) = (code(Code::ResourceExhausted), code(Code::Unauthenticated));
    let mut refused: Vec<f64> =
        outcomes.iter().filter(|(e, _)| e.as_ref().is_some_and(|s| s.code() == Code::ResourceExhausted)).map(|(_, d)| d.as_secs_f64() * 1e3).collect();
    refused.sort_by(f64::total_cmp);
    let pct = |p: f64| refused[((refused.len() - 1) as f64 * p) as usize];
    println!(
        "10,000 joins sent in {:.2} s: {exhausted} ResourceExhausted, {unauthenticated} Unauthenticated, {} other; refusal latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        flood_took.as_secs_f64(),
        outcomes.len() - exhausted - unauthenticated,
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    println!(
        "honest job: {:?} in {:.2} s during the flood; RSS {:.1} -> {:.1} MiB",
        synced.progress.phase,
        honest_took.as_secs_f64(),
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    assert_eq!(exhausted + unauthenticated, 10_000, "every join is refused as rate-limited or for its token");
    // The burst (20) and 2 a second for as long as the flood lasted, with a second's slack.
    let allowed = 20 + 2 * (flood_took.as_secs() as usize + 2);
    assert!(unauthenticated <= allowed, "{unauthenticated} joins reached the token check (at most {allowed})");
    let sample = outcomes.iter().find_map(|(e, _)| e.as_ref().filter(|s| s.code() == Code::ResourceExhausted)).unwrap();
    assert!(sample.message().contains("retry in"), "{sample:?}");
    assert!(sample.metadata().get("retry-after-ms").is_some(), "the wait is also given as metadata");
    assert_eq!(synced.progress.phase, kommune_operator::crd::JobPhase::Succeeded);
    assert!(honest_took < Duration::from_secs(20));
    assert!(rss_after.saturating_sub(rss_before) < 256 * 1024, "RSS grew by {} KiB", rss_after - rss_before);
}

/// A joined agent opens sessions in a loop and keeps every one open. Each newer session ends
/// the older one (Aborted, and the operator drops its side), so one stays live; past a burst
/// the opens are refused with ResourceExhausted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_open_loop_leaves_one_live_session_and_is_rate_limited() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let looper = join_only(&op, dir.path(), "looper", true).await;
    let tasks_before = op.runtime.as_ref().unwrap().metrics().num_alive_tasks();
    let (mut opened, mut limited, mut hint) = (vec![], 0, String::new());
    let started = Instant::now();
    for _ in 0..40 {
        match open_session(op.url.clone(), looper.clone(), hello(vec![])).await {
            Ok(s) => opened.push(s),
            Err(s) if s.code() == Code::ResourceExhausted => {
                limited += 1;
                hint = s.message().to_string();
            }
            Err(s) => panic!("unexpected refusal: {s:?}"),
        }
    }
    println!("40 session opens in {:.2} s: {} welcomed, {limited} refused ({hint})", started.elapsed().as_secs_f64(), opened.len());
    assert!(limited >= 25, "only {limited} of 40 opens were rate-limited");
    assert!(hint.contains("retry in"), "{hint}");

    let (live_tx, _live) = opened.pop().unwrap();
    for (i, (tx, inbound)) in opened.iter_mut().enumerate() {
        let ended = loop {
            match tokio::time::timeout(Duration::from_secs(5), inbound.message()).await.expect("a replaced stream ends") {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("session {i} ended without a status"),
                Err(s) => break s,
            }
        };
        assert_eq!(ended.code(), Code::Aborted, "{ended:?}");
        assert!(ended.message().contains("replaced by a newer session"), "{ended:?}");
        // The operator's side let go of the agent's stream too: its session task is gone.
        tokio::time::timeout(Duration::from_secs(5), tx.closed()).await.unwrap_or_else(|_| panic!("session {i} is still read by the operator"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tasks_after = op.runtime.as_ref().unwrap().metrics().num_alive_tasks();
    println!(
        "{} replaced sessions ended with Aborted; operator tasks {tasks_before} -> {tasks_after} (the agent still holds {} connections)",
        opened.len(),
        opened.len() + 1
    );
    assert_eq!(op.dispatcher.fleet().connected(), vec!["looper".to_string()]);
    // The newest session is the live one: it is heard.
    let hb = Heartbeat { running_attempt_ids: vec![], paused: true };
    live_tx.send(AgentMessage { kind: Some(agent_message::Kind::Heartbeat(hb)) }).await.unwrap();
    for _ in 0..100 {
        if op.dispatcher.fleet().node("looper").is_some_and(|n| n.paused) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the newest session's heartbeat was not heard");
}

/// Connections that open TCP and never finish (or never start) TLS are closed after the
/// handshake timeout; meanwhile an honest agent joins at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_completes_tls_is_closed_after_the_handshake_timeout() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let mut silent = vec![];
    for _ in 0..100 {
        silent.push(tokio::net::TcpStream::connect(("127.0.0.1", op.port)).await.unwrap());
    }
    // A TLS record header announcing a ClientHello that never comes.
    let mut partial = tokio::net::TcpStream::connect(("127.0.0.1", op.port)).await.unwrap();
    partial.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await.unwrap();
    let started = Instant::now();
    let t = Instant::now();
    join_only(&op, dir.path(), "honest", false).await;
    println!("an honest join with 101 stalled handshakes open: {:.0} ms", t.elapsed().as_secs_f64() * 1e3);

    silent.push(partial);
    let mut closed_after = vec![];
    for conn in &mut silent {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(HANDSHAKE_TIMEOUT * 3, conn.read(&mut byte)).await.expect("the operator closes a stalled handshake");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        closed_after.push(started.elapsed());
    }
    let (first, last) = (closed_after.iter().min().unwrap(), closed_after.iter().max().unwrap());
    println!("{} stalled connections closed after {:.2}..{:.2} s (timeout {:?})", silent.len(), first.as_secs_f64(), last.as_secs_f64(), HANDSHAKE_TIMEOUT);
    assert!(*first >= HANDSHAKE_TIMEOUT.saturating_sub(Duration::from_millis(500)), "closed before the timeout: {first:?}");
    assert!(*last <= HANDSHAKE_TIMEOUT + Duration::from_secs(2), "closed late: {last:?}");
}
