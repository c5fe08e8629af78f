//! The ledger's behaviour, run against every backend: SQLite always, PostgreSQL when
//! `KOMMUNE_TEST_DATABASE_URL` is set (each test in a fresh database of its own).

use ed25519_dalek::SigningKey;
use futures::future::join_all;
use kommune_proto::receipt;
use kommune_proto::v1::ReceiptBody;

use super::backend::{Backend, EntryFilter};
use super::*;
use crate::testing::{TestDb, with_database};
use kommune_core::pricing::Micros;
use kommune_ledger::check::ReceiptInput;
use kommune_ledger::check::tests::{input, node_key};
use kommune_ledger::entry::{CHECKPOINT_EVERY, Entry, EntryKind, GENESIS};
use kommune_ledger::verify::{BadEntry, VerifyOptions, verify};

/// Where one test's ledger lives.
pub(crate) struct Env(TestDb);

impl Env {
    pub fn sqlite() -> Env {
        Env(TestDb::sqlite())
    }

    /// A fresh database on the server named by KOMMUNE_TEST_DATABASE_URL, or None.
    pub fn postgres() -> Option<Env> {
        TestDb::postgres("kommune_test").map(Env)
    }

    pub fn config(&self, fence: Fence) -> LedgerConfig {
        LedgerConfig { data_dir: self.dir.path().to_path_buf(), database_url: self.url.clone(), fence, key_file: None }
    }

    pub fn open(&self) -> Ledger {
        Ledger::open(self.config(Fence::open())).expect("open the ledger")
    }

    pub fn backend(&self) -> Box<dyn Backend> {
        open_backend(self.dir.path(), self.url.as_deref()).unwrap()
    }

    /// Verifies the stored chain, entries after the last checkpoint included (most tests stop
    /// between checkpoints; strict coverage is tested on its own).
    pub fn verify(&self) -> Result<verify::VerifyReport, BadEntry> {
        verify_stored(self.backend().as_mut(), VerifyOptions { accept_unsigned_tail: true, ..Default::default() }).unwrap()
    }

    /// Reads one column of one stored entry.
    fn get(&self, seq: u64, column: &str) -> Val {
        let seq = seq as i64;
        match &self.url {
            None => {
                let b = sqlite::SqliteBackend::open(self.dir.path()).unwrap();
                let v: rusqlite::types::Value =
                    b.connection().query_row(&format!("SELECT {column} FROM ledger_entries WHERE seq = ?1"), [seq], |r| r.get(0)).unwrap();
                match v {
                    rusqlite::types::Value::Integer(i) => Val::Int(i),
                    rusqlite::types::Value::Text(s) => Val::Text(s),
                    rusqlite::types::Value::Blob(b) => Val::Blob(b),
                    other => panic!("unexpected {other:?}"),
                }
            }
            Some(url) => {
                let mut b = postgres::PostgresBackend::connect(url).unwrap();
                let row = b.client().query_one(&format!("SELECT {column} FROM ledger_entries WHERE seq = $1"), &[&seq]).unwrap();
                match row.columns()[0].type_().name() {
                    "int8" => Val::Int(row.get(0)),
                    "text" => Val::Text(row.get(0)),
                    _ => Val::Blob(row.get(0)),
                }
            }
        }
    }

    /// Overwrites one column of one stored entry, bypassing the append-only trigger the way an
    /// attacker with database access would.
    fn put(&self, seq: u64, column: &str, v: &Val) {
        let seq = seq as i64;
        match &self.url {
            None => {
                let b = sqlite::SqliteBackend::open(self.dir.path()).unwrap();
                let c = b.connection();
                c.execute_batch("DROP TRIGGER IF EXISTS ledger_entries_no_update").unwrap();
                let sql = format!("UPDATE ledger_entries SET {column} = ?1 WHERE seq = ?2");
                match v {
                    Val::Int(i) => c.execute(&sql, rusqlite::params![i, seq]),
                    Val::Text(t) => c.execute(&sql, rusqlite::params![t, seq]),
                    Val::Blob(b) => c.execute(&sql, rusqlite::params![b, seq]),
                }
                .unwrap();
            }
            Some(url) => {
                let mut b = postgres::PostgresBackend::connect(url).unwrap();
                let c = b.client();
                c.batch_execute("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_append_only").unwrap();
                let sql = format!("UPDATE ledger_entries SET {column} = $1 WHERE seq = $2");
                match v {
                    Val::Int(i) => c.execute(&sql, &[i, &seq]),
                    Val::Text(t) => c.execute(&sql, &[t, &seq]),
                    Val::Blob(b) => c.execute(&sql, &[b, &seq]),
                }
                .unwrap();
            }
        }
    }
}

