//! Identities an agent can borrow or inflate: a name another key used, two machines of one
//! token as two owners, and capacity or region claims.

use std::collections::BTreeMap;

use kommune_operator::dispatch::ModuleRef;
use kommune_operator::fleet::NodeAdmin;
use kommune_operator::scheduler::REGION_LABEL;

use crate::PRICED;
use crate::agent::{HostileAgent, claims};
use crate::harness::{hello_module, job, join_agent, operator_with, policy, wait_connected};

/// A provider leaves (and another is revoked); a new key then joins under each freed name.
/// Today the names are free again, and the ledger would merge two identities' earnings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_left_or_was_revoked_is_never_given_to_a_new_key() {
    let op = operator_with(PRICED).await;
    let dir = tempfile::tempdir().unwrap();
    let leaver = HostileAgent::join(&op, dir.path(), "used-name", claims(2000, 2 << 30, "")).await.unwrap();
    let left = kommune_agent::leave::leave(&leaver.state, false).await.unwrap();
    assert_eq!(left.node_name, "used-name");
    let mut revoked = HostileAgent::join(&op, dir.path(), "revoked-name", claims(2000, 2 << 30, "")).await.unwrap();
    revoked.connect(&op).await;
    op.dispatcher.revoke_node("revoked-name").await.unwrap();

    for name in ["used-name", "revoked-name"] {
        let again = HostileAgent::join(&op, dir.path(), name, claims(2000, 2 << 30, "")).await;
        let err = again.err().unwrap_or_else(|| panic!("a new key joined under the used name {name}"));
        println!("rejoin as {name}: {err}");
        assert!(err.contains(name), "the refusal names the name: {err}");
    }
    // A fresh name still joins, and the operator restarts with its registry.
    HostileAgent::join(&op, dir.path(), "fresh-name", claims(2000, 2 << 30, "")).await.unwrap();
    let op = op.crash_and_restart().await;
    assert!(HostileAgent::join(&op, dir.path(), "used-name", claims(2000, 2 << 30, "")).await.is_err(), "still refused after a restart");
}

/// Two machines joined with one token (no owner set by the admin) try to hold both copies of
/// a task under `replicas: 2`. Today an empty owner is "a party of its own", so they can.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_machines_from_one_token_never_hold_both_copies_of_a_task() {
    let op = operator_with(PRICED).await;
    let dir = tempfile::tempdir().unwrap();
    let shared = op.token(2, 600);
    let mut a = HostileAgent::join_with_token(&op, dir.path(), "twin-a", claims(2000, 2 << 30, ""), &shared).await.unwrap();
    let mut b = HostileAgent::join_with_token(&op, dir.path(), "twin-b", claims(2000, 2 << 30, ""), &shared).await.unwrap();
    a.connect(&op).await;
    b.connect(&op).await;
    let sha = op.store_module("twins", &hello_module());
    let module = ModuleRef { sha256: sha, url: None };
    let replicated =
        policy("workload:\n  wasm:\n    configMapRef: {name: m, key: module.wasm}\ntasks: 2\nresources: {cpu: 250m, memory: 64Mi}\nplacement: {replicas: 2}\n");
    let jr = job("twins");
    let alone = op.dispatcher.sync(&jr, &replicated, Some(&module)).await.unwrap();
    let nodes = |s: &kommune_operator::dispatch::Synced| s.attempts.iter().map(|a| (a.index, a.replica, a.node.clone())).collect::<Vec<_>>();
    assert_eq!(alone.placed, 0, "the twins are one owner, too few for two copies: {:?}", nodes(&alone));
    println!("with only the twins: {}", alone.unplaced.map(|u| u.to_string()).unwrap_or_default());

    // With an honest machine of another owner, each task has one copy there and one on a twin.
    let _honest = join_agent(&op, dir.path(), "other-owner", false).await;
    wait_connected(&op, &["other-owner"]).await;
    let placed = op.dispatcher.sync(&jr, &replicated, Some(&module)).await.unwrap();
    assert_eq!(placed.placed, 4, "{:?}", nodes(&placed));
    for index in 0..2 {
        let holders: Vec<_> = placed.attempts.iter().filter(|a| a.index == index).map(|a| a.node.as_str()).collect();
        assert!(holders.contains(&"other-owner"), "task {index} copies on {holders:?}");
    }
}

/// A node claims a million cores and a pebibyte, and a region its admin labelled otherwise.
/// Before claims were bounded the balance score sent it every task, and its claimed region
/// replaced the label. Its token allows 4 cores and 8 GiB, so that is what placement believes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_absurd_capacity_claim_does_not_take_every_task_and_a_claimed_region_does_not_override_the_admin() {
    let op = operator_with(PRICED).await;
    let dir = tempfile::tempdir().unwrap();
    let capped = kommune_proto::token::JoinToken::generate(&op.ca.pin());
    let limits = kommune_operator::tokens::CapacityLimits { cpu_millis: Some(4000), memory_bytes: Some(8 << 30), ..Default::default() };
    let expires = k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(600);
    op.tokens.insert_owned(&capped, expires, 1, None, limits);
    let mut giant =
        HostileAgent::join_with_token(&op, dir.path(), "giant", claims(1_000_000_000, 1 << 50, "claimed-region"), &capped.to_string()).await.unwrap();
    giant.connect(&op).await;
    let labels = BTreeMap::from([(REGION_LABEL.to_string(), "admin-region".to_string())]);
    op.dispatcher.fleet().set_admin(&giant.name, NodeAdmin { labels, ..Default::default() });
    let _honest = join_agent(&op, dir.path(), "modest", false).await;
    wait_connected(&op, &["giant", "modest"]).await;

    let sha = op.store_module("spread", &hello_module());
    let wide = policy("workload:\n  wasm:\n    configMapRef: {name: m, key: module.wasm}\ntasks: 8\nresources: {cpu: 250m, memory: 64Mi}\n");
    let spread = op.dispatcher.sync(&job("spread"), &wide, Some(&ModuleRef { sha256: sha, url: None })).await.unwrap();
    let on_honest = spread.attempts.iter().filter(|a| a.node == "modest").count();
    println!("8 tasks: {} on the giant, {on_honest} on the idle honest node", spread.attempts.len() - on_honest);
    let believed = op.dispatcher.fleet().node("giant").unwrap().capacity;
    assert_eq!((believed.cpu_millis, believed.memory_bytes), (4000, 8 << 30), "the token's caps bound the claim");
    let region = op.dispatcher.fleet().pool().nodes().find(|n| n.name == "giant").map(|n| n.labels.get(REGION_LABEL).cloned());
    println!("the giant's region label: {region:?}");
    assert!(on_honest > 0, "the claim is bounded: the idle honest node gets some of the tasks");
    assert_eq!(region, Some(Some("admin-region".to_string())), "the admin's label wins over the agent's claim");
    let in_claimed = policy("workload:\n  exec:\n    command: [echo]\nplacement: {nodeSelector: {topology.kubernetes.io/region: claimed-region}}\n");
    let synced = op.dispatcher.sync(&job("follows-claim"), &in_claimed, None).await.unwrap();
    assert_eq!(synced.placed, 0, "nothing is placed by a region only the agent claims");
}
