//! The operator's embedded store (SQLite on the operator's volume): task attempts and the node
//! registry. Kubernetes keeps desired state and a summary; the per-task truth lives here, so the
//! hot path never writes one API object per task. Every transition is a guarded UPDATE, so
//! replays and duplicates are no-ops. Results from agents go through a group-commit writer
//! thread: every finish queued while one transaction commits goes into the next, one fsync for
//! all of them (the ledger does the same).

use std::path::Path;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use rusqlite::{Connection, OptionalExtension, params};

use crate::attempt::{Attempt, AttemptPhase, AttemptResult, Held};
use crate::attempt_index::AttemptIndex;
use crate::fence::Fence;

/// A store failure; the message names the operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {op}: {source}")]
    Sqlite { op: &'static str, source: rusqlite::Error },
    #[error("store: cannot create data directory {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error("store: attempt {id} has an unknown phase {phase:?}")]
    Corrupt { id: String, phase: String },
    #[error("store: {0}")]
    Fenced(#[from] crate::fence::Fenced),
    /// The ledger (metering) could not record a receipt or answer a query.
    #[error("{0}")]
    Ledger(String),
    /// A group commit failed; nothing of it was stored. The agent resends its result.
    #[error("store: commit of queued results failed: {0}")]
    Batch(String),
}

type Result<T> = std::result::Result<T, StoreError>;

fn op(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { op, source }
}

/// Outcome of registering a node name for a public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// The name was free and is now bound to the key.
    New,
    /// The name was already bound to this same key (a re-join).
    SameKey,
    /// The name belongs to another key.
    Taken,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS attempts (
    id            TEXT PRIMARY KEY,
    job_uid       TEXT NOT NULL,
    job_key       TEXT NOT NULL,
    task_index    INTEGER NOT NULL,
    number        INTEGER NOT NULL,
    node          TEXT NOT NULL,
    phase         TEXT NOT NULL,
    cpu_millis    INTEGER NOT NULL,
    memory_bytes  INTEGER NOT NULL,
    created_ms    INTEGER NOT NULL,
    finished_ms   INTEGER,
    result_json   TEXT,
    replica       INTEGER NOT NULL DEFAULT 0,
    ephemeral_bytes INTEGER,
    gpu_mask      INTEGER
);
CREATE INDEX IF NOT EXISTS attempts_by_job ON attempts (job_uid);
CREATE INDEX IF NOT EXISTS attempts_active_by_node ON attempts (node) WHERE phase IN ('Assigned', 'Running');
CREATE TABLE IF NOT EXISTS nodes (
    name              TEXT PRIMARY KEY,
    public_key_sha256 TEXT NOT NULL,
    joined_ms         INTEGER NOT NULL
);
";

/// The embedded SQLite store.
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    fence: Fence,
    /// The group-commit writer's queue (see [`Store::finish_batched`]).
    finishes: Mutex<Sender<Finish>>,
    /// The attempts of the jobs being synced, kept in step with every write (after it commits,
    /// with the connection unlocked: a load holds the index lock while it reads).
    index: Arc<AttemptIndex>,
}

/// A terminal transition queued for the group-commit writer.
struct Finish {
    id: String,
    phase: AttemptPhase,
    result: AttemptResult,
    json: Option<String>,
    now_ms: i64,
    done: oneshot::Sender<Result<bool>>,
}

/// Most finishes committed in one transaction.
const MAX_FINISH_BATCH: usize = 4096;

impl Store {
    /// Opens (creating if needed) `<dir>/kommune.db`, writable without leader election.
    pub fn open(dir: &Path) -> Result<Self> {
        Store::open_fenced(dir, Fence::open())
    }

