//! Receipt checks before anything reaches the ledger: the node's signature, who sent it, which
//! attempt it meters, and whether the usage is possible. Every figure is a claim of the node's,
//! checked against what the operator assigned and observed (`kommune_core::bounds`): wall time
//! against the observed span and the task timeout, CPU against the cores the attempt could use,
//! memory against what it could hold, GPU time against the GPUs it held, output against the
//! output limit. A receipt over any bound is refused whole and costs nothing. Pure: no I/O, no
//! clock.

use std::fmt;

use ed25519_dalek::{Signature, VerifyingKey};
use kommune_proto::receipt::{self, ReceiptError};
use kommune_proto::v1::{ReceiptBody, Usage, UsageReceipt};

use kommune_core::bounds::UsageBounds;
use kommune_core::pricing::{self, Micros, Rates};

/// Wall time may exceed what the operator observed by this much (clock granularity, the agent
/// starting its timer a little before the operator saw the attempt start)...
pub const WALL_SLACK_MILLIS: u64 = 2_000;
/// ...plus this many per mille of the observed duration (clock drift over long attempts).
pub const WALL_SLACK_PER_MILLE: u64 = 10;
/// CPU time may exceed assigned cores x wall time by this many per mille (accounting noise:
/// the runtime's own threads, rounding of rusage)...
pub const CPU_SLACK_PER_MILLE: u64 = 50;
/// ...plus this much absolute CPU time (process start-up on very short attempts).
pub const CPU_SLACK_MICROS: u64 = 100_000;
/// Memory and GPU time may exceed their bound x wall time by this many per mille (sampling
/// steps of the memory integral, device clocks)...
pub const RESOURCE_SLACK_PER_MILLE: u64 = 50;
/// ...and a memory peak its bound by this much (the runtime's own pages).
pub const MEMORY_PEAK_SLACK_BYTES: u64 = 64 << 20;

/// What the operator knows about the attempt a receipt claims to meter (from its store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptFacts {
    /// The attempt id the operator assigned.
    pub attempt_id: String,
    /// The ComputeJob's uid.
    pub job_uid: String,
    /// "namespace/name" of the ComputeJob.
    pub job_key: String,
    /// The node the attempt was assigned to.
    pub node: String,
    /// The most the attempt could have used (see `kommune_core::bounds`).
    pub bounds: UsageBounds,
    /// When the operator saw the attempt start (assignment), Unix ms on the operator's clock.
    pub observed_start_ms: i64,
    /// When the operator saw the attempt end (terminal update), Unix ms on the operator's clock.
    pub observed_end_ms: i64,
}

/// One receipt as the gateway hands it to the ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceiptInput {
    /// The receipt exactly as the agent sent it.
    pub receipt: UsageReceipt,
    /// The node name of the authenticated session (from its client certificate).
    pub session_node: String,
    /// The node's registered ed25519 public key.
    pub node_public_key: [u8; 32],
    /// The attempt as the operator recorded it.
    pub attempt: AttemptFacts,
    /// The effective rates for this provider (cluster rates with its overrides applied).
    pub rates: Rates,
    /// When the operator received the receipt, Unix ms; becomes the entry's `recorded_ms`.
    pub received_ms: i64,
}

/// A receipt that passed every check, priced.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedReceipt {
    /// The decoded body (its bytes are `input.receipt.body`).
    pub body: ReceiptBody,
    /// The usage the body carries.
    pub usage: Usage,
    /// Cost of the usage at the input's rates.
    pub cost: Micros,
}

