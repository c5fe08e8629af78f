//! The payout ledger: verified, priced usage receipts appended to a hash chain with periodic
//! operator-signed checkpoints, exactly once per (node, epoch, sequence), forever.
//!
//! Writes go through one writer thread that commits everything queued in one transaction
//! (group commit); signatures are batch-verified on the other cores before that. Storage is
//! SQLite in the data directory by default, PostgreSQL when a `database_url` is configured.

pub mod aggregate;
pub mod backend;
pub mod book;
pub mod cli;
pub mod hold;
pub mod payout_cli;
pub mod postgres;
pub mod rotate;
pub mod row;
pub mod series;
pub mod settle;
pub mod sqlite;

// The format and the pure rules live in `kommune-ledger`; re-exported so one path reaches both.
pub use book::NodePayouts;
pub use kommune_ledger::{Head, NodeEarnings};
pub use kommune_ledger::{chain, check, entry, export, job_totals, payout, records, statement_file, verify};
pub use settle::{ClosedStatement, ReceiptKey, Reversal};

// `tests` first: it defines the `backend_suite!` macro `bounds_tests` uses too.
#[cfg(test)]
#[macro_use]
pub(crate) mod tests;
#[cfg(test)]
mod bounds_tests;
#[cfg(test)]
mod rotate_tests;
#[cfg(test)]
mod settle_tests;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use ed25519_dalek::SigningKey;
use kommune_proto::now_ms;
use tokio::sync::{mpsc, oneshot};

use backend::{Backend, EntryFilter, JobUsage, RejectedCount, RejectedReceipt};
pub use chain::Verdict;
use chain::{Batch, ChainState};
use check::{ReceiptInput, Rejection, VerifiedReceipt};
use entry::NodeTotal;
use job_totals::{JobTotals, LoadGuard};
use kommune_core::fence::Fence;

use crate::db::epoch::DbError;
use crate::db::{Batching, Closed, DbThread};

