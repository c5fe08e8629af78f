//! Ledger throughput and audit speed, measured through the real code paths:
//!
//! * `backend=B receipts_per_s=X p50_ms=Y p99_ms=Z`: receipts signed with real node keys,
//!   submitted by many concurrent tasks through `Ledger::submit` (checks, batch signature
//!   verification, dedup, group commit), latency from submit to the durable verdict. SQLite
//!   always; PostgreSQL when `DATABASE_URL` is set (in a fresh database it creates).
//! * `verify_entries=N seconds=S`: a chain of N entries written to the embedded store in big
//!   transactions, then the full `verify` (hashes, every signature, costs, checkpoints).
//!
//! `cargo bench -p kommune-store --bench ledger`; `KOMMUNE_BENCH_QUICK=1` for a smoke run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use kommune_core::fence::Fence;
use kommune_core::pricing::{Micros, Rates, cost};
use kommune_proto::receipt;
use kommune_proto::v1::{AttemptState, ReceiptBody, Usage};
use kommune_store::ledger::backend::Backend;
use kommune_store::ledger::check::{AttemptFacts, ReceiptInput};
use kommune_store::ledger::entry::{CHECKPOINT_EVERY, Checkpoint, Entry, EntryKind, GENESIS, NodeTotal, UsageFigures, node_totals_sha256};
use kommune_store::ledger::sqlite::SqliteBackend;
use kommune_store::ledger::verify::VerifyOptions;
use kommune_store::ledger::{Ledger, LedgerConfig, Verdict, verify_stored};

const NODES: usize = 64;
const RATES: Rates = Rates { cpu_core_hour: Micros(36_000), memory_gib_hour: Micros(3_600), gpu_hour: Micros(1_000_000), output_gib: Micros(2_000) };

fn node_keys() -> Vec<SigningKey> {
    (0..NODES).map(|i| SigningKey::from_bytes(&[i as u8 + 1; 32])).collect()
}

fn node_name(i: usize) -> String {
    format!("pn-{i:03}-provider")
}

fn body(i: usize) -> ReceiptBody {
    let node = i % NODES;
    ReceiptBody {
        node: node_name(node),
        epoch: 1_700_000_000_000,
        sequence: (i / NODES) as u64 + 1,
        attempt_id: format!("3f2a9c1e-7b4d-4e8a-9c1f-{i:012x}-0-1"),
        job: "team-a/render-frames".into(),
        state: AttemptState::Succeeded as i32,
        usage: Some(Usage {
            wall_millis: 4_000 + (i % 1000) as u64,
            cpu_micros: 3_500_000 + (i % 777) as u64,
            memory_peak_bytes: 200 << 20,
            memory_mib_millis: 200 * 4_000,
            wasm_fuel: 123_456_789,
            gpu_millis: 0,
            output_bytes: 4096,
            source: "wasm-thread".into(),
        }),
        started_unix_millis: 1_700_000_000_000,
        finished_unix_millis: 1_700_000_004_000,
    }
}

/// Signs receipts 0..n on every core.
fn signed(n: usize, keys: &[SigningKey]) -> Vec<kommune_proto::v1::UsageReceipt> {
    let threads = std::thread::available_parallelism().map(|t| t.get()).unwrap_or(1);
    let chunk = n.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| s.spawn(move || (t * chunk..((t + 1) * chunk).min(n)).map(|i| receipt::sign(&body(i), &keys[i % NODES])).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("signing thread")).collect()
    })
}

