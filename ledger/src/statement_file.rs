//! A statement as handed to its owner: the signed statement line, its decoded content and every
//! receipt it covers. [`StatementFile::check`] proves the list is the one the operator signed;
//! [`reconcile`] says which of a provider's acknowledged receipts are missing or wrong in it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::entry::{EntryKind, fingerprint, operator_signature_ok};
use crate::export::ExportLine;
use crate::payout::{Statement, receipt_leaf};
use kommune_core::pricing::Micros;

/// One receipt a statement covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementReceipt {
    pub seq: u64,
    /// Hex hash of the receipt entry.
    pub hash: String,
    pub node: String,
    pub epoch: u64,
    pub sequence: u64,
    pub attempt_id: String,
    pub credits_micros: u64,
}

/// What `kommune-operator payout export --format json` writes per statement, and what
/// `kommune-agent earnings --verify` reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementFile {
    /// The statement line as stored (signed by the operator).
    pub entry: ExportLine,
    /// Its body, decoded (checked equal to the signed body).
    pub statement: Statement,
    pub receipts: Vec<StatementReceipt>,
}

impl StatementFile {
    /// Checks that the line is a statement whose hash matches its content, signed by the key it
    /// names (the pinned one when `operator_key_sha256` is given), that `statement` is its body,
    /// and that `receipts` are exactly the receipts it commits to. Returns the statement.
    pub fn check(&self, operator_key_sha256: Option<&str>) -> Result<&Statement, String> {
        let e = self.entry.to_entry()?;
        if e.kind != EntryKind::Statement {
            return Err(format!("entry {} is a {}, not a statement", e.seq, e.kind.name()));
        }
        if e.hash != e.compute_hash() {
            return Err(format!("statement entry {}: hash does not match its content", e.seq));
        }
        let key: [u8; 32] = e.public_key.as_slice().try_into().map_err(|_| "statement names no 32-byte operator key".to_string())?;
        if !operator_signature_ok(&e, &key) {
            return Err(format!("statement entry {}: signature does not verify with the operator key it names", e.seq));
        }
        let fp = fingerprint(&key);
        if let Some(want) = operator_key_sha256
            && !want.eq_ignore_ascii_case(&fp)
        {
            return Err(format!("statement entry {} is signed by operator key {fp}, not the expected {want}", e.seq));
        }
        let signed = Statement::parse(&e.body)?;
        if signed != self.statement {
            return Err(format!("the decoded statement differs from the signed one: {}", self.statement.difference(&signed).unwrap_or_default()));
        }
        let mut h = Sha256::new();
        let mut credits = Micros(0);
        for r in &self.receipts {
            let hash: [u8; 32] =
                hex::decode(&r.hash).ok().and_then(|b| b.try_into().ok()).ok_or_else(|| format!("receipt {}: hash is not 32 bytes of hex", r.seq))?;
            receipt_leaf(&mut h, r.seq, &hash, Micros(r.credits_micros));
            credits = credits.saturating_add(Micros(r.credits_micros));
        }
        let s = &self.statement;
        if hex::encode(h.finalize()) != s.receipts_sha256 {
            return Err(format!("the {} receipts listed are not the ones statement {} commits to (receipts_sha256 differs)", self.receipts.len(), e.seq));
        }
        if (self.receipts.len() as u64, credits.0) != (s.receipts, s.credits_micros) {
            return Err(format!(
                "statement {} says {} receipts and {} micro-credits, its receipts give {} and {}",
                e.seq,
                s.receipts,
                s.credits_micros,
                self.receipts.len(),
                credits.0
            ));
        }
        Ok(s)
    }
}

/// A statement as `kommune-operator payout export --format json` writes it (an array of these):
/// its file and whether it was paid.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportedStatement {
    #[serde(flatten)]
    pub file: StatementFile,
    /// The paid line, when there is one. Not covered by the statement's signature: it is the
    /// operator's word until the paid entry itself is checked (`ledger verify`).
    pub paid: Option<PaidMark>,
}

/// A statement's paid line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PaidMark {
    pub seq: u64,
    pub reference: String,
}

/// Reads an export: a JSON array of statements, or one statement object.
pub fn read_export(json: &str) -> Result<Vec<ExportedStatement>, String> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let one = |v: serde_json::Value| serde_json::from_value::<ExportedStatement>(v).map_err(|e| format!("not a statement file: {e}"));
    match value {
        serde_json::Value::Array(items) => items.into_iter().map(one).collect(),
        v => Ok(vec![one(v)?]),
    }
}

/// A receipt as a provider knows it from the operator's Ack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckedReceipt {
    pub attempt_id: String,
    pub ledger_seq: u64,
    /// Hex hash of the ledger entry.
    pub entry_hash: String,
    pub cost_micros: u64,
}

