//! The embedded ledger backend: `<data dir>/ledger.db`, SQLite in WAL mode with
//! synchronous=FULL, so a committed batch survives a crash or power loss. No setup.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::LedgerError;
use super::backend::{Backend, EntryFilter, Existing, JobUsage, RejectedReceipt, from_db, to_db};
use kommune_core::pricing::{Micros, Rates};
use kommune_ledger::entry::{Entry, EntryKind, NodeTotal, UsageFigures};
use kommune_ledger::verify::BadEntry;

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
CREATE TABLE IF NOT EXISTS ledger_leader (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    epoch      INTEGER NOT NULL,
    claimed_ms INTEGER NOT NULL
);
";

pub(crate) const ENTRY_COLUMNS: &str = "seq, kind, recorded_ms, node, epoch, sequence, attempt_id, job_uid, job_key, body, signature, public_key, \
     rate_cpu_core_hour, rate_memory_gib_hour, rate_gpu_hour, rate_output_gib, cost, \
     wall_millis, cpu_micros, memory_peak_bytes, memory_mib_millis, wasm_fuel, gpu_millis, output_bytes, prev_hash, hash";

/// The SQLite backend: one connection.
pub struct SqliteBackend {
    conn: Connection,
}

impl SqliteBackend {
    /// Opens (creating if needed) `<dir>/ledger.db`.
    pub fn open(dir: &Path) -> Result<SqliteBackend, LedgerError> {
        std::fs::create_dir_all(dir).map_err(|source| LedgerError::Dir { path: dir.display().to_string(), source })?;
        let conn = Connection::open(dir.join("ledger.db")).map_err(op("open ledger.db"))?;
        // The busy timeout first: the ledger's writer and reader open the file at the same
        // moment, and switching to WAL needs a lock the other may hold for an instant.
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(op("set busy timeout"))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(op("enable WAL"))?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(op("set synchronous"))?;
        conn.execute_batch(SCHEMA).map_err(op("create ledger schema"))?;
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

fn row_to_entry(r: &Row<'_>) -> rusqlite::Result<Result<Entry, BadEntry>> {
    let seq = u(r, 0)?;
    let code: i64 = r.get(1)?;
    let Some(kind) = EntryKind::from_code(code) else {
        return Ok(Err(BadEntry { seq, reason: format!("unknown entry kind {code}") }));
    };
    Ok(Ok(Entry {
        seq,
        kind,
        recorded_ms: r.get(2)?,
        node: text(r, 3)?,
        epoch: u(r, 4)?,
        sequence: u(r, 5)?,
        attempt_id: text(r, 6)?,
        job_uid: text(r, 7)?,
        job_key: text(r, 8)?,
        body: blob(r, 9)?,
        signature: blob(r, 10)?,
        public_key: blob(r, 11)?,
        rates: Rates { cpu_core_hour: Micros(u(r, 12)?), memory_gib_hour: Micros(u(r, 13)?), gpu_hour: Micros(u(r, 14)?), output_gib: Micros(u(r, 15)?) },
        cost: Micros(u(r, 16)?),
        usage: UsageFigures {
            wall_millis: u(r, 17)?,
            cpu_micros: u(r, 18)?,
            memory_peak_bytes: u(r, 19)?,
            memory_mib_millis: u(r, 20)?,
            wasm_fuel: u(r, 21)?,
            gpu_millis: u(r, 22)?,
            output_bytes: u(r, 23)?,
        },
        prev_hash: blob(r, 24)?,
        hash: blob(r, 25)?,
    }))
}

fn row_to_rejected(r: &Row<'_>) -> rusqlite::Result<RejectedReceipt> {
    Ok(RejectedReceipt {
        digest: blob(r, 0)?,
        first_ms: r.get(1)?,
        last_ms: r.get(2)?,
        times: u(r, 3)?,
        session_node: text(r, 4)?,
        node: text(r, 5)?,
        epoch: u(r, 6)?,
        sequence: u(r, 7)?,
        attempt_id: text(r, 8)?,
        body: blob(r, 9)?,
        signature: blob(r, 10)?,
        reason: text(r, 11)?,
    })
}

impl Backend for SqliteBackend {
    fn append(&mut self, entries: &[Entry], rejected: &[RejectedReceipt], epoch: Option<u64>) -> Result<(), LedgerError> {
        // IMMEDIATE: the write lock is taken at BEGIN, so the epoch read below stays true
        // until the commit (a claim is itself a write and waits for the lock).
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(op("begin append"))?;
        if let Some(mine) = epoch {
            let current: Option<i64> =
                tx.query_row("SELECT epoch FROM ledger_leader WHERE id = 1", [], |r| r.get(0)).optional().map_err(op("read leader epoch"))?;
            if current != Some(to_db(mine)) {
                return Err(LedgerError::Fenced(kommune_core::fence::Fenced));
            }
        }
        {
            let mut ins = tx
                .prepare_cached(&format!(
                    "INSERT INTO ledger_entries ({ENTRY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26)"
                ))
                .map_err(op("prepare entry insert"))?;
            for e in entries {
                let u = &e.usage;
                ins.execute(params![
                    to_db(e.seq),
                    e.kind.code(),
                    e.recorded_ms,
                    e.node,
                    to_db(e.epoch),
                    to_db(e.sequence),
                    e.attempt_id,
                    e.job_uid,
                    e.job_key,
                    e.body,
                    e.signature,
                    e.public_key,
                    to_db(e.rates.cpu_core_hour.0),
                    to_db(e.rates.memory_gib_hour.0),
                    to_db(e.rates.gpu_hour.0),
                    to_db(e.rates.output_gib.0),
                    to_db(e.cost.0),
                    to_db(u.wall_millis),
                    to_db(u.cpu_micros),
                    to_db(u.memory_peak_bytes),
                    to_db(u.memory_mib_millis),
                    to_db(u.wasm_fuel),
                    to_db(u.gpu_millis),
                    to_db(u.output_bytes),
                    e.prev_hash,
                    e.hash,
                ])
                .map_err(op("insert ledger entry"))?;
            }
            let mut rej = tx
                .prepare_cached(
                    "INSERT INTO ledger_rejected (digest, first_ms, last_ms, times, session_node, node, epoch, sequence, attempt_id, body, signature, reason)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                     ON CONFLICT (digest) DO UPDATE SET times = times + excluded.times, last_ms = max(last_ms, excluded.last_ms)",
                )
                .map_err(op("prepare rejected insert"))?;
            for r in rejected {
                rej.execute(params![
                    r.digest,
                    r.first_ms,
                    r.last_ms,
                    to_db(r.times),
                    r.session_node,
                    r.node,
                    to_db(r.epoch),
                    to_db(r.sequence),
                    r.attempt_id,
                    r.body,
                    r.signature,
                    r.reason
                ])
                .map_err(op("insert rejected receipt"))?;
            }
        }
        tx.commit().map_err(op("commit append"))
    }

    fn claim_epoch(&mut self, now_ms: i64) -> Result<u64, LedgerError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(op("begin epoch claim"))?;
        let epoch: i64 = tx
            .query_row(
                "INSERT INTO ledger_leader (id, epoch, claimed_ms) VALUES (1, 1, ?1)
                 ON CONFLICT (id) DO UPDATE SET epoch = epoch + 1, claimed_ms = excluded.claimed_ms RETURNING epoch",
                params![now_ms],
                |r| r.get(0),
            )
            .map_err(op("claim leader epoch"))?;
        tx.commit().map_err(op("commit epoch claim"))?;
        Ok(from_db(epoch))
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
            .prepare_cached(
                "SELECT COUNT(*), COALESCE(SUM(wall_millis), 0), COALESCE(SUM(cpu_micros), 0), COALESCE(MAX(memory_peak_bytes), 0),
                        COALESCE(SUM(memory_mib_millis), 0), COALESCE(SUM(wasm_fuel), 0), COALESCE(SUM(gpu_millis), 0),
                        COALESCE(SUM(output_bytes), 0), COALESCE(SUM(cost), 0), (SELECT COALESCE(MAX(seq), 0) FROM ledger_entries)
                 FROM ledger_entries WHERE kind = 0 AND job_uid = ?1",
            )
            .and_then(|mut s| {
                s.query_row(params![job_uid], |r| {
                    let head = u(r, 9)?;
                    let usage = JobUsage {
                        receipts: u(r, 0)?,
                        usage: UsageFigures {
                            wall_millis: u(r, 1)?,
                            cpu_micros: u(r, 2)?,
                            memory_peak_bytes: u(r, 3)?,
                            memory_mib_millis: u(r, 4)?,
                            wasm_fuel: u(r, 5)?,
                            gpu_millis: u(r, 6)?,
                            output_bytes: u(r, 7)?,
                        },
                        cost: Micros(u(r, 8)?),
                    };
                    Ok(Some((usage, head)))
                })
            })
            .map_err(op("read job usage"))
    }

    fn rejected(&mut self, node: &str) -> Result<Vec<RejectedReceipt>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT digest, first_ms, last_ms, times, session_node, node, epoch, sequence, attempt_id, body, signature, reason
                 FROM ledger_rejected WHERE session_node = ?1 ORDER BY id",
            )
            .map_err(op("prepare rejected"))?;
        let rows = stmt.query_map(params![node], row_to_rejected).map_err(op("read rejected"))?;
        rows.collect::<rusqlite::Result<_>>().map_err(op("read rejected"))
    }

    fn for_each_entry(&mut self, filter: &EntryFilter, f: &mut dyn FnMut(Result<Entry, BadEntry>) -> bool) -> Result<(), LedgerError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {ENTRY_COLUMNS} FROM ledger_entries
                 WHERE (?1 IS NULL OR recorded_ms >= ?1) AND (?2 IS NULL OR recorded_ms < ?2) AND (?3 IS NULL OR (node = ?3 AND kind <> 1))
                 ORDER BY seq"
            ))
            .map_err(op("prepare entry scan"))?;
        let mut rows = stmt.query(params![filter.since_ms, filter.until_ms, filter.node]).map_err(op("scan entries"))?;
        while let Some(r) = rows.next().map_err(op("scan entries"))? {
            let e = row_to_entry(r).map_err(op("read entry"))?;
            if !f(e) {
                break;
            }
        }
        Ok(())
    }
}
