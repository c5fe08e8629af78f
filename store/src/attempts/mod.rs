//! The operator's store of task attempts and the node registry: SQLite on the operator's volume
//! by default, PostgreSQL when a `database_url` is configured (what replicas under leader
//! election share, so a takeover carries the running work over).
//!
//! Kubernetes keeps desired state and a summary; the per-task truth lives here, so the hot path
//! never writes one API object per task. Every transition is a guarded UPDATE, so replays and
//! duplicates are no-ops. Results from agents go through a group-commit writer thread: every
//! finish queued while one transaction commits goes into the next, one fsync for all of them
//! (the ledger does the same).
//!
//! Under leader election a write passes two fences: the time-based [`Fence`] before it, and an
//! epoch inside its transaction. Opening an elected store claims the next epoch in
//! `store_leader`; a write transaction that reads another epoch there rolls back. So a leader
//! frozen past its Lease (SIGSTOP, a paused VM) writes nothing once its successor has opened
//! the store, however long the freeze and wherever in a write it stopped.

mod nodes;
mod observations;
mod postgres;
mod retention;
mod sqlite;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};

use kommune_proto::now_ms;
use tokio::sync::oneshot;

use kommune_core::attempt::{Attempt, AttemptPhase, AttemptResult, Held};
use kommune_core::attempt_index::AttemptIndex;
use kommune_core::fence::{Fence, Fenced};
use kommune_core::reputation::Observation;

use crate::db::epoch::DbError;
use crate::db::{Batching, Closed, DbThread};

