//! Settlement lines: reversals, per-owner statements and paid marks, and [`Settlement`], the one
//! computation of what a statement must say, shared by the operator's writer and every verifier.

use std::collections::{BTreeMap, HashMap};

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::entry::{Entry, EntryKind, UsageFigures};
use kommune_core::pricing::Micros;

/// Longest reversal reason and payment reference kept, in bytes.
pub const REASON_MAX: usize = 1024;
pub const REFERENCE_MAX: usize = 512;

/// The body of a reversal line: which receipt is taken back and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReversalBody {
    pub receipt_seq: u64,
    /// Hex hash of the receipt entry, so the reversal names exactly one receipt.
    pub receipt_hash: String,
    pub reason: String,
}

/// The body of a paid line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaidBody {
    pub statement_seq: u64,
    pub owner: String,
    /// What the statement said is payable, repeated so a paid line reads alone.
    pub payable_micros: u64,
    /// The payment rail's reference (bank transfer id, transaction hash, invoice number).
    pub reference: String,
}

/// One node's part of a statement. Usage is of the receipts in range (reversed ones included:
/// it is what was metered); credits and reversals are separate so `payable` reads off them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLine {
    pub receipts: u64,
    pub credits_micros: u64,
    pub reversed_receipts: u64,
    pub reversed_micros: u64,
    pub usage: UsageFigures,
}

/// A reversal a statement subtracts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReversalLine {
    /// The reversal entry.
    pub seq: u64,
    pub receipt_seq: u64,
    pub node: String,
    pub credits_micros: u64,
    pub reason: String,
}

/// One owner's settlement: the receipts and reversals of the owner's nodes with seq in
/// `from_seq..=upto_seq`. Stored as JSON in a statement line's body and signed by the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    pub owner: String,
    /// The period: from the end of the owner's previous statement (or its first entry) to the
    /// close, Unix ms.
    pub period_start_ms: i64,
    pub period_end_ms: i64,
    pub from_seq: u64,
    pub upto_seq: u64,
    /// Hex hash of entry `upto_seq`.
    pub head_hash: String,
    pub receipts: u64,
    pub credits_micros: u64,
    pub reversed_micros: u64,
    /// credits − reversed when positive …
    pub payable_micros: u64,
    /// … and what the owner owes back when reversals exceed the period's credits.
    pub owed_micros: u64,
    /// sha256 (hex) over the included receipts, see [`receipt_leaf`]: a statement file lists
    /// them and a provider checks its own against this.
    pub receipts_sha256: String,
    pub nodes: BTreeMap<String, NodeLine>,
    pub reversals: Vec<ReversalLine>,
}

impl Statement {
    /// The stored body.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a statement always serializes")
    }

    /// Reads a statement line's body.
    pub fn parse(body: &[u8]) -> Result<Statement, String> {
        serde_json::from_slice(body).map_err(|e| format!("statement body does not read: {e}"))
    }

    /// The first field where `self` differs from `want` (what the ledger gives), named.
    pub fn difference(&self, want: &Statement) -> Option<String> {
        let (serde_json::Value::Object(got), serde_json::Value::Object(want)) = (serde_json::json!(self), serde_json::json!(want)) else {
            return Some("statement is not an object".into());
        };
        want.iter()
            .find(|(k, v)| got.get(*k) != Some(v))
            .map(|(k, v)| format!("{k} is {} but its receipts and reversals give {v}", got.get(k).unwrap_or(&serde_json::Value::Null)))
    }
}

/// What a receipt contributes to a statement's `receipts_sha256`: seq, entry hash and cost.
pub fn receipt_leaf(h: &mut Sha256, seq: u64, hash: &[u8; 32], cost: Micros) {
    h.update(seq.to_be_bytes());
    h.update(hash);
    h.update(cost.0.to_be_bytes());
}

#[derive(Debug, Clone)]
struct ReceiptRef {
    owner: u32,
    node: u32,
    cost: Micros,
    hash: [u8; 32],
}

/// What a statement line said, for paid marks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementRef {
    pub owner: String,
    pub payable: Micros,
    pub paid_by: Option<u64>,
}

#[derive(Clone)]
struct Open {
    from_seq: u64,
    start_ms: i64,
    receipts: u64,
    credits: Micros,
    reversed: Micros,
    nodes: BTreeMap<String, NodeLine>,
    reversals: Vec<ReversalLine>,
    hasher: Sha256,
}

