//! Usage receipts on the agent: every finished attempt gets a receipt signed with the node key,
//! carrying (node, epoch, sequence). The receipt rides in the terminal TaskUpdate, which is
//! spooled to disk (fsync) before it is sent and resent until the operator acknowledges it, so
//! a crash, a restart or a dropped connection loses no receipt.
//!
//! The epoch is raised, and made durable, every time the agent starts; sequences count from 1
//! within an epoch and live in memory only. So a crash can never make the agent reuse a
//! (node, epoch, sequence) that the operator already has, without an fsync per receipt.
//!
//! ```text
//! <state dir>/receipts/epoch              the current epoch
//! <state dir>/receipts/acknowledged.jsonl receipts the operator acknowledged (for `earnings`)
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};

use ed25519_dalek::SigningKey;
use kommune_proto::v1::{self, ReceiptBody, TaskUpdate, Usage, UsageReceipt};
use serde::{Deserialize, Serialize};

use crate::account::EarningsAccount;

/// Signs receipts for one node.
pub struct Receipts {
    node: String,
    key: SigningKey,
    epoch: u64,
    last: Mutex<u64>,
    /// To the thread that appends acknowledged receipts to their log (see [`AckLog`]).
    acks: Mutex<Sender<AckLine>>,
}

/// Runs once an acknowledged receipt's line is on disk, or could not be written.
pub type Then = Box<dyn FnOnce(std::io::Result<()>) + Send>;

/// One line for the acknowledged log, and what to do once it is durable.
struct AckLine {
    line: String,
    then: Then,
}

/// The thread that appends acknowledged receipts: everything queued is written, then made
/// durable by one fdatasync (group commit), then each line's `then` runs. An ack per task with
/// its own open and fdatasync, on the session's thread, cost every task a disk flush on the
/// path of the next result.
struct AckLog {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl AckLog {
    fn run(mut self, rx: Receiver<AckLine>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let text: String = batch.iter().map(|a| a.line.as_str()).collect();
            let result = self.append(text.as_bytes());
            if result.is_err() {
                // Opened again next time: the file may have been replaced or its disk fixed.
                self.file = None;
            }
            for a in batch {
                (a.then)(result.as_ref().map(|_| ()).map_err(|e| std::io::Error::new(e.kind(), e.to_string())));
            }
        }
    }

    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?),
        };
        file.write_all(bytes)?;
        file.sync_data()
    }
}

impl std::fmt::Debug for Receipts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receipts").field("node", &self.node).field("epoch", &self.epoch).finish_non_exhaustive()
    }
}

/// One receipt as the provider sees it in `kommune-agent earnings`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReceiptRecord {
    pub epoch: u64,
    pub sequence: u64,
    pub attempt_id: String,
    pub job: String,
    pub state: String,
    pub wall_millis: u64,
    pub cpu_micros: u64,
    pub memory_peak_bytes: u64,
    pub wasm_fuel: u64,
    pub finished_unix_millis: i64,
    /// "pending" (not acknowledged yet), "accepted" or "rejected".
    pub status: String,
    /// Why the operator rejected it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// What the operator priced it at, in micro-credits.
    #[serde(default)]
    pub cost_micros: u64,
    /// The accepted receipt's ledger entry, from the Ack (0 and empty from operators older than
    /// statements): what `earnings --verify` looks for in a statement.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ledger_seq: u64,
    /// Hex hash of that entry.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub entry_hash: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ReceiptRecord {
    fn from_body(body: &ReceiptBody, status: &str, reason: &str, cost_micros: u64) -> Self {
        let usage = body.usage.clone().unwrap_or_default();
        ReceiptRecord {
            epoch: body.epoch,
            sequence: body.sequence,
            attempt_id: body.attempt_id.clone(),
            job: body.job.clone(),
            state: v1::AttemptState::try_from(body.state).map(|s| s.as_str_name().trim_start_matches("ATTEMPT_STATE_").to_lowercase()).unwrap_or_default(),
            wall_millis: usage.wall_millis,
            cpu_micros: usage.cpu_micros,
            memory_peak_bytes: usage.memory_peak_bytes,
            wasm_fuel: usage.wasm_fuel,
            finished_unix_millis: body.finished_unix_millis,
            status: status.into(),
            reason: reason.into(),
            cost_micros,
            ledger_seq: 0,
            entry_hash: String::new(),
        }
    }
}

