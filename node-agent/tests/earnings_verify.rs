//! `earnings --verify` against real statements: receipts go through the stored ledger, the
//! agent keeps the Acks it would get, a period closes, and the export is checked.

use kommune_agent::earnings::{self, Standing};
use kommune_agent::receipts::{self, Receipts};
use kommune_core::fence::Fence;
use kommune_ledger::Verdict;
use kommune_ledger::check::tests::{input, node_key};
use kommune_ledger::statement_file::read_export;
use kommune_proto::v1;
use kommune_store::ledger::payout_cli::statements;
use kommune_store::ledger::settle::ReceiptKey;
use kommune_store::ledger::{Ledger, LedgerConfig, open_backend};

struct World {
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    ledger: Ledger,
    rt: tokio::runtime::Runtime,
    /// pn-1's agent: its receipt directory.
    agent: Receipts,
    agent_dir: tempfile::TempDir,
}

/// A ledger where pn-1 (the agent under test) is registered to `pn1_owner` and pn-2 to alice.
fn world(pn1_owner: &str) -> World {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let ledger = Ledger::open(LedgerConfig { data_dir: data.clone(), database_url: None, fence: Fence::open(), key_file: None }).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        ledger.register_owned_node_key("pn-1", node_key(1).verifying_key().to_bytes(), pn1_owner).await.unwrap();
        ledger.register_owned_node_key("pn-2", node_key(2).verifying_key().to_bytes(), "alice").await.unwrap();
    });
    // A state directory as `join` leaves it (the key material is not read by `earnings`).
    let agent_dir = tempfile::tempdir().unwrap();
    std::fs::write(agent_dir.path().join("agent.json"), r#"{"server": "https://127.0.0.1:1", "node_name": "pn-1"}"#).unwrap();
    for f in ["ca.crt", "node.crt", "node.key"] {
        std::fs::write(agent_dir.path().join(f), "not used here").unwrap();
    }
    let agent = Receipts::start(agent_dir.path().join("receipts"), "pn-1", node_key(1)).unwrap();
    World { _dir: dir, data, ledger, rt, agent, agent_dir }
}

impl World {
    /// Meters receipt `sequence` of `pn-<seed>`; for pn-1 the agent records the Ack as it would
    /// from the operator (the same seq, hash and cost the dispatcher puts in it).
    fn meter(&self, seed: u8, sequence: u64) {
        let i = input(seed, 1, sequence);
        let Verdict::Accepted { seq, hash, cost } = self.rt.block_on(self.ledger.submit(i.clone())).unwrap() else { panic!("not accepted") };
        if seed == 1 {
            let update = v1::TaskUpdate { attempt_id: i.attempt.attempt_id.clone(), receipt: Some(i.receipt), ..Default::default() };
            let ack =
                v1::Ack { attempt_id: i.attempt.attempt_id, receipt_rejected: String::new(), cost_micros: cost.0, ledger_seq: seq, entry_hash: hash.to_vec() };
            self.agent.acknowledged(&update, &ack).unwrap();
        }
    }

    /// Closes the period and returns the export as `payout export --format json` writes it.
    fn close_and_export(&self) -> String {
        self.rt.block_on(self.ledger.close_period()).unwrap();
        let mut b = open_backend(&self.data, None).unwrap();
        serde_json::to_string_pretty(&statements(b.as_mut()).unwrap()).unwrap()
    }

    fn records(&self) -> Vec<receipts::ReceiptRecord> {
        receipts::history(&self.agent_dir.path().join("receipts"), &[])
    }
}

fn owner_only(json: &str, owner: &str) -> Vec<kommune_ledger::statement_file::ExportedStatement> {
    read_export(json).unwrap().into_iter().filter(|s| s.file.statement.owner == owner).collect()
}

