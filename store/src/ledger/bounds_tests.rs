//! What stored data cannot do to the ledger, on every backend: huge figures written past the
//! receipt checks still open, sum (saturated) and verify; rejected receipts stay bounded per node.

use futures::future::join_all;
use kommune_proto::receipt;
use kommune_proto::v1::Usage;

use super::tests::{Env, key_of, resign, rt};
use super::*;
use kommune_core::pricing::{self, Micros, Rates};
use kommune_ledger::check::tests::{input, node_key};
use kommune_ledger::records::{REJECTED_BODY_PREFIX, REJECTED_KEPT_PER_NODE, REJECTED_NAME_MAX, REJECTED_REASON_MAX, RejectedCount};

backend_suite!(
    receipts_with_huge_figures_stored_past_the_checks_still_open_sum_saturated_and_verify,
    earnings_are_read_per_key_so_a_name_used_by_two_keys_never_merges_them,
    a_flood_of_distinct_oversized_rejected_receipts_keeps_rows_and_disk_bounded,
    an_old_ledger_with_whole_rejected_bodies_opens_bounded_and_keeps_its_counts,
);

/// A receipt from pn-1 for `job`, signed, with `usage`, priced at `rates` and declared
/// verified: what a check that let anything through would hand the writer.
fn unchecked(sequence: u64, job: &str, usage: Usage, rates: Rates) -> (check::ReceiptInput, VerifiedReceipt) {
    let mut i = resign(input(1, 1, sequence), &node_key(1), |b| b.usage = Some(usage.clone()));
    i.attempt.job_uid = job.into();
    i.rates = rates;
    let body = receipt::decode(&i.receipt).unwrap();
    let cost = pricing::cost(&usage, &rates);
    (i, VerifiedReceipt { body, usage, cost })
}

/// The exact sum of `values`, saturated.
fn saturated(values: impl IntoIterator<Item = u64>) -> u64 {
    u64::try_from(values.into_iter().map(u128::from).sum::<u128>()).unwrap_or(u64::MAX)
}

