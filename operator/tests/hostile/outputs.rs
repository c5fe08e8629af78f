//! Attacks on the output store through UploadOutput (issue 17): a joined node uploads for an
//! attempt it does not hold, past the limits the operator assigned, under a path that is not an
//! output, or as a liar whose output file differs from the honest copies'.

use kommune_operator::crd::JobPhase;
use kommune_operator::dispatch::ModuleRef;
use kommune_proto::v1::{
    AgentMessage, AttemptState, OutputFile, OutputUploadChunk, OutputUploadHeader, TaskResult, TaskUpdate, Usage, agent_message, output_upload_chunk::Kind,
};
use tonic::Code;

use crate::agent::{HostileAgent, claims};
use crate::harness::*;
use crate::{PRICED, cordon, plausible};

/// UploadOutput as `agent`'s node: a header announcing `size` bytes, then `data` in chunks.
async fn upload(op: &Operator, agent: &HostileAgent, attempt: &str, name: &str, size: u64, data: &[u8]) -> Result<String, tonic::Status> {
    upload_claiming(op, agent, attempt, name, size, data, 0).await
}

/// As `upload`, claiming `excess` more bytes were produced than sent.
async fn upload_claiming(op: &Operator, agent: &HostileAgent, attempt: &str, name: &str, size: u64, data: &[u8], excess: u64) -> Result<String, tonic::Status> {
    let server = kommune_agent::connect::parse_server(&op.url).unwrap();
    let mut client = kommune_agent::connect::client(&server, &agent.state.ca_pem, Some((&agent.state.cert_pem, &agent.state.key_pem))).await.unwrap();
    let header =
        OutputUploadChunk { kind: Some(Kind::Header(OutputUploadHeader { attempt_id: attempt.into(), name: name.into(), size, excess_bytes: excess })) };
    let mut messages = vec![header];
    messages.extend(data.chunks(64 << 10).map(|c| OutputUploadChunk { kind: Some(Kind::Data(c.to_vec())) }));
    client.upload_output(tokio_stream::iter(messages)).await.map(|r| r.into_inner().sha256)
}

