//! Settlement and strict verification, on chains built in memory the way the operator's writer
//! builds them: statements, reversals, paid marks, key rotation, and the tampering each must catch.

use ed25519_dalek::SigningKey;
use proptest::prelude::*;

use crate::chain::{Batch, ChainState, Verdict};
use crate::check::{self, tests::input};
use crate::entry::{Entry, EntryKind, GENESIS, fingerprint};
use crate::export::{ExportLine, verify_export};
use crate::payout::{PayoutError, Settlement, Statement};
use crate::statement_file::{AckedReceipt, Discrepancy, StatementFiles, reconcile};
use crate::verify::{BadEntry, VerifyOptions, VerifyReport, verify};

/// A chain as the writer keeps it: head, settlement and the entries appended.
pub(crate) struct Book {
    pub state: ChainState,
    pub settle: Settlement,
    pub key: SigningKey,
    pub entries: Vec<Entry>,
    pub ms: i64,
    /// What the store's unique indexes answer: receipts by (node, epoch, sequence), attempts.
    stored: std::collections::HashMap<(String, u64, u64), crate::records::Existing>,
    attempts: std::collections::HashMap<String, u64>,
}

impl Book {
    pub fn new() -> Book {
        Book {
            state: ChainState::default(),
            settle: Settlement::default(),
            key: SigningKey::from_bytes(&[42; 32]),
            entries: vec![],
            ms: 2_000_000,
            stored: Default::default(),
            attempts: Default::default(),
        }
    }

    fn flush(&mut self, batch: Batch) {
        for e in batch.entries {
            self.settle.apply(&e).unwrap_or_else(|m| panic!("entry {}: {m}", e.seq));
            self.entries.push(e);
        }
    }

    fn tick(&mut self) -> i64 {
        self.ms += 1000;
        self.ms
    }

    pub fn node(&mut self, seed: u8, owner: &str) {
        let mut b = Batch::default();
        let ms = self.tick();
        let key = check::tests::node_key(seed).verifying_key().to_bytes();
        self.state.register_key(&mut b, &format!("pn-{seed}"), key, owner, ms, &self.key);
        self.flush(b);
    }

    pub fn receipt(&mut self, seed: u8, sequence: u64) -> Verdict {
        let mut b = Batch::default();
        let i = input(seed, 1, sequence);
        let (node, attempt) = (format!("pn-{seed}"), format!("a-{seed}-1-{sequence}"));
        let existing = self.stored.get(&(node.clone(), 1, sequence)).cloned();
        let v = self.state.decide(&mut b, &i, &check::check(&i), existing.as_ref(), self.attempts.get(&attempt).copied(), &self.key);
        if let Verdict::Accepted { seq, hash, cost } = v {
            self.stored.insert((node, 1, sequence), crate::records::Existing { seq, body: i.receipt.body.clone(), cost, hash });
            self.attempts.insert(attempt, seq);
        }
        self.flush(b);
        v
    }

    pub fn reverse(&mut self, receipt_seq: u64, reason: &str) -> Result<u64, PayoutError> {
        let ms = self.tick();
        let line = self.settle.reversal_line(self.state.head_seq + 1, ms, receipt_seq, reason, &self.key)?;
        let mut b = Batch::default();
        let seq = self.state.push(&mut b, line);
        self.flush(b);
        Ok(seq)
    }

    /// Closes the period: one statement per owner with activity, then a checkpoint.
    pub fn close(&mut self) -> Vec<u64> {
        let (ms, upto) = (self.tick(), self.state.head_seq);
        let mut seqs = vec![];
        for owner in self.settle.open_owners() {
            let line = self.settle.statement_line(self.state.head_seq + 1, ms, &owner, upto, &self.key).expect("an open owner has a statement");
            let mut b = Batch::default();
            seqs.push(self.state.push(&mut b, line));
            self.flush(b);
        }
        self.checkpoint();
        seqs
    }

    pub fn paid(&mut self, statement_seq: u64, reference: &str) -> Result<u64, PayoutError> {
        let ms = self.tick();
        let line = self.settle.paid_line(self.state.head_seq + 1, ms, statement_seq, reference, &self.key)?;
        let mut b = Batch::default();
        let seq = self.state.push(&mut b, line);
        self.flush(b);
        Ok(seq)
    }

    pub fn checkpoint(&mut self) {
        let mut b = Batch::default();
        let ms = self.tick();
        self.state.checkpoint(&mut b, ms, &self.key);
        self.flush(b);
    }

