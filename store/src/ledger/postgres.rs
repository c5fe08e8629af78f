//! The PostgreSQL ledger backend, selected by a `database_url`: the same tables, constraints and
//! append-only rule as the embedded one. Batches travel as arrays (UNNEST), so a group commit
//! is a few round trips, not one per receipt.

use std::collections::BTreeMap;

use postgres::{Client, NoTls, Row, Transaction};

use super::LedgerError;
use super::aggregate::{JOB_USAGE, NODE_TOTAL, aggregate_select, job_usage_from_row, node_total_from_row};
use super::backend::{Backend, EntryFilter, Existing, JobUsage, PerNode, RejectedCount, RejectedReceipt, from_db, to_db};
use super::row::{
    ColumnType, ENTRY_COLUMNS, REJECTED_COLUMNS, RowReader, Value, entry_column_list, entry_from_row, entry_values, rejected_from_row, rejected_values,
};
use crate::db::epoch::{self, Guarded};
use kommune_core::pricing::Micros;
use kommune_ledger::entry::{Entry, NodeTotal};
use kommune_ledger::records::{REJECTED_BODY_PREFIX, REJECTED_KEPT_PER_NODE, REJECTED_NAME_MAX, REJECTED_REASON_MAX};
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
    id              BIGSERIAL PRIMARY KEY,
    digest          BYTEA NOT NULL UNIQUE,
    first_ms        BIGINT NOT NULL,
    last_ms         BIGINT NOT NULL,
    times           BIGINT NOT NULL,
    session_node    TEXT NOT NULL,
    node            TEXT NOT NULL,
    epoch           BIGINT NOT NULL,
    sequence        BIGINT NOT NULL,
    attempt_id      TEXT NOT NULL,
    body_bytes      BIGINT NOT NULL,
    signature_bytes BIGINT NOT NULL,
    body_prefix     BYTEA NOT NULL,
    reason          TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_rejected_by_node ON ledger_rejected (session_node, id);
