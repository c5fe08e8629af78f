//! `kommune-operator payout close|mark-paid|reverse|export`: settling the ledger by hand and
//! handing statements to a payment rail (JSON with every receipt, or CSV one line each).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use kommune_core::fence::Fence;

use super::backend::{Backend, EntryFilter};
use super::cli::{CliError, Location, csv_field, open, time};
use super::entry::EntryKind;
use super::hold::{self, Hold};
use super::payout::PaidBody;
use super::statement_file::StatementFiles;
pub use super::statement_file::{ExportedStatement, PaidMark};
use super::{Ledger, LedgerConfig, ReceiptKey};

/// `kommune-operator payout ...`
#[derive(Debug, Subcommand)]
pub enum PayoutCommand {
    /// Closes the period now: one signed statement per owner with receipts or reversals since
    /// its last statement, then a checkpoint. Receipts arriving later land in the next period.
    Close(WriteArgs),
    /// Records that a statement was paid, with the payment's reference.
    MarkPaid {
        /// The statement's ledger seq (as `payout close` and `payout export` print it).
        statement: u64,
        /// The payment rail's reference (transfer id, transaction hash, invoice number).
        #[arg(long)]
        reference: String,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Takes a receipt back (not paid), by attempt id or --seq, with a reason. Idempotent.
    Reverse {
        /// The attempt whose receipt to reverse.
        #[arg(required_unless_present = "seq")]
        attempt: Option<String>,
        /// The receipt's ledger seq instead.
        #[arg(long, conflicts_with = "attempt")]
        seq: Option<u64>,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Writes statements: JSON (each with its receipts: what a provider's `kommune-agent
    /// earnings --verify` reads) or CSV (one line per statement).
    Export(ExportArgs),
}

/// Where the ledger and its key are, for commands that append.
#[derive(Debug, Args)]
pub struct WriteArgs {
    #[command(flatten)]
    pub location: Location,
    /// The operator's ledger key (as the operator runs with --ledger-key-file).
    #[arg(long, env = "KOMMUNE_LEDGER_KEY_FILE")]
    pub ledger_key_file: Option<PathBuf>,
}

/// Output format of `payout export`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum StatementFormat {
    Json,
    Csv,
}

/// `payout export` arguments.
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub location: Location,
    #[arg(long, value_enum, default_value = "json")]
    pub format: StatementFormat,
    /// Only this owner's statements.
    #[arg(long)]
    pub owner: Option<String>,
    /// Only the statement at this seq.
    #[arg(long)]
    pub statement: Option<u64>,
    /// Write here instead of standard output.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// Every statement of the chain, with its paid mark.
pub fn statements(b: &mut dyn Backend) -> Result<Vec<ExportedStatement>, CliError> {
    let mut files = StatementFiles::default();
    let mut out = vec![];
    let mut paid: HashMap<u64, PaidMark> = HashMap::new();
    let mut unreadable = None;
    b.for_each_entry(&EntryFilter::default(), &mut |e| match e {
        Ok(e) => {
            if e.kind == EntryKind::Paid
                && let Ok(p) = serde_json::from_slice::<PaidBody>(&e.body)
            {
                paid.insert(p.statement_seq, PaidMark { seq: e.seq, reference: p.reference });
            }
            if let Some(f) = files.push(&e) {
                out.push(ExportedStatement { file: f, paid: None });
            }
            true
        }
        Err(bad) => {
            unreadable = Some(bad);
            false
        }
    })?;
    if let Some(bad) = unreadable {
        return Err(CliError::Unreadable(bad));
    }
    for s in &mut out {
        s.paid = paid.remove(&s.file.entry.seq);
    }
    Ok(out)
}

/// A ledger a payout command may append to: held exclusively (refused while an operator runs
/// on it), the hold living as long as the ledger.
struct Held {
    ledger: Ledger,
    _hold: Hold,
}

impl std::ops::Deref for Held {
    type Target = Ledger;
    fn deref(&self) -> &Ledger {
        &self.ledger
    }
}

fn open_ledger(w: &WriteArgs) -> Result<Held, CliError> {
    // Refuse to create a ledger (and a key) in a directory that holds none.
    drop(open(&w.location)?);
    let hold = hold::hold(&w.location.data_dir, w.location.database_url.as_deref(), hold::Mode::Exclusive)?;
    let config = LedgerConfig {
        data_dir: w.location.data_dir.clone(),
        database_url: w.location.database_url.clone(),
        fence: Fence::open(),
        key_file: w.ledger_key_file.clone(),
    };
    Ok(Held { ledger: Ledger::open(config)?, _hold: hold })
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> Result<T, CliError> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(CliError::Runtime)?.block_on(f))
}

/// Runs a payout command, writing its result to `out`.
pub fn run(cmd: PayoutCommand, out: &mut dyn Write) -> Result<(), CliError> {
    match cmd {
        PayoutCommand::Close(w) => {
            let ledger = open_ledger(&w)?;
            let closed = block_on(ledger.close_period())??;
            if closed.is_empty() {
                writeln!(out, "nothing to settle: no owner has receipts or reversals since its last statement")?;
            }
            for c in closed {
                let s = &c.statement;
                writeln!(
                    out,
                    "statement {}: owner {} entries {}..={}: {} receipts, {} credits, {} reversed, {} payable{}",
                    c.seq,
                    s.owner,
                    s.from_seq,
                    s.upto_seq,
                    s.receipts,
                    kommune_core::pricing::Micros(s.credits_micros),
                    kommune_core::pricing::Micros(s.reversed_micros),
                    kommune_core::pricing::Micros(s.payable_micros),
                    if s.owed_micros > 0 { format!(", {} owed back", kommune_core::pricing::Micros(s.owed_micros)) } else { String::new() }
                )?;
            }
            Ok(())
        }
        PayoutCommand::MarkPaid { statement, reference, write } => {
            let ledger = open_ledger(&write)?;
            let seq = block_on(ledger.mark_paid(statement, &reference))??;
            writeln!(out, "statement {statement} marked paid (reference {reference}) by entry {seq}")?;
            Ok(())
        }
        PayoutCommand::Reverse { attempt, seq, reason, write } => {
            let ledger = open_ledger(&write)?;
            let key = match (attempt, seq) {
                (_, Some(seq)) => ReceiptKey::Seq(seq),
                (Some(a), None) => ReceiptKey::Attempt(a),
                (None, None) => unreachable!("clap requires one"),
            };
            let r = block_on(ledger.reverse(key, &reason))??;
            let what = if r.created { "reversed" } else { "was already reversed" };
            writeln!(out, "receipt {} ({}, {} credits) {what} by entry {}: {}", r.receipt_seq, r.node, r.credits, r.seq, r.reason)?;
            Ok(())
        }
        PayoutCommand::Export(a) => {
            let mut b = open(&a.location)?;
            let all: Vec<ExportedStatement> = statements(b.as_mut())?
                .into_iter()
                .filter(|s| a.owner.as_ref().is_none_or(|o| &s.file.statement.owner == o) && a.statement.is_none_or(|q| s.file.entry.seq == q))
                .collect();
            let mut w: Box<dyn Write> = match &a.output {
                Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p)?)),
                None => Box::new(std::io::BufWriter::new(&mut *out)),
            };
            match a.format {
                StatementFormat::Json => {
                    serde_json::to_writer_pretty(&mut w, &all).map_err(std::io::Error::from)?;
                    writeln!(w)?;
                }
                StatementFormat::Csv => write_csv(&all, &mut w)?,
            }
            w.flush()?;
            Ok(())
        }
    }
}

fn write_csv(all: &[ExportedStatement], w: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        w,
        "statement_seq,owner,period_start,period_end,from_seq,upto_seq,head_hash,receipts,credits_micros,reversed_micros,payable_micros,owed_micros,nodes,paid_seq,paid_reference"
    )?;
    for s in all {
        let st = &s.file.statement;
        let nodes: Vec<&str> = st.nodes.keys().map(String::as_str).collect();
        writeln!(
            w,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            s.file.entry.seq,
            csv_field(&st.owner),
            time(st.period_start_ms),
            time(st.period_end_ms),
            st.from_seq,
            st.upto_seq,
            st.head_hash,
            st.receipts,
            st.credits_micros,
            st.reversed_micros,
            st.payable_micros,
            st.owed_micros,
            csv_field(&nodes.join(" ")),
            s.paid.as_ref().map_or(String::new(), |p| p.seq.to_string()),
            csv_field(s.paid.as_ref().map_or("", |p| p.reference.as_str())),
        )?;
    }
    Ok(())
}
