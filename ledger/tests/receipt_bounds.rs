//! The receipt check against any usage an agent can sign: for every figure from 0 to u64::MAX
//! and every bound, the check never panics, and a receipt it accepts never costs more than the
//! worst case of its attempt's bounds (what a budget reserved for it) plus the measurement
//! slack. Bounded for CI by `PROPTEST_CASES` (512 by default: each case signs and verifies).

use std::time::Duration;

use kommune_core::bounds::{self, UsageBounds};
use kommune_core::pricing::{Micros, Rates};
use kommune_ledger::check::{self, AttemptFacts, ReceiptInput};
use kommune_proto::receipt;
use kommune_proto::v1::{AttemptState, ReceiptBody, Usage};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512)
}

/// Mostly plausible figures, often extreme ones.
fn figure(plausible: u64) -> impl Strategy<Value = u64> {
    prop_oneof![3 => 0..=plausible, 1 => any::<u64>(), 1 => Just(u64::MAX), 1 => (0u32..64).prop_map(|s| 1u64 << s)]
}

fn usage() -> impl Strategy<Value = Usage> {
    (figure(120_000), figure(500_000_000), figure(8 << 30), figure(1 << 40), figure(1 << 40), figure(500_000), figure(32 << 20)).prop_map(
        |(wall_millis, cpu_micros, memory_peak_bytes, memory_mib_millis, wasm_fuel, gpu_millis, output_bytes)| Usage {
            wall_millis,
            cpu_micros,
            memory_peak_bytes,
            memory_mib_millis,
            wasm_fuel,
            gpu_millis,
            output_bytes,
            source: "proc".into(),
        },
    )
}

fn usage_bounds() -> impl Strategy<Value = UsageBounds> {
    (0u64..64_000, 0u64..(64 << 30), 0u32..8, proptest::option::of(0u64..7_200_000)).prop_map(|(cpu_millis, memory_bytes, gpus, timeout)| UsageBounds {
        cpu_millis,
        memory_bytes,
        gpus,
        output_bytes: kommune_proto::limits::MAX_STDOUT_BYTES,
        timeout: timeout.map(Duration::from_millis),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn an_accepted_receipt_never_costs_more_than_its_bounds_allow(u in usage(), b in usage_bounds(), observed in 0i64..7_200_000, rate in 0u64..10_000_000) {
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let body = ReceiptBody {
            node: "n".into(),
            epoch: 1,
            sequence: 1,
            attempt_id: "a".into(),
            job: "ns/j".into(),
            state: AttemptState::Succeeded as i32,
            usage: Some(u.clone()),
            started_unix_millis: 0,
            finished_unix_millis: 0,
        };
        let rates = Rates { cpu_core_hour: Micros(rate), memory_gib_hour: Micros(rate / 10), gpu_hour: Micros(rate * 10), output_gib: Micros(rate) };
        let input = ReceiptInput {
            receipt: receipt::sign(&body, &key),
            session_node: "n".into(),
            node_public_key: key.verifying_key().to_bytes(),
            attempt: AttemptFacts {
                attempt_id: "a".into(),
                job_uid: "uid".into(),
                job_key: "ns/j".into(),
                node: "n".into(),
                bounds: b,
                observed_start_ms: 1_000,
                observed_end_ms: 1_000 + observed,
            },
            rates,
            received_ms: 1_000 + observed,
        };
        if let Ok(v) = check::check(&input) {
            // Every bounded resource used in full for the wall the receipt claims (itself
            // within the observed span and the timeout)...
            let wall = Duration::from_millis(u.wall_millis);
            let worst = bounds::worst_case(&UsageBounds { timeout: Some(wall), ..b }, wall, &rates);
            // ...plus the measurement slack, which is paid too (5% and 0.1 s of CPU).
            let slack = worst.0 / 20 + rates.cpu_core_hour.0 / 36_000 + 2;
            prop_assert!(v.cost.0 <= worst.0 + slack, "cost {} over the worst case {} (+{}) for {:?} within {:?}", v.cost, worst, slack, u, b);
        }
    }
}
