//! Test builders shared by the dispatcher's tests: policies, job references and connected
//! provider nodes.

use std::time::Duration;

use kommune_proto::v1;
use tokio::sync::mpsc;

use super::JobRef;
use crate::fleet::{Fleet, NodeFacts};
use crate::job::{JobPolicy, TaskWorkload};
use crate::scheduler::Resources;

/// An exec job of `tasks` tasks, all at once, `cpu_millis` and 64Mi each, one attempt.
pub fn exec_policy(tasks: u32, cpu_millis: u64) -> JobPolicy {
    JobPolicy {
        tasks,
        parallelism: tasks,
        cpu_millis,
        memory_bytes: 64 << 20,
        max_attempts: 1,
        backoff: Duration::from_secs(1),
        task_timeout: Duration::from_secs(60),
        job_deadline: None,
        suspended: false,
        budget: None,
        workload: TaskWorkload::Exec { command: vec!["true".into()], env: vec![] },
        ephemeral_bytes: 0,
        gpu: Default::default(),
        placement: crate::job::PlacementPolicy { replicas: 1, ..Default::default() },
        priority: 0,
        max_price_per_hour: None,
        verification: Default::default(),
        inputs: vec![],
        outputs: None,
    }
}

pub fn job(ns: &str, uid: &str) -> JobRef {
    JobRef { uid: uid.into(), key: format!("{ns}/{uid}") }
}

/// A wasm job of `tasks` tasks with `replicas` copies each, 500m per copy.
pub fn replicated_policy(tasks: u32, replicas: u32) -> JobPolicy {
    let source = crate::job::ModuleSource::Url { url: "https://example.com/m.wasm".into(), sha256: "0".repeat(64) };
    JobPolicy {
        workload: TaskWorkload::Wasm { source, args: vec![], env: vec![] },
        placement: crate::job::PlacementPolicy { replicas, ..Default::default() },
        ..exec_policy(tasks, 500)
    }
}

/// Connects `node` (1 cpu, 1Gi, wasm) owned by `owner`; returns its session's receiver.
pub fn provider(fleet: &Fleet, node: &str, owner: &str) -> mpsc::Receiver<std::result::Result<v1::OperatorMessage, tonic::Status>> {
    let (tx, rx) = mpsc::channel(16);
    let facts =
        NodeFacts { capacity: Resources { cpu_millis: 1000, memory_bytes: 1 << 30, ephemeral_bytes: 0 }, runtimes: vec!["wasm".into()], ..Default::default() };
    fleet.connect(node, facts, tx);
    fleet.set_admin(node, crate::fleet::NodeAdmin { owner: owner.into(), ..Default::default() });
    rx
}