/// A node holding one attempt of a job with `maxFileSize: 1Ki, maxAttemptSize: 2Ki, maxFiles:
/// 3` tries every way past it; another node tries to upload for that attempt. Each is refused
/// with its reason, and what the store holds for the attempt stays within the limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_for_an_attempt_not_held_or_past_the_assigned_limits_are_refused() {
    let op = operator_with(PRICED).await;
    let dir = tempfile::tempdir().unwrap();
    let mut holder = HostileAgent::join(&op, dir.path(), "holder", claims(2000, 2 << 30, "")).await.unwrap();
    let mut other = HostileAgent::join(&op, dir.path(), "other", claims(2000, 2 << 30, "")).await.unwrap();
    holder.connect(&op).await;
    other.connect(&op).await;
    cordon(&op, "other");
    let yaml = "workload:\n  exec:\n    command: [/bin/true]\nresources: {cpu: 250m, memory: 64Mi}\noutputs: {paths: [a], maxFileSize: 1Ki, maxAttemptSize: 2Ki, maxFiles: 3}\n";
    let jr = job("target-job");
    assert_eq!(op.dispatcher.sync(&jr, &policy(yaml), None).await.unwrap().placed, 1);
    let assign = holder.assigned().await;
    let id = assign.attempt_id.clone();
    assert_eq!(assign.outputs.as_ref().map(|o| (o.max_file_bytes, o.max_attempt_bytes, o.max_files)), Some((1024, 2048, 3)), "the plan names the limits");

    let refused = |r: Result<String, tonic::Status>, code: Code, needle: &str| {
        let s = r.expect_err(needle);
        assert_eq!(s.code(), code, "{s:?}");
        assert!(s.message().contains(needle), "{needle}: {}", s.message());
    };
    // Another node, an attempt nobody holds, and a made-up id: one answer.
    refused(upload(&op, &other, &id, "stdout", 3, b"lie").await, Code::PermissionDenied, "holds no assigned or running attempt");
    refused(upload(&op, &holder, "target-job.0.9", "stdout", 3, b"abc").await, Code::PermissionDenied, "holds no assigned or running attempt");
    // Past the per-file limit, announced or not.
    refused(upload(&op, &holder, &id, "out/a", 4096, &[0; 4096]).await, Code::InvalidArgument, "over the job's limit of 1024 bytes per file");
    refused(upload(&op, &holder, &id, "out/a", 10, &[0; 4096]).await, Code::InvalidArgument, "4096 bytes sent, 10 announced");
    refused(upload(&op, &holder, &id, "out/a", 10, &[0; 4]).await, Code::InvalidArgument, "4 bytes sent, 10 announced");
    // Names that are not outputs.
    for bad in ["../../etc/passwd", "out/../x", "/etc/shadow", "out/", "notes"] {
        refused(upload(&op, &holder, &id, bad, 1, b"x").await, Code::InvalidArgument, "is not stdout, stderr or out/");
    }
    // Within limits, then past the attempt's total and file count; a name only once.
    assert_eq!(upload(&op, &holder, &id, "stdout", 1024, &[1; 1024]).await.unwrap(), kommune_proto::sha256_hex(&[1; 1024]));
    refused(upload(&op, &holder, &id, "stdout", 1, b"x").await, Code::InvalidArgument, "already uploaded stdout");
    assert!(upload(&op, &holder, &id, "out/a", 1000, &[2; 1000]).await.is_ok());
    refused(upload(&op, &holder, &id, "out/b", 100, &[3; 100]).await, Code::InvalidArgument, "over the job's limit of 2048 bytes per attempt");
    assert!(upload(&op, &holder, &id, "out/c", 20, &[3; 20]).await.is_ok());
    refused(upload(&op, &holder, &id, "out/d", 1, b"x").await, Code::InvalidArgument, "at most 3 outputs");
    let stored = op.dispatcher.outputs().unwrap().manifest(&id).unwrap();
    assert_eq!(stored.iter().map(|s| s.size).sum::<u64>(), 2044);

    // Once the attempt ended, not even its own node may add to it.
    holder.report(&assign, AttemptState::Succeeded, plausible(100, 250)).await;
    refused(upload(&op, &holder, &id, "stderr", 1, b"x").await, Code::PermissionDenied, "holds no assigned or running attempt");
}