    pub fn statement(&self, seq: u64) -> Statement {
        Statement::parse(&self.entries[seq as usize - 1].body).unwrap()
    }
}

fn strict() -> VerifyOptions {
    VerifyOptions { threads: 1, ..Default::default() }
}

fn check_all(entries: &[Entry]) -> Result<VerifyReport, BadEntry> {
    verify(entries, strict())
}

fn reseal(entries: &mut [Entry]) {
    let mut prev = GENESIS;
    for e in entries.iter_mut() {
        *e = e.clone().seal(prev);
        prev = e.hash32().unwrap();
    }
}

pub(crate) fn cost() -> u64 {
    check::check(&input(1, 1, 1)).unwrap().cost.0
}

/// alice owns pn-1 and pn-2, bob owns pn-3; four receipts, one of alice's reversed.
pub(crate) fn settled_book() -> (Book, Vec<u64>) {
    let mut b = Book::new();
    b.node(1, "alice");
    b.node(2, "alice");
    b.node(3, "bob");
    let mut seqs = vec![];
    for (seed, s) in [(1, 1), (1, 2), (2, 1), (3, 1)] {
        let Verdict::Accepted { seq, .. } = b.receipt(seed, s) else { panic!("accepted") };
        seqs.push(seq);
    }
    b.reverse(seqs[1], "outvoted by 2 of 3 replicas").unwrap();
    let statements = b.close();
    (b, statements)
}

#[test]
fn a_period_closes_into_one_statement_per_owner_without_its_reversed_receipts() {
    let (b, statements) = settled_book();
    assert_eq!(statements.len(), 2);
    let (alice, bob) = (b.statement(statements[0]), b.statement(statements[1]));
    assert_eq!((alice.owner.as_str(), bob.owner.as_str()), ("alice", "bob"));
    assert_eq!((alice.receipts, alice.credits_micros, alice.reversed_micros, alice.payable_micros), (3, 3 * cost(), cost(), 2 * cost()));
    assert_eq!(alice.nodes.keys().collect::<Vec<_>>(), ["pn-1", "pn-2"]);
    assert_eq!((alice.nodes["pn-1"].receipts, alice.nodes["pn-1"].reversed_receipts), (2, 1));
    assert_eq!(alice.reversals[0].reason, "outvoted by 2 of 3 replicas");
    assert_eq!((bob.payable_micros, bob.upto_seq, bob.head_hash.len()), (cost(), alice.upto_seq, 64));
    let r = check_all(&b.entries).unwrap();
    assert_eq!((r.statements, r.reversals, r.reversed.0, r.checkpoints), (2, 1, cost(), 1));
    assert_eq!(r.operator_key, fingerprint(&b.key.verifying_key().to_bytes()));
}

#[test]
fn a_receipt_after_the_close_lands_in_the_next_period_and_paid_is_recorded_once() {
    let (mut b, first) = settled_book();
    b.receipt(1, 3);
    let paid = b.paid(first[0], "SEPA-2026-12-06-001").unwrap();
    assert_eq!(b.paid(first[0], "again"), Err(PayoutError::AlreadyPaid { seq: first[0], paid_by: paid }));
    assert_eq!(b.paid(3, "x"), Err(PayoutError::NotAStatement(3)));
    let next = b.close();
    assert_eq!(next.len(), 1, "only alice had activity");
    let s = b.statement(next[0]);
    assert_eq!((s.owner.as_str(), s.receipts, s.from_seq), ("alice", 1, b.statement(first[0]).upto_seq + 1));
    assert_eq!(s.period_start_ms, b.statement(first[0]).period_end_ms);
    assert_eq!(check_all(&b.entries).unwrap().paid, 1);
}

#[test]
fn a_reversal_names_a_known_receipt_once() {
    let (mut b, _) = settled_book();
    assert_eq!(b.reverse(1, "disproved by spot check of task 17"), Err(PayoutError::NotAReceipt(1)), "entry 1 is a node key");
    assert_eq!(b.reverse(999, "x"), Err(PayoutError::NotAReceipt(999)));
    assert!(matches!(b.reverse(4, ""), Err(PayoutError::BadText { .. })));
    // A reversal of an already reversed receipt, forged into the chain: the verifier refuses.
    let mut c = b.entries.clone();
    let first_rev = c.iter().find(|e| e.kind == EntryKind::Reversal).unwrap().clone();
    c.push(Entry { seq: c.len() as u64 + 1, ..first_rev }.signed_by(&b.key));
    reseal(&mut c);
    let err = verify(&c, VerifyOptions { accept_unsigned_tail: true, ..strict() }).unwrap_err();
    assert!(err.reason.contains("reversed twice"), "{err}");
}