/// A stored column value.
#[derive(Debug, Clone, PartialEq)]
enum Val {
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl Val {
    /// The value with one bit of one byte flipped (an empty value gains a byte). Integers
    /// move by 256 so that they do not collide with another entry's seq or sequence.
    fn flipped(&self, byte: usize) -> Val {
        let flip = |mut b: Vec<u8>| {
            if b.is_empty() {
                b.push(b'x');
            } else {
                let i = byte % b.len();
                b[i] ^= 1;
            }
            b
        };
        match self {
            Val::Int(i) => Val::Int(i ^ 0x100),
            Val::Text(t) => Val::Text(String::from_utf8(flip(t.clone().into_bytes())).unwrap()),
            Val::Blob(b) => Val::Blob(flip(b.clone())),
        }
    }
}

impl std::ops::Deref for Env {
    type Target = TestDb;
    fn deref(&self) -> &TestDb {
        &self.0
    }
}

pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

pub(crate) fn key_of(seed: u8) -> [u8; 32] {
    node_key(seed).verifying_key().to_bytes()
}

/// Re-signs an input's receipt after changing its body, with `key`.
pub(crate) fn resign(mut i: ReceiptInput, key: &SigningKey, f: impl FnOnce(&mut ReceiptBody)) -> ReceiptInput {
    let mut b = receipt::decode(&i.receipt).unwrap();
    f(&mut b);
    i.receipt = receipt::sign(&b, key);
    i
}

macro_rules! backend_suite {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[test] fn $name() { super::$name(&super::Env::sqlite()); })*
        }
        mod on_postgres {
            $(#[test] fn $name() { if let Some(env) = super::Env::postgres() { super::$name(&env); } })*
        }
    };
}

backend_suite!(
    genuine_receipts_are_accepted_priced_and_totalled,
    duplicated_reordered_and_replayed_receipts_count_once,
    a_replay_among_new_receipts_is_answered_with_its_entry_and_the_new_ones_still_append,
    forged_receipts_are_rejected_with_a_reason_and_kept_once,
    a_forgery_using_a_real_sequence_does_not_block_the_genuine_receipt,
    a_reused_sequence_or_a_metered_attempt_is_rejected,
    reopening_keeps_everything_and_dedup_still_holds,
    a_fenced_ledger_refuses_appends,
    a_leader_that_was_frozen_past_its_lease_cannot_append_after_the_next_leader_opened_the_ledger,
    changing_any_byte_of_any_stored_entry_fails_verification_naming_it,
    checkpoints_are_appended_every_n_entries_and_verify,
    export_selects_by_provider_and_time,
);

fn genuine_receipts_are_accepted_priced_and_totalled(env: &Env) {
    let rt = rt();
    let l = env.open();
    let cost = check::check(&input(1, 1, 1)).unwrap().cost;
    assert_ne!(cost, Micros(0));
    rt.block_on(async {
        assert!(l.register_node_key("pn-1", key_of(1)).await.unwrap());
        assert!(!l.register_node_key("pn-1", key_of(1)).await.unwrap(), "registering twice is a no-op");
        let mut last_hash = [0; 32];
        for s in 1..=3 {
            let Verdict::Accepted { seq, hash, cost: c } = l.submit(input(1, 1, s)).await.unwrap() else { panic!("receipt {s} not accepted") };
            assert_eq!((seq, c), (s + 1, cost));
            last_hash = hash;
        }
        // The Ack carries the entry's hash: the last receipt's is the head's.
        assert_eq!(l.head().await.unwrap().map(|h| h.hash), Some(last_hash));
        // A resent receipt is acknowledged with the same entry.
        assert!(matches!(l.submit(input(1, 1, 3)).await.unwrap(), Verdict::Duplicate { seq: 4, hash, .. } if hash == last_hash));
    });
    let job = rt.block_on(l.job_usage("uid-1")).unwrap();
    assert_eq!((job.receipts, job.cost, job.usage.cpu_micros, job.usage.wall_millis), (3, Micros(cost.0 * 3), 21_000_000, 12_000));
    let earnings = rt.block_on(l.node_earnings("pn-1")).unwrap();
    let head = rt.block_on(l.head()).unwrap().unwrap();
    assert_eq!((earnings.pending, earnings.receipts, earnings.head), (Micros(cost.0 * 3), 3, Some(head)));
    assert_eq!(head.seq, 4);
    assert_eq!(rt.block_on(l.node_earnings("pn-2")).unwrap().receipts, 0);
    // The dashboard's series: the same three receipts, in the hour they were recorded.
    let series = rt.block_on(l.earnings_by_hour(0)).unwrap();
    let hours = &series["pn-1"];
    assert_eq!(hours.len(), 1);
    assert_eq!(hours[0].1, cost.0 * 3);
    assert_eq!(hours[0].0 % super::series::HOUR_MS, 0);
    assert!(rt.block_on(l.earnings_by_hour(kommune_proto::now_ms() + 60_000)).unwrap().is_empty(), "nothing after now");
    drop(l);
    let report = env.verify().unwrap();
    assert_eq!((report.entries, report.receipts, report.node_keys, report.total), (4, 3, 1, Micros(cost.0 * 3)));
    assert_eq!(report.head_hash, hex::encode(head.hash));
}

