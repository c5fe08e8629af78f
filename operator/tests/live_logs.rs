//! Component test of live logs: a real agent runs a task that prints a line, sleeps and
//! prints another; a follower on the operator's web route (`.../tasks/0/logs?follow=1`, with
//! the same authorization as the outputs) reads the first line before the task has ended.

#[allow(dead_code)]
#[path = "support/operator.rs"]
mod harness;

use std::io::BufRead as _;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::MockConnectInfo;
use futures::future::BoxFuture;
use harness::*;
use kommune_operator::attempt::AttemptPhase;
use kommune_operator::crd::JobPhase;
use kommune_operator::outputs::live::{LiveEvent, LiveSource};
use kommune_operator::web::auth::{AuthError, Authority, Gatekeeper, UserInfo};
use kommune_operator::web::results::{JobLookup, Retrieval};
use kommune_operator::web::{self, Source, tls::Peer};

/// Token "reader" may get default/live; nobody else anything.
struct Rbac;

impl Authority for Rbac {
    fn review_token(&self, token: String) -> BoxFuture<'_, Result<Option<UserInfo>, AuthError>> {
        Box::pin(async move { Ok(["reader", "stranger"].contains(&token.as_str()).then(|| UserInfo { username: token, ..UserInfo::default() })) })
    }
    fn allowed(&self, _: UserInfo, _: &'static str, _: &'static str, _: String) -> BoxFuture<'_, Result<bool, AuthError>> {
        Box::pin(async { Ok(false) })
    }
    fn allowed_object(&self, user: UserInfo, verb: &'static str, resource: &'static str, ns: String, name: String) -> BoxFuture<'_, Result<bool, AuthError>> {
        let ok = user.username == "reader" && verb == "get" && resource == "computejobs" && ns == "default" && name == "live";
        Box::pin(async move { Ok(ok) })
    }
}

struct NoFacts;

impl Source for NoFacts {
    fn facts(&self) -> BoxFuture<'_, Result<web::Facts, String>> {
        Box::pin(async { Ok((vec![], vec![])) })
    }
}

struct Jobs;

impl JobLookup for Jobs {
    fn uid(&self, namespace: String, name: String) -> BoxFuture<'_, Result<Option<String>, String>> {
        Box::pin(async move { Ok((namespace == "default" && name == "live").then(|| "live".to_string())) })
    }
}

/// The dashboard's router with live logs from `op`, on plain loopback HTTP (the TLS layer is
/// the outputs routes' and is tested with them).
async fn serve(op: &Operator) -> String {
    let gate = Arc::new(Gatekeeper::new(Arc::new(Rbac)));
    let live: Arc<dyn LiveSource> = op.dispatcher.clone();
    let retrieval = Retrieval { jobs: Arc::new(Jobs), reader: None, live: Some(live) };
    let peer = Peer { addr: "127.0.0.1:1".parse().unwrap(), user: None };
    let router = web::router_with_outputs(gate, Arc::new(NoFacts), Some(retrieval)).layer(MockConnectInfo(peer));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}/api/v1/namespaces/default/computejobs/live/tasks/0/logs?follow=1")
}

fn get(url: &str, token: &str) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
    ureq::get(url).header("Authorization", format!("Bearer {token}")).config().http_status_as_error(false).build().call()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_reads_a_running_task_s_first_line_before_it_ends() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let _agent = join_agent(&op, dir.path(), "live-agent", true).await;
    wait_connected(&op, &["live-agent"]).await;
    let url = serve(&op).await;
    let task = policy("workload:\n  exec:\n    command: [/bin/sh, -c, 'echo first line; sleep 4; echo second line']\nresources: {cpu: 250m, memory: 64Mi}\n");
    let jr = job("live");
    // Not started: 409, which the plugin waits on.
    let u = url.clone();
    assert_eq!(tokio::task::spawn_blocking(move || get(&u, "reader").unwrap().status().as_u16()).await.unwrap(), 409);
    assert_eq!(op.dispatcher.sync(&jr, &task, None).await.unwrap().placed, 1);
    let id = op.dispatcher.store().job_attempts("live").await.unwrap()[0].id.clone();
    wait_running(&op, &id).await;
    // Someone who may not get the job learns nothing.
    let u = url.clone();
    assert_eq!(tokio::task::spawn_blocking(move || get(&u, "stranger").unwrap().status().as_u16()).await.unwrap(), 403);

    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<LiveEvent>();
    let reader = tokio::task::spawn_blocking(move || {
        let resp = get(&url, "reader").unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        for line in std::io::BufReader::new(resp.into_body().into_reader()).lines() {
            let _ = tx.send(serde_json::from_str(&line.unwrap()).unwrap());
        }
    });
    let mut stdout = Vec::new();
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = lines.recv().await {
            stdout.extend(e.bytes().unwrap_or_default());
            if stdout.ends_with(b"first line\n") {
                return;
            }
        }
        panic!("the stream ended before the first line");
    });
    first.await.expect("the first line arrives live");
    let a = op.dispatcher.store().attempt(&id).await.unwrap().unwrap();
    assert_eq!(a.phase, AttemptPhase::Running, "the first line came while the task ran");

    let done = op.run_to_end(&jr, &task, None).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded);
    let mut rest = vec![];
    while let Some(e) = tokio::time::timeout(Duration::from_secs(10), lines.recv()).await.expect("the stream ends with the attempt") {
        rest.push(e);
    }
    reader.await.unwrap();
    assert!(matches!(rest.last(), Some(LiveEvent::End { attempt_id, how }) if *attempt_id == id && how == "Succeeded"), "{rest:?}");
    assert!(op.dispatcher.live_logs().is_empty(), "the tail went with the attempt");
}
