//! The observations table: what the operator saw each provider do with each attempt
//! (verification outcomes and reliability), kept so reputations survive a restart.

use kommune_core::reputation::{Observation, Observed};

use super::{Result, StoreError};
use crate::db::epoch::{self, Guarded};

/// The table, the same in both backends (types the two accept alike). One row per attempt and
/// kind: recording it again changes nothing.
pub(super) const SCHEMA_SQLITE: &str = "
CREATE TABLE IF NOT EXISTS observations (
    attempt_id TEXT NOT NULL,
    observed   TEXT NOT NULL,
    node       TEXT NOT NULL,
    workload   TEXT NOT NULL,
    job_uid    TEXT NOT NULL,
    at_ms      INTEGER NOT NULL,
    PRIMARY KEY (attempt_id, observed)
);
CREATE INDEX IF NOT EXISTS observations_by_time ON observations (at_ms);
CREATE INDEX IF NOT EXISTS observations_by_node ON observations (node, at_ms);
";

pub(super) const SCHEMA_POSTGRES: &str = "
CREATE TABLE IF NOT EXISTS observations (
    attempt_id TEXT NOT NULL,
    observed   TEXT NOT NULL,
    node       TEXT NOT NULL,
    workload   TEXT NOT NULL,
    job_uid    TEXT NOT NULL,
    at_ms      BIGINT NOT NULL,
    PRIMARY KEY (attempt_id, observed)
);
CREATE INDEX IF NOT EXISTS observations_by_time ON observations (at_ms);
CREATE INDEX IF NOT EXISTS observations_by_node ON observations (node, at_ms);
";

const COLUMNS: &str = "node, workload, job_uid, attempt_id, observed, at_ms";

/// A stored kind this build does not know (written by a newer operator) is skipped, not an
/// error: reputation is computed from the kinds it knows.
fn row(node: String, workload: String, job_uid: String, attempt_id: String, observed: &str, at_ms: i64) -> Option<Observation> {
    Some(Observation { node, workload, job_uid, attempt_id, observed: Observed::parse(observed)?, at_ms })
}

pub(super) mod sqlite {
    use rusqlite::{Connection, params};

    use super::*;

    fn op(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
        move |source| StoreError::Sqlite { op, source }
    }

    pub(in super::super) fn observe(conn: &mut Connection, epoch: Option<i64>, observations: &[Observation]) -> Result<()> {
        let tx = epoch::sqlite::begin(conn, Guarded::Store, epoch)?;
        {
            let mut stmt = tx
                .prepare_cached("INSERT OR IGNORE INTO observations (node, workload, job_uid, attempt_id, observed, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
                .map_err(op("prepare observation"))?;
            for o in observations {
                stmt.execute(params![o.node, o.workload, o.job_uid, o.attempt_id, o.observed.as_str(), o.at_ms]).map_err(op("record observation"))?;
            }
        }
        tx.commit().map_err(op("commit observations"))
    }

    fn read(conn: &Connection, sql: &str, args: impl rusqlite::Params) -> Result<Vec<Observation>> {
        let mut stmt = conn.prepare_cached(sql).map_err(op("prepare observations"))?;
        let rows =
            stmt.query_map(args, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get::<_, String>(4)?, r.get(5)?))).map_err(op("read observations"))?;
        let mut out = vec![];
        for r in rows {
            let (node, workload, job, attempt, observed, at) = r.map_err(op("read observation"))?;
            out.extend(row(node, workload, job, attempt, &observed, at));
        }
        Ok(out)
    }

    pub(in super::super) fn since(conn: &Connection, since_ms: i64) -> Result<Vec<Observation>> {
        read(conn, &format!("SELECT {COLUMNS} FROM observations WHERE at_ms >= ?1 ORDER BY at_ms, attempt_id, observed"), params![since_ms])
    }

    pub(in super::super) fn of(conn: &Connection, node: &str, limit: u32) -> Result<Vec<Observation>> {
        read(
            conn,
            &format!("SELECT {COLUMNS} FROM observations WHERE node = ?1 ORDER BY at_ms DESC, attempt_id DESC, observed DESC LIMIT ?2"),
            params![node, limit],
        )
    }
}

pub(super) mod postgres {
    use ::postgres::Client;

    use super::*;

    fn op(op: &'static str) -> impl FnOnce(::postgres::Error) -> StoreError {
        move |source| StoreError::Postgres { op, source }
    }

    pub(in super::super) fn observe(client: &mut Client, epoch: Option<i64>, observations: &[Observation]) -> Result<()> {
        let mut tx = epoch::postgres::begin(client, Guarded::Store, epoch)?;
        let col = |f: fn(&Observation) -> String| observations.iter().map(f).collect::<Vec<String>>();
        let (nodes, workloads, jobs, attempts, kinds) = (
            col(|o| o.node.clone()),
            col(|o| o.workload.clone()),
            col(|o| o.job_uid.clone()),
            col(|o| o.attempt_id.clone()),
            col(|o| o.observed.as_str().to_string()),
        );
        let at: Vec<i64> = observations.iter().map(|o| o.at_ms).collect();
        tx.execute(
            "INSERT INTO observations (node, workload, job_uid, attempt_id, observed, at_ms)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[])
             ON CONFLICT (attempt_id, observed) DO NOTHING",
            &[&nodes, &workloads, &jobs, &attempts, &kinds, &at],
        )
        .map_err(op("record observations"))?;
        tx.commit().map_err(op("commit observations"))
    }

    fn read(client: &mut Client, sql: &str, args: &[&(dyn ::postgres::types::ToSql + Sync)]) -> Result<Vec<Observation>> {
        let rows = client.query(sql, args).map_err(op("read observations"))?;
        Ok(rows.iter().filter_map(|r| row(r.get(0), r.get(1), r.get(2), r.get(3), r.get::<_, &str>(4), r.get(5))).collect())
    }

    pub(in super::super) fn since(client: &mut Client, since_ms: i64) -> Result<Vec<Observation>> {
        read(
            client,
            &format!("SELECT {COLUMNS} FROM observations WHERE at_ms >= $1 ORDER BY at_ms, attempt_id COLLATE \"C\", observed COLLATE \"C\""),
            &[&since_ms],
        )
    }

    pub(in super::super) fn of(client: &mut Client, node: &str, limit: u32) -> Result<Vec<Observation>> {
        let limit = i64::from(limit);
        read(
            client,
            &format!(
                "SELECT {COLUMNS} FROM observations WHERE node = $1 ORDER BY at_ms DESC, attempt_id COLLATE \"C\" DESC, observed COLLATE \"C\" DESC LIMIT $2"
            ),
            &[&node, &limit],
        )
    }
}