/// Why a receipt was refused. The Display text is meant for the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The body is oversized or does not decode.
    Malformed(String),
    /// The signature is malformed or does not verify with the node's registered key.
    BadSignature(String),
    /// The node key given is not registered for the node.
    UnregisteredKey { node: String },
    /// The body names another node than the session that sent it.
    WrongNode { body: String, session: String },
    /// The attempt was assigned to another node.
    NotAssigned { attempt_id: String, assigned: String, node: String },
    /// The body meters another attempt than the one it was submitted for.
    WrongAttempt { body: String, expected: String },
    /// The body carries no usage.
    NoUsage,
    /// Wall time longer than what the operator observed (plus slack).
    WallTooLong { wall_millis: u64, observed_millis: u64 },
    /// Wall time longer than the task's timeout (plus slack): the agent stops a task there.
    WallPastTimeout { wall_millis: u64, timeout_millis: u64 },
    /// CPU time more than the cores the attempt could use x wall time (plus slack).
    CpuTooHigh { cpu_micros: u64, cpu_millis: u64, wall_millis: u64 },
    /// Memory (integral or peak) above what the attempt could hold (plus slack).
    MemoryTooHigh { claimed: String, memory_bytes: u64 },
    /// GPU time more than the GPUs the attempt held x wall time (plus slack).
    GpuTooHigh { gpu_millis: u64, gpus: u32, wall_millis: u64 },
    /// More output than an attempt may write.
    OutputTooLarge { output_bytes: u64, limit: u64 },
    /// A different receipt already uses this (node, epoch, sequence).
    SequenceReused { node: String, epoch: u64, sequence: u64, seq: u64 },
    /// The attempt was already metered by another receipt.
    AttemptAlreadyMetered { attempt_id: String, seq: u64 },
}

impl Rejection {
    /// Every kind [`Rejection::kind`] returns: a bounded label set for metrics.
    pub const KINDS: [&'static str; 15] = [
        "malformed",
        "bad_signature",
        "unregistered_key",
        "wrong_node",
        "not_assigned",
        "wrong_attempt",
        "no_usage",
        "wall_too_long",
        "wall_past_timeout",
        "cpu_too_high",
        "memory_too_high",
        "gpu_too_high",
        "output_too_large",
        "sequence_reused",
        "attempt_already_metered",
    ];

    /// The rule the receipt broke, as a fixed snake_case name (no values from the receipt), so
    /// it can label a metric without making one series per provider or attempt.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::Malformed(_) => "malformed",
            Rejection::BadSignature(_) => "bad_signature",
            Rejection::UnregisteredKey { .. } => "unregistered_key",
            Rejection::WrongNode { .. } => "wrong_node",
            Rejection::NotAssigned { .. } => "not_assigned",
            Rejection::WrongAttempt { .. } => "wrong_attempt",
            Rejection::NoUsage => "no_usage",
            Rejection::WallTooLong { .. } => "wall_too_long",
            Rejection::WallPastTimeout { .. } => "wall_past_timeout",
            Rejection::CpuTooHigh { .. } => "cpu_too_high",
            Rejection::MemoryTooHigh { .. } => "memory_too_high",
            Rejection::GpuTooHigh { .. } => "gpu_too_high",
            Rejection::OutputTooLarge { .. } => "output_too_large",
            Rejection::SequenceReused { .. } => "sequence_reused",
            Rejection::AttemptAlreadyMetered { .. } => "attempt_already_metered",
        }
    }
}