    /// Opens the store so that every write first checks `fence` (leader election).
    pub fn open_fenced(dir: &Path, fence: Fence) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir { path: dir.display().to_string(), source })?;
        let conn = Connection::open(dir.join("kommune.db")).map_err(op("open"))?;
        // WAL + synchronous=FULL: a committed transition survives a crash or power loss.
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(op("set busy timeout"))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(op("enable WAL"))?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(op("set synchronous"))?;
        conn.execute_batch(SCHEMA).map_err(op("create schema"))?;
        migrate(&conn)?;
        let conn = Arc::new(Mutex::new(conn));
        let (tx, rx) = channel();
        let index = Arc::new(AttemptIndex::default());
        let (writer_conn, writer_fence, writer_index) = (conn.clone(), fence.clone(), index.clone());
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || commit_finishes(&writer_conn, &writer_fence, &writer_index, rx))
            .map_err(|source| StoreError::Dir { path: dir.display().to_string(), source })?;
        Ok(Store { conn, fence, finishes: Mutex::new(tx), index })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll
        // back), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records new attempts in one transaction. Re-inserting an existing id is a no-op.
    pub fn insert_attempts(&self, attempts: &[Attempt]) -> Result<()> {
        self.fence.check()?;
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(op("begin insert"))?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO attempts (id, job_uid, job_key, task_index, number, node, phase, cpu_millis, memory_bytes, created_ms, replica, ephemeral_bytes, gpu_mask)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                )
                .map_err(op("prepare insert"))?;
            for a in attempts {
                stmt.execute(params![
                    a.id,
                    a.job_uid,
                    a.job_key,
                    a.index,
                    a.number,
                    a.node,
                    a.phase.as_str(),
                    a.cpu_millis as i64,
                    a.memory_bytes as i64,
                    a.created_ms,
                    a.replica,
                    a.held.map(|h| h.ephemeral_bytes as i64),
                    // The mask's bits as they are: SQLite integers are signed.
                    a.held.map(|h| h.gpu_mask as i64)
                ])
                .map_err(op("insert attempt"))?;
            }
        }
        tx.commit().map_err(op("commit insert"))?;
        drop(conn);
        self.index.inserted(attempts);
        Ok(())
    }

    /// Marks an Assigned attempt Running. Returns false when it was not Assigned (a duplicate
    /// or late message).
    ///
    /// Committed without an fsync (synchronous=NORMAL; the next FULL commit makes it durable):
    /// losing it in a crash is harmless, as Assigned and Running are both active and the
    /// agent's next Hello reconciles them, and it keeps an fsync off every task's path.
    pub fn mark_running(&self, id: &str) -> Result<bool> {
        self.fence.check()?;
        let conn = self.conn();
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(op("relax synchronous"))?;
        let n = conn.execute("UPDATE attempts SET phase = 'Running' WHERE id = ?1 AND phase = 'Assigned'", params![id]).map_err(op("mark running"));
        conn.pragma_update(None, "synchronous", "FULL").map_err(op("restore synchronous"))?;
        drop(conn);
        let changed = n? == 1;
        if changed {
            self.index.running(id);
        }
        Ok(changed)
    }

    /// Like [`Store::finish`], for results from agents: queued for the writer thread, which
    /// commits everything queued in one transaction (one fsync for the batch), and awaited
    /// without blocking the caller's thread. Resolves once the transition is durable; returns
    /// whether the attempt changed (false when it was already terminal or does not exist).
    pub async fn finish_batched(&self, id: &str, phase: AttemptPhase, result: &AttemptResult, now_ms: i64) -> Result<bool> {
        debug_assert!(phase.is_terminal());
        self.fence.check()?;
        let json = Some(serde_json::to_string(result).expect("a result always serialises"));
        let (done, durable) = oneshot::channel();
        let closed = || StoreError::Batch("the store's writer thread has stopped; restart the operator".into());
        let finish = Finish { id: id.to_string(), phase, result: result.clone(), json, now_ms, done };
        self.finishes.lock().unwrap_or_else(|p| p.into_inner()).send(finish).map_err(|_| closed())?;
        durable.await.map_err(|_| closed())?
    }

    /// Moves an active attempt to a terminal phase. Returns the updated attempt, or None when
    /// it does not exist or was already terminal: finishing twice is a no-op.
    pub fn finish(&self, id: &str, phase: AttemptPhase, result: Option<&AttemptResult>, now_ms: i64) -> Result<Option<Attempt>> {
        debug_assert!(phase.is_terminal());
        self.fence.check()?;
        let json = result.map(|r| serde_json::to_string(r).expect("a result always serialises"));
        let conn = self.conn();
        let n = conn
            .execute(
                "UPDATE attempts SET phase = ?2, finished_ms = ?3, result_json = ?4 WHERE id = ?1 AND phase IN ('Assigned', 'Running')",
                params![id, phase.as_str(), now_ms, json],
            )
            .map_err(op("finish attempt"))?;
        if n == 0 {
            return Ok(None);
        }
        let done = query_one(&conn, id)?;
        drop(conn);
        self.index.finished(id, phase, result, now_ms);
        Ok(done)
    }

    /// One attempt by id.
    pub fn attempt(&self, id: &str) -> Result<Option<Attempt>> {
        query_one(&self.conn(), id)
    }

    /// Every attempt of a job, read from the database.
    pub fn attempts_for_job(&self, job_uid: &str) -> Result<Vec<Attempt>> {
        query(&self.conn(), "WHERE job_uid = ?1 ORDER BY task_index, number, replica", params![job_uid])
    }

    /// Every attempt of a job, in the same order, from memory: read from the database once,
    /// then kept in step with every write. What the sync loop reads.
    pub fn job_attempts(&self, job_uid: &str) -> Result<Vec<Arc<Attempt>>> {
        self.index.job(job_uid, || self.attempts_for_job(job_uid))
    }

    /// Drops a job's attempts from memory (it finished or was deleted); the database keeps
    /// them and [`Store::job_attempts`] reads them again if asked.
    pub fn forget_job(&self, job_uid: &str) {
        self.index.forget(job_uid);
    }

    /// Attempts placed on `node` and not finished.
    pub fn active_on_node(&self, node: &str) -> Result<Vec<Attempt>> {
        query(&self.conn(), "WHERE node = ?1 AND phase IN ('Assigned', 'Running') ORDER BY id", params![node])
    }

    /// Every attempt not finished, on any node (to rebuild reservations after a restart).
    pub fn all_active(&self) -> Result<Vec<Attempt>> {
        query(&self.conn(), "WHERE phase IN ('Assigned', 'Running') ORDER BY id", params![])
    }

    /// Finished attempts per node that count towards reputation: (node, succeeded, failed or
    /// lost). Cancelled attempts do not count.
    pub fn outcomes_by_node(&self) -> Result<Vec<(String, u64, u64)>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT node, SUM(phase = 'Succeeded'), SUM(phase IN ('Failed', 'Lost')) FROM attempts
                 WHERE phase IN ('Succeeded', 'Failed', 'Lost') GROUP BY node ORDER BY node",
            )
            .map_err(op("prepare outcomes"))?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))).map_err(op("query outcomes"))?;
        let mut out = vec![];
        for row in rows {
            let (node, ok, bad) = row.map_err(op("read outcomes"))?;
            out.push((node, ok.max(0) as u64, bad.max(0) as u64));
        }
        Ok(out)
    }

    /// Binds `name` to a node key, or reports that it is bound to another one.
    pub fn register_node(&self, name: &str, public_key_sha256: &str, now_ms: i64) -> Result<Registration> {
        self.fence.check()?;
        let conn = self.conn();
        let existing: Option<String> =
            conn.query_row("SELECT public_key_sha256 FROM nodes WHERE name = ?1", params![name], |r| r.get(0)).optional().map_err(op("look up node"))?;
        match existing {
            Some(k) if k == public_key_sha256 => Ok(Registration::SameKey),
            Some(_) => Ok(Registration::Taken),
            None => {
                conn.execute("INSERT INTO nodes (name, public_key_sha256, joined_ms) VALUES (?1, ?2, ?3)", params![name, public_key_sha256, now_ms])
                    .map_err(op("register node"))?;
                Ok(Registration::New)
            }
        }
    }

    /// Forgets a node's registration: its certificate no longer opens sessions. Returns whether
    /// it was registered.
    pub fn remove_node(&self, name: &str) -> Result<bool> {
        self.fence.check()?;
        Ok(self.conn().execute("DELETE FROM nodes WHERE name = ?1", params![name]).map_err(op("remove node"))? == 1)
    }

    /// The key hash a node name is bound to.
    pub fn node_key(&self, name: &str) -> Result<Option<String>> {
        self.conn().query_row("SELECT public_key_sha256 FROM nodes WHERE name = ?1", params![name], |r| r.get(0)).optional().map_err(op("look up node"))
    }
}

