//! The operator's account of this node's earnings (its totals by state, the statements that
//! include it, its reversed receipts), assembled from EarningsPage messages and kept on disk.
//!
//! It is the operator's claim, shown by `kommune-agent earnings`; the proof stays the signed
//! statements `earnings --verify` checks. A page the agent cannot take (out of order, too big,
//! over a cap) drops the account being assembled, with a log line, and keeps the last good one.
//!
//! ```text
//! <state dir>/receipts/earnings.json   the last complete account (written atomically)
//! ```

use std::io::Write as _;
use std::path::{Path, PathBuf};

use kommune_proto::v1::EarningsPage;
use serde::{Deserialize, Serialize};

use crate::receipts::{ReceiptRecord, credits};

/// Most pages, items per page, statements and reversals an account may have. The operator
/// sends at most 1,000 statements and 5,000 reversals, 250 items a page; these leave room.
pub const MAX_PAGES: u32 = 64;
pub const MAX_PAGE_ITEMS: usize = 1_000;
pub const MAX_STATEMENTS: usize = 5_000;
pub const MAX_REVERSALS: usize = 20_000;
/// Longest reversal reason and payment reference, in bytes (the ledger's own limits).
pub const REASON_MAX: usize = kommune_ledger::payout::REASON_MAX;
pub const REFERENCE_MAX: usize = kommune_ledger::payout::REFERENCE_MAX;

/// A node's earnings by state, micro-credits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountTotals {
    pub pending_micros: i64,
    pub settled_micros: i64,
    pub paid_micros: i64,
    pub reversed_micros: i64,
}

/// A statement as it concerns this node: it settles the node's receipts in from_seq..=upto_seq.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountStatement {
    pub seq: u64,
    pub from_seq: u64,
    pub upto_seq: u64,
    pub period_end_ms: i64,
    pub receipts: u64,
    pub credits_micros: u64,
    pub reversed_receipts: u64,
    pub reversed_micros: u64,
    /// The paid line, 0 while unpaid, and the payment's reference.
    #[serde(default)]
    pub paid_seq: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub paid_reference: String,
}

/// A reversed receipt of this node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountReversal {
    pub seq: u64,
    pub receipt_seq: u64,
    pub credits_micros: u64,
    pub reason: String,
}

/// The last complete account the operator sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EarningsAccount {
    pub as_of_seq: u64,
    pub head_seq: u64,
    pub received_unix_millis: i64,
    pub totals: AccountTotals,
    pub statements: Vec<AccountStatement>,
    pub reversals: Vec<AccountReversal>,
    #[serde(default)]
    pub statements_omitted: u64,
    #[serde(default)]
    pub reversals_omitted: u64,
}

/// Why a page was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error("page {page} of {count}: an account has 1 to {MAX_PAGES} pages")]
    PageCount { page: u32, count: u32 },
    #[error("page {got} arrived while page {want} of the account as of ledger entry {as_of} was expected")]
    OutOfOrder { got: u32, want: u32, as_of: u64 },
    #[error("page {page} carries {items} items; at most {MAX_PAGE_ITEMS} a page")]
    PageTooBig { page: u32, items: usize },
    #[error("the account holds more than {MAX_STATEMENTS} statements or {MAX_REVERSALS} reversals")]
    TooMany,
    #[error("page {0} carries no totals")]
    NoTotals(u32),
    #[error("statement {seq} covers entries {from}..={upto}, which is not before it")]
    BadRange { seq: u64, from: u64, upto: u64 },
    #[error("a {what} is longer than {max} bytes")]
    TooLong { what: &'static str, max: usize },
}

/// Pages of the account being received.
#[derive(Debug, Default)]
pub struct Assembly {
    partial: Option<(u32, EarningsAccount, u32)>,
}

impl Assembly {
    /// Takes the next page; returns the account when it was the last one. An error drops what
    /// was assembled (the next page 0 starts again).
    pub fn push(&mut self, page: EarningsPage, now_ms: i64) -> Result<Option<EarningsAccount>, PageError> {
        let r = self.take(page, now_ms);
        if r.is_err() {
            self.partial = None;
        }
        r
    }

