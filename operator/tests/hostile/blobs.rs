//! Attacks on the operator's module blobs through FetchBlob: a joined node asks for modules it
//! has no attempt for, by a digest it learnt elsewhere or guessed.

use kommune_operator::attempt::AttemptPhase;
use kommune_operator::dispatch::ModuleRef;
use kommune_proto::v1::FetchBlobRequest;
use tonic::Code;

use crate::agent::{HostileAgent, claims};
use crate::harness::*;
use crate::{PRICED, cordon};

/// FetchBlob as `agent`'s node, over its own mTLS identity: the module, or the refusal.
async fn fetch(op: &Operator, agent: &HostileAgent, sha256: &str) -> Result<Vec<u8>, tonic::Status> {
    let server = kommune_agent::connect::parse_server(&op.url).unwrap();
    let mut client = kommune_agent::connect::client(&server, &agent.state.ca_pem, Some((&agent.state.cert_pem, &agent.state.key_pem))).await.unwrap();
    client.fetch_blob(FetchBlobRequest { sha256: sha256.into() }).await.map(|r| r.into_inner().data)
}

/// The refusal's text with the digest taken out, to compare refusals of different digests.
fn refusal(status: &tonic::Status, sha256: &str) -> (Code, String) {
    (status.code(), status.message().replace(sha256, "<sha>"))
}

/// A joined node that holds no attempt of a job asks for that job's module by its digest (say
/// it read it from a ComputeJob's status, or another provider told it). Before, any joined
/// node got any module whose digest it knew. Now only the node assigned an attempt gets it; the
/// others get PermissionDenied, worded the same for a digest nothing is stored under, so
/// digests cannot be probed. After the operator restarts (the job's attempts not in memory
/// yet) the assigned node still gets it, and once its attempt ends it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_without_an_attempt_that_needs_a_module_cannot_fetch_it_by_its_digest() {
    let op = operator_with(PRICED).await;
    let dir = tempfile::tempdir().unwrap();
    let mut holder = HostileAgent::join(&op, dir.path(), "holder", claims(2000, 2 << 30, "")).await.unwrap();
    let mut prober = HostileAgent::join(&op, dir.path(), "prober", claims(2000, 2 << 30, "")).await.unwrap();
    holder.connect(&op).await;
    prober.connect(&op).await;
    cordon(&op, "prober");

    let module = hello_module();
    let sha = op.store_module("private", &module);
    let wasm = policy("workload:\n  wasm:\n    configMapRef: {name: m, key: module.wasm}\nresources: {cpu: 250m, memory: 64Mi}\n");
    let jr = job("private");
    let synced = op.dispatcher.sync(&jr, &wasm, Some(&ModuleRef { sha256: sha.clone(), url: None })).await.unwrap();
    assert_eq!(synced.placed, 1);
    let assign = holder.assigned().await;
    assert_eq!(fetch(&op, &holder, &sha).await.expect("the assigned node fetches its module"), module);

    let known = fetch(&op, &prober, &sha).await.expect_err("a node without an attempt is refused");
    let unknown_sha = "ab".repeat(32);
    let unknown = fetch(&op, &prober, &unknown_sha).await.expect_err("a digest nothing is stored under");
    println!("known digest: {known:?}\nunknown digest: {unknown:?}");
    assert_eq!(known.code(), Code::PermissionDenied);
    assert_eq!(refusal(&known, &sha), refusal(&unknown, &unknown_sha), "the refusal does not tell whether the blob exists");
    // A module stored for another job (no attempt anywhere) is refused to the holder too.
    let other = op.store_module("waiting", b"another job's module");
    assert_eq!(fetch(&op, &holder, &other).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(fetch(&op, &prober, "../../kommune.db").await.unwrap_err().code(), Code::InvalidArgument);

    // After a restart the job is not in memory until its next sync: the store is asked.
    let op = op.crash_and_restart().await;
    assert!(op.dispatcher.store().loaded_job_attempts(&jr.uid).is_none());
    assert_eq!(fetch(&op, &holder, &sha).await.expect("still assigned after the restart"), module);
    assert_eq!(fetch(&op, &prober, &sha).await.unwrap_err().code(), Code::PermissionDenied);

    // Once the job is deleted (its attempts cancelled), nobody gets it.
    op.dispatcher.cancel_job(&jr.uid).await.unwrap();
    let a = op.dispatcher.store().attempt(&assign.attempt_id).await.unwrap().unwrap();
    assert_eq!(a.phase, AttemptPhase::Cancelled);
    assert_eq!(fetch(&op, &holder, &sha).await.unwrap_err().code(), Code::PermissionDenied);
}