/// Under a spot check the liar answers first with the honest stdout but an output file the
/// honest copies do not have (counted in verification by default). The check on another owner
/// disagrees, a third copy breaks the tie, and the liar is outvoted: its file is part of the
/// answer, with the digest the operator computed itself from the upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_liar_with_an_output_file_the_honest_copies_lack_is_outvoted() {
    let op = operator_with(PRICED).await;
    let dir = tempfile::tempdir().unwrap();
    let mut liar = HostileAgent::join(&op, dir.path(), "liar", claims(2000, 2 << 30, "")).await.unwrap();
    liar.connect(&op).await;
    let module = ModuleRef { sha256: op.store_module("liar-job", &hello_module()), url: None };
    let wasm = policy(
        "workload:\n  wasm:\n    configMapRef: {name: m, key: module.wasm}\n    args: ['5000']\nresources: {cpu: 250m, memory: 64Mi}\nverification: {mode: spotCheck, fraction: '1'}\noutputs: {paths: [result.txt]}\n",
    );
    let jr = job("liar-job");
    assert_eq!(op.dispatcher.sync(&jr, &wasm, Some(&module)).await.unwrap().placed, 1);
    let assign = liar.assigned().await;
    let stdout = b"hello from task 0/1: 669 primes below 5000\n";
    let file = b"made up\n";
    assert!(upload(&op, &liar, &assign.attempt_id, "stdout", stdout.len() as u64, stdout).await.is_ok());
    assert!(upload(&op, &liar, &assign.attempt_id, "out/result.txt", file.len() as u64, file).await.is_ok());
    let receipt = liar.receipt(&assign.attempt_id, &assign.job, AttemptState::Succeeded, plausible(100, 250));
    // It even claims another digest for its file: the operator records what it received.
    let outputs = vec![OutputFile { name: "out/result.txt".into(), size: 8, sha256: "a".repeat(64), excess_bytes: 0 }];
    let result = TaskResult { exit_code: 0, output_sha256: kommune_proto::sha256_hex(stdout), outputs, ..Default::default() };
    let update =
        TaskUpdate { trace: None, attempt_id: assign.attempt_id.clone(), state: AttemptState::Succeeded as i32, result: Some(result), receipt: Some(receipt) };
    liar.sender().send(AgentMessage { kind: Some(agent_message::Kind::TaskUpdate(update)) }).await.unwrap();
    liar.ack_for(&assign.attempt_id).await;

    let _alice = join_agent(&op, dir.path(), "alice-pc", false).await;
    let _bob = join_agent(&op, dir.path(), "bob-pc", false).await;
    wait_connected(&op, &["alice-pc", "bob-pc"]).await;
    let done = op.run_to_end(&jr, &wasm, Some(&module)).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded, "{:?}", done.attempts);
    assert_eq!(done.attempts.len(), 3, "the lie, its check, and the copy that broke the tie");
    let lie = done.attempts.iter().find(|a| a.node == "liar").unwrap().result.clone().unwrap();
    let honest: Vec<_> = done.attempts.iter().filter(|a| a.node != "liar").map(|a| a.result.clone().unwrap()).collect();
    assert_eq!(lie.output_sha256, honest[0].output_sha256, "the liar's stdout was right");
    assert_eq!(lie.outputs.iter().find(|o| o.name == "out/result.txt").unwrap().sha256, kommune_proto::sha256_hex(file));
    assert!(honest.iter().all(|r| r.outputs == honest[0].outputs && !r.outputs.iter().any(|o| o.name == "out/result.txt")));
    assert_eq!(done.progress.accepted.len(), 1);
    assert_ne!(done.progress.accepted[0].1, assign.attempt_id, "the liar's copy is not the accepted one");
    let listed = op.dispatcher.output_reader().unwrap().list("liar-job").await.unwrap();
    assert!(listed.iter().all(|e| e.attempt_id == done.progress.accepted[0].1 && e.name != "out/result.txt"), "{listed:?}");
    let outvoted = op.dispatcher.store().observations_of("liar", 10).await.unwrap();
    assert!(outvoted.iter().any(|o| o.observed.as_str() == "Outvoted"), "{outvoted:?}");
}