/// Brings a `kommune.db` written by an older operator up to the current columns. `CREATE
/// TABLE IF NOT EXISTS` leaves an existing table as it was, so each column added since is
/// added here when missing: existing attempts become replica 0, and their disk and GPUs stay
/// unknown (NULL) rather than a wrong zero.
fn migrate(conn: &Connection) -> Result<()> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('attempts')").map_err(op("read attempt columns"))?;
    let columns: Vec<String> =
        stmt.query_map([], |r| r.get(0)).map_err(op("read attempt columns"))?.collect::<rusqlite::Result<_>>().map_err(op("read attempt columns"))?;
    for (column, definition) in [("replica", "INTEGER NOT NULL DEFAULT 0"), ("ephemeral_bytes", "INTEGER"), ("gpu_mask", "INTEGER")] {
        if !columns.iter().any(|c| c == column) {
            conn.execute_batch(&format!("ALTER TABLE attempts ADD COLUMN {column} {definition}")).map_err(op("add attempt column"))?;
        }
    }
    Ok(())
}

/// The group-commit writer: takes everything queued, commits it in one transaction, answers.
fn commit_finishes(conn: &Mutex<Connection>, fence: &Fence, index: &AttemptIndex, rx: Receiver<Finish>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_FINISH_BATCH {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        if let Err(e) = fence.check() {
            batch.into_iter().for_each(|f| drop(f.done.send(Err(StoreError::Fenced(e.clone())))));
            continue;
        }
        let changed = {
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            commit_batch(&mut conn, &batch)
        };
        match changed {
            Ok(changed) => {
                // In memory before anyone hears of it: a sync woken by the answer sees it.
                for (f, _) in batch.iter().zip(&changed).filter(|(_, c)| **c) {
                    index.finished(&f.id, f.phase, Some(&f.result), f.now_ms);
                }
                batch.into_iter().zip(changed).for_each(|(f, c)| drop(f.done.send(Ok(c))));
            }
            Err(e) => {
                let msg = e.to_string();
                batch.into_iter().for_each(|f| drop(f.done.send(Err(StoreError::Batch(msg.clone())))));
            }
        }
    }
}