    fn take(&mut self, p: EarningsPage, now_ms: i64) -> Result<Option<EarningsAccount>, PageError> {
        if p.page_count == 0 || p.page_count > MAX_PAGES || p.page >= p.page_count {
            return Err(PageError::PageCount { page: p.page, count: p.page_count });
        }
        let items = p.statements.len() + p.reversals.len();
        if items > MAX_PAGE_ITEMS {
            return Err(PageError::PageTooBig { page: p.page, items });
        }
        let totals = p.totals.ok_or(PageError::NoTotals(p.page))?;
        if p.page == 0 {
            let account = EarningsAccount {
                as_of_seq: p.as_of_seq,
                head_seq: p.head_seq,
                received_unix_millis: now_ms,
                statements_omitted: p.statements_omitted,
                reversals_omitted: p.reversals_omitted,
                ..Default::default()
            };
            self.partial = Some((0, account, p.page_count));
        }
        let Some((next, account, count)) = self.partial.as_mut() else {
            return Err(PageError::OutOfOrder { got: p.page, want: 0, as_of: p.as_of_seq });
        };
        if p.page != *next || p.page_count != *count || p.as_of_seq != account.as_of_seq {
            return Err(PageError::OutOfOrder { got: p.page, want: *next, as_of: account.as_of_seq });
        }
        for s in p.statements {
            if s.from_seq > s.upto_seq || s.upto_seq >= s.seq {
                return Err(PageError::BadRange { seq: s.seq, from: s.from_seq, upto: s.upto_seq });
            }
            if s.paid_reference.len() > REFERENCE_MAX {
                return Err(PageError::TooLong { what: "payment reference", max: REFERENCE_MAX });
            }
            account.statements.push(AccountStatement {
                seq: s.seq,
                from_seq: s.from_seq,
                upto_seq: s.upto_seq,
                period_end_ms: s.period_end_ms,
                receipts: s.receipts,
                credits_micros: s.credits_micros,
                reversed_receipts: s.reversed_receipts,
                reversed_micros: s.reversed_micros,
                paid_seq: s.paid_seq,
                paid_reference: s.paid_reference,
            });
        }
        for r in p.reversals {
            if r.reason.len() > REASON_MAX {
                return Err(PageError::TooLong { what: "reversal reason", max: REASON_MAX });
            }
            account.reversals.push(AccountReversal { seq: r.seq, receipt_seq: r.receipt_seq, credits_micros: r.credits_micros, reason: r.reason });
        }
        if account.statements.len() > MAX_STATEMENTS || account.reversals.len() > MAX_REVERSALS {
            return Err(PageError::TooMany);
        }
        // The totals of the last page stand (every page carries the same).
        account.totals = AccountTotals {
            pending_micros: totals.pending_micros,
            settled_micros: totals.settled_micros,
            paid_micros: totals.paid_micros,
            reversed_micros: totals.reversed_micros,
        };
        *next += 1;
        if *next < *count {
            return Ok(None);
        }
        let (_, mut account, _) = self.partial.take().expect("assembling");
        account.statements.sort_by_key(|s| s.seq);
        account.reversals.sort_by_key(|r| r.seq);
        Ok(Some(account))
    }
}

fn path(receipts_dir: &Path) -> PathBuf {
    receipts_dir.join("earnings.json")
}

impl EarningsAccount {
    /// Writes the account atomically (temporary file, fsync, rename), so a crash leaves the
    /// previous one whole.
    pub fn save(&self, receipts_dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(receipts_dir)?;
        let tmp = receipts_dir.join(".earnings.json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(self).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path(receipts_dir))?;
        std::fs::File::open(receipts_dir)?.sync_all()
    }

    /// The saved account; None when the operator never sent one.
    pub fn load(receipts_dir: &Path) -> Result<Option<EarningsAccount>, String> {
        let p = path(receipts_dir);
        match std::fs::read(&p) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| format!("{} does not read: {e}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", p.display())),
        }
    }

    /// What the account says became of the receipt at ledger `seq`.
    pub fn payout_of(&self, seq: u64) -> Payout<'_> {
        if let Some(r) = self.reversals.iter().find(|r| r.receipt_seq == seq) {
            return Payout::Reversed(r);
        }
        match self.statements.iter().find(|s| (s.from_seq..=s.upto_seq).contains(&seq)) {
            Some(s) if s.paid_seq != 0 => Payout::Paid(s),
            Some(s) => Payout::Settled(s),
            // Older than the statements the account kept: it does not say.
            None if self.statements_omitted > 0 && self.statements.first().is_some_and(|s| seq < s.from_seq) => Payout::Unknown,
            None if seq > self.head_seq && self.head_seq != 0 => Payout::Newer,
            None => Payout::Pending,
        }
    }
}