fn duplicated_reordered_and_replayed_receipts_count_once(env: &Env) {
    let rt = rt();
    let l = env.open();
    let firsts = rt.block_on(async {
        l.register_node_key("pn-1", key_of(1)).await.unwrap();
        l.register_node_key("pn-2", key_of(2)).await.unwrap();
        // 2 nodes x 20 receipts, each sent 3 times, all at once in a scrambled order.
        let mut inputs: Vec<ReceiptInput> = (1..=20).flat_map(|s| [input(1, 1, s), input(2, 1, s)]).flat_map(|i| [i.clone(), i.clone(), i]).collect();
        inputs.reverse();
        inputs.swap(0, 50);
        inputs.swap(7, 90);
        let verdicts = join_all(inputs.iter().cloned().map(|i| l.submit(i))).await;
        let mut seq_of = std::collections::HashMap::new();
        for (i, v) in inputs.iter().zip(verdicts) {
            let seq = match v.unwrap() {
                Verdict::Accepted { seq, .. } | Verdict::Duplicate { seq, .. } => seq,
                other => panic!("{other:?}"),
            };
            assert_eq!(*seq_of.entry(i.receipt.body.clone()).or_insert(seq), seq, "every copy is answered with the one entry");
        }
        seq_of
    });
    assert_eq!(firsts.len(), 40);
    // A replay of the very same bytes much later is answered with the same entries.
    rt.block_on(async {
        for s in (1..=20).rev() {
            let i = input(1, 1, s);
            match l.submit(i.clone()).await.unwrap() {
                Verdict::Duplicate { seq, .. } => assert_eq!(seq, firsts[&i.receipt.body]),
                other => panic!("{other:?}"),
            }
        }
    });
    assert_eq!(rt.block_on(l.node_earnings("pn-1")).unwrap().receipts, 20);
    assert_eq!(rt.block_on(l.node_earnings("pn-2")).unwrap().receipts, 20);
    assert_eq!(rt.block_on(l.job_usage("uid-1")).unwrap().receipts, 40);
    drop(l);
    assert_eq!(env.verify().unwrap().receipts, 40);
}

/// The writer appends a batch without looking receipts up first and falls back to lookups
/// when a unique index refuses it: a replay mixed into a batch of new receipts must still be
/// answered with its first entry, and the new ones must still append, once each.
fn a_replay_among_new_receipts_is_answered_with_its_entry_and_the_new_ones_still_append(env: &Env) {
    let rt = rt();
    let l = env.open();
    let stored = rt.block_on(async {
        l.register_node_key("pn-1", key_of(1)).await.unwrap();
        let mut seqs = vec![];
        for s in 1..=5 {
            match l.submit(input(1, 1, s)).await.unwrap() {
                Verdict::Accepted { seq, .. } => seqs.push(seq),
                other => panic!("{other:?}"),
            }
        }
        seqs
    });
    // The job's running totals are now kept by the writer: the rolled-back try must not count.
    assert_eq!(rt.block_on(l.job_usage("uid-1")).unwrap().receipts, 5);
    let verdicts = rt.block_on(async {
        // Replays of stored receipts 2 and 4 between new receipts 6..=30, all at once.
        let mut inputs: Vec<ReceiptInput> = (6..=30).map(|s| input(1, 1, s)).collect();
        inputs.insert(3, input(1, 1, 2));
        inputs.insert(17, input(1, 1, 4));
        join_all(inputs.into_iter().map(|i| l.submit(i))).await
    });
    let mut accepted = vec![];
    for (k, v) in verdicts.into_iter().enumerate() {
        match (k, v.unwrap()) {
            (3, Verdict::Duplicate { seq, .. }) => assert_eq!(seq, stored[1]),
            (17, Verdict::Duplicate { seq, .. }) => assert_eq!(seq, stored[3]),
            (3 | 17, other) => panic!("a replay got {other:?}"),
            (_, Verdict::Accepted { seq, .. }) => accepted.push(seq),
            (_, other) => panic!("a new receipt got {other:?}"),
        }
    }
    accepted.sort_unstable();
    assert_eq!(accepted, (stored[4] + 1..=stored[4] + 25).collect::<Vec<_>>(), "the new receipts take the next entries, none skipped");
    assert_eq!(rt.block_on(l.node_earnings("pn-1")).unwrap().receipts, 30);
    assert_eq!(rt.block_on(l.job_usage("uid-1")).unwrap().receipts, 30);
    drop(l);
    let report = env.verify().unwrap();
    assert_eq!((report.receipts, report.entries), (30, 31));
}