#[test]
fn every_acknowledged_receipt_is_found_settled_or_reversed_with_the_reason() {
    let w = world("alice");
    for s in 1..=3 {
        w.meter(1, s);
        w.meter(2, s);
    }
    w.rt.block_on(w.ledger.reverse(ReceiptKey::Attempt("a-1-1-2".into()), "outvoted by 2 of 3 replicas")).unwrap();
    let json = w.close_and_export();
    let key = kommune_ledger::entry::fingerprint(&w.ledger.operator_key());
    let v = earnings::verify(&w.records(), &owner_only(&json, "alice"), Some(&key));
    assert!(v.ok(), "{}", earnings::render("pn-1", &v));
    let standings: Vec<&Standing> = v.receipts.iter().map(|(_, s)| s).collect();
    assert_eq!(standings.iter().filter(|s| matches!(s, Standing::Settled { paid: None, .. })).count(), 2, "{standings:?}");
    assert!(standings.iter().any(|s| matches!(s, Standing::Reversed { reason, .. } if reason == "outvoted by 2 of 3 replicas")), "{standings:?}");
    // A receipt after the close is in no statement yet: pending, not missing.
    w.meter(1, 4);
    let v = earnings::verify(&w.records(), &owner_only(&json, "alice"), Some(&key));
    assert!(v.ok() && matches!(v.receipts.last().unwrap().1, Standing::Pending), "{}", earnings::render("pn-1", &v));
    // Pinning another operator key refuses the statement.
    let v = earnings::verify(&w.records(), &owner_only(&json, "alice"), Some(&"0".repeat(64)));
    assert!(!v.ok() && v.bad_files[0].contains("not the expected"), "{:?}", v.bad_files);
}

#[test]
fn a_receipt_left_out_of_the_providers_statement_is_reported_missing() {
    // The operator put pn-1 (one of alice's machines) under bob: alice's signed statement covers
    // the ledger range of pn-1's receipt but does not list it.
    let w = world("bob");
    w.meter(2, 1);
    w.meter(1, 1);
    w.meter(2, 2);
    let json = w.close_and_export();
    let alice = owner_only(&json, "alice");
    assert!(alice[0].file.check(None).is_ok(), "a genuine, signed statement");
    let v = earnings::verify(&w.records(), &alice, None);
    assert!(!v.ok());
    let report = earnings::render("pn-1", &v);
    assert!(matches!(v.receipts[..], [(_, Standing::Missing { .. })]), "{report}");
    assert!(report.contains("MISSING: ledger entry") && report.contains("attempt a-1-1-1") && report.ends_with("FAILED\n"), "{report}");

    // The command a provider runs says the same and exits non-zero; bob's statement lists it.
    let file = w.agent_dir.path().join("alice.json");
    std::fs::write(&file, serde_json::to_string(&alice).unwrap()).unwrap();
    let o = earnings_cmd(&w, &file);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stdout).contains("1 MISSING"), "{o:?}");
    let file = w.agent_dir.path().join("all.json");
    std::fs::write(&file, &json).unwrap();
    let o = earnings_cmd(&w, &file);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("1 settled unpaid"), "{o:?}");
}

fn earnings_cmd(w: &World, file: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kommune-agent"))
        .args(["earnings", "--verify"])
        .arg(file)
        .env("KOMMUNE_STATE_DIR", w.agent_dir.path())
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

#[test]
fn a_wrong_amount_and_an_edited_statement_file_fail() {
    let w = world("alice");
    w.meter(1, 1);
    w.meter(1, 2);
    let json = w.close_and_export();
    // The operator acknowledged more than it settles.
    let mut records = w.records();
    records[1].cost_micros += 1;
    let v = earnings::verify(&records, &owner_only(&json, "alice"), None);
    assert!(!v.ok() && matches!(&v.receipts[1].1, Standing::Wrong { what, .. } if what.contains("micro-credits")), "{:?}", v.receipts);
    // Someone dropped a receipt from the list the operator signed.
    let mut edited = owner_only(&json, "alice");
    edited[0].file.receipts.remove(0);
    let v = earnings::verify(&w.records(), &edited, None);
    assert!(!v.ok() && v.bad_files[0].contains("receipts_sha256"), "{:?}", v.bad_files);
}

#[test]
fn acks_keep_their_ledger_entry_and_compaction_drops_only_those_before_the_cutoff() {
    let w = world("alice");
    w.meter(1, 1);
    w.meter(1, 1_000);
    let before = w.records();
    assert!(before.iter().all(|r| r.ledger_seq > 0 && r.entry_hash.len() == 64), "{before:?}");
    // The test receipts finished in 1970: a cutoff before that keeps them, one after drops them.
    receipts::compact(&w.agent_dir.path().join("receipts"), 0).unwrap();
    assert_eq!(w.records(), before);
    receipts::compact(&w.agent_dir.path().join("receipts"), i64::MAX).unwrap();
    assert!(w.records().is_empty());
}