#[test]
fn a_chain_without_a_checkpoint_at_its_head_is_refused_unless_asked() {
    let (mut b, _) = settled_book();
    b.receipt(3, 2);
    let err = check_all(&b.entries).unwrap_err();
    assert!(err.reason.contains("no operator signature covers them"), "{err}");
    assert!(verify(&b.entries, VerifyOptions { accept_unsigned_tail: true, ..strict() }).is_ok());
    let empty: Vec<Entry> = vec![];
    assert!(check_all(&empty).is_ok(), "an empty ledger has nothing to cover");
}

#[test]
fn tamper_a_forged_node_key_is_named() {
    let (b, _) = settled_book();
    // An attacker appends their own key for pn-9, signed with their key, and rehashes.
    let thief = SigningKey::from_bytes(&[66; 32]);
    let mut c = b.entries.clone();
    c.pop();
    let forged = Entry::signed_node_key(c.len() as u64 + 1, 1, "pn-9", check::tests::node_key(9).verifying_key().to_bytes(), "mallory", &thief);
    c.push(forged);
    reseal(&mut c);
    let err = verify(&c, VerifyOptions { accept_unsigned_tail: true, ..strict() }).unwrap_err();
    assert_eq!(err.seq, c.len() as u64);
    let thief_fp = fingerprint(&thief.verifying_key().to_bytes());
    assert!(err.reason.starts_with(&format!("node key registration of pn-9 is signed by operator key {thief_fp}, but the ledger's key here is")), "{err}");
    // Claiming the operator's key does not help: the signature is the thief's.
    let last = c.len() - 1;
    c[last].signature.truncate(64);
    c[last].signature.extend_from_slice(&b.key.verifying_key().to_bytes());
    reseal(&mut c);
    let err = verify(&c, VerifyOptions { accept_unsigned_tail: true, ..strict() }).unwrap_err();
    assert!(err.reason.starts_with("node key registration of pn-9 is not signed by the operator key"), "{err}");
    // Unsigned (as before this rule), it is accepted only under a checkpoint, which the thief cannot make.
    let last = c.len() - 1;
    c[last].signature.clear();
    reseal(&mut c);
    let err = verify(&c, VerifyOptions { accept_unsigned_tail: true, ..strict() }).unwrap_err();
    assert!(err.reason.contains("not signed by the operator and no checkpoint covers it"), "{err}");
}

#[test]
fn tamper_a_dropped_checkpoint_and_a_truncated_tail_are_named() {
    let (mut b, _) = settled_book();
    b.receipt(1, 5);
    b.receipt(1, 6);
    b.checkpoint();
    let mut c = b.entries.clone();
    let first_cp = c.iter().position(|e| e.kind == EntryKind::Checkpoint).unwrap();
    c.remove(first_cp);
    let err = check_all(&c).unwrap_err();
    assert_eq!(err.reason, format!("is missing (the next stored entry is {})", first_cp + 2));
    let mut c = b.entries.clone();
    c.pop();
    let err = check_all(&c).unwrap_err();
    assert!(err.reason.contains("after the last checkpoint (entry"), "{err}");
    let mut c = b.entries.clone();
    c.truncate(c.len() - 2);
    let err = check_all(&c).unwrap_err();
    assert_eq!(err.seq, first_cp as u64 + 2, "the first entry no checkpoint covers: {err}");
    // Cut exactly at a checkpoint, an export is a true older ledger: its head is what tells it
    // from today's, so the verifier prints it for comparison with the published head.
    c.truncate(first_cp + 1);
    assert_eq!(check_all(&c).unwrap().head_seq, first_cp as u64 + 1);
}

#[test]
fn tamper_a_statement_whose_total_differs_from_its_receipts_is_named_even_if_the_operator_signs_it() {
    let (b, statements) = settled_book();
    let mut c = b.entries.clone();
    let i = statements[0] as usize - 1;
    let mut s = b.statement(statements[0]);
    s.payable_micros += 1;
    c[i] = Entry { body: s.to_body(), ..c[i].clone() }.signed_by(&b.key);
    reseal(&mut c);
    let err = check_all(&c).unwrap_err();
    assert_eq!(err.seq, statements[0]);
    assert!(err.reason.contains("statement for alice: payable_micros is"), "{err}");
    // Leaving a receipt out changes the count, the sums and the receipts digest.
    let mut s = b.statement(statements[1]);
    s.receipts = 0;
    c = b.entries.clone();
    let i = statements[1] as usize - 1;
    c[i] = Entry { body: s.to_body(), ..c[i].clone() }.signed_by(&b.key);
    reseal(&mut c);
    assert!(check_all(&c).unwrap_err().reason.contains("receipts is 0 but"));
}