fn commit_batch(conn: &mut Connection, batch: &[Finish]) -> Result<Vec<bool>> {
    let tx = conn.transaction().map_err(op("begin finish batch"))?;
    let mut changed = Vec::with_capacity(batch.len());
    {
        let mut stmt = tx
            .prepare_cached("UPDATE attempts SET phase = ?2, finished_ms = ?3, result_json = ?4 WHERE id = ?1 AND phase IN ('Assigned', 'Running')")
            .map_err(op("prepare finish"))?;
        for f in batch {
            changed.push(stmt.execute(params![f.id, f.phase.as_str(), f.now_ms, f.json]).map_err(op("finish attempt"))? == 1);
        }
    }
    tx.commit().map_err(op("commit finish batch"))?;
    Ok(changed)
}

const COLUMNS: &str = "SELECT id, job_uid, job_key, task_index, number, node, phase, cpu_millis, memory_bytes, created_ms, finished_ms, result_json, replica, \
     ephemeral_bytes, gpu_mask FROM attempts ";

fn query(conn: &Connection, filter: &str, params: impl rusqlite::Params) -> Result<Vec<Attempt>> {
    let mut stmt = conn.prepare_cached(&format!("{COLUMNS}{filter}")).map_err(op("prepare query"))?;
    let rows = stmt.query_map(params, row_to_raw).map_err(op("query attempts"))?;
    let mut out = vec![];
    for row in rows {
        out.push(raw_to_attempt(row.map_err(op("read attempt"))?)?);
    }
    Ok(out)
}

fn query_one(conn: &Connection, id: &str) -> Result<Option<Attempt>> {
    Ok(query(conn, "WHERE id = ?1", params![id])?.pop())
}

type Raw = ((String, String, String, u32, u32, String, String, i64, i64, i64, Option<i64>, Option<String>), (u32, Option<i64>, Option<i64>));