fn forged_receipts_are_rejected_with_a_reason_and_kept_once(env: &Env) {
    let rt = rt();
    let l = env.open();
    let genuine = input(1, 1, 1);
    let forgeries: Vec<(ReceiptInput, &str)> = vec![
        (
            {
                let mut i = input(1, 1, 2);
                i.receipt.signature[3] ^= 1;
                i
            },
            "signature does not verify",
        ),
        (resign(input(1, 1, 3), &node_key(9), |_| {}), "signature does not verify"),
        (ReceiptInput { node_public_key: key_of(9), ..resign(input(1, 1, 4), &node_key(9), |_| {}) }, "not registered for node pn-1"),
        (ReceiptInput { session_node: "pn-2".into(), ..input(1, 1, 5) }, "sent by node \"pn-2\""),
        (ReceiptInput { attempt: kommune_ledger::check::tests::facts("a-1-1-6", "pn-7"), ..input(1, 1, 6) }, "assigned to node \"pn-7\""),
        (ReceiptInput { attempt: kommune_ledger::check::tests::facts("a-x", "pn-1"), ..input(1, 1, 7) }, "submitted for attempt \"a-x\""),
        (resign(input(1, 1, 8), &node_key(1), |b| b.usage.as_mut().unwrap().cpu_micros = 60_000_000), "cpu time 60.0s exceeds 2 cores x 4.0s wall"),
        (resign(input(1, 1, 9), &node_key(1), |b| b.usage.as_mut().unwrap().wall_millis = 600_000), "wall time 600.0s exceeds"),
    ];
    rt.block_on(async {
        l.register_node_key("pn-1", key_of(1)).await.unwrap();
        for (f, want) in &forgeries {
            for _ in 0..2 {
                match l.submit(f.clone()).await.unwrap() {
                    Verdict::Rejected { reason, .. } => assert!(reason.contains(want), "{reason} should say {want}"),
                    other => panic!("{want}: {other:?}"),
                }
            }
        }
        assert!(matches!(l.submit(genuine.clone()).await.unwrap(), Verdict::Accepted { .. }));
    });
    let rejected = rt.block_on(l.rejected("pn-1", 100)).unwrap();
    let from_pn2 = rt.block_on(l.rejected("pn-2", 100)).unwrap();
    assert_eq!(rejected.len() + from_pn2.len(), forgeries.len(), "each forgery is stored once: {rejected:#?}");
    assert!(rejected.iter().chain(&from_pn2).all(|r| r.times == 2 && !r.reason.is_empty()));
    assert_eq!(from_pn2.len(), 1);
    assert_eq!((from_pn2[0].node.as_str(), from_pn2[0].sequence), ("pn-1", 5));
    assert_eq!(rt.block_on(l.node_earnings("pn-1")).unwrap().receipts, 1, "only the genuine receipt counts");
    drop(l);
    assert_eq!(env.verify().unwrap().receipts, 1);
}

fn a_forgery_using_a_real_sequence_does_not_block_the_genuine_receipt(env: &Env) {
    let rt = rt();
    let l = env.open();
    rt.block_on(async {
        l.register_node_key("pn-1", key_of(1)).await.unwrap();
        let genuine = input(1, 1, 1);
        let forged = resign(genuine.clone(), &node_key(66), |b| b.usage.as_mut().unwrap().cpu_micros = 1);
        let both = join_all([l.submit(forged.clone()), l.submit(genuine.clone())]).await;
        assert!(matches!(both[0].as_ref().unwrap(), Verdict::Rejected { .. }), "{both:?}");
        assert!(matches!(both[1].as_ref().unwrap(), Verdict::Accepted { .. }), "{both:?}");
        assert!(matches!(l.submit(forged).await.unwrap(), Verdict::Rejected { .. }));
        assert!(matches!(l.submit(genuine).await.unwrap(), Verdict::Duplicate { .. }));
    });
}