#[test]
fn tamper_a_statement_signed_by_another_key_is_named() {
    let (b, statements) = settled_book();
    let other = SigningKey::from_bytes(&[7; 32]);
    let mut c = b.entries.clone();
    let i = statements[0] as usize - 1;
    c[i] = Entry { public_key: other.verifying_key().to_bytes().to_vec(), ..c[i].clone() }.signed_by(&other);
    reseal(&mut c);
    let err = check_all(&c).unwrap_err();
    assert_eq!(err.seq, statements[0]);
    assert!(err.reason.contains(&format!("statement is signed by operator key {}", fingerprint(&other.verifying_key().to_bytes()))), "{err}");
    // The right key but a signature over other bytes.
    let mut c = b.entries.clone();
    c[i].signature[3] ^= 1;
    reseal(&mut c);
    assert!(check_all(&c).unwrap_err().reason.contains("statement signature does not verify"));
}

#[test]
fn a_key_rotation_signed_by_the_old_key_carries_the_chain_and_the_pin() {
    let (mut b, _) = settled_book();
    let (old, new) = (b.key.clone(), SigningKey::from_bytes(&[43; 32]));
    let mut batch = Batch::default();
    b.state.rotate_key(&mut batch, 9, &old, &new.verifying_key());
    b.flush(batch);
    b.key = new.clone();
    b.receipt(3, 7);
    b.close();
    let r = check_all(&b.entries).unwrap();
    assert_eq!((r.key_rotations, r.operator_key.clone()), (1, fingerprint(&new.verifying_key().to_bytes())));
    for k in [&old, &new] {
        let pin = VerifyOptions { operator_key_sha256: Some(fingerprint(&k.verifying_key().to_bytes())), ..strict() };
        assert!(verify(&b.entries, pin).is_ok());
    }
    let pin = VerifyOptions { operator_key_sha256: Some("ab".repeat(32)), ..strict() };
    assert!(verify(&b.entries, pin).unwrap_err().reason.contains("not the expected"));
    // A rotation signed by anyone else, or a new key without a rotation, is refused.
    let rot = b.entries.iter().position(|e| e.kind == EntryKind::KeyRotation).unwrap();
    let thief = SigningKey::from_bytes(&[66; 32]);
    let mut c = b.entries.clone();
    c[rot] = Entry { public_key: thief.verifying_key().to_bytes().to_vec(), ..c[rot].clone() }.signed_by(&thief);
    reseal(&mut c);
    assert!(check_all(&c).unwrap_err().reason.contains("key-rotation is signed by operator key"));
    let mut c = b.entries.clone();
    c.remove(rot);
    for (i, e) in c.iter_mut().enumerate().skip(rot) {
        e.seq = i as u64 + 1;
    }
    reseal(&mut c);
    assert!(check_all(&c).is_err(), "lines signed by the new key without a rotation do not verify");
}

#[test]
fn an_export_verifies_offline_and_a_flipped_byte_does_not() {
    let (b, _) = settled_book();
    let jsonl: String = b.entries.iter().map(|e| serde_json::to_string(&ExportLine::from(e)).unwrap() + "\n").collect();
    let r = verify_export(jsonl.as_bytes(), strict()).unwrap();
    assert_eq!(r.statements, 2);
    let bad = jsonl.replacen("\"node\":\"pn-3\"", "\"node\":\"pn-4\"", 1);
    let err = verify_export(bad.as_bytes(), strict()).unwrap_err().to_string();
    assert!(err.contains("hash does not match its content"), "{err}");
    let err = verify_export("{\"seq\":1}\n".as_bytes(), strict()).unwrap_err().to_string();
    assert!(err.starts_with("export line 1: not an export entry"), "{err}");
}

fn files(b: &Book) -> Vec<crate::statement_file::StatementFile> {
    let mut f = StatementFiles::default();
    b.entries.iter().filter_map(|e| f.push(e)).collect()
}