fn receipts_with_huge_figures_stored_past_the_checks_still_open_sum_saturated_and_verify(env: &Env) {
    let max = Usage {
        wall_millis: u64::MAX,
        cpu_micros: u64::MAX,
        memory_peak_bytes: u64::MAX - 1,
        memory_mib_millis: 1 << 62,
        wasm_fuel: u64::MAX,
        gpu_millis: 1 << 62,
        output_bytes: u64::MAX,
        source: "hostile".into(),
    };
    let huge_rates = Rates { cpu_core_hour: Micros(u64::MAX), memory_gib_hour: Micros(u64::MAX), gpu_hour: Micros(u64::MAX), output_gib: Micros(u64::MAX) };
    let honest_rates = kommune_ledger::check::tests::rates();
    // Figures a plain SUM gets wrong: 2^62 + 2^62 overflows SQLite's SUM; u64::MAX + 5 wraps to
    // 4 in a signed column; a peak of 2^63 is negative there.
    let mixed = [
        Usage { wall_millis: 1 << 63, cpu_micros: 1 << 62, memory_peak_bytes: 1 << 63, gpu_millis: 1 << 62, output_bytes: 5, ..Default::default() },
        Usage {
            wall_millis: (1 << 63) - 1,
            cpu_micros: 1 << 62,
            memory_peak_bytes: 7,
            gpu_millis: (1 << 62) + 7,
            output_bytes: u64::MAX,
            ..Default::default()
        },
    ];
    let mut inputs: Vec<_> = (1..=4).map(|s| unchecked(s, "uid-huge", max.clone(), huge_rates)).collect();
    inputs.extend(mixed.iter().enumerate().map(|(k, u)| unchecked(10 + k as u64, "uid-mixed", u.clone(), honest_rates)));
    // The key `env.open()` signs with: the ledger refuses a writer whose key is not the chain's.
    let operator = load_or_create_key(env.dir.path()).unwrap();
    let (mut state, mut batch) = (ChainState::default(), Batch::default());
    state.register_key(&mut batch, "pn-1", key_of(1), "", 1, &operator);
    for (i, v) in &inputs {
        assert!(matches!(state.decide(&mut batch, i, &Ok(v.clone()), None, None, &operator), Verdict::Accepted { .. }));
    }
    state.checkpoint(&mut batch, 2, &operator);
    env.backend().append(&batch.entries, &[], None).expect("write straight into the backend");

    let rt = rt();
    let l = env.open();
    let huge = rt.block_on(l.job_usage("uid-huge")).unwrap();
    let u = huge.usage;
    assert_eq!((huge.receipts, huge.cost), (4, Micros(u64::MAX)));
    assert_eq!(
        (u.wall_millis, u.cpu_micros, u.memory_peak_bytes, u.memory_mib_millis, u.wasm_fuel, u.gpu_millis),
        (u64::MAX, u64::MAX, u64::MAX - 1, u64::MAX, u64::MAX, u64::MAX)
    );
    let m = rt.block_on(l.job_usage("uid-mixed")).unwrap();
    assert_eq!(m.usage.cpu_micros, 1 << 63, "exact, where SQLite's SUM fails");
    assert_eq!((m.usage.wall_millis, m.usage.gpu_millis, m.usage.output_bytes), (u64::MAX, (1 << 63) + 7, u64::MAX));
    assert_eq!(m.usage.memory_peak_bytes, 1 << 63, "the largest peak, read as unsigned");
    assert_eq!(m.cost.0, saturated(inputs[4..].iter().map(|(_, v)| v.cost.0)));
    let earned = rt.block_on(l.node_earnings("pn-1")).unwrap();
    assert_eq!((earned.pending, earned.receipts), (Micros(u64::MAX), 6));
    // The ledger still takes honest receipts, and its totals stay saturated.
    let genuine = input(1, 1, 1000);
    assert!(matches!(rt.block_on(l.submit(genuine)).unwrap(), Verdict::Accepted { .. }));
    assert_eq!(rt.block_on(l.job_usage("uid-1")).unwrap().receipts, 1);
    assert_eq!(rt.block_on(l.node_earnings("pn-1")).unwrap().pending, Micros(u64::MAX));
    assert_eq!(rt.block_on(l.job_usage("uid-huge")).unwrap().cost, Micros(u64::MAX));
    drop(l);

    let report = env.verify().expect("the chain is well formed: verify completes and finds nothing");
    assert_eq!((report.receipts, report.total, report.per_node["pn-1"].total), (7, Micros(u64::MAX), Micros(u64::MAX)));
    let location = cli::Location { data_dir: env.dir.path().to_path_buf(), database_url: env.url.clone() };
    let mut out = Vec::new();
    // The genuine receipt came after the last checkpoint.
    let args = cli::VerifyArgs { location, accept_unsigned_tail: true, ..Default::default() };
    cli::run(cli::LedgerCommand::Verify(args), &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    println!("{out}");
    assert!(out.starts_with("ledger OK: 9 entries (7 receipts, 1 checkpoints, 1 node keys)"), "{out}");
    assert!(out.contains(&format!("total credits: {}", Micros(u64::MAX))), "{out}");
}

fn earnings_are_read_per_key_so_a_name_used_by_two_keys_never_merges_them(env: &Env) {
    let rt = rt();
    let l = env.open();
    let cost = check::check(&input(1, 1, 1)).unwrap().cost;
    rt.block_on(async {
        l.register_node_key("pn-1", key_of(1)).await.unwrap();
        l.register_node_key("pn-1", key_of(7)).await.unwrap();
        for s in 1..=2 {
            assert!(matches!(l.submit(input(1, 1, s)).await.unwrap(), Verdict::Accepted { .. }));
        }
        let mut later = resign(input(1, 1, 3), &node_key(7), |_| {});
        later.node_public_key = key_of(7);
        assert!(matches!(l.submit(later).await.unwrap(), Verdict::Accepted { .. }));
    });
    let of = |key: [u8; 32]| rt.block_on(l.node_earnings_of_key("pn-1", key)).unwrap();
    assert_eq!((of(key_of(1)).pending, of(key_of(1)).receipts), (Micros(cost.0 * 2), 2));
    assert_eq!((of(key_of(7)).pending, of(key_of(7)).receipts), (cost, 1));
    assert_eq!((of(key_of(9)).pending, of(key_of(9)).receipts), (Micros(0), 0), "a key that signed nothing earned nothing");
    let all = rt.block_on(l.node_earnings("pn-1")).unwrap();
    assert_eq!((all.pending, all.receipts), (Micros(cost.0 * 3), 3));
    assert_eq!(of(key_of(7)).head, all.head);
}

/// Bytes the rejected receipts take: the SQLite file (read closed, so the WAL is folded in),
/// or the PostgreSQL tables with their indexes (vacuumed first).
fn stored_bytes(env: &Env) -> u64 {
    match &env.url {
        None => std::fs::metadata(env.dir.path().join("ledger.db")).unwrap().len(),
        Some(url) => {
            let mut c = ::postgres::Client::connect(url, ::postgres::NoTls).unwrap();
            // What autovacuum does in time: evicted rows' space becomes reusable.
            c.batch_execute("VACUUM ledger_rejected, ledger_rejected_counts").unwrap();
            let sql = "SELECT (pg_total_relation_size('ledger_rejected') + pg_total_relation_size('ledger_rejected_counts'))::bigint";
            c.query_one(sql, &[]).unwrap().get::<_, i64>(0) as u64
        }
    }
}

/// A receipt signed by pn-1 with a ~4 KiB attempt id that is not the attempt it is sent for.
fn oversized(s: u64) -> check::ReceiptInput {
    resign(input(1, 1, s), &node_key(1), |b| b.attempt_id = format!("{s:05}-{}", "x".repeat(3_950)))
}

fn a_flood_of_distinct_oversized_rejected_receipts_keeps_rows_and_disk_bounded(env: &Env) {
    let rt = rt();
    let forged = |s: u64| {
        let mut i = input(2, 1, s);
        i.receipt.signature[3] ^= 1;
        i
    };
    let flood = |l: &Ledger, from: u64| {
        let verdicts = rt.block_on(join_all((from..from + 2_000).map(|s| l.submit(oversized(s)))));
        assert!(verdicts.into_iter().all(|v| matches!(v.unwrap(), Verdict::Rejected { .. })));
    };
    let l = env.open();
    rt.block_on(async {
        l.register_node_key("pn-1", key_of(1)).await.unwrap();
        for s in 1..=3 {
            assert!(matches!(l.submit(forged(s)).await.unwrap(), Verdict::Rejected { .. }));
        }
    });
    drop(l);
    let before = stored_bytes(env);
    let l = env.open();
    flood(&l, 10_000);
    rt.block_on(async {
        for s in 4..=5 {
            assert!(matches!(l.submit(forged(s)).await.unwrap(), Verdict::Rejected { .. }));
        }
        // A repeat is counted on its row, not stored again.
        assert!(matches!(l.submit(forged(5)).await.unwrap(), Verdict::Rejected { .. }));
    });
    let count = rt.block_on(l.rejected_count("pn-1")).unwrap();
    assert_eq!(count, RejectedCount { received: 2_000, distinct: 2_000, evicted: 2_000 - REJECTED_KEPT_PER_NODE });
    let kept = rt.block_on(l.rejected("pn-1", u64::MAX)).unwrap();
    assert_eq!(kept.len() as u64, REJECTED_KEPT_PER_NODE);
    assert_eq!(count.kept(), REJECTED_KEPT_PER_NODE);
    for r in &kept {
        assert!(r.body_bytes > 4_000 && r.body_bytes <= receipt::MAX_BODY_BYTES as u64, "{}", r.body_bytes);
        assert_eq!((r.body_prefix.len(), r.signature_bytes), (REJECTED_BODY_PREFIX, 64));
        assert_eq!(r.attempt_id.chars().count(), REJECTED_NAME_MAX);
        assert!(r.reason.chars().count() <= REJECTED_REASON_MAX && !r.reason.is_empty(), "{}", r.reason);
    }
    assert_eq!(rt.block_on(l.rejected("pn-1", 3)).unwrap().len(), 3, "a read is bounded by its limit");
    assert_eq!(rt.block_on(l.rejected_count("pn-2")).unwrap(), RejectedCount { received: 6, distinct: 5, evicted: 0 }, "another node is untouched");
    assert_eq!(rt.block_on(l.rejected("pn-2", 100)).unwrap().len(), 5);
    // One more: it is kept, listed first, and the oldest kept one is evicted for it.
    let oldest = kept.last().unwrap().digest.clone();
    assert!(matches!(rt.block_on(l.submit(oversized(30_000))).unwrap(), Verdict::Rejected { .. }));
    let kept = rt.block_on(l.rejected("pn-1", u64::MAX)).unwrap();
    assert!(kept[0].attempt_id.starts_with("30000-"), "newest first: {}", kept[0].attempt_id);
    assert!(kept.len() as u64 == REJECTED_KEPT_PER_NODE && kept.iter().all(|r| r.digest != oldest));
    assert_eq!(rt.block_on(l.rejected_count("pn-1")).unwrap().evicted, 2_001 - REJECTED_KEPT_PER_NODE);
    drop(l);
    let after = stored_bytes(env);
    // A second flood evicts the first: what is stored stays about the same.
    let l = env.open();
    flood(&l, 20_000);
    assert_eq!(rt.block_on(l.rejected_count("pn-1")).unwrap().kept(), REJECTED_KEPT_PER_NODE);
    drop(l);
    let again = stored_bytes(env);
    let whole = 2_000 * (receipt::MAX_BODY_BYTES as u64 + 64);
    println!(
        "rejected flood ({}): stored bytes before {before}, after 2,000 distinct ~4 KiB receipts {after} (+{}), after 2,000 more {again} (+{}); kept whole they would be {whole}",
        if env.url.is_some() { "postgresql" } else { "sqlite" },
        after - before,
        again.saturating_sub(after)
    );
    // Rows are at most ~1 KiB (a 256-byte prefix, a 512-character reason, a 128-character
    // attempt id). SQLite reuses an evicted row's pages at once (measured: +1.1 MB, then +0);
    // PostgreSQL keeps an evicted row until (auto)vacuum, so each flood's own rows take space
    // until one runs (measured: +2.6 MB, then +1.4 MB after a vacuum, or +2.3 MB when none ran
    // in between, as in one CI run): either way well under the bodies.
    assert!(after - before < whole / 2, "the flood grew the store by {} bytes", after - before);
    assert!(again.saturating_sub(after) < whole / 2, "a second flood grew the store by {} bytes", again - after);
    if env.url.is_none() {
        assert!(again - after < 64 << 10, "SQLite reuses the evicted rows' pages: +{}", again - after);
    }
}

/// A `ledger_rejected` table as the ledger kept it before it was bounded: 1,200 whole 4 KiB
/// rejected bodies from pn-1 (each received twice) and 3 from pn-2.
fn make_old_rejected_table(env: &Env) {
    match &env.url {
        None => {
            let c = rusqlite::Connection::open(env.dir.path().join("ledger.db")).unwrap();
            c.execute_batch(
                "DROP TABLE ledger_rejected; DROP TABLE ledger_rejected_counts;
                 CREATE TABLE ledger_rejected (id INTEGER PRIMARY KEY, digest BLOB NOT NULL UNIQUE, first_ms INTEGER NOT NULL,
                     last_ms INTEGER NOT NULL, times INTEGER NOT NULL, session_node TEXT NOT NULL, node TEXT NOT NULL,
                     epoch INTEGER NOT NULL, sequence INTEGER NOT NULL, attempt_id TEXT NOT NULL, body BLOB NOT NULL,
                     signature BLOB NOT NULL, reason TEXT NOT NULL);
                 CREATE INDEX ledger_rejected_by_node ON ledger_rejected (session_node, id);
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1203)
                 INSERT INTO ledger_rejected (digest, first_ms, last_ms, times, session_node, node, epoch, sequence, attempt_id, body, signature, reason)
                 SELECT randomblob(32), i, i, CASE WHEN i <= 1200 THEN 2 ELSE 1 END, CASE WHEN i <= 1200 THEN 'pn-1' ELSE 'pn-2' END,
                     'pn-1', 1, i, 'a-' || i || '-' || hex(randomblob(200)), randomblob(4096), randomblob(64), 'forged ' || hex(randomblob(400)) FROM n;",
            )
            .unwrap();
        }
        Some(url) => {
            let mut c = ::postgres::Client::connect(url, ::postgres::NoTls).unwrap();
            c.batch_execute(
                "DROP TABLE ledger_rejected; DROP TABLE ledger_rejected_counts;
                 CREATE TABLE ledger_rejected (id BIGSERIAL PRIMARY KEY, digest BYTEA NOT NULL UNIQUE, first_ms BIGINT NOT NULL,
                     last_ms BIGINT NOT NULL, times BIGINT NOT NULL, session_node TEXT NOT NULL, node TEXT NOT NULL,
                     epoch BIGINT NOT NULL, sequence BIGINT NOT NULL, attempt_id TEXT NOT NULL, body BYTEA NOT NULL,
                     signature BYTEA NOT NULL, reason TEXT NOT NULL);
                 CREATE INDEX ledger_rejected_by_node ON ledger_rejected (session_node, id);
                 INSERT INTO ledger_rejected (digest, first_ms, last_ms, times, session_node, node, epoch, sequence, attempt_id, body, signature, reason)
                 SELECT sha256(int8send(i)), i, i, CASE WHEN i <= 1200 THEN 2 ELSE 1 END, CASE WHEN i <= 1200 THEN 'pn-1' ELSE 'pn-2' END,
                     'pn-1', 1, i, 'a-' || i || '-' || repeat('y', 400), decode(repeat(lpad(to_hex(i), 8, '0'), 1024), 'hex'),
                     decode(repeat('ab', 64), 'hex'), 'forged ' || repeat('z', 800) FROM generate_series(1, 1203) AS i;",
            )
            .unwrap();
        }
    }
}