fn input(i: usize, r: kommune_proto::v1::UsageReceipt, keys: &[SigningKey]) -> ReceiptInput {
    let b = body(i);
    ReceiptInput {
        receipt: r,
        session_node: b.node.clone(),
        node_public_key: keys[i % NODES].verifying_key().to_bytes(),
        attempt: AttemptFacts {
            attempt_id: b.attempt_id,
            job_uid: "6b1c-uid".into(),
            job_key: b.job,
            node: b.node,
            bounds: kommune_core::bounds::for_attempt(&kommune_core::bounds::Assigned { cpu_millis: 1000, memory_bytes: 1 << 30, ..Default::default() }),
            observed_start_ms: 1_700_000_000_000,
            observed_end_ms: 1_700_000_005_000,
        },
        rates: RATES,
        received_ms: 1_700_000_005_100 + i as i64,
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn bench_submit(backend: &str, database_url: Option<String>, n: usize, in_flight: usize) {
    let keys = node_keys();
    let t = Instant::now();
    let receipts = signed(n, &keys);
    eprintln!("{backend}: signed {n} receipts in {:.1}s", t.elapsed().as_secs_f64());
    let inputs: Arc<Vec<ReceiptInput>> = Arc::new(receipts.into_iter().enumerate().map(|(i, r)| input(i, r, &keys)).collect());
    let dir = tempfile::tempdir().expect("temp dir");
    let ledger =
        Arc::new(Ledger::open(LedgerConfig { data_dir: dir.path().to_path_buf(), database_url, fence: Fence::open(), key_file: None }).expect("open ledger"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (elapsed, mut latencies) = rt.block_on(async {
        for (i, k) in keys.iter().enumerate() {
            ledger.register_node_key(&node_name(i), k.verifying_key().to_bytes()).await.expect("register key");
        }
        let next = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let tasks: Vec<_> = (0..in_flight)
            .map(|_| {
                let (ledger, inputs, next) = (ledger.clone(), inputs.clone(), next.clone());
                tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(inputs.len() / in_flight + 1);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(input) = inputs.get(i) else { break };
                        let t = Instant::now();
                        let v = ledger.submit(input.clone()).await.expect("submit");
                        lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        assert!(matches!(v, Verdict::Accepted { .. }), "receipt {i}: {v:?}");
                    }
                    lat
                })
            })
            .collect();
        let mut all = Vec::with_capacity(inputs.len());
        for t in tasks {
            all.extend(t.await.expect("submitter"));
        }
        (start.elapsed(), all)
    });
    latencies.sort_unstable();
    let rate = n as f64 / elapsed.as_secs_f64();
    println!("backend={backend} receipts_per_s={rate:.0} p50_ms={:.2} p99_ms={:.2}", percentile(&latencies, 0.50), percentile(&latencies, 0.99));
    let head = rt.block_on(ledger.head()).expect("head").expect("entries");
    eprintln!("{backend}: {n} receipts in {:.2}s, {in_flight} in flight, head entry {}", elapsed.as_secs_f64(), head.seq);
}

/// Writes an n-entry chain (node keys, receipts, a checkpoint every CHECKPOINT_EVERY entries)
/// straight into the embedded store in big transactions.
fn build_chain(dir: &std::path::Path, n: usize) {
    let keys = node_keys();
    let operator = SigningKey::from_bytes(&[99; 32]);
    let t = Instant::now();
    let receipts = signed(n, &keys);
    eprintln!("verify: signed {n} receipts in {:.1}s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let mut b = SqliteBackend::open(dir).expect("open ledger.db");
    let (mut seq, mut prev, mut since_cp) = (0u64, GENESIS, 0u64);
    let mut totals: BTreeMap<String, NodeTotal> = BTreeMap::new();
    let (mut receipt_count, mut total) = (0u64, Micros(0));
    let mut batch: Vec<Entry> = Vec::with_capacity(50_000);
    let push = |e: Entry, batch: &mut Vec<Entry>, prev: &mut [u8; 32], b: &mut SqliteBackend| {
        let e = e.seal(*prev);
        *prev = e.hash32().expect("sealed");
        batch.push(e);
        if batch.len() >= 50_000 {
            b.append(batch, &[], None).expect("append");
            batch.clear();
        }
    };
    for (i, k) in keys.iter().enumerate() {
        seq += 1;
        since_cp += 1;
        push(Entry::node_key(seq, 1, &node_name(i), k.verifying_key().to_bytes()), &mut batch, &mut prev, &mut b);
    }
    let mut receipts = receipts.into_iter().enumerate();
    while (seq as usize) < n {
        if since_cp >= CHECKPOINT_EVERY {
            seq += 1;
            since_cp = 0;
            let cp =
                Checkpoint { upto_seq: seq - 1, head_hash: prev, entry_count: seq - 1, receipt_count, total, node_totals_sha256: node_totals_sha256(&totals) };
            push(Entry::checkpoint(seq, 2, &cp, &operator), &mut batch, &mut prev, &mut b);
            continue;
        }
        let (i, r) = receipts.next().expect("enough receipts");
        let body = body(i);
        let usage = body.usage.clone().unwrap_or_default();
        let c = cost(&usage, &RATES);
        seq += 1;
        since_cp += 1;
        let e = Entry {
            seq,
            kind: EntryKind::Receipt,
            recorded_ms: 1_700_000_005_100 + i as i64,
            node: body.node.clone(),
            epoch: body.epoch,
            sequence: body.sequence,
            attempt_id: body.attempt_id.clone(),
            job_uid: "6b1c-uid".into(),
            job_key: body.job.clone(),
            body: r.body,
            signature: r.signature,
            public_key: keys[i % NODES].verifying_key().to_bytes().to_vec(),
            rates: RATES,
            cost: c,
            usage: UsageFigures::from(&usage),
            prev_hash: vec![],
            hash: vec![],
        };
        receipt_count += 1;
        total = total.saturating_add(c);
        let t = totals.entry(body.node).or_default();
        t.total = t.total.saturating_add(c);
        t.receipts += 1;
        push(e, &mut batch, &mut prev, &mut b);
    }
    if !batch.is_empty() {
        b.append(&batch, &[], None).expect("append");
    }
    eprintln!("verify: wrote {n} entries in {:.1}s", t.elapsed().as_secs_f64());
}

fn bench_verify(n: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    build_chain(dir.path(), n);
    let mut b = SqliteBackend::open(dir.path()).expect("open ledger.db");
    let t = Instant::now();
    let report = verify_stored(&mut b, VerifyOptions::default()).expect("read ledger").expect("the chain verifies");
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(report.entries, n as u64);
    println!("verify_entries={n} seconds={secs:.2}");
    eprintln!("verify: {} receipts, {} checkpoints, {:.1} us per entry", report.receipts, report.checkpoints, secs * 1e6 / n as f64);
}

/// A fresh database on the server at `url` for one run.
fn fresh_database(url: &str) -> (String, String) {
    let name = format!("kommune_bench_{}", std::process::id());
    let mut admin = postgres::Client::connect(url, postgres::NoTls).expect("connect to DATABASE_URL");
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).expect("drop old bench database");
    admin.batch_execute(&format!("CREATE DATABASE {name}")).expect("create bench database");
    let (main, query) = url.split_once('?').map_or((url, None), |(m, q)| (m, Some(q)));
    let start = main.find("://").map_or(0, |i| i + 3);
    let path = main[start..].find('/').map_or(main.len(), |i| start + i);
    let db_url = format!("{}/{name}{}", &main[..path], query.map(|q| format!("?{q}")).unwrap_or_default());
    (db_url, name)
}

/// Single-thread cost of the pieces, so a missed target can be explained (stderr only).
fn components() {
    use ed25519_dalek::{Signature, Verifier, VerifyingKey};
    let keys = node_keys();
    let receipts = signed(4096, &keys);
    let msgs: Vec<Vec<u8>> = receipts.iter().map(|r| receipt::signed_message(&r.body)).collect();
    let sigs: Vec<Signature> = receipts.iter().map(|r| Signature::from_slice(&r.signature).expect("64 bytes")).collect();
    let vks: Vec<VerifyingKey> = (0..receipts.len()).map(|i| keys[i % NODES].verifying_key()).collect();
    let t = Instant::now();
    for i in 0..msgs.len() {
        vks[i].verify(&msgs[i], &sigs[i]).expect("valid");
    }
    let single = t.elapsed().as_secs_f64() * 1e6 / msgs.len() as f64;
    let t = Instant::now();
    for c in 0..msgs.len() / 256 {
        let r = c * 256..(c + 1) * 256;
        let m: Vec<&[u8]> = msgs[r.clone()].iter().map(|m| m.as_slice()).collect();
        ed25519_dalek::verify_batch(&m, &sigs[r.clone()], &vks[r]).expect("valid batch");
    }
    let batch = t.elapsed().as_secs_f64() * 1e6 / msgs.len() as f64;
    let e = Entry::node_key(1, 1, "pn-1", [1; 32]);
    let e = Entry { body: receipts[0].body.clone(), signature: receipts[0].signature.clone(), ..e };
    let t = Instant::now();
    for _ in 0..100_000 {
        std::hint::black_box(std::hint::black_box(&e).compute_hash());
    }
    let hash = t.elapsed().as_secs_f64() * 1e6 / 100_000.0;
    eprintln!("components (one thread): ed25519 verify {single:.1} us/sig, batch of 256 {batch:.1} us/sig, entry hash {hash:.2} us");
}

fn main() {
    // `cargo bench` passes --bench; there are no options to parse.
    let quick = std::env::var_os("KOMMUNE_BENCH_QUICK").is_some();
    let (receipts, verify_n, in_flight) = if quick { (20_000, 50_000, 256) } else { (300_000, 1_000_000, 1024) };
    components();
    bench_submit("sqlite", None, receipts, in_flight);
    if let Ok(url) = std::env::var("DATABASE_URL") {
        let (db_url, name) = fresh_database(&url);
        bench_submit("postgres", Some(db_url), receipts, in_flight);
        if let Ok(mut admin) = postgres::Client::connect(&url, postgres::NoTls) {
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        }
    }
    bench_verify(verify_n);
    std::thread::sleep(Duration::from_millis(10));
}