fn secs(millis: u64) -> String {
    format!("{}.{}s", millis / 1000, (millis % 1000) / 100)
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Malformed(e) => write!(f, "malformed receipt: {e}; the agent must send the body it signed, unmodified"),
            Rejection::BadSignature(e) => write!(f, "{e}; sign receipts with the node key registered at join"),
            Rejection::UnregisteredKey { node } => write!(f, "the key presented is not registered for node {node}; re-join to register it"),
            Rejection::WrongNode { body, session } => {
                write!(f, "receipt is for node {body:?} but was sent by node {session:?}; a node may only submit its own receipts")
            }
            Rejection::NotAssigned { attempt_id, assigned, node } => {
                write!(f, "attempt {attempt_id} was assigned to node {assigned:?}, not {node:?}; only the assigned node is paid for it")
            }
            Rejection::WrongAttempt { body, expected } => write!(f, "receipt meters attempt {body:?} but was submitted for attempt {expected:?}"),
            Rejection::NoUsage => write!(f, "receipt carries no usage; measure the attempt and sign the usage"),
            Rejection::WallTooLong { wall_millis, observed_millis } => {
                write!(f, "wall time {} exceeds the {} the operator observed for the attempt", secs(*wall_millis), secs(*observed_millis))
            }
            Rejection::WallPastTimeout { wall_millis, timeout_millis } => {
                write!(f, "wall time {} exceeds the task timeout of {}", secs(*wall_millis), secs(*timeout_millis))
            }
            Rejection::CpuTooHigh { cpu_micros, cpu_millis, wall_millis } => {
                let cores = format!("{}", *cpu_millis as f64 / 1000.0);
                write!(f, "cpu time {} exceeds {cores} cores x {} wall", secs(cpu_micros / 1000), secs(*wall_millis))
            }
            Rejection::MemoryTooHigh { claimed, memory_bytes } => {
                write!(f, "{claimed} exceeds the {} MiB the attempt could hold", memory_bytes >> 20)
            }
            Rejection::GpuTooHigh { gpu_millis, gpus, wall_millis } => {
                write!(f, "gpu time {} exceeds {gpus} GPU(s) x {} wall", secs(*gpu_millis), secs(*wall_millis))
            }
            Rejection::OutputTooLarge { output_bytes, limit } => write!(f, "output of {output_bytes} bytes exceeds the limit of {limit} bytes"),
            Rejection::SequenceReused { node, epoch, sequence, seq } => {
                write!(
                    f,
                    "node {node} epoch {epoch} sequence {sequence} was already used by a different receipt (ledger entry {seq}); sequences must never be reused"
                )
            }
            Rejection::AttemptAlreadyMetered { attempt_id, seq } => write!(f, "attempt {attempt_id} was already metered by ledger entry {seq}"),
        }
    }
}

/// Everything about a receipt except its signature: decode, identity, attempt and plausibility.
/// Split out so the ledger can verify a batch of signatures at once.
pub fn check_content(input: &ReceiptInput) -> Result<VerifiedReceipt, Rejection> {
    let body = receipt::decode(&input.receipt).map_err(|e| Rejection::Malformed(e.to_string()))?;
    let a = &input.attempt;
    if body.node != input.session_node {
        return Err(Rejection::WrongNode { body: body.node, session: input.session_node.clone() });
    }
    if a.node != body.node {
        return Err(Rejection::NotAssigned { attempt_id: a.attempt_id.clone(), assigned: a.node.clone(), node: body.node });
    }
    if body.attempt_id != a.attempt_id {
        return Err(Rejection::WrongAttempt { body: body.attempt_id, expected: a.attempt_id.clone() });
    }
    let Some(usage) = body.usage.clone() else {
        return Err(Rejection::NoUsage);
    };
    within_bounds(&usage, a)?;
    let cost = pricing::cost(&usage, &input.rates);
    Ok(VerifiedReceipt { body, usage, cost })
}

/// `millis` plus the wall-time slack.
fn with_wall_slack(millis: u64) -> u64 {
    millis.saturating_add(WALL_SLACK_MILLIS).saturating_add(millis / 1000 * WALL_SLACK_PER_MILLE)
}

/// `per_ms` x `wall_millis` plus `per_mille` of it: a resource's ceiling over the wall time.
fn over_wall(per_ms: u64, wall_millis: u64, per_mille: u64) -> u128 {
    per_ms as u128 * wall_millis as u128 * (1000 + per_mille) as u128 / 1000
}

