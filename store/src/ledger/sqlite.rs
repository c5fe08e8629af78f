//! The embedded ledger backend: `<data dir>/ledger.db`, SQLite in WAL mode with
//! synchronous=FULL, so a committed batch survives a crash or power loss. No setup.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::LedgerError;
use super::aggregate::{JOB_USAGE, NODE_TOTAL, aggregate_select, aggregate_width, job_usage_from_row, node_total_from_row};
use super::backend::{Backend, EntryFilter, Existing, JobUsage, PerNode, RejectedCount, RejectedReceipt, from_db, to_db};
use super::row::{
    ENTRY_COLUMNS, REJECTED_COLUMNS, RowReader, Value, entry_column_list, entry_from_row, entry_values, hash32, rejected_from_row, rejected_values,
};
use crate::db::epoch::{self, Guarded};
use kommune_core::pricing::Micros;
use kommune_ledger::entry::{Entry, NodeTotal};
use kommune_ledger::records::{REJECTED_BODY_PREFIX, REJECTED_KEPT_PER_NODE, REJECTED_NAME_MAX, REJECTED_REASON_MAX};
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
    id              INTEGER PRIMARY KEY,
    digest          BLOB NOT NULL UNIQUE,
    first_ms        INTEGER NOT NULL,
    last_ms         INTEGER NOT NULL,
    times           INTEGER NOT NULL,
    session_node    TEXT NOT NULL,
    node            TEXT NOT NULL,
    epoch           INTEGER NOT NULL,
    sequence        INTEGER NOT NULL,
    attempt_id      TEXT NOT NULL,
    body_bytes      INTEGER NOT NULL,
    signature_bytes INTEGER NOT NULL,
    body_prefix     BLOB NOT NULL,
    reason          TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_rejected_by_node ON ledger_rejected (session_node, id);
CREATE TABLE IF NOT EXISTS ledger_rejected_counts (
    session_node  TEXT PRIMARY KEY,
    received      INTEGER NOT NULL,
    distinct_rows INTEGER NOT NULL,
    evicted       INTEGER NOT NULL
);
";

/// The SQLite backend: one connection.
pub struct SqliteBackend {
    conn: Connection,
}

