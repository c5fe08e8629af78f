//! The PostgreSQL store backend, selected by a `database_url` (the ledger's): the same tables as
//! the embedded one, in a database every operator replica reaches, so a new leader finds the
//! attempts the old one placed. Batches travel as arrays (UNNEST): one round trip, not one per row.

use std::collections::{HashMap, HashSet};

use postgres::{Client, NoTls, Row, Statement};

use super::nodes::{limits_from_json, limits_to_json};
use super::observations;
use super::{Db, Finish, NodeGrant, NodeRecord, Raw, Registration, Removal, Result, Select, StoreError, raw_to_attempt};
use crate::db::epoch::{self, Guarded};
use kommune_core::attempt::{Attempt, AttemptPhase};
use kommune_core::reputation::Observation;

fn op(op: &'static str) -> impl FnOnce(postgres::Error) -> StoreError {
    move |source| StoreError::Postgres { op, source }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS attempts (
    id              TEXT PRIMARY KEY,
    job_uid         TEXT NOT NULL,
    job_key         TEXT NOT NULL,
    task_index      BIGINT NOT NULL,
    number          BIGINT NOT NULL,
    node            TEXT NOT NULL,
    phase           TEXT NOT NULL,
    cpu_millis      BIGINT NOT NULL,
    memory_bytes    BIGINT NOT NULL,
    created_ms      BIGINT NOT NULL,
    finished_ms     BIGINT,
    result_json     TEXT,
    replica         BIGINT NOT NULL DEFAULT 0,
    ephemeral_bytes BIGINT,
    gpu_mask        BIGINT
);
ALTER TABLE attempts ADD COLUMN IF NOT EXISTS replica BIGINT NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN IF NOT EXISTS ephemeral_bytes BIGINT;
ALTER TABLE attempts ADD COLUMN IF NOT EXISTS gpu_mask BIGINT;
CREATE INDEX IF NOT EXISTS attempts_by_job ON attempts (job_uid);
CREATE INDEX IF NOT EXISTS attempts_active_by_node ON attempts (node) WHERE phase IN ('Assigned', 'Running');
CREATE TABLE IF NOT EXISTS nodes (
    name              TEXT PRIMARY KEY,
    public_key_sha256 TEXT NOT NULL,
    joined_ms         BIGINT NOT NULL
);
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS owner TEXT;
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS limits_json TEXT;
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS removed_ms BIGINT;
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS removed_reason TEXT;
";

/// Whether every table, index and column of SCHEMA exists (in the connection's schema).
const SCHEMA_IS_CURRENT: &str =
    "SELECT to_regclass('store_leader') IS NOT NULL AND to_regclass('nodes') IS NOT NULL AND to_regclass('attempt_retention') IS NOT NULL
     AND to_regclass('attempts_by_job') IS NOT NULL AND to_regclass('observations_by_node') IS NOT NULL AND to_regclass('attempts_active_by_node') IS NOT NULL
     AND (SELECT count(*) FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = 'attempts'
          AND column_name IN ('replica', 'ephemeral_bytes', 'gpu_mask')) = 3
     AND (SELECT count(*) FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = 'nodes'
          AND column_name IN ('owner', 'limits_json', 'removed_ms', 'removed_reason')) = 4";

/// The columns read into an attempt, in `Raw`'s order. (Lists sort ids with COLLATE "C":
/// bytewise, as SQLite does, whatever the database's collation.)
const COLUMNS: &str = "id, job_uid, job_key, task_index, number, node, phase, cpu_millis, memory_bytes, created_ms, finished_ms, result_json, replica, \
     ephemeral_bytes, gpu_mask";

const INSERT: &str =
    "INSERT INTO attempts (id, job_uid, job_key, task_index, number, node, phase, cpu_millis, memory_bytes, created_ms, replica, ephemeral_bytes, gpu_mask)
     SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::text[], $7::text[], $8::int8[], $9::int8[], $10::int8[], $11::int8[],
                          $12::int8[], $13::int8[])
     ON CONFLICT (id) DO NOTHING";

const MARK_RUNNING: &str = "UPDATE attempts SET phase = 'Running' WHERE id = $1 AND phase = 'Assigned'";

const FINISH_BATCH: &str = "UPDATE attempts AS a SET phase = u.phase, finished_ms = u.finished_ms, result_json = u.result_json
     FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[]) AS u (id, phase, finished_ms, result_json)
     WHERE a.id = u.id AND a.phase IN ('Assigned', 'Running') RETURNING a.id";