fn a_reused_sequence_or_a_metered_attempt_is_rejected(env: &Env) {
    let rt = rt();
    let l = env.open();
    rt.block_on(async {
        l.register_node_key("pn-1", key_of(1)).await.unwrap();
        let Verdict::Accepted { seq, .. } = l.submit(input(1, 1, 1)).await.unwrap() else { panic!() };
        // The node signs a different body under the same (node, epoch, sequence).
        let reuse = resign(input(1, 1, 1), &node_key(1), |b| b.usage.as_mut().unwrap().cpu_micros = 1);
        let Verdict::Rejected { reason, .. } = l.submit(reuse).await.unwrap() else { panic!() };
        assert!(reason.contains(&format!("already used by a different receipt (ledger entry {seq})")), "{reason}");
        // A second receipt for the same attempt under a new sequence.
        let mut again = resign(input(1, 1, 2), &node_key(1), |b| b.attempt_id = "a-1-1-1".into());
        again.attempt = input(1, 1, 1).attempt;
        let Verdict::Rejected { reason, .. } = l.submit(again).await.unwrap() else { panic!() };
        assert!(reason.contains(&format!("attempt a-1-1-1 was already metered by ledger entry {seq}")), "{reason}");
    });
    assert_eq!(rt.block_on(l.rejected("pn-1", 100)).unwrap().len(), 2);
}

fn reopening_keeps_everything_and_dedup_still_holds(env: &Env) {
    let rt = rt();
    let first_head = {
        let l = env.open();
        rt.block_on(async {
            l.register_node_key("pn-1", key_of(1)).await.unwrap();
            for s in 1..=5 {
                l.submit(input(1, 1, s)).await.unwrap();
            }
            l.checkpoint().await.unwrap();
        });
        rt.block_on(l.head()).unwrap().unwrap()
    };
    let key_before = std::fs::read(env.dir.path().join("ledger.key")).unwrap();
    let l = env.open();
    assert_eq!(rt.block_on(l.head()).unwrap(), Some(first_head));
    rt.block_on(async {
        assert!(!l.register_node_key("pn-1", key_of(1)).await.unwrap(), "the key survived");
        for s in 1..=5 {
            assert!(matches!(l.submit(input(1, 1, s)).await.unwrap(), Verdict::Duplicate { .. }));
        }
        let Verdict::Accepted { seq, cost, .. } = l.submit(input(1, 1, 6)).await.unwrap() else { panic!("receipt 6 not accepted") };
        assert_eq!((seq, cost), (first_head.seq + 1, check::check(&input(1, 1, 6)).unwrap().cost));
    });
    assert_eq!(rt.block_on(l.node_earnings("pn-1")).unwrap().receipts, 6);
    drop(l);
    assert_eq!(std::fs::read(env.dir.path().join("ledger.key")).unwrap(), key_before);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(env.dir.path().join("ledger.key")).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let report = env.verify().unwrap();
    assert_eq!((report.receipts, report.checkpoints, report.operator_keys.len()), (6, 1, 1));
}

fn a_fenced_ledger_refuses_appends(env: &Env) {
    let rt = rt();
    let fence = Fence::closed();
    let l = Ledger::open(env.config(fence.clone())).unwrap();
    rt.block_on(async {
        assert!(matches!(l.register_node_key("pn-1", key_of(1)).await, Err(LedgerError::Fenced(_))));
        assert!(matches!(l.submit(input(1, 1, 1)).await, Err(LedgerError::Fenced(_))));
        assert!(matches!(l.checkpoint().await, Err(LedgerError::Fenced(_))));
        assert_eq!(l.head().await.unwrap(), None, "nothing was written");
        fence.extend(std::time::Instant::now() + std::time::Duration::from_secs(60));
        l.register_node_key("pn-1", key_of(1)).await.unwrap();
        assert!(matches!(l.submit(input(1, 1, 1)).await.unwrap(), Verdict::Accepted { .. }));
        fence.close();
        assert!(matches!(l.submit(input(1, 1, 2)).await, Err(LedgerError::Fenced(_))));
    });
    assert_eq!(rt.block_on(l.head()).unwrap().unwrap().seq, 2);
}

