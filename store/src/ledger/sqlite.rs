//! The embedded ledger backend: `<data dir>/ledger.db`, SQLite in WAL mode with
//! synchronous=FULL, so a committed batch survives a crash or power loss. No setup.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::LedgerError;
use super::backend::{Backend, EntryFilter, Existing, JobUsage, RejectedReceipt, from_db, to_db};
use super::row::{
    ENTRY_COLUMNS, REJECTED_COLUMNS, RowReader, Value, entry_column_list, entry_from_row, entry_values, job_usage_from_row, job_usage_select,
    rejected_from_row, rejected_values,
};
use crate::db::epoch::{self, Guarded};
use kommune_core::pricing::Micros;
use kommune_ledger::entry::{Entry, NodeTotal};
use kommune_ledger::verify::BadEntry;
use rusqlite::types::{ToSql, ToSqlOutput};

fn op(op: &'static str) -> impl FnOnce(rusqlite::Error) -> LedgerError {
    move |source| LedgerError::Sqlite { op, source }
}

/// Table and index definitions. Receipt uniqueness is enforced here too, not only by the
/// writer: (node, epoch, sequence) and attempt id are unique among receipts, forever.
pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ledger_entries (
    seq                  INTEGER PRIMARY KEY,
    kind                 INTEGER NOT NULL,
    recorded_ms          INTEGER NOT NULL,
    node                 TEXT NOT NULL,
    epoch                INTEGER NOT NULL,
    sequence             INTEGER NOT NULL,
    attempt_id           TEXT NOT NULL,
    job_uid              TEXT NOT NULL,
    job_key              TEXT NOT NULL,
    body                 BLOB NOT NULL,
    signature            BLOB NOT NULL,
    public_key           BLOB NOT NULL,
    rate_cpu_core_hour   INTEGER NOT NULL,
    rate_memory_gib_hour INTEGER NOT NULL,
    rate_gpu_hour        INTEGER NOT NULL,
    rate_output_gib      INTEGER NOT NULL,
    cost                 INTEGER NOT NULL,
    wall_millis          INTEGER NOT NULL,
    cpu_micros           INTEGER NOT NULL,
    memory_peak_bytes    INTEGER NOT NULL,
    memory_mib_millis    INTEGER NOT NULL,
    wasm_fuel            INTEGER NOT NULL,
    gpu_millis           INTEGER NOT NULL,
    output_bytes         INTEGER NOT NULL,
    prev_hash            BLOB NOT NULL,
    hash                 BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS ledger_receipt_key ON ledger_entries (node, epoch, sequence) WHERE kind = 0;
CREATE UNIQUE INDEX IF NOT EXISTS ledger_receipt_attempt ON ledger_entries (attempt_id) WHERE kind = 0;
CREATE INDEX IF NOT EXISTS ledger_receipts_by_job ON ledger_entries (job_uid) WHERE kind = 0;
CREATE INDEX IF NOT EXISTS ledger_other_kinds ON ledger_entries (kind, seq) WHERE kind <> 0;
CREATE TRIGGER IF NOT EXISTS ledger_entries_no_update BEFORE UPDATE ON ledger_entries
    BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END;
CREATE TRIGGER IF NOT EXISTS ledger_entries_no_delete BEFORE DELETE ON ledger_entries
    BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END;
CREATE TABLE IF NOT EXISTS ledger_rejected (
    id           INTEGER PRIMARY KEY,
    digest       BLOB NOT NULL UNIQUE,
    first_ms     INTEGER NOT NULL,
    last_ms      INTEGER NOT NULL,
    times        INTEGER NOT NULL,
    session_node TEXT NOT NULL,
    node         TEXT NOT NULL,
    epoch        INTEGER NOT NULL,
    sequence     INTEGER NOT NULL,
    attempt_id   TEXT NOT NULL,
    body         BLOB NOT NULL,
    signature    BLOB NOT NULL,
    reason       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_rejected_by_node ON ledger_rejected (session_node, id);
";

/// The SQLite backend: one connection.
pub struct SqliteBackend {
    conn: Connection,
}

impl SqliteBackend {
    /// Opens (creating if needed) `<dir>/ledger.db`.
    pub fn open(dir: &Path) -> Result<SqliteBackend, LedgerError> {
        std::fs::create_dir_all(dir).map_err(|source| LedgerError::Dir { path: dir.display().to_string(), source })?;
        let conn = crate::db::sqlite::open(&dir.join("ledger.db"), SCHEMA, Guarded::Ledger)?;
        Ok(SqliteBackend { conn })
    }

    /// The underlying connection (tests tamper with rows through it).
    #[cfg(test)]
    pub(crate) fn connection(&self) -> &Connection {
        &self.conn
    }
}

fn text(r: &Row<'_>, i: usize) -> rusqlite::Result<String> {
    // Read as bytes: a damaged (non-UTF-8) name must still read, and then fail its hash.
    Ok(String::from_utf8_lossy(r.get_ref(i)?.as_bytes_or_null()?.unwrap_or_default()).into_owned())
}

fn blob(r: &Row<'_>, i: usize) -> rusqlite::Result<Vec<u8>> {
    Ok(r.get_ref(i)?.as_bytes_or_null()?.unwrap_or_default().to_vec())
}

fn u(r: &Row<'_>, i: usize) -> rusqlite::Result<u64> {
    Ok(from_db(r.get(i)?))
}

impl RowReader for Row<'_> {
    type Error = rusqlite::Error;
    fn int(&self, i: usize) -> rusqlite::Result<i64> {
        self.get(i)
    }
    fn text(&self, i: usize) -> rusqlite::Result<String> {
        text(self, i)
    }
    fn bytes(&self, i: usize) -> rusqlite::Result<Vec<u8>> {
        blob(self, i)
    }
}

impl ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match *self {
            Value::Int(v) => ToSqlOutput::from(v),
            Value::Text(v) => ToSqlOutput::from(v),
            Value::Bytes(v) => ToSqlOutput::from(v),
        })
    }
}