/// One client connection. The `postgres` client blocks on a private runtime, so it lives on a
/// thread of its own (see `Store::open_with`), never on a tokio worker.
pub(super) struct PgDb {
    client: Client,
    statements: HashMap<&'static str, Statement>,
    /// Called inside an insert's transaction just before it commits (tests hold it open there).
    #[cfg(test)]
    before_commit: Option<Box<dyn Fn() + Send>>,
}

impl PgDb {
    /// Connects to `url` and creates the tables if needed.
    pub(super) fn connect(url: &str) -> Result<PgDb> {
        let mut client = Client::connect(url, NoTls).map_err(op("connect"))?;
        // A successor's claim waits for this connection's open write transaction (see `begin`):
        // if this process is frozen inside one, the server ends the session after this long,
        // rolling it back, so the takeover is delayed, never blocked. Store transactions take
        // milliseconds.
        client.batch_execute("SET idle_in_transaction_session_timeout = '10s'").map_err(op("set session timeout"))?;
        // DDL locks the tables it names, so it would wait for the running leader's open
        // transactions (and hold up its reads): skip it when the schema is already current.
        let current: bool = client.query_one(SCHEMA_IS_CURRENT, &[]).map_err(op("read store schema"))?.get(0);
        if !current {
            // Two operators starting at once must not race on CREATE ... IF NOT EXISTS.
            let mut tx = client.transaction().map_err(op("begin schema"))?;
            tx.execute("SELECT pg_advisory_xact_lock(7171717172)", &[]).map_err(op("lock schema"))?;
            tx.batch_execute(&format!("{SCHEMA}{}{}", observations::SCHEMA_POSTGRES, super::retention::SCHEMA)).map_err(op("create store schema"))?;
            tx.batch_execute(&Guarded::Store.schema()).map_err(op("create store leader table"))?;
            tx.commit().map_err(op("commit schema"))?;
        }
        Ok(PgDb {
            client,
            statements: HashMap::new(),
            #[cfg(test)]
            before_commit: None,
        })
    }

    /// `sql` prepared once per connection.
    fn prepared(&mut self, sql: &'static str) -> Result<Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).map_err(op("prepare"))?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }
}

impl Db for PgDb {
    fn claim_epoch(&mut self, now_ms: i64) -> Result<i64> {
        Ok(epoch::postgres::claim(&mut self.client, Guarded::Store, now_ms)?)
    }

    fn insert(&mut self, epoch: Option<i64>, attempts: &[Attempt]) -> Result<()> {
        let stmt = self.prepared(INSERT)?;
        let text = |f: fn(&Attempt) -> &str| attempts.iter().map(|a| f(a).to_string()).collect::<Vec<_>>();
        let int = |f: fn(&Attempt) -> i64| attempts.iter().map(f).collect::<Vec<_>>();
        let (id, job_uid, job_key, node) = (text(|a| &a.id), text(|a| &a.job_uid), text(|a| &a.job_key), text(|a| &a.node));
        let phase = text(|a| a.phase.as_str());
        let (index, number, replica) = (int(|a| a.index.into()), int(|a| a.number.into()), int(|a| a.replica.into()));
        let (cpu, memory, created) = (int(|a| a.cpu_millis as i64), int(|a| a.memory_bytes as i64), int(|a| a.created_ms));
        let ephemeral: Vec<Option<i64>> = attempts.iter().map(|a| a.held.map(|h| h.ephemeral_bytes as i64)).collect();
        // The mask's bits as they are, in a signed column.
        let gpu_mask: Vec<Option<i64>> = attempts.iter().map(|a| a.held.map(|h| h.gpu_mask as i64)).collect();
        let mut tx = epoch::postgres::begin(&mut self.client, Guarded::Store, epoch)?;
        tx.execute(&stmt, &[&id, &job_uid, &job_key, &index, &number, &node, &phase, &cpu, &memory, &created, &replica, &ephemeral, &gpu_mask])
            .map_err(op("insert attempts"))?;
        #[cfg(test)]
        if let Some(hook) = &self.before_commit {
            hook();
        }
        tx.commit().map_err(op("commit insert"))
    }