CREATE TABLE IF NOT EXISTS ledger_rejected_counts (
    session_node  TEXT PRIMARY KEY,
    received      BIGINT NOT NULL,
    distinct_rows BIGINT NOT NULL,
    evicted       BIGINT NOT NULL
);
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
        migrate(&mut tx)?;
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
            append_rejected(&mut tx, rejected)?;
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
                "SELECT k.i, e.seq, e.body, e.cost, e.hash FROM UNNEST($1::text[], $2::bigint[], $3::bigint[]) WITH ORDINALITY AS k(node, epoch, sequence, i)
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
                hash: super::row::hash32(r.try_get(4).map_err(op("read receipt lookup"))?),
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
        let sql = format!("SELECT node, {} FROM ledger_entries WHERE kind = 0 GROUP BY node", aggregate_select(&NODE_TOTAL, Some("bigint")));
        let rows = self.client.query(&sql, &[]).map_err(op("read node totals"))?;
        rows.iter().map(|r| Ok((r.try_get(0)?, node_total_from_row(r, 1)?))).collect::<Result<_, _>>().map_err(op("read node totals"))
    }

    fn node_total(&mut self, node: &str, key: Option<&[u8; 32]>) -> Result<NodeTotal, LedgerError> {
        let sql = format!(
            "SELECT {} FROM ledger_entries WHERE kind = 0 AND node = $1 AND ($2::bytea IS NULL OR public_key = $2)",
            aggregate_select(&NODE_TOTAL, Some("bigint"))
        );
        let key = key.map(|k| &k[..]);
        let r = self.client.query_one(&sql, &[&node, &key]).map_err(op("read node total"))?;
        node_total_from_row(&r, 0).map_err(op("read node total"))
    }

    fn node_keys(&mut self) -> Result<Vec<(String, Vec<u8>)>, LedgerError> {
        let rows = self.client.query("SELECT node, public_key FROM ledger_entries WHERE kind = 2 ORDER BY seq", &[]).map_err(op("read node keys"))?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect::<Result<_, _>>().map_err(op("read node keys"))
    }

    fn job_usage(&mut self, job_uid: &str) -> Result<JobUsage, LedgerError> {
        let sql = format!("SELECT {} FROM ledger_entries WHERE kind = 0 AND job_uid = $1", aggregate_select(&JOB_USAGE, Some("bigint")));
        let r = self.client.query_one(&sql, &[&job_uid]).map_err(op("read job usage"))?;
        job_usage_from_row(&r).map_err(op("read job usage"))
    }

    fn rejected(&mut self, node: &str, limit: u64) -> Result<Vec<RejectedReceipt>, LedgerError> {
        let sql = format!("SELECT {REJECTED_COLUMNS} FROM ledger_rejected WHERE session_node = $1 ORDER BY id DESC LIMIT $2");
        let rows = self.client.query(&sql, &[&node, &to_db(limit.min(i64::MAX as u64))]).map_err(op("read rejected"))?;
        rows.iter().map(rejected_from_row).collect::<Result<_, _>>().map_err(op("read rejected"))
    }

    fn rejected_count(&mut self, node: &str) -> Result<RejectedCount, LedgerError> {
        let row = self
            .client
            .query_opt("SELECT received, distinct_rows, evicted FROM ledger_rejected_counts WHERE session_node = $1", &[&node])
            .map_err(op("read rejected count"))?;
        row.map(|r| Ok(RejectedCount { received: u(&r, 0)?, distinct: u(&r, 1)?, evicted: u(&r, 2)? }))
            .transpose()
            .map(Option::unwrap_or_default)
            .map_err(op("read rejected count"))
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

    fn payout_lines(&mut self, after_seq: u64) -> Result<Vec<Entry>, LedgerError> {
        let rows = self
            .client
            .query(&format!("SELECT {} FROM ledger_entries WHERE seq > $1 AND kind IN (3, 4, 5) ORDER BY seq", entry_column_list()), &[&to_db(after_seq)])
            .map_err(op("read settlement lines"))?;
        let mut out = vec![];
        for r in &rows {
            if let Ok(e) = entry_from_row(r).map_err(op("read settlement line"))? {
                out.push(e);
            }
        }
        Ok(out)
    }

    fn last_operator_lines(&mut self, limit: u64) -> Result<Vec<Entry>, LedgerError> {
        let rows = self
            .client
            .query(&format!("SELECT {} FROM ledger_entries WHERE kind IN (1, 2, 3, 4, 5, 6) ORDER BY seq DESC LIMIT $1", entry_column_list()), &[&to_db(limit)])
            .map_err(op("read operator lines"))?;
        let mut out = vec![];
        for r in &rows {
            if let Ok(e) = entry_from_row(r).map_err(op("read operator line"))? {
                out.push(e);
            }
        }
        Ok(out)
    }
}

