//! The PostgreSQL ledger backend, selected by a `database_url`: the same tables, constraints and
//! append-only rule as the embedded one. Batches travel as arrays (UNNEST), so a group commit
//! is a few round trips, not one per receipt.

use std::collections::BTreeMap;

use postgres::{Client, NoTls, Row};

use super::LedgerError;
use super::backend::{Backend, EntryFilter, Existing, JobUsage, RejectedReceipt, from_db, to_db};
use super::row::{
    ColumnType, ENTRY_COLUMNS, REJECTED_COLUMNS, RowReader, Value, entry_column_list, entry_from_row, entry_values, job_usage_from_row, job_usage_select,
    rejected_from_row, rejected_values,
};
use crate::db::epoch::{self, Guarded};
use kommune_core::pricing::Micros;
use kommune_ledger::entry::{Entry, NodeTotal};
use kommune_ledger::verify::BadEntry;
use postgres::types::ToSql;

fn op(op: &'static str) -> impl FnOnce(postgres::Error) -> LedgerError {
    move |source| LedgerError::Postgres { op, source }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ledger_entries (
    seq                  BIGINT PRIMARY KEY,
    kind                 BIGINT NOT NULL,
    recorded_ms          BIGINT NOT NULL,
    node                 TEXT NOT NULL,
    epoch                BIGINT NOT NULL,
    sequence             BIGINT NOT NULL,
    attempt_id           TEXT NOT NULL,
    job_uid              TEXT NOT NULL,
    job_key              TEXT NOT NULL,
    body                 BYTEA NOT NULL,
    signature            BYTEA NOT NULL,
    public_key           BYTEA NOT NULL,
    rate_cpu_core_hour   BIGINT NOT NULL,
    rate_memory_gib_hour BIGINT NOT NULL,
    rate_gpu_hour        BIGINT NOT NULL,
    rate_output_gib      BIGINT NOT NULL,
    cost                 BIGINT NOT NULL,
    wall_millis          BIGINT NOT NULL,
    cpu_micros           BIGINT NOT NULL,
    memory_peak_bytes    BIGINT NOT NULL,
    memory_mib_millis    BIGINT NOT NULL,
    wasm_fuel            BIGINT NOT NULL,
    gpu_millis           BIGINT NOT NULL,
    output_bytes         BIGINT NOT NULL,
    prev_hash            BYTEA NOT NULL,
    hash                 BYTEA NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS ledger_receipt_key ON ledger_entries (node, epoch, sequence) WHERE kind = 0;
CREATE UNIQUE INDEX IF NOT EXISTS ledger_receipt_attempt ON ledger_entries (attempt_id) WHERE kind = 0;
CREATE INDEX IF NOT EXISTS ledger_receipts_by_job ON ledger_entries (job_uid) WHERE kind = 0;
CREATE INDEX IF NOT EXISTS ledger_other_kinds ON ledger_entries (kind, seq) WHERE kind <> 0;
CREATE OR REPLACE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN RAISE EXCEPTION 'ledger entries are append-only'; END $$;
CREATE OR REPLACE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TABLE IF NOT EXISTS ledger_rejected (
    id           BIGSERIAL PRIMARY KEY,
    digest       BYTEA NOT NULL UNIQUE,
    first_ms     BIGINT NOT NULL,
    last_ms      BIGINT NOT NULL,
    times        BIGINT NOT NULL,
    session_node TEXT NOT NULL,
    node         TEXT NOT NULL,
    epoch        BIGINT NOT NULL,
    sequence     BIGINT NOT NULL,
    attempt_id   TEXT NOT NULL,
    body         BYTEA NOT NULL,
    signature    BYTEA NOT NULL,
    reason       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_rejected_by_node ON ledger_rejected (session_node, id);
";

/// The PostgreSQL backend: one client connection.
pub struct PostgresBackend {
    client: Client,
}

impl PostgresBackend {
    /// Connects to `url` and creates the tables if needed.
    pub fn connect(url: &str) -> Result<PostgresBackend, LedgerError> {
        let mut client = Client::connect(url, NoTls).map_err(op("connect"))?;
        // Two operators starting at once must not race on CREATE ... IF NOT EXISTS.
        let mut tx = client.transaction().map_err(op("begin schema"))?;
        tx.execute("SELECT pg_advisory_xact_lock(7171717171)", &[]).map_err(op("lock schema"))?;
        tx.batch_execute(SCHEMA).map_err(op("create ledger schema"))?;
        tx.batch_execute(&Guarded::Ledger.schema()).map_err(op("create ledger leader table"))?;
        tx.commit().map_err(op("commit schema"))?;
        Ok(PostgresBackend { client })
    }

    /// The underlying client (tests tamper with rows through it).
    #[cfg(test)]
    pub(crate) fn client(&mut self) -> &mut Client {
        &mut self.client
    }
}

fn u(r: &Row, i: usize) -> Result<u64, postgres::Error> {
    Ok(from_db(r.try_get(i)?))
}

impl RowReader for Row {
    type Error = postgres::Error;
    fn int(&self, i: usize) -> Result<i64, postgres::Error> {
        self.try_get(i)
    }
    fn text(&self, i: usize) -> Result<String, postgres::Error> {
        self.try_get(i)
    }
    fn bytes(&self, i: usize) -> Result<Vec<u8>, postgres::Error> {
        self.try_get(i)
    }
}

/// One value as a statement parameter.
fn value_param<'a>(v: &'a Value<'a>) -> &'a (dyn ToSql + Sync) {
    match v {
        Value::Int(i) => i,
        Value::Text(t) => t,
        Value::Bytes(b) => b,
    }
}

/// One column of a batch of entries, sent as an array and expanded by UNNEST.
enum Column<'a> {
    Int(Vec<i64>),
    Text(Vec<&'a str>),
    Bytes(Vec<&'a [u8]>),
}

impl Column<'_> {
    fn param(&self) -> &(dyn ToSql + Sync) {
        match self {
            Column::Int(v) => v,
            Column::Text(v) => v,
            Column::Bytes(v) => v,
        }
    }
}

/// The batch as one array per column, and the INSERT that expands them.
fn entry_columns(entries: &[Entry]) -> (String, Vec<Column<'_>>) {
    let mut cols: Vec<Column<'_>> = ENTRY_COLUMNS
        .iter()
        .map(|(_, ty)| match ty {
            ColumnType::Int => Column::Int(Vec::with_capacity(entries.len())),
            ColumnType::Text => Column::Text(Vec::with_capacity(entries.len())),
            ColumnType::Bytes => Column::Bytes(Vec::with_capacity(entries.len())),
        })
        .collect();
    for e in entries {
        for (col, v) in cols.iter_mut().zip(entry_values(e)) {
            match (col, v) {
                (Column::Int(c), Value::Int(v)) => c.push(v),
                (Column::Text(c), Value::Text(v)) => c.push(v),
                (Column::Bytes(c), Value::Bytes(v)) => c.push(v),
                _ => unreachable!("entry_values gives each column its declared type (tested)"),
            }
        }
    }
    let arrays = ENTRY_COLUMNS
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| {
            let t = match ty {
                ColumnType::Int => "bigint",
                ColumnType::Text => "text",
                ColumnType::Bytes => "bytea",
            };
            format!("${}::{t}[]", i + 1)
        })
        .collect::<Vec<_>>()
        .join(", ");
    (format!("INSERT INTO ledger_entries ({}) SELECT * FROM UNNEST({arrays})", entry_column_list()), cols)
}

impl Backend for PostgresBackend {
    fn append(&mut self, entries: &[Entry], rejected: &[RejectedReceipt], epoch: Option<u64>) -> Result<(), LedgerError> {
        let mut tx = epoch::postgres::begin(&mut self.client, Guarded::Ledger, epoch.map(to_db))?;
        if !entries.is_empty() {
            let (sql, cols) = entry_columns(entries);
            let params: Vec<&(dyn ToSql + Sync)> = cols.iter().map(Column::param).collect();
            tx.execute(&sql, &params).map_err(op("insert ledger entries"))?;
        }
        if !rejected.is_empty() {
            let stmt = tx
                .prepare(&format!(
                    "INSERT INTO ledger_rejected ({REJECTED_COLUMNS})
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                     ON CONFLICT (digest) DO UPDATE SET times = ledger_rejected.times + EXCLUDED.times, last_ms = GREATEST(ledger_rejected.last_ms, EXCLUDED.last_ms)"
                )
                )
                .map_err(op("prepare rejected insert"))?;
            for r in rejected {
                let values = rejected_values(r);
                let params: Vec<&(dyn ToSql + Sync)> = values.iter().map(value_param).collect();
                tx.execute(&stmt, &params).map_err(op("insert rejected receipt"))?;
            }
        }
        tx.commit().map_err(op("commit append"))
    }

    fn claim_epoch(&mut self, now_ms: i64) -> Result<u64, LedgerError> {
        // The claim waits for every transaction holding the row FOR SHARE (appends of the
        // previous epoch) to end.
        Ok(from_db(epoch::postgres::claim(&mut self.client, Guarded::Ledger, now_ms)?))
    }

    fn lookup_receipts(&mut self, keys: &[(&str, u64, u64)]) -> Result<Vec<Option<Existing>>, LedgerError> {
        let mut out = vec![None; keys.len()];
        if keys.is_empty() {
            return Ok(out);
        }
        let nodes: Vec<&str> = keys.iter().map(|k| k.0).collect();
        let epochs: Vec<i64> = keys.iter().map(|k| to_db(k.1)).collect();
        let seqs: Vec<i64> = keys.iter().map(|k| to_db(k.2)).collect();
        let rows = self
            .client
            .query(
                "SELECT k.i, e.seq, e.body, e.cost FROM UNNEST($1::text[], $2::bigint[], $3::bigint[]) WITH ORDINALITY AS k(node, epoch, sequence, i)
                 JOIN ledger_entries e ON e.kind = 0 AND e.node = k.node AND e.epoch = k.epoch AND e.sequence = k.sequence",
                &[&nodes, &epochs, &seqs],
            )
            .map_err(op("look up receipts"))?;
        for r in rows {
            let i: i64 = r.try_get(0).map_err(op("read receipt lookup"))?;
            let e = Existing {
                seq: u(&r, 1).map_err(op("read receipt lookup"))?,
                body: r.try_get(2).map_err(op("read receipt lookup"))?,
                cost: Micros(u(&r, 3).map_err(op("read receipt lookup"))?),
            };
            if let Some(slot) = out.get_mut((i - 1) as usize) {
                *slot = Some(e);
            }
        }
        Ok(out)
    }

    fn lookup_attempts(&mut self, ids: &[&str]) -> Result<Vec<Option<u64>>, LedgerError> {
        let mut out = vec![None; ids.len()];
        if ids.is_empty() {
            return Ok(out);
        }
        let rows = self
            .client
            .query(
                "SELECT k.i, e.seq FROM UNNEST($1::text[]) WITH ORDINALITY AS k(attempt_id, i) JOIN ledger_entries e ON e.kind = 0 AND e.attempt_id = k.attempt_id",
                &[&ids],
            )
            .map_err(op("look up attempts"))?;
        for r in rows {
            let i: i64 = r.try_get(0).map_err(op("read attempt lookup"))?;
            if let Some(slot) = out.get_mut((i - 1) as usize) {
                *slot = Some(u(&r, 1).map_err(op("read attempt lookup"))?);
            }
        }
        Ok(out)
    }

    fn head(&mut self) -> Result<Option<(u64, Vec<u8>)>, LedgerError> {
        let row = self.client.query_opt("SELECT seq, hash FROM ledger_entries ORDER BY seq DESC LIMIT 1", &[]).map_err(op("read head"))?;
        row.map(|r| Ok((u(&r, 0)?, r.try_get(1)?))).transpose().map_err(op("read head"))
    }

    fn last_checkpoint(&mut self) -> Result<u64, LedgerError> {
        let r = self.client.query_one("SELECT COALESCE(MAX(seq), 0)::bigint FROM ledger_entries WHERE kind = 1", &[]).map_err(op("read last checkpoint"))?;
        u(&r, 0).map_err(op("read last checkpoint"))
    }

    fn node_totals(&mut self) -> Result<BTreeMap<String, NodeTotal>, LedgerError> {
        let rows = self
            .client
            .query("SELECT node, SUM(cost)::bigint, COUNT(*)::bigint FROM ledger_entries WHERE kind = 0 GROUP BY node", &[])
            .map_err(op("read node totals"))?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, NodeTotal { total: Micros(u(r, 1)?), receipts: u(r, 2)? })))
            .collect::<Result<_, _>>()
            .map_err(op("read node totals"))
    }

    fn node_total(&mut self, node: &str) -> Result<NodeTotal, LedgerError> {
        let r = self
            .client
            .query_one("SELECT COALESCE(SUM(cost), 0)::bigint, COUNT(*)::bigint FROM ledger_entries WHERE kind = 0 AND node = $1", &[&node])
            .map_err(op("read node total"))?;
        Ok(NodeTotal { total: Micros(u(&r, 0).map_err(op("read node total"))?), receipts: u(&r, 1).map_err(op("read node total"))? })
    }

    fn node_keys(&mut self) -> Result<Vec<(String, Vec<u8>)>, LedgerError> {
        let rows = self.client.query("SELECT node, public_key FROM ledger_entries WHERE kind = 2 ORDER BY seq", &[]).map_err(op("read node keys"))?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect::<Result<_, _>>().map_err(op("read node keys"))
    }

    fn job_usage(&mut self, job_uid: &str) -> Result<JobUsage, LedgerError> {
        let sql = format!("SELECT {} FROM ledger_entries WHERE kind = 0 AND job_uid = $1", job_usage_select(Some("bigint")));
        let r = self.client.query_one(&sql, &[&job_uid]).map_err(op("read job usage"))?;
        job_usage_from_row(&r).map_err(op("read job usage"))
    }

    fn rejected(&mut self, node: &str) -> Result<Vec<RejectedReceipt>, LedgerError> {
        let sql = format!("SELECT {REJECTED_COLUMNS} FROM ledger_rejected WHERE session_node = $1 ORDER BY id");
        let rows = self.client.query(&sql, &[&node]).map_err(op("read rejected"))?;
        rows.iter().map(rejected_from_row).collect::<Result<_, _>>().map_err(op("read rejected"))
    }

    fn for_each_entry(&mut self, filter: &EntryFilter, f: &mut dyn FnMut(Result<Entry, BadEntry>) -> bool) -> Result<(), LedgerError> {
        let mut tx = self.client.transaction().map_err(op("begin entry scan"))?;
        let stmt = tx
            .prepare(&format!(
                "SELECT {} FROM ledger_entries
                 WHERE ($1::bigint IS NULL OR recorded_ms >= $1) AND ($2::bigint IS NULL OR recorded_ms < $2) AND ($3::text IS NULL OR (node = $3 AND kind <> 1))
                 ORDER BY seq",
                entry_column_list()
            ))
            .map_err(op("prepare entry scan"))?;
        let portal = tx.bind(&stmt, &[&filter.since_ms, &filter.until_ms, &filter.node]).map_err(op("scan entries"))?;
        loop {
            let rows = tx.query_portal(&portal, 4096).map_err(op("scan entries"))?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                if !f(entry_from_row(r).map_err(op("read entry"))?) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}