/// Two replicas, one ledger: the first is frozen with its clock fence still open (as a process
/// stopped just after its check would be); the second becomes leader and opens the ledger. The
/// first's appends are refused by the epoch check inside the transaction, write nothing, and
/// close its fence; the second appends after the first's entries.
fn a_leader_that_was_frozen_past_its_lease_cannot_append_after_the_next_leader_opened_the_ledger(env: &Env) {
    let rt = rt();
    let open_until = || std::time::Instant::now() + std::time::Duration::from_secs(600);
    let (fence_a, fence_b) = (Fence::closed(), Fence::closed());
    fence_a.extend(open_until());
    let a = Ledger::open(env.config(fence_a.clone())).unwrap();
    rt.block_on(async {
        a.register_node_key("pn-1", key_of(1)).await.unwrap();
        assert!(matches!(a.submit(input(1, 1, 1)).await.unwrap(), Verdict::Accepted { seq: 2, .. }));
    });
    fence_b.extend(open_until());
    let b = Ledger::open(env.config(fence_b.clone())).unwrap();
    rt.block_on(async {
        assert_eq!(fence_a.check(), Ok(()), "the first replica's clock still says it leads");
        assert!(matches!(a.submit(input(1, 1, 2)).await, Err(LedgerError::Fenced(_))));
        assert_eq!(fence_a.check(), Err(kommune_core::fence::Fenced), "refused once, the first replica stops writing at all");
        assert!(matches!(a.checkpoint().await, Err(LedgerError::Fenced(_))));
        assert!(matches!(b.submit(input(1, 1, 2)).await.unwrap(), Verdict::Accepted { seq: 3, .. }), "the new leader continues the chain");
    });
    drop((a, b));
    let report = env.verify().unwrap();
    assert_eq!((report.entries, report.receipts), (3, 2));
}

fn changing_any_byte_of_any_stored_entry_fails_verification_naming_it(env: &Env) {
    let rt = rt();
    let l = env.open();
    rt.block_on(async {
        l.register_node_key("pn-1", key_of(1)).await.unwrap();
        for s in 1..=8 {
            l.submit(input(1, 1, s)).await.unwrap();
        }
        l.checkpoint().await.unwrap();
        l.submit(input(1, 1, 9)).await.unwrap();
    });
    drop(l);
    env.verify().unwrap();
    let body_len = {
        let mut b = env.backend();
        let mut len = 0;
        b.for_each_entry(&EntryFilter::default(), &mut |e| {
            let e = e.unwrap();
            if e.seq == 5 {
                len = e.body.len();
            }
            true
        })
        .unwrap();
        len
    };
    // Receipt 5, the node-key entry 1 and the checkpoint 10, each column; then several body bytes.
    let mut cases: Vec<(u64, &str, usize)> = vec![];
    for seq in [5, 1, 10] {
        // Every column of the one row mapping, so a new column is tampered with too.
        cases.extend(row::ENTRY_COLUMNS.iter().map(|(c, _)| (seq, *c, 0)));
    }
    cases.extend([1, body_len / 3, body_len / 2, body_len - 1].map(|i| (5, "body", i)));
    cases.extend([(10, "body", 50), (10, "signature", 63)]);
    for (seq, column, byte) in cases {
        // A copy of the ledger per case would be slow on PostgreSQL; restore the row instead.
        let original = env.get(seq, column);
        env.put(seq, column, &original.flipped(byte));
        let err = env.verify().expect_err(&format!("{column} of entry {seq} changed"));
        assert_eq!(err.seq, seq, "{column} byte {byte}: {err}");
        env.put(if column == "seq" { seq ^ 0x100 } else { seq }, column, &original);
        env.verify().unwrap_or_else(|e| panic!("restoring {column}: {e}"));
    }
}

fn checkpoints_are_appended_every_n_entries_and_verify(env: &Env) {
    let rt = rt();
    let l = env.open();
    let n = CHECKPOINT_EVERY + 10;
    rt.block_on(async {
        l.register_node_key("pn-1", key_of(1)).await.unwrap();
        join_all((1..=n).map(|s| l.submit(input(1, 1, s)))).await.into_iter().for_each(|r| assert!(matches!(r.unwrap(), Verdict::Accepted { .. })));
    });
    drop(l);
    let report = env.verify().unwrap();
    assert_eq!((report.receipts, report.checkpoints, report.last_checkpoint_seq), (n, 1, CHECKPOINT_EVERY + 1));
    let fp = report.operator_keys.iter().next().unwrap().clone();
    let opts = VerifyOptions { operator_key_sha256: Some(fp), threads: 1, accept_unsigned_tail: true };
    assert!(verify_stored(env.backend().as_mut(), opts).unwrap().is_ok());
    let opts = VerifyOptions { operator_key_sha256: Some("00".repeat(32)), threads: 1, accept_unsigned_tail: true };
    let err = verify_stored(env.backend().as_mut(), opts).unwrap().unwrap_err();
    // Named at the first line the operator key signs: node keys are signed by it now.
    assert_eq!(err.seq, 1);
    assert!(err.reason.contains("not the expected"), "{err}");
}