fn epoch_path(dir: &Path) -> PathBuf {
    dir.join("epoch")
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("acknowledged.jsonl")
}

impl Receipts {
    /// Opens the receipt directory and starts a new epoch: one above the last one used, or the
    /// current Unix time in milliseconds if that is larger (so a recreated directory does not
    /// fall back to small epochs). The epoch is written and fsynced before any receipt.
    pub fn start(dir: PathBuf, node: &str, key: SigningKey) -> std::io::Result<Receipts> {
        std::fs::create_dir_all(&dir)?;
        let previous = std::fs::read_to_string(epoch_path(&dir)).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
        let now = u64::try_from(kommune_proto::now_ms()).unwrap_or(0);
        let epoch = previous.saturating_add(1).max(now);
        let tmp = dir.join(".epoch.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{epoch}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, epoch_path(&dir))?;
        std::fs::File::open(&dir)?.sync_all()?;
        compact(&dir, i64::try_from(now).unwrap_or(i64::MAX).saturating_sub(KEEP_ACKS_MS))?;
        // After the compaction, which rewrites the log: the thread appends to what it left.
        let (tx, rx) = channel();
        let log = AckLog { path: log_path(&dir), file: None };
        std::thread::Builder::new().name("receipt-acks".into()).spawn(move || log.run(rx))?;
        Ok(Receipts { node: node.to_string(), key, epoch, last: Mutex::new(0), acks: Mutex::new(tx) })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Signs the next receipt.
    pub fn issue(
        &self,
        attempt_id: &str,
        job: &str,
        state: v1::AttemptState,
        usage: Usage,
        started_unix_millis: i64,
        finished_unix_millis: i64,
    ) -> UsageReceipt {
        let sequence = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            *last += 1;
            *last
        };
        let body = ReceiptBody {
            node: self.node.clone(),
            epoch: self.epoch,
            sequence,
            attempt_id: attempt_id.to_string(),
            job: job.to_string(),
            state: state as i32,
            usage: Some(usage),
            started_unix_millis,
            finished_unix_millis,
        };
        kommune_proto::receipt::sign(&body, &self.key)
    }

    /// Records the operator's acknowledgement of `update`'s receipt (for `earnings`) and waits
    /// until it is on disk. See [`Receipts::acknowledged_then`].
    pub fn acknowledged(&self, update: &TaskUpdate, ack: &v1::Ack) -> std::io::Result<()> {
        let (tx, rx) = channel();
        self.acknowledged_then(update, ack, Box::new(move |r| drop(tx.send(r))));
        rx.recv().unwrap_or_else(|_| Err(std::io::Error::other("the receipt log's writer has stopped")))
    }

    /// Records the operator's acknowledgement of `update`'s receipt (for `earnings`), then runs
    /// `then` with the outcome once the line is on disk, on the log's own thread: the line is
    /// the provider's proof of inclusion, so the caller drops the spooled update only then.
    /// Acknowledgements that arrive together share one fdatasync. A repeat (after a crash, or
    /// an Ack that came twice) is deduplicated on read. An update without a receipt writes
    /// nothing and runs `then` at once.
    pub fn acknowledged_then(&self, update: &TaskUpdate, ack: &v1::Ack, then: Then) {
        let Some(body) = update.receipt.as_ref().and_then(|r| kommune_proto::receipt::decode(r).ok()) else { return then(Ok(())) };
        let (status, reason) = if ack.receipt_rejected.is_empty() { ("accepted", "") } else { ("rejected", ack.receipt_rejected.as_str()) };
        let mut record = ReceiptRecord::from_body(&body, status, reason, ack.cost_micros);
        if ack.receipt_rejected.is_empty() {
            (record.ledger_seq, record.entry_hash) = (ack.ledger_seq, hex::encode(&ack.entry_hash));
        }
        let mut line = match serde_json::to_string(&record) {
            Ok(l) => l,
            Err(e) => return then(Err(std::io::Error::other(e))),
        };
        line.push('\n');
        let sent = self.acks.lock().unwrap_or_else(|p| p.into_inner()).send(AckLine { line, then });
        if let Err(std::sync::mpsc::SendError(a)) = sent {
            (a.then)(Err(std::io::Error::other("the receipt log's writer has stopped")));
        }
    }
}

/// How long acknowledged receipts are kept: long enough to check every statement of a daily or
/// monthly settlement; older ones are dropped when the agent starts, so the log stays bounded.
pub const KEEP_ACKS_MS: i64 = 180 * 24 * 3_600_000;

/// Rewrites the acknowledged log without repeats and without receipts finished before
/// `keep_since_ms`. Written to a temporary file and renamed, so a crash keeps the old log.
pub fn compact(dir: &Path, keep_since_ms: i64) -> std::io::Result<()> {
    let path = log_path(dir);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
    let mut records: Vec<ReceiptRecord> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let before = text.lines().count();
    records.retain(|r| r.finished_unix_millis >= keep_since_ms);
    records.sort_by_key(|r| (r.epoch, r.sequence));
    records.dedup_by_key(|r| (r.epoch, r.sequence));
    if records.len() == before {
        return Ok(());
    }
    let tmp = dir.join(".acknowledged.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    for r in &records {
        writeln!(f, "{}", serde_json::to_string(r).map_err(std::io::Error::other)?)?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Every receipt this node issued that is still on disk: acknowledged ones from the log and
/// pending ones from the result spool, oldest first, each (epoch, sequence) once.
pub fn history(receipts_dir: &Path, spooled: &[TaskUpdate]) -> Vec<ReceiptRecord> {
    let mut out: Vec<ReceiptRecord> =
        std::fs::read_to_string(log_path(receipts_dir)).unwrap_or_default().lines().filter_map(|l| serde_json::from_str::<ReceiptRecord>(l).ok()).collect();
    for u in spooled {
        if let Some(body) = u.receipt.as_ref().and_then(|r| kommune_proto::receipt::decode(r).ok()) {
            out.push(ReceiptRecord::from_body(&body, "pending", "", 0));
        }
    }
    out.sort_by_key(|r| (r.epoch, r.sequence));
    out.dedup_by_key(|r| (r.epoch, r.sequence));
    out
}

/// Totals for `earnings`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub accepted: usize,
    pub rejected: usize,
    pub pending: usize,
    pub cost_micros: u64,
    pub cpu_micros: u64,
}

pub fn totals(records: &[ReceiptRecord]) -> Totals {
    let mut t = Totals::default();
    for r in records {
        match r.status.as_str() {
            "accepted" => {
                t.accepted += 1;
                t.cost_micros = t.cost_micros.saturating_add(r.cost_micros);
            }
            "rejected" => t.rejected += 1,
            _ => t.pending += 1,
        }
        t.cpu_micros = t.cpu_micros.saturating_add(r.cpu_micros);
    }
    t
}

/// Credits from micro-credits, trailing zeros dropped ("0.05").
pub fn credits(micros: u64) -> String {
    let (whole, frac) = (micros / 1_000_000, micros % 1_000_000);
    if frac == 0 { whole.to_string() } else { format!("{whole}.{}", format!("{frac:06}").trim_end_matches('0')) }
}

/// The `kommune-agent earnings` table; with the operator's account, each accepted receipt's
/// payout state (pending, settled@STATEMENT, paid@STATEMENT, REVERSED) and the account after it.
pub fn render(node: &str, records: &[ReceiptRecord], account: Option<&EarningsAccount>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let t = totals(records);
    let _ = writeln!(
        out,
        "{node}: {} receipt(s): {} accepted ({} credits), {} pending acknowledgement, {} rejected",
        records.len(),
        t.accepted,
        credits(t.cost_micros),
        t.pending,
        t.rejected
    );
    if records.is_empty() && account.is_none() {
        return out;
    }
    if !records.is_empty() {
        let _ = writeln!(
            out,
            "{:<15} {:>6}  {:<10} {:>9} {:>9}  {:<10} {:>10} {:>8}  {:<12} ATTEMPT",
            "EPOCH", "SEQ", "STATE", "WALL", "CPU", "STATUS", "CREDITS", "LEDGER", "PAYOUT"
        );
    }
    for r in records {
        let payout = match account {
            Some(a) if r.status == "accepted" && r.ledger_seq != 0 => a.payout_of(r.ledger_seq).cell(),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<15} {:>6}  {:<10} {:>8.1}s {:>8.2}s  {:<10} {:>10} {:>8}  {:<12} {}{}",
            r.epoch,
            r.sequence,
            r.state,
            r.wall_millis as f64 / 1000.0,
            r.cpu_micros as f64 / 1e6,
            r.status,
            if r.status == "accepted" { credits(r.cost_micros) } else { "-".into() },
            if r.ledger_seq == 0 { "-".into() } else { r.ledger_seq.to_string() },
            payout,
            r.attempt_id,
            if r.reason.is_empty() { String::new() } else { format!(" ({})", r.reason) },
        );
    }
    out.push_str(&crate::account::render(records, account));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn update(r: &Receipts, id: &str) -> TaskUpdate {
        let usage = Usage { wall_millis: 1500, cpu_micros: 1_200_000, source: "proc".into(), ..Default::default() };
        TaskUpdate {
            attempt_id: id.into(),
            state: v1::AttemptState::Succeeded as i32,
            result: None,
            receipt: Some(r.issue(id, "ns/j", v1::AttemptState::Succeeded, usage, 10, 1510)),
            trace: None,
        }
    }

    #[test]
    fn every_start_raises_the_epoch_and_sequences_count_from_one() {
        let dir = tempfile::tempdir().unwrap();
        let a = Receipts::start(dir.path().into(), "pn-1", key()).unwrap();
        let r1 =
            kommune_proto::receipt::verify(&a.issue("x", "ns/j", v1::AttemptState::Failed, Usage::default(), 0, 0), key().verifying_key().as_bytes()).unwrap();
        let r2 = kommune_proto::receipt::decode(&a.issue("y", "ns/j", v1::AttemptState::Failed, Usage::default(), 0, 0)).unwrap();
        assert_eq!((r1.node.as_str(), r1.epoch, r1.sequence), ("pn-1", a.epoch(), 1));
        assert_eq!((r2.epoch, r2.sequence), (a.epoch(), 2));
        let b = Receipts::start(dir.path().into(), "pn-1", key()).unwrap();
        assert!(b.epoch() > a.epoch());
        // A future epoch on disk (clock went backwards) is still exceeded.
        std::fs::write(dir.path().join("epoch"), format!("{}\n", u64::MAX - 5)).unwrap();
        let c = Receipts::start(dir.path().into(), "pn-1", key()).unwrap();
        assert_eq!(c.epoch(), u64::MAX - 4);
    }

    #[test]
    fn history_merges_acknowledged_and_pending_receipts_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let r = Receipts::start(dir.path().into(), "pn-1", key()).unwrap();
        let (a, b, c) = (update(&r, "a"), update(&r, "b"), update(&r, "c"));
        r.acknowledged(&a, &v1::Ack { attempt_id: "a".into(), cost_micros: 50_000, ledger_seq: 9, entry_hash: vec![0xab; 32], ..Default::default() }).unwrap();
        // The same acknowledgement twice (a crash before the spool file was removed).
        r.acknowledged(&a, &v1::Ack { attempt_id: "a".into(), cost_micros: 50_000, ledger_seq: 9, entry_hash: vec![0xab; 32], ..Default::default() }).unwrap();
        r.acknowledged(
            &b,
            &v1::Ack {
                attempt_id: "b".into(),
                receipt_rejected: "cpu time exceeds what was assigned".into(),
                cost_micros: 0,
                ledger_seq: 7,
                ..Default::default()
            },
        )
        .unwrap();
        let h = history(
            dir.path(),
            &[c, update(&r, "no-receipt-decodes")].map(|mut u| {
                if u.attempt_id == "no-receipt-decodes" {
                    u.receipt = Some(UsageReceipt { body: vec![0xff; 3], signature: vec![] });
                }
                u
            }),
        );
        assert_eq!(h.iter().map(|r| (r.attempt_id.as_str(), r.status.as_str())).collect::<Vec<_>>(), [("a", "accepted"), ("b", "rejected"), ("c", "pending")]);
        // The accepted receipt keeps its ledger entry; a rejected one has none, whatever the Ack says.
        assert_eq!((h[0].ledger_seq, h[0].entry_hash.as_str(), h[1].ledger_seq), (9, "ab".repeat(32).as_str(), 0));
        assert_eq!(totals(&h), Totals { accepted: 1, rejected: 1, pending: 1, cost_micros: 50_000, cpu_micros: 3_600_000 });
        let table = render("pn-1", &h, None);
        assert!(table.starts_with("pn-1: 3 receipt(s): 1 accepted (0.05 credits), 1 pending acknowledgement, 1 rejected\n"), "{table}");
        assert!(table.contains("rejected") && table.contains("(cpu time exceeds what was assigned)"), "{table}");
        assert_eq!(render("pn-1", &[], None), "pn-1: 0 receipt(s): 0 accepted (0 credits), 0 pending acknowledgement, 0 rejected\n");
    }