/// A store failure; the message names the operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {op}: {source}")]
    Sqlite { op: &'static str, source: rusqlite::Error },
    #[error("store (postgresql): {op}: {source}; check that the database_url is reachable and the role may create tables")]
    Postgres { op: &'static str, source: ::postgres::Error },
    #[error("store: database_url {0:?} is not a postgres:// or postgresql:// URL")]
    Url(String),
    #[error("store: cannot create data directory {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error("store: attempt {id} has an unknown phase {phase:?}")]
    Corrupt { id: String, phase: String },
    /// The time-based fence is closed, or another replica has claimed the store since this
    /// one opened it.
    #[error("store: {0}")]
    Fenced(#[from] Fenced),
    /// The thread that owns a PostgreSQL connection could not start or has stopped.
    #[error("store: the {0} thread could not start or has stopped; restart the operator")]
    Thread(&'static str),
    /// A group commit failed; nothing of it was stored. The agent resends its result.
    #[error("store: commit of queued results failed: {0}")]
    Batch(String),
}

type Result<T> = std::result::Result<T, StoreError>;

pub use nodes::{CapacityLimits, NodeGrant, NodeRecord, Registration, Removal};

/// Where the store lives and who may write to it.
#[derive(Clone)]
pub struct StoreConfig {
    /// Directory of `kommune.db` (used when `database_url` is None).
    pub data_dir: PathBuf,
    /// postgres://… : keep the attempts and nodes in this PostgreSQL database (the ledger's).
    pub database_url: Option<String>,
    /// Checked before every write; an elected fence also makes the store claim an epoch.
    pub fence: Fence,
}

/// The store. `Send + Sync`; share it in an `Arc`. Every method that reaches the database is
/// async and runs on the store's own connection threads, never on the caller's.
pub struct Store {
    /// Reads, inserts and single transitions; with SQLite also the group commit of results.
    main: DbThread<Box<dyn Db>, Finish>,
    /// With PostgreSQL, the group-commit writer for results from agents (see
    /// [`Store::finish_batched`]) on a connection of its own, so a commit's round trips never
    /// hold up a read. SQLite commits them on the main connection: a second writer to one file
    /// would only wait for the first one's lock (measured: half the dispatch throughput).
    writer: Option<DbThread<Box<dyn Db>, Finish>>,
    fence: Fence,
    /// This store's claim in `store_leader`, when opened under leader election.
    epoch: Option<i64>,
    /// The attempts of the jobs being synced, kept in step with every write (after it commits,
    /// with the connection unlocked: a load holds the index lock while it reads).
    index: Arc<AttemptIndex>,
    /// Attempts whose Running mark is handed over and not applied yet: an agent repeating its
    /// Running report queues nothing more, so it cannot grow the store's queue.
    running_soon: Arc<Mutex<HashSet<String>>>,
}

impl From<Closed> for StoreError {
    fn from(c: Closed) -> Self {
        StoreError::Thread(c.0)
    }
}

/// Which attempts to read.
#[derive(Debug, Clone)]
enum Select {
    Id(String),
    /// A job's, ordered by index, number and replica.
    Job(String),
    /// The active ones on a node, by id.
    Node(String),
    /// Every active one, by id.
    Active,
}

/// One backend's connection. Each write takes `epoch`: this store's claim under leader
/// election, checked inside the write's transaction (see the module doc), or None to skip it.
trait Db: Send {
    /// Takes the next epoch in `store_leader` (1 on an empty table) and returns it.
    fn claim_epoch(&mut self, now_ms: i64) -> Result<i64>;
    /// Inserts attempts in one transaction; an existing id is left as it is.
    fn insert(&mut self, epoch: Option<i64>, attempts: &[Attempt]) -> Result<()>;
    /// Assigned → Running; whether it changed.
    fn mark_running(&mut self, epoch: Option<i64>, id: &str) -> Result<bool>;
    /// Active → `phase`; the attempt as it is now, or None when it did not change.
    fn finish(&mut self, epoch: Option<i64>, id: &str, phase: AttemptPhase, json: Option<&str>, now_ms: i64) -> Result<Option<Attempt>>;
    /// Every finish of `batch` in one transaction; for each, whether it changed the attempt.
    fn finish_batch(&mut self, epoch: Option<i64>, batch: &[Finish]) -> Result<Vec<bool>>;
    fn select(&mut self, which: &Select) -> Result<Vec<Attempt>>;
    fn outcomes_by_node(&mut self) -> Result<Vec<(String, u64, u64)>>;
    fn register_node(&mut self, epoch: Option<i64>, name: &str, public_key_sha256: &str, grant: &NodeGrant, now_ms: i64) -> Result<Registration>;
    /// Retires a registered name (sets its tombstone); whether it was registered.
    fn remove_node(&mut self, epoch: Option<i64>, name: &str, removal: Removal, now_ms: i64) -> Result<bool>;
    fn node(&mut self, name: &str) -> Result<Option<NodeRecord>>;
    /// Records observations in one transaction; one already recorded (same attempt and kind)
    /// is left as it is.
    fn observe(&mut self, epoch: Option<i64>, observations: &[Observation]) -> Result<()>;
    /// Observations at or after `since_ms`, oldest first.
    fn observations_since(&mut self, since_ms: i64) -> Result<Vec<Observation>>;
    /// A node's newest `limit` observations, newest first.
    fn observations_of(&mut self, node: &str, limit: u32) -> Result<Vec<Observation>>;
    /// Notes when a job's attempts may be pruned (`Some`, the first note wins), or that the
    /// job runs again and they must stay (`None`).
    fn retain(&mut self, epoch: Option<i64>, job_uid: &str, prune_at_ms: Option<i64>) -> Result<()>;
    /// Deletes up to `limit` finished attempts of jobs due at `now_ms`; how many.
    fn prune(&mut self, epoch: Option<i64>, now_ms: i64, limit: u32) -> Result<u64>;
    /// Runs `hook` inside each insert's transaction just before it commits.
    #[cfg(test)]
    fn set_before_commit(&mut self, hook: Box<dyn Fn() + Send>) {
        let _ = hook;
    }
}

impl From<DbError<rusqlite::Error>> for StoreError {
    fn from(e: DbError<rusqlite::Error>) -> Self {
        match e {
            DbError::Db { op, source } => StoreError::Sqlite { op, source },
            DbError::Superseded { .. } => StoreError::Fenced(Fenced),
        }
    }
}

impl From<DbError<::postgres::Error>> for StoreError {
    fn from(e: DbError<::postgres::Error>) -> Self {
        match e {
            DbError::Db { op, source } => StoreError::Postgres { op, source },
            DbError::Superseded { .. } => StoreError::Fenced(Fenced),
        }
    }
}

/// A terminal transition queued for the group-commit writer.
struct Finish {
    id: String,
    phase: AttemptPhase,
    result: AttemptResult,
    json: Option<String>,
    now_ms: i64,
    /// The queuing store's claim (the same for every finish of one store).
    epoch: Option<i64>,
    done: oneshot::Sender<Result<bool>>,
}

/// Most finishes committed in one transaction.
const MAX_FINISH_BATCH: usize = 4096;

/// A set only changed in one step, so a poisoned lock is safe to reuse.
fn lock(set: &Mutex<HashSet<String>>) -> std::sync::MutexGuard<'_, HashSet<String>> {
    set.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Opens one connection to the configured backend.
fn connect(data_dir: &Path, database_url: Option<&str>) -> Result<Box<dyn Db>> {
    match database_url {
        None => Ok(Box::new(sqlite::SqliteDb::open(data_dir)?)),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => Ok(Box::new(postgres::PgDb::connect(url)?)),
        Some(url) => Err(StoreError::Url(url.to_string())),
    }
}

impl Store {
    /// Opens (creating if needed) `<dir>/kommune.db`, writable without leader election.
    pub fn open(dir: &Path) -> Result<Self> {
        Store::open_with(StoreConfig { data_dir: dir.to_path_buf(), database_url: None, fence: Fence::open() })
    }

    /// Opens `<dir>/kommune.db` so that every write first checks `fence` (leader election).
    pub fn open_fenced(dir: &Path, fence: Fence) -> Result<Self> {
        Store::open_with(StoreConfig { data_dir: dir.to_path_buf(), database_url: None, fence })
    }

    /// Opens the store `config` names. With an elected fence it claims the next epoch first:
    /// open it only once the Lease is held, as the operator does. Blocks while it connects.
    pub fn open_with(config: StoreConfig) -> Result<Self> {
        let StoreConfig { data_dir, database_url, fence } = config;
        let (elected, backend) = (fence.elected(), if database_url.is_some() { "postgresql" } else { "sqlite" });
        // The main connection opens first (it creates the schema and claims the epoch), the
        // writer's only once it is ready.
        let (claimed, epoch_rx) = sync_channel(1);
        let (dir, url) = (data_dir.clone(), database_url.clone());
        let index = Arc::new(AttemptIndex::default());
        let main = DbThread::spawn_batched(
            "store-db",
            None,
            move || {
                let mut db = connect(&dir, url.as_deref())?;
                let epoch = if elected { Some(db.claim_epoch(now_ms())?) } else { None };
                let _ = claimed.send(epoch);
                Ok::<_, StoreError>(db)
            },
            finish_batching(&fence, &index),
        )?;
        let epoch = epoch_rx.try_recv().map_err(|_| StoreError::Thread("store-db"))?;
        let writer = match database_url {
            Some(url) => Some(DbThread::spawn_batched("store-writer", None, move || connect(&data_dir, Some(&url)), finish_batching(&fence, &index))?),
            None => None,
        };
        tracing::info!(backend, epoch, "attempt store open");
        Ok(Store { main, writer, fence, epoch, index, running_soon: Arc::default() })
    }

    /// Runs `f` on the main connection.
    async fn with<R: Send + 'static>(&self, f: impl FnOnce(&mut dyn Db) -> Result<R> + Send + 'static) -> Result<R> {
        self.main.run(move |db| f(db.as_mut())).await?
    }

    /// This store's epoch in `store_leader` (None without leader election).
    pub fn epoch(&self) -> Option<i64> {
        self.epoch
    }

    /// Records new attempts in one transaction. Re-inserting an existing id is a no-op.
    pub async fn insert_attempts(&self, attempts: &[Attempt]) -> Result<()> {
        self.fence.check()?;
        let (epoch, owned) = (self.epoch, attempts.to_vec());
        self.with(move |db| db.insert(epoch, &owned)).await?;
        self.index.inserted(attempts);
        Ok(())
    }

    /// Marks an Assigned attempt Running. Returns false when it was not Assigned (a duplicate
    /// or late message).
    ///
    /// Committed without an fsync (SQLite synchronous=NORMAL, PostgreSQL synchronous_commit
    /// off; the next durable commit makes it durable): losing it in a crash is harmless, as
    /// Assigned and Running are both active and the agent's next Hello reconciles them, and it
    /// keeps an fsync off every task's path.
    pub async fn mark_running(&self, id: &str) -> Result<bool> {
        self.fence.check()?;
        let (epoch, owned) = (self.epoch, id.to_string());
        let changed = self.with(move |db| db.mark_running(epoch, &owned)).await?;
        if changed {
            self.index.running(id);
        }
        Ok(changed)
    }

    /// Like [`Store::mark_running`], without waiting: the transition is handed to the store's
    /// connection and the caller goes on (an agent's session reads its next message at once).
    /// Nothing depends on its outcome: the later finish is guarded the same way, and a lost or
    /// failed mark is harmless (see `mark_running`), so a failure is only logged.
    pub fn mark_running_soon(&self, id: &str) -> Result<()> {
        self.fence.check()?;
        if !lock(&self.running_soon).insert(id.to_string()) {
            return Ok(());
        }
        let (epoch, owned, index, pending) = (self.epoch, id.to_string(), self.index.clone(), self.running_soon.clone());
        let handed = self.main.spawn_run(move |db| {
            match db.mark_running(epoch, &owned) {
                Ok(true) => index.running(&owned),
                Ok(false) => {}
                Err(e) => tracing::warn!(attempt = %owned, error = %e, "cannot mark the attempt Running; its result will finish it"),
            }
            lock(&pending).remove(&owned);
        });
        if handed.is_err() {
            lock(&self.running_soon).remove(id);
        }
        Ok(handed?)
    }

    /// How many Running marks wait to be applied.
    #[cfg(test)]
    fn running_marks_pending(&self) -> usize {
        lock(&self.running_soon).len()
    }

    /// Like [`Store::finish`], for results from agents: queued for the writer, which commits
    /// everything queued in one transaction (one fsync for the batch). Resolves once the
    /// transition is durable; returns whether the attempt changed (false when it was already
    /// terminal or does not exist).
    pub async fn finish_batched(&self, id: &str, phase: AttemptPhase, result: &AttemptResult, now_ms: i64) -> Result<bool> {
        debug_assert!(phase.is_terminal());
        self.fence.check()?;
        let json = Some(serde_json::to_string(result).expect("a result always serialises"));
        let (done, durable) = oneshot::channel();
        let closed = || StoreError::Batch("the store's writer thread has stopped; restart the operator".into());
        let finish = Finish { id: id.to_string(), phase, result: result.clone(), json, now_ms, epoch: self.epoch, done };
        self.writer.as_ref().unwrap_or(&self.main).queue(finish).map_err(|_| closed())?;
        durable.await.map_err(|_| closed())?
    }

    /// Moves an active attempt to a terminal phase. Returns the updated attempt, or None when
    /// it does not exist or was already terminal: finishing twice is a no-op.
    pub async fn finish(&self, id: &str, phase: AttemptPhase, result: Option<&AttemptResult>, now_ms: i64) -> Result<Option<Attempt>> {
        debug_assert!(phase.is_terminal());
        self.fence.check()?;
        let json = result.map(|r| serde_json::to_string(r).expect("a result always serialises"));
        let (epoch, owned) = (self.epoch, id.to_string());
        let done = self.with(move |db| db.finish(epoch, &owned, phase, json.as_deref(), now_ms)).await?;
        if done.is_some() {
            self.index.finished(id, phase, result, now_ms);
        }
        Ok(done)
    }

    async fn select(&self, which: Select) -> Result<Vec<Attempt>> {
        self.with(move |db| db.select(&which)).await
    }

    /// One attempt by id: from memory when its job is loaded (kept in step with every write,
    /// so an agent's update costs no database read), else from the database.
    pub async fn attempt(&self, id: &str) -> Result<Option<Attempt>> {
        if let Some(a) = self.index.attempt(id) {
            return Ok(Some(Attempt::clone(&a)));
        }
        Ok(self.select(Select::Id(id.to_string())).await?.pop())
    }

    /// Every attempt of a job, read from the database.
    pub async fn attempts_for_job(&self, job_uid: &str) -> Result<Vec<Attempt>> {
        self.select(Select::Job(job_uid.to_string())).await
    }

    /// Every attempt of a job, in the same order, from memory: read from the database once,
    /// then kept in step with every write. What the sync loop reads.
    pub async fn job_attempts(&self, job_uid: &str) -> Result<Vec<Arc<Attempt>>> {
        if let Some(loaded) = self.index.get(job_uid) {
            return Ok(loaded);
        }
        // The load runs on the connection's thread, under the index lock (see AttemptIndex::job).
        let (index, uid) = (self.index.clone(), job_uid.to_string());
        self.with(move |db| index.job(&uid, || db.select(&Select::Job(uid.clone())))).await
    }

    /// A job's attempts from memory, or None when it is not loaded (nothing is read).
    pub fn loaded_job_attempts(&self, job_uid: &str) -> Option<Vec<Arc<Attempt>>> {
        self.index.get(job_uid)
    }

    /// The tasks of a loaded job whose attempts were settled out of memory (empty when none).
    pub fn settled(&self, job_uid: &str) -> kommune_core::job::Recorded {
        self.index.settled(job_uid)
    }

    /// Lets go of the in-memory attempts of `indexes`, tasks the caller found succeeded, keeping
    /// only their indexes (see `AttemptIndex::settle`); the database keeps every attempt.
    /// Returns how many attempts left memory.
    pub fn settle(&self, job_uid: &str, indexes: &[u32]) -> usize {
        self.index.settle(job_uid, indexes)
    }

    /// Drops a job's attempts from memory (it finished or was deleted); the database keeps
    /// them and [`Store::job_attempts`] reads them again if asked.
    pub fn forget_job(&self, job_uid: &str) {
        self.index.forget(job_uid);
    }

    /// Attempts placed on `node` and not finished.
    pub async fn active_on_node(&self, node: &str) -> Result<Vec<Attempt>> {
        self.select(Select::Node(node.to_string())).await
    }

    /// Every attempt not finished, on any node (to rebuild reservations after a restart or a
    /// takeover).
    pub async fn all_active(&self) -> Result<Vec<Attempt>> {
        self.select(Select::Active).await
    }

    /// Finished attempts per node that count towards reputation: (node, succeeded, failed or
    /// lost). Cancelled attempts do not count.
    pub async fn outcomes_by_node(&self) -> Result<Vec<(String, u64, u64)>> {
        self.with(|db| db.outcomes_by_node()).await
    }

    /// Records what was observed of providers' attempts (verification outcomes, lost or
    /// timed-out attempts): the history reputation is computed from. Idempotent per attempt
    /// and kind.
    pub async fn observe(&self, observations: Vec<Observation>) -> Result<()> {
        if observations.is_empty() {
            return Ok(());
        }
        self.fence.check()?;
        let epoch = self.epoch;
        self.with(move |db| db.observe(epoch, &observations)).await
    }

    /// Every observation at or after `since_ms`, oldest first (to rebuild reputations).
    pub async fn observations_since(&self, since_ms: i64) -> Result<Vec<Observation>> {
        self.with(move |db| db.observations_since(since_ms)).await
    }

    /// A node's newest `limit` observations, newest first.
    pub async fn observations_of(&self, node: &str, limit: u32) -> Result<Vec<Observation>> {
        let node = node.to_string();
        self.with(move |db| db.observations_of(&node, limit)).await
    }

    /// Notes that the attempts of a job that ended may be deleted from `prune_at_ms` on (the
    /// first note wins), or with None that the job runs again and they stay.
    pub async fn retain(&self, job_uid: &str, prune_at_ms: Option<i64>) -> Result<()> {
        self.fence.check()?;
        let (epoch, uid) = (self.epoch, job_uid.to_string());
        self.with(move |db| db.retain(epoch, &uid, prune_at_ms)).await
    }

    /// Deletes up to `limit` finished attempts of jobs whose retention has passed at `now_ms`
    /// (call again while it returns `limit`: batches keep each transaction short).
    pub async fn prune(&self, now_ms: i64, limit: u32) -> Result<u64> {
        self.fence.check()?;
        let epoch = self.epoch;
        self.with(move |db| db.prune(epoch, now_ms, limit)).await
    }

    /// Runs `hook` inside each insert's transaction just before it commits (PostgreSQL only).
    #[cfg(test)]
    async fn set_before_commit(&self, hook: Box<dyn Fn() + Send>) {
        self.with(move |db| {
            db.set_before_commit(hook);
            Ok(())
        })
        .await
        .unwrap();
    }
}

/// How queued results are committed: up to `MAX_FINISH_BATCH` in one transaction.
fn finish_batching(fence: &Fence, index: &Arc<AttemptIndex>) -> Batching<Box<dyn Db>, Finish> {
    let (fence, index) = (fence.clone(), index.clone());
    Batching { max_weight: MAX_FINISH_BATCH, weight: |_| 1, commit: Box::new(move |db, batch| commit_finishes(db.as_mut(), &fence, &index, batch)) }
}

/// The group commit: everything queued, in one transaction, then the answers.
fn commit_finishes(db: &mut dyn Db, fence: &Fence, index: &AttemptIndex, batch: Vec<Finish>) {
    let epoch = batch.first().and_then(|f| f.epoch);
    if let Err(e) = fence.check() {
        return batch.into_iter().for_each(|f| drop(f.done.send(Err(StoreError::Fenced(e.clone())))));
    }
    match db.finish_batch(epoch, &batch) {
        Ok(changed) => {
            // In memory before anyone hears of it: a sync woken by the answer sees it.
            for (f, _) in batch.iter().zip(&changed).filter(|(_, c)| **c) {
                index.finished(&f.id, f.phase, Some(&f.result), f.now_ms);
            }
            batch.into_iter().zip(changed).for_each(|(f, c)| drop(f.done.send(Ok(c))));
        }
        Err(StoreError::Fenced(e)) => batch.into_iter().for_each(|f| drop(f.done.send(Err(StoreError::Fenced(e.clone()))))),
        Err(e) => {
            let msg = e.to_string();
            batch.into_iter().for_each(|f| drop(f.done.send(Err(StoreError::Batch(msg.clone())))));
        }
    }
}

/// An attempt row as both backends read it.
type Raw = ((String, String, String, u32, u32, String, String, i64, i64, i64, Option<i64>, Option<String>), (u32, Option<i64>, Option<i64>));

fn raw_to_attempt(raw: Raw) -> Result<Attempt> {
    let ((id, job_uid, job_key, index, number, node, phase, cpu, mem, created_ms, finished_ms, result_json), (replica, ephemeral, gpu_mask)) = raw;
    let Some(phase) = AttemptPhase::parse(&phase) else {
        return Err(StoreError::Corrupt { id, phase });
    };
    // A result that no longer parses is kept as absent rather than failing the whole job.
    let result = result_json.and_then(|j| serde_json::from_str(&j).ok());
    // Both columns are written together; a row with either missing predates them.
    let held = match (ephemeral, gpu_mask) {
        (Some(e), Some(g)) => Some(Held { ephemeral_bytes: e.max(0) as u64, gpu_mask: g as u64 }),
        _ => None,
    };
    Ok(Attempt {
        id,
        job_uid,
        job_key,
        index,
        number,
        replica,
        node,
        phase,
        cpu_millis: cpu as u64,
        memory_bytes: mem as u64,
        held,
        created_ms,
        finished_ms,
        result,
    })
}