/// The settlement state of a chain read from entry 1: who owns which node key, every receipt's
/// cost and whether it was reversed, and each owner's entries since its last statement.
#[derive(Default, Clone)]
pub struct Settlement {
    names: Vec<String>,
    name_idx: HashMap<String, u32>,
    owner_of: HashMap<(String, [u8; 32]), u32>,
    receipts: HashMap<u64, ReceiptRef>,
    open: BTreeMap<u32, Open>,
    /// Per owner: the last statement's upto_seq and period end.
    closed: HashMap<u32, (u64, i64)>,
    statements: HashMap<u64, StatementRef>,
    /// Per reversed receipt: the reversal's seq and reason.
    reversals: HashMap<u64, (u64, String)>,
    /// The last receipt or reversal, and the hashes of the entries since (a statement names one).
    last_contributing: u64,
    recent: Vec<(u64, [u8; 32])>,
    applied: u64,
}

/// Why a settlement line cannot be made or does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayoutError {
    #[error("entry {0} is not a receipt in this ledger")]
    NotAReceipt(u64),
    #[error("no receipt in this ledger meters attempt {0:?}")]
    NoReceiptForAttempt(String),
    #[error("entry {0} is not a statement in this ledger")]
    NotAStatement(u64),
    #[error("statement {seq} was already marked paid by entry {paid_by}")]
    AlreadyPaid { seq: u64, paid_by: u64 },
    #[error("{what} is empty or longer than {max} bytes")]
    BadText { what: &'static str, max: usize },
}