fn export_selects_by_provider_and_time(env: &Env) {
    let rt = rt();
    let l = env.open();
    rt.block_on(async {
        l.register_node_key("pn-1", key_of(1)).await.unwrap();
        l.register_node_key("pn-2", key_of(2)).await.unwrap();
        for s in 1..=4 {
            let mut a = input(1, 1, s);
            a.received_ms = 1_000 * s as i64;
            let mut b = input(2, 1, s);
            b.received_ms = 1_000 * s as i64;
            l.submit(a).await.unwrap();
            l.submit(b).await.unwrap();
        }
    });
    drop(l);
    let run = |filter: EntryFilter, format: cli::Format| {
        let mut out = Vec::new();
        cli::export(env.backend().as_mut(), &filter, format, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    };
    let all = run(EntryFilter::default(), cli::Format::Jsonl);
    assert_eq!(all.lines().count(), 10);
    let first: serde_json::Value = serde_json::from_str(all.lines().nth(2).unwrap()).unwrap();
    assert_eq!((first["kind"].as_str(), first["node"].as_str(), first["sequence"].as_u64()), (Some("receipt"), Some("pn-1"), Some(1)));
    assert_eq!(first["cost_micros"].as_u64(), Some(check::check(&input(1, 1, 1)).unwrap().cost.0));
    let pn2 = run(EntryFilter { since_ms: Some(2_000), until_ms: Some(4_000), node: Some("pn-2".into()) }, cli::Format::Jsonl);
    let seqs: Vec<u64> = pn2.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["sequence"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![2, 3]);
    let csv = run(EntryFilter { node: Some("pn-1".into()), ..Default::default() }, cli::Format::Csv);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 1 + 1 + 4, "header, the key registration, four receipts");
    assert!(lines[0].starts_with("seq,kind,recorded_at,node"));
    assert!(lines[2].starts_with("3,receipt,1970-01-01T00:00:01.000Z,pn-1,1,1,a-1-1-1,uid-1,ns/job,"), "{}", lines[2]);
}

// ---- Pure chain verification, no backend ----

fn chain(receipts: u64) -> Vec<Entry> {
    let key = SigningKey::from_bytes(&[42; 32]);
    let mut state = ChainState::default();
    let mut batch = Batch::default();
    state.register_key(&mut batch, "pn-1", key_of(1), "", 1, &key);
    for s in 1..=receipts {
        let i = input(1, 1, s);
        let v = state.decide(&mut batch, &i, &check::check(&i), None, None, &key);
        assert!(matches!(v, Verdict::Accepted { .. }));
    }
    state.checkpoint(&mut batch, 2, &key);
    batch.entries
}

fn reseal(entries: &mut [Entry]) {
    let mut prev = GENESIS;
    for e in entries.iter_mut() {
        *e = e.clone().seal(prev);
        prev = e.hash32().unwrap();
    }
}

#[test]
fn an_untouched_chain_verifies_with_every_total() {
    let c = chain(300);
    let r = verify(&c, VerifyOptions::default()).unwrap();
    assert_eq!((r.entries, r.receipts, r.checkpoints, r.node_keys), (302, 300, 1, 1));
    assert_eq!(r.per_node["pn-1"].receipts, 300);
    assert_eq!(r.total, Micros(check::check(&input(1, 1, 1)).unwrap().cost.0 * 300));
}

#[test]
fn a_rewritten_and_rehashed_entry_is_caught_by_the_next_checkpoint() {
    let mut c = chain(10);
    // An attacker lowers a cost, re-prices it consistently? No: they change the rates and the
    // cost together and rehash the whole chain; only the operator-signed checkpoint disagrees.
    c[3].rates.cpu_core_hour = Micros(0);
    c[3].cost = kommune_core::pricing::cost(&kommune_ledger::check::tests::usage(), &c[3].rates);
    reseal(&mut c);
    let err = verify(&c, VerifyOptions::default()).unwrap_err();
    assert_eq!(err.seq, 12, "{err}");
    assert!(err.reason.contains("checkpoint does not match"), "{err}");
}