fn row_to_raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<Raw> {
    Ok((
        (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?, r.get(10)?, r.get(11)?),
        (r.get(12)?, r.get(13)?, r.get(14)?),
    ))
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attempt::attempt_id;

    fn attempt(index: u32, node: &str) -> Attempt {
        Attempt {
            id: attempt_id("uid", index, 1),
            job_uid: "uid".into(),
            job_key: "ns/j".into(),
            index,
            number: 1,
            replica: 0,
            node: node.into(),
            phase: AttemptPhase::Assigned,
            cpu_millis: 250,
            memory_bytes: 1 << 20,
            held: Some(Held::default()),
            created_ms: 5,
            finished_ms: None,
            result: None,
        }
    }

    #[test]
    fn attempts_survive_reopen_and_transitions_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let result = AttemptResult { exit_code: 0, output_sha256: "ab".into(), stdout_tail: b"hi".to_vec(), ..Default::default() };
        {
            let store = Store::open(dir.path()).unwrap();
            store.insert_attempts(&[attempt(0, "a"), attempt(1, "b")]).unwrap();
            store.insert_attempts(&[attempt(0, "a")]).unwrap();
            assert!(store.mark_running(&attempt_id("uid", 0, 1)).unwrap());
            assert!(!store.mark_running(&attempt_id("uid", 0, 1)).unwrap());
            let done = store.finish(&attempt_id("uid", 0, 1), AttemptPhase::Succeeded, Some(&result), 9).unwrap().unwrap();
            assert_eq!(done.phase, AttemptPhase::Succeeded);
            assert_eq!(done.result.as_ref(), Some(&result));
            assert_eq!(store.finish(&attempt_id("uid", 0, 1), AttemptPhase::Failed, None, 10).unwrap(), None);
            assert!(!store.mark_running(&attempt_id("uid", 0, 1)).unwrap());
            assert_eq!(store.finish("nope", AttemptPhase::Failed, None, 10).unwrap(), None);
        }
        let store = Store::open(dir.path()).unwrap();
        let all = store.attempts_for_job("uid").unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].phase, AttemptPhase::Succeeded);
        assert_eq!(all[0].finished_ms, Some(9));
        assert_eq!(all[0].result.as_ref().unwrap().stdout_tail, b"hi");
        assert_eq!(store.active_on_node("b").unwrap().len(), 1);
        assert!(store.active_on_node("a").unwrap().is_empty());
        assert_eq!(store.all_active().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn batched_finishes_commit_together_and_a_second_finish_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ok = AttemptResult { exit_code: 0, stdout_tail: b"ok".to_vec(), ..Default::default() };
        {
            let store = Store::open(dir.path()).unwrap();
            store.insert_attempts(&(0..50).map(|i| attempt(i, "a")).collect::<Vec<_>>()).unwrap();
            assert!(store.mark_running(&attempt_id("uid", 0, 1)).unwrap());
            let finishes = (0..50).map(|i| {
                let (store, ok, id) = (&store, &ok, attempt_id("uid", i, 1));
                async move { store.finish_batched(&id, AttemptPhase::Succeeded, ok, 7).await.unwrap() }
            });
            assert!(futures::future::join_all(finishes).await.into_iter().all(|changed| changed));
            assert!(!store.finish_batched(&attempt_id("uid", 3, 1), AttemptPhase::Failed, &ok, 8).await.unwrap());
            assert!(!store.finish_batched("nope", AttemptPhase::Failed, &ok, 8).await.unwrap());
        }
        let store = Store::open(dir.path()).unwrap();
        let all = store.attempts_for_job("uid").unwrap();
        assert!(all.iter().all(|a| a.phase == AttemptPhase::Succeeded && a.finished_ms == Some(7) && a.result.as_ref() == Some(&ok)));
        assert!(store.all_active().unwrap().is_empty());
    }

    #[test]
    fn a_fenced_store_refuses_every_write_and_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let fence = Fence::closed();
        let store = Store::open_fenced(dir.path(), fence.clone()).unwrap();
        fence.extend(std::time::Instant::now() + std::time::Duration::from_secs(60));
        store.insert_attempts(&[attempt(0, "a")]).unwrap();
        fence.close();
        let id = attempt_id("uid", 0, 1);
        assert!(matches!(store.insert_attempts(&[attempt(1, "a")]), Err(StoreError::Fenced(_))));
        assert!(matches!(store.mark_running(&id), Err(StoreError::Fenced(_))));
        assert!(matches!(store.finish(&id, AttemptPhase::Failed, None, 1), Err(StoreError::Fenced(_))));
        let batched = tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(store.finish_batched(
            &id,
            AttemptPhase::Failed,
            &AttemptResult::default(),
            1,
        ));
        assert!(matches!(batched, Err(StoreError::Fenced(_))));
        assert!(matches!(store.register_node("n", "k", 1), Err(StoreError::Fenced(_))));
        assert!(matches!(store.remove_node("n"), Err(StoreError::Fenced(_))));
        assert_eq!(store.attempts_for_job("uid").unwrap().len(), 1, "reads still work, nothing changed");
        assert_eq!(store.attempt(&id).unwrap().unwrap().phase, AttemptPhase::Assigned);
    }

    #[test]
    fn replicas_and_held_disk_and_gpus_survive_reopen_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let held = Held { ephemeral_bytes: 10 << 30, gpu_mask: 1 << 63 | 0b101 };
        let copy = Attempt { id: crate::attempt::replica_attempt_id("uid", 0, 1, 2), replica: 2, held: Some(held), ..attempt(0, "b") };
        Store::open(dir.path()).unwrap().insert_attempts(&[attempt(0, "a"), copy.clone()]).unwrap();
        let store = Store::open(dir.path()).unwrap();
        let all = store.attempts_for_job("uid").unwrap();
        assert_eq!(all, vec![attempt(0, "a"), copy.clone()], "ordered by index, number, replica");
        assert_eq!(store.all_active().unwrap()[1].held, Some(held));
    }

    #[test]
    fn a_store_written_by_an_older_operator_gains_the_new_columns_and_keeps_its_attempts() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join("kommune.db")).unwrap();
            conn.execute_batch(
                "CREATE TABLE attempts (id TEXT PRIMARY KEY, job_uid TEXT NOT NULL, job_key TEXT NOT NULL, task_index INTEGER NOT NULL,
                 number INTEGER NOT NULL, node TEXT NOT NULL, phase TEXT NOT NULL, cpu_millis INTEGER NOT NULL, memory_bytes INTEGER NOT NULL,
                 created_ms INTEGER NOT NULL, finished_ms INTEGER, result_json TEXT);
                 INSERT INTO attempts (id, job_uid, job_key, task_index, number, node, phase, cpu_millis, memory_bytes, created_ms)
                 VALUES ('uid.0.1', 'uid', 'ns/j', 0, 1, 'a', 'Running', 250, 1048576, 5);",
            )
            .unwrap();
        }
        for _ in 0..2 {
            // Opening twice: the migration runs once and is a no-op after.
            let store = Store::open(dir.path()).unwrap();
            let old = store.attempt("uid.0.1").unwrap().unwrap();
            assert_eq!((old.replica, old.held, old.phase), (0, None, AttemptPhase::Running), "disk and GPUs of old rows are unknown, not zero");
        }
        let store = Store::open(dir.path()).unwrap();
        store.insert_attempts(&[attempt(1, "b")]).unwrap();
        assert_eq!(store.attempts_for_job("uid").unwrap().len(), 2);
        assert_eq!(store.attempt(&attempt_id("uid", 1, 1)).unwrap().unwrap().held, Some(Held::default()));
    }

    #[test]
    fn node_names_are_bound_to_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.register_node("n1", "k1", 1).unwrap(), Registration::New);
        assert_eq!(store.register_node("n1", "k1", 2).unwrap(), Registration::SameKey);
        assert_eq!(store.register_node("n1", "k2", 3).unwrap(), Registration::Taken);
        assert_eq!(store.node_key("n1").unwrap().as_deref(), Some("k1"));
        assert_eq!(store.node_key("n2").unwrap(), None);
        assert!(store.remove_node("n1").unwrap());
        assert!(!store.remove_node("n1").unwrap());
        assert_eq!(store.register_node("n1", "k2", 4).unwrap(), Registration::New);
    }
}