/// A ledger failure; the message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger (sqlite): {op}: {source}")]
    Sqlite { op: &'static str, source: rusqlite::Error },
    #[error("ledger (postgresql): {op}: {source}; check that the database_url is reachable and the role may create tables")]
    Postgres { op: &'static str, source: ::postgres::Error },
    #[error("ledger: cannot create data directory {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error("ledger: operator ledger key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("ledger: {0}")]
    Fenced(#[from] kommune_core::fence::Fenced),
    #[error("ledger: the writer has stopped (an earlier error or shutdown); restart the operator")]
    Closed,
    #[error("ledger: stored data is damaged: {0}; run `kommune-operator ledger verify`")]
    Corrupt(String),
    #[error("ledger: database_url {0:?} is not a postgres:// or postgresql:// URL")]
    BadUrl(String),
    #[error("ledger: {0}")]
    Payout(#[from] payout::PayoutError),
}

impl LedgerError {
    /// Whether the database refused a write because a unique index already holds the key
    /// (a receipt or attempt metered before, or an entry seq taken).
    pub fn is_unique_violation(&self) -> bool {
        match self {
            LedgerError::Sqlite { source: rusqlite::Error::SqliteFailure(e, _), .. } => e.code == rusqlite::ErrorCode::ConstraintViolation,
            LedgerError::Postgres { source, .. } => source.code() == Some(&::postgres::error::SqlState::UNIQUE_VIOLATION),
            _ => false,
        }
    }
}

impl From<DbError<rusqlite::Error>> for LedgerError {
    fn from(e: DbError<rusqlite::Error>) -> Self {
        match e {
            DbError::Db { op, source } => LedgerError::Sqlite { op, source },
            DbError::Superseded { .. } => LedgerError::Fenced(kommune_core::fence::Fenced),
        }
    }
}

impl From<DbError<::postgres::Error>> for LedgerError {
    fn from(e: DbError<::postgres::Error>) -> Self {
        match e {
            DbError::Db { op, source } => LedgerError::Postgres { op, source },
            DbError::Superseded { .. } => LedgerError::Fenced(kommune_core::fence::Fenced),
        }
    }
}

/// Where the ledger lives and who may write it.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// Holds `ledger.key` (the operator's checkpoint key) and, without a database URL,
    /// `ledger.db`.
    pub data_dir: PathBuf,
    /// `postgres://...`: keep the ledger in PostgreSQL instead of SQLite.
    pub database_url: Option<String>,
    /// Leader-election fence; a fenced ledger refuses appends.
    pub fence: Fence,
    /// The operator's ledger key (PKCS#8 PEM): a mounted Secret or a file outside the data
    /// directory, so whoever can rewrite the database cannot also re-sign it. None keeps the
    /// older `<data_dir>/ledger.key` (with a warning at open).
    pub key_file: Option<PathBuf>,
}

/// Largest number of submissions committed in one transaction.
pub const MAX_BATCH: usize = 8192;

/// Largest number of submissions one checker takes at a time: small enough that a burst is
/// split across the checkers (one per core), large enough for batch verification to pay.
const CHECK_CHUNK: usize = 256;

/// Opens the configured backend (one connection or client).
pub fn open_backend(data_dir: &Path, database_url: Option<&str>) -> Result<Box<dyn Backend>, LedgerError> {
    match database_url {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => Ok(Box::new(postgres::PostgresBackend::connect(url)?)),
        Some(url) => Err(LedgerError::BadUrl(url.to_string())),
        None => Ok(Box::new(sqlite::SqliteBackend::open(data_dir)?)),
    }
}

/// Loads `<dir>/ledger.key` (PKCS#8 PEM), creating it with mode 0600 on first use.
pub fn load_or_create_key(dir: &Path) -> Result<SigningKey, LedgerError> {
    std::fs::create_dir_all(dir).map_err(|source| LedgerError::Dir { path: dir.display().to_string(), source })?;
    load_or_create_key_file(&dir.join("ledger.key"))
}

/// The ledger key `config` names: its key file, else `<data_dir>/ledger.key`.
pub fn config_key(config: &LedgerConfig) -> Result<SigningKey, LedgerError> {
    match &config.key_file {
        Some(path) => {
            std::fs::create_dir_all(&config.data_dir).map_err(|source| LedgerError::Dir { path: config.data_dir.display().to_string(), source })?;
            load_or_create_key_file(path)
        }
        None => {
            tracing::warn!(
                dir = %config.data_dir.display(),
                "the ledger key is kept beside the ledger it signs; set --ledger-key-file (the chart mounts a Secret) so a copy of the data volume cannot re-sign it"
            );
            load_or_create_key(&config.data_dir)
        }
    }
}

/// Loads a PKCS#8 PEM ledger key, creating it with mode 0600 when the file does not exist.
pub fn load_or_create_key_file(path: &Path) -> Result<SigningKey, LedgerError> {
    use ed25519_dalek::pkcs8::{EncodePrivateKey, spki::der::pem::LineEnding};
    let path = path.to_path_buf();
    let err = |reason: String| LedgerError::Key { path: path.display().to_string(), reason };
    match load_key_file(&path) {
        Err(LedgerError::Key { .. }) if !path.exists() => {
            let mut seed = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
            let key = SigningKey::from_bytes(&seed);
            let pem = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| err(format!("cannot encode a new key: {e}")))?;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&path).map_err(|e| err(format!("cannot create: {e}")))?;
            std::io::Write::write_all(&mut f, pem.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| err(format!("cannot write: {e}")))?;
            Ok(key)
        }
        loaded => loaded,
    }
}

/// Loads a PKCS#8 PEM ledger key that must exist (a key in force is never created).
pub fn load_key_file(path: &Path) -> Result<SigningKey, LedgerError> {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    let err = |reason: String| LedgerError::Key { path: path.display().to_string(), reason };
    let pem = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|e| err(format!("is not an ed25519 PKCS#8 PEM key ({e}); restore it from backup")))
}