/// Every usage figure against what the attempt could have used. The wall time is checked
/// first: every other bound is a rate over it.
fn within_bounds(usage: &Usage, a: &AttemptFacts) -> Result<(), Rejection> {
    let b = &a.bounds;
    let wall = usage.wall_millis;
    let observed_millis = u64::try_from(a.observed_end_ms.saturating_sub(a.observed_start_ms)).unwrap_or(0);
    if wall > with_wall_slack(observed_millis) {
        return Err(Rejection::WallTooLong { wall_millis: wall, observed_millis });
    }
    if let Some(timeout) = b.timeout {
        let timeout_millis = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        if wall > with_wall_slack(timeout_millis) {
            return Err(Rejection::WallPastTimeout { wall_millis: wall, timeout_millis });
        }
    }
    // cores x wall in CPU micros: cpu_millis/1000 cores x wall_millis x 1000 us/ms.
    if usage.cpu_micros as u128 > over_wall(b.cpu_millis, wall, CPU_SLACK_PER_MILLE) + CPU_SLACK_MICROS as u128 {
        return Err(Rejection::CpuTooHigh { cpu_micros: usage.cpu_micros, cpu_millis: b.cpu_millis, wall_millis: wall });
    }
    // MiB x ms, with the bound rounded up to whole MiB.
    if usage.memory_mib_millis as u128 > over_wall(b.memory_bytes.div_ceil(1 << 20), wall, RESOURCE_SLACK_PER_MILLE) {
        let claimed = format!("memory of {} MiB-seconds over {}", usage.memory_mib_millis / 1000, secs(wall));
        return Err(Rejection::MemoryTooHigh { claimed, memory_bytes: b.memory_bytes });
    }
    if usage.memory_peak_bytes > b.memory_bytes.saturating_add(b.memory_bytes / 1000 * RESOURCE_SLACK_PER_MILLE).saturating_add(MEMORY_PEAK_SLACK_BYTES) {
        let claimed = format!("a memory peak of {} MiB", usage.memory_peak_bytes >> 20);
        return Err(Rejection::MemoryTooHigh { claimed, memory_bytes: b.memory_bytes });
    }
    if usage.gpu_millis as u128 > over_wall(b.gpus as u64, wall, RESOURCE_SLACK_PER_MILLE) {
        return Err(Rejection::GpuTooHigh { gpu_millis: usage.gpu_millis, gpus: b.gpus, wall_millis: wall });
    }
    if usage.output_bytes > b.output_bytes {
        return Err(Rejection::OutputTooLarge { output_bytes: usage.output_bytes, limit: b.output_bytes });
    }
    Ok(())
}

/// The parsed signature material of a receipt, ready for single or batch verification.
pub struct SignedMessage {
    pub message: Vec<u8>,
    pub signature: Signature,
    pub key: VerifyingKey,
}

/// Decompressed public keys by their 32 bytes. Decompressing a key costs about as much as
/// batch-verifying a signature, and a ledger sees the same few keys over and over.
#[derive(Default)]
pub struct KeyCache {
    keys: std::collections::HashMap<[u8; 32], VerifyingKey>,
}

impl KeyCache {
    /// Most keys kept; past it the cache starts over (a bound, not a working-set policy:
    /// fleets are far smaller).
    const MAX: usize = 1 << 16;

    /// The key for `bytes`, or the rejection a malformed one gets.
    pub fn get(&mut self, bytes: &[u8]) -> Result<VerifyingKey, ReceiptError> {
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| ReceiptError::BadKey)?;
        if let Some(k) = self.keys.get(&bytes) {
            return Ok(*k);
        }
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| ReceiptError::BadKey)?;
        if self.keys.len() >= Self::MAX {
            self.keys.clear();
        }
        self.keys.insert(bytes, key);
        Ok(key)
    }
}

/// Parses key and signature; the error is the rejection a malformed one gets.
pub fn signed_message(body: &[u8], signature: &[u8], public_key: &[u8], keys: &mut KeyCache) -> Result<SignedMessage, Rejection> {
    let bad = |e: ReceiptError| Rejection::BadSignature(e.to_string());
    let key = keys.get(public_key).map_err(bad)?;
    let sig: [u8; 64] = signature.try_into().map_err(|_| bad(ReceiptError::BadSignatureLength(signature.len())))?;
    Ok(SignedMessage { message: receipt::signed_message(body), signature: Signature::from_bytes(&sig), key })
}

/// Verifies many signatures, batching where possible; returns one verdict per message, in
/// order. A failed batch falls back to single verification, which is authoritative.
pub fn verify_signatures(msgs: &[&SignedMessage]) -> Vec<bool> {
    if msgs.is_empty() {
        return vec![];
    }
    let m: Vec<&[u8]> = msgs.iter().map(|s| s.message.as_slice()).collect();
    let s: Vec<Signature> = msgs.iter().map(|s| s.signature).collect();
    let k: Vec<VerifyingKey> = msgs.iter().map(|s| s.key).collect();
    if ed25519_dalek::verify_batch(&m, &s, &k).is_ok() {
        return vec![true; msgs.len()];
    }
    // The same (non-strict) check as `kommune_proto::receipt::verify`.
    msgs.iter().map(|s| ed25519_dalek::Verifier::verify(&s.key, &s.message, &s.signature).is_ok()).collect()
}

