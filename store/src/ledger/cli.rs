//! `kommune-operator ledger export|verify`: what a payment system and an auditor run against the
//! operator's ledger (the SQLite file in the data directory, or PostgreSQL).

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};

use super::backend::{Backend, EntryFilter};
use super::entry::{Entry, EntryKind, fingerprint};
use super::verify::{BadEntry, VerifyOptions};
use super::{LedgerError, open_backend, verify_stored};

/// `kommune-operator ledger ...`
#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Writes ledger entries as JSON lines or CSV, for a payment system.
    Export(ExportArgs),
    /// Recomputes the whole chain, every signature and every total; names the first bad entry.
    Verify(VerifyArgs),
    /// Changes the operator's ledger key: appends a rotation signed by the old key and a
    /// checkpoint signed by the new one. Refused while an operator runs on the ledger.
    RotateKey(RotateArgs),
}

/// `ledger rotate-key` arguments.
#[derive(Debug, Args)]
pub struct RotateArgs {
    #[command(flatten)]
    pub location: Location,
    /// The key in force (as the operator runs with --ledger-key-file).
    #[arg(long, env = "KOMMUNE_LEDGER_KEY_FILE")]
    pub ledger_key_file: PathBuf,
    /// The new key (PKCS#8 PEM; created with mode 0600 if absent). Run the operator with it
    /// afterwards (the chart: replace the Secret's key).
    #[arg(long)]
    pub new_key_file: PathBuf,
}

/// Where the ledger is.
#[derive(Debug, Args)]
pub struct Location {
    /// The operator's data directory (holds ledger.db).
    #[arg(long, env = "KOMMUNE_DATA_DIR", default_value = "/var/lib/kommune")]
    pub data_dir: PathBuf,
    /// Read the ledger from PostgreSQL instead (postgres://...).
    #[arg(long, env = "KOMMUNE_DATABASE_URL")]
    pub database_url: Option<String>,
}

/// Output format of `ledger export`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

/// `ledger export` arguments.
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub location: Location,
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: Format,
    /// Only entries recorded at or after this time (RFC 3339, e.g. 2025-01-01T00:00:00Z).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<i64>,
    /// Only entries recorded before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<i64>,
    /// Only this provider node's receipts and key registrations.
    #[arg(long)]
    pub provider: Option<String>,
    /// Write here instead of standard output.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// `ledger verify` arguments.
#[derive(Debug, Args, Default)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub location: Location,
    /// Require the ledger to be signed by the operator key with this sha256 (hex, as the
    /// operator prints at start and ProviderNode status shows), or by keys a signed rotation
    /// from it leads to.
    #[arg(long, visible_alias = "operator-key")]
    pub operator_key_sha256: Option<String>,
    /// Verify an export file (`ledger export` without filters) instead of the database: no
    /// database, no data directory, no trust in whoever sent the file.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Accept entries after the last checkpoint, which no operator signature covers.
    #[arg(long)]
    pub accept_unsigned_tail: bool,
}

impl Default for Location {
    fn default() -> Self {
        Location { data_dir: PathBuf::from("/var/lib/kommune"), database_url: None }
    }
}