fn an_old_ledger_with_whole_rejected_bodies_opens_bounded_and_keeps_its_counts(env: &Env) {
    let rt = rt();
    drop(env.open());
    make_old_rejected_table(env);
    let l = env.open();
    let count = rt.block_on(l.rejected_count("pn-1")).unwrap();
    assert_eq!(count, RejectedCount { received: 2_400, distinct: 1_200, evicted: 200 }, "no count is lost");
    let kept = rt.block_on(l.rejected("pn-1", u64::MAX)).unwrap();
    assert_eq!(kept.len() as u64, REJECTED_KEPT_PER_NODE);
    assert_eq!(kept.iter().map(|r| r.first_ms).min(), Some(201), "the newest 1,000 are kept");
    for r in &kept {
        assert_eq!((r.body_bytes, r.signature_bytes, r.body_prefix.len()), (4096, 64, REJECTED_BODY_PREFIX));
        assert!(r.attempt_id.chars().count() <= REJECTED_NAME_MAX && r.reason.chars().count() <= REJECTED_REASON_MAX);
        assert_eq!(r.times, 2);
    }
    assert_eq!(rt.block_on(l.rejected_count("pn-2")).unwrap(), RejectedCount { received: 3, distinct: 3, evicted: 0 });
    // It keeps counting and bounding as a new ledger does.
    rt.block_on(async {
        l.register_node_key("pn-1", key_of(1)).await.unwrap();
        assert!(matches!(l.submit(oversized(1)).await.unwrap(), Verdict::Rejected { .. }));
    });
    let count = rt.block_on(l.rejected_count("pn-1")).unwrap();
    assert_eq!(count, RejectedCount { received: 2_401, distinct: 1_201, evicted: 201 });
    drop(l);
    let l = env.open();
    assert_eq!(rt.block_on(l.rejected_count("pn-1")).unwrap(), count, "the migration runs once");
    assert_eq!(rt.block_on(l.rejected("pn-1", u64::MAX)).unwrap().len() as u64, REJECTED_KEPT_PER_NODE);
}