impl SqliteBackend {
    /// Opens (creating if needed) `<dir>/ledger.db`.
    pub fn open(dir: &Path) -> Result<SqliteBackend, LedgerError> {
        std::fs::create_dir_all(dir).map_err(|source| LedgerError::Dir { path: dir.display().to_string(), source })?;
        let mut conn = crate::db::sqlite::open(&dir.join("ledger.db"), SCHEMA, Guarded::Ledger)?;
        migrate(&mut conn)?;
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
        }
        if !rejected.is_empty() {
            append_rejected(&tx, rejected)?;
        }
        tx.commit().map_err(op("commit append"))
    }

    fn claim_epoch(&mut self, now_ms: i64) -> Result<u64, LedgerError> {
        Ok(from_db(epoch::sqlite::claim(&mut self.conn, Guarded::Ledger, now_ms)?))
    }

    fn lookup_receipts(&mut self, keys: &[(&str, u64, u64)]) -> Result<Vec<Option<Existing>>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, body, cost, hash FROM ledger_entries WHERE kind = 0 AND node = ?1 AND epoch = ?2 AND sequence = ?3")
            .map_err(op("prepare receipt lookup"))?;
        keys.iter()
            .map(|(node, epoch, sequence)| {
                stmt.query_row(params![node, to_db(*epoch), to_db(*sequence)], |r| {
                    Ok(Existing { seq: u(r, 0)?, body: blob(r, 1)?, cost: Micros(u(r, 2)?), hash: hash32(blob(r, 3)?) })
                })
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
        let sql = format!("SELECT node, {} FROM ledger_entries WHERE kind = 0 GROUP BY node", aggregate_select(&NODE_TOTAL, None));
        let mut stmt = self.conn.prepare(&sql).map_err(op("prepare node totals"))?;
        let rows = stmt.query_map([], |r| Ok((text(r, 0)?, node_total_from_row(r, 1)?))).map_err(op("read node totals"))?;
        rows.collect::<rusqlite::Result<_>>().map_err(op("read node totals"))
    }

    fn node_total(&mut self, node: &str, key: Option<&[u8; 32]>) -> Result<NodeTotal, LedgerError> {
        let sql =
            format!("SELECT {} FROM ledger_entries WHERE kind = 0 AND node = ?1 AND (?2 IS NULL OR public_key = ?2)", aggregate_select(&NODE_TOTAL, None));
        self.conn
            .prepare_cached(&sql)
            .and_then(|mut s| s.query_row(params![node, key.map(|k| &k[..])], |r| node_total_from_row(r, 0)))
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
                aggregate_select(&JOB_USAGE, None)
            ))
            .and_then(|mut s| s.query_row(params![job_uid], |r| Ok(Some((job_usage_from_row(r)?, u(r, aggregate_width(&JOB_USAGE))?)))))
            .map_err(op("read job usage"))
    }

    fn rejected(&mut self, node: &str, limit: u64) -> Result<Vec<RejectedReceipt>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {REJECTED_COLUMNS} FROM ledger_rejected WHERE session_node = ?1 ORDER BY id DESC LIMIT ?2"))
            .map_err(op("prepare rejected"))?;
        let rows = stmt.query_map(params![node, to_db(limit.min(i64::MAX as u64))], |r| rejected_from_row(r)).map_err(op("read rejected"))?;
        rows.collect::<rusqlite::Result<_>>().map_err(op("read rejected"))
    }

    fn rejected_count(&mut self, node: &str) -> Result<RejectedCount, LedgerError> {
        self.conn
            .prepare_cached("SELECT received, distinct_rows, evicted FROM ledger_rejected_counts WHERE session_node = ?1")
            .and_then(|mut s| s.query_row(params![node], |r| Ok(RejectedCount { received: u(r, 0)?, distinct: u(r, 1)?, evicted: u(r, 2)? })).optional())
            .map(Option::unwrap_or_default)
            .map_err(op("read rejected count"))
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

    fn payout_lines(&mut self, after_seq: u64) -> Result<Vec<Entry>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {} FROM ledger_entries WHERE seq > ?1 AND kind IN (3, 4, 5) ORDER BY seq", entry_column_list()))
            .map_err(op("prepare settlement lines"))?;
        let mut rows = stmt.query(params![to_db(after_seq)]).map_err(op("read settlement lines"))?;
        let mut out = vec![];
        while let Some(r) = rows.next().map_err(op("read settlement lines"))? {
            if let Ok(e) = entry_from_row(r).map_err(op("read settlement line"))? {
                out.push(e);
            }
        }
        Ok(out)
    }

    fn last_operator_lines(&mut self, limit: u64) -> Result<Vec<Entry>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {} FROM ledger_entries WHERE kind IN (1, 2, 3, 4, 5, 6) ORDER BY seq DESC LIMIT ?1", entry_column_list()))
            .map_err(op("prepare operator lines"))?;
        let mut rows = stmt.query(params![to_db(limit)]).map_err(op("read operator lines"))?;
        let mut out = vec![];
        while let Some(r) = rows.next().map_err(op("read operator lines"))? {
            if let Ok(e) = entry_from_row(r).map_err(op("read operator line"))? {
                out.push(e);
            }
        }
        Ok(out)
    }
}

/// Stores a batch's rejected receipts (`tx` is the append's transaction): a repeat adds to its
/// row; for new ones, each sender's oldest rows are evicted first so that with them it keeps at
/// most `REJECTED_KEPT_PER_NODE` (never more, even inside the transaction), and its counters
/// account for all of it, so the counts never need the rows.
fn append_rejected(tx: &rusqlite::Transaction<'_>, rejected: &[RejectedReceipt]) -> Result<(), LedgerError> {
    let mut again = tx
        .prepare_cached("UPDATE ledger_rejected SET times = times + ?2, last_ms = max(last_ms, ?3) WHERE digest = ?1")
        .map_err(op("prepare rejected update"))?;
    let mut per_node = PerNode::default();
    for r in rejected {
        let repeat = again.execute(params![r.digest, to_db(r.times), r.last_ms]).map_err(op("count rejected receipt"))? > 0;
        per_node.add(r, repeat);
    }
    let placeholders = (1..=13).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
    let mut ins =
        tx.prepare_cached(&format!("INSERT INTO ledger_rejected ({REJECTED_COLUMNS}) VALUES ({placeholders})")).map_err(op("prepare rejected insert"))?;
    let mut count = tx
        .prepare_cached(
            "INSERT INTO ledger_rejected_counts (session_node, received, distinct_rows, evicted) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (session_node) DO UPDATE SET received = received + excluded.received,
                 distinct_rows = distinct_rows + excluded.distinct_rows, evicted = evicted + excluded.evicted",
        )
        .map_err(op("prepare rejected counters"))?;
    for (node, n) in per_node.0 {
        let (kept, skipped) = n.kept_fresh();
        let evicted = if n.fresh.is_empty() { 0 } else { evict(tx, node, REJECTED_KEPT_PER_NODE - kept.len() as u64)? };
        for r in kept {
            ins.execute(rusqlite::params_from_iter(rejected_values(r))).map_err(op("insert rejected receipt"))?;
        }
        let fresh = n.fresh.len() as u64;
        count.execute(params![node, to_db(n.received), to_db(fresh), to_db(evicted + skipped)]).map_err(op("count rejected receipts"))?;
    }
    Ok(())
}