/// Why a ledger command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("no ledger at {0} (is --data-dir the operator's data directory, or should --database-url be set?)")]
    NoLedger(String),
    #[error("cannot write the export: {0}")]
    Io(#[from] std::io::Error),
    #[error("ledger verification FAILED: {0}")]
    Bad(BadEntry),
    #[error("a stored entry does not read: {0}; run `kommune-operator ledger verify`")]
    Unreadable(BadEntry),
    #[error("{0}")]
    Export(#[from] crate::ledger::export::ExportError),
    #[error(transparent)]
    Held(#[from] super::hold::HoldError),
    #[error("cannot start the ledger command's runtime: {0}")]
    Runtime(std::io::Error),
}

fn parse_time(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s).map(|t| t.timestamp_millis()).map_err(|e| format!("{s:?} is not an RFC 3339 time like 2025-01-31T00:00:00Z: {e}"))
}

pub(super) fn open(loc: &Location) -> Result<Box<dyn Backend>, CliError> {
    if loc.database_url.is_none() && !loc.data_dir.join("ledger.db").exists() {
        return Err(CliError::NoLedger(loc.data_dir.join("ledger.db").display().to_string()));
    }
    Ok(open_backend(&loc.data_dir, loc.database_url.as_deref())?)
}

/// Runs a ledger command, writing its result to `out`.
pub fn run(cmd: LedgerCommand, out: &mut dyn Write) -> Result<(), CliError> {
    match cmd {
        LedgerCommand::Export(a) => {
            let mut b = open(&a.location)?;
            let filter = EntryFilter { since_ms: a.since, until_ms: a.until, node: a.provider.clone() };
            match &a.output {
                Some(p) => {
                    let mut f = std::io::BufWriter::new(std::fs::File::create(p)?);
                    export(b.as_mut(), &filter, a.format, &mut f)?;
                    f.flush()?;
                    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
                }
                None => export(b.as_mut(), &filter, a.format, &mut std::io::BufWriter::new(out))?,
            }
            Ok(())
        }
        LedgerCommand::Verify(a) => {
            let opts = VerifyOptions { operator_key_sha256: a.operator_key_sha256, threads: 0, accept_unsigned_tail: a.accept_unsigned_tail };
            let report = match &a.file {
                Some(path) => crate::ledger::export::verify_export(std::io::BufReader::new(std::fs::File::open(path)?), opts)?,
                None => {
                    let mut b = open(&a.location)?;
                    verify_stored(b.as_mut(), opts)?.map_err(CliError::Bad)?
                }
            };
            write!(out, "{report}")?;
            Ok(())
        }
        LedgerCommand::RotateKey(a) => {
            // Refuse to create a ledger (and keys) where there is none.
            drop(open(&a.location)?);
            let _hold = super::hold::hold(&a.location.data_dir, a.location.database_url.as_deref(), super::hold::Mode::Exclusive)?;
            let old = super::load_key_file(&a.ledger_key_file)?;
            let new = super::load_or_create_key_file(&a.new_key_file)?;
            let mut b = open(&a.location)?;
            let r = super::rotate::rotate(b.as_mut(), &old, &a.ledger_key_file.display().to_string(), &new, kommune_proto::now_ms())?;
            writeln!(
                out,
                "operator key rotated from {} to {} by entry {} (signed by the old key); checkpoint {} signed by the new key\n\
                 run the operator with --ledger-key-file {} and pin `ledger verify --operator-key {}`",
                fingerprint(&r.old),
                fingerprint(&r.new),
                r.rotation_seq,
                r.checkpoint_seq,
                a.new_key_file.display(),
                fingerprint(&r.new)
            )?;
            Ok(())
        }
    }
}

/// Writes the entries `filter` selects.
pub fn export(b: &mut dyn Backend, filter: &EntryFilter, format: Format, out: &mut dyn Write) -> Result<(), CliError> {
    if format == Format::Csv {
        writeln!(out, "{}", CSV_COLUMNS.join(","))?;
    }
    let mut failure: Option<CliError> = None;
    b.for_each_entry(filter, &mut |e| {
        let r = match e {
            Err(bad) => Err(CliError::Unreadable(bad)),
            Ok(e) => match format {
                Format::Jsonl => serde_json::to_writer(&mut *out, &json(&e)).map_err(std::io::Error::from).and_then(|_| writeln!(out)).map_err(CliError::from),
                Format::Csv => writeln!(out, "{}", csv_row(&e)).map_err(CliError::from),
            },
        };
        match r {
            Ok(()) => true,
            Err(err) => {
                failure = Some(err);
                false
            }
        }
    })?;
    match failure {
        Some(e) => Err(e),
        None => Ok(out.flush()?),
    }
}

pub(super) fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)).unwrap_or_default()
}

/// One entry as a JSON object: every stored field (bytes in hex), plus the time, the cost in
/// credits and the key fingerprint for readability (the format `ledger verify --file` reads).
pub fn json(e: &Entry) -> serde_json::Value {
    let mut line = crate::ledger::export::ExportLine::from(e);
    line.recorded_at = time(e.recorded_ms);
    serde_json::to_value(line).expect("an export line serializes")
}

const CSV_COLUMNS: &[&str] = &[
    "seq",
    "kind",
    "recorded_at",
    "node",
    "epoch",
    "sequence",
    "attempt_id",
    "job_uid",
    "job",
    "wall_millis",
    "cpu_micros",
    "memory_peak_bytes",
    "memory_mib_millis",
    "wasm_fuel",
    "gpu_millis",
    "output_bytes",
    "rate_cpu_core_hour_micros",
    "rate_memory_gib_hour_micros",
    "rate_gpu_hour_micros",
    "rate_output_gib_micros",
    "cost_micros",
    "cost",
    "public_key_sha256",
    "body",
    "signature",
    "prev_hash",
    "hash",
];

pub(super) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

fn csv_row(e: &Entry) -> String {
    let u = &e.usage;
    let r = &e.rates;
    let fields: Vec<String> = vec![
        e.seq.to_string(),
        e.kind.name().into(),
        time(e.recorded_ms),
        csv_field(&e.node),
        e.epoch.to_string(),
        e.sequence.to_string(),
        csv_field(&e.attempt_id),
        csv_field(&e.job_uid),
        csv_field(&e.job_key),
        u.wall_millis.to_string(),
        u.cpu_micros.to_string(),
        u.memory_peak_bytes.to_string(),
        u.memory_mib_millis.to_string(),
        u.wasm_fuel.to_string(),
        u.gpu_millis.to_string(),
        u.output_bytes.to_string(),
        r.cpu_core_hour.0.to_string(),
        r.memory_gib_hour.0.to_string(),
        r.gpu_hour.0.to_string(),
        r.output_gib.0.to_string(),
        e.cost.0.to_string(),
        e.cost.to_string(),
        if e.public_key.is_empty() || e.kind == EntryKind::Checkpoint { String::new() } else { fingerprint(&e.public_key) },
        hex::encode(&e.body),
        hex::encode(&e.signature),
        hex::encode(&e.prev_hash),
        hex::encode(&e.hash),
    ];
    fields.join(",")
}

/// Whether a path holds an embedded ledger.
pub fn has_embedded_ledger(dir: &Path) -> bool {
    dir.join("ledger.db").exists()
}