/// Checks one receipt completely: signature first, then content.
pub fn check(input: &ReceiptInput) -> Result<VerifiedReceipt, Rejection> {
    check_many(std::slice::from_ref(input)).pop().expect("one input gives one verdict")
}

/// Checks many receipts, verifying their signatures as one batch.
pub fn check_many(inputs: &[ReceiptInput]) -> Vec<Result<VerifiedReceipt, Rejection>> {
    check_refs(&inputs.iter().collect::<Vec<_>>(), &mut KeyCache::default())
}

/// [`check_many`] over borrowed inputs.
pub fn check_refs(inputs: &[&ReceiptInput], keys: &mut KeyCache) -> Vec<Result<VerifiedReceipt, Rejection>> {
    let parsed: Vec<Result<SignedMessage, Rejection>> = inputs
        .iter()
        .map(|i| {
            if i.receipt.body.len() > receipt::MAX_BODY_BYTES {
                return Err(Rejection::Malformed(ReceiptError::TooLarge(i.receipt.body.len()).to_string()));
            }
            signed_message(&i.receipt.body, &i.receipt.signature, &i.node_public_key, keys)
        })
        .collect();
    let ok: Vec<&SignedMessage> = parsed.iter().filter_map(|p| p.as_ref().ok()).collect();
    let mut verdicts = verify_signatures(&ok).into_iter();
    inputs
        .iter()
        .zip(parsed)
        .map(|(input, p)| {
            p?;
            if !verdicts.next().unwrap_or(false) {
                return Err(Rejection::BadSignature(ReceiptError::BadSignature.to_string()));
            }
            check_content(input)
        })
        .collect()
}