impl Settlement {
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.name_idx.get(s) {
            return i;
        }
        let i = self.names.len() as u32;
        self.names.push(s.to_string());
        self.name_idx.insert(s.to_string(), i);
        i
    }

    /// The seq of the last entry applied.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// The reversal entry of receipt `seq` and its reason, if it was reversed.
    pub fn reversal_of(&self, receipt_seq: u64) -> Option<(u64, &str)> {
        self.reversals.get(&receipt_seq).map(|(s, r)| (*s, r.as_str()))
    }

    /// A receipt's node and cost.
    pub fn receipt(&self, seq: u64) -> Option<(&str, Micros)> {
        self.receipts.get(&seq).map(|r| (self.names[r.node as usize].as_str(), r.cost))
    }

    /// Whether `seq` is a receipt.
    pub fn is_receipt(&self, seq: u64) -> bool {
        self.receipts.contains_key(&seq)
    }

    /// The statement line `seq`, if it is one.
    pub fn statement(&self, seq: u64) -> Option<&StatementRef> {
        self.statements.get(&seq)
    }

    fn open_of(&mut self, owner: u32, seq: u64, ms: i64) -> &mut Open {
        let start_ms = self.closed.get(&owner).map_or(ms, |c| c.1);
        let from_seq = self.closed.get(&owner).map_or(1, |c| c.0 + 1);
        self.open.entry(owner).or_insert_with(|| Open {
            from_seq: from_seq.min(seq),
            start_ms,
            receipts: 0,
            credits: Micros(0),
            reversed: Micros(0),
            nodes: BTreeMap::new(),
            reversals: vec![],
            hasher: Sha256::new(),
        })
    }

    /// Applies the next entry of the chain (entries must come in seq order, each once).
    /// Statement and paid lines are checked against what the chain before them gives; the
    /// error says what differs.
    pub fn apply(&mut self, e: &Entry) -> Result<(), String> {
        let hash: [u8; 32] = e.hash32().unwrap_or_default();
        match e.kind {
            EntryKind::NodeKey => {
                if let Ok(key) = <[u8; 32]>::try_from(e.public_key.as_slice()) {
                    let owner = self.intern(&e.owner());
                    self.owner_of.insert((e.node.clone(), key), owner);
                }
            }
            EntryKind::Receipt => self.apply_receipt(e, hash)?,
            EntryKind::Reversal => self.apply_reversal(e)?,
            EntryKind::Statement => self.apply_statement(e)?,
            EntryKind::Paid => self.apply_paid(e)?,
            EntryKind::Checkpoint | EntryKind::KeyRotation => {}
        }
        if matches!(e.kind, EntryKind::Receipt | EntryKind::Reversal) {
            self.last_contributing = e.seq;
            self.recent.clear();
        }
        self.recent.push((e.seq, hash));
        self.applied = e.seq;
        Ok(())
    }

    fn apply_receipt(&mut self, e: &Entry, hash: [u8; 32]) -> Result<(), String> {
        let key = <[u8; 32]>::try_from(e.public_key.as_slice()).map_err(|_| "node public key is not 32 bytes".to_string())?;
        // A receipt whose key has no registration is refused by the chain checks before this.
        let owner = match self.owner_of.get(&(e.node.clone(), key)) {
            Some(&o) => o,
            None => self.intern(&e.node.clone()),
        };
        let node = self.intern(&e.node);
        self.receipts.insert(e.seq, ReceiptRef { owner, node, cost: e.cost, hash });
        let open = self.open_of(owner, e.seq, e.recorded_ms);
        open.receipts += 1;
        open.credits = open.credits.saturating_add(e.cost);
        receipt_leaf(&mut open.hasher, e.seq, &hash, e.cost);
        let line = open.nodes.entry(e.node.clone()).or_default();
        line.receipts += 1;
        line.credits_micros = line.credits_micros.saturating_add(e.cost.0);
        let (s, u) = (&mut line.usage, &e.usage);
        s.wall_millis = s.wall_millis.saturating_add(u.wall_millis);
        s.cpu_micros = s.cpu_micros.saturating_add(u.cpu_micros);
        s.memory_peak_bytes = s.memory_peak_bytes.max(u.memory_peak_bytes);
        s.memory_mib_millis = s.memory_mib_millis.saturating_add(u.memory_mib_millis);
        s.wasm_fuel = s.wasm_fuel.saturating_add(u.wasm_fuel);
        s.gpu_millis = s.gpu_millis.saturating_add(u.gpu_millis);
        s.output_bytes = s.output_bytes.saturating_add(u.output_bytes);
        Ok(())
    }

    fn apply_reversal(&mut self, e: &Entry) -> Result<(), String> {
        let body: ReversalBody = serde_json::from_slice(&e.body).map_err(|err| format!("reversal body does not read: {err}"))?;
        let r = self.receipts.get(&body.receipt_seq).ok_or_else(|| format!("reversal names entry {}, which is not an earlier receipt", body.receipt_seq))?;
        if let Some((prev, _)) = self.reversals.get(&body.receipt_seq) {
            return Err(format!("receipt {} is reversed twice (first by entry {prev})", body.receipt_seq));
        }
        if body.receipt_hash != hex::encode(r.hash) {
            return Err(format!(
                "reversal names receipt {} with hash {}, but that receipt's hash is {}",
                body.receipt_seq,
                body.receipt_hash,
                hex::encode(r.hash)
            ));
        }
        let node = self.names[r.node as usize].clone();
        if e.node != node || e.cost != r.cost {
            return Err(format!(
                "reversal says node {} and {} credits, but receipt {} is node {node} and {} credits",
                e.node, e.cost, body.receipt_seq, r.cost
            ));
        }
        let (owner, cost) = (r.owner, r.cost);
        self.reversals.insert(body.receipt_seq, (e.seq, body.reason.clone()));
        let open = self.open_of(owner, e.seq, e.recorded_ms);
        open.reversed = open.reversed.saturating_add(cost);
        let line = open.nodes.entry(node.clone()).or_default();
        line.reversed_receipts += 1;
        line.reversed_micros = line.reversed_micros.saturating_add(cost.0);
        open.reversals.push(ReversalLine { seq: e.seq, receipt_seq: body.receipt_seq, node, credits_micros: cost.0, reason: body.reason });
        Ok(())
    }

    /// What `owner`'s statement closing at `upto_seq` must say (None when the owner has no
    /// receipt or reversal since its last statement, or `upto_seq` is not a closable point).
    pub fn expected(&self, owner: &str, upto_seq: u64, period_end_ms: i64) -> Option<Statement> {
        let o = self.open.get(self.name_idx.get(owner)?)?;
        let head = self.recent.iter().find(|(s, _)| *s == upto_seq)?.1;
        Some(Statement {
            owner: owner.to_string(),
            period_start_ms: o.start_ms,
            period_end_ms,
            from_seq: o.from_seq,
            upto_seq,
            head_hash: hex::encode(head),
            receipts: o.receipts,
            credits_micros: o.credits.0,
            reversed_micros: o.reversed.0,
            payable_micros: o.credits.0.saturating_sub(o.reversed.0),
            owed_micros: o.reversed.0.saturating_sub(o.credits.0),
            receipts_sha256: hex::encode(o.hasher.clone().finalize()),
            nodes: o.nodes.clone(),
            reversals: o.reversals.clone(),
        })
    }

    /// Owners with a receipt or reversal since their last statement, by name.
    pub fn open_owners(&self) -> Vec<String> {
        let mut v: Vec<String> = self.open.keys().map(|&o| self.names[o as usize].clone()).collect();
        v.sort();
        v
    }

    fn apply_statement(&mut self, e: &Entry) -> Result<(), String> {
        let got = Statement::parse(&e.body)?;
        if got.period_end_ms != e.recorded_ms {
            return Err(format!("statement period ends at {} but the line was recorded at {}", got.period_end_ms, e.recorded_ms));
        }
        if got.upto_seq < self.last_contributing || got.upto_seq >= e.seq {
            return Err(format!(
                "statement covers entries up to {}, but entry {} (a receipt or reversal) comes before the statement and after that",
                got.upto_seq, self.last_contributing
            ));
        }
        let want = self
            .expected(&got.owner, got.upto_seq, got.period_end_ms)
            .ok_or_else(|| format!("statement for {} covers no receipt or reversal of that owner", got.owner))?;
        if let Some(diff) = got.difference(&want) {
            return Err(format!("statement for {}: {diff}", got.owner));
        }
        let owner = self.name_idx[&got.owner];
        self.open.remove(&owner);
        self.closed.insert(owner, (got.upto_seq, got.period_end_ms));
        self.statements.insert(e.seq, StatementRef { owner: got.owner, payable: Micros(got.payable_micros), paid_by: None });
        Ok(())
    }

    fn apply_paid(&mut self, e: &Entry) -> Result<(), String> {
        let body: PaidBody = serde_json::from_slice(&e.body).map_err(|err| format!("paid body does not read: {err}"))?;
        let s = self
            .statements
            .get_mut(&body.statement_seq)
            .ok_or_else(|| format!("paid line names entry {}, which is not an earlier statement", body.statement_seq))?;
        if let Some(prev) = s.paid_by {
            return Err(format!("statement {} is marked paid twice (first by entry {prev})", body.statement_seq));
        }
        if (body.owner.as_str(), body.payable_micros) != (s.owner.as_str(), s.payable.0) {
            return Err(format!(
                "paid line says {} is paid {} micro-credits, but statement {} is {} for {}",
                body.owner, body.payable_micros, body.statement_seq, s.owner, s.payable.0
            ));
        }
        s.paid_by = Some(e.seq);
        Ok(())
    }

    // ---- Making lines (the operator's writer). Each is unsealed; the caller seals, appends
    // and then applies it. ----

    /// A reversal line at `seq` of receipt `receipt_seq`.
    pub fn reversal_line(&self, seq: u64, ms: i64, receipt_seq: u64, reason: &str, key: &SigningKey) -> Result<Entry, PayoutError> {
        if reason.is_empty() || reason.len() > REASON_MAX {
            return Err(PayoutError::BadText { what: "reversal reason", max: REASON_MAX });
        }
        let r = self.receipts.get(&receipt_seq).ok_or(PayoutError::NotAReceipt(receipt_seq))?;
        let body = ReversalBody { receipt_seq, receipt_hash: hex::encode(r.hash), reason: reason.to_string() };
        let line = Entry::operator_line(seq, EntryKind::Reversal, ms, serde_json::to_vec(&body).expect("serializes"), key);
        Ok(Entry { node: self.names[r.node as usize].clone(), cost: r.cost, ..line }.signed_by(key))
    }

    /// The statement line at `seq` for `owner`, closing at the current head (`upto_seq`).
    pub fn statement_line(&self, seq: u64, ms: i64, owner: &str, upto_seq: u64, key: &SigningKey) -> Option<Entry> {
        let st = self.expected(owner, upto_seq, ms)?;
        Some(Entry::operator_line(seq, EntryKind::Statement, ms, st.to_body(), key).signed_by(key))
    }

    /// A paid line at `seq` for statement `statement_seq`.
    pub fn paid_line(&self, seq: u64, ms: i64, statement_seq: u64, reference: &str, key: &SigningKey) -> Result<Entry, PayoutError> {
        if reference.is_empty() || reference.len() > REFERENCE_MAX {
            return Err(PayoutError::BadText { what: "payment reference", max: REFERENCE_MAX });
        }
        let s = self.statements.get(&statement_seq).ok_or(PayoutError::NotAStatement(statement_seq))?;
        if let Some(paid_by) = s.paid_by {
            return Err(PayoutError::AlreadyPaid { seq: statement_seq, paid_by });
        }
        let body = PaidBody { statement_seq, owner: s.owner.clone(), payable_micros: s.payable.0, reference: reference.to_string() };
        Ok(Entry::operator_line(seq, EntryKind::Paid, ms, serde_json::to_vec(&body).expect("serializes"), key).signed_by(key))
    }
}