/// Excess bytes (produced but not sent) cannot be measured, only claimed. A node offering 1 GiB
/// of scratch claims far more, on an upload and for files it never sent: what its result says
/// the attempt produced is cut to the disk it could have filled, and its stored output keeps
/// the bytes the operator received.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claimed_excess_past_the_scratch_disk_is_cut() {
    let op = operator_with(PRICED).await;
    let dir = tempfile::tempdir().unwrap();
    let mut facts = claims(2000, 2 << 30, "");
    facts.capacity.as_mut().unwrap().ephemeral_storage_bytes = 1 << 30;
    let mut holder = HostileAgent::join(&op, dir.path(), "boaster", facts).await.unwrap();
    holder.connect(&op).await;
    let yaml = "workload:\n  exec:\n    command: [/bin/true]\nresources: {cpu: 250m, memory: 64Mi}\noutputs: {paths: [a, b]}\n";
    let jr = job("boast-job");
    assert_eq!(op.dispatcher.sync(&jr, &policy(yaml), None).await.unwrap().placed, 1);
    let assign = holder.assigned().await;
    let id = assign.attempt_id.clone();
    upload_claiming(&op, &holder, &id, "stdout", 4, b"four", u64::MAX).await.unwrap();
    let stored = op.dispatcher.outputs().unwrap().manifest(&id).unwrap();
    assert_eq!((stored[0].size, stored[0].excess_bytes), (4, (1 << 30) - 4), "one file's claim is cut to the disk");

    let receipt = holder.receipt(&id, &assign.job, AttemptState::Succeeded, plausible(100, 250));
    let unsent = vec![
        OutputFile { name: "out/a".into(), size: 0, sha256: String::new(), excess_bytes: u64::MAX },
        OutputFile { name: "out/b".into(), size: 0, sha256: String::new(), excess_bytes: 5 << 30 },
    ];
    let result = TaskResult { exit_code: 0, output_sha256: kommune_proto::sha256_hex(b"four"), outputs: unsent, ..Default::default() };
    let update = TaskUpdate { trace: None, attempt_id: id.clone(), state: AttemptState::Succeeded as i32, result: Some(result), receipt: Some(receipt) };
    holder.sender().send(AgentMessage { kind: Some(agent_message::Kind::TaskUpdate(update)) }).await.unwrap();
    holder.ack_for(&id).await;
    let recorded = op.dispatcher.store().attempt(&id).await.unwrap().unwrap().result.unwrap().outputs;
    let total: u64 = recorded.iter().map(|o| o.size + o.excess_bytes).sum();
    assert_eq!(total, 1 << 30, "size and excess of all outputs fill the 1 GiB disk and no more: {recorded:?}");
    assert_eq!(recorded.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["out/a", "out/b", "stdout"]);
}

/// Uploaded files are metered as output, so a provider may claim them: up to what the job lets
/// an attempt upload (`maxAttemptSize`) on top of stdout's cap, never more. A job without
/// outputs still bounds output at stdout's cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn output_claimed_past_the_jobs_upload_limit_is_refused_and_within_it_is_paid() {
    use kommune_proto::limits::MAX_STDOUT_BYTES;
    let op = operator_with(PRICED).await;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = HostileAgent::join(&op, dir.path(), "uploader", claims(2000, 2 << 30, "")).await.unwrap();
    agent.connect(&op).await;
    let with_outputs =
        "workload:\n  exec:\n    command: [/bin/true]\ntasks: 2\nresources: {cpu: 250m, memory: 64Mi}\noutputs: {paths: [a], maxAttemptSize: 1Mi}\n";
    let without = "workload:\n  exec:\n    command: [/bin/true]\nresources: {cpu: 250m, memory: 64Mi}\n";
    assert_eq!(op.dispatcher.sync(&job("uploads"), &policy(with_outputs), None).await.unwrap().placed, 2);
    assert_eq!(op.dispatcher.sync(&job("no-uploads"), &policy(without), None).await.unwrap().placed, 1);
    let mut assigns = vec![];
    for _ in 0..3 {
        let a = agent.assigned().await;
        agent.say_running(&a.attempt_id).await;
        assigns.push(a);
    }
    let limit = MAX_STDOUT_BYTES + (1 << 20);
    for a in &assigns {
        let (claimed, paid) = match (a.job.contains("no-uploads"), a.task_index) {
            (true, _) => (MAX_STDOUT_BYTES + 1, false),
            (false, 0) => (limit, true),
            (false, _) => (limit + 1, false),
        };
        let ack = agent.report(a, AttemptState::Succeeded, Usage { output_bytes: claimed, ..plausible(100, 250) }).await;
        if paid {
            assert!(ack.receipt_rejected.is_empty() && ack.cost_micros > 0, "{} claiming {claimed}: {ack:?}", a.attempt_id);
        } else {
            assert!(ack.receipt_rejected.contains("output of"), "{} claiming {claimed}: {ack:?}", a.attempt_id);
            assert_eq!(ack.cost_micros, 0);
        }
    }
}
