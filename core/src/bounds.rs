//! What one attempt could possibly have used, from what the operator assigned and observed:
//! the ceiling every figure of its usage receipt is checked against. A figure above it is not
//! measured, it is claimed, and the receipt is refused (see `kommune_ledger::check`). Pure.
//!
//! CPU is bounded by the cores the attempt could really use on its runtime, not by its
//! request, because only containers are throttled to their request: a wasm guest runs on one
//! thread of its own (measured with that thread's CPU clock) and an exec task may use every
//! core its node offered. Memory likewise: wasm linear memory and containers are capped at the
//! request, exec tasks only by the machine.

use std::time::Duration;

use crate::pricing::{self, Micros, Rates};
use crate::scheduler::Resources;

/// CPU a wasm guest can use: its one thread.
pub const WASM_CPU_MILLIS: u64 = 1000;

/// The most an attempt could have used of each resource.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageBounds {
    /// Cores the attempt could keep busy, in millicores.
    pub cpu_millis: u64,
    /// Memory it could hold at once.
    pub memory_bytes: u64,
    /// GPUs assigned to it.
    pub gpus: u32,
    /// Output it could write and be paid for: stdout, and the declared files it uploads.
    pub output_bytes: u64,
    /// Its wall-clock limit, when the job's policy is known.
    pub timeout: Option<Duration>,
}

/// What the operator knows about one attempt when bounding it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Assigned<'a> {
    /// wasm, exec or container; None when the job is not known right now.
    pub runtime: Option<&'a str>,
    /// CPU and memory the attempt reserved.
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// GPU devices it holds.
    pub gpus: u32,
    /// What its node offers for placement (after the admin's caps), if the node is known.
    pub node_capacity: Option<Resources>,
    /// The job's task timeout, if the job is known.
    pub timeout: Option<Duration>,
    /// What the job lets one attempt upload as outputs (`spec.outputs.maxAttemptSize`), 0 when
    /// it declares none; None when the job is not known (then the largest a job may allow).
    pub output_files_bytes: Option<u64>,
}

/// The ceiling for an attempt of `a`.
pub fn for_attempt(a: &Assigned<'_>) -> UsageBounds {
    use kommune_proto::runtime::{CONTAINER, EXEC, WASM};
    let node = a.node_capacity.unwrap_or_default();
    let (cpu, memory) = match a.runtime {
        Some(r) if r == CONTAINER => (a.cpu_millis, a.memory_bytes),
        Some(r) if r == WASM => (WASM_CPU_MILLIS, a.memory_bytes),
        Some(r) if r == EXEC => (a.cpu_millis.max(node.cpu_millis), a.memory_bytes.max(node.memory_bytes)),
        // Not known (a receipt after an operator restart, before its job was synced again):
        // the loosest of the rules above.
        _ => (a.cpu_millis.max(node.cpu_millis).max(WASM_CPU_MILLIS), a.memory_bytes.max(node.memory_bytes)),
    };
    // Uploaded files are output the provider's machine sent (and is paid for), on top of stdout.
    let files = a.output_files_bytes.unwrap_or(kommune_proto::limits::MAX_ATTEMPT_OUTPUTS);
    let output_bytes = kommune_proto::limits::MAX_STDOUT_BYTES.saturating_add(files);
    UsageBounds { cpu_millis: cpu, memory_bytes: memory, gpus: a.gpus, output_bytes, timeout: a.timeout }
}