#[test]
fn a_batch_with_more_new_rejections_than_the_cap_stores_only_its_newest() {
    let r = |i: i64, node: &str| RejectedReceipt {
        digest: i.to_be_bytes().to_vec(),
        first_ms: i,
        last_ms: i,
        times: 2,
        session_node: node.into(),
        node: String::new(),
        epoch: 0,
        sequence: 0,
        attempt_id: String::new(),
        body_bytes: 0,
        signature_bytes: 0,
        body_prefix: vec![],
        reason: "x".into(),
    };
    let batch: Vec<RejectedReceipt> = (0..1_500).map(|i| r(i, "pn-1")).chain([r(7, "pn-2")]).collect();
    let mut per_node = backend::PerNode::default();
    for (k, x) in batch.iter().enumerate() {
        per_node.add(x, k == 3);
    }
    let pn1 = &per_node.0["pn-1"];
    let (kept, skipped) = pn1.kept_fresh();
    assert_eq!((pn1.received, pn1.fresh.len(), kept.len() as u64, skipped), (3_000, 1_499, REJECTED_KEPT_PER_NODE, 499));
    assert_eq!(kept[0].first_ms, 500, "the newest are stored");
    assert_eq!(per_node.0["pn-2"].kept_fresh().0.len(), 1);
}