enum Command {
    Submit(Box<ReceiptInput>, oneshot::Sender<Result<Verdict, LedgerError>>),
    RegisterKey { node: String, key: [u8; 32], owner: String, recorded_ms: i64, reply: oneshot::Sender<Result<bool, LedgerError>> },
    Checkpoint { recorded_ms: i64, reply: oneshot::Sender<Result<Head, LedgerError>> },
    Payout(settle::PayoutCommand),
}

// Checked items sit in a Vec that is built once and consumed once: boxing the large variant
// would add an allocation per receipt for nothing.
#[allow(clippy::large_enum_variant)]
enum Checked {
    Submit(Box<ReceiptInput>, Result<VerifiedReceipt, Rejection>, oneshot::Sender<Result<Verdict, LedgerError>>),
    Other(Command),
}

/// The ledger: a handle to the writer pipeline and to a reader connection. `Send + Sync`; share
/// it in an `Arc`. Every method is async and never blocks the caller's thread on the database.
pub struct Ledger {
    tx: Option<mpsc::Sender<Command>>,
    /// Signature checkers: threads between `tx` and the writer.
    checkers: Mutex<Vec<JoinHandle<()>>>,
    /// The writer's connection and chain state; committed batches come from the checkers.
    writer: Arc<DbThread<Writer, Vec<Checked>>>,
    reader: DbThread<Box<dyn Backend>>,
    operator_key: [u8; 32],
    /// Running usage totals of the jobs asked about, kept by the writer.
    totals: Arc<JobTotals>,
    /// Statements and earnings by state, read from the settlement lines.
    book: book::SharedBook,
}

impl From<Closed> for LedgerError {
    fn from(_: Closed) -> Self {
        LedgerError::Closed
    }
}

impl Ledger {
    /// Opens the ledger (creating the database and the operator key on first use) and starts
    /// its writer.
    pub fn open(config: LedgerConfig) -> Result<Ledger, LedgerError> {
        let key = config_key(&config)?;
        let key_path = config.key_file.clone().unwrap_or_else(|| config.data_dir.join("ledger.key")).display().to_string();
        let operator_key = key.verifying_key().to_bytes();
        let totals = Arc::new(JobTotals::default());
        // The writer opens first and the reader only once it is ready: on a new SQLite file,
        // switching to WAL takes a lock that SQLite may refuse at once (without waiting out
        // the busy timeout) while a second connection opens the same file.
        let (dir, url, fence, writer_totals) = (config.data_dir.clone(), config.database_url.clone(), config.fence.clone(), totals.clone());
        let open_writer = move || {
            let mut backend = open_backend(&dir, url.as_deref())?;
            // Before claiming anything: a writer whose key is not the ledger's would append
            // lines that fail verification from there on.
            rotate::check_key_in_force(backend.as_mut(), &key, &key_path)?;
            // An elected writer claims its epoch before it reads the chain head: every append
            // of an earlier leader has committed or will be refused by then.
            let epoch = if fence.elected() { Some(backend.claim_epoch(now_ms())?) } else { None };
            let state = load_state(backend.as_mut())?;
            if let Some(epoch) = epoch {
                tracing::info!(epoch, "payout ledger: claimed the leader epoch");
            }
            Ok::<_, LedgerError>(Writer { backend, state, key, fence, epoch, totals: writer_totals, settlement: None })
        };
        let batching = Batching {
            max_weight: MAX_BATCH,
            weight: Vec::len,
            commit: Box::new(|w: &mut Writer, chunks: Vec<Vec<Checked>>| w.commit(chunks.into_iter().flatten().collect())),
        };
        let writer = Arc::new(DbThread::spawn_batched("ledger-writer", Some(MAX_BATCH / CHECK_CHUNK), open_writer, batching)?);
        let (dir, url) = (config.data_dir.clone(), config.database_url.clone());
        let reader = DbThread::spawn("ledger-reader", move || open_backend(&dir, url.as_deref()))?;
        let (tx, rx) = mpsc::channel::<Command>(MAX_BATCH * 2);
        let mut ledger = Ledger { tx: Some(tx), checkers: Mutex::new(vec![]), writer, reader, operator_key, totals, book: Default::default() };
        let rx = Arc::new(Mutex::new(rx));
        let checkers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        for i in 0..checkers {
            let (rx, out) = (rx.clone(), ledger.writer.clone());
            match std::thread::Builder::new().name(format!("ledger-check-{i}")).spawn(move || check_loop(rx, &out)) {
                Ok(t) => ledger.checkers.get_mut().unwrap_or_else(PoisonError::into_inner).push(t),
                Err(e) => {
                    ledger.shutdown();
                    return Err(LedgerError::Corrupt(format!("cannot start a ledger thread: {e}")));
                }
            }
        }
        Ok(ledger)
    }

