//! Settlement through the writer: reversing a receipt, closing a period into one statement per
//! owner, marking a statement paid. The lines are made by `kommune_ledger::payout::Settlement`,
//! the same code every verifier runs, and appended in the writer's transaction like receipts.

use kommune_core::pricing::Micros;
use kommune_ledger::chain::{Batch, ChainState};
use kommune_ledger::entry::Entry;
use kommune_ledger::payout::{PayoutError, Settlement, Statement};
use kommune_proto::now_ms;
use tokio::sync::oneshot;

use super::backend::{Backend, EntryFilter};
use super::{Command, Ledger, LedgerError};
use ed25519_dalek::SigningKey;

/// Which receipt to reverse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiptKey {
    /// The receipt metering this attempt (an attempt is metered at most once).
    Attempt(String),
    /// The receipt at this ledger seq.
    Seq(u64),
}

/// A receipt's reversal: the line that takes it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reversal {
    /// The reversal line.
    pub seq: u64,
    pub receipt_seq: u64,
    pub node: String,
    /// What the receipt was worth, now not paid.
    pub credits: Micros,
    pub reason: String,
    /// False when the receipt was reversed before: this is that reversal (its reason), and
    /// nothing was appended.
    pub created: bool,
}

/// A statement appended by a close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedStatement {
    pub seq: u64,
    pub statement: Statement,
}

pub(super) enum PayoutCommand {
    Reverse { receipt: ReceiptKey, reason: String, recorded_ms: i64, reply: oneshot::Sender<Result<Reversal, LedgerError>> },
    Close { recorded_ms: i64, reply: oneshot::Sender<Result<Vec<ClosedStatement>, LedgerError>> },
    MarkPaid { statement_seq: u64, reference: String, recorded_ms: i64, reply: oneshot::Sender<Result<u64, LedgerError>> },
}

/// What the writer decided for a payout command, before the batch is durable.
pub(super) enum PayoutDecided {
    Reverse(Result<Reversal, LedgerError>),
    Close(Result<Vec<ClosedStatement>, LedgerError>),
    Paid(Result<u64, LedgerError>),
}

impl PayoutCommand {
    /// Answers with what was decided (the batch is durable) or with `e` (it is not).
    pub(super) fn answer(self, decided: Option<PayoutDecided>, e: &dyn Fn() -> LedgerError) {
        // A caller that stopped waiting does not matter: what was decided is durable either way.
        match (self, decided) {
            (PayoutCommand::Reverse { reply, .. }, Some(PayoutDecided::Reverse(r))) => drop(reply.send(r)),
            (PayoutCommand::Close { reply, .. }, Some(PayoutDecided::Close(r))) => drop(reply.send(r)),
            (PayoutCommand::MarkPaid { reply, .. }, Some(PayoutDecided::Paid(r))) => drop(reply.send(r)),
            (PayoutCommand::Reverse { reply, .. }, _) => drop(reply.send(Err(e()))),
            (PayoutCommand::Close { reply, .. }, _) => drop(reply.send(Err(e()))),
            (PayoutCommand::MarkPaid { reply, .. }, _) => drop(reply.send(Err(e()))),
        }
    }
}

/// Reads the whole chain into a settlement (the writer does this once, on its first payout
/// command, and then keeps it up to date with what it appends).
pub(super) fn load_settlement(b: &mut dyn Backend) -> Result<Settlement, LedgerError> {
    let mut s = Settlement::default();
    let mut bad: Option<String> = None;
    b.for_each_entry(&EntryFilter::default(), &mut |e| {
        let r = match e {
            Ok(e) => s.apply(&e).map_err(|m| format!("entry {}: {m}", e.seq)),
            Err(b) => Err(b.to_string()),
        };
        match r {
            Ok(()) => true,
            Err(m) => {
                bad = Some(m);
                false
            }
        }
    })?;
    match bad {
        Some(m) => Err(LedgerError::Corrupt(m)),
        None => Ok(s),
    }
}

/// Brings `s` up to the batch's last entry.
pub(super) fn catch_up(s: &mut Settlement, entries: &[Entry]) -> Result<(), LedgerError> {
    let from = s.applied();
    for e in entries.iter().filter(|e| e.seq > from) {
        s.apply(e).map_err(|m| LedgerError::Corrupt(format!("entry {}: {m}", e.seq)))?;
    }
    Ok(())
}

/// Appends one line and applies it.
fn append(state: &mut ChainState, s: &mut Settlement, batch: &mut Batch, line: Entry) -> Result<u64, LedgerError> {
    let seq = state.push(batch, line);
    catch_up(s, &batch.entries)?;
    Ok(seq)
}

/// Every settlement command leaves the head under the operator's signature, so an export
/// taken right after it verifies strictly (settlement lines are rare; a checkpoint is small).
fn cover_head(state: &mut ChainState, s: &mut Settlement, batch: &mut Batch, recorded_ms: i64, key: &SigningKey) -> Result<(), LedgerError> {
    if !state.head_is_checkpoint {
        state.checkpoint(batch, recorded_ms, key);
        catch_up(s, &batch.entries)?;
    }
    Ok(())
}