#[test]
fn a_checkpoint_with_a_bad_signature_is_named_even_when_rehashed() {
    let mut c = chain(3);
    let last = c.len() - 1;
    c[last].signature[0] ^= 1;
    reseal(&mut c);
    let err = verify(&c, VerifyOptions::default()).unwrap_err();
    assert_eq!(err.seq, 5);
    assert!(err.reason.contains("checkpoint signature does not verify"), "{err}");
}

#[test]
fn the_first_bad_signature_among_many_is_named() {
    let mut c = chain(1000);
    for i in [700usize, 401] {
        c[i].signature[10] ^= 1;
    }
    c.pop();
    reseal(&mut c);
    let err = verify(&c, VerifyOptions::default()).unwrap_err();
    assert_eq!(err.seq, 402, "{err}");
    assert!(err.reason.contains("signature"), "{err}");
}

#[test]
fn a_receipt_counted_twice_or_from_an_unregistered_key_is_named() {
    let mut c = chain(5);
    c.pop();
    let dup = Entry { seq: 7, ..c[3].clone() };
    c.push(dup);
    reseal(&mut c);
    let err = verify(&c, VerifyOptions::default()).unwrap_err();
    assert_eq!(err.seq, 7);
    assert!(err.reason.contains("counted twice"), "{err}");

    let mut c = chain(2);
    c.remove(0);
    for (i, e) in c.iter_mut().enumerate() {
        e.seq = i as u64 + 1;
    }
    reseal(&mut c);
    let err = verify(&c, VerifyOptions::default()).unwrap_err();
    assert_eq!(err.seq, 1);
    assert!(err.reason.contains("not registered for node pn-1"), "{err}");
}

#[test]
fn a_missing_entry_is_named() {
    let mut c = chain(5);
    c.remove(2);
    let err = verify(&c, VerifyOptions::default()).unwrap_err();
    assert_eq!((err.seq, err.reason.as_str()), (3, "is missing (the next stored entry is 4)"));
}

#[test]
fn the_ledger_can_be_shared_across_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<Ledger>();
    assert_eq!(EntryKind::from_code(7), None);
}

#[test]
fn a_database_name_is_swapped_into_a_url() {
    assert_eq!(with_database("postgres://u:p@127.0.0.1:5432/postgres", "t1"), "postgres://u:p@127.0.0.1:5432/t1");
    assert_eq!(with_database("postgres://u@h:1?sslmode=disable", "t2"), "postgres://u@h:1/t2?sslmode=disable");
}

#[test]
fn the_verify_command_prints_a_summary_and_names_the_first_bad_entry() {
    let env = Env::sqlite();
    let rt = rt();
    let l = env.open();
    rt.block_on(async {
        l.register_node_key("pn-1", key_of(1)).await.unwrap();
        for s in 1..=3 {
            l.submit(input(1, 1, s)).await.unwrap();
        }
        l.checkpoint().await.unwrap();
    });
    drop(l);
    let location = || cli::Location { data_dir: env.dir.path().to_path_buf(), database_url: None };
    let mut out = Vec::new();
    cli::run(cli::LedgerCommand::Verify(cli::VerifyArgs { location: location(), operator_key_sha256: None, ..Default::default() }), &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(out.starts_with("ledger OK: 5 entries (3 receipts, 1 checkpoints, 1 node keys)"), "{out}");
    assert!(out.contains("pn-1: ") && out.contains("head: entry 5 hash ") && out.contains("operator ledger key sha256: "), "{out}");

    let original = env.get(3, "cost");
    env.put(3, "cost", &original.flipped(0));
    let err = cli::run(cli::LedgerCommand::Verify(cli::VerifyArgs { location: location(), operator_key_sha256: None, ..Default::default() }), &mut Vec::new())
        .unwrap_err();
    assert!(err.to_string().starts_with("ledger verification FAILED: entry 3: hash does not match its content (stored "), "{err}");

    let missing = cli::Location { data_dir: env.dir.path().join("nope"), database_url: None };
    let err = cli::run(cli::LedgerCommand::Verify(cli::VerifyArgs { location: missing, operator_key_sha256: None, ..Default::default() }), &mut Vec::new())
        .unwrap_err();
    assert!(err.to_string().contains("no ledger at"), "{err}");
}

/// On a new SQLite file the writer's switch to WAL used to race the reader's open and fail
/// now and then with "database is locked"; the reader now opens only after the writer.
#[test]
fn a_new_sqlite_ledger_opens_every_time() {
    for _ in 0..40 {
        let env = Env::sqlite();
        let l = env.open();
        assert_eq!(rt().block_on(l.head()).unwrap(), None);
    }
}
