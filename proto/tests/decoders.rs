//! Every decoder that reads what an agent or a submitter sends, fed hostile input: random
//! bytes and strings, and mutations (bit flips, truncations, splices, repeats) of the committed
//! seed corpus in `tests/corpus/<target>/`. Each must return an error or a value, never panic,
//! and a value must survive its own round trip. Bounded for CI: `PROPTEST_CASES` cases per
//! target (4,096 by default, about a second each; a long run sets more).
//!
//! The corpus holds real encodings (a receipt body, each agent message, a join request, tokens,
//! quantities) and past finds; add a file there when a case is worth keeping.

use std::path::PathBuf;
use std::str::FromStr;

use kommune_proto::receipt;
use kommune_proto::token::JoinToken;
use kommune_proto::v1::{AgentMessage, JoinRequest, OperatorMessage, ReceiptBody, TaskUpdate, UsageReceipt};
use proptest::prelude::*;
use prost::Message;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten().map(|e| e.path()).collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "{} has no seeds", dir.display());
    seeds
}

/// Hostile inputs for `target`: random bytes, or a seed mutated.
fn inputs(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = corpus(target);
    let n = seeds.len();
    let random = proptest::collection::vec(any::<u8>(), 0..4096);
    let mutated = (0..n, proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..5), 1..8)).prop_map(move |(i, edits)| {
        let mut b = seeds[i].clone();
        for (at, byte, how) in edits {
            let at = if b.is_empty() { 0 } else { at % b.len() };
            match how {
                0 if !b.is_empty() => b[at] ^= 1 << (byte % 8),
                1 => b.truncate(at),
                2 => b.insert(at, byte),
                3 => {
                    let tail = b[at..].to_vec();
                    b.extend_from_slice(&tail);
                }
                _ if !b.is_empty() => b[at] = byte,
                _ => b.push(byte),
            }
        }
        b
    });
    prop_oneof![1 => random, 3 => mutated]
}

/// Cases per target: `PROPTEST_CASES`, else 4,096.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(4096)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn receipt_bodies_decode_or_refuse(bytes in inputs("receipt_body")) {
        if let Ok(body) = receipt::decode_body(&bytes) {
            // What decodes re-encodes to something that decodes to the same body.
            prop_assert_eq!(receipt::decode_body(&body.encode_to_vec()).unwrap(), body);
        } else {
            prop_assert!(bytes.len() > receipt::MAX_BODY_BYTES || ReceiptBody::decode(bytes.as_slice()).is_err());
        }
        // Checking a signature over garbage never panics either.
        let r = UsageReceipt { body: bytes.clone(), signature: bytes.iter().copied().take(64).collect() };
        let _ = receipt::verify(&r, &[7; 32]);
    }

    #[test]
    fn agent_messages_decode_or_refuse(bytes in inputs("agent_message")) {
        if let Ok(m) = AgentMessage::decode(bytes.as_slice()) {
            prop_assert_eq!(AgentMessage::decode(m.encode_to_vec().as_slice()).unwrap(), m);
        }
        let _ = TaskUpdate::decode(bytes.as_slice());
        let _ = OperatorMessage::decode(bytes.as_slice());
    }

    #[test]
    fn join_requests_decode_or_refuse(bytes in inputs("join_request")) {
        if let Ok(m) = JoinRequest::decode(bytes.as_slice()) {
            prop_assert_eq!(JoinRequest::decode(m.encode_to_vec().as_slice()).unwrap(), m.clone());
            // The token inside is parsed by the operator too.
            let _ = JoinToken::from_str(&m.token);
        }
    }

    #[test]
    fn join_tokens_parse_or_refuse(bytes in inputs("join_token")) {
        let s = text(&bytes);
        match JoinToken::from_str(&s) {
            Ok(t) => prop_assert_eq!(JoinToken::from_str(&t.to_string()).unwrap(), t),
            // A refusal never repeats the secret part it was given.
            // (Its text may still contain the same characters by chance, from the fixed message or
            // another part: the same token with the secret replaced shows whether they came from it.)
            Err(e) => {
                let secret = s.split('.').nth(2).unwrap_or("");
                let masked: Vec<String> = s.split('.').enumerate().map(|(i, p)| if i == 2 { "~".repeat(p.chars().count()) } else { p.to_string() }).collect();
                let without = JoinToken::from_str(&masked.join(".")).err().map(|e| e.to_string()).unwrap_or_default();
                prop_assert!(secret.len() < 8 || !e.to_string().contains(secret) || without.contains(secret), "{}", e);
            }
        }
    }

    #[test]
    fn quantities_parse_or_refuse(bytes in inputs("quantity")) {
        let s = text(&bytes);
        if let Ok(m) = kommune_proto::quantity::cpu_millis("q", &s) {
            prop_assert_eq!(kommune_proto::quantity::cpu_millis("q", &kommune_proto::quantity::format_cpu(m)).unwrap(), m);
        }
        if let Ok(b) = kommune_proto::quantity::memory_bytes("q", &s) {
            prop_assert_eq!(kommune_proto::quantity::memory_bytes("q", &kommune_proto::quantity::format_memory(b)).unwrap(), b);
        }
        let _ = kommune_proto::is_pinned_image(&s);
    }
}