impl Backend for SqliteBackend {
    fn append(&mut self, entries: &[Entry], rejected: &[RejectedReceipt], epoch: Option<u64>) -> Result<(), LedgerError> {
        let tx = epoch::sqlite::begin(&mut self.conn, Guarded::Ledger, epoch.map(to_db))?;
        {
            let placeholders = (1..=ENTRY_COLUMNS.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
            let mut ins = tx
                .prepare_cached(&format!("INSERT INTO ledger_entries ({}) VALUES ({placeholders})", entry_column_list()))
                .map_err(op("prepare entry insert"))?;
            for e in entries {
                ins.execute(rusqlite::params_from_iter(entry_values(e))).map_err(op("insert ledger entry"))?;
            }
            let mut rej = tx
                .prepare_cached(&format!(
                    "INSERT INTO ledger_rejected ({REJECTED_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                     ON CONFLICT (digest) DO UPDATE SET times = times + excluded.times, last_ms = max(last_ms, excluded.last_ms)"
                ))
                .map_err(op("prepare rejected insert"))?;
            for r in rejected {
                rej.execute(rusqlite::params_from_iter(rejected_values(r))).map_err(op("insert rejected receipt"))?;
            }
        }
        tx.commit().map_err(op("commit append"))
    }

    fn claim_epoch(&mut self, now_ms: i64) -> Result<u64, LedgerError> {
        Ok(from_db(epoch::sqlite::claim(&mut self.conn, Guarded::Ledger, now_ms)?))
    }

    fn lookup_receipts(&mut self, keys: &[(&str, u64, u64)]) -> Result<Vec<Option<Existing>>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, body, cost FROM ledger_entries WHERE kind = 0 AND node = ?1 AND epoch = ?2 AND sequence = ?3")
            .map_err(op("prepare receipt lookup"))?;
        keys.iter()
            .map(|(node, epoch, sequence)| {
                stmt.query_row(params![node, to_db(*epoch), to_db(*sequence)], |r| Ok(Existing { seq: u(r, 0)?, body: blob(r, 1)?, cost: Micros(u(r, 2)?) }))
                    .optional()
                    .map_err(op("look up receipt"))
            })
            .collect()
    }

    fn lookup_attempts(&mut self, ids: &[&str]) -> Result<Vec<Option<u64>>, LedgerError> {
        let mut stmt = self.conn.prepare_cached("SELECT seq FROM ledger_entries WHERE kind = 0 AND attempt_id = ?1").map_err(op("prepare attempt lookup"))?;
        ids.iter().map(|id| stmt.query_row(params![id], |r| u(r, 0)).optional().map_err(op("look up attempt"))).collect()
    }