#[cfg(any(test, feature = "testing"))]
pub mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use kommune_proto::v1::AttemptState;

    pub fn node_key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    pub fn facts(attempt: &str, node: &str) -> AttemptFacts {
        AttemptFacts {
            attempt_id: attempt.into(),
            job_uid: "uid-1".into(),
            job_key: "ns/job".into(),
            node: node.into(),
            bounds: UsageBounds {
                cpu_millis: 2000,
                memory_bytes: 256 << 20,
                gpus: 0,
                output_bytes: kommune_proto::limits::MAX_STDOUT_BYTES,
                timeout: Some(std::time::Duration::from_secs(60)),
            },
            observed_start_ms: 1_000_000,
            observed_end_ms: 1_004_000,
        }
    }

    pub fn body(node: &str, epoch: u64, sequence: u64, attempt: &str, usage: Usage) -> ReceiptBody {
        ReceiptBody {
            node: node.into(),
            epoch,
            sequence,
            attempt_id: attempt.into(),
            job: "ns/job".into(),
            state: AttemptState::Succeeded as i32,
            usage: Some(usage),
            started_unix_millis: 1_000_000,
            finished_unix_millis: 1_004_000,
        }
    }

    pub fn usage() -> Usage {
        Usage { wall_millis: 4000, cpu_micros: 7_000_000, memory_mib_millis: 100 * 4000, output_bytes: 1 << 20, source: "rusage".into(), ..Default::default() }
    }

    pub fn rates() -> Rates {
        Rates { cpu_core_hour: Micros(36_000), memory_gib_hour: Micros(3_600), gpu_hour: Micros(1_000_000), output_gib: Micros(2_000) }
    }

    /// A genuine receipt from node `pn-<seed>` for attempt `a-<seed>-<sequence>`.
    pub fn input(seed: u8, epoch: u64, sequence: u64) -> ReceiptInput {
        let node = format!("pn-{seed}");
        let attempt = format!("a-{seed}-{epoch}-{sequence}");
        let key = node_key(seed);
        ReceiptInput {
            receipt: receipt::sign(&body(&node, epoch, sequence, &attempt, usage()), &key),
            session_node: node.clone(),
            node_public_key: key.verifying_key().to_bytes(),
            attempt: facts(&attempt, &node),
            rates: rates(),
            received_ms: 1_004_100,
        }
    }

    #[cfg(test)]
    fn resign(mut i: ReceiptInput, f: impl FnOnce(&mut ReceiptBody)) -> ReceiptInput {
        let mut b = receipt::decode(&i.receipt).unwrap();
        f(&mut b);
        i.receipt = receipt::sign(&b, &node_key(1));
        i
    }

    #[test]
    fn a_genuine_plausible_receipt_is_priced_at_the_given_rates() {
        let v = check(&input(1, 1, 1)).unwrap();
        assert_eq!(v.cost, pricing::cost(&usage(), &rates()));
        assert_eq!(v.body.sequence, 1);
    }

    #[test]
    fn each_way_a_receipt_can_be_wrong_gets_its_own_reason() {
        let base = input(1, 1, 1);
        let cases: Vec<(&str, ReceiptInput, &str)> = vec![
            (
                "flipped body byte",
                {
                    let mut i = base.clone();
                    let n = i.receipt.body.len();
                    i.receipt.body[n - 3] ^= 1;
                    i
                },
                "signature does not verify",
            ),
            (
                "flipped signature",
                {
                    let mut i = base.clone();
                    i.receipt.signature[5] ^= 1;
                    i
                },
                "signature does not verify",
            ),
            (
                "short signature",
                {
                    let mut i = base.clone();
                    i.receipt.signature.truncate(10);
                    i
                },
                "not 64",
            ),
            ("another node's key", ReceiptInput { node_public_key: node_key(2).verifying_key().to_bytes(), ..base.clone() }, "signature does not verify"),
            (
                "signed by another key",
                {
                    let mut i = base.clone();
                    i.receipt = receipt::sign(&receipt::decode(&i.receipt).unwrap(), &node_key(3));
                    i
                },
                "signature does not verify",
            ),
            (
                "garbage body",
                {
                    let mut i = base.clone();
                    i.receipt = UsageReceipt { body: vec![0xff; 8], signature: vec![] };
                    i
                },
                "not 64",
            ),
            (
                "oversized body",
                {
                    let mut i = base.clone();
                    i.receipt.body = vec![0; 5000];
                    i
                },
                "malformed receipt",
            ),
            ("sent by another session", ReceiptInput { session_node: "pn-2".into(), ..base.clone() }, "sent by node \"pn-2\""),
            ("attempt assigned elsewhere", ReceiptInput { attempt: facts("a-1-1-1", "pn-9"), ..base.clone() }, "assigned to node \"pn-9\""),
            ("another attempt", ReceiptInput { attempt: facts("a-other", "pn-1"), ..base.clone() }, "submitted for attempt \"a-other\""),
            ("no usage", resign(base.clone(), |b| b.usage = None), "no usage"),
            ("wall too long", resign(base.clone(), |b| b.usage.as_mut().unwrap().wall_millis = 6_100), "wall time 6.1s exceeds the 4.0s"),
            ("cpu too high", resign(base.clone(), |b| b.usage.as_mut().unwrap().cpu_micros = 9_200_000), "cpu time 9.2s exceeds 2 cores x 4.0s wall"),
            ("gpu time without a gpu", resign(base.clone(), |b| b.usage.as_mut().unwrap().gpu_millis = 1 << 63), "exceeds 0 GPU(s) x 4.0s wall"),
            ("memory integral", resign(base.clone(), |b| b.usage.as_mut().unwrap().memory_mib_millis = u64::MAX), "exceeds the 256 MiB"),
            (
                "memory peak",
                resign(base.clone(), |b| b.usage.as_mut().unwrap().memory_peak_bytes = 1 << 40),
                "a memory peak of 1048576 MiB exceeds the 256 MiB",
            ),
            ("output", resign(base.clone(), |b| b.usage.as_mut().unwrap().output_bytes = u64::MAX), "exceeds the limit of 16777216 bytes"),
            (
                "past the timeout",
                {
                    let mut i = resign(base.clone(), |b| b.usage.as_mut().unwrap().wall_millis = 4_000);
                    i.attempt.bounds.timeout = Some(std::time::Duration::from_secs(1));
                    i
                },
                "wall time 4.0s exceeds the task timeout of 1.0s",
            ),
        ];
        for (what, i, want) in cases {
            let err = check(&i).expect_err(what).to_string();
            assert!(err.contains(want), "{what}: {err}");
        }
    }

    #[test]
    fn tolerances_admit_small_measurement_noise_and_nothing_more() {
        let base = input(1, 1, 1);
        // 4 s observed: wall up to 4 s + 2 s + 1% of 4 s = 6.04 s.
        assert!(check(&resign(base.clone(), |b| b.usage.as_mut().unwrap().wall_millis = 6_040)).is_ok());
        assert!(check(&resign(base.clone(), |b| b.usage.as_mut().unwrap().wall_millis = 6_041)).is_err());
        // 2 cores x 4 s = 8 s, +5% = 8.4 s, +0.1 s = 8.5 s.
        assert!(check(&resign(base.clone(), |b| b.usage.as_mut().unwrap().cpu_micros = 8_500_000)).is_ok());
        assert!(check(&resign(base.clone(), |b| b.usage.as_mut().unwrap().cpu_micros = 8_500_001)).is_err());
        // The operator's clock going backwards never makes a negative window.
        let mut i = base.clone();
        i.attempt.observed_end_ms = 0;
        assert!(matches!(check(&i), Err(Rejection::WallTooLong { observed_millis: 0, .. })));
    }

    #[test]
    fn every_bound_admits_its_honest_maximum_and_refuses_one_unit_more() {
        // 4 s wall; bounds: 2 cores, 256 MiB, 1 GPU, 16 MiB of output, 60 s timeout.
        let mut base = input(1, 1, 1);
        base.attempt.bounds.gpus = 1;
        let at = |f: fn(&mut Usage, u64), v: u64| {
            let mut i = resign(base.clone(), |b| f(b.usage.as_mut().unwrap(), v));
            i.attempt.bounds.gpus = 1;
            check(&i)
        };
        type Set = fn(&mut Usage, u64);
        let cases: [(&str, Set, u64); 4] = [
            // 256 MiB x 4,000 ms x 1.05.
            ("memory integral", |u, v| u.memory_mib_millis = v, 256 * 4000 * 1050 / 1000),
            // 256 MiB + 5% + 64 MiB.
            ("memory peak", |u, v| u.memory_peak_bytes = v, (256 << 20) + (256 << 20) / 1000 * 50 + (64 << 20)),
            // 1 GPU x 4,000 ms x 1.05.
            ("gpu", |u, v| u.gpu_millis = v, 4200),
            ("output", |u, v| u.output_bytes = v, kommune_proto::limits::MAX_STDOUT_BYTES),
        ];
        for (what, f, max) in cases {
            assert!(at(f, max).is_ok(), "{what}: the maximum is honest");
            assert!(at(f, max + 1).is_err(), "{what}: one more is refused");
        }
    }

    #[test]
    fn a_cpu_bound_wasm_task_at_a_quarter_core_is_paid_for_its_whole_thread() {
        // The request is 250m but a wasm guest is not throttled to it: one thread, one core.
        let mut i = input(1, 1, 1);
        i.attempt.bounds = kommune_core::bounds::for_attempt(&kommune_core::bounds::Assigned {
            runtime: Some(kommune_proto::runtime::WASM),
            cpu_millis: 250,
            memory_bytes: 64 << 20,
            ..Default::default()
        });
        let i = resign(ReceiptInput { attempt: AttemptFacts { bounds: i.attempt.bounds, ..i.attempt.clone() }, ..i }, |b| {
            let u = b.usage.as_mut().unwrap();
            (u.cpu_micros, u.memory_mib_millis, u.output_bytes) = (3_990_000, 64 * 4000, 12);
        });
        let v = check(&i).expect("an honest single-threaded guest is within its bound");
        assert!(v.cost.0 > 0);
    }

    #[test]
    fn a_batch_with_one_forgery_rejects_only_the_forgery() {
        let mut inputs: Vec<ReceiptInput> = (1..=20).map(|s| input(1, 1, s)).collect();
        inputs[7].receipt.signature[0] ^= 0x40;
        let out = check_many(&inputs);
        for (i, r) in out.iter().enumerate() {
            assert_eq!(r.is_ok(), i != 7, "receipt {i}: {r:?}");
        }
    }
}