/// One receipt's payout state, as the operator's account gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payout<'a> {
    /// In no statement yet.
    Pending,
    Settled(&'a AccountStatement),
    Paid(&'a AccountStatement),
    Reversed(&'a AccountReversal),
    /// Older than the statements the account lists.
    Unknown,
    /// Acknowledged after the account was made.
    Newer,
}

impl Payout<'_> {
    /// The table's PAYOUT cell.
    pub fn cell(&self) -> String {
        match self {
            Payout::Pending | Payout::Newer => "pending".into(),
            Payout::Settled(s) => format!("settled@{}", s.seq),
            Payout::Paid(s) => format!("paid@{}", s.seq),
            Payout::Reversed(_) => "REVERSED".into(),
            Payout::Unknown => "?".into(),
        }
    }
}

/// Text from the operator, safe to print: control characters (a terminal escape) shown as '?'.
pub fn printable(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// The account's part of `kommune-agent earnings`: the operator's totals by state, each
/// statement with how many of this machine's logged receipts it settles, and every reversed
/// receipt with its reason.
pub fn render(records: &[ReceiptRecord], account: Option<&EarningsAccount>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let Some(a) = account else {
        let _ = writeln!(out, "The operator has not sent an account of this node's earnings yet (it does when the agent connects).");
        return out;
    };
    let t = &a.totals;
    let _ = writeln!(
        out,
        "The operator's account (as of ledger entry {}, received {}): pending {}, settled {}, paid {}, reversed {} credits",
        a.head_seq.max(a.as_of_seq),
        when(a.received_unix_millis),
        signed(t.pending_micros),
        signed(t.settled_micros),
        signed(t.paid_micros),
        signed(t.reversed_micros)
    );
    let logged = |s: &AccountStatement| records.iter().filter(|r| r.status == "accepted" && (s.from_seq..=s.upto_seq).contains(&r.ledger_seq)).count();
    if a.statements_omitted > 0 {
        let _ = writeln!(out, "  ({} older statement(s) not in the account)", a.statements_omitted);
    }
    for s in &a.statements {
        let paid = if s.paid_seq == 0 {
            "settled, not paid yet".to_string()
        } else {
            format!("paid (entry {}, reference {})", s.paid_seq, printable(&s.paid_reference))
        };
        let _ = writeln!(
            out,
            "  statement {} (ledger entries {}-{}, closed {}): {} receipt(s), {} credits, {} reversed ({} credits); {paid}; {} of them in this machine's log",
            s.seq,
            s.from_seq,
            s.upto_seq,
            when(s.period_end_ms),
            s.receipts,
            credits(s.credits_micros),
            s.reversed_receipts,
            credits(s.reversed_micros),
            logged(s)
        );
    }
    if !a.reversals.is_empty() || a.reversals_omitted > 0 {
        let _ = writeln!(out, "Reversed receipts (recorded, not paid):");
    }
    if a.reversals_omitted > 0 {
        let _ = writeln!(out, "  ({} older reversal(s) not in the account)", a.reversals_omitted);
    }
    for r in &a.reversals {
        let attempt =
            records.iter().find(|x| x.status == "accepted" && x.ledger_seq == r.receipt_seq).map_or("not in this machine's log", |x| x.attempt_id.as_str());
        let _ = writeln!(
            out,
            "  ledger entry {} (attempt {}, {} credits), reversed by entry {}: {}",
            r.receipt_seq,
            printable(attempt),
            credits(r.credits_micros),
            r.seq,
            printable(&r.reason)
        );
    }
    let _ = writeln!(out, "This is the operator's claim; `kommune-agent earnings --verify STATEMENT_FILE` checks it against signed statements.");
    out
}

/// Signed micro-credits as credits.
fn signed(micros: i64) -> String {
    if micros < 0 { format!("-{}", credits(micros.unsigned_abs())) } else { credits(micros as u64) }
}

/// A Unix-ms time in UTC, to the second.
fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(|| format!("{ms} ms"), |t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
}

#[cfg(test)]
#[path = "account_tests.rs"]
mod tests;