    fn head(&mut self) -> Result<Option<(u64, Vec<u8>)>, LedgerError> {
        self.conn
            .query_row("SELECT seq, hash FROM ledger_entries ORDER BY seq DESC LIMIT 1", [], |r| Ok((u(r, 0)?, blob(r, 1)?)))
            .optional()
            .map_err(op("read head"))
    }

    fn last_checkpoint(&mut self) -> Result<u64, LedgerError> {
        self.conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM ledger_entries WHERE kind = 1", [], |r| u(r, 0)).map_err(op("read last checkpoint"))
    }

    fn node_totals(&mut self) -> Result<BTreeMap<String, NodeTotal>, LedgerError> {
        let mut stmt =
            self.conn.prepare("SELECT node, SUM(cost), COUNT(*) FROM ledger_entries WHERE kind = 0 GROUP BY node").map_err(op("prepare node totals"))?;
        let rows = stmt.query_map([], |r| Ok((text(r, 0)?, NodeTotal { total: Micros(u(r, 1)?), receipts: u(r, 2)? }))).map_err(op("read node totals"))?;
        rows.collect::<rusqlite::Result<_>>().map_err(op("read node totals"))
    }

    fn node_total(&mut self, node: &str) -> Result<NodeTotal, LedgerError> {
        self.conn
            .prepare_cached("SELECT COALESCE(SUM(cost), 0), COUNT(*) FROM ledger_entries WHERE kind = 0 AND node = ?1")
            .and_then(|mut s| s.query_row(params![node], |r| Ok(NodeTotal { total: Micros(u(r, 0)?), receipts: u(r, 1)? })))
            .map_err(op("read node total"))
    }

    fn node_keys(&mut self) -> Result<Vec<(String, Vec<u8>)>, LedgerError> {
        let mut stmt = self.conn.prepare("SELECT node, public_key FROM ledger_entries WHERE kind = 2 ORDER BY seq").map_err(op("prepare node keys"))?;
        let rows = stmt.query_map([], |r| Ok((text(r, 0)?, blob(r, 1)?))).map_err(op("read node keys"))?;
        rows.collect::<rusqlite::Result<_>>().map_err(op("read node keys"))
    }

    fn job_usage(&mut self, job_uid: &str) -> Result<JobUsage, LedgerError> {
        Ok(self.job_usage_with_head(job_uid)?.map(|(u, _)| u).unwrap_or_default())
    }

    fn job_usage_with_head(&mut self, job_uid: &str) -> Result<Option<(JobUsage, u64)>, LedgerError> {
        // One statement: the aggregate and the head come from the same snapshot.
        self.conn
            .prepare_cached(&format!(
                "SELECT {}, (SELECT COALESCE(MAX(seq), 0) FROM ledger_entries) FROM ledger_entries WHERE kind = 0 AND job_uid = ?1",
                job_usage_select(None)
            ))
            .and_then(|mut s| s.query_row(params![job_uid], |r| Ok(Some((job_usage_from_row(r)?, u(r, 9)?)))))
            .map_err(op("read job usage"))
    }

    fn rejected(&mut self, node: &str) -> Result<Vec<RejectedReceipt>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {REJECTED_COLUMNS} FROM ledger_rejected WHERE session_node = ?1 ORDER BY id"))
            .map_err(op("prepare rejected"))?;
        let rows = stmt.query_map(params![node], |r| rejected_from_row(r)).map_err(op("read rejected"))?;
        rows.collect::<rusqlite::Result<_>>().map_err(op("read rejected"))
    }

    fn for_each_entry(&mut self, filter: &EntryFilter, f: &mut dyn FnMut(Result<Entry, BadEntry>) -> bool) -> Result<(), LedgerError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {} FROM ledger_entries
                 WHERE (?1 IS NULL OR recorded_ms >= ?1) AND (?2 IS NULL OR recorded_ms < ?2) AND (?3 IS NULL OR (node = ?3 AND kind <> 1))
                 ORDER BY seq",
                entry_column_list()
            ))
            .map_err(op("prepare entry scan"))?;
        let mut rows = stmt.query(params![filter.since_ms, filter.until_ms, filter.node]).map_err(op("scan entries"))?;
        while let Some(r) = rows.next().map_err(op("scan entries"))? {
            let e = entry_from_row(r).map_err(op("read entry"))?;
            if !f(e) {
                break;
            }
        }
        Ok(())
    }
}