/// What is wrong with one acknowledged receipt in a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discrepancy {
    /// Inside the statement's range, but not listed.
    Missing { attempt_id: String, seq: u64 },
    /// Listed, but with another hash or amount than the Ack said.
    Wrong { attempt_id: String, seq: u64, what: String },
    /// Listed and reversed by the operator (not paid), with the reason.
    Reversed { attempt_id: String, seq: u64, reason: String },
}

impl std::fmt::Display for Discrepancy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Discrepancy::Missing { attempt_id, seq } => write!(f, "MISSING: receipt of attempt {attempt_id} (ledger entry {seq}) is not in the statement"),
            Discrepancy::Wrong { attempt_id, seq, what } => write!(f, "WRONG: receipt of attempt {attempt_id} (ledger entry {seq}): {what}"),
            Discrepancy::Reversed { attempt_id, seq, reason } => write!(f, "REVERSED: receipt of attempt {attempt_id} (ledger entry {seq}): {reason}"),
        }
    }
}

/// Compares the acknowledged receipts in the statement's range with its list. Acks outside
/// `from_seq..=upto_seq` belong to other statements and are not looked at. Call
/// [`StatementFile::check`] first.
pub fn reconcile(file: &StatementFile, acks: &[AckedReceipt]) -> Vec<Discrepancy> {
    let s = &file.statement;
    let listed: std::collections::HashMap<u64, &StatementReceipt> = file.receipts.iter().map(|r| (r.seq, r)).collect();
    let mut out = vec![];
    for a in acks.iter().filter(|a| (s.from_seq..=s.upto_seq).contains(&a.ledger_seq)) {
        let (attempt_id, seq) = (a.attempt_id.clone(), a.ledger_seq);
        match listed.get(&a.ledger_seq) {
            None => out.push(Discrepancy::Missing { attempt_id, seq }),
            Some(r) if !r.hash.eq_ignore_ascii_case(&a.entry_hash) => {
                out.push(Discrepancy::Wrong { attempt_id, seq, what: format!("the statement lists entry hash {}, the Ack said {}", r.hash, a.entry_hash) })
            }
            Some(r) if r.credits_micros != a.cost_micros || r.attempt_id != a.attempt_id => out.push(Discrepancy::Wrong {
                attempt_id,
                seq,
                what: format!(
                    "the statement lists {} micro-credits for attempt {}, the Ack said {} for {}",
                    r.credits_micros, r.attempt_id, a.cost_micros, a.attempt_id
                ),
            }),
            Some(_) => {
                if let Some(rev) = s.reversals.iter().find(|v| v.receipt_seq == a.ledger_seq) {
                    out.push(Discrepancy::Reversed { attempt_id, seq, reason: rev.reason.clone() });
                }
            }
        }
    }
    out
}

/// Builds the file of every statement of a chain read from entry 1, one entry at a time: keeps
/// who owns each node key and the receipts of each owner since its last statement.
#[derive(Default)]
pub struct StatementFiles {
    owner_of: std::collections::HashMap<(String, Vec<u8>), String>,
    pending: std::collections::HashMap<String, Vec<StatementReceipt>>,
}

impl StatementFiles {
    /// Takes the next entry; returns the statement file when it is a statement line.
    pub fn push(&mut self, e: &crate::entry::Entry) -> Option<StatementFile> {
        match e.kind {
            EntryKind::NodeKey => {
                self.owner_of.insert((e.node.clone(), e.public_key.clone()), e.owner());
                None
            }
            EntryKind::Receipt => {
                let owner = self.owner_of.get(&(e.node.clone(), e.public_key.clone())).cloned().unwrap_or_else(|| e.node.clone());
                self.pending.entry(owner).or_default().push(StatementReceipt {
                    seq: e.seq,
                    hash: hex::encode(&e.hash),
                    node: e.node.clone(),
                    epoch: e.epoch,
                    sequence: e.sequence,
                    attempt_id: e.attempt_id.clone(),
                    credits_micros: e.cost.0,
                });
                None
            }
            EntryKind::Statement => {
                let statement = Statement::parse(&e.body).ok()?;
                let mine = self.pending.remove(&statement.owner).unwrap_or_default();
                let (receipts, later): (Vec<_>, Vec<_>) = mine.into_iter().partition(|r| r.seq <= statement.upto_seq);
                if !later.is_empty() {
                    self.pending.insert(statement.owner.clone(), later);
                }
                Some(StatementFile { entry: ExportLine::from(e), statement, receipts })
            }
            _ => None,
        }
    }
}
