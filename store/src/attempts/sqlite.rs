//! The embedded store backend: SQLite in `<data-dir>/kommune.db`, one file per operator. WAL and
//! synchronous=FULL, so a committed transition survives a crash or power loss.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use super::nodes::{limits_from_json, limits_to_json};
use super::observations;
use super::{Db, Finish, NodeGrant, NodeRecord, Raw, Registration, Removal, Result, Select, StoreError, raw_to_attempt};
use crate::db::epoch::{self, Guarded};
use kommune_core::attempt::{Attempt, AttemptPhase};
use kommune_core::reputation::Observation;

fn op(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { op, source }
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
    joined_ms         INTEGER NOT NULL,
    owner             TEXT,
    limits_json       TEXT,
    removed_ms        INTEGER,
    removed_reason    TEXT
);
";

const FINISH: &str = "UPDATE attempts SET phase = ?2, finished_ms = ?3, result_json = ?4 WHERE id = ?1 AND phase IN ('Assigned', 'Running')";

/// One connection to `<dir>/kommune.db`.
pub(super) struct SqliteDb {
    conn: Connection,
}

impl SqliteDb {
    /// Opens (creating if needed) `<dir>/kommune.db` and brings its schema up to date.
    pub(super) fn open(dir: &Path) -> Result<SqliteDb> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir { path: dir.display().to_string(), source })?;
        let conn =
            crate::db::sqlite::open(&dir.join("kommune.db"), &format!("{SCHEMA}{}{}", observations::SCHEMA_SQLITE, super::retention::SCHEMA), Guarded::Store)?;
        migrate(&conn)?;
        Ok(SqliteDb { conn })
    }
}

impl Db for SqliteDb {
    fn claim_epoch(&mut self, now_ms: i64) -> Result<i64> {
        Ok(epoch::sqlite::claim(&mut self.conn, Guarded::Store, now_ms)?)
    }

    fn insert(&mut self, epoch: Option<i64>, attempts: &[Attempt]) -> Result<()> {
        let tx = epoch::sqlite::begin(&mut self.conn, Guarded::Store, epoch)?;
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
        tx.commit().map_err(op("commit insert"))
    }

    fn mark_running(&mut self, epoch: Option<i64>, id: &str) -> Result<bool> {
        self.conn.pragma_update(None, "synchronous", "NORMAL").map_err(op("relax synchronous"))?;
        let changed = (|| {
            let tx = epoch::sqlite::begin(&mut self.conn, Guarded::Store, epoch)?;
            let n = tx.execute("UPDATE attempts SET phase = 'Running' WHERE id = ?1 AND phase = 'Assigned'", params![id]).map_err(op("mark running"))?;
            tx.commit().map_err(op("commit running"))?;
            Ok(n == 1)
        })();
        self.conn.pragma_update(None, "synchronous", "FULL").map_err(op("restore synchronous"))?;
        changed
    }

    fn finish(&mut self, epoch: Option<i64>, id: &str, phase: AttemptPhase, json: Option<&str>, now_ms: i64) -> Result<Option<Attempt>> {
        let tx = epoch::sqlite::begin(&mut self.conn, Guarded::Store, epoch)?;
        if tx.execute(FINISH, params![id, phase.as_str(), now_ms, json]).map_err(op("finish attempt"))? == 0 {
            return Ok(None);
        }
        let done = query(&tx, &Select::Id(id.to_string()))?.pop();
        tx.commit().map_err(op("commit finish"))?;
        Ok(done)
    }

    fn finish_batch(&mut self, epoch: Option<i64>, batch: &[Finish]) -> Result<Vec<bool>> {
        let tx = epoch::sqlite::begin(&mut self.conn, Guarded::Store, epoch)?;
        let mut changed = Vec::with_capacity(batch.len());
        {
            let mut stmt = tx.prepare_cached(FINISH).map_err(op("prepare finish"))?;
            for f in batch {
                changed.push(stmt.execute(params![f.id, f.phase.as_str(), f.now_ms, f.json]).map_err(op("finish attempt"))? == 1);
            }
        }
        tx.commit().map_err(op("commit finish batch"))?;
        Ok(changed)
    }

    fn select(&mut self, which: &Select) -> Result<Vec<Attempt>> {
        query(&self.conn, which)
    }