    async fn send(&self, c: Command) -> Result<(), LedgerError> {
        let tx = self.tx.as_ref().ok_or(LedgerError::Closed)?;
        tx.send(c).await.map_err(|_| LedgerError::Closed)
    }

    /// Verifies, prices and durably records a receipt. Resolves once the verdict is durable.
    pub async fn submit(&self, input: ReceiptInput) -> Result<Verdict, LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Submit(Box::new(input), reply)).await?;
        rx.await.map_err(|_| LedgerError::Closed)?
    }

    /// Records that `node` signs with `key` (at join); keys are kept forever, and a node may
    /// have several over time. Returns false when it was registered already. The node is its
    /// own owner: see [`Ledger::register_owned_node_key`].
    pub async fn register_node_key(&self, node: &str, key: [u8; 32]) -> Result<bool, LedgerError> {
        self.register_owned_node_key(node, key, "").await
    }

    /// Records that `node` signs with `key` and belongs to `owner` (whose statement pays its
    /// receipts); empty means the node is its own owner. The line is signed by the operator.
    pub async fn register_owned_node_key(&self, node: &str, key: [u8; 32], owner: &str) -> Result<bool, LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::RegisterKey { node: node.to_string(), key, owner: owner.to_string(), recorded_ms: now_ms(), reply }).await?;
        rx.await.map_err(|_| LedgerError::Closed)?
    }

    /// Appends a checkpoint now (one is also appended every `CHECKPOINT_EVERY` entries).
    pub async fn checkpoint(&self) -> Result<Head, LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Checkpoint { recorded_ms: now_ms(), reply }).await?;
        rx.await.map_err(|_| LedgerError::Closed)?
    }

    /// Runs `f` on the reader's connection.
    async fn read<T: Send + 'static>(&self, f: impl FnOnce(&mut dyn Backend) -> Result<T, LedgerError> + Send + 'static) -> Result<T, LedgerError> {
        self.reader.run(move |b| f(b.as_mut())).await?
    }

    /// Stops keeping a job's running totals (it finished or was deleted); a later
    /// [`Ledger::job_usage`] reads them from the database again, late receipts included.
    pub fn forget_job(&self, job_uid: &str) {
        self.totals.forget(job_uid);
    }

    /// Usage and cost of a job's receipts so far. Read from the database the first time, then
    /// kept as running totals that the writer updates as it appends (the same figures).
    pub async fn job_usage(&self, job_uid: &str) -> Result<JobUsage, LedgerError> {
        if let Some(t) = self.totals.get(job_uid) {
            return Ok(t);
        }
        let mut guard = LoadGuard { totals: &self.totals, job_uid, done: !self.totals.start(job_uid) };
        let uid = job_uid.to_string();
        let read = self
            .read(move |b| match b.job_usage_with_head(&uid)? {
                Some((usage, head)) => Ok((usage, Some(head))),
                None => Ok((b.job_usage(&uid)?, None)),
            })
            .await?;
        Ok(match read {
            (usage, Some(head)) if !guard.done => {
                guard.done = true;
                self.totals.loaded(job_uid, usage, head)
            }
            (usage, _) => usage,
        })
    }

    /// A node's pending earnings and the head backing them.
    pub async fn node_earnings(&self, node: &str) -> Result<NodeEarnings, LedgerError> {
        self.earnings(node, None).await
    }

    /// A node's pending earnings from the receipts signed with `key` only: what one identity
    /// earned under a name, even if that name was ever used with another key.
    pub async fn node_earnings_of_key(&self, node: &str, key: [u8; 32]) -> Result<NodeEarnings, LedgerError> {
        self.earnings(node, Some(key)).await
    }

    async fn earnings(&self, node: &str, key: Option<[u8; 32]>) -> Result<NodeEarnings, LedgerError> {
        let node = node.to_string();
        self.read(move |b| {
            // Head first: the totals read after it cover at least the entries it names.
            let head = head_of(b)?;
            let t: NodeTotal = b.node_total(&node, key.as_ref())?;
            Ok(NodeEarnings { node, pending: t.total, receipts: t.receipts, head })
        })
        .await
    }

    /// The last entry.
    pub async fn head(&self) -> Result<Option<Head>, LedgerError> {
        self.read(head_of).await
    }

    /// The `limit` receipts most recently refused from `node`'s sessions (first seen), newest
    /// first, as bounded digests with their reasons; at most `REJECTED_KEPT_PER_NODE` are kept.
    pub async fn rejected(&self, node: &str, limit: u64) -> Result<Vec<RejectedReceipt>, LedgerError> {
        let node = node.to_string();
        self.read(move |b| b.rejected(&node, limit)).await
    }

    /// How many receipts `node`'s sessions had refused (all of them, evicted ones included),
    /// from counters: one indexed row, whatever the node sent.
    pub async fn rejected_count(&self, node: &str) -> Result<RejectedCount, LedgerError> {
        let node = node.to_string();
        self.read(move |b| b.rejected_count(&node)).await
    }

    /// Stops the pipeline after the work already queued and waits for its threads.
    fn shutdown(&mut self) {
        // Closing the queue stops the checkers once it is empty; the writer then commits what
        // they handed it and stops.
        self.tx = None;
        for t in self.checkers.get_mut().unwrap_or_else(PoisonError::into_inner).drain(..) {
            let _ = t.join();
        }
        self.writer.close();
        self.reader.close();
    }

    /// The operator's ledger public key (signs checkpoints).
    pub fn operator_key(&self) -> [u8; 32] {
        self.operator_key
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn head_of(b: &mut dyn Backend) -> Result<Option<Head>, LedgerError> {
    match b.head()? {
        None => Ok(None),
        Some((seq, hash)) => {
            let hash = hash.try_into().map_err(|_| LedgerError::Corrupt(format!("entry {seq} has a hash that is not 32 bytes")))?;
            Ok(Some(Head { seq, hash }))
        }
    }
}

fn load_state(b: &mut dyn Backend) -> Result<ChainState, LedgerError> {
    let head = head_of(b)?;
    let last_cp = b.last_checkpoint()?;
    let per_node = b.node_totals()?;
    let mut s = ChainState {
        head_seq: head.map_or(0, |h| h.seq),
        head_hash: head.map_or(entry::GENESIS, |h| h.hash),
        receipts: per_node.values().map(|t| t.receipts).sum(),
        total: per_node.values().fold(kommune_core::pricing::Micros(0), |a, t| a.saturating_add(t.total)),
        per_node,
        ..Default::default()
    };
    s.head_is_checkpoint = last_cp != 0 && last_cp == s.head_seq;
    s.since_checkpoint = s.head_seq - last_cp.min(s.head_seq);
    for (node, key) in b.node_keys()? {
        let key: [u8; 32] = key.try_into().map_err(|_| LedgerError::Corrupt(format!("a registered key of node {node} is not 32 bytes")))?;
        s.keys.entry(node).or_default().insert(key);
    }
    Ok(s)
}

/// Takes what is queued (up to CHECK_CHUNK), verifies the receipts' signatures as one batch,
/// and hands the result to the writer.
fn check_loop(rx: Arc<Mutex<mpsc::Receiver<Command>>>, out: &DbThread<Writer, Vec<Checked>>) {
    let mut keys = check::KeyCache::default();
    loop {
        let mut cmds = Vec::new();
        {
            let mut rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            let Some(first) = rx.blocking_recv() else { return };
            cmds.push(first);
            while cmds.len() < CHECK_CHUNK {
                match rx.try_recv() {
                    Ok(c) => cmds.push(c),
                    Err(_) => break,
                }
            }
        }
        let inputs: Vec<&ReceiptInput> = cmds.iter().filter_map(|c| if let Command::Submit(i, _) = c { Some(&**i) } else { None }).collect();
        let mut results = check::check_refs(&inputs, &mut keys).into_iter();
        let checked = cmds
            .into_iter()
            .map(|c| match c {
                Command::Submit(i, reply) => Checked::Submit(i, results.next().expect("one result per input"), reply),
                other => Checked::Other(other),
            })
            .collect();
        if out.queue(checked).is_err() {
            return;
        }
    }
}

enum Reply {
    Submit(oneshot::Sender<Result<Verdict, LedgerError>>, Verdict),
    Key(oneshot::Sender<Result<bool, LedgerError>>, bool),
    Checkpoint(oneshot::Sender<Result<Head, LedgerError>>, Head),
    Payout(settle::PayoutCommand, settle::PayoutDecided),
}

impl Reply {
    fn send(self) {
        // A caller that stopped waiting does not matter: the verdict is durable either way.
        match self {
            Reply::Submit(r, v) => drop(r.send(Ok(v))),
            Reply::Key(r, v) => drop(r.send(Ok(v))),
            Reply::Checkpoint(r, v) => drop(r.send(Ok(v))),
            Reply::Payout(c, d) => c.answer(Some(d), &|| LedgerError::Closed),
        }
    }

    fn fail(self, e: impl Fn() -> LedgerError) {
        match self {
            Reply::Submit(r, _) => drop(r.send(Err(e()))),
            Reply::Key(r, _) => drop(r.send(Err(e()))),
            Reply::Checkpoint(r, _) => drop(r.send(Err(e()))),
            Reply::Payout(c, _) => c.answer(None, &e),
        }
    }
}

/// What the writer decided for one command, before the batch is durable.
enum Decided {
    Submit(Verdict),
    Key(bool),
    Checkpoint(Head),
    Payout(settle::PayoutDecided),
}

/// For each verified receipt of a batch: the entry holding its key, the entry metering its attempt.
type Lookups = (Vec<Option<backend::Existing>>, Vec<Option<u64>>);

struct Writer {
    backend: Box<dyn Backend>,
    state: ChainState,
    key: SigningKey,
    fence: Fence,
    /// The leader epoch this writer claimed (with leader election).
    epoch: Option<u64>,
    totals: Arc<JobTotals>,
    /// Who owns what and what is settled, read from the chain on the first payout command and
    /// then kept up to date with every append; None until then, and after a failed append.
    settlement: Option<payout::Settlement>,
}

impl Writer {
    fn commit(&mut self, work: Vec<Checked>) {
        let mut replies = Vec::with_capacity(work.len());
        if let Err(e) = self.fence.check() {
            return fenced_all(work, &e);
        }
        // Optimistic first: a receipt is almost always new, so the batch is decided without
        // looking each one up, and the unique indexes on (node, epoch, sequence) and attempt id
        // catch the rare repeat. Then the batch is decided again with lookups, from the state
        // as it was before.
        let before = self.state.clone();
        let (mut batch, mut verdicts) = self.decide_all(&work, None);
        let mut result = self.append(&batch);
        if matches!(&result, Err(e) if e.is_unique_violation()) {
            self.state = before.clone();
            self.settlement = None;
            let lookups = match self.lookups(&work) {
                Ok(l) => l,
                Err(e) => return fail_all(work, &e),
            };
            (batch, verdicts) = self.decide_all(&work, Some(lookups));
            result = self.append(&batch);
        }
        if let Err(LedgerError::Fenced(e)) = &result {
            // Another replica claimed a later epoch: this one is no longer the leader, whatever
            // its clock says. Nothing was written; stop writing at all.
            tracing::error!("payout ledger: another operator replica has claimed the ledger; this replica stops writing");
            self.fence.close();
            self.state = before;
            return fenced_all(work, e);
        }
        for (c, v) in work.into_iter().zip(verdicts) {
            let reply = match (c, v) {
                (Checked::Submit(_, _, reply), Decided::Submit(v)) => Reply::Submit(reply, v),
                (Checked::Other(Command::RegisterKey { reply, .. }), Decided::Key(new)) => Reply::Key(reply, new),
                (Checked::Other(Command::Checkpoint { reply, .. }), Decided::Checkpoint(head)) => Reply::Checkpoint(reply, head),
                (Checked::Other(Command::Payout(c)), Decided::Payout(d)) => Reply::Payout(c, d),
                _ => unreachable!("one decision per command, of its kind"),
            };
            replies.push(reply);
        }
        match result {
            Ok(()) => {
                // Before the replies: whoever hears of a receipt finds it in the job's totals.
                self.totals.appended(&batch.entries);
                if let Some(s) = &mut self.settlement
                    && settle::catch_up(s, &batch.entries).is_err()
                {
                    self.settlement = None;
                }
                replies.into_iter().for_each(Reply::send)
            }
            Err(e) => {
                let msg = e.to_string();
                self.settlement = None;
                // Nothing of this batch is stored: go back to what the database holds.
                match load_state(self.backend.as_mut()) {
                    Ok(s) => self.state = s,
                    Err(e2) => tracing::error!(error = %e2, "ledger: cannot reload the chain head after a failed append"),
                }
                replies.into_iter().for_each(|r| r.fail(|| LedgerError::Corrupt(format!("append failed and was rolled back: {msg}"))));
            }
        }
    }

    fn append(&mut self, batch: &Batch) -> Result<(), LedgerError> {
        if batch.entries.is_empty() && batch.rejected.is_empty() { Ok(()) } else { self.backend.append(&batch.entries, &batch.rejected, self.epoch) }
    }

    /// Decides every command of `work` against the chain state, with what the store holds for
    /// each verified receipt when `lookups` is given (taken as "nothing" otherwise).
    fn decide_all(&mut self, work: &[Checked], lookups: Option<Lookups>) -> (Batch, Vec<Decided>) {
        let mut batch = Batch::default();
        let (mut in_db, mut attempts_in_db) = lookups.map(|(a, b)| (a.into_iter(), b.into_iter())).unzip();
        let decided = work
            .iter()
            .map(|c| match c {
                Checked::Submit(input, checked, _) => {
                    let (existing, attempt) = match (checked.is_ok(), in_db.as_mut(), attempts_in_db.as_mut()) {
                        (true, Some(e), Some(a)) => (e.next().flatten(), a.next().flatten()),
                        _ => (None, None),
                    };
                    Decided::Submit(self.state.decide(&mut batch, input, checked, existing.as_ref(), attempt, &self.key))
                }
                Checked::Other(Command::RegisterKey { node, key, owner, recorded_ms, .. }) => {
                    Decided::Key(self.state.register_key(&mut batch, node, *key, owner, *recorded_ms, &self.key))
                }
                Checked::Other(Command::Payout(cmd)) => Decided::Payout(self.decide_payout(&mut batch, cmd)),
                Checked::Other(Command::Checkpoint { recorded_ms, .. }) => {
                    if !self.state.head_is_checkpoint {
                        self.state.checkpoint(&mut batch, *recorded_ms, &self.key);
                    }
                    Decided::Checkpoint(Head { seq: self.state.head_seq, hash: self.state.head_hash })
                }
                Checked::Other(Command::Submit(..)) => unreachable!("the checkers turn every submission into Checked::Submit"),
            })
            .collect();
        (batch, decided)
    }

    fn decide_payout(&mut self, batch: &mut Batch, cmd: &settle::PayoutCommand) -> settle::PayoutDecided {
        if self.settlement.is_none() {
            match settle::load_settlement(self.backend.as_mut()) {
                Ok(s) => self.settlement = Some(s),
                Err(e) => return settle::decide_failed(cmd, e),
            }
        }
        let Writer { backend, state, key, settlement, .. } = self;
        let s = settlement.as_mut().expect("loaded above");
        settle::decide(state, s, batch, cmd, key, &mut |id| Ok(backend.lookup_attempts(&[id])?.pop().flatten()))
    }

    fn lookups(&mut self, work: &[Checked]) -> Result<Lookups, LedgerError> {
        let verified: Vec<&VerifiedReceipt> = work.iter().filter_map(|c| if let Checked::Submit(_, Ok(v), _) = c { Some(v) } else { None }).collect();
        let keys: Vec<(&str, u64, u64)> = verified.iter().map(|v| (v.body.node.as_str(), v.body.epoch, v.body.sequence)).collect();
        let ids: Vec<&str> = verified.iter().map(|v| v.body.attempt_id.as_str()).collect();
        Ok((self.backend.lookup_receipts(&keys)?, self.backend.lookup_attempts(&ids)?))
    }
}

fn fenced_all(work: Vec<Checked>, e: &kommune_core::fence::Fenced) {
    let err = || LedgerError::Fenced(e.clone());
    for c in work {
        match c {
            Checked::Submit(_, _, r) | Checked::Other(Command::Submit(_, r)) => drop(r.send(Err(err()))),
            Checked::Other(Command::RegisterKey { reply, .. }) => drop(reply.send(Err(err()))),
            Checked::Other(Command::Checkpoint { reply, .. }) => drop(reply.send(Err(err()))),
            Checked::Other(Command::Payout(c)) => c.answer(None, &err),
        }
    }
}

fn fail_all(work: Vec<Checked>, e: &LedgerError) {
    let msg = e.to_string();
    let err = || LedgerError::Corrupt(format!("cannot read the ledger: {msg}"));
    for c in work {
        match c {
            Checked::Submit(_, _, r) | Checked::Other(Command::Submit(_, r)) => drop(r.send(Err(err()))),
            Checked::Other(Command::RegisterKey { reply, .. }) => drop(reply.send(Err(err()))),
            Checked::Other(Command::Checkpoint { reply, .. }) => drop(reply.send(Err(err()))),
            Checked::Other(Command::Payout(c)) => c.answer(None, &err),
        }
    }
}

/// Verifies the whole stored chain (what `kommune-operator ledger verify` runs).
pub fn verify_stored(b: &mut dyn Backend, opts: verify::VerifyOptions) -> Result<Result<verify::VerifyReport, verify::BadEntry>, LedgerError> {
    let mut v = verify::ChainVerifier::new(opts);
    let mut early: Option<verify::BadEntry> = None;
    b.for_each_entry(&EntryFilter::default(), &mut |e| match e {
        Ok(e) => v.push(&e).is_ok(),
        Err(bad) => {
            early = Some(bad);
            false
        }
    })?;
    let r = v.finish();
    Ok(match (r, early) {
        (Err(a), Some(b)) => Err(if a.seq <= b.seq { a } else { b }),
        (Ok(_), Some(b)) => Err(b),
        (r, None) => r,
    })
}