/// The seeds themselves are what they claim to be (so the mutations start from real input).
#[test]
fn the_corpus_seeds_are_valid_encodings() {
    for b in corpus("receipt_body") {
        receipt::decode_body(&b).unwrap();
    }
    for b in corpus("agent_message") {
        AgentMessage::decode(b.as_slice()).unwrap();
    }
    for b in corpus("join_request") {
        JoinRequest::decode(b.as_slice()).unwrap();
    }
    assert!(corpus("join_token").iter().any(|b| JoinToken::from_str(text(b).trim()).is_ok()));
    assert!(corpus("quantity").iter().any(|b| kommune_proto::quantity::memory_bytes("q", text(b).trim()).is_ok()));
}

/// Writes the seed corpus (run once with KOMMUNE_WRITE_CORPUS=1; the files are committed).
#[test]
fn write_seed_corpus() {
    if std::env::var_os("KOMMUNE_WRITE_CORPUS").is_none() {
        return;
    }
    use kommune_proto::v1::{self, agent_message::Kind};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let put = |target: &str, name: &str, bytes: Vec<u8>| {
        std::fs::create_dir_all(dir.join(target)).unwrap();
        std::fs::write(dir.join(target).join(name), bytes).unwrap();
    };
    let usage = v1::Usage {
        wall_millis: 4000,
        cpu_micros: 3_900_000,
        memory_peak_bytes: 64 << 20,
        memory_mib_millis: 256_000,
        wasm_fuel: 12345,
        gpu_millis: 0,
        output_bytes: 42,
        source: "wasm-thread".into(),
    };
    let body = ReceiptBody {
        node: "laptop-1".into(),
        epoch: 3,
        sequence: 17,
        attempt_id: "6b1c-uid.4.1".into(),
        job: "ns/job".into(),
        state: v1::AttemptState::Succeeded as i32,
        usage: Some(usage.clone()),
        started_unix_millis: 1_700_000_000_000,
        finished_unix_millis: 1_700_000_004_000,
    };
    put("receipt_body", "succeeded", body.encode_to_vec());
    put("receipt_body", "preempted-no-usage", ReceiptBody { usage: None, state: v1::AttemptState::Preempted as i32, ..body.clone() }.encode_to_vec());
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let receipt = receipt::sign(&body, &key);
    let facts = v1::NodeFacts {
        capacity: Some(v1::Capacity {
            cpu_millis: 4000,
            memory_bytes: 8 << 30,
            runtimes: vec!["wasm".into(), "exec".into()],
            arch: "x86_64".into(),
            os: "linux".into(),
            ..Default::default()
        }),
        agent_version: "0.1.0".into(),
        region: "eu-west".into(),
        zone: "eu-west-a".into(),
    };
    let messages = [
        ("hello", Kind::Hello(v1::Hello { facts: Some(facts.clone()), running_attempt_ids: vec!["u.1.1".into(), "u.2.1.r1".into()], paused: false })),
        ("heartbeat", Kind::Heartbeat(v1::Heartbeat { running_attempt_ids: vec!["u.1.1".into()], paused: true })),
        (
            "task-update",
            Kind::TaskUpdate(v1::TaskUpdate {
                attempt_id: "6b1c-uid.4.1".into(),
                state: v1::AttemptState::Succeeded as i32,
                result: Some(v1::TaskResult {
                    exit_code: 0,
                    output_sha256: "ab".repeat(32),
                    output_bytes: 42,
                    stdout_tail: b"hello\n".to_vec(),
                    ..Default::default()
                }),
                receipt: Some(receipt),
                trace: None,
            }),
        ),
    ];
    for (name, kind) in messages {
        put("agent_message", name, AgentMessage { kind: Some(kind) }.encode_to_vec());
    }
    let token = JoinToken { id: "abc123".into(), secret: "s".repeat(20), ca_pin: "0f".repeat(32) };
    put(
        "join_request",
        "join",
        JoinRequest { token: token.to_string(), requested_name: "laptop-1".into(), csr_der: vec![0x30, 0x82, 1, 2, 3], facts: Some(facts) }.encode_to_vec(),
    );
    put("join_token", "valid", token.to_string().into_bytes());
    put("join_token", "wrong-prefix", b"kmn2.abc123.ssssssssssssssssssss.00".to_vec());
    for (name, q) in
        [("cpu-milli", "250m"), ("cpu-decimal", "1.5"), ("mem-binary", "64Mi"), ("mem-decimal", "1G"), ("exponent", "1e3"), ("huge", "99999999999999999999Ei")]
    {
        put("quantity", name, q.as_bytes().to_vec());
    }
}

/// Found by the property above: id and secret are the same text, and the refusal names the
/// id. That is not the secret leaking, and the property must not say it is.
#[test]
fn a_refusal_that_echoes_the_id_is_not_taken_for_a_leaked_secret_that_equals_it() {
    let s = text(b"kmn1.\x80bc123.\x80bc123.");
    let e = JoinToken::from_str(&s).unwrap_err().to_string();
    let masked = text(b"kmn1.\x80bc123.~~~~~~~~.");
    let without = JoinToken::from_str(&masked).unwrap_err().to_string();
    let secret = s.split('.').nth(2).unwrap();
    assert!(e.contains(secret) && without.contains(secret), "{e} / {without}");
}