    /// Acknowledgements from many threads at once: each line is on disk before its callback
    /// runs, each callback runs once, and every line is there (however they were batched).
    #[test]
    fn each_acknowledgement_is_on_disk_before_its_callback_runs_once() {
        let dir = tempfile::tempdir().unwrap();
        let r = std::sync::Arc::new(Receipts::start(dir.path().into(), "pn-1", key()).unwrap());
        let (tx, rx) = channel::<(String, bool)>();
        std::thread::scope(|s| {
            for t in 0..4 {
                let (r, tx, path) = (r.clone(), tx.clone(), log_path(dir.path()));
                s.spawn(move || {
                    for i in 0..50 {
                        let id = format!("t{t}-{i}");
                        let u = update(&r, &id);
                        let (tx, path, seen) = (tx.clone(), path.clone(), id.clone());
                        let ack = v1::Ack { attempt_id: id, ..Default::default() };
                        r.acknowledged_then(
                            &u,
                            &ack,
                            Box::new(move |written| {
                                let on_disk = std::fs::read_to_string(&path).unwrap_or_default().contains(&format!("\"attemptId\":\"{seen}\""));
                                tx.send((seen, written.is_ok() && on_disk)).unwrap();
                            }),
                        );
                    }
                });
            }
        });
        drop(tx);
        let mut done: Vec<(String, bool)> = rx.iter().collect();
        done.sort();
        assert_eq!(done.len(), 200, "every callback ran once");
        assert!(done.iter().all(|(_, ok)| *ok), "a callback ran before its line was on disk: {:?}", done.iter().find(|d| !d.1));
        let h = history(dir.path(), &[]);
        assert_eq!(h.len(), 200);
    }