    fn mark_running(&mut self, epoch: Option<i64>, id: &str) -> Result<bool> {
        let stmt = self.prepared(MARK_RUNNING)?;
        let mut tx = epoch::postgres::begin(&mut self.client, Guarded::Store, epoch)?;
        // Committed without waiting for the WAL flush, as SQLite's synchronous=NORMAL: losing it
        // in a crash is harmless (Assigned and Running are both active; the agent's next Hello
        // reconciles them).
        tx.batch_execute("SET LOCAL synchronous_commit TO OFF").map_err(op("relax synchronous_commit"))?;
        let n = tx.execute(&stmt, &[&id]).map_err(op("mark running"))?;
        tx.commit().map_err(op("commit running"))?;
        Ok(n == 1)
    }

    fn finish(&mut self, epoch: Option<i64>, id: &str, phase: AttemptPhase, json: Option<&str>, now_ms: i64) -> Result<Option<Attempt>> {
        let mut tx = epoch::postgres::begin(&mut self.client, Guarded::Store, epoch)?;
        let row = tx
            .query_opt(
                &format!(
                    "UPDATE attempts SET phase = $2, finished_ms = $3, result_json = $4 WHERE id = $1 AND phase IN ('Assigned', 'Running') RETURNING {COLUMNS}"
                ),
                &[&id, &phase.as_str(), &now_ms, &json],
            )
            .map_err(op("finish attempt"))?;
        let done = row.map(|r| raw_to_attempt(row_to_raw(&r).map_err(op("read attempt"))?)).transpose()?;
        tx.commit().map_err(op("commit finish"))?;
        Ok(done)
    }

    fn finish_batch(&mut self, epoch: Option<i64>, batch: &[Finish]) -> Result<Vec<bool>> {
        let stmt = self.prepared(FINISH_BATCH)?;
        // An id queued twice: the first finish wins, as when they commit one after the other.
        let mut seen = HashSet::new();
        let first: Vec<bool> = batch.iter().map(|f| seen.insert(f.id.as_str())).collect();
        let sent = || batch.iter().zip(&first).filter(|(_, first)| **first).map(|(f, _)| f);
        let ids: Vec<&str> = sent().map(|f| f.id.as_str()).collect();
        let phases: Vec<&str> = sent().map(|f| f.phase.as_str()).collect();
        let times: Vec<i64> = sent().map(|f| f.now_ms).collect();
        let json: Vec<Option<&str>> = sent().map(|f| f.json.as_deref()).collect();
        let mut tx = epoch::postgres::begin(&mut self.client, Guarded::Store, epoch)?;
        let rows = tx.query(&stmt, &[&ids, &phases, &times, &json]).map_err(op("finish attempts"))?;
        tx.commit().map_err(op("commit finish batch"))?;
        let changed: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
        Ok(batch.iter().zip(first).map(|(f, first)| first && changed.contains(&f.id)).collect())
    }

    fn select(&mut self, which: &Select) -> Result<Vec<Attempt>> {
        let (filter, arg) = match which {
            Select::Id(id) => ("WHERE id = $1", Some(id.as_str())),
            Select::Job(uid) => ("WHERE job_uid = $1 ORDER BY task_index, number, replica", Some(uid.as_str())),
            Select::Node(node) => ("WHERE node = $1 AND phase IN ('Assigned', 'Running') ORDER BY id COLLATE \"C\"", Some(node.as_str())),
            Select::Active => ("WHERE phase IN ('Assigned', 'Running') ORDER BY id COLLATE \"C\"", None),
        };
        let sql = format!("SELECT {COLUMNS} FROM attempts {filter}");
        let rows = match arg {
            Some(arg) => self.client.query(&sql, &[&arg]),
            None => self.client.query(&sql, &[]),
        }
        .map_err(op("query attempts"))?;
        rows.iter().map(|r| raw_to_attempt(row_to_raw(r).map_err(op("read attempt"))?)).collect()
    }

    fn outcomes_by_node(&mut self) -> Result<Vec<(String, u64, u64)>> {
        let rows = self
            .client
            .query(
                "SELECT node, COUNT(*) FILTER (WHERE phase = 'Succeeded'), COUNT(*) FILTER (WHERE phase IN ('Failed', 'Lost')) FROM attempts
                 WHERE phase IN ('Succeeded', 'Failed', 'Lost') GROUP BY node ORDER BY node COLLATE \"C\"",
                &[],
            )
            .map_err(op("query outcomes"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get::<_, i64>(1).max(0) as u64, r.get::<_, i64>(2).max(0) as u64)).collect())
    }