    fn outcomes_by_node(&mut self) -> Result<Vec<(String, u64, u64)>> {
        let mut stmt = self
            .conn
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

    fn register_node(&mut self, epoch: Option<i64>, name: &str, public_key_sha256: &str, grant: &NodeGrant, now_ms: i64) -> Result<Registration> {
        let tx = epoch::sqlite::begin(&mut self.conn, Guarded::Store, epoch)?;
        let existing = node_row(&tx, name)?;
        let registration = match existing {
            Some(NodeRecord { removed: Some((at_ms, reason)), .. }) => Registration::Retired { at_ms, reason },
            Some(r) if r.public_key_sha256 == public_key_sha256 => Registration::SameKey,
            Some(_) => Registration::Taken,
            None => {
                tx.execute(
                    "INSERT INTO nodes (name, public_key_sha256, joined_ms, owner, limits_json) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![name, public_key_sha256, now_ms, grant.owner, limits_to_json(&grant.limits)],
                )
                .map_err(op("register node"))?;
                Registration::New
            }
        };
        tx.commit().map_err(op("commit node"))?;
        Ok(registration)
    }

    fn remove_node(&mut self, epoch: Option<i64>, name: &str, removal: Removal, now_ms: i64) -> Result<bool> {
        let tx = epoch::sqlite::begin(&mut self.conn, Guarded::Store, epoch)?;
        let n = tx
            .execute("UPDATE nodes SET removed_ms = ?2, removed_reason = ?3 WHERE name = ?1 AND removed_ms IS NULL", params![name, now_ms, removal.as_str()])
            .map_err(op("retire node"))?;
        tx.commit().map_err(op("commit node removal"))?;
        Ok(n == 1)
    }

    fn node(&mut self, name: &str) -> Result<Option<NodeRecord>> {
        node_row(&self.conn, name)
    }

    fn observe(&mut self, epoch: Option<i64>, observations: &[Observation]) -> Result<()> {
        observations::sqlite::observe(&mut self.conn, epoch, observations)
    }

    fn retain(&mut self, epoch: Option<i64>, job_uid: &str, prune_at_ms: Option<i64>) -> Result<()> {
        super::retention::sqlite::retain(&mut self.conn, epoch, job_uid, prune_at_ms)
    }

    fn prune(&mut self, epoch: Option<i64>, now_ms: i64, limit: u32) -> Result<u64> {
        super::retention::sqlite::prune(&mut self.conn, epoch, now_ms, limit)
    }

    fn observations_since(&mut self, since_ms: i64) -> Result<Vec<Observation>> {
        observations::sqlite::since(&self.conn, since_ms)
    }

    fn observations_of(&mut self, node: &str, limit: u32) -> Result<Vec<Observation>> {
        observations::sqlite::of(&self.conn, node, limit)
    }
}

fn node_row(conn: &Connection, name: &str) -> Result<Option<NodeRecord>> {
    conn.query_row("SELECT public_key_sha256, joined_ms, owner, limits_json, removed_ms, removed_reason FROM nodes WHERE name = ?1", params![name], |r| {
        let removed = match (r.get::<_, Option<i64>>(4)?, r.get::<_, Option<String>>(5)?) {
            (Some(at), reason) => Some((at, Removal::parse(reason.as_deref().unwrap_or_default()))),
            (None, _) => None,
        };
        Ok(NodeRecord { public_key_sha256: r.get(0)?, joined_ms: r.get(1)?, owner: r.get(2)?, limits: limits_from_json(r.get(3)?), removed })
    })
    .optional()
    .map_err(op("look up node"))
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
    // Nodes registered before owners, limits and tombstones have them NULL: no owner recorded
    // (the fleet falls back to the node's name), no limits, registered.
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('nodes')").map_err(op("read node columns"))?;
    let columns: Vec<String> =
        stmt.query_map([], |r| r.get(0)).map_err(op("read node columns"))?.collect::<rusqlite::Result<_>>().map_err(op("read node columns"))?;
    for column in ["owner", "limits_json", "removed_reason"] {
        if !columns.iter().any(|c| c == column) {
            conn.execute_batch(&format!("ALTER TABLE nodes ADD COLUMN {column} TEXT")).map_err(op("add node column"))?;
        }
    }
    if !columns.iter().any(|c| c == "removed_ms") {
        conn.execute_batch("ALTER TABLE nodes ADD COLUMN removed_ms INTEGER").map_err(op("add node column"))?;
    }
    Ok(())
}

const COLUMNS: &str = "SELECT id, job_uid, job_key, task_index, number, node, phase, cpu_millis, memory_bytes, created_ms, finished_ms, result_json, replica, \
     ephemeral_bytes, gpu_mask FROM attempts ";

fn query(conn: &Connection, which: &Select) -> Result<Vec<Attempt>> {
    let (filter, arg) = match which {
        Select::Id(id) => ("WHERE id = ?1", Some(id.as_str())),
        Select::Job(uid) => ("WHERE job_uid = ?1 ORDER BY task_index, number, replica", Some(uid.as_str())),
        Select::Node(node) => ("WHERE node = ?1 AND phase IN ('Assigned', 'Running') ORDER BY id", Some(node.as_str())),
        Select::Active => ("WHERE phase IN ('Assigned', 'Running') ORDER BY id", None),
    };
    let mut stmt = conn.prepare_cached(&format!("{COLUMNS}{filter}")).map_err(op("prepare query"))?;
    let rows = match arg {
        Some(arg) => stmt.query_map(params![arg], row_to_raw),
        None => stmt.query_map([], row_to_raw),
    }
    .map_err(op("query attempts"))?;
    let mut out = vec![];
    for row in rows {
        out.push(raw_to_attempt(row.map_err(op("read attempt"))?)?);
    }
    Ok(out)
}

fn row_to_raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<Raw> {
    Ok((
        (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?, r.get(10)?, r.get(11)?),
        (r.get(12)?, r.get(13)?, r.get(14)?),
    ))
}