/// Stores a batch's rejected receipts in the append's transaction, as the SQLite backend does
/// (a repeat adds to its row, each sender never holds more than the cap, counters account for all).
fn append_rejected(tx: &mut Transaction<'_>, rejected: &[RejectedReceipt]) -> Result<(), LedgerError> {
    let again = tx
        .prepare("UPDATE ledger_rejected SET times = times + $2, last_ms = GREATEST(last_ms, $3) WHERE digest = $1")
        .map_err(op("prepare rejected update"))?;
    let mut per_node = PerNode::default();
    for r in rejected {
        let repeat = tx.execute(&again, &[&r.digest, &to_db(r.times), &r.last_ms]).map_err(op("count rejected receipt"))? > 0;
        per_node.add(r, repeat);
    }
    let placeholders = (1..=13).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
    let ins = tx.prepare(&format!("INSERT INTO ledger_rejected ({REJECTED_COLUMNS}) VALUES ({placeholders})")).map_err(op("prepare rejected insert"))?;
    let count = tx
        .prepare(
            "INSERT INTO ledger_rejected_counts (session_node, received, distinct_rows, evicted) VALUES ($1, $2, $3, $4)
             ON CONFLICT (session_node) DO UPDATE SET received = ledger_rejected_counts.received + EXCLUDED.received,
                 distinct_rows = ledger_rejected_counts.distinct_rows + EXCLUDED.distinct_rows,
                 evicted = ledger_rejected_counts.evicted + EXCLUDED.evicted",
        )
        .map_err(op("prepare rejected counters"))?;
    for (node, n) in per_node.0 {
        let (kept, skipped) = n.kept_fresh();
        let evicted = if n.fresh.is_empty() { 0 } else { evict(tx, node, REJECTED_KEPT_PER_NODE - kept.len() as u64)? };
        for r in kept {
            let values = rejected_values(r);
            let params: Vec<&(dyn ToSql + Sync)> = values.iter().map(value_param).collect();
            tx.execute(&ins, &params).map_err(op("insert rejected receipt"))?;
        }
        let fresh = n.fresh.len() as u64;
        tx.execute(&count, &[&node, &to_db(n.received), &to_db(fresh), &to_db(evicted + skipped)]).map_err(op("count rejected receipts"))?;
    }
    Ok(())
}

/// Deletes `node`'s rejected receipts but the newest `keep`; returns how many.
fn evict(tx: &mut Transaction<'_>, node: &str, keep: u64) -> Result<u64, LedgerError> {
    tx.execute(
        "DELETE FROM ledger_rejected WHERE session_node = $1
         AND id <= (SELECT id FROM ledger_rejected WHERE session_node = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)",
        &[&node, &to_db(keep)],
    )
    .map_err(op("evict rejected receipts"))
}

/// Brings a ledger written before rejected receipts were bounded to the bounded shape, as the
/// SQLite backend does; runs under the schema lock, in the schema's transaction.
fn migrate(tx: &mut Transaction<'_>) -> Result<(), LedgerError> {
    let old = tx
        .query_opt(
            "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = 'ledger_rejected' AND column_name = 'signature'",
            &[],
        )
        .map_err(op("read rejected columns"))?;
    if old.is_none() {
        return Ok(());
    }
    tx.batch_execute(&format!(
        "ALTER TABLE ledger_rejected ADD COLUMN body_bytes BIGINT NOT NULL DEFAULT 0,
             ADD COLUMN signature_bytes BIGINT NOT NULL DEFAULT 0, ADD COLUMN body_prefix BYTEA NOT NULL DEFAULT '\\x';
         UPDATE ledger_rejected SET body_bytes = length(body), signature_bytes = length(signature),
             body_prefix = substring(body from 1 for {REJECTED_BODY_PREFIX}), node = left(node, {REJECTED_NAME_MAX}),
             attempt_id = left(attempt_id, {REJECTED_NAME_MAX}), reason = left(reason, {REJECTED_REASON_MAX});
         ALTER TABLE ledger_rejected DROP COLUMN body, DROP COLUMN signature;
         INSERT INTO ledger_rejected_counts (session_node, received, distinct_rows, evicted)
             SELECT session_node, SUM(times)::bigint, COUNT(*), 0 FROM ledger_rejected GROUP BY session_node;"
    ))
    .map_err(op("migrate rejected receipts"))?;
    let over = tx
        .query("SELECT session_node FROM ledger_rejected_counts WHERE distinct_rows > $1", &[&to_db(REJECTED_KEPT_PER_NODE)])
        .map_err(op("read rejected counters"))?;
    for r in over {
        let node: String = r.try_get(0).map_err(op("read rejected counters"))?;
        let evicted = evict(tx, &node, REJECTED_KEPT_PER_NODE)?;
        tx.execute("UPDATE ledger_rejected_counts SET evicted = evicted + $2 WHERE session_node = $1", &[&node, &to_db(evicted)])
            .map_err(op("count evicted receipts"))?;
    }
    tracing::info!("payout ledger: rejected receipts are now kept as bounded digests");
    Ok(())
}