    fn register_node(&mut self, epoch: Option<i64>, name: &str, public_key_sha256: &str, grant: &NodeGrant, now_ms: i64) -> Result<Registration> {
        let mut tx = epoch::postgres::begin(&mut self.client, Guarded::Store, epoch)?;
        let limits = limits_to_json(&grant.limits);
        let inserted = tx
            .execute(
                "INSERT INTO nodes (name, public_key_sha256, joined_ms, owner, limits_json) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING",
                &[&name, &public_key_sha256, &now_ms, &grant.owner, &limits],
            )
            .map_err(op("register node"))?;
        let registration = if inserted == 1 {
            Registration::New
        } else {
            let row = tx.query_one(&format!("{NODE} WHERE name = $1"), &[&name]).map_err(op("look up node"))?;
            match node_record(&row) {
                NodeRecord { removed: Some((at_ms, reason)), .. } => Registration::Retired { at_ms, reason },
                r if r.public_key_sha256 == public_key_sha256 => Registration::SameKey,
                _ => Registration::Taken,
            }
        };
        tx.commit().map_err(op("commit node"))?;
        Ok(registration)
    }

    fn remove_node(&mut self, epoch: Option<i64>, name: &str, removal: Removal, now_ms: i64) -> Result<bool> {
        let mut tx = epoch::postgres::begin(&mut self.client, Guarded::Store, epoch)?;
        let n = tx
            .execute("UPDATE nodes SET removed_ms = $2, removed_reason = $3 WHERE name = $1 AND removed_ms IS NULL", &[&name, &now_ms, &removal.as_str()])
            .map_err(op("retire node"))?;
        tx.commit().map_err(op("commit node removal"))?;
        Ok(n == 1)
    }

    fn observe(&mut self, epoch: Option<i64>, observations: &[Observation]) -> Result<()> {
        observations::postgres::observe(&mut self.client, epoch, observations)
    }

    fn retain(&mut self, epoch: Option<i64>, job_uid: &str, prune_at_ms: Option<i64>) -> Result<()> {
        super::retention::postgres::retain(&mut self.client, epoch, job_uid, prune_at_ms)
    }

    fn prune(&mut self, epoch: Option<i64>, now_ms: i64, limit: u32) -> Result<u64> {
        super::retention::postgres::prune(&mut self.client, epoch, now_ms, limit)
    }

    fn observations_since(&mut self, since_ms: i64) -> Result<Vec<Observation>> {
        observations::postgres::since(&mut self.client, since_ms)
    }

    fn observations_of(&mut self, node: &str, limit: u32) -> Result<Vec<Observation>> {
        observations::postgres::of(&mut self.client, node, limit)
    }

    fn node(&mut self, name: &str) -> Result<Option<NodeRecord>> {
        Ok(self.client.query_opt(&format!("{NODE} WHERE name = $1"), &[&name]).map_err(op("look up node"))?.map(|r| node_record(&r)))
    }

    #[cfg(test)]
    fn set_before_commit(&mut self, hook: Box<dyn Fn() + Send>) {
        self.before_commit = Some(hook);
    }
}

const NODE: &str = "SELECT public_key_sha256, joined_ms, owner, limits_json, removed_ms, removed_reason FROM nodes";

fn node_record(r: &Row) -> NodeRecord {
    let removed = r.get::<_, Option<i64>>(4).map(|at| (at, Removal::parse(r.get::<_, Option<&str>>(5).unwrap_or_default())));
    NodeRecord { public_key_sha256: r.get(0), joined_ms: r.get(1), owner: r.get(2), limits: limits_from_json(r.get(3)), removed }
}

fn row_to_raw(r: &Row) -> std::result::Result<Raw, postgres::Error> {
    let small = |i: usize| -> std::result::Result<u32, postgres::Error> { Ok(r.try_get::<_, i64>(i)? as u32) };
    Ok((
        (
            r.try_get(0)?,
            r.try_get(1)?,
            r.try_get(2)?,
            small(3)?,
            small(4)?,
            r.try_get(5)?,
            r.try_get(6)?,
            r.try_get(7)?,
            r.try_get(8)?,
            r.try_get(9)?,
            r.try_get(10)?,
            r.try_get(11)?,
        ),
        (small(12)?, r.try_get(13)?, r.try_get(14)?),
    ))
}