    /// A log that cannot be written reports it to the callback (the caller warns and goes on);
    /// the writer keeps serving later acknowledgements once the disk is back.
    #[test]
    fn a_failed_write_reaches_the_callback_and_the_writer_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let r = Receipts::start(dir.path().into(), "pn-1", key()).unwrap();
        // A directory where the log file should be: opening it for append fails.
        std::fs::create_dir(log_path(dir.path())).unwrap();
        let u = update(&r, "a");
        let err = r.acknowledged(&u, &v1::Ack { attempt_id: "a".into(), ..Default::default() }).unwrap_err();
        assert!(!err.to_string().is_empty());
        std::fs::remove_dir(log_path(dir.path())).unwrap();
        r.acknowledged(&u, &v1::Ack { attempt_id: "a".into(), ..Default::default() }).unwrap();
        assert_eq!(history(dir.path(), &[]).len(), 1);
        // Without a receipt nothing is written, and the callback runs at once.
        let bare = TaskUpdate { attempt_id: "b".into(), ..Default::default() };
        r.acknowledged(&bare, &v1::Ack { attempt_id: "b".into(), ..Default::default() }).unwrap();
        assert_eq!(history(dir.path(), &[]).len(), 1);
    }

    #[test]
    fn the_key_join_creates_signs_receipts_its_certificate_key_verifies() {
        let node_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let signing = kommune_proto::receipt::signing_key_from_pem(&node_key.serialize_pem()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let r = Receipts::start(dir.path().into(), "pn-1", signing).unwrap();
        let receipt = r.issue("a", "ns/j", v1::AttemptState::Succeeded, Usage::default(), 0, 1);
        assert!(kommune_proto::receipt::verify(&receipt, node_key.public_key_raw()).is_ok());
    }

    #[test]
    fn credits_print_without_trailing_zeros() {
        assert_eq!(credits(0), "0");
        assert_eq!(credits(1_500_000), "1.5");
        assert_eq!(credits(1), "0.000001");
    }
}