/// Deletes `node`'s rejected receipts but the newest `keep`; returns how many.
fn evict(conn: &Connection, node: &str, keep: u64) -> Result<u64, LedgerError> {
    conn.prepare_cached(
        "DELETE FROM ledger_rejected WHERE session_node = ?1
         AND id <= (SELECT id FROM ledger_rejected WHERE session_node = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
    )
    .and_then(|mut s| s.execute(params![node, to_db(keep)]))
    .map(|n| n as u64)
    .map_err(op("evict rejected receipts"))
}

/// Brings a ledger written before rejected receipts were bounded to the bounded shape: each
/// stored body and signature becomes its sizes and a prefix, texts are capped, the counters
/// start from the rows (so no count is lost), and each node keeps its newest rows only. Runs
/// once, in one transaction; the writer and the reader may both try, the second finds it done.
fn migrate(conn: &mut Connection) -> Result<(), LedgerError> {
    let old_shape = |c: &Connection| {
        c.query_row("SELECT COUNT(*) FROM pragma_table_info('ledger_rejected') WHERE name = 'signature'", [], |r| r.get::<_, i64>(0))
            .map(|n| n > 0)
            .map_err(op("read rejected columns"))
    };
    if !old_shape(conn)? {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(op("begin migration"))?;
    if !old_shape(&tx)? {
        return Ok(());
    }
    tx.execute_batch(&format!(
        "ALTER TABLE ledger_rejected ADD COLUMN body_bytes INTEGER NOT NULL DEFAULT 0;
         ALTER TABLE ledger_rejected ADD COLUMN signature_bytes INTEGER NOT NULL DEFAULT 0;
         ALTER TABLE ledger_rejected ADD COLUMN body_prefix BLOB NOT NULL DEFAULT x'';
         UPDATE ledger_rejected SET body_bytes = length(body), signature_bytes = length(signature),
             body_prefix = substr(body, 1, {REJECTED_BODY_PREFIX}), node = substr(node, 1, {REJECTED_NAME_MAX}),
             attempt_id = substr(attempt_id, 1, {REJECTED_NAME_MAX}), reason = substr(reason, 1, {REJECTED_REASON_MAX});
         ALTER TABLE ledger_rejected DROP COLUMN body;
         ALTER TABLE ledger_rejected DROP COLUMN signature;
         INSERT INTO ledger_rejected_counts (session_node, received, distinct_rows, evicted)
             SELECT session_node, SUM(times), COUNT(*), 0 FROM ledger_rejected GROUP BY session_node;"
    ))
    .map_err(op("migrate rejected receipts"))?;
    let over: Vec<String> = tx
        .prepare("SELECT session_node FROM ledger_rejected_counts WHERE distinct_rows > ?1")
        .and_then(|mut s| s.query_map(params![to_db(REJECTED_KEPT_PER_NODE)], |r| text(r, 0))?.collect())
        .map_err(op("read rejected counters"))?;
    for node in over {
        let evicted = evict(&tx, &node, REJECTED_KEPT_PER_NODE)?;
        tx.execute("UPDATE ledger_rejected_counts SET evicted = evicted + ?2 WHERE session_node = ?1", params![node, to_db(evicted)])
            .map_err(op("count evicted receipts"))?;
    }
    tx.commit().map_err(op("commit migration"))?;
    tracing::info!("payout ledger: rejected receipts are now kept as bounded digests (the freed space is reused; VACUUM returns it to the disk)");
    Ok(())
}
