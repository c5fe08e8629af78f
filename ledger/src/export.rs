//! The export format (one JSON object per entry, every stored field, bytes in hex) and offline
//! verification of an export file: what an auditor runs with no database and no trust in the sender.

use std::io::BufRead;

use serde::{Deserialize, Serialize};

use crate::entry::{Entry, EntryKind, UsageFigures, fingerprint};
use crate::verify::{BadEntry, ChainVerifier, VerifyOptions, VerifyReport};
use kommune_core::pricing::{Micros, Rates};

/// One exported entry. `cost`, `public_key_sha256` and `recorded_at` are for people reading it;
/// an importer ignores them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportLine {
    pub seq: u64,
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub recorded_at: String,
    pub recorded_ms: i64,
    pub node: String,
    pub epoch: u64,
    pub sequence: u64,
    pub attempt_id: String,
    pub job_uid: String,
    pub job: String,
    pub usage: UsageFigures,
    pub rates: Rates,
    pub cost_micros: u64,
    #[serde(default)]
    pub cost: String,
    #[serde(default)]
    pub public_key_sha256: String,
    pub body: String,
    pub signature: String,
    pub public_key: String,
    pub prev_hash: String,
    pub hash: String,
}

impl From<&Entry> for ExportLine {
    fn from(e: &Entry) -> Self {
        ExportLine {
            seq: e.seq,
            kind: e.kind.name().to_string(),
            recorded_at: String::new(),
            recorded_ms: e.recorded_ms,
            node: e.node.clone(),
            epoch: e.epoch,
            sequence: e.sequence,
            attempt_id: e.attempt_id.clone(),
            job_uid: e.job_uid.clone(),
            job: e.job_key.clone(),
            usage: e.usage,
            rates: e.rates,
            cost_micros: e.cost.0,
            cost: e.cost.to_string(),
            public_key_sha256: if e.public_key.is_empty() { String::new() } else { fingerprint(&e.public_key) },
            body: hex::encode(&e.body),
            signature: hex::encode(&e.signature),
            public_key: hex::encode(&e.public_key),
            prev_hash: hex::encode(&e.prev_hash),
            hash: hex::encode(&e.hash),
        }
    }
}

impl ExportLine {
    /// The entry this line describes; the error names the field that does not read.
    pub fn to_entry(&self) -> Result<Entry, String> {
        let h = |name: &str, v: &str| hex::decode(v).map_err(|e| format!("{name} is not hex: {e}"));
        Ok(Entry {
            seq: self.seq,
            kind: EntryKind::from_name(&self.kind).ok_or_else(|| format!("kind {:?} is not a ledger entry kind", self.kind))?,
            recorded_ms: self.recorded_ms,
            node: self.node.clone(),
            epoch: self.epoch,
            sequence: self.sequence,
            attempt_id: self.attempt_id.clone(),
            job_uid: self.job_uid.clone(),
            job_key: self.job.clone(),
            body: h("body", &self.body)?,
            signature: h("signature", &self.signature)?,
            public_key: h("public_key", &self.public_key)?,
            rates: self.rates,
            cost: Micros(self.cost_micros),
            usage: self.usage,
            prev_hash: h("prev_hash", &self.prev_hash)?,
            hash: h("hash", &self.hash)?,
        })
    }
}

/// Why an export does not verify.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot read the export: {0}")]
    Io(#[from] std::io::Error),
    #[error("export line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("ledger verification FAILED: {0}")]
    Bad(BadEntry),
}

/// Verifies an export (JSON lines from entry 1, as `ledger export` writes without filters)
/// from `input` alone. Blank lines are skipped.
pub fn verify_export(input: impl BufRead, opts: VerifyOptions) -> Result<VerifyReport, ExportError> {
    let mut v = ChainVerifier::new(opts);
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: ExportLine = serde_json::from_str(&line).map_err(|e| ExportError::Line { line: i + 1, reason: format!("not an export entry: {e}") })?;
        let e = parsed.to_entry().map_err(|reason| ExportError::Line { line: i + 1, reason })?;
        if v.push(&e).is_err() {
            break;
        }
    }
    v.finish().map_err(ExportError::Bad)
}