/// The most an attempt within `b` can cost at `rates` over `timeout` (its bounds' own timeout
/// when set): every bounded resource used in full for the whole time, and the whole output.
/// What a budget reserves per attempt, so a receipt that passes its checks never costs more.
pub fn worst_case(b: &UsageBounds, timeout: Duration, rates: &Rates) -> Micros {
    let timeout = b.timeout.unwrap_or(timeout);
    let hourly = pricing::hourly_ceiling(b.cpu_millis, b.memory_bytes, b.gpus, rates).0 as u128;
    let time = (hourly * timeout.as_millis()).div_ceil(3_600_000);
    let output = (b.output_bytes as u128 * rates.output_gib.0 as u128).div_ceil(1 << 30);
    Micros(u64::try_from(time + output).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kommune_proto::runtime::{CONTAINER, EXEC, WASM};

    const GI: u64 = 1 << 30;

    fn assigned(runtime: Option<&str>) -> Assigned<'_> {
        Assigned {
            runtime,
            cpu_millis: 250,
            memory_bytes: GI,
            gpus: 1,
            node_capacity: Some(Resources { cpu_millis: 8000, memory_bytes: 32 * GI, ephemeral_bytes: 0 }),
            timeout: Some(Duration::from_secs(60)),
            output_files_bytes: Some(0),
        }
    }

    #[test]
    fn each_runtime_is_bounded_by_what_it_can_really_use() {
        let cases = [
            // Throttled by the engine to the request.
            (Some(CONTAINER), 250, GI),
            // One guest thread, whatever it asked; linear memory capped at the request.
            (Some(WASM), 1000, GI),
            // Not throttled: the whole node it offered.
            (Some(EXEC), 8000, 32 * GI),
            // Job not known: the loosest rule.
            (None, 8000, 32 * GI),
        ];
        for (runtime, cpu, memory) in cases {
            let b = for_attempt(&assigned(runtime));
            assert_eq!((b.cpu_millis, b.memory_bytes), (cpu, memory), "{runtime:?}");
            assert_eq!((b.gpus, b.timeout), (1, Some(Duration::from_secs(60))), "{runtime:?}");
            assert_eq!(b.output_bytes, kommune_proto::limits::MAX_STDOUT_BYTES);
        }
    }

    #[test]
    fn uploaded_files_are_output_up_to_the_jobs_limit_else_the_largest_a_job_may_allow() {
        use kommune_proto::limits::{MAX_ATTEMPT_OUTPUTS, MAX_STDOUT_BYTES};
        let cases = [(Some(0), MAX_STDOUT_BYTES), (Some(256 << 20), MAX_STDOUT_BYTES + (256 << 20)), (None, MAX_STDOUT_BYTES + MAX_ATTEMPT_OUTPUTS)];
        for (files, output) in cases {
            let b = for_attempt(&Assigned { output_files_bytes: files, ..assigned(Some(EXEC)) });
            assert_eq!(b.output_bytes, output, "{files:?}");
        }
    }

    #[test]
    fn the_worst_case_charges_every_bound_in_full_for_the_timeout() {
        let rates = Rates { cpu_core_hour: Micros(3_600), memory_gib_hour: Micros(360), gpu_hour: Micros(36_000), output_gib: Micros(1 << 10) };
        let b = UsageBounds { cpu_millis: 2000, memory_bytes: GI, gpus: 1, output_bytes: 1 << 20, timeout: None };
        // Per hour: 2 cores 7,200 + 1 GiB 360 + 1 GPU 36,000 = 43,560; for 10 s: 121; output 1 MiB: 1.
        assert_eq!(worst_case(&b, Duration::from_secs(10), &rates), Micros(121 + 1));
        let capped = UsageBounds { timeout: Some(Duration::from_secs(3600)), ..b };
        assert_eq!(worst_case(&capped, Duration::from_secs(10), &rates), Micros(43_560 + 1), "the bounds' own timeout wins");
    }

    #[test]
    fn the_worst_case_is_rounded_up_never_down_to_zero() {
        let rates = Rates { cpu_core_hour: Micros(3_600_000), ..Default::default() };
        let cpu = |m: u64| UsageBounds { cpu_millis: m, output_bytes: 0, ..Default::default() };
        assert_eq!(worst_case(&cpu(1000), Duration::from_secs(3600), &rates), Micros(3_600_000));
        assert_eq!(worst_case(&cpu(1000), Duration::from_secs(1), &rates), Micros(1_000));
        assert_eq!(worst_case(&cpu(1000), Duration::from_millis(1), &rates), Micros(1));
        assert_eq!(worst_case(&cpu(1), Duration::from_millis(1), &rates), Micros(1), "rounded up, not down to zero");
        assert_eq!(worst_case(&cpu(1000), Duration::ZERO, &rates), Micros(0));
    }

    #[test]
    fn a_request_above_what_the_node_offers_still_bounds_an_exec_task() {
        let a = Assigned { cpu_millis: 16_000, node_capacity: None, ..assigned(Some(EXEC)) };
        assert_eq!(for_attempt(&a).cpu_millis, 16_000);
        let wasm = Assigned { cpu_millis: 4000, ..assigned(Some(WASM)) };
        assert_eq!(for_attempt(&wasm).cpu_millis, 1000, "a wasm guest never uses more than its thread");
    }
}