fn acks(b: &Book, seed: u8) -> Vec<AckedReceipt> {
    let node = format!("pn-{seed}");
    b.entries
        .iter()
        .filter(|e| e.kind == EntryKind::Receipt && e.node == node)
        .map(|e| AckedReceipt { attempt_id: e.attempt_id.clone(), ledger_seq: e.seq, entry_hash: hex::encode(&e.hash), cost_micros: e.cost.0 })
        .collect()
}

#[test]
fn a_provider_finds_a_receipt_left_out_of_its_statement() {
    let (b, _) = settled_book();
    let alice = files(&b).remove(0);
    alice.check(None).unwrap();
    let found = reconcile(&alice, &acks(&b, 1));
    assert_eq!(found.len(), 1);
    assert!(matches!(&found[0], Discrepancy::Reversed { reason, .. } if reason == "outvoted by 2 of 3 replicas"));
    // A file listing fewer receipts than the statement commits to does not check.
    let mut short = alice.clone();
    short.receipts.remove(0);
    assert!(short.check(None).unwrap_err().contains("receipts_sha256 differs"));
    // An operator who signs a statement leaving one receipt out: the file checks (it is what
    // was signed), and the provider's Acks find the receipt missing.
    let mut lying = alice.clone();
    let left_out = lying.receipts.remove(0);
    let mut h = sha2::Sha256::new();
    for r in &lying.receipts {
        let hash: [u8; 32] = hex::decode(&r.hash).unwrap().try_into().unwrap();
        crate::payout::receipt_leaf(&mut h, r.seq, &hash, kommune_core::pricing::Micros(r.credits_micros));
    }
    lying.statement.receipts_sha256 = hex::encode(sha2::Digest::finalize(h));
    lying.statement.receipts -= 1;
    lying.statement.credits_micros -= left_out.credits_micros;
    let mut e = lying.entry.to_entry().unwrap();
    e.body = lying.statement.to_body();
    let e = e.signed_by(&b.key).seal(GENESIS);
    lying.entry = ExportLine::from(&e);
    lying.check(Some(&fingerprint(&b.key.verifying_key().to_bytes()))).unwrap();
    let found = reconcile(&lying, &acks(&b, 1));
    assert!(found.contains(&Discrepancy::Missing { attempt_id: left_out.attempt_id.clone(), seq: left_out.seq }), "{found:?}");
    assert!(found[0].to_string().starts_with("MISSING: receipt of attempt a-1-1-1"), "{}", found[0]);
    assert!(lying.check(Some(&"cd".repeat(32))).unwrap_err().contains("not the expected"));
}

use sha2::Digest;

#[derive(Debug, Clone)]
enum Step {
    Receipt(u8, u64),
    Reverse(usize),
    Close,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (1u8..=4, 1u64..12).prop_map(|(n, s)| Step::Receipt(n, s)),
        2 => (0usize..64).prop_map(Step::Reverse),
        1 => Just(Step::Close),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Over any stream of receipts (some refused: repeats, a node whose key is not registered),
    /// reversals (some of receipts already reversed) and closes, the statements pay exactly the
    /// accepted receipts minus the reversed ones, and the chain verifies.
    #[test]
    fn statements_pay_exactly_the_accepted_minus_the_reversed_receipts(steps in proptest::collection::vec(step(), 1..40)) {
        let mut b = Book::new();
        b.node(1, "alice");
        b.node(2, "alice");
        b.node(3, "bob");
        let (mut accepted, mut reversed, mut receipts) = (0u64, 0u64, vec![]);
        for s in steps {
            match s {
                Step::Receipt(n, seq) => match b.receipt(n, seq) {
                    Verdict::Accepted { seq, cost, .. } => { accepted += cost.0; receipts.push(seq) }
                    Verdict::Duplicate { .. } | Verdict::Rejected { .. } => {}
                },
                Step::Reverse(i) if !receipts.is_empty() => {
                    let r = receipts[i % receipts.len()];
                    if b.settle.reversal_of(r).is_none() {
                        b.reverse(r, "outvoted").unwrap();
                        reversed += cost();
                    }
                }
                Step::Reverse(_) => {}
                Step::Close => { b.close(); }
            }
        }
        b.close();
        let paid: i128 = b.entries.iter().filter(|e| e.kind == EntryKind::Statement)
            .map(|e| { let s = Statement::parse(&e.body).unwrap(); s.payable_micros as i128 - s.owed_micros as i128 }).sum();
        prop_assert_eq!(paid, accepted as i128 - reversed as i128);
        let r = check_all(&b.entries).unwrap();
        prop_assert_eq!((r.total.0, r.reversed.0), (accepted, reversed));
    }
}
