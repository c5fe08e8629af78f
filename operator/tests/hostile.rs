//! Hostile agents against a real operator gateway over loopback mTLS (issue 14): each test
//! performs one attack a joined provider can make and asserts it is refused or bounded, that
//! nothing is paid for it, that honest agents' tasks still finish and, where it leaves data
//! behind, that a restarted operator still opens its ledger. Tests whose defence is not in the
//! operator yet are ignored with the slice that brings it; `--run-ignored all` shows the attack.

// Shared with the component test; each test file uses part of it.
#[allow(dead_code)]
#[path = "support/operator.rs"]
mod harness;

// A crate root finds its modules next to it, so each names its file under hostile/.
#[path = "hostile/agent.rs"]
mod agent;
#[path = "hostile/blobs.rs"]
mod blobs;
#[path = "hostile/earnings.rs"]
mod earnings;
#[path = "hostile/gateway.rs"]
mod gateway;
#[path = "hostile/identity.rs"]
mod identity;
#[path = "hostile/live.rs"]
mod live;
#[path = "hostile/measure.rs"]
mod measure;
#[path = "hostile/metrics.rs"]
mod metrics;
#[path = "hostile/outputs.rs"]
mod outputs;
#[path = "hostile/receipts.rs"]
mod receipts;
#[path = "hostile/time.rs"]
mod time;
#[path = "hostile/verification.rs"]
mod verification;
#[path = "hostile/wasm.rs"]
mod wasm;

use kommune_operator::fleet::NodeAdmin;
use kommune_operator::pricing::{Micros, Rates};

/// Every resource has a price here, so a claim on any of them would show as cost: one credit
/// per core-hour, 0.1 per GiB-hour, 3 per GPU-hour, 0.05 per GiB of output.
pub const PRICED: Rates = Rates { cpu_core_hour: Micros(1_000_000), memory_gib_hour: Micros(100_000), gpu_hour: Micros(3_000_000), output_gib: Micros(50_000) };

/// Keeps the scheduler off `node` (what `spec.unschedulable` does), so honest work that runs
/// alongside an attack lands on honest nodes.
pub fn cordon(op: &harness::Operator, node: &str) {
    op.dispatcher.fleet().set_admin(node, NodeAdmin { cordoned: true, ..Default::default() });
}

/// A plausible usage for `wall_millis` at `cpu_millis` cores: what an honest agent would sign.
pub fn plausible(wall_millis: u64, cpu_millis: u64) -> kommune_proto::v1::Usage {
    kommune_proto::v1::Usage { wall_millis, cpu_micros: wall_millis * cpu_millis / 2, source: "proc".into(), ..Default::default() }
}