/// The decision for a command that could not be decided at all.
pub(super) fn decide_failed(cmd: &PayoutCommand, e: LedgerError) -> PayoutDecided {
    match cmd {
        PayoutCommand::Reverse { .. } => PayoutDecided::Reverse(Err(e)),
        PayoutCommand::Close { .. } => PayoutDecided::Close(Err(e)),
        PayoutCommand::MarkPaid { .. } => PayoutDecided::Paid(Err(e)),
    }
}

/// Decides a payout command against the chain and settlement (caught up with the batch so far).
pub(super) fn decide(
    state: &mut ChainState,
    s: &mut Settlement,
    batch: &mut Batch,
    cmd: &PayoutCommand,
    key: &SigningKey,
    lookup_attempt: &mut dyn FnMut(&str) -> Result<Option<u64>, LedgerError>,
) -> PayoutDecided {
    match cmd {
        PayoutCommand::Reverse { receipt, reason, recorded_ms, .. } => PayoutDecided::Reverse((|| {
            catch_up(s, &batch.entries)?;
            let receipt_seq = match receipt {
                ReceiptKey::Seq(seq) => *seq,
                ReceiptKey::Attempt(id) => match batch.entries.iter().find(|e| e.kind.is_receipt() && &e.attempt_id == id) {
                    Some(e) => e.seq,
                    None => lookup_attempt(id)?.ok_or_else(|| PayoutError::NoReceiptForAttempt(id.clone()))?,
                },
            };
            let (node, credits) = s.receipt(receipt_seq).map(|(n, c)| (n.to_string(), c)).ok_or(PayoutError::NotAReceipt(receipt_seq))?;
            if let Some((seq, reason)) = s.reversal_of(receipt_seq) {
                return Ok(Reversal { seq, receipt_seq, node, credits, reason: reason.to_string(), created: false });
            }
            let line = s.reversal_line(state.head_seq + 1, *recorded_ms, receipt_seq, reason, key)?;
            let seq = append(state, s, batch, line)?;
            cover_head(state, s, batch, *recorded_ms, key)?;
            Ok(Reversal { seq, receipt_seq, node, credits, reason: reason.clone(), created: true })
        })()),
        PayoutCommand::Close { recorded_ms, .. } => PayoutDecided::Close((|| {
            catch_up(s, &batch.entries)?;
            let upto = state.head_seq;
            let mut closed = vec![];
            for owner in s.open_owners() {
                let Some(line) = s.statement_line(state.head_seq + 1, *recorded_ms, &owner, upto, key) else { continue };
                let statement = Statement::parse(&line.body).map_err(LedgerError::Corrupt)?;
                let seq = append(state, s, batch, line)?;
                closed.push(ClosedStatement { seq, statement });
            }
            cover_head(state, s, batch, *recorded_ms, key)?;
            Ok(closed)
        })()),
        PayoutCommand::MarkPaid { statement_seq, reference, recorded_ms, .. } => PayoutDecided::Paid((|| {
            catch_up(s, &batch.entries)?;
            let line = s.paid_line(state.head_seq + 1, *recorded_ms, *statement_seq, reference, key)?;
            let seq = append(state, s, batch, line)?;
            cover_head(state, s, batch, *recorded_ms, key)?;
            Ok(seq)
        })()),
    }
}

impl Ledger {
    /// Reverses a receipt: appends a reversal line naming it and `reason`, so statements do not
    /// pay it. Idempotent: a receipt reversed before returns that reversal (`created: false`,
    /// its original reason). Refused with [`PayoutError::NoReceiptForAttempt`] or
    /// [`PayoutError::NotAReceipt`] when no such receipt is in the ledger.
    pub async fn reverse(&self, receipt: ReceiptKey, reason: &str) -> Result<Reversal, LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Payout(PayoutCommand::Reverse { receipt, reason: reason.to_string(), recorded_ms: now_ms(), reply })).await?;
        rx.await.map_err(|_| LedgerError::Closed)?
    }

    /// Closes the period now: one statement per owner with receipts or reversals since its
    /// last statement, covering everything up to the current head, then a checkpoint. Receipts
    /// appended after this land in the next period.
    pub async fn close_period(&self) -> Result<Vec<ClosedStatement>, LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Payout(PayoutCommand::Close { recorded_ms: now_ms(), reply })).await?;
        rx.await.map_err(|_| LedgerError::Closed)?
    }

    /// Records that statement `statement_seq` was paid, with the payment rail's reference.
    /// Returns the paid line's seq; a statement is marked paid once.
    pub async fn mark_paid(&self, statement_seq: u64, reference: &str) -> Result<u64, LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Payout(PayoutCommand::MarkPaid { statement_seq, reference: reference.to_string(), recorded_ms: now_ms(), reply })).await?;
        rx.await.map_err(|_| LedgerError::Closed)?
    }
}
